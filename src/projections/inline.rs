//! Inline projection: the status row of a deal written in the same transaction as its events,
//! so that a read right after a command sees it.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::ProjectionError;
use super::rows::{Projected, RowMeta};
use crate::fsm::Deal;

/// Writes `deal`'s row after events ending with `last_event_type`, recorded at `recorded_at`.
/// For a deal's first events `recorded_at` is also its first event time; an existing row keeps
/// its own. A row already at this version or later is left as it is.
pub async fn project<M: Projected>(
    conn: &mut PgConnection,
    deal: &Deal<M>,
    last_event_type: &str,
    recorded_at: DateTime<Utc>,
) -> Result<(), ProjectionError> {
    let meta = RowMeta {
        last_event_type: last_event_type.to_owned(),
        first_event_at: recorded_at,
        last_event_at: recorded_at,
    };
    M::TABLE.upsert(conn, &M::row(deal, &meta)).await
}
