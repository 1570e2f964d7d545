//! The admin server, on its own port:
//!
//! - `/metrics`: Prometheus text format (the pool's and the proxy's metrics).
//! - `/healthz`: 200 while the process serves; 500 naming the task once a
//!   long-lived task has ended ([`tidepool_common::supervise`]), before the
//!   agent exits.
//! - `/readyz`: 200 once a configuration is applied and until draining
//!   starts, 503 otherwise.
//! - `/pools`: JSON: every pool's settings, who may use it, addresses and
//!   per-address occupancy.
//! - `/clients`: JSON: the pod map `spec.clients` is checked against (this
//!   node's pod IPs and their namespaces, as the operator last sent them).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tidepool_common::supervise::Health;
use tokio::net::TcpListener;

use crate::pool::{AddressOccupancy, WhenFull};
use crate::runtime::{PoolReport, Runtime};

/// What the handlers read.
#[derive(Clone)]
struct Admin {
    runtime: Runtime,
    registry: Arc<Registry>,
    health: Health,
}

/// The admin routes.
pub fn router(runtime: Runtime, registry: Arc<Registry>, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/pools", get(pools))
        .route("/clients", get(clients))
        .with_state(Admin {
            runtime,
            registry,
            health,
        })
}

/// Serves the admin routes on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    runtime: Runtime,
    registry: Arc<Registry>,
    health: Health,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(runtime, registry, health))
        .with_graceful_shutdown(stop)
        .await
}

async fn metrics(State(admin): State<Admin>) -> Response {
    tidepool_common::admin::metrics(&admin.registry)
}

async fn healthz(State(admin): State<Admin>) -> (StatusCode, String) {
    tidepool_common::admin::healthz(&admin.health)
}

async fn readyz(State(admin): State<Admin>) -> Response {
    if admin.runtime.drain().is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if admin.runtime.drain().is_leaving() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "leaving: still serving until the drain delay ends\n",
        )
            .into_response()
    } else if !admin.runtime.is_configured() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no configuration applied yet\n",
        )
            .into_response()
    } else {
        "ready\n".into_response()
    }
}

/// One pool in `/pools`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolView {
    /// The resource's namespace.
    pub namespace: String,
    /// The resource's name.
    pub name: String,
    /// The resource's uid.
    pub uid: String,
    /// The generation running.
    pub generation: i64,
    /// The settings in force, in the resource's words.
    pub settings: SettingsView,
    /// `spec.clients.namespaces`; absent when every client may use it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<String>>,
    /// Per-address occupancy.
    pub addresses: Vec<AddressView>,
}

/// A pool's settings in `/pools`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SettingsView {
    /// Connections kept per address.
    pub size: usize,
    /// Connection lifetime, in seconds.
    pub ttl_seconds: f64,
    /// Idle connections kept per address.
    pub max_idle: usize,
    /// Streams per connection.
    pub max_streams: u32,
    /// `Overflow` or `Wait`.
    pub when_full: &'static str,
    /// How long `Wait` queues, in seconds.
    pub acquire_timeout_seconds: f64,
}

/// One address in `/pools`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressView {
    /// `host:port`.
    pub address: String,
    /// Pooled connections.
    pub connections: usize,
    /// Pooled connections at max-streams.
    pub busy: usize,
    /// Pooled connections with no stream.
    pub idle: usize,
    /// Open streams.
    pub streams: usize,
    /// Open overflow connections.
    pub overflow: usize,
    /// Connections closing at their last stream.
    pub draining: usize,
    /// Successful dials.
    pub dials: u64,
    /// Failed dials.
    pub dial_failures: u64,
    /// Connections taken out of service.
    pub evictions: u64,
    /// Callers queued.
    pub waiters: usize,
}

impl From<&AddressOccupancy> for AddressView {
    fn from(o: &AddressOccupancy) -> Self {
        Self {
            address: o.address.clone(),
            connections: o.connections,
            busy: o.busy,
            idle: o.idle,
            streams: o.streams,
            overflow: o.overflow,
            draining: o.draining,
            dials: o.dials,
            dial_failures: o.dial_failures,
            evictions: o.evictions.total(),
            waiters: o.waiters,
        }
    }
}

impl From<&PoolReport> for PoolView {
    fn from(r: &PoolReport) -> Self {
        let s = &r.settings;
        Self {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            uid: r.uid.clone(),
            generation: r.generation,
            settings: SettingsView {
                size: s.size,
                ttl_seconds: s.ttl.as_secs_f64(),
                max_idle: s.max_idle,
                max_streams: s.max_streams,
                when_full: match s.when_full {
                    WhenFull::Overflow => "Overflow",
                    WhenFull::Wait => "Wait",
                },
                acquire_timeout_seconds: s.acquire_timeout.as_secs_f64(),
            },
            addresses: r.addresses.iter().map(AddressView::from).collect(),
            clients: r.clients.clone(),
        }
    }
}

async fn pools(State(admin): State<Admin>) -> Json<Vec<PoolView>> {
    Json(admin.runtime.report().iter().map(PoolView::from).collect())
}

/// `/clients`.
#[derive(Debug, Serialize)]
pub struct ClientsView {
    /// The operator's version of the map; empty before the first.
    pub version: String,
    /// Pod IP to namespace, sorted by IP.
    pub pods: Vec<PodView>,
}

/// One pod IP in `/clients`.
#[derive(Debug, Serialize)]
pub struct PodView {
    /// The pod IP.
    pub ip: String,
    /// Its namespace.
    pub namespace: String,
}

async fn clients(State(admin): State<Admin>) -> Json<ClientsView> {
    let map = admin.runtime.clients();
    Json(ClientsView {
        version: map.version.clone(),
        pods: map
            .entries()
            .into_iter()
            .map(|(ip, namespace)| PodView {
                ip: ip.to_string(),
                namespace: namespace.to_owned(),
            })
            .collect(),
    })
}
