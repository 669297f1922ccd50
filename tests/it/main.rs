//! Integration tests: loopback only, every loop bounded in count and time.

mod analytics;
mod bad_input;
mod examples;
mod faults;
mod impair;
mod nats;
mod procs;
mod props;
mod recovery;
mod transport;
mod util;
