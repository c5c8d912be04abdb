//! The node hash of the commP tree: sha2-256-trunc254-padded of two 32-byte children, one
//! node at a time or several at once.
//!
//! The tree is most of commP's cost (four nodes per 127 bytes of data, two compressions
//! each), and one SHA-256 compression is a chain of dependent rounds: a core with SHA
//! extensions can run the rounds of independent nodes side by side. [`nodes`] does that when
//! the CPU has them (checked at run time) and falls back to one [`node`] after another
//! otherwise. [`sixteen`] hashes sixteen sibling pairs at once, one per 32-bit lane of the
//! AVX-512 registers where the CPU has them: its round instructions each work on all sixteen
//! nodes, where the SHA extensions' work on one, and on the machines measured
//! (`cargo bench --bench transfer`, "commP alone") that is about a fifth faster. All give
//! exactly `Sha256::digest(left ‖ right)` with the two top bits of its last byte cleared.

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

/// The parents of sixteen consecutive sibling pairs: parent `i` is the node of
/// `children[2i]` and `children[2i + 1]`. Sixteen lanes at once with AVX-512 where the CPU
/// has it, four at a time otherwise.
pub(super) fn sixteen(children: &[[u8; 32]; 32]) -> [[u8; 32]; 16] {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: `available` checked that this CPU has every feature `lanes` is built for.
        return unsafe { avx512::lanes(children) };
    }
    sixteen_by_fours(children)
}

/// [`sixteen`] without AVX-512: four [`nodes`] at a time.
fn sixteen_by_fours(children: &[[u8; 32]; 32]) -> [[u8; 32]; 16] {
    let mut parents = [[0u8; 32]; 16];
    for (four, pairs) in parents.chunks_exact_mut(4).zip(children.chunks_exact(8)) {
        let pair = |i: usize| (&pairs[2 * i], &pairs[2 * i + 1]);
        four.copy_from_slice(&nodes([pair(0), pair(1), pair(2), pair(3)]));
    }
    parents
}

#[cfg(target_arch = "x86_64")]
mod sha_ni {
    //! Several SHA-256 compressions at once with the x86 SHA extensions (`sha256rnds2`,
    //! `sha256msg1`, `sha256msg2`). The state is kept the way those instructions take it: one
    //! register with words A, B, E, F and one with C, D, G, H, highest lane first.

    use std::arch::x86_64::*;

    use super::{PAD_64, SHA256_IV, truncated};

    /// SHA-256's round constants.
    pub(super) const K: [u32; 64] = [
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
    pub(super) const PAD_WK: [u32; 64] = {
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! Sixteen SHA-256 compressions at once in the sixteen 32-bit lanes of AVX-512
    //! registers: one node per lane, each round a handful of whole-register operations
    //! (rotates, three-way logic, adds) and the message schedule likewise. Register `a` of
    //! the state holds word A of all sixteen nodes, and so on.

    use std::arch::x86_64::*;

    use super::sha_ni::{K, PAD_WK};
    use super::{SHA256_IV, truncated};

    /// Whether this CPU can run [`lanes`] (checked once; later calls read a cached flag).
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    /// One round on the state `s` with `wk`, the round's word plus constant.
    #[target_feature(enable = "avx512f")]
    fn round(s: &mut [__m512i; 8], wk: __m512i) {
        let [a, b, c, d, e, f, g, h] = *s;
        let s1 = _mm512_ternarylogic_epi32::<0x96>(
            _mm512_ror_epi32::<6>(e),
            _mm512_ror_epi32::<11>(e),
            _mm512_ror_epi32::<25>(e),
        );
        let ch = _mm512_ternarylogic_epi32::<0xca>(e, f, g);
        let t1 = _mm512_add_epi32(_mm512_add_epi32(h, s1), _mm512_add_epi32(ch, wk));
        let s0 = _mm512_ternarylogic_epi32::<0x96>(
            _mm512_ror_epi32::<2>(a),
            _mm512_ror_epi32::<13>(a),
            _mm512_ror_epi32::<22>(a),
        );
        let maj = _mm512_ternarylogic_epi32::<0xe8>(a, b, c);
        let t2 = _mm512_add_epi32(s0, maj);
        *s = [_mm512_add_epi32(t1, t2), a, b, c, _mm512_add_epi32(d, t1), e, f, g];
    }

    /// The nodes of sixteen consecutive pairs of children (`children[2i]`,
    /// `children[2i + 1]`), each `sha256(left ‖ right)` truncated.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn lanes(children: &[[u8; 32]; 32]) -> [[u8; 32]; 16] {
        // Node i's message is its two children, the 64 bytes from word 16 i: word t of
        // every message is gathered into one register, then made big-endian.
        let node = _mm512_setr_epi32(
            0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240,
        );
        let swap =
            _mm512_broadcast_i32x4(_mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203));
        let base = children.as_ptr().cast::<i32>();
        let mut w = [_mm512_setzero_si512(); 16];
        for (t, word) in w.iter_mut().enumerate() {
            // SAFETY: every word read, 16 i + t for i, t < 16, lies inside the 256 words of
            // `children`; gathers need no alignment beyond the word's.
            let gathered = unsafe { _mm512_i32gather_epi32::<4>(node, base.add(t)) };
            *word = _mm512_shuffle_epi8(gathered, swap);
        }
        let iv = SHA256_IV.map(|word| _mm512_set1_epi32(word as i32));
        let mut s = iv;
        // Unrolled so that every ring index and constant is known when compiling: the
        // schedule ring then stays in registers.
        macro_rules! data_rounds {
            ($($t:literal)*) => {$(
                if $t >= 16 {
                    let (w15, w2) = (w[($t + 1) % 16], w[($t + 14) % 16]);
                    let s0 = _mm512_ternarylogic_epi32::<0x96>(
                        _mm512_ror_epi32::<7>(w15),
                        _mm512_ror_epi32::<18>(w15),
                        _mm512_srli_epi32::<3>(w15),
                    );
                    let s1 = _mm512_ternarylogic_epi32::<0x96>(
                        _mm512_ror_epi32::<17>(w2),
                        _mm512_ror_epi32::<19>(w2),
                        _mm512_srli_epi32::<10>(w2),
                    );
                    w[$t % 16] = _mm512_add_epi32(
                        _mm512_add_epi32(w[$t % 16], s0),
                        _mm512_add_epi32(w[($t + 9) % 16], s1),
                    );
                }
                round(&mut s, _mm512_add_epi32(w[$t % 16], _mm512_set1_epi32(K[$t] as i32)));
            )*};
        }
        data_rounds!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31
            32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63);
        for (word, start) in s.iter_mut().zip(iv) {
            *word = _mm512_add_epi32(*word, start);
        }
        // The padding block, whose words and constants are the same for every node.
        let after = s;
        for wk in PAD_WK {
            round(&mut s, _mm512_set1_epi32(wk as i32));
        }
        let mut words = [[0u32; 16]; 8];
        for ((out, word), start) in words.iter_mut().zip(s).zip(after) {
            // SAFETY: 64 bytes stored into a 64-byte array; `storeu` needs no alignment.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), _mm512_add_epi32(word, start)) };
        }
        std::array::from_fn(|lane| truncated(std::array::from_fn(|j| words[j][lane])))
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

        #[test]
        fn sixteen_parents_are_each_the_truncated_sha256_of_their_children(
            children in proptest::prelude::any::<[[[u8; 32]; 8]; 4]>(),
        ) {
            let children: [[u8; 32]; 32] = std::array::from_fn(|i| children[i / 8][i % 8]);
            let expected: [[u8; 32]; 16] =
                std::array::from_fn(|i| sha256_truncated(&children[2 * i], &children[2 * i + 1]));
            proptest::prop_assert_eq!(sixteen(&children), expected);
            proptest::prop_assert_eq!(sixteen_by_fours(&children), expected);
            // The sixteen lanes themselves, wherever the CPU can run them.
            #[cfg(target_arch = "x86_64")]
            if avx512::available() {
                // SAFETY: just checked.
                proptest::prop_assert_eq!(unsafe { avx512::lanes(&children) }, expected);
            }
        }
    }
}
