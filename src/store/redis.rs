//! The Redis store: every operation of the line is one Lua script (`lua/*.lua`, each headed by
//! its KEYS and ARGV, with a shared prelude), so each is atomic on the server and costs one
//! round trip. Every key of a room carries the hash tag `{room}`.
//!
//! Redis can lose a line (restarted empty, a failover without the latest writes). Each line
//! carries an epoch; a script that finds none answers `LOST`, and this store rebuilds the line
//! from what this instance knew of it (its last ticket, cursor and taken places, learned from
//! every reply) before trying again. Other instances notice the new epoch in their next
//! report and merge what they knew (`lua/restore.lua`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, Script, ScriptInvocation, Value};

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
    restore: Script,
    lease: Script,
    unlease: Script,
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
            release: with_prelude(include_str!("lua/release.lua")),
            touch: with_prelude(include_str!("lua/touch.lua")),
            renew: with_prelude(include_str!("lua/renew.lua")),
            restore: with_prelude(include_str!("lua/restore.lua")),
            lease: Script::new(include_str!("lua/lease.lua")),
            unlease: Script::new(include_str!("lua/unlease.lua")),
        }
    }
}

/// What this instance knows of a room's line: enough to rebuild it if Redis loses it.
#[derive(Debug, Default, Clone, Copy)]
struct Knowledge {
    epoch: u64,
    last: u64,
    cursor: u64,
    /// Sessions and grants (places taken) at the last report.
    held: u64,
}

/// One Redis server (reconnecting by itself), or a Redis Cluster (routing each script by its
/// keys' slot, which the `{room}` hash tag makes one per room, and following failovers).
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// A line kept in Redis: one server or a cluster.
pub struct RedisStore {
    /// Where announcements are subscribed to: every node of a cluster relays every message,
    /// so any one will do; they are tried in turn.
    subscribe_to: Vec<redis::Client>,
    /// How long connecting (or subscribing) may take.
    connect_timeout: Duration,
    connection: Connection,
    scripts: Scripts,
    known: Mutex<HashMap<String, Knowledge>>,
}

/// The channel on which a room's ended sessions are announced to every instance.
pub fn revocations_channel(room: &str) -> String {
    format!("vestibule:{{{room}}}:revoked")
}

/// The channel on which a room's cursor moves are announced to every instance.
pub fn cursor_channel(room: &str) -> String {
    format!("vestibule:{{{room}}}:cursor")
}

/// The keys of a room, in the order of `lua/common.lua`.
fn keys(room: &str) -> [String; 9] {
    ["line", "grants", "sessions", "left", "seen", "gone", "reasons", "admitted", "revoked"]
        .map(|part| format!("vestibule:{{{room}}}:{part}"))
}

/// The store's view of a failed call: the line was lost, is being restored, or Redis cannot
/// answer now (transient failures and the rest alike: the caller's policy is the same for
/// both, and the connection manager reconnects by itself).
fn classify(error: RedisError) -> StoreError {
    match error.code() {
        Some("LOST") => StoreError::Lost,
        Some("RESTORING") => StoreError::Restoring,
        _ => {
            let kind = if error.is_timeout() || error.is_connection_dropped() || error.is_io_error() {
                "transient"
            } else {
                "error"
            };
            StoreError::Unavailable(format!("redis {kind}: {error}"))
        }
    }
}

/// The report every line script can give (`report()` in `lua/common.lua`).
type Report = (u64, u64, u32, u32, u64, i64, u64);

fn stats_of(report: Report, now: u64) -> Stats {
    let (cursor, last_ticket, active, outstanding, admitted, first, epoch) = report;
    Stats {
        cursor,
        last_ticket,
        active,
        outstanding,
        waiting: last_ticket.saturating_sub(cursor),
        rate_per_second: crate::line::observed_rate(admitted as usize, u64::try_from(first).ok(), now),
        epoch,
    }
}

impl RedisStore {
    /// Connect with bounded timeouts: a store call never waits longer than `response_timeout`.
    pub async fn connect(
        url: &str,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(classify)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        let connection = ConnectionManager::new_with_config(client.clone(), config).await.map_err(classify)?;
        Ok(RedisStore::with(vec![client], connect_timeout, Connection::Single(connection)))
    }

    /// Connect to a Redis Cluster through any of its nodes `urls`, with the same bounds. A
    /// call retries twice (a moved slot, a failover under way) and then fails: the room
    /// pauses rather than hangs while a replica is promoted.
    pub async fn connect_cluster(
        urls: &[String],
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<RedisStore, StoreError> {
        let cluster = ClusterClient::builder(urls.iter().map(String::as_str))
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            .retries(2)
            .build()
            .map_err(classify)?;
        let connection = cluster.get_async_connection().await.map_err(classify)?;
        let clients = urls.iter().map(|url| redis::Client::open(url.as_str())).collect::<Result<_, _>>();
        Ok(RedisStore::with(clients.map_err(classify)?, connect_timeout, Connection::Cluster(connection)))
    }

    fn with(subscribe_to: Vec<redis::Client>, connect_timeout: Duration, connection: Connection) -> RedisStore {
        RedisStore { subscribe_to, connect_timeout, connection, scripts: Scripts::new(), known: Mutex::default() }
    }

    /// Subscribe to the ended sessions and cursor moves of `rooms`, at the first node that
    /// answers.
    pub async fn subscribe(&self, rooms: &[String]) -> Result<redis::aio::PubSubStream, StoreError> {
        let channels: Vec<String> =
            rooms.iter().flat_map(|room| [revocations_channel(room), cursor_channel(room)]).collect();
        let mut failure = StoreError::Unavailable("no redis node to subscribe at".into());
        for client in &self.subscribe_to {
            let subscribed = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channels).await?;
                Ok::<_, RedisError>(pubsub.into_on_message())
            };
            match tokio::time::timeout(self.connect_timeout, subscribed).await {
                Ok(Ok(messages)) => return Ok(messages),
                Ok(Err(error)) => failure = classify(error),
                Err(_) => failure = StoreError::Unavailable("redis subscription timed out".into()),
            }
        }
        Err(failure)
    }

    /// Sessions of `room` ended and not yet expired: for an instance that may have missed
    /// their announcement (its subscription was down).
    pub async fn ended_sessions(&self, room: &str, now: u64) -> Result<Vec<u64>, StoreError> {
        let [.., revoked] = keys(room);
        redis::cmd("ZRANGE")
            .arg(revoked)
            .arg(now)
            .arg("+inf")
            .arg("BYSCORE")
            .query_async(&mut self.connection.clone())
            .await
            .map_err(classify)
    }

    fn invocation<'a>(script: &'a Script, room: &str, limits: &Limits, now: u64) -> ScriptInvocation<'a> {
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

    /// Run a line script; when the line is lost, restore it from what this instance knows
    /// and run the script again.
    async fn run<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
        room: &str,
        limits: &Limits,
        now: u64,
    ) -> Result<T, StoreError> {
        match invocation.invoke_async(&mut self.connection.clone()).await.map_err(classify) {
            Err(StoreError::Lost) => {
                self.restore(room, limits, now).await?;
                invocation.invoke_async(&mut self.connection.clone()).await.map_err(classify)
            }
            result => result,
        }
    }

    /// Create the line of `room`, or rebuild a lost one from what this instance knew.
    async fn restore(&self, room: &str, limits: &Limits, now: u64) -> Result<(), StoreError> {
        let known = self.knowledge(room);
        let mut invocation = Self::invocation(&self.scripts.restore, room, limits, now);
        invocation.arg(known.epoch).arg(known.last).arg(known.cursor).arg(known.held);
        let epoch: u64 = invocation.invoke_async(&mut self.connection.clone()).await.map_err(classify)?;
        if known.last > 0 && epoch != known.epoch {
            tracing::warn!(
                room,
                last = known.last,
                cursor = known.cursor,
                held = known.held,
                "the line was lost by the store; restored it from what this instance knew"
            );
        }
        self.learn(room, |k| k.epoch = epoch);
        Ok(())
    }

    fn knowledge(&self, room: &str) -> Knowledge {
        self.known.lock().map(|known| known.get(room).copied().unwrap_or_default()).unwrap_or_default()
    }

    fn learn(&self, room: &str, update: impl FnOnce(&mut Knowledge)) {
        if let Ok(mut known) = self.known.lock() {
            match known.get_mut(room) {
                Some(knowledge) => update(knowledge),
                None => update(known.entry(room.to_owned()).or_default()),
            }
        }
    }

    /// Take in a report; when another instance has restored the line since the last one,
    /// merge what this instance knew into it and report again.
    async fn reported(&self, room: &str, limits: &Limits, now: u64, report: Report) -> Result<Stats, StoreError> {
        let mut stats = stats_of(report, now);
        let known = self.knowledge(room);
        if known.epoch != 0 && stats.epoch != known.epoch {
            self.restore(room, limits, now).await?;
            let invocation = Self::invocation(&self.scripts.stats, room, limits, now);
            stats = stats_of(self.run(&invocation, room, limits, now).await?, now);
        }
        self.learn(room, |k| {
            k.epoch = stats.epoch;
            k.last = k.last.max(stats.last_ticket);
            k.cursor = k.cursor.max(stats.cursor);
            k.held = u64::from(stats.active + stats.outstanding);
        });
        Ok(stats)
    }

    pub async fn join(&self, room: &str, limits: &Limits, admit_now: bool, now: u64) -> Result<Joined, StoreError> {
        let mut invocation = Self::invocation(&self.scripts.join, room, limits, now);
        invocation.arg(u8::from(admit_now));
        let (admitted, ticket, expires_at): (u8, u64, u64) = self.run(&invocation, room, limits, now).await?;
        self.learn(room, |k| k.last = k.last.max(ticket));
        Ok(if admitted == 1 { Joined::Admitted { ticket, expires_at } } else { Joined::Waiting { ticket } })
    }

    pub async fn advance(&self, room: &str, limits: &Limits, now: u64) -> Result<(u32, Stats), StoreError> {
        let mut invocation = Self::invocation(&self.scripts.advance, room, limits, now);
        invocation.arg(cursor_channel(room));
        let (granted, cursor, last, active, outstanding, admitted, first, epoch): (
            u32,
            u64,
            u64,
            u32,
            u32,
            u64,
            i64,
            u64,
        ) = self.run(&invocation, room, limits, now).await?;
        let report = (cursor, last, active, outstanding, admitted, first, epoch);
        Ok((granted, self.reported(room, limits, now, report).await?))
    }

    pub async fn redeem(&self, room: &str, limits: &Limits, ticket: u64, now: u64) -> Result<Redeemed, StoreError> {
        let mut invocation = Self::invocation(&self.scripts.redeem, room, limits, now);
        invocation.arg(ticket);
        let (kind, value): (u8, redis::Value) = self.run(&invocation, room, limits, now).await?;
        let reply = |error: redis::ParsingError| StoreError::Unavailable(format!("unexpected redis reply: {error}"));
        let number = || redis::from_redis_value::<u64>(value.clone()).map_err(reply);
        Ok(match kind {
            0 => Redeemed::Admitted { expires_at: number()? },
            1 => {
                let position = number()?;
                self.learn(room, |k| {
                    k.last = k.last.max(ticket);
                    k.cursor = k.cursor.max(ticket.saturating_sub(position));
                });
                Redeemed::Waiting { position }
            }
            _ => Redeemed::Gone(match redis::from_redis_value::<String>(value).map_err(reply)?.as_str() {
                "lapsed" => Gone::Lapsed,
                "left" => Gone::Left,
                "unknown" => Gone::Unknown,
                _ => Gone::Used,
            }),
        })
    }

    /// End a session: free its place, announce it to every instance, keep it for those that
    /// miss the announcement.
    pub async fn release(&self, room: &str, limits: &Limits, ticket: u64, now: u64) -> Result<bool, StoreError> {
        let mut invocation = Self::invocation(&self.scripts.release, room, limits, now);
        invocation.arg(ticket).arg(revocations_channel(room));
        let ended: u8 = self.run(&invocation, room, limits, now).await?;
        Ok(ended == 1)
    }

    pub async fn leave(&self, room: &str, limits: &Limits, ticket: u64, now: u64) -> Result<(), StoreError> {
        let mut invocation = Self::invocation(&self.scripts.leave, room, limits, now);
        invocation.arg(ticket);
        self.run::<u8>(&invocation, room, limits, now).await?;
        Ok(())
    }

    pub async fn touch(&self, room: &str, limits: &Limits, tickets: &[u64], now: u64) -> Result<(), StoreError> {
        let mut invocation = Self::invocation(&self.scripts.touch, room, limits, now);
        for ticket in tickets {
            invocation.arg(*ticket);
        }
        self.run::<u64>(&invocation, room, limits, now).await?;
        Ok(())
    }

    pub async fn renew(
        &self,
        room: &str,
        limits: &Limits,
        ticket: u64,
        until: u64,
        now: u64,
    ) -> Result<bool, StoreError> {
        let mut invocation = Self::invocation(&self.scripts.renew, room, limits, now);
        invocation.arg(ticket).arg(until);
        let renewed: u8 = self.run(&invocation, room, limits, now).await?;
        Ok(renewed == 1)
    }

    fn leader_key(room: &str) -> String {
        format!("vestibule:{{{room}}}:leader")
    }

    /// Take or keep the room's scheduler lease for `lease`; true while this instance holds it.
    pub async fn hold_lease(&self, room: &str, instance: &str, lease: Duration) -> Result<bool, StoreError> {
        let mut invocation = self.scripts.lease.key(Self::leader_key(room));
        invocation.arg(instance).arg(lease.as_millis() as u64);
        let held: u8 = invocation.invoke_async(&mut self.connection.clone()).await.map_err(classify)?;
        Ok(held == 1)
    }

    /// Give the lease up (a graceful stop), so that another instance takes over at once.
    pub async fn drop_lease(&self, room: &str, instance: &str) -> Result<(), StoreError> {
        let mut invocation = self.scripts.unlease.key(Self::leader_key(room));
        invocation.arg(instance);
        invocation.invoke_async::<u8>(&mut self.connection.clone()).await.map_err(classify)?;
        Ok(())
    }

    pub async fn stats(&self, room: &str, limits: &Limits, now: u64) -> Result<Stats, StoreError> {
        let invocation = Self::invocation(&self.scripts.stats, room, limits, now);
        let report: Report = self.run(&invocation, room, limits, now).await?;
        self.reported(room, limits, now, report).await
    }
}
