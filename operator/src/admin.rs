//! The admin server, on its own port (never the control port):
//!
//! - `/metrics`: Prometheus text format ([`crate::metrics::Metrics`]).
//! - `/healthz`: 200 while the process serves.
//! - `/readyz`: 200 when this replica leads and knows every pool, so a
//!   Service in front of the replicas routes agents to the leader only.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the routes read.
#[derive(Clone)]
pub struct AdminState {
    /// Every metric.
    pub registry: Arc<Registry>,
    /// Whether this replica leads.
    pub leading: watch::Receiver<bool>,
    /// Whether every pool has been reconciled once.
    pub initialized: watch::Receiver<bool>,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    match (*state.leading.borrow(), *state.initialized.borrow()) {
        (true, true) => (StatusCode::OK, "ok\n"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not the leader\n"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "still reading the pools\n"),
    }
}

/// Serves the admin routes on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// The address the admin server is bound to, for logs.
pub fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_status(router: Router, path: &str) -> StatusCode {
        use axum::body::Body;
        use axum::http::Request;
        use tower::ServiceExt as _;
        router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn readyz_needs_leadership_and_every_pool() {
        let (lead_tx, leading) = watch::channel(false);
        let (init_tx, initialized) = watch::channel(false);
        let state = AdminState {
            registry: Arc::new(Registry::default()),
            leading,
            initialized,
        };
        let r = router(state);
        assert_eq!(get_status(r.clone(), "/healthz").await, StatusCode::OK);
        assert_eq!(
            get_status(r.clone(), "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        lead_tx.send_replace(true);
        assert_eq!(
            get_status(r.clone(), "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        init_tx.send_replace(true);
        assert_eq!(get_status(r.clone(), "/readyz").await, StatusCode::OK);
        assert_eq!(get_status(r, "/metrics").await, StatusCode::OK);
    }
}
