//! Prometheus metrics, served as text on the admin listener's `/metrics`, with the
//! `prometheus-client` crate. Every name starts with `vestibule_`.
//!
//! Cheap on the hot path: each room takes its counter handles once (a `Family` lookup takes a
//! lock), so a request costs an atomic add. The crate's histogram takes a lock per
//! observation; [`AtomicHistogram`] keeps its buckets in atomics instead (written by hand
//! for that reason) and encodes through the crate's encoder.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// What the gate did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Outside every room (or a room let through): forwarded.
    Forwarded,
    /// With a valid token: forwarded.
    Admitted,
    /// Let in by this request (a turn redeemed, or admitted at once on joining): forwarded.
    Entered,
    /// Held: the waiting page or its JSON.
    Waiting,
    /// Asked for a proof of work.
    Challenged,
    /// The room takes nobody new.
    Closed,
    /// Refused: malformed, too many joins from the address, too large.
    Refused,
    /// The store cannot keep the line now.
    Unavailable,
    /// vestibule's own endpoints (`/_vestibule/`).
    Reserved,
    /// Forwarding failed: the upstream was unreachable or too slow.
    UpstreamFailed,
    /// Inside a room, let through by its bypass rules (`[rooms.bypass]`): forwarded.
    Bypassed,
    /// A newcomer turned away: `max_waiting` people wait already.
    Full,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Outcome::Forwarded,
        Outcome::Admitted,
        Outcome::Entered,
        Outcome::Waiting,
        Outcome::Challenged,
        Outcome::Closed,
        Outcome::Refused,
        Outcome::Unavailable,
        Outcome::Reserved,
        Outcome::UpstreamFailed,
        Outcome::Bypassed,
        Outcome::Full,
    ];

    /// Whether a request inside a room can end so (`reserved` ones are outside every room).
    fn in_rooms(self) -> bool {
        self != Outcome::Reserved
    }

    /// Whether a request outside every room can end so: forwarded (or its upstream failed),
    /// refused, or a reserved endpoint's answer (`unavailable` when the feed's caps are full or
    /// the store is away).
    fn outside_rooms(self) -> bool {
        matches!(
            self,
            Outcome::Forwarded | Outcome::Refused | Outcome::Reserved | Outcome::UpstreamFailed | Outcome::Unavailable
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Admitted => "admitted",
            Outcome::Entered => "entered",
            Outcome::Waiting => "waiting",
            Outcome::Challenged => "challenged",
            Outcome::Closed => "closed",
            Outcome::Refused => "refused",
            Outcome::Unavailable => "unavailable",
            Outcome::Reserved => "reserved",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::Bypassed => "bypassed",
            Outcome::Full => "full",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    room: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoomLabel {
    room: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// Upper bounds (seconds) of the latency buckets: from a millisecond to half a minute.
const LATENCY_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A histogram of durations whose buckets are atomics: observing is a few atomic adds.
#[derive(Debug, Clone)]
pub struct AtomicHistogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    /// One count per bucket of [`LATENCY_BUCKETS`], and one past the last.
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> AtomicHistogram {
        AtomicHistogram {
            inner: Arc::new(HistogramInner {
                counts: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_micros: AtomicU64::new(0),
            }),
        }
    }
}

impl AtomicHistogram {
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound).unwrap_or(LATENCY_BUCKETS.len());
        self.inner.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.inner.sum_micros.fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // Counts per bucket (the encoder adds them up for the exposition; `f64::MAX` is its
        // `+Inf`).
        let mut total = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        for (index, bound) in LATENCY_BUCKETS.iter().chain([f64::MAX].iter()).enumerate() {
            let count = self.inner.counts[index].load(Ordering::Relaxed);
            total += count;
            buckets.push((*bound, count));
        }
        let sum = self.inner.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, total, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Every metric of an instance.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    joins: Family<RoomLabel, Counter>,
    joins_refused: Family<RoomLabel, Counter>,
    admissions: Family<RoomLabel, Counter>,
    waiting: Family<RoomLabel, Gauge>,
    active_sessions: Family<RoomLabel, Gauge>,
    grants_outstanding: Family<RoomLabel, Gauge>,
    room_leader: Family<RoomLabel, Gauge>,
    admit_rate: Family<RoomLabel, Gauge>,
    prequeued: Family<RoomLabel, Gauge>,
    upstream_p95: Family<RoomLabel, Gauge<f64, AtomicU64>>,
    pub feed_sockets: Gauge,
    upstream_duration: Family<ClassLabel, AtomicHistogram>,
    store_duration: Family<OperationLabel, AtomicHistogram>,
    store_errors: Family<KindLabel, Counter>,
    pub store_up: Gauge,
    connection_limits: Family<LimitLabels, Counter>,
    /// Requests outside every room, by outcome (the outcomes they can have: only those series
    /// are shown).
    outside: Vec<Option<Counter>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vestibule");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests by room and what the gate did with them", requests.clone());
        let joins = Family::<RoomLabel, Counter>::default();
        registry.register("joins", "Tickets taken (first visits in line)", joins.clone());
        let joins_refused = Family::<RoomLabel, Counter>::default();
        registry.register(
            "joins_refused",
            "Joins refused with 429: joins_per_address_per_minute reached",
            joins_refused.clone(),
        );
        let admissions = Family::<RoomLabel, Counter>::default();
        registry.register(
            "admissions",
            "Turns granted by this instance (at join, by its steps, by admin)",
            admissions.clone(),
        );
        let waiting = Family::<RoomLabel, Gauge>::default();
        registry.register("waiting", "People in line (tickets after the cursor)", waiting.clone());
        let active_sessions = Family::<RoomLabel, Gauge>::default();
        registry.register("active_sessions", "Sessions active in the room", active_sessions.clone());
        let grants_outstanding = Family::<RoomLabel, Gauge>::default();
        registry.register("grants_outstanding", "Turns granted and not yet used", grants_outstanding.clone());
        let room_leader = Family::<RoomLabel, Gauge>::default();
        registry.register("room_leader", "1 when this instance runs the room's scheduler", room_leader.clone());
        let admit_rate = Family::<RoomLabel, Gauge>::default();
        registry.register(
            "admit_per_minute",
            "The rate turns are granted at now: admit_per_minute, or the adaptive rate when lower",
            admit_rate.clone(),
        );
        let prequeued = Family::<RoomLabel, Gauge>::default();
        registry.register(
            "prequeued",
            "Pre-queue numbers given for the room's latest scheduled sale ([[rooms.events]])",
            prequeued.clone(),
        );
        let upstream_p95 = Family::<RoomLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "adaptive_upstream_p95_seconds",
            "The upstream's p95 latency for the room over the last window the leader judged ([rooms.adaptive])",
            upstream_p95.clone(),
        );
        let feed_sockets = Gauge::default();
        registry.register("feed_sockets", "Waiting-page feed sockets open on this instance", feed_sockets.clone());
        let upstream_duration = Family::<ClassLabel, AtomicHistogram>::default();
        registry.register(
            "upstream_duration_seconds",
            "Time to the upstream's response head, by status class",
            upstream_duration.clone(),
        );
        let store_duration = Family::<OperationLabel, AtomicHistogram>::default();
        registry.register("store_duration_seconds", "Time of store calls, by operation", store_duration.clone());
        let store_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "store_errors",
            "Store calls that failed, by kind (unavailable or failed)",
            store_errors.clone(),
        );
        let store_up = Gauge::default();
        registry.register("store_up", "1 while the store answers", store_up.clone());
        let connection_limits = Family::<LimitLabels, Counter>::default();
        registry.register(
            "connection_limits",
            "Clients held back by a connection limit, by listener and reason: per_address (a new connection \
             over server.max_connections_per_address, refused), proxied_per_address (a request through a trusted \
             proxy for a client at that cap, refused), send_timeout (a client that read nothing for \
             server.send_timeout, closed)",
            connection_limits.clone(),
        );
        let outside = Outcome::ALL
            .iter()
            .map(|outcome| {
                let labels = RequestLabels { room: String::new(), outcome: outcome.as_str().into() };
                outcome.outside_rooms().then(|| requests.get_or_create(&labels).clone())
            })
            .collect();
        Metrics {
            registry,
            requests,
            joins,
            joins_refused,
            admissions,
            waiting,
            active_sessions,
            grants_outstanding,
            room_leader,
            admit_rate,
            prequeued,
            upstream_p95,
            feed_sockets,
            upstream_duration,
            store_duration,
            store_errors,
            store_up,
            connection_limits,
            outside,
        }
    }

    /// A client held back by a connection limit on `listener` (`public`, `admin`), for `reason`.
    pub fn connection_limited(&self, listener: &'static str, reason: &'static str) {
        self.connection_limits.get_or_create(&LimitLabels { listener, reason }).inc();
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }

    /// A room's handles: taken once, then each use is an atomic operation.
    pub fn room(&self, room: &str) -> RoomMetrics {
        let label = RoomLabel { room: room.to_owned() };
        RoomMetrics {
            requests: Outcome::ALL
                .iter()
                .map(|outcome| {
                    let labels = RequestLabels { room: room.to_owned(), outcome: outcome.as_str().into() };
                    outcome.in_rooms().then(|| self.requests.get_or_create(&labels).clone())
                })
                .collect(),
            joins: self.joins.get_or_create(&label).clone(),
            joins_refused: self.joins_refused.get_or_create(&label).clone(),
            admissions: self.admissions.get_or_create(&label).clone(),
            waiting: self.waiting.get_or_create(&label).clone(),
            active_sessions: self.active_sessions.get_or_create(&label).clone(),
            grants_outstanding: self.grants_outstanding.get_or_create(&label).clone(),
            leader: self.room_leader.get_or_create(&label).clone(),
            admit_rate: self.admit_rate.get_or_create(&label).clone(),
            prequeued: self.prequeued.get_or_create(&label).clone(),
            upstream_p95: self.upstream_p95.get_or_create(&label).clone(),
        }
    }

    /// A request outside every room.
    pub fn outside(&self, outcome: Outcome) {
        match &self.outside[outcome as usize] {
            Some(counter) => {
                counter.inc();
            }
            None => debug_assert!(false, "a request outside every room cannot end {outcome:?}"),
        }
    }

    /// The upstream's latency histograms, one per status class, to keep and observe without
    /// a lookup.
    pub fn upstream(&self) -> UpstreamTimer {
        let class = |class: &str| self.upstream_duration.get_or_create(&ClassLabel { class: class.into() }).clone();
        UpstreamTimer { classes: ["error", "1xx", "2xx", "3xx", "4xx", "5xx"].map(class) }
    }

    /// A store call (`operation`) took `took`; `error` says how it failed, if it did.
    pub fn store_call(&self, operation: &'static str, took: Duration, error: Option<&'static str>) {
        self.store_duration.get_or_create(&OperationLabel { operation: operation.into() }).observe(took);
        if let Some(kind) = error {
            self.store_errors.get_or_create(&KindLabel { kind: kind.into() }).inc();
        }
    }
}

/// The upstream's latency by status class.
#[derive(Debug, Clone)]
pub struct UpstreamTimer {
    /// `error`, then `1xx` to `5xx`.
    classes: [AtomicHistogram; 6],
}

impl UpstreamTimer {
    /// The upstream answered (`status`), or failed (`None`), after `took`.
    pub fn observe(&self, status: Option<http::StatusCode>, took: Duration) {
        let class = match status.map(|s| s.as_u16() / 100) {
            Some(class @ 1..=5) => usize::from(class),
            _ => 0,
        };
        self.classes[class].observe(took);
    }
}

/// One room's metric handles.
#[derive(Debug, Clone)]
pub struct RoomMetrics {
    requests: Vec<Option<Counter>>,
    pub joins: Counter,
    pub joins_refused: Counter,
    pub admissions: Counter,
    pub waiting: Gauge,
    pub active_sessions: Gauge,
    pub grants_outstanding: Gauge,
    pub leader: Gauge,
    pub admit_rate: Gauge,
    pub prequeued: Gauge,
    pub upstream_p95: Gauge<f64, AtomicU64>,
}

impl RoomMetrics {
    /// Handles that count for nobody (a room outside a gate, in tests).
    pub fn detached() -> RoomMetrics {
        Metrics::new().room("detached")
    }

    pub fn request(&self, outcome: Outcome) {
        match &self.requests[outcome as usize] {
            Some(counter) => {
                counter.inc();
            }
            None => debug_assert!(false, "a request in a room cannot end {outcome:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_metric_with_its_labels() {
        let metrics = Metrics::new();
        let room = metrics.room("checkout");
        room.request(Outcome::Admitted);
        room.request(Outcome::Admitted);
        room.joins.inc();
        room.waiting.set(7);
        metrics.outside(Outcome::Forwarded);
        let upstream = metrics.upstream();
        upstream.observe(Some(http::StatusCode::OK), Duration::from_millis(3));
        upstream.observe(Some(http::StatusCode::CREATED), Duration::from_millis(40));
        upstream.observe(Some(http::StatusCode::BAD_GATEWAY), Duration::from_secs(60));
        metrics.store_call("join", Duration::from_micros(400), Some("unavailable"));
        metrics.store_up.set(1);
        let text = metrics.encode();
        for line in [
            "vestibule_requests_total{room=\"checkout\",outcome=\"admitted\"} 2",
            "vestibule_requests_total{room=\"\",outcome=\"forwarded\"} 1",
            "vestibule_joins_total{room=\"checkout\"} 1",
            "vestibule_waiting{room=\"checkout\"} 7",
            "vestibule_upstream_duration_seconds_bucket{le=\"0.0025\",class=\"2xx\"} 0",
            "vestibule_upstream_duration_seconds_bucket{le=\"0.005\",class=\"2xx\"} 1",
            "vestibule_upstream_duration_seconds_bucket{le=\"0.025\",class=\"2xx\"} 1",
            "vestibule_upstream_duration_seconds_bucket{le=\"0.05\",class=\"2xx\"} 2",
            "vestibule_upstream_duration_seconds_bucket{le=\"+Inf\",class=\"2xx\"} 2",
            "vestibule_upstream_duration_seconds_count{class=\"2xx\"} 2",
            "vestibule_upstream_duration_seconds_sum{class=\"2xx\"} 0.043",
            "vestibule_upstream_duration_seconds_bucket{le=\"30.0\",class=\"5xx\"} 0",
            "vestibule_upstream_duration_seconds_bucket{le=\"+Inf\",class=\"5xx\"} 1",
            "vestibule_store_errors_total{kind=\"unavailable\"} 1",
            "vestibule_store_up 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
