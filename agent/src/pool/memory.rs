//! An in-process connector: connections are handles with no network behind
//! them. The pool's tests and benchmarks use it to drive every path — dial
//! failure, GOAWAY, keepalive loss, a server lowering its stream limit — and
//! to check that every connection the pool opened was closed.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use super::connector::{CloseReason, ConnEvent, Connected, Connector};

/// Makes [`MemoryConn`]s. Clones share one set of connections and controls.
#[derive(Debug, Clone, Default)]
pub struct MemoryConnector {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    next_id: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Open connections: id → (address, the pool's event channel).
    open: HashMap<u64, (String, mpsc::UnboundedSender<ConnEvent>)>,
    /// Dial attempts per address, failed ones included.
    attempts: HashMap<String, u64>,
    /// Addresses whose dials fail.
    refusing: HashSet<String>,
    /// SETTINGS_MAX_CONCURRENT_STREAMS new connections report.
    server_max_streams: Option<u32>,
    /// How long a dial takes (tokio time).
    dial_delay: Duration,
    /// Connections closed so far.
    closed: u64,
}

/// A connection made by [`MemoryConnector`]. Cloning is cheap; it closes
/// (leaves [`MemoryConnector::open_connections`]) when the last clone drops.
#[derive(Debug, Clone)]
pub struct MemoryConn {
    open: Arc<Open>,
}

#[derive(Debug)]
struct Open {
    id: u64,
    addr: String,
    shared: Weak<Shared>,
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let mut state = shared.lock();
            if state.open.remove(&self.id).is_some() {
                state.closed += 1;
            }
        }
    }
}

impl MemoryConn {
    /// The connector's id for this connection (not the pool's).
    pub fn id(&self) -> u64 {
        self.open.id
    }

    /// The address it was dialed to.
    pub fn address(&self) -> &str {
        &self.open.addr
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MemoryConnector {
    /// A connector whose dials succeed at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes dials to `addr` fail (`true`) or succeed again (`false`).
    pub fn refuse(&self, addr: &str, refuse: bool) {
        let mut state = self.shared.lock();
        if refuse {
            state.refusing.insert(addr.to_owned());
        } else {
            state.refusing.remove(addr);
        }
    }

    /// Sets how long every dial takes (in tokio time).
    pub fn set_dial_delay(&self, delay: Duration) {
        self.shared.lock().dial_delay = delay;
    }

    /// Sets the SETTINGS_MAX_CONCURRENT_STREAMS new connections report.
    pub fn set_server_max_streams(&self, max: Option<u32>) {
        self.shared.lock().server_max_streams = max;
    }

    /// Sends `event` to the pool about connection `id`; `false` if it is
    /// not open (or its pool stopped listening).
    pub fn send(&self, id: u64, event: ConnEvent) -> bool {
        let state = self.shared.lock();
        state
            .open
            .get(&id)
            .is_some_and(|(_, tx)| tx.send(event).is_ok())
    }

    /// The server sent GOAWAY on connection `id`.
    pub fn goaway(&self, id: u64) -> bool {
        self.send(id, ConnEvent::Closed(CloseReason::GoAway))
    }

    /// Whether connection `id` is open.
    pub fn is_open(&self, id: u64) -> bool {
        self.shared.lock().open.contains_key(&id)
    }

    /// Ids of the open connections, sorted.
    pub fn open_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.shared.lock().open.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// How many connections are open.
    pub fn open_connections(&self) -> usize {
        self.shared.lock().open.len()
    }

    /// How many connections to `addr` are open.
    pub fn open_to(&self, addr: &str) -> usize {
        self.shared
            .lock()
            .open
            .values()
            .filter(|(a, _)| a == addr)
            .count()
    }

    /// How many connections have closed.
    pub fn closed(&self) -> u64 {
        self.shared.lock().closed
    }

    /// Dial attempts to `addr`, failed ones included.
    pub fn attempts(&self, addr: &str) -> u64 {
        self.shared.lock().attempts.get(addr).copied().unwrap_or(0)
    }
}

impl Connector for MemoryConnector {
    type Conn = MemoryConn;

    async fn connect(&self, addr: &str) -> io::Result<Connected<MemoryConn>> {
        let delay = {
            let mut state = self.shared.lock();
            *state.attempts.entry(addr.to_owned()).or_default() += 1;
            state.dial_delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut state = self.shared.lock();
        if state.refusing.contains(addr) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("memory connector refuses {addr}"),
            ));
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, events) = mpsc::unbounded_channel();
        state.open.insert(id, (addr.to_owned(), tx));
        Ok(Connected {
            conn: MemoryConn {
                open: Arc::new(Open {
                    id,
                    addr: addr.to_owned(),
                    shared: Arc::downgrade(&self.shared),
                }),
            },
            max_concurrent_streams: state.server_max_streams,
            events,
        })
    }
}
