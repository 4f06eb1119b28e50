//! Test harness: a recording upstream on port 0, the real gate on port 0, keys, and small
//! HTTP clients (hyper for well-formed requests, raw TCP for hostile ones).
#![allow(dead_code)]

pub mod dns;
pub mod redis_server;
pub mod relay;
pub mod visitor;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use vestibule::config::Config;
use vestibule::server::{self, Running};
use vestibule::token::{generate_key, KeyKind};

/// Longest any test waits for a condition.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body_bytes: u64,
}

/// A recording upstream.
#[derive(Clone, Default)]
pub struct Upstream {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// Signalled when a request to `/slow` or `/hang` has arrived.
    pub arrived: Arc<Notify>,
}

impl Upstream {
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.requests().last().cloned().expect("the upstream saw no request")
    }
}

/// Start the recording upstream. Routes:
/// - `/hang` never answers; `/slow` answers after 300 ms;
/// - `/download/N` streams N bytes;
/// - `/upload` counts the body as it streams and answers with the count;
/// - `.../ws` answers an upgrade with 101 and echoes bytes; `/no-upgrade` answers 200 to one;
/// - `.../order` answers with `Vestibule-Session: end`;
/// - `/hop` answers with hop-by-hop headers that must not reach the client;
/// - anything else answers 200 `upstream saw <path>`.
pub async fn start_upstream() -> (SocketAddr, Upstream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = Upstream::default();
    let state = upstream.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| handle(request, state.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, upstream)
}

/// A body of `left` bytes made on the fly in 64 KiB frames: nothing is held in memory.
pub struct Repeat {
    pub left: u64,
}

impl http_body::Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        static CHUNK: [u8; 64 * 1024] = [b'v'; 64 * 1024];
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(CHUNK.len() as u64);
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(&CHUNK[..n as usize])))))
    }
}

type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn handle(request: Request<Incoming>, state: Upstream) -> Result<Response<TestBody>, Infallible> {
    if let Some(size) = request.uri().path().strip_prefix("/download/") {
        let left = size.parse().unwrap_or(0);
        return Ok(Response::new(Repeat { left }.boxed()));
    }
    let response = respond(request, state).await;
    Ok(response.map(|body| body.boxed()))
}

async fn respond(mut request: Request<Incoming>, state: Upstream) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let on_upgrade = path.ends_with("/ws").then(|| hyper::upgrade::on(&mut request));
    let (parts, mut body) = request.into_parts();
    let mut body_bytes = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            body_bytes += data.len() as u64;
        }
    }
    state.seen.lock().unwrap().push(Seen {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
        body_bytes,
    });
    let response = |status: StatusCode, text: String| {
        let mut response = Response::new(Full::new(Bytes::from(text)));
        *response.status_mut() = status;
        response
    };
    match path.as_str() {
        "/hang" => {
            state.arrived.notify_one();
            std::future::pending::<()>().await;
            unreachable!()
        }
        "/slow" => {
            state.arrived.notify_one();
            tokio::time::sleep(Duration::from_millis(300)).await;
            response(StatusCode::OK, "slow done".into())
        }
        "/upload" => response(StatusCode::OK, body_bytes.to_string()),
        order if order.ends_with("/order") => {
            // The order is placed: the upstream ends the visitor's session.
            let mut placed = response(StatusCode::OK, "order placed".into());
            placed.headers_mut().insert("vestibule-session", "end".parse().unwrap());
            placed
        }
        ws if ws.ends_with("/ws") => {
            let mut switching = response(StatusCode::SWITCHING_PROTOCOLS, String::new());
            switching.headers_mut().insert("upgrade", "websocket".parse().unwrap());
            switching.headers_mut().insert("connection", "upgrade".parse().unwrap());
            if let Some(on_upgrade) = on_upgrade {
                tokio::spawn(async move {
                    let Ok(upgraded) = on_upgrade.await else { return };
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
            switching
        }
        "/hop" => {
            let mut r = response(StatusCode::OK, "hop".into());
            let h = r.headers_mut();
            h.insert("connection", "x-upstream-private".parse().unwrap());
            h.insert("x-upstream-private", "secret".parse().unwrap());
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            h.insert("vestibule-session", "end".parse().unwrap());
            h.insert("x-kept", "1".parse().unwrap());
            r
        }
        _ => response(StatusCode::OK, format!("upstream saw {path}")),
    }
}

/// A temporary folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let unique = format!("vestibule-test-{name}-{}-{}", std::process::id(), vestibule::token::random_id());
        let dir = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A gate in front of `upstream`, with room `checkout` guarding `/checkout` and
/// `/api/cart/checkout`, and room `other` guarding `/other`. Both rooms are paused, so that
/// nobody gets in without a token: these tests are about the gate, not the line.
/// `server_extra` is appended to `[server]`; `upstream_extra` to `[upstream]`.
pub struct Harness {
    pub running: Running,
    pub addr: SocketAddr,
    pub dir: TempDir,
    pub key_path: PathBuf,
}

pub fn config_text(listen: &str, upstream: SocketAddr, key: &Path, server_extra: &str, upstream_extra: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
shutdown_grace = "5s"
{server_extra}
[upstream]
url = "http://{upstream}"
{upstream_extra}
[tokens]
signing_key = {key:?}
[[rooms]]
id = "checkout"
paths = ["/checkout", "/api/cart/checkout"]
admit_per_minute = 60
max_active = 10
state = "paused"
[[rooms]]
id = "other"
paths = ["/other"]
admit_per_minute = 60
max_active = 10
state = "paused"
"#
    )
}

pub async fn start_gate(upstream: SocketAddr, server_extra: &str, upstream_extra: &str) -> Harness {
    let dir = TempDir::new("gate");
    let key_path = dir.path().join("signing.pem");
    std::fs::write(&key_path, generate_key(KeyKind::Eddsa)).unwrap();
    let text = config_text("127.0.0.1:0", upstream, &key_path, server_extra, upstream_extra);
    let config = Config::parse(&text, "test.toml", dir.path()).unwrap();
    let running = server::start(&config).await.unwrap();
    let addr = running.addr;
    Harness { running, addr, dir, key_path }
}

/// A gate in front of `upstream` with one room `checkout` on `/checkout`, configured by
/// `room` (TOML keys of `[[rooms]]` besides id and paths).
pub async fn start_room(upstream: SocketAddr, room: &str) -> Harness {
    start_room_with(upstream, "", room).await
}

/// [`start_room`] with `server_extra` appended to `[server]`.
pub async fn start_room_with(upstream: SocketAddr, server_extra: &str, room: &str) -> Harness {
    let dir = TempDir::new("room");
    let key_path = dir.path().join("signing.pem");
    std::fs::write(&key_path, generate_key(KeyKind::Eddsa)).unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n{server_extra}\n[upstream]\nurl = \"http://{upstream}\"\n\
         [tokens]\nsigning_key = {key_path:?}\n[[rooms]]\nid = \"checkout\"\npaths = [\"/checkout\"]\n{room}\n"
    );
    let config = Config::parse(&text, "test.toml", dir.path()).unwrap();
    let running = server::start(&config).await.unwrap();
    let addr = running.addr;
    Harness { running, addr, dir, key_path }
}

impl Harness {
    /// A valid token for `room`.
    pub fn token(&self, room: &str) -> String {
        let expires_at = vestibule::token::unix_now() + 600;
        self.running.gate().tokens().mint(room, "visitor-1", 0, 0, expires_at).unwrap()
    }
}

/// A plain HTTP/1.1 exchange with hyper over a fresh connection.
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let response =
        tokio::time::timeout(DEADLINE, sender.send_request(request)).await.expect("response in time").unwrap();
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect()).await.expect("body in time").unwrap().to_bytes();
    (parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned())
}

/// GET `path` with extra headers, as an API client (`Accept: application/json`), so that a
/// request the gate holds is answered 503.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
    let mut builder = Request::get(path).header("host", "shop.test").header("accept", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    send(addr, builder.body(Full::new(Bytes::new())).unwrap()).await
}

/// Send raw bytes, read until the server closes (or the deadline); returns the status code
/// and the whole response text.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> (u16, String) {
    raw_on(TcpStream::connect(addr).await.unwrap(), bytes).await
}

/// [`raw`] from the loopback address `source` (127.0.0.x): another client address.
pub async fn raw_from(source: &str, addr: SocketAddr, bytes: &[u8]) -> (u16, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    raw_on(socket.connect(addr).await.unwrap(), bytes).await
}

async fn raw_on(mut stream: TcpStream, bytes: &[u8]) -> (u16, String) {
    stream.write_all(bytes).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// For upstreams written on bare sockets: the next request head from `stream` (bytes already
/// read in `buffer`, which keeps what follows the head), or `None` once it closes.
pub async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
    buffer.drain(..end);
    Some(head)
}

/// Wait until `condition` holds, or fail after the deadline.
pub async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether the response is the gate's own "wait" answer to an API client (never the
/// upstream's, which answers 200).
pub fn is_gate_wait(status: StatusCode) -> bool {
    status == StatusCode::SERVICE_UNAVAILABLE
}

/// Unused-port address (bound, then released): a dead upstream.
pub async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// The tokio executor, for HTTP/2 clients.
pub fn executor() -> TokioExecutor {
    TokioExecutor::new()
}

/// The `vestibule` binary running in a process of its own; killed on drop.
pub struct Proxy(pub std::process::Child);

impl Proxy {
    /// Kill the process outright (SIGKILL): no graceful stop, no hand-over.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start the `vestibule` binary; return it and the address it reports (the configuration
/// must log as JSON: `[log] format = "json"`).
pub fn spawn_proxy(config: &Path) -> (Proxy, SocketAddr) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_vestibule"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the vestibule binary starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("vestibule reports its address before exiting").unwrap();
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if event["message"] == "listening" {
            break event["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (Proxy(child), addr)
}
