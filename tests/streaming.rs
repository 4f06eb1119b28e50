//! Large bodies stream through the real binary without being held in memory.

mod common;

use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use vestibule::token::{generate_key, KeyKind};

const HUNDRED_MB: u64 = 100 * 1024 * 1024;
/// How much the proxy's peak resident memory may grow while 100 MB pass through each way,
/// over its peak after start-up (a debug build's own size varies with its dependencies). A
/// build that buffered a body would grow by more than 100 MB.
const MAX_GROWTH_KB: u64 = 32 * 1024;

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_100_mb_body_streams_both_ways_in_bounded_memory() {
    let (upstream_addr, upstream) = start_upstream().await;
    let dir = TempDir::new("stream");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, generate_key(KeyKind::Eddsa)).unwrap();
    let mut text = config_text("127.0.0.1:0", upstream_addr, &key, "workers = 2", "");
    text.push_str("[log]\nformat = \"json\"\n");
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    let (proxy, addr) = spawn_proxy(&config);
    let at_start = peak_rss_kb(proxy.0.id());

    // Upload: 100 MB in chunked frames to an upstream that counts them.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let request = Request::post("/upload").header("host", "shop.test").body(Repeat { left: HUNDRED_MB }).unwrap();
    let response = tokio::time::timeout(4 * DEADLINE, sender.send_request(request)).await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, HUNDRED_MB.to_string());
    assert_eq!(upstream.last().body_bytes, HUNDRED_MB);

    // Download: 100 MB from the upstream, counted as it arrives.
    let (status, received) = {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        let request = Request::get(format!("/download/{HUNDRED_MB}"))
            .header("host", "shop.test")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let mut body = response.into_body();
        let mut received = 0u64;
        while let Some(frame) = tokio::time::timeout(DEADLINE, body.frame()).await.unwrap() {
            received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
        }
        (status, received)
    };
    assert_eq!(status, StatusCode::OK);
    assert_eq!(received, HUNDRED_MB);

    let peak = peak_rss_kb(proxy.0.id());
    let growth = peak.saturating_sub(at_start);
    assert!(growth < MAX_GROWTH_KB, "peak RSS grew by {growth} KiB (to {peak} KiB) while streaming 2 x 100 MB");
    eprintln!("proxy peak RSS while streaming 2 x 100 MB: {peak} KiB, {growth} KiB over its start-up peak");
}
