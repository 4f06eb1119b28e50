//! Admission that listens (`[rooms.adaptive]`): admitted visitors' requests to an upstream
//! made slow step the room's rate down, and the rate climbs back to `admit_per_minute` once
//! the upstream is fast again. The controller's arithmetic is tested with explicit time in
//! `src/room/adaptive.rs`; the rate binding the line, on both stores, in `store_conformance`.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// An upstream that answers every request after `delay` ms.
async fn upstream_with_delay(delay: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let delay = delay.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_request| {
                    let wait = Duration::from_millis(delay.load(Ordering::Relaxed));
                    async move {
                        tokio::time::sleep(wait).await;
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

/// The rate the room grants turns at now, from the instance's metrics.
fn rate(gate: &Harness) -> u64 {
    let wanted = "vestibule_admit_per_minute{room=\"checkout\"} ";
    let text = gate.running.gate().metrics().encode();
    text.lines().find_map(|line| line.strip_prefix(wanted)).map_or(0, |n| n.trim().parse().unwrap())
}

/// Wait until the rate satisfies `wanted`, or fail after `within`; how long it took.
async fn rate_until(gate: &Harness, what: &str, within: Duration, wanted: impl Fn(u64) -> bool) -> Duration {
    let started = tokio::time::Instant::now();
    while !wanted(rate(gate)) {
        assert!(started.elapsed() < within, "timed out waiting for {what}: the rate is {}", rate(gate));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_steps_down_while_the_upstream_is_slow_and_climbs_back_when_it_recovers() {
    let delay = Arc::new(AtomicU64::new(0));
    let upstream = upstream_with_delay(delay.clone()).await;
    let room = "admit_per_minute = 600\nmax_active = 1000\n\
                [rooms.adaptive]\np95_ms = 100\nwindow_seconds = 1\ndecrease = 0.5\nmin_requests = 5\n\
                increase_per_minute = 200\n";
    let gate = start_room(upstream, room).await;
    let cookie = format!("vestibule-token-checkout={}", gate.token("checkout"));
    // Eight admitted visitors, each sending one request after another on its own connection.
    let stop = Arc::new(AtomicBool::new(false));
    let mut visitors = Vec::new();
    for _ in 0..8 {
        let (stop, cookie, addr) = (stop.clone(), cookie.clone(), gate.addr);
        visitors.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(connection);
            let mut answered = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let request = Request::get("/checkout/cart")
                    .header("host", "shop.test")
                    .header("cookie", &cookie)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let response = tokio::time::timeout(DEADLINE, sender.send_request(request)).await.unwrap().unwrap();
                assert_eq!(response.status(), 200, "an admitted visitor is forwarded");
                response.into_body().collect().await.unwrap();
                answered += 1;
            }
            answered
        }));
    }
    // Fast upstream: the room admits at its own rate.
    rate_until(&gate, "the configured rate", DEADLINE, |rate| rate == 600).await;
    // Slow upstream (p95 of 250 ms against a target of 100): down by half each window.
    delay.store(250, Ordering::Relaxed);
    let down = rate_until(&gate, "a step down", DEADLINE, |rate| rate < 600).await;
    rate_until(&gate, "a second step down", DEADLINE, |rate| rate <= 150).await;
    // Never below the floor (a tenth of admit_per_minute).
    rate_until(&gate, "the floor", Duration::from_secs(20), |rate| rate == 60).await;
    // Fast again: it climbs back by 200 a window, to admit_per_minute and no further.
    delay.store(0, Ordering::Relaxed);
    let up = rate_until(&gate, "the climb back", Duration::from_secs(20), |rate| rate == 600).await;
    stop.store(true, Ordering::Relaxed);
    let mut answered = 0;
    for visitor in visitors {
        answered += visitor.await.unwrap();
    }
    assert!(answered > 0);
    // The admin view says what the leader judged.
    let view = vestibule::admin::view(gate.running.gate(), &gate.running.gate().room_by_id("checkout").unwrap());
    assert_eq!(view["adaptive"]["per_minute"], 600);
    assert_eq!(view["adaptive"]["last_window"]["judged"], "healthy");
    eprintln!("stepped down {down:?} after the upstream slowed; back at the top {up:?} after it recovered");
}
