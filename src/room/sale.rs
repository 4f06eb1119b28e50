//! A room's scheduled sales as this instance sees them (docs/sales.md, `[[rooms.events]]`): the
//! pre-queue numbers seen here lately, and the seating once the sale started, with the drawn
//! order computed once per instance from the seed the store kept.
//!
//! The store gives pre-queue numbers and makes the seating once ([`Line::prequeue`],
//! [`Line::seat`]); every instance then computes the same order from the same seed
//! ([`shuffle`]), so that pre-queue number `p` holds ticket `base + place(p)` wherever its
//! holder shows up.
//!
//! [`Line::prequeue`]: crate::line::Line::prequeue
//! [`Line::seat`]: crate::line::Line::seat

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwapOption;

use crate::line::Seated;
use crate::wire::shuffle::{self, Seed, Shuffle};

/// Most pre-queue numbers remembered as seen here (each 16 bytes): beyond it the oldest
/// visitors are still in the pre-queue, and are seen when they come back.
const MAX_SEEN: usize = 1_000_000;

/// A seating with its drawn order.
#[derive(Debug)]
pub struct Seating {
    pub seated: Seated,
    /// The drawn order; `None` for an event that keeps the order of arrival (`shuffle =
    /// false`, as the seating was made: whatever the configuration says now).
    order: Option<Shuffle>,
    /// When this instance last checked it against the store (ms).
    pub(super) checked_at: std::sync::atomic::AtomicU64,
}

impl Seating {
    /// The seating `seated`, its order drawn from its seed (a SHA-256 per pre-queue number
    /// and a sort; not measured for large pre-queues).
    pub fn new(seated: Seated, now: u64) -> Seating {
        let order = seated.shuffled.then(|| Shuffle::new(&seated.seed, 1, seated.count));
        Seating { seated, order, checked_at: now.into() }
    }

    /// The ticket pre-queue number `number` holds: `None` for a number the pre-queue never
    /// gave before the start.
    pub fn ticket(&self, number: u64) -> Option<u64> {
        if number == 0 || number > self.seated.count {
            return None;
        }
        let place = self.order.as_ref().map_or(number, |order| order.place(number));
        Some(self.seated.base + place)
    }

    /// The seed in hex, as published.
    pub fn seed(&self) -> String {
        shuffle::hex(&self.seated.seed)
    }

    /// The draw as `/_vestibule/events` publishes it (and the admin view shows it).
    pub fn published(&self) -> serde_json::Value {
        serde_json::json!({
            "seed": self.seed(),
            "prequeued": self.seated.count,
            "first_ticket": self.seated.base + 1,
            "shuffled": self.seated.shuffled,
            "started_at": self.seated.at / 1_000,
        })
    }
}

/// A room's sales on this instance.
#[derive(Debug, Default)]
pub struct Sale {
    /// The secret seeds are drawn from (see [`shuffle::seed_for`]); set by the gate.
    secret: OnceLock<[u8; 32]>,
    /// Pre-queue numbers seen here lately, for the event in force: number → when (ms).
    seen: Mutex<(u64, HashMap<u64, u64>)>,
    /// The latest seating known here.
    seating: ArcSwapOption<Seating>,
    /// Held while seating: one store call and one draw for all who arrive together.
    pub(super) seating_lock: tokio::sync::Mutex<()>,
}

impl Sale {
    /// Use `secret` for the seeds of this room's events.
    pub fn set_secret(&self, secret: [u8; 32]) {
        let _ = self.secret.set(secret);
    }

    /// The seed of `event` of `room`, from the secret (all zero without one: tests).
    pub fn seed(&self, room: &str, name: &str, event: u64) -> Seed {
        let secret = self.secret.get().copied().unwrap_or_default();
        shuffle::seed_for(&secret, room, name, event)
    }

    /// Pre-queue number `number` of `event` was seen at `now`.
    pub fn seen(&self, event: u64, number: u64, now: u64) {
        if let Ok(mut seen) = self.seen.lock() {
            if seen.0 != event {
                *seen = (event, HashMap::new());
            }
            if seen.1.len() < MAX_SEEN || seen.1.contains_key(&number) {
                seen.1.insert(number, now);
            }
        }
    }

    /// The pre-queue numbers of `event` seen since `since` (ms), in order.
    pub fn seen_since(&self, event: u64, since: u64) -> Vec<u64> {
        let Ok(seen) = self.seen.lock() else { return Vec::new() };
        if seen.0 != event {
            return Vec::new();
        }
        let mut numbers: Vec<u64> = seen.1.iter().filter(|(_, at)| **at >= since).map(|(number, _)| *number).collect();
        numbers.sort_unstable();
        numbers
    }

    /// Forget numbers not seen since `since`.
    pub fn prune(&self, since: u64) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.1.retain(|_, at| *at >= since);
        }
    }

    /// The seating of `event`, if known here.
    pub fn seating(&self, event: u64) -> Option<Arc<Seating>> {
        self.seating.load_full().filter(|seating| seating.seated.event == event)
    }

    pub(super) fn set_seating(&self, seating: Arc<Seating>) {
        self.seating.store(Some(seating));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seated(count: u64, shuffled: bool) -> Seated {
        Seated { event: 1, base: 40, count, at: 0, seed: [7; 32], shuffled }
    }

    #[test]
    fn every_number_of_the_prequeue_holds_one_ticket_after_the_base() {
        let seating = Seating::new(seated(1_000, true), 0);
        let mut tickets: Vec<u64> = (1..=1_000).map(|n| seating.ticket(n).unwrap()).collect();
        assert_ne!(tickets, (41..=1_040).collect::<Vec<_>>(), "drawn, not in order of arrival");
        tickets.sort_unstable();
        assert_eq!(tickets, (41..=1_040).collect::<Vec<_>>());
        assert_eq!((seating.ticket(0), seating.ticket(1_001)), (None, None), "never given before the start");
    }

    #[test]
    fn an_event_without_shuffle_keeps_the_order_of_arrival() {
        let seating = Seating::new(seated(5, false), 0);
        assert_eq!((1..=5).map(|n| seating.ticket(n).unwrap()).collect::<Vec<_>>(), vec![41, 42, 43, 44, 45]);
    }

    #[test]
    fn numbers_seen_are_kept_per_event_and_pruned() {
        let sale = Sale::default();
        sale.seen(9, 3, 100);
        sale.seen(9, 1, 200);
        assert_eq!(sale.seen_since(9, 0), vec![1, 3]);
        assert_eq!(sale.seen_since(9, 150), vec![1]);
        sale.prune(150);
        assert_eq!(sale.seen_since(9, 0), vec![1]);
        sale.seen(10, 5, 300);
        assert_eq!((sale.seen_since(9, 0), sale.seen_since(10, 0)), (vec![], vec![5]), "a new event starts afresh");
    }
}
