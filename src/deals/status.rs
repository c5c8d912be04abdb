//! What `get_storage_deal_status` and `get_retrieval_status` answer, folded from the journal.

use cid::Cid;
use serde::Serialize;
use uuid::Uuid;

use super::{Deals, DealsError};
use crate::domain::{DealId, TokenAmount};
use crate::fsm::retrieval_request::RetrievalRequestMachine;
use crate::fsm::storage_client::StorageClient;
use crate::fsm::storage_provider::StorageProvider;
use crate::fsm::{Label, Machine};

/// A storage deal's status, on whichever side this ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StorageDealStatus {
    /// The deal's stream.
    pub stream_id: Uuid,
    /// `storage_client` or `storage_provider`.
    pub side: &'static str,
    /// The state's name (`Active`).
    pub state: &'static str,
    /// The state's go-fil-markets status code (`Active` = 7).
    pub code: u16,
    /// Events recorded.
    pub version: u32,
    /// The proposal CID.
    pub proposal_cid: Option<Cid>,
    /// The on-chain deal id, once published.
    pub deal_id: Option<DealId>,
    /// The message that published the deal, once known.
    pub publish_message: Option<Cid>,
    /// Bytes sent (client) or received (provider).
    pub bytes_transferred: u64,
    /// Funds the deal holds reserved, in attoFIL.
    pub funds_reserved: TokenAmount,
    /// Why it failed, if it did.
    pub message: Option<String>,
}

/// A retrieval request's status as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetrievalStatus {
    /// The request's stream.
    pub request_id: Uuid,
    /// The state's name.
    pub state: &'static str,
    /// The state's code.
    pub code: u16,
    /// Parts in the request.
    pub parts: usize,
    /// Parts completed.
    pub parts_completed: usize,
    /// Bytes received.
    pub bytes_done: u64,
    /// Bytes requested.
    pub total_bytes: u64,
    /// Paid in total, in attoFIL.
    pub total_paid: TokenAmount,
    /// Why it failed, if it did.
    pub message: Option<String>,
}

impl Deals {
    /// The status of a storage deal (either side), from its journal stream.
    pub async fn get_storage_deal_status(
        &self,
        stream_id: Uuid,
    ) -> Result<StorageDealStatus, DealsError> {
        let head = self.journal.head(stream_id).await?;
        if head.version == 0 {
            return Err(DealsError::NotFound { stream_id });
        }
        if head.stream_type == StorageClient::NAME {
            let deal = self.load::<StorageClient>(stream_id).await?;
            let d = &deal.data;
            Ok(StorageDealStatus {
                stream_id,
                side: StorageClient::NAME,
                state: deal.state.name(),
                code: deal.state.code().unwrap_or_default(),
                version: deal.version,
                proposal_cid: d.proposal_cid,
                deal_id: d.deal_id,
                publish_message: d.publish_message,
                bytes_transferred: d.bytes_sent,
                funds_reserved: d.funds_reserved,
                message: d.message.clone(),
            })
        } else {
            let deal = self.load::<StorageProvider>(stream_id).await?;
            let d = &deal.data;
            Ok(StorageDealStatus {
                stream_id,
                side: StorageProvider::NAME,
                state: deal.state.name(),
                code: deal.state.code().unwrap_or_default(),
                version: deal.version,
                proposal_cid: d.proposal_cid,
                deal_id: d.deal_id,
                publish_message: d.publish_message,
                bytes_transferred: d.bytes_received,
                funds_reserved: d.funds_reserved,
                message: d.message.clone(),
            })
        }
    }

    /// The status of a retrieval request as a whole.
    pub async fn get_retrieval_status(
        &self,
        request_id: Uuid,
    ) -> Result<RetrievalStatus, DealsError> {
        let deal = self.load::<RetrievalRequestMachine>(request_id).await?;
        if deal.version == 0 {
            return Err(DealsError::NotFound { stream_id: request_id });
        }
        let d = &deal.data;
        Ok(RetrievalStatus {
            request_id,
            state: deal.state.name(),
            code: deal.state.code().unwrap_or_default(),
            parts: d.parts.len(),
            parts_completed: d.parts.iter().filter(|p| p.completed).count(),
            bytes_done: d.bytes_done,
            total_bytes: d.request.as_ref().map_or(0, |r| r.total_bytes),
            total_paid: d.total_paid,
            message: d.message.clone(),
        })
    }
}
