//! A private PostgreSQL cluster under the ledger's home directory, started from the system's
//! server binaries, so that a fresh machine needs no database set-up.
//!
//! The cluster listens only on a unix socket inside the home directory. As root, the server
//! (which refuses to run as root) runs as the `postgres` system user.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sqlx::postgres::PgConnectOptions;

use super::DbError;

/// The port number that names the socket file; nothing listens on TCP.
const SOCKET_PORT: u16 = 5432;

/// How the cluster trades durability for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync on: the cluster holds real data (the CLI and the service).
    Durable,
    /// fsync off: a throwaway cluster for tests and benchmarks that compare like with like.
    Throwaway,
}

/// A running private cluster. Stops the server on [`EmbeddedPostgres::stop`] (or drop) if this
/// program started it; a server that another program started is reused and left running.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    bindir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    as_postgres_user: bool,
    started_here: bool,
    stopped: bool,
}

impl EmbeddedPostgres {
    /// Initialises the cluster on first use, then starts it, or reuses a server already running
    /// on the same directory. Blocking: call it from `spawn_blocking` in async code.
    pub fn start(home: &Path, durability: Durability) -> Result<Self, DbError> {
        let bindir = find_bindir()?;
        std::fs::create_dir_all(home).map_err(|e| DbError::io(home, e))?;
        let home = home.canonicalize().map_err(|e| DbError::io(home, e))?;
        let data_dir = home.join("pgdata");
        let socket_dir = home.join("run");
        std::fs::create_dir_all(&socket_dir).map_err(|e| DbError::io(&socket_dir, e))?;
        let as_postgres_user = running_as_root();
        let mut server = Self {
            bindir,
            data_dir,
            socket_dir,
            port: SOCKET_PORT,
            as_postgres_user,
            started_here: false,
            stopped: false,
        };
        if as_postgres_user {
            server.hand_to_postgres_user(&home)?;
        }
        if !server.data_dir.join("PG_VERSION").exists() {
            server.initdb(durability)?;
        }
        if !server.reuse_running()? {
            server.launch(durability, &home)?;
        }
        Ok(server)
    }

    /// Starts a streaming replica of `primary` under `home` (read scale on one machine, and
    /// the tests of reading from a replica): `pg_basebackup -R` on first use, then the server
    /// on its own socket, following the primary's WAL. Blocking, like [`EmbeddedPostgres::start`].
    pub fn start_replica(primary: &EmbeddedPostgres, home: &Path) -> Result<Self, DbError> {
        std::fs::create_dir_all(home).map_err(|e| DbError::io(home, e))?;
        let home = home.canonicalize().map_err(|e| DbError::io(home, e))?;
        let mut replica = Self {
            bindir: primary.bindir.clone(),
            data_dir: home.join("pgdata"),
            socket_dir: home.join("run"),
            port: SOCKET_PORT,
            as_postgres_user: primary.as_postgres_user,
            started_here: false,
            stopped: false,
        };
        std::fs::create_dir_all(&replica.socket_dir)
            .map_err(|e| DbError::io(&replica.socket_dir, e))?;
        if replica.as_postgres_user {
            replica.hand_to_postgres_user(&home)?;
        }
        if !replica.data_dir.join("PG_VERSION").exists() {
            let data = replica.data_dir.to_string_lossy().into_owned();
            let host = primary.socket_dir.to_string_lossy().into_owned();
            let port = primary.port.to_string();
            let args =
                ["-D", &data, "-h", &host, "-p", &port, "-U", "postgres", "-R", "-X", "stream"];
            replica.run("pg_basebackup", &args)?;
        }
        if !replica.reuse_running()? {
            replica.launch(Durability::Throwaway, &home)?;
        }
        Ok(replica)
    }

    /// Options to connect to `database` on this cluster as the `postgres` superuser.
    pub fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host(&self.socket_dir.to_string_lossy())
            .port(self.port)
            .username("postgres")
            .database(database)
    }

    /// A libpq URL for `psql` and other tools.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql:///{database}?host={}&port={}&user=postgres",
            self.socket_dir.display(),
            self.port
        )
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether this program started the server (and so is the one to stop it).
    pub fn started_here(&self) -> bool {
        self.started_here
    }

    /// Stops the server if this program started it. `fast` disconnects clients; otherwise the
    /// server stops once the last client has gone and this call does not wait.
    pub fn stop(&mut self, fast: bool) -> Result<(), DbError> {
        if !self.started_here || self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let data = self.data_dir.to_string_lossy().into_owned();
        let args: &[&str] = if fast {
            &["-D", &data, "-m", "fast", "-w", "stop"]
        } else {
            &["-D", &data, "-m", "smart", "-W", "stop"]
        };
        self.run("pg_ctl", args).map(|_| ())
    }

    /// Restarts the server, whichever program started it: every connection to it drops, as
    /// in a server crash or a failover. Programs using it must reconnect on their own; the
    /// fault tests use this to check that they do.
    pub fn restart(&self) -> Result<(), DbError> {
        let data = self.data_dir.to_string_lossy().into_owned();
        let home = self.data_dir.parent().unwrap_or(&self.data_dir);
        let log = home.join("postgres.log").to_string_lossy().into_owned();
        self.run("pg_ctl", &["-D", &data, "-l", &log, "-m", "fast", "-w", "-t", "60", "restart"])
            .map(|_| ())
    }

    /// A command that runs `tool` from the server binaries as the cluster's owner.
    fn command(&self, tool: &str) -> Command {
        let program = self.bindir.join(tool);
        let mut command = if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command.stdin(Stdio::null());
        command
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<Output, DbError> {
        let output = self
            .command(tool)
            .args(args)
            .output()
            .map_err(|e| DbError::io(&self.bindir.join(tool), e))?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(DbError::ServerCommand {
                command: format!("{tool} {}", args.join(" ")),
                output: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }

    /// The server refuses to run as root: give the cluster's directories to `postgres`.
    fn hand_to_postgres_user(&self, home: &Path) -> Result<(), DbError> {
        std::fs::create_dir_all(&self.data_dir).map_err(|e| DbError::io(&self.data_dir, e))?;
        for dir in [home, self.data_dir.as_path(), self.socket_dir.as_path()] {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir)
                .status()
                .map_err(|e| DbError::io(dir, e))?;
            if !status.success() {
                return Err(DbError::NoPostgresUser);
            }
        }
        std::fs::set_permissions(
            &self.data_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| DbError::io(&self.data_dir, e))?;
        let reachable = Command::new("runuser")
            .args(["-u", "postgres", "--", "test", "-w"])
            .arg(&self.socket_dir)
            .status()
            .map_err(|e| DbError::io(Path::new("runuser"), e))?;
        if !reachable.success() {
            return Err(DbError::HomeNotReachable { home: home.to_path_buf() });
        }
        Ok(())
    }

    fn initdb(&self, durability: Durability) -> Result<(), DbError> {
        let data = self.data_dir.to_string_lossy().into_owned();
        let mut args = vec!["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8"];
        args.extend(["--locale=C"]);
        if durability == Durability::Throwaway {
            args.push("--no-sync");
        }
        self.run("initdb", &args).map(|_| ())
    }

    /// Adopts a server already running on this data directory, if there is one.
    fn reuse_running(&mut self) -> Result<bool, DbError> {
        let pid_file = self.data_dir.join("postmaster.pid");
        let Ok(contents) = std::fs::read_to_string(&pid_file) else {
            return Ok(false);
        };
        let running = self
            .command("pg_ctl")
            .args(["-D"])
            .arg(&self.data_dir)
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| DbError::io(&pid_file, e))?
            .success();
        if !running {
            return Ok(false);
        }
        // postmaster.pid: line 4 is the port, line 5 the socket directory.
        let lines: Vec<&str> = contents.lines().collect();
        if let Some(port) = lines.get(3).and_then(|p| p.trim().parse().ok()) {
            self.port = port;
        }
        if let Some(dir) = lines.get(4).filter(|d| !d.trim().is_empty()) {
            self.socket_dir = PathBuf::from(dir.trim());
        }
        tracing::info!(data_dir = %self.data_dir.display(), "reusing the running embedded PostgreSQL");
        Ok(true)
    }

    fn launch(&mut self, durability: Durability, home: &Path) -> Result<(), DbError> {
        let mut options = format!(
            "-p {} -k '{}' -c listen_addresses='' -c max_connections=200",
            self.port,
            self.socket_dir.display()
        );
        if durability == Durability::Throwaway {
            options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let data = self.data_dir.to_string_lossy().into_owned();
        let log = home.join("postgres.log").to_string_lossy().into_owned();
        let args = ["-D", &data, "-l", &log, "-w", "-t", "60", "-o", &options, "start"];
        match self.run("pg_ctl", &args) {
            Ok(_) => {
                self.started_here = true;
                tracing::info!(data_dir = %data, "started the embedded PostgreSQL");
                Ok(())
            }
            // Another program may have started it between our check and our start.
            Err(e) => {
                if self.reuse_running()? {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Err(e) = self.stop(false) {
            tracing::warn!(error = %e, "could not stop the embedded PostgreSQL");
        }
    }
}

/// Whether this process runs as root (the server must then run as `postgres`).
pub(crate) fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Finds the directory of `initdb`, `pg_ctl` and `postgres`: `pg_config --bindir`, then `PATH`,
/// then the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf, DbError> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|d| has_server(d))
    {
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).ok_or(DbError::ServerBinariesNotFound)
}
