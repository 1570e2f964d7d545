//! Model-based property test: random sequences of acquire, release (ok,
//! application error, transport error), connection failure (GOAWAY,
//! keepalive, closed), server stream-limit changes, dial refusals, settings
//! changes and time advance, run against the pool on paused time with the
//! in-memory connector. After every step the pool is compared with a plain
//! model: the leases the test holds, the connections the connector has open,
//! and the settings in force.

use std::time::Duration;

use proptest::prelude::*;
use tidepool_agent::pool::memory::{MemoryConn, MemoryConnector};
use tidepool_agent::pool::{
    CloseReason, ConnEvent, ConnectionInfo, ConnectionState, Error, Lease, Outcome, Pool,
    PoolMetrics, Settings, WhenFull,
};
use tokio::time::Instant;

const ADDRS: [&str; 2] = ["10.0.0.1:50051", "10.0.0.2:50051"];

#[derive(Debug, Clone)]
enum Op {
    Acquire(usize),
    Release(usize, Outcome),
    Fail(usize, CloseReason),
    ServerMax(usize, u32),
    Refuse(usize, bool),
    Reconfigure(Settings),
    /// Advance the clock; with `false`, the pool's timers have not run when
    /// the next step comes, so acquire itself must refuse expired connections.
    Advance(Duration, bool),
}

fn settings() -> impl Strategy<Value = Settings> {
    (1usize..=4, 0usize..=4, 1u32..=4, 5u64..=60, any::<bool>()).prop_map(
        |(size, idle, streams, ttl, wait)| Settings {
            size,
            max_idle: idle.min(size),
            max_streams: streams,
            ttl: Duration::from_secs(ttl),
            when_full: if wait {
                WhenFull::Wait
            } else {
                WhenFull::Overflow
            },
            acquire_timeout: Duration::from_secs(1),
        },
    )
}

fn op() -> impl Strategy<Value = Op> {
    let outcome = prop_oneof![
        Just(Outcome::Ok),
        Just(Outcome::ApplicationError),
        Just(Outcome::TransportError)
    ];
    let reason = prop_oneof![
        Just(CloseReason::GoAway),
        Just(CloseReason::Keepalive),
        Just(CloseReason::Closed)
    ];
    prop_oneof![
        6 => (0..ADDRS.len()).prop_map(Op::Acquire),
        4 => (any::<usize>(), outcome).prop_map(|(i, o)| Op::Release(i, o)),
        1 => (any::<usize>(), reason).prop_map(|(i, r)| Op::Fail(i, r)),
        1 => (any::<usize>(), 1u32..=4).prop_map(|(i, n)| Op::ServerMax(i, n)),
        1 => (0..ADDRS.len(), proptest::bool::weighted(0.3)).prop_map(|(a, r)| Op::Refuse(a, r)),
        1 => settings().prop_map(Op::Reconfigure),
        2 => (0u64..40, any::<bool>()).prop_map(|(s, settle)| Op::Advance(Duration::from_secs(s), settle)),
    ]
}

/// The model: what the test knows to be true.
struct Model {
    settings: Settings,
    /// Leases held, with their address index.
    held: Vec<(usize, Lease<MemoryConn>)>,
    refusing: [bool; ADDRS.len()],
    /// The pool's timers have caught up with the clock.
    settled: bool,
}

impl Model {
    fn leases_on(&self, addr: usize, conn: u64) -> u32 {
        let n = self
            .held
            .iter()
            .filter(|(a, l)| *a == addr && l.connection_id() == conn)
            .count();
        u32::try_from(n).unwrap()
    }
}

fn listed(info: &ConnectionInfo) -> bool {
    matches!(
        info.state,
        ConnectionState::Available | ConnectionState::Busy
    )
}

/// Lets watcher and dial tasks run.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// Compares the pool with the model.
fn check(pool: &Pool<MemoryConnector>, connector: &MemoryConnector, model: &Model, now: Instant) {
    let snapshot = pool.snapshot();
    let s = &model.settings;
    for (a, addr) in ADDRS.iter().enumerate() {
        let infos = pool.connections(addr);
        let held = model.held.iter().filter(|(x, _)| *x == a).count();
        let Some(occ) = snapshot.iter().find(|o| o.address == *addr) else {
            assert_eq!(held, 0);
            continue;
        };
        for info in &infos {
            assert_eq!(
                info.streams,
                model.leases_on(a, info.id),
                "stream count of {info:?}"
            );
            let lifetime = (info.expires - info.born).as_secs_f64() / s.ttl.as_secs_f64();
            assert!(
                (0.899..=1.101).contains(&lifetime),
                "ttl jitter out of ±10%: {lifetime}"
            );
            match info.state {
                ConnectionState::Available => {
                    assert!(
                        info.streams < info.max_streams,
                        "full connection on the available list: {info:?}"
                    );
                    assert!(
                        !model.settled || now < info.expires,
                        "expired connection still pooled: {info:?}"
                    );
                }
                ConnectionState::Busy => {
                    assert!(
                        info.streams >= info.max_streams,
                        "free connection on the busy list: {info:?}"
                    );
                    assert!(
                        !model.settled || now < info.expires,
                        "expired connection still pooled: {info:?}"
                    );
                }
                ConnectionState::Draining(_) => {
                    assert!(info.streams > 0, "drained connection not closed: {info:?}")
                }
                ConnectionState::Overflow => {
                    assert_eq!(info.streams, 1, "overflow connection: {info:?}")
                }
            }
        }
        let count = |f: &dyn Fn(&ConnectionInfo) -> bool| infos.iter().filter(|i| f(i)).count();
        assert_eq!(occ.connections, count(&listed));
        assert!(
            occ.connections <= s.size,
            "{} pooled > size {}",
            occ.connections,
            s.size
        );
        assert_eq!(occ.idle, count(&|i| listed(i) && i.streams == 0));
        assert!(
            occ.idle <= s.max_idle,
            "{} idle > maxIdle {}",
            occ.idle,
            s.max_idle
        );
        assert_eq!(occ.busy, count(&|i| i.state == ConnectionState::Busy));
        assert_eq!(
            occ.draining,
            count(&|i| matches!(i.state, ConnectionState::Draining(_)))
        );
        assert_eq!(
            occ.overflow,
            count(&|i| i.state == ConnectionState::Overflow)
        );
        assert_eq!(occ.streams, held, "streams in the snapshot != leases held");
        assert_eq!(pool.active_streams(addr), held);
        assert_eq!(occ.waiters, 0);
        assert_eq!(
            infos.len(),
            connector.open_to(addr),
            "pool and connector disagree on open connections"
        );
        assert_eq!(occ.dials + occ.dial_failures, connector.attempts(addr));
    }
    for (_, lease) in &model.held {
        assert!(
            connector.is_open(lease.conn().id()),
            "a connection closed under a held stream"
        );
    }
}

async fn acquire(pool: &Pool<MemoryConnector>, model: &mut Model, a: usize) {
    let addr = ADDRS[a];
    let before = pool.connections(addr);
    let t0 = Instant::now();
    let result = pool.acquire(addr).await;
    let waited = Instant::now() > t0;
    let s = model.settings;
    match result {
        Ok(lease) => {
            let id = lease.connection_id();
            model.held.push((a, lease));
            let after = pool.connections(addr);
            let info = after
                .iter()
                .find(|i| i.id == id)
                .expect("granted connection is known");
            assert!(
                model.leases_on(a, id) <= info.max_streams,
                "stream granted over max-streams: {info:?}"
            );
            if !waited {
                assert!(
                    t0 < info.expires,
                    "stream granted on an expired connection: {info:?}"
                );
            }
            let new = !before.iter().any(|i| i.id == id);
            if new {
                let free = before.iter().find(|i| {
                    i.state == ConnectionState::Available
                        && i.streams < i.max_streams
                        && t0 < i.expires
                });
                assert!(
                    free.is_none() || waited,
                    "dialed although {free:?} was free"
                );
            }
            if info.state == ConnectionState::Overflow {
                assert_eq!(s.when_full, WhenFull::Overflow, "overflow in Wait mode");
                // Connections past TTL count until their timer or an
                // acquire retires them.
                let pooled = before.iter().filter(|i| listed(i)).count();
                assert!(pooled >= s.size || waited, "overflow with room in the pool");
            }
        }
        Err(Error::Dial { addr: named, .. }) => {
            assert_eq!(named, addr);
            assert!(model.refusing[a], "dial failed without a refusal");
        }
        Err(Error::Full {
            addr: named,
            waited: w,
            ..
        }) => {
            assert_eq!(named, addr);
            assert_eq!(s.when_full, WhenFull::Wait);
            assert!(w >= s.acquire_timeout);
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn run(initial: Settings, ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let connector = MemoryConnector::new();
        let pool = Pool::new(
            "model",
            initial,
            connector.clone(),
            PoolMetrics::unregistered(),
        )
        .unwrap();
        let mut model = Model {
            settings: initial,
            held: Vec::new(),
            refusing: [false; ADDRS.len()],
            settled: true,
        };
        for op in ops {
            // Steps that let the pool's tasks run catch its timers up.
            if matches!(op, Op::Fail(..) | Op::ServerMax(..) | Op::Reconfigure(..)) {
                model.settled = true;
            }
            match op {
                Op::Acquire(a) => acquire(&pool, &mut model, a).await,
                Op::Release(i, outcome) => {
                    if model.held.is_empty() {
                        continue;
                    }
                    let (a, lease) = model.held.remove(i % model.held.len());
                    let id = lease.connection_id();
                    lease.finish(outcome);
                    if outcome == Outcome::TransportError {
                        let info = pool.connections(ADDRS[a]).into_iter().find(|c| c.id == id);
                        assert!(
                            info.as_ref().is_none_or(|c| !listed(c)),
                            "transport error kept {info:?} pooled"
                        );
                    }
                }
                Op::Fail(i, reason) => {
                    let open = connector.open_ids();
                    if open.is_empty() {
                        continue;
                    }
                    let mem = open[i % open.len()];
                    connector.send(mem, ConnEvent::Closed(reason));
                    settle().await;
                    let holders: Vec<_> = model
                        .held
                        .iter()
                        .filter(|(_, l)| l.conn().id() == mem)
                        .collect();
                    match holders.first() {
                        None => assert!(!connector.is_open(mem), "failed idle connection kept"),
                        Some((a, lease)) => {
                            let info = pool
                                .connections(ADDRS[*a])
                                .into_iter()
                                .find(|c| c.id == lease.connection_id());
                            assert!(
                                matches!(info.map(|c| c.state), Some(ConnectionState::Draining(_))),
                                "failed connection still pooled"
                            );
                        }
                    }
                }
                Op::ServerMax(i, n) => {
                    let open = connector.open_ids();
                    if let Some(&mem) = open.get(i % open.len().max(1)) {
                        connector.send(mem, ConnEvent::MaxConcurrentStreams(n));
                        settle().await;
                    }
                }
                Op::Refuse(a, refuse) => {
                    connector.refuse(ADDRS[a], refuse);
                    model.refusing[a] = refuse;
                }
                Op::Reconfigure(settings) => {
                    pool.reconfigure(settings).unwrap();
                    model.settings = settings;
                    settle().await;
                }
                Op::Advance(d, settled) => {
                    tokio::time::advance(d).await;
                    if settled {
                        settle().await;
                    }
                    model.settled = settled;
                }
            }
            check(&pool, &connector, &model, Instant::now());
        }
        // Every stream released: nothing leaks, and removing the addresses
        // closes every connection.
        model.held.clear();
        check(&pool, &connector, &model, Instant::now());
        pool.retain_addresses(&[]);
        settle().await;
        assert_eq!(connector.open_connections(), 0, "connections leaked");
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn the_pool_matches_the_model(initial in settings(), ops in proptest::collection::vec(op(), 1..80)) {
        run(initial, ops);
    }
}
