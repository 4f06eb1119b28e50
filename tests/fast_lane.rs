//! The fast lane (`src/lane.rs`) against an upstream written on bare sockets that answers in
//! every framing HTTP/1.1 allows, each answer compared with what hyper's path makes of it
//! (`server.fast_lane = false`); and pipelined requests that switch from the lane to hyper
//! mid-connection, answered in order.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The upstream's answer for each path, written as is.
fn answer(path: &str) -> (&'static [u8], bool) {
    match path {
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n",
            false,
        ),
        // Until the upstream closes: the client connection must close after it too.
        "/until-close" => (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nread me to the end", true),
        "/interim" => (b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
        // Both framings: a sign of response splitting (RFC 9112 §6.3). hyper's client takes the
        // length (and answers "hel"); the lane refuses it, as the RFC says it ought to be.
        "/both" => (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false),
        "/lengths-disagree" => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nokk", true),
        "/hop" => (
            b"HTTP/1.1 200 OK\r\nconnection: x-secret\r\nx-secret: 1\r\nkeep-alive: timeout=5\r\nvestibule-session: end\r\nx-kept: 1\r\ncontent-length: 3\r\n\r\nhop",
            false,
        ),
        "/empty" => (b"HTTP/1.1 204 No Content\r\nx-kept: 1\r\n\r\n", false),
        // A length the `Connection` header names (so stripped as hop-by-hop): the client must
        // still learn where the body ends.
        "/named-length" => (b"HTTP/1.1 200 OK\r\nconnection: content-length\r\ncontent-length: 2\r\n\r\nok", false),
        "/not-http" => (b"SSH-2.0-OpenSSH\r\n\r\n", true),
        _ => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
    }
}

type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// Start the upstream; it records each request's path and body, in order. Besides the
/// answers above: `/slow` answers `ok` after 100 ms; `/vanish` closes the connection without
/// a word; `/head-stray` answers a HEAD, then 50 ms later sends a whole second response nobody
/// asked for (the kind of stray bytes a buggy upstream sends after a HEAD).
async fn upstream() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(serve(stream, record.clone()));
        }
    });
    (addr, seen)
}

async fn serve(mut stream: TcpStream, seen: Seen) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(head) = read_head(&mut stream, &mut buffer).await else { return };
        let head = head.to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map_or(0, |value| value.trim().parse().unwrap());
        while buffer.len() < length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buffer.drain(..length).collect();
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        seen.lock().unwrap().push((path.clone(), String::from_utf8_lossy(&body).into_owned()));
        match path.as_str() {
            "/vanish" => return,
            "/slow" => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            "/head-stray" => {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n").await;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nPOISON").await;
                seen.lock().unwrap().push(("stray sent".into(), String::new()));
                continue;
            }
            _ => {}
        }
        let (bytes, close) = answer(&path);
        if stream.write_all(bytes).await.is_err() || close {
            return;
        }
    }
}

#[tokio::test]
async fn every_response_framing_comes_through_the_lane_as_through_hyper() {
    let (addr, _) = upstream().await;
    let lane = start_gate(addr, "", "").await;
    let hyper = start_gate(addr, "fast_lane = false", "").await;
    let paths =
        ["/chunked", "/until-close", "/interim", "/lengths-disagree", "/hop", "/empty", "/not-http", "/named-length"];
    for path in paths {
        let (status, headers, body) = get(lane.addr, path, &[]).await;
        let (hyper_status, hyper_headers, hyper_body) = get(hyper.addr, path, &[]).await;
        assert_eq!((status, &body), (hyper_status, &hyper_body), "{path}");
        // hyper's path chunks a body whose length the `Connection` header named; the lane keeps it.
        let length = if path == "/named-length" { "x-kept" } else { "content-length" };
        for name in [length, "x-secret", "keep-alive", "vestibule-session", "x-kept", "link"] {
            assert_eq!(headers.get(name), hyper_headers.get(name), "{path}: {name}");
        }
    }
    let (status, headers, body) = get(lane.addr, "/chunked", &[]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hello world"));
    assert!(headers.get("content-length").is_none());
    assert_eq!(get(lane.addr, "/both", &[]).await.0, StatusCode::BAD_GATEWAY);
    let (status, headers, body) = get(lane.addr, "/hop", &[]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "hop"));
    assert!(headers.get("x-secret").is_none() && headers.get("vestibule-session").is_none());
    assert_eq!(headers["x-kept"], "1");
    assert_eq!(get(lane.addr, "/until-close", &[]).await.2, "read me to the end");
    let (status, headers, body) = get(lane.addr, "/named-length", &[]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(headers["content-length"], "2");
    assert!(headers.contains_key("date"), "a Date, as hyper's path gives");
    assert_eq!(get(lane.addr, "/lengths-disagree", &[]).await.0, StatusCode::BAD_GATEWAY);
    assert_eq!(get(lane.addr, "/not-http", &[]).await.0, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn pipelined_requests_switch_from_the_lane_to_hyper_in_order() {
    let (addr, seen) = upstream().await;
    let gate = start_gate(addr, "", "").await;
    let pipelined = b"GET /one HTTP/1.1\r\nHost: shop.test\r\n\r\n\
GET /chunked HTTP/1.1\r\nHost: shop.test\r\n\r\n\
POST /two HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 4\r\n\r\nbody\
GET /three HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n";
    let (status, text) = raw(gate.addr, pipelined).await;
    assert_eq!(status, 200);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 4, "four answers: {text}");
    let paths: Vec<(String, String)> = seen.lock().unwrap().clone();
    let expected = [("/one", ""), ("/chunked", ""), ("/two", "body"), ("/three", "")];
    let expected: Vec<(String, String)> = expected.iter().map(|(p, b)| (p.to_string(), b.to_string())).collect();
    assert_eq!(paths, expected);
    assert!(text.contains("hello world") || text.contains("5\r\nhello\r\n"), "{text}");
}

#[tokio::test]
async fn the_lane_answers_an_unreachable_upstream_with_502_and_keeps_the_connection() {
    let gate = start_gate(dead_address().await, "", "").await;
    let (status, text) = raw(
        gate.addr,
        b"GET /a HTTP/1.1\r\nHost: shop.test\r\n\r\nHEAD /b HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 502);
    assert_eq!(text.matches("HTTP/1.1 502 Bad Gateway").count(), 2, "{text}");
    // The HEAD's answer has a length but no body: the text ends with its head.
    assert!(text.ends_with("\r\n\r\n"), "{text:?}");
}

#[tokio::test]
async fn a_kept_stream_that_sent_stray_bytes_is_never_reused() {
    let (addr, seen) = upstream().await;
    let gate = start_gate(addr, "", "").await;
    let head = hyper::Request::head("/head-stray").header("host", "shop.test").body(Default::default()).unwrap();
    assert_eq!(send(gate.addr, head).await.0, StatusCode::OK);
    wait_for("the stray response", || seen.lock().unwrap().iter().any(|(what, _)| what == "stray sent")).await;
    for _ in 0..3 {
        let (status, _, body) = get(gate.addr, "/after", &[]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"), "another visitor got the stray answer");
    }
}

#[tokio::test]
async fn a_request_is_sent_at_most_twice_when_kept_streams_fail() {
    let (addr, seen) = upstream().await;
    let gate = start_gate(addr, "", "").await;
    // Four streams kept idle: four requests at once.
    let slow: Vec<_> = (0..4).map(|_| tokio::spawn(get(gate.addr, "/slow", &[]))).collect();
    for request in slow {
        assert_eq!(request.await.unwrap().0, StatusCode::OK);
    }
    // The upstream takes the request and closes without an answer, on every stream.
    assert_eq!(get(gate.addr, "/vanish", &[]).await.0, StatusCode::BAD_GATEWAY);
    let sent = seen.lock().unwrap().iter().filter(|(path, _)| path == "/vanish").count();
    assert_eq!(sent, 2, "once on a kept stream, once more on a new one, never more");
}
