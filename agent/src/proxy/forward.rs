//! Forwarding one gRPC stream to a pooled backend connection.
//!
//! The request goes out on a stream of an h2 connection leased from the
//! pool. One task per stream then moves both directions with a `Relay`
//! each: the client's request frames to the backend, the backend's
//! response frames to the client. Each relay empties h2's receive buffer
//! at once and releases flow-control capacity only as it sends, so each
//! side is slowed to the other's pace and no message is ever held whole.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::ResponseFuture;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::header::HeaderValue;
use http::{HeaderMap, Request, Response};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::Instrument;

use super::error::{Error, Result};
use super::relay::{Broken, End, NoReplay, Relay};
use super::retry::{RetryReason, Tried};
use super::status::{Code, put_status, respond_grpc_error};
use crate::metrics::PoolStreamMetrics;
use crate::pool::h2::{H2Conn, is_local_protocol_error};
use crate::pool::load::Pending;
use crate::pool::{Lease, Outcome};
use crate::router::pick;
use crate::runtime::PoolEntry;

/// How many times a stream is sent at most: once, and twice more while it
/// provably never reached a backend (see [`super::retry`]). Two retries
/// cover one bad address and one connection going away at the same time;
/// more would only delay the error a client should see.
const ATTEMPTS: usize = 3;

/// How much of a request body the agent keeps, until the backend answers,
/// so the stream can be sent again: 64 KiB, the HTTP/2 default stream
/// window. Unary calls and the first messages of streams nearly always fit;
/// a stream that has sent more to the backend than this before a refusal
/// fails with UNAVAILABLE saying so. The copy shares the bytes the relay
/// sends (no copying), it is dropped as soon as response headers arrive,
/// and it holds no flow-control capacity back: the client's window is
/// released as bytes are sent, as without it.
pub const REPLAY_CAP: usize = 64 * 1024;

/// Counts one proxied stream: active while it lives, then finished with the
/// code it ended with (CANCELLED when dropped before its end, which is the
/// client going away).
#[derive(Debug)]
struct StreamGuard<'a> {
    metrics: &'a PoolStreamMetrics,
    started: Instant,
    code: Option<Code>,
}

impl<'a> StreamGuard<'a> {
    fn new(metrics: &'a PoolStreamMetrics) -> Self {
        metrics.active.inc();
        Self {
            metrics,
            started: Instant::now(),
            code: None,
        }
    }

    /// Records how the stream ended; the last call wins.
    fn set_code(&mut self, code: Code) {
        self.code = Some(code);
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.metrics.active.dec();
        self.metrics.finished(
            self.code.unwrap_or(Code::Cancelled),
            self.started.elapsed().as_secs_f64(),
        );
    }
}

/// Forwards `request` through `entry`'s pool and answers the client on
/// `respond`; errors before the backend answered become gRPC statuses
/// naming what failed.
///
/// When `cut` is cancelled (the agent's drain deadline), a stream still
/// open ends with UNAVAILABLE of the agent's own, which clients retry.
pub(crate) async fn forward(
    entry: Arc<PoolEntry>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    cut: CancellationToken,
) {
    let mut stream = StreamGuard::new(&entry.metrics);
    let span = tracing::debug_span!("stream", pool = %entry.key, path = %request.uri().path());
    let result = run(&entry, request, &mut respond, &mut stream, &cut)
        .instrument(span)
        .await;
    if let Err(error) = result {
        let code = error.code();
        stream.set_code(code);
        tracing::debug!(pool = %entry.key, %error, "stream refused");
        respond_grpc_error(&mut respond, code, &format!("tidepool-agent: {error}"));
    }
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`,
/// `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let s = value.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes a timeout as `grpc-timeout`, in the finest unit that fits 8
/// digits.
pub fn encode_grpc_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    let value = if nanos <= MAX {
        format!("{nanos}n")
    } else if timeout.as_micros() <= MAX {
        format!("{}u", timeout.as_micros())
    } else if timeout.as_millis() <= MAX {
        format!("{}m", timeout.as_millis())
    } else if u128::from(timeout.as_secs()) <= MAX {
        format!("{}S", timeout.as_secs())
    } else {
        format!("{}H", (timeout.as_secs() / 3600).min(99_999_999))
    };
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("99999999H"))
}

/// The client's `grpc-timeout`, as a point in time.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    fn passed(self, entry: &PoolEntry) -> Error {
        Error::Deadline {
            pool: entry.key.clone(),
            timeout: self.timeout,
        }
    }
}

/// The client's request body, kept replayable until a backend answers.
struct Body {
    recv: RecvStream,
    relay: Relay,
}

/// What one attempt came to.
enum Step {
    /// The stream is over: answered, or the client went away.
    Done,
    /// The stream provably never reached the backend at `addr`; it may be
    /// sent again. `error` is what the client gets if it is not.
    Retry {
        addr: String,
        reason: RetryReason,
        error: Error,
    },
}

/// An attempt that failed before a stream opened, and whether it may be
/// tried again.
struct Unopened {
    error: Error,
    retry: Option<RetryReason>,
}

/// Opens the backend stream and forwards until the response ends, sending
/// the stream again (up to [`ATTEMPTS`] times, within the client's
/// deadline) while it provably never reached a backend (see
/// [`super::retry`]). An error is returned only while the client has had no
/// response headers, so the caller can still answer with a status of the
/// agent's own.
async fn run(
    entry: &PoolEntry,
    request: Request<RecvStream>,
    respond: &mut SendResponse<Bytes>,
    stream: &mut StreamGuard<'_>,
    cut: &CancellationToken,
) -> Result<()> {
    let started = Instant::now();
    let (mut parts, client_recv) = request.into_parts();
    // The client connection's extensions mean nothing to the backend's.
    parts.extensions = http::Extensions::new();
    let deadline = parts
        .headers
        .get("grpc-timeout")
        .and_then(parse_grpc_timeout)
        .map(|timeout| Deadline {
            at: started + timeout,
            timeout,
        });
    let has_body = !client_recv.is_end_stream();
    let mut body = has_body.then(|| Body {
        recv: client_recv,
        relay: Relay::replayable(REPLAY_CAP),
    });
    let mut tried = Tried::default();
    loop {
        let step = attempt(
            entry,
            &parts,
            &mut body,
            tried.last(),
            respond,
            stream,
            Ends { deadline, cut },
        )
        .await?;
        let Step::Retry {
            addr,
            reason,
            error,
        } = step
        else {
            return Ok(());
        };
        tracing::debug!(%addr, reason = reason.as_str(), %error, "the stream never reached the backend");
        if reason.is_dial() && entry.config.addresses.len() == 1 {
            // Dialing the only address again at once would fail the same
            // way; the pool's dial backoff is the retry.
            return Err(error);
        }
        if has_body && body.is_none() {
            // The client's side of the body failed: nothing to send again.
            return Err(error);
        }
        tried.push(addr, reason);
        let out_of_addresses =
            reason.is_dial() && tried.undialable() >= entry.config.addresses.len();
        if tried.len() >= ATTEMPTS || out_of_addresses {
            return Err(Error::Exhausted {
                pool: entry.key.clone(),
                tried,
                last: Box::new(error),
            });
        }
        if let Some(deadline) = deadline
            && Instant::now() >= deadline.at
        {
            return Err(deadline.passed(entry));
        }
        if let Some(body) = &mut body
            && body.relay.rewind().is_err()
        {
            // `attempt` checked; a body that cannot be sent again ends here.
            return Err(error);
        }
        entry.metrics.retried(reason);
    }
}

/// What ends a stream early: the client's deadline, the agent's drain
/// deadline.
#[derive(Clone, Copy)]
struct Ends<'a> {
    deadline: Option<Deadline>,
    cut: &'a CancellationToken,
}

/// One attempt: picks an address (not `avoid`, the last one that failed,
/// when there is another), opens a stream there and forwards the request.
async fn attempt(
    entry: &PoolEntry,
    parts: &http::request::Parts,
    body: &mut Option<Body>,
    avoid: Option<&str>,
    respond: &mut SendResponse<Bytes>,
    stream: &mut StreamGuard<'_>,
    ends: Ends<'_>,
) -> Result<Step> {
    let Ends { deadline, cut } = ends;
    let addr =
        pick(&entry.pool, &entry.config.addresses, avoid).ok_or_else(|| Error::NoAddresses {
            pool: entry.key.clone(),
        })?;
    let connect = async {
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.at, ready(entry, addr))
                .await
                .unwrap_or_else(|_elapsed| {
                    Err(Unopened {
                        error: deadline.passed(entry),
                        retry: None,
                    })
                }),
            None => ready(entry, addr).await,
        }
    };
    // A client that gives up while the pool dials or queues is gone: stop.
    let connected = tokio::select! {
        connected = connect => connected,
        _reset = poll_fn(|cx| respond.poll_reset(cx)) => return Ok(Step::Done),
    };
    let (lease, mut sender) = match connected {
        Ok(connected) => connected,
        Err(Unopened {
            error,
            retry: Some(reason),
        }) => {
            return Ok(Step::Retry {
                addr: addr.to_owned(),
                reason,
                error,
            });
        }
        Err(Unopened { error, retry: None }) => return Err(error),
    };

    let mut parts = parts.clone();
    if let Some(deadline) = deadline {
        // The backend gets what is left of the client's budget.
        let left = deadline.at.saturating_duration_since(Instant::now());
        parts
            .headers
            .insert("grpc-timeout", encode_grpc_timeout(left));
    }
    let headers_only = body.is_none();
    let (response, backend_send) =
        match sender.send_request(Request::from_parts(parts, ()), headers_only) {
            Ok(sent) => sent,
            Err(source) => {
                let addr = lease.address().to_owned();
                lease.finish(outcome_of_error(&source));
                let retry = RetryReason::of_unsent(&source);
                let error = Error::Backend {
                    pool: entry.key.clone(),
                    addr: addr.clone(),
                    source,
                };
                return match retry {
                    Some(reason) => Ok(Step::Retry {
                        addr,
                        reason,
                        error,
                    }),
                    None => Err(error),
                };
            }
        };
    let mut exchange = Exchange {
        backend: lease.address(),
        // The balancer counts the stream until its response headers arrive.
        awaiting: Some(lease.load().start()),
        upload: body.take().map(|body| Upload {
            body,
            send: backend_send,
            done: false,
        }),
        phase: Phase::Waiting(response),
        deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d.at))),
        cut: Some(Box::pin(cut.clone().cancelled_owned())),
    };
    let finish = poll_fn(|cx| exchange.poll(cx, respond)).await;
    // The body comes back for another attempt, unless the client's side of
    // it failed.
    *body = exchange.upload.take().map(|upload| upload.body);
    drop(exchange);
    let addr = lease.address().to_owned();
    match finish {
        Finish::Done(code) => {
            stream.set_code(code);
            lease.finish(outcome_of(code));
            Ok(Step::Done)
        }
        Finish::ClientGone => {
            // Dropping the backend stream's handles resets it (CANCEL); the
            // lease goes back as Ok: not the backend's fault.
            Ok(Step::Done)
        }
        Finish::Deadline { answered: false } => match deadline {
            Some(deadline) => Err(deadline.passed(entry)),
            None => Ok(Step::Done),
        },
        Finish::Deadline { answered: true } => {
            stream.set_code(Code::DeadlineExceeded);
            Ok(Step::Done)
        }
        Finish::Cut { answered: true } => {
            stream.set_code(Code::Unavailable);
            Ok(Step::Done)
        }
        Finish::Cut { answered: false } => Err(Error::ShuttingDown {
            pool: entry.key.clone(),
        }),
        Finish::BackendFailed { source, answered } => {
            lease.finish(outcome_of_error(&source));
            if answered {
                stream.set_code(Code::Unavailable);
                return Ok(Step::Done);
            }
            let Some(reason) = RetryReason::of_sent(&source) else {
                return Err(Error::Backend {
                    pool: entry.key.clone(),
                    addr,
                    source,
                });
            };
            match body.as_ref().map(|body| body.relay.can_replay()) {
                Some(Err(NoReplay::Overflowed { cap })) => Err(Error::NotReplayable {
                    pool: entry.key.clone(),
                    addr,
                    reason,
                    cap,
                    source,
                }),
                // The copy was dropped (response headers came): not again.
                Some(Err(NoReplay::NotKept)) => Err(Error::Backend {
                    pool: entry.key.clone(),
                    addr,
                    source,
                }),
                Some(Ok(())) | None => Ok(Step::Retry {
                    error: Error::Backend {
                        pool: entry.key.clone(),
                        addr: addr.clone(),
                        source,
                    },
                    addr,
                    reason,
                }),
            }
        }
    }
}

/// The client's request frames on their way to the backend.
struct Upload {
    body: Body,
    send: SendStream<Bytes>,
    /// Everything was sent (or the backend stopped taking it); the body
    /// is kept while it may be sent again.
    done: bool,
}

/// Where the response is.
enum Phase {
    /// Waiting for the backend's response headers.
    Waiting(ResponseFuture),
    /// Forwarding the backend's response body to the client.
    Streaming {
        recv: RecvStream,
        send: SendStream<Bytes>,
        relay: Relay,
    },
    /// Ended.
    Done,
}

/// How an exchange ended.
enum Finish {
    /// The response ended with this gRPC status (the backend's).
    Done(Code),
    /// The client reset the stream or its connection went away.
    ClientGone,
    /// The client's `grpc-timeout` passed; `answered` when the client already
    /// had response headers (and got DEADLINE_EXCEEDED trailers of the
    /// agent's own).
    Deadline { answered: bool },
    /// The agent's drain deadline passed; `answered` as above (the client
    /// got UNAVAILABLE trailers saying the agent is shutting down).
    Cut { answered: bool },
    /// The backend's stream or connection failed; `answered` as above (the
    /// client got UNAVAILABLE trailers naming the backend).
    BackendFailed { source: h2::Error, answered: bool },
}

/// Both directions of one stream, polled from one task.
struct Exchange<'a> {
    /// The backend's address, for the message a client gets when it fails.
    backend: &'a str,
    /// Until the response headers arrive: the balancer's count.
    awaiting: Option<Pending<'a>>,
    upload: Option<Upload>,
    phase: Phase,
    deadline: Option<Pin<Box<Sleep>>>,
    /// The agent's drain deadline.
    cut: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl Exchange<'_> {
    fn poll(&mut self, cx: &mut Context<'_>, respond: &mut SendResponse<Bytes>) -> Poll<Finish> {
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            self.deadline = None;
            return Poll::Ready(self.end_early(
                Code::DeadlineExceeded,
                "tidepool-agent: deadline (grpc-timeout) exceeded",
                |answered| Finish::Deadline { answered },
            ));
        }
        if let Some(cut) = self.cut.as_mut()
            && cut.as_mut().poll(cx).is_ready()
        {
            self.cut = None;
            return Poll::Ready(self.end_early(
                Code::Unavailable,
                "tidepool-agent: the agent is shutting down (drain deadline passed); retry",
                |answered| Finish::Cut { answered },
            ));
        }
        self.poll_upload(cx);
        loop {
            match &mut self.phase {
                Phase::Waiting(response) => {
                    let response = match Pin::new(response).poll(cx) {
                        Poll::Ready(Ok(response)) => response,
                        Poll::Ready(Err(source)) => {
                            self.phase = Phase::Done;
                            return Poll::Ready(Finish::BackendFailed {
                                source,
                                answered: false,
                            });
                        }
                        Poll::Pending => {
                            return match respond.poll_reset(cx) {
                                Poll::Pending => Poll::Pending,
                                Poll::Ready(_) => Poll::Ready(Finish::ClientGone),
                            };
                        }
                    };
                    if let Some(mut awaiting) = self.awaiting.take() {
                        awaiting.answered();
                    }
                    // The backend took the stream: it will not be sent
                    // again, so its copy goes, and a finished upload too.
                    if let Some(upload) = &mut self.upload {
                        upload.body.relay.stop_replay();
                        if upload.done {
                            self.upload = None;
                        }
                    }
                    let (parts, recv) = response.into_parts();
                    let end = recv.is_end_stream();
                    // Trailers-only (a gRPC error) or an empty answer: done
                    // with the headers.
                    let code = end.then(|| Code::in_headers(&parts.headers).unwrap_or(Code::Ok));
                    let send = match respond.send_response(Response::from_parts(parts, ()), end) {
                        Ok(send) => send,
                        Err(_) => return Poll::Ready(Finish::ClientGone),
                    };
                    if let Some(code) = code {
                        self.phase = Phase::Done;
                        return Poll::Ready(Finish::Done(code));
                    }
                    self.phase = Phase::Streaming {
                        recv,
                        send,
                        relay: Relay::default(),
                    };
                }
                Phase::Streaming { recv, send, relay } => {
                    return match relay.poll(cx, recv, send) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Ok(End::Trailers(trailers))) => {
                            let code = Code::in_headers(&trailers).unwrap_or(Code::Ok);
                            let sent = send.send_trailers(trailers);
                            self.phase = Phase::Done;
                            Poll::Ready(match sent {
                                Ok(()) => Finish::Done(code),
                                Err(_) => Finish::ClientGone,
                            })
                        }
                        Poll::Ready(Ok(End::Eos)) => {
                            self.phase = Phase::Done;
                            Poll::Ready(Finish::Done(Code::Ok))
                        }
                        Poll::Ready(Err(Broken::Send(_))) => {
                            self.phase = Phase::Done;
                            Poll::Ready(Finish::ClientGone)
                        }
                        Poll::Ready(Err(Broken::Recv(source))) => {
                            tracing::debug!(error = %source, "backend stream failed mid-response");
                            let message = format!(
                                "tidepool-agent: backend {} failed the stream: {source}",
                                self.backend
                            );
                            Poll::Ready(self.end_early(Code::Unavailable, &message, |answered| {
                                Finish::BackendFailed { source, answered }
                            }))
                        }
                    };
                }
                Phase::Done => return Poll::Ready(Finish::ClientGone),
            }
        }
    }

    /// Moves the client's request frames on, if any are left to move.
    fn poll_upload(&mut self, cx: &mut Context<'_>) {
        let Some(upload) = &mut self.upload else {
            return;
        };
        if upload.done {
            return;
        }
        let Body { recv, relay } = &mut upload.body;
        let keep = match relay.poll(cx, recv, &mut upload.send) {
            Poll::Pending => return,
            Poll::Ready(Ok(End::Trailers(trailers))) => {
                let _ = upload.send.send_trailers(trailers);
                true
            }
            Poll::Ready(Ok(End::Eos)) => true,
            Poll::Ready(Err(Broken::Recv(error))) => {
                tracing::debug!(%error, "client stream failed; cancelling the backend stream");
                upload.send.send_reset(Reason::CANCEL);
                false
            }
            Poll::Ready(Err(Broken::Send(reason))) => {
                // The backend reset the stream while the client was sending;
                // its answer (or the reset) comes on the response side. The
                // body stays only while it may be sent again: unread, the
                // client's frames would sit in h2's buffers.
                tracing::trace!(%reason, "backend reset the stream while the client was sending");
                relay.can_replay().is_ok()
            }
        };
        if keep {
            upload.done = true;
        } else {
            self.upload = None;
        }
    }

    /// Ends the client's stream with a status of the agent's own: as
    /// trailers when the client already has response headers (`answered`),
    /// otherwise by leaving the answer to the caller.
    fn end_early(
        &mut self,
        code: Code,
        message: &str,
        finish: impl FnOnce(bool) -> Finish,
    ) -> Finish {
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        // Dropping the backend's handles (and the upload's) resets the
        // backend stream.
        self.upload = None;
        match phase {
            Phase::Streaming { mut send, .. } => {
                let mut trailers = HeaderMap::new();
                put_status(&mut trailers, code, message);
                let _ = send.send_trailers(trailers);
                finish(true)
            }
            Phase::Waiting(_) | Phase::Done => finish(false),
        }
    }
}

/// The pool outcome of a gRPC status: an error status is the application's,
/// not the connection's.
fn outcome_of(code: Code) -> Outcome {
    if code == Code::Ok {
        Outcome::Ok
    } else {
        Outcome::ApplicationError
    }
}

/// The pool outcome of an h2 error on a backend stream: a reset of that one
/// stream leaves the connection as good as it was; a GOAWAY h2 sent because
/// the backend broke a rule is a protocol error; anything else (the
/// server's GOAWAY, I/O) means the connection failed.
fn outcome_of_error(error: &h2::Error) -> Outcome {
    if error.is_reset() {
        Outcome::ApplicationError
    } else if is_local_protocol_error(error) {
        Outcome::ProtocolError
    } else {
        Outcome::TransportError
    }
}

/// Takes a stream on a connection to `addr` and waits until the connection
/// can open it.
async fn ready(
    entry: &PoolEntry,
    addr: &str,
) -> Result<(Lease<H2Conn>, h2::client::SendRequest<Bytes>), Unopened> {
    let lease = entry.pool.acquire(addr).await.map_err(|error| Unopened {
        retry: RetryReason::of_acquire(&error),
        error: error.into(),
    })?;
    match lease.conn().sender().ready().await {
        Ok(sender) => Ok((lease, sender)),
        Err(source) => {
            // The connection is going away (GOAWAY, closed): nothing was sent.
            lease.finish(Outcome::TransportError);
            Err(Unopened {
                retry: RetryReason::of_unsent(&source),
                error: Error::Backend {
                    pool: entry.key.clone(),
                    addr: addr.to_owned(),
                    source,
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool;

    #[test]
    fn grpc_timeouts_parse_and_encode() {
        let parse = |s: &'static str| parse_grpc_timeout(&HeaderValue::from_static(s));
        assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "100", "123456789m", "1x", "-1S", "1.5S"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        for t in [
            Duration::from_nanos(5),
            Duration::from_millis(1500),
            Duration::from_secs(500_000),
        ] {
            let encoded = encode_grpc_timeout(t);
            let back = parse_grpc_timeout(&encoded).unwrap();
            assert!(
                back <= t && t - back < Duration::from_secs(1),
                "{t:?} -> {encoded:?}"
            );
        }
    }

    #[test]
    fn pool_errors_map_to_the_codes_the_issue_names() {
        let dial = Error::Pool(pool::Error::Dial {
            addr: "127.0.0.1:1".into(),
            source: Arc::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        });
        assert_eq!(dial.code(), Code::Unavailable);
        assert!(dial.to_string().contains("127.0.0.1:1"));
        let full = Error::Pool(pool::Error::Full {
            pool: "shop/payments".into(),
            addr: "a:1".into(),
            waited: Duration::from_secs(1),
        });
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert!(full.to_string().contains("shop/payments"));
    }
}
