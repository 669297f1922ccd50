//! Reed-Solomon forward error correction: media blocks to shard datagrams and back.
//!
//! PURE: no I/O, no clock reads, nothing spawned. Time comes in as
//! [`std::time::Instant`] arguments, results go out through return values and
//! `poll_*` calls, so everything here is tested with a clock the test moves.
//!
//! # Sending
//!
//! An [`Encoder`] turns one block into `k` data shards plus `m` parity shards
//! per code group ([`FecConfig`] sets the shard size, the redundancy and the
//! largest group). It encodes each block once into one buffer and hands every
//! datagram out as a [`bytes::Bytes`] slice of it, so any number of viewers
//! share the same memory. A per-viewer pump sends a viewer only part of the
//! parity with [`EncodedBlock::datagrams_with_parity`].
//!
//! # Receiving
//!
//! A [`Decoder`] collects shards per block in a bounded window, rebuilds a block
//! as soon as each of its code groups has `k` distinct shards, and gives up on
//! a block at its deadline. Every block sequence number from the first one seen
//! gets exactly one [`Outcome`] (plus a later [`BlockResult::Late`] report when
//! a lost block becomes decodable after its deadline; late data is reported,
//! never delivered). Outcomes come out in the order blocks finish, not in
//! sequence order; in-order release is the session layer's job.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use quicast::fec::{BlockResult, Decoder, DecoderConfig, Encoder, FecConfig};
//! use quicast::wire::{Flags, ShardHeader};
//!
//! let mut encoder = Encoder::new(1, FecConfig::default());
//! let block = encoder.encode(0, 0, Flags::SYNC, &[7u8; 5000])?;
//!
//! let mut decoder = Decoder::new(DecoderConfig::default());
//! let deadline = Instant::now() + Duration::from_millis(200);
//! // Drop the first datagram: parity rebuilds it.
//! for datagram in block.datagrams().iter().skip(1) {
//!     let (header, payload) = ShardHeader::decode_datagram(datagram)?;
//!     decoder.insert(&header, payload, deadline);
//! }
//! let outcome = decoder.poll_outcome().expect("block finished");
//! assert!(matches!(outcome.result, BlockResult::Recovered { rebuilt: 1, .. }));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod codec;
mod config;
mod decoder;
mod encoder;

pub use config::{
    DecoderConfig, FecConfig, DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_MAX_DATA_SHARDS,
    DEFAULT_REDUNDANCY, DEFAULT_SHARD_SIZE, DEFAULT_WINDOW, MAX_SHARD_SIZE, MAX_WINDOW,
};
pub use decoder::{BlockResult, Decoder, DecoderStats, Insert, Outcome};
pub use encoder::{EncodedBlock, Encoder};

/// Why a block could not be encoded or a configuration value was refused.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FecError {
    /// The block needs more code groups than a header can describe (255), or
    /// is longer than a receiver accepts; see [`FecConfig::max_block_len`].
    #[error("block of {len} bytes is larger than the {max} bytes this configuration can encode")]
    BlockTooLarge {
        /// Length of the refused block.
        len: usize,
        /// Largest block the configuration can encode.
        max: usize,
    },
    /// The sequence number exceeds what a header carries (2^62 - 1).
    #[error("sequence number {0} out of range")]
    SeqOutOfRange(u64),
    /// A configuration value is outside its documented range.
    #[error("invalid {0}")]
    InvalidConfig(&'static str),
}

/// Largest block a header may announce (the wire limit), in bytes.
pub(crate) const MAX_BLOCK_LEN: usize = crate::wire::MAX_BLOCK_LEN as usize;

/// Most data shards one code group may have: `k` is a `u8` on the wire.
pub(crate) const MAX_GROUP_DATA_SHARDS: usize = 255;

/// Most code groups one block may have: the group count is a `u8` on the wire.
pub(crate) const MAX_GROUPS: usize = 255;

// The split of a block into groups is part of the protocol (a receiver
// recomputes it instead of it being sent); both sides use wire's.
pub(crate) use crate::wire::{data_shards_for, group_span};

#[cfg(test)]
mod tests {
    use super::*;

    /// The shell moves encoders, decoders and encoded blocks across tasks.
    #[test]
    fn types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Encoder>();
        check::<EncodedBlock>();
        check::<Decoder>();
        check::<Outcome>();
        check::<FecError>();
    }
}
