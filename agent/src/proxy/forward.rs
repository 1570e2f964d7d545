//! Forwarding one gRPC stream to a pooled backend connection.
//!
//! The request goes out on a stream of an h2 connection leased from the
//! pool; a task pumps the client's body frames into it (respecting the
//! backend's flow-control window, so the client is slowed to the backend's
//! pace), and the backend's response is handed back as a [`ProxyBody`]
//! that streams its frames. No message is ever held whole.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use h2::{Reason, SendStream};
use http::header::HeaderValue;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::Instrument;

use super::body::{AbortOnDrop, Forwarded, ProxyBody, StreamGuard, outcome_of};
use super::error::{Error, Result};
use super::status::{Code, grpc_error};
use crate::pool::h2::H2Conn;
use crate::pool::{Lease, Outcome};
use crate::router::pick;
use crate::runtime::PoolEntry;

/// How many addresses a stream tries when dials fail before anything was
/// sent.
const ATTEMPTS: usize = 2;

/// Forwards `request` through `entry`'s pool and returns the response to
/// send the client; errors become gRPC statuses naming what failed.
pub(crate) async fn forward(
    entry: Arc<PoolEntry>,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let mut stream = Some(StreamGuard::new(entry.metrics.clone()));
    let span = tracing::debug_span!("stream", pool = %entry.key, path = %request.uri().path());
    match open(&entry, request, &mut stream).instrument(span).await {
        Ok(response) => response,
        Err(error) => {
            let code = error.code();
            if let Some(stream) = &mut stream {
                stream.set_code(code);
            }
            tracing::debug!(pool = %entry.key, %error, "stream refused");
            grpc_error(code, &format!("tidepool-agent: {error}"))
        }
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

/// Opens the backend stream and waits for its response headers. `stream`
/// moves into the response body when there is one to forward.
async fn open(
    entry: &PoolEntry,
    request: Request<Incoming>,
    stream: &mut Option<StreamGuard>,
) -> Result<Response<ProxyBody>> {
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    // hyper's extensions mean nothing to the backend connection.
    parts.extensions = http::Extensions::new();
    let timeout = parts
        .headers
        .get("grpc-timeout")
        .and_then(parse_grpc_timeout);
    let deadline = timeout.map(|t| started + t);
    let pool_name = || entry.key.clone();

    let connect = async {
        let mut avoid = None;
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let addr = pick(&entry.pool, &entry.config.addresses, avoid)
                .ok_or_else(|| Error::NoAddresses { pool: pool_name() })?;
            match ready(entry, addr).await {
                Ok(ready) => return Ok(ready),
                Err(error) if error.retryable() && entry.config.addresses.len() > 1 => {
                    tracing::debug!(%addr, %error, "trying another address");
                    avoid = Some(addr);
                    last = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last.unwrap_or_else(|| Error::NoAddresses { pool: pool_name() }))
    };
    let deadline_passed = |_elapsed| Error::Deadline {
        pool: entry.key.clone(),
        timeout: timeout.unwrap_or_default(),
    };
    let (lease, mut sender) = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, connect)
            .await
            .map_err(deadline_passed)??,
        None => connect.await?,
    };

    if let Some(deadline) = deadline {
        // The backend gets what is left of the client's budget.
        let left = deadline.saturating_duration_since(Instant::now());
        parts
            .headers
            .insert("grpc-timeout", encode_grpc_timeout(left));
    }
    let mut body = body;
    // What of the request has already arrived (usually a whole unary
    // request) goes out with the headers, without a pump task.
    let (arrived, ended) = take_arrived(&mut body);
    let addr = lease.address().to_owned();
    let backend_error = |source: h2::Error| Error::Backend {
        pool: entry.key.clone(),
        addr: addr.clone(),
        source,
    };
    let headers_only = ended && arrived.is_empty();
    let sent = sender
        .send_request(Request::from_parts(parts, ()), headers_only)
        .and_then(|(response, mut send)| {
            let last = arrived.len();
            for (i, frame) in arrived.into_iter().enumerate() {
                match frame.into_data() {
                    // Bounded by INLINE: h2 holds it until the window opens.
                    Ok(data) => send.send_data(data, ended && i + 1 == last)?,
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            send.send_trailers(trailers)?;
                        }
                    }
                }
            }
            Ok((response, send))
        });
    let (response, send) = match sent {
        Ok(sent) => sent,
        Err(source) => {
            lease.finish(Outcome::TransportError);
            return Err(backend_error(source));
        }
    };
    let pump = (!ended).then(|| AbortOnDrop(tokio::spawn(pump(body, send))));

    let response = match deadline {
        Some(deadline) => match tokio::time::timeout_at(deadline, response).await {
            Ok(response) => response,
            Err(elapsed) => {
                // Dropping `pump` and the response future resets the stream.
                return Err(deadline_passed(elapsed));
            }
        },
        None => response.await,
    };
    let response = match response {
        Ok(response) => response,
        Err(source) => {
            lease.finish(Outcome::TransportError);
            return Err(backend_error(source));
        }
    };

    let (parts, recv) = response.into_parts();
    if recv.is_end_stream() {
        // Trailers-only (a gRPC error) or an empty answer: done already.
        let code = Code::in_headers(&parts.headers).unwrap_or(Code::Ok);
        if let Some(stream) = stream {
            stream.set_code(code);
        }
        lease.finish(outcome_of(code));
        return Ok(Response::from_parts(parts, ProxyBody::empty()));
    }
    let Some(stream) = stream.take() else {
        unreachable!("the stream guard moves into the body only here")
    };
    let forwarded = Forwarded {
        recv,
        lease: Some(lease),
        pump,
        stream,
        deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        data_done: false,
    };
    Ok(Response::from_parts(parts, ProxyBody::forward(forwarded)))
}

/// Takes a stream on a connection to `addr` and waits until the connection
/// can open it.
async fn ready(
    entry: &PoolEntry,
    addr: &str,
) -> Result<(Lease<H2Conn>, h2::client::SendRequest<Bytes>)> {
    let lease = entry.pool.acquire(addr).await?;
    match lease.conn().sender().ready().await {
        Ok(sender) => Ok((lease, sender)),
        Err(source) => {
            // The connection is going away (GOAWAY, closed): nothing was sent.
            lease.finish(Outcome::TransportError);
            Err(Error::Backend {
                pool: entry.key.clone(),
                addr: addr.to_owned(),
                source,
            })
        }
    }
}

/// Most request bytes sent along with the headers without waiting for
/// the backend's window.
const INLINE: usize = 64 * 1024;

/// Takes the request frames that have already arrived, without waiting, up
/// to about [`INLINE`] bytes; `true` when that is the whole request.
fn take_arrived(body: &mut Incoming) -> (Vec<Frame<Bytes>>, bool) {
    let mut frames = Vec::new();
    let mut bytes = 0;
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if body.is_end_stream() {
            return (frames, true);
        }
        if bytes >= INLINE {
            return (frames, false);
        }
        match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                bytes += frame.data_ref().map_or(0, Bytes::len);
                frames.push(frame);
            }
            Poll::Ready(None) => return (frames, true),
            // A failed client stream: the pump sees the error again and
            // cancels the backend stream.
            Poll::Ready(Some(Err(_))) | Poll::Pending => return (frames, false),
        }
    }
}

/// Copies the client's body frames (data and trailers) to the backend
/// stream, taking backend flow-control capacity before each send. Ends by
/// resetting the backend stream (CANCEL) if the client's stream fails, and
/// stops if the backend resets it.
async fn pump(mut body: Incoming, mut send: SendStream<Bytes>) {
    loop {
        let frame = tokio::select! {
            frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => frame,
            reset = poll_fn(|cx| send.poll_reset(cx)) => {
                tracing::trace!(?reset, "backend reset the stream while the client was sending");
                return;
            }
        };
        let result = match frame {
            None => send.send_data(Bytes::new(), true),
            Some(Err(error)) => {
                tracing::debug!(%error, "client stream failed; cancelling the backend stream");
                send.send_reset(Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => send_data(&mut send, data, body.is_end_stream()).await,
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => send_trailers(&mut send, trailers),
                    Err(_unknown) => Ok(()),
                },
            },
        };
        if result.is_err() || body.is_end_stream() {
            return;
        }
    }
}

/// Sends `data` as the backend's window allows, in as many DATA frames as
/// that takes.
async fn send_data(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        return send.send_data(data, end);
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(granted) => granted?,
            None => return Err(h2::Error::from(Reason::STREAM_CLOSED)),
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, end && data.is_empty())?;
    }
    Ok(())
}

fn send_trailers(send: &mut SendStream<Bytes>, trailers: HeaderMap) -> Result<(), h2::Error> {
    send.send_trailers(trailers)
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
