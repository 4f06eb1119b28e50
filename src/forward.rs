//! Forwarding to the upstream: a pooled keep-alive client, bodies streamed both ways, connect
//! and response timeouts (502 / 504), hop-by-hop headers removed from the response, and
//! protocol upgrades (websockets) spliced once the upstream answers 101.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::timeout::TimeoutBody;

use crate::body::{self, Body};
use crate::config::UpstreamConfig;
use crate::error::GateError;
use crate::hop;
use crate::metrics::UpstreamTimer;
use crate::pool::{Pool, SendError};
use crate::resolve::Resolver;

/// Response headers only the gate reads; the client never sees them.
pub const VESTIBULE_SESSION: http::HeaderName = http::HeaderName::from_static("vestibule-session");

/// Whether the upstream's answer ends the visitor's session (`Vestibule-Session: end`); the
/// header is removed, so the client never sees it.
pub fn session_ended(headers: &mut http::HeaderMap) -> bool {
    headers.remove(VESTIBULE_SESSION).is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"end"))
}

/// Resolves when the session an upgraded tunnel belongs to has ended.
pub type SessionEnd = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A protocol upgrade the client asked for.
pub struct Upgrade {
    /// The client's side, once the answer has switched protocols.
    pub client_side: OnUpgrade,
    /// The client connection's place under the connection caps, held by the tunnel.
    pub place: Option<Arc<crate::limit::ConnectionPlace>>,
    /// Through a trusted proxy: the client's place under its own connection cap.
    pub proxied: Option<Arc<crate::limit::Slot>>,
    /// When the admitted session that opened it ends (none outside the rooms).
    pub session_end: Option<SessionEnd>,
}

/// The upstream's answer, and whether it ended the visitor's session.
pub struct Forwarded {
    pub response: Response<Body>,
    /// The upstream sent `Vestibule-Session: end` (removed before the client sees it).
    pub session_ended: bool,
    /// How long the upstream took to its response head once the request was sent whole;
    /// `None` when it answered while the client was still uploading.
    pub took: Option<Duration>,
}

/// The protected upstream.
pub struct Upstream {
    pool: Pool,
    resolver: Resolver,
    authority: http::uri::Authority,
    response_timeout: Duration,
    body_timeout: Duration,
    tunnel_idle_timeout: Duration,
    /// Spliced upgrade tunnels: owned (by the gate, across reloads), so shutdown can end them.
    tunnels: TaskTracker,
    stop: CancellationToken,
    preserve_host: bool,
    timer: UpstreamTimer,
}

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        stop: CancellationToken,
        tunnels: TaskTracker,
        timer: UpstreamTimer,
    ) -> anyhow::Result<Upstream> {
        let url = &config.url;
        let host = url.host().expect("validated: upstream.url has a host");
        let resolver = Resolver::new(host, &config.nameservers, config.connect_timeout)?;
        let port = url.port_u16().unwrap_or(80);
        let pool = Pool::new(
            host,
            port,
            resolver.clone(),
            config.connect_timeout,
            config.pool_max_idle,
            config.pool_idle_timeout,
        );
        Ok(Upstream {
            pool,
            resolver,
            authority: url.authority().cloned().expect("validated: upstream.url has an authority"),
            response_timeout: config.response_timeout,
            body_timeout: config.body_timeout,
            tunnel_idle_timeout: config.tunnel_idle_timeout,
            tunnels,
            stop,
            preserve_host: config.preserve_host,
            timer,
        })
    }

    /// The request target sent upstream (origin-form) for a canonical path and the client's
    /// query.
    pub fn uri_for(&self, path: &str, query: Option<&str>) -> Result<http::Uri, GateError> {
        let target = match query {
            Some(query) => http::uri::PathAndQuery::try_from(format!("{path}?{query}")),
            None => http::uri::PathAndQuery::try_from(path),
        };
        target.map(http::Uri::from).map_err(|_| GateError::BadRequest("The request target is not valid."))
    }

    /// The keep-alive pool (the fast lane takes bare streams from it).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    pub fn body_timeout(&self) -> Duration {
        self.body_timeout
    }

    /// Count an exchange by the status it got (none when it failed) and how long it took.
    pub fn observe(&self, status: Option<StatusCode>, took: Duration) {
        self.timer.observe(status, took);
    }

    /// An exchange failed before an answer: a debug line (the log's summary of refusals
    /// counts each at info, so that an outage under a crowd is not a line per request); after
    /// a failed connection the name may point elsewhere now, so the next connection asks again.
    pub fn failed(&self, error: &dyn std::fmt::Display, connect: bool) {
        tracing::debug!(error = %error, connect, "upstream request failed");
        if connect {
            self.resolver.forget();
        }
    }

    /// Whether the client's `Host` goes upstream (or the upstream's own authority).
    pub fn preserve_host(&self) -> bool {
        self.preserve_host
    }

    /// The upstream's own authority, for `Host` when the client's is not preserved.
    pub fn authority(&self) -> &http::uri::Authority {
        &self.authority
    }

    /// Send a prepared request (headers already filtered by the gate). `upgrade` carries the
    /// client side of a requested protocol upgrade, and the client connection's place under
    /// `max_connections`, which the tunnel keeps.
    pub async fn send(&self, request: Request<Body>, upgrade: Option<Upgrade>) -> Result<Forwarded, GateError> {
        let requested = request.headers().get(header::UPGRADE).cloned();
        let upload = Arc::new(body::Upload::default());
        let length = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let uploading = !http_body::Body::is_end_stream(request.body());
        let request = if uploading {
            request.map(|body| body::boxed(body::Uploaded::new(body, length, upload.clone())))
        } else {
            request
        };
        let started = std::time::Instant::now();
        // `response_timeout` bounds the whole exchange, upload included (so that no client,
        // however slowly it sends, holds an upstream connection for longer). When it runs out
        // while the upstream waits on the client's body, the client is the slow one: its error,
        // not the upstream's.
        let sent = tokio::time::timeout(self.response_timeout, self.pool.send(request)).await;
        if sent.is_err() && uploading && upload.done.get().is_none() && upload.waits_on_client() {
            return Err(GateError::BadRequest("The request body came too slowly."));
        }
        let status = sent.as_ref().ok().and_then(|sent| sent.as_ref().ok()).map(Response::status);
        let answered = std::time::Instant::now();
        // The client's body broke the exchange (too large, too slow, badly framed): the
        // client's error, not an upstream failure (nor a reading of the upstream's health).
        if let (Ok(Err(_)), Some(&too_large)) = (&sent, upload.failed.get()) {
            return Err(if too_large {
                GateError::PayloadTooLarge
            } else {
                GateError::BadRequest("The request body could not be read: broken, or sent too slowly.")
            });
        }
        self.timer.observe(status, answered - started);
        // The upstream's own time: from the end of the upload; none while the client was still
        // sending (the time would be the client's).
        let took = match uploading {
            false => Some(answered - started),
            true => upload.done.get().map(|done| answered.saturating_duration_since(*done)),
        };
        let mut response = match sent {
            Err(_elapsed) => return Err(GateError::UpstreamTimeout),
            Ok(Err(error)) => {
                self.failed(&error, matches!(error, SendError::Connect(_)));
                return Err(GateError::UpstreamUnreachable);
            }
            Ok(Ok(response)) => response,
        };

        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let protocol = response.headers().get(header::UPGRADE).cloned();
        hop::strip_hop_by_hop(response.headers_mut());
        let session_ended = session_ended(response.headers_mut());
        // The protocol the upstream switched to must be the one asked for (RFC 9110 §15.2.2).
        let agreed = protocol.as_ref().zip(requested.as_ref()).is_some_and(|(protocol, requested)| {
            protocol.as_bytes().trim_ascii().eq_ignore_ascii_case(requested.as_bytes().trim_ascii())
        });
        match (switching, upgrade, protocol) {
            (true, Some(upgrade), Some(protocol)) if agreed => {
                hop::set_upgrade(response.headers_mut(), protocol);
                let upstream_side = hyper::upgrade::on(&mut response);
                self.splice(upgrade, upstream_side);
            }
            (true, _, _) => {
                // A 101 nobody asked for, to another protocol, or without one: not passed on.
                return Err(GateError::UpstreamUnreachable);
            }
            _ => {}
        }
        let body_timeout = self.body_timeout;
        let response = response.map(|incoming| body::boxed(TimeoutBody::new(body_timeout, incoming)));
        Ok(Forwarded { response, session_ended, took })
    }

    /// Join both sides of an upgraded connection once each has switched protocols, until
    /// either closes, no byte passes for `tunnel_idle_timeout`, the session that opened it
    /// ends, or shutdown. The client connection's place under the caps is held meanwhile.
    fn splice(&self, upgrade: Upgrade, upstream_side: OnUpgrade) {
        let stop = self.stop.clone();
        let idle_timeout = self.tunnel_idle_timeout;
        let Upgrade { client_side, place, proxied, session_end } = upgrade;
        let session_end = session_end.unwrap_or_else(|| Box::pin(std::future::pending()));
        self.tunnels.spawn(async move {
            let _places = (place, proxied);
            let started = Instant::now();
            let active = Arc::new(AtomicU64::new(0));
            let tunnel = async {
                let (client, upstream) = tokio::try_join!(client_side, upstream_side)?;
                let mut client = Watched { io: TokioIo::new(client), started, active: active.clone() };
                let mut upstream = Watched { io: TokioIo::new(upstream), started, active: active.clone() };
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            let idle = async {
                loop {
                    let last = started + Duration::from_millis(active.load(Ordering::Relaxed));
                    if last.elapsed() >= idle_timeout {
                        break;
                    }
                    tokio::time::sleep_until(last + idle_timeout).await;
                }
            };
            tokio::select! {
                result = tunnel => {
                    if let Err(error) = result {
                        tracing::debug!(error = %error, "upgraded connection ended");
                    }
                }
                () = idle => tracing::debug!(?idle_timeout, "upgraded connection idle: closed"),
                () = session_end => tracing::debug!("upgraded connection's session ended: closed"),
                () = stop.cancelled() => {}
            }
        });
    }
}

/// One side of a tunnel, noting when bytes last came in (ms since `started`).
struct Watched<T> {
    io: T,
    started: Instant,
    active: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = self.started.elapsed().as_millis() as u64;
            self.active.fetch_max(now, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
