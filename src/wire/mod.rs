//! Byte layouts: the datagram [`ShardHeader`], the viewer's repair datagram and
//! the control-stream messages.
//!
//! PURE: no I/O, no clock. Every decoder reads the version first, checks
//! [`bytes::Buf::remaining`] before each read, bounds every length it is given
//! and returns a typed [`DecodeError`]; nothing here panics on input from the
//! network. The byte-by-byte description is in `PROTOCOL.md`.

pub mod compact;
mod control;
mod header;
mod repair;
mod varint;

pub use control::{
    ClientEvent, ControlMessage, Report, Summary, MAX_CONTROL_FRAME, MAX_LATENCY_MS,
    MAX_STRING_LEN, MAX_TOKEN_LEN,
};
pub use header::{
    data_shards_for, group_span, Flags, ShardHeader, MAX_BLOCK_LEN, MAX_HEADER_LEN, MAX_SHARDS,
};
pub use repair::{
    decode_repair, encode_repair, RepairEncodeError, RepairEntry, ShardSet, MAX_REPAIR_ATTEMPTS,
    MAX_REPAIR_ENTRIES,
};
pub use varint::{VarInt, MAX_VARINT};

/// Datagram and control protocol version spoken by this crate.
///
/// A receiver drops datagrams and rejects Hellos of any other version; see
/// PROTOCOL.md for the rules.
pub const VERSION: u8 = 2;

/// Why bytes from the network could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before the field being read.
    #[error("input too short")]
    Short,
    /// Bytes were left over after a complete message.
    #[error("trailing bytes after message")]
    Long,
    /// The version byte is not one this crate speaks.
    #[error("unsupported version {0}")]
    Version(u8),
    /// A field holds a value outside its allowed range.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// A length field exceeds its cap.
    #[error("{0} too long")]
    TooLong(&'static str),
    /// An unknown control message type.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
}

/// Writes a value in its wire form.
pub trait Encode {
    /// Appends the encoding of `self` to `buf`.
    fn encode<B: bytes::BufMut>(&self, buf: &mut B);
}

/// Reads a value from its wire form.
pub trait Decode: Sized {
    /// Reads one value from the front of `buf`, advancing it.
    fn decode<B: bytes::Buf>(buf: &mut B) -> Result<Self, DecodeError>;
}
