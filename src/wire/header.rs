//! The datagram shard header.
//!
//! ```text
//!  0        version            u8     (= VERSION; read first, anything else is rejected)
//!  1        flags              u8     bit 0 SYNC, bit 2 GROUPED; bit 1 sent 0, ignored; other bits must be 0
//!  2..      stream id          varint (<= u32::MAX)
//!  ..       block sequence     varint
//!  ..       timestamp          u32    sender clock, microseconds, wrapping
//!  ..       k                  u8     data shards in this code group, 1..=255
//!  ..       m                  u8     parity shards in this code group as encoded, k + m <= 256
//!  ..       shard index        u8     0..k are data, k..k+m parity; < k + m
//!  ..       block length       varint bytes of media in the whole block (<= MAX_BLOCK_LEN)
//!  [GROUPED] group index       u8     < group count
//!  [GROUPED] group count       u8     >= 2
//!  ..       shard payload      the rest of the datagram; every shard of a block has the same size
//! ```
//!
//! A header is `9 + len(stream id) + len(sequence) + len(block length)` bytes,
//! plus 2 with the group extension, each `len` a varint's 1, 2, 4 or 8 bytes.
//! A common datagram (stream id < 64, sequence < 2^30, block < 16 KiB, one code
//! group) carries a 16-byte header; this crate's encoder writes at most 31
//! bytes (minimal varints); a decoder accepts up to [`MAX_HEADER_LEN`] (35)
//! since a peer may write a varint longer than it needs.

use bytes::{Buf, BufMut, Bytes};

use super::{Decode, DecodeError, Encode, VarInt, VERSION};

/// Most shards one code group may have: GF(2^8) Reed-Solomon limits k + m to 256.
pub const MAX_SHARDS: usize = 256;

/// Largest block, in bytes, a header may announce (16 MiB).
///
/// Bounds what a receiver will try to reassemble, whatever the sender claims.
pub const MAX_BLOCK_LEN: u64 = 16 << 20;

/// Longest header a decoder accepts: 8-byte varints (any varint may be written
/// longer than needed) plus the group extension. Minimal encoding of the
/// largest valid values (stream id 2^32 - 1, sequence 2^62 - 1, a 16 MiB
/// block) takes 31.
pub const MAX_HEADER_LEN: usize = 1 + 1 + 8 + 8 + 4 + 3 + 8 + 2;

/// Per-block flags carried in every shard of the block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Flags(u8);

impl Flags {
    /// The block is a sync point: a decoder can start here (e.g. a key frame).
    pub const SYNC: Flags = Flags(0x01);
    // Bit 1 was `END` (last block) in earlier drafts of version 2; no sender
    // set it, and EndOfStream on the control stream is the one end signal.
    // Senders write 0; receivers accept it and ignore it, so a sender that
    // followed the old text still gets its last block through.
    const IGNORED: u8 = 0x02;
    // Internal: the group extension follows the block length.
    const GROUPED: u8 = 0x04;
    const KNOWN: u8 = Self::SYNC.0 | Self::IGNORED | Self::GROUPED;

    /// No flags set.
    pub const fn empty() -> Self {
        Flags(0)
    }

    /// Whether every flag in `other` is set in `self`.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self` with the flags of `other` added.
    #[must_use]
    pub const fn with(self, other: Flags) -> Self {
        Flags(self.0 | other.0)
    }

    /// The raw bits, as sent.
    pub const fn bits(self) -> u8 {
        self.0
    }
}

/// Header of one FEC shard; one datagram is a header followed by the shard payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardHeader {
    /// [`Flags::SYNC`] or nothing.
    pub flags: Flags,
    /// Server-assigned id of the stream, announced in `Welcome`.
    pub stream_id: u32,
    /// Block sequence number, consecutive per stream from 0.
    pub seq: u64,
    /// Sender timestamp of the block in microseconds, wrapping at 2^32 (about 71
    /// minutes); receivers unwrap it against the previous block (serial-number
    /// arithmetic, RFC 1982).
    pub timestamp_us: u32,
    /// Data shards in this code group (1..=255).
    pub k: u8,
    /// Parity shards encoded for this code group (k + m <= 256). A viewer may
    /// receive fewer; the count here is what was encoded.
    pub m: u8,
    /// Index of this shard in its group: data shards first, then parity.
    pub index: u8,
    /// Media bytes in the whole block, before padding.
    pub block_len: u32,
    /// Index of this code group within the block.
    pub group: u8,
    /// Number of code groups the block was split into (1 when not split).
    pub groups: u8,
}

impl ShardHeader {
    /// Encoded size of this header in bytes.
    pub fn encoded_len(&self) -> usize {
        let ext = if self.groups > 1 { 2 } else { 0 };
        2 + VarInt::size(u64::from(self.stream_id))
            + VarInt::size(self.seq)
            + 4
            + 3
            + VarInt::size(u64::from(self.block_len))
            + ext
    }

    /// Whether this is a data shard (as opposed to parity).
    pub fn is_data(&self) -> bool {
        self.index < self.k
    }

    /// Decodes a whole datagram into its header and payload, and checks that the
    /// header is consistent with the payload size (the shard size).
    ///
    /// Beyond [`Decode::decode`], this checks the payload is not empty and that
    /// `k` is exactly the number of data shards that `block_len` bytes need at
    /// this shard size in this group ([`group_span`]). No allocation: the payload
    /// is a slice of `datagram`.
    pub fn decode_datagram(datagram: &Bytes) -> Result<(ShardHeader, Bytes), DecodeError> {
        let mut rd = &datagram[..];
        let header = ShardHeader::decode(&mut rd)?;
        let header_len = datagram.len() - rd.len();
        let shard_size = rd.len();
        if shard_size == 0 {
            return Err(DecodeError::Short);
        }
        let total = data_shards_for(header.block_len as usize, shard_size);
        // Every group holds at least one data shard, and at most 255.
        if usize::from(header.groups) > total {
            return Err(DecodeError::Invalid("groups for block length"));
        }
        if total > usize::from(header.groups) * 255 {
            return Err(DecodeError::Invalid("block length for k and shard size"));
        }
        let (_, k) = group_span(total, header.groups.into(), header.group.into());
        if k != usize::from(header.k) {
            return Err(DecodeError::Invalid("block length for k and shard size"));
        }
        Ok((header, datagram.slice(header_len..)))
    }
}

/// Data shards needed for a block of `block_len` bytes at `shard_size` bytes
/// per shard; an empty block still takes one (all padding) shard.
pub fn data_shards_for(block_len: usize, shard_size: usize) -> usize {
    block_len.div_ceil(shard_size.max(1)).max(1)
}

/// How the `total` data shards of a block are spread over `groups` code groups:
/// returns `(first data shard, data shard count)` of group `group`.
///
/// Groups differ in size by at most one shard, the larger ones first. Sender
/// and receiver both use this, so the split never has to be sent.
pub fn group_span(total: usize, groups: usize, group: usize) -> (usize, usize) {
    let groups = groups.max(1);
    let base = total / groups;
    let extra = total % groups;
    let k = base + usize::from(group < extra);
    let first = group * base + group.min(extra);
    (first, k)
}

impl Encode for ShardHeader {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        let grouped = self.groups > 1;
        buf.put_u8(VERSION);
        buf.put_u8(self.flags.0 | if grouped { Flags::GROUPED } else { 0 });
        VarInt::write(u64::from(self.stream_id), buf);
        VarInt::write(self.seq, buf);
        buf.put_u32(self.timestamp_us);
        buf.put_u8(self.k);
        buf.put_u8(self.m);
        buf.put_u8(self.index);
        VarInt::write(u64::from(self.block_len), buf);
        if grouped {
            buf.put_u8(self.group);
            buf.put_u8(self.groups);
        }
    }
}

impl Decode for ShardHeader {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        let version = buf.try_get_u8().map_err(|_| DecodeError::Short)?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let flags = buf.try_get_u8().map_err(|_| DecodeError::Short)?;
        if flags & !Flags::KNOWN != 0 {
            return Err(DecodeError::Invalid("flags"));
        }
        let stream_id =
            u32::try_from(VarInt::read(buf)?).map_err(|_| DecodeError::Invalid("stream id"))?;
        let seq = VarInt::read(buf)?;
        let timestamp_us = buf.try_get_u32().map_err(|_| DecodeError::Short)?;
        let k = buf.try_get_u8().map_err(|_| DecodeError::Short)?;
        let m = buf.try_get_u8().map_err(|_| DecodeError::Short)?;
        let index = buf.try_get_u8().map_err(|_| DecodeError::Short)?;
        let block_len = VarInt::read(buf)?;
        let (group, groups) = if flags & Flags::GROUPED != 0 {
            let group = buf.try_get_u8().map_err(|_| DecodeError::Short)?;
            let groups = buf.try_get_u8().map_err(|_| DecodeError::Short)?;
            if groups < 2 || group >= groups {
                return Err(DecodeError::Invalid("group"));
            }
            (group, groups)
        } else {
            (0, 1)
        };
        if k == 0 {
            return Err(DecodeError::Invalid("k"));
        }
        if usize::from(k) + usize::from(m) > MAX_SHARDS {
            return Err(DecodeError::Invalid("k + m"));
        }
        if usize::from(index) >= usize::from(k) + usize::from(m) {
            return Err(DecodeError::Invalid("shard index"));
        }
        if block_len > MAX_BLOCK_LEN {
            return Err(DecodeError::TooLong("block"));
        }
        Ok(ShardHeader {
            flags: Flags(flags & Flags::SYNC.0),
            stream_id,
            seq,
            timestamp_us,
            k,
            m,
            index,
            block_len: block_len as u32,
            group,
            groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, Rng, RngCore, SeedableRng};

    fn sample() -> ShardHeader {
        ShardHeader {
            flags: Flags::SYNC,
            stream_id: 3,
            seq: 1_000_000,
            timestamp_us: 0xdead_beef,
            k: 10,
            m: 4,
            index: 12,
            block_len: 10_500,
            group: 0,
            groups: 1,
        }
    }

    fn datagram(h: &ShardHeader, payload: usize) -> Bytes {
        let mut buf = Vec::new();
        h.encode(&mut buf);
        buf.resize(buf.len() + payload, 0xaa);
        Bytes::from(buf)
    }

    #[test]
    fn common_header_is_16_bytes() {
        let h = sample();
        let mut buf = Vec::new();
        h.encode(&mut buf);
        assert_eq!(buf.len(), 16);
        assert_eq!(h.encoded_len(), 16);
    }

    #[test]
    fn round_trip() {
        for groups in [1u8, 3] {
            let h = ShardHeader {
                groups,
                group: groups - 1,
                flags: Flags::SYNC,
                ..sample()
            };
            let mut buf = Vec::new();
            h.encode(&mut buf);
            assert_eq!(buf.len(), h.encoded_len());
            let mut rd = &buf[..];
            assert_eq!(ShardHeader::decode(&mut rd), Ok(h));
            assert!(rd.is_empty());
        }
    }

    /// Bit 1 (formerly `END`) is accepted and dropped: a block whose shards
    /// disagree only in it is still one consistent block.
    #[test]
    fn flag_bit_1_is_ignored() {
        for flags in [Flags::empty(), Flags::SYNC] {
            let h = ShardHeader { flags, ..sample() };
            let mut buf = Vec::new();
            h.encode(&mut buf);
            assert_eq!(buf[1], flags.bits(), "never sent");
            buf[1] |= 0x02;
            assert_eq!(ShardHeader::decode(&mut &buf[..]), Ok(h));
        }
    }

    /// The sizes PROTOCOL.md gives: 31 bytes at most as written, 35 at most
    /// as accepted (every varint in 8 bytes), and a stream id must fit 32 bits.
    #[test]
    fn largest_headers_and_stream_id_bound() {
        let largest = ShardHeader {
            stream_id: u32::MAX,
            seq: crate::wire::MAX_VARINT,
            block_len: MAX_BLOCK_LEN as u32,
            groups: 2,
            group: 1,
            ..sample()
        };
        let mut buf = Vec::new();
        largest.encode(&mut buf);
        assert_eq!((buf.len(), largest.encoded_len()), (31, 31));

        // The common header with every varint stretched to 8 bytes.
        let h = ShardHeader {
            groups: 2,
            group: 1,
            ..sample()
        };
        let long = |v: u64| (0xc000_0000_0000_0000 | v).to_be_bytes();
        let mut v = vec![VERSION, 0x01 | 0x04];
        v.extend(long(u64::from(h.stream_id)));
        v.extend(long(h.seq));
        v.extend(h.timestamp_us.to_be_bytes());
        v.extend([h.k, h.m, h.index]);
        v.extend(long(u64::from(h.block_len)));
        v.extend([h.group, h.groups]);
        assert_eq!(v.len(), MAX_HEADER_LEN);
        assert_eq!(ShardHeader::decode(&mut &v[..]), Ok(h));

        // One above the largest stream id.
        v[2..10].copy_from_slice(&long(u64::from(u32::MAX) + 1));
        assert_eq!(
            ShardHeader::decode(&mut &v[..]),
            Err(DecodeError::Invalid("stream id"))
        );
    }

    #[test]
    fn every_truncation_is_short() {
        let h = ShardHeader {
            groups: 2,
            group: 1,
            ..sample()
        };
        let mut buf = Vec::new();
        h.encode(&mut buf);
        for cut in 0..buf.len() {
            assert_eq!(
                ShardHeader::decode(&mut &buf[..cut]),
                Err(DecodeError::Short),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn rejects_invalid_fields() {
        let enc = |h: ShardHeader| {
            let mut buf = Vec::new();
            h.encode(&mut buf);
            buf
        };
        let mut v = enc(sample());
        v[0] = VERSION + 1;
        assert_eq!(
            ShardHeader::decode(&mut &v[..]),
            Err(DecodeError::Version(VERSION + 1))
        );
        let mut v = enc(sample());
        v[1] |= 0x80;
        assert_eq!(
            ShardHeader::decode(&mut &v[..]),
            Err(DecodeError::Invalid("flags"))
        );
        let cases = [
            (ShardHeader { k: 0, ..sample() }, "k"),
            (
                ShardHeader {
                    k: 200,
                    m: 57,
                    ..sample()
                },
                "k + m",
            ),
            (
                ShardHeader {
                    index: 14,
                    ..sample()
                },
                "shard index",
            ),
        ];
        for (h, what) in cases {
            assert_eq!(
                ShardHeader::decode(&mut &enc(h)[..]),
                Err(DecodeError::Invalid(what))
            );
        }
        let big = ShardHeader {
            block_len: MAX_BLOCK_LEN as u32 + 1,
            ..sample()
        };
        assert_eq!(
            ShardHeader::decode(&mut &enc(big)[..]),
            Err(DecodeError::TooLong("block"))
        );
        // A group index outside the group count.
        let mut v = enc(ShardHeader {
            groups: 2,
            group: 1,
            ..sample()
        });
        let n = v.len();
        v[n - 2] = 2;
        assert_eq!(
            ShardHeader::decode(&mut &v[..]),
            Err(DecodeError::Invalid("group"))
        );
    }

    #[test]
    fn datagram_checks_block_length_against_k() {
        let h = sample(); // 10_500 bytes in k = 10 shards
        assert!(ShardHeader::decode_datagram(&datagram(&h, 1100)).is_ok());
        // 10_500 bytes need 11 shards of 1000: k = 10 cannot hold them.
        assert_eq!(
            ShardHeader::decode_datagram(&datagram(&h, 1000)),
            Err(DecodeError::Invalid("block length for k and shard size"))
        );
        // Nor would 2 shards of 10_000 need k = 10.
        assert!(ShardHeader::decode_datagram(&datagram(&h, 10_000)).is_err());
        // One data shard cannot be split into two groups.
        let split = ShardHeader {
            k: 1,
            m: 1,
            index: 0,
            block_len: 100,
            groups: 2,
            group: 1,
            ..h
        };
        assert_eq!(
            ShardHeader::decode_datagram(&datagram(&split, 100)),
            Err(DecodeError::Invalid("groups for block length"))
        );
        assert_eq!(
            ShardHeader::decode_datagram(&datagram(&h, 0)),
            Err(DecodeError::Short)
        );
        let (dh, payload) = ShardHeader::decode_datagram(&datagram(&h, 1100)).unwrap();
        assert_eq!(dh, h);
        assert_eq!(payload.len(), 1100);
    }

    #[test]
    fn group_spans_cover_all_shards_once() {
        for total in 1..600 {
            for groups in 1..=8 {
                let mut next = 0;
                for g in 0..groups {
                    let (first, k) = group_span(total, groups, g);
                    assert_eq!(first, next);
                    next += k;
                }
                assert_eq!(next, total);
            }
        }
    }

    /// Random bytes never panic the decoder, and whatever decodes re-encodes to
    /// the same prefix.
    #[test]
    fn random_bytes_never_panic() {
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        for _ in 0..100_000 {
            let len = rng.random_range(0..48);
            let mut v = vec![0u8; len];
            rng.fill_bytes(&mut v);
            if rng.random_bool(0.5) {
                if let Some(b) = v.first_mut() {
                    *b = VERSION;
                }
            }
            let dg = Bytes::from(v.clone());
            let _ = ShardHeader::decode_datagram(&dg);
            let mut rd = &v[..];
            if let Ok(h) = ShardHeader::decode(&mut rd) {
                let mut out = Vec::new();
                h.encode(&mut out);
                let used = v.len() - rd.len();
                // Varints may be non-minimal on input; the value must match.
                assert_eq!(
                    ShardHeader::decode(&mut &out[..]),
                    Ok(h),
                    "seed {seed}: {:?}",
                    &v[..used]
                );
            }
        }
    }
}
