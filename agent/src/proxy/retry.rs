//! When a stream may be sent again: only when it provably never reached a
//! backend.
//!
//! A stream is sent again, on another address when the pool has one, for
//! these reasons only ([`RetryReason`]):
//! - the dial failed (`connect_refused`, `connect_failed`): no connection
//!   ever carried the request;
//! - the pooled connection was closing before the stream could open on it
//!   (`goaway`, `closed`): h2 sent nothing;
//! - the backend reset the stream with REFUSED_STREAM (`refused_stream`):
//!   RFC 9113 §8.7, the stream was closed before any processing;
//! - the backend's GOAWAY named a last stream id below the stream's
//!   (`goaway`): RFC 9113 §6.8, such streams were not processed. h2 fails
//!   exactly those streams with a GOAWAY error from the remote peer at the
//!   moment the frame arrives; a stream at or below the last stream id
//!   carries on, and if the connection then ends it fails with an I/O error
//!   (broken pipe), which is not retried (`agent/tests/proxy_retry.rs`
//!   shows both).
//!
//! Nothing else is retried: not a reset with any other code, not an I/O
//! error, not a deadline, not a cancellation, never after response headers.

use std::fmt;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

use crate::pool;

/// Why a stream was sent again; the `reason` label of
/// `tidepool_proxy_retries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryReason {
    /// The backend reset the stream with REFUSED_STREAM.
    RefusedStream,
    /// The backend's GOAWAY showed the stream was not processed, or the
    /// connection had received a GOAWAY before the stream opened.
    GoAway,
    /// The dial was refused (ECONNREFUSED).
    ConnectRefused,
    /// The dial failed otherwise (timeout, reset during the handshake).
    ConnectFailed,
    /// The pooled connection had closed before the stream opened.
    Closed,
}

impl RetryReason {
    /// Every reason, in the order of the metric's counters.
    pub const ALL: [RetryReason; 5] = [
        Self::RefusedStream,
        Self::GoAway,
        Self::ConnectRefused,
        Self::ConnectFailed,
        Self::Closed,
    ];

    /// The label value: `refused_stream`, `goaway`, `connect_refused`,
    /// `connect_failed`, `closed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RefusedStream => "refused_stream",
            Self::GoAway => "goaway",
            Self::ConnectRefused => "connect_refused",
            Self::ConnectFailed => "connect_failed",
            Self::Closed => "closed",
        }
    }

    /// Whether no connection to the address could be made; another attempt
    /// on the same address is pointless then.
    pub fn is_dial(self) -> bool {
        matches!(self, Self::ConnectRefused | Self::ConnectFailed)
    }

    /// The reason to retry after the pool gave no stream: only a failed
    /// dial (a full pool or a removed address is no backend's refusal).
    pub fn of_acquire(error: &pool::Error) -> Option<Self> {
        match error {
            pool::Error::Dial { source, .. }
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                Some(Self::ConnectRefused)
            }
            pool::Error::Dial { .. } => Some(Self::ConnectFailed),
            pool::Error::Full { .. } | pool::Error::Removed { .. } => None,
        }
    }

    /// The reason to retry when h2 would not open the stream on a pooled
    /// connection (waiting for it to be ready, or sending the headers):
    /// nothing was written then, if the connection was closing. A usage
    /// error of h2's (a header it refuses) would fail again: no retry.
    pub fn of_unsent(error: &h2::Error) -> Option<Self> {
        if error.is_go_away() {
            Some(Self::GoAway)
        } else if error.is_io() {
            Some(Self::Closed)
        } else {
            None
        }
    }

    /// The reason to retry a stream that was sent and failed before any
    /// response headers: a remote REFUSED_STREAM, or a remote GOAWAY (h2
    /// gives that error only to streams above the GOAWAY's last stream id).
    pub fn of_sent(error: &h2::Error) -> Option<Self> {
        if !error.is_remote() {
            return None;
        }
        if error.is_reset() && error.reason() == Some(h2::Reason::REFUSED_STREAM) {
            Some(Self::RefusedStream)
        } else if error.is_go_away() {
            Some(Self::GoAway)
        } else {
            None
        }
    }
}

impl EncodeLabelValue for RetryReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// The attempts of one stream that never reached a backend, in order.
#[derive(Debug, Default)]
pub struct Tried {
    attempts: Vec<(String, RetryReason)>,
}

impl Tried {
    /// Notes a failed attempt on `addr`.
    pub(crate) fn push(&mut self, addr: String, reason: RetryReason) {
        self.attempts.push((addr, reason));
    }

    /// How many attempts failed.
    pub(crate) fn len(&self) -> usize {
        self.attempts.len()
    }

    /// The address of the last failed attempt.
    pub(crate) fn last(&self) -> Option<&str> {
        self.attempts.last().map(|(addr, _)| addr.as_str())
    }

    /// How many distinct addresses could not be dialed.
    pub(crate) fn undialable(&self) -> usize {
        let mut addrs: Vec<&str> = self
            .attempts
            .iter()
            .filter(|(_, reason)| reason.is_dial())
            .map(|(addr, _)| addr.as_str())
            .collect();
        addrs.sort_unstable();
        addrs.dedup();
        addrs.len()
    }
}

impl fmt::Display for Tried {
    /// `10.0.0.1:50051 (refused_stream), 10.0.0.2:50051 (connect_refused)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (addr, reason)) in self.attempts.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{addr} ({})", reason.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::Arc;
    use std::time::Duration;

    fn dial(kind: io::ErrorKind) -> pool::Error {
        pool::Error::Dial {
            addr: "127.0.0.1:1".into(),
            source: Arc::new(io::Error::from(kind)),
        }
    }

    #[test]
    fn only_failed_dials_of_the_pool_are_retried() {
        assert_eq!(
            RetryReason::of_acquire(&dial(io::ErrorKind::ConnectionRefused)),
            Some(RetryReason::ConnectRefused)
        );
        assert_eq!(
            RetryReason::of_acquire(&dial(io::ErrorKind::TimedOut)),
            Some(RetryReason::ConnectFailed)
        );
        let full = pool::Error::Full {
            pool: "p".into(),
            addr: "a:1".into(),
            waited: Duration::from_secs(1),
        };
        assert_eq!(RetryReason::of_acquire(&full), None);
        let removed = pool::Error::Removed {
            pool: "p".into(),
            addr: "a:1".into(),
        };
        assert_eq!(RetryReason::of_acquire(&removed), None);
    }

    #[test]
    fn a_reset_of_the_agents_own_is_never_a_refusal() {
        // `From<Reason>` makes a local (user) error: a REFUSED_STREAM the
        // agent itself raised says nothing about the backend.
        for reason in [
            h2::Reason::REFUSED_STREAM,
            h2::Reason::CANCEL,
            h2::Reason::INTERNAL_ERROR,
        ] {
            assert_eq!(RetryReason::of_sent(&h2::Error::from(reason)), None);
            assert_eq!(RetryReason::of_unsent(&h2::Error::from(reason)), None);
        }
        // (h2 makes no remote error and no I/O error outside a connection:
        // `agent/tests/proxy_retry.rs` gets those from real frames.)
    }

    #[test]
    fn labels_are_distinct_and_dial_reasons_are_the_dials() {
        let mut labels: Vec<_> = RetryReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), RetryReason::ALL.len());
        // The metric indexes its counters by discriminant.
        for (i, reason) in RetryReason::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i, "{}", reason.as_str());
        }
        let dials: Vec<_> = RetryReason::ALL
            .into_iter()
            .filter(|r| r.is_dial())
            .collect();
        assert_eq!(
            dials,
            [RetryReason::ConnectRefused, RetryReason::ConnectFailed]
        );
    }

    #[test]
    fn the_attempts_name_each_address_and_reason() {
        let mut tried = Tried::default();
        tried.push("a:1".into(), RetryReason::ConnectRefused);
        tried.push("b:2".into(), RetryReason::RefusedStream);
        tried.push("a:1".into(), RetryReason::ConnectFailed);
        assert_eq!(
            tried.to_string(),
            "a:1 (connect_refused), b:2 (refused_stream), a:1 (connect_failed)"
        );
        assert_eq!(tried.len(), 3);
        assert_eq!(tried.last(), Some("a:1"));
        assert_eq!(tried.undialable(), 1);
    }
}
