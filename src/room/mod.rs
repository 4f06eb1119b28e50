//! Rooms at run time: their state and message, the snapshot every waiting page and socket
//! reads its position from, the scheduler step that advances the line, and the status a
//! visitor sees.
//!
//! A waiting visitor costs the store nothing per update: the scheduler reads the room once per
//! step and publishes a [`Snapshot`] on a `watch` channel; pages, status calls and feed sockets
//! compute `ticket - cursor` from it in memory.

pub mod feed;
pub mod page;

use std::sync::{Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::config::{RoomConfig, RoomState};
use crate::line::{self, Limits};
use crate::store::{Store, StoreError};

/// How often the scheduler advances each room.
pub const STEP: Duration = Duration::from_millis(100);
/// How long a scheduler lease lasts without renewal: another instance takes over within this
/// (plus one step) when the leader dies.
pub const LEASE: Duration = Duration::from_secs(3);
/// Most liveness touches buffered between two steps.
const MAX_PENDING_TOUCHES: usize = 100_000;
/// Ended sessions remembered per room. Sessions end at most `max_active` at a time per
/// session lifetime, so this covers rooms of up to this many simultaneous sessions.
const MAX_REVOKED: usize = 200_000;

/// What every waiter of a room needs to know, published once per step.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub cursor: u64,
    pub state: RoomState,
    pub message: Option<String>,
    pub rate_per_second: Option<f64>,
}

/// A room: its settings and its live state.
#[derive(Debug)]
pub struct Room {
    pub id: String,
    pub limits: Limits,
    pub token_cookie: String,
    pub ticket_cookie: String,
    control: RwLock<(RoomState, Option<String>)>,
    snapshot: watch::Sender<Snapshot>,
    touched: Mutex<Vec<u64>>,
    /// Ended sessions by ticket: every token of the session stops passing on this instance.
    revoked: quick_cache::sync::Cache<u64, ()>,
    /// Whether this instance advanced the line at its last step.
    leading: std::sync::atomic::AtomicBool,
}

impl Room {
    pub fn new(config: &RoomConfig) -> Room {
        let snapshot =
            Snapshot { cursor: 0, state: config.state, message: config.message.clone(), rate_per_second: None };
        Room {
            id: config.id.clone(),
            limits: Limits {
                admit_per_minute: config.admit_per_minute.get(),
                max_active: config.max_active.get(),
                grant_ms: config.grant_seconds * 1_000,
                session_ms: config.session_seconds * 1_000,
                abandon_ms: config.abandon_seconds * 1_000,
            },
            token_cookie: format!("vestibule-token-{}", config.id),
            ticket_cookie: format!("vestibule-ticket-{}", config.id),
            control: RwLock::new((config.state, config.message.clone())),
            snapshot: watch::Sender::new(snapshot),
            touched: Mutex::new(Vec::new()),
            revoked: quick_cache::sync::Cache::new(MAX_REVOKED),
            leading: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// A receiver that wakes on every change of the snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.subscribe()
    }

    pub fn state(&self) -> RoomState {
        self.control.read().map(|c| c.0).unwrap_or_default()
    }

    /// Change the room's state and message (admin API, tests); published at once.
    pub fn set_control(&self, state: RoomState, message: Option<String>) {
        if let Ok(mut control) = self.control.write() {
            *control = (state, message.clone());
        }
        self.snapshot.send_if_modified(|snapshot| {
            let changed = snapshot.state != state || snapshot.message != message;
            snapshot.state = state;
            snapshot.message = message;
            changed
        });
    }

    /// Stop every token of the session that `ticket` opened (ticket 0 is no session).
    pub fn revoke(&self, ticket: u64) {
        if ticket != 0 {
            self.revoked.insert(ticket, ());
        }
    }

    /// Whether the session that `ticket` opened has ended here.
    pub fn is_revoked(&self, ticket: u64) -> bool {
        ticket != 0 && self.revoked.get(&ticket).is_some()
    }

    /// Publish a cursor learned from the store between steps (an admission at join or
    /// redeem), so that pages rendered right after it count from it.
    pub fn observe_cursor(&self, cursor: u64) {
        self.snapshot.send_if_modified(|snapshot| {
            let moved = cursor > snapshot.cursor;
            snapshot.cursor = snapshot.cursor.max(cursor);
            moved
        });
    }

    /// Record that a waiter is still here; sent to the store in one batch per step.
    pub fn touch(&self, ticket: u64) {
        if let Ok(mut touched) = self.touched.lock() {
            if touched.len() < MAX_PENDING_TOUCHES {
                touched.push(ticket);
            }
        }
    }

    /// Whether this instance is the one advancing the line (it held the lease at its last step).
    pub fn is_leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// One scheduler step: advance the line (when open, and when this instance holds the
    /// room's lease), flush liveness, publish.
    pub async fn step(&self, store: &Store, instance: &str, now: u64) -> Result<(), StoreError> {
        let (state, message) = self.control.read().map(|c| c.clone()).unwrap_or_default();
        let touched = self.touched.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
        if !touched.is_empty() {
            store.touch(&self.id, &touched, now).await?;
        }
        let leading = store.hold_lease(&self.id, instance, LEASE).await?;
        self.leading.store(leading, std::sync::atomic::Ordering::Relaxed);
        if state == RoomState::Open && leading {
            store.advance(&self.id, &self.limits, now).await?;
        }
        let stats = store.stats(&self.id, &self.limits, now).await?;
        let next = Snapshot { cursor: stats.cursor, state, message, rate_per_second: stats.rate_per_second };
        self.snapshot.send_if_modified(|snapshot| {
            // The cursor never moves back, whatever order steps finish in.
            let next = Snapshot { cursor: next.cursor.max(snapshot.cursor), ..next };
            let changed = *snapshot != next;
            *snapshot = next;
            changed
        });
        Ok(())
    }

    /// What a visitor holding `ticket` (or a token) sees now.
    pub fn status(&self, holding: Holding) -> Status {
        let snapshot = self.snapshot.borrow();
        let message = snapshot.message.clone();
        let ticket = match holding {
            Holding::Token => return Status::of("admitted", None, None, message),
            Holding::Nothing => {
                let status = if snapshot.state == RoomState::Closed { "closed" } else { "none" };
                return Status::of(status, None, None, message);
            }
            Holding::Ticket(ticket) => ticket,
        };
        if ticket <= snapshot.cursor {
            return Status::of("admitted", None, None, message);
        }
        let position = line::position(ticket, snapshot.cursor);
        let status = match snapshot.state {
            RoomState::Paused => "paused",
            RoomState::Closed => "closed",
            RoomState::Open | RoomState::Passthrough => "waiting",
        };
        Status::of(status, Some(position), line::eta_seconds(position, snapshot.rate_per_second), message)
    }
}

/// What a visitor holds for a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    Nothing,
    Ticket(u64),
    Token,
}

/// The visitor's status, as `/_vestibule/status` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// `waiting`, `admitted`, `paused`, `closed` or `none`.
    pub status: &'static str,
    pub position: Option<u64>,
    pub eta_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Status {
    fn of(status: &'static str, position: Option<u64>, eta_seconds: Option<u64>, message: Option<String>) -> Status {
        Status { status, position, eta_seconds, message }
    }
}

/// Advance `room` every [`STEP`] until `stop`. Store errors are logged and retried next step.
pub async fn run_scheduler(
    room: std::sync::Arc<Room>,
    store: std::sync::Arc<Store>,
    instance: String,
    clock: crate::clock::Clock,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut ticks = tokio::time::interval(STEP);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => return,
        }
        if let Err(error) = room.step(&store, &instance, clock.now_ms()).await {
            tracing::warn!(room = %room.id, %error, "scheduler step failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::Clock;

    fn room(text: &str) -> Arc<Room> {
        let config: RoomConfig =
            toml::from_str(&format!("id = \"checkout\"\npaths = [\"/checkout\"]\n{text}")).unwrap();
        Arc::new(Room::new(&config))
    }

    #[tokio::test(start_paused = true)]
    async fn the_scheduler_admits_at_the_configured_rate_under_paused_time() {
        let room = room("admit_per_minute = 120\nmax_active = 100000\nabandon_seconds = 3600");
        let store = Arc::new(Store::memory());
        let clock = Clock::new();
        for _ in 0..2_000 {
            store.join(&room.id, &room.limits, true, clock.now_ms()).await.unwrap();
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let scheduler = tokio::spawn(run_scheduler(room.clone(), store.clone(), "test".into(), clock, stop.clone()));
        // Five minutes pass in an instant: tokio's clock is paused and jumps from timer to timer.
        tokio::time::sleep(Duration::from_secs(300)).await;
        stop.cancel();
        scheduler.await.unwrap();

        let stats = store.stats(&room.id, &room.limits, clock.now_ms()).await.unwrap();
        // The first visitor came in at once (spending one of the two turns the full bucket
        // held); then 2 a second for 300 s.
        let granted_by_scheduler = stats.cursor - 1;
        let expected = 1 + 2 * 300;
        assert!(granted_by_scheduler.abs_diff(expected) <= expected / 100, "{granted_by_scheduler} vs {expected}");
        let snapshot = room.snapshot();
        assert_eq!(snapshot.cursor, stats.cursor, "the snapshot follows the store");
        let rate = snapshot.rate_per_second.expect("a rate was observed");
        assert!((rate - 2.0).abs() < 0.1, "observed {rate}/s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_room_admits_nobody_and_the_snapshot_says_so() {
        let room = room("admit_per_minute = 600\nmax_active = 10\nstate = \"paused\"");
        let store = Store::memory();
        let clock = Clock::new();
        let joined = store.join(&room.id, &room.limits, false, clock.now_ms()).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        room.step(&store, "test", clock.now_ms()).await.unwrap();
        assert_eq!(room.snapshot().cursor, 0);
        assert_eq!(room.status(Holding::Ticket(joined.ticket())).status, "paused");
        room.set_control(RoomState::Open, None);
        room.step(&store, "test", clock.now_ms()).await.unwrap();
        assert_eq!(room.status(Holding::Ticket(joined.ticket())).status, "admitted");
    }
}
