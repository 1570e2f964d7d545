//! Real gRPC on loopback for the e2e tests and the demo: a backend (the
//! standard gRPC health service, answering with an `x-backend` header that
//! names it) and clients that reach it through an agent by authority.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The response header a backend names itself in.
pub const BACKEND_HEADER: &str = "x-backend";

/// The service name whose status a backend flips, so a `Watch` of it gets
/// a message every flip (a long-lived stream with traffic on it).
pub const FLIP_SERVICE: &str = "flip";

/// A backend serving until dropped or stopped.
#[derive(Debug)]
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Backend {
    /// Stops serving (open streams end).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a backend on `addr` (port 0 picks one). Service "" is SERVING;
/// [`FLIP_SERVICE`] flips between SERVING and NOT_SERVING every `flip_every`.
pub async fn start_backend(addr: SocketAddr, flip_every: Duration) -> Result<Backend> {
    start_backend_with(addr, flip_every, None).await
}

/// [`start_backend`] advertising `max_streams` as its
/// SETTINGS_MAX_CONCURRENT_STREAMS (`None`: tonic's default).
pub async fn start_backend_with(
    addr: SocketAddr,
    flip_every: Duration,
    max_streams: Option<u32>,
) -> Result<Backend> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("backend cannot listen on {addr}"))?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    serve(listener, flip_every, max_streams, stop.clone());
    Ok(Backend { addr, stop })
}

/// Serves a backend on `listener` until `stop`, then drains: GOAWAY, and
/// the calls in flight finish. The handle ends when the server has.
pub fn serve_backend(
    listener: tokio::net::TcpListener,
    flip_every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    serve(listener, flip_every, None, stop)
}

fn serve(
    listener: tokio::net::TcpListener,
    flip_every: Duration,
    max_streams: Option<u32>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let (reporter, service) = tonic_health::server::health_reporter();
    let name =
        http::HeaderValue::from_str(&addr).unwrap_or(http::HeaderValue::from_static("unknown"));
    let flips = stop.clone();
    tokio::spawn(async move {
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        let mut serving = true;
        loop {
            reporter
                .set_service_status(
                    FLIP_SERVICE,
                    if serving {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    },
                )
                .await;
            serving = !serving;
            tokio::select! {
                _ = flips.cancelled() => return,
                _ = tokio::time::sleep(flip_every) => {}
            }
        }
    });
    let header =
        tower::util::MapResponseLayer::new(move |mut r: http::Response<tonic::body::Body>| {
            r.headers_mut().insert(BACKEND_HEADER, name.clone());
            r
        });
    tokio::spawn(
        tonic::transport::Server::builder()
            .max_concurrent_streams(max_streams)
            .layer(header)
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move { stop.cancelled().await },
            ),
    )
}

/// A channel to `agent` (an address, or a `host:port` resolved at each
/// connect) whose requests carry `authority`.
pub fn channel(agent: impl std::fmt::Display, authority: &str) -> Result<Channel> {
    Ok(endpoint(agent, authority)?
        .timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Like [`channel`], from the local address `source` (the socket is bound
/// to it before it connects), as a pod with that IP would call.
pub fn channel_from(
    agent: SocketAddr,
    authority: &str,
    source: std::net::IpAddr,
) -> Result<Channel> {
    Ok(endpoint(agent, authority)?
        .timeout(Duration::from_secs(5))
        .local_address(Some(source))
        .connect_lazy())
}

/// An endpoint at `agent` whose requests carry `authority`.
fn endpoint(agent: impl std::fmt::Display, authority: &str) -> Result<Endpoint> {
    let origin: Uri = format!("http://{authority}")
        .parse()
        .with_context(|| format!("bad authority {authority}"))?;
    Ok(Endpoint::from_shared(format!("http://{agent}"))?
        .origin(origin)
        .connect_timeout(Duration::from_secs(2)))
}

/// One unary call through `channel`; returns the backend that answered.
pub async fn check(channel: &Channel) -> Result<String> {
    try_check(channel)
        .await
        .map_err(|s| anyhow!("check failed: {}: {}", s.code(), s.message()))
}

/// Whether a failed call provably never left this client: tonic (hyper)
/// fails a request it had queued on a connection that a GOAWAY then
/// closed with CANCELLED "operation was canceled" (hyper's `Canceled`),
/// the request unwritten. grpc-go retries such calls by itself
/// (transparent retry); tonic does not, so the demo client does, once.
pub fn never_sent(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Cancelled {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && h.is_canceled()
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Like [`check`], with the gRPC status of a failed call.
pub async fn try_check(channel: &Channel) -> Result<String, tonic::Status> {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    let backend = response
        .metadata()
        .get(BACKEND_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok(backend)
}

/// A `Watch` of [`FLIP_SERVICE`] through `channel`: a server-streaming call
/// that stays open and gets a message every flip.
pub async fn watch(channel: &Channel) -> Result<tonic::Streaming<HealthCheckResponse>> {
    // A watch outlives the channel's per-request timeout: use a channel
    // without one.
    watch_status(channel)
        .await
        .map_err(|s| anyhow!("watch failed: {}: {}", s.code(), s.message()))
}

/// Like [`watch`], with the gRPC status of a failed start.
pub async fn watch_status(
    channel: &Channel,
) -> Result<tonic::Streaming<HealthCheckResponse>, tonic::Status> {
    let response = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: FLIP_SERVICE.into(),
        })
        .await?;
    Ok(response.into_inner())
}

/// A channel like [`channel`] without a request timeout, for watches.
pub fn streaming_channel(agent: impl std::fmt::Display, authority: &str) -> Result<Channel> {
    Ok(endpoint(agent, authority)?.connect_lazy())
}
