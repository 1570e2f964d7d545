//! The committed seed corpora (`corpus/<target>/`), written by
//! `cargo test --manifest-path fuzz/Cargo.toml -- --ignored write_seeds`.
//! A handful per target, each a well-formed input that reaches deep into
//! its code; libFuzzer mutates from there.

use tidepool_crds::ConnectionPoolSpec;
use tidepool_crds::control::{pb, spec_to_pb};

/// One seed: its target, file name and bytes.
pub type Seed = (&'static str, &'static str, Vec<u8>);

fn spec(yaml: &str) -> pb::PoolSpec {
    let spec: ConnectionPoolSpec = serde_yaml::from_str(yaml).expect("a seed spec");
    spec_to_pb(&spec)
}

fn pool(name: &str, generation: i64, yaml: &str, addresses: &[&str]) -> pb::Pool {
    pb::Pool {
        namespace: "ns".into(),
        name: name.into(),
        uid: format!("u-{name}"),
        generation,
        spec: Some(spec(yaml)),
        addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
    }
}

fn operator(kind: pb::operator_message::Kind) -> (u8, pb::OperatorMessage) {
    (0, pb::OperatorMessage { kind: Some(kind) })
}

fn agent(control: u8, kind: pb::agent_message::Kind) -> (u8, pb::AgentMessage) {
    (control, pb::AgentMessage { kind: Some(kind) })
}

fn text(target: &'static str, name: &'static str, s: &str) -> Seed {
    (target, name, s.as_bytes().to_vec())
}

/// Every seed.
pub fn all() -> Vec<Seed> {
    use pb::agent_message::Kind as A;
    use pb::operator_message::Kind as O;
    let mut seeds = vec![
        text(
            "authority",
            "service",
            "payments-grpc.shop.svc.cluster.local:50051",
        ),
        text("authority", "short", "payments-grpc:50051"),
        text("authority", "static", "echo.default:15000"),
        text("authority", "ipv6", "[fd00::7]:50051"),
        text("authority", "userinfo", "u@Orders.Shop.:8080"),
        text("grpc_timeout", "seconds", "30S"),
        text("grpc_timeout", "max-hours", "99999999H"),
        text("grpc_timeout", "millis", "250m"),
        text("grpc_timeout", "nanos", "1n"),
        text(
            "standalone",
            "example",
            include_str!("../../examples/standalone.yaml"),
        ),
        text(
            "standalone",
            "list",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: tidepool.dev/v1alpha1\n  kind: ConnectionPool\n  metadata: {name: a, namespace: shop}\n  spec:\n    target: {addresses: ['10.0.0.1:50051', '[fd00::1]:50051']}\n    size: 10\n    maxIdle: 5\n    ttl: 1h30m\n    whenFull: Wait\n    acquireTimeout: 500ms\n    listenPort: 16001\n",
        ),
        text(
            "standalone",
            "two-documents",
            "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {name: a}\nspec: {target: {addresses: ['a.example:1']}, ttl: 1.5s, maxStreams: 100}\n---\napiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {name: b, namespace: other}\nspec: {target: {addresses: ['b.example:2']}, size: 1, maxIdle: 0}\n",
        ),
    ];

    // The agent: a full snapshot, a delta on it, a pod map, a bad delta.
    let a1 = pool(
        "a",
        1,
        "target: {addresses: ['10.0.0.1:80']}",
        &["10.0.0.1:80"],
    );
    let b1 = pool(
        "b",
        1,
        "target: {service: {name: api, port: grpc}}\nsize: 4\nwhenFull: Wait\nclients: {namespaces: [ns, other]}",
        &["10.0.1.1:50051", "[fd00::1]:50051"],
    );
    let a2 = pool(
        "a",
        2,
        "target: {addresses: ['10.0.0.1:80', '10.0.0.2:80']}\nttl: 2m",
        &["10.0.0.1:80", "10.0.0.2:80"],
    );
    let full = pb::Snapshot {
        version: "v1".into(),
        nonce: "n1".into(),
        pools: vec![a1.clone(), b1.clone()],
        base_version: String::new(),
        removed: vec![],
    };
    let delta = pb::Snapshot {
        version: "v2".into(),
        nonce: "n2".into(),
        pools: vec![a2.clone()],
        base_version: "v1".into(),
        removed: vec!["ns/b".into()],
    };
    let clients = pb::NodeClients {
        version: "c1".into(),
        pods: vec![
            pb::PodAddress {
                ip: "10.1.0.5".into(),
                namespace: "ns".into(),
            },
            pb::PodAddress {
                ip: "fd00::5".into(),
                namespace: "other".into(),
            },
        ],
    };
    seeds.push((
        "agent_control",
        "full-then-delta",
        crate::encode_frames(&[
            operator(O::Clients(clients.clone())),
            operator(O::Snapshot(full.clone())),
            operator(O::Snapshot(delta.clone())),
        ]),
    ));
    seeds.push((
        "agent_control",
        "delta-on-another-base",
        crate::encode_frames(&[
            operator(O::Snapshot(full.clone())),
            operator(O::Snapshot(pb::Snapshot {
                base_version: "v0".into(),
                ..delta.clone()
            })),
        ]),
    ));
    seeds.push((
        "agent_control",
        "invalid-then-listen-port",
        crate::encode_frames(&[
            operator(O::Snapshot(pb::Snapshot {
                pools: vec![pool(
                    "bad",
                    1,
                    "target: {addresses: ['x:1']}\nsize: 0\nttl: 1ms",
                    &["nope"],
                )],
                ..full.clone()
            })),
            operator(O::Snapshot(pb::Snapshot {
                pools: vec![pool(
                    "port",
                    1,
                    "target: {addresses: ['10.0.0.1:80']}\nlistenPort: 16001",
                    &["10.0.0.1:80"],
                )],
                ..full.clone()
            })),
        ]),
    ));

    // The operator: Hello, the writer sends (nonce 1), Ack, a report, a
    // newer snapshot offered and sent as a delta (nonce 2), Nack; a
    // second agent.
    let hello = |node: &str, version: &str| {
        A::Hello(pb::Hello {
            node: node.into(),
            pod: format!("agent-{node}"),
            version: version.into(),
            agent_version: "0.1.0".into(),
            deltas: true,
            clients: true,
        })
    };
    let ack = |nonce: &str| {
        A::Ack(pb::Ack {
            version: String::new(),
            nonce: nonce.into(),
        })
    };
    let report = A::Report(pb::Report {
        pools: vec![pb::PoolReport {
            namespace: "ns".into(),
            name: "a".into(),
            uid: "u-a".into(),
            generation: 1,
            addresses: ["10.0.0.1:80", "10.0.0.2:80"]
                .map(|address| pb::AddressReport {
                    address: address.into(),
                    connections: 3,
                    busy: 1,
                    idle: 1,
                    streams: 25,
                    overflow: 0,
                    observed: Some(pb::Observation {
                        window_seconds: 600,
                        peak_streams: 37,
                        p95_streams: 30,
                        peak_connections: 2,
                        waits: 4,
                        wait_millis: 40,
                        server_max_streams: 100,
                        closes: Some(pb::Closes {
                            idle: 3,
                            ..pb::Closes::default()
                        }),
                        ..pb::Observation::default()
                    }),
                })
                .into(),
        }],
    });
    let nack = A::Nack(pb::Nack {
        version: String::new(),
        nonce: "2".into(),
        error: "pool ns/a: spec.size: 0 must be at least 1".into(),
        pools: vec!["ns/a".into()],
    });
    seeds.push((
        "operator_control",
        "ack-report-delta-nack",
        crate::encode_frames(&[
            agent(3, hello("n1", "")),
            agent(3 | 4, ack("1")),
            agent(3, report.clone()),
            agent(1, report.clone()),
            agent(3 | 4, nack),
        ]),
    ));
    seeds.push((
        "operator_control",
        "two-agents",
        crate::encode_frames(&[
            agent(3, hello("n1", "")),
            agent(3 | 8, hello("n2", "")),
            agent(3 | 4, ack("1")),
            agent(3 | 4 | 8, ack("2")),
            agent(3 | 8, report.clone()),
            agent(3, report),
            agent(3, hello("n1", "again")),
        ]),
    ));
    seeds
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn corpus() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
    }

    /// Writes the seeds into `corpus/`.
    #[test]
    #[ignore = "writes the committed corpora; run by hand"]
    fn write_seeds() {
        for (target, name, bytes) in super::all() {
            let dir = corpus().join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    /// Every committed corpus file passes its harness (libFuzzer aside).
    #[test]
    fn committed_corpora_pass() {
        type Harness = fn(&[u8]);
        let run: [(&str, Harness); 5] = [
            ("authority", crate::authority::run),
            ("grpc_timeout", crate::grpc_timeout::run),
            ("standalone", crate::standalone::run),
            ("agent_control", crate::agent_control::run),
            ("operator_control", crate::operator_control::run),
        ];
        for (target, run) in run {
            for file in std::fs::read_dir(corpus().join(target)).unwrap() {
                let path = file.unwrap().path();
                run(&std::fs::read(&path).unwrap());
            }
        }
    }
}
