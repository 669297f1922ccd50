//! The sending side of one viewer: which shards go now, which on request, what
//! has expired, and the accounting.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;

use crate::{
    analytics::{RedundancyPolicy, RepairPlan},
    config::Parity,
    fec::EncodedBlock,
    wire::{RepairEntry, MAX_REPAIR_ATTEMPTS, MAX_SHARDS},
};

/// Default for [`SenderConfig::repair_delay`]; matches the receiver's
/// [`DEFAULT_REPAIR_DELAY`](super::DEFAULT_REPAIR_DELAY).
const ASSUMED_REPAIR_DELAY: Duration = super::DEFAULT_REPAIR_DELAY;

/// Default [`SenderConfig::pacing_gain`].
pub const DEFAULT_PACING_GAIN: f64 = 2.0;
/// Default [`SenderConfig::burst`].
pub const DEFAULT_BURST: usize = 64 * 1024;
/// Default [`SenderConfig::repair_spacing`].
pub const DEFAULT_REPAIR_SPACING: Duration = Duration::from_millis(1);
/// Default [`SenderConfig::max_queue`].
pub const DEFAULT_MAX_QUEUE: usize = 4 << 20;
/// Default [`SenderConfig::startup_loss`].
pub const DEFAULT_STARTUP_LOSS: f64 = 0.1;
/// How long after joining the startup loss is a floor under the estimate.
const STARTUP: Duration = Duration::from_secs(2);

/// Lowest pacing rate, bytes per second, whatever the stream's measured rate:
/// a new or very slow stream is not held back by its own history.
const MIN_PACE: f64 = 250_000.0;
/// The rate estimate is refreshed over windows of this length.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// A shard waiting in the queue for longer than this, or one expiring there,
/// marks the path congested...
const CONGESTED_BACKLOG: Duration = Duration::from_millis(100);
/// ...until neither has happened for this long.
const CONGESTION_CLEAR: Duration = Duration::from_secs(1);
/// How long a space-blocked sender waits before it looks at quinn's buffer again.
const SPACE_RETRY: Duration = Duration::from_millis(1);
/// Most blocks kept for repair, whatever their deadlines.
const MAX_RETAINED: usize = 1024;
/// Window over which the rate quinn takes datagrams is measured.
const DRAIN_WINDOW: Duration = Duration::from_millis(200);
/// Datagrams that leave between two shards of one answer. Loss bursts take
/// consecutive packets, and the stream leaves in block-sized bursts with
/// quiet between them: an answer spaced in time alone goes out in the quiet,
/// its shards back to back on the wire, and one burst takes all of them.
/// Riding the stream, a few packets apart, they meet independent fates...
const ANSWER_STRIDE: u64 = 4;
/// ...unless waiting for the stream would leave a shard this close to its
/// `leave_by`.
const ANSWER_FORCE: Duration = Duration::from_millis(6);
/// Longest a repair shard waits for its stride: about one block interval of
/// a typical stream (21 KB at 8 Mbit/s), so it meets the next block's shards;
/// a stream of rare large blocks is not waited for.
const ANSWER_STRIDE_WAIT: Duration = Duration::from_millis(25);
/// Repair shards looked at per poll, from the earliest: a viewer asking for
/// everything costs the server a bounded scan, not one over its whole queue.
const ANSWER_SCAN: usize = 64;
use super::MAX_ANSWER_SPACING;

/// Shards an answer carries beyond the policy's margin, which assumes
/// independent loss. A deficit is itself the sign of a loss burst, and the
/// answer, sent soon after, meets the same path: on a Gilbert-Elliott path
/// (5%, mean burst 4) its shards are lost far more often than the average
/// loss says. One more shard, and one per four missing, took the pure
/// recovery loop (`tests/it/recovery.rs`) from 99.2% to 99.75% on time there,
/// for 1.4 points of overhead on independent loss.
fn burst_margin(deficit: usize) -> usize {
    1 + deficit / 4
}

/// Settings of a [`Sender`]: one viewer's budget and the server's sending rules.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    latency: Duration,
    parity: Parity,
    repair: bool,
    policy: RedundancyPolicy,
    repair_delay: Duration,
    repair_spacing: Duration,
    pacing_gain: f64,
    burst: usize,
    max_queue: usize,
    startup_loss: f64,
}

impl SenderConfig {
    /// A sender for a viewer whose latency budget is `latency` (from its Hello).
    pub fn new(latency: Duration) -> Self {
        SenderConfig {
            latency,
            parity: Parity::Adaptive,
            repair: true,
            policy: RedundancyPolicy::default(),
            repair_delay: ASSUMED_REPAIR_DELAY,
            repair_spacing: DEFAULT_REPAIR_SPACING,
            pacing_gain: DEFAULT_PACING_GAIN,
            burst: DEFAULT_BURST,
            max_queue: DEFAULT_MAX_QUEUE,
            startup_loss: DEFAULT_STARTUP_LOSS,
        }
    }

    /// The viewer's latency budget.
    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// How much parity is sent up front. Default [`Parity::Adaptive`]: from the
    /// viewer's loss, its RTT and its budget (see [`RedundancyPolicy::plan`]).
    pub fn parity(&mut self, parity: Parity) -> &mut Self {
        self.parity = parity;
        self
    }

    /// Whether repair requests are answered. Default on. Off leaves only
    /// proactive parity, whatever the budget.
    pub fn repair(&mut self, on: bool) -> &mut Self {
        self.repair = on;
        self
    }

    /// The policy that turns loss into parity. Default
    /// [`RedundancyPolicy::default`]; the server caps its ratio at what was
    /// encoded.
    pub fn policy(&mut self, policy: RedundancyPolicy) -> &mut Self {
        self.policy = policy;
        self
    }

    /// How long the viewer waits after a block's last shard before it asks
    /// for repair (its reordering allowance). Default the receiver's default,
    /// 4 ms. Only used to judge whether a repair round fits in the budget.
    pub fn repair_delay(&mut self, t: Duration) -> &mut Self {
        self.repair_delay = t;
        self
    }

    /// Least time between two repair shards to one viewer. Default 1 ms.
    ///
    /// Interleaves an answer with the stream, so one loss burst does not take
    /// the whole answer; each shard of an answer adds this much to the time a
    /// repair takes.
    pub fn repair_spacing(&mut self, t: Duration) -> &mut Self {
        self.repair_spacing = t;
        self
    }

    /// Pacing rate as a multiple of the stream's measured rate (default 2.0,
    /// at least 1.0).
    ///
    /// A block up to [`burst`](Self::burst) bytes leaves at once; the rest of
    /// a larger block leaves at this multiple of the stream's rate, so a block
    /// twice the average size takes about one block interval. Higher sends
    /// large blocks sooner but in harder bursts.
    pub fn pacing_gain(&mut self, gain: f64) -> &mut Self {
        self.pacing_gain = gain.max(1.0);
        self
    }

    /// Bytes that may leave back to back before pacing applies (default 64 KiB).
    pub fn burst(&mut self, bytes: usize) -> &mut Self {
        self.burst = bytes.max(1500);
        self
    }

    /// Most datagram bytes waiting in the sender (default 4 MiB). Past it the
    /// oldest waiting shards are dropped, counted as expired.
    pub fn max_queue(&mut self, bytes: usize) -> &mut Self {
        self.max_queue = bytes;
        self
    }

    /// Loss planned for during a viewer's first two seconds, before its
    /// reports have said much (default 0.1, range 0..=0.5). The estimate from
    /// the first reports never lowers protection below this in that time.
    pub fn startup_loss(&mut self, loss: f64) -> &mut Self {
        self.startup_loss = loss.clamp(0.0, 0.5);
        self
    }
}

/// Counters of one [`Sender`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct SenderStats {
    /// Blocks taken for sending.
    pub blocks: u64,
    /// Datagrams handed out by [`Sender::poll_transmit`], repairs included.
    pub datagrams: u64,
    /// Bytes of those datagrams.
    pub bytes: u64,
    /// Parity shards sent up front.
    pub parity_sent: u64,
    /// Shards dropped unsent because their block could no longer reach the
    /// viewer in time, or the queue was over its bound.
    pub expired: u64,
    /// Repair entries received (one per code group and attempt).
    pub repairs_asked: u64,
    /// Entries answered with at least one shard.
    pub repairs_answered: u64,
    /// Entries not answered because the answer could no longer arrive in time
    /// or the block was no longer kept.
    pub repairs_expired: u64,
    /// Entries needing nothing: the group's missing shards were still queued,
    /// or the same attempt was answered before (a repeated copy).
    pub repairs_unneeded: u64,
    /// Shards sent as repair answers.
    pub repair_shards: u64,
    /// Times the path was found unable to carry the stream.
    pub congestion_events: u64,
    /// Blocks dropped whole before their first shard left, because on a
    /// congested path the rest of the queue would not let them leave in
    /// time. Their shards are also counted in `expired`.
    pub blocks_dropped: u64,
}

#[derive(Debug)]
struct Queued {
    datagram: Bytes,
    /// When it was queued; for a repair shard, the earliest it may leave.
    at: Instant,
    /// Past this the shard cannot reach the viewer by its block's deadline.
    leave_by: Instant,
    seq: u64,
    group: u8,
}

#[derive(Debug)]
struct Retained {
    block: Arc<EncodedBlock>,
    /// When the viewer gives the block up, in the sender's clock.
    deadline: Instant,
    groups: Vec<GroupSent>,
}

#[derive(Debug, Clone, Copy, Default)]
struct GroupSent {
    /// Parity shards handed out or queued: always a prefix of the encoded ones.
    parity_used: u8,
    /// Shards of the group still waiting in the sender's queues.
    queued: u16,
    /// Attempts answered, as a bit set.
    answered: u8,
    /// [`SenderStats::datagrams`] when the group's last answer shard left.
    last_answer: Option<u64>,
    /// Datagrams wanted between two shards of the group's answer.
    stride: u8,
}

/// PURE sending state machine of one viewer.
///
/// Takes each encoded block ([`push_block`](Self::push_block)), decides how
/// much parity goes with it from the viewer's loss, RTT and budget, queues the
/// shards interleaved across the block's code groups, and hands them out
/// paced ([`poll_transmit`](Self::poll_transmit)) as long as they can still
/// arrive in time. It keeps recent blocks (bounded by their deadline, a count
/// and the queue bound) and answers repair requests
/// ([`handle_repair`](Self::handle_repair)) with parity the viewer was not
/// sent, then with the data shards it lacks, ahead of new shards, but only
/// while the answer can arrive in time.
///
/// Like the [`Receiver`](super::Receiver), it reads no clock and does no I/O:
/// the caller passes `now`, the RTT ([`set_rtt`](Self::set_rtt)), the loss
/// estimate ([`set_loss`](Self::set_loss)) and how much quinn can take.
#[derive(Debug)]
pub struct Sender {
    config: SenderConfig,
    joined: Option<Instant>,
    queue: VecDeque<Queued>,
    repairs: VecDeque<Queued>,
    queued_bytes: usize,
    retained: VecDeque<Retained>,
    rtt: Duration,
    /// The smallest RTT passed to [`set_rtt`](Self::set_rtt) (or to `new`).
    min_rtt: Option<Duration>,
    loss: Option<f64>,
    /// Plans by `k`, for the current loss and round count.
    plans: Vec<Option<RepairPlan>>,
    plan_key: (u64, u32, bool),
    rate: f64,
    window: Option<(Instant, u64)>,
    /// Whole rate windows measured.
    windows: u64,
    tokens: f64,
    tokens_at: Option<Instant>,
    next_repair: Option<Instant>,
    space_blocked: bool,
    /// Bytes handed out since the start of the current drain window.
    drain_window: Option<(Instant, u64)>,
    /// Bytes per second handed out over the last whole drain window.
    drain_rate: f64,
    /// The block whose shards are being handed out.
    started: Option<u64>,
    congested: bool,
    congestion_seen: Option<Instant>,
    stats: SenderStats,
}

impl Sender {
    /// A sender with nothing queued. `rtt` is the first RTT sample (from the
    /// handshake).
    pub fn new(config: SenderConfig, rtt: Duration) -> Self {
        Sender {
            tokens: config.burst as f64,
            config,
            joined: None,
            queue: VecDeque::new(),
            repairs: VecDeque::new(),
            queued_bytes: 0,
            retained: VecDeque::new(),
            rtt,
            min_rtt: (!rtt.is_zero()).then_some(rtt),
            loss: None,
            plans: vec![None; MAX_SHARDS],
            plan_key: (0, 0, false),
            rate: 0.0,
            window: None,
            windows: 0,
            tokens_at: None,
            next_repair: None,
            space_blocked: false,
            drain_window: None,
            drain_rate: 0.0,
            started: None,
            congested: false,
            congestion_seen: None,
            stats: SenderStats::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &SenderConfig {
        &self.config
    }

    /// Counters so far.
    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    /// Whether the path cannot carry the stream right now: a shard has waited
    /// in the queue for more than 100 ms, or shards expired in it, within the
    /// last second. While it is, no parity beyond the policy's floor is sent up front.
    pub fn is_congested(&self) -> bool {
        self.congested
    }

    /// Datagram bytes waiting in the sender.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The stream's rate as measured from the blocks pushed, bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The path's smoothed RTT, from quinn.
    ///
    /// Repair decisions use it as it is. What may still leave for a block
    /// uses the smallest RTT seen instead: a shard travels one way at the
    /// path's propagation delay plus whatever queue it meets, and the
    /// smoothed RTT, inflated for a while by loss of acknowledgments, would
    /// expire shards that can still arrive. Expiring on it, with a budget
    /// near one round trip, drops every shard; the connection then sends
    /// nothing that could bring the estimate back down.
    pub fn set_rtt(&mut self, rtt: Duration) {
        self.rtt = rtt;
        if !rtt.is_zero() {
            self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
    }

    /// The shard loss to plan parity for (an upper estimate from the
    /// viewer's reports), or `None` before the first estimate.
    pub fn set_loss(&mut self, loss: Option<f64>) {
        self.loss = loss.map(|l| if l.is_nan() { 1.0 } else { l.clamp(0.0, 1.0) });
    }

    /// Repair rounds that fit in the budget: a block's shards leave, reach the
    /// viewer (half the RTT), it waits its reordering allowance, asks, and the
    /// answer comes back a round trip later, spread over a few shards.
    pub fn repair_rounds(&self) -> u32 {
        if !self.config.repair {
            return 0;
        }
        let answer = self.config.repair_spacing * 4;
        let span = self.send_span();
        let round = self.config.repair_delay + self.rtt + answer;
        let first = self.rtt / 2 + span + round;
        if self.config.latency < first {
            0
        } else if self.config.latency < first + round {
            1
        } else {
            2
        }
    }

    /// How long a typical block takes to leave, from the pacing rate.
    fn send_span(&self) -> Duration {
        let typical = self.retained.back().map_or(0, |r| r.block.wire_bytes(0));
        let beyond = typical.saturating_sub(self.config.burst) as f64;
        Duration::from_secs_f64(beyond / self.pace_rate())
    }

    fn pace_rate(&self) -> f64 {
        (self.rate * self.config.pacing_gain).max(MIN_PACE)
    }

    /// The loss parity is planned for at `now`.
    fn planned_loss(&self, now: Instant) -> Option<f64> {
        let young = self
            .joined
            .is_none_or(|j| now.saturating_duration_since(j) < STARTUP);
        match self.loss {
            Some(l) if young => Some(l.max(self.config.startup_loss)),
            Some(l) => Some(l),
            None => None,
        }
    }

    /// The plan for groups of `k` data shards encoded with `m` parity.
    fn plan(&mut self, now: Instant, k: usize, m: usize) -> RepairPlan {
        let rounds = self.repair_rounds();
        let repair = self.config.repair && rounds > 0;
        let plan = match self.config.parity {
            Parity::All => RepairPlan::uniform(m as u8, u8::from(repair)),
            Parity::Fixed(n) => RepairPlan::uniform(n.min(m) as u8, u8::from(repair)),
            Parity::Adaptive => {
                let loss = self.planned_loss(now);
                let key = (loss.map_or(u64::MAX, f64::to_bits), rounds, self.congested);
                if key != self.plan_key {
                    self.plans.iter_mut().for_each(|p| *p = None);
                    self.plan_key = key;
                }
                let k = k.min(MAX_SHARDS - 1);
                let congested = self.congested;
                let policy = &self.config.policy;
                *self.plans[k].get_or_insert_with(|| match loss {
                    // Before any estimate: everything encoded, unless repair can help.
                    None if !repair => RepairPlan::uniform(m as u8, 0),
                    None => policy.plan(k, self.config.startup_loss, rounds),
                    Some(_) if congested => policy.plan(k, 0.0, 0),
                    Some(l) => policy.plan(k, l, rounds),
                })
            }
        };
        let mut plan = if repair { plan } else { plan.without_repair() };
        plan.parity = plan.parity.min(m as u8);
        plan
    }

    /// Queues block `block`, published at `at` (the instant its timestamp
    /// stands for), with the parity its groups need.
    ///
    /// Shards are queued round-robin across the block's code groups, so a
    /// burst of losses is spread over the groups instead of emptying one.
    pub fn push_block(&mut self, now: Instant, block: Arc<EncodedBlock>, at: Instant) {
        self.joined.get_or_insert(now);
        self.measure_rate(now, block.wire_bytes(0));
        self.stats.blocks += 1;
        let deadline = at + self.config.latency;
        let leave_by = self.leave_by(deadline);
        let mut groups = Vec::with_capacity(block.groups().len());
        let mut cursors: Vec<(&[Bytes], usize)> = Vec::with_capacity(groups.capacity());
        for (k, m, datagrams) in block.groups() {
            let plan = self.plan(now, k, m);
            let parity = usize::from(plan.parity);
            self.stats.parity_sent += parity as u64;
            groups.push(GroupSent {
                parity_used: plan.parity,
                queued: (k + parity) as u16,
                answered: 0,
                last_answer: None,
                stride: 0,
            });
            cursors.push((&datagrams[..k + parity], 0));
        }
        let seq = block.seq();
        let mut left = true;
        while left {
            left = false;
            for (g, (datagrams, next)) in cursors.iter_mut().enumerate() {
                if let Some(d) = datagrams.get(*next) {
                    *next += 1;
                    left = true;
                    self.queued_bytes += d.len();
                    self.queue.push_back(Queued {
                        datagram: d.clone(),
                        at: now,
                        leave_by,
                        seq,
                        group: g as u8,
                    });
                }
            }
        }
        self.retained.push_back(Retained {
            block,
            deadline,
            groups,
        });
        self.enforce_bounds(now);
    }

    /// The latest a shard of a block due at the viewer by `deadline` may leave.
    fn leave_by(&self, deadline: Instant) -> Instant {
        let rtt = self.min_rtt.map_or(self.rtt, |m| m.min(self.rtt));
        deadline.checked_sub(rtt / 2).unwrap_or(deadline)
    }

    fn measure_rate(&mut self, now: Instant, bytes: usize) {
        let first = self.window.is_none() || self.windows == 0;
        let (start, sum) = self.window.get_or_insert((now, 0));
        *sum += bytes as u64;
        let elapsed = now.saturating_duration_since(*start);
        if elapsed >= RATE_WINDOW {
            self.rate = *sum as f64 / elapsed.as_secs_f64();
            self.window = Some((now, 0));
            self.windows += 1;
        } else if first {
            // Until a whole window has passed, every block refines the rate,
            // over at least 20 ms so the first block alone does not read as
            // a burst of infinite rate.
            self.rate = *sum as f64 / elapsed.max(Duration::from_millis(20)).as_secs_f64();
        }
    }

    /// Answers a viewer's repair request, read at `now`.
    ///
    /// Each `(block, group, attempt)` is answered once, whatever the number of
    /// copies that arrive. The answer is the group's deficit (its `k` less the
    /// shards the viewer holds and those still queued for it) plus the
    /// policy's margin, taken from parity the viewer was never sent and then
    /// from the data shards it lacks, and only if it can arrive before the
    /// block's deadline.
    pub fn handle_repair(&mut self, now: Instant, entries: &[RepairEntry]) {
        for e in entries {
            self.stats.repairs_asked += 1;
            if !self.config.repair {
                self.stats.repairs_expired += 1;
                continue;
            }
            self.answer(now, e);
        }
    }

    fn answer(&mut self, now: Instant, e: &RepairEntry) {
        let Some(i) = self.retained_index(e.seq) else {
            self.stats.repairs_expired += 1;
            return;
        };
        let leave_by = self.leave_by(self.retained[i].deadline);
        if now >= leave_by {
            self.stats.repairs_expired += 1;
            return;
        }
        let block = self.retained[i].block.clone();
        let g = usize::from(e.group);
        let Some((k, m, datagrams)) = block.groups().nth(g) else {
            self.stats.repairs_unneeded += 1;
            return;
        };
        let bit = 1u8 << e.attempt.min(MAX_REPAIR_ATTEMPTS - 1);
        let sent = self.retained[i].groups[g];
        if sent.answered & bit != 0 {
            self.stats.repairs_unneeded += 1;
            return;
        }
        self.retained[i].groups[g].answered |= bit;
        // Only indices that exist count as held.
        let held = (0..k + m).filter(|&i| e.seen.contains(i as u8)).count();
        let deficit = k.saturating_sub(held + usize::from(sent.queued));
        if deficit == 0 {
            self.stats.repairs_unneeded += 1;
            return;
        }
        let margin = if self.congested {
            0
        } else {
            usize::from(self.plan(now, k, m).margin(deficit))
                + usize::from(e.attempt)
                + burst_margin(deficit)
        };
        let want = deficit + margin;
        // Fresh parity first (the viewer cannot hold it already), then the
        // data shards it lacks, then parity it was sent but lost.
        let fresh = k + usize::from(sent.parity_used)..k + m;
        let lacking = (0..k + usize::from(sent.parity_used)).filter(|&i| !e.seen.contains(i as u8));
        let mut used = sent.parity_used;
        let mut picked = 0u16;
        // Half the time left spreads the answer, the rest covers the path
        // and a late start behind other answers.
        let spacing = (leave_by.saturating_duration_since(now) / (2 * want.max(1) as u32))
            .min(MAX_ANSWER_SPACING)
            .max(self.config.repair_spacing);
        for idx in fresh.chain(lacking).take(want) {
            if idx >= k + usize::from(used) {
                used += 1;
            }
            let d = datagrams[idx].clone();
            self.queued_bytes += d.len();
            let at = now + spacing * u32::from(picked);
            // Answers interleave: each shard waits in order of when it may leave.
            let pos = self.repairs.partition_point(|q| q.at <= at);
            self.repairs.insert(
                pos,
                Queued {
                    datagram: d,
                    at,
                    leave_by,
                    seq: e.seq,
                    group: e.group,
                },
            );
            picked += 1;
        }
        // As far apart on the wire as the stream's datagrams before
        // `leave_by` allow, at most ANSWER_STRIDE.
        let shard = datagrams[0].len().max(1) as f64;
        let slots = leave_by.saturating_duration_since(now).as_secs_f64() * self.rate / shard;
        let stride = (slots / (want + 1) as f64).clamp(0.0, ANSWER_STRIDE as f64) as u8;
        let group = &mut self.retained[i].groups[g];
        group.parity_used = used;
        group.queued += picked;
        group.stride = stride;
        self.stats.repairs_answered += 1;
    }

    /// The next datagram to send at `now`, if pacing allows and it fits in
    /// `space` bytes (quinn's free datagram send buffer), or `None`.
    ///
    /// Repair answers go first, spaced by
    /// [`repair_spacing`](SenderConfig::repair_spacing); shards whose block
    /// can no longer arrive in time are dropped and counted instead. Never
    /// overfilling quinn's buffer means quinn never evicts a datagram, so what
    /// leaves here is what the path is offered.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, space: usize) -> Option<Bytes> {
        self.handle_timeout(now);
        self.refill(now);
        while self.drop_hopeless_block(now, space) {}
        let repair = if self.next_repair.is_none_or(|t| t <= now) {
            self.repairs
                .iter()
                .take(ANSWER_SCAN)
                .take_while(|q| q.at <= now)
                .position(|q| self.repair_ready_at(q) <= now)
        } else {
            None
        };
        let head = match repair {
            Some(i) => &self.repairs[i],
            None => self.queue.front()?,
        };
        let len = head.datagram.len();
        if len > space {
            self.space_blocked = true;
            return None;
        }
        self.space_blocked = false;
        if self.tokens < len as f64 {
            return None;
        }
        let q = if let Some(i) = repair {
            self.next_repair = Some(now + self.config.repair_spacing);
            self.stats.repair_shards += 1;
            let q = self.repairs.remove(i)?;
            let sent = self.stats.datagrams + 1;
            if let Some(g) = self.group_mut(q.seq, q.group) {
                g.last_answer = Some(sent);
            }
            q
        } else {
            let q = self.queue.pop_front()?;
            self.started = Some(q.seq);
            q
        };
        self.tokens -= len as f64;
        self.unqueue(&q);
        self.stats.datagrams += 1;
        self.stats.bytes += len as u64;
        self.measure_drain(now, len);
        Some(q.datagram)
    }

    /// On a congested path, drops the block at the head of the queue whole
    /// if none of it has left yet, quinn cannot take all of it now
    /// (`space`), and, at the rate quinn has been taking
    /// datagrams, its shards could not all leave before its `leave_by`.
    ///
    /// Without this, a path that carries only part of the stream gets a part
    /// of every block, and every block is lost: the shards of each block
    /// expire at the back of a queue that never drains. Dropping whole
    /// blocks up front lets the ones that start finish.
    fn drop_hopeless_block(&mut self, now: Instant, space: usize) -> bool {
        let Some(head) = self.queue.front() else {
            return false;
        };
        if !self.congested || self.started == Some(head.seq) || self.drain_rate <= 0.0 {
            return false;
        }
        let (seq, leave_by) = (head.seq, head.leave_by);
        let bytes: usize = self
            .queue
            .iter()
            .take_while(|q| q.seq == seq)
            .map(|q| q.datagram.len())
            .sum();
        // Only while quinn is what limits: the drain rate is then the path's.
        // Otherwise it is merely what was offered, and after a few dropped
        // blocks it would call every later block hopeless, forever.
        if bytes <= space {
            return false;
        }
        let done = now + Duration::from_secs_f64(bytes as f64 / self.drain_rate);
        if done <= leave_by {
            return false;
        }
        while self.queue.front().is_some_and(|q| q.seq == seq) {
            if let Some(q) = self.queue.pop_front() {
                self.unqueue(&q);
                self.stats.expired += 1;
            }
        }
        self.stats.blocks_dropped += 1;
        self.congestion_seen = Some(now);
        tracing::trace!(seq, "block dropped whole: it could not leave in time");
        true
    }

    fn measure_drain(&mut self, now: Instant, bytes: usize) {
        let (start, sum) = self.drain_window.get_or_insert((now, 0));
        *sum += bytes as u64;
        let elapsed = now.saturating_duration_since(*start);
        if elapsed >= DRAIN_WINDOW {
            self.drain_rate = *sum as f64 / elapsed.as_secs_f64();
            self.drain_window = Some((now, 0));
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(at) = self.tokens_at {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + dt * self.pace_rate()).min(self.config.burst as f64);
        }
        self.tokens_at = Some(now);
    }

    fn unqueue(&mut self, q: &Queued) {
        self.queued_bytes -= q.datagram.len();
        if let Some(g) = self.group_mut(q.seq, q.group) {
            g.queued = g.queued.saturating_sub(1);
        }
    }

    /// Where block `seq` is in `retained` (kept in sequence order).
    fn retained_index(&self, seq: u64) -> Option<usize> {
        self.retained
            .binary_search_by_key(&seq, |r| r.block.seq())
            .ok()
    }

    fn group(&self, seq: u64, group: u8) -> Option<&GroupSent> {
        self.retained[self.retained_index(seq)?]
            .groups
            .get(usize::from(group))
    }

    fn group_mut(&mut self, seq: u64, group: u8) -> Option<&mut GroupSent> {
        let i = self.retained_index(seq)?;
        self.retained[i].groups.get_mut(usize::from(group))
    }

    /// The earliest repair shard `q` may leave: its own time once
    /// its answer's stride of datagrams (at most [`ANSWER_STRIDE`]) has left
    /// since the previous shard of its answer, otherwise at most
    /// [`ANSWER_STRIDE_WAIT`] later and never later than its `leave_by` allows.
    fn repair_ready_at(&self, q: &Queued) -> Instant {
        let Some(g) = self.group(q.seq, q.group) else {
            return q.at;
        };
        match g.last_answer.map(|n| n + u64::from(g.stride)) {
            Some(n) if self.stats.datagrams < n => {
                // Not longer than about one block of a typical stream, and
                // early enough that the shards still queued leave a repair
                // spacing apart before `leave_by`.
                let lead = ANSWER_FORCE + self.config.repair_spacing * 2 * u32::from(g.queued);
                let forced = q.leave_by.checked_sub(lead).unwrap_or(q.leave_by);
                q.at.max(forced.min(q.at + ANSWER_STRIDE_WAIT))
            }
            _ => q.at,
        }
    }

    /// When to call [`poll_transmit`](Self::poll_transmit) again: the pacer's
    /// next token, the next repair slot, or soon when quinn had no space.
    /// `None` when nothing waits.
    #[must_use]
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let head = self.repairs.front().or(self.queue.front())?;
        if self.space_blocked {
            return Some(now + SPACE_RETRY);
        }
        let need = head.datagram.len() as f64 - self.tokens;
        let pacer = (need > 0.0).then(|| now + Duration::from_secs_f64(need / self.pace_rate()));
        let repair = if self.queue.is_empty() {
            let first = self
                .repairs
                .iter()
                .take(ANSWER_SCAN)
                .map(|q| self.repair_ready_at(q))
                .min();
            first.max(self.next_repair).filter(|t| *t > now)
        } else {
            None
        };
        Some(pacer.into_iter().chain(repair).max().unwrap_or(now))
    }

    /// Drops what can no longer arrive in time and blocks past their deadline,
    /// and updates the congestion state.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut expired = false;
        for from_repairs in [false, true] {
            loop {
                let q = if from_repairs {
                    &mut self.repairs
                } else {
                    &mut self.queue
                };
                match q.front() {
                    Some(head) if head.leave_by <= now => {}
                    _ => break,
                }
                if let Some(dropped) = q.pop_front() {
                    self.unqueue(&dropped);
                    self.stats.expired += 1;
                    expired |= !from_repairs;
                }
            }
        }
        while self
            .retained
            .front()
            .is_some_and(|r| r.deadline <= now || self.retained.len() > MAX_RETAINED)
        {
            self.retained.pop_front();
        }
        let backlog = self
            .queue
            .front()
            .map_or(Duration::ZERO, |q| now.saturating_duration_since(q.at));
        if expired || backlog > CONGESTED_BACKLOG {
            if !self.congested {
                self.congested = true;
                self.stats.congestion_events += 1;
                tracing::debug!(backlog = ?backlog, "path cannot carry the stream");
            }
            self.congestion_seen = Some(now);
        } else if self
            .congestion_seen
            .is_some_and(|t| now.saturating_duration_since(t) >= CONGESTION_CLEAR)
        {
            self.congested = false;
            self.congestion_seen = None;
        }
    }

    fn enforce_bounds(&mut self, now: Instant) {
        while self.queued_bytes > self.config.max_queue {
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            self.unqueue(&q);
            self.stats.expired += 1;
            self.congestion_seen = Some(now);
        }
        self.handle_timeout(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        fec::{Encoder, FecConfig},
        wire::{Flags, ShardHeader, ShardSet},
    };

    const RTT: Duration = Duration::from_millis(40);

    fn encoder(redundancy: f64) -> Encoder {
        let mut fc = FecConfig::default();
        fc.set_redundancy(redundancy).unwrap();
        Encoder::new(1, fc)
    }

    fn block(enc: &mut Encoder, seq: u64, len: usize) -> Arc<EncodedBlock> {
        Arc::new(enc.encode(seq, 0, Flags::empty(), &vec![7u8; len]).unwrap())
    }

    fn header(d: &Bytes) -> ShardHeader {
        ShardHeader::decode_datagram(d).unwrap().0
    }

    /// Everything `poll_transmit` hands out at `now` with unlimited space.
    fn drain(s: &mut Sender, now: Instant) -> Vec<ShardHeader> {
        std::iter::from_fn(|| s.poll_transmit(now, usize::MAX))
            .map(|d| header(&d))
            .collect()
    }

    fn sender(latency_ms: u64) -> Sender {
        Sender::new(SenderConfig::new(Duration::from_millis(latency_ms)), RTT)
    }

    #[test]
    fn rounds_follow_the_budget() {
        assert_eq!(sender(30).repair_rounds(), 0, "below one RTT");
        assert_eq!(sender(100).repair_rounds(), 1);
        assert_eq!(sender(200).repair_rounds(), 2);
        let mut off = SenderConfig::new(Duration::from_millis(200));
        off.repair(false);
        assert_eq!(Sender::new(off, RTT).repair_rounds(), 0);
    }

    #[test]
    fn a_repair_round_lowers_parity_sent_up_front() {
        let mut enc = encoder(0.5);
        let t0 = Instant::now();
        let mut tight = sender(30);
        let mut roomy = sender(100);
        for s in [&mut tight, &mut roomy] {
            s.set_loss(Some(0.05));
            // Past the startup floor.
            s.push_block(t0, block(&mut enc, 0, 1000), t0);
            let t = t0 + STARTUP;
            drain(s, t0);
            s.push_block(t, block(&mut enc, 1, 21_056), t);
        }
        let t = t0 + STARTUP;
        let parity = |s: &mut Sender| drain(s, t).iter().filter(|h| !h.is_data()).count();
        let (a, b) = (parity(&mut tight), parity(&mut roomy));
        assert_eq!(a, 7, "no round: binomial parity for k = 20 at 5%");
        assert!(b < a && b >= 1, "one round: {b}");
    }

    #[test]
    fn startup_floor_protects_until_reports_settle() {
        let mut enc = encoder(0.5);
        let t0 = Instant::now();
        let mut s = sender(30);
        s.set_loss(Some(0.01));
        s.push_block(t0, block(&mut enc, 0, 21_056), t0);
        let early = drain(&mut s, t0).iter().filter(|h| !h.is_data()).count();
        let t = t0 + STARTUP;
        s.push_block(t, block(&mut enc, 1, 21_056), t);
        let later = drain(&mut s, t).iter().filter(|h| !h.is_data()).count();
        assert!(early > later, "startup {early}, settled {later}");
        assert_eq!(early, RedundancyPolicy::default().parity_for(20, 0.1));
    }

    #[test]
    fn groups_are_interleaved() {
        let mut fc = FecConfig::default();
        fc.set_max_data_shards(8).unwrap();
        let mut enc = Encoder::new(1, fc);
        let t0 = Instant::now();
        let mut s = sender(30);
        s.set_loss(Some(0.0));
        s.push_block(t0, block(&mut enc, 0, 1100 * 24), t0);
        let order: Vec<u8> = drain(&mut s, t0).iter().map(|h| h.group).collect();
        assert_eq!(&order[..6], &[0, 1, 2, 0, 1, 2], "{order:?}");
    }

    #[test]
    fn expired_shards_are_never_sent() {
        let mut enc = encoder(0.25);
        let t0 = Instant::now();
        let mut s = sender(100);
        s.push_block(t0, block(&mut enc, 0, 21_056), t0);
        // Quinn takes nothing for longer than the budget less half an RTT.
        assert!(s.poll_transmit(t0, 0).is_none());
        let late = t0 + Duration::from_millis(100) - RTT / 2;
        assert!(s.poll_transmit(late, usize::MAX).is_none());
        let st = s.stats();
        assert_eq!(st.datagrams, 0);
        assert!(st.expired >= 20, "{st:?}");
        assert!(s.is_congested(), "expiry in the queue is congestion");
        assert_eq!(s.queued_bytes(), 0);
    }

    #[test]
    fn never_overfills_quinn_and_asks_again_soon() {
        let mut enc = encoder(0.25);
        let t0 = Instant::now();
        let mut s = sender(1000);
        s.push_block(t0, block(&mut enc, 0, 21_056), t0);
        let d = s.poll_transmit(t0, 5000).unwrap();
        let space = 5000 - d.len();
        let mut n = 1;
        let mut left = space;
        while let Some(d) = s.poll_transmit(t0, left) {
            left -= d.len();
            n += 1;
        }
        assert_eq!(n, 4, "four ~1 KB datagrams fit in 5000 bytes");
        assert_eq!(s.poll_timeout(t0), Some(t0 + SPACE_RETRY));
    }

    #[test]
    fn large_blocks_are_paced() {
        let mut enc = encoder(0.1);
        let t0 = Instant::now();
        let mut s = sender(5000);
        s.set_loss(Some(0.0));
        // Establish a rate of ~1 MB/s: 100 KB blocks every 100 ms.
        let mut t = t0;
        for seq in 0..15 {
            s.push_block(t, block(&mut enc, seq, 100_000), t);
            t += Duration::from_millis(100);
            drain_until(&mut s, t);
        }
        let rate = s.rate();
        assert!((800_000.0..1_300_000.0).contains(&rate), "rate {rate}");
        s.push_block(t, block(&mut enc, 15, 1_000_000), t);
        let burst: usize = std::iter::from_fn(|| s.poll_transmit(t, usize::MAX))
            .map(|d| d.len())
            .sum();
        assert!(burst <= DEFAULT_BURST + 1500, "first burst {burst}");
        // The rest leaves at about twice the stream's rate: ~0.5 s for 1 MB.
        let next = s.poll_timeout(t).unwrap();
        assert!(next > t);
        let done = drain_until(&mut s, t + Duration::from_secs(2));
        let secs = done.saturating_duration_since(t).as_secs_f64();
        assert!((0.3..0.8).contains(&secs), "1 MB took {secs} s");
        assert_eq!(s.stats().expired, 0);
    }

    /// Sends as the pacer allows until `end`; returns when the queue emptied.
    fn drain_until(s: &mut Sender, end: Instant) -> Instant {
        let mut t = s.tokens_at.unwrap_or(end);
        loop {
            while s.poll_transmit(t, usize::MAX).is_some() {}
            match s.poll_timeout(t) {
                Some(next) if next <= end => t = next.max(t + Duration::from_micros(10)),
                Some(_) => return end,
                None => return t,
            }
        }
    }

    fn request(seq: u64, group: u8, attempt: u8, held: impl Iterator<Item = u8>) -> RepairEntry {
        let mut seen = ShardSet::default();
        held.for_each(|i| seen.insert(i));
        RepairEntry {
            seq,
            group,
            attempt,
            seen,
        }
    }

    /// Everything the sender hands out from `now` on, following its timer.
    fn drain_all(s: &mut Sender, mut now: Instant) -> (Vec<ShardHeader>, Instant) {
        let mut got = drain(s, now);
        while let Some(next) = s.poll_timeout(now) {
            now = next.max(now + Duration::from_micros(10));
            got.extend(drain(s, now));
        }
        (got, now)
    }

    fn settled(latency_ms: u64, loss: f64) -> Sender {
        let mut cfg = SenderConfig::new(Duration::from_millis(latency_ms));
        cfg.startup_loss(0.0);
        let mut s = Sender::new(cfg, RTT);
        s.set_loss(Some(loss));
        s
    }

    /// An answer is spread over the time its block has left, never two of
    /// its shards back to back on the wire while another answer has shards
    /// to send, so one loss burst meets few of them; a second answer does not
    /// wait behind the first, and everything leaves by `leave_by`.
    #[test]
    fn answers_are_spread_over_the_time_left_and_interleave() {
        let mut enc = encoder(0.5);
        let t0 = Instant::now();
        let mut s = settled(100, 0.05);
        for seq in 0..2 {
            s.push_block(t0, block(&mut enc, seq, 21_056), t0);
        }
        drain(&mut s, t0);
        let t = t0 + Duration::from_millis(30);
        // Both blocks short by four data shards.
        let held = || (0..20u8).filter(|i| !(3..7).contains(i));
        s.handle_repair(t, &[request(0, 0, 0, held()), request(1, 0, 0, held())]);
        let mut now = t;
        let mut sent: Vec<(u64, Instant)> = Vec::new();
        while let Some(next) = s.poll_timeout(now) {
            now = next.max(now + Duration::from_micros(10));
            sent.extend(
                std::iter::from_fn(|| s.poll_transmit(now, usize::MAX))
                    .map(|d| (header(&d).seq, now)),
            );
        }
        let of = |seq| {
            sent.iter()
                .filter(|(s, _)| *s == seq)
                .map(|(_, at)| *at)
                .collect::<Vec<_>>()
        };
        let (a, b) = (of(0), of(1));
        assert!(a.len() >= 5 && b.len() >= 5, "{sent:?}");
        // Leave by is 80 ms (deadline less half the 40 ms RTT).
        for w in a.windows(2).chain(b.windows(2)) {
            assert!(w[1] - w[0] >= DEFAULT_REPAIR_SPACING, "{sent:?}");
        }
        // On the wire the answers alternate until the shorter one is done.
        let order: Vec<u64> = sent.iter().map(|(seq, _)| *seq).collect();
        let both = 2 * a.len().min(b.len()) - 1;
        for w in order[..both].windows(2) {
            assert_ne!(
                w[0], w[1],
                "two shards of one answer back to back: {order:?}"
            );
        }
        assert!(
            b[0] < a[1],
            "the second answer starts before the first ends"
        );
        assert!(*a.last().unwrap() < t0 + Duration::from_millis(80));
    }

    #[test]
    fn repair_sends_fresh_parity_once_per_attempt_and_only_in_time() {
        let mut enc = encoder(0.5);
        let t0 = Instant::now();
        let mut s = settled(100, 0.05);
        s.push_block(t0, block(&mut enc, 0, 21_056), t0);
        let sent = drain(&mut s, t0);
        let proactive = sent.iter().filter(|h| !h.is_data()).count();
        assert!(proactive < 4, "{proactive}");
        // The viewer lost data shards 3, 4, 5 and 6 and holds the rest.
        let held = (0..(20 + proactive) as u8).filter(|i| !(3..7).contains(i));
        let ask = request(0, 0, 0, held.clone());
        let t = t0 + Duration::from_millis(30);
        // Three copies of the same request are answered once.
        s.handle_repair(t, &[ask, ask, ask]);
        assert_eq!(drain(&mut s, t).len(), 1, "answer shards are spaced");
        let (got, now) = drain_all(&mut s, t);
        let margin =
            usize::from(s.plan(t, 20, 10).margin(4 - proactive)) + burst_margin(4 - proactive);
        assert!(margin >= 2);
        assert_eq!(got.len() + 1, 4 - proactive + margin);
        let st = s.stats();
        assert_eq!(
            (st.repairs_asked, st.repairs_answered, st.repairs_unneeded),
            (3, 1, 2)
        );
        assert_eq!(st.repair_shards as usize, 4 - proactive + margin);
        // A second attempt gets more parity, none sent before.
        s.handle_repair(now, &[request(0, 0, 1, held)]);
        let (again, _) = drain_all(&mut s, now);
        assert!(!again.is_empty());
        for h in &again {
            if h.is_data() {
                assert!((3..7).contains(&h.index), "only data it lacks: {}", h.index);
            } else {
                assert!(
                    usize::from(h.index) >= 20 + proactive,
                    "parity it was never sent"
                );
                assert!(got.iter().all(|g| g.index != h.index), "not sent before");
            }
        }
        // Too late: the answer could not arrive by the deadline.
        let mut enc2 = encoder(0.5);
        let mut late = settled(100, 0.05);
        late.push_block(t0, block(&mut enc2, 5, 21_056), t0);
        drain(&mut late, t0);
        late.handle_repair(t0 + Duration::from_millis(81), &[request(5, 0, 0, 0..3)]);
        assert_eq!(late.stats().repairs_expired, 1);
        assert_eq!(late.stats().repair_shards, 0);
        // Unknown blocks and groups are counted, not an error.
        late.handle_repair(t0, &[request(99, 0, 0, 0..3), request(5, 9, 0, 0..3)]);
        assert_eq!(late.stats().repairs_expired, 2);
        assert_eq!(late.stats().repairs_unneeded, 1);
    }

    #[test]
    fn repair_counts_shards_still_queued() {
        let mut enc = encoder(0.5);
        let t0 = Instant::now();
        let mut s = settled(100, 0.05);
        s.push_block(t0, block(&mut enc, 0, 21_056), t0);
        // Only 10 shards have left; the viewer holds 9 of them.
        for _ in 0..10 {
            s.poll_transmit(t0, usize::MAX).unwrap();
        }
        s.handle_repair(t0, &[request(0, 0, 0, 1..10)]);
        assert_eq!(s.stats().repairs_unneeded, 1, "the rest is on its way");
    }

    #[test]
    fn exhausted_parity_falls_back_to_missing_data() {
        let mut enc = encoder(0.1);
        let t0 = Instant::now();
        let mut cfg = SenderConfig::new(Duration::from_millis(100));
        cfg.parity(Parity::All);
        let mut s = Sender::new(cfg, RTT);
        s.push_block(t0, block(&mut enc, 0, 21_056), t0);
        let sent = drain(&mut s, t0);
        assert_eq!(sent.len(), 22);
        // Lost data 0..4 and both parity shards.
        s.handle_repair(t0, &[request(0, 0, 0, 4..20)]);
        let (got, _) = drain_all(&mut s, t0);
        let idx: Vec<u8> = got.iter().map(|h| h.index).collect();
        assert_eq!(&idx[..4], &[0, 1, 2, 3], "{idx:?}");
        assert!(idx.len() >= 5, "deficit plus margin: {idx:?}");
    }

    /// With a long budget and no stream to ride (rare large blocks), an
    /// answer is not held back until just before its block's deadline.
    #[test]
    fn an_answer_does_not_wait_long_for_a_stream_to_ride() {
        let mut enc = encoder(0.5);
        let t0 = Instant::now();
        let mut s = settled(2_000, 0.05);
        s.push_block(t0, block(&mut enc, 0, 21_056), t0);
        drain(&mut s, t0);
        let t = t0 + Duration::from_millis(30);
        let held = (0..20u8).filter(|i| !(3..9).contains(i));
        s.handle_repair(t, &[request(0, 0, 0, held)]);
        let mut now = t;
        let mut last = t;
        let mut got = 0;
        while let Some(next) = s.poll_timeout(now) {
            now = next.max(now + Duration::from_micros(10));
            let n = drain(&mut s, now).len();
            if n > 0 {
                got += n;
                last = now;
            }
        }
        assert!(got >= 6, "{got}");
        assert!(
            last - t < Duration::from_millis(300),
            "the answer took {:?}",
            last - t
        );
    }

    /// A smoothed RTT inflated past the budget (acknowledgments lost for a
    /// while) does not expire shards the path can still carry in time.
    #[test]
    fn an_inflated_rtt_does_not_expire_shards_that_can_arrive() {
        let mut enc = encoder(0.5);
        let t0 = Instant::now();
        let mut s = sender(30);
        s.set_loss(Some(0.0));
        s.set_rtt(Duration::from_millis(58));
        s.push_block(t0, block(&mut enc, 0, 21_056), t0);
        let got = drain(&mut s, t0 + Duration::from_millis(2));
        assert!(got.len() >= 20, "{} shards left", got.len());
        assert_eq!(s.stats().expired, 0);
    }

    /// A stall that drops blocks (the path was congested) does not make
    /// every later block look hopeless once quinn takes all it is offered.
    #[test]
    fn blocks_flow_again_after_a_stall() {
        let mut enc = encoder(0.5);
        let t0 = Instant::now();
        let mut s = sender(30);
        s.set_loss(Some(0.0));
        let mut sent: std::collections::BTreeMap<u64, usize> = Default::default();
        for ms in 0..2000u64 {
            let t = t0 + Duration::from_millis(ms);
            if ms % 20 == 0 {
                s.push_block(t, block(&mut enc, ms / 20, 21_056), t);
            }
            // quinn takes nothing from 200 to 400 ms, then everything.
            let space = if (200..400).contains(&ms) {
                0
            } else {
                usize::MAX
            };
            while let Some(d) = s.poll_transmit(t, space) {
                *sent.entry(header(&d).seq).or_default() += 1;
            }
        }
        assert!(s.stats().expired > 0, "the stall expired shards");
        let after: Vec<u64> = (30..100)
            .filter(|q| sent.get(q).is_none_or(|&n| n < 20))
            .collect();
        assert!(after.is_empty(), "blocks short after the stall: {after:?}");
    }

    /// A path that carries half the stream gets whole blocks, not half of
    /// every block (which would lose them all).
    #[test]
    fn an_overloaded_path_gets_whole_blocks() {
        let mut enc = encoder(0.5);
        let t0 = Instant::now();
        let mut s = sender(100);
        s.set_loss(Some(0.0));
        let mut handed: std::collections::BTreeMap<u64, usize> = Default::default();
        let mut seq = 0;
        // A 21 KB block (20 data shards) every 10 ms; the path takes one
        // datagram per ms from quinn's buffer (8 datagrams), about half of
        // what the stream needs, and the sender fills the buffer as the
        // server does, until it says no.
        let mut quinn: VecDeque<Bytes> = VecDeque::new();
        let cap = 8 * 1_100;
        for ms in 0..3000u64 {
            let t = t0 + Duration::from_millis(ms);
            if ms % 10 == 0 {
                s.push_block(t, block(&mut enc, seq, 21_056), t);
                seq += 1;
            }
            if let Some(d) = quinn.pop_front() {
                let h = header(&d);
                if h.is_data() {
                    *handed.entry(h.seq).or_default() += 1;
                }
            }
            loop {
                let space = cap - quinn.iter().map(Bytes::len).sum::<usize>();
                match s.poll_transmit(t, space) {
                    Some(d) => quinn.push_back(d),
                    None => break,
                }
            }
        }
        assert!(s.is_congested());
        // Past the first half second (before the path was found congested).
        let steady = 50..seq - 10;
        let blocks = (seq - 60) as usize;
        let whole = steady
            .clone()
            .filter(|q| handed.get(q) == Some(&20))
            .count();
        let partial = steady
            .clone()
            .filter(|q| handed.get(q).is_some_and(|&n| n < 20))
            .count();
        let st = s.stats();
        println!(
            "whole {whole}, partial {partial} of {} blocks; {st:?}",
            blocks
        );
        assert!(partial <= 3, "partial blocks waste the path: {partial}");
        assert!(whole * 10 >= blocks * 3, "whole blocks: {whole}");
        assert!(st.blocks_dropped > 0);
        assert!(
            s.queued_bytes() < 200 * 1024,
            "queue bounded: {}",
            s.queued_bytes()
        );
    }

    #[test]
    fn congestion_stops_adding_parity() {
        let mut enc = encoder(0.5);
        let t0 = Instant::now();
        let mut s = sender(100);
        s.set_loss(Some(0.2));
        let mut t = t0 + STARTUP;
        // Quinn takes nothing: the queue grows past 100 ms of the stream.
        for seq in 0..20 {
            s.push_block(t, block(&mut enc, seq, 21_056), t);
            assert!(s.poll_transmit(t, 0).is_none());
            t += Duration::from_millis(21);
        }
        assert!(s.is_congested());
        assert_eq!(s.stats().congestion_events, 1);
        s.push_block(t, block(&mut enc, 20, 21_056), t);
        let (all, _) = drain_all(&mut s, t);
        let last: Vec<_> = all.iter().filter(|h| h.seq == 20).collect();
        assert_eq!(
            last.iter().filter(|h| !h.is_data()).count(),
            1,
            "the floor only"
        );
        // Bounded: expired shards left the queue.
        assert!(s.stats().expired > 0);
        // A second of calm clears it.
        s.handle_timeout(t + CONGESTION_CLEAR);
        assert!(!s.is_congested());
    }
}
