//! Viewer analytics and the FEC decision loop.
//!
//! The server's per-connection control task turns each viewer control message into an
//! [`Input`], runs reports through that viewer's [`Validator`], and pushes the result into a
//! bounded queue. One task drains the queue into an [`Aggregator`], which keeps per-stream and
//! overall figures (viewers, watch time, join time, loss before and after FEC, stalls,
//! latency, QoE) in totals and 10 s / 60 s sliding windows, and picks each viewer's FEC parity
//! from its measured loss through a [`RedundancyPolicy`].
//!
//! Everything here is pure: no clock reads, no I/O, no async. Time comes in as an argument,
//! so the tests drive the aggregator with a clock they move, and a JSON-lines log of
//! [`LogRecord`]s replays into the same state. The edges are plain functions:
//! [`Aggregator::snapshot`] returns a serializable [`Snapshot`], [`render`] turns it into
//! Prometheus text, and [`Aggregator::viewer_summary`] gives the [`Summary`] sent back to a
//! viewer.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use quicast::analytics::{Aggregator, AggregatorConfig, Input, InputKind};
//! use quicast::wire::Report;
//!
//! let mut agg = Aggregator::new(AggregatorConfig::default());
//! let t0 = Instant::now();
//! let event = |kind| Input { viewer: 1, stream: "live".into(), kind };
//! agg.apply(&event(InputKind::Join { agent: "demo".into() }), t0);
//! for (i, received) in [(1u64, 95u64), (2, 185)] {
//!     let report = Report { shards_received: received, ..Report::default() };
//!     let kind = InputKind::Report { report, sent_shards: 100 * i };
//!     agg.apply(&event(kind), t0 + Duration::from_secs(i));
//! }
//! // Between the two reports 100 shards were sent and 90 received.
//! let snap = agg.snapshot(t0 + Duration::from_secs(2));
//! assert_eq!(snap.streams["live"].loss_before_fec, 0.1);
//! // The sender looks up the parity for its block size per block.
//! let parity = agg.viewer_parity(1).unwrap().parity(32);
//! assert!(parity > 1);
//! let text = quicast::analytics::render(&snap, &[]);
//! assert!(text.contains("quicast_viewers{stream=\"live\"} 1"));
//! ```
//!
//! [`Summary`]: crate::wire::Summary

mod aggregator;
pub mod deployment;
mod event;
mod metrics;
mod policy;
mod qoe;
mod snapshot;
mod validate;
mod window;

pub use aggregator::{
    Aggregator, AggregatorConfig, DEFAULT_MAX_STREAMS, DEFAULT_MAX_VIEWERS, DEFAULT_REFERENCE_K,
};
pub use deployment::DeploymentAggregator;
pub use event::{Input, InputKind, LogRecord};
pub use metrics::{render, Metric, MetricKind, CONTENT_TYPE};
pub use policy::{
    block_failure_probability, LossEstimator, ParityTable, RedundancyPolicy, RepairPlan,
    DEFAULT_CONFIDENCE_Z, DEFAULT_EWMA_WEIGHT, DEFAULT_INITIAL_LOSS, DEFAULT_MAX_RATIO,
    DEFAULT_MIN_PARITY, DEFAULT_TARGET_RESIDUAL, REPAIR_REQUEST_COPIES,
};
pub use qoe::{QoeInputs, QoeModel, DEFAULT_LATENCY_TARGET, DEFAULT_STARTUP_TARGET};
pub use snapshot::{
    Ignored, JoinBucket, JoinTime, Latency, Parity, Qoe, Snapshot, Spread, StreamSnapshot, Window,
    Windows,
};
pub use validate::{
    Published, Rejected, Validator, MAX_BITRATE_BPS, MAX_BUFFER_MS, MAX_LATENCY_US, MAX_STARTUP_MS,
    STALL_SLACK_MS,
};
