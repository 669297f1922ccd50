//! Control-stream messages.
//!
//! The control stream is one reliable bidirectional QUIC stream per connection,
//! opened by the viewer. It carries frames:
//!
//! ```text
//! frame   = length (varint, 1..=MAX_CONTROL_FRAME) , type (u8) , body
//! ```
//!
//! `length` counts the type byte and the body. Integers in bodies are varints,
//! strings are a varint length (<= MAX_STRING_LEN) followed by UTF-8, and a
//! body must be consumed exactly: trailing bytes are an error. PROTOCOL.md lists
//! every message.

use bytes::{Buf, BufMut, Bytes};

use super::{Decode, DecodeError, Encode, VarInt};

/// Largest control frame (type + body) a peer may send by default: 16 KiB.
pub const MAX_CONTROL_FRAME: usize = 16 * 1024;
/// Longest string field (stream name, reason, agent, event name or value).
pub const MAX_STRING_LEN: usize = 256;
/// Longest access token.
pub const MAX_TOKEN_LEN: usize = 512;
/// Largest latency budget a Hello may carry: one minute.
pub const MAX_LATENCY_MS: u64 = 60_000;

/// A viewer's periodic receiver statistics. Counters are cumulative since the
/// viewer joined, so a lost or reordered report loses no information.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Blocks handed to the application in order.
    pub blocks_delivered: u64,
    /// Of those, blocks that needed FEC to rebuild.
    pub blocks_recovered: u64,
    /// Blocks that missed their deadline.
    pub blocks_lost: u64,
    /// Shards that arrived after their block's deadline.
    pub shards_late: u64,
    /// Shards received.
    pub shards_received: u64,
    /// Shards the viewer expected but never received (before FEC).
    pub shards_missing: u64,
    /// Median block latency over the last interval, microseconds.
    pub latency_p50_us: u64,
    /// 99th percentile block latency over the last interval, microseconds.
    pub latency_p99_us: u64,
    /// Media the receiver holds but has not yet released, milliseconds.
    pub buffer_ms: u64,
    /// Media bitrate delivered over the last interval, bits per second.
    pub bitrate_bps: u64,
    /// Time from connecting to the first delivered block, milliseconds (join
    /// time); 0 until a block has been delivered.
    pub startup_ms: u64,
    /// Stalls (buffer ran dry) since joining.
    pub stalls: u64,
    /// Total stalled time since joining, milliseconds.
    pub stall_ms: u64,
}

/// Quality figures the server sends back to each viewer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// This viewer's QoE score, 0..=100.
    pub viewer_qoe: u8,
    /// Mean QoE score of the stream's viewers, 0..=100.
    pub stream_qoe: u8,
    /// Viewers currently watching the stream.
    pub stream_viewers: u64,
    /// Parity shards per code group the server now sends this viewer.
    pub parity: u64,
    /// This viewer's shard loss before FEC, parts per million.
    pub loss_ppm: u64,
    /// The stream's block loss after FEC, parts per million.
    pub stream_residual_loss_ppm: u64,
}

/// An application event a viewer reports (player pause, quality switch, ...).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientEvent {
    /// What happened, e.g. `pause`.
    #[serde(with = "super::compact")]
    pub name: String,
    /// Optional detail, e.g. a rendition name.
    #[serde(with = "super::compact")]
    pub value: String,
}

/// One control-stream message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ControlMessage {
    /// viewer → server, first message: which stream, proving access.
    Hello {
        /// Protocol version the viewer speaks ([`super::VERSION`]).
        version: u8,
        /// Name of the stream to watch.
        stream: String,
        /// Access token; empty when none.
        token: Bytes,
        /// Free-form client agent, e.g. `quicast-client/0.1`.
        agent: String,
        /// The viewer's latency budget, milliseconds (1..=[`MAX_LATENCY_MS`]):
        /// a block is useful to it until its sender timestamp plus this. The
        /// sender never sends what can no longer arrive in time, and sizes
        /// proactive parity and repair from it.
        latency_ms: u64,
    },
    /// server → viewer: accepted; how to read the datagrams.
    Welcome {
        /// Id carried in the shard headers of this stream.
        stream_id: u32,
        /// The stream's sender clock when Welcome was written, microseconds;
        /// lets the viewer map block timestamps to its own clock.
        clock_us: u64,
        /// How often the viewer should send a [`Report`], milliseconds.
        report_interval_ms: u64,
    },
    /// server → viewer: refused; the server closes the connection after it.
    Reject {
        /// Machine-readable reason (see `Error` close codes).
        code: u64,
        /// Human-readable reason.
        reason: String,
    },
    /// viewer → server: periodic statistics.
    Report(Report),
    /// viewer → server: playback stalled (buffer ran dry).
    Stall,
    /// viewer → server: playback resumed after a stall.
    Resume,
    /// viewer → server: an application event.
    Event(ClientEvent),
    /// viewer → server: the viewer is leaving on purpose.
    Leave,
    /// server → viewer: the stream ended; `last_seq` is its final block.
    EndOfStream {
        /// Sequence number of the last block.
        last_seq: u64,
    },
    /// server → viewer: analytics summary.
    Summary(Summary),
    /// server → viewer: the connection is closing.
    Goodbye {
        /// Machine-readable reason.
        code: u64,
        /// Human-readable reason.
        reason: String,
    },
}

mod ty {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const REJECT: u8 = 0x03;
    pub const REPORT: u8 = 0x04;
    pub const STALL: u8 = 0x05;
    pub const RESUME: u8 = 0x06;
    pub const EVENT: u8 = 0x07;
    pub const LEAVE: u8 = 0x08;
    pub const END_OF_STREAM: u8 = 0x09;
    pub const SUMMARY: u8 = 0x0a;
    pub const GOODBYE: u8 = 0x0b;
}

impl ControlMessage {
    /// Short name of the message type, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            ControlMessage::Hello { .. } => "hello",
            ControlMessage::Welcome { .. } => "welcome",
            ControlMessage::Reject { .. } => "reject",
            ControlMessage::Report(_) => "report",
            ControlMessage::Stall => "stall",
            ControlMessage::Resume => "resume",
            ControlMessage::Event(_) => "event",
            ControlMessage::Leave => "leave",
            ControlMessage::EndOfStream { .. } => "end_of_stream",
            ControlMessage::Summary(_) => "summary",
            ControlMessage::Goodbye { .. } => "goodbye",
        }
    }

    /// Appends one whole frame (length prefix included) to `buf`.
    pub fn encode_frame<B: BufMut>(&self, buf: &mut B) {
        let mut body = Vec::with_capacity(64);
        self.encode(&mut body);
        VarInt::write(body.len() as u64, buf);
        buf.put_slice(&body);
    }

    /// Tries to take one frame from the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold a whole frame (read
    /// more), and an error when the frame is over `max_frame` bytes or does not
    /// decode. On success the frame's bytes are consumed from `buf`.
    pub fn decode_frame<B: Buf>(
        buf: &mut B,
        max_frame: usize,
    ) -> Result<Option<ControlMessage>, DecodeError> {
        let mut peek = buf.chunk();
        // `chunk` may be shorter than the frame for chained buffers; callers
        // pass a contiguous buffer, and a short chunk only means "read more".
        let len = match VarInt::read(&mut peek) {
            Ok(len) => len,
            Err(DecodeError::Short) => return Ok(None),
            Err(e) => return Err(e),
        };
        if len == 0 {
            return Err(DecodeError::Short);
        }
        if len > max_frame as u64 {
            return Err(DecodeError::TooLong("control frame"));
        }
        let len = len as usize;
        if peek.len() < len {
            return Ok(None);
        }
        let prefix = buf.chunk().len() - peek.len();
        let mut body = &peek[..len];
        let msg = ControlMessage::decode(&mut body)?;
        if body.has_remaining() {
            return Err(DecodeError::Long);
        }
        buf.advance(prefix + len);
        Ok(Some(msg))
    }
}

fn put_str<B: BufMut>(s: &str, buf: &mut B) {
    let s = truncate_utf8(s, MAX_STRING_LEN);
    VarInt::write(s.len() as u64, buf);
    buf.put_slice(s.as_bytes());
}

/// Longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn get_bytes<B: Buf>(buf: &mut B, max: usize, what: &'static str) -> Result<Bytes, DecodeError> {
    let len = VarInt::read(buf)?;
    if len > max as u64 {
        return Err(DecodeError::TooLong(what));
    }
    let len = len as usize;
    if buf.remaining() < len {
        return Err(DecodeError::Short);
    }
    Ok(buf.copy_to_bytes(len))
}

fn get_str<B: Buf>(buf: &mut B, what: &'static str) -> Result<String, DecodeError> {
    let raw = get_bytes(buf, MAX_STRING_LEN, what)?;
    String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::Invalid("utf-8"))
}

fn get_u8<B: Buf>(buf: &mut B) -> Result<u8, DecodeError> {
    buf.try_get_u8().map_err(|_| DecodeError::Short)
}

impl Encode for Report {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        for v in [
            self.blocks_delivered,
            self.blocks_recovered,
            self.blocks_lost,
            self.shards_late,
            self.shards_received,
            self.shards_missing,
            self.latency_p50_us,
            self.latency_p99_us,
            self.buffer_ms,
            self.bitrate_bps,
            self.startup_ms,
            self.stalls,
            self.stall_ms,
        ] {
            VarInt::write(v, buf);
        }
    }
}

impl Decode for Report {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        Ok(Report {
            blocks_delivered: VarInt::read(buf)?,
            blocks_recovered: VarInt::read(buf)?,
            blocks_lost: VarInt::read(buf)?,
            shards_late: VarInt::read(buf)?,
            shards_received: VarInt::read(buf)?,
            shards_missing: VarInt::read(buf)?,
            latency_p50_us: VarInt::read(buf)?,
            latency_p99_us: VarInt::read(buf)?,
            buffer_ms: VarInt::read(buf)?,
            bitrate_bps: VarInt::read(buf)?,
            startup_ms: VarInt::read(buf)?,
            stalls: VarInt::read(buf)?,
            stall_ms: VarInt::read(buf)?,
        })
    }
}

impl Encode for Summary {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_u8(self.viewer_qoe);
        buf.put_u8(self.stream_qoe);
        VarInt::write(self.stream_viewers, buf);
        VarInt::write(self.parity, buf);
        VarInt::write(self.loss_ppm, buf);
        VarInt::write(self.stream_residual_loss_ppm, buf);
    }
}

impl Decode for Summary {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        let s = Summary {
            viewer_qoe: get_u8(buf)?,
            stream_qoe: get_u8(buf)?,
            stream_viewers: VarInt::read(buf)?,
            parity: VarInt::read(buf)?,
            loss_ppm: VarInt::read(buf)?,
            stream_residual_loss_ppm: VarInt::read(buf)?,
        };
        if s.viewer_qoe > 100 || s.stream_qoe > 100 {
            return Err(DecodeError::Invalid("qoe"));
        }
        Ok(s)
    }
}

impl Encode for ControlMessage {
    fn encode<B: BufMut>(&self, buf: &mut B) {
        match self {
            ControlMessage::Hello {
                version,
                stream,
                token,
                agent,
                latency_ms,
            } => {
                buf.put_u8(ty::HELLO);
                buf.put_u8(*version);
                put_str(stream, buf);
                let token = &token[..token.len().min(MAX_TOKEN_LEN)];
                VarInt::write(token.len() as u64, buf);
                buf.put_slice(token);
                put_str(agent, buf);
                VarInt::write((*latency_ms).min(MAX_LATENCY_MS), buf);
            }
            ControlMessage::Welcome {
                stream_id,
                clock_us,
                report_interval_ms,
            } => {
                buf.put_u8(ty::WELCOME);
                VarInt::write(u64::from(*stream_id), buf);
                VarInt::write(*clock_us, buf);
                VarInt::write(*report_interval_ms, buf);
            }
            ControlMessage::Reject { code, reason } => {
                buf.put_u8(ty::REJECT);
                VarInt::write(*code, buf);
                put_str(reason, buf);
            }
            ControlMessage::Report(r) => {
                buf.put_u8(ty::REPORT);
                r.encode(buf);
            }
            ControlMessage::Stall => buf.put_u8(ty::STALL),
            ControlMessage::Resume => buf.put_u8(ty::RESUME),
            ControlMessage::Event(e) => {
                buf.put_u8(ty::EVENT);
                put_str(&e.name, buf);
                put_str(&e.value, buf);
            }
            ControlMessage::Leave => buf.put_u8(ty::LEAVE),
            ControlMessage::EndOfStream { last_seq } => {
                buf.put_u8(ty::END_OF_STREAM);
                VarInt::write(*last_seq, buf);
            }
            ControlMessage::Summary(s) => {
                buf.put_u8(ty::SUMMARY);
                s.encode(buf);
            }
            ControlMessage::Goodbye { code, reason } => {
                buf.put_u8(ty::GOODBYE);
                VarInt::write(*code, buf);
                put_str(reason, buf);
            }
        }
    }
}

impl Decode for ControlMessage {
    fn decode<B: Buf>(buf: &mut B) -> Result<Self, DecodeError> {
        Ok(match get_u8(buf)? {
            ty::HELLO => {
                let version = get_u8(buf)?;
                if version != super::VERSION {
                    // Another version's Hello may be laid out differently: keep
                    // only its version, so the server can answer with a clean
                    // `unsupported_version` instead of a decode error.
                    buf.advance(buf.remaining());
                    return Ok(ControlMessage::Hello {
                        version,
                        stream: String::new(),
                        token: Bytes::new(),
                        agent: String::new(),
                        latency_ms: 0,
                    });
                }
                let stream = get_str(buf, "stream name")?;
                let token = get_bytes(buf, MAX_TOKEN_LEN, "token")?;
                let agent = get_str(buf, "agent")?;
                let latency_ms = VarInt::read(buf)?;
                if !(1..=MAX_LATENCY_MS).contains(&latency_ms) {
                    return Err(DecodeError::Invalid("latency budget"));
                }
                ControlMessage::Hello {
                    version,
                    stream,
                    token,
                    agent,
                    latency_ms,
                }
            }
            ty::WELCOME => ControlMessage::Welcome {
                stream_id: u32::try_from(VarInt::read(buf)?)
                    .map_err(|_| DecodeError::Invalid("stream id"))?,
                clock_us: VarInt::read(buf)?,
                report_interval_ms: VarInt::read(buf)?,
            },
            ty::REJECT => ControlMessage::Reject {
                code: VarInt::read(buf)?,
                reason: get_str(buf, "reason")?,
            },
            ty::REPORT => ControlMessage::Report(Report::decode(buf)?),
            ty::STALL => ControlMessage::Stall,
            ty::RESUME => ControlMessage::Resume,
            ty::EVENT => ControlMessage::Event(ClientEvent {
                name: get_str(buf, "event name")?,
                value: get_str(buf, "event value")?,
            }),
            ty::LEAVE => ControlMessage::Leave,
            ty::END_OF_STREAM => ControlMessage::EndOfStream {
                last_seq: VarInt::read(buf)?,
            },
            ty::SUMMARY => ControlMessage::Summary(Summary::decode(buf)?),
            ty::GOODBYE => ControlMessage::Goodbye {
                code: VarInt::read(buf)?,
                reason: get_str(buf, "reason")?,
            },
            other => return Err(DecodeError::UnknownType(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, Rng, RngCore, SeedableRng};

    fn samples() -> Vec<ControlMessage> {
        vec![
            ControlMessage::Hello {
                version: crate::wire::VERSION,
                stream: "live".into(),
                token: Bytes::from_static(b"s3cret"),
                agent: "quicast-test".into(),
                latency_ms: 200,
            },
            ControlMessage::Welcome {
                stream_id: 7,
                clock_us: 123_456_789,
                report_interval_ms: 1000,
            },
            ControlMessage::Reject {
                code: 0x103,
                reason: "no such stream".into(),
            },
            ControlMessage::Report(Report {
                blocks_delivered: 100,
                blocks_recovered: 5,
                blocks_lost: 1,
                shards_late: 2,
                shards_received: 1400,
                shards_missing: 70,
                latency_p50_us: 21_000,
                latency_p99_us: 27_000,
                buffer_ms: 30,
                bitrate_bps: 8_000_000,
                startup_ms: 120,
                stalls: 1,
                stall_ms: 300,
            }),
            ControlMessage::Stall,
            ControlMessage::Resume,
            ControlMessage::Event(ClientEvent {
                name: "quality".into(),
                value: "720p".into(),
            }),
            ControlMessage::Leave,
            ControlMessage::EndOfStream { last_seq: 99 },
            ControlMessage::Summary(Summary {
                viewer_qoe: 97,
                stream_qoe: 95,
                stream_viewers: 3,
                parity: 4,
                loss_ppm: 50_000,
                stream_residual_loss_ppm: 10,
            }),
            ControlMessage::Goodbye {
                code: 0,
                reason: "server shutting down".into(),
            },
        ]
    }

    #[test]
    fn frames_round_trip_and_split_anywhere() {
        let mut stream = Vec::new();
        for m in samples() {
            m.encode_frame(&mut stream);
        }
        // Feeding the bytes in two parts at every split point yields the same messages.
        for split in 0..stream.len() {
            let mut buf = Vec::new();
            let mut out = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                buf.extend_from_slice(part);
                let mut rd = &buf[..];
                while let Some(m) =
                    ControlMessage::decode_frame(&mut rd, MAX_CONTROL_FRAME).unwrap()
                {
                    out.push(m);
                }
                let used = buf.len() - rd.len();
                buf.drain(..used);
            }
            assert_eq!(out, samples(), "split at {split}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn rejects_bad_frames() {
        // Over the cap: refused from the length alone, before the body arrives.
        let mut big = Vec::new();
        VarInt::write(MAX_CONTROL_FRAME as u64 + 1, &mut big);
        assert_eq!(
            ControlMessage::decode_frame(&mut &big[..], MAX_CONTROL_FRAME),
            Err(DecodeError::TooLong("control frame"))
        );
        let unknown = [1u8, 0x7f];
        assert_eq!(
            ControlMessage::decode_frame(&mut &unknown[..], MAX_CONTROL_FRAME),
            Err(DecodeError::UnknownType(0x7f))
        );
        let trailing = [2u8, ty::STALL, 0];
        assert_eq!(
            ControlMessage::decode_frame(&mut &trailing[..], MAX_CONTROL_FRAME),
            Err(DecodeError::Long)
        );
        // Hello whose stream name is not UTF-8.
        let mut body = vec![ty::HELLO, crate::wire::VERSION, 2, 0xff, 0xfe, 0, 0, 1];
        let mut frame = Vec::new();
        VarInt::write(body.len() as u64, &mut frame);
        frame.append(&mut body);
        assert_eq!(
            ControlMessage::decode_frame(&mut &frame[..], MAX_CONTROL_FRAME),
            Err(DecodeError::Invalid("utf-8"))
        );
        let empty = [0u8];
        assert_eq!(
            ControlMessage::decode_frame(&mut &empty[..], MAX_CONTROL_FRAME),
            Err(DecodeError::Short)
        );
    }

    #[test]
    fn every_truncated_body_is_an_error() {
        for m in samples() {
            let mut body = Vec::new();
            m.encode(&mut body);
            for cut in 0..body.len() {
                assert!(
                    ControlMessage::decode(&mut &body[..cut]).is_err(),
                    "{} cut at {cut}",
                    m.name()
                );
            }
        }
    }

    #[test]
    fn random_frames_never_panic() {
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        for _ in 0..100_000 {
            let len = rng.random_range(0..64);
            let mut v = vec![0u8; len];
            rng.fill_bytes(&mut v);
            if len > 1 {
                v[0] = (len - 1) as u8 & 0x3f;
                v[1] = rng.random_range(0..12);
            }
            let mut rd = &v[..];
            if let Ok(Some(m)) = ControlMessage::decode_frame(&mut rd, MAX_CONTROL_FRAME) {
                let mut again = Vec::new();
                m.encode_frame(&mut again);
                assert_eq!(
                    ControlMessage::decode_frame(&mut &again[..], MAX_CONTROL_FRAME),
                    Ok(Some(m)),
                    "seed {seed}"
                );
            }
        }
    }
}
