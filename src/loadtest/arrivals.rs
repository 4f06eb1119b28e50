//! When visitors arrive: a rate that may change over time (a constant rate, a ramp up to it,
//! or a curve recorded from a real sale), turned into arrival times.
//!
//! A curve is a list of `(seconds, arrivals per second)` points with the rate linear in
//! between. The n-th visitor (from 0) arrives when the expected number of arrivals so far,
//! the integral of the rate, reaches n: the crowd follows the curve exactly, with no
//! randomness to blur a comparison between two runs.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context};

/// An arrival-rate curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// `(seconds, rate)`, times increasing from 0.
    points: Vec<(f64, f64)>,
    /// Arrivals end at the last point (a recorded curve), or go on at its rate (a ramp).
    ends: bool,
    /// Expected arrivals from 0 to each point.
    mass: Vec<f64>,
}

impl Curve {
    /// A steady rate.
    pub fn constant(rate: f64) -> anyhow::Result<Curve> {
        Curve::new(vec![(0.0, rate)], false)
    }

    /// From zero up to `rate` over `over`, then steady.
    pub fn ramp_up(rate: f64, over: Duration) -> anyhow::Result<Curve> {
        ensure!(!over.is_zero(), "the ramp must last longer than zero");
        Curve::new(vec![(0.0, 0.0), (over.as_secs_f64(), rate)], false)
    }

    /// A recorded curve: lines `seconds,rate` (or separated by spaces), times increasing,
    /// counted from the first line; `#` starts a comment and a first line that is not
    /// numbers is a header. Arrivals end at the last line.
    pub fn parse(text: &str) -> anyhow::Result<Curve> {
        let mut points = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> =
                line.split(|c: char| c == ',' || c.is_whitespace()).filter(|f| !f.is_empty()).collect();
            let numbers: Result<Vec<f64>, _> = fields.iter().map(|f| f.parse::<f64>()).collect();
            match numbers {
                Ok(numbers) if numbers.len() == 2 => points.push((numbers[0], numbers[1])),
                Err(_) if points.is_empty() && number == 0 => continue, // a header
                _ => bail!("line {}: expected `seconds,rate`, found {line:?}", number + 1),
            }
        }
        ensure!(!points.is_empty(), "no `seconds,rate` lines");
        let start = points[0].0;
        for point in &mut points {
            point.0 -= start;
        }
        Curve::new(points, true)
    }

    pub fn load(path: &Path) -> anyhow::Result<Curve> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Curve::parse(&text).with_context(|| path.display().to_string())
    }

    fn new(points: Vec<(f64, f64)>, ends: bool) -> anyhow::Result<Curve> {
        for pair in points.windows(2) {
            ensure!(pair[1].0 > pair[0].0, "times must increase ({} then {})", pair[0].0, pair[1].0);
        }
        for &(time, rate) in &points {
            ensure!(time.is_finite() && rate.is_finite() && rate >= 0.0, "bad point ({time}, {rate}): rates are >= 0");
        }
        let mut mass = vec![0.0];
        for pair in points.windows(2) {
            let ((t0, r0), (t1, r1)) = (pair[0], pair[1]);
            mass.push(mass.last().copied().unwrap_or_default() + (r0 + r1) / 2.0 * (t1 - t0));
        }
        let last_rate = points.last().map_or(0.0, |p| p.1);
        ensure!(
            mass.last().copied().unwrap_or_default() > 0.0 || (!ends && last_rate > 0.0),
            "the arrival rate must be above zero somewhere"
        );
        Ok(Curve { points, ends, mass })
    }

    /// Whether arrivals end with the curve.
    pub fn ends(&self) -> bool {
        self.ends
    }

    /// When the n-th visitor (from 0) arrives, or `None` once the curve has ended.
    pub fn arrival(&self, n: u64) -> Option<Duration> {
        let n = n as f64;
        let k = self.mass.partition_point(|&m| m <= n).saturating_sub(1);
        let (t0, r0) = self.points[k];
        let needed = n - self.mass[k];
        let seconds = match self.points.get(k + 1) {
            Some(&(t1, r1)) if self.mass[k + 1] > n => {
                // Solve r0·s + b·s²/2 = needed for s within the segment; this form of the
                // quadratic's root holds for b of either sign and for b = 0.
                let b = (r1 - r0) / (t1 - t0);
                let root = (r0 * r0 + 2.0 * b * needed).max(0.0).sqrt();
                t0 + 2.0 * needed / (r0 + root)
            }
            Some(_) => unreachable!("partition_point picked the segment holding n"),
            None if self.ends || r0 <= 0.0 => return None,
            None => t0 + needed / r0,
        };
        Some(secs(seconds))
    }

    /// The rate at a time, for the report.
    pub fn rate_at(&self, at: Duration) -> f64 {
        let t = at.as_secs_f64();
        let k = self.points.partition_point(|p| p.0 <= t).saturating_sub(1);
        match (self.points[k], self.points.get(k + 1)) {
            ((t0, r0), Some(&(t1, r1))) => r0 + (r1 - r0) * (t - t0) / (t1 - t0),
            ((t0, _), None) if self.ends && t > t0 => 0.0,
            ((_, r0), None) => r0,
        }
    }
}

fn secs(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(curve: &Curve, n: u64) -> f64 {
        curve.arrival(n).expect("arrives").as_secs_f64()
    }

    #[test]
    fn a_constant_rate_spaces_arrivals_evenly_and_never_ends() {
        let curve = Curve::constant(4.0).unwrap();
        assert_eq!(at(&curve, 0), 0.0);
        assert!((at(&curve, 1) - 0.25).abs() < 1e-9);
        assert!((at(&curve, 1000) - 250.0).abs() < 1e-6);
    }

    #[test]
    fn a_ramp_brings_arrivals_closer_then_holds_the_rate() {
        // 0 -> 10/s over 10 s: 50 arrivals in the ramp, n arrives at sqrt(2n) s.
        let curve = Curve::ramp_up(10.0, Duration::from_secs(10)).unwrap();
        assert!((at(&curve, 8) - 4.0).abs() < 1e-9);
        assert!((at(&curve, 50) - 10.0).abs() < 1e-9);
        assert!((at(&curve, 60) - 11.0).abs() < 1e-9, "steady after the ramp");
        let gaps: Vec<f64> = (1..50).map(|n| at(&curve, n + 1) - at(&curve, n)).collect();
        assert!(gaps.windows(2).all(|g| g[1] < g[0]), "arrivals come closer as the rate rises");
    }

    #[test]
    fn a_recorded_curve_follows_its_points_and_ends() {
        let curve = Curve::parse("second,rate\n# a sale opens\n10, 0\n12 100\n14,100\n15,0\n").unwrap();
        // Counted from the first line: 0..2 s rising to 100/s (100 arrivals), 2..4 s at 100/s
        // (200), 4..5 s falling to 0 (50): 350 in all.
        assert!((at(&curve, 50) - 2f64.sqrt()).abs() < 1e-9);
        assert!((at(&curve, 200) - 3.0).abs() < 1e-9);
        assert!((at(&curve, 349) - (5.0 - (2.0f64 / 100.0).sqrt())).abs() < 1e-6, "falling edge");
        assert_eq!(curve.arrival(350), None);
        assert_eq!(curve.rate_at(Duration::from_secs(3)), 100.0);
        assert_eq!(curve.rate_at(Duration::from_secs(6)), 0.0);
    }

    #[test]
    fn nonsense_curves_are_refused_with_the_line() {
        assert!(Curve::parse("0,1\n0,2\n").unwrap_err().to_string().contains("times must increase"));
        assert!(format!("{:#}", Curve::parse("0,1\nten,2\n").unwrap_err()).contains("line 2"));
        assert!(Curve::parse("0,-1\n1,1\n").is_err());
        assert!(Curve::parse("0,0\n5,0\n").is_err());
        assert!(Curve::constant(0.0).is_err());
        assert!(Curve::parse("").is_err());
    }
}
