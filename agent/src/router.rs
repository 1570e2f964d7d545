//! Which pool a stream belongs to, and which of the pool's addresses it
//! goes to.
//!
//! Routing is by `:authority`, the name a gRPC client dials. A pool whose
//! target is a Service answers to that Service's names, a pool with static
//! addresses to its own name, each in the four forms Kubernetes DNS gives
//! (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`) with or
//! without a port. A Service target with a numbered port takes only that
//! port (or none); a named port, unknown to the agent, and a static pool
//! take any port. A short name two pools share (the same `svc` in two
//! namespaces) is refused as ambiguous, naming both; the longer forms still
//! reach each.
//!
//! The address is chosen by load: of two random addresses not in dial
//! backoff, the one with fewer active streams (power of two choices).

use std::collections::HashMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use rand::Rng;

use crate::config::PoolConfig;

/// Why no pool matched an authority. Both messages name the authority.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No pool declares the authority.
    #[error(
        "no ConnectionPool routes authority {authority:?}: set it to a pool's Service name (svc, svc.ns or svc.ns.svc.cluster.local, with its port) or a static pool's name"
    )]
    Unknown {
        /// The authority as the client sent it.
        authority: String,
    },
    /// More than one pool answers to the authority.
    #[error(
        "authority {authority:?} is ambiguous: pools {pools} all answer to it; use the namespaced form svc.ns"
    )]
    Ambiguous {
        /// The authority as the client sent it.
        authority: String,
        /// The pools, comma separated.
        pools: String,
    },
    /// The request had no authority at all.
    #[error("the request has no :authority; set it to the pool's Service name")]
    Missing,
}

/// One pool a host name leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    /// `namespace/name` of the pool.
    pool: String,
    /// The only port accepted, or any.
    port: Option<u16>,
}

/// Host names to pools, built once per applied configuration.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    by_host: HashMap<String, Vec<Route>>,
}

/// The base name and port a pool answers to: its Service's, or for a static
/// target its own name with any port.
fn routed_name(config: &PoolConfig) -> (String, Option<u16>) {
    match &config.spec.target.service {
        Some(service) => {
            let port = match &service.port {
                IntOrString::Int(p) => u16::try_from(*p).ok(),
                IntOrString::String(_) => None,
            };
            (service.name.to_ascii_lowercase(), port)
        }
        None => (config.name.to_ascii_lowercase(), None),
    }
}

/// The four host names of `name` in `namespace`.
pub fn host_forms(name: &str, namespace: &str) -> [String; 4] {
    [
        name.to_owned(),
        format!("{name}.{namespace}"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.cluster.local"),
    ]
}

impl Routes {
    /// The routes of `pools`.
    pub fn new<'a>(pools: impl IntoIterator<Item = &'a PoolConfig>) -> Self {
        let mut by_host: HashMap<String, Vec<Route>> = HashMap::new();
        for config in pools {
            let (name, port) = routed_name(config);
            for host in host_forms(&name, &config.namespace.to_ascii_lowercase()) {
                by_host.entry(host).or_default().push(Route {
                    pool: config.key(),
                    port,
                });
            }
        }
        Self { by_host }
    }

    /// The pool (`namespace/name`) that serves `authority`.
    pub fn lookup(&self, authority: &str) -> Result<&str, RouteError> {
        if authority.is_empty() {
            return Err(RouteError::Missing);
        }
        let (host, port) = split_authority(authority);
        let unknown = || RouteError::Unknown {
            authority: authority.to_owned(),
        };
        let host = host.trim_end_matches('.');
        // Clients send lower case almost always; only fold when needed.
        let routes = match self.by_host.get(host) {
            Some(routes) => routes,
            None => self
                .by_host
                .get(&host.to_ascii_lowercase())
                .ok_or_else(unknown)?,
        };
        let mut matching = routes
            .iter()
            .filter(|r| port.is_none() || r.port.is_none() || r.port == port);
        let first = matching.next().ok_or_else(unknown)?;
        let others: Vec<&str> = matching.map(|r| r.pool.as_str()).collect();
        if others.is_empty() {
            return Ok(&first.pool);
        }
        let mut pools = vec![first.pool.as_str()];
        pools.extend(others);
        pools.sort_unstable();
        Err(RouteError::Ambiguous {
            authority: authority.to_owned(),
            pools: pools.join(", "),
        })
    }
}

/// Splits `host[:port]` (IPv6 hosts in brackets). A port that is not a
/// number is kept in the host, which then matches nothing.
pub fn split_authority(authority: &str) -> (&str, Option<u16>) {
    // Userinfo is not allowed in an HTTP/2 :authority, but be safe.
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':').and_then(port)),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, p)) => match port(p) {
            Some(p) => (host, Some(p)),
            None => (authority, None),
        },
        None => (authority, None),
    }
}

/// A port as RFC 3986 writes one: digits only. (`u16::from_str` alone
/// would also take a leading `+`, so `svc:+80` would reach port 80.)
fn port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// What the balancer needs to know about an address.
pub trait Load {
    /// The cost of one more stream to `addr` at `now`
    /// ([`crate::pool::load::now_nanos`]); `None` while its dials are in
    /// backoff.
    fn cost(&self, addr: &str, now: u64) -> Option<usize>;
}

impl<C: crate::pool::Connector> Load for crate::pool::Pool<C> {
    fn cost(&self, addr: &str, now: u64) -> Option<usize> {
        crate::pool::Pool::cost(self, addr, now)
    }
}

/// Picks an address for a new stream: of two random addresses not in dial
/// backoff (and not `avoid`), the one with fewer streams waiting for their
/// response headers (see [`crate::pool::load`]). When every address is in backoff, any of them
/// (the dial may succeed now). `None` only for an empty list. One clock
/// read, no lock.
pub fn pick<'a, L: Load + ?Sized>(
    load: &L,
    addresses: &'a [String],
    avoid: Option<&str>,
) -> Option<&'a str> {
    match addresses.len() {
        0 => return None,
        1 => return Some(&addresses[0]),
        _ => {}
    }
    let now = crate::pool::load::now_nanos();
    let cost = |a: &str| {
        if Some(a) == avoid {
            None
        } else {
            load.cost(a, now)
        }
    };
    let mut rng = rand::rng();
    // A few random pairs first: cheap when most addresses are healthy.
    for _ in 0..3 {
        let i = rng.random_range(0..addresses.len());
        let mut j = rng.random_range(0..addresses.len() - 1);
        if j >= i {
            j += 1;
        }
        let (a, b) = (addresses[i].as_str(), addresses[j].as_str());
        match (cost(a), cost(b)) {
            (Some(ca), Some(cb)) => return Some(if cb < ca { b } else { a }),
            (Some(_), None) => return Some(a),
            (None, Some(_)) => return Some(b),
            (None, None) => {}
        }
    }
    // Most are in backoff: the cheapest usable one, else any but `avoid`.
    addresses
        .iter()
        .map(String::as_str)
        .filter_map(|a| cost(a).map(|c| (a, c)))
        .min_by_key(|x| x.1)
        .map(|(a, _)| a)
        .or_else(|| {
            addresses
                .iter()
                .map(String::as_str)
                .find(|a| Some(*a) != avoid)
        })
        .or(Some(&addresses[0]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use tidepool_crds::ConnectionPoolSpec;

    fn pool(ns: &str, name: &str, target: &str) -> PoolConfig {
        let spec: ConnectionPoolSpec = serde_yaml::from_str(target).unwrap();
        PoolConfig {
            namespace: ns.into(),
            name: name.into(),
            uid: String::new(),
            generation: 1,
            spec,
            addresses: vec![],
        }
    }

    #[test]
    fn every_dns_form_routes_to_the_service_pool() {
        let pools = [pool(
            "shop",
            "payments",
            "target: {service: {name: payments-grpc, port: 50051}}",
        )];
        let routes = Routes::new(&pools);
        for a in [
            "payments-grpc",
            "payments-grpc:50051",
            "payments-grpc.shop:50051",
            "payments-grpc.shop.svc:50051",
            "payments-grpc.shop.svc.cluster.local:50051",
            "Payments-GRPC.shop.svc.cluster.local.:50051",
        ] {
            assert_eq!(routes.lookup(a), Ok("shop/payments"), "{a}");
        }
        for a in [
            "payments-grpc:50052",
            "payments:50051",
            "payments-grpc.other:50051",
            "10.0.0.1:50051",
        ] {
            assert!(
                matches!(routes.lookup(a), Err(RouteError::Unknown { .. })),
                "{a}"
            );
        }
        let err = routes.lookup("nope.shop:1").unwrap_err().to_string();
        assert!(err.contains("\"nope.shop:1\""), "{err}");
    }

    #[test]
    fn static_pools_answer_to_their_name_on_any_port() {
        let pools = [pool(
            "default",
            "echo",
            "target: {addresses: ['127.0.0.1:1']}",
        )];
        let routes = Routes::new(&pools);
        assert_eq!(routes.lookup("echo:15000"), Ok("default/echo"));
        assert_eq!(
            routes.lookup("echo.default.svc.cluster.local"),
            Ok("default/echo")
        );
    }

    #[test]
    fn a_short_name_shared_by_two_namespaces_is_ambiguous_but_long_forms_work() {
        let pools = [
            pool("a", "echo", "target: {addresses: ['127.0.0.1:1']}"),
            pool("b", "echo", "target: {addresses: ['127.0.0.1:2']}"),
        ];
        let routes = Routes::new(&pools);
        let err = routes.lookup("echo:80").unwrap_err();
        assert_eq!(
            err,
            RouteError::Ambiguous {
                authority: "echo:80".into(),
                pools: "a/echo, b/echo".into()
            }
        );
        assert_eq!(routes.lookup("echo.b:80"), Ok("b/echo"));
        assert_eq!(routes.lookup(""), Err(RouteError::Missing));
    }

    #[test]
    fn authorities_split_with_ipv6_and_bad_ports() {
        assert_eq!(split_authority("a.b:80"), ("a.b", Some(80)));
        assert_eq!(split_authority("a.b"), ("a.b", None));
        assert_eq!(split_authority("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_authority("a:x"), ("a:x", None));
    }

    /// Found by the `authority` fuzz target: a `+` before the port was
    /// read as part of the number.
    #[test]
    fn a_port_is_digits_only() {
        assert_eq!(split_authority("[4::7]:+002"), ("4::7", None));
        assert_eq!(split_authority("a:+80"), ("a:+80", None));
        assert_eq!(split_authority("a:"), ("a:", None));
        assert_eq!(split_authority("a:0080"), ("a", Some(80)));
        let pools = [pool(
            "shop",
            "payments",
            "target: {service: {name: payments-grpc, port: 50051}}",
        )];
        assert!(matches!(
            Routes::new(&pools).lookup("payments-grpc:+50051"),
            Err(RouteError::Unknown { .. })
        ));
    }

    struct FakeLoad {
        streams: HashMap<String, usize>,
        backoff: HashSet<String>,
    }

    /// `streams` stands for the cost: fewer is cheaper.
    impl Load for FakeLoad {
        fn cost(&self, addr: &str, _now: u64) -> Option<usize> {
            if self.backoff.contains(addr) {
                return None;
            }
            Some(self.streams.get(addr).copied().unwrap_or(0))
        }
    }

    fn addrs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("a{i}:1")).collect()
    }

    #[test]
    fn pick_prefers_the_less_loaded_of_two_and_skips_backoff() {
        let addresses = addrs(2);
        let load = FakeLoad {
            streams: [("a0:1".to_owned(), 5), ("a1:1".to_owned(), 1)].into(),
            backoff: HashSet::new(),
        };
        for _ in 0..50 {
            assert_eq!(pick(&load, &addresses, None), Some("a1:1"));
        }
        let load = FakeLoad {
            streams: [("a0:1".to_owned(), 5)].into(),
            backoff: ["a1:1".to_owned()].into(),
        };
        for _ in 0..50 {
            assert_eq!(pick(&load, &addresses, None), Some("a0:1"));
        }
    }

    #[test]
    fn pick_finds_the_one_healthy_address_among_many_and_never_picks_avoid() {
        let addresses = addrs(50);
        let backoff: HashSet<String> = addresses
            .iter()
            .filter(|a| *a != "a37:1")
            .cloned()
            .collect();
        let load = FakeLoad {
            streams: HashMap::new(),
            backoff,
        };
        for _ in 0..20 {
            assert_eq!(pick(&load, &addresses, None), Some("a37:1"));
            assert_ne!(pick(&load, &addresses, Some("a37:1")), Some("a37:1"));
        }
        assert_eq!(pick(&load, &[], None), None);
    }

    #[test]
    fn pick_spreads_evenly_when_loads_are_equal() {
        let addresses = addrs(4);
        let load = FakeLoad {
            streams: HashMap::new(),
            backoff: HashSet::new(),
        };
        let mut seen = HashSet::new();
        for _ in 0..200 {
            seen.insert(pick(&load, &addresses, None).unwrap());
        }
        assert_eq!(seen.len(), 4);
    }
}
