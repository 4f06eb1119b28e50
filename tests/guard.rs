//! The room against hostile clients: real client addresses behind trusted proxies, joins per
//! address, and requests built to slip past the gate.

mod common;

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// An idle room of 500 places: every join is admitted at once, unless refused.
const OPEN_ROOM: &str = "admit_per_minute = 60000\nmax_active = 500\njoins_per_address_per_minute = 10\n";

/// GET `/checkout` without cookies from `source`, with an `X-Forwarded-For` if given: status,
/// whether a cookie of the room was set, and `Retry-After`.
async fn join_from(
    source: IpAddr,
    gate: SocketAddr,
    forwarded_for: Option<&str>,
) -> (StatusCode, bool, Option<String>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let stream = socket.connect(gate).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let mut request = Request::get("/checkout").header("host", "shop.test").header("accept", "application/json");
    if let Some(chain) = forwarded_for {
        request = request.header("x-forwarded-for", chain);
    }
    let response = sender.send_request(request.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let cookie = response.headers().get_all("set-cookie").iter().any(|c| c.to_str().unwrap().starts_with("vestibule-"));
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    let status = response.status();
    response.into_body().collect().await.unwrap();
    (status, cookie, retry_after)
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[tokio::test]
async fn cookieless_requests_from_one_address_take_no_more_than_its_share() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, OPEN_ROOM).await;
    let mut admitted = 0;
    for n in 0..30 {
        let (status, cookie, retry_after) = join_from(ip("127.0.0.1"), gate.addr, None).await;
        if n < 10 {
            assert_eq!((status, cookie), (StatusCode::OK, true), "join {n} is within the limit");
            admitted += 1;
        } else {
            assert_eq!((status, cookie), (StatusCode::TOO_MANY_REQUESTS, false), "join {n}: 429 and no ticket");
            let seconds: u64 = retry_after.expect("Retry-After").parse().unwrap();
            assert!((1..=6).contains(&seconds), "{seconds}");
        }
    }
    assert_eq!(upstream.requests().len(), admitted, "only the admitted reached the upstream");
    // Another address is not held back by the first.
    assert_eq!(join_from(ip("127.0.0.2"), gate.addr, None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_real_address_has_its_own_limit() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_room_with(upstream_addr, "trusted_proxies = [\"127.0.0.1/32\"]", OPEN_ROOM).await;
    // Thirty visitors behind the proxy, from thirty addresses: all let in.
    for n in 1..=30 {
        let chain = format!("198.51.100.{n}");
        let (status, cookie, _) = join_from(ip("127.0.0.1"), gate.addr, Some(&chain)).await;
        assert_eq!((status, cookie), (StatusCode::OK, true), "visitor {n}");
    }
    // One of them joining again and again meets their own limit, not the proxy's.
    for n in 0..9 {
        let (status, _, _) = join_from(ip("127.0.0.1"), gate.addr, Some("6.6.6.6, 198.51.100.7")).await;
        assert_eq!(status, StatusCode::OK, "join {} of 198.51.100.7", n + 2);
    }
    let (status, _, _) = join_from(ip("127.0.0.1"), gate.addr, Some("198.51.100.7")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // A peer that is not a trusted proxy cannot dodge its limit by naming other addresses.
    for n in 0..15 {
        let chain = format!("203.0.113.{n}");
        let (status, _, _) = join_from(ip("127.0.0.3"), gate.addr, Some(&chain)).await;
        let expected = if n < 10 { StatusCode::OK } else { StatusCode::TOO_MANY_REQUESTS };
        assert_eq!(status, expected, "join {n} from 127.0.0.3 naming {chain}");
    }
}

/// `count` forgeries of a valid token: its signature altered at as many places.
fn forgeries(token: &str, count: usize) -> Vec<String> {
    let (signed, signature) = token.rsplit_once('.').unwrap();
    (0..count)
        .map(|at| {
            let mut forged: Vec<u8> = signature.as_bytes().to_vec();
            forged[at + 2] = if forged[at + 2] == b'A' { b'B' } else { b'A' };
            format!("{signed}.{}", String::from_utf8(forged).unwrap())
        })
        .collect()
}

#[tokio::test]
async fn repeated_forged_cookies_cost_one_signature_check() {
    let (upstream_addr, upstream) = start_upstream().await;
    let paused = "admit_per_minute = 60\nmax_active = 10\nstate = \"paused\"\n";
    let gate = start_room_with(upstream_addr, "max_header_bytes = 65536", paused).await;
    let tokens = gate.running.gate().tokens();
    let forged = forgeries(&gate.token("checkout"), 40);
    let cookie: String =
        forged.iter().map(|token| format!("vestibule-token-checkout={token}")).collect::<Vec<_>>().join("; ");
    let before = tokens.ring().signature_checks();
    let (status, _, _) = get(gate.addr, "/checkout", &[("cookie", &cookie)]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "no forgery passes");
    assert_eq!(tokens.ring().signature_checks() - before, 1, "only the first cookie of the name is read");
    // The same forgery again, and again: refused from memory, no signature check.
    for _ in 0..5 {
        get(gate.addr, "/checkout", &[("cookie", &cookie)]).await;
    }
    assert_eq!(tokens.ring().signature_checks() - before, 1, "a refused token is remembered");
    // A valid token behind a forged one of the same name is not looked at either.
    let valid = gate.token("checkout");
    let cookie = format!("vestibule-token-checkout={}; vestibule-token-checkout={valid}", forged[0]);
    assert_eq!(get(gate.addr, "/checkout", &[("cookie", &cookie)]).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert!(upstream.requests().is_empty());
    // The valid one alone passes.
    let cookie = format!("vestibule-token-checkout={valid}");
    assert_eq!(get(gate.addr, "/checkout", &[("cookie", &cookie)]).await.0, StatusCode::OK);
}

#[tokio::test]
async fn an_ambiguous_request_behind_many_pipelined_ones_is_refused_and_the_connection_closed() {
    // hyper's path: the framing scanner keeps 64 verdicts; the heads it could not judge are
    // refused. The fast lane takes the plain GETs itself (one clear framing each, nothing to
    // judge) and hands the ambiguous POST to hyper, which refuses it.
    for (server, most) in [("fast_lane = false", 64), ("", 70)] {
        let (upstream_addr, upstream) = start_upstream().await;
        let gate = start_gate(upstream_addr, server, "").await;
        let mut stream = "GET /plain HTTP/1.1\r\nHost: a.test\r\n\r\n".repeat(70);
        stream.push_str(
            "POST /smuggled HTTP/1.1\r\nHost: a.test\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n\
             0\r\n\r\nGET /inner HTTP/1.1\r\nHost: a.test\r\n\r\n",
        );
        let (_, text) = raw(gate.addr, stream.as_bytes()).await;
        let paths: Vec<String> = upstream.requests().iter().map(|seen| seen.uri.path().to_owned()).collect();
        assert!(paths.iter().all(|path| path == "/plain"), "{server}: reached the upstream: {paths:?}");
        assert!(paths.len() <= most, "{server}: {} forwarded", paths.len());
        // The first head it could not judge got 400, and nothing after it was answered.
        let last = &text[text.rfind("HTTP/1.1 ").unwrap_or(0)..];
        assert!(last.starts_with("HTTP/1.1 400"), "{server}: the connection closed after the 400: {last:?}");
        assert_eq!(text.matches("HTTP/1.1 400").count(), 1, "{server}: {text}");
    }
}

/// A gate with the memory store and one room of one place, signing with the key at `key`.
async fn one_place_gate(upstream: SocketAddr, key: &std::path::Path) -> vestibule::server::Running {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n[upstream]\nurl = \"http://{upstream}\"\n\
         [tokens]\nsigning_key = {key:?}\n[[rooms]]\nid = \"checkout\"\npaths = [\"/checkout\"]\n\
         admit_per_minute = 6000\nmax_active = 1\n"
    );
    let config = vestibule::config::Config::parse(&text, "test.toml", key.parent().unwrap()).unwrap();
    vestibule::server::start(&config).await.unwrap()
}

#[tokio::test]
async fn tickets_and_tokens_of_a_line_that_was_reset_admit_nobody_and_end_nothing() {
    use common::visitor::Visitor;
    let (upstream_addr, upstream) = start_upstream().await;
    let dir = TempDir::new("reset-line");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa)).unwrap();

    // The first life of the line: A inside with ticket 1, B waiting with ticket 2.
    let first = one_place_gate(upstream_addr, &key).await;
    let mut a = Visitor::new(first.addr);
    assert_eq!(a.open("/checkout").await.0, StatusCode::OK);
    let mut b = Visitor::new(first.addr);
    b.open("/checkout").await;
    assert_eq!(b.status().await["position"], 1);
    first.shutdown();
    first.stopped().await;

    // The instance restarts (memory store): a new line, whose ticket 1 is C's and 2 is D's.
    let second = one_place_gate(upstream_addr, &key).await;
    let mut c = Visitor::new(second.addr);
    assert_eq!(c.open("/checkout").await.0, StatusCode::OK);
    let mut d = Visitor::new(second.addr);
    d.open("/checkout").await;
    // A's old token, for ticket 1 of the old line, neither passes nor ends C's session.
    a.addr = second.addr;
    let seen = upstream.requests().len();
    assert_eq!(a.request("GET", "/checkout/pay", "application/json").await.0, StatusCode::SERVICE_UNAVAILABLE);
    a.leave().await;
    assert_eq!(c.open("/checkout/pay").await.0, StatusCode::OK, "C is still inside");
    // C leaves; ticket 2 of the new line is D's turn, not B's.
    c.leave().await;
    b.addr = second.addr;
    d.wait_for_status("admitted").await;
    let (status, _, _) = b.request("GET", "/checkout", "application/json").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "B's old ticket redeems nobody's turn");
    assert_eq!(upstream.requests().len(), seen + 1, "only C's request passed");
    assert_eq!(d.open("/checkout").await.0, StatusCode::OK, "D gets their turn");
}

/// Open a tunnel to the upstream's echo (`/chat/ws`, outside any room) and check it echoes.
async fn open_tunnel(gate: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = "GET /chat/ws HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(gate).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut byte)).await.unwrap().unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    echo(&mut stream).await;
    stream
}

async fn echo(stream: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"hello").await.unwrap();
    let mut echoed = [0u8; 5];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"hello");
}

#[tokio::test]
async fn an_upgraded_tunnel_keeps_its_connection_place() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "max_connections = 1", "").await;
    let tunnel = open_tunnel(gate.addr).await;
    // The only connection place is the tunnel's: a new client waits in the accept queue.
    let mut waiting = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    waiting.write_all(b"GET /x HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let early = tokio::time::timeout(std::time::Duration::from_millis(500), waiting.read_to_end(&mut answer)).await;
    assert!(early.is_err(), "answered while the tunnel held the only place: {}", String::from_utf8_lossy(&answer));
    // The tunnel closes: its place goes to the waiting client.
    drop(tunnel);
    tokio::time::timeout(DEADLINE, waiting.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_and_a_busy_one_is_not() {
    use tokio::io::AsyncReadExt;
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "tunnel_idle_timeout = \"1s\"").await;
    // Bytes every 300 ms for 2 s: the tunnel stays open.
    let mut busy = open_tunnel(gate.addr).await;
    for _ in 0..7 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        echo(&mut busy).await;
    }
    // Nothing for a second: closed.
    let mut idle = open_tunnel(gate.addr).await;
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, idle.read_to_end(&mut rest)).await.expect("closed").unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "closed after {:?}", started.elapsed());
}

/// GET `/checkout` from `source` as an API client, with a proof of work if given: the status,
/// the JSON body, and whether a ticket (or token) was set.
async fn join_with_proof(
    source: IpAddr,
    gate: SocketAddr,
    proof: Option<&str>,
) -> (StatusCode, serde_json::Value, bool) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let stream = socket.connect(gate).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let mut request = Request::get("/checkout").header("host", "shop.test").header("accept", "application/json");
    if let Some(proof) = proof {
        request = request.header("vestibule-pow", proof);
    }
    let response = sender.send_request(request.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
    let placed = response.headers().get_all("set-cookie").iter().any(|c| {
        let c = c.to_str().unwrap();
        (c.starts_with("vestibule-ticket-") || c.starts_with("vestibule-token-")) && !c.contains("Max-Age=0")
    });
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default(), placed)
}

#[tokio::test]
async fn the_proof_of_work_is_refused_when_missing_wrong_reused_or_from_another_address() {
    use vestibule::challenge::solve;
    let (upstream_addr, upstream) = start_upstream().await;
    let room = "admit_per_minute = 60000\nmax_active = 500\nchallenge = \"pow\"\nchallenge_difficulty = 10\n";
    let gate = start_room(upstream_addr, room).await;
    let me = ip("127.0.0.1");

    // No proof: the challenge, as JSON with 403, and no place.
    let (status, asked, placed) = join_with_proof(me, gate.addr, None).await;
    assert_eq!((status, placed), (StatusCode::FORBIDDEN, false));
    assert_eq!((asked["status"].as_str(), asked["difficulty"].as_u64()), (Some("challenge"), Some(10)), "{asked}");
    let challenge = asked["challenge"].as_str().unwrap().to_owned();

    // Wrong: too little work, a made-up challenge, garbage.
    let lazy = (0..).map(|n| format!("{challenge}.{n}")).find(|s| solve_bits(s) < 10).unwrap();
    // Its last character changed (to another one: the same would make it the real one).
    let last = if challenge.ends_with('A') { 'B' } else { 'A' };
    let made_up = solve(&format!("{}{last}", &challenge[..challenge.len() - 1]), 10);
    for wrong in [lazy.as_str(), made_up.as_str(), "garbage"] {
        let (status, refused, placed) = join_with_proof(me, gate.addr, Some(wrong)).await;
        assert_eq!((status, placed), (StatusCode::FORBIDDEN, false), "{wrong}");
        assert!(refused["refused"].is_string(), "{refused}");
    }
    // From another address than the one it was issued to.
    let solved = solve(&challenge, 10);
    let (status, _, placed) = join_with_proof(ip("127.0.0.2"), gate.addr, Some(&solved)).await;
    assert_eq!((status, placed), (StatusCode::FORBIDDEN, false), "bound to its address");
    // Right: a place. Once.
    let (status, _, placed) = join_with_proof(me, gate.addr, Some(&solved)).await;
    assert_eq!((status, placed), (StatusCode::OK, true), "solved: let in");
    let (status, refused, placed) = join_with_proof(me, gate.addr, Some(&solved)).await;
    assert_eq!((status, placed), (StatusCode::FORBIDDEN, false));
    assert_eq!(refused["refused"], "the solution was used already");
    assert_eq!(upstream.requests().len(), 1);

    // A browser gets the page that solves it, which asks for nothing outside.
    let (status, headers, page) = get_page(gate.addr).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("crypto.subtle.digest") && page.contains("vestibule-pow-checkout"), "{page}");
    assert!(!headers.get_all("set-cookie").iter().any(|c| c.to_str().unwrap().starts_with("vestibule-ticket-")));
}

/// Leading zero bits of SHA-256 of `text`.
fn solve_bits(text: &str) -> u32 {
    let hash = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut bits = 0;
    for byte in hash.as_ref() {
        if *byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

async fn get_page(gate: SocketAddr) -> (StatusCode, http::HeaderMap, String) {
    let request = Request::get("/checkout")
        .header("host", "shop.test")
        .header("accept", "text/html")
        .body(Full::new(Bytes::new()));
    send(gate, request.unwrap()).await
}

/// Open a feed socket for `cookie`'s ticket through the gate, as from `forwarded_for` behind a
/// proxy: whether it was accepted.
async fn feed_from(gate: SocketAddr, cookie: &str, forwarded_for: &str) -> bool {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{gate}/_vestibule/ws?room=checkout").into_client_request().unwrap();
    request.headers_mut().insert("cookie", cookie.parse().unwrap());
    request.headers_mut().insert("x-forwarded-for", forwarded_for.parse().unwrap());
    let stream = tokio::net::TcpStream::connect(gate).await.unwrap();
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((socket, _)) => {
            // Held open for the rest of the test.
            std::mem::forget(socket);
            true
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn feed_limits_count_real_addresses_behind_a_trusted_proxy() {
    use common::visitor::Visitor;
    let (upstream_addr, _upstream) = start_upstream().await;
    let server = "trusted_proxies = [\"127.0.0.1/32\"]\nmax_feed_sockets_per_address = 4";
    let gate = start_room_with(upstream_addr, server, "admit_per_minute = 60\nmax_active = 1\n").await;
    let mut waiter = Visitor::new(gate.addr);
    waiter.open("/checkout").await; // admitted: the only place
    let mut waiter = Visitor::new(gate.addr);
    waiter.open("/checkout").await;
    let cookie = waiter.cookie_header();
    // Seventy visitors behind the balancer, each from their own address: all served.
    for n in 0..70 {
        assert!(feed_from(gate.addr, &cookie, &format!("198.51.100.{n}")).await, "visitor {n} refused");
    }
    // One address beyond its four sockets is refused, whoever forwards it.
    for n in 0..4 {
        assert!(feed_from(gate.addr, &cookie, "203.0.113.1").await, "socket {n}");
    }
    assert!(!feed_from(gate.addr, &cookie, "203.0.113.1").await, "a fifth socket from one address");
}
