//! `cargo fuzz run bundle`: see `dealledger::fuzzing::bundle` for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dealledger::fuzzing::bundle(data));
