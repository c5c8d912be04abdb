//! `cargo fuzz run wire_request`: see `dealledger::fuzzing::wire_request` for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dealledger::fuzzing::wire_request(data));
