//! The `dealledger` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use uuid::Uuid;

use dealledger::db::Database;
use dealledger::events::{Journal, RecordedEvent};

#[derive(Parser)]
#[command(
    name = "dealledger",
    version,
    about = "An event-sourced ledger for storage and retrieval deals"
)]
struct Cli {
    /// PostgreSQL server to use; when unset, a private cluster under --home is started.
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// A streaming replica to read from: `audit`, `verify` and `db status` read there (the
    /// replica's lag is shown); writes always go to the primary.
    #[arg(long, env = "DEALLEDGER_READ_DATABASE_URL", global = true)]
    read_database_url: Option<String>,
    /// Where the embedded cluster, keys and state live.
    #[arg(long, env = "DEALLEDGER_HOME", default_value = ".dealledger", global = true)]
    home: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a storage deal and a retrieval end to end and shows what the ledger recorded.
    Demo(demo::DemoArgs),
    /// The database: where it is and what it holds.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// The journal's events.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Replays a deal's history: timeline, signatures, chain, legality, status row.
    Audit {
        /// A stream id, or a proposal CID (every side of that deal).
        deal: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The deal as of a version number or an RFC 3339 time.
        #[arg(long)]
        at: Option<String>,
    },
    /// Verifies every stream's hash chain, decoding and transitions; exit 1 if any fails.
    Verify {
        /// Only streams with an event at or after this position.
        #[arg(long)]
        since: Option<i64>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Runs a provider node: market protocols on libp2p, the transitions projector, periodic
    /// signed checkpoints; until SIGINT/SIGTERM.
    Serve(serve::ServeArgs),
    /// Signs the head of every stream with the node key (`checkpoint verify` checks one).
    Checkpoint {
        #[command(subcommand)]
        command: Option<CheckpointCommand>,
        /// Keep signing a checkpoint every this many minutes, until interrupted.
        #[arg(long)]
        every: Option<u64>,
    },
    /// Writes one deal's evidence (events, CIDs, signed checkpoint and proof) to a file.
    Export {
        /// A stream id or proposal CID naming one stream.
        deal: String,
        /// The bundle file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Checks a deal bundle offline, without a database.
    VerifyBundle {
        /// The bundle file.
        bundle: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The SQL status tables: status, rebuild, check, run the asynchronous projectors.
    Projections {
        #[command(subcommand)]
        command: projections_cli::ProjectionsCommand,
    },
    /// Deals on a running node (through its HTTP API).
    Deals {
        #[command(subcommand)]
        command: node_cli::DealsCommand,
    },
    /// One deal on a running node (through its HTTP API).
    Deal {
        #[command(subcommand)]
        command: node_cli::DealCommand,
    },
    /// Storage deals on a running node (through its HTTP API).
    Storage {
        #[command(subcommand)]
        command: node_cli::StorageCommand,
    },
    /// Retrievals on a running node (through its HTTP API).
    Retrieval {
        #[command(subcommand)]
        command: node_cli::RetrievalCommand,
    },
    /// The node's configuration file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// What the chain adapter observes (devnet or Lotus).
    Chain {
        #[command(subcommand)]
        command: chain_cli::ChainCommand,
    },
    /// The local devnet chain: advance its clock, run it in real time, inject faults.
    Devnet {
        #[command(subcommand)]
        command: chain_cli::DevnetCommand,
    },
    /// Moves the events of deals that ended long ago to `events_archive` (never deleted: audit,
    /// verify and checkpoints still read them there).
    Archive {
        /// Archive deals whose last event is older than this: `90d`, `12h`, `30m`, `45s`.
        #[arg(long, value_parser = parse_age)]
        older_than: std::time::Duration,
        /// Streams per transaction.
        #[arg(long, default_value_t = 500)]
        batch: i64,
    },
    /// Whole-system benchmarks on this database: a table, and the same as JSON.
    Bench {
        #[command(subcommand)]
        command: bench_cli::BenchCommand,
    },
    /// The deal state machines, read from their declarations.
    Fsm {
        #[command(subcommand)]
        command: fsm_cli::FsmCommand,
    },
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// Checks the journal against a checkpoint (the latest by default) and every chain.
    Verify {
        /// The checkpoint id.
        #[arg(long)]
        id: Option<i64>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Loads the file (defaults when absent), applies the environment and lists every problem.
    Check {
        /// The TOML file.
        #[arg(long, env = "DEALLEDGER_CONFIG")]
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Prints where the database is, its schema version and how many events it holds.
    Status,
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Prints events as they commit, in commit-safe order, until interrupted.
    Tail {
        /// Only events of this stream.
        #[arg(long)]
        stream: Option<Uuid>,
        /// Start from the first event instead of from now.
        #[arg(long)]
        from_start: bool,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
}

mod audit_cli;
mod bench_cli;
mod chain_cli;
mod demo;
mod fsm_cli;
mod node_cli;
mod projections_cli;
mod serve;

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // The machines need no database.
    if let Command::Fsm { command } = &cli.command {
        return fsm_cli::run(command);
    }
    if let Command::VerifyBundle { bundle, json } = &cli.command {
        return audit_cli::verify_bundle(bundle, *json);
    }
    // Verbs against a running node need no database here.
    match cli.command {
        Command::Config { command: ConfigCommand::Check { file } } => return serve::check(file),
        Command::Deals { command } => return node_cli::deals(command).await,
        Command::Deal { command } => return node_cli::deal(command).await,
        Command::Storage { command } => return node_cli::storage(command).await,
        Command::Retrieval { command } => return node_cli::retrieval(command).await,
        _ => {}
    }
    // `serve` may name its database in its configuration.
    let database_url = match &cli.command {
        Command::Serve(args) if cli.database_url.is_none() => {
            serve::node_config(args)?.node.database_url
        }
        _ => cli.database_url.clone(),
    };
    let db =
        Database::open(database_url.as_deref(), &cli.home).await.context("opening the database")?;
    let journal = Journal::open(db.pool.clone()).await.context("migrating the journal")?;
    // Read commands go to the replica when one is named (migrations only ever run on the
    // primary: a replica is read-only).
    let reads = match &cli.read_database_url {
        Some(url) => Journal::new(
            dealledger::db::pool_options()
                .connect(url)
                .await
                .context("connecting to the read replica")?,
        ),
        None => journal.clone(),
    };
    let result = match cli.command {
        Command::Demo(args) => demo::run(&db, &journal, args).await,
        Command::Bench { command } => bench_cli::run(&db, &journal, command).await,
        Command::Db { command: DbCommand::Status } => db_status(&db, &journal, &reads).await,
        Command::Events { command: EventsCommand::Tail { stream, from_start, json } } => {
            tail(&journal, stream, from_start, json).await
        }
        Command::Serve(args) => serve::run(&db, &journal, args).await,
        Command::Audit { deal, json, at } => audit_cli::audit(&reads, &deal, json, at).await,
        Command::Verify { since, json } => audit_cli::verify(&reads, since, json).await,
        Command::Checkpoint { command: None, every } => {
            audit_cli::checkpoint(&journal, &cli.home, every).await
        }
        Command::Checkpoint { command: Some(CheckpointCommand::Verify { id }), .. } => {
            audit_cli::verify_checkpoint(&journal, id).await
        }
        Command::Export { deal, output } => audit_cli::export(&journal, &deal, &output).await,
        Command::VerifyBundle { .. } => unreachable!("handled before the database is opened"),
        Command::Projections { command } => projections_cli::run(&journal, command).await,
        Command::Chain { command } => chain_cli::run(&db.pool, command).await,
        Command::Devnet { command } => chain_cli::devnet(&db.pool, command).await,
        Command::Archive { older_than, batch } => archive(&journal, older_than, batch).await,
        Command::Fsm { .. }
        | Command::Config { .. }
        | Command::Deals { .. }
        | Command::Deal { .. }
        | Command::Storage { .. }
        | Command::Retrieval { .. } => {
            unreachable!("handled before the database is opened")
        }
    };
    db.close().await.context("closing the database")?;
    result
}

async fn db_status(db: &Database, journal: &Journal, reads: &Journal) -> anyhow::Result<()> {
    let schema = journal.schema_version().await?;
    let events = journal.count().await?;
    let archived = journal.archived_count().await?;
    let streams: i64 = sqlx::query_scalar("SELECT count(DISTINCT stream_id) FROM journal_events")
        .fetch_one(&db.pool)
        .await?;
    println!("database:  {}", db.display_url);
    println!("embedded:  {}", if db.is_embedded() { "yes" } else { "no" });
    match schema {
        Some((version, description)) => println!("schema:    {version} ({description})"),
        None => println!("schema:    none applied"),
    }
    println!("events:    {events} (and {archived} archived)");
    println!("streams:   {streams}");
    if let Some(lag) = dealledger::db::replica_lag(reads.pool()).await? {
        let events = reads.count().await?;
        println!("replica:   {events} events, {:.3} s behind", lag.as_secs_f64());
    }
    Ok(())
}

/// `dealledger archive`
async fn archive(
    journal: &Journal,
    older_than: std::time::Duration,
    batch: i64,
) -> anyhow::Result<()> {
    let deals = dealledger::deals::Deals::new(journal.clone());
    let moved = dealledger::deals::retention::archive_ended(&deals, older_than, batch).await?;
    println!(
        "archived {} streams ({} events, {} effects) of deals that ended over {:?} ago",
        moved.streams, moved.events, moved.effects, older_than
    );
    Ok(())
}

/// A duration such as `90d`, `12h`, `30m` or `45s`.
fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?}: expected e.g. 30d or 12h"))?;
    let seconds = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" | "" => 1,
        other => return Err(format!("{text:?}: unknown unit {other:?} (d, h, m or s)")),
    };
    Ok(std::time::Duration::from_secs(number.saturating_mul(seconds)))
}

async fn tail(
    journal: &Journal,
    stream: Option<Uuid>,
    from_start: bool,
    json: bool,
) -> anyhow::Result<()> {
    let after = if from_start {
        dealledger::events::Checkpoint::START
    } else {
        journal.latest_checkpoint().await?
    };
    let events = journal.subscribe(after).await?;
    tokio::pin!(events);
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(event) = event else { return Ok(()) };
        let event = event?;
        if stream.is_some_and(|s| s != event.stream_id) {
            continue;
        }
        if json {
            println!("{}", event_json(&event));
        } else {
            println!(
                "{} #{:<8} {} {} v{:<4} {:<28} {} bytes  cid {}",
                event.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f"),
                event.position,
                event.stream_type,
                event.stream_id,
                event.version,
                event.event_type,
                event.payload.len(),
                event.cid
            );
        }
    }
}

fn event_json(event: &RecordedEvent) -> serde_json::Value {
    serde_json::json!({
        "position": event.position,
        "tx_id": event.tx_id,
        "stream_id": event.stream_id,
        "stream_type": event.stream_type,
        "version": event.version,
        "event_type": event.event_type,
        "schema_version": event.schema_version,
        "payload_hex": hex::encode(&event.payload),
        "recorded_at": event.recorded_at,
        "correlation_id": event.correlation_id,
        "causation_id": event.causation_id,
        "prev_cid": event.prev_cid.map(|c| c.to_string()),
        "cid": event.cid.to_string(),
    })
}
