//! Filecoin piece commitments (commP), computed as the bytes stream by, in constant memory.
//!
//! The data is zero-filled to a whole number of 127-byte quads and Fr32-padded (every 254 bits
//! get two zero bits, so 127 bytes become 128); the padded bytes are the 32-byte leaves of a
//! binary Merkle tree whose nodes are sha2-256 with the two top bits of the last byte cleared
//! (sha2-256-trunc254-padded); the tree is completed to a power of two with zero subtrees.
//! The root is the commitment, written as a fil-commitment-unsealed CID ([`PieceCid`]).

use super::node_hash::{node, nodes, sixteen};
use crate::domain::{PaddedPieceSize, PieceCid};

/// Bytes of data per Fr32 quad.
const QUAD_IN: usize = 127;
/// Quads hashed together into one subtree, so that the nodes of each level below its root
/// can be hashed several at a time: 64 quads make 256 leaves, whose four lowest levels of
/// parents (128, 64, 32 and 16 nodes) go sixteen at a time, and only two nodes in 256 are
/// hashed alone.
const GROUP_QUADS: usize = 64;
/// Bytes of data per group.
const GROUP_IN: usize = GROUP_QUADS * QUAD_IN;
/// Leaves of a group.
const GROUP_LEAVES: usize = GROUP_QUADS * 4;
/// The tree level of a group's root.
const GROUP_LEVEL: usize = GROUP_LEAVES.trailing_zeros() as usize;
/// Levels of zero subtrees kept: enough for 2^40 leaves (32 TiB padded).
const MAX_LEVELS: usize = 41;

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
///
/// Data is taken a group of quads at a time: each group's subtree is hashed level by level,
/// several nodes at once ([`nodes`]), and its root joins the tree at [`GROUP_LEVEL`]. Only the
/// data of a last, incomplete group is hashed quad by quad, when the hasher finishes.
#[derive(Clone)]
pub struct CommP {
    /// Data not yet making a whole group.
    group: [u8; GROUP_IN],
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
            group: [0; GROUP_IN],
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
            let take = (GROUP_IN - self.filled).min(data.len());
            self.group[self.filled..self.filled + take].copy_from_slice(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled < GROUP_IN {
                return;
            }
            let group = self.group;
            self.push_group(&group);
            self.filled = 0;
        }
        // Whole groups straight from the input, without copying them aside.
        let mut groups = data.chunks_exact(GROUP_IN);
        for group in &mut groups {
            self.push_group(group.try_into().expect("whole groups"));
        }
        let rest = groups.remainder();
        self.group[..rest.len()].copy_from_slice(rest);
        self.filled = rest.len();
    }

    /// Pads a group's quads into leaves and adds the root of their subtree. Groups come
    /// before any single quad, so the leaves so far are a whole number of groups and the root
    /// lands on its own level.
    fn push_group(&mut self, group: &[u8; GROUP_IN]) {
        let mut nodes = [[0u8; 32]; GROUP_LEAVES];
        for (quad, leaves) in group.chunks_exact(QUAD_IN).zip(nodes.chunks_exact_mut(4)) {
            pad_into_leaves(quad.try_into().expect("127-byte quads"), leaves);
        }
        self.push_node(GROUP_LEVEL, subtree_root(&mut nodes));
        self.leaves += GROUP_LEAVES as u64;
    }

    /// Pads one quad into four leaves and adds their level-2 node: the leaves always arrive
    /// four by four, so levels 0 and 1 never hold a pending node.
    fn push_quad(&mut self, quad: &[u8; QUAD_IN]) {
        let mut leaves = [[0u8; 32]; 4];
        pad_into_leaves(quad, &mut leaves);
        self.push_node(2, subtree_root(&mut leaves));
        self.leaves += 4;
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
        // The incomplete group, quad by quad, its last quad zero-filled; and an empty piece
        // is one quad of zeros.
        let (group, filled) = (self.group, self.filled);
        for data in group[..filled].chunks(QUAD_IN) {
            let mut quad = [0u8; QUAD_IN];
            quad[..data.len()].copy_from_slice(data);
            self.push_quad(&quad);
        }
        if self.leaves == 0 {
            self.push_quad(&[0u8; QUAD_IN]);
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

/// Fr32-pads `quad` into the four leaves `leaves`.
fn pad_into_leaves(quad: &[u8; QUAD_IN], leaves: &mut [[u8; 32]]) {
    let mut padded = [0u8; 128];
    fr32_pad(quad, &mut padded);
    for (leaf, bytes) in leaves.iter_mut().zip(padded.chunks_exact(32)) {
        leaf.copy_from_slice(bytes);
    }
}

/// The root of the complete subtree over `level` (a power of two of nodes), reduced level by
/// level in place, sixteen parents at a time where there are sixteen, else four or two.
fn subtree_root(level: &mut [[u8; 32]]) -> [u8; 32] {
    let mut width = level.len();
    while width > 1 {
        let parents = width / 2;
        fn children(level: &[[u8; 32]], i: usize) -> (&[u8; 32], &[u8; 32]) {
            (&level[2 * i], &level[2 * i + 1])
        }
        let mut i = 0;
        while i + 16 <= parents {
            let pairs = (&level[2 * i..2 * i + 32]).try_into().expect("32 children");
            let hashed = sixteen(pairs);
            level[i..i + 16].copy_from_slice(&hashed);
            i += 16;
        }
        while i + 4 <= parents {
            let hashed: [[u8; 32]; 4] = nodes(std::array::from_fn(|k| children(level, i + k)));
            level[i..i + 4].copy_from_slice(&hashed);
            i += 4;
        }
        if i + 2 <= parents {
            let hashed: [[u8; 32]; 2] = nodes(std::array::from_fn(|k| children(level, i + k)));
            level[i..i + 2].copy_from_slice(&hashed);
            i += 2;
        }
        if i < parents {
            level[i] = node(&level[2 * i], &level[2 * i + 1]);
        }
        width = parents;
    }
    level[0]
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

    /// commP the slow way: every quad padded into leaves, zero leaves up to a power of two,
    /// then each level hashed node by node. Shares only `fr32_pad` and `node` with the
    /// hasher, not its grouping, pairing or binary counter.
    fn naive_commitment(data: &[u8]) -> [u8; 32] {
        let mut level: Vec<[u8; 32]> = Vec::new();
        let mut quads: Vec<[u8; QUAD_IN]> = data
            .chunks(QUAD_IN)
            .map(|chunk| {
                let mut quad = [0u8; QUAD_IN];
                quad[..chunk.len()].copy_from_slice(chunk);
                quad
            })
            .collect();
        if quads.is_empty() {
            quads.push([0u8; QUAD_IN]);
        }
        for quad in &quads {
            let mut padded = [0u8; 128];
            fr32_pad(quad, &mut padded);
            level.extend(padded.chunks_exact(32).map(|leaf| <[u8; 32]>::try_from(leaf).unwrap()));
        }
        level.resize(level.len().next_power_of_two(), [0u8; 32]);
        while level.len() > 1 {
            level = level.chunks_exact(2).map(|pair| node(&pair[0], &pair[1])).collect();
        }
        level[0]
    }

    proptest::proptest! {
        #[test]
        fn the_commitment_equals_the_plain_merkle_tree_over_the_padded_leaves(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..30_000),
            chunk in 1usize..5_000,
        ) {
            // Given data of any length, spanning none to several whole groups of quads,
            // when it streams in chunks of any size, then the root is the plain tree's.
            let mut hasher = CommP::new();
            for part in data.chunks(chunk) {
                hasher.update(part);
            }
            let (cid, _) = hasher.finish();
            let expected = PieceCid::from_commitment(naive_commitment(&data));
            proptest::prop_assert_eq!(cid, expected);
        }
    }

    #[test]
    fn refuses_data_larger_than_the_piece() {
        let mut hasher = CommP::new();
        hasher.update(&[1u8; 200]);
        assert!(matches!(hasher.finish_at(PaddedPieceSize(128)), Err(CommPError::TooLarge { .. })));
    }
}
