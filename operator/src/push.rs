//! Pushing snapshots: after the desired pools change, wait until they have
//! been quiet for the debounce (about 100 ms, so a burst of endpoint
//! changes is one push), but never more than [`MAX_DELAY`] after the first
//! change, then build one snapshot and queue it for every agent that does
//! not run it. Sessions send it, at most `push_concurrency` at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agents::Agents;
use crate::desired::Desired;

/// The longest a change waits for quiet before it is pushed anyway.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// Runs the pusher until `stop`. Nothing is pushed before `initialized`.
pub async fn run(
    desired: Arc<Desired>,
    agents: Arc<Agents>,
    mut initialized: watch::Receiver<bool>,
    debounce: Duration,
    stop: CancellationToken,
) {
    let mut revisions = desired.subscribe();
    tokio::select! {
        _ = stop.cancelled() => return,
        r = initialized.wait_for(|i| *i) => if r.is_err() { return },
    }
    loop {
        revisions.mark_unchanged();
        let snapshot = desired.snapshot();
        let queued = agents.offer(&snapshot);
        tracing::debug!(version = %snapshot.version, pools = snapshot.pools.len(), agents = queued, "snapshot queued");
        if !settle(&mut revisions, debounce, &stop).await {
            return;
        }
    }
}

/// Waits for the next change on `revisions`, then until they have been
/// quiet for `debounce`, but no longer than [`MAX_DELAY`] after that
/// change. `false` when `stop` fires or the sender is gone. The pod maps
/// ([`crate::clients`]) are debounced the same way.
pub async fn settle<T>(
    revisions: &mut watch::Receiver<T>,
    debounce: Duration,
    stop: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = stop.cancelled() => return false,
        r = revisions.changed() => if r.is_err() { return false },
    }
    let deadline = Instant::now() + MAX_DELAY;
    loop {
        revisions.mark_unchanged();
        let quiet = tokio::time::sleep_until((Instant::now() + debounce).min(deadline));
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = quiet => return true,
            r = revisions.changed() => if r.is_err() { return false },
        }
        if Instant::now() >= deadline {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::Entry;
    use tidepool_crds::control::pb;

    fn entry(generation: i64) -> Entry {
        Entry {
            pool: pb::Pool {
                namespace: "ns".into(),
                name: "p".into(),
                generation,
                ..Default::default()
            },
            resolution: Ok(()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_one_push_after_the_debounce() {
        let desired = Arc::new(Desired::default());
        let agents = Arc::new(Agents::default());
        let (init_tx, init_rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let mut reg = agents.register("n1", "pod", "", false, None);
        tokio::spawn(run(
            desired.clone(),
            agents.clone(),
            init_rx,
            Duration::from_millis(100),
            stop.clone(),
        ));

        desired.set("ns/p".into(), entry(1));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !reg.outbox.has_changed().unwrap(),
            "nothing is pushed before initialization"
        );

        init_tx.send_replace(true);
        reg.outbox.changed().await.unwrap();
        let first = reg.outbox.borrow_and_update().clone().unwrap();
        assert!(first.runs("ns/p", "", 1));

        // Five changes 50 ms apart: quiet only after the last.
        let start = Instant::now();
        for g in 2..=6 {
            desired.set("ns/p".into(), entry(g));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        reg.outbox.changed().await.unwrap();
        let pushed_after = start.elapsed();
        let second = reg.outbox.borrow_and_update().clone().unwrap();
        assert!(second.runs("ns/p", "", 6), "only the last state is pushed");
        assert!(
            pushed_after >= Duration::from_millis(300) && pushed_after < Duration::from_millis(400),
            "{pushed_after:?}"
        );

        // A change that never quiets down is pushed within MAX_DELAY.
        let start = Instant::now();
        let churn = {
            let desired = desired.clone();
            tokio::spawn(async move {
                for g in 7..100 {
                    desired.set("ns/p".into(), entry(g));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        reg.outbox.changed().await.unwrap();
        assert!(
            start.elapsed() <= MAX_DELAY + Duration::from_millis(60),
            "{:?}",
            start.elapsed()
        );
        churn.abort();
        stop.cancel();
    }
}
