//! The line: pure admission logic with no I/O. Time is passed in (milliseconds), so rate and
//! expiry are tested without waiting.
//!
//! A room's line is two counters and a few sets, after the virtual-line systems of the seed projects:
//! `last_ticket` is the last turn given out, `cursor` the last turn granted; every ticket up
//! to the cursor has been granted or skipped. Turns are granted in ticket order (FIFO), by a
//! token bucket refilled at `admit_per_minute` and holding at most one second's worth, and
//! never beyond the free capacity (`max_active` minus sessions active and grants outstanding).
//! The Redis store runs the same rules in Lua (`store/lua/`); the memory store runs this code,
//! on the same sorted sets ([`sorted`]).
//!
//! Nobody holds a place for nobody:
//! - a ticket is *unconfirmed* until its holder is seen after the join (the instance that
//!   answered reports it in its next batch). An answer can be lost on the way (a store call
//!   that ran after its instance gave up on it): an unconfirmed ticket that reaches the front
//!   more than [`CONFIRM_MS`] after its join is skipped;
//! - a waiter not seen for `abandon_ms` is skipped at the front; a session not used for
//!   `idle_ms` ends and frees its place;
//! - absence is judged only when the caller says every instance has had the time to report
//!   who it saw ([`Absence::Judge`]): not in the first seconds after a store outage, when
//!   what the instances saw meanwhile is still on its way.

pub mod overrides;
pub use crate::wire::shuffle;
mod sorted;

pub use overrides::{Overrides, RoomState};

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use sorted::Sorted;

/// How a room admits, in the line's own units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub admit_per_minute: u32,
    pub max_active: u32,
    /// How long a granted turn waits to be redeemed before it lapses.
    pub grant_ms: u64,
    /// How long a session lasts.
    pub session_ms: u64,
    /// A waiter not seen for this long has left.
    pub abandon_ms: u64,
    /// A session not used for this long has ended.
    pub idle_ms: u64,
    /// Most tickets waiting (after the cursor, leavers not counted) before a join is refused
    /// as [`Joined::Full`]; 0 for no limit.
    pub max_waiting: u64,
    /// The rate the room's leader decided from the upstream's health (`[rooms.adaptive]`),
    /// per minute; 0 for none. Turns are granted at the lower of it and `admit_per_minute`.
    pub adaptive_per_minute: u32,
}

/// The rate budget counts in 1/60000ths of a turn, so that one millisecond refills exactly
/// `admit_per_minute` units: integer arithmetic, no drift (ten refills of 0.1 turn in floating
/// point fall just short of one turn).
const TURN: u64 = 60_000;

/// How long a new ticket may go unconfirmed by its holder before it counts as held by nobody. Its instance confirms it within a scheduler step; a holder whose instance died
/// first reconnects to another within a few seconds.
pub const CONFIRM_MS: u64 = 10_000;

/// How long the tickets of a line that had to be rebuilt (or that grew to a ticket it never
/// gave out) wait to be seen again before they are skipped: every instance reports the waiters
/// it saw well within it.
pub const RESEE_MS: u64 = 5_000;

/// How long the places of a sale's pre-queue wait to be seen after the start before they are
/// skipped: every instance reports at once the pre-queue numbers it saw lately, as their
/// places.
pub const SEATED_SEE_MS: u64 = 10_000;

/// How long the places of a pre-queue of `count` wait to be seen: [`SEATED_SEE_MS`], and the
/// time the instances take to report that many (a thousand per 100 ms step each: 0.1 ms a
/// place), so that nobody present is skipped at a large sale's start.
pub fn seated_see_ms(count: u64) -> u64 {
    SEATED_SEE_MS + count / 10
}

/// Most tickets skipped (left, absent) by one step: the rest are skipped by the next steps, so
/// that a step's work is bounded however many left.
pub const MAX_SKIPS: usize = 1_000;

/// Most sessions ended for idleness, or expired, by one call.
pub const MAX_ENDS: usize = 1_000;

impl Limits {
    /// The rate in force, per minute: `admit_per_minute`, or the adaptive rate when lower.
    pub fn per_minute(&self) -> u32 {
        match self.adaptive_per_minute {
            0 => self.admit_per_minute,
            adaptive => adaptive.min(self.admit_per_minute),
        }
    }

    /// Budget units refilled per millisecond.
    fn refill_per_ms(&self) -> u64 {
        u64::from(self.per_minute())
    }

    /// The bucket holds one second's worth of turns, and at least one turn.
    fn burst(&self) -> u64 {
        (u64::from(self.per_minute()) * 1_000).max(TURN)
    }
}

/// Whether a step may take absent holders as gone now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Absence {
    /// Yes: waiters not seen and sessions not used for long have left.
    Judge,
    /// Not yet (the store was away until a moment ago, and the instances are still reporting
    /// who they saw meanwhile): an absent waiter at the front holds the line a moment.
    Excuse,
}

/// The result of joining the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// Nobody was waiting and there was room: admitted at once; the ticket names the session.
    Admitted { ticket: u64, expires_at: u64 },
    /// In line with this ticket.
    Waiting { ticket: u64 },
    /// Not in line: `max_waiting` people wait already. No ticket was taken.
    Full,
}

impl Joined {
    /// The ticket taken (0 for none: the line was full).
    pub fn ticket(&self) -> u64 {
        match self {
            Joined::Admitted { ticket, .. } | Joined::Waiting { ticket } => *ticket,
            Joined::Full => 0,
        }
    }
}

/// A scheduled sale's pre-queue given its places (docs/sales.md): pre-queue number `p` (1 to
/// `count`) holds ticket `base + place(p)`, its place in the order `seed` draws
/// ([`shuffle`]). Made once per event; a store that lost it gets it back from the instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seated {
    /// The event (its start, unix seconds).
    pub event: u64,
    /// The last ticket given before the start.
    pub base: u64,
    /// Pre-queue numbers given.
    pub count: u64,
    /// When (ms).
    pub at: u64,
    pub seed: shuffle::Seed,
    /// Drawn in the seed's order (`false`: the order of arrival).
    pub shuffled: bool,
}

/// The result of taking (or presenting) a pre-queue number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prequeued {
    /// In the pre-queue with this number.
    Number(u64),
    /// `max_waiting` numbers were given already: none taken.
    Full,
    /// The sale started: the pre-queue has its places.
    Seated(Seated),
}

/// Why a ticket no longer holds a place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// Granted, but not redeemed in time.
    Lapsed,
    /// Already redeemed (a copied ticket, or a second tab).
    Used,
    /// Given up, or not seen for `abandon_ms`.
    Left,
    /// Not a ticket of this line (a line that was reset).
    Unknown,
}

/// The result of presenting a ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeemed {
    /// The turn was granted: now a session until `expires_at`.
    Admitted {
        expires_at: u64,
    },
    /// Still waiting, this many places from the front (1 = next).
    Waiting {
        position: u64,
    },
    /// The turn was redeemed a moment ago and its session not used yet: this may be its
    /// holder again, whose answer was lost, or a copy of the ticket. Ask again in a moment.
    Pending,
    Gone(Gone),
}

/// What a room looks like now.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stats {
    pub cursor: u64,
    pub last_ticket: u64,
    pub active: u32,
    pub outstanding: u32,
    /// Tickets after the cursor (including leavers not yet skipped).
    pub waiting: u64,
    /// Admissions per second observed over the last minute; `None` before any.
    pub rate_per_second: Option<f64>,
    /// Admissions in the last minute.
    pub admitted_last_minute: u64,
    /// Which life of the line this is: a shared store gives a line a new epoch when it had
    /// to rebuild it. Always 0 in memory.
    pub epoch: u64,
    /// Which line this is: kept through every rebuild, new when the line starts over (a
    /// memory store restarted, a store emptied with nobody left who knew the line). Tickets
    /// and tokens carry it.
    pub line: u64,
    /// Which change of the room's live overrides the store holds (0: none; the memory store
    /// leaves them to the room).
    pub settings_version: u64,
    /// The adaptive rate in force (`[rooms.adaptive]`), per minute, as the leader decided it.
    pub adaptive_per_minute: Option<u32>,
    /// Pre-queue numbers given for the room's latest scheduled sale, and which sale (0: none).
    pub prequeued: u64,
    pub prequeue_event: u64,
}

impl Stats {
    /// Nobody waiting, no turn outstanding, no session: nothing to move.
    pub fn is_empty(&self) -> bool {
        self.waiting == 0 && self.outstanding == 0 && self.active == 0
    }
}

/// What a scheduler step did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Step {
    /// Turns granted.
    pub granted: u32,
    /// Sessions ended for idleness (ticket, when they would have expired): their tokens must
    /// stop passing.
    pub ended: Vec<(u64, u64)>,
}

/// The position of `ticket` when the cursor stands at `cursor` (1 = next).
pub fn position(ticket: u64, cursor: u64) -> u64 {
    ticket.saturating_sub(cursor)
}

/// Estimated seconds until `position` is reached at `rate_per_second`.
pub fn eta_seconds(position: u64, rate_per_second: Option<f64>) -> Option<u64> {
    let rate = rate_per_second.filter(|r| *r > 0.0)?;
    Some((position as f64 / rate).ceil() as u64)
}

/// Spent tickets remembered for their "why" message; memory stays bounded in long sales.
const MAX_GONE: usize = 65_536;

/// Admissions per second from `count` admissions in the window, the first at `first`:
/// intervals between admissions, measured up to now so that the rate falls when admissions
/// stop. One admission alone says nothing about a rate.
pub fn observed_rate(count: usize, first: Option<u64>, now: u64) -> Option<f64> {
    match first {
        Some(first) if count >= 2 => {
            let span = now.saturating_sub(first).max(1_000);
            Some((count - 1) as f64 * 1_000.0 / span as f64)
        }
        _ => None,
    }
}

/// How far back admissions are counted for the observed rate.
const RATE_WINDOW_MS: u64 = 60_000;

/// One room's line.
#[derive(Debug, Default)]
pub struct Line {
    /// Which line this is (see [`Stats::line`]).
    id: u64,
    last_ticket: u64,
    cursor: u64,
    /// Rate budget in units of 1/60000 turn, as of `budget_at` (which never moves back).
    budget: u64,
    budget_at: u64,
    /// Granted turns not yet redeemed: ticket → granted at.
    grants: Sorted,
    /// Active sessions: ticket → expires at.
    sessions: Sorted,
    /// Active sessions: ticket → last used.
    used: Sorted,
    /// Sessions nobody has been seen using yet: ticket → opened at.
    fresh: Sorted,
    /// Waiting tickets → last seen.
    seen: Sorted,
    /// Waiting tickets nobody has been seen holding since the join: ticket → joined at.
    unconfirmed: Sorted,
    /// Tickets after the cursor whose holders left.
    left: BTreeSet<u64>,
    /// When the line last grew to a ticket it never gave out (one beyond the last was
    /// presented): the tickets in between wait [`RESEE_MS`] from then for their holders.
    grown_at: u64,
    /// Tickets at or before the cursor that were used, skipped or lapsed: presenting them
    /// again says why. The most recent [`MAX_GONE`] only; older ones count as used.
    gone: BTreeMap<u64, Gone>,
    /// Admission times over the last minute, for the observed rate.
    admitted: VecDeque<u64>,
    started: bool,
    /// The event of the last pre-queue, and the last number it gave.
    prequeue_event: u64,
    prequeue_last: u64,
    /// The last sale's seating.
    seated: Option<Seated>,
}

impl Line {
    /// A new line named `id`.
    pub fn new(id: u64) -> Line {
        Line { id, ..Line::default() }
    }

    /// Which line this is.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Entries held per table: what the line keeps of its visitors (for the admin view and
    /// the soak bench).
    pub fn held(&self) -> Vec<(&'static str, usize)> {
        vec![
            ("grants", self.grants.len()),
            ("sessions", self.sessions.len()),
            ("used", self.used.len()),
            ("fresh", self.fresh.len()),
            ("seen", self.seen.len()),
            ("unconfirmed", self.unconfirmed.len()),
            ("left", self.left.len()),
            ("gone", self.gone.len()),
            ("admitted_last_minute", self.admitted.len()),
        ]
    }

    fn start(&mut self, limits: &Limits, now: u64) {
        if !self.started {
            self.started = true;
            self.budget = limits.burst();
            self.budget_at = now;
        }
    }

    /// Refill the budget up to `now`. Its time never moves back: a caller whose clock lags
    /// (another instance, a call that started earlier) neither gets nor gives credit.
    fn refill(&mut self, limits: &Limits, now: u64) {
        self.start(limits, now);
        let elapsed = now.saturating_sub(self.budget_at);
        self.budget = self.budget.saturating_add(elapsed.saturating_mul(limits.refill_per_ms())).min(limits.burst());
        self.budget_at = self.budget_at.max(now);
    }

    /// End sessions and grants whose time is up; forget old admissions.
    fn expire(&mut self, limits: &Limits, now: u64) {
        for (ticket, _) in self.sessions.pop_until(now, MAX_ENDS) {
            self.used.remove(ticket);
            self.fresh.remove(ticket);
        }
        if let Some(granted_before) = now.checked_sub(limits.grant_ms) {
            for (ticket, _) in self.grants.pop_until(granted_before, MAX_ENDS) {
                self.forget(ticket, Gone::Lapsed);
            }
        }
        while self.admitted.front().is_some_and(|at| *at + RATE_WINDOW_MS <= now) {
            self.admitted.pop_front();
        }
    }

    /// End sessions not used for `idle_ms`; returns them with their expiry.
    fn end_idle(&mut self, limits: &Limits, now: u64) -> Vec<(u64, u64)> {
        let Some(used_before) = now.checked_sub(limits.idle_ms) else { return Vec::new() };
        let idle = self.used.pop_until(used_before, MAX_ENDS);
        idle.into_iter()
            .filter_map(|(ticket, _)| {
                self.fresh.remove(ticket);
                Some((ticket, self.sessions.remove(ticket)?))
            })
            .collect()
    }

    /// Remember why `ticket` no longer holds a place, forgetting the oldest beyond MAX_GONE.
    fn forget(&mut self, ticket: u64, why: Gone) {
        self.gone.insert(ticket, why);
        if self.gone.len() > MAX_GONE {
            self.gone.pop_first();
        }
    }

    fn free(&self, limits: &Limits) -> u32 {
        let used = (self.sessions.len() + self.grants.len()) as u32;
        limits.max_active.saturating_sub(used)
    }

    fn open_session(&mut self, limits: &Limits, ticket: u64, now: u64) -> u64 {
        let expires_at = now + limits.session_ms;
        self.sessions.add(ticket, expires_at);
        self.used.add(ticket, now);
        self.fresh.add(ticket, now);
        expires_at
    }

    /// Take a ticket. When `admit_now` (the room is open) and nobody waits and there is room
    /// and budget, the ticket is granted and redeemed at once.
    pub fn join(&mut self, limits: &Limits, admit_now: bool, now: u64) -> Joined {
        self.refill(limits, now);
        self.expire(limits, now);
        if limits.max_waiting > 0 && self.waiting_here(limits, now) >= limits.max_waiting {
            return Joined::Full;
        }
        self.last_ticket += 1;
        let ticket = self.last_ticket;
        let nobody_waiting = self.cursor + 1 == ticket;
        if admit_now && nobody_waiting && self.free(limits) > 0 && self.budget >= TURN {
            self.cursor = ticket;
            self.budget -= TURN;
            self.admitted.push_back(now);
            let expires_at = self.open_session(limits, ticket, now);
            return Joined::Admitted { ticket, expires_at };
        }
        self.seen.add(ticket, now);
        self.unconfirmed.add(ticket, now);
        Joined::Waiting { ticket }
    }

    /// Take a pre-queue number for `event` (`number` 0), or present one taken earlier, which
    /// the count rises to (a store that lost it learns it back). Once the event is seated,
    /// its seating instead. A new event's pre-queue starts from 1.
    pub fn prequeue(&mut self, limits: &Limits, event: u64, number: u64) -> Prequeued {
        if let Some(seated) = self.seated.filter(|seated| seated.event == event) {
            return Prequeued::Seated(seated);
        }
        if self.prequeue_event != event {
            if number > 0 && self.prequeue_event != 0 {
                // A number of another sale than the one in its pre-queue: not counted.
                return Prequeued::Number(number);
            }
            self.prequeue_event = event;
            self.prequeue_last = 0;
        }
        if number > 0 {
            self.prequeue_last = self.prequeue_last.max(number);
            return Prequeued::Number(number);
        }
        if limits.max_waiting > 0 && self.prequeue_last >= limits.max_waiting {
            return Prequeued::Full;
        }
        self.prequeue_last += 1;
        Prequeued::Number(self.prequeue_last)
    }

    /// Start `event`: its pre-queue takes the tickets after the last one given, in the order
    /// `seed` draws, and later joins line up behind. Once: calling again returns the seating
    /// made, with its seed.
    pub fn seat(&mut self, event: u64, seed: shuffle::Seed, shuffled: bool, now: u64) -> Seated {
        if let Some(seated) = self.seated.filter(|seated| seated.event == event) {
            return seated;
        }
        let count = if self.prequeue_event == event { self.prequeue_last } else { 0 };
        let seated = Seated { event, base: self.last_ticket, count, at: now, seed, shuffled };
        self.last_ticket += count;
        self.seated = Some(seated);
        seated
    }

    /// Waiters still here: in line and seen within `abandon_ms`, less those whose join was
    /// never confirmed by its holder within [`CONFIRM_MS`] (a bot without cookies, an answer
    /// lost). Leavers are out of `seen` already. Costs as many steps as there are absent
    /// waiters the line has not reached yet.
    fn waiting_here(&self, limits: &Limits, now: u64) -> u64 {
        let gone_before = now.checked_sub(limits.abandon_ms);
        let absent = gone_before.map_or(0, |before| self.seen.count_between(None, before));
        let unconfirmed =
            now.checked_sub(CONFIRM_MS).map_or(0, |before| self.unconfirmed.count_between(gone_before, before));
        (self.seen.len() - absent).saturating_sub(unconfirmed) as u64
    }

    /// Whether the waiting `ticket` is absent now: not seen for `abandon_ms`, unconfirmed for
    /// [`CONFIRM_MS`], or never seen by this line since it grew to it [`RESEE_MS`] ago.
    /// `None` while it may still show up.
    fn absent(&self, limits: &Limits, ticket: u64, now: u64) -> Option<bool> {
        match self.seen.score(ticket) {
            Some(seen) => Some(
                seen + limits.abandon_ms <= now
                    || self.unconfirmed.score(ticket).is_some_and(|at| at + CONFIRM_MS <= now),
            ),
            None if now < self.grown_at + RESEE_MS => None,
            None if self
                .seated
                .is_some_and(|s| ticket > s.base && ticket <= s.base + s.count && now < s.at + SEATED_SEE_MS) =>
            {
                None
            }
            None => Some(true),
        }
    }

    /// Grant turns in ticket order, within budget and capacity; skip leavers and, when
    /// absence is judged, waiters who are absent, and end idle sessions. At most
    /// [`MAX_SKIPS`] tickets are skipped per step.
    pub fn advance(&mut self, limits: &Limits, now: u64, absence: Absence) -> Step {
        self.refill(limits, now);
        self.expire(limits, now);
        let mut step = Step::default();
        if absence == Absence::Judge {
            step.ended = self.end_idle(limits, now);
        }
        step.granted = self.grant(limits, now, absence, None);
        step
    }

    /// Grant the next `count` turns now, outside the rate budget (an operator's batch);
    /// capacity still holds. How many were granted.
    pub fn admit(&mut self, limits: &Limits, count: u32, now: u64, absence: Absence) -> u32 {
        self.refill(limits, now);
        self.expire(limits, now);
        self.grant(limits, now, absence, Some(count))
    }

    /// Grant turns in ticket order, by the budget or up to `count`, within capacity, skipping
    /// leavers (and, when absence is judged, the absent).
    fn grant(&mut self, limits: &Limits, now: u64, absence: Absence, count: Option<u32>) -> u32 {
        let mut granted = 0;
        let mut skipped = 0;
        let may_grant = |line: &Line, granted: u32| match count {
            None => line.budget >= TURN,
            Some(count) => granted < count,
        };
        while self.cursor < self.last_ticket && may_grant(self, granted) && self.free(limits) > 0 && skipped < MAX_SKIPS
        {
            let ticket = self.cursor + 1;
            let skip = if self.left.remove(&ticket) {
                true
            } else {
                match self.absent(limits, ticket, now) {
                    Some(true) if absence == Absence::Judge => true,
                    Some(true) | None => break, // wait a moment for them to show up
                    Some(false) => false,
                }
            };
            self.cursor = ticket;
            self.seen.remove(ticket);
            self.unconfirmed.remove(ticket);
            if skip {
                skipped += 1;
                self.forget(ticket, Gone::Left);
                continue;
            }
            self.grants.add(ticket, now);
            if count.is_none() {
                self.budget -= TURN;
            }
            self.admitted.push_back(now);
            granted += 1;
        }
        granted
    }

    /// Present a ticket: redeem a granted turn (once), or learn the position. Presenting a
    /// waiting ticket is being seen. A ticket beyond the last keeps its place: it was given
    /// out by this line in an earlier life (tickets are signed), and the line grows to it.
    pub fn redeem(&mut self, limits: &Limits, ticket: u64, now: u64, absence: Absence) -> Redeemed {
        self.expire(limits, now);
        if ticket == 0 {
            return Redeemed::Gone(Gone::Unknown);
        }
        if ticket > self.last_ticket {
            self.last_ticket = ticket;
            self.grown_at = now;
        }
        if ticket > self.cursor {
            if self.left.contains(&ticket) {
                return Redeemed::Gone(Gone::Left);
            }
            let confirmed = !self.unconfirmed.contains(ticket);
            let stale = self.seen.score(ticket).is_some_and(|seen| seen + limits.abandon_ms <= now);
            if absence == Absence::Judge && confirmed && stale {
                // Not seen for too long: the place is given up now rather than at the front.
                self.seen.remove(ticket);
                self.left.insert(ticket);
                return Redeemed::Gone(Gone::Left);
            }
            self.seen.add(ticket, now);
            self.unconfirmed.remove(ticket);
            return Redeemed::Waiting { position: position(ticket, self.cursor) };
        }
        if self.grants.remove(ticket).is_some() {
            let expires_at = self.open_session(limits, ticket, now);
            self.forget(ticket, Gone::Used);
            return Redeemed::Admitted { expires_at };
        }
        if self.fresh.contains(ticket) {
            return Redeemed::Pending;
        }
        Redeemed::Gone(self.gone.get(&ticket).copied().unwrap_or(Gone::Used))
    }

    /// End the session that `ticket` opened; its slot frees at once.
    pub fn release(&mut self, ticket: u64) -> bool {
        self.used.remove(ticket);
        self.fresh.remove(ticket);
        self.sessions.remove(ticket).is_some()
    }

    /// Give up a place in line (or an unredeemed grant, or a session).
    pub fn leave(&mut self, ticket: u64) {
        if ticket > self.cursor && ticket <= self.last_ticket {
            self.seen.remove(ticket);
            self.unconfirmed.remove(ticket);
            self.left.insert(ticket);
        } else if self.grants.remove(ticket).is_some() {
            self.forget(ticket, Gone::Left);
        } else {
            self.release(ticket);
        }
    }

    /// Holders seen since the last report: waiters (a feed, a page, a status call) and
    /// sessions in use (an admitted request), each with its token's expiry.
    pub fn touch(&mut self, waiters: &[u64], sessions: &[(u64, u64)], now: u64) {
        for ticket in waiters {
            if *ticket > self.cursor && *ticket <= self.last_ticket && !self.left.contains(ticket) {
                self.seen.raise(*ticket, now);
                self.unconfirmed.remove(*ticket);
            }
        }
        for (ticket, _) in sessions {
            if self.sessions.contains(*ticket) {
                self.used.raise(*ticket, now);
                self.fresh.remove(*ticket);
            }
        }
    }

    /// Extend an active session to `until` (token renewal, which is a use too).
    pub fn renew(&mut self, ticket: u64, until: u64, now: u64) -> bool {
        match self.sessions.score(ticket) {
            Some(expires) => {
                self.sessions.add(ticket, until.max(expires));
                self.used.raise(ticket, now);
                self.fresh.remove(ticket);
                true
            }
            None => false,
        }
    }

    pub fn stats(&mut self, limits: &Limits, now: u64) -> Stats {
        self.expire(limits, now);
        let rate_per_second = observed_rate(self.admitted.len(), self.admitted.front().copied(), now);
        Stats {
            cursor: self.cursor,
            last_ticket: self.last_ticket,
            active: self.sessions.len() as u32,
            outstanding: self.grants.len() as u32,
            waiting: self.last_ticket - self.cursor,
            rate_per_second,
            admitted_last_minute: self.admitted.len() as u64,
            epoch: 0,
            line: self.id,
            settings_version: 0,
            adaptive_per_minute: (limits.adaptive_per_minute > 0).then_some(limits.per_minute()),
            prequeued: self.prequeue_last,
            prequeue_event: self.prequeue_event,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn limits(per_minute: u32, max_active: u32) -> Limits {
        Limits {
            admit_per_minute: per_minute,
            max_active,
            grant_ms: 120_000,
            session_ms: 600_000,
            abandon_ms: 120_000,
            idle_ms: 300_000,
            max_waiting: 0,
            adaptive_per_minute: 0,
        }
    }

    #[test]
    fn an_idle_room_admits_at_once_and_a_busy_one_queues_in_order() {
        let limits = limits(60, 10);
        let mut line = Line::default();
        assert!(matches!(line.join(&limits, true, 0), Joined::Admitted { ticket: 1, .. }));
        // The one-second budget is spent: the next visitors wait, in join order.
        assert_eq!(line.join(&limits, true, 0), Joined::Waiting { ticket: 2 });
        assert_eq!(line.join(&limits, true, 0), Joined::Waiting { ticket: 3 });
        assert_eq!(line.redeem(&limits, 3, 0, Absence::Judge), Redeemed::Waiting { position: 2 });
        assert_eq!(line.advance(&limits, 1_000, Absence::Judge).granted, 1);
        assert!(matches!(line.redeem(&limits, 2, 1_000, Absence::Judge), Redeemed::Admitted { .. }));
        assert_eq!(line.redeem(&limits, 3, 1_000, Absence::Judge), Redeemed::Waiting { position: 1 });
        // Somebody waiting means no newcomer is admitted ahead of them, budget or not.
        assert_eq!(line.join(&limits, true, 5_000), Joined::Waiting { ticket: 4 });
    }

    #[test]
    fn a_ticket_is_redeemed_once() {
        let limits = limits(60, 10);
        let mut line = Line::default();
        line.join(&limits, true, 0);
        assert_eq!(line.join(&limits, true, 0), Joined::Waiting { ticket: 2 });
        line.advance(&limits, 1_000, Absence::Judge);
        assert!(matches!(line.redeem(&limits, 2, 1_000, Absence::Judge), Redeemed::Admitted { .. }));
        // A copy presented before the session is used waits; once it is, it is refused.
        assert_eq!(line.redeem(&limits, 2, 1_000, Absence::Judge), Redeemed::Pending);
        line.touch(&[], &[(2, 601_000)], 1_000);
        assert_eq!(line.redeem(&limits, 2, 1_001, Absence::Judge), Redeemed::Gone(Gone::Used));
        assert_eq!(line.redeem(&limits, 0, 1_001, Absence::Judge), Redeemed::Gone(Gone::Unknown));
    }

    #[test]
    fn grants_lapse_and_free_their_slot() {
        let limits = limits(600, 1);
        let mut line = Line::default();
        line.join(&limits, true, 0); // session 1 holds the only slot
        line.join(&limits, true, 0);
        line.release(1);
        assert_eq!(line.advance(&limits, 100, Absence::Judge).granted, 1); // ticket 2 granted, not redeemed
        line.join(&limits, true, 100);
        assert_eq!(line.advance(&limits, 200, Absence::Judge).granted, 0, "the outstanding grant holds the slot");
        line.touch(&[3], &[], 100_000); // ticket 3 is still watching its page
        assert_eq!(
            line.advance(&limits, 100 + limits.grant_ms, Absence::Judge).granted,
            1,
            "lapsed: ticket 3 gets the slot"
        );
        assert_eq!(line.redeem(&limits, 2, 100 + limits.grant_ms, Absence::Judge), Redeemed::Gone(Gone::Lapsed));
    }

    #[test]
    fn leavers_and_abandoned_waiters_are_skipped() {
        let limits = limits(60, 10);
        let mut line = Line::default();
        line.join(&limits, true, 0);
        for _ in 0..3 {
            line.join(&limits, true, 0); // tickets 2, 3, 4
        }
        line.leave(2);
        line.touch(&[4], &[], 100_000);
        // At 130 s ticket 3 has not been seen for 130 s: abandoned; 4 was seen at 100 s.
        assert_eq!(line.advance(&limits, 130_000, Absence::Judge).granted, 1);
        assert_eq!(line.redeem(&limits, 2, 130_000, Absence::Judge), Redeemed::Gone(Gone::Left));
        assert_eq!(line.redeem(&limits, 3, 130_000, Absence::Judge), Redeemed::Gone(Gone::Left));
        assert!(matches!(line.redeem(&limits, 4, 130_000, Absence::Judge), Redeemed::Admitted { .. }));
    }

    #[test]
    fn admissions_never_exceed_the_rate_plus_one_seconds_worth_and_track_it_over_five_minutes() {
        for per_minute in [1, 7, 60, 600, 6_000] {
            // Waiters who never leave, and room for everyone: only the rate limits.
            let limits = Limits { abandon_ms: u64::MAX / 4, ..limits(per_minute, u32::MAX) };
            let mut line = Line::default();
            // The first visitor is admitted at once, at 0.
            let mut times = vec![0];
            // A crowd far larger than can be admitted, joining before the first step (and
            // confirmed by their instance).
            let crowd: Vec<u64> =
                (0..(per_minute as u64 * 10 + 10)).map(|_| line.join(&limits, true, 0).ticket()).collect();
            line.touch(&crowd, &[], 0);
            let mut now = 0;
            while now <= 300_000 {
                for _ in 0..line.advance(&limits, now, Absence::Judge).granted {
                    times.push(now);
                }
                now += 100;
            }
            // Any 60 s window: at most the rate plus one second's worth.
            let burst = (f64::from(per_minute) / 60.0).max(1.0).floor() as usize;
            let mut end = 0;
            for (start, at) in times.iter().enumerate() {
                while end < times.len() && times[end] < at + 60_000 {
                    end += 1;
                }
                let in_window = end - start;
                assert!(in_window <= per_minute as usize + burst, "{per_minute}/min: {in_window} in a minute");
            }
            // Over five minutes with people waiting: within 1 % (the bucket starts full, so
            // the first second's worth comes on top).
            let expected = f64::from(per_minute) * 5.0;
            let got = times.len() as f64 - (f64::from(per_minute) / 60.0).max(1.0);
            assert!((got - expected).abs() <= (expected * 0.01).max(1.0), "{per_minute}/min: {got} in 5 min");
        }
    }

    #[test]
    fn active_plus_outstanding_never_exceed_max_active_under_a_random_crowd() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let limits = Limits { grant_ms: 5_000, session_ms: 20_000, abandon_ms: 30_000, ..limits(1_200, 25) };
        let mut line = Line::default();
        let mut holders: Vec<u64> = Vec::new();
        let mut now = 0;
        for _ in 0..20_000 {
            now += rng.random_range(0..50);
            match rng.random_range(0..10) {
                0..=3 => {
                    holders.push(line.join(&limits, true, now).ticket());
                }
                4 => {
                    line.advance(&limits, now, Absence::Judge);
                }
                5..=6 if !holders.is_empty() => {
                    let ticket = holders[rng.random_range(0..holders.len())];
                    line.redeem(&limits, ticket, now, Absence::Judge);
                }
                7 if !holders.is_empty() => {
                    let ticket = holders.swap_remove(rng.random_range(0..holders.len()));
                    line.release(ticket);
                }
                8 if !holders.is_empty() => {
                    let ticket = holders.swap_remove(rng.random_range(0..holders.len()));
                    line.leave(ticket);
                }
                _ => {
                    let sessions: Vec<(u64, u64)> = holders.iter().map(|ticket| (*ticket, 0)).collect();
                    line.touch(&holders, &sessions, now)
                }
            }
            let stats = line.stats(&limits, now);
            assert!(stats.active + stats.outstanding <= limits.max_active, "{stats:?}");
        }
        assert!(line.stats(&limits, now).cursor > 100, "the crowd made progress");
    }

    #[test]
    fn after_an_outage_the_line_resumes_at_its_rate_with_no_burst_to_catch_up() {
        let limits = Limits { abandon_ms: u64::MAX / 4, ..limits(1_200, u32::MAX) };
        let mut line = Line::default();
        let crowd: Vec<u64> = (0..5_000).map(|_| line.join(&limits, true, 0).ticket()).collect();
        line.touch(&crowd, &[], 0);
        let granted_by = |from: u64, to: u64, line: &mut Line| {
            (from..to).step_by(100).map(|now| line.advance(&limits, now, Absence::Judge).granted).sum::<u32>()
        };
        granted_by(100, 10_000, &mut line);
        // No step for 60 s (the store was away), then a minute of steps: one second's worth
        // at once (the bucket's size), then 20 a second.
        let first = line.advance(&limits, 70_000, Absence::Judge).granted;
        assert_eq!(first, 20, "the bucket holds one second, not the minute missed");
        let minute = granted_by(70_100, 130_000, &mut line);
        assert!(minute.abs_diff(1_200) <= 12, "{minute} in the minute after");
    }

    #[test]
    fn spent_tickets_are_remembered_within_a_bound() {
        let limits = Limits { abandon_ms: u64::MAX / 4, ..limits(6_000_000, u32::MAX) };
        let mut line = Line::default();
        for now in 0..(MAX_GONE as u64 + 10_000) {
            let ticket = line.join(&limits, true, now).ticket();
            line.advance(&limits, now, Absence::Judge);
            line.redeem(&limits, ticket, now, Absence::Judge);
            line.release(ticket);
        }
        assert!(line.gone.len() <= MAX_GONE);
        assert!(line.sessions.len() == 0 && line.grants.len() == 0);
    }

    #[test]
    fn grants_follow_join_order() {
        let limits = limits(120, 1_000);
        let mut line = Line::default();
        let mut admitted = Vec::new();
        let mut tickets = Vec::new();
        for _ in 0..50 {
            match line.join(&limits, true, 0) {
                Joined::Admitted { ticket, .. } => admitted.push(ticket),
                Joined::Waiting { ticket } => tickets.push(ticket),
                Joined::Full => unreachable!("no limit"),
            }
        }
        let mut now = 0;
        for _ in 0..1_000 {
            if admitted.len() == 50 {
                break;
            }
            now += 250;
            line.advance(&limits, now, Absence::Judge);
            for ticket in &tickets {
                if !admitted.contains(ticket)
                    && matches!(line.redeem(&limits, *ticket, now, Absence::Judge), Redeemed::Admitted { .. })
                {
                    admitted.push(*ticket);
                }
            }
            line.touch(&tickets, &[], now);
        }
        assert_eq!(admitted.len(), 50, "everyone got in");
        assert!(admitted.windows(2).all(|w| w[0] < w[1]), "FIFO: {admitted:?}");
    }

    #[test]
    fn the_wait_estimate_comes_from_the_observed_rate() {
        let limits = limits(60, 1_000);
        let mut line = Line::default();
        for _ in 0..100 {
            line.join(&limits, true, 0);
        }
        assert_eq!(line.stats(&limits, 0).rate_per_second, None, "one admission is no rate yet");
        for now in (1_000..=30_000).step_by(1_000) {
            line.advance(&limits, now, Absence::Judge);
            line.touch(&(1..=100).collect::<Vec<_>>(), &[], now);
        }
        let rate = line.stats(&limits, 30_000).rate_per_second.unwrap();
        assert!((rate - 1.0).abs() < 0.1, "{rate}");
        assert_eq!(eta_seconds(40, Some(rate)).map(|s| (s as f64 / 10.0).round() as u64), Some(4));
        assert_eq!(eta_seconds(40, None), None);
    }
}
