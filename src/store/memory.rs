//! The embedded store: every room's [`Line`] in this process.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::line::Line;
use crate::line::Overrides;

/// Lines by room id. A `std` mutex, not an async one: it is held for a bounded step of the
/// line (see [`MAX_SKIPS`](crate::line::MAX_SKIPS)) and never across an `.await`.
#[derive(Default)]
pub struct MemoryStore {
    rooms: Mutex<HashMap<String, Line>>,
    /// Each room's live overrides and how many changes made them.
    overrides: Mutex<HashMap<String, (Overrides, u64)>>,
    /// Each room's last reading of the upstream's health (this process is its only instance).
    health: Mutex<HashMap<String, String>>,
}

impl MemoryStore {
    /// Run one atomic step on a room's line.
    pub(crate) fn with<T>(&self, room: &str, step: impl FnOnce(&mut Line) -> T) -> T {
        let mut rooms = self.rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let line = match rooms.get_mut(room) {
            Some(line) => line,
            // A new line of this process: a line id of its own (never 0, which names none).
            None => rooms.entry(room.to_owned()).or_insert_with(|| Line::new(rand::random::<u64>() | 1)),
        };
        step(line)
    }

    pub(crate) fn overrides(&self, room: &str) -> (Overrides, u64) {
        let overrides = self.overrides.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        overrides.get(room).cloned().unwrap_or_default()
    }

    pub(crate) fn report_health(&self, room: &str, reading: &str) {
        let mut health = self.health.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        health.insert(room.to_owned(), reading.to_owned());
    }

    pub(crate) fn read_health(&self, room: &str) -> Vec<(String, String)> {
        let health = self.health.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        health.get(room).map(|reading| vec![("this".to_owned(), reading.clone())]).unwrap_or_default()
    }

    pub(crate) fn forget_health(&self, room: &str) {
        let mut health = self.health.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        health.remove(room);
    }

    pub(crate) fn change_overrides(&self, room: &str, change: Option<&Overrides>) -> (Overrides, u64) {
        let mut overrides = self.overrides.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (current, version) = overrides.entry(room.to_owned()).or_default();
        *current = change.map_or_else(Overrides::default, |change| current.merged(change));
        *version += 1;
        (current.clone(), *version)
    }
}
