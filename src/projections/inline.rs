//! Inline projection: the status row of a deal written in the same statement as its events,
//! so that a read right after a command sees it.

use chrono::{DateTime, Utc};

use crate::events::{AppendStatement, JournalError, SharedRows};
use crate::fsm::Deal;

use super::rows::{Projected, RowMeta};
use super::table::RowValues;

/// Adds `deal`'s row after events ending with `last_event_type` to the statement appending
/// them. For a deal's first events their time is also its first event time; an existing row
/// keeps its own. A row already at this version or later is left as it is.
pub fn project_with<M: Projected>(
    statement: &mut AppendStatement,
    deal: &Deal<M>,
    last_event_type: &str,
) -> Result<(), JournalError> {
    M::TABLE.upsert_with(statement, &row(deal, last_event_type, statement.recorded_at()))
}

/// [`project_with`]'s row for an append that goes in a group (see [`crate::events::group`]):
/// the same row, for events recorded at `recorded_at`.
pub fn shared_project<M: Projected>(
    deal: &Deal<M>,
    last_event_type: &str,
    recorded_at: DateTime<Utc>,
) -> SharedRows {
    M::TABLE.shared_upsert(row(deal, last_event_type, recorded_at))
}

fn row<M: Projected>(
    deal: &Deal<M>,
    last_event_type: &str,
    recorded_at: DateTime<Utc>,
) -> RowValues {
    let meta = RowMeta {
        last_event_type: last_event_type.to_owned(),
        first_event_at: recorded_at,
        last_event_at: recorded_at,
    };
    M::row(deal, &meta)
}
