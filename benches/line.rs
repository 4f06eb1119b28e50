//! The line on Redis: joins per second with the Redis store versus the memory store, Redis
//! commands per join, and admissions per minute versus configured with three instances
//! sharing one Redis.
//!
//!   cargo bench --bench line                   # 10 s of joins per store, 60 s of admissions
//!   DURATION=300 cargo bench --bench line      # admissions over 5 minutes
//!
//! Starts its own `redis-server` on a free loopback port and the release binary (one worker
//! per instance): the demo shop as the upstream, then vestibule instances. Joins come from 32
//! kept-alive connections, each request a first visit that takes a ticket (the room's only
//! place is taken first, so everyone waits).

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{call, connect, cpu_us, start_instance, start_redis, start_shop, Instance};

const CLIENTS: usize = 32;
const JOIN_SECONDS: u64 = 10;

fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Commands Redis has run since the last `CONFIG RESETSTAT`: (round trips, that is calls
/// from clients, mostly EVALSHA; all commands, those run inside scripts included).
fn redis_commands(port: u16) -> (u64, u64) {
    let stats = redis_cli(port, &["info", "commandstats"]);
    let calls = |line: &str| line.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok();
    let all = stats.lines().filter_map(calls).sum();
    let scripts = stats.lines().filter(|line| line.starts_with("cmdstat_eval")).filter_map(calls).sum();
    (scripts, all)
}

/// CPU time Redis has used (user + system, its own count), in microseconds.
fn redis_cpu_us(port: u16) -> f64 {
    let info = redis_cli(port, &["info", "cpu"]);
    let seconds =
        |name: &str| info.lines().find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok()).unwrap_or(0.0);
    (seconds("used_cpu_user:") + seconds("used_cpu_sys:")) * 1e6
}

/// Joins per second at `addr` (the instance's process is `pid`), how many, and the instance's
/// CPU time per join in microseconds.
async fn joins_per_second(addr: std::net::SocketAddr, pid: u32) -> (f64, u64, f64) {
    let mut sender = connect(addr).await;
    call(&mut sender, "GET", "/checkout", "").await; // takes the only place
    let cpu_before = cpu_us(pid);
    let joins = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(JOIN_SECONDS);
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let joins = joins.clone();
            tokio::spawn(async move {
                let mut sender = connect(addr).await;
                while Instant::now() < deadline {
                    let cookies = call(&mut sender, "GET", "/checkout", "").await;
                    if cookies.iter().any(|c| c.starts_with("vestibule-ticket-")) {
                        joins.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let joins = joins.load(Ordering::Relaxed);
    let cpu_per_join = (cpu_us(pid) - cpu_before) / joins as f64;
    (joins as f64 / started.elapsed().as_secs_f64(), joins, cpu_per_join)
}

#[tokio::main]
async fn main() {
    let duration: u64 = std::env::var("DURATION").ok().and_then(|d| d.parse().ok()).unwrap_or(60);
    let dir = std::env::temp_dir().join(format!("vestibule-line-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_redis, port) = start_redis(&dir);
    let store = format!("[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{port}/\"");
    let (_shop, shop) = start_shop();
    let one_place = "admit_per_minute = 60\nmax_active = 1\nabandon_seconds = 3600";

    let (memory, memory_addr) = start_instance(&dir, shop, one_place, "");
    let (memory_rate, _, memory_cpu) = joins_per_second(memory_addr, memory.0.id()).await;
    drop(memory);
    let (redis_instance, redis_addr) = start_instance(&dir, shop, one_place, &store);
    redis_cli(port, &["config", "resetstat"]);
    let redis_cpu_before = redis_cpu_us(port);
    let (redis_rate, redis_joins, redis_cpu) = joins_per_second(redis_addr, redis_instance.0.id()).await;
    let commands = redis_commands(port);
    let redis_server_cpu = (redis_cpu_us(port) - redis_cpu_before) / redis_joins as f64;
    drop(redis_instance);
    println!("joins per second, {CLIENTS} connections, {JOIN_SECONDS} s, one worker:");
    println!("  memory store  {memory_rate:>8.0}   proxy CPU per join {memory_cpu:>6.1} µs");
    println!(
        "  redis store   {redis_rate:>8.0}   proxy CPU per join {redis_cpu:>6.1} µs   ({:.2}x memory's joins per second)",
        redis_rate / memory_rate
    );
    let (scripts, commands) = commands;
    println!(
        "redis per join: {:.2} script calls (round trips), {:.1} commands counting those inside scripts, \
         {redis_server_cpu:.1} µs of Redis's CPU ({redis_joins} joins; the schedulers' steps meanwhile included)",
        scripts as f64 / redis_joins as f64,
        commands as f64 / redis_joins as f64
    );

    // Admissions per minute, three instances on one Redis, a crowd joining at all of them.
    let per_minute = 600u64;
    let sale =
        format!("admit_per_minute = {per_minute}\nmax_active = 100000\nabandon_seconds = 3600\ngrant_seconds = 3600");
    redis_cli(port, &["flushall"]);
    let instances: Vec<(Instance, std::net::SocketAddr)> =
        (0..3).map(|_| start_instance(&dir, shop, &sale, &store)).collect();
    let crowd = per_minute * duration / 60 + per_minute; // more than the run can admit
    let mut senders = Vec::new();
    for (_, addr) in &instances {
        senders.push(connect(*addr).await);
    }
    for visitor in 0..crowd as usize {
        call(&mut senders[visitor % 3], "GET", "/checkout", "").await;
    }
    let cursor =
        || redis_cli(port, &["hget", "vestibule:{checkout}:line", "cursor"]).trim().parse::<u64>().unwrap_or(0);
    // Measure from the first grant after the crowd has joined, over `duration` seconds.
    let start_cursor = cursor();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(duration)).await;
    let granted = cursor() - start_cursor;
    let elapsed = started.elapsed().as_secs_f64();
    let measured = granted as f64 * 60.0 / elapsed;
    println!(
        "admissions, 3 instances on one redis, {crowd} visitors, {duration} s: {measured:.1} per minute \
         vs {per_minute} configured ({:+.2} %)",
        (measured / per_minute as f64 - 1.0) * 100.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
