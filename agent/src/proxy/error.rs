//! Why the agent answered a stream itself instead of forwarding it.

use std::time::Duration;

use std::net::IpAddr;

use super::retry::{RetryReason, Tried};
use super::status::Code;
use crate::clients::Refusal;
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
    /// The pool's `spec.clients` does not admit the client
    /// (PERMISSION_DENIED; nothing is dialed).
    #[error("{}", refused_message(.pool, .ip, .refusal))]
    Refused {
        /// `namespace/name`.
        pool: String,
        /// The client connection's source IP.
        ip: IpAddr,
        /// The namespace it was seen as, or that its IP is unknown.
        refusal: Refusal,
    },
    /// A dedicated listener whose pool was just removed (UNAVAILABLE).
    #[error("no pool serves listener port {port} any more")]
    NoDedicatedPool {
        /// The listener's port.
        port: u16,
    },
    /// The agent's drain deadline passed before the backend answered
    /// (UNAVAILABLE: the client retries, on the node's next agent).
    #[error("pool {pool}: the agent is shutting down (drain deadline passed); retry")]
    ShuttingDown {
        /// `namespace/name`.
        pool: String,
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
    /// Every attempt the stream was allowed failed before any backend took
    /// it (UNAVAILABLE): the message names each address and why.
    #[error("pool {pool}: no backend took the stream in {attempts} attempts ({tried}); the last failed with: {last}", attempts = .tried.len())]
    Exhausted {
        /// `namespace/name`.
        pool: String,
        /// The addresses tried and why each failed.
        tried: Tried,
        /// The last attempt's error.
        #[source]
        last: Box<Error>,
    },
    /// The backend refused the stream unprocessed, but more of the request
    /// body had gone out than the agent keeps to send again (UNAVAILABLE).
    #[error(
        "backend {addr} of pool {pool} did not process the stream ({reason}), and it was not sent again: more than the {cap} bytes of request body the agent keeps for a retry had gone out: {source}", reason = .reason.as_str()
    )]
    NotReplayable {
        /// `namespace/name`.
        pool: String,
        /// `host:port`.
        addr: String,
        /// How the backend showed it did not process the stream.
        reason: RetryReason,
        /// The replay cap in bytes.
        cap: usize,
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
            | Error::ShuttingDown { .. }
            | Error::Backend { .. }
            | Error::Exhausted { .. }
            | Error::NotReplayable { .. } => Code::Unavailable,
            Error::Deadline { .. } => Code::DeadlineExceeded,
            Error::Refused { .. } => Code::PermissionDenied,
        }
    }
}

fn refused_message(pool: &str, ip: &IpAddr, refusal: &Refusal) -> String {
    match refusal {
        Refusal::Namespace(ns) => format!(
            "pool {pool} does not serve namespace {ns}: the client at {ip} is a pod of namespace {ns}, which the pool's spec.clients.namespaces does not list"
        ),
        Refusal::UnknownIp => format!(
            "pool {pool} serves only the namespaces in its spec.clients.namespaces, and the client at {ip} is no pod this node's agent knows (a pod of another node, a host-network pod, or one started moments ago)"
        ),
    }
}

/// The proxy's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
