//! The listeners: accept TCP, insist on HTTP/2 with prior knowledge (h2c),
//! serve each connection with hyper until it ends or the listener stops.
//!
//! A client that speaks HTTP/1 gets an `HTTP/1.1 505` response saying what
//! the agent accepts; any other bad preface, and malformed HTTP/2 later on
//! (which hyper answers with GOAWAY), ends only that client's connection.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::Target;
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
        Target::Shared => "shared".to_owned(),
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
        let connection = connection(tcp, target, runtime.clone(), stop.clone(), gauge.clone());
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
            runtime.metrics().rejected("http1");
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
            runtime.metrics().rejected("bad_preface");
            return Err("the client did not send the HTTP/2 connection preface".into());
        }
        Ok(Err(error)) => return Err(error.into()),
        Err(_elapsed) => {
            runtime.metrics().rejected("bad_preface");
            return Err("no HTTP/2 preface in time".into());
        }
    }

    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(options.max_concurrent_streams)
        // Responses carry the backend's headers only.
        .auto_date_header(false)
        .max_pending_accept_reset_streams(Some(1024));
    let service = service_fn(move |request| {
        let runtime = runtime.clone();
        async move { Ok::<_, Infallible>(super::handle(&runtime, target, request).await) }
    });
    let io = TokioIo::new(Replayed { replay: 0, tcp });
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => return result.map_err(Into::into),
        () = stop.cancelled() => {}
    }
    // Draining: GOAWAY, then let the open streams finish.
    connection.as_mut().graceful_shutdown();
    connection.await.map_err(Into::into)
}

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
