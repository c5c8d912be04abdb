//! The node hash of the commP tree: sha2-256-trunc254-padded of two 32-byte children, one
//! node at a time or several at once.
//!
//! The tree is most of commP's cost (four nodes per 127 bytes of data, two compressions
//! each), and one SHA-256 compression is a chain of dependent rounds: a core with SHA
//! extensions can run the rounds of independent nodes side by side. [`nodes`] does that when
//! the CPU has them (checked at run time) and falls back to one [`node`] after another
//! otherwise; both give exactly `Sha256::digest(left ‖ right)` with the two top bits of its
//! last byte cleared.

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

/// The digest words as the node's bytes, truncated to 254 bits.
fn truncated(state: [u32; 8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (bytes, word) in out.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    out[31] &= 0b0011_1111;
    out
}

/// sha2-256-trunc254-padded of `left ‖ right`. Every node's message is exactly one block, so
/// the padding block is a constant and both go straight to the compression function: the
/// same digest as `Sha256::digest`, without its buffering.
pub(super) fn node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(left);
    block[32..].copy_from_slice(right);
    let mut state = SHA256_IV;
    sha2::block_api::compress256(&mut state, &[block, PAD_64]);
    truncated(state)
}

/// `N` nodes at once, each from its (left, right) children: with SHA extensions their
/// rounds are interleaved (two to four nodes fit the registers; more spill and run slower),
/// otherwise they are hashed one after the other.
pub(super) fn nodes<const N: usize>(children: [(&[u8; 32], &[u8; 32]); N]) -> [[u8; 32]; N] {
    #[cfg(target_arch = "x86_64")]
    if sha_ni::available() {
        // SAFETY: `available` checked that this CPU has every feature `lanes` is built for.
        return unsafe { sha_ni::lanes(children) };
    }
    children.map(|(left, right)| node(left, right))
}

#[cfg(target_arch = "x86_64")]
mod sha_ni {
    //! Several SHA-256 compressions at once with the x86 SHA extensions (`sha256rnds2`,
    //! `sha256msg1`, `sha256msg2`). The state is kept the way those instructions take it: one
    //! register with words A, B, E, F and one with C, D, G, H, highest lane first.

    use std::arch::x86_64::*;

    use super::{PAD_64, SHA256_IV, truncated};

    /// SHA-256's round constants.
    const K: [u32; 64] = [
        0x428a_2f98,
        0x7137_4491,
        0xb5c0_fbcf,
        0xe9b5_dba5,
        0x3956_c25b,
        0x59f1_11f1,
        0x923f_82a4,
        0xab1c_5ed5,
        0xd807_aa98,
        0x1283_5b01,
        0x2431_85be,
        0x550c_7dc3,
        0x72be_5d74,
        0x80de_b1fe,
        0x9bdc_06a7,
        0xc19b_f174,
        0xe49b_69c1,
        0xefbe_4786,
        0x0fc1_9dc6,
        0x240c_a1cc,
        0x2de9_2c6f,
        0x4a74_84aa,
        0x5cb0_a9dc,
        0x76f9_88da,
        0x983e_5152,
        0xa831_c66d,
        0xb003_27c8,
        0xbf59_7fc7,
        0xc6e0_0bf3,
        0xd5a7_9147,
        0x06ca_6351,
        0x1429_2967,
        0x27b7_0a85,
        0x2e1b_2138,
        0x4d2c_6dfc,
        0x5338_0d13,
        0x650a_7354,
        0x766a_0abb,
        0x81c2_c92e,
        0x9272_2c85,
        0xa2bf_e8a1,
        0xa81a_664b,
        0xc24b_8b70,
        0xc76c_51a3,
        0xd192_e819,
        0xd699_0624,
        0xf40e_3585,
        0x106a_a070,
        0x19a4_c116,
        0x1e37_6c08,
        0x2748_774c,
        0x34b0_bcb5,
        0x391c_0cb3,
        0x4ed8_aa4a,
        0x5b9c_ca4f,
        0x682e_6ff3,
        0x748f_82ee,
        0x78a5_636f,
        0x84c8_7814,
        0x8cc7_0208,
        0x90be_fffa,
        0xa450_6ceb,
        0xbef9_a3f7,
        0xc671_78f2,
    ];

    /// Message schedule plus round constant of every round of the padding block. The block
    /// never changes, so neither does its schedule: its rounds need no message instructions.
    const PAD_WK: [u32; 64] = {
        let mut w = [0u32; 64];
        let mut t = 0;
        while t < 16 {
            let i = t * 4;
            w[t] = u32::from_be_bytes([PAD_64[i], PAD_64[i + 1], PAD_64[i + 2], PAD_64[i + 3]]);
            t += 1;
        }
        while t < 64 {
            let s0 = w[t - 15].rotate_right(7) ^ w[t - 15].rotate_right(18) ^ (w[t - 15] >> 3);
            let s1 = w[t - 2].rotate_right(17) ^ w[t - 2].rotate_right(19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16].wrapping_add(s0).wrapping_add(w[t - 7]).wrapping_add(s1);
            t += 1;
        }
        let mut wk = [0u32; 64];
        t = 0;
        while t < 64 {
            wk[t] = w[t].wrapping_add(K[t]);
            t += 1;
        }
        wk
    };

    /// Whether this CPU can run [`pair`].
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("sha")
            && is_x86_feature_detected!("sse2")
            && is_x86_feature_detected!("ssse3")
            && is_x86_feature_detected!("sse4.1")
    }

    /// Four consecutive words of `words` starting at `i`, lowest lane first.
    #[target_feature(enable = "sse2")]
    fn four(words: &[u32; 64], i: usize) -> __m128i {
        _mm_set_epi32(
            words[i + 3] as i32,
            words[i + 2] as i32,
            words[i + 1] as i32,
            words[i] as i32,
        )
    }

    /// The 32 bytes at `bytes` as four big-endian message words each half, lowest lane first.
    #[target_feature(enable = "sse2,ssse3")]
    fn message(bytes: &[u8; 32]) -> [__m128i; 2] {
        let swap = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
        // SAFETY: both 16-byte loads are inside the 32 bytes `bytes` borrows; `loadu` needs
        // no alignment.
        let (low, high) = unsafe {
            let at = bytes.as_ptr().cast::<__m128i>();
            (_mm_loadu_si128(at), _mm_loadu_si128(at.add(1)))
        };
        [_mm_shuffle_epi8(low, swap), _mm_shuffle_epi8(high, swap)]
    }

    /// Four rounds on the state (`abef`, `cdgh`) with `wk`, the rounds' words plus constants.
    #[target_feature(enable = "sha,sse2")]
    fn rounds(abef: &mut __m128i, cdgh: &mut __m128i, wk: __m128i) {
        *cdgh = _mm_sha256rnds2_epu32(*cdgh, *abef, wk);
        *abef = _mm_sha256rnds2_epu32(*abef, *cdgh, _mm_shuffle_epi32::<0x0e>(wk));
    }

    /// The next four schedule words from the sixteen before them (`w[0]` the oldest four).
    #[target_feature(enable = "sha,sse2,ssse3")]
    fn schedule(w: &[__m128i; 4]) -> __m128i {
        let sum = _mm_add_epi32(_mm_sha256msg1_epu32(w[0], w[1]), _mm_alignr_epi8::<4>(w[3], w[2]));
        _mm_sha256msg2_epu32(sum, w[3])
    }

    /// The nodes of `children`, each `sha256(left ‖ right)` truncated, their rounds
    /// interleaved.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) fn lanes<const N: usize>(children: [(&[u8; 32], &[u8; 32]); N]) -> [[u8; 32]; N] {
        let iv = SHA256_IV.map(|word| word as i32);
        let iv_abef = _mm_set_epi32(iv[0], iv[1], iv[4], iv[5]);
        let iv_cdgh = _mm_set_epi32(iv[2], iv[3], iv[6], iv[7]);
        let mut abef = [iv_abef; N];
        let mut cdgh = [iv_cdgh; N];
        // The data block: the schedule is computed as it goes, four words at a time, in a
        // ring of the last sixteen words per node.
        let mut w = [[_mm_setzero_si128(); 4]; N];
        for (lane, (left, right)) in children.into_iter().enumerate() {
            let [w0, w1] = message(left);
            let [w2, w3] = message(right);
            w[lane] = [w0, w1, w2, w3];
        }
        // Unrolled so that every ring index and constant is known when compiling: the ring
        // then lives in registers and the nodes' rounds interleave.
        macro_rules! data_step {
            ($($step:literal)*) => {$(
                for lane in 0..N {
                    let ring = &mut w[lane];
                    if $step >= 4 {
                        ring[$step % 4] = schedule(&[
                            ring[$step % 4],
                            ring[($step + 1) % 4],
                            ring[($step + 2) % 4],
                            ring[($step + 3) % 4],
                        ]);
                    }
                    let wk = _mm_add_epi32(ring[$step % 4], four(&K, $step * 4));
                    rounds(&mut abef[lane], &mut cdgh[lane], wk);
                }
            )*};
        }
        data_step!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        for lane in 0..N {
            abef[lane] = _mm_add_epi32(abef[lane], iv_abef);
            cdgh[lane] = _mm_add_epi32(cdgh[lane], iv_cdgh);
        }
        // The padding block, whose words and constants are precomputed.
        let (after_abef, after_cdgh) = (abef, cdgh);
        for step in 0..16 {
            let wk = four(&PAD_WK, step * 4);
            for lane in 0..N {
                rounds(&mut abef[lane], &mut cdgh[lane], wk);
            }
        }
        let digest = |lane: usize| {
            let abef = _mm_add_epi32(abef[lane], after_abef[lane]);
            let cdgh = _mm_add_epi32(cdgh[lane], after_cdgh[lane]);
            let words = [
                _mm_extract_epi32::<3>(abef),
                _mm_extract_epi32::<2>(abef),
                _mm_extract_epi32::<3>(cdgh),
                _mm_extract_epi32::<2>(cdgh),
                _mm_extract_epi32::<1>(abef),
                _mm_extract_epi32::<0>(abef),
                _mm_extract_epi32::<1>(cdgh),
                _mm_extract_epi32::<0>(cdgh),
            ];
            truncated(words.map(|word| word as u32))
        };
        std::array::from_fn(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_truncated(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
        use sha2::Digest;
        let mut expected: [u8; 32] =
            sha2::Sha256::new().chain_update(left).chain_update(right).finalize().into();
        expected[31] &= 0x3f;
        expected
    }

    proptest::proptest! {
        #[test]
        fn a_node_is_the_truncated_sha256_of_its_children(
            left in proptest::prelude::any::<[u8; 32]>(),
            right in proptest::prelude::any::<[u8; 32]>(),
        ) {
            proptest::prop_assert_eq!(node(&left, &right), sha256_truncated(&left, &right));
        }

        #[test]
        fn nodes_hashed_together_are_each_the_truncated_sha256_of_their_children(
            children in proptest::prelude::any::<[[u8; 32]; 8]>(),
        ) {
            let c = |i: usize| (&children[2 * i], &children[2 * i + 1]);
            let expected: [[u8; 32]; 4] = std::array::from_fn(|i| sha256_truncated(c(i).0, c(i).1));
            proptest::prop_assert_eq!(nodes([c(0), c(1), c(2), c(3)]), expected);
            proptest::prop_assert_eq!(nodes([c(0), c(1)]), [expected[0], expected[1]]);
            // The interleaved rounds themselves, wherever the CPU can run them.
            #[cfg(target_arch = "x86_64")]
            if sha_ni::available() {
                // SAFETY: just checked.
                let direct = unsafe { sha_ni::lanes([c(0), c(1), c(2), c(3)]) };
                proptest::prop_assert_eq!(direct, expected);
            }
        }
    }
}
