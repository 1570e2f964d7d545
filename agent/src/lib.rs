//! tidepool's node agent.
//!
//! - [`pool`]: go-micro's linked-list stream pool, made concurrent and observable.
//! - [`proxy`]: the h2c gRPC proxy over the pools (listeners, forwarding).
//! - [`router`]: `:authority` to pool, and load-aware address choice.
//! - [`clients`]: who may use a pool (`spec.clients`), by the client's IP.
//! - [`runtime`]: the pools in force, replaced atomically by [`runtime::Runtime::apply`].
//! - [`config`]: flags and [`config::PoolConfig`].
//! - [`control`]: the control stream to the operator (Kubernetes mode).
//! - [`standalone`]: pools from a file of ConnectionPool manifests.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/pools`.
//! - [`metrics`]: the proxy's Prometheus metrics.
//! - [`code`]: gRPC status codes.
//! - [`shutdown`]: drain on SIGTERM.
//! - [`app`]: wiring all of it together, for `main` and tests.

pub mod admin;
pub mod app;
pub mod clients;
pub mod code;
pub mod config;
pub mod control;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod router;
pub mod runtime;
pub mod shutdown;
pub mod standalone;
