//! A TCP relay between an instance and its Redis that can turn the connections carrying a
//! subscription half-open: they stay open and deliver nothing, as after a network fault that
//! no FIN or RST reports.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Link {
    /// The client asked for a subscription on it.
    subscribed: AtomicBool,
    /// Nothing passes any more, either way.
    silent: AtomicBool,
}

pub struct Relay {
    pub addr: SocketAddr,
    links: Arc<Mutex<Vec<Arc<Link>>>>,
}

impl Relay {
    /// Relay connections from a port of its own to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let links: Arc<Mutex<Vec<Arc<Link>>>> = Arc::default();
        let registry = links.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else { continue };
                let link = Arc::new(Link::default());
                registry.lock().unwrap().push(link.clone());
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pass(client_read, server_write, link.clone(), true));
                tokio::spawn(pass(server_read, client_write, link, false));
            }
        });
        Relay { addr, links }
    }

    /// Make every connection that carries a subscription now go silent, both ways, without
    /// closing it. Later connections pass.
    pub fn silence_subscriptions(&self) -> usize {
        let links = self.links.lock().unwrap();
        let mut silenced = 0;
        for link in links.iter().filter(|link| link.subscribed.load(Ordering::Relaxed)) {
            link.silent.store(true, Ordering::Relaxed);
            silenced += 1;
        }
        silenced
    }
}

/// Copy one way until either side closes; once the link is silent, read and drop.
async fn pass(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, link: Arc<Link>, from_client: bool) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let Ok(read) = from.read(&mut buffer).await else { return };
        if read == 0 {
            return;
        }
        let chunk = &buffer[..read];
        if from_client && chunk.windows(9).any(|w| w.eq_ignore_ascii_case(b"subscribe")) {
            link.subscribed.store(true, Ordering::Relaxed);
        }
        if link.silent.load(Ordering::Relaxed) {
            continue;
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}
