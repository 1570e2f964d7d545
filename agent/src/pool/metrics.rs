//! The pool's Prometheus metrics, named after Envoy's per-host cluster stats
//! where one fits.
//!
//! One [`PoolMetrics`] is made per process with [`PoolMetrics::new`], which
//! registers its families in a `pool` sub-registry of the registry it is
//! given (so an agent registry with prefix `tidepool` exposes
//! `tidepool_pool_cx_active`), and is passed by clone to every
//! [`Pool`](super::Pool). Each series carries the labels `pool` and `address`.
//!
//! The gauges and `rq_total` change on every acquire and release, so the
//! data path does not write them: each address keeps plain counts under the
//! lock it already holds, and a [`Collector`] reads them from every live
//! pool at scrape time. The rarer counters (dials, failures, evictions,
//! refusals) stay ordinary families, written where they happen.
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
//! | `observed_peak_streams` | gauge | | the most streams open at once over the observation window's whole buckets ([`observe`](super::observe)) |

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
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
/// families and the list of pools are reference counted.
#[derive(Debug, Clone, Default)]
pub struct PoolMetrics {
    cx: Family<AddressLabels, Counter>,
    cx_connect_fail: Family<AddressLabels, Counter>,
    cx_overflow: Family<AddressLabels, Counter>,
    cx_destroy: Family<EvictionLabels, Counter>,
    rq_error: Family<AddressLabels, Counter>,
    rq_pending_overflow: Family<AddressLabels, Counter>,
    /// The pools whose address counts are read at scrape time.
    pools: Arc<Pools>,
}

/// What the scrape-time collector needs from a pool.
pub(crate) trait Source: Send + Sync {
    /// The pool's name and the counts of each of its addresses, each read
    /// under its address's lock.
    fn counts(&self) -> (String, Vec<(String, AddressCounts)>);
}

/// One address's occupancy and stream total, as the gauges and `rq_total`
/// report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AddressCounts {
    pub(crate) cx_active: usize,
    pub(crate) cx_busy: usize,
    pub(crate) cx_idle: usize,
    pub(crate) cx_draining: usize,
    pub(crate) cx_overflow_active: usize,
    pub(crate) rq_active: usize,
    pub(crate) rq_pending_active: usize,
    pub(crate) rq_total: u64,
    /// Computed once per observation bucket, not at scrape time.
    pub(crate) observed_peak_streams: usize,
}

/// The live pools of a [`PoolMetrics`]. A pool adds itself when it is made
/// and is forgotten once dropped (its `Weak` no longer upgrades).
#[derive(Default)]
struct Pools(Mutex<Vec<Weak<dyn Source>>>);

impl fmt::Debug for Pools {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("Pools").field("pools", &n).finish()
    }
}

impl Pools {
    fn add(&self, pool: Weak<dyn Source>) {
        let mut pools = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        pools.retain(|p| p.strong_count() > 0);
        pools.push(pool);
    }

    /// Every address of every live pool, sorted by pool then address.
    fn rows(&self) -> Vec<(AddressLabels, AddressCounts)> {
        // Upgrade under the list lock, read the pools after releasing it.
        let live: Vec<Arc<dyn Source>> = {
            let mut pools = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            pools.retain(|p| p.strong_count() > 0);
            pools.iter().filter_map(Weak::upgrade).collect()
        };
        let mut rows = Vec::new();
        for source in live {
            let (pool, addresses) = source.counts();
            for (address, counts) in addresses {
                rows.push((
                    AddressLabels {
                        pool: pool.clone(),
                        address,
                    },
                    counts,
                ));
            }
        }
        rows.sort_by(|a, b| (&a.0.pool, &a.0.address).cmp(&(&b.0.pool, &b.0.address)));
        rows
    }
}

/// Encodes the gauges and `rq_total` from the pools' counts at scrape time.
#[derive(Debug)]
struct OccupancyCollector {
    pools: Arc<Pools>,
}

/// Reads one gauge's value from an address's counts.
type Read = fn(&AddressCounts) -> usize;

/// The gauges the collector reports: name, help, and how to read the value.
const GAUGES: [(&str, &str, Read); 8] = [
    (
        "cx_active",
        "Open connections: pooled, draining and overflow",
        |c| c.cx_active,
    ),
    ("cx_busy", "Pooled connections at max-streams", |c| {
        c.cx_busy
    }),
    ("cx_idle", "Pooled connections with no stream", |c| {
        c.cx_idle
    }),
    (
        "cx_draining",
        "Connections out of the pool that close at their last stream",
        |c| c.cx_draining,
    ),
    (
        "cx_overflow_active",
        "Open overflow (unpooled) connections",
        |c| c.cx_overflow_active,
    ),
    ("rq_active", "Open streams", |c| c.rq_active),
    ("rq_pending_active", "Callers waiting for a stream", |c| {
        c.rq_pending_active
    }),
    (
        "observed_peak_streams",
        "The most streams open at once over the observation window",
        |c| c.observed_peak_streams,
    ),
];

impl Collector for OccupancyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let rows = self.pools.rows();
        for (name, help, read) in GAUGES {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, counts) in &rows {
                let value = i64::try_from(read(counts)).unwrap_or(i64::MAX);
                ConstGauge::new(value).encode(family.encode_family(labels)?)?;
            }
        }
        let mut family =
            encoder.encode_descriptor("rq", "Streams handed out", None, MetricType::Counter)?;
        for (labels, counts) in &rows {
            ConstCounter::new(counts.rq_total).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

impl PoolMetrics {
    /// Makes the families and registers them under `pool_` in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let r = registry.sub_registry_with_prefix("pool");
        r.register("cx", "Connections dialed", metrics.cx.clone());
        r.register(
            "cx_connect_fail",
            "Failed dials",
            metrics.cx_connect_fail.clone(),
        );
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
        r.register(
            "rq_error",
            "Streams that ended with a transport error",
            metrics.rq_error.clone(),
        );
        r.register(
            "rq_pending_overflow",
            "Callers refused because the pool was full",
            metrics.rq_pending_overflow.clone(),
        );
        r.register_collector(Box::new(OccupancyCollector {
            pools: Arc::clone(&metrics.pools),
        }));
        metrics
    }

    /// Families that belong to no registry: for tests and benchmarks.
    pub fn unregistered() -> Self {
        Self::default()
    }

    /// Lists a pool for the scrape-time gauges.
    pub(crate) fn add_pool(&self, pool: Weak<dyn Source>) {
        self.pools.add(pool);
    }

    /// The counter series of one address, fetched once so the data path
    /// only touches atomics, and only on the rarer events.
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
            cx: self.cx.get_or_create_owned(&labels),
            cx_connect_fail: self.cx_connect_fail.get_or_create_owned(&labels),
            cx_overflow: self.cx_overflow.get_or_create_owned(&labels),
            cx_destroy: destroy,
            rq_error: self.rq_error.get_or_create_owned(&labels),
            rq_pending_overflow: self.rq_pending_overflow.get_or_create_owned(&labels),
        }
    }

    /// Drops the counter series of an address that is gone, so `/metrics`
    /// does not grow with every address a pool ever had. (Its gauges go
    /// with it: the collector reads only the addresses a pool still has.)
    pub(crate) fn remove_address(&self, pool: &str, address: &str) {
        let labels = AddressLabels {
            pool: pool.to_owned(),
            address: address.to_owned(),
        };
        for family in [
            &self.cx,
            &self.cx_connect_fail,
            &self.cx_overflow,
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

/// The counter series of one address, written on the events they count
/// (never on a plain acquire or release).
#[derive(Debug, Clone)]
pub(crate) struct AddressMetrics {
    pub(crate) cx: Counter,
    pub(crate) cx_connect_fail: Counter,
    pub(crate) cx_overflow: Counter,
    pub(crate) cx_destroy: [Counter; EvictionReason::ALL.len()],
    pub(crate) rq_error: Counter,
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
    fn series_are_named_after_envoy_and_go_with_the_address() {
        let mut registry = Registry::with_prefix("tidepool");
        let metrics = PoolMetrics::new(&mut registry);
        struct Fixed;
        impl Source for Fixed {
            fn counts(&self) -> (String, Vec<(String, AddressCounts)>) {
                let counts = AddressCounts {
                    cx_active: 3,
                    rq_total: 7,
                    observed_peak_streams: 37,
                    ..AddressCounts::default()
                };
                (
                    "shop/payments".to_owned(),
                    vec![("10.0.0.1:50051".to_owned(), counts)],
                )
            }
        }
        let fixed: Arc<dyn Source> = Arc::new(Fixed);
        metrics.add_pool(Arc::downgrade(&fixed));
        let a = metrics.address("shop/payments", "10.0.0.1:50051");
        a.cx_connect_fail.inc();
        a.evicted(EvictionReason::GoAway);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"tidepool_pool_cx_active{pool="shop/payments",address="10.0.0.1:50051"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tidepool_pool_rq_total{pool="shop/payments",address="10.0.0.1:50051"} 7"#
            ),
            "{text}"
        );
        assert!(
            text.contains("tidepool_pool_cx_connect_fail_total{"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tidepool_pool_observed_peak_streams{pool="shop/payments",address="10.0.0.1:50051"} 37"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"reason="goaway"} 1"#), "{text}");
        metrics.remove_address("shop/payments", "10.0.0.1:50051");
        // The pool lists the address no more (here: the pool is gone).
        drop(fixed);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(!text.contains("10.0.0.1:50051"), "{text}");
    }
}
