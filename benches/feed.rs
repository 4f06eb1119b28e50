//! Waiting sockets one instance holds, memory per waiting socket, and the delay from a cursor
//! move to the last socket's message.
//!
//!   cargo bench --bench feed               # 10 000 waiting visitors
//!   cargo bench --bench feed -- 18000      # up to what the file-descriptor limit allows
//!   WORKERS=2 cargo bench --bench feed -- 18000   # the instance with two workers
//!
//! Starts the real `vestibule` binary (release) with one room whose only slot is taken, joins
//! N visitors (each gets a ticket), opens N feed sockets, reads the instance's resident memory
//! before and after, then frees the slot and times how long the cursor move takes to reach
//! every socket. Loopback only.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use support::{call, connect, cpu_us, rss_kib, start_instance, start_shop};

/// One place, taken by the first visitor; everyone else waits.
const ROOM: &str = "admit_per_minute = 60000\nmax_active = 1\nabandon_seconds = 3600";

#[tokio::main]
async fn main() {
    let sockets: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10_000);
    let dir = std::env::temp_dir().join(format!("vestibule-feed-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (_shop, shop_addr) = start_shop();
    let (instance, addr) = start_instance(&dir, shop_addr, ROOM, "");
    let pid = instance.0.id();

    let mut sender = connect(addr).await;
    // The first visitor takes the only slot; everyone after waits.
    let holder = call(&mut sender, "GET", "/checkout", "").await.join("; ");
    let started = Instant::now();
    let mut tickets = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let cookies = call(&mut sender, "GET", "/checkout", "").await;
        tickets.push(cookies.into_iter().find(|c| c.starts_with("vestibule-ticket-")).expect("a ticket"));
    }
    let joins_per_second = sockets as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pid);

    let received = Arc::new(AtomicUsize::new(0));
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::with_capacity(sockets)));
    let opened = Arc::new(AtomicUsize::new(0));
    let opening = Instant::now();
    let mut tasks = Vec::with_capacity(sockets);
    for ticket in tickets {
        let (received, arrivals, opened) = (received.clone(), arrivals.clone(), opened.clone());
        let mut request = format!("ws://{addr}/_vestibule/ws?room=checkout").into_client_request().unwrap();
        request.headers_mut().insert("cookie", ticket.parse().unwrap());
        let stream = TcpStream::connect(addr).await.expect("connect (raise ulimit -n for more sockets)");
        let (mut socket, _) = tokio_tungstenite::client_async(request, stream).await.expect("a feed socket");
        tasks.push(tokio::spawn(async move {
            let mut messages = 0;
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Text(_) = message {
                    messages += 1;
                    if messages == 1 {
                        opened.fetch_add(1, Ordering::Relaxed);
                    } else if messages == 2 {
                        arrivals.lock().unwrap().push(Instant::now());
                        received.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            // Hold the socket until the bench ends.
            std::future::pending::<()>().await;
        }));
    }
    while opened.load(Ordering::Relaxed) < sockets {
        assert!(opening.elapsed() < Duration::from_secs(120), "sockets did not all get their first message");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_seconds = opening.elapsed().as_secs_f64();
    // Past the one-message-a-second limit of every socket, then measure memory.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_after = rss_kib(pid);

    // Free the slot: the next scheduler step grants the first waiter and moves the cursor.
    // A fresh connection: the gate closes keep-alive connections idle for 10 s.
    let mut sender = connect(addr).await;
    let cpu_before = cpu_us(pid);
    let moved = Instant::now();
    call(&mut sender, "POST", "/_vestibule/leave?room=checkout", &holder).await;
    while received.load(Ordering::Relaxed) < sockets {
        assert!(moved.elapsed() < Duration::from_secs(60), "not every socket heard of the move");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The instance's own work for the move, whatever the bench client (on the same cores)
    // took to read the messages.
    let fan_out_cpu = cpu_us(pid) - cpu_before;
    let arrivals = arrivals.lock().unwrap();
    let first = arrivals.iter().min().unwrap().duration_since(moved);
    let last = arrivals.iter().max().unwrap().duration_since(moved);

    println!("waiting sockets held by one instance: {sockets} (opened in {open_seconds:.1} s)");
    println!("joins (first visits that took a ticket), memory store: {joins_per_second:.0} per second");
    println!(
        "instance memory: {:.1} MiB before the sockets, {:.1} MiB with them: {:.1} KiB per waiting socket",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        (rss_after.saturating_sub(rss_before)) as f64 / sockets as f64
    );
    println!(
        "cursor move (slot freed) to messages: first socket {:.1} ms, last socket {:.1} ms (fan-out spread {:.1} ms; includes up to one 100 ms scheduler step)",
        first.as_secs_f64() * 1e3,
        last.as_secs_f64() * 1e3,
        (last - first).as_secs_f64() * 1e3
    );
    println!(
        "instance CPU from the slot freed to the last message: {:.1} ms, {:.1} µs per socket",
        fan_out_cpu / 1e3,
        fan_out_cpu / sockets as f64
    );
    for task in tasks {
        task.abort();
    }
    drop(instance);
    let _ = std::fs::remove_dir_all(&dir);
}
