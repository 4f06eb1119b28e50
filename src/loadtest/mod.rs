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

use anyhow::Context as _;
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
    /// `sources` was chosen by default (the targets are on loopback), not asked for.
    pub sources_by_default: bool,
    /// The room's rate and capacity, to hold the run against.
    pub configured: Option<RoomLimits>,
    /// Show progress on stderr while running.
    pub progress: bool,
    /// A file of moments to measure the line's recovery from (`unix_ms label [paused_ms=N]` a
    /// line, e.g. when a fault ended, and how long it had paused the line), read when the run
    /// ends.
    pub marks: Option<std::path::PathBuf>,
    /// Leave the pauses the marks name out of the measured admission rate.
    pub rate_excludes_marks: bool,
}

/// What a marks file said: moments, and the pauses that ended at some of them.
#[derive(Debug, Clone, Default)]
pub struct Marks {
    /// Each mark: when (from the start of the run) and its label.
    pub points: Vec<(Duration, String)>,
    /// The windows `(from, to)` the marks say the line was paused in.
    pub pauses: Vec<(Duration, Duration)>,
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
            sources_by_default: false,
            configured: None,
            progress: false,
            marks: None,
            rate_excludes_marks: false,
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
    /// The ticket the visitor was admitted with (their last, if they were sent to the back).
    /// For a visitor of a sale's pre-queue, the place its number drew, once known.
    pub ticket: Option<u64>,
    /// The visitor's pre-queue number, when it joined a scheduled sale's pre-queue.
    pub prequeue: Option<u64>,
    pub join_us: Option<u64>,
    /// In line: from the join's answer to the turn (or the error).
    pub waited: Option<(Duration, Duration)>,
    /// When the visitor learned of the turn.
    pub admitted: Option<Duration>,
    /// The earliest the turn can have come: `admitted`, or when the feed went down if the
    /// visitor learned of it on reconnecting.
    pub turn_from: Option<Duration>,
    pub forwarded_us: Option<u64>,
    /// When the leave was sent (the session then ends at the latest).
    pub released: Option<Duration>,
    /// How the visitor lost their place, if they did: their shown position went up, or their
    /// turn was refused and they were sent to the back.
    pub lost: Option<&'static str>,
    /// What went wrong and was retried, as a browser retries it.
    pub retries: Vec<&'static str>,
    /// Joins refused with 429, by the reason the proxy gave.
    pub refused: Vec<String>,
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
    /// Answers 429, by the reason the proxy gave.
    refused: Mutex<BTreeMap<String, u64>>,
    /// The limit that holds the run back has been explained (once).
    explained: std::sync::atomic::AtomicBool,
}

impl Live {
    /// An answer 429 for `reason`: counted, and the first time, what limits the run and how
    /// to lift it said at once.
    fn refused(&self, reason: &str, options: &Options) {
        if let Ok(mut refused) = self.refused.lock() {
            *refused.entry(reason.to_owned()).or_insert(0) += 1;
        }
        if !self.explained.swap(true, Ordering::Relaxed) {
            let sources = match options.sources {
                Some(net) => format!("its visitors come from {net}"),
                None => "all its visitors come from this machine's one address".to_owned(),
            };
            eprintln!(
                "\nloadtest: the proxy refuses joins with 429 ({reason}): {sources}, and the room allows each \
                 address joins_per_address_per_minute joins. Spread the crowd over more addresses with \
                 --sources (127.0.0.0/8 against a proxy on loopback), or raise the room's \
                 joins_per_address_per_minute for the test."
            );
        }
    }

    /// "too_many_joins 12, ..." or "0".
    fn refused_line(&self) -> String {
        let refused = self.refused.lock().map(|refused| refused.clone()).unwrap_or_default();
        if refused.is_empty() {
            return "0".to_owned();
        }
        refused.iter().map(|(reason, n)| format!("{reason} {n}")).collect::<Vec<_>>().join(", ")
    }
}

/// One visitor as it runs: its number, the clock, the live counts, its cookies and its story.
struct Visitor<'a> {
    options: &'a Options,
    n: u64,
    started: Instant,
    live: &'a Live,
    requests: usize,
    jar: BTreeMap<String, String>,
    /// A solved proof of work, sent with the next request.
    proof: Option<String>,
    outcome: Outcome,
}

/// What a browser does after a failed request: the user reloads a second later.
const RELOAD_AFTER: Duration = Duration::from_secs(1);
/// The longest `Retry-After` honoured; a longer one is waited for this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// The waiting page's feed reconnects after 1 s, doubling up to 30 s, with jitter.
const FEED_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// A proxy's answer, as much as the visitor needs.
struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    /// A proof of work the room asks for: the challenge and its difficulty.
    challenge: Option<(String, u8)>,
    /// Why a 429 refused the request, as the proxy's JSON says.
    reason: Option<String>,
}

impl Visitor<'_> {
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// The next target: successive connections go to successive instances.
    fn next_target(&mut self) -> SocketAddr {
        let targets = &self.options.targets;
        let target = targets[(self.n as usize + self.requests) % targets.len()];
        self.requests += 1;
        target
    }

    /// Connect to the next target; a refused connection (an instance down) goes on to the
    /// next, as a load balancer would.
    async fn connect(&mut self) -> Result<(SocketAddr, TcpStream), &'static str> {
        let mut failure = "connect failed";
        for _ in 0..self.options.targets.len() {
            let target = self.next_target();
            let stream = match self.options.source(self.n) {
                Some(source) => {
                    let socket = TcpSocket::new_v4().map_err(|_| "connect failed")?;
                    socket.bind(SocketAddr::new(source, 0)).map_err(|_| "cannot bind the source address")?;
                    socket.connect(target).await
                }
                None => TcpStream::connect(target).await,
            };
            match stream {
                Ok(stream) => return Ok((target, stream)),
                Err(_) => failure = "connect failed",
            }
        }
        Err(failure)
    }

    fn retried(&mut self, what: &'static str) {
        self.outcome.retries.push(what);
    }

    fn lost(&mut self, how: &'static str) {
        self.outcome.lost.get_or_insert(how);
    }

    fn cookie(&self, name: &str) -> Option<&String> {
        self.jar.get(name)
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
    let started_unix_ms = unix_ms();
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
            let mut visitor = Visitor {
                options: &options,
                n,
                started,
                live: &live,
                requests: 0,
                jar: BTreeMap::new(),
                proof: None,
                outcome: Outcome::default(),
            };
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
    let marks = match &options.marks {
        Some(path) => read_marks(path, started_unix_ms)?,
        None => Marks::default(),
    };
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    // A scheduled sale's pre-queue was in the run: what the room published of its draw.
    let draw = if outcomes.iter().any(|o| o.prequeue.is_some()) {
        Some(published_draw(&options).await.context("reading the sale's draw from /_vestibule/events")?)
    } else {
        None
    };
    let draw = draw.map(|draw| (draw, started_unix_ms));
    Ok(Report::new(&outcomes, seconds, &options, &marks, draw.as_ref()))
}

/// What a room published of a scheduled sale once it started (`/_vestibule/events`).
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    pub event: String,
    pub starts_at_unix_ms: u64,
    pub seed: crate::wire::shuffle::Seed,
    pub prequeued: u64,
    pub first_ticket: u64,
    pub shuffled: bool,
}

impl Draw {
    /// The ticket pre-queue number `number` must hold by the published rule.
    pub fn ticket(&self, order: &crate::wire::shuffle::Shuffle, number: u64) -> u64 {
        let place = if self.shuffled { order.place(number) } else { number };
        self.first_ticket - 1 + place
    }
}

/// The latest drawn sale of the room, read from the first target.
async fn published_draw(options: &Options) -> anyhow::Result<Draw> {
    let target = options.targets[0];
    let stream = TcpStream::connect(target).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get(format!("/_vestibule/events?room={}", options.room))
        .header(http::header::HOST, target.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    anyhow::ensure!(response.status() == StatusCode::OK, "answered {}", response.status());
    let body = response.into_body().collect().await?.to_bytes();
    let published: serde_json::Value = serde_json::from_slice(&body)?;
    let events = published["events"].as_array().context("no events")?;
    let (event, draw) = events
        .iter()
        .rev()
        .find_map(|event| Some((event, event.get("draw").filter(|d| !d.is_null())?)))
        .context("no sale of the room has started (no draw published)")?;
    let number = |value: &serde_json::Value| value.as_u64().context("a number");
    Ok(Draw {
        event: event["name"].as_str().unwrap_or_default().to_owned(),
        starts_at_unix_ms: number(&event["starts_at"])? * 1_000,
        seed: crate::wire::shuffle::parse_hex(draw["seed"].as_str().unwrap_or_default()).context("a seed")?,
        prequeued: number(&draw["prequeued"])?,
        first_ticket: number(&draw["first_ticket"])?,
        shuffled: draw["shuffled"].as_bool().unwrap_or(true),
    })
}

fn unix_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    since.as_millis() as u64
}

/// Moments of the run named in a marks file (`unix_ms label [paused_ms=N]` a line, written
/// while the run goes, e.g. by a chaos script when a fault ends, with how long it paused the
/// line), as times from the start of the run.
fn read_marks(path: &std::path::Path, started_unix_ms: u64) -> anyhow::Result<Marks> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut marks = Marks::default();
    for (n, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
        let bad = || format!("{}:{}: not `unix_ms label [paused_ms=N]`", path.display(), n + 1);
        let (at, rest) = line.trim().split_once(char::is_whitespace).unwrap_or((line.trim(), ""));
        let at: u64 = at.parse().with_context(bad)?;
        // The label may have spaces; a last word `paused_ms=N` says how long the line paused.
        let (label, paused) = match rest.trim().rsplit_once(char::is_whitespace) {
            Some((label, last)) if last.starts_with("paused_ms=") => (label, Some(last)),
            _ if rest.trim().starts_with("paused_ms=") => ("", Some(rest.trim())),
            _ => (rest.trim(), None),
        };
        let paused: Option<u64> =
            paused.map(|word| word.trim_start_matches("paused_ms=").parse()).transpose().with_context(bad)?;
        let label = label.trim().to_owned();
        if at < started_unix_ms {
            continue;
        }
        let at = Duration::from_millis(at - started_unix_ms);
        if let Some(paused) = paused {
            marks.pauses.push((at.saturating_sub(Duration::from_millis(paused)), at));
        }
        marks.points.push((at, label));
    }
    Ok(marks)
}

/// A progress line on stderr: rewritten in place on a terminal, every 5 s otherwise.
async fn show_progress(live: Arc<Live>, started: Instant) {
    let terminal = std::io::stderr().is_terminal();
    let every = Duration::from_secs(if terminal { 1 } else { 5 });
    let mut ticks = tokio::time::interval_at(started + every, every);
    loop {
        ticks.tick().await;
        let line = format!(
            "[{:>5.0} s] arrived {}  waiting {}  sessions {}  admitted {}  refused (429) {}  errors {}",
            started.elapsed().as_secs_f64(),
            live.arrived.load(Ordering::Relaxed),
            live.waiting.load(Ordering::Relaxed),
            live.sessions.load(Ordering::Relaxed),
            live.admitted.load(Ordering::Relaxed),
            live.refused_line(),
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
    claims_of(cookie)?["tkt"].as_u64()
}

/// The claims of a ticket or token cookie, read, not verified.
fn claims_of(cookie: &str) -> Option<serde_json::Value> {
    let payload = cookie.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<serde_json::Value>(&json).ok()
}

/// One visitor, from the first request to the leave, behaving as the waiting page does on a
/// fault: a 503 page is loaded again after its `Retry-After`, a failed request a second
/// later, a dropped feed reconnects with backoff. Counts move as the story does.
async fn try_visit(visitor: &mut Visitor<'_>) -> Result<(), &'static str> {
    let options = visitor.options;
    let live = visitor.live;
    let ticket_cookie = crate::wire::ticket_cookie(&options.room);
    let token_cookie = crate::wire::token_cookie(&options.room);
    let patience = Instant::now() + options.patience;
    let joined = join(visitor, patience).await?;
    // A waiter's ticket is in the ticket cookie; a visitor admitted at once has it in the token.
    let held = visitor.cookie(&ticket_cookie).or(visitor.cookie(&token_cookie));
    match held.and_then(|t| claims_of(t)) {
        // A pre-queue number: the place comes at the sale's start.
        Some(claims) if claims["aud"].as_str().is_some_and(|aud| aud.starts_with("ticket:prequeue:")) => {
            visitor.outcome.prequeue = claims["tkt"].as_u64();
        }
        claims => visitor.outcome.ticket = claims.and_then(|c| c["tkt"].as_u64()),
    }
    if visitor.cookie(&token_cookie).is_some() {
        // Admitted at once: the join was the forwarded request.
        visitor.outcome.admitted = Some(joined);
        visitor.outcome.turn_from = Some(joined);
        visitor.outcome.forwarded_us = visitor.outcome.join_us;
        live.sessions.fetch_add(1, Ordering::Relaxed);
    } else {
        live.waiting.fetch_add(1, Ordering::Relaxed);
        let turn = tokio::time::timeout_at(patience, wait_in_line(visitor)).await;
        live.waiting.fetch_sub(1, Ordering::Relaxed);
        visitor.outcome.waited = Some((joined, visitor.now()));
        turn.map_err(|_| "not admitted in time")??;
    }
    live.admitted.fetch_add(1, Ordering::Relaxed);
    if options.leave {
        tokio::time::sleep(options.hold).await;
        visitor.outcome.released = Some(visitor.now());
        live.sessions.fetch_sub(1, Ordering::Relaxed);
        let leave = format!("/_vestibule/leave?room={}", options.room);
        if until_answered(visitor, "POST", &leave, patience + options.hold).await?.status != StatusCode::OK {
            return Err("leave failed");
        }
    }
    Ok(())
}

/// The first request, until it gives a ticket or a token: a 503 without either (the line
/// cannot take anyone now) is tried again after its `Retry-After`. Returns when it was answered.
async fn join(visitor: &mut Visitor<'_>, patience: Instant) -> Result<Duration, &'static str> {
    let ticket_cookie = crate::wire::ticket_cookie(&visitor.options.room);
    let token_cookie = crate::wire::token_cookie(&visitor.options.room);
    let mut proofs = 0;
    loop {
        let sent = visitor.now();
        let answer = until_answered(visitor, "GET", &visitor.options.path, patience).await?;
        let answered = visitor.now();
        visitor.outcome.join_us = Some((answered - sent).as_micros() as u64);
        if visitor.cookie(&ticket_cookie).is_some() || visitor.cookie(&token_cookie).is_some() {
            return Ok(answered);
        }
        if let Some((challenge, difficulty)) = answer.challenge {
            // The room asks for a proof of work: solved as the waiting page solves it.
            proofs += 1;
            if proofs > 3 {
                return Err("join: proof of work refused");
            }
            visitor.retried("join asked for a proof of work, solved");
            visitor.proof = Some(crate::challenge::solve(&challenge, difficulty));
            continue;
        }
        let too_many = answer.status == StatusCode::TOO_MANY_REQUESTS;
        if !answer.status.is_server_error() && !too_many {
            return Err("join: no ticket");
        }
        if too_many {
            let reason = answer.reason.as_deref().unwrap_or("unknown").to_owned();
            visitor.live.refused(&reason, visitor.options);
            visitor.outcome.refused.push(reason);
        }
        visitor.retried(if too_many {
            "join answered 429 (too many from this address)"
        } else {
            "join answered 5xx without a ticket"
        });
        let wait = answer.retry_after.unwrap_or(RELOAD_AFTER).min(MAX_RETRY_AFTER);
        if Instant::now() + wait >= patience {
            return Err("join refused until patience ran out");
        }
        tokio::time::sleep(wait).await;
    }
}

/// One request, sent again a second later while it fails outright (an instance down, a
/// connection cut), as a visitor reloads an error page.
async fn until_answered(
    visitor: &mut Visitor<'_>,
    method: &str,
    path: &str,
    patience: Instant,
) -> Result<Answer, &'static str> {
    loop {
        match request(visitor, method, path).await {
            Ok(answer) => return Ok(answer),
            Err(error) if error == "cannot bind the source address" => return Err(error),
            Err(_) if Instant::now() + RELOAD_AFTER < patience => {
                visitor.retried("request failed, sent again");
                tokio::time::sleep(RELOAD_AFTER).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// In line until admitted: the feed until `admitted`, then the forwarded request with the
/// ticket. A turn the proxy does not honour yet (it says wait) sends the visitor back to the
/// feed; a new ticket instead means the place was lost and the visitor waits again at the back.
async fn wait_in_line(visitor: &mut Visitor<'_>) -> Result<(), &'static str> {
    let ticket_cookie = crate::wire::ticket_cookie(&visitor.options.room);
    let token_cookie = crate::wire::token_cookie(&visitor.options.room);
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    loop {
        wait_for_turn(visitor).await?;
        let learned = visitor.now();
        // A turn not honoured at once keeps the moment it was first learned of.
        visitor.outcome.admitted.get_or_insert(learned);
        visitor.live.sessions.fetch_add(1, Ordering::Relaxed);
        let answer = until_answered(visitor, "GET", &visitor.options.path, far).await?;
        if let Some(token) = visitor.cookie(&token_cookie) {
            if answer.status != StatusCode::OK {
                return Err("admitted, but the forwarded request failed");
            }
            // A pre-queue visitor admitted at its first request after the start: the token
            // names the place drawn.
            if visitor.outcome.ticket.is_none() {
                visitor.outcome.ticket = ticket_of(token);
            }
            visitor.outcome.forwarded_us = Some((visitor.now() - learned).as_micros() as u64);
            return Ok(());
        }
        visitor.live.sessions.fetch_sub(1, Ordering::Relaxed);
        let ticket = visitor.cookie(&ticket_cookie).and_then(|t| ticket_of(t));
        // A pre-queue number swapped for the place it drew: not a place lost.
        let drawn = visitor.outcome.prequeue.is_some() && visitor.outcome.ticket.is_none();
        match ticket {
            Some(ticket) if drawn => {
                visitor.outcome.ticket = Some(ticket);
                visitor.retried("pre-queue number swapped for its drawn place, waited again");
            }
            Some(ticket) if Some(ticket) == visitor.outcome.ticket => {
                visitor.retried("turn not honoured yet, waited again");
                tokio::time::sleep(RELOAD_AFTER).await;
            }
            Some(ticket) => {
                visitor.lost("turn refused, sent to the back");
                visitor.outcome.ticket = Some(ticket);
                visitor.outcome.admitted = None;
                visitor.outcome.turn_from = None;
            }
            None => return Err("admitted, but neither a token nor a ticket came back"),
        }
    }
}

/// Hold the feed socket open until `admitted`, reconnecting as the page does when it drops
/// or is refused. A shown position that goes up is a place lost.
async fn wait_for_turn(visitor: &mut Visitor<'_>) -> Result<(), &'static str> {
    let mut backoff = FEED_BACKOFF.0;
    let mut lowest = u64::MAX;
    // While the feed is down the turn may come unseen: from when it went down.
    let mut down_since: Option<Duration> = None;
    loop {
        match open_feed(visitor).await {
            Ok(mut socket) => {
                backoff = FEED_BACKOFF.0;
                while let Some(frame) = socket.next().await {
                    let Ok(Message::Text(text)) = frame else {
                        if frame.is_err() {
                            break;
                        }
                        continue;
                    };
                    let Ok(message) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
                    match message["type"].as_str() {
                        Some("admitted") => {
                            let from = down_since.unwrap_or_else(|| visitor.now());
                            visitor.outcome.turn_from.get_or_insert(from);
                            return Ok(());
                        }
                        Some("closed") => return Err("room closed"),
                        Some("position") => {
                            let position = message["position"].as_u64().unwrap_or(u64::MAX);
                            if position > lowest {
                                visitor.lost("shown position went up");
                            }
                            lowest = lowest.min(position);
                            down_since = None;
                        }
                        _ => down_since = None,
                    }
                }
                visitor.retried("feed dropped, reconnected");
            }
            Err(error) if error == "cannot bind the source address" => return Err(error),
            Err(error) => visitor.retried(error),
        }
        down_since.get_or_insert_with(|| visitor.now());
        let jitter = 0.5 + rand::random::<f64>();
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(FEED_BACKOFF.1);
    }
}

type Socket = tokio_tungstenite::WebSocketStream<TcpStream>;

async fn open_feed(visitor: &mut Visitor<'_>) -> Result<Socket, &'static str> {
    let (target, stream) = visitor.connect().await.map_err(|error| match error {
        "cannot bind the source address" => error,
        _ => "feed: connect failed, reconnected",
    })?;
    let url = format!("ws://{target}/_vestibule/ws?room={}", visitor.options.room);
    let mut request = url.into_client_request().map_err(|_| "feed: bad url")?;
    let cookie = cookie_header(&visitor.jar).parse().map_err(|_| "feed: bad cookie")?;
    request.headers_mut().insert(http::header::COOKIE, cookie);
    let (socket, _) =
        tokio_tungstenite::client_async(request, stream).await.map_err(|_| "feed: refused, reconnected")?;
    Ok(socket)
}

fn cookie_header(jar: &BTreeMap<String, String>) -> String {
    jar.iter().map(|(name, value)| format!("{name}={value}")).collect::<Vec<_>>().join("; ")
}

/// One request on its own connection, as a browser's first request might be; cookies in and
/// out of the visitor's jar. The body is read whole (its time counts), then dropped.
async fn request(visitor: &mut Visitor<'_>, method: &str, path: &str) -> Result<Answer, &'static str> {
    let (target, stream) = visitor.connect().await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|_| "handshake failed")?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, target.to_string())
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::COOKIE, cookie_header(&visitor.jar));
    if let Some(proof) = visitor.proof.take() {
        request = request.header(crate::challenge::HEADER, proof);
    }
    let request = request.body(Empty::<Bytes>::new()).map_err(|_| "bad request")?;
    let response = sender.send_request(request).await.map_err(|_| "request failed")?;
    for cookie in response.headers().get_all(http::header::SET_COOKIE) {
        let Some((pair, attributes)) = cookie.to_str().ok().map(|c| c.split_once(';').unwrap_or((c, ""))) else {
            continue;
        };
        if let Some((name, value)) = pair.split_once('=') {
            if attributes.contains("Max-Age=0") {
                visitor.jar.remove(name);
            } else {
                visitor.jar.insert(name.to_owned(), value.to_owned());
            }
        }
    }
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = response.into_body().collect().await.map_err(|_| "body failed")?.to_bytes();
    let json = matches!(status, StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS)
        .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .flatten();
    let challenge = json.as_ref().and_then(|json| {
        Some((json["challenge"].as_str()?.to_owned(), u8::try_from(json["difficulty"].as_u64()?).ok()?))
    });
    let reason = json.as_ref().and_then(|json| json["reason"].as_str()).map(str::to_owned);
    Ok(Answer { status, retry_after, challenge, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_have_labels_of_several_words_and_may_say_how_long_the_line_paused() {
        let path = std::env::temp_dir().join(format!("vestibule-marks-{}", std::process::id()));
        std::fs::write(
            &path,
            "900 before the run\n1500 thawed paused_ms=300\n2000 restarted empty\n2500 instance 2 killed paused_ms=0\n",
        )
        .unwrap();
        let marks = read_marks(&path, 1_000).unwrap();
        let labels: Vec<&str> = marks.points.iter().map(|(_, label)| label.as_str()).collect();
        assert_eq!(labels, ["thawed", "restarted empty", "instance 2 killed"]);
        assert_eq!(marks.points[0].0, Duration::from_millis(500));
        assert_eq!(
            marks.pauses,
            [
                (Duration::from_millis(200), Duration::from_millis(500)),
                (Duration::from_millis(1_500), Duration::from_millis(1_500))
            ]
        );
        std::fs::write(&path, "1500 thawed paused_ms=soon\n").unwrap();
        assert!(read_marks(&path, 1_000).unwrap_err().to_string().contains("not `unix_ms label [paused_ms=N]`"));
        std::fs::remove_file(&path).unwrap();
    }

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
