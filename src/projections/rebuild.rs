//! Rebuilding the inline status tables from the journal, and checking the live ones against a
//! rebuild.
//!
//! 1. In one repeatable-read snapshot, every event is read in position order and folded in
//!    memory through its machine (no row-by-row SQL).
//! 2. The live tables are locked against writers (readers go on reading the old rows) and the
//!    events committed since the snapshot are folded in.
//! 3. A rebuild builds each table's rows into a new base table and swaps it in behind the
//!    table's view in that same transaction ([`super::swap`]): readers never see a
//!    half-built table, and a rebuild killed at any point leaves the old rows. A check
//!    `COPY`s into temporary shadow tables instead and compares them with the live ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::ProjectionError;
use super::fold::{EventRef, FoldedDeal, FoldedDeals};
use super::rows::INLINE_TABLES;
use super::table::{RowValues, TableSpec};
use crate::events::binary_copy::{CopyRow, for_each_row_aside};

/// What a rebuild did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RebuildReport {
    /// Events folded from the snapshot.
    pub events: u64,
    /// Events committed during the rebuild and folded in before the swap.
    pub caught_up: u64,
    /// Streams folded.
    pub streams: u64,
    /// Rows written per table.
    pub rows: Vec<(&'static str, u64)>,
    /// Wall time, in seconds.
    pub seconds: f64,
}

/// A row where a live table and a fresh rebuild disagree.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RowDiff {
    /// The table.
    pub table: &'static str,
    /// `missing or different in live` (the rebuild has it) or `unexpected in live`.
    pub kind: String,
    /// The row, as JSON.
    pub row: String,
}

/// Reports progress: events folded so far.
pub type Progress<'a> = &'a mut (dyn FnMut(u64) + Send);

/// The inline tables called `name` (or all of them for `None`).
pub fn inline_tables(name: Option<&str>) -> Result<Vec<&'static TableSpec>, ProjectionError> {
    match name {
        None => Ok(INLINE_TABLES.to_vec()),
        Some(name) => INLINE_TABLES
            .iter()
            .find(|t| t.name == name)
            .map(|t| vec![*t])
            .ok_or_else(|| ProjectionError::UnknownProjection(name.to_owned())),
    }
}

/// The event columns a fold reads, in the order `fold_events` decodes them.
macro_rules! event_fields {
    () => {
        "stream_id, stream_type, version, event_type, schema_version, payload, recorded_at"
    };
}

/// Folds the events `select` returns (`event_fields!`, in position order) into `deals`, read
/// through a binary `COPY` and folded as they arrive, on a thread of their own while this task
/// reads on; returns how many. Progress is reported as `done` plus the events folded here.
async fn fold_events(
    conn: &mut PgConnection,
    select: &str,
    deals: &mut FoldedDeals,
    done: u64,
    progress: Progress<'_>,
) -> Result<u64, ProjectionError> {
    // How many events the folding thread has folded, for progress reports from this task.
    let folded = Arc::new(AtomicU64::new(0));
    let shared = Arc::clone(&folded);
    let visit = move |(deals, count): &mut (FoldedDeals, u64), row: CopyRow<'_>| {
        let event = EventRef {
            stream_id: row.uuid(0)?,
            version: row.version(2)?,
            event_type: row.text(3)?,
            schema_version: row.int(4)? as i16,
            payload: row.bytes(5)?,
        };
        FoldedDeal::fold(deals, row.text(1)?, event, row.time(6)?)?;
        *count += 1;
        if count.is_multiple_of(4096) {
            shared.store(*count, Ordering::Relaxed);
        }
        Ok::<_, ProjectionError>(())
    };
    let mut reported = 0;
    let report = || {
        let now = folded.load(Ordering::Relaxed);
        if now >= reported + 50_000 {
            reported = now;
            progress(done + now);
        }
    };
    let state = (std::mem::take(deals), 0);
    let (folded_deals, count) = for_each_row_aside(conn, select, 7, state, visit, report).await?;
    *deals = folded_deals;
    progress(done + count);
    Ok(count)
}

/// Reads and folds every event visible in one snapshot; returns the deals, the snapshot and
/// the number of events.
async fn fold_snapshot(
    pool: &PgPool,
    progress: Progress<'_>,
) -> Result<(FoldedDeals, String, u64), ProjectionError> {
    // A sqlx transaction, so that a rebuild dropped midway rolls back before its connection
    // is reused.
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let snapshot: String =
        sqlx::query_scalar("SELECT pg_current_snapshot()::text").fetch_one(&mut *tx).await?;
    let mut deals = FoldedDeals::default();
    // Archived streams first, then the hot journal: each stream is archived whole, in one
    // transaction, so in one snapshot a stream's events are all in one of the two tables and
    // per-stream order is all a fold needs. Two plain index scans in position order cost the
    // server less than one merged scan over the `journal_events` view.
    let mut events = 0;
    for select in [
        concat!("SELECT ", event_fields!(), " FROM events_archive ORDER BY position"),
        concat!("SELECT ", event_fields!(), " FROM events ORDER BY position"),
    ] {
        events += fold_events(&mut tx, select, &mut deals, events, progress).await?;
    }
    tx.commit().await?;
    Ok((deals, snapshot, events))
}

/// Builds the rows of `table` in key order, as they are consumed, on whichever thread calls
/// it (a rebuild's row builder, beside the task sending them). In key order the primary key's
/// index is built from already sorted rows, and the table is laid out as lookups by stream id
/// (time-ordered uuids) go.
fn rows_of(
    deals: Arc<FoldedDeals>,
    table: &'static TableSpec,
) -> impl FnOnce() -> Box<dyn Iterator<Item = RowValues> + Send> + Send + 'static {
    move || {
        let mut ids: Vec<Uuid> = deals
            .iter()
            .filter(|(_, folded)| std::ptr::eq(folded.deal.table(), table))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        Box::new(
            ids.into_iter()
                .filter_map(move |id| deals.get(&id).map(|folded| folded.deal.row(&folded.meta).1)),
        )
    }
}

fn shadow(table: &TableSpec) -> String {
    format!("shadow_{}", table.name)
}

/// Locks `tables` in `lock_mode` and folds in the events committed after `snapshot`, which
/// held `folded` events; returns how many.
async fn lock_and_catch_up(
    conn: &mut PgConnection,
    tables: &[&'static TableSpec],
    deals: &mut FoldedDeals,
    snapshot: &str,
    folded: u64,
    lock_mode: &str,
    progress: Progress<'_>,
) -> Result<u64, ProjectionError> {
    let names: Vec<&str> = tables.iter().map(|t| t.name).collect();
    let lock = format!("LOCK TABLE {} IN {lock_mode} MODE", names.join(", "));
    sqlx::query(sqlx::AssertSqlSafe(lock)).execute(&mut *conn).await?;
    // `COPY` takes no parameters, so the snapshot goes into the statement: it is the server's
    // own `xmin:xmax:xip,...` text, and nothing but digits and separators is let through.
    if !snapshot.bytes().all(|b| b.is_ascii_digit() || b == b':' || b == b',') {
        return Err(ProjectionError::UnexpectedSnapshot(snapshot.to_owned()));
    }
    // Events committed after the snapshot: their transactions are at or above its xmin and
    // were not visible to it.
    let select = format!(
        concat!(
            "SELECT ",
            event_fields!(),
            " FROM events WHERE tx_id >= pg_snapshot_xmin('{snapshot}'::pg_snapshot) \
             AND NOT pg_visible_in_snapshot(tx_id, '{snapshot}'::pg_snapshot) ORDER BY position"
        ),
        snapshot = snapshot
    );
    fold_events(conn, &select, deals, folded, progress).await
}

/// Rebuilds `tables` from the journal and replaces their rows in one transaction.
///
/// The deals are folded in memory; then the tables are locked against writers (readers go on
/// reading the old rows), the events committed meanwhile are folded in, and each table's rows
/// are built into a new base table swapped in behind its view. Readers see the old rows until
/// the commit and the new ones after it, never a mix; a rebuild killed at any point leaves the
/// old rows.
pub async fn rebuild_inline(
    pool: &PgPool,
    tables: &[&'static TableSpec],
    progress: Progress<'_>,
) -> Result<RebuildReport, ProjectionError> {
    let started = Instant::now();
    let (mut deals, snapshot, events) = fold_snapshot(pool, progress).await?;
    tracing::info!(
        events,
        seconds = started.elapsed().as_secs_f64(),
        "rebuild: folded the snapshot"
    );
    let mut tx = pool.begin().await?;
    let caught_up =
        lock_and_catch_up(&mut tx, tables, &mut deals, &snapshot, events, "EXCLUSIVE", progress)
            .await?;
    tracing::info!(
        caught_up,
        seconds = started.elapsed().as_secs_f64(),
        "rebuild: locked and caught up"
    );
    let deals = Arc::new(deals);
    let mut counts = Vec::new();
    for table in tables {
        let rows = rows_of(Arc::clone(&deals), table);
        let written = super::swap::replace_rows(&mut tx, table, rows).await?;
        tracing::info!(
            table = table.name,
            seconds = started.elapsed().as_secs_f64(),
            "rebuild: swapped in"
        );
        counts.push((table.name, written));
    }
    tx.commit().await?;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "rebuild: committed");
    Ok(RebuildReport {
        events,
        caught_up,
        streams: deals.len() as u64,
        rows: counts,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Rebuilds `tables` into shadow tables (under a lock that holds writers back, so live and
/// shadow reflect the same events) and lists every row where they differ from the live ones. An empty list means the live tables are exactly the fold of the journal.
pub async fn check_inline(
    pool: &PgPool,
    tables: &[&'static TableSpec],
    progress: Progress<'_>,
) -> Result<Vec<RowDiff>, ProjectionError> {
    let (mut deals, snapshot, events) = fold_snapshot(pool, progress).await?;
    let mut tx = pool.begin().await?;
    lock_and_catch_up(&mut tx, tables, &mut deals, &snapshot, events, "SHARE", progress).await?;
    let deals = Arc::new(deals);
    for table in tables {
        let statement = format!(
            "CREATE TEMP TABLE {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP",
            shadow(table),
            table.name
        );
        sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut *tx).await?;
        let rows = rows_of(Arc::clone(&deals), table);
        table.copy_built_aside(&mut tx, &shadow(table), "", rows).await?;
    }
    let mut diffs = Vec::new();
    for table in tables {
        let compare = format!(
            "SELECT 'missing or different in live', row_to_json(d)::text \
               FROM (SELECT * FROM {shadow} EXCEPT SELECT * FROM {name}) d \
             UNION ALL \
             SELECT 'unexpected in live', row_to_json(d)::text \
               FROM (SELECT * FROM {name} EXCEPT SELECT * FROM {shadow}) d",
            name = table.name,
            shadow = shadow(table)
        );
        let found: Vec<(String, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(compare)).fetch_all(&mut *tx).await?;
        diffs.extend(found.into_iter().map(|(kind, row)| RowDiff { table: table.name, kind, row }));
    }
    tx.rollback().await?;
    Ok(diffs)
}

/// Compares one row computed from the journal with the live row of the same key: the rows that
/// differ, from both sides (empty when they are equal).
pub async fn diff_row(
    pool: &PgPool,
    table: &'static TableSpec,
    row: &RowValues,
) -> Result<Vec<RowDiff>, ProjectionError> {
    let key = row.first().cloned().flatten().unwrap_or_default();
    let compare = format!(
        "WITH computed AS (SELECT {values}) \
         SELECT 'missing or different in live', row_to_json(d)::text \
           FROM (SELECT * FROM computed EXCEPT SELECT * FROM {name} WHERE {key}::text = $1) d \
         UNION ALL \
         SELECT 'unexpected in live', row_to_json(d)::text \
           FROM (SELECT * FROM {name} WHERE {key}::text = $1 EXCEPT SELECT * FROM computed) d",
        values = table.row_from_params(2),
        name = table.name,
        key = table.key
    );
    let mut query = sqlx::query_as(sqlx::AssertSqlSafe(compare)).bind(key);
    for value in row {
        query = query.bind(value.as_deref());
    }
    let found: Vec<(String, String)> = query.fetch_all(pool).await?;
    Ok(found.into_iter().map(|(kind, row)| RowDiff { table: table.name, kind, row }).collect())
}
