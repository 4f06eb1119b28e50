//! Reload (SIGHUP, or `POST /reload` on the admin listener): `proxy.toml` read again and
//! validated whole, then rooms, messages, keys and upstream settings applied without dropping
//! a connection, a feed socket or a place in line. A file that does not validate changes
//! nothing. The admin token and `admin.hosts` apply at once (the admin listener reads them at
//! each call). `[server]` (listeners, TLS, limits, trusted proxies, cookies), `admin.listen`,
//! the store and the runtime need a restart: a reload that changes them says so, in its
//! answer and in the log.

use std::sync::Arc;

use serde::Serialize;

use super::{new_room, Gate, Routing};
use crate::config::Config;
use crate::forward::Upstream;
use crate::token::Tokens;

/// What a reload changed.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Reloaded {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// The keys were loaded again (a rotation takes effect).
    pub keys: bool,
    pub upstream: bool,
    /// Settings that changed but take effect only after a restart.
    pub restart_needed: Vec<&'static str>,
}

impl Gate {
    /// Read the file the configuration in force came from again, and apply it (SIGHUP,
    /// `POST /reload`). A file that does not validate is refused, with the key named, and the
    /// configuration in force stays.
    pub fn reload_from_source(&self) -> anyhow::Result<Reloaded> {
        let Some(path) = self.config().source.clone() else {
            anyhow::bail!("this configuration was not read from a file: nothing to read again");
        };
        let loaded = Config::load(&path).and_then(|mut config| {
            config.resolve_secrets()?;
            Ok(config)
        });
        let reloaded = loaded.map_err(anyhow::Error::from).and_then(|config| self.reload(config));
        if let Err(error) = &reloaded {
            tracing::error!(error = %format!("{error:#}"), "reload refused: the configuration in force stays");
        }
        reloaded
    }

    /// Apply `config` (validated: `Config::load` checked it whole). On an error nothing has
    /// changed.
    pub fn reload(&self, config: Config) -> anyhow::Result<Reloaded> {
        let old = self.config();
        let mut reloaded = Reloaded::default();
        // Keys and the upstream first: the parts that can still fail (a key file gone, no
        // resolver configuration).
        let tokens = Tokens::new(&config.tokens)?;
        reloaded.keys = keys_changed(&tokens, &self.tokens()) || config.tokens != old.tokens;
        let upstream = if config.upstream != old.upstream {
            let timer = self.metrics.upstream();
            Some(Upstream::new(&config.upstream, self.stop.clone(), self.tunnels.clone(), timer)?)
        } else {
            None
        };
        self.reload_rooms(&config, &tokens, &mut reloaded);
        // Only keys that differ from those in force are put in; the same keys keep their
        // token cache.
        if reloaded.keys {
            self.tokens.store(Arc::new(tokens));
        }
        if let Some(upstream) = upstream {
            self.upstream.store(Arc::new(upstream));
            reloaded.upstream = true;
        }
        let config = sized_as_before(config, &old);
        reloaded.restart_needed = restart_needed(&config, &old);
        if !reloaded.restart_needed.is_empty() {
            tracing::warn!(keys = ?reloaded.restart_needed, "these settings take effect after a restart");
        }
        self.access_log.store(config.log.access, std::sync::atomic::Ordering::Relaxed);
        self.config.store(Arc::new(in_force(config, &old)));
        tracing::info!(added = ?reloaded.added, changed = ?reloaded.changed, removed = ?reloaded.removed, keys = reloaded.keys, "configuration reloaded");
        Ok(reloaded)
    }

    /// Rooms added (their schedulers started), changed (reconfigured in place) and removed
    /// (their schedulers and feeds stopped; their lines stay in the store).
    fn reload_rooms(&self, config: &Config, tokens: &Tokens, reloaded: &mut Reloaded) {
        let mut rooms = Vec::new();
        for room_config in &config.rooms {
            match self.room_by_id(&room_config.id) {
                Some(room) => {
                    if room.settings().config != *room_config {
                        room.reconfigure(room_config.clone());
                        reloaded.changed.push(room.id.clone());
                    }
                    rooms.push(room);
                }
                None => {
                    let room = new_room(room_config, &self.stop, &self.metrics, tokens.ring().event_secret());
                    room.learn_line(&self.store);
                    reloaded.added.push(room.id.clone());
                    self.start_scheduler(&room);
                    rooms.push(room);
                }
            }
        }
        for room in self.rooms() {
            if !config.rooms.iter().any(|c| c.id == room.id) {
                room.stop_token().cancel();
                reloaded.removed.push(room.id.clone());
            }
        }
        self.room_ids.send_replace(rooms.iter().map(|room| room.id.clone()).collect());
        self.routing.store(Arc::new(Routing::new(rooms)));
    }
}

/// Whether `new` holds other keys than `old` (a file rewritten with a new key under the same
/// name is a change too).
fn keys_changed(new: &Tokens, old: &Tokens) -> bool {
    let (new, old) = (new.ring(), old.ring());
    new.jwks() != old.jwks() || new.signing_kid() != old.signing_kid() || new.event_secret() != old.event_secret()
}

/// Capacity the file leaves to the defaults, then and now, is as `run` sized it.
fn sized_as_before(mut config: Config, old: &Config) -> Config {
    if !config.server.capacity_given && !old.server.capacity_given {
        config.server.max_connections = old.server.max_connections;
        config.server.max_feed_sockets = old.server.max_feed_sockets;
    }
    config
}

/// The settings `config` changes from those in force that take effect only after a restart.
fn restart_needed(config: &Config, old: &Config) -> Vec<&'static str> {
    let (server, old_server) = (&config.server, &old.server);
    let admin_listen = |config: &Config| config.admin.as_ref().map(|a| a.listen);
    let needs_restart = [
        ("server.listen", server.listen != old_server.listen),
        ("server.tls", server.tls != old_server.tls),
        ("server.workers", server.workers != old_server.workers),
        ("server.trusted_proxies", server.trusted_proxies != old_server.trusted_proxies),
        ("server.cookie_secure", server.cookie_secure != old_server.cookie_secure),
        ("server.max_connections", server.max_connections != old_server.max_connections),
        (
            "server.max_connections_per_address",
            server.max_connections_per_address != old_server.max_connections_per_address,
        ),
        ("server.send_timeout", server.send_timeout != old_server.send_timeout),
        // Any other key of [server]: the listeners and the gate took them at start.
        ("server", server != old_server),
        ("admin.listen", admin_listen(config) != admin_listen(old)),
        ("store", config.store != old.store),
        ("log.format", config.log.format != old.log.format),
        ("log.level", config.log.level != old.log.level),
    ];
    let mut needs_restart: Vec<_> = needs_restart.into_iter().filter(|(_, changed)| *changed).collect();
    // "server" names only what the keys above do not.
    if needs_restart.iter().any(|(key, _)| key.starts_with("server.")) {
        needs_restart.retain(|(key, _)| *key != "server");
    }
    needs_restart.into_iter().map(|(key, _)| key).collect()
}

/// `config` as it is in force: what takes a restart stays as it runs, so that the next reload
/// compares with what runs (not with the last file read) and says again what still waits.
fn in_force(mut config: Config, old: &Config) -> Config {
    config.server = old.server.clone();
    config.store = old.store.clone();
    config.log.format = old.log.format;
    config.log.level = old.log.level.clone();
    // The admin listener runs (or not) as it started; its token and hosts follow the file.
    config.admin = match (config.admin.take(), &old.admin) {
        (Some(admin), Some(running)) => Some(crate::config::AdminConfig { listen: running.listen, ..admin }),
        (None, Some(running)) => Some(running.clone()),
        (_, None) => None,
    };
    config
}
