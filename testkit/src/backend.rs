//! The test backend: a tonic server with all four RPC kinds (and `Hold`, a
//! stream that never ends) that counts what it saw and can be killed as a
//! crashed process would be.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::codegen::Service;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::{
    ClientStreamingService, Grpc, ServerStreamingService, StreamingService, UnaryService,
};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::codec::{BytesCodec, MAX_MESSAGE, SERVICE};

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
            /// Counts the stream in `holding` while it lives; its `Finish`,
            /// never done, counts it cancelled when it goes.
            struct Holding {
                state: Arc<BackendState>,
                _finish: Finish,
            }
            impl Drop for Holding {
                fn drop(&mut self) {
                    self.state.holding.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let holding = Holding {
                state: state.clone(),
                _finish: Finish {
                    state: state.clone(),
                    done: false,
                },
            };
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
