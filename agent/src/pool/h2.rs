//! The real connector: h2c (HTTP/2 over plain TCP) client connections, made
//! with the `h2` crate directly so the pool can read the server's
//! SETTINGS_MAX_CONCURRENT_STREAMS and send keepalive PINGs.
//!
//! Each connection has a driver task that polls the `h2` connection, sends a
//! PING every `keepalive_interval` and reports to the pool:
//! - GOAWAY from the server, seen right after the frame is read: the
//!   connection takes no new stream; streams already open finish;
//! - an unanswered PING (`keepalive_timeout`): the connection is dead and is
//!   dropped at once;
//! - the end of the connection, and any change of the server's stream limit.
//!
//! The connection closes gracefully when the pool and every lease have
//! dropped their [`H2Conn`]: the driver then stops pinging, lets `h2` finish
//! the open streams and send its own GOAWAY, and exits.
//!
//! A server that breaks HTTP/2's rules or h2's limits (a flood of small
//! DATA frames, say) gets a GOAWAY with the error code from h2; the driver
//! logs it with the address and reports [`CloseReason::Protocol`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use h2::{Ping, PingPong};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::connector::{CloseReason, ConnEvent, Connected, Connector};

/// The HTTP/2 flow-control windows and small-DATA-frame budget the agent
/// runs with: [`FlowLimits::CLIENT`] on the connections applications open
/// to it, [`FlowLimits::BACKEND`] on its pooled connections.
///
/// h2 charges every received DATA frame under 256 bytes `256 - len` against
/// a per-connection budget while the frame sits unread in its buffers, and
/// answers an exhausted budget with GOAWAY ENHANCE_YOUR_CALM: that bounds
/// the per-frame memory a peer can pin with tiny frames. The agent reads
/// frames out as soon as a stream's task runs (see
/// [`proxy::relay`](crate::proxy::relay)), so the budget only has to cover
/// what arrives between two runs. It is set to eight times the connection
/// window: a peer may fill the whole window with frames of 32 bytes or more
/// (gRPC messages of 27 bytes) and never reach it, while a peer sending
/// 1-byte frames is stopped after about `budget / 255` of them, some tens
/// of thousands, which bounds the frame overhead to about the budget in
/// bytes. h2's default ("auto") is half the connection window, about 130
/// frames on a 64 KiB window: a backend streaming small messages to many
/// streams at once tripped it within seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowLimits {
    /// SETTINGS_INITIAL_WINDOW_SIZE: bytes a peer may send on one stream
    /// before the agent has forwarded them.
    pub stream_window: u32,
    /// The connection's window: bytes a peer may send across all streams
    /// before the agent has forwarded them; the bound on what one connection
    /// can make the agent hold.
    pub connection_window: u32,
    /// h2's budget for small DATA frames held unread, in h2's units (256
    /// per empty-ish frame).
    pub data_frame_budget: usize,
}

impl FlowLimits {
    /// The applications' connections to the agent: 1 MiB per stream and
    /// per connection (what hyper offered before), 8 MiB of budget.
    pub const CLIENT: Self = Self::new(1 << 20, 1 << 20);
    /// The pooled connections to backends: 1 MiB per stream, 2 MiB per
    /// connection (one connection carries up to `maxStreams` streams),
    /// 16 MiB of budget.
    pub const BACKEND: Self = Self::new(1 << 20, 2 << 20);

    const fn new(stream_window: u32, connection_window: u32) -> Self {
        Self {
            stream_window,
            connection_window,
            data_frame_budget: 8 * connection_window as usize,
        }
    }
}

/// Opens h2c connections for the pool.
#[derive(Debug, Clone)]
pub struct H2Connector {
    /// Limit for TCP connect, HTTP/2 handshake and the first PING round trip
    /// (which also waits for the server's SETTINGS).
    pub connect_timeout: Duration,
    /// Time between keepalive PINGs; zero turns keepalive off.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered before the connection counts as
    /// dead.
    pub keepalive_timeout: Duration,
}

impl Default for H2Connector {
    /// Connect within 5 s; PING every 10 s (as ztunnel does), dead after 20 s
    /// without an answer (gRPC's keepalive timeout).
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// One pooled h2c connection: a clone of its `SendRequest` handle, plus a
/// share of the connection's lifetime (the last clone dropped closes it).
#[derive(Debug, Clone)]
pub struct H2Conn {
    send: SendRequest<Bytes>,
    /// Never sent on: dropping the last clone tells the driver to close.
    _close: Arc<oneshot::Sender<()>>,
}

impl H2Conn {
    /// A handle to open a stream with (`sender().ready().await?.send_request(..)`).
    pub fn sender(&self) -> SendRequest<Bytes> {
        self.send.clone()
    }
}

impl Connector for H2Connector {
    type Conn = H2Conn;

    async fn connect(&self, addr: &str) -> io::Result<Connected<H2Conn>> {
        let timeout = self.connect_timeout;
        match tokio::time::timeout(timeout, self.open(addr)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no HTTP/2 connection within {timeout:?}"),
            )),
        }
    }
}

impl H2Connector {
    async fn open(&self, addr: &str) -> io::Result<Connected<H2Conn>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let limits = FlowLimits::BACKEND;
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(limits.stream_window)
            .initial_connection_window_size(limits.connection_window)
            .data_frame_budget(limits.data_frame_budget)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(into_io)?;
        let pings = conn
            .ping_pong()
            .ok_or_else(|| io::Error::other("the h2 ping handle was already taken"))?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (close_tx, close_rx) = oneshot::channel();
        let watched = Watched {
            addr: addr.into(),
            conn,
            probe: Some(send.clone()),
            events: events_tx,
            reported_max: None,
            done: false,
        };
        tokio::spawn(drive(watched, pings, ready_tx, close_rx, self.clone()));
        let max = ready_rx.await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the connection closed before the server's settings arrived",
            )
        })?;
        Ok(Connected {
            conn: H2Conn {
                send,
                _close: Arc::new(close_tx),
            },
            max_concurrent_streams: max,
            events,
        })
    }
}

/// Runs one connection to its end.
async fn drive(
    mut watched: Watched,
    mut pings: PingPong,
    ready: oneshot::Sender<Option<u32>>,
    mut close: oneshot::Receiver<()>,
    config: H2Connector,
) {
    // The server's SETTINGS frame comes before its answer to our first PING,
    // so once the PONG is in, its stream limit is known.
    tokio::select! {
        () = &mut watched => return,
        pong = pings.ping(Ping::opaque()) => {
            if pong.is_err() {
                return;
            }
        }
    }
    let max = watched.start_reporting();
    if ready.send(max).is_err() {
        // The dial was abandoned (timeout or cancellation): just close.
        return;
    }
    let keepalive = async {
        if config.keepalive_interval.is_zero() {
            std::future::pending::<()>().await;
        }
        keepalive(
            &mut pings,
            config.keepalive_interval,
            config.keepalive_timeout,
        )
        .await;
    };
    tokio::select! {
        () = &mut watched => {}
        () = keepalive => {
            watched.report(ConnEvent::Closed(CloseReason::Keepalive));
            // Dead: drop the connection now.
        }
        _ = &mut close => {
            // Every H2Conn is gone: stop pinging and let h2 finish the open
            // streams, send GOAWAY and close.
            watched.probe = None;
            watched.await;
        }
    }
}

/// Something that can PING its peer.
pub(crate) trait Pinger {
    /// Sends a PING and waits for its answer; `false` if the connection
    /// failed.
    fn ping(&mut self) -> impl Future<Output = bool> + Send;
}

impl Pinger for PingPong {
    async fn ping(&mut self) -> bool {
        PingPong::ping(self, Ping::opaque()).await.is_ok()
    }
}

/// Pings every `interval`; returns when a PING fails or goes unanswered for
/// `timeout`.
pub(crate) async fn keepalive<P: Pinger>(pinger: &mut P, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pinger.ping()).await {
            Ok(true) => {}
            Ok(false) | Err(_) => return,
        }
    }
}

/// The h2 connection future, observed after every poll: that is when a
/// GOAWAY or SETTINGS frame has just been processed.
struct Watched {
    /// The server's address, for the log.
    addr: Box<str>,
    conn: Connection<TcpStream, Bytes>,
    /// The driver's own handle, to ask h2 whether new streams may open.
    /// Dropped to let the connection close.
    probe: Option<SendRequest<Bytes>>,
    events: mpsc::UnboundedSender<ConnEvent>,
    /// The stream limit last told to the pool; `None` until the pool has the
    /// connection.
    reported_max: Option<Option<u32>>,
    /// `Closed` was reported.
    done: bool,
}

impl Watched {
    fn server_max(&self) -> Option<u32> {
        let max = self.probe.as_ref()?.current_max_send_streams();
        // h2 starts from usize::MAX until the server says otherwise.
        (max != usize::MAX).then(|| u32::try_from(max).unwrap_or(u32::MAX))
    }

    fn start_reporting(&mut self) -> Option<u32> {
        let max = self.server_max();
        self.reported_max = Some(max);
        max
    }

    fn report(&mut self, event: ConnEvent) {
        if self.done {
            return;
        }
        if matches!(event, ConnEvent::Closed(_)) {
            self.done = true;
        }
        // The pool may be gone; nothing to tell then.
        let _ = self.events.send(event);
    }

    fn observe(&mut self) {
        let Some(probe) = &mut self.probe else { return };
        let mut cx = Context::from_waker(Waker::noop());
        // The probe never opens a stream, so it has no pending open: this
        // only asks whether the connection still takes streams (and costs no
        // handle clone, which would lock h2's stream store twice per poll).
        if let Poll::Ready(Err(error)) = probe.poll_ready(&mut cx) {
            let reason = close_reason(&error);
            self.probe = None;
            if self.reported_max.is_some() {
                self.report(ConnEvent::Closed(reason));
            }
            return;
        }
        if let Some(reported) = self.reported_max {
            let max = self.server_max();
            if max != reported {
                self.reported_max = Some(max);
                self.report(ConnEvent::MaxConcurrentStreams(max.unwrap_or(u32::MAX)));
            }
        }
    }
}

impl Future for Watched {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.conn).poll(cx);
        this.observe();
        match result {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                let reason = match &result {
                    Ok(()) => CloseReason::Closed,
                    Err(error) => close_reason(error),
                };
                match (&result, reason) {
                    (Err(error), CloseReason::Protocol) => tracing::warn!(
                        backend = %this.addr,
                        reason = %error.reason().map_or("?", reason_name),
                        %error,
                        "closed a backend connection for breaking HTTP/2's rules; its streams failed"
                    ),
                    (Err(error), _) => {
                        tracing::debug!(backend = %this.addr, %error, "h2 connection ended");
                    }
                    (Ok(()), _) => {}
                }
                if this.reported_max.is_some() {
                    this.report(ConnEvent::Closed(reason));
                }
                Poll::Ready(())
            }
        }
    }
}

/// Why a connection that failed with `error` stopped: the server's GOAWAY,
/// a GOAWAY h2 sent because the server broke a rule, or anything else.
pub(crate) fn close_reason(error: &h2::Error) -> CloseReason {
    if error.is_go_away() && error.is_remote() {
        CloseReason::GoAway
    } else if is_local_protocol_error(error) {
        CloseReason::Protocol
    } else {
        CloseReason::Closed
    }
}

/// Whether h2 ended the connection itself, with an error code, because the
/// peer broke HTTP/2's rules or h2's limits.
pub fn is_local_protocol_error(error: &h2::Error) -> bool {
    error.is_go_away()
        && !error.is_remote()
        && error.reason().is_some_and(|r| r != h2::Reason::NO_ERROR)
}

/// The name of an HTTP/2 error code, as RFC 9113 spells it.
pub fn reason_name(reason: h2::Reason) -> &'static str {
    use h2::Reason as R;
    match reason {
        R::NO_ERROR => "NO_ERROR",
        R::PROTOCOL_ERROR => "PROTOCOL_ERROR",
        R::INTERNAL_ERROR => "INTERNAL_ERROR",
        R::FLOW_CONTROL_ERROR => "FLOW_CONTROL_ERROR",
        R::SETTINGS_TIMEOUT => "SETTINGS_TIMEOUT",
        R::STREAM_CLOSED => "STREAM_CLOSED",
        R::FRAME_SIZE_ERROR => "FRAME_SIZE_ERROR",
        R::REFUSED_STREAM => "REFUSED_STREAM",
        R::CANCEL => "CANCEL",
        R::COMPRESSION_ERROR => "COMPRESSION_ERROR",
        R::CONNECT_ERROR => "CONNECT_ERROR",
        R::ENHANCE_YOUR_CALM => "ENHANCE_YOUR_CALM",
        R::INADEQUATE_SECURITY => "INADEQUATE_SECURITY",
        R::HTTP_1_1_REQUIRED => "HTTP_1_1_REQUIRED",
        _ => "OTHER",
    }
}

fn into_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        match error.into_io() {
            Some(io) => io,
            None => io::Error::other("h2 i/o error"),
        }
    } else {
        io::Error::other(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers the first `answered` pings after `delay`, then never.
    struct FakePinger {
        answered: usize,
        delay: Duration,
        sent: Arc<AtomicUsize>,
    }

    impl Pinger for FakePinger {
        async fn ping(&mut self) -> bool {
            let n = self.sent.fetch_add(1, Ordering::SeqCst);
            if n < self.answered {
                tokio::time::sleep(self.delay).await;
                true
            } else {
                std::future::pending().await
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_pings_every_interval_and_gives_up_after_timeout() {
        let sent = Arc::new(AtomicUsize::new(0));
        let mut pinger = FakePinger {
            answered: 3,
            delay: Duration::from_secs(1),
            sent: sent.clone(),
        };
        let start = tokio::time::Instant::now();
        keepalive(&mut pinger, Duration::from_secs(10), Duration::from_secs(5)).await;
        // Three answered pings (10 s apart, 1 s each), then one more sent
        // 10 s later that times out after 5 s.
        assert_eq!(sent.load(Ordering::SeqCst), 4);
        assert_eq!(start.elapsed(), Duration::from_secs(3 * 11 + 10 + 5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_answered_ping_keeps_the_connection() {
        let sent = Arc::new(AtomicUsize::new(0));
        let mut pinger = FakePinger {
            answered: 100,
            delay: Duration::from_secs(4),
            sent: sent.clone(),
        };
        let outcome = tokio::time::timeout(
            Duration::from_secs(140),
            keepalive(&mut pinger, Duration::from_secs(10), Duration::from_secs(5)),
        )
        .await;
        assert!(outcome.is_err(), "keepalive gave up on answered pings");
        assert_eq!(sent.load(Ordering::SeqCst), 10);
    }
}
