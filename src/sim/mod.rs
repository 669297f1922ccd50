//! sim
mod model;

pub use model::{DropReason, Link, LinkConfig, LinkStats, LossModel, ModelError, Verdict};
