//! The line's store operations behave the same on every store: each behaviour is written once
//! and run against the memory store and against a Redis of the test's own. Time is passed in.

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;
use vestibule::line::{
    Absence, Gone, Joined, Limits, Prequeued, Redeemed, Seated, CONFIRM_MS, MAX_SKIPS, RESEE_MS, SEATED_SEE_MS,
};
use vestibule::room::settings::Overrides;
use vestibule::store::{RedisStore, Store, StoreError};

const ROOM: &str = "checkout";
const JUDGE: Absence = Absence::Judge;

fn limits(admit_per_minute: u32, max_active: u32) -> Limits {
    Limits {
        admit_per_minute,
        max_active,
        grant_ms: 120_000,
        session_ms: 600_000,
        abandon_ms: 120_000,
        idle_ms: 300_000,
        max_waiting: 0,
        adaptive_per_minute: 0,
    }
}

/// Join `count` visitors, each confirmed at once by its instance (as the gate does when it
/// answers a join); their tickets.
async fn join_confirmed(store: &Store, limits: &Limits, count: usize, now: u64) -> Vec<u64> {
    let mut tickets = Vec::new();
    for _ in 0..count {
        tickets.push(store.join(ROOM, limits, true, now).await.unwrap().ticket());
    }
    store.touch(ROOM, limits, &tickets, &[], now).await.unwrap();
    tickets
}

async fn idle_admission_then_join_order(store: Store) {
    let limits = limits(60, 10);
    assert!(matches!(store.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Admitted { ticket: 1, .. }));
    assert_eq!(store.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Waiting { ticket: 2 });
    assert_eq!(store.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Waiting { ticket: 3 });
    assert_eq!(store.redeem(ROOM, &limits, 3, 0, JUDGE).await.unwrap(), Redeemed::Waiting { position: 2 });
    // A paused room admits nobody at join, even when idle.
    let other = limits;
    assert_eq!(store.join("other", &other, false, 0).await.unwrap(), Joined::Waiting { ticket: 1 });
}

async fn rate_and_capacity_bound_grants(store: Store) {
    let limits = limits(60, 2);
    join_confirmed(&store, &limits, 4, 0).await; // ticket 1 a session; 2, 3, 4 wait
    assert_eq!(store.advance(ROOM, &limits, 500, JUDGE).await.unwrap().granted, 0, "no budget yet");
    assert_eq!(store.advance(ROOM, &limits, 1_000, JUDGE).await.unwrap().granted, 1, "one turn a second");
    assert!(matches!(store.redeem(ROOM, &limits, 2, 1_000, JUDGE).await.unwrap(), Redeemed::Admitted { .. }));
    store.touch(ROOM, &limits, &[3, 4], &[], 5_000).await.unwrap();
    assert_eq!(store.advance(ROOM, &limits, 5_000, JUDGE).await.unwrap().granted, 0, "two sessions fill the room");
    assert!(store.release(ROOM, &limits, 1, 600_000, 100).await.unwrap());
    assert!(!store.release(ROOM, &limits, 1, 600_000, 100).await.unwrap(), "a session ends once");
    assert_eq!(store.advance(ROOM, &limits, 5_000, JUDGE).await.unwrap().granted, 1, "the freed place goes to 3");
    let stats = store.stats(ROOM, &limits, 5_000).await.unwrap();
    assert_eq!((stats.cursor, stats.last_ticket, stats.active, stats.outstanding), (3, 4, 1, 1));
}

async fn a_ticket_is_redeemed_once_and_unknown_ones_are_refused(store: Store) {
    let limits = limits(60, 10);
    join_confirmed(&store, &limits, 2, 0).await;
    store.advance(ROOM, &limits, 1_000, JUDGE).await.unwrap();
    assert!(matches!(store.redeem(ROOM, &limits, 2, 1_000, JUDGE).await.unwrap(), Redeemed::Admitted { .. }));
    // Until the session is used, a second presentation waits (it may be the holder whose
    // answer was lost); then the ticket is spent.
    assert_eq!(store.redeem(ROOM, &limits, 2, 1_000, JUDGE).await.unwrap(), Redeemed::Pending);
    store.touch(ROOM, &limits, &[], &[(2, 601_000)], 1_000).await.unwrap();
    assert_eq!(store.redeem(ROOM, &limits, 2, 1_001, JUDGE).await.unwrap(), Redeemed::Gone(Gone::Used));
    assert_eq!(store.redeem(ROOM, &limits, 0, 1_001, JUDGE).await.unwrap(), Redeemed::Gone(Gone::Unknown));
}

async fn unredeemed_grants_lapse(store: Store) {
    let limits = limits(600, 1);
    join_confirmed(&store, &limits, 2, 0).await;
    store.release(ROOM, &limits, 1, 600_000, 100).await.unwrap();
    assert_eq!(store.advance(ROOM, &limits, 100, JUDGE).await.unwrap().granted, 1);
    let later = 100 + limits.grant_ms;
    assert_eq!(store.redeem(ROOM, &limits, 2, later, JUDGE).await.unwrap(), Redeemed::Gone(Gone::Lapsed));
    assert_eq!(store.stats(ROOM, &limits, later).await.unwrap().outstanding, 0, "the place is free again");
}

async fn leavers_and_absent_waiters_are_skipped(store: Store) {
    let limits = limits(60, 10);
    join_confirmed(&store, &limits, 4, 0).await; // 1 a session; 2, 3, 4 wait
    store.leave(ROOM, &limits, 2, 0).await.unwrap();
    store.touch(ROOM, &limits, &[4], &[], 100_000).await.unwrap();
    assert_eq!(store.advance(ROOM, &limits, 130_000, JUDGE).await.unwrap().granted, 1, "only ticket 4 is granted");
    assert_eq!(store.redeem(ROOM, &limits, 2, 130_000, JUDGE).await.unwrap(), Redeemed::Gone(Gone::Left));
    assert_eq!(store.redeem(ROOM, &limits, 3, 130_000, JUDGE).await.unwrap(), Redeemed::Gone(Gone::Left));
    assert!(matches!(store.redeem(ROOM, &limits, 4, 130_000, JUDGE).await.unwrap(), Redeemed::Admitted { .. }));
}

async fn absence_is_excused_while_the_instances_catch_up(store: Store) {
    let limits = limits(60, 10);
    join_confirmed(&store, &limits, 3, 0).await; // 1 a session; 2, 3 wait, last seen at 0
    store.touch(ROOM, &limits, &[3], &[], 100_000).await.unwrap();
    // At 130 s ticket 2 looks gone, but the store was away until a moment ago: it may yet be
    // reported. The line waits for it rather than skip it.
    let excused = store.advance(ROOM, &limits, 130_000, Absence::Excuse).await.unwrap();
    assert_eq!((excused.granted, excused.stats.cursor), (0, 1));
    assert!(matches!(
        store.redeem(ROOM, &limits, 2, 130_000, Absence::Excuse).await.unwrap(),
        Redeemed::Waiting { .. }
    ));
    // Presenting it was being seen: ticket 2 is granted once absence is judged.
    assert_eq!(store.advance(ROOM, &limits, 131_000, JUDGE).await.unwrap().granted, 1);
    assert!(matches!(store.redeem(ROOM, &limits, 2, 131_000, JUDGE).await.unwrap(), Redeemed::Admitted { .. }));
}

async fn a_ticket_nobody_confirmed_is_skipped(store: Store) {
    let limits = limits(60, 10);
    store.join(ROOM, &limits, true, 0).await.unwrap(); // a session
                                                       // Ticket 2's join ran in the store but its answer never reached anyone; 3 was answered.
    store.join(ROOM, &limits, true, 0).await.unwrap();
    let third = store.join(ROOM, &limits, true, 0).await.unwrap().ticket();
    store.touch(ROOM, &limits, &[third], &[], 0).await.unwrap();
    assert_eq!(store.advance(ROOM, &limits, CONFIRM_MS, JUDGE).await.unwrap().granted, 1);
    assert_eq!(store.redeem(ROOM, &limits, 2, CONFIRM_MS, JUDGE).await.unwrap(), Redeemed::Gone(Gone::Left));
    assert!(matches!(store.redeem(ROOM, &limits, third, CONFIRM_MS, JUDGE).await.unwrap(), Redeemed::Admitted { .. }));
}

async fn idle_sessions_end_and_free_their_place(store: Store) {
    let limits = Limits { idle_ms: 60_000, ..limits(60, 2) };
    let [first, second] = join_confirmed(&store, &limits, 2, 0).await[..] else { unreachable!() };
    store.advance(ROOM, &limits, 1_000, JUDGE).await.unwrap();
    assert!(matches!(store.redeem(ROOM, &limits, second, 1_000, JUDGE).await.unwrap(), Redeemed::Admitted { .. }));
    let waiter = join_confirmed(&store, &limits, 1, 1_000).await[0];
    // The second session is in use; the first was never used again.
    store.touch(ROOM, &limits, &[waiter], &[(second, 601_000)], 50_000).await.unwrap();
    let step = store.advance(ROOM, &limits, 61_000, JUDGE).await.unwrap();
    assert_eq!(step.ended, vec![(first, limits.session_ms)], "the idle session ends, with its expiry");
    assert_eq!(step.granted, 1, "and its place goes to the waiter");
    // Not while absence is excused.
    let step = store.advance(ROOM, &limits, 200_000, Absence::Excuse).await.unwrap();
    assert!(step.ended.is_empty(), "{step:?}");
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
    join_confirmed(&store, &limits, 700, 0).await;
    let mut granted = 0;
    for step in 1..=3_000u64 {
        granted += store.advance(ROOM, &limits, step * 100, JUDGE).await.unwrap().granted;
    }
    // The bucket started with two turns, one spent at join; then 2 a second for 300 s.
    let expected = 1 + 2 * 300;
    assert!(granted.abs_diff(expected) <= expected / 100, "{granted} vs {expected}");
    let rate = store.stats(ROOM, &limits, 300_000).await.unwrap().rate_per_second.unwrap();
    assert!((rate - 2.0).abs() < 0.1, "{rate}");
}

async fn a_lagging_clock_credits_no_extra_turns(store: Store) {
    let limits = Limits { abandon_ms: u64::MAX / 4, ..limits(600, 100_000) };
    join_confirmed(&store, &limits, 2_000, 0).await;
    let mut granted = 0;
    for step in 1..=100u64 {
        let now = 10_000 + step * 100;
        granted += store.advance(ROOM, &limits, now, JUDGE).await.unwrap().granted;
        // Between two steps of the leader, a join at an instance whose clock is 5 s behind.
        store.join(ROOM, &limits, true, now - 5_000).await.unwrap();
    }
    // 10 s at 10 a second (the bucket, full from the wait, adds one second's worth).
    assert!(granted <= 100 + 10 + 1, "{granted} turns in 10 s at 600 a minute");
}

async fn a_step_skips_a_bounded_number_of_leavers(store: Store) {
    let limits = limits(60, 10);
    let tickets = join_confirmed(&store, &limits, MAX_SKIPS * 2 + 2, 0).await;
    for ticket in &tickets[1..tickets.len() - 1] {
        store.leave(ROOM, &limits, *ticket, 0).await.unwrap();
    }
    let first = store.advance(ROOM, &limits, 1_000, JUDGE).await.unwrap();
    assert_eq!((first.granted, first.stats.cursor), (0, 1 + MAX_SKIPS as u64), "one bounded step");
    store.advance(ROOM, &limits, 1_100, JUDGE).await.unwrap();
    let third = store.advance(ROOM, &limits, 1_200, JUDGE).await.unwrap();
    assert_eq!(third.granted, 1, "the next steps carry on to the last visitor");
    assert_eq!(third.stats.cursor, *tickets.last().unwrap());
}

async fn a_ticket_beyond_the_last_keeps_its_place(store: Store) {
    let limits = limits(60, 10);
    join_confirmed(&store, &limits, 2, 0).await; // 1 a session, 2 waits
                                                 // Ticket 6 was given out by an earlier life of the line (it is signed): it keeps its place.
    assert_eq!(store.redeem(ROOM, &limits, 6, 100, JUDGE).await.unwrap(), Redeemed::Waiting { position: 5 });
    assert_eq!(store.join(ROOM, &limits, true, 100).await.unwrap(), Joined::Waiting { ticket: 7 });
    // A holder of a ticket in between, reported seen, keeps theirs; the others are skipped once
    // they have had the time to be reported.
    store.touch(ROOM, &limits, &[4], &[], 200).await.unwrap();
    store.advance(ROOM, &limits, 1_000, JUDGE).await.unwrap(); // ticket 2
    assert!(matches!(store.redeem(ROOM, &limits, 4, 1_000, JUDGE).await.unwrap(), Redeemed::Waiting { .. }));
    let cursor = store.advance(ROOM, &limits, 2_000, JUDGE).await.unwrap().stats.cursor;
    assert_eq!(cursor, 2, "tickets 3 and 5 may still be reported: the line waits");
    let step = store.advance(ROOM, &limits, 100 + RESEE_MS, JUDGE).await.unwrap();
    assert_eq!((step.granted, step.stats.cursor), (1, 4), "3 skipped, 4 granted");
}

async fn a_full_line_takes_no_ticket_until_a_place_frees(store: Store) {
    let limits = Limits { max_waiting: 3, ..limits(60, 1) };
    join_confirmed(&store, &limits, 4, 0).await; // 1 a session; 2, 3, 4 wait: the line is full
    assert_eq!(store.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Full);
    assert_eq!(store.join(ROOM, &limits, false, 0).await.unwrap(), Joined::Full);
    let stats = store.stats(ROOM, &limits, 0).await.unwrap();
    assert_eq!((stats.last_ticket, stats.waiting), (4, 3), "a refused join takes no ticket");
    // A waiter who says they leave frees a place at once, before the line reaches them.
    store.leave(ROOM, &limits, 3, 0).await.unwrap();
    assert_eq!(store.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Waiting { ticket: 5 });
    assert_eq!(store.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Full);
    // So does a turn granted: the session ends, ticket 2 is granted, ticket 6 may join.
    store.release(ROOM, &limits, 1, 600_000, 100).await.unwrap();
    assert_eq!(store.advance(ROOM, &limits, 1_000, JUDGE).await.unwrap().granted, 1);
    assert_eq!(store.join(ROOM, &limits, true, 1_000).await.unwrap(), Joined::Waiting { ticket: 6 });
    assert_eq!(store.join(ROOM, &limits, true, 1_000).await.unwrap(), Joined::Full);
    // Holders of tickets keep their places: a full line refuses only newcomers.
    assert!(matches!(store.redeem(ROOM, &limits, 6, 1_000, JUDGE).await.unwrap(), Redeemed::Waiting { .. }));
    // Without a limit, the same line takes everyone.
    let open = Limits { max_waiting: 0, ..limits };
    assert_eq!(store.join(ROOM, &open, true, 1_000).await.unwrap(), Joined::Waiting { ticket: 7 });
}

async fn a_full_line_counts_only_waiters_still_here(store: Store) {
    let limits = Limits { max_waiting: 3, ..limits(60, 1) }; // abandon_ms 120 s
    store.join(ROOM, &limits, true, 0).await.unwrap(); // a session
                                                       // Three joins nobody confirms (a client without cookies, say): the line is full...
    for _ in 0..3 {
        store.join(ROOM, &limits, true, 0).await.unwrap();
    }
    assert_eq!(store.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Full);
    // ...until they count as held by nobody (CONFIRM_MS), long before the line reaches them.
    let waiter = store.join(ROOM, &limits, true, CONFIRM_MS).await.unwrap();
    assert_eq!(waiter, Joined::Waiting { ticket: 5 });
    store.touch(ROOM, &limits, &[5], &[], CONFIRM_MS).await.unwrap();
    for ticket in [6, 7] {
        assert_eq!(store.join(ROOM, &limits, true, CONFIRM_MS).await.unwrap(), Joined::Waiting { ticket });
    }
    store.touch(ROOM, &limits, &[6, 7], &[], CONFIRM_MS).await.unwrap();
    assert_eq!(store.join(ROOM, &limits, true, CONFIRM_MS).await.unwrap(), Joined::Full);
    // Seen again, 5 and 6 stay; 7, not seen for abandon_ms, has left.
    let later = CONFIRM_MS + 120_000;
    store.touch(ROOM, &limits, &[5, 6], &[], later - 1).await.unwrap();
    assert_eq!(store.join(ROOM, &limits, true, later).await.unwrap(), Joined::Waiting { ticket: 8 });
    assert_eq!(store.join(ROOM, &limits, true, later).await.unwrap(), Joined::Full);
}

async fn the_adaptive_rate_binds_grants_below_admit_per_minute(store: Store) {
    // The leader decided 60 a minute where the room says 600: one turn a second, not ten.
    let slow = Limits { adaptive_per_minute: 60, ..limits(600, 1_000) };
    join_confirmed(&store, &slow, 40, 0).await;
    let first = store.advance(ROOM, &slow, 1_000, JUDGE).await.unwrap();
    assert_eq!((first.granted, first.stats.adaptive_per_minute), (1, Some(60)));
    assert_eq!(store.advance(ROOM, &slow, 2_000, JUDGE).await.unwrap().granted, 1);
    // Never above admit_per_minute, whatever the leader says.
    let above = Limits { adaptive_per_minute: 6_000, ..limits(600, 1_000) };
    let step = store.advance(ROOM, &above, 3_000, JUDGE).await.unwrap();
    assert_eq!((step.granted, step.stats.adaptive_per_minute), (10, Some(600)));
    // The leader cleared it: the room's own rate again.
    let step = store.advance(ROOM, &limits(600, 1_000), 4_000, JUDGE).await.unwrap();
    assert_eq!((step.granted, step.stats.adaptive_per_minute), (10, None));
}

async fn redis_store(server: &RedisServer) -> Store {
    let store = RedisStore::connect(&server.url(), Duration::from_secs(2), Duration::from_secs(2))
        .await
        .expect("connect to the test's redis-server");
    let store = Store::Redis(Box::new(store));
    // An instance alive for the test's length, as its scheduler keeps it.
    store.hold_lease(ROOM, Duration::from_secs(60)).await.unwrap();
    store
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
    let limits = Limits { abandon_ms: 600_000, ..limits(600, 1) };
    let tickets = join_confirmed(&store, &limits, 5, 0).await; // 1 a session; 2 to 5 wait
    assert_eq!(tickets, [1, 2, 3, 4, 5]);
    let before = store.stats(ROOM, &limits, 10).await.unwrap();
    flush(&server).await;

    // The first call after the loss restores the line; joins wait while instances merge.
    assert_eq!(store.join(ROOM, &limits, true, 1_000).await, Err(StoreError::Restoring));
    let after = store.stats(ROOM, &limits, 1_000).await.unwrap();
    assert_ne!(after.epoch, before.epoch, "a restored line has a new epoch");
    assert_eq!((after.line, store.line(ROOM)), (before.line, before.line), "and is the same line");
    assert_ne!(before.line, 0);
    assert_eq!((after.cursor, after.last_ticket, after.active), (1, 5, 1), "counters and the taken place are back");
    assert_eq!(join_confirmed(&store, &limits, 1, 3_000).await, [6], "after everyone");
    assert_eq!(store.redeem(ROOM, &limits, 3, 3_000, JUDGE).await.unwrap(), Redeemed::Waiting { position: 2 });
    store.touch(ROOM, &limits, &[2], &[], 4_000).await.unwrap(); // ticket 2's page is still open

    // The session of the lost line still holds its place: no mass admission.
    assert_eq!(store.advance(ROOM, &limits, 5_000, JUDGE).await.unwrap().granted, 0, "the room is still full");
    assert!(store.renew(ROOM, &limits, 1, 600_000, 5_000).await.unwrap(), "its holder renews it");
    assert_eq!(store.stats(ROOM, &limits, 5_000).await.unwrap().active, 1, "taken over, not counted twice");
    assert!(store.release(ROOM, &limits, 1, 600_000, 5_100).await.unwrap());
    for (ticket, at) in [(2, 5_200), (3, 5_400)] {
        assert_eq!(store.advance(ROOM, &limits, at, JUDGE).await.unwrap().granted, 1, "ticket {ticket}, seen again");
        assert!(matches!(store.redeem(ROOM, &limits, ticket, at, JUDGE).await.unwrap(), Redeemed::Admitted { .. }));
        assert!(store.release(ROOM, &limits, ticket, 600_000, at + 50).await.unwrap());
    }
    // Tickets 4 and 5 have not been reported since the loss: the line waits for them a while...
    assert_eq!(store.advance(ROOM, &limits, 5_600, JUDGE).await.unwrap().granted, 0);
    // ...then skips them; ticket 6 (joined after the loss) is next.
    assert_eq!(store.advance(ROOM, &limits, 1_000 + RESEE_MS, JUDGE).await.unwrap().granted, 1);
    assert_eq!(store.redeem(ROOM, &limits, 4, 6_000, JUDGE).await.unwrap(), Redeemed::Gone(Gone::Left));
    assert!(matches!(store.redeem(ROOM, &limits, 6, 6_000, JUDGE).await.unwrap(), Redeemed::Admitted { .. }));
}

#[tokio::test]
async fn the_places_of_a_lost_line_end_once_their_holders_are_known_gone() {
    let server = RedisServer::start();
    let (one, two) = (redis_store(&server).await, redis_store(&server).await);
    let limits = Limits { idle_ms: 60_000, ..limits(600, 3) };
    // Three sessions (admitted at once: nobody waited), known to both instances; one waiter.
    let tickets = join_confirmed(&one, &limits, 4, 0).await;
    assert_eq!(one.stats(ROOM, &limits, 0).await.unwrap().active, 3, "{tickets:?}");
    one.stats(ROOM, &limits, 100).await.unwrap();
    two.stats(ROOM, &limits, 100).await.unwrap();
    flush(&server).await;
    // Both instances restore what they knew: three places taken, by sessions it does not know.
    assert_eq!(one.stats(ROOM, &limits, 1_000).await.unwrap().active, 3);
    assert_eq!(two.stats(ROOM, &limits, 1_100).await.unwrap().active, 3, "merged by maximum, not added");
    // Session 1 is seen in use at instance two, session 2 ends at instance one; session 3's
    // holder is gone without a word.
    two.touch(ROOM, &limits, &[4], &[(1, 600_000)], 2_000).await.unwrap();
    one.release(ROOM, &limits, 2, 600_000, 2_000).await.unwrap();
    let stats = one.stats(ROOM, &limits, 2_000).await.unwrap();
    assert_eq!(stats.active, 2, "session 1 taken over, session 2 ended: {stats:?}");
    assert_eq!(one.advance(ROOM, &limits, 3_000, JUDGE).await.unwrap().granted, 1, "the freed place goes on");
    // Nobody reported session 3 within idle_ms: its place ends then, not at session_ms.
    one.touch(ROOM, &limits, &[], &[(1, 600_000)], 60_000).await.unwrap();
    let stats = one.stats(ROOM, &limits, 1_000 + limits.idle_ms).await.unwrap();
    assert_eq!((stats.active, stats.outstanding), (1, 1), "{stats:?}");
}

#[tokio::test]
async fn a_call_that_reaches_redis_after_its_caller_gave_up_changes_nothing() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), Duration::from_secs(2), Duration::from_millis(500))
        .await
        .expect("connect to the test's redis-server");
    let limits = limits(60, 10);
    store.keep_time().await; // learn Redis's clock
    store.join(ROOM, &limits, true, 0, None).await.unwrap();
    // Redis freezes with a join on its way: the instance gives up on it after 500 ms...
    server.pause();
    assert!(matches!(store.join(ROOM, &limits, true, 0, None).await, Err(StoreError::Unavailable(_))));
    // ...and when Redis thaws and reads it, it refuses it: no ticket held by nobody.
    server.resume();
    let stats = store.stats(ROOM, &limits, 0).await.unwrap();
    assert_eq!(stats.last_ticket, 1, "{stats:?}");
    assert_eq!(store.join(ROOM, &limits, true, 0, None).await.unwrap(), Joined::Waiting { ticket: 2 });
}

async fn redeemed(store: &Store, ticket: u64) -> Redeemed {
    store.redeem(ROOM, &limits(600, 10), ticket, 1_000, JUDGE).await.unwrap()
}

#[tokio::test]
async fn a_redemption_whose_answer_was_lost_is_given_again_to_its_holder_only() {
    let server = RedisServer::start();
    let (one, two) = (redis_store(&server).await, redis_store(&server).await);
    let limits = limits(600, 10);
    let lease = Duration::from_millis(300);
    for store in [&one, &two] {
        store.hold_lease(ROOM, lease).await.unwrap(); // both instances alive
    }
    // Three in line (the room was paused when they came), then three turns.
    for _ in 0..3 {
        one.join(ROOM, &limits, false, 0).await.unwrap();
    }
    one.touch(ROOM, &limits, &[1, 2, 3], &[], 0).await.unwrap();
    assert_eq!(one.advance(ROOM, &limits, 1_000, JUDGE).await.unwrap().granted, 3);
    // Instance one redeems ticket 2, and its answer is lost (its call failed): it says so.
    let first = redeemed(&one, 2).await;
    assert!(matches!(first, Redeemed::Admitted { .. }));
    assert_eq!(redeemed(&two, 2).await, Redeemed::Pending, "instance one may still answer: wait");
    one.unanswered(ROOM, &limits, 2, 1_000).await.unwrap();
    assert_eq!(redeemed(&two, 2).await, first, "the holder, trying again, gets the session");
    two.touch(ROOM, &limits, &[], &[(2, 601_000)], 1_000).await.unwrap();
    assert_eq!(redeemed(&one, 2).await, Redeemed::Gone(Gone::Used), "once used, the ticket is spent");

    // Instance one redeems ticket 3 and dies before answering: once it is no longer alive,
    // the holder gets the session at instance two.
    assert!(matches!(redeemed(&one, 3).await, Redeemed::Admitted { .. }));
    assert_eq!(redeemed(&two, 3).await, Redeemed::Pending);
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    assert!(matches!(redeemed(&two, 3).await, Redeemed::Admitted { .. }));
    assert_eq!(one.stats(ROOM, &limits, 1_000).await.unwrap().active, 2, "one session each, not two");
}

#[tokio::test]
async fn a_live_capacity_binds_every_instance_and_survives_a_lost_line() {
    let server = RedisServer::start();
    let (one, two) = (redis_store(&server).await, redis_store(&server).await);
    let limits = limits(6000, 10);
    // Instance one lowers the capacity to 1; instance two, not yet told, still says 10.
    let one_place: Overrides = serde_json::from_str(r#"{"max_active":1,"state":"paused"}"#).unwrap();
    let (_, version) = one.change_overrides(ROOM, &limits, Some(&one_place), 0).await.unwrap();
    assert!(matches!(two.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Admitted { .. }));
    assert_eq!(two.join(ROOM, &limits, true, 0).await.unwrap(), Joined::Waiting { ticket: 2 }, "one place only");
    assert_eq!(two.stats(ROOM, &limits, 0).await.unwrap().settings_version, version, "the version is reported");
    two.overrides(ROOM, &limits, 0).await.unwrap(); // as instance two's room reads them on seeing it
                                                    // Redis loses everything; the instances put the overrides back with the line.
    flush(&server).await;
    two.stats(ROOM, &limits, 1_000).await.unwrap();
    assert_eq!(two.overrides(ROOM, &limits, 1_000).await.unwrap(), (one_place, version));
}

#[tokio::test]
async fn the_leaders_adaptive_rate_binds_every_instance_and_comes_back_after_a_lost_line() {
    let server = RedisServer::start();
    let (leader, follower) = (redis_store(&server).await, redis_store(&server).await);
    let room = limits(600, 1_000);
    let decided = Limits { adaptive_per_minute: 60, ..room };
    leader.advance(ROOM, &decided, 0, JUDGE).await.unwrap();
    // A follower, whose room has not learned the rate yet, is bound by it in the store: its
    // reads report it, and its joins draw on a bucket of one second at it (one turn, where
    // 600 a minute would hold ten).
    assert_eq!(follower.stats(ROOM, &room, 0).await.unwrap().adaptive_per_minute, Some(60));
    assert!(matches!(follower.join(ROOM, &room, true, 0).await.unwrap(), Joined::Admitted { ticket: 1, .. }));
    assert_eq!(follower.join(ROOM, &room, true, 0).await.unwrap(), Joined::Waiting { ticket: 2 });
    // An operator's batch, from the follower, leaves the leader's rate as it is.
    follower.admit(ROOM, &room, 1, 500, JUDGE).await.unwrap();
    assert_eq!(follower.stats(ROOM, &room, 500).await.unwrap().adaptive_per_minute, Some(60));
    // Redis loses the line: the leader's next step puts the rate back.
    flush(&server).await;
    let step = leader.advance(ROOM, &decided, 1_000, JUDGE).await.unwrap();
    assert_eq!(step.stats.adaptive_per_minute, Some(60));
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
    assert_eq!(one.redeem(ROOM, &limits, 4, 300, JUDGE).await.unwrap(), Redeemed::Waiting { position: 4 });
    assert_eq!(one.join(ROOM, &limits, false, 3_000).await.unwrap(), Joined::Waiting { ticket: 5 });
}

#[tokio::test]
async fn an_ended_session_is_kept_for_instances_that_missed_its_announcement() {
    let server = RedisServer::start();
    let store = redis_store(&server).await;
    let Store::Redis(redis) = &store else { unreachable!() };
    let limits = limits(60, 10);
    store.join(ROOM, &limits, true, 0).await.unwrap();
    assert!(store.release(ROOM, &limits, 1, 600_000, 1_000).await.unwrap());
    let ended = redis.ended_sessions(ROOM, 2_000).await.unwrap();
    assert_eq!(ended, [(1, limits.session_ms)], "until the session would have expired");
    assert!(redis.ended_sessions(ROOM, limits.session_ms + 1).await.unwrap().is_empty(), "then forgotten");
}

async fn live_overrides_are_kept_merged_and_cleared(store: Store) {
    let limits = limits(60, 10);
    assert_eq!(store.overrides(ROOM, &limits, 0).await.unwrap(), (Overrides::default(), 0));
    let paused: Overrides = serde_json::from_str(r#"{"state":"paused","admit_per_minute":300}"#).unwrap();
    let (after, first) = store.change_overrides(ROOM, &limits, Some(&paused), 0).await.unwrap();
    assert_eq!(after, paused);
    let message: Overrides = serde_json::from_str(r#"{"message":"Back soon"}"#).unwrap();
    let (after, second) = store.change_overrides(ROOM, &limits, Some(&message), 0).await.unwrap();
    assert_eq!(after, paused.merged(&message), "merged field by field");
    assert!(second > first);
    assert_eq!(store.overrides(ROOM, &limits, 0).await.unwrap(), (after, second));
    let (cleared, third) = store.change_overrides(ROOM, &limits, None, 0).await.unwrap();
    assert_eq!(cleared, Overrides::default());
    assert!(third > second);
}

const EVENT: u64 = 1_790_000_000;
const SEED: [u8; 32] = [9; 32];

async fn prequeue_number(store: &Store, limits: &Limits, number: u64, now: u64) -> u64 {
    match store.prequeue(ROOM, limits, EVENT, number, now, None).await.unwrap() {
        Prequeued::Number(number) => number,
        other => panic!("a pre-queue number, not {other:?}"),
    }
}

async fn a_sale_seats_its_prequeue_once_after_the_line_and_before_later_arrivals(store: Store) {
    let limits = Limits { max_waiting: 4, ..limits(600, 1) };
    // Someone waits from before the pre-queue (the room was open, and full).
    assert_eq!(join_confirmed(&store, &limits, 2, 0).await, [1, 2]);
    let numbers: Vec<u64> = {
        let mut numbers = Vec::new();
        for _ in 0..4 {
            numbers.push(prequeue_number(&store, &limits, 0, 100).await);
        }
        numbers
    };
    assert_eq!(numbers, [1, 2, 3, 4], "numbers in order of arrival");
    assert_eq!(store.prequeue(ROOM, &limits, EVENT, 0, 100, None).await.unwrap(), Prequeued::Full, "max_waiting");
    assert_eq!(prequeue_number(&store, &limits, 3, 200).await, 3, "presented again: the same number");
    assert_eq!(store.stats(ROOM, &limits, 200).await.unwrap().prequeued, 4);

    let seated = store.seat(ROOM, &limits, EVENT, (&SEED, true), 1_000).await.unwrap();
    assert_eq!(seated, Seated { event: EVENT, base: 2, count: 4, at: 1_000, seed: SEED, shuffled: true });
    let again = store.seat(ROOM, &limits, EVENT, (&[1; 32], true), 2_000).await.unwrap();
    assert_eq!(again, seated, "once: a second call (another instance) gets the same seating and seed");
    assert_eq!(store.prequeue(ROOM, &limits, EVENT, 0, 2_000, None).await.unwrap(), Prequeued::Seated(seated));
    assert_eq!(store.join(ROOM, &limits, true, 2_000).await.unwrap(), Joined::Waiting { ticket: 7 }, "behind them");
    // The places 3 to 6 wait SEATED_SEE_MS to be seen: 3 and 5 are, the others never.
    store.touch(ROOM, &limits, &[3, 5, 7], &[], 2_000).await.unwrap();
    let limits = Limits { max_active: 10, ..limits };
    let step = store.advance(ROOM, &limits, 2_100, JUDGE).await.unwrap();
    assert_eq!(step.granted, 2, "ticket 2 (from before), then 3; 4 not seen yet holds the line");
    assert_eq!(store.advance(ROOM, &limits, 5_000, JUDGE).await.unwrap().granted, 0);
    let step = store.advance(ROOM, &limits, 1_000 + SEATED_SEE_MS, JUDGE).await.unwrap();
    assert_eq!(step.granted, 2, "then 4 and 6 are skipped: 5 and 7 go");
    assert_eq!(store.redeem(ROOM, &limits, 4, 12_000, JUDGE).await.unwrap(), Redeemed::Gone(Gone::Left));
}

async fn a_new_sale_starts_its_prequeue_afresh(store: Store) {
    let limits = limits(600, 10);
    assert_eq!(prequeue_number(&store, &limits, 0, 0).await, 1);
    store.seat(ROOM, &limits, EVENT, (&SEED, true), 1_000).await.unwrap();
    match store.prequeue(ROOM, &limits, EVENT + 86_400, 0, 2_000, None).await.unwrap() {
        Prequeued::Number(number) => assert_eq!(number, 1, "the next sale's first number"),
        other => panic!("{other:?}"),
    }
}

async fn a_number_of_another_sale_leaves_the_prequeue_alone(store: Store) {
    let limits = limits(600, 10);
    assert_eq!(prequeue_number(&store, &limits, 0, 0).await, 1);
    // A cookie of an earlier sale, presented during this one's pre-queue.
    let old = store.prequeue(ROOM, &limits, EVENT - 1, 500, 0, None).await.unwrap();
    assert_eq!(old, Prequeued::Number(500));
    assert_eq!(prequeue_number(&store, &limits, 0, 0).await, 2, "this sale's count is untouched");
    assert_eq!(store.stats(ROOM, &limits, 0).await.unwrap().prequeue_event, EVENT);
}

#[tokio::test]
async fn an_instance_that_only_read_the_room_restores_the_prequeue_count() {
    let server = RedisServer::start();
    let (one, two) = (redis_store(&server).await, redis_store(&server).await);
    let limits = limits(600, 10);
    for _ in 0..7 {
        prequeue_number(&one, &limits, 0, 0).await;
    }
    assert_eq!(two.stats(ROOM, &limits, 0).await.unwrap().prequeued, 7, "two reads the room");
    flush(&server).await;
    // Instance one is gone; two restores the line alone, and gives number 8 next.
    assert_eq!(two.stats(ROOM, &limits, 1_000).await.unwrap().prequeued, 7);
    assert_eq!(prequeue_number(&two, &limits, 0, 3_500).await, 8);
}

#[tokio::test]
async fn a_proof_of_work_takes_one_prequeue_number_across_instances() {
    let server = RedisServer::start();
    let (one, two) = (redis_store(&server).await, redis_store(&server).await);
    let limits = limits(600, 10);
    assert!(matches!(one.prequeue(ROOM, &limits, EVENT, 0, 0, Some(42)).await, Ok(Prequeued::Number(1))));
    assert_eq!(two.prequeue(ROOM, &limits, EVENT, 0, 0, Some(42)).await, Err(StoreError::ProofReused));
}

#[tokio::test]
async fn a_prequeue_and_its_seating_survive_a_redis_restarted_empty() {
    let server = RedisServer::start();
    let (one, two) = (redis_store(&server).await, redis_store(&server).await);
    let limits = limits(600, 10);
    for _ in 0..3 {
        prequeue_number(&one, &limits, 0, 0).await; // one gave 1 to 3
    }
    assert_eq!(prequeue_number(&two, &limits, 0, 0).await, 4, "two gave 4");
    assert_eq!(prequeue_number(&one, &limits, 0, 0).await, 5, "one gave 5");
    let before = one.stats(ROOM, &limits, 0).await.unwrap();
    flush(&server).await;

    // Each instance merges what it knew; joins wait meanwhile, so no number is given twice.
    assert_eq!(two.prequeue(ROOM, &limits, EVENT, 0, 1_000, None).await, Err(StoreError::Restoring));
    assert_eq!(two.stats(ROOM, &limits, 1_000).await.unwrap().line, before.line, "the same line");
    assert_eq!(one.stats(ROOM, &limits, 1_100).await.unwrap().prequeued, 5);
    assert_eq!(prequeue_number(&two, &limits, 0, 3_500).await, 6);
    // A number presented that no instance knew (its answer's instance died) raises the count.
    assert_eq!(prequeue_number(&two, &limits, 8, 3_500).await, 8);
    assert_eq!(prequeue_number(&one, &limits, 0, 3_500).await, 9);
    // The start waits a little longer than joins, for every instance to bring back what it knew.
    assert_eq!(one.seat(ROOM, &limits, EVENT, (&SEED, true), 4_000).await, Err(StoreError::Restoring));
    assert_eq!(one.seat(ROOM, &limits, EVENT, (&SEED, true), 6_000).await.unwrap().count, 9, "all of them are seated");

    // Lost again after the start: the seating comes back as it was, never redrawn.
    let seated = two.seat(ROOM, &limits, EVENT, (&SEED, true), 6_000).await.unwrap();
    flush(&server).await;
    assert_eq!(two.seat(ROOM, &limits, EVENT, (&[1; 32], false), 9_000).await.unwrap(), seated);
    assert_eq!(two.join(ROOM, &limits, false, 12_000).await.unwrap(), Joined::Waiting { ticket: 10 });
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
    absence_is_excused_while_the_instances_catch_up,
    a_ticket_nobody_confirmed_is_skipped,
    idle_sessions_end_and_free_their_place,
    sessions_renew_and_expire,
    five_minutes_of_admissions_follow_the_rate,
    a_lagging_clock_credits_no_extra_turns,
    a_step_skips_a_bounded_number_of_leavers,
    a_ticket_beyond_the_last_keeps_its_place,
    live_overrides_are_kept_merged_and_cleared,
    a_full_line_takes_no_ticket_until_a_place_frees,
    a_full_line_counts_only_waiters_still_here,
    the_adaptive_rate_binds_grants_below_admit_per_minute,
    a_sale_seats_its_prequeue_once_after_the_line_and_before_later_arrivals,
    a_new_sale_starts_its_prequeue_afresh,
    a_number_of_another_sale_leaves_the_prequeue_alone,
);

#[tokio::test]
async fn a_leader_giving_up_its_lease_is_heard_by_the_others_at_once() {
    let server = RedisServer::start();
    let leader = redis_store(&server).await; // holds the lease of ROOM
    let other = std::sync::Arc::new(redis_store(&server).await);
    let lease = other.hold_lease(ROOM, Duration::from_secs(60)).await.unwrap();
    // One leader at a time; the others are told when its lease runs out.
    assert!(
        matches!(lease, vestibule::store::Lease::Other(left) if left > Duration::from_secs(50) && left <= Duration::from_secs(60)),
        "{lease:?}"
    );
    let (_rooms, watched) = tokio::sync::watch::channel(vec![ROOM.to_owned()]);
    let tasks = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut heard = other.announcements(watched, &tasks, stop.clone());
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    // Subscribed once the listener says it hears.
    loop {
        let said = tokio::time::timeout_at(deadline, heard.recv()).await.expect("the subscription comes up");
        if said == Some(vestibule::store::Announcement::Hearing(true)) {
            break;
        }
    }
    leader.drop_lease(ROOM).await.unwrap();
    loop {
        let said = tokio::time::timeout_at(deadline, heard.recv()).await.expect("the lease's release is announced");
        if said == Some(vestibule::store::Announcement::LeaseFree { room: ROOM.to_owned() }) {
            break;
        }
    }
    assert!(other.hold_lease(ROOM, Duration::from_secs(60)).await.unwrap().is_held(), "the free lease is taken");
    stop.cancel();
}
