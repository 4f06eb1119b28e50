//! Where the line is kept: the line's few atomic operations behind one interface.
//!
//! Every operation is one atomic step on one room, so the Redis store can run each as a
//! single Lua script (with the room's keys sharing the hash tag `{room}`), and the memory
//! store as one critical section over [`Line`](crate::line::Line). Time is passed in, in
//! milliseconds.

mod announce;
mod memory;
mod redis;

pub use announce::Announcement;

pub use memory::MemoryStore;
pub use redis::{cursor_channel, lease_channel, parse_ended, revocations_channel, settings_channel, RedisStore};

use crate::line::Overrides;
use crate::line::{Absence, Joined, Limits, Prequeued, Redeemed, Seated, Stats};
use crate::wire::shuffle::Seed;

/// What a lease call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// This instance holds the room's lease now.
    Held,
    /// Another instance does, for this much longer (unless it renews it).
    Other(std::time::Duration),
}

impl Lease {
    pub fn is_held(self) -> bool {
        self == Lease::Held
    }
}

/// A store failure.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The store cannot answer now (down, slow, loading, refusing a call that came too late):
    /// transient, worth retrying shortly; the line pauses meanwhile.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered what this instance did not expect (a script error, a reply of
    /// another shape): a bug or mismatched versions, not an outage.
    #[error("store call failed: {0}")]
    Failed(String),
    /// The room's line is missing from the store (Redis restarted empty); the Redis store
    /// restores it and tries again, so callers see this only if that fails too.
    #[error("the line is missing from the store")]
    Lost,
    /// The line was just restored: joins wait a moment while every instance merges what it
    /// knew.
    #[error("the line is being restored")]
    Restoring,
    /// The join's proof of work was used already (at another instance).
    #[error("the proof of work was used already")]
    ProofReused,
}

fn parse_overrides((json, version): (String, u64)) -> Result<(Overrides, u64), StoreError> {
    let overrides = serde_json::from_str(&json)
        .map_err(|error| StoreError::Failed(format!("overrides in the store that do not read: {error}")))?;
    Ok((overrides, version))
}

impl StoreError {
    /// Whether trying again shortly may succeed (an outage), rather than a bug.
    pub fn is_transient(&self) -> bool {
        !matches!(self, StoreError::Failed(_))
    }
}

/// What a scheduler step of the line did.
#[derive(Debug, Clone, PartialEq)]
pub struct Advanced {
    /// Turns granted by this step.
    pub granted: u32,
    /// Sessions ended for idleness (ticket, when they would have expired): every instance is
    /// told, and their tokens stop passing.
    pub ended: Vec<(u64, u64)>,
    /// The room after the step.
    pub stats: Stats,
}

/// The line's store.
pub enum Store {
    /// In this process: one instance only.
    Memory(MemoryStore),
    /// Redis (one server or a cluster), shared by every instance (boxed: it is much larger
    /// than the other).
    Redis(Box<RedisStore>),
}

/// The Redis servers `config` names, as `host:port` (never a password); none for memory.
pub fn addresses(config: &crate::config::StoreConfig) -> Vec<String> {
    let urls = config.url.iter().chain(&config.urls);
    urls.filter_map(|url| ::redis::Client::open(url.as_str()).ok())
        .map(|client| client.get_connection_info().addr().to_string())
        .collect()
}

impl Store {
    pub fn memory() -> Store {
        Store::Memory(MemoryStore::default())
    }

    /// Where the store is, for the log: `memory`, or Redis's `host:port` (each node given,
    /// for a cluster), never a password.
    pub fn address(&self) -> String {
        match self {
            Store::Memory(_) => "memory".to_owned(),
            Store::Redis(redis) => redis.address(),
        }
    }

    /// What the line of `room` holds, table by table, when it is in this process (the memory
    /// store); Redis keeps its own.
    pub fn held(&self, room: &str) -> Option<Vec<(&'static str, usize)>> {
        match self {
            Store::Memory(memory) => Some(memory.with(room, |line| line.held())),
            Store::Redis(_) => None,
        }
    }

    /// The store `[store]` names. Redis is reached with bounded timeouts (2 s to connect,
    /// 1 s per call), so a slow or lost Redis makes a call fail fast rather than hang.
    /// Redis is connected to at the first call, so an instance starts while it is down.
    /// Calls report to `metrics`.
    pub async fn from_config(
        config: &crate::config::StoreConfig,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Result<Store, StoreError> {
        use crate::config::StoreKind;
        let timeouts = (std::time::Duration::from_secs(2), std::time::Duration::from_secs(1));
        let mut store = match config.kind {
            StoreKind::Memory => return Ok(Store::memory()),
            StoreKind::Redis => {
                let url = config.url.as_deref().unwrap_or_default();
                RedisStore::connect(url, timeouts.0, timeouts.1).await?
            }
            StoreKind::RedisCluster => RedisStore::connect_cluster(&config.urls, timeouts.0, timeouts.1).await?,
        };
        store.set_metrics(metrics);
        Ok(Store::Redis(Box::new(store)))
    }

    /// Whether the store answered in the last `within`: always for the memory store.
    pub fn answered_within(&self, within: std::time::Duration) -> bool {
        match self {
            Store::Memory(_) => true,
            Store::Redis(store) => store.answered_within(within),
        }
    }

    /// Ask the store whether it answers (the memory store always does).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(store) => store.ping().await,
        }
    }

    /// Take a ticket; admitted at once when `admit_now` and nobody waits and there is room.
    pub async fn join(&self, room: &str, limits: &Limits, admit_now: bool, now: u64) -> Result<Joined, StoreError> {
        self.join_with_proof(room, limits, admit_now, now, None).await
    }

    /// [`join`](Self::join) with a proof of work, taken once across every instance (the
    /// memory store serves one instance, whose room takes it once).
    pub async fn join_with_proof(
        &self,
        room: &str,
        limits: &Limits,
        admit_now: bool,
        now: u64,
        proof: Option<u128>,
    ) -> Result<Joined, StoreError> {
        match self {
            Store::Memory(store) => Ok(store.with(room, |line| line.join(limits, admit_now, now))),
            Store::Redis(store) => store.join(room, limits, admit_now, now, proof).await,
        }
    }

    /// Take a pre-queue number for a scheduled sale (`number` 0; with the join's proof of
    /// work, taken once across every instance), or present one taken earlier; the seating
    /// once the sale started.
    pub async fn prequeue(
        &self,
        room: &str,
        limits: &Limits,
        event: u64,
        number: u64,
        now: u64,
        proof: Option<u128>,
    ) -> Result<Prequeued, StoreError> {
        match self {
            Store::Memory(store) => Ok(store.with(room, |line| line.prequeue(limits, event, number))),
            Store::Redis(store) => store.prequeue(room, limits, event, number, now, proof).await,
        }
    }

    /// Start a scheduled sale once: its pre-queue takes its places in the order `seed` draws
    /// (`shuffled`), or in the order of arrival.
    pub async fn seat(
        &self,
        room: &str,
        limits: &Limits,
        event: u64,
        draw: (&Seed, bool),
        now: u64,
    ) -> Result<Seated, StoreError> {
        match self {
            Store::Memory(store) => Ok(store.with(room, |line| line.seat(event, *draw.0, draw.1, now))),
            Store::Redis(store) => store.seat(room, limits, event, draw, now).await,
        }
    }

    /// Grant turns by rate and capacity (skipping, when `absence` is judged, those who left
    /// without a word, and ending idle sessions), announce the new cursor to every instance,
    /// and report the room.
    pub async fn advance(
        &self,
        room: &str,
        limits: &Limits,
        now: u64,
        absence: Absence,
    ) -> Result<Advanced, StoreError> {
        match self {
            Store::Memory(store) => Ok(store.with(room, |line| {
                let step = line.advance(limits, now, absence);
                Advanced { granted: step.granted, ended: step.ended, stats: line.stats(limits, now) }
            })),
            Store::Redis(store) => store.advance(room, limits, now, absence, None).await,
        }
    }

    /// Put this instance's reading of the upstream's health (`[rooms.adaptive]`) where the
    /// room's leader reads it.
    pub async fn report_health(&self, room: &str, reading: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(store) => {
                store.report_health(room, reading);
                Ok(())
            }
            Store::Redis(store) => store.report_health(room, reading).await,
        }
    }

    /// Every instance's last reading of the upstream's health, by instance.
    pub async fn read_health(&self, room: &str) -> Result<Vec<(String, String)>, StoreError> {
        match self {
            Store::Memory(store) => Ok(store.read_health(room)),
            Store::Redis(store) => store.read_health(room).await,
        }
    }

    /// Remove the readings of instances gone (stale for three windows).
    pub async fn forget_health(&self, room: &str, instances: &[String]) -> Result<(), StoreError> {
        match self {
            Store::Memory(store) => {
                store.forget_health(room);
                Ok(())
            }
            Store::Redis(store) => store.forget_health(room, instances).await,
        }
    }

    /// Grant the next `count` turns now, outside the rate budget (`max_active` still holds),
    /// and announce the new cursor: an operator's batch.
    pub async fn admit(
        &self,
        room: &str,
        limits: &Limits,
        count: u32,
        now: u64,
        absence: Absence,
    ) -> Result<Advanced, StoreError> {
        match self {
            Store::Memory(store) => Ok(store.with(room, |line| {
                let granted = line.admit(limits, count, now, absence);
                Advanced { granted, ended: Vec::new(), stats: line.stats(limits, now) }
            })),
            Store::Redis(store) => store.advance(room, limits, now, absence, Some(count)).await,
        }
    }

    /// Present a ticket: redeem a granted turn once, or learn the position.
    pub async fn redeem(
        &self,
        room: &str,
        limits: &Limits,
        ticket: u64,
        now: u64,
        absence: Absence,
    ) -> Result<Redeemed, StoreError> {
        match self {
            Store::Memory(store) => Ok(store.with(room, |line| line.redeem(limits, ticket, now, absence))),
            Store::Redis(store) => store.redeem(room, limits, ticket, now, absence).await,
        }
    }

    /// End a session whose token expires at `expires_at`; its slot frees at once (and with
    /// Redis, every instance is told).
    pub async fn release(
        &self,
        room: &str,
        limits: &Limits,
        ticket: u64,
        expires_at: u64,
        now: u64,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(store) => Ok(store.with(room, |line| line.release(ticket))),
            Store::Redis(store) => store.release(room, limits, ticket, expires_at, now).await,
        }
    }

    /// Give up a place, a grant or a session.
    pub async fn leave(&self, room: &str, limits: &Limits, ticket: u64, now: u64) -> Result<(), StoreError> {
        match self {
            Store::Redis(store) => store.leave(room, limits, ticket, now).await,
            Store::Memory(store) => {
                store.with(room, |line| line.leave(ticket));
                Ok(())
            }
        }
    }

    /// Record that these waiters are still here and these sessions (ticket, token expiry) in
    /// use: one bounded batch per scheduler step.
    pub async fn touch(
        &self,
        room: &str,
        limits: &Limits,
        waiters: &[u64],
        sessions: &[(u64, u64)],
        now: u64,
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory(store) => {
                store.with(room, |line| line.touch(waiters, sessions, now));
                Ok(())
            }
            Store::Redis(store) => store.touch(room, limits, waiters, sessions, now).await,
        }
    }

    /// Extend an active session (token renewal); false when it has ended.
    pub async fn renew(
        &self,
        room: &str,
        limits: &Limits,
        ticket: u64,
        until: u64,
        now: u64,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(store) => Ok(store.with(room, |line| line.renew(ticket, until, now))),
            Store::Redis(store) => store.renew(room, limits, ticket, until, now).await,
        }
    }

    /// Keep the estimate of the store's clock fresh (once a second at most): Redis refuses a
    /// call that reaches it after its caller gave up on it.
    pub async fn keep_time(&self) {
        if let Store::Redis(store) = self {
            store.keep_time().await;
        }
    }

    /// Whether this instance may advance `room` now: always with the memory store; with
    /// Redis, while it holds the room's lease (taken or renewed by this call).
    pub async fn hold_lease(&self, room: &str, lease: std::time::Duration) -> Result<Lease, StoreError> {
        match self {
            Store::Memory(_) => Ok(Lease::Held),
            Store::Redis(store) => store.hold_lease(room, lease).await,
        }
    }

    /// Give up the lease of `room` if this instance holds it (a graceful stop).
    pub async fn drop_lease(&self, room: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(store) => store.drop_lease(room).await,
        }
    }

    /// A room's live overrides as the store keeps them, with their version (the memory
    /// store keeps them for the one instance).
    pub async fn overrides(&self, room: &str, limits: &Limits, now: u64) -> Result<(Overrides, u64), StoreError> {
        match self {
            Store::Memory(store) => Ok(store.overrides(room)),
            Store::Redis(store) => parse_overrides(store.settings(room, limits, None, false, now).await?),
        }
    }

    /// Merge `change` into a room's live overrides, or clear them all (`None`); every instance
    /// is told. What is in force after, with its version.
    pub async fn change_overrides(
        &self,
        room: &str,
        limits: &Limits,
        change: Option<&Overrides>,
        now: u64,
    ) -> Result<(Overrides, u64), StoreError> {
        match self {
            Store::Memory(store) => Ok(store.change_overrides(room, change)),
            Store::Redis(store) => {
                let json = change.map(|change| serde_json::to_string(change).expect("overrides serialize"));
                parse_overrides(store.settings(room, limits, json.as_deref(), change.is_none(), now).await?)
            }
        }
    }

    /// This instance's call opening `ticket`'s session failed (it may have run, its answer
    /// lost): the ticket's holder may take that session again. The memory store never loses
    /// an answer.
    pub async fn unanswered(&self, room: &str, limits: &Limits, ticket: u64, now: u64) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(store) => store.unanswered(room, limits, ticket, now).await,
        }
    }

    /// Which line `room` has, as far as this instance knows (0 before it knows): tickets and
    /// tokens are minted for it.
    pub fn line(&self, room: &str) -> u64 {
        match self {
            Store::Memory(store) => store.with(room, |line| line.id()),
            Store::Redis(store) => store.line(room),
        }
    }

    /// This instance's id (a new one each run): the leases and sessions it holds are known
    /// by it.
    pub fn instance(&self) -> &str {
        match self {
            Store::Memory(_) => "memory",
            Store::Redis(store) => store.instance(),
        }
    }

    pub async fn stats(&self, room: &str, limits: &Limits, now: u64) -> Result<Stats, StoreError> {
        match self {
            Store::Memory(store) => Ok(store.with(room, |line| line.stats(limits, now))),
            Store::Redis(store) => store.stats(room, limits, now).await,
        }
    }
}
