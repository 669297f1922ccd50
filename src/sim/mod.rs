//! In-process network impairment below QUIC, for tests, benches and examples.
//!
//! This kernel has no `tc netem`, so quicast simulates a lossy path itself: a
//! [`LossySocket`] wraps the UDP socket a quinn endpoint runs on and drops, delays, jitters and
//! rate-limits datagrams in each direction. Because it sits below QUIC, quinn's loss detection,
//! retransmission, RTT estimate and congestion controller react as they would on a real path,
//! and the FEC layer sees the same losses a viewer on that path would.
//!
//! The behaviour of one direction is a pure, seeded state machine, [`Link`], configured by a
//! [`LinkConfig`] and a [`LossModel`] (independent or Gilbert-Elliott bursty loss). It reads no
//! clock, so it is unit-tested with made-up instants, and the same seed and packet sequence
//! give the same verdicts.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::{sync::Arc, time::Duration};
//! use quicast::sim::{self, Impairment, LinkConfig, LossModel};
//!
//! let mut link = LinkConfig::default();
//! link.loss(LossModel::gilbert_elliott(0.05, 4.0)?)
//!     .delay(Duration::from_millis(20));
//! let socket = sim::bind("127.0.0.1:0".parse()?, Impairment::symmetric(link, 42))?;
//! let endpoint = quinn::Endpoint::new_with_abstract_socket(
//!     quinn::EndpointConfig::default(),
//!     None,
//!     socket.clone(),
//!     Arc::new(quinn::TokioRuntime),
//! )?;
//! // ... connect, run traffic, then:
//! println!("{:?}", socket.stats());
//! # drop(endpoint);
//! # Ok(())
//! # }
//! ```
//!
//! This module is a test tool: it copies every delayed datagram and is not meant for
//! production traffic.

mod model;
mod socket;

pub use model::{DropReason, Link, LinkConfig, LinkStats, LossModel, ModelError, Verdict};
pub use socket::{bind, Impairment, LossySocket, SimStats};
