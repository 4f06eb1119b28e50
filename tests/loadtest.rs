//! `vestibule loadtest` against a real gate: a crowd larger than the room goes through the
//! line, the report counts every visitor, holds the run against the room's rate and
//! capacity, and its limits decide the exit code.

mod common;

use std::time::Duration;

use common::*;
use vestibule::loadtest::{self, Options, RoomLimits};

/// A room of three places, 20 admissions a second.
const ROOM: &str = "admit_per_minute = 1200\nmax_active = 3\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_goes_through_the_line_in_order_and_is_reported() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, ROOM).await;
    let mut options = Options::new(gate.addr, 60, 200.0).unwrap();
    options.patience = Duration::from_secs(20);
    options.leave = true;
    options.configured = Some(RoomLimits { admit_per_minute: 1200, max_active: 3 });
    let report = loadtest::run(options).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!((report.visitors, report.joined, report.admitted), (60, 60, 60));
    assert_eq!(report.fifo_inversions, 0);
    assert_eq!(report.join_latency_ms.count, 60);
    assert_eq!(report.forwarded_latency_ms.count, 60);
    // The crowd outran the room: most waited for their turn.
    assert!(report.time_to_admission_ms.max > 50.0, "{:?}", report.time_to_admission_ms);
    // The upstream saw each visitor's forwarded request once.
    assert_eq!(upstream.requests().len(), 60);
    // Three places, never more.
    assert!((1..=3).contains(&report.peak_sessions), "{}", report.peak_sessions);
    assert_eq!(report.capacity_overshoot, Some(0));
    // The timeline accounts for everyone, and the line formed and drained.
    let sum = |f: fn(&loadtest::report::Second) -> u64| report.timeline.iter().map(f).sum::<u64>();
    assert_eq!((sum(|s| s.arrivals), sum(|s| s.admissions), sum(|s| s.errors)), (60, 60, 0));
    assert!(report.timeline.iter().any(|s| s.waiting > 10), "{:?}", report.timeline);
    assert_eq!(report.timeline.last().map(|s| (s.waiting, s.sessions)), Some((0, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visitors_who_stay_fill_the_room_and_no_more() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, "admit_per_minute = 6000\nmax_active = 3\n").await;
    let mut options = Options::new(gate.addr, 15, 200.0).unwrap();
    options.patience = Duration::from_secs(20);
    options.leave = true;
    options.hold = Duration::from_millis(300);
    options.configured = Some(RoomLimits { admit_per_minute: 6000, max_active: 3 });
    let report = loadtest::run(options).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.admitted, 15);
    // The first three overlap for 300 ms: the room is full, and the rest wait for a place.
    assert_eq!(report.peak_sessions, 3);
    assert_eq!(report.capacity_overshoot, Some(0));
    assert!(report.seconds > 1.2, "five rounds of 300 ms: {}", report.seconds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_rate_is_measured_against_the_room() {
    let (upstream_addr, _upstream) = start_upstream().await;
    // Ten turns a second and room for everyone: the rate alone paces the crowd.
    let gate = start_room(upstream_addr, "admit_per_minute = 600\nmax_active = 1000\n").await;
    let mut options = Options::new(gate.addr, 40, 400.0).unwrap();
    options.patience = Duration::from_secs(20);
    options.configured = Some(RoomLimits { admit_per_minute: 600, max_active: 1000 });
    let report = loadtest::run(options).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let measured = report.admissions_per_minute.expect("a rate");
    // Some 30 turns over 3 s: the client's view of the first and last is within a step.
    assert!((450.0..750.0).contains(&measured), "{measured} per minute");
    assert!(report.admission_rate_error_percent.unwrap().abs() < 25.0);
    // Nobody left: when their sessions end is out of the crowd's sight, so no overshoot figure.
    assert_eq!(report.capacity_overshoot, None);
}

/// Run the binary against `gate` with `args`; (exit code, stdout, stderr).
async fn loadtest_command(args: Vec<String>) -> (Option<i32>, String, String) {
    tokio::task::spawn_blocking(move || {
        let output =
            std::process::Command::new(env!("CARGO_BIN_EXE_vestibule")).arg("loadtest").args(&args).output().unwrap();
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        (output.status.code(), text(&output.stdout), text(&output.stderr))
    })
    .await
    .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_writes_json_and_html_reports_and_fails_on_a_missed_limit() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, ROOM).await;
    let target = format!("http://{}/", gate.addr);
    let json = gate.dir.path().join("report.json");
    let html = gate.dir.path().join("report.html");
    let mut args = strings(&["--target", &target, "--visitors", "20", "--arrival-rate", "100", "--leave"]);
    args.extend(strings(&["--admit-per-minute", "1200", "--max-active", "3"]));
    args.extend(["--report".into(), json.display().to_string(), "--html".into(), html.display().to_string()]);
    let (code, stdout, stderr) = loadtest_command(args.clone()).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("20 admitted"), "{stdout}");
    assert!(stdout.contains("(max_active 3, overshoot 0)"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!((report["admitted"].as_u64(), report["fifo_inversions"].as_u64()), (Some(20), Some(0)));
    assert_eq!(report["configured"]["max_active"].as_u64(), Some(3));
    assert!(report["timeline"].as_array().is_some_and(|t| !t.is_empty()));
    // Joins per second over the 0.2 s the crowd arrived in (100 a second), not the whole run.
    let joins = report["joins_per_second"].as_f64().unwrap();
    assert!((80.0..=110.0).contains(&joins), "{joins} joins a second for 100 arrivals a second");
    assert!(stdout.contains("20 joined (") && stdout.contains("/s over 0.2 s of arrivals)"), "{stdout}");
    // The page stands alone: three plots inline, nothing fetched.
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains(">0 errors</span>"), "errors counted, not their kinds: {page}");
    assert_eq!(page.matches("<svg").count(), 3, "{page}");
    assert!(page.contains("Line length and admitted sessions") && page.contains("waiting in line"));
    assert!(!page.contains("src=\"http") && !page.contains("href=\"http"));

    // Three visitors who stay a second take the three places, held against a claimed
    // max_active of 1.
    let mut args = strings(&["--target", &target, "--visitors", "3", "--admit-per-minute", "1200"]);
    args.extend(strings(&["--leave", "--hold", "1s", "--max-active", "1", "--max-p99-ms", "0"]));
    let (code, stdout, stderr) = loadtest_command(args).await;
    assert!(stdout.contains("peak admitted sessions 3 (max_active 1, overshoot 2)"), "{stdout}");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("limits missed: forwarded p99"), "{stderr}");
    assert!(stderr.contains("capacity overshoot 2 > 0"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrivals_follow_the_duration_the_ramp_and_a_recorded_curve() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, "admit_per_minute = 6000\nmax_active = 1000\n").await;
    let json = gate.dir.path().join("report.json");
    let visitors = |extra: &[&str]| {
        let mut args = strings(&["--target", &gate.addr.to_string(), "--quiet", "--report"]);
        args.push(json.display().to_string());
        args.extend(strings(extra));
        let json = json.clone();
        async move {
            let (code, stdout, stderr) = loadtest_command(args).await;
            assert_eq!(code, Some(0), "{stdout}{stderr}");
            let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
            (report["visitors"].as_u64().unwrap(), report["seconds"].as_f64().unwrap())
        }
    };
    // 20 a second for 2 s.
    let (count, seconds) = visitors(&["--arrival-rate", "20", "--duration", "2s"]).await;
    assert_eq!(count, 40);
    assert!(seconds >= 1.9, "{seconds}");
    // Up from 0 to 20 a second over 2 s: half as many.
    assert_eq!(visitors(&["--arrival-rate", "20", "--ramp-up", "2s", "--duration", "2s"]).await.0, 20);
    // A recorded curve: 1 s rising to 30/s, 1 s at 30/s: 15 + 30 arrivals, then it ends.
    let curve = gate.dir.path().join("curve.csv");
    std::fs::write(&curve, "seconds,rate\n0,0\n1,30\n2,30\n").unwrap();
    assert_eq!(visitors(&["--arrivals", &curve.display().to_string()]).await.0, 45);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_addresses_spread_the_crowd_past_per_address_limits() {
    let (upstream_addr, _upstream) = start_upstream().await;
    // A fresh gate for each crowd: the refused visitors of the first keep their places a while.
    let crowd = |sources: Option<&'static str>| async move {
        let gate = start_room_with(upstream_addr, "max_feed_sockets_per_address = 4", ROOM).await;
        let mut options = Options::new(gate.addr, 40, 400.0).unwrap();
        // Those refused leave their tickets in line: the rest of a refused crowd need not wait.
        options.patience = Duration::from_secs(if sources.is_some() { 20 } else { 3 });
        options.leave = true;
        options.sources = sources.map(|s| s.parse().unwrap());
        loadtest::run(options).await
    };
    // From one address, most of the crowd's feed sockets are over the limit (and refused
    // again as they reconnect, as the page does).
    let report = crowd(None).await.unwrap();
    let refused = report.retries.get("feed: refused, reconnected");
    assert!(refused.is_some_and(|n| *n > 10), "{:?}", report.retries);
    // Each visitor from its own address of 127.0.0.0/8: nobody is refused.
    let report = crowd(Some("127.0.0.0/8")).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.admitted, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crowd_solves_a_rooms_proof_of_work() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, "admit_per_minute = 1200\nmax_active = 3\nchallenge = \"pow\"\n").await;
    let mut options = Options::new(gate.addr, 30, 100.0).unwrap();
    options.patience = Duration::from_secs(20);
    options.leave = true;
    options.sources = Some("127.0.0.0/8".parse().unwrap());
    let report = loadtest::run(options).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.admitted, 30);
    assert_eq!(report.retries.get("join asked for a proof of work, solved"), Some(&30), "{:?}", report.retries);
    assert_eq!(upstream.requests().len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_rehearsal_reports_every_place_against_the_published_draw() {
    let (upstream_addr, upstream) = start_upstream().await;
    // Long enough for the command to start and the crowd to arrive on a busy machine.
    let starts = std::time::SystemTime::now() + Duration::from_secs(8);
    let at = |time| humantime::format_rfc3339_seconds(time).to_string();
    let room = format!(
        "admit_per_minute = 60\nmax_active = 100\nstate = \"closed\"\n[[rooms.events]]\nname = \"Drop\"\n\
         prequeue_at = {}\nstarts_at = {}\nadmit_per_minute = 6000\n",
        at(std::time::SystemTime::now() - Duration::from_secs(5)),
        at(starts),
    );
    let gate = start_room(upstream_addr, &room).await;
    let target = format!("http://{}/", gate.addr);
    let json = gate.dir.path().join("sale.json");
    // 40 visitors in the pre-queue within a second, then the start.
    let mut args = strings(&["--target", &target, "--visitors", "40", "--arrival-rate", "50", "--rehearse-sale"]);
    args.extend(["--report".into(), json.display().to_string(), "--patience".into(), "20s".into()]);
    let (code, stdout, stderr) = loadtest_command(args).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("placed by the published draw 40 of 40 (misplaced 0)"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let sale = &report["sale"];
    assert_eq!((sale["prequeued"].as_u64(), sale["prequeue_visitors"].as_u64()), (Some(40), Some(40)), "{sale}");
    assert_eq!((report["fifo_inversions"].as_u64(), report["places_lost"].as_u64()), (Some(0), Some(0)));
    assert!(sale["first_admission_after_start"].as_f64().unwrap() < 2.0, "{sale}");
    assert!(sale["arrival_admission_correlation"].as_f64().unwrap() < 0.9, "drawn, not first come: {sale}");
    assert_eq!(upstream.requests().len(), 40, "nobody before the start, everyone after");

    // Without a pre-queue, a rehearsal is refused rather than passed.
    let plain = start_room(upstream_addr, ROOM).await;
    let args = strings(&["--target", &format!("http://{}/", plain.addr), "--visitors", "3", "--rehearse-sale"]);
    let (code, _, stderr) = loadtest_command(args).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("nobody went through a pre-queue"), "{stderr}");
}

/// A CI user's first run from one machine: against a loopback target the crowd comes from
/// 127.0.0.0/8 by default (said in the report), and a run held back by the per-address join
/// limit counts its 429s by reason and says at once what limits it and how to lift it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_tool_says_what_limits_it_and_spreads_a_loopback_crowd_by_default() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let room = "admit_per_minute = 6000\nmax_active = 1000\njoins_per_address_per_minute = 5\n";
    let gate = start_room(upstream_addr, room).await;
    let target = format!("http://{}/", gate.addr);
    let json = gate.dir.path().join("report.json");
    // Fairness is not what this test is about (a busy machine may reorder two joins).
    let base = strings(&[
        "--target",
        &target,
        "--visitors",
        "30",
        "--arrival-rate",
        "100",
        "--leave",
        "--max-inversions",
        "1000",
    ]);
    let report_args = ["--report".to_owned(), json.display().to_string()];

    // By default: nobody refused, and the report says where the crowd came from.
    let (code, stdout, stderr) = loadtest_command([&base[..], &report_args].concat()).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("sources 127.0.0.0/8 (the default against a target on loopback)"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["admitted"], 30);
    assert_eq!(report["refused"], serde_json::json!({}));

    // From one address: the limit bites, is counted by reason, and is explained once.
    let mut args = [&base[..], &report_args].concat();
    args.extend(strings(&["--one-source", "--patience", "3s"]));
    let (_, stdout, stderr) = loadtest_command(args).await;
    assert!(stdout.contains("sources this machine's one address"), "{stdout}");
    assert!(stdout.contains("joins refused (429): too_many_joins:"), "{stdout}");
    assert_eq!(stderr.matches("Spread the crowd over more addresses with --sources").count(), 1, "{stderr}");
    assert!(stderr.contains("joins_per_address_per_minute"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["refused"]["too_many_joins"].as_u64().is_some_and(|n| n > 0), "{}", report["refused"]);
}
