//! A CID's text, written without the detours of `Cid`'s `Display`.
//!
//! Every status row carries two or three CIDs as text, and a rebuild writes 100k rows at a
//! time: `Display` for a CIDv1 collects the CID's bytes into a fresh `Vec`, hands them to a
//! general multibase encoder and copies the result through the formatter, which made CID
//! text half the cost of building a storage row. [`cid_text`] writes the same text (CIDv1:
//! `b` and the lowercase, unpadded RFC 4648 base32 of its bytes) from a buffer on the stack
//! into one exactly sized string. CIDv0, which prints as bare base58btc, goes through
//! `Display` as before.

use cid::Cid;

/// RFC 4648 base32, lowercase: multibase `b`, the text of every CIDv1.
const BASE32_LOWER: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// The longest CID whose bytes go through the stack buffer: version and codec varints, the
/// multihash's code and length varints, and a digest of up to 64 bytes (the multihash size
/// the `cid` crate is built with). Longer ones cannot occur, but would still print correctly.
const MAX_CID_BYTES: usize = 4 * 10 + 64;

/// `cid.to_string()`, exactly, and faster for CIDv1.
pub fn cid_text(cid: &Cid) -> String {
    let mut bytes = [0u8; MAX_CID_BYTES];
    let length = match cid.write_bytes(&mut bytes[..]) {
        Ok(length) if cid.version() == cid::Version::V1 => length,
        _ => return cid.to_string(),
    };
    let bytes = &bytes[..length];
    let mut text = String::with_capacity(1 + (length * 8).div_ceil(5));
    text.push('b');
    for group in bytes.chunks(5) {
        let mut block = [0u8; 5];
        block[..group.len()].copy_from_slice(group);
        let bits = u64::from_be_bytes([0, 0, 0, block[0], block[1], block[2], block[3], block[4]]);
        // Each full group of 5 bytes is 8 characters; a last, shorter one is as many as its
        // bits need, without padding.
        let characters = (group.len() * 8).div_ceil(5);
        for index in 0..characters {
            let value = (bits >> (35 - 5 * index)) & 0x1f;
            text.push(char::from(BASE32_LOWER[value as usize]));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cid_of(codec: u64, code: u64, digest: &[u8]) -> Cid {
        let hash =
            multihash::Multihash::<64>::wrap(code, digest).expect("a digest of 64 bytes or less");
        Cid::new_v1(codec, hash)
    }

    #[test]
    fn writes_a_piece_cid_as_its_display_does() {
        // Given the piece CID of a commitment, whose text starts as every piece CID's does
        let cid = crate::domain::PieceCid::from_commitment([7; 32]).cid();
        // Then both texts are the same
        assert_eq!(cid_text(&cid), cid.to_string());
        assert!(cid_text(&cid).starts_with("baga6ea4sea"));
    }

    #[test]
    fn writes_a_cidv0_as_bare_base58() {
        let cid = Cid::new_v0(multihash::Multihash::<64>::wrap(0x12, &[9; 32]).unwrap()).unwrap();
        assert_eq!(cid_text(&cid), cid.to_string());
        assert!(cid_text(&cid).starts_with("Qm"));
    }

    proptest! {
        #[test]
        fn writes_any_cidv1_as_its_display_does(
            codec in prop_oneof![Just(0x55u64), Just(0x71), Just(0xf101), any::<u64>()],
            code in prop_oneof![Just(0x12u64), Just(0x1012), Just(0xb220), any::<u64>()],
            digest in proptest::collection::vec(any::<u8>(), 0..=64),
        ) {
            let cid = cid_of(codec, code, &digest);
            prop_assert_eq!(cid_text(&cid), cid.to_string());
        }
    }
}
