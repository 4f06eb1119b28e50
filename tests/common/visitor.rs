//! A browser-like visitor: a cookie jar, page loads, status calls, leave, and the feed.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::{send, DEADLINE};

/// A browser-like visitor with a cookie jar.
pub struct Visitor {
    pub addr: SocketAddr,
    pub jar: BTreeMap<String, String>,
}

impl Visitor {
    pub fn new(addr: SocketAddr) -> Visitor {
        Visitor { addr, jar: BTreeMap::new() }
    }

    pub fn cookie_header(&self) -> String {
        self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ")
    }

    pub fn absorb(&mut self, headers: &HeaderMap) {
        for cookie in headers.get_all("set-cookie") {
            let text = cookie.to_str().unwrap();
            let (pair, attributes) = text.split_once(';').unwrap_or((text, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attributes.contains("Max-Age=0") {
                self.jar.remove(name);
            } else {
                self.jar.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    pub async fn request(&mut self, method: &str, path: &str, accept: &str) -> (StatusCode, HeaderMap, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "shop.test")
            .header("accept", accept)
            .header("cookie", self.cookie_header())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, headers, body) = send(self.addr, request).await;
        self.absorb(&headers);
        (status, headers, body)
    }

    /// A page load, as a browser does it.
    pub async fn open(&mut self, path: &str) -> (StatusCode, HeaderMap, String) {
        self.request("GET", path, "text/html").await
    }

    pub async fn status(&mut self) -> Value {
        let (status, _, body) = self.request("GET", "/_vestibule/status?room=checkout", "application/json").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    pub async fn leave(&mut self) {
        let (status, _, body) = self.request("POST", "/_vestibule/leave?room=checkout", "application/json").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    pub async fn wait_for_status(&mut self, wanted: &str) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let status = self.status().await;
            if status["status"] == wanted {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "waited for {wanted}, still {status}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub async fn feed(&self) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
        let mut request = format!("ws://{}/_vestibule/ws?room=checkout", self.addr).into_client_request().unwrap();
        request.headers_mut().insert("cookie", self.cookie_header().parse().unwrap());
        let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (socket, response) = tokio_tungstenite::client_async(request, stream).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        socket
    }
}

pub async fn next_message(socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Value {
    loop {
        let message = tokio::time::timeout(DEADLINE, socket.next()).await.expect("a feed message in time");
        match message.expect("the feed is open").unwrap() {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// A visitor's feed socket.
pub type Feed = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Read feed messages until one of type `wanted`.
pub async fn feed_until(feed: &mut Feed, wanted: &str) -> Value {
    loop {
        let message = next_message(feed).await;
        if message["type"] == wanted {
            return message;
        }
    }
}
