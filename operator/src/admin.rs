//! The admin server, on its own port (never the control port):
//!
//! - `/metrics`: Prometheus text format ([`crate::metrics::Metrics`]).
//! - `/healthz`: 200 while the process serves; 500 naming the task once a
//!   long-lived task has ended ([`tidepool_common::supervise`]), just
//!   before it exits.
//! - `/readyz`: 200 when this replica knows every pool: the leader serving
//!   agents, or a warm standby ready to take over (the body says which).
//!   Readiness does not keep agents off a standby; the role label does
//!   ([`crate::role`]), and a standby refuses control streams.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tidepool_common::supervise::Health;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the routes read.
#[derive(Clone)]
pub struct AdminState {
    /// Failed once a long-lived task has ended (the process then exits).
    pub health: Health,
    /// Every metric.
    pub registry: Arc<Registry>,
    /// Whether this replica leads.
    pub leading: watch::Receiver<bool>,
    /// Whether every pool has been reconciled once.
    pub initialized: watch::Receiver<bool>,
    /// Until then, what initialization waits for.
    pub waiting: watch::Receiver<String>,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> Response {
    tidepool_common::admin::metrics(&state.registry)
}

async fn healthz(State(state): State<AdminState>) -> (StatusCode, String) {
    tidepool_common::admin::healthz(&state.health)
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    match (*state.initialized.borrow(), *state.leading.borrow()) {
        (true, true) => (StatusCode::OK, "ok: leader\n".into()),
        (true, false) => (StatusCode::OK, "ok: standby, ready to take over\n".into()),
        (false, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: waiting for {}\n", *state.waiting.borrow()),
        ),
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

    async fn get(router: Router, path: &str) -> (StatusCode, String) {
        use axum::body::Body;
        use axum::http::Request;
        use tower::ServiceExt as _;
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// A standby that has read every pool is ready, so two replicas are
    /// both Ready; the body says which role answered.
    #[tokio::test]
    async fn readyz_needs_every_pool_and_is_ready_on_a_warm_standby() {
        let (lead_tx, leading) = watch::channel(false);
        let (init_tx, initialized) = watch::channel(false);
        let (waiting_tx, waiting) = watch::channel("the ConnectionPool list".to_string());
        let health = Health::default();
        let state = AdminState {
            health: health.clone(),
            registry: Arc::new(Registry::default()),
            leading,
            initialized,
            waiting,
        };
        let r = router(state);
        assert_eq!(get_status(r.clone(), "/healthz").await, StatusCode::OK);
        assert_eq!(
            get(r.clone(), "/readyz").await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: waiting for the ConnectionPool list\n".into()
            ),
            "a replica still reading the pools is not ready, and says what it waits for"
        );
        waiting_tx.send_replace("every pool's first reconcile (2 of 5 done)".into());
        assert!(get(r.clone(), "/readyz").await.1.contains("2 of 5 done"));
        lead_tx.send_replace(true);
        assert_eq!(
            get_status(r.clone(), "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE,
            "nor is a leader still reading them"
        );
        init_tx.send_replace(true);
        assert_eq!(
            get(r.clone(), "/readyz").await,
            (StatusCode::OK, "ok: leader\n".into())
        );
        lead_tx.send_replace(false);
        assert_eq!(
            get(r.clone(), "/readyz").await,
            (StatusCode::OK, "ok: standby, ready to take over\n".into())
        );
        assert_eq!(get_status(r.clone(), "/metrics").await, StatusCode::OK);
        health.fail("task controller returned before the operator stopped".into());
        assert_eq!(
            get(r, "/healthz").await,
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "failing: task controller returned before the operator stopped\n".into()
            )
        );
    }
}
