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

// The block split below mirrors `wire::header::{data_shards_for, group_span,
// MAX_BLOCK_LEN}`. Those are `pub` inside the private `wire::header` module but
// not re-exported by `wire`, so `fec` cannot name them and may not edit `wire`.
// The split is part of the protocol (a receiver recomputes it instead of it
// being sent), so the two copies must agree: `split_matches_wire` and the
// encoder tests check every encoded datagram with `ShardHeader::decode_datagram`,
// which runs the wire copy. Once `wire` re-exports them, delete these.

/// Largest block a header may announce; mirrors `wire::header::MAX_BLOCK_LEN`.
pub(crate) const MAX_BLOCK_LEN: usize = 16 << 20;

/// Most data shards one code group may have: `k` is a `u8` on the wire.
pub(crate) const MAX_GROUP_DATA_SHARDS: usize = 255;

/// Most code groups one block may have: the group count is a `u8` on the wire.
pub(crate) const MAX_GROUPS: usize = 255;

/// Data shards for `block_len` bytes at `shard_size` bytes per shard; an empty
/// block still takes one all-padding shard. Mirrors `wire::header::data_shards_for`.
pub(crate) fn data_shards_for(block_len: usize, shard_size: usize) -> usize {
    block_len.div_ceil(shard_size.max(1)).max(1)
}

/// `(first data shard, data shard count)` of `group` when `total` data shards
/// are spread over `groups` groups, larger groups first. Mirrors
/// `wire::header::group_span`.
pub(crate) fn group_span(total: usize, groups: usize, group: usize) -> (usize, usize) {
    let groups = groups.max(1);
    let base = total / groups;
    let extra = total % groups;
    let k = base + usize::from(group < extra);
    let first = group * base + group.min(extra);
    (first, k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Encode, Flags, ShardHeader};
    use bytes::Bytes;
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    fn datagram(h: &ShardHeader, payload: usize) -> Bytes {
        let mut buf = Vec::new();
        h.encode(&mut buf);
        buf.resize(buf.len() + payload, 0);
        Bytes::from(buf)
    }

    /// The mirrored split accepts exactly what `wire`'s `decode_datagram`
    /// accepts: for random block lengths, shard sizes and group counts, the `k`
    /// our `group_span` computes passes and `k ± 1` fails.
    #[test]
    fn split_matches_wire() {
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        for _ in 0..2000 {
            let shard = rng.random_range(1..3000);
            let len = rng.random_range(0..=(MAX_BLOCK_LEN / 64));
            let total = data_shards_for(len, shard);
            let groups = rng.random_range(1..=total.min(MAX_GROUPS));
            if total.div_ceil(groups) > MAX_GROUP_DATA_SHARDS {
                continue;
            }
            let group = rng.random_range(0..groups);
            let (_, k) = group_span(total, groups, group);
            let h = |k: usize| ShardHeader {
                flags: Flags::empty(),
                stream_id: 1,
                seq: 9,
                timestamp_us: 0,
                k: k as u8,
                m: 1,
                index: 0,
                block_len: len as u32,
                group: group as u8,
                groups: groups as u8,
            };
            let ctx = format!("seed {seed}: len {len} shard {shard} group {group}/{groups}");
            assert!(
                ShardHeader::decode_datagram(&datagram(&h(k), shard)).is_ok(),
                "{ctx}"
            );
            for bad in [k - 1, k + 1] {
                if (1..=MAX_GROUP_DATA_SHARDS).contains(&bad) {
                    assert!(
                        ShardHeader::decode_datagram(&datagram(&h(bad), shard)).is_err(),
                        "{ctx}: k {bad}"
                    );
                }
            }
        }
    }

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

    /// `MAX_BLOCK_LEN` matches the limit `wire` enforces.
    #[test]
    fn max_block_len_matches_wire() {
        let h = |len: usize| ShardHeader {
            flags: Flags::empty(),
            stream_id: 1,
            seq: 0,
            timestamp_us: 0,
            k: 255,
            m: 1,
            index: 0,
            block_len: len as u32,
            group: 0,
            groups: 1,
        };
        let shard = MAX_BLOCK_LEN / 255 + 1;
        assert!(ShardHeader::decode_datagram(&datagram(&h(MAX_BLOCK_LEN), shard)).is_ok());
        assert!(ShardHeader::decode_datagram(&datagram(&h(MAX_BLOCK_LEN + 1), shard)).is_err());
    }
}
