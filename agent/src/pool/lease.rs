//! The stream guard.

use std::fmt;
use std::sync::Arc;

use super::address::{Cell, Effects, Grant};
use super::outcome::Outcome;

/// One stream on one pooled connection, released exactly once: by
/// [`Lease::finish`], or by `Drop` as [`Outcome::Ok`] when the caller
/// returns early, errors out or is cancelled. The stream count can never
/// under- or over-count (go-micro's release could run while a cancelled
/// call was still in flight).
pub struct Lease<Conn: Clone> {
    cell: Arc<Cell<Conn>>,
    released: bool,
}

impl<Conn: Clone> Lease<Conn> {
    pub(crate) fn new(grant: Grant<Conn>) -> Self {
        Self {
            cell: grant.0,
            released: false,
        }
    }

    /// The connection to open the stream on.
    pub fn conn(&self) -> &Conn {
        &self.cell.conn
    }

    /// The address's load, for the balancer: start a
    /// [`Pending`](super::load::Pending) when the request goes out.
    pub fn load(&self) -> &super::load::AddressLoad {
        &self.cell.address.load
    }

    /// The address (`host:port`) of the connection.
    pub fn address(&self) -> &str {
        &self.cell.address.name
    }

    /// The pool's id for the connection (unique per address), as
    /// [`ConnectionInfo::id`](super::ConnectionInfo::id) reports it.
    pub fn connection_id(&self) -> u64 {
        self.cell.id
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
        let address = &self.cell.address;
        address
            .lock()
            .release(self.cell.key, outcome, &address.metrics, &mut fx);
        fx.run(address);
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
            .field("address", &self.cell.address.name)
            .field("connection", &self.cell.id)
            .finish_non_exhaustive()
    }
}
