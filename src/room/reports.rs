//! What a room tells the store of its visitors, in batches at each step: waiters seen
//! (touches), sessions in use, and departures (sessions ended, places given up, redemptions
//! nobody got the answer to), each kept until the store has heard it; and the ended sessions
//! whose tokens stop passing here.

use super::*;

/// Something a visitor did that the store must hear of, kept until it has: a leave is never
/// lost to an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Departure {
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
pub(super) struct Departures {
    pub(super) queue: VecDeque<Departure>,
    held: HashSet<(u8, u64)>,
}

impl Room {
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

    /// Whether the session that `ticket` opened has ended.
    pub fn is_revoked(&self, ticket: u64) -> bool {
        ticket != 0 && self.revoked.read().is_ok_and(|revoked| revoked.contains_key(&ticket))
    }

    /// Record that a waiter is still here; sent to the store in a batch by the next step.
    pub fn touch(&self, ticket: u64) {
        self.touch_all([ticket]);
    }

    pub(super) fn touch_all(&self, tickets: impl IntoIterator<Item = u64>) {
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

    pub(super) fn depart(&self, departure: Departure) {
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
    pub(super) async fn report(&self, store: &Store, now: u64) -> Result<(), StoreError> {
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
    pub(super) fn prune(&self, now: u64) {
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
}
