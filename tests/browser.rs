//! The waiting page in a real headless browser (Debian's `chromium`, driven by
//! `playwright-core`): see `tests/browser/waiting_room.mjs`. `tests/run` installs both.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use tokio_util::sync::CancellationToken;

/// Debian's chromium, and playwright-core in tests/browser: both installed by `tests/run`.
fn chromium() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: run `bash tests/run` (it installs Debian's chromium), or set CHROMIUM"
    );
    assert!(
        root.join("tests/browser/node_modules/playwright-core").exists(),
        "playwright-core is missing: run `bash tests/run` (it runs npm ci in tests/browser)"
    );
    chromium
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_waits_watches_their_place_and_is_handed_over() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = chromium();

    let stop = CancellationToken::new();
    let shop = vestibule::demo::start_shop("127.0.0.1:0".parse().unwrap(), stop.clone()).await.unwrap();
    let gate = start_room(shop, "admit_per_minute = 600\nmax_active = 1\n").await;
    let screenshot = root.join("target/waiting-page-320px.png");

    let base = format!("http://{}", gate.addr);
    let script = root.join("tests/browser/waiting_room.mjs");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node").arg(script).arg(base).arg(screenshot).env("CHROMIUM", chromium).output()
    })
    .await
    .unwrap()
    .expect("node runs (Node.js is on this machine's kind)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "the browser journey failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok - ")).count(), 7, "{stdout}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tab_shows_the_place_and_a_locked_phone_comes_back_in_line_and_is_notified() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = chromium();
    let stop = CancellationToken::new();
    let shop = vestibule::demo::start_shop("127.0.0.1:0".parse().unwrap(), stop.clone()).await.unwrap();
    let gate = start_room(shop, "admit_per_minute = 600\nmax_active = 1\nsite_name = \"Shop\"\n").await;
    let base = format!("http://{}", gate.addr);
    let script = root.join("tests/browser/tab_and_phone.mjs");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node").arg(script).arg(base).env("CHROMIUM", chromium).output()
    })
    .await
    .unwrap()
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "the tab and the phone:\n{stdout}\n{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok - ")).count(), 4, "{stdout}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bundled_language_is_negotiated_laid_out_and_worded_live() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = chromium();
    let stop = CancellationToken::new();
    let shop = vestibule::demo::start_shop("127.0.0.1:0".parse().unwrap(), stop.clone()).await.unwrap();
    let gate = start_room(shop, "admit_per_minute = 6\nmax_active = 1\nabandon_seconds = 3600\n").await;
    // What each page must show: its heading, its direction, and its words for a wait (a
    // number of minutes as a pattern).
    let expected: serde_json::Map<String, serde_json::Value> = vestibule::room::lang::bundled()
        .iter()
        .map(|language| {
            let pattern = |key: &str| regex_escape(&language.strings[key]).replace("\\{n\\}", "\\d+");
            let eta: Vec<String> =
                ["eta_estimating", "eta_soon", "eta_one_minute", "eta_minutes", "eta_long"].map(pattern).to_vec();
            let value =
                serde_json::json!({ "title": language.strings["title_waiting"], "rtl": language.rtl, "eta": eta });
            (language.code.clone(), value)
        })
        .collect();
    let shots = root.join("target/languages");
    std::fs::create_dir_all(&shots).unwrap();
    let expected_file = shots.join("expected.json");
    std::fs::write(&expected_file, serde_json::to_string(&expected).unwrap()).unwrap();
    let base = format!("http://{}", gate.addr);
    let script = root.join("tests/browser/languages.mjs");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node").arg(script).arg(base).arg(expected_file).arg(shots).env("CHROMIUM", chromium).output()
    })
    .await
    .unwrap()
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "languages:\n{stdout}\n{stderr}");
    let languages = vestibule::room::lang::bundled().len();
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok - ")).count(), languages + 1, "{stdout}");
    for language in vestibule::room::lang::bundled() {
        assert!(root.join(format!("target/languages/waiting-page-{}.png", language.code)).exists());
    }
    stop.cancel();
}

/// `text` as a regular expression that matches it exactly.
fn regex_escape(text: &str) -> String {
    let mut escaped = String::new();
    for c in text.chars() {
        if "\\^$.|?*+()[]{}/".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_solves_the_proof_of_work_and_the_visitor_goes_on() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = chromium();
    let stop = CancellationToken::new();
    let shop = vestibule::demo::start_shop("127.0.0.1:0".parse().unwrap(), stop.clone()).await.unwrap();
    // The default difficulty; an idle room, so each visitor is let through once solved.
    let gate = start_room(shop, "admit_per_minute = 6000\nmax_active = 100\nchallenge = \"pow\"\n").await;
    let base = format!("http://{}", gate.addr);
    let rounds = std::env::var("POW_ROUNDS").unwrap_or_else(|_| "3".into());
    let script = root.join("tests/browser/challenge.mjs");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node").arg(script).arg(base).arg(&rounds).env("CHROMIUM", chromium).output()
    })
    .await
    .unwrap()
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "the browser did not get through the challenge:\n{stdout}\n{stderr}");
    assert!(stdout.lines().filter(|l| l.starts_with("ok - ")).count() >= 1, "{stdout}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_signs_in_watches_the_line_grow_and_pauses_it_from_the_dashboard() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let chromium = chromium();
    let stop = CancellationToken::new();
    let shop = vestibule::demo::start_shop("127.0.0.1:0".parse().unwrap(), stop.clone()).await.unwrap();
    let token = "dashboard-test-token";
    let admin = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n");
    let gate = start_room_with(shop, &admin, "admit_per_minute = 1\nmax_active = 1\n").await;
    let admin_url = format!("http://{}", gate.running.admin.unwrap());
    let base = format!("http://{}", gate.addr);
    let screenshots = root.join("target");
    let script = root.join("tests/browser/dashboard.mjs");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .args([&admin_url, &base, token])
            .arg(screenshots)
            .env("CHROMIUM", chromium)
            .output()
    })
    .await
    .unwrap()
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "the dashboard journey failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok - ")).count(), 9, "{stdout}");
    stop.cancel();
}
