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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, Script, ScriptInvocation, Value};

use tracing::Instrument;

use super::{Advanced, Lease, StoreError};
use crate::clock::Clock;
use crate::line::{shuffle, Absence, Gone, Joined, Limits, Prequeued, Redeemed, Seated, Stats};
use crate::metrics::Metrics;

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
    unanswered: Script,
    prequeue: Script,
    seat: Script,
    settings: Script,
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
            unanswered: with_prelude(include_str!("lua/unanswered.lua")),
            prequeue: with_prelude(include_str!("lua/prequeue.lua")),
            seat: with_prelude(include_str!("lua/seat.lua")),
            settings: with_prelude(include_str!("lua/settings.lua")),
            lease: Script::new(include_str!("lua/lease.lua")),
            unlease: Script::new(include_str!("lua/unlease.lua")),
        }
    }
}

/// What this instance knows of a room's line: enough to rebuild it if Redis loses it.
#[derive(Debug, Default, Clone)]
struct Knowledge {
    epoch: u64,
    last: u64,
    cursor: u64,
    /// Sessions, and turns granted not yet redeemed, at the last report.
    sessions: u64,
    grants: u64,
    /// Which line it is.
    line: u64,
    /// The live overrides it knew (JSON), and their version.
    overrides: Option<(String, u64)>,
    /// The scheduled sale's pre-queue it knew: the event and the highest number given or
    /// presented (a line Redis lost gets it back, so that no number is given twice).
    prequeue: Option<(u64, u64)>,
    /// The sale's seating it knew: a line Redis lost gets it back, never redrawn.
    seated: Option<Seated>,
}

impl Knowledge {
    fn learn_seated(&mut self, seated: Seated) {
        self.last = self.last.max(seated.base + seated.count);
        self.seated = Some(seated);
    }

    /// Pre-queue number `number` of `event` was given (or seen): a later event's pre-queue
    /// replaces an earlier one's.
    fn learn_prequeue(&mut self, event: u64, number: u64) {
        let known = self.prequeue.filter(|(known, _)| *known == event).map_or(0, |(_, last)| last);
        self.prequeue = Some((event, known.max(number)));
    }
}

/// A seating as a script returned it.
fn seated_of(event: u64, base: u64, count: u64, at: u64, seed: &str, shuffled: u8) -> Result<Seated, StoreError> {
    let seed =
        shuffle::parse_hex(seed).ok_or_else(|| StoreError::Failed("redis: a seating without its seed".into()))?;
    Ok(Seated { event, base, count, at, seed, shuffled: shuffled == 1 })
}

/// One Redis server (reconnecting by itself), or a Redis Cluster (routing each script by its
/// keys' slot, which the `{room}` hash tag makes one per room, and following failovers).
/// Both connect at the first call, not before: an instance starts while Redis is down.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection made at the first call that finds the cluster (and kept; it follows
/// the cluster's changes by itself).
struct LazyCluster {
    client: ClusterClient,
    connection: tokio::sync::OnceCell<ClusterConnection>,
    connect_timeout: Duration,
}

impl LazyCluster {
    async fn get(&self) -> Result<ClusterConnection, RedisError> {
        let connect = || async {
            match tokio::time::timeout(self.connect_timeout, self.client.get_async_connection()).await {
                Ok(connection) => connection,
                Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no cluster node answered").into()),
            }
        };
        self.connection.get_or_try_init(connect).await.cloned()
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(lazy) => Box::pin(async move { lazy.get().await?.req_packed_command(cmd).await }),
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
            Connection::Cluster(lazy) => {
                Box::pin(async move { lazy.get().await?.req_packed_commands(pipeline, offset, count).await })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(_) => 0,
        }
    }
}

/// How long before its caller gives up a call must reach Redis to be carried out: covers
/// the error of the clock estimate and the reply's way back.
const DEADLINE_MARGIN: Duration = Duration::from_millis(250);
/// How often the estimate of Redis's clock is checked; the best of the last half minute counts.
const CLOCK_CHECK_EVERY_MS: u64 = 1_000;
const CLOCK_SAMPLE_LIFE_MS: u64 = 30_000;

/// Redis's clock as seen from here: its time minus ours, from the `TIME` round trip with the
/// shortest delay lately (the estimate is off by at most half that delay).
#[derive(Debug, Clone, Copy)]
struct ClockSample {
    offset_ms: i64,
    round_trip_ms: u64,
    at: u64,
}

/// A line kept in Redis: one server or a cluster.
pub struct RedisStore {
    /// Where announcements are subscribed to: every node of a cluster relays every message,
    /// so any one will do; they are tried in turn.
    subscribe_to: Vec<redis::Client>,
    /// How long connecting (or subscribing) may take.
    connect_timeout: Duration,
    /// How long a call may take before it fails (and Redis must refuse to carry it out).
    response_timeout: Duration,
    connection: Connection,
    scripts: Scripts,
    known: Mutex<HashMap<String, Knowledge>>,
    clock: Clock,
    redis_clock: Mutex<Option<ClockSample>>,
    clock_checked_at: AtomicU64,
    /// This instance's id: it holds leases and opens sessions under it.
    instance: String,
    /// When Redis last answered (ms of `clock`).
    answered_at: AtomicU64,
    metrics: Option<Arc<Metrics>>,
}

/// The channel on which a room's ended sessions are announced to every instance.
pub fn revocations_channel(room: &str) -> String {
    format!("vestibule:{{{room}}}:revoked")
}

/// The channel on which a room's live overrides changes are announced (their version).
pub fn settings_channel(room: &str) -> String {
    format!("vestibule:{{{room}}}:settings")
}

/// Each instance's reading of the upstream's health for a room (`[rooms.adaptive]`).
fn health_key(room: &str) -> String {
    format!("vestibule:{{{room}}}:health")
}

/// How long the readings of the upstream's health are kept after the last one.
const HEALTH_KEPT_MS: i64 = 60_000;

/// The channel on which a room's cursor moves are announced to every instance.
pub fn cursor_channel(room: &str) -> String {
    format!("vestibule:{{{room}}}:cursor")
}

/// Where a leader giving up a room's lease says so: the others try it at once.
pub fn lease_channel(room: &str) -> String {
    format!("vestibule:{{{room}}}:lease")
}

/// The keys of a room, in the order of `lua/common.lua`.
fn keys(room: &str) -> [String; 15] {
    [
        "line",
        "grants",
        "sessions",
        "left",
        "seen",
        "gone",
        "reasons",
        "admitted",
        "revoked",
        "unconfirmed",
        "used",
        "fresh",
        "openers",
        "instances",
        "proofs",
    ]
    .map(|part| format!("vestibule:{{{room}}}:{part}"))
}

/// A session ended, as announced on a room's channel: `ticket:until` (ms).
pub fn parse_ended(payload: &str) -> Option<(u64, u64)> {
    let (ticket, until) = payload.split_once(':')?;
    Some((ticket.parse().ok()?, until.parse().ok()?))
}

/// The store's view of a failed call: the line was lost or is being restored; Redis cannot
/// answer now (gone, slow, loading, failing over, or the call came too late: transient, and
/// the connection manager reconnects by itself); or Redis refused what was asked (a script
/// error: a bug, not an outage).
fn classify(error: RedisError) -> StoreError {
    match error.code() {
        Some("LOST") => StoreError::Lost,
        Some("RESTORING") => StoreError::Restoring,
        Some("REUSED") => StoreError::ProofReused,
        Some("EXPIRED") => StoreError::Unavailable("redis: the call reached it after it was given up".into()),
        Some("LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" | "READONLY") => {
            StoreError::Unavailable(format!("redis: {error}"))
        }
        _ if error.is_timeout()
            || error.is_connection_dropped()
            || error.is_io_error()
            || error.is_connection_refusal()
            || error.is_unrecoverable_error() =>
        {
            StoreError::Unavailable(format!("redis: {error}"))
        }
        _ => StoreError::Failed(format!("redis: {error}")),
    }
}

/// The report every line script can give (`report()` in `lua/common.lua`), field by field in
/// its order there.
#[derive(Debug, Clone, Copy)]
struct Report {
    cursor: u64,
    last_ticket: u64,
    active: u32,
    outstanding: u32,
    /// Admissions in the last minute, and when the first of them was (-1: none).
    admitted: u64,
    first_admitted: i64,
    epoch: u64,
    line: u64,
    settings_version: u64,
    /// The adaptive rate in force, per minute (0: none).
    adaptive: u32,
    prequeued: u64,
    prequeue_event: u64,
}

impl Report {
    /// How many integers a report is.
    const LEN: usize = 12;

    /// A report from the script's integers, in `report()`'s order.
    fn of(values: &[i64]) -> Result<Report, String> {
        let [cursor, last, active, outstanding, admitted, first, epoch, line, version, adaptive, prequeued, event] =
            *values
        else {
            return Err(format!("a report of {} integers, not {}", values.len(), Report::LEN));
        };
        let number = |value: i64| u64::try_from(value).map_err(|_| format!("{value} in a report"));
        let count = |value: i64| u32::try_from(value).map_err(|_| format!("{value} in a report"));
        Ok(Report {
            cursor: number(cursor)?,
            last_ticket: number(last)?,
            active: count(active)?,
            outstanding: count(outstanding)?,
            admitted: number(admitted)?,
            first_admitted: first,
            epoch: number(epoch)?,
            line: number(line)?,
            settings_version: number(version)?,
            adaptive: count(adaptive)?,
            prequeued: number(prequeued)?,
            prequeue_event: number(event)?,
        })
    }

    fn stats(self, now: u64) -> Stats {
        Stats {
            cursor: self.cursor,
            last_ticket: self.last_ticket,
            active: self.active,
            outstanding: self.outstanding,
            waiting: self.last_ticket.saturating_sub(self.cursor),
            rate_per_second: crate::line::observed_rate(
                self.admitted as usize,
                u64::try_from(self.first_admitted).ok(),
                now,
            ),
            admitted_last_minute: self.admitted,
            epoch: self.epoch,
            line: self.line,
            settings_version: self.settings_version,
            adaptive_per_minute: (self.adaptive > 0).then_some(self.adaptive),
            prequeued: self.prequeued,
            prequeue_event: self.prequeue_event,
        }
    }
}

impl FromRedisValue for Report {
    fn from_redis_value(value: Value) -> Result<Report, redis::ParsingError> {
        let values: Vec<i64> = FromRedisValue::from_redis_value(value)?;
        Report::of(&values).map_err(redis::ParsingError::from)
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
        // Reconnection attempts back off to at most a second apart: a Redis that comes back
        // is found within about a second.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout))
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(classify)?;
        Ok(RedisStore::with(vec![client], (connect_timeout, response_timeout), Connection::Single(connection)))
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
        let connection = Arc::new(LazyCluster { client: cluster, connection: Default::default(), connect_timeout });
        let clients = urls.iter().map(|url| redis::Client::open(url.as_str())).collect::<Result<_, _>>();
        let timeouts = (connect_timeout, response_timeout);
        Ok(RedisStore::with(clients.map_err(classify)?, timeouts, Connection::Cluster(connection)))
    }

    fn with(subscribe_to: Vec<redis::Client>, timeouts: (Duration, Duration), connection: Connection) -> RedisStore {
        RedisStore {
            subscribe_to,
            connect_timeout: timeouts.0,
            response_timeout: timeouts.1,
            connection,
            scripts: Scripts::new(),
            known: Mutex::default(),
            clock: Clock::new(),
            redis_clock: Mutex::default(),
            clock_checked_at: AtomicU64::new(0),
            instance: crate::id::random_id(),
            answered_at: AtomicU64::new(0),
            metrics: None,
        }
    }

    /// Which line `room` has, as far as this instance knows (0 before it knows).
    pub fn line(&self, room: &str) -> u64 {
        self.knowledge(room).line
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Check Redis's clock (at most once a second, one `TIME` round trip), so that every call
    /// can carry the Redis time after which its caller has given up on it.
    pub async fn keep_time(&self) {
        let started = self.clock.now_ms();
        let checked = self.clock_checked_at.load(Ordering::Relaxed);
        if started < checked + CLOCK_CHECK_EVERY_MS
            || self.clock_checked_at.compare_exchange(checked, started, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let time = self.bounded(redis::cmd("TIME").query_async::<(u64, u64)>(&mut self.connection.clone())).await;
        let Ok((seconds, micros)) = time else { return };
        let ended = self.clock.now_ms();
        let redis_ms = (seconds * 1_000 + micros / 1_000) as i64;
        let sample = ClockSample {
            offset_ms: redis_ms - ((started + ended) / 2) as i64,
            round_trip_ms: ended - started,
            at: ended,
        };
        if let Ok(mut best) = self.redis_clock.lock() {
            let better = best.is_none_or(|best| {
                sample.round_trip_ms <= best.round_trip_ms || best.at + CLOCK_SAMPLE_LIFE_MS <= sample.at
            });
            if better {
                *best = Some(sample);
            }
        }
    }

    /// The Redis time after which a call made now has been given up (0: not known, no limit).
    fn deadline(&self) -> u64 {
        let sample = self.redis_clock.lock().ok().and_then(|sample| *sample);
        let Some(sample) = sample.filter(|s| s.round_trip_ms < DEADLINE_MARGIN.as_millis() as u64) else {
            return 0;
        };
        let allowed = self.response_timeout.saturating_sub(DEADLINE_MARGIN).as_millis() as i64;
        let error = (sample.round_trip_ms / 2 + 1) as i64;
        (self.clock.now_ms() as i64 + sample.offset_ms + allowed - error).max(1) as u64
    }

    /// A cursor move this instance heard announced: what it knows of the line, should Redis
    /// lose it.
    pub fn observe_cursor(&self, room: &str, cursor: u64) {
        self.learn(room, |k| k.cursor = k.cursor.max(cursor));
    }

    /// Subscribe to the ended sessions, cursor moves and settings changes of `rooms`, at the
    /// first node that answers.
    /// Also subscribe to `heartbeat`, this instance's own channel: a subscription that hears
    /// nothing on it is dead even when its connection looks open (half-open).
    pub async fn subscribe(&self, rooms: &[String], heartbeat: &str) -> Result<redis::aio::PubSubStream, StoreError> {
        let mut channels: Vec<String> = rooms
            .iter()
            .flat_map(|room| {
                [revocations_channel(room), cursor_channel(room), settings_channel(room), lease_channel(room)]
            })
            .collect();
        channels.push(heartbeat.to_owned());
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

    /// Publish `message` on `channel` (through the connection the line's calls take).
    pub async fn publish(&self, channel: &str, message: &str) -> Result<(), StoreError> {
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(channel).arg(message);
        self.bounded(publish.query_async::<u64>(&mut self.connection.clone())).await.map(drop)
    }

    /// Sessions of `room` ended and not yet expired, with when they would have: for an
    /// instance that may have missed their announcement (its subscription was down).
    pub async fn ended_sessions(&self, room: &str, now: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        let revoked = format!("vestibule:{{{room}}}:revoked");
        let mut range = redis::cmd("ZRANGE");
        range.arg(revoked).arg(now).arg("+inf").arg("BYSCORE").arg("WITHSCORES");
        self.bounded(range.query_async(&mut self.connection.clone())).await
    }

    /// A line script's invocation with the arguments of `lua/common.lua`; the script's own
    /// follow. Made as the call is sent: it carries the call's deadline.
    fn invocation<'a>(
        &self,
        script: &'a Script,
        room: &str,
        limits: &Limits,
        now: u64,
        absence: Absence,
    ) -> ScriptInvocation<'a> {
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
            .arg(limits.abandon_ms)
            .arg(limits.idle_ms)
            .arg(self.deadline())
            .arg(u8::from(absence == Absence::Judge));
        invocation
    }

    fn invocation_of_stats(&self, room: &str, limits: &Limits, now: u64) -> ScriptInvocation<'_> {
        self.invocation(&self.scripts.stats, room, limits, now, Absence::Excuse)
    }

    /// Run a line script (`call` names it and adds its own arguments); when the line is lost,
    /// restore it from what this instance knows and run the script again.
    async fn run<T: FromRedisValue>(
        &self,
        operation: &'static str,
        room: &str,
        limits: &Limits,
        now: u64,
        call: impl Fn(&Self) -> ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        match self.invoke(operation, call(self)).await {
            Err(StoreError::Lost) => {
                self.restore(room, limits, now).await?;
                self.invoke(operation, call(self)).await
            }
            result => result,
        }
    }

    /// Run one script, timed (metrics, a span).
    async fn invoke<T: FromRedisValue>(
        &self,
        operation: &'static str,
        invocation: ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let span = tracing::debug_span!("store", operation);
        let result = self.bounded(invocation.invoke_async(&mut self.connection.clone()).instrument(span)).await;
        self.observe(operation, started, result.as_ref().err());
        result
    }

    /// A call, bounded even while a connection is being made (Redis down): it fails, and the
    /// line pauses, rather than waits.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.connect_timeout + self.response_timeout, call).await {
            Ok(result) => result.map_err(classify),
            Err(_) => Err(StoreError::Unavailable("redis: no answer in time".into())),
        }
    }

    /// Note a call's time and outcome: its histogram, its error's kind, and whether Redis
    /// answered (any reply, even an error of a script, is an answer; a timeout is not).
    fn observe(&self, operation: &'static str, started: std::time::Instant, error: Option<&StoreError>) {
        let unavailable = matches!(error, Some(StoreError::Unavailable(_)));
        if !unavailable {
            self.answered_at.fetch_max(self.clock.now_ms(), Ordering::Relaxed);
        }
        if let Some(metrics) = &self.metrics {
            let kind = match error {
                Some(StoreError::Unavailable(_)) => Some("unavailable"),
                Some(StoreError::Failed(_)) => Some("failed"),
                _ => None,
            };
            metrics.store_call(operation, started.elapsed(), kind);
        }
    }

    /// Whether Redis answered a call of this instance in the last `within`.
    pub fn answered_within(&self, within: Duration) -> bool {
        let at = self.answered_at.load(Ordering::Relaxed);
        at != 0 && at + within.as_millis() as u64 >= self.clock.now_ms()
    }

    /// Report this instance's calls to `metrics`.
    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = Some(metrics);
    }

    /// Ask Redis whether it answers (a readiness probe while nothing else calls it).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let result = self.bounded(redis::cmd("PING").query_async::<String>(&mut self.connection.clone())).await;
        self.observe("ping", started, result.as_ref().err());
        result.map(drop)
    }

    /// Create the line of `room`, or rebuild a lost one from what this instance knew.
    async fn restore(&self, room: &str, limits: &Limits, now: u64) -> Result<(), StoreError> {
        let known = self.knowledge(room);
        let mut invocation = self.invocation(&self.scripts.restore, room, limits, now, Absence::Excuse);
        invocation
            .arg(known.epoch)
            .arg(known.last)
            .arg(known.cursor)
            .arg(known.sessions)
            .arg(known.grants)
            .arg(known.line);
        let (overrides, version) = known.overrides.clone().unwrap_or_else(|| ("{}".into(), 0));
        invocation.arg(overrides).arg(version);
        match known.prequeue {
            Some((event, last)) => invocation.arg(event).arg(last),
            None => invocation.arg("").arg(0),
        };
        let seated = known.seated.map(|s| {
            format!("{} {} {} {} {} {}", s.event, s.base, s.count, s.at, shuffle::hex(&s.seed), u8::from(s.shuffled))
        });
        invocation.arg(seated.unwrap_or_default());
        let epoch: u64 = self.invoke("restore", invocation).await?;
        if known.last > 0 && epoch != known.epoch {
            tracing::warn!(
                room = %room,
                last = known.last,
                cursor = known.cursor,
                sessions = known.sessions,
                grants = known.grants,
                "the line was lost by the store; restored it from what this instance knew"
            );
        }
        self.learn(room, |k| k.epoch = epoch);
        Ok(())
    }

    /// Where the store is, for the log: `host:port` of each node given, never a password.
    pub fn address(&self) -> String {
        let nodes: Vec<String> =
            self.subscribe_to.iter().map(|client| client.get_connection_info().addr().to_string()).collect();
        nodes.join(",")
    }

    fn knowledge(&self, room: &str) -> Knowledge {
        self.known.lock().map(|known| known.get(room).cloned().unwrap_or_default()).unwrap_or_default()
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
        let mut stats = report.stats(now);
        let known = self.knowledge(room);
        if known.epoch != 0 && stats.epoch != known.epoch {
            self.restore(room, limits, now).await?;
            let report: Report =
                self.run("stats", room, limits, now, |store| store.invocation_of_stats(room, limits, now)).await?;
            stats = report.stats(now);
        }
        self.learn(room, |k| {
            k.epoch = stats.epoch;
            k.last = k.last.max(stats.last_ticket);
            k.cursor = k.cursor.max(stats.cursor);
            k.sessions = u64::from(stats.active);
            k.grants = u64::from(stats.outstanding);
            if stats.line != 0 {
                k.line = stats.line;
            }
            // Every read learns the pre-queue's count: no instance is the only one to know it.
            if stats.prequeue_event != 0 {
                k.learn_prequeue(stats.prequeue_event, stats.prequeued);
            }
        });
        Ok(stats)
    }

    /// Take a pre-queue number for `event` (`number` 0), or present one (see
    /// [`Line::prequeue`](crate::line::Line::prequeue)).
    pub async fn prequeue(
        &self,
        room: &str,
        limits: &Limits,
        event: u64,
        number: u64,
        now: u64,
        proof: Option<u128>,
    ) -> Result<Prequeued, StoreError> {
        type Reply = (u8, u64, u64, u64, u64, String, u64, u8);
        let proof = proof.map(|id| format!("{id:032x}")).unwrap_or_default();
        let (kind, number, base, count, at, seed, line, shuffled): Reply = self
            .run("prequeue", room, limits, now, |store| {
                let mut invocation = store.invocation(&store.scripts.prequeue, room, limits, now, Absence::Excuse);
                invocation.arg(event).arg(number).arg(limits.max_waiting).arg(&proof);
                invocation
            })
            .await?;
        let prequeued = match kind {
            0 => Prequeued::Number(number),
            2 => Prequeued::Full,
            _ => Prequeued::Seated(seated_of(event, base, count, at, &seed, shuffled)?),
        };
        self.learn(room, |k| {
            if line != 0 {
                k.line = line;
            }
            match prequeued {
                Prequeued::Number(number) => k.learn_prequeue(event, number),
                Prequeued::Seated(seated) => k.learn_seated(seated),
                Prequeued::Full => {}
            }
        });
        Ok(prequeued)
    }

    /// Start `event` once: its pre-queue takes its places (see
    /// [`Line::seat`](crate::line::Line::seat)); the seating made first, with its seed.
    pub async fn seat(
        &self,
        room: &str,
        limits: &Limits,
        event: u64,
        draw: (&shuffle::Seed, bool),
        now: u64,
    ) -> Result<Seated, StoreError> {
        let seed = shuffle::hex(draw.0);
        let (base, count, at, seed, line, shuffled): (u64, u64, u64, String, u64, u8) = self
            .run("seat", room, limits, now, |store| {
                let mut invocation = store.invocation(&store.scripts.seat, room, limits, now, Absence::Excuse);
                invocation.arg(event).arg(&seed).arg(u8::from(draw.1));
                invocation
            })
            .await?;
        let seated = seated_of(event, base, count, at, &seed, shuffled)?;
        self.learn(room, |k| {
            if line != 0 {
                k.line = line;
            }
            k.learn_seated(seated);
        });
        Ok(seated)
    }

    pub async fn join(
        &self,
        room: &str,
        limits: &Limits,
        admit_now: bool,
        now: u64,
        proof: Option<u128>,
    ) -> Result<Joined, StoreError> {
        let proof = proof.map(|id| format!("{id:032x}")).unwrap_or_default();
        let (admitted, ticket, expires_at, line): (u8, u64, u64, u64) = self
            .run("join", room, limits, now, |store| {
                let mut invocation = store.invocation(&store.scripts.join, room, limits, now, Absence::Excuse);
                invocation.arg(u8::from(admit_now)).arg(&store.instance).arg(&proof).arg(limits.max_waiting);
                invocation
            })
            .await?;
        self.learn(room, |k| {
            k.last = k.last.max(ticket);
            if line != 0 {
                k.line = line;
            }
        });
        Ok(match admitted {
            1 => Joined::Admitted { ticket, expires_at },
            2 => Joined::Full,
            _ => Joined::Waiting { ticket },
        })
    }

    /// A scheduler step; or with `batch`, an operator's batch of that many turns granted
    /// outside the budget.
    pub async fn advance(
        &self,
        room: &str,
        limits: &Limits,
        now: u64,
        absence: Absence,
        batch: Option<u32>,
    ) -> Result<Advanced, StoreError> {
        let operation = if batch.is_some() { "admit" } else { "advance" };
        let reply: Vec<i64> = self
            .run(operation, room, limits, now, |store| {
                let mut invocation = store.invocation(&store.scripts.advance, room, limits, now, absence);
                invocation.arg(cursor_channel(room)).arg(revocations_channel(room));
                match batch {
                    // An operator's batch, from any instance, leaves the leader's rate as it is.
                    Some(count) => invocation.arg("").arg(count.max(1)),
                    None => invocation.arg(limits.adaptive_per_minute),
                };
                invocation
            })
            .await?;
        let malformed = || StoreError::Failed("unexpected redis reply to advance".into());
        let (head, ended) = reply.split_at_checked(1 + Report::LEN).ok_or_else(malformed)?;
        let granted = u32::try_from(head[0]).map_err(|_| malformed())?;
        let report =
            Report::of(&head[1..]).map_err(|problem| StoreError::Failed(format!("redis: advance: {problem}")))?;
        let ended = ended.chunks_exact(2).map(|pair| (pair[0] as u64, pair[1] as u64)).collect();
        let stats = self.reported(room, limits, now, report).await?;
        Ok(Advanced { granted, ended, stats })
    }

    pub async fn redeem(
        &self,
        room: &str,
        limits: &Limits,
        ticket: u64,
        now: u64,
        absence: Absence,
    ) -> Result<Redeemed, StoreError> {
        let (kind, value): (u8, redis::Value) = self
            .run("redeem", room, limits, now, |store| {
                let mut invocation = store.invocation(&store.scripts.redeem, room, limits, now, absence);
                invocation.arg(ticket).arg(&store.instance);
                invocation
            })
            .await?;
        let reply = |error: redis::ParsingError| StoreError::Failed(format!("unexpected redis reply: {error}"));
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
            3 => Redeemed::Pending,
            _ => Redeemed::Gone(match redis::from_redis_value::<String>(value).map_err(reply)?.as_str() {
                "lapsed" => Gone::Lapsed,
                "left" => Gone::Left,
                "unknown" => Gone::Unknown,
                _ => Gone::Used,
            }),
        })
    }

    /// End a session: free its place, announce it to every instance, keep it for those that
    /// miss the announcement (until `expires_at`, when its token would have expired).
    pub async fn release(
        &self,
        room: &str,
        limits: &Limits,
        ticket: u64,
        expires_at: u64,
        now: u64,
    ) -> Result<bool, StoreError> {
        let ended: u8 = self
            .run("release", room, limits, now, |store| {
                let mut invocation = store.invocation(&store.scripts.release, room, limits, now, Absence::Excuse);
                invocation.arg(ticket).arg(revocations_channel(room)).arg(expires_at);
                invocation
            })
            .await?;
        Ok(ended == 1)
    }

    /// Read (`change` None) or change a room's live overrides (JSON): `clear` drops them all,
    /// otherwise `change` is merged in; every instance is told of a change. What is in force
    /// after, with its version; this instance remembers it, to put it back should Redis lose it.
    pub async fn settings(
        &self,
        room: &str,
        limits: &Limits,
        change: Option<&str>,
        clear: bool,
        now: u64,
    ) -> Result<(String, u64), StoreError> {
        let mode = match (change, clear) {
            (_, true) => "clear",
            (Some(_), false) => "merge",
            (None, false) => "read",
        };
        let (version, overrides): (u64, String) = self
            .run("settings", room, limits, now, |store| {
                let mut invocation = store.invocation(&store.scripts.settings, room, limits, now, Absence::Excuse);
                invocation.arg(mode).arg(change.unwrap_or("{}")).arg(settings_channel(room));
                invocation
            })
            .await?;
        self.learn(room, |k| {
            if k.overrides.as_ref().is_none_or(|(_, known)| *known <= version) {
                k.overrides = Some((overrides.clone(), version));
            }
        });
        Ok((overrides, version))
    }

    /// This instance's call opening `ticket`'s session failed: if it ran, its answer was lost,
    /// and the ticket's holder may take the session again.
    pub async fn unanswered(&self, room: &str, limits: &Limits, ticket: u64, now: u64) -> Result<(), StoreError> {
        self.run::<u8>("unanswered", room, limits, now, |store| {
            let mut invocation = store.invocation(&store.scripts.unanswered, room, limits, now, Absence::Excuse);
            invocation.arg(ticket).arg(&store.instance);
            invocation
        })
        .await?;
        Ok(())
    }

    pub async fn leave(&self, room: &str, limits: &Limits, ticket: u64, now: u64) -> Result<(), StoreError> {
        self.run::<u8>("leave", room, limits, now, |store| {
            let mut invocation = store.invocation(&store.scripts.leave, room, limits, now, Absence::Excuse);
            invocation.arg(ticket);
            invocation
        })
        .await?;
        Ok(())
    }

    pub async fn touch(
        &self,
        room: &str,
        limits: &Limits,
        waiters: &[u64],
        sessions: &[(u64, u64)],
        now: u64,
    ) -> Result<(), StoreError> {
        self.run::<u64>("touch", room, limits, now, |store| {
            let mut invocation = store.invocation(&store.scripts.touch, room, limits, now, Absence::Excuse);
            invocation.arg(waiters.len()).arg(waiters);
            for (ticket, expires_at) in sessions {
                invocation.arg(*ticket).arg(*expires_at);
            }
            invocation
        })
        .await?;
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
        let renewed: u8 = self
            .run("renew", room, limits, now, |store| {
                let mut invocation = store.invocation(&store.scripts.renew, room, limits, now, Absence::Excuse);
                invocation.arg(ticket).arg(until);
                invocation
            })
            .await?;
        Ok(renewed == 1)
    }

    /// Put this instance's reading of the upstream's health for `room` where the leader reads
    /// it (one field per instance; the hash lasts a minute past the last reading).
    pub async fn report_health(&self, room: &str, reading: &str) -> Result<(), StoreError> {
        let key = health_key(room);
        let mut pipe = redis::pipe();
        pipe.hset(&key, &self.instance, reading).ignore().pexpire(&key, HEALTH_KEPT_MS).ignore();
        let started = std::time::Instant::now();
        let result = self.bounded(pipe.query_async::<()>(&mut self.connection.clone())).await;
        self.observe("health", started, result.as_ref().err());
        result
    }

    /// Every instance's last reading of the upstream's health for `room`.
    pub async fn read_health(&self, room: &str) -> Result<Vec<(String, String)>, StoreError> {
        let started = std::time::Instant::now();
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("HGETALL");
        command.arg(health_key(room));
        let result = self.bounded(command.query_async(&mut connection)).await;
        self.observe("health", started, result.as_ref().err());
        result
    }

    /// Remove the readings of these instances (gone: their readings went stale).
    pub async fn forget_health(&self, room: &str, instances: &[String]) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("HDEL");
        command.arg(health_key(room)).arg(instances);
        let started = std::time::Instant::now();
        let result = self.bounded(command.query_async::<()>(&mut connection)).await;
        self.observe("health", started, result.as_ref().err());
        result
    }

    fn lease_keys(room: &str) -> [String; 2] {
        [format!("vestibule:{{{room}}}:leader"), format!("vestibule:{{{room}}}:instances")]
    }

    /// Take or keep the room's scheduler lease for `lease`. This also says, for as long, that
    /// the instance is alive.
    pub async fn hold_lease(&self, room: &str, lease: Duration) -> Result<Lease, StoreError> {
        let [leader, instances] = Self::lease_keys(room);
        let mut invocation = self.scripts.lease.key(leader);
        invocation.key(instances).arg(&self.instance).arg(lease.as_millis() as u64);
        let (held, left): (u8, i64) = self.invoke("lease", invocation).await?;
        Ok(if held == 1 { Lease::Held } else { Lease::Other(Duration::from_millis(left.max(0) as u64)) })
    }

    /// Give the lease up (a graceful stop), so that another instance takes over at once.
    pub async fn drop_lease(&self, room: &str) -> Result<(), StoreError> {
        let [leader, instances] = Self::lease_keys(room);
        let mut invocation = self.scripts.unlease.key(leader);
        invocation.key(instances).arg(&self.instance);
        if self.invoke::<u8>("unlease", invocation).await? == 1 {
            self.publish(&lease_channel(room), "free").await?;
        }
        Ok(())
    }

    pub async fn stats(&self, room: &str, limits: &Limits, now: u64) -> Result<Stats, StoreError> {
        let report: Report =
            self.run("stats", room, limits, now, |store| store.invocation_of_stats(room, limits, now)).await?;
        self.reported(room, limits, now, report).await
    }
}
