//! How the pool makes a connection. The pool is generic over it, so its
//! logic is tested with [`MemoryConnector`](super::memory::MemoryConnector)
//! and runs in the agent with [`H2Connector`](super::h2::H2Connector).

use std::future::Future;
use std::io;

use tokio::sync::mpsc;

/// Makes connections for the pool.
///
/// A connection is closed by dropping it: the pool drops its copy when the
/// connection leaves the pool and its last stream has ended, and a connector's
/// `Conn` must then shut the connection down (gracefully, so streams still
/// running on other clones finish) once the last clone is gone.
pub trait Connector: Send + Sync + 'static {
    /// A handle to one open connection, cloned into every
    /// [`Lease`](super::Lease) on it.
    type Conn: Clone + Send + Sync + 'static;

    /// Opens one connection to `addr` (`host:port`). The pool calls this with
    /// no lock held, at most once at a time per address for pooled
    /// connections, and from a task of its own, so a caller that gives up
    /// does not cancel a dial that other callers wait for.
    fn connect(&self, addr: &str)
    -> impl Future<Output = io::Result<Connected<Self::Conn>>> + Send;
}

/// A new connection, with what the pool should know about it.
#[derive(Debug)]
pub struct Connected<Conn> {
    /// The handle the pool keeps and hands out.
    pub conn: Conn,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS if it sent one; the pool
    /// caps streams on this connection at min(maxStreams, this).
    pub max_concurrent_streams: Option<u32>,
    /// What happens to the connection later. When every sender is dropped
    /// the pool takes the connection as [`CloseReason::Closed`].
    pub events: mpsc::UnboundedReceiver<ConnEvent>,
}

/// Something a connection tells the pool after it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnEvent {
    /// The server changed SETTINGS_MAX_CONCURRENT_STREAMS.
    MaxConcurrentStreams(u32),
    /// The connection takes no new stream; streams already on it may finish.
    Closed(CloseReason),
}

/// Why a connection stopped taking streams, as counted in the pool's
/// evictions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The server sent GOAWAY.
    GoAway,
    /// A keepalive PING went unanswered.
    Keepalive,
    /// The agent's side closed it because the server broke an HTTP/2 rule or
    /// limit (h2 sent GOAWAY with an error code).
    Protocol,
    /// The connection ended (EOF, I/O or protocol error).
    Closed,
}
