//! A room's live changes: what an operator set through the admin API, kept in the store and
//! shared by every instance, winning over `proxy.toml` until cleared. A line setting: the
//! store keeps them beside the line, the room applies them.

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

/// What a room does with visitors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RoomState {
    #[default]
    Open,
    Paused,
    Closed,
    Passthrough,
}

/// Longest room message, in bytes (as `proxy.toml` allows).
pub const MAX_MESSAGE_BYTES: usize = 500;
/// The highest rate and capacity a live change may set (far above any sale; a typo of a few
/// zeros too many is refused rather than opening the doors).
pub const MAX_ADMIT_PER_MINUTE: u32 = 1_000_000;
pub const MAX_ACTIVE: u32 = 10_000_000;

/// What an operator changed live; each wins over `proxy.toml` until the overrides are cleared.
/// A message of `""` means "no message".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<RoomState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admit_per_minute: Option<NonZeroU32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_active: Option<NonZeroU32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Overrides {
    /// This change on top of `self`: what it sets replaces, what it leaves out stays.
    pub fn merged(&self, change: &Overrides) -> Overrides {
        Overrides {
            state: change.state.or(self.state),
            admit_per_minute: change.admit_per_minute.or(self.admit_per_minute),
            max_active: change.max_active.or(self.max_active),
            message: change.message.clone().or_else(|| self.message.clone()),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }

    /// What is wrong with it, as (field, problem).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if self.message.as_ref().is_some_and(|message| message.len() > MAX_MESSAGE_BYTES) {
            return Some(("message", format!("at most {MAX_MESSAGE_BYTES} bytes")));
        }
        if self.admit_per_minute.is_some_and(|rate| rate.get() > MAX_ADMIT_PER_MINUTE) {
            return Some(("admit_per_minute", format!("from 1 to {MAX_ADMIT_PER_MINUTE}")));
        }
        if self.max_active.is_some_and(|capacity| capacity.get() > MAX_ACTIVE) {
            return Some(("max_active", format!("from 1 to {MAX_ACTIVE}")));
        }
        None
    }
}
