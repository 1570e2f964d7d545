//! The proxy over the real pool: connections per address stay within
//! ceil(N / maxStreams), TTL rotation brings new backends into play, a
//! killed backend fails only its own streams and leaks nothing, settings
//! change live without cutting streams, and 10,000 concurrent streams pass.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tidepool_agent::config::ProxyOptions;
use tidepool_testkit::*;
use tokio::time::timeout;
use tonic::Code;

#[tokio::test]
async fn concurrent_streams_use_at_most_ceil_n_over_max_streams_connections_per_address() {
    timeout(Duration::from_secs(30), async {
        let backends = [Backend::start("a").await, Backend::start("b").await];
        let app = agent().await;
        let max_streams = 5;
        app.runtime()
            .apply(vec![
                pool(
                    "echo",
                    &backends.iter().map(Backend::address).collect::<Vec<_>>(),
                )
                .size(100)
                .max_idle(100)
                .max_streams(max_streams)
                .build(),
            ])
            .unwrap();
        let client = Client::connect(app.proxy_addr(), "echo").await;
        let n = 60usize;
        let calls = (0..n).map(|i| {
            let mut client = client.clone();
            async move {
                let response = client
                    .unary(request(
                        Bytes::from(format!("{i}")),
                        &[("x-sleep-ms", "300")],
                    ))
                    .await
                    .unwrap();
                backend_of(response.metadata())
            }
        });
        let served = futures::future::join_all(calls).await;
        let mut per_backend: HashMap<String, usize> = HashMap::new();
        for name in served {
            *per_backend.entry(name).or_default() += 1;
        }
        let bound = n.div_ceil(max_streams as usize);
        for backend in &backends {
            let accepts = backend.accepts();
            assert!(
                accepts >= 1,
                "backend {} got no connection",
                backend.state.name
            );
            assert!(
                accepts <= bound,
                "backend {} got {accepts} connections > {bound}",
                backend.state.name
            );
        }
        // Load-aware spreading: both backends carry a real share.
        assert!(per_backend.values().all(|&c| c >= n / 4), "{per_backend:?}");
        assert!(
            eventually(Duration::from_secs(2), || backends
                .iter()
                .all(|b| occupancy(&app, &b.address()).0 == 0))
            .await
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_new_backend_behind_one_address_gets_streams_once_the_ttl_rotates_connections() {
    timeout(Duration::from_secs(30), async {
        let old = Backend::start("old").await;
        let new = Backend::start("new").await;
        // One address, like a Service's ClusterIP: balancing happens per
        // TCP connection.
        let balancer = Balancer::start(vec![old.addr]).await;
        let app = agent().await;
        app.runtime()
            .apply(vec![
                pool("echo", &[balancer.addr.to_string()])
                    .size(1)
                    .max_idle(1)
                    .ttl("1s")
                    .build(),
            ])
            .unwrap();
        let mut client = Client::connect(app.proxy_addr(), "echo").await;
        let call = |mut client: Client| async move {
            let response = client
                .unary(request(Bytes::from_static(b"x"), &[]))
                .await
                .unwrap();
            backend_of(response.metadata())
        };
        assert_eq!(call(client.clone()).await, "old");
        balancer.set_backends(vec![new.addr]);
        // Before the TTL the pooled connection still leads to the old one.
        assert_eq!(call(client.clone()).await, "old");
        let mut seen_new = false;
        for _ in 0..50 {
            if call(client.clone()).await == "new" {
                seen_new = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(seen_new, "no stream reached the new backend after the TTL");
        let _ = client
            .unary(request(Bytes::from_static(b"x"), &[]))
            .await
            .unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_killed_backend_fails_only_its_streams_and_occupancy_returns_to_zero() {
    timeout(Duration::from_secs(30), async {
        let doomed = Backend::start("doomed").await;
        let healthy = Backend::start("healthy").await;
        let app = agent().await;
        app.runtime()
            .apply(vec![
                pool("echo", &[doomed.address(), healthy.address()])
                    .max_streams(4)
                    .build(),
            ])
            .unwrap();
        let client = Client::connect(app.proxy_addr(), "echo").await;
        // 20 long streams, spread over both backends.
        let mut streams = Vec::new();
        for i in 0..20 {
            let mut client = client.clone();
            let response = client
                .hold(request(Bytes::from(format!("{i}")), &[]))
                .await
                .unwrap();
            let backend = backend_of(response.metadata());
            let mut stream = response.into_inner();
            stream.message().await.unwrap().unwrap();
            streams.push((backend, stream));
        }
        let on_doomed = streams.iter().filter(|(b, _)| b == "doomed").count();
        assert!(
            on_doomed > 0 && on_doomed < 20,
            "{on_doomed} of 20 on the doomed backend"
        );
        assert_eq!(
            occupancy(&app, &doomed.address()).0 + occupancy(&app, &healthy.address()).0,
            20
        );

        doomed.kill();
        let mut failed = 0;
        let mut alive = Vec::new();
        for (backend, mut stream) in streams {
            if backend == "doomed" {
                let status = timeout(Duration::from_secs(5), stream.message())
                    .await
                    .unwrap()
                    .unwrap_err();
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                failed += 1;
            } else {
                alive.push(stream);
            }
        }
        assert_eq!(failed, on_doomed);
        // The healthy backend's streams are untouched and new calls work.
        assert_eq!(healthy.state.holding.load(Ordering::SeqCst), alive.len());
        let mut fresh = client.clone();
        for _ in 0..5 {
            let response = fresh
                .unary(request(Bytes::from_static(b"x"), &[]))
                .await
                .unwrap();
            assert_eq!(backend_of(response.metadata()), "healthy");
        }
        drop(alive);
        // Nothing leaks: no stream anywhere, no connection to the dead one.
        let settled = eventually(Duration::from_secs(5), || {
            occupancy(&app, &doomed.address()) == (0, 0)
                && occupancy(&app, &healthy.address()).0 == 0
        })
        .await;
        assert!(settled, "{:#?}", app.runtime().report());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn settings_and_addresses_change_live_without_cutting_streams() {
    timeout(Duration::from_secs(30), async {
        let first = Backend::start("first").await;
        let second = Backend::start("second").await;
        let app = agent().await;
        app.runtime()
            .apply(vec![
                pool("echo", &[first.address()]).max_streams(10).build(),
            ])
            .unwrap();
        let mut client = Client::connect(app.proxy_addr(), "echo").await;
        let mut held = client
            .hold(request(Bytes::from_static(b"x"), &[]))
            .await
            .unwrap()
            .into_inner();
        held.message().await.unwrap().unwrap();

        // New settings, the old address replaced by a new one.
        app.runtime()
            .apply(vec![
                pool("echo", &[second.address()])
                    .max_streams(3)
                    .generation(2)
                    .build(),
            ])
            .unwrap();
        let report = &app.runtime().report()[0];
        assert_eq!((report.generation, report.settings.max_streams), (2, 3));
        // New streams go to the new address only.
        for _ in 0..5 {
            let response = client
                .unary(request(Bytes::from_static(b"y"), &[]))
                .await
                .unwrap();
            assert_eq!(backend_of(response.metadata()), "second");
        }
        // The old stream is still alive and still draining its connection.
        assert_eq!(first.state.holding.load(Ordering::SeqCst), 1);
        assert_eq!(first.state.cancelled.load(Ordering::SeqCst), 0);
        drop(held);
        assert!(
            eventually(Duration::from_secs(3), || occupancy(&app, &first.address())
                == (0, 0))
            .await
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_streams_complete() {
    timeout(Duration::from_secs(120), async {
        let gate = std::sync::Arc::new(Gate::default());
        let backends = [
            Backend::start_gated("a", gate.clone()).await,
            Backend::start_gated("b", gate.clone()).await,
        ];
        let app = agent_with(ProxyOptions {
            max_concurrent_streams: 10_000,
            ..ProxyOptions::default()
        })
        .await;
        app.runtime()
            .apply(vec![
                pool(
                    "echo",
                    &backends.iter().map(Backend::address).collect::<Vec<_>>(),
                )
                .size(100)
                .max_idle(100)
                .max_streams(100)
                .build(),
            ])
            .unwrap();
        let n = 10_000usize;
        let clients: Vec<Client> =
            futures::future::join_all((0..4).map(|_| Client::connect(app.proxy_addr(), "echo")))
                .await;
        let started = tokio::time::Instant::now();
        // Streams open as fast as they reach the backend, at most 500 on the
        // way at a time (a cold pool dials one connection per address at a
        // time and queues at most 1024 callers per address meanwhile; a
        // burst beyond that is refused), and every one waits at the gate.
        let mut calls = Vec::with_capacity(n);
        for i in 0..n {
            let mut client = clients[i % clients.len()].clone();
            calls.push(tokio::spawn(async move {
                client
                    .unary(request(Bytes::from(i.to_string()), &[("x-gate", "1")]))
                    .await
                    .map(|r| r.into_inner() == i.to_string())
            }));
            while i + 1 - gate.arrived.load(Ordering::SeqCst) > 500 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let all_in_flight = eventually(Duration::from_secs(60), || {
            gate.arrived.load(Ordering::SeqCst) == n
        })
        .await;
        let in_flight = gate.arrived.load(Ordering::SeqCst);
        let streams: usize = backends
            .iter()
            .map(|b| occupancy(&app, &b.address()).0)
            .sum();
        if !all_in_flight {
            eprintln!("{:#?}", app.runtime().report());
            eprintln!(
                "accepts {:?}",
                backends.iter().map(Backend::accepts).collect::<Vec<_>>()
            );
        }
        gate.open();
        let results = futures::future::join_all(calls).await;
        let mut errors: HashMap<String, usize> = HashMap::new();
        for result in &results {
            match result {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => *errors.entry("wrong answer".into()).or_default() += 1,
                Ok(Err(status)) => *errors.entry(format!("{:?}", status.code())).or_default() += 1,
                Err(join) => *errors.entry(join.to_string()).or_default() += 1,
            }
        }
        assert!(errors.is_empty(), "{errors:#?}");
        assert!(
            all_in_flight,
            "only {in_flight} of {n} streams were in flight together"
        );
        assert_eq!(streams, n, "the pools did not hold {n} streams at once");
        // Pooled: ceil(N / maxStreams) connections per address at most.
        for backend in &backends {
            assert!(
                backend.accepts() <= n.div_ceil(100),
                "{}",
                backend.accepts()
            );
        }
        assert!(
            eventually(Duration::from_secs(5), || backends
                .iter()
                .all(|b| occupancy(&app, &b.address()).0 == 0))
            .await
        );
        eprintln!("{n} concurrent streams in {:?}", started.elapsed());
    })
    .await
    .unwrap();
}

/// Unary calls from `callers` closed-loop callers for `duration`, counted
/// by the backend that answered.
async fn unary_split(
    client: &Client,
    callers: usize,
    duration: Duration,
) -> HashMap<String, usize> {
    let deadline = tokio::time::Instant::now() + duration;
    let tasks = (0..callers).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut seen: HashMap<String, usize> = HashMap::new();
            while tokio::time::Instant::now() < deadline {
                let response = client
                    .unary(request(Bytes::from_static(b"u"), &[]))
                    .await
                    .expect("unary call through the agent");
                *seen.entry(backend_of(response.metadata())).or_default() += 1;
            }
            seen
        })
    });
    let mut total: HashMap<String, usize> = HashMap::new();
    for seen in futures::future::join_all(tasks).await {
        for (backend, n) in seen.unwrap() {
            *total.entry(backend).or_default() += n;
        }
    }
    total
}

/// Long-lived, answered streams must not skew unary calls: power of two
/// choices by active streams sent 302 of 323 unary calls to the backend
/// without the watch streams (`make demo`, before). By peak-EWMA cost a
/// stream counts only until its response headers arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_streams_do_not_skew_unary_calls_across_equal_backends() {
    timeout(Duration::from_secs(30), async {
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        let app = agent().await;
        // The watch streams all land on `a`: it is the pool's only address
        // while they open.
        app.runtime()
            .apply(vec![
                pool("echo", &[a.address()])
                    .size(10)
                    .max_streams(100)
                    .build(),
            ])
            .unwrap();
        let client = Client::connect(app.proxy_addr(), "echo").await;
        let mut watches = Vec::new();
        for _ in 0..6 {
            let mut c = client.clone();
            let mut stream = c
                .hold(request(Bytes::from_static(b"watch"), &[]))
                .await
                .unwrap()
                .into_inner();
            stream.message().await.unwrap().unwrap();
            watches.push(stream);
        }
        assert_eq!(a.state.holding.load(Ordering::SeqCst), 6);
        app.runtime()
            .apply(vec![
                pool("echo", &[a.address(), b.address()])
                    .size(10)
                    .max_streams(100)
                    .generation(2)
                    .build(),
            ])
            .unwrap();
        let split = unary_split(&client, 4, Duration::from_secs(2)).await;
        let (on_a, on_b) = (
            split.get("a").copied().unwrap_or(0),
            split.get("b").copied().unwrap_or(0),
        );
        eprintln!("unary calls with 6 watch streams on a: a {on_a}, b {on_b}");
        let (max, min) = (on_a.max(on_b), on_a.min(on_b));
        assert!(
            min > 0 && max as f64 <= 1.3 * min as f64,
            "unary calls split {on_a} (a, holding 6 watch streams) to {on_b} (b)"
        );
        assert_eq!(
            a.state.holding.load(Ordering::SeqCst),
            6,
            "a watch stream was cut"
        );
        drop(watches);
    })
    .await
    .unwrap();
}

/// A backend that answers 5× slower gets fewer calls in proportion (about
/// a fifth; the agent's own time per call, equal for both, pulls the ratio
/// below 5): neither the same share nor none at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slower_backend_gets_proportionally_fewer_calls() {
    timeout(Duration::from_secs(30), async {
        let (fast, slow) = (Backend::start("fast").await, Backend::start("slow").await);
        fast.state.delay_ms.store(40, Ordering::Relaxed);
        slow.state.delay_ms.store(200, Ordering::Relaxed);
        let app = agent().await;
        app.runtime()
            .apply(vec![
                pool("echo", &[fast.address(), slow.address()])
                    .size(10)
                    .max_streams(100)
                    .build(),
            ])
            .unwrap();
        let client = Client::connect(app.proxy_addr(), "echo").await;
        let split = unary_split(&client, 8, Duration::from_secs(3)).await;
        let (on_fast, on_slow) = (
            split.get("fast").copied().unwrap_or(0),
            split.get("slow").copied().unwrap_or(0),
        );
        eprintln!("unary calls, 40 ms against 200 ms backends: fast {on_fast}, slow {on_slow}");
        assert!(
            on_slow > 0 && on_slow * 3 <= on_fast,
            "the 5x slower backend got {on_slow} calls to the fast one's {on_fast}"
        );
    })
    .await
    .unwrap();
}

/// A configuration handed to the runtime is shared, not deep-copied: the
/// control client keeps the same `Arc`s as the base of its next delta.
#[tokio::test]
async fn applied_pools_are_shared_with_the_caller_not_copied() {
    let app = agent().await;
    let config = std::sync::Arc::new(pool("echo", &["127.0.0.1:1".to_owned()]).build());
    app.runtime().apply(vec![config.clone()]).unwrap();
    let table = app.runtime().table();
    assert!(std::sync::Arc::ptr_eq(
        &table.pools["default/echo"].config,
        &config
    ));
}
