//! [`Encoder`]: one media block in, every shard datagram of it out.

use bytes::Bytes;

use super::codec::CodecCache;
use super::{data_shards_for, group_span, FecConfig, FecError};
use crate::wire::{Encode, Flags, ShardHeader, MAX_VARINT};

/// Cuts media blocks into Reed-Solomon protected shard datagrams.
///
/// One encoder per stream. Each block is encoded once, whatever the number of
/// viewers: [`encode`](Self::encode) returns an [`EncodedBlock`] whose
/// datagrams are slices of one shared buffer.
#[derive(Debug)]
pub struct Encoder {
    stream_id: u32,
    config: FecConfig,
    codecs: CodecCache,
}

impl Encoder {
    /// An encoder for stream `stream_id`, the id every header carries.
    pub fn new(stream_id: u32, config: FecConfig) -> Self {
        Self {
            stream_id,
            config,
            codecs: CodecCache::default(),
        }
    }

    /// The configuration blocks are encoded with.
    pub fn config(&self) -> &FecConfig {
        &self.config
    }

    /// Replaces the configuration; it applies from the next block on (for
    /// example a new redundancy chosen from viewers' loss reports).
    pub fn set_config(&mut self, config: FecConfig) {
        self.config = config;
    }

    /// Encodes `block` as block `seq` into data and parity shard datagrams.
    ///
    /// The block is split into `N = ceil(len / shard_size)` data shards (at
    /// least one) of `ceil(len / N)` bytes each, so only the last is padded,
    /// by less than `N` bytes; they are spread over
    /// `ceil(N / max_data_shards)` code groups, and each group gets
    /// [`FecConfig::parity_shards`] parity shards. All datagrams, headers
    /// included, live in one allocation: the block bytes are copied into it
    /// once and parity is computed in place.
    ///
    /// Fails with [`FecError::BlockTooLarge`] when `block` is longer than
    /// [`FecConfig::max_block_len`], and with [`FecError::SeqOutOfRange`] when
    /// `seq` exceeds [`MAX_VARINT`] (2^62 - 1), the largest a header carries.
    pub fn encode(
        &mut self,
        seq: u64,
        timestamp_us: u32,
        flags: Flags,
        block: &[u8],
    ) -> Result<EncodedBlock, FecError> {
        if seq > MAX_VARINT {
            return Err(FecError::SeqOutOfRange(seq));
        }
        let max = self.config.max_block_len();
        if block.len() > max {
            return Err(FecError::BlockTooLarge {
                len: block.len(),
                max,
            });
        }
        // The configured shard size is a ceiling. Spreading the block evenly
        // over the shards it needs leaves under one byte of padding per shard
        // instead of up to a whole shard (4.5% of a 21 KB block at 1100 bytes).
        let needed = data_shards_for(block.len(), self.config.shard_size());
        let shard = block.len().div_ceil(needed).max(1);
        let total = data_shards_for(block.len(), shard);
        // <= 255 and <= total, as max_block_len guarantees.
        let groups = total.div_ceil(self.config.max_data_shards());
        let mut header = ShardHeader {
            flags,
            stream_id: self.stream_id,
            seq,
            timestamp_us,
            k: 0,
            m: 0,
            index: 0,
            // <= MAX_BLOCK_LEN (16 MiB), as max_block_len guarantees.
            block_len: block.len() as u32,
            group: 0,
            groups: groups as u8,
        };
        // Every header of the block has the same length: the varints (stream,
        // seq, length) and the group extension are the same in all of them.
        let header_len = header.encoded_len();
        let datagram_len = header_len + shard;

        let mut layout = Vec::with_capacity(groups);
        let mut count = 0;
        for g in 0..groups {
            let (_, k) = group_span(total, groups, g);
            let m = self.config.parity_shards(k);
            layout.push(GroupLayout {
                k: k as u8,
                m: m as u8,
                start: count,
            });
            count += k + m;
        }

        // Filled front to back: header, then data (copied once from `block`)
        // or padding, so no byte is written twice except parity (zeroed, then
        // computed; the codec needs initialised output slices).
        let mut buf: Vec<u8> = Vec::with_capacity(count * datagram_len);
        let mut rest = block;
        for (g, group) in layout.iter().enumerate() {
            header.group = g as u8;
            header.k = group.k;
            header.m = group.m;
            let group_start = buf.len();
            for i in 0..group.k {
                header.index = i;
                header.encode(&mut buf);
                let (now, later) = rest.split_at(shard.min(rest.len()));
                buf.extend_from_slice(now);
                buf.resize(buf.len() + shard - now.len(), 0);
                rest = later;
            }
            let parity_start = buf.len();
            for j in 0..group.m {
                header.index = group.k + j;
                header.encode(&mut buf);
                buf.resize(buf.len() + shard, 0);
            }

            let (head, tail) = buf.split_at_mut(parity_start);
            let data: Vec<&[u8]> = head[group_start..]
                .chunks_exact(datagram_len)
                .map(|d| &d[header_len..])
                .collect();
            let mut parity: Vec<&mut [u8]> = tail
                .chunks_exact_mut(datagram_len)
                .map(|d| &mut d[header_len..])
                .collect();
            let codec = self
                .codecs
                .get(group.k.into(), group.m.into())
                .expect("1 <= k <= 255 and k + m <= 256 by FecConfig");
            codec
                .encode_sep(&data, &mut parity)
                .expect("k data and m parity slices of one shard size");
        }
        debug_assert_eq!(buf.len(), count * datagram_len);
        debug_assert!(rest.is_empty());

        let buf = Bytes::from(buf);
        let datagrams = (0..count)
            .map(|i| buf.slice(i * datagram_len..(i + 1) * datagram_len))
            .collect();
        Ok(EncodedBlock {
            seq,
            timestamp_us,
            flags,
            len: block.len(),
            shard_size: shard,
            groups: layout,
            datagrams,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct GroupLayout {
    k: u8,
    m: u8,
    /// Index of the group's first datagram in `EncodedBlock::datagrams`.
    start: usize,
}

/// Every datagram of one encoded block, group by group: a group's `k` data
/// shards, then its `m` parity shards.
///
/// The datagrams are [`Bytes`] slices of one buffer, so cloning one (to queue
/// it for a viewer) copies no data. The buffer is freed when the last clone
/// is dropped.
#[derive(Debug, Clone)]
pub struct EncodedBlock {
    seq: u64,
    timestamp_us: u32,
    flags: Flags,
    len: usize,
    shard_size: usize,
    groups: Vec<GroupLayout>,
    datagrams: Vec<Bytes>,
}

impl EncodedBlock {
    /// Block sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Sender timestamp of the block, microseconds.
    pub fn timestamp_us(&self) -> u32 {
        self.timestamp_us
    }

    /// Flags carried in every shard.
    pub fn flags(&self) -> Flags {
        self.flags
    }

    /// Media bytes in the block, before padding.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the block has no media bytes (it still takes one shard).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shard payload bytes per datagram.
    pub fn shard_size(&self) -> usize {
        self.shard_size
    }

    /// The code groups, in order: `(k, m, datagrams)` where `datagrams` holds
    /// the group's `k` data shards followed by its `m` parity shards.
    pub fn groups(&self) -> impl ExactSizeIterator<Item = (usize, usize, &[Bytes])> + '_ {
        self.groups.iter().map(|g| {
            let (k, m) = (usize::from(g.k), usize::from(g.m));
            (k, m, &self.datagrams[g.start..g.start + k + m])
        })
    }

    /// Every datagram of the block: all data and all parity shards.
    pub fn datagrams(&self) -> &[Bytes] {
        &self.datagrams
    }

    /// The datagrams a viewer that gets `parity` parity shards per group is
    /// sent: per group, all `k` data shards and the first `min(parity, m)`
    /// parity shards. Such a viewer recovers a group from any
    /// `min(parity, m)` losses in it.
    pub fn datagrams_with_parity(&self, parity: usize) -> impl Iterator<Item = &Bytes> + '_ {
        self.groups()
            .flat_map(move |(k, m, datagrams)| &datagrams[..k + parity.min(m)])
    }

    /// Bytes on the wire (headers and payloads, before QUIC framing) of
    /// [`datagrams_with_parity(parity)`](Self::datagrams_with_parity).
    pub fn wire_bytes(&self, parity: usize) -> usize {
        self.datagrams_with_parity(parity).map(Bytes::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fec::MAX_BLOCK_LEN;
    use rand::{rngs::SmallRng, Rng, RngCore, SeedableRng};
    use reed_solomon_erasure::galois_8::ReedSolomon;

    fn config(shard: usize, ratio: f64, kmax: usize) -> FecConfig {
        let mut c = FecConfig::default();
        c.set_shard_size(shard)
            .and_then(|c| c.set_redundancy(ratio))
            .and_then(|c| c.set_max_data_shards(kmax))
            .unwrap();
        c
    }

    /// Every datagram passes `wire`'s own validation (which recomputes the
    /// split), the data payloads concatenate to the block plus zero padding,
    /// and each group's parity verifies.
    #[test]
    fn datagrams_decode_and_verify() {
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        // Shared across iterations so codecs (slow to build in debug) are reused.
        let mut enc = Encoder::new(rng.random(), FecConfig::default());
        let mut codecs = std::collections::HashMap::new();
        for _ in 0..120 {
            let shard = rng.random_range(1..1500);
            // Mostly small groups: a debug build inverts k × k matrices slowly.
            let kmax = if rng.random_bool(0.1) {
                rng.random_range(41..=64)
            } else {
                rng.random_range(1..=40)
            };
            let ratio = rng.random_range(0.0..1.5);
            let cfg = config(shard, ratio, kmax);
            let len = rng.random_range(0..=cfg.max_block_len().min(200_000));
            let mut block = vec![0u8; len];
            rng.fill_bytes(&mut block);
            let seq = rng.random_range(0..=MAX_VARINT);
            enc.set_config(cfg.clone());
            let out = enc.encode(seq, 77, Flags::SYNC, &block).unwrap();
            let ctx = format!("seed {seed}: len {len} shard {shard} kmax {kmax} ratio {ratio}");

            assert_eq!((out.seq(), out.len(), out.flags()), (seq, len, Flags::SYNC));
            let total = data_shards_for(len, shard);
            // Shards are as even as possible and never above the configured size.
            let even = len.div_ceil(total).max(1);
            assert_eq!(out.shard_size(), even, "{ctx}");
            assert!(even <= shard, "{ctx}");
            assert_eq!(data_shards_for(len, even), total, "{ctx}");
            assert_eq!(out.groups().len(), total.div_ceil(kmax), "{ctx}");
            let mut data = Vec::new();
            for (g, (k, m, dgs)) in out.groups().enumerate() {
                assert_eq!(m, cfg.parity_shards(k), "{ctx}");
                assert!(k <= kmax && k + m <= 256, "{ctx}");
                let mut payloads = Vec::new();
                for (i, dg) in dgs.iter().enumerate() {
                    let (h, p) = ShardHeader::decode_datagram(dg).expect(&ctx);
                    assert_eq!(
                        (h.seq, h.timestamp_us, h.block_len as usize),
                        (seq, 77, len),
                        "{ctx}"
                    );
                    assert_eq!(
                        (h.group as usize, h.groups as usize, h.index as usize),
                        (g, out.groups().len(), i),
                        "{ctx}"
                    );
                    assert_eq!((h.k as usize, h.m as usize), (k, m), "{ctx}");
                    assert_eq!(p.len(), even, "{ctx}");
                    payloads.push(p.to_vec());
                }
                data.extend(payloads[..k].iter().flatten().copied());
                let rs = codecs
                    .entry((k, m))
                    .or_insert_with(|| ReedSolomon::new(k, m).unwrap());
                assert!(rs.verify(&payloads).unwrap(), "{ctx}: parity of group {g}");
            }
            assert_eq!(&data[..len], &block[..], "{ctx}");
            assert!(data[len..].iter().all(|&b| b == 0), "{ctx}: padding");
            assert_eq!(data.len(), total * even, "{ctx}");
            assert!(
                data.len() - len < total,
                "{ctx}: under one byte of padding per shard"
            );
        }
    }

    /// All datagrams are views of one buffer: no per-shard allocation, and
    /// cloning them for many viewers copies nothing.
    #[test]
    fn one_buffer_for_all_datagrams() {
        let mut enc = Encoder::new(1, FecConfig::default());
        let out = enc.encode(0, 0, Flags::empty(), &[1u8; 50_000]).unwrap();
        let dgs = out.datagrams();
        for pair in dgs.windows(2) {
            assert_eq!(
                pair[0].as_ptr().wrapping_add(pair[0].len()),
                pair[1].as_ptr(),
                "datagrams are adjacent slices of one allocation"
            );
        }
        let viewer: Vec<Bytes> = out.datagrams_with_parity(1).cloned().collect();
        assert_eq!(viewer[0].as_ptr(), dgs[0].as_ptr());
    }

    #[test]
    fn partial_parity_per_viewer() {
        let mut enc = Encoder::new(1, config(1000, 0.25, 20));
        // 45 data shards: groups of 15 data + 4 parity.
        let out = enc.encode(0, 0, Flags::empty(), &[3u8; 45_000]).unwrap();
        assert_eq!(
            out.groups().map(|(k, m, _)| (k, m)).collect::<Vec<_>>(),
            [(15, 4); 3]
        );
        for p in [0, 1, 3, 4, 10] {
            let sent: Vec<&Bytes> = out.datagrams_with_parity(p).collect();
            assert_eq!(sent.len(), 3 * (15 + p.min(4)));
            let headers: Vec<ShardHeader> = sent
                .iter()
                .map(|d| ShardHeader::decode_datagram(d).unwrap().0)
                .collect();
            assert!(headers.iter().all(|h| (h.index as usize) < 15 + p.min(4)));
            assert_eq!(
                out.wire_bytes(p),
                sent.iter().map(|d| d.len()).sum::<usize>()
            );
        }
        assert_eq!(
            out.wire_bytes(4),
            out.datagrams().iter().map(Bytes::len).sum::<usize>()
        );
    }

    #[test]
    fn empty_block_is_one_padding_shard() {
        let mut enc = Encoder::new(1, FecConfig::default());
        let out = enc.encode(5, 0, Flags::SYNC, &[]).unwrap();
        assert!(out.is_empty());
        assert_eq!(
            out.groups().map(|(k, m, _)| (k, m)).collect::<Vec<_>>(),
            [(1, 1)]
        );
        let (h, p) = ShardHeader::decode_datagram(&out.datagrams()[0]).unwrap();
        assert_eq!((h.block_len, h.flags), (0, Flags::SYNC));
        assert!(p.iter().all(|&b| b == 0));
    }

    /// The worked example in PROTOCOL.md ("Test vectors"): a 19-byte block
    /// at shard size 4, redundancy 0.5 and at most 3 data shards per group,
    /// as the datagrams an independent implementation must produce.
    #[test]
    fn documented_block_vector() {
        let mut enc = Encoder::new(5, config(4, 0.5, 3));
        let out = enc
            .encode(7, 1000, Flags::SYNC, b"quicast test vector")
            .unwrap();
        let hex: Vec<String> = out
            .datagrams()
            .iter()
            .map(|d| d.iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        assert_eq!(
            hex,
            [
                // Group 0: k = 3, m = 2.
                "02050507000003e803020013000271756963",
                "02050507000003e803020113000261737420",
                "02050507000003e803020213000274657374",
                "02050507000003e803020313000264636e37",
                "02050507000003e8030204130002ef25dd33",
                // Group 1: k = 2, m = 1; the last data shard ends in one
                // byte of zero padding.
                "02050507000003e802010013010220766563",
                "02050507000003e8020101130102746f7200",
                "02050507000003e802010213010288444ba5",
            ]
        );
    }

    #[test]
    fn refuses_seq_beyond_varint() {
        let mut enc = Encoder::new(1, FecConfig::default());
        assert!(enc.encode(MAX_VARINT, 0, Flags::empty(), b"x").is_ok());
        assert_eq!(
            enc.encode(MAX_VARINT + 1, 0, Flags::empty(), b"x")
                .unwrap_err(),
            FecError::SeqOutOfRange(MAX_VARINT + 1)
        );
    }

    #[test]
    fn refuses_too_large_blocks() {
        let mut enc = Encoder::new(1, config(100, 0.25, 2));
        let max = enc.config().max_block_len();
        assert_eq!(max, 255 * 2 * 100);
        assert!(enc.encode(0, 0, Flags::empty(), &vec![0; max]).is_ok());
        assert_eq!(
            enc.encode(0, 0, Flags::empty(), &vec![0; max + 1])
                .unwrap_err(),
            FecError::BlockTooLarge { len: max + 1, max }
        );
        // Never more than a receiver accepts, whatever the config allows.
        let mut enc = Encoder::new(1, config(65_000, 0.25, 255));
        assert_eq!(enc.config().max_block_len(), MAX_BLOCK_LEN);
        assert!(enc
            .encode(0, 0, Flags::empty(), &vec![0; MAX_BLOCK_LEN + 1])
            .is_err());
    }
}
