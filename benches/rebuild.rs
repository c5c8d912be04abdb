//! `cargo bench --bench rebuild`: rebuilding the status tables from a journal of 1M events over
//! 100k deals, beside a raw `COPY ... TO` of the same events on the same server; then `verify`
//! of the same journal. The rebuild and the raw copy alternate, [`ROUNDS`] times each, and the
//! table shows each one's median (every round is printed too): on a shared machine one run of
//! either can be off by half. Prints a table and writes `target/bench/rebuild.json`. Sizes
//! scale with `BENCH_SCALE` (default 1.0).
//!
//! Beside it, esrs 0.18.0's `PgRebuilder::by_aggregate_id` rebuilding the same status view
//! (`benches/peers/esrs`) from the same events per deal (at most `BENCH_PEER_DEALS` deals,
//! default 20,000: it goes deal by deal, so its rate does not depend on the count), in a fresh
//! database of the same cluster; `BENCH_PEERS=0` skips it.

use std::time::Instant;

use sqlx::PgPool;
use uuid::Uuid;

use dealledger::db::testing::{fresh_database, url_of};
use dealledger::deals::script::storage_deal_commands;
use dealledger::domain::storage::ClientDealProposal;
use dealledger::events::{EventCodec, Journal, NewEvent};
use dealledger::fsm::fixtures::{client_key, proposal, provider_key};
use dealledger::projections::rebuild::{check_inline, inline_tables, rebuild_inline};

#[path = "shared/median.rs"]
mod median;
#[path = "peers/run.rs"]
mod peers;
use median::median;

/// How many times the rebuild and the raw copy each run; the table shows the medians.
const ROUNDS: usize = 3;

/// Writes `deals` client deals of 10 events each, one append per deal, from 16 writers.
async fn fill(journal: &Journal, deals: usize) {
    let per_writer = deals.div_ceil(16);
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let journal = journal.clone();
            tokio::spawn(async move {
                for n in (w * per_writer)..((w + 1) * per_writer).min(deals) {
                    let mut terms = proposal();
                    terms.label = format!("bench deal {n}");
                    let signed = ClientDealProposal::sign(terms, &client_key());
                    let (client, _) = storage_deal_commands(signed, &provider_key());
                    let events: Vec<NewEvent> =
                        client.iter().map(|e| EventCodec::encode(e).expect("encodes")).collect();
                    journal
                        .append(Uuid::now_v7(), "storage_client", 0, &events)
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
}

/// Reads every event's folded columns with `COPY ... TO STDOUT`; returns (events, seconds).
async fn raw_copy(pool: &PgPool) -> (u64, f64) {
    use futures::TryStreamExt;
    let started = Instant::now();
    let mut conn = pool.acquire().await.expect("connection");
    let mut out = conn
        .copy_out_raw(
            "COPY (SELECT stream_id, stream_type, version, event_type, schema_version, payload, \
             recorded_at FROM events ORDER BY position) TO STDOUT (FORMAT binary)",
        )
        .await
        .expect("copy out");
    let mut bytes = 0usize;
    while let Some(chunk) = out.try_next().await.expect("copy chunk") {
        bytes += chunk.len();
    }
    drop(out);
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await.expect("count");
    let _ = bytes;
    (events as u64, started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() {
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let deals = ((100_000.0 * scale) as usize).max(10);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let (pool, _) = fresh_database(20).await.expect("benchmark database");
    let journal = Journal::new(pool.clone());
    let started = Instant::now();
    fill(&journal, deals).await;
    eprintln!("filled {deals} deals in {:.1} s", started.elapsed().as_secs_f64());
    sqlx::query("VACUUM ANALYZE events").execute(&pool).await.expect("vacuum");

    let tables = inline_tables(None).expect("tables");
    let (mut copy_rounds, mut rebuild_rounds) = (Vec::new(), Vec::new());
    let (mut events, mut report) = (0, None);
    for _ in 0..ROUNDS {
        let (copied, seconds) = raw_copy(&pool).await;
        copy_rounds.push(seconds);
        let rebuilt = rebuild_inline(&pool, &tables, &mut |_| {}).await.expect("rebuild");
        rebuild_rounds.push(rebuilt.seconds);
        (events, report) = (copied, Some(rebuilt));
    }
    let report = report.expect("at least one round");
    eprintln!("rounds (seconds): raw COPY {copy_rounds:.2?}, rebuild {rebuild_rounds:.2?}");
    let copy_seconds = median(&mut copy_rounds);
    let rebuild_seconds = median(&mut rebuild_rounds);
    let check_started = Instant::now();
    let diffs = check_inline(&pool, &tables, &mut |_| {}).await.expect("check");
    let check_seconds = check_started.elapsed().as_secs_f64();
    assert!(diffs.is_empty(), "a rebuild must equal its own check");

    let verified =
        dealledger::audit::verify::verify_all(&journal, None, &mut |_| {}).await.expect("verify");
    assert!(verified.broken.is_empty(), "a fresh journal verifies");

    let (peer_pool, _) = fresh_database(40).await.expect("peer database");
    let per_deal = events as usize / deals;
    // esrs rebuilds deal by deal, so its rate does not depend on the count: it runs on at
    // most BENCH_PEER_DEALS deals (default 20,000) to keep the bench in minutes.
    let cap = std::env::var("BENCH_PEER_DEALS").ok().and_then(|s| s.parse().ok());
    let peer_deals = deals.min(cap.unwrap_or(20_000));
    let args = ["rebuild".into(), url_of(&peer_pool), peer_deals.to_string(), per_deal.to_string()];
    let esrs = peers::run("esrs", &args);
    let esrs_seconds = esrs.as_ref().and_then(|e| e["seconds"].as_f64());
    let esrs_events = esrs.as_ref().and_then(|e| e["events"].as_u64());

    let copy_rate = events as f64 / copy_seconds;
    let rebuild_rate = report.events as f64 / rebuild_seconds;
    println!("\nrebuild benchmark (embedded throwaway cluster, fsync off, scale {scale})");
    println!("{:<36} {:>10} {:>9} {:>14}", "workload", "events", "seconds", "events/s");
    println!(
        "{:<36} {:>10} {:>9.2} {:>14.0}",
        "raw COPY TO of the events", events, copy_seconds, copy_rate
    );
    println!(
        "{:<36} {:>10} {:>9.2} {:>14.0}",
        "rebuild status tables (swap incl.)", report.events, rebuild_seconds, rebuild_rate
    );
    println!(
        "{:<36} {:>10} {:>9.2} {:>14.0}",
        "check (rebuild into shadow + diff)",
        report.events,
        check_seconds,
        report.events as f64 / check_seconds
    );
    println!(
        "{:<36} {:>10} {:>9.2} {:>14.0}",
        "verify (chains, decoding, legality)",
        verified.events,
        verified.seconds,
        verified.events as f64 / verified.seconds
    );
    if let (Some(seconds), Some(peer_events)) = (esrs_seconds, esrs_events) {
        println!(
            "{:<36} {:>10} {:>9.2} {:>14.0}",
            "esrs PgRebuilder::by_aggregate_id",
            peer_events,
            seconds,
            peer_events as f64 / seconds
        );
    }
    println!("rebuild / raw COPY: {:.2} ({} streams)", rebuild_rate / copy_rate, report.streams);
    let esrs_ratio = esrs_seconds.zip(esrs_events).map(|(s, e)| rebuild_rate / (e as f64 / s));
    if let Some(ratio) = esrs_ratio {
        println!("rebuild / esrs PgRebuilder: {ratio:.1}x");
    }
    let json = serde_json::json!({
        "events": events, "streams": report.streams,
        "raw_copy_seconds": copy_seconds, "raw_copy_events_per_s": copy_rate,
        "rebuild_seconds": rebuild_seconds, "rounds": ROUNDS, "rebuild_events_per_s": rebuild_rate,
        "check_seconds": check_seconds, "ratio": rebuild_rate / copy_rate,
        "verify_seconds": verified.seconds, "verify_events_per_s": verified.events as f64 / verified.seconds,
        "esrs": esrs, "ratio_to_esrs": esrs_ratio,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(dir.join("rebuild.json"), serde_json::to_string_pretty(&json).expect("json"))
        .expect("write rebuild.json");
}
