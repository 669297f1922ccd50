//! quicast: low-latency live media over QUIC datagrams with Reed-Solomon FEC.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod analytics;
pub mod fec;
pub mod net;
pub mod session;
pub mod sim;
pub mod wire;

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
