//! Status tables as data: their columns and SQL types, and the two ways rows reach them — a
//! version-guarded upsert (inline, in the statement appending the command's events) and CSV
//! `COPY` (rebuilds). Rows are carried as text in each column's canonical form and cast by
//! PostgreSQL, so both ways share one encoding.

use std::collections::HashMap;
use std::sync::OnceLock;

use sqlx::PgConnection;

use super::ProjectionError;
use crate::events::{AppendStatement, JournalError};

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
    /// The table.
    pub name: &'static str,
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
    fn upsert_parts(&'static self) -> &'static (String, String) {
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
            let head = format!("INSERT INTO {} ({})", self.name, self.column_list());
            let tail = format!(
                "ON CONFLICT ({key}) DO UPDATE SET {updates} WHERE {table}.version < EXCLUDED.version",
                key = self.key,
                updates = updates.join(", "),
                table = self.name,
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
    pub fn upsert_with(
        &'static self,
        statement: &mut AppendStatement,
        row: &RowValues,
    ) -> Result<(), JournalError> {
        let mut values = Vec::with_capacity(row.len());
        for ((_, ty), value) in self.columns.iter().zip(row) {
            values.push(format!("{}::{}", statement.bind(value.as_deref())?, ty.cast()));
        }
        let value_of = |column: &str| {
            let at = self.columns.iter().position(|(c, _)| *c == column);
            at.map(|i| values[i].as_str()).unwrap_or("NULL")
        };
        let sets: Vec<String> = self
            .columns
            .iter()
            .zip(&values)
            .filter(|((c, _), _)| self.overwrites(c))
            .map(|((c, _), v)| format!("{c} = {v}"))
            .collect();
        let updated = statement.write(format!(
            "UPDATE {table} SET {sets} WHERE {key} = {key_value} AND version < {version} AND {appended} RETURNING 1",
            table = self.name,
            sets = sets.join(", "),
            key = self.key,
            key_value = value_of(self.key),
            version = value_of("version"),
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

    /// Copies rows into `table` (this table or a shadow with the same columns) as CSV.
    pub async fn copy_into(
        &self,
        conn: &mut PgConnection,
        table: &str,
        rows: impl IntoIterator<Item = &RowValues>,
    ) -> Result<u64, ProjectionError> {
        let mut csv = String::with_capacity(64 * 1024);
        let mut count = 0u64;
        for row in rows {
            push_csv_row(&mut csv, row);
            count += 1;
        }
        let statement = format!("COPY {table} ({}) FROM STDIN (FORMAT csv)", self.column_list());
        let mut copy = conn.copy_in_raw(&statement).await?;
        copy.send(csv.as_bytes()).await?;
        copy.finish().await?;
        Ok(count)
    }
}

/// Appends one CSV line: NULL as an empty unquoted field, every value quoted.
fn push_csv_row(out: &mut String, row: &RowValues) {
    for (i, value) in row.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if let Some(text) = value {
            out.push('"');
            for c in text.chars() {
                if c == '"' {
                    out.push('"');
                }
                out.push(c);
            }
            out.push('"');
        }
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    #[test]
    fn csv_quotes_values_and_leaves_nulls_empty() {
        let mut out = String::new();
        super::push_csv_row(&mut out, &vec![Some("a\"b,c".into()), None, Some(String::new())]);
        assert_eq!(out, "\"a\"\"b,c\",,\"\"\n");
    }
}
