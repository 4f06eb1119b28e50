//! The order of a scheduled sale's pre-queue (docs/sales.md, `[[rooms.events]]`): at `starts_at`
//! every ticket taken in the pre-queue is placed in one random order that anyone can check
//! once the seed is published. The rule is short enough to state on the page:
//!
//! > Your place among the pre-queue is 1 + the number of pre-queue tickets whose
//! > `SHA-256(seed + ":" + ticket)` (the seed in hex, the ticket in decimal) is smaller than
//! > yours, comparing the digests as bytes.
//!
//! The seed is an HMAC of the room's event under the instances' shared secret: every
//! instance computes the same one, nobody can compute it before it is published, and a store
//! that lost everything cannot draw another.
//!
//! Not wired into the line yet: the building block of scheduled sales, tested on its own.

/// A seed: 32 bytes, shown in hex.
pub type Seed = [u8; 32];

/// The seed of an event: HMAC-SHA-256 under `secret` of the room, the event's name and its
/// start (unix seconds).
pub fn seed_for(secret: &[u8], room: &str, event: &str, starts_at: u64) -> Seed {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, format!("vestibule-event\0{room}\0{event}\0{starts_at}").as_bytes());
    tag.as_ref().try_into().expect("HMAC-SHA-256 is 32 bytes")
}

/// The seed in hex, as it is published.
pub fn hex(seed: &Seed) -> String {
    seed.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A seed from its hex form.
pub fn parse_hex(text: &str) -> Option<Seed> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut seed = [0u8; 32];
    for (byte, pair) in seed.iter_mut().zip(text.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(seed)
}

/// A ticket's sort key under `seed`: `SHA-256(hex(seed) + ":" + ticket)`.
pub fn key(seed: &Seed, ticket: u64) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{}:{ticket}", hex(seed)).as_bytes());
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The pre-queue's tickets `first..=last` in their drawn order, and back.
#[derive(Debug, Clone)]
pub struct Shuffle {
    first: u64,
    /// Place (0-based) → ticket.
    order: Vec<u64>,
    /// Ticket − first → place (0-based).
    places: Vec<u32>,
}

impl Shuffle {
    /// Draw the order of tickets `first..=last` (none when `last < first`). A million tickets
    /// take one SHA-256 each and a sort.
    pub fn new(seed: &Seed, first: u64, last: u64) -> Shuffle {
        let mut keyed: Vec<([u8; 32], u64)> =
            if last < first { Vec::new() } else { (first..=last).map(|ticket| (key(seed, ticket), ticket)).collect() };
        keyed.sort_unstable();
        let order: Vec<u64> = keyed.into_iter().map(|(_, ticket)| ticket).collect();
        let mut places = vec![0u32; order.len()];
        for (place, ticket) in order.iter().enumerate() {
            places[(ticket - first) as usize] = place as u32;
        }
        Shuffle { first, order, places }
    }

    /// The place in line of `ticket` (1-based, counting from the pre-queue's first ticket's
    /// place): drawn for a pre-queue ticket, its own number for any other.
    pub fn place(&self, ticket: u64) -> u64 {
        match ticket.checked_sub(self.first) {
            Some(offset) if (offset as usize) < self.places.len() => {
                self.first + u64::from(self.places[offset as usize])
            }
            _ => ticket,
        }
    }

    /// The ticket at `place`: the inverse of [`place`](Self::place).
    pub fn ticket_at(&self, place: u64) -> u64 {
        match place.checked_sub(self.first) {
            Some(offset) if (offset as usize) < self.order.len() => self.order[offset as usize],
            _ => place,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ticket_gets_one_place_and_later_arrivals_keep_theirs() {
        let seed = seed_for(b"secret", "checkout", "spring", 1_800_000_000);
        let shuffle = Shuffle::new(&seed, 11, 1_010);
        let mut places: Vec<u64> = (11..=1_010).map(|t| shuffle.place(t)).collect();
        assert!((11..=1_010).all(|t| shuffle.ticket_at(shuffle.place(t)) == t), "a bijection");
        places.sort_unstable();
        assert_eq!(places, (11..=1_010).collect::<Vec<_>>(), "the same places, redrawn");
        assert!((11..=1_010).filter(|t| shuffle.place(*t) == *t).count() < 20, "actually shuffled");
        // Before and after the pre-queue, first come first served.
        assert_eq!((shuffle.place(10), shuffle.place(1_011), shuffle.ticket_at(5_000)), (10, 1_011, 5_000));
    }

    #[test]
    fn the_order_follows_the_published_rule_and_the_seed_alone() {
        let seed = seed_for(b"secret", "checkout", "spring", 1_800_000_000);
        let shuffle = Shuffle::new(&seed, 1, 300);
        // The rule as stated to visitors, computed the slow way for one ticket.
        let mine = key(&seed, 42);
        let smaller = (1..=300).filter(|t| key(&seed, *t) < mine).count() as u64;
        assert_eq!(shuffle.place(42), 1 + smaller);
        // The same inputs, the same order (another instance, a store that lost everything).
        let again = Shuffle::new(&seed_for(b"secret", "checkout", "spring", 1_800_000_000), 1, 300);
        assert!((1..=300).all(|t| again.place(t) == shuffle.place(t)));
        // Another secret, event or start: another seed.
        let seeds = [
            seed_for(b"other", "checkout", "spring", 1_800_000_000),
            seed_for(b"secret", "checkout", "summer", 1_800_000_000),
            seed_for(b"secret", "checkout", "spring", 1_800_000_001),
        ];
        assert!(seeds.iter().all(|other| *other != seed));
        assert_eq!(hex(&seed).len(), 64);
    }

    #[test]
    fn each_ticket_is_about_as_likely_to_come_first_as_any_other() {
        // 2 000 draws of 10 tickets: each comes first about 200 times.
        let mut first = [0u32; 10];
        for draw in 0..2_000u64 {
            let shuffle = Shuffle::new(&seed_for(b"secret", "room", "event", draw), 1, 10);
            first[(shuffle.ticket_at(1) - 1) as usize] += 1;
        }
        assert!(first.iter().all(|n| (140..=260).contains(n)), "{first:?}");
        assert!(Shuffle::new(&[0; 32], 5, 4).place(5) == 5, "an empty pre-queue moves nobody");
    }
}
