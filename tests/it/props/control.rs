//! Property of the control-stream frame decoder, on any bytes split anywhere.
//!
//! Shared verbatim by `tests/it/props.rs` (seeded, under `cargo test`) and the
//! `control` fuzz target (`fuzz/fuzz_targets/control.rs`). Depends on
//! `quicast` only.

use quicast::wire::{ControlMessage, DecodeError, VarInt, MAX_CONTROL_FRAME};

/// Input layout: `[split lo, split hi, cap, stream bytes...]`; `split` (mod
/// the stream length + 1) is where the stream is cut in two, and `cap` picks
/// the frame size limit.
pub const HEADER_LEN: usize = 3;

/// The frame size limit a `cap` byte selects: the default for half the
/// values, else a small one so that the limit itself is exercised.
fn max_frame(cap: u8) -> usize {
    if cap < 128 {
        MAX_CONTROL_FRAME
    } else {
        1 + usize::from(cap - 128) * 4
    }
}

/// What reading a stream produced: the messages, then either the bytes left
/// waiting for more input or the error that stopped the reader.
type Outcome = (Vec<ControlMessage>, Result<usize, DecodeError>);

/// Feeds the stream to [`ControlMessage::decode_frame`] the way a stream
/// reader does (`net::control::FrameReader`): all of it at once, and as a
/// prefix and then the rest. Checks:
///
/// - both ways give the same messages and end the same way (the split point
///   never changes the result);
/// - each call consumes exactly one frame (its length prefix plus the length
///   it announces, at most `max_frame + 8` bytes) or, when it returns
///   `Ok(None)` or an error, nothing;
/// - `Ok(None)` ("read more") only while less than `max_frame + 8` bytes are
///   buffered, so a reader never holds more than one capped frame;
/// - a decoded message re-encodes to a frame no longer than the one read,
///   which decodes to the same message.
///
/// Returns a description of the first violation.
pub fn check(input: &[u8]) -> Result<(), String> {
    if input.len() < HEADER_LEN {
        return Ok(());
    }
    let (head, stream) = input.split_at(HEADER_LEN);
    let split = usize::from(u16::from_le_bytes([head[0], head[1]])) % (stream.len() + 1);
    let max = max_frame(head[2]);
    let whole = read(&[stream], max)?;
    let parts = read(&[&stream[..split], &stream[split..]], max)?;
    if whole != parts {
        return Err(format!(
            "max_frame {max}, split at {split}: whole stream {whole:?}, in two parts {parts:?}"
        ));
    }
    Ok(())
}

/// Reads `parts` one after the other into a buffer, taking every whole frame
/// after each, until a frame fails to decode.
fn read(parts: &[&[u8]], max: usize) -> Result<Outcome, String> {
    let mut buf = Vec::new();
    let mut msgs = Vec::new();
    for part in parts {
        buf.extend_from_slice(part);
        // Each pass takes one frame of at least two bytes, or stops.
        for _ in 0..=buf.len() {
            let mut rd = &buf[..];
            let result = ControlMessage::decode_frame(&mut rd, max);
            let used = buf.len() - rd.len();
            let msg = match result {
                Ok(Some(msg)) => msg,
                Ok(None) if used == 0 && buf.len() < max + 8 => break,
                Err(e) if used == 0 => return Ok((msgs, Err(e))),
                other => {
                    return Err(format!(
                        "max_frame {max}: {other:?} after consuming {used} of {} bytes",
                        buf.len()
                    ))
                }
            };
            check_frame(&buf[..used], &msg, max)?;
            buf.drain(..used);
            msgs.push(msg);
        }
    }
    Ok((msgs, Ok(buf.len())))
}

/// `frame` is what one successful call consumed, `msg` what it returned.
fn check_frame(frame: &[u8], msg: &ControlMessage, max: usize) -> Result<(), String> {
    let mut rd = frame;
    let announced = VarInt::read(&mut rd).map_err(|e| format!("{msg:?}: prefix {e:?}"))?;
    if announced == 0 || announced > max as u64 || rd.len() as u64 != announced {
        return Err(format!(
            "{msg:?}: consumed {} bytes for a frame announcing {announced} (max_frame {max})",
            frame.len()
        ));
    }
    // Another version's Hello decodes to its version alone: what matters is
    // that the whole frame was consumed and nothing else was read into it.
    if let ControlMessage::Hello { version, .. } = msg {
        if *version != quicast::wire::VERSION {
            return Ok(());
        }
    }
    let mut again = Vec::new();
    msg.encode_frame(&mut again);
    if again.len() > frame.len() {
        return Err(format!(
            "{msg:?}: re-encoded to {} bytes from {}",
            again.len(),
            frame.len()
        ));
    }
    let mut rd = &again[..];
    match ControlMessage::decode_frame(&mut rd, max) {
        Ok(Some(back)) if back == *msg && rd.is_empty() => Ok(()),
        other => Err(format!("{msg:?} re-encoded decodes to {other:?}")),
    }
}
