//! Deals: list and show them (rows of the SQL projections, as `psql` shows them), audit one,
//! start a storage deal as this node's client.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, ApiState};
use crate::deals::OperatorAction;
use crate::domain::storage::{ClientDealProposal, StorageDealProposal};
use crate::domain::{ChainEpoch, PartyKey, TokenAmount};
use crate::fsm::DecideContext;

/// The status tables a deal can be in, with their key column.
const KINDS: [(&str, &str, &str); 3] = [
    ("storage", "storage_deals", "stream_id"),
    ("retrieval", "retrieval_deals", "stream_id"),
    ("retrieval-request", "retrieval_requests", "request_id"),
];

/// Liveness: the process answers.
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: the database answers and the schema is migrated.
pub async fn ready(State(state): State<ApiState>) -> (StatusCode, Json<Value>) {
    match state.deals.journal().schema_version().await {
        Ok(Some((version, _))) => {
            // Reads served from a replica say how far behind it is.
            let lag = crate::db::replica_lag(state.reads.pool()).await.ok().flatten();
            let lag = lag.map(|l| l.as_secs_f64());
            let body = json!({ "status": "ready", "schema_version": version,
                               "read_replica_lag_seconds": lag });
            (StatusCode::OK, Json(body))
        }
        Ok(None) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not migrated" }))),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "database unavailable", "message": e.to_string() })),
        ),
    }
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::BadRequest(format!("{id:?} is not a deal id (a UUID)")))
}

/// One deal's status row, from whichever status table holds it.
pub async fn show(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    for (kind, table, key) in KINDS {
        let sql = format!("SELECT row_to_json(d) FROM {table} d WHERE {key} = $1");
        let row: Option<Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(state.reads.pool())
            .await?;
        if let Some(row) = row {
            return Ok(Json(json!({ "kind": kind, "deal": row })));
        }
    }
    Err(ApiError::NotFound(format!("no deal or retrieval request {id}")))
}

/// Filters and page of `GET /v1/deals`.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// `storage` (default), `retrieval` or `retrieval-request`.
    kind: Option<String>,
    /// `storage_client`, `storage_provider`, `retrieval_client`, `retrieval_provider`.
    side: Option<String>,
    /// A state name (`Active`, `Sealing`, …).
    state: Option<String>,
    /// Rows after this deal id (the `next` of the previous page).
    after: Option<String>,
    /// Page size, 1..=500 (default 50).
    limit: Option<i64>,
}

/// Deals, oldest first, a page at a time. Pages are cut by (first event time, id) of the last
/// row, so deals created while a client pages through never shift or repeat earlier rows.
pub async fn list(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let kind = query.kind.as_deref().unwrap_or("storage");
    let (_, table, key) = KINDS
        .iter()
        .find(|(k, _, _)| *k == kind)
        .ok_or_else(|| ApiError::BadRequest(format!("unknown kind {kind:?}")))?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be between 1 and 500".into()));
    }
    let after = query.after.as_deref().map(parse_id).transpose()?;
    if query.side.is_some() && *table == "retrieval_requests" {
        return Err(ApiError::BadRequest("retrieval requests have no side".into()));
    }
    let side_filter =
        if *table == "retrieval_requests" { "true" } else { "($1::text IS NULL OR side = $1)" };
    let sql = format!(
        "SELECT row_to_json(d), d.{key} FROM {table} d \
         WHERE {side_filter} AND ($2::text IS NULL OR state = $2) \
           AND ($3::uuid IS NULL OR (first_event_at, {key}) > \
                (SELECT first_event_at, {key} FROM {table} WHERE {key} = $3)) \
         ORDER BY first_event_at, {key} LIMIT $4"
    );
    let rows: Vec<(Value, Uuid)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(query.side.as_deref())
        .bind(query.state.as_deref())
        .bind(after)
        .bind(limit + 1)
        .fetch_all(state.reads.pool())
        .await?;
    let more = rows.len() as i64 > limit;
    let page: Vec<(Value, Uuid)> = rows.into_iter().take(limit as usize).collect();
    let next = if more { page.last().map(|(_, id)| id.to_string()) } else { None };
    let deals: Vec<Value> = page.into_iter().map(|(row, _)| row).collect();
    Ok(Json(json!({ "kind": kind, "deals": deals, "next": next })))
}

/// A deal's audited history: every event with its transition, effects, causes and signature
/// checks, and the verdict.
pub async fn audit(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    match crate::audit::timeline::audit(&state.reads, id, None).await {
        Ok(timeline) => Ok(Json(
            serde_json::to_value(&timeline).map_err(|e| ApiError::Internal(e.to_string()))?,
        )),
        Err(crate::audit::AuditError::NotFound(what)) => {
            Err(ApiError::NotFound(format!("no deal {what}")))
        }
        Err(e) => Err(ApiError::Internal(e.to_string())),
    }
}

/// A storage deal to start: the data (a file on the node) and the terms.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartStorageDeal {
    /// The file to store, on the node's file system.
    file: String,
    /// The provider's peer id (`12D3KooW…`).
    provider: String,
    /// Where the provider listens (`/ip4/127.0.0.1/tcp/4001`).
    provider_address: String,
    /// attoFIL per epoch, as a decimal string.
    price_per_epoch: String,
    /// First epoch of storage; default: the chain head + 100.
    start_epoch: Option<i64>,
    /// Epochs of storage.
    duration_epochs: i64,
    /// attoFIL, decimal string; default 0.
    provider_collateral: Option<String>,
    /// attoFIL, decimal string; default 0.
    client_collateral: Option<String>,
    /// A label recorded on chain.
    label: Option<String>,
}

/// The provider a request names: its peer id, its key and where it listens.
fn provider_of(
    peer: &str,
    address: &str,
) -> Result<(libp2p::PeerId, PartyKey, libp2p::Multiaddr), ApiError> {
    let peer_id: libp2p::PeerId =
        peer.parse().map_err(|_| ApiError::BadRequest(format!("{peer:?} is not a peer id")))?;
    let key = PartyKey::from_peer_id(&peer_id).ok_or_else(|| {
        ApiError::BadRequest("the provider's peer id does not hold an ed25519 key".into())
    })?;
    let address = address
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{address:?} is not a multiaddr")))?;
    Ok((peer_id, key, address))
}

fn amount(field: &str, text: Option<&str>) -> Result<TokenAmount, ApiError> {
    match text {
        None => Ok(TokenAmount::ZERO),
        Some(t) => t.parse::<u128>().map(TokenAmount).map_err(|_| {
            ApiError::BadRequest(format!("{field} must be attoFIL as a decimal string, not {t:?}"))
        }),
    }
}

/// Starts a storage deal as this node's client: stages the file (computing its piece
/// commitment), signs the proposal and records it. The node's effect runner takes it from
/// there: deposit, proposal, push, publish check, sealing, activation.
pub async fn start_storage_deal(
    State(state): State<ApiState>,
    body: Result<Json<StartStorageDeal>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let client = state
        .client
        .clone()
        .ok_or_else(|| ApiError::Forbidden("this node has no client role".into()))?;
    let (provider_peer, provider, address) = provider_of(&body.provider, &body.provider_address)?;
    let price = amount("price_per_epoch", Some(&body.price_per_epoch))?;
    let provider_collateral = amount("provider_collateral", body.provider_collateral.as_deref())?;
    let client_collateral = amount("client_collateral", body.client_collateral.as_deref())?;
    let head = state.head().await.unwrap_or_default();
    let start = body.start_epoch.unwrap_or(head.0 + 100);
    let file = tokio::fs::File::open(&body.file)
        .await
        .map_err(|e| ApiError::BadRequest(format!("cannot read {}: {e}", body.file)))?;
    let (piece_cid, piece_size, bytes) =
        client.pieces.stage(file).await.map_err(|e| ApiError::Internal(e.to_string()))?;
    let terms = StorageDealProposal {
        piece_cid,
        piece_size,
        verified_deal: false,
        client: PartyKey::of(&client.key),
        provider,
        label: body.label.unwrap_or_default(),
        start_epoch: ChainEpoch(start),
        end_epoch: ChainEpoch(start.saturating_add(body.duration_epochs)),
        storage_price_per_epoch: price,
        provider_collateral,
        client_collateral,
    };
    let signed = ClientDealProposal::sign(terms, &client.key);
    let pool = state.deals.journal().pool();
    crate::adapters::network::addresses::learn(&client.network, pool, provider_peer, address)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let ctx = DecideContext { epoch: head, ..DecideContext::default() };
    let started = state.deals.initiate_deal(signed, &ctx).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "stream_id": started.stream_id,
            "proposal_cid": started.proposal_cid.to_string(),
            "piece_cid": piece_cid.to_string(),
            "piece_size": piece_size.0,
            "bytes": bytes,
        })),
    ))
}

/// A retrieval to start: a whole piece from a provider, fetched part by part.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRetrieval {
    /// The piece (`baga6ea4sea…`).
    piece_cid: String,
    /// The provider's peer id.
    provider: String,
    /// Where the provider listens (multiaddr).
    provider_address: String,
    /// Bytes per retrieval deal (default: the whole piece in one deal).
    part_size: Option<u64>,
    /// The most to pay per byte, attoFIL as a decimal string.
    max_price_per_byte: String,
}

/// Starts a retrieval as this node's client: asks the provider how large the piece is, then
/// records the request; the node's runner fetches each part through a paid deal into
/// `<retrieved>/<request id>.bin`.
pub async fn start_retrieval(
    State(state): State<ApiState>,
    body: Result<Json<StartRetrieval>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    use crate::adapters::network::message::{MarketRequest, MarketResponse};
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let client = state
        .client
        .clone()
        .ok_or_else(|| ApiError::Forbidden("this node has no client role".into()))?;
    let piece: crate::domain::PieceCid =
        body.piece_cid.parse().map_err(|e| ApiError::BadRequest(format!("piece_cid: {e}")))?;
    let (provider_peer, provider, address) = provider_of(&body.provider, &body.provider_address)?;
    let max_price = amount("max_price_per_byte", Some(&body.max_price_per_byte))?;
    let pool = state.deals.journal().pool();
    crate::adapters::network::addresses::learn(&client.network, pool, provider_peer, address)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let quote = client
        .network
        .request(provider_peer, MarketRequest::RetrievalQuery { piece_cid: piece })
        .await
        .map_err(|e| ApiError::Internal(format!("the provider did not answer: {e}")))?;
    let total_bytes = match quote {
        MarketResponse::RetrievalQuote { available: true, bytes, .. } => bytes,
        _ => return Err(ApiError::NotFound(format!("the provider does not have {piece}"))),
    };
    let request = crate::domain::retrieval::RetrievalRequest {
        payload_cid: piece.cid(),
        piece_cid: Some(piece),
        total_bytes,
        part_size: body.part_size.unwrap_or(total_bytes).max(1),
        provider,
        client: PartyKey::of(&client.key),
        max_price_per_byte: max_price,
    };
    let ctx =
        DecideContext { epoch: state.head().await.unwrap_or_default(), ..DecideContext::default() };
    let request_id = state.deals.initiate_retrieval(request, 3, &ctx).await?;
    let output = client.retrieved.join(format!("{request_id}.bin"));
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "request_id": request_id,
            "total_bytes": total_bytes,
            "output": output.to_string_lossy(),
        })),
    ))
}

/// Why an operator cancels, fails or retries a deal.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancel {
    /// Recorded in the deal's event, with the operator.
    reason: String,
    /// Who asks (default: `api`).
    operator: Option<String>,
}

/// An operator cancels a deal or a retrieval request: recorded with who and why; the node's
/// runner then closes its transfer and releases its funds. 409 when its state cannot be
/// cancelled (an active storage deal ends on chain, not by cancelling).
pub async fn cancel(
    state: State<ApiState>,
    id: Path<String>,
    body: Result<Json<Cancel>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    by_operator(state, id, body, OperatorAction::Cancel).await
}

/// An operator fails a deal by hand: it goes through Failing (funds released, transfer
/// closed), recorded with who and why. 409 where failing it makes no sense (an active
/// storage deal ends on chain).
pub async fn fail(
    state: State<ApiState>,
    id: Path<String>,
    body: Result<Json<Cancel>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    by_operator(state, id, body, OperatorAction::Fail).await
}

/// An operator retries a deal paused in a recoverable failure (`*Paused` states): it
/// re-enters the state before the failure and its effect runs again, recorded with who and
/// why. 409 when the deal is not paused.
pub async fn retry(
    state: State<ApiState>,
    id: Path<String>,
    body: Result<Json<Cancel>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    by_operator(state, id, body, OperatorAction::Retry).await
}

async fn by_operator(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Json<Cancel>, JsonRejection>,
    action: OperatorAction,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let Json(body) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if body.reason.trim().is_empty() {
        return Err(ApiError::BadRequest("say why: reason is empty".into()));
    }
    let operator = body.operator.unwrap_or_else(|| "api".into());
    let ctx =
        DecideContext { epoch: state.head().await.unwrap_or_default(), ..DecideContext::default() };
    let now = state.deals.by_operator(id, action, &operator, &body.reason, &ctx).await?;
    Ok(Json(json!({ "id": id, "state": now })))
}
