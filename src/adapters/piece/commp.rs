//! Filecoin piece commitments (commP), computed as the bytes stream by, in constant memory.
//!
//! The data is zero-filled to a whole number of 127-byte quads and Fr32-padded (every 254 bits
//! get two zero bits, so 127 bytes become 128); the padded bytes are the 32-byte leaves of a
//! binary Merkle tree whose nodes are sha2-256 with the two top bits of the last byte cleared
//! (sha2-256-trunc254-padded); the tree is completed to a power of two with zero subtrees.
//! The root is the commitment, written as a fil-commitment-unsealed CID ([`PieceCid`]).

use crate::domain::{PaddedPieceSize, PieceCid};

/// Bytes of data per Fr32 quad.
const QUAD_IN: usize = 127;
/// Levels of zero subtrees kept: enough for 2^40 leaves (32 TiB padded).
const MAX_LEVELS: usize = 41;

/// SHA-256's initial state.
const SHA256_IV: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// The padding block of a 64-byte message: the end marker, zeros, and the length (512 bits).
const PAD_64: [u8; 64] = {
    let mut pad = [0u8; 64];
    pad[0] = 0x80;
    pad[62] = 0x02;
    pad
};

/// sha2-256-trunc254-padded of `left ‖ right`. Every node's message is exactly one block, so
/// the padding block is a constant and both go straight to the compression function: the
/// same digest as `Sha256::digest`, without its buffering (the tree is most of commP's cost).
fn node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(left);
    block[32..].copy_from_slice(right);
    let mut state = SHA256_IV;
    sha2::block_api::compress256(&mut state, &[block, PAD_64]);
    let mut out = [0u8; 32];
    for (bytes, word) in out.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
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
        if self.filled > 0 {
            let take = (QUAD_IN - self.filled).min(data.len());
            self.quad[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled < QUAD_IN {
                return;
            }
            let quad = self.quad;
            self.push_quad(&quad);
        }
        // Whole quads straight from the input, without copying them aside.
        let mut quads = data.chunks_exact(QUAD_IN);
        for quad in &mut quads {
            self.push_quad(quad.try_into().expect("127-byte chunks"));
        }
        let rest = quads.remainder();
        self.quad[..rest.len()].copy_from_slice(rest);
        self.filled = rest.len();
    }

    /// Pads one quad into four leaves and hashes them into their level-2 node at once: the
    /// leaves always arrive four by four, so levels 0 and 1 never hold a pending node.
    fn push_quad(&mut self, quad: &[u8; QUAD_IN]) {
        let mut padded = [0u8; 128];
        fr32_pad(quad, &mut padded);
        let leaf = |i: usize| -> &[u8; 32] {
            padded[i * 32..(i + 1) * 32].try_into().expect("32-byte leaves")
        };
        let left = node(leaf(0), leaf(1));
        let right = node(leaf(2), leaf(3));
        self.push_node(2, node(&left, &right));
        self.leaves += 4;
        self.filled = 0;
    }

    /// Adds a node at `level`, merging it with every pending left sibling on the way up.
    fn push_node(&mut self, mut level: usize, mut carry: [u8; 32]) {
        while let Some(left) = self.levels[level].take() {
            carry = node(&left, &carry);
            level += 1;
        }
        self.levels[level] = Some(carry);
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
            let mut quad = [0u8; QUAD_IN];
            quad[..self.filled].copy_from_slice(&self.quad[..self.filled]);
            self.push_quad(&quad);
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

    proptest::proptest! {
        #[test]
        fn a_node_is_the_truncated_sha256_of_its_children(
            left in proptest::prelude::any::<[u8; 32]>(),
            right in proptest::prelude::any::<[u8; 32]>(),
        ) {
            use sha2::Digest;
            let mut expected: [u8; 32] = sha2::Sha256::new()
                .chain_update(left)
                .chain_update(right)
                .finalize()
                .into();
            expected[31] &= 0x3f;
            proptest::prop_assert_eq!(node(&left, &right), expected);
        }
    }

    #[test]
    fn refuses_data_larger_than_the_piece() {
        let mut hasher = CommP::new();
        hasher.update(&[1u8; 200]);
        assert!(matches!(hasher.finish_at(PaddedPieceSize(128)), Err(CommPError::TooLarge { .. })));
    }
}
