//! The codec every test client and backend speaks: messages are raw bytes,
//! so a test compares exactly what went in with what came out.

use bytes::{Buf, BufMut, Bytes};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

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
