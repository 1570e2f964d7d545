//! The listeners: accept TCP, insist on HTTP/2 with prior knowledge (h2c),
//! serve each connection with `h2` until it ends or the listener stops;
//! every stream is a task of its own.
//!
//! A client that speaks HTTP/1 gets an `HTTP/1.1 505` response saying what
//! the agent accepts; any other bad preface, and malformed or abusive
//! HTTP/2 later on (which h2 answers with GOAWAY), ends only that client's
//! connection. The windows and the small-frame budget are the ones
//! [`crate::pool::h2::FlowLimits`] documents.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::Target;
use crate::metrics::Rejection;
use crate::pool::h2::FlowLimits;
use crate::runtime::Runtime;

/// The HTTP/2 connection preface every h2c client sends first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `listener` until `stop` is cancelled; each connection is a task on
/// the runtime's drain tracker and, once `stop` fires, sends GOAWAY and
/// finishes its open streams.
pub async fn serve(
    listener: TcpListener,
    target: Target,
    runtime: Runtime,
    stop: CancellationToken,
) {
    let label = match target {
        Target::Shared => crate::metrics::SHARED_LISTENER.to_owned(),
        Target::Dedicated(port) => port.to_string(),
    };
    let gauge = runtime.metrics().connections(&label);
    let tracker = runtime.drain().tracker().clone();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off a little
                // rather than spin.
                tracing::warn!(listener = %label, %error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let connection = connection(
            tcp,
            peer,
            target,
            runtime.clone(),
            stop.clone(),
            gauge.clone(),
        );
        tracker.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "client connection ended with an error");
            }
        });
    }
    tracing::debug!(listener = %label, "listener stopped");
}

/// Decrements a gauge when dropped.
struct Open(Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn connection(
    mut tcp: TcpStream,
    peer: std::net::SocketAddr,
    target: Target,
    runtime: Runtime,
    stop: CancellationToken,
    gauge: Gauge,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    gauge.inc();
    let _open = Open(gauge);
    let options = runtime.proxy_options().clone();
    let preface = tokio::select! {
        preface = tokio::time::timeout(options.preface_timeout, read_preface(&mut tcp)) => preface,
        () = stop.cancelled() => return Ok(()),
    };
    match preface {
        Ok(Ok(Preface::H2)) => {}
        Ok(Ok(Preface::Http1)) => {
            runtime.metrics().rejected(Rejection::Http1);
            let message = "tidepool-agent serves gRPC over HTTP/2 without TLS (h2c, prior knowledge) only; \
                           this request used HTTP/1.x\n";
            let response = format!(
                "HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: text/plain; charset=utf-8\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{message}",
                message.len()
            );
            tcp.write_all(response.as_bytes()).await?;
            tcp.shutdown().await?;
            return Ok(());
        }
        Ok(Ok(Preface::Other)) => {
            runtime.metrics().rejected(Rejection::BadPreface);
            return Err("the client did not send the HTTP/2 connection preface".into());
        }
        Ok(Err(error)) => return Err(error.into()),
        Err(_elapsed) => {
            runtime.metrics().rejected(Rejection::BadPreface);
            return Err("no HTTP/2 preface in time".into());
        }
    }

    let limits = FlowLimits::CLIENT;
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(options.max_concurrent_streams)
        .initial_window_size(limits.stream_window)
        .initial_connection_window_size(limits.connection_window)
        .data_frame_budget(limits.data_frame_budget)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(1024);
    let handshake = builder.handshake::<_, bytes::Bytes>(Replayed { replay: 0, tcp });
    let mut conn = tokio::select! {
        conn = handshake => conn?,
        () = stop.cancelled() => return Ok(()),
    };
    let tracker = runtime.drain().tracker().clone();
    let mut draining = false;
    loop {
        let accepted = tokio::select! {
            accepted = conn.accept() => accepted,
            () = stop.cancelled(), if !draining => {
                // Draining: GOAWAY, then let the open streams finish; accept
                // keeps driving the connection until they have.
                conn.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        match accepted {
            Some(Ok((request, respond))) => {
                let runtime = runtime.clone();
                let client = peer.ip();
                tracker.spawn(async move {
                    super::handle(&runtime, target, client, request, respond).await;
                });
            }
            Some(Err(error)) => {
                if let Some(reason) = error.reason()
                    && error.is_go_away()
                    && !error.is_remote()
                {
                    runtime.metrics().goaway_sent(reason);
                    tracing::warn!(%peer, %reason, %error, "closed a client connection for breaking HTTP/2's rules");
                }
                return Err(error.into());
            }
            None => return Ok(()),
        }
    }
}

/// Largest header block a client may send (SETTINGS_MAX_HEADER_LIST_SIZE),
/// as hyper offered before: 16 KiB, twice gRPC's usual 8 KiB metadata
/// limit.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

enum Preface {
    H2,
    Http1,
    Other,
}

/// Reads until the bytes are the full HTTP/2 preface or cannot become it.
async fn read_preface(tcp: &mut TcpStream) -> io::Result<Preface> {
    let mut buf = [0u8; PREFACE.len()];
    let mut filled = 0;
    while filled < buf.len() {
        let n = tcp.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
        if buf[..filled] != PREFACE[..filled] {
            return Ok(classify(&buf[..filled]));
        }
    }
    Ok(Preface::H2)
}

/// An HTTP/1 request line begins with an upper-case method and a space.
fn classify(start: &[u8]) -> Preface {
    let method_len = start.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len > 0 && start.get(method_len) == Some(&b' ') {
        Preface::Http1
    } else {
        Preface::Other
    }
}

/// The client's TCP stream with the preface, already read off it, read
/// again first.
struct Replayed {
    /// How much of the preface has been replayed.
    replay: usize,
    tcp: TcpStream,
}

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.replay < PREFACE.len() {
            let rest = &PREFACE[self.replay..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.replay += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_request_lines_are_told_apart_from_garbage() {
        assert!(matches!(classify(b"GET / HTTP/1.1\r\n"), Preface::Http1));
        assert!(matches!(classify(b"POST /x"), Preface::Http1));
        assert!(matches!(classify(b"\x16\x03\x01"), Preface::Other));
        assert!(matches!(classify(b"PRI * HTTP/1.1"), Preface::Http1));
    }
}
