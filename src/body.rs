//! The one body type used by the whole proxy, for requests sent upstream and responses sent
//! to clients alike, so that streamed and generated bodies mix freely.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

/// Errors carried by streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The proxy's body type.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body with nothing in it.
pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed()
}

/// A body held whole in memory (pages, JSON documents).
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|never| match never {}).boxed()
}

/// Any streamed body, boxed.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// A request body that notes when it has been sent whole: the upstream's time to answer
/// counts from then, not from the first byte of a client's slow upload.
/// The end is its last frame, or `length` bytes when it declared a length (a sender that
/// counts them stops polling there). A body the client broke (too large, too slow, badly
/// framed) is noted too: the exchange's failure is then the client's, not the upstream's.
pub struct Uploaded {
    inner: Body,
    length: Option<u64>,
    sent: u64,
    upload: std::sync::Arc<Upload>,
}

/// How an upload went, as its [`Uploaded`] body saw it.
#[derive(Debug, Default)]
pub struct Upload {
    /// When the body was sent whole.
    pub done: std::sync::OnceLock<std::time::Instant>,
    /// The client's body failed: it was larger than allowed (`true`), or broken or too slow.
    pub failed: std::sync::OnceLock<bool>,
    /// The upstream asked for more and the client has not sent it yet.
    waiting_on_client: std::sync::atomic::AtomicBool,
}

impl Upload {
    /// Whether the upload now waits on the client (not on an upstream that stopped reading).
    pub fn waits_on_client(&self) -> bool {
        self.waiting_on_client.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Uploaded {
    pub fn new(inner: Body, length: Option<u64>, upload: std::sync::Arc<Upload>) -> Uploaded {
        Uploaded { inner, length, sent: 0, upload }
    }
}

impl http_body::Body for Uploaded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            std::task::Poll::Ready(None) => true,
            std::task::Poll::Ready(Some(Ok(frame))) => {
                self.sent += frame.data_ref().map_or(0, |data| data.len() as u64);
                self.inner.is_end_stream() || self.length.is_some_and(|length| self.sent >= length)
            }
            std::task::Poll::Ready(Some(Err(error))) => {
                let too_large = error.downcast_ref::<http_body_util::LengthLimitError>().is_some();
                let _ = self.upload.failed.set(too_large);
                false
            }
            std::task::Poll::Pending => false,
        };
        let waiting = polled.is_pending();
        self.upload.waiting_on_client.store(waiting, std::sync::atomic::Ordering::Relaxed);
        if ended {
            let _ = self.upload.done.set(std::time::Instant::now());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A body that holds `T` (a place under a limit) until it is done with.
pub struct Holding<T> {
    inner: Body,
    _held: T,
}

impl<T> Holding<T> {
    pub fn new(inner: Body, held: T) -> Holding<T> {
        Holding { inner, _held: held }
    }
}

impl<T: Unpin> http_body::Body for Holding<T> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
