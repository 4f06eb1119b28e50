//! The one canonical form of a request path (docs/design.md, security rules).
//!
//! The gate decides "is this path inside a room" on this form, and forwards this same form
//! upstream, so that no spelling of a path can be judged as one path by the gate and served
//! as another by the upstream. The steps, in order:
//!
//! 1. percent-decode once (`/%63heckout` → `/checkout`, `%2F` → `/`); invalid UTF-8 or a
//!    control character is refused;
//! 2. backslashes count as slashes;
//! 3. per segment, `;params` are cut off (`/checkout;a=b` → `/checkout`);
//! 4. empty and `.` segments vanish, `..` removes the previous one (never above the root);
//! 5. for forwarding, the result is percent-encoded again, so a `%` the client encoded stays
//!    one literal character for the upstream.
//!
//! Case is kept here; rooms that match case-insensitively lower-case both sides.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is not valid UTF-8 once decoded")]
    NotUtf8,
    #[error("path contains a control character")]
    ControlCharacter,
    #[error("path must start with '/'")]
    NotAbsolute,
}

/// A path in its canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath {
    /// Decoded and normalized: what rooms are matched against.
    pub decoded: String,
    /// The same path, percent-encoded for the request line sent upstream.
    pub encoded: String,
}

/// Characters re-encoded when a decoded path is written into a request line.
const PATH_ENCODE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b';')
    .add(b'\\')
    .add(b'^')
    .add(b'|')
    .add(b'[')
    .add(b']');

/// Canonicalize the path part of a request target (no query).
pub fn canonicalize(raw: &str) -> Result<CanonicalPath, PathError> {
    if !raw.starts_with(['/', '\\']) {
        return Err(PathError::NotAbsolute);
    }
    if is_plain(raw) {
        // The common case: nothing to decode or normalize.
        return Ok(CanonicalPath { decoded: raw.to_owned(), encoded: raw.to_owned() });
    }
    let decoded = percent_decode_str(raw).decode_utf8().map_err(|_| PathError::NotUtf8)?;
    if decoded.chars().any(char::is_control) {
        return Err(PathError::ControlCharacter);
    }
    let decoded = decoded.replace('\\', "/");

    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        let segment = segment.split(';').next().unwrap_or("");
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            name => segments.push(name),
        }
    }

    let mut canonical =
        CanonicalPath { decoded: String::with_capacity(raw.len()), encoded: String::with_capacity(raw.len()) };
    for segment in &segments {
        canonical.decoded.push('/');
        canonical.decoded.push_str(segment);
        canonical.encoded.push('/');
        canonical.encoded.extend(utf8_percent_encode(segment, PATH_ENCODE));
    }
    if trailing_slash || segments.is_empty() {
        canonical.decoded.push('/');
        canonical.encoded.push('/');
    }
    Ok(canonical)
}

/// True when the raw path is already canonical: nothing encoded, no dot or empty segments,
/// no parameters, no backslashes.
fn is_plain(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    let odd_byte = |b: &u8| matches!(b, b'%' | b';' | b'\\') || !b.is_ascii_graphic();
    !bytes.iter().any(odd_byte) && !raw.contains("//") && !raw.contains("/.")
}

/// One query parameter, percent-decoded (at most 64 bytes; an empty value is none).
pub fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').filter_map(|pair| pair.split_once('=')).find(|(key, _)| *key == name).and_then(
        |(_, value)| {
            let value = percent_encoding::percent_decode_str(value).decode_utf8().ok()?;
            (!value.is_empty() && value.len() <= 64).then(|| value.into_owned())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(raw: &str) -> String {
        canonicalize(raw).unwrap().decoded
    }

    #[test]
    fn every_spelling_of_checkout_is_checkout() {
        for raw in [
            "/checkout",
            "/%63heckout",
            "//checkout",
            "/x/../checkout",
            "/checkout;a=b",
            "/./checkout",
            "/../../checkout",
            "\\checkout",
            "/%5Ccheckout",
            "/x/%2E%2E/checkout",
            "/checkout;jsessionid=1/",
        ] {
            let path = decoded(raw);
            assert!(path == "/checkout" || path == "/checkout/", "{raw} -> {path}");
        }
    }

    #[test]
    fn encoded_separators_are_resolved_before_matching() {
        assert_eq!(decoded("/checkout%2F..%2Fx"), "/x");
        assert_eq!(decoded("/a%2Fcheckout"), "/a/checkout");
        assert_eq!(decoded("/a/b/.."), "/a/");
        assert_eq!(decoded("/"), "/");
        assert_eq!(decoded("/.."), "/");
    }

    #[test]
    fn forwarded_form_is_the_same_path_encoded_again() {
        let path = canonicalize("/a/./b//c%20d/%2563").unwrap();
        assert_eq!(path.decoded, "/a/b/c d/%63");
        assert_eq!(path.encoded, "/a/b/c%20d/%2563");
        // Decoding the forwarded form once gives back the path that was matched.
        assert_eq!(percent_decode_str(&path.encoded).decode_utf8().unwrap(), path.decoded);
    }

    #[test]
    fn hostile_paths_are_refused() {
        assert_eq!(canonicalize("/a%00b"), Err(PathError::ControlCharacter));
        assert_eq!(canonicalize("/a%0d%0aX: y"), Err(PathError::ControlCharacter));
        assert_eq!(canonicalize("/%ff"), Err(PathError::NotUtf8));
        assert_eq!(canonicalize("checkout"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn plain_paths_take_the_fast_path_unchanged() {
        let path = canonicalize("/api/cart/checkout.json").unwrap();
        assert_eq!(path.decoded, "/api/cart/checkout.json");
        assert_eq!(path.encoded, path.decoded);
    }
}
