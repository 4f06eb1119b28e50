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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that answers every request's head after `delay` ms, and its body `body_delay`
/// ms after the head.
async fn upstream_with_delay(delay: Arc<AtomicU64>, body_delay: Arc<AtomicU64>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (delay, body_delay) = (delay.clone(), body_delay.clone());
            tokio::spawn(async move {
                let service = service_fn(move |_request| {
                    let wait = Duration::from_millis(delay.load(Ordering::Relaxed));
                    let body_wait = Duration::from_millis(body_delay.load(Ordering::Relaxed));
                    async move {
                        tokio::time::sleep(wait).await;
                        let body = futures_util::stream::once(async move {
                            tokio::time::sleep(body_wait).await;
                            Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(b"ok")))
                        });
                        Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(body)))
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
    let (delay, body_delay) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let upstream = upstream_with_delay(delay.clone(), body_delay.clone()).await;
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
    // A slow body after a fast head (a large page, a slow client) is not the upstream
    // straining: three windows of it leave the rate alone (on the fast lane the body is
    // relayed by the gate; only the time to the head counts).
    body_delay.store(250, Ordering::Relaxed);
    let judged = |gate: &Harness| gate.running.gate().room_by_id("checkout").unwrap().adaptive.last_verdict();
    let before = judged(&gate).map(|v| v.requests);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let verdict = judged(&gate).expect("windows were judged");
    assert!(Some(verdict.requests) != before && verdict.judged == "healthy", "{verdict:?}");
    assert_eq!(rate(&gate), 600, "a slow body is not a slow upstream");
    body_delay.store(0, Ordering::Relaxed);
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

#[tokio::test]
async fn a_new_leader_takes_up_the_rate_in_force_instead_of_resetting_it() {
    use vestibule::line::{Absence, Limits};
    use vestibule::store::{RedisStore, Store};
    let server = common::redis_server::RedisServer::start();
    let connect = || async {
        let store = RedisStore::connect(&server.url(), Duration::from_secs(2), Duration::from_secs(2)).await.unwrap();
        Store::Redis(Box::new(store))
    };
    // The last leader had stepped the rate down to 150 of 600 and is gone.
    let before = connect().await;
    let decided = Limits {
        admit_per_minute: 600,
        max_active: 1000,
        grant_ms: 120_000,
        session_ms: 600_000,
        abandon_ms: 120_000,
        idle_ms: 300_000,
        max_waiting: 0,
        adaptive_per_minute: 150,
    };
    before.advance("checkout", &decided, 0, Absence::Judge).await.unwrap();
    // A new process starts with the room and leads at its first step.
    let store = connect().await;
    let config: vestibule::config::RoomConfig = toml::from_str(
        "id = \"checkout\"\npaths = [\"/checkout\"]\nadmit_per_minute = 600\nmax_active = 1000\n\
         [adaptive]\np95_ms = 100\nwindow_seconds = 1\n",
    )
    .unwrap();
    let room = std::sync::Arc::new(vestibule::room::Room::new(
        &config,
        tokio_util::sync::CancellationToken::new(),
        vestibule::metrics::RoomMetrics::detached(),
    ));
    let now = vestibule::clock::Clock::new().now_ms();
    vestibule::room::Scheduler::new(room.clone()).step(&store, now).await.unwrap();
    assert!(room.is_leading());
    assert_eq!(room.limits().per_minute(), 150, "the rate in force, read from the store");
    let stats = store.stats("checkout", &room.limits(), now).await.unwrap();
    assert_eq!(stats.adaptive_per_minute, Some(150), "not reset to admit_per_minute by the first step");
}

/// An admitted client's slow upload is the client's time, not the upstream's: the rate
/// listens to the upstream from the end of the upload.
#[tokio::test]
async fn a_slow_upload_is_not_taken_for_a_slow_upstream() {
    let (upstream, _) = start_upstream().await;
    let room = "admit_per_minute = 600\nmax_active = 10\n[rooms.adaptive]\np95_ms = 100\n";
    let gate = start_room(upstream, room).await;
    let token = gate.token("checkout");
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let head = format!(
        "POST /checkout/upload HTTP/1.1\r\nHost: shop.test\r\nCookie: vestibule-token-checkout={token}\r\n\
         Content-Length: 10\r\nConnection: close\r\n\r\nfirst"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stream.write_all(b"-half").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let room = gate.running.gate().room_by_id("checkout").unwrap();
    let totals = room.adaptive.health.totals();
    assert_eq!(totals.count, 1);
    let p95 = totals.p95_ms().unwrap();
    assert!(p95 < 500.0, "the upload's 1.5 s was counted as the upstream's: p95 {p95} ms");
}

/// A client's broken or oversized body is the client's error (4xx), never an upstream failure
/// that the adaptive rate would listen to.
#[tokio::test]
async fn a_broken_upload_is_the_clients_error_not_the_upstreams() {
    let (upstream, _) = start_upstream().await;
    let room = "admit_per_minute = 600\nmax_active = 10\n[rooms.adaptive]\np95_ms = 100\n";
    let gate = start_room_with(upstream, "max_body_bytes = 8", room).await;
    let token = gate.token("checkout");
    let head = format!(
        "POST /checkout/upload HTTP/1.1\r\nHost: shop.test\r\nCookie: vestibule-token-checkout={token}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for (body, wanted) in [("3\r\nabc\r\n0\r\nX: y\nZ\r\n\r\n", 400), ("10\r\n0123456789abcdef\r\n0\r\n\r\n", 413)] {
        let (status, text) = raw(gate.addr, format!("{head}{body}").as_bytes()).await;
        assert_eq!(status, wanted, "{text}");
    }
    let room = gate.running.gate().room_by_id("checkout").unwrap();
    assert_eq!(room.adaptive.health.totals().errors, 0, "no upstream failure counted");
    let metrics = gate.running.gate().metrics().encode();
    assert!(!metrics.contains("outcome=\"upstream_failed\"} 1"), "{metrics}");
}

/// A slow but steady upload longer than `response_timeout` is the client's fault (400), not an
/// upstream that timed out: nothing counted against the upstream. `response_timeout` still
/// bounds the whole exchange, so no client holds an upstream connection for longer.
#[tokio::test]
async fn an_upload_slower_than_the_response_timeout_is_the_clients_error() {
    let (upstream, _) = start_upstream().await;
    let gate = start_gate(upstream, "body_read_timeout = \"3s\"", "response_timeout = \"1s\"").await;
    let token = gate.token("checkout");
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let head = format!(
        "POST /checkout/upload HTTP/1.1\r\nHost: shop.test\r\nVestibule-Token: {token}\r\n\
         Content-Length: 3\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = tokio::time::Instant::now();
    for byte in [b"a", b"b", b"c"] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        if stream.write_all(byte).await.is_err() {
            break;
        }
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3), "bounded by response_timeout");
    let metrics = gate.running.gate().metrics().encode();
    assert!(!metrics.contains("outcome=\"upstream_failed\"} 1"), "{metrics}");
}

/// An upstream that stops reading a request's body is the upstream timing out: `504` within
/// `response_timeout`, counted against it.
#[tokio::test]
async fn an_upstream_that_stops_reading_the_body_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buffer = Vec::new();
            let _ = read_head(&mut stream, &mut buffer).await;
            held.push(stream); // the body is never read
        }
    });
    let gate = start_gate(upstream, "body_read_timeout = \"30s\"", "response_timeout = \"1s\"").await;
    let token = gate.token("checkout");
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    let head = format!(
        "POST /checkout/upload HTTP/1.1\r\nHost: shop.test\r\nVestibule-Token: {token}\r\n\
         Content-Length: 64000000\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        while writer.write_all(&chunk).await.is_ok() {}
    });
    let started = tokio::time::Instant::now();
    let mut answer = [0u8; 12];
    tokio::time::timeout(DEADLINE, reader.read_exact(&mut answer)).await.expect("an answer").unwrap();
    assert_eq!(&answer, b"HTTP/1.1 504", "{:?}", String::from_utf8_lossy(&answer));
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}
