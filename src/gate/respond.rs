//! The one place the gate makes its own answers (the waiting page or its JSON, the closed
//! page, the proof-of-work challenge) and sets or clears cookies.

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};
use crate::line::Gone;
use crate::room::{page, Holding, Room};

/// `Retry-After` for visitors who wait: the no-JavaScript page refreshes this often too.
pub const RETRY_SECONDS: u32 = 20;
/// `Retry-After` when the store cannot take a visitor in line now.
pub const STORE_RETRY_SECONDS: u32 = 5;
/// `Retry-After` for a turn being settled (redeemed a moment ago, not used yet).
pub const PENDING_RETRY_SECONDS: u32 = 1;

/// The script and style policy of the gate's own pages: inline only, nothing fetched.
const PAGE_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:";

/// Cookie changes for one response: HttpOnly, SameSite=Lax, `Secure` over TLS.
#[derive(Debug, Default)]
pub struct Cookies {
    secure: bool,
    set: Vec<HeaderValue>,
}

impl Cookies {
    pub fn new(secure: bool) -> Cookies {
        Cookies { secure, set: Vec::new() }
    }

    /// Set cookie `name` to `value` for `max_age` seconds.
    pub fn set(mut self, name: &str, value: &str, max_age: u64) -> Cookies {
        let secure = if self.secure { "; Secure" } else { "" };
        let text = format!("{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}");
        self.set.push(HeaderValue::from_str(&text).expect("tokens and room ids are valid in a cookie"));
        self
    }

    /// Clear cookie `name`.
    pub fn clear(self, name: &str) -> Cookies {
        self.set(name, "", 0)
    }

    /// Clear cookie `name` when the request carried it.
    pub fn clear_if_sent(self, request: &HeaderMap, name: &str) -> Cookies {
        if super::cookies(request, name).next().is_some() {
            self.clear(name)
        } else {
            self
        }
    }

    /// Put them on `response`.
    pub fn on(self, mut response: Response<Body>) -> Response<Body> {
        self.onto(response.headers_mut());
        response
    }

    /// Put them in a response's `headers`.
    pub fn onto(self, headers: &mut HeaderMap) {
        for cookie in self.set {
            headers.append(header::SET_COOKIE, cookie);
        }
    }
}

/// A JSON document.
pub fn json(value: &impl serde::Serialize) -> Response<Body> {
    let text = serde_json::to_string(value).expect("status documents serialize");
    let mut response = Response::new(body::full(text));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// One of the gate's own pages.
pub fn page(html: String) -> Response<Body> {
    let mut response = Response::new(body::full(html));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_POLICY));
    response
}

/// The line is full (`max_waiting`): the page that says so and tries again later, or the
/// status JSON; 503 with `Retry-After`.
pub fn line_full(room: &Room, wants_page: bool, accept_language: Option<&str>) -> Response<Body> {
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    room_status(room, room.full_status(), 0, None, wants_page, accept_language, unavailable)
}

/// What a visitor sees of `room` (`current`: their status in it): the waiting, closed or full
/// page for people, in their language, the status JSON for the rest, with `status` and, for
/// 503 and 429, `Retry-After`.
pub fn room_status(
    room: &Room,
    current: crate::room::Status,
    start_position: u64,
    why: Option<Gone>,
    wants_page: bool,
    accept_language: Option<&str>,
    status: StatusCode,
) -> Response<Body> {
    let mut response = if wants_page {
        let settings = room.settings();
        let config = &settings.config;
        let template = settings.page().cloned().unwrap_or_else(page::WaitingPage::bundled);
        let words = crate::room::lang::Words::for_visitor(config.lang.as_deref(), &config.strings, accept_language);
        let site_name = config.site_name.as_deref();
        let title = config.title.as_deref();
        let status = &current;
        let shown = page::Shown { room: &room.id, site_name, title, status, start_position, why, words: &words };
        let mut response = page(template.render(&shown));
        if config.lang.is_none() {
            // The page's language follows the visitor's: caches must keep one per language.
            response.headers_mut().insert(header::VARY, HeaderValue::from_static("Accept-Language"));
        }
        response
    } else {
        json(&current)
    };
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_SECONDS));
    }
    response
}

/// The waiting answer: the page for people (200, or the room's `queued_status`), the status
/// JSON with 503 for the rest.
pub fn waiting(
    room: &Room,
    ticket: u64,
    start_position: u64,
    why: Option<Gone>,
    wants_page: bool,
    accept_language: Option<&str>,
) -> Response<Body> {
    held(room, Holding::Ticket(ticket), start_position, why, wants_page, accept_language)
}

/// The answer to a visitor holding `holding` (a place in line, a pre-queue number): the page
/// for people (200, or the room's `queued_status`), the status JSON with 503 for the rest.
pub fn held(
    room: &Room,
    holding: Holding,
    start_position: u64,
    why: Option<Gone>,
    wants_page: bool,
    accept_language: Option<&str>,
) -> Response<Body> {
    let status = if wants_page { room.queued_status() } else { StatusCode::SERVICE_UNAVAILABLE };
    room_status(room, room.status(holding), start_position, why, wants_page, accept_language, status)
}
