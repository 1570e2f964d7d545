//! Moving one direction of a stream from an h2 [`RecvStream`] to an h2
//! [`SendStream`]: the request from the client to the backend, and the
//! response from the backend to the client use the same code.
//!
//! What the relay guarantees:
//! - **Frames leave h2's receive buffer as soon as the task runs**, whether
//!   or not the other side can take them yet. h2 charges each small DATA
//!   frame it holds against a per-connection budget and answers an
//!   exhausted budget with GOAWAY ENHANCE_YOUR_CALM, which kills every
//!   stream on the connection. Taken out promptly, small frames stop
//!   counting; their bytes wait here instead, copied together.
//! - **Flow control stays end to end.** Capacity is released to the sender
//!   only for bytes handed on to the receiver, so what waits here is bounded
//!   by the stream window the agent advertised, and a slow receiver slows the
//!   sender.
//! - **Small frames are coalesced.** Whatever has arrived by the time
//!   capacity is there goes out in one DATA frame (up to the window), so a
//!   burst of tiny messages costs one frame each way, not one per message.
//!
//! The relay does not send trailers: the caller decides what ends the
//! stream (the backend's trailers, or the agent's own).

use std::collections::VecDeque;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;

/// Chunks up to this size are copied into one buffer; larger ones are
/// forwarded as they are, without a copy.
const COPY_MAX: usize = 4096;

/// How the receiving side ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Trailers arrived; every byte before them has been sent. The caller
    /// sends them (or its own).
    Trailers(HeaderMap),
    /// The stream ended without trailers; END_STREAM has been sent.
    Eos,
}

/// Why a relay stopped early.
#[derive(Debug)]
pub(crate) enum Broken {
    /// The receiving side failed (reset, or its connection broke).
    Recv(h2::Error),
    /// The sending side was reset or closed by its peer.
    Send(h2::Error),
}

/// Bytes taken from the receiving side and not yet sent, in order.
///
/// Invariant: `len` is the sum of the lengths of `queue` and `tail`, and
/// `tail` comes after everything in `queue`.
#[derive(Debug, Default)]
struct Pending {
    queue: VecDeque<Bytes>,
    tail: BytesMut,
    len: usize,
}

impl Pending {
    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        if data.len() <= COPY_MAX {
            self.tail.extend_from_slice(&data);
        } else {
            if !self.tail.is_empty() {
                self.queue.push_back(self.tail.split().freeze());
            }
            self.queue.push_back(data);
        }
    }

    /// Takes up to `max` bytes from the front, in one piece.
    fn take(&mut self, max: usize) -> Bytes {
        let taken = match self.queue.front_mut() {
            Some(front) if front.len() > max => front.split_to(max),
            Some(_) => self.queue.pop_front().unwrap_or_default(),
            None => {
                let n = max.min(self.tail.len());
                self.tail.split_to(n).freeze()
            }
        };
        self.len -= taken.len();
        taken
    }
}

/// One direction of a stream being forwarded. Poll it with
/// [`Relay::poll`] until it returns; it keeps its place between polls, so
/// the caller may poll other things (a deadline, the other direction) in
/// between.
#[derive(Debug, Default)]
pub(crate) struct Relay {
    pending: Pending,
    /// The receiving side has no more data (trailers may follow).
    data_done: bool,
}

impl Relay {
    /// Bytes taken in and not yet sent.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.pending.len
    }

    /// Moves what it can from `recv` to `send`; ready when `recv` has ended
    /// and everything before its end went out, or when either side broke.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        recv: &mut RecvStream,
        send: &mut SendStream<Bytes>,
    ) -> Poll<Result<End, Broken>> {
        // 1. Empty h2's receive buffer, whatever the other side can take.
        while !self.data_done {
            match recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => self.pending.push(data),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(Broken::Recv(error))),
                Poll::Ready(None) => self.data_done = true,
                Poll::Pending => break,
            }
        }
        // 2. Send what the other side's window takes.
        while self.pending.len > 0 {
            send.reserve_capacity(self.pending.len);
            let capacity = send.capacity();
            if capacity == 0 {
                match send.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(Some(Err(error))) => {
                        return Poll::Ready(Err(Broken::Send(error)));
                    }
                    Poll::Ready(None) => {
                        return Poll::Ready(Err(Broken::Send(Reason::STREAM_CLOSED.into())));
                    }
                    Poll::Pending => return self.watch_reset(cx, send),
                }
            }
            let chunk = self.pending.take(capacity);
            let n = chunk.len();
            let last = self.data_done && self.pending.len == 0 && recv.is_end_stream();
            if let Err(error) = send.send_data(chunk, last) {
                return Poll::Ready(Err(Broken::Send(error)));
            }
            // The bytes are on their way: the sender may send as many more.
            let _ = recv.flow_control().release_capacity(n);
            if last {
                return Poll::Ready(Ok(End::Eos));
            }
        }
        // Nothing left to send: give back capacity reserved and unused, so
        // other streams on the connection can have it.
        send.reserve_capacity(0);
        if !self.data_done {
            return self.watch_reset(cx, send);
        }
        // 3. Everything sent: the end.
        match recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Ok(End::Trailers(trailers))),
            Poll::Ready(Ok(None)) => match send.send_data(Bytes::new(), true) {
                Ok(()) => Poll::Ready(Ok(End::Eos)),
                Err(error) => Poll::Ready(Err(Broken::Send(error))),
            },
            Poll::Ready(Err(error)) => Poll::Ready(Err(Broken::Recv(error))),
            Poll::Pending => self.watch_reset(cx, send),
        }
    }

    /// Pending, but woken if the sending side's peer resets the stream
    /// meanwhile.
    fn watch_reset(
        &self,
        cx: &mut Context<'_>,
        send: &mut SendStream<Bytes>,
    ) -> Poll<Result<End, Broken>> {
        match send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => Poll::Ready(Err(Broken::Send(reason.into()))),
            Poll::Ready(Err(error)) => Poll::Ready(Err(Broken::Send(error))),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_chunks_are_copied_together_and_large_ones_kept_whole() {
        let mut pending = Pending::default();
        for _ in 0..10 {
            pending.push(Bytes::from_static(b"hello"));
        }
        let big = Bytes::from(vec![7u8; COPY_MAX + 1]);
        pending.push(big.clone());
        pending.push(Bytes::from_static(b"tail"));
        assert_eq!(pending.len, 50 + big.len() + 4);
        // The ten small chunks come out as one piece, in order.
        assert_eq!(pending.take(usize::MAX), Bytes::from("hello".repeat(10)));
        // The large chunk is the same allocation, split where asked.
        let first = pending.take(100);
        assert_eq!(first.len(), 100);
        assert_eq!(first.as_ptr(), big.as_ptr());
        assert_eq!(pending.take(usize::MAX).len(), COPY_MAX + 1 - 100);
        assert_eq!(pending.take(usize::MAX), Bytes::from_static(b"tail"));
        assert_eq!(pending.len, 0);
        assert!(pending.take(10).is_empty());
    }

    #[test]
    fn a_take_never_exceeds_what_was_asked() {
        let mut pending = Pending::default();
        let mut total = 0;
        for i in 0..200usize {
            let chunk = Bytes::from(vec![u8::try_from(i % 251).unwrap(); i * 37 % 6000]);
            total += chunk.len();
            pending.push(chunk);
        }
        let mut out = Vec::new();
        while pending.len > 0 {
            let piece = pending.take(1000);
            assert!(!piece.is_empty() && piece.len() <= 1000);
            out.extend_from_slice(&piece);
        }
        assert_eq!(out.len(), total);
        let relay = Relay::default();
        assert_eq!(relay.pending(), 0);
    }
}
