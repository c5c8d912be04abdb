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
