//! The journal: append events to a stream with an expected version, read a stream back, read
//! the whole journal in commit-safe order, and follow it as it grows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use cid::Cid;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use super::chain::{self, CanonicalEvent, FirstBadVersion};
use super::envelope::{Checkpoint, NewEvent, RecordedEvent};
use super::error::JournalError;
use super::group::{GroupCommit, GroupOutcome, GroupedAppend, SharedRows};
use super::notifier::CommitNotifier;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The columns every read selects, in the order [`decode_row`] expects.
pub(crate) const EVENT_COLUMNS: &str = "position, stream_id, stream_type, version, event_type, \
    schema_version, payload, recorded_at, correlation_id, causation_id, \
    tx_id::text::bigint AS tx_id_bigint, prev_cid, cid";

/// [`EVENT_COLUMNS`] for binary COPY reads, which decode `tx_id` (xid8) from its 8 bytes
/// instead of having the server convert it to text and back for every row.
pub(crate) const COPY_EVENT_COLUMNS: &str = "position, stream_id, stream_type, version, \
    event_type, schema_version, payload, recorded_at, correlation_id, causation_id, tx_id, \
    prev_cid, cid";

/// Appends all events of one call in one statement. The `WHERE` clause re-checks, inside the
/// statement, that the event the new ones link to is really the stream's event at the expected
/// version; a concurrent writer that got there first makes the insert hit the
/// `(stream_id, version)` unique key instead.
const INSERT_EVENTS: &str = "
INSERT INTO events (stream_id, stream_type, version, event_type, schema_version, payload,
                    recorded_at, correlation_id, causation_id, prev_cid, cid)
SELECT $1, $2, e.version, e.event_type, e.schema_version, e.payload,
       $3, e.correlation_id, e.causation_id, e.prev_cid, e.cid
FROM UNNEST($4::int[], $5::text[], $6::smallint[], $7::bytea[], $8::uuid[], $9::uuid[],
            $10::bytea[], $11::bytea[])
     AS e(version, event_type, schema_version, payload, correlation_id, causation_id,
          prev_cid, cid)
WHERE ($12::int = 0 AND NOT EXISTS (SELECT 1 FROM events_archive a WHERE a.stream_id = $1))
   OR EXISTS (SELECT 1 FROM events h
              WHERE h.stream_id = $1 AND h.version = $12 AND h.cid = $13 AND h.stream_type = $2)";

/// [`INSERT_EVENTS`] for the common single-event append: the same parameters as scalars,
/// which PostgreSQL plans and executes measurably faster than a one-element `UNNEST`.
const INSERT_ONE_EVENT: &str = "
INSERT INTO events (stream_id, stream_type, version, event_type, schema_version, payload,
                    recorded_at, correlation_id, causation_id, prev_cid, cid)
SELECT $1::uuid, $2::text, $4::int, $5::text, $6::smallint, $7::bytea,
       $3::timestamptz, $8::uuid, $9::uuid, $10::bytea, $11::bytea
WHERE ($12::int = 0 AND NOT EXISTS (SELECT 1 FROM events_archive a WHERE a.stream_id = $1))
   OR EXISTS (SELECT 1 FROM events h
              WHERE h.stream_id = $1 AND h.version = $12 AND h.cid = $13 AND h.stream_type = $2)";

/// How many stream heads the journal remembers to save a read before appends.
const HEAD_CACHE_CAPACITY: usize = 65_536;

/// The last event of a stream: what the next append links to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHead {
    /// Version of the stream's last event (0 for a stream with no events).
    pub version: u32,
    /// CID of the stream's last event.
    pub cid: Option<Cid>,
    /// The stream's type.
    pub stream_type: String,
}

/// What an append wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The stream appended to.
    pub stream_id: Uuid,
    /// Version of the first event written.
    pub first_version: u32,
    /// The stream's new head.
    pub head: StreamHead,
    /// When the events were recorded (the same time for every event of one append).
    pub recorded_at: chrono::DateTime<Utc>,
}

/// Result of re-walking one stream's hash chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamVerification {
    /// The stream checked.
    pub stream_id: Uuid,
    /// How many events were read.
    pub events: usize,
    /// The first version where the chain fails, or `None` when the whole stream holds.
    pub first_bad: Option<FirstBadVersion>,
}

/// The append-only event journal on PostgreSQL. Cheap to clone; clones share the pool.
#[derive(Debug, Clone)]
pub struct Journal {
    pool: PgPool,
    /// Heads of recently appended streams. Only a hint: every append re-checks the head in the
    /// database inside its insert statement, so a stale entry costs a retry, never a bad link.
    heads: Arc<Mutex<HashMap<Uuid, StreamHead>>>,
    notifier: Arc<CommitNotifier>,
    group: Arc<GroupCommit>,
}

impl Journal {
    /// Applies pending migrations, then opens the journal.
    pub async fn open(pool: PgPool) -> Result<Self, JournalError> {
        MIGRATOR.run(&pool).await?;
        Ok(Self::new(pool))
    }

    /// Opens the journal on a database whose migrations are known to be applied.
    pub fn new(pool: PgPool) -> Self {
        Self { pool, heads: Arc::default(), notifier: Arc::default(), group: Arc::default() }
    }

    /// The migrations this build applies (for `db status`).
    pub fn migrator() -> &'static sqlx::migrate::Migrator {
        &MIGRATOR
    }

    /// The pool the journal writes through, for layers that open their own transactions.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Appends `events` to a stream, atomically, if the stream is at `expected_version`
    /// (0 = the stream must not exist yet).
    ///
    /// Errors: [`JournalError::Conflict`] when the stream has moved on, including when a racing
    /// writer wins; [`JournalError::StreamTypeMismatch`]; [`JournalError::EmptyAppend`]. In
    /// every error case nothing is written.
    pub async fn append(
        &self,
        stream_id: Uuid,
        stream_type: &str,
        expected_version: u32,
        events: &[NewEvent],
    ) -> Result<Appended, JournalError> {
        self.append_grouped(stream_id, stream_type, expected_version, events, None, |_| Vec::new())
            .await
    }

    /// Like [`Journal::append`], with writes that must commit exactly when the events do (the
    /// outbox, a status row) in the same statement: see [`AppendStatement`]. `companions` is
    /// called once per attempt to add them.
    pub async fn append_with(
        &self,
        stream_id: Uuid,
        stream_type: &str,
        expected_version: u32,
        events: &[NewEvent],
        companions: Companions<'_>,
    ) -> Result<Appended, JournalError> {
        self.append_on_pool(stream_id, stream_type, expected_version, events, Some(companions))
            .await
    }

    /// Like [`Journal::append_with`], and when the journal's statements are all in flight,
    /// sent together with other appends in one statement (group commit, see
    /// [`super::group`]): the same guarantees, at a fraction of the server's cost per append.
    ///
    /// `companions` and `shared` are the same writes in two forms: `companions` adds them to
    /// the statement of an append sent alone, `shared` (called only when the append joins a
    /// group, with the time its events are recorded at) gives their rows for a group's
    /// statement. They must write the same rows.
    pub async fn append_grouped(
        &self,
        stream_id: Uuid,
        stream_type: &str,
        expected_version: u32,
        events: &[NewEvent],
        companions: Option<Companions<'_>>,
        shared: impl FnOnce(chrono::DateTime<Utc>) -> Vec<SharedRows>,
    ) -> Result<Appended, JournalError> {
        if events.is_empty() {
            return Err(JournalError::EmptyAppend);
        }
        let alone =
            || self.append_on_pool(stream_id, stream_type, expected_version, events, companions);
        // A group's statement checks heads but cannot read them: an append whose head this
        // journal does not know runs alone, which reads it.
        let Some(prev) = self.known_link(stream_id, stream_type, expected_version, true) else {
            return alone().await;
        };
        if let Some(_slot) = self.group.try_alone(&self.pool) {
            return alone().await;
        }
        let rows = AppendRows::build(stream_id, stream_type, expected_version, prev, events);
        let grouped = GroupedAppend {
            stream_id,
            stream_type: stream_type.to_owned(),
            versions: rows.versions,
            prev_cids: rows.prev_cids,
            cids: rows.cids,
            recorded_at: rows.recorded_at,
            events: events.to_vec(),
            shared: shared(rows.recorded_at),
        };
        match self.group.join(&self.pool, grouped).await {
            GroupOutcome::Appended => {
                self.committed(&rows.appended);
                Ok(rows.appended)
            }
            GroupOutcome::TryAlone => alone().await,
            GroupOutcome::Lost => Err(JournalError::Database(sqlx::Error::WorkerCrashed)),
        }
    }

    /// How many appends this journal (and its clones) wrote as part of a group's statement
    /// rather than alone. A group whose statement fails is retried append by append, so the
    /// appends still succeed with this count standing still: it is how an operator, or a
    /// test, sees that group commit is working rather than always falling back.
    pub fn appended_in_groups(&self) -> u64 {
        self.group.appended()
    }

    async fn append_on_pool(
        &self,
        stream_id: Uuid,
        stream_type: &str,
        expected_version: u32,
        events: &[NewEvent],
        companions: Option<Companions<'_>>,
    ) -> Result<Appended, JournalError> {
        let mut conn = self.pool.acquire().await?;
        let appended = self
            .append_on(&mut conn, stream_id, stream_type, expected_version, events, companions)
            .await?;
        crate::db::release_clean(conn);
        // The connection is back in the pool before a conflict's version is read: appends
        // that all conflict at once must not each hold one connection and wait for another.
        let Ok(appended) = appended else {
            return Err(self.conflict_now(stream_id, expected_version).await);
        };
        self.committed(&appended);
        Ok(appended)
    }

    /// Like [`Journal::append`], inside a transaction the caller owns, so that projection rows
    /// and outbox entries commit or roll back together with the events. On error the caller
    /// must roll the transaction back (a conflict aborts it). After a successful commit the
    /// caller may pass the result to [`Journal::committed`] to save the next append a read.
    pub async fn append_in_tx(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        stream_id: Uuid,
        stream_type: &str,
        expected_version: u32,
        events: &[NewEvent],
    ) -> Result<Appended, JournalError> {
        match self.append_on(tx, stream_id, stream_type, expected_version, events, None).await? {
            Ok(appended) => Ok(appended),
            Err(Stale) => Err(self.conflict_now(stream_id, expected_version).await),
        }
    }

    /// Says that an append has committed: wakes followers and remembers the stream's head, so
    /// that the next append to it needs no read.
    pub fn committed(&self, appended: &Appended) {
        self.notifier.committed(&self.pool);
        let mut heads = self.heads.lock().unwrap_or_else(|poison| poison.into_inner());
        if heads.len() >= HEAD_CACHE_CAPACITY {
            heads.clear();
        }
        heads.insert(appended.stream_id, appended.head.clone());
    }

    fn forget(&self, stream_id: Uuid) {
        self.heads.lock().unwrap_or_else(|poison| poison.into_inner()).remove(&stream_id);
    }

    fn cached_head(&self, stream_id: Uuid) -> Option<StreamHead> {
        self.heads.lock().unwrap_or_else(|poison| poison.into_inner()).get(&stream_id).cloned()
    }

    async fn append_on(
        &self,
        conn: &mut PgConnection,
        stream_id: Uuid,
        stream_type: &str,
        expected_version: u32,
        events: &[NewEvent],
        companions: Option<Companions<'_>>,
    ) -> Result<Result<Appended, Stale>, JournalError> {
        if events.is_empty() {
            return Err(JournalError::EmptyAppend);
        }
        let mut trust_cache = true;
        loop {
            let prev = self
                .link_target(conn, stream_id, stream_type, expected_version, trust_cache)
                .await?;
            let rows = AppendRows::build(stream_id, stream_type, expected_version, prev, events);
            match rows
                .insert(conn, stream_id, stream_type, expected_version, prev, companions)
                .await
            {
                Ok(inserted) if inserted == events.len() as u64 => return Ok(Ok(rows.appended)),
                Ok(_) if trust_cache => {
                    // The cached head was stale: read the real one and try once more.
                    self.forget(stream_id);
                    trust_cache = false;
                }
                Ok(_) => return Ok(Err(Stale)),
                Err(JournalError::Database(e)) if is_version_collision(&e) => {
                    self.forget(stream_id);
                    return Ok(Err(Stale));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The CID the first new event links to, when it is known without reading the stream:
    /// none for a new stream, the cached head's for a stream this journal appended last at
    /// `expected_version` (if `trust_cache`). `None`: the head must be read.
    fn known_link(
        &self,
        stream_id: Uuid,
        stream_type: &str,
        expected_version: u32,
        trust_cache: bool,
    ) -> Option<Option<Cid>> {
        if expected_version == 0 {
            return Some(None);
        }
        if !trust_cache {
            return None;
        }
        self.cached_head(stream_id)
            .filter(|h| h.version == expected_version && h.stream_type == stream_type)
            .map(|h| h.cid)
    }

    /// The CID the first new event links to, after checking the stream is where the caller
    /// expects it.
    async fn link_target(
        &self,
        conn: &mut PgConnection,
        stream_id: Uuid,
        stream_type: &str,
        expected_version: u32,
        trust_cache: bool,
    ) -> Result<Option<Cid>, JournalError> {
        if let Some(link) = self.known_link(stream_id, stream_type, expected_version, trust_cache) {
            return Ok(link);
        }
        let head = read_head(conn, stream_id).await?;
        if head.version != expected_version {
            return Err(JournalError::Conflict {
                stream_id,
                expected: expected_version,
                actual: head.version,
            });
        }
        if head.stream_type != stream_type {
            return Err(JournalError::StreamTypeMismatch {
                stream_id,
                requested: stream_type.to_owned(),
                actual: head.stream_type,
            });
        }
        Ok(head.cid)
    }

    /// Builds the conflict error with the stream's committed version, read on a fresh
    /// connection because the caller's transaction may be aborted.
    async fn conflict_now(&self, stream_id: Uuid, expected: u32) -> JournalError {
        let actual = match self.pool.acquire().await {
            Ok(mut conn) => match read_head(&mut conn, stream_id).await {
                Ok(head) => head.version,
                Err(e) => return e,
            },
            Err(e) => return e.into(),
        };
        JournalError::Conflict { stream_id, expected, actual }
    }

    /// The stream's current head (version 0 and no CID when it has no events).
    pub async fn head(&self, stream_id: Uuid) -> Result<StreamHead, JournalError> {
        let mut conn = self.pool.acquire().await?;
        read_head(&mut conn, stream_id).await
    }

    /// The events of one stream from `from_version` (inclusive, 1 = all) in version order,
    /// from the hot journal or, for a stream that was archived, from `events_archive` (streams
    /// move there whole, so one of the two holds all of it).
    pub async fn read_stream(
        &self,
        stream_id: Uuid,
        from_version: u32,
    ) -> Result<Vec<RecordedEvent>, JournalError> {
        let from = i32::try_from(from_version).unwrap_or(i32::MAX);
        let hot = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND version >= $2 \
             ORDER BY version"
        );
        let mut conn = self.pool.acquire().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(hot))
            .bind(stream_id)
            .bind(from)
            .fetch_all(&mut *conn)
            .await?;
        if !rows.is_empty() {
            crate::db::release_clean(conn);
            return rows.iter().map(decode_row).collect();
        }
        let archived = format!(
            "SELECT {EVENT_COLUMNS} FROM events_archive WHERE stream_id = $1 AND version >= $2 \
             ORDER BY version"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(archived))
            .bind(stream_id)
            .bind(from)
            .fetch_all(&mut *conn)
            .await?;
        crate::db::release_clean(conn);
        rows.iter().map(decode_row).collect()
    }

    /// Up to `limit` archived events after `after`, in (transaction, position) order: the
    /// part of history rebuilds read before [`Journal::read_all`]. Every archived stream is
    /// archived whole, so per-stream order holds across the two.
    pub async fn read_archived(
        &self,
        after: Checkpoint,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, JournalError> {
        let select = format!(
            "SELECT {COPY_EVENT_COLUMNS} FROM events_archive \
             WHERE (tx_id, position) > ('{tx}'::xid8, {position}) \
             ORDER BY tx_id, position LIMIT {limit}",
            tx = after.tx_id,
            position = after.position,
        );
        super::binary_copy::read_events(&self.pool, &select).await
    }

    /// Up to `limit` events after `after`, in commit-safe order.
    ///
    /// Only events of transactions older than every transaction still running are returned,
    /// ordered by (transaction id, position). A transaction that took its positions early but
    /// commits late is therefore never skipped: its events are held back until it ends, and
    /// they sort before every event a reader could already have seen after them.
    pub async fn read_all(
        &self,
        after: Checkpoint,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, JournalError> {
        // Read through a binary COPY: about twice the rate of row-by-row decoding. COPY takes
        // no parameters; the statement is built from numbers only.
        let select = format!(
            "SELECT {COPY_EVENT_COLUMNS} FROM events \
             WHERE (tx_id, position) > ('{tx}'::xid8, {position}) \
               AND tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY tx_id, position LIMIT {limit}",
            tx = after.tx_id,
            position = after.position,
        );
        super::binary_copy::read_events(&self.pool, &select).await
    }

    /// Re-walks a stream's hash chain and reports the first version where it fails.
    pub async fn verify_stream(&self, stream_id: Uuid) -> Result<StreamVerification, JournalError> {
        let events = self.read_stream(stream_id, 1).await?;
        Ok(StreamVerification {
            stream_id,
            events: events.len(),
            first_bad: chain::first_break(&events),
        })
    }

    /// How many events the hot journal holds (archived ones not counted).
    pub async fn count(&self) -> Result<i64, JournalError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&self.pool).await?)
    }

    /// How many events were moved to the archive.
    pub async fn archived_count(&self) -> Result<i64, JournalError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM events_archive").fetch_one(&self.pool).await?)
    }
}

/// The rows of one append, with their CIDs chained, laid out as the columns `INSERT_EVENTS`
/// takes as arrays.
struct AppendRows<'a> {
    versions: Vec<i32>,
    prev_cids: Vec<Option<Vec<u8>>>,
    cids: Vec<Vec<u8>>,
    recorded_at: chrono::DateTime<Utc>,
    appended: Appended,
    events: &'a [NewEvent],
}

impl<'a> AppendRows<'a> {
    fn build(
        stream_id: Uuid,
        stream_type: &str,
        expected_version: u32,
        prev: Option<Cid>,
        events: &'a [NewEvent],
    ) -> Self {
        let recorded_at = chain::to_stored_precision(Utc::now());
        let mut link = prev;
        let mut versions = Vec::with_capacity(events.len());
        let mut prev_cids = Vec::with_capacity(events.len());
        let mut cids = Vec::with_capacity(events.len());
        for (offset, event) in events.iter().enumerate() {
            let version = expected_version + 1 + offset as u32;
            let cid = CanonicalEvent {
                chain_version: 1,
                stream_id,
                stream_type,
                version,
                event_type: &event.event_type,
                schema_version: event.schema_version,
                payload: &event.payload,
                recorded_at_micros: recorded_at.timestamp_micros(),
                correlation_id: event.correlation_id,
                causation_id: event.causation_id,
                prev_cid: link.map(|c| c.to_bytes()).unwrap_or_default(),
            }
            .cid();
            versions.push(version as i32);
            prev_cids.push(link.map(|c| c.to_bytes()));
            cids.push(cid.to_bytes());
            link = Some(cid);
        }
        let head = StreamHead {
            version: expected_version + events.len() as u32,
            cid: link,
            stream_type: stream_type.to_owned(),
        };
        Self {
            versions,
            prev_cids,
            cids,
            recorded_at,
            appended: Appended {
                stream_id,
                first_version: expected_version + 1,
                head,
                recorded_at,
            },
            events,
        }
    }

    async fn insert(
        &self,
        conn: &mut PgConnection,
        stream_id: Uuid,
        stream_type: &str,
        expected_version: u32,
        prev: Option<Cid>,
        companions: Option<Companions<'_>>,
    ) -> Result<u64, JournalError> {
        let mut statement = AppendStatement {
            args: Default::default(),
            writes: Vec::new(),
            recorded_at: self.recorded_at,
        };
        let events = self.events;
        // $1 to $3 are the same in both forms; the events follow, as scalars or as arrays.
        statement.bind(stream_id)?;
        statement.bind(stream_type)?;
        statement.bind(self.recorded_at)?;
        let insert = if let [event] = events {
            statement.bind(self.versions[0])?;
            statement.bind(&event.event_type)?;
            statement.bind(event.schema_version)?;
            statement.bind(&event.payload)?;
            statement.bind(event.correlation_id)?;
            statement.bind(event.causation_id)?;
            statement.bind(&self.prev_cids[0])?;
            statement.bind(&self.cids[0])?;
            INSERT_ONE_EVENT
        } else {
            statement.bind(&self.versions)?;
            statement.bind(events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>())?;
            statement.bind(events.iter().map(|e| e.schema_version).collect::<Vec<_>>())?;
            statement.bind(events.iter().map(|e| e.payload.as_slice()).collect::<Vec<_>>())?;
            statement.bind(events.iter().map(|e| e.correlation_id).collect::<Vec<_>>())?;
            statement.bind(events.iter().map(|e| e.causation_id).collect::<Vec<_>>())?;
            statement.bind(&self.prev_cids)?;
            statement.bind(&self.cids)?;
            INSERT_EVENTS
        };
        statement.bind(expected_version as i32)?;
        statement.bind(prev.map(|c| c.to_bytes()))?;
        let Some(companions) = companions else {
            let result = sqlx::query_with(insert, statement.args).execute(conn).await?;
            return Ok(result.rows_affected());
        };
        companions(&mut statement)?;
        let mut sql = format!("WITH appended AS ({insert} RETURNING 1)");
        for (i, write) in statement.writes.iter().enumerate() {
            sql.push_str(&format!(", write_{i} AS ({write})"));
        }
        sql.push_str(" SELECT count(*) FROM appended");
        let inserted: i64 = sqlx::query_scalar_with(sqlx::AssertSqlSafe(sql), statement.args)
            .fetch_one(conn)
            .await?;
        Ok(inserted as u64)
    }
}

/// An append that found its stream moved on: nothing was written, and the caller reports a
/// [`JournalError::Conflict`] with the version read once its connection is free.
struct Stale;

/// Adds an append's companion writes to its statement; called once per attempt.
pub type Companions<'a> = &'a (dyn Fn(&mut AppendStatement) -> Result<(), JournalError> + Sync);

/// One append's statement: the events' insert, as the CTE `appended`, and the writes that must
/// commit exactly when it does (the outbox, the status row), each a data-modifying CTE of the
/// same statement.
///
/// Why one statement: PostgreSQL runs a statement atomically, so this is the transaction a
/// command needs without `BEGIN` and `COMMIT` — one round trip instead of five. Every
/// companion write must be guarded by [`AppendStatement::APPENDED`], so that when the insert
/// writes nothing (the stream moved on) nothing else is written either.
#[derive(Debug)]
pub struct AppendStatement {
    args: sqlx::postgres::PgArguments,
    writes: Vec<String>,
    recorded_at: chrono::DateTime<Utc>,
}

impl AppendStatement {
    /// A condition that holds exactly when the events were inserted.
    pub const APPENDED: &'static str = "EXISTS (SELECT 1 FROM appended)";

    /// The time the events are recorded at, for companion rows that show it.
    pub fn recorded_at(&self) -> chrono::DateTime<Utc> {
        self.recorded_at
    }

    /// Binds `value` as the next parameter and returns its placeholder (`$14`).
    pub fn bind<'q, T>(&mut self, value: T) -> Result<String, JournalError>
    where
        T: sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>,
    {
        use sqlx::Arguments;
        self.args.add(value).map_err(sqlx::Error::Encode)?;
        Ok(format!("${}", self.args.len()))
    }

    /// Adds one data-modifying statement (`INSERT`, `UPDATE`) guarded by
    /// [`AppendStatement::APPENDED`], its values bound through [`AppendStatement::bind`].
    /// Returns the CTE's name, for a later write that depends on its `RETURNING` rows.
    pub fn write(&mut self, sql: String) -> String {
        self.writes.push(sql);
        format!("write_{}", self.writes.len() - 1)
    }
}

async fn read_head(conn: &mut PgConnection, stream_id: Uuid) -> Result<StreamHead, JournalError> {
    let mut row: Option<(i32, Vec<u8>, String)> = sqlx::query_as(
        "SELECT version, cid, stream_type FROM events WHERE stream_id = $1 \
         ORDER BY version DESC LIMIT 1",
    )
    .bind(stream_id)
    .fetch_optional(&mut *conn)
    .await?;
    if row.is_none() {
        row = sqlx::query_as(
            "SELECT version, cid, stream_type FROM events_archive WHERE stream_id = $1 \
             ORDER BY version DESC LIMIT 1",
        )
        .bind(stream_id)
        .fetch_optional(&mut *conn)
        .await?;
    }
    let Some((version, cid, stream_type)) = row else {
        return Ok(StreamHead { version: 0, cid: None, stream_type: String::new() });
    };
    let cid = Cid::try_from(cid).map_err(|e| JournalError::MalformedRow {
        position: -1,
        reason: format!("head of stream {stream_id} has an unreadable cid: {e}"),
    })?;
    Ok(StreamHead { version: version as u32, cid: Some(cid), stream_type })
}

fn is_version_collision(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|d| {
        d.is_unique_violation() && d.constraint() == Some("events_stream_version_key")
    })
}

/// Turns a row selected with [`EVENT_COLUMNS`] into a [`RecordedEvent`].
pub(crate) fn decode_row(row: &PgRow) -> Result<RecordedEvent, JournalError> {
    let position: i64 = row.try_get(0)?;
    let malformed = |reason: String| JournalError::MalformedRow { position, reason };
    let version: i32 = row.try_get(3)?;
    let tx_id: i64 = row.try_get(10)?;
    let prev_cid: Option<Vec<u8>> = row.try_get(11)?;
    let cid: Vec<u8> = row.try_get(12)?;
    Ok(RecordedEvent {
        position,
        stream_id: row.try_get(1)?,
        stream_type: row.try_get(2)?,
        version: u32::try_from(version).map_err(|_| malformed(format!("version {version}")))?,
        event_type: row.try_get(4)?,
        schema_version: row.try_get(5)?,
        payload: row.try_get(6)?,
        recorded_at: row.try_get(7)?,
        correlation_id: row.try_get(8)?,
        causation_id: row.try_get(9)?,
        tx_id: tx_id as u64,
        prev_cid: prev_cid
            .map(Cid::try_from)
            .transpose()
            .map_err(|e| malformed(format!("prev_cid: {e}")))?,
        cid: Cid::try_from(cid).map_err(|e| malformed(format!("cid: {e}")))?,
    })
}

impl Journal {
    /// The checkpoint of the newest event that is safe to read now; a follower starting here
    /// sees only what commits from now on.
    pub async fn latest_checkpoint(&self) -> Result<Checkpoint, JournalError> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT tx_id::text::bigint, position FROM events \
             WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY tx_id DESC, position DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map_or(Checkpoint::START, |(tx_id, position)| Checkpoint {
            tx_id: tx_id as u64,
            position,
        }))
    }

    /// The name of the newest migration applied to this database, if any.
    pub async fn schema_version(&self) -> Result<Option<(i64, String)>, JournalError> {
        Ok(sqlx::query_as(
            "SELECT version, description FROM _sqlx_migrations WHERE success \
             ORDER BY version DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?)
    }
}
