//! The gate: for every request, one decision — forward it, or let the line decide — and then
//! the step that carries it out. A reader sees the whole gate in [`Gate::serve`].
//!
//! - `mod.rs`: the decision, admitted requests, forwarding, the rooms and keys in force
//!   (replaced whole on a reload), and what other instances announce.
//! - `entry.rs`: a protected request without a valid token: the line's one store call, then
//!   the answer.
//! - `respond.rs`: the gate's own answers and the one place cookies are set or cleared.
//! - `reserved.rs`: the `/_vestibule/` endpoints.
//! - `origin.rs`: requests made by a page of another site.

mod entry;
pub mod origin;
mod reload;
mod reserved;
pub(crate) mod respond;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ipnet::IpNet;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::timeout::TimeoutBody;
use tracing::Instrument;

use crate::body::{self, Body};
use crate::clock::Clock;
use crate::config::{Config, CookieSecure, RoomConfig, RoomState};
use crate::error::{wants_page, GateError};
use crate::forward::{Forwarded, Upgrade, Upstream};
use crate::framing::{Verdict, Verdicts};
use crate::hop::{self, Peer};
use crate::limit::{Slot, Slots};
use crate::metrics::{Metrics, Outcome};
use crate::path::{canonicalize, CanonicalPath};
use crate::room::{run_scheduler, Holding, Room};
use crate::slow::StallGuard;
use crate::store::{Announcement, Store, StoreError};
use crate::token::{Admission, Tokens};
pub use reload::Reloaded;
pub use reserved::{RESERVED_PREFIX, WELL_KNOWN_JWKS};
pub(crate) use respond::Cookies;

/// How often the store is asked whether it answers, when nothing else asked it.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The store is up (readiness, `vestibule_store_up`) when it answered within this.
pub const STORE_RECENT: Duration = Duration::from_secs(3);

/// The longest an admitted request waits for its session's renewal in the store; a renewal
/// that does not come in time is tried again on the next request.
const RENEW_WAIT: Duration = Duration::from_millis(200);

/// One guarded prefix, normalized (lower-case unless the room is case-sensitive).
struct Guard {
    prefix: String,
    case_sensitive: bool,
    room: usize,
}

impl Guard {
    /// Whether the guard covers `path` (canonical, lower-case unless case-sensitive): every
    /// path that starts with its prefix, and for a prefix written with a trailing slash
    /// (`/checkout/`) the path without it too (`/checkout`), which would otherwise pass.
    fn guards(&self, path: &str) -> bool {
        path.starts_with(&self.prefix)
            || self.prefix.strip_suffix('/').is_some_and(|bare| !bare.is_empty() && path == bare)
    }
}

/// The rooms in force and the paths they guard, replaced whole on a reload.
struct Routing {
    rooms: Vec<Arc<Room>>,
    /// Longest prefix first, so the most specific room wins.
    guards: Vec<Guard>,
}

impl Routing {
    fn new(rooms: Vec<Arc<Room>>) -> Routing {
        let mut guards: Vec<Guard> = rooms
            .iter()
            .enumerate()
            .flat_map(|(index, room)| {
                let config = room.settings().config.clone();
                config.paths.into_iter().map(move |prefix| Guard {
                    prefix,
                    case_sensitive: config.case_sensitive,
                    room: index,
                })
            })
            .collect();
        guards.sort_by_key(|guard| std::cmp::Reverse(guard.prefix.len()));
        Routing { rooms, guards }
    }
}

/// What the gate knows about the client connection a request came on.
#[derive(Debug, Clone)]
pub struct Connection {
    pub peer: SocketAddr,
    /// The forwarding headers' view of the peer, made once per connection.
    pub forwarded: Peer,
    pub verdicts: Verdicts,
    /// The connection's place under the connection caps: an upgraded tunnel keeps it after
    /// the connection is handed over (freed when both are done).
    pub permit: Option<Arc<crate::limit::ConnectionPlace>>,
    /// Cancelled to close the connection at once (an HTTP/2 stream its client stalled).
    pub cut: CancellationToken,
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
pub enum Decision {
    /// Forward; with the room and admission when the path is inside a room.
    Forward(Option<(Arc<Room>, Arc<Admission>)>),
    /// Inside a room, without a valid token: the line decides.
    Wait(Arc<Room>),
    /// Inside a room, let through by its bypass rules: forwarded, not counted against it.
    Bypass(Arc<Room>),
}

/// Everything a request needs, shared by all connections.
pub struct Gate {
    routing: ArcSwap<Routing>,
    tokens: ArcSwap<Tokens>,
    upstream: ArcSwap<Upstream>,
    store: Arc<Store>,
    clock: Clock,
    feeds: Arc<Slots>,
    /// Requests in flight through trusted proxies, per client they name: their share of
    /// `server.max_connections_per_address`.
    proxied: Arc<Slots>,
    /// Refused and failed requests, for the log's summary.
    refusals: Arc<crate::refusals::Refusals>,
    /// Feed sockets, schedulers, the announcement listener: owned, ended by `stop`.
    tasks: TaskTracker,
    /// Upgraded tunnels, across reloads of the upstream.
    tunnels: TaskTracker,
    stop: CancellationToken,
    /// The ids of the rooms in force, for the store's announcements.
    room_ids: watch::Sender<Vec<String>>,
    trusted_proxies: Vec<IpNet>,
    max_body_bytes: u64,
    body_read_timeout: Duration,
    /// `server.send_timeout`, which an HTTP/2 stream's body is held to ([`StallGuard`]).
    send_timeout: Duration,
    /// `server.cookie_secure`.
    cookie_secure: CookieSecure,
    /// The configuration in force (the last one loaded), for reloads to compare with.
    config: ArcSwap<Config>,
    metrics: Arc<Metrics>,
    /// `[log] access`: one line per request.
    access_log: AtomicBool,
}

/// What became of a request: counted, and logged when the access log is on.
#[derive(Default)]
pub(crate) struct Trail {
    room: Option<Arc<Room>>,
    outcome: Option<Outcome>,
    /// The canonical path (kept only for the access log).
    path: Option<String>,
    /// How long the upstream took to the response head, when it answered (what adaptive
    /// admission listens to: not the client's download, not the gate's own store calls).
    upstream_took: Option<std::time::Duration>,
    /// The upstream answered (its time may be unknown: `upstream_took`).
    answered: bool,
}

impl Trail {
    /// A request forwarded (admitted when inside a room).
    pub(crate) fn forwarded(room: Option<Arc<Room>>, path: Option<String>) -> Trail {
        let outcome = Some(if room.is_some() { Outcome::Admitted } else { Outcome::Forwarded });
        Trail { room, outcome, path, upstream_took: None, answered: false }
    }

    /// The upstream answered after `took` (to its response head, from the end of the
    /// request's upload; `None` when it answered during the upload: no reading of it).
    pub(crate) fn answered_after(&mut self, took: impl Into<Option<std::time::Duration>>) {
        self.upstream_took = took.into();
        self.answered = true;
    }

    /// A request let through by a room's bypass rules; logged, as each one is.
    pub(crate) fn bypassed(room: &Arc<Room>, client: IpAddr, path: Option<String>) -> Trail {
        tracing::info!(room = %room.id, %client, "let through by the room's bypass rules");
        Trail { room: Some(room.clone()), outcome: Some(Outcome::Bypassed), path, upstream_took: None, answered: false }
    }

    /// The request was answered with `error`.
    pub(crate) fn failed(&mut self, error: &GateError) {
        self.outcome = Some(match (error, self.outcome) {
            (GateError::UpstreamUnreachable | GateError::UpstreamTimeout, _) => Outcome::UpstreamFailed,
            (GateError::Unavailable { .. }, _) => Outcome::Unavailable,
            (_, Some(Outcome::Reserved)) => Outcome::Reserved,
            _ => Outcome::Refused,
        });
    }
}

impl Gate {
    /// Build the gate from a validated configuration and its store. `stop` ends feeds,
    /// schedulers and upgraded tunnels.
    pub fn new(config: &Config, store: Store, stop: CancellationToken, metrics: Arc<Metrics>) -> anyhow::Result<Gate> {
        let tokens = Tokens::new(&config.tokens)?;
        let secret = tokens.ring().event_secret();
        let rooms: Vec<Arc<Room>> = config.rooms.iter().map(|c| new_room(c, &stop, &metrics, secret)).collect();
        for room in &rooms {
            // Known at once in memory; with Redis, at the first read.
            room.learn_line(&store);
        }
        let server = &config.server;
        let tunnels = TaskTracker::new();
        let ids = rooms.iter().map(|room| room.id.clone()).collect();
        Ok(Gate {
            routing: ArcSwap::from_pointee(Routing::new(rooms)),
            tokens: ArcSwap::from_pointee(tokens),
            upstream: ArcSwap::from_pointee(Upstream::new(
                &config.upstream,
                stop.clone(),
                tunnels.clone(),
                metrics.upstream(),
            )?),
            store: Arc::new(store),
            clock: Clock::new(),
            feeds: Slots::new(server.max_feed_sockets, server.max_feed_sockets_per_address),
            proxied: Slots::new(usize::MAX, server.max_connections_per_address.get()),
            refusals: Arc::default(),
            tasks: TaskTracker::new(),
            tunnels,
            stop,
            room_ids: watch::Sender::new(ids),
            trusted_proxies: server.trusted_proxies.clone(),
            max_body_bytes: server.max_body_bytes,
            body_read_timeout: server.body_read_timeout,
            send_timeout: server.send_timeout,
            cookie_secure: server.cookie_secure,
            config: ArcSwap::from_pointee(config.clone()),
            metrics,
            access_log: AtomicBool::new(config.log.access),
        })
    }

    /// Start one scheduler per room, and follow what other instances announce.
    pub fn start(self: &Arc<Self>) {
        for room in self.rooms() {
            self.start_scheduler(&room);
        }
        let announcements = self.store.announcements(self.room_ids.subscribe(), &self.tasks, self.stop.clone());
        let gate = self.clone();
        self.tasks.spawn(async move { gate.follow(announcements).await });
        let gate = self.clone();
        self.tasks.spawn(async move { gate.probe_store().await });
        let gate = self.clone();
        self.tasks.spawn(async move { gate.refusals.report(gate.stop.clone()).await });
    }

    /// Ask the store whether it answers whenever nothing else did for a second (no room, or
    /// the steps are between reads), so that readiness and `vestibule_store_up` are current.
    async fn probe_store(&self) {
        let mut ticks = tokio::time::interval(PROBE_EVERY);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = self.stop.cancelled() => return,
            }
            if !self.store.answered_within(PROBE_EVERY) {
                let _ = self.store.ping().await;
            }
        }
    }

    /// Whether the store answered lately (always, for the memory store).
    pub fn store_answers(&self) -> bool {
        self.store.answered_within(STORE_RECENT)
    }

    /// Whether the store is up as visitors see it: it answered lately and no room's line is
    /// paused for want of it (`vestibule_store_up`, `/readyz`'s `store`).
    pub fn store_up(&self) -> bool {
        self.store_answers() && self.rooms().iter().all(|room| room.is_available())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn start_scheduler(&self, room: &Arc<Room>) {
        let task = run_scheduler(room.clone(), self.store.clone(), self.clock, room.stop_token().clone());
        self.tasks.spawn(task);
    }

    /// Apply what other instances announce to this one's rooms: cursor moves (fanned out to
    /// this instance's waiters from memory), ended sessions, changed live settings.
    async fn follow(&self, mut announcements: tokio::sync::mpsc::Receiver<Announcement>) {
        while let Some(announcement) = announcements.recv().await {
            match announcement {
                Announcement::Hearing(hearing) => self.rooms().iter().for_each(|room| room.set_hearing(hearing)),
                Announcement::Cursor { room, cursor } => {
                    if let Some(room) = self.room_by_id(&room) {
                        room.observe_cursor(cursor);
                    }
                }
                Announcement::SessionEnded { room, ticket, until } => {
                    if let Some(room) = self.room_by_id(&room) {
                        room.revoke(ticket, until);
                    }
                }
                Announcement::LeaseFree { room } => {
                    if let Some(room) = self.room_by_id(&room) {
                        room.lease_freed();
                    }
                }
                Announcement::Settings { room, version } => {
                    let Some(room) = self.room_by_id(&room) else { continue };
                    if version > room.settings().version {
                        let now = self.clock.now_ms();
                        if let Err(error) = room.read_overrides(&self.store, now).await {
                            // The next step reads them (the version is in every report).
                            tracing::warn!(room = %room.id, %error, "cannot read changed settings");
                        }
                    }
                }
            }
        }
    }

    /// Ends feeds, schedulers and tunnels.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Feed sockets, schedulers and the listener still running.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Upgraded tunnels still open.
    pub fn tunnels(&self) -> &TaskTracker {
        &self.tunnels
    }

    /// The client's address for a request on `connection` (docs/design.md, security rules): the peer, or what a
    /// trusted proxy says of it. Every per-address limit and log line uses it.
    pub fn client(&self, headers: &HeaderMap, connection: &Connection) -> IpAddr {
        if !connection.forwarded.trusted {
            return connection.peer.ip();
        }
        hop::client_address(connection.peer.ip(), &self.trusted_proxies, headers)
    }

    /// Whether `peer` is one of `server.trusted_proxies` (an IPv4-mapped IPv6 address as the
    /// IPv4 address it is).
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }

    /// The per-connection state for a client at `peer`.
    pub fn connection(
        &self,
        peer: SocketAddr,
        tls: bool,
        verdicts: Verdicts,
        permit: Option<crate::limit::ConnectionPlace>,
    ) -> Connection {
        // A `[::]` listener sees IPv4 clients as `::ffff:a.b.c.d`: the address they are, so
        // that IPv4 `trusted_proxies` and bypass ranges match them.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let trusted = self.trusts(peer.ip());
        Connection {
            peer,
            forwarded: Peer::new(peer.ip(), tls, trusted),
            verdicts,
            permit: permit.map(Arc::new),
            cut: CancellationToken::new(),
        }
    }

    /// The cookie changes of an answer to a request with `headers` on `connection`: `Secure`
    /// as `server.cookie_secure` says (for `auto`: TLS here, or a trusted proxy's
    /// `X-Forwarded-Proto: https`, its left-most value being the client's side).
    pub(crate) fn cookies(&self, headers: &HeaderMap, connection: &Connection) -> Cookies {
        let secure = match self.cookie_secure {
            CookieSecure::Always => true,
            CookieSecure::Never => false,
            CookieSecure::Auto => {
                connection.forwarded.tls
                    || (connection.forwarded.trusted
                        && headers
                            .get(&hop::X_FORWARDED_PROTO)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.split(',').next())
                            .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https")))
            }
        };
        Cookies::new(secure)
    }

    /// The keys in force.
    pub fn tokens(&self) -> Arc<Tokens> {
        self.tokens.load_full()
    }

    /// The upstream in force.
    pub fn upstream(&self) -> Arc<Upstream> {
        self.upstream.load_full()
    }

    /// The rooms in force.
    pub fn rooms(&self) -> Vec<Arc<Room>> {
        self.routing.load().rooms.clone()
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Feed sockets open now.
    pub fn open_feeds(&self) -> usize {
        self.feeds.open()
    }

    /// Handle one request; every failure becomes a response here. Each request is counted
    /// by room and outcome, and logged when the access log is on.
    pub async fn handle(&self, mut request: Request<Incoming>, connection: &Connection) -> Response<Body> {
        let started = Instant::now();
        let wants_json = !wants_page(&request);
        let client = self.client(request.headers(), connection);
        let method = request.method().clone();
        let version = request.version();
        let mut trail = Trail::default();
        let span = tracing::debug_span!("request", %client);
        let served = async {
            let slot = self.hold_proxied(connection, client).map_err(|()| {
                self.metrics.connection_limited("public", "proxied_per_address");
                GateError::Unavailable { retry_after_seconds: respond::RETRY_SECONDS }
            })?;
            let slot = slot.map(Arc::new);
            if let Some(slot) = &slot {
                // An upgraded tunnel keeps it too (see `forward`).
                request.extensions_mut().insert(ProxiedSlot(slot.clone()));
            }
            let response = self.serve(request, connection, client, &mut trail).await?;
            // Through a trusted proxy, the client's place is held until its answer is sent.
            Ok(match slot {
                Some(slot) => response.map(|inner| body::boxed(body::Holding::new(inner, slot))),
                None => response,
            })
        };
        let response = match served.instrument(span).await {
            Ok(response) => response,
            Err(error) => {
                self.refused(&mut trail, &error, client);
                error.into_response(wants_json)
            }
        };
        self.record(&trail, &method, client, response.status(), started);
        if version == Version::HTTP_2 {
            // A stream the client grants no window would hold its upstream answer for ever.
            let (metrics, cut) = (self.metrics.clone(), connection.cut.clone());
            let stalled: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                metrics.connection_limited("public", "send_timeout");
                cut.cancel();
            });
            let send_timeout = self.send_timeout;
            return response.map(|body| body::boxed(StallGuard::new(body, send_timeout, stalled)));
        }
        response
    }

    /// The summary of refused requests in the log (the admin listener's too).
    pub fn refusals(&self) -> &crate::refusals::Refusals {
        &self.refusals
    }

    /// A request from `client` answered with `error`: counted in its trail (and so in
    /// metrics), and in the log's summary of refusals, never a line of its own.
    pub(crate) fn refused(&self, trail: &mut Trail, error: &GateError, client: IpAddr) {
        trail.failed(error);
        self.refusals.note(error.reason(), client);
    }

    /// A request that came through a trusted proxy holds a place under its client's
    /// `server.max_connections_per_address` while it is served (the proxy's own connections
    /// are not counted: they carry many clients). `Ok(None)` for any other request, `Err` for
    /// a client at the cap.
    pub(crate) fn hold_proxied(&self, connection: &Connection, client: IpAddr) -> Result<Option<Slot>, ()> {
        match connection.forwarded.trusted {
            false => Ok(None),
            true => self.proxied.admit(client).map(Some).ok_or(()),
        }
    }

    /// Count a request by room and outcome, and log it when the access log is on.
    pub(crate) fn record(&self, trail: &Trail, method: &Method, client: IpAddr, status: StatusCode, started: Instant) {
        let outcome = trail.outcome.unwrap_or(Outcome::Forwarded);
        match &trail.room {
            Some(room) => {
                room.metrics.request(outcome);
                match trail.upstream_took {
                    Some(took) => room.upstream_answered(took, status.is_server_error()),
                    None if outcome == Outcome::UpstreamFailed && !trail.answered => {
                        room.upstream_answered(started.elapsed(), true)
                    }
                    None => {}
                }
            }
            None => self.metrics.outside(outcome),
        }
        if self.access_log.load(Ordering::Relaxed) {
            // Never the query string, a cookie or a token (docs/design.md, security rules).
            tracing::info!(
                target: "vestibule::access",
                method = %method,
                path = trail.path.as_deref().unwrap_or("-"),
                room = trail.room.as_ref().map_or("-", |room| room.id.as_str()),
                outcome = outcome.as_str(),
                status = status.as_u16(),
                duration_ms = started.elapsed().as_secs_f64() * 1_000.0,
                %client,
                "request"
            );
        }
    }

    /// Whether the access log wants each request's path.
    pub(crate) fn logs_paths(&self) -> bool {
        self.access_log.load(Ordering::Relaxed)
    }

    /// The phases of a request: refuse what cannot be judged, decide, carry it out.
    async fn serve(
        &self,
        request: Request<Incoming>,
        connection: &Connection,
        client: IpAddr,
        trail: &mut Trail,
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
        if self.access_log.load(Ordering::Relaxed) {
            trail.path = Some(path.encoded.clone());
        }
        if let Some(endpoint) = path.decoded.strip_prefix(RESERVED_PREFIX) {
            trail.outcome = Some(Outcome::Reserved);
            let endpoint = endpoint.to_owned();
            return self.reserved(&endpoint, request, connection, client).await;
        }
        if path.decoded == WELL_KNOWN_JWKS {
            trail.outcome = Some(Outcome::Reserved);
            return self.reserved("jwks.json", request, connection, client).await;
        }
        match self.decide(request.headers(), &path, client) {
            Decision::Forward(None) => Ok(self.forward(request, connection, &path, None).await?.response),
            Decision::Bypass(room) => {
                *trail = Trail::bypassed(&room, client, trail.path.take());
                let forwarded = self.forward(request, connection, &path, None).await?;
                trail.answered_after(forwarded.took);
                Ok(forwarded.response)
            }
            Decision::Forward(Some((room, admission))) => {
                trail.outcome = Some(Outcome::Admitted);
                trail.room = Some(room.clone());
                self.admitted(&room, &admission, request, connection, &path, trail).await
            }
            Decision::Wait(room) => {
                trail.room = Some(room.clone());
                self.enter(&room, request, connection, client, &path, trail).await
            }
        }
    }

    /// The decision for a request to `path` with these headers, from `client`.
    pub fn decide(&self, headers: &HeaderMap, path: &CanonicalPath, client: IpAddr) -> Decision {
        let Some(room) = self.room_for(&path.decoded) else {
            return Decision::Forward(None);
        };
        if room.state() == RoomState::Passthrough {
            return Decision::Forward(None);
        }
        match self.admission(headers, &room) {
            Some(admission) => Decision::Forward(Some((room, admission))),
            None if room.bypasses(client, headers) => Decision::Bypass(room),
            None => Decision::Wait(room),
        }
    }

    /// The room guarding a canonical path, if any.
    pub fn room_for(&self, path: &str) -> Option<Arc<Room>> {
        let routing = self.routing.load();
        let mut lower = None;
        routing
            .guards
            .iter()
            .find(|guard| {
                let path = if guard.case_sensitive { path } else { lower.get_or_insert_with(|| path.to_lowercase()) };
                guard.guards(path)
            })
            .map(|guard| routing.rooms[guard.room].clone())
    }

    /// The room named `id`, if it is in force.
    pub fn room_by_id(&self, id: &str) -> Option<Arc<Room>> {
        self.routing.load().rooms.iter().find(|room| room.id == id).cloned()
    }

    /// A valid admission for `room` from the `Vestibule-Token` header or the room's cookie
    /// (the first of each only: every further copy would cost a signature check). Invalid
    /// tokens of any kind count as no token.
    fn admission(&self, headers: &HeaderMap, room: &Room) -> Option<Arc<Admission>> {
        let from_header = headers.get(&hop::VESTIBULE_TOKEN).and_then(|v| v.to_str().ok());
        let tokens = self.tokens.load();
        from_header.into_iter().chain(cookies(headers, &room.token_cookie).next()).find_map(|token| {
            match tokens.admit(token, &room.id) {
                // The session has ended (leave, `Vestibule-Session: end`, idle): no longer
                // admitted; or it belongs to a line that was reset.
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
        self.tokens.load().ticket(ticket, &room.id).ok().filter(|ticket| room.same_line(ticket.line))
    }

    /// The pre-queue number the request's ticket cookie holds for `room`, if valid and of
    /// this room's line.
    fn prequeue_ticket(&self, headers: &HeaderMap, room: &Room) -> Option<Arc<Admission>> {
        let ticket = cookies(headers, &room.ticket_cookie).next()?;
        self.tokens.load().prequeue(ticket, &room.id).ok().filter(|ticket| room.same_line(ticket.line))
    }

    /// Let the request's token and ticket for `room` go from the cache of verified tokens:
    /// their holder has left, or has redeemed the ticket.
    pub(crate) fn forget_credentials(&self, headers: &HeaderMap, room: &Room) {
        let tokens = self.tokens.load();
        let from_header = headers.get(&hop::VESTIBULE_TOKEN).and_then(|v| v.to_str().ok());
        from_header
            .into_iter()
            .chain(cookies(headers, &room.token_cookie))
            .chain(cookies(headers, &room.ticket_cookie))
            .for_each(|token| tokens.forget(token));
    }

    /// What a visitor holds for `room`.
    fn holding(&self, headers: &HeaderMap, room: &Room) -> Holding {
        if self.admission(headers, room).is_some() {
            return Holding::Token;
        }
        if let Some(ticket) = self.ticket(headers, room) {
            return Holding::Ticket(ticket.ticket);
        }
        match self.prequeue_ticket(headers, room) {
            Some(ticket) => room.seated(Holding::Prequeue { event: ticket.event.unwrap_or(0), number: ticket.ticket }),
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
        trail: &mut Trail,
    ) -> Result<Response<Body>, GateError> {
        let cookies = self.cookies(request.headers(), connection);
        let forwarded =
            self.forward(request, connection, path, Some((room, &admission.visitor, admission.ticket))).await?;
        trail.answered_after(forwarded.took);
        let cookies = self.settle(room, admission, forwarded.session_ended, cookies).await;
        Ok(cookies.on(forwarded.response))
    }

    /// After an admitted request was answered: end the session when the upstream said so,
    /// note it in use, and renew its token when due. Returns `cookies` with what to set.
    pub(crate) async fn settle(
        &self,
        room: &Room,
        admission: &Admission,
        session_ended: bool,
        cookies: Cookies,
    ) -> Cookies {
        if admission.ticket == 0 {
            return cookies; // a token minted outside any session (`vestibule token`)
        }
        let now = self.clock.now_ms();
        let expires_at = admission.expires_at * 1_000;
        if session_ended {
            room.end_session(admission.ticket, expires_at, now);
            return cookies.clear(&room.token_cookie);
        }
        room.session_used(admission.ticket, expires_at, &admission.used, now);
        let limits = room.limits();
        let session_seconds = limits.session_ms / 1_000;
        let left = admission.expires_at.saturating_sub(now / 1_000);
        // Renewal needs the store; an admitted visitor never waits on a store that is away.
        if left * 2 >= session_seconds || !room.is_available() {
            return cookies;
        }
        let until = now + limits.session_ms;
        let renewal = room.renew(&self.store, admission.ticket, until, now);
        let renewed = match tokio::time::timeout(RENEW_WAIT, renewal).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(format!("no answer within {RENEW_WAIT:?}"))),
        };
        match renewed {
            Ok(true) => room.renewals_work(),
            Ok(false) => return cookies, // the session ended meanwhile
            Err(error) => {
                // Tried again on the next request; said once until renewals work again.
                if room.renewal_failed() {
                    tracing::warn!(
                        room = %room.id, %error,
                        "cannot renew sessions; admitted visitors keep their tokens and renewal is tried again"
                    );
                }
                return cookies;
            }
        }
        match self.tokens().mint(&room.id, &admission.visitor, admission.ticket, admission.line, until / 1_000) {
            Ok(token) => cookies.set(&room.token_cookie, &token, session_seconds),
            Err(error) => {
                tracing::error!(room = %room.id, %error, "cannot sign a renewed token");
                cookies
            }
        }
    }

    /// Forward a request upstream: filtered headers, canonical path, streamed body.
    /// `admitted`: the room, the visitor and the ticket of their session, which an upgraded
    /// tunnel lasts no longer than.
    async fn forward(
        &self,
        mut request: Request<Incoming>,
        connection: &Connection,
        path: &CanonicalPath,
        admitted: Option<(&Arc<Room>, &str, u64)>,
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

        let upstream = self.upstream.load();
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            let authority = parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        let visitor = admitted.map(|(room, visitor, _)| (&**room, visitor));
        self.upstream_headers(&upstream, &mut parts.headers, connection, host, visitor)?;
        if let Some(protocol) = upgrade {
            hop::set_upgrade(&mut parts.headers, protocol);
        }
        parts.uri = upstream.uri_for(&path.encoded, parts.uri.query())?;
        parts.version = Version::HTTP_11;

        // No body: said as such upstream (the timeout's wrapper would hide it).
        let bodiless = http_body::Body::is_end_stream(&incoming);
        let timed = TimeoutBody::new(self.body_read_timeout, incoming);
        let body = if bodiless {
            body::empty()
        } else if self.max_body_bytes > 0 {
            let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
            Limited::new(timed, limit).boxed()
        } else {
            body::boxed(timed)
        };
        let proxied = parts.extensions.remove::<ProxiedSlot>().map(|ProxiedSlot(slot)| slot);
        let upgrade = on_upgrade.map(|client_side| Upgrade {
            client_side,
            place: connection.permit.clone(),
            proxied,
            session_end: admitted.map(|(room, _, ticket)| session_end(room.clone(), ticket)),
        });
        upstream.send(Request::from_parts(parts, body), upgrade).await
    }
}

impl Gate {
    /// A request's headers as they go upstream: hop-by-hop ones removed, the forwarding
    /// headers and, when admitted, the room and visitor set, and `Host` the client's (`host`)
    /// or the upstream's own.
    pub(crate) fn upstream_headers(
        &self,
        upstream: &Upstream,
        headers: &mut HeaderMap,
        connection: &Connection,
        host: Option<HeaderValue>,
        admitted: Option<(&Room, &str)>,
    ) -> Result<(), GateError> {
        let client = self.client(headers, connection);
        hop::strip_hop_by_hop(headers);
        hop::set_forwarding_headers(headers, &connection.forwarded, host.as_ref(), client);
        if let Some((room, visitor)) = admitted {
            let visitor = HeaderValue::from_str(visitor).map_err(|_| GateError::BadRequest("Invalid visitor."))?;
            headers.insert(hop::VESTIBULE_ROOM, HeaderValue::from_str(&room.id).expect("room ids are validated"));
            headers.insert(hop::VESTIBULE_VISITOR, visitor);
        }
        match (upstream.preserve_host(), host) {
            (true, Some(host)) => {
                headers.insert(header::HOST, host);
            }
            _ => {
                let authority = HeaderValue::from_str(upstream.authority().as_str()).expect("a valid authority");
                headers.insert(header::HOST, authority);
            }
        }
        Ok(())
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

/// A store call failed: the room pauses until its next step succeeds, logged once when this
/// call paused it (an outage is a warning; anything else, a script error, a bug).
fn store_failed(room: &Room, store: &Store, error: &StoreError) {
    if matches!(error, StoreError::Unavailable(_) | StoreError::Failed(_)) && room.store_failed() {
        crate::room::store_lost(room, store, error);
    }
}

/// A request's place under its client's connection cap when it came through a trusted proxy:
/// its answer holds it, and so does a tunnel it opens.
#[derive(Clone)]
struct ProxiedSlot(Arc<Slot>);

/// How often a tunnel checks that its session goes on.
const SESSION_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Resolves when the session that `ticket` opened ends (leave, the upstream's end, idleness,
/// revoked anywhere) or its room stops: an upgraded tunnel lasts no longer than that.
fn session_end(room: Arc<Room>, ticket: u64) -> crate::forward::SessionEnd {
    Box::pin(async move {
        if ticket == 0 {
            return std::future::pending().await; // a token outside any session
        }
        let mut every = tokio::time::interval(SESSION_CHECK_EVERY);
        while !room.is_revoked(ticket) && !room.stop_token().is_cancelled() {
            every.tick().await;
        }
    })
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
        f.debug_struct("Gate").field("rooms", &self.routing.load().rooms.len()).finish_non_exhaustive()
    }
}

/// Make a room of `config`, with its scheduler's stop a child of `stop`, drawing its sales'
/// seeds from `event_secret`.
fn new_room(config: &RoomConfig, stop: &CancellationToken, metrics: &Metrics, event_secret: [u8; 32]) -> Arc<Room> {
    let room = Room::new(config, stop.child_token(), metrics.room(&config.id));
    room.sale.set_secret(event_secret);
    Arc::new(room)
}
