//! The checks serde cannot make: every value in range, every name well formed, every room's
//! paths, times, words, events and bypass consistent. An error is `(key, message)`; the caller
//! adds the file.

use std::collections::HashSet;

use super::*;

impl Config {
    /// Semantic checks serde cannot make: `Err((key, message))`.
    pub(super) fn validate(&mut self) -> Result<(), (String, String)> {
        self.validate_server()?;
        if let Some(admin) = &mut self.admin {
            validate_admin(admin)?;
        }
        self.validate_upstream()?;
        self.validate_store()?;
        self.validate_tokens()?;
        let mut ids = HashSet::new();
        let mut prefixes = HashSet::new();
        for (i, room) in self.rooms.iter_mut().enumerate() {
            validate_room(i, room, &mut ids, &mut prefixes)?;
        }
        Ok(())
    }

    fn validate_server(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, message: &str| Err((key.to_owned(), message.to_owned()));
        let server = &self.server;
        if server.max_header_bytes < MIN_HEADER_BYTES {
            return fail("server.max_header_bytes", "must be at least 8192");
        }
        if server.max_headers == 0 {
            return fail("server.max_headers", "must be at least 1");
        }
        for (key, value) in [
            ("server.header_read_timeout", server.header_read_timeout),
            ("server.send_timeout", server.send_timeout),
            ("server.body_read_timeout", server.body_read_timeout),
            ("server.tls_handshake_timeout", server.tls_handshake_timeout),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.response_timeout", self.upstream.response_timeout),
            ("upstream.body_timeout", self.upstream.body_timeout),
            ("upstream.tunnel_idle_timeout", self.upstream.tunnel_idle_timeout),
        ] {
            if value.is_zero() {
                return fail(key, "must be longer than zero");
            }
        }

        Ok(())
    }

    fn validate_upstream(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, message: &str| Err((key.to_owned(), message.to_owned()));
        let url = &self.upstream.url;
        if url.scheme_str() != Some("http") {
            return fail("upstream.url", "must start with http:// (TLS to the upstream is not supported)");
        }
        if url.authority().is_none() {
            return fail("upstream.url", "must name a host and port");
        }
        if url.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
            return fail("upstream.url", "must not have a path or query: request paths are appended as they are");
        }

        Ok(())
    }

    fn validate_store(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, message: &str| Err((key.to_owned(), message.to_owned()));
        match self.store.kind {
            StoreKind::Memory => {}
            StoreKind::Redis if self.store.url.is_none() => return fail("store.url", "required when kind = \"redis\""),
            StoreKind::RedisCluster if self.store.urls.is_empty() => {
                return fail("store.urls", "required when kind = \"redis-cluster\"")
            }
            _ => {}
        }
        // Parsed as `run` will (no connection made): a URL that cannot connect is said now.
        let redis_urls = match self.store.kind {
            StoreKind::Memory => Vec::new(),
            StoreKind::Redis => self.store.url.iter().map(|url| ("store.url".to_owned(), url)).collect(),
            StoreKind::RedisCluster => {
                self.store.urls.iter().enumerate().map(|(i, url)| (format!("store.urls[{i}]"), url)).collect()
            }
        };
        for (key, url) in redis_urls {
            if let Err(error) = redis::Client::open(url.as_str()) {
                // The URL itself is not repeated: it may hold a password.
                let message = format!("not a Redis URL ({error}): write redis://host:6379/0, or rediss:// for TLS");
                return Err((key, message));
            }
        }

        Ok(())
    }

    fn validate_tokens(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, message: &str| Err((key.to_owned(), message.to_owned()));
        if self.tokens.issuer.is_empty() {
            return fail("tokens.issuer", "must not be empty");
        }
        if self.tokens.leeway_seconds > crate::token::MAX_LEEWAY_SECONDS {
            return fail("tokens.leeway_seconds", "at most 30");
        }

        Ok(())
    }
}

fn validate_admin(admin: &mut AdminConfig) -> Result<(), (String, String)> {
    let fail = |key: &str, message: &str| Err((key.to_owned(), message.to_owned()));
    match (&admin.token, &admin.token_env) {
        (Some(_), Some(_)) => return fail("admin", "set `token` or `token_env`, not both"),
        (None, None) => return fail("admin.token", "missing: set `token` or `token_env`"),
        // Read from the environment only by the commands that serve (`run`, a reload):
        // `check`, `token` and `loadtest` do not need it.
        (None, Some(var)) if var.is_empty() => return fail("admin.token_env", "name an environment variable"),
        (None, Some(_)) => {}
        (Some(token), None) => check_admin_token(token).map_err(|message| ("admin.token".to_owned(), message))?,
    }
    for (i, host) in admin.hosts.iter_mut().enumerate() {
        let valid = !host.is_empty()
            && host.len() <= 253
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !valid {
            return Err((format!("admin.hosts[{i}]"), format!("{host:?} is not a host name")));
        }
        host.make_ascii_lowercase();
    }
    Ok(())
}

/// One room (`rooms[i]`): its id, paths, times, words, and the sections below it.
fn validate_room(
    i: usize,
    room: &mut RoomConfig,
    ids: &mut HashSet<String>,
    prefixes: &mut HashSet<String>,
) -> Result<(), (String, String)> {
    let key = |k: &str| format!("rooms[{i}].{k}");
    let valid_id = !room.id.is_empty()
        && room.id.len() <= 64
        && room.id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid_id {
        return Err((key("id"), "use 1 to 64 of a-z, 0-9, '-' and '_'".into()));
    }
    if !ids.insert(room.id.clone()) {
        return Err((key("id"), format!("room {:?} is defined twice", room.id)));
    }
    if room.paths.is_empty() {
        return Err((key("paths"), "must list at least one path prefix".into()));
    }
    validate_paths(i, room, prefixes)?;
    if room.session_seconds == 0 {
        return Err((key("session_seconds"), "must be at least 1".into()));
    }
    if room.grant_seconds == 0 {
        return Err((key("grant_seconds"), "must be at least 1".into()));
    }
    if room.abandon_seconds < 30 {
        return Err((
            key("abandon_seconds"),
            "must be at least 30: a page without JavaScript refreshes every 20 s".into(),
        ));
    }
    if !(1..=32).contains(&room.challenge_difficulty) {
        return Err((key("challenge_difficulty"), "from 1 to 32 (bits of work)".into()));
    }
    if room.session_idle_seconds < 30 {
        return Err((
            key("session_idle_seconds"),
            "must be at least 30: an admitted session is reported in use every few seconds, not every request".into(),
        ));
    }
    if room.message.as_ref().is_some_and(|m| m.len() > 500) {
        return Err((key("message"), "at most 500 characters".into()));
    }
    crate::lang::check(room.lang.as_deref(), &room.strings).map_err(|(k, message)| (key(&k), message))?;
    if room.site_name.as_ref().is_some_and(|name| name.is_empty() || name.len() > 100) {
        return Err((key("site_name"), "from 1 to 100 characters".into()));
    }
    if room.title.as_ref().is_some_and(|title| title.is_empty() || title.len() > 100) {
        return Err((key("title"), "from 1 to 100 characters".into()));
    }
    if ![200, 202, 429, 503].contains(&room.queued_status) {
        return Err((key("queued_status"), "one of 200, 202, 429 and 503".into()));
    }
    validate_adaptive(i, room)?;
    validate_events(i, room)?;
    validate_bypass(i, room)?;
    Ok(())
}

fn validate_paths(i: usize, room: &mut RoomConfig, prefixes: &mut HashSet<String>) -> Result<(), (String, String)> {
    for (j, prefix) in room.paths.iter_mut().enumerate() {
        let key = || format!("rooms[{i}].paths[{j}]");
        if !prefix.starts_with('/') {
            return Err((key(), "must start with '/'".into()));
        }
        let canonical = canonicalize(prefix).map_err(|e| (key(), e.to_string()))?;
        let mut normal = canonical.decoded;
        if !room.case_sensitive {
            normal = normal.to_lowercase();
        }
        if normal == "/" {
            return Err((key(), "a room cannot guard the whole site; name a path prefix".into()));
        }
        if !prefixes.insert(normal.clone()) {
            return Err((key(), format!("{prefix:?} is guarded by another entry already")));
        }
        *prefix = normal;
    }
    Ok(())
}

fn validate_adaptive(i: usize, room: &RoomConfig) -> Result<(), (String, String)> {
    let key = |k: &str| format!("rooms[{i}].{k}");
    if let Some(adaptive) = &room.adaptive {
        if adaptive.p95_ms == 0 {
            return Err((key("adaptive.p95_ms"), "must be at least 1 (ms)".into()));
        }
        if !(0.0..=1.0).contains(&adaptive.error_ratio) {
            return Err((key("adaptive.error_ratio"), "from 0 to 1".into()));
        }
        if !(1..=300).contains(&adaptive.window_seconds) {
            return Err((key("adaptive.window_seconds"), "from 1 to 300".into()));
        }
        if !(adaptive.decrease > 0.0 && adaptive.decrease < 1.0) {
            return Err((key("adaptive.decrease"), "between 0 and 1 (0.7 steps down by 30 %)".into()));
        }
        if adaptive.min_per_minute.is_some_and(|min| min > room.admit_per_minute) {
            return Err((key("adaptive.min_per_minute"), "at most admit_per_minute".into()));
        }
    }
    Ok(())
}

/// A room's scheduled sales: named, in order, one after another.
fn validate_events(i: usize, room: &RoomConfig) -> Result<(), (String, String)> {
    let mut previous: Option<&EventConfig> = None;
    for (j, event) in room.events.iter().enumerate() {
        let key = |field: &str| format!("rooms[{i}].events[{j}].{field}");
        if event.name.is_empty() || event.name.len() > 100 {
            return Err((key("name"), "from 1 to 100 characters".into()));
        }
        if event.prequeue_at > event.starts_at {
            return Err((key("prequeue_at"), "at or before starts_at".into()));
        }
        if event.ends_at.is_some_and(|ends| ends <= event.starts_at) {
            return Err((key("ends_at"), "after starts_at".into()));
        }
        if event.message.as_ref().is_some_and(|m| m.len() > 500) {
            return Err((key("message"), "at most 500 characters".into()));
        }
        if room.events[..j].iter().any(|other| other.name == event.name) {
            return Err((key("name"), format!("{:?} names an earlier event of this room too", event.name)));
        }
        if let Some(previous) = previous {
            // The previous one must have started (and then ended, if it says when).
            let must_follow = previous.ends_at.unwrap_or(previous.starts_at + 1);
            if event.prequeue_at < must_follow {
                return Err((
                    key("prequeue_at"),
                    "after the previous event's start (at or after its ends_at): events follow one another".into(),
                ));
            }
        }
        previous = Some(event);
    }
    Ok(())
}

/// `[rooms.bypass]`. A `secret_env` is read only by the commands that serve (see
/// [`Config::resolve_secrets`]).
fn validate_bypass(i: usize, room: &RoomConfig) -> Result<(), (String, String)> {
    let key = |k: &str| format!("rooms[{i}].{k}");
    if let Some(bypass) = &room.bypass {
        match (&bypass.secret, &bypass.secret_env) {
            (Some(_), Some(_)) => return Err((key("bypass"), "set `secret` or `secret_env`, not both".into())),
            (None, Some(var)) if var.is_empty() => {
                return Err((key("bypass.secret_env"), "name an environment variable".into()))
            }
            (Some(secret), None) => check_bypass_secret(secret).map_err(|message| (key("bypass.secret"), message))?,
            _ => {}
        }
        if bypass.addresses.is_empty() && bypass.secret.is_none() && bypass.secret_env.is_none() {
            return Err((key("bypass"), "set `addresses`, a `secret`, or both".into()));
        }
    }
    Ok(())
}

pub(super) fn check_bypass_secret(secret: &str) -> Result<(), String> {
    if secret.len() < 16 {
        return Err("too short: use at least 16 characters".to_owned());
    }
    Ok(())
}
