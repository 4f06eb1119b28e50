//! Admission tokens: the key ring, minting, strict verification, a cache of verified tokens,
//! and the JWKS document.
//!
//! Verification never trusts the token header for anything but the `kid`: the key that `kid`
//! names decides the one algorithm accepted, so `alg: none`, HS256 signed with a public key,
//! or any other algorithm switch fails. Every claim (`iss`, `aud`, `sub`, `iat`, `nbf`, `exp`,
//! `jti`, and `tkt`, the ticket that opened the session) is required.
//!
//! Tickets (the waiting visitor's cookie) carry the same claims with the audience
//! `ticket:<room>`, which no room id can equal (room ids have no `:`), so a ticket never passes
//! as an admission token nor a token as a ticket. Only vestibule reads a ticket, so it is
//! signed with HMAC-SHA256 under a secret derived from the private key (a few microseconds)
//! rather than with the public-key signature an admission token needs for the JWKS (which
//! would be most of a join's CPU). The derived key has its own `kid` and
//! verifies tickets only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use quick_cache::sync::Cache;
use serde::{Deserialize, Serialize};

use crate::config::TokensConfig;

/// The most `tokens.leeway_seconds` allowed: a revoked session is remembered this long past
/// its tokens' expiry.
pub const MAX_LEEWAY_SECONDS: u64 = 30;

/// Tokens longer than this are not even parsed.
const MAX_TOKEN_BYTES: usize = 4096;
/// A `kid` longer than this names no key of ours.
const MAX_KID_BYTES: usize = 128;
/// Shortest HS256 secret accepted.
const MIN_SECRET_BYTES: usize = 32;

/// The claims of an admission token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    /// The room id.
    pub aud: String,
    /// The visitor id.
    pub sub: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    /// The ticket number that opened the session (or holds the place in line).
    pub tkt: u64,
    /// Tickets only: the line's cursor when the ticket was taken (for the progress bar).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c0: Option<u64>,
    /// The line the ticket or session belongs to: one from a line that was reset (a restarted
    /// memory store, a Redis emptied with no instance left to restore it) admits nobody.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ln: Option<u64>,
    /// Pre-queue tickets only (audience `ticket:prequeue:<room>`): the scheduled sale (its start,
    /// unix seconds) whose pre-queue number `tkt` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ev: Option<u64>,
}

/// A verified token or ticket: what the gate needs to forward a request or hold a place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The audience: a room id, or `ticket:<room>` for a ticket.
    pub room: String,
    pub visitor: String,
    pub not_before: u64,
    pub expires_at: u64,
    pub jti: String,
    pub ticket: u64,
    pub cursor_at_join: Option<u64>,
    /// The line it belongs to; 0 when it names none (a token minted by hand).
    pub line: u64,
    /// Pre-queue tickets: the scheduled sale whose pre-queue number `ticket` is.
    pub event: Option<u64>,
    /// When this token's session was last reported in use (kept with the verified token, so
    /// that an admitted request reports it without a lookup of its own).
    pub used: UseMark,
}

/// When something was last reported (ms), to report it again only after a while. Not part of
/// what a token says: two admissions compare equal whatever their marks.
#[derive(Debug, Default)]
pub struct UseMark(AtomicU64);

impl UseMark {
    /// Whether a report is due at `now`, `every` ms after the last; if so, it counts as made.
    pub fn due(&self, now: u64, every: u64) -> bool {
        let last = self.0.load(Ordering::Relaxed);
        (last == 0 || now >= last + every)
            && self.0.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

impl Clone for UseMark {
    fn clone(&self) -> UseMark {
        UseMark(AtomicU64::new(self.0.load(Ordering::Relaxed)))
    }
}

impl PartialEq for UseMark {
    fn eq(&self, _: &UseMark) -> bool {
        true
    }
}

impl Eq for UseMark {}

/// What a ticket's audience starts with.
const TICKET_AUDIENCE: &str = "ticket:";

/// The audience of a room's tickets.
pub fn ticket_audience(room: &str) -> String {
    format!("{TICKET_AUDIENCE}{room}")
}

/// The audience of a room's pre-queue tickets: apart from its line tickets, so that neither
/// passes for the other (no room id holds a `:`), and signed with the ticket key.
pub fn prequeue_audience(room: &str) -> String {
    format!("{TICKET_AUDIENCE}prequeue:{room}")
}

/// The configuration key of the signing key.
const SIGNING_KEY: &str = "tokens.signing_key";

/// Why a key file could not be used: the configuration key that names it, the file, the
/// cause once, and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{key} = {path:?}: {problem}")]
pub struct KeyError {
    /// `tokens.signing_key` or `tokens.verify_keys[i]`.
    pub key: String,
    pub path: PathBuf,
    pub problem: String,
}

/// How to make a signing key, for an error message.
fn keygen_hint(path: &Path) -> String {
    format!("make one with `vestibule keygen --out {}`", path.display())
}

/// Why a token was refused. The gate treats every one of these as "no token".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token names no key of ours")]
    UnknownKey,
    #[error("token rejected: {0}")]
    Rejected(String),
    #[error("token is for another room")]
    WrongRoom,
    #[error("token expired or not yet valid")]
    OutOfTime,
    #[error("cannot sign: {0}")]
    Signing(String),
}

/// Which kind of key `vestibule keygen` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyKind {
    /// Ed25519 (EdDSA): small, fast, the default.
    Eddsa,
    /// P-256 (ES256).
    Es256,
    /// A shared secret (HS256); the upstream cannot verify tokens without it.
    Hs256,
}

/// A freshly generated key as file contents (PKCS#8 PEM, or a base64url secret for HS256).
pub fn generate_key(kind: KeyKind) -> String {
    use ed25519_dalek::pkcs8::{EncodePrivateKey, KeypairBytes};
    use rand::RngCore;

    let mut rng = rand::rng();
    match kind {
        KeyKind::Eddsa => {
            let mut seed = [0u8; 32];
            rng.fill_bytes(&mut seed);
            // PKCS#8 v1 (no public key inside), the form `openssl genpkey` writes.
            let pair = KeypairBytes { secret_key: seed, public_key: None };
            pair.to_pkcs8_pem(Default::default()).expect("encoding a 32-byte seed cannot fail").to_string()
        }
        KeyKind::Es256 => loop {
            let mut scalar = [0u8; 32];
            rng.fill_bytes(&mut scalar);
            // Out-of-range scalars (probability ~2^-32) are drawn again.
            if let Ok(secret) = p256::SecretKey::from_slice(&scalar) {
                break secret.to_pkcs8_pem(Default::default()).expect("encoding a P-256 key cannot fail").to_string();
            }
        },
        KeyKind::Hs256 => {
            let mut secret = [0u8; 48];
            rng.fill_bytes(&mut secret);
            format!("{}\n", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret))
        }
    }
}

/// One key of the ring.
struct RingKey {
    alg: Algorithm,
    decoding: DecodingKey,
    validation: Validation,
    /// A key derived for tickets: what it signed passes only as a ticket.
    tickets_only: bool,
}

/// How a [`CompactSigner`] signs.
enum Signature {
    /// Ed25519 with the key parsed once. `jsonwebtoken::encode` parses the PKCS#8 key and
    /// derives its public half (a scalar multiplication as costly as the signature) on every
    /// call.
    Ed25519(ed25519_dalek::SigningKey),
    /// HMAC-SHA256: tickets, which vestibule alone reads.
    Hmac(ring::hmac::Key),
}

/// Signs compact JWTs with a key prepared once and the header encoded once. A token is
/// assembled the way `jsonwebtoken::encode` does (the same header and claims serialization;
/// Ed25519 signatures and HMACs are deterministic), so it is byte for byte what the crate gives;
/// a test holds it to that.
struct CompactSigner {
    signature: Signature,
    /// The encoded header, the same for every token.
    header: String,
}

impl CompactSigner {
    fn new(signature: Signature, kid: &str) -> CompactSigner {
        let alg = match signature {
            Signature::Ed25519(_) => Algorithm::EdDSA,
            Signature::Hmac(_) => Algorithm::HS256,
        };
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        let header = serde_json::to_vec(&header).expect("a JWT header always serializes");
        CompactSigner { signature, header: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header) }
    }

    fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        use ed25519_dalek::Signer as _;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = serde_json::to_vec(claims).map_err(|e| TokenError::Signing(e.to_string()))?;
        let mut token = String::with_capacity(self.header.len() + claims.len() * 4 / 3 + 92);
        token.push_str(&self.header);
        token.push('.');
        engine.encode_string(claims, &mut token);
        match &self.signature {
            Signature::Ed25519(key) => {
                let signature = key.sign(token.as_bytes());
                token.push('.');
                engine.encode_string(signature.to_bytes(), &mut token);
            }
            Signature::Hmac(key) => {
                let tag = ring::hmac::sign(key, token.as_bytes());
                token.push('.');
                engine.encode_string(tag.as_ref(), &mut token);
            }
        }
        Ok(token)
    }
}

/// The ticket key derived from a private key: its secret and its `kid`. The secret comes from
/// the key itself, not the file's bytes (line endings, a trailing newline); the `kid` from the
/// secret, so that two instances deriving different secrets name different keys (a ticket
/// from the other is then a key unknown here, not a bad signature), while it reveals nothing
/// of the secret.
fn ticket_key(private: &[u8]) -> ([u8; 32], String) {
    use ring::digest;
    let secret = digest::digest(&digest::SHA256, &[b"vestibule ticket v1\0".as_slice(), private].concat());
    let name = digest::digest(&digest::SHA256, &[b"vestibule ticket kid\0".as_slice(), secret.as_ref()].concat());
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(secret.as_ref());
    (bytes, format!("t-{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&name.as_ref()[..12])))
}

/// What a private key file holds, whatever its layout: the Ed25519 seed, the DER inside a PEM
/// file, or an HS256 secret.
fn key_material(text: &str, ed25519: Option<&ed25519_dalek::SigningKey>) -> Vec<u8> {
    if let Some(key) = ed25519 {
        return key.to_bytes().to_vec();
    }
    if text.contains("-----BEGIN") {
        let body: String =
            text.lines().filter(|line| !line.starts_with("-----")).flat_map(|line| line.trim().chars()).collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(body) {
            return der;
        }
    }
    text.trim().as_bytes().to_vec()
}

/// The signing key plus every key still accepted, by `kid`.
pub struct KeyRing {
    signing_kid: String,
    signing_alg: Algorithm,
    signing: EncodingKey,
    /// Set when the signing key is Ed25519 (the default): the fast path of [`KeyRing::sign`].
    ed25519: Option<CompactSigner>,
    /// Signs tickets with the key derived from the signing key; `None` when tickets are
    /// signed with the signing key itself (`tokens.hmac_tickets = false`).
    tickets: Option<CompactSigner>,
    keys: HashMap<String, RingKey>,
    jwks: Bytes,
    signature_checks: AtomicU64,
    /// The secret scheduled sales' seeds are drawn from (see [`crate::wire::shuffle`]).
    event_secret: [u8; 32],
}

/// A key file, understood.
struct LoadedKey {
    kid: String,
    alg: Algorithm,
    encoding: Option<EncodingKey>,
    /// An Ed25519 private key, parsed once for signing.
    ed25519: Option<ed25519_dalek::SigningKey>,
    decoding: DecodingKey,
    /// The public JWK; `None` for shared secrets, which are never published.
    public: Option<Jwk>,
    /// Private keys and secrets: the key their tickets are signed with (secret, `kid`).
    ticket: Option<([u8; 32], String)>,
}

/// The key file at `path`, named by configuration key `key` (for errors).
fn load_key(key: &str, path: &Path) -> Result<LoadedKey, KeyError> {
    let signing = key == SIGNING_KEY;
    let problem = |problem: String| KeyError { key: key.to_owned(), path: path.to_owned(), problem };
    let bytes = std::fs::read(path).map_err(|error| {
        let fix = match error.kind() {
            std::io::ErrorKind::NotFound if signing => format!("; {}", keygen_hint(path)),
            std::io::ErrorKind::NotFound => "; list only the old keys of a rotation that still exist".to_owned(),
            std::io::ErrorKind::PermissionDenied => "; let the user vestibule runs as read it".to_owned(),
            _ => String::new(),
        };
        problem(format!("cannot read it: {error}{fix}"))
    })?;
    let format = |reason: &str| {
        let fix = if signing { format!("; move it away and {}", keygen_hint(path)) } else { String::new() };
        problem(format!("{reason}{fix}"))
    };
    let text = String::from_utf8_lossy(&bytes);

    let (alg, encoding, mut jwk) = if text.contains("-----BEGIN") && text.contains("PRIVATE KEY-----") {
        let (alg, encoding) = if let Ok(key) = EncodingKey::from_ed_pem(&bytes) {
            (Algorithm::EdDSA, key)
        } else if let Ok(key) = EncodingKey::from_ec_pem(&bytes) {
            (Algorithm::ES256, key)
        } else if let Ok(key) = EncodingKey::from_rsa_pem(&bytes) {
            (Algorithm::RS256, key)
        } else {
            return Err(format("not a PKCS#8 Ed25519 or P-256 key, nor an RSA key"));
        };
        let jwk = Jwk::from_encoding_key(&encoding, alg).map_err(|e| format(&format!("unusable key: {e}")))?;
        (alg, Some(encoding), jwk)
    } else if text.contains("-----BEGIN") && text.contains("PUBLIC KEY-----") {
        let (alg, decoding) = if let Ok(key) = DecodingKey::from_ed_pem(&bytes) {
            (Algorithm::EdDSA, key)
        } else if let Ok(key) = DecodingKey::from_ec_pem(&bytes) {
            (Algorithm::ES256, key)
        } else if let Ok(key) = DecodingKey::from_rsa_pem(&bytes) {
            (Algorithm::RS256, key)
        } else {
            return Err(format("not an Ed25519, P-256 or RSA public key"));
        };
        let jwk = Jwk::from_decoding_key(&decoding, Some(alg)).map_err(|e| format(&format!("unusable key: {e}")))?;
        (alg, None, jwk)
    } else if text.contains("-----BEGIN") {
        return Err(format("a PEM file, but neither a private nor a public key"));
    } else {
        let secret = text.trim().as_bytes();
        // A file that is not a PEM key is taken as an HS256 secret: one line, no spaces (as
        // `vestibule keygen --alg hs256` writes). Text with spaces or several lines is a file
        // given by mistake, not a secret.
        if secret.iter().any(|b| b.is_ascii_whitespace()) || bytes.contains(&0) {
            return Err(format(
                "not a key: neither a PEM key nor an HS256 secret (one line of at least 32 characters, no spaces)",
            ));
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format("an HS256 secret must be at least 32 bytes"));
        }
        let jwk = Jwk::from_encoding_key(&EncodingKey::from_secret(secret), Algorithm::HS256)
            .map_err(|e| format(&format!("unusable secret: {e}")))?;
        (Algorithm::HS256, Some(EncodingKey::from_secret(secret)), jwk)
    };

    // The kid is the RFC 7638 thumbprint: stable across restarts and instances, and the same
    // for a private key and its public half.
    let kid = jwk.thumbprint(ThumbprintHash::SHA256).map_err(|e| format(&format!("no thumbprint: {e}")))?;
    let kid = if alg == Algorithm::HS256 { format!("hs-{}", &kid[..16]) } else { kid };
    let decoding = if alg == Algorithm::HS256 {
        DecodingKey::from_secret(text.trim().as_bytes())
    } else {
        DecodingKey::from_jwk(&jwk).map_err(|e| format(&format!("unusable key: {e}")))?
    };
    jwk.common.key_id = Some(kid.clone());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    let public = (alg != Algorithm::HS256).then_some(jwk);
    let ed25519 = match (alg, &encoding) {
        (Algorithm::EdDSA, Some(_)) => {
            use ed25519_dalek::pkcs8::DecodePrivateKey as _;
            ed25519_dalek::SigningKey::from_pkcs8_pem(text.trim()).ok()
        }
        _ => None,
    };
    let ticket = encoding.is_some().then(|| ticket_key(&key_material(&text, ed25519.as_ref())));
    Ok(LoadedKey { kid, alg, encoding, ed25519, decoding, public, ticket })
}

impl KeyRing {
    /// Load the signing key and the keys still accepted during a rotation.
    pub fn load(config: &TokensConfig) -> Result<KeyRing, KeyError> {
        let signing = load_key(SIGNING_KEY, &config.signing_key)?;
        let Some(signing_key) = signing.encoding.clone() else {
            return Err(KeyError {
                key: SIGNING_KEY.to_owned(),
                path: config.signing_key.clone(),
                problem: "a public key cannot sign; give the private key".into(),
            });
        };
        let (ticket_secret, ticket_kid) = signing.ticket.clone().expect("a private key has a ticket key");
        let mut ring = KeyRing {
            signing_kid: signing.kid.clone(),
            signing_alg: signing.alg,
            signing: signing_key,
            ed25519: signing.ed25519.clone().map(|key| CompactSigner::new(Signature::Ed25519(key), &signing.kid)),
            tickets: config.hmac_tickets.then(|| {
                CompactSigner::new(
                    Signature::Hmac(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &ticket_secret)),
                    &ticket_kid,
                )
            }),
            keys: HashMap::new(),
            jwks: Bytes::new(),
            signature_checks: AtomicU64::new(0),
            event_secret: {
                let digest = ring::digest::digest(
                    &ring::digest::SHA256,
                    &[b"vestibule event v1\0".as_slice(), &ticket_secret].concat(),
                );
                digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
            },
        };
        let mut published = Vec::new();
        let verify =
            config.verify_keys.iter().enumerate().map(|(i, p)| load_key(&format!("tokens.verify_keys[{i}]"), p));
        let validation = |alg: Algorithm| {
            let mut validation = Validation::new(alg);
            validation.algorithms = vec![alg];
            validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
            validation.set_issuer(&[&config.issuer]);
            validation.leeway = config.leeway_seconds;
            // Time is checked by `Tokens` on its own clock (tokio time, as the line's), so
            // that expiry and renewal behave alike under paused time in tests.
            validation.validate_exp = false;
            validation.validate_nbf = false;
            // The audience is the room, compared by the caller: one validation per key.
            validation.validate_aud = false;
            validation
        };
        for key in std::iter::once(Ok(signing)).chain(verify) {
            let key = key?;
            published.extend(key.public);
            if let Some((secret, kid)) = key.ticket {
                let (decoding, validation, tickets_only) =
                    (DecodingKey::from_secret(&secret), validation(Algorithm::HS256), true);
                ring.keys.insert(kid, RingKey { alg: Algorithm::HS256, decoding, validation, tickets_only });
            }
            let validation = validation(key.alg);
            ring.keys
                .insert(key.kid, RingKey { alg: key.alg, decoding: key.decoding, validation, tickets_only: false });
        }
        let jwks = serde_json::to_vec(&JwkSet { keys: published }).expect("a JWK set always serializes");
        ring.jwks = Bytes::from(jwks);
        Ok(ring)
    }

    /// The secret scheduled sales' seeds are drawn from: derived from the signing key, so
    /// every instance has the same one and nobody without the key can compute a seed.
    pub fn event_secret(&self) -> [u8; 32] {
        self.event_secret
    }

    /// The `kid` of the signing key.
    pub fn signing_kid(&self) -> &str {
        &self.signing_kid
    }

    /// The signing key's algorithm.
    pub fn signing_algorithm(&self) -> Algorithm {
        self.signing_alg
    }

    /// Check signature and claims; `Ok` only for a token of ours, in time, for our issuer.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let kid = header.kid.filter(|kid| kid.len() <= MAX_KID_BYTES).ok_or(TokenError::UnknownKey)?;
        let key = self.keys.get(&kid).ok_or(TokenError::UnknownKey)?;
        if header.alg != key.alg {
            return Err(TokenError::Rejected("algorithm does not match the key".into()));
        }
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation)
            .map(|data| data.claims)
            .map_err(|e| TokenError::Rejected(format!("{:?}", e.kind())))?;
        if key.tickets_only && !claims.aud.starts_with(TICKET_AUDIENCE) {
            return Err(TokenError::Rejected("a ticket key signs tickets only".into()));
        }
        Ok(claims)
    }

    /// Signatures checked so far (a token's is checked once, then the token is remembered).
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }

    /// Sign a ticket's claims with the ticket key derived from the signing key.
    pub fn sign_ticket(&self, claims: &Claims) -> Result<String, TokenError> {
        match &self.tickets {
            Some(tickets) => tickets.sign(claims),
            None => self.sign(claims),
        }
    }

    /// Sign claims with the signing key.
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        if let Some(ed25519) = &self.ed25519 {
            return ed25519.sign(claims);
        }
        let mut header = Header::new(self.signing_alg);
        header.kid = Some(self.signing_kid.clone());
        jsonwebtoken::encode(&header, claims, &self.signing).map_err(|e| TokenError::Signing(e.to_string()))
    }

    /// The public keys as a JWK set (shared secrets are never published).
    pub fn jwks(&self) -> Bytes {
        self.jwks.clone()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Recently refused tokens remembered, so that a forged token sent again and again costs one
/// signature check, not one per request.
const REFUSED_ENTRIES: usize = 16_384;

/// Mints and checks admission tokens; remembers verified ones so that the admitted path does
/// no signature check per request, and refused ones so that forgeries cost one check.
pub struct Tokens {
    ring: KeyRing,
    issuer: String,
    leeway: u64,
    /// Verified tokens by a hash of the token (seeded per process), each with the token's
    /// last bytes (of its signature, which nobody knows but its holder) to tell a collision
    /// apart: a token is a few hundred bytes, what is kept of it 24.
    verified: Cache<u64, (Tail, Arc<Admission>)>,
    /// Refused tokens by a keyed hash (keyed per process, so no one can aim a collision).
    refused: Cache<u64, ()>,
    /// Seeded at random per process: nobody can aim a collision. Fast (foldhash): a keyed
    /// hash needs no more here, since a cached token must also end as the one presented.
    hasher: quick_cache::DefaultHashBuilder,
    /// The line's clock: tokio time.
    clock: crate::clock::Clock,
    /// The rooms' proofs of work, keyed from the signing key.
    pow: crate::challenge::Pow,
}

impl Tokens {
    /// Verified tokens in the cache now (bounded by `tokens.cache_entries`).
    pub fn cached(&self) -> usize {
        self.verified.len()
    }

    /// A token's key in the caches of verified and refused tokens.
    fn key(&self, token: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(token)
    }

    /// Let a token go from the cache (its holder left, or its ticket was redeemed): what an
    /// instance keeps of a visitor who has gone is then no more than the room's revocation.
    pub fn forget(&self, token: &str) {
        let key = self.key(token);
        if self.verified.get(&key).is_some_and(|(tail, _)| tail == Tail::of(token)) {
            self.verified.remove(&key);
        }
    }

    /// Seconds since the Unix epoch, on the line's clock.
    pub fn now(&self) -> u64 {
        self.clock.now_ms() / 1_000
    }

    pub fn new(config: &TokensConfig) -> Result<Tokens, KeyError> {
        let ring = KeyRing::load(config)?;
        // Every instance signing with the same key issues and checks the same challenges.
        let secret = std::fs::read(&config.signing_key).unwrap_or_default();
        Ok(Tokens {
            pow: crate::challenge::Pow::new(&secret),
            ring,
            issuer: config.issuer.clone(),
            leeway: config.leeway_seconds,
            verified: Cache::new(config.cache_entries.get()),
            refused: Cache::new(REFUSED_ENTRIES),
            hasher: quick_cache::DefaultHashBuilder::default(),
            clock: crate::clock::Clock::new(),
        })
    }

    pub fn ring(&self) -> &KeyRing {
        &self.ring
    }

    /// The proofs of work rooms may ask for (keyed from the signing key, as every instance).
    pub fn pow(&self) -> &crate::challenge::Pow {
        &self.pow
    }

    /// A token admitting `visitor` to `room` until `expires_at` (Unix seconds), for the
    /// session that `ticket` opened.
    pub fn mint(
        &self,
        room: &str,
        visitor: &str,
        ticket: u64,
        line: u64,
        expires_at: u64,
    ) -> Result<String, TokenError> {
        self.sign(room.to_owned(), visitor, (ticket, line), None, expires_at)
    }

    /// A ticket cookie holding place `ticket` in `room`'s line for `visitor`.
    pub fn mint_ticket(
        &self,
        room: &str,
        visitor: &str,
        ticket: u64,
        line: u64,
        cursor_at_join: u64,
        lifetime: Duration,
    ) -> Result<String, TokenError> {
        let expires_at = self.now() + lifetime.as_secs().max(1);
        self.sign(ticket_audience(room), visitor, (ticket, line), Some(cursor_at_join), expires_at)
    }

    /// A ticket cookie holding pre-queue number `number` of scheduled sale `event` in `room`.
    pub fn mint_prequeue(
        &self,
        room: &str,
        visitor: &str,
        number: u64,
        line: u64,
        event: u64,
        lifetime: Duration,
    ) -> Result<String, TokenError> {
        let expires_at = self.now() + lifetime.as_secs().max(1);
        let mut claims = self.claims(prequeue_audience(room), visitor, (number, line), None, expires_at);
        claims.ev = Some(event);
        self.ring.sign_ticket(&claims)
    }

    /// The pre-queue number a ticket cookie holds in `room`, if it is one and valid now.
    pub fn prequeue(&self, token: &str, room: &str) -> Result<Arc<Admission>, TokenError> {
        self.check(token, &prequeue_audience(room))
    }

    /// Sign the claims of a token or ticket holding `place` (ticket number, line).
    fn sign(
        &self,
        aud: String,
        visitor: &str,
        place: (u64, u64),
        c0: Option<u64>,
        exp: u64,
    ) -> Result<String, TokenError> {
        let claims = self.claims(aud, visitor, place, c0, exp);
        if claims.aud.starts_with(TICKET_AUDIENCE) {
            self.ring.sign_ticket(&claims)
        } else {
            self.ring.sign(&claims)
        }
    }

    fn claims(&self, aud: String, visitor: &str, place: (u64, u64), c0: Option<u64>, exp: u64) -> Claims {
        let (tkt, line) = place;
        let now = self.now();
        Claims {
            iss: self.issuer.clone(),
            aud,
            sub: visitor.to_owned(),
            iat: now,
            nbf: now,
            exp: exp.max(now + 1),
            jti: random_id(),
            tkt,
            c0,
            ln: (line != 0).then_some(line),
            ev: None,
        }
    }

    /// The admission a token grants for `room`, if it is valid now. Whether its session has
    /// ended is the room's to say ([`Room::is_revoked`](crate::room::Room::is_revoked)).
    pub fn admit(&self, token: &str, room: &str) -> Result<Arc<Admission>, TokenError> {
        self.check(token, room)
    }

    /// The place a ticket cookie holds in `room`'s line, if it is valid now.
    pub fn ticket(&self, token: &str, room: &str) -> Result<Arc<Admission>, TokenError> {
        self.check(token, &ticket_audience(room))
    }

    fn check(&self, token: &str, audience: &str) -> Result<Arc<Admission>, TokenError> {
        let key = self.key(token);
        let tail = Tail::of(token);
        let admission = match self.verified.get(&key).filter(|(cached, _)| *cached == tail) {
            Some((_, admission)) => admission,
            None => {
                if self.refused.get(&key).is_some() {
                    return Err(TokenError::Rejected("refused a moment ago".into()));
                }
                let claims = match self.ring.verify(token) {
                    Ok(claims) => claims,
                    Err(error) => {
                        // Bad for good (forged, tampered, another key): remember. (Time is
                        // judged below, on every use.)
                        self.refused.insert(key, ());
                        return Err(error);
                    }
                };
                let admission = Arc::new(Admission {
                    room: claims.aud,
                    visitor: claims.sub,
                    not_before: claims.nbf,
                    expires_at: claims.exp,
                    jti: claims.jti,
                    ticket: claims.tkt,
                    cursor_at_join: claims.c0,
                    line: claims.ln.unwrap_or(0),
                    event: claims.ev,
                    used: UseMark::default(),
                });
                // Only tokens that verified are remembered, so garbage cannot fill the cache.
                self.verified.insert(key, (tail, admission.clone()));
                admission
            }
        };
        if admission.room != audience {
            return Err(TokenError::WrongRoom);
        }
        let now = self.now();
        if now + self.leeway < admission.not_before || now >= admission.expires_at + self.leeway {
            return Err(TokenError::OutOfTime);
        }
        Ok(admission)
    }
}

/// A token's last bytes (its signature's), kept beside a cached token's keyed hash: a token
/// found under the same hash is the same one only if they agree too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tail([u8; 8]);

impl Tail {
    fn of(token: &str) -> Tail {
        let bytes = token.as_bytes();
        let mut tail = [0u8; 8];
        let start = bytes.len().saturating_sub(tail.len());
        tail[..bytes.len() - start].copy_from_slice(&bytes[start..]);
        Tail(tail)
    }
}

pub use crate::id::random_id;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_is_the_last_eight_bytes_of_any_token() {
        assert_eq!(Tail::of("header.payload.signature-0123456789"), Tail(*b"23456789"));
        assert_eq!(Tail::of("ab"), Tail(*b"ab\0\0\0\0\0\0"));
        assert_eq!(Tail::of(""), Tail([0; 8]));
    }
    use std::num::NonZeroUsize;

    fn config_with(kind: KeyKind, dir: &Path) -> TokensConfig {
        let path = dir.join(format!("{kind:?}.key"));
        std::fs::write(&path, generate_key(kind)).unwrap();
        TokensConfig {
            signing_key: path,
            verify_keys: vec![],
            issuer: "vestibule".into(),
            leeway_seconds: 2,
            cache_entries: NonZeroUsize::new(16).unwrap(),
            hmac_tickets: true,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vestibule-token-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn every_generated_key_kind_mints_tokens_that_verify() {
        let dir = temp_dir("kinds");
        for kind in [KeyKind::Eddsa, KeyKind::Es256, KeyKind::Hs256] {
            let tokens = Tokens::new(&config_with(kind, &dir)).unwrap();
            let token = tokens.mint("checkout", "v1", 7, 0, unix_now() + 60).unwrap();
            let admission = tokens.admit(&token, "checkout").unwrap();
            assert_eq!((admission.visitor.as_str(), admission.ticket), ("v1", 7));
            assert_eq!(tokens.admit(&token, "other"), Err(TokenError::WrongRoom));
            // A token is not a ticket, and a ticket is not a token.
            assert_eq!(tokens.ticket(&token, "checkout"), Err(TokenError::WrongRoom));
            let ticket = tokens.mint_ticket("checkout", "v1", 8, 0, 3, Duration::from_secs(60)).unwrap();
            assert_eq!(tokens.admit(&ticket, "checkout"), Err(TokenError::WrongRoom));
            assert_eq!(tokens.ticket(&ticket, "checkout").unwrap().cursor_at_join, Some(3));
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.kid.as_deref(), Some(tokens.ring().signing_kid()));
        }
    }

    #[test]
    fn ed25519_tokens_are_byte_for_byte_what_jsonwebtoken_signs() {
        let dir = temp_dir("ed25519-fast");
        let tokens = Tokens::new(&config_with(KeyKind::Eddsa, &dir)).unwrap();
        let ring = tokens.ring();
        assert!(ring.ed25519.is_some(), "an Ed25519 signing key takes the fast path");
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(ring.signing_kid().to_owned());
        for c0 in [None, Some(3)] {
            let claims = Claims {
                iss: "vestibule".into(),
                aud: "checkout".into(),
                sub: "visitor \"1\" é".into(),
                iat: 1,
                nbf: 2,
                exp: 3,
                jti: "j".into(),
                tkt: 42,
                c0,
                ln: c0.map(|c| c + 1),
                ev: None,
            };
            let fast = ring.sign(&claims).unwrap();
            let library = jsonwebtoken::encode(&header, &claims, &ring.signing).unwrap();
            assert_eq!(fast, library);
            // Tickets: HS256 under the derived secret, as the crate would sign them.
            let Some(Signature::Ed25519(key)) = ring.ed25519.as_ref().map(|signer| &signer.signature) else {
                panic!("an Ed25519 signer");
            };
            let (secret, kid) = ticket_key(&key.to_bytes());
            let mut ticket_header = Header::new(Algorithm::HS256);
            ticket_header.kid = Some(kid);
            let library = jsonwebtoken::encode(&ticket_header, &claims, &EncodingKey::from_secret(&secret)).unwrap();
            assert_eq!(ring.sign_ticket(&claims).unwrap(), library);
        }
        let minted = tokens.mint("checkout", "v1", 7, 0, unix_now() + 60).unwrap();
        assert_eq!(tokens.admit(&minted, "checkout").unwrap().ticket, 7);
    }

    #[test]
    fn tickets_are_hmac_signed_under_a_key_that_signs_nothing_else() {
        let dir = temp_dir("tickets");
        for kind in [KeyKind::Eddsa, KeyKind::Es256, KeyKind::Hs256] {
            let config = config_with(kind, &dir);
            let tokens = Tokens::new(&config).unwrap();
            let ring = tokens.ring();
            let ticket = tokens.mint_ticket("checkout", "v1", 8, 0, 3, Duration::from_secs(60)).unwrap();
            let header = jsonwebtoken::decode_header(&ticket).unwrap();
            assert_eq!(header.alg, Algorithm::HS256, "{kind:?}");
            let kid = header.kid.unwrap();
            assert!(kid.starts_with("t-") && kid != ring.signing_kid(), "{kid}");
            assert_eq!(tokens.ticket(&ticket, "checkout").unwrap().ticket, 8);

            // What the ticket key signs never passes as an admission token, even for a room.
            let now = unix_now();
            let mut claims = Claims {
                iss: "vestibule".into(),
                aud: "checkout".into(),
                sub: "v1".into(),
                iat: now,
                nbf: now,
                exp: now + 60,
                jti: random_id(),
                tkt: 8,
                c0: None,
                ln: None,
                ev: None,
            };
            let forged = ring.tickets.as_ref().unwrap().sign(&claims).unwrap();
            assert!(matches!(tokens.admit(&forged, "checkout"), Err(TokenError::Rejected(_))));
            // Tickets signed by the signing key itself (before tickets had a key of their own)
            // still hold their place.
            claims.aud = ticket_audience("checkout");
            claims.c0 = Some(3);
            let older = ring.sign(&claims).unwrap();
            assert_eq!(tokens.ticket(&older, "checkout").unwrap().ticket, 8);
            // Nothing about the ticket secret is published.
            assert!(!String::from_utf8_lossy(&ring.jwks()).contains(&kid));

            // The same key in a file laid out otherwise (CRLF line endings) checks the tickets.
            let mut copied = config.clone();
            let text = std::fs::read_to_string(&config.signing_key).unwrap();
            copied.signing_key = dir.join(format!("{kind:?}-crlf.key"));
            std::fs::write(&copied.signing_key, text.replace('\n', "\r\n")).unwrap();
            assert_eq!(Tokens::new(&copied).unwrap().ticket(&ticket, "checkout").unwrap().ticket, 8, "{kind:?}");

            // For a rolling upgrade from a version before HMAC tickets: signed with the key.
            let mut upgrading = copied.clone();
            upgrading.hmac_tickets = false;
            let upgrading = Tokens::new(&upgrading).unwrap();
            let ticket = upgrading.mint_ticket("checkout", "v1", 9, 0, 3, Duration::from_secs(60)).unwrap();
            let header = jsonwebtoken::decode_header(&ticket).unwrap();
            assert_eq!(header.kid.as_deref(), Some(ring.signing_kid()), "{kind:?}");
            assert_eq!(tokens.ticket(&ticket, "checkout").unwrap().ticket, 9);
        }
    }

    #[test]
    fn jwks_publishes_public_keys_only() {
        let dir = temp_dir("jwks");
        let ed = Tokens::new(&config_with(KeyKind::Eddsa, &dir)).unwrap();
        let set: JwkSet = serde_json::from_slice(&ed.ring().jwks()).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].common.key_id.as_deref(), Some(ed.ring().signing_kid()));
        assert!(!String::from_utf8_lossy(&ed.ring().jwks()).contains("\"d\""));

        let hs = Tokens::new(&config_with(KeyKind::Hs256, &dir)).unwrap();
        let set: JwkSet = serde_json::from_slice(&hs.ring().jwks()).unwrap();
        assert!(set.keys.is_empty(), "a shared secret must never be published");
    }

    #[test]
    fn rotation_accepts_tokens_of_the_old_key() {
        let dir = temp_dir("rotation");
        let old = config_with(KeyKind::Eddsa, &dir);
        let old_tokens = Tokens::new(&old).unwrap();
        let token = old_tokens.mint("checkout", "v1", 1, 0, unix_now() + 60).unwrap();

        let new_path = dir.join("new.key");
        std::fs::write(&new_path, generate_key(KeyKind::Es256)).unwrap();
        let mut rotated = old.clone();
        rotated.verify_keys = vec![old.signing_key.clone()];
        rotated.signing_key = new_path;
        let new_tokens = Tokens::new(&rotated).unwrap();
        assert!(new_tokens.admit(&token, "checkout").is_ok());
        // Waiting visitors keep their place: the old private key still checks its tickets.
        let ticket = old_tokens.mint_ticket("checkout", "v2", 2, 0, 0, Duration::from_secs(60)).unwrap();
        assert_eq!(new_tokens.ticket(&ticket, "checkout").unwrap().visitor, "v2");
        assert_ne!(new_tokens.ring().signing_kid(), old_tokens.ring().signing_kid());
        let set: JwkSet = serde_json::from_slice(&new_tokens.ring().jwks()).unwrap();
        assert_eq!(set.keys.len(), 2);
    }

    #[test]
    fn bad_key_files_are_explained() {
        let dir = temp_dir("bad");
        let short = dir.join("short.key");
        std::fs::write(&short, "too short").unwrap();
        let mut config = config_with(KeyKind::Eddsa, &dir);
        config.signing_key = short;
        let error = Tokens::new(&config).err().unwrap().to_string();
        assert!(error.contains("not a key"), "a text file is not taken as a secret: {error}");
        std::fs::write(&config.signing_key, "tooshort\n").unwrap();
        let error = Tokens::new(&config).err().unwrap().to_string();
        assert!(error.contains("at least 32 bytes"), "{error}");
        // A file that is not there: the key named, the cause once, how to make one.
        config.signing_key = dir.join("missing.pem");
        let error = Tokens::new(&config).err().unwrap().to_string();
        let path = config.signing_key.display();
        assert_eq!(
            error,
            format!(
                "tokens.signing_key = \"{path}\": cannot read it: No such file or directory (os error 2); \
                 make one with `vestibule keygen --out {path}`"
            )
        );
        config.signing_key = dir.join("short.key");
        config.verify_keys = vec![dir.join("gone.pem")];
        std::fs::write(&config.signing_key, generate_key(KeyKind::Eddsa)).unwrap();
        let error = Tokens::new(&config).err().unwrap().to_string();
        assert!(error.starts_with("tokens.verify_keys[0] = "), "{error}");
        assert_eq!(error.matches("os error").count(), 1, "{error}");
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::*;
    use std::num::NonZeroUsize;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    fn config(signing: &str, verify: &[&str]) -> TokensConfig {
        TokensConfig {
            signing_key: fixture(signing),
            verify_keys: verify.iter().map(|name| fixture(name)).collect(),
            issuer: "vestibule".into(),
            leeway_seconds: 5,
            cache_entries: NonZeroUsize::new(16).unwrap(),
            hmac_tickets: true,
        }
    }

    #[test]
    fn rsa_keys_sign_as_rs256_and_publish_n_and_e() {
        let tokens = Tokens::new(&config("rsa-test-key.pem", &[])).unwrap();
        assert_eq!(tokens.ring().signing_algorithm(), Algorithm::RS256);
        let token = tokens.mint("checkout", "v", 1, 0, unix_now() + 60).unwrap();
        assert!(tokens.admit(&token, "checkout").is_ok());
        let jwks: serde_json::Value = serde_json::from_slice(&tokens.ring().jwks()).unwrap();
        assert_eq!(jwks["keys"][0]["kty"], "RSA");
        assert!(jwks["keys"][0]["n"].is_string() && jwks["keys"][0]["e"] == "AQAB");
    }

    #[test]
    fn a_public_key_verifies_but_cannot_sign() {
        // The RSA public half accepts what the private half signed, under the same kid.
        let signer = Tokens::new(&config("rsa-test-key.pem", &[])).unwrap();
        let token = signer.mint("checkout", "v", 1, 0, unix_now() + 60).unwrap();
        let verifier = Tokens::new(&config("ed25519-openssl.pem", &["rsa-test-key.pub.pem"])).unwrap();
        assert_eq!(verifier.ring().signing_algorithm(), Algorithm::EdDSA, "openssl's Ed25519 PEM loads");
        assert!(verifier.admit(&token, "checkout").is_ok());
        let error = Tokens::new(&config("rsa-test-key.pub.pem", &[])).err().unwrap().to_string();
        assert!(error.contains("cannot sign"), "{error}");
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tokens_expire_on_the_lines_clock() {
        let dir = std::env::temp_dir().join(format!("vestibule-token-clock-{}", random_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key.pem");
        std::fs::write(&key, generate_key(KeyKind::Eddsa)).unwrap();
        let config: TokensConfig = toml::from_str(&format!("signing_key = {key:?}\nleeway_seconds = 0")).unwrap();
        let tokens = Tokens::new(&config).unwrap();
        let token = tokens.mint("checkout", "v1", 3, 0, tokens.now() + 60).unwrap();
        assert!(tokens.admit(&token, "checkout").is_ok());
        // A minute passes in an instant: tokio's clock is paused and moved on.
        tokio::time::advance(std::time::Duration::from_secs(59)).await;
        assert!(tokens.admit(&token, "checkout").is_ok(), "still valid at 59 s");
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        assert_eq!(tokens.admit(&token, "checkout").err(), Some(TokenError::OutOfTime));
        let _ = std::fs::remove_dir_all(dir);
    }
}
