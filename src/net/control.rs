//! Control-stream framing over quinn streams.

use bytes::{Buf, BytesMut};

use crate::wire::{ControlMessage, DecodeError};

/// Why reading a control frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("control stream: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("bad control frame: {0}")]
    Decode(#[from] DecodeError),
}

/// Reads length-prefixed control frames from a `RecvStream`.
///
/// Holds at most one partial frame (capped at `max_frame` bytes plus one read
/// chunk), so a peer cannot make it buffer more.
#[derive(Debug)]
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    max_frame: usize,
}

impl FrameReader {
    pub(crate) fn new(recv: quinn::RecvStream, max_frame: usize) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::with_capacity(1024),
            max_frame,
        }
    }

    /// The next message, or `None` when the peer finished the stream cleanly.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: bytes are only taken from quinn by `read_chunk`, which is
    /// cancel safe, and are kept in `self` until a whole frame has arrived, so
    /// dropping the future loses nothing.
    pub(crate) async fn next(&mut self) -> Result<Option<ControlMessage>, FrameError> {
        loop {
            let mut rd = &self.buf[..];
            if let Some(msg) = ControlMessage::decode_frame(&mut rd, self.max_frame)? {
                let used = self.buf.len() - rd.len();
                self.buf.advance(used);
                return Ok(Some(msg));
            }
            // Read no more than the largest frame can still need.
            let want = (self.max_frame + 8).saturating_sub(self.buf.len()).max(1);
            match self.recv.read_chunk(want, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(DecodeError::Short.into()),
            }
        }
    }
}

/// Writes one message as a frame.
///
/// # Cancel safety
///
/// Not cancel safe: a dropped write may leave half a frame on the stream. Await
/// it to completion, never inside a `select!` branch condition.
pub(crate) async fn write(
    send: &mut quinn::SendStream,
    msg: &ControlMessage,
) -> Result<(), quinn::WriteError> {
    let mut buf = Vec::with_capacity(64);
    msg.encode_frame(&mut buf);
    send.write_all(&buf).await
}

/// Control messages that may wait for a viewer's writer, at most. A viewer
/// whose stream takes no bytes lets them pile up here; one more closes it.
pub(crate) const QUEUE: usize = 16;

/// Why a control writer stopped before its queue was closed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriterError {
    /// One write did not complete within the drain bound: the peer withholds
    /// flow-control credit (or its path is dead).
    #[error("control stream not drained within {0:?}")]
    Stalled(std::time::Duration),
    #[error("control stream: {0}")]
    Write(#[from] quinn::WriteError),
}

/// Writes what `rx` yields to `send`, each write bounded by `drain`, until
/// every sender is dropped; then finishes the stream and waits (briefly) for
/// the peer to acknowledge it.
///
/// This is the only place a server-side control write waits on the peer, so
/// a viewer that withholds credit stalls only this future, never its media
/// pump: the pump queues with `try_send` and never awaits a write.
///
/// # Cancel safety
///
/// Not cancel safe: dropping it mid-write may leave half a frame on the
/// stream, which is harmless only because the connection is closed then.
pub(crate) async fn writer(
    mut send: quinn::SendStream,
    mut rx: tokio::sync::mpsc::Receiver<ControlMessage>,
    drain: std::time::Duration,
) -> Result<(), WriterError> {
    let mut buf = Vec::with_capacity(256);
    while let Some(msg) = rx.recv().await {
        buf.clear();
        msg.encode_frame(&mut buf);
        // Whatever queued meanwhile goes in the same write.
        while let Ok(msg) = rx.try_recv() {
            msg.encode_frame(&mut buf);
        }
        match tokio::time::timeout(drain, send.write_all(&buf)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(WriterError::Stalled(drain)),
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), send.stopped()).await;
    Ok(())
}
