//! The position feed: `/_vestibule/ws?room=ID`, a websocket that pushes the visitor's place
//! and wait whenever they change (at most once a second), and `admitted` when the turn comes.
//!
//! Each socket reads its room's [`Snapshot`](super::Snapshot) from memory: no store work per
//! waiter. The client has nothing to say, so frames are tiny and buffers small; a ping every
//! 20 s must be answered within 10 s.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use super::{Holding, Room, Snapshot};
use crate::config::RoomState;
use crate::limit::Slot;
use crate::line;

const PING_EVERY: Duration = Duration::from_secs(20);
const PONG_DEADLINE: Duration = Duration::from_secs(10);
/// The longest a message may take to leave: a peer that stops reading is let go.
pub const SEND_DEADLINE: Duration = Duration::from_secs(10);
/// A connected waiter is reported alive this often (or four times per `abandon_seconds`,
/// if that is more often).
const TOUCH_EVERY: Duration = Duration::from_secs(30);
/// How long a socket without a ticket (nothing to wait for: a closed room's page, a script)
/// is kept: it holds a place under the caps and must not hold it for ever.
pub const TICKETLESS_LIFETIME: Duration = Duration::from_secs(60);
/// At most one position message per socket per this long.
const MIN_GAP: Duration = Duration::from_secs(1);

/// Small buffers: a waiting socket mostly idles, and the page only ever sends pongs and tiny
/// frames (at most 1 KiB is accepted). tungstenite allocates its read buffer up front, so its
/// size is paid by every waiting socket; it grows for the rare larger frame.
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(1024))
        .max_frame_size(Some(1024))
}

/// A message of the feed (docs/api.md, feed messages), serialized as `{"type": ..., ...}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Shown {
    Admitted,
    Closed {
        message: Option<String>,
    },
    Paused {
        message: Option<String>,
        /// `store` while the store is away (the page words it in the visitor's language).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
    },
    Position {
        position: u64,
        eta_seconds: Option<u64>,
    },
    Message {
        message: String,
    },
    /// In a scheduled sale's pre-queue: seconds until it starts.
    Prequeue {
        starts_in: u64,
    },
}

impl Shown {
    fn position(&self) -> Option<u64> {
        match self {
            Shown::Position { position, .. } => Some(*position),
            _ => None,
        }
    }

    fn text(&self) -> String {
        serde_json::to_string(self).expect("feed messages serialize")
    }
}

/// The message a waiter should see for this snapshot.
fn message_for(room: &Room, snapshot: &Snapshot, holding: Holding) -> Option<Shown> {
    let ticket = match holding {
        Holding::Token => return Some(Shown::Admitted),
        // Before the start; after it, until this instance knows the seating (a moment), the
        // countdown stays at zero.
        Holding::Prequeue { .. } => {
            return Some(Shown::Prequeue { starts_in: snapshot.starts_at.map_or(0, |at| room.starts_in(at)) })
        }
        Holding::Nothing if snapshot.state == RoomState::Closed => {
            return Some(Shown::Closed { message: snapshot.message.clone() })
        }
        Holding::Nothing => return None,
        Holding::Ticket(ticket) => ticket,
    };
    // A turn granted is redeemed through the store: while it is away, the page waits too
    // (rather than reload to a page that cannot let it in yet).
    if ticket <= snapshot.cursor && snapshot.available {
        return Some(Shown::Admitted);
    }
    Some(match snapshot.waiting_state() {
        RoomState::Paused => Shown::Paused { message: snapshot.notice(), reason: snapshot.pause_reason() },
        RoomState::Closed => Shown::Closed { message: snapshot.message.clone() },
        RoomState::Open | RoomState::Passthrough => {
            let position = line::position(ticket, snapshot.cursor);
            Shown::Position { position, eta_seconds: line::eta_seconds(position, snapshot.eta_rate()) }
        }
    })
}

/// Serve one feed socket until the visitor is admitted, leaves, stops answering, or `stop`.
pub async fn serve(upgraded: Upgraded, room: Arc<Room>, holding: Holding, stop: CancellationToken, slot: Slot) {
    serve_on(TokioIo::new(upgraded), room, holding, stop, slot).await
}

/// [`serve`] on any byte stream.
pub async fn serve_on<S>(io: S, room: Arc<Room>, mut holding: Holding, stop: CancellationToken, _slot: Slot)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _counted = room.feed_opened();
    let mut socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config())).await;
    let mut snapshots = room.subscribe();
    let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let touch_every = TOUCH_EVERY.min(Duration::from_millis(room.limits().abandon_ms / 4));
    let mut touch = tokio::time::interval(touch_every);
    let mut generation = snapshots.borrow().generation;
    let mut pong_due: Option<Instant> = None;
    let mut last_sent: Option<Shown> = None;
    let mut last_message: Option<Option<String>> = None;
    let mut last_position_at = Instant::now() - MIN_GAP;
    let mut smallest_position = u64::MAX;
    let mut pending = true; // send the current state at once
    let ticketless = holding == Holding::Nothing;
    let ticketless_until = Instant::now() + TICKETLESS_LIFETIME;

    loop {
        if pending {
            // Decided under the channel's read lock (no copy of the snapshot); acted on after.
            let (outgoing, restored) = {
                let snapshot = snapshots.borrow_and_update();
                // The line was restored, or the store is back: say at once that we are here.
                let restored = snapshot.generation != generation;
                generation = snapshot.generation;
                let mut outgoing = Vec::new();
                // A pre-queue number takes its place once the seating is known here.
                let seated = room.seated(holding);
                if seated != holding {
                    holding = seated;
                    if let Holding::Ticket(ticket) = holding {
                        room.touch(ticket);
                    }
                }
                if let Some(next) = message_for(&room, &snapshot, holding) {
                    let position = next.position();
                    let too_soon = position.is_some() && last_position_at.elapsed() < MIN_GAP;
                    // A shown place never goes back.
                    let goes_up = position.is_some_and(|p| p > smallest_position);
                    if !too_soon && !goes_up && last_sent.as_ref() != Some(&next) {
                        if let Some(p) = position {
                            smallest_position = p;
                            last_position_at = Instant::now();
                        }
                        outgoing.push(next.clone());
                        last_sent = Some(next);
                        pending = false;
                    } else if !too_soon {
                        pending = false;
                    }
                } else {
                    pending = false;
                }
                let open = snapshot.waiting_state() == RoomState::Open;
                if open && last_message.as_ref() != Some(&snapshot.message) {
                    if let (Some(_), Some(text)) = (&last_message, &snapshot.message) {
                        outgoing.push(Shown::Message { message: text.clone() });
                    }
                    last_message = Some(snapshot.message.clone());
                }
                (outgoing, restored)
            };
            if let (true, Holding::Ticket(ticket)) = (restored, holding) {
                room.touch(ticket);
            }
            for message in outgoing {
                let admitted = message == Shown::Admitted;
                if !send(&mut socket, Message::text(message.text()), &stop).await {
                    return;
                }
                if admitted {
                    let _ = tokio::time::timeout(SEND_DEADLINE, socket.close(None)).await;
                    return;
                }
            }
        }
        let retry_at = last_position_at + MIN_GAP;
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                pending = true;
            }
            () = tokio::time::sleep_until(retry_at), if pending => {}
            incoming = socket.next() => match incoming {
                Some(Ok(Message::Pong(_))) => pong_due = None,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {} // the client has nothing to say
            },
            _ = ping.tick() => {
                if pong_due.is_some_and(|due| Instant::now() >= due) {
                    return;
                }
                if !send(&mut socket, Message::Ping(Default::default()), &stop).await {
                    return;
                }
                pong_due.get_or_insert(Instant::now() + PONG_DEADLINE);
            }
            _ = touch.tick() => room.seen(holding),
            () = tokio::time::sleep_until(ticketless_until), if ticketless => {
                let _ = tokio::time::timeout(SEND_DEADLINE, socket.close(None)).await;
                return;
            }
            () = stop.cancelled() => {
                let _ = tokio::time::timeout(SEND_DEADLINE, socket.close(None)).await;
                return;
            }
        }
    }
}

/// Send one message within [`SEND_DEADLINE`], giving up at once on `stop`; false when the
/// socket is to be dropped (broken, stuck, or stopping).
async fn send<S>(socket: &mut WebSocketStream<S>, message: Message, stop: &CancellationToken) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::select! {
        sent = tokio::time::timeout(SEND_DEADLINE, socket.send(message)) => matches!(sent, Ok(Ok(()))),
        () = stop.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoomConfig;

    fn room() -> Arc<Room> {
        let config: RoomConfig =
            toml::from_str("id = \"checkout\"\npaths = [\"/checkout\"]\nadmit_per_minute = 60\nmax_active = 1")
                .unwrap();
        Arc::new(Room::new(&config, CancellationToken::new(), crate::metrics::RoomMetrics::detached()))
    }

    /// A feed socket on an in-memory stream of `capacity` bytes whose client never reads.
    fn stuck_feed(
        room: &Arc<Room>,
        stop: &CancellationToken,
    ) -> (Arc<crate::limit::Slots>, tokio::task::JoinHandle<()>) {
        let (server, client) = tokio::io::duplex(64);
        let limits = crate::limit::Slots::new(10, 10);
        let slot = limits.admit("127.0.0.1".parse().unwrap()).unwrap();
        let serving = tokio::spawn(serve_on(server, room.clone(), Holding::Ticket(5), stop.clone(), slot));
        // The client keeps its end open and reads nothing.
        tokio::spawn(async move {
            let _client = client;
            std::future::pending::<()>().await
        });
        (limits, serving)
    }

    /// Messages enough to fill the stream: each new room message is pushed to the waiter.
    async fn flood(room: &Room) {
        for n in 0..10 {
            room.set_control(RoomState::Open, Some(format!("message number {n} for everyone waiting")));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_is_let_go_within_the_send_deadline() {
        let room = room();
        let stop = CancellationToken::new();
        let (limits, serving) = stuck_feed(&room, &stop);
        flood(&room).await;
        assert_eq!(limits.open(), 1, "stuck on a full stream");
        tokio::time::timeout(SEND_DEADLINE + Duration::from_secs(1), serving).await.expect("let go").unwrap();
        assert_eq!(limits.open(), 0, "its place under the caps is free");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_peer_does_not_hold_up_a_stop() {
        let room = room();
        let stop = CancellationToken::new();
        let (_limits, serving) = stuck_feed(&room, &stop);
        flood(&room).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_millis(100), serving).await.expect("stopped at once").unwrap();
    }

    #[test]
    fn messages_are_written_as_the_design_says() {
        let cases = [
            (
                Shown::Position { position: 42, eta_seconds: Some(35) },
                r#"{"type":"position","position":42,"eta_seconds":35}"#,
            ),
            (
                Shown::Position { position: 7, eta_seconds: None },
                r#"{"type":"position","position":7,"eta_seconds":null}"#,
            ),
            (Shown::Admitted, r#"{"type":"admitted"}"#),
            (
                Shown::Paused { message: Some("back soon".into()), reason: None },
                r#"{"type":"paused","message":"back soon"}"#,
            ),
            (
                Shown::Paused { message: None, reason: Some("store") },
                r#"{"type":"paused","message":null,"reason":"store"}"#,
            ),
            (Shown::Closed { message: Some("Sold out".into()) }, r#"{"type":"closed","message":"Sold out"}"#),
            (Shown::Closed { message: None }, r#"{"type":"closed","message":null}"#),
            (Shown::Message { message: "hi".into() }, r#"{"type":"message","message":"hi"}"#),
        ];
        for (shown, text) in cases {
            assert_eq!(shown.text(), text);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_without_a_ticket_is_closed_after_its_lifetime() {
        let room = room();
        let (server, client) = tokio::io::duplex(64 * 1024);
        let limits = crate::limit::Slots::new(10, 10);
        let slot = limits.admit("127.0.0.1".parse().unwrap()).unwrap();
        let serving = tokio::spawn(serve_on(server, room.clone(), Holding::Nothing, CancellationToken::new(), slot));
        // The client answers pings (tungstenite does, while it is read).
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let reading = tokio::spawn(async move { while let Some(Ok(_)) = client.next().await {} });
        tokio::time::sleep(TICKETLESS_LIFETIME - Duration::from_secs(1)).await;
        assert_eq!(limits.open(), 1, "kept within its lifetime");
        tokio::time::timeout(Duration::from_secs(2), serving).await.expect("closed at its lifetime").unwrap();
        assert_eq!(limits.open(), 0);
        reading.await.unwrap();
    }
}
