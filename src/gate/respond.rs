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

/// Cookie changes for one response: HttpOnly, SameSite=Lax, `Secure` as
/// `server.cookie_secure` says. A response that carries any is `Cache-Control: private,
/// no-store`, so that no shared cache hands one visitor's ticket or token to the next.
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

    /// Put them in a response's `headers`, and keep the response out of shared caches.
    pub fn onto(self, headers: &mut HeaderMap) {
        if self.set.is_empty() {
            return;
        }
        for cookie in self.set {
            headers.append(header::SET_COOKIE, cookie);
        }
        private_no_store(headers);
    }
}

/// `Cache-Control: private, no-store`, merged with what the response said: its directives
/// that allow storing or sharing (`public`, `max-age`, `s-maxage`, ...) go, the rest stay.
/// The headers that tell a CDN more than `Cache-Control` does (`CDN-Cache-Control` of RFC
/// 9213 and its vendors' `*-CDN-Cache-Control`, `Surrogate-Control`, Akamai's `Edge-Control`,
/// nginx's `X-Accel-Expires`) and `Expires` go too.
pub fn private_no_store(headers: &mut HeaderMap) {
    let overriding: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            name.ends_with("cdn-cache-control")
                || matches!(name, "surrogate-control" | "edge-control" | "x-accel-expires" | "expires")
        })
        .cloned()
        .collect();
    for name in overriding {
        headers.remove(name);
    }
    const DROPPED: [&str; 7] = ["public", "private", "no-store", "max-age", "s-maxage", "immutable", "no-cache"];
    let kept: Vec<String> = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|directive| {
            let name = directive.split('=').next().unwrap_or_default().trim();
            !directive.is_empty() && !DROPPED.iter().any(|dropped| name.eq_ignore_ascii_case(dropped))
        })
        .map(str::to_owned)
        .collect();
    let value = if kept.is_empty() {
        HeaderValue::from_static("private, no-store")
    } else {
        HeaderValue::from_str(&format!("private, no-store, {}", kept.join(", ")))
            .unwrap_or(HeaderValue::from_static("private, no-store"))
    };
    headers.insert(header::CACHE_CONTROL, value);
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

/// A newcomer the store cannot take in line now: the room's page (its language, template,
/// site name and message) saying the line is paused, which tries again by itself with
/// backoff and jitter; 503 with `Retry-After` for API clients.
pub fn held_by_the_store(room: &Room, wants_page: bool, accept_language: Option<&str>) -> Response<Body> {
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    let mut response = room_status(room, room.held_status(), 0, None, wants_page, accept_language, unavailable);
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(STORE_RETRY_SECONDS));
    response
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
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_control_after(upstream: &[&str]) -> String {
        let mut headers = HeaderMap::new();
        for value in upstream {
            headers.append(header::CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
        }
        Cookies::new(false).set("vestibule-token-checkout", "t", 60).onto(&mut headers);
        assert_eq!(headers.get_all(header::CACHE_CONTROL).iter().count(), 1);
        headers[header::CACHE_CONTROL].to_str().unwrap().to_owned()
    }

    #[test]
    fn a_response_that_sets_a_cookie_is_kept_out_of_shared_caches() {
        assert_eq!(cache_control_after(&[]), "private, no-store");
        assert_eq!(cache_control_after(&["public, max-age=600"]), "private, no-store");
        assert_eq!(cache_control_after(&["s-maxage=60", "no-transform, Max-Age=5"]), "private, no-store, no-transform");
        assert_eq!(
            cache_control_after(&["must-revalidate, stale-if-error=60"]),
            "private, no-store, must-revalidate, stale-if-error=60"
        );
    }

    #[test]
    fn cdn_directives_that_would_override_it_go_too() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("cdn-cache-control", "max-age=600"),
            ("cloudflare-cdn-cache-control", "max-age=600"),
            ("surrogate-control", "max-age=600"),
            ("expires", "Thu, 01 Dec 2099 16:00:00 GMT"),
            ("x-kept", "1"),
        ] {
            headers.insert(http::HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        Cookies::new(false).set("vestibule-token-checkout", "t", 60).onto(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(|name| name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["cache-control", "set-cookie", "x-kept"]);
    }

    #[test]
    fn a_response_without_cookies_keeps_its_cache_control() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=600"));
        Cookies::new(false).onto(&mut headers);
        assert_eq!(headers[header::CACHE_CONTROL], "public, max-age=600");
    }
}
