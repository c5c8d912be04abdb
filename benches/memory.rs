//! `cargo bench --bench memory`: peak resident memory of `dealledger serve` (the release
//! binary) with 100k storage deals in flight. The ledger is filled first: provider deals played
//! in memory from proposal to Sealing (the state that waits for the chain to activate the
//! deal), each recorded in one transaction with its status row and the one effect of its last
//! transition (watch-activation) pending in the outbox, as a node that took them would have
//! left them. Then the node starts on that database with the devnet's clock running (an
//! epoch every 200 ms): its projector folds the whole journal into `deal_transitions`, and its
//! runner checks every deal's activation watch at each new head. Its VmHWM/VmRSS (from /proc) are sampled for `BENCH_MEMORY_SECONDS` (default 60) or
//! until the projector caught up and no effect is pending claim, then it is stopped with
//! SIGTERM. Prints a table and writes `target/bench/memory.json`. `BENCH_SCALE` (default 1.0 =
//! 100k deals) scales it. Target: peak RSS under 512 MiB.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dealledger::db::testing::{fresh_database, url_of};
use dealledger::deals::Deals;
use dealledger::deals::script::storage_deal_commands;
use dealledger::domain::ChainEpoch;
use dealledger::domain::storage::ClientDealProposal;
use dealledger::events::Journal;
use dealledger::fsm::fixtures::{NOW, client_key, proposal, provider_key};
use dealledger::fsm::storage_provider::StorageProvider;
use dealledger::fsm::{Deal, DecideContext, Machine};
use dealledger::projections::projector::{DEAL_TRANSITIONS, checkpoint};

/// Provider commands that take a deal from its proposal to Sealing.
const TO_SEALING: usize = 11;

/// Records `deals` provider deals, in Sealing, from 16 writers.
async fn fill(deals: &Deals, count: usize) {
    let per_writer = count.div_ceil(16);
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let deals = deals.clone();
            tokio::spawn(async move {
                let ctx = DecideContext { epoch: ChainEpoch(NOW), ..DecideContext::default() };
                for n in (w * per_writer)..((w + 1) * per_writer).min(count) {
                    let mut terms = proposal();
                    terms.label = format!("memory bench deal {n}");
                    let signed = ClientDealProposal::sign(terms, &client_key());
                    let stream = Deals::storage_stream_id(StorageProvider::NAME, &signed);
                    let (_, commands) = storage_deal_commands(signed, &provider_key());
                    let new = Deal::<StorageProvider>::new(stream);
                    let commands = commands.into_iter().take(TO_SEALING);
                    let mut decision = new.decide_all(commands, &ctx).expect("a legal path");
                    // Only the last transition's effect is still to be performed.
                    let last = decision.deal.version;
                    decision.effects.retain(|(version, _)| *version == last);
                    deals.record(&new, &decision, None).await.expect("recorded");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
}

/// (VmHWM, VmRSS) of `pid` in KiB.
fn memory_of(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

#[tokio::main]
async fn main() {
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let count = ((100_000.0 * scale) as usize).max(100);
    let seconds: u64 =
        std::env::var("BENCH_MEMORY_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let (pool, _) = fresh_database(20).await.expect("benchmark database");
    let deals = Deals::new(Journal::new(pool.clone()));
    let filled = Instant::now();
    fill(&deals, count).await;
    let in_flight: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM storage_deals WHERE state = 'Sealing' AND NOT terminal",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&pool).await.expect("count");
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE completed_at IS NULL")
        .fetch_one(&pool)
        .await
        .expect("count");
    eprintln!(
        "filled {in_flight} deals in flight, {pending} effects pending ({events} events) in {:.1} s",
        filled.elapsed().as_secs_f64()
    );
    let last_position: i64 = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(&pool)
        .await
        .expect("last position");
    sqlx::query("VACUUM ANALYZE").execute(&pool).await.expect("vacuum");

    // When the node starts on that ledger
    let home = dealledger::db::testing::scratch_dir("memory").expect("a scratch directory");
    std::fs::create_dir_all(&home).expect("home");
    let log = std::fs::File::create(home.join("serve.log")).expect("log");
    let mut node = Command::new(env!("CARGO_BIN_EXE_dealledger"))
        .args(["serve", "--database-url", &url_of(&pool)])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--api-listen", "127.0.0.1:0"])
        // The devnet's clock runs, so every new head re-arms the deals' activation watches.
        .args(["--devnet-epoch-ms", "200"])
        .env("DEALLEDGER_HOME", &home)
        .env("DEALLEDGER_API_TOKEN", "memory-bench-token-0123")
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().expect("log"))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start dealledger serve");
    let started = Instant::now();
    let (mut peak, mut last) = (0u64, 0u64);
    let mut caught_up_at = None;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if node.try_wait().expect("node status").is_some() {
            panic!(
                "the node stopped:\n{}",
                std::fs::read_to_string(home.join("serve.log")).unwrap_or_default()
            );
        }
        if let Some((hwm, rss)) = memory_of(node.id()) {
            (peak, last) = (peak.max(hwm), rss);
        }
        // (an index lookup, not a count: the sampling must not load the server it measures)
        if caught_up_at.is_none()
            && let Ok(at) = checkpoint(&pool, DEAL_TRANSITIONS).await
            && at.position >= last_position
        {
            caught_up_at = Some(started.elapsed().as_secs_f64());
        }
    }
    let _ = Command::new("kill").args(["-TERM", &node.id().to_string()]).status();
    let stopped = node.wait().expect("node exit");
    let transitions: i64 = sqlx::query_scalar("SELECT count(*) FROM deal_transitions")
        .fetch_one(&pool)
        .await
        .expect("count");
    let _ = std::fs::remove_dir_all(&home);

    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "\nmemory benchmark: dealledger serve (release) on a ledger of {in_flight} deals in flight"
    );
    println!("{:<44} {:>12}", "figure", "value");
    println!("{:<44} {:>12}", "deals in flight (Sealing)", in_flight);
    println!("{:<44} {:>12}", "events in the journal", events);
    println!("{:<44} {:>12.1}", "peak RSS (VmHWM), MiB", mib(peak));
    println!("{:<44} {:>12.1}", "RSS at the end, MiB", mib(last));
    println!("{:<44} {:>12}", "seconds sampled", seconds);
    let caught = caught_up_at.map_or("not yet".to_string(), |s| format!("{s:.1}"));
    println!("{:<44} {:>12}", "projector caught up after, s", caught);
    println!("{:<44} {:>12}", "deal_transitions rows at the end", transitions);
    println!("{:<44} {:>12}", "effects pending at the start (watches)", pending);
    println!("{:<44} {:>12}", "node exit after SIGTERM", format!("{stopped}"));
    println!("peak RSS / 512 MiB target: {:.2}", mib(peak) / 512.0);
    let json = serde_json::json!({
        "deals_in_flight": in_flight, "events": events, "peak_rss_mib": mib(peak),
        "final_rss_mib": mib(last), "seconds": seconds, "projector_caught_up_s": caught_up_at,
        "deal_transitions": transitions, "effects_pending": pending,
        "target_mib": 512,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(dir.join("memory.json"), serde_json::to_string_pretty(&json).expect("json"))
        .expect("write memory.json");
}
