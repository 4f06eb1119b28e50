//! What instances tell each other through the store: cursor moves, ended sessions and live
//! setting changes of each room, as one stream of [`Announcement`]s. With Redis, a pub/sub
//! subscription feeds it: made again with backoff when lost, or when this instance's own
//! heartbeat goes unheard (a half-open connection delivers nothing and never says so), then
//! the sessions that ended meanwhile are replayed. The memory store serves one instance:
//! there is nobody to hear from.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    cursor_channel, lease_channel, parse_ended, revocations_channel, settings_channel, RedisStore, Store, StoreError,
};
use crate::clock::Clock;

/// One thing another instance (or the store) said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// The leader moved a room's cursor.
    Cursor { room: String, cursor: u64 },
    /// A session of a room ended (its tokens stop passing), until it would have expired.
    SessionEnded { room: String, ticket: u64, until: u64 },
    /// A room's live overrides changed: this is their version.
    Settings { room: String, version: u64 },
    /// A room's leader gave up its lease (a graceful stop): try to take it now.
    LeaseFree { room: String },
    /// Whether announcements are heard now: while not, rooms read the store every step.
    Hearing(bool),
}

/// How often the listener publishes a beat on its own channel, and how long it may go unheard
/// before the subscription counts as dead.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(3);
/// Announcements not yet taken by the rooms; the subscription waits when they lag this far.
const BACKLOG: usize = 4_096;

impl Store {
    /// Announcements about the rooms named in `rooms` (followed as it changes, on a reload),
    /// until `stop`; the listening task is owned by `tasks`.
    pub fn announcements(
        self: &Arc<Store>,
        rooms: watch::Receiver<Vec<String>>,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> mpsc::Receiver<Announcement> {
        let (sender, receiver) = mpsc::channel(BACKLOG);
        if let Store::Redis(_) = &**self {
            let store = self.clone();
            tasks.spawn(async move {
                if let Store::Redis(redis) = &*store {
                    listen(redis, rooms, sender, stop).await;
                }
            });
        }
        receiver
    }
}

/// Subscribe, and pass on what is heard, until `stop` (or nobody listens any more).
async fn listen(
    redis: &RedisStore,
    mut rooms: watch::Receiver<Vec<String>>,
    sender: mpsc::Sender<Announcement>,
    stop: CancellationToken,
) {
    let clock = Clock::new();
    let heartbeat = format!("vestibule:heartbeat:{}", redis.instance());
    let mut backoff = Duration::from_millis(100);
    // An outage is a line when subscribing first fails and one when it works again.
    let mut failing = false;
    while !stop.is_cancelled() {
        if sender.send(Announcement::Hearing(false)).await.is_err() {
            return;
        }
        let ids = rooms.borrow_and_update().clone();
        let subscribed = async {
            let messages = redis.subscribe(&ids, &heartbeat).await?;
            let mut missed = Vec::new();
            for room in &ids {
                for (ticket, until) in redis.ended_sessions(room, clock.now_ms()).await? {
                    missed.push(Announcement::SessionEnded { room: room.clone(), ticket, until });
                }
            }
            Ok::<_, StoreError>((messages, missed))
        };
        let mut messages = match subscribed.await {
            Ok((messages, missed)) => {
                backoff = Duration::from_millis(100);
                if std::mem::take(&mut failing) {
                    tracing::info!(store = %redis.address(), "subscribed to the rooms' announcements again");
                }
                for announcement in missed.into_iter().chain([Announcement::Hearing(true)]) {
                    if sender.send(announcement).await.is_err() {
                        return;
                    }
                }
                messages
            }
            Err(error) => {
                if !std::mem::replace(&mut failing, true) {
                    let store = redis.address();
                    tracing::warn!(%store, %error, "cannot subscribe to the rooms' announcements; trying again");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                // Soon: while unsubscribed, every room reads the store every step.
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        let mut beats = tokio::time::interval(HEARTBEAT_EVERY);
        beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first beat published since the last one heard: the subscription must hear it.
        let mut unheard: Option<tokio::time::Instant> = None;
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = beats.tick() => {
                    if unheard.is_some_and(|since| since.elapsed() > HEARTBEAT_DEADLINE) {
                        tracing::warn!("the rooms' announcements went silent; subscribing again");
                        break;
                    }
                    // A beat Redis did not take says nothing of the subscription.
                    if redis.publish(&heartbeat, "beat").await.is_ok() && unheard.is_none() {
                        unheard = Some(tokio::time::Instant::now());
                    }
                    continue;
                }
                changed = rooms.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break; // rooms added or removed: subscribe to the new set
                }
                () = stop.cancelled() => return,
            };
            let Some(message) = message else { break };
            let channel = message.get_channel_name();
            if channel == heartbeat {
                unheard = None;
                continue;
            }
            let Ok(payload) = message.get_payload::<String>() else { continue };
            let Some(announcement) = read(&ids, channel, &payload) else { continue };
            if let Announcement::Cursor { room, cursor } = &announcement {
                redis.observe_cursor(room, *cursor);
            }
            if sender.send(announcement).await.is_err() {
                return;
            }
        }
    }
}

/// What a message on one of the rooms' channels says.
fn read(rooms: &[String], channel: &str, payload: &str) -> Option<Announcement> {
    let room = rooms.iter().find(|room| {
        channel == revocations_channel(room)
            || channel == cursor_channel(room)
            || channel == settings_channel(room)
            || channel == lease_channel(room)
    })?;
    let room = room.clone();
    if channel.ends_with(":revoked") {
        let (ticket, until) = parse_ended(payload)?;
        Some(Announcement::SessionEnded { room, ticket, until })
    } else if channel.ends_with(":lease") {
        Some(Announcement::LeaseFree { room })
    } else if channel.ends_with(":cursor") {
        Some(Announcement::Cursor { room, cursor: payload.parse().ok()? })
    } else {
        Some(Announcement::Settings { room, version: payload.parse().ok()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_read_by_channel() {
        let rooms = vec!["checkout".to_owned()];
        assert_eq!(
            read(&rooms, &cursor_channel("checkout"), "42"),
            Some(Announcement::Cursor { room: "checkout".into(), cursor: 42 })
        );
        assert_eq!(
            read(&rooms, &revocations_channel("checkout"), "7:1000"),
            Some(Announcement::SessionEnded { room: "checkout".into(), ticket: 7, until: 1000 })
        );
        assert_eq!(
            read(&rooms, &settings_channel("checkout"), "3"),
            Some(Announcement::Settings { room: "checkout".into(), version: 3 })
        );
        assert_eq!(
            read(&rooms, &lease_channel("checkout"), "free"),
            Some(Announcement::LeaseFree { room: "checkout".into() })
        );
        assert_eq!(read(&rooms, &cursor_channel("other"), "1"), None);
        assert_eq!(read(&rooms, &cursor_channel("checkout"), "x"), None);
    }
}
