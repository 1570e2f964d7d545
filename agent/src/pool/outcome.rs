//! How a stream ended, as the pool's caller saw it: what decides whether
//! its connection stays.

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
    /// Like `TransportError`, when h2 closed the connection because the
    /// server broke an HTTP/2 rule or limit: counted under its own eviction
    /// reason (`protocol`).
    ProtocolError,
}
