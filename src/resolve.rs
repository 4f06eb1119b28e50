//! The upstream's host name, resolved without blocking: in compose or Kubernetes the upstream is
//! a service name whose address changes when its pods move.
//!
//! hickory's resolver asks the name servers over the runtime's own sockets (no `getaddrinfo`
//! on a thread) and keeps each answer for its TTL; a failed connection forgets what it knew,
//! so the next one asks again. Only new upstream connections resolve: a request on a pooled
//! connection never waits for a name server. Redis connections are resolved by redis-rs on each
//! (re)connect through tokio's resolver, which runs `getaddrinfo` on the blocking pool, never
//! on a runtime thread.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use hyper_util::client::legacy::connect::dns::Name;

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
}

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolver = self.inner.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let Some(resolver) = resolver else {
                return Err(io::Error::other(format!("no resolver for {name}: the upstream is an IP address")));
            };
            let answer = tokio::time::timeout(timeout, resolver.lookup_ip(name.as_str()))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, format!("resolving {name} took over {timeout:?}"))
                })?
                .map_err(|error| io::Error::other(format!("resolving {name}: {error}")))?;
            // The connector sets the port.
            let addresses: Vec<SocketAddr> = answer.iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            Ok(addresses.into_iter())
        })
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("name", &self.inner.is_some()).field("timeout", &self.timeout).finish()
    }
}
