//! gRPC status codes and the responses the agent answers with itself.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use h2::server::SendResponse;

/// A gRPC status code (the numbers are the protocol's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    /// 0
    Ok = 0,
    /// 1
    Cancelled = 1,
    /// 2
    Unknown = 2,
    /// 3
    InvalidArgument = 3,
    /// 4
    DeadlineExceeded = 4,
    /// 5
    NotFound = 5,
    /// 6
    AlreadyExists = 6,
    /// 7
    PermissionDenied = 7,
    /// 8
    ResourceExhausted = 8,
    /// 9
    FailedPrecondition = 9,
    /// 10
    Aborted = 10,
    /// 11
    OutOfRange = 11,
    /// 12
    Unimplemented = 12,
    /// 13
    Internal = 13,
    /// 14
    Unavailable = 14,
    /// 15
    DataLoss = 15,
    /// 16
    Unauthenticated = 16,
}

impl Code {
    /// Every code, indexed by its number.
    pub const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The canonical name, such as `UNAVAILABLE`.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The code of a `grpc-status` value; anything unparsable is `UNKNOWN`.
    pub fn from_header(value: &HeaderValue) -> Code {
        match value.as_bytes() {
            b"0" => Code::Ok,
            other => std::str::from_utf8(other)
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .and_then(|n| Code::ALL.get(n).copied())
                .unwrap_or(Code::Unknown),
        }
    }

    /// The code in a header map's `grpc-status`, if it has one.
    pub fn in_headers(headers: &HeaderMap) -> Option<Code> {
        headers.get("grpc-status").map(Code::from_header)
    }

    fn header_value(self) -> HeaderValue {
        HeaderValue::from(u16::from(self as u8))
    }
}

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
    fn codes_round_trip_through_their_numbers() {
        for (n, code) in Code::ALL.iter().enumerate() {
            assert_eq!(*code as usize, n);
            assert_eq!(Code::from_header(&HeaderValue::from(n)), *code);
        }
        assert_eq!(
            Code::from_header(&HeaderValue::from_static("17")),
            Code::Unknown
        );
        assert_eq!(
            Code::from_header(&HeaderValue::from_static("x")),
            Code::Unknown
        );
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(
            percent_encode("dial 10.0.0.1:5 failed"),
            "dial 10.0.0.1:5 failed"
        );
        assert_eq!(percent_encode("100% \"é\"\n"), "100%25 \"%C3%A9\"%0A");
    }
}
