//! # quicast
//!
//! Low-latency live media over QUIC. A [`Server`] sends media *blocks* to many
//! viewers as unreliable QUIC datagrams (RFC 9221). Each block is Reed-Solomon
//! encoded once into `k` data and `m` parity shards, so a viewer rebuilds a
//! lost packet from parity instead of waiting a round trip for a
//! retransmission. On the same connection a reliable bidirectional stream
//! carries control messages and viewer reports.
//!
//! ## Architecture
//!
//! A sans-IO core with a thin async shell, as in quinn-proto and quinn:
//!
//! | module | role |
//! |---|---|
//! | [`wire`] | PURE byte layouts: the datagram shard header and control messages |
//! | [`fec`] | PURE block ↔ shards codec with deadline eviction |
//! | [`session`] | PURE receiver state machine (time passed in), rate limiter |
//! | [`analytics`] | PURE viewer-event aggregator, QoE, the loss → parity policy, Prometheus text |
//! | [`config`] | [`ServerConfig`], [`ClientConfig`], FEC and decoder settings |
//! | [`net`] | THIN SHELL: quinn endpoints, TLS, control framing, [`Server`] (with [`Server::metrics_text`] for the app to serve), [`Client`] |
//! | [`sim`] | in-process loss, delay, jitter and bandwidth models below QUIC |
//!
//! The pure modules never touch tokio, quinn or a clock, and are tested with a
//! clock the test moves. Nothing is spawned behind the caller's back:
//! [`Server::run`] is a future that owns every connection task, and a
//! [`Subscription`] does its work while it is polled.
//!
//! ## Quick start
//!
//! ```no_run
//! use std::time::Duration;
//! use quicast::{Client, ClientConfig, Event, Identity, Server, ServerConfig};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Server: a dev certificate is generated into certs/ on first use.
//! let mut config = ServerConfig::new(Identity::DevCertificate { dir: "certs".into() });
//! config.listen("127.0.0.1:4433".parse()?);
//! let server = Server::bind(config)?;
//! let mut live = server.publish("live", None)?;
//! tokio::spawn(server.run());
//! tokio::spawn(async move {
//!     for i in 0u64.. {
//!         live.send(bytes::Bytes::from(vec![i as u8; 10_000]), i % 50 == 0).unwrap();
//!         tokio::time::sleep(Duration::from_millis(10)).await;
//!     }
//! });
//!
//! // Viewer: trusts the dev certificate explicitly; verification stays on.
//! let mut config = ClientConfig::new("127.0.0.1:4433".parse()?, "live");
//! config.load_roots(&quicast::net::tls::dev_cert_path("certs".as_ref()))?;
//! config.latency(Duration::from_millis(100));
//! let mut viewer = Client::connect(config).await?;
//! while let Some(event) = viewer.next().await {
//!     match event? {
//!         Event::Block { seq, data, .. } => println!("block {seq}: {} bytes", data.len()),
//!         Event::Lost { seq } => println!("block {seq} lost"),
//!         Event::End => break,
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! ## Feature flags
//!
//! None yet: Reed-Solomon always uses `reed-solomon-erasure`'s `simd-accel`.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod analytics;
pub mod config;
mod error;
pub mod fec;
pub mod net;
pub mod session;
pub mod sim;
pub mod wire;

pub use config::{ClientConfig, CongestionControl, Identity, Parity, ServerConfig};
pub use error::{ClientError, CloseCode, ServerError, TlsError};
pub use net::{Client, Publisher, Server, ServerStats, Subscription};
pub use session::{Event, ReceiverStats};

// The README's Rust blocks (the Library example) compiled as doc tests, so
// the code a user pastes is the code that builds.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
pub(crate) mod testing {
    /// Seed for a randomized test: `QUICAST_SEED` when set (to replay a failure),
    /// else fresh from the clock. Tests put it in every assertion message.
    pub(crate) fn seed() -> u64 {
        let seed = pick();
        // Captured by the test harness and shown only when the test fails.
        println!("seed {seed} (replay with QUICAST_SEED={seed})");
        seed
    }

    fn pick() -> u64 {
        if let Some(seed) = std::env::var("QUICAST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return seed;
        }
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }
}
