//! The one seam through which payloads become bytes: postcard, with a schema version per event
//! so that old payloads can be upcast instead of breaking readers.

use serde::{Serialize, de::DeserializeOwned};

use super::envelope::{NewEvent, RecordedEvent};
use super::error::CodecError;

/// A domain event type that can live in the journal.
///
/// postcard encodes enum variants by position, so an implementing enum only ever gains
/// variants at the end; a variant is never reordered or removed.
pub trait JournalEvent: Serialize + DeserializeOwned {
    /// The schema version new events are written with.
    const SCHEMA_VERSION: i16;

    /// The event's stable kebab-case name, stored beside the payload so that SQL users can read
    /// the journal without decoding it.
    fn event_type(&self) -> &'static str;

    /// Decodes a payload written with an older schema version. The default knows only the
    /// current one; a type whose schema changes overrides this to convert old layouts.
    fn upcast(event_type: &str, schema_version: i16, _payload: &[u8]) -> Result<Self, CodecError> {
        Err(CodecError::UnknownSchemaVersion {
            event_type: event_type.to_owned(),
            found: schema_version,
            supported: Self::SCHEMA_VERSION,
        })
    }
}

/// Encodes and decodes journal payloads. Every layer goes through here, so changing the
/// format or adding an upcast is done once.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventCodec;

impl EventCodec {
    /// Encodes a domain event into an appendable [`NewEvent`].
    pub fn encode<E: JournalEvent>(event: &E) -> Result<NewEvent, CodecError> {
        let payload = postcard::to_stdvec(event).map_err(CodecError::Encode)?;
        Ok(NewEvent::new(event.event_type(), E::SCHEMA_VERSION, payload))
    }

    /// Decodes a recorded event, upcasting payloads written with an older schema.
    pub fn decode<E: JournalEvent>(event: &RecordedEvent) -> Result<E, CodecError> {
        Self::decode_parts(&event.event_type, event.schema_version, &event.payload)
    }

    /// Decodes a payload given its type name and schema version.
    pub fn decode_parts<E: JournalEvent>(
        event_type: &str,
        schema_version: i16,
        payload: &[u8],
    ) -> Result<E, CodecError> {
        if schema_version != E::SCHEMA_VERSION {
            return E::upcast(event_type, schema_version, payload);
        }
        postcard::from_bytes(payload).map_err(|source| CodecError::Decode {
            event_type: event_type.to_owned(),
            schema_version,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    /// How a payment event was stored before amounts became u128 and gained a memo.
    #[derive(Serialize, Deserialize)]
    enum PaymentEventV1 {
        Paid { amount: u64 },
    }

    /// The current layout.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum PaymentEvent {
        Paid { amount: u128, memo: String },
    }

    impl JournalEvent for PaymentEvent {
        const SCHEMA_VERSION: i16 = 2;

        fn event_type(&self) -> &'static str {
            "paid"
        }

        fn upcast(
            event_type: &str,
            schema_version: i16,
            payload: &[u8],
        ) -> Result<Self, CodecError> {
            match schema_version {
                1 => {
                    let old: PaymentEventV1 =
                        postcard::from_bytes(payload).map_err(|source| CodecError::Decode {
                            event_type: event_type.to_owned(),
                            schema_version,
                            source,
                        })?;
                    let PaymentEventV1::Paid { amount } = old;
                    Ok(PaymentEvent::Paid { amount: u128::from(amount), memo: String::new() })
                }
                found => Err(CodecError::UnknownSchemaVersion {
                    event_type: event_type.to_owned(),
                    found,
                    supported: Self::SCHEMA_VERSION,
                }),
            }
        }
    }

    #[test]
    fn an_old_payload_is_upcast_on_read() {
        let stored = postcard::to_stdvec(&PaymentEventV1::Paid { amount: 42 }).unwrap();
        let read: PaymentEvent = EventCodec::decode_parts("paid", 1, &stored).unwrap();
        assert_eq!(read, PaymentEvent::Paid { amount: 42, memo: String::new() });
    }

    #[test]
    fn a_current_payload_round_trips_and_an_unknown_schema_is_refused() {
        let event = PaymentEvent::Paid { amount: u128::MAX, memo: "x".into() };
        let new = EventCodec::encode(&event).unwrap();
        assert_eq!((new.event_type.as_str(), new.schema_version), ("paid", 2));
        let back: PaymentEvent = EventCodec::decode_parts("paid", 2, &new.payload).unwrap();
        assert_eq!(back, event);
        let future = EventCodec::decode_parts::<PaymentEvent>("paid", 3, &new.payload);
        assert!(matches!(future, Err(CodecError::UnknownSchemaVersion { found: 3, .. })));
        let garbage = EventCodec::decode_parts::<PaymentEvent>("paid", 2, &[0xff, 0xff]);
        assert!(matches!(garbage, Err(CodecError::Decode { .. })));
    }
}
