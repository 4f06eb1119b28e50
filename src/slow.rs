//! Clients that do not read: a write to a client that makes no progress for `send_timeout`
//! fails with `TimedOut`, which ends the connection, as nginx's `send_timeout` (the time
//! between two successive writes, not for the whole answer). Wrapped around every client
//! stream, under the fast lane and hyper alike, and under TLS. On HTTP/2, where a client can
//! stall one stream without the socket ever waiting, [`StallGuard`] does the same per stream.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// A client stream whose writes must make progress within `timeout`.
pub struct SendTimeout<T> {
    inner: T,
    timeout: Duration,
    /// Running while a write waits: since the first `Pending` with no progress since.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Told when a client is let go for it (counted in metrics).
    on_timeout: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl<T> SendTimeout<T> {
    pub fn new(inner: T, timeout: Duration, on_timeout: Option<Arc<dyn Fn() + Send + Sync>>) -> SendTimeout<T> {
        SendTimeout { inner, timeout, stalled: None, on_timeout }
    }

    /// After a write-side poll of the inner stream: progress resets the clock; a wait starts
    /// it, and one that outlasts `timeout` is an error.
    fn judge<R>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.timeout;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stalled = None;
                if let Some(on_timeout) = &self.on_timeout {
                    on_timeout();
                }
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client read nothing for send_timeout")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.judge(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.judge(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.judge(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.judge(cx, polled)
    }
}

/// The most handed to HTTP/2 at once: a client reading a piece per `send_timeout` is served.
const PIECE: usize = 16 * 1024;

/// A response body on an HTTP/2 stream whose client grants it no window: HTTP/2 stops asking
/// for the body (nothing waits on the socket, so [`SendTimeout`] never fires) while the
/// upstream's answer and its connection stay held. After `send_timeout` without the client
/// taking the next piece, the upstream's body is dropped (its connection closed) and
/// `on_timeout` told, which closes the client's connection (HTTP/2 asks nothing more of a
/// stream without window, so only the connection's end frees it), as nginx's `send_timeout`.
pub struct StallGuard {
    shared: Arc<Stall>,
    /// What is left of a large frame: handed on in pieces of [`PIECE`], so that a client that
    /// reads slowly but steadily is seen to make progress.
    rest: bytes::Bytes,
    /// The watcher, ended with the body: one per stream, none left behind.
    watcher: tokio::task::AbortHandle,
}

impl Drop for StallGuard {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

struct Stall {
    body: std::sync::Mutex<Option<crate::body::Body>>,
    /// Since when the body waits on the client to ask for more (ms on `clock`); 0 while the
    /// client is asking (the body waits on the upstream, or is done).
    waiting_since: std::sync::atomic::AtomicU64,
    clock: tokio::time::Instant,
}

impl Stall {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64 + 1
    }
}

impl StallGuard {
    /// Guard `body`; `on_timeout` is told when a stalled stream is let go.
    pub fn new(body: crate::body::Body, timeout: Duration, on_timeout: Arc<dyn Fn() + Send + Sync>) -> StallGuard {
        let clock = tokio::time::Instant::now();
        let shared = Arc::new(Stall {
            body: std::sync::Mutex::new(Some(body)),
            waiting_since: std::sync::atomic::AtomicU64::new(1),
            clock,
        });
        let watched = Arc::downgrade(&shared);
        let watcher = tokio::spawn(async move {
            let mut next = timeout;
            loop {
                tokio::time::sleep(next).await;
                let Some(shared) = watched.upgrade() else { return }; // the body is done with
                let since = shared.waiting_since.load(std::sync::atomic::Ordering::Relaxed);
                let waited = Duration::from_millis(shared.now().saturating_sub(since));
                if since == 0 || waited < timeout {
                    next = if since == 0 { timeout } else { timeout - waited };
                    continue;
                }
                if let Ok(mut body) = shared.body.lock() {
                    body.take();
                }
                on_timeout();
                return;
            }
        });
        StallGuard { shared, rest: bytes::Bytes::new(), watcher: watcher.abort_handle() }
    }
}

impl http_body::Body for StallGuard {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, crate::body::BoxError>>> {
        use std::sync::atomic::Ordering;
        let this = &mut *self;
        let shared = &this.shared;
        let Ok(mut body) = shared.body.lock() else {
            return Poll::Ready(Some(Err("a poisoned lock".into())));
        };
        let Some(inner) = body.as_mut() else {
            return Poll::Ready(Some(Err("the client took nothing for send_timeout".into())));
        };
        shared.waiting_since.store(0, Ordering::Relaxed);
        let polled = if this.rest.is_empty() {
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) if frame.data_ref().is_some_and(|data| data.len() > PIECE) => {
                    this.rest = frame.into_data().unwrap_or_default();
                    Poll::Ready(Some(Ok(http_body::Frame::data(this.rest.split_to(PIECE)))))
                }
                polled => polled,
            }
        } else {
            let piece = this.rest.split_to(PIECE.min(this.rest.len()));
            Poll::Ready(Some(Ok(http_body::Frame::data(piece))))
        };
        if let Poll::Ready(Some(Ok(_))) = polled {
            shared.waiting_since.store(shared.now(), Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
            && self
                .shared
                .body
                .lock()
                .ok()
                .and_then(|body| body.as_ref().map(http_body::Body::is_end_stream))
                .unwrap_or(false)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let hint = self.shared.body.lock().ok().and_then(|body| body.as_ref().map(http_body::Body::size_hint));
        let hint = hint.unwrap_or_default();
        match hint.exact() {
            Some(exact) => http_body::SizeHint::with_exact(exact + self.rest.len() as u64),
            None => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_nothing_is_let_go_after_the_timeout() {
        let (server, _client) = tokio::io::duplex(1024);
        let timeouts = Arc::new(AtomicUsize::new(0));
        let counted = timeouts.clone();
        let on_timeout: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let mut server = SendTimeout::new(server, Duration::from_secs(30), Some(on_timeout));
        let started = tokio::time::Instant::now();
        let error = server.write_all(&[0; 64 * 1024]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(timeouts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_served_however_long_it_takes() {
        let (server, mut client) = tokio::io::duplex(1024);
        let mut server = SendTimeout::new(server, Duration::from_secs(30), None);
        // The client reads 1 KiB every 20 s: each write waits less than the timeout.
        let reader = tokio::spawn(async move {
            let mut buf = [0; 1024];
            let mut read = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(20)).await;
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return read,
                    Ok(n) => read += n,
                }
            }
        });
        server.write_all(&[0; 16 * 1024]).await.unwrap();
        server.shutdown().await.unwrap();
        drop(server);
        assert_eq!(reader.await.unwrap(), 16 * 1024);
    }

    /// A body whose frames come from `frames`, as an upstream sends them.
    fn channel_body() -> (tokio::sync::mpsc::Sender<bytes::Bytes>, crate::body::Body) {
        let (sender, receiver) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            let data = receiver.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(http_body::Frame::data(data)), receiver))
        });
        (sender, crate::body::boxed(http_body_util::StreamBody::new(stream)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_on_a_slow_upstream_is_no_stall_but_one_the_client_stops_taking_is() {
        use http_body_util::BodyExt;
        let stalls = Arc::new(AtomicUsize::new(0));
        let counted = stalls.clone();
        let on_timeout: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let (upstream, body) = channel_body();
        let mut guarded = StallGuard::new(body, Duration::from_secs(30), on_timeout);
        // The client asks at once; the upstream takes a minute for each piece.
        let sending = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(60)).await;
                upstream.send(bytes::Bytes::from_static(b"piece")).await.unwrap();
            }
            upstream
        });
        for _ in 0..3 {
            let frame = guarded.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "piece");
        }
        assert_eq!(stalls.load(Ordering::Relaxed), 0, "waiting on the upstream is no stall");
        // Now the client takes nothing more while the upstream has more to give.
        let _upstream = sending.await.unwrap();
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(stalls.load(Ordering::Relaxed), 1, "let go after send_timeout");
        assert!(guarded.frame().await.unwrap().is_err(), "the stream fails when next asked");
    }

    #[tokio::test]
    async fn a_large_frame_is_handed_on_in_pieces() {
        use http_body_util::BodyExt;
        let on_timeout: Arc<dyn Fn() + Send + Sync> = Arc::new(|| {});
        let body = crate::body::full(vec![7u8; 100 * 1024]);
        let mut guarded = StallGuard::new(body, Duration::from_secs(30), on_timeout);
        let mut sizes = Vec::new();
        while let Some(frame) = guarded.frame().await {
            sizes.push(frame.unwrap().into_data().unwrap().len());
        }
        assert_eq!(sizes, [PIECE, PIECE, PIECE, PIECE, PIECE, PIECE, 100 * 1024 - 6 * PIECE]);
    }
}
