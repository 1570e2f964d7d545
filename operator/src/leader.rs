//! Leader election on a `coordination.k8s.io/v1` Lease, so running more
//! than one replica is safe.
//!
//! Only the leader serves agents and writes status; the others wait, warm
//! (their reflectors run), refuse control streams with UNAVAILABLE and
//! report not ready, so a Service routes agents to the leader. A leader
//! that cannot renew within the lease duration steps down by exiting: the
//! process restarts clean instead of carrying state from its reign. On a
//! normal stop the lease is released, so a successor takes over at once.
//!
//! Updates use the Lease's resourceVersion (optimistic concurrency): two
//! replicas racing for an expired lease cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why leadership ended other than by a stop.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The lease could not be renewed in time.
    #[error("lost the leader lease {namespace}/{name}: not renewed within {duration:?}")]
    Lost {
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// The lease duration.
        duration: Duration,
    },
}

/// One replica's view of the Lease.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    duration: Duration,
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

/// Whether a lease held by someone else may be taken at `now`.
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
        lease.spec = Some(if mine {
            self.spec(spec.acquire_time.clone(), transitions)
        } else if expired(&spec, Timestamp::now(), self.duration) {
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
        stop: CancellationToken,
    ) -> Result<(), LeaderError> {
        let renew_every = self.duration / 3;
        let retry_every = self.retry_every();
        let mut last_renew: Option<tokio::time::Instant> = None;
        loop {
            let held = match self.try_acquire().await {
                Ok(held) => held,
                Err(error) => {
                    tracing::warn!(lease = %self.name, %error, "leader lease request failed");
                    false
                }
            };
            if held {
                if !*leading.borrow() {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                }
                last_renew = Some(tokio::time::Instant::now());
                leading.send_replace(true);
            } else if let Some(at) = last_renew
                && at.elapsed() >= self.duration
            {
                leading.send_replace(false);
                return Err(LeaderError::Lost {
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                    duration: self.duration,
                });
            }
            let wait = if held { renew_every } else { retry_every };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            if let Err(error) = self.release().await {
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
