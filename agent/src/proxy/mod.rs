//! The data path: an h2c gRPC proxy over the pools.
//!
//! - [`server`]: the listeners (the shared one routes by `:authority`,
//!   dedicated ones serve one pool) and client connections.
//! - `handle` (here): checks a request is gRPC, finds its pool and checks
//!   the pool admits the client ([`crate::clients`]).
//! - [`forward`]: leases a backend stream and forwards both directions.
//! - [`retry`]: when a stream that never reached a backend is sent again.
//! - [`relay`]: one direction of a stream, from an h2 receive half to an h2
//!   send half, with flow control end to end.
//! - [`status`] and [`error`]: what the client sees when the agent answers
//!   itself.

pub mod error;
pub mod forward;
pub mod relay;
pub mod retry;
pub mod server;
pub mod status;

use std::net::IpAddr;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, StatusCode};

pub use error::Error;
pub use server::serve;
pub use status::Code;

use crate::metrics::Rejection;
use crate::router::RouteError;
use crate::runtime::Runtime;

/// Which pools a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The shared listener: the pool is chosen by `:authority`.
    Shared,
    /// A pool's dedicated `listenPort`: every stream goes to that pool.
    Dedicated(u16),
}

/// Answers one request: refuses what is not gRPC, finds the pool, checks
/// the pool admits `client` (the connection's source IP), forwards.
pub(crate) async fn handle(
    runtime: &Runtime,
    target: Target,
    client: IpAddr,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    if let Some((status, message)) = refuse_non_grpc(&request) {
        runtime.metrics().rejected(Rejection::NotGrpc);
        status::respond_http_error(&mut respond, status, message);
        return;
    }
    // The pool's entry is the one reference counted: it outlives a
    // configuration change for the streams already on it.
    let found = runtime.with_table(|table| {
        match target {
            Target::Shared => {
                let authority = request
                    .uri()
                    .authority()
                    .map(|a| a.as_str())
                    .or_else(|| {
                        request
                            .headers()
                            .get(http::header::HOST)
                            .and_then(|h| h.to_str().ok())
                    })
                    .unwrap_or("");
                table
                    .routes
                    .lookup(authority)
                    .map_err(Error::from)
                    .and_then(|key| {
                        // Routes and pools come from one configuration: always found.
                        table.pools.get(key).ok_or_else(|| {
                            Error::Route(RouteError::Unknown {
                                authority: authority.to_owned(),
                            })
                        })
                    })
            }
            Target::Dedicated(port) => table
                .ports
                .get(&port)
                .and_then(|key| table.pools.get(key))
                .ok_or(Error::NoDedicatedPool { port }),
        }
        .cloned()
    });
    let entry = match found {
        Ok(entry) => entry,
        Err(error) => return refusal(runtime, error, &mut respond),
    };
    if let Some(clients) = &entry.config.spec.clients {
        let admitted = runtime
            .with_clients(|map| crate::clients::admit(Some(&clients.namespaces), map, client));
        if let Err(refused) = admitted {
            runtime.metrics().refused(&entry.key, refused.reason());
            let error = Error::Refused {
                pool: entry.key.clone(),
                ip: client,
                refusal: refused,
            };
            // Debug only: a client refused in a loop must not flood the log;
            // the counter shows it.
            tracing::debug!(%client, %error, "stream refused by spec.clients");
            status::respond_grpc_error(
                &mut respond,
                error.code(),
                &format!("tidepool-agent: {error}"),
            );
            return;
        }
    }
    forward::forward(entry, request, respond, runtime.drain().cut().clone()).await;
}

fn refusal(runtime: &Runtime, error: Error, respond: &mut SendResponse<Bytes>) {
    if matches!(
        error,
        Error::Route(RouteError::Unknown { .. } | RouteError::Ambiguous { .. })
    ) {
        runtime.metrics().rejected(Rejection::UnknownAuthority);
    }
    tracing::debug!(%error, "stream refused before reaching a pool");
    status::respond_grpc_error(respond, error.code(), &format!("tidepool-agent: {error}"));
}

/// A plain HTTP error for requests that are not gRPC: wrong method (405) or
/// content type (415), as the gRPC over HTTP/2 spec asks.
fn refuse_non_grpc(request: &Request<RecvStream>) -> Option<(StatusCode, String)> {
    if request.method() != Method::POST {
        return Some((
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "tidepool-agent proxies gRPC: method {} is not POST\n",
                request.method()
            ),
        ));
    }
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    match content_type {
        Some(ct) if ct.starts_with("application/grpc") => None,
        other => Some((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "tidepool-agent proxies gRPC: content-type {} is not application/grpc\n",
                other.unwrap_or("(none)")
            ),
        )),
    }
}
