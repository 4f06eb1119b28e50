//! The fast lane: plain HTTP/1.1 requests without a body that the gate forwards (admitted, or
//! outside every room) are served here, from the bytes on the wire to a bare keep-alive stream
//! to the upstream and back, by the client connection's own task with buffers it keeps.
//! Everything else (a body, an upgrade, a request the line decides, a reserved endpoint, a head
//! that is odd in any way, one hyper would refuse) is handed to hyper with the bytes read so far
//! and served there for the rest of the connection, exactly as without the lane.
//!
//! Written by hand because hyper's generic HTTP/1 server and client were most of the admitted
//! path's user-space time (docs/benchmarks.md, "Admitted path versus nginx"): a dispatcher on each side,
//! the upstream connection driven by a task of its own and fed through a channel, a second
//! parse of every head by the framing scanner. Here a request is parsed once, checked by the
//! gate's own code (the decision, the forwarding headers, the session's renewal), written
//! upstream in one write, and the answer relayed with its head and the start of its body in
//! one write. The lane takes only requests whose framing cannot be ambiguous (no
//! `Content-Length`, no `Transfer-Encoding`), so the framing scanner has nothing to judge.
//! `server.fast_lane = false` turns it off.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::error::{page_wanted, GateError};
use crate::forward::{session_ended, Upstream};
use crate::gate::{Connection, Decision, Gate, Trail, RESERVED_PREFIX, WELL_KNOWN_JWKS};
use crate::hop;
use crate::path::{canonicalize, CanonicalPath};
use crate::room::Room;
use crate::token::Admission;

/// The most request headers the lane parses; a request with more goes to hyper, which applies
/// `server.max_headers`.
const MAX_HEADERS: usize = 64;
/// The largest response head taken from the upstream, and the most fields in it.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const MAX_RESPONSE_HEADERS: usize = 128;
/// How much is read from the upstream at a time while a body is relayed.
const READ_SIZE: usize = 16 * 1024;

/// The limits a client connection's heads are held to.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

/// How the lane left a connection.
pub enum Ended<I> {
    /// Closed (by either side, a timeout, or shutdown).
    Closed,
    /// For hyper to serve from here on: the stream, with what was read of it put back.
    Handover(Rewind<I>),
}

/// Serve `io` until it closes or a request needs hyper.
pub async fn serve<I>(
    mut io: I,
    gate: &Gate,
    connection: &Connection,
    drain: &CancellationToken,
    limits: &Limits,
) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut input = BytesMut::with_capacity(4096);
    let mut buffers = Buffers::default();
    loop {
        let length = match read_head(&mut io, &mut input, drain, limits).await {
            Head::Complete(length) => length,
            Head::Closed => return close(io).await,
            Head::Handover => return Ended::Handover(Rewind::new(input.freeze(), io)),
        };
        let Some(request) = Parsed::new(&input[..length], limits.max_headers) else {
            return Ended::Handover(Rewind::new(input.freeze(), io));
        };
        let client = gate.client(&request.headers, connection);
        // Through a trusted proxy, a client at its connection cap is refused by hyper's path.
        let Ok(_slot) = gate.hold_proxied(connection, client) else {
            return Ended::Handover(Rewind::new(input.freeze(), io));
        };
        let path = gate.logs_paths().then(|| request.path.encoded.clone());
        let (admitted, mut trail) = match gate.decide(&request.headers, &request.path, client) {
            Decision::Forward(admitted) => {
                let room = admitted.as_ref().map(|(room, _)| room.clone());
                (admitted, Trail::forwarded(room, path))
            }
            Decision::Bypass(room) => (None, Trail::bypassed(&room, client, path)),
            Decision::Wait(_) => return Ended::Handover(Rewind::new(input.freeze(), io)),
        };
        input.advance(length);
        let started = Instant::now();
        let method = request.method.clone();
        let (status, keep) = match forward(&mut io, gate, connection, request, admitted.as_ref(), &mut buffers).await {
            Exchange::Answered { status, keep, took } => {
                trail.answered_after(took);
                (status, keep)
            }
            Exchange::Failed { error, wants_json, head, close } => {
                let status = error.status();
                gate.refused(&mut trail, &error, client);
                match write_error(&mut io, error, wants_json, head, close, &mut buffers.out).await {
                    Ok(keep) => (status, keep),
                    Err(_) => (status, false),
                }
            }
            Exchange::Broken(status) => {
                // Dropped, not shut down: a TLS client must not take the cut for a clean end.
                gate.record(&trail, &method, client, status, started);
                return Ended::Closed;
            }
        };
        gate.record(&trail, &method, client, status, started);
        if !keep || drain.is_cancelled() {
            return close(io).await;
        }
    }
}

/// Shut the stream down (a TLS stream says goodbye), within a second.
async fn close<I: AsyncWrite + Unpin>(mut io: I) -> Ended<I> {
    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
    Ended::Closed
}

enum Head {
    /// A head of this many bytes is at the start of the input.
    Complete(usize),
    Closed,
    Handover,
}

/// Read until the input holds a whole head, within `header_read_timeout` (which also bounds
/// how long a kept-alive connection may stay idle, as hyper's does). While no byte of the
/// next head has come, shutdown closes the connection.
async fn read_head<I>(io: &mut I, input: &mut BytesMut, drain: &CancellationToken, limits: &Limits) -> Head
where
    I: AsyncRead + Unpin,
{
    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
    loop {
        if !input.is_empty() {
            match memchr::memmem::find(input, b"\r\n\r\n") {
                Some(end) if end + 4 <= limits.max_header_bytes => return Head::Complete(end + 4),
                // Too large: hyper's to refuse.
                Some(_) => return Head::Handover,
                None if input.len() > limits.max_header_bytes => return Head::Handover,
                // A head complete without a CRLF CRLF (lines ended by a bare LF), or no HTTP/1
                // at all: hyper's to judge.
                None if !head_partial(input) => return Head::Handover,
                None => {}
            }
        }
        let idle = input.is_empty();
        input.reserve(4096);
        let read = tokio::time::timeout_at(deadline, io.read_buf(input));
        let read = if idle {
            tokio::select! {
                read = read => read,
                () = drain.cancelled() => return Head::Closed,
            }
        } else {
            read.await
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Head::Closed,
            Ok(Ok(_)) => {}
        }
    }
}

/// Whether `input` is the start of a head that is not complete yet (as httparse sees it).
fn head_partial(input: &[u8]) -> bool {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::Request::new(&mut slots).parse(input) {
        Ok(httparse::Status::Partial) => true,
        Ok(httparse::Status::Complete(_)) | Err(_) => false,
    }
}

/// A request the lane can take: GET or HEAD, HTTP/1.1, an origin-form target, one `Host`, no
/// body and no upgrade, outside the reserved endpoints.
struct Parsed {
    method: Method,
    path: CanonicalPath,
    query: Option<String>,
    headers: HeaderMap,
    /// The client asked to close the connection after this request.
    close: bool,
}

impl Parsed {
    fn new(head: &[u8], max_headers: usize) -> Option<Parsed> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        // More headers than allowed (or than parsed here): hyper answers.
        let mut request = httparse::Request::new(&mut slots[..max_headers.min(MAX_HEADERS)]);
        match request.parse(head) {
            Ok(httparse::Status::Complete(length)) if length == head.len() => {}
            _ => return None,
        }
        if request.version != Some(1) {
            return None;
        }
        let method = match request.method? {
            "GET" => Method::GET,
            "HEAD" => Method::HEAD,
            _ => return None,
        };
        // The same parser as hyper's, so that the lane takes no target hyper would refuse.
        let target: http::uri::PathAndQuery = request.path?.parse().ok()?;
        if !target.as_str().starts_with('/') {
            return None;
        }
        let path = canonicalize(target.path()).ok()?;
        if path.decoded.starts_with(RESERVED_PREFIX) || path.decoded == WELL_KNOWN_JWKS {
            return None;
        }
        let mut headers = HeaderMap::with_capacity(request.headers.len());
        let mut hosts = 0;
        for field in request.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
            let bodied = [header::CONTENT_LENGTH, header::TRANSFER_ENCODING, header::UPGRADE, header::EXPECT];
            if bodied.contains(&name) {
                return None;
            }
            hosts += usize::from(name == header::HOST);
            headers.append(name, HeaderValue::from_bytes(field.value).ok()?);
        }
        if hosts != 1 {
            return None;
        }
        let close = hop::connection_says(&headers, "close");
        Some(Parsed { method, path, query: target.query().map(str::to_owned), headers, close })
    }
}

/// Buffers a client connection keeps from one request to the next.
#[derive(Default)]
struct Buffers {
    /// What is about to be written: a request head, or a response head and the start of
    /// its body.
    out: Vec<u8>,
    /// What was read from the upstream.
    upstream: BytesMut,
}

enum Exchange {
    /// The response went to the client; `keep` when the client connection stays open.
    Answered { status: StatusCode, keep: bool, took: Duration },
    /// Nothing went to the client: it gets the gate's error answer.
    Failed { error: GateError, wants_json: bool, head: bool, close: bool },
    /// The response broke off after its head was sent: the client connection must close.
    Broken(StatusCode),
}

/// Why the upstream gave no usable response head.
#[derive(Debug)]
enum UpstreamError {
    Connect(io::Error),
    Io(io::Error),
    /// It closed the connection before a whole head.
    Closed,
    /// A head that is not HTTP/1, too large, or an answer nobody asked for (101).
    Invalid(&'static str),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(error) => write!(f, "cannot connect: {error}"),
            UpstreamError::Io(error) => write!(f, "{error}"),
            UpstreamError::Closed => f.write_str("the upstream closed the connection before answering"),
            UpstreamError::Invalid(why) => f.write_str(why),
        }
    }
}

/// How a response's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A response head from the upstream: its length in the upstream buffer, and what it says.
struct ResponseHead {
    length: usize,
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    /// The upstream connection may carry another exchange after this one.
    reusable: bool,
}

/// Forward one request and relay the answer.
async fn forward<I>(
    io: &mut I,
    gate: &Gate,
    connection: &Connection,
    request: Parsed,
    admitted: Option<&(Arc<Room>, Arc<Admission>)>,
    buffers: &mut Buffers,
) -> Exchange
where
    I: AsyncWrite + Unpin,
{
    let Parsed { method, path, query, mut headers, close } = request;
    let head = method == Method::HEAD;
    let wants_json = !page_wanted(&method, &headers);
    let failed = |error| Exchange::Failed { error, wants_json, head, close };
    let upstream = gate.upstream();
    let host = headers.get(header::HOST).cloned();
    let cookies = gate.cookies(&headers, connection);
    let visitor = admitted.map(|(room, admission)| (&**room, admission.visitor.as_str()));
    if let Err(error) = gate.upstream_headers(&upstream, &mut headers, connection, host, visitor) {
        return failed(error);
    }
    request_head(&mut buffers.out, &method, &path.encoded, query.as_deref(), &headers);

    let started = Instant::now();
    let sent = tokio::time::timeout(upstream.response_timeout(), send(&upstream, head, buffers)).await;
    let (mut stream, response) = match sent {
        Err(_elapsed) => {
            upstream.observe(None, started.elapsed());
            return failed(GateError::UpstreamTimeout);
        }
        Ok(Err(error)) => {
            upstream.observe(None, started.elapsed());
            upstream.failed(&error, matches!(error, UpstreamError::Connect(_)));
            return failed(GateError::UpstreamUnreachable);
        }
        Ok(Ok(sent)) => sent,
    };
    let took = started.elapsed();
    upstream.observe(Some(response.status), took);
    let ResponseHead { length, status, mut headers, framing, reusable } = response;
    buffers.upstream.advance(length);

    let session_ended = session_ended(&mut headers);
    // The length is written from the framing (one line, whatever the upstream's `Connection`
    // named); a HEAD or 304 answer keeps the one the upstream gave.
    let declared = headers.get(header::CONTENT_LENGTH).cloned();
    hop::strip_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    match (framing, declared) {
        (Framing::Length(length), _) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        (Framing::Empty, Some(declared)) if status != StatusCode::NO_CONTENT && !status.is_informational() => {
            headers.insert(header::CONTENT_LENGTH, declared);
        }
        _ => {}
    }
    if !headers.contains_key(header::DATE) {
        headers.insert(header::DATE, date::now());
    }
    if let Some((room, admission)) = admitted {
        gate.settle(room, admission, session_ended, cookies).await.onto(&mut headers);
    }
    response_head(&mut buffers.out, status, &headers, framing, !close);

    match relay(io, &mut stream, framing, buffers, upstream.body_timeout()).await {
        Ok(clean) => {
            if reusable && clean {
                upstream.pool().give_back_stream(stream);
            }
            Exchange::Answered { status, keep: !close, took }
        }
        Err(Relay::Unsent(error)) => {
            upstream.failed(&error, false);
            upstream.observe(None, started.elapsed());
            failed(GateError::UpstreamUnreachable)
        }
        Err(Relay::Broken(error)) => {
            tracing::debug!(%error, "response relay broke off");
            Exchange::Broken(status)
        }
    }
}

/// Send the request head in `buffers.out` on an idle stream or a new one, and read the
/// response head. When a kept stream fails before a single byte of answer (the upstream
/// closed it meanwhile, the classic keep-alive race), the request is sent once more, on a new
/// connection: a GET or HEAD without a body may be (RFC 9110 §9.2.2), and nginx does the same.
/// Never more than twice in all.
async fn send(
    upstream: &Upstream,
    head: bool,
    buffers: &mut Buffers,
) -> Result<(TcpStream, ResponseHead), UpstreamError> {
    let mut kept = upstream.pool().take_stream();
    loop {
        let retry = kept.is_some();
        let mut stream = match kept.take() {
            Some(stream) => stream,
            None => upstream.pool().connect_stream().await.map_err(UpstreamError::Connect)?,
        };
        buffers.upstream.clear();
        let mut answered = false;
        let result = match stream.write_all(&buffers.out).await {
            Ok(()) => read_response_head(&mut stream, &mut buffers.upstream, head, &mut answered).await,
            Err(error) => Err(UpstreamError::Io(error)),
        };
        match result {
            Ok(response) => return Ok((stream, response)),
            Err(UpstreamError::Closed | UpstreamError::Io(_)) if retry && !answered => {}
            Err(error) => return Err(error),
        }
    }
}

/// Read a response head, skipping interim (1xx) answers; `answered` is set by the first byte.
async fn read_response_head(
    stream: &mut TcpStream,
    buffer: &mut BytesMut,
    head: bool,
    answered: &mut bool,
) -> Result<ResponseHead, UpstreamError> {
    loop {
        if !buffer.is_empty() {
            let mut slots = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
            let mut response = httparse::Response::new(&mut slots);
            match response.parse(buffer) {
                Ok(httparse::Status::Complete(length)) => {
                    let code = response.code.unwrap_or_default();
                    if (100..200).contains(&code) && code != 101 {
                        buffer.advance(length);
                        continue;
                    }
                    return response_parts(&response, length, head);
                }
                Ok(httparse::Status::Partial) if buffer.len() <= MAX_RESPONSE_HEAD => {}
                Ok(httparse::Status::Partial) => return Err(UpstreamError::Invalid("the response head is too large")),
                Err(_) => return Err(UpstreamError::Invalid("the response head is not HTTP/1")),
            }
        }
        buffer.reserve(READ_SIZE);
        match stream.read_buf(buffer).await {
            Ok(0) => return Err(UpstreamError::Closed),
            Ok(_) => *answered = true,
            Err(error) => return Err(UpstreamError::Io(error)),
        }
    }
}

fn response_parts(
    response: &httparse::Response<'_, '_>,
    length: usize,
    head: bool,
) -> Result<ResponseHead, UpstreamError> {
    let invalid = UpstreamError::Invalid;
    let status = StatusCode::from_u16(response.code.unwrap_or_default()).map_err(|_| invalid("an invalid status"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(invalid("a 101 nobody asked for"));
    }
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for field in response.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| invalid("an invalid header name"))?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| invalid("an invalid header value"))?;
        headers.append(name, value);
    }
    let framing = framing(&headers, status, head)?;
    let reusable =
        response.version == Some(1) && !hop::connection_says(&headers, "close") && framing != Framing::UntilClose;
    Ok(ResponseHead { length, status, headers, framing, reusable })
}

/// How the body of a response with these headers is delimited (RFC 9112 §6.3); lengths that
/// disagree are an invalid response, as they are to hyper.
fn framing(headers: &HeaderMap, status: StatusCode, head: bool) -> Result<Framing, UpstreamError> {
    if head || status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) && headers.contains_key(header::CONTENT_LENGTH) {
        // RFC 9112 §6.3: a sign of response splitting, "ought to be handled as an error".
        return Err(UpstreamError::Invalid("both Transfer-Encoding and Content-Length"));
    }
    if let Some(last) = headers.get_all(header::TRANSFER_ENCODING).iter().next_back() {
        let chunked = last
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked { Framing::Chunked } else { Framing::UntilClose });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        match (crate::framing::parse_length(value.as_bytes()), length) {
            (None, _) => return Err(UpstreamError::Invalid("an invalid Content-Length")),
            (Some(n), Some(seen)) if n != seen => return Err(UpstreamError::Invalid("Content-Length values disagree")),
            (Some(n), _) => length = Some(n),
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// Write a request head: the canonical path, the client's query.
fn request_head(out: &mut Vec<u8>, method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    if let Some(query) = query {
        out.push(b'?');
        out.extend_from_slice(query.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    fields(out, headers);
}

/// Write a response head for the client.
fn response_head(out: &mut Vec<u8>, status: StatusCode, headers: &HeaderMap, framing: Framing, keep: bool) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    if matches!(framing, Framing::Chunked | Framing::UntilClose) {
        // A body that ends with the upstream's connection is chunked for the client, whose
        // connection stays open and who can tell a cut from an end.
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    }
    fields(out, headers);
}

/// Header fields and the empty line that ends a head.
fn fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How a relay failed.
enum Relay {
    /// Before anything was written to the client (the start of the body was invalid).
    Unsent(io::Error),
    /// After the head went to the client.
    Broken(io::Error),
}

/// Relay the body after the head in `buffers.out`, which goes first, in one write with the
/// start of the body. Returns whether the upstream stream ended exactly with the response.
/// Each write is flushed (a TLS stream may hold what it took), so a streamed answer goes on
/// as it comes.
async fn relay<I>(
    io: &mut I,
    stream: &mut TcpStream,
    framing: Framing,
    buffers: &mut Buffers,
    body_timeout: Duration,
) -> Result<bool, Relay>
where
    I: AsyncWrite + Unpin,
{
    let Buffers { out, upstream: buffer } = buffers;
    let mut chunks = Chunks::default();
    // How much of `buffer` belongs to this body, and whether the body is complete with it.
    let take = |buffer: &BytesMut, left: &mut u64, chunks: &mut Chunks| -> io::Result<(usize, bool)> {
        match framing {
            Framing::Empty => Ok((0, true)),
            Framing::Length(_) => {
                let used = (*left).min(buffer.len() as u64);
                *left -= used;
                Ok((used as usize, *left == 0))
            }
            Framing::Chunked => match chunks.feed(buffer)? {
                Some(end) => Ok((end, true)),
                None => Ok((buffer.len(), false)),
            },
            Framing::UntilClose => Ok((buffer.len(), false)),
        }
    };
    let mut left = match framing {
        Framing::Length(length) => length,
        _ => 0,
    };
    let (used, mut done) = take(buffer, &mut left, &mut chunks).map_err(Relay::Unsent)?;
    append(out, &buffer[..used], framing);
    buffer.advance(used);
    write(io, out).await.map_err(Relay::Broken)?;
    while !done {
        buffer.clear();
        buffer.reserve(READ_SIZE);
        let read = tokio::time::timeout(body_timeout, stream.read_buf(buffer))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the upstream's body stalled"))
            .and_then(|read| read)
            .map_err(Relay::Broken)?;
        if read == 0 {
            if framing != Framing::UntilClose {
                return Err(Relay::Broken(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed mid-body",
                )));
            }
            write(io, b"0\r\n\r\n").await.map_err(Relay::Broken)?;
            break;
        }
        let (used, complete) = take(buffer, &mut left, &mut chunks).map_err(Relay::Broken)?;
        if framing == Framing::UntilClose {
            out.clear();
            append(out, &buffer[..used], framing);
            write(io, out).await.map_err(Relay::Broken)?;
        } else {
            write(io, &buffer[..used]).await.map_err(Relay::Broken)?;
        }
        buffer.advance(used);
        done = complete;
    }
    Ok(buffer.is_empty() && framing != Framing::UntilClose)
}

/// Append body bytes to `out`, as one chunk when the body is chunked for the client here.
fn append(out: &mut Vec<u8>, data: &[u8], framing: Framing) {
    if framing != Framing::UntilClose {
        out.extend_from_slice(data);
    } else if !data.is_empty() {
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
}

async fn write<I: AsyncWrite + Unpin>(io: &mut I, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// Follows a chunked body to its end (RFC 9112 §7.1): size lines, data, trailer fields.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    /// Bytes of the current size line or trailer section, bounded.
    line: usize,
}

#[derive(Debug, Default, Clone, Copy)]
enum ChunkState {
    #[default]
    Size,
    SizeDigits(u64),
    /// After the size: an extension up to the line's end.
    Extension(u64),
    SizeEnd(u64),
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerEnd {
        empty: bool,
    },
}

/// The longest size line or trailer section followed.
const MAX_CHUNK_LINE: usize = 64 * 1024;

impl Chunks {
    /// Follow `bytes`; `Some(n)` when the body ends after its first `n` bytes.
    fn feed(&mut self, bytes: &[u8]) -> io::Result<Option<usize>> {
        let invalid = || io::Error::new(io::ErrorKind::InvalidData, "invalid chunked framing from the upstream");
        let mut at = 0;
        while at < bytes.len() {
            if let ChunkState::Data(left) = self.state {
                let used = left.min((bytes.len() - at) as u64);
                at += used as usize;
                self.state = if used == left { ChunkState::DataCr } else { ChunkState::Data(left - used) };
                continue;
            }
            let byte = bytes[at];
            at += 1;
            self.line += 1;
            if self.line > MAX_CHUNK_LINE {
                return Err(invalid());
            }
            self.state = match (self.state, byte) {
                (ChunkState::Size, b) => ChunkState::SizeDigits(hex(b).ok_or_else(invalid)?),
                (ChunkState::SizeDigits(size), b) => match hex(b) {
                    Some(digit) => ChunkState::SizeDigits(
                        size.checked_mul(16).and_then(|size| size.checked_add(digit)).ok_or_else(invalid)?,
                    ),
                    None if b == b'\r' => ChunkState::SizeEnd(size),
                    None if b == b';' || b == b' ' || b == b'\t' => ChunkState::Extension(size),
                    None => return Err(invalid()),
                },
                (ChunkState::Extension(size), b'\r') => ChunkState::SizeEnd(size),
                (ChunkState::Extension(_), b'\n') => return Err(invalid()),
                (state @ ChunkState::Extension(_), _) => state,
                (ChunkState::SizeEnd(0), b'\n') => {
                    self.line = 0;
                    ChunkState::TrailerStart
                }
                (ChunkState::SizeEnd(size), b'\n') => ChunkState::Data(size),
                (ChunkState::DataCr, b'\r') => ChunkState::DataLf,
                (ChunkState::DataLf, b'\n') => {
                    self.line = 0;
                    ChunkState::Size
                }
                (ChunkState::TrailerStart, b'\r') => ChunkState::TrailerEnd { empty: true },
                (ChunkState::TrailerStart | ChunkState::Trailer, b'\n') => return Err(invalid()),
                (ChunkState::Trailer, b'\r') => ChunkState::TrailerEnd { empty: false },
                (ChunkState::TrailerStart | ChunkState::Trailer, _) => ChunkState::Trailer,
                (ChunkState::TrailerEnd { empty: true }, b'\n') => return Ok(Some(at)),
                (ChunkState::TrailerEnd { empty: false }, b'\n') => ChunkState::TrailerStart,
                _ => return Err(invalid()),
            };
        }
        Ok(None)
    }
}

fn hex(byte: u8) -> Option<u64> {
    (byte as char).to_digit(16).map(u64::from)
}

/// Write the gate's error answer; returns whether the connection stays open.
async fn write_error<I>(
    io: &mut I,
    error: GateError,
    wants_json: bool,
    head: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> io::Result<bool>
where
    I: AsyncWrite + Unpin,
{
    let (mut parts, body) = error.into_response(wants_json).into_parts();
    let body = body.collect().await.map(|collected| collected.to_bytes()).unwrap_or_default();
    let keep = !close && !hop::connection_says(&parts.headers, "close");
    parts.headers.remove(header::CONNECTION);
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    parts.headers.insert(header::DATE, date::now());
    response_head(out, parts.status, &parts.headers, Framing::Length(body.len() as u64), keep);
    if !head {
        out.extend_from_slice(&body);
    }
    write(io, out).await?;
    Ok(keep)
}

/// The `Date` header's value, formatted once a second (as hyper and nginx do).
mod date {
    use std::cell::RefCell;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use http::HeaderValue;

    thread_local! {
        static CACHED: RefCell<(u64, Option<HeaderValue>)> = const { RefCell::new((0, None)) };
    }

    pub fn now() -> HeaderValue {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            match &cached.1 {
                Some(value) if cached.0 == second => value.clone(),
                _ => {
                    let value = HeaderValue::from_str(&httpdate::fmt_http_date(now)).expect("a date is a valid value");
                    *cached = (second, Some(value.clone()));
                    value
                }
            }
        })
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<I> Rewind<I> {
    pub fn new(prefix: Bytes, inner: I) -> Rewind<I> {
        Rewind { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Let the lane's read buffer go: an upgraded connection (a feed socket) keeps
                // this stream for hours, and would keep the buffer with it.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

crate::framing::write_through!(Rewind);

#[cfg(test)]
mod tests {
    use super::*;

    fn follow(body: &[u8], split: usize) -> io::Result<Option<usize>> {
        let mut chunks = Chunks::default();
        let mut seen = 0;
        for piece in body.chunks(split) {
            if let Some(end) = chunks.feed(piece)? {
                return Ok(Some(seen + end));
            }
            seen += piece.len();
        }
        Ok(None)
    }

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_and_trailers_end() {
        let body = b"5\r\nhello\r\n1;ext=\"x\"\r\n!\r\n0\r\nX-Trailer: 1\r\n\r\n";
        let mut stream = body.to_vec();
        stream.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for split in [1, 2, 5, 7, stream.len()] {
            assert_eq!(follow(&stream, split).unwrap(), Some(body.len()), "split {split}");
        }
        assert_eq!(follow(b"0\r\n\r\n", 1).unwrap(), Some(5));
        assert_eq!(follow(b"A\r\n0123456789\r\n0\r\n", 3).unwrap(), None, "no end yet");
    }

    #[test]
    fn broken_chunked_framing_is_refused() {
        for body in [&b"x\r\n"[..], b"5\r\nhelloX\r\n", b"5\nhello\r\n", b"fffffffffffffffff\r\n", b"0\r\nX\n"] {
            assert!(follow(body, 1).is_err(), "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn only_bodiless_get_and_head_in_origin_form_take_the_lane() {
        let lane = |head: &str| Parsed::new(head.as_bytes(), 100).is_some();
        assert!(lane("GET /checkout/a?x=1 HTTP/1.1\r\nHost: shop\r\nCookie: a=b\r\n\r\n"));
        assert!(lane("HEAD / HTTP/1.1\r\nHost: shop\r\n\r\n"));
        for head in [
            "POST / HTTP/1.1\r\nHost: shop\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: shop\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: shop\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: shop\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: shop\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET http://shop/ HTTP/1.1\r\nHost: shop\r\n\r\n",
            "GET /_vestibule/status HTTP/1.1\r\nHost: shop\r\n\r\n",
            "GET /.well-known/jwks.json HTTP/1.1\r\nHost: shop\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : shop\r\n\r\n",
        ] {
            assert!(!lane(head), "{head:?} must go to hyper");
        }
        let request = Parsed::new(b"GET /a HTTP/1.1\r\nHost: s\r\nConnection: keep-alive, Close\r\n\r\n", 100).unwrap();
        assert!(request.close);
        // Within `server.max_headers` only.
        assert!(Parsed::new(b"GET / HTTP/1.1\r\nHost: s\r\nA: 1\r\n\r\n", 2).is_some());
        assert!(Parsed::new(b"GET / HTTP/1.1\r\nHost: s\r\nA: 1\r\nB: 2\r\n\r\n", 2).is_none());
        assert!(head_partial(b"GET / HTTP/1.1\r\nHost: s\r\n"));
        assert!(!head_partial(b"GET / HTTP/1.1\nHost: s\n\r\n"), "complete with bare LFs");
        assert!(!head_partial(b"\x16\x03\x01 not http"));
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
            }
            map
        };
        let ok = StatusCode::OK;
        assert_eq!(framing(&headers(&[("content-length", "5")]), ok, false).unwrap(), Framing::Length(5));
        assert_eq!(framing(&headers(&[("content-length", "5")]), ok, true).unwrap(), Framing::Empty);
        assert_eq!(framing(&headers(&[]), StatusCode::NOT_MODIFIED, false).unwrap(), Framing::Empty);
        let chunked = headers(&[("transfer-encoding", "gzip, chunked")]);
        assert_eq!(framing(&chunked, ok, false).unwrap(), Framing::Chunked);
        let both = headers(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        assert!(framing(&both, ok, false).is_err());
        assert_eq!(framing(&headers(&[("transfer-encoding", "gzip")]), ok, false).unwrap(), Framing::UntilClose);
        assert_eq!(framing(&headers(&[]), ok, false).unwrap(), Framing::UntilClose);
        assert!(framing(&headers(&[("content-length", "5"), ("content-length", "6")]), ok, false).is_err());
        assert!(framing(&headers(&[("content-length", "+5")]), ok, false).is_err());
    }
}
