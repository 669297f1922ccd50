//! PURE per-connection state machines, driven with time passed in.
//!
//! [`Sender`] decides, per viewer, which shards of each block go now, which on
//! request and which have expired; [`Receiver`] turns datagrams into an
//! in-order stream of [`Event`]s within a latency budget and asks for repair
//! when a block is short and time remains. Like quinn-proto's `Connection`, it never reads a clock and
//! never does I/O: feed it with [`Receiver::handle_datagram`] and
//! [`Receiver::handle_timeout`], drain it with [`Receiver::poll_event`], and wake
//! it at [`Receiver::poll_timeout`].

mod rate;
mod receiver;
mod sender;
mod stats;

pub use rate::TokenBucket;
pub use receiver::{Event, Receiver, ReceiverConfig, DEFAULT_REPAIR_DELAY, DEFAULT_STALL_AFTER};
pub use sender::{
    Sender, SenderConfig, SenderStats, DEFAULT_BURST, DEFAULT_MAX_QUEUE, DEFAULT_PACING_GAIN,
    DEFAULT_REPAIR_SPACING, DEFAULT_STARTUP_LOSS,
};
pub use stats::{LatencySummary, ReceiverStats};
