//! Projections: the SQL status tables users query, folded from the journal. Nothing else
//! writes them.
//!
//! - [`inline`]: `storage_deals`, `retrieval_deals`, `retrieval_requests`, written in the same
//!   transaction as the events (read-your-writes).
//! - [`projector`]: asynchronous projections that follow the journal with a checkpoint
//!   (`deal_transitions`).
//! - [`rebuild`]: rebuild and check from scratch, swapped in atomically.
//! - [`updates`]: a stream of deal state changes for embedders (the seed's `RegisterListener`).
//! - [`rows`], [`table`], [`fold`]: the row of each machine's deal, the tables' columns and the
//!   run-time dispatch over machines.

mod binary;
pub mod fold;
pub mod inline;
pub mod projector;
pub mod rebuild;
pub mod rows;
mod swap;
pub mod table;
pub mod updates;

use uuid::Uuid;

use crate::events::{CodecError, JournalError};
use crate::fsm::TransitionError;

/// Why a projection could not be written, rebuilt or followed.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The database failed; the operation may be retried.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The journal could not be read.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A stored payload does not decode: the journal needs an audit.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// A stored event is not a legal transition: the journal needs an audit.
    #[error("stream {stream_id} version {version} does not replay: {source}")]
    Transition {
        stream_id: Uuid,
        version: u32,
        #[source]
        source: TransitionError,
    },
    /// A stream of a type no machine handles.
    #[error("stream {stream_id} has unknown type {stream_type}")]
    UnknownStreamType { stream_id: Uuid, stream_type: String },
    /// A projected state name no machine declares (a projection written by another version).
    #[error("stream {stream_id} is in unknown state {state}")]
    UnknownState { stream_id: Uuid, state: String },
    /// A row value not in its column's canonical text form (a bug in the row's code, not in
    /// the journal): nothing was written.
    #[error("column {column}: {value:?} is {reason}")]
    BadColumnValue { column: String, value: String, reason: String },
    /// The thread building a rebuild's rows failed (panicked or was cancelled): nothing was
    /// written.
    #[error("building the rows failed: {0}")]
    RowBuilder(String),
    /// A status table's index whose definition a rebuild cannot rebuild on a new table (the
    /// catalog printed it in an unexpected form): nothing was swapped.
    #[error("cannot rebuild index: {0}")]
    UnclonableIndex(String),
    /// The server's snapshot text was not the `xmin:xmax:xip,...` it always is.
    #[error("unexpected snapshot text {0:?}")]
    UnexpectedSnapshot(String),
    /// No projection of that name.
    #[error(
        "no projection named {0}; the projections are storage_deals, retrieval_deals, retrieval_requests, deal_transitions"
    )]
    UnknownProjection(String),
}

impl ProjectionError {
    /// Whether the database failed (and trying again later may succeed), as opposed to an
    /// error in the data that needs an operator.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Database(_) | Self::Journal(JournalError::Database(_)))
    }
}
