//! PURE per-connection state machines, driven with time passed in.
//!
//! [`Receiver`] turns datagrams into an in-order stream of [`Event`]s within a
//! latency budget. Like quinn-proto's `Connection`, it never reads a clock and
//! never does I/O: feed it with [`Receiver::handle_datagram`] and
//! [`Receiver::handle_timeout`], drain it with [`Receiver::poll_event`], and wake
//! it at [`Receiver::poll_timeout`].

mod rate;
mod receiver;
mod stats;

pub use rate::TokenBucket;
pub use receiver::{Event, Receiver, ReceiverConfig, DEFAULT_STALL_AFTER};
pub use stats::{LatencySummary, ReceiverStats};
