//! What a visitor sees of a room: their status (place, wait, message), and a sale's published
//! events.

use super::*;

/// How anyone checks a place drawn at a sale's start, as published with the seed.
fn shuffle_rule() -> &'static str {
    "Your pre-queue number n is in your status (GET /_vestibule/status?room=ID during the \
     pre-queue). At the start every pre-queue number 1..prequeued is ranked by the hex digest \
     SHA-256(seed + \":\" + number), seed in hex and number in decimal, smallest first: your \
     place among the pre-queue is 1 + how many numbers rank before yours, and your ticket is \
     first_ticket - 1 + that place. With shuffled = false the place is the number itself."
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

impl Room {
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
