//! Integration tests: loopback only, every loop bounded in count and time.

mod analytics;
mod examples;
mod faults;
mod transport;
mod util;
