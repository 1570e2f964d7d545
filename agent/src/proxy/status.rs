//! The responses the agent answers with itself, and how it writes a gRPC
//! status.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use h2::server::SendResponse;

pub use crate::code::Code;

/// Percent-encodes a `grpc-message` as the gRPC spec asks: bytes outside
/// printable ASCII, and `%`, become `%XX`.
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Writes `grpc-status` and `grpc-message` into `headers`.
pub fn put_status(headers: &mut HeaderMap, code: Code, message: &str) {
    headers.insert("grpc-status", code.header_value());
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", value);
    }
}

/// Answers with a trailers-only gRPC response: HTTP 200 and one HEADERS
/// frame carrying the status, ending the stream. A client already gone is
/// nothing to answer.
pub(crate) fn respond_grpc_error(respond: &mut SendResponse<Bytes>, code: Code, message: &str) {
    let mut response = Response::new(());
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    put_status(headers, code, message);
    let _ = respond.send_response(response, true);
}

/// Answers with a plain HTTP error, for requests that are not gRPC at all.
pub(crate) fn respond_http_error(
    respond: &mut SendResponse<Bytes>,
    status: StatusCode,
    message: String,
) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(mut body) = respond.send_response(response, false) {
        // h2 holds the few bytes until the client's window takes them.
        let _ = body.send_data(Bytes::from(message), true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(
            percent_encode("dial 10.0.0.1:5 failed"),
            "dial 10.0.0.1:5 failed"
        );
        assert_eq!(percent_encode("100% \"é\"\n"), "100%25 \"%C3%A9\"%0A");
    }
}
