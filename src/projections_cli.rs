//! `dealledger projections ...`: status, rebuild, check, and running the asynchronous
//! projectors.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use dealledger::events::Journal;
use dealledger::projections::projector::{self, DEAL_TRANSITIONS, TransitionsProjector};
use dealledger::projections::rebuild::{self, RebuildReport};

/// The `projections` subcommands.
#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// Rows per status table and how far each asynchronous projection lags.
    Status,
    /// Rebuilds from the journal and swaps the result in atomically.
    Rebuild {
        /// storage_deals, retrieval_deals, retrieval_requests or deal_transitions.
        name: Option<String>,
        /// Every projection.
        #[arg(long)]
        all: bool,
    },
    /// Rebuilds into shadow tables and prints every row that differs from the live ones.
    Check,
    /// Runs the asynchronous projectors until interrupted.
    Run,
}

/// A progress reporter over `total` events: a bar with events/s and ETA on a terminal, a line
/// every few seconds otherwise.
fn progress(label: &'static str, total: u64) -> (ProgressBar, impl FnMut(u64) + Send) {
    let terminal = std::io::stderr().is_terminal();
    let bar = if terminal { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix}: [{bar:30}] {pos}/{len} events ({per_sec}, ETA {eta}) {elapsed}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(label);
    bar.enable_steady_tick(Duration::from_millis(120));
    let handle = bar.clone();
    let started = Instant::now();
    let mut last_line = Instant::now();
    let report = move |events: u64| {
        handle.set_position(events);
        if !terminal && last_line.elapsed() > Duration::from_secs(2) {
            last_line = Instant::now();
            let rate = events as f64 / started.elapsed().as_secs_f64().max(1e-9);
            eprintln!("{label}: {events} of {total} events ({rate:.0}/s)");
        }
    };
    (bar, report)
}

fn print_report(name: &str, report: &RebuildReport) {
    let rows: Vec<String> = report.rows.iter().map(|(t, n)| format!("{t} {n} rows")).collect();
    println!(
        "rebuilt {name}: {} events from {} streams in {:.2} s ({:.0} events/s), {} caught up; {}",
        report.events,
        report.streams,
        report.seconds,
        report.events as f64 / report.seconds.max(1e-9),
        report.caught_up,
        rows.join(", ")
    );
}

/// Runs a `projections` subcommand.
pub async fn run(journal: &Journal, command: ProjectionsCommand) -> anyhow::Result<()> {
    let pool = journal.pool();
    let total = journal.count().await? as u64;
    match command {
        ProjectionsCommand::Status => {
            for table in
                ["storage_deals", "retrieval_deals", "retrieval_requests", "deal_transitions"]
            {
                let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*) FROM {table}"
                )))
                .fetch_one(pool)
                .await?;
                println!("{table:<20} {rows:>10} rows");
            }
            for lag in projector::lags(pool).await? {
                println!(
                    "{:<20} checkpoint ({}, {}), {} events behind, last advanced {}",
                    lag.name,
                    lag.checkpoint.tx_id,
                    lag.checkpoint.position,
                    lag.events_behind,
                    lag.seconds_since_update.map_or("never".into(), |s| format!("{s:.1} s ago"))
                );
            }
        }
        ProjectionsCommand::Rebuild { name, all } => {
            let name = if all { None } else { name };
            if name.is_none() && !all {
                bail!("name a projection or pass --all");
            }
            if name.as_deref() != Some(DEAL_TRANSITIONS) {
                let tables = rebuild::inline_tables(name.as_deref())?;
                let (bar, mut report) = progress("rebuild", total);
                let result = rebuild::rebuild_inline(pool, &tables, &mut report).await;
                bar.finish_and_clear();
                print_report(name.as_deref().unwrap_or("status tables"), &result?);
            }
            if name.is_none() || name.as_deref() == Some(DEAL_TRANSITIONS) {
                let (bar, mut report) = progress("rebuild deal_transitions", total);
                let result = projector::rebuild_transitions(journal, &mut report).await;
                bar.finish_and_clear();
                print_report(DEAL_TRANSITIONS, &result?);
            }
        }
        ProjectionsCommand::Check => {
            let tables = rebuild::inline_tables(None)?;
            let (bar, mut report) = progress("check", total);
            let diffs = rebuild::check_inline(pool, &tables, &mut report).await;
            bar.finish_and_clear();
            let diffs = diffs?;
            for diff in &diffs {
                println!("{}: {}: {}", diff.table, diff.kind, diff.row);
            }
            if !diffs.is_empty() {
                bail!("{} rows differ from the fold of the journal", diffs.len());
            }
            println!("status tables equal the fold of the journal");
        }
        ProjectionsCommand::Run => {
            println!("following the journal into deal_transitions; ctrl-c stops");
            let stop = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            TransitionsProjector::new(journal.clone()).run(stop).await?;
        }
    }
    Ok(())
}
