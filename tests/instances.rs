//! Several instances on one Redis: one FIFO line and one capacity bound across instances,
//! and tokens minted by one instance pass at another.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::redis_server::RedisServer;
use common::*;
use http::StatusCode;
use vestibule::config::Config;
use vestibule::server::{self, Running};

async fn instance(redis: &RedisServer, upstream: SocketAddr, key: &Path, dir: &Path) -> Running {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n[upstream]\nurl = \"http://{upstream}\"\n\
         [store]\nkind = \"redis\"\nurl = \"{}\"\n[tokens]\nsigning_key = {key:?}\n\
         [[rooms]]\nid = \"checkout\"\npaths = [\"/checkout\"]\nadmit_per_minute = 600\nmax_active = 1\n",
        redis.url()
    );
    let config = Config::parse(&text, "instance.toml", dir).unwrap();
    server::start(&config).await.unwrap()
}

async fn status(addr: SocketAddr, cookie: &str) -> serde_json::Value {
    let (code, _, body) = get(addr, "/_vestibule/status?room=checkout", &[("cookie", cookie)]).await;
    assert_eq!(code, StatusCode::OK);
    serde_json::from_str(&body).unwrap()
}

fn cookies(headers: &http::HeaderMap) -> String {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
        .filter(|pair| !pair.ends_with('='))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A redis-server of the test's own, a recording upstream, and two instances sharing both
/// and one signing key.
struct TwoInstances {
    _redis: RedisServer,
    upstream: Upstream,
    _dir: TempDir,
    one: Running,
    two: Running,
}

async fn two_instances(name: &str) -> TwoInstances {
    let redis = RedisServer::start();
    let (upstream_addr, upstream) = start_upstream().await;
    let dir = TempDir::new(name);
    let key = dir.path().join("key.pem");
    std::fs::write(&key, vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa)).unwrap();
    let one = instance(&redis, upstream_addr, &key, dir.path()).await;
    let two = instance(&redis, upstream_addr, &key, dir.path()).await;
    TwoInstances { _redis: redis, upstream, _dir: dir, one, two }
}

/// `POST /_vestibule/leave` with these cookies.
async fn leave(addr: SocketAddr, cookie: &str) {
    let request = http::Request::post("/_vestibule/leave?room=checkout")
        .header("host", "shop.test")
        .header("cookie", cookie)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(send(addr, request).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_line_and_one_capacity() {
    let TwoInstances { upstream, one, two, .. } = &two_instances("instances").await;

    // The first visitor, at instance one, takes the only place.
    let (code, headers, body) = get(one.addr, "/checkout", &[]).await;
    assert_eq!((code, body.as_str()), (StatusCode::OK, "upstream saw /checkout"));
    let first = cookies(&headers);
    // At instance two the room is full too: the line is shared.
    let (code, headers, _) = get(two.addr, "/checkout", &[]).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "instance two must not admit past the shared capacity");
    let second = cookies(&headers);
    let (_, headers, _) = get(one.addr, "/checkout", &[]).await;
    let third = cookies(&headers);
    assert_eq!(upstream.requests().len(), 1);

    // Positions follow the shared join order, whichever instance is asked.
    wait_for("both snapshots", || {
        one.gate().rooms()[0].snapshot().cursor == 1 && two.gate().rooms()[0].snapshot().cursor == 1
    })
    .await;
    assert_eq!(status(one.addr, &second).await["position"], 1);
    assert_eq!(status(two.addr, &third).await["position"], 2);

    // A token minted at instance one passes at instance two.
    let (code, _, _) = get(two.addr, "/checkout/pay", &[("cookie", &first)]).await;
    assert_eq!(code, StatusCode::OK);

    // The first visitor leaves at instance two; the second is admitted and redeems at one.
    leave(two.addr, &first).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while status(two.addr, &second).await["status"] != "admitted" {
        assert!(tokio::time::Instant::now() < deadline, "the second visitor was never admitted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (code, _, body) = get(one.addr, "/checkout", &[("cookie", &second)]).await;
    assert_eq!((code, body.as_str()), (StatusCode::OK, "upstream saw /checkout"));
    // The session that ended at instance two stops passing at instance one too.
    let first_token: String = first.split("; ").find(|c| c.starts_with("vestibule-token-")).unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (code, _, _) = get(one.addr, "/checkout/pay", &[("cookie", &first_token)]).await;
        if code == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the ended session still passes at instance one");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status(two.addr, &third).await["position"], 1);
    let stats = one
        .gate()
        .store()
        .stats("checkout", &one.gate().rooms()[0].limits, vestibule::clock::Clock::new().now_ms())
        .await
        .unwrap();
    assert!(stats.active + stats.outstanding <= 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leading_instance_dies_another_takes_over_within_five_seconds() {
    let TwoInstances { _redis, upstream: _upstream, _dir, one: a, two: b } = two_instances("failover").await;

    // Exactly one instance advances the line.
    wait_for("a leader", || a.gate().rooms()[0].is_leading() || b.gate().rooms()[0].is_leading()).await;
    // Over several scheduler steps of both instances, never two leaders at once.
    for _ in 0..30 {
        let both = a.gate().rooms()[0].is_leading() && b.gate().rooms()[0].is_leading();
        assert!(!both, "two instances advance the same line");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (leader, follower) = if a.gate().rooms()[0].is_leading() { (a, b) } else { (b, a) };

    let (_, headers, _) = get(follower.addr, "/checkout", &[]).await;
    let holder = cookies(&headers);
    let (code, headers, _) = get(follower.addr, "/checkout", &[]).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    let waiter = cookies(&headers);

    // The leader dies without handing over: its lease must run out.
    let died = tokio::time::Instant::now();
    leader.shutdown();
    leader.stopped().await;
    leave(follower.addr, &holder).await;
    while status(follower.addr, &waiter).await["status"] != "admitted" {
        assert!(died.elapsed() < std::time::Duration::from_secs(5), "no instance took over within 5 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(follower.gate().rooms()[0].is_leading());
}
