//! QUIC variable-length integers (RFC 9000 §16): 1, 2, 4 or 8 bytes, 62-bit range.

use bytes::{Buf, BufMut};

use super::DecodeError;

/// Largest value a [`VarInt`] holds: 2^62 - 1.
pub const MAX_VARINT: u64 = (1 << 62) - 1;

/// Namespace for QUIC varint coding.
pub struct VarInt;

impl VarInt {
    /// Number of bytes `v` takes on the wire.
    pub const fn size(v: u64) -> usize {
        if v < 1 << 6 {
            1
        } else if v < 1 << 14 {
            2
        } else if v < 1 << 30 {
            4
        } else {
            8
        }
    }

    /// Writes `v`; values above [`MAX_VARINT`] are a caller bug and are clamped
    /// in release builds.
    pub fn write<B: BufMut>(v: u64, buf: &mut B) {
        debug_assert!(v <= MAX_VARINT, "varint out of range");
        let v = v.min(MAX_VARINT);
        match Self::size(v) {
            1 => buf.put_u8(v as u8),
            2 => buf.put_u16(0x4000 | v as u16),
            4 => buf.put_u32(0x8000_0000 | v as u32),
            _ => buf.put_u64(0xc000_0000_0000_0000 | v),
        }
    }

    /// Reads one varint, checking the length first.
    pub fn read<B: Buf>(buf: &mut B) -> Result<u64, DecodeError> {
        if !buf.has_remaining() {
            return Err(DecodeError::Short);
        }
        let first = buf.chunk()[0];
        let len = 1usize << (first >> 6);
        if buf.remaining() < len {
            return Err(DecodeError::Short);
        }
        Ok(match len {
            1 => u64::from(buf.get_u8() & 0x3f),
            2 => u64::from(buf.get_u16() & 0x3fff),
            4 => u64::from(buf.get_u32() & 0x3fff_ffff),
            _ => buf.get_u64() & MAX_VARINT,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_at_every_size_boundary() {
        for v in [0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, MAX_VARINT] {
            let mut buf = Vec::new();
            VarInt::write(v, &mut buf);
            assert_eq!(buf.len(), VarInt::size(v), "size of {v}");
            let mut rd = &buf[..];
            assert_eq!(VarInt::read(&mut rd), Ok(v));
            assert!(rd.is_empty());
            for cut in 0..buf.len() {
                assert_eq!(VarInt::read(&mut &buf[..cut]), Err(DecodeError::Short));
            }
        }
    }
}
