//! The statement that carries a group of appends (see [`super::group`]): every value is bound
//! as an array, so the SQL text depends only on which kinds of shared writes the group has,
//! and the server plans it once per connection.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use sqlx::Arguments;
use sqlx::postgres::PgArguments;

use super::group::{GroupOutcome, GroupedAppend, SharedWrite};

/// The heads each append expects, checked inside the statement (the expected event is there
/// and is the last: an append whose stream moved on is left out, instead of failing the
/// whole group on the `(stream_id, version)` key), and the appends' events,
/// inserted only for the appends whose check passed (`heads` lists them by index), in the
/// order of the group and of each append's events.
///
/// `OFFSET 0` keeps each check a probe by key per append: without it PostgreSQL may turn an
/// `EXISTS` into a hashed subplan, reading a whole table (or its index) on every execution,
/// and a generic plan chosen while the journal is small would keep doing so as it grows.
const INSERT_GROUP: &str = "
heads AS (
  SELECT h.cmd FROM UNNEST($1::int[], $2::uuid[], $3::text[], $4::int[], $5::bytea[])
                    AS h(cmd, stream_id, stream_type, version, cid)
  WHERE CASE WHEN h.version = 0
    THEN NOT EXISTS (SELECT 1 FROM events_archive a WHERE a.stream_id = h.stream_id OFFSET 0)
    ELSE EXISTS (SELECT 1 FROM events e
                 WHERE e.stream_id = h.stream_id AND e.version = h.version AND e.cid = h.cid
                   AND e.stream_type = h.stream_type OFFSET 0)
         AND NOT EXISTS (SELECT 1 FROM events n
                         WHERE n.stream_id = h.stream_id AND n.version = h.version + 1 OFFSET 0)
  END),
appended AS (
  INSERT INTO events (stream_id, stream_type, version, event_type, schema_version, payload,
                      recorded_at, correlation_id, causation_id, prev_cid, cid)
  SELECT e.stream_id, e.stream_type, e.version, e.event_type, e.schema_version, e.payload,
         e.recorded_at, e.correlation_id, e.causation_id, e.prev_cid, e.cid
  FROM UNNEST($6::int[], $7::uuid[], $8::text[], $9::int[], $10::text[], $11::smallint[],
              $12::bytea[], $13::timestamptz[], $14::uuid[], $15::uuid[], $16::bytea[],
              $17::bytea[]) WITH ORDINALITY
       AS e(cmd, stream_id, stream_type, version, event_type, schema_version, payload,
            recorded_at, correlation_id, causation_id, prev_cid, cid, ord)
  WHERE e.cmd IN (SELECT cmd FROM heads)
  ORDER BY e.ord
  RETURNING 1)";

/// Sends `group` as one statement and says what became of each append, in order.
///
/// When the statement fails, every append is tried again alone: one that lost a race, or
/// whose own companion write fails, then gets its own error, and the others are written.
pub(crate) async fn execute(pool: &sqlx::PgPool, group: &[GroupedAppend]) -> Vec<GroupOutcome> {
    match try_execute(pool, group).await {
        Ok(appended) => (0..group.len() as i32)
            .map(|cmd| {
                if appended.contains(&cmd) {
                    GroupOutcome::Appended
                } else {
                    GroupOutcome::TryAlone
                }
            })
            .collect(),
        Err(error) => {
            tracing::debug!(%error, appends = group.len(), "grouped append failed; each is tried alone");
            group.iter().map(|_| GroupOutcome::TryAlone).collect()
        }
    }
}

/// The indexes (`cmd`) of the appends whose events the statement inserted.
async fn try_execute(
    pool: &sqlx::PgPool,
    group: &[GroupedAppend],
) -> Result<Vec<i32>, sqlx::Error> {
    let (sql, args) = statement(group).map_err(sqlx::Error::Encode)?;
    let mut conn = pool.acquire().await?;
    let appended: Vec<i32> =
        sqlx::query_scalar_with(sqlx::AssertSqlSafe(sql), args).fetch_all(&mut *conn).await?;
    crate::db::release_clean(conn);
    Ok(appended)
}

type Encode = Box<dyn std::error::Error + Send + Sync>;

/// One kind of shared write and its rows in a group, each with the index of its append.
type KindRows<'a> = (&'static dyn SharedWrite, Vec<(i32, &'a Vec<Option<String>>)>);

/// The statement's text and its arguments.
fn statement(group: &[GroupedAppend]) -> Result<(Arc<str>, PgArguments), Encode> {
    let mut args = PgArguments::default();
    let cmds = 0..group.len() as i32;
    args.add(cmds.collect::<Vec<_>>())?;
    args.add(group.iter().map(|a| a.stream_id).collect::<Vec<_>>())?;
    args.add(group.iter().map(|a| a.stream_type.as_str()).collect::<Vec<_>>())?;
    args.add(group.iter().map(GroupedAppend::expected_version).collect::<Vec<_>>())?;
    args.add(group.iter().map(GroupedAppend::link).collect::<Vec<_>>())?;

    let events =
        || group.iter().enumerate().flat_map(|(cmd, a)| a.events.iter().map(move |e| (cmd, a, e)));
    args.add(events().map(|(cmd, _, _)| cmd as i32).collect::<Vec<_>>())?;
    args.add(events().map(|(_, a, _)| a.stream_id).collect::<Vec<_>>())?;
    args.add(events().map(|(_, a, _)| a.stream_type.as_str()).collect::<Vec<_>>())?;
    args.add(group.iter().flat_map(|a| a.versions.iter().copied()).collect::<Vec<_>>())?;
    args.add(events().map(|(_, _, e)| e.event_type.as_str()).collect::<Vec<_>>())?;
    args.add(events().map(|(_, _, e)| e.schema_version).collect::<Vec<_>>())?;
    args.add(events().map(|(_, _, e)| e.payload.as_slice()).collect::<Vec<_>>())?;
    args.add(events().map(|(_, a, _)| a.recorded_at).collect::<Vec<_>>())?;
    args.add(events().map(|(_, _, e)| e.correlation_id).collect::<Vec<_>>())?;
    args.add(events().map(|(_, _, e)| e.causation_id).collect::<Vec<_>>())?;
    args.add(
        group.iter().flat_map(|a| a.prev_cids.iter().map(|c| c.as_deref())).collect::<Vec<_>>(),
    )?;
    args.add(group.iter().flat_map(|a| a.cids.iter().map(|c| c.as_slice())).collect::<Vec<_>>())?;

    // The shared writes' arrays follow, numbered from here.
    let first_shared = args.len() + 1;
    // The shared writes, by kind, in a fixed order.
    let mut kinds: BTreeMap<&'static str, KindRows<'_>> = BTreeMap::new();
    for (cmd, append) in group.iter().enumerate() {
        for shared in &append.shared {
            let entry = kinds.entry(shared.kind.name()).or_insert((shared.kind, Vec::new()));
            entry.1.extend(shared.rows.iter().map(|row| (cmd as i32, row)));
        }
    }
    for (kind, rows) in kinds.values() {
        args.add(rows.iter().map(|(cmd, _)| *cmd).collect::<Vec<_>>())?;
        for c in 0..kind.columns().len() {
            let column = rows.iter().map(|(_, row)| row.get(c).and_then(|v| v.as_deref()));
            args.add(column.collect::<Vec<_>>())?;
        }
    }
    let kinds: Vec<&'static dyn SharedWrite> = kinds.values().map(|(kind, _)| *kind).collect();
    Ok((text_for(&kinds, first_shared), args))
}

/// The statement's text for a group with shared writes of `kinds` (in name order), whose
/// arrays are bound from parameter `first_shared` on: per kind its `cmd`, then one per
/// column. It depends on nothing else, so it is built once and kept: a group is written for
/// every few commands, and building the text each time was an eighth of this process's CPU at
/// 32 deals at once (`perf`).
fn text_for(kinds: &[&'static dyn SharedWrite], first_shared: usize) -> Arc<str> {
    type Texts = Mutex<HashMap<(Vec<&'static str>, usize), Arc<str>>>;
    static TEXTS: OnceLock<Texts> = OnceLock::new();
    let names: Vec<&'static str> = kinds.iter().map(|kind| kind.name()).collect();
    let texts = TEXTS.get_or_init(Texts::default);
    // A poisoned lock only means another thread panicked while inserting a finished text.
    let mut texts = texts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let text = texts.entry((names, first_shared)).or_insert_with(|| {
        let mut next = first_shared;
        let mut sql = format!("WITH {INSERT_GROUP}");
        for (k, kind) in kinds.iter().enumerate() {
            let columns = kind.columns();
            let arrays: Vec<String> = (0..=columns.len())
                .map(|i| format!("${}::{}[]", next + i, if i == 0 { "int" } else { "text" }))
                .collect();
            next += columns.len() + 1;
            sql.push_str(&format!(
                ", shared_{k}_rows AS (SELECT r.* FROM UNNEST({arrays}) AS r(cmd, {columns}) \
                 WHERE r.cmd IN (SELECT cmd FROM heads)), {ctes}",
                arrays = arrays.join(", "),
                columns = columns.join(", "),
                ctes = kind.ctes(&format!("shared_{k}_rows"), &format!("shared_{k}_")),
            ));
        }
        sql.push_str(" SELECT cmd FROM heads");
        Arc::from(sql)
    });
    Arc::clone(text)
}
