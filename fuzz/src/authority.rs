//! Authority and host parsing: the router's [`split_authority`] and
//! [`Routes::lookup`] over a fixed table of pools (numbered, named and
//! static targets, a short name two namespaces share), and the validator's
//! [`check_address`]. The input is the authority.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::LazyLock;

use tidepool_agent::config::PoolConfig;
use tidepool_agent::router::{RouteError, Routes, split_authority};
use tidepool_crds::validate::check_address;

struct Table {
    routes: Routes,
    /// Pool key → the one port it accepts (`None`: any).
    ports: HashMap<String, Option<u16>>,
}

fn pool(namespace: &str, name: &str, spec: &str) -> PoolConfig {
    PoolConfig {
        namespace: namespace.into(),
        name: name.into(),
        uid: String::new(),
        generation: 1,
        spec: serde_yaml::from_str(spec).expect("the table's specs parse"),
        addresses: vec![],
    }
}

static TABLE: LazyLock<Table> = LazyLock::new(|| {
    let service = "target: {service: {name: payments-grpc, port: 50051}}";
    let pools = [
        (pool("shop", "payments", service), Some(50051)),
        (pool("billing", "payments", service), Some(50051)),
        (
            pool(
                "shop",
                "orders",
                "target: {service: {name: orders, port: grpc}}",
            ),
            None,
        ),
        (
            pool("default", "echo", "target: {addresses: ['127.0.0.1:1']}"),
            None,
        ),
        (pool("a", "x", "target: {addresses: ['[::1]:80']}"), None),
    ];
    Table {
        routes: Routes::new(pools.iter().map(|(p, _)| p)),
        ports: pools.iter().map(|(p, port)| (p.key(), *port)).collect(),
    }
});

/// Whether `part` is a slice of `whole` (not a copy).
fn within(part: &str, whole: &str) -> bool {
    let (p, w) = (part.as_ptr() as usize, whole.as_ptr() as usize);
    p >= w && p + part.len() <= w + whole.len()
}

/// One authority.
pub fn run(data: &[u8]) {
    let Ok(authority) = std::str::from_utf8(data) else {
        return;
    };
    let (host, port) = split_authority(authority);
    assert!(
        within(host, authority),
        "{host:?} is not part of {authority:?}"
    );
    if let Some(port) = port {
        // A port is the digits after the last colon (RFC 3986: *DIGIT).
        let (_, digits) = authority.rsplit_once(':').expect("a port follows a colon");
        assert!(
            !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
            "{authority:?}: port {port} read from {digits:?}"
        );
        assert_eq!(digits.parse::<u16>().ok(), Some(port));
    }

    let table = &*TABLE;
    match table.routes.lookup(authority) {
        Ok(pool) => {
            let accepted = table.ports[pool];
            assert!(
                port.is_none() || accepted.is_none() || accepted == port,
                "{authority:?} routed to {pool}, which takes only port {accepted:?}"
            );
            // Host names are case-insensitive.
            assert_eq!(
                table.routes.lookup(&authority.to_ascii_uppercase()),
                Ok(pool),
                "{authority:?} upper-cased"
            );
        }
        Err(RouteError::Missing) => assert!(authority.is_empty()),
        Err(RouteError::Unknown { authority: a } | RouteError::Ambiguous { authority: a, .. }) => {
            assert_eq!(a, authority, "the error names another authority")
        }
    }

    // What the validator accepts as a static address, the router reads
    // as the same host and port.
    if check_address(authority).is_ok() {
        let (vhost, vport) = authority.rsplit_once(':').expect("host:port");
        let vhost = vhost
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(vhost);
        let expected: u16 = vport.parse().expect("a port from 1 to 65535");
        assert!(expected >= 1);
        assert_eq!(
            (host, port),
            (vhost, Some(expected)),
            "{authority:?}: the router splits a valid address differently"
        );
        // An IP literal is one the dialer reads as a socket address.
        if authority.starts_with('[') || vhost.parse::<Ipv4Addr>().is_ok() {
            assert!(
                authority.parse::<SocketAddr>().is_ok(),
                "{authority:?} is valid but not a socket address"
            );
        }
    }
}
