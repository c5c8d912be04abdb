//! Wakes followers after commits without slowing writers down.
//!
//! A `NOTIFY` inside the writing transaction would be simplest, but PostgreSQL serialises the
//! commits of all notifying transactions on one lock: measured here, 32 writers fell from
//! 15.5k to 3.3k commits/s. Instead, writers poke this in-process notifier after they commit,
//! and one background task sends `pg_notify` in its own tiny transaction, coalescing every
//! poke that arrives while one is in flight into the next. Followers also poll, so a commit
//! whose writer never pokes (another program, raw SQL) is still seen, only later.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::subscribe::NOTIFY_CHANNEL;

/// The shortest time between two notifications. Bounds the notification traffic to a few
/// hundred small transactions per second however fast events are written, for at most this
/// much extra latency.
const COALESCE_WINDOW: Duration = Duration::from_millis(3);

/// Coalescing sender of commit notifications; one per journal (shared by its clones).
#[derive(Debug, Default)]
pub(crate) struct CommitNotifier {
    poke: Arc<Notify>,
    task: OnceLock<JoinHandle<()>>,
}

impl CommitNotifier {
    /// Says that events were committed. Cheap and never blocks; starts the sending task on
    /// first use (it needs a running tokio runtime, which every caller of the journal has).
    pub(crate) fn committed(&self, pool: &PgPool) {
        self.task.get_or_init(|| {
            let (poke, pool) = (self.poke.clone(), pool.clone());
            tokio::spawn(async move {
                loop {
                    poke.notified().await;
                    // A failed notification only delays followers until their next poll.
                    if let Err(e) = sqlx::query("SELECT pg_notify($1, '')")
                        .bind(NOTIFY_CHANNEL)
                        .execute(&pool)
                        .await
                    {
                        tracing::debug!(error = %e, "commit notification not sent");
                    }
                    // Pokes arriving meanwhile collapse into the next notification.
                    tokio::time::sleep(COALESCE_WINDOW).await;
                }
            })
        });
        self.poke.notify_one();
    }
}

impl Drop for CommitNotifier {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}
