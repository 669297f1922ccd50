//! The repair request: the one datagram a viewer sends.
//!
//! ```text
//!  0        version            u8     (= VERSION; read first, anything else is rejected)
//!  1        type               u8     0x01 = REPAIR; any other value is rejected
//!  2        entries            u8     1..=MAX_REPAIR_ENTRIES
//!  then per entry:
//!  ..       block sequence     varint
//!  ..       group index        u8
//!  ..       attempt            u8     0 for the first request of this group, 1 for the second
//!  ..       seen length        u8     bytes of the bitmap that follows, 0..=32
//!  ..       seen               bitmap shard indices the viewer holds: bit i % 8 of byte i / 8
//! ```
//!
//! A viewer repeats the same request in a few datagrams, since any one of them
//! may be lost; the sender answers each `(block, group, attempt)` once.

use bytes::{Buf, BufMut};

use super::{DecodeError, VarInt, MAX_SHARDS, VERSION};

/// Most entries one repair datagram carries.
pub const MAX_REPAIR_ENTRIES: usize = 16;

/// Most repair attempts a viewer makes for one code group.
pub const MAX_REPAIR_ATTEMPTS: u8 = 2;

const TYPE_REPAIR: u8 = 0x01;

/// Shard indices of one code group, as a 256-bit set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ShardSet(pub [u64; 4]);

impl ShardSet {
    /// Whether `index` is in the set.
    pub fn contains(&self, index: u8) -> bool {
        self.0[usize::from(index / 64)] & (1 << (index % 64)) != 0
    }

    /// Adds `index`.
    pub fn insert(&mut self, index: u8) {
        self.0[usize::from(index / 64)] |= 1 << (index % 64);
    }

    /// Number of indices in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }

    /// Bytes the bitmap needs on the wire: up to the highest set bit.
    fn wire_len(&self) -> usize {
        (0..MAX_SHARDS / 8)
            .rev()
            .find(|&i| self.byte(i) != 0)
            .map_or(0, |i| i + 1)
    }

    fn byte(&self, i: usize) -> u8 {
        (self.0[i / 8] >> ((i % 8) * 8)) as u8
    }
}

/// One code group a viewer is short of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairEntry {
    /// Block sequence number.
    pub seq: u64,
    /// Code group within the block.
    pub group: u8,
    /// 0 for the first request for this group, 1 for the repeat after an
    /// answer that did not complete it.
    pub attempt: u8,
    /// The group's shard indices the viewer holds.
    pub seen: ShardSet,
}

/// Why a repair request could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RepairEncodeError {
    /// No entries, or more than [`MAX_REPAIR_ENTRIES`].
    #[error("a repair datagram carries 1..={MAX_REPAIR_ENTRIES} entries, not {0}")]
    Entries(usize),
    /// A sequence number beyond [`super::MAX_VARINT`].
    #[error("sequence number out of range")]
    Seq,
}

/// Encodes `entries` as one repair datagram.
///
/// Fails rather than truncating: the caller splits larger batches.
pub fn encode_repair<B: BufMut>(
    entries: &[RepairEntry],
    buf: &mut B,
) -> Result<(), RepairEncodeError> {
    if entries.is_empty() || entries.len() > MAX_REPAIR_ENTRIES {
        return Err(RepairEncodeError::Entries(entries.len()));
    }
    if entries.iter().any(|e| e.seq > super::MAX_VARINT) {
        return Err(RepairEncodeError::Seq);
    }
    buf.put_u8(VERSION);
    buf.put_u8(TYPE_REPAIR);
    buf.put_u8(entries.len() as u8);
    for e in entries {
        VarInt::write(e.seq, buf);
        buf.put_u8(e.group);
        buf.put_u8(e.attempt);
        let n = e.seen.wire_len();
        buf.put_u8(n as u8);
        for i in 0..n {
            buf.put_u8(e.seen.byte(i));
        }
    }
    Ok(())
}

/// Decodes one repair datagram into `out` (cleared first).
///
/// Reads the version first, checks every length before reading, and rejects
/// trailing bytes; nothing here panics on input from the network.
pub fn decode_repair<B: Buf>(buf: &mut B, out: &mut Vec<RepairEntry>) -> Result<(), DecodeError> {
    out.clear();
    let version = buf.try_get_u8().map_err(|_| DecodeError::Short)?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    match buf.try_get_u8().map_err(|_| DecodeError::Short)? {
        TYPE_REPAIR => {}
        other => return Err(DecodeError::UnknownType(other)),
    }
    let count = usize::from(buf.try_get_u8().map_err(|_| DecodeError::Short)?);
    if count == 0 || count > MAX_REPAIR_ENTRIES {
        return Err(DecodeError::Invalid("repair entry count"));
    }
    for _ in 0..count {
        let seq = VarInt::read(buf)?;
        let group = buf.try_get_u8().map_err(|_| DecodeError::Short)?;
        let attempt = buf.try_get_u8().map_err(|_| DecodeError::Short)?;
        if attempt >= MAX_REPAIR_ATTEMPTS {
            return Err(DecodeError::Invalid("repair attempt"));
        }
        let n = usize::from(buf.try_get_u8().map_err(|_| DecodeError::Short)?);
        if n > MAX_SHARDS / 8 {
            return Err(DecodeError::TooLong("repair bitmap"));
        }
        if buf.remaining() < n {
            return Err(DecodeError::Short);
        }
        let mut seen = ShardSet::default();
        for i in 0..n {
            seen.0[i / 8] |= u64::from(buf.get_u8()) << ((i % 8) * 8);
        }
        out.push(RepairEntry {
            seq,
            group,
            attempt,
            seen,
        });
    }
    if buf.has_remaining() {
        return Err(DecodeError::Long);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, Rng, RngCore, SeedableRng};

    fn entry(seq: u64, group: u8, held: &[u8]) -> RepairEntry {
        let mut seen = ShardSet::default();
        for &i in held {
            seen.insert(i);
        }
        RepairEntry {
            seq,
            group,
            attempt: 0,
            seen,
        }
    }

    #[test]
    fn round_trip() {
        let entries = vec![
            entry(0, 0, &[]),
            entry(7, 1, &[0, 1, 2, 5, 19]),
            entry(1 << 40, 254, &[255, 128, 64, 63]),
        ];
        let mut buf = Vec::new();
        encode_repair(&entries, &mut buf).unwrap();
        assert_eq!(buf[0], VERSION);
        let mut out = Vec::new();
        decode_repair(&mut &buf[..], &mut out).unwrap();
        assert_eq!(out, entries);
    }

    #[test]
    fn bitmap_is_as_short_as_the_highest_index() {
        let mut buf = Vec::new();
        encode_repair(&[entry(1, 0, &[0, 9])], &mut buf).unwrap();
        // version, type, count, seq, group, attempt, len = 2, two bitmap bytes
        assert_eq!(buf, [VERSION, TYPE_REPAIR, 1, 1, 0, 0, 2, 0x01, 0x02]);
    }

    #[test]
    fn encoder_refuses_what_it_cannot_carry() {
        let mut buf = Vec::new();
        assert_eq!(
            encode_repair(&[], &mut buf),
            Err(RepairEncodeError::Entries(0))
        );
        let many = vec![entry(1, 0, &[]); MAX_REPAIR_ENTRIES + 1];
        assert!(encode_repair(&many, &mut buf).is_err());
        assert!(encode_repair(&[entry(u64::MAX, 0, &[])], &mut buf).is_err());
        assert!(buf.is_empty(), "nothing written on failure");
    }

    #[test]
    fn rejects_bad_input() {
        let mut buf = Vec::new();
        encode_repair(&[entry(3, 0, &[1, 2])], &mut buf).unwrap();
        let mut out = Vec::new();
        let mut bad = buf.clone();
        bad[0] = VERSION + 1;
        assert_eq!(
            decode_repair(&mut &bad[..], &mut out),
            Err(DecodeError::Version(VERSION + 1))
        );
        let mut bad = buf.clone();
        bad[1] = 0x7f;
        assert_eq!(
            decode_repair(&mut &bad[..], &mut out),
            Err(DecodeError::UnknownType(0x7f))
        );
        let mut bad = buf.clone();
        bad[2] = 0;
        assert!(decode_repair(&mut &bad[..], &mut out).is_err());
        let mut bad = buf.clone();
        bad[5] = MAX_REPAIR_ATTEMPTS;
        assert!(decode_repair(&mut &bad[..], &mut out).is_err());
        let mut bad = buf.clone();
        bad.push(0);
        assert_eq!(
            decode_repair(&mut &bad[..], &mut out),
            Err(DecodeError::Long)
        );
        for cut in 0..buf.len() {
            assert!(
                decode_repair(&mut &buf[..cut], &mut out).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let mut bytes = vec![0u8; rng.random_range(0..80)];
            rng.fill_bytes(&mut bytes);
            if rng.random_bool(0.5) && bytes.len() > 2 {
                bytes[0] = VERSION;
                bytes[1] = TYPE_REPAIR;
            }
            let _ = decode_repair(&mut &bytes[..], &mut out);
            assert!(out.len() <= MAX_REPAIR_ENTRIES, "seed {seed}");
        }
    }
}
