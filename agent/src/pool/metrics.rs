//! The pool's Prometheus metrics, named after Envoy's per-host cluster stats
//! where one fits.
//!
//! One [`PoolMetrics`] is made per process with [`PoolMetrics::new`], which
//! registers its families in a `pool` sub-registry of the registry it is
//! given (so an agent registry with prefix `tidepool` exposes
//! `tidepool_pool_cx_active`), and is passed by clone to every
//! [`Pool`](super::Pool). Each series carries the labels `pool` and `address`.
//!
//! | metric | type | Envoy | meaning |
//! | --- | --- | --- | --- |
//! | `cx_active` | gauge | `upstream_cx_active` | open connections: pooled, draining and overflow |
//! | `cx_busy` | gauge | | pooled connections at max-streams |
//! | `cx_idle` | gauge | | pooled connections with no stream |
//! | `cx_draining` | gauge | | connections out of the pool, closing at their last stream |
//! | `cx_overflow_active` | gauge | | open overflow (unpooled) connections |
//! | `cx_total` | counter | `upstream_cx_total` | connections dialed |
//! | `cx_connect_fail_total` | counter | `upstream_cx_connect_fail` | failed dials |
//! | `cx_overflow_total` | counter | `upstream_cx_overflow` | overflow connections dialed because the address was full |
//! | `cx_destroy_total{reason}` | counter | `upstream_cx_destroy` | connections taken out of service, by reason |
//! | `rq_active` | gauge | `upstream_rq_active` | open streams |
//! | `rq_total` | counter | `upstream_rq_total` | streams handed out |
//! | `rq_error_total` | counter | `upstream_rq_error` | streams that ended with a transport error |
//! | `rq_pending_active` | gauge | `upstream_rq_pending_active` | callers waiting for a stream |
//! | `rq_pending_overflow_total` | counter | `upstream_rq_pending_overflow` | callers refused with "pool full" |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::occupancy::EvictionReason;

/// The labels of every per-address series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AddressLabels {
    /// The pool's name (`namespace/name` of its ConnectionPool).
    pub pool: String,
    /// `host:port`.
    pub address: String,
}

/// The labels of `cx_destroy_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvictionLabels {
    /// The pool's name.
    pub pool: String,
    /// `host:port`.
    pub address: String,
    /// Why the connection left the pool.
    pub reason: EvictionReason,
}

/// The metric families of every pool in the process. Cheap to clone: the
/// families are reference counted.
#[derive(Debug, Clone, Default)]
pub struct PoolMetrics {
    cx_active: Family<AddressLabels, Gauge>,
    cx_busy: Family<AddressLabels, Gauge>,
    cx_idle: Family<AddressLabels, Gauge>,
    cx_draining: Family<AddressLabels, Gauge>,
    cx_overflow_active: Family<AddressLabels, Gauge>,
    cx: Family<AddressLabels, Counter>,
    cx_connect_fail: Family<AddressLabels, Counter>,
    cx_overflow: Family<AddressLabels, Counter>,
    cx_destroy: Family<EvictionLabels, Counter>,
    rq_active: Family<AddressLabels, Gauge>,
    rq: Family<AddressLabels, Counter>,
    rq_error: Family<AddressLabels, Counter>,
    rq_pending_active: Family<AddressLabels, Gauge>,
    rq_pending_overflow: Family<AddressLabels, Counter>,
}

impl PoolMetrics {
    /// Makes the families and registers them under `pool_` in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let r = registry.sub_registry_with_prefix("pool");
        r.register("cx_active", "Open connections: pooled, draining and overflow", metrics.cx_active.clone());
        r.register("cx_busy", "Pooled connections at max-streams", metrics.cx_busy.clone());
        r.register("cx_idle", "Pooled connections with no stream", metrics.cx_idle.clone());
        r.register(
            "cx_draining",
            "Connections out of the pool that close at their last stream",
            metrics.cx_draining.clone(),
        );
        r.register(
            "cx_overflow_active",
            "Open overflow (unpooled) connections",
            metrics.cx_overflow_active.clone(),
        );
        r.register("cx", "Connections dialed", metrics.cx.clone());
        r.register("cx_connect_fail", "Failed dials", metrics.cx_connect_fail.clone());
        r.register(
            "cx_overflow",
            "Overflow connections dialed because the address was full",
            metrics.cx_overflow.clone(),
        );
        r.register(
            "cx_destroy",
            "Connections taken out of service, by reason",
            metrics.cx_destroy.clone(),
        );
        r.register("rq_active", "Open streams", metrics.rq_active.clone());
        r.register("rq", "Streams handed out", metrics.rq.clone());
        r.register("rq_error", "Streams that ended with a transport error", metrics.rq_error.clone());
        r.register(
            "rq_pending_active",
            "Callers waiting for a stream",
            metrics.rq_pending_active.clone(),
        );
        r.register(
            "rq_pending_overflow",
            "Callers refused because the pool was full",
            metrics.rq_pending_overflow.clone(),
        );
        metrics
    }

    /// Families that belong to no registry: for tests and benchmarks.
    pub fn unregistered() -> Self {
        Self::default()
    }

    /// The series of one address, fetched once so the data path only
    /// touches atomics.
    pub(crate) fn address(&self, pool: &str, address: &str) -> AddressMetrics {
        let labels = AddressLabels {
            pool: pool.to_owned(),
            address: address.to_owned(),
        };
        let destroy = EvictionReason::ALL.map(|reason| {
            self.cx_destroy.get_or_create_owned(&EvictionLabels {
                pool: labels.pool.clone(),
                address: labels.address.clone(),
                reason,
            })
        });
        AddressMetrics {
            cx_active: self.cx_active.get_or_create_owned(&labels),
            cx_busy: self.cx_busy.get_or_create_owned(&labels),
            cx_idle: self.cx_idle.get_or_create_owned(&labels),
            cx_draining: self.cx_draining.get_or_create_owned(&labels),
            cx_overflow_active: self.cx_overflow_active.get_or_create_owned(&labels),
            cx: self.cx.get_or_create_owned(&labels),
            cx_connect_fail: self.cx_connect_fail.get_or_create_owned(&labels),
            cx_overflow: self.cx_overflow.get_or_create_owned(&labels),
            cx_destroy: destroy,
            rq_active: self.rq_active.get_or_create_owned(&labels),
            rq: self.rq.get_or_create_owned(&labels),
            rq_error: self.rq_error.get_or_create_owned(&labels),
            rq_pending_active: self.rq_pending_active.get_or_create_owned(&labels),
            rq_pending_overflow: self.rq_pending_overflow.get_or_create_owned(&labels),
        }
    }

    /// Drops the series of an address that is gone, so `/metrics` does not
    /// grow with every address a pool ever had.
    pub(crate) fn remove_address(&self, pool: &str, address: &str) {
        let labels = AddressLabels {
            pool: pool.to_owned(),
            address: address.to_owned(),
        };
        for family in [
            &self.cx_active,
            &self.cx_busy,
            &self.cx_idle,
            &self.cx_draining,
            &self.cx_overflow_active,
            &self.rq_active,
            &self.rq_pending_active,
        ] {
            family.remove(&labels);
        }
        for family in [
            &self.cx,
            &self.cx_connect_fail,
            &self.cx_overflow,
            &self.rq,
            &self.rq_error,
            &self.rq_pending_overflow,
        ] {
            family.remove(&labels);
        }
        for reason in EvictionReason::ALL {
            self.cx_destroy.remove(&EvictionLabels {
                pool: labels.pool.clone(),
                address: labels.address.clone(),
                reason,
            });
        }
    }
}

/// The series of one address. Gauges are set from the address state after
/// each change (under its lock, so they never run backwards).
#[derive(Debug, Clone)]
pub(crate) struct AddressMetrics {
    pub(crate) cx_active: Gauge,
    pub(crate) cx_busy: Gauge,
    pub(crate) cx_idle: Gauge,
    pub(crate) cx_draining: Gauge,
    pub(crate) cx_overflow_active: Gauge,
    pub(crate) cx: Counter,
    pub(crate) cx_connect_fail: Counter,
    pub(crate) cx_overflow: Counter,
    pub(crate) cx_destroy: [Counter; EvictionReason::ALL.len()],
    pub(crate) rq_active: Gauge,
    pub(crate) rq: Counter,
    pub(crate) rq_error: Counter,
    pub(crate) rq_pending_active: Gauge,
    pub(crate) rq_pending_overflow: Counter,
}

impl AddressMetrics {
    pub(crate) fn evicted(&self, reason: EvictionReason) {
        self.cx_destroy[reason as usize].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn series_are_named_after_envoy_and_removed_with_the_address() {
        let mut registry = Registry::with_prefix("tidepool");
        let metrics = PoolMetrics::new(&mut registry);
        let a = metrics.address("shop/payments", "10.0.0.1:50051");
        a.cx_active.set(3);
        a.cx_connect_fail.inc();
        a.evicted(EvictionReason::GoAway);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"tidepool_pool_cx_active{pool="shop/payments",address="10.0.0.1:50051"} 3"#),
            "{text}"
        );
        assert!(text.contains("tidepool_pool_cx_connect_fail_total{"), "{text}");
        assert!(text.contains(r#"reason="goaway"} 1"#), "{text}");
        metrics.remove_address("shop/payments", "10.0.0.1:50051");
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(!text.contains("10.0.0.1:50051"), "{text}");
    }
}
