//! What the guards cost the server per request: checking a proof of work, taking a join from
//! an address's bucket, resolving the client address behind a trusted proxy.
//!
//!   cargo bench --bench guard            # median of 5 runs of 100 000 calls each

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use vestibule::challenge::{solve, Pow, DEFAULT_DIFFICULTY};
use vestibule::limit::JoinLimiter;

const CALLS: u32 = 100_000;

/// Median nanoseconds per call of `work` over five runs.
fn time(mut work: impl FnMut(u32)) -> f64 {
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let started = Instant::now();
            for n in 0..CALLS {
                work(n);
            }
            started.elapsed().as_nanos() as f64 / f64::from(CALLS)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}

fn main() {
    let pow = Pow::new(b"bench secret");
    let client: IpAddr = "203.0.113.9".parse().unwrap();
    // The work is luck: the mean over 50 challenges.
    let solved = Instant::now();
    for n in 0..50 {
        black_box(solve(&pow.issue("checkout", client, n), DEFAULT_DIFFICULTY));
    }
    let solving = solved.elapsed() / 50;
    let challenge = pow.issue("checkout", client, 1_000);
    let solution = solve(&challenge, DEFAULT_DIFFICULTY);
    let check = time(|_| {
        black_box(pow.check("checkout", client, black_box(&solution), DEFAULT_DIFFICULTY, 2_000)).unwrap();
    });
    let issue = time(|n| {
        black_box(pow.issue("checkout", client, u64::from(n)));
    });
    let limiter = JoinLimiter::new(4_000_000_000, 100_000);
    let take = time(|n| {
        black_box(limiter.take(IpAddr::V4((0x0a00_0000 + n % 50_000).into()), u64::from(n))).ok();
    });
    let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
    let mut headers = http::HeaderMap::new();
    headers.insert("x-forwarded-for", "198.51.100.7, 10.1.2.3".parse().unwrap());
    let resolve = time(|_| {
        black_box(vestibule::hop::client_address("10.0.0.2".parse().unwrap(), &trusted, black_box(&headers)));
    });
    println!("proof of work, check a solution:      {check:>8.0} ns");
    println!("proof of work, issue a challenge:     {issue:>8.0} ns");
    println!("proof of work, solve at {DEFAULT_DIFFICULTY} bits (mean):  {:>8.1} ms", solving.as_secs_f64() * 1e3);
    println!("join limit, take (50 000 addresses):  {take:>8.0} ns");
    println!("client address behind a proxy:        {resolve:>8.0} ns");
}
