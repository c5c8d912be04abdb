//! Where the ledger's database comes from: a PostgreSQL server named by `DATABASE_URL`, or, when
//! none is named, a private cluster under `$DEALLEDGER_HOME` started from the system's binaries.

pub mod embedded;
mod release;
pub mod testing;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use embedded::{Durability, EmbeddedPostgres};
pub use release::release_clean;

/// The database the embedded cluster keeps the ledger in.
pub const EMBEDDED_DATABASE: &str = "dealledger";

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// No `initdb`/`pg_ctl` anywhere: install the server or point `DATABASE_URL` at one.
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl) found in `pg_config --bindir`, PATH or \
         /usr/lib/postgresql/*/bin; install them (Debian/Ubuntu: `apt-get install postgresql`, \
         Fedora: `dnf install postgresql-server`, macOS: `brew install postgresql@16`) or set \
         DATABASE_URL to an existing PostgreSQL 14+ server"
    )]
    ServerBinariesNotFound,
    /// Running as root, but there is no `postgres` user to run the server as.
    #[error(
        "running as root, but the cluster cannot be given to a `postgres` system user; create \
         that user (the server refuses to run as root) or run as a normal user"
    )]
    NoPostgresUser,
    /// The `postgres` user cannot reach the home directory (a parent is not searchable).
    #[error(
        "the postgres system user cannot reach {home}; choose a DEALLEDGER_HOME outside private \
         directories such as /root, or make its parents searchable"
    )]
    HomeNotReachable { home: PathBuf },
    /// A server tool failed; its own message says why.
    #[error("`{command}` failed: {output}")]
    ServerCommand { command: String, output: String },
    /// A file or directory could not be used.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `DATABASE_URL` is not a valid PostgreSQL URL.
    #[error("invalid database url: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    /// The server could not be reached or refused the connection.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// The embedded server could not be started in the background.
    #[error("the task starting the embedded server failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl DbError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}

/// An open ledger database: the pool, and the embedded server if this program uses one.
#[derive(Debug)]
pub struct Database {
    /// Connections to the ledger's database.
    pub pool: PgPool,
    home: PathBuf,
    /// A URL people can paste into `psql`.
    pub display_url: String,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Opens the server at `url`, or the embedded cluster under `home` when `url` is `None`.
    pub async fn open(url: Option<&str>, home: &Path) -> Result<Self, DbError> {
        match url {
            Some(url) => {
                let options = PgConnectOptions::from_str(url).map_err(DbError::InvalidUrl)?;
                let pool = pool_options().connect_with(options).await?;
                Ok(Self {
                    pool,
                    home: home.to_path_buf(),
                    display_url: redact(url),
                    embedded: None,
                })
            }
            None => Self::open_embedded(home, Durability::Durable).await,
        }
    }

    /// Starts (or reuses) the embedded cluster under `home` and opens its ledger database,
    /// creating it on first use.
    pub async fn open_embedded(home: &Path, durability: Durability) -> Result<Self, DbError> {
        let home = home.to_path_buf();
        let server_home = home.clone();
        let server =
            tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&server_home, durability))
                .await??;
        let admin = pool_options()
            .max_connections(1)
            .connect_with(server.connect_options("postgres"))
            .await?;
        create_database_if_missing(&admin, EMBEDDED_DATABASE).await?;
        admin.close().await;
        let pool = pool_options().connect_with(server.connect_options(EMBEDDED_DATABASE)).await?;
        Ok(Self { pool, home, display_url: server.url(EMBEDDED_DATABASE), embedded: Some(server) })
    }

    /// The ledger's home directory (where the embedded cluster, keys and pieces live).
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Whether the database is the embedded cluster.
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// Closes the pool and stops the embedded server if this program started it and no other
    /// program is still connected to it (a second program keeps using it; it stops on the next
    /// start-and-close that finds it idle).
    pub async fn close(mut self) -> Result<(), DbError> {
        let others: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND application_name <> $1",
        )
        .bind(application_name())
        .fetch_one(&self.pool)
        .await
        .unwrap_or(1);
        self.pool.close().await;
        if let Some(server) = self.embedded.as_mut() {
            if others == 0 {
                server.stop(true)?;
            } else {
                tracing::info!(
                    others,
                    "other programs use the embedded PostgreSQL; leaving it running"
                );
                // Dropping must not stop it either.
                std::mem::forget(self.embedded.take());
            }
        }
        Ok(())
    }
}

/// The `application_name` this process's connections carry, so that it can tell them apart
/// from other programs' connections.
pub fn application_name() -> String {
    format!("dealledger-{}", std::process::id())
}

/// How far a streaming replica's data is behind its primary: the time since the last
/// transaction it replayed was committed, or `None` on a server that is not a replica.
/// (An idle primary makes this grow although nothing is missing; it is an upper bound.)
pub async fn replica_lag(pool: &sqlx::PgPool) -> Result<Option<std::time::Duration>, sqlx::Error> {
    let lag: Option<f64> = sqlx::query_scalar(
        "SELECT CASE WHEN pg_is_in_recovery() \
           THEN extract(epoch FROM now() - coalesce(pg_last_xact_replay_timestamp(), now())) \
           END::float8",
    )
    .fetch_one(pool)
    .await?;
    Ok(lag.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))))
}

/// How long a released connection stays trusted without a new liveness check.
pub const TRUSTED_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Pool settings shared by every way of opening the database.
///
/// Every connection coming back to the pool is checked for a transaction still open on the
/// server, or replies out of step, and closed if so: a cancelled use can leave either behind
/// (see [`release`]). One tiny statement per release buys the guarantee that a pooled
/// connection is always idle and in step; the hot paths skip it through [`release_clean`]
/// when their use ran to its end.
///
/// A connection is checked for liveness (a ping) before it is handed out only when it sat
/// idle for longer than [`TRUSTED_IDLE`]: one used a moment ago was pinged when it came back
/// to the pool, and sqlx's default — a ping before every acquire — would add a round trip to
/// every use. After a server restart, connections used just before it would still be handed
/// out dead; so once a released connection fails its check, every connection is pinged before
/// use for [`release::BROKEN_WINDOW`], and the dead ones are replaced before a caller sees
/// them (the faults test, `tests/faults.rs`, restarts the server under load).
pub fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(16)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for <= TRUSTED_IDLE && !release::ping_before_use() {
                    return Ok(true);
                }
                use sqlx::Connection;
                Ok(conn.ping().await.is_ok())
            })
        })
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SET application_name = '{}'",
                    application_name()
                )))
                .execute(conn)
                .await
                .map(|_| ())
            })
        })
        .after_release(|conn, _| {
            Box::pin(async move {
                if release::released_clean() {
                    return Ok(true);
                }
                // Outside a transaction a simple-protocol statement is its own transaction, so
                // it starts when the statement does; inside a leftover one, it started before.
                use sqlx::Row;
                let row = match sqlx::raw_sql("SELECT now() = statement_timestamp()")
                    .fetch_one(&mut *conn)
                    .await
                {
                    Ok(row) => row,
                    Err(e) => {
                        release::note_broken_connection();
                        return Err(e);
                    }
                };
                let idle: bool = row.try_get(0)?;
                if !idle {
                    tracing::warn!("closing a pooled connection left inside a transaction");
                }
                Ok(idle)
            })
        })
}

/// Creates `name` unless it exists. `name` must be a plain identifier chosen by this crate.
pub(crate) async fn create_database_if_missing(admin: &PgPool, name: &str) -> Result<(), DbError> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(admin)
            .await?;
    if !exists {
        let result = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(admin)
            .await;
        match result {
            // A concurrent first start may have created it: that is fine.
            Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P04") => {}
            other => {
                other?;
            }
        }
    }
    Ok(())
}

/// The URL without its password, for logs and status output.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("****"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}
