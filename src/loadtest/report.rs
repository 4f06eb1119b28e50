//! What a run measured: counts, HDR latency percentiles, fairness, the admission rate and the
//! peak of admitted sessions against the room's configuration, and a per-second timeline for
//! the plots. Built from every visitor's story once the run is over.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{Draw, Options, Outcome};

/// Two admissions closer than one scheduler step are simultaneous: a step grants several
/// turns at once, and their messages reach the crowd in any order.
const SAME_STEP: Duration = crate::wire::STEP;

/// The room's settings the run is held against (from `--config` or the command line).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct RoomLimits {
    pub admit_per_minute: u32,
    pub max_active: u32,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        }
    }
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1_000.0
}

/// Microseconds from 1 µs to one hour (longer values saturate), 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// One second of the run, for the plots.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Second {
    pub second: u64,
    /// The planned arrival rate at the start of the second.
    pub planned_rate: f64,
    pub arrivals: u64,
    pub admissions: u64,
    pub errors: u64,
    /// Visitors holding a ticket and not yet admitted, at the end of the second.
    pub waiting: u64,
    /// Admitted sessions not yet left, at the end of the second.
    pub sessions: u64,
    /// Joins of the visitors who arrived in this second.
    pub join_p50_ms: Option<f64>,
    pub join_p99_ms: Option<f64>,
    /// Forwarded requests of the visitors admitted in this second.
    pub forwarded_p99_ms: Option<f64>,
}

/// The outcome of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Visitors who arrived.
    pub visitors: u64,
    /// Visitors who got a ticket or were admitted at once.
    pub joined: u64,
    /// Visitors whose forwarded request reached the upstream.
    pub admitted: u64,
    pub seconds: f64,
    /// Joins per second over the arrival window (`arrival_seconds`), not the whole run.
    pub joins_per_second: f64,
    /// How long visitors arrived: the run's duration or its crowd's last arrival.
    pub arrival_seconds: f64,
    /// The first request of each visitor.
    pub join_latency_ms: Percentiles,
    /// The request forwarded with the token.
    pub forwarded_latency_ms: Percentiles,
    /// From the first request to the turn.
    pub time_to_admission_ms: Percentiles,
    /// Admissions per minute of visitors who waited, from the first such admission to the
    /// last (the room's rate while the crowd outruns it).
    pub admissions_per_minute: Option<f64>,
    /// Seconds of the marks' pauses left out of `admissions_per_minute`
    /// (`--rate-excludes-marks`).
    pub rate_excluded_seconds: f64,
    /// Visitors who ended in an error, of every kind.
    pub errors_total: u64,
    /// The room's settings, when known.
    pub configured: Option<RoomLimits>,
    /// `admissions_per_minute` against the configured rate, in percent.
    pub admission_rate_error_percent: Option<f64>,
    /// The most sessions admitted and not yet left at one time, as the crowd saw them: from the
    /// turn to the leave request (or to the end of the run without `--leave`).
    pub peak_sessions: u64,
    /// How far `peak_sessions` went over `max_active` (0 when it never did); measured only
    /// when visitors leave (otherwise sessions end out of the crowd's sight, when they expire).
    pub capacity_overshoot: Option<u64>,
    /// Pairs admitted out of join (ticket) order, by more than one scheduler step.
    pub fifo_inversions: u64,
    /// By how much the worst of them was out of order: from the later ticket's turn learned
    /// to the earliest the earlier one's can have come, in ms.
    pub worst_inversion_ms: Option<f64>,
    /// The first few of them: the earlier ticket, when its turn can have come at the
    /// earliest (s), the later ticket, and when it learned of its turn (s).
    pub inversion_examples: Vec<(u64, f64, u64, f64)>,
    /// Visitors who lost their place: their shown position went up, their turn was refused
    /// and they were sent to the back, or they joined and were never admitted.
    pub places_lost: u64,
    /// The same, by how.
    pub lost: BTreeMap<String, u64>,
    /// What went wrong and was retried as a browser retries it (not lost, not errors).
    pub retries: BTreeMap<String, u64>,
    /// Joins refused with 429, by the reason the proxy gave (`too_many_joins`: the room's
    /// `joins_per_address_per_minute`).
    pub refused: BTreeMap<String, u64>,
    /// Where the visitors came from: a range of source addresses, and whether it was the
    /// default for targets on loopback; `None` for this machine's one address.
    pub sources: Option<String>,
    /// For each mark of `--marks` (e.g. the end of a fault): how long until the next turn.
    pub recoveries: Vec<Recovery>,
    pub errors: BTreeMap<String, u64>,
    /// A scheduled sale's start, when the crowd went through its pre-queue.
    pub sale: Option<SaleReport>,
    pub timeline: Vec<Second>,
}

/// How fair a sale's start was, as the crowd saw it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SaleReport {
    pub event: String,
    /// The start, in seconds from the start of the run.
    pub starts_at: f64,
    /// Pre-queue numbers the draw placed (the whole pre-queue, whoever made it).
    pub prequeued: u64,
    /// This run's visitors who took a pre-queue number.
    pub prequeue_visitors: u64,
    /// The published seed.
    pub seed: String,
    /// Pre-queue visitors admitted (or placed) with exactly the ticket the published draw
    /// gives their number, and those with another.
    pub placed_by_draw: u64,
    pub misplaced: u64,
    /// Spearman's rank correlation between the order of arrival in the pre-queue and the
    /// order of admission: about 0 when arriving early gave no head start, 1 for first come
    /// first served.
    pub arrival_admission_correlation: Option<f64>,
    /// Seconds from the start to the first admission, and to the 1000th.
    pub first_admission_after_start: Option<f64>,
    pub thousandth_admission_after_start: Option<f64>,
    /// Visitors who came after the start and were admitted more than one step before a
    /// pre-queue visitor's turn can have come (0: they lined up behind).
    pub later_arrivals_ahead: u64,
}

impl SaleReport {
    fn new(outcomes: &[Outcome], draw: &Draw, started_unix_ms: u64) -> SaleReport {
        let order = crate::wire::shuffle::Shuffle::new(&draw.seed, 1, draw.prequeued);
        let prequeued: Vec<&Outcome> = outcomes.iter().filter(|o| o.prequeue.is_some()).collect();
        let placed = prequeued.iter().filter(|o| o.ticket.is_some());
        let (matched, misplaced): (Vec<&&Outcome>, Vec<&&Outcome>) =
            placed.partition(|o| o.ticket == o.prequeue.map(|n| draw.ticket(&order, n)));
        let starts_at = Duration::from_millis(draw.starts_at_unix_ms.saturating_sub(started_unix_ms));
        let mut admissions: Vec<Duration> =
            outcomes.iter().filter_map(|o| o.admitted).filter(|at| *at >= starts_at).collect();
        admissions.sort();
        let after_start = |n: usize| admissions.get(n).map(|at| (*at - starts_at).as_secs_f64());
        let last_prequeue_turn = prequeued.iter().filter_map(|o| o.turn_from.or(o.admitted)).max();
        let later_arrivals_ahead = outcomes
            .iter()
            .filter(|o| o.prequeue.is_none() && o.arrived >= starts_at)
            .filter_map(|o| o.admitted)
            .filter(|learned| last_prequeue_turn.is_some_and(|last| *learned + SAME_STEP < last))
            .count() as u64;
        let ranked: Vec<(u64, Duration)> = prequeued.iter().filter_map(|o| Some((o.prequeue?, o.admitted?))).collect();
        SaleReport {
            event: draw.event.clone(),
            starts_at: starts_at.as_secs_f64(),
            prequeued: draw.prequeued,
            prequeue_visitors: prequeued.len() as u64,
            seed: crate::wire::shuffle::hex(&draw.seed),
            placed_by_draw: matched.len() as u64,
            misplaced: misplaced.len() as u64,
            arrival_admission_correlation: spearman(&ranked),
            first_admission_after_start: after_start(0),
            thousandth_admission_after_start: after_start(999),
            later_arrivals_ahead,
        }
    }
}

/// Spearman's rank correlation of pairs (ties broken by position: admissions in one step
/// come in any order, which only pulls it towards 0); `None` for fewer than 3.
fn spearman(pairs: &[(u64, Duration)]) -> Option<f64> {
    let n = pairs.len();
    if n < 3 {
        return None;
    }
    let ranks = |mut keyed: Vec<(usize, u128)>| {
        keyed.sort_by_key(|(_, key)| *key);
        let mut ranks = vec![0f64; n];
        for (rank, (index, _)) in keyed.into_iter().enumerate() {
            ranks[index] = rank as f64;
        }
        ranks
    };
    let first = ranks(pairs.iter().enumerate().map(|(i, (a, _))| (i, u128::from(*a))).collect());
    let second = ranks(pairs.iter().enumerate().map(|(i, (_, b))| (i, b.as_nanos())).collect());
    let squares: f64 = first.iter().zip(&second).map(|(a, b)| (a - b) * (a - b)).sum();
    let n = n as f64;
    Some(1.0 - 6.0 * squares / (n * (n * n - 1.0)))
}

/// The next turn after a marked moment.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recovery {
    pub label: String,
    /// The mark, in seconds from the start of the run.
    pub at: f64,
    /// Seconds from the mark to the first turn that certainly came after it (`None`: none did).
    pub next_admission_after: Option<f64>,
}

impl Report {
    /// The slowest recovery; `None` without marks, infinite when a mark saw no turn after it.
    pub fn slowest_recovery(&self) -> Option<f64> {
        self.recoveries.iter().map(|r| r.next_admission_after.unwrap_or(f64::INFINITY)).reduce(f64::max)
    }
}

impl Report {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The report of a run of `options` that took `seconds`.
    /// `draw`: what the room published of its sale, and when the run started (unix ms).
    pub(crate) fn new(
        outcomes: &[Outcome],
        seconds: f64,
        options: &Options,
        marks: &super::Marks,
        draw: Option<&(Draw, u64)>,
    ) -> Report {
        let configured = options.configured;
        let (mut join, mut forwarded, mut admission) = (histogram(), histogram(), histogram());
        let (mut errors, mut lost, mut retries) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        let mut refused = BTreeMap::new();
        for outcome in outcomes {
            let joined = outcome.ticket.is_some() || outcome.prequeue.is_some();
            let never_admitted = joined && outcome.admitted.is_none();
            if let Some(how) = outcome.lost.or(never_admitted.then_some("joined, never admitted")) {
                *lost.entry(how.to_owned()).or_insert(0) += 1;
            }
            for retry in &outcome.retries {
                *retries.entry((*retry).to_owned()).or_insert(0) += 1;
            }
            for reason in &outcome.refused {
                *refused.entry(reason.clone()).or_insert(0) += 1;
            }
            if let Some(us) = outcome.join_us {
                join.saturating_record(us);
            }
            if let Some(us) = outcome.forwarded_us {
                forwarded.saturating_record(us);
            }
            if let Some(admitted) = outcome.admitted {
                admission.saturating_record((admitted - outcome.arrived).as_micros() as u64);
            }
            if let Some(error) = outcome.error {
                *errors.entry(error.to_owned()).or_insert(0) += 1;
            }
        }
        let mut order: Vec<Turn> = outcomes
            .iter()
            .filter_map(|o| Some(Turn { ticket: o.ticket?, from: o.turn_from.or(o.admitted)?, learned: o.admitted? }))
            .collect();
        order.sort_by_key(|turn| turn.ticket);
        let joined = outcomes.iter().filter(|o| o.ticket.is_some() || o.prequeue.is_some()).count() as u64;
        let pauses: &[(Duration, Duration)] = if options.rate_excludes_marks { &marks.pauses } else { &[] };
        let (admissions_per_minute, rate_excluded_seconds) = match admission_rate(outcomes, pauses) {
            Some((rate, excluded)) => (Some(rate), excluded),
            None => (None, 0.0),
        };
        // Joins per second while visitors arrived (the drain after the last arrival is no
        // time to join in).
        let arrival_seconds = options.arrivals_end().map_or(seconds, |end| end.as_secs_f64().min(seconds));
        let end = Duration::from_secs_f64(seconds);
        let arrivals_end = options.arrivals_end();
        let peak_sessions = peak(outcomes.iter().filter_map(|o| Some((o.admitted?, o.released.unwrap_or(end)))));
        Report {
            visitors: outcomes.len() as u64,
            joined,
            admitted: outcomes.iter().filter(|o| o.forwarded_us.is_some()).count() as u64,
            seconds,
            joins_per_second: joined as f64 / arrival_seconds.max(f64::EPSILON),
            arrival_seconds,
            rate_excluded_seconds,
            join_latency_ms: Percentiles::of(&join),
            forwarded_latency_ms: Percentiles::of(&forwarded),
            time_to_admission_ms: Percentiles::of(&admission),
            admissions_per_minute,
            errors_total: errors.values().sum(),
            configured,
            admission_rate_error_percent: configured
                .zip(admissions_per_minute)
                .map(|(room, measured)| (measured / room.admit_per_minute as f64 - 1.0) * 100.0),
            peak_sessions,
            capacity_overshoot: configured
                .filter(|_| options.leave)
                .map(|room| peak_sessions.saturating_sub(room.max_active.into())),
            fifo_inversions: inversions(&order),
            worst_inversion_ms: inverted(&order)
                .map(|(earlier, later)| (earlier.from - later.learned).as_secs_f64() * 1_000.0)
                .reduce(f64::max),
            inversion_examples: inverted(&order)
                .take(10)
                .map(|(e, l)| (e.ticket, e.from.as_secs_f64(), l.ticket, l.learned.as_secs_f64()))
                .collect(),
            places_lost: lost.values().sum(),
            lost,
            retries,
            refused,
            sources: options.sources.map(|net| {
                let why = if options.sources_by_default { " (the default against a target on loopback)" } else { "" };
                format!("{net}{why}")
            }),
            recoveries: marks.points.iter().map(|(at, label)| recovery(&order, *at, label)).collect(),
            errors,
            sale: draw.map(|(draw, started_unix_ms)| SaleReport::new(outcomes, draw, *started_unix_ms)),
            timeline: timeline(outcomes, end, &|at| match arrivals_end {
                Some(arrivals_end) if at >= arrivals_end => 0.0,
                _ => options.arrivals.rate_at(at),
            }),
        }
    }
}

/// Admissions per minute among visitors who waited for their turn: n - 1 gaps between the
/// first and the last.
fn admission_rate(outcomes: &[Outcome], pauses: &[(Duration, Duration)]) -> Option<(f64, f64)> {
    let mut turns: Vec<Duration> = outcomes.iter().filter(|o| o.waited.is_some()).filter_map(|o| o.admitted).collect();
    turns.sort();
    let (first, last) = (*turns.first()?, *turns.last()?);
    // The pauses' time within the span, each moment counted once.
    let mut windows: Vec<(Duration, Duration)> =
        pauses.iter().map(|&(from, to)| (from.max(first), to.min(last))).filter(|(from, to)| from < to).collect();
    windows.sort();
    let (mut excluded, mut reached) = (Duration::ZERO, first);
    for (from, to) in windows {
        let from = from.max(reached);
        if to > from {
            excluded += to - from;
            reached = to;
        }
    }
    let span = (last - first).saturating_sub(excluded).as_secs_f64();
    (turns.len() >= 2 && span > 0.0).then(|| ((turns.len() - 1) as f64 * 60.0 / span, excluded.as_secs_f64()))
}

/// The most intervals open at once; an interval closing at the instant another opens does
/// not overlap it.
fn peak(intervals: impl Iterator<Item = (Duration, Duration)>) -> u64 {
    let mut events: Vec<(Duration, i64)> = intervals.flat_map(|(from, to)| [(from, 1), (to, -1)]).collect();
    events.sort();
    let (mut open, mut most) = (0i64, 0i64);
    for (_, change) in events {
        open += change;
        most = most.max(open);
    }
    most as u64
}

/// A visitor's turn as the crowd saw it: learned at `learned`, and come no earlier than
/// `from` (the same, unless the visitor's feed was down when it came).
#[derive(Debug, Clone, Copy)]
struct Turn {
    ticket: u64,
    from: Duration,
    learned: Duration,
}

/// Pairs where a later ticket's turn was learned of more than one step before an earlier
/// ticket's turn can have come.
fn inverted(by_ticket: &[Turn]) -> impl Iterator<Item = (&Turn, &Turn)> {
    by_ticket.iter().enumerate().flat_map(move |(i, earlier)| {
        by_ticket[i + 1..]
            .iter()
            .filter(move |later| later.learned + SAME_STEP < earlier.from)
            .map(move |later| (earlier, later))
    })
}

fn inversions(by_ticket: &[Turn]) -> u64 {
    inverted(by_ticket).count() as u64
}

/// The first turn that certainly came after the mark `at` (its earliest possible moment is
/// at or after it), and how long after the mark it was learned of.
fn recovery(turns: &[Turn], at: Duration, label: &str) -> Recovery {
    let next = turns.iter().filter(|turn| turn.from >= at).map(|turn| turn.learned).min();
    Recovery {
        label: label.to_owned(),
        at: at.as_secs_f64(),
        next_admission_after: next.map(|learned| (learned - at).as_secs_f64()),
    }
}

/// `planned`: the arrival rate the schedule meant at a time.
fn timeline(outcomes: &[Outcome], end: Duration, planned: &dyn Fn(Duration) -> f64) -> Vec<Second> {
    let seconds = end.as_secs_f64().ceil().max(1.0) as usize;
    let bucket = |at: Duration| (at.as_secs() as usize).min(seconds - 1);
    let mut rows: Vec<Second> = (0..seconds)
        .map(|s| Second {
            second: s as u64,
            planned_rate: planned(Duration::from_secs(s as u64)),
            arrivals: 0,
            admissions: 0,
            errors: 0,
            waiting: 0,
            sessions: 0,
            join_p50_ms: None,
            join_p99_ms: None,
            forwarded_p99_ms: None,
        })
        .collect();
    let (mut joins, mut forwards) = (vec![histogram(); seconds], vec![histogram(); seconds]);
    // Changes of the line and of the sessions held, at the end of each second.
    // Index s + 1 holds what changed during second s; what never ends lands past the last row.
    let (mut waiting, mut sessions) = (vec![0i64; seconds + 2], vec![0i64; seconds + 2]);
    let after = |at: Duration| (at.as_secs() as usize + 1).min(seconds + 1);
    for outcome in outcomes {
        let arrived = bucket(outcome.arrived);
        rows[arrived].arrivals += 1;
        if let Some(us) = outcome.join_us {
            joins[arrived].saturating_record(us);
        }
        if let Some(admitted) = outcome.admitted {
            rows[bucket(admitted)].admissions += 1;
            if let Some(us) = outcome.forwarded_us {
                forwards[bucket(admitted)].saturating_record(us);
            }
            sessions[after(admitted)] += 1;
            sessions[after(outcome.released.unwrap_or(end))] -= 1;
        }
        if outcome.error.is_some() {
            rows[bucket(outcome.ended)].errors += 1;
        }
        if let Some((from, to)) = outcome.waited {
            waiting[after(from)] += 1;
            waiting[after(to)] -= 1;
        }
    }
    let (mut in_line, mut held) = (0i64, 0i64);
    for (s, row) in rows.iter_mut().enumerate() {
        in_line += waiting[s + 1];
        held += sessions[s + 1];
        row.waiting = in_line.max(0) as u64;
        row.sessions = held.max(0) as u64;
        let quantile = |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| ms(h.value_at_quantile(q)));
        row.join_p50_ms = quantile(&joins[s], 0.5);
        row.join_p99_ms = quantile(&joins[s], 0.99);
        row.forwarded_p99_ms = quantile(&forwards[s], 0.99);
    }
    rows
}

/// Print the report for a terminal.
pub fn print(report: &Report) {
    let p = |name: &str, p: &Percentiles| {
        println!(
            "  {name:<20} n={:<6} p50 {:>8.1}  p90 {:>8.1}  p99 {:>8.1}  max {:>8.1} ms",
            p.count, p.p50, p.p90, p.p99, p.max
        )
    };
    println!(
        "{} visitors in {:.1} s: {} joined ({:.1}/s over {:.1} s of arrivals), {} admitted, {} FIFO inversions{}, {} errors",
        report.visitors,
        report.seconds,
        report.joined,
        report.joins_per_second,
        report.arrival_seconds,
        report.admitted,
        report.fifo_inversions,
        report.worst_inversion_ms.map_or(String::new(), |ms| format!(" (worst by {ms:.0} ms)")),
        report.error_count()
    );
    p("join", &report.join_latency_ms);
    p("forwarded", &report.forwarded_latency_ms);
    p("time to admission", &report.time_to_admission_ms);
    let rate = report.admissions_per_minute.map_or("-".to_owned(), |r| format!("{r:.1}"));
    if report.rate_excluded_seconds > 0.0 {
        println!("  admission rate measured without {:.1} s of pauses named by --marks", report.rate_excluded_seconds);
    }
    match (report.configured, report.admission_rate_error_percent) {
        (Some(room), Some(error)) => {
            println!("  admissions per minute {rate} vs {} configured ({error:+.2} %)", room.admit_per_minute)
        }
        (Some(room), None) => println!("  admissions per minute {rate} vs {} configured", room.admit_per_minute),
        (None, _) => println!("  admissions per minute {rate}"),
    }
    match report.configured {
        Some(room) => println!(
            "  peak admitted sessions {} (max_active {}, overshoot {})",
            report.peak_sessions,
            room.max_active,
            report.capacity_overshoot.map_or("not measured without --leave".to_owned(), |o| o.to_string())
        ),
        None => println!("  peak admitted sessions {}", report.peak_sessions),
    }
    println!("  places lost {}", report.places_lost);
    for (how, count) in &report.lost {
        println!("    lost: {how}: {count}");
    }
    for recovery in &report.recoveries {
        let after = recovery.next_admission_after.map_or("no turn after it".to_owned(), |s| format!("{s:.2} s"));
        println!("  recovery {:<24} at {:>7.2} s: next turn after {after}", recovery.label, recovery.at);
    }
    println!("  sources {}", report.sources.as_deref().unwrap_or("this machine's one address"));
    for (reason, count) in &report.refused {
        println!("  joins refused (429): {reason}: {count}");
    }
    for (kind, count) in &report.retries {
        println!("  retried: {kind}: {count}");
    }
    for (kind, count) in &report.errors {
        println!("  error: {kind}: {count}");
    }
    if let Some(sale) = &report.sale {
        let seconds = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{s:.2} s"));
        println!(
            "  sale {:?} started at {:.2} s: {} in the pre-queue ({} of this run), seed {}",
            sale.event, sale.starts_at, sale.prequeued, sale.prequeue_visitors, sale.seed
        );
        println!(
            "    placed by the published draw {} of {} (misplaced {}), arrival/admission rank correlation {}",
            sale.placed_by_draw,
            sale.placed_by_draw + sale.misplaced,
            sale.misplaced,
            sale.arrival_admission_correlation.map_or("-".to_owned(), |r| format!("{r:+.3}"))
        );
        println!(
            "    first admission {} after the start, 1000th {}; later arrivals ahead of the pre-queue {}",
            seconds(sale.first_admission_after_start),
            seconds(sale.thousandth_admission_after_start),
            sale.later_arrivals_ahead
        );
    }
}

/// Write the report as JSON.
pub fn write_json(report: &Report, path: &std::path::Path) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn turns(learned: &[(u64, u64)]) -> Vec<Turn> {
        learned.iter().map(|(ticket, at)| Turn { ticket: *ticket, from: ms(*at), learned: ms(*at) }).collect()
    }

    #[test]
    fn inversions_count_only_admissions_more_than_a_step_apart() {
        assert_eq!(inversions(&turns(&[(1, 0), (2, 500), (3, 1000)])), 0);
        assert_eq!(inversions(&turns(&[(1, 50), (2, 0)])), 0, "one step grants both");
        assert_eq!(inversions(&turns(&[(1, 1000), (2, 0), (3, 500)])), 2);
        // Ticket 1's feed was down from 200 ms to 1 s: its turn may have come first.
        let mut reconnected = turns(&[(1, 1000), (2, 500)]);
        reconnected[0].from = ms(200);
        assert_eq!(inversions(&reconnected), 0);
        reconnected[0].from = ms(700);
        assert_eq!(inversions(&reconnected), 1, "its feed came back after ticket 2 was in");
    }

    #[test]
    fn places_lost_count_positions_gone_up_turns_refused_and_visitors_never_admitted() {
        let admitted = |ticket: u64, lost: Option<&'static str>| Outcome {
            ticket: Some(ticket),
            admitted: Some(ms(ticket * 100)),
            lost,
            ..Outcome::default()
        };
        let outcomes = vec![
            admitted(1, None),
            admitted(2, Some("shown position went up")),
            admitted(3, Some("turn refused, sent to the back")),
            Outcome { ticket: Some(4), error: Some("not admitted in time"), ..Outcome::default() },
            // A join refused until patience ran out never held a place.
            Outcome { error: Some("join refused until patience ran out"), ..Outcome::default() },
            Outcome { retries: vec!["feed dropped, reconnected"; 2], ..admitted(5, None) },
        ];
        let options = Options::new("127.0.0.1:1".parse().unwrap(), 6, 1.0).unwrap();
        let report = Report::new(&outcomes, 1.0, &options, &Default::default(), None);
        assert_eq!(report.places_lost, 3);
        let lost: Vec<(&str, u64)> = report.lost.iter().map(|(how, n)| (how.as_str(), *n)).collect();
        assert_eq!(
            lost,
            [("joined, never admitted", 1), ("shown position went up", 1), ("turn refused, sent to the back", 1)]
        );
        assert_eq!(report.retries.get("feed dropped, reconnected"), Some(&2));
        assert_eq!(report.error_count(), 2);
    }

    #[test]
    fn a_sale_report_checks_each_place_against_the_draw_and_times_the_start() {
        let draw = Draw {
            event: "Drop".into(),
            starts_at_unix_ms: 10_000,
            seed: [3; 32],
            prequeued: 4,
            first_ticket: 11,
            shuffled: true,
        };
        let order = crate::wire::shuffle::Shuffle::new(&draw.seed, 1, 4);
        // Numbers 1 to 4, admitted in their drawn order from 1 s after the start; number 4's
        // place is not the one drawn.
        let mut outcomes: Vec<Outcome> = (1..=4)
            .map(|n| {
                let ticket = draw.ticket(&order, n);
                Outcome {
                    prequeue: Some(n),
                    ticket: Some(if n == 4 { 99 } else { ticket }),
                    admitted: Some(ms(1_000 + (ticket - 10) * 100)),
                    ..Outcome::default()
                }
            })
            .collect();
        // A later arrival admitted behind them, and one ahead of them.
        outcomes.push(Outcome {
            arrived: ms(3_000),
            ticket: Some(15),
            admitted: Some(ms(3_100)),
            ..Outcome::default()
        });
        outcomes.push(Outcome { arrived: ms(3_000), ticket: Some(16), admitted: Some(ms(500)), ..Outcome::default() });
        let sale = SaleReport::new(&outcomes, &draw, 9_000);
        assert_eq!((sale.placed_by_draw, sale.misplaced, sale.prequeue_visitors), (3, 1, 4));
        assert_eq!(sale.starts_at, 1.0);
        assert_eq!(sale.first_admission_after_start, Some(0.1), "ticket 11 at 1.1 s");
        assert_eq!(sale.thousandth_admission_after_start, None, "not a thousand of them");
        assert_eq!(sale.later_arrivals_ahead, 1);
        assert_eq!(sale.seed, "03".repeat(32));
    }

    #[test]
    fn the_worst_inversion_is_measured() {
        let turn =
            |ticket: u64, at: u64| Outcome { ticket: Some(ticket), admitted: Some(ms(at)), ..Outcome::default() };
        let options = Options::new("127.0.0.1:1".parse().unwrap(), 3, 1.0).unwrap();
        let report = Report::new(&[turn(1, 1_000), turn(2, 0), turn(3, 700)], 2.0, &options, &Default::default(), None);
        assert_eq!((report.fifo_inversions, report.worst_inversion_ms), (2, Some(1_000.0)));
        let report = Report::new(&[turn(1, 0), turn(2, 50)], 2.0, &options, &Default::default(), None);
        assert_eq!((report.fifo_inversions, report.worst_inversion_ms), (0, None));
    }

    #[test]
    fn the_rank_correlation_tells_first_come_first_served_from_a_draw() {
        let pairs = |order: &[u64]| -> Vec<(u64, Duration)> {
            order.iter().enumerate().map(|(i, n)| (*n, ms(i as u64 * 10))).collect()
        };
        assert_eq!(spearman(&pairs(&[1, 2, 3, 4, 5])), Some(1.0));
        assert_eq!(spearman(&pairs(&[5, 4, 3, 2, 1])), Some(-1.0));
        assert_eq!(spearman(&pairs(&[1, 2])), None);
        let drawn = crate::wire::shuffle::Shuffle::new(&[5; 32], 1, 2_000);
        let by_draw: Vec<u64> = (1..=2_000).map(|place| drawn.ticket_at(place)).collect();
        let rho = spearman(&pairs(&by_draw)).unwrap();
        assert!(rho.abs() < 0.1, "a draw owes nothing to the order of arrival: {rho}");
    }

    #[test]
    fn a_recovery_is_timed_to_the_first_turn_certainly_after_the_mark() {
        let mut order = turns(&[(1, 900), (2, 2_000), (3, 3_500)]);
        // Ticket 2 learned of its turn at 2 s on reconnecting: it may have come before the mark.
        order[1].from = ms(500);
        let recovered = recovery(&order, ms(1_000), "redis back");
        assert_eq!((recovered.label.as_str(), recovered.at), ("redis back", 1.0));
        assert_eq!(recovered.next_admission_after, Some(2.5));
        assert_eq!(recovery(&order, ms(4_000), "late").next_admission_after, None);
    }

    #[test]
    fn the_peak_counts_overlapping_sessions_only() {
        assert_eq!(peak([(ms(0), ms(10)), (ms(10), ms(20)), (ms(20), ms(30))].into_iter()), 1, "back to back");
        assert_eq!(peak([(ms(0), ms(15)), (ms(10), ms(20)), (ms(12), ms(30))].into_iter()), 3);
        assert_eq!(peak(std::iter::empty()), 0);
    }

    fn waited(admitted: u64) -> Outcome {
        Outcome { waited: Some((ms(0), ms(admitted))), admitted: Some(ms(admitted)), ..Outcome::default() }
    }

    #[test]
    fn the_admission_rate_is_taken_between_the_first_and_last_waiting_turns() {
        // Turns every 100 ms: 600 a minute. A visitor admitted at once does not count.
        let mut outcomes: Vec<Outcome> = (0..11).map(|n| waited(1_000 + n * 100)).collect();
        outcomes.push(Outcome { admitted: Some(ms(0)), ..Outcome::default() });
        let (rate, excluded) = admission_rate(&outcomes, &[]).unwrap();
        assert!((rate - 600.0).abs() < 1e-6 && excluded == 0.0, "{rate}");
        assert_eq!(admission_rate(&outcomes[..1], &[]), None);
    }

    #[test]
    fn the_pauses_of_the_marks_are_left_out_of_the_rate_when_asked() {
        // 600 a minute from 1 s to 2 s, nothing for 8 s (an outage), 600 a minute again.
        let outcomes: Vec<Outcome> =
            (0..=10).map(|n| waited(1_000 + n * 100)).chain((1..=10).map(|n| waited(10_000 + n * 100))).collect();
        let (with_pause, _) = admission_rate(&outcomes, &[]).unwrap();
        assert!(with_pause < 150.0, "the pause drags the rate down: {with_pause}");
        // The pause, named twice (overlapping) and reaching past the last turn: counted once,
        // within the span.
        let pauses = [(ms(2_000), ms(10_000)), (ms(3_000), ms(9_000)), (ms(10_500), ms(30_000))];
        let (rate, excluded) = admission_rate(&outcomes, &pauses).unwrap();
        assert!((excluded - 8.5).abs() < 1e-9, "{excluded}");
        // 20 intervals in 10 s (1 s to 11 s) less 8.5 s.
        assert!((rate - 20.0 * 60.0 / 1.5).abs() < 1e-6, "{rate}");
    }

    #[test]
    fn the_timeline_counts_the_line_and_the_sessions_at_each_second_end() {
        let outcomes = vec![
            // Waits 0.5 s -> 2.5 s, holds a session to 3.2 s.
            Outcome {
                arrived: ms(400),
                join_us: Some(2_000),
                waited: Some((ms(500), ms(2_500))),
                admitted: Some(ms(2_500)),
                forwarded_us: Some(1_500),
                released: Some(ms(3_200)),
                ..Outcome::default()
            },
            // Fails at 1.5 s.
            Outcome { arrived: ms(1_100), error: Some("x"), ended: ms(1_500), ..Outcome::default() },
        ];
        let rows = timeline(&outcomes, ms(4_000), &|at| if at < ms(2_000) { 1.0 } else { 0.0 });
        let column = |f: fn(&Second) -> u64| rows.iter().map(f).collect::<Vec<_>>();
        assert_eq!(column(|r| r.arrivals), [1, 1, 0, 0]);
        assert_eq!(column(|r| r.waiting), [1, 1, 0, 0]);
        assert_eq!(column(|r| r.sessions), [0, 0, 1, 0]);
        assert_eq!(column(|r| r.admissions), [0, 0, 1, 0]);
        assert_eq!(column(|r| r.errors), [0, 1, 0, 0]);
        assert_eq!(rows.iter().map(|r| r.planned_rate).collect::<Vec<_>>(), [1.0, 1.0, 0.0, 0.0]);
        assert_eq!(rows[0].join_p99_ms, Some(2.0));
        assert_eq!(rows[2].forwarded_p99_ms, Some(1.5));
        assert_eq!(rows[1].join_p99_ms, None);
    }
}
