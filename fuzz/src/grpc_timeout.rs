//! `grpc-timeout` parsing: [`parse_grpc_timeout`] on any header value, and
//! what the forward path then does with the timeout (adds it to now,
//! re-encodes what is left for the backend).

use std::time::Duration;

use http::HeaderValue;
use tidepool_agent::proxy::forward::{encode_grpc_timeout, parse_grpc_timeout};

/// The precision of a `grpc-timeout` unit.
fn unit(value: &HeaderValue) -> Duration {
    match value.as_bytes().last() {
        Some(b'H') => Duration::from_secs(3600),
        Some(b'M') => Duration::from_secs(60),
        Some(b'S') => Duration::from_secs(1),
        Some(b'm') => Duration::from_millis(1),
        Some(b'u') => Duration::from_micros(1),
        Some(b'n') => Duration::from_nanos(1),
        other => panic!("{value:?} ends in no unit ({other:?})"),
    }
}

/// One header value.
pub fn run(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let Some(timeout) = parse_grpc_timeout(&value) else {
        return;
    };
    // Only the spec's form: 1 to 8 ASCII digits and a unit.
    let (digits, _) = data.split_at(data.len() - 1);
    assert!(
        (1..=8).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit),
        "{value:?} accepted"
    );
    assert!(timeout <= Duration::from_secs(99_999_999 * 3600));
    // The deadline is now + timeout.
    assert!(
        tokio::time::Instant::now().checked_add(timeout).is_some(),
        "{value:?}: no deadline"
    );
    // What is sent on is at most the timeout, less by under one unit.
    let encoded = encode_grpc_timeout(timeout);
    assert!(encoded.len() <= 9, "{encoded:?} is longer than 9 bytes");
    let back = parse_grpc_timeout(&encoded).expect("an encoded timeout parses");
    assert!(
        back <= timeout,
        "{value:?} re-encoded as {encoded:?}: longer"
    );
    assert!(
        timeout - back < unit(&encoded),
        "{value:?} re-encoded as {encoded:?}: loses more than a unit"
    );
}
