//! The viewer side: datagrams in, in-order blocks out, within a latency budget.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hdrhistogram::Histogram;

use super::stats::{new_histogram, ReceiverStats};
use crate::{
    analytics::REPAIR_REQUEST_COPIES,
    fec::{BlockResult, Decoder, DecoderConfig, Insert},
    wire::{
        encode_repair, Flags, RepairEntry, Report, ShardHeader, ShardSet, MAX_REPAIR_ATTEMPTS,
        MAX_REPAIR_ENTRIES, MAX_VARINT,
    },
};

/// What a viewer's application receives, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A block, complete and in order.
    Block {
        /// Sequence number.
        seq: u64,
        /// Sender timestamp, microseconds on the stream's clock (unwrapped).
        timestamp_us: u64,
        /// A sync point: decoding can start here.
        sync: bool,
        /// The media bytes.
        data: Bytes,
    },
    /// Block `seq` missed its deadline; it will never be delivered.
    ///
    /// Every lost block is counted in [`ReceiverStats::blocks_lost`]. After a
    /// forward jump of the sender by more than the decoder window, or an
    /// end of stream announced that far beyond the last block seen (neither
    /// is something a conforming sender does), only the last window's worth
    /// of the skipped blocks get an event.
    Lost {
        /// Sequence number.
        seq: u64,
    },
    /// The stream ended; no events follow.
    End,
    /// The connection was lost and a new one established after `attempts`
    /// tries. Delivery resumes at the live edge: sequence numbers may jump or,
    /// after a server restart, start again.
    Reconnected {
        /// Connection attempts it took.
        attempts: u32,
        /// Blocks published while the viewer was away, which it never saw
        /// (neither delivered nor lost): the gap between the last block known
        /// before the outage and the first one after. 0 when unknown, as
        /// after a server restart, whose sequence starts again.
        missed: u64,
    },
}

/// Default of [`ReceiverConfig::sync_wait`]: two of the server example's
/// one-second sync intervals.
pub const DEFAULT_SYNC_WAIT: Duration = Duration::from_secs(2);

/// Default gap in delivery after which a viewer counts as stalled.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_millis(500);

/// Default [`ReceiverConfig::repair_delay`].
pub const DEFAULT_REPAIR_DELAY: Duration = Duration::from_millis(4);

/// Time between the copies of one repair request.
///
/// Wide enough that a loss burst on the way up (a few packets, a few
/// milliseconds) rarely takes every copy, short enough that the last copy
/// still leaves the answer most of a budget above one round trip.
const REPAIR_COPY_SPACING: Duration = Duration::from_millis(5);

/// Repair datagrams waiting to be sent, at most; older ones are dropped.
const MAX_OUTGOING_REPAIRS: usize = 64;

/// Settings of a [`Receiver`].
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    stream_id: u32,
    latency: Duration,
    decoder: DecoderConfig,
    stall_after: Duration,
    repair: bool,
    repair_delay: Duration,
    sync_wait: Duration,
}

impl ReceiverConfig {
    /// Receive stream `stream_id` with the given latency budget.
    pub fn new(stream_id: u32, latency: Duration) -> Self {
        ReceiverConfig {
            stream_id,
            latency,
            decoder: DecoderConfig::default(),
            stall_after: DEFAULT_STALL_AFTER,
            repair: true,
            repair_delay: DEFAULT_REPAIR_DELAY,
            sync_wait: DEFAULT_SYNC_WAIT,
        }
    }

    /// How long a viewer that joins mid-stream passes over blocks while it
    /// waits for one marked as a sync point ([`Event::Block`]'s `sync`), the
    /// first block it then delivers. Default [`DEFAULT_SYNC_WAIT`], 2 s.
    ///
    /// A media decoder can start only at a sync point (a key frame); what
    /// comes before it is bytes it would discard or, worse, show as garbage.
    /// Past the wait, delivery starts at the next block whatever it is, so a
    /// stream that never marks sync points is delayed, never withheld; make
    /// the wait longer than the stream's sync interval. `Duration::ZERO`
    /// delivers from the first block seen. A viewer that joins at the start
    /// (block 0) and one resuming after a reconnect never wait.
    pub fn sync_wait(&mut self, t: Duration) -> &mut Self {
        self.sync_wait = t;
        self
    }

    /// Whether to ask the sender for repair of short code groups. Default on.
    pub fn repair(&mut self, on: bool) -> &mut Self {
        self.repair = on;
        self
    }

    /// How long after a block's latest shard the receiver waits before it
    /// asks for what the block lacks (its reordering allowance). Default
    /// [`DEFAULT_REPAIR_DELAY`], 4 ms.
    ///
    /// Shorter asks sooner, leaving more of the budget for the answer, but
    /// asks for shards that were only reordered or still on their way (the
    /// sender subtracts what it has not sent yet, so that costs little).
    pub fn repair_delay(&mut self, t: Duration) -> &mut Self {
        self.repair_delay = t;
        self
    }

    /// How long without a delivered block counts as a stall. Default
    /// [`DEFAULT_STALL_AFTER`]. A player whose buffer is about the latency
    /// budget runs dry after about that long; shorter reports brief hiccups as
    /// stalls, longer hides them.
    pub fn stall_after(&mut self, t: Duration) -> &mut Self {
        self.stall_after = t;
        self
    }

    /// Decoder limits. Default [`DecoderConfig::default`]; its window also
    /// bounds how far ahead of the oldest undelivered block the receiver looks.
    pub fn decoder(&mut self, decoder: DecoderConfig) -> &mut Self {
        self.decoder = decoder;
        self
    }
}

/// Length of one epoch of the one-way offset minimum. The windowed minimum
/// is over the current and the previous epoch, so it always covers between one
/// and two epochs of datagrams (2 to 4 s).
///
/// Longer rides out longer quiet spells of the sender and finds the path's
/// floor among more samples; shorter follows drift with less lag (the lag is
/// at most two epochs of drift: 0.4 ms at 100 ppm).
const CLOCK_EPOCH: Duration = Duration::from_secs(2);

/// Fastest the mapping moves *later*, in parts per million of elapsed time.
///
/// A rising offset minimum is either the sender's clock running slow (crystals
/// are off by up to about 100 ppm each, so 200 ppm between two) or the path
/// getting slower for longer than the window (a route change, a standing
/// queue). The first must be followed or deadlines come ever earlier and
/// blocks are lost; the second must not be followed quickly, or a slower path
/// would silently stretch every deadline instead of showing up as latency.
/// 500 ppm follows any real drift in full and absorbs a path that got 10 ms
/// slower over no less than 20 s. A falling minimum is followed at once: a
/// datagram cannot arrive before it was sent.
const CLOCK_MAX_SLEW_PPM: i64 = 500;

/// A windowed minimum this far above the mapping is not drift: the mapping is
/// stepped to it at once. The initial estimate adds half the RTT quinn had
/// when Welcome was read; an RTT inflated by the handshake's losses made it
/// hundreds of milliseconds early, every shard arrived after its deadline,
/// and 500 ppm would have needed hours. A path that got this much slower for
/// two epochs is followed too, at the cost of showing less of the rise as
/// latency; 50 ms is above the error an asymmetric path leaves (half the
/// difference of the two directions) on any but satellite-like paths.
const CLOCK_STEP_US: i64 = 50_000;

/// Maps the sender's microsecond clock onto local `Instant`s.
///
/// PURE: every method takes the local time as an argument.
///
/// The mapping starts from an estimate (Welcome's `clock_us` plus half the
/// RTT, read at `local`) and is then corrected by the one-way offset of every
/// datagram, `offset = arrival - (local + ts - sender_us)`, the way SRT's
/// TSBPD drift tracer follows the sender:
///
/// - *Never before it was sent.* The correction never exceeds the smallest
///   offset in the window: a datagram that would have arrived before the
///   mapped instant of its timestamp moves the mapping earlier to its arrival.
///   A Welcome that arrived late (a retransmission, a slow first read) made
///   the estimate late by that much; the first datagrams undo it.
/// - *Follows the windowed minimum.* After one full epoch the correction moves
///   by every change of `min(offset)` over the current and previous epoch:
///   down at once, up at most [`CLOCK_MAX_SLEW_PPM`]. Only the minimum counts,
///   so jitter and queueing (which only ever add delay) do not move it; drift
///   of the two clocks moves the minimum and is followed both ways.
/// - *Steps when far off.* A windowed minimum more than [`CLOCK_STEP_US`]
///   above the mapping moves it there at once, from the very first datagram
///   on: an estimate that early would otherwise put every deadline before its
///   shards arrive. A standing queue of that size at the start is absorbed
///   too (it shows as less latency), the same trade-off as later on.
///
/// `local(ts)` is therefore the instant the sender clock read `ts`, in local
/// time, as well as the initial estimate knew it, kept from drifting, and
/// never later than the fastest datagram allows. What the one-way delay is, no
/// amount of one-way samples can tell: the initial estimate's error (on an
/// asymmetric path, half the difference of the two directions) stays, except
/// where the first rule removes it.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// The sender clock read `sender_us` at local `local`: the initial estimate.
    sender_us: u64,
    local: Instant,
    /// Correction of the initial estimate, µs; positive maps later.
    adjust_us: i64,
    /// The windowed minimum the correction last moved with; `None` until the
    /// first epoch is complete or the mapping stepped, and until then only
    /// the first rule applies.
    reference_us: Option<i64>,
    /// Start of the current epoch; `None` before the first datagram.
    epoch_start: Option<Instant>,
    /// Smallest offset in the current and in the previous epoch.
    current_min: Option<i64>,
    previous_min: Option<i64>,
    /// Since when allowance to move later has been accruing.
    slew_from: Instant,
}

impl Clock {
    /// The sender clock read `sender_us` at `local`.
    fn new(sender_us: u64, local: Instant) -> Self {
        Clock {
            sender_us,
            local,
            adjust_us: 0,
            reference_us: None,
            epoch_start: None,
            current_min: None,
            previous_min: None,
            slew_from: local,
        }
    }

    /// `at - local` in µs, negative when `at` is earlier.
    fn since_local_us(&self, at: Instant) -> i128 {
        match at.checked_duration_since(self.local) {
            Some(d) => d.as_micros() as i128,
            None => -(self.local.duration_since(at).as_micros() as i128),
        }
    }

    fn sender_now(&self, now: Instant) -> u64 {
        let us = i128::from(self.sender_us) + self.since_local_us(now) - i128::from(self.adjust_us);
        us.clamp(0, i128::from(u64::MAX)) as u64
    }

    /// Unwraps a 32-bit timestamp to the full value nearest the sender's
    /// current clock (serial-number arithmetic, RFC 1982).
    fn unwrap(&self, ts: u32, now: Instant) -> u64 {
        let expected = self.sender_now(now);
        let delta = ts.wrapping_sub(expected as u32) as i32;
        expected.saturating_add_signed(i64::from(delta))
    }

    /// The local instant at which the sender clock read `sender_us`.
    fn local(&self, sender_us: u64) -> Instant {
        let us = i128::from(sender_us) - i128::from(self.sender_us) + i128::from(self.adjust_us);
        let magnitude = Duration::from_micros(us.unsigned_abs().min(u128::from(u64::MAX)) as u64);
        let mapped = if us >= 0 {
            self.local.checked_add(magnitude)
        } else {
            self.local.checked_sub(magnitude)
        };
        // Only a timestamp thousands of years off the estimate gets here.
        mapped.unwrap_or(self.local)
    }

    /// A datagram stamped `sender_us` (unwrapped) arrived at `now`.
    fn observe(&mut self, sender_us: u64, now: Instant) {
        let offset =
            self.since_local_us(now) - (i128::from(sender_us) - i128::from(self.sender_us));
        let offset = offset.clamp(i128::from(i64::MIN / 2), i128::from(i64::MAX / 2)) as i64;
        match self.epoch_start {
            Some(start) if now.saturating_duration_since(start) < CLOCK_EPOCH => {}
            Some(start) => {
                // After a silence of two epochs the old minimum says nothing
                // about the current window.
                let adjacent = now.saturating_duration_since(start) < 2 * CLOCK_EPOCH;
                self.previous_min = self.current_min.filter(|_| adjacent);
                self.current_min = None;
                self.epoch_start = Some(now);
            }
            None => self.epoch_start = Some(now),
        }
        let current = self.current_min.map_or(offset, |m| m.min(offset));
        self.current_min = Some(current);
        let window = self.previous_min.map_or(current, |p| p.min(current));
        // Until the first epoch is complete only a far-too-early estimate
        // moves the mapping later: at once, from the first datagram, since every
        // shard judged against it would be late. Later datagrams of the epoch
        // can only move it earlier again (the window is a running minimum).
        if self.previous_min.is_some() || self.reference_us.is_some() || window > CLOCK_STEP_US {
            match self.reference_us {
                None if window > CLOCK_STEP_US => {
                    self.adjust_us += window;
                    self.reference_us = Some(window);
                    self.slew_from = now;
                }
                None => {
                    self.reference_us = Some(window);
                    self.slew_from = now;
                }
                Some(reference) if window > reference + CLOCK_STEP_US => {
                    self.adjust_us += window - reference;
                    self.reference_us = Some(window);
                    self.slew_from = now;
                }
                Some(reference) if window <= reference => {
                    self.adjust_us += window - reference;
                    self.reference_us = Some(window);
                    self.slew_from = now;
                }
                Some(reference) => {
                    let elapsed = now.saturating_duration_since(self.slew_from).as_micros();
                    let allowance =
                        (elapsed.min(u128::from(u32::MAX)) as i64) * CLOCK_MAX_SLEW_PPM / 1_000_000;
                    let step = (window - reference).min(allowance);
                    if step == allowance {
                        // Spent it all: what accrued past it carries over.
                        let paid =
                            Duration::from_micros((step * 1_000_000 / CLOCK_MAX_SLEW_PPM) as u64);
                        self.slew_from += paid;
                    } else {
                        self.slew_from = now;
                    }
                    self.adjust_us += step;
                    self.reference_us = Some(reference + step);
                }
            }
        }
        // A datagram never arrives before it was sent.
        self.adjust_us = self.adjust_us.min(window);
    }
}

#[derive(Debug)]
enum Ready {
    Block {
        timestamp_us: u64,
        flags: Flags,
        data: Bytes,
        /// Rebuilt from parity: counted in `blocks_recovered` when released,
        /// so that it is always a part of `blocks_delivered`.
        recovered: bool,
    },
    Lost,
    /// `count` consecutive blocks from this one, none seen.
    Skipped(u64),
}

/// PURE receive state machine of one viewer.
///
/// Shards go into an FEC [`Decoder`]; finished blocks wait here until every
/// earlier block is delivered or lost, so the application sees sequence order.
/// A block not finished by its sender timestamp plus the latency budget is lost.
#[derive(Debug)]
pub struct Receiver {
    config: ReceiverConfig,
    decoder: Decoder,
    clock: Option<Clock>,
    ready: BTreeMap<u64, Ready>,
    next_seq: Option<u64>,
    end_seq: Option<u64>,
    end_deadline: Option<Instant>,
    ended: bool,
    events: VecDeque<Event>,
    stats: ReceiverStats,
    interval: Histogram<u64>,
    last_report: Option<(Instant, u64)>,
    newest_ts: u64,
    started: Option<Instant>,
    startup: Option<Duration>,
    last_delivery: Option<Instant>,
    stall: Option<Instant>,
    stall_changes: VecDeque<bool>,
    highest_seq: Option<u64>,
    rtt: Option<Duration>,
    /// Blocks that may need repair, by sequence number; never more than the
    /// decoder window.
    asks: BTreeMap<u64, Ask>,
    outgoing: VecDeque<Bytes>,
    shortfall: Vec<(u8, ShardSet)>,
    /// Whether delivery has begun at a sync point (or without one, see
    /// [`ReceiverConfig::sync_wait`]); until then, when the first block was
    /// seen (mid-stream).
    synced: bool,
    sync_since: Option<Instant>,
}

/// Repair state of one unfinished block.
#[derive(Debug, Clone)]
struct Ask {
    deadline: Instant,
    /// When to look at the block next: after its latest shard plus the
    /// repair delay, or after an answer should have arrived.
    check_at: Instant,
    attempts: u8,
    /// The request of the latest attempt, resent in copies.
    entries: Vec<RepairEntry>,
    copies_left: u8,
    next_copy: Instant,
}

impl Receiver {
    /// A receiver with nothing received yet.
    pub fn new(config: ReceiverConfig) -> Self {
        let synced = config.sync_wait.is_zero();
        Receiver {
            decoder: Decoder::new(config.decoder.clone()),
            config,
            clock: None,
            ready: BTreeMap::new(),
            next_seq: None,
            end_seq: None,
            end_deadline: None,
            ended: false,
            events: VecDeque::new(),
            stats: ReceiverStats::default(),
            interval: new_histogram(),
            last_report: None,
            newest_ts: 0,
            started: None,
            startup: None,
            last_delivery: None,
            stall: None,
            stall_changes: VecDeque::new(),
            highest_seq: None,
            rtt: None,
            asks: BTreeMap::new(),
            outgoing: VecDeque::new(),
            shortfall: Vec::new(),
            synced,
            sync_since: None,
        }
    }

    /// The path's smoothed RTT (from quinn), which decides whether a repair
    /// answer can still arrive before a block's deadline. Until it is known
    /// the receiver asks for nothing.
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rtt = Some(rtt);
    }

    /// The next repair request datagram to send, if any.
    ///
    /// Each request goes out in [`REPAIR_REQUEST_COPIES`] copies a couple of
    /// milliseconds apart, since any one may be lost; the sender answers each
    /// attempt once. Call after every `handle_*` call until it returns `None`.
    #[must_use]
    pub fn poll_repair(&mut self) -> Option<Bytes> {
        self.outgoing.pop_front()
    }

    /// Starts over on a new connection (a reconnect): stream `stream_id`,
    /// sender clock `sender_us` at `at`. Counters and stall state carry on;
    /// blocks still undelivered from the old connection are counted lost.
    pub fn restart(&mut self, stream_id: u32, sender_us: u64, at: Instant) {
        if let (Some(next), Some(high)) = (self.next_seq, self.highest_seq) {
            if high >= next && !self.ended {
                self.stats.blocks_lost += high - next + 1;
            }
        }
        self.config.stream_id = stream_id;
        self.decoder = Decoder::new(self.config.decoder.clone());
        self.ready.clear();
        self.next_seq = None;
        self.highest_seq = None;
        self.end_seq = None;
        self.end_deadline = None;
        self.ended = false;
        self.newest_ts = 0;
        self.events.clear();
        self.asks.clear();
        self.outgoing.clear();
        // Resuming after an outage: the app has the Reconnected event, and
        // holding back the live edge would lengthen the gap it already had.
        self.synced = true;
        self.set_clock(sender_us, at);
    }

    /// The highest sequence number seen in any datagram since the last
    /// (re)start; every block up to it is delivered, lost, or still pending.
    pub fn highest_seq(&self) -> Option<u64> {
        self.highest_seq
    }

    /// Marks when the viewer started joining (before the handshake), so the
    /// time to the first block (join time) can be reported.
    pub fn start(&mut self, at: Instant) {
        self.started = Some(at);
    }

    /// A stall began (`true`) or ended (`false`) since the last call.
    ///
    /// A stall begins when no block has been delivered for `stall_after`
    /// after the first one, and ends with the next delivered block.
    #[must_use]
    pub fn poll_stall(&mut self) -> Option<bool> {
        self.stall_changes.pop_front()
    }

    /// Tells the receiver that the sender's stream clock read `sender_us` at
    /// local instant `at` (from `Welcome`, corrected by half the RTT): the
    /// initial estimate of the sender clock, which datagrams then correct.
    ///
    /// A block's deadline is `local(ts) + budget` and its reported latency is
    /// `release - local(ts)`, where `local(ts)` is the local instant the sender
    /// clock read the block's timestamp `ts`. That is this estimate, moved
    /// earlier as far as needed that no datagram arrives before it was sent,
    /// and moved with the smallest one-way offset over the last 2 to 4 s to
    /// follow clock drift. So the reported latency is the time from the
    /// publisher taking the bytes to their in-order release, including the
    /// one-way delay, wrong by the estimate's error: on a symmetric path none;
    /// on an asymmetric one half the difference of the two directions (short
    /// when the path toward the viewer is the slow one); and when the estimate
    /// came too late (a retransmitted Welcome), it is the time since the
    /// fastest datagram's arrival instead, without the path's minimum delay.
    ///
    /// Without it, the first datagram's timestamp is taken to be "now", which
    /// hides the one-way delay from the latency figures and the deadlines.
    pub fn set_clock(&mut self, sender_us: u64, at: Instant) {
        self.clock = Some(Clock::new(sender_us, at));
    }

    /// Handles one received datagram at `now`.
    pub fn handle_datagram(&mut self, now: Instant, datagram: Bytes) {
        self.stats.datagrams += 1;
        self.handle_timeout(now);
        let (header, payload) = match ShardHeader::decode_datagram(&datagram) {
            Ok(ok) => ok,
            Err(e) => {
                self.stats.malformed += 1;
                tracing::trace!(error = %e, len = datagram.len(), "malformed datagram");
                return;
            }
        };
        if header.stream_id != self.config.stream_id {
            self.stats.wrong_stream += 1;
            return;
        }
        if self.ended || self.end_seq.is_some_and(|end| header.seq > end) {
            self.stats.out_of_window += 1;
            return;
        }
        // Every valid shard of the stream is a sample of the one-way offset,
        // whatever the decoder makes of it: its arrival is real.
        let clock = self
            .clock
            .get_or_insert_with(|| Clock::new(u64::from(header.timestamp_us), now));
        let ts = clock.unwrap(header.timestamp_us, now);
        clock.observe(ts, now);
        let clock = *clock;
        let deadline = clock.local(ts) + self.config.latency;

        let verdict = self.decoder.insert(&header, payload, deadline);
        // Every valid shard counts, whatever the decoder then makes of it: the
        // server compares this with what it sent to estimate loss on the path.
        // A shard contradicting its block is malformed, not received.
        if verdict != Insert::Inconsistent {
            self.stats.shards_received += 1;
        }
        match verdict {
            Insert::Accepted => {
                self.note_shard(header.seq, now, deadline);
                self.newest_ts = self.newest_ts.max(ts);
                self.highest_seq = Some(self.highest_seq.map_or(header.seq, |h| h.max(header.seq)));
                if self.next_seq.is_none() && !self.synced {
                    // Block 0 is the stream's start: nothing to wait for.
                    self.synced = header.seq == 0;
                    self.sync_since = Some(now);
                }
                self.next_seq.get_or_insert(header.seq);
                tracing::trace!(seq = header.seq, index = header.index, "shard");
            }
            Insert::Surplus => self.stats.surplus += 1,
            Insert::Duplicate => self.stats.duplicates += 1,
            Insert::Late => self.stats.shards_late += 1,
            Insert::OutOfWindow => self.stats.out_of_window += 1,
            Insert::Inconsistent => self.stats.malformed += 1,
        }
        self.drain(now, clock);
    }

    /// Handles expiry of deadlines up to `now`. Call at [`poll_timeout`](Self::poll_timeout).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.decoder.handle_timeout(now);
        if let Some(last) = self.last_delivery {
            let dry = last + self.config.stall_after;
            if self.stall.is_none() && !self.ended && now >= dry {
                // Until `dry` the player was still playing what it had.
                self.stall = Some(dry);
                self.stats.stalls += 1;
                self.stall_changes.push_back(true);
            }
        }
        if let Some(clock) = self.clock {
            self.drain(now, clock);
        } else {
            self.release(now, None);
        }
        self.ask_repairs(now);
        if self.end_deadline.is_some_and(|d| d <= now) {
            // Blocks at the end of the stream of which no shard ever came;
            // the decoder's verdicts on the blocks it holds are in `ready`.
            if let (Some(end), Some(next)) = (self.end_seq, self.next_seq) {
                self.lose_unseen(next, end);
            }
            self.end_deadline = None;
            self.release(now, self.clock);
        }
    }

    /// When to call [`handle_timeout`](Self::handle_timeout) next, if anything is pending.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let stall = match (self.last_delivery, self.stall, self.ended) {
            (Some(last), None, false) => Some(last + self.config.stall_after),
            _ => None,
        };
        // Without an RTT nothing is asked, so nothing needs waking.
        let repair = self
            .asks
            .values()
            .filter(|_| self.rtt.is_some())
            .map(|a| {
                if a.copies_left > 0 {
                    a.next_copy.min(a.check_at)
                } else {
                    a.check_at
                }
            })
            .min();
        [
            self.decoder.poll_timeout(),
            self.end_deadline,
            stall,
            repair,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next event in sequence order, if any is ready.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The sender announced that `last_seq` is the final block (EndOfStream).
    ///
    /// Blocks up to it still get their deadline; any not seen at all are lost
    /// one latency budget from `now`, and then [`Event::End`] follows.
    pub fn end_of_stream(&mut self, last_seq: u64, now: Instant) {
        // No header carries a larger sequence number.
        let last_seq = last_seq.min(MAX_VARINT);
        self.end_seq = Some(self.end_seq.map_or(last_seq, |e| e.min(last_seq)));
        self.end_deadline = Some(now + self.config.latency);
        self.release(now, self.clock);
    }

    /// Whether [`Event::End`] has been emitted.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Counters so far.
    pub fn stats(&self) -> &ReceiverStats {
        &self.stats
    }

    /// The decoder's own counters.
    pub fn decoder_stats(&self) -> crate::fec::DecoderStats {
        self.decoder.stats()
    }

    /// Payload bytes the decoder holds now, never above its
    /// [`max_buffered_bytes`](crate::fec::DecoderConfig::max_buffered_bytes).
    pub fn buffered_bytes(&self) -> usize {
        self.decoder.buffered_bytes()
    }

    /// A [`Report`] for the server: cumulative counters plus latency and bitrate
    /// over the interval since the previous report, which this starts anew.
    pub fn report(&mut self, now: Instant) -> Report {
        let s = &self.stats;
        let bitrate_bps = match self.last_report {
            Some((at, bytes)) => {
                let secs = now.saturating_duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    ((s.bytes_delivered - bytes) as f64 * 8.0 / secs) as u64
                } else {
                    0
                }
            }
            None => 0,
        };
        let q = |h: &Histogram<u64>, q: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(q)
            }
        };
        let buffer_ms = match (self.ready.first_key_value(), self.clock) {
            (Some(_), Some(_)) => {
                let oldest = self.ready.values().find_map(|r| match r {
                    Ready::Block { timestamp_us, .. } => Some(*timestamp_us),
                    Ready::Lost | Ready::Skipped(_) => None,
                });
                oldest.map_or(0, |o| self.newest_ts.saturating_sub(o) / 1000)
            }
            _ => 0,
        };
        let report = Report {
            blocks_delivered: s.blocks_delivered,
            blocks_recovered: s.blocks_recovered,
            blocks_lost: s.blocks_lost,
            shards_late: s.shards_late,
            shards_received: s.shards_received,
            shards_missing: s.shards_missing,
            latency_p50_us: q(&self.interval, 0.5),
            latency_p99_us: q(&self.interval, 0.99),
            buffer_ms,
            bitrate_bps,
            startup_ms: self.startup.map_or(0, |d| d.as_millis() as u64),
            stalls: s.stalls,
            stall_ms: (s.stalled
                + self
                    .stall
                    .map_or(Duration::ZERO, |at| now.saturating_duration_since(at)))
            .as_millis() as u64,
        };
        self.interval.reset();
        self.last_report = Some((now, s.bytes_delivered));
        report
    }

    /// A shard of block `seq`, due by `deadline`, arrived at `now`: the
    /// block (and any block skipped to reach it, never seen) is looked at
    /// again one repair delay from now.
    fn note_shard(&mut self, seq: u64, now: Instant, deadline: Instant) {
        if !self.config.repair {
            return;
        }
        let check_at = now + self.config.repair_delay;
        let window = self.config.decoder.window() as u64;
        let from = match self.highest_seq {
            // Blocks between the highest seen and this one: nothing of them
            // arrived, they may be wholly lost.
            Some(high) if seq > high => (high + 1).max(seq.saturating_sub(window - 1)),
            _ => seq,
        };
        for s in from..=seq {
            let ask = self.asks.entry(s).or_insert_with(|| Ask {
                deadline,
                check_at,
                attempts: 0,
                entries: Vec::new(),
                copies_left: 0,
                next_copy: check_at,
            });
            if ask.attempts == 0 {
                ask.check_at = check_at;
            } else if s == seq {
                // An answer still arriving (the sender spreads it out): look
                // again once it has gone quiet, not while it comes.
                ask.check_at = ask.check_at.max(check_at + super::MAX_ANSWER_SPACING);
            }
        }
        // Bounded by the window: the oldest cannot be in the decoder anymore.
        while self.asks.len() > self.config.decoder.window() {
            self.asks.pop_first();
        }
    }

    /// Sends what is due: first requests for blocks quiet for a repair delay
    /// and still short, repeats for those whose answer did not complete them,
    /// and the copies of both.
    fn ask_repairs(&mut self, now: Instant) {
        let Some(rtt) = self.rtt else {
            return;
        };
        // An answer takes a round trip plus its own spread.
        let answer_time = rtt + self.config.repair_delay;
        let mut batch: Vec<RepairEntry> = Vec::new();
        let mut done = Vec::new();
        for (&seq, ask) in self.asks.iter_mut() {
            if ask.check_at <= now {
                let short = self.decoder.shortfall(seq, &mut self.shortfall).is_some()
                    && !self.shortfall.is_empty();
                if !short {
                    done.push(seq);
                    continue;
                }
                // Past its deadline the decoder gives the block up and the ask
                // goes with it; until then a look every repair delay at most.
                let idle = ask.deadline.max(now + self.config.repair_delay);
                if ask.attempts >= MAX_REPAIR_ATTEMPTS {
                    ask.check_at = idle;
                    ask.copies_left = 0;
                } else if now + answer_time > ask.deadline {
                    if ask.attempts == 0 {
                        self.stats.repairs_too_late += 1;
                        done.push(seq);
                        continue;
                    }
                    // No second round fits, but the block stays known: the
                    // rest of an answer may still arrive, and must not start
                    // a new request of its own.
                    ask.check_at = idle;
                } else {
                    let attempt = ask.attempts;
                    ask.attempts += 1;
                    ask.entries.clear();
                    ask.entries
                        .extend(self.shortfall.iter().map(|&(group, seen)| RepairEntry {
                            seq,
                            group,
                            attempt,
                            seen,
                        }));
                    self.stats.repairs_asked += ask.entries.len() as u64;
                    ask.copies_left = REPAIR_REQUEST_COPIES as u8;
                    ask.next_copy = now;
                    ask.check_at = now + answer_time + REPAIR_COPY_SPACING;
                }
            }
            if ask.copies_left > 0 && ask.next_copy <= now {
                ask.copies_left -= 1;
                ask.next_copy = now + REPAIR_COPY_SPACING;
                batch.extend_from_slice(&ask.entries);
            }
        }
        for seq in done {
            self.asks.remove(&seq);
        }
        for chunk in batch.chunks(MAX_REPAIR_ENTRIES) {
            let mut buf = Vec::with_capacity(3 + chunk.len() * 12);
            if encode_repair(chunk, &mut buf).is_ok() {
                if self.outgoing.len() >= MAX_OUTGOING_REPAIRS {
                    self.outgoing.pop_front();
                }
                self.stats.repair_datagrams += 1;
                self.outgoing.push_back(Bytes::from(buf));
            }
        }
    }

    fn drain(&mut self, now: Instant, clock: Clock) {
        while let Some(out) = self.decoder.poll_outcome() {
            if let BlockResult::Late { .. } = out.result {
                // Always about a block already released as lost.
                self.stats.blocks_late += 1;
                continue;
            }
            if let Some(ask) = self.asks.remove(&out.seq) {
                let delivered = matches!(
                    out.result,
                    BlockResult::Complete(_) | BlockResult::Recovered { .. }
                );
                if delivered && ask.attempts > 0 {
                    self.stats.blocks_repaired += 1;
                }
            }
            if self.next_seq.is_some_and(|next| out.seq < next) {
                continue; // already released; nothing more to say
            }
            let ts = |t: Option<u32>| t.map_or(0, |t| clock.unwrap(t, now));
            let ready = match out.result {
                BlockResult::Complete(data) => Ready::Block {
                    timestamp_us: ts(out.timestamp_us),
                    flags: out.flags,
                    data,
                    recovered: false,
                },
                BlockResult::Recovered { data, rebuilt } => {
                    self.stats.shards_rebuilt += rebuilt as u64;
                    self.stats.shards_missing += rebuilt as u64;
                    Ready::Block {
                        timestamp_us: ts(out.timestamp_us),
                        flags: out.flags,
                        data,
                        recovered: true,
                    }
                }
                BlockResult::Lost { received, needed } => {
                    self.stats.shards_missing += needed.saturating_sub(received) as u64;
                    Ready::Lost
                }
                BlockResult::Late { .. } => continue, // handled above
                BlockResult::Skipped { count } => Ready::Skipped(count),
            };
            self.ready.insert(out.seq, ready);
        }
        self.release(now, Some(clock));
    }

    /// Marks every block in `from..=to` that holds nothing ready as lost:
    /// one [`Ready::Skipped`] run per gap between ready blocks.
    ///
    /// `to` comes from the peer's EndOfStream and may be any varint, so this
    /// costs `O(ready)`, never `O(to - from)`; a run then yields at most a
    /// decoder window of [`Event::Lost`]. Call it with the decoder's outcomes
    /// drained, and release right after: every block up to `to` then has an
    /// entry, so the stream ends and no later outcome lands inside a run.
    /// Requires `to <= MAX_VARINT`.
    fn lose_unseen(&mut self, from: u64, to: u64) {
        let mut seq = from;
        while seq <= to {
            let held = self.ready.range(seq..=to).next().map(|(&s, _)| s);
            let gap_end = held.unwrap_or(to + 1);
            if gap_end > seq {
                self.ready.insert(seq, Ready::Skipped(gap_end - seq));
            }
            seq = gap_end + 1;
        }
    }

    fn release(&mut self, now: Instant, clock: Option<Clock>) {
        while let Some(next) = self.next_seq {
            if self.end_seq.is_some_and(|end| next > end) {
                break;
            }
            let Some(ready) = self.ready.remove(&next) else {
                break;
            };
            self.next_seq = Some(next + 1);
            if !self.synced {
                let waited = self
                    .sync_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.config.sync_wait);
                match &ready {
                    Ready::Block { flags, .. } if flags.contains(Flags::SYNC) || waited => {
                        self.synced = true;
                    }
                    Ready::Skipped(count) => {
                        self.stats.blocks_before_sync += count;
                        self.next_seq = Some(next.saturating_add(*count));
                        continue;
                    }
                    _ => {
                        self.stats.blocks_before_sync += 1;
                        continue;
                    }
                }
            }
            match ready {
                Ready::Block {
                    timestamp_us,
                    flags,
                    data,
                    recovered,
                } => {
                    if let Some(clock) = clock {
                        let latency = now.saturating_duration_since(clock.local(timestamp_us));
                        self.stats.record_latency(latency);
                        let us = (latency.as_micros() as u64).max(1);
                        self.interval.saturating_record(us);
                    }
                    self.stats.blocks_delivered += 1;
                    self.stats.blocks_recovered += u64::from(recovered);
                    self.stats.bytes_delivered += data.len() as u64;
                    self.last_delivery = Some(now);
                    if let (None, Some(started)) = (self.startup, self.started) {
                        self.startup = Some(now.saturating_duration_since(started));
                    }
                    if let Some(at) = self.stall.take() {
                        self.stats.stalled += now.saturating_duration_since(at);
                        self.stall_changes.push_back(false);
                    }
                    self.events.push_back(Event::Block {
                        seq: next,
                        timestamp_us,
                        sync: flags.contains(Flags::SYNC),
                        data,
                    });
                }
                Ready::Lost => {
                    self.stats.blocks_lost += 1;
                    self.events.push_back(Event::Lost { seq: next });
                }
                Ready::Skipped(count) => {
                    self.stats.blocks_lost += count;
                    let window = self.config.decoder.window() as u64;
                    let last = next.saturating_add(count);
                    for seq in last.saturating_sub(window).max(next)..last {
                        self.events.push_back(Event::Lost { seq });
                    }
                    self.next_seq = Some(last);
                }
            }
        }
        let done = match (self.end_seq, self.next_seq) {
            (Some(end), Some(next)) => next > end,
            (Some(_), None) => true,
            _ => false,
        };
        if done && !self.ended {
            self.ended = true;
            self.ready.clear();
            self.events.push_back(Event::End);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fec::{Encoder, FecConfig};
    use rand::{rngs::SmallRng, seq::SliceRandom, Rng, SeedableRng};

    const BUDGET: Duration = Duration::from_millis(100);

    struct Sim {
        encoder: Encoder,
        receiver: Receiver,
        t0: Instant,
    }

    impl Sim {
        fn new() -> Self {
            let mut fec = FecConfig::default();
            fec.set_redundancy(0.25).unwrap();
            let t0 = Instant::now();
            let mut receiver = Receiver::new(ReceiverConfig::new(1, BUDGET));
            receiver.start(t0);
            receiver.set_clock(0, t0);
            Sim {
                encoder: Encoder::new(1, fec),
                receiver,
                t0,
            }
        }

        /// Datagrams of block `seq`, stamped `ts_ms` on the sender clock.
        fn block(&mut self, seq: u64, ts_ms: u64, len: usize, flags: Flags) -> Vec<Bytes> {
            let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ seq) as u8).collect();
            let ts = (ts_ms * 1000) as u32;
            self.encoder
                .encode(seq, ts, flags, &data)
                .unwrap()
                .datagrams()
                .to_vec()
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        fn feed(&mut self, ms: u64, dgs: impl IntoIterator<Item = Bytes>) {
            let now = self.at(ms);
            for dg in dgs {
                self.receiver.handle_datagram(now, dg);
            }
        }

        fn events(&mut self) -> Vec<Event> {
            std::iter::from_fn(|| self.receiver.poll_event()).collect()
        }
    }

    fn repairs(r: &mut Receiver) -> Vec<RepairEntry> {
        let mut all = Vec::new();
        while let Some(dg) = r.poll_repair() {
            let mut out = Vec::new();
            crate::wire::decode_repair(&mut &dg[..], &mut out).unwrap();
            all.extend(out);
        }
        all
    }

    /// Steps the receiver's timer from `from` to `to` ms, collecting requests.
    fn run(s: &mut Sim, from: u64, to: u64) -> Vec<RepairEntry> {
        let mut got = Vec::new();
        for ms in from..=to {
            s.receiver.handle_timeout(s.at(ms));
            got.extend(repairs(&mut s.receiver));
        }
        got
    }

    /// A block rebuilt while an earlier one is still open is not counted
    /// recovered before it is delivered: a report never claims more
    /// recovered than delivered blocks (the server refuses such a report).
    #[test]
    fn recovered_counts_only_delivered_blocks() {
        let mut s = Sim::new();
        let b0 = s.block(0, 0, 5000, Flags::SYNC);
        let b1 = s.block(1, 10, 5000, Flags::empty());
        s.feed(1, b0[..1].to_vec());
        // Block 1 without its first data shard: rebuilt from parity.
        s.feed(11, b1[1..].to_vec());
        let r = s.receiver.report(s.at(12));
        assert_eq!((r.blocks_delivered, r.blocks_recovered), (0, 0));
        s.feed(13, b0[1..].to_vec());
        assert_eq!(seqs(&s.events()), vec![(0, true), (1, true)]);
        let r = s.receiver.report(s.at(14));
        assert_eq!((r.blocks_delivered, r.blocks_recovered), (2, 1));
        assert_eq!(r.shards_missing, 1);
    }

    /// A viewer joining mid-stream starts at the next sync point: what a
    /// media decoder could not start on is passed over, not lost, and a
    /// block lost before the start is not the viewer's loss either.
    #[test]
    fn a_mid_stream_join_starts_at_the_next_sync_point() {
        let mut s = Sim::new();
        for seq in 10..40u64 {
            let flags = if seq % 10 == 0 && seq > 10 {
                Flags::SYNC
            } else {
                Flags::empty()
            };
            let dgs = s.block(seq, seq * 10, 3000, flags);
            if seq != 15 {
                s.feed(seq * 10 + 1, dgs);
            }
        }
        s.receiver.handle_timeout(s.at(600));
        let events = s.events();
        let first = events.iter().find_map(|e| match e {
            Event::Block { seq, sync, .. } => Some((*seq, *sync)),
            _ => None,
        });
        assert_eq!(first, Some((20, true)), "{events:?}");
        assert!(!events.iter().any(|e| matches!(e, Event::Lost { .. })));
        let st = s.receiver.stats();
        assert_eq!(
            (st.blocks_before_sync, st.blocks_delivered, st.blocks_lost),
            (10, 20, 0)
        );
    }

    /// A stream that never marks a sync point is delayed by the wait, never
    /// withheld.
    #[test]
    fn without_sync_points_delivery_starts_after_the_wait() {
        let mut s = Sim::new();
        for seq in 5..305u64 {
            let dgs = s.block(seq, seq * 10, 3000, Flags::empty());
            s.feed(seq * 10 + 1, dgs);
        }
        let first = s.events().iter().find_map(|e| match e {
            Event::Block { seq, .. } => Some(*seq),
            _ => None,
        });
        // The first shard came at 51 ms: 2 s later block 205 is the one released.
        assert_eq!(first, Some(205));
        let st = s.receiver.stats();
        assert_eq!((st.blocks_before_sync, st.blocks_delivered), (200, 100));
        // Off: from the first block seen.
        let mut s = Sim::new();
        let mut config = ReceiverConfig::new(1, BUDGET);
        config.sync_wait(Duration::ZERO);
        s.receiver = Receiver::new(config);
        s.receiver.set_clock(0, s.t0);
        let dgs = s.block(5, 50, 3000, Flags::empty());
        s.feed(51, dgs);
        assert_eq!(seqs(&s.events()), vec![(5, true)]);
    }

    #[test]
    fn asks_once_when_short_again_at_most_once_and_never_too_late() {
        let mut s = Sim::new();
        s.receiver.set_rtt(Duration::from_millis(20));
        // 21 KB at 1100-byte shards: one group of k = 20, m = 5. Only 15 arrive.
        let b0 = s.block(0, 0, 21_056, Flags::SYNC);
        s.feed(20, b0[..15].to_vec());
        assert!(
            repairs(&mut s.receiver).is_empty(),
            "waits its repair delay"
        );
        let first = run(&mut s, 21, 45);
        // Copies of attempt 0, spaced, naming the 15 shards held.
        assert_eq!(first.len(), REPAIR_REQUEST_COPIES as usize, "{first:?}");
        assert!(first
            .iter()
            .all(|e| e.seq == 0 && e.attempt == 0 && e.seen.len() == 15));
        // No answer: one more attempt after a round trip, then no more.
        let second = run(&mut s, 46, 99);
        assert_eq!(second.len(), REPAIR_REQUEST_COPIES as usize, "{second:?}");
        assert!(second.iter().all(|e| e.attempt == 1));
        assert_eq!(s.receiver.stats().repairs_asked, 2);
        // An answer completes it; it counts as repaired.
        s.feed(99, b0[15..20].to_vec());
        assert_eq!(seqs(&s.events()), vec![(0, true)]);
        assert_eq!(s.receiver.stats().blocks_repaired, 1);

        // A block short so late that no answer can arrive is not asked for.
        let b1 = s.block(1, 100, 21_056, Flags::empty());
        s.feed(180, b1[..10].to_vec());
        assert!(run(&mut s, 181, 200).is_empty());
        assert_eq!(s.receiver.stats().repairs_too_late, 1);

        // Repair off: never asks.
        let mut off = Sim::new();
        let mut cfg = ReceiverConfig::new(1, BUDGET);
        cfg.repair(false);
        off.receiver = Receiver::new(cfg);
        off.receiver.set_clock(0, off.t0);
        off.receiver.set_rtt(Duration::from_millis(40));
        let b = off.block(0, 0, 21_056, Flags::SYNC);
        off.feed(20, b[..15].to_vec());
        assert!(run(&mut off, 21, 99).is_empty());
    }

    /// The sender spreads an answer out: while its shards keep arriving the
    /// receiver does not ask again, and an answer still arriving when no
    /// second round fits does not start a request of its own.
    #[test]
    fn an_answer_still_arriving_is_waited_for() {
        let mut s = Sim::new();
        s.receiver.set_rtt(Duration::from_millis(20));
        let b0 = s.block(0, 0, 21_056, Flags::SYNC);
        s.feed(20, b0[..14].to_vec());
        let first = run(&mut s, 21, 45);
        assert_eq!(first.len(), REPAIR_REQUEST_COPIES as usize, "{first:?}");
        // The answer's shards, 6 ms apart from 45 ms: without its quiet the
        // second attempt would be due at 53 ms.
        let mut asked = Vec::new();
        for (i, ms) in (45..=63).step_by(6).enumerate() {
            s.feed(ms, b0[14 + i..15 + i].to_vec());
            asked.extend(run(&mut s, ms + 1, ms + 5));
        }
        assert!(asked.is_empty(), "asked again mid-answer: {asked:?}");
        // Quiet and still short by two: the second attempt, naming 18 shards.
        let second = run(&mut s, 64, 110);
        assert!(!second.is_empty() && second.iter().all(|e| e.attempt == 1 && e.seen.len() == 18));

        // Asked once, answered too late for a second round: the rest of the
        // answer arriving starts no new request.
        let b1 = s.block(1, 200, 21_056, Flags::empty());
        s.feed(250, b1[..14].to_vec());
        assert_eq!(run(&mut s, 251, 282).len(), REPAIR_REQUEST_COPIES as usize);
        s.feed(285, b1[14..16].to_vec());
        assert!(run(&mut s, 286, 299).is_empty());
        assert_eq!(s.receiver.stats().repairs_too_late, 0);
    }

    fn seqs(events: &[Event]) -> Vec<(u64, bool)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Block { seq, .. } => Some((*seq, true)),
                Event::Lost { seq } => Some((*seq, false)),
                Event::End | Event::Reconnected { .. } => None,
            })
            .collect()
    }

    #[test]
    fn releases_in_order_and_loses_at_the_deadline() {
        let mut s = Sim::new();
        let b0 = s.block(0, 0, 5000, Flags::SYNC);
        let b1 = s.block(1, 10, 5000, Flags::empty());
        let b2 = s.block(2, 20, 5000, Flags::empty());
        // Block 1 gets only 2 of its shards: unrecoverable.
        s.feed(5, b0[..1].to_vec());
        s.feed(25, b2.clone());
        s.feed(26, b1[..2].to_vec());
        s.feed(27, b0[1..].to_vec());
        // 0 is ready; 1 is pending, so 2 waits behind it.
        assert_eq!(seqs(&s.events()), vec![(0, true)]);
        // Just before block 1's deadline (10 ms + budget) nothing changes.
        s.receiver.handle_timeout(s.at(109));
        assert!(s.events().is_empty());
        assert_eq!(s.receiver.poll_timeout(), Some(s.at(110)));
        s.receiver.handle_timeout(s.at(110));
        assert_eq!(seqs(&s.events()), vec![(1, false), (2, true)]);
        let st = s.receiver.stats();
        assert_eq!((st.blocks_delivered, st.blocks_lost), (2, 1));
        // Block 2 was held until 110 ms: latency 90 ms, within budget.
        let max = st.latency().max; // hdrhistogram: 3 significant digits
        assert!((89.9..=90.1).contains(&max), "max latency {max}");
        // The rest of block 1 arrives: late, counted, never delivered.
        s.feed(120, b1[2..].to_vec());
        assert!(s.events().is_empty());
        assert_eq!(s.receiver.stats().blocks_late, 1);
    }

    #[test]
    fn random_loss_within_parity_delivers_every_block_exactly() {
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut s = Sim::new();
        let mut sent = Vec::new();
        for seq in 0..200u64 {
            // One code group (up to 32 shards of 1100 bytes).
            let len = rng.random_range(1..=32 * 1100);
            let mut dgs = s.block(seq, seq * 10, len, Flags::empty());
            // Drop up to the group's parity (one group up to 32 data shards).
            let parity = dgs.len() - crate::wire::data_shards_for(len, 1100).min(dgs.len());
            let drop = rng.random_range(0..=parity.min(dgs.len() - 1));
            dgs.shuffle(&mut rng);
            dgs.truncate(dgs.len() - drop);
            sent.push(len);
            s.feed(seq * 10 + 5, dgs);
        }
        s.receiver.handle_timeout(s.at(5000));
        let events = s.events();
        assert_eq!(events.len(), 200, "seed {seed}");
        for (seq, ev) in events.iter().enumerate() {
            match ev {
                Event::Block { seq: got, data, .. } => {
                    assert_eq!(*got, seq as u64, "seed {seed}");
                    assert_eq!(data.len(), sent[seq], "seed {seed}");
                    assert!(
                        data.iter()
                            .enumerate()
                            .all(|(i, b)| *b == (i as u64 ^ seq as u64) as u8),
                        "seed {seed}: block {seq} corrupted"
                    );
                }
                other => panic!("seed {seed}: block {seq}: {other:?}"),
            }
        }
    }

    #[test]
    fn end_of_stream_loses_unseen_tail_then_ends() {
        let mut s = Sim::new();
        let b0 = s.block(0, 0, 3000, Flags::empty());
        s.feed(1, b0);
        // Blocks 1 and 2 were sent but nothing of them arrived.
        s.receiver.end_of_stream(2, s.at(30));
        assert_eq!(seqs(&s.events()), vec![(0, true)]);
        assert!(!s.receiver.is_ended());
        s.receiver.handle_timeout(s.at(130));
        let ev = s.events();
        assert_eq!(seqs(&ev), vec![(1, false), (2, false)]);
        assert_eq!(ev.last(), Some(&Event::End));
        assert!(s.receiver.is_ended());
    }

    /// EndOfStream's `last_seq` comes from the peer. One far beyond the
    /// blocks seen is one run of lost blocks with a window of events, not a
    /// loop per sequence number (the `receiver` fuzz target found that loop
    /// running out of memory for a `last_seq` near 2^62).
    #[test]
    fn end_of_stream_far_ahead_costs_a_window() {
        let mut s = Sim::new();
        let b0 = s.block(0, 0, 3000, Flags::empty());
        let b1 = s.block(1, 10, 3000, Flags::empty());
        let b3 = s.block(3, 30, 3000, Flags::empty());
        s.feed(1, b0);
        s.feed(11, b1[..1].to_vec()); // too few shards to rebuild
        s.feed(31, b3); // block 2: never seen
        s.receiver.end_of_stream(u64::MAX, s.at(40));
        s.receiver.handle_timeout(s.at(140));
        let ev = s.events();
        let window = DecoderConfig::default().window() as u64;
        let mut want = vec![(0, true), (1, false), (2, false), (3, true)];
        want.extend((MAX_VARINT - window + 1..=MAX_VARINT).map(|seq| (seq, false)));
        assert_eq!(seqs(&ev), want);
        assert_eq!(ev.last(), Some(&Event::End));
        assert_eq!(s.receiver.stats().blocks_lost, 2 + (MAX_VARINT - 3));
    }

    #[test]
    fn timestamps_unwrap_across_the_32_bit_wrap() {
        let t0 = Instant::now();
        // The sender clock is just below 2^32 µs when Welcome arrives.
        let base = (1u64 << 32) - 5_000;
        let clock = Clock::new(base, t0);
        let later = t0 + Duration::from_millis(10);
        // 10 ms later the 32-bit stamp has wrapped to 5000.
        assert_eq!(clock.unwrap(5_000, later), (1 << 32) + 5_000);
        assert_eq!(clock.unwrap((base + 1_000) as u32, later), base + 1_000);
        assert_eq!(clock.local((1 << 32) + 5_000), later);
    }

    #[test]
    fn a_gap_in_delivery_is_a_stall_until_the_next_block() {
        let mut s = Sim::new();
        let b0 = s.block(0, 0, 1000, Flags::empty());
        s.feed(20, b0);
        let _ = s.events();
        assert_eq!(s.receiver.poll_stall(), None);
        // Nothing for the stall threshold: a stall begins.
        assert_eq!(s.receiver.poll_timeout(), Some(s.at(520)));
        s.receiver.handle_timeout(s.at(520));
        assert_eq!(s.receiver.poll_stall(), Some(true));
        // Stalled time counts from when the player ran dry, 500 ms after the
        // last block.
        let report = s.receiver.report(s.at(1020));
        assert_eq!((report.stalls, report.stall_ms), (1, 500));
        assert_eq!(report.startup_ms, 20);
        let b1 = s.block(1, 2000, 1000, Flags::empty());
        s.feed(2020, b1);
        assert_eq!(s.receiver.poll_stall(), Some(false));
        assert_eq!(s.receiver.stats().stalled, Duration::from_millis(1500));
        assert_eq!(s.receiver.stats().stalls, 1);
    }

    #[test]
    fn malformed_and_foreign_datagrams_are_counted_and_dropped() {
        let mut s = Sim::new();
        let mut other = Encoder::new(9, FecConfig::default());
        let foreign = other.encode(0, 0, Flags::empty(), &[1; 100]).unwrap();
        s.feed(1, foreign.datagrams().to_vec());
        s.feed(
            1,
            [
                Bytes::new(),
                Bytes::from_static(&[1, 0, 0]),
                Bytes::from_static(&[9; 40]),
            ],
        );
        let st = s.receiver.stats();
        assert_eq!(st.wrong_stream, foreign.datagrams().len() as u64);
        assert_eq!(st.malformed, 3);
        assert!(s.events().is_empty());
    }
}

/// The viewer's clock on a moved clock: late estimates, drift, asymmetric
/// paths and slower paths, each against the true send instants.
#[cfg(test)]
mod clock_tests {
    use super::*;
    use crate::fec::{Encoder, FecConfig};
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    const BUDGET: Duration = Duration::from_millis(100);
    /// Sender clock at the viewer's `t0`: 30 min short of the 32-bit wrap, so
    /// an hour-long run crosses it.
    const S0: u64 = (1 << 32) - 1_800_000_000;
    const MS: i64 = 1000;

    /// A sender and the path from it to the viewer.
    struct Path {
        t0: Instant,
        /// How much faster the sender's clock runs than the viewer's.
        ppm: f64,
        /// One-way delay toward the viewer, µs, plus up to `jitter_us`.
        down_us: u64,
        jitter_us: u64,
        rng: SmallRng,
        encoder: Encoder,
        seed: u64,
    }

    impl Path {
        fn new(ppm: f64, down_ms: u64) -> Self {
            let seed = crate::testing::seed();
            Path {
                t0: Instant::now(),
                ppm,
                down_us: down_ms * 1000,
                jitter_us: 5_000,
                rng: SmallRng::seed_from_u64(seed),
                encoder: Encoder::new(1, FecConfig::default()),
                seed,
            }
        }

        /// Local instant at which the sender clock read `ts`.
        fn sent(&self, ts: u64) -> Instant {
            let secs = (ts - S0) as f64 / 1e6 / (1.0 + self.ppm * 1e-6);
            self.t0 + Duration::from_secs_f64(secs)
        }

        /// The sender clock at local instant `at`.
        fn sender_at(&self, at: Instant) -> u64 {
            let secs = at.duration_since(self.t0).as_secs_f64();
            S0 + (secs * 1e6 * (1.0 + self.ppm * 1e-6)).round() as u64
        }

        /// Block `seq`, stamped `ts`: 2 data + 1 parity shards with their
        /// arrival instants, in arrival order.
        fn block(&mut self, seq: u64, ts: u64) -> Vec<(Instant, Bytes)> {
            let block = self
                .encoder
                .encode(seq, ts as u32, Flags::empty(), &[seq as u8; 2000])
                .unwrap();
            let sent = self.sent(ts);
            let mut out: Vec<_> = block
                .datagrams()
                .iter()
                .map(|dg| {
                    let us = self.down_us + self.rng.random_range(0..=self.jitter_us);
                    (sent + Duration::from_micros(us), dg.clone())
                })
                .collect();
            out.sort_by_key(|(at, _)| *at);
            out
        }
    }

    /// `a - b` in µs.
    fn diff_us(a: Instant, b: Instant) -> i64 {
        match a.checked_duration_since(b) {
            Some(d) => d.as_micros() as i64,
            None => -(b.duration_since(a).as_micros() as i64),
        }
    }

    /// What a [`drive`] saw.
    struct Run {
        receiver: Receiver,
        /// Largest |reported - true| median latency over 10 s report intervals, µs.
        worst_p50_error_us: i64,
        /// Mapping error `local(ts) - sent(ts)` of each block at its first
        /// shard (positive: deadline later than the truth), µs.
        errors_us: Vec<i64>,
    }

    /// Sends blocks `seqs` through `path` into `receiver`, one per
    /// `interval_ms` of the sender's clock from `start` (sender µs), and
    /// compares the mapping and the reports with the truth.
    fn drive(
        path: &mut Path,
        receiver: Receiver,
        start: u64,
        seqs: std::ops::Range<u64>,
        interval_ms: u64,
    ) -> Run {
        let mut run = Run {
            receiver,
            worst_p50_error_us: 0,
            errors_us: Vec::new(),
        };
        let mut truth = Vec::new();
        let mut next_report = None;
        let first = seqs.start;
        for seq in seqs {
            let ts = start + (seq - first) * interval_ms * 1000;
            for (i, (at, dg)) in path.block(seq, ts).into_iter().enumerate() {
                run.receiver.handle_datagram(at, dg);
                if i == 0 {
                    let clock = run.receiver.clock.expect("a clock after a datagram");
                    run.errors_us.push(diff_us(clock.local(ts), path.sent(ts)));
                }
                while let Some(ev) = run.receiver.poll_event() {
                    if let Event::Block { timestamp_us, .. } = ev {
                        truth.push(diff_us(at, path.sent(timestamp_us)));
                    }
                }
                let due = *next_report.get_or_insert(at + Duration::from_secs(10));
                if at >= due && !truth.is_empty() {
                    let report = run.receiver.report(at);
                    truth.sort_unstable();
                    let true_p50 = truth[(truth.len() - 1) / 2];
                    let error = (report.latency_p50_us as i64 - true_p50).abs();
                    run.worst_p50_error_us = run.worst_p50_error_us.max(error);
                    truth.clear();
                    next_report = Some(due + Duration::from_secs(10));
                }
            }
        }
        run
    }

    fn receiver(sender_us: u64, at: Instant) -> Receiver {
        let mut r = Receiver::new(ReceiverConfig::new(1, BUDGET));
        r.set_clock(sender_us, at);
        r
    }

    /// The Welcome's first transmission was lost and the retransmission came
    /// 300 ms later: the estimate maps every timestamp 300 ms late. The first
    /// datagram pulls it back (nothing arrives before it was sent), so a
    /// block that cannot be rebuilt is given up near its true deadline, not
    /// 300 ms after it, and no block is lost to the moves of the clock.
    /// An estimate far too early (Welcome's clock plus half an RTT that was
    /// inflated when it was read) would put every deadline before its
    /// shards arrive, and the mapping only moves later at 500 ppm: one field
    /// run at 10% loss delivered nothing for 20 s. It steps instead.
    #[test]
    fn an_estimate_far_too_early_steps_to_the_datagrams() {
        let mut path = Path::new(0.0, 20);
        let seed = path.seed;
        let read = path.t0 + Duration::from_millis(20);
        // The estimate says the sender is 400 ms ahead of where it is.
        let mut r = receiver(S0 + 420_000, read);
        r.start(read);
        let start = path.sender_at(read);
        let run = drive(&mut path, r, start, 0..300, 33);
        let st = run.receiver.stats();
        // The first datagram steps the mapping: no block is lost to it. (It
        // once waited for two epochs, 4 s and about 120 blocks, all lost; a
        // test viewer at 10% loss whose handshake lost a packet lost 2 s.)
        assert!(
            st.blocks_delivered == 300,
            "seed {seed}: {} delivered, {} lost",
            st.blocks_delivered,
            st.blocks_lost
        );
        let settled = *run.errors_us.last().unwrap();
        assert!(
            (0..=25 * MS).contains(&settled),
            "seed {seed}: mapping {settled} µs off the send time"
        );
    }

    #[test]
    fn a_late_welcome_is_undone_by_the_first_datagrams() {
        let mut path = Path::new(0.0, 20);
        let seed = path.seed;
        // Welcome written at t0, read 20 ms + 300 ms later; half the RTT is
        // 20 ms on this path.
        let read = path.t0 + Duration::from_millis(320);
        let mut r = receiver(S0 + 20_000, read);
        // Before any datagram the estimate is 300 ms late.
        let late = diff_us(
            r.clock.unwrap().local(S0 + 400_000),
            path.sent(S0 + 400_000),
        );
        assert!((299 * MS..=301 * MS).contains(&late), "seed {seed}: {late}");
        r.start(read);
        // The stream starts when the viewer reads Welcome.
        let start = path.sender_at(read);
        let mut run = drive(&mut path, r, start, 0..300, 33);
        let st = run.receiver.stats();
        assert_eq!(
            (st.blocks_delivered, st.blocks_lost),
            (300, 0),
            "seed {seed}"
        );
        // Mapped no later than the fastest datagram allows: the one-way delay
        // plus the least jitter, never the 300 ms.
        let worst = *run.errors_us[1..].iter().max().unwrap();
        assert!(worst <= 25 * MS, "seed {seed}: mapping {worst} µs late");
        let settled = run.errors_us.last().unwrap();
        assert!(
            (20 * MS..=21 * MS).contains(settled),
            "seed {seed}: {settled}"
        );
        // A block of which only one of its two data shards arrives is given
        // up at its deadline as the corrected clock puts it.
        let ts = start + 300 * 33_000;
        let shards = path.block(300, ts);
        let (first, dg) = shards[0].clone();
        run.receiver.handle_datagram(first, dg);
        let deadline = run.receiver.poll_timeout().expect("a pending block");
        let late = diff_us(deadline, path.sent(ts) + BUDGET);
        assert!((20 * MS..=21 * MS).contains(&late), "seed {seed}: {late}");
        run.receiver.handle_timeout(deadline);
        assert_eq!(run.receiver.poll_event(), Some(Event::Lost { seq: 300 }));
    }

    /// 100 ppm in either direction is 360 ms over an hour, more than three
    /// budgets. Tracked, no block is lost and the reported latency stays
    /// within 2 ms of the truth the whole hour (with the untracked estimate
    /// the slow sender's blocks would all be lost after about 17 minutes, and
    /// the fast sender's latency would show the one-way delay less).
    #[test]
    fn clock_drift_either_way_is_followed_for_an_hour() {
        for ppm in [100.0, -100.0] {
            let mut path = Path::new(ppm, 20);
            let seed = path.seed;
            // The estimate is right at t0 (a symmetric path).
            let r = receiver(S0, path.t0);
            let blocks = 36_000; // an hour at 10 blocks/s, 3 datagrams each
            let run = drive(&mut path, r, S0 + 1000, 0..blocks, 100);
            let st = run.receiver.stats();
            assert_eq!(
                (st.blocks_delivered, st.blocks_lost, st.shards_late),
                (blocks, 0, 0),
                "seed {seed}, {ppm} ppm"
            );
            let worst = run.errors_us.iter().map(|e| e.abs()).max().unwrap();
            assert!(
                worst <= 2 * MS,
                "seed {seed}, {ppm} ppm: mapping off by {worst} µs"
            );
            assert!(
                run.worst_p50_error_us <= 2 * MS,
                "seed {seed}, {ppm} ppm: latency off by {} µs",
                run.worst_p50_error_us
            );
        }
    }

    /// 20 ms toward the viewer, nothing back. With the estimate right the
    /// latency shown is the one-way delay. With Welcome + RTT/2 the estimate is
    /// 10 ms off, toward later deadlines on this path and earlier ones on the
    /// mirrored path; tracking never makes either worse than that error.
    #[test]
    fn an_asymmetric_path_keeps_the_estimate_error_and_no_more() {
        // The estimate right: latency is the one-way delay plus jitter.
        let mut path = Path::new(0.0, 20);
        let seed = path.seed;
        let r = receiver(S0, path.t0);
        let run = drive(&mut path, r, S0 + 1000, 0..600, 100);
        let p50 = run.receiver.stats().latency().p50;
        assert!((21.0..=24.0).contains(&p50), "seed {seed}: p50 {p50} ms");
        assert!(run.worst_p50_error_us <= 2 * MS, "seed {seed}");
        assert!(run.errors_us.iter().all(|e| e.abs() <= MS), "seed {seed}");

        // Welcome + RTT/2, RTT 20 ms: written at t0, read at t0 + 20 ms as
        // S0 + 10 ms. Mapped 10 ms late: deadlines later, latency short.
        let mut path = Path::new(0.0, 20);
        let read = path.t0 + Duration::from_millis(20);
        let r = receiver(S0 + 10_000, read);
        let run = drive(&mut path, r, S0 + 30_000, 0..600, 100);
        let (lo, hi) = minmax(&run.errors_us);
        assert!(
            9 * MS <= lo && hi <= 11 * MS,
            "seed {}: {lo}..{hi}",
            path.seed
        );
        assert_eq!(run.receiver.stats().blocks_lost, 0);

        // Mirrored: nothing toward the viewer, 20 ms back. Welcome read at t0
        // as S0 + 10 ms: mapped 10 ms early, and never earlier than that.
        let mut path = Path::new(0.0, 0);
        let r = receiver(S0 + 10_000, path.t0);
        let run = drive(&mut path, r, S0 + 1000, 0..600, 100);
        let (lo, hi) = minmax(&run.errors_us);
        assert!(
            -11 * MS <= lo && hi <= -9 * MS,
            "seed {}: {lo}..{hi}",
            path.seed
        );
        assert_eq!(run.receiver.stats().blocks_lost, 0);
    }

    fn minmax(v: &[i64]) -> (i64, i64) {
        (*v.iter().min().unwrap(), *v.iter().max().unwrap())
    }

    /// A path that becomes 30 ms slower for good is latency to report, not
    /// drift to follow at once: the mapping moves later no faster than
    /// [`CLOCK_MAX_SLEW_PPM`], so the next 10 s show the added delay.
    #[test]
    fn a_slower_path_shows_as_latency_before_it_is_absorbed() {
        let mut path = Path::new(0.0, 20);
        let seed = path.seed;
        let r = receiver(S0, path.t0);
        let before = drive(&mut path, r, S0 + 1000, 0..100, 100);
        path.down_us += 30_000;
        let start = S0 + 1000 + 100 * 100_000;
        let after = drive(&mut path, before.receiver, start, 100..200, 100);
        // 10 s at 500 ppm: at most 5 ms of the 30 ms absorbed.
        let moved = *after.errors_us.iter().max().unwrap();
        assert!(
            moved <= 5 * MS + MS,
            "seed {seed}: moved {moved} µs in 10 s"
        );
        let p99 = after.receiver.stats().latency().p99;
        assert!(
            p99 >= 45.0,
            "seed {seed}: p99 {p99} ms hides the slower path"
        );
    }
}
