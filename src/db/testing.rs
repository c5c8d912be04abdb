//! Throwaway databases for tests and benchmarks: one private cluster per process (or the
//! server named by `DATABASE_URL`), and a fresh, migrated database per caller, so tests run in
//! parallel without seeing each other's rows.
//!
//! The private cluster lives in a temporary directory; a small watchdog process stops it and
//! removes the directory when this process exits, however it exits.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool};
use tokio::sync::OnceCell;
use uuid::Uuid;

use super::{DbError, Durability, EmbeddedPostgres, pool_options};
use crate::events::Journal;

/// The database every test database is copied from, with the migrations applied once.
const TEMPLATE: &str = "dealledger_template";

/// Where per-test databases are created.
enum Server {
    /// The process's own cluster; per-test databases are copies of a migrated template.
    Embedded { server: EmbeddedPostgres },
    /// An existing server from `DATABASE_URL`; per-test databases are created and migrated.
    External { options: Box<PgConnectOptions> },
}

static SERVER: OnceCell<Server> = OnceCell::const_new();

/// A fresh database with the ledger's migrations applied, on the process's test server.
/// Returns a pool of at most `max_connections` connections and the database's name.
pub async fn fresh_database(max_connections: u32) -> Result<(PgPool, String), DbError> {
    let server = SERVER.get_or_try_init(start_server).await?;
    let name = format!("dealledger_test_{}", Uuid::new_v4().simple());
    let (admin_options, options) = match server {
        Server::Embedded { server } => {
            (server.connect_options("postgres"), server.connect_options(&name))
        }
        Server::External { options } => ((**options).clone(), (**options).clone().database(&name)),
    };
    let admin = pool_options().max_connections(1).connect_with(admin_options).await?;
    let create = match server {
        Server::Embedded { .. } => format!("CREATE DATABASE \"{name}\" TEMPLATE {TEMPLATE}"),
        Server::External { .. } => format!("CREATE DATABASE \"{name}\""),
    };
    sqlx::query(sqlx::AssertSqlSafe(create)).execute(&admin).await?;
    admin.close().await;
    let pool = pool_options().max_connections(max_connections).connect_with(options).await?;
    if let Server::External { .. } = server {
        Journal::migrator().run(&pool).await.map_err(|e| DbError::Sqlx(e.into()))?;
    }
    Ok((pool, name))
}

async fn start_server() -> Result<Server, DbError> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let options = PgConnectOptions::from_str(&url).map_err(DbError::InvalidUrl)?;
        return Ok(Server::External { options: Box::new(options) });
    }
    let dir = std::env::temp_dir().join(format!("dealledger-test-{}", std::process::id()));
    let server_dir = dir.clone();
    let server = tokio::task::spawn_blocking(move || {
        EmbeddedPostgres::start(&server_dir, Durability::Throwaway)
    })
    .await??;
    reap_on_exit(&server, dir)?;
    let admin =
        pool_options().max_connections(1).connect_with(server.connect_options("postgres")).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {TEMPLATE}"))).execute(&admin).await?;
    admin.close().await;
    let template =
        pool_options().max_connections(1).connect_with(server.connect_options(TEMPLATE)).await?;
    Journal::migrator().run(&template).await.map_err(|e| DbError::Sqlx(e.into()))?;
    // Copies need the template to have no open connections.
    template.close().await;
    Ok(Server::Embedded { server })
}

/// Starts a watchdog that stops the cluster and deletes its directory once this process has
/// gone. Statics are never dropped, so this is what cleans up after a test binary.
fn reap_on_exit(server: &EmbeddedPostgres, dir: PathBuf) -> Result<(), DbError> {
    let pg_ctl = super::embedded::find_bindir()?.join("pg_ctl");
    let as_postgres = if server.started_here() && super::embedded::running_as_root() {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
         {as_postgres}'{pg_ctl}' -D '{data}' -m immediate -w stop >/dev/null 2>&1; \
         rm -rf '{dir}'",
        pid = std::process::id(),
        pg_ctl = pg_ctl.display(),
        data = server.data_dir().display(),
        dir = dir.display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| DbError::io(&dir, e))?;
    Ok(())
}

/// A URL another process can connect to `pool`'s database with (crash tests run the node in
/// a child process). With `DATABASE_URL` set, that URL with the database name replaced.
pub fn url_of(pool: &sqlx::PgPool) -> String {
    let options = pool.connect_options();
    let database = options.get_database().unwrap_or("postgres");
    if let Some(mut url) = std::env::var("DATABASE_URL").ok().and_then(|u| url::Url::parse(&u).ok())
    {
        url.set_path(&format!("/{database}"));
        return url.to_string();
    }
    let host = options
        .get_socket()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| options.get_host().to_owned());
    format!(
        "postgresql:///{database}?host={host}&port={}&user={}",
        options.get_port(),
        options.get_username()
    )
}
