//! A scheduled sale across two instances on one Redis (docs/sales.md, `[[rooms.events]]`): the
//! pre-queue fills at both, Redis is restarted empty during it, the sale starts, and every
//! visitor's place is the one the published seed gives them (checked here from the published
//! rule alone), no pre-queue place is lost, and later arrivals line up behind.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::redis_server::RedisServer;
use common::visitor::Visitor;
use common::*;
use http::StatusCode;
use serde_json::Value;
use vestibule::config::Config;
use vestibule::server::{self, Running};

/// How long after the test's start the sale starts: time for 20 joins, a Redis restart and 4
/// joins after it, on a busy machine.
const STARTS_IN: Duration = Duration::from_secs(12);

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

fn config_text(redis: &RedisServer, upstream: std::net::SocketAddr, key: &Path, starts_at: SystemTime) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n[upstream]\nurl = \"http://{upstream}\"\n\
         [store]\nkind = \"redis\"\nurl = \"{}\"\n[tokens]\nsigning_key = {key:?}\n\
         [[rooms]]\nid = \"checkout\"\npaths = [\"/checkout\"]\nadmit_per_minute = 60\nmax_active = 100\n\
         state = \"closed\"\nmessage = \"Opens at ten\"\n\
         [[rooms.events]]\nname = \"Drop\"\nprequeue_at = {}\nstarts_at = {}\nadmit_per_minute = 1200\n",
        redis.url(),
        rfc3339(SystemTime::now() - Duration::from_secs(60)),
        rfc3339(starts_at),
    )
}

async fn instance(config: &str, dir: &Path) -> Running {
    let config = Config::parse(config, "instance.toml", dir).unwrap();
    server::start(&config).await.unwrap()
}

/// The claims of a JWT, unverified (the test reads its own cookies).
fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// The place of pre-queue number `number` by the published rule: 1 + how many of the
/// numbers 1..=count have a smaller SHA-256(seed + ":" + n).
fn place_by_the_rule(seed: &str, count: u64, number: u64) -> u64 {
    let key = |n: u64| ring::digest::digest(&ring::digest::SHA256, format!("{seed}:{n}").as_bytes()).as_ref().to_vec();
    let mine = key(number);
    1 + (1..=count).filter(|n| key(*n) < mine).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_across_two_instances_places_everyone_by_the_published_draw_through_a_redis_restart() {
    let mut redis = RedisServer::start();
    let (upstream_addr, _upstream) = start_upstream().await;
    let dir = TempDir::new("sale");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa)).unwrap();
    // Whole seconds: the event's id is its start in seconds.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let starts_at = UNIX_EPOCH + Duration::from_secs(now + 1) + STARTS_IN;
    let config = config_text(&redis, upstream_addr, &key, starts_at);
    let one = instance(&config, dir.path()).await;
    let two = instance(&config, dir.path()).await;

    // The pre-queue, at both instances: a countdown, a number each, nobody admitted.
    let mut early = Vec::new();
    for i in 0..20 {
        let mut visitor = Visitor::new(if i % 2 == 0 { one.addr } else { two.addr });
        let (code, _, body) = visitor.open("/checkout").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("The sale starts in") && body.contains(r#"id="starts""#), "{body}");
        let status = visitor.status().await;
        assert_eq!(status["status"], "prequeue", "{status}");
        assert!(status.get("message").is_none(), "the closed room's message is not the sale's: {status}");
        assert!(status["starts_in"].as_u64().unwrap() <= STARTS_IN.as_secs() + 1);
        early.push(visitor);
    }
    let mut numbers: Vec<u64> = Vec::new();
    for visitor in &mut early {
        numbers.push(visitor.status().await["number"].as_u64().unwrap());
    }

    // Redis is restarted empty in the middle of the pre-queue.
    redis.kill();
    redis.restart();
    redis.wait_until_ready();
    // Everyone's page keeps asking: each instance gives back what it knew.
    for visitor in &mut early {
        assert_eq!(visitor.status().await["status"], "prequeue");
    }
    // Newcomers after the restart get numbers nobody had: one instance restores, the other
    // merges, and joins wait for that (a 503 with Retry-After meanwhile).
    let mut after_restart = Vec::new();
    for i in 0..4 {
        let mut visitor = Visitor::new(if i % 2 == 0 { one.addr } else { two.addr });
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (code, _, _) = visitor.open("/checkout").await;
            if code == StatusCode::OK {
                break;
            }
            assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "a join during the restore waits");
            assert!(tokio::time::Instant::now() < deadline, "no pre-queue number after the restart");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        numbers.push(visitor.status().await["number"].as_u64().unwrap());
        after_restart.push(visitor);
    }
    let mut sorted = numbers.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 24, "no pre-queue number given twice: {numbers:?}");
    assert!(numbers[20..].iter().all(|n| *n > 20), "numbers after the restart follow the earlier ones: {numbers:?}");
    early.extend(after_restart);

    // The start. Visitors poll as their pages do, until the draw gives them a place.
    let deadline = tokio::time::Instant::now() + STARTS_IN + DEADLINE;
    for visitor in &mut early {
        loop {
            let status = visitor.status().await;
            if status["status"] != "prequeue" {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "still in the pre-queue: {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The seed is published, the same at both instances.
    let events = |addr| async move {
        let (code, _, body) = get(addr, "/_vestibule/events?room=checkout", &[]).await;
        assert_eq!(code, StatusCode::OK);
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let published = events(one.addr).await;
    let draw = published["events"][0]["draw"].clone();
    assert_eq!(draw, events(two.addr).await["events"][0]["draw"], "one draw for every instance");
    let (seed, count, first) =
        (draw["seed"].as_str().unwrap(), draw["prequeued"].as_u64().unwrap(), draw["first_ticket"].as_u64().unwrap());
    assert_eq!(count, sorted.last().copied().unwrap(), "every number given is in the draw");
    assert!(published["rule"].as_str().unwrap().contains("SHA-256"));

    // A later arrival lines up behind the whole pre-queue.
    let mut late = Visitor::new(two.addr);
    assert_eq!(late.open("/checkout").await.0, StatusCode::OK);
    let late_ticket = claims(&late.jar["vestibule-ticket-checkout"])["tkt"].as_u64().unwrap();
    assert_eq!(late_ticket, first + count, "first come, first served after the pre-queue");

    // Each visitor's next page load takes the place its pre-queue number drew (a ticket
    // cookie, or the turn at once), and goes in when its turn comes: at either instance. The
    // admission token names the place.
    let mut tickets = Vec::new();
    for (visitor, number) in early.iter_mut().zip(&numbers) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (code, _, body) = visitor.open("/checkout").await;
            if code == StatusCode::OK && body == "upstream saw /checkout" {
                break;
            }
            let ticket = claims(&visitor.jar["vestibule-ticket-checkout"]);
            assert_eq!(ticket["aud"], "ticket:checkout", "a place in line for {number}");
            assert!(tokio::time::Instant::now() < deadline, "number {number} never went in");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ticket = claims(&visitor.jar["vestibule-token-checkout"])["tkt"].as_u64().unwrap();
        assert_eq!(ticket, first - 1 + place_by_the_rule(seed, count, *number), "number {number}'s place");
        tickets.push(ticket);
    }
    tickets.sort_unstable();
    assert_eq!(tickets, (first..first + 24).collect::<Vec<_>>(), "every place of the pre-queue held, none twice");
    assert_ne!(
        numbers.iter().map(|n| first - 1 + place_by_the_rule(seed, count, *n)).collect::<Vec<_>>(),
        (first..first + 24).collect::<Vec<_>>(),
        "drawn, not in order of arrival"
    );
    assert_eq!(late.wait_for_status("admitted").await["status"], "admitted", "the later arrival goes in after");
    let (code, _, body) = late.open("/checkout").await;
    assert_eq!((code, body.as_str()), (StatusCode::OK, "upstream saw /checkout"));
}
