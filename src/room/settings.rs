//! A room's settings: what `proxy.toml` says, what an operator changed live (the overrides,
//! kept in the store and shared by every instance), and what is in force (the two together).
//!
//! A room holds its settings as one immutable value behind an `ArcSwap`: a change (an admin
//! call, a reload, another instance's announcement) puts a new value in place at once, and
//! every reader (a request, the scheduler step publishing the snapshot) sees either the old
//! one or the new one, whole. Nothing reads them, awaits, and writes them back.

use serde::Serialize;

use crate::config::{EventConfig, RoomConfig, RoomState};
use crate::line::Limits;

pub use crate::line::overrides::{Overrides, MAX_ACTIVE, MAX_ADMIT_PER_MINUTE, MAX_MESSAGE_BYTES};

/// A room's settings in force.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: RoomConfig,
    pub overrides: Overrides,
    /// Which change of the overrides this is (the store counts them); 0: none yet.
    pub version: u64,
    /// The scheduled sale in force (`[[rooms.events]]`), if any.
    pub event: Option<EventInForce>,
}

/// Where a scheduled sale stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// From `prequeue_at`: newcomers take a pre-queue number; nobody is admitted.
    Prequeue,
    /// From `starts_at`: the pre-queue has its places, later arrivals line up behind.
    Started,
}

/// The event in force: which of the room's events, and its phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventInForce {
    pub index: usize,
    pub phase: Phase,
}

/// The event of `events` in force at `now` (unix ms), and when that changes next (`u64::MAX`:
/// never). An event is in force from its `prequeue_at` until its `ends_at`, or else until the
/// next event's `prequeue_at`.
pub fn event_at(events: &[EventConfig], now: u64) -> (Option<EventInForce>, u64) {
    let mut next_change = u64::MAX;
    let mut in_force = None;
    for (index, event) in events.iter().enumerate() {
        let ends = event.ends_at.or_else(|| events.get(index + 1).map(|next| next.prequeue_at)).unwrap_or(u64::MAX);
        if now < event.prequeue_at {
            next_change = next_change.min(event.prequeue_at);
        } else if now < event.starts_at {
            in_force = Some(EventInForce { index, phase: Phase::Prequeue });
            next_change = next_change.min(event.starts_at);
        } else if now < ends {
            in_force = Some(EventInForce { index, phase: Phase::Started });
            next_change = next_change.min(ends);
        }
    }
    (in_force, next_change)
}

impl Settings {
    pub fn new(config: RoomConfig) -> Settings {
        Settings { config, overrides: Overrides::default(), version: 0, event: None }
    }

    /// The event in force, with its configuration.
    pub fn event(&self) -> Option<(&EventConfig, Phase)> {
        let in_force = self.event?;
        Some((self.config.events.get(in_force.index)?, in_force.phase))
    }

    /// The waiting page in force: the event's, else the room's (`None`: the bundled one).
    pub fn page(&self) -> Option<&std::sync::Arc<crate::room::page::WaitingPage>> {
        self.event().and_then(|(event, _)| event.page.as_ref()).or(self.config.page.as_ref())
    }

    /// The operator's live state; else, during a sale, paused in its pre-queue (nobody is
    /// admitted) and open once it started; else `proxy.toml`'s.
    pub fn state(&self) -> RoomState {
        let event = self.event.map(|event| match event.phase {
            Phase::Prequeue => RoomState::Paused,
            Phase::Started => RoomState::Open,
        });
        self.overrides.state.or(event).unwrap_or(self.config.state)
    }

    /// Each setting: the operator's live override, else the event's, else `proxy.toml`'s.
    pub fn message(&self) -> Option<String> {
        match &self.overrides.message {
            Some(message) if message.is_empty() => None,
            Some(message) => Some(message.clone()),
            // During a sale its own message (or none) replaces the room's, which is often
            // about before it ("opens at ten").
            None => match self.event() {
                Some((event, _)) => event.message.clone(),
                None => self.config.message.clone(),
            },
        }
    }

    pub fn admit_per_minute(&self) -> u32 {
        let event = self.event().and_then(|(event, _)| event.admit_per_minute);
        self.overrides.admit_per_minute.or(event).unwrap_or(self.config.admit_per_minute).get()
    }

    pub fn max_active(&self) -> u32 {
        let event = self.event().and_then(|(event, _)| event.max_active);
        self.overrides.max_active.or(event).unwrap_or(self.config.max_active).get()
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
    fn the_event_in_force_follows_its_times_and_its_settings_win_until_an_operators() {
        let mut config = config();
        config.state = RoomState::Closed;
        config.events = toml::from_str::<RoomConfig>(
            "id = \"c\"\npaths = [\"/c\"]\nadmit_per_minute = 60\nmax_active = 10\n\
             [[events]]\nname = \"a\"\nprequeue_at = 1970-01-01T00:00:10Z\nstarts_at = 1970-01-01T00:00:20Z\n\
             admit_per_minute = 600\n\
             [[events]]\nname = \"b\"\nprequeue_at = 1970-01-01T00:01:00Z\nstarts_at = 1970-01-01T00:02:00Z\n\
             ends_at = 1970-01-01T00:03:00Z\n",
        )
        .unwrap()
        .events;
        let at = |now| event_at(&config.events, now);
        assert_eq!(at(0), (None, 10_000));
        assert_eq!(at(10_000), (Some(EventInForce { index: 0, phase: Phase::Prequeue }), 20_000));
        assert_eq!(at(20_000), (Some(EventInForce { index: 0, phase: Phase::Started }), 60_000), "until the next");
        assert_eq!(at(60_000).0, Some(EventInForce { index: 1, phase: Phase::Prequeue }));
        assert_eq!(at(180_000), (None, u64::MAX), "after the last one's end: the room as configured");

        let mut settings = Settings::new(config.clone());
        settings.event = at(10_000).0;
        assert_eq!((settings.state(), settings.admit_per_minute()), (RoomState::Paused, 600), "the pre-queue");
        assert_eq!(settings.message(), None, "the closed room's message is not the sale's");
        settings.event = at(20_000).0;
        assert_eq!(settings.state(), RoomState::Open);
        settings.overrides = serde_json::from_str(r#"{"state":"paused","admit_per_minute":30}"#).unwrap();
        assert_eq!((settings.state(), settings.admit_per_minute()), (RoomState::Paused, 30), "the operator wins");
        settings.event = at(180_000).0;
        settings.overrides = Overrides::default();
        assert_eq!((settings.state(), settings.admit_per_minute()), (RoomState::Closed, 60));
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
