//! The stream pool: go-micro's linked-list gRPC connection pool, made
//! concurrent, correct and observable.
//!
//! Per address the pool keeps go-micro's `streamsPool`: an *available* list
//! of connections below their stream cap and a *busy* list of connections at
//! it, index-linked in a slab (`list`), so taking a stream and moving a
//! connection between the lists are O(1). The settings keep go-micro's
//! meanings ([`Settings`]). What tidepool changes:
//!
//! 1. One lock per address, found through a map read without locking; no
//!    lock is held across a dial, a handshake or a close (closing is
//!    dropping the connection handle, done after the lock is released).
//! 2. One dial in flight per address; concurrent misses queue for it.
//! 3. TTL with ±10% jitter, enforced on busy connections too: past it a
//!    connection takes no new stream and closes at its last one. Each
//!    connection has a watcher task whose timer retires it on time.
//! 4. Only [`Outcome::TransportError`] and [`Outcome::ProtocolError`] evict
//!    a connection.
//! 5. A stream is released exactly once, by the [`Lease`] guard's `Drop`
//!    when not by [`Lease::finish`], so cancellation cannot leak or double
//!    count.
//! 6. A connection's cap is min(`max_streams`, the server's
//!    SETTINGS_MAX_CONCURRENT_STREAMS), updated when the server changes it.
//! 7. Dead connections are found by keepalive PING and GOAWAY: the
//!    connector reports them ([`ConnEvent`]) and the pool retires them.
//! 8. When full: [`WhenFull::Overflow`] (go-micro's unpooled dial, counted) or
//!    [`WhenFull::Wait`] (a bounded FIFO queue, then [`Error::Full`]).
//! 9. [`Pool::reconfigure`] applies new settings live without cutting a
//!    stream.
//! 10. [`Pool::snapshot`] reports occupancy per address, and
//!     [`PoolMetrics`] exports it to Prometheus.
//! 11. Each address is observed over a sliding window ([`observe`]): peaks
//!     of streams and of connections in use, waits, overflow, dials and
//!     closes, for the operator's tuning advice. A sampler task per pool
//!     reads every address once a second; the data path only keeps the
//!     peaks (a compare and a store where the counts grow).
//!
//! Connections come from a [`Connector`]: [`h2::H2Connector`] opens h2c
//! HTTP/2 connections for the agent's proxy; [`memory::MemoryConnector`]
//! makes in-process ones for tests and benchmarks.
//!
//! Metrics: create one [`PoolMetrics`] per process with
//! [`PoolMetrics::new`]`(&mut registry)` and pass a clone to every
//! [`Pool::new`]; each series is labelled `{pool, address}` (see
//! [`metrics`] for the list).

mod address;
pub mod connector;
mod error;
pub mod h2;
mod lease;
pub(crate) mod list;
pub mod load;
pub mod memory;
pub mod metrics;
pub mod observe;
mod occupancy;
mod outcome;
mod settings;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use address::{Address, Effects, Hooks, Miss, WaiterMsg};

pub use connector::{CloseReason, ConnEvent, Connected, Connector};
pub use error::{Error, Result};
pub use lease::Lease;
pub use metrics::PoolMetrics;
pub use observe::{Closes, Observation, ObserveWindow, ObserveWindowError};
pub use outcome::Outcome;

use metrics::{AddressCounts, Source};
pub use occupancy::{AddressOccupancy, ConnectionInfo, ConnectionState, EvictionReason, Evictions};
pub use settings::{MAX_WAITERS, Settings, SettingsError, WhenFull};

/// The addresses of a pool, by name. Replaced whole (copy on write) when an
/// address is added or removed, which is rare; read on every acquire.
/// foldhash: addresses are trusted strings from the operator's snapshot, so
/// a fast unkeyed hash is enough.
type AddressMap<Conn> = HashMap<String, Arc<Address<Conn>>, foldhash::fast::FixedState>;

/// A pool of connections to every address of one ConnectionPool.
///
/// Cheap to clone: clones share one pool.
pub struct Pool<C: Connector> {
    inner: Arc<Inner<C>>,
}

impl<C: Connector> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

/// The shared part of a [`Pool`].
///
/// Invariants:
/// - References: [`Pool`] clones hold `Arc<Inner>`; dial tasks hold one for
///   the length of a dial; addresses hold only a `Weak` (as `dyn Hooks`), so
///   leases outliving the pool do not keep it alive.
/// - The address map is read lock-free (`ArcSwap`: a lookup writes only the
///   reading thread's own slot, so threads acquiring on the same addresses
///   share no lock word for it) and replaced whole under `writer` when an
///   address is added or removed. Each address's own state is under its own
///   lock ([`Address`]). `writer` may be held while taking `settings` or an
///   address lock, never the other way round.
/// - `settings` guards the pool-wide copy of the settings that new addresses
///   start from. It changes under `writer`, and the list of addresses to
///   update is read under it too; an address created meanwhile reads
///   `settings` under `writer`, so it cannot miss the change.
/// - `runtime` is set once, by [`Inner::start`], which also starts the
///   sampler: one per pool, holding only a `Weak`, so it ends at its first
///   tick after the pool is dropped.
struct Inner<C: Connector> {
    name: String,
    connector: C,
    settings: Mutex<Settings>,
    addresses: ArcSwap<AddressMap<C::Conn>>,
    writer: Mutex<()>,
    metrics: PoolMetrics,
    /// Bumped on every reconfigure: connection watchers recompute their TTL
    /// deadline.
    settings_changed: watch::Sender<()>,
    /// The runtime dial, watcher and sampler tasks run on, taken when the
    /// pool is made inside one or else from the first `acquire` (a lease
    /// may be dropped outside any runtime).
    runtime: OnceLock<Handle>,
    /// The observation window's length.
    window: ObserveWindow,
    /// When the sampler started: the origin of every address's buckets.
    sampling_since: OnceLock<Instant>,
}

/// How often the sampler reads every address of a pool.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

impl<C: Connector> Pool<C> {
    /// Makes a pool named `name` (its ConnectionPool's `namespace/name`,
    /// used in errors and metric labels), observed over the default window
    /// ([`ObserveWindow::DEFAULT`]). Refuses out-of-range settings.
    pub fn new(
        name: impl Into<String>,
        settings: Settings,
        connector: C,
        metrics: PoolMetrics,
    ) -> Result<Self, SettingsError> {
        Self::with_window(name, settings, connector, metrics, ObserveWindow::DEFAULT)
    }

    /// [`Pool::new`] with an observation window of `window`.
    pub fn with_window(
        name: impl Into<String>,
        settings: Settings,
        connector: C,
        metrics: PoolMetrics,
        window: ObserveWindow,
    ) -> Result<Self, SettingsError> {
        settings.validate()?;
        let (settings_changed, _) = watch::channel(());
        let inner = Arc::new(Inner {
            name: name.into(),
            connector,
            settings: Mutex::new(settings),
            addresses: ArcSwap::from_pointee(AddressMap::default()),
            writer: Mutex::new(()),
            metrics,
            settings_changed,
            runtime: OnceLock::new(),
            window,
            sampling_since: OnceLock::new(),
        });
        let source: Weak<dyn Source> = Arc::downgrade(&inner) as Weak<dyn Source>;
        inner.metrics.add_pool(source);
        if let Ok(handle) = Handle::try_current() {
            inner.start(handle);
        }
        Ok(Self { inner })
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The connector the pool dials with.
    pub fn connector(&self) -> &C {
        &self.inner.connector
    }

    /// Takes one stream on a connection to `addr`, dialing if the address
    /// has no connection with a free stream and room for one more.
    ///
    /// When the address is full this dials an unpooled connection
    /// ([`WhenFull::Overflow`]) or queues until a stream frees up, at most
    /// `acquire_timeout` ([`WhenFull::Wait`]). A failed dial is returned to
    /// every caller waiting for it as [`Error::Dial`] naming the address.
    /// Cancelling the returned future at any point leaks nothing.
    pub async fn acquire(&self, addr: &str) -> Result<Lease<C::Conn>, Error> {
        if self.inner.runtime.get().is_none() {
            self.inner.start(Handle::current());
        }
        match self.inner.try_take(addr) {
            Some(lease) => Ok(lease),
            // Boxed: the slow path's state (dial, queue, overflow) is
            // kilobytes, and would otherwise be part of every caller's
            // future, copied whole on every spawn, hit or miss.
            None => Box::pin(self.acquire_slow(addr)).await,
        }
    }

    /// [`Pool::acquire`] when the fast path found no free stream: creates
    /// the address, dials, queues.
    async fn acquire_slow(&self, addr: &str) -> Result<Lease<C::Conn>, Error> {
        // The clock is read once per try, before taking the lock; the first
        // reading is when the caller started waiting.
        let mut started = None;
        let mut address = self.inner.address(addr);
        loop {
            let mut fx = Effects::default();
            let now = Instant::now();
            let started = *started.get_or_insert(now);
            let miss = {
                let mut state = address.lock();
                if state.retired() {
                    drop(state);
                    address = self.inner.address(addr);
                    continue;
                }
                // Queued callers come first (FIFO): a newcomer takes a
                // stream directly only when nobody waits.
                if !state.has_waiters()
                    && let Some(grant) = state.take(now, &address.metrics, &mut fx)
                {
                    drop(state);
                    fx.run(&address);
                    return Ok(Lease::new(grant));
                }
                let settings = *state.settings();
                let miss = state.miss(&mut fx);
                miss.map(|miss| (miss, settings))
            };
            fx.run(&address);
            let (miss, settings) = match miss {
                Ok(found) => found,
                Err(()) => return Err(self.full(&address, started)),
            };
            match miss {
                Miss::Overflow => return self.overflow(address).await,
                Miss::Wait(slot) => {
                    let mut waiter = Waiter {
                        address: Arc::clone(&address),
                        key: slot.key,
                        id: slot.id,
                        rx: slot.rx,
                        queued: now,
                    };
                    let msg = if settings.when_full == WhenFull::Wait {
                        let deadline = started + settings.acquire_timeout;
                        match tokio::time::timeout_at(deadline, &mut waiter.rx).await {
                            Ok(msg) => msg,
                            Err(_elapsed) => return Err(self.full(&address, started)),
                        }
                    } else {
                        // Overflow mode waits only for the dial in flight,
                        // which the connector bounds.
                        (&mut waiter.rx).await
                    };
                    match msg {
                        Ok(WaiterMsg::Grant(grant)) => return Ok(Lease::new(grant)),
                        Ok(WaiterMsg::Retry) => continue,
                        Ok(WaiterMsg::Failed(error)) => return Err(error),
                        // The sender went with the address's state; start over.
                        Err(_closed) => continue,
                    }
                }
            }
        }
    }

    /// Counts and builds a "pool full" error.
    fn full(&self, address: &Address<C::Conn>, started: Instant) -> Error {
        address.metrics.rq_pending_overflow.inc();
        address.lock().refused();
        Error::Full {
            pool: self.inner.name.clone(),
            addr: address.name.clone(),
            waited: started.elapsed(),
        }
    }

    /// Dials an unpooled connection for one stream (go-micro's behaviour when
    /// full). Cancelled mid-dial, the connection is simply dropped.
    async fn overflow(&self, address: Arc<Address<C::Conn>>) -> Result<Lease<C::Conn>, Error> {
        let result = self.inner.connector.connect(&address.name).await;
        let mut fx = Effects::default();
        let outcome = {
            let mut state = address.lock();
            let now = Instant::now();
            match result {
                Err(source) => {
                    state.dial_failed(now, &address);
                    Err(Error::Dial {
                        addr: address.name.clone(),
                        source: Arc::new(source),
                    })
                }
                Ok(_) if state.retired() => Err(Error::Removed {
                    pool: self.inner.name.clone(),
                    addr: address.name.clone(),
                }),
                Ok(connected) => match state.insert(&address, connected, true, now, &mut fx) {
                    (Some(grant), watch) => Ok((grant, watch)),
                    (None, _) => unreachable!("an overflow insert always grants its stream"),
                },
            }
        };
        fx.run(&address);
        let (grant, watch) = outcome?;
        if let Some(watch) = watch {
            self.inner.spawn_watch(&address, watch);
        }
        Ok(Lease::new(grant))
    }

    /// Applies new settings to every address without cutting a stream; the
    /// next acquire uses them. Refuses out-of-range settings and then
    /// changes nothing.
    pub fn reconfigure(&self, settings: Settings) -> Result<(), SettingsError> {
        settings.validate()?;
        let addresses = {
            let _writer = self.inner.write_lock();
            *self
                .inner
                .settings
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = settings;
            self.inner.addresses()
        };
        for address in addresses {
            let mut fx = Effects::default();
            address
                .lock()
                .reconfigure(settings, Instant::now(), &address.metrics, &mut fx);
            fx.run(&address);
        }
        self.inner.settings_changed.send_replace(());
        Ok(())
    }

    /// The settings in force.
    pub fn settings(&self) -> Settings {
        *self
            .inner
            .settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps only the addresses in `keep`. The others leave the pool: idle
    /// connections close now, busy ones when their last stream ends, queued
    /// callers get [`Error::Removed`], and their metric series go away.
    pub fn retain_addresses(&self, keep: &[String]) {
        let gone = {
            let _writer = self.inner.write_lock();
            let current = self.inner.addresses.load_full();
            let (kept, gone): (AddressMap<C::Conn>, AddressMap<C::Conn>) = current
                .iter()
                .map(|(name, address)| (name.clone(), Arc::clone(address)))
                .partition(|(name, _)| keep.iter().any(|k| k == name));
            if !gone.is_empty() {
                self.inner.addresses.store(Arc::new(kept));
            }
            gone
        };
        for address in gone.into_values() {
            let mut fx = Effects::default();
            address.lock().retire_address(
                &self.inner.name,
                &address.name,
                &address.metrics,
                &mut fx,
            );
            fx.run(&address);
            self.inner
                .metrics
                .remove_address(&self.inner.name, &address.name);
        }
    }

    /// Open streams to `addr` (0 for an address the pool has not used), for
    /// power-of-two-choices load balancing.
    pub fn active_streams(&self, addr: &str) -> usize {
        self.inner
            .with_address(addr, |a| a.lock().streams())
            .unwrap_or(0)
    }

    /// The balancer's cost of one more stream to `addr` at `now`
    /// ([`load::now_nanos`]): `None` while its dials are in backoff, 0 for
    /// an address no stream has used yet. Reads no lock.
    pub fn cost(&self, addr: &str, now: u64) -> Option<usize> {
        self.inner
            .with_address(addr, |a| a.load.cost(now))
            .unwrap_or(Some(0))
    }

    /// Whether the last dial to `addr` failed recently (backoff doubles from
    /// 250 ms to 10 s with failures in a row, and ends at the next
    /// successful dial).
    pub fn in_backoff(&self, addr: &str) -> bool {
        self.inner
            .with_address(addr, |a| a.load.in_backoff(load::now_nanos()))
            .unwrap_or(false)
    }

    /// Occupancy of every address, sorted by address. Each address is read
    /// under its own lock, so each entry is consistent.
    pub fn snapshot(&self) -> Vec<AddressOccupancy> {
        let mut out: Vec<AddressOccupancy> = self
            .inner
            .addresses()
            .iter()
            .map(|a| {
                let observed = a.observed();
                a.lock().occupancy(&a.name, observed)
            })
            .collect();
        out.sort_by(|a, b| a.address.cmp(&b.address));
        out
    }

    /// How much of the observation window the pool has watched, in whole
    /// buckets: what an address the pool has not used reports as its
    /// [`Observation::window`], with every count zero (the pool had no
    /// stream on it all that time). Zero before the pool has a runtime.
    pub fn coverage(&self) -> Duration {
        self.inner
            .sampling_since
            .get()
            .map_or(Duration::ZERO, |since| {
                self.inner.window.coverage(since.elapsed())
            })
    }

    /// The observation window's length.
    pub fn window(&self) -> ObserveWindow {
        self.inner.window
    }

    /// Every connection of `addr`, ordered by id (empty for an unknown
    /// address): for tests and debugging pages.
    pub fn connections(&self, addr: &str) -> Vec<ConnectionInfo> {
        self.inner
            .with_address(addr, |a| a.lock().connections())
            .unwrap_or_default()
    }
}

impl<C: Connector> Inner<C> {
    fn write_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on address `addr` if the pool has it, without cloning its
    /// `Arc`: the router asks for two addresses' streams on every request,
    /// and a clone would write the address's shared reference count.
    fn with_address<R>(&self, addr: &str, f: impl FnOnce(&Address<C::Conn>) -> R) -> Option<R> {
        self.addresses.load().get(addr).map(|a| f(a))
    }

    /// The fast path of [`Pool::acquire`]: a free stream on a known address
    /// nobody queues for, taken without an await. Clones no `Arc` but the
    /// connection's own (the lease's).
    fn try_take(&self, addr: &str) -> Option<Lease<C::Conn>> {
        let map = self.addresses.load();
        let address = map.get(addr)?;
        let mut fx = Effects::default();
        let grant = {
            let mut state = address.lock();
            if state.retired() || state.has_waiters() {
                return None;
            }
            state.take(Instant::now(), &address.metrics, &mut fx)
        };
        fx.run(address);
        grant.map(Lease::new)
    }

    /// The address `addr`, created on first use.
    fn address(self: &Arc<Self>, addr: &str) -> Arc<Address<C::Conn>> {
        if let Some(address) = self.addresses.load().get(addr) {
            return Arc::clone(address);
        }
        let _writer = self.write_lock();
        let current = self.addresses.load_full();
        if let Some(address) = current.get(addr) {
            return Arc::clone(address);
        }
        let settings = *self.settings.lock().unwrap_or_else(PoisonError::into_inner);
        let hooks: Weak<dyn Hooks<C::Conn>> = Arc::downgrade(self) as Weak<dyn Hooks<C::Conn>>;
        let since = self.sampling_since.get().map(|t| t.elapsed());
        let address = Arc::new(Address::new(
            addr.to_owned(),
            settings,
            self.metrics.address(&self.name, addr),
            hooks,
            observe::Window::new(self.window, since),
        ));
        let mut next = AddressMap::clone(&current);
        next.insert(addr.to_owned(), Arc::clone(&address));
        self.addresses.store(Arc::new(next));
        address
    }

    fn addresses(&self) -> Vec<Arc<Address<C::Conn>>> {
        self.addresses.load().values().cloned().collect()
    }

    /// Takes `handle` as the pool's runtime if it has none yet, and then
    /// starts the sampler on it.
    fn start(self: &Arc<Self>, handle: Handle) {
        if self.runtime.set(handle.clone()).is_err() {
            return;
        }
        let origin = *self.sampling_since.get_or_init(Instant::now);
        handle.spawn(sample(Arc::downgrade(self), origin));
    }

    fn runtime(&self) -> Handle {
        match self.runtime.get() {
            Some(handle) => handle.clone(),
            None => Handle::current(),
        }
    }

    fn spawn_watch(&self, address: &Arc<Address<C::Conn>>, watch: address::Watch) {
        let weak = Arc::downgrade(address);
        let settings_changed = self.settings_changed.subscribe();
        self.runtime()
            .spawn(address::watch(weak, watch, settings_changed));
    }
}

/// The pool's sampler: once a second, every address's sample into its
/// window. Holds the pool weakly and ends once it is gone.
async fn sample<C: Connector>(pool: Weak<Inner<C>>, origin: Instant) {
    let mut ticks = tokio::time::interval_at(origin, SAMPLE_EVERY);
    // After a stall, one sample for the missed seconds, on the grid; the
    // peaks cover the whole gap.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        let at = ticks.tick().await;
        let Some(inner) = pool.upgrade() else { return };
        let elapsed = at.saturating_duration_since(origin);
        for address in inner.addresses.load().values() {
            address.sample(elapsed);
        }
    }
}

/// A dropped pool retires every address: idle connections close now, busy
/// ones at their last stream. This also ends the reference cycle between an
/// address and its connections' cells (see `address::Cell`).
impl<C: Connector> Drop for Inner<C> {
    fn drop(&mut self) {
        for address in self.addresses.load().values() {
            let mut fx = Effects::default();
            address
                .lock()
                .retire_address(&self.name, &address.name, &address.metrics, &mut fx);
            fx.run(address);
        }
    }
}

impl<C: Connector> Source for Inner<C> {
    fn counts(&self) -> (String, Vec<(String, AddressCounts)>) {
        let counts = self
            .addresses()
            .iter()
            .map(|a| {
                let observed = a.observed();
                let counts = AddressCounts {
                    observed_peak_streams: observed.peak_streams,
                    ..a.lock().counts()
                };
                (a.name.clone(), counts)
            })
            .collect();
        (self.name.clone(), counts)
    }
}

impl<C: Connector> Hooks<C::Conn> for Inner<C> {
    fn spawn_dial(self: Arc<Self>, address: Arc<Address<C::Conn>>) {
        let runtime = self.runtime();
        runtime.spawn(async move {
            let result = self
                .connector
                .connect(&address.name)
                .await
                .map_err(|source| Error::Dial {
                    addr: address.name.clone(),
                    source: Arc::new(source),
                });
            if let Err(error) = &result {
                tracing::warn!(pool = %self.name, addr = %address.name, %error, "dial failed");
            }
            let mut fx = Effects::default();
            let watch = address
                .lock()
                .dial_done(&address, result, Instant::now(), &mut fx);
            if let Some(watch) = watch {
                self.spawn_watch(&address, watch);
            }
            fx.run(&address);
        });
    }
}

/// A caller's place in an address's queue. Dropped — served, timed out or
/// cancelled — it leaves the queue under the address lock, and a stream
/// granted to it after it stopped listening is released.
struct Waiter<Conn: Clone> {
    address: Arc<Address<Conn>>,
    key: usize,
    id: u64,
    rx: tokio::sync::oneshot::Receiver<WaiterMsg<Conn>>,
    /// When it joined the queue, for the observation's wait time.
    queued: Instant,
}

impl<Conn: Clone> Drop for Waiter<Conn> {
    fn drop(&mut self) {
        {
            let mut state = self.address.lock();
            state.leave_queue(self.key, self.id);
            state.waited(self.queued.elapsed());
        }
        // Granted just before the caller gave up: give the stream back.
        if let Ok(WaiterMsg::Grant(grant)) = self.rx.try_recv() {
            drop(Lease::new(grant));
        }
    }
}
