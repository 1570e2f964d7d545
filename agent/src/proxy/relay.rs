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
//! - **A request can be sent again** (`Relay::replayable`): until the
//!   caller calls `Relay::stop_replay` (the backend answered), the relay
//!   keeps what it sent, up to a cap, and `Relay::rewind` puts it back in
//!   front of what is still to send, for a new backend stream. Flow-control
//!   capacity is released once per byte, on its first sending.
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

    /// Puts `data` back in front, before everything else.
    fn push_front(&mut self, data: Bytes) {
        self.len += data.len();
        self.queue.push_front(data);
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

/// What a replayable relay has sent, kept so it can be sent again.
///
/// Invariant: `len` is the sum of the lengths of `sent`, never above `cap`;
/// once more than `cap` bytes went out, `overflowed` is set and `sent` is
/// emptied (the memory is given back at once).
#[derive(Debug)]
struct Record {
    sent: Vec<Bytes>,
    len: usize,
    cap: usize,
    overflowed: bool,
    /// The receiving side's trailers, once they arrived.
    trailers: Option<HeaderMap>,
}

impl Record {
    fn sent(&mut self, chunk: &Bytes) {
        if self.overflowed {
            return;
        }
        if self.len + chunk.len() > self.cap {
            self.overflowed = true;
            self.sent = Vec::new();
            self.len = 0;
            return;
        }
        self.len += chunk.len();
        self.sent.push(chunk.clone());
    }
}

/// Why a relay cannot send its stream again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoReplay {
    /// It was not made replayable, or the caller stopped keeping a copy.
    NotKept,
    /// More than the cap (this many bytes) had been sent.
    Overflowed {
        /// The cap in bytes.
        cap: usize,
    },
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
    /// Bytes at the front of `pending` whose capacity was already released
    /// to the sender: sent once before, put back by [`Relay::rewind`].
    released: usize,
    /// What was sent, while the stream may still be sent again.
    record: Option<Box<Record>>,
    /// Trailers put back by [`Relay::rewind`], to end the stream with again
    /// (boxed: rare, and every relay would carry the space).
    replayed_trailers: Option<Box<HeaderMap>>,
}

impl Relay {
    /// A relay that keeps up to `cap` bytes of what it sent, so that
    /// [`Relay::rewind`] can send them again.
    pub(crate) fn replayable(cap: usize) -> Self {
        Self {
            record: Some(Box::new(Record {
                sent: Vec::new(),
                len: 0,
                cap,
                overflowed: false,
                trailers: None,
            })),
            ..Self::default()
        }
    }

    /// Stops keeping a copy and frees it: the stream will not be sent again.
    pub(crate) fn stop_replay(&mut self) {
        self.record = None;
    }

    /// Whether [`Relay::rewind`] can send everything again.
    pub(crate) fn can_replay(&self) -> Result<(), NoReplay> {
        match &self.record {
            None => Err(NoReplay::NotKept),
            Some(record) if record.overflowed => Err(NoReplay::Overflowed { cap: record.cap }),
            Some(_) => Ok(()),
        }
    }

    /// Puts everything sent so far back in front of what is still to send
    /// (and the trailers, if they were sent), so the next [`Relay::poll`]
    /// sends the stream from its start to a new sending side. The copy is
    /// kept on, so it can happen again.
    pub(crate) fn rewind(&mut self) -> Result<(), NoReplay> {
        self.can_replay()?;
        let Some(record) = self.record.as_mut() else {
            return Err(NoReplay::NotKept);
        };
        let sent = std::mem::take(&mut record.sent);
        let len = std::mem::replace(&mut record.len, 0);
        for chunk in sent.into_iter().rev() {
            self.pending.push_front(chunk);
        }
        self.released += len;
        if let Some(trailers) = record.trailers.take() {
            self.replayed_trailers = Some(Box::new(trailers));
        }
        Ok(())
    }

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
            let last = self.data_done
                && self.pending.len == 0
                && self.replayed_trailers.is_none()
                && recv.is_end_stream();
            // A copy (a reference count) only while the stream may still be
            // sent again.
            let kept = self
                .record
                .as_ref()
                .filter(|record| !record.overflowed)
                .map(|_| chunk.clone());
            if let Err(error) = send.send_data(chunk, last) {
                // Not sent: it stays first in line, for a rewind.
                if let Some(chunk) = kept {
                    self.pending.push_front(chunk);
                }
                return Poll::Ready(Err(Broken::Send(error)));
            }
            if let (Some(record), Some(chunk)) = (self.record.as_mut(), kept.as_ref()) {
                record.sent(chunk);
            }
            // The bytes are on their way: the sender may send as many more
            // (bytes sent before a rewind were released the first time).
            let replayed = n.min(self.released);
            self.released -= replayed;
            if n > replayed {
                let _ = recv.flow_control().release_capacity(n - replayed);
            }
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
        if let Some(trailers) = self.replayed_trailers.take() {
            return Poll::Ready(Ok(self.ended_with(*trailers)));
        }
        match recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Ok(self.ended_with(trailers))),
            Poll::Ready(Ok(None)) => match send.send_data(Bytes::new(), true) {
                Ok(()) => Poll::Ready(Ok(End::Eos)),
                Err(error) => Poll::Ready(Err(Broken::Send(error))),
            },
            Poll::Ready(Err(error)) => Poll::Ready(Err(Broken::Recv(error))),
            Poll::Pending => self.watch_reset(cx, send),
        }
    }

    /// The end with `trailers`, a copy kept while the stream may be sent
    /// again.
    fn ended_with(&mut self, trailers: HeaderMap) -> End {
        if let Some(record) = self.record.as_mut() {
            record.trailers = Some(trailers.clone());
        }
        End::Trailers(trailers)
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
    fn a_record_keeps_up_to_its_cap_and_then_nothing() {
        let mut relay = Relay::replayable(10);
        assert_eq!(relay.can_replay(), Ok(()));
        let record = relay.record.as_mut().unwrap();
        record.sent(&Bytes::from_static(b"12345"));
        record.sent(&Bytes::from_static(b"67890"));
        assert_eq!((record.len, record.sent.len()), (10, 2));
        // Rewound, the bytes are first in line again, counted as released.
        relay.rewind().unwrap();
        assert_eq!((relay.pending(), relay.released), (10, 10));
        assert_eq!(relay.pending.take(usize::MAX), Bytes::from_static(b"12345"));
        let record = relay.record.as_mut().unwrap();
        assert_eq!(record.len, 0, "a rewind starts the record over");
        record.sent(&Bytes::from_static(b"12345678901"));
        assert!(record.overflowed && record.sent.is_empty() && record.len == 0);
        assert_eq!(relay.can_replay(), Err(NoReplay::Overflowed { cap: 10 }));
        assert_eq!(relay.rewind(), Err(NoReplay::Overflowed { cap: 10 }));
        relay.stop_replay();
        assert_eq!(relay.can_replay(), Err(NoReplay::NotKept));
        assert_eq!(Relay::default().can_replay(), Err(NoReplay::NotKept));
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
