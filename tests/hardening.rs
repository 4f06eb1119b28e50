//! The hour a waiting room exists for, tried as an attacker would (docs/security.md): a page of
//! another site posting into a visitor's session, a shared cache keeping a token, slow and
//! greedy clients from one address, client-address headers, cookies behind a TLS front.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::visitor::Visitor;
use common::*;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OPEN_ROOM: &str = "admit_per_minute = 600\nmax_active = 50\n";

/// A request as `visitor` (their cookies) with extra `headers`; the visitor's jar is left as
/// it was, so that what the answer would have done to it can be read from `Set-Cookie`.
async fn as_visitor(visitor: &Visitor, method: &str, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "shop.test")
        .header("cookie", visitor.cookie_header());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (status, headers, _) = send(visitor.addr, request.body(Full::new(Bytes::new())).unwrap()).await;
    (status, headers)
}

#[tokio::test]
async fn a_page_of_another_site_cannot_make_a_visitor_leave() {
    let (upstream_addr, _) = start_upstream().await;
    let gate = start_room(upstream_addr, OPEN_ROOM).await;
    let mut visitor = Visitor::new(gate.addr);
    visitor.open("/checkout").await;
    assert_eq!(visitor.status().await["status"], "admitted");

    let leave = "/_vestibule/leave?room=checkout";
    for forged in [
        vec![("sec-fetch-site", "cross-site"), ("origin", "https://evil.example")],
        vec![("sec-fetch-site", "same-site")],
        vec![("origin", "https://evil.example")],
        vec![("origin", "null")],
        vec![("referer", "https://evil.example/buy-now.html")],
    ] {
        let (status, headers) = as_visitor(&visitor, "POST", leave, &forged).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{forged:?}");
        assert!(!headers.contains_key("set-cookie"), "{forged:?}: no cookie cleared");
        assert_eq!(visitor.status().await["status"], "admitted", "{forged:?}: the session is still there");
        assert_eq!(visitor.open("/checkout/pay").await.0, StatusCode::OK);
    }
    // The shop's own page, and a client that is not a browser, still can.
    let (status, _) = as_visitor(&visitor, "POST", leave, &[("sec-fetch-site", "same-origin")]).await;
    assert_eq!(status, StatusCode::OK);
    let mut api = Visitor::new(gate.addr);
    api.open("/checkout").await;
    api.leave().await;
    assert_eq!(api.status().await["status"], "none");
}

#[tokio::test]
async fn a_cross_site_post_into_the_room_never_replaces_a_visitors_cookies() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, OPEN_ROOM).await;
    // A visitor with no cookie for the request (SameSite=Lax keeps them off a cross-site
    // POST): answering would give the browser a new ticket or token over theirs.
    let nobody = Visitor::new(gate.addr);
    let seen_before = upstream.requests().len();
    for forged in [vec![("sec-fetch-site", "cross-site")], vec![("origin", "https://evil.example")]] {
        let (status, headers) = as_visitor(&nobody, "POST", "/checkout/pay?item=7", &forged).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{forged:?}");
        assert_eq!(headers["location"], "/checkout/pay?item=7", "the same address, as a GET that brings the cookies");
        assert!(!headers.contains_key("set-cookie"), "{forged:?}");
        assert_eq!(headers["cache-control"], "private, no-store");
    }
    assert_eq!(upstream.requests().len(), seen_before, "nothing reached the upstream");
    // A same-origin POST still joins and goes through.
    let (status, headers) = as_visitor(&nobody, "POST", "/checkout/pay", &[("origin", "http://shop.test")]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["set-cookie"].to_str().unwrap().starts_with("vestibule-token-checkout="));
}

#[tokio::test]
async fn every_answer_that_sets_a_vestibule_cookie_is_kept_out_of_shared_caches() {
    let (upstream_addr, _) = start_upstream().await;
    let gate = start_room(upstream_addr, "admit_per_minute = 600\nmax_active = 1\n").await;
    // The upstream's first answer, which carries the admission token.
    let mut first = Visitor::new(gate.addr);
    let (status, headers, _) = first.open("/checkout").await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.contains_key("set-cookie"));
    assert_eq!(headers["cache-control"], "private, no-store");
    // The waiting page with its ticket, and the status JSON.
    let mut second = Visitor::new(gate.addr);
    let (_, headers, _) = second.open("/checkout").await;
    assert!(headers["set-cookie"].to_str().unwrap().starts_with("vestibule-ticket-checkout="));
    assert_eq!(headers["cache-control"], "private, no-store");
    let (_, headers, _) = second.request("GET", "/_vestibule/status?room=checkout", "application/json").await;
    assert_eq!(headers["cache-control"], "private, no-store");
    // Leaving clears both cookies: private too.
    let (_, headers, _) = first.request("POST", "/_vestibule/leave?room=checkout", "application/json").await;
    assert!(headers.contains_key("set-cookie"));
    assert_eq!(headers["cache-control"], "private, no-store");
}

#[tokio::test]
async fn cookies_are_secure_behind_a_tls_front_that_a_trusted_proxy_names() {
    let (upstream_addr, _) = start_upstream().await;
    let secure = |headers: &HeaderMap| headers["set-cookie"].to_str().unwrap().contains("; Secure");
    // Auto: the trusted proxy (127.0.0.1) says the client came over https.
    let gate = start_room_with(upstream_addr, "trusted_proxies = [\"127.0.0.1/32\"]", OPEN_ROOM).await;
    let client = Visitor::new(gate.addr);
    let (_, headers) =
        as_visitor(&client, "GET", "/checkout", &[("x-forwarded-for", "203.0.113.9"), ("x-forwarded-proto", "https")])
            .await;
    assert!(secure(&headers), "{headers:?}");
    let (_, headers) = as_visitor(&client, "GET", "/checkout", &[("x-forwarded-for", "203.0.113.10")]).await;
    assert!(!secure(&headers), "plain http through the proxy: no Secure");
    // An untrusted peer cannot claim https.
    let gate = start_room(upstream_addr, OPEN_ROOM).await;
    let (_, headers) =
        as_visitor(&Visitor::new(gate.addr), "GET", "/checkout", &[("x-forwarded-proto", "https")]).await;
    assert!(!secure(&headers));
    // true: always.
    let gate = start_room_with(upstream_addr, "cookie_secure = true", OPEN_ROOM).await;
    let (_, headers) = as_visitor(&Visitor::new(gate.addr), "GET", "/checkout", &[]).await;
    assert!(secure(&headers));
}

#[tokio::test]
async fn client_address_headers_from_an_untrusted_peer_never_reach_the_upstream() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, OPEN_ROOM).await;
    let forged = [
        ("x-real-ip", "6.6.6.6"),
        ("true-client-ip", "6.6.6.6"),
        ("x-client-ip", "6.6.6.6"),
        ("cf-connecting-ip", "6.6.6.6"),
        ("fastly-client-ip", "6.6.6.6"),
    ];
    // Both HTTP paths: the fast lane (a bodiless GET outside the rooms) and hyper (a POST).
    for method in ["GET", "POST"] {
        let (status, _) = as_visitor(&Visitor::new(gate.addr), method, "/elsewhere", &forged).await;
        assert_eq!(status, StatusCode::OK);
        let seen = upstream.last().headers;
        assert_eq!(seen["x-real-ip"], "127.0.0.1", "{method}: ours, the peer's address");
        for (name, _) in &forged[1..] {
            assert!(!seen.contains_key(*name), "{method}: {name} dropped");
        }
    }
}

/// Many connections from one address that never read: another address is still answered at
/// once, and connections beyond the per-address cap are refused with 503.
#[tokio::test]
async fn one_address_cannot_hold_every_connection() {
    let (upstream_addr, _) = start_upstream().await;
    let gate = start_room_with(
        upstream_addr,
        "max_connections = 40\nmax_connections_per_address = 30\nsend_timeout = \"60s\"",
        OPEN_ROOM,
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..30 {
        let mut stream = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
        // Pipelined requests whose answers are never read.
        let pipelined = "GET /download/65536 HTTP/1.1\r\nHost: shop.test\r\n\r\n".repeat(32);
        stream.write_all(pipelined.as_bytes()).await.unwrap();
        held.push(stream);
    }
    // The 31st from the same address: 503 and closed.
    let (status, text) = raw(gate.addr, b"GET / HTTP/1.1\r\nHost: shop.test\r\n\r\n").await;
    assert_eq!(status, 503, "{text}");
    // Another address is answered within 2 s.
    let (status, text) = tokio::time::timeout(
        Duration::from_secs(2),
        raw_from("127.0.0.7", gate.addr, b"GET /checkout HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n"),
    )
    .await
    .expect("another address is answered within 2 s");
    assert_eq!(status, 200, "{text}");
    let metrics = gate.running.gate().metrics().encode();
    assert!(
        metrics.contains("vestibule_connection_limits_total{listener=\"public\",reason=\"per_address\"} 1"),
        "{metrics}"
    );
    drop(held);
}

/// A client that asks and never reads is let go after `send_timeout`, on both HTTP paths.
#[tokio::test]
async fn a_client_that_never_reads_is_closed_after_the_send_timeout() {
    let (upstream_addr, _) = start_upstream().await;
    for fast_lane in [true, false] {
        let gate =
            start_room_with(upstream_addr, &format!("send_timeout = \"1s\"\nfast_lane = {fast_lane}"), OPEN_ROOM).await;
        let mut stream = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
        // 16 MiB asked for, none read: the socket buffers fill, the writes stop.
        stream.write_all(b"GET /download/16777216 HTTP/1.1\r\nHost: shop.test\r\n\r\n").await.unwrap();
        let metrics = gate.running.gate().metrics().clone();
        wait_for("the send timeout", || metrics.encode().contains("reason=\"send_timeout\"} 1")).await;
        // The server's side is gone: reading what was buffered ends at its close.
        let mut sink = vec![0u8; 1 << 20];
        let drained = tokio::time::timeout(DEADLINE, async {
            loop {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(drained.is_ok(), "fast_lane = {fast_lane}: the connection was closed");
    }
}

#[tokio::test]
async fn a_chunk_size_past_63_bits_is_refused_and_never_forwarded() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    for size in ["ffffffffffffffff", "8000000000000000"] {
        let request = format!(
            "POST /upload HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n{size}\r\nabc\r\n0\r\n\r\n"
        );
        let (status, text) = raw(gate.addr, request.as_bytes()).await;
        assert_eq!(status, 400, "{size}: {text}");
    }
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    // A bare LF ends a head for hyper but not for the framing scanner: refused.
    let (status, text) =
        raw(gate.addr, b"GET /a HTTP/1.1\nHost: a.test\n\nGET /b HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert_eq!(status, 400, "{text}");
    assert!(upstream.requests().is_empty());
}

/// A prefix written with a trailing slash guards the path without it too.
#[tokio::test]
async fn a_prefix_written_with_a_trailing_slash_guards_the_bare_path() {
    let (upstream_addr, upstream) = start_upstream().await;
    let dir = TempDir::new("slash");
    let key = dir.path().join("signing.pem");
    std::fs::write(&key, vestibule::token::generate_key(vestibule::token::KeyKind::Eddsa)).unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://{upstream_addr}\"\n[tokens]\nsigning_key = {key:?}\n\
         [[rooms]]\nid = \"checkout\"\npaths = [\"/checkout/\"]\nadmit_per_minute = 60\nmax_active = 1\nstate = \"paused\"\n"
    );
    let config = vestibule::config::Config::parse(&text, "test.toml", dir.path()).unwrap();
    let running = vestibule::server::start(&config).await.unwrap();
    for path in ["/checkout", "/CHECKOUT", "/checkout/", "/checkout/pay"] {
        let (status, _, _) = get(running.addr, path, &[]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path} is held");
    }
    assert_eq!(get(running.addr, "/checkouts", &[]).await.0, StatusCode::OK, "another path passes");
    assert_eq!(upstream.requests().len(), 1);
}

/// Read a response head byte by byte (what follows it stays in the stream).
async fn read_response_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(DEADLINE, stream.read(&mut byte)).await.expect("a head in time") {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// An admitted visitor's websocket tunnel lasts no longer than their session: it closes when
/// they leave.
#[tokio::test]
async fn an_admitted_tunnel_closes_when_its_session_ends() {
    let (upstream_addr, _) = start_upstream().await;
    let gate = start_room(upstream_addr, OPEN_ROOM).await;
    let mut visitor = Visitor::new(gate.addr);
    visitor.open("/checkout").await;
    let request = format!(
        "GET /checkout/ws HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nCookie: {}\r\n\r\n",
        visitor.cookie_header()
    );
    let mut tunnel = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    tunnel.write_all(request.as_bytes()).await.unwrap();
    let head = read_response_head(&mut tunnel).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tunnel.write_all(b"hello").await.unwrap();
    let mut echoed = [0u8; 5];
    tokio::time::timeout(DEADLINE, tunnel.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"hello");
    // The visitor leaves (from the shop's own page): the tunnel closes within seconds.
    visitor.leave().await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the tunnel outlived the session");
}

/// An upstream `101` to a protocol nobody asked for is not passed on.
#[tokio::test]
async fn an_upstream_switching_to_another_protocol_is_refused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                if read_head(&mut stream, &mut buffer).await.is_some() {
                    let answer = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let mut sink = [0u8; 1024];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    let gate = start_gate(upstream_addr, "", "").await;
    let mut stream = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let request = "GET /chat/ws HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_response_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
}

/// What an instance keeps of a visitor who came and left: their tokens leave the cache of
/// verified tokens with them (the room's revocation is all that stays).
#[tokio::test]
async fn a_visitor_who_leaves_takes_their_cached_tokens_along() {
    let (upstream_addr, _) = start_upstream().await;
    let gate = start_room(upstream_addr, OPEN_ROOM).await;
    let tokens = || gate.running.gate().tokens().cached();
    let mut visitors = Vec::new();
    for _ in 0..5 {
        let mut visitor = Visitor::new(gate.addr);
        visitor.open("/checkout").await;
        visitor.open("/checkout/pay").await; // the token verified, and cached
        visitors.push(visitor);
    }
    assert_eq!(tokens(), 5);
    for visitor in &mut visitors {
        visitor.leave().await;
    }
    assert_eq!(tokens(), 0);
}

/// An HTTP/2 client that grants a stream no window holds nothing for long: after
/// `send_timeout` the stream's upstream answer is let go.
#[tokio::test]
async fn an_http2_stream_without_a_window_is_let_go_after_the_send_timeout() {
    let (upstream_addr, _) = start_upstream().await;
    let gate = start_room_with(upstream_addr, "h2c = true\nsend_timeout = \"1s\"", OPEN_ROOM).await;
    let stream = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .initial_stream_window_size(0)
        .adaptive_window(false)
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = Request::get(format!("http://{}/download/4000000", gate.addr)).body(Full::new(Bytes::new())).unwrap();
    let response = tokio::time::timeout(DEADLINE, sender.send_request(request)).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The body is never read: the window stays shut.
    let metrics = gate.running.gate().metrics().clone();
    wait_for("the stalled stream let go", || metrics.encode().contains("reason=\"send_timeout\"} 1")).await;
    // And its connection closed: nothing of it is held.
    tokio::time::timeout(DEADLINE, connection).await.expect("the connection is closed").unwrap().ok();
    drop(response);
}

/// An HTTP/2 connection (or one whose first bytes have not come) is held to
/// `header_read_timeout` while it sends no request, as an HTTP/1 one between requests.
#[tokio::test]
async fn a_silent_connection_is_closed_whatever_its_protocol() {
    let (upstream_addr, _) = start_upstream().await;
    let gate = start_room_with(
        upstream_addr,
        "h2c = true
header_read_timeout = \"1s\"",
        OPEN_ROOM,
    )
    .await;
    for first_bytes in [&b""[..], b"PRI * HT", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0"] {
        let mut stream = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
        stream.write_all(first_bytes).await.unwrap();
        let started = tokio::time::Instant::now();
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "{first_bytes:?}: still open after 5 s");
        assert!(started.elapsed() >= Duration::from_millis(900), "{first_bytes:?}: closed too soon");
    }
}

/// Through a trusted proxy, each client it names has its own share of connections: a
/// request is counted until its answer has been sent, body and all.
#[tokio::test]
async fn a_trusted_proxys_clients_are_capped_one_by_one() {
    let (upstream_addr, upstream) = start_upstream().await;
    let server = "trusted_proxies = [\"127.0.0.1/32\"]\nmax_connections_per_address = 2";
    let gate = start_room_with(upstream_addr, server, OPEN_ROOM).await;
    let from = |client: &str, path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: {client}\r\nConnection: close\r\n\r\n")
            .into_bytes()
    };
    // Client 203.0.113.9: one request the upstream never answers, one whose large answer is
    // not read.
    let mut hanging = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    hanging.write_all(&from("203.0.113.9", "/hang")).await.unwrap();
    tokio::time::timeout(DEADLINE, upstream.arrived.notified()).await.unwrap();
    let mut unread = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    unread.write_all(&from("203.0.113.9", "/download/16777216")).await.unwrap();
    let head = read_response_head(&mut unread).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // A third from the same client: refused; another client: served.
    let (status, text) = raw(gate.addr, &from("203.0.113.9", "/third")).await;
    assert_eq!(status, 503, "{text}");
    let (status, text) = raw(gate.addr, &from("198.51.100.4", "/other")).await;
    assert_eq!(status, 200, "{text}");
    drop((hanging, unread));
}

/// A tunnel opened through a trusted proxy keeps its client's place under the cap.
#[tokio::test]
async fn tunnels_through_a_trusted_proxy_count_against_their_client() {
    let (upstream_addr, _) = start_upstream().await;
    let server = "trusted_proxies = [\"127.0.0.1/32\"]\nmax_connections_per_address = 2";
    let gate = start_room_with(upstream_addr, server, OPEN_ROOM).await;
    let upgrade = "GET /chat/ws HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   X-Forwarded-For: 203.0.113.9\r\n\r\n";
    let mut tunnels = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
        stream.write_all(upgrade.as_bytes()).await.unwrap();
        let head = read_response_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        tunnels.push(stream);
    }
    let mut third = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    third.write_all(upgrade.as_bytes()).await.unwrap();
    let head = read_response_head(&mut third).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    drop(tunnels);
}
