//! quicast: low-latency live media over QUIC datagrams with Reed-Solomon FEC.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod analytics;
pub mod fec;
pub mod net;
pub mod session;
pub mod sim;
pub mod wire;
