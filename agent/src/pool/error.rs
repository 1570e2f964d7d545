//! The pool's errors.

use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Why [`Pool::acquire`](super::Pool::acquire) gave no stream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Opening a connection to the address failed. Every caller that waited
    /// for that dial gets the same error.
    #[error("dial {addr} failed: {source}")]
    Dial {
        /// `host:port`.
        addr: String,
        /// What the connector said.
        #[source]
        source: Arc<io::Error>,
    },
    /// The address was full (`whenFull: Wait`) and no stream freed up within
    /// `acquireTimeout`, or too many callers were already queued. The proxy
    /// answers RESOURCE_EXHAUSTED.
    #[error("pool {pool} full for {addr}: no stream free after {waited:?}")]
    Full {
        /// The pool's name.
        pool: String,
        /// `host:port`.
        addr: String,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The address stopped being declared while the caller waited.
    #[error("address {addr} was removed from pool {pool}")]
    Removed {
        /// The pool's name.
        pool: String,
        /// `host:port`.
        addr: String,
    },
}

/// The pool's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
