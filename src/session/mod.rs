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
pub use receiver::{
    Event, Receiver, ReceiverConfig, DEFAULT_REPAIR_DELAY, DEFAULT_STALL_AFTER, DEFAULT_SYNC_WAIT,
};
pub use sender::{
    Sender, SenderConfig, SenderStats, DEFAULT_BURST, DEFAULT_MAX_QUEUE, DEFAULT_PACING_GAIN,
    DEFAULT_REPAIR_SPACING, DEFAULT_STARTUP_LOSS,
};
pub use stats::{LatencySummary, ReceiverStats};

/// Widest spacing between the shards of one repair answer.
///
/// A loss burst takes consecutive packets: an answer sent a millisecond a
/// shard, alternating with the stream, loses half a burst's length of its
/// shards to one burst, and a margin sized for independent loss is not
/// enough. Spread over the time the block still has, a few milliseconds a
/// shard, a burst meets at most one or two of them.
pub(crate) const MAX_ANSWER_SPACING: std::time::Duration = std::time::Duration::from_millis(4);
