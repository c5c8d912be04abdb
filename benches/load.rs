//! `cargo bench --bench load`: how long loading one deal takes (replaying its stream through
//! its machine) as the stream grows: 10, 100, 1,000 and 10,000 events per stream, p50 and p99
//! over repeated loads. A storage provider deal in `Transferring` takes a progress event per
//! step, so a long transfer is the realistic long stream. Writes `target/bench/load.json`.

use std::time::Instant;

use uuid::Uuid;

use dealledger::db::testing::fresh_database;
use dealledger::deals::Deals;
use dealledger::domain::storage::StorageDeal;
use dealledger::events::{EventCodec, Journal, NewEvent};
use dealledger::fsm::fixtures::{provider_key, signed_proposal};
use dealledger::fsm::storage_provider::{StorageProvider, StorageProviderEvent as E};

/// A provider deal with `events` events: received, validated, accepted, transfer started,
/// then progress.
async fn fill(journal: &Journal, events: usize) -> Uuid {
    let stream = Uuid::now_v7();
    let proposal = signed_proposal();
    let mut all = vec![
        E::ProposalReceived { proposal: Box::new(proposal.clone()) },
        E::ProposalValidated,
        E::DealAccepted { deal: Box::new(StorageDeal::sign(proposal, &provider_key())) },
        E::DataTransferStarted,
    ];
    let mut bytes = 0u64;
    while all.len() < events {
        bytes += 1 << 20;
        all.push(E::DataTransferProgressed { bytes });
    }
    let encoded: Vec<NewEvent> =
        all.iter().map(|e| EventCodec::encode(e).expect("encodes")).collect();
    let mut version = 0u32;
    for batch in encoded.chunks(1_000) {
        journal.append(stream, "storage_provider", version, batch).await.expect("append");
        version += batch.len() as u32;
    }
    stream
}

#[path = "shared/percentile.rs"]
mod percentile;
use percentile::percentile;

#[tokio::main]
async fn main() {
    let (pool, _) = fresh_database(4).await.expect("benchmark database");
    let journal = Journal::new(pool);
    let deals = Deals::new(journal.clone());
    let mut rows = Vec::new();
    for events in [10usize, 100, 1_000, 10_000] {
        let stream = fill(&journal, events).await;
        let loads = if events >= 10_000 { 30 } else { 200 };
        let mut times = Vec::with_capacity(loads);
        for _ in 0..loads {
            let at = Instant::now();
            let deal = deals.load::<StorageProvider>(stream).await.expect("loads");
            times.push(at.elapsed());
            assert_eq!(deal.version as usize, events);
        }
        times.sort();
        rows.push((events, percentile(&times, 0.5), percentile(&times, 0.99)));
    }
    println!("\nload benchmark: replay one storage provider deal");
    println!("{:>8} {:>10} {:>10} {:>16}", "events", "p50 ms", "p99 ms", "events/s (p50)");
    for (events, p50, p99) in &rows {
        println!(
            "{:>8} {:>10.3} {:>10.3} {:>16.0}",
            events,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            *events as f64 / p50.as_secs_f64()
        );
    }
    let json: Vec<_> = rows
        .iter()
        .map(|(events, p50, p99)| {
            serde_json::json!({"events": events, "p50_ms": p50.as_secs_f64() * 1e3,
                "p99_ms": p99.as_secs_f64() * 1e3})
        })
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(dir.join("load.json"), serde_json::to_string_pretty(&json).expect("json"))
        .expect("write load.json");
    println!("written to target/bench/load.json");
}
