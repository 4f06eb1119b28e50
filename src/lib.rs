//! vestibule: a virtual waiting room that stands in front of one protected upstream.
//!
//! # Layout
//!
//! In layers, each using only those below it (docs/design.md, "Architecture"): entry → gate →
//! room and token → store → line. Beside them, used from any layer: configuration, metrics,
//! limits and the small shared modules at the end. The load tool is a client: it speaks HTTP
//! and shares only `wire` with the server. Modules that are not API are `pub(crate)`.
//!
//! Entry:
//! - [`server`]: listeners, TLS, one accept loop with the connection caps, graceful shutdown.
//! - [`admin`]: the admin listener: probes, metrics, live room controls, reload, dashboard.
//! - [`check`]: `vestibule check`: what a configuration holds, and what is likely wrong.
//! - [`demo`]: the built-in demo shop that `vestibule demo` puts behind the gate.
//!
//! Gate (a request's phases, on both HTTP paths):
//! - [`gate`]: the decision made for every request (`mod.rs`: serve, decide, admit, forward),
//!   the line's answer for a visitor without a token (`entry`), the gate's own pages and
//!   cookies (`respond`), the reserved `/_vestibule/` endpoints (`reserved`), the cross-site
//!   check (`origin`), reload (`reload`).
//! - `lane`: the fast lane for bodiless HTTP/1.1 requests the gate forwards, hyper for the rest.
//! - `forward`, `pool`, `resolve`: the upstream client (what `Gate::forward` sends through),
//!   its keep-alive pool, its name lookups.
//! - [`framing`]: ambiguous HTTP/1 framing, seen on the wire before hyper folds it away.
//! - [`hop`]: hop-by-hop and forwarding headers, and the client's address.
//! - [`path`]: the one canonical form of a request path.
//! - `slow`: the send timeout: a client that does not read cannot hold a connection.
//! - `error`, `body`: the request path's error type and its one body type.
//!
//! Room and token:
//! - [`room`]: rooms at run time: settings and live overrides (`settings`), what the gate asks
//!   for a visitor (`visitors`), the scheduler and its own bookkeeping (`scheduler`), reports to the store (`reports`),
//!   the snapshot and a visitor's status (`snapshot`, `status`), the waiting page (`page`,
//!   `waiting.html`, `script.html`), the feed (`feed`), sales (`sale`), the adaptive rate
//!   (`adaptive`).
//! - [`token`]: the key ring, admission tokens and tickets, strict verification, the JWKS.
//! - [`challenge`]: the proof of work a room may ask of a visitor before they join.
//!
//! Store and line:
//! - [`store`]: the line's atomic operations, in memory (`memory`) or in Redis (`redis`, its
//!   scripts in `store/lua/`), with a lost line restored from what the instances knew, and the
//!   announcements instances hear each other by (`announce`).
//! - [`line`]: pure admission logic: tickets, cursor, rate budget, capacity, positions, and
//!   the live overrides.
//!
//! Beside them:
//! - [`config`]: `proxy.toml` as serde types, validated into typed values with errors that
//!   name the file and the key.
//! - [`metrics`], [`telemetry`], `refusals`: Prometheus metrics, the log's set-up, the log's
//!   summary of refused requests.
//! - [`limit`]: per client address: joins (`JoinLimiter`), connections and feed sockets
//!   (`Slots`), in bounded memory.
//! - [`clock`]: the line's millisecond clock (tokio time, so tests can pause it).
//! - [`lang`]: the waiting page's words in every bundled language, and `Accept-Language`.
//! - `wire`: what the server and its clients share: cookie names, the scheduler's step, a
//!   sale's published shuffle. `id`: random identifiers.
//! - [`loadtest`]: `vestibule loadtest`, an open-loop crowd with a fairness and latency report.
#![forbid(unsafe_code)]

pub mod admin;
pub(crate) mod body;
pub mod challenge;
pub mod check;
pub mod clock;
pub mod config;
pub mod demo;
pub(crate) mod error;
pub(crate) mod forward;
pub mod framing;
pub mod gate;
pub mod hop;
pub(crate) mod id;
pub(crate) mod lane;
pub mod lang;
pub mod limit;
pub mod line;
pub mod loadtest;
pub mod metrics;
pub mod path;
pub(crate) mod pool;
pub(crate) mod refusals;
pub(crate) mod resolve;
pub mod room;
pub mod server;
pub(crate) mod slow;
pub mod store;
pub mod telemetry;
pub mod token;
pub(crate) mod wire;
