//! Errors of the journal layer.

use uuid::Uuid;

/// What can go wrong when writing or reading the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Someone else appended to the stream first (or the caller's view was stale). Nothing was
    /// written. Callers reload the stream, decide again, and retry a bounded number of times.
    #[error(
        "stream {stream_id} is at version {actual}, but the append expected version {expected}"
    )]
    Conflict { stream_id: Uuid, expected: u32, actual: u32 },
    /// The stream exists with another type. Nothing was written; this is a caller bug (two kinds
    /// of aggregate sharing one id) and is not retried.
    #[error("stream {stream_id} is a {actual} stream, not a {requested} stream")]
    StreamTypeMismatch { stream_id: Uuid, requested: String, actual: String },
    /// An append with no events. Nothing was written; an empty append is a caller bug.
    #[error("an append must carry at least one event")]
    EmptyAppend,
    /// A stored row cannot be turned back into an event (corrupt CID bytes, negative version).
    /// The journal is damaged there: run `verify` and audit the stream.
    #[error("stored event at position {position} is malformed: {reason}")]
    MalformedRow { position: i64, reason: String },
    /// The database failed or could not be reached; the operation may be retried.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema migrations could not be applied; the database needs an operator.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Why an event payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes are not a valid postcard encoding of the expected type.
    #[error("cannot decode {event_type} (schema {schema_version}): {source}")]
    Decode {
        event_type: String,
        schema_version: i16,
        #[source]
        source: postcard::Error,
    },
    /// The value could not be encoded (a type the format does not support).
    #[error("cannot encode event: {0}")]
    Encode(#[source] postcard::Error),
    /// The payload was written with a schema this build does not know how to read or upcast.
    #[error("{event_type} has schema version {found}; this build reads up to {supported}")]
    UnknownSchemaVersion { event_type: String, found: i16, supported: i16 },
}
