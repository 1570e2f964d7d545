//! Who may use a pool: `spec.clients.namespaces`, enforced by the source IP
//! of the client's connection.
//!
//! The operator sends each agent the pod IPs of its own node and their
//! namespaces ([`ClientMap`], from `NodeClients` on the control stream). A
//! stream for a pool with a list is let through only when its connection
//! comes from a pod IP of a namespace on the list ([`admit`]); a pool
//! without a list serves everyone, as a Service does.
//!
//! Unknown IPs are refused (fail closed): a pod of another node reaching
//! this agent, a host-network pod (it shares the node's IP, which the map
//! never holds), and a pod started a moment ago whose IP has not reached
//! the agent yet. Before the first map arrives every IP is unknown. What
//! this does and does not protect against is in `docs/architecture.md`
//! ("Who may use a pool").

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use tidepool_crds::control::pb;
use tidepool_crds::v1alpha1::NamespaceName;

use crate::metrics::RefusedReason;

/// The pod IPs of this agent's node and the namespace of each, replaced
/// whole when the operator sends a new one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientMap {
    /// The operator's version of the content; empty before the first map.
    pub version: String,
    by_ip: HashMap<IpAddr, Arc<str>>,
}

impl ClientMap {
    /// A map of these `(ip, namespace)` pairs, for tests and standalone
    /// use.
    pub fn new<'a>(version: &str, pods: impl IntoIterator<Item = (IpAddr, &'a str)>) -> Self {
        Self {
            version: version.to_owned(),
            by_ip: pods.into_iter().map(|(ip, ns)| (ip, ns.into())).collect(),
        }
    }

    /// The map a `NodeClients` message describes, and the entries skipped
    /// because their IP does not parse (logged by the caller). Namespace
    /// names are shared, so a node of 100 pods in 3 namespaces holds 3.
    pub fn from_pb(message: pb::NodeClients) -> (Self, Vec<String>) {
        let mut names: HashMap<String, Arc<str>> = HashMap::new();
        let mut by_ip = HashMap::with_capacity(message.pods.len());
        let mut skipped = Vec::new();
        for pod in message.pods {
            let Ok(ip) = pod.ip.parse::<IpAddr>() else {
                skipped.push(pod.ip);
                continue;
            };
            let namespace = names
                .entry(pod.namespace)
                .or_insert_with_key(|ns| ns.as_str().into())
                .clone();
            by_ip.insert(ip, namespace);
        }
        let map = Self {
            version: message.version,
            by_ip,
        };
        (map, skipped)
    }

    /// The namespace of the pod with this IP on this node, if any. An
    /// IPv4-mapped IPv6 address (`::ffff:10.1.2.3`, as a dual-stack
    /// listener sees IPv4 clients) is looked up as its IPv4 address.
    pub fn namespace(&self, ip: IpAddr) -> Option<&str> {
        self.by_ip.get(&ip.to_canonical()).map(|ns| &**ns)
    }

    /// How many pod IPs the map holds.
    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    /// Whether the map holds no pod IP.
    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    /// Every `(ip, namespace)`, sorted by IP, for the admin page.
    pub fn entries(&self) -> Vec<(IpAddr, &str)> {
        let mut entries: Vec<(IpAddr, &str)> =
            self.by_ip.iter().map(|(ip, ns)| (*ip, &**ns)).collect();
        entries.sort_unstable();
        entries
    }
}

/// Why a client may not use a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The client is a pod of a namespace the pool does not list.
    Namespace(String),
    /// The client's IP is no pod IP of this node that the agent knows.
    UnknownIp,
}

impl Refusal {
    /// The `reason` label of `tidepool_proxy_refused_total`.
    pub fn reason(&self) -> RefusedReason {
        match self {
            Refusal::Namespace(_) => RefusedReason::Namespace,
            Refusal::UnknownIp => RefusedReason::UnknownIp,
        }
    }
}

/// Whether a client at `ip` may use a pool whose `spec.clients.namespaces`
/// is `allowed` (`None`: the pool has no list and serves everyone).
pub fn admit(
    allowed: Option<&[NamespaceName]>,
    map: &ClientMap,
    ip: IpAddr,
) -> Result<(), Refusal> {
    let Some(allowed) = allowed else {
        return Ok(());
    };
    match map.namespace(ip) {
        Some(ns) if allowed.iter().any(|a| a.0 == ns) => Ok(()),
        Some(ns) => Err(Refusal::Namespace(ns.to_owned())),
        None => Err(Refusal::UnknownIp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn list(names: &[&str]) -> Vec<NamespaceName> {
        names.iter().map(|n| NamespaceName((*n).into())).collect()
    }

    fn map() -> ClientMap {
        ClientMap::new(
            "v1",
            [
                (ip("10.1.0.5"), "shop"),
                (ip("10.1.0.6"), "dev"),
                (ip("fd00::5"), "billing"),
            ],
        )
    }

    #[test]
    fn a_pod_of_a_listed_namespace_is_admitted() {
        let allowed = list(&["shop", "billing"]);
        assert_eq!(admit(Some(&allowed), &map(), ip("10.1.0.5")), Ok(()));
        assert_eq!(admit(Some(&allowed), &map(), ip("fd00::5")), Ok(()));
        // A dual-stack listener sees an IPv4 client as IPv4-mapped.
        assert_eq!(admit(Some(&allowed), &map(), ip("::ffff:10.1.0.5")), Ok(()));
    }

    #[test]
    fn a_pod_of_another_namespace_is_refused_naming_it() {
        let allowed = list(&["shop"]);
        let refusal = admit(Some(&allowed), &map(), ip("10.1.0.6")).unwrap_err();
        assert_eq!(refusal, Refusal::Namespace("dev".into()));
        assert_eq!(refusal.reason().as_str(), "namespace");
    }

    #[test]
    fn an_unknown_ip_is_refused_when_a_list_is_set() {
        let allowed = list(&["shop"]);
        for unknown in ["10.1.0.7", "127.0.0.1", "fd00::6"] {
            let refusal = admit(Some(&allowed), &map(), ip(unknown)).unwrap_err();
            assert_eq!(refusal, Refusal::UnknownIp, "{unknown}");
            assert_eq!(refusal.reason().as_str(), "unknown_ip");
        }
        // Before the first map: every IP is unknown.
        assert_eq!(
            admit(Some(&allowed), &ClientMap::default(), ip("10.1.0.5")),
            Err(Refusal::UnknownIp)
        );
    }

    #[test]
    fn a_pool_without_a_list_serves_everyone() {
        for any in ["10.1.0.6", "10.9.9.9", "::1"] {
            assert_eq!(admit(None, &map(), ip(any)), Ok(()), "{any}");
            assert_eq!(admit(None, &ClientMap::default(), ip(any)), Ok(()));
        }
    }

    #[test]
    fn the_wire_map_shares_names_and_skips_bad_ips() {
        let (map, skipped) = ClientMap::from_pb(pb::NodeClients {
            version: "v7".into(),
            pods: vec![
                pb::PodAddress {
                    ip: "10.1.0.5".into(),
                    namespace: "shop".into(),
                },
                pb::PodAddress {
                    ip: "fd00::5".into(),
                    namespace: "shop".into(),
                },
                pb::PodAddress {
                    ip: "not-an-ip".into(),
                    namespace: "shop".into(),
                },
            ],
        });
        assert_eq!(skipped, ["not-an-ip"]);
        assert_eq!(map.version, "v7");
        assert_eq!(
            map.entries(),
            [(ip("10.1.0.5"), "shop"), (ip("fd00::5"), "shop")]
        );
    }
}
