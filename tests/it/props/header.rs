//! Property of the datagram header decoders, on any bytes.
//!
//! Shared verbatim by `tests/it/props.rs` (seeded, under `cargo test`) and the
//! `header` fuzz target (`fuzz/fuzz_targets/header.rs`), so both check the same
//! thing. Depends on `quicast` and `bytes` only.

use bytes::Bytes;
use quicast::wire::{data_shards_for, group_span, Decode, Encode, ShardHeader, MAX_HEADER_LEN};

/// Runs [`ShardHeader::decode`] and [`ShardHeader::decode_datagram`] on
/// `input` and checks what they accept:
///
/// - whatever decodes re-encodes (in [`ShardHeader::encoded_len`] bytes, at
///   most [`MAX_HEADER_LEN`]) and decodes back to the same value, and `decode`
///   never consumes more than `MAX_HEADER_LEN` bytes;
/// - `decode_datagram` accepts only what `decode` accepts, and its header is
///   followed by exactly the payload it returns;
/// - an accepted datagram has a non-empty payload and a `k` that is exactly
///   the data shards its block length needs at this shard size in its group;
/// - re-encoding an accepted datagram gives one that decodes to the same
///   header and payload.
///
/// Returns a description of the first violation. Never panics unless the
/// library does.
pub fn check(input: &[u8]) -> Result<(), String> {
    let mut rd = input;
    let decoded = ShardHeader::decode(&mut rd);
    if let Ok(h) = decoded {
        let used = input.len() - rd.len();
        if used > MAX_HEADER_LEN {
            return Err(format!("decode consumed {used} > {MAX_HEADER_LEN} bytes"));
        }
        let mut out = Vec::new();
        h.encode(&mut out);
        if out.len() != h.encoded_len() || out.len() > MAX_HEADER_LEN {
            return Err(format!(
                "{h:?} encodes to {} bytes, encoded_len {}",
                out.len(),
                h.encoded_len()
            ));
        }
        let mut again = &out[..];
        match ShardHeader::decode(&mut again) {
            Ok(back) if back == h && again.is_empty() => {}
            other => return Err(format!("{h:?} re-encoded decodes to {other:?}")),
        }
    }

    let datagram = Bytes::copy_from_slice(input);
    let Ok((h, payload)) = ShardHeader::decode_datagram(&datagram) else {
        return Ok(());
    };
    if decoded != Ok(h) {
        return Err(format!("decode_datagram gave {h:?}, decode {decoded:?}"));
    }
    let header_len = input.len() - rd.len();
    if payload.is_empty() || payload[..] != input[header_len..] {
        return Err(format!(
            "{h:?}: payload of {} bytes is not the {} after the header",
            payload.len(),
            input.len() - header_len
        ));
    }
    let total = data_shards_for(h.block_len as usize, payload.len());
    let (groups, group) = (usize::from(h.groups), usize::from(h.group));
    if h.k == 0 || group >= groups || total > groups * 255 {
        return Err(format!(
            "{h:?}: {total} data shards cannot be in this group"
        ));
    }
    if group_span(total, groups, group).1 != usize::from(h.k) {
        return Err(format!(
            "{h:?}: k does not fit {} bytes in shards of {}",
            h.block_len,
            payload.len()
        ));
    }
    if usize::from(h.index) >= usize::from(h.k) + usize::from(h.m) {
        return Err(format!("{h:?}: index outside k + m"));
    }
    let mut out = Vec::new();
    h.encode(&mut out);
    out.extend_from_slice(&payload);
    match ShardHeader::decode_datagram(&Bytes::from(out)) {
        Ok((back, p)) if back == h && p == payload => Ok(()),
        other => Err(format!("{h:?} re-encoded datagram decodes to {other:?}")),
    }
}
