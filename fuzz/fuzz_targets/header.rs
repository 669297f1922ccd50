//! Fuzz target: the datagram header decoders.
//!
//! The property is `tests/it/props/header.rs`, shared with the seeded test under
//! `cargo test`; see its `check` for what is asserted.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/it/props/header.rs"]
mod header;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = header::check(data) {
        panic!("{violation}");
    }
});
