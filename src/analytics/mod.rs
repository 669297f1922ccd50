//! Viewer analytics and the FEC decision loop.
//!
//! The server's per-connection control task turns each viewer control message into an
//! [`Input`] and runs reports through that viewer's [`Validator`] before enqueuing them.
//! A [`RedundancyPolicy`] turns a viewer's measured loss into a [`ParityTable`].

mod event;
mod policy;
mod validate;

pub use event::{Input, InputKind, LogRecord};
pub use policy::{
    block_failure_probability, LossEstimator, ParityTable, RedundancyPolicy, DEFAULT_CONFIDENCE_Z,
    DEFAULT_EWMA_WEIGHT, DEFAULT_INITIAL_LOSS, DEFAULT_MAX_RATIO, DEFAULT_MIN_PARITY,
    DEFAULT_TARGET_RESIDUAL,
};
pub use validate::{
    Rejected, Validator, MAX_BITRATE_BPS, MAX_BUFFER_MS, MAX_LATENCY_US, MAX_STARTUP_MS,
};
