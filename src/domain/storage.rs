//! The storage deal documents of the seed's storage flow, steps 1-2: the client signs a
//! proposal, the provider counter-signs it into a deal.

use cid::Cid;
use ed25519_dalek::{Signature, SigningKey};
use serde::{Deserialize, Serialize};

use super::{ChainEpoch, PaddedPieceSize, PartyKey, PieceCid, TokenAmount, sign, verify};
use crate::events::chain::cid_of_bytes;

/// Domain separation for client signatures over proposals.
const CLIENT_SIGNATURE_CONTEXT: &str = "dealledger/storage-deal-proposal/1";
/// Domain separation for provider signatures over signed proposals.
const PROVIDER_SIGNATURE_CONTEXT: &str = "dealledger/storage-deal/1";

/// Epochs per day at 30-second epochs.
pub const EPOCHS_PER_DAY: i64 = 2_880;

/// What a storage deal is: which piece, between whom, for how long, at what price. Amounts are
/// unsigned attoFIL, so a negative price or collateral cannot even be expressed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageDealProposal {
    /// The piece commitment (commP) of the data to store.
    pub piece_cid: PieceCid,
    /// Padded size of the piece, in bytes.
    pub piece_size: PaddedPieceSize,
    /// Whether the deal uses verified-client datacap.
    pub verified_deal: bool,
    /// The client: pays for storage, signs the proposal.
    pub client: PartyKey,
    /// The provider: stores the piece, counter-signs the deal.
    pub provider: PartyKey,
    /// Free text the client attaches (often the payload CID).
    pub label: String,
    /// First epoch the piece must be proven in.
    pub start_epoch: ChainEpoch,
    /// Epoch the deal ends; strictly after `start_epoch`.
    pub end_epoch: ChainEpoch,
    /// Price of storage per epoch, in attoFIL.
    pub storage_price_per_epoch: TokenAmount,
    /// What the provider forfeits if it fails the deal, in attoFIL.
    pub provider_collateral: TokenAmount,
    /// What the client locks as collateral, in attoFIL.
    pub client_collateral: TokenAmount,
}

/// Limits a provider (or client) applies to proposals. Defaults: 180 to 540 days of 30-second
/// epochs, labels up to 256 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealPolicy {
    /// Shortest deal accepted, in epochs.
    pub min_duration: i64,
    /// Longest deal accepted, in epochs.
    pub max_duration: i64,
    /// Longest label accepted, in bytes.
    pub max_label_bytes: usize,
}

impl Default for DealPolicy {
    fn default() -> Self {
        Self {
            min_duration: 180 * EPOCHS_PER_DAY,
            max_duration: 540 * EPOCHS_PER_DAY,
            max_label_bytes: 256,
        }
    }
}

/// Why a proposal or deal document is not acceptable. Each is bad input: the caller gets the
/// error and nothing is recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposalError {
    /// The client's signature does not verify against the proposal's client key.
    #[error("client signature does not verify for client {client}")]
    BadClientSignature { client: PartyKey },
    /// The provider's signature does not verify against the proposal's provider key.
    #[error("provider signature does not verify for provider {provider}")]
    BadProviderSignature { provider: PartyKey },
    /// The padded piece size is not a power of two of at least 128 bytes.
    #[error("piece size {size} is not a power of two of at least 128 bytes")]
    InvalidPieceSize { size: u64 },
    /// The deal would end at or before its start.
    #[error("end epoch {end} is not after start epoch {start}")]
    EndNotAfterStart { start: i64, end: i64 },
    /// The deal starts before the chain's genesis.
    #[error("start epoch {start} is negative")]
    NegativeStartEpoch { start: i64 },
    /// The deal is shorter or longer than the policy allows.
    #[error("duration of {duration} epochs is outside {min}..={max}")]
    DurationOutOfBounds { duration: i64, min: i64, max: i64 },
    /// The label is longer than the policy allows.
    #[error("label of {length} bytes exceeds {max} bytes")]
    LabelTooLong { length: usize, max: usize },
    /// The total price overflows: the amounts are absurd.
    #[error("total price overflows (price per epoch {price_per_epoch} over {duration} epochs)")]
    PriceOverflow { price_per_epoch: TokenAmount, duration: i64 },
    /// Client and provider are the same key.
    #[error("client and provider are the same party")]
    SelfDeal,
    /// The deal would start at or before the current epoch: it could never be sealed in time.
    #[error("start epoch {start} is not after the current epoch {current}")]
    StartEpochElapsed { start: i64, current: i64 },
}

impl StorageDealProposal {
    /// Length of the deal in epochs.
    pub fn duration(&self) -> i64 {
        self.end_epoch.0 - self.start_epoch.0
    }

    /// Price per epoch × duration, or `None` on overflow.
    pub fn total_storage_fee(&self) -> Option<TokenAmount> {
        let duration = u128::try_from(self.duration()).ok()?;
        self.storage_price_per_epoch.checked_mul(duration)
    }

    /// What the client must have locked in the market: the storage fee plus its collateral.
    pub fn client_balance_requirement(&self) -> Option<TokenAmount> {
        self.total_storage_fee()?.checked_add(self.client_collateral)
    }

    /// What the provider must have locked in the market: its collateral.
    pub fn provider_balance_requirement(&self) -> TokenAmount {
        self.provider_collateral
    }

    /// Checks everything about the proposal that does not depend on the chain's state.
    pub fn validate(&self, policy: &DealPolicy) -> Result<(), ProposalError> {
        if !self.piece_size.is_valid() {
            return Err(ProposalError::InvalidPieceSize { size: self.piece_size.0 });
        }
        if self.start_epoch.0 < 0 {
            return Err(ProposalError::NegativeStartEpoch { start: self.start_epoch.0 });
        }
        if self.end_epoch <= self.start_epoch {
            return Err(ProposalError::EndNotAfterStart {
                start: self.start_epoch.0,
                end: self.end_epoch.0,
            });
        }
        let duration = self.duration();
        if duration < policy.min_duration || duration > policy.max_duration {
            return Err(ProposalError::DurationOutOfBounds {
                duration,
                min: policy.min_duration,
                max: policy.max_duration,
            });
        }
        if self.label.len() > policy.max_label_bytes {
            return Err(ProposalError::LabelTooLong {
                length: self.label.len(),
                max: policy.max_label_bytes,
            });
        }
        if self.client == self.provider {
            return Err(ProposalError::SelfDeal);
        }
        if self.client_balance_requirement().is_none() {
            return Err(ProposalError::PriceOverflow {
                price_per_epoch: self.storage_price_per_epoch,
                duration,
            });
        }
        Ok(())
    }
}

/// A proposal signed by its client (storage flow step 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientDealProposal {
    /// The proposal.
    pub proposal: StorageDealProposal,
    /// The client's signature over the proposal.
    pub client_signature: Signature,
}

impl ClientDealProposal {
    /// Signs `proposal` with the client's key.
    pub fn sign(proposal: StorageDealProposal, client_key: &SigningKey) -> Self {
        let client_signature = sign(CLIENT_SIGNATURE_CONTEXT, &proposal, client_key);
        Self { proposal, client_signature }
    }

    /// Checks the client's signature.
    pub fn verify(&self) -> Result<(), ProposalError> {
        let client = self.proposal.client;
        if verify(CLIENT_SIGNATURE_CONTEXT, &self.proposal, &client, &self.client_signature) {
            Ok(())
        } else {
            Err(ProposalError::BadClientSignature { client })
        }
    }

    /// Validates the proposal, then the signature.
    pub fn validate(&self, policy: &DealPolicy) -> Result<(), ProposalError> {
        self.proposal.validate(policy)?;
        self.verify()
    }

    /// The proposal CID: how both sides and the chain name this deal before it has a deal id.
    pub fn cid(&self) -> Cid {
        cid_of_bytes(&postcard::to_stdvec(self).unwrap_or_default())
    }
}

/// A signed proposal counter-signed by the provider (storage flow step 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageDeal {
    /// The client-signed proposal.
    pub client_proposal: ClientDealProposal,
    /// The provider's signature over the client-signed proposal.
    pub provider_signature: Signature,
}

impl StorageDeal {
    /// Counter-signs a client proposal with the provider's key.
    pub fn sign(client_proposal: ClientDealProposal, provider_key: &SigningKey) -> Self {
        let provider_signature = sign(PROVIDER_SIGNATURE_CONTEXT, &client_proposal, provider_key);
        Self { client_proposal, provider_signature }
    }

    /// Checks both signatures.
    pub fn verify(&self) -> Result<(), ProposalError> {
        self.client_proposal.verify()?;
        self.verify_provider_signature()
    }

    /// Checks the provider's signature only. For a machine that has already checked that the
    /// signed deal's client proposal equals the one it verified when the deal began: the
    /// client's signature is then known good, and checking it again (an ed25519
    /// verification, the costliest step of accepting a deal) would prove nothing new.
    pub fn verify_provider_signature(&self) -> Result<(), ProposalError> {
        let provider = self.client_proposal.proposal.provider;
        if verify(
            PROVIDER_SIGNATURE_CONTEXT,
            &self.client_proposal,
            &provider,
            &self.provider_signature,
        ) {
            Ok(())
        } else {
            Err(ProposalError::BadProviderSignature { provider })
        }
    }
}
