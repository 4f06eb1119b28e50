//! `proxy.toml`: any text is either a configuration or an error naming the file; parsing never
//! panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(error) = vestibule::config::Config::parse(text, "proxy.toml", std::path::Path::new("/nonexistent")) {
        assert!(error.to_string().starts_with("proxy.toml"), "{error}");
    }
});
