//! Verifying the whole journal: every stream's hash chain, every event's decoding, every
//! transition's legality. Streams are read in (stream, version) order and checked in parallel
//! on blocking worker threads.

use std::time::Instant;

use futures::TryStreamExt;
use serde::Serialize;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::AuditError;
use crate::events::journal::{EVENT_COLUMNS, decode_row};
use crate::events::{Journal, RecordedEvent, chain};
use crate::projections::fold::AnyDeal;

/// A stream whose chain or history does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenStream {
    /// The stream.
    pub stream_id: Uuid,
    /// Its type, as stored in its first event.
    pub stream_type: String,
    /// The first version that fails.
    pub version: u32,
    /// Why.
    pub reason: String,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    /// Streams checked.
    pub streams: u64,
    /// Events checked.
    pub events: u64,
    /// Every broken stream, with its first bad version.
    pub broken: Vec<BrokenStream>,
    /// Wall time, in seconds.
    pub seconds: f64,
}

/// Events handed to one worker at a time.
const CHUNK_EVENTS: usize = 20_000;

/// Checks one stream: chain first (it covers tampering), then decoding and legality.
pub fn check_stream(events: &[RecordedEvent]) -> Option<BrokenStream> {
    let first = events.first()?;
    let broken = |version, reason: String| {
        Some(BrokenStream {
            stream_id: first.stream_id,
            stream_type: first.stream_type.clone(),
            version,
            reason,
        })
    };
    if let Some(bad) = chain::first_break(events) {
        return broken(bad.version, format!("hash chain: {:?}", bad.reason));
    }
    if let Some(moved) = events.iter().find(|e| e.stream_type != first.stream_type) {
        return broken(moved.version, format!("stream type changed to {}", moved.stream_type));
    }
    let mut deal = match AnyDeal::new(&first.stream_type, first.stream_id) {
        Ok(deal) => deal,
        Err(e) => return broken(first.version, e.to_string()),
    };
    for event in events {
        if let Err(e) = deal.apply(event.into()) {
            return broken(event.version, e.to_string());
        }
    }
    None
}

fn check_chunk(streams: Vec<Vec<RecordedEvent>>) -> Vec<BrokenStream> {
    streams.iter().filter_map(|s| check_stream(s)).collect()
}

/// Verifies every stream (or, with `since`, every stream with an event at or after that
/// position). `progress` is told the events read so far.
pub async fn verify_all(
    journal: &Journal,
    since: Option<i64>,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<VerifyReport, AuditError> {
    let started = Instant::now();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let sql = match since {
        None => format!("SELECT {EVENT_COLUMNS} FROM journal_events ORDER BY stream_id, version"),
        Some(_) => format!(
            "SELECT {EVENT_COLUMNS} FROM journal_events WHERE stream_id IN \
             (SELECT DISTINCT stream_id FROM journal_events WHERE position >= $1) ORDER BY stream_id, version"
        ),
    };
    let mut conn = journal.pool().acquire().await?;
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    if let Some(position) = since {
        query = query.bind(position);
    }
    let mut rows = query.fetch(&mut *conn);
    let mut tasks = JoinSet::new();
    let mut broken = Vec::new();
    let (mut events, mut streams) = (0u64, 0u64);
    let mut chunk: Vec<Vec<RecordedEvent>> = Vec::new();
    let mut chunk_events = 0usize;
    let mut current: Vec<RecordedEvent> = Vec::new();
    while let Some(row) = rows.try_next().await? {
        let event = decode_row(&row)?;
        events += 1;
        if current.last().is_some_and(|e| e.stream_id != event.stream_id) {
            chunk_events += current.len();
            chunk.push(std::mem::take(&mut current));
            streams += 1;
            if chunk_events >= CHUNK_EVENTS {
                let work = std::mem::take(&mut chunk);
                chunk_events = 0;
                tasks.spawn_blocking(move || check_chunk(work));
                progress(events);
                while tasks.len() > workers * 2 {
                    if let Some(done) = tasks.join_next().await {
                        broken.extend(done.map_err(|e| AuditError::Worker(e.to_string()))?);
                    }
                }
            }
        }
        current.push(event);
    }
    if !current.is_empty() {
        chunk.push(current);
        streams += 1;
    }
    tasks.spawn_blocking(move || check_chunk(chunk));
    while let Some(done) = tasks.join_next().await {
        broken.extend(done.map_err(|e| AuditError::Worker(e.to_string()))?);
    }
    progress(events);
    broken.sort_by_key(|b| b.stream_id);
    Ok(VerifyReport { streams, events, broken, seconds: started.elapsed().as_secs_f64() })
}
