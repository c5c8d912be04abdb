//! The outbox: effects waiting to be performed, enqueued in the statement that appends the
//! events causing them. The effect runner claims and completes them; this module only writes
//! and lists them, and knows nothing of what an effect means.

use sqlx::PgPool;
use uuid::Uuid;

use super::error::JournalError;
use super::group::{SharedRows, SharedWrite};
use super::journal::AppendStatement;

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

/// Adds `effects` to an append's statement: they are enqueued exactly when the events causing
/// them are written.
pub fn enqueue_with(
    statement: &mut AppendStatement,
    stream_id: Uuid,
    stream_type: &str,
    effects: &[NewEffect],
) -> Result<(), JournalError> {
    if effects.is_empty() {
        return Ok(());
    }
    let versions: Vec<i32> = effects.iter().map(|e| e.version as i32).collect();
    let seqs = seqs(effects);
    let types: Vec<&str> = effects.iter().map(|e| e.effect_type).collect();
    let payloads: Vec<&[u8]> = effects.iter().map(|e| e.payload.as_slice()).collect();
    let sql = format!(
        "INSERT INTO outbox ({columns}) \
         SELECT {stream_id}::uuid, {stream_type}::text, e.version, e.seq, e.effect_type, e.payload \
         FROM UNNEST({versions}::int[], {seqs}::smallint[], {types}::text[], {payloads}::bytea[]) \
              AS e(version, seq, effect_type, payload) \
         WHERE {appended}",
        stream_id = statement.bind(stream_id)?,
        stream_type = statement.bind(stream_type)?,
        versions = statement.bind(versions)?,
        seqs = statement.bind(seqs)?,
        types = statement.bind(types)?,
        payloads = statement.bind(payloads)?,
        appended = AppendStatement::APPENDED,
        columns = OUTBOX_COLUMNS.join(", "),
    );
    statement.write(sql);
    Ok(())
}

/// Each effect's order among the effects of its event (`seq`): 0, 1, ... per version.
fn seqs(effects: &[NewEffect]) -> Vec<i16> {
    let mut seq_of_version = std::collections::HashMap::<u32, i16>::new();
    effects
        .iter()
        .map(|effect| {
            let seq = seq_of_version.entry(effect.version).or_default();
            *seq += 1;
            *seq - 1
        })
        .collect()
}

/// The outbox as a write that grouped appends share (see [`super::group`]).
#[derive(Debug)]
struct OutboxWrite;

/// The columns an enqueue writes, in the order both forms of it list their values.
const OUTBOX_COLUMNS: [&str; 6] =
    ["stream_id", "stream_type", "version", "seq", "effect_type", "payload"];

impl SharedWrite for OutboxWrite {
    fn name(&self) -> &'static str {
        "outbox"
    }

    fn columns(&self) -> Vec<&'static str> {
        OUTBOX_COLUMNS.to_vec()
    }

    fn ctes(&self, rows: &str, prefix: &str) -> String {
        format!(
            "{prefix}enqueued AS (INSERT INTO outbox ({columns}) \
             SELECT r.stream_id::uuid, r.stream_type, r.version::int, r.seq::smallint, \
                    r.effect_type, r.payload::bytea FROM {rows} r)",
            columns = OUTBOX_COLUMNS.join(", "),
        )
    }
}

/// [`enqueue_with`]'s rows for a grouped append: the same effects, as text.
pub fn shared_enqueue(
    stream_id: Uuid,
    stream_type: &str,
    effects: &[NewEffect],
) -> Option<SharedRows> {
    if effects.is_empty() {
        return None;
    }
    static OUTBOX: OutboxWrite = OutboxWrite;
    let rows = effects
        .iter()
        .zip(seqs(effects))
        .map(|(effect, seq)| {
            vec![
                Some(stream_id.to_string()),
                Some(stream_type.to_owned()),
                Some(effect.version.to_string()),
                Some(seq.to_string()),
                Some(effect.effect_type.to_owned()),
                Some(format!("\\x{}", hex::encode(&effect.payload))),
            ]
        })
        .collect();
    Some(SharedRows { kind: &OUTBOX, rows })
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

/// `UPDATE` marking effect `id` done, with `note` (placeholders).
fn complete_sql(id: &str, note: &str) -> String {
    format!(
        "UPDATE outbox SET completed_at = now(), claimed_until = NULL, last_error = {note}::text \
         WHERE id = {id}::bigint"
    )
}

/// `UPDATE` giving effect `id` back after `delay_ms` with `error` (placeholders). A failed
/// attempt keeps its count; a wait (`error` NULL) does not count as an attempt.
fn release_sql(id: &str, delay_ms: &str, error: &str) -> String {
    format!(
        "UPDATE outbox SET claimed_until = NULL, \
                available_at = now() + {delay_ms}::float8 * interval '1 millisecond', \
                attempts = CASE WHEN {error}::text IS NULL THEN attempts - 1 ELSE attempts END, \
                last_error = {error}::text \
         WHERE id = {id}::bigint"
    )
}

/// Adds to an append's statement the completion of effect `id` whose result the events
/// record, so that the result and the completion commit together.
pub fn complete_with(
    statement: &mut AppendStatement,
    id: i64,
    note: Option<&str>,
) -> Result<(), JournalError> {
    let sql = complete_sql(&statement.bind(id)?, &statement.bind(note)?);
    statement.write(format!("{sql} AND {}", AppendStatement::APPENDED));
    Ok(())
}

/// Adds to an append's statement giving effect `id` back to be tried after `delay` (see
/// [`release`]), so that the recorded attempt and the row's next try commit together.
pub fn release_with(
    statement: &mut AppendStatement,
    id: i64,
    delay: std::time::Duration,
    error: Option<&str>,
) -> Result<(), JournalError> {
    let id = statement.bind(id)?;
    let delay = statement.bind(delay.as_millis() as f64)?;
    let sql = release_sql(&id, &delay, &statement.bind(error)?);
    statement.write(format!("{sql} AND {}", AppendStatement::APPENDED));
    Ok(())
}

/// Marks a claimed effect done on its own (an effect whose result needs no command).
pub async fn complete(pool: &PgPool, id: i64, note: Option<&str>) -> Result<(), JournalError> {
    sqlx::query(sqlx::AssertSqlSafe(complete_sql("$1", "$2")))
        .bind(id)
        .bind(note)
        .execute(pool)
        .await?;
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
    sqlx::query(sqlx::AssertSqlSafe(release_sql("$1", "$2", "$3")))
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
