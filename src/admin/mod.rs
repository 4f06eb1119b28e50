//! The admin listener (`[admin] listen`, docs/api.md): probes, metrics, each room's live view
//! and controls, reload, and the dashboard. JSON in and out.
//!
//! `GET /healthz`, `GET /readyz`, `GET /metrics` and the dashboard page itself need no token
//! (the page holds no data: it asks for the token and sends it with every call); everything
//! else needs `Authorization: Bearer <token>`, compared in constant time. A bad call gets a
//! 4xx naming the problem (and the field), and changes nothing.

mod history;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{self, Body};
use crate::config::{AdminConfig, ServerConfig};
use crate::gate::Gate;
use crate::line;
use crate::room::settings::Overrides;
use crate::room::Room;
use history::History;

/// Largest request body the admin API reads.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Most turns one `POST /rooms/{id}/admit` grants.
pub const MAX_ADMIT_BATCH: u32 = 100_000;
/// Admin connections open at once.
const MAX_CONNECTIONS: usize = 64;
/// Admin connections open at once from one client address (at most
/// `server.max_connections_per_address`): one slow scraper cannot take the probes' places.
const MAX_CONNECTIONS_PER_ADDRESS: usize = MAX_CONNECTIONS / 4;
/// How long a client has to send its request head, and its body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

const DASHBOARD: &str = include_str!("dashboard.html");

/// What every admin call shares.
/// The token and `admin.hosts` are read from the configuration in force at each call, so that
/// a reload applies them (a leaked token is replaced without a restart).
struct State {
    gate: Arc<Gate>,
    /// Cancelled when a graceful stop begins: readiness says 503 from then on.
    draining: CancellationToken,
    history: History,
}

/// A call that cannot be carried out: its status, what is wrong, and which field.
#[derive(Debug)]
struct Problem {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl Problem {
    fn new(status: StatusCode, message: impl Into<String>) -> Problem {
        Problem { status, message: message.into(), field: None }
    }

    fn field(field: impl Into<String>, message: impl Into<String>) -> Problem {
        let field = field.into();
        let message = format!("{field}: {}", message.into());
        Problem { status: StatusCode::BAD_REQUEST, message, field: Some(field) }
    }

    fn not_found() -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "no such endpoint")
    }

    fn into_response(self) -> Response<Body> {
        let mut response = json(self.status, &json!({ "error": self.message, "field": self.field }));
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Bind the admin listener and serve it until the gate stops (after the drain, so that
/// probes see readiness fail during it). `draining` is cancelled when a graceful stop begins.
pub async fn start(
    config: &AdminConfig,
    server: &ServerConfig,
    gate: Arc<Gate>,
    draining: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", config.listen))?;
    let addr = listener.local_addr()?;
    config.token.as_ref().context("admin.token: missing")?;
    let state = Arc::new(State { gate: gate.clone(), draining, history: History::default() });
    let stop = gate.stop_token().clone();
    gate.tasks().spawn(history::sample(state.gate.clone(), state.history.clone(), stop.clone()));
    let caps = crate::server::Caps {
        total: MAX_CONNECTIONS,
        per_address: MAX_CONNECTIONS_PER_ADDRESS.min(server.max_connections_per_address.get()),
        send_timeout: server.send_timeout,
        trusted_uncounted: false,
    };
    let acceptor = crate::server::Acceptor::new(listener, "admin", caps, false, &gate);
    gate.tasks().spawn(accept(acceptor, state, stop));
    tracing::info!(%addr, "admin listening");
    Ok(addr)
}

/// Serve the admin listener's connections, HTTP/1.1 only, until `stop`.
async fn accept(acceptor: crate::server::Acceptor, state: Arc<State>, stop: CancellationToken) {
    while let Some(crate::server::Admitted { stream, peer, place }) = acceptor.next(&stop).await {
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _place = place;
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, request, peer.ip()).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Whether the admin listener answers a request for `host` (a `Host` value, with or
/// without a numeric port): an IP literal, `localhost`, or one of `admin.hosts`.
fn host_answered(host: &str, hosts: &[String]) -> bool {
    let port_ok =
        |port: Option<&str>| port.is_none_or(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
    if let Some(rest) = host.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else { return false };
        let port = after.strip_prefix(':');
        return v6.parse::<std::net::Ipv6Addr>().is_ok() && (after.is_empty() || (port.is_some() && port_ok(port)));
    }
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    if !port_ok(port) {
        return false;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || hosts.iter().any(|allowed| allowed.eq_ignore_ascii_case(name))
}

/// The host names a request asks for: its one `Host`, and an absolute-form target's
/// authority. `None` when it names two (two `Host` fields): refused.
fn requested_hosts(request: &Request<Incoming>) -> Option<Vec<&str>> {
    let mut fields = request.headers().get_all(header::HOST).iter();
    let host = fields.next();
    if fields.next().is_some() {
        return None;
    }
    let host = host.map(|host| host.to_str().unwrap_or("\u{0}"));
    Some(host.into_iter().chain(request.uri().authority().map(|authority| authority.as_str())).collect())
}

async fn handle(state: &State, request: Request<Incoming>, peer: std::net::IpAddr) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = route(state, request).await.unwrap_or_else(Problem::into_response);
    let status = response.status();
    if status.is_client_error() {
        // Counted and summarised, never a line each: a loop of bad calls must not fill the log.
        let reason = match status {
            StatusCode::UNAUTHORIZED => "admin_unauthorized",
            StatusCode::MISDIRECTED_REQUEST => "admin_host_refused",
            StatusCode::NOT_FOUND => "admin_not_found",
            _ => "admin_bad_request",
        };
        state.gate.refusals().note(reason, peer);
    } else if method != Method::GET {
        tracing::info!(target: "vestibule::admin", %method, %path, status = status.as_u16(), "admin call");
    }
    response
}

async fn route(state: &State, request: Request<Incoming>) -> Result<Response<Body>, Problem> {
    // A page in a browser that rebinds its own name to this address still sends its name.
    let config = state.gate.config();
    let hosts = config.admin.as_ref().map_or(&[][..], |admin| &admin.hosts);
    let answered = requested_hosts(&request).is_some_and(|names| names.iter().all(|name| host_answered(name, hosts)));
    if !answered {
        return Err(Problem::new(
            StatusCode::MISDIRECTED_REQUEST,
            "this Host is not answered here: use an IP address, localhost, or a name in admin.hosts",
        ));
    }
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // Open to probes and scrapers (keep the listener private).
    match segments.as_slice() {
        [""] => return only(&method, &[Method::GET]).map(|()| dashboard()),
        ["healthz"] => return only(&method, &[Method::GET]).map(|()| json(StatusCode::OK, &json!({"status": "ok"}))),
        ["readyz"] => return only(&method, &[Method::GET]).map(|()| readiness(state)),
        ["metrics"] => return only(&method, &[Method::GET]).map(|()| metrics(state)),
        _ => {}
    }
    authorize(state, &request)?;
    match segments.as_slice() {
        ["rooms"] => {
            only(&method, &[Method::GET])?;
            let rooms = state.gate.rooms();
            let mut reads = tokio::task::JoinSet::new();
            for room in &rooms {
                let (room, gate) = (room.clone(), state.gate.clone());
                reads.spawn(async move { fresh(&gate, &room).await });
            }
            reads.join_all().await;
            let rooms: Vec<Value> = rooms.iter().map(|room| view(&state.gate, room)).collect();
            Ok(json(StatusCode::OK, &Value::Array(rooms)))
        }
        ["rooms", id] => {
            only(&method, &[Method::GET, Method::PATCH])?;
            let room = room(state, id)?;
            if method == Method::PATCH {
                let change: Overrides = read_json(request).await?;
                if change.is_empty() {
                    return Err(Problem::new(
                        StatusCode::BAD_REQUEST,
                        "nothing to change: send any of state, admit_per_minute, max_active, message",
                    ));
                }
                if let Some((field, problem)) = change.problem() {
                    return Err(Problem::field(field, problem));
                }
                change_overrides(state, &room, Some(&change)).await?;
            }
            fresh(&state.gate, &room).await;
            Ok(json(StatusCode::OK, &view(&state.gate, &room)))
        }
        ["rooms", id, "overrides"] => {
            only(&method, &[Method::DELETE])?;
            let room = room(state, id)?;
            change_overrides(state, &room, None).await?;
            Ok(json(StatusCode::OK, &view(&state.gate, &room)))
        }
        ["rooms", id, "admit"] => {
            only(&method, &[Method::POST])?;
            let room = room(state, id)?;
            let batch: Batch = read_json(request).await?;
            if !(1..=MAX_ADMIT_BATCH).contains(&batch.count) {
                return Err(Problem::field("count", format!("from 1 to {MAX_ADMIT_BATCH}")));
            }
            let now = state.gate.clock().now_ms();
            let admitted = room.admit_batch(state.gate.store(), batch.count, now).await.map_err(unavailable)?;
            tracing::info!(room = %room.id, asked = batch.count, admitted, "admitted a batch");
            let mut answer = view(&state.gate, &room);
            answer["admitted"] = json!(admitted);
            Ok(json(StatusCode::OK, &answer))
        }
        ["rooms", id, "preview"] => {
            only(&method, &[Method::GET])?;
            let room = room(state, id)?;
            let wanted = crate::path::query_param(request.uri(), "state");
            let wanted = wanted.as_deref().unwrap_or("waiting");
            if !crate::room::page::PREVIEW_STATES.contains(&wanted) {
                let states = crate::room::page::PREVIEW_STATES.join(", ");
                return Err(Problem::field("state", format!("one of {states}")));
            }
            let lang = crate::path::query_param(request.uri(), "lang");
            if let Some(lang) = &lang {
                if crate::room::lang::find(lang).is_none() {
                    let codes: Vec<&str> = crate::room::lang::bundled().iter().map(|l| l.code.as_str()).collect();
                    return Err(Problem::field("lang", format!("one of {}", codes.join(", "))));
                }
            }
            Ok(preview(&room, wanted, lang.as_deref()))
        }
        ["history"] => {
            only(&method, &[Method::GET])?;
            let since = crate::path::query_param(request.uri(), "since").and_then(|since| since.parse().ok());
            Ok(json(StatusCode::OK, &state.history.since(since.unwrap_or(0))))
        }
        ["reload"] => {
            only(&method, &[Method::POST])?;
            reload(&state.gate).map(|reloaded| json(StatusCode::OK, &json!(reloaded)))
        }
        _ => Err(Problem::not_found()),
    }
}

/// `GET /rooms/{id}/preview?state=...`: the room's waiting page (its own template, or the
/// bundled one) with a sample place, as a visitor would see it.
fn preview(room: &Room, state: &str, lang: Option<&str>) -> Response<Body> {
    use crate::room::{lang::Words, page};
    let settings = room.settings();
    let config = &settings.config;
    let status = page::sample_status(state, settings.message());
    let template = config.page.clone().unwrap_or_else(page::WaitingPage::bundled);
    let words = Words::for_visitor(lang.or(config.lang.as_deref()), &config.strings, None);
    let (site_name, title) = (config.site_name.as_deref(), config.title.as_deref());
    let shown =
        page::Shown { room: &room.id, site_name, title, status: &status, start_position: 40, why: None, words: &words };
    let mut response = crate::gate::respond::page(template.render(&shown));
    response.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    response
}

/// `POST /rooms/{id}/admit`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    count: u32,
}

/// `POST /reload`: the same as SIGHUP.
fn reload(gate: &Gate) -> Result<crate::gate::Reloaded, Problem> {
    gate.reload_from_source().map_err(|error| {
        let field = error.downcast_ref::<crate::config::ConfigError>().map(|error| error.key.clone());
        let status = if gate.config().source.is_none() { StatusCode::CONFLICT } else { StatusCode::BAD_REQUEST };
        Problem { status, message: format!("{error:#}"), field: field.filter(|key| !key.is_empty()) }
    })
}

fn only(method: &Method, allowed: &[Method]) -> Result<(), Problem> {
    if allowed.contains(method) {
        return Ok(());
    }
    let list: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    Err(Problem::new(StatusCode::METHOD_NOT_ALLOWED, format!("use {}", list.join(" or "))))
}

fn authorize(state: &State, request: &Request<Incoming>) -> Result<(), Problem> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    let config = state.gate.config();
    let expected = config.admin.as_ref().and_then(|admin| admin.token.as_deref());
    // Constant time in the token's content (its length is no secret worth keeping).
    let valid = presented
        .zip(expected)
        .is_some_and(|(presented, expected)| bool::from(presented.as_bytes().ct_eq(expected.as_bytes())));
    if valid {
        Ok(())
    } else {
        Err(Problem::new(StatusCode::UNAUTHORIZED, "send the admin token: Authorization: Bearer <token>"))
    }
}

fn room(state: &State, id: &str) -> Result<Arc<Room>, Problem> {
    state.gate.room_by_id(id).ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, format!("no room {id:?}")))
}

/// Read a JSON body of at most [`MAX_BODY_BYTES`], within [`READ_TIMEOUT`]; errors name the
/// field.
async fn read_json<T: serde::de::DeserializeOwned>(request: Request<Incoming>) -> Result<T, Problem> {
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let collected = tokio::time::timeout(READ_TIMEOUT, Limited::new(request.into_body(), MAX_BODY_BYTES).collect());
    let bytes = match collected.await {
        Err(_) => return Err(Problem::new(StatusCode::REQUEST_TIMEOUT, "the body came too slowly")),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(_)) => return Err(Problem::new(StatusCode::BAD_REQUEST, "the body could not be read")),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let field = error.path().to_string();
        let message = error.into_inner().to_string();
        if field.is_empty() || field == "." {
            Problem::new(StatusCode::BAD_REQUEST, format!("the body is not the JSON expected: {message}"))
        } else {
            Problem::field(field, message)
        }
    })?;
    deserializer.end().map_err(|_| Problem::new(StatusCode::BAD_REQUEST, "trailing data after the JSON body"))?;
    Ok(value)
}

fn too_large() -> Problem {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is larger than {MAX_BODY_BYTES} bytes"))
}

fn unavailable(error: crate::store::StoreError) -> Problem {
    tracing::warn!(%error, "an admin call could not reach the store");
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, format!("the store cannot be reached now: {error}"))
}

/// Store a change of the live overrides (or clear them), put it in force here at once; every
/// other instance hears of it from the store.
async fn change_overrides(state: &State, room: &Room, change: Option<&Overrides>) -> Result<(), Problem> {
    let gate = &state.gate;
    let now = gate.clock().now_ms();
    let (overrides, version) =
        gate.store().change_overrides(&room.id, &room.limits(), change, now).await.map_err(unavailable)?;
    let said = serde_json::to_string(&overrides).unwrap_or_default();
    tracing::info!(room = %room.id, overrides = %said, version, "live overrides changed");
    room.apply_overrides(overrides, version);
    Ok(())
}

/// Read the room from the store first (a follower reads an idle room only every 10 s, a moving
/// one every second): the view an operator asks for is current. The leader's is, from its
/// last step.
async fn fresh(gate: &Gate, room: &Room) {
    // A store known to be away is not waited on: the view says so at once, from what is kept.
    if !room.is_available() {
        return;
    }
    room.refresh(gate.store(), gate.clock().now_ms()).await;
}

/// A room's live view (docs/api.md).
pub fn view(gate: &Gate, room: &Room) -> Value {
    let settings = room.settings();
    let snapshot = room.snapshot();
    let stats = room.last_stats().map(|(stats, _)| stats).unwrap_or_default();
    let waiting = stats.last_ticket.max(snapshot.cursor).saturating_sub(snapshot.cursor.max(stats.cursor));
    let full = u64::from(stats.active) + u64::from(stats.outstanding) >= u64::from(settings.max_active());
    // A newcomer comes in at once when nobody waits and there is room.
    let eta = if waiting == 0 && !full && settings.state() == crate::config::RoomState::Open {
        Some(0)
    } else {
        line::eta_seconds(waiting + 1, snapshot.eta_rate())
    };
    let store_ok = snapshot.available && gate.store_answers();
    let config = &settings.config;
    let admitting = room.limits().per_minute();
    json!({
        "id": room.id,
        "state": settings.state(),
        "message": settings.message(),
        "admit_per_minute": settings.admit_per_minute(),
        "max_active": settings.max_active(),
        "session_seconds": config.session_seconds,
        "max_waiting": config.max_waiting,
        // The rate turns are granted at now: admit_per_minute, or the adaptive rate when lower.
        "admitting_per_minute": admitting,
        "adaptive": config.adaptive.as_ref().map(|adaptive| json!({
            "per_minute": admitting,
            "p95_ms_target": adaptive.p95_ms,
            "error_ratio_target": adaptive.error_ratio,
            "window_seconds": adaptive.window_seconds,
            "min_per_minute": adaptive.min_per_minute(settings.admit_per_minute()),
            // The last window judged, on the instance that leads the room.
            "last_window": room.adaptive.last_verdict(),
        })),
        // The scheduled sale in force (`[[rooms.events]]`): its phase, the pre-queue's count,
        // and once started its draw; every event of the room with its times.
        "sale": settings.event().map(|(event, phase)| {
            let starts_in = snapshot.starts_at.map(|at| room.starts_in(at));
            let draw = room.sale.seating(event.id()).map(|seating| seating.published());
            json!({ "name": event.name, "phase": phase, "starts_in": starts_in, "prequeued": stats.prequeued, "draw": draw })
        }),
        "events": room.events_published(false)["events"],
        "waiting": waiting,
        "active_sessions": stats.active,
        "grants_outstanding": stats.outstanding,
        "cursor": snapshot.cursor.max(stats.cursor),
        "last_ticket": stats.last_ticket,
        "admitted_last_minute": stats.admitted_last_minute,
        "eta_seconds": eta,
        "leader": room.is_leading(),
        "store": if store_ok { "ok" } else { "unavailable" },
        "overrides": settings.overrides,
        "configured": {
            "state": config.state,
            "admit_per_minute": config.admit_per_minute,
            "max_active": config.max_active,
            "message": config.message,
        },
        "feed_sockets": room.open_feeds(),
        // What this instance keeps of visitors, entries per table (the line's too, on the
        // memory store): the soak bench reads it.
        "held": {
            "room": room.held().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            "line": gate.store().held(&room.id).map(|held| held.into_iter().collect::<std::collections::BTreeMap<_, _>>()),
            "tokens_cached": gate.tokens().cached(),
        },
    })
}

/// Whether this instance can serve: its listeners are up (this one answers) and it is not
/// stopping. The store's health is not readiness: while it is away every instance still serves
/// its admitted visitors and holds its waiters and newcomers on the room's page, and taking
/// every instance out of the load balancer at once would fail them all. It is told here, in
/// `vestibule_store_up`, the admin view and the dashboard instead.
fn readiness(state: &State) -> Response<Body> {
    let store = if state.gate.store_up() { "ok" } else { "unavailable" };
    if state.draining.is_cancelled() {
        let reason = "stopping: finishing in-flight requests";
        json(StatusCode::SERVICE_UNAVAILABLE, &json!({"ready": false, "reason": reason, "store": store}))
    } else {
        json(StatusCode::OK, &json!({"ready": true, "store": store}))
    }
}

fn metrics(state: &State) -> Response<Body> {
    let metrics = state.gate.metrics();
    // Gauges read at the scrape, not kept on the hot path.
    metrics.feed_sockets.set(state.gate.open_feeds() as i64);
    metrics.store_up.set(i64::from(state.gate.store_up()));
    let mut response = Response::new(body::full(metrics.encode()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

fn dashboard() -> Response<Body> {
    let mut response = Response::new(body::full(DASHBOARD));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Everything is inline; nothing may be fetched from elsewhere.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

fn json(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(body::full(value.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::host_answered;

    #[test]
    fn only_ip_literals_localhost_and_listed_names_are_answered() {
        let hosts = vec!["admin.internal".to_owned()];
        for host in ["127.0.0.1:9090", "10.1.2.3", "[::1]:9090", "[2001:db8::1]", "localhost:9090", "LOCALHOST"] {
            assert!(host_answered(host, &hosts), "{host}");
        }
        assert!(host_answered("admin.internal:9090", &hosts));
        assert!(host_answered("Admin.Internal.", &hosts));
        for host in [
            "evil.example",
            "evil.example:9090",
            "127.0.0.1.evil.example",
            "[evil]",
            "localhost.evil",
            "",
            "[::1]evil.example",
            "localhost:evil.example",
            "127.0.0.1:1@evil",
            "localhost:",
            "[::1]:",
        ] {
            assert!(!host_answered(host, &hosts), "{host}");
        }
        assert!(!host_answered("admin.internal", &[]));
    }
}
