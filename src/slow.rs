//! Clients that do not read: a write to a client that makes no progress for `send_timeout`
//! fails with `TimedOut`, which ends the connection, as nginx's `send_timeout` (the time
//! between two successive writes, not for the whole answer). Wrapped around every client
//! stream, under the fast lane and hyper alike, and under TLS.

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
}
