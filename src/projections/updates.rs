//! Deal updates for embedders (the seed's `RegisterListener`): a stream of state changes that
//! rides on the journal subscription, so it sees deals driven by any process, not only this one.

use futures::{Stream, StreamExt};
use uuid::Uuid;

use super::ProjectionError;
use super::fold::{StateTracker, Step};
use crate::events::{Checkpoint, Journal, RecordedEvent};

/// Which updates a subscriber wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateFilter {
    /// Only these stream types (`storage_provider`, ...); all when empty.
    pub stream_types: Vec<String>,
    /// Only this deal.
    pub stream_id: Option<Uuid>,
}

impl UpdateFilter {
    fn wants(&self, event: &RecordedEvent) -> bool {
        (self.stream_types.is_empty() || self.stream_types.contains(&event.stream_type))
            && self.stream_id.is_none_or(|id| id == event.stream_id)
    }
}

/// One state change of one deal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DealUpdate {
    /// The deal's stream.
    pub stream_id: Uuid,
    /// Its machine.
    pub stream_type: String,
    /// The step: old state, input, new state.
    pub step: Step,
    /// The event that made it.
    pub event: RecordedEvent,
}

/// Every deal update committed after `after` that `filter` wants, in commit-safe order; then
/// new ones as they commit.
pub async fn subscribe_deal_updates(
    journal: &Journal,
    after: Checkpoint,
    filter: UpdateFilter,
) -> Result<impl Stream<Item = Result<DealUpdate, ProjectionError>> + Send + use<>, ProjectionError>
{
    let events = journal.subscribe(after).await?;
    let tracker = StateTracker::new(journal.clone());
    Ok(futures::stream::unfold(
        (Box::pin(events), tracker, filter),
        |(mut events, mut tracker, filter)| async move {
            loop {
                let event = match events.next().await? {
                    Ok(event) => event,
                    Err(e) => return Some((Err(e.into()), (events, tracker, filter))),
                };
                // Every event goes through the tracker, so states stay known for later ones.
                let step = match tracker.step(&event).await {
                    Ok(step) => step,
                    Err(e) => return Some((Err(e), (events, tracker, filter))),
                };
                if filter.wants(&event) {
                    let update = DealUpdate {
                        stream_id: event.stream_id,
                        stream_type: event.stream_type.clone(),
                        step,
                        event,
                    };
                    return Some((Ok(update), (events, tracker, filter)));
                }
            }
        },
    ))
}
