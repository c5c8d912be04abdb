//! Asynchronous projections: they follow the journal in commit-safe order and keep their place
//! in `projection_checkpoints`, updated in the same transaction as their rows, so every event
//! is applied exactly once however often the projector stops and starts. `deal_transitions`
//! runs this way.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::SecondsFormat;
use futures::StreamExt;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::ProjectionError;
use super::fold::{StateTracker, Step, step_of};
use super::rebuild::{Progress, RebuildReport};
use super::table::{RowValues, SqlType as T, TableSpec};
use crate::events::{Checkpoint, Journal, RecordedEvent};

/// The name of the transitions projection (its checkpoint row).
pub const DEAL_TRANSITIONS: &str = "deal_transitions";

/// Events applied per transaction at most.
const BATCH: usize = 1_000;

/// How long a projector that lost the database waits before it resumes.
const RESUME_AFTER: Duration = Duration::from_secs(1);

/// `deal_transitions`: one row per transition.
pub static TRANSITIONS: TableSpec = TableSpec {
    name: "deal_transitions",
    rows_table: "deal_transitions",
    key: "stream_id",
    columns: &[
        ("stream_id", T::Uuid),
        ("version", T::Int),
        ("stream_type", T::Text),
        ("from_state", T::Text),
        ("to_state", T::Text),
        ("input", T::Text),
        ("event_type", T::Text),
        ("recorded_at", T::Timestamp),
        ("correlation_id", T::Uuid),
        ("causation_id", T::Uuid),
        ("position", T::BigInt),
    ],
};

fn transition_row(event: &RecordedEvent, step: Step) -> RowValues {
    vec![
        Some(event.stream_id.to_string()),
        Some(event.version.to_string()),
        Some(event.stream_type.clone()),
        Some(step.from.to_owned()),
        Some(step.to.to_owned()),
        Some(step.input.to_owned()),
        Some(event.event_type.clone()),
        Some(event.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true)),
        event.correlation_id.map(|u| u.to_string()),
        event.causation_id.map(|u| u.to_string()),
        Some(event.position.to_string()),
    ]
}

/// Where projection `name` is; the start of the journal if it never ran.
pub async fn checkpoint(pool: &PgPool, name: &str) -> Result<Checkpoint, ProjectionError> {
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT tx_id, position FROM projection_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(row.map_or(Checkpoint::START, |(tx_id, position)| Checkpoint {
        tx_id: tx_id as u64,
        position,
    }))
}

/// Locks the checkpoint row of `name` for this transaction (creating it at the start if
/// missing) and returns it.
async fn lock_checkpoint(
    conn: &mut PgConnection,
    name: &str,
) -> Result<Checkpoint, ProjectionError> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (name, tx_id, position) VALUES ($1, 0, 0) \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .execute(&mut *conn)
    .await?;
    let (tx_id, position): (i64, i64) = sqlx::query_as(
        "SELECT tx_id, position FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Checkpoint { tx_id: tx_id as u64, position })
}

async fn save_checkpoint(
    conn: &mut PgConnection,
    name: &str,
    at: Checkpoint,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE projection_checkpoints SET tx_id = $2, position = $3, updated_at = now() \
         WHERE name = $1",
    )
    .bind(name)
    .bind(at.tx_id as i64)
    .bind(at.position)
    .execute(conn)
    .await?;
    Ok(())
}

/// An asynchronous projection: it turns batches of events, in commit-safe order, into rows of
/// its own tables. The [`Projector`] runs it and keeps its checkpoint in the same transaction.
pub trait Projection: Send {
    /// The projection's stable name (its `projection_checkpoints` row).
    fn name(&self) -> &'static str;

    /// Writes the rows for `batch` on `conn`, inside the runner's transaction. Applying a batch
    /// again after a crash must not duplicate rows (the checkpoint makes that rare; the rows'
    /// keys make it harmless).
    fn apply<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
        batch: &'a [RecordedEvent],
    ) -> impl std::future::Future<Output = Result<(), ProjectionError>> + Send + 'a;
}

/// `deal_transitions`: one row per transition, with the states before and after.
#[derive(Debug)]
pub struct DealTransitions {
    tracker: StateTracker,
}

impl DealTransitions {
    /// The projection, reading missing stream history from `journal`.
    pub fn new(journal: Journal) -> Self {
        Self { tracker: StateTracker::new(journal) }
    }
}

impl Projection for DealTransitions {
    fn name(&self) -> &'static str {
        DEAL_TRANSITIONS
    }

    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        batch: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let mut rows = Vec::with_capacity(batch.len());
        for event in batch {
            let step = self.tracker.step(event).await?;
            rows.push(transition_row(event, step));
        }
        TRANSITIONS.copy_into(conn, TRANSITIONS.name, rows.iter()).await?;
        Ok(())
    }
}

/// Runs a [`Projection`]: follows the journal from the projection's checkpoint and applies each
/// batch in one transaction with the new checkpoint, so every event is applied exactly once.
#[derive(Debug)]
pub struct Projector<P: Projection> {
    journal: Journal,
    projection: P,
}

/// The runner of `deal_transitions`.
pub type TransitionsProjector = Projector<DealTransitions>;

impl TransitionsProjector {
    /// The `deal_transitions` projector on `journal`.
    pub fn new(journal: Journal) -> Self {
        Projector::of(journal.clone(), DealTransitions::new(journal))
    }
}

impl<P: Projection> Projector<P> {
    /// A runner for `projection` on `journal`.
    pub fn of(journal: Journal, projection: P) -> Self {
        Self { journal, projection }
    }

    /// Applies one batch that follows `expected`, in one transaction with the checkpoint.
    /// Returns false, writing nothing, when the checkpoint moved under us (another projector
    /// or a rebuild): the caller resumes from the stored checkpoint.
    async fn apply(
        &mut self,
        expected: Checkpoint,
        batch: &[RecordedEvent],
    ) -> Result<bool, ProjectionError> {
        let Some(last) = batch.last() else { return Ok(true) };
        let name = self.projection.name();
        let mut tx = self.journal.pool().begin().await?;
        if lock_checkpoint(&mut tx, name).await? != expected {
            tx.rollback().await?;
            return Ok(false);
        }
        self.projection.apply(&mut tx, batch).await?;
        save_checkpoint(&mut tx, name, last.checkpoint()).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Applies everything committed so far; returns how many events.
    pub async fn catch_up(&mut self) -> Result<u64, ProjectionError> {
        let mut applied = 0u64;
        loop {
            let at = checkpoint(self.journal.pool(), self.projection.name()).await?;
            let batch = self.journal.read_all(at, BATCH as u32).await?;
            if batch.is_empty() {
                return Ok(applied);
            }
            if self.apply(at, &batch).await? {
                applied += batch.len() as u64;
            }
        }
    }

    /// Follows the journal until `stop` resolves, applying events as they commit, in batches
    /// of what is ready. When the database goes away (a restart, a failover, the network), it
    /// waits and resumes from its checkpoint: nothing is lost or applied twice, since each
    /// batch commits with its checkpoint. Only errors that need an operator (an event that
    /// does not decode or replay) end it.
    pub async fn run(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), ProjectionError> {
        tokio::pin!(stop);
        loop {
            match self.follow(stop.as_mut()).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    tracing::warn!(
                        projection = self.projection.name(),
                        error = %e,
                        "the projector lost the database; resuming from its checkpoint"
                    );
                    tokio::select! {
                        () = &mut stop => return Ok(()),
                        () = tokio::time::sleep(RESUME_AFTER) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Follows the journal from the stored checkpoint until `stop` resolves (`Ok`) or an
    /// error.
    async fn follow(
        &mut self,
        mut stop: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<(), ProjectionError> {
        loop {
            let at = checkpoint(self.journal.pool(), self.projection.name()).await?;
            let events = self.journal.subscribe(at).await?.ready_chunks(BATCH);
            tokio::pin!(events);
            let mut expected = at;
            loop {
                let next = tokio::select! {
                    next = events.next() => next,
                    () = &mut stop => return Ok(()),
                };
                let Some(chunk) = next else { break };
                let batch = chunk.into_iter().collect::<Result<Vec<_>, _>>()?;
                if !self.apply(expected, &batch).await? {
                    break; // the checkpoint moved: resubscribe from it
                }
                expected = batch.last().map_or(expected, RecordedEvent::checkpoint);
            }
        }
    }
}

/// Rebuilds `deal_transitions` from the journal: computed in memory, copied into a shadow
/// table, swapped in with the checkpoint in one transaction.
pub async fn rebuild_transitions(
    journal: &Journal,
    progress: Progress<'_>,
) -> Result<RebuildReport, ProjectionError> {
    let started = Instant::now();
    let mut states: HashMap<Uuid, &'static str> = HashMap::new();
    let mut rows = Vec::new();
    // Archived streams first (each is archived whole), then the hot journal.
    let mut archived_at = Checkpoint::START;
    let mut at = Checkpoint::START;
    loop {
        let (batch, hot) = match journal.read_archived(archived_at, 10_000).await? {
            batch if !batch.is_empty() => (batch, false),
            _ => (journal.read_all(at, 10_000).await?, true),
        };
        let Some(last) = batch.last() else { break };
        if hot {
            at = last.checkpoint();
        } else {
            archived_at = last.checkpoint();
        }
        for event in &batch {
            let from = states.get(&event.stream_id).copied().unwrap_or_default();
            let step = step_of(&event.stream_type, from, event.into())?;
            states.insert(event.stream_id, step.to);
            rows.push(transition_row(event, step));
        }
        progress(rows.len() as u64);
    }
    let mut tx = journal.pool().begin().await?;
    sqlx::query("CREATE TEMP TABLE shadow_deal_transitions (LIKE deal_transitions) ON COMMIT DROP")
        .execute(&mut *tx)
        .await?;
    TRANSITIONS.copy_into(&mut tx, "shadow_deal_transitions", rows.iter()).await?;
    lock_checkpoint(&mut tx, DEAL_TRANSITIONS).await?;
    sqlx::raw_sql(
        "DELETE FROM deal_transitions; \
         INSERT INTO deal_transitions SELECT * FROM shadow_deal_transitions",
    )
    .execute(&mut *tx)
    .await?;
    save_checkpoint(&mut tx, DEAL_TRANSITIONS, at).await?;
    tx.commit().await?;
    Ok(RebuildReport {
        events: rows.len() as u64,
        caught_up: 0,
        streams: states.len() as u64,
        rows: vec![(TRANSITIONS.name, rows.len() as u64)],
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// How far a projection is behind the journal.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Lag {
    /// The projection.
    pub name: String,
    /// Its checkpoint.
    pub checkpoint: Checkpoint,
    /// Events in the journal after it.
    pub events_behind: i64,
    /// Seconds since it last advanced.
    pub seconds_since_update: Option<f64>,
}

/// The lag of every asynchronous projection.
pub async fn lags(pool: &PgPool) -> Result<Vec<Lag>, ProjectionError> {
    let mut lags = Vec::new();
    for name in [DEAL_TRANSITIONS] {
        let at = checkpoint(pool, name).await?;
        let behind: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE (tx_id, position) > ($1::text::xid8, $2)",
        )
        .bind(at.tx_id.to_string())
        .bind(at.position)
        .fetch_one(pool)
        .await?;
        let age: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - updated_at)::float8 FROM projection_checkpoints \
             WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(pool)
        .await?;
        lags.push(Lag {
            name: name.to_owned(),
            checkpoint: at,
            events_behind: behind,
            seconds_since_update: age,
        });
    }
    Ok(lags)
}

/// Waits until the projector has applied everything committed before this call.
pub async fn wait_until_caught_up(
    pool: &PgPool,
    timeout: Duration,
) -> Result<bool, ProjectionError> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if lags(pool).await?.iter().all(|l| l.events_behind == 0) {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(false)
}
