//! The envelope: what the journal stores around every event payload, and the checkpoint that
//! orders the journal for consumers.

use chrono::{DateTime, Utc};
use cid::Cid;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An event about to be appended. The journal assigns the version, the position, the
/// transaction id, the time and the CIDs; the caller says only what happened and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Stable, past-tense, kebab-case name (`deal-published`); never renamed once written.
    pub event_type: String,
    /// Version of the payload's schema, so that readers can upcast old payloads.
    pub schema_version: i16,
    /// The payload, encoded by an [`EventCodec`](super::EventCodec) (postcard).
    pub payload: Vec<u8>,
    /// The operation this event belongs to (one user request, one network exchange).
    pub correlation_id: Option<Uuid>,
    /// The message, event or command that directly caused this event.
    pub causation_id: Option<Uuid>,
}

impl NewEvent {
    /// An event with no correlation or causation recorded.
    pub fn new(event_type: impl Into<String>, schema_version: i16, payload: Vec<u8>) -> Self {
        Self {
            event_type: event_type.into(),
            schema_version,
            payload,
            correlation_id: None,
            causation_id: None,
        }
    }

    /// Records which operation and which message caused this event.
    pub fn caused_by(mut self, correlation_id: Uuid, causation_id: Uuid) -> Self {
        self.correlation_id = Some(correlation_id);
        self.causation_id = Some(causation_id);
        self
    }
}

/// An event as the journal holds it. Everything the hash chain covers is here, so a reader can
/// re-check a stream without going back to the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Global insertion order; unique, but NOT commit order (see [`Checkpoint`]).
    pub position: i64,
    /// The stream (one deal, one retrieval) this event belongs to.
    pub stream_id: Uuid,
    /// The kind of stream (`storage_provider`, `retrieval_client`, ...).
    pub stream_type: String,
    /// 1-based, gapless order inside the stream.
    pub version: u32,
    /// Stable name of the event (`deal-published`).
    pub event_type: String,
    /// Schema version of `payload`.
    pub schema_version: i16,
    /// The encoded payload.
    pub payload: Vec<u8>,
    /// When the writer recorded the event, to the microsecond (PostgreSQL's precision).
    pub recorded_at: DateTime<Utc>,
    /// The operation this event belongs to.
    pub correlation_id: Option<Uuid>,
    /// What directly caused this event.
    pub causation_id: Option<Uuid>,
    /// The 64-bit id of the transaction that wrote the event (`xid8`).
    pub tx_id: u64,
    /// CID of the previous event of the same stream; `None` only for version 1.
    pub prev_cid: Option<Cid>,
    /// CID of this event's canonical bytes (see [`super::chain`]).
    pub cid: Cid,
}

impl RecordedEvent {
    /// Where a consumer that has processed this event resumes.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint { tx_id: self.tx_id, position: self.position }
    }
}

/// A consumer's place in the global, commit-safe order of the journal.
///
/// Events are ordered by the id of the transaction that wrote them and then by position. A
/// reader only ever sees transactions below the oldest transaction still running, so no event
/// can later appear *behind* a checkpoint: that is what makes resuming from it lossless.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Checkpoint {
    /// Transaction id (`xid8`) of the last event processed.
    pub tx_id: u64,
    /// Position of the last event processed.
    pub position: i64,
}

impl Checkpoint {
    /// Before the first event.
    pub const START: Checkpoint = Checkpoint { tx_id: 0, position: 0 };
}
