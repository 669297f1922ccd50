//! sim
mod model;
mod socket;

pub use model::{DropReason, Link, LinkConfig, LinkStats, LossModel, ModelError, Verdict};
pub use socket::{bind, Impairment, LossySocket, SimStats};
