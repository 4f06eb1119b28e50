//! The client address behind trusted proxies: whatever X-Forwarded-For says, never panics, and
//! an untrusted peer is always its own client.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vestibule::hop::client_address;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = http::HeaderValue::from_bytes(data) else { return };
    let mut headers = http::HeaderMap::new();
    headers.append("x-forwarded-for", value.clone());
    headers.append("x-forwarded-for", value);
    let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
    let client = client_address("10.0.0.2".parse().unwrap(), &trusted, &headers);
    let _ = client;
    let stranger = "203.0.113.9".parse().unwrap();
    assert_eq!(client_address(stranger, &trusted, &headers), stranger);
});
