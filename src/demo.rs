//! The built-in demo shop: the upstream that `vestibule demo` guards, and a steady upstream
//! for benchmarks (`vestibule shop`). A home page, a product, and a checkout whose order
//! button ends the visitor's session with `Vestibule-Session: end`.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{self, Body};
use crate::forward::VESTIBULE_SESSION;

/// Serve the shop on `listener` until `stop` is cancelled.
pub async fn serve_shop(listener: TcpListener, stop: CancellationToken) {
    let http = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            () = stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let http = http.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let served = http.serve_connection(TokioIo::new(stream), service_fn(shop));
            tokio::select! {
                _ = served => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Bind and serve the shop in the background; returns its address.
pub async fn start_shop(addr: SocketAddr, stop: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve_shop(listener, stop));
    Ok(bound)
}

async fn shop(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if request.uri().path() == "/checkout/ping" {
        // A fixed, tiny answer for benchmarks: the same bytes whoever asks.
        let mut response = Response::new(body::full("pong\n"));
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return Ok(response);
    }
    let visitor = request
        .headers()
        .get("vestibule-visitor")
        .and_then(|v| v.to_str().ok())
        .map(|v| format!("<p class=\"who\">Admitted visitor <code>{}</code></p>", escape(v)))
        .unwrap_or_default();
    let (status, title, content, end_session) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/") => (StatusCode::OK, "Vestibule demo shop", HOME.to_owned(), false),
        (&Method::GET, "/product") => (StatusCode::OK, "The limited sneaker", PRODUCT.to_owned(), false),
        (&Method::GET, "/checkout") => (StatusCode::OK, "Checkout", format!("{visitor}{CHECKOUT}"), false),
        (&Method::POST, "/checkout/order") => (StatusCode::OK, "Order placed", ORDERED.to_owned(), true),
        _ => (StatusCode::NOT_FOUND, "Not found", "<p>No such page. <a href=\"/\">Home</a></p>".to_owned(), false),
    };
    let mut response = Response::new(body::full(page(title, &content)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    if end_session {
        response.headers_mut().insert(VESTIBULE_SESSION, HeaderValue::from_static("end"));
    }
    Ok(response)
}

fn page(title: &str, content: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>\
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:2rem auto;padding:0 1rem;line-height:1.5}}\
a.button,button{{display:inline-block;padding:.6rem 1.2rem;background:#1a5fb4;color:#fff;border:0;border-radius:.4rem;text-decoration:none;font-size:1rem}}</style>\
</head><body><h1>{title}</h1>{content}</body></html>\n"
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const HOME: &str = "<p>Welcome! Today only: a limited sneaker drop.</p>\
<p><a class=\"button\" href=\"/product\">See the sneaker</a></p>";
const PRODUCT: &str = "<p>The limited sneaker. 1,000 pairs, one per customer.</p>\
<p><a class=\"button\" href=\"/checkout\">Buy now</a></p>";
const CHECKOUT: &str = "<p>You are in. Your pair is reserved while your session lasts.</p>\
<form method=\"post\" action=\"/checkout/order\"><button type=\"submit\">Place order</button></form>";
const ORDERED: &str = "<p>Thank you! Your order is placed and your place is handed on to the next visitor.</p>\
<p><a href=\"/\">Back to the shop</a></p>";
