//! Rooms at run time: their state and message, the snapshot every waiting page and socket
//! reads its position from, the scheduler step that advances the line, and the status a
//! visitor sees.
//!
//! A waiting visitor costs the store nothing per update: the scheduler reads the room once per
//! step and publishes a [`Snapshot`] on a `watch` channel; pages, status calls and feed sockets
//! compute `ticket - cursor` from it in memory.

pub mod adaptive;
pub mod feed;
pub mod lang;
pub mod page;
pub mod sale;
pub mod settings;

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

/// Something a visitor did that the store must hear of, kept until it has: a leave is never
/// lost to an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Departure {
    /// A session ended (its token expires at `expires_at`, ms).
    SessionEnded { ticket: u64, expires_at: u64 },
    /// A place in line (or a turn not yet used) given up.
    PlaceGivenUp { ticket: u64 },
    /// A redemption here failed: if it ran, nobody got its answer, and the ticket's holder
    /// may take the session again.
    Unanswered { ticket: u64 },
}

impl Departure {
    /// What the departure is about: one of each is held at a time.
    fn key(&self) -> (u8, u64) {
        match *self {
            Departure::SessionEnded { ticket, .. } => (0, ticket),
            Departure::PlaceGivenUp { ticket } => (1, ticket),
            Departure::Unanswered { ticket } => (2, ticket),
        }
    }
}

/// Departures held for the store, in order, at most one of each kind per ticket.
#[derive(Debug, Default)]
struct Departures {
    queue: VecDeque<Departure>,
    held: HashSet<(u8, u64)>,
}

/// What every waiter of a room needs to know, published once per step.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub cursor: u64,
    pub state: RoomState,
    pub message: Option<String>,
    /// Admissions per second observed over the last minute, at every instance (the store
    /// counts them).
    pub rate_per_second: Option<f64>,
    /// The rate in force (admit_per_minute, or the adaptive rate), per second.
    pub configured_per_second: f64,
    /// Whether sessions and granted turns filled `max_active` at the last read: the line then
    /// moves as fast as sessions end, not at the rate in force.
    pub full: bool,
    /// Whether the store answered at the last step; while it does not, the line is paused.
    pub available: bool,
    /// Bumped when waiters must be seen again at once: the line was restored, or the store
    /// is back after an outage, or a sale's pre-queue got its places. Feed sockets then
    /// report their waiter alive.
    pub generation: u64,
    /// While a scheduled sale is in its pre-queue: when it starts (unix ms).
    pub starts_at: Option<u64>,
}

impl Snapshot {
    /// The rate to estimate a wait from, per second; `None` while the line does not move
    /// (paused, closed, or the store away).
    ///
    /// An open room grants turns at the rate in force, whatever it was a minute ago: the
    /// minute's observed rate would carry a slow minute, or a quiet one with nobody to
    /// admit, into every estimate for a minute after. Only while sessions fill `max_active`
    /// does the line move slower than its rate, as fast as sessions end: then the observed
    /// rate, never above the rate in force.
    pub fn eta_rate(&self) -> Option<f64> {
        if self.state != RoomState::Open || !self.available {
            return None;
        }
        let configured = self.configured_per_second;
        Some(match self.rate_per_second {
            Some(observed) if self.full => observed.min(configured),
            _ => configured,
        })
    }

    /// The state a waiter sees: paused while the store is away.
    pub fn waiting_state(&self) -> RoomState {
        match self.state {
            RoomState::Open | RoomState::Passthrough if !self.available => RoomState::Paused,
            state => state,
        }
    }

    /// The operator's message a waiter sees.
    pub fn notice(&self) -> Option<String> {
        self.message.clone()
    }

    /// Why a waiter sees the line paused though the room is open: `store` while the store is
    /// away (the page words it in the visitor's language).
    pub fn pause_reason(&self) -> Option<&'static str> {
        (self.waiting_state() == RoomState::Paused && self.state != RoomState::Paused).then_some("store")
    }
}

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
    /// When this instance last tried the room's lease (ms), when a follower tries it next, and
    /// whether the leader has said it gave it up since.
    lease_tried_at: AtomicU64,
    lease_retry_at: AtomicU64,
    lease_free: AtomicBool,
    /// When this instance last advanced the line (ms), and whether the line was empty at the
    /// last advance or read (nobody waiting, no turn outstanding, no session).
    advanced_at: AtomicU64,
    empty: AtomicBool,
    /// The epoch of the line at the last read.
    epoch: AtomicU64,
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
            lease_tried_at: AtomicU64::new(0),
            lease_retry_at: AtomicU64::new(0),
            lease_free: AtomicBool::new(false),
            advanced_at: AtomicU64::new(0),
            empty: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
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

    /// Put this instance's reading of the upstream in the store; while leading an open room,
    /// judge a window of every instance's readings and set the rate. What fails here is
    /// logged and the step goes on: the line does not pause over its telemetry.
    async fn listen(&self, store: &Store, settings: &Settings, leads: bool, now: u64) -> Result<(), StoreError> {
        let Some(config) = &settings.config.adaptive else {
            if self.adaptive.rate() != 0 {
                self.adaptive.off();
            }
            return Ok(());
        };
        if !self.adaptive.knows() {
            // A process new to the room learns the rate in force before its first step
            // (whose advance writes the rate it holds) and before it judges anything.
            let stats = store.stats(&self.id, &self.limits_of(settings), now).await?;
            self.observe_stats(stats, now);
        }
        if let Some(reading) = self.adaptive.reading_due(now) {
            if let Err(error) = store.report_health(&self.id, &reading).await {
                tracing::debug!(room = %self.id, %error, "the upstream's health was not reported");
            }
        }
        if !leads || !self.adaptive.decision_due(config, now) {
            return Ok(());
        }
        let readings = match store.read_health(&self.id).await {
            Ok(readings) => readings,
            Err(error) => {
                tracing::debug!(room = %self.id, %error, "the upstream's health was not read");
                return Ok(());
            }
        };
        let before = self.adaptive.rate();
        let decided = self.adaptive.decide(config, settings.admit_per_minute(), &readings, now);
        if !decided.stale.is_empty() {
            if let Err(error) = store.forget_health(&self.id, &decided.stale).await {
                tracing::debug!(room = %self.id, %error, "stale health readings stay for now");
            }
        }
        let verdict = decided.verdict;
        if let Some(p95) = verdict.p95_ms {
            self.metrics.upstream_p95.set(p95 / 1_000.0);
        }
        if verdict.per_minute != before {
            tracing::info!(
                room = %self.id,
                judged = verdict.judged,
                p95_ms = verdict.p95_ms,
                error_ratio = verdict.error_ratio,
                requests = verdict.requests,
                per_minute = verdict.per_minute,
                "adaptive admission: the rate changes"
            );
        }
        Ok(())
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

    /// Stop every token of the session that `ticket` opened (ticket 0 is no session), until
    /// `until` (ms), when they expire anyway, and the tokens' leeway after it (they pass until
    /// `exp` + `tokens.leeway_seconds`).
    pub fn revoke(&self, ticket: u64, until: u64) {
        if ticket != 0 {
            if let Ok(mut revoked) = self.revoked.write() {
                let kept = revoked.entry(ticket).or_insert(until);
                *kept = (*kept).max(until);
            }
        }
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

    /// Whether the session that `ticket` opened has ended.
    pub fn is_revoked(&self, ticket: u64) -> bool {
        ticket != 0 && self.revoked.read().is_ok_and(|revoked| revoked.contains_key(&ticket))
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

    /// Record that a waiter is still here; sent to the store in a batch by the next step.
    pub fn touch(&self, ticket: u64) {
        self.touch_all([ticket]);
    }

    fn touch_all(&self, tickets: impl IntoIterator<Item = u64>) {
        if let Ok(mut touched) = self.touched.lock() {
            for ticket in tickets {
                if touched.len() >= MAX_PENDING_TOUCHES {
                    // Full: the places nearest the front are kept, the farthest wait for the
                    // next report of their holder.
                    match touched.last() {
                        Some(last) if *last > ticket => {
                            touched.pop_last();
                        }
                        _ => continue,
                    }
                }
                touched.insert(ticket);
            }
        }
    }

    /// Record that the session `ticket` (token expiring at `expires_at`, ms) is in use, at
    /// most once per [`USE_EVERY`] for one token (`mark`): an admitted request costs no store
    /// call, and the next step reports the batch.
    pub fn session_used(&self, ticket: u64, expires_at: u64, mark: &crate::token::UseMark, now: u64) {
        let every = (USE_EVERY.as_millis() as u64).min(self.limits().idle_ms / 4);
        if ticket != 0 && mark.due(now, every) {
            self.session_in_use(ticket, expires_at);
        }
    }

    /// Record that the session `ticket` is in use now (it was just opened or redeemed: this
    /// confirms it).
    pub fn session_in_use(&self, ticket: u64, expires_at: u64) {
        if let Ok(mut used) = self.used.lock() {
            if used.len() < MAX_PENDING_TOUCHES || used.contains_key(&ticket) {
                used.insert(ticket, expires_at);
            }
        }
    }

    /// Whether a step may take absent holders as gone now: not in the first [`GRACE`] after
    /// the store came back.
    pub fn absence(&self, now: u64) -> Absence {
        if now >= self.available_since.load(Ordering::Relaxed) + GRACE.as_millis() as u64 {
            Absence::Judge
        } else {
            Absence::Excuse
        }
    }

    /// Note whether this instance hears the leader's announcements of cursor moves.
    /// Heard again after a gap: what was announced meanwhile is lost, so the next step reads
    /// the room (and meets a Redis that lost everything at once, not at the next idle read).
    pub fn set_hearing(&self, hearing: bool) {
        if !self.hearing.swap(hearing, Ordering::Relaxed) && hearing {
            self.read_due.store(true, Ordering::Relaxed);
        }
    }

    /// How often a follower reads the room: every [`READ_EVERY`] while it hears the leader's
    /// announcements ([`IDLE_READ_EVERY`] while the room is empty and quiet), every step while
    /// it does not (a waiter must not learn of a turn seconds after the one behind them).
    fn read_every(&self) -> Duration {
        if !self.hearing.load(Ordering::Relaxed) {
            STEP
        } else if self.empty.load(Ordering::Relaxed) {
            IDLE_READ_EVERY
        } else {
            READ_EVERY
        }
    }

    /// Whether this instance is the one advancing the line (it held the lease at its last step).
    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
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

    /// End a session (the token presented expires at `expires_at`, ms) at `now`: its tokens
    /// stop passing here at once, and the store hears of it at the next step, or when it is
    /// back. Never waits. A renewed token of the session (minted here or elsewhere, from an
    /// older one) expires within `session_seconds` of now: the revocation lasts until then.
    pub fn end_session(&self, ticket: u64, expires_at: u64, now: u64) {
        if ticket != 0 {
            let until = expires_at.max(now + self.limits().session_ms);
            self.revoke(ticket, until);
            self.depart(Departure::SessionEnded { ticket, expires_at: until });
        }
    }

    /// Give up a place in line (or a turn not yet used); the store hears of it at the next
    /// step, or when it is back. Never waits.
    pub fn give_up(&self, ticket: u64) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.remove(&ticket);
        }
        self.depart(Departure::PlaceGivenUp { ticket });
    }

    /// A redemption of `ticket` failed here: if the store carried it out, the holder never
    /// got its token. The store hears of it at the next step, so that the holder may take
    /// the session again.
    pub fn unanswered(&self, ticket: u64) {
        self.depart(Departure::Unanswered { ticket });
    }

    fn depart(&self, departure: Departure) {
        if let Ok(mut departures) = self.departures.lock() {
            if departures.held.contains(&departure.key()) {
                // The same leave again (one ticket, posted in a loop): held once.
            } else if departures.queue.len() < MAX_PENDING_DEPARTURES {
                departures.held.insert(departure.key());
                departures.queue.push_back(departure);
            } else {
                // Beyond the bound, the store learns of it later anyway: the holder is no
                // longer seen (idle, abandoned).
                tracing::warn!(room = %self.id, "too many departures held for the store; one is left to idleness");
            }
        }
    }

    /// Tell the store what visitors did since the last step: departures first (in order),
    /// then who was seen. Each bounded per step; what fails is kept for the next.
    async fn report(&self, store: &Store, now: u64) -> Result<(), StoreError> {
        let limits = self.limits();
        let departures: Vec<Departure> = match self.departures.lock() {
            Ok(mut pending) => {
                let count = pending.queue.len().min(DEPARTURES_PER_STEP);
                let taken: Vec<Departure> = pending.queue.drain(..count).collect();
                for departure in &taken {
                    pending.held.remove(&departure.key());
                }
                taken
            }
            Err(_) => Vec::new(),
        };
        for (done, departure) in departures.iter().enumerate() {
            let sent = match *departure {
                Departure::SessionEnded { ticket, expires_at } => {
                    store.release(&self.id, &limits, ticket, expires_at, now).await.map(drop)
                }
                Departure::PlaceGivenUp { ticket } => store.leave(&self.id, &limits, ticket, now).await,
                Departure::Unanswered { ticket } => store.unanswered(&self.id, &limits, ticket, now).await,
            };
            if let Err(error) = sent {
                if let Ok(mut pending) = self.departures.lock() {
                    for departure in departures[done..].iter().rev() {
                        if pending.held.insert(departure.key()) {
                            pending.queue.push_front(*departure);
                        }
                    }
                }
                return Err(error);
            }
        }
        let waiters: Vec<u64> = match self.touched.lock() {
            Ok(mut touched) => {
                let batch: Vec<u64> = touched.iter().take(TOUCH_BATCH).copied().collect();
                for ticket in &batch {
                    touched.remove(ticket);
                }
                batch
            }
            Err(_) => Vec::new(),
        };
        let sessions: Vec<(u64, u64)> = match self.used.lock() {
            Ok(mut used) => {
                let room = TOUCH_BATCH.saturating_sub(waiters.len()).max(1);
                let batch: Vec<(u64, u64)> = used.iter().take(room).map(|(t, e)| (*t, *e)).collect();
                for (ticket, _) in &batch {
                    used.remove(ticket);
                }
                batch
            }
            Err(_) => Vec::new(),
        };
        if waiters.is_empty() && sessions.is_empty() {
            return Ok(());
        }
        if let Ok(mut recent) = self.recent.lock() {
            for ticket in &waiters {
                if recent.len() < MAX_RECENT_WAITERS || recent.contains_key(ticket) {
                    recent.insert(*ticket, now);
                }
            }
        }
        if let Err(error) = store.touch(&self.id, &limits, &waiters, &sessions, now).await {
            self.touch_all(waiters);
            for (ticket, expires_at) in sessions {
                self.session_in_use(ticket, expires_at);
            }
            return Err(error);
        }
        Ok(())
    }

    /// Forget, once a second, revocations whose tokens have expired and waiters not seen for
    /// `abandon_seconds`.
    fn prune(&self, now: u64) {
        let pruned = self.pruned_at.load(Ordering::Relaxed);
        if now < pruned + 1_000
            || self.pruned_at.compare_exchange(pruned, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        if let Ok(mut revoked) = self.revoked.write() {
            revoked.retain(|_, until| *until + crate::token::MAX_LEEWAY_SECONDS * 1_000 > now);
        }
        let abandon_ms = self.limits().abandon_ms;
        if let Ok(mut recent) = self.recent.lock() {
            recent.retain(|_, seen| *seen + abandon_ms > now);
        }
        self.sale.prune(now.saturating_sub(abandon_ms));
    }

    /// One scheduler step: release sessions ended while the store was away, flush liveness,
    /// advance the line (when open, and when this instance holds the room's lease), publish.
    /// A follower reads the room every [`READ_EVERY`] (every step while it does not hear the
    /// leader); between reads it learns cursor moves from the leader's announcements.
    pub async fn step(&self, store: &Store, now: u64) -> Result<(), StoreError> {
        store.keep_time().await;
        self.at(now);
        self.prune(now);
        let was_available = self.is_available();
        let result = self.try_step(store, now, was_available).await;
        // An outage is two lines, its start (here, or where a request first met it) and its
        // end, each written by whoever changed the room's availability;
        // `vestibule_store_errors_total` and `vestibule_store_up` count it between.
        if self.set_available(result.is_ok(), now) {
            match &result {
                Err(error) => store_lost(self, store, error),
                Ok(()) => {
                    tracing::info!(room = %self.id, store = %store.address(), "the store is back: the line moves again")
                }
            }
        }
        result
    }

    async fn try_step(&self, store: &Store, now: u64, was_available: bool) -> Result<(), StoreError> {
        self.report(store, now).await?;
        // A sale that started is seated at once by whichever instance steps first, and every
        // instance learns the seating (its pre-queue visitors are then seen at their places).
        // While a line just restored waits for every instance to merge, the next step seats.
        match self.seating(store, now).await {
            Ok(_) | Err(StoreError::Restoring) => {}
            Err(error) => return Err(error),
        }
        let settings = self.settings();
        let was_leading = self.leading.load(Ordering::Relaxed);
        let try_lease = if was_leading {
            // Renewed at every step while the line moves; an empty line's only as often as
            // it is advanced (LEASE is three times that), and at once after the store was away
            // (another instance may have taken the lease meanwhile).
            !was_available
                || !self.empty.load(Ordering::Relaxed)
                || now >= self.lease_tried_at.load(Ordering::Relaxed) + EMPTY_STEP.as_millis() as u64
        } else {
            !self.hearing.load(Ordering::Relaxed)
                || self.lease_free.swap(false, Ordering::Relaxed)
                || now >= self.lease_retry_at.load(Ordering::Relaxed)
        };
        let leading = if try_lease {
            let lease = store.hold_lease(&self.id, LEASE).await?;
            // Only a call that was answered counts as tried: after a failed one, the next step
            // tries again.
            self.lease_tried_at.store(now, Ordering::Relaxed);
            match lease {
                Lease::Held => true,
                Lease::Other(left) => {
                    let wait = (left + LEASE_MARGIN).min(LEASE_TRY_EVERY);
                    self.lease_retry_at.store(now + wait.as_millis() as u64, Ordering::Relaxed);
                    false
                }
            }
        } else {
            was_leading
        };
        self.leading.store(leading, Ordering::Relaxed);
        // Back after an outage, waiters are seen again (this step's snapshot asks them) before
        // the line moves on, and for a moment nobody is taken as gone.
        self.metrics.leader.set(i64::from(leading));
        // An empty line moves nothing: advanced once per EMPTY_STEP rather than every step.
        let due = !self.empty.load(Ordering::Relaxed)
            || now >= self.advanced_at.load(Ordering::Relaxed) + EMPTY_STEP.as_millis() as u64;
        let open = settings.state() == RoomState::Open;
        self.listen(store, &settings, open && leading && was_available, now).await?;
        let limits = self.limits_of(&settings);
        let stats = if settings.state() == RoomState::Open && leading && was_available && !due {
            None
        } else if settings.state() == RoomState::Open && leading && was_available {
            let advanced = store.advance(&self.id, &limits, now, self.absence(now)).await?;
            let stats = advanced.stats;
            self.advanced_at.store(now, Ordering::Relaxed);
            self.empty.store(stats.is_empty(), Ordering::Relaxed);
            self.metrics.admissions.inc_by(u64::from(advanced.granted));
            for (ticket, until) in advanced.ended {
                self.revoke(ticket, until);
            }
            Some(advanced.stats)
        } else if leading
            || self.read_due.swap(false, Ordering::Relaxed)
            || now >= self.read_at.load(Ordering::Relaxed) + self.read_every().as_millis() as u64
        {
            let stats = store.stats(&self.id, &limits, now).await.inspect_err(|_| {
                self.read_due.store(true, Ordering::Relaxed); // still owed
            })?;
            self.empty.store(stats.is_empty(), Ordering::Relaxed);
            Some(stats)
        } else {
            None
        };
        let restored = stats.is_some_and(|stats| {
            let before = self.epoch.swap(stats.epoch, Ordering::Relaxed);
            before != 0 && before != stats.epoch
        });
        if restored {
            // The rebuilt line never saw its waiters: tell it those seen here lately (pages
            // without a feed come back only every 20 s).
            let recent: Vec<u64> = self.recent.lock().map(|r| r.keys().copied().collect()).unwrap_or_default();
            self.touch_all(recent);
        }
        if let Some(stats) = stats {
            self.read_at.fetch_max(now, Ordering::Relaxed);
            self.observe_line(stats.line);
            self.observe_stats(stats, now);
            // Another instance changed the live overrides (and the announcement did not reach
            // us, or not yet): read them.
            if stats.settings_version > settings.version {
                let (overrides, version) = store.overrides(&self.id, &limits, now).await?;
                self.apply_overrides(overrides, version);
            }
        }
        // State and message as in force now (a change made during this step's awaits is not
        // written over with the step's older view).
        let settings = self.settings.load();
        let (state, message) = (settings.state(), settings.message());
        let limits = self.limits_of(&settings);
        let configured_per_second = f64::from(limits.per_minute()) / 60.0;
        self.snapshot.send_if_modified(|snapshot| {
            let mut next = snapshot.clone();
            next.state = state;
            next.message = message;
            next.configured_per_second = configured_per_second;
            if let Some(stats) = stats {
                // The cursor never moves back, whatever order steps finish in.
                next.cursor = next.cursor.max(stats.cursor);
                next.rate_per_second = stats.rate_per_second;
                next.full = u64::from(stats.active) + u64::from(stats.outstanding) >= u64::from(limits.max_active);
            }
            if restored {
                next.generation += 1; // every waiter is seen again by the restored line
            }
            let changed = *snapshot != next;
            *snapshot = next;
            changed
        });
        Ok(())
    }

    /// The leader gave up the lease: the next step tries to take it.
    pub fn lease_freed(&self) {
        self.lease_free.store(true, Ordering::Relaxed);
    }

    /// Someone has to wait here, or the line moved: the next step advances the line even if it
    /// was empty, and a follower reads it every [`READ_EVERY`] again.
    pub fn wake(&self) {
        self.empty.store(false, Ordering::Relaxed);
    }

    /// Keep the room as the store reported it, for the admin view and the gauges.
    fn observe_stats(&self, stats: Stats, now: u64) {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.waiting.set(clamp(stats.waiting));
        self.metrics.active_sessions.set(i64::from(stats.active));
        self.metrics.grants_outstanding.set(i64::from(stats.outstanding));
        // The adaptive rate as the leader decided it: every read of the room learns it.
        let settings = self.settings.load();
        if settings.config.adaptive.is_some() {
            self.adaptive.learn(stats.adaptive_per_minute);
        }
        self.metrics.admit_rate.set(i64::from(self.limits_of(&settings).per_minute()));
        self.metrics.prequeued.set(i64::try_from(stats.prequeued).unwrap_or(i64::MAX));
        if let Ok(mut kept) = self.stats.lock() {
            *kept = Some((stats, now));
        }
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

    /// Let the next `count` waiters in now, outside the rate budget (`max_active` still
    /// holds): an operator's batch. How many were let in.
    pub async fn admit_batch(&self, store: &Store, count: u32, now: u64) -> Result<u32, StoreError> {
        let advanced = store.admit(&self.id, &self.limits(), count, now, self.absence(now)).await?;
        self.metrics.admissions.inc_by(u64::from(advanced.granted));
        self.observe_cursor(advanced.stats.cursor);
        self.observe_stats(advanced.stats, now);
        Ok(advanced.granted)
    }

    /// Read the room before a waiter arriving here at `arrived` is shown a place (or the admin
    /// API shows the room), unless this instance leads it (its snapshot is the line's own) or a
    /// read began since: an instance that does not lead reads the room only every
    /// [`READ_EVERY`] ([`IDLE_READ_EVERY`] while idle), and a waiter coming over from another
    /// instance must not see their place go back. Waiters arriving together share
    /// reads; a failed read leaves the snapshot as it was.
    pub async fn refresh(&self, store: &Store, arrived: u64) {
        let read_since = |room: &Room| room.read_at.load(Ordering::Relaxed) >= arrived;
        if self.is_leading() || !self.is_available() || read_since(self) {
            return;
        }
        let _reading = self.reading.lock().await;
        if read_since(self) {
            return;
        }
        if let Ok(stats) = store.stats(&self.id, &self.limits(), arrived).await {
            self.read_at.fetch_max(arrived, Ordering::Relaxed);
            // Found people in line: read every READ_EVERY again, not every IDLE_READ_EVERY.
            self.empty.store(stats.is_empty(), Ordering::Relaxed);
            self.observe_line(stats.line);
            self.observe_cursor(stats.cursor);
            self.observe_stats(stats, arrived);
        }
    }

    /// Give up this instance's lease on the room (a graceful stop).
    pub async fn resign(&self, store: &Store) {
        if self.leading.swap(false, Ordering::Relaxed) {
            if let Err(error) = store.drop_lease(&self.id).await {
                tracing::warn!(room = %self.id, %error, "could not give up the scheduler lease");
            }
        }
    }

    /// What a newcomer sees when the line is full (`max_waiting`).
    /// What a newcomer the store cannot take in line is told: paused, no place yet, and the
    /// room's own message if it has one.
    pub fn held_status(&self) -> Status {
        let mut status = Status::of("paused", None, None, self.snapshot.borrow().message.clone());
        status.reason = Some("store");
        status
    }

    pub fn full_status(&self) -> Status {
        Status::of("full", None, None, self.snapshot.borrow().notice())
    }

    /// What a visitor holding a pre-queue number holds now: still the number before the
    /// start, its place once this instance knows the seating (`Nothing` for a number of
    /// another sale, or never given before the start).
    pub fn seated(&self, holding: Holding) -> Holding {
        let Holding::Prequeue { event, number } = holding else { return holding };
        match self.sale.seating(event) {
            Some(seating) => seating.ticket(number).map_or(Holding::Nothing, Holding::Ticket),
            None if self.settings.load().event().is_some_and(|(e, _)| e.id() == event) => holding,
            None => Holding::Nothing,
        }
    }

    /// Seconds until the sale in its pre-queue starts, as of the room's latest time.
    pub fn starts_in(&self, starts_at: u64) -> u64 {
        starts_at.saturating_sub(self.at_ms.load(Ordering::Relaxed)).div_ceil(1_000)
    }

    /// The visitor holding `holding` was seen now: a waiter, or a pre-queue number.
    pub fn seen(&self, holding: Holding) {
        match holding {
            Holding::Ticket(ticket) => self.touch(ticket),
            Holding::Prequeue { event, number } => self.prequeue_seen(event, number),
            Holding::Nothing | Holding::Token => {}
        }
    }

    /// The room's scheduled sales as `/_vestibule/events?room=` publishes them: each with its
    /// times and phase; once a sale started and its seating is known here, its seed and how
    /// to check one's own place with it.
    /// `public`: only the events whose pre-queue has opened (the operator sees them all).
    pub fn events_published(&self, public: bool) -> serde_json::Value {
        let settings = self.settings.load();
        let in_force = settings.event;
        let now = self.at_ms.load(Ordering::Relaxed);
        let events: Vec<serde_json::Value> = settings
            .config
            .events
            .iter()
            .enumerate()
            .filter(|(_, event)| !public || event.prequeue_at <= now)
            .map(|(index, event)| {
                let phase = in_force.filter(|e| e.index == index).map(|e| e.phase);
                let seating = self.sale.seating(event.id());
                let draw = seating.as_ref().map(|seating| seating.published());
                serde_json::json!({
                    "name": event.name,
                    "id": event.id(),
                    "prequeue_at": event.prequeue_at / 1_000,
                    "starts_at": event.starts_at / 1_000,
                    "ends_at": event.ends_at.map(|at| at / 1_000),
                    "phase": phase,
                    "draw": draw,
                })
            })
            .collect();
        serde_json::json!({
            "room": self.id,
            "events": events,
            "rule": shuffle_rule(),
        })
    }

    /// Pre-queue number `number` of `event` was seen now.
    pub fn prequeue_seen(&self, event: u64, number: u64) {
        self.sale.seen(event, number, self.at_ms.load(Ordering::Relaxed));
    }

    /// What a visitor holding `ticket` (or a token) sees now.
    pub fn status(&self, holding: Holding) -> Status {
        let holding = self.seated(holding);
        let snapshot = self.snapshot.borrow();
        let message = snapshot.notice();
        let ticket = match holding {
            Holding::Token => return Status::of("admitted", None, None, message),
            Holding::Prequeue { number, .. } => {
                let mut status = Status::of("prequeue", None, None, message);
                status.number = Some(number);
                // Started, and the seating not known here yet: a moment.
                status.starts_in = Some(snapshot.starts_at.map_or(0, |at| self.starts_in(at)));
                return status;
            }
            Holding::Nothing => {
                let status = if snapshot.state == RoomState::Closed { "closed" } else { "none" };
                return Status::of(status, None, None, message);
            }
            Holding::Ticket(ticket) => ticket,
        };
        if ticket <= snapshot.cursor && snapshot.available {
            return Status::of("admitted", None, None, message);
        }
        let position = line::position(ticket, snapshot.cursor).max(1);
        let status = match snapshot.waiting_state() {
            RoomState::Paused => "paused",
            RoomState::Closed => "closed",
            RoomState::Open | RoomState::Passthrough => "waiting",
        };
        let mut status = Status::of(status, Some(position), line::eta_seconds(position, snapshot.eta_rate()), message);
        status.reason = snapshot.pause_reason();
        status
    }
}

/// How anyone checks a place drawn at a sale's start, as published with the seed.
fn shuffle_rule() -> &'static str {
    "Your pre-queue number n is in your status (GET /_vestibule/status?room=ID during the \
     pre-queue). At the start every pre-queue number 1..prequeued is ranked by the hex digest \
     SHA-256(seed + \":\" + number), seed in hex and number in decimal, smallest first: your \
     place among the pre-queue is 1 + how many numbers rank before yours, and your ticket is \
     first_ticket - 1 + that place. With shuffled = false the place is the number itself."
}

/// A feed socket counted open (see [`Room::feed_opened`]).
pub struct FeedOpen<'a>(&'a AtomicUsize);

impl Drop for FeedOpen<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a visitor holds for a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    Nothing,
    Ticket(u64),
    /// Pre-queue number `number` of the scheduled sale `event`.
    Prequeue {
        event: u64,
        number: u64,
    },
    Token,
}

/// The visitor's status, as `/_vestibule/status` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// `waiting`, `admitted`, `paused`, `closed`, `full` (the line is, and the visitor is not
    /// in it), `prequeue` (in a scheduled sale's pre-queue) or `none`.
    pub status: &'static str,
    pub position: Option<u64>,
    pub eta_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why the line is paused when the operator did not pause it: `store` (the store is
    /// away; the line moves again by itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// In the pre-queue: seconds until the sale starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub starts_in: Option<u64>,
    /// In the pre-queue: the visitor's pre-queue number (to check the draw with).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<u64>,
}

impl Status {
    fn of(status: &'static str, position: Option<u64>, eta_seconds: Option<u64>, message: Option<String>) -> Status {
        Status { status, position, eta_seconds, message, reason: None, starts_in: None, number: None }
    }
}

/// The store failed `room` a call while it was thought available: the one line that says an
/// outage began (a transient error), or that the store refused a call (a bug).
pub fn store_lost(room: &Room, store: &Store, error: &StoreError) {
    if error.is_transient() {
        let what = match room.settings().state() {
            RoomState::Passthrough => "the store is away: the room lets everyone through as before",
            _ => "the store is away: the line is paused, newcomers are held",
        };
        tracing::warn!(room = %room.id, store = %store.address(), %error, "{what}");
    } else {
        tracing::error!(room = %room.id, store = %store.address(), %error, "the store refused a call (a bug?): the line is paused");
    }
}

/// Advance `room` every [`STEP`] until `stop`, then give up the lease so that another
/// instance takes over at once. Store errors are logged and retried next step.
pub async fn run_scheduler(
    room: std::sync::Arc<Room>,
    store: std::sync::Arc<Store>,
    clock: crate::clock::Clock,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut ticks = tokio::time::interval(STEP);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => break,
        }
        let span = tracing::debug_span!("step", room = %room.id);
        // Errors are logged by the step, once per outage.
        let _ = tracing::Instrument::instrument(room.step(&store, clock.now_ms()), span).await;
    }
    room.resign(&store).await;
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
        let store = Store::memory();
        let clock = Clock::new();
        for _ in 0..31 {
            store.join(&room.id, &room.limits(), true, clock.now_ms()).await.unwrap();
        }
        room.step(&store, clock.now_ms()).await.unwrap();
        // Nobody admitted by the line yet: 30 places at the configured 2 a second.
        assert_eq!(room.snapshot().rate_per_second, None, "no rate observed yet");
        let status = room.status(Holding::Ticket(31));
        assert_eq!((status.position, status.eta_seconds), (Some(30), Some(15)));
        // A live change of the rate changes the estimate at the next step.
        let slower = Overrides { admit_per_minute: std::num::NonZeroU32::new(60), ..Overrides::default() };
        room.apply_overrides(slower, 0);
        room.step(&store, clock.now_ms()).await.unwrap();
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
        let store = Store::memory();
        let clock = Clock::new();
        let joined = store.join(&room.id, &room.limits(), false, clock.now_ms()).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        room.step(&store, clock.now_ms()).await.unwrap();
        assert_eq!(room.snapshot().cursor, 0);
        assert_eq!(room.status(Holding::Ticket(joined.ticket())).status, "paused");
        room.set_control(RoomState::Open, None);
        room.step(&store, clock.now_ms()).await.unwrap();
        assert_eq!(room.status(Holding::Ticket(joined.ticket())).status, "admitted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_nobody_uses_ends_after_session_idle_seconds_and_its_place_goes_on() {
        let room = room("admit_per_minute = 600\nmax_active = 1\nsession_idle_seconds = 30");
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
            room.step(&store, clock.now_ms()).await.unwrap();
        }
        assert!(!room.is_revoked(used), "a session in use stays");
        assert_eq!(room.snapshot().cursor, 1, "and holds the only place");
        // Its holder goes quiet: 30 s later the session ends, its token stops passing here,
        // and the place goes to the waiter.
        for _ in 0..4 {
            room.touch(waiter);
            tokio::time::advance(Duration::from_secs(10)).await;
            room.step(&store, clock.now_ms()).await.unwrap();
        }
        assert!(room.is_revoked(used));
        assert_eq!(room.snapshot().cursor, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn ended_sessions_are_kept_until_their_tokens_expire_and_their_leeway_passes() {
        let room = room("admit_per_minute = 600\nmax_active = 10");
        let clock = Clock::new();
        let now = clock.now_ms();
        // Far more than any cache would hold: none is forgotten early.
        for ticket in 1..=300_000 {
            room.revoke(ticket, now + if ticket % 2 == 0 { 60_000 } else { 600_000 });
        }
        assert!((1..=300_000).all(|ticket| room.is_revoked(ticket)));
        // Tokens pass until exp + leeway: so long, their revocation is kept.
        tokio::time::advance(Duration::from_secs(61)).await;
        room.step(&Store::memory(), clock.now_ms()).await.unwrap();
        assert!(room.is_revoked(2), "within the leeway after its expiry");
        tokio::time::advance(Duration::from_secs(crate::token::MAX_LEEWAY_SECONDS)).await;
        room.step(&Store::memory(), clock.now_ms()).await.unwrap();
        assert!(!room.is_revoked(2) && room.is_revoked(1), "forgotten once the token and its leeway have passed");
        assert_eq!(room.revoked.read().unwrap().len(), 150_000);
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_with_an_old_token_revokes_its_renewed_successor() {
        // session_seconds = 600: a token renewed a minute ago expires 9 minutes from now,
        // while the one presented at leave expires in 10 s.
        let room = room("admit_per_minute = 600\nmax_active = 10\nsession_seconds = 600");
        let clock = Clock::new();
        let now = clock.now_ms();
        room.end_session(7, now + 10_000, now);
        tokio::time::advance(Duration::from_secs(60)).await;
        room.step(&Store::memory(), clock.now_ms()).await.unwrap();
        assert!(room.is_revoked(7), "still revoked after the presented token's expiry");
        tokio::time::advance(Duration::from_secs(600)).await;
        room.step(&Store::memory(), clock.now_ms()).await.unwrap();
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
        let store = Store::memory();
        let clock = Clock::new();
        for ticket in 1..=5_000 {
            room.touch(ticket);
        }
        room.step(&store, clock.now_ms()).await.unwrap();
        assert_eq!(room.touched.lock().unwrap().len(), 5_000 - TOUCH_BATCH);
        for _ in 0..4 {
            room.step(&store, clock.now_ms()).await.unwrap();
        }
        assert!(room.touched.lock().unwrap().is_empty());
    }
}
