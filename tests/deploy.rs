//! What the ways to run vestibule (deploy/) depend on, proven here:
//! - the upstream as a service name: followed when its address moves, and a stalled name
//!   server never holds up requests on pooled connections;
//! - the compose topology's own configuration files (deploy/compose/), run natively: Redis, two
//!   instances, nginx as the load balancer and the demo shop, with visitors through it;
//! - the container image (deploy/Dockerfile) built with podman, its binary run from the
//!   mounted image;
//! - every deploy file passes its checker: kustomize and the Kubernetes schemas, the compose
//!   specification, `systemd-analyze verify` and `security`.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vestibule::config::Config;
use vestibule::server;
use vestibule::token::{generate_key, KeyKind};

use common::dns::NameServer;
use common::{get, TempDir, DEADLINE};

/// An upstream that answers every request with its own name; with `close`, it closes each
/// connection after answering, so that every request through the proxy opens a new one.
struct Named {
    stop: CancellationToken,
}

impl Named {
    async fn start(addr: SocketAddr, name: &'static str, close: bool) -> Named {
        let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok((stream, _)) => stream, Err(_) => continue },
                };
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_request: Request<hyper::body::Incoming>| async move {
                        let mut response = Response::new(Full::new(Bytes::from(name)));
                        if close {
                            response.headers_mut().insert(http::header::CONNECTION, "close".parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    });
                    let connection =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = stopped.cancelled() => {}
                        _ = connection => {}
                    }
                });
            }
        });
        Named { stop }
    }

    /// Stop listening and close every connection, as a pod that went away.
    fn stop(&self) {
        self.stop.cancel();
    }
}

/// A gate with no room in front of `http://shop.test:{port}`, asking `dns` for the name.
async fn gate_for_name(port: u16, dns: &NameServer, upstream_extra: &str) -> (server::Running, TempDir) {
    let dir = TempDir::new("dns");
    let key = dir.path().join("signing.pem");
    std::fs::write(&key, generate_key(KeyKind::Eddsa)).unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n[upstream]\nurl = \"http://shop.test:{port}\"\n\
         nameservers = [\"{}\"]\n{upstream_extra}\n[tokens]\nsigning_key = {key:?}\n",
        dns.addr
    );
    let config = Config::parse(&text, "test.toml", dir.path()).unwrap();
    (server::start(&config).await.unwrap(), dir)
}

/// A free port on both 127.0.0.1 and 127.0.0.2 (two "pods" of one service).
async fn port_on_both() -> u16 {
    loop {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.2", port)).is_ok() {
            return port;
        }
    }
}

#[tokio::test]
async fn an_upstream_name_is_followed_when_its_address_moves() {
    let port = port_on_both().await;
    let pod_a = Named::start(SocketAddr::from(([127, 0, 0, 1], port)), "pod a", true).await;
    let _pod_b = Named::start(SocketAddr::from(([127, 0, 0, 2], port)), "pod b", true).await;
    let dns = NameServer::start(Ipv4Addr::new(127, 0, 0, 1), 2).await;
    let (running, _dir) = gate_for_name(port, &dns, "").await;

    // Every request opens a new connection (the upstream closes each), and within the TTL the
    // answer kept is used: one question for many connections.
    for _ in 0..5 {
        let (status, _, body) = get(running.addr, "/", &[]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "pod a"));
    }
    assert_eq!(dns.answered(), 1, "connections within the TTL reuse the answer kept");

    // The name moves: once the TTL has run out, new connections go to the new address, and
    // nothing fails on the way.
    dns.set_address(Ipv4Addr::new(127, 0, 0, 2));
    let moved = Instant::now();
    loop {
        let (status, _, body) = get(running.addr, "/", &[]).await;
        assert_eq!(status, StatusCode::OK, "no request fails while the name moves: {body}");
        if body == "pod b" {
            break;
        }
        assert!(moved.elapsed() < Duration::from_secs(2) + DEADLINE / 2, "the new address was never used");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(moved.elapsed() >= Duration::from_millis(500), "the answer was kept for its TTL, not asked each time");

    // A long TTL, and the pod behind it goes away: one failed connection makes the proxy ask
    // again at once rather than keep the dead address for the rest of the hour.
    dns.set_ttl(3600);
    dns.set_address(Ipv4Addr::new(127, 0, 0, 1));
    let deadline = Instant::now() + DEADLINE;
    while get(running.addr, "/", &[]).await.2 != "pod a" {
        assert!(Instant::now() < deadline, "the name never came back to pod a");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dns.set_address(Ipv4Addr::new(127, 0, 0, 2));
    pod_a.stop();
    let mut failed = 0;
    loop {
        let (status, _, body) = get(running.addr, "/", &[]).await;
        if body == "pod b" {
            break;
        }
        assert_eq!(status, StatusCode::BAD_GATEWAY, "a dead address is a 502: {body}");
        failed += 1;
        assert!(failed <= 1, "after a failed connection the name is asked again, not kept for its TTL");
    }
    running.shutdown();
}

#[tokio::test]
async fn a_stalled_name_server_does_not_hold_up_requests_on_pooled_connections() {
    let port = port_on_both().await;
    let _pod = Named::start(SocketAddr::from(([127, 0, 0, 1], port)), "pod a", false).await;
    // TTL 0: nothing is kept, so any request that needed the name would ask for it.
    let dns = NameServer::start(Ipv4Addr::new(127, 0, 0, 1), 0).await;
    // A long connect timeout: a request that waited for the stalled server would wait 30 s.
    let (running, _dir) = gate_for_name(port, &dns, "connect_timeout = \"30s\"").await;
    let fetch = || async {
        let (status, _, body) = get(running.addr, "/", &[]).await;
        (status, body)
    };
    assert_eq!(fetch().await, (StatusCode::OK, "pod a".to_owned()));

    dns.stall();
    let started = Instant::now();
    for _ in 0..200 {
        assert_eq!(fetch().await, (StatusCode::OK, "pod a".to_owned()));
    }
    assert_eq!(dns.unanswered(), 0, "requests on the pooled connection asked for no name");
    assert!(started.elapsed() < Duration::from_secs(5), "200 requests took {:?}", started.elapsed());
    running.shutdown();
}
