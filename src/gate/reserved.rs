//! vestibule's own endpoints on the public listener, under `/_vestibule/` (never forwarded):
//! the status JSON, leave, the position feed, and the public keys (also at
//! `/.well-known/jwks.json`).

use std::net::IpAddr;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::respond::{self, RETRY_SECONDS};
use super::{Connection, Gate};
use crate::body::{self, Body};
use crate::error::GateError;
use crate::room::{feed, Holding};

/// The reserved prefix of vestibule's own endpoints; never forwarded.
pub const RESERVED_PREFIX: &str = "/_vestibule/";
/// Where a standard JWT library looks for our public keys.
pub const WELL_KNOWN_JWKS: &str = "/.well-known/jwks.json";

impl Gate {
    /// The endpoint `endpoint` (the path after the prefix).
    pub(super) async fn reserved(
        &self,
        endpoint: &str,
        mut request: Request<Incoming>,
        connection: &Connection,
        client: IpAddr,
    ) -> Result<Response<Body>, GateError> {
        let method = request.method().clone();
        if endpoint == "jwks.json" {
            if method != Method::GET && method != Method::HEAD {
                return Err(GateError::MethodNotAllowed);
            }
            let mut response = Response::new(body::full(self.tokens().ring().jwks()));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/jwk-set+json"));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
            return Ok(response);
        }
        if !matches!(endpoint, "status" | "leave" | "ws" | "events") {
            return Err(GateError::NotFound);
        }
        let room_id =
            crate::path::query_param(request.uri(), "room").ok_or(GateError::BadRequest("Name the room: ?room=ID"))?;
        let room = self.room_by_id(&room_id).ok_or(GateError::NotFound)?;
        room.at(self.clock.now_ms());
        match (endpoint, method) {
            ("events", Method::GET) => {
                let mut response = respond::json(&room.events_published(true));
                response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                Ok(response)
            }
            ("status", Method::GET) => {
                let holding = self.holding(request.headers(), &room);
                room.seen(holding);
                let mut response = respond::json(&room.status(holding));
                response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
                Ok(response)
            }
            ("leave", Method::POST) => {
                // A page of another site cannot make a visitor leave (a form that posts itself).
                if super::origin::cross_site(request.headers(), super::origin::requested_host(&request)) {
                    return Err(GateError::CrossSite);
                }
                // Answered at once, whatever the store is doing: the room tells it at its next
                // step, or when it is back.
                if let Some(admission) = self.admission(request.headers(), &room) {
                    room.end_session(admission.ticket, admission.expires_at * 1_000, self.clock.now_ms());
                }
                if let Some(ticket) = self.ticket(request.headers(), &room) {
                    room.give_up(ticket.ticket);
                }
                // A pre-queue number gives up the place it drew, once the seating is known
                // here; before the start its place is skipped when nobody shows up for it.
                if let Some(held) = self.prequeue_ticket(request.headers(), &room) {
                    let holding = Holding::Prequeue { event: held.event.unwrap_or(0), number: held.ticket };
                    if let Holding::Ticket(ticket) = room.seated(holding) {
                        room.give_up(ticket);
                    }
                }
                self.forget_credentials(request.headers(), &room);
                let cookies =
                    self.cookies(request.headers(), connection).clear(&room.token_cookie).clear(&room.ticket_cookie);
                Ok(cookies.on(respond::json(&room.status(Holding::Nothing))))
            }
            ("ws", Method::GET) => {
                if request.version() != Version::HTTP_11 {
                    return Err(GateError::BadRequest("The feed is a websocket over HTTP/1.1."));
                }
                let response = switching_protocols(request.headers())?;
                let holding = self.holding(request.headers(), &room);
                let slot =
                    self.feeds.admit(client).ok_or(GateError::Unavailable { retry_after_seconds: RETRY_SECONDS })?;
                room.seen(holding);
                if let Holding::Ticket(_) = holding {
                    room.refresh(&self.store, self.clock.now_ms()).await;
                }
                let on_upgrade = hyper::upgrade::on(&mut request);
                let stop = room.stop_token().clone();
                // The socket keeps its connection's place under the connection caps.
                let place = connection.permit.clone();
                self.tasks.spawn(async move {
                    let _place = place;
                    if let Ok(upgraded) = on_upgrade.await {
                        feed::serve(upgraded, room, holding, stop, slot).await;
                    }
                });
                Ok(response)
            }
            _ => Err(GateError::MethodNotAllowed),
        }
    }
}

/// Check a websocket handshake request and make the `101` answer.
pub fn switching_protocols(headers: &HeaderMap) -> Result<Response<Body>, GateError> {
    let is = |name: header::HeaderName, value: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case(value))
    };
    if !is(header::UPGRADE, "websocket")
        || !is(header::CONNECTION, "upgrade")
        || !is(header::SEC_WEBSOCKET_VERSION, "13")
    {
        return Err(GateError::BadRequest("This endpoint takes a websocket (version 13)."));
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or(GateError::BadRequest("Sec-WebSocket-Key is missing."))?;
    let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("base64 is a valid header value");
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    Ok(response)
}
