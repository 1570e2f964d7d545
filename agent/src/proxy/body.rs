//! The response body the proxy hands to the client's connection: a
//! backend's HTTP/2 stream forwarded frame by frame, or a short body of the
//! agent's own.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::RecvStream;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

use super::status::{Code, put_status};
use crate::metrics::PoolStreamMetrics;
use crate::pool::h2::H2Conn;
use crate::pool::{Lease, Outcome};

/// Counts one proxied stream: active while it lives, then finished with the
/// code it ended with (CANCELLED when dropped before its end, which is the
/// client going away).
#[derive(Debug)]
pub(crate) struct StreamGuard {
    metrics: PoolStreamMetrics,
    started: Instant,
    code: Option<Code>,
}

impl StreamGuard {
    pub(crate) fn new(metrics: PoolStreamMetrics) -> Self {
        metrics.active.inc();
        Self {
            metrics,
            started: Instant::now(),
            code: None,
        }
    }

    /// Records how the stream ended; the last call wins.
    pub(crate) fn set_code(&mut self, code: Code) {
        self.code = Some(code);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics.active.dec();
        self.metrics.finished(
            self.code.unwrap_or(Code::Cancelled),
            self.started.elapsed().as_secs_f64(),
        );
    }
}

/// Aborts the request pump when the response is done with, so the backend
/// stream's last handle goes and h2 resets it if it is still open.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A backend stream being forwarded.
///
/// Invariants: `lease` is held until the backend's trailers (or end of
/// stream) arrive or the stream fails, then finished exactly once with its
/// outcome; if the client goes away first, dropping the body drops the
/// lease (released as `Ok`: not the backend's fault) and the `RecvStream`
/// (h2 resets the backend stream with CANCEL). Received data is handed on at
/// once and its flow-control capacity released as it is, so the backend can
/// send only as fast as the client's connection takes it.
#[derive(Debug)]
pub(crate) struct Forwarded {
    pub(crate) recv: RecvStream,
    pub(crate) lease: Option<Lease<H2Conn>>,
    pub(crate) pump: Option<AbortOnDrop>,
    pub(crate) stream: StreamGuard,
    pub(crate) deadline: Option<Pin<Box<Sleep>>>,
    pub(crate) data_done: bool,
}

#[derive(Debug)]
enum Kind {
    /// Nothing left to send.
    Empty,
    /// One chunk, then the end.
    Full(Option<Bytes>),
    /// A backend stream.
    Forward(Box<Forwarded>),
}

/// The body of every response the proxy sends.
#[derive(Debug)]
pub struct ProxyBody {
    kind: Kind,
}

impl ProxyBody {
    /// An empty body (a trailers-only response).
    pub fn empty() -> Self {
        Self { kind: Kind::Empty }
    }

    /// A body of one chunk.
    pub fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full(Some(data)),
        }
    }

    pub(crate) fn forward(forwarded: Forwarded) -> Self {
        Self {
            kind: Kind::Forward(Box::new(forwarded)),
        }
    }
}

/// The error a client stream is reset with when the backend stream breaks
/// after data was sent; carries h2's reason so hyper resets with it.
#[derive(Debug, thiserror::Error)]
#[error("backend stream failed: {0}")]
pub struct BodyError(#[source] pub h2::Error);

impl Forwarded {
    /// Ends the stream with the backend's outcome.
    fn finish(&mut self, outcome: Outcome, code: Code) {
        self.stream.set_code(code);
        if let Some(lease) = self.lease.take() {
            lease.finish(outcome);
        }
        // The backend has answered in full: the request pump has nothing
        // more to do.
        self.pump.take();
    }

    /// Ends the client stream with trailers of the agent's own.
    fn fail(&mut self, outcome: Outcome, code: Code, message: &str) -> Frame<Bytes> {
        self.finish(outcome, code);
        let mut trailers = HeaderMap::new();
        put_status(&mut trailers, code, message);
        Frame::trailers(trailers)
    }

    fn backend_failed(&mut self, error: &h2::Error) -> Frame<Bytes> {
        let addr = self
            .lease
            .as_ref()
            .map_or_else(|| "?".to_owned(), |l| l.address().to_owned());
        tracing::debug!(%addr, %error, "backend stream failed mid-response");
        let message = format!("tidepool-agent: backend {addr} failed the stream: {error}");
        self.fail(Outcome::TransportError, Code::Unavailable, &message)
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.lease.is_none() {
            return Poll::Ready(None);
        }
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.deadline = None;
            // Dropping our handles (with the pump) resets the backend stream.
            let frame = self.fail(
                Outcome::Ok,
                Code::DeadlineExceeded,
                "tidepool-agent: deadline (grpc-timeout) exceeded",
            );
            return Poll::Ready(Some(Ok(frame)));
        }
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Ok(self.backend_failed(&error)))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => {
                let code = Code::in_headers(&trailers).unwrap_or(Code::Ok);
                self.finish(outcome_of(code), code);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Ok(None) => {
                self.finish(Outcome::Ok, Code::Ok);
                Poll::Ready(None)
            }
            Err(error) => Poll::Ready(Some(Ok(self.backend_failed(&error)))),
        }
    }
}

/// The pool outcome of a gRPC status: an error status is the application's,
/// not the connection's.
pub(crate) fn outcome_of(code: Code) -> Outcome {
    if code == Code::Ok {
        Outcome::Ok
    } else {
        Outcome::ApplicationError
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Forward(forwarded) => forwarded.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(data) => data.is_none(),
            Kind::Forward(forwarded) => forwarded.lease.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Forward(_) => SizeHint::default(),
        }
    }
}
