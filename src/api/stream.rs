//! `GET /v1/events`: deal updates as server-sent events, from the moment of the request on.
//! It rides on the journal subscription, so it shows deals driven by any process.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::{ApiError, ApiState};
use crate::projections::updates::{UpdateFilter, subscribe_deal_updates};

/// Which updates to stream.
#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Only this deal.
    stream_id: Option<Uuid>,
    /// Only these machines, comma-separated (`storage_client,storage_provider`).
    types: Option<String>,
}

/// Streams `deal-update` events: `{stream_id, stream_type, version, from, input, to,
/// event_type, recorded_at}`.
pub async fn events(
    State(state): State<ApiState>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let journal = state.deals.journal();
    let after = journal.latest_checkpoint().await.map_err(|e| ApiError::Internal(e.to_string()))?;
    let filter = UpdateFilter {
        stream_types: query
            .types
            .map(|t| t.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default(),
        stream_id: query.stream_id,
    };
    let updates = subscribe_deal_updates(journal, after, filter)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let events = updates.map(|update| {
        Ok(match update {
            Ok(u) => Event::default().event("deal-update").data(
                json!({
                    "stream_id": u.stream_id,
                    "stream_type": u.stream_type,
                    "version": u.event.version,
                    "from": u.step.from,
                    "input": u.step.input,
                    "to": u.step.to,
                    "event_type": u.event.event_type,
                    "recorded_at": u.event.recorded_at,
                })
                .to_string(),
            ),
            Err(e) => Event::default().event("error").data(e.to_string()),
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
