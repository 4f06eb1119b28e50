//! The HTTP front over real sockets: framing, limits, headers, timeouts, upgrades, shutdown,
//! HTTP/2 and TLS.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn hop_by_hop_and_spoofed_forwarding_headers_never_cross() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    let request = "GET /hop HTTP/1.1\r\nHost: shop.test\r\nConnection: keep-alive, X-Client-Private\r\n\
X-Client-Private: 1\r\nKeep-Alive: timeout=9\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n\
X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\nForwarded: for=6.6.6.6\r\n\
X-Kept: yes\r\n\r\n";
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !text.ends_with("hop") {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await.expect("response in time").unwrap();
        assert!(n > 0, "connection closed early: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let response = text.to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 200"), "{text}");
    for gone in ["x-upstream-private", "keep-alive: timeout=5", "vestibule-session"] {
        assert!(!response.contains(gone), "{gone} must not reach the client: {text}");
    }
    assert!(response.contains("x-kept: 1"));

    let seen = upstream.last();
    for gone in ["x-client-private", "keep-alive", "te", "proxy-authorization", "forwarded"] {
        assert!(!seen.headers.contains_key(gone), "{gone} must not reach the upstream");
    }
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "shop.test");
    assert_eq!(seen.headers["x-kept"], "yes");
}

#[tokio::test]
async fn a_trusted_proxy_chain_is_extended() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "trusted_proxies = [\"127.0.0.0/8\"]", "").await;
    let (status, _, _) =
        get(gate.addr, "/", &[("x-forwarded-for", "203.0.113.9"), ("x-forwarded-proto", "https")]).await;
    assert_eq!(status, StatusCode::OK);
    let seen = upstream.last();
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn huge_or_too_many_headers_get_431() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    let huge = format!("GET / HTTP/1.1\r\nHost: shop.test\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    let (status, _) = raw(gate.addr, huge.as_bytes()).await;
    assert_eq!(status, 431);
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!("GET / HTTP/1.1\r\nHost: shop.test\r\n{many}\r\n");
    let (status, _) = raw(gate.addr, request.as_bytes()).await;
    assert_eq!(status, 431);
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn ambiguous_framing_and_hosts_get_400_and_never_reach_the_upstream() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    let cases = [
        ("duplicate Host", "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
        (
            "CL then TE",
            "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "TE then CL",
            "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        ),
        ("duplicate CL", "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"),
        ("conflicting CL", "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx"),
        ("odd CL", "POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: +1\r\n\r\nx"),
        ("absolute URI vs Host", "GET http://evil.test/ HTTP/1.1\r\nHost: shop.test\r\n\r\n"),
        ("no Host", "GET / HTTP/1.1\r\n\r\n"),
        ("TE not chunked", "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ];
    for (name, request) in cases {
        let (status, text) = raw(gate.addr, request.as_bytes()).await;
        assert_eq!(status, 400, "{name}: {text}");
    }
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());

    // The same connection keeps working for well-framed requests before a bad one.
    let pipelined = "GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n\
POST /second HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let (_, text) = raw(gate.addr, pipelined.as_bytes()).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("HTTP/1.1 400"), "{text}");
    assert_eq!(upstream.requests().iter().map(|s| s.uri.path().to_owned()).collect::<Vec<_>>(), ["/first"]);

    // An absolute-form target that agrees with Host is fine.
    let (status, _) =
        raw(gate.addr, b"GET http://a.test/ok HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn dead_upstream_gives_502_and_hung_upstream_gives_504() {
    let dead = dead_address().await;
    let gate = start_gate(dead, "", "connect_timeout = \"1s\"").await;
    let (status, _, body) = get(gate.addr, "/", &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("cannot be reached"));
    let (status, headers, _) = get(gate.addr, "/", &[("accept", "application/json")]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["content-type"], "application/json");

    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "response_timeout = \"300ms\"").await;
    let started = tokio::time::Instant::now();
    let (status, _, _) = get(gate.addr, "/hang", &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < DEADLINE);
}

#[tokio::test]
async fn websocket_upgrades_pass_only_for_admitted_requests_and_only_on_101() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    let token = gate.token("checkout");
    let upgrade = |path: &str, token: &str| {
        let mut builder = Request::get(path)
            .header("host", "shop.test")
            .header("accept", "application/json")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        if !token.is_empty() {
            builder = builder.header("vestibule-token", token);
        }
        builder.body(Full::new(Bytes::new())).unwrap()
    };

    // Without a token: held, no upgrade.
    let (status, _, _) = send(gate.addr, upgrade("/checkout/ws", "")).await;
    assert!(is_gate_wait(status));
    assert!(upstream.requests().is_empty());

    // With a token: the upstream sees the upgrade, answers 101, bytes flow both ways.
    let stream = TcpStream::connect(gate.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection.with_upgrades());
    let response = sender.send_request(upgrade("/checkout/ws", &token)).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(response.headers()["upgrade"], "websocket");
    let seen = upstream.last();
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert_eq!(seen.headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
    let mut io = TokioIo::new(hyper::upgrade::on(response).await.unwrap());
    io.write_all(b"ping through the tunnel").await.unwrap();
    let mut echoed = [0u8; 23];
    tokio::time::timeout(DEADLINE, io.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"ping through the tunnel");

    // An upgrade the upstream declines stays a plain response.
    let (status, headers, body) = send(gate.addr, upgrade("/no-upgrade", "")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!headers.contains_key("upgrade"));
    assert_eq!(body, "upstream saw /no-upgrade");
}

#[tokio::test]
async fn websocket_outside_rooms_passes_without_a_token() {
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    let request = "GET /chat/ws HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut byte)).await.unwrap().unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    stream.write_all(b"hello").await.unwrap();
    let mut echoed = [0u8; 5];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"hello");
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "", "").await;
    let addr = gate.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/slow", &[]).await });
    tokio::time::timeout(DEADLINE, upstream.arrived.notified()).await.expect("the slow request reached the upstream");
    gate.running.shutdown();
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "slow done");
    tokio::time::timeout(DEADLINE, gate.running.stopped()).await.expect("the server stops once drained");
    assert!(TcpStream::connect(addr).await.is_err(), "no new connections after shutdown");
}

#[tokio::test]
async fn http2_cleartext_is_served_only_when_h2c_is_on() {
    let (upstream_addr, upstream) = start_upstream().await;
    let h2_get = |addr, token: String| async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(executor(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        let request = Request::get("http://shop.test/checkout")
            .header("vestibule-token", &token)
            .body(Full::new(Bytes::new()))
            .unwrap();
        tokio::time::timeout(DEADLINE, sender.send_request(request)).await.expect("an answer or an error in time")
    };

    // By default a cleartext listener speaks HTTP/1.1 only: the HTTP/2 preface is refused.
    let gate = start_gate(upstream_addr, "", "").await;
    assert!(h2_get(gate.addr, gate.token("checkout")).await.is_err());
    assert!(upstream.requests().is_empty());

    let gate = start_gate(upstream_addr, "h2c = true", "").await;
    let response = h2_get(gate.addr, gate.token("checkout")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "upstream saw /checkout");
    assert_eq!(upstream.last().headers["host"], "shop.test");
    // HTTP/1.1 still works beside it.
    let (status, _, body) = get(gate.addr, "/product", &[]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "upstream saw /product"));
}

#[tokio::test]
async fn tls_serves_http1_and_h2_by_alpn() {
    use tokio_rustls::rustls;
    let (upstream_addr, upstream) = start_upstream().await;
    let dir = TempDir::new("tls");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let tls = format!("tls = {{ cert = {cert_path:?}, key = {key_path:?} }}");
    let gate = start_gate(upstream_addr, &tls, "").await;
    // A client that never starts its handshake must not hold up the others.
    let _stalled = TcpStream::connect(gate.addr).await.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    for (alpn, version) in [(b"h2".to_vec(), http::Version::HTTP_2), (b"http/1.1".to_vec(), http::Version::HTTP_11)] {
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(gate.addr).await.unwrap();
        let tls = connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
        let request = Request::get("https://localhost/product")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = if version == http::Version::HTTP_2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(executor(), TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            let mut request = request;
            request.headers_mut().remove("host");
            sender.send_request(request).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
            tokio::spawn(conn);
            let (mut parts, body) = request.into_parts();
            parts.uri = "/product".parse().unwrap();
            sender.send_request(Request::from_parts(parts, body)).await.unwrap()
        };
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), version);
        assert_eq!(upstream.last().headers["x-forwarded-proto"], "https");
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_head_is_cut_off() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "header_read_timeout = \"300ms\"", "").await;
    let started = tokio::time::Instant::now();
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: shop.test\r\nX-Slow: ").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await.expect("the gate closes the connection").ok();
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_off() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "body_read_timeout = \"300ms\"", "").await;
    let mut stream = TcpStream::connect(gate.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 100\r\n\r\nonly some")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut response))
        .await
        .expect("the gate gives up on the body")
        .ok();
    let text = String::from_utf8_lossy(&response);
    assert!(!text.contains("HTTP/1.1 200"), "a truncated body must not look like success: {text}");
    // The upstream never got a complete 100-byte body.
    assert!(upstream.requests().iter().all(|seen| seen.body_bytes < 100));
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let (upstream_addr, upstream) = start_upstream().await;
    let gate = start_gate(upstream_addr, "max_connections = 1", "").await;
    let addr = gate.addr;

    // The first client holds the only slot with a kept-alive connection.
    let first = TcpStream::connect(addr).await.unwrap();
    let (mut first_sender, first_connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(first)).await.unwrap();
    let first_task = tokio::spawn(first_connection);
    let request = || Request::get("/").header("host", "shop.test").body(Full::new(Bytes::new())).unwrap();
    assert_eq!(first_sender.send_request(request()).await.unwrap().status(), StatusCode::OK);

    let second = tokio::spawn(async move { get(addr, "/second", &[]).await });
    let held = tokio::time::timeout(std::time::Duration::from_millis(300), async {
        wait_for("the second request", || upstream.requests().len() > 1).await
    })
    .await;
    assert!(held.is_err(), "the second connection must wait while the first holds the only slot");

    drop(first_sender);
    first_task.await.unwrap().ok();
    let (status, _, body) = second.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "upstream saw /second");
}
