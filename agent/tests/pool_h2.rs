//! The real connector against a real tonic server (gRPC health) on
//! loopback: connection reuse, the server's stream limit honoured, GOAWAY
//! from the server draining the connection, a dead port reported by name.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tidepool_agent::pool::h2::{H2Conn, H2Connector};
use tidepool_agent::pool::{
    ConnectionState, Error, EvictionReason, Lease, Outcome, Pool, PoolMetrics, Settings,
};
use tidepool_testkit::eventually;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

/// A tonic health server; counts accepted TCP connections; stops
/// gracefully (GOAWAY) when `stop` fires.
struct Server {
    addr: String,
    accepted: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

async fn server(max_streams: Option<u32>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let incoming = TcpListenerStream::new(listener).map(move |socket| {
        counter.fetch_add(1, Ordering::SeqCst);
        socket
    });
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .max_concurrent_streams(max_streams)
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Server {
        addr,
        accepted,
        stop: Some(stop),
        done,
    }
}

fn connector() -> H2Connector {
    H2Connector {
        connect_timeout: Duration::from_secs(5),
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_secs(2),
    }
}

/// An empty HealthCheckRequest, gRPC-framed.
const EMPTY_MESSAGE: &[u8] = &[0, 0, 0, 0, 0];

/// Opens a gRPC call on the lease's connection and returns the response
/// head and body.
async fn call(lease: &Lease<H2Conn>, method: &str) -> h2::RecvStream {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/grpc.health.v1.Health/{method}",
            lease.address()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut sender = lease.conn().sender().ready().await.unwrap();
    let (response, mut body) = sender.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(EMPTY_MESSAGE), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body()
}

/// Reads one gRPC message (the health status) from a response body.
async fn first_message(body: &mut h2::RecvStream) -> Bytes {
    let chunk = body.data().await.unwrap().unwrap();
    let _ = body.flow_control().release_capacity(chunk.len());
    chunk
}

/// How long a test waits for the pool to see what the server did.
const WAIT: Duration = Duration::from_secs(2);

/// A pool over the h2 connector, named "h2".
fn h2_pool(settings: Settings) -> Pool<H2Connector> {
    Pool::new("h2", settings, connector(), PoolMetrics::unregistered()).unwrap()
}

#[tokio::test]
async fn calls_reuse_one_connection() {
    let server = server(None).await;
    let pool = h2_pool(Settings::default());
    let mut ids = Vec::new();
    for _ in 0..5 {
        let lease = pool.acquire(&server.addr).await.unwrap();
        let mut body = call(&lease, "Check").await;
        // SERVING is message field 1 = 1: 5-byte prefix + [0x08, 0x01].
        assert_eq!(&first_message(&mut body).await[..], &[0, 0, 0, 0, 2, 8, 1]);
        let trailers = body.trailers().await.unwrap().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
        ids.push(lease.connection_id());
        lease.finish(Outcome::Ok);
    }
    assert!(ids.iter().all(|id| *id == ids[0]));
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    let o = &pool.snapshot()[0];
    assert_eq!((o.connections, o.idle, o.dials), (1, 1, 1));
    // Default servers set no limit lower than ours.
    assert_eq!(pool.connections(&server.addr)[0].max_streams, 20);
}

#[tokio::test]
async fn the_servers_stream_limit_is_honoured() {
    let server = server(Some(2)).await;
    let pool = h2_pool(Settings::default().max_streams(20));
    let a = pool.acquire(&server.addr).await.unwrap();
    let b = pool.acquire(&server.addr).await.unwrap();
    assert_eq!(pool.connections(&server.addr)[0].max_streams, 2);
    assert_eq!(a.connection_id(), b.connection_id());
    // Two long-lived Watch streams fill the connection...
    let mut wa = call(&a, "Watch").await;
    let mut wb = call(&b, "Watch").await;
    first_message(&mut wa).await;
    first_message(&mut wb).await;
    // ...so the third stream goes to a second connection, where it runs.
    let c = pool.acquire(&server.addr).await.unwrap();
    assert_ne!(c.connection_id(), a.connection_id());
    let mut wc = call(&c, "Watch").await;
    first_message(&mut wc).await;
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    let o = &pool.snapshot()[0];
    assert_eq!((o.connections, o.busy, o.streams), (2, 1, 3));
}

#[tokio::test]
async fn goaway_from_the_server_drains_the_connection() {
    let mut server = server(None).await;
    let addr = server.addr.clone();
    let pool = h2_pool(Settings::default());
    let lease = pool.acquire(&addr).await.unwrap();
    let mut watch = call(&lease, "Watch").await;
    first_message(&mut watch).await;
    server.stop.take().unwrap().send(()).unwrap();
    assert!(
        eventually(WAIT, || {
            pool.connections(&addr)
                .first()
                .is_some_and(|c| c.state == ConnectionState::Draining(EvictionReason::GoAway))
        })
        .await,
        "timed out waiting for the pool to see GOAWAY"
    );
    let o = &pool.snapshot()[0];
    assert_eq!((o.connections, o.draining, o.streams), (0, 1, 1));
    // The running stream was not cut by the pool.
    assert!(!watch.is_end_stream());
    drop(watch);
    lease.finish(Outcome::Ok);
    assert!(
        eventually(WAIT, || pool.connections(&addr).is_empty()).await,
        "timed out waiting for the drained connection to close"
    );
    // With the stream gone the server finishes its graceful shutdown.
    tokio::time::timeout(Duration::from_secs(5), server.done)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pool.snapshot()[0].evictions.goaway, 1);
    // Nothing listens any more: a dial error naming the address.
    let err = pool.acquire(&addr).await.unwrap_err();
    assert!(matches!(err, Error::Dial { .. }));
    assert!(err.to_string().contains(&addr), "{err}");
}

#[tokio::test]
async fn an_unanswered_ping_evicts_the_connection() {
    // A server that completes the HTTP/2 handshake, answers the first PING,
    // then stops reading.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (freeze, frozen) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::handshake(tcp).await.unwrap();
        tokio::select! {
            _ = async { while conn.accept().await.is_some() {} } => {}
            _ = frozen => {}
        }
        // Keep the socket open, unpolled.
        std::future::pending::<()>().await;
        drop(conn);
    });
    let connector = H2Connector {
        keepalive_interval: Duration::from_millis(50),
        keepalive_timeout: Duration::from_millis(100),
        ..connector()
    };
    let pool = Pool::new(
        "h2",
        Settings::default(),
        connector,
        PoolMetrics::unregistered(),
    )
    .unwrap();
    drop(pool.acquire(&addr).await.unwrap());
    assert_eq!(pool.snapshot()[0].connections, 1);
    freeze.send(()).unwrap();
    assert!(
        eventually(WAIT, || pool.snapshot()[0].evictions.keepalive == 1).await,
        "timed out waiting for keepalive to evict the connection"
    );
    assert_eq!(pool.snapshot()[0].connections, 0);
}
