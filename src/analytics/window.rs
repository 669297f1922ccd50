//! Fixed-size sliding windows of one-second buckets.

use std::ops::AddAssign;

/// Buckets per ring: one per second of the longest window.
pub(crate) const BUCKETS: u64 = 60;
/// The windows a snapshot reports, in seconds.
pub(crate) const WINDOWS: [u64; 2] = [10, 60];

/// Everything the aggregator adds up, per stream, in totals and per bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    /// Datagrams the server sent, over intervals with a loss measurement.
    pub shards_sent: u64,
    /// Of those, not received (before FEC).
    pub shards_lost: u64,
    pub blocks_delivered: u64,
    pub blocks_recovered: u64,
    pub blocks_lost: u64,
    pub stalls: u64,
    pub stall_us: u64,
    /// Viewer time credited when a viewer's events arrive (see `Aggregator::credit_watch`).
    pub watch_us: u64,
}

impl AddAssign<&Counters> for Counters {
    fn add_assign(&mut self, o: &Counters) {
        // Saturating: a hostile report can push a counter near u64::MAX once.
        self.shards_sent = self.shards_sent.saturating_add(o.shards_sent);
        self.shards_lost = self.shards_lost.saturating_add(o.shards_lost);
        self.blocks_delivered = self.blocks_delivered.saturating_add(o.blocks_delivered);
        self.blocks_recovered = self.blocks_recovered.saturating_add(o.blocks_recovered);
        self.blocks_lost = self.blocks_lost.saturating_add(o.blocks_lost);
        self.stalls = self.stalls.saturating_add(o.stalls);
        self.stall_us = self.stall_us.saturating_add(o.stall_us);
        self.watch_us = self.watch_us.saturating_add(o.watch_us);
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Second (since the aggregator's epoch) this bucket holds; `u64::MAX` when unused.
    sec: u64,
    counters: Counters,
}

/// The last [`BUCKETS`] seconds of [`Counters`], one bucket per second.
///
/// Slot `sec % BUCKETS` holds second `sec`; a slot still stamped with an older second is
/// reset when written. Nothing needs advancing on a timer, and reads check the stamps, so a
/// ring that saw no events for minutes reads as empty.
#[derive(Debug, Clone)]
pub(crate) struct Ring {
    buckets: Box<[Bucket; BUCKETS as usize]>,
}

impl Default for Ring {
    fn default() -> Self {
        Self {
            buckets: Box::new(
                [Bucket {
                    sec: u64::MAX,
                    counters: Counters::default(),
                }; BUCKETS as usize],
            ),
        }
    }
}

impl Ring {
    /// Adds `delta` to second `sec`.
    pub(crate) fn add(&mut self, sec: u64, delta: &Counters) {
        let b = &mut self.buckets[(sec % BUCKETS) as usize];
        if b.sec != sec {
            if b.sec != u64::MAX && b.sec > sec {
                // The slot already holds a newer second, so `sec` is over a minute old and in
                // no window (the event still counts in the totals). Only reachable if the
                // caller's clock went backwards.
                return;
            }
            b.sec = sec;
            b.counters = Counters::default();
        }
        b.counters += delta;
    }

    /// Sum over the window of `width` seconds ending with second `now_sec`: the current
    /// (partial) second and the `width - 1` before it. A value added at second `s` therefore
    /// leaves the window once `now_sec >= s + width`, between `width - 1` and `width` seconds
    /// after it was added.
    pub(crate) fn sum(&self, now_sec: u64, width: u64) -> Counters {
        let mut total = Counters::default();
        for b in self.buckets.iter() {
            if b.sec <= now_sec && now_sec - b.sec < width {
                total += &b.counters;
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_stall() -> Counters {
        Counters {
            stalls: 1,
            ..Counters::default()
        }
    }

    #[test]
    fn values_leave_after_the_window() {
        let mut ring = Ring::default();
        ring.add(5, &one_stall());
        assert_eq!(ring.sum(4, 10).stalls, 0, "not yet");
        assert_eq!(ring.sum(5, 10).stalls, 1);
        assert_eq!(ring.sum(14, 10).stalls, 1);
        assert_eq!(ring.sum(15, 10).stalls, 0);
        assert_eq!(ring.sum(64, 60).stalls, 1);
        assert_eq!(ring.sum(65, 60).stalls, 0);
        // The slot is reused for second 65 and starts from zero.
        ring.add(65, &one_stall());
        ring.add(65, &one_stall());
        assert_eq!(ring.sum(65, 60).stalls, 2);
        // Far in the past: dropped from the windows instead of clobbering second 65.
        ring.add(5, &one_stall());
        assert_eq!(ring.sum(65, 60).stalls, 2);
    }
}
