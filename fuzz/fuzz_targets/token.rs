//! Token and ticket parsing: whatever the string, checking it never panics, and nothing but a
//! token this key signed passes.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vestibule::config::TokensConfig;
use vestibule::token::Tokens;

fn tokens() -> &'static Tokens {
    static TOKENS: OnceLock<Tokens> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vestibule-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key.pem");
        std::fs::write(&key, vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa)).unwrap();
        let config: TokensConfig = toml::from_str(&format!("signing_key = {key:?}")).unwrap();
        Tokens::new(&config).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let tokens = tokens();
    assert!(tokens.admit(text, "checkout").is_err(), "{text:?} passed as a token");
    assert!(tokens.ticket(text, "checkout").is_err(), "{text:?} passed as a ticket");
});
