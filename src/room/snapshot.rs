//! What every waiter of a room needs to know, published once per step.

use super::*;

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
