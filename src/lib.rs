//! vestibule: a virtual waiting room that stands in front of one protected upstream.
//!
//! # Layout
//!
//! - [`check`]: `vestibule check`: what a configuration holds, and what is likely wrong.
//! - [`config`]: `proxy.toml` as serde types, validated into typed values with errors that
//!   name the file and the key.
//! - [`path`]: the one canonical form of a request path, used both to decide whether a room
//!   guards it and as the path forwarded upstream.
//! - [`token`]: the key ring, admission token minting, strict verification, a cache of
//!   verified tokens, and the JWKS document.
//! - [`line`]: pure admission logic: tickets, cursor, rate budget, capacity, positions.
//! - [`store`]: the line's atomic operations, kept in memory (one instance) or in Redis (one
//!   server or a cluster), with a lost line restored from what the instances knew.
//! - [`metrics`]: Prometheus metrics, cheap on the hot path.
//! - [`loadtest`]: `vestibule loadtest`, an open-loop crowd with a fairness and latency report.
//! - [`room`]: rooms at run time: snapshot, scheduler, status, the waiting page and the feed.
//! - [`clock`]: the line's millisecond clock (tokio time, so tests can pause it).
//! - [`gate`]: the decision made for every request (`Forward`, `Wait`, `Reject`) and the
//!   reserved `/_vestibule/` endpoints.
//! - [`forward`]: the pooled upstream client, streaming both ways, timeouts, upgrades.
//! - [`resolve`]: the upstream's host name resolved without blocking, each answer kept for its TTL.
//! - [`lane`]: the fast lane for bodiless HTTP/1.1 requests the gate forwards, hyper for the rest.
//! - [`framing`]: ambiguous HTTP/1 framing, seen on the wire before hyper folds it away.
//! - [`hop`]: hop-by-hop and forwarding headers, and the client's address.
//! - [`challenge`]: the proof of work a room may ask of a visitor before they join.
//! - [`limit`]: per client address: joins, connections and feed sockets, in bounded memory.
//! - [`refusals`]: refused and failed requests summarised in the log, one line per interval.
//! - [`error`]: the request-path error type and the one place it maps to HTTP statuses.
//! - [`body`]: the one body type of the proxy, with `empty()` and `full()`.
//! - [`server`]: listeners, TLS, the connection caps and graceful shutdown.
//! - [`slow`]: the send timeout: a client that does not read cannot hold a connection.
//! - [`admin`]: the admin listener: probes, metrics, live room controls, reload, dashboard.
//! - [`demo`]: the built-in demo shop that `vestibule demo` puts behind the gate.
//! - [`telemetry`]: tracing set-up (text or JSON).
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod challenge;
pub mod check;
pub mod clock;
pub mod config;
pub mod demo;
pub mod error;
pub mod forward;
pub mod framing;
pub mod gate;
pub mod hop;
pub mod id;
pub mod lane;
pub mod limit;
pub mod line;
pub mod loadtest;
pub mod metrics;
pub mod path;
pub mod pool;
pub mod refusals;
pub mod resolve;
pub mod room;
pub mod server;
pub mod slow;
pub mod store;
pub mod telemetry;
pub mod token;
pub mod wire;
