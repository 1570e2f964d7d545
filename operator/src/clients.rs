//! The pod maps agents check `spec.clients` against: for each node, the IP
//! of every pod on it and the pod's namespace, sent to that node's agent
//! only (`NodeClients` on the control stream).
//!
//! One watch of Pods, cluster-wide (a client may be in any namespace),
//! filtered by the API server to pods that are not on the host network and
//! not finished, and stripped to the fields the map needs before they are
//! stored. After a change the maps are rebuilt once the pods have been
//! quiet for the push debounce (at most [`crate::push::MAX_DELAY`] after
//! the first change), and each node whose map changed gets it.
//!
//! What counts as a client IP of a node: `status.podIPs` (or `podIP`) of
//! every pod with `spec.nodeName` set to the node. Host-network pods are
//! left out: they share the node's IP, so the IP does not say which pod
//! (or which namespace) a connection comes from, and a pool with a list
//! refuses them. An IP two pods of different namespaces claim at once (a
//! stale status) is left out too, so refused, rather than guessed.
//! Finished pods (`Succeeded`, `Failed`) are left out: their IP may
//! already be another pod's.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tidepool_crds::control::{clients_version, pb};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::metrics::Metrics;

/// What the pod watch asks the API server for: pods that can be clients.
pub const POD_FIELD_SELECTOR: &str =
    "spec.hostNetwork=false,status.phase!=Succeeded,status.phase!=Failed";

/// The latest map of a node, `None` until the pods have been listed.
pub type MapReceiver = watch::Receiver<Option<Arc<pb::NodeClients>>>;

/// Every node's latest map, as a channel its sessions watch.
///
/// Invariants: `inner` is locked only to subscribe or to hand out new
/// maps (no await under it). A node has a channel while an agent session
/// of it watches or while pods run on it. Until the pod watch has listed
/// everything once (`listed`), every channel's value is `None`, so no
/// session is sent a map built from a partial list (which would refuse
/// clients the agent still knows); after it, a node's value is always its
/// map, empty for a node without pods.
#[derive(Debug, Default)]
pub struct NodeClients {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Whether [`NodeClients::update`] has run once.
    listed: bool,
    nodes: HashMap<String, watch::Sender<Option<Arc<pb::NodeClients>>>>,
}

/// A map of these pods, with its version.
fn map_of(pods: Vec<pb::PodAddress>) -> Arc<pb::NodeClients> {
    let version = clients_version(&pods);
    Arc::new(pb::NodeClients { version, pods })
}

impl NodeClients {
    /// The channel of `node`'s map, made if it has none (holding an empty
    /// map once the pods have been listed: the node has none).
    pub fn subscribe(&self, node: &str) -> MapReceiver {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let listed = inner.listed;
        inner
            .nodes
            .entry(node.to_owned())
            .or_insert_with(|| watch::Sender::new(listed.then(|| map_of(Vec::new()))))
            .subscribe()
    }

    /// Hands every node its map from `maps` (an empty one to a watched node
    /// that has no pod any more). Returns how many nodes' maps changed.
    pub fn update(&self, mut maps: BTreeMap<String, Vec<pb::PodAddress>>) -> usize {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.listed = true;
        let nodes = &mut inner.nodes;
        let mut changed = 0;
        for (node, tx) in nodes.iter() {
            let pods = maps.remove(node).unwrap_or_default();
            let version = clients_version(&pods);
            let modified = tx.send_if_modified(|current| {
                if current.as_ref().is_some_and(|c| c.version == version) {
                    return false;
                }
                *current = Some(Arc::new(pb::NodeClients { version, pods }));
                true
            });
            changed += usize::from(modified);
        }
        for (node, pods) in maps {
            nodes.insert(node, watch::Sender::new(Some(map_of(pods))));
            changed += 1;
        }
        // Forget nodes no session watches and no pod runs on.
        nodes.retain(|_, tx| {
            tx.receiver_count() > 0 || tx.borrow().as_ref().is_some_and(|m| !m.pods.is_empty())
        });
        changed
    }
}

/// The client IPs of each node: pod IP to namespace, sorted by IP, from
/// every pod that can be a client (see the module's header).
pub fn node_maps<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
) -> BTreeMap<String, Vec<pb::PodAddress>> {
    // node -> ip -> namespace, None once two namespaces claim the IP.
    let mut by_node: BTreeMap<&str, BTreeMap<&str, Option<&str>>> = BTreeMap::new();
    for pod in pods {
        let (Some(spec), Some(status), Some(namespace)) =
            (&pod.spec, &pod.status, pod.metadata.namespace.as_deref())
        else {
            continue;
        };
        let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        if spec.host_network == Some(true)
            || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
        {
            continue;
        }
        let ips = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
        let ips: Vec<&str> = match status.pod_ip.as_deref() {
            Some(ip) if status.pod_ips.as_ref().is_none_or(Vec::is_empty) => vec![ip],
            _ => ips.collect(),
        };
        let node_ips = by_node.entry(node).or_default();
        for ip in ips.into_iter().filter(|ip| !ip.is_empty()) {
            node_ips
                .entry(ip)
                .and_modify(|seen| {
                    if *seen != Some(namespace) {
                        tracing::debug!(%node, %ip, namespace, other = ?seen, "two namespaces claim a pod IP; it is left out");
                        *seen = None;
                    }
                })
                .or_insert(Some(namespace));
        }
    }
    by_node
        .into_iter()
        .map(|(node, ips)| {
            let pods = ips
                .into_iter()
                .filter_map(|(ip, ns)| {
                    ns.map(|ns| pb::PodAddress {
                        ip: ip.to_owned(),
                        namespace: ns.to_owned(),
                    })
                })
                .collect();
            (node.to_owned(), pods)
        })
        .collect()
}

/// What the store keeps of a pod: its name and namespace, node, host
/// network flag, phase and IPs. A cluster's pods are many and most of each
/// is of no use here.
pub fn strip(pod: &mut Pod) {
    let metadata = std::mem::take(&mut pod.metadata);
    pod.metadata = ObjectMeta {
        name: metadata.name,
        namespace: metadata.namespace,
        uid: metadata.uid,
        resource_version: metadata.resource_version,
        ..ObjectMeta::default()
    };
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        host_network: spec.host_network,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        pod_ip: status.pod_ip,
        pod_ips: status
            .pod_ips
            .map(|ips| ips.into_iter().map(|p| PodIP { ip: p.ip }).collect()),
        ..PodStatus::default()
    });
}

/// Starts the pod watch and the map builder, both until `stop`. Maps are
/// built only after the first full list.
pub fn start(
    tasks: &mut tidepool_common::supervise::Supervisor,
    client: kube::Client,
    clients: Arc<NodeClients>,
    debounce: Duration,
    stop: CancellationToken,
) {
    let (store, writer) = reflector::store();
    let (changes_tx, changes) = watch::channel(0u64);
    let stream = watcher(
        Api::<Pod>::all(client),
        watcher::Config::default().fields(POD_FIELD_SELECTOR),
    )
    .default_backoff()
    .modify(strip)
    .reflect(writer);
    let watch_stop = stop.clone();
    tasks.spawn("pod watch (spec.clients)", async move {
        let drain = stream.for_each(|event| {
            match event {
                Ok(_) => changes_tx.send_modify(|n| *n += 1),
                Err(error) => {
                    tracing::warn!(kind = "Pod", %error, "watch failed; retrying with backoff")
                }
            }
            std::future::ready(())
        });
        tokio::select! {
            _ = drain => {}
            _ = watch_stop.cancelled() => {}
        }
    });
    tasks.spawn(
        "pod maps (spec.clients)",
        run(store, changes, clients, debounce, stop),
    );
}

async fn run(
    pods: Store<Pod>,
    mut changes: watch::Receiver<u64>,
    clients: Arc<NodeClients>,
    debounce: Duration,
    stop: CancellationToken,
) {
    tokio::select! {
        _ = stop.cancelled() => return,
        r = pods.wait_until_ready() => if r.is_err() { return },
    }
    tracing::info!(
        pods = pods.len(),
        "pods listed; sending agents their nodes' pod maps"
    );
    loop {
        changes.mark_unchanged();
        let state = pods.state();
        let maps = node_maps(state.iter().map(|p| &**p));
        let nodes = maps.len();
        let changed = clients.update(maps);
        tracing::debug!(pods = state.len(), nodes, changed, "pod maps rebuilt");
        if !crate::push::settle(&mut changes, debounce, &stop).await {
            return;
        }
    }
}

/// Sends `node`'s map, if there is one yet, and marks it seen. Called
/// before a session's snapshot writer starts, so an agent has its map
/// before the pools that need it. `false` when the stream is gone.
pub async fn send_current(
    maps: &mut MapReceiver,
    tx: &mpsc::Sender<Result<pb::OperatorMessage, Status>>,
    metrics: &Metrics,
) -> bool {
    let Some(map) = maps.borrow_and_update().clone() else {
        return true;
    };
    let message = pb::OperatorMessage {
        kind: Some(pb::operator_message::Kind::Clients((*map).clone())),
    };
    if tx.send(Ok(message)).await.is_err() {
        return false;
    }
    metrics.client_maps_sent.inc();
    tracing::debug!(version = %map.version, pods = map.pods.len(), "pod map sent");
    true
}

/// Sends every new map of the node until the stream is gone.
pub async fn write(
    mut maps: MapReceiver,
    tx: mpsc::Sender<Result<pb::OperatorMessage, Status>>,
    metrics: Metrics,
) -> &'static str {
    loop {
        if maps.changed().await.is_err() {
            return "the operator is stopping";
        }
        if !send_current(&mut maps, &tx, &metrics).await {
            return "the stream closed";
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(namespace: &str, name: &str, node: &str, ips: &[&str]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: Some([("app".to_owned(), "x".to_owned())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                service_account_name: Some("sa".into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: ips.first().map(|ip| (*ip).into()),
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: (*ip).into() }).collect()),
                host_ip: Some("192.168.0.1".into()),
                ..PodStatus::default()
            }),
        }
    }

    fn entries(maps: &BTreeMap<String, Vec<pb::PodAddress>>, node: &str) -> Vec<(String, String)> {
        maps.get(node)
            .into_iter()
            .flatten()
            .map(|p| (p.ip.clone(), p.namespace.clone()))
            .collect()
    }

    fn e(ip: &str, ns: &str) -> (String, String) {
        (ip.into(), ns.into())
    }

    #[test]
    fn each_node_gets_its_own_pods_every_ip_sorted() {
        let pods = [
            pod("shop", "a", "n1", &["10.1.0.9", "fd00::9"]),
            pod("billing", "b", "n1", &["10.1.0.10"]),
            pod("shop", "c", "n2", &["10.2.0.5"]),
        ];
        let maps = node_maps(&pods);
        assert_eq!(
            entries(&maps, "n1"),
            [
                e("10.1.0.10", "billing"),
                e("10.1.0.9", "shop"),
                e("fd00::9", "shop")
            ]
        );
        assert_eq!(entries(&maps, "n2"), [e("10.2.0.5", "shop")]);
    }

    #[test]
    fn host_network_finished_unscheduled_and_ipless_pods_are_left_out() {
        let mut host = pod("kube-system", "proxy", "n1", &["192.168.0.1"]);
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut done = pod("shop", "job", "n1", &["10.1.0.3"]);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut failed = pod("shop", "job2", "n1", &["10.1.0.4"]);
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        let mut pending = pod("shop", "new", "", &[]);
        pending.spec.as_mut().unwrap().node_name = None;
        let starting = pod("shop", "starting", "n1", &[]);
        // Only podIP, as an older API server writes it.
        let mut old = pod("shop", "old", "n1", &[]);
        old.status.as_mut().unwrap().pod_ip = Some("10.1.0.8".into());
        let maps = node_maps(&[host, done, failed, pending, starting, old]);
        assert_eq!(entries(&maps, "n1"), [e("10.1.0.8", "shop")]);
    }

    #[test]
    fn an_ip_claimed_by_two_namespaces_is_left_out() {
        let maps = node_maps(&[
            pod("shop", "a", "n1", &["10.1.0.9"]),
            pod("dev", "b", "n1", &["10.1.0.9"]),
            pod("dev", "c", "n1", &["10.1.0.7"]),
            pod("dev", "d", "n1", &["10.1.0.7"]),
        ]);
        assert_eq!(entries(&maps, "n1"), [e("10.1.0.7", "dev")]);
    }

    #[test]
    fn strip_keeps_only_what_the_map_needs_and_the_map_is_the_same() {
        let full = pod("shop", "a", "n1", &["10.1.0.9"]);
        let mut stripped = full.clone();
        strip(&mut stripped);
        assert_eq!(stripped.metadata.labels, None);
        assert_eq!(stripped.spec.as_ref().unwrap().service_account_name, None);
        assert_eq!(stripped.status.as_ref().unwrap().host_ip, None);
        assert_eq!(stripped.metadata.name.as_deref(), Some("a"));
        assert_eq!(node_maps([&full]), node_maps([&stripped]));
    }

    #[test]
    fn maps_go_to_watched_nodes_only_when_they_change() {
        let clients = NodeClients::default();
        let mut n1 = clients.subscribe("n1");
        assert!(n1.borrow().is_none(), "nothing before the first list");

        let maps = node_maps(&[
            pod("shop", "a", "n1", &["10.1.0.9"]),
            pod("shop", "b", "n2", &["10.2.0.9"]),
        ]);
        assert_eq!(clients.update(maps.clone()), 2);
        assert!(n1.has_changed().unwrap());
        let first = n1.borrow_and_update().clone().unwrap();
        assert_eq!(first.pods.len(), 1);
        assert_eq!(first.pods[0].ip, "10.1.0.9");
        // n2 has no session yet; its map waits for one.
        let n2 = clients.subscribe("n2");
        assert_eq!(n2.borrow().as_ref().unwrap().pods[0].ip, "10.2.0.9");

        // The same content again: nothing is sent.
        assert_eq!(clients.update(maps), 0);
        assert!(!n1.has_changed().unwrap());

        // n1's pod goes: its agent gets an empty map, not silence.
        let maps = node_maps(&[pod("shop", "b", "n2", &["10.2.0.9"])]);
        assert_eq!(clients.update(maps), 1);
        let now = n1.borrow_and_update().clone().unwrap();
        assert!(now.pods.is_empty());
        assert_ne!(now.version, first.version);

        // A node first seen after the list has no pods: an empty map at once.
        let n3 = clients.subscribe("n3");
        assert_eq!(n3.borrow().as_ref().unwrap().pods, []);
    }
}
