//! Integration tests: loopback only, every loop bounded in count and time.

mod analytics;
mod examples;
mod props;
mod transport;
mod util;
