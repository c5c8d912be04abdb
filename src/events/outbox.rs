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

/// Claims up to `limit` due effects of the given types for `lease`: effects nobody holds (or
/// whose holder's lease ran out — a crashed runner), oldest first. Concurrent runners never
/// claim the same effect (`FOR UPDATE SKIP LOCKED`). Each claim counts as an attempt.
pub async fn claim(
    pool: &PgPool,
    effect_types: &[&str],
    lease: std::time::Duration,
    limit: i64,
) -> Result<Vec<PendingEffect>, JournalError> {
    Ok(sqlx::query_as(
        "UPDATE outbox o SET claimed_until = now() + $2 * interval '1 millisecond', \
                             attempts = o.attempts + 1 \
         WHERE o.id IN ( \
             SELECT id FROM outbox \
             WHERE completed_at IS NULL AND available_at <= now() \
               AND (claimed_until IS NULL OR claimed_until < now()) \
               AND effect_type = ANY($1) \
             ORDER BY available_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) \
         RETURNING o.id, o.stream_id, o.stream_type, o.version, o.seq, o.effect_type, \
                   o.payload, o.attempts",
    )
    .bind(effect_types)
    .bind(lease.as_millis() as f64)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Marks a claimed effect done inside the caller's transaction (the one recording the
/// command its result became), so the result and the completion commit together.
pub async fn complete_in_tx(
    tx: &mut Transaction<'_, Postgres>,
    id: i64,
    note: Option<&str>,
) -> Result<(), JournalError> {
    sqlx::query(
        "UPDATE outbox SET completed_at = now(), claimed_until = NULL, last_error = $2 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(note)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Marks a claimed effect done on its own (an effect whose result needs no command).
pub async fn complete(pool: &PgPool, id: i64, note: Option<&str>) -> Result<(), JournalError> {
    let mut tx = pool.begin().await?;
    complete_in_tx(&mut tx, id, note).await?;
    tx.commit().await?;
    Ok(())
}

/// Gives a claimed effect back to be tried again after `delay`. A failed attempt keeps its
/// count and records its error; a wait (`error` = None: the chain has nothing new yet) does
/// not count as an attempt and clears the error (the effect was performed, it just waits).
pub async fn release<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    id: i64,
    delay: std::time::Duration,
    error: Option<&str>,
) -> Result<(), JournalError> {
    sqlx::query(
        "UPDATE outbox SET claimed_until = NULL, \
                available_at = now() + $2 * interval '1 millisecond', \
                attempts = CASE WHEN $3::text IS NULL THEN attempts - 1 ELSE attempts END, \
                last_error = $3 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(delay.as_millis() as f64)
    .bind(error)
    .execute(executor)
    .await?;
    Ok(())
}

/// Makes waiting effects of the given types due now (the chain moved: what they wait for may
/// have happened). Effects backing off after a failure keep their backoff. Rows another
/// transaction holds (being claimed or settled) are skipped rather than waited for, so that
/// wakes running at once — several runners, a head change during a recovery — never deadlock.
pub async fn wake(pool: &PgPool, effect_types: &[&str]) -> Result<u64, JournalError> {
    Ok(sqlx::query(
        "UPDATE outbox SET available_at = now() \
         WHERE id IN (SELECT id FROM outbox \
             WHERE completed_at IS NULL AND available_at > now() AND effect_type = ANY($1) \
               AND claimed_until IS NULL AND last_error IS NULL \
             FOR UPDATE SKIP LOCKED)",
    )
    .bind(effect_types)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Effects of one event still not completed, other than `except`.
pub async fn open_siblings(
    pool: &PgPool,
    stream_id: Uuid,
    version: i32,
    except: i64,
) -> Result<i64, JournalError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM outbox \
         WHERE stream_id = $1 AND version = $2 AND id <> $3 AND completed_at IS NULL",
    )
    .bind(stream_id)
    .bind(version)
    .bind(except)
    .fetch_one(pool)
    .await?)
}
