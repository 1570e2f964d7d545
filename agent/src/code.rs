//! gRPC status codes, as the protocol numbers and names them.

use http::header::{HeaderMap, HeaderValue};

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

    /// The `grpc-status` header value.
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from(u16::from(self as u8))
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
}
