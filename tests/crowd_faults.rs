//! A crowd through the faults of the failure policy (docs/design.md), as an operator meets them during a sale:
//! three instances on one Redis, visitors arriving from their own addresses and leaving a
//! second after admission, while Redis is frozen and later restarted empty. Every visitor keeps
//! their place, the room never holds more than its places, the line stays in order, and it
//! moves again within seconds of each recovery.

mod common;

use std::path::Path;
use std::time::Duration;

use common::redis_server::RedisServer;
use common::*;
use vestibule::config::Config;
use vestibule::loadtest::{self, Options, RoomLimits};
use vestibule::server;

/// A room of 20 places at 1 200 a minute.
const ROOM: RoomLimits = RoomLimits { admit_per_minute: 1200, max_active: 20 };

fn config_text(redis: &RedisServer, upstream: std::net::SocketAddr, key: &Path) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n[upstream]\nurl = \"http://{upstream}\"\n\
         [store]\nkind = \"redis\"\nurl = \"{}\"\n[tokens]\nsigning_key = {key:?}\n\
         [[rooms]]\nid = \"checkout\"\npaths = [\"/checkout\"]\nadmit_per_minute = {}\nmax_active = {}\n",
        redis.url(),
        ROOM.admit_per_minute,
        ROOM.max_active,
    )
}

/// Note a moment the line should recover from, as `vestibule loadtest --marks` reads it.
fn mark(file: &Path, label: &str) {
    use std::io::Write;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let mut marks = std::fs::OpenOptions::new().create(true).append(true).open(file).unwrap();
    writeln!(marks, "{now} {label}").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_keeps_every_place_through_a_frozen_then_emptied_redis() {
    let mut redis = RedisServer::start();
    let (upstream_addr, _upstream) = start_upstream().await;
    let dir = TempDir::new("crowd-faults");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa)).unwrap();
    let config = Config::parse(&config_text(&redis, upstream_addr, &key), "crowd.toml", dir.path()).unwrap();
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(server::start(&config).await.unwrap());
    }

    // 15 arrivals a second for 20 s, each visitor staying a second once in: the places bind.
    let marks = dir.path().join("marks");
    let mut options = Options::new(instances[0].addr, 300, 15.0).unwrap();
    options.targets = instances.iter().map(|instance| instance.addr).collect();
    options.sources = Some("127.0.0.0/8".parse().unwrap());
    options.leave = true;
    options.hold = Duration::from_secs(1);
    options.patience = Duration::from_secs(90);
    options.configured = Some(ROOM);
    options.marks = Some(marks.clone());
    let started = tokio::time::Instant::now();
    let crowd = tokio::spawn(loadtest::run(options));

    // The fault schedule of the scenario: frozen for 3 s at 4 s, killed and restarted empty
    // at 12 s.
    tokio::time::sleep_until(started + Duration::from_secs(4)).await;
    redis.pause();
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.resume();
    mark(&marks, "thawed");
    tokio::time::sleep_until(started + Duration::from_secs(12)).await;
    redis.kill();
    redis.restart();
    mark(&marks, "restarted empty");

    let report = crowd.await.unwrap().unwrap();
    loadtest::print(&report);
    assert!(report.errors.is_empty(), "errors: {:?}", report.errors);
    assert_eq!(report.places_lost, 0, "places lost: {:?}", report.lost);
    assert_eq!((report.visitors, report.admitted), (300, 300));
    assert_eq!(report.fifo_inversions, 0);
    assert_eq!(report.capacity_overshoot, Some(0));
    assert_eq!(report.recoveries.len(), 2, "{:?}", report.recoveries);
    for recovery in &report.recoveries {
        let after = recovery.next_admission_after.expect("a turn after each recovery");
        assert!(after < 5.0, "the line moved {after:.2} s after {}", recovery.label);
    }
    for instance in &instances {
        instance.shutdown();
    }
}
