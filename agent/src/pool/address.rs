//! One address's share of the pool: go-micro's `streamsPool`, with its
//! available and busy lists, behind a lock of its own.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use slab::Slab;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::connector::{ConnEvent, Connected};
use super::error::Error;
use super::list::{Linked, Links, List};
use super::load::AddressLoad;
use super::metrics::{AddressCounts, AddressMetrics};
use super::observe::{Counters, Observation, Sample, Window};
use super::occupancy::{
    AddressOccupancy, ConnectionInfo, ConnectionState, EvictionReason, Evictions,
};
use super::outcome::Outcome;
use super::settings::{Settings, WhenFull};

/// TTL jitter: each connection lives `ttl × U(1 − JITTER, 1 + JITTER)`, so
/// connections dialed together do not all reconnect together.
pub(crate) const JITTER: f64 = 0.10;

/// The first dial backoff; it doubles with every failure in a row.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// The longest dial backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What an address needs from its pool without knowing the connector type.
pub(crate) trait Hooks<Conn>: Send + Sync {
    /// Runs one dial for `address` in a task of its own. The caller has set
    /// `dialing`; the task clears it.
    fn spawn_dial(self: Arc<Self>, address: Arc<Address<Conn>>);
}

/// One address of a pool.
///
/// Invariants (all under `state`'s lock, which guards every field of
/// [`State`] and nothing else):
/// - References: the pool's address map holds one `Arc` while the address
///   is declared; every connection's [`Cell`] (which leases share), queued
///   waiter and dial task holds another; connection watchers hold a
///   `Weak`. A removed address lives on, `retired`, until its last lease
///   ends.
/// - A connection is in exactly one place: the available list (below its
///   stream cap), the busy list (at its cap), draining, or overflow. Only
///   the two lists count toward `size`; `idle` counts listed connections with
///   no stream; `streams` is the sum of every connection's streams.
/// - A slab entry lives while it is listed or carries a stream, so a lease's
///   slab key stays valid until it is released. It is removed from the slab
///   at zero streams once it is unlisted, and the removed entry is dropped
///   after the lock is released ([`Effects`]): dropping the pool's `Conn`
///   clone is what closes the connection once no lease holds one.
/// - No lock is held across a dial, handshake or close; nothing in here
///   awaits.
/// - `window` (the observation window) has a lock of its own, taken by the
///   pool's sampler once a second and by reports; it is never held together
///   with `state`'s: the sampler reads a [`Sample`] under `state`, lets go,
///   then files it.
///
/// Layout: the lock word and the fields every acquire and release writes
/// (`State`'s first ones) share one cache line of their own, so two threads
/// taking streams on the same address move one line between them, not
/// several.
#[repr(C, align(64))]
pub(crate) struct Address<Conn> {
    state: Mutex<State<Conn>>,
    pub(crate) name: String,
    pub(crate) metrics: AddressMetrics,
    /// What the balancer reads, without the lock.
    pub(crate) load: AddressLoad,
    hooks: Weak<dyn Hooks<Conn>>,
    window: Mutex<Window>,
}

/// A connection in the slab.
pub(crate) struct Entry<Conn> {
    id: u64,
    /// What leases hold: one reference count per stream, and the connection
    /// closes when the last holder (this entry or a lease) lets go.
    cell: Arc<Cell<Conn>>,
    server_max: Option<u32>,
    born: Instant,
    /// This connection's TTL factor, in `[1 − JITTER, 1 + JITTER]`.
    jitter: f64,
    /// `born + ttl × jitter`, recomputed when `ttl` changes.
    expires: Instant,
    place: Place,
    links: Links,
    /// Dropping this (with the entry) ends the connection's watcher task.
    _stop: Option<oneshot::Sender<()>>,
}

impl<Conn> Linked for Entry<Conn> {
    fn links(&self) -> &Links {
        &self.links
    }
    fn links_mut(&mut self) -> &mut Links {
        &mut self.links
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Available,
    Busy,
    Draining(EvictionReason),
    Overflow,
}

/// A pooled connection as a lease sees it: the connection, and where to
/// give the stream back.
///
/// The cell holds its address strongly so a lease needs one reference count
/// (the cell's) instead of two (address and connection): taking a stream
/// writes one shared counter, not two. That makes a cycle while the entry
/// is in its address's slab (address → slab → cell → address); it ends when
/// the entry leaves the slab, which happens for every connection once its
/// address is retired and its last stream ends — the pool retires every
/// address when it is dropped.
pub(crate) struct Cell<Conn> {
    pub(crate) conn: Conn,
    pub(crate) address: Arc<Address<Conn>>,
    pub(crate) key: usize,
    pub(crate) id: u64,
    /// The connection's open streams. Read and written only under the
    /// address lock (`Relaxed` is enough); kept here rather than in the slab
    /// entry because taking a stream writes this cache line anyway (the
    /// lease's reference count), so the entry's line stays read-only on the
    /// fast path.
    streams: AtomicU32,
}

impl<Conn> Entry<Conn> {
    fn streams(&self) -> u32 {
        self.cell.streams.load(Ordering::Relaxed)
    }

    fn set_streams(&self, streams: u32) {
        self.cell.streams.store(streams, Ordering::Relaxed);
    }
}

/// A stream taken on a connection, not yet wrapped in a lease.
pub(crate) struct Grant<Conn>(pub(crate) Arc<Cell<Conn>>);

/// What a queued caller is told.
pub(crate) enum WaiterMsg<Conn> {
    /// A stream, taken for it.
    Grant(Grant<Conn>),
    /// Try again from the top (the address became full in Overflow mode,
    /// or the settings changed).
    Retry,
    /// Give up with this error.
    Failed(Error),
}

struct Waiter<Conn> {
    id: u64,
    tx: oneshot::Sender<WaiterMsg<Conn>>,
    links: Links,
}

impl<Conn> Linked for Waiter<Conn> {
    fn links(&self) -> &Links {
        &self.links
    }
    fn links_mut(&mut self) -> &mut Links {
        &mut self.links
    }
}

/// Work found under the lock and done after it is released.
pub(crate) struct Effects<Conn> {
    /// Connections removed from the pool; dropping them closes them.
    closed: Vec<Entry<Conn>>,
    /// A dial was reserved (`dialing` set) and must be started.
    dial: bool,
}

impl<Conn> Default for Effects<Conn> {
    fn default() -> Self {
        Self {
            closed: Vec::new(),
            dial: false,
        }
    }
}

impl<Conn> Effects<Conn> {
    /// Closes what was removed and starts the reserved dial. Call with no
    /// lock held.
    pub(crate) fn run(self, address: &Arc<Address<Conn>>) {
        drop(self.closed);
        if self.dial {
            match address.hooks.upgrade() {
                Some(hooks) => hooks.spawn_dial(Arc::clone(address)),
                // The pool is gone; nobody can wait for this address any more.
                None => address.lock().dialing = false,
            }
        }
    }
}

/// The fields an [`Address`]'s lock guards. The first seven are the ones the
/// fast path writes or checks; they sit next to the lock word (see
/// [`Address`]), everything after them is read-mostly.
#[repr(C)]
pub(crate) struct State<Conn> {
    streams: usize,
    idle: usize,
    /// Streams handed out since the address was first used (`rq_total`).
    requests: u64,
    /// The most `streams` since the last [`State::sample`]; never below
    /// `streams`.
    peak_streams: usize,
    /// The most connections carrying a stream (`conns.len() - idle`) since
    /// the last [`State::sample`]; never below the current number.
    peak_in_use: usize,
    dialing: bool,
    retired: bool,
    settings: Settings,
    conns: Slab<Entry<Conn>>,
    available: List,
    busy: List,
    overflow: usize,
    draining: usize,
    waiters: Slab<Waiter<Conn>>,
    queue: List,
    next_id: u64,
    failures_in_row: u32,
    dials: u64,
    dial_failures: u64,
    overflow_total: u64,
    evictions: Evictions,
    /// The SETTINGS_MAX_CONCURRENT_STREAMS last advertised by one of the
    /// address's connections (at its dial or later); `None` for none.
    server_max: Option<u32>,
    /// Callers that queued ([`Miss::Wait`]), since the address was first used.
    waits: u64,
    /// The time they spent queued, summed.
    wait_time: Duration,
    /// Callers refused with [`Error::Full`].
    wait_timeouts: u64,
}

/// What a caller that found no free stream should do.
pub(crate) enum Miss<Conn> {
    /// Wait on this queue slot.
    Wait(WaiterSlot<Conn>),
    /// Dial an unpooled connection.
    Overflow,
}

/// A caller's place in the waiter queue.
pub(crate) struct WaiterSlot<Conn> {
    pub(crate) key: usize,
    pub(crate) id: u64,
    pub(crate) rx: oneshot::Receiver<WaiterMsg<Conn>>,
}

/// What a dial task learned, handed back so the pool can start a watcher.
pub(crate) struct Watch {
    pub(crate) key: usize,
    pub(crate) id: u64,
    pub(crate) events: mpsc::UnboundedReceiver<ConnEvent>,
    pub(crate) stop: oneshot::Receiver<()>,
}

impl<Conn: Clone> Address<Conn> {
    pub(crate) fn new(
        name: String,
        settings: Settings,
        metrics: AddressMetrics,
        hooks: Weak<dyn Hooks<Conn>>,
        window: Window,
    ) -> Self {
        Self {
            name,
            metrics,
            load: AddressLoad::default(),
            hooks,
            window: Mutex::new(window),
            state: Mutex::new(State {
                settings,
                conns: Slab::new(),
                available: List::default(),
                busy: List::default(),
                idle: 0,
                streams: 0,
                overflow: 0,
                draining: 0,
                dialing: false,
                retired: false,
                waiters: Slab::new(),
                queue: List::default(),
                next_id: 0,
                failures_in_row: 0,
                dials: 0,
                dial_failures: 0,
                overflow_total: 0,
                evictions: Evictions::default(),
                requests: 0,
                peak_streams: 0,
                peak_in_use: 0,
                server_max: None,
                waits: 0,
                wait_time: Duration::ZERO,
                wait_timeouts: 0,
            }),
        }
    }
}

impl<Conn> Address<Conn> {
    /// Locks the state. A panic under the lock leaves counts that are still
    /// each a consistent step, so poisoning is ignored rather than spread.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State<Conn>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<Conn: Clone> Address<Conn> {
    /// Files this second's sample in the observation window (the sampler
    /// calls it once a second, `elapsed` after it started).
    pub(crate) fn sample(&self, elapsed: Duration) {
        let sample = self.lock().sample();
        self.window().record(elapsed, sample);
    }

    /// The observation over the window's whole buckets.
    pub(crate) fn observed(&self) -> Observation {
        self.window().observed()
    }

    fn window(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<Conn: Clone> State<Conn> {
    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    pub(crate) fn retired(&self) -> bool {
        self.retired
    }

    pub(crate) fn streams(&self) -> usize {
        self.streams
    }

    pub(crate) fn has_waiters(&self) -> bool {
        self.queue.len() > 0
    }

    fn pooled(&self) -> usize {
        self.available.len() + self.busy.len()
    }

    /// Room for one more pooled connection, counting the dial in flight.
    fn can_dial(&self) -> bool {
        !self.retired && self.pooled() + usize::from(self.dialing) < self.settings.size
    }

    fn cap(&self, entry: &Entry<Conn>) -> u32 {
        self.settings
            .max_streams
            .min(entry.server_max.unwrap_or(u32::MAX))
    }

    fn expires(&self, entry: &Entry<Conn>) -> Instant {
        entry.expires
    }

    fn entry(&self, key: usize, id: u64) -> Option<&Entry<Conn>> {
        self.conns.get(key).filter(|e| e.id == id)
    }

    /// Takes a stream on the first usable connection of the available list.
    ///
    /// Amortised O(1): a connection found past its TTL leaves the list for
    /// good (draining, or closed if it has no stream), and one found at its
    /// cap moves to the busy list; each costs one step, once. This is where
    /// go-micro rescans expired busy connections on every call.
    pub(crate) fn take(
        &mut self,
        now: Instant,
        m: &AddressMetrics,
        fx: &mut Effects<Conn>,
    ) -> Option<Grant<Conn>> {
        while let Some(key) = self.available.front() {
            let entry = &self.conns[key];
            if now >= self.expires(entry) {
                self.retire(key, EvictionReason::Ttl, m, fx);
                continue;
            }
            let cap = self.cap(entry);
            let streams = entry.streams();
            if streams >= cap {
                self.move_to(key, Place::Busy);
                continue;
            }
            if streams == 0 {
                self.idle -= 1;
                // Every slab entry but the idle listed ones carries a stream.
                self.peak_in_use = self.peak_in_use.max(self.conns.len() - self.idle);
            }
            entry.set_streams(streams + 1);
            self.streams += 1;
            self.peak_streams = self.peak_streams.max(self.streams);
            let grant = Grant(Arc::clone(&entry.cell));
            if streams + 1 >= cap {
                self.move_to(key, Place::Busy);
            }
            self.requests += 1;
            return Some(grant);
        }
        None
    }

    /// Decides what a caller that found no free stream does. `Err` is a
    /// refusal (the queue is full).
    pub(crate) fn miss(&mut self, fx: &mut Effects<Conn>) -> Result<Miss<Conn>, ()> {
        if self.can_dial() && !self.dialing {
            self.dialing = true;
            fx.dial = true;
        }
        if !self.dialing && self.settings.when_full == WhenFull::Overflow {
            return Ok(Miss::Overflow);
        }
        if self.queue.len() >= super::settings::MAX_WAITERS {
            // Overflow never refuses: past the queue's bound a caller dials
            // a connection of its own, as go-micro does for every miss.
            return match self.settings.when_full {
                WhenFull::Overflow => Ok(Miss::Overflow),
                WhenFull::Wait => Err(()),
            };
        }
        let (tx, rx) = oneshot::channel();
        let id = self.next_id;
        self.next_id += 1;
        self.waits += 1;
        let key = self.waiters.insert(Waiter {
            id,
            tx,
            links: Links::default(),
        });
        self.queue.push_back(&mut self.waiters, key);
        Ok(Miss::Wait(WaiterSlot { key, id, rx }))
    }

    /// Takes a waiter off the queue if it is still on it (it gave up).
    pub(crate) fn leave_queue(&mut self, key: usize, id: u64) {
        if self.waiters.get(key).is_some_and(|w| w.id == id) {
            self.queue.unlink(&mut self.waiters, key);
            self.waiters.remove(key);
        }
    }

    /// Hands free streams to queued callers, oldest first; reserves a dial if
    /// they need one and there is room; in Overflow mode sends them to dial
    /// their own connection when the address is full.
    pub(crate) fn serve_waiters(
        &mut self,
        now: Instant,
        m: &AddressMetrics,
        fx: &mut Effects<Conn>,
    ) {
        while let Some(key) = self.queue.front() {
            if self.retired {
                // Unreachable in practice (retiring empties the queue and a
                // retired address takes no waiter), but safe: start over.
                while let Some(key) = self.queue.pop_front(&mut self.waiters) {
                    let _ = self.waiters.remove(key).tx.send(WaiterMsg::Retry);
                }
                return;
            }
            let Some(grant) = self.take(now, m, fx) else {
                if self.dialing {
                    return;
                }
                if self.can_dial() {
                    self.dialing = true;
                    fx.dial = true;
                    return;
                }
                if self.settings.when_full == WhenFull::Overflow {
                    while let Some(key) = self.queue.pop_front(&mut self.waiters) {
                        // A closed receiver means the waiter is gone already.
                        let _ = self.waiters.remove(key).tx.send(WaiterMsg::Retry);
                    }
                }
                return;
            };
            self.queue.unlink(&mut self.waiters, key);
            let waiter = self.waiters.remove(key);
            if let Err(WaiterMsg::Grant(grant)) = waiter.tx.send(WaiterMsg::Grant(grant)) {
                // Cannot happen while the waiter's guard is alive (it leaves
                // the queue under this lock before dropping its receiver),
                // but if it did, the stream goes straight back.
                self.release(grant.0.key, Outcome::Ok, m, fx);
            }
        }
    }

    /// Fails every queued caller with `error` (pool and address names are
    /// filled in by the waiter, which knows them).
    fn fail_waiters(&mut self, error: &Error) {
        while let Some(key) = self.queue.pop_front(&mut self.waiters) {
            let _ = self
                .waiters
                .remove(key)
                .tx
                .send(WaiterMsg::Failed(error.clone()));
        }
    }

    /// Adds a freshly dialed connection. Pooled (`overflow == false`) it joins
    /// the front of the available list idle, and queued callers get its
    /// streams; overflow, it carries one stream for the caller that dialed
    /// it, whose grant is returned.
    pub(crate) fn insert(
        &mut self,
        address: &Arc<Address<Conn>>,
        connected: Connected<Conn>,
        overflow: bool,
        now: Instant,
        fx: &mut Effects<Conn>,
    ) -> (Option<Grant<Conn>>, Option<Watch>) {
        let m = &address.metrics;
        self.dials += 1;
        m.cx.inc();
        self.failures_in_row = 0;
        self.server_max = connected.max_concurrent_streams;
        address.load.clear_backoff();
        let (stop_tx, stop_rx) = oneshot::channel();
        let jitter = rand::random_range((1.0 - JITTER)..=(1.0 + JITTER));
        let id = self.next_id;
        self.next_id += 1;
        let key = self.conns.vacant_key();
        let entry = Entry {
            id,
            cell: Arc::new(Cell {
                conn: connected.conn,
                address: Arc::clone(address),
                key,
                id,
                streams: AtomicU32::new(0),
            }),
            server_max: connected.max_concurrent_streams,
            born: now,
            jitter,
            expires: now + self.settings.ttl.mul_f64(jitter),
            place: Place::Overflow,
            links: Links::default(),
            _stop: Some(stop_tx),
        };
        self.conns.insert(entry);
        let watch = Watch {
            key,
            id,
            events: connected.events,
            stop: stop_rx,
        };
        if overflow {
            self.overflow += 1;
            self.overflow_total += 1;
            m.cx_overflow.inc();
            let entry = &self.conns[key];
            entry.set_streams(1);
            self.streams += 1;
            self.requests += 1;
            self.peak_streams = self.peak_streams.max(self.streams);
            self.peak_in_use = self.peak_in_use.max(self.conns.len() - self.idle);
            let grant = Grant(Arc::clone(&entry.cell));
            return (Some(grant), Some(watch));
        }
        if self.pooled() >= self.settings.size || self.retired {
            // `size` was lowered (or the address removed) while dialing.
            let reason = if self.retired {
                EvictionReason::Removed
            } else {
                EvictionReason::Resize
            };
            self.evictions.bump(reason);
            m.evicted(reason);
            fx.closed.push(self.conns.remove(key));
            self.serve_waiters(now, m, fx);
            return (None, None);
        }
        self.conns[key].place = Place::Available;
        self.available.push_front(&mut self.conns, key);
        self.idle += 1;
        self.serve_waiters(now, m, fx);
        self.settle_idle(key, m, fx);
        (None, Some(watch))
    }

    /// Ends the dial in flight: on success through [`State::insert`], on
    /// failure here, failing every queued caller with the dial's error.
    pub(crate) fn dial_done(
        &mut self,
        address: &Arc<Address<Conn>>,
        result: Result<Connected<Conn>, Error>,
        now: Instant,
        fx: &mut Effects<Conn>,
    ) -> Option<Watch> {
        self.dialing = false;
        match result {
            Ok(connected) => self.insert(address, connected, false, now, fx).1,
            Err(error) => {
                self.dial_failed(now, address);
                self.fail_waiters(&error);
                None
            }
        }
    }

    /// Counts a failed dial and starts or lengthens the backoff.
    pub(crate) fn dial_failed(&mut self, now: Instant, address: &Address<Conn>) {
        self.dial_failures += 1;
        address.metrics.cx_connect_fail.inc();
        let backoff = BACKOFF_BASE
            .saturating_mul(1 << self.failures_in_row.min(16))
            .min(BACKOFF_MAX);
        self.failures_in_row += 1;
        address.load.set_backoff(now + backoff);
    }

    /// Ends one stream on connection `key`.
    ///
    /// Reads the clock only on the rare paths that need it: a listed
    /// connection past its TTL is retired by `take` (which checks the head
    /// it is about to use) and by its own timer, not here.
    pub(crate) fn release(
        &mut self,
        key: usize,
        outcome: Outcome,
        m: &AddressMetrics,
        fx: &mut Effects<Conn>,
    ) {
        let entry = &self.conns[key];
        debug_assert!(entry.streams() > 0, "released a stream that was not taken");
        let streams = entry.streams() - 1;
        entry.set_streams(streams);
        self.streams -= 1;
        if streams == 0 && matches!(entry.place, Place::Available | Place::Busy) {
            self.idle += 1;
        }
        let failed = match outcome {
            Outcome::TransportError => Some(EvictionReason::Transport),
            Outcome::ProtocolError => Some(EvictionReason::Protocol),
            Outcome::Ok | Outcome::ApplicationError => None,
        };
        if let Some(reason) = failed {
            m.rq_error.inc();
            self.retire(key, reason, m, fx);
        }
        if let Some(entry) = self.conns.get(key) {
            match entry.place {
                Place::Draining(_) => {
                    if streams == 0 {
                        self.draining -= 1;
                        fx.closed.push(self.conns.remove(key));
                    }
                }
                Place::Overflow => {
                    if streams == 0 {
                        self.overflow -= 1;
                        let adopt =
                            self.can_dial() && Instant::now() < self.expires(&self.conns[key]);
                        if adopt {
                            // go-micro: an unpooled connection joins the
                            // pool on release when there is room.
                            self.conns[key].place = Place::Available;
                            self.available.push_front(&mut self.conns, key);
                            self.idle += 1;
                        } else {
                            fx.closed.push(self.conns.remove(key));
                        }
                    }
                }
                Place::Busy | Place::Available => self.fix_place(key),
            }
        }
        if self.has_waiters() {
            self.serve_waiters(Instant::now(), m, fx);
        }
        self.settle_idle(key, m, fx);
    }

    /// Closes listed connection `key` if it is idle and more than `maxIdle`
    /// connections are (go-micro closes on release when idle ≥ maxIdle).
    fn settle_idle(&mut self, key: usize, m: &AddressMetrics, fx: &mut Effects<Conn>) {
        let Some(entry) = self.conns.get(key) else {
            return;
        };
        let listed = matches!(entry.place, Place::Available | Place::Busy);
        if listed && entry.streams() == 0 && self.idle > self.settings.max_idle {
            self.retire(key, EvictionReason::Idle, m, fx);
        }
    }

    /// Moves a listed connection to the list its stream count calls for.
    fn fix_place(&mut self, key: usize) {
        let entry = &self.conns[key];
        let full = entry.streams() >= self.cap(entry);
        match entry.place {
            Place::Available if full => self.move_to(key, Place::Busy),
            Place::Busy if !full => self.move_to(key, Place::Available),
            _ => {}
        }
    }

    /// Moves a listed connection between the available and the busy list.
    fn move_to(&mut self, key: usize, to: Place) {
        match (self.conns[key].place, to) {
            (Place::Available, Place::Busy) => {
                self.available.unlink(&mut self.conns, key);
                self.busy.push_front(&mut self.conns, key);
            }
            (Place::Busy, Place::Available) => {
                self.busy.unlink(&mut self.conns, key);
                self.available.push_front(&mut self.conns, key);
            }
            (from, to) => unreachable!("move from {from:?} to {to:?}"),
        }
        self.conns[key].place = to;
    }

    /// Takes connection `key` out of service: it takes no new stream, and
    /// closes now if it has none, or at its last one.
    fn retire(
        &mut self,
        key: usize,
        reason: EvictionReason,
        m: &AddressMetrics,
        fx: &mut Effects<Conn>,
    ) {
        let entry = &self.conns[key];
        let streams = entry.streams();
        match entry.place {
            Place::Draining(_) => return,
            Place::Available => self.available.unlink(&mut self.conns, key),
            Place::Busy => self.busy.unlink(&mut self.conns, key),
            Place::Overflow => self.overflow -= 1,
        }
        let listed = matches!(self.conns[key].place, Place::Available | Place::Busy);
        if listed && streams == 0 {
            self.idle -= 1;
        }
        self.evictions.bump(reason);
        m.evicted(reason);
        if streams == 0 {
            fx.closed.push(self.conns.remove(key));
        } else {
            self.conns[key].place = Place::Draining(reason);
            self.draining += 1;
        }
    }

    /// When the watcher of connection `key` should next look at its TTL:
    /// its expiry while it is listed, or while it is an overflow connection
    /// that may still be adopted into the pool before then; never once it
    /// is draining. `None` if the connection is gone.
    pub(crate) fn deadline(&self, key: usize, id: u64, now: Instant) -> Option<Option<Instant>> {
        let entry = self.entry(key, id)?;
        let expires = self.expires(entry);
        let watch = match entry.place {
            Place::Available | Place::Busy => true,
            Place::Overflow => now < expires,
            Place::Draining(_) => false,
        };
        Some(watch.then_some(expires))
    }

    /// The watcher's timer fired: retire connection `key` if it is past its
    /// TTL, and let queued callers use the freed slot.
    pub(crate) fn expire(
        &mut self,
        key: usize,
        id: u64,
        now: Instant,
        m: &AddressMetrics,
        fx: &mut Effects<Conn>,
    ) {
        let Some(entry) = self.entry(key, id) else {
            return;
        };
        let listed = matches!(entry.place, Place::Available | Place::Busy);
        if listed && now >= self.expires(entry) {
            self.retire(key, EvictionReason::Ttl, m, fx);
            if self.has_waiters() {
                self.serve_waiters(now, m, fx);
            }
        }
    }

    /// The connection told the pool something.
    pub(crate) fn event(
        &mut self,
        key: usize,
        id: u64,
        event: ConnEvent,
        now: Instant,
        m: &AddressMetrics,
        fx: &mut Effects<Conn>,
    ) {
        if self.entry(key, id).is_none() {
            return;
        }
        match event {
            ConnEvent::MaxConcurrentStreams(max) => {
                self.conns[key].server_max = Some(max);
                // u32::MAX is the connector's word for "no limit any more".
                self.server_max = (max != u32::MAX).then_some(max);
                if matches!(self.conns[key].place, Place::Available | Place::Busy) {
                    self.fix_place(key);
                }
            }
            ConnEvent::Closed(reason) => self.retire(key, reason.into(), m, fx),
        }
        if self.has_waiters() {
            self.serve_waiters(now, m, fx);
        }
    }

    /// Applies new settings in place: connections past the new TTL retire,
    /// connections move between the lists for the new max-streams, a lower
    /// size drains the surplus (idle connections first), a lower maxIdle
    /// closes idle ones. No stream is cut. O(connections): reconfiguration
    /// is rare.
    pub(crate) fn reconfigure(
        &mut self,
        settings: Settings,
        now: Instant,
        m: &AddressMetrics,
        fx: &mut Effects<Conn>,
    ) {
        if settings.ttl != self.settings.ttl {
            for (_, entry) in self.conns.iter_mut() {
                entry.expires = entry.born + settings.ttl.mul_f64(entry.jitter);
            }
        }
        self.settings = settings;
        let mut listed = self.available.keys(&self.conns);
        listed.extend(self.busy.keys(&self.conns));
        for &key in &listed {
            if now >= self.expires(&self.conns[key]) {
                self.retire(key, EvictionReason::Ttl, m, fx);
            } else {
                self.fix_place(key);
            }
        }
        // Idle connections first, then the rest (they drain).
        let mut surplus = self.pooled().saturating_sub(self.settings.size);
        let mut victims: Vec<usize> = Vec::new();
        let mut rest: Vec<usize> = Vec::new();
        for key in self
            .available
            .keys(&self.conns)
            .into_iter()
            .chain(self.busy.keys(&self.conns))
        {
            if self.conns[key].streams() == 0 {
                victims.push(key);
            } else {
                rest.push(key);
            }
        }
        victims.extend(rest);
        for key in victims {
            if surplus == 0 {
                break;
            }
            self.retire(key, EvictionReason::Resize, m, fx);
            surplus -= 1;
        }
        if self.idle > self.settings.max_idle {
            for key in self.available.keys(&self.conns) {
                if self.idle <= self.settings.max_idle {
                    break;
                }
                if self.conns[key].streams() == 0 {
                    self.retire(key, EvictionReason::Idle, m, fx);
                }
            }
        }
        if self.has_waiters() {
            if self.settings.when_full == WhenFull::Overflow {
                // Callers queued under Wait start over under Overflow.
                while let Some(key) = self.queue.pop_front(&mut self.waiters) {
                    let _ = self.waiters.remove(key).tx.send(WaiterMsg::Retry);
                }
            } else {
                self.serve_waiters(now, m, fx);
            }
        }
    }

    /// The address is no longer declared: every listed connection retires
    /// (idle ones close now, the others at their last stream) and queued
    /// callers fail.
    pub(crate) fn retire_address(
        &mut self,
        pool: &str,
        addr: &str,
        m: &AddressMetrics,
        fx: &mut Effects<Conn>,
    ) {
        self.retired = true;
        let mut listed = self.available.keys(&self.conns);
        listed.extend(self.busy.keys(&self.conns));
        for key in listed {
            self.retire(key, EvictionReason::Removed, m, fx);
        }
        self.fail_waiters(&Error::Removed {
            pool: pool.to_owned(),
            addr: addr.to_owned(),
        });
    }

    /// The counts the scrape-time gauges and `rq_total` report.
    pub(crate) fn counts(&self) -> AddressCounts {
        AddressCounts {
            cx_active: self.conns.len(),
            cx_busy: self.busy.len(),
            cx_idle: self.idle,
            cx_draining: self.draining,
            cx_overflow_active: self.overflow,
            rq_active: self.streams,
            rq_pending_active: self.queue.len(),
            rq_total: self.requests,
            // The window's, filled in by the pool (another lock).
            observed_peak_streams: 0,
        }
    }

    /// A waiter leaves the queue after `waited` in it (served, refused,
    /// sent to start over or cancelled).
    pub(crate) fn waited(&mut self, waited: Duration) {
        self.wait_time = self.wait_time.saturating_add(waited);
    }

    /// A caller is refused with [`Error::Full`].
    pub(crate) fn refused(&mut self) {
        self.wait_timeouts += 1;
    }

    /// Reads this second's sample and starts the next: the peaks go back
    /// to the current values.
    fn sample(&mut self) -> Sample {
        let sample = Sample {
            peak_streams: self.peak_streams,
            peak_in_use: self.peak_in_use,
            server_max: self.server_max,
            counters: Counters {
                waits: self.waits,
                wait_time: self.wait_time,
                wait_timeouts: self.wait_timeouts,
                overflow_dials: self.overflow_total,
                dials: self.dials,
                dial_failures: self.dial_failures,
                evictions: self.evictions,
            },
        };
        self.peak_streams = self.streams;
        self.peak_in_use = self.conns.len() - self.idle;
        sample
    }

    pub(crate) fn occupancy(&self, address: &str, observed: Observation) -> AddressOccupancy {
        AddressOccupancy {
            address: address.to_owned(),
            connections: self.pooled(),
            busy: self.busy.len(),
            idle: self.idle,
            streams: self.streams,
            overflow: self.overflow,
            draining: self.draining,
            dials: self.dials,
            dial_failures: self.dial_failures,
            overflow_total: self.overflow_total,
            evictions: self.evictions,
            waiters: self.queue.len(),
            observed,
        }
    }

    pub(crate) fn connections(&self) -> Vec<ConnectionInfo> {
        let mut out: Vec<ConnectionInfo> = self
            .conns
            .iter()
            .map(|(_, e)| ConnectionInfo {
                id: e.id,
                state: match e.place {
                    Place::Available => ConnectionState::Available,
                    Place::Busy => ConnectionState::Busy,
                    Place::Draining(reason) => ConnectionState::Draining(reason),
                    Place::Overflow => ConnectionState::Overflow,
                },
                streams: e.streams(),
                max_streams: self.cap(e),
                born: e.born,
                expires: self.expires(e),
            })
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }
}

/// Follows one connection for its life: its TTL timer, and what the
/// connector reports (GOAWAY, keepalive failure, closure, a new
/// SETTINGS_MAX_CONCURRENT_STREAMS). Ends when the pool drops the connection
/// (its `stop` sender goes with the slab entry) or when the connection
/// stops taking streams.
pub(crate) async fn watch<Conn: Clone>(
    address: Weak<Address<Conn>>,
    watch: Watch,
    mut settings_changed: watch::Receiver<()>,
) {
    let Watch {
        key,
        id,
        mut events,
        mut stop,
    } = watch;
    loop {
        let deadline = {
            let Some(address) = address.upgrade() else {
                return;
            };
            let state = address.lock();
            match state.deadline(key, id, Instant::now()) {
                Some(deadline) => deadline,
                None => return,
            }
        };
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut stop => return,
            event = events.recv() => {
                let Some(address) = address.upgrade() else { return };
                let event = event.unwrap_or(ConnEvent::Closed(super::connector::CloseReason::Closed));
                let mut fx = Effects::default();
                {
                    let mut state = address.lock();
                    state.event(key, id, event, Instant::now(), &address.metrics, &mut fx);
                }
                fx.run(&address);
                if matches!(event, ConnEvent::Closed(_)) {
                    return;
                }
            }
            () = timer => {
                let Some(address) = address.upgrade() else { return };
                let mut fx = Effects::default();
                {
                    let mut state = address.lock();
                    state.expire(key, id, Instant::now(), &address.metrics, &mut fx);
                }
                fx.run(&address);
            }
            changed = settings_changed.changed() => {
                if changed.is_err() {
                    // The pool is gone; the connection goes with its address.
                    return;
                }
            }
        }
    }
}
