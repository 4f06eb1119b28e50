//! The line's store operations behave the same on every store: each behaviour is written once
//! and run against the memory store and against a Redis of the test's own. Time is passed in.

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;
use vestibule::line::{Gone, Joined, Limits, Redeemed};
use vestibule::store::{RedisStore, Store};

const ROOM: &str = "checkout";

fn limits(admit_per_minute: u32, max_active: u32) -> Limits {
    Limits { admit_per_minute, max_active, grant_ms: 120_000, session_ms: 600_000, abandon_ms: 120_000 }
}

async fn idle_admission_then_join_order(store: Store) {
    let limits = limits(60, 10);
    assert!(matches!(store.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Admitted { ticket: 1, .. }));
    assert_eq!(store.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Waiting { ticket: 2 });
    assert_eq!(store.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Waiting { ticket: 3 });
    assert_eq!(store.redeem(ROOM, &limits, 3, 0).await.unwrap(), Redeemed::Waiting { position: 2 });
    // A paused room admits nobody at join, even when idle.
    let other = limits;
    assert_eq!(store.join("other", &other, false, 0).await.unwrap(), Joined::Waiting { ticket: 1 });
}

async fn rate_and_capacity_bound_grants(store: Store) {
    let limits = limits(60, 2);
    store.join(ROOM, &limits, true, 0).await.unwrap(); // ticket 1, a session
    for _ in 0..3 {
        store.join(ROOM, &limits, true, 0).await.unwrap(); // tickets 2, 3, 4 wait
    }
    assert_eq!(store.advance(ROOM, &limits, 500).await.unwrap(), 0, "no budget yet");
    assert_eq!(store.advance(ROOM, &limits, 1_000).await.unwrap(), 1, "one turn a second");
    assert!(matches!(store.redeem(ROOM, &limits, 2, 1_000).await.unwrap(), Redeemed::Admitted { .. }));
    store.touch(ROOM, &[3, 4], 5_000).await.unwrap();
    assert_eq!(store.advance(ROOM, &limits, 5_000).await.unwrap(), 0, "two sessions fill the room");
    assert!(store.release(ROOM, 1).await.unwrap());
    assert!(!store.release(ROOM, 1).await.unwrap(), "a session ends once");
    assert_eq!(store.advance(ROOM, &limits, 5_000).await.unwrap(), 1, "the freed place goes to ticket 3");
    let stats = store.stats(ROOM, &limits, 5_000).await.unwrap();
    assert_eq!((stats.cursor, stats.last_ticket, stats.active, stats.outstanding), (3, 4, 1, 1));
}

async fn a_ticket_is_redeemed_once_and_unknown_ones_are_refused(store: Store) {
    let limits = limits(60, 10);
    store.join(ROOM, &limits, true, 0).await.unwrap();
    store.join(ROOM, &limits, true, 0).await.unwrap();
    store.advance(ROOM, &limits, 1_000).await.unwrap();
    assert!(matches!(store.redeem(ROOM, &limits, 2, 1_000).await.unwrap(), Redeemed::Admitted { .. }));
    assert_eq!(store.redeem(ROOM, &limits, 2, 1_001).await.unwrap(), Redeemed::Gone(Gone::Used));
    assert_eq!(store.redeem(ROOM, &limits, 9, 1_001).await.unwrap(), Redeemed::Gone(Gone::Unknown));
}

async fn unredeemed_grants_lapse(store: Store) {
    let limits = limits(600, 1);
    store.join(ROOM, &limits, true, 0).await.unwrap();
    store.join(ROOM, &limits, true, 0).await.unwrap();
    store.release(ROOM, 1).await.unwrap();
    assert_eq!(store.advance(ROOM, &limits, 100).await.unwrap(), 1);
    let later = 100 + limits.grant_ms;
    assert_eq!(store.redeem(ROOM, &limits, 2, later).await.unwrap(), Redeemed::Gone(Gone::Lapsed));
    assert_eq!(store.stats(ROOM, &limits, later).await.unwrap().outstanding, 0, "the place is free again");
}

async fn leavers_and_absent_waiters_are_skipped(store: Store) {
    let limits = limits(60, 10);
    store.join(ROOM, &limits, true, 0).await.unwrap();
    for _ in 0..3 {
        store.join(ROOM, &limits, true, 0).await.unwrap(); // 2, 3, 4
    }
    store.leave(ROOM, &limits, 2, 0).await.unwrap();
    store.touch(ROOM, &[4], 100_000).await.unwrap();
    assert_eq!(store.advance(ROOM, &limits, 130_000).await.unwrap(), 1, "only ticket 4 is granted");
    assert_eq!(store.redeem(ROOM, &limits, 2, 130_000).await.unwrap(), Redeemed::Gone(Gone::Left));
    assert_eq!(store.redeem(ROOM, &limits, 3, 130_000).await.unwrap(), Redeemed::Gone(Gone::Left));
    assert!(matches!(store.redeem(ROOM, &limits, 4, 130_000).await.unwrap(), Redeemed::Admitted { .. }));
}

async fn sessions_renew_and_expire(store: Store) {
    let limits = Limits { session_ms: 10_000, ..limits(60, 1) };
    store.join(ROOM, &limits, true, 0).await.unwrap();
    assert!(store.renew(ROOM, 1, 20_000).await.unwrap());
    assert_eq!(store.stats(ROOM, &limits, 15_000).await.unwrap().active, 1, "renewed past its first end");
    assert_eq!(store.stats(ROOM, &limits, 20_000).await.unwrap().active, 0, "then it ends");
    assert!(!store.renew(ROOM, 1, 40_000).await.unwrap(), "an ended session is not renewed");
}

async fn five_minutes_of_admissions_follow_the_rate(store: Store) {
    let limits = Limits { abandon_ms: u64::MAX / 4, ..limits(120, 100_000) };
    for _ in 0..700 {
        store.join(ROOM, &limits, true, 0).await.unwrap();
    }
    let mut granted = 0;
    for step in 1..=3_000u64 {
        granted += store.advance(ROOM, &limits, step * 100).await.unwrap();
    }
    // The bucket started with two turns, one spent at join; then 2 a second for 300 s.
    let expected = 1 + 2 * 300;
    assert!(granted.abs_diff(expected) <= expected / 100, "{granted} vs {expected}");
    let rate = store.stats(ROOM, &limits, 300_000).await.unwrap().rate_per_second.unwrap();
    assert!((rate - 2.0).abs() < 0.1, "{rate}");
}

/// Each behaviour as a test on each store.
macro_rules! on_every_store {
    ($($behaviour:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    super::$behaviour(vestibule::store::Store::memory()).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $behaviour() {
                    let server = super::RedisServer::start();
                    let store = super::RedisStore::connect(
                        &server.url(),
                        super::Duration::from_secs(2),
                        super::Duration::from_secs(2),
                    )
                    .await
                    .expect("connect to the test's redis-server");
                    super::$behaviour(super::Store::Redis(Box::new(store))).await;
                }
            )*
        }
    };
}

on_every_store!(
    idle_admission_then_join_order,
    rate_and_capacity_bound_grants,
    a_ticket_is_redeemed_once_and_unknown_ones_are_refused,
    unredeemed_grants_lapse,
    leavers_and_absent_waiters_are_skipped,
    sessions_renew_and_expire,
    five_minutes_of_admissions_follow_the_rate,
);
