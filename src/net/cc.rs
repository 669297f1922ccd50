//! A floor under the congestion window, for live media.
//!
//! Measured with `benches/loss.rs` (8 Mbit/s, 20 ms one-way, no loss): quinn's
//! BBR leaves STARTUP after three rounds without bandwidth growth, which a
//! constant-rate media stream causes by itself because its datagrams are not
//! reported as app-limited. DRAIN then cut the window from 140 KB to 25 KB,
//! below the path's 44 KB bandwidth-delay product, for about 250 ms: blocks 8
//! to 21 queued at the sender and missed a 30 ms budget. With the window held at
//! or above a floor, the same run delivers every block on time.

use std::{any::Any, sync::Arc, time::Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// Wraps a controller so that its window starts at, and never falls below, `floor`.
#[derive(Debug, Clone)]
pub(crate) struct FlooredFactory<F> {
    pub(crate) inner: Arc<F>,
    pub(crate) floor: u64,
}

impl<F: ControllerFactory + Send + Sync + 'static> ControllerFactory for FlooredFactory<F> {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(Floored {
            inner: self.inner.clone().build(now, current_mtu),
            floor: self.floor,
        })
    }
}

struct Floored {
    inner: Box<dyn Controller>,
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
            floor: self.floor,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window().max(self.floor)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
