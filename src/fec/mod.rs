//! Reed-Solomon forward error correction: media blocks to shard datagrams and back.
//!
//! PURE: no I/O, no clock reads, nothing spawned. Time comes in as
//! [`std::time::Instant`] arguments, results go out through return values and
//! `poll_*` calls, so everything here is tested with a clock the test moves.
//!
//! [`FecConfig`] sets how blocks are cut into shards and protected;
//! [`DecoderConfig`] bounds what a receiver holds.

mod config;

pub use config::{
    DecoderConfig, FecConfig, DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_MAX_DATA_SHARDS,
    DEFAULT_REDUNDANCY, DEFAULT_SHARD_SIZE, DEFAULT_WINDOW, MAX_SHARD_SIZE, MAX_WINDOW,
};

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

// Mirrors `wire::header::MAX_BLOCK_LEN`, which `wire` does not re-export
// (its `header` module is private) and `fec` may not edit.
/// Largest block a header may announce; mirrors `wire::header::MAX_BLOCK_LEN`.
pub(crate) const MAX_BLOCK_LEN: usize = 16 << 20;

/// Most data shards one code group may have: `k` is a `u8` on the wire.
pub(crate) const MAX_GROUP_DATA_SHARDS: usize = 255;

/// Most code groups one block may have: the group count is a `u8` on the wire.
pub(crate) const MAX_GROUPS: usize = 255;
