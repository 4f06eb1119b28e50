//! The gate: one decision per request — `Forward`, `Wait` or `Reject` — and then the
//! forwarding itself, as separate steps. A reader sees the whole gate in [`Gate::serve`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutBody;

use crate::body::{self, Body};
use crate::config::{Config, RoomConfig};
use crate::error::{self, GateError};
use crate::forward::Upstream;
use crate::framing::Verdicts;
use crate::hop::{self, Peer};
use crate::path::{canonicalize, CanonicalPath};
use crate::token::{Admission, KeyError, Tokens};

/// The reserved prefix of vestibule's own endpoints; never forwarded.
pub const RESERVED_PREFIX: &str = "/_vestibule/";
/// Where a standard JWT library looks for our public keys.
pub const WELL_KNOWN_JWKS: &str = "/.well-known/jwks.json";
/// `Retry-After` for a protected request that has no valid token yet.
const WAIT_RETRY_SECONDS: u32 = 20;

/// A room as the gate sees it.
#[derive(Debug)]
pub struct Room {
    pub id: String,
    /// How long an admission token lasts.
    pub session: Duration,
    token_cookie: String,
}

impl Room {
    fn new(config: &RoomConfig) -> Room {
        Room {
            id: config.id.clone(),
            session: Duration::from_secs(config.session_seconds),
            token_cookie: token_cookie_name(&config.id),
        }
    }
}

/// The cookie that carries a room's admission token.
pub fn token_cookie_name(room: &str) -> String {
    format!("vestibule-token-{room}")
}

/// One guarded prefix, normalized (lower-case unless the room is case-sensitive).
struct Guard {
    prefix: String,
    case_sensitive: bool,
    room: usize,
}

/// What the gate knows about the client connection a request came on.
#[derive(Debug, Clone)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The forwarding headers' view of the peer, made once per connection.
    pub forwarded: Peer,
    pub verdicts: Verdicts,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Decision<'a> {
    /// Forward; with the room and admission when the path is inside a room.
    Forward(Option<(&'a Room, Arc<Admission>)>),
    /// Inside a room, without a valid token.
    Wait(&'a Room),
    /// Refuse with an error.
    Reject(GateError),
}

/// Everything a request needs, shared by all connections.
pub struct Gate {
    rooms: Vec<Room>,
    /// Longest prefix first, so the most specific room wins.
    guards: Vec<Guard>,
    tokens: Tokens,
    upstream: Upstream,
    trusted_proxies: Vec<IpNet>,
    max_body_bytes: u64,
    body_read_timeout: Duration,
    preserve_host: bool,
}

impl Gate {
    /// Build the gate from a validated configuration. `stop` ends upgraded tunnels.
    pub fn new(config: &Config, stop: CancellationToken) -> Result<Gate, KeyError> {
        let rooms: Vec<Room> = config.rooms.iter().map(Room::new).collect();
        let mut guards: Vec<Guard> = config
            .rooms
            .iter()
            .enumerate()
            .flat_map(|(room, c)| {
                c.paths.iter().map(move |prefix| Guard {
                    prefix: prefix.clone(),
                    case_sensitive: c.case_sensitive,
                    room,
                })
            })
            .collect();
        guards.sort_by_key(|guard| std::cmp::Reverse(guard.prefix.len()));
        Ok(Gate {
            rooms,
            guards,
            tokens: Tokens::new(&config.tokens)?,
            upstream: Upstream::new(&config.upstream, stop),
            trusted_proxies: config.server.trusted_proxies.clone(),
            max_body_bytes: config.server.max_body_bytes,
            body_read_timeout: config.server.body_read_timeout,
            preserve_host: config.upstream.preserve_host,
        })
    }

    /// The per-connection state for a client at `peer`.
    pub fn connection(&self, peer: SocketAddr, tls: bool, verdicts: Verdicts) -> Connection {
        let trusted = self.trusted_proxies.iter().any(|net| net.contains(&peer.ip()));
        Connection { peer, forwarded: Peer::new(peer.ip(), tls, trusted), verdicts }
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    pub fn rooms(&self) -> &[Room] {
        &self.rooms
    }

    /// Handle one request; every failure becomes a response here.
    pub async fn handle(&self, request: Request<Incoming>, connection: &Connection) -> Response<Body> {
        let wants_json = error::wants_json(request.headers()) || request.method() != Method::GET;
        match self.serve(request, connection).await {
            Ok(response) => response,
            Err(error) => {
                if error.status().is_server_error() {
                    tracing::info!(peer = %connection.peer, status = error.status().as_u16(), "request not forwarded");
                }
                error.into_response(wants_json)
            }
        }
    }

    async fn serve(&self, request: Request<Incoming>, connection: &Connection) -> Result<Response<Body>, GateError> {
        if request.version() <= Version::HTTP_11 && connection.verdicts.next_is_ambiguous() {
            return Err(GateError::BadRequest("The request framing is ambiguous."));
        }
        check_host(&request)?;
        let path =
            canonicalize(request.uri().path()).map_err(|_| GateError::BadRequest("The request path is not valid."))?;
        if let Some(endpoint) = path.decoded.strip_prefix(RESERVED_PREFIX) {
            return self.reserved(endpoint, &request);
        }
        if path.decoded == WELL_KNOWN_JWKS {
            return self.reserved("jwks.json", &request);
        }
        match self.decide(request.headers(), &path) {
            Decision::Forward(admission) => self.forward(request, connection, &path, admission).await,
            // The waiting room itself is the line's work; until a room can hand out tokens,
            // a protected request without one is told to come back.
            Decision::Wait(_room) => Err(GateError::Unavailable { retry_after_seconds: WAIT_RETRY_SECONDS }),
            Decision::Reject(error) => Err(error),
        }
    }

    /// The decision for a request to `path` with these headers.
    pub fn decide(&self, headers: &HeaderMap, path: &CanonicalPath) -> Decision<'_> {
        let Some(room) = self.room_for(&path.decoded) else {
            return Decision::Forward(None);
        };
        match self.admission(headers, room) {
            Some(admission) => Decision::Forward(Some((room, admission))),
            None => Decision::Wait(room),
        }
    }

    /// The room guarding a canonical path, if any.
    pub fn room_for(&self, path: &str) -> Option<&Room> {
        let mut lower = None;
        self.guards
            .iter()
            .find(|guard| {
                if guard.case_sensitive {
                    path.starts_with(&guard.prefix)
                } else {
                    lower.get_or_insert_with(|| path.to_lowercase()).starts_with(&guard.prefix)
                }
            })
            .map(|guard| &self.rooms[guard.room])
    }

    /// A valid admission for `room` from the `Vestibule-Token` header or the room's cookie.
    /// Invalid tokens of any kind count as no token.
    fn admission(&self, headers: &HeaderMap, room: &Room) -> Option<Arc<Admission>> {
        let from_header = headers.get(&hop::VESTIBULE_TOKEN).and_then(|v| v.to_str().ok());
        let from_cookies = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| *name == room.token_cookie)
            .map(|(_, value)| value);
        from_header.into_iter().chain(from_cookies).find_map(|token| match self.tokens.admit(token, &room.id) {
            Ok(admission) => Some(admission),
            Err(reason) => {
                tracing::debug!(room = %room.id, %reason, "token refused");
                None
            }
        })
    }

    /// vestibule's own endpoints under `/_vestibule/`.
    fn reserved(&self, endpoint: &str, request: &Request<Incoming>) -> Result<Response<Body>, GateError> {
        match endpoint {
            "jwks.json" => {
                if request.method() != Method::GET && request.method() != Method::HEAD {
                    return Err(GateError::MethodNotAllowed);
                }
                let mut response = Response::new(body::full(self.tokens.ring().jwks()));
                let headers = response.headers_mut();
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/jwk-set+json"));
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
                Ok(response)
            }
            _ => Err(GateError::NotFound),
        }
    }

    /// Forward a request upstream: filtered headers, canonical path, streamed body.
    async fn forward(
        &self,
        mut request: Request<Incoming>,
        connection: &Connection,
        path: &CanonicalPath,
        admission: Option<(&Room, Arc<Admission>)>,
    ) -> Result<Response<Body>, GateError> {
        let upgrade =
            (request.version() == Version::HTTP_11).then(|| hop::upgrade_requested(request.headers())).flatten();
        let on_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let (mut parts, incoming) = request.into_parts();

        if self.max_body_bytes > 0 {
            let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if declared.is_some_and(|length| length > self.max_body_bytes) {
                return Err(GateError::PayloadTooLarge);
            }
        }

        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            let authority = parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        let headers = &mut parts.headers;
        hop::strip_hop_by_hop(headers);
        hop::set_forwarding_headers(headers, &connection.forwarded, host.as_ref());
        if let Some(protocol) = upgrade {
            hop::set_upgrade(headers, protocol);
        }
        if let Some((room, admission)) = &admission {
            let visitor =
                HeaderValue::from_str(&admission.visitor).map_err(|_| GateError::BadRequest("Invalid visitor."))?;
            headers.insert(hop::VESTIBULE_ROOM, HeaderValue::from_str(&room.id).expect("room ids are validated"));
            headers.insert(hop::VESTIBULE_VISITOR, visitor);
        }
        match (self.preserve_host, host) {
            (true, Some(host)) => {
                headers.insert(header::HOST, host);
            }
            _ => {
                let authority = HeaderValue::from_str(self.upstream.authority().as_str()).expect("a valid authority");
                headers.insert(header::HOST, authority);
            }
        }
        parts.uri = self.upstream.uri_for(&path.encoded, parts.uri.query())?;
        parts.version = Version::HTTP_11;

        let timed = TimeoutBody::new(self.body_read_timeout, incoming);
        let body = if self.max_body_bytes > 0 {
            let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
            Limited::new(timed, limit).boxed()
        } else {
            body::boxed(timed)
        };
        self.upstream.send(Request::from_parts(parts, body), on_upgrade).await
    }
}

/// One `Host`, and an absolute-form target that agrees with it (RFC 9112 §3.2.2).
fn check_host(request: &Request<Incoming>) -> Result<(), GateError> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(GateError::BadRequest("The request has more than one Host header."));
    }
    if let (Some(authority), Some(host)) = (request.uri().authority(), host) {
        let agrees = host.to_str().is_ok_and(|host| host.eq_ignore_ascii_case(authority.as_str()));
        if !agrees {
            return Err(GateError::BadRequest("The request target and the Host header disagree."));
        }
    }
    if request.version() == Version::HTTP_11 && host.is_none() && request.uri().authority().is_none() {
        return Err(GateError::BadRequest("An HTTP/1.1 request needs a Host header."));
    }
    Ok(())
}
