//! Viewer analytics and the FEC decision loop.
//!
//! The server's per-connection control task turns each viewer control message into an
//! [`Input`] and runs reports through that viewer's [`Validator`] before enqueuing them.

mod event;
mod validate;

pub use event::{Input, InputKind, LogRecord};
pub use validate::{
    Rejected, Validator, MAX_BITRATE_BPS, MAX_BUFFER_MS, MAX_LATENCY_US, MAX_STARTUP_MS,
};
