//! The gate: one decision per request — `Forward` or `Wait` (malformed requests are refused
//! before it) — and then the step that carries it out. A reader sees the whole gate in
//! [`Gate::serve`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::timeout::TimeoutBody;

use crate::body::{self, Body};
use crate::challenge::{self, Pow, Refused};
use crate::clock::Clock;
use crate::config::{Config, RoomState};
use crate::error::{wants_page, GateError};
use crate::forward::{Forwarded, Upstream};
use crate::framing::{Verdict, Verdicts};
use crate::hop::{self, Peer};
use crate::line::{Joined, Redeemed};
use crate::path::{canonicalize, CanonicalPath};
use crate::room::feed::{self, FeedLimits};
use crate::room::{page, run_scheduler, Holding, Room};
use crate::store::{Store, StoreError};
use crate::token::{random_id, Admission, Tokens};

/// The reserved prefix of vestibule's own endpoints; never forwarded.
pub const RESERVED_PREFIX: &str = "/_vestibule/";
/// Where a standard JWT library looks for our public keys.
pub const WELL_KNOWN_JWKS: &str = "/.well-known/jwks.json";
/// `Retry-After` for visitors who wait: the no-JavaScript page refreshes this often too.
const RETRY_SECONDS: u32 = 20;
/// How long a ticket cookie holds a place.
const TICKET_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The longest an admitted request waits for its session's renewal in the store; a renewal
/// that does not come in time is tried again on the next request.
const RENEW_WAIT: Duration = Duration::from_millis(200);

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
    /// The connection's place under `server.max_connections`: an upgraded tunnel keeps it
    /// after the connection is handed over (freed when both are done).
    pub permit: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

/// A place in a room's line: a ticket number of one line.
#[derive(Debug, Clone, Copy)]
struct Place {
    ticket: u64,
    line: u64,
}

impl Place {
    fn of(held: &Admission) -> Place {
        Place { ticket: held.ticket, line: held.line }
    }
}

/// What to do with a request.
#[derive(Debug)]
pub enum Decision<'a> {
    /// Forward; with the room and admission when the path is inside a room.
    Forward(Option<(&'a Arc<Room>, Arc<Admission>)>),
    /// Inside a room, without a valid token: the line decides.
    Wait(&'a Arc<Room>),
}

/// Everything a request needs, shared by all connections.
pub struct Gate {
    rooms: Vec<Arc<Room>>,
    /// Longest prefix first, so the most specific room wins.
    guards: Vec<Guard>,
    tokens: Tokens,
    upstream: Upstream,
    store: Arc<Store>,
    clock: Clock,
    feeds: Arc<FeedLimits>,
    /// Feed sockets and schedulers: owned, ended by `stop`.
    tasks: TaskTracker,
    stop: CancellationToken,
    trusted_proxies: Vec<IpNet>,
    /// Proofs of work, for rooms that ask for one.
    pow: Pow,
    max_body_bytes: u64,
    body_read_timeout: Duration,
    preserve_host: bool,
    secure_cookies: bool,
}

impl Gate {
    /// Build the gate from a validated configuration and its store. `stop` ends feeds,
    /// schedulers and upgraded tunnels.
    pub fn new(config: &Config, store: Store, stop: CancellationToken) -> anyhow::Result<Gate> {
        let rooms: Vec<Arc<Room>> = config.rooms.iter().map(|c| Arc::new(Room::new(c))).collect();
        for room in &rooms {
            // Known at once in memory; with Redis, at the first read.
            room.observe_line(store.line(&room.id));
        }
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
        let server = &config.server;
        Ok(Gate {
            rooms,
            guards,
            tokens: Tokens::new(&config.tokens)?,
            upstream: Upstream::new(&config.upstream, stop.clone()),
            store: Arc::new(store),
            clock: Clock::new(),
            feeds: FeedLimits::new(server.max_feed_sockets, server.max_feed_sockets_per_address),
            tasks: TaskTracker::new(),
            stop,
            trusted_proxies: server.trusted_proxies.clone(),
            // Every instance signing with the same key issues and checks the same challenges.
            pow: Pow::new(&std::fs::read(&config.tokens.signing_key).unwrap_or_default()),
            max_body_bytes: server.max_body_bytes,
            body_read_timeout: server.body_read_timeout,
            preserve_host: config.upstream.preserve_host,
            secure_cookies: server.tls.is_some(),
        })
    }

    /// Start one scheduler per room and, with Redis, the listener for sessions ended at
    /// other instances.
    pub fn start_schedulers(&self) {
        for room in &self.rooms {
            let task = run_scheduler(room.clone(), self.store.clone(), self.clock, self.stop.clone());
            self.tasks.spawn(task);
        }
        if matches!(*self.store, Store::Redis(_)) {
            self.tasks.spawn(listen_to_rooms(self.store.clone(), self.rooms.clone(), self.clock, self.stop.clone()));
        }
    }

    /// Ends feeds, schedulers and tunnels.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Feed sockets and schedulers still running.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// The client's address for a request on `connection` (DESIGN §6): the peer, or what a
    /// trusted proxy says of it. Every per-address limit and log line uses it.
    pub fn client(&self, headers: &HeaderMap, connection: &Connection) -> std::net::IpAddr {
        if !connection.forwarded.trusted {
            return connection.peer.ip();
        }
        hop::client_address(connection.peer.ip(), &self.trusted_proxies, headers)
    }

    /// The per-connection state for a client at `peer`.
    pub fn connection(
        &self,
        peer: SocketAddr,
        tls: bool,
        verdicts: Verdicts,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Connection {
        let trusted = self.trusted_proxies.iter().any(|net| net.contains(&peer.ip()));
        Connection { peer, forwarded: Peer::new(peer.ip(), tls, trusted), verdicts, permit: permit.map(Arc::new) }
    }

    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    pub fn rooms(&self) -> &[Arc<Room>] {
        &self.rooms
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Feed sockets open now.
    pub fn open_feeds(&self) -> usize {
        self.feeds.open()
    }

    /// Handle one request; every failure becomes a response here.
    pub async fn handle(&self, request: Request<Incoming>, connection: &Connection) -> Response<Body> {
        let wants_json = !wants_page(&request);
        let client = self.client(request.headers(), connection);
        match self.serve(request, connection, client).await {
            Ok(response) => response,
            Err(error) => {
                if error.status().is_server_error() || error.status() == StatusCode::TOO_MANY_REQUESTS {
                    tracing::info!(%client, status = error.status().as_u16(), "request not forwarded");
                }
                error.into_response(wants_json)
            }
        }
    }

    async fn serve(
        &self,
        request: Request<Incoming>,
        connection: &Connection,
        client: std::net::IpAddr,
    ) -> Result<Response<Body>, GateError> {
        if request.version() <= Version::HTTP_11 {
            // Fail closed: what the scanner could not judge is refused too (and the
            // connection closed with the 400).
            match connection.verdicts.next() {
                Verdict::Clear => {}
                Verdict::Ambiguous => return Err(GateError::BadRequest("The request framing is ambiguous.")),
                Verdict::Unknown => return Err(GateError::BadRequest("The request framing cannot be followed.")),
            }
        }
        check_host(&request)?;
        let path =
            canonicalize(request.uri().path()).map_err(|_| GateError::BadRequest("The request path is not valid."))?;
        if let Some(endpoint) = path.decoded.strip_prefix(RESERVED_PREFIX) {
            return self.reserved(endpoint.to_owned(), request, client).await;
        }
        if path.decoded == WELL_KNOWN_JWKS {
            return self.reserved("jwks.json".to_owned(), request, client).await;
        }
        match self.decide(request.headers(), &path) {
            Decision::Forward(None) => Ok(self.forward(request, connection, &path, None).await?.response),
            Decision::Forward(Some((room, admission))) => {
                self.admitted(room, &admission, request, connection, &path).await
            }
            Decision::Wait(room) => self.enter(room, request, connection, client, &path).await,
        }
    }

    /// The decision for a request to `path` with these headers.
    pub fn decide(&self, headers: &HeaderMap, path: &CanonicalPath) -> Decision<'_> {
        let Some(room) = self.room_for(&path.decoded) else {
            return Decision::Forward(None);
        };
        if room.state() == RoomState::Passthrough {
            return Decision::Forward(None);
        }
        match self.admission(headers, room) {
            Some(admission) => Decision::Forward(Some((room, admission))),
            None => Decision::Wait(room),
        }
    }

    /// The room guarding a canonical path, if any.
    pub fn room_for(&self, path: &str) -> Option<&Arc<Room>> {
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

    fn room_by_id(&self, id: &str) -> Option<&Arc<Room>> {
        self.rooms.iter().find(|room| room.id == id)
    }

    /// A valid admission for `room` from the `Vestibule-Token` header or the room's cookie
    /// (the first of each only: every further copy would cost a signature check). Invalid
    /// tokens of any kind count as no token.
    fn admission(&self, headers: &HeaderMap, room: &Room) -> Option<Arc<Admission>> {
        let from_header = headers.get(&hop::VESTIBULE_TOKEN).and_then(|v| v.to_str().ok());
        from_header.into_iter().chain(cookies(headers, &room.token_cookie).next()).find_map(|token| {
            match self.tokens.admit(token, &room.id) {
                // The session has ended (leave, `Vestibule-Session: end`): no longer admitted;
                // or it belongs to a line that was reset.
                Ok(admission) if room.is_revoked(admission.ticket) || !room.same_line(admission.line) => None,
                Ok(admission) => Some(admission),
                Err(reason) => {
                    tracing::debug!(room = %room.id, %reason, "token refused");
                    None
                }
            }
        })
    }

    /// A valid ticket for `room` from its cookie (the first one only).
    fn ticket(&self, headers: &HeaderMap, room: &Room) -> Option<Arc<Admission>> {
        let ticket = cookies(headers, &room.ticket_cookie).next()?;
        self.tokens.ticket(ticket, &room.id).ok().filter(|ticket| room.same_line(ticket.line))
    }

    /// What a visitor holds for `room`.
    fn holding(&self, headers: &HeaderMap, room: &Room) -> Holding {
        if self.admission(headers, room).is_some() {
            return Holding::Token;
        }
        match self.ticket(headers, room) {
            Some(ticket) => Holding::Ticket(ticket.ticket),
            None => Holding::Nothing,
        }
    }

    /// An admitted request: forward it, renew its token when due, and end the session when
    /// the upstream says so.
    async fn admitted(
        &self,
        room: &Arc<Room>,
        admission: &Admission,
        request: Request<Incoming>,
        connection: &Connection,
        path: &CanonicalPath,
    ) -> Result<Response<Body>, GateError> {
        let forwarded = self.forward(request, connection, path, Some((room, &admission.visitor))).await?;
        let mut response = forwarded.response;
        if admission.ticket == 0 {
            return Ok(response); // a token minted outside any session (`vestibule token`)
        }
        let now = self.clock.now_ms();
        let expires_at = admission.expires_at * 1_000;
        if forwarded.session_ended {
            room.end_session(admission.ticket, expires_at);
            append_cookie(&mut response, self.clear_cookie(&room.token_cookie));
            return Ok(response);
        }
        room.session_used(admission.ticket, expires_at, &admission.used, now);
        let session_seconds = room.limits().session_ms / 1_000;
        let left = admission.expires_at.saturating_sub(now / 1_000);
        // Renewal needs the store; an admitted visitor never waits on a store that is away.
        if left * 2 < session_seconds && room.is_available() {
            let until = now + room.limits().session_ms;
            let limits = room.limits();
            let renewal = self.store.renew(&room.id, &limits, admission.ticket, until, now);
            if let Ok(Ok(true)) = tokio::time::timeout(RENEW_WAIT, renewal).await {
                let place = (admission.ticket, admission.line);
                if let Ok(token) = self.tokens.mint(&room.id, &admission.visitor, place.0, place.1, until / 1_000) {
                    append_cookie(&mut response, self.cookie(&room.token_cookie, &token, session_seconds));
                }
            }
        }
        Ok(response)
    }

    /// A protected request without a valid token: redeem the visitor's ticket, keep them
    /// waiting, or put them in line.
    async fn enter(
        &self,
        room: &Arc<Room>,
        request: Request<Incoming>,
        connection: &Connection,
        client: std::net::IpAddr,
        path: &CanonicalPath,
    ) -> Result<Response<Body>, GateError> {
        let now = self.clock.now_ms();
        let mut why = None;
        if let Some(ticket) = self.ticket(request.headers(), room) {
            let start = ticket.ticket.saturating_sub(ticket.cursor_at_join.unwrap_or(0));
            // While the store is away, a waiter keeps their place on a paused page.
            if !room.is_available() {
                return Ok(self.waiting(room, ticket.ticket, start, None, &request, None));
            }
            let absence = room.absence(now);
            let redeemed = match self.store.redeem(&room.id, &room.limits(), ticket.ticket, now, absence).await {
                Ok(redeemed) => redeemed,
                Err(error) => {
                    store_failed(room, &error);
                    // If the store carried it out, nobody got the token: say so when it is back.
                    room.unanswered(ticket.ticket);
                    return Ok(self.waiting(room, ticket.ticket, start, None, &request, None));
                }
            };
            match redeemed {
                Redeemed::Pending => {
                    // Redeemed a moment ago and not used yet: its holder whose answer was lost
                    // (the session is theirs again once that is known), or a copy. Either way,
                    // ask again in a moment.
                    let mut response = self.waiting(room, ticket.ticket, start, None, &request, None);
                    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(PENDING_RETRY_SECONDS));
                    return Ok(response);
                }
                Redeemed::Admitted { expires_at } => {
                    room.observe_cursor(ticket.ticket);
                    return self
                        .admit(room, &ticket.visitor, Place::of(&ticket), expires_at, request, connection, path)
                        .await;
                }
                Redeemed::Waiting { position } => {
                    room.observe_cursor(ticket.ticket.saturating_sub(position));
                    return Ok(self.waiting(room, ticket.ticket, start, None, &request, None));
                }
                Redeemed::Gone(gone) => why = Some(gone),
            }
        }
        let snapshot = room.snapshot();
        if snapshot.state == RoomState::Closed {
            let mut response =
                self.page_response(room, Holding::Nothing, 0, None, &request, StatusCode::SERVICE_UNAVAILABLE);
            append_cookie(&mut response, self.clear_cookie(&room.ticket_cookie));
            return Ok(response);
        }
        // Nobody joins a line the store cannot keep: come back shortly.
        if !snapshot.available {
            return Err(GateError::Unavailable { retry_after_seconds: STORE_RETRY_SECONDS });
        }
        // A room that asks for a proof of work gets one first, then a new ticket is at most
        // one of `joins_per_address_per_minute` from the client's address.
        let proof = match room.challenge {
            None => None,
            Some(difficulty) => match self.proof(room, &request, client, difficulty, now) {
                Ok(id) => Some(id),
                Err(refused) => return Ok(self.challenge(room, client, difficulty, refused, &request, now)),
            },
        };
        room.joins.take(client, now).map_err(|retry_after_seconds| GateError::TooManyJoins { retry_after_seconds })?;
        let admit_now = snapshot.state == RoomState::Open;
        let visitor = random_id();
        let joined = match self.store.join_with_proof(&room.id, &room.limits(), admit_now, now, proof).await {
            Ok(joined) => joined,
            Err(StoreError::ProofReused) => {
                let difficulty = room.challenge.unwrap_or_default();
                return Ok(self.challenge(room, client, difficulty, Refused::Reused, &request, now));
            }
            Err(error) => {
                store_failed(room, &error);
                return Err(GateError::Unavailable { retry_after_seconds: STORE_RETRY_SECONDS });
            }
        };
        // The line the ticket belongs to, as the join's answer told the store.
        let line = self.store.line(&room.id);
        room.observe_line(line);
        match joined {
            Joined::Admitted { ticket, expires_at } => {
                room.observe_cursor(ticket);
                self.admit(room, &visitor, Place { ticket, line }, expires_at, request, connection, path).await
            }
            Joined::Waiting { ticket } => {
                let cursor = snapshot.cursor.min(ticket.saturating_sub(1));
                let cookie = self
                    .tokens
                    .mint_ticket(&room.id, &visitor, ticket, line, cursor, TICKET_LIFETIME)
                    .map_err(|_| GateError::Unavailable { retry_after_seconds: RETRY_SECONDS })?;
                let cookie = self.cookie(&room.ticket_cookie, &cookie, TICKET_LIFETIME.as_secs());
                let why = why.and_then(page::why);
                Ok(self.waiting(room, ticket, ticket - cursor, why, &request, Some(cookie)))
            }
        }
    }

    /// The request's proof of work for `room` (the `Vestibule-Pow` header, or the cookie the
    /// waiting page sets), checked and taken: its id.
    fn proof(
        &self,
        room: &Room,
        request: &Request<Incoming>,
        client: std::net::IpAddr,
        difficulty: u8,
        now: u64,
    ) -> Result<u128, Refused> {
        let headers = request.headers();
        let from_header = headers.get(&challenge::HEADER).and_then(|v| v.to_str().ok());
        let solution = from_header.or_else(|| cookies(headers, &room.proof_cookie).next()).ok_or(Refused::Missing)?;
        let id = self.pow.check(&room.id, client, solution, difficulty, now)?;
        if !room.proofs.take(id, now) {
            return Err(Refused::Reused);
        }
        Ok(id)
    }

    /// A new challenge: the page that solves it in the browser, or for API clients `403` with
    /// the challenge as JSON. Nothing joins the line.
    fn challenge(
        &self,
        room: &Room,
        client: std::net::IpAddr,
        difficulty: u8,
        refused: Refused,
        request: &Request<Incoming>,
        now: u64,
    ) -> Response<Body> {
        let challenge = self.pow.issue(&room.id, client, now);
        let mut response = if wants_page(request) {
            let mut response =
                Response::new(body::full(page::render_challenge(&challenge, difficulty, &room.proof_cookie)));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            response.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"),
            );
            response
        } else {
            let mut response = json_response(&serde_json::json!({
                "status": "challenge",
                "challenge": challenge,
                "difficulty": difficulty,
                "algorithm": "sha256",
                "solution": "<challenge>.<nonce>: SHA-256 of it starts with `difficulty` zero bits",
                "header": challenge::HEADER.as_str(),
                "expires_in": challenge::LIFETIME_MS / 1_000,
                "refused": (refused != Refused::Missing).then(|| refused.to_string()),
            }));
            *response.status_mut() = StatusCode::FORBIDDEN;
            response
        };
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        append_cookie(&mut response, self.clear_cookie(&room.proof_cookie));
        response
    }

    /// Forward a visitor whose turn it is, with a fresh token as a cookie.
    #[allow(clippy::too_many_arguments)]
    async fn admit(
        &self,
        room: &Arc<Room>,
        visitor: &str,
        place: Place,
        expires_at_ms: u64,
        request: Request<Incoming>,
        connection: &Connection,
        path: &CanonicalPath,
    ) -> Result<Response<Body>, GateError> {
        let ticket = place.ticket;
        let token = self
            .tokens
            .mint(&room.id, visitor, ticket, place.line, expires_at_ms / 1_000)
            .map_err(|_| GateError::Unavailable { retry_after_seconds: RETRY_SECONDS })?;
        let had_ticket = cookies(request.headers(), &room.ticket_cookie).next().is_some();
        let wants_json = !wants_page(&request);
        // The session exists from here on: even when the upstream fails, the visitor keeps
        // the token (and their slot) rather than losing both with the error page.
        // Confirmed at once: the visitor holds the token from here on.
        room.session_in_use(ticket, expires_at_ms);
        let (mut response, session_ended) = match self.forward(request, connection, path, Some((room, visitor))).await {
            Ok(forwarded) => (forwarded.response, forwarded.session_ended),
            Err(error) => (error.into_response(wants_json), false),
        };
        if session_ended {
            room.end_session(ticket, expires_at_ms);
        } else {
            let lifetime = room.limits().session_ms / 1_000;
            append_cookie(&mut response, self.cookie(&room.token_cookie, &token, lifetime));
        }
        if had_ticket {
            append_cookie(&mut response, self.clear_cookie(&room.ticket_cookie));
        }
        Ok(response)
    }

    /// The waiting answer: the page for browsers, 503 with the status JSON for the rest.
    fn waiting(
        &self,
        room: &Room,
        ticket: u64,
        start_position: u64,
        why: Option<&str>,
        request: &Request<Incoming>,
        set_ticket: Option<HeaderValue>,
    ) -> Response<Body> {
        room.touch(ticket);
        let status = if wants_page(request) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        let mut response = self.page_response(room, Holding::Ticket(ticket), start_position, why, request, status);
        if let Some(cookie) = set_ticket {
            append_cookie(&mut response, cookie);
        }
        response
    }

    /// The waiting or closed page (HTML), or the status JSON with 503 and `Retry-After`.
    fn page_response(
        &self,
        room: &Room,
        holding: Holding,
        start_position: u64,
        why: Option<&str>,
        request: &Request<Incoming>,
        status: StatusCode,
    ) -> Response<Body> {
        let current = room.status(holding);
        let mut response = if wants_page(request) {
            let mut response = Response::new(body::full(page::render(&room.id, &current, start_position, why)));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            response.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'",
                ),
            );
            response
        } else {
            json_response(&current)
        };
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_SECONDS));
        }
        response
    }

    /// vestibule's own endpoints under `/_vestibule/`.
    async fn reserved(
        &self,
        endpoint: String,
        mut request: Request<Incoming>,
        client: std::net::IpAddr,
    ) -> Result<Response<Body>, GateError> {
        let method = request.method().clone();
        if endpoint == "jwks.json" {
            if method != Method::GET && method != Method::HEAD {
                return Err(GateError::MethodNotAllowed);
            }
            let mut response = Response::new(body::full(self.tokens.ring().jwks()));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/jwk-set+json"));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
            return Ok(response);
        }
        if !matches!(endpoint.as_str(), "status" | "leave" | "ws") {
            return Err(GateError::NotFound);
        }
        let room_id = query_param(request.uri(), "room").ok_or(GateError::BadRequest("Name the room: ?room=ID"))?;
        let room = self.room_by_id(&room_id).ok_or(GateError::NotFound)?.clone();
        match (endpoint.as_str(), method) {
            ("status", Method::GET) => {
                let holding = self.holding(request.headers(), &room);
                if let Holding::Ticket(ticket) = holding {
                    room.touch(ticket);
                }
                let mut response = json_response(&room.status(holding));
                response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                Ok(response)
            }
            ("leave", Method::POST) => {
                // Answered at once, whatever the store is doing: the room tells it at its next
                // step, or when it is back.
                if let Some(admission) = self.admission(request.headers(), &room) {
                    room.end_session(admission.ticket, admission.expires_at * 1_000);
                }
                if let Some(ticket) = self.ticket(request.headers(), &room) {
                    room.give_up(ticket.ticket);
                }
                let mut response = json_response(&room.status(Holding::Nothing));
                append_cookie(&mut response, self.clear_cookie(&room.token_cookie));
                append_cookie(&mut response, self.clear_cookie(&room.ticket_cookie));
                Ok(response)
            }
            ("ws", Method::GET) => {
                if request.version() != Version::HTTP_11 {
                    return Err(GateError::BadRequest("The feed is a websocket over HTTP/1.1."));
                }
                let response = feed::switching_protocols(request.headers())?;
                let holding = self.holding(request.headers(), &room);
                let slot =
                    self.feeds.admit(client).ok_or(GateError::Unavailable { retry_after_seconds: RETRY_SECONDS })?;
                if let Holding::Ticket(ticket) = holding {
                    room.touch(ticket);
                    room.refresh(&self.store, self.clock.now_ms()).await;
                }
                let on_upgrade = hyper::upgrade::on(&mut request);
                let stop = self.stop.clone();
                self.tasks.spawn(async move {
                    if let Ok(upgraded) = on_upgrade.await {
                        feed::serve(upgraded, room, holding, stop, slot).await;
                    }
                });
                Ok(response)
            }
            _ => Err(GateError::MethodNotAllowed),
        }
    }

    /// Forward a request upstream: filtered headers, canonical path, streamed body.
    async fn forward(
        &self,
        mut request: Request<Incoming>,
        connection: &Connection,
        path: &CanonicalPath,
        admitted: Option<(&Room, &str)>,
    ) -> Result<Forwarded, GateError> {
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
        if let Some((room, visitor)) = admitted {
            let visitor = HeaderValue::from_str(visitor).map_err(|_| GateError::BadRequest("Invalid visitor."))?;
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
        let upgrade = on_upgrade.map(|client_side| (client_side, connection.permit.clone()));
        self.upstream.send(Request::from_parts(parts, body), upgrade).await
    }

    /// A `Set-Cookie` value: HttpOnly, SameSite=Lax, Secure over TLS.
    fn cookie(&self, name: &str, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.secure_cookies { "; Secure" } else { "" };
        let text = format!("{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}");
        HeaderValue::from_str(&text).expect("tokens and room ids are valid in a cookie")
    }

    fn clear_cookie(&self, name: &str) -> HeaderValue {
        self.cookie(name, "", 0)
    }
}

/// How often the listener publishes a beat on its own channel, and how long it may go unheard
/// before the subscription counts as dead (a half-open connection delivers nothing and never
/// says so).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(3);

/// Apply what other instances announce to this one's rooms, until `stop`: sessions ended
/// elsewhere, and the leader's cursor moves (fanned out to this instance's waiters from
/// memory). A subscription lost, or silent on this instance's own heartbeat, is made again
/// with backoff, then the sessions that ended meanwhile are caught up on.
async fn listen_to_rooms(store: Arc<Store>, rooms: Vec<Arc<Room>>, clock: Clock, stop: CancellationToken) {
    use futures_util::StreamExt;
    let Store::Redis(redis) = &*store else { return };
    let ids: Vec<String> = rooms.iter().map(|room| room.id.clone()).collect();
    let revocations: Vec<String> = ids.iter().map(|id| crate::store::revocations_channel(id)).collect();
    let cursors: Vec<String> = ids.iter().map(|id| crate::store::cursor_channel(id)).collect();
    let heartbeat = format!("vestibule:heartbeat:{}", redis.instance());
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        // Until subscribed, the rooms read the store every step instead.
        rooms.iter().for_each(|room| room.set_hearing(false));
        let subscribed = async {
            let messages = redis.subscribe(&ids, &heartbeat).await?;
            for room in &rooms {
                for (ticket, until) in redis.ended_sessions(&room.id, clock.now_ms()).await? {
                    room.revoke(ticket, until);
                }
            }
            Ok::<_, StoreError>(messages)
        };
        let mut messages = match subscribed.await {
            Ok(messages) => {
                backoff = Duration::from_millis(100);
                rooms.iter().for_each(|room| room.set_hearing(true));
                messages
            }
            Err(error) => {
                if backoff == Duration::from_millis(100) {
                    tracing::warn!(%error, "cannot subscribe to the rooms' announcements; trying again");
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                // Soon: while unsubscribed, every room reads the store every step.
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        let mut beats = tokio::time::interval(HEARTBEAT_EVERY);
        beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first beat published since the last one heard: the subscription must hear it.
        let mut unheard: Option<tokio::time::Instant> = None;
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = beats.tick() => {
                    if unheard.is_some_and(|since| since.elapsed() > HEARTBEAT_DEADLINE) {
                        tracing::warn!("the rooms' announcements went silent; subscribing again");
                        break;
                    }
                    // A beat Redis did not take says nothing of the subscription.
                    if redis.publish(&heartbeat, "beat").await.is_ok() && unheard.is_none() {
                        unheard = Some(tokio::time::Instant::now());
                    }
                    continue;
                }
                () = stop.cancelled() => return,
            };
            let Some(message) = message else { break };
            let channel = message.get_channel_name();
            if channel == heartbeat {
                unheard = None;
                continue;
            }
            let Ok(payload) = message.get_payload::<String>() else { continue };
            if let Some(room) = revocations.iter().position(|c| c == channel) {
                if let Some((ticket, until)) = crate::store::parse_ended(&payload) {
                    rooms[room].revoke(ticket, until);
                }
            } else if let Some(room) = cursors.iter().position(|c| c == channel) {
                if let Ok(cursor) = payload.parse::<u64>() {
                    redis.observe_cursor(&rooms[room].id, cursor);
                    rooms[room].observe_cursor(cursor);
                }
            }
        }
    }
}

/// Values of the cookies named `name`, from every `Cookie` header.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(move |(cookie, _)| *cookie == name)
        .map(|(_, value)| value)
}

fn append_cookie(response: &mut Response<Body>, cookie: HeaderValue) {
    response.headers_mut().append(header::SET_COOKIE, cookie);
}

fn json_response(value: &impl serde::Serialize) -> Response<Body> {
    let text = serde_json::to_string(value).expect("status documents serialize");
    let mut response = Response::new(body::full(text));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `Retry-After` when the store cannot take a visitor in line now.
const STORE_RETRY_SECONDS: u32 = 5;
/// `Retry-After` for a turn being settled (redeemed a moment ago, not used yet).
const PENDING_RETRY_SECONDS: u32 = 1;

/// A store call failed: the room pauses until its next step succeeds. An outage is a warning;
/// anything else (a script error) is a bug, logged as one.
fn store_failed(room: &Room, error: &StoreError) {
    match error {
        StoreError::Unavailable(_) => tracing::warn!(room = %room.id, %error, "store unavailable"),
        StoreError::Failed(_) => tracing::error!(room = %room.id, %error, "the store refused a call (a bug?)"),
        _ => return,
    }
    room.store_failed();
}

/// One query parameter, percent-decoded.
fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').filter_map(|pair| pair.split_once('=')).find(|(key, _)| *key == name).and_then(
        |(_, value)| {
            let value = percent_encoding::percent_decode_str(value).decode_utf8().ok()?;
            (!value.is_empty() && value.len() <= 64).then(|| value.into_owned())
        },
    )
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

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("rooms", &self.rooms.len()).finish_non_exhaustive()
    }
}
