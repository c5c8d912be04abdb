//! `GET /metrics` in the Prometheus text format: deals by state, events recorded (rate it for
//! transitions/s), the effect queue's depth and age, projection lag, bytes transferred and the
//! chain head.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::{ApiError, ApiState};

/// The metrics page.
pub async fn metrics(State(state): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let pool = state.deals.journal().pool();
    let mut out = String::new();
    let by_state: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT side, state, count(*) FROM storage_deals GROUP BY 1, 2 \
         UNION ALL SELECT side, state, count(*) FROM retrieval_deals GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    out.push_str(
        "# HELP dealledger_deals Deals by side and state.\n# TYPE dealledger_deals gauge\n",
    );
    for (side, state, count) in by_state {
        let _ = writeln!(out, "dealledger_deals{{side=\"{side}\",state=\"{state}\"}} {count}");
    }
    let events =
        state.deals.journal().count().await.map_err(|e| ApiError::Internal(e.to_string()))?;
    out.push_str("# HELP dealledger_events_total Events in the journal (rate() gives transitions/s).\n# TYPE dealledger_events_total counter\n");
    let _ = writeln!(out, "dealledger_events_total {events}");
    let (depth, age): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 \
         FROM outbox WHERE completed_at IS NULL",
    )
    .fetch_one(pool)
    .await?;
    out.push_str("# HELP dealledger_effects_pending Effects not yet performed.\n# TYPE dealledger_effects_pending gauge\n");
    let _ = writeln!(out, "dealledger_effects_pending {depth}");
    out.push_str("# HELP dealledger_effects_oldest_seconds Age of the oldest pending effect.\n# TYPE dealledger_effects_oldest_seconds gauge\n");
    let _ = writeln!(out, "dealledger_effects_oldest_seconds {}", age.unwrap_or(0.0));
    let lags = crate::projections::projector::lags(pool)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    out.push_str("# HELP dealledger_projection_lag_events Events a projection has not folded yet.\n# TYPE dealledger_projection_lag_events gauge\n");
    for lag in lags {
        let _ = writeln!(
            out,
            "dealledger_projection_lag_events{{projection=\"{}\"}} {}",
            lag.name, lag.events_behind
        );
    }
    let bytes: Option<f64> = sqlx::query_scalar(
        "SELECT (COALESCE((SELECT sum(bytes_transferred) FROM storage_deals), 0) \
               + COALESCE((SELECT sum(bytes_transferred) FROM retrieval_deals), 0))::float8",
    )
    .fetch_one(pool)
    .await?;
    out.push_str("# HELP dealledger_transfer_bytes Bytes moved by the deals' transfers.\n# TYPE dealledger_transfer_bytes gauge\n");
    let _ = writeln!(out, "dealledger_transfer_bytes {}", bytes.unwrap_or(0.0));
    if let Some(head) = state.head().await {
        out.push_str("# HELP dealledger_chain_head_epoch The chain head the node sees.\n# TYPE dealledger_chain_head_epoch gauge\n");
        let _ = writeln!(out, "dealledger_chain_head_epoch {}", head.0);
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
