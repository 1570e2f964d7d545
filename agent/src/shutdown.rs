//! Graceful shutdown: stop accepting, let open streams finish (bounded),
//! exit.
//!
//! Every listener watches a [`Drain`]'s token and stops accepting when it
//! is cancelled; every accepted connection is a task on the drain's
//! tracker that, on cancellation, sends GOAWAY and serves its open streams
//! to their end. [`Drain::run`] cancels and waits for the tracker, at most
//! the drain timeout.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long streams cut at the drain deadline have to send their trailers
/// and let their connections close.
pub const CUT_GRACE: Duration = Duration::from_millis(500);

/// The agent's stop signal and the connections still draining.
///
/// Clones share one token and one tracker.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    token: CancellationToken,
    tracker: TaskTracker,
    leaving: CancellationToken,
    cut: CancellationToken,
}

impl Drain {
    /// A drain that has not started.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled when the drain starts. Child tokens of it stop a part of the
    /// agent alone (a removed pool's listener).
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Tasks the drain waits for: every proxied connection.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Cancelled when the drain timeout passes: every stream still open
    /// ends then with UNAVAILABLE trailers of the agent's own (a status
    /// gRPC clients retry), rather than with its connection torn down.
    pub fn cut(&self) -> &CancellationToken {
        &self.cut
    }

    /// Whether the agent is leaving: not ready any more, but still
    /// accepting and serving until the drain starts (see [`Drain::leave`]).
    pub fn is_leaving(&self) -> bool {
        self.leaving.is_cancelled()
    }

    /// Turns the agent not ready and keeps serving for `delay` before the
    /// drain may start: the time for endpoint lists (a node-local Service's
    /// EndpointSlice, kube-proxy's rules) to stop sending new connections
    /// here. A connection made meanwhile is served, then drained like the
    /// rest; without the delay it would be refused and fail its client.
    pub async fn leave(&self, delay: Duration) {
        self.leaving.cancel();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// Starts the drain and waits until every tracked connection has ended or
    /// `timeout` has passed. Returns how many connections were still open at
    /// the timeout (0 when all finished).
    ///
    /// At the timeout the streams still open are cut ([`Drain::cut`]) and
    /// get [`CUT_GRACE`] to send their trailers and close.
    pub async fn run(&self, timeout: Duration) -> usize {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.tracker.len();
        self.cut.cancel();
        let _ = tokio::time::timeout(CUT_GRACE, self.tracker.wait()).await;
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leaving_is_not_draining_until_the_delay_ends() {
        let drain = Drain::new();
        let d = drain.clone();
        let leave = tokio::spawn(async move { d.leave(Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        assert!(drain.is_leaving());
        assert!(!drain.is_draining(), "listeners still accept while leaving");
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!leave.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(leave.is_finished());
        assert_eq!(drain.run(Duration::from_secs(1)).await, 0);
        assert!(drain.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tracked_tasks_but_not_forever() {
        let drain = Drain::new();
        let token = drain.token().clone();
        // One task ends soon after the drain starts, one never does.
        drain.tracker().spawn(async move {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        drain.tracker().spawn(std::future::pending::<()>());
        let started = tokio::time::Instant::now();
        let left = drain.run(Duration::from_secs(5)).await;
        assert_eq!(left, 1);
        // The timeout, then the grace for cut streams to send their trailers.
        assert_eq!(started.elapsed(), Duration::from_secs(5) + CUT_GRACE);
        assert!(drain.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn drain_returns_as_soon_as_connections_end() {
        let drain = Drain::new();
        let token = drain.token().clone();
        drain
            .tracker()
            .spawn(async move { token.cancelled().await });
        let started = tokio::time::Instant::now();
        assert_eq!(drain.run(Duration::from_secs(30)).await, 0);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
