//! A live change at one instance, heard by every waiting socket at another: the time from an
//! operator's `PATCH` at instance A to the last of N waiting sockets at instance B receiving
//! the new message, over several rounds.
//!
//!   cargo bench --bench live_change              # 2 000 waiting sockets, 20 rounds
//!   cargo bench --bench live_change -- 10000 50  # sockets, rounds
//!
//! Starts a `redis-server` of its own (on a free loopback port, nothing saved) and two release
//! `vestibule` instances on it with an admin listener each, joins N visitors at B (one room
//! whose only place is taken, so that all wait), opens their feeds, then changes the room's
//! message at A once per round.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use support::{call, connect, start_instance_with, start_redis, start_shop};

const TOKEN: &str = "bench-admin-token-000";

#[tokio::main]
async fn main() {
    let mut numbers = std::env::args().skip(1).filter_map(|a| a.parse::<usize>().ok());
    let sockets = numbers.next().unwrap_or(2_000);
    let rounds = numbers.next().unwrap_or(20);
    let dir = std::env::temp_dir().join(format!("vestibule-live-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (redis, port) = start_redis(&dir);
    let (_shop, shop) = start_shop();
    let room = "admit_per_minute = 1\nmax_active = 1\nabandon_seconds = 3600";
    let tables = |admin_port: u16| {
        format!(
            "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{port}/\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{TOKEN}\""
        )
    };
    let (_a, a_addr, a_admin) = start_instance_with(&dir, shop, room, &tables(0));
    let (_b, b_addr, _) = start_instance_with(&dir, shop, room, &tables(0));
    let a_admin = a_admin.expect("instance A has an admin listener");

    // The only place goes to a visitor at A; everyone at B waits.
    call(&mut connect(a_addr).await, "GET", "/checkout", "").await;
    let mut sender = connect(b_addr).await;
    let mut tickets = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let cookies = call(&mut sender, "GET", "/checkout", "").await;
        tickets.push(cookies.into_iter().find(|c| c.starts_with("vestibule-ticket-")).expect("a ticket"));
    }

    // Each socket notes when it hears each round's message.
    let arrivals: Arc<Mutex<Vec<Vec<Instant>>>> = Arc::new(Mutex::new(vec![Vec::new(); rounds]));
    let heard = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(sockets);
    for ticket in tickets {
        let (arrivals, heard, opened) = (arrivals.clone(), heard.clone(), opened.clone());
        let mut request = format!("ws://{b_addr}/_vestibule/ws?room=checkout").into_client_request().unwrap();
        request.headers_mut().insert("cookie", ticket.parse().unwrap());
        let stream = TcpStream::connect(b_addr).await.expect("connect (raise ulimit -n for more sockets)");
        let (mut socket, _) = tokio_tungstenite::client_async(request, stream).await.expect("a feed socket");
        tasks.push(tokio::spawn(async move {
            let mut first = true;
            while let Some(Ok(message)) = socket.next().await {
                let Message::Text(text) = message else { continue };
                if first {
                    first = false;
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                let round = value["message"].as_str().and_then(|m| m.strip_prefix("round ")?.parse::<usize>().ok());
                if let (Some("message"), Some(round)) = (value["type"].as_str(), round) {
                    arrivals.lock().unwrap()[round].push(Instant::now());
                    heard.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let opening = Instant::now();
    while opened.load(Ordering::Relaxed) < sockets {
        assert!(opening.elapsed() < Duration::from_secs(120), "not every socket opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut lasts = Vec::with_capacity(rounds);
    let mut answers = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let sent = Instant::now();
        let body = format!(r#"{{"message":"round {round}"}}"#);
        patch(a_admin, &body).await;
        answers.push(sent.elapsed());
        let expected = sockets * (round + 1);
        while heard.load(Ordering::Relaxed) < expected {
            assert!(sent.elapsed() < Duration::from_secs(30), "round {round}: not every socket heard");
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let last = *arrivals.lock().unwrap()[round].iter().max().unwrap();
        lasts.push(last.duration_since(sent));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lasts.sort();
    answers.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let at = |v: &[Duration], q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!("waiting sockets at instance B: {sockets}; rounds: {rounds}");
    println!(
        "PATCH at instance A to the last socket at B hearing the message: median {:.1} ms, p90 {:.1} ms, max {:.1} ms (min {:.1} ms)",
        ms(at(&lasts, 0.5)),
        ms(at(&lasts, 0.9)),
        ms(*lasts.last().unwrap()),
        ms(lasts[0])
    );
    println!(
        "PATCH answered at A (stored in Redis, announced): median {:.1} ms, max {:.1} ms",
        ms(at(&answers, 0.5)),
        ms(*answers.last().unwrap())
    );
    for task in tasks {
        task.abort();
    }
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn patch(admin: std::net::SocketAddr, body: &str) {
    let stream = TcpStream::connect(admin).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let request = Request::patch("/rooms/checkout")
        .header("host", "admin.bench")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert!(response.status().is_success(), "PATCH answered {}", response.status());
    response.into_body().collect().await.unwrap();
}
