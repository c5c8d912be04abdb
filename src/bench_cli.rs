//! `dealledger bench <name>`: whole-system runs on the ledger's database (the embedded one, or
//! `DATABASE_URL`), each printing a table and writing it as JSON under
//! `$DEALLEDGER_HOME/bench/`. The component benchmarks (journal, commands, rebuild, transfer,
//! memory) are `cargo bench` targets; these run the product as a user runs it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use futures::{StreamExt, TryStreamExt};

use dealledger::db::Database;
use dealledger::events::Journal;

use crate::demo::Market;

/// The whole-system benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Storage deals end to end between two nodes over libp2p on 127.0.0.1: funded, proposed,
    /// accepted, pushed, commP-verified, then published, sealed and activated on the devnet.
    Deals(DealsArgs),
}

/// Options of `dealledger bench deals`.
#[derive(Args, Debug)]
pub struct DealsArgs {
    /// How many deals.
    #[arg(long, default_value_t = 200)]
    pub deals: u32,
    /// Bytes of data per deal.
    #[arg(long, default_value_t = 64 * 1024)]
    pub size: u64,
    /// Deals in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Where to write the JSON (default: `$DEALLEDGER_HOME/bench/deals.json`).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Runs one benchmark.
pub async fn run(db: &Database, journal: &Journal, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Deals(args) => deals(db, journal, args).await,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted.get(((sorted.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or_default()
}

async fn deals(db: &Database, journal: &Journal, args: DealsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.deals > 0 && args.concurrency > 0,
        "--deals and --concurrency must be > 0"
    );
    let market = Market::open(db, journal).await?;
    // The client's data and signed proposals (its commP computed) are prepared before the
    // clock starts: they are the client's homework, not the ledger's work.
    let prepared: Vec<_> = (0..args.deals)
        .map(|n| {
            let mut bytes = vec![0u8; args.size as usize];
            rand::fill(&mut bytes[..]);
            let signed = market.proposal(&bytes, format!("bench deal {n}"));
            (signed, bytes)
        })
        .collect();
    let streams: Vec<_> = prepared.iter().map(|(signed, _)| Market::streams(signed)).collect();
    println!(
        "bench deals: {} deals of {} bytes, {} at once; provider and client ledgers on {}",
        args.deals, args.size, args.concurrency, db.display_url
    );

    // The runners perform effects by themselves, as in `serve`.
    let _runners = market.run_in_background();
    // Proposed, funded, accepted, pushed and verified, `concurrency` deals at a time.
    let started = Instant::now();
    let market = &market;
    let mut latencies: Vec<Duration> = futures::stream::iter(prepared)
        .map(|(signed, bytes)| async move {
            let at = Instant::now();
            let state = market.over_network(signed, &bytes).await?;
            anyhow::ensure!(state == "CheckForAcceptance", "a deal ended its push in {state}");
            Ok(at.elapsed())
        })
        .buffer_unordered(args.concurrency)
        .try_collect()
        .await?;
    let transfer_phase = started.elapsed();
    latencies.sort();

    // Published, sealed (pre-commit 2 epochs after hand-off, proof 3 after that) and
    // activated: the devnet's clock moves an epoch per 100 ms until every deal is Active.
    let chain_started = Instant::now();
    market.settle().await?;
    let mut epochs = 0;
    loop {
        let mut behind = None;
        for (client, provider) in &streams {
            for (side, stream) in [(&market.client, client), (&market.provider, provider)] {
                let state = side.get_storage_deal_status(*stream).await?.state;
                if state != "Active" {
                    behind = Some((*stream, state));
                }
            }
        }
        match behind {
            None => break,
            Some((stream, state)) if epochs >= 100 => {
                anyhow::bail!("deal {stream} is {state}, not Active, {epochs} epochs on")
            }
            Some(_) => {
                // A devnet epoch per 100 ms, as `serve --devnet-epoch-ms 100` runs it.
                market.advance(1).await?;
                epochs += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let chain_phase = chain_started.elapsed();
    let total = started.elapsed();

    let deals = f64::from(args.deals);
    let mib = deals * args.size as f64 / f64::from(1 << 20);
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    let rows = [
        ("deals, all Active on both sides", format!("{}", args.deals)),
        (
            "propose to verified piece, whole phase",
            format!("{:.2} s", transfer_phase.as_secs_f64()),
        ),
        ("  deals/s", format!("{:.1}", deals / transfer_phase.as_secs_f64())),
        ("  MiB/s pushed", format!("{:.1}", mib / transfer_phase.as_secs_f64())),
        ("  per deal p50 / p99", format!("{:.1} / {:.1} ms", ms(p50), ms(p99))),
        (
            "publish, seal, activate (devnet)",
            format!("{:.2} s, {epochs} epochs", chain_phase.as_secs_f64()),
        ),
        ("total", format!("{:.2} s", total.as_secs_f64())),
    ];
    println!();
    for (what, value) in &rows {
        println!("{what:<40} {value:>14}");
    }
    let json = serde_json::json!({
        "bench": "deals",
        "deals": args.deals,
        "bytes_per_deal": args.size,
        "concurrency": args.concurrency,
        "transfer_phase_s": transfer_phase.as_secs_f64(),
        "deals_per_s": deals / transfer_phase.as_secs_f64(),
        "mib_per_s": mib / transfer_phase.as_secs_f64(),
        "deal_p50_ms": ms(p50),
        "deal_p99_ms": ms(p99),
        "chain_phase_s": chain_phase.as_secs_f64(),
        "chain_epochs": epochs,
        "total_s": total.as_secs_f64(),
    });
    let path = args.json.unwrap_or_else(|| db.home().join("bench").join("deals.json"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    println!("written to {}", path.display());
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
