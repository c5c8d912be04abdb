//! Audit: replay a deal's history and prove the journal untampered.
//!
//! - [`timeline`]: one deal, event by event: the transition each made, its effects, its cause,
//!   whether its signed documents verify, and a verdict (chain, legality, projection).
//! - [`verify`]: every stream of the journal, in parallel: hash chain, decoding, legality.
//! - [`checkpoint`]: signed Merkle roots over every stream's head, pinning history.
//! - [`bundle`]: one deal's evidence in a file, checked offline.
//! - [`identity`]: the node's signing key.

pub mod bundle;
pub mod checkpoint;
pub mod identity;
pub mod timeline;
pub mod verify;

use uuid::Uuid;

use crate::events::{CodecError, JournalError};
use crate::projections::ProjectionError;

/// Why an audit could not run (a finding about the journal is a verdict, not an error).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The journal or database failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The status tables could not be read.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// A payload could not be encoded for display.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Nothing matches the deal id or proposal CID given.
    #[error("no deal {0}: not a stream id, nor a proposal CID in storage_deals")]
    NotFound(String),
    /// A verification worker died (a bug): the report would be incomplete, so there is none.
    #[error("a verification worker failed: {0}")]
    Worker(String),
    /// The stream's type is not one of the ledger's machines.
    #[error("stream {stream_id} has unknown type {stream_type}")]
    UnknownStreamType { stream_id: Uuid, stream_type: String },
}

/// The streams `key` names: a stream id, or every side of the deal with that proposal CID.
pub async fn find_streams(pool: &sqlx::PgPool, key: &str) -> Result<Vec<Uuid>, AuditError> {
    if let Ok(id) = key.parse::<Uuid>() {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM journal_events WHERE stream_id = $1)")
                .bind(id)
                .fetch_one(pool)
                .await?;
        return if exists { Ok(vec![id]) } else { Err(AuditError::NotFound(key.to_owned())) };
    }
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT stream_id FROM storage_deals WHERE proposal_cid = $1 ORDER BY side",
    )
    .bind(key)
    .fetch_all(pool)
    .await?;
    if ids.is_empty() { Err(AuditError::NotFound(key.to_owned())) } else { Ok(ids) }
}
