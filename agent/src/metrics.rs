//! The agent's own Prometheus metrics (the pool's are in
//! [`pool::metrics`](crate::pool::metrics)). All live in one registry with
//! the prefix `tidepool`, served on the admin port's `/metrics`.
//!
//! | metric | type | meaning |
//! | --- | --- | --- |
//! | `proxy_streams_total{pool, code}` | counter | proxied streams by gRPC status (the agent's own errors included) |
//! | `proxy_streams_active{pool}` | gauge | streams being proxied |
//! | `proxy_stream_duration_seconds{pool}` | histogram | time from request to the end of the response |
//! | `proxy_rejected_total{reason}` | counter | streams or connections refused before reaching a pool (`unknown_authority`, `not_grpc`, `http1`, `bad_preface`) |
//! | `proxy_connections_active{listener}` | gauge | client connections open, per listener (`shared` or the port) |
//! | `proxy_client_goaway_total{reason}` | counter | client connections the agent closed for breaking HTTP/2's rules, by the GOAWAY's error code (`ENHANCE_YOUR_CALM` for a flood of small or empty DATA frames, `PROTOCOL_ERROR`, …) |
//! | `proxy_retries_total{pool, reason}` | counter | streams sent again because they provably never reached a backend: `refused_stream` (RST_STREAM REFUSED_STREAM), `goaway` (above a GOAWAY's last stream id, or on a connection already going away), `connect_refused`, `connect_failed` (another dial failure), `closed` (the pooled connection closed before the stream opened); see [`proxy::retry`](crate::proxy::retry) |
//! | `proxy_refused_total{pool, reason}` | counter | streams refused because the pool's `spec.clients` does not admit the client (`namespace`: a pod of another namespace; `unknown_ip`: no pod of this node the agent knows); nothing is dialed |
//! | `clients_pods` | gauge | pod IPs of this node in the pod map the operator sent (`spec.clients` is checked against it) |
//! | `config_applies_total{result}` | counter | configurations applied (`ok`) or refused (`error`) |
//! | `config_pools` | gauge | pools in force |

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::code::Code;
use crate::proxy::retry::RetryReason;

tidepool_common::text_enum! {
    /// Why a stream or connection was refused before reaching a pool
    /// (`proxy_rejected_total{reason}`).
    pub enum Rejection {
        /// No pool serves the `:authority`.
        UnknownAuthority => "unknown_authority",
        /// The request is not gRPC.
        NotGrpc => "not_grpc",
        /// The client spoke HTTP/1.
        Http1 => "http1",
        /// The client sent no HTTP/2 preface in time, or a bad one.
        BadPreface => "bad_preface",
    }
}

tidepool_common::text_enum! {
    /// Why a pool's `spec.clients` refused a stream
    /// (`proxy_refused_total{reason}`).
    pub enum RefusedReason {
        /// A pod of a namespace the pool does not list.
        Namespace => "namespace",
        /// No pod IP of this node the agent knows.
        UnknownIp => "unknown_ip",
    }
}

tidepool_common::text_enum! {
    /// Whether a configuration was applied (`config_applies_total{result}`).
    pub enum ApplyResult {
        /// Applied.
        Ok => "ok",
        /// Refused.
        Error => "error",
    }
}

/// The `listener` label of the shared listener (a dedicated one's is its
/// port).
pub const SHARED_LISTENER: &str = "shared";

/// Labels `{pool, code}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `namespace/name`.
    pub pool: String,
    /// The gRPC status name, such as `OK` or `UNAVAILABLE`.
    pub code: &'static str,
}

/// Labels `{pool}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// `namespace/name`.
    pub pool: String,
}

/// Labels `{reason}` of refusals before a pool.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabel {
    /// Why the stream or connection was refused.
    pub reason: Rejection,
}

/// Labels `{reason}` of client GOAWAYs.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GoAwayLabel {
    /// The GOAWAY's error code, such as `ENHANCE_YOUR_CALM` (h2's names).
    pub reason: &'static str,
}

/// Labels `{pool, reason}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `namespace/name`.
    pub pool: String,
    /// Why.
    pub reason: RefusedReason,
}

/// Labels `{pool, reason}` of retries.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// `namespace/name`.
    pub pool: String,
    /// Why the stream was sent again.
    pub reason: RetryReason,
}

/// Labels `{listener}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// `shared`, or the dedicated port.
    pub listener: String,
}

/// Labels `{result}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// Applied or refused.
    pub result: ApplyResult,
}

fn duration_histogram() -> Histogram {
    // 100 µs to about 105 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every agent metric outside the pool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    streams: Family<StreamLabels, Counter>,
    streams_active: Family<PoolLabel, Gauge>,
    stream_duration: HistogramFamily<PoolLabel>,
    rejected: Family<RejectionLabel, Counter>,
    refused: Family<RefusedLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    client_pods: Gauge,
    connections_active: Family<ListenerLabel, Gauge>,
    client_goaway: Family<GoAwayLabel, Counter>,
    applies: Family<ResultLabel, Counter>,
    pools: Gauge,
}

impl Metrics {
    /// Makes the families and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            streams: Family::default(),
            streams_active: Family::default(),
            stream_duration: Family::new_with_constructor(duration_histogram),
            rejected: Family::default(),
            refused: Family::default(),
            retries: Family::default(),
            client_pods: Gauge::default(),
            connections_active: Family::default(),
            client_goaway: Family::default(),
            applies: Family::default(),
            pools: Gauge::default(),
        };
        let proxy = registry.sub_registry_with_prefix("proxy");
        proxy.register(
            "streams",
            "Proxied streams by gRPC status",
            metrics.streams.clone(),
        );
        proxy.register(
            "streams_active",
            "Streams being proxied",
            metrics.streams_active.clone(),
        );
        proxy.register(
            "stream_duration_seconds",
            "Time from request to the end of the response",
            metrics.stream_duration.clone(),
        );
        proxy.register(
            "rejected",
            "Streams or connections refused before reaching a pool",
            metrics.rejected.clone(),
        );
        proxy.register(
            "refused",
            "Streams refused because the pool's spec.clients does not admit the client",
            metrics.refused.clone(),
        );
        proxy.register(
            "retries",
            "Streams sent again because they provably never reached a backend",
            metrics.retries.clone(),
        );
        proxy.register(
            "connections_active",
            "Client connections open, per listener",
            metrics.connections_active.clone(),
        );
        proxy.register(
            "client_goaway",
            "Client connections closed for breaking HTTP/2's rules, by GOAWAY error code",
            metrics.client_goaway.clone(),
        );
        let config = registry.sub_registry_with_prefix("config");
        config.register(
            "applies",
            "Configurations applied or refused",
            metrics.applies.clone(),
        );
        config.register("pools", "Pools in force", metrics.pools.clone());
        registry.sub_registry_with_prefix("clients").register(
            "pods",
            "Pod IPs of this node in the pod map the operator sent",
            metrics.client_pods.clone(),
        );
        metrics
    }

    /// The handles one pool's streams update, looked up once per pool so a
    /// stream touches no label map.
    pub fn pool(&self, pool: &str) -> PoolStreamMetrics {
        let label = PoolLabel {
            pool: pool.to_owned(),
        };
        PoolStreamMetrics {
            by_code: Arc::new(std::array::from_fn(|i| {
                self.streams
                    .get_or_create(&StreamLabels {
                        pool: pool.to_owned(),
                        code: Code::ALL[i].name(),
                    })
                    .clone()
            })),
            retries: Arc::new(RetryReason::ALL.map(|reason| {
                self.retries
                    .get_or_create(&RetryLabels {
                        pool: pool.to_owned(),
                        reason,
                    })
                    .clone()
            })),
            active: self.streams_active.get_or_create(&label).clone(),
            duration: self.stream_duration.get_or_create(&label).clone(),
        }
    }

    /// Drops a removed pool's series.
    pub fn remove_pool(&self, pool: &str) {
        let label = PoolLabel {
            pool: pool.to_owned(),
        };
        self.streams_active.remove(&label);
        self.stream_duration.remove(&label);
        for reason in RefusedReason::ALL {
            self.refused.remove(&RefusedLabels {
                pool: pool.to_owned(),
                reason,
            });
        }
        for reason in RetryReason::ALL {
            self.retries.remove(&RetryLabels {
                pool: pool.to_owned(),
                reason,
            });
        }
        for code in Code::ALL {
            self.streams.remove(&StreamLabels {
                pool: pool.to_owned(),
                code: code.name(),
            });
        }
    }

    /// Counts a refusal.
    pub fn rejected(&self, reason: Rejection) {
        self.rejected
            .get_or_create(&RejectionLabel { reason })
            .inc();
    }

    /// Counts a stream refused by a pool's `spec.clients`.
    pub fn refused(&self, pool: &str, reason: RefusedReason) {
        self.refused
            .get_or_create(&RefusedLabels {
                pool: pool.to_owned(),
                reason,
            })
            .inc();
    }

    /// Records the size of the pod map in force.
    pub fn client_map(&self, pods: usize) {
        self.client_pods
            .set(i64::try_from(pods).unwrap_or(i64::MAX));
    }

    /// Counts a client connection closed with a GOAWAY of the agent's own
    /// (h2 found the client breaking a rule or a limit).
    pub fn goaway_sent(&self, reason: h2::Reason) {
        self.client_goaway
            .get_or_create(&GoAwayLabel {
                reason: crate::pool::h2::reason_name(reason),
            })
            .inc();
    }

    /// The open-connections gauge of one listener.
    pub fn connections(&self, listener: &str) -> Gauge {
        self.connections_active
            .get_or_create(&ListenerLabel {
                listener: listener.to_owned(),
            })
            .clone()
    }

    /// Counts an applied (`ok = true`) or refused configuration.
    pub fn applied(&self, ok: bool, pools: usize) {
        let result = if ok {
            ApplyResult::Ok
        } else {
            ApplyResult::Error
        };
        self.applies.get_or_create(&ResultLabel { result }).inc();
        if ok {
            self.pools.set(i64::try_from(pools).unwrap_or(i64::MAX));
        }
    }
}

/// One pool's stream metrics.
#[derive(Debug, Clone)]
pub struct PoolStreamMetrics {
    by_code: Arc<[Counter; Code::ALL.len()]>,
    /// By [`RetryReason::ALL`]'s order.
    retries: Arc<[Counter; RetryReason::ALL.len()]>,
    /// Streams being proxied.
    pub active: Gauge,
    /// Stream durations in seconds.
    pub duration: Histogram,
}

impl PoolStreamMetrics {
    /// Counts a finished stream.
    pub fn finished(&self, code: Code, seconds: f64) {
        self.by_code[code as usize].inc();
        self.duration.observe(seconds);
    }

    /// Counts a stream sent again.
    pub fn retried(&self, reason: RetryReason) {
        self.retries[reason as usize].inc();
    }
}
