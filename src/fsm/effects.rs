//! Effects: what must happen in the outside world when a deal enters a state. They are data,
//! written to the outbox in the same transaction as the events that caused them; the effect
//! runner performs them through adapters, and every result comes back as a new command.

use cid::Cid;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::retrieval::{ByteRange, ChannelAddress, RetrievalDealProposal, SignedVoucher};
use crate::domain::storage::{ClientDealProposal, StorageDeal};
use crate::domain::{ChainEpoch, DealId, PaddedPieceSize, PartyKey, PieceCid, TokenAmount};

/// One thing the outside world must do. Appended variants only (postcard stores by position).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// Lock `amount` of `wallet`'s market balance for this deal (adding funds if needed).
    ReserveFunds { wallet: PartyKey, amount: TokenAmount },
    /// Wait for the on-chain message that adds market funds.
    WaitForFunding { wallet: PartyKey, message: Option<Cid> },
    /// Give back whatever this deal still has reserved.
    ReleaseFunds { wallet: PartyKey, amount: TokenAmount },
    /// Send a message to a counterparty over the network.
    Send { to: PartyKey, message: OutboundMessage },
    /// Open a data transfer for this deal.
    OpenTransfer { counterparty: PartyKey, direction: TransferDirection, range: Option<ByteRange> },
    /// Ask the transfer layer to restart an interrupted transfer.
    RestartTransfer { counterparty: PartyKey },
    /// Wait for the counterparty to restart an interrupted transfer.
    AwaitTransferRestart { counterparty: PartyKey },
    /// Close this deal's transfer, if one is open.
    CloseTransfer { counterparty: PartyKey },
    /// Ask the provider's acceptance policy (price, capacity) whether to take the proposal.
    DecideOnProposal { proposal_cid: Cid },
    /// Recompute the piece commitment of the received data and compare.
    VerifyPieceCommitment { expected: PieceCid, size: PaddedPieceSize },
    /// Publish the deal to the storage market actor.
    PublishDeal { deal: Box<StorageDeal> },
    /// Wait for a chain message to land and report its outcome.
    WaitForMessage { message: Cid },
    /// Check on chain that the deal the provider reported is the one proposed.
    VerifyDealOnChain { deal_id: DealId, proposal_cid: Cid },
    /// Hand the piece to the sealing pipeline.
    HandOffToSealing { deal_id: DealId, piece_cid: PieceCid, size: PaddedPieceSize },
    /// Watch the chain for the deal's sector to be pre-committed.
    WatchPreCommit { deal_id: DealId },
    /// Watch the chain for the deal to be activated.
    WatchActivation { deal_id: DealId },
    /// Watch the chain for the deal to expire or be slashed.
    WatchExpiry { deal_id: DealId, end_epoch: ChainEpoch },
    /// Remove staged copies of the piece once it is sealed.
    CleanUpStagedData { piece_cid: PieceCid },
    /// Unseal the sector holding the piece for retrieval.
    UnsealPiece { piece_cid: Option<PieceCid>, payload_cid: Cid },
    /// Create a payment channel (or add funds to the existing one) to the provider.
    SetUpPaymentChannel { provider: PartyKey, amount: TokenAmount },
    /// Wait for the payment channel message.
    WaitForPaymentChannel { provider: PartyKey },
    /// Allocate a lane in the payment channel for this deal.
    AllocateLane { channel: ChannelAddress },
    /// Check the channel has funds for `amount` more.
    CheckFunds { channel: ChannelAddress, amount: TokenAmount },
    /// Redeem the best voucher of the deal on chain.
    RedeemVoucher { voucher: Box<SignedVoucher> },
    /// Verify that every byte of the part arrived and matches.
    VerifyReceivedData { range: ByteRange },
    /// Send a command to another stream of this ledger (a deal telling its request).
    Notify { stream_id: Uuid, stream_type: String, notice: Notice },
    /// Start a retrieval deal for one part of a request.
    StartRetrievalDeal { request_id: Uuid, part_index: u32, range: ByteRange },
    /// Cancel the request's open retrieval deals.
    CancelRetrievalDeals { request_id: Uuid },
    /// Sign a voucher paying `amount` in total on the lane and send it to the provider.
    SendPayment { to: PartyKey, channel: ChannelAddress, lane: u64, amount: TokenAmount },
}

/// Which way the bytes flow, seen from this side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferDirection {
    /// This side sends (storage client, retrieval provider).
    Push,
    /// This side receives (storage provider, retrieval client).
    Pull,
}

/// A network message to a counterparty. Appended variants only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboundMessage {
    /// Client → provider: a signed storage proposal.
    StorageProposal(Box<ClientDealProposal>),
    /// Provider → client: the counter-signed deal.
    StorageAccepted(Box<StorageDeal>),
    /// Provider → client: the proposal was rejected, and why.
    StorageRejected { proposal_cid: Cid, reason: String },
    /// Client → provider: what is the status of this deal?
    StorageStatusQuery { proposal_cid: Cid },
    /// Client → provider: retrieval terms.
    RetrievalProposal(Box<RetrievalDealProposal>),
    /// Provider → client: the retrieval deal is accepted.
    RetrievalAccepted { deal_stream: Uuid },
    /// Provider → client: the retrieval deal is rejected, and why.
    RetrievalRejected { reason: String },
    /// Provider → client: the piece is not here.
    RetrievalDealNotFound,
    /// Provider → client: pay up to `owed` before more bytes flow.
    PaymentRequested { owed: TokenAmount, last: bool },
    /// Client → provider: a voucher.
    Payment(Box<SignedVoucher>),
    /// Provider → client: every byte has been sent and paid.
    RetrievalCompleted,
    /// Either side: the deal is cancelled.
    Cancelled { reason: String },
}

/// What a retrieval deal tells its request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// The deal for part `part_index` completed, paying `paid`.
    PartCompleted { part_index: u32, deal_stream: Uuid, bytes: u64, paid: TokenAmount },
    /// The deal for part `part_index` failed.
    PartFailed { part_index: u32, deal_stream: Uuid, reason: String },
}

impl Effect {
    /// The effect's stable kebab-case name, stored in the outbox beside the payload.
    pub fn name(&self) -> &'static str {
        match self {
            Effect::ReserveFunds { .. } => "reserve-funds",
            Effect::WaitForFunding { .. } => "wait-for-funding",
            Effect::ReleaseFunds { .. } => "release-funds",
            Effect::Send { .. } => "send",
            Effect::OpenTransfer { .. } => "open-transfer",
            Effect::RestartTransfer { .. } => "restart-transfer",
            Effect::AwaitTransferRestart { .. } => "await-transfer-restart",
            Effect::CloseTransfer { .. } => "close-transfer",
            Effect::DecideOnProposal { .. } => "decide-on-proposal",
            Effect::VerifyPieceCommitment { .. } => "verify-piece-commitment",
            Effect::PublishDeal { .. } => "publish-deal",
            Effect::WaitForMessage { .. } => "wait-for-message",
            Effect::VerifyDealOnChain { .. } => "verify-deal-on-chain",
            Effect::HandOffToSealing { .. } => "hand-off-to-sealing",
            Effect::WatchPreCommit { .. } => "watch-pre-commit",
            Effect::WatchActivation { .. } => "watch-activation",
            Effect::WatchExpiry { .. } => "watch-expiry",
            Effect::CleanUpStagedData { .. } => "clean-up-staged-data",
            Effect::UnsealPiece { .. } => "unseal-piece",
            Effect::SetUpPaymentChannel { .. } => "set-up-payment-channel",
            Effect::WaitForPaymentChannel { .. } => "wait-for-payment-channel",
            Effect::AllocateLane { .. } => "allocate-lane",
            Effect::CheckFunds { .. } => "check-funds",
            Effect::RedeemVoucher { .. } => "redeem-voucher",
            Effect::VerifyReceivedData { .. } => "verify-received-data",
            Effect::Notify { .. } => "notify",
            Effect::StartRetrievalDeal { .. } => "start-retrieval-deal",
            Effect::CancelRetrievalDeals { .. } => "cancel-retrieval-deals",
            Effect::SendPayment { .. } => "send-payment",
        }
    }
}
