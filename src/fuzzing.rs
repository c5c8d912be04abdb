//! Fuzz targets: every decoder that takes bytes from outside — the wire messages peers send,
//! the event payloads the journal stores (a database others can write to), and audit bundles
//! (files handed between operators). Invariant for each target: no input makes it panic, and
//! an input that decodes re-encodes to bytes that decode to the same encoding (the decoders
//! accept nothing the encoders could not have written back). Allocation stays bounded: the
//! driver in `tests/fuzz.rs` checks the largest single allocation per input.
//!
//! Two drivers run them: `cargo test --test fuzz` (CI: seeded mutations of valid inputs, for
//! a bounded number of rounds) and cargo-fuzz under `fuzz/` (coverage guided, by hand).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::adapters::network::codec::{decode, encode};
use crate::adapters::network::message::{MarketRequest, MarketResponse};
use crate::audit::bundle::DealBundle;
use crate::events::{EventCodec, JournalEvent};
use crate::fsm::retrieval_client::RetrievalClientEvent;
use crate::fsm::retrieval_provider::RetrievalProviderEvent;
use crate::fsm::retrieval_request::RetrievalRequestEvent;
use crate::fsm::storage_client::StorageClientEvent;
use crate::fsm::storage_provider::StorageProviderEvent;

/// A fuzz target: takes any bytes; panics only on a broken invariant.
pub type Target = fn(&[u8]);

/// The targets by name, as `cargo fuzz run <name>` and the CI driver know them.
pub const TARGETS: &[(&str, Target)] = &[
    ("wire_request", wire_request),
    ("wire_response", wire_response),
    ("event_payload", event_payload),
    ("bundle", bundle),
];

/// A message body as a peer sends it on any market protocol (requests).
pub fn wire_request(data: &[u8]) {
    wire::<MarketRequest>(data);
}

/// A message body as a peer answers it (responses).
pub fn wire_response(data: &[u8]) {
    wire::<MarketResponse>(data);
}

fn wire<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let Ok(message) = decode::<T>(data) else { return };
    let framed = encode(&message, u32::MAX).expect("a decoded message encodes");
    let again: T = decode(&framed[4..]).expect("a re-encoded message decodes");
    assert_eq!(again, message, "a message changed through encode and decode");
}

/// An event payload under every machine's event type, at the current schema version.
pub fn event_payload(data: &[u8]) {
    payload::<StorageClientEvent>(data);
    payload::<StorageProviderEvent>(data);
    payload::<RetrievalClientEvent>(data);
    payload::<RetrievalProviderEvent>(data);
    payload::<RetrievalRequestEvent>(data);
}

fn payload<E: JournalEvent>(data: &[u8]) {
    let decoded = EventCodec::decode_parts::<E>("fuzzed", E::SCHEMA_VERSION, data);
    let Ok(event) = decoded else { return };
    let encoded = EventCodec::encode(&event).expect("a decoded event encodes");
    let again = EventCodec::decode_parts::<E>("fuzzed", E::SCHEMA_VERSION, &encoded.payload)
        .expect("a re-encoded event decodes");
    let twice = EventCodec::encode(&again).expect("encodes");
    assert_eq!(twice.payload, encoded.payload, "an event changed through encode and decode");
}

/// An audit bundle file: read, and when it reads, checked offline (the check must judge any
/// bundle, however crafted, without panicking) and written back unchanged.
pub fn bundle(data: &[u8]) {
    let Ok(bundle) = DealBundle::from_bytes(data) else { return };
    let _ = bundle.verify();
    let bytes = bundle.to_bytes().expect("a read bundle writes");
    let again = DealBundle::from_bytes(&bytes).expect("a written bundle reads");
    assert_eq!(again, bundle, "a bundle changed through write and read");
}
