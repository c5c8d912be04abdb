//! Replacing all rows of an inline status table by swapping in a freshly built base table.
//!
//! Each inline status table users query (`storage_deals`, ...) is a view over a base table
//! (`storage_deals_rows`, migration 0009). A rebuild builds a new base table the fast way —
//! binary `COPY ... FREEZE` into a table without indexes, then each index built in bulk — and
//! points the view at it. All of that happens in the caller's transaction, so:
//! - readers go on reading the old rows until the commit and see the new ones after it; they
//!   wait only for the swap itself (the view's redefinition and the old table's drop), not for
//!   the copy or the index builds;
//! - a rebuild killed at any point rolls back and leaves the old table, view and indexes;
//! - everything that refers to the view (other views, functions, grants) is untouched, and
//!   writers' prepared statements, which name the base table, are planned again against the
//!   new table of that name.
//!
//! The new table copies the old one's columns, defaults and constraints (`LIKE`), and its
//! indexes from the catalog (`pg_get_indexdef`), so a later migration's index or constraint
//! is carried over without being listed here. Afterwards it has the old one's name and index
//! names.

use sqlx::{AssertSqlSafe, PgConnection};

use super::ProjectionError;
use super::table::{RowValues, TableSpec};

/// One index of the live base table, and how to build it on the new one.
#[derive(Debug, sqlx::FromRow)]
struct IndexClone {
    /// The index's name (quoted if it needs to be).
    name: String,
    /// The name it is built under on the new table, until the old table is dropped.
    next_name: String,
    /// The primary key or unique constraint it backs, if any.
    constraint: Option<String>,
    /// `PRIMARY KEY` or `UNIQUE`, for that constraint.
    constraint_kind: Option<String>,
    /// Its definition as the catalog prints it.
    definition: String,
    /// How that definition starts, naming the index and the old table.
    prefix: String,
    /// The same start, naming the new index and the new table.
    next_prefix: String,
}

/// What the new base table and its indexes are called until the old ones are dropped: their
/// final names with this suffix.
const NEXT: &str = "_next";

/// The live base table's indexes (`$1`), each with the statement that builds it on the new
/// table (names suffixed with `$2`, [`NEXT`]).
const INDEXES: &str = "\
SELECT quote_ident(ic.relname) AS name,
       quote_ident(ic.relname || $2) AS next_name,
       quote_ident(con.conname) AS constraint,
       CASE con.contype WHEN 'p' THEN 'PRIMARY KEY' WHEN 'u' THEN 'UNIQUE' END
           AS constraint_kind,
       pg_get_indexdef(i.indexrelid) AS definition,
       format('CREATE %sINDEX %I ON %I.%I ',
              CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END,
              ic.relname, n.nspname, t.relname) AS prefix,
       format('CREATE %sINDEX %I ON %I.%I ',
              CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END,
              ic.relname || $2, n.nspname, t.relname || $2) AS next_prefix
  FROM pg_index i
  JOIN pg_class ic ON ic.oid = i.indexrelid
  JOIN pg_class t ON t.oid = i.indrelid
  JOIN pg_namespace n ON n.oid = t.relnamespace
  LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u')
 WHERE i.indrelid = $1::regclass
 ORDER BY ic.relname";

async fn execute(conn: &mut PgConnection, statement: String) -> Result<(), ProjectionError> {
    sqlx::raw_sql(AssertSqlSafe(statement)).execute(conn).await?;
    Ok(())
}

/// Replaces every row of `table` with the rows `build` returns, in the caller's transaction,
/// by building a new base table and swapping it in behind the view. The caller holds a lock
/// that keeps writers out (the rows must reflect every event committed before it); returns the
/// rows written. The rows are built on a blocking thread while the server stores them
/// ([`TableSpec::copy_built_aside`]).
pub(crate) async fn replace_rows<I: IntoIterator<Item = RowValues>>(
    conn: &mut PgConnection,
    table: &'static TableSpec,
    build: impl FnOnce() -> I + Send + 'static,
) -> Result<u64, ProjectionError> {
    let base = table.rows_table;
    let next = format!("{base}{NEXT}");
    let indexes: Vec<IndexClone> =
        sqlx::query_as(INDEXES).bind(base).bind(NEXT).fetch_all(&mut *conn).await?;
    let mut builds = Vec::with_capacity(indexes.len());
    for index in &indexes {
        let Some(rest) = index.definition.strip_prefix(&index.prefix) else {
            return Err(ProjectionError::UnclonableIndex(index.definition.clone()));
        };
        builds.push(format!("{}{rest}", index.next_prefix));
    }

    execute(
        conn,
        format!(
            "CREATE TABLE {next} (LIKE {base} INCLUDING DEFAULTS INCLUDING CONSTRAINTS \
             INCLUDING STORAGE INCLUDING COMMENTS)"
        ),
    )
    .await?;
    let started = std::time::Instant::now();
    // FREEZE: the table is new in this transaction, so its rows can be written already
    // visible to everyone; nothing has to set hint bits or freeze them later.
    let written = table.copy_built_aside(conn, &next, ", FREEZE", build).await?;
    tracing::debug!(table = table.name, seconds = started.elapsed().as_secs_f64(), "copied");
    for build in builds {
        execute(conn, build).await?;
        tracing::debug!(
            table = table.name,
            seconds = started.elapsed().as_secs_f64(),
            "index built"
        );
    }

    // The swap: from here to the commit, readers of the view wait.
    execute(
        conn,
        format!(
            "CREATE OR REPLACE VIEW {view} AS SELECT {columns} FROM {next}; DROP TABLE {base}; \
             ALTER TABLE {next} RENAME TO {base}",
            view = table.name,
            columns = table.column_list(),
        ),
    )
    .await?;
    for index in &indexes {
        let mut statement = format!("ALTER INDEX {} RENAME TO {}", index.next_name, index.name);
        if let (Some(constraint), Some(kind)) = (&index.constraint, &index.constraint_kind) {
            statement.push_str(&format!(
                "; ALTER TABLE {base} ADD CONSTRAINT {constraint} {kind} USING INDEX {}",
                index.name
            ));
        }
        execute(conn, statement).await?;
    }
    Ok(written)
}
