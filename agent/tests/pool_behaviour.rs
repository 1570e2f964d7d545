//! One test per fix or addition of design.md's "The pool", each failing
//! without it, plus bad input. Time is paused, connections are in-memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tidepool_agent::pool::memory::{MemoryConn, MemoryConnector};
use tidepool_agent::pool::{
    CloseReason, ConnEvent, Connected, ConnectionState, Connector, Error, EvictionReason,
    Observation, ObserveWindow, Outcome, Pool, PoolMetrics, Settings, WhenFull,
};
use tidepool_testkit::memory_pool;
use tokio::time::{Instant, advance};

const A: &str = "10.0.0.1:50051";
const B: &str = "10.0.0.2:50051";

fn occupancy(pool: &Pool<MemoryConnector>, addr: &str) -> tidepool_agent::pool::AddressOccupancy {
    pool.snapshot()
        .into_iter()
        .find(|o| o.address == addr)
        .expect("address in snapshot")
}

/// Lets spawned pool tasks (dials, watchers) run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

// 1. Per-address locking; no lock across dial or close.

/// A connector whose dials to "slow" never finish.
#[derive(Clone, Default)]
struct Stuck(MemoryConnector);

impl Connector for Stuck {
    type Conn = MemoryConn;
    async fn connect(&self, addr: &str) -> std::io::Result<Connected<MemoryConn>> {
        if addr == "slow:1" {
            std::future::pending::<()>().await;
        }
        self.0.connect(addr).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_dial_in_flight_blocks_neither_other_addresses_nor_the_same_one() {
    let pool = Pool::new(
        "p",
        Settings::default(),
        Stuck::default(),
        PoolMetrics::unregistered(),
    )
    .unwrap();
    let stuck = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire("slow:1").await.map(|_| ()) }
    });
    settle().await;
    // The dial to slow:1 is in flight; another address is served, and the
    // slow address's own state is readable (its lock is free).
    let lease = tokio::time::timeout(Duration::from_secs(1), pool.acquire("fast:1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.address(), "fast:1");
    let slow = pool
        .snapshot()
        .into_iter()
        .find(|o| o.address == "slow:1")
        .unwrap();
    assert_eq!((slow.waiters, slow.connections), (1, 0));
    assert_eq!(pool.active_streams("slow:1"), 0);
    stuck.abort();
}

/// A connection that, when closed, checks from another thread whether the
/// pool's address lock is free.
#[derive(Clone)]
struct Probe {
    _inner: Arc<ProbeInner>,
}
struct ProbeInner {
    pool: Arc<std::sync::OnceLock<Pool<ProbeConnector>>>,
    closed_under_lock: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
}
impl Drop for ProbeInner {
    fn drop(&mut self) {
        let pool = self.pool.get().unwrap().clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = pool.active_streams(A);
            let _ = tx.send(());
        });
        let free = rx.recv_timeout(Duration::from_millis(500)).is_ok();
        self.closed_under_lock.store(!free, Ordering::SeqCst);
        self.closed.store(true, Ordering::SeqCst);
    }
}
#[derive(Clone)]
struct ProbeConnector {
    pool: Arc<std::sync::OnceLock<Pool<ProbeConnector>>>,
    closed_under_lock: Arc<AtomicBool>,
    closed: Arc<AtomicBool>,
}
impl Connector for ProbeConnector {
    type Conn = Probe;
    async fn connect(&self, _addr: &str) -> std::io::Result<Connected<Probe>> {
        let (_tx, events) = tokio::sync::mpsc::unbounded_channel();
        #[expect(
            clippy::mem_forget,
            reason = "the connection never reports anything, and its channel must stay open"
        )]
        std::mem::forget(_tx);
        Ok(Connected {
            conn: Probe {
                _inner: Arc::new(ProbeInner {
                    pool: self.pool.clone(),
                    closed_under_lock: self.closed_under_lock.clone(),
                    closed: self.closed.clone(),
                }),
            },
            max_concurrent_streams: None,
            events,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_closed_with_no_lock_held() {
    let connector = ProbeConnector {
        pool: Arc::default(),
        closed_under_lock: Arc::default(),
        closed: Arc::default(),
    };
    let pool = Pool::new(
        "p",
        Settings::default().max_idle(0),
        connector.clone(),
        PoolMetrics::unregistered(),
    )
    .unwrap();
    connector.pool.set(pool.clone()).ok().unwrap();
    // maxIdle 0: the release closes the connection.
    pool.acquire(A).await.unwrap().finish(Outcome::Ok);
    assert!(
        connector.closed.load(Ordering::SeqCst),
        "the idle connection was not closed"
    );
    assert!(
        !connector.closed_under_lock.load(Ordering::SeqCst),
        "closed while holding the address lock"
    );
}

// 2. One dial in flight per address.

#[tokio::test(start_paused = true)]
async fn concurrent_misses_share_one_dial() {
    let (pool, connector) = memory_pool(Settings::default());
    connector.set_dial_delay(Duration::from_millis(50));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(A).await.unwrap() })
        })
        .collect();
    let mut leases = Vec::new();
    for t in tasks {
        leases.push(t.await.unwrap());
    }
    assert_eq!(connector.attempts(A), 1, "each miss dialed");
    assert!(
        leases
            .iter()
            .all(|l| l.connection_id() == leases[0].connection_id())
    );
    assert_eq!(occupancy(&pool, A).streams, 20);
    assert_eq!(occupancy(&pool, A).dials, 1);
}

// 3. TTL with jitter, busy connections included.

#[tokio::test(start_paused = true)]
async fn ttl_retires_a_busy_connection_which_closes_at_its_last_stream() {
    let ttl = Duration::from_secs(60);
    let (pool, connector) = memory_pool(Settings::default().ttl(ttl).max_streams(1));
    let old = pool.acquire(A).await.unwrap();
    let old_id = old.conn().id();
    advance(ttl.mul_f64(1.11)).await;
    settle().await;
    let info = pool.connections(A);
    assert_eq!(
        info[0].state,
        ConnectionState::Draining(EvictionReason::Ttl)
    );
    // No new stream on it: the next acquire dials.
    let new = pool.acquire(A).await.unwrap();
    assert_ne!(new.conn().id(), old_id);
    assert!(connector.is_open(old_id), "closed under a running stream");
    drop(old);
    assert!(!connector.is_open(old_id), "not closed at its last stream");
    let o = occupancy(&pool, A);
    assert_eq!((o.connections, o.draining, o.evictions.ttl), (1, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_past_its_ttl_is_closed_by_its_timer() {
    let ttl = Duration::from_secs(60);
    let (pool, connector) = memory_pool(Settings::default().ttl(ttl));
    let id = {
        let lease = pool.acquire(A).await.unwrap();
        lease.conn().id()
    };
    assert!(connector.is_open(id));
    advance(ttl.mul_f64(0.89)).await;
    settle().await;
    assert!(connector.is_open(id), "closed before ttl - 10%");
    advance(ttl.mul_f64(0.22)).await;
    settle().await;
    assert!(!connector.is_open(id), "idle connection outlived ttl + 10%");
    assert_eq!(occupancy(&pool, A).evictions.ttl, 1);
}

#[tokio::test(start_paused = true)]
async fn ttl_is_jittered_within_ten_percent() {
    let ttl = Duration::from_secs(100);
    let (pool, _connector) = memory_pool(
        Settings::default()
            .ttl(ttl)
            .max_streams(1)
            .size(50)
            .max_idle(50),
    );
    let mut leases = Vec::new();
    for _ in 0..50 {
        leases.push(pool.acquire(A).await.unwrap());
    }
    let info = pool.connections(A);
    assert_eq!(info.len(), 50);
    let lifetimes: Vec<Duration> = info.iter().map(|c| c.expires - c.born).collect();
    assert!(
        lifetimes
            .iter()
            .all(|l| *l >= ttl.mul_f64(0.9) && *l <= ttl.mul_f64(1.1))
    );
    let min = lifetimes.iter().min().unwrap();
    let max = lifetimes.iter().max().unwrap();
    assert!(
        *max - *min > Duration::from_secs(5),
        "lifetimes barely spread: {min:?}..{max:?}"
    );
}

// 4. Only transport failures evict.

#[tokio::test(start_paused = true)]
async fn an_application_error_keeps_the_connection_and_a_transport_error_evicts_it() {
    let (pool, connector) = memory_pool(Settings::default());
    let lease = pool.acquire(A).await.unwrap();
    let id = lease.conn().id();
    lease.finish(Outcome::ApplicationError);
    let lease = pool.acquire(A).await.unwrap();
    assert_eq!(
        lease.conn().id(),
        id,
        "an application error replaced the connection"
    );
    assert_eq!(occupancy(&pool, A).evictions.total(), 0);
    lease.finish(Outcome::TransportError);
    assert!(!connector.is_open(id));
    assert_eq!(occupancy(&pool, A).evictions.transport, 1);
    assert_ne!(pool.acquire(A).await.unwrap().conn().id(), id);
}

// 5. Exactly-once release, also on cancellation.

#[tokio::test(start_paused = true)]
async fn a_cancelled_caller_releases_its_stream_once() {
    let (pool, _connector) = memory_pool(Settings::default());
    let holder = tokio::spawn({
        let pool = pool.clone();
        async move {
            let _lease = pool.acquire(A).await.unwrap();
            std::future::pending::<()>().await;
        }
    });
    settle().await;
    assert_eq!(pool.active_streams(A), 1);
    holder.abort();
    let _ = holder.await;
    assert_eq!(pool.active_streams(A), 0);
    // Dropped without finish, and finished: each counts once.
    drop(pool.acquire(A).await.unwrap());
    pool.acquire(A).await.unwrap().finish(Outcome::Ok);
    let o = occupancy(&pool, A);
    assert_eq!((o.streams, o.idle, o.connections), (0, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_cancelled_in_the_queue_leaves_it_and_loses_no_stream() {
    let settings = Settings::default()
        .size(1)
        .max_idle(1)
        .max_streams(1)
        .when_full(WhenFull::Wait);
    let (pool, _connector) = memory_pool(settings.acquire_timeout(Duration::from_secs(10)));
    let first = pool.acquire(A).await.unwrap();
    let waiter = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire(A).await.map(|_| ()) }
    });
    settle().await;
    assert_eq!(occupancy(&pool, A).waiters, 1);
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(occupancy(&pool, A).waiters, 0);
    drop(first);
    assert_eq!(pool.active_streams(A), 0);
    // The stream is free again.
    let again = tokio::time::timeout(Duration::from_millis(1), pool.acquire(A)).await;
    assert!(again.unwrap().is_ok());
}

// 6. Effective max-streams = min(setting, server's limit).

#[tokio::test(start_paused = true)]
async fn the_servers_stream_limit_caps_the_setting() {
    let (pool, connector) = memory_pool(Settings::default().max_streams(20));
    connector.set_server_max_streams(Some(3));
    let leases: Vec<_> = futures::future::join_all((0..4).map(|_| pool.acquire(A))).await;
    let leases: Vec<_> = leases.into_iter().map(Result::unwrap).collect();
    let first = leases[0].connection_id();
    assert_eq!(
        leases.iter().filter(|l| l.connection_id() == first).count(),
        3
    );
    assert_eq!(pool.connections(A).len(), 2);
    assert_eq!(pool.connections(A)[0].max_streams, 3);
    // The server lowers it to 2 later: the connection takes no more streams
    // until it is below 2; nothing is cut.
    let second = leases[3].connection_id();
    let conn_id = leases[3].conn().id();
    assert!(connector.send(conn_id, ConnEvent::MaxConcurrentStreams(1)));
    settle().await;
    let info = pool
        .connections(A)
        .into_iter()
        .find(|c| c.id == second)
        .unwrap();
    assert_eq!((info.max_streams, info.state), (1, ConnectionState::Busy));
}

// 7. Dead connections found by GOAWAY and keepalive.

#[tokio::test(start_paused = true)]
async fn goaway_drains_a_busy_connection_and_closes_an_idle_one() {
    let (pool, connector) = memory_pool(Settings::default());
    let busy = pool.acquire(A).await.unwrap();
    let busy_id = busy.conn().id();
    let idle_id = pool.acquire(B).await.unwrap().conn().id();
    assert!(connector.goaway(busy_id));
    assert!(connector.send(idle_id, ConnEvent::Closed(CloseReason::Keepalive)));
    settle().await;
    assert!(!connector.is_open(idle_id));
    assert_eq!(occupancy(&pool, B).evictions.keepalive, 1);
    assert!(connector.is_open(busy_id), "goaway cut a running stream");
    assert_eq!(
        pool.connections(A)[0].state,
        ConnectionState::Draining(EvictionReason::GoAway)
    );
    assert_ne!(pool.acquire(A).await.unwrap().conn().id(), busy_id);
    drop(busy);
    assert!(!connector.is_open(busy_id));
    assert_eq!(occupancy(&pool, A).evictions.goaway, 1);
}

// 8. Overflow and Wait when full.

#[tokio::test(start_paused = true)]
async fn overflow_dials_an_unpooled_connection_and_counts_it() {
    let (pool, connector) = memory_pool(Settings::default().size(1).max_idle(1).max_streams(1));
    let pooled = pool.acquire(A).await.unwrap();
    let extra = pool.acquire(A).await.unwrap();
    assert_ne!(extra.conn().id(), pooled.conn().id());
    let o = occupancy(&pool, A);
    assert_eq!(
        (o.connections, o.overflow, o.overflow_total, o.streams),
        (1, 1, 1, 2)
    );
    let extra_id = extra.conn().id();
    drop(extra);
    assert!(
        !connector.is_open(extra_id),
        "an overflow connection outlived its stream in a full pool"
    );
    assert_eq!(occupancy(&pool, A).overflow, 0);
}

#[tokio::test(start_paused = true)]
async fn overflow_never_refuses_a_burst_larger_than_the_queue_on_a_cold_address() {
    let (pool, connector) = memory_pool(Settings::default());
    connector.set_dial_delay(Duration::from_millis(10));
    let burst = tidepool_agent::pool::MAX_WAITERS + 50;
    let results = futures::future::join_all((0..burst).map(|_| pool.acquire(A))).await;
    let refused = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(refused, 0, "Overflow refused {refused} of {burst} callers");
    let o = occupancy(&pool, A);
    assert_eq!(o.streams, burst);
    assert!(
        o.overflow_total >= 50,
        "callers past the queue dial their own connection: {o:?}"
    );
}

/// One connection of one stream, and callers queue for it for at most 1 s.
fn one_stream_then_wait() -> Settings {
    Settings::default()
        .size(1)
        .max_idle(1)
        .max_streams(1)
        .when_full(WhenFull::Wait)
        .acquire_timeout(Duration::from_secs(1))
}

#[tokio::test(start_paused = true)]
async fn wait_queues_in_order_and_then_reports_the_pool_full() {
    let (pool, connector) = memory_pool(one_stream_then_wait());
    let first = pool.acquire(A).await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let waiters: Vec<_> = (0..3)
        .map(|i| {
            let (pool, order) = (pool.clone(), order.clone());
            tokio::spawn(async move {
                let lease = pool.acquire(A).await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(100)).await;
                drop(lease);
            })
        })
        .collect();
    // Queue them in order 0, 1, 2.
    settle().await;
    assert_eq!(occupancy(&pool, A).waiters, 3);
    advance(Duration::from_millis(10)).await;
    drop(first);
    for w in waiters {
        w.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
    assert_eq!(connector.attempts(A), 1, "Wait dialed");
    // Now hold the only stream and time out.
    let _held = pool.acquire(A).await.unwrap();
    let started = Instant::now();
    let err = pool.acquire(A).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(1));
    assert!(matches!(err, Error::Full { .. }));
    let text = err.to_string();
    assert!(text.contains("shop/payments") && text.contains(A), "{text}");
    assert_eq!(occupancy(&pool, A).waiters, 0);
}

// 9. Live reconfiguration.

#[tokio::test(start_paused = true)]
async fn a_smaller_size_drains_the_surplus_without_cutting_a_stream() {
    let (pool, connector) = memory_pool(Settings::default().size(4).max_idle(4).max_streams(1));
    let leases: Vec<_> = futures::future::join_all((0..4).map(|_| pool.acquire(A))).await;
    let mut leases: Vec<_> = leases.into_iter().map(Result::unwrap).collect();
    drop(leases.pop()); // one idle connection
    assert_eq!(occupancy(&pool, A).connections, 4);
    pool.reconfigure(Settings::default().size(1).max_idle(1).max_streams(1))
        .unwrap();
    assert_eq!(pool.settings().size, 1);
    let o = occupancy(&pool, A);
    assert_eq!((o.connections, o.draining, o.streams), (1, 2, 3));
    assert_eq!(
        connector.open_connections(),
        3,
        "the idle one closes, the busy ones stay"
    );
    for lease in leases.drain(..) {
        lease.finish(Outcome::Ok);
    }
    let o = occupancy(&pool, A);
    assert_eq!((o.connections, o.draining, o.streams), (1, 0, 0));
    assert_eq!(connector.open_connections(), 1);
    assert_eq!(o.evictions.resize, 3);
}

#[tokio::test(start_paused = true)]
async fn reconfigure_refuses_bad_settings_and_keeps_the_old_ones() {
    let (pool, _connector) = memory_pool(Settings::default());
    let err = pool
        .reconfigure(Settings::default().size(2).max_idle(3))
        .unwrap_err();
    assert!(err.to_string().contains("maxIdle"), "{err}");
    assert_eq!(pool.settings(), Settings::default());
    let err = Pool::new(
        "p",
        Settings::default().max_streams(0),
        MemoryConnector::new(),
        PoolMetrics::unregistered(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("maxStreams"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn switching_to_wait_queues_the_next_caller_instead_of_overflowing() {
    let (pool, _connector) = memory_pool(Settings::default().size(1).max_idle(1).max_streams(1));
    let _held = pool.acquire(A).await.unwrap();
    pool.reconfigure(
        Settings::default()
            .size(1)
            .max_idle(1)
            .max_streams(1)
            .when_full(WhenFull::Wait),
    )
    .unwrap();
    let err = pool.acquire(A).await.unwrap_err();
    assert!(matches!(err, Error::Full { .. }), "{err}");
    assert_eq!(occupancy(&pool, A).overflow_total, 0);
}

// 10. Occupancy and metrics.

#[tokio::test(start_paused = true)]
async fn occupancy_and_metrics_report_the_state() {
    let mut registry = Registry::with_prefix("tidepool");
    let metrics = PoolMetrics::new(&mut registry);
    let connector = MemoryConnector::new();
    let pool = Pool::new(
        "shop/payments",
        Settings::default().max_streams(2),
        connector,
        metrics,
    )
    .unwrap();
    let a = pool.acquire(A).await.unwrap();
    let b = pool.acquire(A).await.unwrap();
    let c = pool.acquire(A).await.unwrap();
    drop(c);
    let o = occupancy(&pool, A);
    assert_eq!(
        (o.connections, o.busy, o.idle, o.streams, o.dials),
        (2, 1, 1, 2, 2)
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        r#"tidepool_pool_cx_active{pool="shop/payments",address="10.0.0.1:50051"} 2"#,
        r#"tidepool_pool_cx_busy{pool="shop/payments",address="10.0.0.1:50051"} 1"#,
        r#"tidepool_pool_cx_idle{pool="shop/payments",address="10.0.0.1:50051"} 1"#,
        r#"tidepool_pool_rq_active{pool="shop/payments",address="10.0.0.1:50051"} 2"#,
        r#"tidepool_pool_cx_total{pool="shop/payments",address="10.0.0.1:50051"} 2"#,
        r#"tidepool_pool_rq_total{pool="shop/payments",address="10.0.0.1:50051"} 3"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    // Once the first bucket (a minute, by default) is complete, the
    // window's peak: three streams at once.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let line =
        r#"tidepool_pool_observed_peak_streams{pool="shop/payments",address="10.0.0.1:50051"} 3"#;
    assert!(text.contains(line), "missing {line} in\n{text}");
    drop((a, b));
    pool.retain_addresses(&[]);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        !text.contains(A),
        "series of a removed address stayed:\n{text}"
    );
}

// Bad input and failures.

#[tokio::test(start_paused = true)]
async fn a_dial_failure_names_the_address_and_leaves_the_pool_consistent() {
    let (pool, connector) = memory_pool(Settings::default());
    connector.refuse(A, true);
    let err = pool.acquire(A).await.unwrap_err();
    assert!(matches!(err, Error::Dial { .. }));
    assert!(err.to_string().contains(A), "{err}");
    let o = occupancy(&pool, A);
    assert_eq!(
        (o.connections, o.streams, o.waiters, o.dial_failures),
        (0, 0, 0, 1)
    );
    assert!(pool.in_backoff(A));
    assert!(!pool.in_backoff(B));
    advance(Duration::from_secs(1)).await;
    assert!(!pool.in_backoff(A));
    connector.refuse(A, false);
    assert!(pool.acquire(A).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn every_caller_waiting_on_a_failed_dial_gets_the_error() {
    let (pool, connector) = memory_pool(Settings::default());
    connector.refuse(A, true);
    connector.set_dial_delay(Duration::from_millis(10));
    let results = futures::future::join_all((0..5).map(|_| pool.acquire(A))).await;
    assert!(results.iter().all(|r| matches!(r, Err(Error::Dial { .. }))));
    assert_eq!(connector.attempts(A), 1);
}

#[tokio::test(start_paused = true)]
async fn a_removed_address_closes_idle_connections_and_drains_busy_ones() {
    let (pool, connector) = memory_pool(Settings::default());
    let busy = pool.acquire(A).await.unwrap();
    let idle_b = pool.acquire(B).await.unwrap().conn().id();
    pool.retain_addresses(&[]);
    assert!(!connector.is_open(idle_b));
    assert!(connector.is_open(busy.conn().id()));
    assert!(pool.snapshot().is_empty());
    drop(busy);
    assert_eq!(connector.open_connections(), 0);
    // Declared again later, it starts fresh.
    assert!(pool.acquire(A).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_dropped_pool_closes_idle_connections_and_busy_ones_at_their_last_stream() {
    let (pool, connector) = memory_pool(Settings::default());
    let busy = pool.acquire(A).await.unwrap();
    let idle_b = pool.acquire(B).await.unwrap().conn().id();
    drop(pool);
    settle().await;
    assert!(
        !connector.is_open(idle_b),
        "an idle connection outlived its pool"
    );
    assert!(connector.is_open(busy.conn().id()), "a busy stream was cut");
    drop(busy);
    settle().await;
    assert_eq!(
        connector.open_connections(),
        0,
        "a connection outlived its pool and its last stream"
    );
}

// 11. Observation over a sliding window (tuning advice, #17).

/// A pool over the in-memory connector observed over 10 s: buckets of one
/// second, one sample each.
fn observed_pool(settings: Settings) -> (Pool<MemoryConnector>, MemoryConnector) {
    let connector = MemoryConnector::new();
    let window = ObserveWindow::new(Duration::from_secs(10)).unwrap();
    let pool = Pool::with_window(
        "shop/payments",
        settings,
        connector.clone(),
        PoolMetrics::unregistered(),
        window,
    )
    .unwrap();
    (pool, connector)
}

fn observed(pool: &Pool<MemoryConnector>, addr: &str) -> Observation {
    occupancy(pool, addr).observed
}

#[tokio::test(start_paused = true)]
async fn held_streams_show_as_the_peak_with_the_connections_they_took() {
    let (pool, connector) = observed_pool(Settings::default().max_streams(20));
    connector.set_server_max_streams(Some(50));
    let mut held = Vec::new();
    for _ in 0..37 {
        held.push(pool.acquire(A).await.unwrap());
    }
    // Seconds 0, 1, 2 are sampled with 37 streams; the sample of second 3
    // (at 3 s, before the sleep's end at 3.5 s) completes bucket 2.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let o = observed(&pool, A);
    assert_eq!(o.window, Duration::from_secs(3));
    assert_eq!((o.peak_streams, o.p95_streams), (37, 37));
    // min(maxStreams 20, the server's 50) = 20 a connection: 20 + 17 on two
    // pooled connections (size 100 has room, so no overflow).
    assert_eq!(o.peak_connections, 2);
    assert_eq!((o.dials, o.overflow_dials, o.dial_failures), (2, 0, 0));
    assert_eq!(o.server_max_streams, Some(50));
    assert_eq!(pool.coverage(), Duration::from_secs(3));

    // Released at 3.5 s: the sample of second 4 still has 37 (the most
    // since second 3), and leaves the window 10 s later.
    drop(held);
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(observed(&pool, A).peak_streams, 37, "seconds 4..14");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let o = observed(&pool, A);
    assert_eq!((o.peak_streams, o.peak_connections), (0, 0));
    assert_eq!((o.window, o.dials), (Duration::from_secs(10), 0));
}

#[tokio::test(start_paused = true)]
async fn overflow_and_draining_connections_count_as_in_use_and_closes_by_class() {
    let (pool, connector) = observed_pool(Settings::default().size(1).max_idle(1).max_streams(1));
    let leases = futures::future::join_all((0..3).map(|_| pool.acquire(A))).await;
    let leases: Vec<_> = leases.into_iter().map(Result::unwrap).collect();
    // The server sends GOAWAY on the pooled connection: it drains.
    let pooled = leases[0].conn().id();
    assert!(connector.goaway(pooled));
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let o = observed(&pool, A);
    assert_eq!((o.peak_streams, o.peak_connections), (3, 3));
    assert_eq!((o.dials, o.overflow_dials), (3, 2));
    assert_eq!(o.closes.goaway, 1);
    assert_eq!(o.server_max_streams, None);
    drop(leases);
}

#[tokio::test(start_paused = true)]
async fn queued_callers_count_as_waits_with_their_time_and_timeouts() {
    let (pool, _connector) = observed_pool(one_stream_then_wait());
    // The first caller queues for the dial (which takes no time here).
    let first = pool.acquire(A).await.unwrap();
    // The second queues for 300 ms, until the first lets go.
    let second = tokio::spawn({
        let pool = pool.clone();
        async move { pool.acquire(A).await.map(|lease| lease.connection_id()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first);
    assert!(second.await.unwrap().is_ok());
    // The third gives up after its acquire timeout.
    let holder = pool.acquire(A).await.unwrap();
    assert!(matches!(pool.acquire(A).await, Err(Error::Full { .. })));
    drop(holder);

    tokio::time::sleep(Duration::from_secs(3)).await;
    let o = observed(&pool, A);
    assert_eq!(
        o.waits, 3,
        "the dial's caller, the served one, the refused one"
    );
    // Paused time: exactly 300 ms and the 1 s timeout.
    assert_eq!(o.wait_time, Duration::from_millis(1_300));
    assert_eq!(o.wait_timeouts, 1);
    assert_eq!(o.peak_streams, 1);
}

#[tokio::test(start_paused = true)]
async fn the_sampler_ends_with_its_pool() {
    let (pool, _connector) = observed_pool(Settings::default());
    drop(pool.acquire(A).await.unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    // The sampler and the connection's watcher.
    assert_eq!(metrics.num_alive_tasks(), 2);
    drop(pool);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(metrics.num_alive_tasks(), 0);
}
