//! The operator's Prometheus metrics, in one struct registered once and
//! shared; served on the admin port's `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

tidepool_common::text_enum! {
    /// How a reconcile ended (`tidepool_operator_reconciles_total{result}`).
    pub enum ReconcileResult {
        /// The target resolved.
        Ok => "ok",
        /// The target did not resolve; the status says why.
        Unresolved => "unresolved",
        /// The reconcile failed and is retried.
        Error => "error",
    }
}

tidepool_common::text_enum! {
    /// Why authentication refused a control stream
    /// (`tidepool_operator_auth_refusals_total{reason}`).
    pub enum AuthRefusal {
        /// No bearer token.
        NoToken => "no_token",
        /// Not one well-formed bearer token.
        Malformed => "malformed",
        /// The TokenReview did not authenticate it.
        Unauthenticated => "unauthenticated",
        /// Minted for another audience.
        WrongAudience => "wrong_audience",
        /// Not the agents' ServiceAccount.
        WrongServiceAccount => "wrong_service_account",
        /// The token is bound to no node.
        NoNodeClaim => "no_node_claim",
        /// The token is bound to another node than the agent claims.
        NodeMismatch => "node_mismatch",
        /// The TokenReview could not be made.
        ReviewFailed => "review_failed",
    }
}

tidepool_common::text_enum! {
    /// Why a TLS handshake on the control port failed
    /// (`tidepool_operator_tls_handshake_failures_total{reason}`).
    pub enum HandshakeFailure {
        /// The handshake failed.
        Handshake => "handshake",
        /// It did not finish in time.
        Timeout => "timeout",
    }
}

tidepool_common::text_enum! {
    /// Which object of a node-local Service was written.
    pub enum LocalObject {
        /// The Service.
        Service => "service",
        /// One of its EndpointSlices.
        EndpointSlice => "endpointslice",
    }
}

tidepool_common::text_enum! {
    /// How a node-local Service's object was written.
    pub enum LocalOp {
        /// Created.
        Create => "create",
        /// Server-side applied.
        Apply => "apply",
        /// Deleted.
        Delete => "delete",
    }
}

tidepool_common::text_enum! {
    /// Whether a write succeeded.
    pub enum WriteResult {
        /// It did.
        Ok => "ok",
        /// It failed.
        Error => "error",
    }
}

/// A reconcile's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// How it ended.
    pub result: ReconcileResult,
}

/// Why authentication refused a stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthRefusalLabel {
    /// The refusal.
    pub reason: AuthRefusal,
}

/// Why a TLS handshake failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabel {
    /// The failure.
    pub reason: HandshakeFailure,
}

/// A write of a node-local Service's objects.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalWriteLabel {
    /// Which object.
    pub object: LocalObject,
    /// How.
    pub op: LocalOp,
    /// Whether it succeeded.
    pub result: WriteResult,
}

/// Why part of an agent's report was ignored.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IgnoredLabel {
    /// `negative`, `overflow`, `inconsistent`, `unknown_pool` or
    /// `unknown_address` ([`Ignored`](crate::agents::Ignored)).
    pub reason: &'static str,
}

/// Where a pool's tuning advice stands.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdviceLabel {
    /// `ok`, `differs`, `observing` or `no_traffic`.
    pub state: &'static str,
}

/// Every metric the operator exports (prefix `tidepool_operator_`).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Reconciles, by result.
    pub reconciles: Family<ResultLabel, Counter>,
    /// Reconciles that failed with an error (and were retried).
    pub reconcile_errors: Counter,
    /// How long a reconcile took.
    pub reconcile_duration: Histogram,
    /// Agents with an open control stream.
    pub connected_agents: Gauge,
    /// Control streams refused (bad first message, unknown node, not leader).
    pub refused_streams: Counter,
    /// Snapshots sent to agents.
    pub snapshots_sent: Counter,
    /// Of those, the ones sent as deltas.
    pub deltas_sent: Counter,
    /// Deltas agents refused (each answered by a whole resend).
    pub delta_nacks: Counter,
    /// Time from sending a snapshot to its ACK.
    pub push_to_ack: Histogram,
    /// Time from the desired-state change a snapshot carries to its ACK
    /// (includes the debounce).
    pub change_to_ack: Histogram,
    /// Snapshots agents refused.
    pub nacks: Counter,
    /// Reports received from agents.
    pub reports: Counter,
    /// Node pod maps (`spec.clients`) sent to agents.
    pub client_maps_sent: Counter,
    /// Status writes (server-side apply) made.
    pub status_writes: Counter,
    /// Status writes that failed.
    pub status_write_errors: Counter,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    /// Control streams refused by authentication, by reason
    /// ([`crate::auth::Refusal::reason`]).
    pub auth_refusals: Family<AuthRefusalLabel, Counter>,
    /// TokenReviews made (cache misses).
    pub token_reviews: Counter,
    /// Authentications answered from the review cache.
    pub token_review_cache_hits: Counter,
    /// TLS handshakes on the control port that failed (`handshake`) or did
    /// not finish in time (`timeout`).
    pub tls_handshake_failures: Family<HandshakeLabel, Counter>,
    /// When this replica's serving certificate expires (Unix seconds).
    pub control_cert_expiry: Gauge,
    /// Serving certificates issued after the first.
    pub control_cert_renewals: Counter,
    /// Sessions ended because their token expired (or the session cap).
    pub sessions_expired: Counter,
    /// Writes of node-local Services and their EndpointSlices.
    pub local_service_writes: Family<LocalWriteLabel, Counter>,
    /// Parts of agents' reports ignored, by reason.
    pub report_values_ignored: Family<IgnoredLabel, Counter>,
    /// Pools by where their tuning advice stands.
    pub pools_by_advice: Family<AdviceLabel, Gauge>,
    /// Changes of a pool's advised settings (each also an Event).
    pub advice_changes: Counter,
    /// Tuned settings applied to pools with `spec.tuning.mode: Apply`.
    pub tuning_applies: Counter,
}

impl Metrics {
    /// Registers every metric in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let m = Self {
            reconciles: Family::default(),
            reconcile_errors: Counter::default(),
            reconcile_duration: latency(),
            connected_agents: Gauge::default(),
            refused_streams: Counter::default(),
            snapshots_sent: Counter::default(),
            deltas_sent: Counter::default(),
            delta_nacks: Counter::default(),
            push_to_ack: latency(),
            change_to_ack: latency(),
            nacks: Counter::default(),
            reports: Counter::default(),
            client_maps_sent: Counter::default(),
            local_service_writes: Family::default(),
            status_writes: Counter::default(),
            status_write_errors: Counter::default(),
            leader: Gauge::default(),
            auth_refusals: Family::default(),
            token_reviews: Counter::default(),
            token_review_cache_hits: Counter::default(),
            tls_handshake_failures: Family::default(),
            control_cert_expiry: Gauge::default(),
            control_cert_renewals: Counter::default(),
            sessions_expired: Counter::default(),
            report_values_ignored: Family::default(),
            pools_by_advice: Family::default(),
            advice_changes: Counter::default(),
            tuning_applies: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("operator");
        r.register(
            "reconciles",
            "ConnectionPool reconciles by result",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconciles that failed and were retried",
            m.reconcile_errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time a reconcile took",
            m.reconcile_duration.clone(),
        );
        r.register(
            "connected_agents",
            "Agents with an open control stream",
            m.connected_agents.clone(),
        );
        r.register(
            "refused_streams",
            "Control streams refused",
            m.refused_streams.clone(),
        );
        r.register(
            "snapshots_sent",
            "Snapshots sent to agents",
            m.snapshots_sent.clone(),
        );
        r.register(
            "deltas_sent",
            "Snapshots sent as deltas from the agent's acknowledged one (also in snapshots_sent)",
            m.deltas_sent.clone(),
        );
        r.register(
            "delta_nacks",
            "Deltas agents refused; each is resent whole",
            m.delta_nacks.clone(),
        );
        r.register(
            "push_to_ack_seconds",
            "Time from sending a snapshot to its ACK",
            m.push_to_ack.clone(),
        );
        r.register(
            "change_to_ack_seconds",
            "Time from a desired-state change to an agent's ACK of it (convergence)",
            m.change_to_ack.clone(),
        );
        r.register("nacks", "Snapshots agents refused", m.nacks.clone());
        r.register(
            "reports",
            "Occupancy reports received from agents",
            m.reports.clone(),
        );
        r.register(
            "client_maps_sent",
            "Node pod maps (for spec.clients) sent to agents",
            m.client_maps_sent.clone(),
        );
        r.register(
            "local_service_writes",
            "Writes of node-local Services and their EndpointSlices, by object, operation and result",
            m.local_service_writes.clone(),
        );
        r.register(
            "report_values_ignored",
            "Parts of agents' occupancy reports ignored, by reason: an address entry with a negative, overflowing or inconsistent value (dropped), a pool the node does not run (dropped), an observation of an address the pool does not resolve there (not used for advice)",
            m.report_values_ignored.clone(),
        );
        r.register(
            "pools_by_advice",
            "ConnectionPools by where their tuning advice stands: ok, differs, observing, no_traffic",
            m.pools_by_advice.clone(),
        );
        r.register(
            "advice_changes",
            "Changes of a pool's advised settings",
            m.advice_changes.clone(),
        );
        r.register(
            "tuning_applies",
            "Advised settings applied to pools with spec.tuning.mode Apply",
            m.tuning_applies.clone(),
        );
        r.register(
            "status_writes",
            "ConnectionPool status writes",
            m.status_writes.clone(),
        );
        r.register(
            "status_write_errors",
            "ConnectionPool status writes that failed",
            m.status_write_errors.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        r.register(
            "auth_refusals",
            "Control streams refused by authentication, by reason",
            m.auth_refusals.clone(),
        );
        r.register(
            "token_reviews",
            "TokenReviews made to authenticate agents (cache misses)",
            m.token_reviews.clone(),
        );
        r.register(
            "token_review_cache_hits",
            "Agent authentications answered from the review cache",
            m.token_review_cache_hits.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes on the control port that failed or timed out",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "control_cert_expiry_timestamp_seconds",
            "When this replica's control-port serving certificate expires",
            m.control_cert_expiry.clone(),
        );
        r.register(
            "control_cert_renewals",
            "Control-port serving certificates issued after the first",
            m.control_cert_renewals.clone(),
        );
        r.register(
            "sessions_expired",
            "Control sessions ended at their token's expiry",
            m.sessions_expired.clone(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_their_names() {
        let mut registry = Registry::with_prefix("tidepool");
        let m = Metrics::new(&mut registry);
        m.reconciles
            .get_or_create(&ResultLabel {
                result: ReconcileResult::Ok,
            })
            .inc();
        m.push_to_ack.observe(0.01);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("tidepool_operator_reconciles_total{result=\"ok\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("tidepool_operator_push_to_ack_seconds_count 1"),
            "{out}"
        );
        assert!(
            out.contains("tidepool_operator_connected_agents 0"),
            "{out}"
        );
    }
}
