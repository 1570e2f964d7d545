//! What the balancer knows about one address, kept without a lock: the
//! streams still waiting for their response headers, and whether dials to
//! it are in backoff.
//!
//! The cost of an address is the number of its streams that have been sent
//! and not yet answered with response headers. A long-lived watch stream
//! counts only until its headers arrive, so it no longer weighs like an
//! in-flight unary call; a backend that answers slowly holds more requests
//! unanswered (Little's law), so it gets fewer in proportion to its speed.
//!
//! Peak-EWMA latency (linkerd2-proxy's measure: the cost is a latency
//! estimate times the pending count plus one) was tried first and measured
//! worse here: with two equal backends
//! on a loaded machine, one latency spike sidelined a backend for seconds
//! and unary calls split up to 2.3:1; counting unanswered streams split
//! them evenly and still gave a 5× slower backend about a fifth of the
//! calls (`agent/tests/proxy_pool.rs`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::time::Instant;

/// Nanoseconds since a process-wide origin; one clock read (tokio's clock,
/// so paused test time applies).
pub fn now_nanos() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let elapsed = Instant::now().saturating_duration_since(origin);
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

/// One address's load. See the module documentation.
#[derive(Debug, Default)]
pub struct AddressLoad {
    pending: AtomicUsize,
    /// Until when dials are in backoff ([`now_nanos`]); 0 for none.
    backoff_until: AtomicU64,
}

impl AddressLoad {
    /// The cost of sending one more stream here at `now`, or `None` while
    /// dials are in backoff.
    pub fn cost(&self, now: u64) -> Option<usize> {
        if self.in_backoff(now) {
            return None;
        }
        Some(self.pending.load(Ordering::Relaxed))
    }

    /// Whether dials are in backoff at `now`.
    pub fn in_backoff(&self, now: u64) -> bool {
        now < self.backoff_until.load(Ordering::Relaxed)
    }

    /// A stream was sent; it counts until [`Pending::answered`] or until the
    /// guard drops.
    pub fn start(&self) -> Pending<'_> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        Pending {
            load: self,
            done: false,
        }
    }

    /// Streams waiting for their response headers.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub(crate) fn set_backoff(&self, until: Instant) {
        let left = until.saturating_duration_since(Instant::now());
        let until = now_nanos().saturating_add(u64::try_from(left.as_nanos()).unwrap_or(u64::MAX));
        self.backoff_until.store(until, Ordering::Relaxed);
    }

    pub(crate) fn clear_backoff(&self) {
        self.backoff_until.store(0, Ordering::Relaxed);
    }
}

/// A stream waiting for its response headers. Dropping it unanswered (a
/// failure, a cancellation) stops counting it too.
#[derive(Debug)]
pub struct Pending<'a> {
    load: &'a AddressLoad,
    done: bool,
}

impl Pending<'_> {
    /// The response headers arrived.
    pub fn answered(&mut self) {
        if !std::mem::replace(&mut self.done, true) {
            self.load.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.answered();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_stream_counts_until_answered_or_dropped_and_only_once() {
        let load = AddressLoad::default();
        let mut a = load.start();
        let b = load.start();
        assert_eq!(load.cost(now_nanos()), Some(2));
        a.answered();
        a.answered();
        assert_eq!(load.pending(), 1);
        drop(b);
        drop(a);
        assert_eq!(load.pending(), 0);
    }

    #[test]
    fn an_address_in_backoff_has_no_cost_until_it_ends() {
        let load = AddressLoad::default();
        load.set_backoff(Instant::now() + Duration::from_secs(60));
        assert_eq!(load.cost(now_nanos()), None);
        assert!(load.in_backoff(now_nanos()));
        load.clear_backoff();
        assert_eq!(load.cost(now_nanos()), Some(0));
    }
}
