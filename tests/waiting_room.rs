//! The line end to end over real HTTP and websocket clients: idle admission, the waiting page,
//! status, positions, the feed, leaving, session ends, single-use tickets and room states.

mod common;

use common::visitor::{next_message, Visitor};
use common::*;
use http::StatusCode;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use vestibule::config::RoomState;

const BUSY_ROOM: &str = "admit_per_minute = 60\nmax_active = 1\n";

#[tokio::test]
async fn an_idle_room_admits_at_once_with_a_token_cookie() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, "admit_per_minute = 600\nmax_active = 5\n").await;
    let mut visitor = Visitor::new(gate.addr);
    let (status, headers, body) = visitor.open("/checkout").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "upstream saw /checkout"));
    let cookie = headers.get("set-cookie").unwrap().to_str().unwrap();
    assert!(cookie.starts_with("vestibule-token-checkout="), "{cookie}");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"), "{cookie}");
    let first = upstream.last().headers["vestibule-visitor"].clone();
    // The token cookie lets the next request through without the line.
    let (status, _, _) = visitor.open("/checkout/pay").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(upstream.last().headers["vestibule-visitor"], first);
    assert_eq!(visitor.status().await["status"], "admitted");
}

#[tokio::test]
async fn a_busy_room_shows_the_page_and_keeps_join_order() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, BUSY_ROOM).await;
    let mut first = Visitor::new(gate.addr);
    assert_eq!(first.open("/checkout").await.0, StatusCode::OK);

    let mut waiting = Vec::new();
    for _ in 0..3 {
        let mut visitor = Visitor::new(gate.addr);
        let (status, headers, page) = visitor.open("/checkout").await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
        assert!(page.contains("You are in line") && page.contains(r#"id="position""#), "{page}");
        assert!(visitor.jar.contains_key("vestibule-ticket-checkout"));
        waiting.push(visitor);
    }
    assert_eq!(upstream.requests().len(), 1, "only the first visitor reached the upstream");

    // Positions follow join order once the room's snapshot has caught up.
    wait_for("the first admission in the snapshot", || gate.running.gate().rooms()[0].snapshot().cursor == 1).await;
    for (i, visitor) in waiting.iter_mut().enumerate() {
        let status = visitor.status().await;
        assert_eq!(status["status"], "waiting");
        assert_eq!(status["position"], i as u64 + 1, "{status}");
    }
    // An API client gets 503, Retry-After and the same status as JSON.
    let (status, headers, body) = waiting[2].request("GET", "/checkout", "application/json").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "20");
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((json["status"].as_str(), json["position"].as_u64()), (Some("waiting"), Some(3)));
}

#[tokio::test]
async fn the_feed_pushes_the_position_then_admission_and_the_turn_is_redeemed_once() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, BUSY_ROOM).await;
    let mut first = Visitor::new(gate.addr);
    first.open("/checkout").await;
    let mut second = Visitor::new(gate.addr);
    second.open("/checkout").await;
    wait_for("the snapshot", || gate.running.gate().rooms()[0].snapshot().cursor == 1).await;

    let mut feed = second.feed().await;
    let message = next_message(&mut feed).await;
    assert_eq!((message["type"].as_str(), message["position"].as_u64()), (Some("position"), Some(1)), "{message}");

    // The first visitor leaves: their slot frees and their token stops passing.
    let stale_token = first.jar["vestibule-token-checkout"].clone();
    first.leave().await;
    assert_eq!(next_message(&mut feed).await["type"], "admitted");

    let copied_ticket = second.jar["vestibule-ticket-checkout"].clone();
    let (status, _, body) = second.open("/checkout").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "upstream saw /checkout"));
    assert!(second.jar.contains_key("vestibule-token-checkout"));
    assert!(!second.jar.contains_key("vestibule-ticket-checkout"), "the ticket is spent");

    // A copy of the spent ticket admits nobody else: while the session is not yet known to
    // be in use it is asked to wait a moment; then it joins at the back and is told why.
    let seen = upstream.requests().len();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut copier = Visitor::new(gate.addr);
        copier.jar.insert("vestibule-ticket-checkout".into(), copied_ticket.clone());
        let (status, headers, page) = copier.open("/checkout").await;
        assert_eq!(upstream.requests().len(), seen, "a copy never reaches the upstream");
        if page.contains("already used") {
            break;
        }
        assert_eq!((status, headers["retry-after"].to_str().unwrap()), (StatusCode::OK, "1"), "to wait: {page}");
        assert!(tokio::time::Instant::now() < deadline, "the copy was never told the ticket is spent");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The ended session's token is refused.
    let mut stale = Visitor::new(gate.addr);
    stale.jar.insert("vestibule-token-checkout".into(), stale_token);
    let (status, _, _) = stale.request("GET", "/checkout", "application/json").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.requests().len(), seen, "neither reached the upstream");
}

#[tokio::test]
async fn a_tampered_ticket_counts_as_none() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, BUSY_ROOM).await;
    Visitor::new(gate.addr).open("/checkout").await;
    let mut visitor = Visitor::new(gate.addr);
    visitor.open("/checkout").await;
    let ticket = visitor.jar["vestibule-ticket-checkout"].clone();
    let mut parts: Vec<String> = ticket.split('.').map(str::to_owned).collect();
    parts[2] = parts[2].chars().rev().collect();
    visitor.jar.insert("vestibule-ticket-checkout".into(), parts.join("."));
    let (status, _, page) = visitor.open("/checkout").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("You are in line"));
    assert_ne!(visitor.jar["vestibule-ticket-checkout"], parts.join("."), "a fresh ticket replaces the forged one");
    assert_eq!(upstream.requests().len(), 1);
}

#[tokio::test]
async fn the_upstream_ending_the_session_frees_the_slot_and_revokes_the_token() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, BUSY_ROOM).await;
    let mut buyer = Visitor::new(gate.addr);
    buyer.open("/checkout").await;
    let token = buyer.jar["vestibule-token-checkout"].clone();
    let mut next = Visitor::new(gate.addr);
    next.open("/checkout").await;

    let (status, headers, body) = buyer.request("POST", "/checkout/order", "text/html").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "order placed"));
    assert!(!headers.contains_key("vestibule-session"), "the header is for the gate only");
    assert!(!buyer.jar.contains_key("vestibule-token-checkout"), "the token cookie is cleared");

    next.wait_for_status("admitted").await;
    let (status, _, _) = next.open("/checkout").await;
    assert_eq!(status, StatusCode::OK);

    let mut replay = Visitor::new(gate.addr);
    replay.jar.insert("vestibule-token-checkout".into(), token);
    let before = upstream.requests().len();
    let (status, _, _) = replay.request("GET", "/checkout", "application/json").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "an ended session's token stops at once");
    assert_eq!(upstream.requests().len(), before);
}

#[tokio::test]
async fn room_states_pause_close_and_switch_off_the_gate() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, "admit_per_minute = 600\nmax_active = 5\n").await;
    let room = gate.running.gate().rooms()[0].clone();

    room.set_control(RoomState::Paused, Some("Back in five minutes".into()));
    let mut waiter = Visitor::new(gate.addr);
    let (status, _, page) = waiter.open("/checkout").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("The line is paused") && page.contains("Back in five minutes"), "{page}");
    let status = waiter.status().await;
    assert_eq!((status["status"].as_str(), status["position"].as_u64()), (Some("paused"), Some(1)), "{status}");
    let mut feed = waiter.feed().await;
    assert_eq!(next_message(&mut feed).await["type"], "paused");
    assert!(upstream.requests().is_empty(), "paused: nobody is admitted, even with room to spare");

    room.set_control(RoomState::Closed, Some("Sold out".into()));
    let message = next_message(&mut feed).await;
    assert_eq!((message["type"].as_str(), message["message"].as_str()), (Some("closed"), Some("Sold out")));
    let mut late = Visitor::new(gate.addr);
    let (status, _, page) = late.open("/checkout").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(page.contains("This sale is closed") && page.contains("Sold out"));
    assert_eq!(late.status().await["status"], "closed");

    room.set_control(RoomState::Open, None);
    // Reopened: the waiter sees their place again, then their turn comes.
    loop {
        let message = next_message(&mut feed).await;
        match message["type"].as_str() {
            Some("admitted") => break,
            Some("position") => assert_eq!(message["position"], 1),
            _ => panic!("unexpected {message}"),
        }
    }

    room.set_control(RoomState::Passthrough, None);
    let (status, headers, _) = Visitor::new(gate.addr).open("/checkout").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!headers.contains_key("set-cookie"), "passthrough: no token, no ticket");
}

#[tokio::test]
async fn reserved_endpoints_refuse_what_they_do_not_take() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, BUSY_ROOM).await;
    let mut visitor = Visitor::new(gate.addr);
    for (method, path, expected) in [
        ("GET", "/_vestibule/status", StatusCode::BAD_REQUEST),
        ("GET", "/_vestibule/status?room=nope", StatusCode::NOT_FOUND),
        ("GET", "/_vestibule/leave?room=checkout", StatusCode::METHOD_NOT_ALLOWED),
        ("GET", "/_vestibule/ws?room=checkout", StatusCode::BAD_REQUEST),
        ("GET", "/_vestibule/elsewhere", StatusCode::NOT_FOUND),
    ] {
        let (status, _, body) = visitor.request(method, path, "application/json").await;
        assert_eq!(status, expected, "{method} {path}: {body}");
    }
    assert_eq!(visitor.status().await["status"], "none");
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn a_visitor_admitted_while_the_upstream_fails_keeps_their_token() {
    let dead = dead_address().await;
    let gate = start_room(dead, "admit_per_minute = 600\nmax_active = 1\n").await;
    let mut visitor = Visitor::new(gate.addr);
    let (status, _, _) = visitor.open("/checkout").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(visitor.jar.contains_key("vestibule-token-checkout"), "the admission survives the upstream's failure");
    assert_eq!(visitor.status().await["status"], "admitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_holds_under_a_random_crowd_of_joins_leaves_and_orders() {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;

    let (upstream_addr, _upstream) = start_upstream().await;
    let max_active = 3;
    let gate =
        start_room(upstream_addr, "admit_per_minute = 6000\nmax_active = 3\nsession_seconds = 2\ngrant_seconds = 1\n")
            .await;
    let store = gate.running.gate().store().clone();
    let room = gate.running.gate().rooms()[0].clone();

    // A monitor samples the line while the crowd runs.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU32::new(0));
    let monitor = {
        let (done, peak, store, room) = (done.clone(), peak.clone(), store.clone(), room.clone());
        tokio::spawn(async move {
            let clock = vestibule::clock::Clock::new();
            while !done.load(Ordering::Relaxed) {
                let stats = store.stats(&room.id, &room.limits(), clock.now_ms()).await.unwrap();
                let used = stats.active + stats.outstanding;
                peak.fetch_max(used, Ordering::Relaxed);
                assert!(used <= max_active, "capacity exceeded: {stats:?}");
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
    };

    let admitted = Arc::new(AtomicU32::new(0));
    let mut crowd = Vec::new();
    for seed in 0..30u64 {
        let admitted = admitted.clone();
        let addr = gate.addr;
        crowd.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut visitor = Visitor::new(addr);
            for _ in 0..25 {
                match rng.random_range(0..10) {
                    0..=5 => {
                        let (status, _, body) = visitor.request("GET", "/checkout", "application/json").await;
                        if status == StatusCode::OK && body == "upstream saw /checkout" {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    6 => visitor.leave().await,
                    7 => {
                        visitor.request("POST", "/checkout/order", "application/json").await;
                    }
                    8 => visitor = Visitor::new(addr), // a new visitor; the old one walks away
                    _ => {
                        visitor.status().await;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(rng.random_range(0..20))).await;
            }
        }));
    }
    for visitor in crowd {
        visitor.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    monitor.await.unwrap();
    // More admissions than places: sessions ended and their places were reused.
    assert!(admitted.load(Ordering::Relaxed) > max_active, "the crowd got through: {admitted:?}");
    assert_eq!(peak.load(Ordering::Relaxed), max_active, "the room was full at times");
}

#[tokio::test]
async fn feed_sockets_are_capped_per_client_address() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let dir = TempDir::new("feed-cap");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa)).unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_feed_sockets_per_address = 2\n[upstream]\nurl = \"http://{upstream_addr}\"\n\
         [tokens]\nsigning_key = {key:?}\n[[rooms]]\nid = \"checkout\"\npaths = [\"/checkout\"]\n{BUSY_ROOM}"
    );
    let config = vestibule::config::Config::parse(&text, "test.toml", dir.path()).unwrap();
    let running = vestibule::server::start(&config).await.unwrap();
    let visitor = Visitor::new(running.addr);
    let _one = visitor.feed().await;
    let _two = visitor.feed().await;
    let mut request = format!("ws://{}/_vestibule/ws?room=checkout", running.addr).into_client_request().unwrap();
    request.headers_mut().insert("cookie", "x=y".parse().unwrap());
    let stream = tokio::net::TcpStream::connect(running.addr).await.unwrap();
    let refused = tokio_tungstenite::client_async(request, stream).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE)
        }
        other => panic!("a third socket from one address must be refused, got {:?}", other.map(|(_, r)| r.status())),
    }
    assert_eq!(running.gate().open_feeds(), 2);
}

#[tokio::test]
async fn the_feed_passes_on_a_new_room_message() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, BUSY_ROOM).await;
    Visitor::new(gate.addr).open("/checkout").await;
    let mut waiter = Visitor::new(gate.addr);
    waiter.open("/checkout").await;
    let mut feed = waiter.feed().await;
    assert_eq!(next_message(&mut feed).await["type"], "position");
    gate.running.gate().rooms()[0].set_control(RoomState::Open, Some("Almost there".into()));
    let message = next_message(&mut feed).await;
    assert_eq!((message["type"].as_str(), message["message"].as_str()), (Some("message"), Some("Almost there")));
}

#[tokio::test]
async fn an_active_visitors_token_is_renewed_before_it_runs_out() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, "admit_per_minute = 600\nmax_active = 5\nsession_seconds = 4\n").await;
    let mut visitor = Visitor::new(gate.addr);
    visitor.open("/checkout").await;
    let first = visitor.jar["vestibule-token-checkout"].clone();
    // Early in the session: no renewal.
    let (_, headers, _) = visitor.open("/checkout").await;
    assert!(!headers.contains_key("set-cookie"));
    // Past half of the session (token lifetimes count whole seconds): a fresh token comes
    // with the next response, and it passes.
    tokio::time::sleep(std::time::Duration::from_millis(3_100)).await;
    let (status, headers, _) = visitor.open("/checkout").await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.contains_key("set-cookie"), "the token is renewed");
    let renewed = visitor.jar["vestibule-token-checkout"].clone();
    assert_ne!(renewed, first);
    let claims = |token: &str| -> Value {
        use base64::Engine;
        let payload = token.split('.').nth(1).unwrap();
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
    };
    assert!(claims(&renewed)["exp"].as_u64() > claims(&first)["exp"].as_u64());
    assert_eq!(claims(&renewed)["tkt"], claims(&first)["tkt"], "the same session, extended");
    let (status, _, _) = visitor.open("/checkout").await;
    assert_eq!(status, StatusCode::OK);
}
