//! What the benchmarks share: the release binary as the demo shop and as vestibule instances,
//! and a kept-alive HTTP/1.1 client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub struct Instance(pub Child);

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the instance runs");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number")
}

/// CPU time (user + system) process `pid` has used, in microseconds.
pub fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the instance runs");
    // Fields after the command name (which ends with ')'): utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("a stat line").1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let per_second: f64 =
        String::from_utf8(std::process::Command::new("getconf").arg("CLK_TCK").output().unwrap().stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    ticks * 1e6 / per_second
}

/// The vestibule binary measured: this build, or another one named by `VESTIBULE=` (to
/// compare two builds with the same bench).
pub fn binary() -> String {
    std::env::var("VESTIBULE").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vestibule").to_owned())
}

/// The demo shop as the upstream; returns it and its address.
pub fn start_shop() -> (Instance, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vestibule"))
        .args(["shop", "--listen", "127.0.0.1:0", "--workers", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the shop starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().expect("the shop reports its address").unwrap();
    let addr = line.trim_start_matches("demo shop on http://").trim_end_matches('/').parse().expect("an address");
    (Instance(child), addr)
}

/// Start the release binary with `[server]` for one worker (`WORKERS=` in the environment for
/// more) and high socket caps, the room
/// `checkout` configured by `room` (TOML lines), and `store` (a whole `[store]` table, or
/// nothing for memory). The signing key is shared by every instance started in `dir`.
/// A `redis-server` of the benchmark's own on a free loopback port, nothing saved, its files
/// in `dir`; up (it answers) when this returns. Its port.
pub fn start_redis(dir: &std::path::Path) -> (Instance, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let redis = Instance(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH (apt-get install redis-server)"),
    );
    for _ in 0..250 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (redis, port);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("redis-server did not start on port {port}");
}

pub fn start_instance(dir: &std::path::Path, upstream: SocketAddr, room: &str, store: &str) -> (Instance, SocketAddr) {
    let (instance, addr, _) = start_instance_with(dir, upstream, room, store);
    (instance, addr)
}

/// [`start_instance`]; `store` may hold other whole tables too (`[admin]`): the admin
/// address is returned when there is one.
pub fn start_instance_with(
    dir: &std::path::Path,
    upstream: SocketAddr,
    room: &str,
    store: &str,
) -> (Instance, SocketAddr, Option<SocketAddr>) {
    let binary = binary();
    if !dir.join("key.pem").exists() {
        let key = Command::new(&binary).arg("keygen").output().expect("keygen").stdout;
        std::fs::write(dir.join("key.pem"), key).unwrap();
    }
    let config = r#"
[server]
listen = "127.0.0.1:0"
workers = WORKERS
max_feed_sockets = 100000
max_feed_sockets_per_address = 100000
[upstream]
url = "http://UPSTREAM"
[tokens]
signing_key = "key.pem"
[[rooms]]
id = "checkout"
paths = ["/checkout"]
# The benchmarks join from one address: its limit is out of reach (but still checked).
joins_per_address_per_minute = 4000000000
ROOM
STORE
[log]
format = "json"
level = "warn,vestibule=info"
"#;
    let workers = std::env::var("WORKERS").ok().and_then(|w| w.parse::<u16>().ok()).unwrap_or(1);
    let config = config
        .replace("UPSTREAM", &upstream.to_string())
        .replace("WORKERS", &workers.to_string())
        .replace("ROOM", room)
        .replace("STORE", store);
    let path = dir.join(format!("proxy-{}.toml", rand_suffix()));
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(binary)
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("vestibule starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut admin = None;
    // The admin listener, when there is one, is up before the public one.
    let addr = loop {
        let line = lines.next().expect("vestibule reports its address").unwrap();
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
            let address = || event["addr"].as_str().unwrap().parse().unwrap();
            match event["message"].as_str() {
                Some("admin listening") => admin = Some(address()),
                Some("listening") => break address(),
                _ => {}
            }
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (Instance(child), addr, admin)
}

pub async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

/// GET or POST over one kept-alive connection; returns the `Set-Cookie` name=value pairs.
pub async fn call(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    method: &str,
    path: &str,
    cookie: &str,
) -> Vec<String> {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "bench.test")
        .header("accept", "text/html")
        .header("cookie", cookie)
        .body(Empty::new())
        .unwrap();
    sender.ready().await.expect("the connection stays open");
    let response = sender.send_request(request).await.expect("a response");
    let cookies = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
        .collect();
    response.into_body().collect().await.expect("a body");
    cookies
}
