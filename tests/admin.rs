//! The admin API over real HTTP (docs/api.md): probes, the token, every endpoint with good and
//! bad bodies, live changes reaching waiting visitors, a batch admitted within capacity,
//! metrics read back with a Prometheus text parser, reload, and readiness during a stop.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::visitor::{feed_until, Visitor};
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use vestibule::config::Config;
use vestibule::server::{self, Running};
use vestibule::token::{generate_key, KeyKind};

const TOKEN: &str = "test-admin-token-0123";

/// A gate with an admin listener, configured from a file (so that it can be reloaded).
struct Admin {
    running: Running,
    dir: TempDir,
    config: PathBuf,
    upstream: SocketAddr,
}

impl Admin {
    fn addr(&self) -> SocketAddr {
        self.running.admin.expect("the admin listener is up")
    }

    fn text(&self, rooms: &str) -> String {
        config_file_text(self.upstream, &self.dir.path().join("signing.pem"), rooms)
    }
}

fn config_file_text(upstream: SocketAddr, key: &Path, rooms: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         token = \"{TOKEN}\"\n[upstream]\nurl = \"http://{upstream}\"\n[tokens]\nsigning_key = {key:?}\n{rooms}"
    )
}

const ROOM: &str = "[[rooms]]\nid = \"checkout\"\npaths = [\"/checkout\"]\n";

async fn start_admin(upstream: SocketAddr, rooms: &str) -> Admin {
    let dir = TempDir::new("admin");
    let key = dir.path().join("signing.pem");
    std::fs::write(&key, generate_key(KeyKind::Eddsa)).unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, config_file_text(upstream, &key, rooms)).unwrap();
    let running = server::start(&Config::load(&config).unwrap()).await.unwrap();
    Admin { running, dir, config, upstream }
}

/// One admin call; `token` None sends none.
async fn call(admin: SocketAddr, method: &str, path: &str, token: Option<&str>, body: &str) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(path).header("host", "localhost");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let (status, _, text) = send(admin, request.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

async fn authorized(admin: SocketAddr, method: &str, path: &str, body: &str) -> (StatusCode, Value) {
    call(admin, method, path, Some(TOKEN), body).await
}

async fn room_view(admin: SocketAddr) -> Value {
    let (status, view) = authorized(admin, "GET", "/rooms/checkout", "").await;
    assert_eq!(status, StatusCode::OK, "{view}");
    view
}

/// Wait until the room's view satisfies `wanted` (it follows the store at each step).
async fn view_until(admin: SocketAddr, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let view = room_view(admin).await;
        if wanted(&view) {
            return view;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What an admin call may change: the settings in force and the line.
fn settings_and_line(view: &Value) -> Value {
    let keys = ["state", "message", "admit_per_minute", "max_active", "overrides", "waiting", "cursor", "last_ticket"];
    keys.iter().map(|key| (key.to_string(), view[key].clone())).collect()
}

#[tokio::test]
async fn probes_and_metrics_are_open_and_everything_else_needs_the_token() {
    let (upstream, _) = start_upstream().await;
    let gate = start_admin(upstream, &format!("{ROOM}admit_per_minute = 60\nmax_active = 5\n")).await;
    let admin = gate.addr();
    assert_eq!(call(admin, "GET", "/healthz", None, "").await, (StatusCode::OK, json!({"status": "ok"})));
    assert_eq!(call(admin, "GET", "/readyz", None, "").await, (StatusCode::OK, json!({"ready": true, "store": "ok"})));
    let (status, text) = call(admin, "GET", "/metrics", None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.as_str().unwrap().contains("vestibule_store_up 1"), "{text}");
    let (status, page) = call(admin, "GET", "/", None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.as_str().unwrap().contains("<title>vestibule"), "the dashboard page");

    for (method, path, body) in [
        ("GET", "/rooms", ""),
        ("GET", "/rooms/checkout", ""),
        ("PATCH", "/rooms/checkout", r#"{"state":"paused"}"#),
        ("DELETE", "/rooms/checkout/overrides", ""),
        ("POST", "/rooms/checkout/admit", r#"{"count":1}"#),
        ("POST", "/reload", ""),
        ("GET", "/history", ""),
        ("GET", "/nowhere", ""),
    ] {
        for token in [None, Some("wrong-token-of-some-length"), Some("")] {
            let (status, answer) = call(admin, method, path, token, body).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} with {token:?}: {answer}");
        }
    }
    assert_eq!(room_view(admin).await["state"], "open", "nothing was changed without the token");

    let (status, rooms) = authorized(admin, "GET", "/rooms", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rooms.as_array().unwrap().len(), 1);
    let view = &rooms[0];
    for field in [
        "id",
        "state",
        "message",
        "admit_per_minute",
        "max_active",
        "session_seconds",
        "waiting",
        "active_sessions",
        "grants_outstanding",
        "cursor",
        "last_ticket",
        "admitted_last_minute",
        "eta_seconds",
        "leader",
        "store",
        "overrides",
    ] {
        assert!(view.get(field).is_some(), "the room view has {field}: {view}");
    }
    assert_eq!((view["admit_per_minute"].as_u64(), view["max_active"].as_u64()), (Some(60), Some(5)));
    assert_eq!((view["store"].as_str(), view["leader"].as_bool()), (Some("ok"), Some(true)));
    assert_eq!(authorized(admin, "GET", "/rooms/nope", "").await.0, StatusCode::NOT_FOUND);
    assert_eq!(authorized(admin, "PATCH", "/rooms/nope", r#"{"state":"paused"}"#).await.0, StatusCode::NOT_FOUND);
    assert_eq!(authorized(admin, "POST", "/rooms/checkout", "{}").await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(authorized(admin, "GET", "/rooms/checkout/admit", "").await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(authorized(admin, "GET", "/nowhere", "").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_bodies_get_a_4xx_naming_the_problem_and_change_nothing() {
    let (upstream, _) = start_upstream().await;
    let gate = start_admin(upstream, &format!("{ROOM}admit_per_minute = 60\nmax_active = 5\n")).await;
    let admin = gate.addr();
    let before = settings_and_line(&room_view(admin).await);
    let huge = format!(r#"{{"message":"{}"}}"#, "x".repeat(20_000));
    let long = format!(r#"{{"message":"{}"}}"#, "x".repeat(501));
    for (path, body, status, field) in [
        ("/rooms/checkout", "{", StatusCode::BAD_REQUEST, None),
        ("/rooms/checkout", "not json", StatusCode::BAD_REQUEST, None),
        ("/rooms/checkout", "", StatusCode::BAD_REQUEST, None),
        ("/rooms/checkout", "[]", StatusCode::BAD_REQUEST, None),
        ("/rooms/checkout", "{}", StatusCode::BAD_REQUEST, None),
        ("/rooms/checkout", r#"{"state":"paused"} trailing"#, StatusCode::BAD_REQUEST, None),
        ("/rooms/checkout", r#"{"rate":300}"#, StatusCode::BAD_REQUEST, Some("rate")),
        ("/rooms/checkout", r#"{"state":"sleeping"}"#, StatusCode::BAD_REQUEST, Some("state")),
        ("/rooms/checkout", r#"{"state":"paused","max_active":0}"#, StatusCode::BAD_REQUEST, Some("max_active")),
        ("/rooms/checkout", r#"{"max_active":-3}"#, StatusCode::BAD_REQUEST, Some("max_active")),
        ("/rooms/checkout", r#"{"admit_per_minute":"fast"}"#, StatusCode::BAD_REQUEST, Some("admit_per_minute")),
        ("/rooms/checkout", r#"{"admit_per_minute":2000000}"#, StatusCode::BAD_REQUEST, Some("admit_per_minute")),
        ("/rooms/checkout", r#"{"admit_per_minute":1e3}"#, StatusCode::BAD_REQUEST, Some("admit_per_minute")),
        ("/rooms/checkout", &long, StatusCode::BAD_REQUEST, Some("message")),
        ("/rooms/checkout", &huge, StatusCode::PAYLOAD_TOO_LARGE, None),
        ("/rooms/checkout/admit", r#"{"count":0}"#, StatusCode::BAD_REQUEST, Some("count")),
        ("/rooms/checkout/admit", r#"{"count":1000000}"#, StatusCode::BAD_REQUEST, Some("count")),
        ("/rooms/checkout/admit", r#"{"count":2,"all":true}"#, StatusCode::BAD_REQUEST, Some("all")),
        ("/rooms/checkout/admit", r#"{}"#, StatusCode::BAD_REQUEST, None),
    ] {
        let method = if path.ends_with("admit") { "POST" } else { "PATCH" };
        let (got, answer) = authorized(admin, method, path, body).await;
        let shown = &body[..body.len().min(60)];
        assert_eq!(got, status, "{method} {path} {shown}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "an explanation: {answer}");
        if let Some(field) = field {
            assert_eq!(answer["field"], field, "{shown}: {answer}");
            assert!(answer["error"].as_str().unwrap().contains(field), "{answer}");
        }
    }
    assert_eq!(settings_and_line(&room_view(admin).await), before, "nothing changed");
}

#[tokio::test]
async fn a_live_change_reaches_the_waiting_page_at_once_and_clearing_it_restores_the_file() {
    let (upstream, _) = start_upstream().await;
    let gate = start_admin(upstream, &format!("{ROOM}admit_per_minute = 60\nmax_active = 1\n")).await;
    let admin = gate.addr();
    let mut first = Visitor::new(gate.running.addr);
    first.open("/checkout").await;
    let mut waiter = Visitor::new(gate.running.addr);
    waiter.open("/checkout").await;
    assert_eq!(waiter.status().await["status"], "waiting");
    let mut feed = waiter.feed().await;
    feed_until(&mut feed, "position").await;

    let (status, view) =
        authorized(admin, "PATCH", "/rooms/checkout", r#"{"message":"Restocking: back at noon"}"#).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["message"], "Restocking: back at noon");
    let pushed = feed_until(&mut feed, "message").await;
    assert_eq!(pushed["message"], "Restocking: back at noon");

    let (_, view) = authorized(admin, "PATCH", "/rooms/checkout", r#"{"state":"paused","admit_per_minute":120}"#).await;
    assert_eq!((view["state"].as_str(), view["admit_per_minute"].as_u64()), (Some("paused"), Some(120)));
    assert_eq!(
        view["overrides"],
        json!({"state": "paused", "admit_per_minute": 120, "message": "Restocking: back at noon"})
    );
    let paused = feed_until(&mut feed, "paused").await;
    assert_eq!(paused["message"], "Restocking: back at noon");
    assert_eq!(waiter.status().await["status"], "paused");
    let (_, _, page) = waiter.open("/checkout").await;
    assert!(page.contains("The line is paused"), "the page says so");

    let (status, view) = authorized(admin, "DELETE", "/rooms/checkout/overrides", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((view["state"].as_str(), view["admit_per_minute"].as_u64()), (Some("open"), Some(60)));
    assert_eq!(view["overrides"], json!({}));
    assert_eq!(view["message"], Value::Null);
    feed_until(&mut feed, "position").await;
}

#[tokio::test]
async fn admit_lets_exactly_the_next_n_in_and_never_past_max_active() {
    let (upstream, _) = start_upstream().await;
    // Paused: only the operator lets anyone in.
    let gate =
        start_admin(upstream, &format!("{ROOM}admit_per_minute = 60\nmax_active = 3\nstate = \"paused\"\n")).await;
    let admin = gate.addr();
    let mut visitors = Vec::new();
    for _ in 0..6 {
        let mut visitor = Visitor::new(gate.running.addr);
        visitor.open("/checkout").await;
        visitors.push(visitor);
    }
    view_until(admin, "six in line", |view| view["waiting"] == 6).await;
    let (status, answer) = authorized(admin, "POST", "/rooms/checkout/admit", r#"{"count":2}"#).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["admitted"], 2);
    let mut statuses = Vec::new();
    for visitor in &mut visitors {
        statuses.push(visitor.status().await["status"].as_str().unwrap().to_owned());
    }
    assert_eq!(statuses, ["admitted", "admitted", "paused", "paused", "paused", "paused"], "the first two, in order");

    // Capacity 3: one more fits, whatever is asked.
    let (_, answer) = authorized(admin, "POST", "/rooms/checkout/admit", r#"{"count":10}"#).await;
    assert_eq!(answer["admitted"], 1);
    assert_eq!(answer["grants_outstanding"], 3);
    assert_eq!(answer["waiting"], 3);
    let (_, answer) = authorized(admin, "POST", "/rooms/checkout/admit", r#"{"count":10}"#).await;
    assert_eq!(answer["admitted"], 0, "full: nobody more");
    assert_eq!(visitors[2].status().await["status"], "admitted");
    assert_eq!(visitors[3].status().await["status"], "paused");
}

#[tokio::test]
async fn metrics_read_by_a_prometheus_parser_count_what_happened() {
    let (upstream, _) = start_upstream().await;
    let harness =
        start_admin(upstream, &format!("{ROOM}admit_per_minute = 60\nmax_active = 2\nstate = \"paused\"\n")).await;
    let (gate, admin) = (harness.running.addr, harness.addr());
    let mut visitors = Vec::new();
    for _ in 0..5 {
        let mut visitor = Visitor::new(gate);
        visitor.open("/checkout").await;
        visitors.push(visitor);
    }
    visitors[0].open("/checkout").await; // again: still waiting, no new ticket
    authorized(admin, "POST", "/rooms/checkout/admit", r#"{"count":2}"#).await;
    let (status, _, _) = visitors[0].open("/checkout").await; // redeems the turn: forwarded
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = visitors[0].open("/checkout/cart").await; // with the token
    assert_eq!(status, StatusCode::OK);
    get(gate, "/elsewhere", &[]).await;
    get(gate, "/_vestibule/status?room=checkout", &[]).await;
    // The gauges follow the scheduler's next read.
    let scrape = loop {
        let scrape = scrape(admin).await;
        if value(&scrape, "vestibule_active_sessions", &[("room", "checkout")]) == 1.0 {
            break scrape;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let room = [("room", "checkout")];
    assert_eq!(value(&scrape, "vestibule_joins_total", &room), 5.0);
    assert_eq!(value(&scrape, "vestibule_admissions_total", &room), 2.0);
    assert_eq!(value(&scrape, "vestibule_waiting", &room), 3.0);
    assert_eq!(value(&scrape, "vestibule_grants_outstanding", &room), 1.0);
    assert_eq!(value(&scrape, "vestibule_room_leader", &room), 1.0);
    let requests = |outcome| value(&scrape, "vestibule_requests_total", &[("room", "checkout"), ("outcome", outcome)]);
    assert_eq!((requests("waiting"), requests("entered"), requests("admitted")), (6.0, 1.0, 1.0));
    let outside = |outcome| value(&scrape, "vestibule_requests_total", &[("room", ""), ("outcome", outcome)]);
    assert_eq!((outside("forwarded"), outside("reserved")), (1.0, 1.0));
    assert_eq!(value(&scrape, "vestibule_store_up", &[]), 1.0);
    assert_eq!(value(&scrape, "vestibule_feed_sockets", &[]), 0.0);
    let forwarded = scrape
        .samples
        .iter()
        .find(|s| s.metric == "vestibule_upstream_duration_seconds" && s.labels.get("class") == Some("2xx"));
    match forwarded.map(|s| &s.value) {
        Some(prometheus_parse::Value::Histogram(buckets)) => {
            assert_eq!(buckets.last().map(|b| b.count), Some(3.0), "three requests reached the upstream")
        }
        other => panic!("the upstream histogram: {other:?}"),
    }
}

async fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    let (status, text) = call(admin, "GET", "/metrics", None, "").await;
    assert_eq!(status, StatusCode::OK);
    let lines = text.as_str().unwrap().lines().map(|line| Ok(line.to_owned())).collect::<Vec<_>>();
    prometheus_parse::Scrape::parse(lines.into_iter()).expect("Prometheus text")
}

fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k).unwrap_or("") == *v))
        .unwrap_or_else(|| panic!("{metric} {labels:?} missing"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{metric}: {other:?}"),
    }
}

#[tokio::test]
async fn reload_applies_a_new_room_and_a_key_rotation_and_refuses_a_bad_file() {
    let (upstream, _) = start_upstream().await;
    let gate = start_admin(upstream, &format!("{ROOM}admit_per_minute = 60\nmax_active = 5\n")).await;
    let admin = gate.addr();
    let old_token =
        gate.running.gate().tokens().mint("checkout", "v1", 0, 0, vestibule::token::unix_now() + 600).unwrap();

    // A new room, and a new signing key with the old one still accepted.
    let new_key = gate.dir.path().join("new.pem");
    std::fs::write(&new_key, generate_key(KeyKind::Eddsa)).unwrap();
    let rooms = format!(
        "{ROOM}admit_per_minute = 60\nmax_active = 5\n[[rooms]]\nid = \"tickets\"\npaths = [\"/tickets\"]\n\
         admit_per_minute = 6\nmax_active = 1\nstate = \"paused\"\n"
    );
    let text = gate.text(&rooms).replace(
        &format!("signing_key = {:?}", gate.dir.path().join("signing.pem")),
        &format!("signing_key = {new_key:?}\nverify_keys = [{:?}]", gate.dir.path().join("signing.pem")),
    );
    std::fs::write(&gate.config, &text).unwrap();
    let (status, reloaded) = authorized(admin, "POST", "/reload", "").await;
    assert_eq!(status, StatusCode::OK, "{reloaded}");
    assert_eq!(reloaded["added"], json!(["tickets"]));
    assert_eq!(reloaded["keys"], true);
    let (_, rooms) = authorized(admin, "GET", "/rooms", "").await;
    assert_eq!(rooms.as_array().unwrap().len(), 2);
    let (status, _, _) = get(gate.running.addr, "/tickets", &[]).await;
    assert!(is_gate_wait(status), "the new room guards its path: {status}");
    let (status, _, _) = get(gate.running.addr, "/checkout", &[("vestibule-token", &old_token)]).await;
    assert_eq!(status, StatusCode::OK, "a token of the old key still passes");
    let jwks = get(gate.running.addr, "/.well-known/jwks.json", &[]).await.2;
    assert_eq!(serde_json::from_str::<Value>(&jwks).unwrap()["keys"].as_array().unwrap().len(), 2);

    // A bad file: refused, the key named, the running configuration kept.
    std::fs::write(&gate.config, text.replace("admit_per_minute = 6\n", "admit_per_minute = 0\n")).unwrap();
    let (status, refused) = authorized(admin, "POST", "/reload", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["field"], "rooms[1].admit_per_minute", "{refused}");
    let (_, rooms) = authorized(admin, "GET", "/rooms", "").await;
    assert_eq!(rooms[1]["admit_per_minute"], 6, "the configuration in force stays");
    std::fs::write(&gate.config, "[server\n").unwrap();
    assert_eq!(authorized(admin, "POST", "/reload", "").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(authorized(admin, "GET", "/rooms", "").await.1.as_array().unwrap().len(), 2);
}

/// A template that uses every variable the waiting page is given (docs/waiting-page.md).
const EVERY_VARIABLE: &str =
    "<!doctype html><html><head><title>({{ position }}) {{ status }}{{ suffix }}</title></head>\n\
<body><h1 id=\"title\">{{ room }} at {{ site_name }}</h1>\n\
<p id=\"position\">{{ position }}</p><p>of {{ start_position }}, {{ progress }}% done</p>\n\
<p id=\"eta\">{{ eta_text }} ({{ eta_seconds }} s)</p><p id=\"message\">{{ message }}</p>\n\
{% if why %}<p>{{ why }}</p>{% endif %}\n{{ script }}</body></html>\n";

#[tokio::test]
async fn a_rooms_own_template_is_rendered_previewed_and_reloaded() {
    let (upstream, _) = start_upstream().await;
    let dir = TempDir::new("template");
    std::fs::write(dir.path().join("waiting.html"), EVERY_VARIABLE).unwrap();
    let room = format!(
        "{ROOM}admit_per_minute = 60\nmax_active = 1\nsite_name = \"Shop\"\nmessage = \"Big sale\"\ntemplate = {:?}\n",
        dir.path().join("waiting.html")
    );
    let gate = start_admin(upstream, &room).await;
    let page = |cookie: Option<String>| {
        let mut request = Request::get("/checkout").header("host", "shop.test").header("accept", "text/html");
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        request.body(Full::new(Bytes::new())).unwrap()
    };
    // The first visitor takes the only place; the second waits and sees the room's page.
    send(gate.running.addr, page(None)).await;
    let (status, _, body) = send(gate.running.addr, page(None)).await;
    assert_eq!(status, StatusCode::OK);
    for shown in [
        "<title>(1) waiting - Shop</title>",
        "checkout at Shop",
        r#"<p id="position">1</p><p>of 1, 0% done</p>"#,
        "Less than a minute to go. (1 s)",
        r#"<p id="message">Big sale</p>"#,
        "/_vestibule/ws?room=",
    ] {
        assert!(body.contains(shown), "{shown:?} missing from:\n{body}");
    }
    // The admin preview renders it in each state, with a sample place.
    let admin = gate.addr();
    let (status, preview) = authorized(admin, "GET", "/rooms/checkout/preview?state=paused", "").await;
    assert_eq!(status, StatusCode::OK);
    let preview = preview.as_str().unwrap().to_owned();
    assert!(preview.contains("<title>(12) paused - Shop</title>") && preview.contains("of 40, 70% done"), "{preview}");
    let (status, refused) = authorized(admin, "GET", "/rooms/checkout/preview?state=gone", "").await;
    assert_eq!((status, refused["field"].as_str()), (StatusCode::BAD_REQUEST, Some("state")), "{refused}");
    assert_eq!(call(admin, "GET", "/rooms/checkout/preview", None, "").await.0, StatusCode::UNAUTHORIZED);

    // A changed file is read again on reload (SIGHUP); a broken one is refused with its line
    // and the page in force stays.
    std::fs::write(dir.path().join("waiting.html"), EVERY_VARIABLE.replace("<h1", "<h1 class=\"new\"")).unwrap();
    let (status, reloaded) = authorized(admin, "POST", "/reload", "").await;
    assert_eq!((status, &reloaded["changed"]), (StatusCode::OK, &json!(["checkout"])), "{reloaded}");
    let (_, preview) = authorized(admin, "GET", "/rooms/checkout/preview", "").await;
    assert!(preview.as_str().unwrap().contains(r#"<h1 class="new""#));
    std::fs::write(dir.path().join("waiting.html"), "<p>\n{{ postion }}</p>").unwrap();
    let (status, refused) = authorized(admin, "POST", "/reload", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["field"], "rooms[0].template");
    assert!(refused["error"].as_str().unwrap().contains("waiting.html, line 2"), "{refused}");
    let (_, preview) = authorized(admin, "GET", "/rooms/checkout/preview", "").await;
    assert!(preview.as_str().unwrap().contains(r#"<h1 class="new""#), "the page in force stays");
}

#[test]
fn a_broken_template_is_refused_at_check_with_its_file_and_line() {
    let dir = TempDir::new("broken-template");
    let key = dir.path().join("signing.pem");
    std::fs::write(&key, generate_key(KeyKind::Eddsa)).unwrap();
    for (template, line, what) in [
        ("<p>\n{% if position %}\n<p>never closed</p>\n", 2, "syntax error"),
        ("<p>{{ position }}</p>\n\n<p>{{ postion }}</p>\n", 3, "undefined"),
        ("<p>{{ position | shout }}</p>\n", 1, "unknown filter"),
        // Fine with a message, broken without one (the usual case): refused all the same.
        ("<p>\n{% if message | length > 3 %}{{ message }}{% endif %}</p>\n", 2, "length"),
    ] {
        std::fs::write(dir.path().join("waiting.html"), template).unwrap();
        let room = format!("{ROOM}admit_per_minute = 60\nmax_active = 1\ntemplate = \"waiting.html\"\n");
        let config = dir.path().join("proxy.toml");
        std::fs::write(&config, config_file_text("127.0.0.1:9".parse().unwrap(), &key, &room)).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_vestibule"))
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr).to_string() + &String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success(), "{template:?} passed check: {said}");
        assert!(said.contains("rooms[0].template"), "{said}");
        assert!(said.contains(&format!("waiting.html, line {line}")), "{template:?}: {said}");
        assert!(said.to_lowercase().contains(what), "{template:?}: {said}");
    }
}

/// The `vestibule` binary with an admin listener: (process, public address, admin address,
/// the lines it logs from then on).
fn spawn_with_admin(config: &Path) -> (Proxy, SocketAddr, SocketAddr, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_vestibule"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the vestibule binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut public, mut admin) = (None, None);
    while public.is_none() || admin.is_none() {
        let line = lines.next().expect("vestibule reports its addresses before exiting").unwrap();
        let Ok(event) = serde_json::from_str::<Value>(&line) else { continue };
        let addr = || event["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap();
        match event["message"].as_str() {
            Some("listening") => public = Some(addr()),
            Some("admin listening") => admin = Some(addr()),
            _ => {}
        }
    }
    let (sender, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|line| drop(sender.send(line))));
    (Proxy(child), public.unwrap(), admin.unwrap(), log)
}

fn signal(process: &Proxy, name: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(process.0.id().to_string()).status();
    assert!(status.unwrap().success(), "kill -{name}");
}

#[tokio::test]
async fn readiness_fails_from_sigterm_while_the_drain_runs_and_sighup_reloads() {
    let (upstream_addr, upstream) = start_upstream().await;
    let dir = TempDir::new("admin-process");
    let key = dir.path().join("signing.pem");
    std::fs::write(&key, generate_key(KeyKind::Eddsa)).unwrap();
    let config = dir.path().join("proxy.toml");
    let log = "[log]\nformat = \"json\"\n";
    let one_room = format!("{ROOM}admit_per_minute = 60\nmax_active = 5\n{log}");
    let text =
        config_file_text(upstream_addr, &key, &one_room).replace("shutdown_grace = \"2s\"", "shutdown_grace = \"20s\"");
    std::fs::write(&config, &text).unwrap();
    let (mut process, public, admin, _log) = spawn_with_admin(&config);
    assert_eq!(call(admin, "GET", "/readyz", None, "").await.0, StatusCode::OK);

    // SIGHUP: a new room from the file; a bad file is refused and the process carries on.
    let two_rooms = text.replace(
        log,
        &format!("[[rooms]]\nid = \"tickets\"\npaths = [\"/tickets\"]\nadmit_per_minute = 6\nmax_active = 1\n{log}"),
    );
    std::fs::write(&config, &two_rooms).unwrap();
    signal(&process, "HUP");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while authorized(admin, "GET", "/rooms", "").await.1.as_array().unwrap().len() != 2 {
        assert!(tokio::time::Instant::now() < deadline, "SIGHUP did not add the room");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&config, "this is not toml").unwrap();
    signal(&process, "HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(process.0.try_wait().unwrap().is_none(), "a bad file does not stop the instance");
    assert_eq!(authorized(admin, "GET", "/rooms", "").await.1.as_array().unwrap().len(), 2);

    // A request in flight keeps the drain going; readiness fails from the signal on.
    let arrived = upstream.arrived.notified();
    let in_flight = tokio::spawn(get(public, "/hang", &[]));
    arrived.await;
    signal(&process, "TERM");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let reason = loop {
        let (status, answer) = call(admin, "GET", "/readyz", None, "").await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break answer["reason"].as_str().unwrap().to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "readiness never failed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(reason.starts_with("stopping"), "{reason}");
    assert!(!in_flight.is_finished(), "the drain is still on");
    assert!(process.0.try_wait().unwrap().is_none());
    assert_eq!(call(admin, "GET", "/healthz", None, "").await.0, StatusCode::OK, "alive while it drains");
    in_flight.abort();
    process.kill();
}

#[tokio::test]
async fn the_access_log_has_one_line_per_request_and_never_a_query_cookie_or_token() {
    let (upstream, _) = start_upstream().await;
    let dir = TempDir::new("access-log");
    let key = dir.path().join("signing.pem");
    std::fs::write(&key, generate_key(KeyKind::Eddsa)).unwrap();
    let config = dir.path().join("proxy.toml");
    let rooms = format!("{ROOM}admit_per_minute = 60\nmax_active = 1\n[log]\nformat = \"json\"\naccess = true\n");
    std::fs::write(&config, config_file_text(upstream, &key, &rooms)).unwrap();
    let (_process, public, _admin, log) = spawn_with_admin(&config);
    let mut first = Visitor::new(public);
    first.open("/checkout?card=4111111111111111").await;
    let token = first.jar.values().next().cloned().expect("a token cookie");
    let (status, _, _) = first.request("POST", "/checkout/pay?secret=s3cr3t", "application/json").await;
    assert_eq!(status, StatusCode::OK);
    let mut waiter = Visitor::new(public);
    waiter.open("/checkout").await;
    get(public, "/elsewhere/%7Euser?q=1", &[("authorization", "Bearer hunter22")]).await;

    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    while lines.len() < 4 {
        let line =
            log.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())).expect("access lines");
        let event: Value = serde_json::from_str(&line).unwrap();
        if event["target"] == "vestibule::access" || event["outcome"].is_string() {
            for secret in ["4111111111111111", "s3cr3t", "hunter22", "q=1", token.as_str()] {
                assert!(!line.contains(secret), "{secret} leaked into {line}");
            }
            lines.push(event);
        }
    }
    let summary: Vec<(String, String, String, u64)> = lines
        .iter()
        .map(|e| {
            let text = |key: &str| e[key].as_str().unwrap().to_owned();
            (
                text("method"),
                text("path"),
                format!("{}/{}", text("room"), text("outcome")),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("GET".into(), "/checkout".into(), "checkout/entered".into(), 200),
            ("POST".into(), "/checkout/pay".into(), "checkout/admitted".into(), 200),
            ("GET".into(), "/checkout".into(), "checkout/waiting".into(), 200),
            ("GET".into(), "/elsewhere/~user".into(), "-/forwarded".into(), 200),
        ]
    );
    for event in &lines {
        assert_eq!(event["client"], "127.0.0.1");
        assert!(event["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{event}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_shows_its_prequeue_then_its_draw_to_the_operator_and_its_countdown_to_the_feed() {
    let (upstream, _) = start_upstream().await;
    // Long enough for three joins and a read of the room on a busy machine.
    let starts = std::time::SystemTime::now() + Duration::from_secs(8);
    let at = |time| humantime::format_rfc3339_seconds(time).to_string();
    let rooms = format!(
        "{ROOM}admit_per_minute = 600\nmax_active = 50\n[[rooms.events]]\nname = \"Drop\"\n\
         prequeue_at = {}\nstarts_at = {}\nmax_active = 5\n\
         [[rooms.events]]\nname = \"Secret\"\nprequeue_at = {}\nstarts_at = {}\n",
        at(std::time::SystemTime::now() - Duration::from_secs(5)),
        at(starts),
        at(starts + Duration::from_secs(86_400)),
        at(starts + Duration::from_secs(86_400 + 3_600)),
    );
    let admin = start_admin(upstream, &rooms).await;
    let mut visitors: Vec<Visitor> = (0..3).map(|_| Visitor::new(admin.running.addr)).collect();
    for visitor in &mut visitors {
        assert_eq!(visitor.open("/checkout").await.0, StatusCode::OK);
    }
    let view = view_until(admin.addr(), "the pre-queue", |view| view["sale"]["prequeued"] == 3).await;
    assert_eq!(view["sale"]["phase"], "prequeue", "{view}");
    assert_eq!((view["state"].clone(), view["max_active"].clone()), (json!("paused"), json!(5)), "the event's");
    assert!(view["sale"]["starts_in"].as_u64().unwrap() <= 9);
    assert!(view["sale"]["draw"].is_null() && view["events"][0]["draw"].is_null(), "no seed before the start");
    assert_eq!(view["events"][1]["name"], "Secret", "the operator sees every event");
    let (_, _, body) = get(admin.running.addr, "/_vestibule/events?room=checkout", &[]).await;
    let published: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = published["events"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(names, ["Drop"], "visitors see an event from its pre-queue on: {published}");

    // The feed counts down, then gives the place the draw gave.
    let mut feed = visitors[0].feed().await;
    let countdown = feed_until(&mut feed, "prequeue").await;
    assert!(countdown["starts_in"].as_u64().unwrap() <= 9, "{countdown}");
    let placed = loop {
        let message = common::visitor::next_message(&mut feed).await;
        if message["type"] != "prequeue" {
            break message;
        }
    };
    // Its place (1 to 3), or its turn already: a moment after the start, at 10 a second.
    let placed_or_in = placed["type"] == "admitted" || (1..=3).contains(&placed["position"].as_u64().unwrap_or(0));
    assert!(placed_or_in, "{placed}");

    let view = view_until(admin.addr(), "the draw", |view| !view["sale"]["draw"].is_null()).await;
    assert_eq!(view["sale"]["phase"], "started");
    assert_eq!(view["sale"]["draw"]["prequeued"], 3);
    let (_, _, body) = get(admin.running.addr, "/_vestibule/events?room=checkout", &[]).await;
    let published: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(published["events"][0]["draw"]["seed"], view["sale"]["draw"]["seed"]);
    assert_eq!(published["events"][0]["name"], "Drop");
}

/// A page in a browser that rebinds its own name to the admin address sends its own name as
/// `Host`: only IP literals, `localhost` and `admin.hosts` are answered, probes included.
#[tokio::test]
async fn the_admin_listener_answers_only_its_own_host_names() {
    let (upstream, _) = start_upstream().await;
    let dir = TempDir::new("admin-hosts");
    let key = dir.path().join("signing.pem");
    std::fs::write(&key, generate_key(KeyKind::Eddsa)).unwrap();
    let rooms = format!("{ROOM}admit_per_minute = 60\nmax_active = 5\n");
    let text =
        config_file_text(upstream, &key, &rooms).replace("[upstream]", "hosts = [\"Admin.Internal\"]\n[upstream]");
    let running = server::start(&Config::parse(&text, "proxy.toml", dir.path()).unwrap()).await.unwrap();
    let admin = running.admin.unwrap();
    let get = |host: &'static str, path: &'static str| async move {
        let request = Request::get(path).header("host", host).body(Full::new(Bytes::new())).unwrap();
        send(admin, request).await
    };
    for host in ["127.0.0.1", "127.0.0.1:9090", "[::1]:9090", "localhost", "admin.internal:9090", "ADMIN.internal"] {
        assert_eq!(get(host, "/healthz").await.0, StatusCode::OK, "{host}");
    }
    for host in ["evil.example", "evil.example:9090", "localhost.evil.example", "127.0.0.1.nip.io"] {
        for path in ["/healthz", "/metrics", "/rooms"] {
            let (status, _, body) = get(host, path).await;
            assert_eq!(status, StatusCode::MISDIRECTED_REQUEST, "{host}{path}: {body}");
            assert!(!body.contains("vestibule_"), "no metric is shown to {host}");
        }
    }
    // Two Host fields, or an absolute-form target naming another host: refused too.
    for request in [
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        "GET http://evil.example/metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    ] {
        let (status, text) = raw(admin, request.as_bytes()).await;
        assert!(status == 421 || status == 400, "{request:?}: {text}");
        assert!(!text.contains("vestibule_"), "{text}");
    }
}

/// The admin listener's places: one slow scraper (many connections from one address, none
/// read) cannot take the probes' places; a probe from another address is answered at once.
#[tokio::test]
async fn probes_answer_while_one_address_holds_admin_connections() {
    use tokio::io::AsyncWriteExt;
    let (upstream, _) = start_upstream().await;
    let gate = start_admin(upstream, &format!("{ROOM}admit_per_minute = 60\nmax_active = 5\n")).await;
    let admin = gate.addr();
    // 64 connections (the listener's whole cap) from 127.0.0.1, each asking for /metrics
    // again and again without reading a byte.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..64 {
        let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
        let pipelined = "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(64);
        if stream.write_all(pipelined.as_bytes()).await.is_err() {
            refused += 1;
        }
        held.push(stream);
    }
    // A probe from another loopback address is answered within 2 s.
    let probe = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let (status, text) = tokio::time::timeout(Duration::from_secs(2), raw_from("127.0.0.7", admin, probe))
        .await
        .expect("the probe was answered within 2 s");
    assert_eq!(status, 200, "{text}");
    let scrape = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let (_, metrics) = raw_from("127.0.0.7", admin, scrape).await;
    assert!(
        metrics.contains("vestibule_connection_limits_total{listener=\"admin\",reason=\"per_address\"}"),
        "connections over the per-address cap are counted ({refused} writes failed)"
    );
    drop(held);
}

/// A reload applies a new admin token at once (a leaked one is replaced without a restart),
/// and names every setting it cannot apply.
#[tokio::test]
async fn a_reload_replaces_the_admin_token_and_names_what_needs_a_restart() {
    let (upstream, _) = start_upstream().await;
    let rooms = format!("{ROOM}admit_per_minute = 60\nmax_active = 5\n");
    let gate = start_admin(upstream, &rooms).await;
    let admin = gate.addr();
    let text = gate
        .text(&rooms)
        .replace(TOKEN, "a-new-admin-token-4567")
        .replace("shutdown_grace", "trusted_proxies = [\"10.1.0.0/16\"]\nsend_timeout = \"5s\"\nshutdown_grace");
    std::fs::write(&gate.config, text).unwrap();
    let (status, reloaded) = authorized(admin, "POST", "/reload", "").await;
    assert_eq!(status, StatusCode::OK, "{reloaded}");
    assert_eq!(reloaded["restart_needed"], json!(["server.trusted_proxies", "server.send_timeout"]));
    assert_eq!(authorized(admin, "GET", "/rooms", "").await.0, StatusCode::UNAUTHORIZED, "the old token is gone");
    assert_eq!(call(admin, "GET", "/rooms", Some("a-new-admin-token-4567"), "").await.0, StatusCode::OK);
}

/// A reload's answer is what is in force: a change that waits for a restart is named at every
/// reload until the file is put back, and keys are reported loaded only when they changed.
#[tokio::test]
async fn a_reload_answers_with_what_is_in_force() {
    let (upstream, _) = start_upstream().await;
    let rooms = format!("{ROOM}admit_per_minute = 60\nmax_active = 5\n");
    let gate = start_admin(upstream, &rooms).await;
    let admin = gate.addr();
    let reload = || async {
        let (status, reloaded) = authorized(admin, "POST", "/reload", "").await;
        assert_eq!(status, StatusCode::OK, "{reloaded}");
        reloaded
    };
    let same = reload().await;
    assert_eq!((&same["restart_needed"], &same["keys"]), (&json!([]), &json!(false)), "{same}");

    let moved = gate
        .text(&rooms)
        .replace("listen = \"127.0.0.1:0\"\nshutdown_grace", "listen = \"127.0.0.1:1\"\nshutdown_grace");
    std::fs::write(&gate.config, &moved).unwrap();
    for _ in 0..2 {
        let reloaded = reload().await;
        assert_eq!(reloaded["restart_needed"], json!(["server.listen"]), "said again while it waits: {reloaded}");
    }
    std::fs::write(&gate.config, gate.text(&rooms)).unwrap();
    assert_eq!(reload().await["restart_needed"], json!([]), "the file is back to what runs");

    // A new key in the same file: loaded, and said so.
    std::fs::write(gate.dir.path().join("signing.pem"), generate_key(KeyKind::Eddsa)).unwrap();
    assert_eq!(reload().await["keys"], json!(true));
    assert_eq!(reload().await["keys"], json!(false));
}
