//! A name server of the test's own on a loopback UDP port: answers every A query with the
//! address it is told, for the TTL it is told, counts the questions, and can stall (read
//! questions and answer none), as a name server does when it is overloaded or unreachable.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::A;
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

#[derive(Clone)]
pub struct NameServer {
    pub addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    address: Mutex<Ipv4Addr>,
    ttl: AtomicU32,
    stalled: AtomicBool,
    answered: AtomicUsize,
    unanswered: AtomicUsize,
}

impl NameServer {
    pub async fn start(address: Ipv4Addr, ttl: u32) -> NameServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let state = Arc::new(State {
            address: Mutex::new(address),
            ttl: AtomicU32::new(ttl),
            stalled: AtomicBool::new(false),
            answered: AtomicUsize::new(0),
            unanswered: AtomicUsize::new(0),
        });
        let serving = state.clone();
        tokio::spawn(async move {
            let mut buffer = [0u8; 512];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buffer).await else { continue };
                let Ok(query) = Message::from_vec(&buffer[..n]) else { continue };
                if serving.stalled.load(Ordering::SeqCst) {
                    serving.unanswered.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let mut answer = Message::new();
                answer
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(query.op_code())
                    .set_recursion_desired(query.recursion_desired())
                    .set_recursion_available(true)
                    .set_response_code(ResponseCode::NoError);
                for question in query.queries() {
                    answer.add_query(question.clone());
                    if question.query_type() == RecordType::A {
                        let ip = *serving.address.lock().unwrap();
                        let ttl = serving.ttl.load(Ordering::SeqCst);
                        answer.add_answer(Record::from_rdata(question.name().clone(), ttl, RData::A(A(ip))));
                    }
                }
                serving.answered.fetch_add(1, Ordering::SeqCst);
                let _ = socket.send_to(&answer.to_vec().unwrap(), peer).await;
            }
        });
        NameServer { addr, state }
    }

    /// Point the name at another address from now on.
    pub fn set_address(&self, address: Ipv4Addr) {
        *self.state.address.lock().unwrap() = address;
    }

    pub fn set_ttl(&self, ttl: u32) {
        self.state.ttl.store(ttl, Ordering::SeqCst);
    }

    /// Stop answering (questions are read and dropped).
    pub fn stall(&self) {
        self.state.stalled.store(true, Ordering::SeqCst);
    }

    /// Questions answered so far.
    pub fn answered(&self) -> usize {
        self.state.answered.load(Ordering::SeqCst)
    }

    /// Questions received while stalled.
    pub fn unanswered(&self) -> usize {
        self.state.unanswered.load(Ordering::SeqCst)
    }
}
