//! Newtypes for the market's quantities, so that an epoch is never added to a token amount and
//! a party is always a real ed25519 key.

use std::fmt;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

/// An amount of FIL in attoFIL (10^-18 FIL). Unsigned: a negative amount cannot be written.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct TokenAmount(pub u128);

impl TokenAmount {
    /// Zero attoFIL.
    pub const ZERO: TokenAmount = TokenAmount(0);

    /// Sum, or `None` on overflow (the caller rejects the input).
    pub fn checked_add(self, other: TokenAmount) -> Option<TokenAmount> {
        self.0.checked_add(other.0).map(TokenAmount)
    }

    /// `self × factor`, or `None` on overflow.
    pub fn checked_mul(self, factor: u128) -> Option<TokenAmount> {
        self.0.checked_mul(factor).map(TokenAmount)
    }

    /// `self - other`, floored at zero.
    pub fn saturating_sub(self, other: TokenAmount) -> TokenAmount {
        TokenAmount(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for TokenAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} attoFIL", self.0)
    }
}

/// A chain height; one epoch is 30 seconds on Filecoin mainnet.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ChainEpoch(pub i64);

impl fmt::Display for ChainEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {}", self.0)
    }
}

/// The id the storage market actor gives a published deal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DealId(pub u64);

/// The number of the sector a deal's piece was sealed into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SectorNumber(pub u64);

/// A padded piece size in bytes: a power of two, at least 128 (the Fr32 padding unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PaddedPieceSize(pub u64);

impl PaddedPieceSize {
    /// The smallest padded piece.
    pub const MIN: u64 = 128;

    /// Whether the size is a power of two of at least 128 bytes.
    pub fn is_valid(self) -> bool {
        self.0 >= Self::MIN && self.0.is_power_of_two()
    }

    /// Bytes of user data the padded size holds (127 of every 128 bytes after Fr32 padding).
    pub fn unpadded(self) -> u64 {
        self.0 - self.0 / 128
    }
}

/// A market participant: an ed25519 public key. The same key is the party's libp2p identity,
/// so a provider's peer id and its signing key are one thing; it is shown as that peer id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PartyKey(pub [u8; 32]);

impl PartyKey {
    /// The key of a signing key.
    pub fn of(signing_key: &ed25519_dalek::SigningKey) -> Self {
        Self(signing_key.verifying_key().to_bytes())
    }

    /// The dalek key, or an error when the bytes are not a valid curve point.
    pub fn verifying_key(&self) -> Result<VerifyingKey, ed25519_dalek::SignatureError> {
        VerifyingKey::from_bytes(&self.0)
    }

    /// The key a libp2p peer id was made from, when it is an ed25519 key inlined in the id
    /// (every peer of this market).
    pub fn from_peer_id(peer: &libp2p::PeerId) -> Option<Self> {
        let multihash = peer.as_ref();
        if multihash.code() != 0x00 {
            return None;
        }
        let key = libp2p::identity::PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
        Some(Self(key.try_into_ed25519().ok()?.to_bytes()))
    }

    /// The libp2p peer id of this key, or `None` when the bytes are not a valid key.
    pub fn peer_id(&self) -> Option<libp2p::PeerId> {
        let key = libp2p::identity::ed25519::PublicKey::try_from_bytes(&self.0).ok()?;
        Some(libp2p::PeerId::from_public_key(&key.into()))
    }
}

impl PartyKey {
    /// The peer id text of these key bytes, without checking that they are a curve point:
    /// an identity multihash of the protobuf-encoded ed25519 key, in base58. Equal to
    /// [`PartyKey::peer_id`] for every valid key, and about a hundred times cheaper, which
    /// matters when status tables are rebuilt.
    fn peer_id_text(&self) -> Option<String> {
        // identity multihash (0x00), length 36; protobuf KeyType::Ed25519 (0x08 0x01), Data (0x12 0x20).
        let mut bytes = [0u8; 38];
        bytes[..6].copy_from_slice(&[0x00, 0x24, 0x08, 0x01, 0x12, 0x20]);
        bytes[6..].copy_from_slice(&self.0);
        libp2p::PeerId::from_bytes(&bytes).ok().map(|p| p.to_base58())
    }
}

impl fmt::Display for PartyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A market has few parties and many deals: remember recent texts per thread, and
        // write a remembered one straight from the cache.
        type Texts = std::collections::HashMap<[u8; 32], String, foldhash::fast::RandomState>;
        thread_local! {
            static TEXTS: std::cell::RefCell<Texts> = std::cell::RefCell::default();
        }
        TEXTS.with(|texts| {
            let mut texts = texts.borrow_mut();
            if let Some(text) = texts.get(&self.0) {
                return f.write_str(text);
            }
            let Some(text) = self.peer_id_text() else {
                return write!(f, "invalid-key-{}", hex::encode(self.0));
            };
            if texts.len() >= 4_096 {
                texts.clear();
            }
            f.write_str(&text)?;
            texts.insert(self.0, text);
            Ok(())
        })
    }
}

impl fmt::Debug for PartyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PartyKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_party_is_shown_as_the_peer_id_of_its_key() {
        let key = PartyKey::of(&ed25519_dalek::SigningKey::from_bytes(&[5; 32]));
        let peer = key.peer_id().expect("a valid key");
        assert_eq!(key.to_string(), peer.to_string());
        assert!(key.to_string().starts_with("12D3KooW"));
        assert_eq!(PartyKey::from_peer_id(&peer), Some(key));
    }
}
