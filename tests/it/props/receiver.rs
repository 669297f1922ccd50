//! Property of the viewer's receive state machine, driven by a script.
//!
//! Shared verbatim by `tests/it/props.rs` (seeded, under `cargo test`) and the
//! `receiver` fuzz target (`fuzz/fuzz_targets/receiver.rs`). Depends on
//! `quicast` and `bytes` only.
//!
//! The input is read as a script. Its first bytes set up a stream: how many
//! blocks, their sizes, the FEC and decoder settings, the latency budget, the
//! first sequence number and the sender clock; the blocks are then encoded
//! with a real [`Encoder`]. The rest is a list of operations, applied to a
//! [`Receiver`] with a clock the script moves:
//!
//! | op (byte % 8) | what |
//! |---|---|
//! | 0..=3 | deliver one of the encoded datagrams (any block, any shard, repeats allowed) |
//! | 4 | deliver an encoded datagram with bytes flipped, cut short or one appended |
//! | 5 | deliver raw bytes from the script, optionally behind a plausible header start |
//! | 6 | move the clock (by up to 199 ms, to `poll_timeout`, or by 10 to 60 s), `handle_timeout` |
//! | 7 | `end_of_stream` with a sequence number near the stream's, far beyond it, or the largest a frame carries |

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quicast::fec::{Decoder, DecoderConfig, Encoder, FecConfig};
use quicast::session::{Event, Receiver, ReceiverConfig};
use quicast::wire::{Flags, ShardHeader, MAX_VARINT, VERSION};

/// Stream id of the encoded blocks and of the receiver.
const STREAM: u32 = 7;
/// Operations read from one script at most.
const MAX_OPS: usize = 4096;
/// How far past the last operation the final check moves the clock: beyond
/// any deadline a shard can set (a timestamp unwraps to at most 2^31 µs,
/// about 36 minutes, ahead of the sender clock, plus the latency budget).
const FLUSH: Duration = Duration::from_secs(3600);

/// Runs the script in `input` and checks, after every operation:
///
/// - nothing panics;
/// - `Event::Block` carries exactly the bytes and sync flag encoded for its
///   sequence number, unless a damaged or raw datagram that decodes as a shard
///   of that sequence number was delivered (no checksum protects a payload:
///   QUIC does), and never a block that was not sent;
/// - `Block` and `Lost` sequence numbers strictly increase, and nothing
///   follows `End`; `is_ended` agrees with having seen `End`;
/// - `stats().datagrams` equals the datagrams fed, `blocks_delivered` the
///   `Block` events, and `blocks_lost` is at least the `Lost` events;
/// - stall changes alternate, starting with a stall, and match `stats().stalls`;
/// - after `handle_timeout(now)`, `poll_timeout()` is `None` or later than
///   `now` (nothing due is left undone);
/// - a [`Decoder`] with the receiver's limits, fed the same shards, never
///   holds more than `max_buffered_bytes`;
///
/// and at the end, an hour later: nothing overdue, and if `end_of_stream` was
/// called the stream has ended.
///
/// Returns a description of the first violation.
pub fn check(input: &[u8]) -> Result<(), String> {
    let mut script = Script(input);
    let mut run = Run::new(&mut script)?;
    for op in 0..MAX_OPS {
        if script.0.is_empty() {
            break;
        }
        run.step(&mut script)
            .map_err(|e| format!("op {op} at {:?}: {e}", run.now - run.t0))?;
    }
    run.now += FLUSH;
    run.rx.handle_timeout(run.now);
    run.observe()
        .map_err(|e| format!("final flush at {:?}: {e}", run.now - run.t0))?;
    run.after_timeout()?;
    if run.eos_called && !run.rx.is_ended() {
        return Err("end_of_stream was called an hour ago, and the stream has not ended".into());
    }
    Ok(())
}

/// The script being read; reads past its end give zeros.
struct Script<'a>(&'a [u8]);

impl<'a> Script<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (now, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        now
    }
}

struct Sent {
    data: Bytes,
    sync: bool,
    datagrams: Vec<Bytes>,
}

struct Run {
    t0: Instant,
    now: Instant,
    latency: Duration,
    first_seq: u64,
    blocks: BTreeMap<u64, Sent>,
    rx: Receiver,
    shadow: Decoder,
    max_buffered: usize,
    /// Sequence numbers a damaged or raw datagram decoded as.
    tainted: BTreeSet<u64>,
    fed: u64,
    delivered: u64,
    lost: u64,
    last_seq: Option<u64>,
    ended: bool,
    stalled: bool,
    stalls: u64,
    eos_called: bool,
}

impl Run {
    fn new(s: &mut Script) -> Result<Self, String> {
        let count = 1 + u64::from(s.u8() % 8);
        let mut fec = FecConfig::default();
        let shard = [1, 7, 64, 300, 1100][usize::from(s.u8() % 5)];
        let config = fec
            .set_shard_size(shard)
            .and_then(|f| f.set_max_data_shards(1 + usize::from(s.u8() % 32)))
            .and_then(|f| f.set_redundancy(f64::from(s.u8() % 9) / 8.0))
            .map_err(|e| format!("setup: {e}"))?;
        let max_len = config.max_block_len();
        let latency = Duration::from_millis(1 + u64::from(s.u8()) * 4);
        let mut dc = DecoderConfig::default();
        dc.set_window(1 + usize::from(s.u8() % 64))
            .map_err(|e| format!("setup: {e}"))?;
        let cap = s.u16();
        if cap % 2 == 1 {
            dc.set_max_buffered_bytes(1 + usize::from(cap) * 4)
                .map_err(|e| format!("setup: {e}"))?;
        }
        let first_seq =
            [0, 1000, u64::from(u32::MAX) - 3, MAX_VARINT - 20][usize::from(s.u8() % 4)];
        let ts0 = s.u32();
        let gap_us = u32::from(s.u8() % 50) * 1000;
        // Formerly the END flag on the last block (gone from the protocol);
        // still read so that recorded inputs set up the same streams.
        let _ = s.u8();

        let mut encoder = Encoder::new(STREAM, config.clone());
        let mut blocks = BTreeMap::new();
        for i in 0..count {
            let seq = first_seq + i;
            // At most 256 data shards, so tiny shards stay cheap to encode.
            let len = usize::from(s.u16() % 3000).min(max_len).min(shard * 256);
            let data: Vec<u8> = (0..len)
                .map(|j| (j as u64 ^ seq.rotate_left(8)) as u8)
                .collect();
            let flags = if i == 0 { Flags::SYNC } else { Flags::empty() };
            let ts = ts0.wrapping_add(gap_us.wrapping_mul(i as u32));
            let block = encoder
                .encode(seq, ts, flags, &data)
                .map_err(|e| format!("setup: encode block {seq} of {len} bytes: {e}"))?;
            for dg in block.datagrams() {
                ShardHeader::decode_datagram(dg)
                    .map_err(|e| format!("setup: an encoded datagram of block {seq}: {e}"))?;
            }
            blocks.insert(
                seq,
                Sent {
                    data: Bytes::from(data),
                    sync: i == 0,
                    datagrams: block.datagrams().to_vec(),
                },
            );
        }

        let t0 = Instant::now();
        let mut rc = ReceiverConfig::new(STREAM, latency);
        rc.decoder(dc.clone());
        let mut rx = Receiver::new(rc);
        rx.start(t0);
        let clock = s.u8();
        if clock % 2 == 1 {
            // As from Welcome: the sender clock, here within about a second
            // of the first block's timestamp, in any 2^32 µs era.
            let era = u64::from(clock >> 1) << 32;
            let skew = i64::from(s.u8() as i8) * 10_000;
            rx.set_clock((era | u64::from(ts0)).saturating_add_signed(skew), t0);
        }
        Ok(Run {
            t0,
            now: t0,
            latency,
            first_seq,
            blocks,
            rx,
            shadow: Decoder::new(dc.clone()),
            max_buffered: dc.max_buffered_bytes(),
            tainted: BTreeSet::new(),
            fed: 0,
            delivered: 0,
            lost: 0,
            last_seq: None,
            ended: false,
            stalled: false,
            stalls: 0,
            eos_called: false,
        })
    }

    fn step(&mut self, s: &mut Script) -> Result<(), String> {
        match s.u8() % 8 {
            0..=3 => {
                let dg = self.pick(s);
                self.deliver(dg, false);
            }
            4 => {
                let dg = self.pick(s);
                let mut v = dg.to_vec();
                let pos = usize::from(s.u16()) % v.len();
                match s.u8() % 4 {
                    0 => v[pos] ^= s.u8() | 1,
                    1 => v.truncate(pos),
                    2 => {
                        // Header bytes: the first few of the datagram.
                        let pos = pos % v.len().min(20);
                        v[pos] ^= s.u8() | 1;
                        let pos = usize::from(s.u8()) % v.len().min(20);
                        v[pos] ^= s.u8() | 1;
                    }
                    _ => v.push(s.u8()),
                }
                self.deliver(Bytes::from(v), true);
            }
            5 => {
                let mode = s.u8();
                let len = usize::from(mode >> 2);
                let mut v = Vec::with_capacity(len + 3);
                if mode & 1 == 1 {
                    // Past the version, flags and stream id checks.
                    v.extend_from_slice(&[VERSION, mode & 0x06, STREAM as u8]);
                }
                v.extend_from_slice(s.bytes(len));
                self.deliver(Bytes::from(v), true);
            }
            6 => {
                let by = s.u8();
                let step = match by {
                    0..=199 => Duration::from_millis(u64::from(by)),
                    200..=249 => match self.rx.poll_timeout() {
                        Some(t) if t > self.now => t - self.now,
                        _ => Duration::from_millis(1),
                    },
                    _ => Duration::from_secs(10 * u64::from(by - 249)),
                };
                self.now += step;
                self.rx.handle_timeout(self.now);
                self.shadow.handle_timeout(self.now);
                while self.shadow.poll_outcome().is_some() {}
                let _ = self.rx.report(self.now);
                self.observe()?;
                self.after_timeout()?;
            }
            _ => {
                let by = s.u8();
                let last = match by {
                    0..=249 => self.first_seq + u64::from(by % 10),
                    250..=252 => self.first_seq.saturating_add(u64::from(s.u32())),
                    _ => MAX_VARINT,
                }
                .min(MAX_VARINT);
                self.eos_called = true;
                self.rx.end_of_stream(last, self.now);
            }
        }
        self.observe()
    }

    /// One encoded datagram, chosen by the script.
    fn pick(&self, s: &mut Script) -> Bytes {
        let block = u64::from(s.u8()) % self.blocks.len() as u64;
        let dgs = &self.blocks[&(self.first_seq + block)].datagrams;
        dgs[usize::from(s.u16()) % dgs.len()].clone()
    }

    fn deliver(&mut self, dg: Bytes, damaged: bool) {
        if let Ok((h, payload)) = ShardHeader::decode_datagram(&dg) {
            if h.stream_id == STREAM {
                if damaged {
                    self.tainted.insert(h.seq);
                }
                self.shadow.insert(&h, payload, self.now + self.latency);
                while self.shadow.poll_outcome().is_some() {}
            }
        }
        self.fed += 1;
        self.rx.handle_datagram(self.now, dg);
    }

    /// Drains events and stall changes and checks every invariant.
    fn observe(&mut self) -> Result<(), String> {
        while let Some(ev) = self.rx.poll_event() {
            if self.ended {
                return Err(format!("{ev:?} after End"));
            }
            let seq = match &ev {
                Event::Block {
                    seq, data, sync, ..
                } => {
                    self.delivered += 1;
                    if !self.tainted.contains(seq) {
                        match self.blocks.get(seq) {
                            Some(sent) if sent.data == *data && sent.sync == *sync => {}
                            Some(sent) => {
                                return Err(format!(
                                    "block {seq}: {} bytes (sync {sync}) delivered, {} bytes (sync {}) sent",
                                    data.len(),
                                    sent.data.len(),
                                    sent.sync
                                ))
                            }
                            None => return Err(format!("block {seq} delivered, never sent")),
                        }
                    }
                    *seq
                }
                Event::Lost { seq } => {
                    self.lost += 1;
                    *seq
                }
                Event::End => {
                    self.ended = true;
                    continue;
                }
                other => return Err(format!("unexpected event {other:?}")),
            };
            if self.last_seq.is_some_and(|last| seq <= last) {
                return Err(format!("{ev:?} after seq {:?}", self.last_seq));
            }
            self.last_seq = Some(seq);
        }
        while let Some(stall) = self.rx.poll_stall() {
            if stall == self.stalled {
                return Err(format!("stall change to {stall} twice in a row"));
            }
            self.stalled = stall;
            self.stalls += u64::from(stall);
        }
        let st = self.rx.stats();
        let counts = (st.datagrams, st.blocks_delivered, st.stalls);
        if counts != (self.fed, self.delivered, self.stalls) {
            return Err(format!(
                "stats (datagrams, blocks_delivered, stalls) = {counts:?}, observed {:?}",
                (self.fed, self.delivered, self.stalls)
            ));
        }
        if st.blocks_lost < self.lost {
            return Err(format!(
                "stats blocks_lost {} < {} Lost events",
                st.blocks_lost, self.lost
            ));
        }
        if self.rx.is_ended() != self.ended {
            return Err(format!(
                "is_ended {} but End seen {}",
                self.rx.is_ended(),
                self.ended
            ));
        }
        // The receiver's own decoder, not the shadow: the bound is the
        // receiver's promise.
        if self.rx.buffered_bytes() > self.max_buffered {
            return Err(format!(
                "receiver holds {} bytes, limit {}",
                self.rx.buffered_bytes(),
                self.max_buffered
            ));
        }
        Ok(())
    }

    /// Right after `handle_timeout(self.now)`.
    fn after_timeout(&mut self) -> Result<(), String> {
        match self.rx.poll_timeout() {
            Some(t) if t <= self.now => Err(format!(
                "poll_timeout {:?} not after handle_timeout at {:?}",
                t - self.t0,
                self.now - self.t0
            )),
            _ => Ok(()),
        }
    }
}
