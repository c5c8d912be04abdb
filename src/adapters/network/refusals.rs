//! The log of refused requests (`refused_messages`): what a provider turned away before it
//! reached a deal, from whom and why. Written only here; read with SQL.

use libp2p::PeerId;
use sqlx::PgPool;

use super::message::{CancelledDeal, MarketRequest, MarketResponse};

/// What a refusal of `request` is about, for the log: taken before the request is answered,
/// so that answering can consume it (a transfer chunk is not copied to be logged).
pub fn subject(request: &MarketRequest) -> Option<String> {
    match request {
        MarketRequest::Propose(proposal) => Some(proposal.cid().to_string()),
        MarketRequest::Status(query) => Some(query.query.proposal_cid.to_string()),
        MarketRequest::TransferOpen { proposal_cid, .. }
        | MarketRequest::TransferChunk { proposal_cid, .. }
        | MarketRequest::TransferFinish { proposal_cid } => Some(proposal_cid.to_string()),
        MarketRequest::RetrievalQuery { piece_cid } => Some(piece_cid.to_string()),
        MarketRequest::RetrievalPropose(terms)
        | MarketRequest::RetrievalProposeFor { terms, .. } => {
            terms.piece_cid.map(|p| p.to_string())
        }
        MarketRequest::RetrievalPull { deal_stream, .. }
        | MarketRequest::RetrievalPay { deal_stream, .. } => Some(deal_stream.to_string()),
        MarketRequest::Cancel { deal: CancelledDeal::Storage { proposal_cid }, .. } => {
            Some(proposal_cid.to_string())
        }
        MarketRequest::Cancel { deal: CancelledDeal::Retrieval { client_deal }, .. } => {
            Some(client_deal.to_string())
        }
        MarketRequest::Ask => None,
    }
}

/// Why `response` refuses `request`, if it does.
pub fn refusal(response: &MarketResponse) -> Option<&str> {
    match response {
        MarketResponse::Rejected { reason } | MarketResponse::Error { reason } => Some(reason),
        _ => None,
    }
}

/// Logs a refused request. A failure to log is itself only logged: refusing must not depend
/// on the database.
pub async fn record(
    pool: &PgPool,
    peer: Option<PeerId>,
    protocol: &str,
    reason: &str,
    subject: Option<String>,
) {
    let written = sqlx::query(
        "INSERT INTO refused_messages (peer, protocol, reason, subject) VALUES ($1, $2, $3, $4)",
    )
    .bind(peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string()))
    .bind(protocol)
    .bind(reason)
    .bind(subject)
    .execute(pool)
    .await;
    if let Err(e) = written {
        tracing::warn!(?peer, protocol, reason, error = %e, "could not log a refused request");
    }
}
