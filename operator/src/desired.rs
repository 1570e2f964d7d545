//! What every agent should run: the pools as the reconciler resolved them,
//! and the snapshot built from them.
//!
//! Every pool applies to every node (a ConnectionPool has no node
//! selector), so one snapshot serves all nodes; it is built once per change
//! and shared (`Arc`) by every session that sends it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use tidepool_crds::control::{pb, snapshot_version};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::resolve::ResolveError;

/// One pool as the agents should run it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The wire form, with resolved addresses.
    pub pool: pb::Pool,
    /// Why the target has no addresses, when it has none.
    pub resolution: Result<(), ResolveError>,
}

/// A complete configuration for a node, as sent.
///
/// Sent whole or as a [`Delta`] from a snapshot the agent acknowledged;
/// either way this is what the agent runs once it acknowledges.
#[derive(Debug)]
pub struct Snapshot {
    /// A hash of the content ([`snapshot_version`]).
    pub version: String,
    /// The pools, sorted by `namespace/name`.
    pub pools: Vec<pb::Pool>,
    /// `namespace/name` → (uid, generation), to tell what an agent runs.
    pub generations: HashMap<String, (String, i64)>,
    /// When the first change this snapshot carries was made, for the
    /// change-to-ack convergence histogram.
    pub changed_at: Instant,
    /// Deltas to this snapshot already computed, by base version, newest
    /// last (at most `DELTA_CACHE`): agents mostly run the same base, so
    /// one computation serves every session.
    pub deltas: Mutex<Vec<(String, Arc<Delta>)>>,
}

/// How many bases a snapshot keeps computed deltas for.
const DELTA_CACHE: usize = 4;

/// What changed from one snapshot to another: the wire form of an
/// incremental snapshot (`Snapshot.base_version` set).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// Pools added, or whose content (uid, generation, spec, addresses)
    /// changed, sorted by `namespace/name`.
    pub pools: Vec<pb::Pool>,
    /// `namespace/name` of the pools the base has and the new one has not,
    /// sorted.
    pub removed: Vec<String>,
}

impl Delta {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty() && self.removed.is_empty()
    }
}

impl Snapshot {
    /// The snapshot of `pools` (sorted by `namespace/name`).
    pub fn new(pools: Vec<pb::Pool>, changed_at: Instant) -> Self {
        let generations = pools
            .iter()
            .map(|p| (p.key(), (p.uid.clone(), p.generation)))
            .collect();
        Self {
            version: snapshot_version(&pools),
            pools,
            generations,
            changed_at,
            deltas: Mutex::default(),
        }
    }

    /// The pool `key` (`namespace/name`), found by binary search: the
    /// pools are sorted by that text.
    pub fn pool(&self, key: &str) -> Option<&pb::Pool> {
        self.pools
            .binary_search_by(|p| {
                p.namespace
                    .bytes()
                    .chain(std::iter::once(b'/'))
                    .chain(p.name.bytes())
                    .cmp(key.bytes())
            })
            .ok()
            .map(|i| &self.pools[i])
    }

    /// Whether this snapshot runs `key` with this uid at this generation.
    pub fn runs(&self, key: &str, uid: &str, generation: i64) -> bool {
        self.generations
            .get(key)
            .is_some_and(|(u, g)| u == uid && *g == generation)
    }

    /// What an agent that runs `base` needs to run this snapshot: the
    /// pools that differ (compared whole, so any change in uid,
    /// generation, spec or addresses counts) and the pools gone.
    /// Computed once per base and shared.
    pub fn delta_from(&self, base: &Snapshot) -> Arc<Delta> {
        let mut cache = self.deltas.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, d)) = cache.iter().find(|(v, _)| *v == base.version) {
            return Arc::clone(d);
        }
        let old: HashMap<String, &pb::Pool> = base.pools.iter().map(|p| (p.key(), p)).collect();
        let pools = self
            .pools
            .iter()
            .filter(|p| old.get(&p.key()).is_none_or(|o| *o != *p))
            .cloned()
            .collect();
        let mut removed: Vec<String> = old
            .into_keys()
            .filter(|k| !self.generations.contains_key(k))
            .collect();
        removed.sort_unstable();
        let delta = Arc::new(Delta { pools, removed });
        if cache.len() == DELTA_CACHE {
            cache.remove(0);
        }
        cache.push((base.version.clone(), Arc::clone(&delta)));
        delta
    }
}

/// The desired pools and the current snapshot.
///
/// Invariants: `inner` is only held for map operations and snapshot
/// building (no await under it); `revision` is bumped after every change
/// to `pools`, and `snapshot` is `None` exactly when it is stale.
#[derive(Debug)]
pub struct Desired {
    inner: Mutex<Inner>,
    revision: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    pools: BTreeMap<String, Entry>,
    snapshot: Option<Arc<Snapshot>>,
    /// The first change not yet in a snapshot.
    pending_since: Option<Instant>,
}

impl Default for Desired {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            revision: watch::Sender::new(0),
        }
    }
}

impl Desired {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn changed(&self, inner: &mut Inner) {
        inner.snapshot = None;
        inner.pending_since.get_or_insert_with(Instant::now);
        self.revision.send_modify(|r| *r += 1);
    }

    /// Sets a pool. Returns whether anything agents see changed (the
    /// resolution alone is for status).
    pub fn set(&self, key: String, entry: Entry) -> bool {
        let mut inner = self.lock();
        let agents_see_change = inner
            .pools
            .get(&key)
            .is_none_or(|old| old.pool != entry.pool);
        inner.pools.insert(key, entry);
        if agents_see_change {
            self.changed(&mut inner);
        }
        agents_see_change
    }

    /// Removes a pool. Returns whether it was there.
    pub fn remove(&self, key: &str) -> bool {
        let mut inner = self.lock();
        let removed = inner.pools.remove(key).is_some();
        if removed {
            self.changed(&mut inner);
        }
        removed
    }

    /// Removes every pool `keep` says no to (pools deleted while a watch
    /// was interrupted). Returns how many went.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> usize {
        let mut inner = self.lock();
        let before = inner.pools.len();
        inner.pools.retain(|k, _| keep(k));
        let removed = before - inner.pools.len();
        if removed > 0 {
            self.changed(&mut inner);
        }
        removed
    }

    /// A pool's entry.
    pub fn get(&self, key: &str) -> Option<Entry> {
        self.lock().pools.get(key).cloned()
    }

    /// Whether every key has an entry (the first reconcile of each pool
    /// is done).
    pub fn has_all<'a>(&self, keys: impl IntoIterator<Item = &'a String>) -> bool {
        let inner = self.lock();
        keys.into_iter().all(|k| inner.pools.contains_key(k))
    }

    /// How many pools there are.
    pub fn len(&self) -> usize {
        self.lock().pools.len()
    }

    /// Whether there is no pool.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A counter bumped by every change agents would see.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Notified after every change agents would see.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// The snapshot of the current pools, built on first use after a change.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let mut inner = self.lock();
        if let Some(s) = &inner.snapshot {
            return Arc::clone(s);
        }
        let pools: Vec<pb::Pool> = inner.pools.values().map(|e| e.pool.clone()).collect();
        let changed_at = inner.pending_since.take().unwrap_or_else(Instant::now);
        let snapshot = Arc::new(Snapshot::new(pools, changed_at));
        inner.snapshot = Some(Arc::clone(&snapshot));
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, generation: i64, addresses: &[&str]) -> Entry {
        Entry {
            pool: pb::Pool {
                namespace: "ns".into(),
                name: name.into(),
                uid: format!("uid-{name}"),
                generation,
                spec: None,
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
            },
            resolution: Ok(()),
        }
    }

    #[tokio::test]
    async fn snapshots_follow_changes_agents_see_and_only_those() {
        let d = Desired::default();
        let mut rx = d.subscribe();
        assert!(d.set("ns/a".into(), entry("a", 1, &["127.0.0.2:1"])));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        let s1 = d.snapshot();
        assert!(s1.runs("ns/a", "uid-a", 1));
        assert!(!s1.runs("ns/a", "uid-a", 2));
        // The same pool again: no change, the snapshot is shared.
        assert!(!d.set("ns/a".into(), entry("a", 1, &["127.0.0.2:1"])));
        assert!(!rx.has_changed().unwrap());
        assert!(Arc::ptr_eq(&s1, &d.snapshot()));
        // A resolution change alone is not something agents see.
        let mut failed = entry("a", 1, &["127.0.0.2:1"]);
        failed.resolution = Err(ResolveError::ServiceNotFound {
            namespace: "ns".into(),
            service: "x".into(),
        });
        assert!(!d.set("ns/a".into(), failed));
        // New addresses are.
        assert!(d.set("ns/a".into(), entry("a", 1, &["127.0.0.3:1"])));
        let s2 = d.snapshot();
        assert_ne!(s1.version, s2.version);
        assert!(d.remove("ns/a"));
        assert!(!d.remove("ns/a"));
        assert!(d.snapshot().pools.is_empty());
    }

    fn snapshot_of(entries: &[Entry]) -> Snapshot {
        Snapshot::new(
            entries.iter().map(|e| e.pool.clone()).collect(),
            Instant::now(),
        )
    }

    #[test]
    fn a_delta_carries_changed_and_added_pools_and_names_removed_ones() {
        let a1 = entry("a", 1, &["127.0.0.2:1"]);
        let b1 = entry("b", 1, &["127.0.0.2:1"]);
        let c1 = entry("c", 1, &["127.0.0.2:1"]);
        let base = snapshot_of(&[a1.clone(), b1.clone(), c1.clone()]);

        // Unchanged content: nothing to send.
        let same = snapshot_of(&[a1.clone(), b1.clone(), c1.clone()]);
        assert_eq!(same.version, base.version);
        assert!(same.delta_from(&base).is_empty());

        // b's addresses change (same generation), c goes, d comes; a stays.
        let b2 = entry("b", 1, &["127.0.0.3:1"]);
        let d1 = entry("d", 1, &[]);
        let next = snapshot_of(&[a1.clone(), b2.clone(), d1.clone()]);
        let delta = next.delta_from(&base);
        assert_eq!(delta.pools, [b2.pool.clone(), d1.pool.clone()]);
        assert_eq!(delta.removed, ["ns/c"]);
        // Computed once per base and shared.
        assert!(Arc::ptr_eq(&delta, &next.delta_from(&base)));

        // A new generation or uid is a change even with the same addresses.
        let mut a_recreated = a1.clone();
        a_recreated.pool.uid = "uid-a2".into();
        let next = snapshot_of(&[a_recreated.clone(), entry("b", 2, &["127.0.0.2:1"]), c1]);
        let delta = next.delta_from(&base);
        let changed: Vec<_> = delta.pools.iter().map(|p| p.key()).collect();
        assert_eq!(changed, ["ns/a", "ns/b"]);
        assert!(delta.removed.is_empty());

        // Everything gone.
        let empty = snapshot_of(&[]);
        let delta = empty.delta_from(&base);
        assert!(delta.pools.is_empty());
        assert_eq!(delta.removed, ["ns/a", "ns/b", "ns/c"]);
    }

    #[test]
    fn retain_drops_pools_that_are_gone() {
        let d = Desired::default();
        d.set("ns/a".into(), entry("a", 1, &[]));
        d.set("ns/b".into(), entry("b", 1, &[]));
        assert_eq!(d.retain(|k| k == "ns/a"), 1);
        assert!(d.has_all(&["ns/a".to_string()]));
        assert!(!d.has_all(&["ns/b".to_string()]));
    }
}
