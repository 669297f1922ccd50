//! The decision loop: how many parity shards each viewer needs.
//!
//! A block of `k` data shards sent with `m` parity shards is rebuilt if at most `m` of its
//! `k + m` shards are lost. With independent shard loss `p` the block is lost with probability
//!
//! ```text
//! P[Binomial(k + m, p) > m]
//! ```
//!
//! [`RedundancyPolicy::parity_for`] picks the smallest `m` that brings this below the target
//! residual loss. The loss `p` comes from a [`LossEstimator`] per viewer: a count-weighted
//! moving average of the loss measured between reports, raised by a confidence margin that is
//! wide while the viewer has reported few shards. Per block, the sender only looks `k` up in
//! the viewer's [`ParityTable`]; the math runs when tables are built.

use std::fmt;

use crate::wire::MAX_SHARDS;

/// Default [`RedundancyPolicy::target_residual`]: one lost block in ten thousand.
pub const DEFAULT_TARGET_RESIDUAL: f64 = 1e-4;
/// Default [`RedundancyPolicy::min_parity`].
pub const DEFAULT_MIN_PARITY: u8 = 1;
/// Default [`RedundancyPolicy::max_ratio`]: at most one parity shard per two data shards.
pub const DEFAULT_MAX_RATIO: f64 = 0.5;
/// Default [`RedundancyPolicy::ewma_weight`].
pub const DEFAULT_EWMA_WEIGHT: f64 = 0.2;
/// Default [`RedundancyPolicy::confidence_z`]: one-sided 95%.
pub const DEFAULT_CONFIDENCE_Z: f64 = 1.645;
/// Default [`RedundancyPolicy::initial_loss`].
pub const DEFAULT_INITIAL_LOSS: f64 = 0.02;

/// How many shards the initial loss guess is worth: enough to steady the first estimate,
/// few enough that one report interval of a real stream (hundreds of shards) outweighs it.
const PRIOR_SHARDS: f64 = 100.0;

/// Loss levels the aggregator precomputes tables for: 0, then geometric steps of 5% from
/// `1e-6` up to 0.5, then 1. An estimate is rounded *up* to the next level, so the table a
/// viewer gets is at worst computed for a 5% higher loss than estimated (at 5% loss a
/// 10% step alone could cost a whole parity shard per group of 20).
const LEVEL_LOWEST: f64 = 1e-6;
const LEVEL_RATIO: f64 = 1.05;
const LEVEL_TOP: f64 = 0.5;

/// How much forward error correction to send, and how to estimate the loss it must cover.
///
/// A block of `k` data shards sent with `m` parity shards is lost when more than `m` of its
/// `k + m` shards are, so at independent shard loss `p` the policy picks the smallest `m`
/// with `P[Binomial(k + m, p) > m] <= target_residual` ([`parity_for`](Self::parity_for)),
/// between [`min_parity`](Self::min_parity) and the [`max_ratio`](Self::max_ratio) cap. The
/// `p` it plans for is a viewer's [`LossEstimator::upper_bound`]. At the defaults and
/// `k = 32`: 1 parity shard at 0 loss, 4 at 1%, 13 at 10%.
///
/// Build with [`RedundancyPolicy::default`] and adjust with the setters. Setters clamp
/// out-of-range values (and NaN) into range rather than failing.
#[derive(Debug, Clone, PartialEq)]
pub struct RedundancyPolicy {
    target_residual: f64,
    min_parity: u8,
    max_ratio: f64,
    ewma_weight: f64,
    confidence_z: f64,
    initial_loss: f64,
}

impl Default for RedundancyPolicy {
    fn default() -> Self {
        Self {
            target_residual: DEFAULT_TARGET_RESIDUAL,
            min_parity: DEFAULT_MIN_PARITY,
            max_ratio: DEFAULT_MAX_RATIO,
            ewma_weight: DEFAULT_EWMA_WEIGHT,
            confidence_z: DEFAULT_CONFIDENCE_Z,
            initial_loss: DEFAULT_INITIAL_LOSS,
        }
    }
}

/// `x` clamped into `lo..=hi`; NaN becomes `lo`.
fn clamp(x: f64, lo: f64, hi: f64) -> f64 {
    x.max(lo).min(hi)
}

impl RedundancyPolicy {
    /// Block loss after FEC the policy aims for, per block (default `1e-4`, range `1e-12..=0.5`).
    ///
    /// Each factor of ten lower costs roughly one to two more parity shards per group at a few
    /// percent loss, i.e. bandwidth on every block for fewer visible glitches.
    pub fn target_residual(&mut self, value: f64) -> &mut Self {
        self.target_residual = clamp(value, 1e-12, 0.5);
        self
    }

    /// Parity shards sent even on a loss-free path (default 1).
    ///
    /// The floor covers a loss burst that starts before the next report can raise the
    /// estimate; 0 saves bandwidth on clean paths but leaves the first loss unprotected.
    pub fn min_parity(&mut self, value: u8) -> &mut Self {
        self.min_parity = value;
        self
    }

    /// Most parity shards per data shard (default 0.5, range `0.0..=4.0`).
    ///
    /// Caps the overhead for a viewer on a terrible path: beyond it the residual target is
    /// given up rather than flooding the path. The cap is `floor(k * ratio)`, never below
    /// [`min_parity`](Self::min_parity), and `k + m` never exceeds [`MAX_SHARDS`](crate::wire::MAX_SHARDS).
    pub fn max_ratio(&mut self, value: f64) -> &mut Self {
        self.max_ratio = clamp(value, 0.0, 4.0);
        self
    }

    /// Weight of the newest report interval in the loss average (default 0.2, range
    /// `0.01..=1.0`).
    ///
    /// Higher follows a changing path faster but also chases noise; 0.2 remembers about five
    /// report intervals. See [`LossEstimator`].
    pub fn ewma_weight(&mut self, value: f64) -> &mut Self {
        self.ewma_weight = clamp(value, 0.01, 1.0);
        self
    }

    /// Width of the confidence margin added to the loss estimate, in standard deviations
    /// (default 1.645, one-sided 95%; range `0.0..=5.0`).
    ///
    /// 0 plans for the point estimate alone, which under-protects viewers measured over few
    /// shards; larger values spend parity on uncertainty.
    pub fn confidence_z(&mut self, value: f64) -> &mut Self {
        self.confidence_z = clamp(value, 0.0, 5.0);
        self
    }

    /// Loss assumed for a viewer before its reports say otherwise (default 0.02, range
    /// `0.0..=0.5`).
    ///
    /// It counts as 100 observed shards, so it only shapes the first report intervals.
    pub fn initial_loss(&mut self, value: f64) -> &mut Self {
        self.initial_loss = clamp(value, 0.0, 0.5);
        self
    }

    /// Parity range allowed for `k` data shards (`1 <= k <= 255`).
    fn bounds(&self, k: usize) -> (usize, usize) {
        let room = MAX_SHARDS - k;
        let lo = usize::from(self.min_parity).min(room);
        // `max_ratio` is at most 4, so the product fits easily.
        let hi = ((k as f64 * self.max_ratio) as usize).max(lo).min(room);
        (lo, hi)
    }

    /// Smallest parity `m` for `k` data shards at shard loss `loss` such that
    /// `P[Binomial(k + m, loss) > m] <= target`, within the policy's bounds.
    ///
    /// Returns the upper bound when even it misses the target (the path is too lossy to fix
    /// within the allowed overhead), and 0 for `k == 0`. `k` above 255 is treated as 255, and a
    /// NaN loss as total loss.
    pub fn parity_for(&self, k: usize, loss: f64) -> usize {
        let k = k.min(MAX_SHARDS - 1);
        if k == 0 {
            return 0;
        }
        let (lo, hi) = self.bounds(k);
        search(
            &LnFactorials::new(),
            k,
            sanitize(loss),
            self.target_residual,
            lo,
            hi,
        )
    }

    /// [`parity_for`](Self::parity_for) for every `k` in `0..=255` at once.
    pub fn parity_table(&self, loss: f64) -> ParityTable {
        self.table_with(&LnFactorials::new(), sanitize(loss))
    }

    fn table_with(&self, lf: &LnFactorials, loss: f64) -> ParityTable {
        let mut parity = [0u8; MAX_SHARDS];
        let mut prev = 0;
        for (k, slot) in parity.iter_mut().enumerate().skip(1) {
            let (lo, hi) = self.bounds(k);
            // The parity needed never shrinks as k grows (more shards, same parity, more ways
            // to fail), so the search for k starts where k - 1 ended. This keeps a whole table
            // at about 256 + max(m) tail evaluations instead of 256 * max(m).
            let start = prev.max(lo).min(hi);
            prev = search(lf, k, loss, self.target_residual, start, hi);
            // k + m <= 256 and k >= 1, so m <= 255.
            *slot = prev as u8;
        }
        ParityTable { parity }
    }
}

/// Copies of each repair request a receiver sends (see
/// [`Receiver`](crate::session::Receiver)); the policy counts a request as
/// lost only when every copy is.
pub const REPAIR_REQUEST_COPIES: i32 = 5;

/// Largest extra margin of shards a repair answer carries beyond the deficit.
const MAX_REPAIR_MARGIN: usize = 6;

/// Deficits a [`RepairPlan`] holds a margin for; a larger deficit is answered
/// with the margin of this one.
pub const PLANNED_DEFICITS: usize = 16;

/// How to protect one code group when repair rounds fit in the viewer's budget:
/// from [`RedundancyPolicy::plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RepairPlan {
    /// Parity shards sent with the group, before any request.
    pub parity: u8,
    /// Margin per deficit, `margins[d - 1]` for a group short by `d`.
    margins: [u8; PLANNED_DEFICITS],
}

impl RepairPlan {
    /// `parity` shards up front and answers that carry `margin` shards beyond
    /// any deficit.
    pub fn uniform(parity: u8, margin: u8) -> Self {
        RepairPlan {
            parity,
            margins: [margin; PLANNED_DEFICITS],
        }
    }

    /// Shards an answer to a group short by `deficit` carries beyond the
    /// deficit, so that it survives the path's loss (0 for no deficit).
    pub fn margin(&self, deficit: usize) -> u8 {
        match deficit {
            0 => 0,
            d => self.margins[d.min(PLANNED_DEFICITS) - 1],
        }
    }

    /// The same plan with no repair: margins of zero.
    pub fn without_repair(self) -> Self {
        RepairPlan::uniform(self.parity, 0)
    }
}

impl RedundancyPolicy {
    /// Proactive parity and the repair margins for a group of `k` data shards
    /// at shard loss `loss`, when `rounds` repair rounds fit in the viewer's
    /// budget (0, 1 or 2).
    ///
    /// With `rounds == 0` this is [`parity_for`](Self::parity_for) and no
    /// margin: only proactive parity can help. Otherwise, with `p` the loss,
    /// `n = k + m` shards sent proactively and `c` =
    /// [`REPAIR_REQUEST_COPIES`], a group short by `d` shards is repaired by
    /// one round unless every copy of the request is lost or more than the
    /// margin `e(d)` of the `d + e(d)` answer shards are:
    ///
    /// ```text
    /// F(d, e)      = 1 - (1 - p^c) P[Binomial(d + e, p) <= e]
    /// residual     = sum_{j > m} P[Binomial(n, p) = j] F(j - m, e(j - m))^rounds
    /// cost         = m + sum_{j > m} P[Binomial(n, p) = j] (d + e(d)) (1 + [rounds = 2] F(d, e(d)))
    /// ```
    ///
    /// For each `m` within the bounds of [`parity_for`](Self::parity_for) the
    /// margins start at zero and grow one shard at a time where a shard buys
    /// the most residual, until the residual meets
    /// [`target_residual`](Self::target_residual) (each `e(d) <= 6`; deficits
    /// above 16 count as lost). The plan is the `m` of least
    /// expected `cost`, shards per group, the proactive ones plus the expected
    /// repair traffic. So the residual target applies to the result after
    /// repair, the proactive parity is what repair cannot clean up in time,
    /// and a small deficit, the common one, carries a smaller margin than a
    /// large one. When no `m` meets the target it falls back to `parity_for`
    /// with a margin of one.
    pub fn plan(&self, k: usize, loss: f64, rounds: u32) -> RepairPlan {
        let k = k.min(MAX_SHARDS - 1);
        let p = sanitize(loss);
        let parity = self.parity_for(k, p) as u8;
        if rounds == 0 || k == 0 || p >= 1.0 {
            return RepairPlan::uniform(parity, 0);
        }
        let lf = LnFactorials::new();
        let (lo, hi) = self.bounds(k);
        let rounds = rounds.min(2) as i32;
        let request_lost = p.powi(REPAIR_REQUEST_COPIES);
        // fail[d - 1][e] = F(d, e)^rounds and its cost factor, once per plan.
        let mut fail = [[0.0f64; MAX_REPAIR_MARGIN + 1]; PLANNED_DEFICITS];
        for (i, row) in fail.iter_mut().enumerate() {
            for (e, f) in row.iter_mut().enumerate() {
                let once = 1.0 - (1.0 - request_lost) * (1.0 - tail_after(&lf, i + 1 + e, e, p));
                *f = once.powi(rounds);
            }
        }
        // Expected shards an answer of `d + e` costs, with the second round's
        // resend when two fit.
        let cost_of = |d: usize, e: usize| {
            let again = if rounds >= 2 {
                fail[d - 1][e].sqrt()
            } else {
                0.0
            };
            (d + e) as f64 * (1.0 + again)
        };
        let mut best: Option<(f64, RepairPlan)> = None;
        for m in lo..=hi {
            if best.is_some_and(|(c, _)| m as f64 >= c) {
                break;
            }
            let n = k + m;
            let mut pd = [0.0f64; PLANNED_DEFICITS];
            let mut beyond = 0.0;
            for j in m + 1..=n {
                let pj = pmf(&lf, n, j, p);
                match pd.get_mut(j - m - 1) {
                    Some(slot) => *slot = pj,
                    None => beyond += pj,
                }
                if j as f64 > n as f64 * p && pj < 1e-18 {
                    break;
                }
            }
            let mut margins = [0usize; PLANNED_DEFICITS];
            let residual_of = |margins: &[usize; PLANNED_DEFICITS]| {
                beyond
                    + (0..PLANNED_DEFICITS)
                        .map(|i| pd[i] * fail[i][margins[i]])
                        .sum::<f64>()
            };
            let mut residual = residual_of(&margins);
            while residual > self.target_residual {
                // The deficit where one more margin shard removes the most
                // residual per expected shard spent.
                let pick = (0..PLANNED_DEFICITS)
                    .filter(|&i| margins[i] < MAX_REPAIR_MARGIN && pd[i] > 0.0)
                    .map(|i| {
                        let e = margins[i];
                        let gain = pd[i] * (fail[i][e] - fail[i][e + 1]);
                        let spend = pd[i] * (cost_of(i + 1, e + 1) - cost_of(i + 1, e));
                        (i, gain / spend.max(f64::MIN_POSITIVE))
                    })
                    .filter(|&(_, worth)| worth > 0.0)
                    .max_by(|a, b| a.1.total_cmp(&b.1));
                let Some((i, _)) = pick else {
                    break;
                };
                margins[i] += 1;
                residual = residual_of(&margins);
            }
            if residual > self.target_residual {
                continue;
            }
            let cost = m as f64
                + (0..PLANNED_DEFICITS)
                    .map(|i| pd[i] * cost_of(i + 1, margins[i]))
                    .sum::<f64>();
            if best.is_none_or(|(c, _)| cost < c) {
                let mut plan = RepairPlan::uniform(m as u8, 0);
                for (slot, &e) in plan.margins.iter_mut().zip(&margins) {
                    *slot = e as u8;
                }
                // A deficit too unlikely to have needed a margin is still
                // answered with at least its neighbour's.
                for i in 1..PLANNED_DEFICITS {
                    plan.margins[i] = plan.margins[i].max(plan.margins[i - 1]);
                }
                best = Some((cost, plan));
            }
        }
        best.map_or(RepairPlan::uniform(parity, 1), |(_, plan)| plan)
    }
}

/// `P[Binomial(n, p) = j]`.
fn pmf(lf: &LnFactorials, n: usize, j: usize, p: f64) -> f64 {
    if p <= 0.0 {
        return if j == 0 { 1.0 } else { 0.0 };
    }
    (lf.ln_choose(n, j) + j as f64 * p.ln() + (n - j) as f64 * (-p).ln_1p()).exp()
}

/// `P[Binomial(n, p) > e]` for `n` shards of which `e` may be lost.
fn tail_after(lf: &LnFactorials, n: usize, e: usize, p: f64) -> f64 {
    if e >= n {
        return 0.0;
    }
    tail(lf, n - e, e, p)
}

/// NaN (no usable estimate) is planned for as the worst case.
fn sanitize(loss: f64) -> f64 {
    if loss.is_nan() {
        1.0
    } else {
        loss.clamp(0.0, 1.0)
    }
}

/// Smallest `m` in `lo..=hi` meeting the target, or `hi`.
fn search(lf: &LnFactorials, k: usize, p: f64, target: f64, lo: usize, hi: usize) -> usize {
    let mut m = lo;
    // The tail strictly falls as m grows: P[B(n+1) > m+1] = P[B(n) > m] - (1-p) P[B(n) = m+1].
    while m < hi && tail(lf, k, m, p) > target {
        m += 1;
    }
    m
}

/// Probability that a block of `k` data and `m` parity shards is lost when each shard is lost
/// independently with probability `loss`: `P[Binomial(k + m, loss) > m]`.
///
/// Computed exactly, as a sum of the binomial terms above `m` (no `1 - CDF` cancellation), in
/// log space for the first term and by the ratio of consecutive terms for the rest, so it is
/// accurate from 1 down to the smallest normal `f64`. Requires `k + m <= 256`; larger groups are
/// not representable on the wire and return NaN.
pub fn block_failure_probability(k: usize, m: usize, loss: f64) -> f64 {
    if k + m > MAX_SHARDS {
        return f64::NAN;
    }
    tail(&LnFactorials::new(), k, m, sanitize(loss))
}

fn tail(lf: &LnFactorials, k: usize, m: usize, p: f64) -> f64 {
    let n = k + m;
    if k == 0 || p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let first = m + 1;
    let ln_first =
        lf.ln_choose(n, first) + first as f64 * p.ln() + (n - first) as f64 * (-p).ln_1p();
    // Terms relative to the first; starting at 1 keeps them far from underflow even when the
    // first term itself is ~1e-300.
    let odds = p / (1.0 - p);
    let (mut term, mut sum) = (1.0f64, 1.0f64);
    for i in first..n {
        term *= (n - i) as f64 / (i + 1) as f64 * odds;
        sum += term;
        // Before the mode terms grow (so term/sum >= 1/256); after it they shrink
        // geometrically, and once one no longer moves the sum neither will the rest.
        if term < sum * 1e-17 {
            break;
        }
    }
    (ln_first + sum.ln()).exp().min(1.0)
}

/// `ln(i!)` for `i` in `0..=256`.
struct LnFactorials([f64; MAX_SHARDS + 1]);

impl LnFactorials {
    fn new() -> Self {
        let mut t = [0.0; MAX_SHARDS + 1];
        for i in 1..t.len() {
            t[i] = t[i - 1] + (i as f64).ln();
        }
        Self(t)
    }

    fn ln_choose(&self, n: usize, r: usize) -> f64 {
        self.0[n] - self.0[r] - self.0[n - r]
    }
}

/// Parity shards to send for each data-shard count `k`, for one loss level.
///
/// The sender's per-block decision is `table.parity(k)`: an array read.
#[derive(Clone, PartialEq, Eq)]
pub struct ParityTable {
    parity: [u8; MAX_SHARDS],
}

impl ParityTable {
    /// Parity shards for a block of `k` data shards (`k` above 255 reads the entry for 255).
    #[inline]
    pub fn parity(&self, k: usize) -> usize {
        usize::from(self.parity[k.min(MAX_SHARDS - 1)])
    }

    /// The whole table, indexed by `k`.
    pub fn as_array(&self) -> &[u8; MAX_SHARDS] {
        &self.parity
    }
}

impl fmt::Debug for ParityTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // 256 numbers are unreadable; a few typical group sizes tell the story.
        f.debug_map()
            .entries([8, 16, 32, 64, 128].map(|k| (k, self.parity[k])))
            .finish_non_exhaustive()
    }
}

/// One viewer's shard loss before FEC, as a count-weighted moving average.
///
/// Each report interval contributes the shards the server sent (`expected`) and those the
/// viewer did not receive (`lost`). Both are kept as exponentially decayed sums,
///
/// ```text
/// L <- (1 - w) L + lost        N <- (1 - w) N + expected        estimate = L / N
/// ```
///
/// with `w` the policy's [`ewma_weight`](RedundancyPolicy::ewma_weight). This is an EWMA of
/// the per-interval loss in which an interval weighs by its shard count, so a quiet interval
/// with 3 shards and 1 loss cannot swing the estimate to 33%. It starts from the policy's
/// [`initial_loss`](RedundancyPolicy::initial_loss) worth 100 shards.
///
/// [`upper_bound`](Self::upper_bound) adds a Wilson score margin computed with `N` as the
/// sample size. `N` is small for a new or slow viewer and grows to about `expected / w` in
/// steady state, so the margin is wide exactly when the estimate rests on few shards, and
/// parity is planned for the upper bound: uncertainty costs bandwidth, never blocks. The
/// decayed sum is not a true binomial count, so the margin is a heuristic of the right shape,
/// not an exact interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossEstimator {
    lost: f64,
    expected: f64,
}

impl LossEstimator {
    /// An estimator holding only the policy's initial guess.
    pub fn new(policy: &RedundancyPolicy) -> Self {
        Self {
            lost: policy.initial_loss * PRIOR_SHARDS,
            expected: PRIOR_SHARDS,
        }
    }

    /// Adds one report interval: `expected` shards sent, `lost` of them not received.
    ///
    /// `lost` above `expected` is counted as `expected`. An interval with nothing sent
    /// carries no information and leaves the estimate alone.
    pub fn update(&mut self, policy: &RedundancyPolicy, expected: u64, lost: u64) {
        if expected == 0 {
            return;
        }
        let keep = 1.0 - policy.ewma_weight;
        self.lost = keep * self.lost + lost.min(expected) as f64;
        self.expected = keep * self.expected + expected as f64;
    }

    /// The point estimate of shard loss, `0.0..=1.0`.
    pub fn estimate(&self) -> f64 {
        if self.expected > 0.0 {
            (self.lost / self.expected).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }

    /// The estimate plus the policy's confidence margin, `0.0..=1.0`: the loss parity is
    /// planned for.
    pub fn upper_bound(&self, policy: &RedundancyPolicy) -> f64 {
        wilson_upper(self.estimate(), self.expected, policy.confidence_z)
    }

    /// Effective number of shards behind the estimate (the decayed sum `N`).
    pub fn samples(&self) -> f64 {
        self.expected
    }
}

/// Upper end of the Wilson score interval for a proportion `p` seen over `n` trials.
fn wilson_upper(p: f64, n: f64, z: f64) -> f64 {
    if n <= 0.0 {
        return 1.0;
    }
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let margin = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre + margin) / (1.0 + z2 / n)).clamp(0.0, 1.0)
}

/// Parity tables for a fixed ladder of loss levels, built once per policy.
///
/// Rebuilding a 256-entry table on every report would cost more than the rest of the
/// aggregator together; instead each viewer holds a level index, and its table is shared.
#[derive(Debug, Clone)]
pub(crate) struct ParityLevels {
    /// Ascending loss levels; `levels[0] == 0`, the last is 1.
    levels: Vec<f64>,
    tables: Vec<ParityTable>,
}

/// Index of a loss level in [`ParityLevels`].
pub(crate) type Level = u16;

impl ParityLevels {
    pub(crate) fn new(policy: &RedundancyPolicy) -> Self {
        let mut levels = vec![0.0];
        let mut p = LEVEL_LOWEST;
        while p < LEVEL_TOP {
            levels.push(p);
            p *= LEVEL_RATIO;
        }
        levels.push(1.0);
        let lf = LnFactorials::new();
        let tables = levels.iter().map(|&p| policy.table_with(&lf, p)).collect();
        Self { levels, tables }
    }

    /// The lowest level at or above `loss` (rounding up never under-protects).
    pub(crate) fn level_for(&self, loss: f64) -> Level {
        let loss = sanitize(loss);
        let i = self.levels.partition_point(|&l| l < loss);
        // The ladder has ~280 rungs, and `loss <= 1 == last`, so `i` is in range.
        i.min(self.levels.len() - 1) as Level
    }

    /// The loss a level stands for.
    pub(crate) fn loss(&self, level: Level) -> f64 {
        self.levels[usize::from(level).min(self.levels.len() - 1)]
    }

    pub(crate) fn table(&self, level: Level) -> &ParityTable {
        &self.tables[usize::from(level).min(self.tables.len() - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    /// Direct sum of `exp(ln pmf)` terms: slow and simple, to check the fast path against.
    fn naive_tail(k: usize, m: usize, p: f64) -> f64 {
        let lf = LnFactorials::new();
        let n = k + m;
        (m + 1..=n)
            .map(|i| {
                (lf.ln_choose(n, i) + i as f64 * p.ln() + (n - i) as f64 * (1.0 - p).ln()).exp()
            })
            .sum()
    }

    /// The table the policy documents: k = 20 at 5% loss, parity per group and
    /// the repair margin, without a repair round and with one or two.
    #[test]
    fn repair_rounds_lower_proactive_parity() {
        let policy = RedundancyPolicy::default();
        let none = policy.plan(20, 0.05, 0);
        let one = policy.plan(20, 0.05, 1);
        let two = policy.plan(20, 0.05, 2);
        println!("k=20 p=5%: no round {none:?}, one round {one:?}, two rounds {two:?}");
        assert_eq!(none.parity as usize, policy.parity_for(20, 0.05));
        assert_eq!(none, none.without_repair());
        assert_eq!(none.parity, 7, "binomial: P[B(27, 5%) > 7] <= 1e-4");
        assert!(one.parity <= 2 && one.margin(1) >= 1, "{one:?}");
        // The common small deficit carries less margin than a large one.
        assert!(one.margin(1) <= one.margin(4), "{one:?}");
        assert!(two.parity <= one.parity, "{two:?} vs {one:?}");
        // Each plan meets the residual target it claims, checked by brute force.
        let lf = LnFactorials::new();
        for (plan, rounds) in [(one, 1), (two, 2)] {
            let m = usize::from(plan.parity);
            let p: f64 = 0.05;
            let residual: f64 = (m + 1..=20 + m)
                .map(|j| {
                    let e = usize::from(plan.margin(j - m));
                    let f = 1.0
                        - (1.0 - p.powi(REPAIR_REQUEST_COPIES))
                            * (1.0 - tail_after(&lf, j - m + e, e, p));
                    pmf(&lf, 20 + m, j, p) * f.powi(rounds)
                })
                .sum();
            assert!(residual <= 1e-4, "{plan:?} residual {residual}");
        }
        // Heavier loss needs more of both; a clean path needs only the floor.
        let heavy = policy.plan(20, 0.10, 1);
        assert!(heavy.parity >= one.parity, "{heavy:?}");
        assert_eq!(policy.plan(20, 0.0, 1).parity, DEFAULT_MIN_PARITY);
        // A path too lossy for any plan falls back to proactive parity.
        assert_eq!(
            policy.plan(20, 0.6, 1).parity as usize,
            policy.parity_for(20, 0.6)
        );
    }

    #[test]
    fn tail_matches_small_cases_and_a_naive_sum() {
        // k = 1, m = 1: lost only if both shards are lost.
        assert!((block_failure_probability(1, 1, 0.1) - 0.01).abs() < 1e-15);
        // k = 2, m = 1: lost if 2 or 3 of 3 are lost: 3 p^2 (1-p) + p^3.
        let p: f64 = 0.2;
        let exact = 3.0 * p * p * (1.0 - p) + p.powi(3);
        assert!((block_failure_probability(2, 1, p) - exact).abs() < 1e-15);
        assert_eq!(block_failure_probability(10, 0, 0.0), 0.0);
        assert_eq!(block_failure_probability(10, 5, 1.0), 1.0);
        assert!(block_failure_probability(200, 100, 0.1).is_nan());

        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        for _ in 0..500 {
            let k = rng.random_range(1..=200);
            let m = rng.random_range(0..=(256 - k).min(64));
            let p = 10f64.powf(rng.random_range(-5.0..-0.5));
            let fast = block_failure_probability(k, m, p);
            let slow = naive_tail(k, m, p);
            let rel = (fast - slow).abs() / slow.max(1e-300);
            assert!(
                rel < 1e-9,
                "k {k} m {m} p {p}: {fast} vs {slow} (seed {seed})"
            );
        }
    }

    #[test]
    fn parity_for_is_the_smallest_that_meets_the_target() {
        let policy = RedundancyPolicy::default();
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut checked = 0;
        for _ in 0..300 {
            let k = rng.random_range(1..=255);
            let p = 10f64.powf(rng.random_range(-4.0..-0.7));
            let m = policy.parity_for(k, p);
            let (lo, hi) = policy.bounds(k);
            assert!((lo..=hi).contains(&m), "k {k} p {p} m {m} (seed {seed})");
            if m < hi {
                assert!(
                    block_failure_probability(k, m, p) <= DEFAULT_TARGET_RESIDUAL,
                    "k {k} p {p} m {m} misses the target (seed {seed})"
                );
            }
            if m > lo {
                assert!(
                    block_failure_probability(k, m - 1, p) > DEFAULT_TARGET_RESIDUAL,
                    "k {k} p {p}: m - 1 = {} already meets the target (seed {seed})",
                    m - 1
                );
                checked += 1;
            }
        }
        assert!(
            checked > 50,
            "too few interior cases to mean anything (seed {seed})"
        );
    }

    #[test]
    fn one_and_ten_percent_need_clearly_different_parity() {
        let policy = RedundancyPolicy::default();
        let at_1 = policy.parity_for(32, 0.01);
        let at_10 = policy.parity_for(32, 0.10);
        // Expected shards lost per 40-shard group: 0.4 vs 4, so the tails differ by many shards.
        assert!(at_10 >= at_1 + 6, "1%: {at_1}, 10%: {at_10}");
        // The figures quoted in the `RedundancyPolicy` docs.
        assert_eq!((at_1, at_10), (4, 13));
        assert!(block_failure_probability(32, at_10, 0.10) <= 1e-4);
        // Loss-free paths get the floor, hopeless ones the cap.
        assert_eq!(policy.parity_for(32, 0.0), 1);
        assert_eq!(policy.parity_for(32, 0.6), 16);
        assert_eq!(policy.parity_for(32, f64::NAN), 16);
        assert_eq!(policy.parity_for(0, 0.1), 0);
        assert_eq!(policy.parity_for(255, 0.1), 1, "k + m may not exceed 256");
    }

    #[test]
    fn more_loss_never_means_less_parity() {
        let policy = RedundancyPolicy::default();
        let mut prev = policy.parity_table(0.0);
        for i in 1..=60 {
            let p = 1e-5 * 1.2f64.powi(i);
            let table = policy.parity_table(p);
            for k in 1..MAX_SHARDS {
                assert!(table.parity(k) >= prev.parity(k), "k {k} at p {p}");
                assert!(k + table.parity(k) <= MAX_SHARDS, "k {k} at p {p}");
            }
            prev = table;
        }
    }

    #[test]
    fn table_matches_parity_for_and_setters_apply() {
        let mut policy = RedundancyPolicy::default();
        policy.target_residual(1e-6).min_parity(2).max_ratio(1.0);
        for p in [0.0, 0.003, 0.05, 0.3] {
            let table = policy.parity_table(p);
            for k in [1, 2, 7, 32, 100, 200, 255] {
                assert_eq!(table.parity(k), policy.parity_for(k, p), "k {k} p {p}");
            }
        }
        assert_eq!(policy.parity_for(32, 0.0), 2);
        // A stricter target costs parity.
        assert!(policy.parity_for(32, 0.05) > RedundancyPolicy::default().parity_for(32, 0.05));
    }

    #[test]
    fn levels_round_up() {
        let policy = RedundancyPolicy::default();
        let levels = ParityLevels::new(&policy);
        assert!(levels.levels.len() < 300);
        for p in [0.0, 1e-7, 0.0123, 0.1, 0.49, 0.7, 1.0, f64::NAN] {
            let l = levels.level_for(p);
            let at = levels.levels[usize::from(l)];
            assert!(at >= sanitize(p), "{p} -> {at}");
            // Never more than one 5% step above.
            assert!(at <= (sanitize(p) * LEVEL_RATIO).max(LEVEL_LOWEST) || at == 1.0);
            assert_eq!(levels.table(l), &policy.parity_table(at));
        }
    }

    #[test]
    fn estimator_margin_shrinks_with_samples_and_tracks_loss() {
        let policy = RedundancyPolicy::default();
        let seed = crate::testing::seed();
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut est = LossEstimator::new(&policy);
        assert!((est.estimate() - DEFAULT_INITIAL_LOSS).abs() < 1e-12);
        let first_margin = est.upper_bound(&policy) - est.estimate();
        // 20 intervals of 800 shards at 5% iid loss.
        for _ in 0..20 {
            let lost = (0..800).filter(|_| rng.random_bool(0.05)).count() as u64;
            est.update(&policy, 800, lost);
        }
        let e = est.estimate();
        assert!((e - 0.05).abs() < 0.015, "estimate {e} (seed {seed})");
        let margin = est.upper_bound(&policy) - e;
        assert!(
            margin > 0.0 && margin < first_margin / 2.0,
            "{margin} vs {first_margin}"
        );
        // A quiet interval (3 shards, 1 lost) barely moves a well-fed estimate...
        let before = est.estimate();
        est.update(&policy, 3, 1);
        assert!((est.estimate() - before).abs() < 0.002);
        // ...and an empty one not at all.
        let before = est;
        est.update(&policy, 0, 0);
        assert_eq!(est, before);
    }
}
