//! The pools the agent runs right now, the routes to them and their
//! dedicated listeners, replaced as a whole by [`Runtime::apply`].
//!
//! Every configuration source — a standalone file, the operator's
//! snapshots — hands the runtime a complete list of [`PoolConfig`]s. The
//! runtime checks all of it before touching anything, so a bad list changes
//! nothing and the last good configuration keeps running; a good list is
//! swapped in at once: pools that stay keep their connections and take the
//! new settings live, new pools start, removed pools drain.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use tidepool_crds::validate::{SpecErrors, check_address};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clients::ClientMap;
use crate::config::{PoolConfig, ProxyOptions};
use crate::metrics::{Metrics, PoolStreamMetrics};
use crate::pool::h2::H2Connector;
use crate::pool::{
    self, AddressOccupancy, Observation, ObserveWindow, Pool, PoolMetrics, SettingsError,
};
use crate::router::Routes;
use crate::shutdown::Drain;

/// Why a configuration was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A pool's spec breaks a ConnectionPool rule.
    #[error("pool {pool}: {errors}")]
    Invalid {
        /// `namespace/name`.
        pool: String,
        /// Every broken rule, by field.
        #[source]
        errors: SpecErrors,
    },
    /// A pool's settings are out of the pool's range.
    #[error("pool {pool}: {source}")]
    Settings {
        /// `namespace/name`.
        pool: String,
        /// The setting and its range.
        #[source]
        source: SettingsError,
    },
    /// A resolved address is not `host:port`.
    #[error("pool {pool}: address {message}")]
    Address {
        /// `namespace/name`.
        pool: String,
        /// The address and what is accepted.
        message: String,
    },
    /// Two entries have the same namespace and name.
    #[error("pool {pool} is listed twice")]
    Duplicate {
        /// `namespace/name`.
        pool: String,
    },
    /// Two pools ask for the same `listenPort`, or one asks for the agent's
    /// own proxy port.
    #[error("spec.listenPort {port} of pool {pool} is already used by {other}")]
    PortClash {
        /// The port.
        port: u16,
        /// `namespace/name` of the second pool.
        pool: String,
        /// Who has the port.
        other: String,
    },
    /// A dedicated listener could not be bound.
    #[error("spec.listenPort {port} of pool {pool}: cannot listen on {addr}: {source}")]
    Bind {
        /// The port.
        port: u16,
        /// `namespace/name`.
        pool: String,
        /// The address tried.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

/// What the runtime is built with.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// The IP the dedicated listeners bind (the shared listener's).
    pub listen_ip: IpAddr,
    /// The shared listener's port, which no pool may take.
    pub shared_port: u16,
    /// How backend connections are made.
    pub connector: H2Connector,
    /// How listeners serve clients.
    pub proxy: ProxyOptions,
    /// The window every pool observes its addresses over
    /// (`--observe-window`).
    pub observe_window: ObserveWindow,
}

/// One running pool.
pub struct PoolEntry {
    /// The configuration it runs.
    pub config: Arc<PoolConfig>,
    /// `namespace/name`.
    pub key: String,
    /// The settings in force, from the spec.
    pub settings: pool::Settings,
    /// The pool.
    pub pool: Pool<H2Connector>,
    /// Its stream metrics.
    pub metrics: PoolStreamMetrics,
}

impl std::fmt::Debug for PoolEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolEntry")
            .field("key", &self.key)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Everything one configuration produced; replaced whole, never edited.
#[derive(Debug, Default)]
pub struct Table {
    /// Pools by `namespace/name`.
    pub pools: HashMap<String, Arc<PoolEntry>>,
    /// Authorities to pools.
    pub routes: Routes,
    /// Dedicated listener ports to pools.
    pub ports: HashMap<u16, String>,
}

/// One pool's occupancy, for the operator and the admin page.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolReport {
    /// The resource's namespace.
    pub namespace: String,
    /// The resource's name.
    pub name: String,
    /// The resource's uid.
    pub uid: String,
    /// The generation running.
    pub generation: i64,
    /// The settings running.
    pub settings: pool::Settings,
    /// Every declared address, sorted (all zero for an unused one, its
    /// observation too but for the time the pool has watched), then any
    /// address still draining after it was removed.
    pub addresses: Vec<AddressOccupancy>,
    /// `spec.clients.namespaces`; `None` when every client may use it.
    pub clients: Option<Vec<String>>,
}

/// The running configuration. Cheap to clone: clones share it.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

/// Invariants:
/// - `table` holds the configuration in force; readers clone the `Arc`
///   under the read lock and drop the lock at once (a stream never holds it
///   across an await). Writers replace the whole `Arc`.
/// - `apply` is serialised by `applying`, held for the whole of an apply
///   (which never awaits): the table and `listeners` change together.
/// - `listeners` has one stop token per dedicated port in `table.ports`;
///   cancelling it stops that listener and drains its connections.
/// - A removed pool leaves the table first, so no new stream finds it; its
///   addresses are then retired, so idle connections close now and busy ones
///   when their last stream ends (leases keep the pool state alive).
/// - `clients` is replaced whole by [`Runtime::set_clients`], apart from
///   the table (the pod map changes with pods, the table with pools); a
///   stream reads it once, when it is admitted.
struct Inner {
    options: RuntimeOptions,
    /// Serves a pool's dedicated listener (the app passes the proxy's):
    /// the runtime decides which listeners exist, not how they are served.
    serve: ServeListener,
    /// Read on every request without a lock or a reference count
    /// ([`Runtime::with_table`]); replaced whole by `apply`.
    table: ArcSwap<Table>,
    /// The pod IPs of this node and their namespaces
    /// ([`crate::clients`]); empty until the operator sends one.
    clients: ArcSwap<ClientMap>,
    applying: Mutex<()>,
    listeners: Mutex<HashMap<u16, CancellationToken>>,
    changes: watch::Sender<u64>,
    metrics: Metrics,
    pool_metrics: PoolMetrics,
    drain: Drain,
}

/// Starts serving a dedicated listener: the listener, its port, the runtime
/// whose pools it serves, and the token that stops it.
pub type ServeListener =
    Arc<dyn Fn(tokio::net::TcpListener, u16, Runtime, CancellationToken) + Send + Sync>;

impl Runtime {
    /// A runtime with no pool. Dedicated listeners are served by `serve`
    /// and stop with `drain`.
    pub fn new(
        options: RuntimeOptions,
        serve: ServeListener,
        metrics: Metrics,
        pool_metrics: PoolMetrics,
        drain: Drain,
    ) -> Self {
        let (changes, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                options,
                serve,
                table: ArcSwap::from_pointee(Table::default()),
                clients: ArcSwap::from_pointee(ClientMap::default()),
                applying: Mutex::new(()),
                listeners: Mutex::new(HashMap::new()),
                changes,
                metrics,
                pool_metrics,
                drain,
            }),
        }
    }

    /// The configuration in force.
    pub fn table(&self) -> Arc<Table> {
        self.inner.table.load_full()
    }

    /// Runs `f` on the configuration in force, borrowed: the request path's
    /// way in (no lock, no reference count in the common case).
    pub fn with_table<R>(&self, f: impl FnOnce(&Table) -> R) -> R {
        f(&self.inner.table.load())
    }

    /// Runs `f` on the pod map in force, borrowed (the request path's way
    /// in, like [`Runtime::with_table`]).
    pub fn with_clients<R>(&self, f: impl FnOnce(&ClientMap) -> R) -> R {
        f(&self.inner.clients.load())
    }

    /// The pod map in force.
    pub fn clients(&self) -> Arc<ClientMap> {
        self.inner.clients.load_full()
    }

    /// Replaces the pod map: from now on new streams are admitted by it.
    /// Streams already admitted carry on.
    pub fn set_clients(&self, map: ClientMap) {
        self.inner.metrics.client_map(map.len());
        self.inner.clients.store(Arc::new(map));
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The drain every listener follows.
    pub fn drain(&self) -> &Drain {
        &self.inner.drain
    }

    /// Listener settings.
    pub fn proxy_options(&self) -> &ProxyOptions {
        &self.inner.options.proxy
    }

    /// Whether a configuration has been applied (for `/readyz`).
    pub fn is_configured(&self) -> bool {
        *self.inner.changes.borrow() > 0
    }

    /// Bumped after every successful apply; the value counts applies.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Replaces the configuration with `pools`, all or nothing.
    ///
    /// Everything is checked first: every spec against the ConnectionPool
    /// rules, every address, duplicate pools, `listenPort` clashes, and the
    /// binding of new dedicated listeners. On error nothing changes. On
    /// success the new table is swapped in at once: pools that stay keep
    /// their connections and get new settings and addresses live (no stream
    /// is cut), new pools start, removed pools and their listeners drain.
    ///
    /// Must be called inside a Tokio runtime (listeners are spawned on it).
    pub fn apply<P: Into<Arc<PoolConfig>>>(&self, pools: Vec<P>) -> Result<(), ApplyError> {
        // Shared, not copied: the control client keeps the same pools as
        // the base of the next delta.
        let result = self.try_apply(pools.into_iter().map(Into::into).collect());
        let pools = self.table().pools.len();
        self.inner.metrics.applied(result.is_ok(), pools);
        if let Err(error) = &result {
            tracing::warn!(%error, "configuration refused; the last good one keeps running");
        }
        result
    }

    fn try_apply(&self, pools: Vec<Arc<PoolConfig>>) -> Result<(), ApplyError> {
        let _applying = self
            .inner
            .applying
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let old = self.table();

        // 1. Check everything.
        let mut checked = Vec::with_capacity(pools.len());
        let mut keys = HashSet::new();
        let mut ports: HashMap<u16, String> = HashMap::new();
        for config in pools {
            let key = config.key();
            let settings = pool_settings(&key, &config)?;
            for address in &config.addresses {
                check_address(address).map_err(|message| ApplyError::Address {
                    pool: key.clone(),
                    message,
                })?;
            }
            if !keys.insert(key.clone()) {
                return Err(ApplyError::Duplicate { pool: key });
            }
            if let Some(port) = config.spec.listen_port {
                // Range-checked by `settings()` above.
                let port = u16::try_from(port).unwrap_or_default();
                if port == self.inner.options.shared_port {
                    return Err(ApplyError::PortClash {
                        port,
                        pool: key,
                        other: "the agent's shared listener".into(),
                    });
                }
                if let Some(other) = ports.insert(port, key.clone()) {
                    return Err(ApplyError::PortClash {
                        port,
                        pool: key,
                        other,
                    });
                }
            }
            checked.push((key, config, settings));
        }

        // 2. Bind the new ports; dropped again if one fails.
        let mut bound = Vec::new();
        {
            let running = self
                .inner
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (&port, key) in &ports {
                if running.contains_key(&port) {
                    continue;
                }
                let addr = SocketAddr::new(self.inner.options.listen_ip, port);
                let listener = bind(addr).map_err(|source| ApplyError::Bind {
                    port,
                    pool: key.clone(),
                    addr,
                    source,
                })?;
                bound.push((port, listener));
            }
        }

        // 3. Build the new table. Pools that stay are shared, not rebuilt.
        let mut entries = HashMap::with_capacity(checked.len());
        let mut changed = Vec::new();
        for (key, config, settings) in checked {
            let entry = match old.pools.get(&key) {
                Some(running) => {
                    changed.push((running.pool.clone(), settings, config.addresses.clone()));
                    PoolEntry {
                        key: key.clone(),
                        settings,
                        pool: running.pool.clone(),
                        metrics: running.metrics.clone(),
                        config,
                    }
                }
                None => {
                    let pool = Pool::with_window(
                        key.clone(),
                        settings,
                        self.inner.options.connector.clone(),
                        self.inner.pool_metrics.clone(),
                        self.inner.options.observe_window,
                    )
                    .map_err(|source| ApplyError::Settings {
                        pool: key.clone(),
                        source,
                    })?;
                    PoolEntry {
                        metrics: self.inner.metrics.pool(&key),
                        key: key.clone(),
                        settings,
                        pool,
                        config,
                    }
                }
            };
            entries.insert(key, Arc::new(entry));
        }
        let table = Table {
            routes: Routes::new(entries.values().map(|e| &*e.config)),
            pools: entries,
            ports,
        };
        let new_ports: HashSet<u16> = table.ports.keys().copied().collect();

        // 4. Swap, then settle what changed.
        self.inner.table.store(Arc::new(table));
        for (pool, settings, addresses) in changed {
            if pool.settings() != settings {
                // Checked in step 1.
                if let Err(error) = pool.reconfigure(settings) {
                    tracing::error!(pool = %pool.name(), %error, "reconfigure refused checked settings");
                }
            }
            pool.retain_addresses(&addresses);
        }
        let table = self.table();
        for (key, entry) in &old.pools {
            if !table.pools.contains_key(key) {
                tracing::info!(pool = %key, "pool removed; draining");
                entry.pool.retain_addresses(&[]);
                self.inner.metrics.remove_pool(key);
            }
        }
        {
            let mut running = self
                .inner
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            running.retain(|port, stop| {
                let keep = new_ports.contains(port);
                if !keep {
                    tracing::info!(port, "dedicated listener closed");
                    stop.cancel();
                }
                keep
            });
            for (port, listener) in bound {
                let stop = self.inner.drain.token().child_token();
                running.insert(port, stop.clone());
                tracing::info!(port, pool = %table.ports[&port], "dedicated listener started");
                (self.inner.serve)(listener, port, self.clone(), stop);
            }
        }
        self.inner.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Occupancy of every pool, sorted by `namespace/name`.
    pub fn report(&self) -> Vec<PoolReport> {
        let table = self.table();
        let mut reports: Vec<PoolReport> =
            table.pools.values().map(|entry| report(entry)).collect();
        reports.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        reports
    }
}

fn report(entry: &PoolEntry) -> PoolReport {
    let mut used: HashMap<String, AddressOccupancy> = entry
        .pool
        .snapshot()
        .into_iter()
        .map(|o| (o.address.clone(), o))
        .collect();
    let mut declared: Vec<&String> = entry.config.addresses.iter().collect();
    declared.sort();
    declared.dedup();
    let coverage = entry.pool.coverage();
    let mut addresses: Vec<AddressOccupancy> = declared
        .into_iter()
        .map(|a| used.remove(a).unwrap_or_else(|| unused(a, coverage)))
        .collect();
    let mut rest: Vec<AddressOccupancy> = used.into_values().collect();
    rest.sort_by(|a, b| a.address.cmp(&b.address));
    addresses.extend(rest);
    PoolReport {
        namespace: entry.config.namespace.clone(),
        name: entry.config.name.clone(),
        uid: entry.config.uid.clone(),
        generation: entry.config.generation,
        settings: entry.settings,
        addresses,
        clients: entry
            .config
            .spec
            .clients
            .as_ref()
            .map(|c| c.namespaces.iter().map(|n| n.0.clone()).collect()),
    }
}

/// An address the pool has not used: zero, observed idle for `coverage`
/// (the time its pool has watched).
fn unused(address: &str, coverage: std::time::Duration) -> AddressOccupancy {
    AddressOccupancy {
        address: address.to_owned(),
        connections: 0,
        busy: 0,
        idle: 0,
        streams: 0,
        overflow: 0,
        draining: 0,
        dials: 0,
        dial_failures: 0,
        overflow_total: 0,
        evictions: Default::default(),
        waiters: 0,
        observed: Observation {
            window: coverage,
            ..Observation::default()
        },
    }
}

/// The pool settings of a spec, every CRD rule and every pool range
/// checked.
pub fn pool_settings(key: &str, config: &PoolConfig) -> Result<pool::Settings, ApplyError> {
    let s = config
        .spec
        .settings()
        .map_err(|errors| ApplyError::Invalid {
            pool: key.to_owned(),
            errors,
        })?;
    let settings = pool::Settings {
        size: s.size as usize,
        ttl: s.ttl,
        max_idle: s.max_idle as usize,
        max_streams: s.max_streams,
        when_full: if s.wait_when_full {
            pool::WhenFull::Wait
        } else {
            pool::WhenFull::Overflow
        },
        acquire_timeout: s.acquire_timeout,
    };
    settings.validate().map_err(|source| ApplyError::Settings {
        pool: key.to_owned(),
        source,
    })?;
    Ok(settings)
}

/// Binds a listener the way the shared one is bound.
pub fn bind(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}
