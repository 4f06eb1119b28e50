//! Ambiguous HTTP/1 framing, seen on the wire.
//!
//! hyper resolves a request that carries both `Content-Length` and `Transfer-Encoding` on its
//! own (the transfer coding wins, the length is dropped, the connection closes afterwards), and
//! folds repeated equal `Content-Length` lines into one, so the service never sees that the
//! request was ambiguous. The security rules (docs/design.md) ask for such requests to be refused with 400, so this
//! module watches the bytes hyper reads: it finds each request head with `httparse`, follows
//! the body framing to the next head, and queues one verdict per head, in order. The gate
//! takes the verdict of each HTTP/1 request as it handles it.
//!
//! Written by hand because no crate exposes what the parser threw away. It fails closed: once
//! it cannot follow the stream (a framing it does not understand, a head too large, more
//! pipelined heads than it keeps verdicts for), every later HTTP/1 request on the connection
//! gets no verdict, and the gate refuses it and closes the connection. (After an HTTP/2
//! preface or an upgrade, hyper reads no more HTTP/1 requests on the connection anyway.)

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Most verdicts kept for heads not yet handled: hyper handles heads one at a time, so only
/// pipelined ones wait here.
const MAX_PENDING_VERDICTS: usize = 64;

/// What the scanner saw of a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// One clear framing.
    Clear,
    /// Framing that two parsers could read two ways (CL+TE, repeated or odd lengths).
    Ambiguous,
    /// The scanner could not follow the stream to this head: it cannot be judged.
    Unknown,
}

/// Verdicts for the request heads of one connection, oldest first.
#[derive(Debug, Default, Clone)]
pub struct Verdicts(Arc<Mutex<VecDeque<bool>>>);

impl Verdicts {
    /// The verdict on the next request head of this connection.
    pub fn next(&self) -> Verdict {
        match self.0.lock().map(|mut queue| queue.pop_front()) {
            Ok(Some(false)) => Verdict::Clear,
            Ok(Some(true)) => Verdict::Ambiguous,
            _ => Verdict::Unknown,
        }
    }

    /// Mark the newest verdict not yet taken ambiguous: its body turned out unreadable. False
    /// when every verdict was taken (its request is being served already).
    fn taint_newest(&self) -> bool {
        match self.0.lock() {
            Ok(mut queue) => queue.back_mut().map(|newest| *newest = true).is_some(),
            Err(_) => false,
        }
    }

    /// Queue a verdict; false when the queue is full (the scanner then stops judging).
    fn push(&self, ambiguous: bool) -> bool {
        match self.0.lock() {
            Ok(mut queue) if queue.len() < MAX_PENDING_VERDICTS => {
                queue.push_back(ambiguous);
                true
            }
            _ => false,
        }
    }
}

enum State {
    Head(Vec<u8>),
    Body(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    Trailers(Vec<u8>),
    Stopped,
}

/// Follows request framing through a byte stream.
pub struct Scanner {
    state: State,
    /// A request whose body cannot be followed (a chunk size past 63 bits) is being served
    /// already: the connection is broken off rather than let the body go on.
    broken: bool,
    max_head: usize,
    max_headers: usize,
    verdicts: Verdicts,
}

impl Scanner {
    pub fn new(max_head: usize, max_headers: usize, verdicts: Verdicts) -> Scanner {
        Scanner { state: State::Head(Vec::new()), broken: false, max_head, max_headers, verdicts }
    }

    /// Observe the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let used = match &mut self.state {
                State::Stopped => return,
                State::Head(buf) if buf.is_empty() => {
                    // The common case: a whole head in one read, parsed where it lies.
                    match memchr::memmem::find(bytes, b"\r\n\r\n") {
                        Some(end) => {
                            self.state = self.after_head(&bytes[..end + 4]);
                            end + 4
                        }
                        None => {
                            buf.extend_from_slice(bytes);
                            bytes.len()
                        }
                    }
                }
                State::Head(buf) => {
                    let (used, head) = take_until(buf, bytes, b"\r\n\r\n");
                    if let Some(head) = head {
                        self.state = self.after_head(&head);
                    } else if buf.len() > self.max_head {
                        self.state = State::Stopped;
                    }
                    used
                }
                State::Body(left) | State::ChunkData(left) => {
                    let used = (*left).min(bytes.len() as u64);
                    *left -= used;
                    if *left == 0 {
                        // A body is followed by the next head, a chunk by the next size line.
                        let body = matches!(self.state, State::Body(_));
                        self.state = if body { State::Head(Vec::new()) } else { State::ChunkSize(Vec::new()) };
                    }
                    used as usize
                }
                State::ChunkSize(buf) => {
                    let (used, line) = take_until(buf, bytes, b"\r\n");
                    if let Some(line) = line {
                        self.state = match chunk_size(&line) {
                            Some(0) => State::Trailers(Vec::new()),
                            Some(size) => State::ChunkData(size + 2),
                            None => {
                                // Its request is refused if not yet served, else cut off.
                                self.broken = !self.verdicts.taint_newest();
                                State::Stopped
                            }
                        };
                    } else if buf.len() > 4096 {
                        self.state = State::Stopped;
                    }
                    used
                }
                State::Trailers(buf) => {
                    // Either an empty line right away, or trailer fields up to an empty line.
                    buf.extend_from_slice(bytes);
                    let end = if buf.starts_with(b"\r\n") {
                        Some(2)
                    } else {
                        memchr::memmem::find(buf, b"\r\n\r\n").map(|p| p + 4)
                    };
                    match end {
                        Some(end) => {
                            let used = bytes.len() - (buf.len() - end);
                            self.state = State::Head(Vec::new());
                            used
                        }
                        None if buf.len() > self.max_head => {
                            self.state = State::Stopped;
                            bytes.len()
                        }
                        None => bytes.len(),
                    }
                }
            };
            bytes = &bytes[used..];
        }
    }

    fn after_head(&self, head: &[u8]) -> State {
        // Most heads fit the array on the stack; hyper enforces `max_headers` itself.
        let mut stack = [httparse::EMPTY_HEADER; 64];
        let mut heap;
        let headers: &mut [httparse::Header<'_>] = if self.max_headers <= stack.len() {
            &mut stack[..self.max_headers]
        } else {
            heap = vec![httparse::EMPTY_HEADER; self.max_headers];
            &mut heap
        };
        let mut request = httparse::Request::new(headers);
        match request.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            // Not HTTP/1 (an HTTP/2 preface, a tunnel) or too many headers: hyper decides.
            _ => return State::Stopped,
        }
        let mut lengths = 0;
        let mut length = None;
        let mut chunked = false;
        let mut transfer_encoding = false;
        let mut upgrade = false;
        for header in request.headers.iter() {
            upgrade |= header.name.eq_ignore_ascii_case("upgrade");
            if header.name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                length = parse_length(header.value);
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = true;
                let value = header.value.trim_ascii_end();
                chunked = value.len() >= 7 && value[value.len() - 7..].eq_ignore_ascii_case(b"chunked");
            }
        }
        // hyper also ends lines with a bare LF: a head that has one may have ended earlier for
        // it than for this scanner, so it cannot be judged.
        let bare_lf = head.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'));
        let ambiguous =
            (transfer_encoding && lengths > 0) || lengths > 1 || (lengths == 1 && length.is_none()) || bare_lf;
        if !self.verdicts.push(ambiguous) || bare_lf {
            return State::Stopped; // no room for more verdicts: the heads after get none
        }
        if upgrade {
            // After a websocket's 101 the bytes are frames, not heads: nothing to judge nor
            // keep. Should the upgrade be refused, a next request gets no verdict (400, closed).
            return State::Stopped;
        }
        if transfer_encoding {
            if chunked {
                State::ChunkSize(Vec::new())
            } else {
                State::Stopped
            }
        } else {
            match (lengths, length) {
                (0, _) | (_, Some(0)) => State::Head(Vec::new()),
                (_, Some(n)) => State::Body(n),
                (_, None) => State::Stopped,
            }
        }
    }
}

/// Append `bytes` to `buf` until `delimiter` ends it; returns how many bytes were used and,
/// once complete, the whole piece (delimiter included).
fn take_until(buf: &mut Vec<u8>, bytes: &[u8], delimiter: &[u8]) -> (usize, Option<Vec<u8>>) {
    let start = buf.len().saturating_sub(delimiter.len() - 1);
    buf.extend_from_slice(bytes);
    match memchr::memmem::find(&buf[start..], delimiter) {
        Some(pos) => {
            let end = start + pos + delimiter.len();
            let surplus = buf.len() - end;
            buf.truncate(end);
            (bytes.len() - surplus, Some(std::mem::take(buf)))
        }
        None => (bytes.len(), None),
    }
}

/// A `Content-Length` value: digits only (no sign, no list, no spaces inside).
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// A chunk size line's size: hex digits that fit in 63 bits (as nginx, which refuses larger
/// with 400), ended by CRLF with no bare LF before it.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n")?;
    if line.contains(&b'\n') {
        return None;
    }
    let hex = line.split(|&b| b == b';').next()?;
    let hex = std::str::from_utf8(hex).ok()?.trim();
    u64::from_str_radix(hex, 16).ok().filter(|&size| size <= i64::MAX as u64)
}

/// A client stream whose incoming bytes pass through a [`Scanner`].
pub struct ScannedIo<T> {
    inner: T,
    scanner: Scanner,
}

impl<T> ScannedIo<T> {
    pub fn new(inner: T, scanner: Scanner) -> Self {
        ScannedIo { inner, scanner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ScannedIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.scanner.feed(&buf.filled()[before..]);
            if this.scanner.broken {
                buf.set_filled(before);
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "a chunk size past 63 bits")));
            }
        }
        result
    }
}

/// `AsyncWrite` for a stream wrapper (`$wrapper<T>` with a field `inner: T`) that only
/// watches or rewinds what is read: writes go straight through.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<T> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                data: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }
    };
}
pub(crate) use write_through;

write_through!(ScannedIo);

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts_of(stream: &[u8], split: usize) -> Vec<bool> {
        let verdicts = Verdicts::default();
        let mut scanner = Scanner::new(16 * 1024, 100, verdicts.clone());
        // Fed in pieces of `split` bytes, as a socket would deliver them.
        for piece in stream.chunks(split) {
            scanner.feed(piece);
        }
        let queue = verdicts.0.lock().unwrap();
        queue.iter().copied().collect()
    }

    #[test]
    fn heads_it_could_not_follow_get_no_verdict() {
        let verdicts = Verdicts::default();
        let mut scanner = Scanner::new(16 * 1024, 100, verdicts.clone());
        let mut stream = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n".repeat(MAX_PENDING_VERDICTS + 6);
        stream.extend_from_slice(
            b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        scanner.feed(&stream);
        let seen: Vec<Verdict> = (0..MAX_PENDING_VERDICTS + 7).map(|_| verdicts.next()).collect();
        assert!(seen[..MAX_PENDING_VERDICTS].iter().all(|v| *v == Verdict::Clear));
        assert!(seen[MAX_PENDING_VERDICTS..].iter().all(|v| *v == Verdict::Unknown), "{seen:?}");
        // Framing it does not follow (a transfer coding that is not chunked): the same.
        let verdicts = Verdicts::default();
        let mut scanner = Scanner::new(16 * 1024, 100, verdicts.clone());
        scanner.feed(b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nxyzGET /b HTTP/1.1\r\n\r\n");
        assert_eq!((verdicts.next(), verdicts.next()), (Verdict::Clear, Verdict::Unknown));
    }

    #[test]
    fn finds_every_head_through_bodies_of_both_kinds() {
        let stream = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
GET /e HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n";
        for split in [1, 3, 7, stream.len()] {
            assert_eq!(verdicts_of(stream, split), [false, false, false, true, true], "split {split}");
        }
    }

    #[test]
    fn body_bytes_that_look_like_a_head_are_not_a_head() {
        let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        stream.extend_from_slice(body);
        assert_eq!(verdicts_of(&stream, 5), [false]);
    }

    #[test]
    fn trailers_and_odd_lengths() {
        let stream = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;ext=1\r\nx\r\n0\r\nX-T: 1\r\n\r\n\
POST /b HTTP/1.1\r\nContent-Length: +3\r\n\r\n";
        assert_eq!(verdicts_of(stream, 2), [false, true]);
    }

    #[test]
    fn a_chunk_size_past_63_bits_taints_its_request() {
        // The size in the same read as its head: the request is refused before it is served.
        let stream = b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc";
        assert_eq!(verdicts_of(stream, stream.len()), [true]);
        assert_eq!(
            verdicts_of(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8000000000000000\r\n", 9),
            [true]
        );
        assert_eq!(
            verdicts_of(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n7fffffffffffffff\r\n", 9),
            [false]
        );
        // Its verdict taken already (the request is being served): the stream is broken off.
        let verdicts = Verdicts::default();
        let mut scanner = Scanner::new(16 * 1024, 100, verdicts.clone());
        scanner.feed(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(verdicts.next(), Verdict::Clear);
        assert!(!scanner.broken);
        scanner.feed(b"ffffffffffffffff\r\n");
        assert!(scanner.broken);
    }

    #[test]
    fn a_bare_lf_cannot_be_judged() {
        // hyper reads `GET /a` up to "\n\n"; this scanner would have read on to the CRLFCRLF.
        let stream = b"GET /a HTTP/1.1\nHost: x\n\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(verdicts_of(stream, stream.len()), [true]);
        let stream =
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;\nabc\r\n0\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(
            verdicts_of(stream, 4),
            [true],
            "a size line with a bare LF: its request refused, and no more judged"
        );
    }

    #[test]
    fn nothing_is_kept_after_an_upgrade() {
        let verdicts = Verdicts::default();
        let mut scanner = Scanner::new(16 * 1024, 100, verdicts.clone());
        scanner.feed(b"GET /_vestibule/ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
        scanner.feed(&[0x81; 4096]);
        assert!(matches!(scanner.state, State::Stopped));
        assert_eq!((verdicts.next(), verdicts.next()), (Verdict::Clear, Verdict::Unknown));
    }

    #[test]
    fn http2_preface_stops_scanning() {
        assert!(verdicts_of(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 4).is_empty());
    }
}
