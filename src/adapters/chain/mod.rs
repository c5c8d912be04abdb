//! The chain adapter: what the markets need from a chain (seed: StorageMarketActor and the
//! PaymentChannel actor), behind one [`Chain`] trait with two implementations — [`devnet`], a
//! local chain kept in PostgreSQL, and [`lotus`], a JSON-RPC client for a Lotus full node.
//!
//! Seed goal 4: chain components only update the chain; they never coordinate next steps. The
//! chain answers and reports what it observes ([`DealObservation`]); the effect runner turns
//! that into machine inputs and the machines decide.

pub mod devnet;
pub mod lotus;
pub mod payments;
pub mod sealing;

use std::future::Future;
use std::time::Duration;

use cid::Cid;
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::domain::TokenAmount;
use crate::domain::retrieval::{ChannelAddress, SignedVoucher};
use crate::domain::storage::StorageDeal;
use crate::domain::{ChainEpoch, DealId, PaddedPieceSize, PartyKey, SectorNumber};
use crate::events::chain::cid_of_bytes;
use crate::fsm::FailureClass;

pub use devnet::{Devnet, DevnetConfig};
pub use lotus::Lotus;
pub use payments::PaymentChannels;
pub use sealing::{DevnetSealer, SealingPipeline, SealingStatus};

/// Why a chain call did not go through.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The chain refuses the message for good (bad signature, balance too low, epochs passed):
    /// sending it again gives the same answer.
    #[error("the chain refuses: {reason}")]
    Refused { reason: String },
    /// A balance is short (market escrow, wallet, channel): the same message goes through
    /// once someone adds funds, so the runner retries it and then pauses the deal for an
    /// operator instead of failing it.
    #[error("insufficient funds: {reason}")]
    InsufficientFunds { reason: String },
    /// No such deal, message or channel on this chain.
    #[error("not found on chain: {what}")]
    NotFound { what: String },
    /// This implementation cannot perform the call (a write on a read-only Lotus connection).
    #[error("not supported by this chain: {what}")]
    Unsupported { what: String },
    /// The node answered something this adapter cannot read.
    #[error("malformed chain response: {0}")]
    Malformed(String),
    /// The node could not be reached or failed; the call may be retried.
    #[error("chain unavailable: {0}")]
    Unavailable(String),
    /// The devnet's database failed; the call may be retried.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl ChainError {
    /// Whether retrying the same call later may succeed: the node was away, or a balance was
    /// short.
    pub fn is_transient(&self) -> bool {
        self.class() == FailureClass::Recoverable
    }

    /// Whether the failure can pass (unreachable node, short balance) or is final (a refusal,
    /// an unsupported call, an unreadable answer).
    pub fn class(&self) -> FailureClass {
        match self {
            ChainError::Unavailable(_)
            | ChainError::Database(_)
            | ChainError::InsufficientFunds { .. } => FailureClass::Recoverable,
            ChainError::Refused { .. }
            | ChainError::NotFound { .. }
            | ChainError::Unsupported { .. }
            | ChainError::Malformed(_) => FailureClass::Fatal,
        }
    }
}

/// A participant's balances in the storage market actor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketBalance {
    /// Everything deposited (escrow), locked or not.
    pub escrow: TokenAmount,
    /// The part locked by published deals.
    pub locked: TokenAmount,
}

impl MarketBalance {
    /// What new deals can still lock.
    pub fn available(&self) -> TokenAmount {
        self.escrow.saturating_sub(self.locked)
    }
}

/// Where a message stands, as seen at finality.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageStatus {
    /// Not on chain yet, or not final.
    Pending,
    /// Executed successfully at `epoch`; a publish message carries the new deal's id.
    Landed { epoch: ChainEpoch, deal_id: Option<DealId> },
    /// Executed and failed (exit code non-zero).
    Failed { epoch: ChainEpoch, reason: String },
}

/// A deal's on-chain state, derived from its epochs the way Lotus reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnChainDealState {
    /// Published; not yet in a sector.
    Published,
    /// In a pre-committed sector; not yet proven.
    PreCommitted,
    /// Proven: the sector holding it started at `sector_start_epoch`.
    Active,
    /// The provider failed to keep it: collateral slashed at `slash_epoch`.
    Slashed,
    /// It reached its end epoch and was closed.
    Expired,
    /// It was never activated before its start epoch and was dropped.
    TimedOut,
}

/// What the chain says about one storage deal: the observation the watcher turns into inputs,
/// and what `dealledger chain deal` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealObservation {
    /// The deal's on-chain id.
    pub deal_id: DealId,
    /// The CID of the client's signed proposal, when the chain reports it.
    pub proposal_cid: Option<Cid>,
    /// The piece (a commP CID on a real chain; Lotus's documentation examples use others).
    pub piece_cid: Cid,
    /// The padded piece size.
    pub piece_size: PaddedPieceSize,
    /// The client, as the chain knows it (a key on devnet, an address on Lotus).
    pub client: String,
    /// The provider, as the chain knows it.
    pub provider: String,
    /// First epoch of storage.
    pub start_epoch: ChainEpoch,
    /// Last epoch of storage.
    pub end_epoch: ChainEpoch,
    /// Sector the deal was pre-committed into, when known (devnet only; Lotus does not say).
    pub sector: Option<SectorNumber>,
    /// When the deal was pre-committed, when known.
    pub precommit_epoch: Option<ChainEpoch>,
    /// When the sector holding it was proven (Lotus: `SectorStartEpoch`, -1 = not yet).
    pub sector_start_epoch: Option<ChainEpoch>,
    /// When it was slashed (Lotus: `SlashEpoch`, -1 = never).
    pub slash_epoch: Option<ChainEpoch>,
    /// When it was closed at expiry (devnet) — Lotus removes expired deals instead.
    pub closed_epoch: Option<ChainEpoch>,
    /// When it was dropped for not being activated in time.
    pub timed_out_epoch: Option<ChainEpoch>,
    /// The last epoch its payments were settled.
    pub last_updated_epoch: Option<ChainEpoch>,
}

impl DealObservation {
    /// The deal's state at the epoch of the observation.
    pub fn state(&self) -> OnChainDealState {
        if self.slash_epoch.is_some() {
            OnChainDealState::Slashed
        } else if self.timed_out_epoch.is_some() {
            OnChainDealState::TimedOut
        } else if self.closed_epoch.is_some() {
            OnChainDealState::Expired
        } else if self.sector_start_epoch.is_some() {
            OnChainDealState::Active
        } else if self.precommit_epoch.is_some() {
            OnChainDealState::PreCommitted
        } else {
            OnChainDealState::Published
        }
    }
}

/// A payment channel as the chain holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    /// The channel's address.
    pub address: ChannelAddress,
    /// Who pays (signs vouchers).
    pub from: PartyKey,
    /// Who is paid.
    pub to: PartyKey,
    /// Funds in the channel.
    pub balance: TokenAmount,
    /// The sum of every lane's redeemed voucher amount.
    pub redeemed: TokenAmount,
    /// Lanes allocated so far.
    pub lanes: u64,
    /// When set, the channel can be collected from this epoch.
    pub settling_at: Option<ChainEpoch>,
    /// Whether the funds were paid out.
    pub collected: bool,
}

/// The deterministic id of a chain write, so that performing the same effect twice sends the
/// same message once: the chain keeps the first and answers the second with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageKey(pub Cid);

impl MessageKey {
    /// The key of `kind` performed for `subject` (an effect's stream, version and sequence).
    pub fn of(kind: &str, subject: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(kind.len() + 1 + subject.len());
        bytes.extend_from_slice(kind.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(subject);
        Self(cid_of_bytes(&bytes))
    }
}

/// What the markets need from a chain. Writes take a [`MessageKey`] (or are keyed by the
/// deal itself) so that repeating one is harmless; reads report what is final.
pub trait Chain: Send + Sync + 'static {
    /// The current epoch (the chain head).
    fn head(&self) -> impl Future<Output = Result<ChainEpoch, ChainError>> + Send;

    /// How many epochs an observation must be buried under before it is acted on.
    fn finality(&self) -> i64;

    /// A participant's market balances (seed: CheckLockedBalance).
    fn market_balance(
        &self,
        party: PartyKey,
    ) -> impl Future<Output = Result<MarketBalance, ChainError>> + Send;

    /// Deposits `amount` from the party's wallet into its market escrow (seed: AddBalance,
    /// RegisterParticipant on first use). Returns the message.
    fn add_balance(
        &self,
        party: PartyKey,
        amount: TokenAmount,
        key: MessageKey,
    ) -> impl Future<Output = Result<Cid, ChainError>> + Send;

    /// Withdraws unlocked escrow back to the wallet (seed: WithdrawBalance).
    fn withdraw_balance(
        &self,
        party: PartyKey,
        amount: TokenAmount,
        key: MessageKey,
    ) -> impl Future<Output = Result<Cid, ChainError>> + Send;

    /// Publishes a signed deal (seed: PublishStorageDeal after VerifyStorageDeal). Keyed by
    /// the proposal: publishing the same deal again returns the first message.
    fn publish_storage_deal(
        &self,
        deal: &StorageDeal,
    ) -> impl Future<Output = Result<Cid, ChainError>> + Send;

    /// Where a message stands, at finality.
    fn message_status(
        &self,
        message: Cid,
    ) -> impl Future<Output = Result<MessageStatus, ChainError>> + Send;

    /// A deal's state at finality, or `None` if the chain has no such deal (yet).
    fn deal(
        &self,
        deal_id: DealId,
    ) -> impl Future<Output = Result<Option<DealObservation>, ChainError>> + Send;

    /// Creates the channel from `from` to `to`, or adds funds to it, moving `amount` from the
    /// payer's wallet. Returns the channel's address.
    fn get_or_create_channel(
        &self,
        from: PartyKey,
        to: PartyKey,
        amount: TokenAmount,
        key: MessageKey,
    ) -> impl Future<Output = Result<ChannelAddress, ChainError>> + Send;

    /// The channel from `from` to `to`, if one exists.
    fn channel_between(
        &self,
        from: PartyKey,
        to: PartyKey,
    ) -> impl Future<Output = Result<Option<ChannelAddress>, ChainError>> + Send;

    /// The channel's state.
    fn channel(
        &self,
        channel: &ChannelAddress,
    ) -> impl Future<Output = Result<Option<ChannelState>, ChainError>> + Send;

    /// Allocates a new lane for a deal.
    fn allocate_lane(
        &self,
        channel: &ChannelAddress,
        key: MessageKey,
    ) -> impl Future<Output = Result<u64, ChainError>> + Send;

    /// Whether the channel would accept the voucher (signature of the payer, fresh nonce,
    /// amount covered by the channel's funds).
    fn check_voucher(
        &self,
        voucher: &SignedVoucher,
    ) -> impl Future<Output = Result<(), ChainError>> + Send;

    /// Submits a voucher to its lane. Submitting the voucher already recorded on the lane is a
    /// no-op; a stale nonce or a bad signature is refused. Returns the lane's redeemed total.
    fn submit_voucher(
        &self,
        voucher: &SignedVoucher,
    ) -> impl Future<Output = Result<TokenAmount, ChainError>> + Send;

    /// Starts the channel's settling period; returns the epoch from which it can be collected.
    fn settle(
        &self,
        channel: &ChannelAddress,
    ) -> impl Future<Output = Result<ChainEpoch, ChainError>> + Send;

    /// Pays out a settled channel: redeemed vouchers to the payee, the rest to the payer.
    fn collect(
        &self,
        channel: &ChannelAddress,
    ) -> impl Future<Output = Result<(), ChainError>> + Send;
}

/// Head changes of `chain`, polled every `every`: yields each new head epoch once, in order.
/// Errors are logged and polling goes on; the stream ends only when dropped.
pub fn head_changes<C: Chain + Clone>(
    chain: C,
    every: Duration,
) -> impl Stream<Item = ChainEpoch> + Send {
    futures::stream::unfold((chain, None::<ChainEpoch>), move |(chain, last)| async move {
        loop {
            match chain.head().await {
                Ok(head) if Some(head) != last => return Some((head, (chain, Some(head)))),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "chain head unavailable"),
            }
            tokio::time::sleep(every).await;
        }
    })
}
