//! What operators are told, read from a running `vestibule` process: an outage of the store is
//! two lines of its log (its start and its end, with the room and the store's address), not a
//! line per request; a log that goes to a pipe or a file has no colour codes; the defaults
//! raise no warning on a machine whose open-file limit they are sized to.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::redis_server::RedisServer;
use common::*;
use http::StatusCode;

/// Start the binary with a text log on a pipe; its address and the log's lines.
fn spawn_text_logged(config: &std::path::Path) -> (Proxy, SocketAddr, Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vestibule"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the vestibule binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (sender, log) = std::sync::mpsc::channel();
    let addr = loop {
        let line = lines.next().expect("vestibule reports its address before exiting").unwrap();
        sender.send(line.clone()).unwrap();
        if line.contains(" listening ") {
            let addr = line.split("addr=").nth(1).expect("the address").split_whitespace().next().unwrap();
            break addr.parse().unwrap();
        }
    };
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|line| drop(sender.send(line))));
    (Proxy(child), addr, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_is_two_lines_per_room_naming_the_store_and_the_log_has_no_colour() {
    let mut redis = RedisServer::start();
    let (upstream, _) = start_upstream().await;
    let dir = TempDir::new("truthful-log");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa)).unwrap();
    let room = |id: &str| {
        format!(
            "[[rooms]]\nid = \"{id}\"\npaths = [\"/{id}\"]\nadmit_per_minute = 600\nmax_active = 1\n\
             joins_per_address_per_minute = 100000\n"
        )
    };
    // The defaults of [server] (no max_connections, no max_feed_sockets).
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n[upstream]\nurl = \"http://{upstream}\"\n\
         [store]\nkind = \"redis\"\nurl = \"{}\"\n[tokens]\nsigning_key = {key:?}\n{}{}",
        redis.url(),
        room("checkout"),
        room("tickets")
    );
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    let (_process, addr, log) = spawn_text_logged(&config);

    // Each room full, so that newcomers ask the store for a place.
    for id in ["checkout", "tickets"] {
        assert_eq!(get(addr, &format!("/{id}"), &[]).await.0, StatusCode::OK);
    }
    redis.kill();
    // Newcomers throughout the outage, each answered (503 with the room's page or JSON).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut held = 0;
    while held < 40 {
        assert!(tokio::time::Instant::now() < deadline, "newcomers were never held");
        for id in ["checkout", "tickets"] {
            if get(addr, &format!("/{id}"), &[]).await.0 == StatusCode::SERVICE_UNAVAILABLE {
                held += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.restart();
    let mut lines: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    let back = |lines: &[String]| lines.iter().filter(|line| line.contains("the store is back")).count();
    while back(&lines) < 2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line =
            log.recv_timeout(left).unwrap_or_else(|_| panic!("no end of the outage in the log:\n{}", lines.join("\n")));
        lines.push(line);
    }
    // A moment for any line that would follow.
    tokio::time::sleep(Duration::from_millis(500)).await;
    lines.extend(log.try_iter());
    let all = lines.join("\n");

    let store = format!("store=127.0.0.1:{}", redis.port);
    for id in ["checkout", "tickets"] {
        let room = format!("room={id}");
        let away: Vec<&String> =
            lines.iter().filter(|line| line.contains("the store is away") && line.contains(&room)).collect();
        assert_eq!(away.len(), 1, "one line when it goes, for {id}:\n{all}");
        assert!(away[0].contains(" WARN ") && away[0].contains(&store), "{}", away[0]);
        let back: Vec<&String> =
            lines.iter().filter(|line| line.contains("the store is back") && line.contains(&room)).collect();
        assert_eq!(back.len(), 1, "one line when it comes back, for {id}:\n{all}");
        assert!(back[0].contains(&store), "{}", back[0]);
    }
    let others = lines.iter().filter(|line| {
        line.contains(" WARN ")
            && !["the store is away", "announcements", "the line was lost by the store"]
                .iter()
                .any(|known| line.contains(known))
    });
    assert_eq!(others.count(), 0, "no line per request:\n{all}");
    assert!(!all.contains('\u{1b}'), "no colour codes in a log on a pipe:\n{all}");
    assert!(!all.contains("exceed the open-file limit"), "the defaults are sized to the limit:\n{all}");
}
