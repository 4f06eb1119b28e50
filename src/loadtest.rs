//! `vestibule loadtest`: an open-loop crowd against a running vestibule, for CI pipelines that
//! rehearse a sale. Visitors arrive at a fixed rate whatever the answers (open loop), and each
//! behaves like a browser: the first request (a ticket cookie, or admitted at once), the feed
//! socket until `admitted`, the forwarded request with its token, and optionally a leave.
//!
//! The report counts what a sale must get right: every visitor admitted, nobody admitted out
//! of join order, latencies (HDR histograms), and errors by kind.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Two admissions closer than one scheduler step are simultaneous: a step grants several
/// turns at once, and their messages reach the crowd in any order.
const SAME_STEP: Duration = crate::room::STEP;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The vestibule to load, e.g. `127.0.0.1:8080`.
    pub target: SocketAddr,
    /// A path inside the room.
    pub path: String,
    /// The room's id.
    pub room: String,
    pub visitors: u64,
    /// Arrivals per second.
    pub arrival_rate: f64,
    /// How long a visitor waits for admission before it counts as an error.
    pub patience: Duration,
    /// Leave after the forwarded request, freeing the place for the next visitor.
    pub leave: bool,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Percentiles {
        let ms = |micros: u64| micros as f64 / 1_000.0;
        Percentiles {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub visitors: u64,
    pub joined: u64,
    pub admitted: u64,
    pub seconds: f64,
    pub joins_per_second: f64,
    /// The first request of each visitor.
    pub join_latency_ms: Percentiles,
    /// The request forwarded with the token.
    pub forwarded_latency_ms: Percentiles,
    /// From the first request to the turn.
    pub time_to_admission_ms: Percentiles,
    /// Pairs admitted out of join (ticket) order, by more than one scheduler step.
    pub fifo_inversions: u64,
    pub errors: BTreeMap<String, u64>,
}

impl Report {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// One visitor's story.
#[derive(Default)]
struct Outcome {
    ticket: Option<u64>,
    join_us: Option<u64>,
    admitted_after: Option<Duration>,
    admitted_at: Option<Instant>,
    forwarded_us: Option<u64>,
    error: Option<&'static str>,
}

/// Run the crowd and report.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    anyhow::ensure!(options.arrival_rate > 0.0, "--arrival-rate must be positive");
    let options = Arc::new(options);
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(options.visitors as usize)));
    let started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / options.arrival_rate);
    let mut visitors = tokio::task::JoinSet::new();
    for n in 0..options.visitors {
        tokio::time::sleep_until(started + gap.mul_f64(n as f64)).await;
        let (options, outcomes) = (options.clone(), outcomes.clone());
        visitors.spawn(async move {
            let outcome = visit(&options).await;
            outcomes.lock().expect("outcomes").push(outcome);
        });
    }
    while visitors.join_next().await.is_some() {}
    let seconds = started.elapsed().as_secs_f64();
    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    Ok(report(&options, &outcomes, seconds))
}

fn report(options: &Options, outcomes: &[Outcome], seconds: f64) -> Report {
    // Microseconds from 1 µs to one hour (longer values saturate), 3 significant digits.
    let histogram = || Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
    let (mut join, mut forwarded, mut admission) = (histogram(), histogram(), histogram());
    let mut errors = BTreeMap::new();
    for outcome in outcomes {
        if let Some(us) = outcome.join_us {
            join.saturating_record(us);
        }
        if let Some(us) = outcome.forwarded_us {
            forwarded.saturating_record(us);
        }
        if let Some(after) = outcome.admitted_after {
            admission.saturating_record(after.as_micros() as u64);
        }
        if let Some(error) = outcome.error {
            *errors.entry(error.to_owned()).or_insert(0) += 1;
        }
    }
    let mut order: Vec<(u64, Instant)> = outcomes.iter().filter_map(|o| Some((o.ticket?, o.admitted_at?))).collect();
    order.sort_by_key(|(ticket, _)| *ticket);
    let joined = outcomes.iter().filter(|o| o.ticket.is_some()).count() as u64;
    Report {
        visitors: options.visitors,
        joined,
        admitted: outcomes.iter().filter(|o| o.forwarded_us.is_some()).count() as u64,
        seconds,
        joins_per_second: joined as f64 / seconds.max(f64::EPSILON),
        join_latency_ms: Percentiles::of(&join),
        forwarded_latency_ms: Percentiles::of(&forwarded),
        time_to_admission_ms: Percentiles::of(&admission),
        fifo_inversions: inversions(&order),
        errors,
    }
}

/// Pairs where a later ticket was admitted more than one step before an earlier one.
fn inversions(by_ticket: &[(u64, Instant)]) -> u64 {
    let mut count = 0;
    for (i, (_, earlier_at)) in by_ticket.iter().enumerate() {
        count += by_ticket[i + 1..].iter().filter(|(_, later_at)| *later_at + SAME_STEP < *earlier_at).count() as u64;
    }
    count
}

/// The ticket number in a ticket cookie (the `tkt` claim; read, not verified: the load
/// generator only orders what the proxy signed).
fn ticket_of(cookie: &str) -> Option<u64> {
    let payload = cookie.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<serde_json::Value>(&json).ok()?["tkt"].as_u64()
}

async fn visit(options: &Options) -> Outcome {
    let mut outcome = Outcome::default();
    if let Err(error) = try_visit(options, &mut outcome).await {
        outcome.error = Some(error);
    }
    outcome
}

async fn try_visit(options: &Options, outcome: &mut Outcome) -> Result<(), &'static str> {
    let arrived = Instant::now();
    let mut jar: BTreeMap<String, String> = BTreeMap::new();
    let (status, _) = request(options, "GET", &options.path, &mut jar).await?;
    outcome.join_us = Some(arrived.elapsed().as_micros() as u64);
    let ticket_cookie = format!("vestibule-ticket-{}", options.room);
    let token_cookie = format!("vestibule-token-{}", options.room);
    // A waiter's ticket is in the ticket cookie; a visitor admitted at once has it in the token.
    outcome.ticket = jar.get(&ticket_cookie).or(jar.get(&token_cookie)).and_then(|t| ticket_of(t));
    if status == StatusCode::OK && jar.contains_key(&token_cookie) {
        // Admitted at once: the join was the forwarded request.
        outcome.admitted_after = Some(arrived.elapsed());
        outcome.admitted_at = Some(Instant::now());
        outcome.forwarded_us = outcome.join_us;
    } else {
        if outcome.ticket.is_none() {
            return Err(if status.is_server_error() {
                "join refused (5xx without a ticket)"
            } else {
                "join: no ticket"
            });
        }
        tokio::time::timeout(options.patience, wait_for_turn(options, &jar))
            .await
            .map_err(|_| "not admitted in time")??;
        outcome.admitted_after = Some(arrived.elapsed());
        outcome.admitted_at = Some(Instant::now());
        let started = Instant::now();
        let (status, _) = request(options, "GET", &options.path, &mut jar).await?;
        if status != StatusCode::OK || !jar.contains_key(&token_cookie) {
            return Err("admitted, but the forwarded request failed");
        }
        outcome.forwarded_us = Some(started.elapsed().as_micros() as u64);
    }
    if options.leave {
        let (status, _) =
            request(options, "POST", &format!("/_vestibule/leave?room={}", options.room), &mut jar).await?;
        if status != StatusCode::OK {
            return Err("leave failed");
        }
    }
    Ok(())
}

/// Hold the feed socket open until `admitted`.
async fn wait_for_turn(options: &Options, jar: &BTreeMap<String, String>) -> Result<(), &'static str> {
    let url = format!("ws://{}/_vestibule/ws?room={}", options.target, options.room);
    let mut request = url.into_client_request().map_err(|_| "feed: bad url")?;
    let cookie = cookie_header(jar).parse().map_err(|_| "feed: bad cookie")?;
    request.headers_mut().insert(http::header::COOKIE, cookie);
    let stream = TcpStream::connect(options.target).await.map_err(|_| "feed: connect failed")?;
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
/// out of `jar`.
async fn request(
    options: &Options,
    method: &str,
    path: &str,
    jar: &mut BTreeMap<String, String>,
) -> Result<(StatusCode, Bytes), &'static str> {
    let stream = TcpStream::connect(options.target).await.map_err(|_| "connect failed")?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|_| "handshake failed")?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, options.target.to_string())
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
    let body = response.into_body().collect().await.map_err(|_| "body failed")?.to_bytes();
    Ok((status, body))
}

/// Print the report for a terminal.
pub fn print(report: &Report) {
    let p = |name: &str, p: &Percentiles| {
        println!(
            "  {name:<20} n={:<6} p50 {:>8.1}  p90 {:>8.1}  p99 {:>8.1}  max {:>8.1} ms",
            p.count, p.p50, p.p90, p.p99, p.max
        )
    };
    println!(
        "{} visitors in {:.1} s: {} joined ({:.0}/s), {} admitted, {} FIFO inversions, {} errors",
        report.visitors,
        report.seconds,
        report.joined,
        report.joins_per_second,
        report.admitted,
        report.fifo_inversions,
        report.error_count()
    );
    p("join", &report.join_latency_ms);
    p("forwarded", &report.forwarded_latency_ms);
    p("time to admission", &report.time_to_admission_ms);
    for (kind, count) in &report.errors {
        println!("  error: {kind}: {count}");
    }
}

/// Write the report as JSON.
pub fn write_json(report: &Report, path: &std::path::Path) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inversions_count_only_admissions_more_than_a_step_apart() {
        let t = Instant::now();
        let ms = |n: u64| t + Duration::from_millis(n);
        assert_eq!(inversions(&[(1, ms(0)), (2, ms(500)), (3, ms(1000))]), 0);
        assert_eq!(inversions(&[(1, ms(50)), (2, ms(0))]), 0, "one step grants both");
        assert_eq!(inversions(&[(1, ms(1000)), (2, ms(0)), (3, ms(500))]), 2);
    }
}
