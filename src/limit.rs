//! Joins per client address: a token bucket per address (per IPv6 /64), in bounded memory.
//!
//! Written by hand rather than with a keyed limiter crate: those keep every key seen until a
//! cleanup pass, so a flood from many addresses grows memory between passes. Here each of 16
//! shards holds at most its share of addresses; a full shard first forgets buckets that have
//! refilled (their addresses owe nothing), and when none has, newcomers share one overflow
//! bucket per shard: under a flood from more addresses than the table holds, they are limited
//! together rather than not at all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::hop::address_key;

const SHARDS: usize = 16;
/// One join in bucket units: a minute's refill of `per_minute` joins is `per_minute` units per
/// millisecond, in integers (as the line's rate budget).
const JOIN: u64 = 60_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    units: u64,
    at: u64,
}

#[derive(Debug, Default)]
struct Shard {
    buckets: HashMap<IpAddr, Bucket>,
    overflow: Option<Bucket>,
    pruned_at: u64,
}

/// Joins per address per minute, for one room.
#[derive(Debug)]
pub struct JoinLimiter {
    /// Changed by a reload.
    per_minute: std::sync::atomic::AtomicU64,
    per_shard: usize,
    shards: Vec<Mutex<Shard>>,
}

impl JoinLimiter {
    /// `per_minute` joins per address per minute (a minute's worth may come at once), keeping
    /// at most about `max_addresses` addresses.
    pub fn new(per_minute: u32, max_addresses: usize) -> JoinLimiter {
        JoinLimiter {
            per_minute: std::sync::atomic::AtomicU64::new(u64::from(per_minute.max(1))),
            per_shard: (max_addresses / SHARDS).max(1),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// Joins per address per minute from now on (a reload).
    pub fn set_per_minute(&self, per_minute: u32) {
        self.per_minute.store(u64::from(per_minute.max(1)), std::sync::atomic::Ordering::Relaxed);
    }

    fn per_minute(&self) -> u64 {
        self.per_minute.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn capacity(&self) -> u64 {
        self.per_minute() * JOIN
    }

    /// A bucket's units refilled up to `now` (its time never moves back).
    fn refill(&self, bucket: &mut Bucket, now: u64) {
        let elapsed = now.saturating_sub(bucket.at);
        bucket.units = bucket.units.saturating_add(elapsed.saturating_mul(self.per_minute())).min(self.capacity());
        bucket.at = bucket.at.max(now);
    }

    /// Take one join for the client at `addr` at `now` (ms): `Err` with the seconds until
    /// the next one is allowed.
    pub fn take(&self, addr: IpAddr, now: u64) -> Result<(), u64> {
        let key = address_key(addr);
        let shard = &self.shards[shard_of(&key)];
        let mut shard = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !shard.buckets.contains_key(&key) && shard.buckets.len() >= self.per_shard {
            self.prune(&mut shard, now);
        }
        let fresh = Bucket { units: self.capacity(), at: now };
        let bucket = if shard.buckets.len() < self.per_shard || shard.buckets.contains_key(&key) {
            shard.buckets.entry(key).or_insert(fresh)
        } else {
            shard.overflow.get_or_insert(fresh)
        };
        self.refill(bucket, now);
        if bucket.units >= JOIN {
            bucket.units -= JOIN;
            return Ok(());
        }
        let missing = JOIN - bucket.units;
        Err(missing.div_ceil(self.per_minute()).div_ceil(1_000))
    }

    /// Forget the buckets that have refilled (at most once a second per shard).
    /// Give back a join taken by [`take`](Self::take) that took no ticket in the end (the line
    /// was full): visitors behind one address retrying a full line keep their allowance.
    pub fn give_back(&self, addr: IpAddr) {
        let key = address_key(addr);
        let mut shard = self.shards[shard_of(&key)].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let capacity = self.capacity();
        let shard = &mut *shard;
        if let Some(bucket) = shard.buckets.get_mut(&key).or(shard.overflow.as_mut()) {
            bucket.units = (bucket.units + JOIN).min(capacity);
        }
    }

    fn prune(&self, shard: &mut Shard, now: u64) {
        if shard.pruned_at != 0 && now < shard.pruned_at + 1_000 {
            return;
        }
        shard.pruned_at = now;
        let full = self.capacity();
        let per_minute = self.per_minute();
        shard.buckets.retain(|_, bucket| {
            let refilled = bucket.units.saturating_add(now.saturating_sub(bucket.at).saturating_mul(per_minute));
            refilled < full
        });
    }

    /// Addresses remembered now (for tests of the bound).
    pub fn addresses(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().map(|s| s.buckets.len()).unwrap_or(0)).sum()
    }
}

/// The shard of an address: it spreads the locks. Addresses crafted to fall in one shard only
/// crowd that shard (its overflow bucket limits them together).
fn shard_of(key: &IpAddr) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    (hasher.finish() as usize) % SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(n: u32) -> IpAddr {
        IpAddr::V4((0x0a00_0000 + n).into())
    }

    #[test]
    fn an_address_gets_a_minutes_worth_then_its_rate() {
        let limiter = JoinLimiter::new(6, 1_000);
        for _ in 0..6 {
            assert_eq!(limiter.take(addr(1), 0), Ok(()));
        }
        assert_eq!(limiter.take(addr(1), 0), Err(10), "one join every 10 s");
        assert_eq!(limiter.take(addr(2), 0), Ok(()), "another address has its own");
        assert_eq!(limiter.take(addr(1), 9_999), Err(1));
        assert_eq!(limiter.take(addr(1), 10_000), Ok(()));
    }

    #[test]
    fn a_join_given_back_can_be_taken_again_but_never_above_a_minutes_worth() {
        let limiter = JoinLimiter::new(2, 1_000);
        assert_eq!((limiter.take(addr(1), 0), limiter.take(addr(1), 0)), (Ok(()), Ok(())));
        assert!(limiter.take(addr(1), 0).is_err());
        limiter.give_back(addr(1));
        assert_eq!(limiter.take(addr(1), 0), Ok(()), "a full line's refusal costs no join");
        limiter.give_back(addr(1));
        limiter.give_back(addr(1));
        limiter.give_back(addr(1));
        assert_eq!((limiter.take(addr(1), 0), limiter.take(addr(1), 0)), (Ok(()), Ok(())));
        assert!(limiter.take(addr(1), 0).is_err(), "at most a minute's worth");
        limiter.give_back(addr(9)); // never seen: nothing to give back, nothing breaks
    }

    #[test]
    fn an_ipv6_64_counts_as_one_address() {
        let limiter = JoinLimiter::new(1, 1_000);
        assert_eq!(limiter.take("2001:db8::1".parse().unwrap(), 0), Ok(()));
        assert!(limiter.take("2001:db8::ffff:2".parse().unwrap(), 0).is_err());
        assert_eq!(limiter.take("2001:db8:0:1::1".parse().unwrap(), 0), Ok(()));
    }

    #[test]
    fn memory_is_bounded_however_many_addresses_come() {
        let limiter = JoinLimiter::new(2, 1_600);
        // A flood from a million addresses, each joining once: the table keeps its size, and
        // those beyond it share overflow buckets (limited together, not let through).
        let mut refused = 0;
        for n in 0..1_000_000 {
            if limiter.take(addr(n), 0).is_err() {
                refused += 1;
            }
        }
        assert!(limiter.addresses() <= 1_600, "{}", limiter.addresses());
        assert!(refused > 990_000, "{refused} refused");
        // A minute later the flood has passed: buckets refilled are forgotten for newcomers.
        assert_eq!(limiter.take(addr(2_000_000), 60_000), Ok(()));
        assert!(limiter.addresses() <= 1_600);
    }
}
