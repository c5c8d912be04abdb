//! Filecoin piece commitments (commP), computed as the bytes stream by, in constant memory.
//!
//! The data is zero-filled to a whole number of 127-byte quads and Fr32-padded (every 254 bits
//! get two zero bits, so 127 bytes become 128); the padded bytes are the 32-byte leaves of a
//! binary Merkle tree whose nodes are sha2-256 with the two top bits of the last byte cleared
//! (sha2-256-trunc254-padded); the tree is completed to a power of two with zero subtrees.
//! The root is the commitment, written as a fil-commitment-unsealed CID ([`PieceCid`]).

use sha2::{Digest, Sha256};

use crate::domain::{PaddedPieceSize, PieceCid};

/// Bytes of data per Fr32 quad.
const QUAD_IN: usize = 127;
/// Levels of zero subtrees kept: enough for 2^40 leaves (32 TiB padded).
const MAX_LEVELS: usize = 41;

fn node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(left);
    hash.update(right);
    let mut out: [u8; 32] = hash.finalize().into();
    out[31] &= 0b0011_1111;
    out
}

/// Fr32-pads one 127-byte quad into 128 bytes.
fn fr32_pad(input: &[u8; QUAD_IN], out: &mut [u8; 128]) {
    out[..32].copy_from_slice(&input[..32]);
    out[31] &= 0x3f;
    for i in 32..64 {
        out[i] = (input[i - 1] >> 6) | (input[i] << 2);
    }
    out[63] &= 0x3f;
    for i in 64..96 {
        out[i] = (input[i - 1] >> 4) | (input[i] << 4);
    }
    out[95] &= 0x3f;
    for i in 96..127 {
        out[i] = (input[i - 1] >> 2) | (input[i] << 6);
    }
    out[127] = input[126] >> 2;
}

/// Why a commitment could not be produced for the size asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommPError {
    /// The data does not fit the padded size asked for.
    #[error("{bytes} bytes do not fit a piece of {padded} padded bytes")]
    TooLarge { bytes: u64, padded: u64 },
    /// The padded size is not a power of two of at least 128 bytes.
    #[error("{0} is not a valid padded piece size")]
    InvalidSize(u64),
}

/// A streaming commP hasher: feed it bytes, then ask for the piece CID.
#[derive(Clone)]
pub struct CommP {
    quad: [u8; QUAD_IN],
    filled: usize,
    bytes: u64,
    leaves: u64,
    /// A pending left node per tree level (a binary counter of leaves).
    levels: Vec<Option<[u8; 32]>>,
    zeros: Vec<[u8; 32]>,
}

impl Default for CommP {
    fn default() -> Self {
        let mut zeros = vec![[0u8; 32]];
        for level in 1..MAX_LEVELS {
            let below = zeros[level - 1];
            zeros.push(node(&below, &below));
        }
        Self {
            quad: [0; QUAD_IN],
            filled: 0,
            bytes: 0,
            leaves: 0,
            levels: vec![None; MAX_LEVELS],
            zeros,
        }
    }
}

impl CommP {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of data fed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Feeds data.
    pub fn update(&mut self, mut data: &[u8]) {
        self.bytes += data.len() as u64;
        while !data.is_empty() {
            let take = (QUAD_IN - self.filled).min(data.len());
            self.quad[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled == QUAD_IN {
                self.push_quad();
            }
        }
    }

    fn push_quad(&mut self) {
        let mut padded = [0u8; 128];
        fr32_pad(&self.quad, &mut padded);
        for leaf in padded.chunks_exact(32) {
            self.push_leaf(leaf.try_into().expect("32-byte chunks"));
        }
        self.quad = [0; QUAD_IN];
        self.filled = 0;
    }

    fn push_leaf(&mut self, leaf: [u8; 32]) {
        let mut carry = leaf;
        let mut level = 0;
        while let Some(left) = self.levels[level].take() {
            carry = node(&left, &carry);
            level += 1;
        }
        self.levels[level] = Some(carry);
        self.leaves += 1;
    }

    /// The smallest padded size that holds the data fed so far.
    pub fn natural_size(&self) -> PaddedPieceSize {
        let quads = self.bytes.div_ceil(QUAD_IN as u64).max(1);
        PaddedPieceSize((quads * 128).next_power_of_two())
    }

    /// The commitment of the data fed, as a piece of its natural size.
    pub fn finish(self) -> (PieceCid, PaddedPieceSize) {
        let size = self.natural_size();
        let cid = self.finish_at(size).expect("the natural size holds the data");
        (cid, size)
    }

    /// The commitment of the data fed, zero-padded to a piece of `size` padded bytes.
    pub fn finish_at(mut self, size: PaddedPieceSize) -> Result<PieceCid, CommPError> {
        if !size.is_valid() || size.0 / 32 >= 1 << (MAX_LEVELS - 1) {
            return Err(CommPError::InvalidSize(size.0));
        }
        if self.natural_size() > size {
            return Err(CommPError::TooLarge { bytes: self.bytes, padded: size.0 });
        }
        if self.filled > 0 || self.leaves == 0 {
            self.push_quad();
        }
        let height = (size.0 / 32).trailing_zeros() as usize;
        let mut carry: Option<[u8; 32]> = None;
        for level in 0..height {
            carry = match (self.levels[level].take(), carry) {
                (Some(left), Some(right)) => Some(node(&left, &right)),
                (Some(left), None) => Some(node(&left, &self.zeros[level])),
                (None, Some(right)) => Some(node(&right, &self.zeros[level])),
                (None, None) => None,
            };
        }
        let root = carry.or(self.levels[height]).unwrap_or(self.zeros[height]);
        Ok(PieceCid::from_commitment(root))
    }
}

/// The commitment of a whole byte slice, at its natural size.
pub fn commp_of(data: &[u8]) -> (PieceCid, PaddedPieceSize) {
    let mut hasher = CommP::new();
    hasher.update(data);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zero-piece commitments published by Lotus
    /// (extern/sector-storage/zerocomm/zerocomm_test.go at commit
    /// d4fef1b5f82b3602a1ff45979ad035e67280e334, as quoted by cpp-filecoin's
    /// core/sector_storage/zerocomm tests): unpadded size → piece CID.
    const LOTUS_ZERO_PIECES: [(usize, &str); 4] = [
        (1016, "baga6ea4seaqb66wjlfkrbye6uqoemcyxmqylwmrm235uclwfpsyx3ge2imidoly"),
        (2032, "baga6ea4seaqpy7usqklokfx2vxuynmupslkeutzexe2uqurdg5vhtebhxqmpqmy"),
        (4064, "baga6ea4seaqarrd3hdxbhpcd6qnzcxao5wmrditaq2z62ysadp45lc4ndhp7mja"),
        (8128, "baga6ea4seaqlfzd37mi7vtmud5rk6xdvb47kltcn6ul5lrhrnwzljv33v3a2gly"),
    ];

    #[test]
    fn zero_pieces_match_the_lotus_vectors() {
        for (unpadded, expected) in LOTUS_ZERO_PIECES {
            let (cid, size) = commp_of(&vec![0u8; unpadded]);
            assert_eq!(cid.to_string(), expected, "{unpadded} zero bytes");
            assert_eq!(size.0 as usize, unpadded / 127 * 128);
        }
    }

    #[test]
    fn padding_a_smaller_piece_up_equals_the_larger_zero_piece() {
        // 1016 zero bytes padded to a 2 KiB piece is the 2032-byte zero piece.
        let mut hasher = CommP::new();
        hasher.update(&[0u8; 1016]);
        let padded = hasher.finish_at(PaddedPieceSize(2048)).unwrap();
        assert_eq!(padded.to_string(), LOTUS_ZERO_PIECES[1].1);
    }

    #[test]
    fn streaming_in_any_chunking_gives_the_same_commitment() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let whole = commp_of(&data);
        for chunk in [1usize, 31, 127, 128, 1000, 4096] {
            let mut hasher = CommP::new();
            for part in data.chunks(chunk) {
                hasher.update(part);
            }
            assert_eq!(hasher.finish(), whole, "chunks of {chunk}");
        }
        assert_ne!(whole.0, commp_of(&data[..9_999]).0);
    }

    #[test]
    fn fr32_padding_keeps_every_bit_and_clears_the_top_two_of_each_word() {
        let input: [u8; 127] =
            std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11) | 0x81);
        let mut out = [0u8; 128];
        fr32_pad(&input, &mut out);
        let bit = |bytes: &[u8], i: usize| (bytes[i / 8] >> (i % 8)) & 1;
        for word in 0..4 {
            assert_eq!(out[word * 32 + 31] & 0xc0, 0, "word {word}");
            for i in 0..254 {
                assert_eq!(bit(&out, word * 256 + i), bit(&input, word * 254 + i));
            }
        }
    }

    #[test]
    fn refuses_data_larger_than_the_piece() {
        let mut hasher = CommP::new();
        hasher.update(&[1u8; 200]);
        assert!(matches!(hasher.finish_at(PaddedPieceSize(128)), Err(CommPError::TooLarge { .. })));
    }
}
