//! The agents connected to this operator and what each runs, has been sent,
//! has refused and has reported.
//!
//! Keyed by node: one agent per node. A second session for a node (an agent
//! that restarted before its old stream was noticed dead) replaces the
//! first, whose writer then ends.
//!
//! The registry also decides how each snapshot goes on the wire
//! ([`Agents::sent`]): as a delta from the snapshot the agent acknowledged
//! when that is safe, whole otherwise. Whatever the wire form, `sent`,
//! `applied` and `rejected` hold whole snapshots: what the agent would run.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tidepool_crds::control::pb;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::advice::{Absurd, Observed, count};
use crate::desired::Snapshot;

/// A snapshot sent and not yet answered.
#[derive(Debug, Clone)]
pub struct Sent {
    /// What was sent.
    pub snapshot: Arc<Snapshot>,
    /// The nonce it was sent with.
    pub nonce: String,
    /// When.
    pub at: Instant,
    /// The version it was a delta from; `None` when it was sent whole.
    pub base: Option<String>,
}

/// A snapshot an agent refused.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// What was refused.
    pub snapshot: Arc<Snapshot>,
    /// The agent's error.
    pub error: String,
    /// The pools the error is about; empty means all of the snapshot.
    pub pools: Vec<String>,
}

impl Rejected {
    /// Whether the rejection is about `key` at this uid and generation.
    pub fn blames(&self, key: &str, uid: &str, generation: i64) -> bool {
        self.snapshot.runs(key, uid, generation)
            && (self.pools.is_empty() || self.pools.iter().any(|p| p == key))
    }
}

/// One connected agent.
#[derive(Debug)]
pub struct Agent {
    /// Which session of the node this is.
    pub session: u64,
    /// The agent's pod.
    pub pod: String,
    /// The version the agent said it runs when it connected.
    running: String,
    /// Whether the agent understands deltas (its Hello said so).
    deltas: bool,
    /// Whether the next send must be whole: the agent refused a delta.
    full_next: bool,
    /// The session's writer sends what is put here.
    outbox: watch::Sender<Option<Arc<Snapshot>>>,
    /// The version last put in the outbox.
    queued: Option<String>,
    /// The last snapshot the agent acknowledged: what it runs.
    pub applied: Option<Arc<Snapshot>>,
    /// The last snapshot sent and not yet answered.
    pub sent: Option<Sent>,
    /// The last snapshot it refused, until it acknowledges a later one.
    pub rejected: Option<Rejected>,
    /// Its latest report, by pool `namespace/name`.
    pub reports: HashMap<Arc<str>, StoredReport>,
}

impl Agent {
    fn wants(&self, snapshot: &Snapshot) -> bool {
        let v = &snapshot.version;
        self.queued.as_ref() != Some(v)
            && self.applied.as_ref().is_none_or(|a| &a.version != v)
            && self
                .rejected
                .as_ref()
                .is_none_or(|r| &r.snapshot.version != v)
    }
}

/// One pool's occupancy on one node, kept compactly: names are interned,
/// so 500 agents reporting the same 200 pools share their strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReport {
    /// The pool's uid as the agent runs it.
    pub uid: Arc<str>,
    /// The generation it runs.
    pub generation: i64,
    /// Per address.
    pub addresses: Box<[AddressUsage]>,
}

/// One address's occupancy on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressUsage {
    /// `host:port`.
    pub address: Arc<str>,
    /// Pooled connections.
    pub connections: i64,
    /// Pooled connections at max streams.
    pub busy: i64,
    /// Pooled connections with no stream.
    pub idle: i64,
    /// Streams in use.
    pub streams: i64,
    /// Open overflow connections.
    pub overflow: i64,
    /// What the agent observed of the address over its window, checked;
    /// `None` from an agent built before observations, and for an address
    /// the pool does not resolve on the node.
    pub observed: Option<Observed>,
}

/// Why part of a report was ignored: the `reason` label of
/// `tidepool_operator_report_values_ignored_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ignored {
    /// A value was absurd; the address's entry was dropped.
    Absurd(Absurd),
    /// A pool the node does not run (or another uid of it); dropped.
    UnknownPool,
    /// An address the pool does not resolve on the node, such as a
    /// removed one still draining: its occupancy is kept, its observation
    /// is not used for advice.
    UnknownAddress,
}

impl Ignored {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Absurd(a) => a.as_str(),
            Self::UnknownPool => "unknown_pool",
            Self::UnknownAddress => "unknown_address",
        }
    }
}

/// An address's entry, checked: every occupancy count in range and the
/// observation sane. `Err` says why the entry is dropped.
fn address_usage(a: pb::AddressReport, address: Arc<str>) -> Result<AddressUsage, Absurd> {
    for n in [a.connections, a.busy, a.idle, a.streams, a.overflow] {
        count(n)?;
    }
    Ok(AddressUsage {
        address,
        connections: a.connections,
        busy: a.busy,
        idle: a.idle,
        streams: a.streams,
        overflow: a.overflow,
        observed: a.observed.as_ref().map(Observed::from_pb).transpose()?,
    })
}

/// Shared strings for reports. Entries nobody else holds are dropped every
/// [`PRUNE_EVERY`] reports, so names of deleted pools and removed addresses
/// do not pile up.
#[derive(Debug, Default)]
struct Interner {
    set: HashSet<Arc<str>>,
    reports: u64,
}

/// How many reports pass between two prunings of the interner.
const PRUNE_EVERY: u64 = 4096;

impl Interner {
    fn get(&mut self, s: String) -> Arc<str> {
        if let Some(a) = self.set.get(s.as_str()) {
            return Arc::clone(a);
        }
        let a: Arc<str> = s.into();
        self.set.insert(Arc::clone(&a));
        a
    }

    /// The report, stored; entries with absurd values are dropped and
    /// named in `ignored`.
    fn store(
        &mut self,
        report: pb::Report,
        ignored: &mut Vec<Ignored>,
    ) -> HashMap<Arc<str>, StoredReport> {
        self.reports += 1;
        if self.reports.is_multiple_of(PRUNE_EVERY) {
            self.set.retain(|a| Arc::strong_count(a) > 1);
        }
        let mut out = HashMap::with_capacity(report.pools.len());
        for p in report.pools {
            let key = self.get(p.key());
            let mut addresses = Vec::with_capacity(p.addresses.len());
            for a in p.addresses {
                let address = self.get(a.address.clone());
                match address_usage(a, address) {
                    Ok(usage) => addresses.push(usage),
                    Err(absurd) => ignored.push(Ignored::Absurd(absurd)),
                }
            }
            let stored = StoredReport {
                uid: self.get(p.uid),
                generation: p.generation,
                addresses: addresses.into_boxed_slice(),
            };
            out.insert(key, stored);
        }
        out
    }
}

/// What a session is given when it registers.
#[derive(Debug)]
pub struct Registration {
    /// The session's id, for every later call.
    pub session: u64,
    /// Snapshots to send.
    pub outbox: watch::Receiver<Option<Arc<Snapshot>>>,
    /// Whether an older session of the node was replaced.
    pub replaced: bool,
}

/// An answer to a snapshot, as the registry understood it.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A delta refused: not recorded as a rejection; the next send is
    /// whole, and when the refused version is still the one queued it is
    /// queued again (`resent`).
    DeltaNacked {
        /// Whether the same version was queued again, to go whole.
        resent: bool,
    },
    /// Acknowledged: how long after the send, and after the change.
    Acked {
        /// Send to ack.
        push_to_ack: Duration,
        /// First change in the snapshot to ack.
        change_to_ack: Duration,
    },
    /// Refused.
    Nacked,
    /// For a nonce that is not the latest sent: ignored.
    Stale,
}

/// Every connected agent.
#[derive(Debug, Default)]
pub struct Agents {
    inner: Mutex<Inner>,
    /// Taken before `inner`, never while holding it.
    interner: Mutex<Interner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_node: HashMap<String, Agent>,
    next_session: u64,
    /// Bumped on every change a status could show.
    changes: u64,
}

impl Agents {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a session for `node`. `running` is the version the agent
    /// says it runs; when it equals `current`'s, the agent counts as having
    /// acknowledged `current` and nothing is sent; otherwise `current` is
    /// queued for it. `current` is `None` until the operator knows every
    /// pool (nothing is sent before: a partial snapshot would remove pools).
    /// `deltas`: the agent understands delta snapshots.
    pub fn register(
        &self,
        node: &str,
        pod: &str,
        running: &str,
        deltas: bool,
        current: Option<Arc<Snapshot>>,
    ) -> Registration {
        let mut inner = self.lock();
        inner.next_session += 1;
        let session = inner.next_session;
        let (outbox, rx) = watch::channel(None);
        let mut agent = Agent {
            session,
            pod: pod.into(),
            running: running.into(),
            deltas,
            full_next: false,
            outbox,
            queued: None,
            applied: None,
            sent: None,
            rejected: None,
            reports: HashMap::new(),
        };
        if let Some(current) = current {
            if !running.is_empty() && current.version == running {
                agent.applied = Some(current);
            } else {
                agent.queued = Some(current.version.clone());
                agent.outbox.send_replace(Some(current));
            }
        }
        let replaced = inner.by_node.insert(node.into(), agent).is_some();
        inner.changes += 1;
        Registration {
            session,
            outbox: rx,
            replaced,
        }
    }

    /// Removes a session, if it is still the node's.
    pub fn unregister(&self, node: &str, session: u64) -> bool {
        let mut inner = self.lock();
        if inner
            .by_node
            .get(node)
            .is_some_and(|a| a.session == session)
        {
            inner.by_node.remove(node);
            inner.changes += 1;
            true
        } else {
            false
        }
    }

    /// Whether `session` is still the node's current one.
    pub fn is_current(&self, node: &str, session: u64) -> bool {
        self.lock()
            .by_node
            .get(node)
            .is_some_and(|a| a.session == session)
    }

    /// Queues `snapshot` for every agent that neither runs it, has it
    /// queued, nor refused it. Returns how many it was queued for.
    pub fn offer(&self, snapshot: &Arc<Snapshot>) -> usize {
        let mut inner = self.lock();
        let mut n = 0;
        for agent in inner.by_node.values_mut() {
            if agent.applied.is_none()
                && !agent.running.is_empty()
                && agent.running == snapshot.version
            {
                // Connected before the operator knew every pool, and runs
                // this very snapshot already.
                agent.applied = Some(Arc::clone(snapshot));
                continue;
            }
            if agent.wants(snapshot) {
                agent.queued = Some(snapshot.version.clone());
                agent.outbox.send_replace(Some(Arc::clone(snapshot)));
                n += 1;
            }
        }
        n
    }

    /// Records that a session's writer sends `snapshot` with `nonce`, and
    /// decides its wire form: returns the snapshot to send it as a delta
    /// from, or `None` to send it whole.
    ///
    /// A delta only when it is safe: the agent understands deltas, we know
    /// what it runs (`applied`: acknowledged on this session, or the
    /// current snapshot its Hello named) and that differs from this one,
    /// nothing sent is unanswered (else it may run either), and it has not
    /// just refused a delta.
    pub fn sent(
        &self,
        node: &str,
        session: u64,
        snapshot: Arc<Snapshot>,
        nonce: String,
    ) -> Option<Arc<Snapshot>> {
        let mut inner = self.lock();
        let agent = inner
            .by_node
            .get_mut(node)
            .filter(|a| a.session == session)?;
        let base = agent
            .applied
            .as_ref()
            .filter(|a| {
                agent.deltas
                    && !agent.full_next
                    && agent.sent.is_none()
                    && a.version != snapshot.version
            })
            .cloned();
        agent.full_next = false;
        agent.sent = Some(Sent {
            snapshot,
            nonce,
            at: Instant::now(),
            base: base.as_ref().map(|b| b.version.clone()),
        });
        base
    }

    /// Records an Ack or a Nack (`error` set) for `nonce`.
    pub fn answer(
        &self,
        node: &str,
        session: u64,
        nonce: &str,
        error: Option<(String, Vec<String>)>,
    ) -> Answer {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(agent) = inner.by_node.get_mut(node).filter(|a| a.session == session) else {
            return Answer::Stale;
        };
        inner.changes += 1;
        let Some(sent) = agent.sent.take_if(|s| s.nonce == nonce) else {
            return Answer::Stale;
        };
        match error {
            None => {
                let answer = Answer::Acked {
                    push_to_ack: sent.at.elapsed(),
                    change_to_ack: sent.snapshot.changed_at.elapsed(),
                };
                agent.applied = Some(sent.snapshot);
                agent.rejected = None;
                answer
            }
            Some(_) if sent.base.is_some() => {
                // The agent may run something else than we think (or the
                // delta exposed a bug): the same version goes again whole,
                // and only a refusal of that is recorded.
                agent.full_next = true;
                let resent = agent.queued.as_ref() == Some(&sent.snapshot.version);
                if resent {
                    agent.outbox.send_replace(Some(sent.snapshot));
                }
                Answer::DeltaNacked { resent }
            }
            Some((error, pools)) => {
                agent.rejected = Some(Rejected {
                    snapshot: sent.snapshot,
                    error,
                    pools,
                });
                Answer::Nacked
            }
        }
    }

    /// Stores a session's report, replacing the last, and says what of
    /// it was ignored: entries with absurd values, pools the node does not
    /// run (checked against what it acknowledged or was last sent), and
    /// the observations of addresses the pool does not resolve there.
    pub fn report(&self, node: &str, session: u64, report: pb::Report) -> Vec<Ignored> {
        // Converted before the registry is locked: sessions' answers and the
        // status writer do not wait for it.
        let mut ignored = Vec::new();
        let mut reports = self
            .interner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .store(report, &mut ignored);
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(agent) = inner.by_node.get_mut(node).filter(|a| a.session == session) else {
            return ignored;
        };
        let runs = |key: &str| {
            [
                agent.applied.as_deref(),
                agent.sent.as_ref().map(|s| &*s.snapshot),
            ]
            .into_iter()
            .flatten()
            .find_map(|snapshot| snapshot.pool(key))
        };
        reports.retain(|key, report| {
            let Some(pool) = runs(key).filter(|p| *p.uid == *report.uid) else {
                ignored.push(Ignored::UnknownPool);
                return false;
            };
            for a in &mut report.addresses {
                if a.observed.is_some() && !pool.addresses.iter().any(|r| *r == *a.address) {
                    a.observed = None;
                    ignored.push(Ignored::UnknownAddress);
                }
            }
            true
        });
        if reports != agent.reports {
            agent.reports = reports;
            inner.changes += 1;
        }
        ignored
    }

    /// A counter bumped by every change a status could show (sessions,
    /// answers, reports that differ from the last).
    pub fn changes(&self) -> u64 {
        self.lock().changes
    }

    /// How many agents are connected.
    pub fn len(&self) -> usize {
        self.lock().by_node.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` over the agents by node, under the registry's lock (keep it
    /// short; never await in it).
    pub fn with<R>(&self, f: impl FnOnce(&HashMap<String, Agent>) -> R) -> R {
        f(&self.lock().by_node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(version: &str, generation: i64) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            version: version.into(),
            pools: vec![],
            generations: [("ns/p".to_string(), ("u".to_string(), generation))].into(),
            changed_at: Instant::now(),
            deltas: Mutex::default(),
        })
    }

    /// A snapshot with real pools `ns/<name>` at these generations.
    fn pools(of: &[(&str, i64)]) -> Arc<Snapshot> {
        let pools = of
            .iter()
            .map(|(name, generation)| pb::Pool {
                namespace: "ns".into(),
                name: (*name).into(),
                generation: *generation,
                ..Default::default()
            })
            .collect();
        Arc::new(Snapshot::new(pools, Instant::now()))
    }

    /// Takes what the outbox holds and records it sent with `nonce`;
    /// returns the base it goes as a delta from, if any.
    fn send(
        agents: &Agents,
        reg: &mut Registration,
        nonce: &str,
    ) -> (Arc<Snapshot>, Option<Arc<Snapshot>>) {
        let s = reg
            .outbox
            .borrow_and_update()
            .clone()
            .expect("something queued");
        let base = agents.sent("n1", reg.session, Arc::clone(&s), nonce.into());
        (s, base)
    }

    #[test]
    fn deltas_go_only_on_an_acknowledged_base_with_nothing_unanswered() {
        let agents = Agents::default();
        let v1 = pools(&[("a", 1), ("b", 1)]);
        let mut reg = agents.register("n1", "pod", "", true, Some(Arc::clone(&v1)));
        // Nothing acknowledged yet: whole.
        let (_, base) = send(&agents, &mut reg, "1");
        assert!(base.is_none());
        assert!(matches!(
            agents.answer("n1", reg.session, "1", None),
            Answer::Acked { .. }
        ));

        // v1 acknowledged: v2 goes as a delta from it.
        let v2 = pools(&[("a", 2), ("b", 1)]);
        assert_eq!(agents.offer(&v2), 1);
        let (sent, base) = send(&agents, &mut reg, "2");
        assert_eq!(sent.version, v2.version);
        assert_eq!(base.unwrap().version, v1.version);
        // v3 before v2 is answered: the agent may run v1 or v2, so whole.
        let v3 = pools(&[("a", 3), ("b", 1)]);
        assert_eq!(agents.offer(&v3), 1);
        let (_, base) = send(&agents, &mut reg, "3");
        assert!(base.is_none(), "an unanswered send forces a whole one");
        // The registry still knows the whole snapshot the agent runs.
        assert!(matches!(
            agents.answer("n1", reg.session, "3", None),
            Answer::Acked { .. }
        ));
        agents.with(|a| assert_eq!(a["n1"].applied.as_ref().unwrap().version, v3.version));

        // An agent that did not say it understands deltas gets whole ones.
        let mut old = agents.register("n2", "pod", &v3.version, false, Some(Arc::clone(&v3)));
        assert!(old.outbox.borrow_and_update().is_none(), "runs v3 already");
        let v4 = pools(&[("a", 4)]);
        assert_eq!(agents.offer(&v4), 2);
        let s = old.outbox.borrow_and_update().clone().unwrap();
        assert!(agents.sent("n2", old.session, s, "x".into()).is_none());
    }

    #[test]
    fn a_refused_delta_is_resent_whole_once_then_recorded() {
        let agents = Agents::default();
        let v1 = pools(&[("a", 1)]);
        let mut reg = agents.register("n1", "pod", &v1.version, true, Some(Arc::clone(&v1)));
        let v2 = pools(&[("a", 2)]);
        agents.offer(&v2);
        let (_, base) = send(&agents, &mut reg, "d");
        assert!(base.is_some(), "the agent said it runs v1: a delta");
        assert_eq!(
            agents.answer("n1", reg.session, "d", Some(("base".into(), vec![]))),
            Answer::DeltaNacked { resent: true }
        );
        // Not a rejection (yet); the same version is queued again, whole.
        agents.with(|a| assert!(a["n1"].rejected.is_none()));
        assert!(reg.outbox.has_changed().unwrap());
        let (again, base) = send(&agents, &mut reg, "f");
        assert_eq!(again.version, v2.version);
        assert!(base.is_none(), "the resend is whole");
        assert_eq!(
            agents.answer("n1", reg.session, "f", Some(("bad".into(), vec![]))),
            Answer::Nacked
        );
        agents.with(|a| {
            assert_eq!(
                a["n1"].rejected.as_ref().unwrap().snapshot.version,
                v2.version
            );
            assert_eq!(a["n1"].applied.as_ref().unwrap().version, v1.version);
        });
        // Not sent a third time; a later version goes as a delta again.
        assert_eq!(agents.offer(&v2), 0);
        assert!(!reg.outbox.has_changed().unwrap());
        let v3 = pools(&[("a", 3)]);
        assert_eq!(agents.offer(&v3), 1);
        let (_, base) = send(&agents, &mut reg, "g");
        assert_eq!(base.unwrap().version, v1.version);
        // A refused delta with something newer queued: that goes (whole).
        let v4 = pools(&[("a", 4)]);
        assert_eq!(agents.offer(&v4), 1);
        assert_eq!(
            agents.answer("n1", reg.session, "g", Some(("base".into(), vec![]))),
            Answer::DeltaNacked { resent: false }
        );
        let (next, base) = send(&agents, &mut reg, "h");
        assert_eq!(next.version, v4.version);
        assert!(base.is_none());
    }

    #[tokio::test]
    async fn a_snapshot_is_sent_once_and_a_refused_one_not_again() {
        let agents = Agents::default();
        let v1 = snapshot("v1", 1);
        let mut reg = agents.register("n1", "pod", "", false, Some(Arc::clone(&v1)));
        assert_eq!(
            reg.outbox.borrow_and_update().as_ref().unwrap().version,
            "v1"
        );
        // Queued already: offering it again sends nothing.
        assert_eq!(agents.offer(&v1), 0);
        agents.sent("n1", reg.session, Arc::clone(&v1), "a".into());
        assert!(matches!(
            agents.answer("n1", reg.session, "a", None),
            Answer::Acked { .. }
        ));
        assert!(agents.with(|a| a["n1"].applied.as_ref().unwrap().runs("ns/p", "u", 1)));

        let v2 = snapshot("v2", 2);
        assert_eq!(agents.offer(&v2), 1);
        agents.sent("n1", reg.session, Arc::clone(&v2), "b".into());
        // An answer to an older nonce is ignored.
        assert_eq!(agents.answer("n1", reg.session, "a", None), Answer::Stale);
        assert_eq!(
            agents.answer("n1", reg.session, "b", Some(("bad".into(), vec![]))),
            Answer::Nacked
        );
        agents.with(|a| {
            let n1 = &a["n1"];
            assert!(n1.rejected.as_ref().unwrap().blames("ns/p", "u", 2));
            // Still on the last good one.
            assert_eq!(n1.applied.as_ref().unwrap().version, "v1");
        });
        // The refused version is not resent; a later one is.
        assert_eq!(agents.offer(&v2), 0);
        assert_eq!(agents.offer(&snapshot("v3", 3)), 1);
    }

    #[test]
    fn an_agent_that_runs_the_current_version_is_synced_without_a_send() {
        let agents = Agents::default();
        let v1 = snapshot("v1", 1);
        let mut reg = agents.register("n1", "pod", "v1", false, Some(Arc::clone(&v1)));
        assert!(reg.outbox.borrow_and_update().is_none());
        assert_eq!(agents.offer(&v1), 0);
        // Also when it connected before the first snapshot was built.
        let mut reg = agents.register("n2", "pod", "v1", false, None);
        assert_eq!(agents.offer(&v1), 0);
        assert!(reg.outbox.borrow_and_update().is_none());
        assert!(agents.with(|a| a["n2"].applied.is_some()));
    }

    #[test]
    fn a_new_session_replaces_the_old_one() {
        let agents = Agents::default();
        let old = agents.register("n1", "pod-a", "", false, None);
        let new = agents.register("n1", "pod-b", "", false, None);
        assert!(new.replaced);
        assert!(!agents.is_current("n1", old.session));
        // The old session ending does not remove the new one.
        assert!(!agents.unregister("n1", old.session));
        assert_eq!(agents.len(), 1);
        assert!(agents.unregister("n1", new.session));
        assert!(agents.is_empty());
    }

    #[test]
    fn blame_is_per_pool_when_the_agent_names_pools() {
        let r = Rejected {
            snapshot: snapshot("v", 1),
            error: "e".into(),
            pools: vec!["ns/other".into()],
        };
        assert!(!r.blames("ns/p", "u", 1));
        let r = Rejected { pools: vec![], ..r };
        assert!(r.blames("ns/p", "u", 1));
        assert!(!r.blames("ns/p", "u", 2));
    }
}
