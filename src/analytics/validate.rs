//! Cleaning viewer reports before they reach the aggregator.
//!
//! A [`Report`] comes from the viewer, so it is network input: a buggy or hostile client can
//! send counters that go backwards, a billion-second latency, or claim more shards than the
//! server ever sent. The per-connection control task runs each report through that viewer's
//! [`Validator`] and enqueues only what comes out, so the aggregator can rely on counters that
//! never decrease and values in physical ranges.

use crate::wire::Report;

/// Largest latency a report may carry: 60 s, in microseconds. A live stream with more
/// latency than this is broken, and one absurd value would dominate the percentiles.
pub const MAX_LATENCY_US: u64 = 60_000_000;
/// Largest bitrate a report may carry: 10 Gbit/s.
pub const MAX_BITRATE_BPS: u64 = 10_000_000_000;
/// Largest receive buffer a report may carry: 600 s, in milliseconds.
pub const MAX_BUFFER_MS: u64 = 600_000;
/// Largest join time a report may carry: 600 s, in milliseconds.
pub const MAX_STARTUP_MS: u64 = 600_000;

/// Slack on [`Published::elapsed_ms`]: the viewer's clock starts a little before the server's
/// (it starts before the handshake), so its stall time may run ahead of the server's by the
/// handshake's round trips.
pub const STALL_SLACK_MS: u64 = 2_000;

/// What the server has given one viewer since it joined: the most any counter of a real
/// viewer's report can be. See [`Validator::check_within`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Datagrams that left for this viewer (quinn's evictions excluded).
    pub sent_shards: u64,
    /// Blocks offered to this viewer: sent, or skipped because it fell behind.
    pub blocks: u64,
    /// Shards (data and parity) of the blocks offered: the most it can miss.
    pub shards: u64,
    /// Milliseconds since the viewer's connection began: the most it can have stalled.
    pub elapsed_ms: u64,
}

/// Why a report was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    /// A cumulative counter is lower than in the previous accepted report.
    #[error("report counter `{0}` went backwards")]
    CounterDecreased(&'static str),
    /// More blocks were rebuilt by FEC than were delivered at all. A receiver counts a
    /// rebuilt block before the blocks ahead of it are released, so an honest report can
    /// show this for a moment; the server drops such a report but keeps the connection.
    #[error("blocks_recovered exceeds blocks_delivered")]
    RecoveredExceedsDelivered,
    /// A counter exceeds what was published to the viewer, or the time it has been
    /// connected (see [`Published`]).
    #[error("report counter `{0}` exceeds what the server published (or the time connected)")]
    Impossible(&'static str),
}

/// Checks one viewer's reports against each other; keep one per viewer connection.
///
/// [`Validator::check`] rejects a report that cannot be true of a real receiver (a cumulative
/// counter that decreased, more recovered than delivered blocks) and clamps values that are
/// merely out of range. Each accepted report becomes the baseline for the next one, so the
/// counters that come out never decrease, even when a field was clamped.
#[derive(Debug, Clone, Default)]
pub struct Validator {
    /// Last accepted (cleaned) report; all zeros before the first, as counters start at join.
    prev: Report,
    accepted: u64,
    rejected: u64,
    clamped: u64,
}

impl Validator {
    /// A validator for a viewer that has just joined.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `report` against the previous accepted one and returns the cleaned report.
    ///
    /// `sent_shards` is the server's count of datagrams sent to this viewer, read now. It bounds
    /// `shards_received`: a viewer cannot have received more than was sent before its report
    /// arrived (QUIC drops duplicate packets, so datagrams are never duplicated).
    ///
    /// Clamped, not rejected: latencies above [`MAX_LATENCY_US`], bitrate above
    /// [`MAX_BITRATE_BPS`], buffer above [`MAX_BUFFER_MS`], startup above [`MAX_STARTUP_MS`],
    /// a median latency above the 99th percentile (lowered to it), and `shards_received`
    /// above `sent_shards`. A rejected report does not become the baseline.
    pub fn check(&mut self, report: &Report, sent_shards: u64) -> Result<Report, Rejected> {
        if let Err(e) = self.check_counters(report) {
            self.rejected += 1;
            return Err(e);
        }
        let mut r = *report;
        let mut clamped = false;
        let mut clamp = |v: &mut u64, max: u64| {
            if *v > max {
                *v = max;
                clamped = true;
            }
        };
        clamp(&mut r.latency_p99_us, MAX_LATENCY_US);
        clamp(&mut r.latency_p50_us, r.latency_p99_us);
        clamp(&mut r.bitrate_bps, MAX_BITRATE_BPS);
        clamp(&mut r.buffer_ms, MAX_BUFFER_MS);
        clamp(&mut r.startup_ms, MAX_STARTUP_MS);
        // Never below the previous value, so the output stays monotonic even if the server's
        // counter were behind (it is read later than the viewer's, so it should not be).
        clamp(
            &mut r.shards_received,
            sent_shards.max(self.prev.shards_received),
        );
        if clamped {
            self.clamped += 1;
        }
        self.accepted += 1;
        self.prev = r;
        Ok(r)
    }

    /// Like [`check`](Self::check), and also rejects, as [`Rejected::Impossible`], any report
    /// no real viewer can send given what the server published to it: blocks delivered plus
    /// lost, or blocks recovered, above the blocks offered, stalls above the blocks offered plus one (a stall ends
    /// with a delivered block), shards received or late above the datagrams sent, shards
    /// missing above the shards offered, or stall time above the time connected (plus
    /// [`STALL_SLACK_MS`]). Such a report is a lie or a bug; the server closes the
    /// connection, so nothing in it reaches the aggregator.
    pub fn check_within(
        &mut self,
        report: &Report,
        limits: &Published,
    ) -> Result<Report, Rejected> {
        if let Err(e) = Self::check_limits(report, limits) {
            self.rejected += 1;
            return Err(e);
        }
        self.check(report, limits.sent_shards)
    }

    fn check_limits(r: &Report, l: &Published) -> Result<(), Rejected> {
        let outcomes = r.blocks_delivered.checked_add(r.blocks_lost);
        if outcomes.is_none_or(|n| n > l.blocks) {
            return Err(Rejected::Impossible("blocks_delivered + blocks_lost"));
        }
        for (name, value, max) in [
            ("blocks_recovered", r.blocks_recovered, l.blocks),
            ("stalls", r.stalls, l.blocks.saturating_add(1)),
            ("shards_received", r.shards_received, l.sent_shards),
            ("shards_late", r.shards_late, l.sent_shards),
            ("shards_missing", r.shards_missing, l.shards),
            (
                "stall_ms",
                r.stall_ms,
                l.elapsed_ms.saturating_add(STALL_SLACK_MS),
            ),
        ] {
            if value > max {
                return Err(Rejected::Impossible(name));
            }
        }
        Ok(())
    }

    fn check_counters(&self, r: &Report) -> Result<(), Rejected> {
        let p = &self.prev;
        for (name, now, before) in [
            ("blocks_delivered", r.blocks_delivered, p.blocks_delivered),
            ("blocks_recovered", r.blocks_recovered, p.blocks_recovered),
            ("blocks_lost", r.blocks_lost, p.blocks_lost),
            ("shards_late", r.shards_late, p.shards_late),
            ("shards_received", r.shards_received, p.shards_received),
            ("shards_missing", r.shards_missing, p.shards_missing),
            ("stalls", r.stalls, p.stalls),
            ("stall_ms", r.stall_ms, p.stall_ms),
        ] {
            if now < before {
                return Err(Rejected::CounterDecreased(name));
            }
        }
        if r.blocks_recovered > r.blocks_delivered {
            return Err(Rejected::RecoveredExceedsDelivered);
        }
        Ok(())
    }

    /// Reports accepted so far (clamped or not).
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Reports rejected so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Accepted reports in which at least one field was clamped.
    pub fn clamped(&self) -> u64 {
        self.clamped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    fn report(delivered: u64, received: u64) -> Report {
        Report {
            blocks_delivered: delivered,
            shards_received: received,
            latency_p50_us: 20_000,
            latency_p99_us: 30_000,
            ..Report::default()
        }
    }

    #[test]
    fn rejects_decreasing_counters_and_keeps_the_old_baseline() {
        let mut v = Validator::new();
        assert!(v.check(&report(10, 100), 120).is_ok());
        assert_eq!(
            v.check(&report(9, 110), 130),
            Err(Rejected::CounterDecreased("blocks_delivered"))
        );
        let mut stalls = report(10, 110);
        stalls.stall_ms = 5;
        assert!(v.check(&stalls, 130).is_ok());
        stalls.stall_ms = 4;
        assert_eq!(
            v.check(&stalls, 130),
            Err(Rejected::CounterDecreased("stall_ms"))
        );
        let mut recovered = report(10, 110);
        recovered.stall_ms = 5;
        recovered.blocks_recovered = 11;
        assert_eq!(
            v.check(&recovered, 130),
            Err(Rejected::RecoveredExceedsDelivered)
        );
        // The rejected reports did not move the baseline: 10 delivered is still accepted.
        let mut ok = report(10, 110);
        ok.stall_ms = 5;
        assert_eq!(v.check(&ok, 130), Ok(ok));
        assert_eq!((v.accepted(), v.rejected(), v.clamped()), (3, 3, 0));
    }

    #[test]
    fn impossible_counters_are_rejected_and_possible_ones_pass() {
        let limits = Published {
            sent_shards: 1_000,
            blocks: 50,
            shards: 1_500,
            elapsed_ms: 10_000,
        };
        let honest = Report {
            blocks_delivered: 45,
            blocks_lost: 5,
            shards_received: 1_000,
            shards_missing: 1_500,
            shards_late: 3,
            stalls: 51,
            stall_ms: 12_000,
            ..Report::default()
        };
        let mut v = Validator::new();
        assert_eq!(v.check_within(&honest, &limits), Ok(honest));
        type Lie = fn(&mut Report);
        let cases: [(&str, Lie); 8] = [
            ("blocks_recovered", |r| r.blocks_recovered = 51),
            ("blocks_delivered + blocks_lost", |r| {
                r.blocks_lost = (1 << 62) - 1
            }),
            ("blocks_delivered + blocks_lost", |r| {
                r.blocks_delivered = u64::MAX
            }),
            ("stalls", |r| r.stalls = 52),
            ("shards_received", |r| r.shards_received = 1_001),
            ("shards_late", |r| r.shards_late = 1_001),
            ("shards_missing", |r| r.shards_missing = 1_501),
            ("stall_ms", |r| r.stall_ms = 10_000 + STALL_SLACK_MS + 1),
        ];
        for (name, lie) in cases {
            let mut r = honest;
            lie(&mut r);
            assert_eq!(
                v.check_within(&r, &limits),
                Err(Rejected::Impossible(name)),
                "{r:?}"
            );
        }
        // The lies did not move the baseline.
        assert_eq!(v.check_within(&honest, &limits), Ok(honest));
        assert_eq!((v.accepted(), v.rejected()), (2, 8));
    }

    #[test]
    fn clamps_out_of_range_values() {
        let mut v = Validator::new();
        let wild = Report {
            latency_p50_us: u64::MAX,
            latency_p99_us: 90_000_000,
            bitrate_bps: u64::MAX,
            buffer_ms: 10_000_000,
            startup_ms: 700_000,
            shards_received: 1_000,
            ..Report::default()
        };
        let clean = v.check(&wild, 400).unwrap();
        assert_eq!(clean.latency_p99_us, MAX_LATENCY_US);
        assert_eq!(clean.latency_p50_us, MAX_LATENCY_US);
        assert_eq!(clean.bitrate_bps, MAX_BITRATE_BPS);
        assert_eq!(clean.buffer_ms, MAX_BUFFER_MS);
        assert_eq!(clean.startup_ms, MAX_STARTUP_MS);
        assert_eq!(clean.shards_received, 400, "cannot receive more than sent");
        assert_eq!(v.clamped(), 1);
        // A median above the p99 is lowered to it.
        let mut odd = report(0, 400);
        odd.latency_p50_us = 50_000;
        odd.latency_p99_us = 40_000;
        assert_eq!(v.check(&odd, 400).unwrap().latency_p50_us, 40_000);
    }

    #[test]
    fn cleaned_counters_never_decrease() {
        // Random reports, mostly honest, some with a counter pushed backwards and some with an
        // impossible shard count: the liars are rejected, and whatever is accepted is
        // monotonic and in range, so the aggregator's deltas are never negative.
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut v = Validator::new();
        let mut sent = 0u64;
        let mut last = Report::default();
        let (mut lies, mut wild) = (0, 0);
        for _ in 0..10_000 {
            sent += rng.random_range(0..100);
            let mut r = last;
            r.blocks_delivered += rng.random_range(0..10);
            r.blocks_recovered =
                (r.blocks_recovered + rng.random_range(0..3)).min(r.blocks_delivered);
            r.shards_received = (r.shards_received + rng.random_range(0..100)).min(sent);
            r.shards_missing += rng.random_range(0..5);
            r.stalls += rng.random_range(0..2);
            r.stall_ms += rng.random_range(0..100);
            r.latency_p50_us = rng.random_range(0..100_000_000);
            r.latency_p99_us = rng.random_range(0..100_000_000);
            let roll = rng.random_range(0..10);
            if roll == 0 && last.stall_ms > 0 {
                r.stall_ms = rng.random_range(0..last.stall_ms);
                assert_eq!(
                    v.check(&r, sent),
                    Err(Rejected::CounterDecreased("stall_ms")),
                    "seed {seed}"
                );
                lies += 1;
                continue;
            }
            if roll == 1 {
                r.shards_received = rng.random_range(sent..=u64::MAX);
                wild += 1;
            }
            let clean = v
                .check(&r, sent)
                .unwrap_or_else(|e| panic!("{e} (seed {seed})"));
            assert!(clean.shards_received >= last.shards_received, "seed {seed}");
            assert!(clean.shards_received <= sent, "seed {seed}");
            assert!(clean.latency_p50_us <= clean.latency_p99_us, "seed {seed}");
            assert!(clean.latency_p99_us <= MAX_LATENCY_US, "seed {seed}");
            last = clean;
        }
        assert_eq!(v.rejected(), lies, "seed {seed}");
        assert!(lies > 100 && wild > 100, "seed {seed}");
        assert!(v.clamped() >= wild, "seed {seed}");
    }
}
