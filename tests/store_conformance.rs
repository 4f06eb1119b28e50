//! The line's store operations behave the same on every store: each behaviour is written once
//! and run against the memory store and against a Redis of the test's own. Time is passed in.

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;
use vestibule::line::{Gone, Joined, Limits, Redeemed};
use vestibule::store::{RedisStore, Store, StoreError};

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
    assert_eq!(store.advance(ROOM, &limits, 500).await.unwrap().granted, 0, "no budget yet");
    assert_eq!(store.advance(ROOM, &limits, 1_000).await.unwrap().granted, 1, "one turn a second");
    assert!(matches!(store.redeem(ROOM, &limits, 2, 1_000).await.unwrap(), Redeemed::Admitted { .. }));
    store.touch(ROOM, &limits, &[3, 4], 5_000).await.unwrap();
    assert_eq!(store.advance(ROOM, &limits, 5_000).await.unwrap().granted, 0, "two sessions fill the room");
    assert!(store.release(ROOM, &limits, 1, 100).await.unwrap());
    assert!(!store.release(ROOM, &limits, 1, 100).await.unwrap(), "a session ends once");
    assert_eq!(store.advance(ROOM, &limits, 5_000).await.unwrap().granted, 1, "the freed place goes to ticket 3");
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
    assert_eq!(store.redeem(ROOM, &limits, 0, 1_001).await.unwrap(), Redeemed::Gone(Gone::Unknown));
}

async fn unredeemed_grants_lapse(store: Store) {
    let limits = limits(600, 1);
    store.join(ROOM, &limits, true, 0).await.unwrap();
    store.join(ROOM, &limits, true, 0).await.unwrap();
    store.release(ROOM, &limits, 1, 100).await.unwrap();
    assert_eq!(store.advance(ROOM, &limits, 100).await.unwrap().granted, 1);
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
    store.touch(ROOM, &limits, &[4], 100_000).await.unwrap();
    assert_eq!(store.advance(ROOM, &limits, 130_000).await.unwrap().granted, 1, "only ticket 4 is granted");
    assert_eq!(store.redeem(ROOM, &limits, 2, 130_000).await.unwrap(), Redeemed::Gone(Gone::Left));
    assert_eq!(store.redeem(ROOM, &limits, 3, 130_000).await.unwrap(), Redeemed::Gone(Gone::Left));
    assert!(matches!(store.redeem(ROOM, &limits, 4, 130_000).await.unwrap(), Redeemed::Admitted { .. }));
}

async fn sessions_renew_and_expire(store: Store) {
    let limits = Limits { session_ms: 10_000, ..limits(60, 1) };
    store.join(ROOM, &limits, true, 0).await.unwrap();
    assert!(store.renew(ROOM, &limits, 1, 20_000, 5_000).await.unwrap());
    assert_eq!(store.stats(ROOM, &limits, 15_000).await.unwrap().active, 1, "renewed past its first end");
    assert_eq!(store.stats(ROOM, &limits, 20_000).await.unwrap().active, 0, "then it ends");
    assert!(!store.renew(ROOM, &limits, 1, 40_000, 25_000).await.unwrap(), "an ended session is not renewed");
}

async fn five_minutes_of_admissions_follow_the_rate(store: Store) {
    let limits = Limits { abandon_ms: u64::MAX / 4, ..limits(120, 100_000) };
    for _ in 0..700 {
        store.join(ROOM, &limits, true, 0).await.unwrap();
    }
    let mut granted = 0;
    for step in 1..=3_000u64 {
        granted += store.advance(ROOM, &limits, step * 100).await.unwrap().granted;
    }
    // The bucket started with two turns, one spent at join; then 2 a second for 300 s.
    let expected = 1 + 2 * 300;
    assert!(granted.abs_diff(expected) <= expected / 100, "{granted} vs {expected}");
    let rate = store.stats(ROOM, &limits, 300_000).await.unwrap().rate_per_second.unwrap();
    assert!((rate - 2.0).abs() < 0.1, "{rate}");
}

async fn redis_store(server: &RedisServer) -> Store {
    let store = RedisStore::connect(&server.url(), Duration::from_secs(2), Duration::from_secs(2))
        .await
        .expect("connect to the test's redis-server");
    Store::Redis(Box::new(store))
}

/// Empty the test's own Redis, as a restart without persistence would.
async fn flush(server: &RedisServer) {
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    ::redis::cmd("FLUSHALL").exec_async(&mut connection).await.unwrap();
}

#[tokio::test]
async fn a_line_redis_lost_is_restored_without_losing_places_or_capacity() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let limits = Limits { abandon_ms: 600_000, ..limits(60, 1) };
    assert!(matches!(store.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Admitted { ticket: 1, .. }));
    for _ in 2..=5 {
        store.join(ROOM, &limits, true, 0).await.unwrap();
    }
    let before = store.stats(ROOM, &limits, 10).await.unwrap();
    flush(&server).await;

    // The first call after the loss restores the line; joins wait while instances merge.
    assert_eq!(store.join(ROOM, &limits, true, 1_000).await, Err(StoreError::Restoring));
    let after = store.stats(ROOM, &limits, 1_000).await.unwrap();
    assert_ne!(after.epoch, before.epoch, "a restored line has a new epoch");
    assert_eq!((after.cursor, after.last_ticket, after.active), (1, 5, 1), "counters and the taken place are back");
    assert_eq!(store.join(ROOM, &limits, true, 3_000).await.unwrap(), Joined::Waiting { ticket: 6 }, "after everyone");
    assert_eq!(store.redeem(ROOM, &limits, 3, 3_000).await.unwrap(), Redeemed::Waiting { position: 2 });

    store.touch(ROOM, &limits, &[2], 4_000).await.unwrap(); // ticket 2's page is still open

    // The session of the lost line still holds its place: no mass admission.
    assert_eq!(store.advance(ROOM, &limits, 5_000).await.unwrap().granted, 0, "the room is still full");
    assert!(store.renew(ROOM, &limits, 1, 600_000, 5_000).await.unwrap(), "its holder renews it");
    assert_eq!(store.stats(ROOM, &limits, 5_000).await.unwrap().active, 1, "taken over, not counted twice");
    assert!(store.release(ROOM, &limits, 1, 6_000).await.unwrap());
    assert_eq!(store.advance(ROOM, &limits, 7_000).await.unwrap().granted, 1, "ticket 2, seen again, is next");
    assert!(matches!(store.redeem(ROOM, &limits, 2, 7_000).await.unwrap(), Redeemed::Admitted { .. }));
    assert!(store.release(ROOM, &limits, 2, 8_000).await.unwrap());
    assert_eq!(store.advance(ROOM, &limits, 9_000).await.unwrap().granted, 1, "then ticket 3");
    assert!(matches!(store.redeem(ROOM, &limits, 3, 9_000).await.unwrap(), Redeemed::Admitted { .. }));
    assert!(store.release(ROOM, &limits, 3, 9_000).await.unwrap());
    // Tickets 4 and 5 have not been seen since the loss: the line waits for them a while...
    assert_eq!(store.advance(ROOM, &limits, 10_000).await.unwrap().granted, 0);
    // ...then skips them; ticket 6 (joined after the loss) is next.
    assert_eq!(store.advance(ROOM, &limits, 40_000).await.unwrap().granted, 1);
    assert_eq!(store.redeem(ROOM, &limits, 4, 40_000).await.unwrap(), Redeemed::Gone(Gone::Left));
    assert!(matches!(store.redeem(ROOM, &limits, 6, 40_000).await.unwrap(), Redeemed::Admitted { .. }));
}

#[tokio::test]
async fn every_instance_merges_what_it_knew_into_a_restored_line() {
    let server = RedisServer::start();
    let (one, two) = (redis_store(&server).await, redis_store(&server).await);
    let limits = limits(60, 10);
    one.join(ROOM, &limits, false, 0).await.unwrap();
    one.stats(ROOM, &limits, 0).await.unwrap(); // one knows tickets up to 1
    two.join(ROOM, &limits, false, 0).await.unwrap();
    two.join(ROOM, &limits, false, 0).await.unwrap(); // two knows tickets up to 3
    two.stats(ROOM, &limits, 0).await.unwrap();
    flush(&server).await;

    assert_eq!(one.stats(ROOM, &limits, 100).await.unwrap().last_ticket, 1, "one restores what it knew");
    assert_eq!(two.stats(ROOM, &limits, 200).await.unwrap().last_ticket, 3, "two merges what it knew");
    // A ticket handed out just before the loss, known to no instance, keeps its place too.
    assert_eq!(one.redeem(ROOM, &limits, 4, 300).await.unwrap(), Redeemed::Waiting { position: 4 });
    assert_eq!(one.join(ROOM, &limits, false, 3_000).await.unwrap(), Joined::Waiting { ticket: 5 });
}

#[tokio::test]
async fn an_ended_session_is_kept_for_instances_that_missed_its_announcement() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let Store::Redis(redis) = &store else { unreachable!() };
    let limits = limits(60, 10);
    store.join(ROOM, &limits, true, 0).await.unwrap();
    assert!(store.release(ROOM, &limits, 1, 1_000).await.unwrap());
    assert_eq!(redis.ended_sessions(ROOM, 2_000).await.unwrap(), vec![1], "until the session would have expired");
    assert!(redis.ended_sessions(ROOM, limits.session_ms + 1).await.unwrap().is_empty(), "then forgotten");
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
                    super::$behaviour(super::redis_store(&server).await).await;
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
