//! Concurrency stress: many tasks over many addresses on a multi-threaded
//! runtime, with random cancellations, outcomes, GOAWAYs and a short real
//! TTL. At the end no stream is left and no connection leaked.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidepool_agent::pool::memory::MemoryConnector;
use tidepool_agent::pool::{Outcome, Pool, PoolMetrics, Settings, WhenFull};

const ADDRESSES: usize = 16;
const TASKS: usize = 64;
const ROUNDS: usize = 60;

fn addr(i: usize) -> String {
    format!("10.1.0.{i}:50051")
}

async fn hammer(when_full: WhenFull) {
    let connector = MemoryConnector::new();
    connector.set_dial_delay(Duration::from_micros(200));
    let settings = Settings::default()
        .size(3)
        .max_idle(2)
        .max_streams(2)
        .ttl(Duration::from_millis(40))
        .when_full(when_full)
        .acquire_timeout(Duration::from_millis(5));
    let pool = Pool::new(
        "stress",
        settings,
        connector.clone(),
        PoolMetrics::unregistered(),
    )
    .unwrap();

    // GOAWAY on random connections while the tasks run.
    let chaos = tokio::spawn({
        let connector = connector.clone();
        async move {
            let mut rng = StdRng::seed_from_u64(7);
            loop {
                tokio::time::sleep(Duration::from_millis(3)).await;
                let open = connector.open_ids();
                if !open.is_empty() {
                    connector.goaway(open[rng.random_range(0..open.len())]);
                }
            }
        }
    });

    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(t as u64);
                let mut granted = 0usize;
                for _ in 0..ROUNDS {
                    let a = addr(rng.random_range(0..ADDRESSES));
                    // Sometimes give up on the acquire itself.
                    let patience = Duration::from_micros(rng.random_range(50..3000));
                    let Ok(Ok(lease)) = tokio::time::timeout(patience, pool.acquire(&a)).await
                    else {
                        continue;
                    };
                    granted += 1;
                    let hold = Duration::from_micros(rng.random_range(0..1500));
                    match rng.random_range(0..4) {
                        // Cancelled while holding the stream: Drop releases.
                        0 => {
                            let held = async move {
                                let _lease = lease;
                                tokio::time::sleep(hold * 4).await;
                            };
                            let _ = tokio::time::timeout(hold, held).await;
                        }
                        1 => {
                            tokio::time::sleep(hold).await;
                            lease.finish(Outcome::TransportError);
                        }
                        2 => {
                            tokio::time::sleep(hold).await;
                            lease.finish(Outcome::ApplicationError);
                        }
                        _ => {
                            tokio::task::yield_now().await;
                            lease.finish(Outcome::Ok);
                        }
                    }
                }
                granted
            })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        granted += task.await.unwrap();
    }
    chaos.abort();
    assert!(
        granted > TASKS * ROUNDS / 10,
        "too few streams granted: {granted}"
    );

    // Let connection watchers finish the GOAWAYs still queued.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let snapshot = pool.snapshot();
    assert_eq!(snapshot.len(), ADDRESSES);
    let mut held_open = 0;
    for o in &snapshot {
        assert_eq!(o.streams, 0, "{o:?}");
        assert_eq!(o.waiters, 0, "{o:?}");
        assert_eq!((o.draining, o.overflow), (0, 0), "{o:?}");
        assert!(o.connections <= 3 && o.idle <= 2, "{o:?}");
        held_open += o.connections;
    }
    assert_eq!(
        connector.open_connections(),
        held_open,
        "open connections the pool does not hold"
    );
    pool.retain_addresses(&[]);
    assert_eq!(connector.open_connections(), 0, "connections leaked");
    if when_full == WhenFull::Overflow {
        assert!(
            snapshot.iter().map(|o| o.overflow_total).sum::<u64>() > 0,
            "never overflowed"
        );
    }
    assert!(snapshot.iter().map(|o| o.evictions.total()).sum::<u64>() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_overflow() {
    hammer(WhenFull::Overflow).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_wait() {
    hammer(WhenFull::Wait).await;
}
