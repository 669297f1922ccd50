//! The aggregator: viewer events in, per-stream figures and per-viewer parity out.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

use super::{
    event::{Input, InputKind},
    policy::{Level, LossEstimator, ParityLevels, ParityTable, RedundancyPolicy},
    qoe::{QoeInputs, QoeModel},
    snapshot::{
        ratio, seconds, Ignored, JoinBucket, JoinTime, Latency, Parity, Qoe, Snapshot, Spread,
        StreamSnapshot, Window, Windows,
    },
    window::{Counters, Ring, WINDOWS},
};
use crate::wire::{Report, Summary};

/// Default [`AggregatorConfig::max_viewers`].
pub const DEFAULT_MAX_VIEWERS: usize = 100_000;
/// Default [`AggregatorConfig::max_streams`].
pub const DEFAULT_MAX_STREAMS: usize = 1_024;
/// Default [`AggregatorConfig::reference_k`].
pub const DEFAULT_REFERENCE_K: usize = 32;

/// Upper bounds of the join-time buckets, milliseconds (the Prometheus histogram's `le`).
const JOIN_BUCKETS_MS: [u64; 8] = [100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000];
/// Highest join time and latency the histograms resolve; the validator clamps to these.
const MAX_JOIN_MS: u64 = 600_000;
const MAX_LATENCY_US: u64 = 60_000_000;

/// Limits and models for an [`Aggregator`].
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    max_viewers: usize,
    max_streams: usize,
    reference_k: usize,
    policy: RedundancyPolicy,
    qoe: QoeModel,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        Self {
            max_viewers: DEFAULT_MAX_VIEWERS,
            max_streams: DEFAULT_MAX_STREAMS,
            reference_k: DEFAULT_REFERENCE_K,
            policy: RedundancyPolicy::default(),
            qoe: QoeModel::default(),
        }
    }
}

impl AggregatorConfig {
    /// Most viewers tracked at once (default 100 000).
    ///
    /// A viewer costs a few hundred bytes. Joins beyond the cap are counted in
    /// [`Ignored::joins_over_viewer_cap`] and that viewer's later events in
    /// [`Ignored::unknown_viewer`]; the server should cap connections below this.
    pub fn max_viewers(&mut self, value: usize) -> &mut Self {
        self.max_viewers = value;
        self
    }

    /// Most streams tracked at once (default 1024).
    ///
    /// A stream costs about 20 KiB (windows and a join-time histogram) and is kept after its
    /// last viewer leaves, so its totals stay visible, until
    /// [`Aggregator::forget_stream`]. A join naming a new stream beyond the cap is counted in
    /// [`Ignored::joins_over_stream_cap`].
    pub fn max_streams(&mut self, value: usize) -> &mut Self {
        self.max_streams = value;
        self
    }

    /// Data shards per block that [`Summary::parity`] and [`Snapshot`] parity figures are for
    /// (default 32); set it to the server's FEC `k`.
    pub fn reference_k(&mut self, value: usize) -> &mut Self {
        self.reference_k = value;
        self
    }

    /// The redundancy policy behind [`Aggregator::viewer_parity`].
    pub fn policy(&mut self, value: RedundancyPolicy) -> &mut Self {
        self.policy = value;
        self
    }

    /// The viewer cap set by [`max_viewers`](Self::max_viewers).
    pub(crate) fn viewer_cap(&self) -> usize {
        self.max_viewers
    }

    /// The model behind viewer QoE scores.
    pub fn qoe(&mut self, value: QoeModel) -> &mut Self {
        self.qoe = value;
        self
    }
}

/// Turns viewer events into per-stream analytics and per-viewer FEC decisions.
///
/// The aggregator is a pure state machine: [`apply`](Self::apply) takes each event with the
/// instant it happened, and [`snapshot`](Self::snapshot) and
/// [`viewer_summary`](Self::viewer_summary) read the state at an instant the caller picks. It
/// reads no clock, does no I/O and never blocks, so tests drive it with a clock they move, and
/// the server calls it from one task fed by a bounded queue.
///
/// Memory is bounded: viewers and streams are capped by [`AggregatorConfig`], a viewer's state
/// is fixed-size, and windows are rings of one-second buckets. Applying a report does not
/// allocate.
///
/// # How the figures are derived
///
/// - **Loss before FEC** comes from deltas between a viewer's consecutive reports: the
///   growth of the server's `sent_shards` against the growth of the viewer's
///   `shards_received`. Comparing the cumulative counters directly would count every datagram
///   still in flight as lost, because the server's count is read when the report arrives and
///   the viewer's when it was sent, a round trip's worth of datagrams apart. Each delta
///   window is shifted by that same delay at both of its ends, so over a steady path the
///   shift cancels. The first report only sets the baseline. Per interval, the loss counted
///   is the rise of the running maximum of `sent - received` since the baseline, so jitter
///   that makes one interval look negative is not counted as loss twice.
/// - **Loss after FEC** is `blocks_lost / (blocks_delivered + blocks_lost)` from the
///   viewers' own counters.
/// - **Stalls** combine the viewer's `Stall`/`Resume` events (timely) and its reports'
///   `stalls`/`stall_ms` (authoritative, but up to one interval late): per viewer the larger
///   of the two counts, so one stall seen both ways counts once.
/// - **Watch time** is the sum of viewers' time between join and leave, live viewers up to
///   the snapshot's `now`.
/// - **QoE** is scored per viewer on each of its events by the [`QoeModel`]; stream QoE is the
///   mean of live viewers' latest scores.
/// - **Parity**: each report updates the viewer's [`LossEstimator`], and its upper bound picks
///   the viewer's [`ParityTable`].
#[derive(Debug)]
pub struct Aggregator {
    config: AggregatorConfig,
    levels: ParityLevels,
    /// Level for a viewer that has not reported yet (the policy's initial guess).
    initial_level: Level,
    /// The first instant seen; internal times are microseconds since then.
    epoch: Option<Instant>,
    viewers: HashMap<u64, Viewer>,
    /// Indexed by stream id; `None` for a forgotten stream's slot, reused by the next stream.
    streams: Vec<Option<Stream>>,
    free: Vec<u32>,
    by_name: HashMap<Box<str>, u32>,
    overall: Stream,
    applied: u64,
    ignored: Ignored,
}

/// Per-viewer state: fixed size, no heap.
#[derive(Debug)]
struct Viewer {
    stream: u32,
    joined_us: u64,
    /// Watch time is credited to the windows up to here.
    credited_us: u64,
    /// Last report (all zeros before the first).
    last: Report,
    last_sent: u64,
    /// `(sent_shards, shards_received)` at the first report: loss is measured from here.
    base: Option<(u64, u64)>,
    /// Highest `(sent - base) - (received - base)` seen: the shards counted lost so far.
    gap_high: u64,
    startup_recorded: bool,
    stall_events: u64,
    /// Stalled time from closed `Stall`..`Resume` pairs.
    stall_closed_us: u64,
    stalled_since: Option<u64>,
    /// Stalls and stalled time already added to the stream's figures.
    counted_stalls: u64,
    counted_stall_us: u64,
    estimator: LossEstimator,
    level: Level,
    qoe: Option<u8>,
}

impl Viewer {
    /// Stalled time up to `t`: the larger of the event-based and the reported total.
    fn stalled_us(&self, t: u64) -> u64 {
        let ongoing = self.stalled_since.map_or(0, |s| t.saturating_sub(s));
        let from_events = self.stall_closed_us.saturating_add(ongoing);
        from_events.max(self.last.stall_ms.saturating_mul(1_000))
    }

    /// Moves newly known stalls and closed stall time into `d`.
    fn settle_stalls(&mut self, d: &mut Counters) {
        let stalls = self.stall_events.max(self.last.stalls);
        let stall_us = self
            .stall_closed_us
            .max(self.last.stall_ms.saturating_mul(1_000));
        d.stalls = stalls.saturating_sub(self.counted_stalls);
        d.stall_us = stall_us.saturating_sub(self.counted_stall_us);
        self.counted_stalls = self.counted_stalls.max(stalls);
        self.counted_stall_us = self.counted_stall_us.max(stall_us);
    }

    /// Watch time since the last credit.
    fn credit_watch(&mut self, t: u64) -> u64 {
        let dt = t.saturating_sub(self.credited_us);
        self.credited_us = self.credited_us.max(t);
        dt
    }

    /// Measured shard loss since the first report, `0.0..=1.0`.
    fn measured_loss(&self) -> f64 {
        let sent = self
            .base
            .map_or(0, |(s, _)| self.last_sent.saturating_sub(s));
        ratio(self.gap_high, sent).min(1.0)
    }

    fn score(&self, model: &QoeModel, t: u64) -> u8 {
        let watched = t.saturating_sub(self.joined_us);
        let r = &self.last;
        let startup = if r.startup_ms > 0 {
            Duration::from_millis(r.startup_ms)
        } else {
            // Still waiting for a first block: charge the wait so far.
            Duration::from_micros(watched)
        };
        model.score(&QoeInputs {
            residual_loss: ratio(
                r.blocks_lost,
                r.blocks_delivered.saturating_add(r.blocks_lost),
            ),
            stall_ratio: ratio(self.stalled_us(t), watched).min(1.0),
            latency_p99: Duration::from_micros(r.latency_p99_us),
            startup,
        })
    }
}

#[derive(Debug)]
struct JoinTimes {
    hist: Histogram<u64>,
    /// Per bucket of `JOIN_BUCKETS_MS`, then one for everything above.
    buckets: [u64; JOIN_BUCKETS_MS.len() + 1],
    sum_ms: u64,
    count: u64,
}

impl JoinTimes {
    fn new() -> Self {
        Self {
            // 2 significant digits: percentiles within 1%, about 14 KiB.
            hist: Histogram::new_with_bounds(1, MAX_JOIN_MS, 2)
                .expect("constant histogram bounds are valid"),
            buckets: [0; JOIN_BUCKETS_MS.len() + 1],
            sum_ms: 0,
            count: 0,
        }
    }

    fn record(&mut self, ms: u64) {
        self.hist.saturating_record(ms);
        self.buckets[JOIN_BUCKETS_MS.partition_point(|&le| le < ms)] += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
        self.count += 1;
    }

    fn snapshot(&self) -> JoinTime {
        JoinTime {
            count: self.count,
            sum_seconds: self.sum_ms as f64 / 1e3,
            p50_ms: self.quantile(0.5),
            p90_ms: self.quantile(0.9),
            buckets: JOIN_BUCKETS_MS
                .iter()
                .zip(self.buckets)
                .map(|(&le, count)| JoinBucket {
                    le_seconds: le as f64 / 1e3,
                    count,
                })
                .collect(),
        }
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.hist.value_at_quantile(q)
        }
    }
}

#[derive(Debug)]
struct Stream {
    name: Box<str>,
    live: u64,
    peak: u64,
    joins: u64,
    leaves: u64,
    app_events: u64,
    /// Sum of live viewers' join times, so watch time up to any `t` is
    /// `watch_done_us + live * t - live_join_sum_us` without visiting viewers.
    live_join_sum_us: u128,
    watch_done_us: u64,
    totals: Counters,
    ring: Ring,
    join: JoinTimes,
    qoe_sum: u64,
    qoe_n: u64,
}

impl Stream {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            live: 0,
            peak: 0,
            joins: 0,
            leaves: 0,
            app_events: 0,
            live_join_sum_us: 0,
            watch_done_us: 0,
            totals: Counters::default(),
            ring: Ring::default(),
            join: JoinTimes::new(),
            qoe_sum: 0,
            qoe_n: 0,
        }
    }

    fn watch_us(&self, t: u64) -> u64 {
        let live = (u128::from(self.live) * u128::from(t)).saturating_sub(self.live_join_sum_us);
        u64::try_from(live)
            .unwrap_or(u64::MAX)
            .saturating_add(self.watch_done_us)
    }

    fn qoe_mean(&self) -> f64 {
        ratio(self.qoe_sum, self.qoe_n)
    }
}

/// Applies `d`, which happened at `t`, to a stream and to the overall figures.
fn record(stream: &mut Stream, overall: &mut Stream, t: u64, d: &Counters) {
    let sec = t / 1_000_000;
    for s in [stream, overall] {
        s.totals += d;
        s.ring.add(sec, d);
    }
}

/// Replaces a viewer's QoE score in the sums behind the stream means.
fn rescore(v: &mut Viewer, stream: &mut Stream, overall: &mut Stream, model: &QoeModel, t: u64) {
    let new = v.score(model, t);
    let old = v.qoe.replace(new);
    for s in [stream, overall] {
        match old {
            Some(old) => s.qoe_sum -= u64::from(old),
            None => s.qoe_n += 1,
        }
        s.qoe_sum += u64::from(new);
    }
}

/// Latency and parity of live viewers, gathered when a snapshot is taken.
struct LiveFigures {
    stall_extra_us: u64,
    p50: Histogram<u64>,
    p99: Histogram<u64>,
    parity_sum: u64,
    parity_n: u64,
    parity_hist: Vec<u64>,
}

impl LiveFigures {
    fn new() -> Self {
        let hist = || {
            Histogram::new_with_bounds(1, MAX_LATENCY_US, 2)
                .expect("constant histogram bounds are valid")
        };
        Self {
            stall_extra_us: 0,
            p50: hist(),
            p99: hist(),
            parity_sum: 0,
            parity_n: 0,
            parity_hist: Vec::new(),
        }
    }

    fn add(&mut self, v: &Viewer, parity: usize, t: u64) {
        self.stall_extra_us = self
            .stall_extra_us
            .saturating_add(v.stalled_us(t).saturating_sub(v.counted_stall_us));
        if v.base.is_some() && v.last.latency_p99_us > 0 {
            self.p50.saturating_record(v.last.latency_p50_us);
            self.p99.saturating_record(v.last.latency_p99_us);
        }
        self.parity_sum += parity as u64;
        self.parity_n += 1;
        if self.parity_hist.len() <= parity {
            self.parity_hist.resize(parity + 1, 0);
        }
        self.parity_hist[parity] += 1;
    }

    fn latency(&self) -> Latency {
        let spread = |h: &Histogram<u64>| {
            if h.is_empty() {
                Spread::default()
            } else {
                Spread {
                    p50: h.value_at_quantile(0.5),
                    p99: h.value_at_quantile(0.99),
                }
            }
        };
        Latency {
            viewers: self.p99.len(),
            reported_p50_us: spread(&self.p50),
            reported_p99_us: spread(&self.p99),
        }
    }
}

impl Aggregator {
    /// An empty aggregator. Builds the policy's parity tables (a few milliseconds).
    pub fn new(config: AggregatorConfig) -> Self {
        let levels = ParityLevels::new(&config.policy);
        let initial_level =
            levels.level_for(LossEstimator::new(&config.policy).upper_bound(&config.policy));
        Self {
            config,
            levels,
            initial_level,
            epoch: None,
            viewers: HashMap::new(),
            streams: Vec::new(),
            free: Vec::new(),
            by_name: HashMap::new(),
            overall: Stream::new(""),
            applied: 0,
            ignored: Ignored::default(),
        }
    }

    /// Applies one event that happened at `now`.
    ///
    /// Call it for every event the server accepted, in order; every call counts in
    /// [`applied`](Self::applied), including events that only bump an [`Ignored`] counter.
    /// `now` should not go backwards; if it does, durations saturate at zero rather than
    /// panic. Reports should come through a [`Validator`](super::Validator); unvalidated ones
    /// cannot make the aggregator panic, but can skew its figures.
    pub fn apply(&mut self, input: &Input, now: Instant) {
        self.applied += 1;
        let t = micros(now.saturating_duration_since(*self.epoch.get_or_insert(now)));
        match &input.kind {
            InputKind::Join { .. } => self.join(input.viewer, &input.stream, t),
            InputKind::Report {
                report,
                sent_shards,
            } => self.report(input.viewer, report, *sent_shards, t),
            InputKind::Stall => self.stall(input.viewer, t, true),
            InputKind::Resume => self.stall(input.viewer, t, false),
            InputKind::App(_) => match self.viewer_and_stream(input.viewer) {
                Some((_, s, o)) => {
                    s.app_events += 1;
                    o.app_events += 1;
                }
                None => self.ignored.unknown_viewer += 1,
            },
            InputKind::Leave { .. } => self.leave(input.viewer, t),
        }
    }

    /// Events applied so far: one per [`apply`](Self::apply) call. The server can check it
    /// against its accepted and logged counts.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The parity table the decision loop picked for `viewer`, or `None` if it is not tracked.
    ///
    /// Changes only when the viewer's report moves its loss estimate to another level; the
    /// sender can hold on to the parity for the current block and look it up again per block.
    pub fn viewer_parity(&self, viewer: u64) -> Option<&ParityTable> {
        self.viewers
            .get(&viewer)
            .map(|v| self.levels.table(v.level))
    }

    /// The shard loss the decision loop plans `viewer`'s parity for (its
    /// estimate's upper bound, rounded up to a level), or `None` before the
    /// viewer's first loss estimate (its second report) or if it is not tracked.
    pub fn viewer_loss(&self, viewer: u64) -> Option<f64> {
        self.viewers
            .get(&viewer)
            .filter(|v| v.base.is_some() && v.last_sent > v.base.map_or(0, |b| b.0))
            .map(|v| self.levels.loss(v.level))
    }

    /// The [`Summary`] to send `viewer` at `now`, or `None` if it is not tracked.
    ///
    /// `parity` is for [`AggregatorConfig::reference_k`] data shards; `loss_ppm` is the
    /// viewer's measured shard loss since its first report; `stream_residual_loss_ppm` is the
    /// stream's block loss after FEC over the last 60 s; `stream_qoe` is the mean of the
    /// stream's live viewers' latest scores (this viewer's own score until any viewer has one).
    #[must_use]
    pub fn viewer_summary(&self, viewer: u64, now: Instant) -> Option<Summary> {
        let v = self.viewers.get(&viewer)?;
        let s = self.stream(v.stream)?;
        let t = self.micros_at(now);
        let viewer_qoe = v.score(&self.config.qoe, t);
        let window = s.ring.sum(t / 1_000_000, 60);
        let ppm = |x: f64| (x * 1e6).round() as u64;
        Some(Summary {
            viewer_qoe,
            stream_qoe: if s.qoe_n == 0 {
                viewer_qoe
            } else {
                s.qoe_mean().round() as u8
            },
            stream_viewers: s.live,
            parity: self.levels.table(v.level).parity(self.config.reference_k) as u64,
            loss_ppm: ppm(v.measured_loss()),
            stream_residual_loss_ppm: ppm(ratio(
                window.blocks_lost,
                window.blocks_delivered.saturating_add(window.blocks_lost),
            )),
        })
    }

    /// Everything at `now`: per stream, overall, and the sliding windows ending at `now`.
    ///
    /// Costs one pass over the live viewers (for latency and parity spreads) and a few
    /// allocations per stream; meant for a scrape or a log line every few seconds, not per
    /// event.
    #[must_use]
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let t = self.micros_at(now);
        let k = self.config.reference_k;
        let mut live: Vec<Option<LiveFigures>> = (0..self.streams.len()).map(|_| None).collect();
        let mut overall = LiveFigures::new();
        for v in self.viewers.values() {
            let parity = self.levels.table(v.level).parity(k);
            overall.add(v, parity, t);
            if let Some(slot) = live.get_mut(v.stream as usize) {
                slot.get_or_insert_with(LiveFigures::new).add(v, parity, t);
            }
        }
        let streams = self
            .streams
            .iter()
            .zip(&live)
            .filter_map(|(s, l)| {
                let s = s.as_ref()?;
                Some((s.name.to_string(), stream_snapshot(s, l.as_ref(), t, k)))
            })
            .collect::<BTreeMap<_, _>>();
        Snapshot {
            elapsed_ms: t / 1_000,
            applied: self.applied,
            viewers_tracked: self.viewers.len() as u64,
            max_viewers: self.config.max_viewers as u64,
            ignored: self.ignored,
            overall: stream_snapshot(&self.overall, Some(&overall), t, k),
            streams,
        }
    }

    /// Drops a stream nobody watches, freeing its slot for a new stream name; returns whether
    /// it did. Its figures stay in [`Snapshot::overall`]. A stream with viewers is kept.
    ///
    /// Call it when a stream ends for good, after its last viewer left, and after a last
    /// scrape if its final totals matter.
    pub fn forget_stream(&mut self, name: &str) -> bool {
        let Some(&id) = self.by_name.get(name) else {
            return false;
        };
        if self.stream(id).is_some_and(|s| s.live > 0) {
            return false;
        }
        self.by_name.remove(name);
        self.streams[id as usize] = None;
        self.free.push(id);
        true
    }

    fn micros_at(&self, now: Instant) -> u64 {
        self.epoch
            .map_or(0, |e| micros(now.saturating_duration_since(e)))
    }

    fn stream(&self, id: u32) -> Option<&Stream> {
        self.streams.get(id as usize)?.as_ref()
    }

    /// A tracked viewer with its stream and the overall figures, borrowed together.
    fn viewer_and_stream(&mut self, id: u64) -> Option<(&mut Viewer, &mut Stream, &mut Stream)> {
        let v = self.viewers.get_mut(&id)?;
        let s = self.streams.get_mut(v.stream as usize)?.as_mut()?;
        Some((v, s, &mut self.overall))
    }

    fn stream_id(&mut self, name: &str) -> Option<u32> {
        if let Some(&id) = self.by_name.get(name) {
            return Some(id);
        }
        if self.by_name.len() >= self.config.max_streams {
            return None;
        }
        let stream = Stream::new(name);
        let id = match self.free.pop() {
            Some(id) => {
                self.streams[id as usize] = Some(stream);
                id
            }
            None => {
                // max_streams bounds the vector; ids fit u32 for any sane cap.
                let id = u32::try_from(self.streams.len()).ok()?;
                self.streams.push(Some(stream));
                id
            }
        };
        self.by_name.insert(name.into(), id);
        Some(id)
    }

    fn join(&mut self, id: u64, name: &str, t: u64) {
        if self.viewers.contains_key(&id) {
            self.ignored.duplicate_joins += 1;
            return;
        }
        if self.viewers.len() >= self.config.max_viewers {
            self.ignored.joins_over_viewer_cap += 1;
            return;
        }
        let Some(stream) = self.stream_id(name) else {
            self.ignored.joins_over_stream_cap += 1;
            return;
        };
        self.viewers.insert(
            id,
            Viewer {
                stream,
                joined_us: t,
                credited_us: t,
                last: Report::default(),
                last_sent: 0,
                base: None,
                gap_high: 0,
                startup_recorded: false,
                stall_events: 0,
                stall_closed_us: 0,
                stalled_since: None,
                counted_stalls: 0,
                counted_stall_us: 0,
                estimator: LossEstimator::new(&self.config.policy),
                level: self.initial_level,
                qoe: None,
            },
        );
        let s = self.streams[stream as usize]
            .as_mut()
            .expect("stream_id returned a live slot");
        for s in [s, &mut self.overall] {
            s.live += 1;
            s.peak = s.peak.max(s.live);
            s.joins += 1;
            s.live_join_sum_us += u128::from(t);
        }
    }

    fn report(&mut self, id: u64, r: &Report, sent: u64, t: u64) {
        let Some(v) = self.viewers.get_mut(&id) else {
            self.ignored.unknown_viewer += 1;
            return;
        };
        let Some(s) = self
            .streams
            .get_mut(v.stream as usize)
            .and_then(Option::as_mut)
        else {
            self.ignored.unknown_viewer += 1;
            return;
        };
        let o = &mut self.overall;
        let policy = &self.config.policy;

        let mut d = Counters {
            watch_us: v.credit_watch(t),
            blocks_delivered: r.blocks_delivered.saturating_sub(v.last.blocks_delivered),
            blocks_recovered: r.blocks_recovered.saturating_sub(v.last.blocks_recovered),
            blocks_lost: r.blocks_lost.saturating_sub(v.last.blocks_lost),
            ..Counters::default()
        };
        match v.base {
            None => v.base = Some((sent, r.shards_received)),
            Some((base_sent, base_received)) => {
                let d_sent = sent.saturating_sub(v.last_sent);
                let gap = sent
                    .saturating_sub(base_sent)
                    .saturating_sub(r.shards_received.saturating_sub(base_received));
                // Only a validated report guarantees the gap grows by at most d_sent.
                let lost = gap.saturating_sub(v.gap_high).min(d_sent);
                v.gap_high += lost;
                d.shards_sent = d_sent;
                d.shards_lost = lost;
                v.estimator.update(policy, d_sent, lost);
                v.level = self.levels.level_for(v.estimator.upper_bound(policy));
            }
        }
        v.last_sent = v.last_sent.max(sent);
        if !v.startup_recorded && r.startup_ms > 0 {
            v.startup_recorded = true;
            let ms = r.startup_ms.min(MAX_JOIN_MS);
            s.join.record(ms);
            o.join.record(ms);
        }
        v.last = *r;
        v.settle_stalls(&mut d);
        record(s, o, t, &d);
        rescore(v, s, o, &self.config.qoe, t);
    }

    fn stall(&mut self, id: u64, t: u64, stalled: bool) {
        let model = self.config.qoe.clone();
        let Some((v, s, o)) = self.viewer_and_stream(id) else {
            self.ignored.unknown_viewer += 1;
            return;
        };
        // A repeated Stall or a Resume without a stall changes nothing but the watch credit.
        match (stalled, v.stalled_since) {
            (true, None) => {
                v.stalled_since = Some(t);
                v.stall_events += 1;
            }
            (false, Some(since)) => {
                v.stalled_since = None;
                v.stall_closed_us = v.stall_closed_us.saturating_add(t.saturating_sub(since));
            }
            _ => {}
        }
        let mut d = Counters {
            watch_us: v.credit_watch(t),
            ..Counters::default()
        };
        v.settle_stalls(&mut d);
        record(s, o, t, &d);
        if v.qoe.is_some() {
            rescore(v, s, o, &model, t);
        }
    }

    fn leave(&mut self, id: u64, t: u64) {
        let Some(mut v) = self.viewers.remove(&id) else {
            self.ignored.unknown_viewer += 1;
            return;
        };
        let Some(s) = self
            .streams
            .get_mut(v.stream as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        // A stall still open when the viewer leaves ends there.
        if let Some(since) = v.stalled_since.take() {
            v.stall_closed_us = v.stall_closed_us.saturating_add(t.saturating_sub(since));
        }
        let mut d = Counters {
            watch_us: v.credit_watch(t),
            ..Counters::default()
        };
        v.settle_stalls(&mut d);
        record(s, &mut self.overall, t, &d);
        for s in [s, &mut self.overall] {
            s.live -= 1;
            s.leaves += 1;
            s.live_join_sum_us -= u128::from(v.joined_us);
            s.watch_done_us = s
                .watch_done_us
                .saturating_add(t.saturating_sub(v.joined_us));
            if let Some(q) = v.qoe {
                s.qoe_sum -= u64::from(q);
                s.qoe_n -= 1;
            }
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn stream_snapshot(s: &Stream, live: Option<&LiveFigures>, t: u64, k: usize) -> StreamSnapshot {
    let c = &s.totals;
    let stall_us = c
        .stall_us
        .saturating_add(live.map_or(0, |l| l.stall_extra_us));
    let watch_us = s.watch_us(t);
    let sec = t / 1_000_000;
    let [w10, w60] = WINDOWS.map(|w| Window::new(w, &s.ring.sum(sec, w)));
    let parity_n = live.map_or(0, |l| l.parity_n);
    StreamSnapshot {
        viewers: s.live,
        viewers_peak: s.peak,
        joins: s.joins,
        leaves: s.leaves,
        app_events: s.app_events,
        watch_seconds: seconds(watch_us),
        stalls: c.stalls,
        stall_seconds: seconds(stall_us),
        stall_ratio: ratio(stall_us, watch_us).min(1.0),
        shards_sent: c.shards_sent,
        shards_lost: c.shards_lost,
        loss_before_fec: ratio(c.shards_lost, c.shards_sent),
        blocks_delivered: c.blocks_delivered,
        blocks_recovered: c.blocks_recovered,
        blocks_lost: c.blocks_lost,
        loss_after_fec: ratio(
            c.blocks_lost,
            c.blocks_delivered.saturating_add(c.blocks_lost),
        ),
        join_time: s.join.snapshot(),
        latency: live.map(LiveFigures::latency).unwrap_or_default(),
        qoe: Qoe {
            viewers: s.qoe_n,
            mean: s.qoe_mean(),
        },
        parity: Parity {
            k,
            viewers: parity_n,
            mean: live.map_or(0.0, |l| ratio(l.parity_sum, l.parity_n)),
            max: live.map_or(0, |l| l.parity_hist.len().saturating_sub(1) as u64),
            histogram: live.map(|l| l.parity_hist.clone()).unwrap_or_default(),
        },
        windows: Windows { s10: w10, s60: w60 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::{block_failure_probability, render};
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    /// A clock the test moves, and shorthands for events.
    struct Harness {
        agg: Aggregator,
        t0: Instant,
    }

    impl Harness {
        fn new() -> Self {
            Self::with(AggregatorConfig::default())
        }

        fn with(config: AggregatorConfig) -> Self {
            Self {
                agg: Aggregator::new(config),
                t0: Instant::now(),
            }
        }

        fn at(&self, secs: f64) -> Instant {
            self.t0 + Duration::from_secs_f64(secs)
        }

        fn apply(&mut self, secs: f64, viewer: u64, stream: &str, kind: InputKind) {
            let input = Input {
                viewer,
                stream: stream.into(),
                kind,
            };
            self.agg.apply(&input, self.at(secs));
        }

        fn join(&mut self, secs: f64, viewer: u64, stream: &str) {
            let agent = "test".into();
            self.apply(secs, viewer, stream, InputKind::Join { agent });
        }

        fn leave(&mut self, secs: f64, viewer: u64) {
            let reason = "bye".into();
            self.apply(secs, viewer, "", InputKind::Leave { reason });
        }

        fn report(&mut self, secs: f64, viewer: u64, report: Report, sent_shards: u64) {
            let kind = InputKind::Report {
                report,
                sent_shards,
            };
            self.apply(secs, viewer, "", kind);
        }

        fn snap(&self, secs: f64) -> Snapshot {
            self.agg.snapshot(self.at(secs))
        }
    }

    fn shards(received: u64) -> Report {
        Report {
            shards_received: received,
            ..Report::default()
        }
    }

    fn blocks(delivered: u64, recovered: u64, lost: u64) -> Report {
        Report {
            blocks_delivered: delivered,
            blocks_recovered: recovered,
            blocks_lost: lost,
            ..Report::default()
        }
    }

    #[test]
    fn join_and_leave_move_current_viewers_and_keep_the_peak() {
        let mut h = Harness::new();
        for v in 1..=3 {
            h.join(0.0, v, "a");
        }
        h.join(0.0, 10, "b");
        let s = h.snap(1.0);
        assert_eq!((s.streams["a"].viewers, s.streams["b"].viewers), (3, 1));
        assert_eq!((s.overall.viewers, s.overall.viewers_peak), (4, 4));
        for v in 1..=3 {
            h.leave(2.0, v);
        }
        h.join(3.0, 4, "a");
        h.leave(4.0, 4);
        let s = h.snap(5.0);
        let a = &s.streams["a"];
        assert_eq!((a.viewers, a.viewers_peak, a.joins, a.leaves), (0, 3, 4, 4));
        assert_eq!((s.overall.viewers, s.overall.viewers_peak), (1, 4));
        assert_eq!(s.viewers_tracked, 1);
        // Leaving twice is an unknown viewer, not a negative count.
        h.leave(6.0, 1);
        let s = h.snap(6.0);
        assert_eq!(s.ignored.unknown_viewer, 1);
        assert_eq!(s.streams["a"].viewers, 0);
        // 5 joins, 5 leaves (one for an unknown viewer): every call counts.
        assert_eq!(h.agg.applied(), 10);
        assert_eq!(s.applied, 10);
        // The emptied stream still renders, at zero.
        assert!(render(&s, &[]).contains("quicast_viewers{stream=\"a\"} 0\n"));
    }

    #[test]
    fn watch_time_counts_live_viewers_up_to_now() {
        let mut h = Harness::new();
        h.join(0.0, 1, "a");
        h.join(10.0, 2, "a");
        assert_eq!(h.snap(30.0).streams["a"].watch_seconds, 30.0 + 20.0);
        h.leave(40.0, 1);
        // Viewer 1 stopped at 40 s; viewer 2 keeps counting.
        assert_eq!(h.snap(60.0).streams["a"].watch_seconds, 40.0 + 50.0);
        assert_eq!(h.snap(60.0).overall.watch_seconds, 90.0);
        // Credited to the windows as events arrive: 40 s from viewer 1's leave.
        assert_eq!(h.snap(60.0).streams["a"].windows.s60.watch_seconds, 40.0);
    }

    #[test]
    fn loss_before_fec_comes_from_deltas_between_reports() {
        let mut h = Harness::new();
        h.join(0.0, 1, "a");
        // 100 shards are in flight when the first report arrives: not lost, just not there
        // yet. The first report only sets the baseline.
        h.report(1.0, 1, shards(900), 1_000);
        let s = h.snap(1.0);
        assert_eq!(
            (s.streams["a"].shards_sent, s.streams["a"].shards_lost),
            (0, 0)
        );
        // Next interval: 1000 sent, 950 received -> 5%, where the cumulative ratio
        // (1 - 1850/2000) would claim 7.5%.
        h.report(2.0, 1, shards(1_850), 2_000);
        let a = &h.snap(2.0).streams["a"];
        assert_eq!((a.shards_sent, a.shards_lost), (1_000, 50));
        assert_eq!(a.loss_before_fec, 0.05);
        assert_eq!(a.windows.s10.loss_before_fec, 0.05);
        // Jitter: more received than sent in this interval. No negative loss, and the
        // surplus is not counted again later.
        h.report(3.0, 1, shards(2_880), 3_000);
        h.report(4.0, 1, shards(3_830), 4_000);
        let a = &h.snap(4.0).streams["a"];
        // Since the baseline: 3000 sent, 2930 received.
        assert_eq!((a.shards_sent, a.shards_lost), (3_000, 70));
        let summary = h.agg.viewer_summary(1, h.at(4.0)).unwrap();
        assert_eq!(summary.loss_ppm, 70 * 1_000_000 / 3_000);
    }

    #[test]
    fn loss_after_fec_and_recovered_blocks() {
        let mut h = Harness::new();
        h.join(0.0, 1, "a");
        h.join(0.0, 2, "a");
        h.report(1.0, 1, blocks(500, 20, 5), 0);
        h.report(2.0, 1, blocks(990, 40, 10), 0);
        h.report(2.0, 2, blocks(1_000, 0, 0), 0);
        let a = &h.snap(2.0).streams["a"];
        assert_eq!(
            (a.blocks_delivered, a.blocks_recovered, a.blocks_lost),
            (1_990, 40, 10)
        );
        assert_eq!(a.loss_after_fec, 10.0 / 2_000.0);
        let summary = h.agg.viewer_summary(2, h.at(2.0)).unwrap();
        assert_eq!(summary.stream_residual_loss_ppm, 5_000);
    }

    #[test]
    fn stall_ratio_merges_events_and_reports() {
        let mut h = Harness::new();
        h.join(0.0, 1, "a");
        h.apply(10.0, 1, "", InputKind::Stall);
        h.apply(12.0, 1, "", InputKind::Resume);
        // The report describes the same stall: it must count once.
        let report = Report {
            stalls: 1,
            stall_ms: 2_000,
            ..Report::default()
        };
        h.report(20.0, 1, report, 0);
        let a = &h.snap(20.0).streams["a"];
        assert_eq!((a.stalls, a.stall_seconds), (1, 2.0));
        assert_eq!(a.stall_ratio, 0.1);
        // A stall in progress counts up to now.
        h.apply(30.0, 1, "", InputKind::Stall);
        let a = &h.snap(35.0).streams["a"];
        assert_eq!((a.stalls, a.stall_seconds), (2, 7.0));
        assert_eq!(a.stall_ratio, 0.2);
        // The report knows more than the events (a stall the viewer did not signal).
        let report = Report {
            stalls: 3,
            stall_ms: 9_000,
            ..Report::default()
        };
        h.report(36.0, 1, report, 0);
        let a = &h.snap(36.0).streams["a"];
        assert_eq!((a.stalls, a.stall_seconds), (3, 9.0));
        // Leaving ends the open stall at 40 s: 2 + 10 s from events beat 9 s reported.
        h.leave(40.0, 1);
        let a = &h.snap(50.0).streams["a"];
        assert_eq!((a.stalls, a.stall_seconds), (3, 12.0));
        assert_eq!(a.stall_ratio, 12.0 / 40.0);
    }

    #[test]
    fn values_leave_the_10s_window_after_10s() {
        let mut h = Harness::new();
        h.join(0.0, 1, "a");
        h.report(5.0, 1, blocks(100, 10, 1), 0);
        let a = &h.snap(14.999).streams["a"];
        assert_eq!(a.windows.s10.blocks_delivered, 100);
        assert_eq!(a.windows.s10.blocks_lost, 1);
        let a = &h.snap(15.0).streams["a"];
        assert_eq!(a.windows.s10.blocks_delivered, 0);
        assert_eq!(a.windows.s10.loss_after_fec, 0.0);
        assert_eq!(a.windows.s60.blocks_delivered, 100);
        let a = &h.snap(65.0).streams["a"];
        assert_eq!(a.windows.s60.blocks_delivered, 0);
        assert_eq!(a.blocks_delivered, 100, "totals keep everything");
        assert_eq!(h.snap(65.0).overall.windows.s60.blocks_delivered, 0);
    }

    #[test]
    fn qoe_falls_with_loss_and_averages_per_stream() {
        let mut h = Harness::new();
        let report = |lost| Report {
            startup_ms: 300,
            latency_p50_us: 30_000,
            latency_p99_us: 50_000,
            ..blocks(1_000 - lost, 0, lost)
        };
        for (v, lost) in [(1, 0), (2, 1), (3, 5)] {
            h.join(0.0, v, "a");
            h.report(10.0, v, report(lost), 0);
        }
        let score = |h: &Harness, v| h.agg.viewer_summary(v, h.at(10.0)).unwrap().viewer_qoe;
        let (s1, s2, s3) = (score(&h, 1), score(&h, 2), score(&h, 3));
        assert_eq!(s1, 100);
        assert!(s1 > s2 && s2 > s3, "{s1} {s2} {s3}");
        let a = &h.snap(10.0).streams["a"];
        assert_eq!(a.qoe.viewers, 3);
        assert_eq!(
            a.qoe.mean,
            f64::from(u32::from(s1) + u32::from(s2) + u32::from(s3)) / 3.0
        );
        // The worst viewer leaves: the mean rises.
        h.leave(11.0, 3);
        assert!(h.snap(11.0).streams["a"].qoe.mean > a.qoe.mean);
        let summary = h.agg.viewer_summary(1, h.at(11.0)).unwrap();
        assert_eq!(summary.stream_viewers, 2);
        assert_eq!(
            summary.stream_qoe,
            ((u32::from(s1) + u32::from(s2)) as f64 / 2.0).round() as u8
        );
    }

    /// Feeds `intervals` one-second report intervals of 1000 shards at iid loss `p`.
    fn lossy_viewer(h: &mut Harness, viewer: u64, p: f64, intervals: u64, rng: &mut SmallRng) {
        h.join(0.0, viewer, "a");
        let (mut sent, mut received) = (0, 0);
        for i in 1..=intervals {
            sent += 1_000;
            received += (0..1_000).filter(|_| !rng.random_bool(p)).count() as u64;
            h.report(i as f64, viewer, shards(received), sent);
        }
    }

    #[test]
    fn more_loss_gets_more_parity() {
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut h = Harness::new();
        let initial = h.agg.levels.table(h.agg.initial_level).parity(32);
        lossy_viewer(&mut h, 1, 0.001, 30, &mut rng);
        lossy_viewer(&mut h, 2, 0.01, 30, &mut rng);
        lossy_viewer(&mut h, 3, 0.10, 30, &mut rng);
        let parity = |v| h.agg.viewer_parity(v).unwrap().parity(32);
        let (p1, p2, p3) = (parity(1), parity(2), parity(3));
        assert!(p1 < p2 && p2 < p3, "{p1} {p2} {p3} (seed {seed})");
        // The clean viewer's measurements replaced the cautious initial guess.
        assert!(p1 < initial, "{p1} vs initial {initial} (seed {seed})");
        // The chosen table protects at the measured loss.
        assert!(
            block_failure_probability(32, p3, 0.10) <= 1e-4,
            "seed {seed}"
        );
        let par = &h.snap(30.0).streams["a"].parity;
        assert_eq!((par.k, par.viewers, par.max), (32, 3, p3 as u64));
        assert_eq!(par.mean, (p1 + p2 + p3) as f64 / 3.0);
        assert_eq!(par.histogram.iter().sum::<u64>(), 3);
        assert_eq!(par.histogram[p2], 1 + u64::from(p1 == p2));
        assert_eq!(
            h.agg.viewer_summary(3, h.at(30.0)).unwrap().parity,
            p3 as u64
        );
    }

    #[test]
    fn viewers_and_streams_are_bounded() {
        let mut config = AggregatorConfig::default();
        config.max_viewers(10).max_streams(2);
        let mut h = Harness::with(config);
        for v in 0..15 {
            h.join(0.0, v, "a");
        }
        h.join(0.0, 3, "a");
        h.report(1.0, 12, shards(1), 1);
        let s = h.snap(1.0);
        assert_eq!((s.viewers_tracked, s.streams["a"].viewers), (10, 10));
        assert_eq!(s.ignored.joins_over_viewer_cap, 5);
        assert_eq!(s.ignored.duplicate_joins, 1);
        assert_eq!(s.ignored.unknown_viewer, 1);
        assert_eq!(h.agg.viewers.len(), 10);
        // Streams: "a" and "b" fit, "c" does not until a stream is forgotten.
        for v in 0..10 {
            h.leave(2.0, v);
        }
        h.join(3.0, 100, "b");
        h.join(3.0, 101, "c");
        assert_eq!(h.snap(3.0).ignored.joins_over_stream_cap, 1);
        assert!(!h.agg.forget_stream("b"), "b has a viewer");
        assert!(h.agg.forget_stream("a"));
        h.join(4.0, 101, "c");
        let s = h.snap(4.0);
        assert_eq!(s.streams.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(s.streams["c"].viewers, 1);
        assert_eq!(h.agg.streams.len(), 2, "the slot was reused");
        assert_eq!(
            s.overall.joins, 12,
            "forgotten streams stay in the overall figures"
        );
    }

    #[test]
    fn join_times_feed_the_distribution_once_per_viewer() {
        let mut h = Harness::new();
        for v in 1..=10u64 {
            h.join(0.0, v, "a");
            let report = Report {
                startup_ms: v * 100,
                ..Report::default()
            };
            h.report(1.0, v, report, 0);
            // A later report must not record the viewer again.
            h.report(2.0, v, report, 0);
        }
        let j = &h.snap(2.0).streams["a"].join_time;
        assert_eq!(j.count, 10);
        assert!((j.sum_seconds - 5.5).abs() < 1e-9);
        assert!((495..=505).contains(&j.p50_ms), "{}", j.p50_ms);
        assert!((895..=905).contains(&j.p90_ms), "{}", j.p90_ms);
        // le 0.1: 100 ms; le 0.25: 200; le 0.5: 300..500; le 1: 600..1000.
        let counts: Vec<u64> = j.buckets.iter().map(|b| b.count).collect();
        assert_eq!(counts[..4], [1, 1, 3, 5]);
    }

    #[test]
    fn random_event_streams_keep_the_books_balanced() {
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut config = AggregatorConfig::default();
        config.max_viewers(50);
        let mut h = Harness::with(config);
        let mut reports: HashMap<u64, (Report, u64)> = HashMap::new();
        let mut t = 0.0;
        for _ in 0..20_000 {
            t += rng.random_range(0.0..0.05);
            let viewer = rng.random_range(0..80);
            let stream = ["a", "b", "c"][viewer as usize % 3];
            match rng.random_range(0..100) {
                0..=4 => h.join(t, viewer, stream),
                5..=7 => {
                    h.leave(t, viewer);
                    reports.remove(&viewer);
                }
                8..=10 => h.apply(t, viewer, stream, InputKind::Stall),
                11..=13 => h.apply(t, viewer, stream, InputKind::Resume),
                _ => {
                    let (r, sent) = reports.entry(viewer).or_default();
                    *sent += rng.random_range(0..200);
                    r.shards_received = (r.shards_received + rng.random_range(0..200)).min(*sent);
                    r.blocks_delivered += rng.random_range(0..10);
                    r.blocks_lost += rng.random_range(0..2);
                    r.stalls += rng.random_range(0..2);
                    r.stall_ms += rng.random_range(0..100);
                    r.latency_p99_us = rng.random_range(0..200_000);
                    h.report(t, viewer, *r, *sent);
                }
            }
            if rng.random_ratio(1, 500) {
                let s = h.snap(t);
                let sum: u64 = s.streams.values().map(|x| x.viewers).sum();
                assert_eq!(sum, s.overall.viewers, "seed {seed}");
                assert_eq!(s.overall.viewers, s.viewers_tracked, "seed {seed}");
                assert!(s.viewers_tracked <= 50, "seed {seed}");
                for x in s.streams.values().chain([&s.overall]) {
                    for r in [x.loss_before_fec, x.loss_after_fec, x.stall_ratio] {
                        assert!((0.0..=1.0).contains(&r), "{r} (seed {seed})");
                    }
                    assert!(x.qoe.mean <= 100.0, "seed {seed}");
                    assert!(x.joins >= x.leaves + x.viewers, "seed {seed}");
                }
                let watch: f64 = s.streams.values().map(|x| x.watch_seconds).sum();
                assert!(
                    (watch - s.overall.watch_seconds).abs() < 1e-3,
                    "seed {seed}"
                );
            }
        }
        assert_eq!(h.agg.applied(), 20_000);
    }
}
