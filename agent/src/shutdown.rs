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

/// The agent's stop signal and the connections still draining.
///
/// Clones share one token and one tracker.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    token: CancellationToken,
    tracker: TaskTracker,
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

    /// Starts the drain and waits until every tracked connection has ended or
    /// `timeout` has passed. Returns how many connections were still open at
    /// the timeout (0 when all finished).
    pub async fn run(&self, timeout: Duration) -> usize {
        self.token.cancel();
        self.tracker.close();
        match tokio::time::timeout(timeout, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_elapsed) => self.tracker.len(),
        }
    }
}

/// Waits for SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok("Ctrl-C")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(started.elapsed(), Duration::from_secs(5));
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
