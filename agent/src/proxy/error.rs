//! Why the agent answered a stream itself instead of forwarding it.

use std::time::Duration;

use super::status::Code;
use crate::pool;
use crate::router::RouteError;

/// A stream the agent could not forward. Each variant names the authority,
/// pool or address at fault and maps to the gRPC code the client sees
/// ([`Error::code`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No pool, or more than one, answers to the authority (UNIMPLEMENTED, as
    /// for an unknown route; nothing is dialed).
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A dedicated listener whose pool was just removed (UNAVAILABLE).
    #[error("no pool serves listener port {port} any more")]
    NoDedicatedPool {
        /// The listener's port.
        port: u16,
    },
    /// The pool resolves to no address (UNAVAILABLE).
    #[error("pool {pool} has no backend address (is its Service without ready endpoints?)")]
    NoAddresses {
        /// `namespace/name`.
        pool: String,
    },
    /// The pool gave no stream: a failed dial (UNAVAILABLE, naming the
    /// address), a full `Wait` pool (RESOURCE_EXHAUSTED, naming the pool) or
    /// an address removed meanwhile (UNAVAILABLE).
    #[error(transparent)]
    Pool(#[from] pool::Error),
    /// The backend connection or stream failed before the response headers
    /// (UNAVAILABLE).
    #[error("backend {addr} of pool {pool} failed the stream: {source}")]
    Backend {
        /// `namespace/name`.
        pool: String,
        /// `host:port`.
        addr: String,
        /// What h2 said.
        #[source]
        source: h2::Error,
    },
    /// The client's `grpc-timeout` passed before the backend answered
    /// (DEADLINE_EXCEEDED).
    #[error("deadline of {timeout:?} (grpc-timeout) passed before pool {pool} answered")]
    Deadline {
        /// `namespace/name`.
        pool: String,
        /// The client's timeout.
        timeout: Duration,
    },
}

impl Error {
    /// The gRPC status the client gets.
    pub fn code(&self) -> Code {
        match self {
            Error::Route(RouteError::Missing) => Code::InvalidArgument,
            Error::Route(_) => Code::Unimplemented,
            Error::Pool(pool::Error::Full { .. }) => Code::ResourceExhausted,
            Error::Pool(_)
            | Error::NoDedicatedPool { .. }
            | Error::NoAddresses { .. }
            | Error::Backend { .. } => Code::Unavailable,
            Error::Deadline { .. } => Code::DeadlineExceeded,
        }
    }

    /// Whether nothing reached the backend, so another attempt is safe.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Error::Pool(pool::Error::Dial { .. }) | Error::Backend { .. }
        )
    }
}

/// The proxy's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
