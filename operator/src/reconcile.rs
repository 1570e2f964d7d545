//! The ConnectionPool controller: resolves each pool's target and records
//! what agents should run in [`Desired`].
//!
//! The controller is fed by reflectors the operator owns (one watch per
//! kind, shared with the status writer and the control service): pools,
//! Services and EndpointSlices; a Service or EndpointSlice change
//! reconciles the pools that target it. A target that cannot be resolved
//! is not an error: the entry records why (the status shows it) and the
//! pool is retried with backoff, and at once when its Service or
//! EndpointSlices change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt as _;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use tidepool_crds::control::{pb, spec_to_pb};
use tidepool_crds::{ConnectionPool, PoolKey};
use tokio::time::Instant;

use crate::desired::{Desired, Entry};
use crate::metrics::{Metrics, ReconcileResult, ResultLabel};
use crate::resolve::{
    AddressMap, ResolveError, SERVICE_NAME_LABEL, resolve_service, static_addresses,
};

/// Why a reconcile failed (and is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object has no namespace (a cluster-scoped copy of a namespaced
    /// kind cannot exist; this guards against a broken API server).
    #[error("connectionpool {name} has no namespace")]
    NoNamespace {
        /// The pool's name.
        name: String,
    },
}

/// Results of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the reconciler works with.
pub struct Context {
    /// What agents should run.
    pub desired: Arc<Desired>,
    /// Every pool, to tell which one holds a `listenPort`.
    pub pools: Store<ConnectionPool>,
    /// Services, for port resolution.
    pub services: Store<Service>,
    /// EndpointSlices with a `kubernetes.io/service-name` label.
    pub slices: Store<EndpointSlice>,
    /// Metrics.
    pub metrics: Metrics,
    /// Endpoint address rewrites (local control planes only).
    pub address_map: AddressMap,
    /// Consecutive unresolved reconciles per pool, for the retry backoff.
    pub failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// How long a resolved pool waits before it is checked again anyway.
pub const RESYNC: Duration = Duration::from_secs(300);

/// The retry delay after `failures` consecutive unresolved reconciles:
/// 1 s doubling to at most 60 s.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// Reconciles one pool.
pub async fn reconcile(pool: Arc<ConnectionPool>, ctx: Arc<Context>) -> Result<Action> {
    let start = Instant::now();
    let name = pool.name_any();
    let Some(namespace) = pool.namespace() else {
        return Err(Error::NoNamespace { name });
    };
    let key = PoolKey::new(&namespace, &name).to_string();
    let generation = pool.metadata.generation.unwrap_or_default();
    let span = tracing::info_span!("reconcile", pool = %key, generation);
    let _guard = span.enter();

    let spec = &pool.spec;
    let resolved = match &spec.target.service {
        Some(target) => {
            let service = ctx
                .services
                .get(&ObjectRef::new(&target.name).within(&namespace));
            let slices = ctx.slices.state();
            let ours = slices.iter().map(Arc::as_ref).filter(|s| {
                s.metadata.namespace.as_deref() == Some(namespace.as_str())
                    && s.labels().get(SERVICE_NAME_LABEL) == Some(&target.name)
            });
            resolve_service(
                &ctx.address_map,
                &namespace,
                target,
                service.as_deref(),
                ours,
            )
        }
        None => Ok(static_addresses(spec)),
    };
    let (mut addresses, mut resolution) = match resolved {
        Ok(a) => (a, Ok(())),
        Err(e) => (Vec::new(), Err(e)),
    };
    // With `spec.tuning.mode: Apply`, the tuned settings in place of the
    // spec's (the status writer decides them; its write wakes this).
    let mut wire = spec_to_pb(&crate::advice::running_spec(&pool));
    if let Some(port) = spec.listen_port
        && let Some(other) = listen_port_holder(&ctx.pools.state(), port)
        && other != key
    {
        // Sent without the port and without addresses: nothing listens or
        // dials for it, and every other pool's configuration stays good.
        wire.listen_port = None;
        addresses.clear();
        resolution = Err(ResolveError::ListenPortTaken { port, other });
    }
    let entry = Entry {
        pool: pb::Pool {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: pool.uid().unwrap_or_default(),
            generation,
            spec: Some(wire),
            addresses,
        },
        resolution: resolution.clone(),
    };
    let addresses = entry.pool.addresses.len();
    let changed = ctx.desired.set(key.clone(), entry);

    let mut failures = ctx.failures.lock().unwrap_or_else(PoisonError::into_inner);
    let action = match &resolution {
        Ok(()) => {
            failures.remove(&key);
            tracing::info!(addresses, changed, "resolved");
            Action::requeue(RESYNC)
        }
        Err(e) => {
            let n = failures.entry(key).or_default();
            *n = n.saturating_add(1);
            let retry = backoff(*n);
            tracing::info!(reason = e.reason().as_str(), error = %e, ?retry, "target not resolved; the status says why");
            Action::requeue(retry)
        }
    };
    drop(failures);
    let result = if resolution.is_ok() {
        ReconcileResult::Ok
    } else {
        ReconcileResult::Unresolved
    };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel { result })
        .inc();
    ctx.metrics
        .reconcile_duration
        .observe(start.elapsed().as_secs_f64());
    Ok(action)
}

/// What happens after a failed reconcile: counted, retried in 5 s.
pub fn error_policy(_pool: Arc<ConnectionPool>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconcile failed");
    ctx.metrics.reconcile_errors.inc();
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel {
            result: ReconcileResult::Error,
        })
        .inc();
    Action::requeue(Duration::from_secs(5))
}

/// The pool that holds `listenPort` `port`, as `namespace/name`: of the
/// pools asking for it, the one created first (then the first by key), so
/// a later pool cannot take a port from one already serving on it.
pub fn listen_port_holder(pools: &[Arc<ConnectionPool>], port: i32) -> Option<String> {
    pools
        .iter()
        .filter(|p| p.spec.listen_port == Some(port))
        .map(|p| {
            let key = PoolKey::of(p).to_string();
            let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
            (created.is_none(), created, key)
        })
        .min()
        .map(|(_, _, key)| key)
}

/// The pools in `pools` that target Service `service` in `namespace`.
pub fn pools_targeting(
    pools: &Store<ConnectionPool>,
    namespace: &str,
    service: &str,
) -> Vec<ObjectRef<ConnectionPool>> {
    pools
        .state()
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(namespace)
                && p.spec
                    .target
                    .service
                    .as_ref()
                    .is_some_and(|s| s.name == service)
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store;
    use kube::runtime::watcher;
    use prometheus_client::registry::Registry;

    fn pool(yaml_spec: &str) -> ConnectionPool {
        serde_yaml::from_str(&format!(
            "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {{name: p, namespace: ns, uid: u, generation: 3}}\nspec:\n  {yaml_spec}\n"
        ))
        .unwrap()
    }

    fn context(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Arc<Context> {
        let (services_reader, mut w) = store();
        for s in services {
            w.apply_watcher_event(&watcher::Event::Apply(s));
        }
        let (slices_reader, mut w2) = store();
        for s in slices {
            w2.apply_watcher_event(&watcher::Event::Apply(s));
        }
        Arc::new(Context {
            desired: Arc::new(Desired::default()),
            pools: store().0,
            services: services_reader,
            slices: slices_reader,
            metrics: Metrics::new(&mut Registry::default()),
            address_map: AddressMap::default(),
            failures: Mutex::default(),
        })
    }

    #[tokio::test]
    async fn a_service_pool_resolves_to_its_ready_endpoints() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api", "namespace": "ns"},
            "spec": {"ports": [{"name": "grpc", "port": 50051}]}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api-1", "namespace": "ns", "labels": {SERVICE_NAME_LABEL: "api"}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 9000}],
            "endpoints": [{"addresses": ["127.0.0.2"]}, {"addresses": ["127.0.0.3"], "conditions": {"ready": false}}]
        }))
        .unwrap();
        let ctx = context(vec![svc], vec![slice]);
        let action = reconcile(
            Arc::new(pool("target: {service: {name: api, port: grpc}}")),
            ctx.clone(),
        )
        .await
        .unwrap();
        assert_eq!(action, Action::requeue(RESYNC));
        let entry = ctx.desired.get("ns/p").unwrap();
        assert_eq!(entry.pool.addresses, ["127.0.0.2:9000"]);
        assert_eq!((entry.pool.uid.as_str(), entry.pool.generation), ("u", 3));
        assert!(entry.resolution.is_ok());
    }

    #[tokio::test]
    async fn a_missing_service_is_recorded_and_retried_with_growing_backoff() {
        let ctx = context(vec![], vec![]);
        let p = Arc::new(pool("target: {service: {name: api, port: grpc}}"));
        let mut delays = Vec::new();
        for _ in 0..3 {
            delays.push(reconcile(p.clone(), ctx.clone()).await.unwrap());
        }
        assert_eq!(
            delays,
            [1, 2, 4].map(|s| Action::requeue(Duration::from_secs(s)))
        );
        let entry = ctx.desired.get("ns/p").unwrap();
        assert_eq!(
            entry.resolution.unwrap_err().reason().as_str(),
            "ServiceNotFound"
        );
        assert!(entry.pool.addresses.is_empty());
    }

    #[tokio::test]
    async fn a_static_pool_needs_no_lookup() {
        let ctx = context(vec![], vec![]);
        reconcile(
            Arc::new(pool("target: {addresses: ['127.0.0.3:1', '127.0.0.2:1']}")),
            ctx.clone(),
        )
        .await
        .unwrap();
        assert_eq!(
            ctx.desired.get("ns/p").unwrap().pool.addresses,
            ["127.0.0.2:1", "127.0.0.3:1"]
        );
    }

    fn pool_named(name: &str, created: &str, spec: &str) -> ConnectionPool {
        serde_yaml::from_str(&format!(
            "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {{name: {name}, namespace: ns, uid: u-{name}, generation: 1, creationTimestamp: '{created}'}}\nspec:\n  {spec}\n"
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn a_listen_port_taken_by_an_older_pool_is_refused_and_not_sent() {
        let old = pool_named(
            "old",
            "2026-01-01T00:00:00Z",
            "target: {addresses: ['127.0.0.2:1']}\n  listenPort: 16001",
        );
        let new = pool_named(
            "new",
            "2026-01-02T00:00:00Z",
            "target: {addresses: ['127.0.0.3:1']}\n  listenPort: 16001",
        );
        let other = pool_named(
            "other",
            "2026-01-03T00:00:00Z",
            "target: {addresses: ['127.0.0.4:1']}\n  listenPort: 16002",
        );
        let (reader, mut writer) = store();
        for p in [&new, &old, &other] {
            writer.apply_watcher_event(&watcher::Event::Apply(p.clone()));
        }
        let ctx = context(vec![], vec![]);
        let ctx = Arc::new(Context {
            desired: ctx.desired.clone(),
            pools: reader,
            services: ctx.services.clone(),
            slices: ctx.slices.clone(),
            metrics: ctx.metrics.clone(),
            address_map: AddressMap::default(),
            failures: Mutex::default(),
        });
        for p in [&new, &old, &other] {
            reconcile(Arc::new(p.clone()), ctx.clone()).await.unwrap();
        }
        let refused = ctx.desired.get("ns/new").unwrap();
        let err = refused.resolution.unwrap_err();
        assert_eq!(err.reason().as_str(), "ListenPortTaken");
        assert!(
            err.to_string()
                .contains("spec.listenPort 16001 is already used by pool ns/old"),
            "{err}"
        );
        assert_eq!(
            refused.pool.spec.unwrap().listen_port,
            None,
            "sent without the port"
        );
        assert!(refused.pool.addresses.is_empty(), "and without addresses");
        for kept in ["ns/old", "ns/other"] {
            let e = ctx.desired.get(kept).unwrap();
            assert!(e.resolution.is_ok(), "{kept}");
            assert!(e.pool.spec.unwrap().listen_port.is_some(), "{kept}");
        }
        assert_eq!(
            listen_port_holder(&ctx.pools.state(), 16001).as_deref(),
            Some("ns/old")
        );
        assert_eq!(listen_port_holder(&ctx.pools.state(), 9), None);
    }

    #[test]
    fn backoff_doubles_to_a_minute() {
        let got: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }
}
