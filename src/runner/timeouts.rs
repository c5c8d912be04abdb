//! Timeouts: a deal that has not moved for longer than configured gets a `DealTimedOut`
//! input. Whether that ends the deal is its machine's decision: states that do not take the
//! input (Active, terminal states) refuse it and nothing is recorded.

use std::time::Duration;

use uuid::Uuid;

use super::RunnerError;
use crate::deals::{Deals, DealsError};
use crate::fsm::DecideContext;
use crate::fsm::Machine;
use crate::fsm::retrieval_client::{RetrievalClient, RetrievalClientEvent};
use crate::fsm::retrieval_provider::{RetrievalProvider, RetrievalProviderEvent};
use crate::fsm::storage_client::{StorageClient, StorageClientEvent};
use crate::fsm::storage_provider::{StorageProvider, StorageProviderEvent};

/// How long a deal may stay in one state.
#[derive(Debug, Clone)]
pub struct TimeoutPolicy {
    /// No transition for this long times a deal out.
    pub after: Duration,
    /// States that wait on the chain for as long as it takes (sealing can take days): never
    /// timed out here — the chain says when they end.
    pub exempt_states: Vec<&'static str>,
}

impl Default for TimeoutPolicy {
    fn default() -> Self {
        Self {
            after: Duration::from_secs(3_600),
            exempt_states: vec!["Staged", "AwaitingPreCommit", "Sealing", "Finalizing", "Active"],
        }
    }
}

/// Gives every deal stuck past the policy a `DealTimedOut` input; returns how many deals it
/// moved.
pub async fn time_out_stuck_deals(
    deals: &Deals,
    policy: &TimeoutPolicy,
    ctx: &DecideContext,
) -> Result<usize, RunnerError> {
    let pool = deals.journal().pool();
    let stuck: Vec<(Uuid, String, String, Option<String>)> = sqlx::query_as(
        "SELECT stream_id, side, state, message FROM storage_deals \
         WHERE last_event_at < now() - $1 * interval '1 millisecond' \
         UNION ALL \
         SELECT stream_id, side, state, message FROM retrieval_deals \
         WHERE last_event_at < now() - $1 * interval '1 millisecond'",
    )
    .bind(policy.after.as_millis() as f64)
    .fetch_all(pool)
    .await
    .map_err(DealsError::from)?;
    let mut moved = 0;
    for (stream, side, state, last_failure) in stuck {
        if policy.exempt_states.contains(&state.as_str()) {
            continue;
        }
        // A paused deal ends with the failure it paused on, so the reason says what happened.
        let reason = match last_failure {
            Some(failure) => {
                format!("no progress in {state} for over {:?}; last: {failure}", policy.after)
            }
            None => format!("no progress in {state} for over {:?}", policy.after),
        };
        let result = match side.as_str() {
            StorageClient::NAME => deals
                .handle::<StorageClient>(
                    stream,
                    StorageClientEvent::DealTimedOut { reason },
                    ctx,
                    None,
                )
                .await
                .map(drop),
            StorageProvider::NAME => deals
                .handle::<StorageProvider>(
                    stream,
                    StorageProviderEvent::DealTimedOut { reason },
                    ctx,
                    None,
                )
                .await
                .map(drop),
            RetrievalClient::NAME => deals
                .handle::<RetrievalClient>(
                    stream,
                    RetrievalClientEvent::DealTimedOut { reason },
                    ctx,
                    None,
                )
                .await
                .map(drop),
            RetrievalProvider::NAME => deals
                .handle::<RetrievalProvider>(
                    stream,
                    RetrievalProviderEvent::DealTimedOut { reason },
                    ctx,
                    None,
                )
                .await
                .map(drop),
            _ => continue,
        };
        match result {
            Ok(()) => moved += 1,
            // The state does not time out (terminal, or waits on something else).
            Err(DealsError::Rejected(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(moved)
}
