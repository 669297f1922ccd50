//! chunks: a paced, self-describing test stream for end-to-end measurements across processes.
//!
//! ```text
//! chunks gen --seconds 20 --tail-seconds 2 | <sender> ... <receiver> | chunks check --expect 15198
//! ```
//!
//! `gen` writes 1316-byte chunks (the size of 7 MPEG-TS packets, SRT's live payload) to stdout.
//! Each chunk carries a magic, its sequence number, its send time and a filler derived from the
//! sequence number, so `check` can tell an intact chunk from a damaged one without any side
//! channel. The send time is wall clock (`SystemTime`) microseconds: `gen` and `check` are
//! separate processes, and on one machine they read the same clock.
//!
//! `check` reads a receiver's output (a byte stream that may be missing chunks, or parts of
//! chunks), resynchronises on the magic, counts intact chunks exactly and measures the
//! end-to-end latency of each: the time `check` read it minus its send time. It prints one JSON
//! summary on stdout.

use std::{
    io::{Read, Write},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;

/// Bytes per chunk: 7 MPEG-TS packets, the payload SRT carries per packet in live mode.
const CHUNK: usize = 7 * 188;
/// Marks the start of a chunk; 8 bytes, so a false match in the filler is practically impossible.
const MAGIC: [u8; 8] = *b"QCSTchnk";
/// Magic, sequence number, send time.
const HEADER: usize = 8 + 8 + 8;
/// Sequence numbers beyond this are treated as damage: bounds the bitmap of seen chunks.
const MAX_SEQ: u64 = 50_000_000;

/// Paced test chunks for end-to-end delivery and latency measurements.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write paced chunks to stdout; print a JSON summary on stderr at the end.
    Gen {
        /// Media rate in bits per second.
        #[arg(long, default_value_t = 8_000_000)]
        bitrate: u64,
        /// Seconds of media to write.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Keep the stream going this long after the counted chunks, with chunks numbered on
        /// from `--seconds`' last, so the counted tail crosses the path as live data rather than
        /// as the end of a stream (senders and receivers may hold a stream's last packet).
        /// `check --expect` ignores these chunks.
        #[arg(long, default_value_t = 0.0, value_name = "SECONDS")]
        tail_seconds: f64,
    },
    /// Read a receiver's output from stdin and print a JSON summary on stdout.
    Check {
        /// Chunks that were sent (from `gen`'s summary). Default: the highest sequence number
        /// seen plus one, which cannot count chunks lost at the end.
        #[arg(long)]
        expect: Option<u64>,
        /// The rate `gen` ran at, to bucket chunks per second of media.
        #[arg(long, default_value_t = 8_000_000)]
        bitrate: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Gen {
            bitrate,
            seconds,
            tail_seconds,
        } => generate(bitrate, seconds, tail_seconds),
        Command::Check { expect, bitrate } => check(expect, bitrate),
    }
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The filler of chunk `seq`: a xorshift stream seeded by the sequence number, so a chunk spliced
/// from two others, or shifted by a byte, does not pass as intact.
fn fill(seq: u64, out: &mut [u8]) {
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

fn generate(bitrate: u64, seconds: f64, tail_seconds: f64) -> anyhow::Result<()> {
    anyhow::ensure!(bitrate > 0, "--bitrate must be positive");
    let count = |s: f64| (s.max(0.0) * bitrate as f64 / (CHUNK as f64 * 8.0)).ceil() as u64;
    let chunks = count(seconds);
    let tail = count(tail_seconds);
    let nanos_per_chunk = CHUNK as f64 * 8.0 * 1e9 / bitrate as f64;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; CHUNK];
    buf[..8].copy_from_slice(&MAGIC);
    let start = Instant::now();
    let mut behind_max = Duration::ZERO;
    for seq in 0..chunks + tail {
        // Each chunk's slot comes from the start and its index, never from the previous
        // write, so a stall (a full pipe, a descheduled process) is caught up, not carried.
        let due = start + Duration::from_nanos((seq as f64 * nanos_per_chunk) as u64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        } else {
            behind_max = behind_max.max(now - due);
        }
        buf[8..16].copy_from_slice(&seq.to_be_bytes());
        buf[16..24].copy_from_slice(&wall_us().to_be_bytes());
        fill(seq, &mut buf[HEADER..]);
        stdout
            .write_all(&buf)
            .and_then(|()| stdout.flush())
            .with_context(|| format!("writing chunk {seq}"))?;
    }
    let elapsed = start.elapsed();
    eprintln!(
        "{}",
        serde_json::json!({
            "chunks": chunks,
            "bytes": chunks * CHUNK as u64,
            "tail_chunks": tail,
            "seconds": elapsed.as_secs_f64(),
            "behind_max_ms": behind_max.as_secs_f64() * 1e3,
        })
    );
    Ok(())
}

/// Counts of one `check` run.
struct Tally {
    seen: Vec<bool>,
    intact: u64,
    duplicates: u64,
    damaged: u64,
    max_seq: Option<u64>,
    latency_us: Histogram<u64>,
    /// Chunks read before their send time: the two processes disagree about the clock.
    negative: u64,
    /// Chunks at or beyond this sequence number are not counted.
    limit: Option<u64>,
    /// Intact chunks at or beyond `limit`.
    beyond: u64,
}

impl Tally {
    fn new(limit: Option<u64>) -> Self {
        Self {
            limit,
            beyond: 0,
            seen: Vec::new(),
            intact: 0,
            duplicates: 0,
            damaged: 0,
            max_seq: None,
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds"),
            negative: 0,
        }
    }

    /// Scans `buf` for chunks; returns how many leading bytes are consumed (the rest may be the
    /// start of a chunk whose end has not been read yet).
    fn scan(&mut self, buf: &[u8], read_us: u64, filler: &mut [u8]) -> usize {
        let mut at = 0;
        while let Some(found) = find_magic(&buf[at..]) {
            let start = at + found;
            if buf.len() - start < CHUNK {
                return start;
            }
            let chunk = &buf[start..start + CHUNK];
            let seq = u64::from_be_bytes(chunk[8..16].try_into().expect("8 bytes"));
            let sent = u64::from_be_bytes(chunk[16..24].try_into().expect("8 bytes"));
            let intact = seq < MAX_SEQ && {
                fill(seq, filler);
                chunk[HEADER..] == *filler
            };
            if !intact {
                // Part of this chunk is missing: the next magic may be inside it.
                self.damaged += 1;
                at = start + 1;
                continue;
            }
            if self.limit.is_some_and(|limit| seq >= limit) {
                // A tail chunk after the counted ones: it only kept the stream live.
                self.beyond += 1;
                at = start + CHUNK;
                continue;
            }
            let index = seq as usize;
            if self.seen.len() <= index {
                self.seen.resize(index + 1, false);
            }
            if std::mem::replace(&mut self.seen[index], true) {
                self.duplicates += 1;
            } else {
                self.intact += 1;
                self.max_seq = self.max_seq.max(Some(seq));
                match read_us.checked_sub(sent) {
                    Some(us) => {
                        self.latency_us.saturating_record(us.max(1));
                    }
                    None => self.negative += 1,
                }
            }
            at = start + CHUNK;
        }
        // No magic in the tail: keep the last bytes in case a magic straddles the read boundary.
        buf.len().saturating_sub(MAGIC.len() - 1).max(at)
    }
}

fn find_magic(buf: &[u8]) -> Option<usize> {
    buf.windows(MAGIC.len()).position(|w| w == MAGIC)
}

fn check(expect: Option<u64>, bitrate: u64) -> anyhow::Result<()> {
    let mut stdin = std::io::stdin().lock();
    let mut tally = Tally::new(expect);
    let mut filler = vec![0u8; CHUNK - HEADER];
    let mut buf = vec![0u8; 1 << 18];
    let mut held = 0usize;
    let mut bytes_read = 0u64;
    loop {
        if held == buf.len() {
            // Only reachable if a magic keeps a partial chunk at the front; it cannot grow
            // past one chunk, so this is a bug guard rather than a limit.
            held = 0;
        }
        let n = match stdin.read(&mut buf[held..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading stdin"),
        };
        // One timestamp per read: every chunk in it became readable no later than this.
        let read_us = wall_us();
        bytes_read += n as u64;
        let len = held + n;
        let consumed = tally.scan(&buf[..len], read_us, &mut filler);
        buf.copy_within(consumed..len, 0);
        held = len - consumed;
    }
    let expected = expect.unwrap_or_else(|| tally.max_seq.map_or(0, |s| s + 1));
    let per_second = (bitrate as f64 / (CHUNK as f64 * 8.0)).max(1.0);
    let seconds = (expected as f64 / per_second).ceil() as usize;
    let per_second_pct: Vec<f64> = (0..seconds)
        .map(|s| {
            let lo = (s as f64 * per_second) as usize;
            let hi = (((s + 1) as f64 * per_second) as usize).min(expected as usize);
            let got = (lo..hi)
                .filter(|&i| tally.seen.get(i).copied().unwrap_or(false))
                .count();
            round3(100.0 * got as f64 / (hi - lo).max(1) as f64)
        })
        .collect();
    let in_range = tally
        .seen
        .iter()
        .take(expected as usize)
        .filter(|&&s| s)
        .count() as u64;
    let ms = |q: f64| {
        if tally.latency_us.is_empty() {
            f64::NAN
        } else {
            tally.latency_us.value_at_quantile(q) as f64 / 1e3
        }
    };
    let summary = serde_json::json!({
        "chunks_expected": expected,
        "chunks_received": tally.intact + tally.duplicates + tally.damaged,
        "chunks_intact": tally.intact,
        "chunks_intact_expected": in_range,
        "chunks_beyond_expected": tally.beyond,
        "duplicates": tally.duplicates,
        "damaged": tally.damaged,
        "clock_negative": tally.negative,
        "bytes_read": bytes_read,
        "delivered_pct": if expected == 0 { 0.0 } else { 100.0 * in_range as f64 / expected as f64 },
        "latency_ms": {
            "p50": ms(0.5),
            "p99": ms(0.99),
            "p999": ms(0.999),
            "max": if tally.latency_us.is_empty() { f64::NAN } else { tally.latency_us.max() as f64 / 1e3 },
            "min": if tally.latency_us.is_empty() { f64::NAN } else { tally.latency_us.min() as f64 / 1e3 },
        },
        "per_second_delivered_pct": per_second_pct,
    });
    println!("{summary}");
    Ok(())
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
