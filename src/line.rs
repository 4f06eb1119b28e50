//! The line: pure admission logic with no I/O. Time is passed in (milliseconds), so rate and
//! expiry are tested without waiting.
//!
//! A room's line is two counters and a few small sets, after the virtual-line systems DESIGN
//! cites: `last_ticket` is the last turn given out, `cursor` the last turn granted; every
//! ticket up to the cursor has been granted or skipped. Turns are granted in ticket order
//! (FIFO), by a token bucket refilled at `admit_per_minute` and holding at most one second's
//! worth, and never beyond the free capacity (`max_active` minus sessions active and grants
//! outstanding). The Redis store runs the same rules in Lua; the memory store runs this code.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

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
}

/// The rate budget counts in 1/60000ths of a turn, so that one millisecond refills exactly
/// `admit_per_minute` units: integer arithmetic, no drift (ten refills of 0.1 turn in floating
/// point fall just short of one turn).
const TURN: u64 = 60_000;

impl Limits {
    /// Budget units refilled per millisecond.
    fn refill_per_ms(&self) -> u64 {
        u64::from(self.admit_per_minute)
    }

    /// The bucket holds one second's worth of turns, and at least one turn.
    fn burst(&self) -> u64 {
        (u64::from(self.admit_per_minute) * 1_000).max(TURN)
    }
}

/// The result of joining the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// Nobody was waiting and there was room: admitted at once; the ticket names the session.
    Admitted { ticket: u64, expires_at: u64 },
    /// In line with this ticket.
    Waiting { ticket: u64 },
}

impl Joined {
    pub fn ticket(&self) -> u64 {
        match self {
            Joined::Admitted { ticket, .. } | Joined::Waiting { ticket } => *ticket,
        }
    }
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
    /// Which life of the line this is: a shared store gives a line a new epoch when it had
    /// to rebuild it. Always 0 in memory.
    pub epoch: u64,
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
    last_ticket: u64,
    cursor: u64,
    /// Rate budget in units of 1/60000 turn, as of `budget_at`.
    budget: u64,
    budget_at: u64,
    /// Granted turns not yet redeemed: ticket → granted at.
    grants: BTreeMap<u64, u64>,
    /// Active sessions: ticket → expires at.
    sessions: HashMap<u64, u64>,
    /// Tickets after the cursor whose holders left.
    left: BTreeSet<u64>,
    /// Waiting tickets → last seen.
    seen: HashMap<u64, u64>,
    /// Tickets at or before the cursor that were used, skipped or lapsed: presenting them
    /// again says why. The most recent [`MAX_GONE`] only; older ones count as used.
    gone: BTreeMap<u64, Gone>,
    /// Admission times over the last minute, for the observed rate.
    admitted: VecDeque<u64>,
    started: bool,
}

impl Line {
    fn start(&mut self, limits: &Limits, now: u64) {
        if !self.started {
            self.started = true;
            self.budget = limits.burst();
            self.budget_at = now;
        }
    }

    fn refill(&mut self, limits: &Limits, now: u64) {
        self.start(limits, now);
        let elapsed = now.saturating_sub(self.budget_at);
        self.budget = self.budget.saturating_add(elapsed.saturating_mul(limits.refill_per_ms())).min(limits.burst());
        self.budget_at = now;
    }

    /// End sessions and grants whose time is up; forget old admissions.
    fn expire(&mut self, limits: &Limits, now: u64) {
        self.sessions.retain(|_, expires| *expires > now);
        let lapsed: Vec<u64> =
            self.grants.iter().filter(|(_, at)| **at + limits.grant_ms <= now).map(|(t, _)| *t).collect();
        for ticket in lapsed {
            self.grants.remove(&ticket);
            self.forget(ticket, Gone::Lapsed);
        }
        while self.admitted.front().is_some_and(|at| *at + RATE_WINDOW_MS <= now) {
            self.admitted.pop_front();
        }
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

    /// Take a ticket. When `admit_now` (the room is open) and nobody waits and there is room
    /// and budget, the ticket is granted and redeemed at once.
    pub fn join(&mut self, limits: &Limits, admit_now: bool, now: u64) -> Joined {
        self.refill(limits, now);
        self.expire(limits, now);
        self.last_ticket += 1;
        let ticket = self.last_ticket;
        let nobody_waiting = self.cursor + 1 == ticket;
        if admit_now && nobody_waiting && self.free(limits) > 0 && self.budget >= TURN {
            self.cursor = ticket;
            self.budget -= TURN;
            self.admitted.push_back(now);
            let expires_at = now + limits.session_ms;
            self.sessions.insert(ticket, expires_at);
            return Joined::Admitted { ticket, expires_at };
        }
        self.seen.insert(ticket, now);
        Joined::Waiting { ticket }
    }

    /// Grant turns in ticket order, within budget and capacity; skip leavers and waiters not
    /// seen for `abandon_ms`. Returns the number of turns granted.
    pub fn advance(&mut self, limits: &Limits, now: u64) -> u32 {
        self.refill(limits, now);
        self.expire(limits, now);
        let mut granted = 0;
        while self.cursor < self.last_ticket && self.budget >= TURN && self.free(limits) > 0 {
            let ticket = self.cursor + 1;
            self.cursor = ticket;
            let last_seen = self.seen.remove(&ticket);
            let abandoned = last_seen.is_some_and(|seen| seen + limits.abandon_ms <= now);
            if self.left.remove(&ticket) || abandoned {
                self.forget(ticket, Gone::Left);
                continue;
            }
            self.grants.insert(ticket, now);
            self.budget -= TURN;
            self.admitted.push_back(now);
            granted += 1;
        }
        granted
    }

    /// Present a ticket: redeem a granted turn (once), or learn the position.
    pub fn redeem(&mut self, limits: &Limits, ticket: u64, now: u64) -> Redeemed {
        self.expire(limits, now);
        if ticket == 0 || ticket > self.last_ticket {
            return Redeemed::Gone(Gone::Unknown);
        }
        if ticket > self.cursor {
            if self.left.contains(&ticket) {
                return Redeemed::Gone(Gone::Left);
            }
            if self.seen.get(&ticket).is_some_and(|seen| seen + limits.abandon_ms <= now) {
                // Not seen for too long: the place is given up now rather than at the front.
                self.seen.remove(&ticket);
                self.left.insert(ticket);
                return Redeemed::Gone(Gone::Left);
            }
            self.seen.insert(ticket, now);
            return Redeemed::Waiting { position: position(ticket, self.cursor) };
        }
        if self.grants.remove(&ticket).is_some() {
            let expires_at = now + limits.session_ms;
            self.sessions.insert(ticket, expires_at);
            self.forget(ticket, Gone::Used);
            return Redeemed::Admitted { expires_at };
        }
        Redeemed::Gone(self.gone.get(&ticket).copied().unwrap_or(Gone::Used))
    }

    /// End the session that `ticket` opened; its slot frees at once.
    pub fn release(&mut self, ticket: u64) -> bool {
        self.sessions.remove(&ticket).is_some()
    }

    /// Give up a place in line (or an unredeemed grant, or a session).
    pub fn leave(&mut self, ticket: u64) {
        if ticket > self.cursor && ticket <= self.last_ticket {
            self.seen.remove(&ticket);
            self.left.insert(ticket);
        } else if self.grants.remove(&ticket).is_some() {
            self.forget(ticket, Gone::Left);
        } else {
            self.sessions.remove(&ticket);
        }
    }

    /// Waiters still here (a feed connected, a page or status request).
    pub fn touch(&mut self, tickets: &[u64], now: u64) {
        for ticket in tickets {
            if let Some(seen) = self.seen.get_mut(ticket) {
                *seen = now;
            }
        }
    }

    /// Extend an active session to `until` (token renewal).
    pub fn renew(&mut self, ticket: u64, until: u64) -> bool {
        match self.sessions.get_mut(&ticket) {
            Some(expires) => {
                *expires = until.max(*expires);
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
            epoch: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn limits(per_minute: u32, max_active: u32) -> Limits {
        Limits { admit_per_minute: per_minute, max_active, grant_ms: 120_000, session_ms: 600_000, abandon_ms: 120_000 }
    }

    #[test]
    fn an_idle_room_admits_at_once_and_a_busy_one_queues_in_order() {
        let limits = limits(60, 10);
        let mut line = Line::default();
        assert!(matches!(line.join(&limits, true, 0), Joined::Admitted { ticket: 1, .. }));
        // The one-second budget is spent: the next visitors wait, in join order.
        assert_eq!(line.join(&limits, true, 0), Joined::Waiting { ticket: 2 });
        assert_eq!(line.join(&limits, true, 0), Joined::Waiting { ticket: 3 });
        assert_eq!(line.redeem(&limits, 3, 0), Redeemed::Waiting { position: 2 });
        assert_eq!(line.advance(&limits, 1_000), 1);
        assert!(matches!(line.redeem(&limits, 2, 1_000), Redeemed::Admitted { .. }));
        assert_eq!(line.redeem(&limits, 3, 1_000), Redeemed::Waiting { position: 1 });
        // Somebody waiting means no newcomer is admitted ahead of them, budget or not.
        assert_eq!(line.join(&limits, true, 5_000), Joined::Waiting { ticket: 4 });
    }

    #[test]
    fn a_ticket_is_redeemed_once() {
        let limits = limits(60, 10);
        let mut line = Line::default();
        line.join(&limits, true, 0);
        assert_eq!(line.join(&limits, true, 0), Joined::Waiting { ticket: 2 });
        line.advance(&limits, 1_000);
        assert!(matches!(line.redeem(&limits, 2, 1_000), Redeemed::Admitted { .. }));
        assert_eq!(line.redeem(&limits, 2, 1_001), Redeemed::Gone(Gone::Used));
        assert_eq!(line.redeem(&limits, 99, 1_001), Redeemed::Gone(Gone::Unknown));
    }

    #[test]
    fn grants_lapse_and_free_their_slot() {
        let limits = limits(600, 1);
        let mut line = Line::default();
        line.join(&limits, true, 0); // session 1 holds the only slot
        line.join(&limits, true, 0);
        line.release(1);
        assert_eq!(line.advance(&limits, 100), 1); // ticket 2 granted, not redeemed
        line.join(&limits, true, 100);
        assert_eq!(line.advance(&limits, 200), 0, "the outstanding grant holds the slot");
        line.touch(&[3], 100_000); // ticket 3 is still watching its page
        assert_eq!(line.advance(&limits, 100 + limits.grant_ms), 1, "lapsed: ticket 3 gets the slot");
        assert_eq!(line.redeem(&limits, 2, 100 + limits.grant_ms), Redeemed::Gone(Gone::Lapsed));
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
        line.touch(&[4], 100_000);
        // At 130 s ticket 3 has not been seen for 130 s: abandoned; 4 was seen at 100 s.
        assert_eq!(line.advance(&limits, 130_000), 1);
        assert_eq!(line.redeem(&limits, 2, 130_000), Redeemed::Gone(Gone::Left));
        assert_eq!(line.redeem(&limits, 3, 130_000), Redeemed::Gone(Gone::Left));
        assert!(matches!(line.redeem(&limits, 4, 130_000), Redeemed::Admitted { .. }));
    }

    #[test]
    fn admissions_never_exceed_the_rate_plus_one_seconds_worth_and_track_it_over_five_minutes() {
        for per_minute in [1, 7, 60, 600, 6_000] {
            // Waiters who never leave, and room for everyone: only the rate limits.
            let limits = Limits { abandon_ms: u64::MAX / 4, ..limits(per_minute, u32::MAX) };
            let mut line = Line::default();
            // The first visitor is admitted at once, at 0.
            let mut times = vec![0];
            // A crowd far larger than can be admitted, joining before the first step.
            for _ in 0..(per_minute as u64 * 10 + 10) {
                line.join(&limits, true, 0);
            }
            let mut now = 0;
            while now <= 300_000 {
                for _ in 0..line.advance(&limits, now) {
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
                    line.advance(&limits, now);
                }
                5..=6 if !holders.is_empty() => {
                    let ticket = holders[rng.random_range(0..holders.len())];
                    line.redeem(&limits, ticket, now);
                }
                7 if !holders.is_empty() => {
                    let ticket = holders.swap_remove(rng.random_range(0..holders.len()));
                    line.release(ticket);
                }
                8 if !holders.is_empty() => {
                    let ticket = holders.swap_remove(rng.random_range(0..holders.len()));
                    line.leave(ticket);
                }
                _ => line.touch(&holders, now),
            }
            let stats = line.stats(&limits, now);
            assert!(stats.active + stats.outstanding <= limits.max_active, "{stats:?}");
        }
        assert!(line.stats(&limits, now).cursor > 100, "the crowd made progress");
    }

    #[test]
    fn spent_tickets_are_remembered_within_a_bound() {
        let limits = Limits { abandon_ms: u64::MAX / 4, ..limits(6_000_000, u32::MAX) };
        let mut line = Line::default();
        for now in 0..(MAX_GONE as u64 + 10_000) {
            let ticket = line.join(&limits, true, now).ticket();
            line.advance(&limits, now);
            line.redeem(&limits, ticket, now);
            line.release(ticket);
        }
        assert!(line.gone.len() <= MAX_GONE);
        assert!(line.sessions.is_empty() && line.grants.is_empty());
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
            }
        }
        let mut now = 0;
        for _ in 0..1_000 {
            if admitted.len() == 50 {
                break;
            }
            now += 250;
            line.advance(&limits, now);
            for ticket in &tickets {
                if !admitted.contains(ticket) && matches!(line.redeem(&limits, *ticket, now), Redeemed::Admitted { .. })
                {
                    admitted.push(*ticket);
                }
            }
            line.touch(&tickets, now);
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
            line.advance(&limits, now);
            line.touch(&(1..=100).collect::<Vec<_>>(), now);
        }
        let rate = line.stats(&limits, 30_000).rate_per_second.unwrap();
        assert!((rate - 1.0).abs() < 0.1, "{rate}");
        assert_eq!(eta_seconds(40, Some(rate)).map(|s| (s as f64 / 10.0).round() as u64), Some(4));
        assert_eq!(eta_seconds(40, None), None);
    }
}
