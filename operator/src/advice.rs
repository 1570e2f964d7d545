//! Tuning advice: what a pool's settings should be, from what its agents
//! observed over their sliding window.
//!
//! The rules, each a few lines below and documented in the README
//! ("Tuning advice"):
//! - **maxStreams** follows the server: the smaller of what it advertises
//!   (SETTINGS_MAX_CONCURRENT_STREAMS) and [`MAX_STREAMS_CEILING`]; with no
//!   limit advertised, the running value is kept. Never above the server's
//!   limit.
//! - **size**: the connections the peak needed at that maxStreams
//!   (`ceil(peak / maxStreams)`, per address and node) times [`HEADROOM`].
//!   Never below what the peak needed. A Wait pool whose callers timed out
//!   was full, so its demand beyond `size × maxStreams` is unseen: at least
//!   double the running size.
//! - **maxIdle**: the connections the peak needed, at most `size`: kept
//!   idle between peaks, they are not redialed at the next one.
//! - **whenFull**: kept, except a Wait pool whose callers timed out while
//!   size is at its upper bound: Overflow then serves them on extra
//!   connections instead of failing them.
//! - **Hysteresis**: a size or maxIdle advised before is kept unless it no
//!   longer covers the peak, the new value is more than a quarter above
//!   it, or at most half of it ([`hold`]). Peaks are already the maximum
//!   over the window, so the advice moves with the window's buckets, not
//!   with every report.
//! - Nothing is advised before the agents have observed for
//!   `--advice-after`, nor when no stream was seen in the window.
//!
//! Everything here is pure: the status writer calls it with the reports
//! it holds and the previous status.

use std::time::Duration;

use tidepool_crds::control::pb;
use tidepool_crds::v1alpha1::{
    Bounds, ConnectionPool, ConnectionPoolSpec, Reasons, Recommendation, Tuned, Tuning, TuningMode,
    WhenFull, effective_max_idle,
};

/// Connections advised per connection the peak needed.
pub const HEADROOM: u64 = 2;

/// The most streams per connection ever advised, whatever the server
/// allows: past it one connection's flow-control window and head-of-line
/// blocking cost more than another connection does.
pub const MAX_STREAMS_CEILING: u64 = 100;

/// The largest count a report may carry; anything above is absurd.
pub const MAX_COUNT: i64 = 1 << 40;

/// The longest window a report may claim (a week).
pub const MAX_WINDOW_SECONDS: i64 = 7 * 24 * 3600;

/// One address on one node over the agent's window, checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// How long the agent has observed.
    pub window: Duration,
    /// The most streams open at once.
    pub peak_streams: u64,
    /// The 95th percentile of per-second peaks.
    pub p95_streams: u64,
    /// The most connections carrying a stream at once.
    pub peak_connections: u64,
    /// Callers that queued.
    pub waits: u64,
    /// Their time queued, summed, in ms.
    pub wait_millis: u64,
    /// Callers that gave up queueing.
    pub wait_timeouts: u64,
    /// Overflow connections dialed.
    pub overflow_dials: u64,
    /// Successful dials.
    pub dials: u64,
    /// Failed dials.
    pub dial_failures: u64,
    /// Connections closed for being idle beyond maxIdle.
    pub idle_closes: u64,
    /// Connections closed past their TTL.
    pub ttl_closes: u64,
    /// Connections closed by the server's GOAWAY.
    pub goaway_closes: u64,
    /// Connections closed on a failure.
    pub failure_closes: u64,
    /// The server's advertised limit; `None` when it advertised none.
    pub server_max_streams: Option<u64>,
}

/// Why an observation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Absurd {
    /// A negative count or window.
    Negative,
    /// A count above [`MAX_COUNT`] or a window above a week.
    Overflow,
    /// Values that cannot hold together (p95 above the peak).
    Inconsistent,
}

impl Absurd {
    /// The `reason` label of `tidepool_operator_report_values_ignored_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Negative => "negative",
            Self::Overflow => "overflow",
            Self::Inconsistent => "inconsistent",
        }
    }
}

/// `value` as a count, or why it is not one.
pub fn count(value: i64) -> Result<u64, Absurd> {
    if value < 0 {
        Err(Absurd::Negative)
    } else if value > MAX_COUNT {
        Err(Absurd::Overflow)
    } else {
        Ok(value.unsigned_abs())
    }
}

impl Observed {
    /// Checks an agent's observation: every value a count in range, the
    /// window at most a week, the p95 at most the peak.
    pub fn from_pb(o: &pb::Observation) -> Result<Self, Absurd> {
        if o.window_seconds < 0 {
            return Err(Absurd::Negative);
        }
        if o.window_seconds > MAX_WINDOW_SECONDS {
            return Err(Absurd::Overflow);
        }
        let closes = o.closes.unwrap_or_default();
        // `other` closes feed no rule, but an absurd one still marks the
        // report as absurd.
        count(closes.other)?;
        let observed = Self {
            window: Duration::from_secs(o.window_seconds.unsigned_abs()),
            peak_streams: count(o.peak_streams)?,
            p95_streams: count(o.p95_streams)?,
            peak_connections: count(o.peak_connections)?,
            waits: count(o.waits)?,
            wait_millis: count(o.wait_millis)?,
            wait_timeouts: count(o.wait_timeouts)?,
            overflow_dials: count(o.overflow_dials)?,
            dials: count(o.dials)?,
            dial_failures: count(o.dial_failures)?,
            idle_closes: count(closes.idle)?,
            ttl_closes: count(closes.ttl)?,
            goaway_closes: count(closes.goaway)?,
            failure_closes: count(closes.failure)?,
            server_max_streams: match count(o.server_max_streams)? {
                0 => None,
                n => Some(n),
            },
        };
        if observed.p95_streams > observed.peak_streams {
            return Err(Absurd::Inconsistent);
        }
        Ok(observed)
    }
}

/// A pool's observations over every address and node: peaks are the
/// largest any address saw on any node (settings are per address and
/// node), counts are summed, the server limit is the smallest advertised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Aggregate {
    /// Address-node observations added.
    pub observations: u64,
    /// The longest any agent has observed.
    pub window: Duration,
    /// The largest peak of streams on one address.
    pub peak_streams: u64,
    /// The largest p95 of streams on one address.
    pub p95_streams: u64,
    /// The largest peak of connections in use on one address.
    pub peak_connections: u64,
    /// Summed.
    pub waits: u64,
    /// Summed.
    pub wait_millis: u64,
    /// Summed.
    pub wait_timeouts: u64,
    /// Summed.
    pub overflow_dials: u64,
    /// Summed.
    pub dials: u64,
    /// Summed.
    pub dial_failures: u64,
    /// Summed.
    pub idle_closes: u64,
    /// The smallest limit any server advertised.
    pub server_max_streams: Option<u64>,
}

impl Aggregate {
    /// Adds one address's observation on one node.
    pub fn add(&mut self, o: &Observed) {
        self.observations += 1;
        self.window = self.window.max(o.window);
        self.peak_streams = self.peak_streams.max(o.peak_streams);
        self.p95_streams = self.p95_streams.max(o.p95_streams);
        self.peak_connections = self.peak_connections.max(o.peak_connections);
        self.waits = self.waits.saturating_add(o.waits);
        self.wait_millis = self.wait_millis.saturating_add(o.wait_millis);
        self.wait_timeouts = self.wait_timeouts.saturating_add(o.wait_timeouts);
        self.overflow_dials = self.overflow_dials.saturating_add(o.overflow_dials);
        self.dials = self.dials.saturating_add(o.dials);
        self.dial_failures = self.dial_failures.saturating_add(o.dial_failures);
        self.idle_closes = self.idle_closes.saturating_add(o.idle_closes);
        self.server_max_streams = match (self.server_max_streams, o.server_max_streams) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// The settings a pool runs: the spec's, or with `mode: Apply` the tuned
/// ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// `size`.
    pub size: i32,
    /// `maxIdle`, its default resolved.
    pub max_idle: i32,
    /// `maxStreams`.
    pub max_streams: i32,
    /// `whenFull`.
    pub when_full: WhenFull,
}

impl Running {
    /// The spec's settings.
    pub fn of_spec(spec: &ConnectionPoolSpec) -> Self {
        Self {
            size: spec.size,
            max_idle: effective_max_idle(spec),
            max_streams: spec.max_streams,
            when_full: spec.when_full,
        }
    }

    /// The tuned settings.
    pub fn of_tuned(t: &Tuned) -> Self {
        Self {
            size: t.size,
            max_idle: t.max_idle,
            max_streams: t.max_streams,
            when_full: t.when_full,
        }
    }

    /// What differs from `advised`, as `size 100→4, maxStreams 20→100`;
    /// empty when nothing does.
    pub fn differences(&self, advised: &Self) -> Vec<String> {
        let mut out = Vec::new();
        let mut int = |name: &str, from: i32, to: i32| {
            if from != to {
                out.push(format!("{name} {from}→{to}"));
            }
        };
        int("size", self.size, advised.size);
        int("maxIdle", self.max_idle, advised.max_idle);
        int("maxStreams", self.max_streams, advised.max_streams);
        if self.when_full != advised.when_full {
            out.push(format!(
                "whenFull {:?}→{:?}",
                self.when_full, advised.when_full
            ));
        }
        out
    }
}

/// What the rules made of a pool's observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advice {
    /// Not observed long enough.
    Observing {
        /// How long the agents have observed.
        observed: Duration,
        /// How long they must.
        needed: Duration,
    },
    /// Observed long enough, and no stream was seen.
    NoTraffic {
        /// How long the agents have observed.
        observed: Duration,
    },
    /// Settings to run.
    Advised {
        /// How long the agents have observed.
        observed: Duration,
        /// The settings.
        settings: Running,
        /// Why, per setting.
        reasons: Reasons,
    },
}

impl Advice {
    /// The status form, with a summary against what runs.
    pub fn to_status(&self, running: &Running) -> Recommendation {
        match self {
            Self::Observing { observed, needed } => Recommendation {
                summary: format!("observing {}/{}", human(*observed), human(*needed)),
                observed: Some(human(*observed)),
                ..Recommendation::default()
            },
            Self::NoTraffic { observed } => Recommendation {
                summary: "no traffic".into(),
                observed: Some(human(*observed)),
                ..Recommendation::default()
            },
            Self::Advised {
                observed,
                settings,
                reasons,
            } => {
                let differences = running.differences(settings);
                Recommendation {
                    summary: if differences.is_empty() {
                        "ok".into()
                    } else {
                        differences.join(", ")
                    },
                    observed: Some(human(*observed)),
                    size: Some(settings.size),
                    max_idle: Some(settings.max_idle),
                    max_streams: Some(settings.max_streams),
                    when_full: Some(settings.when_full),
                    reasons: Some(reasons.clone()),
                }
            }
        }
    }

    /// The advised settings, if any.
    pub fn settings(&self) -> Option<&Running> {
        match self {
            Self::Advised { settings, .. } => Some(settings),
            _ => None,
        }
    }
}

/// The settings a previous status advised, for [`hold`].
pub fn previous_settings(r: Option<&Recommendation>) -> Option<Running> {
    let r = r?;
    Some(Running {
        size: r.size?,
        max_idle: r.max_idle?,
        max_streams: r.max_streams?,
        when_full: r.when_full?,
    })
}

/// Hysteresis: the value advised before (`previous`) stays unless it is
/// below `floor` (what was observed), or `new` is more than a quarter
/// above it, or at most half of it.
pub fn hold(previous: Option<i32>, new: i32, floor: i32) -> i32 {
    match previous {
        Some(p) if p >= floor && new <= p.saturating_add(p / 4) && new.saturating_mul(2) > p => p,
        _ => new,
    }
}

/// `n` as an `i32` setting, saturating.
fn setting(n: u64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Advice for a pool running `running`, from `observed`, with the
/// previous advice (hysteresis) and the spec's bounds.
pub fn advise(
    running: &Running,
    observed: &Aggregate,
    previous: Option<&Running>,
    tuning: Option<&Tuning>,
    needed: Duration,
) -> Advice {
    if observed.observations == 0 || observed.window < needed {
        return Advice::Observing {
            observed: observed.window,
            needed,
        };
    }
    let window = human(observed.window);
    if observed.peak_streams == 0 {
        return Advice::NoTraffic {
            observed: observed.window,
        };
    }
    let bounds = |f: fn(&Tuning) -> Option<Bounds>| tuning.and_then(f);
    let bounded = |value: i32, b: Option<Bounds>, field: &str, reason: &mut String| {
        let clamped = Bounds::clamp(b.as_ref(), value);
        if clamped != value {
            let end = if clamped > value { "min" } else { "max" };
            reason.push_str(&format!("; bounded by spec.tuning.{field}.{end} {clamped}"));
        }
        clamped
    };
    let peak = observed.peak_streams;

    // maxStreams: the server's limit, up to the ceiling.
    let running_streams = u64::try_from(running.max_streams.max(1)).unwrap_or(1);
    let (streams, mut streams_reason) = match observed.server_max_streams {
        Some(s) => {
            let advised = s.min(MAX_STREAMS_CEILING);
            let why = if running_streams < advised {
                format!(
                    "server advertises {s} streams per connection; maxStreams {running_streams} forces {}× the connections",
                    advised.div_ceil(running_streams)
                )
            } else if running_streams > s {
                format!(
                    "server advertises {s} streams per connection; the agent never opens more on one, so maxStreams {running_streams} acts as {s}"
                )
            } else if s > MAX_STREAMS_CEILING {
                format!(
                    "server advertises {s} streams per connection; {MAX_STREAMS_CEILING} is the most advised"
                )
            } else {
                format!("matches the {s} streams per connection the server advertises")
            };
            (advised, why)
        }
        None => (
            running_streams,
            format!("the server advertises no stream limit; maxStreams {running_streams} kept"),
        ),
    };
    let streams = bounded(
        setting(streams),
        bounds(|t| t.max_streams),
        "maxStreams",
        &mut streams_reason,
    );
    let per_connection = u64::try_from(streams.max(1)).unwrap_or(1);

    // size: the peak's connections at that maxStreams, with headroom.
    let need = peak.div_ceil(per_connection).max(1);
    let mut size = need.saturating_mul(HEADROOM);
    let mut size_reason = format!(
        "peak {peak} concurrent streams per address over {window} need {need} connection{} at maxStreams {per_connection} ({} in use at peak, of size {}); size {size} is {HEADROOM}× headroom",
        plural(need),
        observed.peak_connections,
        running.size,
    );
    let saturated = running.when_full == WhenFull::Wait && observed.wait_timeouts > 0;
    if saturated {
        let doubled = u64::try_from(running.size.max(1))
            .unwrap_or(1)
            .saturating_mul(2);
        if doubled > size {
            size = doubled;
            size_reason = format!(
                "{} callers timed out waiting: size {} × maxStreams {} was full, so demand beyond it is unseen; size {size} doubles it",
                observed.wait_timeouts, running.size, running.max_streams
            );
        }
    }
    let floor = setting(need);
    let fresh = setting(size);
    let mut size = hold(previous.map(|p| p.size), fresh, floor);
    if size != fresh {
        size_reason.push_str(&format!(
            "; {size} advised before is kept (hysteresis: within a quarter above, and more than half)"
        ));
    }
    let size_bounds = bounds(|t| t.size);
    size = bounded(size, size_bounds, "size", &mut size_reason).max(1);

    // maxIdle: what the peak needed, at most size.
    let mut idle_reason = format!(
        "at peak {need} connection{} carried streams; keeping {need} idle between peaks avoids redialing them ({} idle closes, {} dials over {window})",
        plural(need),
        observed.idle_closes,
        observed.dials,
    );
    let fresh = setting(need);
    let mut max_idle = hold(previous.map(|p| p.max_idle), fresh, floor);
    if max_idle != fresh {
        idle_reason.push_str(&format!("; {max_idle} advised before is kept (hysteresis)"));
    }
    max_idle = bounded(
        max_idle,
        bounds(|t| t.max_idle),
        "maxIdle",
        &mut idle_reason,
    );
    if max_idle > size {
        max_idle = size;
        idle_reason.push_str(&format!("; at most size ({size})"));
    }

    // whenFull: kept, unless Wait fails callers and size cannot grow.
    let at_max = size_bounds
        .and_then(|b| b.max)
        .is_some_and(|max| size >= max);
    let (when_full, when_reason) = match running.when_full {
        WhenFull::Wait if saturated && at_max => (
            WhenFull::Overflow,
            format!(
                "{} callers timed out waiting and size is at spec.tuning.size.max {size}: Overflow serves them on extra connections instead of failing them",
                observed.wait_timeouts
            ),
        ),
        WhenFull::Wait => (
            WhenFull::Wait,
            format!(
                "{} callers waited over {window}, {} ms on average; {} timed out",
                observed.waits,
                observed
                    .wait_millis
                    .checked_div(observed.waits)
                    .unwrap_or(0),
                observed.wait_timeouts
            ),
        ),
        WhenFull::Overflow => (
            WhenFull::Overflow,
            format!(
                "{} overflow dial{} over {window}; kept",
                observed.overflow_dials,
                plural(observed.overflow_dials)
            ),
        ),
    };

    Advice::Advised {
        observed: observed.window,
        settings: Running {
            size,
            max_idle,
            max_streams: streams,
            when_full,
        },
        reasons: Reasons {
            size: size_reason,
            max_idle: idle_reason,
            max_streams: streams_reason,
            when_full: when_reason,
        },
    }
}

/// How long to observe before advising, and how often Apply may change
/// a pool's settings (operator flags `--advice-after`,
/// `--tuning-interval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The observation an advice needs.
    pub advice_after: Duration,
    /// The least time between two applies to one pool.
    pub interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            advice_after: Duration::from_secs(600),
            interval: Duration::from_secs(600),
        }
    }
}

/// Whether the operator runs its advice for this pool.
pub fn applies(spec: &ConnectionPoolSpec) -> bool {
    spec.tuning
        .as_ref()
        .is_some_and(|t| t.mode == TuningMode::Apply)
}

/// The settings a pool runs: `status.tuned` with `mode: Apply`, else the
/// spec's.
pub fn running(pool: &ConnectionPool) -> Running {
    match pool.status.as_ref().and_then(|s| s.tuned.as_ref()) {
        Some(t) if applies(&pool.spec) => Running::of_tuned(t),
        _ => Running::of_spec(&pool.spec),
    }
}

/// The spec agents are sent: the resource's, with the tuned settings in
/// place of its own when it applies them.
pub fn running_spec(pool: &ConnectionPool) -> ConnectionPoolSpec {
    let mut spec = pool.spec.clone();
    if applies(&spec)
        && let Some(t) = pool.status.as_ref().and_then(|s| s.tuned.as_ref())
    {
        spec.size = t.size;
        spec.max_idle = Some(t.max_idle);
        spec.max_streams = t.max_streams;
        spec.when_full = t.when_full;
    }
    spec
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// A duration as a person writes it: `45s`, `10m`, `1h30m`, `2m30s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_MINUTES: Duration = Duration::from_secs(600);

    fn running(size: i32, max_idle: i32, max_streams: i32, when_full: WhenFull) -> Running {
        Running {
            size,
            max_idle,
            max_streams,
            when_full,
        }
    }

    fn defaults() -> Running {
        running(100, 50, 20, WhenFull::Overflow)
    }

    fn seen(peak: u64, server: Option<u64>) -> Aggregate {
        let mut a = Aggregate::default();
        a.add(&Observed {
            window: TEN_MINUTES,
            peak_streams: peak,
            p95_streams: peak,
            peak_connections: peak.div_ceil(20),
            server_max_streams: server,
            ..Observed::default()
        });
        a
    }

    fn advised(a: &Advice) -> (Running, Reasons) {
        match a {
            Advice::Advised {
                settings, reasons, ..
            } => (*settings, reasons.clone()),
            other => panic!("no advice: {other:?}"),
        }
    }

    #[test]
    fn the_issue_example_37_streams_at_max_streams_20() {
        let (s, why) = advised(&advise(
            &defaults(),
            &seen(37, None),
            None,
            None,
            TEN_MINUTES,
        ));
        // No server limit: maxStreams kept; 37/20 → 2 connections, ×2.
        assert_eq!(s, running(4, 2, 20, WhenFull::Overflow));
        assert!(
            why.size.starts_with("peak 37 concurrent streams per address over 10m need 2 connections at maxStreams 20 (2 in use at peak, of size 100); size 4 is 2× headroom"),
            "{}",
            why.size
        );
        assert!(why.max_streams.contains("no stream limit"), "{why:?}");
        let status =
            advise(&defaults(), &seen(37, None), None, None, TEN_MINUTES).to_status(&defaults());
        assert_eq!(status.summary, "size 100→4, maxIdle 50→2");
    }

    #[test]
    fn a_server_limit_raises_max_streams_up_to_the_ceiling_and_never_above_the_limit() {
        let (s, why) = advised(&advise(
            &defaults(),
            &seen(37, Some(100)),
            None,
            None,
            TEN_MINUTES,
        ));
        assert_eq!((s.max_streams, s.size, s.max_idle), (100, 2, 1));
        assert_eq!(
            why.max_streams,
            "server advertises 100 streams per connection; maxStreams 20 forces 5× the connections"
        );
        // A server allowing fewer than the spec: advised down to it.
        let (s, why) = advised(&advise(
            &defaults(),
            &seen(37, Some(10)),
            None,
            None,
            TEN_MINUTES,
        ));
        assert_eq!((s.max_streams, s.size), (10, 8));
        assert!(why.max_streams.contains("acts as 10"), "{why:?}");
        // A huge limit: the ceiling.
        let (s, _) = advised(&advise(
            &defaults(),
            &seen(500, Some(u64::from(u32::MAX))),
            None,
            None,
            TEN_MINUTES,
        ));
        assert_eq!((s.max_streams, s.size), (100, 10));
        // The smallest limit of any address or node wins.
        let mut a = seen(37, Some(200));
        a.add(&Observed {
            window: TEN_MINUTES,
            server_max_streams: Some(50),
            ..Observed::default()
        });
        assert_eq!(
            advised(&advise(&defaults(), &a, None, None, TEN_MINUTES))
                .0
                .max_streams,
            50
        );
    }

    #[test]
    fn nothing_is_advised_before_enough_observation_or_without_traffic() {
        let mut short = seen(37, None);
        short.window = Duration::from_secs(150);
        let a = advise(&defaults(), &short, None, None, TEN_MINUTES);
        assert_eq!(
            a,
            Advice::Observing {
                observed: Duration::from_secs(150),
                needed: TEN_MINUTES
            }
        );
        assert_eq!(a.to_status(&defaults()).summary, "observing 2m30s/10m");
        // Missing data: no agent reported an observation at all.
        let none = advise(&defaults(), &Aggregate::default(), None, None, TEN_MINUTES);
        assert!(matches!(none, Advice::Observing { .. }), "{none:?}");
        // Long enough, no stream seen.
        let idle = advise(&defaults(), &seen(0, Some(100)), None, None, TEN_MINUTES);
        assert_eq!(idle.to_status(&defaults()).summary, "no traffic");
        assert!(idle.settings().is_none());
    }

    #[test]
    fn a_spike_raises_the_advice_at_once_and_it_falls_when_the_spike_ages_out() {
        let calm = advised(&advise(
            &defaults(),
            &seen(30, Some(20)),
            None,
            None,
            TEN_MINUTES,
        ))
        .0;
        assert_eq!(calm.size, 4);
        // A spike to 200 streams: 10 connections needed, size 20, at once.
        let spike = advised(&advise(
            &defaults(),
            &seen(200, Some(20)),
            Some(&calm),
            None,
            TEN_MINUTES,
        ))
        .0;
        assert_eq!(spike.size, 20);
        // The window still holds a slightly lower peak: kept.
        let held = advised(&advise(
            &defaults(),
            &seen(180, Some(20)),
            Some(&spike),
            None,
            TEN_MINUTES,
        ));
        assert_eq!(held.0.size, 20);
        assert!(held.1.size.contains("hysteresis"), "{:?}", held.1);
        // The spike aged out of the window: back down.
        let after = advised(&advise(
            &defaults(),
            &seen(30, Some(20)),
            Some(&spike),
            None,
            TEN_MINUTES,
        ))
        .0;
        assert_eq!(after.size, 4);
    }

    #[test]
    fn a_peak_flapping_between_two_levels_does_not_flap_the_advice() {
        // Peaks alternate between needing 2 and 3 connections.
        let mut previous = None;
        let mut sizes = Vec::new();
        for peak in [40, 60, 40, 60, 40, 60, 40] {
            let s = advised(&advise(
                &defaults(),
                &seen(peak, Some(20)),
                previous.as_ref(),
                None,
                TEN_MINUTES,
            ))
            .0;
            sizes.push(s.size);
            previous = Some(s);
        }
        assert_eq!(sizes, [4, 6, 6, 6, 6, 6, 6]);
    }

    #[test]
    fn hold_keeps_the_previous_value_unless_below_the_floor_or_far_from_it() {
        assert_eq!(hold(None, 7, 3), 7);
        assert_eq!(hold(Some(8), 9, 3), 8, "within a quarter above");
        assert_eq!(hold(Some(8), 11, 3), 11, "more than a quarter above");
        assert_eq!(hold(Some(8), 5, 3), 8, "more than half");
        assert_eq!(hold(Some(8), 4, 2), 4, "half");
        assert_eq!(
            hold(Some(4), 5, 5),
            5,
            "the previous no longer covers the peak"
        );
    }

    #[test]
    fn a_wait_pool_whose_callers_time_out_gets_at_least_double_its_size() {
        let mut a = seen(20, None);
        a.waits = 40;
        a.wait_millis = 4000;
        a.wait_timeouts = 3;
        let current = running(1, 1, 20, WhenFull::Wait);
        let (s, why) = advised(&advise(&current, &a, None, None, TEN_MINUTES));
        assert_eq!((s.size, s.when_full), (2, WhenFull::Wait));
        assert!(
            why.when_full
                .contains("40 callers waited over 10m, 100 ms on average; 3 timed out"),
            "{why:?}"
        );
        // At its upper bound, size cannot grow: Overflow instead.
        let bounds = Tuning {
            size: Some(Bounds {
                min: None,
                max: Some(1),
            }),
            ..Tuning::default()
        };
        let (s, why) = advised(&advise(&current, &a, None, Some(&bounds), TEN_MINUTES));
        assert_eq!((s.size, s.when_full), (1, WhenFull::Overflow));
        assert!(
            why.size.contains("bounded by spec.tuning.size.max 1"),
            "{why:?}"
        );
        assert!(why.when_full.contains("Overflow serves them"), "{why:?}");
    }

    #[test]
    fn bounds_clamp_each_setting_and_max_idle_never_exceeds_size() {
        let tuning = Tuning {
            size: Some(Bounds {
                min: Some(8),
                max: Some(50),
            }),
            max_idle: Some(Bounds {
                min: Some(10),
                max: None,
            }),
            max_streams: Some(Bounds {
                min: None,
                max: Some(50),
            }),
            ..Tuning::default()
        };
        let (s, why) = advised(&advise(
            &defaults(),
            &seen(37, Some(100)),
            None,
            Some(&tuning),
            TEN_MINUTES,
        ));
        assert_eq!((s.size, s.max_idle, s.max_streams), (8, 8, 50));
        assert!(
            why.size.contains("bounded by spec.tuning.size.min 8"),
            "{why:?}"
        );
        assert!(why.max_idle.contains("at most size (8)"), "{why:?}");
        assert!(
            why.max_streams
                .contains("bounded by spec.tuning.maxStreams.max 50"),
            "{why:?}"
        );
    }

    #[test]
    fn the_advice_is_ok_when_the_pool_runs_it() {
        let a = advise(&defaults(), &seen(37, Some(100)), None, None, TEN_MINUTES);
        let tuned = *a.settings().unwrap();
        assert_eq!(a.to_status(&tuned).summary, "ok");
    }

    #[test]
    fn absurd_observations_are_refused_by_kind() {
        let good = pb::Observation {
            window_seconds: 600,
            peak_streams: 37,
            p95_streams: 30,
            peak_connections: 2,
            server_max_streams: 100,
            ..pb::Observation::default()
        };
        let o = Observed::from_pb(&good).unwrap();
        assert_eq!((o.peak_streams, o.server_max_streams), (37, Some(100)));
        let with = |f: fn(&mut pb::Observation)| {
            let mut o = good;
            f(&mut o);
            Observed::from_pb(&o)
        };
        assert_eq!(with(|o| o.peak_streams = -1), Err(Absurd::Negative));
        assert_eq!(with(|o| o.window_seconds = -5), Err(Absurd::Negative));
        assert_eq!(with(|o| o.dials = i64::MAX), Err(Absurd::Overflow));
        assert_eq!(with(|o| o.window_seconds = i64::MAX), Err(Absurd::Overflow));
        assert_eq!(
            with(|o| o.closes = Some(pb::Closes {
                other: -1,
                ..pb::Closes::default()
            })),
            Err(Absurd::Negative)
        );
        assert_eq!(with(|o| o.p95_streams = 38), Err(Absurd::Inconsistent));
        assert_eq!(
            with(|o| o.server_max_streams = 0)
                .unwrap()
                .server_max_streams,
            None
        );
    }

    #[test]
    fn sums_saturate_instead_of_overflowing() {
        let big = Observed {
            window: TEN_MINUTES,
            dials: u64::MAX - 1,
            ..Observed::default()
        };
        let mut a = Aggregate::default();
        a.add(&big);
        a.add(&big);
        assert_eq!(a.dials, u64::MAX);
    }

    #[test]
    fn durations_read_as_people_write_them() {
        for (secs, text) in [
            (0, "0s"),
            (45, "45s"),
            (600, "10m"),
            (150, "2m30s"),
            (5400, "1h30m"),
        ] {
            assert_eq!(human(Duration::from_secs(secs)), text);
        }
    }
}
