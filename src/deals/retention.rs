//! Retention policy: which streams may leave the hot journal. A deal (or retrieval request)
//! whose status row has been terminal for longer than the configured age is archived with
//! [`crate::events::archive::archive_streams`]; its row stays in the status tables, and
//! `audit`, `verify` and checkpoints still read its events from the archive.

use std::time::Duration;

use uuid::Uuid;

use super::{Deals, DealsError};
use crate::events::archive::{Archived, archive_streams};

/// Archives every stream that ended more than `older_than` ago, `batch` streams per
/// transaction. Streams with open effects or unprojected events wait for a later pass.
pub async fn archive_ended(
    deals: &Deals,
    older_than: Duration,
    batch: i64,
) -> Result<Archived, DealsError> {
    let pool = deals.journal().pool();
    let mut total = Archived::default();
    let mut after = Uuid::nil();
    loop {
        let candidates: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM ( \
               SELECT stream_id AS id, last_event_at FROM storage_deals WHERE terminal \
               UNION ALL SELECT stream_id, last_event_at FROM retrieval_deals WHERE terminal \
               UNION ALL SELECT request_id, last_event_at FROM retrieval_requests WHERE terminal \
             ) ended \
             WHERE last_event_at < now() - $1 * interval '1 millisecond' AND id > $2 \
               AND EXISTS (SELECT 1 FROM events e WHERE e.stream_id = ended.id) \
             ORDER BY id LIMIT $3",
        )
        .bind(older_than.as_millis() as f64)
        .bind(after)
        .bind(batch.max(1))
        .fetch_all(pool)
        .await?;
        let Some(last) = candidates.last() else { return Ok(total) };
        after = *last;
        let moved = archive_streams(pool, &candidates).await?;
        total.streams += moved.streams;
        total.events += moved.events;
        total.effects += moved.effects;
    }
}
