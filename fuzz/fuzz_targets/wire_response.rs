//! `cargo fuzz run wire_response`: see `dealledger::fuzzing::wire_response` for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dealledger::fuzzing::wire_response(data));
