//! Domain types shared by the machines: parties, amounts, epochs, pieces, and the storage and
//! retrieval deal documents of the seed design. Plain data with validation; no I/O.

pub mod cid_text;
pub mod piece;
pub mod retrieval;
pub mod storage;
pub mod units;

pub use cid_text::cid_text;
pub use piece::{PieceCid, PieceError};
pub use units::{ChainEpoch, DealId, PaddedPieceSize, PartyKey, SectorNumber, TokenAmount};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use serde::Serialize;

/// Signs `value` under a domain-separation `context`, so that a signature over one kind of
/// document can never be replayed as a signature over another.
pub fn sign<T: Serialize>(context: &str, value: &T, key: &SigningKey) -> Signature {
    key.sign(&signing_bytes(context, value))
}

/// Checks a signature made by [`sign`] with the same `context`.
pub fn verify<T: Serialize>(
    context: &str,
    value: &T,
    signer: &PartyKey,
    signature: &Signature,
) -> bool {
    signer
        .verifying_key()
        .is_ok_and(|key| key.verify(&signing_bytes(context, value), signature).is_ok())
}

fn signing_bytes<T: Serialize>(context: &str, value: &T) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(128);
    bytes.extend_from_slice(context.as_bytes());
    bytes.push(0);
    // postcard into a Vec only fails for types serde cannot describe; ours are plain data.
    bytes.extend(postcard::to_stdvec(value).unwrap_or_default());
    bytes
}

/// A stable id derived from its parts (sha2-256 of them, in order, cut to 128 bits): the same
/// parts always name the same stream, so a command repeated after a crash finds the stream the
/// first one made instead of starting another.
pub fn derived_id(parts: &[&[u8]]) -> uuid::Uuid {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part);
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}
