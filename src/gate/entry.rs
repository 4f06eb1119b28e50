//! A protected request without a valid token, in three phases: what the line says of it (one
//! store call: redeem the ticket it holds, or take a new one after the proof of work and the
//! join limit the room asks for), then the answer that follows, made in one place with its
//! cookies.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::respond::{self, Cookies, PENDING_RETRY_SECONDS, RETRY_SECONDS};
use super::{cookies, store_failed, Connection, Gate, Place, Trail};
use crate::body::Body;
use crate::challenge::{self, Refused};
use crate::config::RoomState;
use crate::error::{wants_page, GateError};
use crate::line::{Gone, Joined, Prequeued, Redeemed};
use crate::metrics::Outcome;
use crate::path::CanonicalPath;
use crate::room::settings::Phase;
use crate::room::{page, Holding, Room};
use crate::store::StoreError;
use crate::token::{random_id, Admission};

/// What redeeming a ticket says.
enum Redemption {
    /// The answer: in, or still waiting.
    Answered(Entry),
    /// The ticket's place is gone: the visitor joins again, told why.
    Gone(Gone),
}

/// What a pre-queue number holds.
enum Prequeue {
    /// Still the pre-queue (before the start, or the seating not known yet): the countdown.
    Waits(Entry),
    /// This place in line, drawn at the start.
    Holds(Arc<Admission>),
    /// Nothing: a sale no longer in force, or a number not given before its start.
    Gone,
}

/// A ticket or token that could not be signed: logged, and the visitor asked to come back.
fn unsigned(room: &Room, what: &str, error: crate::token::TokenError) -> GateError {
    tracing::error!(room = %room.id, %error, "cannot sign {what}");
    GateError::Unavailable { retry_after_seconds: RETRY_SECONDS }
}

/// `cookies`, setting a ticket just taken (or swapped) if there is one.
fn with_ticket(cookies: Cookies, room: &Room, new_ticket: Option<String>) -> Cookies {
    match new_ticket {
        Some(ticket) => cookies.set(&room.ticket_cookie, &ticket, TICKET_LIFETIME.as_secs()),
        None => cookies,
    }
}

/// `303 See Other` to the same address (canonical: never `//host`), no cookie.
fn see_other(path: &CanonicalPath, query: Option<&str>) -> Response<Body> {
    let location = match query {
        Some(query) => format!("{}?{query}", path.encoded),
        None => path.encoded.clone(),
    };
    let mut response = Response::new(crate::body::empty());
    *response.status_mut() = StatusCode::SEE_OTHER;
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, location);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    response
}

/// How long a ticket cookie holds a place.
const TICKET_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// What the line says of a request without a valid token.
enum Entry {
    /// Their turn: forward the request with a fresh token.
    Admit { visitor: String, place: Place, expires_at: u64 },
    /// In line (`start` places from the front when they joined), with a new ticket to set if
    /// one was just taken, and why they are back at the end if they are.
    Wait { ticket: u64, start: u64, why: Option<Gone>, new_ticket: Option<String>, retry_after: Option<u32> },
    /// In a scheduled sale's pre-queue with this number (of `event`), with a new pre-queue
    /// ticket to set if one was just taken.
    Prequeue { event: u64, number: u64, new_ticket: Option<String> },
    /// The room takes nobody new.
    Closed,
    /// `max_waiting` people wait already: no ticket.
    Full,
    /// The room asks for a proof of work first.
    Challenge { difficulty: u8, refused: Refused },
    /// The store cannot take anyone in line now: the room's page says the line is paused and
    /// joins it by itself when it moves again.
    Held,
}

impl Gate {
    /// The line's step for this request, then the answer.
    pub(super) async fn enter(
        &self,
        room: &Arc<Room>,
        request: Request<Incoming>,
        connection: &Connection,
        client: IpAddr,
        path: &CanonicalPath,
        trail: &mut Trail,
    ) -> Result<Response<Body>, GateError> {
        // A page of another site that posts into the room: its request carries none of the
        // visitor's SameSite=Lax cookies, so answering it would replace their ticket. It is
        // sent back as a GET of the same address, which brings them.
        let safe = matches!(*request.method(), Method::GET | Method::HEAD);
        if !safe && super::origin::cross_site(request.headers(), super::origin::requested_host(&request)) {
            trail.outcome = Some(Outcome::Refused);
            return Ok(see_other(path, request.uri().query()));
        }
        let entry = self.line_step(room, request.headers(), client).await?;
        let page = wants_page(&request);
        let accept_language = request.headers().get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok());
        let cookies = self.cookies(request.headers(), connection);
        trail.outcome = Some(match entry {
            Entry::Admit { .. } => Outcome::Entered,
            Entry::Wait { .. } | Entry::Prequeue { .. } => Outcome::Waiting,
            Entry::Closed => Outcome::Closed,
            Entry::Full => Outcome::Full,
            Entry::Challenge { .. } => Outcome::Challenged,
            Entry::Held => Outcome::Unavailable,
        });
        Ok(match entry {
            Entry::Admit { visitor, place, expires_at } => {
                return self.admit(room, &visitor, place, expires_at, request, connection, path, trail).await;
            }
            Entry::Wait { ticket, start, why, new_ticket, retry_after } => {
                room.touch(ticket);
                let mut response = respond::waiting(room, ticket, start, why, page, accept_language);
                if let Some(seconds) = retry_after {
                    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
                }
                with_ticket(cookies, room, new_ticket).on(response)
            }
            Entry::Prequeue { event, number, new_ticket } => {
                let holding = Holding::Prequeue { event, number };
                room.seen(holding);
                let response = respond::held(room, holding, 0, None, page, accept_language);
                with_ticket(cookies, room, new_ticket).on(response)
            }
            Entry::Closed => {
                let closed = StatusCode::SERVICE_UNAVAILABLE;
                let response =
                    respond::room_status(room, room.status(Holding::Nothing), 0, None, page, accept_language, closed);
                cookies.clear_if_sent(request.headers(), &room.ticket_cookie).on(response)
            }
            Entry::Full => {
                let response = respond::line_full(room, page, accept_language);
                cookies.clear_if_sent(request.headers(), &room.ticket_cookie).on(response)
            }
            Entry::Challenge { difficulty, refused } => {
                let response = self.challenge(room, client, difficulty, refused, page);
                cookies.clear_if_sent(request.headers(), &room.proof_cookie).on(response)
            }
            Entry::Held => respond::held_by_the_store(room, page, accept_language),
        })
    }

    /// What the line says: one store call, redeeming the ticket the visitor holds or taking a
    /// new one.
    async fn line_step(&self, room: &Arc<Room>, headers: &HeaderMap, client: IpAddr) -> Result<Entry, GateError> {
        let now = self.clock.now_ms();
        room.at(now);
        let mut why = None;
        // A pre-queue number: the countdown before the start, the place it drew after.
        let mut seated = None;
        if let Some(held) = self.prequeue_ticket(headers, room) {
            match self.prequeued(room, &held, now).await {
                Prequeue::Waits(entry) => return Ok(entry),
                Prequeue::Holds(ticket) => seated = Some(ticket),
                Prequeue::Gone => why = Some(Gone::Unknown),
            }
        }
        // Its new ticket cookie, set with whatever answer follows.
        let new_ticket = match &seated {
            Some(ticket) => Some(self.sign_ticket(room, ticket)?),
            None => None,
        };
        if let Some(ticket) = seated.or_else(|| self.ticket(headers, room)) {
            match self.redeem(room, &ticket, new_ticket, now).await {
                Redemption::Answered(entry) => return Ok(entry),
                Redemption::Gone(gone) => why = Some(gone),
            }
        }
        self.join(room, headers, client, why, now).await
    }

    /// Redeem the ticket a visitor holds: their turn (a session), their place, or gone (the
    /// visitor joins again, told why).
    async fn redeem(&self, room: &Arc<Room>, ticket: &Admission, new_ticket: Option<String>, now: u64) -> Redemption {
        let start = ticket.ticket.saturating_sub(ticket.cursor_at_join.unwrap_or(0));
        let waiting = |retry_after| {
            let new_ticket = new_ticket.clone();
            Redemption::Answered(Entry::Wait { ticket: ticket.ticket, start, why: None, new_ticket, retry_after })
        };
        // While the store is away, a waiter keeps their place on a paused page.
        if !room.is_available() {
            return waiting(None);
        }
        match room.redeem(&self.store, ticket.ticket, now).await {
            Err(error) => {
                store_failed(room, &self.store, &error);
                // If the store carried it out, nobody got the token: say so when it is back.
                room.unanswered(ticket.ticket);
                waiting(None)
            }
            // Redeemed a moment ago and not used yet: its holder whose answer was lost (the
            // session is theirs again once that is known), or a copy. Ask again shortly.
            Ok(Redeemed::Pending) => waiting(Some(PENDING_RETRY_SECONDS)),
            Ok(Redeemed::Admitted { expires_at }) => {
                room.observe_cursor(ticket.ticket);
                let (visitor, place) = (ticket.visitor.clone(), Place::of(ticket));
                Redemption::Answered(Entry::Admit { visitor, place, expires_at })
            }
            Ok(Redeemed::Waiting { position }) => {
                room.observe_cursor(ticket.ticket.saturating_sub(position));
                waiting(None)
            }
            Ok(Redeemed::Gone(gone)) => Redemption::Gone(gone),
        }
    }

    /// A newcomer (or one whose ticket is gone, `why`): the room's checks, then a place in
    /// line, or straight in when nobody waits and there is room.
    async fn join(
        &self,
        room: &Arc<Room>,
        headers: &HeaderMap,
        client: IpAddr,
        why: Option<Gone>,
        now: u64,
    ) -> Result<Entry, GateError> {
        let snapshot = room.snapshot();
        if snapshot.state == RoomState::Closed {
            return Ok(Entry::Closed);
        }
        let prequeue_event = room
            .settings()
            .event()
            .filter(|(_, phase)| *phase == Phase::Prequeue)
            .map(|(event, _)| (event.id(), event.starts_at));
        // Nobody joins a line the store cannot keep: the room's page, which joins by itself
        // once the store is back.
        if !snapshot.available {
            return Ok(Entry::Held);
        }
        // A room that asks for a proof of work gets one first; then a new ticket is at most one
        // of `joins_per_address_per_minute` from the client's address.
        let proof = match room.challenge() {
            None => None,
            Some(difficulty) => match self.proof(room, headers, client, difficulty, now) {
                Ok(id) => Some(id),
                Err(refused) => return Ok(Entry::Challenge { difficulty, refused }),
            },
        };
        room.joins.take(client, now).map_err(|retry_after_seconds| {
            room.metrics.joins_refused.inc();
            GateError::TooManyJoins { retry_after_seconds }
        })?;
        if let Some(event) = prequeue_event {
            return self.join_prequeue(room, client, event, now, proof).await;
        }
        let admit_now = snapshot.state == RoomState::Open;
        let (joined, line) = match room.join(&self.store, admit_now, now, proof).await {
            Ok((Joined::Full, _)) => {
                room.joins.give_back(client);
                return Ok(Entry::Full);
            }
            Ok(joined) => joined,
            Err(StoreError::ProofReused) => {
                return Ok(Entry::Challenge {
                    difficulty: room.challenge().unwrap_or_default(),
                    refused: Refused::Reused,
                });
            }
            Err(error) => {
                store_failed(room, &self.store, &error);
                room.joins.give_back(client);
                return Ok(Entry::Held);
            }
        };
        let visitor = random_id();
        Ok(match joined {
            Joined::Admitted { ticket, expires_at } => {
                room.observe_cursor(ticket);
                Entry::Admit { visitor, place: Place { ticket, line }, expires_at }
            }
            Joined::Full => unreachable!("answered above"),
            Joined::Waiting { ticket } => {
                let cursor = snapshot.cursor.min(ticket.saturating_sub(1));
                let signed = self
                    .tokens()
                    .mint_ticket(&room.id, &visitor, ticket, line, cursor, TICKET_LIFETIME)
                    .map_err(|error| unsigned(room, "a ticket", error))?;
                Entry::Wait { ticket, start: ticket - cursor, why, new_ticket: Some(signed), retry_after: None }
            }
        })
    }

    /// What a pre-queue number holds now: the countdown before the start, the place it drew
    /// after (from the seating known here, or else the store's, whichever sale it is of).
    async fn prequeued(&self, room: &Arc<Room>, held: &Admission, now: u64) -> Prequeue {
        let Some(event) = held.event else { return Prequeue::Gone };
        let countdown = |number| Prequeue::Waits(Entry::Prequeue { event, number, new_ticket: None });
        let seating = match room.sale.seating(event) {
            Some(seating) => seating,
            None => {
                let settings = room.settings();
                let in_force = settings.event().filter(|(config, _)| config.id() == event).map(|(_, phase)| phase);
                // Presented again: a store that lost the pre-queue learns its count back; one
                // that seated its sale (another instance's clock is ahead, or the sale ended
                // before this instance started) says so.
                match room.prequeue(&self.store, event, held.ticket, now, None).await.map(|(answer, _)| answer) {
                    Err(error) => {
                        store_failed(room, &self.store, &error);
                        return countdown(held.ticket);
                    }
                    Ok(Prequeued::Seated(seated)) => match room.seated_by_store(seated, now).await {
                        Ok(seating) => seating,
                        Err(_) => return countdown(held.ticket),
                    },
                    Ok(_) => match in_force {
                        Some(Phase::Prequeue) => return countdown(held.ticket),
                        Some(Phase::Started) => match room.seating(&self.store, now).await {
                            Ok(Some(seating)) => seating,
                            // The store is away at the start: the number keeps its place.
                            Ok(None) | Err(_) => return countdown(held.ticket),
                        },
                        // A sale no longer in force whose seating nobody kept.
                        None => return Prequeue::Gone,
                    },
                }
            }
        };
        match seating.ticket(held.ticket) {
            Some(ticket) => Prequeue::Holds(Arc::new(Admission {
                room: held.room.clone(),
                visitor: held.visitor.clone(),
                not_before: held.not_before,
                expires_at: held.expires_at,
                jti: held.jti.clone(),
                ticket,
                cursor_at_join: Some(seating.seated.base),
                line: held.line,
                event: None,
                used: Default::default(),
            })),
            None => Prequeue::Gone,
        }
    }

    /// A ticket cookie for the place `ticket` holds.
    fn sign_ticket(&self, room: &Room, ticket: &Admission) -> Result<String, GateError> {
        let cursor = ticket.cursor_at_join.unwrap_or(0);
        let signed =
            self.tokens().mint_ticket(&room.id, &ticket.visitor, ticket.ticket, ticket.line, cursor, TICKET_LIFETIME);
        signed.map_err(|error| unsigned(room, "a ticket", error))
    }

    /// A newcomer in a sale's pre-queue: a pre-queue number (the join limit applied as to
    /// any join), or "full".
    async fn join_prequeue(
        &self,
        room: &Arc<Room>,
        client: IpAddr,
        event: (u64, u64),
        now: u64,
        proof: Option<u128>,
    ) -> Result<Entry, GateError> {
        let (event, starts_at) = event;
        let (number, line) = match room.prequeue(&self.store, event, 0, now, proof).await {
            Ok((Prequeued::Number(number), line)) => (number, line),
            Ok((Prequeued::Full, _)) => {
                room.joins.give_back(client);
                return Ok(Entry::Full);
            }
            Err(StoreError::ProofReused) => {
                return Ok(Entry::Challenge {
                    difficulty: room.challenge().unwrap_or_default(),
                    refused: Refused::Reused,
                });
            }
            // The sale started meanwhile (another instance's clock is ahead): come back.
            Ok((Prequeued::Seated(_), _)) => return Err(GateError::Unavailable { retry_after_seconds: 1 }),
            Err(error) => {
                store_failed(room, &self.store, &error);
                room.joins.give_back(client);
                return Ok(Entry::Held);
            }
        };
        let visitor = random_id();
        // Kept through the whole pre-queue, however long, and a day after the start.
        let lifetime = TICKET_LIFETIME + Duration::from_millis(starts_at.saturating_sub(now));
        let signed = self
            .tokens()
            .mint_prequeue(&room.id, &visitor, number, line, event, lifetime)
            .map_err(|error| unsigned(room, "a pre-queue ticket", error))?;
        Ok(Entry::Prequeue { event, number, new_ticket: Some(signed) })
    }

    /// The request's proof of work for `room` (the `Vestibule-Pow` header, or the cookie the
    /// waiting page sets), checked and taken: its id.
    fn proof(
        &self,
        room: &Room,
        headers: &HeaderMap,
        client: IpAddr,
        difficulty: u8,
        now: u64,
    ) -> Result<u128, Refused> {
        let from_header = headers.get(&challenge::HEADER).and_then(|v| v.to_str().ok());
        let solution = from_header.or_else(|| cookies(headers, &room.proof_cookie).next()).ok_or(Refused::Missing)?;
        let id = self.tokens().pow().check(&room.id, client, solution, difficulty, now)?;
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
        client: IpAddr,
        difficulty: u8,
        refused: Refused,
        wants_page: bool,
    ) -> Response<Body> {
        let challenge = self.tokens().pow().issue(&room.id, client, self.clock.now_ms());
        let mut response = if wants_page {
            respond::page(page::render_challenge(&challenge, difficulty, &room.proof_cookie))
        } else {
            let mut response = respond::json(&serde_json::json!({
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
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
        response
    }

    /// Forward a visitor whose turn it is, with a fresh token as a cookie (and their ticket
    /// cookie cleared).
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
        trail: &mut Trail,
    ) -> Result<Response<Body>, GateError> {
        let ticket = place.ticket;
        let token = self
            .tokens()
            .mint(&room.id, visitor, ticket, place.line, expires_at_ms / 1_000)
            .map_err(|error| unsigned(room, "an admission token", error))?;
        // The ticket is spent: nothing more to verify of it.
        self.forget_credentials(request.headers(), room);
        let cookies = self.cookies(request.headers(), connection).clear_if_sent(request.headers(), &room.ticket_cookie);
        let json = !wants_page(&request);
        // The session exists from here on, confirmed at once: even when the upstream fails,
        // the visitor keeps the token (and their place) rather than losing both with the error.
        room.session_in_use(ticket, expires_at_ms);
        let (response, session_ended) =
            match self.forward(request, connection, path, Some((room, visitor, ticket))).await {
                Ok(forwarded) => {
                    trail.answered_after(forwarded.took);
                    (forwarded.response, forwarded.session_ended)
                }
                Err(error) => (error.into_response(json), false),
            };
        let cookies = if session_ended {
            room.end_session(ticket, expires_at_ms, self.clock.now_ms());
            cookies
        } else {
            cookies.set(&room.token_cookie, &token, room.limits().session_ms / 1_000)
        };
        Ok(cookies.on(response))
    }
}
