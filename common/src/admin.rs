//! The admin routes both binaries serve the same way: `/metrics` and
//! `/healthz`. Each binary's own `admin` module mounts them beside its
//! `/readyz`, which says what that binary waits for.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::registry::Registry;

use crate::supervise::Health;

/// The content type of [`metrics`]' body.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `/metrics`: every metric in `registry`, in the OpenMetrics text format;
/// 500 with the encoder's error if encoding fails.
pub fn metrics(registry: &Registry) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {error}\n"),
        )
            .into_response(),
    }
}

/// `/healthz`: 200 `ok` while `health` holds, else 500 saying why (which
/// task ended, and how).
pub fn healthz(health: &Health) -> (StatusCode, String) {
    match health.failure() {
        None => (StatusCode::OK, "ok\n".into()),
        Some(why) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failing: {why}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_says_why_it_fails() {
        let health = Health::default();
        assert_eq!(healthz(&health), (StatusCode::OK, "ok\n".into()));
        health.fail("task push returned before the operator stopped".into());
        assert_eq!(
            healthz(&health),
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "failing: task push returned before the operator stopped\n".into()
            )
        );
    }

    #[test]
    fn metrics_are_openmetrics_text() {
        let mut registry = Registry::with_prefix("tidepool");
        let counter = prometheus_client::metrics::counter::Counter::<u64>::default();
        registry.register("things", "Things", counter.clone());
        counter.inc();
        let response = metrics(&registry);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], OPENMETRICS);
    }
}
