//! Retention: moves whole streams from the hot journal to `events_archive`, with their
//! completed effects. The archive keeps every column and CID, so chains, audits, rebuilds and
//! signed checkpoints read it as they read the journal; nothing is ever deleted — the database
//! lets an event leave `events` only in the transaction that copied it, byte for byte, into the
//! archive (`migrations/0007_events_archive.sql`).

use sqlx::PgPool;
use uuid::Uuid;

use super::error::JournalError;

/// What one archiving pass moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Archived {
    /// Streams moved.
    pub streams: u64,
    /// Events moved.
    pub events: u64,
    /// Outbox rows moved with them.
    pub effects: u64,
}

/// Moves `streams` to the archive in one transaction. A stream with an effect still open, or
/// with events some asynchronous projection has not applied yet, is left where it is (it is
/// not ended as far as the ledger's machinery goes). Returns what moved.
pub async fn archive_streams(pool: &PgPool, streams: &[Uuid]) -> Result<Archived, JournalError> {
    if streams.is_empty() {
        return Ok(Archived::default());
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL dealledger.archiving = 'on'").execute(&mut *tx).await?;
    // Lock the candidates' rows so no append or effect completes between the checks and the
    // move, then keep those that are safe to move.
    let movable: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT e.stream_id FROM events e WHERE e.stream_id = ANY($1) \
           AND NOT EXISTS (SELECT 1 FROM outbox o \
                           WHERE o.stream_id = e.stream_id AND o.completed_at IS NULL) \
           AND NOT EXISTS (SELECT 1 FROM events l, projection_checkpoints p \
                           WHERE l.stream_id = e.stream_id \
                             AND (l.tx_id::text::bigint, l.position) > (p.tx_id, p.position))",
    )
    .bind(streams)
    .fetch_all(&mut *tx)
    .await?;
    if movable.is_empty() {
        return Ok(Archived::default());
    }
    let events = sqlx::query(
        "INSERT INTO events_archive (position, stream_id, stream_type, version, event_type, \
           schema_version, payload, recorded_at, correlation_id, causation_id, tx_id, \
           prev_cid, cid) \
         SELECT position, stream_id, stream_type, version, event_type, schema_version, \
           payload, recorded_at, correlation_id, causation_id, tx_id, prev_cid, cid \
         FROM events WHERE stream_id = ANY($1)",
    )
    .bind(&movable)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let effects = sqlx::query(
        "INSERT INTO outbox_archive (id, stream_id, stream_type, version, seq, effect_type, \
           payload, created_at, attempts, completed_at, last_error) \
         SELECT id, stream_id, stream_type, version, seq, effect_type, payload, created_at, \
           attempts, completed_at, last_error \
         FROM outbox WHERE stream_id = ANY($1)",
    )
    .bind(&movable)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query("DELETE FROM outbox WHERE stream_id = ANY($1)")
        .bind(&movable)
        .execute(&mut *tx)
        .await?;
    let deleted = sqlx::query("DELETE FROM events WHERE stream_id = ANY($1)")
        .bind(&movable)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    // Invariant: what left the journal is exactly what entered the archive.
    if deleted != events {
        return Err(JournalError::MalformedRow {
            position: -1,
            reason: format!("archiving moved {events} events but removed {deleted}"),
        });
    }
    tx.commit().await?;
    Ok(Archived { streams: movable.len() as u64, events, effects })
}
