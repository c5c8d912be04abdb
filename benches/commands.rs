//! `cargo bench --bench commands`: the full command round trip — load the deal by replaying
//! its stream, decide, append with the expected version, write the inline status row and the
//! outbox, in one transaction — for storage provider deals played from proposal to Active
//! (13 commands each, 15 transitions with the derived ones), with 1, 8 and 32 deals moving at
//! once. Prints commands/s and per-command latency (p50/p99) and writes
//! `target/bench/commands.json`. `BENCH_SCALE` (default 1.0 = 1,000 deals per level) scales it;
//! `BENCH_LEVELS` (default `1,8,32`) picks the concurrency levels, e.g. `32` to profile one.
//!
//! Beside it, the same workload written with esrs 0.18.0 (`benches/peers/esrs`: its aggregate,
//! `AggregateManager` load and handle, a `TransactionalEventHandler` writing the status row and
//! the outbox row), on a fresh database of the same cluster, with the ratio per level.
//!
//! The throwaway cluster has fsync off, so this measures the ledger's CPU and round trips,
//! not the disk.

use std::time::{Duration, Instant};

use dealledger::db::testing::{fresh_database, url_of};
use dealledger::deals::Deals;
use dealledger::deals::script::storage_deal_commands;
use dealledger::domain::ChainEpoch;
use dealledger::domain::storage::ClientDealProposal;
use dealledger::events::Journal;
use dealledger::fsm::fixtures::{NOW, client_key, proposal, provider_key};
use dealledger::fsm::storage_provider::StorageProvider;
use dealledger::fsm::{DecideContext, Machine};

#[path = "peers/run.rs"]
mod peers;

struct Level {
    concurrency: usize,
    commands: usize,
    seconds: f64,
    p50: Duration,
    p99: Duration,
}

#[path = "shared/percentile.rs"]
mod percentile;
use percentile::percentile;

async fn run_level(deals: &Deals, concurrency: usize, per_level: usize, level: usize) -> Level {
    let ctx = DecideContext { epoch: ChainEpoch(NOW), ..DecideContext::default() };
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (deals, ctx) = (deals.clone(), ctx.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for n in (worker..per_level).step_by(concurrency) {
                    let mut terms = proposal();
                    terms.label = format!("bench {level} {n}");
                    let signed = ClientDealProposal::sign(terms, &client_key());
                    let stream = Deals::storage_stream_id(StorageProvider::NAME, &signed);
                    let (_, commands) = storage_deal_commands(signed, &provider_key());
                    for command in commands {
                        let at = Instant::now();
                        deals
                            .handle::<StorageProvider>(stream, command, &ctx, None)
                            .await
                            .expect("the command is accepted");
                        latencies.push(at.elapsed());
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.expect("worker"));
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort();
    Level {
        concurrency,
        commands: latencies.len(),
        seconds,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
    }
}

#[tokio::main]
async fn main() {
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let per_level = ((1_000.0 * scale) as usize).max(32);
    let mut levels = Vec::new();
    let concurrency_levels: Vec<usize> = match std::env::var("BENCH_LEVELS") {
        Ok(list) => {
            list.split(',').map(|l| l.trim().parse().expect("BENCH_LEVELS: 1,8,32")).collect()
        }
        Err(_) => vec![1, 8, 32],
    };
    for (level, concurrency) in concurrency_levels.into_iter().enumerate() {
        let (pool, _) = fresh_database(40).await.expect("benchmark database");
        let deals = Deals::new(Journal::new(pool));
        levels.push(run_level(&deals, concurrency, per_level, level).await);
    }
    let (peer_pool, _) = fresh_database(40).await.expect("peer database");
    let esrs = peers::run("esrs", &["commands".into(), url_of(&peer_pool), per_level.to_string()]);
    let esrs_rate = |concurrency: usize| -> Option<f64> {
        let levels = esrs.as_ref()?.get("levels")?.as_array()?;
        let level =
            levels.iter().find(|l| l["concurrency"].as_u64() == Some(concurrency as u64))?;
        level["commands_per_s"].as_f64()
    };
    println!(
        "\ncommands benchmark: {per_level} storage provider deals per level, 13 commands each"
    );
    println!(
        "{:>11} {:>9} {:>9} {:>12} {:>10} {:>10} {:>14} {:>9}",
        "concurrency",
        "commands",
        "seconds",
        "commands/s",
        "p50 ms",
        "p99 ms",
        "esrs cmds/s",
        "x esrs"
    );
    for l in &levels {
        let rate = l.commands as f64 / l.seconds;
        let (peer, ratio) = match esrs_rate(l.concurrency) {
            Some(peer) => (format!("{peer:.0}"), format!("{:.2}", rate / peer)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:>11} {:>9} {:>9.2} {:>12.0} {:>10.2} {:>10.2} {:>14} {:>9}",
            l.concurrency,
            l.commands,
            l.seconds,
            rate,
            l.p50.as_secs_f64() * 1e3,
            l.p99.as_secs_f64() * 1e3,
            peer,
            ratio
        );
    }
    let json: Vec<_> = levels
        .iter()
        .map(|l| {
            let rate = l.commands as f64 / l.seconds;
            serde_json::json!({"concurrency": l.concurrency, "commands": l.commands,
                "seconds": l.seconds, "commands_per_s": rate,
                "p50_ms": l.p50.as_secs_f64() * 1e3, "p99_ms": l.p99.as_secs_f64() * 1e3,
                "esrs_commands_per_s": esrs_rate(l.concurrency),
                "ratio_to_esrs": esrs_rate(l.concurrency).map(|peer| rate / peer)})
        })
        .collect();
    let json = serde_json::json!({"dealledger": json, "esrs": esrs});
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(dir.join("commands.json"), serde_json::to_string_pretty(&json).expect("json"))
        .expect("write commands.json");
    println!("written to target/bench/commands.json");
}
