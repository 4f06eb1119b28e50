//! The request-path error type and the one place where it becomes an HTTP response.

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};

/// Why a request was not forwarded, or why forwarding failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GateError {
    /// The request is malformed or ambiguous (framing, Host, path); it never reaches the
    /// upstream.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// A reserved `/_vestibule/` path that does not exist.
    #[error("not found")]
    NotFound,
    /// A page of another site asked to change a visitor's state (leave, say): refused.
    #[error("cross-site request refused")]
    CrossSite,
    /// A reserved endpoint called with the wrong method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A header the gate must read is too large.
    #[error("request header too large")]
    HeaderTooLarge,
    /// The request body is larger than allowed.
    #[error("payload too large")]
    PayloadTooLarge,
    /// The upstream could not be reached or broke the exchange.
    #[error("upstream unreachable")]
    UpstreamUnreachable,
    /// The upstream did not answer within `upstream.response_timeout`.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The room cannot let the visitor in now; try again later.
    #[error("service unavailable")]
    Unavailable { retry_after_seconds: u32 },
    /// This client address has joined the line as often as the room allows for now.
    #[error("too many joins from this address")]
    TooManyJoins { retry_after_seconds: u64 },
}

impl GateError {
    /// The status for each error: the one mapping, pinned by the tests below.
    pub fn status(&self) -> StatusCode {
        match self {
            GateError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GateError::NotFound => StatusCode::NOT_FOUND,
            GateError::CrossSite => StatusCode::FORBIDDEN,
            GateError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GateError::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GateError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GateError::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            GateError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GateError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GateError::TooManyJoins { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// A name for the log's summary of refusals ([`crate::refusals`]).
    pub fn reason(&self) -> &'static str {
        match self {
            GateError::BadRequest(_) => "bad_request",
            GateError::NotFound => "not_found",
            GateError::CrossSite => "cross_site",
            GateError::MethodNotAllowed => "method_not_allowed",
            GateError::HeaderTooLarge => "header_too_large",
            GateError::PayloadTooLarge => "payload_too_large",
            GateError::UpstreamUnreachable => "upstream_unreachable",
            GateError::UpstreamTimeout => "upstream_timeout",
            GateError::Unavailable { .. } => "unavailable",
            GateError::TooManyJoins { .. } => "too_many_joins",
        }
    }

    /// A short sentence for the visitor; never contains request data.
    fn explanation(&self) -> &'static str {
        match self {
            GateError::BadRequest(why) => why,
            GateError::NotFound => "There is nothing here.",
            GateError::CrossSite => "This request came from another site and was refused; nothing has changed.",
            GateError::MethodNotAllowed => "This endpoint does not take that method.",
            GateError::HeaderTooLarge => "A request header is too large.",
            GateError::PayloadTooLarge => "The request body is too large.",
            GateError::UpstreamUnreachable => "The site cannot be reached right now.",
            GateError::UpstreamTimeout => "The site took too long to answer.",
            GateError::Unavailable { .. } => "The site is busy. Please try again shortly.",
            GateError::TooManyJoins { .. } => {
                "Many visitors from your network have joined the line just now. Please try again in a moment."
            }
        }
    }

    /// The response: JSON for API clients, a small HTML page otherwise.
    pub fn into_response(self, wants_json: bool) -> Response<Body> {
        let status = self.status();
        let (content_type, text) = if wants_json {
            let doc = serde_json::json!({
                "error": status.canonical_reason().unwrap_or("error"),
                "reason": self.reason(),
                "message": self.explanation(),
            });
            ("application/json", doc.to_string())
        } else {
            ("text/html; charset=utf-8", error_page(status, self.explanation()))
        };
        let mut response = Response::new(body::full(text));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            GateError::Unavailable { retry_after_seconds } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
            }
            GateError::TooManyJoins { retry_after_seconds } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
            }
            _ => {}
        }
        if status == StatusCode::BAD_REQUEST {
            // After a framing error the rest of the connection cannot be trusted.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

fn error_page(status: StatusCode, explanation: &str) -> String {
    let code = status.as_u16();
    let reason = status.canonical_reason().unwrap_or("Error");
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{code} {reason}</title></head>\
         <body style=\"font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem\">\
         <h1>{reason}</h1><p>{explanation}</p></body></html>\n"
    )
}

/// True when the answer should be a page for a person: a GET that does not ask for JSON.
/// Everything else (API clients, forms, non-GET requests) gets JSON.
pub fn wants_page<B>(request: &http::Request<B>) -> bool {
    page_wanted(request.method(), request.headers())
}

/// [`wants_page`] from a request's method and headers.
pub fn page_wanted(method: &http::Method, headers: &http::HeaderMap) -> bool {
    method == http::Method::GET && !wants_json(headers)
}

/// True when the client asked for JSON rather than a page.
pub fn wants_json(headers: &http::HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|accept| accept.contains("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_status() {
        let cases = [
            (GateError::BadRequest("x"), 400),
            (GateError::NotFound, 404),
            (GateError::CrossSite, 403),
            (GateError::MethodNotAllowed, 405),
            (GateError::PayloadTooLarge, 413),
            (GateError::HeaderTooLarge, 431),
            (GateError::TooManyJoins { retry_after_seconds: 1 }, 429),
            (GateError::UpstreamUnreachable, 502),
            (GateError::Unavailable { retry_after_seconds: 5 }, 503),
            (GateError::UpstreamTimeout, 504),
        ];
        for (error, status) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.into_response(false).status().as_u16(), status);
        }
    }

    #[test]
    fn unavailable_carries_retry_after_and_json_on_request() {
        let response = GateError::Unavailable { retry_after_seconds: 7 }.into_response(true);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }
}
