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

    /// A mock API server, in the manner of controller-rs's
    /// `ApiServerVerifier`: the test sees each request the lock sends, in
    /// order, and answers it (or never does, as a hung server).
    mod api {
        use axum::http::{Method, Request, Response, StatusCode};
        use kube::client::Body;
        use tokio::sync::{mpsc, oneshot};

        /// One request the lock sent, waiting for its answer.
        pub struct Call {
            pub method: Method,
            pub path: String,
            pub body: serde_json::Value,
            answer: oneshot::Sender<Response<Body>>,
        }

        impl Call {
            /// Answers with `status` and a JSON body.
            pub fn respond(self, status: StatusCode, body: &serde_json::Value) {
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(body).unwrap()))
                    .unwrap();
                let _ = self.answer.send(response);
            }

            /// Answers with `status` and the object the request sent, as
            /// the API server answers a create or an update that succeeds.
            pub fn echo(self, status: StatusCode) {
                let body = self.body.clone();
                self.respond(status, &body);
            }

            /// A Kubernetes error Status with `code` and `reason`.
            pub fn fail(self, code: u16, reason: &str) {
                let status = serde_json::json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": format!("{reason} (mock)"), "reason": reason, "code": code,
                });
                self.respond(StatusCode::from_u16(code).unwrap(), &status);
            }
        }

        /// The server side of a client made by [`client`].
        pub struct Server(mpsc::UnboundedReceiver<Call>);

        impl Server {
            /// The next request; panics when the lock sends none.
            pub async fn next(&mut self) -> Call {
                self.0
                    .recv()
                    .await
                    .expect("the lock sent no further request")
            }

            /// The next request, or `None` once the client is dropped.
            pub async fn recv(&mut self) -> Option<Call> {
                self.0.recv().await
            }

            /// Asserts the lock sends nothing more (its handle is gone).
            pub async fn nothing_more(mut self) {
                if let Some(call) = self.0.recv().await {
                    panic!("unexpected {} {}", call.method, call.path);
                }
            }
        }

        /// A kube client whose every request arrives at the returned server.
        pub fn client() -> (kube::Client, Server) {
            let (calls, rx) = mpsc::unbounded_channel();
            let service = tower::service_fn(move |request: Request<Body>| {
                let calls = calls.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    let bytes = body.collect_bytes().await.expect("a request body");
                    let body = if bytes.is_empty() {
                        serde_json::Value::Null
                    } else {
                        serde_json::from_slice(&bytes).expect("a JSON request body")
                    };
                    let (answer, answered) = oneshot::channel();
                    let call = Call {
                        method: parts.method,
                        path: parts.uri.path().to_owned(),
                        body,
                        answer,
                    };
                    calls.send(call).map_err(|_| "the mock server is gone")?;
                    answered
                        .await
                        .map_err(|_| "the mock server dropped the request")
                }
            });
            (kube::Client::new(service, "default"), Server(rx))
        }
    }

    use axum::http::{Method, StatusCode};
    use serde_json::json;

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/lease";

    fn lease(holder: Option<&str>, version: &str, transitions: i32) -> serde_json::Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "lease", "namespace": "ns", "resourceVersion": version},
            "spec": {
                "holderIdentity": holder, "leaseDurationSeconds": 15,
                "acquireTime": "2026-12-01T10:00:00.000000Z",
                "renewTime": "2026-12-01T10:00:05.000000Z",
                "leaseTransitions": transitions,
            },
        })
    }

    fn lock(client: kube::Client) -> LeaseLock {
        LeaseLock::new(client, "ns", "lease", "me", Duration::from_secs(15))
    }

    #[tokio::test]
    async fn with_no_lease_the_lock_creates_one_naming_itself() {
        let (client, mut server) = api::client();
        let task = tokio::spawn(async move { lock(client).try_acquire().await });
        let get = server.next().await;
        assert_eq!((&get.method, get.path.as_str()), (&Method::GET, PATH));
        get.fail(404, "NotFound");
        let create = server.next().await;
        assert_eq!(create.method, Method::POST);
        assert_eq!(
            create.path,
            "/apis/coordination.k8s.io/v1/namespaces/ns/leases"
        );
        assert_eq!(create.body["metadata"]["name"], "lease");
        assert_eq!(create.body["spec"]["holderIdentity"], "me");
        assert_eq!(create.body["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(create.body["spec"]["leaseTransitions"], 0);
        create.echo(StatusCode::CREATED);
        assert!(task.await.unwrap().unwrap(), "the creator holds the lease");
        server.nothing_more().await;
    }

    #[tokio::test]
    async fn losing_the_create_race_is_not_holding_and_not_an_error() {
        let (client, mut server) = api::client();
        let task = tokio::spawn(async move { lock(client).try_acquire().await });
        server.next().await.fail(404, "NotFound");
        server.next().await.fail(409, "AlreadyExists");
        assert!(!task.await.unwrap().unwrap());
        server.nothing_more().await;
    }

    #[tokio::test(start_paused = true)]
    async fn another_holders_fresh_lease_is_read_never_written() {
        let (client, mut server) = api::client();
        let lock = lock(client);
        let task = tokio::spawn(async move {
            let first = lock.try_acquire().await;
            tokio::time::advance(Duration::from_secs(14)).await;
            (first, lock.try_acquire().await)
        });
        for _ in 0..2 {
            let get = server.next().await;
            assert_eq!(get.method, Method::GET);
            get.respond(StatusCode::OK, &lease(Some("other"), "7", 3));
        }
        let (first, second) = task.await.unwrap();
        assert!(!first.unwrap() && !second.unwrap());
        // Both reads ended the calls: no PUT was sent.
        server.nothing_more().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_unchanged_here_for_its_duration_is_taken_with_its_resource_version() {
        let (client, mut server) = api::client();
        let lock = lock(client);
        let task = tokio::spawn(async move {
            assert!(!lock.try_acquire().await.unwrap(), "first sight");
            tokio::time::advance(Duration::from_secs(15)).await;
            lock.try_acquire().await
        });
        server
            .next()
            .await
            .respond(StatusCode::OK, &lease(Some("other"), "7", 3));
        server
            .next()
            .await
            .respond(StatusCode::OK, &lease(Some("other"), "7", 3));
        let put = server.next().await;
        assert_eq!((&put.method, put.path.as_str()), (&Method::PUT, PATH));
        assert_eq!(
            put.body["metadata"]["resourceVersion"], "7",
            "the update is conditional on the record it judged expired"
        );
        assert_eq!(put.body["spec"]["holderIdentity"], "me");
        assert_eq!(put.body["spec"]["leaseTransitions"], 4);
        assert_ne!(
            put.body["spec"]["acquireTime"], "2026-12-01T10:00:00.000000Z",
            "a new holder's acquireTime is its own"
        );
        put.echo(StatusCode::OK);
        assert!(task.await.unwrap().unwrap());
        server.nothing_more().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_seen_meanwhile_restarts_the_wait_and_a_lost_race_is_a_conflict() {
        let (client, mut server) = api::client();
        let lock = lock(client);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..3 {
                held.push(lock.try_acquire().await.unwrap());
                tokio::time::advance(Duration::from_secs(15)).await;
            }
            held
        });
        // Version 7, then 8 (the holder renewed): not yet expired.
        for version in ["7", "8"] {
            server
                .next()
                .await
                .respond(StatusCode::OK, &lease(Some("other"), version, 3));
        }
        // 8 unchanged for 15 s: the lock tries, and another replica won.
        server
            .next()
            .await
            .respond(StatusCode::OK, &lease(Some("other"), "8", 3));
        let put = server.next().await;
        assert_eq!(put.body["metadata"]["resourceVersion"], "8");
        put.fail(409, "Conflict");
        assert_eq!(task.await.unwrap(), [false, false, false]);
        server.nothing_more().await;
    }

    #[tokio::test]
    async fn a_renewal_keeps_the_acquire_time_and_the_transitions() {
        let (client, mut server) = api::client();
        let task = tokio::spawn(async move { lock(client).try_acquire().await });
        server
            .next()
            .await
            .respond(StatusCode::OK, &lease(Some("me"), "9", 2));
        let put = server.next().await;
        assert_eq!(put.method, Method::PUT);
        assert_eq!(
            put.body["spec"]["acquireTime"],
            "2026-12-01T10:00:00.000000Z"
        );
        assert_eq!(put.body["spec"]["leaseTransitions"], 2);
        assert_ne!(put.body["spec"]["renewTime"], "2026-12-01T10:00:05.000000Z");
        put.echo(StatusCode::OK);
        assert!(task.await.unwrap().unwrap());
        server.nothing_more().await;
    }

    #[tokio::test]
    async fn release_clears_only_a_lease_this_replica_holds() {
        let (client, mut server) = api::client();
        let lock = lock(client);
        let task = tokio::spawn(async move {
            lock.release().await.unwrap();
            lock.release().await.unwrap();
        });
        server
            .next()
            .await
            .respond(StatusCode::OK, &lease(Some("other"), "3", 1));
        server
            .next()
            .await
            .respond(StatusCode::OK, &lease(Some("me"), "4", 1));
        let put = server.next().await;
        assert_eq!(put.method, Method::PUT);
        assert_eq!(put.body["spec"]["holderIdentity"], serde_json::Value::Null);
        assert_eq!(put.body["spec"]["renewTime"], serde_json::Value::Null);
        put.echo(StatusCode::OK);
        task.await.unwrap();
        server.nothing_more().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewals_hang_drops_its_fence_by_the_renew_deadline_and_exits() {
        let (client, mut server) = api::client();
        let (leading, mut led) = watch::channel(false);
        let fence = Fence::closed();
        let stop = CancellationToken::new();
        let begun = Instant::now();
        let run = tokio::spawn(lock(client).run(leading, fence.clone(), stop));
        // It takes the lease.
        server.next().await.fail(404, "NotFound");
        let create = server.next().await;
        create.echo(StatusCode::CREATED);
        led.wait_for(|l| *l).await.unwrap();
        assert!(fence.holds());
        // From now on the API server hangs: every call is left unanswered.
        let mut hung = Vec::new();
        let dropped = loop {
            tokio::select! {
                call = server.recv() => match call {
                    Some(call) => hung.push(call),
                    None => break begun.elapsed(),
                },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if !fence.holds() { break begun.elapsed(); }
                }
            }
        };
        assert!(!fence.holds());
        assert!(
            dropped <= Duration::from_secs(10) + Duration::from_millis(100),
            "the fence holds at most the renew deadline (10 s of 15): {dropped:?}"
        );
        assert!(!hung.is_empty(), "renewals were attempted");
        let error = run.await.unwrap().unwrap_err();
        assert!(matches!(error, LeaderError::Lost { .. }), "{error}");
        assert!(!*led.borrow(), "no longer leading");
        assert!(
            begun.elapsed() < Duration::from_secs(15),
            "it stepped down before any other replica could take the lease: {:?}",
            begun.elapsed()
        );
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
