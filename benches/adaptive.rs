//! Admission that listens, measured: a crowd waits at two instances sharing one Redis; each
//! visitor let in shops (a few requests to the upstream); the upstream is a checkout with a
//! fixed number of workers whose service time grows tenfold for a while (its database
//! straining), then recovers. Reported: how long the rate took to step down after the
//! slowdown, how far and how long the upstream's p95 went over the target, how long the rate
//! took to climb back to `admit_per_minute` after the recovery, and whether the two instances
//! followed one rate.
//!
//!   cargo bench --bench adaptive                 # 4 000 visitors, phases of 10 s, 25 s, 25 s
//!   cargo bench --bench adaptive -- 8000 10 40 40
//!
//! The same run without `[rooms.adaptive]` (`ADAPTIVE=0`) is the reference: the upstream's p95
//! while the rate does not listen.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use support::{call, connect, start_instance_with, start_redis};

const TOKEN: &str = "bench-admin-token-000";
/// The checkout's workers, and each request's service time when healthy and when straining.
const WORKERS: usize = 4;
const FAST: Duration = Duration::from_millis(5);
const SLOW: Duration = Duration::from_millis(50);
/// The room: 50 visitors a second; each makes this many requests, this far apart.
const ADMIT_PER_MINUTE: u32 = 3_000;
const REQUESTS_PER_VISITOR: usize = 5;
const THINK: Duration = Duration::from_millis(200);
const P95_TARGET_MS: u64 = 250;

/// The upstream's latencies (queue and service), by second of the run.
#[derive(Default)]
struct Seen {
    by_second: Mutex<Vec<Vec<f64>>>,
}

impl Seen {
    fn note(&self, second: usize, ms: f64) {
        let mut by_second = self.by_second.lock().unwrap();
        if by_second.len() <= second {
            by_second.resize(second + 1, Vec::new());
        }
        by_second[second].push(ms);
    }

    fn p95_by_second(&self) -> Vec<Option<f64>> {
        let by_second = self.by_second.lock().unwrap();
        by_second
            .iter()
            .map(|latencies| {
                let mut sorted = latencies.clone();
                sorted.sort_by(f64::total_cmp);
                (!sorted.is_empty()).then(|| sorted[(sorted.len() * 95).div_ceil(100) - 1])
            })
            .collect()
    }
}

/// The checkout: `WORKERS` requests at a time, each taking the service time of the moment.
async fn checkout(slow: Arc<AtomicBool>, seen: Arc<Seen>, started: Instant) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let workers = Arc::new(tokio::sync::Semaphore::new(WORKERS));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (slow, seen, workers) = (slow.clone(), seen.clone(), workers.clone());
            tokio::spawn(async move {
                let service = service_fn(move |_request| {
                    let (slow, seen, workers) = (slow.clone(), seen.clone(), workers.clone());
                    async move {
                        let arrived = Instant::now();
                        let _worker = workers.acquire().await.unwrap();
                        tokio::time::sleep(if slow.load(Ordering::Relaxed) { SLOW } else { FAST }).await;
                        let second = started.elapsed().as_secs() as usize;
                        seen.note(second, arrived.elapsed().as_secs_f64() * 1_000.0);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

/// The admin view of the room at `admin`.
async fn view(admin: SocketAddr) -> serde_json::Value {
    let mut sender = connect(admin).await;
    let request = Request::get("/rooms/checkout")
        .header("host", "admin")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap_or_default()
}

/// One visitor: wait on the feed for the turn, go in, shop.
async fn visitor(addr: SocketAddr, ticket: String, done: Arc<AtomicUsize>) {
    let mut request = format!("ws://{addr}/_vestibule/ws?room=checkout").into_client_request().unwrap();
    request.headers_mut().insert("cookie", ticket.parse().unwrap());
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut feed, _) = tokio_tungstenite::client_async(request, stream).await.unwrap();
    while let Some(Ok(message)) = feed.next().await {
        if message.to_text().is_ok_and(|text| text.contains("\"admitted\"")) {
            break;
        }
    }
    drop(feed);
    // The two cores are busy: a connection refused now is tried again.
    let mut sender = loop {
        if let Ok(stream) = TcpStream::connect(addr).await {
            if let Ok((sender, connection)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                tokio::spawn(connection);
                break sender;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cookies = call(&mut sender, "GET", "/checkout", &ticket).await;
    let Some(token) = cookies.into_iter().find(|c| c.starts_with("vestibule-token-")) else { return };
    for _ in 1..REQUESTS_PER_VISITOR {
        tokio::time::sleep(THINK).await;
        call(&mut sender, "GET", "/checkout/cart", &token).await;
    }
    done.fetch_add(1, Ordering::Relaxed);
}

#[tokio::main]
async fn main() {
    let mut numbers = std::env::args().skip(1).filter_map(|a| a.parse::<u64>().ok());
    let crowd = numbers.next().unwrap_or(4_000) as usize;
    let phases = [numbers.next().unwrap_or(10), numbers.next().unwrap_or(25), numbers.next().unwrap_or(25)];
    let adaptive = std::env::var("ADAPTIVE").map_or(true, |v| v != "0");
    let dir = std::env::temp_dir().join(format!("vestibule-adaptive-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_redis, port) = start_redis(&dir);
    let started = Instant::now();
    let (slow, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Seen::default()));
    let upstream = checkout(slow.clone(), seen.clone(), started).await;
    let listening = if adaptive {
        format!("[rooms.adaptive]\np95_ms = {P95_TARGET_MS}\nwindow_seconds = 2\nmin_requests = 20\n")
    } else {
        String::new()
    };
    // Sessions stay (idle) after shopping: capacity is out of the way, the rate is the limit.
    let room = format!(
        "admit_per_minute = {ADMIT_PER_MINUTE}\nmax_active = 1000000\nabandon_seconds = 3600\nsession_idle_seconds = 3600\n{listening}"
    );
    let tables = format!(
        "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{port}/\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\""
    );
    let (_a, a, a_admin) = start_instance_with(&dir, upstream, &room, &tables);
    let (_b, b, b_admin) = start_instance_with(&dir, upstream, &room, &tables);
    let admins = [a_admin.unwrap(), b_admin.unwrap()];

    // The whole crowd joins first (half at each instance), then waits on its feeds.
    let mut tickets = Vec::with_capacity(crowd);
    let mut senders = [connect(a).await, connect(b).await];
    for i in 0..crowd {
        let cookies = call(&mut senders[i % 2], "GET", "/checkout", "").await;
        match cookies.into_iter().find(|c| c.starts_with("vestibule-ticket-")) {
            Some(ticket) => tickets.push((if i % 2 == 0 { a } else { b }, ticket)),
            None => continue, // admitted at once: not part of the line
        }
    }
    let done = Arc::new(AtomicUsize::new(0));
    for (addr, ticket) in tickets {
        tokio::spawn(visitor(addr, ticket, done.clone()));
    }
    let run_started = started.elapsed().as_secs() as usize;
    eprintln!("{crowd} visitors joined in {run_started} s; adaptive = {adaptive}");

    // Phases: healthy, straining, healthy; the rate at both instances sampled every 250 ms.
    let phase_at = |i: usize| Duration::from_secs(run_started as u64 + phases[..i].iter().sum::<u64>());
    let end = phase_at(3);
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let (mut slowed_at, mut recovered_at) = (None, None);
    while started.elapsed() < end && done.load(Ordering::Relaxed) < crowd {
        let now = started.elapsed();
        if slowed_at.is_none() && now >= phase_at(1) {
            slow.store(true, Ordering::Relaxed);
            slowed_at = Some(now.as_secs_f64());
        }
        if recovered_at.is_none() && now >= phase_at(2) {
            slow.store(false, Ordering::Relaxed);
            recovered_at = Some(now.as_secs_f64());
        }
        let (va, vb) = (view(admins[0]).await, view(admins[1]).await);
        let rate = |v: &serde_json::Value| v["admitting_per_minute"].as_u64().unwrap_or(0);
        samples.push((started.elapsed().as_secs_f64(), rate(&va), rate(&vb)));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (Some(slowed), Some(recovered)) = (slowed_at, recovered_at) else {
        eprintln!("the crowd was let in before the phases ended: use a larger crowd");
        std::process::exit(1);
    };

    // Figures.
    let top = u64::from(ADMIT_PER_MINUTE);
    let first_down = samples.iter().find(|(t, a, _)| *t >= slowed && *a < top).map(|(t, ..)| t - slowed);
    let back_up =
        samples.iter().find(|(t, a, b)| *t >= recovered && *a == top && *b == top).map(|(t, ..)| t - recovered);
    let lowest = samples.iter().filter(|(t, ..)| *t >= slowed && *t < recovered).map(|s| s.1).min();
    // One rate: the instances' views differ only for the moment a change takes to be read.
    let apart = samples.iter().filter(|(_, a, b)| a != b).count();
    let p95 = seen.p95_by_second();
    let strained: Vec<(usize, f64)> = p95
        .iter()
        .enumerate()
        .filter(|(second, _)| (*second as f64) >= slowed && (*second as f64) < recovered)
        .filter_map(|(second, p)| p.map(|p| (second, p)))
        .collect();
    let worst = strained.iter().map(|(_, p)| *p).fold(0.0, f64::max);
    let over: Vec<usize> = strained.iter().filter(|(_, p)| *p > P95_TARGET_MS as f64).map(|(s, _)| *s).collect();
    let settled = over.last().map(|s| *s as f64 + 1.0 - slowed);
    let tail = strained.iter().rev().take(10).map(|(_, p)| *p).fold(0.0, f64::max);

    println!(
        "adaptive admission, {crowd} waiting, checkout of {WORKERS} workers at {FAST:?} then {SLOW:?} per request"
    );
    println!("  adaptive                          {adaptive}");
    println!("  rate stepped down after the slow-down {}", seconds(first_down));
    println!("  lowest rate while slow            {} / min (admit_per_minute {top})", lowest.unwrap_or(top));
    println!("  upstream p95 target               {P95_TARGET_MS} ms");
    println!("  worst 1-second p95 while slow     {worst:.0} ms ({:.1}x the target)", worst / P95_TARGET_MS as f64);
    println!("  seconds over the target while slow {} of {}", over.len(), strained.len());
    println!("  over the target until             {} after the slow-down", seconds(settled));
    println!("  worst p95 in the last 10 s slow   {tail:.0} ms");
    println!("  back at admit_per_minute after    {}", seconds(back_up));
    println!("  samples where A and B differed    {apart} of {}", samples.len());
    println!("  timeline (s: rate A/B, upstream p95 of that second):");
    for second in (slowed as usize).saturating_sub(2)..(started.elapsed().as_secs() as usize) {
        let rate = samples.iter().find(|(t, ..)| *t >= second as f64).map(|(_, a, b)| format!("{a}/{b}"));
        let p = p95.get(second).copied().flatten().map_or("-".to_owned(), |p| format!("{p:.0} ms"));
        println!("    {second:>4}: {:>11}  {p}", rate.unwrap_or_default());
    }
}

fn seconds(value: Option<f64>) -> String {
    value.map_or("never".to_owned(), |s| format!("{s:.1} s"))
}
