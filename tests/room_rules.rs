//! A room's rules for who passes and what the waiting answer says: `[rooms.bypass]` (client
//! addresses, a secret header) lets monitors and staff through without a token, a ticket or a
//! place in the line, on the fast lane and on hyper's path alike; `queued_status` sets the
//! waiting page's status; `max_waiting` turns newcomers away from a full line.

mod common;

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const SECRET: &str = "monitor-secret-0123456789";

/// Send `request` from `source` (a loopback address) over a fresh connection.
async fn send_from(source: &str, gate: SocketAddr, request: Request<Full<Bytes>>) -> (StatusCode, http::HeaderMap) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0)).unwrap();
    let stream = socket.connect(gate).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let response = tokio::time::timeout(DEADLINE, sender.send_request(request)).await.unwrap().unwrap();
    let (parts, body) = response.into_parts();
    body.collect().await.unwrap();
    (parts.status, parts.headers)
}

fn request(method: &str, secret: Option<&str>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri("/checkout/pay")
        .header("host", "shop.test")
        .header("accept", "application/json");
    if let Some(secret) = secret {
        builder = builder.header("vestibule-bypass", secret);
    }
    let body = if method == "POST" { Bytes::from_static(b"order=1") } else { Bytes::new() };
    builder.body(Full::new(body)).unwrap()
}

/// The room's `vestibule_requests_total` for `outcome`.
fn requests(gate: &Harness, outcome: &str) -> u64 {
    let wanted = format!("vestibule_requests_total{{room=\"checkout\",outcome=\"{outcome}\"}} ");
    let text = gate.running.gate().metrics().encode();
    text.lines().find_map(|line| line.strip_prefix(&wanted)).map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test]
async fn listed_addresses_and_the_secret_pass_a_paused_room_without_a_place() {
    let (upstream_addr, upstream) = start_upstream().await;
    let room = format!(
        "admit_per_minute = 60\nmax_active = 1\nstate = \"paused\"\n[rooms.bypass]\naddresses = [\"127.0.0.2\"]\nsecret = \"{SECRET}\"\n"
    );
    let gate = start_room(upstream_addr, &room).await;
    // Nobody else passes: the room is paused.
    for (source, secret) in
        [("127.0.0.1", None), ("127.0.0.1", Some("monitor-secret-wrong-guess")), ("127.0.0.3", None)]
    {
        let (status, headers) = send_from(source, gate.addr, request("GET", secret)).await;
        assert!(is_gate_wait(status), "{source} {secret:?}: {status}");
        assert!(headers.contains_key("set-cookie"), "a waiter gets a ticket");
    }
    assert!(upstream.requests().is_empty());
    // The secret or a listed address, on the fast lane (GET) and on hyper's path (POST).
    for (source, secret) in [("127.0.0.1", Some(SECRET)), ("127.0.0.2", None)] {
        for method in ["GET", "POST"] {
            let (status, headers) = send_from(source, gate.addr, request(method, secret)).await;
            assert_eq!(status, StatusCode::OK, "{source} {method}");
            assert!(!headers.contains_key("set-cookie"), "no ticket, no token: nothing counts against the room");
            let seen = upstream.last();
            assert!(seen.headers.get("vestibule-bypass").is_none(), "the secret never reaches the upstream");
            assert!(seen.headers.get("vestibule-visitor").is_none(), "not an admitted visitor");
        }
    }
    assert_eq!(upstream.requests().len(), 4);
    assert_eq!(requests(&gate, "bypassed"), 4);
    assert_eq!(requests(&gate, "admitted"), 0);
    let vestibule_gate = gate.running.gate();
    let room = &vestibule_gate.rooms()[0];
    let stats = vestibule_gate.store().stats(&room.id, &room.limits(), vestibule_gate.clock().now_ms()).await.unwrap();
    assert_eq!(stats.last_ticket, 3, "only the three who waited took tickets");
}

#[tokio::test]
async fn queued_status_sets_the_waiting_pages_status_and_api_clients_keep_503() {
    let (upstream_addr, _upstream) = start_upstream().await;
    for (queued, retry_after) in [(202, false), (429, true), (503, true)] {
        let room = format!("admit_per_minute = 60\nmax_active = 1\nstate = \"paused\"\nqueued_status = {queued}\n");
        let gate = start_room(upstream_addr, &room).await;
        let page = Request::get("/checkout").header("host", "shop.test").header("accept", "text/html");
        let (status, headers, body) = send(gate.addr, page.body(Full::new(Bytes::new())).unwrap()).await;
        assert_eq!(status.as_u16(), queued);
        assert!(body.contains("<html"), "the waiting page");
        assert_eq!(headers.contains_key("retry-after"), retry_after, "{queued}");
        let (status, _, _) = get(gate.addr, "/checkout", &[]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "API clients tell waiting by 503");
    }
}

#[tokio::test]
async fn a_full_line_turns_newcomers_away_without_a_ticket_and_keeps_every_place() {
    let (upstream_addr, upstream) = start_upstream().await;
    let room = "admit_per_minute = 60\nmax_active = 1\nstate = \"paused\"\nmax_waiting = 2\n";
    let gate = start_room(upstream_addr, room).await;
    let mut tickets = Vec::new();
    for _ in 0..2 {
        let (status, headers, body) = get(gate.addr, "/checkout", &[]).await;
        assert!(is_gate_wait(status) && body.contains(r#""status":"paused""#), "{status} {body}");
        let cookie = headers.get("set-cookie").expect("a ticket").to_str().unwrap();
        tickets.push(cookie.split(';').next().unwrap().to_owned());
    }
    // The third is turned away: 503, Retry-After, the status `full`, and no ticket.
    let (status, headers, body) = get(gate.addr, "/checkout", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains(r#""status":"full""#), "{body}");
    assert!(headers.contains_key("retry-after"));
    assert!(!headers.contains_key("set-cookie"), "no ticket for a full line");
    // A browser gets the page that says so, and tries again by itself.
    let page = Request::get("/checkout").header("host", "shop.test").header("accept", "text/html");
    let (status, headers, body) = send(gate.addr, page.body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    assert!(body.contains("<title>The line is full</title>") && body.contains("location.reload"), "{body}");
    assert!(!body.contains(r#"id="position""#), "no place is shown");
    // Those in line keep their places, in order.
    for (place, ticket) in tickets.iter().enumerate() {
        let (status, _, body) = get(gate.addr, "/checkout", &[("cookie", ticket)]).await;
        assert!(is_gate_wait(status), "{status}");
        assert!(body.contains(&format!(r#""position":{}"#, place + 1)), "{body}");
    }
    assert_eq!(requests(&gate, "full"), 2);
    assert!(upstream.requests().is_empty());
}

#[test]
fn bad_rules_are_refused_with_the_key_that_is_wrong() {
    let config = |room: &str| {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://127.0.0.1:9\"\n[tokens]\nsigning_key = \"k.pem\"\n\
             [[rooms]]\nid = \"checkout\"\npaths = [\"/checkout\"]\nadmit_per_minute = 60\nmax_active = 1\n{room}"
        );
        vestibule::config::Config::parse(&text, "proxy.toml", std::path::Path::new("/nonexistent"))
    };
    // A secret from the environment is read by the commands that serve, and named there.
    let mut from_env = config("[rooms.bypass]\nsecret_env = \"VESTIBULE_TEST_UNSET_SECRET\"\n").unwrap();
    let error = from_env.resolve_secrets().unwrap_err().to_string();
    assert!(error.contains("rooms[0].bypass.secret_env: environment variable VESTIBULE_TEST_UNSET_SECRET"), "{error}");
    let config = |room: &str| config(room).unwrap_err().to_string();
    for (room, key) in [
        ("queued_status = 302\n", "rooms[0].queued_status"),
        ("max_waiting = 0\n", "rooms[0]"),
        ("[rooms.bypass]\nsecret = \"short\"\n", "rooms[0].bypass.secret"),
        ("[rooms.bypass]\n", "rooms[0].bypass"),
        ("[rooms.bypass]\naddresses = [\"not-an-address\"]\n", "rooms[0]"),
    ] {
        let error = config(room);
        assert!(error.contains(key), "{room:?}: {error}");
        assert!(!error.contains("short\""), "the secret is not repeated: {error}");
    }
}

/// A reload that changes only the bypass secret puts the new one in force (a secret is kept
/// out of logs and debug output, so a change is seen by comparing the settings themselves).
#[tokio::test]
async fn a_reload_puts_a_new_bypass_secret_in_force() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let room = |secret: &str| {
        format!("admit_per_minute = 60\nmax_active = 1\nstate = \"paused\"\n[rooms.bypass]\nsecret = \"{secret}\"\n")
    };
    let gate = start_room(upstream_addr, &room(SECRET)).await;
    let (status, _) = send_from("127.0.0.1", gate.addr, request("GET", Some(SECRET))).await;
    assert_eq!(status, StatusCode::OK);

    let rotated = "monitor-secret-rotated-9876";
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n[upstream]\nurl = \"http://{upstream_addr}\"\n\
         [tokens]\nsigning_key = {:?}\n[[rooms]]\nid = \"checkout\"\npaths = [\"/checkout\"]\n{}",
        gate.key_path,
        room(rotated)
    );
    let config = vestibule::config::Config::parse(&text, "test.toml", gate.dir.path()).unwrap();
    let reloaded = gate.running.gate().reload(config).unwrap();
    assert_eq!(reloaded.changed, ["checkout"], "{reloaded:?}");
    let (status, _) = send_from("127.0.0.1", gate.addr, request("GET", Some(rotated))).await;
    assert_eq!(status, StatusCode::OK, "the new secret passes");
    let (status, _) = send_from("127.0.0.1", gate.addr, request("GET", Some(SECRET))).await;
    assert!(is_gate_wait(status), "the old one does not: {status}");
}
