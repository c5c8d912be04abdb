//! Filecoin piece commitments (commP) as CIDs.

use std::fmt;
use std::str::FromStr;

use cid::Cid;
use serde::{Deserialize, Serialize};

/// Multicodec `fil-commitment-unsealed`: the codec of every piece CID.
pub const FIL_COMMITMENT_UNSEALED: u64 = 0xf101;
/// Multihash `sha2-256-trunc254-padded`: the hash of every piece CID.
pub const SHA2_256_TRUNC254_PADDED: u64 = 0x1012;

/// A piece CID: CIDv1, codec fil-commitment-unsealed, multihash sha2-256-trunc254-padded with a
/// 32-byte digest. Only constructible through validation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Cid", into = "Cid")]
pub struct PieceCid(Cid);

/// Why a CID is not a piece CID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PieceError {
    /// Not parseable as a CID at all.
    #[error("not a CID: {0}")]
    Malformed(String),
    /// A CID, but with another codec (for example a payload CID passed as the piece).
    #[error("piece CID must have codec fil-commitment-unsealed (0xf101), found {0:#x}")]
    WrongCodec(u64),
    /// A CID with the right codec but another hash function.
    #[error("piece CID must use sha2-256-trunc254-padded (0x1012), found {0:#x}")]
    WrongHash(u64),
    /// The digest is not 32 bytes.
    #[error("piece commitment must be 32 bytes, found {0}")]
    WrongDigestLength(usize),
}

impl PieceCid {
    /// Builds the piece CID of a 32-byte commitment. The top two bits of the last byte are
    /// cleared, as sha2-256-trunc254 requires.
    pub fn from_commitment(mut commitment: [u8; 32]) -> Self {
        commitment[31] &= 0b0011_1111;
        let hash = multihash::Multihash::<64>::wrap(SHA2_256_TRUNC254_PADDED, &commitment)
            .expect("a 32-byte digest fits a 64-byte multihash");
        Self(Cid::new_v1(FIL_COMMITMENT_UNSEALED, hash))
    }

    /// The CID.
    pub fn cid(&self) -> Cid {
        self.0
    }

    /// The 32-byte commitment.
    pub fn commitment(&self) -> &[u8] {
        self.0.hash().digest()
    }
}

impl TryFrom<Cid> for PieceCid {
    type Error = PieceError;

    fn try_from(cid: Cid) -> Result<Self, PieceError> {
        if cid.codec() != FIL_COMMITMENT_UNSEALED {
            return Err(PieceError::WrongCodec(cid.codec()));
        }
        if cid.hash().code() != SHA2_256_TRUNC254_PADDED {
            return Err(PieceError::WrongHash(cid.hash().code()));
        }
        if cid.hash().digest().len() != 32 {
            return Err(PieceError::WrongDigestLength(cid.hash().digest().len()));
        }
        Ok(Self(cid))
    }
}

impl From<PieceCid> for Cid {
    fn from(piece: PieceCid) -> Cid {
        piece.0
    }
}

impl FromStr for PieceCid {
    type Err = PieceError;

    fn from_str(text: &str) -> Result<Self, PieceError> {
        let cid = Cid::from_str(text).map_err(|e| PieceError::Malformed(e.to_string()))?;
        Self::try_from(cid)
    }
}

impl fmt::Display for PieceCid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&super::cid_text(&self.0))
    }
}

impl fmt::Debug for PieceCid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PieceCid({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_commitment_cid_and_round_trips_through_text() {
        let piece = PieceCid::from_commitment([7; 32]);
        let text = piece.to_string();
        assert!(text.starts_with("baga6ea4sea"), "{text}");
        assert_eq!(text.parse::<PieceCid>(), Ok(piece));
    }

    #[test]
    fn rejects_a_payload_cid_as_a_piece() {
        let raw = crate::events::chain::cid_of_bytes(b"payload");
        assert_eq!(PieceCid::try_from(raw), Err(PieceError::WrongCodec(0x55)));
        assert!(matches!("not-a-cid".parse::<PieceCid>(), Err(PieceError::Malformed(_))));
    }
}
