//! `vestibule loadtest` against a real gate: a crowd larger than the room goes through the
//! line, the report counts every visitor, and its limits decide the exit code.

mod common;

use std::time::Duration;

use common::*;
use vestibule::loadtest::{self, Options};

/// A room of three places, 20 admissions a second.
const ROOM: &str = "admit_per_minute = 1200\nmax_active = 3\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_goes_through_the_line_in_order_and_is_reported() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, ROOM).await;
    let options = Options {
        target: gate.addr,
        path: "/checkout".into(),
        room: "checkout".into(),
        visitors: 60,
        arrival_rate: 200.0,
        patience: Duration::from_secs(20),
        leave: true,
    };
    let report = loadtest::run(options).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!((report.joined, report.admitted), (60, 60));
    assert_eq!(report.fifo_inversions, 0);
    assert_eq!(report.join_latency_ms.count, 60);
    assert_eq!(report.forwarded_latency_ms.count, 60);
    // The crowd outran the room: most waited for their turn.
    assert!(report.time_to_admission_ms.max > 50.0, "{:?}", report.time_to_admission_ms);
    // The upstream saw each visitor's forwarded request once.
    assert_eq!(upstream.requests().len(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_writes_a_json_report_and_fails_on_a_missed_limit() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, ROOM).await;
    let report_path = gate.dir.path().join("report.json");
    let run = |extra: &'static [&'static str]| {
        let (addr, report_path) = (gate.addr.to_string(), report_path.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_vestibule"))
                .args(["loadtest", "--target", &addr, "--visitors", "20", "--arrival-rate", "100", "--leave"])
                .arg("--report")
                .arg(&report_path)
                .args(extra)
                .output()
                .unwrap()
        })
    };
    let output = run(&[]).await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("20 admitted"));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!((report["admitted"].as_u64(), report["fifo_inversions"].as_u64()), (Some(20), Some(0)));

    let output = run(&["--max-p99-ms", "0"]).await.unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("limits missed: forwarded p99"));
}
