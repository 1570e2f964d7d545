//! Shared test fixtures: a tonic test backend with all four RPC kinds,
//! a tonic client that talks raw bytes, an in-process agent, pool builders,
//! and a TCP load balancer for TTL-rotation tests. Everything listens on
//! loopback only.

#![allow(dead_code)]

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use futures::{Stream, StreamExt};
use tidepool_agent::app::{App, AppOptions};
use tidepool_agent::config::{PoolConfig, ProxyOptions};
use tidepool_agent::pool::h2::H2Connector;
use tidepool_crds::ConnectionPoolSpec;
use tidepool_crds::v1alpha1::{Address, Clients, NamespaceName, Target, WhenFull};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::Service;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::{
    ClientStreamingService, Grpc, ServerStreamingService, StreamingService, UnaryService,
};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Response, Status, Streaming};

/// Most bytes one message may have in these tests.
pub const MAX_MESSAGE: usize = 64 << 20;

/// A codec whose messages are the raw bytes, so tests compare exactly what
/// went in with what came out.
#[derive(Debug, Clone, Copy, Default)]
pub struct BytesCodec;

/// Encoder and decoder of [`BytesCodec`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// The test service's name.
pub const SERVICE: &str = "tidepool.test.Echo";

/// What a backend saw.
#[derive(Debug, Default)]
pub struct BackendState {
    /// The backend's name, sent back in `x-backend`.
    pub name: String,
    /// TCP connections accepted.
    pub accepts: AtomicUsize,
    /// RPCs started.
    pub calls: AtomicUsize,
    /// `Hold` streams open now.
    pub holding: AtomicUsize,
    /// Streams dropped before they finished (the client or proxy cancelled).
    pub cancelled: AtomicUsize,
    /// Bytes of messages `ServerStream` has produced.
    pub produced: AtomicUsize,
    /// Where `Unary` calls with `x-gate` wait.
    pub gate: Arc<Gate>,
    /// Milliseconds every `Unary` call waits before answering (a slow
    /// backend).
    pub delay_ms: std::sync::atomic::AtomicU64,
}

/// Holds `Unary` calls that carry `x-gate` until it opens, counting them:
/// proof that they are all in flight at once. Backends may share one.
#[derive(Debug)]
pub struct Gate {
    /// Calls waiting at the gate (or that passed it).
    pub arrived: AtomicUsize,
    open: tokio::sync::watch::Sender<bool>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            arrived: AtomicUsize::new(0),
            open: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Gate {
    /// Lets every waiting and later call through.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    async fn pass(&self) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }
}

/// A running test backend.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub state: Arc<BackendState>,
    kill: CancellationToken,
}

impl Backend {
    /// Starts a backend on a free loopback port.
    pub async fn start(name: &str) -> Backend {
        Backend::start_gated(name, Arc::default()).await
    }

    /// Starts a backend whose gated calls wait at `gate`.
    pub async fn start_gated(name: &str, gate: Arc<Gate>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BackendState {
            name: name.to_owned(),
            gate,
            ..Default::default()
        });
        let kill = CancellationToken::new();
        let incoming = {
            let state = state.clone();
            let kill = kill.clone();
            futures::stream::unfold(listener, move |listener| {
                let state = state.clone();
                let kill = kill.clone();
                async move {
                    let accepted = tokio::select! {
                        () = kill.cancelled() => return None,
                        accepted = listener.accept() => accepted,
                    };
                    let io = accepted.map(|(tcp, _)| {
                        state.accepts.fetch_add(1, Ordering::SeqCst);
                        let _ = tcp.set_nodelay(true);
                        Killable {
                            tcp,
                            kill: Box::pin(kill.clone().cancelled_owned()),
                        }
                    });
                    Some((io, listener))
                }
            })
        };
        let service = EchoService {
            state: state.clone(),
        };
        let server = tonic::transport::Server::builder().serve_with_incoming(service, incoming);
        tokio::spawn(server);
        Backend { addr, state, kill }
    }

    /// `host:port`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Kills the backend: stops accepting and breaks every connection at
    /// once, as a crashed process would.
    pub fn kill(&self) {
        self.kill.cancel();
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.state.accepts.load(Ordering::SeqCst)
    }
}

/// A backend connection that fails all I/O once the backend is killed.
struct Killable {
    tcp: TcpStream,
    kill: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Killable {
    fn killed(&mut self, cx: &mut Context<'_>) -> bool {
        self.kill.as_mut().poll(cx).is_ready()
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "backend killed")
}

impl AsyncRead for Killable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.killed(cx) {
            return Poll::Ready(Err(broken()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Killable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.killed(cx) {
            return Poll::Ready(Err(broken()));
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.killed(cx) {
            return Poll::Ready(Err(broken()));
        }
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Killable {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

/// Counts a stream as cancelled if it is dropped before it finished.
struct Finish {
    state: Arc<BackendState>,
    done: bool,
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.done {
            self.state.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The test service:
/// - `Unary`: echoes the message. `x-sleep-ms` delays the answer;
///   `x-fail-code`/`x-fail-message`/`x-fail-details-bin` fail it with those
///   (and `x-echo-*` metadata in the error's trailers). Response headers:
///   `x-backend`, every `x-echo-*` request header, `x-seen-grpc-timeout`,
///   `x-seen-authority`.
/// - `ServerStream`: the message `x-count` times (default 3), `x-interval-ms`
///   apart, then trailers `x-trailer: done` and `x-trailer-bin`.
/// - `ClientStream`: the concatenation of every message.
/// - `Bidi`: echoes every message as it arrives.
/// - `Hold`: sends the message once, then never ends.
#[derive(Clone)]
struct EchoService {
    state: Arc<BackendState>,
}

fn response_headers(state: &BackendState, request: &MetadataMap) -> MetadataMap {
    let mut headers = MetadataMap::new();
    headers.insert("x-backend", state.name.parse().unwrap());
    for entry in request.iter() {
        match entry {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) if k.as_str().starts_with("x-echo-") => {
                headers.insert(k.clone(), v.clone());
            }
            tonic::metadata::KeyAndValueRef::Binary(k, v) if k.as_str().starts_with("x-echo-") => {
                headers.insert_bin(k.clone(), v.clone());
            }
            _ => {}
        }
    }
    if let Some(t) = request.get("grpc-timeout") {
        headers.insert("x-seen-grpc-timeout", t.clone());
    }
    headers
}

fn number(request: &MetadataMap, key: &str) -> Option<u64> {
    request
        .get(key)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn failure(state: &BackendState, request: &MetadataMap) -> Option<Status> {
    let code = number(request, "x-fail-code")?;
    let message = request
        .get("x-fail-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Not ASCII, so the message must be percent-encoded on the way.
    let message = format!("{message} ✓");
    let details = request
        .get_bin("x-fail-details-bin")
        .and_then(|v| v.to_bytes().ok())
        .unwrap_or_default();
    Some(Status::with_details_and_metadata(
        Code::from_i32(code as i32),
        message,
        details,
        response_headers(state, request),
    ))
}

struct Unary(Arc<BackendState>);
impl UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Status>> + Send>>;
    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let mut finish = Finish {
                state: state.clone(),
                done: false,
            };
            if let Some(ms) = number(request.metadata(), "x-sleep-ms") {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let delay = state.delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if request.metadata().contains_key("x-gate") {
                state.gate.pass().await;
            }
            finish.done = true;
            if let Some(status) = failure(&state, request.metadata()) {
                return Err(status);
            }
            let headers = response_headers(&state, request.metadata());
            let mut response = Response::new(request.into_inner());
            *response.metadata_mut() = headers;
            Ok(response)
        })
    }
}

type BoxStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

struct ServerStream(Arc<BackendState>);
impl ServerStreamingService<Bytes> for ServerStream {
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxStream>, Status>> + Send>>;
    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let count = number(request.metadata(), "x-count").unwrap_or(3);
            let interval =
                Duration::from_millis(number(request.metadata(), "x-interval-ms").unwrap_or(0));
            let headers = response_headers(&state, request.metadata());
            let message = request.into_inner();
            let finish = Finish {
                state: state.clone(),
                done: false,
            };
            let stream = async_stream(count, interval, message, state, finish);
            let mut response = Response::new(Box::pin(stream) as BoxStream);
            *response.metadata_mut() = headers;
            Ok(response)
        })
    }
}

fn async_stream(
    count: u64,
    interval: Duration,
    message: Bytes,
    state: Arc<BackendState>,
    finish: Finish,
) -> impl Stream<Item = Result<Bytes, Status>> + Send {
    futures::stream::unfold((0u64, Some(finish)), move |(sent, finish)| {
        let message = message.clone();
        let state = state.clone();
        async move {
            let mut finish = finish?;
            if sent == count {
                finish.done = true;
                let mut trailers = MetadataMap::new();
                trailers.insert("x-trailer", "done".parse().unwrap());
                trailers.insert_bin("x-trailer-bin", MetadataValue::from_bytes(&[0, 1, 2, 255]));
                return Some((
                    Err(Status::with_metadata(Code::Ok, "", trailers)),
                    (sent, None),
                ));
            }
            if sent > 0 && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            state.produced.fetch_add(message.len(), Ordering::SeqCst);
            Some((Ok(message), (sent + 1, Some(finish))))
        }
    })
}

struct ClientStream(Arc<BackendState>);
impl ClientStreamingService<Bytes> for ClientStream {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Status>> + Send>>;
    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let mut finish = Finish {
                state: state.clone(),
                done: false,
            };
            let headers = response_headers(&state, request.metadata());
            let mut stream = request.into_inner();
            let mut all = bytes::BytesMut::new();
            while let Some(message) = stream.message().await? {
                all.extend_from_slice(&message);
            }
            finish.done = true;
            let mut response = Response::new(all.freeze());
            *response.metadata_mut() = headers;
            Ok(response)
        })
    }
}

struct Bidi(Arc<BackendState>);
impl StreamingService<Bytes> for Bidi {
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxStream>, Status>> + Send>>;
    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let headers = response_headers(&state, request.metadata());
            let finish = Finish {
                state: state.clone(),
                done: false,
            };
            let stream = futures::stream::unfold(
                (request.into_inner(), Some(finish)),
                |(mut input, finish)| async move {
                    let mut finish = finish?;
                    match input.message().await {
                        Ok(Some(message)) => Some((Ok(message), (input, Some(finish)))),
                        Ok(None) => {
                            finish.done = true;
                            None
                        }
                        Err(status) => Some((Err(status), (input, None))),
                    }
                },
            );
            let mut response = Response::new(Box::pin(stream) as BoxStream);
            *response.metadata_mut() = headers;
            Ok(response)
        })
    }
}

struct Hold(Arc<BackendState>);
impl ServerStreamingService<Bytes> for Hold {
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxStream>, Status>> + Send>>;
    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            state.holding.fetch_add(1, Ordering::SeqCst);
            struct Holding(Arc<BackendState>, Finish);
            impl Drop for Holding {
                fn drop(&mut self) {
                    self.0.holding.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let holding = Holding(
                state.clone(),
                Finish {
                    state: state.clone(),
                    done: false,
                },
            );
            let headers = response_headers(&state, request.metadata());
            let first = futures::stream::once(futures::future::ready(Ok(request.into_inner())));
            let rest = futures::stream::once(async move {
                let _holding = holding;
                std::future::pending::<()>().await;
                Ok(Bytes::new())
            });
            let mut response = Response::new(Box::pin(first.chain(rest)) as BoxStream);
            *response.metadata_mut() = headers;
            Ok(response)
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for EchoService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let state = self.state.clone();
        state.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let grpc = Grpc::new(BytesCodec)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .send_compressed(tonic::codec::CompressionEncoding::Gzip);
            let mut grpc = grpc;
            let path = request.uri().path().to_owned();
            let method = path.strip_prefix(&format!("/{SERVICE}/")).unwrap_or("");
            Ok(match method {
                "Unary" => grpc.unary(Unary(state), request).await,
                "ServerStream" => grpc.server_streaming(ServerStream(state), request).await,
                "ClientStream" => grpc.client_streaming(ClientStream(state), request).await,
                "Bidi" => grpc.streaming(Bidi(state), request).await,
                "Hold" => grpc.server_streaming(Hold(state), request).await,
                _ => Status::unimplemented(format!("no method {path}")).into_http(),
            })
        })
    }
}

/// A client of the test service that speaks raw bytes.
#[derive(Debug, Clone)]
pub struct Client {
    grpc: tonic::client::Grpc<Channel>,
}

fn path(method: &str) -> http::uri::PathAndQuery {
    format!("/{SERVICE}/{method}").parse().unwrap()
}

impl Client {
    /// A client connected to `addr` that sends `authority` as `:authority`.
    pub async fn connect(addr: SocketAddr, authority: &str) -> Client {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .origin(format!("http://{authority}").parse::<Uri>().unwrap())
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap();
        Client::new(channel)
    }

    /// Like [`Client::connect`], from the loopback address `source` (the
    /// socket is bound to it before it connects), as a pod with that IP.
    pub async fn connect_from(addr: SocketAddr, authority: &str, source: &str) -> Client {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .origin(format!("http://{authority}").parse::<Uri>().unwrap())
            .local_address(Some(source.parse().unwrap()))
            .connect()
            .await
            .unwrap();
        Client::new(channel)
    }

    /// A client over `channel`.
    pub fn new(channel: Channel) -> Client {
        Client {
            grpc: tonic::client::Grpc::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        }
    }

    /// Compresses requests with gzip and accepts gzip responses.
    pub fn gzip(mut self) -> Client {
        self.grpc = self
            .grpc
            .send_compressed(tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        self
    }

    /// Calls `Unary`.
    pub async fn unary(&mut self, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.grpc.unary(request, path("Unary"), BytesCodec).await
    }

    /// Calls `ServerStream`.
    pub async fn server_stream(
        &mut self,
        request: Request<Bytes>,
    ) -> Result<Response<Streaming<Bytes>>, Status> {
        self.server_streaming("ServerStream", request).await
    }

    /// Calls `Hold`.
    pub async fn hold(
        &mut self,
        request: Request<Bytes>,
    ) -> Result<Response<Streaming<Bytes>>, Status> {
        self.server_streaming("Hold", request).await
    }

    async fn server_streaming(
        &mut self,
        method: &str,
        request: Request<Bytes>,
    ) -> Result<Response<Streaming<Bytes>>, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.grpc
            .server_streaming(request, path(method), BytesCodec)
            .await
    }

    /// Calls `ClientStream`.
    pub async fn client_stream<S>(&mut self, request: Request<S>) -> Result<Response<Bytes>, Status>
    where
        S: Stream<Item = Bytes> + Send + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.grpc
            .client_streaming(request, path("ClientStream"), BytesCodec)
            .await
    }

    /// Calls `Bidi`.
    pub async fn bidi<S>(
        &mut self,
        request: Request<S>,
    ) -> Result<Response<Streaming<Bytes>>, Status>
    where
        S: Stream<Item = Bytes> + Send + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.grpc.streaming(request, path("Bidi"), BytesCodec).await
    }
}

/// An agent in this process, listening on free loopback ports.
pub async fn agent() -> App {
    agent_with(ProxyOptions::default()).await
}

/// An agent with listener settings.
pub async fn agent_with(proxy: ProxyOptions) -> App {
    App::start(AppOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        proxy,
        connector: H2Connector {
            connect_timeout: Duration::from_secs(2),
            ..H2Connector::default()
        },
    })
    .await
    .unwrap()
}

/// A pool builder: `pool("echo", &[addr]).max_streams(5).build()`.
#[derive(Debug, Clone)]
pub struct PoolBuilder {
    config: PoolConfig,
}

/// A static pool named `name` in namespace `default`.
pub fn pool(name: &str, addresses: &[String]) -> PoolBuilder {
    let spec: ConnectionPoolSpec =
        serde_yaml::from_str("target: {addresses: ['127.0.0.1:1']}").unwrap();
    let mut builder = PoolBuilder {
        config: PoolConfig {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            generation: 1,
            spec,
            addresses: vec![],
        },
    };
    builder = builder.addresses(addresses);
    builder
}

impl PoolBuilder {
    /// Sets the namespace.
    pub fn namespace(mut self, ns: &str) -> Self {
        self.config.namespace = ns.into();
        self
    }
    /// Sets the static addresses (spec and resolved).
    pub fn addresses(mut self, addresses: &[String]) -> Self {
        self.config.spec.target = Target {
            service: None,
            addresses: Some(addresses.iter().cloned().map(Address).collect()),
        };
        self.config.addresses = addresses.to_vec();
        self
    }
    /// Sets `size`.
    pub fn size(mut self, size: i32) -> Self {
        self.config.spec.size = size;
        if self.config.spec.max_idle.is_some_and(|m| m > size) {
            self.config.spec.max_idle = Some(size);
        }
        self
    }
    /// Sets `maxIdle`.
    pub fn max_idle(mut self, max_idle: i32) -> Self {
        self.config.spec.max_idle = Some(max_idle);
        self
    }
    /// Sets `maxStreams`.
    pub fn max_streams(mut self, max_streams: i32) -> Self {
        self.config.spec.max_streams = max_streams;
        self
    }
    /// Sets `ttl`.
    pub fn ttl(mut self, ttl: &str) -> Self {
        self.config.spec.ttl = ttl.into();
        self
    }
    /// `whenFull: Wait` with `acquireTimeout`.
    pub fn wait(mut self, acquire_timeout: &str) -> Self {
        self.config.spec.when_full = WhenFull::Wait;
        self.config.spec.acquire_timeout = acquire_timeout.into();
        self
    }
    /// Sets `listenPort`.
    pub fn listen_port(mut self, port: u16) -> Self {
        self.config.spec.listen_port = Some(i32::from(port));
        self
    }
    /// Sets `spec.clients.namespaces`.
    pub fn clients(mut self, namespaces: &[&str]) -> Self {
        self.config.spec.clients = Some(Clients {
            namespaces: namespaces
                .iter()
                .map(|n| NamespaceName((*n).into()))
                .collect(),
        });
        self
    }
    /// Sets the generation.
    pub fn generation(mut self, generation: i64) -> Self {
        self.config.generation = generation;
        self
    }
    /// The configuration.
    pub fn build(self) -> PoolConfig {
        self.config
    }
}

/// Waits until `check` holds, at most `timeout`; returns whether it did.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET path` on an HTTP/1.0 server (the admin port): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nhost: admin\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Total streams and connections the agent's pools report for `addr`.
pub fn occupancy(app: &App, addr: &str) -> (usize, usize) {
    app.runtime()
        .report()
        .iter()
        .flat_map(|p| p.addresses.iter())
        .filter(|a| a.address == addr)
        .fold((0, 0), |(s, c), a| {
            (s + a.streams, c + a.connections + a.draining + a.overflow)
        })
}

/// Waits at most `timeout` for the agent to hold no stream to `addr`;
/// returns whether it got there.
pub async fn streams_released(app: &App, addr: &str, timeout: Duration) -> bool {
    eventually(timeout, || occupancy(app, addr).0 == 0).await
}

/// A TCP load balancer on loopback: each new connection goes to the next
/// of its current backends, round robin (a Service's ClusterIP, in small).
#[derive(Debug, Clone)]
pub struct Balancer {
    /// Where it listens.
    pub addr: SocketAddr,
    backends: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl Balancer {
    /// Starts a balancer over `backends`.
    pub async fn start(backends: Vec<SocketAddr>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(std::sync::Mutex::new(backends));
        let shared = backends.clone();
        tokio::spawn(async move {
            let next = AtomicUsize::new(0);
            while let Ok((mut client, _)) = listener.accept().await {
                let target = {
                    let list = shared.lock().unwrap();
                    list[next.fetch_add(1, Ordering::SeqCst) % list.len()]
                };
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = server.set_nodelay(true);
                        let _ = client.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Balancer { addr, backends }
    }

    /// Replaces the backends new connections go to.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock().unwrap() = backends;
    }
}

/// A request with metadata.
pub fn request(message: impl Into<Bytes>, metadata: &[(&'static str, &str)]) -> Request<Bytes> {
    let mut request = Request::new(message.into());
    for (k, v) in metadata {
        request.metadata_mut().insert(*k, v.parse().unwrap());
    }
    request
}

/// The `x-backend` header of a response.
pub fn backend_of(metadata: &MetadataMap) -> String {
    metadata
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// What a raw HTTP/2 exchange returned.
#[derive(Debug)]
pub struct RawResponse {
    /// HTTP status.
    pub status: http::StatusCode,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, if any.
    pub trailers: Option<http::HeaderMap>,
}

impl RawResponse {
    /// `grpc-status` from the trailers or, for trailers-only answers, the
    /// headers.
    pub fn grpc_status(&self) -> Option<String> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned())
    }

    /// `grpc-message`, as sent (percent-encoded).
    pub fn grpc_message(&self) -> String {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-message"))
            .or_else(|| self.headers.get("grpc-message"))
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

/// Frames a gRPC message (uncompressed).
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = bytes::BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.extend_from_slice(message);
    out.freeze()
}

/// One request over a fresh h2c connection made with the `h2` crate, which
/// enforces no deadline of its own and sends exactly these headers.
pub async fn raw_call(
    addr: SocketAddr,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<RawResponse, h2::Error> {
    raw_call_with_trailers(addr, method, uri, headers, body, None).await
}

/// [`raw_call`], ending the request with `trailers` when given (gRPC
/// clients never send request trailers; HTTP/2 allows them).
pub async fn raw_call_with_trailers(
    addr: SocketAddr,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    trailers: Option<http::HeaderMap>,
) -> Result<RawResponse, h2::Error> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut send = send.ready().await?;
    let mut builder = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let (response, mut stream) = send.send_request(builder.body(()).unwrap(), false)?;
    match trailers {
        Some(trailers) => {
            stream.send_data(body, false)?;
            stream.send_trailers(trailers)?;
        }
        None => stream.send_data(body, true)?,
    }
    let response = response.await?;
    let (parts, mut recv) = response.into_parts();
    let mut all = bytes::BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        all.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await?;
    Ok(RawResponse {
        status: parts.status,
        headers: parts.headers,
        body: all.freeze(),
        trailers,
    })
}
