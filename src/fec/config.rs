//! [`FecConfig`] for the sender and [`DecoderConfig`] for the receiver.

use super::{FecError, MAX_BLOCK_LEN, MAX_GROUPS, MAX_GROUP_DATA_SHARDS};
use crate::wire::MAX_SHARDS;

/// Default shard payload size in bytes; see [`FecConfig::set_shard_size`].
pub const DEFAULT_SHARD_SIZE: usize = 1100;

/// Largest shard payload size [`FecConfig::set_shard_size`] accepts (a QUIC
/// datagram can never carry more than about 65 500 bytes).
pub const MAX_SHARD_SIZE: usize = 65_000;

/// Default ratio of parity to data shards; see [`FecConfig::set_redundancy`].
pub const DEFAULT_REDUNDANCY: f64 = 0.5;

/// Default most data shards per code group; see [`FecConfig::set_max_data_shards`].
pub const DEFAULT_MAX_DATA_SHARDS: usize = 32;

/// Default decoder window in blocks; see [`DecoderConfig::set_window`].
pub const DEFAULT_WINDOW: usize = 64;

/// Largest decoder window [`DecoderConfig::set_window`] accepts.
pub const MAX_WINDOW: usize = 1 << 16;

/// Default cap on shard payload bytes a decoder holds; see
/// [`DecoderConfig::set_max_buffered_bytes`].
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 32 << 20;

/// How an [`Encoder`](super::Encoder) cuts blocks into shards and how much
/// parity it adds.
///
/// Setters validate and return `Err(FecError::InvalidConfig)` for a value out
/// of range, leaving the config unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct FecConfig {
    shard_size: usize,
    redundancy: f64,
    max_data_shards: usize,
}

impl Default for FecConfig {
    fn default() -> Self {
        Self {
            shard_size: DEFAULT_SHARD_SIZE,
            redundancy: DEFAULT_REDUNDANCY,
            max_data_shards: DEFAULT_MAX_DATA_SHARDS,
        }
    }
}

impl FecConfig {
    /// Largest shard payload per datagram (default 1100, range 1..=65 000).
    /// Each block uses as few shards as this allows, sized evenly, so a
    /// block's shards may be a little smaller.
    ///
    /// A datagram is this payload plus a header of at most
    /// [`MAX_HEADER_LEN`](crate::wire::MAX_HEADER_LEN) (35) bytes. quinn's
    /// `max_datagram_size()` starts at 1162 bytes (1200-byte initial UDP
    /// payload minus QUIC overhead) and only grows once path MTU discovery has
    /// confirmed a larger MTU, so the default 1100 + 35 <= 1162 fits every
    /// path from the first packet on. Larger shards mean fewer datagrams and
    /// headers per block but need MTU discovery to have run (or datagrams are
    /// refused); smaller shards cut the bytes one loss costs but add header
    /// overhead and shards per block.
    pub fn set_shard_size(&mut self, bytes: usize) -> Result<&mut Self, FecError> {
        if !(1..=MAX_SHARD_SIZE).contains(&bytes) {
            return Err(FecError::InvalidConfig("shard size"));
        }
        self.shard_size = bytes;
        Ok(self)
    }

    /// Parity shards per data shard encoded for every block (default 0.5, any
    /// finite value >= 0).
    ///
    /// This is the most parity any viewer can get: with the server's default
    /// [`Parity::Adaptive`](crate::Parity::Adaptive) each viewer is sent only
    /// the share its measured loss needs. Encoding costs grow with it (parity is
    /// computed once per block, not per viewer).
    ///
    /// A group of `k` data shards gets `m = max(1, ceil(k × ratio))` parity
    /// shards, capped so that `k + m <= 256`, and survives the loss of any `m`
    /// of its `k + m` shards. More parity survives more loss at the cost of
    /// bandwidth and encode time (both grow with `m`). This is the parity
    /// encoded; a per-viewer pump can send a viewer less with
    /// [`EncodedBlock::datagrams_with_parity`](super::EncodedBlock::datagrams_with_parity).
    pub fn set_redundancy(&mut self, ratio: f64) -> Result<&mut Self, FecError> {
        if !ratio.is_finite() || ratio < 0.0 {
            return Err(FecError::InvalidConfig("redundancy"));
        }
        self.redundancy = ratio;
        Ok(self)
    }

    /// Most data shards in one code group (default 32, range 1..=255).
    ///
    /// A block needing `N` data shards is split into `ceil(N / max)` code
    /// groups of near-equal size, each with its own parity. Larger groups
    /// spread parity over more shards (a burst of losses in one part of the
    /// block is repaired by parity from all of it) but cost more per rebuilt
    /// byte (decoding is `O(k)` per byte) and a group's shards are spread over
    /// a longer time. Smaller groups decode faster but each survives fewer
    /// losses. A block may have at most 255 groups, which bounds the block
    /// size: see [`max_block_len`](Self::max_block_len).
    pub fn set_max_data_shards(&mut self, shards: usize) -> Result<&mut Self, FecError> {
        if !(1..=MAX_GROUP_DATA_SHARDS).contains(&shards) {
            return Err(FecError::InvalidConfig("max data shards"));
        }
        self.max_data_shards = shards;
        Ok(self)
    }

    /// Shard payload bytes per datagram.
    pub fn shard_size(&self) -> usize {
        self.shard_size
    }

    /// Parity shards per data shard.
    pub fn redundancy(&self) -> f64 {
        self.redundancy
    }

    /// Most data shards in one code group.
    pub fn max_data_shards(&self) -> usize {
        self.max_data_shards
    }

    /// Parity shards encoded for a group of `k` data shards:
    /// `max(1, ceil(k × redundancy))`, capped so that `k + m <= 256`.
    pub fn parity_shards(&self, k: usize) -> usize {
        // The small epsilon keeps float noise (e.g. 10 × 0.3 = 3.0000000000000004)
        // from adding a whole shard.
        let m = (k as f64 * self.redundancy - 1e-9).ceil().max(1.0);
        // `as` saturates a huge ratio at usize::MAX; the cap below applies.
        (m as usize).min(MAX_SHARDS.saturating_sub(k))
    }

    /// Largest block, in bytes, this configuration can encode: 255 groups of
    /// [`max_data_shards`](Self::max_data_shards) shards, and never more than
    /// the 16 MiB a receiver accepts. With the defaults: 8 976 000 bytes.
    pub fn max_block_len(&self) -> usize {
        (MAX_GROUPS * self.max_data_shards * self.shard_size).min(MAX_BLOCK_LEN)
    }
}

/// Bounds on what a [`Decoder`](super::Decoder) holds.
///
/// Setters validate and return `Err(FecError::InvalidConfig)` for a value out
/// of range, leaving the config unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderConfig {
    window: usize,
    max_buffered_bytes: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
        }
    }
}

impl DecoderConfig {
    /// Blocks tracked at once, counted back from the highest sequence number
    /// seen (default 64, range 1..=65 536).
    ///
    /// A shard for a block older than the window is refused as
    /// [`Insert::OutOfWindow`](super::Insert::OutOfWindow); an unfinished block
    /// pushed out of the window by a newer one is given up as lost. The window
    /// must cover the blocks in flight within the latency budget (at 60 blocks
    /// per second and 500 ms, 30) plus reordering; a larger one costs a few
    /// dozen bytes per finished block and lets very old shards be classified
    /// instead of refused.
    pub fn set_window(&mut self, blocks: usize) -> Result<&mut Self, FecError> {
        if !(1..=MAX_WINDOW).contains(&blocks) {
            return Err(FecError::InvalidConfig("window"));
        }
        self.window = blocks;
        Ok(self)
    }

    /// Most shard payload bytes held for unfinished blocks (default 32 MiB,
    /// at least 1).
    ///
    /// When a shard takes the total above this, the oldest unfinished blocks
    /// holding data are given up as lost until it fits again. This bounds what
    /// a peer announcing huge blocks and never finishing them can make the
    /// receiver hold; it must exceed the largest block in flight times the
    /// blocks in flight, or blocks are given up before their deadline.
    pub fn set_max_buffered_bytes(&mut self, bytes: usize) -> Result<&mut Self, FecError> {
        if bytes == 0 {
            return Err(FecError::InvalidConfig("max buffered bytes"));
        }
        self.max_buffered_bytes = bytes;
        Ok(self)
    }

    /// Blocks tracked at once.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Most shard payload bytes held for unfinished blocks.
    pub fn max_buffered_bytes(&self) -> usize {
        self.max_buffered_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fit_first_datagram() {
        let c = FecConfig::default();
        // quinn's max_datagram_size() before MTU discovery.
        assert!(c.shard_size() + crate::wire::MAX_HEADER_LEN <= 1162);
        assert_eq!(c.parity_shards(32), 16);
        assert_eq!(c.max_block_len(), 255 * 32 * 1100);
    }

    #[test]
    fn parity_rule() {
        let mut c = FecConfig::default();
        c.set_redundancy(0.25).unwrap();
        assert_eq!(c.parity_shards(1), 1); // max(1, ..)
        assert_eq!(c.parity_shards(4), 1);
        assert_eq!(c.parity_shards(5), 2); // ceil(1.25)
        c.set_redundancy(0.0).unwrap();
        assert_eq!(c.parity_shards(10), 1);
        c.set_redundancy(0.3).unwrap();
        assert_eq!(c.parity_shards(10), 3); // not 4 from float noise
        c.set_redundancy(0.4).unwrap();
        assert_eq!(c.parity_shards(10), 4);
        c.set_redundancy(1e300).unwrap();
        assert_eq!(c.parity_shards(200), 56); // k + m <= 256
        assert_eq!(c.parity_shards(255), 1);
    }

    #[test]
    fn setters_reject_out_of_range() {
        let mut c = FecConfig::default();
        assert!(c.set_shard_size(0).is_err());
        assert!(c.set_shard_size(MAX_SHARD_SIZE + 1).is_err());
        assert!(c.set_redundancy(f64::NAN).is_err());
        assert!(c.set_redundancy(-0.1).is_err());
        assert!(c.set_redundancy(f64::INFINITY).is_err());
        assert!(c.set_max_data_shards(0).is_err());
        assert!(c.set_max_data_shards(256).is_err());
        assert_eq!(c, FecConfig::default(), "a refused value changes nothing");
        c.set_shard_size(1200)
            .and_then(|c| c.set_max_data_shards(255))
            .unwrap();
        assert_eq!(c.max_block_len(), MAX_BLOCK_LEN);

        let mut d = DecoderConfig::default();
        assert!(d.set_window(0).is_err());
        assert!(d.set_window(MAX_WINDOW + 1).is_err());
        assert!(d.set_max_buffered_bytes(0).is_err());
        assert_eq!(d, DecoderConfig::default());
    }
}
