//! Fuzz target: the control frame decoder, fed as a stream reader would.
//!
//! The property is `tests/it/props/control.rs`, shared with the seeded test under
//! `cargo test`; see its `check` for what is asserted.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/it/props/control.rs"]
mod control;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = control::check(data) {
        panic!("{violation}");
    }
});
