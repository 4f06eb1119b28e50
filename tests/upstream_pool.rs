//! The upstream keep-alive pool, seen from an upstream that counts its connections: reuse,
//! growth with concurrency, the idle limit and timeout, connections the upstream closes while
//! they sit idle, and responses a client abandons half-read.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/1.1 upstream written on bare sockets, so that it can count its connections and
/// close them behind the proxy's back. `/big` answers 1 MiB; `/slow` answers after 200 ms;
/// anything else answers `ok`.
#[derive(Clone, Default)]
struct Counting {
    opened: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl Counting {
    /// Start it; with `close_after`, each connection is closed that long after each answer,
    /// without a word (as an upstream's keep-alive timeout does).
    async fn start(close_after: Option<Duration>) -> (SocketAddr, Counting) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counting = Counting::default();
        let state = counting.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                state.opened.fetch_add(1, Ordering::SeqCst);
                let state = state.clone();
                tokio::spawn(async move {
                    serve(stream, &state, close_after).await;
                    state.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, counting)
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    fn open_now(&self) -> usize {
        self.opened() - self.closed.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, state: &Counting, close_after: Option<Duration>) {
    let mut buffer = Vec::new();
    loop {
        let Some(head) = read_head(&mut stream, &mut buffer).await else { return };
        state.requests.fetch_add(1, Ordering::SeqCst);
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        let body = match path.as_str() {
            "/big" => vec![b'v'; 1 << 20],
            "/slow" => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                b"slow".to_vec()
            }
            _ => b"ok".to_vec(),
        };
        let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        if stream.write_all(answer.as_bytes()).await.is_err() || stream.write_all(&body).await.is_err() {
            return;
        }
        if let Some(delay) = close_after {
            tokio::time::sleep(delay).await;
            return;
        }
    }
}

#[tokio::test]
async fn sequential_requests_share_one_connection() {
    let (addr, upstream) = Counting::start(None).await;
    let gate = start_gate(addr, "", "").await;
    for path in ["/a", "/big", "/b", "/big", "/c"] {
        for _ in 0..10 {
            let (status, _, body) = get(gate.addr, path, &[]).await;
            assert_eq!(status, StatusCode::OK);
            assert!(body == "ok" || body.len() == 1 << 20, "{path}: {} bytes", body.len());
        }
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 50);
    assert_eq!(upstream.opened(), 1, "every request after the first reuses the pooled connection");
}

#[tokio::test]
async fn the_pool_grows_with_concurrency_and_keeps_at_most_pool_max_idle() {
    let (addr, upstream) = Counting::start(None).await;
    let gate = start_gate(addr, "", "pool_max_idle = 4").await;
    let burst = || async {
        let requests: Vec<_> = (0..12).map(|_| tokio::spawn(get(gate.addr, "/slow", &[]))).collect();
        for request in requests {
            assert_eq!(request.await.unwrap().0, StatusCode::OK);
        }
    };
    burst().await;
    assert_eq!(upstream.opened(), 12, "12 requests at once take 12 connections");
    wait_for("the connections beyond pool_max_idle to close", || upstream.open_now() == 4).await;
    burst().await;
    assert_eq!(upstream.opened(), 12 + 8, "the 4 idle connections are used again");
}

#[tokio::test]
async fn idle_connections_close_after_pool_idle_timeout() {
    let (addr, upstream) = Counting::start(None).await;
    let gate = start_gate(addr, "", "pool_idle_timeout = \"300ms\"").await;
    assert_eq!(get(gate.addr, "/", &[]).await.0, StatusCode::OK);
    assert_eq!(upstream.open_now(), 1);
    wait_for("the idle connection to be closed", || upstream.open_now() == 0).await;
    assert_eq!(get(gate.addr, "/", &[]).await.0, StatusCode::OK);
    assert_eq!(upstream.opened(), 2);
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_never_a_502() {
    let (addr, upstream) = Counting::start(Some(Duration::from_millis(20))).await;
    let gate = start_gate(addr, "", "").await;
    for round in 0..20 {
        let (status, _, body) = get(gate.addr, "/", &[]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"), "round {round}");
        // The upstream has closed the connection the pool keeps.
        let opened = upstream.opened();
        wait_for("the upstream to close", || upstream.open_now() == 0 && upstream.opened() == opened).await;
    }
    assert_eq!(upstream.opened(), 20);
}

#[tokio::test]
async fn a_response_abandoned_half_read_does_not_poison_the_pool() {
    let (addr, upstream) = Counting::start(None).await;
    let gate = start_gate(addr, "", "").await;
    for _ in 0..5 {
        // Ask for 1 MiB, read the head, hang up.
        let mut client = TcpStream::connect(gate.addr).await.unwrap();
        client.write_all(b"GET /big HTTP/1.1\r\nHost: shop.test\r\n\r\n").await.unwrap();
        let mut head = [0u8; 64];
        let n = client.read(&mut head).await.unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 200"));
        drop(client);
    }
    for _ in 0..5 {
        let (status, _, body) = get(gate.addr, "/", &[]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }
    // The abandoned connections are closed, not kept half-read.
    wait_for("the abandoned connections to close", || upstream.open_now() <= 1).await;
}
