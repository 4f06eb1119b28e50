//! `vestibule loadtest`: an open-loop crowd against a running vestibule, for CI pipelines that
//! rehearse a sale. Visitors arrive on a schedule whatever the answers (open loop): a steady
//! rate, a ramp, or a recorded curve. Each behaves like a browser: the first request (a ticket
//! cookie, or admitted at once), the feed socket until `admitted`, the forwarded request with
//! its token, and optionally a leave. Several targets stand for instances behind a load
//! balancer with no stickiness: a visitor's successive requests go to successive targets.
//!
//! The report counts what a sale must get right: every visitor admitted, nobody admitted out
//! of join order, the configured rate and capacity held, latencies (HDR histograms), errors by
//! kind; see [`report`]. [`html`] draws it as a page.

pub mod arrivals;
pub mod cli;
pub mod html;
pub mod report;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use ipnet::Ipv4Net;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub use arrivals::Curve;
pub use report::{print, write_json, Percentiles, Report, RoomLimits};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The vestibule instances to load, e.g. `127.0.0.1:8080`.
    pub targets: Vec<SocketAddr>,
    /// A path inside the room.
    pub path: String,
    /// The room's id.
    pub room: String,
    /// Stop arrivals after this many visitors.
    pub visitors: Option<u64>,
    /// Stop arrivals after this long.
    pub duration: Option<Duration>,
    /// When visitors arrive.
    pub arrivals: Curve,
    /// How long a visitor waits for admission before it counts as an error.
    pub patience: Duration,
    /// Leave after the forwarded request, freeing the place for the next visitor.
    pub leave: bool,
    /// How long an admitted visitor stays (shops, pays) before leaving.
    pub hold: Duration,
    /// Give visitors source addresses from this range (e.g. `127.0.0.0/8`), one each in turn.
    pub sources: Option<Ipv4Net>,
    /// The room's rate and capacity, to hold the run against.
    pub configured: Option<RoomLimits>,
    /// Show progress on stderr while running.
    pub progress: bool,
}

impl Options {
    /// Options for a steady crowd of `visitors` against one target, the rest by default.
    pub fn new(target: SocketAddr, visitors: u64, arrival_rate: f64) -> anyhow::Result<Options> {
        Ok(Options {
            targets: vec![target],
            path: "/checkout".into(),
            room: "checkout".into(),
            visitors: Some(visitors),
            duration: None,
            arrivals: Curve::constant(arrival_rate)?,
            patience: Duration::from_secs(600),
            leave: false,
            hold: Duration::ZERO,
            sources: None,
            configured: None,
            progress: false,
        })
    }

    /// When the schedule stops arrivals: the duration, or the crowd's size (`None`: at the
    /// curve's end, or never).
    fn arrivals_end(&self) -> Option<Duration> {
        let crowd_end = self.visitors.and_then(|n| self.arrivals.arrival(n));
        [self.duration, crowd_end].into_iter().flatten().min()
    }

    /// The source address of visitor `n`: hosts of the range in turn (the network and
    /// broadcast addresses left out when the range has more than two).
    fn source(&self, n: u64) -> Option<IpAddr> {
        let net = self.sources?;
        let size = 1u64 << (32 - net.prefix_len());
        let base = u32::from(net.network()) as u64;
        let host = if size <= 2 { base + n % size } else { base + 1 + n % (size - 2) };
        Some(IpAddr::V4((host as u32).into()))
    }
}

/// One visitor's story; times from the start of the run.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub arrived: Duration,
    pub ticket: Option<u64>,
    pub join_us: Option<u64>,
    /// In line: from the join's answer to the turn (or the error).
    pub waited: Option<(Duration, Duration)>,
    /// When the visitor learned of the turn.
    pub admitted: Option<Duration>,
    pub forwarded_us: Option<u64>,
    /// When the leave was sent (the session then ends at the latest).
    pub released: Option<Duration>,
    pub error: Option<&'static str>,
    pub ended: Duration,
}

/// Counts for the progress line, kept as the crowd moves.
#[derive(Default)]
struct Live {
    arrived: AtomicU64,
    waiting: AtomicI64,
    sessions: AtomicI64,
    admitted: AtomicU64,
    errors: AtomicU64,
}

/// One visitor as it runs: its number, the clock, the live counts and its story.
struct Visitor<'a> {
    options: &'a Options,
    n: u64,
    started: Instant,
    live: &'a Live,
    requests: usize,
    outcome: Outcome,
}

impl Visitor<'_> {
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// The next target: successive requests go to successive instances.
    fn next_target(&mut self) -> SocketAddr {
        let targets = &self.options.targets;
        let target = targets[(self.n as usize + self.requests) % targets.len()];
        self.requests += 1;
        target
    }

    async fn connect(&mut self) -> Result<(SocketAddr, TcpStream), &'static str> {
        let target = self.next_target();
        let stream = match self.options.source(self.n) {
            Some(source) => {
                let socket = TcpSocket::new_v4().map_err(|_| "connect failed")?;
                socket.bind(SocketAddr::new(source, 0)).map_err(|_| "cannot bind the source address")?;
                socket.connect(target).await
            }
            None => TcpStream::connect(target).await,
        };
        Ok((target, stream.map_err(|_| "connect failed")?))
    }
}

/// Run the crowd and report.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(!options.targets.is_empty(), "no target");
    anyhow::ensure!(
        options.visitors.is_some() || options.duration.is_some() || options.arrivals.ends(),
        "say how many visitors arrive or for how long"
    );
    let options = Arc::new(options);
    let live = Arc::new(Live::default());
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let progress = options.progress.then(|| tokio::spawn(show_progress(live.clone(), started)));
    let mut visitors = tokio::task::JoinSet::new();
    for n in 0.. {
        if options.visitors.is_some_and(|most| n >= most) {
            break;
        }
        let Some(at) = options.arrivals.arrival(n) else { break };
        if options.duration.is_some_and(|duration| at >= duration) {
            break;
        }
        tokio::time::sleep_until(started + at).await;
        // Reap the visitors done so far: a long run keeps only those still going.
        while visitors.try_join_next().is_some() {}
        live.arrived.fetch_add(1, Ordering::Relaxed);
        let (options, outcomes, live) = (options.clone(), outcomes.clone(), live.clone());
        visitors.spawn(async move {
            let mut visitor =
                Visitor { options: &options, n, started, live: &live, requests: 0, outcome: Outcome::default() };
            visitor.outcome.arrived = at;
            if let Err(error) = try_visit(&mut visitor).await {
                visitor.outcome.error = Some(error);
                live.errors.fetch_add(1, Ordering::Relaxed);
            }
            visitor.outcome.ended = visitor.now();
            outcomes.lock().expect("outcomes").push(visitor.outcome);
        });
    }
    while visitors.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    Ok(Report::new(&outcomes, seconds, &options))
}

/// A progress line on stderr: rewritten in place on a terminal, every 5 s otherwise.
async fn show_progress(live: Arc<Live>, started: Instant) {
    let terminal = std::io::stderr().is_terminal();
    let every = Duration::from_secs(if terminal { 1 } else { 5 });
    let mut ticks = tokio::time::interval_at(started + every, every);
    loop {
        ticks.tick().await;
        let line = format!(
            "[{:>5.0} s] arrived {}  waiting {}  sessions {}  admitted {}  errors {}",
            started.elapsed().as_secs_f64(),
            live.arrived.load(Ordering::Relaxed),
            live.waiting.load(Ordering::Relaxed),
            live.sessions.load(Ordering::Relaxed),
            live.admitted.load(Ordering::Relaxed),
            live.errors.load(Ordering::Relaxed),
        );
        let mut stderr = std::io::stderr().lock();
        let _ = if terminal { write!(stderr, "\r{line}\x1b[K") } else { writeln!(stderr, "{line}") };
        let _ = stderr.flush();
    }
}

/// The ticket number in a ticket cookie (the `tkt` claim; read, not verified: the load
/// generator only orders what the proxy signed).
fn ticket_of(cookie: &str) -> Option<u64> {
    let payload = cookie.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<serde_json::Value>(&json).ok()?["tkt"].as_u64()
}

/// One visitor, from the first request to the leave. Counts move as the story does.
async fn try_visit(visitor: &mut Visitor<'_>) -> Result<(), &'static str> {
    let options = visitor.options;
    let live = visitor.live;
    let mut jar: BTreeMap<String, String> = BTreeMap::new();
    let status = request(visitor, "GET", &options.path, &mut jar).await?;
    let joined = visitor.now();
    visitor.outcome.join_us = Some((joined - visitor.outcome.arrived).as_micros() as u64);
    let ticket_cookie = crate::room::ticket_cookie(&options.room);
    let token_cookie = crate::room::token_cookie(&options.room);
    // A waiter's ticket is in the ticket cookie; a visitor admitted at once has it in the token.
    visitor.outcome.ticket = jar.get(&ticket_cookie).or(jar.get(&token_cookie)).and_then(|t| ticket_of(t));
    if status == StatusCode::OK && jar.contains_key(&token_cookie) {
        // Admitted at once: the join was the forwarded request.
        visitor.outcome.admitted = Some(joined);
        visitor.outcome.forwarded_us = visitor.outcome.join_us;
        live.sessions.fetch_add(1, Ordering::Relaxed);
    } else {
        if visitor.outcome.ticket.is_none() {
            return Err(if status.is_server_error() {
                "join refused (5xx without a ticket)"
            } else {
                "join: no ticket"
            });
        }
        live.waiting.fetch_add(1, Ordering::Relaxed);
        let turn = tokio::time::timeout(options.patience, wait_for_turn(visitor, &jar)).await;
        live.waiting.fetch_sub(1, Ordering::Relaxed);
        let now = visitor.now();
        visitor.outcome.waited = Some((joined, now));
        turn.map_err(|_| "not admitted in time")??;
        visitor.outcome.admitted = Some(now);
        live.sessions.fetch_add(1, Ordering::Relaxed);
        let status = request(visitor, "GET", &options.path, &mut jar).await?;
        if status != StatusCode::OK || !jar.contains_key(&token_cookie) {
            return Err("admitted, but the forwarded request failed");
        }
        visitor.outcome.forwarded_us = Some((visitor.now() - now).as_micros() as u64);
    }
    live.admitted.fetch_add(1, Ordering::Relaxed);
    if options.leave {
        tokio::time::sleep(options.hold).await;
        visitor.outcome.released = Some(visitor.now());
        live.sessions.fetch_sub(1, Ordering::Relaxed);
        let status = request(visitor, "POST", &format!("/_vestibule/leave?room={}", options.room), &mut jar).await?;
        if status != StatusCode::OK {
            return Err("leave failed");
        }
    }
    Ok(())
}

/// Hold the feed socket open until `admitted`.
async fn wait_for_turn(visitor: &mut Visitor<'_>, jar: &BTreeMap<String, String>) -> Result<(), &'static str> {
    let (target, stream) = visitor.connect().await.map_err(|_| "feed: connect failed")?;
    let url = format!("ws://{target}/_vestibule/ws?room={}", visitor.options.room);
    let mut request = url.into_client_request().map_err(|_| "feed: bad url")?;
    let cookie = cookie_header(jar).parse().map_err(|_| "feed: bad cookie")?;
    request.headers_mut().insert(http::header::COOKIE, cookie);
    let (mut socket, _) = tokio_tungstenite::client_async(request, stream).await.map_err(|_| "feed: refused")?;
    while let Some(frame) = socket.next().await {
        match frame.map_err(|_| "feed: broken")? {
            Message::Text(text) if text.contains("\"admitted\"") => return Ok(()),
            Message::Text(text) if text.contains("\"closed\"") => return Err("room closed"),
            _ => {}
        }
    }
    Err("feed: closed before admission")
}

fn cookie_header(jar: &BTreeMap<String, String>) -> String {
    jar.iter().map(|(name, value)| format!("{name}={value}")).collect::<Vec<_>>().join("; ")
}

/// One request on its own connection, as a browser's first request might be; cookies in and
/// out of `jar`. The body is read whole (its time counts), then dropped.
async fn request(
    visitor: &mut Visitor<'_>,
    method: &str,
    path: &str,
    jar: &mut BTreeMap<String, String>,
) -> Result<StatusCode, &'static str> {
    let (target, stream) = visitor.connect().await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|_| "handshake failed")?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, target.to_string())
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::COOKIE, cookie_header(jar))
        .body(Empty::<Bytes>::new())
        .map_err(|_| "bad request")?;
    let response = sender.send_request(request).await.map_err(|_| "request failed")?;
    for cookie in response.headers().get_all(http::header::SET_COOKIE) {
        let Some((pair, attributes)) = cookie.to_str().ok().map(|c| c.split_once(';').unwrap_or((c, ""))) else {
            continue;
        };
        if let Some((name, value)) = pair.split_once('=') {
            if attributes.contains("Max-Age=0") {
                jar.remove(name);
            } else {
                jar.insert(name.to_owned(), value.to_owned());
            }
        }
    }
    let status = response.status();
    response.into_body().collect().await.map_err(|_| "body failed")?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_take_the_hosts_of_the_range_in_turn() {
        let mut options = Options::new("127.0.0.1:1".parse().unwrap(), 1, 1.0).unwrap();
        assert_eq!(options.source(0), None);
        options.sources = Some("127.0.0.0/8".parse().unwrap());
        assert_eq!(options.source(0), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(options.source(300), Some("127.0.1.45".parse().unwrap()));
        options.sources = Some("127.0.0.8/30".parse().unwrap());
        let turn: Vec<_> = (0..3).map(|n| options.source(n).unwrap().to_string()).collect();
        assert_eq!(turn, ["127.0.0.9", "127.0.0.10", "127.0.0.9"]);
        options.sources = Some("127.0.0.7/32".parse().unwrap());
        assert_eq!(options.source(5), Some("127.0.0.7".parse().unwrap()));
    }
}
