//! Live control across instances on one Redis of the test's own: a change made at one
//! instance's admin API is in force at another within a second (its waiting pages told at
//! once), survives an instance restart and a Redis restart that lost everything, and an
//! instance starts, and serves admitted visitors, while Redis is down.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::redis_server::RedisServer;
use common::visitor::{feed_until, Visitor};
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use vestibule::config::Config;
use vestibule::server::{self, Running};

const TOKEN: &str = "test-admin-token-0123";

fn config_text(redis_url: &str, upstream: SocketAddr, key: &Path, room: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         token = \"{TOKEN}\"\n[upstream]\nurl = \"http://{upstream}\"\n[store]\nkind = \"redis\"\nurl = \"{redis_url}\"\n\
         [tokens]\nsigning_key = {key:?}\n[[rooms]]\nid = \"checkout\"\npaths = [\"/checkout\"]\n{room}"
    )
}

struct Setup {
    redis: RedisServer,
    upstream: SocketAddr,
    dir: TempDir,
    room: String,
}

impl Setup {
    async fn new(name: &str, room: &str) -> Setup {
        let redis = RedisServer::start();
        let (upstream, _) = start_upstream().await;
        let dir = TempDir::new(name);
        std::fs::write(dir.path().join("key.pem"), vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa))
            .unwrap();
        Setup { redis, upstream, dir, room: room.to_owned() }
    }

    async fn instance(&self) -> Running {
        let text = config_text(&self.redis.url(), self.upstream, &self.dir.path().join("key.pem"), &self.room);
        server::start(&Config::parse(&text, "instance.toml", self.dir.path()).unwrap()).await.unwrap()
    }
}

async fn admin_call(admin: SocketAddr, method: &str, path: &str, body: &str) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let (status, _, text) = send(admin, request).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn view(instance: &Running) -> Value {
    let (status, view) = admin_call(instance.admin.unwrap(), "GET", "/rooms/checkout", "").await;
    assert_eq!(status, StatusCode::OK, "{view}");
    view
}

/// Wait until the room's view at `instance` satisfies `wanted`.
async fn view_until(instance: &Running, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let view = view(instance).await;
        if wanted(&view) {
            return view;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_at_one_instance_reaches_every_waiting_page_at_another_within_a_second() {
    let setup = Setup::new("live-change", "admit_per_minute = 60\nmax_active = 1\n").await;
    let (one, two) = (setup.instance().await, setup.instance().await);
    // One visitor inside; three waiting at instance two, each with a feed.
    Visitor::new(one.addr).open("/checkout").await;
    let mut feeds = Vec::new();
    for _ in 0..3 {
        let mut visitor = Visitor::new(two.addr);
        visitor.open("/checkout").await;
        let mut feed = visitor.feed().await;
        feed_until(&mut feed, "position").await;
        feeds.push(feed);
    }

    let started = Instant::now();
    let (status, answer) =
        admin_call(one.admin.unwrap(), "PATCH", "/rooms/checkout", r#"{"message":"Back at noon"}"#).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    for feed in &mut feeds {
        assert_eq!(feed_until(feed, "message").await["message"], "Back at noon");
    }
    let message_took = started.elapsed();

    let started = Instant::now();
    admin_call(
        one.admin.unwrap(),
        "PATCH",
        "/rooms/checkout",
        r#"{"state":"paused","admit_per_minute":30,"max_active":4}"#,
    )
    .await;
    for feed in &mut feeds {
        assert_eq!(feed_until(feed, "paused").await["message"], "Back at noon");
    }
    let paused_took = started.elapsed();
    let seen = view_until(&two, "the change at instance two", |v| v["state"] == "paused").await;
    assert_eq!((seen["admit_per_minute"].as_u64(), seen["max_active"].as_u64()), (Some(30), Some(4)));
    println!("message at every feed of the other instance in {message_took:?}; paused in {paused_took:?}");
    assert!(message_took < Duration::from_secs(1) && paused_took < Duration::from_secs(1));

    // The new capacity binds the leader's scheduler at once: opened again, three more go in.
    admin_call(two.admin.unwrap(), "PATCH", "/rooms/checkout", r#"{"state":"open","admit_per_minute":6000}"#).await;
    for feed in &mut feeds {
        feed_until(feed, "admitted").await;
    }
    let inside = view_until(&one, "four inside", |v| {
        v["grants_outstanding"].as_u64().unwrap() + v["active_sessions"].as_u64().unwrap() == 4
    })
    .await;
    assert_eq!(
        inside["overrides"],
        json!({"state": "open", "admit_per_minute": 6000, "max_active": 4, "message": "Back at noon"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_survive_an_instance_restart_and_a_redis_restart_that_lost_everything() {
    let mut setup = Setup::new("live-survive", "admit_per_minute = 60\nmax_active = 10\n").await;
    let (one, two) = (setup.instance().await, setup.instance().await);
    let change = r#"{"state":"paused","admit_per_minute":42,"message":"Hold on"}"#;
    assert_eq!(admin_call(one.admin.unwrap(), "PATCH", "/rooms/checkout", change).await.0, StatusCode::OK);
    let wanted = |v: &Value| v["state"] == "paused" && v["admit_per_minute"] == 42 && v["message"] == "Hold on";
    view_until(&two, "the change at two", wanted).await;

    // An instance restarted: it reads them from the store.
    one.shutdown();
    one.stopped().await;
    let three = setup.instance().await;
    view_until(&three, "the change at a new instance", wanted).await;

    // Redis restarted empty: the instances put them back, and a newcomer finds them there.
    setup.redis.kill();
    setup.redis.restart();
    view_until(&two, "the room at two after the restart", |v| v["store"] == "ok" && wanted(v)).await;
    let four = setup.instance().await;
    let seen = view_until(&four, "the change at an instance started after the loss", wanted).await;
    assert_eq!(seen["overrides"], json!({"state": "paused", "admit_per_minute": 42, "message": "Hold on"}));

    // Until they are cleared, at any instance.
    admin_call(four.admin.unwrap(), "DELETE", "/rooms/checkout/overrides", "").await;
    view_until(&two, "the room back to its file", |v| v["state"] == "open" && v["overrides"] == json!({})).await;
    view_until(&three, "the room back to its file", |v| v["admit_per_minute"] == 60).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admit_across_instances_lets_exactly_n_in_within_max_active() {
    let setup = Setup::new("live-admit", "admit_per_minute = 60\nmax_active = 3\nstate = \"paused\"\n").await;
    let (one, two) = (setup.instance().await, setup.instance().await);
    let mut visitors = Vec::new();
    for i in 0..5 {
        let mut visitor = Visitor::new(if i % 2 == 0 { one.addr } else { two.addr });
        visitor.open("/checkout").await;
        visitors.push(visitor);
    }
    let (status, answer) = admin_call(two.admin.unwrap(), "POST", "/rooms/checkout/admit", r#"{"count":2}"#).await;
    assert_eq!((status, answer["admitted"].as_u64()), (StatusCode::OK, Some(2)), "{answer}");
    let (_, answer) = admin_call(one.admin.unwrap(), "POST", "/rooms/checkout/admit", r#"{"count":5}"#).await;
    assert_eq!(answer["admitted"], 1, "capacity 3: one more");
    for (i, visitor) in visitors.iter_mut().enumerate() {
        let wanted = if i < 3 { "admitted" } else { "paused" };
        visitor.wait_for_status(wanted).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_starts_while_redis_is_down_serves_admitted_visitors_and_recovers_by_itself() {
    let mut setup = Setup::new("live-start-down", "admit_per_minute = 600\nmax_active = 10\n").await;
    setup.redis.kill();
    let instance = setup.instance().await;
    let admin = instance.admin.unwrap();

    let (status, ready) =
        send(admin, Request::get("/readyz").body(Full::new(Bytes::new())).unwrap()).await.into_parts3();
    // Ready: it serves its admitted visitors and holds newcomers; the store's state is told.
    assert_eq!((status, &ready["store"]), (StatusCode::OK, &json!("unavailable")), "{ready}");
    let token = instance.gate().tokens().mint("checkout", "v", 0, 0, vestibule::token::unix_now() + 600).unwrap();
    let (status, _, body) = get(instance.addr, "/checkout/pay", &[("vestibule-token", &token)]).await;
    assert_eq!(status, StatusCode::OK, "an admitted visitor passes without Redis: {body}");
    let (status, _, _) = get(instance.addr, "/checkout", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "a newcomer is told to come back");
    assert_eq!(view(&instance).await["store"], "unavailable");

    setup.redis.restart();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, ready) =
            send(admin, Request::get("/readyz").body(Full::new(Bytes::new())).unwrap()).await.into_parts3();
        assert_eq!(status, StatusCode::OK);
        if ready["store"] == "ok" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the store never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut newcomer = Visitor::new(instance.addr);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, _, _) = newcomer.open("/checkout").await;
        if status == StatusCode::OK && newcomer.status().await["status"] == "admitted" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "newcomers never got in");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

trait Parts3 {
    fn into_parts3(self) -> (StatusCode, Value);
}

impl Parts3 for (StatusCode, http::HeaderMap, String) {
    fn into_parts3(self) -> (StatusCode, Value) {
        (self.0, serde_json::from_str(&self.2).unwrap_or(Value::Null))
    }
}

/// A number from an instance's `/metrics`: the sample whose name and labels start with `series`.
async fn metric(instance: &Running, series: &str) -> f64 {
    let request = Request::get("/metrics").header("host", "localhost").body(Full::new(Bytes::new())).unwrap();
    let (_, _, text) = send(instance.admin.unwrap(), request).await;
    text.lines().find_map(|line| line.strip_prefix(series)?.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

/// Store reads of the room an instance has made so far.
async fn reads(instance: &Running) -> f64 {
    metric(instance, "vestibule_store_duration_seconds_count{operation=\"stats\"}").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_reads_an_idle_room_rarely_a_moving_one_every_second_and_the_admin_view_afresh() {
    let setup = Setup::new("live-idle", "admit_per_minute = 600\nmax_active = 1\n").await;
    let (one, two) = (setup.instance().await, setup.instance().await);
    let leading = "vestibule_room_leader{room=\"checkout\"}";
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let (leader, follower) = loop {
        let (a, b) = (metric(&one, leading).await, metric(&two, leading).await);
        // The follower has read the room since it heard the leader (and hears it: it does not
        // read at every step any more).
        if a + b == 1.0 && reads(if a == 1.0 { &two } else { &one }).await >= 1.0 {
            break if a == 1.0 { (&one, &two) } else { (&two, &one) };
        }
        assert!(tokio::time::Instant::now() < deadline, "no single leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Idle: over 3 s, at most one read (IDLE_READ_EVERY is 10 s; it was one a second).
    let before = reads(follower).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_reads = reads(follower).await - before;
    assert!(idle_reads <= 1.0, "{idle_reads} reads of an idle room in 3 s");

    // Somebody inside, somebody waiting at the leader: the follower's admin view is read afresh
    // when what it keeps is over a second old (it reads the idle room only every 10 s).
    Visitor::new(leader.addr).open("/checkout").await;
    Visitor::new(leader.addr).open("/checkout").await;
    let asked = Instant::now();
    view_until(follower, "the follower's view of the two visitors", |seen| {
        (seen["active_sessions"].as_u64(), seen["waiting"].as_u64()) == (Some(1), Some(1))
    })
    .await;
    assert!(asked.elapsed() < Duration::from_millis(1500), "the view took {:?} to be current", asked.elapsed());

    // Someone waiting at the follower: it reads the room every second again.
    Visitor::new(follower.addr).open("/checkout").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = reads(follower).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let busy_reads = reads(follower).await - before;
    assert!(busy_reads >= 2.0, "{busy_reads} reads of a room with people waiting in 3 s");
}

/// Join at `addr` with a fresh visitor; their status (waiting).
async fn newcomer(addr: SocketAddr) -> (Visitor, Value) {
    let mut visitor = Visitor::new(addr);
    visitor.open("/checkout").await;
    let status = visitor.status().await;
    (visitor, status)
}

/// After a slow spell (12 a minute, admissions observed) the rate goes back to 300 a minute: a
/// newcomer at either instance, the leader or not, is told the wait of their place at 300 a
/// minute, and both instances' admin views say the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_slow_spell_every_instance_tells_the_wait_at_the_rate_in_force() {
    let room = "admit_per_minute = 300\nmax_active = 100000\njoins_per_address_per_minute = 100000\n";
    let setup = Setup::new("live-eta", room).await;
    let (one, two) = (setup.instance().await, setup.instance().await);
    admin_call(one.admin.unwrap(), "PATCH", "/rooms/checkout", r#"{"admit_per_minute":12}"#).await;
    view_until(&two, "the slow rate at two", |v| v["admit_per_minute"] == 12).await;
    let mut crowd = Vec::new();
    for i in 0..20 {
        crowd.push(newcomer(if i % 2 == 0 { one.addr } else { two.addr }).await.0);
    }
    // Turns at 12 a minute: the minute's observed rate is a fraction of the rate to come.
    view_until(&one, "admissions at the slow rate", |v| v["admitted_last_minute"].as_u64() >= Some(2)).await;

    admin_call(two.admin.unwrap(), "DELETE", "/rooms/checkout/overrides", "").await;
    view_until(&one, "the file's rate at one", |v| v["admit_per_minute"] == 300).await;
    view_until(&two, "the file's rate at two", |v| v["admit_per_minute"] == 300).await;
    for _ in 0..150 {
        crowd.push(newcomer(one.addr).await.0);
    }
    for addr in [one.addr, two.addr] {
        let (_, status) = newcomer(addr).await;
        let (position, eta) = (status["position"].as_u64().unwrap(), status["eta_seconds"].as_u64().unwrap());
        assert!(position > 50, "a crowd waits: {status}");
        // 5 a second, give or take the second it took to ask.
        let at_rate = position.div_ceil(5);
        assert!(eta.abs_diff(at_rate) <= 1, "place {position} at {addr} told {eta} s; {at_rate} s at 300 a minute");
    }
    // Each admin view, a second old at most, estimates its line at the same rate.
    for instance in [&one, &two] {
        let view = view(instance).await;
        let (waiting, eta) = (view["waiting"].as_u64().unwrap(), view["eta_seconds"].as_u64().unwrap());
        assert!(eta.abs_diff((waiting + 1).div_ceil(5)) <= 1, "{waiting} waiting, a newcomer told {eta} s: {view}");
    }
}

/// Redis away: every instance stays ready (it serves its admitted visitors), says the store
/// is away in /readyz, the view and the metrics, answers the view at once, and a newcomer gets
/// the room's own page in their language, with `Retry-After`, or the JSON for an API client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_instances_stay_ready_and_newcomers_get_the_rooms_page() {
    let room = "admit_per_minute = 600\nmax_active = 10\nsite_name = \"Boutique\"\nmessage = \"Vente du printemps\"\n";
    let mut setup = Setup::new("live-away", room).await;
    let (one, two) = (setup.instance().await, setup.instance().await);
    let (mut inside, status) = newcomer(one.addr).await;
    assert_eq!(status["status"], "admitted");
    setup.redis.kill();
    for instance in [&one, &two] {
        view_until(instance, "the store away", |v| v["store"] == "unavailable").await;
        let admin = instance.admin.unwrap();
        let (status, ready) =
            send(admin, Request::get("/readyz").body(Full::new(Bytes::new())).unwrap()).await.into_parts3();
        assert_eq!((status, ready), (StatusCode::OK, json!({"ready": true, "store": "unavailable"})));
        let started = Instant::now();
        view(instance).await;
        assert!(started.elapsed() < Duration::from_millis(500), "the view does not wait on a store known away");
        let (_, metrics) = admin_call(admin, "GET", "/metrics", "").await;
        let metrics = metrics.as_str().unwrap_or_default().to_owned();
        assert!(metrics.lines().any(|line| line == "vestibule_store_up 0"), "{metrics}");

        let page = Request::get("/checkout")
            .header("host", "shop.test")
            .header("accept", "text/html")
            .header("accept-language", "fr-CH, fr;q=0.9, en;q=0.5")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, headers, body) = send(instance.addr, page).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["retry-after"], "5");
        assert!(headers.get("set-cookie").is_none(), "no ticket is taken");
        assert!(body.contains("<html lang=\"fr\""), "{body}");
        assert!(body.contains("<p class=\"site\">Boutique</p>"), "the site's name alone: {body}");
        for words in ["La file est en pause", "Boutique", "Vente du printemps", "elle-même dès que la file repart"] {
            assert!(body.contains(words), "{words:?} missing: {body}");
        }
        let (status, headers, body) = get(instance.addr, "/checkout", &[("accept", "application/json")]).await;
        assert_eq!((status, &headers["retry-after"]), (StatusCode::SERVICE_UNAVAILABLE, &"5".parse().unwrap()));
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((answer["status"].as_str(), answer["position"].as_u64()), (Some("paused"), None), "{answer}");
        assert_eq!(answer["reason"], "store", "an API client is told why: {answer}");
    }
    let (status, _, _) = inside.open("/checkout/pay").await;
    assert_eq!(status, StatusCode::OK, "the admitted visitor is not affected");

    setup.redis.restart();
    let mut back = Visitor::new(two.addr);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, _, _) = back.open("/checkout").await;
        if status == StatusCode::OK {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a newcomer never got in after the store came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
