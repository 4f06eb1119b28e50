//! Requests refused or failed, summarised in the log: under a flood, one line per interval
//! (the counts per reason and the addresses that sent most), never one line per request, so
//! that the log cannot become the flood. Each request is counted in metrics as well.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often a summary is written, when there is anything to say.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Distinct (reason, address) pairs kept per interval; the rest are counted together.
const MAX_PAIRS: usize = 1_024;
/// Addresses named in one summary line.
const TOP: usize = 5;

#[derive(Debug, Default)]
struct Window {
    pairs: HashMap<(&'static str, IpAddr), u64>,
    /// Refusals whose pair found the table full.
    unlisted: u64,
}

/// The refusals of the interval under way.
#[derive(Debug, Default)]
pub struct Refusals {
    window: Mutex<Window>,
}

/// One interval's summary.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    /// Refusals per reason, most first.
    pub reasons: Vec<(&'static str, u64)>,
    /// The addresses that were refused most, with their reason and count, most first.
    pub top: Vec<(IpAddr, &'static str, u64)>,
    /// Distinct addresses refused (at least; beyond the table's size they are not told apart).
    pub addresses: usize,
}

impl Refusals {
    /// A request from `client` refused (or failed) for `reason`.
    pub fn note(&self, reason: &'static str, client: IpAddr) {
        let mut window = self.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = (reason, crate::hop::address_key(client));
        if let Some(count) = window.pairs.get_mut(&key) {
            *count += 1;
        } else if window.pairs.len() < MAX_PAIRS {
            window.pairs.insert(key, 1);
        } else {
            window.unlisted += 1;
        }
    }

    /// The interval's summary, and a new interval; `None` when nothing was refused.
    pub fn take(&self) -> Option<Summary> {
        let window = std::mem::take(&mut *self.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        if window.pairs.is_empty() && window.unlisted == 0 {
            return None;
        }
        let mut reasons: HashMap<&'static str, u64> = HashMap::new();
        for ((reason, _), count) in &window.pairs {
            *reasons.entry(reason).or_default() += count;
        }
        let mut reasons: Vec<_> = reasons.into_iter().collect();
        if window.unlisted > 0 {
            reasons.push(("others", window.unlisted));
        }
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let addresses = window.pairs.keys().map(|(_, address)| address).collect::<std::collections::HashSet<_>>().len();
        let mut top: Vec<_> =
            window.pairs.into_iter().map(|((reason, address), count)| (address, reason, count)).collect();
        top.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        top.truncate(TOP);
        Some(Summary { reasons, top, addresses })
    }

    /// Write a summary every [`INTERVAL`] that had refusals, until `stop` (then the last one).
    pub async fn report(&self, stop: CancellationToken) {
        let mut every = tokio::time::interval(INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = every.tick() => false,
                () = stop.cancelled() => true,
            };
            if let Some(summary) = self.take() {
                let reasons: Vec<String> = summary.reasons.iter().map(|(reason, n)| format!("{reason}={n}")).collect();
                let top: Vec<String> =
                    summary.top.iter().map(|(address, reason, n)| format!("{address} {reason}={n}")).collect();
                tracing::info!(
                    seconds = INTERVAL.as_secs(),
                    reasons = %reasons.join(" "),
                    addresses = summary.addresses,
                    top = %top.join(", "),
                    "requests refused or failed"
                );
            }
            if stopping {
                return;
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
    fn a_flood_is_one_summary_per_reason_and_address() {
        let refusals = Refusals::default();
        for _ in 0..10_000 {
            refusals.note("too_many_joins", addr(1));
        }
        for n in 2..12 {
            refusals.note("too_many_joins", addr(n));
        }
        refusals.note("upstream_unreachable", addr(2));
        let summary = refusals.take().unwrap();
        assert_eq!(summary.reasons, [("too_many_joins", 10_010), ("upstream_unreachable", 1)]);
        assert_eq!(summary.top[0], (addr(1), "too_many_joins", 10_000));
        assert_eq!(summary.top.len(), TOP);
        assert_eq!(summary.addresses, 11);
        assert_eq!(refusals.take(), None, "a new interval starts empty");
    }

    #[test]
    fn memory_is_bounded_however_many_addresses_are_refused() {
        let refusals = Refusals::default();
        for n in 0..100_000 {
            refusals.note("too_many_joins", addr(n));
        }
        assert!(refusals.window.lock().unwrap().pairs.len() <= MAX_PAIRS);
        let summary = refusals.take().unwrap();
        let total: u64 = summary.reasons.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 100_000, "every refusal counted");
    }

    #[tokio::test(start_paused = true)]
    async fn the_report_writes_at_most_one_line_per_interval() {
        // The log line itself is tracing's; here: the window is taken once per interval.
        let refusals = std::sync::Arc::new(Refusals::default());
        let stop = CancellationToken::new();
        let reporter = tokio::spawn({
            let refusals = refusals.clone();
            let stop = stop.clone();
            async move { refusals.report(stop).await }
        });
        tokio::task::yield_now().await;
        refusals.note("too_many_joins", addr(1));
        tokio::time::sleep(INTERVAL / 2).await;
        assert!(refusals.window.lock().unwrap().pairs.len() == 1, "not yet reported");
        tokio::time::sleep(INTERVAL).await;
        assert!(refusals.window.lock().unwrap().pairs.is_empty(), "reported at the interval");
        stop.cancel();
        reporter.await.unwrap();
    }
}
