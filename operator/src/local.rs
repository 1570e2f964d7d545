//! Node-local Services: a pool's way in by a plain Service name.
//!
//! For each pool with `spec.nodeLocalService`, the leader keeps, in the
//! pool's namespace:
//! - a **Service** without a selector, `internalTrafficPolicy: Local`, whose
//!   port targets the pool's `listenPort`;
//! - **EndpointSlices** for it that list every agent pod (its IP, its
//!   `nodeName`, the pool's `listenPort`), one per address family of at most
//!   [`MAX_ENDPOINTS`] endpoints.
//!
//! kube-proxy judges locality by each endpoint's `nodeName`, so a
//! connection to the Service reaches the agent on the caller's own node, and
//! fails fast on a node that has none (no local endpoint: no fallback).
//!
//! Endpoint conditions follow the agent pods: `ready` while the pod is
//! Ready and not terminating, `serving` while it is Ready (so a terminating
//! agent that still drains stays `serving`), `terminating` once it is being
//! deleted. With the DaemonSet's surge, the successor is ready on the node
//! before the predecessor terminates, and kube-proxy moves new connections
//! to it while the old one finishes its streams.
//!
//! Both objects are owned by the pool (`ownerReferences`, so deleting the
//! pool deletes them through the garbage collector) and labelled
//! [`POOL_UID_LABEL`]. A Service of the requested name that the pool does
//! not own is never written: the pool's `LocalService` condition names it.
//! Objects are created with a create (which fails on a name already taken),
//! then kept by server-side apply carrying the `resourceVersion` last seen,
//! so a concurrent replacement is a conflict, never an overwrite. Objects
//! the operator owns that no pool asks for any more are deleted, with the
//! uid as a precondition.
//!
//! Only the leader writes (checked on the [`Fence`] before every write).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource as _, ResourceExt as _};
use tidepool_crds::{ConnectionPool, PoolKey};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::leader::Fence;
use crate::metrics::{LocalObject, LocalOp, LocalWriteLabel, Metrics, WriteResult};
use crate::reason::Reason;
use crate::resolve::SERVICE_NAME_LABEL;

/// Set on every object the operator keeps for a pool: the pool's uid (a
/// pool's name may be longer than a label value allows).
pub const POOL_UID_LABEL: &str = "tidepool.dev/pool-uid";

/// The EndpointSlice label that tells the API's own controllers the slice
/// is someone else's.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// Our value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "tidepool.dev-operator";

/// The field manager of the operator's writes.
const FIELD_MANAGER: &str = "tidepool-operator";

/// The most endpoints in one EndpointSlice (the API's limit). Agents are
/// one per node, so one slice per address family holds up to 1000 nodes.
pub const MAX_ENDPOINTS: usize = 1000;

/// The Service port's name and the slices' port name.
const PORT_NAME: &str = "grpc";

/// gRPC without TLS, as kube-proxy-aware meshes and Gateways read it.
const APP_PROTOCOL: &str = "kubernetes.io/h2c";

/// How often everything is checked even when no watch event came.
const RESYNC: Duration = Duration::from_secs(30);

/// Which agent pods the operator lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPods {
    /// The agents' namespace.
    pub namespace: String,
    /// Their label selector (the DaemonSet's).
    pub selector: String,
}

/// What became of one pool's node-local Service, for its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalState {
    /// The Service and its slices are as they should be.
    Serving {
        /// `name.namespace:port`.
        service: String,
        /// The agents' port.
        target_port: i32,
        /// Nodes with a ready agent endpoint.
        ready_nodes: BTreeSet<String>,
    },
    /// A Service of that name exists and the pool does not own it.
    NameTaken {
        /// `namespace/name`.
        service: String,
    },
    /// Another pool holds the `listenPort` the Service would target.
    ListenPortTaken {
        /// The port.
        port: i32,
        /// `namespace/name` of the pool holding it.
        other: String,
    },
    /// The operator was started without an agent selector.
    NotConfigured,
    /// A write failed; retried.
    Failed {
        /// What failed.
        error: String,
    },
}

impl LocalState {
    /// The `LocalService` condition's reason.
    pub fn reason(&self) -> Reason {
        match self {
            Self::Serving { .. } => Reason::Serving,
            Self::NameTaken { .. } => Reason::ServiceNameTaken,
            Self::ListenPortTaken { .. } => Reason::ListenPortTaken,
            Self::NotConfigured => Reason::AgentSelectorMissing,
            Self::Failed { .. } => Reason::WriteFailed,
        }
    }
}

/// Every pool's [`LocalState`], by `namespace/name`; written by the sync
/// loop, read by the status writer.
#[derive(Debug, Default)]
pub struct LocalStates {
    states: Mutex<HashMap<String, LocalState>>,
}

impl LocalStates {
    /// The state of pool `key`, if it asks for a Service and was synced.
    pub fn get(&self, key: &str) -> Option<LocalState> {
        self.lock().get(key).cloned()
    }

    fn replace(&self, states: HashMap<String, LocalState>) {
        *self.lock() = states;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LocalState>> {
        self.states.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One agent pod as an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AgentEndpoint {
    pod: String,
    node: String,
    ips: Vec<IpAddr>,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// The agent pods that can be endpoints: scheduled, with an IP, sorted by
/// node then pod name.
fn agent_endpoints<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Vec<AgentEndpoint> {
    let mut out: Vec<AgentEndpoint> = pods
        .into_iter()
        .filter_map(|pod| {
            let node = pod.spec.as_ref()?.node_name.clone()?;
            let status = pod.status.as_ref()?;
            let mut ips: Vec<IpAddr> = status
                .pod_ips
                .iter()
                .flatten()
                .filter_map(|p| p.ip.parse().ok())
                .collect();
            if ips.is_empty()
                && let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
            {
                ips.push(ip);
            }
            if ips.is_empty() {
                return None;
            }
            let pod_ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let terminating = pod.metadata.deletion_timestamp.is_some();
            Some(AgentEndpoint {
                pod: pod.name_any(),
                node,
                ips,
                ready: pod_ready && !terminating,
                serving: pod_ready,
                terminating,
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.node, &a.pod).cmp(&(&b.node, &b.pod)));
    out
}

fn owner(pool: &ConnectionPool) -> Option<OwnerReference> {
    let mut o = pool.controller_owner_ref(&())?;
    o.block_owner_deletion = Some(true);
    Some(o)
}

fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.kind == ConnectionPool::kind(&()) && o.controller == Some(true))
}

/// Owned by some ConnectionPool: one of ours, whichever pool.
fn owned_by_a_pool(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| {
            o.kind == ConnectionPool::kind(&())
                && o.api_version == ConnectionPool::api_version(&())
                && o.controller == Some(true)
        })
        .map(|o| o.uid.as_str())
}

/// The Service a pool asks for; `None` when it asks for none (or has no
/// namespace, uid or port, which the API server guarantees it has).
pub fn desired_service(pool: &ConnectionPool) -> Option<Service> {
    let local = pool.spec.node_local_service.as_ref()?;
    let target_port = pool.spec.listen_port?;
    let port = local.service_port(pool.spec.listen_port)?;
    let uid = pool.uid()?;
    Some(Service {
        metadata: ObjectMeta {
            name: Some(local.name.clone()),
            namespace: pool.namespace(),
            labels: Some(BTreeMap::from([
                (POOL_UID_LABEL.into(), uid),
                ("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into()),
            ])),
            owner_references: Some(vec![owner(pool)?]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            internal_traffic_policy: Some("Local".into()),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.into()),
                port,
                target_port: Some(IntOrString::Int(target_port)),
                protocol: Some("TCP".into()),
                app_protocol: Some(APP_PROTOCOL.into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// The slices a pool's Service needs for `agents`: one per address family
/// and chunk of [`MAX_ENDPOINTS`], named `<service>-tidepool-<family>[-n]`.
fn desired_slices(pool: &ConnectionPool, agents: &[AgentEndpoint]) -> Vec<EndpointSlice> {
    let (Some(local), Some(port), Some(uid), Some(owner)) = (
        pool.spec.node_local_service.as_ref(),
        pool.spec.listen_port,
        pool.uid(),
        owner(pool),
    ) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (family, v4) in [("ipv4", true), ("ipv6", false)] {
        let endpoints: Vec<Endpoint> = agents
            .iter()
            .filter_map(|a| {
                let ip = a.ips.iter().find(|ip| ip.is_ipv4() == v4)?;
                Some(Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(a.ready),
                        serving: Some(a.serving),
                        terminating: Some(a.terminating),
                    }),
                    node_name: Some(a.node.clone()),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: Some(a.pod.clone()),
                        ..ObjectReference::default()
                    }),
                    ..Endpoint::default()
                })
            })
            .collect();
        // An empty IPv4 slice is kept, so a Service whose agents are all
        // gone still shows (in its slice) that it has no endpoint.
        if endpoints.is_empty() && !v4 {
            continue;
        }
        let chunks: Vec<&[Endpoint]> = if endpoints.is_empty() {
            vec![&[]]
        } else {
            endpoints.chunks(MAX_ENDPOINTS).collect()
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            let name = if i == 0 {
                format!("{}-tidepool-{family}", local.name)
            } else {
                format!("{}-tidepool-{family}-{i}", local.name)
            };
            out.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: pool.namespace(),
                    labels: Some(BTreeMap::from([
                        (SERVICE_NAME_LABEL.into(), local.name.clone()),
                        (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
                        (POOL_UID_LABEL.into(), uid.clone()),
                    ])),
                    owner_references: Some(vec![owner.clone()]),
                    ..ObjectMeta::default()
                },
                address_type: if v4 { "IPv4" } else { "IPv6" }.into(),
                endpoints: chunk.to_vec(),
                ports: Some(vec![EndpointPort {
                    name: Some(PORT_NAME.into()),
                    port: Some(port),
                    protocol: Some("TCP".into()),
                    app_protocol: Some(APP_PROTOCOL.into()),
                }]),
            });
        }
    }
    out
}

/// Whether `have` already carries what `want` sets (the API server adds
/// defaults; only our fields are compared).
fn service_current(have: &Service, want: &Service) -> bool {
    let ports = |s: &Service| {
        s.spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.name, p.port, p.target_port, p.protocol, p.app_protocol))
            .collect::<Vec<_>>()
    };
    let policy = |s: &Service| {
        s.spec
            .as_ref()
            .and_then(|s| s.internal_traffic_policy.clone())
    };
    let selector = |s: &Service| {
        s.spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .filter(|s| !s.is_empty())
    };
    labels_current(&have.metadata, &want.metadata)
        && ports(have) == ports(want)
        && policy(have) == policy(want)
        && selector(have).is_none()
}

fn slice_current(have: &EndpointSlice, want: &EndpointSlice) -> bool {
    let endpoints = |s: &EndpointSlice| {
        s.endpoints
            .iter()
            .map(|e| {
                (
                    e.addresses.clone(),
                    e.node_name.clone(),
                    e.conditions.clone(),
                    e.target_ref.as_ref().and_then(|r| r.name.clone()),
                )
            })
            .collect::<Vec<_>>()
    };
    labels_current(&have.metadata, &want.metadata)
        && have.address_type == want.address_type
        && have.ports == want.ports
        && endpoints(have) == endpoints(want)
}

fn labels_current(have: &ObjectMeta, want: &ObjectMeta) -> bool {
    let have_labels = have.labels.clone().unwrap_or_default();
    want.labels
        .iter()
        .flatten()
        .all(|(k, v)| have_labels.get(k) == Some(v))
        && want
            .owner_references
            .iter()
            .flatten()
            .all(|o| owned_by(have, &o.uid))
}

/// Why a write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This replica no longer leads.
    #[error("not the leader any more; nothing written")]
    Fenced,
    /// An object of the name exists and the pool does not own it.
    #[error("{kind} {namespace}/{name} exists and the pool does not own it; it is left as it is")]
    NotOwned {
        /// Service or EndpointSlice.
        kind: &'static str,
        /// The object's namespace.
        namespace: String,
        /// The object's name.
        name: String,
    },
    /// The API refused or failed the write.
    #[error("{op} {kind} {namespace}/{name}: {source}")]
    Api {
        /// create, apply or delete.
        op: &'static str,
        /// Service or EndpointSlice.
        kind: &'static str,
        /// The object's namespace.
        namespace: String,
        /// The object's name.
        name: String,
        /// The API's answer.
        #[source]
        source: kube::Error,
    },
}

/// The sync loop's inputs.
pub struct Sync {
    /// For writes.
    pub client: kube::Client,
    /// Every pool.
    pub pools: Store<ConnectionPool>,
    /// Services (the operator's watch).
    pub services: Store<Service>,
    /// EndpointSlices (the operator's watch; ours carry the service-name
    /// label it selects on).
    pub slices: Store<EndpointSlice>,
    /// The agent pods, or `None` without `--agent-selector`.
    pub agents: Option<Store<Pod>>,
    /// Woken by every watch event that may change what is needed.
    pub wake: Arc<Notify>,
    /// Results, for the status writer.
    pub states: Arc<LocalStates>,
    /// Only the leader writes.
    pub fence: Fence,
    /// Counts writes.
    pub metrics: Metrics,
    /// Waited for after a wake, so a burst of events is one pass.
    pub debounce: Duration,
}

impl std::fmt::Debug for Sync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sync").finish_non_exhaustive()
    }
}

impl Sync {
    /// Runs passes until `stop`: on every wake (debounced) and every
    /// `RESYNC` (30 s), while this replica leads. The caller starts it once every
    /// store has listed, so nothing is deleted for a pool not seen yet.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            if self.fence.holds() {
                self.pass().await;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(RESYNC) => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.debounce) => {}
            }
        }
    }

    /// One pass over every pool: writes what differs, records each pool's
    /// state, deletes what no pool asks for.
    pub async fn pass(&self) {
        let pools = self.pools.state();
        let agents = self
            .agents
            .as_ref()
            .map(|s| agent_endpoints(s.state().iter().map(Arc::as_ref)));
        // The same for every pool: the nodes with a ready agent.
        let ready_nodes: BTreeSet<String> = agents
            .iter()
            .flatten()
            .filter(|a| a.ready)
            .map(|a| a.node.clone())
            .collect();
        let mut states = HashMap::new();
        // (namespace, name) of every object some pool keeps.
        let mut wanted_services: HashSet<(String, String)> = HashSet::new();
        let mut wanted_slices: HashSet<(String, String)> = HashSet::new();
        for pool in pools.iter() {
            let Some(want) = desired_service(pool) else {
                continue;
            };
            let key = PoolKey::of(pool).to_string();
            let (ns, name) = (want.namespace().unwrap_or_default(), want.name_any());
            let Some(agents) = &agents else {
                states.insert(key, LocalState::NotConfigured);
                continue;
            };
            if let Some(port) = pool.spec.listen_port
                && let Some(other) = crate::reconcile::listen_port_holder(&pools, port)
                && other != key
            {
                // Its Service would reach the other pool's listener (one
                // of ours made before is swept below).
                states.insert(key, LocalState::ListenPortTaken { port, other });
                continue;
            }
            let uid = pool.uid().unwrap_or_default();
            let have = self.services.get(&ObjectRef::new(&name).within(&ns));
            if let Some(have) = &have
                && !owned_by(&have.metadata, &uid)
            {
                states.insert(
                    key,
                    LocalState::NameTaken {
                        service: format!("{ns}/{name}"),
                    },
                );
                continue;
            }
            wanted_services.insert((ns.clone(), name.clone()));
            let mut result = self.ensure_service(have.as_deref(), &want).await;
            let slices = desired_slices(pool, agents);
            for slice in &slices {
                let slice_name = slice.name_any();
                wanted_slices.insert((ns.clone(), slice_name.clone()));
                if result.is_err() {
                    continue;
                }
                let have = self.slices.get(&ObjectRef::new(&slice_name).within(&ns));
                result = self.ensure_slice(have.as_deref(), slice, &uid).await;
            }
            let state = match result {
                Ok(()) => LocalState::Serving {
                    service: format!("{name}.{ns}:{}", service_port(&want)),
                    target_port: pool.spec.listen_port.unwrap_or_default(),
                    ready_nodes: ready_nodes.clone(),
                },
                Err(WriteError::Fenced) => return,
                Err(error) => {
                    tracing::warn!(pool = %key, %error, "node-local Service not written; retried");
                    LocalState::Failed {
                        error: error.to_string(),
                    }
                }
            };
            states.insert(key, state);
        }
        self.states.replace(states);
        if let Err(WriteError::Fenced) = self.sweep(&wanted_services, &wanted_slices).await {
            tracing::debug!("sweep stopped: not the leader");
        }
    }

    fn count(&self, object: LocalObject, op: LocalOp, ok: bool) {
        self.metrics
            .local_service_writes
            .get_or_create(&LocalWriteLabel {
                object,
                op,
                result: if ok {
                    WriteResult::Ok
                } else {
                    WriteResult::Error
                },
            })
            .inc();
    }

    async fn ensure_service(
        &self,
        have: Option<&Service>,
        want: &Service,
    ) -> Result<(), WriteError> {
        if have.is_some_and(|h| service_current(h, want)) {
            return Ok(());
        }
        let (ns, name) = (want.namespace().unwrap_or_default(), want.name_any());
        let api: Api<Service> = Api::namespaced(self.client.clone(), &ns);
        self.write(
            api,
            have.map(|h| h.metadata.clone()),
            want.clone(),
            "Service",
            &ns,
            &name,
        )
        .await
    }

    async fn ensure_slice(
        &self,
        have: Option<&EndpointSlice>,
        want: &EndpointSlice,
        uid: &str,
    ) -> Result<(), WriteError> {
        if have.is_some_and(|h| slice_current(h, want)) {
            return Ok(());
        }
        let (ns, name) = (want.namespace().unwrap_or_default(), want.name_any());
        if let Some(h) = have
            && !owned_by(&h.metadata, uid)
        {
            // A slice of our name that is not ours: leave it, and say so.
            return Err(WriteError::NotOwned {
                kind: "EndpointSlice",
                namespace: ns,
                name,
            });
        }
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &ns);
        self.write(
            api,
            have.map(|h| h.metadata.clone()),
            want.clone(),
            "EndpointSlice",
            &ns,
            &name,
        )
        .await
    }

    /// Creates `want` when `have` is `None` (failing on a name taken since),
    /// else applies it over `have`'s resourceVersion.
    async fn write<K>(
        &self,
        api: Api<K>,
        have: Option<ObjectMeta>,
        mut want: K,
        kind: &'static str,
        ns: &str,
        name: &str,
    ) -> Result<(), WriteError>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        if !self.fence.holds() {
            return Err(WriteError::Fenced);
        }
        let (op, result) = match have {
            None => {
                let pp = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PostParams::default()
                };
                (LocalOp::Create, api.create(&pp, &want).await.map(drop))
            }
            Some(meta) => {
                want.meta_mut().resource_version = meta.resource_version;
                let pp = PatchParams::apply(FIELD_MANAGER).force();
                (
                    LocalOp::Apply,
                    api.patch(name, &pp, &Patch::Apply(&want)).await.map(drop),
                )
            }
        };
        self.count(
            if kind == "Service" {
                LocalObject::Service
            } else {
                LocalObject::EndpointSlice
            },
            op,
            result.is_ok(),
        );
        match result {
            Ok(()) => {
                tracing::info!(%kind, namespace = %ns, %name, %op, "node-local Service written");
                Ok(())
            }
            Err(source) => Err(WriteError::Api {
                op: op.as_str(),
                kind,
                namespace: ns.into(),
                name: name.into(),
                source,
            }),
        }
    }

    /// Deletes the Services and slices a pool owns that no pool asks for
    /// any more (the pool is gone, or renamed its Service or dropped it).
    async fn sweep(
        &self,
        services: &HashSet<(String, String)>,
        slices: &HashSet<(String, String)>,
    ) -> Result<(), WriteError> {
        for svc in self.services.state() {
            let key = (svc.namespace().unwrap_or_default(), svc.name_any());
            if services.contains(&key)
                || owned_by_a_pool(&svc.metadata).is_none()
                || !has_pool_label(&svc.metadata)
            {
                continue;
            }
            self.delete::<Service>(&key.0, &key.1, svc.uid(), "Service")
                .await?;
        }
        for slice in self.slices.state() {
            let key = (slice.namespace().unwrap_or_default(), slice.name_any());
            let ours = slice.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY);
            if slices.contains(&key) || !ours || owned_by_a_pool(&slice.metadata).is_none() {
                continue;
            }
            self.delete::<EndpointSlice>(&key.0, &key.1, slice.uid(), "EndpointSlice")
                .await?;
        }
        Ok(())
    }

    async fn delete<K>(
        &self,
        ns: &str,
        name: &str,
        uid: Option<String>,
        kind: &'static str,
    ) -> Result<(), WriteError>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        if !self.fence.holds() {
            return Err(WriteError::Fenced);
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid,
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let result = api.delete(name, &dp).await;
        let ok = match &result {
            Ok(_) => true,
            Err(kube::Error::Api(e)) => e.code == 404,
            Err(_) => false,
        };
        self.count(
            if kind == "Service" {
                LocalObject::Service
            } else {
                LocalObject::EndpointSlice
            },
            LocalOp::Delete,
            ok,
        );
        match result {
            Ok(_) => {
                tracing::info!(%kind, namespace = %ns, %name, "deleted: no pool asks for it any more")
            }
            Err(error) if !ok => {
                tracing::warn!(%kind, namespace = %ns, %name, %error, "delete failed; retried")
            }
            Err(_) => {}
        }
        Ok(())
    }
}

fn has_pool_label(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|l| l.contains_key(POOL_UID_LABEL))
}

fn service_port(svc: &Service) -> i32 {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
        .map_or(0, |p| p.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(spec: &str) -> ConnectionPool {
        serde_yaml::from_str(&format!(
            "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {{name: payments, namespace: shop, uid: u-1, generation: 1}}\nspec:\n  target: {{service: {{name: payments, port: 50051}}}}\n  {spec}\n"
        ))
        .unwrap()
    }

    fn agent(name: &str, node: &str, ips: &[&str], ready: bool, deleting: bool) -> Pod {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "tidepool"},
            "spec": {"nodeName": node, "containers": []},
            "status": {
                "podIPs": ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect::<Vec<_>>(),
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
            }
        }))
        .unwrap();
        if deleting {
            p.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
        }
        p
    }

    #[test]
    fn the_service_targets_the_listen_port_and_is_local_and_owned() {
        let p = pool("listenPort: 16001\n  nodeLocalService: {name: payments-pooled, port: 50051}");
        let svc = desired_service(&p).unwrap();
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Local"));
        assert!(spec.selector.is_none());
        let port = &spec.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.port, port.target_port.clone()),
            (50051, Some(IntOrString::Int(16001)))
        );
        assert!(owned_by(&svc.metadata, "u-1"));
        assert!(!owned_by(&svc.metadata, "u-2"));
        // No port: the listenPort.
        let p = pool("listenPort: 16001\n  nodeLocalService: {name: payments-pooled}");
        assert_eq!(service_port(&desired_service(&p).unwrap()), 16001);
        // Not asked for: nothing.
        assert!(desired_service(&pool("listenPort: 16001")).is_none());
    }

    #[test]
    fn endpoints_follow_the_agent_pods_conditions() {
        let pods = [
            agent("a-new", "n1", &["10.0.0.5"], true, false),
            agent("a-old", "n1", &["10.0.0.4"], true, true),
            agent("b", "n2", &["10.0.1.4", "fd00::4"], false, false),
            agent("c", "n3", &[], true, false),
        ];
        let eps = agent_endpoints(pods.iter());
        let got: Vec<_> = eps
            .iter()
            .map(|e| (e.pod.as_str(), e.ready, e.serving, e.terminating))
            .collect();
        assert_eq!(
            got,
            [
                ("a-new", true, true, false),
                ("a-old", false, true, true),
                ("b", false, false, false),
            ],
            "pod c has no IP yet and is left out"
        );
        let p = pool("listenPort: 16001\n  nodeLocalService: {name: payments-pooled}");
        let slices = desired_slices(&p, &eps);
        let names: Vec<_> = slices.iter().map(|s| s.name_any()).collect();
        assert_eq!(
            names,
            [
                "payments-pooled-tidepool-ipv4",
                "payments-pooled-tidepool-ipv6"
            ]
        );
        assert_eq!(slices[0].endpoints.len(), 3);
        assert_eq!(slices[1].endpoints.len(), 1);
        assert_eq!(slices[1].endpoints[0].addresses, ["fd00::4"]);
        assert_eq!(slices[0].endpoints[0].node_name.as_deref(), Some("n1"));
        assert_eq!(slices[0].ports.as_ref().unwrap()[0].port, Some(16001));
        let labels = slices[0].metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "payments-pooled");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
    }

    #[test]
    fn with_no_agent_an_empty_ipv4_slice_is_kept() {
        let p = pool("listenPort: 16001\n  nodeLocalService: {name: payments-pooled}");
        let slices = desired_slices(&p, &[]);
        assert_eq!(slices.len(), 1);
        assert!(slices[0].endpoints.is_empty());
    }

    #[test]
    fn a_thousand_and_one_agents_take_two_slices() {
        let eps: Vec<AgentEndpoint> = (0..=MAX_ENDPOINTS)
            .map(|i| AgentEndpoint {
                pod: format!("a{i:05}"),
                node: format!("n{i:05}"),
                ips: vec![IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8])],
                ready: true,
                serving: true,
                terminating: false,
            })
            .collect();
        let p = pool("listenPort: 16001\n  nodeLocalService: {name: s}");
        let slices = desired_slices(&p, &eps);
        let sizes: Vec<_> = slices
            .iter()
            .map(|s| (s.name_any(), s.endpoints.len()))
            .collect();
        assert_eq!(
            sizes,
            [
                ("s-tidepool-ipv4".into(), MAX_ENDPOINTS),
                ("s-tidepool-ipv4-1".into(), 1)
            ]
        );
    }

    #[test]
    fn comparisons_ignore_server_defaults_and_see_our_changes() {
        let p = pool("listenPort: 16001\n  nodeLocalService: {name: payments-pooled, port: 50051}");
        let want = desired_service(&p).unwrap();
        let mut have = want.clone();
        let spec = have.spec.as_mut().unwrap();
        spec.cluster_ip = Some("10.96.0.9".into());
        spec.type_ = Some("ClusterIP".into());
        spec.session_affinity = Some("None".into());
        assert!(service_current(&have, &want));
        have.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 50052;
        assert!(!service_current(&have, &want));

        let eps = agent_endpoints([agent("a", "n1", &["10.0.0.5"], true, false)].iter());
        let want = desired_slices(&p, &eps).remove(0);
        let mut have = want.clone();
        have.metadata.resource_version = Some("7".into());
        assert!(slice_current(&have, &want));
        have.endpoints[0].conditions.as_mut().unwrap().ready = Some(false);
        assert!(!slice_current(&have, &want));
    }
}
