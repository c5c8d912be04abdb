//! The journal layer: event envelopes, the postcard codec, the hash chain and the append-only
//! PostgreSQL journal. Nothing outside this module writes to the `events` table.
//!
//! - [`envelope`]: [`NewEvent`], [`RecordedEvent`] and the commit-safe [`Checkpoint`].
//! - [`codec`]: [`EventCodec`], the one place payloads become bytes, with schema versions.
//! - [`chain`]: canonical bytes, CIDs and the stream hash chain check.
//! - [`journal`]: [`Journal`]: append with expected version, read, verify.
//! - [`group`]: group commit: appends under load share one statement.
//! - [`subscribe`]: [`Journal::subscribe`], catch-up then follow.
//! - [`outbox`]: effects enqueued in the same transaction as their events.
//! - [`archive`]: retention: whole streams moved to `events_archive`, never deleted.

pub mod archive;
pub(crate) mod binary_copy;
pub mod chain;
pub mod codec;
pub mod envelope;
pub mod error;
pub mod group;
mod group_sql;
pub mod journal;
mod notifier;
pub mod outbox;
pub mod subscribe;

pub use chain::{ChainBreak, FirstBadVersion};
pub use codec::{EventCodec, JournalEvent};
pub use envelope::{Checkpoint, NewEvent, RecordedEvent};
pub use error::{CodecError, JournalError};
pub use group::{SharedRows, SharedWrite};
pub use journal::{AppendStatement, Appended, Companions, Journal, StreamHead, StreamVerification};
