//! What the pool reports about each address: the snapshot the agent sends to
//! the operator, and the per-connection view tests and admin pages use.

use std::fmt;

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use tokio::time::Instant;

use super::connector::CloseReason;
use super::observe::Observation;

/// Why the pool took a connection out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EvictionReason {
    /// It outlived its (jittered) TTL.
    Ttl,
    /// It became idle while `maxIdle` idle connections were already kept.
    Idle,
    /// A stream on it ended with a transport error.
    Transport,
    /// The agent closed it (GOAWAY of its own) because the backend broke an
    /// HTTP/2 rule or limit, such as flooding small DATA frames.
    Protocol,
    /// The server sent GOAWAY.
    GoAway,
    /// A keepalive PING went unanswered.
    Keepalive,
    /// The connection ended on its own.
    Closed,
    /// `size` was lowered below the pooled count.
    Resize,
    /// Its address is no longer declared.
    Removed,
}

impl EvictionReason {
    /// Every reason, in the order of [`Evictions`]' fields.
    pub const ALL: [EvictionReason; 9] = [
        Self::Ttl,
        Self::Idle,
        Self::Transport,
        Self::Protocol,
        Self::GoAway,
        Self::Keepalive,
        Self::Closed,
        Self::Resize,
        Self::Removed,
    ];

    /// The label value used in metrics: `ttl`, `idle`, `transport`,
    /// `protocol`, `goaway`,
    /// `keepalive`, `closed`, `resize`, `removed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ttl => "ttl",
            Self::Idle => "idle",
            Self::Transport => "transport",
            Self::Protocol => "protocol",
            Self::GoAway => "goaway",
            Self::Keepalive => "keepalive",
            Self::Closed => "closed",
            Self::Resize => "resize",
            Self::Removed => "removed",
        }
    }
}

impl From<CloseReason> for EvictionReason {
    fn from(reason: CloseReason) -> Self {
        match reason {
            CloseReason::GoAway => Self::GoAway,
            CloseReason::Protocol => Self::Protocol,
            CloseReason::Keepalive => Self::Keepalive,
            CloseReason::Closed => Self::Closed,
        }
    }
}

impl fmt::Display for EvictionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for EvictionReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Evictions of one address since it was first used, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evictions {
    /// See [`EvictionReason::Ttl`].
    pub ttl: u64,
    /// See [`EvictionReason::Idle`].
    pub idle: u64,
    /// See [`EvictionReason::Transport`].
    pub transport: u64,
    /// See [`EvictionReason::Protocol`].
    pub protocol: u64,
    /// See [`EvictionReason::GoAway`].
    pub goaway: u64,
    /// See [`EvictionReason::Keepalive`].
    pub keepalive: u64,
    /// See [`EvictionReason::Closed`].
    pub closed: u64,
    /// See [`EvictionReason::Resize`].
    pub resize: u64,
    /// See [`EvictionReason::Removed`].
    pub removed: u64,
}

impl Evictions {
    /// The counter for `reason`.
    pub fn get(&self, reason: EvictionReason) -> u64 {
        match reason {
            EvictionReason::Ttl => self.ttl,
            EvictionReason::Idle => self.idle,
            EvictionReason::Transport => self.transport,
            EvictionReason::Protocol => self.protocol,
            EvictionReason::GoAway => self.goaway,
            EvictionReason::Keepalive => self.keepalive,
            EvictionReason::Closed => self.closed,
            EvictionReason::Resize => self.resize,
            EvictionReason::Removed => self.removed,
        }
    }

    pub(crate) fn bump(&mut self, reason: EvictionReason) {
        self.add(reason, 1);
    }

    /// Adds `n` to the counter for `reason`.
    pub(crate) fn add(&mut self, reason: EvictionReason, n: u64) {
        let counter = match reason {
            EvictionReason::Ttl => &mut self.ttl,
            EvictionReason::Idle => &mut self.idle,
            EvictionReason::Transport => &mut self.transport,
            EvictionReason::Protocol => &mut self.protocol,
            EvictionReason::GoAway => &mut self.goaway,
            EvictionReason::Keepalive => &mut self.keepalive,
            EvictionReason::Closed => &mut self.closed,
            EvictionReason::Resize => &mut self.resize,
            EvictionReason::Removed => &mut self.removed,
        };
        *counter += n;
    }

    /// All evictions.
    pub fn total(&self) -> u64 {
        EvictionReason::ALL.iter().map(|r| self.get(*r)).sum()
    }
}

/// How full one address is, at one instant (taken under its lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressOccupancy {
    /// `host:port`.
    pub address: String,
    /// Pooled connections (on the available or the busy list); at most `size`.
    pub connections: usize,
    /// Pooled connections at their effective max-streams (the busy list).
    pub busy: usize,
    /// Pooled connections with no stream; at most `maxIdle`.
    pub idle: usize,
    /// Open streams on every connection of the address, overflow and
    /// draining ones included.
    pub streams: usize,
    /// Open unpooled (overflow) connections.
    pub overflow: usize,
    /// Connections out of the pool that still carry streams (past TTL,
    /// evicted, or beyond a lowered size); they close at their last stream.
    pub draining: usize,
    /// Successful dials since the address was first used (overflow included).
    pub dials: u64,
    /// Failed dials since the address was first used.
    pub dial_failures: u64,
    /// Overflow connections dialed since the address was first used.
    pub overflow_total: u64,
    /// Connections taken out of service, by reason.
    pub evictions: Evictions,
    /// Callers queued for a stream or for a dial in flight.
    pub waiters: usize,
    /// What the address went through over the observation window's whole
    /// buckets (computed once per bucket, not when this is read).
    pub observed: Observation,
}

/// Where a connection is, as [`ConnectionInfo`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionState {
    /// On the available list: below its stream cap.
    Available,
    /// On the busy list: at its stream cap.
    Busy,
    /// Out of the pool, closing at its last stream.
    Draining(EvictionReason),
    /// Unpooled, dialed because the address was full.
    Overflow,
}

/// One connection of an address, for tests and debugging pages.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionInfo {
    /// The pool's id for the connection, as [`Lease::connection_id`](super::Lease::connection_id) reports it.
    pub id: u64,
    /// Where it is.
    pub state: ConnectionState,
    /// Open streams on it.
    pub streams: u32,
    /// Its effective max-streams: min(maxStreams, the server's limit).
    pub max_streams: u32,
    /// When it was dialed.
    pub born: Instant,
    /// When its jittered TTL runs out with the current `ttl`.
    pub expires: Instant,
}
