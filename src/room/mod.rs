//! Rooms at run time: their state and message, the snapshot every waiting page and socket
//! reads its position from, the scheduler step that advances the line, and the status a
//! visitor sees.
//!
//! A waiting visitor costs the store nothing per update: the scheduler reads the room once per
//! step and publishes a [`Snapshot`] on a `watch` channel; pages, status calls and feed sockets
//! compute `ticket - cursor` from it in memory.

pub mod adaptive;
pub mod feed;
/// The waiting page's words (a module of its own, below the room: the configuration checks them).
pub use crate::lang;
pub mod page;
mod reports;
pub mod sale;
mod scheduler;
pub mod settings;
mod snapshot;
mod status;
mod visitors;

use reports::Departures;
pub use scheduler::{run_scheduler, store_lost, Scheduler};
pub use snapshot::Snapshot;
pub use status::{Holding, Status};

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::ArcSwap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use serde::Serialize;
use tokio::sync::watch;

use crate::config::{RoomConfig, RoomState};
use crate::limit::JoinLimiter;
use crate::line::{self, Absence, Limits, Stats};
use crate::metrics::RoomMetrics;
use crate::store::{Lease, Store, StoreError};
use settings::{Overrides, Settings};

/// How often the scheduler advances each room.
pub use crate::wire::STEP;
/// How long a scheduler lease lasts without renewal: another instance takes over within this
/// (plus one step) when the leader dies.
pub const LEASE: Duration = Duration::from_secs(3);
/// How often the leader advances a room that is empty (nobody waiting, no turn outstanding, no
/// session): an empty line has nothing to move, and a visitor arriving at an empty room is let
/// in by the join itself. A visitor who has to wait, at this instance, wakes the next step.
/// Measured (`bash benches/idle-rooms.sh`): an empty room's advance is ~36 of the ~39 Redis
/// commands an instance spends on it per step.
pub const EMPTY_STEP: Duration = Duration::from_secs(1);
/// How often, at least, an instance that does not lead a room tries to take its lease while it
/// hears the leader; a try also says, for LEASE, that the instance is alive. Otherwise it tries
/// when the leader's lease runs out, as the last try said (a leader that dies is replaced the
/// moment its lease ends; one that gives the lease up says so, and the others try at once).
/// Rarely, because followers' lease calls are most of what an idle room costs Redis
/// (`bash benches/idle-rooms.sh`).
pub const LEASE_TRY_EVERY: Duration = Duration::from_millis(1_500);
/// Tried this long after the holder's lease should have run out.
const LEASE_MARGIN: Duration = Duration::from_millis(10);
/// How often an instance that does not lead a room reads it from the store, besides the
/// cursor moves the leader announces: covers announcements lost while a subscription was down.
pub const READ_EVERY: Duration = Duration::from_secs(1);
/// How often such an instance reads a room that was empty at its last read and has had no
/// news since (no cursor move heard, nobody waiting here), while it hears the leader: an idle
/// room has nothing to tell, and the followers' reads were most of what idle rooms cost Redis
/// (`bash benches/idle-rooms.sh`). The admin API reads a room afresh when asked.
pub const IDLE_READ_EVERY: Duration = Duration::from_secs(10);
/// Most waiters and sessions seen, buffered between two steps (or while the store is away).
const MAX_PENDING_TOUCHES: usize = 100_000;

/// How often an instance checks the seating of a sale it knows against the store's (ms).
const SEATING_CHECK_MS: u64 = 10_000;
/// Most waiters and sessions reported to the store by one step; the rest go with the next.
const TOUCH_BATCH: usize = 1_000;
/// Most departures (sessions ended, places given up) held for the store, and sent by one step.
const MAX_PENDING_DEPARTURES: usize = 100_000;
const DEPARTURES_PER_STEP: usize = 200;
/// Waiters seen lately, told again to a line Redis had to rebuild.
const MAX_RECENT_WAITERS: usize = 200_000;
/// After the store is back, how long absent holders are excused: the instances are still
/// reporting who they saw while it was away.
pub const GRACE: Duration = Duration::from_secs(3);
/// A session in use is reported at most this often per token (and four times per
/// `session_idle_seconds`, if that is more often).
const USE_EVERY: Duration = Duration::from_secs(30);

/// Client addresses whose joins a room counts at once (see [`JoinLimiter`]).
const MAX_JOINING_ADDRESSES: usize = 100_000;

/// A room: its settings and its live state.
#[derive(Debug)]
pub struct Room {
    pub id: String,
    /// `proxy.toml` and the live overrides: one value, replaced whole (see [`settings`]).
    settings: ArcSwap<Settings>,
    /// Joins per client address.
    pub joins: JoinLimiter,
    /// Proofs of work taken, each once.
    pub proofs: crate::challenge::Used,
    /// The cookie the waiting page puts a solved proof of work in.
    pub proof_cookie: String,
    pub token_cookie: String,
    pub ticket_cookie: String,
    snapshot: watch::Sender<Snapshot>,
    /// Waiters seen since the last report to the store.
    /// Kept in order, so that the front of the line is reported first.
    touched: Mutex<BTreeSet<u64>>,
    /// Sessions in use since the last report: ticket → token expiry (ms).
    used: Mutex<HashMap<u64, u64>>,
    /// Waiters seen lately: ticket → when (ms); told again to a rebuilt line.
    recent: Mutex<HashMap<u64, u64>>,
    /// Sessions ended and places given up here, not yet told to the store, in order.
    departures: Mutex<Departures>,
    /// Ended sessions: ticket → when their tokens would have expired (ms). Every token of the
    /// session stops passing on this instance; kept exactly until then.
    revoked: RwLock<HashMap<u64, u64>>,
    /// When this instance last saw the store answer after an outage (ms).
    available_since: AtomicU64,
    /// When revocations and recent waiters were last pruned (ms).
    pruned_at: AtomicU64,
    /// Whether this instance advanced the line at its last step.
    leading: AtomicBool,
    /// Whether this instance hears the leader's announcements (its subscription is up).
    hearing: AtomicBool,
    /// When this instance last read the room from the store (ms), and whether the next step
    /// must read it whenever it last did (announcements may have been lost).
    read_at: AtomicU64,
    read_due: AtomicBool,
    /// Whether the leader has said it gave the lease up since the last try.
    lease_free: AtomicBool,
    /// Whether the line was empty at the last advance or read (nobody waiting, no turn
    /// outstanding, no session).
    empty: AtomicBool,
    /// Which line the room has (0 until known): tickets and tokens of another admit nobody.
    line: AtomicU64,
    /// Held while reading the room for a visitor arriving between reads: one read serves all
    /// who arrive together.
    reading: tokio::sync::Mutex<()>,
    /// The room as the store reported it at the last read, and when (ms): the admin view.
    stats: Mutex<Option<(Stats, u64)>>,
    /// This room's metric handles.
    pub metrics: RoomMetrics,
    /// Feed sockets open here for this room.
    feeds: AtomicUsize,
    /// Whether the last renewal of a session failed (said once in the log until one works).
    renewal_failing: AtomicBool,
    /// Admission that listens to the upstream (`[rooms.adaptive]`).
    pub adaptive: adaptive::Listening,
    /// Scheduled sales (`[[rooms.events]]`) as this instance sees them.
    pub sale: sale::Sale,
    /// The latest time the room was brought to ([`Room::at`]), and when the sale in force
    /// changes next (0: to be worked out).
    at_ms: AtomicU64,
    event_change_at: AtomicU64,
    changing_event: Mutex<()>,
    stop: CancellationToken,
}

pub use crate::wire::{ticket_cookie, token_cookie};

impl Room {
    /// A room of `config`; its scheduler and feeds stop at `stop` (the room removed by a
    /// reload, or the instance stopping).
    pub fn new(config: &RoomConfig, stop: CancellationToken, metrics: RoomMetrics) -> Room {
        let snapshot = Snapshot {
            cursor: 0,
            state: config.state,
            message: config.message.clone(),
            rate_per_second: None,
            configured_per_second: f64::from(config.admit_per_minute.get()) / 60.0,
            full: false,
            available: true,
            generation: 0,
            starts_at: None,
        };
        Room {
            id: config.id.clone(),
            settings: ArcSwap::from_pointee(Settings::new(config.clone())),
            joins: JoinLimiter::new(config.joins_per_address_per_minute.get(), MAX_JOINING_ADDRESSES),
            proofs: crate::challenge::Used::default(),
            proof_cookie: crate::wire::proof_cookie(&config.id),
            token_cookie: token_cookie(&config.id),
            ticket_cookie: ticket_cookie(&config.id),
            snapshot: watch::Sender::new(snapshot),
            touched: Mutex::default(),
            used: Mutex::default(),
            recent: Mutex::default(),
            departures: Mutex::default(),
            revoked: RwLock::default(),
            available_since: AtomicU64::new(0),
            pruned_at: AtomicU64::new(0),
            leading: AtomicBool::new(false),
            hearing: AtomicBool::new(false),
            read_at: AtomicU64::new(0),
            read_due: AtomicBool::new(false),
            lease_free: AtomicBool::new(false),
            empty: AtomicBool::new(false),
            line: AtomicU64::new(0),
            reading: tokio::sync::Mutex::new(()),
            stats: Mutex::default(),
            metrics,
            feeds: AtomicUsize::new(0),
            renewal_failing: AtomicBool::new(false),
            adaptive: adaptive::Listening::default(),
            sale: sale::Sale::default(),
            at_ms: AtomicU64::new(0),
            event_change_at: AtomicU64::new(0),
            changing_event: Mutex::default(),
            stop,
        }
    }

    /// Ends the room's scheduler and feed sockets.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// The proof of work the room asks for before a join (its difficulty), if any.
    pub fn challenge(&self) -> Option<u8> {
        let settings = self.settings.load();
        (settings.config.challenge == crate::config::ChallengeKind::Pow).then_some(settings.config.challenge_difficulty)
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// A receiver that wakes on every change of the snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.subscribe()
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// How the line admits now.
    pub fn limits(&self) -> Limits {
        self.limits_of(&self.settings.load())
    }

    /// How the line admits under `settings`: with the adaptive rate in force, if any.
    fn limits_of(&self, settings: &Settings) -> Limits {
        let mut limits = settings.limits();
        if settings.config.adaptive.is_some() {
            limits.adaptive_per_minute = self.adaptive.rate();
        }
        limits
    }

    /// A request forwarded into the room was answered after `took` (`failed`: a 5xx, or no
    /// answer): what the adaptive rate listens to, when the room has one.
    pub fn upstream_answered(&self, took: std::time::Duration, failed: bool) {
        if self.settings.load().config.adaptive.is_some() {
            self.adaptive.health.observe(took, failed);
        }
    }

    /// Whether a request from `client` with these headers passes without a token
    /// (`[rooms.bypass]`): its address is listed, or its `Vestibule-Bypass` header is the secret.
    pub fn bypasses(&self, client: std::net::IpAddr, headers: &http::HeaderMap) -> bool {
        use subtle::ConstantTimeEq;
        let settings = self.settings.load();
        let Some(bypass) = &settings.config.bypass else { return false };
        if bypass.addresses.iter().any(|net| net.contains(&client)) {
            return true;
        }
        match (&bypass.secret, headers.get(&crate::hop::VESTIBULE_BYPASS)) {
            // In constant time: how long the check takes says nothing of the secret.
            (Some(secret), Some(given)) => given.as_bytes().ct_eq(secret.as_bytes()).into(),
            _ => false,
        }
    }

    /// The status of the waiting page (`queued_status`).
    pub fn queued_status(&self) -> http::StatusCode {
        http::StatusCode::from_u16(self.settings.load().config.queued_status).unwrap_or(http::StatusCode::OK)
    }

    pub fn state(&self) -> RoomState {
        self.settings.load().state()
    }

    /// Put live overrides in force (as the store numbered them: an older `version` than the
    /// one in force is ignored, so announcements may arrive in any order). Waiters hear of a
    /// new state or message at once.
    pub fn apply_overrides(&self, overrides: Overrides, version: u64) {
        self.settings.rcu(|current| {
            if version != 0 && version < current.version {
                return Arc::clone(current);
            }
            Arc::new(Settings { overrides: overrides.clone(), version, ..Settings::clone(current) })
        });
        self.publish_settings();
    }

    /// New settings from `proxy.toml` (a reload); the live overrides stay.
    pub fn reconfigure(&self, config: RoomConfig) {
        self.joins.set_per_minute(config.joins_per_address_per_minute.get());
        self.settings.rcu(|current| {
            let (event, _) = settings::event_at(&config.events, self.at_ms.load(Ordering::Relaxed));
            Arc::new(Settings { config: config.clone(), event, ..Settings::clone(current) })
        });
        self.event_change_at.store(0, Ordering::Relaxed);
        self.publish_settings();
    }

    /// Bring the room to `now` (unix ms): the scheduled sale in force, and its overrides,
    /// change exactly when the clock passes one of its times. One atomic load otherwise.
    pub fn at(&self, now: u64) {
        self.at_ms.fetch_max(now, Ordering::Relaxed);
        if now < self.event_change_at.load(Ordering::Relaxed) {
            return;
        }
        // One at a time, from the latest time any caller brought the room to: a caller whose
        // `now` lags never puts an earlier phase back in force.
        let Ok(_one) = self.changing_event.lock() else { return };
        let now = self.at_ms.load(Ordering::Relaxed);
        if now < self.event_change_at.load(Ordering::Relaxed) {
            return;
        }
        let mut next = u64::MAX;
        self.settings.rcu(|current| {
            let (event, change) = settings::event_at(&current.config.events, now);
            next = change;
            Arc::new(Settings { event, ..Settings::clone(current) })
        });
        self.event_change_at.store(next, Ordering::Relaxed);
        self.publish_settings();
    }

    /// The seating of the sale in force once it started: made in the store by the first
    /// instance to ask after the start (once for every instance), its order drawn here once.
    /// The pre-queue numbers seen here lately are then seen at their places at once. `None`
    /// outside a started sale.
    pub async fn seating(&self, store: &Store, now: u64) -> Result<Option<Arc<sale::Seating>>, StoreError> {
        let settings = self.settings();
        let Some((event, settings::Phase::Started)) = settings.event() else { return Ok(None) };
        let id = event.id();
        let cached = self.sale.seating(id);
        // Checked against the store now and then: after a double fault (Redis lost while
        // this instance could not reach it) the store's seating is the one every other
        // instance follows.
        let due = |seating: &sale::Seating| now >= seating.checked_at.load(Ordering::Relaxed) + SEATING_CHECK_MS;
        if let Some(seating) = cached.as_ref().filter(|seating| !due(seating)) {
            return Ok(Some(seating.clone()));
        }
        let _held = self.sale.seating_lock.lock().await;
        if let Some(seating) = self.sale.seating(id).filter(|seating| !due(seating)) {
            return Ok(Some(seating));
        }
        let limits = self.limits_of(&settings);
        let seed = self.sale.seed(&self.id, &event.name, id);
        let seated = store.seat(&self.id, &limits, id, (&seed, event.shuffle), now).await?;
        match cached {
            Some(seating) if seating.seated == seated => {
                seating.checked_at.store(now, Ordering::Relaxed);
                Ok(Some(seating))
            }
            Some(seating) => {
                tracing::error!(
                    room = %self.id,
                    here = ?seating.seated,
                    store = ?seated,
                    "this instance's seating of the sale is not the store's: following the store's"
                );
                self.install_seating(seated, &event.name, &limits, now).await.map(Some)
            }
            None => self.install_seating(seated, &event.name, &limits, now).await.map(Some),
        }
    }

    /// Put the seating `seated` in force here: its order drawn (off the runtime), and the
    /// pre-queue numbers seen here lately seen at their places at once, front first.
    async fn install_seating(
        &self,
        seated: crate::line::Seated,
        name: &str,
        limits: &Limits,
        now: u64,
    ) -> Result<Arc<sale::Seating>, StoreError> {
        let seating = tokio::task::spawn_blocking(move || sale::Seating::new(seated, now))
            .await
            .map_err(|error| StoreError::Failed(format!("drawing the pre-queue's order: {error}")))?;
        let seating = Arc::new(seating);
        self.sale.set_seating(seating.clone());
        let seen = self.sale.seen_since(seated.event, now.saturating_sub(limits.abandon_ms));
        tracing::info!(
            room = %self.id,
            event = %name,
            prequeued = seated.count,
            seen_here = seen.len(),
            first_ticket = seated.base + 1,
            seed = %seating.seed(),
            "the sale started: the pre-queue has its places"
        );
        let mut tickets: Vec<u64> = seen.into_iter().filter_map(|number| seating.ticket(number)).collect();
        tickets.sort_unstable();
        self.touch_all(tickets);
        // Feeds of the pre-queue learn their places now.
        self.snapshot.send_modify(|snapshot| snapshot.generation += 1);
        Ok(seating)
    }

    /// The seating of a pre-queue number's sale that the store answered with (`seated`):
    /// the one known here if it is the same, else put in force here.
    pub async fn seated_by_store(
        &self,
        seated: crate::line::Seated,
        now: u64,
    ) -> Result<Arc<sale::Seating>, StoreError> {
        if let Some(seating) = self.sale.seating(seated.event).filter(|seating| seating.seated == seated) {
            return Ok(seating);
        }
        let _held = self.sale.seating_lock.lock().await;
        let settings = self.settings();
        let name = settings.config.events.iter().find(|e| e.id() == seated.event).map_or("", |e| e.name.as_str());
        self.install_seating(seated, name, &self.limits_of(&settings), now).await
    }

    /// Change the room's state and message here only (tests); published at once.
    pub fn set_control(&self, state: RoomState, message: Option<String>) {
        let overrides =
            Overrides { state: Some(state), message: Some(message.unwrap_or_default()), ..Overrides::default() };
        self.apply_overrides(overrides, 0);
    }

    /// Publish the state and message in force to every waiter.
    fn publish_settings(&self) {
        let settings = self.settings.load();
        let (state, message) = (settings.state(), settings.message());
        let starts_at =
            settings.event().filter(|(_, phase)| *phase == settings::Phase::Prequeue).map(|(e, _)| e.starts_at);
        self.snapshot.send_if_modified(|snapshot| {
            let changed = snapshot.state != state || snapshot.message != message || snapshot.starts_at != starts_at;
            snapshot.state = state;
            snapshot.message = message;
            snapshot.starts_at = starts_at;
            changed
        });
    }

    /// Entries held per table of the room's own (for the admin view and the soak bench).
    pub fn held(&self) -> Vec<(&'static str, usize)> {
        let len = |held: Option<usize>| held.unwrap_or(0);
        vec![
            ("revoked", len(self.revoked.read().ok().map(|r| r.len()))),
            ("recent_waiters", len(self.recent.lock().ok().map(|r| r.len()))),
            ("touched", len(self.touched.lock().ok().map(|t| t.len()))),
            ("departures", len(self.departures.lock().ok().map(|d| d.queue.len()))),
        ]
    }

    /// Note which line the room has (as the store reports it).
    pub fn observe_line(&self, line: u64) {
        if line != 0 {
            self.line.store(line, Ordering::Relaxed);
        }
    }

    /// Which line the room has (0 until known).
    pub fn line(&self) -> u64 {
        self.line.load(Ordering::Relaxed)
    }

    /// Whether a ticket or token of `line` belongs to this room's line: one of a line that
    /// was reset admits nobody and ends nothing. (Either not known: it cannot be told.)
    pub fn same_line(&self, line: u64) -> bool {
        let current = self.line();
        line == 0 || current == 0 || line == current
    }

    /// Publish a cursor learned from the store between steps (an admission at join or
    /// redeem), so that pages rendered right after it count from it.
    pub fn observe_cursor(&self, cursor: u64) {
        let moved = self.snapshot.send_if_modified(|snapshot| {
            let moved = cursor > snapshot.cursor;
            snapshot.cursor = snapshot.cursor.max(cursor);
            moved
        });
        if moved {
            // The line moves: not idle any more (followers read it every READ_EVERY again).
            self.wake();
        }
    }

    /// Whether the store answered at the last step.
    pub fn is_available(&self) -> bool {
        self.snapshot.borrow().available
    }

    /// Note that the store failed a call: waiters see the line paused until a step succeeds.
    /// True when this call paused it (it was not paused already).
    pub fn store_failed(&self) -> bool {
        self.set_available(false, 0)
    }

    /// True when this changed it.
    fn set_available(&self, available: bool, now: u64) -> bool {
        self.snapshot.send_if_modified(|snapshot| {
            let changed = snapshot.available != available;
            if changed && available {
                // Back after an outage: every waiter is seen again before anyone is skipped.
                snapshot.generation += 1;
                self.available_since.store(now, Ordering::Relaxed);
            }
            snapshot.available = available;
            changed
        })
    }

    /// Note that a renewal failed: true for the first failure since renewals last worked.
    pub fn renewal_failed(&self) -> bool {
        !self.renewal_failing.swap(true, Ordering::Relaxed)
    }

    /// Note that a renewal worked.
    pub fn renewals_work(&self) {
        if self.renewal_failing.swap(false, Ordering::Relaxed) {
            tracing::info!(room = %self.id, "sessions are renewed again");
        }
    }

    /// Count a feed socket open until the guard is dropped.
    pub fn feed_opened(&self) -> FeedOpen<'_> {
        self.feeds.fetch_add(1, Ordering::Relaxed);
        FeedOpen(&self.feeds)
    }

    /// Feed sockets open here for this room.
    pub fn open_feeds(&self) -> usize {
        self.feeds.load(Ordering::Relaxed)
    }

    /// The room as the store last reported it here, and when (ms); `None` before the first read.
    pub fn last_stats(&self) -> Option<(Stats, u64)> {
        self.stats.lock().ok().and_then(|kept| *kept)
    }
}

/// A feed socket counted open (see [`Room::feed_opened`]).
pub struct FeedOpen<'a>(&'a AtomicUsize);

impl Drop for FeedOpen<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::Clock;
    use crate::line::Joined;

    fn room(text: &str) -> Arc<Room> {
        let config: RoomConfig =
            toml::from_str(&format!("id = \"checkout\"\npaths = [\"/checkout\"]\n{text}")).unwrap();
        Arc::new(Room::new(&config, CancellationToken::new(), RoomMetrics::detached()))
    }

    #[tokio::test(start_paused = true)]
    async fn the_scheduler_admits_at_the_configured_rate_under_paused_time() {
        let room = room("admit_per_minute = 120\nmax_active = 100000\nabandon_seconds = 3600");
        let store = Arc::new(Store::memory());
        let clock = Clock::new();
        for _ in 0..2_000 {
            let joined = store.join(&room.id, &room.limits(), true, clock.now_ms()).await.unwrap();
            room.touch(joined.ticket()); // as the gate does when it answers the join
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let scheduler = tokio::spawn(run_scheduler(room.clone(), store.clone(), clock, stop.clone()));
        // Five minutes pass in an instant: tokio's clock is paused and jumps from timer to timer.
        tokio::time::sleep(Duration::from_secs(300)).await;
        stop.cancel();
        scheduler.await.unwrap();

        let stats = store.stats(&room.id, &room.limits(), clock.now_ms()).await.unwrap();
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
    async fn a_fresh_room_estimates_the_wait_from_its_rate_until_one_is_observed() {
        let room = room("admit_per_minute = 120\nmax_active = 1\nabandon_seconds = 3600");
        let mut scheduler = Scheduler::new(room.clone());
        let store = Store::memory();
        let clock = Clock::new();
        for _ in 0..31 {
            store.join(&room.id, &room.limits(), true, clock.now_ms()).await.unwrap();
        }
        scheduler.step(&store, clock.now_ms()).await.unwrap();
        // Nobody admitted by the line yet: 30 places at the configured 2 a second.
        assert_eq!(room.snapshot().rate_per_second, None, "no rate observed yet");
        let status = room.status(Holding::Ticket(31));
        assert_eq!((status.position, status.eta_seconds), (Some(30), Some(15)));
        // A live change of the rate changes the estimate at the next step.
        let slower = Overrides { admit_per_minute: std::num::NonZeroU32::new(60), ..Overrides::default() };
        room.apply_overrides(slower, 0);
        scheduler.step(&store, clock.now_ms()).await.unwrap();
        assert_eq!(room.status(Holding::Ticket(31)).eta_seconds, Some(30));
    }

    /// A slow minute (6 a minute), then the rate back at 300 a minute and a crowd: a
    /// newcomer's wait is their place at 300 a minute, not at the minute's observed rate.
    #[tokio::test(start_paused = true)]
    async fn after_a_slow_minute_the_wait_follows_the_rate_in_force() {
        let room = room("admit_per_minute = 300\nmax_active = 100000\nabandon_seconds = 3600");
        let slow = Overrides { admit_per_minute: std::num::NonZeroU32::new(6), ..Overrides::default() };
        room.apply_overrides(slow, 1);
        let store = Arc::new(Store::memory());
        let clock = Clock::new();
        let join = |store: Arc<Store>, room: Arc<Room>, clock: Clock| async move {
            let joined = store.join(&room.id, &room.limits(), true, clock.now_ms()).await.unwrap();
            room.touch(joined.ticket());
            joined.ticket()
        };
        for _ in 0..20 {
            join(store.clone(), room.clone(), clock).await;
        }
        let stop = CancellationToken::new();
        let scheduler = tokio::spawn(run_scheduler(room.clone(), store.clone(), clock, stop.clone()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        let observed = room.snapshot().rate_per_second.expect("a rate was observed");
        assert!(observed < 0.2, "the slow minute was observed: {observed}/s");

        room.apply_overrides(Overrides::default(), 2);
        let mut last = 0;
        for _ in 0..250 {
            last = join(store.clone(), room.clone(), clock).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await; // one step at the rate in force
        let status = room.status(Holding::Ticket(last));
        let position = status.position.expect("waiting");
        let eta = status.eta_seconds.expect("an estimate");
        let at_rate = position.div_ceil(5);
        assert!(eta.abs_diff(at_rate) <= 1, "place {position} told {eta} s, {at_rate} s at 300 a minute");
        stop.cancel();
        scheduler.await.unwrap();
    }

    /// Sessions fill `max_active`: the line moves as fast as they end, slower than its rate,
    /// and the wait says so.
    #[tokio::test(start_paused = true)]
    async fn a_full_room_estimates_from_the_rate_sessions_end_at() {
        // Sessions of 10 s, two at once, and turns nobody redeems lapse after 10 s: one turn
        // each 5 s.
        let room = room(
            "admit_per_minute = 600\nmax_active = 2\nsession_seconds = 10\ngrant_seconds = 10\nabandon_seconds = 3600",
        );
        let store = Arc::new(Store::memory());
        let clock = Clock::new();
        let mut last = 0;
        for _ in 0..100 {
            let joined = store.join(&room.id, &room.limits(), true, clock.now_ms()).await.unwrap();
            room.touch(joined.ticket());
            last = joined.ticket();
        }
        let stop = CancellationToken::new();
        let scheduler = tokio::spawn(run_scheduler(room.clone(), store.clone(), clock, stop.clone()));
        tokio::time::sleep(Duration::from_secs(60)).await;
        let snapshot = room.snapshot();
        assert!(snapshot.full, "sessions and turns fill max_active");
        let status = room.status(Holding::Ticket(last));
        let (position, eta) = (status.position.unwrap(), status.eta_seconds.unwrap());
        // 0.2 a second: about five seconds a place, not the 0.1 s of 600 a minute.
        let per_place = eta as f64 / position as f64;
        assert!((4.0..=6.5).contains(&per_place), "place {position} told {eta} s");
        stop.cancel();
        scheduler.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_room_admits_nobody_and_the_snapshot_says_so() {
        let room = room("admit_per_minute = 600\nmax_active = 10\nstate = \"paused\"");
        let mut scheduler = Scheduler::new(room.clone());
        let store = Store::memory();
        let clock = Clock::new();
        let joined = store.join(&room.id, &room.limits(), false, clock.now_ms()).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        scheduler.step(&store, clock.now_ms()).await.unwrap();
        assert_eq!(room.snapshot().cursor, 0);
        assert_eq!(room.status(Holding::Ticket(joined.ticket())).status, "paused");
        room.set_control(RoomState::Open, None);
        scheduler.step(&store, clock.now_ms()).await.unwrap();
        assert_eq!(room.status(Holding::Ticket(joined.ticket())).status, "admitted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_nobody_uses_ends_after_session_idle_seconds_and_its_place_goes_on() {
        let room = room("admit_per_minute = 600\nmax_active = 1\nsession_idle_seconds = 30");
        let mut scheduler = Scheduler::new(room.clone());
        let store = Store::memory();
        let clock = Clock::new();
        let mark = crate::token::UseMark::default();
        // Two sessions one after the other: the first is used every 10 s, the second never.
        let Joined::Admitted { ticket: used, expires_at } =
            store.join(&room.id, &room.limits(), true, clock.now_ms()).await.unwrap()
        else {
            panic!("an idle room admits at once");
        };
        let waiter = store.join(&room.id, &room.limits(), true, clock.now_ms()).await.unwrap().ticket();
        for _ in 0..6 {
            room.session_used(used, expires_at, &mark, clock.now_ms());
            room.touch(waiter);
            tokio::time::advance(Duration::from_secs(10)).await;
            scheduler.step(&store, clock.now_ms()).await.unwrap();
        }
        assert!(!room.is_revoked(used), "a session in use stays");
        assert_eq!(room.snapshot().cursor, 1, "and holds the only place");
        // Its holder goes quiet: 30 s later the session ends, its token stops passing here,
        // and the place goes to the waiter.
        for _ in 0..4 {
            room.touch(waiter);
            tokio::time::advance(Duration::from_secs(10)).await;
            scheduler.step(&store, clock.now_ms()).await.unwrap();
        }
        assert!(room.is_revoked(used));
        assert_eq!(room.snapshot().cursor, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn ended_sessions_are_kept_until_their_tokens_expire_and_their_leeway_passes() {
        let room = room("admit_per_minute = 600\nmax_active = 10");
        let mut scheduler = Scheduler::new(room.clone());
        let clock = Clock::new();
        let now = clock.now_ms();
        // Far more than any cache would hold: none is forgotten early.
        for ticket in 1..=300_000 {
            room.revoke(ticket, now + if ticket % 2 == 0 { 60_000 } else { 600_000 });
        }
        assert!((1..=300_000).all(|ticket| room.is_revoked(ticket)));
        // Tokens pass until exp + leeway: so long, their revocation is kept.
        tokio::time::advance(Duration::from_secs(61)).await;
        scheduler.step(&Store::memory(), clock.now_ms()).await.unwrap();
        assert!(room.is_revoked(2), "within the leeway after its expiry");
        tokio::time::advance(Duration::from_secs(crate::token::MAX_LEEWAY_SECONDS)).await;
        scheduler.step(&Store::memory(), clock.now_ms()).await.unwrap();
        assert!(!room.is_revoked(2) && room.is_revoked(1), "forgotten once the token and its leeway have passed");
        assert_eq!(room.revoked.read().unwrap().len(), 150_000);
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_with_an_old_token_revokes_its_renewed_successor() {
        // session_seconds = 600: a token renewed a minute ago expires 9 minutes from now,
        // while the one presented at leave expires in 10 s.
        let room = room("admit_per_minute = 600\nmax_active = 10\nsession_seconds = 600");
        let mut scheduler = Scheduler::new(room.clone());
        let clock = Clock::new();
        let now = clock.now_ms();
        room.end_session(7, now + 10_000, now);
        tokio::time::advance(Duration::from_secs(60)).await;
        scheduler.step(&Store::memory(), clock.now_ms()).await.unwrap();
        assert!(room.is_revoked(7), "still revoked after the presented token's expiry");
        tokio::time::advance(Duration::from_secs(600)).await;
        scheduler.step(&Store::memory(), clock.now_ms()).await.unwrap();
        assert!(!room.is_revoked(7), "forgotten once every token of the session has expired");
    }

    #[test]
    fn a_leave_repeated_with_one_ticket_is_held_for_the_store_once() {
        let room = room("admit_per_minute = 600\nmax_active = 10");
        for _ in 0..1_000 {
            room.give_up(5);
            room.end_session(6, 1_000, 0);
        }
        room.give_up(8);
        assert_eq!(room.departures.lock().unwrap().queue.len(), 3);
    }

    #[test]
    fn touches_kept_when_too_many_are_those_nearest_the_front() {
        let room = room("admit_per_minute = 600\nmax_active = 10");
        room.touch_all(1_000..1_000 + MAX_PENDING_TOUCHES as u64);
        room.touch_all([5, 2_000_000]);
        let touched = room.touched.lock().unwrap();
        assert_eq!(touched.len(), MAX_PENDING_TOUCHES);
        assert!(touched.contains(&5) && !touched.contains(&2_000_000));
        assert!(!touched.contains(&(999 + MAX_PENDING_TOUCHES as u64)), "the farthest made way");
        assert_eq!(touched.first(), Some(&5), "and the report takes the front first");
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_reports_a_bounded_batch_and_the_next_ones_the_rest() {
        let room = room("admit_per_minute = 600\nmax_active = 10");
        let mut scheduler = Scheduler::new(room.clone());
        let store = Store::memory();
        let clock = Clock::new();
        for ticket in 1..=5_000 {
            room.touch(ticket);
        }
        scheduler.step(&store, clock.now_ms()).await.unwrap();
        assert_eq!(room.touched.lock().unwrap().len(), 5_000 - TOUCH_BATCH);
        for _ in 0..4 {
            scheduler.step(&store, clock.now_ms()).await.unwrap();
        }
        assert!(room.touched.lock().unwrap().is_empty());
    }
}
