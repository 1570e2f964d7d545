//! The operator's side of the control stream: agent messages, decoded from
//! the input with prost, into [`check_hello`] and [`receive`] (the Hello,
//! Ack, Nack and Report handling a session runs) over a real [`Agents`]
//! registry, and the registry then into [`status::compute`] for every pool.
//!
//! Frames: a control byte and a length-delimited `AgentMessage`, as many
//! as decode. The control byte plays the operator's other half, before the
//! message is read: bits 0–1 offer one of three snapshots (3: none), bit 2
//! runs the session's writer (what the registry queued is recorded sent,
//! with nonce "1", "2", … in turn), bit 3 picks one of two sessions. A
//! message to a session without a Hello yet is its Hello; a protocol error
//! ends the session, as the real one does.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use prometheus_client::registry::Registry;
use tidepool_crds::ConnectionPool;
use tidepool_crds::control::{pb, spec_to_pb};
use tidepool_operator::advice;
use tidepool_operator::agents::Agents;
use tidepool_operator::control::{check_hello, receive};
use tidepool_operator::desired::{Entry, Snapshot};
use tidepool_operator::metrics::Metrics;
use tidepool_operator::status::{self, Inputs, MAX_STATUS_ADDRESSES};
use tokio::sync::watch;
use tokio::time::Instant;

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics::new(&mut Registry::default()));

/// The pools the snapshots are made of: `ns/a`, `ns/b`, `ns/c`.
struct Fixture {
    resources: Vec<ConnectionPool>,
    entries: HashMap<String, Entry>,
    /// (pool, generation) of each snapshot.
    snapshots: [Vec<(usize, i64)>; 3],
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let names = ["a", "b", "c"];
    let resources = names
        .iter()
        .map(|name| {
            serde_yaml::from_str(&format!(
                "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {{name: {name}, namespace: ns, uid: u-{name}, generation: 2}}\nspec:\n  target: {{addresses: ['10.0.0.1:80', '10.0.0.2:80']}}\n"
            ))
            .expect("a fixture pool")
        })
        .collect::<Vec<ConnectionPool>>();
    let entries = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            (
                format!("ns/{name}"),
                Entry {
                    pool: wire(&resources[i], 2),
                    resolution: Ok(()),
                },
            )
        })
        .collect();
    Fixture {
        resources,
        entries,
        snapshots: [
            vec![(0, 1), (1, 1)],
            vec![(0, 2), (1, 1), (2, 2)],
            vec![(1, 2), (2, 2)],
        ],
    }
});

fn wire(pool: &ConnectionPool, generation: i64) -> pb::Pool {
    pb::Pool {
        namespace: pool.metadata.namespace.clone().unwrap_or_default(),
        name: pool.metadata.name.clone().unwrap_or_default(),
        uid: pool.metadata.uid.clone().unwrap_or_default(),
        generation,
        spec: Some(spec_to_pb(&pool.spec)),
        addresses: vec!["10.0.0.1:80".into(), "10.0.0.2:80".into()],
    }
}

/// One session of the fuzzed stream.
enum Slot {
    /// Waiting for its Hello.
    Opening,
    Open {
        node: String,
        id: u64,
        outbox: watch::Receiver<Option<Arc<Snapshot>>>,
    },
}

/// One stream of agent messages.
pub fn run(data: &[u8]) {
    let fixture = &*FIXTURE;
    let snapshots: Vec<Arc<Snapshot>> = fixture
        .snapshots
        .iter()
        .map(|pools| {
            let pools = pools
                .iter()
                .map(|&(i, generation)| wire(&fixture.resources[i], generation))
                .collect();
            Arc::new(Snapshot::new(pools, Instant::now()))
        })
        .collect();
    let agents = Agents::default();
    let mut slots = [Slot::Opening, Slot::Opening];
    let mut nodes = BTreeSet::new();
    let mut current = Arc::clone(&snapshots[0]);
    let mut nonce = 0u64;

    for (control, message) in crate::frames::<pb::AgentMessage>(data) {
        if let Some(offered) = snapshots.get(usize::from(control & 3)) {
            current = Arc::clone(offered);
            agents.offer(&current);
        }
        let slot = &mut slots[usize::from(control >> 3 & 1)];
        match slot {
            Slot::Opening => {
                if let Ok(hello) = check_hello(message) {
                    assert!(!hello.node.is_empty());
                    let reg = agents.register(
                        &hello.node,
                        &hello.pod,
                        &hello.version,
                        hello.deltas,
                        Some(Arc::clone(&current)),
                    );
                    nodes.insert(hello.node.clone());
                    *slot = Slot::Open {
                        node: hello.node,
                        id: reg.session,
                        outbox: reg.outbox,
                    };
                }
            }
            Slot::Open { node, id, outbox } => {
                if control & 4 != 0 && outbox.has_changed().unwrap_or(false) {
                    let queued = outbox.borrow_and_update().clone();
                    if let Some(snapshot) = queued {
                        nonce += 1;
                        let base = agents.sent(node, *id, Arc::clone(&snapshot), nonce.to_string());
                        if let Some(base) = base {
                            let delta = snapshot.delta_from(&base);
                            assert_ne!(base.version, snapshot.version, "a delta from itself");
                            assert!(!delta.is_empty(), "an empty delta between two versions");
                        }
                    }
                }
                if receive(&agents, &METRICS, node, *id, message).is_err() {
                    agents.unregister(node, *id);
                    *slot = Slot::Opening;
                }
            }
        }
        statuses(fixture, &agents, &nodes);
    }
}

/// Every pool's status from what the registry holds now.
fn statuses(fixture: &Fixture, agents: &Agents, nodes: &BTreeSet<String>) {
    let now = Time(Timestamp::UNIX_EPOCH);
    agents.with(|by_node| {
        for pool in &fixture.resources {
            let key = format!("ns/{}", pool.metadata.name.as_deref().unwrap_or_default());
            let inputs = Inputs {
                pool,
                entry: fixture.entries.get(&key),
                nodes,
                agents: by_node,
                local: None,
                // Advice from the first observation, so the rules see
                // whatever the fuzzer reports.
                tuning: &advice::Options {
                    advice_after: std::time::Duration::ZERO,
                    interval: std::time::Duration::ZERO,
                },
            };
            let status = status::compute(&inputs, None, now.clone());
            if let Some(r) = &status.recommendation
                && let (Some(size), Some(idle), Some(streams)) = (r.size, r.max_idle, r.max_streams)
            {
                assert!(size >= 1 && streams >= 1, "{r:?}");
                assert!((0..=size).contains(&idle), "{r:?}");
            }
            assert!(status.addresses.len() <= MAX_STATUS_ADDRESSES);
            let agents = status.agents.as_ref().expect("agent counts");
            assert!(
                agents.synced <= agents.desired && agents.rejected <= agents.desired,
                "{agents:?}"
            );
        }
    });
}
