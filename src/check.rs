//! `vestibule check`: a configuration read as `run` reads it (keys loaded, URLs parsed,
//! templates compiled), nothing on the network; what it holds, and what is legal but likely
//! wrong.

use crate::config::{Config, StoreKind};
use crate::token::Tokens;

/// What `check` found: one line per part loaded, and warnings.
#[derive(Debug, Default)]
pub struct Checked {
    pub loaded: Vec<String>,
    pub warnings: Vec<String>,
}

/// Check `config` (already parsed and validated) the rest of the way: its keys loaded and its
/// TLS files read. An error names the key.
pub fn check(config: &Config) -> anyhow::Result<Checked> {
    let mut checked = Checked::default();
    let tokens = Tokens::new(&config.tokens)?;
    let ring = tokens.ring();
    let algorithm = ring.signing_algorithm();
    checked.loaded.push(format!(
        "tokens.signing_key: {algorithm:?} key {}, kid {}{}",
        config.tokens.signing_key.display(),
        ring.signing_kid(),
        match config.tokens.verify_keys.len() {
            0 => String::new(),
            n => format!("; {n} more accepted (tokens.verify_keys)"),
        }
    ));
    if algorithm == jsonwebtoken::Algorithm::HS256 {
        checked.warnings.push(
            "tokens.signing_key is an HS256 secret: it is never published, so the upstream cannot verify \
             admission tokens from /.well-known/jwks.json (vestibule keygen makes an EdDSA key)"
                .to_owned(),
        );
    }
    if let Some(tls) = &config.server.tls {
        crate::server::tls_acceptor(tls).map_err(|error| anyhow::anyhow!("server.tls: {error:#}"))?;
        checked.loaded.push(format!("server.tls: {} and {}", tls.cert.display(), tls.key.display()));
    }
    checked.loaded.push(format!("server.listen: {}", config.server.listen));
    match &config.admin {
        Some(admin) => checked.loaded.push(format!("admin.listen: {}", admin.listen)),
        None => checked.loaded.push("admin: none (no admin API, no /metrics)".to_owned()),
    }
    // Secrets from the environment: said when this shell lacks them, checked as `run` will
    // check them when it has them.
    let unset: Vec<_> =
        config.secret_variables().into_iter().filter(|(_, var)| std::env::var_os(var).is_none()).collect();
    for (key, var) in &unset {
        checked.warnings.push(format!("{key}: {var} is not set here; `run` needs it"));
    }
    if unset.is_empty() {
        config.clone().resolve_secrets().map_err(|error| anyhow::anyhow!("{}", error.key_and_message()))?;
    }
    checked.loaded.push(format!("upstream.url: {}", config.upstream.url));
    checked.loaded.push(match config.store.kind {
        StoreKind::Memory => "store: memory (this instance alone keeps the line)".to_owned(),
        StoreKind::Redis | StoreKind::RedisCluster => {
            let kind = if config.store.kind == StoreKind::Redis { "redis" } else { "redis-cluster" };
            format!("store: {kind} at {}", crate::store::addresses(&config.store).join(", "))
        }
    });
    for (i, room) in config.rooms.iter().enumerate() {
        checked.loaded.push(format!(
            "room {}: guards {}; {} a minute, at most {} at once, sessions of {} s",
            room.id,
            room.paths.join(", "),
            room.admit_per_minute,
            room.max_active,
            room.session_seconds
        ));
        for (j, path) in room.paths.iter().enumerate() {
            if let Some(bare) = path.strip_suffix('/').filter(|bare| !bare.is_empty()) {
                checked.warnings.push(format!(
                    "rooms[{i}].paths[{j}] = {path:?} ends with '/': it guards {bare} too (and everything under \
                     {path}), not {bare}-other; write {bare:?} to say so"
                ));
            }
        }
    }
    if config.rooms.is_empty() {
        checked.warnings.push("no [[rooms]]: every request is forwarded, nobody waits".to_owned());
    }
    let needed = crate::server::descriptors_needed(config);
    if let Some(limit) = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum {
        if needed > limit && config.server.capacity_given {
            checked.warnings.push(format!(
                "server.max_connections + server.max_feed_sockets + 2 x upstream.pool_max_idle need {needed} open \
                 files; this machine allows {limit} (raise LimitNOFILE or ulimit -n, or lower them)"
            ));
        }
    }
    Ok(checked)
}
