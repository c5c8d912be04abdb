//! `cargo bench --bench journal`: journal throughput beside the same workload in plain SQL on
//! the same server. Prints a table and writes `target/bench/journal.json`.
//!
//! The server is the throwaway test cluster (fsync off) unless `DATABASE_URL` names another,
//! so the figures measure the ledger's own cost per event, not the disk. The plain table has the
//! journal's columns and indexes and is written through a default sqlx pool, so the ratio is
//! what the ledger's checks cost: the CID chain, the in-statement head check, the commit
//! notifications, and the ledger pool's check of every released connection (`db::pool_options`). Sizes scale with `BENCH_SCALE`
//! (default 1.0). The two full reads run after a `VACUUM` of the filled journal, alternating,
//! three times each; the table shows each one's median.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use uuid::Uuid;

use dealledger::db::testing::fresh_database;
use dealledger::events::{Checkpoint, Journal, NewEvent};

const PLAIN_TABLE: &str = "
CREATE TABLE plain_events (
    position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id uuid NOT NULL, stream_type text NOT NULL, version integer NOT NULL,
    event_type text NOT NULL, schema_version smallint NOT NULL, payload bytea NOT NULL,
    recorded_at timestamptz NOT NULL, correlation_id uuid, causation_id uuid,
    tx_id xid8 NOT NULL DEFAULT pg_current_xact_id(), prev_cid bytea, cid bytea NOT NULL,
    UNIQUE (stream_id, version));
CREATE INDEX ON plain_events (tx_id, position)";

const PLAIN_INSERT: &str = "INSERT INTO plain_events (stream_id, stream_type, version, \
    event_type, schema_version, payload, recorded_at, prev_cid, cid) \
    VALUES ($1, $2, $3, $4, 1, $5, now(), $6, $6)";

struct Row {
    workload: &'static str,
    events: u64,
    ledger: f64,
    plain: f64,
    plain_label: &'static str,
}

fn payload() -> Vec<u8> {
    vec![7u8; 120]
}

fn per_second(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

async fn ledger_single(journal: &Journal, writers: usize, per_writer: usize) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let journal = journal.clone();
            tokio::spawn(async move {
                let stream = Uuid::now_v7();
                let event = [NewEvent::new("deal-proposed", 1, payload())];
                for version in 0..per_writer as u32 {
                    journal.append(stream, "bench", version, &event).await.expect("append");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    per_second((writers * per_writer) as u64, start.elapsed())
}

async fn plain_single(pool: &PgPool, writers: usize, per_writer: usize) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let stream = Uuid::now_v7();
                for version in 1..=per_writer as i32 {
                    sqlx::query(PLAIN_INSERT)
                        .bind(stream)
                        .bind("bench")
                        .bind(version)
                        .bind("deal-proposed")
                        .bind(payload())
                        .bind(vec![1u8; 36])
                        .execute(&pool)
                        .await
                        .expect("plain insert");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    per_second((writers * per_writer) as u64, start.elapsed())
}

async fn ledger_batches(journal: &Journal, batches: usize, size: usize) -> f64 {
    let events: Vec<NewEvent> =
        (0..size).map(|_| NewEvent::new("data-transfer-progressed", 1, payload())).collect();
    let start = Instant::now();
    let stream = Uuid::now_v7();
    for b in 0..batches {
        journal.append(stream, "bench", (b * size) as u32, &events).await.expect("append");
    }
    per_second((batches * size) as u64, start.elapsed())
}

async fn plain_copy_batches(pool: &PgPool, batches: usize, size: usize) -> f64 {
    let hex_payload = hex::encode(payload());
    let start = Instant::now();
    let stream = Uuid::now_v7();
    for b in 0..batches {
        let mut text = String::with_capacity(size * 400);
        for i in 0..size {
            let version = b * size + i + 1;
            text.push_str(&format!(
                "{stream}\tbench\t{version}\tdata-transfer-progressed\t1\t\\\\x{hex_payload}\t\
                 2026-01-01 00:00:00+00\t\\\\x{}\n",
                "01".repeat(36)
            ));
        }
        let mut conn = pool.acquire().await.expect("connection");
        let mut copy = conn
            .copy_in_raw(
                "COPY plain_events (stream_id, stream_type, version, event_type, \
                 schema_version, payload, recorded_at, cid) FROM STDIN",
            )
            .await
            .expect("copy");
        copy.send(text.as_bytes()).await.expect("copy data");
        copy.finish().await.expect("copy finish");
    }
    per_second((batches * size) as u64, start.elapsed())
}

async fn fill(journal: &Journal, total: usize) {
    let streams = 32usize;
    let per_append = 1_000usize;
    let tasks: Vec<_> = (0..streams)
        .map(|s| {
            let journal = journal.clone();
            tokio::spawn(async move {
                let stream = Uuid::now_v7();
                let events: Vec<NewEvent> =
                    (0..per_append).map(|_| NewEvent::new("deal-proposed", 1, payload())).collect();
                let appends =
                    total / streams / per_append + usize::from(s < total / per_append % streams);
                for a in 0..appends {
                    journal
                        .append(stream, "bench", (a * per_append) as u32, &events)
                        .await
                        .expect("fill");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("fill task");
    }
}

/// How many times each of the two full reads runs; the table shows the medians.
const READ_ROUNDS: usize = 3;

#[path = "shared/median.rs"]
mod median;
use median::median;

async fn ledger_read_all(journal: &Journal) -> (u64, f64) {
    let start = Instant::now();
    let mut after = Checkpoint::START;
    let mut read = 0u64;
    loop {
        let batch = journal.read_all(after, 10_000).await.expect("read_all");
        let Some(last) = batch.last() else { break };
        after = last.checkpoint();
        read += batch.len() as u64;
    }
    (read, per_second(read, start.elapsed()))
}

async fn plain_read_all(pool: &PgPool) -> f64 {
    type PlainRow = (
        i64,
        Uuid,
        String,
        i32,
        String,
        i16,
        Vec<u8>,
        chrono::DateTime<chrono::Utc>,
        Option<Vec<u8>>,
        Vec<u8>,
    );
    let start = Instant::now();
    let mut after = 0i64;
    let mut read = 0u64;
    loop {
        let batch: Vec<PlainRow> = sqlx::query_as(
            "SELECT position, stream_id, stream_type, version, event_type, schema_version, \
             payload, recorded_at, prev_cid, cid FROM events WHERE position > $1 \
             ORDER BY position LIMIT 10000",
        )
        .bind(after)
        .fetch_all(pool)
        .await
        .expect("plain read");
        let Some(last) = batch.last() else { break };
        after = last.0;
        read += batch.len() as u64;
    }
    per_second(read, start.elapsed())
}

#[tokio::main]
async fn main() {
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let n = |base: usize| ((base as f64 * scale) as usize).max(1);
    let (pool, _) = fresh_database(40).await.expect("benchmark database");
    let journal = Journal::new(pool.clone());
    sqlx::raw_sql(PLAIN_TABLE).execute(&pool).await.expect("plain table");
    // Plain SQL gets a default sqlx pool: it pays none of the ledger's pool checks.
    let plain_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(40)
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .expect("plain pool");

    let mut rows = Vec::new();
    let single = n(5_000);
    rows.push(Row {
        workload: "append, 1 event/tx, 1 writer",
        events: single as u64,
        ledger: ledger_single(&journal, 1, single).await,
        plain: plain_single(&plain_pool, 1, single).await,
        plain_label: "INSERT",
    });
    let per_writer = n(500);
    rows.push(Row {
        workload: "append, 1 event/tx, 32 writers",
        events: (32 * per_writer) as u64,
        ledger: ledger_single(&journal, 32, per_writer).await,
        plain: plain_single(&plain_pool, 32, per_writer).await,
        plain_label: "INSERT",
    });
    let batches = n(300);
    rows.push(Row {
        workload: "append, 100 events/tx, 1 writer",
        events: (batches * 100) as u64,
        ledger: ledger_batches(&journal, batches, 100).await,
        plain: plain_copy_batches(&plain_pool, batches, 100).await,
        plain_label: "COPY",
    });
    let (read_pool, _) = fresh_database(4).await.expect("read database");
    let read_journal = Journal::new(read_pool.clone());
    fill(&read_journal, n(1_000_000)).await;
    // The first read of freshly written rows also sets their hint bits (and writes the pages
    // back), so whichever read went first paid for both. A vacuum does that once, as
    // autovacuum would on a live journal; then the two reads alternate and the medians count.
    sqlx::query("VACUUM (ANALYZE) events").execute(&read_pool).await.expect("vacuum");
    let (mut ledger_rates, mut plain_rates, mut read) = (Vec::new(), Vec::new(), 0);
    for _ in 0..READ_ROUNDS {
        let (events, rate) = ledger_read_all(&read_journal).await;
        read = events;
        ledger_rates.push(rate);
        plain_rates.push(plain_read_all(&read_pool).await);
    }
    println!("read_all rounds (events/s): ledger {ledger_rates:.0?}, plain {plain_rates:.0?}");
    rows.push(Row {
        workload: "read_all (commit-safe order)",
        events: read,
        ledger: median(&mut ledger_rates),
        plain: median(&mut plain_rates),
        plain_label: "SELECT by position",
    });

    println!("\njournal benchmark (server: {}, scale {scale})", server_label());
    println!(
        "{:<34} {:>9} {:>14} {:>14} {:>7}  baseline",
        "workload", "events", "ledger ev/s", "plain ev/s", "ratio"
    );
    for row in &rows {
        println!(
            "{:<34} {:>9} {:>14.0} {:>14.0} {:>7.2}  {}",
            row.workload,
            row.events,
            row.ledger,
            row.plain,
            row.ledger / row.plain,
            row.plain_label
        );
    }
    let json: Vec<_> = rows
        .iter()
        .map(|r| {
            serde_json::json!({"workload": r.workload, "events": r.events,
                "ledger_events_per_s": r.ledger, "plain_events_per_s": r.plain,
                "ratio": r.ledger / r.plain, "baseline": r.plain_label})
        })
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    std::fs::write(dir.join("journal.json"), serde_json::to_string_pretty(&json).expect("json"))
        .expect("write journal.json");
    println!("written to target/bench/journal.json");
}

fn server_label() -> &'static str {
    if std::env::var("DATABASE_URL").is_ok() {
        "DATABASE_URL"
    } else {
        "embedded throwaway cluster, fsync off"
    }
}
