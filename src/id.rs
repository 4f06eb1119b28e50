//! Random identifiers: visitor ids, token ids, an instance's id in the store.

use base64::Engine as _;

/// A random identifier: 128 bits, base64url.
pub fn random_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
