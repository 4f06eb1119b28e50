//! Listeners: the accept loop, TLS, the connection cap, and graceful shutdown.
//!
//! `Listener` owns the accept loop; each accepted connection is served by hyper with HTTP/1.1
//! and HTTP/2 (h2c by preface, h2 over TLS by ALPN). Shutdown is explicit: the accept loop
//! stops, every connection is told to finish its in-flight requests, and the server waits for
//! them up to `server.shutdown_grace`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::BoxError;
use crate::config::{Config, ServerConfig, TlsConfig};
use crate::framing::{ScannedIo, Scanner, Verdicts};
use crate::gate::{Connection, Gate};
use crate::lane;
use crate::limit::{ConnectionPlace, Slots};
use crate::metrics::Metrics;
use crate::slow::SendTimeout;
use crate::store::Store;

/// A running server.
pub struct Running {
    /// The address the public listener is bound to (useful with port 0).
    pub addr: SocketAddr,
    /// The admin listener's address, when `[admin]` is set.
    pub admin: Option<SocketAddr>,
    gate: Arc<Gate>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Ask the server to stop: no new connections, in-flight requests finish.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Wait until the server has stopped.
    pub async fn stopped(self) {
        if let Err(error) = self.task.await {
            tracing::error!(%error, "server task failed");
        }
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }
}

/// Bind the listener and start serving in the background.
/// Descriptors a configuration may hold at once: client connections, waiting sockets, the
/// upstream pool and a margin for listeners, Redis and files.
pub fn descriptors_needed(config: &Config) -> u64 {
    let server = &config.server;
    // Two idle pools: hyper's and the fast lane's.
    (server.max_connections.get() + server.max_feed_sockets + 2 * config.upstream.pool_max_idle) as u64 + 64
}

/// Raise the soft limit on open files to the hard one, as nginx's `worker_rlimit_nofile` and
/// Go's runtime do (many systems start services with a soft limit of 1 024), then make the
/// configuration fit it: defaults the file left alone are sized down to the limit (said once,
/// at info), values it set that exceed the limit are warned of. Returns the limit in force.
pub fn fit_descriptor_limit(config: &mut Config) -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let (soft, hard) = (limit.current?, limit.maximum);
    if hard.is_none_or(|hard| hard > soft) {
        let wanted = limit.maximum;
        limit.current = wanted;
        match setrlimit(Resource::Nofile, limit) {
            Ok(()) => tracing::debug!(from = soft, to = ?wanted, "raised the open-file limit"),
            Err(error) => tracing::warn!(%error, soft, "cannot raise the open-file limit"),
        }
    }
    let now = getrlimit(Resource::Nofile).current;
    if let Some(limit) = now {
        fit_capacity(config, limit);
    }
    now
}

/// Make `config` fit `limit` open files (see [`fit_descriptor_limit`]).
pub fn fit_capacity(config: &mut Config, limit: u64) {
    let needed = descriptors_needed(config);
    if needed <= limit {
        return;
    }
    let server = &mut config.server;
    if server.capacity_given {
        tracing::warn!(
            limit,
            needed,
            "server.max_connections + server.max_feed_sockets + 2 x upstream.pool_max_idle exceed the open-file limit: \
             beyond it new connections fail; raise the limit (LimitNOFILE, ulimit -n) or lower those settings"
        );
        return;
    }
    // The defaults' own proportions (1 connection to 5 feed sockets) in what the limit leaves.
    let fixed = needed - (server.max_connections.get() + server.max_feed_sockets) as u64;
    let room = limit.saturating_sub(fixed).max(12) as usize;
    let connections = (room / 6).max(1);
    server.max_connections = std::num::NonZeroUsize::new(connections).expect("at least one");
    server.max_feed_sockets = room - connections;
    tracing::info!(
        limit,
        max_connections = server.max_connections.get(),
        max_feed_sockets = server.max_feed_sockets,
        "sized server.max_connections and server.max_feed_sockets to the open-file limit (set them to choose)"
    );
}

pub async fn start(config: &Config) -> anyhow::Result<Running> {
    let stop = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let store = Store::from_config(&config.store, metrics.clone()).await.context("cannot set up the store")?;
    let gate = Arc::new(Gate::new(config, store, CancellationToken::new(), metrics)?);
    gate.start();
    let tls = config.server.tls.as_ref().map(tls_acceptor).transpose()?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let addr = listener.local_addr()?;
    // Stopping the public listener (`shutdown`) is when readiness starts to fail; the admin
    // listener serves until the drain is over.
    let admin = match &config.admin {
        Some(admin) => Some(crate::admin::start(admin, &config.server, gate.clone(), stop.clone()).await?),
        None => None,
    };
    let caps = Caps {
        total: config.server.max_connections.get(),
        per_address: config.server.max_connections_per_address.get(),
        send_timeout: config.server.send_timeout,
        trusted_uncounted: true,
    };
    let server = Listener {
        acceptor: Acceptor::new(listener, "public", caps, tls.is_some(), &gate),
        tls,
        gate: gate.clone(),
        protocols: Protocols::new(&config.server),
        server: config.server.clone(),
        stop: stop.clone(),
    };
    let task = tokio::spawn(server.run());
    tracing::info!(%addr, tls = config.server.tls.is_some(), "listening");
    Ok(Running { addr, admin, gate, stop, task })
}

/// What a listener's connections may hold: in total, per client address, and how long a write
/// may make no progress.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    pub total: usize,
    pub per_address: usize,
    pub send_timeout: Duration,
    /// Trusted proxies' connections are not counted per address (their requests count
    /// against the clients they name): the public listener.
    pub trusted_uncounted: bool,
}

/// A connection let in: its stream (writes bounded by the send timeout), its peer, and the
/// places it holds under the caps (freed when it, and a tunnel it turns into, are done).
pub(crate) struct Admitted {
    pub stream: SendTimeout<TcpStream>,
    pub peer: SocketAddr,
    pub place: ConnectionPlace,
}

/// The one accept loop both listeners use: a total cap (at it, new clients wait in the accept
/// queue), a cap per client address (beyond it, `503` and close; trusted proxies are not
/// counted, their requests count against the clients they name), the send timeout, and a
/// backoff on accept errors (out of file descriptors, say) instead of a spin.
pub(crate) struct Acceptor {
    listener: TcpListener,
    /// `public` or `admin`, for the metrics.
    name: &'static str,
    total: Arc<Semaphore>,
    per_address: Arc<Slots>,
    trusted_uncounted: bool,
    send_timeout: Duration,
    send_timed_out: Arc<dyn Fn() + Send + Sync>,
    /// TLS comes after the accept: an over-cap client gets no `503`, just a close.
    tls: bool,
    gate: Arc<Gate>,
}

impl Acceptor {
    pub fn new(listener: TcpListener, name: &'static str, caps: Caps, tls: bool, gate: &Arc<Gate>) -> Acceptor {
        Acceptor {
            listener,
            name,
            total: Arc::new(Semaphore::new(caps.total)),
            per_address: Slots::new(usize::MAX, caps.per_address),
            trusted_uncounted: caps.trusted_uncounted,
            send_timeout: caps.send_timeout,
            send_timed_out: send_timed_out(gate, name),
            tls,
            gate: gate.clone(),
        }
    }

    /// The next connection let in, or `None` once `stop` is cancelled.
    pub async fn next(&self, stop: &CancellationToken) -> Option<Admitted> {
        loop {
            let permit = tokio::select! {
                permit = self.total.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                () = stop.cancelled() => return None,
            };
            let (stream, peer) = tokio::select! {
                accepted = self.accept() => accepted,
                () = stop.cancelled() => return None,
            };
            let _ = stream.set_nodelay(true);
            let address = if self.trusted_uncounted && self.gate.trusts(peer.ip()) {
                None
            } else {
                match self.per_address.admit(peer.ip()) {
                    Some(slot) => Some(slot),
                    None => {
                        refuse_connection(&stream, self.tls);
                        self.gate.metrics().connection_limited(self.name, "per_address");
                        tracing::debug!(listener = self.name, %peer, "connection refused: too many from this address");
                        continue;
                    }
                }
            };
            let stream = SendTimeout::new(stream, self.send_timeout, Some(self.send_timed_out.clone()));
            return Some(Admitted { stream, peer, place: ConnectionPlace { total: permit, address } });
        }
    }

    /// Accept the next connection; on errors back off instead of spinning.
    async fn accept(&self) -> (TcpStream, SocketAddr) {
        let mut backoff = Duration::from_millis(5);
        loop {
            match self.listener.accept().await {
                Ok(accepted) => return accepted,
                Err(error) => {
                    tracing::warn!(listener = self.name, %error, ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// The public listener: its accept loop and what every connection shares.
struct Listener {
    acceptor: Acceptor,
    tls: Option<TlsAcceptor>,
    gate: Arc<Gate>,
    protocols: Protocols,
    server: ServerConfig,
    stop: CancellationToken,
}

impl Listener {
    async fn run(self) {
        // Connections are told to finish through `drain`, and waited for through `open`.
        let drain = CancellationToken::new();
        let open = TaskTracker::new();
        while let Some(Admitted { stream, peer, place }) = self.acceptor.next(&self.stop).await {
            // The places go with the connection (and an upgraded tunnel it turns into).
            let connection = self.gate.connection(peer, self.tls.is_some(), Verdicts::default(), Some(place));
            let gate = self.gate.clone();
            let protocols = self.protocols.clone();
            let drain = drain.clone();
            let tls = self.tls.clone();
            let handshake_timeout = self.server.tls_handshake_timeout;
            open.spawn(async move {
                match tls {
                    None => {
                        let protocol = if protocols.h2c { Protocol::Detect } else { Protocol::Http1 };
                        protocols.serve(protocol, stream, gate, connection, drain).await
                    }
                    Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            let protocol = if h2 { Protocol::Http2 } else { Protocol::Http1 };
                            protocols.serve(protocol, stream, gate, connection, drain).await
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    },
                }
            });
        }
        drop(self.acceptor);
        tracing::info!(grace = ?self.server.shutdown_grace, "shutting down: finishing in-flight requests");
        drain.cancel();
        open.close();
        if tokio::time::timeout(self.server.shutdown_grace, open.wait()).await.is_err() {
            tracing::warn!("shutdown grace ran out; closing the remaining connections");
        }
        // Upgraded tunnels and feed sockets outlive their requests: they get the grace above,
        // then the stop token ends them (feeds say goodbye; pages reconnect elsewhere).
        self.gate.stop_token().cancel();
        for tasks in [self.gate.tunnels(), self.gate.tasks()] {
            tasks.close();
            let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
        }
    }
}

/// Streams one HTTP/2 connection may have open at once (nginx's `http2_max_concurrent_streams`).
const MAX_STREAMS: u32 = 128;

/// Counts a client let go for `send_timeout` on `listener`.
fn send_timed_out(gate: &Arc<Gate>, listener: &'static str) -> Arc<dyn Fn() + Send + Sync> {
    let metrics = gate.metrics().clone();
    Arc::new(move || metrics.connection_limited(listener, "send_timeout"))
}

/// Answer a connection over the per-address cap, as nginx's `limit_conn` does (503), in one
/// write that never waits: a client that does not read gets nothing. Over TLS there is no
/// answer before a handshake, so the connection is just closed.
fn refuse_connection(stream: &TcpStream, tls: bool) {
    const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n\
        Content-Type: text/plain; charset=utf-8\r\nContent-Length: 40\r\n\r\nToo many connections from your address.\n";
    if !tls {
        let _ = stream.try_write(REFUSED);
    }
}

/// Which protocol a connection speaks.
#[derive(Clone, Copy)]
enum Protocol {
    Http1,
    Http2,
    /// HTTP/2 if the client opens with its preface, else HTTP/1.1 (`server.h2c`).
    Detect,
}

/// How connections are served: HTTP/1.1 unless HTTP/2 was chosen, by ALPN over TLS or, when
/// `server.h2c` asks for it, by the client's preface in cleartext. A connection whose protocol
/// is known is served by hyper's builder for it directly: no preface to wait for, no rewind
/// of what was read (hyper-util's `auto` builder reads the preface even when told one
/// protocol, once upgrades are on).
#[derive(Clone)]
struct Protocols {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    detect: Arc<auto::Builder<TokioExecutor>>,
    h2c: bool,
    /// The fast lane's limits, when it is on.
    lane: Option<Arc<lane::Limits>>,
    max_header_bytes: usize,
    max_headers: usize,
    /// How long an HTTP/2 connection (or one not yet known) may go without a request:
    /// `header_read_timeout`, as an HTTP/1 connection between requests.
    idle_timeout: Duration,
}

impl Protocols {
    fn new(server: &ServerConfig) -> Protocols {
        let detect = http_builder(server);
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(server.header_read_timeout)
            .max_buf_size(server.max_header_bytes)
            .max_headers(server.max_headers);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(MAX_STREAMS)
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20));
        let lane = server.fast_lane.then(|| {
            Arc::new(lane::Limits {
                header_read_timeout: server.header_read_timeout,
                max_header_bytes: server.max_header_bytes,
                max_headers: server.max_headers,
            })
        });
        Protocols {
            h1,
            h2,
            detect: Arc::new(detect),
            h2c: server.h2c,
            lane,
            max_header_bytes: server.max_header_bytes,
            max_headers: server.max_headers,
            idle_timeout: server.header_read_timeout,
        }
    }

    /// Serve one connection until it closes, or `drain` asks it to finish what is in flight:
    /// HTTP/1.1 on the fast lane until a request needs hyper, then with hyper.
    async fn serve<I>(
        &self,
        protocol: Protocol,
        io: I,
        gate: Arc<Gate>,
        connection: Connection,
        drain: CancellationToken,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match (protocol, &self.lane) {
            (Protocol::Http1, Some(limits)) => match lane::serve(io, &gate, &connection, &drain, limits).await {
                lane::Ended::Closed => {}
                lane::Ended::Handover(io) => {
                    // A request handed over during shutdown is still answered (hyper's graceful
                    // shutdown would close a connection it has not read from yet); the grace
                    // bounds it.
                    let drain = if drain.is_cancelled() { CancellationToken::new() } else { drain };
                    self.serve_hyper(protocol, io, gate, connection, drain).await
                }
            },
            _ => self.serve_hyper(protocol, io, gate, connection, drain).await,
        }
    }

    /// Serve a connection with hyper, the framing scanner watching what it reads.
    async fn serve_hyper<I>(
        &self,
        protocol: Protocol,
        io: I,
        gate: Arc<Gate>,
        connection: Connection,
        drain: CancellationToken,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = ScannedIo::new(io, Scanner::new(self.max_header_bytes, self.max_headers, connection.verdicts.clone()));
        let peer = connection.peer;
        let cut = connection.cut.clone();
        // HTTP/1 connections are held to `header_read_timeout` by hyper, idle or not; an
        // HTTP/2 one (or one whose protocol is not known yet) only by this watch.
        let activity = (!matches!(protocol, Protocol::Http1)).then(|| Arc::new(Activity::new()));
        let watched = activity.clone();
        let service = service_fn(move |request| {
            let gate = gate.clone();
            let connection = connection.clone();
            let activity = watched.clone();
            async move {
                let Some(activity) = activity else {
                    return Ok::<_, Infallible>(gate.handle(request, &connection).await);
                };
                // Busy until the answer's body is sent.
                let busy = activity.busy();
                let response = gate.handle(request, &connection).await;
                Ok(response.map(|body| crate::body::boxed(crate::body::Holding::new(body, busy))))
            }
        });
        let idle_timeout = self.idle_timeout;
        let idle = async {
            match &activity {
                Some(activity) => activity.idle_for(idle_timeout).await,
                None => std::future::pending().await,
            }
        };
        let mut idle = std::pin::pin!(idle);
        let io = TokioIo::new(io);
        // Each connection type has its own `graceful_shutdown`: one arm each.
        macro_rules! drained {
            ($connection:expr) => {{
                let mut served = std::pin::pin!($connection);
                tokio::select! {
                    result = served.as_mut() => result.map_err(BoxError::from),
                    () = drain.cancelled() => {
                        served.as_mut().graceful_shutdown();
                        tokio::select! {
                            result = served => result.map_err(BoxError::from),
                            () = cut.cancelled() => Err(BoxError::from("cut")),
                        }
                    }
                    // Dropped, not shut down: its streams and their buffers go at once.
                    () = cut.cancelled() => Err(BoxError::from("a stream its client stalled for send_timeout")),
                    // No request (not even a preface) for the idle timeout: asked to close, and
                    // what is in flight finishes.
                    () = idle.as_mut() => {
                        // Nothing is in flight: a client that does not take the hint (an
                        // HTTP/2 peer that never acknowledges the goaway) is cut after as long.
                        served.as_mut().graceful_shutdown();
                        tokio::select! {
                            result = served => result.map_err(BoxError::from),
                            () = cut.cancelled() => Err(BoxError::from("cut")),
                            () = tokio::time::sleep(idle_timeout) => Err(BoxError::from("idle")),
                        }
                    }
                }
            }};
        }
        let result = match protocol {
            Protocol::Http1 => drained!(self.h1.serve_connection(io, service).with_upgrades()),
            Protocol::Http2 => drained!(self.h2.serve_connection(io, service)),
            Protocol::Detect => drained!(self.detect.serve_connection_with_upgrades(io, service)),
        };
        if let Err(error) = result {
            tracing::debug!(%peer, %error, "connection ended with an error");
        }
    }
}

/// A connection's requests, for its idle timeout: how many are being answered, and since when
/// none has been.
struct Activity {
    busy: std::sync::atomic::AtomicUsize,
    /// Milliseconds from `since` to the end of the last request answered.
    last: std::sync::atomic::AtomicU64,
    since: tokio::time::Instant,
}

impl Activity {
    fn new() -> Activity {
        Activity { busy: Default::default(), last: Default::default(), since: tokio::time::Instant::now() }
    }

    /// A request being answered, until the guard is dropped.
    fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Busy(self.clone())
    }

    /// Resolves once no request has been answered, nor is being, for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        use std::sync::atomic::Ordering;
        loop {
            let last = self.since + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let idle_at = last + timeout;
            if self.busy.load(Ordering::Relaxed) == 0 && tokio::time::Instant::now() >= idle_at {
                return;
            }
            tokio::time::sleep_until(idle_at.max(tokio::time::Instant::now() + timeout / 4)).await;
        }
    }
}

/// A request of a watched connection being answered.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        let activity = &self.0;
        activity.last.store(activity.since.elapsed().as_millis() as u64, Ordering::Relaxed);
        activity.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

fn http_builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .max_buf_size(server.max_header_bytes)
        .max_headers(server.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_STREAMS)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

pub fn tls_acceptor(tls: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("{}: cannot read the certificate chain", tls.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("{}: cannot read the private key", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not fit together")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // The server's order of cipher suites (strongest first), not the client's.
    config.ignore_client_order = true;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
