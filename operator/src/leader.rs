//! Leader election on a `coordination.k8s.io/v1` Lease, so running more
//! than one replica is safe.
//!
//! Only the leader serves agents and writes status; the others wait, warm
//! (their reflectors run), refuse control streams with UNAVAILABLE and
//! report not ready, so a Service routes agents to the leader. On a normal
//! stop the lease is released, so a successor takes over at once.
//!
//! # Fencing: two leaders never act at once
//!
//! - **Every lease call has a timeout** (a third of the lease duration at
//!   most): kube's client has no read timeout, and a hung call must not
//!   keep a replica believing it leads.
//! - **A renew deadline shorter than the lease** (two thirds of it): a
//!   leader that has not renewed by then stops acting, then exits (the
//!   process restarts clean rather than carry state from its reign).
//! - **A [`Fence`]** every writer checks before it acts (status writes,
//!   snapshot sends, new sessions): it holds only until the last successful
//!   renewal's start plus the renew deadline, by this process's monotonic
//!   clock. A leader frozen (SIGSTOP, a long GC-like stall, a hung node)
//!   finds its fence expired the moment it runs again, before its election
//!   loop has even noticed, so it writes and pushes nothing.
//! - **Expiry is judged by local observation**, as client-go does: a
//!   replica takes a lease held by another only after it has seen the same
//!   record (its resourceVersion) unchanged for a full lease duration by its
//!   own clock, never by comparing the holder's `renewTime` with its own
//!   wall clock, so clock skew between nodes cannot shorten a lease.
//!
//! A leader's fence ends at most `renew deadline` after its last renewal
//! began; a successor needs a full lease duration after it last saw that
//! renewal land. The margin is the lease duration less the renew deadline.
//!
//! Updates use the Lease's resourceVersion (optimistic concurrency): two
//! replicas racing for an expired lease cannot both win.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Until when this replica may act as the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// No election: a single replica always may.
    Always,
    /// Not (or no longer) the leader.
    Never,
    /// The leader, until then (last renewal's start + renew deadline).
    At(Instant),
}

/// Whether this replica may act as the leader now: checked by every writer
/// just before it writes (see the module's "Fencing").
#[derive(Debug, Clone)]
pub struct Fence(Arc<Mutex<Until>>);

impl Fence {
    /// A fence that always holds (no leader election).
    pub fn always() -> Self {
        Self(Arc::new(Mutex::new(Until::Always)))
    }

    /// A fence that holds only once a lease is renewed.
    pub fn closed() -> Self {
        Self(Arc::new(Mutex::new(Until::Never)))
    }

    fn set(&self, until: Until) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = until;
    }

    /// Whether this replica may act as the leader at this instant.
    pub fn holds(&self) -> bool {
        match *self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            Until::Always => true,
            Until::Never => false,
            Until::At(t) => Instant::now() < t,
        }
    }
}

/// Why leadership ended other than by a stop.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The lease could not be renewed in time.
    #[error(
        "lost the leader lease {namespace}/{name}: not renewed within the renew deadline {duration:?}; stepped down"
    )]
    Lost {
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// The lease duration.
        duration: Duration,
    },
}

/// A lease record held by another replica, and when this one first saw
/// it.
#[derive(Debug, Clone)]
struct Observed {
    /// The Lease's resourceVersion: any renewal changes it.
    version: String,
    /// When this replica first saw that version.
    at: Instant,
}

/// One replica's view of the Lease.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
    /// The other holder's record, as first seen here.
    observed: Arc<Mutex<Option<Observed>>>,
}

impl std::fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Whether a lease held by someone else may be taken at `now` by the
/// times it records (a person's view, for `kubectl`-like tools; the
/// election itself judges by local observation, [`LeaseLock`]).
pub fn expired(spec: &LeaseSpec, now: Timestamp, default: Duration) -> bool {
    if spec.holder_identity.as_deref().is_none_or(str::is_empty) {
        return true;
    }
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let secs = spec
        .lease_duration_seconds
        .map_or(default.as_secs_f64(), f64::from);
    renewed.0 + SignedDuration::from_secs_f64(secs) < now
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    /// A lock on Lease `namespace/name` for replica `identity`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: Arc::default(),
        }
    }

    /// The renew deadline: a leader that has not renewed for this long
    /// stops acting (two thirds of the lease duration).
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// The limit of one lease call.
    fn call_timeout(&self) -> Duration {
        (self.duration / 3).max(Duration::from_millis(100))
    }

    /// Whether the record `version` held by another may be taken: only
    /// after this replica has seen it unchanged for a lease duration.
    fn observed_expired(&self, version: &str, lease_duration: Duration) -> bool {
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match observed.as_ref() {
            Some(o) if o.version == version => now.duration_since(o.at) >= lease_duration,
            _ => {
                *observed = Some(Observed {
                    version: version.into(),
                    at: now,
                });
                false
            }
        }
    }

    fn spec(&self, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Takes or renews the lease once. `Ok(true)` when this replica holds
    /// it afterwards.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let transitions = spec.lease_transitions.unwrap_or(0);
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        let lease_duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.duration, Duration::from_secs);
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        lease.spec = Some(if mine {
            self.spec(spec.acquire_time.clone(), transitions)
        } else if free || self.observed_expired(&version, lease_duration) {
            self.spec(None, transitions + 1)
        } else {
            return Ok(false);
        });
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up if this replica holds it.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }

    /// How often a replica that does not hold the lease tries to take it.
    pub fn retry_every(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(200))
    }

    /// Campaigns for and holds the lease until `stop`, publishing whether
    /// this replica leads on `leading`. Returns an error when a held lease
    /// was lost; releases it on stop.
    pub async fn run(
        self,
        leading: watch::Sender<bool>,
        fence: Fence,
        stop: CancellationToken,
    ) -> Result<(), LeaderError> {
        let renew_every = self.duration / 3;
        let retry_every = self.retry_every();
        let deadline = self.renew_deadline();
        let mut last_renew: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let held = match tokio::time::timeout(self.call_timeout(), self.try_acquire()).await {
                Ok(Ok(held)) => held,
                Ok(Err(error)) => {
                    tracing::warn!(lease = %self.name, %error, "leader lease request failed");
                    false
                }
                Err(_) => {
                    tracing::warn!(lease = %self.name, timeout = ?self.call_timeout(), "leader lease request timed out");
                    false
                }
            };
            if held {
                if !*leading.borrow() {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                }
                // The fence runs from when the renewal was sent: it landed
                // no earlier than that.
                last_renew = Some(started);
                fence.set(Until::At(started + deadline));
                leading.send_replace(true);
            } else if let Some(at) = last_renew
                && at.elapsed() >= deadline
            {
                fence.set(Until::Never);
                leading.send_replace(false);
                return Err(LeaderError::Lost {
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                    duration: deadline,
                });
            }
            let wait = if held { renew_every } else { retry_every };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if *leading.borrow() {
            fence.set(Until::Never);
            leading.send_replace(false);
            let released = tokio::time::timeout(self.call_timeout(), self.release()).await;
            if let Err(error) = released.unwrap_or_else(|_| {
                Err(kube::Error::Service("the release request timed out".into()))
            }) {
                tracing::warn!(lease = %self.name, %error, "releasing the leader lease failed");
            } else {
                tracing::info!(lease = %self.name, "leader lease released");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_fence_holds_until_its_deadline_and_a_frozen_leader_finds_it_gone() {
        let fence = Fence::closed();
        assert!(!fence.holds());
        fence.set(Until::At(Instant::now() + Duration::from_secs(10)));
        assert!(fence.holds());
        // A freeze longer than the deadline: on waking, nothing holds.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!fence.holds());
        assert!(Fence::always().holds());
    }

    #[tokio::test(start_paused = true)]
    async fn another_holders_lease_expires_only_after_a_duration_unchanged_here() {
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap()))
                .unwrap();
        let lock = LeaseLock::new(client, "ns", "lease", "me", Duration::from_secs(15));
        let d = Duration::from_secs(15);
        assert!(
            !lock.observed_expired("1", d),
            "first sight starts the clock"
        );
        tokio::time::advance(Duration::from_secs(14)).await;
        assert!(!lock.observed_expired("1", d));
        // A renewal (a new resourceVersion) restarts it, whatever the
        // holder's clock wrote in renewTime.
        assert!(!lock.observed_expired("2", d));
        tokio::time::advance(Duration::from_secs(14)).await;
        assert!(!lock.observed_expired("2", d));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(lock.observed_expired("2", d));
        assert!(lock.renew_deadline() < d);
    }

    #[test]
    fn a_lease_expires_after_its_duration_from_the_last_renewal() {
        let now = Timestamp::now();
        let spec = |holder: Option<&str>, renewed_secs_ago: i64| LeaseSpec {
            holder_identity: holder.map(String::from),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            ..LeaseSpec::default()
        };
        let d = Duration::from_secs(15);
        assert!(!expired(&spec(Some("a"), 5), now, d));
        assert!(expired(&spec(Some("a"), 16), now, d));
        assert!(expired(&spec(None, 0), now, d));
        assert!(expired(&spec(Some(""), 0), now, d));
    }
}
