//! The upstream's keep-alive pool: HTTP/1.1 connections over hyper's `client::conn::http1`,
//! the most recently used first.
//!
//! Written here rather than taken from hyper-util's legacy `Client` because that client was
//! among the largest user-space costs of the admitted path (docs/benchmarks.md, "Admitted path versus nginx"):
//! per request it rebuilt an absolute URI, locked a pool keyed by scheme and authority, raced a
//! checkout against a lazy connect, and spawned a task to wait for the connection to be idle
//! again. Here a request takes the last idle connection from a plain list under a lock held for
//! a `pop`, and the response body hands the connection back when it ends: no task, no channel,
//! no key. One upstream, one list.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::Body;
use crate::resolve::Resolver;

/// Why a request could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be opened (resolution, refusal, timeout).
    Connect(io::Error),
    /// The connection failed while the request or its response head was under way.
    Http(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(error) => write!(f, "cannot connect: {error}"),
            SendError::Http(error) => write!(f, "{error}"),
        }
    }
}

/// Where and how to open a connection.
struct Connector {
    host: String,
    port: u16,
    /// Set when the upstream is an IP address: nothing to resolve.
    address: Option<IpAddr>,
    resolver: Resolver,
    timeout: Duration,
}

impl Connector {
    /// Open a connection: each address of the name in turn, within `timeout` in all.
    async fn connect(&self) -> io::Result<TcpStream> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let addresses = match self.address {
            Some(address) => vec![address],
            None => tokio::time::timeout_at(deadline, self.resolver.lookup(&self.host))
                .await
                .map_err(|_| timed_out(&self.host, self.timeout))??,
        };
        let mut last = None;
        for address in addresses {
            let target = SocketAddr::new(address, self.port);
            match tokio::time::timeout_at(deadline, TcpStream::connect(target)).await {
                Ok(Ok(stream)) => {
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Ok(Err(error)) => last = Some(error),
                Err(_) => return Err(timed_out(&target.to_string(), self.timeout)),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{} has no address", self.host))))
    }
}

fn timed_out(what: &str, timeout: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {what} took over {timeout:?}"))
}

/// A pooled connection: hyper's sender knows when its connection closed; a bare stream
/// (the admitted fast lane's, `crate::lane`) finds out at its next exchange.
trait Keepable: Send + 'static {
    fn is_closed(&self) -> bool;
}

impl Keepable for SendRequest<Body> {
    fn is_closed(&self) -> bool {
        SendRequest::is_closed(self)
    }
}

impl Keepable for TcpStream {
    /// Closed, or sent something while idle (a stray byte would be read as the answer to the
    /// next request: never reuse such a stream). The reactor has marked the stream readable
    /// if anything came since its last read, so an idle stream costs no system call here.
    fn is_closed(&self) -> bool {
        let mut context = Context::from_waker(std::task::Waker::noop());
        match self.poll_read_ready(&mut context) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                !matches!(self.try_read(&mut [0u8; 1]), Err(error) if error.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// An idle connection and since when it is idle.
struct Idle<C> {
    connection: C,
    since: Instant,
}

struct Shared<C> {
    idle: Mutex<VecDeque<Idle<C>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl<C: Keepable> Shared<C> {
    fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Shared<C>> {
        let shared = Arc::new(Shared { idle: Mutex::new(VecDeque::new()), max_idle, idle_timeout });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap_idle(Arc::downgrade(&shared)));
        }
        shared
    }

    /// Take the most recently used connection that is still open.
    fn take(&self) -> Option<C> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some(Idle { connection, since }) = idle.pop_back() {
            if !connection.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(connection);
            }
        }
        None
    }

    /// Keep a connection whose last exchange is complete, unless the pool is full.
    fn give_back(&self, connection: C) {
        if connection.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < self.max_idle {
            idle.push_back(Idle { connection, since: Instant::now() });
        }
    }

    /// Close the connections idle for longer than `idle_timeout`, and those the upstream closed.
    fn reap(&self) {
        let mut idle = self.idle.lock().expect("pool lock");
        idle.retain(|kept| kept.since.elapsed() < self.idle_timeout && !kept.connection.is_closed());
    }
}

/// The pool of connections to one upstream: hyper's senders for requests hyper serves, bare
/// streams for the admitted fast lane.
pub struct Pool {
    shared: Arc<Shared<SendRequest<Body>>>,
    streams: Arc<Shared<TcpStream>>,
    connector: Connector,
    http: http1::Builder,
}

impl Pool {
    /// A pool for `host:port`. Inside a runtime, a task closes connections idle for longer
    /// than `idle_timeout`; it ends with the pool.
    pub fn new(
        host: &str,
        port: u16,
        resolver: Resolver,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Pool {
        let shared = Shared::new(max_idle, idle_timeout);
        let streams = Shared::new(max_idle, idle_timeout);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let connector =
            Connector { host: bare.to_owned(), port, address: bare.parse().ok(), resolver, timeout: connect_timeout };
        Pool { shared, streams, connector, http: http1::Builder::new() }
    }

    /// An idle bare stream for the fast lane, the most recently used first.
    pub fn take_stream(&self) -> Option<TcpStream> {
        self.streams.take()
    }

    /// A new bare stream.
    pub async fn connect_stream(&self) -> io::Result<TcpStream> {
        self.connector.connect().await
    }

    /// Keep a bare stream whose last exchange is complete.
    pub fn give_back_stream(&self, stream: TcpStream) {
        self.streams.give_back(stream);
    }

    /// Send a request (origin-form URI, `Host` set) on an idle connection or a new one. A
    /// request an idle connection turned out unable to take (closed by the upstream meanwhile)
    /// goes on a new connection; nothing is sent twice.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Response<Pooled>, SendError> {
        while let Some(mut sender) = self.shared.take() {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.pooled(response, sender)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(SendError::Http(error.into_error())),
                },
            }
        }
        let mut sender = self.open().await?;
        match sender.send_request(request).await {
            Ok(response) => Ok(self.pooled(response, sender)),
            Err(error) => Err(SendError::Http(error)),
        }
    }

    /// A new connection, driven by its own task until either side closes it.
    async fn open(&self) -> Result<SendRequest<Body>, SendError> {
        let stream = self.connector.connect().await.map_err(SendError::Connect)?;
        let (sender, connection) = self.http.handshake(TokioIo::new(stream)).await.map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn pooled(&self, response: Response<Incoming>, sender: SendRequest<Body>) -> Response<Pooled> {
        // After a 101 the connection belongs to the tunnel.
        let upgraded = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        let lease = (!upgraded).then(|| Lease { sender, shared: self.shared.clone() });
        response.map(|body| Pooled { body, lease })
    }
}

async fn reap_idle<C: Keepable>(shared: Weak<Shared<C>>) {
    let every = match shared.upgrade() {
        Some(shared) => (shared.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(30)),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        match shared.upgrade() {
            Some(shared) => shared.reap(),
            None => return,
        }
    }
}

/// A connection lent to one exchange.
struct Lease {
    sender: SendRequest<Body>,
    shared: Arc<Shared<SendRequest<Body>>>,
}

/// A response body from the pool: when it has been read to its end, its connection goes back
/// to the pool. A body dropped before its end takes its connection with it (hyper closes a
/// connection whose response was not read through).
pub struct Pooled {
    body: Incoming,
    lease: Option<Lease>,
}

impl Pooled {
    fn release(&mut self) {
        if let Some(Lease { sender, shared }) = self.lease.take() {
            shared.give_back(sender);
        }
    }
}

impl http_body::Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // Servers do not poll a body past its declared length: a body at its end is done.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}
