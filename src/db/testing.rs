//! Throwaway databases for tests and benchmarks: one private cluster per process (or the
//! server named by `DATABASE_URL`), and a fresh, migrated database per caller, so tests run in
//! parallel without seeing each other's rows.
//!
//! The private cluster, and every [`scratch_dir`], live in one temporary directory per process;
//! a small watchdog process stops the cluster and removes the directory when this process
//! exits, however it exits.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Mutex;

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
    let dir = process_root()?.join("cluster");
    let server =
        tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir, Durability::Throwaway))
            .await??;
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

/// A new, empty directory for one test's files (pieces, staged data, a node's home), inside
/// this process's scratch root. The root, and a test cluster started under it, are removed by
/// a watchdog once this process has gone, however it ends: tests and benchmarks leave nothing
/// behind in the temporary directory, even when they fail or are killed.
pub fn scratch_dir(label: &str) -> Result<PathBuf, DbError> {
    let dir = process_root()?.join(format!("{label}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).map_err(|e| DbError::io(&dir, e))?;
    Ok(dir)
}

/// This process's scratch root, `dealledger-test-<pid>` in the temporary directory: created,
/// with its watchdog, on first use.
fn process_root() -> Result<PathBuf, DbError> {
    static ROOT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut root = ROOT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(dir) = root.as_ref() {
        return Ok(dir.clone());
    }
    let dir = std::env::temp_dir().join(format!("dealledger-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| DbError::io(&dir, e))?;
    reap_on_exit(&dir)?;
    *root = Some(dir.clone());
    Ok(dir)
}

/// Starts a watchdog that, once this process has gone, stops the test cluster if one was
/// started under `dir` (`cluster/`) and deletes `dir`. Statics are never dropped, so this is
/// what cleans up after a test binary.
fn reap_on_exit(dir: &Path) -> Result<(), DbError> {
    let data = dir.join("cluster").join("pgdata");
    // Without server binaries (DATABASE_URL set) there is no cluster to stop.
    let stop = match super::embedded::find_bindir() {
        Ok(bindir) => format!(
            "if [ -f '{data}/postmaster.pid' ]; then {as_postgres}'{pg_ctl}' -D '{data}' \
             -m immediate -w stop >/dev/null 2>&1; fi; ",
            as_postgres =
                if super::embedded::running_as_root() { "runuser -u postgres -- " } else { "" },
            pg_ctl = bindir.join("pg_ctl").display(),
            data = data.display(),
        ),
        Err(_) => String::new(),
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop}rm -rf '{dir}'",
        pid = std::process::id(),
        dir = dir.display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| DbError::io(dir, e))?;
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
