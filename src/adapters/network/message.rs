//! The market's wire messages: what peers ask each other — one request and one response per
//! substream, except on the transfer stream, where a push or pull sends many in order.
//! postcard on the wire; append variants only (postcard stores the position).

use cid::Cid;
use serde::{Deserialize, Serialize};

use crate::domain::storage::{ClientDealProposal, StorageDeal};
use crate::domain::{PaddedPieceSize, TokenAmount};

/// The protocols, one per kind of request.
pub const ASK_PROTOCOL: &str = "/dealledger/storage/ask/1";
/// Proposing a signed storage deal.
pub const PROPOSE_PROTOCOL: &str = "/dealledger/storage/propose/1";
/// Asking a deal's status.
pub const STATUS_PROTOCOL: &str = "/dealledger/storage/status/1";
/// Moving a deal's data, chunk by acknowledged chunk.
pub const TRANSFER_PROTOCOL: &str = "/dealledger/transfer/1";
/// Asking whether a provider has a piece, and at what price.
pub const RETRIEVAL_QUERY_PROTOCOL: &str = "/dealledger/retrieval/query/1";
/// Proposing retrieval terms.
pub const RETRIEVAL_PROPOSE_PROTOCOL: &str = "/dealledger/retrieval/propose/1";
/// Client → provider: the client cancelled a deal; the provider's side cancels it too.
pub const CANCEL_PROTOCOL: &str = "/dealledger/deal/cancel/1";

/// A provider's retrieval prices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetrievalAsk {
    /// Lowest price per byte, in attoFIL.
    pub price_per_byte: TokenAmount,
    /// Price to unseal, in attoFIL.
    pub unseal_price: TokenAmount,
    /// Largest first payment interval, in bytes.
    pub max_payment_interval: u64,
}

impl RetrievalAsk {
    /// Why terms do not meet this ask, if they do not. Pure: the provider's retrieval policy.
    pub fn refuses(
        &self,
        terms: &crate::domain::retrieval::RetrievalDealProposal,
    ) -> Option<String> {
        if terms.price_per_byte < self.price_per_byte {
            return Some(format!(
                "price {} per byte is below the ask of {}",
                terms.price_per_byte.0, self.price_per_byte.0
            ));
        }
        if terms.unseal_price < self.unseal_price {
            return Some(format!(
                "unseal price {} is below {}",
                terms.unseal_price.0, self.unseal_price.0
            ));
        }
        (terms.payment_interval > self.max_payment_interval).then(|| {
            format!(
                "payment interval {} exceeds {}",
                terms.payment_interval, self.max_payment_interval
            )
        })
    }
}

/// A provider's standing offer (the seed's Asks/Bids TODO).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageAsk {
    /// Lowest price per epoch per GiB of padded piece, in attoFIL.
    pub price_per_gib_epoch: TokenAmount,
    /// Smallest piece taken.
    pub min_piece_size: PaddedPieceSize,
    /// Largest piece taken.
    pub max_piece_size: PaddedPieceSize,
}

impl StorageAsk {
    /// Why a proposal does not meet this ask, if it does not. Pure: the provider's acceptance
    /// policy, applied to the proposal's terms.
    pub fn refuses(
        &self,
        proposal: &crate::domain::storage::StorageDealProposal,
    ) -> Option<String> {
        let size = proposal.piece_size;
        if size < self.min_piece_size || size > self.max_piece_size {
            return Some(format!(
                "piece size {} is outside {}..={}",
                size.0, self.min_piece_size.0, self.max_piece_size.0
            ));
        }
        // price per epoch for this piece = price per GiB-epoch × size / GiB, rounded up.
        let gib = 1u128 << 30;
        let wanted = (self.price_per_gib_epoch.0 * u128::from(size.0)).div_ceil(gib);
        (proposal.storage_price_per_epoch.0 < wanted).then(|| {
            format!(
                "price {} per epoch is below the ask of {wanted} for {} bytes",
                proposal.storage_price_per_epoch.0, size.0
            )
        })
    }
}

/// Domain separation for status query signatures.
const STATUS_QUERY_CONTEXT: &str = "dealledger/storage-status-query/1";

/// A client's question about one of its deals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusQuery {
    /// The deal, by proposal CID.
    pub proposal_cid: Cid,
    /// The asking client.
    pub client: crate::domain::PartyKey,
}

/// A status query signed by the client it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStatusQuery {
    /// The question.
    pub query: StatusQuery,
    /// The client's signature over it.
    pub signature: ed25519_dalek::Signature,
}

impl SignedStatusQuery {
    /// Signs a query about `proposal_cid` with the client's key.
    pub fn sign(proposal_cid: Cid, client_key: &ed25519_dalek::SigningKey) -> Self {
        let query = StatusQuery { proposal_cid, client: crate::domain::PartyKey::of(client_key) };
        let signature = crate::domain::sign(STATUS_QUERY_CONTEXT, &query, client_key);
        Self { query, signature }
    }

    /// Whether the signature is the named client's.
    pub fn verifies(&self) -> bool {
        crate::domain::verify(
            STATUS_QUERY_CONTEXT,
            &self.query,
            &self.query.client,
            &self.signature,
        )
    }
}

/// What a peer asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MarketRequest {
    /// The provider's current ask.
    Ask,
    /// A signed proposal (storage flow step 1).
    Propose(Box<ClientDealProposal>),
    /// The status of a deal, asked by its client (signed, so only the client learns it).
    Status(Box<SignedStatusQuery>),
    /// Opens (or reopens) the push of a deal's data; the answer says where to resume.
    TransferOpen { proposal_cid: Cid, total_bytes: u64 },
    /// The bytes at `offset` of the deal's data.
    TransferChunk {
        proposal_cid: Cid,
        offset: u64,
        /// As bytes, not a sequence: the same wire format, copied at once, not byte by byte.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Every byte was sent: verify the piece.
    TransferFinish { proposal_cid: Cid },
    /// Does the provider have this piece, and at what price?
    RetrievalQuery { piece_cid: crate::domain::PieceCid },
    /// Retrieval terms (seed retrieval step 2a).
    RetrievalPropose(Box<crate::domain::retrieval::RetrievalDealProposal>),
    /// The next bytes of a retrieval deal's part, from `offset` (steps 2h-2i).
    RetrievalPull { deal_stream: uuid::Uuid, offset: u64 },
    /// A voucher for the bytes received so far.
    RetrievalPay { deal_stream: uuid::Uuid, voucher: Box<crate::domain::retrieval::SignedVoucher> },
    /// Retrieval terms for the client's deal `client_deal`: the provider's deal stream is
    /// [`provider_retrieval_stream`] of the sender and that id, so both sides know it, and
    /// proposing again (after a crash) answers the same deal.
    RetrievalProposeFor {
        terms: Box<crate::domain::retrieval::RetrievalDealProposal>,
        client_deal: uuid::Uuid,
    },
    /// The client cancelled `deal`, and why: the provider cancels its side (the transport
    /// authenticates the sender, and only the deal's client is heard).
    Cancel { deal: CancelledDeal, reason: String },
}

/// Which deal a cancel names, as the client knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelledDeal {
    /// A storage deal, by its proposal CID.
    Storage { proposal_cid: Cid },
    /// A retrieval deal, by the client's own deal id (see [`provider_retrieval_stream`]).
    Retrieval { client_deal: uuid::Uuid },
}

/// The provider's stream for a client's retrieval deal: derived from the client (its peer id,
/// which the transport authenticates) and the client's own deal id.
pub fn provider_retrieval_stream(client: &libp2p::PeerId, client_deal: uuid::Uuid) -> uuid::Uuid {
    crate::domain::derived_id(&[
        b"dealledger retrieval provider stream",
        &client.to_bytes(),
        client_deal.as_bytes(),
    ])
}

impl MarketRequest {
    /// The protocol this request travels on.
    pub fn protocol(&self) -> &'static str {
        match self {
            MarketRequest::Ask => ASK_PROTOCOL,
            MarketRequest::Propose(_) => PROPOSE_PROTOCOL,
            MarketRequest::Status(_) => STATUS_PROTOCOL,
            MarketRequest::TransferOpen { .. }
            | MarketRequest::TransferChunk { .. }
            | MarketRequest::TransferFinish { .. } => TRANSFER_PROTOCOL,
            MarketRequest::RetrievalQuery { .. } => RETRIEVAL_QUERY_PROTOCOL,
            MarketRequest::RetrievalPropose(_) | MarketRequest::RetrievalProposeFor { .. } => {
                RETRIEVAL_PROPOSE_PROTOCOL
            }
            MarketRequest::RetrievalPull { .. } | MarketRequest::RetrievalPay { .. } => {
                TRANSFER_PROTOCOL
            }
            MarketRequest::Cancel { .. } => CANCEL_PROTOCOL,
        }
    }
}

/// What a peer answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MarketResponse {
    /// The provider's ask.
    Ask(StorageAsk),
    /// The proposal is accepted: the counter-signed deal (step 2).
    Accepted(Box<StorageDeal>),
    /// The proposal is rejected, and why.
    Rejected { reason: String },
    /// A deal's status on the provider's side.
    Status {
        state: String,
        code: u16,
        deal_id: Option<u64>,
        message: Option<String>,
        publish_message: Option<Cid>,
    },
    /// The request could not be served (unknown deal, internal failure), and why.
    Error { reason: String },
    /// The push is open; send from this offset (the last one the provider recorded).
    TransferAccepted { resume_from: u64 },
    /// Bytes received and kept so far.
    ChunkAcknowledged { received: u64 },
    /// The data was checked against the proposal's piece commitment.
    TransferVerified { verified: bool, reason: Option<String> },
    /// Whether the piece is here (and how many bytes), and the provider's retrieval prices.
    RetrievalQuote { available: bool, bytes: u64, ask: RetrievalAsk },
    /// The retrieval terms are accepted; the provider's deal is this stream (2b-2c).
    RetrievalAccepted { deal_stream: uuid::Uuid },
    /// The piece is not stored here.
    RetrievalDealNotFound,
    /// Bytes of the part from `offset`; sending stops while a payment is due (`owed` in total,
    /// `last` for the final one); `complete` once everything is sent and paid.
    RetrievalBlocks {
        offset: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        payment_due: Option<(TokenAmount, bool)>,
        complete: bool,
    },
    /// The voucher was taken; `complete` when it was the last payment.
    PaymentAccepted { paid: TokenAmount, complete: bool },
    /// The provider's side of a cancelled deal is now in `state`.
    CancelAcknowledged { state: String },
}
