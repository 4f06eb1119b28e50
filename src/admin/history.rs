//! What the dashboard charts: every room sampled every [`EVERY`], the last 15 minutes kept.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::gate::Gate;

/// How often rooms are sampled.
pub const EVERY: Duration = Duration::from_secs(2);
/// How long samples are kept.
pub const KEPT: Duration = Duration::from_secs(15 * 60);
const SAMPLES: usize = (KEPT.as_secs() / EVERY.as_secs()) as usize;

/// One room at one moment.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    /// Unix time, ms.
    t: u64,
    waiting: u64,
    admitted_last_minute: u64,
    admit_per_minute: u64,
    active: u64,
    max_active: u64,
    eta_seconds: Option<u64>,
    feed_sockets: u64,
}

/// The samples of every room.
#[derive(Debug, Clone, Default)]
pub struct History {
    rooms: Arc<Mutex<HashMap<String, VecDeque<Sample>>>>,
}

impl History {
    /// Samples taken after `since` (Unix ms), by room.
    pub fn since(&self, since: u64) -> Value {
        let rooms = self.rooms.lock().map(|rooms| rooms.clone()).unwrap_or_default();
        let rooms: serde_json::Map<String, Value> = rooms
            .into_iter()
            .map(|(id, samples)| {
                let newer: Vec<&Sample> = samples.iter().filter(|sample| sample.t > since).collect();
                (id, json!(newer))
            })
            .collect();
        json!({ "every_ms": EVERY.as_millis() as u64, "kept_ms": KEPT.as_millis() as u64, "rooms": rooms })
    }

    fn record(&self, gate: &Gate) {
        let now = gate.clock().now_ms();
        let rooms = gate.rooms();
        let Ok(mut history) = self.rooms.lock() else { return };
        history.retain(|id, _| rooms.iter().any(|room| &room.id == id));
        for room in rooms {
            let view = super::view(gate, &room);
            let number = |key: &str| view[key].as_u64().unwrap_or(0);
            let sample = Sample {
                t: now,
                waiting: number("waiting"),
                admitted_last_minute: number("admitted_last_minute"),
                admit_per_minute: number("admitting_per_minute"),
                active: number("active_sessions") + number("grants_outstanding"),
                max_active: number("max_active"),
                eta_seconds: view["eta_seconds"].as_u64(),
                feed_sockets: number("feed_sockets"),
            };
            let samples = history.entry(room.id.clone()).or_default();
            if samples.len() == SAMPLES {
                samples.pop_front();
            }
            samples.push_back(sample);
        }
    }
}

/// Sample every room every [`EVERY`] until `stop`.
pub async fn sample(gate: Arc<Gate>, history: History, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = ticks.tick() => history.record(&gate),
            () = stop.cancelled() => return,
        }
    }
}
