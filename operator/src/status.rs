//! A pool's status: computed from what the agents run, refuse and report,
//! and written by server-side apply at most once per pool every
//! `status_interval` (5 s by default), only when it changed.
//!
//! Occupancy is summed per address over every node's report. The address
//! list is capped at [`MAX_STATUS_ADDRESSES`] (the CRD's own limit), busiest
//! first; `totals` always cover every address, so they stay exact.
//!
//! The status is computed apart from the reconciler: agents' answers and
//! reports change it far more often than the resource does, and the write
//! rate must not grow with the number of agents.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Resource as _, ResourceExt as _};
use tidepool_crds::v1alpha1::{
    AddressStatus, AgentCounts, Bounds, Recommendation, Totals, Tuned, Tuning as TuningSpec,
};
use tidepool_crds::{ConnectionPool, ConnectionPoolStatus, PoolKey};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::advice::{self, Advice, Aggregate, Running, advise};
use crate::agents::{Agent, Agents};
use crate::desired::{Desired, Entry};
use crate::local::LocalState;
use crate::metrics::{AdviceLabel, Metrics};
use crate::reason::Reason;
use crate::resolve::describe_target;

/// The most addresses `status.addresses` lists (the CRD's `maxItems`).
pub const MAX_STATUS_ADDRESSES: usize = 50;

/// The field manager of the operator's status writes.
pub const FIELD_MANAGER: &str = "tidepool-operator";

/// How many nodes a Degraded message names before "and N more".
const NAMED_NODES: usize = 3;

/// Everything a pool's status is computed from.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// The pool.
    pub pool: &'a ConnectionPool,
    /// What the reconciler made of it; `None` before its first reconcile.
    pub entry: Option<&'a Entry>,
    /// The nodes that should run it.
    pub nodes: &'a BTreeSet<String>,
    /// The connected agents by node.
    pub agents: &'a HashMap<String, Agent>,
    /// What became of its node-local Service, if it asks for one.
    pub local: Option<&'a LocalState>,
    /// How tuning advice is made and applied.
    pub tuning: &'a advice::Options,
}

fn condition(
    type_: &str,
    ok: bool,
    reason: Reason,
    message: String,
    generation: i64,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.as_str().into(),
        message,
        observed_generation: Some(generation),
        last_transition_time: now.clone(),
    }
}

/// The status of one pool. `previous` conditions keep their
/// `lastTransitionTime` when their status did not change.
pub fn compute(
    inputs: &Inputs<'_>,
    previous: Option<&ConnectionPoolStatus>,
    now: Time,
) -> ConnectionPoolStatus {
    let pool = inputs.pool;
    let key = PoolKey::of(pool).to_string();
    let uid = pool.uid().unwrap_or_default();
    let generation = pool.metadata.generation.unwrap_or_default();

    let mut synced = 0;
    let mut rejections: Vec<(&str, &str)> = Vec::new();
    let mut by_address: BTreeMap<&str, AddressStatus> = BTreeMap::new();
    let mut observed = Aggregate::default();
    for node in inputs.nodes {
        let Some(agent) = inputs.agents.get(node) else {
            continue;
        };
        let runs = agent
            .applied
            .as_ref()
            .is_some_and(|s| s.runs(&key, &uid, generation));
        if runs {
            synced += 1;
        } else if let Some(r) = agent
            .rejected
            .as_ref()
            .filter(|r| r.blames(&key, &uid, generation))
        {
            rejections.push((node, &r.error));
        }
        if let Some(report) = agent.reports.get(key.as_str()).filter(|r| *r.uid == *uid) {
            for a in &report.addresses {
                let s = by_address
                    .entry(&a.address)
                    .or_insert_with(|| AddressStatus {
                        address: a.address.to_string(),
                        ..AddressStatus::default()
                    });
                // Agents' numbers, not ours: summed without overflowing.
                s.connections = s.connections.saturating_add(a.connections);
                s.busy = s.busy.saturating_add(a.busy);
                s.idle = s.idle.saturating_add(a.idle);
                s.streams = s.streams.saturating_add(a.streams);
                s.overflow = s.overflow.saturating_add(a.overflow);
                s.nodes = s.nodes.saturating_add(1);
                if let Some(o) = &a.observed {
                    observed.add(o);
                }
            }
        }
    }
    let desired = i32::try_from(inputs.nodes.len()).unwrap_or(i32::MAX);
    let rejected = i32::try_from(rejections.len()).unwrap_or(i32::MAX);

    let resolved_addresses = inputs.entry.map_or(0, |e| e.pool.addresses.len());
    let mut totals = Totals {
        addresses: i32::try_from(resolved_addresses).unwrap_or(i32::MAX),
        ..Totals::default()
    };
    for a in by_address.values() {
        totals.connections = totals.connections.saturating_add(a.connections);
        totals.streams = totals.streams.saturating_add(a.streams);
        totals.idle = totals.idle.saturating_add(a.idle);
        totals.busy = totals.busy.saturating_add(a.busy);
        totals.overflow = totals.overflow.saturating_add(a.overflow);
    }
    let mut addresses: Vec<AddressStatus> = by_address.into_values().collect();
    addresses.sort_by(|a, b| {
        (b.streams, b.connections)
            .cmp(&(a.streams, a.connections))
            .then_with(|| a.address.cmp(&b.address))
    });
    addresses.truncate(MAX_STATUS_ADDRESSES);

    let unresolved = inputs.entry.and_then(|e| e.resolution.as_ref().err());
    let rejected_message = || {
        let mut parts: Vec<String> = rejections
            .iter()
            .take(NAMED_NODES)
            .map(|(node, error)| format!("node {node} rejected generation {generation}: {error}"))
            .collect();
        if rejections.len() > NAMED_NODES {
            parts.push(format!("and {} more nodes", rejections.len() - NAMED_NODES));
        }
        parts.join("; ")
    };
    let agents_message = format!("{synced}/{desired} agents run generation {generation}");

    let ready = match (inputs.entry, unresolved) {
        (None, _) => condition(
            "Ready",
            false,
            Reason::Pending,
            "not reconciled yet".into(),
            generation,
            &now,
        ),
        (Some(_), Some(e)) => {
            condition("Ready", false, e.reason(), e.to_string(), generation, &now)
        }
        _ if resolved_addresses == 0 => condition(
            "Ready",
            false,
            Reason::NoAddresses,
            "the target has no addresses".into(),
            generation,
            &now,
        ),
        _ if desired == 0 => condition(
            "Ready",
            false,
            Reason::NoAgents,
            "no node runs an agent".into(),
            generation,
            &now,
        ),
        _ if rejected > 0 => condition(
            "Ready",
            false,
            Reason::AgentRejected,
            rejected_message(),
            generation,
            &now,
        ),
        _ if synced < desired => condition(
            "Ready",
            false,
            Reason::Progressing,
            agents_message.clone(),
            generation,
            &now,
        ),
        _ => condition(
            "Ready",
            true,
            Reason::Ready,
            format!("{agents_message} with {resolved_addresses} addresses"),
            generation,
            &now,
        ),
    };
    let distributed = if desired == 0 {
        condition(
            "Distributed",
            false,
            Reason::NoAgents,
            "no node runs an agent".into(),
            generation,
            &now,
        )
    } else if synced == desired {
        condition(
            "Distributed",
            true,
            Reason::AllAgentsSynced,
            agents_message,
            generation,
            &now,
        )
    } else {
        condition(
            "Distributed",
            false,
            Reason::Progressing,
            agents_message,
            generation,
            &now,
        )
    };
    let degraded = match unresolved {
        Some(e) => condition(
            "Degraded",
            true,
            e.reason(),
            e.to_string(),
            generation,
            &now,
        ),
        None if rejected > 0 => condition(
            "Degraded",
            true,
            Reason::AgentRejected,
            rejected_message(),
            generation,
            &now,
        ),
        None => condition(
            "Degraded",
            false,
            Reason::AsExpected,
            "no agent rejected the pool".into(),
            generation,
            &now,
        ),
    };

    let tuning = tune(pool, &observed, previous, inputs.tuning, &now);
    let mut conditions = vec![ready, distributed, degraded];
    if pool.spec.node_local_service.is_some() {
        conditions.push(local_condition(inputs, generation, &now));
    }
    conditions.push(tuning.condition(pool, inputs.tuning, generation, &now));
    if let Some(previous) = previous {
        for c in &mut conditions {
            if let Some(old) = previous
                .conditions
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == c.status)
            {
                c.last_transition_time = old.last_transition_time.clone();
            }
        }
    }
    ConnectionPoolStatus {
        observed_generation: Some(generation),
        target: Some(describe_target(&pool.spec)),
        conditions,
        agents: Some(AgentCounts {
            desired,
            synced,
            rejected,
        }),
        totals: Some(totals),
        addresses,
        recommendation: Some(tuning.recommendation),
        tuned: tuning.tuned,
    }
}

/// A pool's advice and, with `mode: Apply`, the settings it runs.
struct Tuning {
    advice: Advice,
    recommendation: Recommendation,
    tuned: Option<Tuned>,
}

/// The advice for a pool and, when it applies advice, whether to apply it
/// now: when it differs from what runs and the last apply is at least
/// `--tuning-interval` old. Tuned settings are kept within the bounds
/// even between applies (a bound the user moves takes effect at once).
fn tune(
    pool: &ConnectionPool,
    observed: &Aggregate,
    previous: Option<&ConnectionPoolStatus>,
    options: &advice::Options,
    now: &Time,
) -> Tuning {
    let spec = &pool.spec;
    let bounds = spec.tuning.as_ref();
    let previous_advice =
        advice::previous_settings(previous.and_then(|p| p.recommendation.as_ref()));
    let before = previous
        .and_then(|p| p.tuned.as_ref())
        .filter(|_| advice::applies(spec));
    let running = before.map_or_else(|| Running::of_spec(spec), Running::of_tuned);
    let advice = advise(
        &running,
        observed,
        previous_advice.as_ref(),
        bounds,
        options.advice_after,
    );
    let tuned = if advice::applies(spec) {
        let due = before.is_none_or(|t| {
            now.0.as_second().saturating_sub(t.applied_at.0.as_second())
                >= i64::try_from(options.interval.as_secs()).unwrap_or(i64::MAX)
        });
        match advice.settings() {
            // The first advice is applied even when it matches the spec, so
            // `status.tuned` says what runs from then on.
            Some(a) if (before.is_none() || *a != running) && due => Some(tuned(a, now)),
            _ => before.map(|t| {
                let kept = within(bounds, Running::of_tuned(t));
                if kept == Running::of_tuned(t) {
                    t.clone()
                } else {
                    tuned(&kept, now)
                }
            }),
        }
    } else {
        None
    };
    let running = tuned.as_ref().map_or(running, Running::of_tuned);
    Tuning {
        recommendation: advice.to_status(&running),
        advice,
        tuned,
    }
}

fn tuned(s: &Running, now: &Time) -> Tuned {
    Tuned {
        size: s.size,
        max_idle: s.max_idle,
        max_streams: s.max_streams,
        when_full: s.when_full,
        applied_at: now.clone(),
    }
}

/// `s` within the spec's bounds, `maxIdle` at most `size`.
fn within(tuning: Option<&TuningSpec>, s: Running) -> Running {
    let size = Bounds::clamp(tuning.and_then(|t| t.size).as_ref(), s.size).max(1);
    Running {
        size,
        max_idle: Bounds::clamp(tuning.and_then(|t| t.max_idle).as_ref(), s.max_idle).min(size),
        max_streams: Bounds::clamp(tuning.and_then(|t| t.max_streams).as_ref(), s.max_streams)
            .max(1),
        when_full: s.when_full,
    }
}

impl Tuning {
    /// The `Tuned` condition: True when the settings running match the
    /// advice, False when they differ, Unknown while observing or with no
    /// traffic.
    fn condition(
        &self,
        pool: &ConnectionPool,
        options: &advice::Options,
        generation: i64,
        now: &Time,
    ) -> Condition {
        let (status, reason, message) = match &self.advice {
            Advice::Observing { observed, needed } => (
                "Unknown",
                Reason::Observing,
                format!(
                    "agents have observed the pool for {} of the {} advice needs",
                    advice::human(*observed),
                    advice::human(*needed)
                ),
            ),
            Advice::NoTraffic { observed } => (
                "Unknown",
                Reason::NoTraffic,
                format!(
                    "no stream in the last {}: nothing to advise",
                    advice::human(*observed)
                ),
            ),
            Advice::Advised { .. } if self.recommendation.summary == "ok" => (
                "True",
                Reason::AsAdvised,
                if self.tuned.is_some() {
                    "the tuned settings running match the advice".to_string()
                } else {
                    "the settings running match the advice".to_string()
                },
            ),
            Advice::Advised { .. } => {
                let next = match &self.tuned {
                    Some(t) if advice::applies(&pool.spec) => {
                        let at = t.applied_at.0.as_second().saturating_add(
                            i64::try_from(options.interval.as_secs()).unwrap_or(i64::MAX),
                        );
                        let at = k8s_openapi::jiff::Timestamp::from_second(at)
                            .map_or_else(|_| "later".to_string(), |t| t.to_string());
                        format!("applied at {at}, a tuning interval after the last apply")
                    }
                    _ if advice::applies(&pool.spec) => "applied at the next status pass".into(),
                    _ => "set them in the spec, or set spec.tuning.mode: Apply".into(),
                };
                (
                    "False",
                    Reason::AdviceDiffers,
                    format!("advice differs: {}; {next}", self.recommendation.summary),
                )
            }
        };
        Condition {
            type_: "Tuned".into(),
            status: status.into(),
            reason: reason.as_str().into(),
            message,
            observed_generation: Some(generation),
            last_transition_time: now.clone(),
        }
    }
}

/// The `LocalService` condition: True when the Service is written and
/// every node that should run the pool has a ready agent endpoint.
fn local_condition(inputs: &Inputs<'_>, generation: i64, now: &Time) -> Condition {
    let name = inputs
        .pool
        .spec
        .node_local_service
        .as_ref()
        .map_or("", |l| l.name.as_str());
    let (ok, reason, message) = match inputs.local {
        None => (
            false,
            Reason::Pending,
            format!("Service {name} not written yet"),
        ),
        Some(state @ LocalState::Serving { service, target_port, ready_nodes }) => {
            let missing: Vec<&String> = inputs
                .nodes
                .iter()
                .filter(|n| !ready_nodes.contains(*n))
                .collect();
            let served = inputs.nodes.len() - missing.len();
            if missing.is_empty() {
                (
                    true,
                    state.reason(),
                    format!(
                        "{service} reaches the agent on each of {served} nodes at port {target_port}"
                    ),
                )
            } else {
                (
                    false,
                    Reason::NodesWithoutEndpoint,
                    format!(
                        "{service}: no ready agent on {}; calls from there fail fast (no local endpoint); {served} of {} nodes served",
                        name_nodes(&missing),
                        inputs.nodes.len()
                    ),
                )
            }
        }
        Some(state @ LocalState::NameTaken { service }) => (
            false,
            state.reason(),
            format!(
                "Service {service} exists and this pool does not own it; it is left as it is: choose another spec.nodeLocalService.name or delete that Service"
            ),
        ),
        Some(state @ LocalState::ListenPortTaken { port, other }) => (
            false,
            state.reason(),
            format!(
                "Service {name} is not made: spec.listenPort {port} is held by pool {other}, so it would reach that pool"
            ),
        ),
        Some(state @ LocalState::NotConfigured) => (
            false,
            state.reason(),
            "the operator runs without --agent-selector (TIDEPOOL_AGENT_SELECTOR), so it cannot list agent pods; the chart sets it".into(),
        ),
        Some(state @ LocalState::Failed { error }) => (false, state.reason(), error.clone()),
    };
    condition("LocalService", ok, reason, message, generation, now)
}

/// `a, b, c and 4 more`.
fn name_nodes(nodes: &[&String]) -> String {
    let named: Vec<&str> = nodes.iter().take(NAMED_NODES).map(|n| n.as_str()).collect();
    let mut s = named.join(", ");
    if nodes.len() > NAMED_NODES {
        s.push_str(&format!(" and {} more", nodes.len() - NAMED_NODES));
    }
    s
}

/// An Event for a transition a person should see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Normal or Warning.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: String,
    /// What happened.
    pub note: String,
}

fn find<'a>(s: Option<&'a ConnectionPoolStatus>, type_: &str) -> Option<&'a Condition> {
    s.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

/// The Events between two statuses: Ready gained or lost, Degraded gained
/// (or its reason changed) or cleared.
pub fn transitions(
    old: Option<&ConnectionPoolStatus>,
    new: &ConnectionPoolStatus,
) -> Vec<Transition> {
    let mut out = Vec::new();
    let is_true = |c: Option<&Condition>| c.is_some_and(|c| c.status == "True");
    let (old_ready, new_ready) = (find(old, "Ready"), find(Some(new), "Ready"));
    if is_true(new_ready) && !is_true(old_ready) {
        out.push(Transition {
            warning: false,
            reason: Reason::Ready.as_str().into(),
            note: new_ready.map(|c| c.message.clone()).unwrap_or_default(),
        });
    } else if is_true(old_ready) && !is_true(new_ready) {
        out.push(Transition {
            warning: true,
            reason: Reason::NotReady.as_str().into(),
            note: new_ready.map(|c| c.message.clone()).unwrap_or_default(),
        });
    }
    let (old_deg, new_deg) = (find(old, "Degraded"), find(Some(new), "Degraded"));
    if let Some(d) = new_deg.filter(|d| d.status == "True") {
        let same = old_deg.is_some_and(|o| o.status == "True" && o.reason == d.reason);
        if !same {
            out.push(Transition {
                warning: true,
                reason: d.reason.clone(),
                note: d.message.clone(),
            });
        }
    } else if is_true(old_deg) {
        out.push(Transition {
            warning: false,
            reason: Reason::Recovered.as_str().into(),
            note: "the pool is no longer degraded".into(),
        });
    }
    // The node-local Service: each new reason of it being False, and its
    // recovery.
    let (old_local, new_local) = (find(old, "LocalService"), find(Some(new), "LocalService"));
    if let Some(l) =
        new_local.filter(|l| l.status == "False" && l.reason != Reason::Pending.as_str())
    {
        if !old_local.is_some_and(|o| o.status == "False" && o.reason == l.reason) {
            out.push(Transition {
                warning: true,
                reason: l.reason.clone(),
                note: l.message.clone(),
            });
        }
    } else if let Some(l) = new_local.filter(|l| l.status == "True")
        && !is_true(old_local)
    {
        out.push(Transition {
            warning: false,
            reason: Reason::LocalServiceServing.as_str().into(),
            note: l.message.clone(),
        });
    }
    // Tuning: advised settings that changed (hysteresis already kept
    // small moves out), and tuned settings applied.
    let advised = |s: Option<&ConnectionPoolStatus>| {
        advice::previous_settings(s.and_then(|s| s.recommendation.as_ref()))
    };
    if let Some(now) = advised(Some(new))
        && advised(old) != Some(now)
        && let Some(r) = &new.recommendation
    {
        let was = advised(old).map_or_else(
            || "first advice".to_string(),
            |before| {
                let changes = before.differences(&now);
                format!("was {}", changes.join(", "))
            },
        );
        let reasons = r
            .reasons
            .as_ref()
            .map(|r| {
                format!(
                    "size: {}; maxIdle: {}; maxStreams: {}; whenFull: {}",
                    r.size, r.max_idle, r.max_streams, r.when_full
                )
            })
            .unwrap_or_default();
        out.push(Transition {
            warning: false,
            reason: Reason::AdviceChanged.as_str().into(),
            note: format!(
                "advice: size {}, maxIdle {}, maxStreams {}, whenFull {:?} ({was}); running: {}. {reasons}",
                now.size, now.max_idle, now.max_streams, now.when_full, r.summary
            ),
        });
    }
    let tuned =
        |s: Option<&ConnectionPoolStatus>| s.and_then(|s| s.tuned.as_ref()).map(Running::of_tuned);
    if let Some(now) = tuned(Some(new))
        && tuned(old) != Some(now)
    {
        let from = tuned(old).map_or_else(
            || "from the spec's settings".to_string(),
            |before| format!("({})", before.differences(&now).join(", ")),
        );
        out.push(Transition {
            warning: false,
            reason: Reason::Tuned.as_str().into(),
            note: format!(
                "applied size {}, maxIdle {}, maxStreams {}, whenFull {:?} {from}",
                now.size, now.max_idle, now.max_streams, now.when_full
            ),
        });
    }
    out
}

/// What the writer remembers of a pool's last write.
#[derive(Debug)]
struct Written {
    uid: String,
    status: ConnectionPoolStatus,
    at: Instant,
}

/// Computes and writes every pool's status; only the leader runs it.
pub struct StatusWriter {
    /// For writes and events.
    pub client: kube::Client,
    /// The pools.
    pub pools: Store<ConnectionPool>,
    /// The nodes that should run agents.
    pub nodes: Store<Node>,
    /// What the reconciler resolved.
    pub desired: Arc<Desired>,
    /// The agents.
    pub agents: Arc<Agents>,
    /// The least time between two writes of one pool's status.
    pub interval: Duration,
    /// How tuning advice is made and applied.
    pub tuning: advice::Options,
    /// Metrics.
    pub metrics: Metrics,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Whether this replica may still write (checked before each write).
    pub fence: crate::leader::Fence,
    /// Node-local Services' states.
    pub local: Arc<crate::local::LocalStates>,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// How often the writer looks for statuses to write.
const TICK: Duration = Duration::from_millis(250);
/// Writes in flight at once.
const WRITE_CONCURRENCY: usize = 8;
/// How often every status is recomputed even when nothing seems changed.
const FULL_PASS: Duration = Duration::from_secs(2);

impl StatusWriter {
    /// Runs until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut written: HashMap<String, Written> = HashMap::new();
        // Statuses are recomputed when agents or pools changed since the
        // last pass, and every FULL_PASS regardless (node and resource
        // changes the counters do not see).
        let mut seen = (u64::MAX, u64::MAX);
        let mut last_full = Instant::now();
        // Whether the last pass held a pool back for the interval.
        let mut pending = false;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let counters = (self.agents.changes(), self.desired.revision());
            if counters == seen && !pending && last_full.elapsed() < FULL_PASS {
                continue;
            }
            seen = counters;
            if last_full.elapsed() >= FULL_PASS {
                last_full = Instant::now();
            }
            let (due, held) = self.due(&mut written);
            pending = held;
            let this = &self;
            let results: Vec<_> = futures::stream::iter(due)
                .map(|(key, pool, old, new)| async move {
                    let ok = this.write(&pool, old.as_ref(), &new).await;
                    (key, pool.uid().unwrap_or_default(), new, ok)
                })
                .buffer_unordered(WRITE_CONCURRENCY)
                .collect()
                .await;
            let now = Instant::now();
            for (key, uid, status, ok) in results {
                if ok {
                    written.insert(
                        key,
                        Written {
                            uid,
                            status,
                            at: now,
                        },
                    );
                }
            }
        }
    }

    /// The pools whose status changed and may be written now: (key, pool,
    /// old status, new status).
    /// Also says whether a pool was held back for the interval.
    #[allow(clippy::type_complexity)]
    fn due(
        &self,
        written: &mut HashMap<String, Written>,
    ) -> (
        Vec<(
            String,
            Arc<ConnectionPool>,
            Option<ConnectionPoolStatus>,
            ConnectionPoolStatus,
        )>,
        bool,
    ) {
        let pools = self.pools.state();
        let live: BTreeSet<String> = pools.iter().map(|p| key_of(p)).collect();
        written.retain(|k, _| live.contains(k));
        let nodes: BTreeSet<String> = self.nodes.state().iter().map(|n| n.name_any()).collect();
        self.count_advice(&pools, written);
        let now = Instant::now();
        let mut due = Vec::new();
        let mut held = false;
        for pool in pools {
            let key = key_of(&pool);
            let uid = pool.uid().unwrap_or_default();
            let last = written.get(&key).filter(|w| w.uid == uid);
            if last.is_some_and(|w| now.duration_since(w.at) < self.interval) {
                held = true;
                continue;
            }
            let Some(entry) = self.desired.get(&key) else {
                continue;
            };
            // What was last written by us, else what the resource shows.
            let old = last
                .map(|w| w.status.clone())
                .or_else(|| pool.status.clone());
            let new = self.agents.with(|agents| {
                let local = self.local.get(&key);
                let inputs = Inputs {
                    pool: &pool,
                    entry: Some(&entry),
                    nodes: &nodes,
                    agents,
                    local: local.as_ref(),
                    tuning: &self.tuning,
                };
                compute(
                    &inputs,
                    old.as_ref(),
                    Time(k8s_openapi::jiff::Timestamp::now()),
                )
            });
            if old.as_ref() != Some(&new) {
                due.push((key, pool, old, new));
            }
        }
        (due, held)
    }

    /// Sets `tidepool_operator_pools_by_advice` from the statuses last
    /// written (or, before a write, the resources').
    fn count_advice(&self, pools: &[Arc<ConnectionPool>], written: &HashMap<String, Written>) {
        let mut counts: BTreeMap<&'static str, i64> = ["ok", "differs", "observing", "no_traffic"]
            .map(|s| (s, 0))
            .into();
        for pool in pools {
            let status = written
                .get(&key_of(pool))
                .map(|w| &w.status)
                .or(pool.status.as_ref());
            let state = match find(status, "Tuned").map(|c| c.reason.as_str()) {
                Some(r) if r == Reason::AsAdvised.as_str() => "ok",
                Some(r) if r == Reason::AdviceDiffers.as_str() => "differs",
                Some(r) if r == Reason::NoTraffic.as_str() => "no_traffic",
                _ => "observing",
            };
            *counts.entry(state).or_default() += 1;
        }
        for (state, n) in counts {
            self.metrics
                .pools_by_advice
                .get_or_create(&AdviceLabel { state })
                .set(n);
        }
    }

    async fn write(
        &self,
        pool: &ConnectionPool,
        old: Option<&ConnectionPoolStatus>,
        new: &ConnectionPoolStatus,
    ) -> bool {
        let key = PoolKey::of(pool);
        let (ns, name) = (&key.namespace, &key.name);
        if !self.fence.holds() {
            tracing::debug!(pool = %key, "status not written: this replica's lease is not certain");
            return false;
        }
        let api: Api<ConnectionPool> = Api::namespaced(self.client.clone(), ns);
        let patch = serde_json::json!({
            "apiVersion": "tidepool.dev/v1alpha1",
            "kind": "ConnectionPool",
            "status": new,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api.patch_status(name, &params, &Patch::Apply(&patch)).await {
            Ok(_) => {
                self.metrics.status_writes.inc();
                tracing::debug!(pool = %key, "status written");
            }
            Err(error) => {
                self.metrics.status_write_errors.inc();
                tracing::warn!(pool = %key, %error, "status write failed; retried on the next tick");
                return false;
            }
        }
        let reference = pool.object_ref(&());
        for t in transitions(old, new) {
            if t.reason == Reason::AdviceChanged.as_str() {
                self.metrics.advice_changes.inc();
            } else if t.reason == Reason::Tuned.as_str() {
                self.metrics.tuning_applies.inc();
            }
            let event = Event {
                type_: if t.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: t.reason,
                note: Some(truncate(t.note, 1000)),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(error) = self.recorder.publish(&event, &reference).await {
                tracing::warn!(pool = %key, %error, "publishing an event failed");
            }
        }
        true
    }
}

fn key_of(pool: &ConnectionPool) -> String {
    PoolKey::of(pool).to_string()
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::Agents;
    use crate::desired::Snapshot;
    use crate::resolve::ResolveError;
    use tidepool_crds::control::pb;

    fn pool(generation: i64) -> ConnectionPool {
        let mut p: ConnectionPool = serde_yaml::from_str(
            "apiVersion: tidepool.dev/v1alpha1\nkind: ConnectionPool\nmetadata: {name: p, namespace: ns, uid: u}\nspec:\n  target: {service: {name: api, port: grpc}}\n",
        )
        .unwrap();
        p.metadata.generation = Some(generation);
        p
    }

    fn entry(addresses: &[&str]) -> Entry {
        Entry {
            pool: pb::Pool {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
                generation: 1,
                spec: None,
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
            },
            resolution: Ok(()),
        }
    }

    fn snapshot(version: &str, generation: i64) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            version: version.into(),
            pools: vec![pb::Pool {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
                generation,
                spec: None,
                addresses: vec!["127.0.0.2:1".into(), "127.0.0.3:1".into()],
            }],
            generations: [("ns/p".to_string(), ("u".to_string(), generation))].into(),
            changed_at: Instant::now(),
            deltas: Default::default(),
        })
    }

    fn report(addresses: &[(&str, i64, i64)]) -> pb::Report {
        pb::Report {
            pools: vec![pb::PoolReport {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
                generation: 1,
                addresses: addresses
                    .iter()
                    .map(|(a, conns, streams)| pb::AddressReport {
                        address: a.to_string(),
                        connections: *conns,
                        busy: 0,
                        idle: 0,
                        streams: *streams,
                        overflow: 0,
                        observed: None,
                    })
                    .collect(),
            }],
        }
    }

    /// Connects an agent on `node` that acknowledged `snapshot` and reported.
    fn synced(agents: &Agents, node: &str, snapshot: &Arc<Snapshot>, r: pb::Report) {
        let reg = agents.register(
            node,
            "pod",
            &snapshot.version,
            false,
            Some(Arc::clone(snapshot)),
        );
        agents.report(node, reg.session, r);
    }

    fn cond<'a>(s: &'a ConnectionPoolStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::now())
    }

    /// Reports are the agents' word: an entry with an absurd count
    /// (negative, or past `advice::MAX_COUNT`) is dropped and counted, and
    /// the rest is summed; a pool the node does not run is dropped too.
    #[tokio::test]
    async fn absurd_reported_counts_are_ignored_and_counted_and_the_rest_is_summed() {
        let agents = Agents::default();
        let v1 = snapshot("v1", 1);
        let reg = agents.register("n1", "pod", &v1.version, false, Some(Arc::clone(&v1)));
        let mut r = report(&[
            ("127.0.0.2:1", i64::MAX, i64::MAX),
            ("127.0.0.3:1", 5, -1),
            ("127.0.0.3:1", 5, 2),
        ]);
        let mut stranger = r.pools[0].clone();
        stranger.name = "other".into();
        r.pools.push(stranger);
        let mut ignored: Vec<&str> = agents
            .report("n1", reg.session, r)
            .into_iter()
            .map(crate::agents::Ignored::as_str)
            .collect();
        ignored.sort_unstable();
        assert_eq!(
            ignored,
            [
                "negative",
                "negative",
                "overflow",
                "overflow",
                "unknown_pool"
            ]
        );
        synced(&agents, "n2", &v1, report(&[("127.0.0.2:1", 2, 3)]));
        let nodes: BTreeSet<String> = ["n1", "n2"].map(String::from).into();
        let (p, e) = (pool(1), entry(&["127.0.0.2:1", "127.0.0.3:1"]));
        let s = agents.with(|a| {
            let inputs = Inputs {
                pool: &p,
                entry: Some(&e),
                nodes: &nodes,
                agents: a,
                local: None,
                tuning: &advice::Options::default(),
            };
            compute(&inputs, None, now())
        });
        let t = s.totals.unwrap();
        assert_eq!((t.connections, t.streams), (7, 5));
    }

    fn observed(peak: i64, p95: i64, window: i64) -> pb::Observation {
        pb::Observation {
            window_seconds: window,
            peak_streams: peak,
            p95_streams: p95,
            peak_connections: (peak + 19) / 20,
            server_max_streams: 100,
            ..pb::Observation::default()
        }
    }

    fn observing(r: &mut pb::Report, address: &str, o: pb::Observation) {
        for a in &mut r.pools[0].addresses {
            if a.address == address {
                a.observed = Some(o);
            }
        }
    }

    fn tuned_pool(mode: &str) -> ConnectionPool {
        let mut p = pool(1);
        p.spec.tuning = Some(serde_yaml::from_str(&format!("mode: {mode}")).unwrap());
        p
    }

    /// What the status says of a pool whose agents report `reports`, at
    /// `now`, after `previous`.
    fn advised(
        p: &ConnectionPool,
        reports: Vec<(&str, pb::Report)>,
        previous: Option<&ConnectionPoolStatus>,
        now: Time,
    ) -> ConnectionPoolStatus {
        let agents = Agents::default();
        let v1 = snapshot("v1", 1);
        for (node, r) in reports {
            synced(&agents, node, &v1, r);
        }
        let nodes: BTreeSet<String> = ["n1", "n2"].map(String::from).into();
        let e = entry(&["127.0.0.2:1", "127.0.0.3:1"]);
        agents.with(|a| {
            let inputs = Inputs {
                pool: p,
                entry: Some(&e),
                nodes: &nodes,
                agents: a,
                local: None,
                tuning: &advice::Options {
                    advice_after: Duration::from_secs(60),
                    interval: Duration::from_secs(600),
                },
            };
            compute(&inputs, previous, now)
        })
    }

    #[tokio::test]
    async fn the_advice_takes_the_busiest_address_on_any_node_and_ignores_absurd_observations() {
        let mut r1 = report(&[("127.0.0.2:1", 2, 37), ("127.0.0.3:1", 1, 5)]);
        observing(&mut r1, "127.0.0.2:1", observed(37, 30, 60));
        observing(&mut r1, "127.0.0.3:1", observed(5, 5, 60));
        // Node 2 claims an impossible p95 on the second address: its entry
        // is dropped, and it cannot raise the advice.
        let mut r2 = report(&[("127.0.0.2:1", 1, 10), ("127.0.0.3:1", 9, 9)]);
        observing(&mut r2, "127.0.0.2:1", observed(10, 8, 60));
        observing(&mut r2, "127.0.0.3:1", observed(500, 900, 60));
        let s = advised(&pool(1), vec![("n1", r1), ("n2", r2)], None, now());
        let r = s.recommendation.clone().unwrap();
        assert_eq!(
            (r.size, r.max_idle, r.max_streams),
            (Some(2), Some(1), Some(100))
        );
        assert_eq!(r.summary, "size 100→2, maxIdle 50→1, maxStreams 20→100");
        assert_eq!(r.observed.as_deref(), Some("1m"));
        let c = cond(&s, "Tuned");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "AdviceDiffers")
        );
        assert!(
            c.message.contains("set spec.tuning.mode: Apply"),
            "{}",
            c.message
        );
        assert!(s.tuned.is_none(), "Recommend never tunes");
    }

    #[tokio::test]
    async fn until_enough_is_observed_the_condition_says_how_much() {
        let mut r1 = report(&[("127.0.0.2:1", 2, 37)]);
        observing(&mut r1, "127.0.0.2:1", observed(37, 30, 20));
        let s = advised(&pool(1), vec![("n1", r1)], None, now());
        assert_eq!(
            s.recommendation.clone().unwrap().summary,
            "observing 20s/1m"
        );
        let c = cond(&s, "Tuned");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("Unknown", "Observing")
        );
        // An agent built before observations: nothing to go on.
        let s = advised(
            &pool(1),
            vec![("n1", report(&[("127.0.0.2:1", 2, 37)]))],
            None,
            now(),
        );
        assert_eq!(s.recommendation.unwrap().summary, "observing 0s/1m");
    }

    #[tokio::test]
    async fn apply_runs_the_advice_at_most_once_per_interval_and_keeps_bounds() {
        let mut r1 = report(&[("127.0.0.2:1", 2, 37)]);
        observing(&mut r1, "127.0.0.2:1", observed(37, 30, 60));
        let p = tuned_pool("Apply");
        let t0 = now();
        let first = advised(&p, vec![("n1", r1.clone())], None, t0.clone());
        let tuned = first.tuned.clone().unwrap();
        assert_eq!((tuned.size, tuned.max_idle, tuned.max_streams), (2, 1, 100));
        assert_eq!(first.recommendation.as_ref().unwrap().summary, "ok");
        assert_eq!(cond(&first, "Tuned").status, "True");
        let events: Vec<String> = transitions(None, &first)
            .into_iter()
            .map(|t| t.reason)
            .collect();
        assert!(
            events.contains(&"AdviceChanged".to_string()) && events.contains(&"Tuned".to_string()),
            "{events:?}"
        );
        // Demand grows a minute later: advised at once, applied only a
        // tuning interval after the last apply.
        let mut p = p;
        p.status = Some(first.clone());
        let mut r2 = report(&[("127.0.0.2:1", 5, 370)]);
        observing(&mut r2, "127.0.0.2:1", observed(370, 300, 60));
        let later = |secs: i64| {
            Time(k8s_openapi::jiff::Timestamp::from_second(t0.0.as_second() + secs).unwrap())
        };
        let second = advised(&p, vec![("n1", r2.clone())], Some(&first), later(60));
        assert_eq!(second.tuned, first.tuned, "not yet");
        assert_eq!(
            second.recommendation.as_ref().unwrap().summary,
            "size 2→8, maxIdle 1→4"
        );
        assert!(
            cond(&second, "Tuned")
                .message
                .contains("a tuning interval after the last apply")
        );
        let third = advised(&p, vec![("n1", r2)], Some(&second), later(600));
        assert_eq!(third.tuned.as_ref().map(|t| t.size), Some(8));
        let events: Vec<String> = transitions(Some(&second), &third)
            .into_iter()
            .map(|t| t.note)
            .collect();
        assert!(events.iter().any(|n| n.contains("applied size 8, maxIdle 4, maxStreams 100, whenFull Overflow (size 2→8, maxIdle 1→4)")), "{events:?}");
        // A bound set later holds at once, between applies.
        p.spec.tuning = Some(serde_yaml::from_str("{mode: Apply, size: {max: 6}}").unwrap());
        p.status = Some(third.clone());
        let fourth = advised(&p, vec![("n1", r1)], Some(&third), later(660));
        assert_eq!(
            fourth.tuned.as_ref().map(|t| (t.size, t.max_idle)),
            Some((6, 4))
        );
        // Back to Recommend: the spec's settings run again.
        p.spec.tuning = None;
        assert_eq!(crate::advice::running_spec(&p).size, 100);
    }

    #[tokio::test]
    async fn occupancy_sums_across_nodes_and_ready_needs_every_agent() {
        let agents = Agents::default();
        let v1 = snapshot("v1", 1);
        synced(
            &agents,
            "n1",
            &v1,
            report(&[("127.0.0.2:1", 2, 5), ("127.0.0.3:1", 1, 1)]),
        );
        synced(&agents, "n2", &v1, report(&[("127.0.0.2:1", 1, 3)]));
        let nodes: BTreeSet<String> = ["n1", "n2", "n3"].map(String::from).into();
        let p = pool(1);
        let e = entry(&["127.0.0.2:1", "127.0.0.3:1"]);
        let s = agents.with(|a| {
            compute(
                &Inputs {
                    pool: &p,
                    entry: Some(&e),
                    nodes: &nodes,
                    agents: a,
                    local: None,
                    tuning: &advice::Options::default(),
                },
                None,
                now(),
            )
        });
        assert_eq!(
            s.agents,
            Some(AgentCounts {
                desired: 3,
                synced: 2,
                rejected: 0
            })
        );
        assert_eq!(s.addresses[0].address, "127.0.0.2:1");
        assert_eq!(
            (
                s.addresses[0].connections,
                s.addresses[0].streams,
                s.addresses[0].nodes
            ),
            (3, 8, 2)
        );
        let t = s.totals.clone().unwrap();
        assert_eq!((t.addresses, t.connections, t.streams), (2, 4, 9));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "Ready").reason, "Progressing");
        assert_eq!(
            cond(&s, "Distributed").message,
            "2/3 agents run generation 1"
        );
        assert_eq!(cond(&s, "Ready").observed_generation, Some(1));

        synced(&agents, "n3", &v1, report(&[]));
        let s2 = agents.with(|a| {
            compute(
                &Inputs {
                    pool: &p,
                    entry: Some(&e),
                    nodes: &nodes,
                    agents: a,
                    local: None,
                    tuning: &advice::Options::default(),
                },
                Some(&s),
                now(),
            )
        });
        assert_eq!(cond(&s2, "Ready").status, "True");
        assert_eq!(cond(&s2, "Distributed").status, "True");
        // Degraded stayed False: its transition time is kept.
        assert_eq!(
            cond(&s2, "Degraded").last_transition_time,
            cond(&s, "Degraded").last_transition_time
        );
        assert_eq!(
            transitions(Some(&s), &s2),
            [Transition {
                warning: false,
                reason: "Ready".into(),
                note: "3/3 agents run generation 1 with 2 addresses".into()
            }]
        );
        // Nothing changed: equal statuses, so no write.
        let s3 = agents.with(|a| {
            compute(
                &Inputs {
                    pool: &p,
                    entry: Some(&e),
                    nodes: &nodes,
                    agents: a,
                    local: None,
                    tuning: &advice::Options::default(),
                },
                Some(&s2),
                now(),
            )
        });
        assert_eq!(s2, s3);
    }

    #[test]
    fn the_address_list_is_capped_busiest_first_and_totals_stay_exact() {
        let agents = Agents::default();
        let v1 = snapshot("v1", 1);
        let addrs: Vec<String> = (0..120).map(|i| format!("127.0.1.{i}:1")).collect();
        let rows: Vec<(&str, i64, i64)> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (a.as_str(), 1, i as i64))
            .collect();
        synced(&agents, "n1", &v1, report(&rows));
        let nodes: BTreeSet<String> = ["n1".to_string()].into();
        let p = pool(1);
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let e = entry(&refs);
        let s = agents.with(|a| {
            compute(
                &Inputs {
                    pool: &p,
                    entry: Some(&e),
                    nodes: &nodes,
                    agents: a,
                    local: None,
                    tuning: &advice::Options::default(),
                },
                None,
                now(),
            )
        });
        assert_eq!(s.addresses.len(), MAX_STATUS_ADDRESSES);
        assert_eq!(s.addresses[0].streams, 119);
        let t = s.totals.unwrap();
        assert_eq!(
            (t.addresses, t.connections, t.streams),
            (120, 120, (0..120).sum::<i64>())
        );
    }

    #[test]
    fn a_rejection_degrades_the_pool_naming_the_node() {
        let agents = Agents::default();
        let v1 = snapshot("v1", 1);
        synced(&agents, "n1", &v1, report(&[]));
        let reg = agents.register("n2", "pod", "", false, Some(Arc::clone(&v1)));
        agents.sent("n2", reg.session, Arc::clone(&v1), "x".into());
        agents.answer(
            "n2",
            reg.session,
            "x",
            Some((
                "spec.listenPort 9 of pool ns/p: cannot listen".into(),
                vec!["ns/p".into()],
            )),
        );
        let nodes: BTreeSet<String> = ["n1", "n2"].map(String::from).into();
        let p = pool(1);
        let e = entry(&["127.0.0.2:1"]);
        let s = agents.with(|a| {
            compute(
                &Inputs {
                    pool: &p,
                    entry: Some(&e),
                    nodes: &nodes,
                    agents: a,
                    local: None,
                    tuning: &advice::Options::default(),
                },
                None,
                now(),
            )
        });
        assert_eq!(
            s.agents,
            Some(AgentCounts {
                desired: 2,
                synced: 1,
                rejected: 1
            })
        );
        let d = cond(&s, "Degraded");
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "AgentRejected")
        );
        assert!(
            d.message
                .contains("node n2 rejected generation 1: spec.listenPort 9"),
            "{}",
            d.message
        );
        assert_eq!(cond(&s, "Ready").reason, "AgentRejected");
        let t = transitions(None, &s);
        assert_eq!(t.len(), 1);
        assert!(t[0].warning && t[0].reason == "AgentRejected");
    }

    #[test]
    fn an_unresolved_target_says_why_in_conditions() {
        let agents = Agents::default();
        let nodes: BTreeSet<String> = ["n1".to_string()].into();
        let p = pool(2);
        let mut e = entry(&[]);
        e.resolution = Err(ResolveError::ServiceNotFound {
            namespace: "ns".into(),
            service: "api".into(),
        });
        let s = agents.with(|a| {
            compute(
                &Inputs {
                    pool: &p,
                    entry: Some(&e),
                    nodes: &nodes,
                    agents: a,
                    local: None,
                    tuning: &advice::Options::default(),
                },
                None,
                now(),
            )
        });
        for t in ["Ready", "Degraded"] {
            assert_eq!(cond(&s, t).reason, "ServiceNotFound");
            assert_eq!(cond(&s, t).message, "service ns/api does not exist");
        }
        assert_eq!(cond(&s, "Degraded").status, "True");
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.target.as_deref(), Some("api:grpc"));
    }
}
