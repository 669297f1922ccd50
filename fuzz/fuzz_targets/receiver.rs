//! Fuzz target: the receiver state machine, driven by a script.
//!
//! The property is `tests/it/props/receiver.rs`, shared with the seeded test under
//! `cargo test`; see its `check` for what is asserted.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/it/props/receiver.rs"]
mod receiver;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = receiver::check(data) {
        panic!("{violation}");
    }
});
