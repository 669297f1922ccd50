//! A per-viewer quality-of-experience score.

use std::time::Duration;

/// Default [`QoeModel::latency_target`].
pub const DEFAULT_LATENCY_TARGET: Duration = Duration::from_millis(200);
/// Default [`QoeModel::startup_target`].
pub const DEFAULT_STARTUP_TARGET: Duration = Duration::from_secs(1);

/// What a viewer's score is computed from.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QoeInputs {
    /// Blocks lost after FEC over blocks due, `0.0..=1.0`.
    pub residual_loss: f64,
    /// Stalled time over watch time, `0.0..=1.0`.
    pub stall_ratio: f64,
    /// The viewer's 99th percentile block latency.
    pub latency_p99: Duration,
    /// Time to the first block; for a viewer still waiting, the wait so far.
    pub startup: Duration,
}

/// Scores a viewer's experience from 0 (unwatchable) to 100 (flawless).
///
/// ```text
/// score = 100 - loss - stall - latency - startup, rounded and clamped to 0..=100
///
/// loss    = min(40, 4000 * residual_loss)          0.1% blocks lost -> 4, 1% -> 40
/// stall   = min(40,  400 * stall_ratio)            1% of the time stalled -> 4, 10% -> 40
/// latency = min(10, 10 * max(0, p99 - L) / L)      p99 at twice the target L -> 10
/// startup = min(10,  5 * max(0, startup - S) / S)  target S + 1 s (S = 1 s) -> 5
/// ```
///
/// Loss after FEC and stalls dominate because each is a visible glitch; latency and startup
/// only matter beyond their targets and cost at most 10 points each. Every term is
/// non-decreasing in its input, so more loss, more stalling, more latency or a slower start
/// never raises the score. NaN inputs are charged the full penalty.
#[derive(Debug, Clone, PartialEq)]
pub struct QoeModel {
    latency_target: Duration,
    startup_target: Duration,
}

impl Default for QoeModel {
    fn default() -> Self {
        Self {
            latency_target: DEFAULT_LATENCY_TARGET,
            startup_target: DEFAULT_STARTUP_TARGET,
        }
    }
}

/// `min(cap, slope * x)` for `x >= 0`, with NaN charged `cap`.
fn penalty(x: f64, slope: f64, cap: f64) -> f64 {
    if x.is_nan() {
        cap
    } else {
        (slope * x.max(0.0)).min(cap)
    }
}

impl QoeModel {
    /// p99 block latency above which the score drops (default 200 ms).
    ///
    /// Lower suits interactive streams; the penalty grows linearly and is full (10 points)
    /// at twice the target.
    pub fn latency_target(&mut self, value: Duration) -> &mut Self {
        // A zero target would divide by zero; 1 ms is already stricter than any real path.
        self.latency_target = value.max(Duration::from_millis(1));
        self
    }

    /// Join time above which the score drops (default 1 s).
    pub fn startup_target(&mut self, value: Duration) -> &mut Self {
        self.startup_target = value.max(Duration::from_millis(1));
        self
    }

    /// The score for `inputs`, 0..=100.
    pub fn score(&self, inputs: &QoeInputs) -> u8 {
        let over = |actual: Duration, target: Duration| {
            actual.saturating_sub(target).as_secs_f64() / target.as_secs_f64()
        };
        let deductions = penalty(inputs.residual_loss, 4000.0, 40.0)
            + penalty(inputs.stall_ratio, 400.0, 40.0)
            + penalty(over(inputs.latency_p99, self.latency_target), 10.0, 10.0)
            + penalty(over(inputs.startup, self.startup_target), 5.0, 10.0);
        (100.0 - deductions).round().clamp(0.0, 100.0) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    fn good() -> QoeInputs {
        QoeInputs {
            residual_loss: 0.0,
            stall_ratio: 0.0,
            latency_p99: Duration::from_millis(50),
            startup: Duration::from_millis(300),
        }
    }

    #[test]
    fn formula_points() {
        let m = QoeModel::default();
        assert_eq!(m.score(&good()), 100);
        let with = |f: fn(&mut QoeInputs)| {
            let mut i = good();
            f(&mut i);
            m.score(&i)
        };
        assert_eq!(with(|i| i.residual_loss = 0.001), 96);
        assert_eq!(with(|i| i.residual_loss = 0.5), 60);
        assert_eq!(with(|i| i.stall_ratio = 0.01), 96);
        assert_eq!(with(|i| i.latency_p99 = Duration::from_millis(300)), 95);
        assert_eq!(with(|i| i.startup = Duration::from_secs(2)), 95);
        assert_eq!(with(|i| i.residual_loss = f64::NAN), 60);
        let worst = QoeInputs {
            residual_loss: 1.0,
            stall_ratio: 1.0,
            latency_p99: Duration::from_secs(60),
            startup: Duration::from_secs(600),
        };
        assert_eq!(m.score(&worst), 0);
    }

    #[test]
    fn score_is_monotonic_in_every_input() {
        let m = QoeModel::default();
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        for _ in 0..10_000 {
            let base = QoeInputs {
                residual_loss: rng.random_range(0.0..0.02),
                stall_ratio: rng.random_range(0.0..0.2),
                latency_p99: Duration::from_micros(rng.random_range(0..500_000)),
                startup: Duration::from_millis(rng.random_range(0..5_000)),
            };
            let s = m.score(&base);
            let mut worse = base;
            worse.residual_loss += rng.random_range(0.0..0.01);
            assert!(m.score(&worse) <= s, "{base:?} (seed {seed})");
            let mut worse = base;
            worse.stall_ratio += rng.random_range(0.0..0.05);
            assert!(m.score(&worse) <= s, "{base:?} (seed {seed})");
            let mut worse = base;
            worse.latency_p99 += Duration::from_millis(rng.random_range(0..200));
            assert!(m.score(&worse) <= s, "{base:?} (seed {seed})");
            let mut worse = base;
            worse.startup += Duration::from_millis(rng.random_range(0..2_000));
            assert!(m.score(&worse) <= s, "{base:?} (seed {seed})");
        }
        // And strictly lower while below the cap: the loss term is not dead.
        let mut lossy = good();
        lossy.residual_loss = 0.002;
        let mut lossier = lossy;
        lossier.residual_loss = 0.004;
        assert!(m.score(&lossier) < m.score(&lossy));
    }
}
