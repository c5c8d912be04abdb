//! Following the journal: catch up from a checkpoint, then deliver new commits as they become
//! safe to read, each event exactly once and in commit-safe order.

use std::collections::VecDeque;
use std::time::Duration;

use futures::Stream;
use sqlx::postgres::PgListener;

use super::envelope::{Checkpoint, RecordedEvent};
use super::error::JournalError;
use super::journal::Journal;

/// The channel the journal's insert trigger notifies on.
pub const NOTIFY_CHANNEL: &str = "dealledger_events";

/// How many events one catch-up read fetches.
const BATCH: u32 = 1_000;

/// How long a subscriber waits for a notification before it re-reads anyway. Notifications
/// wake it early; the poll is needed because events held back by an older transaction become
/// readable when that transaction ends, and a transaction that wrote no events sends no
/// notification when it does.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

struct Follower {
    journal: Journal,
    listener: PgListener,
    after: Checkpoint,
    buffer: VecDeque<RecordedEvent>,
}

impl Follower {
    async fn next_event(&mut self) -> Result<RecordedEvent, JournalError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.after = event.checkpoint();
                return Ok(event);
            }
            let batch = self.journal.read_all(self.after, BATCH).await?;
            if batch.is_empty() {
                // Either a notification or the poll interval: both just mean "read again".
                let _ = tokio::time::timeout(POLL_INTERVAL, self.listener.recv()).await;
            }
            self.buffer.extend(batch);
        }
    }
}

impl Journal {
    /// A stream of every event committed after `after`: first those already in the journal,
    /// then new ones as their transactions commit. The stream never ends on its own; an error
    /// item means the database failed and the subscriber should resubscribe from its last
    /// checkpoint.
    ///
    /// The listener is registered before the first read, so no commit between the catch-up
    /// and the first wait can be missed.
    pub async fn subscribe(
        &self,
        after: Checkpoint,
    ) -> Result<impl Stream<Item = Result<RecordedEvent, JournalError>> + Send + use<>, JournalError>
    {
        let mut listener = PgListener::connect_with(self.pool()).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        let follower = Follower { journal: self.clone(), listener, after, buffer: VecDeque::new() };
        Ok(futures::stream::unfold(follower, |mut follower| async move {
            let item = follower.next_event().await;
            Some((item, follower))
        }))
    }
}
