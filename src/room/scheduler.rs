//! A room's scheduler: every [`STEP`], the lease, then the line advanced (the leader) or read
//! (a follower), and the snapshot published; what it learns of the store's health.

use super::*;

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
    let mut scheduler = Scheduler::new(room.clone());
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => break,
        }
        let span = tracing::debug_span!("step", room = %room.id);
        // Errors are logged by the step, once per outage.
        let _ = tracing::Instrument::instrument(scheduler.step(&store, clock.now_ms()), span).await;
    }
    room.resign(&store).await;
}

/// A room's scheduler: the one task that steps it, and the bookkeeping only that task keeps.
/// What other tasks set or read (whether it leads, hears the leader, must read, the line is
/// empty) stays on the [`Room`] as signals.
pub struct Scheduler {
    room: Arc<Room>,
    /// When this instance last tried the room's lease, and when a follower tries it next (ms).
    lease_tried_at: u64,
    lease_retry_at: u64,
    /// When this instance last advanced the line (ms).
    advanced_at: u64,
    /// The epoch of the line at the last read.
    epoch: u64,
}

impl Scheduler {
    pub fn new(room: Arc<Room>) -> Scheduler {
        Scheduler { room, lease_tried_at: 0, lease_retry_at: 0, advanced_at: 0, epoch: 0 }
    }

    /// One scheduler step: release sessions ended while the store was away, flush liveness,
    /// advance the line (when open, and when this instance holds the room's lease), publish.
    /// A follower reads the room every [`READ_EVERY`] (every step while it does not hear the
    /// leader); between reads it learns cursor moves from the leader's announcements.
    pub async fn step(&mut self, store: &Store, now: u64) -> Result<(), StoreError> {
        store.keep_time().await;
        self.room.at(now);
        self.room.prune(now);
        let was_available = self.room.is_available();
        let result = self.try_step(store, now, was_available).await;
        // An outage is two lines, its start (here, or where a request first met it) and its
        // end, each written by whoever changed the room's availability;
        // `vestibule_store_errors_total` and `vestibule_store_up` count it between.
        if self.room.set_available(result.is_ok(), now) {
            match &result {
                Err(error) => store_lost(&self.room, store, error),
                Ok(()) => {
                    tracing::info!(room = %self.room.id, store = %store.address(), "the store is back: the line moves again")
                }
            }
        }
        result
    }

    async fn try_step(&mut self, store: &Store, now: u64, was_available: bool) -> Result<(), StoreError> {
        self.room.report(store, now).await?;
        // A sale that started is seated at once by whichever instance steps first, and every
        // instance learns the seating (its pre-queue visitors are then seen at their places).
        // While a line just restored waits for every instance to merge, the next step seats.
        match self.room.seating(store, now).await {
            Ok(_) | Err(StoreError::Restoring) => {}
            Err(error) => return Err(error),
        }
        let settings = self.room.settings();
        let leading = self.lease(store, now, was_available).await?;
        let open = settings.state() == RoomState::Open;
        self.room.listen(store, &settings, open && leading && was_available, now).await?;
        let stats = self.advance_or_read(store, &settings, leading && was_available, now).await?;
        let restored = match stats {
            Some(stats) => self.learn(store, &settings, stats, now).await?,
            None => false,
        };
        self.room.publish(stats, restored);
        Ok(())
    }

    /// Hold the room's lease, or try to take it when it is due: whether this instance leads.
    async fn lease(&mut self, store: &Store, now: u64, was_available: bool) -> Result<bool, StoreError> {
        let was_leading = self.room.leading.load(Ordering::Relaxed);
        let try_lease = if was_leading {
            // Renewed at every step while the line moves; an empty line's only as often as
            // it is advanced (LEASE is three times that), and at once after the store was away
            // (another instance may have taken the lease meanwhile).
            !was_available
                || !self.room.empty.load(Ordering::Relaxed)
                || now >= self.lease_tried_at + EMPTY_STEP.as_millis() as u64
        } else {
            !self.room.hearing.load(Ordering::Relaxed)
                || self.room.lease_free.swap(false, Ordering::Relaxed)
                || now >= self.lease_retry_at
        };
        let leading = if try_lease {
            let lease = store.hold_lease(&self.room.id, LEASE).await?;
            // Only a call that was answered counts as tried: after a failed one, the next step
            // tries again.
            self.lease_tried_at = now;
            match lease {
                Lease::Held => true,
                Lease::Other(left) => {
                    let wait = (left + LEASE_MARGIN).min(LEASE_TRY_EVERY);
                    self.lease_retry_at = now + wait.as_millis() as u64;
                    false
                }
            }
        } else {
            was_leading
        };
        self.room.leading.store(leading, Ordering::Relaxed);
        self.room.metrics.leader.set(i64::from(leading));
        Ok(leading)
    }

    /// The leader of an open room advances the line (an empty one once per [`EMPTY_STEP`]); a
    /// follower, or a room not open, reads it when a read is due. The room as the store
    /// reported it, if it was asked.
    async fn advance_or_read(
        &mut self,
        store: &Store,
        settings: &Settings,
        leads: bool,
        now: u64,
    ) -> Result<Option<Stats>, StoreError> {
        let limits = self.room.limits_of(settings);
        if settings.state() == RoomState::Open && leads {
            let due =
                !self.room.empty.load(Ordering::Relaxed) || now >= self.advanced_at + EMPTY_STEP.as_millis() as u64;
            if !due {
                return Ok(None);
            }
            let advanced = store.advance(&self.room.id, &limits, now, self.room.absence(now)).await?;
            self.advanced_at = now;
            self.room.empty.store(advanced.stats.is_empty(), Ordering::Relaxed);
            self.room.metrics.admissions.inc_by(u64::from(advanced.granted));
            for (ticket, until) in advanced.ended {
                self.room.revoke(ticket, until);
            }
            return Ok(Some(advanced.stats));
        }
        let read_due = self.room.leading.load(Ordering::Relaxed)
            || self.room.read_due.swap(false, Ordering::Relaxed)
            || now >= self.room.read_at.load(Ordering::Relaxed) + self.room.read_every().as_millis() as u64;
        if !read_due {
            return Ok(None);
        }
        let stats = store.stats(&self.room.id, &limits, now).await.inspect_err(|_| {
            self.room.read_due.store(true, Ordering::Relaxed); // still owed
        })?;
        self.room.empty.store(stats.is_empty(), Ordering::Relaxed);
        Ok(Some(stats))
    }

    /// Take in what the store reported: a line rebuilt since the last read is told the
    /// waiters seen here lately, and live overrides changed elsewhere are read. Whether the
    /// line was rebuilt.
    async fn learn(&mut self, store: &Store, settings: &Settings, stats: Stats, now: u64) -> Result<bool, StoreError> {
        let before = std::mem::replace(&mut self.epoch, stats.epoch);
        let restored = before != 0 && before != stats.epoch;
        if restored {
            // The rebuilt line never saw its waiters: tell it those seen here lately (pages
            // without a feed come back only every 20 s).
            let recent: Vec<u64> = self.room.recent.lock().map(|r| r.keys().copied().collect()).unwrap_or_default();
            self.room.touch_all(recent);
        }
        self.room.read_at.fetch_max(now, Ordering::Relaxed);
        self.room.observe_line(stats.line);
        self.room.observe_stats(stats, now);
        // Another instance changed the live overrides (and the announcement did not reach us,
        // or not yet): read them.
        if stats.settings_version > settings.version {
            self.room.read_overrides(store, now).await?;
        }
        Ok(restored)
    }
}

impl Room {
    /// Put this instance's reading of the upstream in the store; while leading an open room,
    /// judge a window of every instance's readings and set the rate. What fails here is
    /// logged and the step goes on: the line does not pause over its telemetry.
    pub(super) async fn listen(
        &self,
        store: &Store,
        settings: &Settings,
        leads: bool,
        now: u64,
    ) -> Result<(), StoreError> {
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
    pub(super) fn read_every(&self) -> Duration {
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

    /// Read the live overrides from the store and put them in force (another instance changed
    /// them).
    pub async fn read_overrides(&self, store: &Store, now: u64) -> Result<(), StoreError> {
        let (overrides, version) = store.overrides(&self.id, &self.limits(), now).await?;
        self.apply_overrides(overrides, version);
        Ok(())
    }

    /// Publish the snapshot every page and feed reads: state and message as in force now (a
    /// change made during this step's awaits is not written over with the step's older view),
    /// and what the store reported, if it was asked.
    pub(super) fn publish(&self, stats: Option<Stats>, restored: bool) {
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
    pub(super) fn observe_stats(&self, stats: Stats, now: u64) {
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
}
