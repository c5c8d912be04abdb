//! Example documents with fixed keys: one valid document of each kind. Tests start from these
//! and change one field; benchmarks use them as realistic payloads. The keys are public:
//! never use them for anything but examples.

use std::sync::OnceLock;

use cid::Cid;
use ed25519_dalek::SigningKey;

use crate::domain::retrieval::{
    ByteRange, ChannelAddress, PaymentVoucher, RetrievalDealProposal, RetrievalRequest,
    SignedVoucher,
};
use crate::domain::storage::{
    ClientDealProposal, EPOCHS_PER_DAY, StorageDeal, StorageDealProposal,
};
use crate::domain::{ChainEpoch, PaddedPieceSize, PartyKey, PieceCid, TokenAmount};
use crate::events::chain::cid_of_bytes;

/// The key made of `seed`, derived once per process: deriving a key's public half is a scalar
/// multiplication, and tests and benchmarks ask for these keys for every deal they make.
fn fixed_key(cell: &'static OnceLock<SigningKey>, seed: u8) -> SigningKey {
    cell.get_or_init(|| SigningKey::from_bytes(&[seed; 32])).clone()
}

/// The client's key.
pub fn client_key() -> SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    fixed_key(&KEY, 1)
}

/// The provider's key.
pub fn provider_key() -> SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    fixed_key(&KEY, 2)
}

/// Someone else's key.
pub fn stranger_key() -> SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    fixed_key(&KEY, 3)
}

/// The epoch fixtures are decided at.
pub const NOW: i64 = 1_000;

/// A valid proposal: 2 KiB piece, 200 days from epoch 10,000.
pub fn proposal() -> StorageDealProposal {
    StorageDealProposal {
        piece_cid: PieceCid::from_commitment([9; 32]),
        piece_size: PaddedPieceSize(2048),
        verified_deal: false,
        client: PartyKey::of(&client_key()),
        provider: PartyKey::of(&provider_key()),
        label: "bafy-label".into(),
        start_epoch: ChainEpoch(10_000),
        end_epoch: ChainEpoch(10_000 + 200 * EPOCHS_PER_DAY),
        storage_price_per_epoch: TokenAmount(1_000),
        provider_collateral: TokenAmount(5_000_000),
        client_collateral: TokenAmount(0),
    }
}

/// The valid proposal, signed by the client.
pub fn signed_proposal() -> ClientDealProposal {
    ClientDealProposal::sign(proposal(), &client_key())
}

/// The valid proposal, counter-signed by the provider.
pub fn storage_deal() -> StorageDeal {
    StorageDeal::sign(signed_proposal(), &provider_key())
}

/// A CID standing for a chain message.
pub fn message_cid(tag: &[u8]) -> Cid {
    cid_of_bytes(tag)
}

/// Valid retrieval terms for 1,000 bytes at 2 attoFIL a byte plus 10 to unseal, paid every
/// 300 bytes growing by 100.
pub fn retrieval_terms() -> RetrievalDealProposal {
    RetrievalDealProposal {
        payload_cid: cid_of_bytes(b"payload"),
        piece_cid: Some(PieceCid::from_commitment([9; 32])),
        part: ByteRange { offset: 0, length: 1_000 },
        price_per_byte: TokenAmount(2),
        payment_interval: 300,
        payment_interval_increase: 100,
        unseal_price: TokenAmount(10),
        client: PartyKey::of(&client_key()),
        provider: PartyKey::of(&provider_key()),
    }
}

/// The payment channel of the fixtures.
pub fn channel() -> ChannelAddress {
    ChannelAddress("t2-fixture-channel".into())
}

/// A voucher paying `amount` in total, signed by the client.
pub fn voucher(amount: u128, nonce: u64) -> SignedVoucher {
    SignedVoucher::sign(
        PaymentVoucher { channel: channel(), lane: 0, nonce, amount: TokenAmount(amount) },
        &client_key(),
    )
}

/// A request for 2,500 bytes in parts of 1,000.
pub fn retrieval_request() -> RetrievalRequest {
    RetrievalRequest {
        payload_cid: cid_of_bytes(b"payload"),
        piece_cid: Some(PieceCid::from_commitment([9; 32])),
        total_bytes: 2_500,
        part_size: 1_000,
        provider: PartyKey::of(&provider_key()),
        client: PartyKey::of(&client_key()),
        max_price_per_byte: TokenAmount(2),
    }
}

/// A failed attempt of an effect, the runner trying again.
pub fn attempt_failed() -> crate::fsm::failure::AttemptFailed {
    crate::fsm::failure::AttemptFailed {
        effect: "publish-deal".into(),
        attempt: 1,
        reason: "chain unavailable".into(),
        retry_at_ms: 1_700_000_000_000,
    }
}

/// An effect past its attempts.
pub fn stalled() -> crate::fsm::failure::Stalled {
    crate::fsm::failure::Stalled {
        effect: "publish-deal".into(),
        attempts: 5,
        reason: "market balance too low".into(),
    }
}
