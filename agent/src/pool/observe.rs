//! What an address went through over a sliding window, for the operator's
//! tuning advice (`AddressReport.observed` on the control stream).
//!
//! The data path keeps only cheap counts under the address lock it holds
//! anyway: the most streams and the most connections in use since the last
//! sample (an integer compare and store where those counts grow), and
//! cumulative counters of waits, refusals, dials and closes. Once a second
//! the pool's sampler reads and resets the peaks (to the current values,
//! not to 0) and takes the counters (`Sample`); each address's `Window`
//! files the sample in one of [`BUCKETS`] buckets of `window / BUCKETS`
//! each and drops the buckets older than the window.
//!
//! An [`Observation`] covers *whole* buckets only: the bucket being filled
//! joins it when it is complete. So every field of it describes the same
//! `window` of time, and it changes at most once per bucket (the agent sends
//! a report when it changes). It is computed once per bucket by the sampler,
//! not when a report or a scrape reads it.
//!
//! Time is the pool's: samples are filed by their offset from when the
//! pool's sampler started, so every address of a pool has the same bucket
//! boundaries, and an address first used late counts as idle before that
//! (it was: the pool had no stream on it).

use std::collections::VecDeque;
use std::time::Duration;

use super::occupancy::{EvictionReason, Evictions};

/// Buckets in a window.
pub const BUCKETS: u32 = 10;

/// How long an observation window is (`--observe-window`): between
/// [`ObserveWindow::MIN`] and [`ObserveWindow::MAX`], 10 minutes by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObserveWindow(Duration);

/// A window length out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("observation window {0:?} is out of range: it must be between 10s and 24h")]
pub struct ObserveWindowError(pub Duration);

impl ObserveWindow {
    /// The shortest window: ten buckets of one second (a sample each).
    pub const MIN: Duration = Duration::from_secs(10);
    /// The longest window. Each address keeps one stream count per second
    /// of the bucket being filled, and the distinct counts of each complete
    /// one, so memory grows with the window.
    pub const MAX: Duration = Duration::from_secs(24 * 3600);
    /// The default: 10 minutes.
    pub const DEFAULT: Self = Self(Duration::from_secs(600));

    /// A window of `length`; refused outside [`Self::MIN`]..=[`Self::MAX`].
    pub fn new(length: Duration) -> Result<Self, ObserveWindowError> {
        if (Self::MIN..=Self::MAX).contains(&length) {
            Ok(Self(length))
        } else {
            Err(ObserveWindowError(length))
        }
    }

    /// The window's length.
    pub fn length(self) -> Duration {
        self.0
    }

    /// One bucket's length: a tenth of the window.
    pub fn bucket(self) -> Duration {
        self.0 / BUCKETS
    }

    /// The bucket a sample taken `elapsed` after the pool's sampler started
    /// falls in.
    fn index(self, elapsed: Duration) -> u64 {
        let index = elapsed.as_nanos() / self.bucket().as_nanos().max(1);
        u64::try_from(index).unwrap_or(u64::MAX)
    }

    /// How much of the window the sampler has covered `elapsed` after it
    /// started: whole buckets, at most the window.
    pub fn coverage(self, elapsed: Duration) -> Duration {
        self.covered(self.index(elapsed))
    }

    /// The time covered once bucket `index` has begun: the whole buckets
    /// before it, at most the window.
    fn covered(self, index: u64) -> Duration {
        let whole = index.min(u64::from(BUCKETS));
        // At most BUCKETS, so it fits.
        self.bucket() * u32::try_from(whole).unwrap_or(BUCKETS)
    }
}

impl Default for ObserveWindow {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Connections taken out of service, by the classes the operator's advice
/// uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Closes {
    /// Past their TTL ([`EvictionReason::Ttl`]).
    pub ttl: u64,
    /// Idle beyond maxIdle ([`EvictionReason::Idle`]).
    pub idle: u64,
    /// The server sent GOAWAY ([`EvictionReason::GoAway`]).
    pub goaway: u64,
    /// A transport or protocol error, or an unanswered keepalive
    /// ([`EvictionReason::Transport`], [`EvictionReason::Protocol`],
    /// [`EvictionReason::Keepalive`]).
    pub failure: u64,
    /// Anything else: the connection ended on its own, `size` was lowered,
    /// the address was removed ([`EvictionReason::Closed`],
    /// [`EvictionReason::Resize`], [`EvictionReason::Removed`]).
    pub other: u64,
}

impl Closes {
    fn count(&mut self, reason: EvictionReason, n: u64) {
        let class = match reason {
            EvictionReason::Ttl => &mut self.ttl,
            EvictionReason::Idle => &mut self.idle,
            EvictionReason::GoAway => &mut self.goaway,
            EvictionReason::Transport | EvictionReason::Protocol | EvictionReason::Keepalive => {
                &mut self.failure
            }
            EvictionReason::Closed | EvictionReason::Resize | EvictionReason::Removed => {
                &mut self.other
            }
        };
        *class += n;
    }
}

/// What one address went through over the window's whole buckets. All zero
/// (with `window` the time watched) for an address that had no traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observation {
    /// The time covered, in whole buckets: grows by a bucket at a time up to
    /// the window's length. Zero until the first bucket is complete.
    pub window: Duration,
    /// The most streams open at once.
    pub peak_streams: usize,
    /// The nearest-rank 95th percentile of the per-second peaks of open
    /// streams.
    pub p95_streams: usize,
    /// The most connections carrying at least one stream at once (pooled,
    /// overflow and draining alike).
    pub peak_connections: usize,
    /// Callers that found no free stream and queued, for a stream or for a
    /// dial in flight (a caller sent to start over and queueing again
    /// counts again).
    pub waits: u64,
    /// The time those callers spent queued, summed.
    pub wait_time: Duration,
    /// Callers refused with "pool full" ([`Error::Full`](super::Error::Full)):
    /// they waited `acquireTimeout` in vain, or found the queue full.
    pub wait_timeouts: u64,
    /// Overflow (unpooled) connections dialed.
    pub overflow_dials: u64,
    /// Successful dials, overflow included.
    pub dials: u64,
    /// Failed dials.
    pub dial_failures: u64,
    /// Connections taken out of service, by class.
    pub closes: Closes,
    /// The SETTINGS_MAX_CONCURRENT_STREAMS the server last advertised to
    /// the address's connections, as of the window's end; `None` when it
    /// advertised none (or withdrew its limit).
    pub server_max_streams: Option<u32>,
}

/// An address's cumulative counters, since it was first used: the sampler
/// takes their differences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) waits: u64,
    pub(crate) wait_time: Duration,
    pub(crate) wait_timeouts: u64,
    pub(crate) overflow_dials: u64,
    pub(crate) dials: u64,
    pub(crate) dial_failures: u64,
    pub(crate) evictions: Evictions,
}

impl Counters {
    /// What was counted since `earlier`.
    fn since(&self, earlier: &Self) -> Self {
        let mut evictions = Evictions::default();
        for reason in EvictionReason::ALL {
            let n = self
                .evictions
                .get(reason)
                .saturating_sub(earlier.evictions.get(reason));
            evictions.add(reason, n);
        }
        Self {
            waits: self.waits.saturating_sub(earlier.waits),
            wait_time: self.wait_time.saturating_sub(earlier.wait_time),
            wait_timeouts: self.wait_timeouts.saturating_sub(earlier.wait_timeouts),
            overflow_dials: self.overflow_dials.saturating_sub(earlier.overflow_dials),
            dials: self.dials.saturating_sub(earlier.dials),
            dial_failures: self.dial_failures.saturating_sub(earlier.dial_failures),
            evictions,
        }
    }

    fn add(&mut self, other: &Self) {
        self.waits += other.waits;
        self.wait_time = self.wait_time.saturating_add(other.wait_time);
        self.wait_timeouts += other.wait_timeouts;
        self.overflow_dials += other.overflow_dials;
        self.dials += other.dials;
        self.dial_failures += other.dial_failures;
        for reason in EvictionReason::ALL {
            self.evictions.add(reason, other.evictions.get(reason));
        }
    }
}

/// One second of an address, read (and its peaks reset) under its lock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sample {
    /// The most streams open at once since the last sample.
    pub(crate) peak_streams: usize,
    /// The most connections with a stream at once since the last sample.
    pub(crate) peak_in_use: usize,
    /// The server's latest advertised stream limit.
    pub(crate) server_max: Option<u32>,
    /// The cumulative counters now.
    pub(crate) counters: Counters,
}

/// A bucket being filled.
#[derive(Debug)]
struct Filling {
    index: u64,
    /// Each sample's peak of open streams (saturated at `u32::MAX`).
    peaks: Vec<u32>,
    peak_in_use: usize,
    counters: Counters,
}

/// A complete bucket.
#[derive(Debug)]
struct Bucket {
    index: u64,
    /// The per-second peaks of open streams as (value, how many seconds),
    /// sorted by value: steady traffic repeats values, so this is usually
    /// far shorter than one entry per second.
    peaks: Vec<(u32, u32)>,
    peak_in_use: usize,
    counters: Counters,
}

impl From<Filling> for Bucket {
    fn from(mut filling: Filling) -> Self {
        filling.peaks.sort_unstable();
        let mut peaks: Vec<(u32, u32)> = Vec::new();
        for value in filling.peaks {
            match peaks.last_mut() {
                Some((last, n)) if *last == value => *n += 1,
                _ => peaks.push((value, 1)),
            }
        }
        Self {
            index: filling.index,
            peaks,
            peak_in_use: filling.peak_in_use,
            counters: filling.counters,
        }
    }
}

/// One address's sliding window. Written by the pool's sampler once a
/// second, read by reports and scrapes; behind a lock of its own, never
/// taken together with the address's state lock.
#[derive(Debug)]
pub(crate) struct Window {
    length: ObserveWindow,
    /// The counters at the last sample.
    last: Counters,
    filling: Option<Filling>,
    /// Complete buckets, oldest first, at most [`BUCKETS`], none older
    /// than the window.
    buckets: VecDeque<Bucket>,
    server_max: Option<u32>,
    /// Recomputed when a bucket completes.
    observed: Observation,
}

impl Window {
    /// A window for an address made `elapsed` after the pool's sampler
    /// started (`None`: it has not started): the time before it counts as
    /// watched and idle.
    pub(crate) fn new(length: ObserveWindow, elapsed: Option<Duration>) -> Self {
        Self {
            length,
            last: Counters::default(),
            filling: None,
            buckets: VecDeque::new(),
            server_max: None,
            observed: Observation {
                window: elapsed.map_or(Duration::ZERO, |e| length.coverage(e)),
                ..Observation::default()
            },
        }
    }

    /// The observation over the window's whole buckets.
    pub(crate) fn observed(&self) -> Observation {
        self.observed
    }

    /// Files a sample taken `elapsed` after the pool's sampler started.
    /// Samples come in time order; one older than the bucket being filled
    /// (it cannot happen with one sampler) is filed in that bucket.
    pub(crate) fn record(&mut self, elapsed: Duration, sample: Sample) {
        let index = self.length.index(elapsed);
        let deltas = sample.counters.since(&self.last);
        self.last = sample.counters;
        self.server_max = sample.server_max;
        let filling = match self.filling.take() {
            Some(filling) if filling.index >= index => filling,
            Some(done) => {
                self.complete(done, index);
                self.fresh(index)
            }
            None => {
                // The first sample: the buckets before it were idle.
                self.observed.window = self.length.coverage(elapsed);
                self.fresh(index)
            }
        };
        let filling = self.filling.insert(filling);
        filling
            .peaks
            .push(u32::try_from(sample.peak_streams).unwrap_or(u32::MAX));
        filling.peak_in_use = filling.peak_in_use.max(sample.peak_in_use);
        filling.counters.add(&deltas);
    }

    fn fresh(&self, index: u64) -> Filling {
        let seconds = self.length.bucket().as_secs();
        Filling {
            index,
            peaks: Vec::with_capacity(usize::try_from(seconds).unwrap_or(0)),
            peak_in_use: 0,
            counters: Counters::default(),
        }
    }

    /// Adds bucket `done` now that bucket `now` has begun, drops the
    /// buckets that left the window and recomputes the observation.
    fn complete(&mut self, done: Filling, now: u64) {
        self.buckets.push_back(done.into());
        // The window is buckets `now - BUCKETS ..= now - 1`.
        let oldest = now.saturating_sub(u64::from(BUCKETS));
        while self.buckets.front().is_some_and(|b| b.index < oldest) {
            self.buckets.pop_front();
        }
        let mut observed = Observation {
            window: self.length.covered(now),
            server_max_streams: self.server_max,
            ..Observation::default()
        };
        let mut counters = Counters::default();
        let mut peaks: Vec<(u32, u32)> = Vec::new();
        for bucket in &self.buckets {
            observed.peak_connections = observed.peak_connections.max(bucket.peak_in_use);
            counters.add(&bucket.counters);
            peaks.extend_from_slice(&bucket.peaks);
        }
        peaks.sort_unstable_by_key(|&(value, _)| value);
        observed.peak_streams = peaks.last().map_or(0, |&(value, _)| widen(value));
        observed.p95_streams = percentile95(&peaks);
        observed.waits = counters.waits;
        observed.wait_time = counters.wait_time;
        observed.wait_timeouts = counters.wait_timeouts;
        observed.overflow_dials = counters.overflow_dials;
        observed.dials = counters.dials;
        observed.dial_failures = counters.dial_failures;
        for reason in EvictionReason::ALL {
            observed
                .closes
                .count(reason, counters.evictions.get(reason));
        }
        self.observed = observed;
    }
}

fn widen(value: u32) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// The nearest-rank 95th percentile of `(value, count)` pairs sorted by
/// value: the smallest value with at least 95% of the samples at or below
/// it. 0 for no sample.
fn percentile95(sorted: &[(u32, u32)]) -> usize {
    let total: u64 = sorted.iter().map(|&(_, n)| u64::from(n)).sum();
    let rank = (total * 95).div_ceil(100);
    let mut seen = 0;
    for &(value, n) in sorted {
        seen += u64::from(n);
        if seen >= rank {
            return widen(value);
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn streams(peak: usize) -> Sample {
        Sample {
            peak_streams: peak,
            peak_in_use: peak.div_ceil(20),
            ..Sample::default()
        }
    }

    /// Records `sample(t)` every second from `from` to `to` (excluded).
    fn run(w: &mut Window, from: u64, to: u64, mut sample: impl FnMut(u64) -> Sample) {
        for t in from..to {
            w.record(secs(t), sample(t));
        }
    }

    #[test]
    fn the_window_length_is_refused_outside_ten_seconds_to_a_day() {
        assert_eq!(ObserveWindow::default().length(), secs(600));
        assert_eq!(ObserveWindow::default().bucket(), secs(60));
        assert!(ObserveWindow::new(secs(10)).is_ok());
        assert!(ObserveWindow::new(secs(86_400)).is_ok());
        for bad in [secs(9), Duration::ZERO, secs(86_401)] {
            let err = ObserveWindow::new(bad).unwrap_err().to_string();
            assert!(err.contains("between 10s and 24h"), "{err}");
        }
    }

    #[test]
    fn only_whole_buckets_count_and_coverage_grows_a_bucket_at_a_time() {
        let length = ObserveWindow::new(secs(20)).unwrap();
        let mut w = Window::new(length, Some(Duration::ZERO));
        // Bucket 0 (seconds 0 and 1) is being filled: nothing to say yet.
        run(&mut w, 0, 2, |_| streams(5));
        assert_eq!(w.observed(), Observation::default());
        // Second 2 starts bucket 1; bucket 0 is complete.
        w.record(secs(2), streams(9));
        let o = w.observed();
        assert_eq!((o.window, o.peak_streams, o.p95_streams), (secs(2), 5, 5));
        assert_eq!(o.peak_connections, 1);
        // 3.5 buckets in: three whole ones; the 9 at second 2 is in.
        run(&mut w, 3, 7, |_| streams(0));
        w.record(Duration::from_millis(7_500), streams(0));
        let o = w.observed();
        assert_eq!((o.window, o.peak_streams), (secs(6), 9));
        // Coverage stops at the window.
        run(&mut w, 8, 100, |_| streams(0));
        assert_eq!(w.observed().window, secs(20));
    }

    #[test]
    fn a_spike_ages_out_after_the_window() {
        let length = ObserveWindow::new(secs(10)).unwrap();
        let mut w = Window::new(length, Some(Duration::ZERO));
        let spike_at_12 = |t| streams(if t == 12 { 50 } else { 3 });
        // Second 22 begins bucket 22: the window is seconds 12..22.
        run(&mut w, 0, 23, spike_at_12);
        assert_eq!(w.observed().peak_streams, 50);
        // Second 23: the window is seconds 13..23, the spike is out.
        w.record(secs(23), spike_at_12(23));
        let o = w.observed();
        assert_eq!(
            (o.peak_streams, o.p95_streams, o.peak_connections),
            (3, 3, 1)
        );
        assert_eq!(o.window, secs(10));
    }

    #[test]
    fn p95_ignores_a_one_second_spike_that_the_peak_keeps() {
        let length = ObserveWindow::new(secs(60)).unwrap();
        let mut w = Window::new(length, Some(Duration::ZERO));
        // 60 seconds: 57 at 10 streams, one spike of 400, two at 20.
        run(&mut w, 0, 61, |t| {
            streams(match t {
                30 => 400,
                10 | 40 => 20,
                _ => 10,
            })
        });
        let o = w.observed();
        assert_eq!(o.window, secs(60));
        assert_eq!(o.peak_streams, 400);
        // Rank ceil(0.95 × 60) = 57 of the sorted 60: still a 10.
        assert_eq!(o.p95_streams, 10);
        assert_eq!(o.peak_connections, 20);
    }

    #[test]
    fn counters_are_the_windows_differences() {
        let length = ObserveWindow::new(secs(10)).unwrap();
        let mut w = Window::new(length, Some(Duration::ZERO));
        // Cumulative counters that grow by one wait (5 ms), one dial and a
        // TTL close a second, with 1000 dials before the window began.
        let at = |t: u64| {
            let mut evictions = Evictions::default();
            evictions.add(EvictionReason::Ttl, t);
            evictions.add(EvictionReason::Keepalive, t / 10);
            evictions.add(EvictionReason::Protocol, 1);
            evictions.add(EvictionReason::Resize, 2);
            Sample {
                server_max: Some(100),
                counters: Counters {
                    waits: t,
                    wait_time: Duration::from_millis(5 * t),
                    wait_timeouts: t / 2,
                    overflow_dials: 7,
                    dials: 1000 + t,
                    dial_failures: 0,
                    evictions,
                },
                ..Sample::default()
            }
        };
        run(&mut w, 0, 41, at);
        // The window is seconds 30..40: ten samples, each one more.
        let o = w.observed();
        assert_eq!(o.waits, 10);
        assert_eq!(o.wait_time, Duration::from_millis(50));
        assert_eq!(o.wait_timeouts, 5);
        assert_eq!(o.dials, 10);
        assert_eq!((o.overflow_dials, o.dial_failures), (0, 0));
        assert_eq!(
            o.closes,
            Closes {
                ttl: 10,
                failure: 1,
                ..Closes::default()
            }
        );
        assert_eq!(o.server_max_streams, Some(100));
    }

    #[test]
    fn an_address_with_no_traffic_reports_zeros_over_the_time_watched() {
        let length = ObserveWindow::new(secs(100)).unwrap();
        // Made 35 s after the sampler started: three buckets watched, idle.
        let mut w = Window::new(length, Some(secs(35)));
        assert_eq!(
            w.observed(),
            Observation {
                window: secs(30),
                ..Observation::default()
            }
        );
        run(&mut w, 36, 51, |_| Sample::default());
        assert_eq!(
            w.observed(),
            Observation {
                window: secs(50),
                ..Observation::default()
            }
        );
        // Before the sampler starts, nothing is watched.
        assert_eq!(Window::new(length, None).observed().window, Duration::ZERO);
    }

    #[test]
    fn a_gap_in_samples_leaves_idle_buckets() {
        let length = ObserveWindow::new(secs(10)).unwrap();
        let mut w = Window::new(length, Some(Duration::ZERO));
        run(&mut w, 0, 5, |_| streams(8));
        // Nothing for 20 s (a stalled runtime): everything aged out.
        w.record(secs(25), streams(1));
        assert_eq!(
            w.observed(),
            Observation {
                window: secs(10),
                ..Observation::default()
            }
        );
    }

    #[test]
    fn the_nearest_rank_percentile() {
        assert_eq!(percentile95(&[]), 0);
        assert_eq!(percentile95(&[(4, 1)]), 4);
        // 20 samples: rank 19 is the 19th smallest.
        assert_eq!(percentile95(&[(1, 18), (2, 1), (3, 1)]), 2);
        assert_eq!(percentile95(&[(1, 19), (9, 1)]), 1);
        // 10 samples: rank 10, the largest.
        assert_eq!(percentile95(&[(1, 9), (9, 1)]), 9);
    }
}
