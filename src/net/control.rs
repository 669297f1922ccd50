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
