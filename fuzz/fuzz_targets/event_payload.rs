//! `cargo fuzz run event_payload`: see `dealledger::fuzzing::event_payload` for what must hold.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dealledger::fuzzing::event_payload(data));
