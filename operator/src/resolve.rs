//! Turning a pool's target into backend addresses.
//!
//! A Service target resolves through the Service (to find which of its
//! ports the pool means) and the EndpointSlices labelled with the Service's
//! name (`kubernetes.io/service-name`), keeping ready endpoints only. A
//! static target is its own list. Pure functions over what the reflectors
//! hold, so the rules are tested without an API server.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tidepool_crds::v1alpha1::{ConnectionPoolSpec, ServiceTarget};

use crate::reason::Reason;

/// The label EndpointSlices carry with the name of their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why a target has no addresses. Not an error of the operator: the pool's
/// status shows it (the [`reason`](ResolveError::reason) and the message),
/// and the pool is retried with backoff and whenever the Service or its
/// EndpointSlices change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The Service does not exist.
    #[error("service {namespace}/{service} does not exist")]
    ServiceNotFound {
        /// The pool's namespace.
        namespace: String,
        /// The Service's name.
        service: String,
    },
    /// The Service has no port the target names.
    #[error("service {namespace}/{service} has no port {port}; its ports are: {available}")]
    PortNotFound {
        /// The pool's namespace.
        namespace: String,
        /// The Service's name.
        service: String,
        /// The port as the spec gives it.
        port: String,
        /// The Service's ports, `name (number)`, comma separated.
        available: String,
    },
    /// The Service exists but no endpoint of it is ready.
    #[error("service {namespace}/{service} port {port} has no ready endpoints")]
    NoReadyEndpoints {
        /// The pool's namespace.
        namespace: String,
        /// The Service's name.
        service: String,
        /// The port as the spec gives it.
        port: String,
    },
    /// Another pool, created first, already has this `listenPort` on every
    /// agent. The pool is sent to agents without its port and without
    /// addresses, so nothing listens or dials for it.
    #[error(
        "spec.listenPort {port} is already used by pool {other} (created first); choose another port or free that one"
    )]
    ListenPortTaken {
        /// The port.
        port: i32,
        /// `namespace/name` of the pool that has it.
        other: String,
    },
}

impl ResolveError {
    /// The condition reason this failure is reported with.
    pub fn reason(&self) -> Reason {
        match self {
            Self::ServiceNotFound { .. } => Reason::ServiceNotFound,
            Self::PortNotFound { .. } => Reason::PortNotFound,
            Self::NoReadyEndpoints { .. } => Reason::NoReadyEndpoints,
            Self::ListenPortTaken { .. } => Reason::ListenPortTaken,
        }
    }
}

/// A rewrite of endpoint IPv4 addresses from one network to another of the
/// same size (`192.0.2.0/24=127.0.0.0/24`), applied as endpoints are
/// resolved.
///
/// For local control planes only (`make demo`, the e2e tests): the API
/// server refuses loopback addresses in EndpointSlices, while local
/// backends listen on loopback. The tests publish them under the
/// documentation range 192.0.2.0/24 (RFC 5737, never routed) and the
/// operator maps them back. Empty, the default, changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressMap(Vec<(Ipv4Addr, u8, Ipv4Addr)>);

impl std::str::FromStr for AddressMap {
    type Err = String;

    /// Parses `FROM/N=TO/N[,FROM/N=TO/N…]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for rule in s.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let bad = || {
                format!(
                    "{rule:?} is not a rule such as 192.0.2.0/24=127.0.0.0/24 (two IPv4 networks of one size)"
                )
            };
            let (from, to) = rule.split_once('=').ok_or_else(bad)?;
            let net = |n: &str| -> Option<(Ipv4Addr, u8)> {
                let (ip, bits) = n.split_once('/')?;
                let bits: u8 = bits.parse().ok().filter(|b| *b <= 32)?;
                Some((ip.parse().ok()?, bits))
            };
            let ((from, bits), (to, to_bits)) =
                (net(from).ok_or_else(bad)?, net(to).ok_or_else(bad)?);
            if bits != to_bits {
                return Err(bad());
            }
            rules.push((from, bits, to));
        }
        Ok(Self(rules))
    }
}

impl AddressMap {
    /// `ip` rewritten by the first rule whose network holds it.
    pub fn map(&self, ip: &str) -> String {
        let Ok(addr) = ip.parse::<Ipv4Addr>() else {
            return ip.to_string();
        };
        for (from, bits, to) in &self.0 {
            let mask = if *bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(*bits))
            };
            if u32::from(addr) & mask == u32::from(*from) & mask {
                return Ipv4Addr::from((u32::from(*to) & mask) | (u32::from(addr) & !mask))
                    .to_string();
            }
        }
        ip.to_string()
    }
}

fn port_text(port: &IntOrString) -> String {
    match port {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::String(s) => s.clone(),
    }
}

/// How a target reads in `status.target`: `service:port`, or the first
/// static address and how many more.
pub fn describe_target(spec: &ConnectionPoolSpec) -> String {
    match (&spec.target.service, &spec.target.addresses) {
        (Some(svc), _) => format!("{}:{}", svc.name, port_text(&svc.port)),
        (None, Some(addrs)) => match addrs.len() {
            0 => "no addresses".into(),
            1 => addrs[0].0.clone(),
            n => format!("{} (+{} more)", addrs[0].0, n - 1),
        },
        (None, None) => "no target".into(),
    }
}

/// The addresses of a static target, sorted and without duplicates.
pub fn static_addresses(spec: &ConnectionPoolSpec) -> Vec<String> {
    let set: BTreeSet<String> = spec
        .target
        .addresses
        .iter()
        .flatten()
        .map(|a| a.0.clone())
        .collect();
    set.into_iter().collect()
}

/// The ready endpoints of `target` in `namespace`, as sorted `host:port`
/// strings, IPv4 addresses rewritten by `map`. `service` is the Service if
/// it exists; `slices` are the EndpointSlices of that Service (others are
/// skipped).
pub fn resolve_service<'a>(
    map: &AddressMap,
    namespace: &str,
    target: &ServiceTarget,
    service: Option<&Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Result<Vec<String>, ResolveError> {
    let Some(service) = service else {
        return Err(ResolveError::ServiceNotFound {
            namespace: namespace.into(),
            service: target.name.clone(),
        });
    };
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let chosen = ports.iter().find(|p| match &target.port {
        IntOrString::Int(n) => p.port == *n,
        IntOrString::String(name) => p.name.as_deref() == Some(name.as_str()),
    });
    let Some(chosen) = chosen else {
        let available = if ports.is_empty() {
            "none".to_string()
        } else {
            ports
                .iter()
                .map(|p| match &p.name {
                    Some(n) if !n.is_empty() => format!("{n} ({})", p.port),
                    _ => p.port.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(ResolveError::PortNotFound {
            namespace: namespace.into(),
            service: target.name.clone(),
            port: port_text(&target.port),
            available,
        });
    };
    // EndpointSlices name their ports after the Service's port names; an
    // unnamed Service port is the empty name.
    let port_name = chosen.name.clone().unwrap_or_default();

    let mut addresses = BTreeSet::new();
    for slice in slices {
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if owner.map(String::as_str) != Some(target.name.as_str())
            || slice.metadata.namespace.as_deref() != Some(namespace)
        {
            continue;
        }
        let Some(number) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.clone().unwrap_or_default() == port_name)
            .and_then(|p| p.port)
        else {
            continue;
        };
        let ipv6 = slice.address_type == "IPv6";
        for endpoint in &slice.endpoints {
            // The API says an unset `ready` means ready.
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            for host in &endpoint.addresses {
                if ipv6 {
                    addresses.insert(format!("[{host}]:{number}"));
                } else {
                    addresses.insert(format!("{}:{number}", map.map(host)));
                }
            }
        }
    }
    if addresses.is_empty() {
        return Err(ResolveError::NoReadyEndpoints {
            namespace: namespace.into(),
            service: target.name.clone(),
            port: port_text(&target.port),
        });
    }
    Ok(addresses.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(ports: serde_json::Value) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"ports": ports}
        }))
        .unwrap()
    }

    fn slice(
        name: &str,
        service: &str,
        family: &str,
        ports: serde_json::Value,
        endpoints: serde_json::Value,
    ) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": family,
            "ports": ports,
            "endpoints": endpoints
        }))
        .unwrap()
    }

    fn target(port: IntOrString) -> ServiceTarget {
        ServiceTarget {
            name: "api".into(),
            port,
        }
    }

    #[test]
    fn named_port_resolves_to_ready_endpoints_of_every_slice() {
        let svc = service(
            serde_json::json!([{"name": "http", "port": 80}, {"name": "grpc", "port": 50051}]),
        );
        let slices = [
            slice(
                "api-a",
                "api",
                "IPv4",
                serde_json::json!([{"name": "http", "port": 8080}, {"name": "grpc", "port": 9000}]),
                serde_json::json!([
                    {"addresses": ["127.0.0.2"], "conditions": {"ready": true}},
                    {"addresses": ["127.0.0.3"], "conditions": {"ready": false}},
                    {"addresses": ["127.0.0.4"]}
                ]),
            ),
            slice(
                "api-b",
                "api",
                "IPv6",
                serde_json::json!([{"name": "grpc", "port": 9000}]),
                serde_json::json!([{"addresses": ["fd00::7"], "conditions": {"ready": true}}]),
            ),
            slice(
                "other",
                "other",
                "IPv4",
                serde_json::json!([{"name": "grpc", "port": 9000}]),
                serde_json::json!([{"addresses": ["127.0.0.9"]}]),
            ),
        ];
        let got = resolve_service(
            &AddressMap::default(),
            "shop",
            &target(IntOrString::String("grpc".into())),
            Some(&svc),
            &slices,
        )
        .unwrap();
        assert_eq!(got, ["127.0.0.2:9000", "127.0.0.4:9000", "[fd00::7]:9000"]);
        // The same port by number.
        let got = resolve_service(
            &AddressMap::default(),
            "shop",
            &target(IntOrString::Int(50051)),
            Some(&svc),
            &slices,
        )
        .unwrap();
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn an_unnamed_service_port_matches_the_unnamed_slice_port() {
        let svc = service(serde_json::json!([{"port": 50051}]));
        let slices = [slice(
            "api-a",
            "api",
            "IPv4",
            serde_json::json!([{"port": 7000}]),
            serde_json::json!([{"addresses": ["127.0.0.2"]}]),
        )];
        let got = resolve_service(
            &AddressMap::default(),
            "shop",
            &target(IntOrString::Int(50051)),
            Some(&svc),
            &slices,
        )
        .unwrap();
        assert_eq!(got, ["127.0.0.2:7000"]);
    }

    #[test]
    fn failures_say_what_is_missing() {
        let t = target(IntOrString::String("grpc".into()));
        let err = resolve_service(&AddressMap::default(), "shop", &t, None, []).unwrap_err();
        assert_eq!(err.reason().as_str(), "ServiceNotFound");
        assert_eq!(err.to_string(), "service shop/api does not exist");

        let svc = service(serde_json::json!([{"name": "http", "port": 80}, {"port": 81}]));
        let err = resolve_service(&AddressMap::default(), "shop", &t, Some(&svc), []).unwrap_err();
        assert_eq!(err.reason().as_str(), "PortNotFound");
        assert_eq!(
            err.to_string(),
            "service shop/api has no port grpc; its ports are: http (80), 81"
        );

        let svc = service(serde_json::json!([{"name": "grpc", "port": 80}]));
        let not_ready = [slice(
            "api-a",
            "api",
            "IPv4",
            serde_json::json!([{"name": "grpc", "port": 80}]),
            serde_json::json!([{"addresses": ["127.0.0.2"], "conditions": {"ready": false}}]),
        )];
        let err = resolve_service(&AddressMap::default(), "shop", &t, Some(&svc), &not_ready)
            .unwrap_err();
        assert_eq!(err.reason().as_str(), "NoReadyEndpoints");
        assert!(err.to_string().contains("no ready endpoints"), "{err}");
    }

    #[test]
    fn the_address_map_moves_hosts_between_networks() {
        let m: AddressMap = "192.0.2.0/24=127.0.0.0/24, 198.51.100.0/30=10.9.9.4/30"
            .parse()
            .unwrap();
        assert_eq!(m.map("192.0.2.7"), "127.0.0.7");
        assert_eq!(m.map("198.51.100.2"), "10.9.9.6");
        assert_eq!(m.map("198.51.100.9"), "198.51.100.9");
        assert_eq!(m.map("fd00::1"), "fd00::1");
        assert_eq!(AddressMap::default().map("192.0.2.7"), "192.0.2.7");
        for bad in [
            "192.0.2.0/24",
            "192.0.2.0/24=127.0.0.0/16",
            "x/24=127.0.0.0/24",
            "192.0.2.0/33=127.0.0.0/33",
        ] {
            assert!(
                bad.parse::<AddressMap>()
                    .unwrap_err()
                    .contains("192.0.2.0/24=127.0.0.0/24"),
                "{bad}"
            );
        }
        let svc = service(serde_json::json!([{"name": "grpc", "port": 1}]));
        let slices = [slice(
            "a",
            "api",
            "IPv4",
            serde_json::json!([{"name": "grpc", "port": 9000}]),
            serde_json::json!([{"addresses": ["192.0.2.3"]}]),
        )];
        let got = resolve_service(
            &m,
            "shop",
            &target(IntOrString::Int(1)),
            Some(&svc),
            &slices,
        )
        .unwrap();
        assert_eq!(got, ["127.0.0.3:9000"]);
    }

    #[test]
    fn targets_read_briefly() {
        let spec: ConnectionPoolSpec =
            serde_yaml::from_str("target: {addresses: ['10.0.0.2:1', '10.0.0.1:1', '10.0.0.1:1']}")
                .unwrap();
        assert_eq!(describe_target(&spec), "10.0.0.2:1 (+2 more)");
        assert_eq!(static_addresses(&spec), ["10.0.0.1:1", "10.0.0.2:1"]);
        let spec: ConnectionPoolSpec =
            serde_yaml::from_str("target: {service: {name: api, port: grpc}}").unwrap();
        assert_eq!(describe_target(&spec), "api:grpc");
    }
}
