//! A room's settings: what `proxy.toml` says, what an operator changed live (the overrides,
//! kept in the store and shared by every instance), and what is in force (the two together).
//!
//! A room holds its settings as one immutable value behind an `ArcSwap`: a change (an admin
//! call, a reload, another instance's announcement) puts a new value in place at once, and
//! every reader (a request, the scheduler step publishing the snapshot) sees either the old
//! one or the new one, whole. Nothing reads them, awaits, and writes them back.

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

use crate::config::{RoomConfig, RoomState};
use crate::line::Limits;

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

/// A room's settings in force.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: RoomConfig,
    pub overrides: Overrides,
    /// Which change of the overrides this is (the store counts them); 0: none yet.
    pub version: u64,
}

impl Settings {
    pub fn new(config: RoomConfig) -> Settings {
        Settings { config, overrides: Overrides::default(), version: 0 }
    }

    pub fn state(&self) -> RoomState {
        self.overrides.state.unwrap_or(self.config.state)
    }

    pub fn message(&self) -> Option<String> {
        match &self.overrides.message {
            Some(message) if message.is_empty() => None,
            Some(message) => Some(message.clone()),
            None => self.config.message.clone(),
        }
    }

    pub fn admit_per_minute(&self) -> u32 {
        self.overrides.admit_per_minute.unwrap_or(self.config.admit_per_minute).get()
    }

    pub fn max_active(&self) -> u32 {
        self.overrides.max_active.unwrap_or(self.config.max_active).get()
    }

    /// How the line admits now.
    pub fn limits(&self) -> Limits {
        Limits {
            admit_per_minute: self.admit_per_minute(),
            max_active: self.max_active(),
            grant_ms: self.config.grant_seconds * 1_000,
            session_ms: self.config.session_seconds * 1_000,
            abandon_ms: self.config.abandon_seconds * 1_000,
            idle_ms: self.config.session_idle_seconds * 1_000,
            max_waiting: self.config.max_waiting.map_or(0, |max| max.get()),
            adaptive_per_minute: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RoomConfig {
        toml::from_str("id = \"c\"\npaths = [\"/c\"]\nadmit_per_minute = 60\nmax_active = 10\nmessage = \"hi\"")
            .unwrap()
    }

    #[test]
    fn overrides_win_until_cleared_and_merge_field_by_field() {
        let mut settings = Settings::new(config());
        assert_eq!(
            (settings.state(), settings.admit_per_minute(), settings.message()),
            (RoomState::Open, 60, Some("hi".into()))
        );
        let paused: Overrides = serde_json::from_str(r#"{"state":"paused","admit_per_minute":300}"#).unwrap();
        settings.overrides = settings.overrides.merged(&paused);
        let quiet: Overrides = serde_json::from_str(r#"{"message":""}"#).unwrap();
        settings.overrides = settings.overrides.merged(&quiet);
        assert_eq!(
            (settings.state(), settings.limits().admit_per_minute, settings.max_active()),
            (RoomState::Paused, 300, 10)
        );
        assert_eq!(settings.message(), None, "an empty message clears it");
        settings.overrides = Overrides::default();
        assert_eq!((settings.state(), settings.admit_per_minute()), (RoomState::Open, 60));
    }

    #[test]
    fn bad_changes_are_named() {
        assert!(serde_json::from_str::<Overrides>(r#"{"rate":3}"#)
            .unwrap_err()
            .to_string()
            .contains("unknown field `rate`"));
        assert!(serde_json::from_str::<Overrides>(r#"{"max_active":0}"#).is_err());
        assert!(serde_json::from_str::<Overrides>(r#"{"state":"gone"}"#).is_err());
        let long = Overrides { message: Some("x".repeat(501)), ..Overrides::default() };
        assert_eq!(long.problem().map(|p| p.0), Some("message"));
    }
}
