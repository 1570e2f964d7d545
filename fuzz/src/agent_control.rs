//! The agent's side of the control stream: operator messages, decoded from
//! the input with prost, into [`handle_snapshot`] over a real [`Runtime`]
//! (the applier the agent runs) and into [`receive_clients`].
//!
//! Frames: a control byte (unused) and a length-delimited
//! `OperatorMessage`, as many as decode. After each snapshot, the answer
//! must echo its version and nonce; an Ack must leave the runtime running
//! exactly the pools the client keeps as the next delta's base, and a Nack
//! must change neither.
//!
//! Dedicated listeners bind `192.0.2.1` (TEST-NET-1, RFC 5737), which this
//! machine does not have: a pool with `listenPort` is refused at its bind,
//! the same way every run, and no port of the machine is taken.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, LazyLock};

use prometheus_client::registry::Registry;
use tidepool_agent::config::ProxyOptions;
use tidepool_agent::control::{Apply, ClientState, handle_snapshot, receive_clients};
use tidepool_agent::metrics::Metrics;
use tidepool_agent::pool::PoolMetrics;
use tidepool_agent::pool::h2::H2Connector;
use tidepool_agent::runtime::{Runtime, RuntimeOptions};
use tidepool_agent::shutdown::Drain;
use tidepool_crds::control::pb;
use tidepool_crds::control::pb::agent_message::Kind as Answer;
use tidepool_crds::control::pb::operator_message::Kind;

/// The runtime the appliers run in (nothing is spawned on it: no pool is
/// used, no listener binds).
static TOKIO: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
});

fn runtime() -> Runtime {
    let mut registry = Registry::default();
    Runtime::new(
        RuntimeOptions {
            listen_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            shared_port: 15000,
            connector: H2Connector::default(),
            proxy: ProxyOptions::default(),
            observe_window: Default::default(),
        },
        Arc::new(|_listener, _port, _runtime, _stop| {}),
        Metrics::new(&mut registry),
        PoolMetrics::new(&mut registry),
        Drain::new(),
    )
}

fn snapshot(runtime: &Runtime, state: &mut ClientState, snapshot: pb::Snapshot) {
    let (version, nonce) = (snapshot.version.clone(), snapshot.nonce.clone());
    let (before, table) = (state.clone(), runtime.table());
    let answer = handle_snapshot(runtime, state, snapshot);
    match answer.kind {
        Some(Answer::Ack(ack)) => {
            assert_eq!((ack.version, ack.nonce), (version.clone(), nonce));
            assert_eq!(state.version, version);
            let kept: BTreeSet<&String> = state.pools.keys().collect();
            runtime.with_table(|t| {
                let running: BTreeSet<&String> = t.pools.keys().collect();
                assert_eq!(
                    running, kept,
                    "the runtime runs other pools than the client keeps"
                );
                for (key, pool) in &state.pools {
                    assert_eq!(*t.pools[key].config, **pool, "{key}");
                }
            });
            let reported: Vec<String> = Apply::report(runtime).iter().map(|p| p.key()).collect();
            assert_eq!(reported.iter().collect::<BTreeSet<_>>(), kept);
        }
        Some(Answer::Nack(nack)) => {
            assert_eq!((nack.version, nack.nonce), (version, nonce));
            assert!(!nack.error.is_empty());
            assert_eq!(*state, before, "a refused snapshot changed the client");
            assert!(
                Arc::ptr_eq(&runtime.table(), &table),
                "a refused snapshot changed the runtime"
            );
        }
        other => panic!("a snapshot answered with {other:?}"),
    }
}

/// One operator stream.
pub fn run(data: &[u8]) {
    let _tokio = TOKIO.enter();
    let runtime = runtime();
    let mut state = ClientState::default();
    for (_, message) in crate::frames::<pb::OperatorMessage>(data) {
        match message.kind {
            Some(Kind::Snapshot(s)) => snapshot(&runtime, &mut state, s),
            Some(Kind::Clients(map)) => {
                let version = map.version.clone();
                receive_clients(&runtime, map);
                assert_eq!(runtime.clients().version, version);
            }
            None => {}
        }
    }
}
