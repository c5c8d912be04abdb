//! Inline projection: the status row of a deal written in the same statement as its events,
//! so that a read right after a command sees it.

use crate::events::{AppendStatement, JournalError};
use crate::fsm::Deal;

use super::rows::{Projected, RowMeta};

/// Adds `deal`'s row after events ending with `last_event_type` to the statement appending
/// them. For a deal's first events their time is also its first event time; an existing row
/// keeps its own. A row already at this version or later is left as it is.
pub fn project_with<M: Projected>(
    statement: &mut AppendStatement,
    deal: &Deal<M>,
    last_event_type: &str,
) -> Result<(), JournalError> {
    let meta = RowMeta {
        last_event_type: last_event_type.to_owned(),
        first_event_at: statement.recorded_at(),
        last_event_at: statement.recorded_at(),
    };
    M::TABLE.upsert_with(statement, &M::row(deal, &meta))
}
