//! The control client: the agent's side of the control stream to the
//! operator (`tidepool.control.v1.Control/Session`).
//!
//! The agent dials the operator, says Hello (its node, pod, the version it
//! runs, and that it understands deltas), then applies every Snapshot whole
//! and answers it: Ack when [`Apply::apply`] took it, Nack with the error
//! when it refused it (the last good configuration keeps running: nothing
//! is half-applied). A delta snapshot is merged into the pools of the
//! version it names as its base first, and refused when the agent runs
//! another; the merged set is then validated and applied like a full one. It
//! reports occupancy every second when it changed, and every
//! `report_interval` regardless. When the stream breaks or the operator is
//! unreachable, the agent keeps serving what it has and redials with
//! exponential backoff and jitter.
//!
//! The stream runs over TLS, verified against the operator's CA bundle
//! (a file the chart mounts from the operator's ConfigMap) for a fixed
//! server name, and carries the agent's projected ServiceAccount token as
//! `authorization: Bearer …`. Both files are read again at every dial, so a
//! refreshed token or a rolled CA needs no restart; the token is sent only
//! after the operator's certificate is verified, so a fake operator never
//! sees it.
//!
//! The protocol logic is generic over [`Apply`], implemented by the
//! [`Runtime`]; tests and the operator benchmark drive it with simpler
//! appliers.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tidepool_crds::control::pb;
use tidepool_crds::control::pb::control_client::ControlClient;
use tidepool_crds::control::{ProtocolError, spec_from_pb};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::config::PoolConfig;
use crate::pool::Observation;
use crate::runtime::{ApplyError, PoolReport, Runtime};

/// What the control client drives: the agent's running configuration.
pub trait Apply: Send + Sync + 'static {
    /// Replaces the configuration with `pools`, all or nothing. The pools
    /// are shared with the client's own record of them, so a delta's
    /// unchanged pools are not copied to be applied.
    fn apply(&self, pools: Vec<Arc<PoolConfig>>) -> Result<(), Rejection>;
    /// Every pool's occupancy.
    fn report(&self) -> Vec<pb::PoolReport>;
    /// A number that changes whenever [`Apply::report`] would return
    /// something different, for appliers that can tell without building
    /// the report; `None` (the default) has the client build and compare
    /// the report at every check.
    fn report_version(&self) -> Option<u64> {
        None
    }
    /// Replaces the pod map `spec.clients` is checked against
    /// ([`crate::clients`]). The default ignores it.
    fn set_clients(&self, _map: crate::clients::ClientMap) {}
}

/// The last report sent on a session.
struct LastReport {
    pools: Vec<pb::PoolReport>,
    at: Instant,
    /// [`Apply::report_version`] when it was built.
    version: Option<u64>,
}

/// Why a snapshot was refused, as a Nack carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// What was wrong, naming the pool and the field.
    pub error: String,
    /// The pools (`namespace/name`) at fault; empty when unknown.
    pub pools: Vec<String>,
}

impl From<&ApplyError> for Rejection {
    fn from(e: &ApplyError) -> Self {
        let pool = match e {
            ApplyError::Invalid { pool, .. }
            | ApplyError::Settings { pool, .. }
            | ApplyError::Address { pool, .. }
            | ApplyError::Duplicate { pool }
            | ApplyError::PortClash { pool, .. }
            | ApplyError::Bind { pool, .. } => pool.clone(),
        };
        Self {
            error: e.to_string(),
            pools: vec![pool],
        }
    }
}

impl Apply for Runtime {
    fn apply(&self, pools: Vec<Arc<PoolConfig>>) -> Result<(), Rejection> {
        Runtime::apply(self, pools).map_err(|e| Rejection::from(&e))
    }

    fn report(&self) -> Vec<pb::PoolReport> {
        Runtime::report(self)
            .into_iter()
            .map(report_to_pb)
            .collect()
    }

    fn set_clients(&self, map: crate::clients::ClientMap) {
        Runtime::set_clients(self, map);
    }
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn total(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The wire form of an address's observation (`Observation` in
/// control.proto): durations in whole seconds and milliseconds, a server
/// limit of "none" as 0.
pub fn observation_to_pb(o: &Observation) -> pb::Observation {
    pb::Observation {
        window_seconds: total(o.window.as_secs()),
        peak_streams: count(o.peak_streams),
        p95_streams: count(o.p95_streams),
        peak_connections: count(o.peak_connections),
        waits: total(o.waits),
        wait_millis: i64::try_from(o.wait_time.as_millis()).unwrap_or(i64::MAX),
        wait_timeouts: total(o.wait_timeouts),
        overflow_dials: total(o.overflow_dials),
        dials: total(o.dials),
        dial_failures: total(o.dial_failures),
        closes: Some(pb::Closes {
            ttl: total(o.closes.ttl),
            idle: total(o.closes.idle),
            goaway: total(o.closes.goaway),
            failure: total(o.closes.failure),
            other: total(o.closes.other),
        }),
        server_max_streams: o.server_max_streams.map_or(0, i64::from),
    }
}

/// The wire form of a pool's report.
pub fn report_to_pb(r: PoolReport) -> pb::PoolReport {
    pb::PoolReport {
        namespace: r.namespace,
        name: r.name,
        uid: r.uid,
        generation: r.generation,
        addresses: r
            .addresses
            .into_iter()
            .map(|a| pb::AddressReport {
                address: a.address,
                connections: count(a.connections),
                busy: count(a.busy),
                idle: count(a.idle),
                streams: count(a.streams),
                overflow: count(a.overflow),
                observed: Some(observation_to_pb(&a.observed)),
            })
            .collect(),
    }
}

/// How the client proves who it is (defined with the flags that fill it).
pub use crate::config::ClientSecurity;

/// Where and how the client connects.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// The operator's control URL, such as `https://tidepool-operator:15010`.
    pub operator: String,
    /// TLS and the token; `None` dials plain text and sends no token
    /// (`--insecure-control`, for tests).
    pub security: Option<ClientSecurity>,
    /// The node the agent runs on.
    pub node: String,
    /// The agent's pod name.
    pub pod: String,
    /// A report is sent at least this often.
    pub report_interval: Duration,
    /// How often the occupancy is checked for a change worth a report.
    pub report_check: Duration,
    /// The first redial delay; doubles per failure up to `backoff_max`.
    pub backoff_min: Duration,
    /// The longest redial delay.
    pub backoff_max: Duration,
    /// Limit for dialing the operator.
    pub connect_timeout: Duration,
}

impl ControlOptions {
    /// Options with the defaults for `operator`, `node` and `pod`.
    pub fn new(
        operator: impl Into<String>,
        node: impl Into<String>,
        pod: impl Into<String>,
    ) -> Self {
        Self {
            operator: operator.into(),
            security: None,
            node: node.into(),
            pod: pod.into(),
            report_interval: Duration::from_secs(5),
            report_check: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a session with the operator ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The operator URL is not a URL.
    #[error(
        "the operator address {url:?} is not a valid URL such as http://tidepool-operator:15010: {source}"
    )]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it is invalid.
        #[source]
        source: tonic::transport::Error,
    },
    /// The CA bundle is not there (yet) or unreadable.
    #[error(
        "waiting for the operator's CA bundle at {}: {reason} (the chart mounts the operator's ConfigMap <release>-control-ca there; the operator fills it at its first start)",
        .path.display()
    )]
    WaitingForCa {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The token file is not there or unreadable.
    #[error(
        "cannot read the agent's token at {}: {reason} (the chart projects the ServiceAccount token there)",
        .path.display()
    )]
    Token {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS settings could not be applied.
    #[error("the TLS settings for {url} are unusable: {source}")]
    Tls {
        /// The URL.
        url: String,
        /// What failed.
        #[source]
        source: tonic::transport::Error,
    },
    /// The operator could not be reached (the cause is spelled out: a
    /// refused connection, or TLS: `UnknownIssuer` for a certificate from
    /// another CA, `NotValidForName` for another name).
    #[error("dialing the operator at {url} failed: {}", chain(.source))]
    Connect {
        /// The URL.
        url: String,
        /// What failed.
        #[source]
        source: tonic::transport::Error,
    },
    /// The operator refused the stream (unknown node, not the leader, …).
    #[error("the operator refused the control stream: {:?}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    /// The stream failed after it was accepted.
    #[error("the control stream failed: {:?}: {}", .0.code(), .0.message())]
    Stream(tonic::Status),
    /// The operator ended the stream.
    #[error("the operator closed the control stream")]
    Closed,
}

impl ControlError {
    /// Whether this is the routine end of a session at its token's expiry
    /// (logged at info, not as a warning).
    pub fn is_token_expiry(&self) -> bool {
        matches!(self, Self::Stream(s) | Self::Refused(s)
            if s.code() == tonic::Code::Unauthenticated && s.message().contains("token has expired: reconnect"))
    }
}

/// An error and its causes, `: `-separated (tonic's transport error alone
/// says only "transport error").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// Reads a file the kubelet keeps up to date, refusing an empty one.
fn read_fresh(path: &std::path::Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().is_empty() => Err("the file is empty".into()),
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("no such file yet".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The TLS settings and the `authorization` value for one dial.
fn credentials(
    security: &ClientSecurity,
) -> Result<(ClientTlsConfig, MetadataValue<tonic::metadata::Ascii>), ControlError> {
    let bundle = read_fresh(&security.ca_file).map_err(|reason| ControlError::WaitingForCa {
        path: security.ca_file.clone(),
        reason,
    })?;
    if !bundle.contains("-----BEGIN CERTIFICATE-----") {
        return Err(ControlError::WaitingForCa {
            path: security.ca_file.clone(),
            reason: "no PEM certificate in it".into(),
        });
    }
    let token = read_fresh(&security.token_file).map_err(|reason| ControlError::Token {
        path: security.token_file.clone(),
        reason,
    })?;
    let mut value = MetadataValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| {
        ControlError::Token {
            path: security.token_file.clone(),
            reason: "the token is not printable ASCII".into(),
        }
    })?;
    value.set_sensitive(true);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle))
        .domain_name(security.server_name.clone());
    Ok((tls, value))
}

/// What the client keeps across sessions: the configuration in force, the
/// base of the next delta.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ClientState {
    /// The version of the snapshot in force ("" before the first).
    pub version: String,
    /// Its pools, by `namespace/name`.
    pub pools: BTreeMap<String, Arc<PoolConfig>>,
}

/// Takes a `NodeClients` from the control stream: converts it and hands it
/// to `applier` whole. Entries whose IP does not parse are left out (their
/// clients are then unknown, so refused) and logged.
pub fn receive_clients<A: Apply>(applier: &A, message: pb::NodeClients) {
    let (map, skipped) = crate::clients::ClientMap::from_pb(message);
    if !skipped.is_empty() {
        tracing::warn!(version = %map.version, ?skipped, "pod map entries with an IP that does not parse were left out");
    }
    // Debug: with pods coming and going this is frequent; the size is the
    // metric tidepool_clients_pods, the map itself on /clients.
    tracing::debug!(version = %map.version, pods = map.len(), "pod map applied");
    applier.set_clients(map);
}

/// A pool of a snapshot, converted; a pool the agent cannot read is refused.
fn config_from_pb(p: pb::Pool) -> Result<PoolConfig, ProtocolError> {
    let key = p.key();
    let spec = p
        .spec
        .ok_or_else(|| ProtocolError::MissingSpec { pool: key.clone() })?;
    Ok(PoolConfig {
        spec: spec_from_pb(&key, spec)?,
        namespace: p.namespace,
        name: p.name,
        uid: p.uid,
        generation: p.generation,
        addresses: p.addresses,
    })
}

/// What a snapshot asks for once read.
struct Merged {
    /// The whole set of pools to apply, sorted by namespace and name.
    all: Vec<Arc<PoolConfig>>,
    /// What [`ClientState::pools`] gains once `all` is applied: every pool
    /// of a full snapshot, a delta's added or changed ones.
    new: Vec<Arc<PoolConfig>>,
}

/// The whole set of pools a snapshot describes: a full snapshot's own
/// pools, or a delta merged into `state` (its pools replace or join the
/// running ones, `removed` ones go). Checks the delta's base and shape
/// only; the result is validated by the applier like any full snapshot
/// (duplicates in a delta stay in, for it to refuse).
fn merge(
    state: &ClientState,
    version: &str,
    base: &str,
    pools: Vec<pb::Pool>,
    removed: &[String],
) -> Result<Merged, ProtocolError> {
    let changed = pools
        .into_iter()
        .map(|p| config_from_pb(p).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    if base.is_empty() {
        if let Some(pool) = removed.first() {
            return Err(ProtocolError::RemovedInFull {
                pool: pool.clone(),
                version: version.into(),
            });
        }
        // Kept twice: applied, and remembered as the next delta's base.
        return Ok(Merged {
            all: changed.clone(),
            new: changed,
        });
    }
    if base != state.version {
        return Err(ProtocolError::BaseMismatch {
            version: version.into(),
            base: base.into(),
            running: state.version.clone(),
        });
    }
    let mut dropped: HashSet<&str> = HashSet::with_capacity(removed.len() + changed.len());
    for pool in removed {
        if !state.pools.contains_key(pool) {
            return Err(ProtocolError::RemovedUnknown {
                pool: pool.clone(),
                version: version.into(),
                base: base.into(),
            });
        }
        dropped.insert(pool);
    }
    let changed_keys: Vec<String> = changed.iter().map(|p| p.key()).collect();
    if let Some(pool) = changed_keys.iter().find(|k| dropped.contains(k.as_str())) {
        return Err(ProtocolError::ChangedAndRemoved {
            pool: pool.clone(),
            version: version.into(),
        });
    }
    dropped.extend(changed_keys.iter().map(String::as_str));
    let mut all: Vec<Arc<PoolConfig>> = state
        .pools
        .iter()
        .filter(|(k, _)| !dropped.contains(k.as_str()))
        .map(|(_, p)| Arc::clone(p))
        .chain(changed.iter().cloned())
        .collect();
    all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(Merged { all, new: changed })
}

/// Applies one snapshot, full or delta, and says how to answer it. Every
/// pool it carries is converted first, and a delta merged into the running
/// pools; a pool the agent cannot read, or a delta for another base, is
/// refused like an invalid pool, and nothing is applied.
pub fn handle_snapshot<A: Apply>(
    applier: &A,
    state: &mut ClientState,
    snapshot: pb::Snapshot,
) -> pb::AgentMessage {
    use pb::agent_message::Kind;
    let pb::Snapshot {
        version,
        nonce,
        pools,
        base_version,
        removed,
    } = snapshot;
    let delta = !base_version.is_empty();
    let (carried, removing) = (pools.len(), removed.len());
    let result = match merge(state, &version, &base_version, pools, &removed) {
        Ok(Merged { all, new }) => applier.apply(all).map(|()| new),
        Err(e) => Err(Rejection {
            error: e.to_string(),
            pools: e.pools(),
        }),
    };
    let kind = match result {
        Ok(new) => {
            if delta {
                tracing::info!(%version, base = %base_version, changed = carried, removed = removing, "delta snapshot applied");
                for key in &removed {
                    state.pools.remove(key);
                }
            } else {
                tracing::info!(%version, "snapshot applied");
                state.pools.clear();
            }
            state.pools.extend(new.into_iter().map(|p| (p.key(), p)));
            state.version = version.clone();
            Kind::Ack(pb::Ack { version, nonce })
        }
        Err(r) => {
            tracing::warn!(%version, error = %r.error, "snapshot refused; the last good configuration keeps running");
            Kind::Nack(pb::Nack {
                version,
                nonce,
                error: r.error,
                pools: r.pools,
            })
        }
    };
    pb::AgentMessage { kind: Some(kind) }
}

/// The delay before redial number `failures` (1-based): `min` doubling up
/// to `max`, with up to 50% random jitter subtracted so agents spread out.
pub fn backoff_delay(min: Duration, max: Duration, failures: u32) -> Duration {
    let base = min
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(max);
    let jitter = rand::random::<f64>() * 0.5;
    base.mul_f64(1.0 - jitter)
}

/// Keeps a control stream to the operator open until `stop`, redialing with
/// backoff. Never returns an error: a broken stream leaves the last good
/// configuration running.
pub async fn run<A: Apply>(options: ControlOptions, applier: A, stop: CancellationToken) {
    let mut state = ClientState::default();
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let mut got_snapshot = false;
        let result = session(&options, &applier, &mut state, &mut got_snapshot, &stop).await;
        if stop.is_cancelled() {
            return;
        }
        // A session that worked resets the backoff.
        if got_snapshot || started.elapsed() > Duration::from_secs(10) {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let delay = backoff_delay(options.backoff_min, options.backoff_max, failures);
        match result {
            Ok(()) => return,
            Err(error) if error.is_token_expiry() => {
                tracing::info!(operator = %options.operator, "the session reached its token's expiry; redialing with the refreshed token");
                failures = 0;
                continue;
            }
            Err(error) => tracing::warn!(
                operator = %options.operator,
                %error,
                retry_in = ?delay,
                running = %state.version,
                "no control stream; serving the last good configuration"
            ),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One control stream, from dial to its end. `Ok` only on `stop`.
pub async fn session<A: Apply>(
    options: &ControlOptions,
    applier: &A,
    state: &mut ClientState,
    got_snapshot: &mut bool,
    stop: &CancellationToken,
) -> Result<(), ControlError> {
    use pb::agent_message::Kind;
    let url = options.operator.clone();
    let credentials = options.security.as_ref().map(credentials).transpose()?;
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|source| ControlError::BadUrl {
            url: url.clone(),
            source,
        })?
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let mut authorization = None;
    if let Some((tls, token)) = credentials {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|source| ControlError::Tls {
                url: url.clone(),
                source,
            })?;
        authorization = Some(token);
    }
    let channel = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        c = endpoint.connect() => c.map_err(|source| ControlError::Connect { url: url.clone(), source })?,
    };
    let mut client = ControlClient::new(channel).max_decoding_message_size(64 << 20);

    let (tx, rx) = mpsc::channel(16);
    let hello = pb::AgentMessage {
        kind: Some(Kind::Hello(pb::Hello {
            node: options.node.clone(),
            pod: options.pod.clone(),
            version: state.version.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            deltas: true,
            clients: true,
        })),
    };
    // The channel has room: this cannot wait.
    let _ = tx.send(hello).await;
    let mut inbound = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        r = client.session({
            let mut request = tonic::Request::new(ReceiverStream::new(rx));
            if let Some(token) = authorization {
                request.metadata_mut().insert("authorization", token);
            }
            request
        }) => r.map_err(ControlError::Refused)?.into_inner(),
    };
    tracing::info!(operator = %url, node = %options.node, "control stream open");

    let mut tick = tokio::time::interval(options.report_check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report: Option<LastReport> = None;
    loop {
        let mut report_now = false;
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            message = inbound.message() => match message {
                Ok(Some(pb::OperatorMessage { kind: Some(pb::operator_message::Kind::Snapshot(snapshot)) })) => {
                    let answer = handle_snapshot(applier, state, snapshot);
                    *got_snapshot = true;
                    if tx.send(answer).await.is_err() {
                        return Err(ControlError::Closed);
                    }
                    // The new pools are reported at the next check, not at
                    // once: right after a push every agent would report
                    // together, while the operator still fans out.
                }
                Ok(Some(pb::OperatorMessage { kind: Some(pb::operator_message::Kind::Clients(clients)) })) => {
                    receive_clients(applier, clients);
                }
                Ok(Some(_)) => tracing::debug!("ignoring an operator message this agent does not know"),
                Ok(None) => return Err(ControlError::Closed),
                Err(status) => return Err(ControlError::Stream(status)),
            },
            _ = tick.tick() => report_now = true,
        }
        if report_now {
            let version = applier.report_version();
            let unchanged = last_report.as_ref().is_some_and(|last| {
                version.is_some()
                    && last.version == version
                    && last.at.elapsed() < options.report_interval
            });
            if unchanged {
                continue;
            }
            let report = applier.report();
            let due = match &last_report {
                None => true,
                Some(last) => last.pools != report || last.at.elapsed() >= options.report_interval,
            };
            if due {
                let message = pb::AgentMessage {
                    kind: Some(Kind::Report(pb::Report {
                        pools: report.clone(),
                    })),
                };
                if tx.send(message).await.is_err() {
                    return Err(ControlError::Closed);
                }
                last_report = Some(LastReport {
                    pools: report,
                    at: Instant::now(),
                    version,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tidepool_crds::control::spec_to_pb;

    #[derive(Default)]
    struct Fake {
        applied: Mutex<Vec<Vec<Arc<PoolConfig>>>>,
        refuse: Option<Rejection>,
    }

    impl Fake {
        /// Refuses everything, blaming `pool`'s size.
        fn refusing(pool: &str) -> Self {
            Self {
                refuse: Some(Rejection {
                    error: format!("pool {pool}: spec.size: 0 must be at least 1"),
                    pools: vec![pool.into()],
                }),
                ..Self::default()
            }
        }
    }

    impl Apply for Fake {
        fn apply(&self, pools: Vec<Arc<PoolConfig>>) -> Result<(), Rejection> {
            if let Some(r) = &self.refuse {
                return Err(r.clone());
            }
            self.applied.lock().unwrap().push(pools);
            Ok(())
        }
        fn report(&self) -> Vec<pb::PoolReport> {
            vec![]
        }
    }

    fn snapshot(version: &str) -> pb::Snapshot {
        let spec: tidepool_crds::ConnectionPoolSpec =
            serde_yaml::from_str("target: {service: {name: api, port: grpc}}\nsize: 3").unwrap();
        pb::Snapshot {
            version: version.into(),
            nonce: "n1".into(),
            pools: vec![pb::Pool {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
                generation: 2,
                spec: Some(spec_to_pb(&spec)),
                addresses: vec!["127.0.0.2:9000".into()],
            }],
            ..pb::Snapshot::default()
        }
    }

    /// Pool `ns/<name>` of this size.
    fn pool(name: &str, size: i32) -> pb::Pool {
        let spec: tidepool_crds::ConnectionPoolSpec = serde_yaml::from_str(&format!(
            "target: {{addresses: ['127.0.0.2:1']}}\nsize: {size}"
        ))
        .unwrap();
        pb::Pool {
            namespace: "ns".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            generation: 1,
            spec: Some(spec_to_pb(&spec)),
            addresses: vec!["127.0.0.2:1".into()],
        }
    }

    fn delta(version: &str, base: &str, pools: Vec<pb::Pool>, removed: &[&str]) -> pb::Snapshot {
        pb::Snapshot {
            version: version.into(),
            nonce: format!("nonce-{version}"),
            pools,
            base_version: base.into(),
            removed: removed.iter().map(|r| r.to_string()).collect(),
        }
    }

    /// The (name, size) of every pool of the last apply.
    fn last_applied(fake: &Fake) -> Vec<(String, i32)> {
        let applied = fake.applied.lock().unwrap();
        applied
            .last()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone(), p.spec.size))
            .collect()
    }

    fn acked(answer: &pb::AgentMessage, version: &str) -> bool {
        matches!(&answer.kind, Some(pb::agent_message::Kind::Ack(a)) if a.version == version)
    }

    fn nack(answer: pb::AgentMessage) -> pb::Nack {
        match answer.kind {
            Some(pb::agent_message::Kind::Nack(n)) => n,
            other => panic!("expected a Nack, got {other:?}"),
        }
    }

    #[test]
    fn a_delta_is_merged_into_the_running_pools_and_applied_whole() {
        let fake = Fake::default();
        let mut state = ClientState::default();
        let full = delta(
            "v1",
            "",
            vec![pool("a", 1), pool("b", 1), pool("c", 1)],
            &[],
        );
        assert!(acked(&handle_snapshot(&fake, &mut state, full), "v1"));

        // b changes, d comes, c goes; a stays as it was.
        let answer = handle_snapshot(
            &fake,
            &mut state,
            delta("v2", "v1", vec![pool("b", 2), pool("d", 1)], &["ns/c"]),
        );
        assert!(acked(&answer, "v2"), "{answer:?}");
        assert_eq!(
            last_applied(&fake),
            [("a".into(), 1), ("b".into(), 2), ("d".into(), 1)]
        );
        assert_eq!(state.version, "v2");
        assert_eq!(
            state.pools.keys().collect::<Vec<_>>(),
            ["ns/a", "ns/b", "ns/d"]
        );

        // A removal alone.
        let answer = handle_snapshot(&fake, &mut state, delta("v3", "v2", vec![], &["ns/a"]));
        assert!(acked(&answer, "v3"), "{answer:?}");
        assert_eq!(last_applied(&fake), [("b".into(), 2), ("d".into(), 1)]);

        // A full snapshot replaces everything, as before.
        let answer = handle_snapshot(&fake, &mut state, delta("v4", "", vec![pool("z", 5)], &[]));
        assert!(acked(&answer, "v4"));
        assert_eq!(last_applied(&fake), [("z".into(), 5)]);
        assert_eq!(state.pools.keys().collect::<Vec<_>>(), ["ns/z"]);
    }

    #[test]
    fn a_delta_for_another_base_is_nacked_naming_both_and_nothing_is_applied() {
        let fake = Fake::default();
        let mut state = ClientState::default();
        handle_snapshot(&fake, &mut state, delta("v1", "", vec![pool("a", 1)], &[]));
        let before = state.clone();

        let n = nack(handle_snapshot(
            &fake,
            &mut state,
            delta("v3", "v2", vec![pool("a", 2)], &[]),
        ));
        assert_eq!((n.version.as_str(), n.nonce.as_str()), ("v3", "nonce-v3"));
        assert!(
            n.error.contains("applies to version v2") && n.error.contains("this agent runs v1"),
            "{}",
            n.error
        );
        assert_eq!(fake.applied.lock().unwrap().len(), 1, "nothing applied");
        assert_eq!(state, before);

        // An agent that runs nothing says so.
        let n = nack(handle_snapshot(
            &fake,
            &mut ClientState::default(),
            delta("v3", "v2", vec![], &[]),
        ));
        assert!(n.error.contains("this agent runs none"), "{}", n.error);

        // Removing a pool the base does not run, or changing and removing
        // one at once: refused whole too.
        let n = nack(handle_snapshot(
            &fake,
            &mut state,
            delta("v3", "v1", vec![], &["ns/x"]),
        ));
        assert!(n.error.contains("removes pool ns/x"), "{}", n.error);
        assert_eq!(n.pools, ["ns/x"]);
        let n = nack(handle_snapshot(
            &fake,
            &mut state,
            delta("v3", "v1", vec![pool("a", 2)], &["ns/a"]),
        ));
        assert!(
            n.error.contains("both changes and removes pool ns/a"),
            "{}",
            n.error
        );
        assert_eq!(fake.applied.lock().unwrap().len(), 1);
        assert_eq!(state, before);
    }

    #[test]
    fn a_refused_delta_leaves_the_base_in_force() {
        let fake = Fake::refusing("ns/b");
        let mut state = ClientState {
            version: "v1".into(),
            pools: [(
                "ns/a".to_string(),
                Arc::new(config_from_pb(pool("a", 1)).unwrap()),
            )]
            .into(),
        };
        let before = state.clone();
        let n = nack(handle_snapshot(
            &fake,
            &mut state,
            delta("v2", "v1", vec![pool("b", 0)], &["ns/a"]),
        ));
        assert_eq!(n.pools, ["ns/b"]);
        assert_eq!(state, before, "the next delta's base is still v1");
    }

    #[test]
    fn a_snapshot_applied_is_acked_and_becomes_the_running_version() {
        let fake = Fake::default();
        let mut state = ClientState::default();
        let answer = handle_snapshot(&fake, &mut state, snapshot("v1"));
        assert_eq!(
            answer.kind,
            Some(pb::agent_message::Kind::Ack(pb::Ack {
                version: "v1".into(),
                nonce: "n1".into()
            }))
        );
        assert_eq!(state.version, "v1");
        let applied = fake.applied.lock().unwrap();
        assert_eq!(applied[0][0].key(), "ns/p");
        assert_eq!(applied[0][0].spec.size, 3);
        assert_eq!(applied[0][0].addresses, ["127.0.0.2:9000"]);
    }

    #[test]
    fn a_refused_snapshot_is_nacked_and_the_running_version_stays() {
        let fake = Fake::refusing("ns/p");
        let mut state = ClientState {
            version: "v0".into(),
            ..ClientState::default()
        };
        let answer = handle_snapshot(&fake, &mut state, snapshot("v1"));
        let Some(pb::agent_message::Kind::Nack(nack)) = answer.kind else {
            panic!("{answer:?}")
        };
        assert_eq!((nack.version.as_str(), nack.nonce.as_str()), ("v1", "n1"));
        assert!(nack.error.contains("spec.size"));
        assert_eq!(nack.pools, ["ns/p"]);
        assert_eq!(state.version, "v0");
    }

    #[test]
    fn an_unreadable_pool_is_nacked_before_anything_is_applied() {
        let fake = Fake::default();
        let mut s = snapshot("v1");
        s.pools[0].spec.as_mut().unwrap().target = None;
        let mut state = ClientState::default();
        let answer = handle_snapshot(&fake, &mut state, s);
        let Some(pb::agent_message::Kind::Nack(nack)) = answer.kind else {
            panic!("{answer:?}")
        };
        assert!(
            nack.error.contains("ns/p") && nack.error.contains("spec.target"),
            "{}",
            nack.error
        );
        assert!(fake.applied.lock().unwrap().is_empty());
    }

    #[test]
    fn an_observation_goes_on_the_wire_in_seconds_milliseconds_and_classes() {
        let o = Observation {
            window: Duration::from_secs(600),
            peak_streams: 37,
            p95_streams: 30,
            peak_connections: 2,
            waits: 4,
            wait_time: Duration::from_micros(1_300_900),
            wait_timeouts: 1,
            overflow_dials: 5,
            dials: 7,
            dial_failures: 3,
            closes: crate::pool::Closes {
                ttl: 1,
                idle: 2,
                goaway: 3,
                failure: 4,
                other: 5,
            },
            server_max_streams: Some(100),
        };
        assert_eq!(
            observation_to_pb(&o),
            pb::Observation {
                window_seconds: 600,
                peak_streams: 37,
                p95_streams: 30,
                peak_connections: 2,
                waits: 4,
                wait_millis: 1_300,
                wait_timeouts: 1,
                overflow_dials: 5,
                dials: 7,
                dial_failures: 3,
                closes: Some(pb::Closes {
                    ttl: 1,
                    idle: 2,
                    goaway: 3,
                    failure: 4,
                    other: 5,
                }),
                server_max_streams: 100,
            }
        );
        let none = Observation {
            server_max_streams: None,
            peak_streams: usize::MAX,
            ..o
        };
        let pb = observation_to_pb(&none);
        assert_eq!((pb.server_max_streams, pb.peak_streams), (0, i64::MAX));
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_max() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for (n, base) in [(1, 100), (2, 200), (3, 400), (10, 5000), (40, 5000)] {
            let d = backoff_delay(min, max, n);
            let base = Duration::from_millis(base);
            assert!(d <= base && d >= base / 2, "{n}: {d:?}");
        }
    }
}
