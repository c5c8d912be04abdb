//! Group commit: appends that arrive while the journal's statements are all in flight wait,
//! and then go to the server together, as one statement.
//!
//! Why: under load the server's cost per append is mostly per statement — starting the
//! executor for the insert and its companion writes, the protocol, the commit — not per row.
//! One statement carrying many appends pays that once. With no contention nothing waits: an
//! append runs alone, at once, as it always did.
//!
//! Invariants, the same as for an append alone:
//! - Each append in a group is all or nothing with its companion writes: its events are
//!   inserted only if its stream is where it expects (checked inside the statement, per
//!   append), and its companion rows only if its events are.
//! - Appends do not fail each other: one that loses a race makes the whole statement fail on
//!   the `(stream_id, version)` key, and then every append of the group is tried again alone,
//!   where exactly that one gets its conflict.
//! - Positions follow the order of the appends in the group and, inside one append, the order
//!   of its events, so every stream's versions are in position order.
//! - An append whose caller stops waiting (drops its future) after it joined a group is still
//!   sent with the group, as a statement already sent would still run: its outcome is then
//!   unknown to that caller, and the next append to the stream finds out (a conflict).
//!
//! Which appends group: those whose stream head this journal knows (it appended the stream
//! last, or the stream is new) and which arrive while [`MAX_IN_FLIGHT`] statements are
//! running. The others run alone, as before; so does every append that a group could not
//! write (a stale head, a race, a failing companion write), where it gets its own answer.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::envelope::NewEvent;

/// How many statements the journal keeps in flight before appends start to wait and group:
/// enough to keep the server and this process both busy on a small machine, few enough that
/// groups form under load.
const MAX_IN_FLIGHT: usize = 2;

/// Opens the connections groups are sent on: the journal's server and database, with
/// generic plans forced and sequential scans avoided, on connections that run nothing else.
///
/// The group statement's text is fixed but its arrays' lengths vary, and PostgreSQL's plan
/// cache, judging by the first executions, otherwise plans it afresh every time (measured: 0
/// generic plans in 130 executions, planning costing more than executing). A generic plan
/// made while the tables are still small would scan them whole (hashing all of `events` to
/// check a few heads) and keep doing so as they grow; every lookup here is by key, so index
/// scans are always right.
fn group_pool(journal_pool: &PgPool) -> PgPool {
    let options = journal_pool
        .connect_options()
        .as_ref()
        .clone()
        .options([("plan_cache_mode", "force_generic_plan"), ("enable_seqscan", "off")]);
    crate::db::pool_options().max_connections(GROUP_CONNECTIONS).connect_lazy_with(options)
}

/// Connections of the pool groups are sent on: one per statement in flight, and spares for
/// the moments a connection is on its way back to the pool.
const GROUP_CONNECTIONS: u32 = 4;

/// The most appends one statement carries; a longer queue goes as several statements.
const MAX_GROUP: usize = 128;

/// One kind of write that commits exactly when an append's events do (a status row, the
/// outbox), in the form many appends can share: every append adds rows of text values, and
/// the kind writes them all with one piece of SQL.
pub trait SharedWrite: Sync + std::fmt::Debug {
    /// Tells kinds apart and orders them in the statement, so that the same kinds always
    /// give the same SQL (and the server's prepared plan is reused).
    fn name(&self) -> &'static str;
    /// The names of the columns of each row, in the order rows list their values. Values
    /// travel as text in the column type's canonical text form.
    fn columns(&self) -> Vec<&'static str>;
    /// One or more common table expressions, comma-separated, writing the rows of `rows` (a
    /// relation with [`SharedWrite::columns`] as text columns, holding only the rows of
    /// appends whose events are inserted). Their names must start with `prefix`.
    fn ctes(&self, rows: &str, prefix: &str) -> String;
}

/// The rows one append adds to one kind of shared write.
#[derive(Debug)]
pub struct SharedRows {
    /// The kind of write.
    pub kind: &'static dyn SharedWrite,
    /// One value (or NULL) per column, per row.
    pub rows: Vec<Vec<Option<String>>>,
}

/// One append waiting in a group: everything its statement needs, owned, because the
/// statement is sent by whichever task runs the group. It has at least one event; the
/// version it expects and the CID it links to are its first event's.
#[derive(Debug)]
pub(crate) struct GroupedAppend {
    pub stream_id: Uuid,
    pub stream_type: String,
    pub versions: Vec<i32>,
    pub prev_cids: Vec<Option<Vec<u8>>>,
    pub cids: Vec<Vec<u8>>,
    pub recorded_at: DateTime<Utc>,
    pub events: Vec<NewEvent>,
    pub shared: Vec<SharedRows>,
}

impl GroupedAppend {
    /// The stream version this append expects (0: a new stream).
    pub fn expected_version(&self) -> i32 {
        self.versions[0] - 1
    }

    /// The CID of the event this append links to (none for a new stream).
    pub fn link(&self) -> Option<&[u8]> {
        self.prev_cids[0].as_deref()
    }
}

/// What became of an append sent in a group.
#[derive(Debug)]
pub(crate) enum GroupOutcome {
    /// Its events and companion rows are committed.
    Appended,
    /// Nothing of it was written, and the caller should append it alone: its stream was not
    /// where it expected, or the statement failed (another append of the group lost a race,
    /// a companion write failed, the database did).
    TryAlone,
    /// The task sending the group stopped before it answered (the runtime is shutting down):
    /// whether it was written is unknown.
    Lost,
}

struct Waiting {
    append: GroupedAppend,
    reply: oneshot::Sender<GroupOutcome>,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    queue: Vec<Waiting>,
}

/// The journal's group committer, shared by its clones.
#[derive(Default)]
pub(crate) struct GroupCommit {
    state: Arc<Mutex<State>>,
    pool: std::sync::OnceLock<PgPool>,
    /// Appends written by a group's statement (not alone), for [`super::Journal::appended_in_groups`].
    appended: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

/// A statement slot held by an append that runs alone; giving it back hands any appends that
/// queued meanwhile to a task that sends them (also when the append's future is dropped).
pub(crate) struct Slot {
    state: Arc<Mutex<State>>,
    group_pool: PgPool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        hand_on(&self.state, &self.group_pool);
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Gives back a slot: if appends are waiting, a task takes the slot over and sends them.
fn hand_on(state: &Arc<Mutex<State>>, pool: &PgPool) {
    let mut guard = lock(state);
    if guard.queue.is_empty() {
        guard.in_flight -= 1;
        return;
    }
    // Outside a runtime (a future dropped after its runtime ended) nothing can be sent, and
    // nobody is left waiting for it.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        guard.in_flight -= 1;
        return;
    };
    drop(guard);
    runtime.spawn(send_queued(state.clone(), pool.clone()));
}

/// Sends queued groups until the queue is empty, then gives the slot back.
async fn send_queued(state: Arc<Mutex<State>>, pool: PgPool) {
    loop {
        let group: Vec<Waiting> = {
            let mut guard = lock(&state);
            if guard.queue.is_empty() {
                guard.in_flight -= 1;
                return;
            }
            let take = guard.queue.len().min(MAX_GROUP);
            guard.queue.drain(..take).collect()
        };
        let (appends, replies): (Vec<_>, Vec<_>) =
            group.into_iter().map(|w| (w.append, w.reply)).unzip();
        let outcomes = super::group_sql::execute(&pool, &appends).await;
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            // A caller that went away no longer wants to know.
            let _ = reply.send(outcome);
        }
    }
}

impl GroupCommit {
    /// A slot to run an append alone right now, if one is free.
    pub(crate) fn try_alone(&self, pool: &PgPool) -> Option<Slot> {
        let mut guard = lock(&self.state);
        if guard.in_flight < MAX_IN_FLIGHT && guard.queue.is_empty() {
            guard.in_flight += 1;
            return Some(Slot { state: self.state.clone(), group_pool: self.pool(pool).clone() });
        }
        None
    }

    fn pool(&self, journal_pool: &PgPool) -> &PgPool {
        self.pool.get_or_init(|| group_pool(journal_pool))
    }

    /// Queues `append` for the next group and waits for its outcome.
    pub(crate) async fn join(&self, pool: &PgPool, append: GroupedAppend) -> GroupOutcome {
        let (reply, outcome) = oneshot::channel();
        let start_sender = {
            let mut guard = lock(&self.state);
            guard.queue.push(Waiting { append, reply });
            // Every slot freed while this append was being built: nobody would send it.
            let free = guard.in_flight < MAX_IN_FLIGHT;
            if free {
                guard.in_flight += 1;
            }
            free
        };
        if start_sender {
            tokio::spawn(send_queued(self.state.clone(), self.pool(pool).clone()));
        }
        let outcome = outcome.await.unwrap_or(GroupOutcome::Lost);
        if matches!(outcome, GroupOutcome::Appended) {
            self.appended.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        outcome
    }

    /// Appends written by a group's statement so far.
    pub(crate) fn appended(&self) -> u64 {
        self.appended.load(std::sync::atomic::Ordering::Relaxed)
    }
}
