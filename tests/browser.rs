//! The waiting page and the dashboard in a real headless browser (Debian's `chromium`, driven
//! by `playwright-core`): the journeys are in `tests/browser/*.mjs`. `tests/run` installs both.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use tokio_util::sync::CancellationToken;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Debian's chromium, and playwright-core in tests/browser: both installed by `tests/run`.
fn chromium() -> String {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: run `bash tests/run` (it installs Debian's chromium), or set CHROMIUM"
    );
    assert!(
        root().join("tests/browser/node_modules/playwright-core").exists(),
        "playwright-core is missing: run `bash tests/run` (it runs npm ci in tests/browser)"
    );
    chromium
}

/// The demo shop behind a gate whose room `checkout` is configured by `room` (and `[server]`
/// by `server_extra`); the shop stops with the token.
async fn shop_and_gate(server_extra: &str, room: &str) -> (Harness, CancellationToken) {
    let stop = CancellationToken::new();
    let shop = vestibule::demo::start_shop("127.0.0.1:0".parse().unwrap(), stop.clone()).await.unwrap();
    (start_room_with(shop, server_extra, room).await, stop)
}

/// Run the journey `tests/browser/{script}` with `args` in Node: it must succeed; how many
/// expectations it met (its `ok - ` lines).
async fn journey(script: &str, args: Vec<String>) -> usize {
    let chromium = chromium();
    let path = root().join("tests/browser").join(script);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node").arg(path).args(args).env("CHROMIUM", chromium).output()
    })
    .await
    .unwrap()
    .expect("node runs (Node.js is on this machine's kind)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    stdout.lines().filter(|l| l.starts_with("ok - ")).count()
}

fn base(gate: &Harness) -> String {
    format!("http://{}", gate.addr)
}

fn path(path: PathBuf) -> String {
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_waits_watches_their_place_and_is_handed_over() {
    let (gate, stop) = shop_and_gate("", "admit_per_minute = 600\nmax_active = 1\n").await;
    let screenshot = path(root().join("target/waiting-page-320px.png"));
    assert_eq!(journey("waiting_room.mjs", vec![base(&gate), screenshot]).await, 7);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tab_shows_the_place_and_a_locked_phone_comes_back_in_line_and_is_notified() {
    let room = "admit_per_minute = 600\nmax_active = 1\nsite_name = \"Shop\"\n";
    let (gate, stop) = shop_and_gate("", room).await;
    assert_eq!(journey("tab_and_phone.mjs", vec![base(&gate)]).await, 4);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prequeue_counts_down_and_the_page_takes_its_drawn_place_at_the_start() {
    // Long enough for Chromium to start and load both pages while other journeys run.
    let lead = 20;
    let at = |time| humantime::format_rfc3339_seconds(time).to_string();
    let now = std::time::SystemTime::now();
    let room = format!(
        "admit_per_minute = 600\nmax_active = 10\nstate = \"closed\"\n[[rooms.events]]\nname = \"Drop\"\n\
         prequeue_at = {}\nstarts_at = {}\nmax_active = 1\n",
        at(now - std::time::Duration::from_secs(60)),
        at(now + std::time::Duration::from_secs(lead)),
    );
    let (gate, stop) = shop_and_gate("", &room).await;
    assert_eq!(journey("sale.mjs", vec![base(&gate), lead.to_string()]).await, 4);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bundled_language_is_negotiated_laid_out_and_worded_live() {
    let (gate, stop) = shop_and_gate("", "admit_per_minute = 6\nmax_active = 1\nabandon_seconds = 3600\n").await;
    // What each page must show: its heading, its direction, and its words for a wait (a
    // number of minutes as a pattern).
    let languages = vestibule::room::lang::bundled();
    let expected: serde_json::Map<String, serde_json::Value> = languages
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
    let shots = root().join("target/languages");
    std::fs::create_dir_all(&shots).unwrap();
    let expected_file = shots.join("expected.json");
    std::fs::write(&expected_file, serde_json::to_string(&expected).unwrap()).unwrap();
    let met = journey("languages.mjs", vec![base(&gate), path(expected_file), path(shots.clone())]).await;
    assert_eq!(met, languages.len() + 1);
    for language in languages {
        assert!(shots.join(format!("waiting-page-{}.png", language.code)).exists());
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
    // The default difficulty; an idle room, so each visitor is let through once solved.
    let (gate, stop) = shop_and_gate("", "admit_per_minute = 6000\nmax_active = 100\nchallenge = \"pow\"\n").await;
    let rounds = std::env::var("POW_ROUNDS").unwrap_or_else(|_| "3".into());
    assert!(journey("challenge.mjs", vec![base(&gate), rounds]).await >= 1);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_signs_in_watches_the_line_grow_and_pauses_it_from_the_dashboard() {
    let token = "dashboard-test-token";
    let admin = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n");
    let (gate, stop) = shop_and_gate(&admin, "admit_per_minute = 1\nmax_active = 1\n").await;
    let admin_url = format!("http://{}", gate.running.admin.unwrap());
    let args = vec![admin_url, base(&gate), token.to_owned(), path(root().join("target"))];
    assert_eq!(journey("dashboard.mjs", args).await, 9);
    stop.cancel();
}

/// A page of another site whose forms post themselves to the shop (leave, and into the room)
/// leaves the visitor's place, session and cookies as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_of_another_site_changes_nothing_of_the_visitors() {
    let (gate, stop) = shop_and_gate("", "admit_per_minute = 600\nmax_active = 5\n").await;
    assert_eq!(journey("cross_site.mjs", vec![base(&gate)]).await, 3);
    stop.cancel();
}

/// The store away: a newcomer in French gets the room's own page, which says the line is
/// paused and joins it by itself once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_store_is_away_the_page_waits_in_the_visitors_language_and_joins_by_itself() {
    let mut redis = common::redis_server::RedisServer::start();
    let stop = CancellationToken::new();
    let shop = vestibule::demo::start_shop("127.0.0.1:0".parse().unwrap(), stop.clone()).await.unwrap();
    let room =
        format!("admit_per_minute = 600\nmax_active = 1\n[store]\nkind = \"redis\"\nurl = \"{}\"\n", redis.url());
    let gate = start_room_with(shop, "", &room).await;
    // One visitor inside: the newcomer will have to wait once the store is back.
    let mut inside = common::visitor::Visitor::new(gate.addr);
    inside.open("/checkout").await;
    inside.wait_for_status("admitted").await;
    redis.kill();
    wait_for_unavailable(&gate).await;

    let ready = gate.dir.path().join("held");
    let run = tokio::spawn(journey("outage.mjs", vec![base(&gate), path(ready.clone())]));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ready.exists() {
        assert!(!run.is_finished(), "the journey ended before the page was held");
        assert!(tokio::time::Instant::now() < deadline, "the page was never held");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    redis.restart();
    assert_eq!(run.await.unwrap(), 2);
    stop.cancel();
}

/// Until the gate's room knows the store is away.
async fn wait_for_unavailable(gate: &Harness) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while gate.running.gate().rooms().iter().any(|room| room.is_available()) {
        assert!(tokio::time::Instant::now() < deadline, "the store was never seen away");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
