//! Several instances on one Redis: one FIFO line and one capacity bound across instances,
//! tokens minted by one instance pass at another, and the faults of the failure policy (docs/design.md): a
//! leader that stops or is killed, a Redis frozen, killed, or restarted empty.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use std::time::Duration;

use common::redis_server::RedisServer;
use common::visitor::{feed_until, Feed, Visitor};
use common::*;
use http::StatusCode;
use vestibule::config::Config;
use vestibule::server::{self, Running};

/// An instance's configuration: one room of one place, on the test's Redis.
fn config_text(redis: &RedisServer, upstream: SocketAddr, key: &Path) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n[upstream]\nurl = \"http://{upstream}\"\n\
         [store]\nkind = \"redis\"\nurl = \"{}\"\n[tokens]\nsigning_key = {key:?}\n\
         [[rooms]]\nid = \"checkout\"\npaths = [\"/checkout\"]\nadmit_per_minute = 600\nmax_active = 1\n",
        redis.url()
    )
}

async fn instance(redis: &RedisServer, upstream: SocketAddr, key: &Path, dir: &Path) -> Running {
    let config = Config::parse(&config_text(redis, upstream, key), "instance.toml", dir).unwrap();
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
        .stats("checkout", &one.gate().rooms()[0].limits(), vestibule::clock::Clock::new().now_ms())
        .await
        .unwrap();
    assert!(stats.active + stats.outstanding <= 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leading_instance_stops_the_other_takes_over_at_once() {
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

    // The leader stops gracefully and gives its lease up: the follower need not wait for it
    // to run out (3 s after the last renewal).
    leader.shutdown();
    leader.stopped().await;
    let stopped = tokio::time::Instant::now();
    leave(follower.addr, &holder).await;
    while status(follower.addr, &waiter).await["status"] != "admitted" {
        let waited = stopped.elapsed();
        assert!(waited < vestibule::room::LEASE - Duration::from_secs(1), "no hand-over: waited {waited:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(follower.gate().rooms()[0].is_leading());
}

/// Wait until `visitor` is told `position`.
async fn wait_for_position(visitor: &mut Visitor, position: u64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = visitor.status().await;
        if status["position"] == position {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "waited for position {position}, still {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_outright_loses_nobody_their_place() {
    let redis = RedisServer::start();
    let (upstream_addr, _upstream) = start_upstream().await;
    let dir = TempDir::new("killed");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa)).unwrap();
    let config = dir.path().join("proxy.toml");
    let text = config_text(&redis, upstream_addr, &key) + "[log]\nformat = \"json\"\n";
    std::fs::write(&config, text).unwrap();
    let (mut doomed, doomed_addr) = spawn_proxy(&config);
    let (_survivor, survivor_addr) = spawn_proxy(&config);

    let mut inside = Visitor::new(doomed_addr);
    assert_eq!(inside.open("/checkout").await.0, StatusCode::OK);
    let mut waiter = Visitor::new(doomed_addr);
    waiter.open("/checkout").await;
    wait_for_position(&mut waiter, 1).await;
    let mut feed = waiter.feed().await;
    assert_eq!(feed_until(&mut feed, "position").await["position"], 1);

    // The instance dies with the waiter's socket open and, maybe, the room's lease.
    doomed.kill();
    let killed = tokio::time::Instant::now();
    assert!(next_message_or_close(&mut feed).await.is_none(), "the dead instance's socket closes");

    // The page reconnects to the other instance, ticket cookie and all: the same place.
    waiter.addr = survivor_addr;
    let mut feed = waiter.feed().await;
    assert_eq!(feed_until(&mut feed, "position").await["position"], 1);
    // The admitted visitor's token passes there too; when they leave, the waiter is next.
    inside.addr = survivor_addr;
    assert_eq!(inside.open("/checkout/pay").await.0, StatusCode::OK);
    inside.leave().await;
    feed_until(&mut feed, "admitted").await;
    // Whichever instance led the room, the line moved again within 5 s of the kill.
    assert!(killed.elapsed() < Duration::from_secs(5), "took {:?}", killed.elapsed());
    assert_eq!(waiter.open("/checkout").await.0, StatusCode::OK);
}

/// The next feed message, or `None` once the socket has closed.
async fn next_message_or_close(feed: &mut Feed) -> Option<serde_json::Value> {
    use futures_util::StreamExt;
    loop {
        let frame = tokio::time::timeout(DEADLINE, feed.next()).await.expect("the feed answers or closes in time");
        match frame {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                return Some(serde_json::from_str(&text).unwrap())
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_pauses_the_line_and_admitted_visitors_do_not_notice() {
    let TwoInstances { _redis: redis, one, two, .. } = two_instances("frozen").await;
    let mut inside = Visitor::new(one.addr);
    assert_eq!(inside.open("/checkout").await.0, StatusCode::OK);
    let mut waiter = Visitor::new(two.addr);
    waiter.open("/checkout").await;
    wait_for_position(&mut waiter, 1).await;
    let mut feed = waiter.feed().await;
    feed_until(&mut feed, "position").await;

    redis.pause();
    // The waiter's page says the line is paused, and they keep their place.
    let paused = feed_until(&mut feed, "paused").await;
    assert_eq!((&paused["reason"], &paused["message"]), (&"store".into(), &serde_json::Value::Null), "{paused}");
    let status = waiter.status().await;
    assert_eq!((&status["status"], &status["position"]), (&"paused".into(), &1.into()), "{status}");
    assert_eq!(status["reason"], "store", "{status}");
    // Admitted visitors do not wait on the store.
    let started = tokio::time::Instant::now();
    assert_eq!(inside.open("/checkout/pay").await.0, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_millis(500), "an admitted request waited {:?}", started.elapsed());
    // A newcomer hears to come back, within the store's timeout.
    for instance in [&one, &two] {
        let started = tokio::time::Instant::now();
        let (code, headers, _) = Visitor::new(instance.addr).request("GET", "/checkout", "application/json").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.contains_key("retry-after"));
        assert!(started.elapsed() < Duration::from_secs(2), "a newcomer waited {:?}", started.elapsed());
    }
    // The admitted visitor leaves meanwhile: the end is held and applied when Redis is back.
    inside.leave().await;

    redis.resume();
    feed_until(&mut feed, "admitted").await;
    assert_eq!(waiter.open("/checkout").await.0, StatusCode::OK, "the freed place went to the waiter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_keeps_every_place_and_admits_nobody_extra() {
    let TwoInstances { _redis: mut redis, one, two, .. } = two_instances("restarted").await;
    let mut inside = Visitor::new(one.addr);
    assert_eq!(inside.open("/checkout").await.0, StatusCode::OK);
    let mut first = Visitor::new(two.addr);
    first.open("/checkout").await;
    let mut second = Visitor::new(one.addr);
    second.open("/checkout").await;
    wait_for_position(&mut first, 1).await;
    wait_for_position(&mut second, 2).await;
    let mut first_feed = first.feed().await;
    let mut second_feed = second.feed().await;
    feed_until(&mut first_feed, "position").await;
    feed_until(&mut second_feed, "position").await;

    redis.kill();
    feed_until(&mut first_feed, "paused").await;
    let (code, _, _) = Visitor::new(one.addr).request("GET", "/checkout", "application/json").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "nobody joins while the store is down");

    redis.restart();
    // Nobody lost their place...
    assert_eq!(feed_until(&mut first_feed, "position").await["position"], 1);
    wait_for_position(&mut second, 2).await;
    // ...and a newcomer, once the line is restored, comes after them.
    let mut newcomer = Visitor::new(two.addr);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while newcomer.open("/checkout").await.0 == StatusCode::SERVICE_UNAVAILABLE
        && !newcomer.jar.keys().any(|name| name.starts_with("vestibule-ticket-"))
    {
        assert!(tokio::time::Instant::now() < deadline, "newcomers were never let in line again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_position(&mut newcomer, 3).await;
    // The session of the lost line still holds the only place: no mass admission.
    let room = &one.gate().rooms()[0];
    let now = vestibule::clock::Clock::new().now_ms();
    let stats = one.gate().store().stats("checkout", &room.limits(), now).await.unwrap();
    assert_eq!((stats.cursor, stats.active + stats.outstanding), (1, 1), "{stats:?}");
    // When it ends, the place goes to the first in line.
    inside.leave().await;
    feed_until(&mut first_feed, "admitted").await;
    assert_eq!(second.status().await["position"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_gone_silent_is_noticed_and_made_again() {
    let redis = RedisServer::start();
    let relay = common::relay::Relay::start(([127, 0, 0, 1], redis.port).into()).await;
    let (upstream_addr, _upstream) = start_upstream().await;
    let dir = TempDir::new("half-open");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa)).unwrap();
    let one = instance(&redis, upstream_addr, &key, dir.path()).await;
    // Instance two reaches Redis through the relay.
    let text = config_text(&redis, upstream_addr, &key).replace(&redis.url(), &format!("redis://{}/", relay.addr));
    let two = server::start(&Config::parse(&text, "two.toml", dir.path()).unwrap()).await.unwrap();

    let mut inside = Visitor::new(one.addr);
    assert_eq!(inside.open("/checkout").await.0, StatusCode::OK);
    inside.addr = two.addr;
    assert_eq!(inside.open("/checkout/pay").await.0, StatusCode::OK, "the token passes at instance two");
    let token = inside.jar["vestibule-token-checkout"].clone();

    // Instance two's subscription goes half-open: nothing arrives, nothing says so.
    wait_for("instance two subscribed", || relay.silence_subscriptions() > 0).await;
    // The visitor leaves at instance one: the end is announced, and instance two misses it...
    inside.addr = one.addr;
    inside.leave().await;
    // ...until it notices the silence, subscribes again and catches up on ended sessions.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (code, _, _) =
            get(two.addr, "/checkout/pay", &[("cookie", &format!("vestibule-token-checkout={token}"))]).await;
        if code == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the ended session still passes at instance two");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_during_an_outage_are_answered_at_once_and_never_lost() {
    let TwoInstances { _redis: redis, one, two, .. } = two_instances("leaves").await;
    let mut inside = Visitor::new(one.addr);
    assert_eq!(inside.open("/checkout").await.0, StatusCode::OK);
    let mut leaver = Visitor::new(two.addr);
    leaver.open("/checkout").await;
    let mut next = Visitor::new(one.addr);
    next.open("/checkout").await;
    wait_for_position(&mut next, 2).await;
    let mut feed = next.feed().await;
    feed_until(&mut feed, "position").await;

    redis.pause();
    // The first in line gives up their place, the visitor inside leaves: each hears back at
    // once, whatever the store is doing.
    for visitor in [&mut leaver, &mut inside] {
        let started = tokio::time::Instant::now();
        visitor.leave().await;
        assert!(started.elapsed() < Duration::from_millis(300), "a leave waited {:?}", started.elapsed());
    }
    feed_until(&mut feed, "paused").await;
    redis.resume();
    // Both are applied when Redis is back: the freed place goes to the next in line, not to
    // the one who gave it up.
    feed_until(&mut feed, "admitted").await;
    assert_eq!(next.open("/checkout").await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_of_work_is_taken_once_across_instances() {
    let redis = RedisServer::start();
    let (upstream_addr, _upstream) = start_upstream().await;
    let dir = TempDir::new("pow");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa)).unwrap();
    let text =
        config_text(&redis, upstream_addr, &key).replace("max_active = 1\n", "max_active = 10\nchallenge = \"pow\"\n");
    let config = Config::parse(&text, "pow.toml", dir.path()).unwrap();
    let (one, two) = (server::start(&config).await.unwrap(), server::start(&config).await.unwrap());
    // A challenge from instance one, solved, used at instance one...
    let (code, _, body) = get(one.addr, "/checkout", &[]).await;
    assert_eq!(code, StatusCode::FORBIDDEN);
    let asked: serde_json::Value = serde_json::from_str(&body).unwrap();
    let solved = vestibule::challenge::solve(asked["challenge"].as_str().unwrap(), 16);
    let (code, headers, _) = get(one.addr, "/checkout", &[("vestibule-pow", &solved)]).await;
    assert_eq!(code, StatusCode::OK);
    assert!(cookies(&headers).contains("vestibule-token-checkout"));
    // ...is refused at instance two.
    let (code, _, body) = get(two.addr, "/checkout", &[("vestibule-pow", &solved)]).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("used already"), "{body}");
}

/// Commands the test's Redis has processed so far (`INFO stats`).
fn commands_processed(redis: &RedisServer) -> u64 {
    let info = common::redis_server::RedisCluster::cli(redis.port, &["info", "stats"]);
    info.lines()
        .find_map(|line| line.strip_prefix("total_commands_processed:"))
        .map(|n| n.trim().parse().unwrap())
        .expect("INFO stats has total_commands_processed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_room_costs_redis_little_and_a_newcomer_who_must_wait_still_moves_at_once() {
    let pair = two_instances("empty-room").await;
    let leader_known = || pair.one.gate().rooms()[0].is_leading() || pair.two.gate().rooms()[0].is_leading();
    common::wait_for("a leader", leader_known).await;

    // Nobody anywhere: the leader advances the empty line, and renews its lease, once a second,
    // not every 100 ms step; the follower tries the lease every 1.5 s and reads the room every
    // 10 s. Two instances, one room, 3 s: about 150 commands; advancing and renewing every
    // step, trying every 500 ms and reading every second made about 1 400, then 350.
    let before = commands_processed(&pair._redis);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spent = commands_processed(&pair._redis) - before;
    println!("an empty room cost Redis {spent} commands in 3 s");
    assert!(spent < 250, "an empty room cost Redis {spent} commands in 3 s");

    // The room's one place taken, a newcomer at the leader waits; the moment the place is
    // given up, the next step (not the next second) lets them in.
    let (leader, follower) =
        if pair.one.gate().rooms()[0].is_leading() { (&pair.one, &pair.two) } else { (&pair.two, &pair.one) };
    let (code, headers, _) = get(follower.addr, "/checkout", &[]).await;
    assert_eq!(code, StatusCode::OK, "the empty room lets the first visitor in at once");
    let first = cookies(&headers);
    let (code, headers, _) = get(leader.addr, "/checkout", &[]).await;
    assert!(is_gate_wait(code), "the room is full: the newcomer waits");
    let second = cookies(&headers);
    leave(follower.addr, &first).await;
    let left = std::time::Instant::now();
    loop {
        if status(leader.addr, &second).await["status"] == "admitted" {
            break;
        }
        assert!(left.elapsed() < Duration::from_secs(5), "the newcomer was never let in");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(left.elapsed() < Duration::from_millis(900), "let in {:?} after the place was given up", left.elapsed());
    let _ = &pair.upstream;
}
