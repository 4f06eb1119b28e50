//! What attackers try against a proxy, sent over raw sockets: request smuggling variants,
//! protocol upgrades that would open a tunnel past the gate, header names that an upstream
//! could read as ours, path spellings of a protected page, cookie and query oddities, and
//! websocket abuse of the feed. Each gets a clear answer, nothing reaches the upstream that
//! should not, and the gate goes on serving.

mod common;

use common::visitor::Visitor;
use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A room that lets nobody in without a token, outside which everything passes.
async fn gate() -> (Harness, Upstream) {
    let (upstream_addr, upstream) = start_upstream().await;
    (start_gate(upstream_addr, "", "").await, upstream)
}

#[tokio::test]
async fn smuggling_variants_are_refused_and_never_reach_the_upstream() {
    let (gate, upstream) = gate().await;
    let cases = [
        ("space before the colon", "POST /s1 HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"),
        ("a coding that is not chunked, and a length", "POST /s2 HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: xchunked\r\nContent-Length: 3\r\n\r\nabc"),
        ("two transfer-encodings", "POST /s3 HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n"),
        ("a list of lengths", "POST /s4 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3, 3\r\n\r\nabc"),
        ("a length in hex", "POST /s5 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0x3\r\n\r\nabc"),
        ("a tab and a length", "POST /s6 HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding:\tchunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"),
        ("CL and TE in HTTP/1.0", "POST /s8 HTTP/1.0\r\nHost: a.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("a folded header", "POST /s9 HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: identity\r\n chunked\r\nContent-Length: 3\r\n\r\nabc"),
        ("chunked, then not", "POST /s10 HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
        ("a NUL in a header", "GET /s11 HTTP/1.1\r\nHost: a.test\r\nX-Odd: a\0b\r\n\r\n"),
        ("a request line with two spaces", "GET  /s12 HTTP/1.1\r\nHost: a.test\r\n\r\n"),
    ];
    for (name, request) in cases {
        let (status, text) = raw(gate.addr, request.as_bytes()).await;
        assert!((400..500).contains(&status), "{name}: {text}");
    }
    assert!(
        upstream.requests().is_empty(),
        "{:?}",
        upstream.requests().iter().map(|s| s.uri.to_string()).collect::<Vec<_>>()
    );
    // A chunk size that overflows is found only in the body, once the request is on its way:
    // the body breaks off, the upstream never gets a byte of it, the connection closes.
    let overflow =
        "POST /s7 HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nx\r\n0\r\n\r\n\
                    GET /after HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let (status, text) = raw(gate.addr, overflow.as_bytes()).await;
    assert!(status >= 400, "{text}");
    assert!(upstream.requests().iter().all(|seen| seen.body_bytes == 0 && seen.uri.path() != "/after"));
    // The gate goes on serving.
    assert_eq!(get(gate.addr, "/still-here", &[]).await.0, StatusCode::OK);
}

#[tokio::test]
async fn an_h2c_upgrade_never_opens_a_tunnel_past_the_gate() {
    let (gate, upstream) = gate().await;
    // Outside any room, an upstream that answers 101 to any upgrade: an HTTP/2 tunnel would
    // carry requests for any path (the room's too) straight to it.
    for upgrade in ["h2c", "H2C", "h2c, websocket", "websocket, h2c", "foo"] {
        let request = format!(
            "GET /chat/ws HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\n\
             HTTP2-Settings: AAMAAABkAAQAAP__\r\nConnection: close\r\n\r\n"
        );
        let (status, text) = raw(gate.addr, request.as_bytes()).await;
        assert_ne!(status, 101, "Upgrade: {upgrade} opened a tunnel: {text}");
    }
    assert!(
        upstream.requests().iter().all(|seen| !seen.headers.contains_key("upgrade")),
        "an upgrade reached the upstream"
    );
    // A websocket upgrade still works.
    let request = "GET /chat/ws HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut head)).await.unwrap().unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
}

#[tokio::test]
async fn header_names_an_upstream_could_read_as_ours_are_dropped() {
    let (gate, upstream) = gate().await;
    // A CGI-style upstream reads X_Forwarded_For and X-Forwarded-For alike (HTTP_X_FORWARDED_FOR).
    let request = "GET /page HTTP/1.1\r\nHost: shop.test\r\nX_Forwarded_For: 6.6.6.6\r\nX_FORWARDED_PROTO: https\r\n\
                   Vestibule_Room: other\r\nVestibule_Visitor: someone\r\nForwarded_x: for=6.6.6.6\r\n\
                   X_Kept_Header: 1\r\nConnection: close\r\n\r\n";
    let (status, _) = raw(gate.addr, request.as_bytes()).await;
    assert_eq!(status, 200);
    let seen = upstream.last();
    for name in ["x_forwarded_for", "x_forwarded_proto", "vestibule_room", "vestibule_visitor"] {
        assert!(!seen.headers.contains_key(name), "{name} reached the upstream");
    }
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x_kept_header"], "1", "other names with underscores pass");
}

#[tokio::test]
async fn every_spelling_of_a_protected_path_is_held() {
    let (gate, upstream) = gate().await;
    for path in [
        "/checkout",
        "/CHECKOUT",
        "/%63heckout",
        "/%63%68%65%63%6b%6f%75%74",
        "//checkout",
        "/x/../checkout",
        "/./checkout",
        "/checkout;a=b",
        "/.%2e/checkout",
        "/%2e%2e/checkout",
        "/%2fcheckout",
        "/x/%2e%2e%2fcheckout",
        "/checkout/",
        "/checkout/../checkout/pay",
        "/api/cart/../cart/checkout",
        "/checkout%",
    ] {
        let (status, _, body) = get(gate.addr, path, &[]).await;
        assert!(is_gate_wait(status), "{path}: {status} {body}");
    }
    // A backslash on the request line counts as a slash: held too (the waiting page).
    let (_, text) = raw(gate.addr, b"GET /\\checkout HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n").await;
    assert!(!text.contains("upstream saw"), "{text}");
    // What cannot be read is refused.
    for path in ["/checkout%00", "/check%ffout"] {
        let (status, _, _) = get(gate.addr, path, &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
    }
    assert!(
        upstream.requests().is_empty(),
        "{:?}",
        upstream.requests().iter().map(|s| s.uri.to_string()).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn cookie_and_query_oddities_get_clear_answers() {
    let (gate, upstream) = gate().await;
    let many: String = (0..300).map(|n| format!("c{n}=v{n}")).collect::<Vec<_>>().join("; ");
    let cases: Vec<(&str, String)> = vec![
        ("many cookies", many),
        ("a name with no value", "vestibule-token-checkout".into()),
        ("an empty value", "vestibule-token-checkout=".into()),
        ("a quoted value", "vestibule-token-checkout=\"abc.def.ghi\"".into()),
        ("a name with spaces", "vestibule-token-checkout =abc".into()),
        ("semicolons only", ";;;;".into()),
        ("a huge garbage token", format!("vestibule-token-checkout={}", "A".repeat(12_000))),
    ];
    for (name, cookie) in cases {
        let (status, _, _) = get(gate.addr, "/checkout", &[("cookie", &cookie)]).await;
        assert!(is_gate_wait(status), "{name}: {status}");
    }
    for query in
        ["", "?room=", "?room=%ff", "?room=nope", "?room=checkout&room=other", &format!("?room={}", "x".repeat(5_000))]
    {
        let (status, _, _) = get(gate.addr, &format!("/_vestibule/status{query}"), &[]).await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND || status == StatusCode::OK,
            "{query}: {status}"
        );
    }
    // A reserved path spelled otherwise is the same reserved path, never the upstream's.
    let (status, _, _) = get(gate.addr, "/_vestibule/x/../status?room=checkout", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = get(gate.addr, "/_vestibule/nothing", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn feed_abuse_closes_the_socket_and_frees_its_place() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (upstream_addr, _upstream) = start_upstream().await;
    let gate = start_room(upstream_addr, "admit_per_minute = 60\nmax_active = 1\n").await;
    Visitor::new(gate.addr).open("/checkout").await; // takes the place
    let mut waiter = Visitor::new(gate.addr);
    waiter.open("/checkout").await;

    // An oversized frame: the socket is closed.
    let mut feed = waiter.feed().await;
    feed.send(Message::text("x".repeat(64 * 1024))).await.unwrap();
    let closed = tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(message)) = feed.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the oversized frame did not close the socket");
    // A flood of small messages and pings: answered or ignored, the socket lives on.
    let mut feed = waiter.feed().await;
    for n in 0..2_000 {
        let message = if n % 2 == 0 { Message::Ping(vec![1, 2, 3].into()) } else { Message::text("hello") };
        feed.send(message).await.unwrap();
    }
    feed.send(Message::text("still there?")).await.unwrap();
    drop(feed);
    // Every socket's place under the caps is given back.
    wait_for("the feed sockets closed", || gate.running.gate().open_feeds() == 0).await;
    assert_eq!(waiter.status().await["status"], "waiting");
}
