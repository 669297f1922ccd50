//! [`Decoder`]: shards in, in any order and with any losses; block outcomes out.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::codec::CodecCache;
use super::{data_shards_for, group_span, DecoderConfig, MAX_BLOCK_LEN, MAX_GROUP_DATA_SHARDS};
use crate::wire::{Flags, ShardHeader, ShardSet, MAX_SHARDS};

/// Bytes charged per held shard on top of its payload: the bookkeeping entry
/// and the datagram header its [`Bytes`] keeps alive. Keeps tiny shards from
/// slipping under [`DecoderConfig::max_buffered_bytes`].
const SHARD_OVERHEAD: usize = 64;

/// A recycled slot keeps its buffers unless they grew past these (a peer's
/// one huge block should not pin memory for the rest of the stream).
const KEEP_SHARD_ENTRIES: usize = 1024;
const KEEP_GROUP_ENTRIES: usize = 16;

/// What [`Decoder::insert`] did with a shard. Every variant but
/// [`Accepted`](Self::Accepted) means the payload was dropped; each is
/// counted in [`DecoderStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Insert {
    /// Stored; the block may have finished with it (see
    /// [`Decoder::poll_outcome`]).
    Accepted,
    /// This shard of this block arrived before.
    Duplicate,
    /// A new shard the block no longer needs: the block was already delivered
    /// or the shard's group already had `k` shards. Normal when the network
    /// loses less than the parity covers; a high share means parity to spare.
    Surplus,
    /// The block was already given up as lost; late data is never delivered.
    /// Once enough late shards arrive to rebuild it, a [`BlockResult::Late`]
    /// outcome reports it.
    Late,
    /// The block is older than the window (or older than the first block
    /// seen), so it can no longer be classified.
    OutOfWindow,
    /// The header contradicts itself (its `k` does not fit its block length,
    /// shard size and group) or the first shard seen of its block: a different
    /// `k`, `m`, group count, block length, timestamp, flags, stream or shard
    /// size. Such a shard could corrupt the rebuild, so it is refused.
    Inconsistent,
}

/// The fate of one block (or of a run of blocks never seen), from
/// [`Decoder::poll_outcome`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Sequence number of the block (the first of the run for
    /// [`BlockResult::Skipped`]).
    pub seq: u64,
    /// Sender timestamp of the block; `None` when no shard of it arrived.
    pub timestamp_us: Option<u32>,
    /// Flags of the block; empty when no shard of it arrived.
    pub flags: Flags,
    /// What happened to it.
    pub result: BlockResult,
}

/// What happened to a block.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockResult {
    /// Every data shard arrived; the block, exactly as sent.
    Complete(Bytes),
    /// Some data shards were lost and rebuilt from parity.
    Recovered {
        /// The block, exactly as sent.
        data: Bytes,
        /// Data shards rebuilt.
        rebuilt: usize,
    },
    /// Given up: at its deadline, or pushed out by the window or the memory
    /// bound, some code group had fewer than `k` shards.
    Lost {
        /// Distinct shards that had arrived.
        received: usize,
        /// Data shards of the whole block (the shards needed, were they all
        /// data); 0 when no shard arrived, since then its size is unknown.
        needed: usize,
    },
    /// A block reported [`Lost`](Self::Lost) earlier has since gathered
    /// enough shards to be rebuilt. Its data is not delivered: it is late.
    Late {
        /// Distinct shards that have arrived, in time or not.
        received: usize,
    },
    /// `count` consecutive blocks from `seq` on were never seen and fell
    /// behind the window at once, because a shard far ahead arrived. Stands
    /// for `count` [`Lost`](Self::Lost) outcomes, so a forward jump costs
    /// `O(window)` whatever its size.
    Skipped {
        /// Blocks in the run.
        count: u64,
    },
}

/// Counters of everything a [`Decoder`] has seen. Every dropped shard and
/// every lost block is counted here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DecoderStats {
    /// Shards stored ([`Insert::Accepted`]).
    pub shards_accepted: u64,
    /// Shards that arrived twice ([`Insert::Duplicate`]).
    pub shards_duplicate: u64,
    /// Shards not needed ([`Insert::Surplus`]).
    pub shards_surplus: u64,
    /// Shards for blocks already given up ([`Insert::Late`]).
    pub shards_late: u64,
    /// Shards for blocks behind the window ([`Insert::OutOfWindow`]).
    pub shards_out_of_window: u64,
    /// Shards refused as inconsistent ([`Insert::Inconsistent`]).
    pub shards_inconsistent: u64,
    /// Blocks delivered with every data shard received.
    pub blocks_complete: u64,
    /// Blocks delivered after rebuilding lost data shards.
    pub blocks_recovered: u64,
    /// Blocks given up, including those in [`BlockResult::Skipped`] runs.
    pub blocks_lost: u64,
    /// Lost blocks that became decodable too late.
    pub blocks_late: u64,
    /// Data shards rebuilt from parity.
    pub shards_rebuilt: u64,
    /// Unfinished blocks given up because newer blocks pushed them out of
    /// the window (also counted in `blocks_lost`).
    pub evicted_window: u64,
    /// Unfinished blocks given up to respect
    /// [`DecoderConfig::max_buffered_bytes`] (also counted in `blocks_lost`).
    pub evicted_memory: u64,
}

/// Reassembles blocks from shards, rebuilding lost data shards from parity.
///
/// One decoder per stream. Feed it every shard with [`insert`](Self::insert),
/// drive its deadlines with [`poll_timeout`](Self::poll_timeout) and
/// [`handle_timeout`](Self::handle_timeout), and drain
/// [`poll_outcome`](Self::poll_outcome) after each of those calls.
///
/// It tracks the blocks from the highest sequence number seen back over the
/// [window](DecoderConfig::set_window). A block finishes as soon as each of its
/// code groups has `k` distinct shards: if all data shards arrived they are
/// just copied out, otherwise the missing ones are rebuilt. A block still
/// unfinished at its deadline, or pushed out of the window or the
/// [memory bound](DecoderConfig::set_max_buffered_bytes), is lost. Finished
/// blocks keep a small record (no payload) until they leave the window, so
/// later shards are told apart as duplicate, surplus or late.
///
/// Shards for sequence numbers never seen create placeholders, so every
/// sequence number from the first one seen gets exactly one outcome.
///
/// Nothing here panics on input from the network: whatever a header claims,
/// it is checked before it is used.
#[derive(Debug)]
pub struct Decoder {
    config: DecoderConfig,
    codecs: CodecCache,
    /// Slot `i` is block `base + i`; never longer than the window.
    slots: VecDeque<Slot>,
    /// Sequence number of `slots[0]`; `None` until the first shard.
    base: Option<u64>,
    /// Reset slots kept for reuse, so steady state allocates no slots.
    spare: Vec<Slot>,
    outcomes: VecDeque<Outcome>,
    /// Bytes charged for held shards (payload plus [`SHARD_OVERHEAD`] each).
    buffered: usize,
    /// Earliest deadline of a pending slot, valid unless `earliest_stale`.
    earliest: Option<Instant>,
    earliest_stale: bool,
    /// Parity copies and the partial last shard for a rebuild; reused.
    scratch: Vec<u8>,
    stats: DecoderStats,
}

impl Decoder {
    /// A decoder holding at most what `config` allows.
    pub fn new(config: DecoderConfig) -> Self {
        Self {
            config,
            codecs: CodecCache::default(),
            slots: VecDeque::new(),
            base: None,
            spare: Vec::new(),
            outcomes: VecDeque::new(),
            buffered: 0,
            earliest: None,
            earliest_stale: false,
            scratch: Vec::new(),
            stats: DecoderStats::default(),
        }
    }

    /// The bounds this decoder enforces.
    pub fn config(&self) -> &DecoderConfig {
        &self.config
    }

    /// Counters so far.
    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    /// Bytes currently charged for held shards: payload plus a small fixed
    /// overhead per shard, as bounded by
    /// [`DecoderConfig::max_buffered_bytes`].
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Offers one shard: `header` and `payload` as returned by
    /// [`ShardHeader::decode_datagram`].
    ///
    /// `deadline` is when the shard's block is given up if still unfinished;
    /// the first shard of a block sets it. When a shard is the first of a
    /// sequence number beyond the highest seen, the blocks in between, never
    /// seen, get placeholders with this same deadline.
    ///
    /// Call [`poll_outcome`](Self::poll_outcome) afterwards: this shard may
    /// have finished its block, and older blocks may have been pushed out.
    pub fn insert(&mut self, header: &ShardHeader, payload: Bytes, deadline: Instant) -> Insert {
        let result = self.insert_inner(header, payload, deadline);
        let counter = match result {
            Insert::Accepted => &mut self.stats.shards_accepted,
            Insert::Duplicate => &mut self.stats.shards_duplicate,
            Insert::Surplus => &mut self.stats.shards_surplus,
            Insert::Late => &mut self.stats.shards_late,
            Insert::OutOfWindow => &mut self.stats.shards_out_of_window,
            Insert::Inconsistent => &mut self.stats.shards_inconsistent,
        };
        *counter += 1;
        if result != Insert::Accepted {
            tracing::trace!(
                seq = header.seq,
                index = header.index,
                ?result,
                "shard dropped"
            );
        }
        result
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called: the
    /// earliest deadline of an unfinished block, or `None` when there is none.
    ///
    /// Call it after every [`insert`](Self::insert) and
    /// [`handle_timeout`](Self::handle_timeout) and (re)arm the timer with the
    /// result; it can move earlier as well as later.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        if self.earliest_stale {
            self.earliest = self
                .slots
                .iter()
                .filter(|s| s.state == State::Pending)
                .map(|s| s.deadline)
                .min();
            self.earliest_stale = false;
        }
        self.earliest
    }

    /// Gives up every unfinished block whose deadline is at or before `now`,
    /// reporting it as [`BlockResult::Lost`].
    ///
    /// Call it when the timer from [`poll_timeout`](Self::poll_timeout) fires
    /// (calling it earlier or more often is harmless), then drain
    /// [`poll_outcome`](Self::poll_outcome).
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.poll_timeout() {
            Some(earliest) if earliest <= now => {}
            _ => return,
        }
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.state == State::Pending && slot.deadline <= now {
                self.lose(i);
            }
        }
    }

    /// The next block outcome, in the order blocks finish (not sequence
    /// order), or `None` when there is none yet.
    ///
    /// Call it until it returns `None` after every [`insert`](Self::insert)
    /// and [`handle_timeout`](Self::handle_timeout): outcomes wait in a queue
    /// that only this drains.
    #[must_use]
    pub fn poll_outcome(&mut self) -> Option<Outcome> {
        self.outcomes.pop_front()
    }

    /// What block `seq` still lacks, for a repair request: every code group of
    /// it holding fewer than `k` shards, with the indices it holds. `None` when
    /// the block is not pending (finished, lost, or outside the window).
    ///
    /// A block of which no shard arrived yet (a placeholder) reports one
    /// entry, group 0 with nothing held, since its group count is unknown.
    pub fn shortfall(&self, seq: u64, out: &mut Vec<(u8, ShardSet)>) -> Option<()> {
        out.clear();
        let i = usize::try_from(seq.checked_sub(self.base?)?).ok()?;
        let slot = self.slots.get(i)?;
        if slot.state != State::Pending {
            return None;
        }
        if slot.meta.is_none() {
            out.push((0, ShardSet::default()));
            return Some(());
        }
        for (g, group) in slot.groups.iter().enumerate() {
            if !group.ready() {
                // At most 255 groups, as `Split::of` checked.
                out.push((g as u8, ShardSet(group.seen)));
            }
        }
        Some(())
    }

    fn insert_inner(&mut self, h: &ShardHeader, payload: Bytes, deadline: Instant) -> Insert {
        let Some(split) = Split::of(h, payload.len()) else {
            return Insert::Inconsistent;
        };
        let base = *self.base.get_or_insert(h.seq);
        let Some(offset) = h.seq.checked_sub(base) else {
            return Insert::OutOfWindow;
        };
        if offset >= self.slots.len() as u64 {
            self.advance_to(h.seq, deadline);
        }
        // `advance_to` keeps `h.seq` inside the window.
        let base = self.base.unwrap_or(h.seq);
        let i = (h.seq - base) as usize;

        let meta = Meta::of(h, payload.len());
        let slot = &mut self.slots[i];
        match slot.meta {
            None => {
                slot.init(meta, &split);
                if slot.state == State::Pending {
                    // A placeholder's deadline was borrowed from a later block.
                    slot.deadline = deadline;
                    self.earliest_stale = true;
                }
            }
            Some(first) if first != meta => return Insert::Inconsistent,
            Some(_) => {}
        }
        let Some(group) = slot.groups.get_mut(usize::from(h.group)) else {
            return Insert::Inconsistent;
        };
        match group.m {
            Some(m) if m != h.m => return Insert::Inconsistent,
            Some(_) => {}
            None => group.m = Some(h.m),
        }
        if !group.mark(h.index) {
            return Insert::Duplicate;
        }
        match slot.state {
            State::Delivered => Insert::Surplus,
            State::LateReported => Insert::Late,
            State::Lost => {
                if group.add() {
                    slot.groups_ready += 1;
                }
                slot.received += 1;
                if slot.groups_ready == slot.groups.len() {
                    slot.state = State::LateReported;
                    let received = slot.received;
                    self.stats.blocks_late += 1;
                    self.push_outcome(i, BlockResult::Late { received });
                }
                Insert::Late
            }
            State::Pending if group.ready() => {
                slot.received += 1;
                Insert::Surplus
            }
            State::Pending => {
                if group.add() {
                    slot.groups_ready += 1;
                }
                slot.received += 1;
                let charge = payload.len() + SHARD_OVERHEAD;
                slot.bytes += charge;
                self.buffered += charge;
                slot.shards.push(Stored {
                    key: u16::from(h.group) << 8 | u16::from(h.index),
                    payload,
                });
                if slot.groups_ready == slot.groups.len() {
                    self.finish(i);
                } else {
                    self.enforce_memory();
                }
                Insert::Accepted
            }
        }
    }

    /// Makes room for `seq`, beyond the last slot: drops slots that fall
    /// behind the window (giving up unfinished ones) and adds placeholders up
    /// to `seq`. `O(window)` however far ahead `seq` is.
    fn advance_to(&mut self, seq: u64, deadline: Instant) {
        let window = self.config.window() as u64;
        let mut base = self.base.unwrap_or(seq);
        let offset = seq - base;
        if offset >= window {
            let drop = offset - window + 1;
            let existing = self.slots.len() as u64;
            for _ in 0..drop.min(existing) {
                if self
                    .slots
                    .front()
                    .is_some_and(|s| s.state == State::Pending)
                {
                    self.stats.evicted_window += 1;
                    self.lose(0);
                }
                if let Some(mut slot) = self.slots.pop_front() {
                    self.buffered -= slot.bytes;
                    slot.reset();
                    self.spare.push(slot);
                }
                base += 1;
                // `lose` reports the front slot's sequence number from `base`.
                self.base = Some(base);
            }
            if drop > existing {
                let count = drop - existing;
                self.stats.blocks_lost += count;
                self.outcomes.push_back(Outcome {
                    seq: base,
                    timestamp_us: None,
                    flags: Flags::empty(),
                    result: BlockResult::Skipped { count },
                });
                base += count;
            }
            self.base = Some(base);
            self.earliest_stale = true;
        }
        while (self.slots.len() as u64) <= seq - base {
            let slot = match self.spare.pop() {
                Some(mut slot) => {
                    slot.deadline = deadline;
                    slot
                }
                None => Slot::new(deadline),
            };
            self.slots.push_back(slot);
        }
        if !self.earliest_stale {
            self.earliest = Some(self.earliest.map_or(deadline, |e| e.min(deadline)));
        }
    }

    /// Rebuilds the pending block in slot `i`, whose every group has `k`
    /// shards, and reports it.
    fn finish(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let assembled = assemble(slot, &mut self.codecs, &mut self.scratch);
        let (received, needed) = (slot.received, slot.needed);
        self.buffered -= slot.bytes;
        slot.release();
        slot.state = if assembled.is_some() {
            State::Delivered
        } else {
            State::Lost
        };
        let result = match assembled {
            Some((data, 0)) => {
                self.stats.blocks_complete += 1;
                BlockResult::Complete(data)
            }
            Some((data, rebuilt)) => {
                self.stats.blocks_recovered += 1;
                self.stats.shards_rebuilt += rebuilt as u64;
                BlockResult::Recovered { data, rebuilt }
            }
            None => {
                // Cannot happen for shards that passed the checks in
                // `insert`; if it does, losing the block beats wrong data.
                tracing::trace!(seq = self.seq_of(i), "rebuild failed");
                self.stats.blocks_lost += 1;
                BlockResult::Lost { received, needed }
            }
        };
        self.earliest_stale = true;
        self.push_outcome(i, result);
    }

    /// Gives up the pending block in slot `i`.
    fn lose(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        self.buffered -= slot.bytes;
        slot.release();
        slot.state = State::Lost;
        let result = BlockResult::Lost {
            received: slot.received,
            needed: slot.needed,
        };
        self.stats.blocks_lost += 1;
        self.earliest_stale = true;
        self.push_outcome(i, result);
    }

    /// Gives up the oldest unfinished blocks holding data until the held
    /// bytes fit the bound again.
    fn enforce_memory(&mut self) {
        while self.buffered > self.config.max_buffered_bytes() {
            let Some(i) = self
                .slots
                .iter()
                .position(|s| s.state == State::Pending && s.bytes > 0)
            else {
                break;
            };
            self.stats.evicted_memory += 1;
            self.lose(i);
        }
    }

    fn seq_of(&self, i: usize) -> u64 {
        self.base.unwrap_or(0) + i as u64
    }

    fn push_outcome(&mut self, i: usize, result: BlockResult) {
        let seq = self.seq_of(i);
        let meta = self.slots[i].meta;
        self.outcomes.push_back(Outcome {
            seq,
            timestamp_us: meta.map(|m| m.timestamp_us),
            flags: meta.map_or(Flags::empty(), |m| m.flags),
            result,
        });
    }
}

/// What every shard of a block must agree on, fixed by its first shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    stream_id: u32,
    timestamp_us: u32,
    flags: Flags,
    block_len: u32,
    groups: u8,
    shard_size: usize,
}

impl Meta {
    fn of(h: &ShardHeader, shard_size: usize) -> Self {
        Self {
            stream_id: h.stream_id,
            timestamp_us: h.timestamp_us,
            flags: h.flags,
            block_len: h.block_len,
            groups: h.groups,
            shard_size,
        }
    }
}

/// A header checked against itself: the data shard count its block length
/// and shard size imply, split as `wire` splits it.
struct Split {
    total: usize,
    groups: usize,
}

impl Split {
    /// `None` when the header cannot describe a real shard. `decode_datagram`
    /// checks most of this already; a caller may build headers by hand, and
    /// the rebuild relies on every one of these facts.
    fn of(h: &ShardHeader, shard_size: usize) -> Option<Self> {
        let (k, m, index) = (usize::from(h.k), usize::from(h.m), usize::from(h.index));
        let (group, groups) = (usize::from(h.group), usize::from(h.groups));
        let block_len = h.block_len as usize;
        if shard_size == 0
            || k == 0
            || k + m > MAX_SHARDS
            || index >= k + m
            || group >= groups
            || block_len > MAX_BLOCK_LEN
        {
            return None;
        }
        let total = data_shards_for(block_len, shard_size);
        // Every group needs at least one and at most 255 data shards.
        if groups > total || total > groups * MAX_GROUP_DATA_SHARDS {
            return None;
        }
        (group_span(total, groups, group).1 == k).then_some(Self { total, groups })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Collecting shards (a placeholder until its first shard sets `meta`).
    #[default]
    Pending,
    /// Reported complete or recovered.
    Delivered,
    /// Reported lost; counting late shards.
    Lost,
    /// Reported lost, then late.
    LateReported,
}

/// Per code group: which shards arrived and how many count.
#[derive(Debug, Clone, Copy)]
struct GroupState {
    k: u8,
    /// Parity count, from the group's first shard.
    m: Option<u8>,
    /// Distinct shards counted, at most `k`.
    count: u8,
    /// Shard indices seen, a 256-bit set.
    seen: [u64; 4],
}

impl GroupState {
    /// Records `index` as seen; false if it was seen before.
    fn mark(&mut self, index: u8) -> bool {
        let (word, bit) = (usize::from(index / 64), 1u64 << (index % 64));
        let new = self.seen[word] & bit == 0;
        self.seen[word] |= bit;
        new
    }

    fn ready(&self) -> bool {
        self.count >= self.k
    }

    /// Counts one more shard, up to `k`; true if that made the group ready.
    fn add(&mut self) -> bool {
        if self.ready() {
            return false;
        }
        self.count += 1;
        self.ready()
    }
}

#[derive(Debug)]
struct Stored {
    /// `group << 8 | index`: sorting by it orders shards group by group,
    /// data before parity.
    key: u16,
    payload: Bytes,
}

#[derive(Debug)]
struct Slot {
    state: State,
    deadline: Instant,
    /// Set by the first shard; `None` for a placeholder.
    meta: Option<Meta>,
    groups: Vec<GroupState>,
    /// Held payloads while pending, at most `k` per group.
    shards: Vec<Stored>,
    /// Distinct shards that arrived (in time or not).
    received: usize,
    /// Groups with `k` shards.
    groups_ready: usize,
    /// Data shards of the whole block.
    needed: usize,
    /// Bytes charged for `shards`.
    bytes: usize,
}

impl Slot {
    fn new(deadline: Instant) -> Self {
        Self {
            state: State::Pending,
            deadline,
            meta: None,
            groups: Vec::new(),
            shards: Vec::new(),
            received: 0,
            groups_ready: 0,
            needed: 0,
            bytes: 0,
        }
    }

    fn init(&mut self, meta: Meta, split: &Split) {
        self.meta = Some(meta);
        self.needed = split.total;
        self.groups.clear();
        self.groups.extend((0..split.groups).map(|g| GroupState {
            // <= 255: checked by `Split::of`.
            k: group_span(split.total, split.groups, g).1 as u8,
            m: None,
            count: 0,
            seen: [0; 4],
        }));
    }

    /// Drops held payloads (the caller un-charges `bytes` first).
    fn release(&mut self) {
        self.shards.clear();
        self.bytes = 0;
    }

    /// Back to an empty placeholder, keeping modest buffers for reuse.
    fn reset(&mut self) {
        self.release();
        if self.shards.capacity() > KEEP_SHARD_ENTRIES {
            self.shards = Vec::new();
        }
        if self.groups.capacity() > KEEP_GROUP_ENTRIES {
            self.groups = Vec::new();
        }
        self.groups.clear();
        self.state = State::Pending;
        self.meta = None;
        self.received = 0;
        self.groups_ready = 0;
        self.needed = 0;
    }
}

/// Lays out the block of a slot whose every group has exactly `k` held
/// shards: copies data shards into one exact-length buffer and rebuilds
/// missing ones in place. Returns the block and the data shards rebuilt, or
/// `None` if the codec refused (never wrong data).
fn assemble(
    slot: &mut Slot,
    codecs: &mut CodecCache,
    scratch: &mut Vec<u8>,
) -> Option<(Bytes, usize)> {
    let meta = slot.meta?;
    let shard = meta.shard_size;
    let block_len = meta.block_len as usize;
    slot.shards.sort_unstable_by_key(|s| s.key);

    // A one-shard block that arrived as its data shard: hand out a slice of
    // the datagram, no copy.
    if slot.needed == 1 {
        if let Some(s) = slot.shards.first().filter(|s| s.key == 0) {
            return Some((s.payload.slice(..block_len), 0));
        }
    }

    // Exactly `block_len` long, so `Bytes::from` takes it over without
    // reallocating or a second allocation.
    let mut out: Vec<u8> = Vec::with_capacity(block_len);
    let mut rebuilt = 0;
    let mut rest: &[Stored] = &slot.shards;
    for (g, group) in slot.groups.iter().enumerate() {
        let k = usize::from(group.k);
        let in_group = rest.partition_point(|s| usize::from(s.key >> 8) == g);
        let (held, later) = rest.split_at(in_group);
        rest = later;
        if held.len() != k {
            return None;
        }
        let data_held = held.partition_point(|s| usize::from(s.key & 0xff) < k);
        let group_start = out.len();
        let mut next = held[..data_held].iter().peekable();
        for i in 0..k {
            let len = shard.min(block_len - out.len());
            match next.next_if(|s| usize::from(s.key & 0xff) == i) {
                Some(s) => out.extend_from_slice(&s.payload[..len]),
                None => out.resize(out.len() + len, 0),
            }
        }
        if data_held < k {
            let missing = k - data_held;
            rebuild(
                codecs.get(k, usize::from(group.m?))?,
                &mut out[group_start..],
                held,
                k,
                shard,
                scratch,
            )?;
            rebuilt += missing;
        }
    }
    debug_assert_eq!(out.len(), block_len);
    Some((Bytes::from(out), rebuilt))
}

/// Rebuilds the missing data shards of one group in place in `region` (the
/// group's part of the block, its last shard possibly cut short by the block
/// end). `held` are the group's `k` shards sorted by index.
fn rebuild(
    codec: &reed_solomon_erasure::galois_8::ReedSolomon,
    region: &mut [u8],
    held: &[Stored],
    k: usize,
    shard: usize,
    scratch: &mut Vec<u8>,
) -> Option<()> {
    let m = codec.parity_shard_count();
    let data_held = held.partition_point(|s| usize::from(s.key & 0xff) < k);
    let parity = &held[data_held..];
    let full = region.len() / shard;
    // The block's last shard, when cut short, is rebuilt in scratch at full
    // size: the codec works on whole shards.
    let partial = full < k;

    // The codec takes mutable slices even for shards it only reads, and
    // received payloads are shared `Bytes`: parity goes through scratch.
    scratch.clear();
    scratch.resize((parity.len() + usize::from(partial)) * shard, 0);
    let (parity_buf, partial_buf) = scratch.split_at_mut(parity.len() * shard);

    let mut shards: Vec<(&mut [u8], bool)> = Vec::with_capacity(k + m);
    let mut data = held[..data_held].iter().peekable();
    let mut chunks = region.chunks_mut(shard);
    for i in 0..full {
        let here = data.next_if(|s| usize::from(s.key & 0xff) == i).is_some();
        shards.push((chunks.next()?, here));
    }
    let mut partial_missing = false;
    if partial {
        // Only the block's last shard can be cut short, so it is shard k - 1.
        if full + 1 != k {
            return None;
        }
        match data.next_if(|s| usize::from(s.key & 0xff) == full) {
            Some(s) => partial_buf.copy_from_slice(&s.payload),
            None => partial_missing = true,
        }
        shards.push((&mut *partial_buf, !partial_missing));
    }
    let mut parity_chunks = parity_buf.chunks_exact_mut(shard);
    let mut parity = parity.iter().peekable();
    for j in k..k + m {
        match parity.next_if(|s| usize::from(s.key & 0xff) == j) {
            Some(s) => {
                let buf = parity_chunks.next()?;
                buf.copy_from_slice(&s.payload);
                shards.push((buf, true));
            }
            None => shards.push((&mut [], false)),
        }
    }
    codec.reconstruct_data(&mut shards).ok()?;
    drop(shards);
    if partial && partial_missing {
        let tail = chunks.next().unwrap_or_default();
        let len = tail.len();
        tail.copy_from_slice(&partial_buf[..len]);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rand::seq::SliceRandom;
    use rand::{rngs::SmallRng, Rng, RngCore, SeedableRng};

    use super::*;
    use crate::fec::{EncodedBlock, Encoder, FecConfig};

    fn fec(shard: usize, ratio: f64, kmax: usize) -> FecConfig {
        let mut c = FecConfig::default();
        c.set_shard_size(shard)
            .and_then(|c| c.set_redundancy(ratio))
            .and_then(|c| c.set_max_data_shards(kmax))
            .unwrap();
        c
    }

    fn decoder(window: usize, max_bytes: usize) -> Decoder {
        let mut c = DecoderConfig::default();
        c.set_window(window)
            .and_then(|c| c.set_max_buffered_bytes(max_bytes))
            .unwrap();
        Decoder::new(c)
    }

    fn parse(datagram: &Bytes) -> (ShardHeader, Bytes) {
        ShardHeader::decode_datagram(datagram).unwrap()
    }

    fn encode(cfg: &FecConfig, seq: u64, block: &[u8]) -> EncodedBlock {
        Encoder::new(7, cfg.clone())
            .encode(seq, (seq as u32).wrapping_mul(1000), Flags::SYNC, block)
            .unwrap()
    }

    fn insert(d: &mut Decoder, dg: &Bytes, deadline: Instant) -> Insert {
        let (h, p) = parse(dg);
        d.insert(&h, p, deadline)
    }

    fn drain(d: &mut Decoder) -> Vec<Outcome> {
        std::iter::from_fn(|| d.poll_outcome()).collect()
    }

    /// A block length biased toward the edges: tiny blocks, exact multiples
    /// of the shard size and one byte either side, and the odd large one.
    fn block_len(rng: &mut SmallRng, shard: usize, max: usize) -> usize {
        let len = match rng.random_range(0..10) {
            0..=2 => rng.random_range(1..=3 * shard),
            3..=5 => {
                let n = rng.random_range(1..=80) * shard;
                n + rng.random_range(0..=2) - 1
            }
            6..=8 => rng.random_range(1..=100_000),
            _ => rng.random_range(1..=1 << 20),
        };
        len.clamp(1, max)
    }

    /// Random blocks, configs, loss, order and duplicates. With at most `m`
    /// shards of a group lost the decoder returns exactly the block, as
    /// Complete when every data shard was among the first `k` of each group
    /// and Recovered otherwise (with the right count); with more, the block is
    /// reported Lost at its deadline and never as data.
    #[test]
    fn random_blocks_losses_and_order() {
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        let t0 = Instant::now();
        let mut d = Decoder::new(DecoderConfig::default());
        // Shared across blocks so codecs (slow to build in debug) are reused.
        let mut enc = Encoder::new(7, FecConfig::default());
        let (mut delivered, mut lost) = (0, 0);
        for seq in 0..150u64 {
            let shard = *[1100, 1200, 1, 7, 64, 1000]
                .get(rng.random_range(0..8))
                .unwrap_or(&1100);
            let len = block_len(&mut rng, shard, 1 << 20);
            // Mostly small groups: a debug build inverts k × k matrices
            // slowly, once per group and loss pattern, so big blocks get
            // small groups (`largest_group_rebuilds` covers k = 255).
            let kmax = match rng.random_range(0..10) {
                0 if len < 100_000 => rng.random_range(41..=64),
                _ if len < 100_000 => rng.random_range(1..=40),
                _ => rng.random_range(1..=16),
            };
            let ratio = rng.random_range(0.0..0.6);
            let cfg = fec(shard, ratio, kmax);
            let len = len.min(cfg.max_block_len());
            let mut block = vec![0u8; len];
            rng.fill_bytes(&mut block);
            enc.set_config(cfg);
            let ts = (seq as u32).wrapping_mul(1000);
            let out = enc.encode(seq, ts, Flags::SYNC, &block).unwrap();
            let unrecoverable = rng.random_bool(0.2);
            let ctx = format!(
                "seed {seed}: seq {seq} len {len} shard {shard} kmax {kmax} ratio {ratio:.3}"
            );

            // Per group: drop up to m shards (or m + 1.. when unrecoverable).
            let mut sent = Vec::new();
            let mut doomed = false;
            for (k, m, dgs) in out.groups() {
                let losses = if unrecoverable && !doomed && k >= 2 && rng.random_bool(0.5) {
                    doomed = true;
                    // At least one shard arrives, so the block is known.
                    rng.random_range(m + 1..k + m)
                } else {
                    rng.random_range(0..=m)
                };
                let mut idx: Vec<usize> = (0..k + m).collect();
                idx.shuffle(&mut rng);
                sent.extend(idx[losses..].iter().map(|&i| dgs[i].clone()));
            }
            for _ in 0..rng.random_range(0..4) {
                if let Some(dg) = sent.get(rng.random_range(0..sent.len().max(1))) {
                    sent.push(dg.clone());
                }
            }
            sent.shuffle(&mut rng);

            // What the decoder should see: per group, the first k distinct
            // shards decide how many data shards must be rebuilt.
            let mut firsts: Vec<Vec<u8>> = vec![Vec::new(); out.groups().len()];
            for dg in &sent {
                let (h, _) = parse(dg);
                let f = &mut firsts[h.group as usize];
                if f.len() < h.k as usize && !f.contains(&h.index) {
                    f.push(h.index);
                }
            }
            let recoverable = out.groups().zip(&firsts).all(|((k, ..), f)| f.len() == k);
            let expect_rebuilt: usize = out
                .groups()
                .zip(&firsts)
                .map(|((k, ..), f)| f.iter().filter(|&&i| usize::from(i) >= k).count())
                .sum();

            let deadline = t0 + Duration::from_millis(seq);
            for dg in &sent {
                insert(&mut d, dg, deadline);
            }
            let mut outcomes = drain(&mut d);
            if !recoverable {
                assert!(outcomes.is_empty(), "{ctx}: {outcomes:?}");
                d.handle_timeout(deadline - Duration::from_nanos(1));
                assert!(drain(&mut d).is_empty(), "{ctx}: lost before deadline");
                assert_eq!(d.poll_timeout(), Some(deadline), "{ctx}");
                d.handle_timeout(deadline);
                outcomes = drain(&mut d);
            }
            assert_eq!(outcomes.len(), 1, "{ctx}: {outcomes:?}");
            let o = &outcomes[0];
            assert_eq!(
                (o.seq, o.timestamp_us, o.flags),
                (seq, Some(seq as u32 * 1000), Flags::SYNC),
                "{ctx}"
            );
            match &o.result {
                BlockResult::Complete(data) => {
                    assert!(recoverable && expect_rebuilt == 0, "{ctx}");
                    assert!(data[..] == block[..], "{ctx}: wrong data");
                    delivered += 1;
                }
                BlockResult::Recovered { data, rebuilt } => {
                    assert!(recoverable, "{ctx}");
                    assert_eq!(*rebuilt, expect_rebuilt, "{ctx}");
                    assert!(data[..] == block[..], "{ctx}: wrong data");
                    delivered += 1;
                }
                BlockResult::Lost { needed, .. } => {
                    assert!(!recoverable, "{ctx}");
                    assert_eq!(
                        *needed,
                        out.groups().map(|(k, ..)| k).sum::<usize>(),
                        "{ctx}"
                    );
                    lost += 1;
                }
                other => panic!("{ctx}: {other:?}"),
            }
            assert_eq!(d.poll_timeout(), None, "{ctx}");
            assert_eq!(d.buffered_bytes(), 0, "{ctx}");
        }
        let s = d.stats();
        assert_eq!(
            s.blocks_complete + s.blocks_recovered,
            delivered,
            "seed {seed}"
        );
        assert_eq!(s.blocks_lost, lost, "seed {seed}");
    }

    /// The largest codes a header allows: k = 255 (m = 1) with one data
    /// shard lost, and k + m = 256 (10 + 246) rebuilt from the last ten
    /// parity shards alone, up to index 255.
    #[test]
    fn largest_group_rebuilds() {
        let t = Instant::now();
        for (kmax, ratio, rebuilt) in [(255, 0.0, 1), (10, 30.0, 10)] {
            let cfg = fec(10, ratio, kmax);
            let block: Vec<u8> = (0..kmax * 10 - 3).map(|i| (i * 7) as u8).collect();
            let out = encode(&cfg, 0, &block);
            let (k, m, dgs) = out.groups().next().unwrap();
            assert_eq!((k, k + m), (kmax, 256));
            let mut d = Decoder::new(DecoderConfig::default());
            if kmax == 255 {
                for (i, dg) in dgs.iter().enumerate().filter(|(i, _)| *i != 7) {
                    assert_eq!(insert(&mut d, dg, t), Insert::Accepted, "{i}");
                }
            } else {
                for dg in dgs.iter().rev().take(10) {
                    assert_eq!(insert(&mut d, dg, t), Insert::Accepted);
                }
            }
            let o = drain(&mut d);
            assert!(
                matches!(&o[..], [Outcome { result: BlockResult::Recovered { data, rebuilt: r }, .. }]
                    if data[..] == block[..] && *r == rebuilt),
                "k {k}: {o:?}"
            );
        }
    }

    #[test]
    fn inconsistent_shards_are_refused() {
        let t = Instant::now();
        let cfg = fec(1000, 0.25, 32);
        let block: Vec<u8> = (0..9500u32).map(|i| i as u8).collect();
        let out = encode(&cfg, 3, &block); // k = 10, m = 3
        let mut d = Decoder::new(DecoderConfig::default());
        let (h, p) = parse(&out.datagrams()[0]);
        assert_eq!(d.insert(&h, p.clone(), t), Insert::Accepted);

        let forged = [
            // k alone changed: no longer fits block length and shard size.
            (ShardHeader { k: 11, ..h }, p.clone()),
            // k and block length changed together: self-consistent, but not
            // the block the first shard announced.
            (
                ShardHeader {
                    k: 11,
                    block_len: 10_500,
                    index: 1,
                    ..h
                },
                p.clone(),
            ),
            (
                ShardHeader {
                    m: 4,
                    index: 1,
                    ..h
                },
                p.clone(),
            ),
            (
                ShardHeader {
                    block_len: 9499,
                    index: 1,
                    ..h
                },
                p.clone(),
            ),
            (
                ShardHeader {
                    timestamp_us: 1,
                    index: 1,
                    ..h
                },
                p.clone(),
            ),
            (
                ShardHeader {
                    flags: Flags::empty(),
                    index: 1,
                    ..h
                },
                p.clone(),
            ),
            (
                ShardHeader {
                    stream_id: 8,
                    index: 1,
                    ..h
                },
                p.clone(),
            ),
            (
                ShardHeader {
                    groups: 2,
                    group: 0,
                    index: 1,
                    ..h
                },
                p.clone(),
            ),
            (ShardHeader { index: 13, ..h }, p.clone()),
            (ShardHeader { index: 1, ..h }, p.slice(..p.len() - 1)),
            (ShardHeader { index: 1, ..h }, Bytes::new()),
        ];
        for (fh, fp) in &forged {
            assert_eq!(d.insert(fh, fp.clone(), t), Insert::Inconsistent, "{fh:?}");
        }
        assert_eq!(d.stats().shards_inconsistent, forged.len() as u64);
        // The genuine shards still rebuild the block exactly.
        for dg in &out.datagrams()[3..] {
            insert(&mut d, dg, t);
        }
        let o = drain(&mut d);
        assert!(
            matches!(&o[..], [Outcome { result: BlockResult::Recovered { data, rebuilt: 2 }, .. }] if data[..] == block[..]),
            "{o:?}"
        );
    }

    #[test]
    fn window_evicts_oldest_unfinished() {
        let t = Instant::now();
        let cfg = fec(100, 0.25, 32);
        let mut d = decoder(4, usize::MAX);
        let blocks: Vec<EncodedBlock> = (0..6).map(|s| encode(&cfg, s, &[1; 1000])).collect();
        for b in &blocks[..4] {
            assert_eq!(insert(&mut d, &b.datagrams()[0], t), Insert::Accepted);
        }
        assert!(drain(&mut d).is_empty());
        insert(&mut d, &blocks[4].datagrams()[0], t);
        let o = drain(&mut d);
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].seq, 0);
        assert_eq!(
            o[0].result,
            BlockResult::Lost {
                received: 1,
                needed: 10
            }
        );
        assert_eq!(d.stats().evicted_window, 1);
        assert_eq!(
            insert(&mut d, &blocks[0].datagrams()[1], t),
            Insert::OutOfWindow
        );
        assert_eq!(d.stats().shards_out_of_window, 1);
        assert_eq!(d.buffered_bytes(), 4 * (100 + SHARD_OVERHEAD));
    }

    #[test]
    fn memory_bound_evicts_oldest_unfinished() {
        let t = Instant::now();
        let cfg = fec(1000, 0.25, 32);
        let per_shard = 1000 + SHARD_OVERHEAD;
        let mut d = decoder(64, 5 * per_shard);
        let blocks: Vec<EncodedBlock> = (0..3).map(|s| encode(&cfg, s, &[2; 10_000])).collect();
        for b in &blocks {
            for dg in &b.datagrams()[..2] {
                assert_eq!(insert(&mut d, dg, t), Insert::Accepted);
            }
        }
        // The sixth shard went over: block 0 (oldest holding data) is gone.
        let o = drain(&mut d);
        assert_eq!(o.len(), 1);
        assert_eq!(
            (o[0].seq, &o[0].result),
            (
                0,
                &BlockResult::Lost {
                    received: 2,
                    needed: 10
                }
            )
        );
        assert_eq!(d.stats().evicted_memory, 1);
        assert_eq!(d.buffered_bytes(), 4 * per_shard);
        assert_eq!(insert(&mut d, &blocks[0].datagrams()[5], t), Insert::Late);
        assert!(d.buffered_bytes() <= 5 * per_shard);
    }

    /// Blocks never seen between two seen ones get exactly one outcome: Lost
    /// at the deadline of the shard that revealed the gap.
    #[test]
    fn gaps_become_lost_at_deadline() {
        let t = Instant::now();
        let cfg = fec(1100, 0.25, 32);
        let mut d = Decoder::new(DecoderConfig::default());
        for dg in encode(&cfg, 0, &[0; 3000]).datagrams() {
            insert(&mut d, dg, t + Duration::from_millis(10));
        }
        let b3 = encode(&cfg, 3, &[3; 3000]);
        insert(&mut d, &b3.datagrams()[0], t + Duration::from_millis(40));
        let o = drain(&mut d);
        assert!(matches!(
            &o[..],
            [Outcome {
                seq: 0,
                result: BlockResult::Complete(_),
                ..
            }]
        ));
        assert_eq!(d.poll_timeout(), Some(t + Duration::from_millis(40)));

        // A real shard of block 2 brings its own, earlier deadline.
        let b2 = encode(&cfg, 2, &[2; 3000]);
        insert(&mut d, &b2.datagrams()[0], t + Duration::from_millis(30));
        assert_eq!(d.poll_timeout(), Some(t + Duration::from_millis(30)));

        d.handle_timeout(t + Duration::from_millis(40));
        let mut o = drain(&mut d);
        o.sort_by_key(|o| o.seq);
        let seqs: Vec<u64> = o.iter().map(|o| o.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(o[0].timestamp_us, None);
        assert_eq!(
            o[0].result,
            BlockResult::Lost {
                received: 0,
                needed: 0
            }
        );
        assert_eq!(o[1].timestamp_us, Some(2000));
        assert_eq!(
            o[1].result,
            BlockResult::Lost {
                received: 1,
                needed: 3
            }
        );
        assert_eq!(d.poll_timeout(), None);
        assert_eq!(d.stats().blocks_lost, 3);
    }

    #[test]
    fn late_completion_is_reported_not_delivered() {
        let t = Instant::now();
        let cfg = fec(1000, 0.25, 32);
        let out = encode(&cfg, 0, &[5; 8000]); // k = 8, m = 2
        let dgs = out.datagrams();
        let mut d = Decoder::new(DecoderConfig::default());
        for dg in &dgs[..5] {
            insert(&mut d, dg, t);
        }
        d.handle_timeout(t);
        assert_eq!(
            drain(&mut d)[0].result,
            BlockResult::Lost {
                received: 5,
                needed: 8
            }
        );
        assert_eq!(insert(&mut d, &dgs[4], t), Insert::Duplicate);
        for dg in &dgs[5..7] {
            assert_eq!(insert(&mut d, dg, t), Insert::Late);
        }
        assert!(drain(&mut d).is_empty(), "7 of 8 shards: not decodable yet");
        assert_eq!(insert(&mut d, &dgs[9], t), Insert::Late);
        let o = drain(&mut d);
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].result, BlockResult::Late { received: 8 });
        assert_eq!(insert(&mut d, &dgs[7], t), Insert::Late);
        assert!(drain(&mut d).is_empty(), "Late is reported once");
        let s = d.stats();
        assert_eq!((s.blocks_lost, s.blocks_late, s.shards_late), (1, 1, 4));
        assert_eq!(s.blocks_complete + s.blocks_recovered, 0);
    }

    #[test]
    fn duplicates_and_surplus_are_counted() {
        let t = Instant::now();
        let cfg = fec(1000, 0.25, 32);
        let out = encode(&cfg, 0, &[5; 8000]); // k = 8, m = 2
        let mut d = Decoder::new(DecoderConfig::default());
        assert_eq!(insert(&mut d, &out.datagrams()[0], t), Insert::Accepted);
        assert_eq!(insert(&mut d, &out.datagrams()[0], t), Insert::Duplicate);
        for dg in &out.datagrams()[1..] {
            insert(&mut d, dg, t);
        }
        assert_eq!(insert(&mut d, &out.datagrams()[9], t), Insert::Duplicate);
        let s = d.stats();
        assert_eq!(
            (s.shards_accepted, s.shards_duplicate, s.shards_surplus),
            (8, 2, 2)
        );
        assert_eq!(s.blocks_complete, 1);
    }

    #[test]
    fn before_first_seq_is_out_of_window() {
        let t = Instant::now();
        let cfg = fec(1000, 0.25, 32);
        let mut d = Decoder::new(DecoderConfig::default());
        insert(&mut d, &encode(&cfg, 10, &[1; 10]).datagrams()[0], t);
        assert_eq!(
            insert(&mut d, &encode(&cfg, 9, &[1; 10]).datagrams()[0], t),
            Insert::OutOfWindow
        );
    }

    /// A jump of 2^64 - 1 sequence numbers costs O(window): the blocks passed
    /// over come out as one Skipped run, and every sequence number still has
    /// exactly one outcome.
    #[test]
    fn huge_seq_jump_is_cheap() {
        let t = Instant::now();
        let cfg = fec(1000, 0.25, 32);
        let mut d = decoder(64, usize::MAX);
        insert(&mut d, &encode(&cfg, 0, &[1; 5000]).datagrams()[0], t);
        insert(&mut d, &encode(&cfg, 1, &[1; 10]).datagrams()[0], t);
        let far = crate::wire::MAX_VARINT;
        let b = encode(&cfg, far, &[1; 10]);
        insert(&mut d, &b.datagrams()[0], t);
        let o = drain(&mut d);
        // Block 1 (one shard) finished when it arrived.
        assert_eq!(o[0].seq, 1);
        assert!(matches!(o[0].result, BlockResult::Complete(_)));
        assert_eq!(o[1].seq, 0);
        assert_eq!(
            o[1].result,
            BlockResult::Lost {
                received: 1,
                needed: 5
            }
        );
        // 2 ..= far - 64 passed over; far - 63 .. far are in the window.
        assert_eq!(o[2].seq, 2);
        assert_eq!(o[2].result, BlockResult::Skipped { count: far - 65 });
        assert_eq!(o[3].seq, far);
        assert_eq!(o.len(), 4);
        d.handle_timeout(t);
        let o = drain(&mut d);
        assert_eq!(o.len(), 63);
        assert_eq!(o[0].seq, far - 63);
        assert_eq!(d.stats().evicted_window, 1);
        // Older than the window now.
        assert_eq!(
            insert(&mut d, &encode(&cfg, 5, &[1; 10]).datagrams()[0], t),
            Insert::OutOfWindow
        );
    }

    /// A viewer sent only `p` parity shards per group rebuilds from any `p`
    /// losses per group.
    #[test]
    fn partial_parity_rebuilds() {
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        let t = Instant::now();
        let cfg = fec(1100, 0.4, 10);
        let mut d = Decoder::new(DecoderConfig::default());
        for seq in 0..40 {
            let mut block = vec![0u8; rng.random_range(1..100_000)];
            rng.fill_bytes(&mut block);
            let out = encode(&cfg, seq, &block);
            let p = rng.random_range(0..=4);
            let mut sent = Vec::new();
            for (k, m, dgs) in out.groups() {
                let given = &dgs[..k + p.min(m)];
                assert_eq!(given.len(), k + p.min(m));
                let mut idx: Vec<usize> = (0..given.len()).collect();
                idx.shuffle(&mut rng);
                let losses = rng.random_range(0..=p.min(m));
                sent.extend(idx[losses..].iter().map(|&i| given[i].clone()));
            }
            assert_eq!(
                out.datagrams_with_parity(p).count(),
                out.groups().map(|(k, m, _)| k + p.min(m)).sum::<usize>()
            );
            sent.shuffle(&mut rng);
            for dg in &sent {
                insert(&mut d, dg, t);
            }
            let o = drain(&mut d);
            let data = match &o[..] {
                [Outcome {
                    result: BlockResult::Complete(data),
                    ..
                }]
                | [Outcome {
                    result: BlockResult::Recovered { data, .. },
                    ..
                }] => data,
                other => panic!("seed {seed}: seq {seq} p {p}: {other:?}"),
            };
            assert!(data[..] == block[..], "seed {seed}: seq {seq}");
        }
    }

    #[test]
    fn one_shard_block_is_not_copied() {
        let t = Instant::now();
        let out = encode(&FecConfig::default(), 0, b"hello");
        let mut d = Decoder::new(DecoderConfig::default());
        let (h, p) = parse(&out.datagrams()[0]);
        let ptr = p.as_ptr();
        d.insert(&h, p, t);
        match drain(&mut d).pop().map(|o| o.result) {
            Some(BlockResult::Complete(data)) => {
                assert_eq!(&data[..], b"hello");
                assert_eq!(data.as_ptr(), ptr, "a slice of the datagram");
            }
            other => panic!("{other:?}"),
        }
        // Parity alone rebuilds it too.
        let mut d = Decoder::new(DecoderConfig::default());
        insert(&mut d, &out.datagrams()[1], t);
        assert!(matches!(
            drain(&mut d).pop().map(|o| o.result),
            Some(BlockResult::Recovered { data, rebuilt: 1 }) if &data[..] == b"hello"
        ));
    }

    /// Arbitrary headers and payloads, as a hostile peer may send after
    /// `decode_datagram`, or a caller may build by hand: no panic, every shard
    /// counted once, memory bound held, no block reported twice.
    #[test]
    fn arbitrary_shards_never_panic() {
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        let t = Instant::now();
        let max_bytes = 20_000;
        let mut d = decoder(16, max_bytes);
        let mut inserts = 0;
        let mut finished = std::collections::HashSet::new();
        for i in 0..20_000u64 {
            let k = rng.random_range(1..=4u8);
            let h = ShardHeader {
                flags: if rng.random_bool(0.9) {
                    Flags::empty()
                } else {
                    Flags::SYNC
                },
                stream_id: rng.random_range(0..2),
                // A wild jump early would leave nothing to recover (seed 145
                // did): the check at the end needs the first half ordinary.
                seq: if i > 10_000 && rng.random_bool(0.001) {
                    rng.random()
                } else {
                    i / 8 + rng.random_range(0..20)
                },
                timestamp_us: rng.random_range(0..2),
                k,
                m: rng.random_range(0..=3),
                index: rng.random_range(0..8),
                block_len: rng.random_range(0..=u32::from(k) * 4),
                group: rng.random_range(0..2),
                groups: rng.random_range(0..=2),
            };
            let mut payload = vec![0u8; rng.random_range(0..=5)];
            rng.fill_bytes(&mut payload);
            let _ = d.insert(&h, Bytes::from(payload), t + Duration::from_millis(i / 8));
            inserts += 1;
            assert!(d.buffered_bytes() <= max_bytes, "seed {seed}");
            if rng.random_bool(0.05) {
                d.handle_timeout(t + Duration::from_millis(i / 8 - 5.min(i / 8)));
            }
            while let Some(o) = d.poll_outcome() {
                if !matches!(
                    o.result,
                    BlockResult::Late { .. } | BlockResult::Skipped { .. }
                ) {
                    assert!(
                        finished.insert(o.seq),
                        "seed {seed}: {} reported twice",
                        o.seq
                    );
                }
            }
        }
        let s = d.stats();
        let counted = s.shards_accepted
            + s.shards_duplicate
            + s.shards_surplus
            + s.shards_late
            + s.shards_out_of_window
            + s.shards_inconsistent;
        assert_eq!(counted, inserts, "seed {seed}");
        assert!(
            s.shards_accepted > 0 && s.blocks_recovered > 0,
            "seed {seed}: {s:?}"
        );
    }
}
