//! Admission that listens (`[rooms.adaptive]` in proxy.toml, measured in docs/benchmarks.md): the rate at which turns are granted
//! follows the upstream's health. Over each window the room's leader merges what every
//! instance saw of the upstream (latency of the requests it forwarded into the room, and how
//! many failed), and steps the rate the way TCP congestion control does: down by a factor
//! when the p95 latency or the error ratio is above its target, up by a fixed amount when
//! both are below, never above `admit_per_minute` nor below `min_per_minute`. The rate it
//! decides is kept in the store, where every instance's line scripts read it: one rate.
//!
//! Latencies are kept in fixed logarithmic buckets (each 25 % wider than the one before,
//! from 1 ms to about 70 s) rather than in a crate's histogram: counts per bucket are what
//! instances send through the store, a few dozen integers, and merge by adding; the p95 read
//! from them is within a bucket's width (interpolated inside it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::AdaptiveConfig;

/// Each bucket's upper bound is this times the one before.
const GROWTH: f64 = 1.25;
/// Buckets: 0 holds up to 1 ms, bucket `i` up to `GROWTH^i` ms; the last holds the rest.
const BUCKETS: usize = 51;

fn bucket_of(took: Duration) -> usize {
    let ms = took.as_secs_f64() * 1_000.0;
    if ms <= 1.0 {
        return 0;
    }
    ((ms.ln() / GROWTH.ln()).ceil() as usize).min(BUCKETS - 1)
}

fn upper_bound_ms(bucket: usize) -> f64 {
    GROWTH.powi(bucket as i32)
}

/// What this instance saw of the upstream for one room since it started: counters that only
/// grow, observed with a few relaxed atomic adds per forwarded request.
#[derive(Debug)]
pub struct Health {
    count: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl Default for Health {
    fn default() -> Health {
        Health {
            count: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Health {
    /// A request forwarded into the room was answered after `took` (its response head), or
    /// failed (a 5xx, or no answer at all).
    pub fn observe(&self, took: Duration, failed: bool) {
        self.buckets[bucket_of(took)].fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn totals(&self) -> Totals {
        Totals {
            count: self.count.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            buckets: self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
        }
    }
}

/// Counts of requests, failures and latencies: an instance's since it started, or a window's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub count: u64,
    pub errors: u64,
    pub buckets: Vec<u64>,
}

impl Totals {
    /// What was counted since `before` (an earlier reading of the same instance). An instance
    /// that restarted counts from zero again: then all of `self` is new.
    pub fn since(&self, before: &Totals) -> Totals {
        let restarted = self.count < before.count
            || self.buckets.len() != before.buckets.len()
            || self.buckets.iter().zip(&before.buckets).any(|(now, then)| now < then);
        if restarted {
            return self.clone();
        }
        Totals {
            count: self.count - before.count,
            errors: self.errors.saturating_sub(before.errors),
            buckets: self.buckets.iter().zip(&before.buckets).map(|(now, then)| now - then).collect(),
        }
    }

    /// Add another instance's counts.
    pub fn add(&mut self, other: &Totals) {
        self.count += other.count;
        self.errors += other.errors;
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
    }

    /// The 95th percentile latency in milliseconds, interpolated inside its bucket; `None`
    /// without requests.
    pub fn p95_ms(&self) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let wanted = (total as f64 * 0.95).ceil();
        let mut below = 0.0;
        for (bucket, count) in self.buckets.iter().enumerate() {
            let count = *count as f64;
            if below + count >= wanted {
                let lower = if bucket == 0 { 0.0 } else { upper_bound_ms(bucket - 1) };
                let upper = upper_bound_ms(bucket);
                return Some(lower + (upper - lower) * (wanted - below) / count);
            }
            below += count;
        }
        Some(upper_bound_ms(self.buckets.len().saturating_sub(1)))
    }

    /// Failed requests over all requests; `None` without requests.
    pub fn error_ratio(&self) -> Option<f64> {
        (self.count > 0).then(|| self.errors as f64 / self.count as f64)
    }
}

/// What the controller made of a window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Verdict {
    /// Requests the window held (from every instance).
    pub requests: u64,
    pub p95_ms: Option<f64>,
    pub error_ratio: Option<f64>,
    /// `strained` (a target missed: the rate stepped down), `healthy` (it climbed, or stayed
    /// at the top) or `unsure` (too few requests to judge: the rate held).
    pub judged: &'static str,
    /// The rate decided, per minute.
    pub per_minute: u32,
}

/// The leader's controller: the rate it decided last, as a real number so that small steps
/// add up.
#[derive(Debug, Clone)]
pub struct Controller {
    rate: f64,
}

impl Controller {
    /// Starting from `per_minute` (the rate in force: the configured one, or what the last
    /// leader decided).
    pub fn new(per_minute: u32) -> Controller {
        Controller { rate: f64::from(per_minute) }
    }

    /// Take `per_minute` as the rate in force when it is not what this controller decided
    /// (another instance led meanwhile).
    pub fn follow(&mut self, per_minute: u32) {
        if self.rate.round() as u32 != per_minute {
            self.rate = f64::from(per_minute);
        }
    }

    /// Judge one window of the upstream's health and step the rate; `ceiling` is the room's
    /// `admit_per_minute` now (a live change included).
    pub fn decide(&mut self, config: &AdaptiveConfig, ceiling: u32, window: &Totals) -> Verdict {
        let ceiling = f64::from(ceiling);
        let floor = f64::from(config.min_per_minute(ceiling as u32)).min(ceiling);
        let p95_ms = window.p95_ms();
        let error_ratio = window.error_ratio();
        let judged = if window.count < config.min_requests {
            "unsure"
        } else if p95_ms.is_some_and(|p95| p95 > config.p95_ms as f64)
            || error_ratio.is_some_and(|ratio| ratio > config.error_ratio)
        {
            "strained"
        } else {
            "healthy"
        };
        // Far over the latency target, the step goes deeper than `decrease`: down to
        // target/p95 of the rate (a quarter at most), so a checkout ten times too slow is not
        // given several windows more of the crowd that made it so.
        let factor = match p95_ms {
            Some(p95) if p95 > 0.0 => config.decrease.min((config.p95_ms as f64 / p95).max(DEEPEST_STEP)),
            _ => config.decrease,
        };
        self.rate = match judged {
            "strained" => self.rate * factor,
            "healthy" => self.rate + f64::from(config.increase_per_minute(ceiling as u32)),
            _ => self.rate,
        }
        .clamp(floor, ceiling);
        Verdict { requests: window.count, p95_ms, error_ratio, judged, per_minute: self.per_minute() }
    }

    /// The rate decided, per minute (at least 1).
    pub fn per_minute(&self) -> u32 {
        (self.rate.round() as u32).max(1)
    }
}

/// How often an instance puts its reading in the store (when it saw new requests).
pub const REPORT_EVERY_MS: u64 = 1_000;

/// The deepest single step down: a quarter of the rate.
const DEEPEST_STEP: f64 = 0.25;

/// An instance's reading as it travels through the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reading {
    /// When it was taken (ms).
    at: u64,
    #[serde(flatten)]
    totals: Totals,
}

/// What the leader decided, and the instances whose readings are gone stale (three windows
/// old, or unreadable): to be removed from the store.
#[derive(Debug)]
pub struct Decided {
    pub verdict: Verdict,
    pub stale: Vec<String>,
}

/// A room's part in adaptive admission, on every instance: what it saw of the upstream, the
/// rate in force, and, while it leads, the controller and the readings it last merged.
#[derive(Debug, Default)]
pub struct Listening {
    pub health: Health,
    /// The adaptive rate in force, per minute (decided here, or learned from the store); 0
    /// for none.
    rate: AtomicU32,
    /// Whether the rate is known: read from the store, or decided here. A new process does
    /// not decide (nor tell the store a rate) before it knows the one in force.
    known: std::sync::atomic::AtomicBool,
    leader: Mutex<Leader>,
}

#[derive(Debug, Default)]
struct Leader {
    controller: Option<Controller>,
    /// Each instance's last reading merged, by instance.
    readings: HashMap<String, Totals>,
    decided_at: u64,
    reported_at: u64,
    reported_count: u64,
    last: Option<Verdict>,
}

impl Listening {
    fn leader(&self) -> std::sync::MutexGuard<'_, Leader> {
        self.leader.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The adaptive rate in force, per minute; 0 for none.
    pub fn rate(&self) -> u32 {
        self.rate.load(Ordering::Relaxed)
    }

    /// The rate in force as the store says (a follower learns the leader's decisions so).
    pub fn learn(&self, rate: Option<u32>) {
        self.rate.store(rate.unwrap_or(0), Ordering::Relaxed);
        self.known.store(true, Ordering::Relaxed);
    }

    /// Whether the rate in force is known here (read from the store, or decided here).
    pub fn knows(&self) -> bool {
        self.known.load(Ordering::Relaxed)
    }

    /// Adaptive admission is off (or was turned off by a reload): forget the rate.
    pub fn off(&self) {
        self.rate.store(0, Ordering::Relaxed);
        self.known.store(false, Ordering::Relaxed);
        self.leader().controller = None;
    }

    /// This instance's reading to put in the store, when one is due: at most every
    /// [`REPORT_EVERY_MS`], and only when it saw requests since the last.
    pub fn reading_due(&self, now: u64) -> Option<String> {
        let mut leader = self.leader();
        let totals = self.health.totals();
        if now < leader.reported_at + REPORT_EVERY_MS || totals.count == leader.reported_count {
            return None;
        }
        leader.reported_at = now;
        leader.reported_count = totals.count;
        serde_json::to_string(&Reading { at: now, totals }).ok()
    }

    /// Whether the leader judges a window now.
    pub fn decision_due(&self, config: &AdaptiveConfig, now: u64) -> bool {
        now >= self.leader().decided_at + config.window_ms()
    }

    /// The leader's step: merge what every instance reported since the last window (an
    /// instance first heard of now, or silent for three windows, counts from its next
    /// reading), judge it, and set the rate.
    pub fn decide(&self, config: &AdaptiveConfig, ceiling: u32, readings: &[(String, String)], now: u64) -> Decided {
        let mut leader = self.leader();
        let mut window = Totals::default();
        let mut latest = HashMap::new();
        let mut stale = Vec::new();
        for (instance, text) in readings {
            let reading = serde_json::from_str::<Reading>(text).ok();
            let Some(reading) = reading.filter(|r| r.at + 3 * config.window_ms() >= now) else {
                stale.push(instance.clone());
                continue;
            };
            if let Some(before) = leader.readings.get(instance) {
                window.add(&reading.totals.since(before));
            }
            latest.insert(instance.clone(), reading.totals);
        }
        leader.decided_at = now;
        let in_force = match self.rate() {
            0 => ceiling,
            rate => rate.min(ceiling),
        };
        let controller = leader.controller.get_or_insert_with(|| Controller::new(in_force));
        controller.follow(in_force);
        let verdict = controller.decide(config, ceiling, &window);
        if verdict.judged == "unsure" {
            // Too few requests to judge: the window goes on (each instance's baseline stays)
            // until it holds enough, so a low rate's little traffic is judged in the end
            // rather than thrown away window after window.
            for (instance, totals) in latest {
                leader.readings.entry(instance).or_insert(totals);
            }
            leader.readings.retain(|instance, _| !stale.contains(instance));
        } else {
            leader.readings = latest;
        }
        self.rate.store(verdict.per_minute, Ordering::Relaxed);
        self.known.store(true, Ordering::Relaxed);
        leader.last = Some(verdict);
        Decided { verdict, stale }
    }

    /// The last window the leader judged here.
    pub fn last_verdict(&self) -> Option<Verdict> {
        self.leader().last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> AdaptiveConfig {
        toml::from_str(text).unwrap()
    }

    fn config_with_decrease(decrease: f64) -> AdaptiveConfig {
        config(&format!("p95_ms = 200\ndecrease = {decrease}\nmin_requests = 10"))
    }

    fn window(latency_ms: u64, requests: u64, errors: u64) -> Totals {
        let health = Health::default();
        for i in 0..requests {
            health.observe(Duration::from_millis(latency_ms), i < errors);
        }
        health.totals()
    }

    #[test]
    fn the_p95_is_read_within_a_bucket_of_the_truth() {
        let health = Health::default();
        for ms in 1..=1_000 {
            health.observe(Duration::from_millis(ms), false);
        }
        let p95 = health.totals().p95_ms().unwrap();
        assert!((950.0 * 0.8..=950.0 * 1.25).contains(&p95), "{p95}");
        assert_eq!(Totals::default().p95_ms(), None);
        assert_eq!(window(3, 10, 0).p95_ms().map(|p| p <= 3.0 * GROWTH), Some(true));
        assert_eq!(window(10, 8, 2).error_ratio(), Some(0.25));
    }

    #[test]
    fn windows_are_differences_of_readings_and_a_restart_counts_from_zero() {
        let health = Health::default();
        health.observe(Duration::from_millis(5), false);
        let first = health.totals();
        health.observe(Duration::from_millis(500), true);
        let second = health.totals();
        let window = second.since(&first);
        assert_eq!((window.count, window.errors), (1, 1));
        assert!(window.p95_ms().unwrap() > 400.0);
        // Another instance's reading, after it restarted: lower than the last one seen.
        let restarted = Health::default();
        restarted.observe(Duration::from_millis(7), false);
        assert_eq!(restarted.totals().since(&second), restarted.totals());
        let mut merged = window.clone();
        merged.add(&restarted.totals());
        assert_eq!((merged.count, merged.errors), (2, 1));
    }

    #[test]
    fn the_rate_steps_down_by_a_factor_and_climbs_back_by_steps_never_past_the_ceiling() {
        let config = config("p95_ms = 200\nerror_ratio = 0.05\ndecrease = 0.5\nmin_requests = 10");
        let mut controller = Controller::new(600);
        let slow = window(300, 50, 0);
        let fast = window(20, 50, 0);
        let failing = window(20, 50, 10);
        let rates: Vec<u32> = [&slow, &slow, &failing, &fast, &fast]
            .iter()
            .map(|w| controller.decide(&config, 600, w).per_minute)
            .collect();
        // Down by half on each strained window (p95 of 300 ms against 200: no deeper); up by a
        // tenth of the ceiling (60) on each healthy one.
        assert_eq!(rates, vec![300, 150, 75, 135, 195]);
        // Ten times over the target, one step goes down to a quarter.
        let mut severe = Controller::new(600);
        assert_eq!(severe.decide(&config, 600, &window(2_000, 50, 0)).per_minute, 150);
        let mut mild = Controller::new(600);
        let just_over = config_with_decrease(0.9);
        assert_eq!(mild.decide(&just_over, 600, &window(210, 50, 0)).per_minute, 540, "just over: by `decrease`");
        for _ in 0..20 {
            controller.decide(&config, 600, &fast);
        }
        assert_eq!(controller.per_minute(), 600, "never above admit_per_minute");
        // A live change of the ceiling binds at once.
        assert_eq!(controller.decide(&config, 120, &fast).per_minute, 120);
        // Down to the floor (a tenth of the ceiling by default), not below.
        for _ in 0..20 {
            controller.decide(&config, 600, &slow);
        }
        assert_eq!(controller.per_minute(), 60);
    }

    #[test]
    fn too_few_requests_hold_the_rate() {
        let config = config("p95_ms = 200\nmin_requests = 20");
        let mut controller = Controller::new(300);
        let verdict = controller.decide(&config, 600, &window(5_000, 19, 19));
        assert_eq!((verdict.judged, verdict.per_minute), ("unsure", 300));
        let verdict = controller.decide(&config, 600, &Totals::default());
        assert_eq!((verdict.judged, verdict.per_minute, verdict.p95_ms), ("unsure", 300, None));
    }

    #[test]
    fn the_leader_merges_every_instances_window_and_sets_one_rate() {
        let config = config("p95_ms = 200\nwindow_seconds = 5\ndecrease = 0.5\nmin_requests = 10");
        let (here, there) = (Listening::default(), Listening::default());
        let readings = |at: u64| -> Vec<(String, String)> {
            [("a", &here), ("b", &there)]
                .iter()
                .map(|(id, room)| {
                    let reading = Reading { at, totals: room.health.totals() };
                    (id.to_string(), serde_json::to_string(&reading).unwrap())
                })
                .collect()
        };
        // The first readings are where windows start: nothing judged yet.
        here.health.observe(Duration::from_millis(900), false);
        assert_eq!(here.decide(&config, 600, &readings(0), 0).verdict.judged, "unsure");
        assert!(!here.decision_due(&config, 4_999) && here.decision_due(&config, 5_000));
        // Fast here, slow there: together the p95 is slow (4.5 times the target), and the rate
        // steps down to a quarter.
        for _ in 0..20 {
            here.health.observe(Duration::from_millis(10), false);
        }
        for _ in 0..10 {
            there.health.observe(Duration::from_millis(900), false);
        }
        let verdict = here.decide(&config, 600, &readings(5_000), 5_000).verdict;
        assert_eq!((verdict.requests, verdict.judged, verdict.per_minute), (30, "strained", 150));
        assert_eq!(here.rate(), 150);
        // The other instance follows the rate the store carries.
        there.learn(Some(here.rate()));
        assert_eq!(there.rate(), 150);
        // A reading three windows old is an instance gone: it no longer counts.
        for _ in 0..20 {
            here.health.observe(Duration::from_millis(10), false);
        }
        let mut stale = readings(25_000);
        stale[1].1 = serde_json::to_string(&Reading { at: 5_000, totals: there.health.totals() }).unwrap();
        let decided = here.decide(&config, 600, &stale, 25_000);
        let verdict = decided.verdict;
        assert_eq!((verdict.requests, verdict.judged, verdict.per_minute), (20, "healthy", 210));
        assert_eq!(decided.stale, vec!["b".to_owned()], "a gone instance's reading is to be removed");
    }

    #[test]
    fn windows_too_small_to_judge_add_up_until_one_can_be_judged() {
        // A low rate brings little traffic: 8 requests a window against min_requests = 20.
        let config = config("p95_ms = 200\nwindow_seconds = 5\nmin_requests = 20\nincrease_per_minute = 60");
        let listening = Listening::default();
        listening.learn(Some(60));
        let reading = |at: u64| {
            let totals = listening.health.totals();
            vec![("a".to_owned(), serde_json::to_string(&Reading { at, totals }).unwrap())]
        };
        listening.decide(&config, 600, &reading(0), 0); // the baseline
        let mut judged = Vec::new();
        for window in 1..=3u64 {
            for _ in 0..8 {
                listening.health.observe(Duration::from_millis(10), false);
            }
            judged.push(listening.decide(&config, 600, &reading(window * 5_000), window * 5_000).verdict);
        }
        let seen: Vec<(&str, u64, u32)> = judged.iter().map(|v| (v.judged, v.requests, v.per_minute)).collect();
        assert_eq!(seen, vec![("unsure", 8, 60), ("unsure", 16, 60), ("healthy", 24, 120)]);
    }

    #[test]
    fn a_reading_is_sent_at_most_once_a_second_and_only_with_news() {
        let listening = Listening::default();
        assert_eq!(listening.reading_due(5_000), None, "nothing seen yet");
        listening.health.observe(Duration::from_millis(3), false);
        assert!(listening.reading_due(5_000).is_some());
        listening.health.observe(Duration::from_millis(3), false);
        assert_eq!(listening.reading_due(5_999), None);
        assert!(listening.reading_due(6_000).is_some());
        assert_eq!(listening.reading_due(9_000), None, "no news");
    }

    #[test]
    fn a_new_leader_goes_on_from_the_rate_in_force() {
        let config = config("p95_ms = 200\nincrease_per_minute = 10\nmin_requests = 1");
        let mut controller = Controller::new(600);
        controller.follow(240);
        assert_eq!(controller.decide(&config, 600, &window(10, 5, 0)).per_minute, 250);
    }
}
