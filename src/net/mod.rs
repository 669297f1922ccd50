//! THIN SHELL: quinn endpoints and connections around the pure core.
//!
//! Only this module touches quinn, tokio and the clock. It moves bytes between
//! quinn and [`fec`](crate::fec) / [`session`](crate::session), and spawns
//! nothing the application cannot stop: the [`Server::run`] future owns every
//! connection task, and a [`Subscription`] does its work while it is polled.

mod admission;
mod analytics;
mod cc;
mod client;
mod control;
pub mod nats;
mod server;
mod signal;
pub mod tls;

pub use client::{Client, Subscription};
pub use nats::{NatsAggregator, NatsAggregatorConfig, NatsAggregatorStats, NatsStats};
pub use server::{Publisher, Server, ServerStats};
pub use signal::{Signal, Signals, Stopped};
