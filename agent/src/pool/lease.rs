//! The stream guard.

use std::fmt;
use std::sync::Arc;

use super::address::{Address, Effects, Grant};

/// How a stream ended, as the caller saw it. Only a transport failure
/// evicts the connection: a gRPC error status from the application
/// (NOT_FOUND, …) is a normal completion (go-micro tore the connection down
/// for those).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The stream completed (whatever its gRPC status).
    Ok,
    /// The application answered with an error status; counted as `Ok`.
    ApplicationError,
    /// The connection failed under the stream (reset, I/O error, protocol
    /// error): the connection takes no new stream and closes when its last
    /// one ends.
    TransportError,
}

/// One stream on one pooled connection, released exactly once: by
/// [`Lease::finish`], or by `Drop` as [`Outcome::Ok`] when the caller
/// returns early, errors out or is cancelled. The stream count can never
/// under- or over-count (go-micro's release could run while a cancelled
/// call was still in flight).
pub struct Lease<Conn: Clone> {
    address: Arc<Address<Conn>>,
    key: usize,
    id: u64,
    conn: Conn,
    released: bool,
}

impl<Conn: Clone> Lease<Conn> {
    pub(crate) fn new(address: Arc<Address<Conn>>, grant: Grant<Conn>) -> Self {
        Self {
            address,
            key: grant.key,
            id: grant.id,
            conn: grant.conn,
            released: false,
        }
    }

    /// The connection to open the stream on.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    /// The address (`host:port`) of the connection.
    pub fn address(&self) -> &str {
        &self.address.name
    }

    /// The pool's id for the connection (unique per address), as
    /// [`ConnectionInfo::id`](super::ConnectionInfo::id) reports it.
    pub fn connection_id(&self) -> u64 {
        self.id
    }

    /// Releases the stream with the caller's verdict.
    pub fn finish(mut self, outcome: Outcome) {
        self.release(outcome);
    }

    fn release(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let mut fx = Effects::default();
        {
            let address = &self.address;
            address
                .lock()
                .release(self.key, outcome, &address.metrics, &mut fx);
        }
        fx.run(&self.address);
    }
}

impl<Conn: Clone> Drop for Lease<Conn> {
    fn drop(&mut self) {
        self.release(Outcome::Ok);
    }
}

impl<Conn: Clone> fmt::Debug for Lease<Conn> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("address", &self.address.name)
            .field("connection", &self.id)
            .finish_non_exhaustive()
    }
}
