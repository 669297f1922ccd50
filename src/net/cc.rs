//! A floor under the congestion window, for live media.
//!
//! Measured with `benches/loss.rs` (8 Mbit/s, 20 ms one-way, no loss): quinn's
//! BBR leaves STARTUP after three rounds without bandwidth growth, which a
//! constant-rate media stream causes by itself because its datagrams are not
//! reported as app-limited. DRAIN then cut the window from 140 KB to 25 KB,
//! below the path's 44 KB bandwidth-delay product, for about 250 ms: blocks 8
//! to 21 queued at the sender and missed a 30 ms budget. With the window held at
//! or above a floor, the same run delivers every block on time.
//!
//! That floor now follows the stream: about twice the stream's bytes in flight
//! over one round trip, plus one block, instead of a constant 256 KiB that
//! held the window open up to about 100 Mbit/s at 20 ms RTT per viewer, so
//! that congestion control never acted below that. Only the server's
//! connections get a floor; a viewer sends control traffic only.

use std::{
    any::Any,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// Floor before the stream's rate is known: 64 KiB, about 26 Mbit/s at 20 ms
/// RTT. Enough for a typical live stream's first blocks while the rate is
/// unknown, without holding a high-bandwidth window open on every viewer.
pub(crate) const INITIAL_FLOOR: u64 = 64 * 1024;

/// Bytes in flight the floor allows, in round trips of the stream's rate.
/// One is the stream's bandwidth-delay product; the second covers acks that
/// come late (delayed acks, jitter) so the floor itself does not throttle.
const RTT_FACTOR: u128 = 2;

/// The RTT the floor uses is the smoothed RTT, but at most this many times
/// the minimum RTT: see [`RateFloor`].
const MAX_RTT_INFLATION: u32 = 2;

/// Largest rate-based floor, whatever rate is set: 64 MiB.
const MAX_RATE_FLOOR: u64 = 64 << 20;

/// The congestion window floor of one connection (or of every connection of
/// an endpoint), sized from the rate of the stream it carries.
///
/// With a rate `r` (media bytes/s, parity included) and a block size `b`, the
/// floor is `2 × r × min(srtt, 2 × min_rtt) + b`, and never below
/// `min_window`; before a rate is set it is `max(INITIAL_FLOOR, min_window)`.
///
/// # Why it cannot hold up a path that cannot carry the stream
///
/// A floor stops the controller from throttling the stream below its own
/// rate; it must not stop it from backing off a path that cannot carry the
/// stream. The RTT in the floor is capped at twice the minimum RTT, so the
/// floor is a fixed window once a queue builds, and a fixed window carries
/// `window / RTT`: as the queue the stream causes grows the RTT past about
/// four minimum RTTs, the floor carries less than the stream, and the
/// controller's own backing off decides again. With the smoothed RTT alone
/// the floor would grow with the very queue it causes. `min_window` is the
/// exception by design: an absolute lower bound the operator chose (default 0),
/// applied even above the stream's needs.
///
/// # Wiring
///
/// The controllers of every connection built with this floor read it on
/// every ack, so [`set_rate`](Self::set_rate) takes effect within a round
/// trip. The publisher should call it as it publishes: at least once per
/// second, with the media bytes per second it sends one viewer (data and
/// parity) and its largest recent block in bytes. A server that carries
/// streams of different rates should give each connection its own floor
/// (`quinn::Incoming::accept_with` a transport config holding a fresh
/// `RateFloor`) and set it to the stream's rate after Hello; one floor shared
/// by the whole endpoint must be set to the highest stream rate.
#[derive(Debug)]
pub(crate) struct RateFloor {
    /// Media bytes per second; 0 while unknown.
    rate: AtomicU64,
    /// Bytes of one block.
    block: AtomicU64,
    min_window: u64,
    initial: u64,
}

impl RateFloor {
    /// A floor following the rate set later, never below `min_window`.
    pub(crate) fn new(min_window: u64) -> Self {
        RateFloor {
            rate: AtomicU64::new(0),
            block: AtomicU64::new(0),
            min_window,
            initial: INITIAL_FLOOR.max(min_window),
        }
    }

    /// A constant floor of `window` bytes (0: none), for endpoints that
    /// carry no quicast stream of a known rate.
    pub(crate) fn fixed(window: u64) -> Self {
        RateFloor {
            rate: AtomicU64::new(0),
            block: AtomicU64::new(0),
            min_window: window,
            initial: window,
        }
    }

    /// The stream now sends `bytes_per_sec` media bytes per second (data and
    /// parity shards, headers included) in blocks of up to `block_bytes`.
    /// 0 forgets the rate: the initial floor applies again.
    pub(crate) fn set_rate(&self, bytes_per_sec: u64, block_bytes: u64) {
        // Two independent stores: a controller reading between them sizes one
        // floor with the old block, which is harmless.
        self.block.store(block_bytes, Ordering::Relaxed);
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// The window the controller starts with, before any RTT sample.
    pub(crate) fn initial(&self) -> u64 {
        self.initial
    }

    /// The floor for the current rate at smoothed RTT `srtt` and minimum RTT
    /// `min_rtt`.
    pub(crate) fn floor(&self, srtt: Duration, min_rtt: Duration) -> u64 {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return self.initial;
        }
        floor_for(
            rate,
            self.block.load(Ordering::Relaxed),
            srtt,
            min_rtt,
            self.min_window,
        )
    }
}

/// `2 × rate × min(srtt, 2 × min_rtt) + block`, at most [`MAX_RATE_FLOOR`],
/// at least `min_window`. PURE.
pub(crate) fn floor_for(
    rate: u64,
    block: u64,
    srtt: Duration,
    min_rtt: Duration,
    min_window: u64,
) -> u64 {
    let rtt = srtt.min(min_rtt.saturating_mul(MAX_RTT_INFLATION));
    let in_flight = u128::from(rate)
        .saturating_mul(rtt.as_micros())
        .saturating_mul(RTT_FACTOR)
        / 1_000_000;
    let floor = (in_flight + u128::from(block)).min(u128::from(MAX_RATE_FLOOR)) as u64;
    floor.max(min_window)
}

/// Wraps a controller so that its window starts at, and never falls below,
/// the floor of a [`RateFloor`].
#[derive(Debug, Clone)]
pub(crate) struct FlooredFactory<F> {
    pub(crate) inner: Arc<F>,
    pub(crate) floor: Arc<RateFloor>,
}

impl<F: ControllerFactory + Send + Sync + 'static> ControllerFactory for FlooredFactory<F> {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Floored {
            inner: self.inner.clone().build(now, current_mtu),
            shared: self.floor.clone(),
            floor: self.floor.initial(),
        })
    }
}

struct Floored {
    inner: Box<dyn Controller>,
    shared: Arc<RateFloor>,
    /// The floor as of the last ack, when the RTT was last known.
    floor: u64,
}

impl Controller for Floored {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number)
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.floor = self.shared.floor(rtt.get(), rtt.min());
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }
    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked)
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        self.inner.window().max(self.floor)
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Floored {
            inner: self.inner.clone_box(),
            shared: self.shared.clone(),
            floor: self.floor,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window().max(self.shared.initial())
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn floor_is_two_round_trips_of_the_rate_plus_a_block() {
        // 8 Mbit/s, 40 ms RTT, 27 KB blocks: 2 × 1 MB/s × 40 ms + 27 KB.
        assert_eq!(floor_for(1_000_000, 27_000, 40 * MS, 40 * MS, 0), 107_000);
        // A thousandth of that rate: little more than a block.
        assert_eq!(floor_for(1_000, 27_000, 40 * MS, 40 * MS, 0), 27_080);
        // Far below the old constant 256 KiB at 100 Mbit/s and 20 ms.
        assert_eq!(floor_for(12_500_000, 0, 20 * MS, 20 * MS, 0), 500_000);
    }

    #[test]
    fn a_queue_does_not_raise_the_floor_beyond_twice_the_minimum_rtt() {
        let base = floor_for(1_000_000, 0, 40 * MS, 40 * MS, 0);
        // Some queueing: followed.
        assert_eq!(floor_for(1_000_000, 0, 60 * MS, 40 * MS, 0), base * 3 / 2);
        // A queue of a second: the floor stops at twice the minimum RTT, so a
        // fixed window of 160 KB carries 160 KB/s over the 1.04 s RTT,
        // a sixth of the stream, and the controller's backing off decides.
        let queued = floor_for(1_000_000, 0, 1040 * MS, 40 * MS, 0);
        assert_eq!(queued, 2 * base);
        assert!(queued as f64 / 1.04 < 1_000_000.0 / 4.0);
    }

    #[test]
    fn min_window_is_an_absolute_lower_bound_and_the_rate_floor_is_capped() {
        assert_eq!(floor_for(1_000, 0, 20 * MS, 20 * MS, 300_000), 300_000);
        assert_eq!(
            floor_for(u64::MAX, u64::MAX, 20 * MS, 20 * MS, 0),
            MAX_RATE_FLOOR
        );
        assert_eq!(
            floor_for(u64::MAX, 0, Duration::MAX, Duration::MAX, 0),
            MAX_RATE_FLOOR
        );
    }

    #[test]
    fn the_shared_rate_takes_effect_and_can_be_forgotten() {
        let floor = RateFloor::new(0);
        // Before any rate: the modest initial floor.
        assert_eq!(floor.initial(), INITIAL_FLOOR);
        assert_eq!(floor.floor(40 * MS, 40 * MS), INITIAL_FLOOR);
        floor.set_rate(1_000_000, 27_000);
        assert_eq!(floor.floor(40 * MS, 40 * MS), 107_000);
        floor.set_rate(0, 0);
        assert_eq!(floor.floor(40 * MS, 40 * MS), INITIAL_FLOOR);
        // A larger min_window raises the initial floor too.
        assert_eq!(RateFloor::new(1 << 20).initial(), 1 << 20);
        // A fixed floor never moves; zero is no floor.
        let fixed = RateFloor::fixed(0);
        assert_eq!((fixed.initial(), fixed.floor(40 * MS, 40 * MS)), (0, 0));
    }
}
