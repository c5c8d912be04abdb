//! Status tables as data: their columns and SQL types, and the two ways rows reach them — a
//! version-guarded upsert (inline, in the statement appending the command's events) and binary
//! `COPY` (rebuilds, the transitions projector). Rows are carried as text in each column's
//! canonical form, cast by PostgreSQL in the upsert and converted by [`super::binary`] for
//! `COPY`, so both ways share one encoding.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::sync::OnceLock;

use sqlx::PgConnection;

use super::{ProjectionError, binary};
use crate::events::{AppendStatement, JournalError, SharedRows, SharedWrite};

/// A column's SQL type, used to cast the text it is sent as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlType {
    Uuid,
    Text,
    BigInt,
    Int,
    SmallInt,
    Bool,
    Numeric,
    Timestamp,
}

impl SqlType {
    fn cast(self) -> &'static str {
        match self {
            SqlType::Uuid => "uuid",
            SqlType::Text => "text",
            SqlType::BigInt => "bigint",
            SqlType::Int => "integer",
            SqlType::SmallInt => "smallint",
            SqlType::Bool => "boolean",
            SqlType::Numeric => "numeric",
            SqlType::Timestamp => "timestamptz",
        }
    }
}

/// A status table: its name, its key column and its columns in order.
#[derive(Debug)]
pub struct TableSpec {
    /// The table users query.
    pub name: &'static str,
    /// The table that holds the rows. For the inline status tables `name` is a view over this
    /// base table, so that a rebuild can build a whole new base table and swap it in behind
    /// the view (see [`super::swap`]); elsewhere it is `name` itself.
    pub rows_table: &'static str,
    /// The primary key column (the stream id).
    pub key: &'static str,
    /// Every column, in the order rows list their values.
    pub columns: &'static [(&'static str, SqlType)],
}

/// One row: a value (or NULL) per column, as text.
pub type RowValues = Vec<Option<String>>;

impl TableSpec {
    /// `$first::type AS column, ...`: one row of this table from bound text parameters, for
    /// comparing a computed row with a live one without writing anything (so it also runs on
    /// a read-only replica).
    pub(crate) fn row_from_params(&self, first: usize) -> String {
        self.columns
            .iter()
            .enumerate()
            .map(|(i, (name, ty))| format!("${}::{} AS {name}", first + i, ty.cast()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The column list, comma-separated.
    pub fn column_list(&self) -> String {
        self.columns.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
    }

    /// Whether a later version of a row replaces `column`: every column but the key and the
    /// first event's time, which the row keeps from its first events.
    fn overwrites(&self, column: &str) -> bool {
        column != self.key && column != "first_event_at"
    }

    /// `(columns) ... ON CONFLICT DO UPDATE ... WHERE version < EXCLUDED.version`, around
    /// the values: re-applying an older or equal version changes nothing, and the first
    /// event's time is kept.
    fn upsert_parts(&self) -> &'static (String, String) {
        type Parts = HashMap<&'static str, &'static (String, String)>;
        static CACHE: OnceLock<std::sync::Mutex<Parts>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        let mut cache = cache.lock().unwrap_or_else(|poison| poison.into_inner());
        cache.entry(self.name).or_insert_with(|| {
            let updates: Vec<String> = self
                .columns
                .iter()
                .filter(|(c, _)| self.overwrites(c))
                .map(|(c, _)| format!("{c} = EXCLUDED.{c}"))
                .collect();
            let head = format!("INSERT INTO {} ({})", self.rows_table, self.column_list());
            let tail = format!(
                "ON CONFLICT ({key}) DO UPDATE SET {updates} WHERE {table}.version < EXCLUDED.version",
                key = self.key,
                updates = updates.join(", "),
                table = self.rows_table,
            );
            Box::leak(Box::new((head, tail)))
        })
    }

    /// Adds one row to an append's statement: written exactly when the events are, unless the
    /// table already holds this stream at this version or later.
    ///
    /// An `UPDATE` of the existing row first, and the upsert only when it updated nothing (a
    /// deal's first events): PostgreSQL's `ON CONFLICT` pays for a speculative index insert
    /// on every call, the `UPDATE` does not.
    ///
    /// It writes the base table (`rows_table`), not the view: writing through the view made a
    /// command about a fifth slower (`cargo bench --bench commands`, one deal at a time), the
    /// planner expanding the view on every execution. After a rebuild's swap the name is the
    /// new table's, and PostgreSQL plans prepared statements again against it.
    pub fn upsert_with(
        &'static self,
        statement: &mut AppendStatement,
        row: &RowValues,
    ) -> Result<(), JournalError> {
        let mut values = Vec::with_capacity(row.len());
        for ((_, ty), value) in self.columns.iter().zip(row) {
            values.push(format!("{}::{}", statement.bind(value.as_deref())?, ty.cast()));
        }
        let updated = statement.write(format!(
            "UPDATE {table} SET {sets} WHERE {key} = {key_value} AND version < {version} AND {appended} RETURNING 1",
            table = self.rows_table,
            sets = self.assignments(&values),
            key = self.key,
            key_value = self.value_of(&values, self.key),
            version = self.value_of(&values, "version"),
            appended = AppendStatement::APPENDED,
        ));
        let (head, tail) = self.upsert_parts();
        statement.write(format!(
            "{head} SELECT {} WHERE {} AND NOT EXISTS (SELECT 1 FROM {updated}) {tail}",
            values.join(", "),
            AppendStatement::APPENDED
        ));
        Ok(())
    }

    /// [`TableSpec::upsert_with`]'s row for a grouped append (see
    /// [`crate::events::group`]): the same row, written by the group's shared statement.
    pub fn shared_upsert(&'static self, row: RowValues) -> SharedRows {
        SharedRows { kind: self, rows: vec![row] }
    }

    /// `column = value, ...` for the columns a later version overwrites, from one value
    /// expression per column in column order: the `SET` of both `UPDATE`s.
    fn assignments(&self, values: &[String]) -> String {
        self.columns
            .iter()
            .zip(values)
            .filter(|((c, _), _)| self.overwrites(c))
            .map(|((c, _), v)| format!("{c} = {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The expression of `column` among `values` (one per column, in column order).
    fn value_of<'v>(&self, values: &'v [String], column: &str) -> &'v str {
        let at = self.columns.iter().position(|(c, _)| *c == column);
        at.map(|i| values[i].as_str()).unwrap_or("NULL")
    }

    /// Copies rows into `table` (this table or one with the same columns) with binary `COPY`.
    /// `table` goes into the statement as it is: a name from code, never from input.
    pub async fn copy_into<R: Borrow<RowValues>>(
        &self,
        conn: &mut PgConnection,
        table: &str,
        rows: impl IntoIterator<Item = R>,
    ) -> Result<u64, ProjectionError> {
        self.copy(conn, table, "", rows).await
    }

    /// Copies rows into `table` with binary `COPY`, built and sent a chunk at a time by this
    /// task. `options` are added to the `COPY`'s (`, FREEZE` for a table created in this
    /// transaction). For a few rows; many go through [`TableSpec::copy_built_aside`].
    pub(crate) async fn copy<R: Borrow<RowValues>>(
        &self,
        conn: &mut PgConnection,
        table: &str,
        options: &str,
        rows: impl IntoIterator<Item = R>,
    ) -> Result<u64, ProjectionError> {
        let mut copy = conn.copy_in_raw(&self.copy_statement(table, options)).await?;
        let mut chunks = binary::CopyChunks::new(self.columns);
        for row in rows {
            match chunks.push(row.borrow()) {
                Ok(None) => {}
                Ok(Some(full)) => {
                    copy.send(full).await?;
                }
                Err(error) => {
                    copy.abort(error.to_string()).await?;
                    return Err(error);
                }
            }
        }
        let (last, count) = chunks.finish();
        copy.send(last).await?;
        copy.finish().await?;
        Ok(count)
    }

    /// Copies the rows `build` returns into `table` with binary `COPY`, as
    /// [`TableSpec::copy`], but builds and encodes them on a blocking thread while this task
    /// sends: for a rebuild's many rows, this process then builds the next chunk while the
    /// server stores the last, instead of each waiting for the other. A row that cannot be
    /// encoded aborts the `COPY`: nothing is written. `table` goes into the statement as it
    /// is: a name from code, never from input.
    pub async fn copy_built_aside<I>(
        &self,
        conn: &mut PgConnection,
        table: &str,
        options: &str,
        build: impl FnOnce() -> I + Send + 'static,
    ) -> Result<u64, ProjectionError>
    where
        I: IntoIterator<Item = RowValues>,
    {
        // Two chunks ahead: enough to keep the server busy, little memory held.
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
        let columns = self.columns;
        let builder = tokio::task::spawn_blocking(move || {
            // What bounds the copy: a builder that mostly waits on sends waits on the server.
            let (started, mut waited) = (std::time::Instant::now(), std::time::Duration::ZERO);
            let mut chunks = binary::CopyChunks::new(columns);
            for row in build() {
                let Some(full) = chunks.push(&row)? else { continue };
                let sending = std::time::Instant::now();
                // A failed send: the sending side stopped on an error of its own and
                // reports it.
                if sender.blocking_send(full).is_err() {
                    return Ok(0);
                }
                waited += sending.elapsed();
            }
            let (last, count) = chunks.finish();
            let _ = sender.blocking_send(last);
            tracing::debug!(
                rows = count,
                seconds = started.elapsed().as_secs_f64(),
                waiting_on_the_server = waited.as_secs_f64(),
                "rows built"
            );
            Ok::<u64, ProjectionError>(count)
        });
        let mut copy = conn.copy_in_raw(&self.copy_statement(table, options)).await?;
        while let Some(chunk) = receiver.recv().await {
            copy.send(chunk).await?;
        }
        let built = builder
            .await
            .map_err(|failed| ProjectionError::RowBuilder(failed.to_string()))
            .and_then(|built| built);
        match built {
            Ok(count) => {
                copy.finish().await?;
                Ok(count)
            }
            Err(error) => {
                copy.abort(error.to_string()).await?;
                Err(error)
            }
        }
    }

    fn copy_statement(&self, table: &str, options: &str) -> String {
        format!("COPY {table} ({}) FROM STDIN (FORMAT binary{options})", self.column_list())
    }
}

/// A status table as a write grouped appends share: the same `UPDATE`, then upsert for rows
/// the `UPDATE` did not find, as [`TableSpec::upsert_with`], for all the group's rows at once.
impl SharedWrite for TableSpec {
    fn name(&self) -> &'static str {
        self.name
    }

    fn columns(&self) -> Vec<&'static str> {
        self.columns.iter().map(|(c, _)| *c).collect()
    }

    fn ctes(&self, rows: &str, prefix: &str) -> String {
        let values: Vec<String> =
            self.columns.iter().map(|(c, ty)| format!("r.{c}::{}", ty.cast())).collect();
        let (head, tail) = self.upsert_parts();
        format!(
            "{prefix}updated AS (UPDATE {table} t SET {sets} FROM {rows} r \
               WHERE t.{key} = {key_value} AND t.version < {version} RETURNING t.{key}), \
             {prefix}upserted AS ({head} SELECT {values} FROM {rows} r \
               WHERE NOT EXISTS (SELECT 1 FROM {prefix}updated u WHERE u.{key} = {key_value}) \
               {tail})",
            table = self.rows_table,
            sets = self.assignments(&values),
            key = self.key,
            key_value = self.value_of(&values, self.key),
            version = self.value_of(&values, "version"),
            values = values.join(", "),
        )
    }
}
