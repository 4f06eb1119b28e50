//! Cross-site requests: whatever `Origin`, `Referer`, `Sec-Fetch-Site` and `Host` say, never
//! panics; a page that names another site by Fetch Metadata is always cross-site, and a
//! request with none of the three headers never is (a client that is not a browser).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vestibule::gate::origin::cross_site;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (Some(host), Some(source), Some(site)) = (parts.next(), parts.next(), parts.next()) else { return };
    let Ok(host) = std::str::from_utf8(host) else { return };
    let mut headers = http::HeaderMap::new();
    assert!(!cross_site(&headers, Some(host)), "no browser header: not cross-site");
    if let Ok(source) = http::HeaderValue::from_bytes(source) {
        headers.insert(http::header::ORIGIN, source.clone());
        let _ = cross_site(&headers, Some(host));
        headers.insert(http::header::REFERER, source);
        let _ = cross_site(&headers, None);
    }
    if let Ok(site) = http::HeaderValue::from_bytes(site) {
        headers.insert("sec-fetch-site", site);
        let _ = cross_site(&headers, Some(host));
    }
    headers.insert("sec-fetch-site", http::HeaderValue::from_static("cross-site"));
    assert!(cross_site(&headers, Some(host)), "Fetch Metadata's cross-site always wins");
});
