//! The hash chain: every event carries the CID of its canonical bytes, and those bytes include
//! the CID of the stream's previous event, so altering, dropping, reordering or moving any event
//! changes every CID after it.

use chrono::{DateTime, Utc};
use cid::Cid;
use multihash::Multihash;
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::envelope::RecordedEvent;

/// Multicodec of the bytes a CID points at: raw bytes (the canonical encoding below).
pub const RAW_CODEC: u64 = 0x55;
/// Multihash code of sha2-256.
pub const SHA2_256: u64 = 0x12;

/// What the CID of an event covers: every field a writer chose or the stream implies. The
/// position and the transaction id are left out because the database assigns them after the
/// CID is computed; the stream's order is covered by `version` and `prev_cid` instead.
///
/// The encoding is postcard of this struct, field by field in this order. Changing it changes
/// every CID: it is part of the journal's format and only ever extended by a new chain version.
#[derive(Serialize)]
pub struct CanonicalEvent<'a> {
    /// Format of these bytes; 1 is the layout below.
    pub chain_version: u8,
    pub stream_id: Uuid,
    pub stream_type: &'a str,
    pub version: u32,
    pub event_type: &'a str,
    pub schema_version: i16,
    pub payload: &'a [u8],
    /// Microseconds since the Unix epoch (the precision PostgreSQL keeps).
    pub recorded_at_micros: i64,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    /// Bytes of the previous event's CID, empty for the first event.
    pub prev_cid: Vec<u8>,
}

impl CanonicalEvent<'_> {
    /// The CIDv1 (raw, sha2-256) of these canonical bytes.
    pub fn cid(&self) -> Cid {
        let bytes = postcard::to_stdvec(self)
            .expect("postcard encoding of plain fields into a Vec cannot fail");
        cid_of_bytes(&bytes)
    }
}

/// CIDv1 of arbitrary bytes with the raw codec and sha2-256.
pub fn cid_of_bytes(bytes: &[u8]) -> Cid {
    let digest = Sha256::digest(bytes);
    let hash = Multihash::<64>::wrap(SHA2_256, digest.as_slice())
        .expect("a 32-byte digest fits a 64-byte multihash");
    Cid::new_v1(RAW_CODEC, hash)
}

/// Truncates a time to the microsecond, the precision PostgreSQL stores, so that the CID the
/// writer computes equals the CID a reader recomputes from the stored row.
pub fn to_stored_precision(time: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(time.timestamp_micros()).unwrap_or(time)
}

/// Recomputes the CID a recorded event should carry, from its fields and its stored `prev_cid`.
pub fn expected_cid(event: &RecordedEvent) -> Cid {
    CanonicalEvent {
        chain_version: 1,
        stream_id: event.stream_id,
        stream_type: &event.stream_type,
        version: event.version,
        event_type: &event.event_type,
        schema_version: event.schema_version,
        payload: &event.payload,
        recorded_at_micros: event.recorded_at.timestamp_micros(),
        correlation_id: event.correlation_id,
        causation_id: event.causation_id,
        prev_cid: event.prev_cid.map(|c| c.to_bytes()).unwrap_or_default(),
    }
    .cid()
}

/// Why a stream's chain is broken at a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChainBreak {
    /// The event's content no longer hashes to its CID: a field was altered.
    ContentAltered { stored: String, recomputed: String },
    /// The event does not point at the event before it: one was dropped, reordered, inserted
    /// or moved from another stream.
    BrokenLink { expected_prev: Option<String>, stored_prev: Option<String> },
    /// Versions are not 1, 2, 3, ...: an event was dropped or a version forged.
    VersionGap { expected: u32, found: u32 },
}

/// The first place where a stream's chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirstBadVersion {
    /// The version (as stored) at which the chain first fails.
    pub version: u32,
    /// What is wrong there.
    pub reason: ChainBreak,
}

/// Walks a stream's events in version order and returns the first break, if any.
///
/// Invariant checked: versions are 1..=n without gaps, each event hashes to its stored CID, and
/// each event's `prev_cid` is the stored CID of the event before it (none for the first).
pub fn first_break(events: &[RecordedEvent]) -> Option<FirstBadVersion> {
    let mut prev: Option<Cid> = None;
    for (index, event) in events.iter().enumerate() {
        let expected_version = index as u32 + 1;
        let fail = |reason| Some(FirstBadVersion { version: event.version, reason });
        if event.version != expected_version {
            return fail(ChainBreak::VersionGap {
                expected: expected_version,
                found: event.version,
            });
        }
        if event.prev_cid != prev {
            return fail(ChainBreak::BrokenLink {
                expected_prev: prev.map(|c| c.to_string()),
                stored_prev: event.prev_cid.map(|c| c.to_string()),
            });
        }
        let recomputed = expected_cid(event);
        if recomputed != event.cid {
            return fail(ChainBreak::ContentAltered {
                stored: event.cid.to_string(),
                recomputed: recomputed.to_string(),
            });
        }
        prev = Some(event.cid);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_event() -> impl Strategy<Value = RecordedEvent> {
        (
            (any::<i64>(), any::<u128>(), "[a-z_]{1,20}", 1u32..1_000_000, "[a-z-]{1,30}"),
            (any::<i16>(), proptest::collection::vec(any::<u8>(), 0..200)),
            (-62_135_596_800_000_000i64..253_402_300_799_000_000, any::<Option<u128>>()),
            (any::<Option<u128>>(), any::<u64>(), any::<Option<[u8; 8]>>()),
        )
            .prop_map(|(head, body, time, tail)| {
                let (position, stream, stream_type, version, event_type) = head;
                let (schema_version, payload) = body;
                let (micros, correlation) = time;
                let (causation, tx_id, prev_seed) = tail;
                let mut event = RecordedEvent {
                    position,
                    stream_id: Uuid::from_u128(stream),
                    stream_type,
                    version,
                    event_type,
                    schema_version,
                    payload,
                    recorded_at: DateTime::from_timestamp_micros(micros).expect("in range"),
                    correlation_id: correlation.map(Uuid::from_u128),
                    causation_id: causation.map(Uuid::from_u128),
                    tx_id,
                    prev_cid: prev_seed.map(|seed| cid_of_bytes(&seed)),
                    cid: cid_of_bytes(b""),
                };
                event.cid = expected_cid(&event);
                event
            })
    }

    proptest! {
        #[test]
        fn envelope_round_trips_through_postcard(event in arb_event()) {
            let bytes = postcard::to_stdvec(&event).unwrap();
            let back: RecordedEvent = postcard::from_bytes(&bytes).unwrap();
            prop_assert_eq!(back, event);
        }

        #[test]
        fn changing_any_covered_field_changes_the_cid(event in arb_event(), field in 0usize..10) {
            let mut changed = event.clone();
            match field {
                0 => changed.stream_id = Uuid::from_u128(changed.stream_id.as_u128() ^ 1),
                1 => changed.stream_type.push('x'),
                2 => changed.version ^= 1,
                3 => changed.event_type.push('x'),
                4 => changed.schema_version ^= 1,
                5 => changed.payload.push(0),
                6 => changed.recorded_at += chrono::Duration::microseconds(1),
                7 => changed.correlation_id = match changed.correlation_id {
                    Some(_) => None,
                    None => Some(Uuid::nil()),
                },
                8 => changed.causation_id = match changed.causation_id {
                    Some(_) => None,
                    None => Some(Uuid::nil()),
                },
                _ => changed.prev_cid = match changed.prev_cid {
                    Some(_) => None,
                    None => Some(cid_of_bytes(b"prev")),
                },
            }
            prop_assert_ne!(expected_cid(&changed), event.cid);
        }

        #[test]
        fn position_and_tx_id_are_outside_the_hash(event in arb_event(), p in any::<i64>(), t in any::<u64>()) {
            let moved = RecordedEvent { position: p, tx_id: t, ..event.clone() };
            prop_assert_eq!(expected_cid(&moved), event.cid);
        }
    }

    #[test]
    fn first_break_accepts_a_well_linked_stream_and_names_a_gap() {
        let make = |version, prev: Option<Cid>| {
            let mut e = RecordedEvent {
                position: version as i64,
                stream_id: Uuid::nil(),
                stream_type: "s".into(),
                version,
                event_type: "e".into(),
                schema_version: 1,
                payload: vec![],
                recorded_at: DateTime::from_timestamp_micros(0).expect("epoch"),
                correlation_id: None,
                causation_id: None,
                tx_id: 1,
                prev_cid: prev,
                cid: cid_of_bytes(b""),
            };
            e.cid = expected_cid(&e);
            e
        };
        let one = make(1, None);
        let two = make(2, Some(one.cid));
        let three = make(3, Some(two.cid));
        assert_eq!(first_break(&[one.clone(), two.clone(), three.clone()]), None);
        let gap = first_break(&[one, three]).expect("a gap");
        assert_eq!(gap.reason, ChainBreak::VersionGap { expected: 2, found: 3 });
    }
}
