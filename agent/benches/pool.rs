//! Acquire+release per operation: tidepool's pool against a faithful
//! single-mutex, linear-scan implementation of go-micro's algorithm (kept
//! below as `reference`), in the same run.
//!
//! Cases (each as `pool/tidepool/<case>` and `pool/reference/<case>`):
//! - `threads<T>_addrs<A>`: T threads, each acquiring and releasing one
//!   stream at a time, round-robin over A addresses (pools warmed up first).
//! - `conns<N>`: one address with N connections, each carrying one
//!   long-running stream (max-streams 2); the measured stream lands on one
//!   of them.
//! - `expired_busy<N>`: one address with N connections past their TTL that
//!   still carry a long-running stream, ahead of the one usable connection
//!   on the available list — the state go-micro reaches when long streams
//!   outlive the TTL, and where its acquire becomes a linear scan.
//!
//! - Before the timings, a count: connections opened when 64 callers miss on
//!   a cold address at once (dial latency 1 ms, maxStreams 20). go-micro's
//!   `getConn` drops its lock before dialing, so every caller that misses
//!   dials its own; tidepool coalesces dials per address. `ceil(64/20)` is 4.
//!
//! Run with `make bench` (or `cargo bench -p tidepool-agent --bench pool`).
//! A benchmark measures; it asserts no time.
#![allow(clippy::disallowed_types)] // std::time::Instant: wall-clock timing of OS threads, outside any tokio runtime.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant as StdInstant};

use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use tidepool_agent::pool::memory::MemoryConnector;
use tidepool_agent::pool::{Lease, Pool, PoolMetrics, Settings};
use tokio::runtime::Runtime;

fn addrs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.2.{}.{}:50051", i / 250, i % 250))
        .collect()
}

/// go-micro's `grpc_pool.go` algorithm, kept faithful as the baseline: one
/// mutex for every address; acquire walks the available list from the
/// front, closing expired idle connections, skipping expired busy ones (they
/// stay and are rescanned on every call) and moving full ones to the busy
/// list; a miss dials outside the lock and adds the connection after the
/// head if the list has room; release moves a connection back from the busy
/// list to the front and closes it at zero streams on error, when idle ≥
/// maxIdle, or when expired.
mod reference {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use slab::Slab;
    use tokio::time::Instant;

    /// Dials made so far (every `RefPool`).
    pub static DIALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    /// How long a dial takes, in µs (0 for the timed cases).
    pub static DIAL_LATENCY_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    /// Stands in for a `*grpc.ClientConn`: cloning it costs what cloning a
    /// connection handle costs.
    #[derive(Clone)]
    pub struct Conn(#[allow(dead_code)] Arc<u64>);

    struct PoolConn {
        conn: Conn,
        streams: u32,
        created: Instant,
        /// Which list it is on: `None` when unpooled ("throwaway").
        list: Option<Which>,
        pre: Option<usize>,
        next: Option<usize>,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Which {
        Head,
        Busy,
    }

    #[derive(Default)]
    struct StreamsPool {
        conns: Slab<PoolConn>,
        head: Option<usize>,
        busy: Option<usize>,
        count: usize,
        idle: usize,
    }

    impl StreamsPool {
        fn first(&self, which: Which) -> Option<usize> {
            match which {
                Which::Head => self.head,
                Which::Busy => self.busy,
            }
        }

        fn set_first(&mut self, which: Which, key: Option<usize>) {
            match which {
                Which::Head => self.head = key,
                Which::Busy => self.busy = key,
            }
        }

        /// `addConnAfter(conn, list head)`.
        fn add_front(&mut self, key: usize, which: Which) {
            let old = self.first(which);
            {
                let c = &mut self.conns[key];
                c.pre = None;
                c.next = old;
                c.list = Some(which);
            }
            if let Some(old) = old {
                self.conns[old].pre = Some(key);
            }
            self.set_first(which, Some(key));
            self.count += 1;
        }

        /// `removeConn(conn)`.
        fn remove(&mut self, key: usize) {
            let (pre, next, which) = {
                let c = &self.conns[key];
                (c.pre, c.next, c.list.expect("listed"))
            };
            match pre {
                Some(p) => self.conns[p].next = next,
                None => self.set_first(which, next),
            }
            if let Some(n) = next {
                self.conns[n].pre = pre;
            }
            let c = &mut self.conns[key];
            c.pre = None;
            c.next = None;
            c.list = None;
            self.count -= 1;
        }
    }

    pub struct RefPool {
        size: usize,
        ttl: Duration,
        max_idle: usize,
        max_streams: u32,
        conns: Mutex<HashMap<String, StreamsPool>>,
    }

    /// go-micro's release takes the address as an argument; borrowing it
    /// here keeps allocation out of the measured work, as in Go.
    pub struct RefLease<'a> {
        addr: &'a str,
        key: usize,
        pub conn: Conn,
    }

    impl RefPool {
        pub fn new(size: usize, ttl: Duration, max_idle: usize, max_streams: u32) -> Arc<Self> {
            Arc::new(Self {
                size,
                ttl,
                max_idle,
                max_streams,
                conns: Mutex::new(HashMap::new()),
            })
        }

        fn dial() -> Conn {
            DIALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let latency = DIAL_LATENCY_US.load(std::sync::atomic::Ordering::Relaxed);
            if latency > 0 {
                std::thread::sleep(Duration::from_micros(latency));
            }
            Conn(Arc::new(0))
        }

        /// `p.conns[addr]`: a lookup that allocates only for a new address.
        fn streams_pool<'m>(
            map: &'m mut HashMap<String, StreamsPool>,
            addr: &str,
        ) -> &'m mut StreamsPool {
            if !map.contains_key(addr) {
                map.insert(addr.to_owned(), StreamsPool::default());
            }
            map.get_mut(addr).expect("inserted")
        }

        pub fn get_conn<'a>(&self, addr: &'a str) -> RefLease<'a> {
            let now = Instant::now();
            {
                let mut map = self.conns.lock().unwrap();
                let sp = Self::streams_pool(&mut map, addr);
                let mut at = sp.head;
                while let Some(key) = at {
                    let (streams, created, next) = {
                        let c = &sp.conns[key];
                        (c.streams, c.created, c.next)
                    };
                    // (connectivity state checks: every connection is Ready.)
                    if now.duration_since(created) > self.ttl {
                        if streams == 0 {
                            sp.remove(key);
                            sp.conns.remove(key);
                            sp.idle -= 1;
                        }
                        at = next;
                        continue;
                    }
                    if streams >= self.max_streams {
                        sp.remove(key);
                        sp.add_front(key, Which::Busy);
                        at = next;
                        continue;
                    }
                    if streams == 0 {
                        sp.idle -= 1;
                    }
                    let c = &mut sp.conns[key];
                    c.streams += 1;
                    return RefLease {
                        addr,
                        key,
                        conn: c.conn.clone(),
                    };
                }
            }
            // Nothing usable: dial with the lock released.
            let conn = Self::dial();
            let mut map = self.conns.lock().unwrap();
            let sp = Self::streams_pool(&mut map, addr);
            let key = sp.conns.insert(PoolConn {
                conn: conn.clone(),
                streams: 1,
                created: Instant::now(),
                list: None,
                pre: None,
                next: None,
            });
            if sp.count < self.size {
                sp.add_front(key, Which::Head);
            }
            RefLease { addr, key, conn }
        }

        pub fn release(&self, lease: RefLease<'_>, failed: bool) {
            let mut map = self.conns.lock().unwrap();
            let sp = map.get_mut(lease.addr).expect("address");
            let key = lease.key;
            if sp.conns[key].list.is_none() {
                if sp.count < self.size {
                    sp.add_front(key, Which::Head);
                } else {
                    sp.conns.remove(key); // close
                    return;
                }
            }
            if sp.conns[key].list == Some(Which::Busy) {
                sp.remove(key);
                sp.add_front(key, Which::Head);
            }
            let c = &mut sp.conns[key];
            c.streams -= 1;
            if c.streams == 0 {
                let expired = Instant::now().duration_since(c.created) > self.ttl;
                if failed || sp.idle >= self.max_idle || expired {
                    sp.remove(key);
                    sp.conns.remove(key); // close, under the lock, as go-micro does
                    return;
                }
                sp.idle += 1;
            }
        }

        /// Puts `n` connections at the front of `addr`'s available list that
        /// are past the TTL and carry one stream each (their leases are
        /// returned, to be held), ahead of whatever is there.
        pub fn seed_expired_busy<'a>(&self, addr: &'a str, n: usize) -> Vec<RefLease<'a>> {
            let mut map = self.conns.lock().unwrap();
            let sp = Self::streams_pool(&mut map, addr);
            let created = Instant::now() - self.ttl * 2;
            (0..n)
                .map(|_| {
                    let conn = Self::dial();
                    let key = sp.conns.insert(PoolConn {
                        conn: conn.clone(),
                        streams: 1,
                        created,
                        list: None,
                        pre: None,
                        next: None,
                    });
                    sp.add_front(key, Which::Head);
                    RefLease { addr, key, conn }
                })
                .collect()
        }
    }
}

use reference::{RefLease, RefPool};

fn tidepool(settings: Settings) -> Pool<MemoryConnector> {
    Pool::new(
        "bench",
        settings,
        MemoryConnector::new(),
        PoolMetrics::unregistered(),
    )
    .unwrap()
}

/// One acquire+release on tidepool, synchronously when the pool has a free
/// stream (it always has once warmed up).
fn tidepool_op(rt: &Runtime, pool: &Pool<MemoryConnector>, addr: &str) {
    let lease = match pool.acquire(addr).now_or_never() {
        Some(lease) => lease,
        None => rt.block_on(pool.acquire(addr)),
    };
    drop(black_box(lease.unwrap()));
}

fn reference_op(pool: &RefPool, addr: &str) {
    let lease = pool.get_conn(addr);
    black_box(&lease.conn);
    pool.release(lease, false);
}

/// Runs `iters` operations split over `threads` OS threads that start
/// together (a barrier), and returns the wall time from the first thread's
/// start to the last thread's end; thread creation is not timed.
fn run_threads(threads: usize, iters: u64, op: impl Fn(usize, u64) + Sync) -> Duration {
    let per_thread = iters.div_ceil(threads as u64);
    let barrier = Barrier::new(threads);
    let spans: Vec<(StdInstant, StdInstant)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (op, barrier) = (&op, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    let start = StdInstant::now();
                    for i in 0..per_thread {
                        op(t, i);
                    }
                    (start, StdInstant::now())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let start = spans.iter().map(|s| s.0).min().unwrap();
    let end = spans.iter().map(|s| s.1).max().unwrap();
    end.duration_since(start)
}

fn throughput(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("pool");
    for threads in [1usize, 2] {
        for n in [1usize, 16, 256] {
            let case = format!("threads{threads}_addrs{n}");
            let addresses = addrs(n);

            let pool = tidepool(Settings::default());
            rt.block_on(async {
                for a in &addresses {
                    drop(pool.acquire(a).await.unwrap());
                }
            });
            group.bench_function(format!("tidepool/{case}"), |b| {
                b.iter_custom(|iters| {
                    let _guard = rt.enter();
                    run_threads(threads, iters, |t, i| {
                        let a = &addresses[(t * 7 + i as usize) % n];
                        tidepool_op(rt, &pool, a);
                    })
                })
            });

            let reference = RefPool::new(100, Duration::from_secs(60), 50, 20);
            for a in &addresses {
                reference_op(&reference, a);
            }
            group.bench_function(format!("reference/{case}"), |b| {
                b.iter_custom(|iters| {
                    run_threads(threads, iters, |t, i| {
                        let a = &addresses[(t * 7 + i as usize) % n];
                        reference_op(&reference, a);
                    })
                })
            });
        }
    }
    group.finish();
}

fn connections(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool");
    let addr = "10.3.0.1:50051";
    for n in [1usize, 10, 100, 1000] {
        // Live connections, each with one long stream.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let settings = Settings::default().size(n).max_idle(n).max_streams(2);
        let pool = tidepool(settings);
        let held: Vec<Lease<_>> = rt.block_on(async {
            let mut all = Vec::new();
            for _ in 0..2 * n {
                all.push(pool.acquire(addr).await.unwrap());
            }
            // Keep one of the two streams of each connection.
            all.into_iter().step_by(2).collect()
        });
        assert_eq!(pool.connections(addr).len(), n);
        group.bench_function(format!("tidepool/conns{n}"), |b| {
            let _guard = rt.enter();
            b.iter(|| tidepool_op(&rt, &pool, addr))
        });
        drop(held);

        let reference = RefPool::new(n, Duration::from_secs(3600), n, 2);
        let all: Vec<RefLease<'_>> = (0..2 * n).map(|_| reference.get_conn(addr)).collect();
        let mut held = Vec::new();
        for (i, lease) in all.into_iter().enumerate() {
            if i % 2 == 0 {
                held.push(lease);
            } else {
                reference.release(lease, false);
            }
        }
        group.bench_function(format!("reference/conns{n}"), |b| {
            b.iter(|| reference_op(&reference, addr))
        });
        drop(held);
    }

    for n in [1usize, 10, 100, 1000] {
        let ttl = Duration::from_secs(60);
        // Paused time, so the TTL can pass without waiting for it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let settings = Settings::default()
            .size(n + 1)
            .max_idle(n + 1)
            .max_streams(2)
            .ttl(ttl);
        let pool = tidepool(settings);
        let held: Vec<Lease<_>> = rt.block_on(async {
            let mut all = Vec::new();
            for _ in 0..2 * n {
                all.push(pool.acquire(addr).await.unwrap());
            }
            let held: Vec<_> = all.into_iter().step_by(2).collect();
            tokio::time::advance(ttl * 2).await;
            // The first acquire retires the expired connections and dials.
            drop(pool.acquire(addr).await.unwrap());
            held
        });
        group.bench_function(format!("tidepool/expired_busy{n}"), |b| {
            let _guard = rt.enter();
            b.iter(|| tidepool_op(&rt, &pool, addr))
        });
        drop(held);

        let reference = RefPool::new(n + 1, ttl, n + 1, 2);
        reference_op(&reference, addr); // the usable connection
        let held = reference.seed_expired_busy(addr, n);
        group.bench_function(format!("reference/expired_busy{n}"), |b| {
            b.iter(|| reference_op(&reference, addr))
        });
        drop(held);
    }
    group.finish();
}

/// Connections opened when `callers` callers miss on one cold address at
/// once and hold their streams until all have one: (tidepool, reference).
fn concurrent_misses(callers: usize, max_streams: u32, dial: Duration) -> (u64, u64) {
    let addr = "cold:1";
    // tidepool: one task per caller on a multi-thread runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let connector = MemoryConnector::new();
    connector.set_dial_delay(dial);
    let settings = Settings {
        size: 100,
        max_streams,
        ..Settings::default()
    };
    let pool = Pool::new(
        "misses",
        settings,
        connector.clone(),
        PoolMetrics::unregistered(),
    )
    .unwrap();
    rt.block_on(async {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(callers));
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let (pool, barrier) = (pool.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let lease = pool.acquire(addr).await.unwrap();
                    // Hold until every caller has a stream.
                    barrier.wait().await;
                    drop(lease);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    let ours = connector.attempts(addr);

    // The reference: one OS thread per caller, as goroutines would be.
    reference::DIAL_LATENCY_US.store(
        u64::try_from(dial.as_micros()).unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
    let before = reference::DIALS.load(std::sync::atomic::Ordering::Relaxed);
    let reference = RefPool::new(100, Duration::from_secs(60), 50, max_streams);
    let barrier = Barrier::new(callers);
    std::thread::scope(|scope| {
        for _ in 0..callers {
            let (reference, barrier) = (&reference, &barrier);
            scope.spawn(move || {
                barrier.wait();
                let lease = reference.get_conn(addr);
                barrier.wait();
                reference.release(lease, false);
            });
        }
    });
    reference::DIAL_LATENCY_US.store(0, std::sync::atomic::Ordering::Relaxed);
    let theirs = reference::DIALS.load(std::sync::atomic::Ordering::Relaxed) - before;
    (ours, theirs)
}

fn benches(c: &mut Criterion) {
    for _ in 0..3 {
        let (ours, theirs) = concurrent_misses(64, 20, Duration::from_millis(1));
        println!(
            "pool/concurrent_misses64: connections opened by 64 callers missing at once \
             (maxStreams 20, 1 ms dials; ceil(64/20) = 4): tidepool {ours}, reference {theirs}"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    throughput(c, &rt);
    connections(c);
}

criterion_group! {
    name = pool;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(pool);
