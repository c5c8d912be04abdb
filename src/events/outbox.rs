//! The outbox: effects waiting to be performed, enqueued in the transaction that appends the
//! events causing them. The effect runner claims and completes them; this module only writes
//! and lists them, and knows nothing of what an effect means.

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::error::JournalError;

/// One effect to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEffect {
    /// Version of the event that caused the effect.
    pub version: u32,
    /// Stable kebab-case name (`publish-deal`).
    pub effect_type: &'static str,
    /// The effect, postcard-encoded.
    pub payload: Vec<u8>,
}

/// An effect as the outbox holds it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct PendingEffect {
    /// The outbox row.
    pub id: i64,
    /// The stream whose event caused the effect.
    pub stream_id: Uuid,
    /// The stream's type.
    pub stream_type: String,
    /// The causing event's version.
    pub version: i32,
    /// Order among that event's effects.
    pub seq: i16,
    /// The effect's name.
    pub effect_type: String,
    /// The encoded effect.
    pub payload: Vec<u8>,
    /// Attempts so far.
    pub attempts: i32,
}

/// Enqueues effects inside the caller's transaction (the one appending their events).
pub async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    stream_id: Uuid,
    stream_type: &str,
    effects: &[NewEffect],
) -> Result<(), JournalError> {
    if effects.is_empty() {
        return Ok(());
    }
    let mut seq_of_version = std::collections::HashMap::<u32, i16>::new();
    let mut versions = Vec::with_capacity(effects.len());
    let mut seqs = Vec::with_capacity(effects.len());
    for effect in effects {
        let seq = seq_of_version.entry(effect.version).or_default();
        versions.push(effect.version as i32);
        seqs.push(*seq);
        *seq += 1;
    }
    let types: Vec<&str> = effects.iter().map(|e| e.effect_type).collect();
    let payloads: Vec<&[u8]> = effects.iter().map(|e| e.payload.as_slice()).collect();
    sqlx::query(
        "INSERT INTO outbox (stream_id, stream_type, version, seq, effect_type, payload) \
         SELECT $1, $2, e.version, e.seq, e.effect_type, e.payload \
         FROM UNNEST($3::int[], $4::smallint[], $5::text[], $6::bytea[]) \
              AS e(version, seq, effect_type, payload)",
    )
    .bind(stream_id)
    .bind(stream_type)
    .bind(versions)
    .bind(seqs)
    .bind(types)
    .bind(payloads)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Effects not yet completed, oldest first; for one stream when `stream_id` is given.
pub async fn pending(
    pool: &PgPool,
    stream_id: Option<Uuid>,
    limit: i64,
) -> Result<Vec<PendingEffect>, JournalError> {
    Ok(sqlx::query_as(
        "SELECT id, stream_id, stream_type, version, seq, effect_type, payload, attempts \
         FROM outbox WHERE completed_at IS NULL AND ($1::uuid IS NULL OR stream_id = $1) \
         ORDER BY id LIMIT $2",
    )
    .bind(stream_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
