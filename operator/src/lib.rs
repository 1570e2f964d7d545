//! tidepool's operator: reconciles ConnectionPools into per-node settings,
//! pushes them to agents over the control stream, and writes what the
//! agents report into each pool's status.
//!
//! - [`reconcile`]: the controller; resolves targets through [`resolve`]
//!   into [`desired`].
//! - [`push`]: debounced pushes of the desired snapshot to [`agents`].
//! - [`clients`]: each node's pod IPs and their namespaces, sent to that
//!   node's agent for `spec.clients`.
//! - [`control`]: the gRPC control service agents connect to.
//! - [`status`]: status aggregation (capped address list), conditions,
//!   Events, rate-limited server-side apply.
//! - [`leader`]: leader election on a Lease; [`role`]: the replica's role
//!   as a label on its own pod, which the chart's control Service selects.
//! - [`auth`]: agents' tokens checked by TokenReview; [`ca`]: the control
//!   CA in a Secret; [`tls`]: the control port's serving certificate.
//! - [`local`]: a pool's node-local Service and its EndpointSlices.
//! - [`admin`], [`metrics`], [`config`], [`app`] (the wiring `main` runs).
//!
//! # API calls the operator makes (for least-privilege RBAC)
//!
//! | API group | resource | verbs |
//! | --- | --- | --- |
//! | `tidepool.dev` | `connectionpools` | list, watch |
//! | `tidepool.dev` | `connectionpools/status` | patch (server-side apply) |
//! | `""` (core) | `services` | list, watch; create, patch, delete (node-local Services) |
//! | `discovery.k8s.io` | `endpointslices` | list, watch; create, patch, delete (node-local Services) |
//! | `""` (core) | `nodes` (cluster-scoped) | list, watch |
//! | `""` (core) | `pods` (every namespace) | list, watch |
//! | `coordination.k8s.io` | `leases` (its own namespace) | get, create, update |
//! | `""` (core) | `pods` (its own namespace, with `--pod-name`) | patch |
//! | `events.k8s.io` | `events` | create, patch |
//! | `authentication.k8s.io` | `tokenreviews` | create |
//! | `""` (core) | `secrets`, `configmaps` named `<fullname>-control-ca` (its own namespace) | get, update |
//!
//! Every read comes from a watch cache; the only direct reads are the
//! Lease's and the control CA's (a Secret and a ConfigMap, by name). Out of
//! a chart, the operator also creates the two when they are missing (if
//! allowed). With `--watch-namespace`, every namespaced rule can be a Role
//! in that namespace; nodes, and pods (a pool's clients may be in any
//! namespace), always need a ClusterRole.

pub mod admin;
pub mod advice;
pub mod agents;
pub mod app;
pub mod auth;
pub mod ca;
pub mod clients;
pub mod config;
pub mod control;
pub mod desired;
pub mod leader;
pub mod local;
pub mod metrics;
pub mod push;
pub mod reason;
pub mod reconcile;
pub mod resolve;
pub mod role;
pub mod status;
pub mod tls;
