//! The operator ↔ agent control protocol (`proto/tidepool/control/v1`),
//! compiled with tonic, and the conversions between its messages and the
//! `ConnectionPool` types.
//!
//! Both ends use these helpers, so a spec crosses the wire and comes back
//! field for field; [`spec_from_pb`] refuses a message that cannot be a
//! spec (no target), and the agent then validates the spec itself with
//! [`ConnectionPoolSpec::settings`].

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use prost::Message;

use crate::key::PoolKey;
use crate::v1alpha1::{
    Address, Clients, ConnectionPoolSpec, NamespaceName, ServiceTarget, Target, WhenFull,
};

/// The generated messages, client and server.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("tidepool.control.v1");
}

/// A message that is well-formed protobuf but not a valid control message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A pool arrived without a spec.
    #[error("pool {pool}: the snapshot carries no spec")]
    MissingSpec {
        /// `namespace/name`.
        pool: String,
    },
    /// A spec arrived without a target.
    #[error("pool {pool}: spec.target is empty; one of service or addresses is required")]
    MissingTarget {
        /// `namespace/name`.
        pool: String,
    },
    /// A service target arrived without a port.
    #[error("pool {pool}: spec.target.service.port is empty; a number or a port name is required")]
    MissingPort {
        /// `namespace/name`.
        pool: String,
    },
    /// A `whenFull` value this build does not know.
    #[error(
        "pool {pool}: spec.whenFull value {value} is unknown; Overflow (0) and Wait (1) are accepted"
    )]
    UnknownWhenFull {
        /// `namespace/name`.
        pool: String,
        /// The raw enum value.
        value: i32,
    },
    /// A delta for a base the agent does not run.
    #[error(
        "delta snapshot {version} applies to version {base} but this agent runs {}; send version {version} whole",
        if .running.is_empty() { "none" } else { .running.as_str() }
    )]
    BaseMismatch {
        /// The delta's version.
        version: String,
        /// The version it applies to (`base_version`).
        base: String,
        /// The version the agent runs ("" for none).
        running: String,
    },
    /// A delta removes a pool its base does not run.
    #[error("delta snapshot {version} removes pool {pool}, which version {base} does not run")]
    RemovedUnknown {
        /// `namespace/name`.
        pool: String,
        /// The delta's version.
        version: String,
        /// Its base.
        base: String,
    },
    /// A delta both changes and removes a pool.
    #[error("delta snapshot {version} both changes and removes pool {pool}")]
    ChangedAndRemoved {
        /// `namespace/name`.
        pool: String,
        /// The delta's version.
        version: String,
    },
    /// A full snapshot that lists removed pools.
    #[error(
        "snapshot {version} is whole (base_version is empty) but lists removed pools ({pool}, …); removed is for deltas only"
    )]
    RemovedInFull {
        /// The first pool listed in `removed`.
        pool: String,
        /// The snapshot's version.
        version: String,
    },
}

impl ProtocolError {
    /// The pools (`namespace/name`) the error is about, as a Nack names
    /// them; empty when it is about the whole snapshot.
    pub fn pools(&self) -> Vec<String> {
        match self {
            Self::MissingSpec { pool }
            | Self::MissingTarget { pool }
            | Self::MissingPort { pool }
            | Self::UnknownWhenFull { pool, .. }
            | Self::RemovedUnknown { pool, .. }
            | Self::ChangedAndRemoved { pool, .. } => vec![pool.clone()],
            Self::BaseMismatch { .. } | Self::RemovedInFull { .. } => vec![],
        }
    }
}

/// The wire form of a spec.
pub fn spec_to_pb(spec: &ConnectionPoolSpec) -> pb::PoolSpec {
    let target = match (&spec.target.service, &spec.target.addresses) {
        (Some(svc), _) => Some(pb::pool_spec::Target::Service(pb::ServiceTarget {
            name: svc.name.clone(),
            port: Some(match &svc.port {
                IntOrString::Int(n) => pb::service_target::Port::Number(*n),
                IntOrString::String(s) => pb::service_target::Port::PortName(s.clone()),
            }),
        })),
        (None, Some(addrs)) => Some(pb::pool_spec::Target::StaticAddresses(
            pb::StaticAddresses {
                addresses: addrs.iter().map(|a| a.0.clone()).collect(),
            },
        )),
        (None, None) => None,
    };
    pb::PoolSpec {
        target,
        size: spec.size,
        ttl: spec.ttl.clone(),
        max_idle: spec.max_idle,
        max_streams: spec.max_streams,
        when_full: match spec.when_full {
            WhenFull::Overflow => pb::WhenFull::Overflow as i32,
            WhenFull::Wait => pb::WhenFull::Wait as i32,
        },
        acquire_timeout: spec.acquire_timeout.clone(),
        listen_port: spec.listen_port,
        clients: spec.clients.as_ref().map(|c| pb::PoolClients {
            namespaces: c.namespaces.iter().map(|n| n.0.clone()).collect(),
        }),
    }
}

/// The spec a wire message describes. `pool` (`namespace/name`) names the
/// pool in errors. Only the message's shape is checked here; the values are
/// checked by [`ConnectionPoolSpec::settings`].
pub fn spec_from_pb(pool: &str, spec: pb::PoolSpec) -> Result<ConnectionPoolSpec, ProtocolError> {
    let target = match spec.target {
        Some(pb::pool_spec::Target::Service(svc)) => Target {
            service: Some(ServiceTarget {
                name: svc.name,
                port: match svc.port {
                    Some(pb::service_target::Port::Number(n)) => IntOrString::Int(n),
                    Some(pb::service_target::Port::PortName(s)) => IntOrString::String(s),
                    None => return Err(ProtocolError::MissingPort { pool: pool.into() }),
                },
            }),
            addresses: None,
        },
        Some(pb::pool_spec::Target::StaticAddresses(a)) => Target {
            service: None,
            addresses: Some(a.addresses.into_iter().map(Address).collect()),
        },
        None => return Err(ProtocolError::MissingTarget { pool: pool.into() }),
    };
    let when_full = match pb::WhenFull::try_from(spec.when_full) {
        Ok(pb::WhenFull::Overflow) => WhenFull::Overflow,
        Ok(pb::WhenFull::Wait) => WhenFull::Wait,
        Err(_) => {
            return Err(ProtocolError::UnknownWhenFull {
                pool: pool.into(),
                value: spec.when_full,
            });
        }
    };
    Ok(ConnectionPoolSpec {
        target,
        size: spec.size,
        ttl: spec.ttl,
        max_idle: spec.max_idle,
        max_streams: spec.max_streams,
        when_full,
        acquire_timeout: spec.acquire_timeout,
        listen_port: spec.listen_port,
        // The operator's concern alone: agents serve `listen_port`.
        node_local_service: None,
        // The operator's concern alone: agents run the settings they are sent.
        tuning: None,
        // Absent (an operator built before the field): every client.
        clients: spec.clients.map(|c| Clients {
            namespaces: c.namespaces.into_iter().map(NamespaceName).collect(),
        }),
    })
}

impl pb::Pool {
    /// `namespace/name` ([`PoolKey`]'s text).
    pub fn key(&self) -> String {
        PoolKey::new(&self.namespace, &self.name).to_string()
    }
}

impl pb::PoolReport {
    /// `namespace/name` ([`PoolKey`]'s text).
    pub fn key(&self) -> String {
        PoolKey::new(&self.namespace, &self.name).to_string()
    }
}

/// The version of a snapshot with these pools: a hash of their encoding,
/// so equal content always has the same version, across operator restarts
/// too (an agent's `Hello.version` then says whether it is up to date).
pub fn snapshot_version(pools: &[pb::Pool]) -> String {
    content_version(pools)
}

/// The version of a node's pod map with these entries, as
/// [`snapshot_version`] is of pools: equal content, equal version.
pub fn clients_version(pods: &[pb::PodAddress]) -> String {
    content_version(pods)
}

fn content_version<M: Message>(messages: &[M]) -> String {
    // FNV-1a, 64 bits: stable across builds and platforms, unlike std's
    // hasher, and collisions between two configurations of one node are
    // not a concern at this size.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = Vec::new();
    for message in messages {
        buf.clear();
        message
            .encode_length_delimited(&mut buf)
            .expect("a Vec grows as needed");
        for b in &buf {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ConnectionPoolSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn specs_cross_the_wire_unchanged() {
        for s in [
            spec(
                "target: {service: {name: payments, port: 50051}}\nsize: 3\nmaxIdle: 2\nwhenFull: Wait\nacquireTimeout: 250ms\nlistenPort: 16000",
            ),
            spec("target: {service: {name: payments, port: grpc}}"),
            spec(
                "target: {addresses: ['10.0.0.1:50051', '[fd00::7]:80']}\nttl: 1h30m\nmaxStreams: 7",
            ),
            spec("target: {service: {name: a, port: 1}}\nclients: {namespaces: [shop, billing]}"),
        ] {
            assert_eq!(spec_from_pb("ns/p", spec_to_pb(&s)).unwrap(), s);
        }
    }

    #[test]
    fn a_spec_without_target_is_refused_with_the_pool_named() {
        let mut m = spec_to_pb(&spec("target: {service: {name: a, port: 1}}"));
        m.target = None;
        let err = spec_from_pb("shop/payments", m).unwrap_err().to_string();
        assert!(
            err.contains("shop/payments") && err.contains("spec.target"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_when_full_is_refused() {
        let mut m = spec_to_pb(&spec("target: {service: {name: a, port: 1}}"));
        m.when_full = 9;
        assert_eq!(
            spec_from_pb("ns/p", m).unwrap_err(),
            ProtocolError::UnknownWhenFull {
                pool: "ns/p".into(),
                value: 9
            }
        );
    }

    #[test]
    fn versions_follow_content() {
        let pool = |generation| pb::Pool {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
            generation,
            spec: Some(spec_to_pb(&spec("target: {service: {name: a, port: 1}}"))),
            addresses: vec!["127.0.0.2:1".into()],
        };
        assert_eq!(snapshot_version(&[pool(1)]), snapshot_version(&[pool(1)]));
        assert_ne!(snapshot_version(&[pool(1)]), snapshot_version(&[pool(2)]));
        assert_ne!(snapshot_version(&[]), snapshot_version(&[pool(1)]));
        assert_eq!(snapshot_version(&[]).len(), 16);
    }
}
