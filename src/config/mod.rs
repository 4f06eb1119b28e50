//! `proxy.toml`: serde types with a doc comment on every field, defaults, and a `validate()`
//! that rejects nonsense at load time with an error naming the file and the key.
//!
//! The shipped `proxy.toml` documents every key for operators; keep the two in step.

mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use crate::path::canonicalize;

/// A configuration error: which file, which key (`rooms[0].admit_per_minute`), what is wrong.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl ConfigError {
    /// `key: message`, without the file (for a caller that names it).
    pub fn key_and_message(&self) -> String {
        if self.key.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.key, self.message)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.message)
        }
    }
}

/// The secret in environment variable `var` (`what` it is, for the error), checked.
fn from_env(var: &str, what: &str, check: fn(&str) -> Result<(), String>) -> Result<String, String> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => {
            check(&value).map_err(|problem| format!("the value of {var} is {problem}"))?;
            Ok(value)
        }
        _ => Err(format!("environment variable {var} is not set: set it to {what}")),
    }
}

/// An admin token's own checks: long enough, not the shipped example.
fn check_admin_token(token: &str) -> Result<(), String> {
    if token.len() < 12 {
        return Err("too short: use at least 12 characters".to_owned());
    }
    if EXAMPLE_ADMIN_TOKENS.contains(&token) {
        return Err("the example token of the shipped proxy.toml, which anyone can read: \
                    set a secret of your own (head -c 24 /dev/urandom | base64)"
            .to_owned());
    }
    Ok(())
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The public listener.
    pub server: ServerConfig,
    /// The admin listener; absent means no admin API.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// The protected upstream.
    pub upstream: UpstreamConfig,
    /// Where the line is kept.
    #[serde(default)]
    pub store: StoreConfig,
    /// Admission token keys and claims.
    pub tokens: TokensConfig,
    /// The rooms: which paths are guarded and how fast they admit.
    #[serde(default)]
    pub rooms: Vec<RoomConfig>,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The file it was read from (reloads read it again); none when parsed from text.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the public listener.
    pub listen: SocketAddr,
    /// Runtime worker threads; default one per core.
    #[serde(default)]
    pub workers: Option<NonZeroUsize>,
    /// Serve HTTPS (HTTP/1.1 and HTTP/2 by ALPN) with this certificate chain and key.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Also serve HTTP/2 in cleartext (h2c, by prior knowledge) on a listener without TLS.
    #[serde(default)]
    pub h2c: bool,
    /// Serve bodiless HTTP/1.1 requests the gate forwards on the fast lane (`crate::lane`);
    /// `false` serves every request with hyper.
    #[serde(default = "defaults::yes")]
    pub fast_lane: bool,
    /// Peers whose `X-Forwarded-*` / `Forwarded` headers are trusted and extended; from
    /// anyone else those headers are dropped and replaced by ours.
    /// Each an address (`10.0.0.7`) or a range (`10.0.0.0/8`).
    #[serde(default, deserialize_with = "de_networks")]
    pub trusted_proxies: Vec<IpNet>,
    /// Most client connections open at once; further clients wait in the accept queue.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: NonZeroUsize,
    /// Whether the file set `max_connections` or `max_feed_sockets`: if not, `run` sizes their
    /// defaults to the open-file limit rather than warn that they exceed it.
    #[serde(skip)]
    pub capacity_given: bool,
    /// Time allowed for a client to send a complete request head (also the keep-alive idle
    /// limit between requests).
    #[serde(default = "defaults::header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest pause allowed between two pieces of a request body.
    #[serde(default = "defaults::body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Largest request head in bytes; beyond it the answer is 431.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most header fields in a request; beyond it the answer is 431.
    #[serde(default = "defaults::max_headers")]
    pub max_headers: usize,
    /// Largest request body in bytes forwarded upstream; 0 means no limit.
    #[serde(default)]
    pub max_body_bytes: u64,
    /// On SIGTERM / Ctrl-C, how long in-flight requests may take to finish.
    #[serde(default = "defaults::shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Time allowed for a TLS handshake.
    #[serde(default = "defaults::tls_handshake_timeout", with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Most waiting-page feed sockets open at once.
    #[serde(default = "defaults::max_feed_sockets")]
    pub max_feed_sockets: usize,
    /// Most feed sockets open at once from one client address.
    #[serde(default = "defaults::max_feed_sockets_per_address")]
    pub max_feed_sockets_per_address: usize,
    /// Most connections open at once from one client address (an IPv6 client by its /64),
    /// as nginx's `limit_conn`; beyond it a new connection gets 503 and is closed. Connections
    /// from a trusted proxy are counted by the client each request names, while it is served.
    #[serde(default = "defaults::max_connections_per_address")]
    pub max_connections_per_address: NonZeroUsize,
    /// A write to a client that makes no progress for this long closes the connection (a
    /// client that does not read cannot hold one), as nginx's `send_timeout`.
    #[serde(default = "defaults::send_timeout", with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Whether cookies carry `Secure`: `"auto"` when this request came over TLS (here, or by
    /// a trusted proxy's `X-Forwarded-Proto: https`), or always (`true`), or never (`false`).
    #[serde(default)]
    pub cookie_secure: CookieSecure,
}

/// When cookies carry `Secure` (`server.cookie_secure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CookieSecure {
    /// When the request came over TLS, here or to a trusted proxy in front.
    #[default]
    Auto,
    Always,
    Never,
}

impl<'de> Deserialize<'de> for CookieSecure {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<CookieSecure, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Flag(bool),
            Word(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Flag(true) => Ok(CookieSecure::Always),
            Written::Flag(false) => Ok(CookieSecure::Never),
            Written::Word(word) if word == "auto" => Ok(CookieSecure::Auto),
            Written::Word(word) => Err(serde::de::Error::custom(format!("{word:?}: expected \"auto\", true or false"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener; keep it private.
    pub listen: SocketAddr,
    /// Bearer token for state-changing calls.
    #[serde(default)]
    pub token: Option<String>,
    /// Name of an environment variable that holds the bearer token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Host names the admin listener answers besides IP literals and `localhost` (421
    /// otherwise), so that a page in a browser cannot reach it by DNS rebinding.
    #[serde(default)]
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The protected upstream, `http://host:port`; request paths are appended to it.
    #[serde(deserialize_with = "de_from_str")]
    pub url: http::Uri,
    /// Time allowed to open a connection to the upstream (502 beyond it).
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for the upstream to start its response (504 beyond it).
    #[serde(default = "defaults::response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Longest pause allowed between two pieces of a response body.
    #[serde(default = "defaults::response_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Idle keep-alive connections kept to the upstream.
    #[serde(default = "defaults::pool_max_idle")]
    pub pool_max_idle: usize,
    /// How long an idle upstream connection is kept.
    #[serde(default = "defaults::pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Send the client's `Host` upstream (true) or the upstream's own authority (false).
    #[serde(default = "defaults::yes")]
    pub preserve_host: bool,
    /// An upgraded connection (a websocket to the upstream) with no byte either way for this
    /// long is closed.
    #[serde(default = "defaults::tunnel_idle_timeout", with = "humantime_serde")]
    pub tunnel_idle_timeout: Duration,
    /// Name servers asked for the upstream's host name; empty means the system's.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// In this process: one instance only.
    #[default]
    Memory,
    /// One Redis server.
    Redis,
    /// A Redis Cluster.
    RedisCluster,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `memory`, `redis` or `redis-cluster`.
    #[serde(default)]
    pub kind: StoreKind,
    /// Redis URL, for `kind = "redis"`.
    #[serde(default)]
    pub url: Option<String>,
    /// Cluster node URLs, for `kind = "redis-cluster"`.
    #[serde(default)]
    pub urls: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    /// The key that signs new tokens (PEM: Ed25519, P-256 or RSA; or a file of at least 32
    /// bytes of secret for HS256). Relative paths are read from the config file's folder.
    pub signing_key: PathBuf,
    /// Further keys still accepted for verification (during a rotation).
    #[serde(default)]
    pub verify_keys: Vec<PathBuf>,
    /// The `iss` claim minted and required.
    #[serde(default = "defaults::issuer")]
    pub issuer: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds (at most 30).
    #[serde(default = "defaults::leeway_seconds")]
    pub leeway_seconds: u64,
    /// Verified tokens remembered so that the admitted path checks no signature per request.
    #[serde(default = "defaults::cache_entries")]
    pub cache_entries: NonZeroUsize,
    /// Sign tickets with HMAC under a secret derived from the private key (fast; every
    /// instance since this option checks them). `false` signs them with the key itself, as
    /// earlier versions do and can check: for a rolling upgrade from one.
    #[serde(default = "defaults::yes")]
    pub hmac_tickets: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomConfig {
    /// Room id: lower-case letters, digits, `-` and `_`; used in cookie names and token `aud`.
    pub id: String,
    /// Path prefixes the room guards, matched on the canonical path.
    pub paths: Vec<String>,
    /// Visitors admitted per minute while people wait.
    pub admit_per_minute: NonZeroU32,
    /// Sessions active plus grants outstanding, at most.
    pub max_active: NonZeroU32,
    /// Lifetime of a session (and of its admission token), in seconds.
    #[serde(default = "defaults::session_seconds")]
    pub session_seconds: u64,
    /// Match `paths` case-sensitively (default: case-insensitively).
    #[serde(default)]
    pub case_sensitive: bool,
    /// How long a granted turn waits to be redeemed before it lapses, in seconds.
    #[serde(default = "defaults::grant_seconds")]
    pub grant_seconds: u64,
    /// A waiter not seen for this long (no feed, no page or status request) leaves the line.
    #[serde(default = "defaults::abandon_seconds")]
    pub abandon_seconds: u64,
    /// A session not used for this long (no admitted request) ends and frees its place.
    #[serde(default = "defaults::session_idle_seconds")]
    pub session_idle_seconds: u64,
    /// Bot friction: `"pow"` asks a visitor's browser (or API client) for a proof of work
    /// before it joins; `"none"` (the default) asks nothing.
    #[serde(default)]
    pub challenge: ChallengeKind,
    /// The proof of work's difficulty, in leading zero bits of SHA-256 (each bit doubles the
    /// work).
    #[serde(default = "defaults::challenge_difficulty")]
    pub challenge_difficulty: u8,
    /// Joins (new tickets) per client address per minute; beyond it, 429 and no ticket.
    #[serde(default = "defaults::joins_per_address_per_minute")]
    pub joins_per_address_per_minute: NonZeroU32,
    /// `open`, `paused` (everyone holds their place), `closed` (newcomers turned away), or
    /// `passthrough` (the gate is off).
    #[serde(default)]
    pub state: RoomState,
    /// A message shown on the waiting page and sent to the feed.
    #[serde(default)]
    pub message: Option<String>,
    /// The status of the waiting page: 200 (the default), 202, 429 or 503. API clients get
    /// 503 and the status JSON whatever this says.
    #[serde(default = "defaults::queued_status")]
    pub queued_status: u16,
    /// Who passes without a token and without counting against the room.
    #[serde(default)]
    pub bypass: Option<BypassConfig>,
    /// Most people waiting at once (leavers not counted): beyond it a newcomer gets the "line
    /// full" answer (503 with `Retry-After`) and no ticket. Unlimited when unset.
    #[serde(default)]
    pub max_waiting: Option<std::num::NonZeroU64>,
    /// The room's own waiting page: a minijinja template (docs/waiting-page.md),
    /// relative to this file's folder. The bundled page when unset.
    #[serde(default)]
    pub template: Option<PathBuf>,
    /// The template compiled (and checked) when the configuration was read.
    #[serde(skip)]
    pub page: Option<std::sync::Arc<crate::room::page::WaitingPage>>,
    /// The page's language whatever the visitor's browser asks for (a bundled one); the
    /// visitor's `Accept-Language` decides when unset.
    #[serde(default)]
    pub lang: Option<String>,
    /// The operator's own words over the bundled ones, by language then key
    /// (`strings = { fr = { title_full = "Complet" } }`).
    #[serde(default)]
    pub strings: std::collections::HashMap<String, std::collections::HashMap<String, String>>,
    /// The site's name, at the end of the waiting page's tab title ("(12) In line - Shop").
    #[serde(default)]
    pub site_name: Option<String>,
    /// The room's title on its waiting page ("Spring sale").
    #[serde(default)]
    pub title: Option<String>,
    /// Admission that listens to the upstream (`[rooms.adaptive]`): off when unset.
    #[serde(default)]
    pub adaptive: Option<AdaptiveConfig>,
    /// Scheduled sales (`[[rooms.events]]`), in order of their start.
    #[serde(default)]
    pub events: Vec<EventConfig>,
}

/// `[[rooms.events]]`: a scheduled sale. From `prequeue_at` visitors take a pre-queue number
/// and see a countdown; at `starts_at` every pre-queue number is given its place in one
/// random order (see [`crate::wire::shuffle`]), and later arrivals line up behind. The
/// overrides are in force from `prequeue_at` until `ends_at` (or the next event's pre-queue).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventConfig {
    /// Its name, shown to visitors and in the published seed.
    pub name: String,
    /// When the pre-queue opens (a TOML date-time with its offset), in unix ms.
    #[serde(deserialize_with = "moment")]
    pub prequeue_at: u64,
    /// When the sale starts: the pre-queue is drawn and admission begins (unix ms).
    #[serde(deserialize_with = "moment")]
    pub starts_at: u64,
    /// When its overrides end (unix ms); the next event's pre-queue, or never, when unset.
    #[serde(default, deserialize_with = "some_moment")]
    pub ends_at: Option<u64>,
    /// Draw the pre-queue's order at the start (the default), or keep the order of arrival.
    #[serde(default = "defaults::yes")]
    pub shuffle: bool,
    #[serde(default)]
    pub admit_per_minute: Option<NonZeroU32>,
    #[serde(default)]
    pub max_active: Option<NonZeroU32>,
    #[serde(default)]
    pub message: Option<String>,
    /// The event's own waiting page (as a room's `template`).
    #[serde(default)]
    pub template: Option<PathBuf>,
    /// The template compiled (and checked) when the configuration was read.
    #[serde(skip)]
    pub page: Option<std::sync::Arc<crate::room::page::WaitingPage>>,
}

impl EventConfig {
    /// The event's id in the store and in pre-queue tickets: from its name only, so that a
    /// sale postponed by a reload keeps its pre-queue. 62 bits (a signed integer in every
    /// store reply), never 0.
    pub fn id(&self) -> u64 {
        let digest = ring::digest::digest(&ring::digest::SHA256, format!("vestibule event\0{}", self.name).as_bytes());
        let bytes: [u8; 8] = digest.as_ref()[..8].try_into().expect("SHA-256 has 32 bytes");
        (u64::from_be_bytes(bytes) >> 2).max(1)
    }
}

/// A TOML offset date-time (`2026-12-24T10:00:00Z`, `2026-12-24T11:00:00+01:00`) as unix ms.
fn moment<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let datetime = toml::value::Datetime::deserialize(deserializer)?;
    unix_ms(&datetime).map_err(serde::de::Error::custom)
}

fn some_moment<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    moment(deserializer).map(Some)
}

/// Unix ms of a TOML date-time that has a date, a time and an offset. By hand: the date's
/// day number is the one line of calendar arithmetic needed (days from 1970-01-01 in the
/// proleptic Gregorian calendar, after Howard Hinnant's `days_from_civil`), not worth a
/// date crate.
fn unix_ms(datetime: &toml::value::Datetime) -> Result<u64, String> {
    use toml::value::Offset;
    let (Some(date), Some(time), Some(offset)) = (datetime.date, datetime.time, datetime.offset) else {
        return Err(format!("{datetime}: give a date, a time and an offset (2026-12-24T10:00:00Z)"));
    };
    let (year, month, day) = (i64::from(date.year), i64::from(date.month), i64::from(date.day));
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let offset_minutes = match offset {
        Offset::Z => 0,
        Offset::Custom { minutes } => i64::from(minutes),
    };
    let seconds = days * 86_400
        + i64::from(time.hour) * 3_600
        + i64::from(time.minute) * 60
        + i64::from(time.second.unwrap_or(0))
        - offset_minutes * 60;
    let ms = seconds * 1_000 + i64::from(time.nanosecond.unwrap_or(0) / 1_000_000);
    u64::try_from(ms).map_err(|_| format!("{datetime}: before 1970"))
}

/// `[rooms.adaptive]`: targets for the upstream's health; the rate steps down by `decrease`
/// when a window misses one, and climbs back by `increase_per_minute` when it meets both,
/// between `min_per_minute` and `admit_per_minute` (see [`crate::room::adaptive`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConfig {
    /// Target for the p95 latency of the upstream's answers (to the response head), in ms.
    pub p95_ms: u64,
    /// Target for the share of forwarded requests that fail (5xx, or no answer).
    #[serde(default = "defaults::adaptive_error_ratio")]
    pub error_ratio: f64,
    /// How long each window is: the leader judges one and steps the rate this often.
    #[serde(default = "defaults::adaptive_window_seconds")]
    pub window_seconds: u64,
    /// The factor the rate is multiplied by when a window misses a target.
    #[serde(default = "defaults::adaptive_decrease")]
    pub decrease: f64,
    /// Added to the rate (per minute) after each window that meets both targets; a tenth
    /// of `admit_per_minute` when unset.
    #[serde(default)]
    pub increase_per_minute: Option<NonZeroU32>,
    /// The rate never steps below this; a tenth of `admit_per_minute` when unset.
    #[serde(default)]
    pub min_per_minute: Option<NonZeroU32>,
    /// A window with fewer requests (from every instance) says nothing: the rate holds.
    #[serde(default = "defaults::adaptive_min_requests")]
    pub min_requests: u64,
}

impl AdaptiveConfig {
    pub fn min_per_minute(&self, ceiling: u32) -> u32 {
        self.min_per_minute.map_or((ceiling / 10).max(1), NonZeroU32::get)
    }

    pub fn increase_per_minute(&self, ceiling: u32) -> u32 {
        self.increase_per_minute.map_or((ceiling / 10).max(1), NonZeroU32::get)
    }

    pub fn window_ms(&self) -> u64 {
        self.window_seconds * 1_000
    }
}

/// `[rooms.bypass]`: synthetic monitors and staff pass the room without a token, without a
/// ticket and without counting against the room (counted as `bypassed` in the metrics).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BypassConfig {
    /// Client addresses or ranges (as `server.trusted_proxies` decides the client's address).
    #[serde(default, deserialize_with = "de_networks")]
    pub addresses: Vec<IpNet>,
    /// A request whose `Vestibule-Bypass` header is this secret passes (the header never
    /// reaches the upstream).
    #[serde(default)]
    pub secret: Option<String>,
    /// The secret from this environment variable instead.
    #[serde(default)]
    pub secret_env: Option<String>,
}

impl std::fmt::Debug for BypassConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never appear in logs (docs/design.md, security rules).
        f.debug_struct("BypassConfig")
            .field("addresses", &self.addresses)
            .field("secret", &self.secret.as_ref().map(|_| "<secret>"))
            .field("secret_env", &self.secret_env)
            .finish()
    }
}

/// What a room asks of a visitor before they join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChallengeKind {
    #[default]
    None,
    /// A proof of work (see [`crate::challenge`]).
    Pow,
}

/// What a room does with visitors (a line setting, kept in `line`).
pub use crate::line::RoomState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `vestibule=debug`; `RUST_LOG` overrides it.
    #[serde(default = "defaults::log_level")]
    pub level: String,
    /// One line per request (method, canonical path, room, outcome, status, duration,
    /// client address), at `info` with the target `vestibule::access`.
    #[serde(default)]
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: defaults::log_level(), access: false }
    }
}

mod defaults {
    use std::num::NonZeroUsize;
    use std::time::Duration;

    pub fn max_connections() -> NonZeroUsize {
        NonZeroUsize::new(10_000).expect("non-zero")
    }
    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn body_read_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_header_bytes() -> usize {
        16 * 1024
    }
    pub fn max_headers() -> usize {
        100
    }
    pub fn shutdown_grace() -> Duration {
        Duration::from_secs(30)
    }
    pub fn tls_handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_feed_sockets() -> usize {
        50_000
    }
    pub fn max_feed_sockets_per_address() -> usize {
        64
    }
    pub fn max_connections_per_address() -> NonZeroUsize {
        NonZeroUsize::new(256).expect("non-zero")
    }
    pub fn send_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(3)
    }
    pub fn response_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn pool_max_idle() -> usize {
        512
    }
    pub fn tunnel_idle_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn pool_idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn yes() -> bool {
        true
    }
    pub fn issuer() -> String {
        "vestibule".to_owned()
    }
    pub fn leeway_seconds() -> u64 {
        5
    }
    pub fn cache_entries() -> NonZeroUsize {
        NonZeroUsize::new(100_000).expect("non-zero")
    }
    pub fn session_seconds() -> u64 {
        600
    }
    pub fn grant_seconds() -> u64 {
        120
    }
    pub fn queued_status() -> u16 {
        200
    }
    pub fn adaptive_error_ratio() -> f64 {
        0.05
    }
    pub fn adaptive_window_seconds() -> u64 {
        5
    }
    pub fn adaptive_decrease() -> f64 {
        0.7
    }
    pub fn adaptive_min_requests() -> u64 {
        20
    }
    pub fn challenge_difficulty() -> u8 {
        crate::challenge::DEFAULT_DIFFICULTY
    }
    pub fn joins_per_address_per_minute() -> std::num::NonZeroU32 {
        std::num::NonZeroU32::new(60).expect("not zero")
    }
    pub fn session_idle_seconds() -> u64 {
        300
    }
    pub fn abandon_seconds() -> u64 {
        120
    }
    pub fn log_level() -> String {
        "info".to_owned()
    }
}

fn de_from_str<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// Addresses or CIDR ranges; a bare address is the range of that one address.
fn de_networks<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| serde::de::Error::custom(format!("{text:?} is neither an IP address nor a CIDR range")))
        })
        .collect()
}

/// Admin tokens that examples show (the shipped `proxy.toml`, the design): refused, since
/// anyone can read them.
pub const EXAMPLE_ADMIN_TOKENS: [&str; 2] = ["change-me-please", "change-me"];

/// hyper's HTTP/1 read buffer cannot be smaller than this.
const MIN_HEADER_BYTES: usize = 8 * 1024;

impl Config {
    /// Read, parse and validate a file; relative key and certificate paths are resolved
    /// against the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Config::parse(&text, &file, base)?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parse and validate TOML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let error = |key: String, message: String| ConfigError { file: file.to_owned(), key, message };
        let deserializer = toml::de::Deserializer::parse(text)
            .map_err(|e| error(String::new(), e.to_string().trim_end().to_owned()))?;
        let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            let inner = e.into_inner().message().trim_end().to_owned();
            error(key, inner)
        })?;
        let given = |key: &str| {
            let table = text.parse::<toml::Table>().ok();
            table.and_then(|t| t.get("server")?.as_table()?.get(key).cloned()).is_some()
        };
        config.server.capacity_given = given("max_connections") || given("max_feed_sockets");
        config.resolve_paths(base);
        config.validate().map_err(|(key, message)| error(key, message))?;
        config.load_pages().map_err(|(key, message)| error(key, message))?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.tokens.signing_key);
        self.tokens.verify_keys.iter_mut().for_each(resolve);
        self.rooms.iter_mut().filter_map(|room| room.template.as_mut()).for_each(resolve);
        self.rooms
            .iter_mut()
            .flat_map(|room| room.events.iter_mut())
            .filter_map(|event| event.template.as_mut())
            .for_each(resolve);
        if let Some(tls) = &mut self.server.tls {
            resolve(&mut tls.cert);
            resolve(&mut tls.key);
        }
    }

    /// Read and check every room's own waiting page.
    fn load_pages(&mut self) -> Result<(), (String, String)> {
        for (i, room) in self.rooms.iter_mut().enumerate() {
            if let Some(path) = &room.template {
                let page =
                    crate::room::page::WaitingPage::load(path).map_err(|e| (format!("rooms[{i}].template"), e))?;
                room.page = Some(std::sync::Arc::new(page));
            }
            for (j, event) in room.events.iter_mut().enumerate() {
                if let Some(path) = &event.template {
                    let page = crate::room::page::WaitingPage::load(path)
                        .map_err(|e| (format!("rooms[{i}].events[{j}].template"), e))?;
                    event.page = Some(std::sync::Arc::new(page));
                }
            }
        }
        Ok(())
    }

    /// Take the secrets named by `admin.token_env` and `rooms[i].bypass.secret_env` from the
    /// environment, each checked as one written in the file is. Only the commands that serve
    /// need them (`run`, a reload): `check`, `token` and `loadtest` do not.
    pub fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        let file = self.source.as_ref().map_or_else(|| "(configuration)".to_owned(), |p| p.display().to_string());
        let error = |key: String, message: String| ConfigError { file: file.clone(), key, message };
        if let Some(admin) = &mut self.admin {
            if let Some(var) = &admin.token_env {
                let token = from_env(var, "the admin token", check_admin_token)
                    .map_err(|message| error("admin.token_env".to_owned(), message))?;
                admin.token = Some(token);
            }
        }
        for (i, room) in self.rooms.iter_mut().enumerate() {
            let Some(bypass) = &mut room.bypass else { continue };
            if let Some(var) = &bypass.secret_env {
                let secret = from_env(var, "the bypass secret", validate::check_bypass_secret)
                    .map_err(|message| error(format!("rooms[{i}].bypass.secret_env"), message))?;
                bypass.secret = Some(secret);
            }
        }
        Ok(())
    }

    /// The environment variables the configuration names for secrets, by key.
    pub fn secret_variables(&self) -> Vec<(String, &str)> {
        let admin = self.admin.iter().filter_map(|admin| admin.token_env.as_deref());
        let admin = admin.map(|var| ("admin.token_env".to_owned(), var));
        let bypass = self.rooms.iter().enumerate().filter_map(|(i, room)| {
            let var = room.bypass.as_ref()?.secret_env.as_deref()?;
            Some((format!("rooms[{i}].bypass.secret_env"), var))
        });
        admin.chain(bypass).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [server]
        listen = "127.0.0.1:8080"
        [upstream]
        url = "http://127.0.0.1:3000"
        [tokens]
        signing_key = "key.pem"
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "proxy.toml", Path::new("/etc/vestibule"))
    }

    fn error_of(text: &str) -> String {
        parse(text).expect_err("config should be refused").to_string()
    }

    const ROOM_WITH_EVENTS: &str = r#"
        [[rooms]]
        id = "drop"
        paths = ["/drop"]
        admit_per_minute = 60
        max_active = 10
        [[rooms.events]]
        name = "First"
        prequeue_at = 2026-12-24T09:30:00Z
        starts_at = 2026-12-24T11:00:00+01:00
        ends_at = 2026-12-24T12:00:00.250Z
    "#;

    #[test]
    fn events_take_offset_date_times_as_unix_ms() {
        let config = parse(&format!("{MINIMAL}{ROOM_WITH_EVENTS}")).unwrap();
        let event = &config.rooms[0].events[0];
        // date -u -d 2026-12-24T09:30:00Z +%s
        assert_eq!(event.prequeue_at, 1_798_104_600_000);
        assert_eq!(event.starts_at, 1_798_106_400_000, "11:00 at +01:00 is 10:00 UTC");
        assert_eq!(event.ends_at, Some(1_798_113_600_250));
        assert!(event.shuffle, "drawn by default");
        let postponed = parse(&format!("{MINIMAL}{}", ROOM_WITH_EVENTS.replace("11:00:00+01:00", "11:30:00+01:00")));
        assert_eq!(postponed.unwrap().rooms[0].events[0].id(), event.id(), "the id follows the name, not the start");
        assert!(event.id() > 0 && event.id() < 1 << 62);
        let leap = toml::from_str::<toml::Table>("t = 2024-02-29T00:00:00Z").unwrap();
        assert_eq!(unix_ms(leap["t"].as_datetime().unwrap()), Ok(1_709_164_800_000));
    }

    #[test]
    fn events_are_refused_when_their_times_do_not_follow() {
        let base = format!("{MINIMAL}{ROOM_WITH_EVENTS}");
        let message =
            error_of(&base.replace("prequeue_at = 2026-12-24T09:30:00Z", "prequeue_at = 2026-12-24T09:30:00"));
        assert!(message.contains("offset"), "{message}");
        let message = error_of(&base.replace("09:30:00Z", "10:30:00Z"));
        assert!(
            message.contains("rooms[0].events[0].prequeue_at") && message.contains("before starts_at"),
            "{message}"
        );
        let message = error_of(&base.replace("12:00:00.250Z", "09:00:00Z"));
        assert!(message.contains("ends_at"), "{message}");
        let overlapping = format!(
            "{base}\n[[rooms.events]]\nname = \"Second\"\nprequeue_at = 2026-12-24T11:59:00Z\nstarts_at = 2026-12-24T13:00:00Z\n"
        );
        let message = error_of(&overlapping);
        assert!(message.contains("rooms[0].events[1].prequeue_at"), "{message}");
        let message = error_of(&overlapping.replace("11:59:00Z", "12:00:01Z").replace("\"Second\"", "\"First\""));
        assert!(message.contains("rooms[0].events[1].name"), "{message}");
        assert!(parse(&overlapping.replace("11:59:00Z", "12:00:01Z")).is_ok(), "after the first one's end");
    }

    #[test]
    fn minimal_config_gets_defaults_and_resolved_paths() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.server.max_headers, 100);
        assert_eq!(config.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.tokens.signing_key, Path::new("/etc/vestibule/key.pem"));
        assert_eq!(config.store.kind, StoreKind::Memory);
        assert!(config.rooms.is_empty());
    }

    #[test]
    fn trusted_proxies_are_addresses_or_ranges() {
        let text =
            MINIMAL.replace("[upstream]", "trusted_proxies = [\"172.28.0.10\", \"10.0.0.0/8\", \"::1\"]\n[upstream]");
        let config = parse(&text).unwrap();
        let listed: Vec<String> = config.server.trusted_proxies.iter().map(ToString::to_string).collect();
        assert_eq!(listed, ["172.28.0.10/32", "10.0.0.0/8", "::1/128"]);
        let message = error_of(&MINIMAL.replace("[upstream]", "trusted_proxies = [\"lb.internal\"]\n[upstream]"));
        assert!(message.contains("server.trusted_proxies") && message.contains("lb.internal"), "{message}");
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let room = r#"
            [[rooms]]
            id = "checkout"
            paths = ["/checkout"]
            admit_per_minute = 0
            max_active = 5
        "#;
        let message = error_of(&format!("{MINIMAL}{room}"));
        assert!(message.starts_with("proxy.toml: rooms[0].admit_per_minute: "), "{message}");

        let message = error_of(&MINIMAL.replace("listen =", "lissen = \"x\"\nlisten ="));
        assert!(message.starts_with("proxy.toml: server.lissen: unknown field `lissen`"), "{message}");

        let message = error_of(&MINIMAL.replace("http://127.0.0.1:3000", "https://example.test"));
        assert!(message.starts_with("proxy.toml: upstream.url: "), "{message}");

        let message = error_of(&format!("{MINIMAL}\n[store]\nkind = \"redis\"\n"));
        assert_eq!(message, "proxy.toml: store.url: required when kind = \"redis\"");
    }

    #[test]
    fn room_ids_and_paths_are_checked_and_canonicalized() {
        let room = |id: &str, path: &str| {
            format!("[[rooms]]\nid = \"{id}\"\npaths = [\"{path}\"]\nadmit_per_minute = 60\nmax_active = 10\n")
        };
        let config = parse(&format!("{MINIMAL}{}", room("checkout", "/Check%4Fut//"))).unwrap();
        assert_eq!(config.rooms[0].paths, ["/checkout/"]);

        assert!(error_of(&format!("{MINIMAL}{}", room("Check Out", "/c"))).contains("rooms[0].id"));
        assert!(error_of(&format!("{MINIMAL}{}", room("a", "/"))).contains("rooms[0].paths[0]"));
        let twice = format!("{MINIMAL}{}{}", room("a", "/c"), room("b", "/C"));
        assert!(error_of(&twice).contains("rooms[1].paths[0]"), "{}", error_of(&twice));
    }

    #[test]
    fn session_idle_seconds_defaults_to_five_minutes_and_takes_30_and_more() {
        let room = |extra: &str| {
            format!("{MINIMAL}[[rooms]]\nid = \"c\"\npaths = [\"/c\"]\nadmit_per_minute = 6\nmax_active = 1\n{extra}")
        };
        assert_eq!(parse(&room("")).unwrap().rooms[0].session_idle_seconds, 300);
        assert_eq!(parse(&room("session_idle_seconds = 30")).unwrap().rooms[0].session_idle_seconds, 30);
        let message = error_of(&room("session_idle_seconds = 29"));
        assert!(message.starts_with("proxy.toml: rooms[0].session_idle_seconds: must be at least 30"), "{message}");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let message = error_of("[server\nlisten = 1");
        assert!(message.starts_with("proxy.toml: "), "{message}");
    }
}
