//! A client of the test service that speaks raw bytes, and the helpers its
//! requests and responses need.

use std::net::SocketAddr;

use bytes::Bytes;
use futures::Stream;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status, Streaming};

use crate::codec::{BytesCodec, MAX_MESSAGE, SERVICE};

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

    /// Waits until the channel can take a call; a channel that cannot is
    /// UNAVAILABLE, as tonic's generated clients say.
    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    /// Calls `Unary`.
    pub async fn unary(&mut self, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        self.ready().await?;
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
        self.ready().await?;
        self.grpc
            .server_streaming(request, path(method), BytesCodec)
            .await
    }

    /// Calls `ClientStream`.
    pub async fn client_stream<S>(&mut self, request: Request<S>) -> Result<Response<Bytes>, Status>
    where
        S: Stream<Item = Bytes> + Send + 'static,
    {
        self.ready().await?;
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
        self.ready().await?;
        self.grpc.streaming(request, path("Bidi"), BytesCodec).await
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
