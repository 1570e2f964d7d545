//! Exchanges below tonic: an HTTP/1.0 GET (the admin port) and single
//! HTTP/2 requests made with the `h2` crate, which sends exactly the
//! headers (and trailers) a test gives it.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET path` on an HTTP/1.0 server (the admin port): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nhost: admin\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// What a raw HTTP/2 exchange returned.
#[derive(Debug)]
pub struct RawResponse {
    /// HTTP status.
    pub status: http::StatusCode,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, if any.
    pub trailers: Option<http::HeaderMap>,
}

impl RawResponse {
    /// `grpc-status` from the trailers or, for trailers-only answers, the
    /// headers.
    pub fn grpc_status(&self) -> Option<String> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned())
    }

    /// `grpc-message`, as sent (percent-encoded).
    pub fn grpc_message(&self) -> String {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-message"))
            .or_else(|| self.headers.get("grpc-message"))
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

/// Frames a gRPC message (uncompressed).
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = bytes::BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.extend_from_slice(message);
    out.freeze()
}

/// One request over a fresh h2c connection made with the `h2` crate, which
/// enforces no deadline of its own and sends exactly these headers.
pub async fn raw_call(
    addr: SocketAddr,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<RawResponse, h2::Error> {
    raw_call_with_trailers(addr, method, uri, headers, body, None).await
}

/// [`raw_call`], ending the request with `trailers` when given (gRPC
/// clients never send request trailers; HTTP/2 allows them).
pub async fn raw_call_with_trailers(
    addr: SocketAddr,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    trailers: Option<http::HeaderMap>,
) -> Result<RawResponse, h2::Error> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut send = send.ready().await?;
    let mut builder = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let (response, mut stream) = send.send_request(builder.body(()).unwrap(), false)?;
    match trailers {
        Some(trailers) => {
            stream.send_data(body, false)?;
            stream.send_trailers(trailers)?;
        }
        None => stream.send_data(body, true)?,
    }
    let response = response.await?;
    let (parts, mut recv) = response.into_parts();
    let mut all = bytes::BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        all.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await?;
    Ok(RawResponse {
        status: parts.status,
        headers: parts.headers,
        body: all.freeze(),
        trailers,
    })
}
