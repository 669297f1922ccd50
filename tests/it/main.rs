//! Integration tests: loopback only, every loop bounded in count and time.

mod examples;
mod transport;
mod util;
