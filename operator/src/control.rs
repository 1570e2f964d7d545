//! The control stream's server side: one bidirectional gRPC stream per
//! agent (`tidepool.control.v1.Control/Session`).
//!
//! A session starts with the agent's Hello, checked before anything is
//! registered: a first message that is not a Hello, an empty or unknown
//! node, or a replica that is not the leader ends the stream with a status
//! that says so, and nothing else is touched. Afterwards two halves run
//! until either ends: the writer sends what the registry queues for the
//! node (holding a fan-out permit while it does), the reader records Acks,
//! Nacks and Reports. A malformed message ends that session only.
//!
//! With an [`Authenticator`] (always, outside in-process tests), the
//! stream's bearer token is reviewed after the Hello is read, and the Hello
//! must claim the token's node ([`crate::auth`]); a session then lasts no
//! longer than its token, and the agent redials with the refreshed one
//! (naming the version it runs, so nothing is resent).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{ObjectRef, Store};
use tidepool_crds::control::pb;
use tidepool_crds::control::pb::agent_message::Kind;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::agents::{Agents, Answer};
use crate::auth::{Authenticator, Identity, Lookup, Refusal};
use crate::desired::Desired;
use crate::metrics::{IgnoredLabel, Metrics};

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC service agents connect to.
#[derive(Clone)]
pub struct ControlService {
    /// The connected agents.
    pub agents: Arc<Agents>,
    /// What they should run.
    pub desired: Arc<Desired>,
    /// The nodes that should run agents; a Hello from any other is refused.
    pub nodes: Store<Node>,
    /// Whether this replica leads.
    pub leading: watch::Receiver<bool>,
    /// Whether every pool has been reconciled once (before, nothing is
    /// sent: a partial snapshot would remove pools from agents).
    pub initialized: watch::Receiver<bool>,
    /// Each node's pod map, for `spec.clients`.
    pub clients: Arc<crate::clients::NodeClients>,
    /// Bounds how many sessions write a snapshot at once.
    pub fanout: Arc<Semaphore>,
    /// Metrics.
    pub metrics: Metrics,
    /// Ends every session.
    pub stop: CancellationToken,
    /// Checks each stream's token; `None` accepts any (in-process tests
    /// and `--insecure-control` only).
    pub auth: Option<Arc<Authenticator>>,
    /// The longest a session lasts even when its token lives longer.
    pub max_session: Option<Duration>,
    /// Whether this replica may act as the leader right now (checked before
    /// a session is accepted and before each snapshot it sends).
    pub fence: crate::leader::Fence,
}

impl std::fmt::Debug for ControlService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlService").finish_non_exhaustive()
    }
}

fn kind_name(kind: &Option<Kind>) -> &'static str {
    match kind {
        Some(Kind::Hello(_)) => "Hello",
        Some(Kind::Ack(_)) => "Ack",
        Some(Kind::Nack(_)) => "Nack",
        Some(Kind::Report(_)) => "Report",
        None => "an empty message",
    }
}

/// Checks the first message of a control stream: it must be a Hello that
/// names a node. Whether the node is served and the token matches it are
/// checked later, by the session.
pub fn check_hello(first: pb::AgentMessage) -> Result<pb::Hello, Status> {
    let hello = match first.kind {
        Some(Kind::Hello(h)) => h,
        other => {
            return Err(Status::invalid_argument(format!(
                "the first message on a control stream must be a Hello; got {}",
                kind_name(&other)
            )));
        }
    };
    if hello.node.is_empty() {
        return Err(Status::invalid_argument(
            "Hello.node is empty; set it to the agent's node name (NODE_NAME)",
        ));
    }
    Ok(hello)
}

/// Records one message an agent sent after its Hello on session `session`
/// of `node`: an Ack or a Nack answers the snapshot last sent, a Report
/// replaces the node's occupancy. A second Hello, or a message with no
/// kind, breaks the protocol: the error is the status the session ends
/// with.
pub fn receive(
    agents: &Agents,
    metrics: &Metrics,
    node: &str,
    session: u64,
    message: pb::AgentMessage,
) -> Result<(), Status> {
    match message.kind {
        Some(Kind::Ack(ack)) => match agents.answer(node, session, &ack.nonce, None) {
            Answer::Acked {
                push_to_ack,
                change_to_ack,
            } => {
                metrics.push_to_ack.observe(push_to_ack.as_secs_f64());
                metrics.change_to_ack.observe(change_to_ack.as_secs_f64());
                tracing::debug!(%node, version = %ack.version, ?push_to_ack, "snapshot acknowledged");
            }
            _ => tracing::debug!(%node, nonce = %ack.nonce, "stale ack ignored"),
        },
        Some(Kind::Nack(nack)) => {
            let answer = agents.answer(
                node,
                session,
                &nack.nonce,
                Some((nack.error.clone(), nack.pools)),
            );
            match answer {
                Answer::Nacked => {
                    metrics.nacks.inc();
                    tracing::warn!(%node, version = %nack.version, error = %nack.error, "agent rejected a snapshot; it keeps its last good one");
                }
                Answer::DeltaNacked { resent } => {
                    metrics.delta_nacks.inc();
                    tracing::info!(%node, version = %nack.version, error = %nack.error, resent, "agent refused a delta; sending whole");
                }
                Answer::Acked { .. } | Answer::Stale => {}
            }
        }
        Some(Kind::Report(report)) => {
            metrics.reports.inc();
            for ignored in agents.report(node, session, report) {
                metrics
                    .report_values_ignored
                    .get_or_create(&IgnoredLabel {
                        reason: ignored.as_str(),
                    })
                    .inc();
            }
        }
        other @ (Some(Kind::Hello(_)) | None) => {
            return Err(Status::invalid_argument(format!(
                "{} is not allowed after the Hello; send Ack, Nack or Report",
                kind_name(&other)
            )));
        }
    }
    Ok(())
}

impl ControlService {
    /// Reads and checks the Hello.
    async fn hello(&self, inbound: &mut Streaming<pb::AgentMessage>) -> Result<pb::Hello, Status> {
        if !*self.leading.borrow() || !self.fence.holds() {
            return Err(Status::unavailable(
                "this operator replica is not the leader; retry (the Service routes to the leader)",
            ));
        }
        let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "no Hello within {HELLO_TIMEOUT:?} of opening the control stream"
                )));
            }
            Ok(Err(status)) => {
                return Err(Status::invalid_argument(format!(
                    "the control stream's first message could not be read: {}",
                    status.message()
                )));
            }
            Ok(Ok(None)) => {
                return Err(Status::cancelled(
                    "the control stream ended before its Hello",
                ));
            }
            Ok(Ok(Some(m))) => m,
        };
        check_hello(first)
    }

    /// Checks that the Hello's node is one this operator serves (after the
    /// token, so an unauthenticated client learns nothing about nodes).
    fn served(&self, hello: &pb::Hello) -> Result<(), Status> {
        if self.nodes.get(&ObjectRef::new(&hello.node)).is_none() {
            return Err(Status::not_found(format!(
                "node {:?} is not a node this operator serves: no Node of that name matches its node selector",
                hello.node
            )));
        }
        Ok(())
    }
}

impl ControlService {
    /// Counts, logs and answers an authentication refusal. The log names
    /// the peer, the claimed node and pod, never the token.
    fn refuse_auth(
        &self,
        refusal: &Refusal,
        peer: &str,
        node: &str,
        pod: &str,
        auth: &Authenticator,
    ) -> Status {
        self.metrics.refused_streams.inc();
        self.metrics
            .auth_refusals
            .get_or_create(&crate::metrics::AuthRefusalLabel {
                reason: refusal.reason(),
            })
            .inc();
        let status = refusal.status();
        tracing::warn!(
            %peer,
            claimed_node = node,
            claimed_pod = pod,
            reason = refusal.reason().as_str(),
            audience = %auth.config().audience,
            code = ?status.code(),
            message = status.message(),
            "control stream refused: authentication"
        );
        status
    }

    /// How long a session may last: until its token expires (less a random
    /// part of up to a tenth, at most 30 s, so agents whose tokens were
    /// minted together do not all redial at once), and no longer than
    /// `max_session`.
    fn lifetime(&self, identity: Option<&Identity>) -> Option<Duration> {
        let token = identity.and_then(|i| i.remaining(std::time::SystemTime::now()));
        let cap = match (token, self.max_session) {
            (Some(t), Some(m)) => t.min(m),
            (t, m) => t.or(m)?,
        };
        let spread = (cap / 10).min(Duration::from_secs(30));
        Some(cap.saturating_sub(spread.mul_f64(rand::random::<f64>())))
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::OperatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let metadata = request.metadata().clone();
        let mut inbound = request.into_inner();
        // A stream without a well-formed token is refused for that first,
        // whatever it sends after.
        if let Some(auth) = &self.auth
            && let Err(refusal) = crate::auth::bearer(&metadata)
        {
            return Err(self.refuse_auth(&refusal, &peer, "", "", auth));
        }
        let hello = match self.hello(&mut inbound).await {
            Ok(h) => h,
            Err(status) => {
                self.metrics.refused_streams.inc();
                tracing::warn!(%peer, code = ?status.code(), message = status.message(), "control stream refused");
                return Err(status);
            }
        };
        let identity = match &self.auth {
            Some(auth) => {
                let checked = auth
                    .authenticate(&metadata)
                    .await
                    .and_then(|(id, lookup)| id.check_node(&hello.node).map(|()| (id, lookup)));
                match checked {
                    Ok((id, lookup)) => {
                        match lookup {
                            Lookup::Cached => self.metrics.token_review_cache_hits.inc(),
                            Lookup::Reviewed => self.metrics.token_reviews.inc(),
                        };
                        Some(id)
                    }
                    Err(refusal) => {
                        if !matches!(refusal, Refusal::ReviewFailed(_)) {
                            self.metrics.token_reviews.inc();
                        }
                        return Err(self.refuse_auth(
                            &refusal,
                            &peer,
                            &hello.node,
                            &hello.pod,
                            auth,
                        ));
                    }
                }
            }
            None => None,
        };
        if let Err(status) = self.served(&hello) {
            self.metrics.refused_streams.inc();
            tracing::warn!(%peer, node = %hello.node, code = ?status.code(), message = status.message(), "control stream refused");
            return Err(status);
        }
        let pod = identity
            .as_ref()
            .map_or(hello.pod.as_str(), |i| i.pod.as_str());
        let current = self.initialized.borrow().then(|| self.desired.snapshot());
        let reg = self
            .agents
            .register(&hello.node, pod, &hello.version, hello.deltas, current);
        self.metrics.connected_agents.set(self.agents.len() as i64);
        tracing::info!(
            node = %hello.node,
            pod,
            %peer,
            credential = identity.as_ref().map_or("", |i| i.credential.as_str()),
            running = %hello.version,
            agent = %hello.agent_version,
            deltas = hello.deltas,
            replaced = reg.replaced,
            "agent connected"
        );
        if !hello.clients {
            tracing::warn!(
                node = %hello.node,
                agent = %hello.agent_version,
                "this agent predates spec.clients: on its node, pools with a client list serve every client until the agent is upgraded"
            );
        }
        let (tx, rx) = mpsc::channel(4);
        let session = Session {
            service: self.clone(),
            node: hello.node,
            id: reg.session,
            lifetime: self.lifetime(identity.as_ref()),
        };
        let span = tracing::info_span!("session", node = %session.node, session = session.id);
        tokio::spawn(session.run(inbound, reg.outbox, tx).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One agent's stream after its Hello.
struct Session {
    service: ControlService,
    node: String,
    id: u64,
    /// When the session ends on its own (token expiry).
    lifetime: Option<Duration>,
}

impl Session {
    async fn run(
        self,
        mut inbound: Streaming<pb::AgentMessage>,
        outbox: watch::Receiver<Option<Arc<crate::desired::Snapshot>>>,
        tx: mpsc::Sender<Result<pb::OperatorMessage, Status>>,
    ) {
        // The node's pod map goes ahead of the first snapshot, so pools with
        // spec.clients do not refuse clients for want of it.
        let mut maps = self.service.clients.subscribe(&self.node);
        crate::clients::send_current(&mut maps, &tx, &self.service.metrics).await;
        let expiry = async {
            match self.lifetime {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let reason = tokio::select! {
            r = self.write(outbox, tx.clone()) => r,
            r = crate::clients::write(maps, tx.clone(), self.service.metrics.clone()) => r,
            _ = expiry => {
                self.service.metrics.sessions_expired.inc();
                let _ = tx
                    .send(Err(Status::unauthenticated(
                        "the session's token has expired: reconnect with the refreshed token (this is routine)",
                    )))
                    .await;
                "its token expired"
            }
            r = self.read(&mut inbound) => {
                if let Err(status) = &r.1 {
                    let _ = tx.send(Err(status.clone())).await;
                }
                r.0
            }
            _ = self.service.stop.cancelled() => "the operator is stopping",
        };
        let agents = &self.service.agents;
        agents.unregister(&self.node, self.id);
        self.service
            .metrics
            .connected_agents
            .set(agents.len() as i64);
        tracing::info!(node = %self.node, reason, "agent disconnected");
    }

    /// Sends queued snapshots until the session is replaced or the stream
    /// is gone.
    async fn write(
        &self,
        mut outbox: watch::Receiver<Option<Arc<crate::desired::Snapshot>>>,
        tx: mpsc::Sender<Result<pb::OperatorMessage, Status>>,
    ) -> &'static str {
        loop {
            if outbox.changed().await.is_err() {
                return "replaced by a newer session of the node";
            }
            let Some(snapshot) = outbox.borrow_and_update().clone() else {
                continue;
            };
            let Ok(_permit) = self.service.fanout.acquire().await else {
                return "the operator is stopping";
            };
            // A replica whose lease is no longer certain (a frozen leader
            // that just woke) sends nothing: its successor may lead.
            if !self.service.fence.holds() {
                return "this replica's leader lease is no longer certain";
            }
            let nonce = format!("{:016x}", rand::random::<u64>());
            // Recorded first: a fast agent may answer before `send` returns.
            // The registry says whether it can go as a delta.
            let base =
                self.service
                    .agents
                    .sent(&self.node, self.id, Arc::clone(&snapshot), nonce.clone());
            let wire = match &base {
                Some(base) => {
                    let delta = snapshot.delta_from(base);
                    pb::Snapshot {
                        version: snapshot.version.clone(),
                        nonce,
                        pools: delta.pools.clone(),
                        base_version: base.version.clone(),
                        removed: delta.removed.clone(),
                    }
                }
                None => pb::Snapshot {
                    version: snapshot.version.clone(),
                    nonce,
                    pools: snapshot.pools.clone(),
                    base_version: String::new(),
                    removed: Vec::new(),
                },
            };
            let (pools, removed) = (wire.pools.len(), wire.removed.len());
            let message = pb::OperatorMessage {
                kind: Some(pb::operator_message::Kind::Snapshot(wire)),
            };
            if tx.send(Ok(message)).await.is_err() {
                return "the stream closed";
            }
            self.service.metrics.snapshots_sent.inc();
            if base.is_some() {
                self.service.metrics.deltas_sent.inc();
            }
            tracing::debug!(
                node = %self.node,
                version = %snapshot.version,
                base = base.as_ref().map_or("", |b| b.version.as_str()),
                pools,
                removed,
                "snapshot sent"
            );
        }
    }

    /// Records the agent's messages until it closes the stream or breaks
    /// the protocol.
    async fn read(
        &self,
        inbound: &mut Streaming<pb::AgentMessage>,
    ) -> (&'static str, Result<(), Status>) {
        let agents = &self.service.agents;
        let metrics = &self.service.metrics;
        loop {
            let message = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return ("the agent closed the stream", Ok(())),
                Err(status) => {
                    tracing::warn!(node = %self.node, error = %status.message(), "unreadable message on a control stream");
                    return (
                        "an unreadable message",
                        Err(Status::invalid_argument(format!(
                            "a message on the control stream of node {} could not be read: {}",
                            self.node,
                            status.message()
                        ))),
                    );
                }
            };
            if let Err(status) = receive(agents, metrics, &self.node, self.id, message) {
                return ("a protocol violation", Err(status));
            }
        }
    }
}
