//! The retrieval documents of the seed's retrieval flow: a retrieval deal fetches one part of a
//! piece and is paid through a payment channel as bytes arrive; a retrieval request is the
//! client's view of the whole piece, fetched through one or more deals.

use std::fmt;

use cid::Cid;
use ed25519_dalek::{Signature, SigningKey};
use serde::{Deserialize, Serialize};

use super::{PartyKey, PieceCid, TokenAmount, sign, verify};

/// Domain separation for payment vouchers.
const VOUCHER_CONTEXT: &str = "dealledger/payment-voucher/1";

/// A contiguous byte range of a piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ByteRange {
    /// First byte, from the start of the piece.
    pub offset: u64,
    /// Number of bytes; at least one.
    pub length: u64,
}

/// The on-chain address of a payment channel (the only on-chain part of a retrieval).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChannelAddress(pub String);

impl fmt::Display for ChannelAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The terms of one retrieval deal (the seed's `RetrievalDeal`): not signed, simply proposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetrievalDealProposal {
    /// The root of the data the client wants.
    pub payload_cid: Cid,
    /// The piece holding it, when the client knows it.
    pub piece_cid: Option<PieceCid>,
    /// The part of the piece this deal transfers.
    pub part: ByteRange,
    /// Price per byte sent, in attoFIL.
    pub price_per_byte: TokenAmount,
    /// Bytes the provider sends before it asks for the first payment.
    pub payment_interval: u64,
    /// How much the interval grows after each payment, in bytes (trust grows as data flows).
    pub payment_interval_increase: u64,
    /// One-off price to unseal the sector, in attoFIL.
    pub unseal_price: TokenAmount,
    /// The party fetching and paying.
    pub client: PartyKey,
    /// The party sending and getting paid.
    pub provider: PartyKey,
}

/// Why retrieval terms or a voucher are not acceptable. Bad input: nothing is recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetrievalTermsError {
    /// A deal must move at least one byte.
    #[error("a retrieval deal must cover at least one byte")]
    EmptyPart,
    /// The payment interval is zero: the provider would ask for payment before sending.
    #[error("payment interval must be at least one byte")]
    ZeroPaymentInterval,
    /// The byte range or the price overflows.
    #[error("the part or its price overflows")]
    Overflow,
    /// Client and provider are the same key.
    #[error("client and provider are the same party")]
    SelfDeal,
    /// The voucher's signature does not verify against the client's key.
    #[error("voucher signature does not verify for client {client}")]
    BadVoucherSignature { client: PartyKey },
    /// A voucher must pay more than every earlier voucher of the lane.
    #[error("voucher for {amount} does not exceed the {previous} already paid")]
    VoucherNotIncreasing { amount: TokenAmount, previous: TokenAmount },
}

impl RetrievalDealProposal {
    /// Checks the terms on their own.
    pub fn validate(&self) -> Result<(), RetrievalTermsError> {
        if self.part.length == 0 {
            return Err(RetrievalTermsError::EmptyPart);
        }
        if self.payment_interval == 0 {
            return Err(RetrievalTermsError::ZeroPaymentInterval);
        }
        if self.part.offset.checked_add(self.part.length).is_none() || self.total_price().is_none()
        {
            return Err(RetrievalTermsError::Overflow);
        }
        if self.client == self.provider {
            return Err(RetrievalTermsError::SelfDeal);
        }
        Ok(())
    }

    /// What `bytes` bytes cost, including the unseal price.
    pub fn price_of(&self, bytes: u64) -> Option<TokenAmount> {
        self.price_per_byte.checked_mul(u128::from(bytes))?.checked_add(self.unseal_price)
    }

    /// What the whole part costs, including the unseal price.
    pub fn total_price(&self) -> Option<TokenAmount> {
        self.price_of(self.part.length)
    }

    /// Bytes that may be sent before the payment after the `payments`-th one is due: the
    /// interval, grown by the increase after each payment, capped at the part's length.
    pub fn bytes_unlocked_after(&self, payments: u32) -> u64 {
        let mut unlocked = 0u64;
        let mut interval = self.payment_interval;
        for _ in 0..=payments {
            unlocked = unlocked.saturating_add(interval);
            interval = interval.saturating_add(self.payment_interval_increase);
        }
        unlocked.min(self.part.length)
    }
}

/// A cumulative payment through a payment channel lane, signed by the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentVoucher {
    /// The channel paid through.
    pub channel: ChannelAddress,
    /// The channel lane dedicated to this deal.
    pub lane: u64,
    /// Increases with every voucher of the lane.
    pub nonce: u64,
    /// Total paid on this lane so far, in attoFIL (cumulative, not a delta).
    pub amount: TokenAmount,
}

/// A voucher with the client's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedVoucher {
    /// The voucher.
    pub voucher: PaymentVoucher,
    /// The client's signature over it.
    pub signature: Signature,
}

impl SignedVoucher {
    /// Signs a voucher with the client's key.
    pub fn sign(voucher: PaymentVoucher, client_key: &SigningKey) -> Self {
        let signature = sign(VOUCHER_CONTEXT, &voucher, client_key);
        Self { voucher, signature }
    }

    /// Checks the signature against the client's key.
    pub fn verify(&self, client: &PartyKey) -> Result<(), RetrievalTermsError> {
        if verify(VOUCHER_CONTEXT, &self.voucher, client, &self.signature) {
            Ok(())
        } else {
            Err(RetrievalTermsError::BadVoucherSignature { client: *client })
        }
    }
}

/// The client's request for a whole piece (or payload), split into parts each fetched by its own
/// retrieval deal (seed goal 2: trust is built part by part, tracked as one whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetrievalRequest {
    /// The root of the data wanted.
    pub payload_cid: Cid,
    /// The piece holding it.
    pub piece_cid: Option<PieceCid>,
    /// Total bytes to fetch.
    pub total_bytes: u64,
    /// Bytes per retrieval deal.
    pub part_size: u64,
    /// The provider to fetch from.
    pub provider: PartyKey,
    /// The client fetching.
    pub client: PartyKey,
    /// The most the client pays per byte, in attoFIL.
    pub max_price_per_byte: TokenAmount,
}

impl RetrievalRequest {
    /// The parts, in order, that the deals of this request fetch.
    pub fn parts(&self) -> Vec<ByteRange> {
        let part_size = self.part_size.max(1);
        (0..self.total_bytes.div_ceil(part_size))
            .map(|i| {
                let offset = i * part_size;
                ByteRange { offset, length: part_size.min(self.total_bytes - offset) }
            })
            .collect()
    }
}
