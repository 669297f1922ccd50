//! Receiver counters and the latency histogram.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

/// What a [`Receiver`](super::Receiver) has seen. Every drop is counted here.
#[derive(Debug, Clone)]
pub struct ReceiverStats {
    /// Blocks delivered to the application, in order.
    pub blocks_delivered: u64,
    /// Of those, blocks that needed FEC.
    pub blocks_recovered: u64,
    /// Blocks that missed their deadline (reported as `Event::Lost`).
    pub blocks_lost: u64,
    /// Lost blocks whose shards all arrived, too late.
    pub blocks_late: u64,
    /// Media bytes delivered.
    pub bytes_delivered: u64,
    /// Datagrams received (valid or not).
    pub datagrams: u64,
    /// Valid shards of this stream that arrived, whatever their use.
    pub shards_received: u64,
    /// Shards that arrived after their group already had `k` (parity to spare).
    pub surplus: u64,
    /// Shards rebuilt by FEC.
    pub shards_rebuilt: u64,
    /// Shards a block lacked when it was decided: for a rebuilt block, the
    /// data shards rebuilt; for a lost one, its data shard count minus the
    /// distinct shards of it that arrived (0 when none arrived). A lower
    /// bound of loss before FEC: shards beyond what decided a block, and
    /// blocks never seen, are not counted.
    pub shards_missing: u64,
    /// Duplicate shards.
    pub duplicates: u64,
    /// Shards after their block's deadline.
    pub shards_late: u64,
    /// Shards older than the decoder window.
    pub out_of_window: u64,
    /// Datagrams that failed to decode or contradicted their block.
    pub malformed: u64,
    /// Datagrams for another stream id.
    pub wrong_stream: u64,
    /// Stalls: gaps in delivery longer than `stall_after`.
    pub stalls: u64,
    /// Time spent stalled, in finished stalls.
    pub stalled: Duration,
    /// Repair requests made: one per code group and attempt (each sent in
    /// several copies).
    pub repairs_asked: u64,
    /// Repair datagrams sent, copies included.
    pub repair_datagrams: u64,
    /// Short blocks not asked for because an answer could no longer arrive
    /// before their deadline.
    pub repairs_too_late: u64,
    /// Blocks delivered in time after a repair request for them.
    pub blocks_repaired: u64,
    /// Blocks passed over, neither delivered nor lost, by a viewer that
    /// joined mid-stream and waited for a sync point
    /// ([`ReceiverConfig::sync_wait`](super::ReceiverConfig::sync_wait)).
    pub blocks_before_sync: u64,
    latency: Latency,
}

/// The latency histogram, shown as its percentiles: its `Debug` is what a
/// failing test prints, and the raw buckets would bury the counters.
#[derive(Clone)]
struct Latency(Histogram<u64>);

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        summarize(&self.0).fmt(f)
    }
}

impl Default for ReceiverStats {
    fn default() -> Self {
        ReceiverStats {
            blocks_delivered: 0,
            blocks_recovered: 0,
            blocks_lost: 0,
            blocks_late: 0,
            bytes_delivered: 0,
            datagrams: 0,
            shards_received: 0,
            surplus: 0,
            shards_rebuilt: 0,
            shards_missing: 0,
            duplicates: 0,
            blocks_before_sync: 0,
            shards_late: 0,
            out_of_window: 0,
            malformed: 0,
            wrong_stream: 0,
            stalls: 0,
            stalled: Duration::ZERO,
            repairs_asked: 0,
            repair_datagrams: 0,
            repairs_too_late: 0,
            blocks_repaired: 0,
            latency: Latency(new_histogram()),
        }
    }
}

/// Microsecond histogram up to one hour, 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

pub(crate) fn summarize(h: &Histogram<u64>) -> LatencySummary {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return LatencySummary::default();
    }
    LatencySummary {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.50)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

impl ReceiverStats {
    pub(crate) fn record_latency(&mut self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, 3_600_000_000);
        self.latency.0.saturating_record(us);
    }

    /// Block latency, sender timestamp to in-order delivery.
    pub fn latency(&self) -> LatencySummary {
        summarize(&self.latency.0)
    }

    /// The raw latency histogram, in microseconds.
    pub fn latency_histogram(&self) -> &Histogram<u64> {
        &self.latency.0
    }

    /// Fraction of finished blocks that were delivered.
    pub fn delivered_ratio(&self) -> f64 {
        let done = self.blocks_delivered + self.blocks_lost;
        if done == 0 {
            return 1.0;
        }
        self.blocks_delivered as f64 / done as f64
    }
}
