//! What [`Aggregator::snapshot`](super::Aggregator::snapshot) returns.
//!
//! All types here are plain data with public fields and `serde::Serialize`, so the API can
//! return them as JSON; [`render`](super::render) turns one into Prometheus text.

use std::collections::BTreeMap;

use serde::Serialize;

use super::window::Counters;

/// The aggregator's state at one instant.
///
/// Fields:
/// - `elapsed_ms`: time since the first event the aggregator applied.
/// - `applied`: events applied (every [`Aggregator::apply`](super::Aggregator::apply) call,
///   including those only counted in `ignored`).
/// - `viewers_tracked`, `max_viewers`: viewers with state, and the cap.
/// - `ignored`: events that changed nothing but a counter, by reason.
/// - `overall`: all streams together; `viewers_peak` here is the peak of the sum, which the
///   per-stream peaks cannot give.
/// - `streams`: one [`StreamSnapshot`] per stream name, including streams nobody watches any
///   more (until [`Aggregator::forget_stream`](super::Aggregator::forget_stream)).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// Milliseconds since the first applied event.
    pub elapsed_ms: u64,
    /// Events applied so far.
    pub applied: u64,
    /// Viewers currently tracked.
    pub viewers_tracked: u64,
    /// Most viewers tracked at once ([`AggregatorConfig::max_viewers`](super::AggregatorConfig::max_viewers)).
    pub max_viewers: u64,
    /// Events that were ignored, by reason.
    pub ignored: Ignored,
    /// All streams together.
    pub overall: StreamSnapshot,
    /// Per stream, by name.
    pub streams: BTreeMap<String, StreamSnapshot>,
}

/// Events the aggregator counted and otherwise ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Ignored {
    /// Joins refused because `max_viewers` viewers were tracked.
    pub joins_over_viewer_cap: u64,
    /// Joins refused because they named a new stream while `max_streams` were tracked.
    pub joins_over_stream_cap: u64,
    /// Joins for a viewer id already tracked.
    pub duplicate_joins: u64,
    /// Events for a viewer that is not tracked (never joined, refused, or already left).
    pub unknown_viewer: u64,
}

/// One stream's figures (or all streams', in [`Snapshot::overall`]).
///
/// Totals cover the stream's whole life. Loss before FEC counts only report intervals after
/// each viewer's first report (see [`Aggregator`](super::Aggregator)); `stall_seconds` and
/// `stall_ratio` include stalls still in progress.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamSnapshot {
    /// Viewers watching now.
    pub viewers: u64,
    /// Most viewers at once.
    pub viewers_peak: u64,
    /// Viewers that joined.
    pub joins: u64,
    /// Viewers that left.
    pub leaves: u64,
    /// Application events received.
    pub app_events: u64,
    /// Sum of all viewers' watch time, live viewers counted up to now.
    pub watch_seconds: f64,
    /// Stalls.
    pub stalls: u64,
    /// Stalled time.
    pub stall_seconds: f64,
    /// `stall_seconds / watch_seconds`, `0.0..=1.0`.
    pub stall_ratio: f64,
    /// Datagrams sent, over measured report intervals.
    pub shards_sent: u64,
    /// Of those, never received (loss before FEC).
    pub shards_lost: u64,
    /// `shards_lost / shards_sent`.
    pub loss_before_fec: f64,
    /// Blocks delivered to viewers' applications.
    pub blocks_delivered: u64,
    /// Of those, blocks FEC rebuilt.
    pub blocks_recovered: u64,
    /// Blocks lost after FEC.
    pub blocks_lost: u64,
    /// `blocks_lost / (blocks_delivered + blocks_lost)`.
    pub loss_after_fec: f64,
    /// Join-time (time to first block) distribution.
    pub join_time: JoinTime,
    /// Block latency across the live viewers' latest reports.
    pub latency: Latency,
    /// Quality of experience.
    pub qoe: Qoe,
    /// Parity the decision loop currently picks for live viewers.
    pub parity: Parity,
    /// Sliding windows.
    pub windows: Windows,
}

/// Join times of viewers that received a first block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JoinTime {
    /// Viewers with a join time.
    pub count: u64,
    /// Sum of join times.
    pub sum_seconds: f64,
    /// Median, milliseconds (within 1%).
    pub p50_ms: u64,
    /// 90th percentile, milliseconds (within 1%).
    pub p90_ms: u64,
    /// Counts per bucket, not cumulative: `buckets[i]` counts join times in
    /// `(buckets[i-1].le_seconds, buckets[i].le_seconds]`; the rest, above the last bound,
    /// is `count` minus their sum.
    pub buckets: Vec<JoinBucket>,
}

/// One bucket of [`JoinTime::buckets`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct JoinBucket {
    /// Upper bound, seconds.
    pub le_seconds: f64,
    /// Join times in this bucket.
    pub count: u64,
}

/// Distribution across viewers of the latency each one reported for its last interval.
/// Viewers that have not reported, or reported no latency (0), are left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    /// Viewers included.
    pub viewers: u64,
    /// Viewers' median block latency, microseconds.
    pub reported_p50_us: Spread,
    /// Viewers' 99th percentile block latency, microseconds.
    pub reported_p99_us: Spread,
}

/// Median and 99th percentile of a per-viewer value across viewers (within 1%).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Spread {
    /// Median across viewers.
    pub p50: u64,
    /// 99th percentile across viewers.
    pub p99: u64,
}

/// Quality of experience of live viewers (see [`QoeModel`](super::QoeModel)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Qoe {
    /// Live viewers with a score (those that have sent a report).
    pub viewers: u64,
    /// Mean of their latest scores, 0..=100; 0 when there are none.
    pub mean: f64,
}

/// Parity the decision loop picks for live viewers, for blocks of `k` data shards.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Parity {
    /// Data shards per block the figures are for
    /// ([`AggregatorConfig::reference_k`](super::AggregatorConfig::reference_k)).
    pub k: usize,
    /// Live viewers.
    pub viewers: u64,
    /// Mean parity shards per block.
    pub mean: f64,
    /// Most parity shards for any viewer.
    pub max: u64,
    /// `histogram[m]` = viewers getting `m` parity shards (length `max + 1`).
    pub histogram: Vec<u64>,
}

/// The sliding windows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Windows {
    /// The last 10 seconds.
    #[serde(rename = "10s")]
    pub s10: Window,
    /// The last 60 seconds.
    #[serde(rename = "60s")]
    pub s60: Window,
}

/// Figures over one sliding window of one-second buckets.
///
/// The window holds the current second and the `seconds - 1` before it. Watch time here is
/// credited when a viewer's events arrive (the time since its previous event), so a stall
/// still in progress shows up when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Window {
    /// Width, seconds.
    pub seconds: u64,
    /// Datagrams sent, over measured report intervals.
    pub shards_sent: u64,
    /// Of those, never received.
    pub shards_lost: u64,
    /// `shards_lost / shards_sent`.
    pub loss_before_fec: f64,
    /// Blocks delivered.
    pub blocks_delivered: u64,
    /// Blocks rebuilt by FEC.
    pub blocks_recovered: u64,
    /// Blocks lost after FEC.
    pub blocks_lost: u64,
    /// `blocks_lost / (blocks_delivered + blocks_lost)`.
    pub loss_after_fec: f64,
    /// Stalls that started.
    pub stalls: u64,
    /// Stalled time.
    pub stall_seconds: f64,
    /// Watch time credited.
    pub watch_seconds: f64,
    /// `stall_seconds / watch_seconds`, `0.0..=1.0`.
    pub stall_ratio: f64,
}

/// `num / den`, or 0 when there is nothing to divide.
pub(crate) fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

pub(crate) fn seconds(us: u64) -> f64 {
    us as f64 / 1e6
}

impl Window {
    pub(crate) fn new(seconds_wide: u64, c: &Counters) -> Self {
        Self {
            seconds: seconds_wide,
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
            stalls: c.stalls,
            stall_seconds: seconds(c.stall_us),
            watch_seconds: seconds(c.watch_us),
            stall_ratio: ratio(c.stall_us, c.watch_us).min(1.0),
        }
    }
}
