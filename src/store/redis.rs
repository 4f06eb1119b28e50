//! The Redis store: every operation of the line is one Lua script (`lua/*.lua`, each headed by
//! its KEYS and ARGV, with a shared prelude), so each is atomic on the server and costs one
//! round trip. Every key of a room carries the hash tag `{room}`.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};

use super::StoreError;
use crate::line::{Gone, Joined, Limits, Redeemed, Stats};

const PRELUDE: &str = include_str!("lua/common.lua");

/// The line's scripts, loaded once (`EVALSHA`, falling back to `EVAL` after a Redis restart).
struct Scripts {
    join: Script,
    advance: Script,
    redeem: Script,
    leave: Script,
    stats: Script,
    release: Script,
    touch: Script,
    renew: Script,
    lease: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let with_prelude = |body: &str| Script::new(&format!("{PRELUDE}\n{body}"));
        Scripts {
            join: with_prelude(include_str!("lua/join.lua")),
            advance: with_prelude(include_str!("lua/advance.lua")),
            redeem: with_prelude(include_str!("lua/redeem.lua")),
            leave: with_prelude(include_str!("lua/leave.lua")),
            stats: with_prelude(include_str!("lua/stats.lua")),
            release: Script::new(include_str!("lua/release.lua")),
            touch: Script::new(include_str!("lua/touch.lua")),
            renew: Script::new(include_str!("lua/renew.lua")),
            lease: Script::new(include_str!("lua/lease.lua")),
        }
    }
}

/// A line kept in one Redis server.
pub struct RedisStore {
    client: redis::Client,
    connection: ConnectionManager,
    scripts: Scripts,
}

/// The channel on which a room's ended sessions are announced to every instance.
pub fn revocations_channel(room: &str) -> String {
    format!("vestibule:{{{room}}}:revoked")
}

/// The keys of a room, in the order of `lua/common.lua`.
fn keys(room: &str) -> [String; 8] {
    ["line", "grants", "sessions", "left", "seen", "gone", "reasons", "admitted"]
        .map(|part| format!("vestibule:{{{room}}}:{part}"))
}

/// Transient failures (timeouts, lost connections) and the rest alike make the store
/// unavailable for this call; the caller's policy is the same for both, and the connection
/// manager reconnects by itself.
fn unavailable(error: RedisError) -> StoreError {
    let kind =
        if error.is_timeout() || error.is_connection_dropped() || error.is_io_error() { "transient" } else { "error" };
    StoreError::Unavailable(format!("redis {kind}: {error}"))
}

impl RedisStore {
    /// Connect with bounded timeouts: a store call never waits longer than `response_timeout`.
    pub async fn connect(
        url: &str,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        let connection = ConnectionManager::new_with_config(client.clone(), config).await.map_err(unavailable)?;
        Ok(RedisStore { client, connection, scripts: Scripts::new() })
    }

    /// Tell every instance that the session `ticket` opened in `room` has ended.
    pub async fn announce_revocation(&self, room: &str, ticket: u64) -> Result<(), StoreError> {
        redis::cmd("PUBLISH")
            .arg(revocations_channel(room))
            .arg(ticket)
            .exec_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)
    }

    /// Subscribe to the revocation channels of `rooms`; each message is `(room, ticket)`.
    pub async fn revocations(&self, rooms: &[String]) -> Result<redis::aio::PubSubStream, StoreError> {
        let mut pubsub = self.client.get_async_pubsub().await.map_err(unavailable)?;
        for room in rooms {
            pubsub.subscribe(revocations_channel(room)).await.map_err(unavailable)?;
        }
        Ok(pubsub.into_on_message())
    }

    fn invocation<'a>(script: &'a Script, room: &str, limits: &Limits, now: u64) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        for key in keys(room) {
            invocation.key(key);
        }
        invocation
            .arg(now)
            .arg(limits.admit_per_minute)
            .arg(limits.max_active)
            .arg(limits.grant_ms)
            .arg(limits.session_ms)
            .arg(limits.abandon_ms);
        invocation
    }

    pub async fn join(&self, room: &str, limits: &Limits, admit_now: bool, now: u64) -> Result<Joined, StoreError> {
        let mut invocation = Self::invocation(&self.scripts.join, room, limits, now);
        invocation.arg(u8::from(admit_now));
        let (admitted, ticket, expires_at): (u8, u64, u64) =
            invocation.invoke_async(&mut self.connection.clone()).await.map_err(unavailable)?;
        Ok(if admitted == 1 { Joined::Admitted { ticket, expires_at } } else { Joined::Waiting { ticket } })
    }

    pub async fn advance(&self, room: &str, limits: &Limits, now: u64) -> Result<u32, StoreError> {
        let invocation = Self::invocation(&self.scripts.advance, room, limits, now);
        invocation.invoke_async(&mut self.connection.clone()).await.map_err(unavailable)
    }

    pub async fn redeem(&self, room: &str, limits: &Limits, ticket: u64, now: u64) -> Result<Redeemed, StoreError> {
        let mut invocation = Self::invocation(&self.scripts.redeem, room, limits, now);
        invocation.arg(ticket);
        let (kind, value): (u8, redis::Value) =
            invocation.invoke_async(&mut self.connection.clone()).await.map_err(unavailable)?;
        let reply = |error: redis::ParsingError| StoreError::Unavailable(format!("unexpected redis reply: {error}"));
        let number = || redis::from_redis_value::<u64>(value.clone()).map_err(reply);
        Ok(match kind {
            0 => Redeemed::Admitted { expires_at: number()? },
            1 => Redeemed::Waiting { position: number()? },
            _ => Redeemed::Gone(match redis::from_redis_value::<String>(value).map_err(reply)?.as_str() {
                "lapsed" => Gone::Lapsed,
                "left" => Gone::Left,
                "unknown" => Gone::Unknown,
                _ => Gone::Used,
            }),
        })
    }

    pub async fn release(&self, room: &str, ticket: u64) -> Result<bool, StoreError> {
        let [_, _, sessions, ..] = keys(room);
        let ended: u8 = self
            .scripts
            .release
            .key(sessions)
            .arg(ticket)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)?;
        Ok(ended == 1)
    }

    pub async fn leave(&self, room: &str, limits: &Limits, ticket: u64, now: u64) -> Result<(), StoreError> {
        let mut invocation = Self::invocation(&self.scripts.leave, room, limits, now);
        invocation.arg(ticket);
        invocation.invoke_async::<u8>(&mut self.connection.clone()).await.map_err(unavailable)?;
        Ok(())
    }

    pub async fn touch(&self, room: &str, tickets: &[u64], now: u64) -> Result<(), StoreError> {
        let [_, _, _, _, seen, ..] = keys(room);
        let mut invocation = self.scripts.touch.key(seen);
        invocation.arg(now);
        for ticket in tickets {
            invocation.arg(*ticket);
        }
        invocation.invoke_async::<u64>(&mut self.connection.clone()).await.map_err(unavailable)?;
        Ok(())
    }

    pub async fn renew(&self, room: &str, ticket: u64, until: u64) -> Result<bool, StoreError> {
        let [_, _, sessions, ..] = keys(room);
        let renewed: u8 = self
            .scripts
            .renew
            .key(sessions)
            .arg(ticket)
            .arg(until)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)?;
        Ok(renewed == 1)
    }

    /// Take or keep the room's scheduler lease for `lease`; true while this instance holds it.
    pub async fn hold_lease(&self, room: &str, instance: &str, lease: Duration) -> Result<bool, StoreError> {
        let held: u8 = self
            .scripts
            .lease
            .key(format!("vestibule:{{{room}}}:leader"))
            .arg(instance)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(unavailable)?;
        Ok(held == 1)
    }

    pub async fn stats(&self, room: &str, limits: &Limits, now: u64) -> Result<Stats, StoreError> {
        let invocation = Self::invocation(&self.scripts.stats, room, limits, now);
        let (cursor, last_ticket, active, outstanding, admitted, first): (u64, u64, u32, u32, u64, i64) =
            invocation.invoke_async(&mut self.connection.clone()).await.map_err(unavailable)?;
        Ok(Stats {
            cursor,
            last_ticket,
            active,
            outstanding,
            waiting: last_ticket - cursor,
            rate_per_second: crate::line::observed_rate(admitted as usize, u64::try_from(first).ok(), now),
        })
    }
}
