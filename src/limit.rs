//! Limits per client address: joins (a token bucket per address, per IPv6 /64, in bounded
//! memory) and things held open (connections, feed sockets: [`Slots`]).
//!
//! The join limiter is written by hand rather than with a keyed limiter crate: those keep every key seen until a
//! cleanup pass, so a flood from many addresses grows memory between passes. Here each of 16
//! shards holds at most its share of addresses; a full shard first forgets buckets that have
//! refilled (their addresses owe nothing), and when none has, newcomers share one overflow
//! bucket per shard: under a flood from more addresses than the table holds, they are limited
//! together rather than not at all.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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

/// A connection's places under the caps: `server.max_connections` and, for a client that
/// is not a trusted proxy, `server.max_connections_per_address`. Kept by the connection and
/// by a tunnel it turns into, freed when both are done.
#[derive(Debug)]
pub struct ConnectionPlace {
    pub total: tokio::sync::OwnedSemaphorePermit,
    pub address: Option<Slot>,
}

/// How many times its per-address cap one IPv6 /48 may hold (a site's network, which holds
/// 65 536 /64s: counted by /64 alone, one /48 could take every slot).
const PER_48: usize = 16;

/// Things held open (connections, feed sockets), capped per client address and in total. An
/// IPv6 client counts by its /64, and its /48 holds at most [`PER_48`] times that. Memory is
/// one entry per address holding something now, gone with its last slot.
#[derive(Debug)]
pub struct Slots {
    total: AtomicUsize,
    held: Mutex<HashMap<IpAddr, usize>>,
    max_total: usize,
    max_per_address: usize,
}

impl Slots {
    pub fn new(max_total: usize, max_per_address: usize) -> Arc<Slots> {
        Arc::new(Slots { total: AtomicUsize::new(0), held: Mutex::default(), max_total, max_per_address })
    }

    /// A slot for `address`, or `None` at a cap.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Option<Slot> {
        let keys = keys_of(address);
        let mut held = self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return None;
        }
        for (key, cap) in keys.iter().flatten() {
            if held.get(key).copied().unwrap_or(0) >= cap.saturating_mul(self.max_per_address) {
                return None;
            }
        }
        for (key, _) in keys.iter().flatten() {
            *held.entry(*key).or_insert(0) += 1;
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Slot { slots: self.clone(), keys })
    }

    /// Slots held now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Addresses holding a slot now (for tests of the bound).
    pub fn addresses(&self) -> usize {
        self.held.lock().map(|held| held.len()).unwrap_or(0)
    }
}

/// The keys `address` counts under, each with its cap in multiples of the per-address cap.
fn keys_of(address: IpAddr) -> [Option<(IpAddr, usize)>; 2] {
    let key = address_key(address);
    match key {
        IpAddr::V4(_) => [Some((key, 1)), None],
        IpAddr::V6(v6) => {
            // The /48 key is kept apart from every /64 key by its low bit, which no /64 sets.
            let site = IpAddr::V6(((u128::from(v6) & !((1u128 << 80) - 1)) | 1).into());
            [Some((key, 1)), Some((site, PER_48))]
        }
    }
}

/// One thing held open under the caps; freed on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    keys: [Option<(IpAddr, usize)>; 2],
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.total.fetch_sub(1, Ordering::Relaxed);
        let mut held = self.slots.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (key, _) in self.keys.iter().flatten() {
            if let Some(count) = held.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    held.remove(key);
                }
            }
        }
    }
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

    #[test]
    fn slots_are_capped_per_address_and_in_total_and_freed_on_drop() {
        let slots = Slots::new(5, 2);
        let a = [slots.admit(addr(1)), slots.admit(addr(1))];
        assert!(a.iter().all(Option::is_some));
        assert!(slots.admit(addr(1)).is_none(), "the address is at its cap");
        let b = [slots.admit(addr(2)), slots.admit(addr(2)), slots.admit(addr(3))];
        assert!(b.iter().all(Option::is_some));
        assert_eq!(slots.open(), 5);
        assert!(slots.admit(addr(4)).is_none(), "the total is reached");
        drop(a);
        assert!(slots.admit(addr(1)).is_some());
        drop(b);
        assert_eq!(slots.open(), 0);
        assert_eq!(slots.addresses(), 0, "nothing kept for addresses that hold nothing");
    }

    #[test]
    fn an_ipv6_64_is_one_address_and_a_48_holds_sixteen_times_the_cap() {
        let slots = Slots::new(10_000, 2);
        let one = [slots.admit("2001:db8::1".parse().unwrap()), slots.admit("2001:db8::2".parse().unwrap())];
        assert!(one.iter().all(Option::is_some));
        assert!(slots.admit("2001:db8::3".parse().unwrap()).is_none(), "the same /64");
        // Other /64s of the same /48: 16 x 2 in all, then no more.
        let held: Vec<_> =
            (1..100u32).filter_map(|n| slots.admit(format!("2001:db8:0:{n:x}::1").parse().unwrap())).collect();
        assert_eq!(held.len() + one.len(), 32);
        assert!(slots.admit("2001:db8:1::1".parse().unwrap()).is_some(), "another /48");
        // IPv4-mapped addresses count as the IPv4 address they are.
        let v4 = slots.admit("::ffff:10.0.0.1".parse().unwrap());
        let _v4b = slots.admit(addr(1));
        assert!(v4.is_some() && slots.admit(addr(1)).is_none());
    }
}
