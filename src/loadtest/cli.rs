//! The `vestibule loadtest` command line: flags to [`Options`], the run, the outputs, and the
//! limits that turn a miss into a failing exit for CI.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use ipnet::Ipv4Net;

use super::{html, report, Curve, Options, Report, RoomLimits};
use crate::config::Config;

fn parse_duration(text: &str) -> Result<Duration, humantime_serde::re::humantime::DurationError> {
    humantime_serde::re::humantime::parse_duration(text)
}

/// Flags of `vestibule loadtest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A vestibule to load: `http://127.0.0.1:8080` or `127.0.0.1:8080`. Repeat it for several
    /// instances; a visitor's successive requests go to successive targets.
    #[arg(long = "target", value_name = "URL")]
    targets: Vec<String>,
    /// The proxy's configuration: the room's rate and capacity to hold the run against, its
    /// first path, and the listener as the target when no --target is given.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The room's id.
    #[arg(long, default_value = "checkout")]
    room: String,
    /// A path inside the room (default: the room's first path, or /checkout).
    #[arg(long)]
    path: Option<String>,
    /// How many visitors arrive (default 1000 when neither this, --duration nor --arrivals
    /// ends the run).
    #[arg(long)]
    visitors: Option<u64>,
    /// Stop arrivals after this long (e.g. 90s, 5m); the run ends when the last visitor does.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Arrivals per second (steady, or the rate a --ramp-up reaches).
    #[arg(long, default_value_t = 100.0)]
    arrival_rate: f64,
    /// Rise from zero to --arrival-rate over this long, then hold.
    #[arg(long, value_parser = parse_duration)]
    ramp_up: Option<Duration>,
    /// A recorded arrival curve: lines `seconds,rate` (rate linear in between); arrivals end
    /// with its last line.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["ramp_up"])]
    arrivals: Option<PathBuf>,
    /// How long a visitor waits for admission before it counts as an error.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    patience: Duration,
    /// Leave after the forwarded request, freeing the place for the next visitor.
    #[arg(long)]
    leave: bool,
    /// With --leave: stay this long after the forwarded request (shopping), holding the place.
    #[arg(long, default_value = "0s", value_parser = parse_duration, requires = "leave")]
    hold: Duration,
    /// Spread visitors over source addresses of this range (e.g. 127.0.0.0/8), so that
    /// per-address limits apply as they would to real visitors. Against targets on loopback
    /// the default is 127.0.0.0/8 (said in the report); elsewhere, one address.
    #[arg(long, value_name = "CIDR", conflicts_with = "one_source")]
    sources: Option<Ipv4Net>,
    /// Every visitor from this machine's one address, even against a target on loopback.
    #[arg(long)]
    one_source: bool,
    /// The room's admissions per minute (overrides --config; without --config, give
    /// --max-active too).
    #[arg(long)]
    admit_per_minute: Option<u32>,
    /// The room's max_active (overrides --config).
    #[arg(long)]
    max_active: Option<u32>,
    /// Moments to time the line's recovery from: a file of `unix_ms label [paused_ms=N]` lines,
    /// appended while the run goes (e.g. by a chaos script, each time a fault ends, with how
    /// long it paused the line) and read at its end.
    #[arg(long, value_name = "FILE")]
    marks: Option<PathBuf>,
    /// Leave the pauses of --marks (the `paused_ms=N` before each mark that gives one) out of the
    /// measured admission rate, so that --max-rate-error judges the line while it could move.
    #[arg(long, requires = "marks")]
    rate_excludes_marks: bool,
    /// Write the report as JSON here.
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
    /// Write the report as a self-contained page with plots here.
    #[arg(long, value_name = "FILE.html")]
    html: Option<PathBuf>,
    /// No progress line while running.
    #[arg(long, short)]
    quiet: bool,
    /// Fail (exit 1) when the forwarded requests' p99 exceeds this many milliseconds.
    #[arg(long)]
    max_p99_ms: Option<f64>,
    /// Fail when the joins' p99 exceeds this many milliseconds.
    #[arg(long)]
    max_join_p99_ms: Option<f64>,
    /// Fail when more pairs than this are admitted out of join order.
    #[arg(long, default_value_t = 0)]
    max_inversions: u64,
    /// Fail when more visitors than this lose their place (a shown position that goes up, a
    /// turn refused, or never admitted).
    #[arg(long, default_value_t = 0)]
    max_lost: u64,
    /// Fail when a turn comes more than this many seconds after a mark of --marks.
    #[arg(long, value_name = "SECONDS")]
    max_recovery: Option<f64>,
    /// Fail when more visitors than this end in an error.
    #[arg(long, default_value_t = 0)]
    max_errors: u64,
    /// Fail when the peak of admitted sessions goes more than this over max_active (checked
    /// when max_active is known).
    #[arg(long, default_value_t = 0)]
    max_overshoot: u64,
    /// Fail when the admission rate is further than this many percent from the configured
    /// one (needs the rate, and a crowd that outruns the room).
    #[arg(long, value_name = "PERCENT")]
    max_rate_error: Option<f64>,
    /// Rehearse a scheduled sale's start: the crowd arrives during the room's pre-queue (an
    /// event of its configuration), and the report says how fair the start was: every
    /// visitor's place against the published draw, the rank correlation of arrival and
    /// admission, the time from the start to the first and the 1000th admission. Fails when
    /// nobody went through a pre-queue.
    #[arg(long)]
    rehearse_sale: bool,
    /// Fail when more pre-queue visitors than this get another place than the published draw
    /// gives their number.
    #[arg(long, default_value_t = 0)]
    max_misplaced: u64,
}

impl Args {
    /// Run the crowd, print and write the report, and check the limits.
    pub async fn run(self) -> anyhow::Result<()> {
        let (options, title) = self.options()?;
        let report = super::run(options).await?;
        report::print(&report);
        if let Some(path) = &self.report {
            report::write_json(&report, path)?;
        }
        if let Some(path) = &self.html {
            html::write(&report, &title, path)?;
        }
        let failed = self.missed(&report);
        ensure!(failed.is_empty(), "limits missed: {}", failed.join("; "));
        Ok(())
    }

    fn options(&self) -> anyhow::Result<(Options, String)> {
        let config = self.config.as_deref().map(Config::load).transpose()?;
        let room = match &config {
            Some(config) => Some(
                config
                    .rooms
                    .iter()
                    .find(|r| r.id == self.room)
                    .with_context(|| format!("no room {:?} in the configuration", self.room))?,
            ),
            None => None,
        };
        let mut targets = self.targets.iter().map(|t| target(t)).collect::<anyhow::Result<Vec<_>>>()?;
        if targets.is_empty() {
            let Some(config) = &config else { bail!("say where to go: --target URL (or --config proxy.toml)") };
            ensure!(config.server.tls.is_none(), "the configured listener serves TLS: loadtest speaks plain HTTP");
            let mut listen = config.server.listen;
            if listen.ip().is_unspecified() {
                listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            targets.push(listen);
        }
        let configured = match (
            self.admit_per_minute.or(room.map(|r| r.admit_per_minute.get())),
            self.max_active.or(room.map(|r| r.max_active.get())),
        ) {
            (Some(admit_per_minute), Some(max_active)) => Some(RoomLimits { admit_per_minute, max_active }),
            (None, None) => None,
            _ => bail!("give both --admit-per-minute and --max-active (or --config)"),
        };
        let arrivals = match (&self.arrivals, self.ramp_up) {
            (Some(file), _) => Curve::load(file)?,
            (None, Some(over)) => Curve::ramp_up(self.arrival_rate, over)?,
            (None, None) => Curve::constant(self.arrival_rate)?,
        };
        let visitors = match (self.visitors, self.duration) {
            (None, None) if !arrivals.ends() => Some(1000),
            (visitors, _) => visitors,
        };
        let path = self.path.clone().or(room.and_then(|r| r.paths.first().cloned())).unwrap_or("/checkout".into());
        let title = format!(
            "{} at {}{}",
            self.room,
            targets.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", "),
            path
        );
        // On loopback, a crowd can come from many addresses at no cost, as a real one does:
        // per-address limits then hold it back no more than they would real visitors.
        let loopback = targets.iter().all(|target| target.ip().is_loopback() && target.is_ipv4());
        let sources_by_default = self.sources.is_none() && !self.one_source && loopback;
        let sources = self.sources.or_else(|| sources_by_default.then(|| "127.0.0.0/8".parse().expect("a network")));
        let options = Options {
            targets,
            path,
            room: self.room.clone(),
            visitors,
            duration: self.duration,
            arrivals,
            patience: self.patience,
            leave: self.leave,
            hold: self.hold,
            sources,
            sources_by_default,
            configured,
            progress: !self.quiet,
            marks: self.marks.clone(),
            rate_excludes_marks: self.rate_excludes_marks,
        };
        Ok((options, title))
    }

    /// The limits the run missed, in words.
    fn missed(&self, report: &Report) -> Vec<String> {
        let mut failed = Vec::new();
        if let Some(max) = self.max_p99_ms.filter(|max| report.forwarded_latency_ms.p99 > *max) {
            failed.push(format!("forwarded p99 {:.1} ms > {max:.1} ms", report.forwarded_latency_ms.p99));
        }
        if let Some(max) = self.max_join_p99_ms.filter(|max| report.join_latency_ms.p99 > *max) {
            failed.push(format!("join p99 {:.1} ms > {max:.1} ms", report.join_latency_ms.p99));
        }
        if report.fifo_inversions > self.max_inversions {
            failed.push(format!("{} FIFO inversions > {}", report.fifo_inversions, self.max_inversions));
        }
        if report.places_lost > self.max_lost {
            failed.push(format!("{} places lost > {}", report.places_lost, self.max_lost));
        }
        if let Some(max) = self.max_recovery {
            match report.slowest_recovery() {
                Some(slowest) if slowest > max => {
                    failed.push(format!("a turn came {slowest:.2} s after a mark (> {max} s)"))
                }
                Some(_) => {}
                None => failed.push("no recovery measured (no marks in the run)".into()),
            }
        }
        if report.error_count() > self.max_errors {
            failed.push(format!("{} errors > {}", report.error_count(), self.max_errors));
        }
        if let Some(overshoot) = report.capacity_overshoot.filter(|o| *o > self.max_overshoot) {
            failed.push(format!("capacity overshoot {overshoot} > {}", self.max_overshoot));
        }
        if let Some(max) = self.max_rate_error {
            match report.admission_rate_error_percent {
                Some(error) if error.abs() > max => {
                    failed.push(format!("admission rate {error:+.2} % off the configured rate (> {max} %)"))
                }
                Some(_) => {}
                None => failed.push("admission rate not measured (no configured rate, or nobody waited)".into()),
            }
        }
        match &report.sale {
            Some(sale) if sale.misplaced > self.max_misplaced => failed.push(format!(
                "{} pre-queue visitors placed otherwise than the published draw (> {})",
                sale.misplaced, self.max_misplaced
            )),
            None if self.rehearse_sale => {
                failed.push("nobody went through a pre-queue: is one of the room's events in its pre-queue?".into())
            }
            _ => {}
        }
        failed
    }
}

/// `http://host:port/`, or `host:port`, to an address.
fn target(text: &str) -> anyhow::Result<SocketAddr> {
    ensure!(!text.starts_with("https://"), "{text}: loadtest speaks plain HTTP; point it at a plain listener");
    let authority = text.strip_prefix("http://").unwrap_or(text);
    let authority = authority.split('/').next().unwrap_or_default();
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    authority
        .to_socket_addrs()
        .with_context(|| format!("--target {text}"))?
        .next()
        .with_context(|| format!("--target {text}: no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_urls_or_addresses() {
        assert_eq!(target("http://127.0.0.1:8080/").unwrap(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(target("127.0.0.1:9000").unwrap(), "127.0.0.1:9000".parse().unwrap());
        assert_eq!(target("http://127.0.0.1").unwrap(), "127.0.0.1:80".parse().unwrap());
        assert!(target("https://127.0.0.1:8443").unwrap_err().to_string().contains("plain HTTP"));
    }
}
