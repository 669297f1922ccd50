//! The pure link model: loss, delay, jitter and a rate-limited drop-tail queue.
//!
//! Nothing here reads a clock, spawns or touches a socket. The caller passes `now` to
//! [`Link::offer`] and gets a [`Verdict`] back, so the same packet sequence offered at the same
//! instants with the same seed always gets the same verdicts.

use std::time::{Duration, Instant};

use rand::{rngs::SmallRng, Rng, SeedableRng};

/// Default bottleneck queue size when a bandwidth cap is set, in bytes.
const DEFAULT_QUEUE_LIMIT: usize = 64 * 1024;

/// An invalid [`LossModel`] parameter.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A loss probability was not within `0.0..=1.0` (or was NaN).
    #[error("loss probability {0} is outside [0, 1]")]
    Probability(f64),
    /// A mean burst length was below one packet or not finite.
    #[error("mean burst length {0} must be a finite number of packets >= 1")]
    BurstLength(f64),
    /// The average loss cannot be produced with bursts this short.
    ///
    /// Between two bursts there is at least one delivered packet, so the average loss is at
    /// most `burst / (1 + burst)`.
    #[error("average loss {loss} is unreachable with mean burst {burst} (needs loss <= burst / (1 + burst))")]
    Unreachable {
        /// The requested average loss rate.
        loss: f64,
        /// The requested mean burst length, in packets.
        burst: f64,
    },
}

/// How packets are lost on the path, independently of congestion.
///
/// Build one with [`LossModel::iid`] or [`LossModel::gilbert_elliott`], which validate their
/// parameters; the variants' fields are readable but the variants cannot be built by hand.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum LossModel {
    /// No random loss.
    #[default]
    None,
    /// Each packet is lost independently with probability `p`.
    #[non_exhaustive]
    Iid {
        /// Loss probability per packet, in `0.0..=1.0`.
        p: f64,
    },
    /// A two-state Markov chain: the good state delivers everything, the bad state drops
    /// everything, so losses come in bursts.
    #[non_exhaustive]
    GilbertElliott {
        /// Probability of moving from good to bad after a packet.
        p_gb: f64,
        /// Probability of moving from bad to good after a packet.
        p_bg: f64,
    },
}

impl LossModel {
    /// Independent loss with probability `p` per packet.
    pub fn iid(p: f64) -> Result<Self, ModelError> {
        if !(0.0..=1.0).contains(&p) {
            return Err(ModelError::Probability(p));
        }
        Ok(Self::Iid { p })
    }

    /// Bursty loss with the given long-run average `loss` rate and `mean_burst` length in
    /// packets.
    ///
    /// Each packet in the bad state is dropped, so a burst is one stay in the bad state, whose
    /// length is geometric with mean `1 / p_bg`. The stationary share of the bad state is
    /// `p_gb / (p_gb + p_bg)`, which is the average loss. Solving both:
    ///
    /// ```text
    /// p_bg = 1 / mean_burst
    /// p_gb = loss * p_bg / (1 - loss)
    /// ```
    ///
    /// `p_gb` must stay a probability, hence `loss <= mean_burst / (1 + mean_burst)`.
    pub fn gilbert_elliott(loss: f64, mean_burst: f64) -> Result<Self, ModelError> {
        if !(0.0..=1.0).contains(&loss) {
            return Err(ModelError::Probability(loss));
        }
        if !mean_burst.is_finite() || mean_burst < 1.0 {
            return Err(ModelError::BurstLength(mean_burst));
        }
        if loss > mean_burst / (1.0 + mean_burst) {
            return Err(ModelError::Unreachable {
                loss,
                burst: mean_burst,
            });
        }
        let p_bg = 1.0 / mean_burst;
        let p_gb = (loss * p_bg / (1.0 - loss)).min(1.0);
        Ok(Self::GilbertElliott { p_gb, p_bg })
    }

    /// The long-run fraction of packets this model drops.
    pub fn average_loss(&self) -> f64 {
        match *self {
            Self::None => 0.0,
            Self::Iid { p } => p,
            Self::GilbertElliott { p_gb, p_bg } => p_gb / (p_gb + p_bg),
        }
    }
}

/// Configuration of one direction of a simulated path.
///
/// The default is a perfect link: no loss, no delay, no jitter, unlimited bandwidth.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    loss: LossModel,
    delay: Duration,
    jitter: Duration,
    bandwidth: Option<u64>,
    queue_limit: usize,
}

impl LinkConfig {
    /// Random loss on the path, applied after the bottleneck queue.
    ///
    /// Defaults to [`LossModel::None`]. A randomly lost packet has still used its share of the
    /// bandwidth, as on a lossy radio hop behind a rate-limited link. This loss is what FEC is
    /// for; quinn's loss-based congestion controllers also read it as congestion.
    pub fn loss(&mut self, model: LossModel) -> &mut Self {
        self.loss = model;
        self
    }

    /// Fixed one-way propagation delay added to every delivered packet.
    ///
    /// Defaults to zero. Adds directly to the RTT that quinn measures.
    pub fn delay(&mut self, delay: Duration) -> &mut Self {
        self.delay = delay;
        self
    }

    /// Extra per-packet delay drawn uniformly from `0..=jitter`.
    ///
    /// Defaults to zero. Each packet draws its own extra delay, so a packet can overtake the one
    /// sent before it: jitter larger than the packet spacing reorders packets, which QUIC
    /// tolerates but which trips quinn's packet-threshold loss detection when the reordering is
    /// deeper than three packets.
    pub fn jitter(&mut self, jitter: Duration) -> &mut Self {
        self.jitter = jitter;
        self
    }

    /// Bottleneck rate in bits per second; `None` means unlimited.
    ///
    /// Defaults to `None`. With a cap, packets are serialized one after another at this rate
    /// through a drop-tail queue of [`queue_limit`](Self::queue_limit) bytes, so sending faster
    /// than the rate first builds delay and then drops, which is the signal congestion control
    /// reacts to. `Some(0)` is treated as unlimited.
    pub fn bandwidth(&mut self, bits_per_second: Option<u64>) -> &mut Self {
        self.bandwidth = bits_per_second.filter(|&rate| rate > 0);
        self
    }

    /// Size of the bottleneck queue in bytes; only used with a [`bandwidth`](Self::bandwidth)
    /// cap.
    ///
    /// Defaults to 64 KiB (65 ms at 8 Mbit/s). A packet that would take the queued bytes past
    /// this limit is dropped. A larger queue absorbs bursts but adds queueing delay
    /// (bufferbloat); a smaller one keeps delay low but drops bursts that pacing would have
    /// smoothed.
    pub fn queue_limit(&mut self, bytes: usize) -> &mut Self {
        self.queue_limit = bytes;
        self
    }
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            loss: LossModel::None,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            bandwidth: None,
            queue_limit: DEFAULT_QUEUE_LIMIT,
        }
    }
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// Random loss from the [`LossModel`].
    Loss,
    /// The bottleneck queue (or, in a socket, the delay line) was full.
    Queue,
}

/// What the link does with one offered packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The packet never arrives.
    Drop(DropReason),
    /// The packet arrives at this instant.
    Deliver(Instant),
}

/// Packet and byte counters of a link or of one direction of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct LinkStats {
    /// Packets offered to the link.
    pub offered: u64,
    /// Bytes offered to the link.
    pub bytes_offered: u64,
    /// Packets dropped by the loss model.
    pub dropped_loss: u64,
    /// Packets dropped because a queue was full.
    pub dropped_queue: u64,
    /// Packets delivered (for a [`Link`]: given a [`Verdict::Deliver`]).
    pub delivered: u64,
    /// Bytes delivered.
    pub bytes_delivered: u64,
}

/// One direction of a simulated path: a deterministic state machine driven by [`Link::offer`].
#[derive(Debug)]
pub struct Link {
    config: LinkConfig,
    rng: SmallRng,
    /// Gilbert-Elliott state; unused by the other models.
    bad: bool,
    /// When the bottleneck finishes serializing everything accepted so far.
    busy_until: Option<Instant>,
    stats: LinkStats,
}

impl Link {
    /// Changes the link's behaviour from now on, keeping its random stream,
    /// counters and queue: a test can cut the path and restore it mid-run.
    pub fn reconfigure(&mut self, config: LinkConfig) {
        if !matches!(config.loss, LossModel::GilbertElliott { .. }) {
            self.bad = false;
        }
        self.config = config;
    }

    /// A link with the given behaviour whose random choices all come from `seed`.
    pub fn new(config: LinkConfig, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        // Start in the chain's stationary distribution so short runs see the average loss
        // instead of a loss-free warm-up.
        let bad = match config.loss {
            LossModel::GilbertElliott { p_gb, p_bg } => rng.random::<f64>() < p_gb / (p_gb + p_bg),
            _ => false,
        };
        Self {
            config,
            rng,
            bad,
            busy_until: None,
            stats: LinkStats::default(),
        }
    }

    /// Decide the fate of a `len`-byte packet handed to the link at `now`.
    ///
    /// Call once per packet, with non-decreasing `now`. The bottleneck queue is checked
    /// first, then the loss model, then delay and jitter are added.
    #[must_use]
    pub fn offer(&mut self, now: Instant, len: usize) -> Verdict {
        let bytes = len as u64;
        self.stats.offered += 1;
        self.stats.bytes_offered += bytes;

        let mut at = now;
        if let Some(rate) = self.config.bandwidth {
            let start = self.busy_until.map_or(now, |busy| busy.max(now));
            let backlog = backlog_bytes(start.saturating_duration_since(now), rate);
            if backlog.saturating_add(bytes) > self.config.queue_limit as u64 {
                self.stats.dropped_queue += 1;
                return Verdict::Drop(DropReason::Queue);
            }
            at = start + transmission_time(len, rate);
            self.busy_until = Some(at);
        }

        if self.lose() {
            self.stats.dropped_loss += 1;
            return Verdict::Drop(DropReason::Loss);
        }

        at += self.config.delay;
        if !self.config.jitter.is_zero() {
            let max = u64::try_from(self.config.jitter.as_nanos()).unwrap_or(u64::MAX);
            at += Duration::from_nanos(self.rng.random_range(0..=max));
        }
        self.stats.delivered += 1;
        self.stats.bytes_delivered += bytes;
        Verdict::Deliver(at)
    }

    /// Counters since the link was created.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// The configuration this link runs with.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// One step of the loss model.
    fn lose(&mut self) -> bool {
        match self.config.loss {
            LossModel::None => false,
            // `random::<f64>()` is in [0, 1), so p = 0 never drops and p = 1 always does.
            LossModel::Iid { p } => self.rng.random::<f64>() < p,
            LossModel::GilbertElliott { p_gb, p_bg } => {
                let lost = self.bad;
                let flip = if self.bad { p_bg } else { p_gb };
                if self.rng.random::<f64>() < flip {
                    self.bad = !self.bad;
                }
                lost
            }
        }
    }
}

/// Time to serialize `len` bytes at `rate` bits per second, rounded down to the nanosecond.
fn transmission_time(len: usize, rate: u64) -> Duration {
    let nanos = len as u128 * 8 * 1_000_000_000 / u128::from(rate);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Bytes still to serialize when the bottleneck is busy for `busy` more at `rate` bits/s.
fn backlog_bytes(busy: Duration, rate: u64) -> u64 {
    let bytes = busy.as_nanos() * u128::from(rate) / (8 * 1_000_000_000);
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKETS: usize = 200_000;
    const SEED: u64 = 0x5eed_0001;

    fn link(configure: impl FnOnce(&mut LinkConfig), seed: u64) -> Link {
        let mut config = LinkConfig::default();
        configure(&mut config);
        Link::new(config, seed)
    }

    /// Offers `PACKETS` packets 1 ms apart and returns which were dropped.
    fn drops(link: &mut Link) -> Vec<bool> {
        let start = Instant::now();
        (0..PACKETS)
            .map(|i| {
                let now = start + Duration::from_millis(i as u64);
                matches!(link.offer(now, 1200), Verdict::Drop(_))
            })
            .collect()
    }

    fn mean_burst(drops: &[bool]) -> f64 {
        let mut bursts = 0u64;
        let mut previous = false;
        for &dropped in drops {
            if dropped && !previous {
                bursts += 1;
            }
            previous = dropped;
        }
        let dropped = drops.iter().filter(|&&d| d).count();
        dropped as f64 / bursts.max(1) as f64
    }

    #[test]
    fn constructors_reject_bad_parameters() {
        assert_eq!(LossModel::iid(1.5), Err(ModelError::Probability(1.5)));
        assert!(matches!(
            LossModel::iid(f64::NAN),
            Err(ModelError::Probability(_))
        ));
        assert_eq!(
            LossModel::gilbert_elliott(0.05, 0.5),
            Err(ModelError::BurstLength(0.5))
        );
        assert!(matches!(
            LossModel::gilbert_elliott(0.6, 1.0),
            Err(ModelError::Unreachable { .. })
        ));
        assert!(LossModel::gilbert_elliott(0.5, 1.0).is_ok());
        assert!(LossModel::iid(0.0).is_ok() && LossModel::iid(1.0).is_ok());
    }

    #[test]
    fn iid_loss_rate_matches_p() {
        let p = 0.05;
        let mut link = link(
            |c| {
                c.loss(LossModel::iid(p).unwrap());
            },
            SEED,
        );
        let dropped = drops(&mut link).iter().filter(|&&d| d).count();
        let rate = dropped as f64 / PACKETS as f64;
        assert!((rate - p).abs() < 0.005, "seed {SEED:#x}: iid loss {rate}");
        assert_eq!(link.stats().dropped_loss, dropped as u64);
        assert_eq!(link.stats().delivered, (PACKETS - dropped) as u64);
        assert_eq!(link.stats().offered, PACKETS as u64);
    }

    #[test]
    fn gilbert_elliott_matches_rate_and_burst() {
        let (loss, burst) = (0.05, 4.0);
        let model = LossModel::gilbert_elliott(loss, burst).unwrap();
        assert!((model.average_loss() - loss).abs() < 1e-12);
        let mut link = link(
            |c| {
                c.loss(model);
            },
            SEED,
        );
        let drops = drops(&mut link);
        let rate = drops.iter().filter(|&&d| d).count() as f64 / PACKETS as f64;
        let measured_burst = mean_burst(&drops);
        assert!(
            (rate - loss).abs() < 0.005,
            "seed {SEED:#x}: GE loss {rate}"
        );
        assert!(
            (measured_burst - burst).abs() < 0.4,
            "seed {SEED:#x}: GE mean burst {measured_burst}"
        );
        // iid loss at the same rate has bursts of about 1 / (1 - p) ~ 1.05: the model must differ.
        let mut iid = self::link(
            |c| {
                c.loss(LossModel::iid(loss).unwrap());
            },
            SEED,
        );
        let iid_burst = mean_burst(&self::drops(&mut iid));
        assert!(
            iid_burst < 1.2,
            "seed {SEED:#x}: iid mean burst {iid_burst}"
        );
    }

    #[test]
    fn delay_shifts_delivery_exactly() {
        let delay = Duration::from_millis(30);
        let mut link = link(
            |c| {
                c.delay(delay);
            },
            SEED,
        );
        let start = Instant::now();
        for i in 0..100 {
            let now = start + Duration::from_micros(i * 137);
            assert_eq!(link.offer(now, 1200), Verdict::Deliver(now + delay));
        }
    }

    #[test]
    fn jitter_stays_in_bounds_and_reorders() {
        let (delay, jitter) = (Duration::from_millis(10), Duration::from_millis(5));
        let mut link = link(
            |c| {
                c.delay(delay).jitter(jitter);
            },
            SEED,
        );
        let start = Instant::now();
        let mut last = start;
        let mut reordered = 0;
        let mut max_extra = Duration::ZERO;
        for i in 0..10_000 {
            let now = start + Duration::from_millis(i);
            let Verdict::Deliver(at) = link.offer(now, 1200) else {
                panic!("seed {SEED:#x}: a jitter-only link dropped packet {i}");
            };
            let extra = at - now - delay;
            assert!(
                at >= now + delay && extra <= jitter,
                "seed {SEED:#x}: {extra:?}"
            );
            max_extra = max_extra.max(extra);
            if at < last {
                reordered += 1;
            }
            last = last.max(at);
        }
        assert!(
            reordered > 100,
            "seed {SEED:#x}: only {reordered} reordered"
        );
        assert!(max_extra > jitter * 9 / 10, "seed {SEED:#x}: {max_extra:?}");
    }

    #[test]
    fn bandwidth_spaces_deliveries() {
        // 1000 bytes at 8 Mbit/s is exactly 1 ms on the wire.
        let mut link = link(
            |c| {
                c.bandwidth(Some(8_000_000));
            },
            SEED,
        );
        let start = Instant::now();
        // Offered as one burst that fits the default 64 KiB queue.
        for i in 0..50 {
            assert_eq!(
                link.offer(start, 1000),
                Verdict::Deliver(start + Duration::from_millis(i + 1))
            );
        }
        // After the queue drained, a packet only pays its own transmission time.
        let later = start + Duration::from_secs(1);
        assert_eq!(
            link.offer(later, 500),
            Verdict::Deliver(later + Duration::from_micros(500))
        );
    }

    #[test]
    fn queue_overflows_when_offered_above_rate() {
        // 1 Mbit/s takes 1200 bytes every 9.6 ms; offer them every 4.8 ms (twice the rate).
        let mut link = link(
            |c| {
                c.bandwidth(Some(1_000_000)).queue_limit(12_000);
            },
            SEED,
        );
        let start = Instant::now();
        let mut verdicts = Vec::new();
        for i in 0..1000 {
            verdicts.push(link.offer(start + Duration::from_micros(i * 4800), 1200));
        }
        let queue_drops = verdicts
            .iter()
            .filter(|v| **v == Verdict::Drop(DropReason::Queue))
            .count();
        // Half the packets fit the rate; the queue holds 10 packets more.
        assert!(
            (490..=500).contains(&queue_drops),
            "{queue_drops} queue drops"
        );
        assert_eq!(link.stats().dropped_queue, queue_drops as u64);
        // The first ten packets find room; the queue never holds more than its limit, so no
        // delivery is later than limit / rate after being offered.
        assert!(verdicts[..10]
            .iter()
            .all(|v| matches!(v, Verdict::Deliver(_))));
        for (i, verdict) in verdicts.iter().enumerate() {
            if let Verdict::Deliver(at) = verdict {
                let offered = start + Duration::from_micros(i as u64 * 4800);
                assert!(*at - offered <= Duration::from_micros(96_000));
            }
        }
    }

    #[test]
    fn same_seed_same_verdicts_different_seed_differs() {
        let configure = |c: &mut LinkConfig| {
            c.loss(LossModel::gilbert_elliott(0.1, 3.0).unwrap())
                .delay(Duration::from_millis(5))
                .jitter(Duration::from_millis(2));
        };
        let start = Instant::now();
        let run = |seed| {
            let mut link = link(configure, seed);
            (0..5000)
                .map(|i| link.offer(start + Duration::from_micros(i * 250), 1200))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(SEED), run(SEED), "seed {SEED:#x} is not deterministic");
        assert_ne!(run(SEED), run(SEED + 1), "seeds {SEED:#x} and +1 agree");
    }
}
