//! Bot friction: a proof of work a visitor solves before joining a room's line
//! (`challenge = "pow"`).
//!
//! A challenge is 36 bytes, base64url: when it was issued (ms), 12 random bytes, and a tag
//! (HMAC-SHA256, truncated to 16 bytes) over the room, the client's address (its /64 for IPv6)
//! and both. The server keeps nothing per challenge it hands out. A solution is
//! `<challenge>.<nonce>` (the nonce in decimal) such that SHA-256 of that text starts with
//! `difficulty` zero bits; it is sent as the `Vestibule-Pow` header or the
//! `vestibule-pow-<room>` cookie. Checking it is one HMAC and one SHA-256: microseconds. A
//! solution is good for [`LIFETIME`], for one join, in the room and from the address it was
//! issued for; the random bytes name it for the single-use check.

use std::net::IpAddr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::{digest, hmac};

use crate::hop::address_key;

/// How long a challenge may be solved and used.
pub const LIFETIME_MS: u64 = 120_000;
/// The default difficulty, in leading zero bits: about 65 000 hashes, a second or less for a
/// phone's browser (measured in docs/benchmarks.md), a few milliseconds for the load generator.
pub const DEFAULT_DIFFICULTY: u8 = 16;
/// The header API clients send a solution in.
pub const HEADER: http::HeaderName = http::HeaderName::from_static("vestibule-pow");

const ISSUED: usize = 8;
const RANDOM: usize = 12;
const TAG: usize = 16;
const LEN: usize = ISSUED + RANDOM + TAG;

/// Why a solution was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no solution")]
    Missing,
    #[error("not a solution")]
    Malformed,
    #[error("a challenge not issued here, or for another room or address")]
    Forged,
    #[error("the challenge has expired")]
    Expired,
    #[error("not enough work")]
    Insufficient,
    #[error("the solution was used already")]
    Reused,
}

/// The challenges of one deployment: every instance with the same signing key issues and
/// checks the same ones.
pub struct Pow {
    key: hmac::Key,
}

impl Pow {
    /// From secret bytes every instance shares (derived from the signing key).
    pub fn new(secret: &[u8]) -> Pow {
        let derived = digest::digest(&digest::SHA256, &[b"vestibule pow v1\0".as_slice(), secret].concat());
        Pow { key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()) }
    }

    fn tag(&self, room: &str, client: IpAddr, issued_and_random: &[u8]) -> [u8; TAG] {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(room.as_bytes());
        context.update(&[0]);
        context.update(address_key(client).to_string().as_bytes());
        context.update(&[0]);
        context.update(issued_and_random);
        let mut tag = [0u8; TAG];
        tag.copy_from_slice(&context.sign().as_ref()[..TAG]);
        tag
    }

    /// A new challenge for `client` joining `room` at `now` (ms).
    pub fn issue(&self, room: &str, client: IpAddr, now: u64) -> String {
        let mut bytes = [0u8; LEN];
        bytes[..ISSUED].copy_from_slice(&now.to_be_bytes());
        rand::Rng::fill(&mut rand::rng(), &mut bytes[ISSUED..ISSUED + RANDOM]);
        let tag = self.tag(room, client, &bytes[..ISSUED + RANDOM]);
        bytes[ISSUED + RANDOM..].copy_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Check a solution (`challenge.nonce`) for `client` joining `room` at `now` with at least
    /// `difficulty` bits of work; its id (for the single-use check) when it holds.
    pub fn check(&self, room: &str, client: IpAddr, solution: &str, difficulty: u8, now: u64) -> Result<u128, Refused> {
        let (challenge, nonce) = solution.rsplit_once('.').ok_or(Refused::Malformed)?;
        if nonce.is_empty() || nonce.len() > 20 || !nonce.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Refused::Malformed);
        }
        let mut bytes = [0u8; LEN];
        match URL_SAFE_NO_PAD.decode_slice(challenge, &mut bytes) {
            Ok(LEN) if challenge.len() == 48 => {}
            _ => return Err(Refused::Malformed),
        }
        let expected = self.tag(room, client, &bytes[..ISSUED + RANDOM]);
        // Compared in constant time: every byte, whatever the first difference.
        let difference = expected.iter().zip(&bytes[ISSUED + RANDOM..]).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if difference != 0 {
            return Err(Refused::Forged);
        }
        let issued = u64::from_be_bytes(bytes[..ISSUED].try_into().expect("8 bytes"));
        if issued > now + 5_000 || now >= issued + LIFETIME_MS {
            return Err(Refused::Expired);
        }
        if leading_zero_bits(digest::digest(&digest::SHA256, solution.as_bytes()).as_ref()) < u32::from(difficulty) {
            return Err(Refused::Insufficient);
        }
        let mut id = [0u8; 16];
        id[..RANDOM].copy_from_slice(&bytes[ISSUED..ISSUED + RANDOM]);
        Ok(u128::from_be_bytes(id))
    }
}

/// Solve a challenge: the first nonce whose hash has `difficulty` leading zero bits (the load
/// generator does this; the waiting page does the same in the browser).
pub fn solve(challenge: &str, difficulty: u8) -> String {
    let mut text = String::with_capacity(challenge.len() + 21);
    for nonce in 0u64.. {
        text.clear();
        text.push_str(challenge);
        text.push('.');
        text.push_str(&nonce.to_string());
        if leading_zero_bits(digest::digest(&digest::SHA256, text.as_bytes()).as_ref()) >= u32::from(difficulty) {
            return text;
        }
    }
    unreachable!("some nonce has enough zero bits")
}

fn leading_zero_bits(hash: &[u8]) -> u32 {
    let mut bits = 0;
    for byte in hash {
        if *byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

/// Solutions used lately, to take each once: ids with when they expire, bounded. With Redis
/// the check is also made across instances, in the join script. Ids are let go in the order
/// they were taken (each lasts `LIFETIME_MS`): constant work per take, however full.
#[derive(Debug, Default)]
pub struct Used {
    ids: std::sync::Mutex<UsedIds>,
}

#[derive(Debug, Default)]
struct UsedIds {
    until: std::collections::HashMap<u128, u64>,
    /// The ids in the order they were taken, with when each expires.
    order: std::collections::VecDeque<(u64, u128)>,
}

/// Solutions remembered at most (beyond it, the oldest are let go early: a solution is
/// still bound to its address and lasts two minutes).
const MAX_USED: usize = 200_000;

impl Used {
    /// Take `id` at `now`: false when it was taken before.
    pub fn take(&self, id: u128, now: u64) -> bool {
        let Ok(mut ids) = self.ids.lock() else { return false };
        let ids = &mut *ids;
        while let Some(&(until, oldest)) = ids.order.front() {
            if until > now && ids.order.len() < MAX_USED {
                break;
            }
            ids.order.pop_front();
            if ids.until.get(&oldest) == Some(&until) {
                ids.until.remove(&oldest);
            }
        }
        match ids.until.get(&id) {
            Some(until) if *until > now => false,
            _ => {
                ids.until.insert(id, now + LIFETIME_MS);
                ids.order.push_back((now + LIFETIME_MS, id));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_solution_holds_for_its_room_address_and_time_only() {
        let pow = Pow::new(b"secret");
        let challenge = pow.issue("checkout", ip("203.0.113.9"), 1_000);
        let solution = solve(&challenge, 8);
        assert!(pow.check("checkout", ip("203.0.113.9"), &solution, 8, 2_000).is_ok());
        assert_eq!(pow.check("other", ip("203.0.113.9"), &solution, 8, 2_000), Err(Refused::Forged));
        assert_eq!(pow.check("checkout", ip("203.0.113.10"), &solution, 8, 2_000), Err(Refused::Forged));
        assert_eq!(
            Pow::new(b"another").check("checkout", ip("203.0.113.9"), &solution, 8, 2_000),
            Err(Refused::Forged)
        );
        assert_eq!(pow.check("checkout", ip("203.0.113.9"), &solution, 8, 1_000 + LIFETIME_MS), Err(Refused::Expired));
        // An IPv6 client may move within its /64.
        let v6 = pow.issue("checkout", ip("2001:db8::1"), 1_000);
        assert!(pow.check("checkout", ip("2001:db8::2"), &solve(&v6, 4), 4, 1_500).is_ok());
    }

    #[test]
    fn too_little_work_and_garbage_are_refused() {
        let pow = Pow::new(b"secret");
        let challenge = pow.issue("checkout", ip("203.0.113.9"), 0);
        let easy = solve(&challenge, 1);
        let hard_enough = |s: &str| leading_zero_bits(digest::digest(&digest::SHA256, s.as_bytes()).as_ref()) >= 16;
        if !hard_enough(&easy) {
            assert_eq!(pow.check("checkout", ip("203.0.113.9"), &easy, 16, 10), Err(Refused::Insufficient));
        }
        for garbage in
            ["", ".", "x.1", &format!("{challenge}."), &format!("{challenge}.-1"), &format!("{challenge}x.1")]
        {
            assert_eq!(
                pow.check("checkout", ip("203.0.113.9"), garbage, 4, 10),
                Err(Refused::Malformed),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn a_solution_is_taken_once() {
        let used = Used::default();
        assert!(used.take(7, 0));
        assert!(!used.take(7, 1_000));
        assert!(used.take(8, 1_000));
        assert!(used.take(7, LIFETIME_MS + 1), "expired, then forgotten (it no longer passes anyway)");
    }

    #[test]
    fn a_full_table_lets_the_oldest_go_and_stays_bounded() {
        let used = Used::default();
        for id in 0..(MAX_USED as u128 + 1_000) {
            assert!(used.take(id, 0));
        }
        let ids = used.ids.lock().unwrap();
        assert_eq!((ids.until.len(), ids.order.len()), (MAX_USED, MAX_USED));
        assert!(!ids.until.contains_key(&0) && ids.until.contains_key(&(MAX_USED as u128 + 999)));
        drop(ids);
        assert!(!used.take(MAX_USED as u128 + 999, 1), "a recent one is still taken once");
        // Expired ones go as time passes.
        assert!(used.take(7, LIFETIME_MS + 1));
        assert_eq!(used.ids.lock().unwrap().until.len(), 1);
    }
}
