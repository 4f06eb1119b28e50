//! The upstream's host name, resolved without blocking: in compose or Kubernetes the upstream is
//! a service name whose address changes when its pods move.
//!
//! hickory's resolver asks the name servers over the runtime's own sockets (no `getaddrinfo`
//! on a thread) and keeps each answer for its TTL; a failed connection forgets what it knew,
//! so the next one asks again. Only new upstream connections resolve: a request on a pooled
//! connection never waits for a name server. Redis connections are resolved by redis-rs on each
//! (re)connect through tokio's resolver, which runs `getaddrinfo` on the blocking pool, never
//! on a runtime thread.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;

/// Resolves the upstream's host name for its connector.
#[derive(Clone)]
pub struct Resolver {
    /// None when the upstream is an IP address: the connector then never asks.
    inner: Option<Arc<TokioResolver>>,
    /// Longest wait for an answer (the upstream's `connect_timeout`): a stalled name server
    /// costs a new connection a 502, never a hang.
    timeout: Duration,
}

impl Resolver {
    /// A resolver for `host`: the system's configuration (`/etc/resolv.conf`, `/etc/hosts`), or
    /// the given name servers (`host:port`, asked over UDP then TCP).
    pub fn new(host: &str, nameservers: &[SocketAddr], timeout: Duration) -> anyhow::Result<Resolver> {
        let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok();
        if literal {
            return Ok(Resolver { inner: None, timeout });
        }
        let provider = TokioConnectionProvider::default();
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|error| {
                anyhow::anyhow!("cannot read the system's resolver configuration (/etc/resolv.conf) for upstream host {host:?}: {error}; set upstream.nameservers or use an IP address")
            })?
        } else {
            let mut config = ResolverConfig::new();
            for &server in nameservers {
                config.add_name_server(NameServerConfig::new(server, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(server, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(config, provider)
        };
        // Asked again within the connect timeout rather than hickory's 5 s default.
        builder.options_mut().timeout = timeout.min(Duration::from_secs(5));
        builder.options_mut().attempts = 2;
        Ok(Resolver { inner: Some(Arc::new(builder.build())), timeout })
    }

    /// Forget every answer kept, after a connection failed: the address may have moved.
    pub fn forget(&self) {
        if let Some(resolver) = &self.inner {
            resolver.clear_cache();
        }
    }

    /// The addresses of `host`, asked of the name servers or taken from the cache, within the
    /// connect timeout.
    pub async fn lookup(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        let Some(resolver) = &self.inner else {
            return Err(io::Error::other(format!("no resolver for {host}: the upstream is an IP address")));
        };
        let timeout = self.timeout;
        let answer = tokio::time::timeout(timeout, resolver.lookup_ip(host))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("resolving {host} took over {timeout:?}")))?
            .map_err(|error| io::Error::other(format!("resolving {host}: {error}")))?;
        Ok(answer.iter().collect())
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("name", &self.inner.is_some()).field("timeout", &self.timeout).finish()
    }
}
