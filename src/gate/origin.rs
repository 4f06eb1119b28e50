//! Requests made by a page of another site (cross-site request forgery): the visitor's browser
//! sends them, but the visitor did not ask for them. Told by Fetch Metadata first
//! (`Sec-Fetch-Site`: anything but `same-origin` or `none`, a navigation the visitor typed or
//! bookmarked), then by `Origin` or `Referer` against the request's own host, as Go's
//! `CrossOriginProtection` and Django's CSRF check do. A request with none of them is not from
//! a browser (the JSON API, the load tool) and is no forgery.

use http::{header, HeaderMap, HeaderName, Uri};

pub const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// Whether a request with these `headers`, asking for `host` (its `Host` or `:authority`),
/// was made by a page of another origin.
pub fn cross_site(headers: &HeaderMap, host: Option<&str>) -> bool {
    if let Some(site) = headers.get(&SEC_FETCH_SITE) {
        return !matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    let Some(source) = headers.get(header::ORIGIN).or_else(|| headers.get(header::REFERER)) else {
        return false;
    };
    // `Origin: null` (a sandboxed frame, a data: page) and anything unreadable are foreign.
    let Some(authority) = source.to_str().ok().and_then(|text| text.parse::<Uri>().ok()).and_then(|uri| {
        uri.scheme()?;
        uri.authority().cloned()
    }) else {
        return true;
    };
    !host.is_some_and(|host| authority.as_str().eq_ignore_ascii_case(host))
}

/// The host a request asked for: `Host`, or an HTTP/2 request's `:authority`.
pub fn requested_host<B>(request: &http::Request<B>) -> Option<&str> {
    match request.headers().get(header::HOST) {
        Some(host) => host.to_str().ok(),
        None => request.uri().authority().map(|authority| authority.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn from(pairs: &[(&str, &str)]) -> bool {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        cross_site(&headers, Some("shop.test:8080"))
    }

    #[test]
    fn fetch_metadata_decides_first() {
        assert!(from(&[("sec-fetch-site", "cross-site")]));
        assert!(from(&[("sec-fetch-site", "same-site")]));
        assert!(!from(&[("sec-fetch-site", "same-origin")]));
        assert!(!from(&[("sec-fetch-site", "none")]));
        // Fetch Metadata wins over an Origin that would say otherwise.
        assert!(from(&[("sec-fetch-site", "cross-site"), ("origin", "http://shop.test:8080")]));
    }

    #[test]
    fn without_it_origin_then_referer_against_the_host() {
        assert!(from(&[("origin", "https://evil.example")]));
        assert!(from(&[("origin", "null")]));
        assert!(from(&[("origin", "http://shop.test")]), "another port is another origin");
        assert!(!from(&[("origin", "http://SHOP.test:8080")]));
        assert!(from(&[("referer", "https://evil.example/page?x=1")]));
        assert!(!from(&[("referer", "http://shop.test:8080/checkout")]));
        assert!(from(&[("referer", "/relative")]), "a referer without a scheme cannot be judged");
        // Neither: not a browser.
        assert!(!from(&[("accept", "application/json")]));
    }
}
