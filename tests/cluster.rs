//! The same line on a Redis Cluster of three masters (each with a replica) on loopback: two
//! instances share it, and the master holding the room is killed and its replica promoted.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::redis_server::RedisCluster;
use common::visitor::{feed_until, Visitor};
use common::*;
use http::StatusCode;
use vestibule::config::Config;
use vestibule::server::{self, Running};

async fn instance(cluster: &RedisCluster, upstream: SocketAddr, key: &Path, dir: &Path) -> Running {
    let urls: Vec<String> = cluster.urls().iter().map(|url| format!("{url:?}")).collect();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n[upstream]\nurl = \"http://{upstream}\"\n\
         [store]\nkind = \"redis-cluster\"\nurls = [{}]\n[tokens]\nsigning_key = {key:?}\n\
         [[rooms]]\nid = \"checkout\"\npaths = [\"/checkout\"]\nadmit_per_minute = 600\nmax_active = 1\n",
        urls.join(", ")
    );
    let config = Config::parse(&text, "instance.toml", dir).unwrap();
    server::start(&config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_line_runs_on_a_cluster_and_survives_a_master_failover() {
    let mut cluster = RedisCluster::start();
    let (upstream_addr, upstream) = start_upstream().await;
    let dir = TempDir::new("cluster");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa)).unwrap();
    let one = instance(&cluster, upstream_addr, &key, dir.path()).await;
    let two = instance(&cluster, upstream_addr, &key, dir.path()).await;

    // One line and one capacity across both instances.
    let mut inside = Visitor::new(one.addr);
    assert_eq!(inside.open("/checkout").await.0, StatusCode::OK);
    let mut first = Visitor::new(two.addr);
    first.open("/checkout").await;
    let mut second = Visitor::new(one.addr);
    second.open("/checkout").await;
    assert_eq!(upstream.requests().len(), 1, "the room holds one");
    let mut feed = first.feed().await;
    while feed_until(&mut feed, "position").await["position"] != 1 {}

    // The master holding the room dies; its replica takes over.
    let master = cluster.master_of("vestibule:{checkout}:line").expect("a master serves the room");
    cluster.nodes[master].kill();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while cluster.master_of("vestibule:{checkout}:line").is_none_or(|now| now == master) {
        assert!(std::time::Instant::now() < deadline, "no replica was promoted");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    cluster.wait_until_ok();
    let answering = tokio::time::Instant::now();

    // The line is still there: places kept, the token still passes, and the next turn goes
    // to the first in line when the place frees, within seconds of the store answering.
    inside.addr = two.addr;
    assert_eq!(inside.open("/checkout/pay").await.0, StatusCode::OK);
    inside.leave().await;
    feed_until(&mut feed, "admitted").await;
    let moved = answering.elapsed();
    assert!(moved < std::time::Duration::from_secs(5), "the line moved {moved:?} after the failover");
    assert_eq!(first.open("/checkout").await.0, StatusCode::OK);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while second.status().await["position"] != 1 {
        assert!(tokio::time::Instant::now() < deadline, "the second visitor never moved up");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
