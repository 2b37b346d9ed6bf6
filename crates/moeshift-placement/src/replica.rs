//! Choosing which replica of a logical expert serves one top-k pick of one token.
//!
//! vLLM picks `((token · 2654435769) mod 2³²) mod count`. The multiplier is odd, so for a
//! power-of-two `count` this is exactly `token mod count`, and since `k` does not enter the
//! formula, all top-k picks of a token land on the same replica index. Both skew the load that
//! replicas see.
//!
//! moeshift hashes the pair `(token, k)` instead:
//!
//! 1. `key = (token · 0x9E37_79B9_7F4A_7C15) XOR k` (wrapping 64-bit multiply by the odd
//!    64-bit golden-ratio constant, which spreads consecutive tokens over all 64 bits);
//! 2. `h = mix(key)`, the SplitMix64 finaliser: `z ^= z >> 30; z *= 0xBF58_476D_1CE4_E5B9;
//!    z ^= z >> 27; z *= 0x94D0_49BB_1331_11EB; z ^= z >> 31` (wrapping), a bijection whose
//!    every output bit depends on every input bit;
//! 3. `replica = ((h >> 32) · count) >> 32`, Lemire's multiply-shift reduction of the top 32
//!    bits to `0..count` (bias below `count / 2³²`, no division).
//!
//! It costs two 64-bit multiplies more than vLLM's formula and is equally easy to write in a
//! GPU kernel.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finaliser.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The replica index (`0..count`) that top-k pick `k` of token `token` uses, for a logical
/// expert with `count` replicas. A `count` of 0 is treated as 1 (the result is 0).
///
/// See the [module documentation](self) for the hash.
///
/// ```
/// use moeshift_placement::replica_index;
/// let r = replica_index(17, 3, 4);
/// assert!(r < 4);
/// assert_eq!(replica_index(17, 3, 1), 0);
/// ```
#[inline]
pub fn replica_index(token: u64, k: u32, count: u32) -> u32 {
    if count <= 1 {
        return 0;
    }
    let h = mix64(token.wrapping_mul(GOLDEN) ^ u64::from(k));
    // (h >> 32) < 2³² and count < 2³², so the product fits in u64 and the result is < count.
    (((h >> 32) * u64::from(count)) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vLLM's replica choice, for comparison (study §3.2).
    fn vllm(token: u64, count: u64) -> u64 {
        ((token * 2_654_435_769) % (1 << 32)) % count
    }

    #[test]
    fn vllm_formula_reproduces_the_study_vectors() {
        // Guards the comparison baseline itself (vLLM replica-choice vectors).
        let picks = |rc| (0..8).map(|t| vllm(t, rc)).collect::<Vec<_>>();
        assert_eq!(picks(2), vec![0, 1, 0, 1, 0, 1, 0, 1]);
        assert_eq!(picks(3), vec![0, 0, 2, 2, 1, 0, 0, 2]);
        assert_eq!(picks(4), vec![0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn trivial_counts_give_zero() {
        for t in 0..100 {
            assert_eq!(replica_index(t, 0, 0), 0);
            assert_eq!(replica_index(t, 5, 1), 0);
        }
    }

    #[test]
    fn replicas_share_load_evenly() {
        const TOKENS: u64 = 40_000;
        for count in [2u32, 3, 4, 7, 8] {
            for k in [0u32, 1, 7] {
                let mut hist = vec![0u64; count as usize];
                for t in 0..TOKENS {
                    let r = replica_index(t, k, count);
                    assert!(r < count);
                    hist[r as usize] += 1;
                }
                let expected = TOKENS as f64 / f64::from(count);
                for (i, &h) in hist.iter().enumerate() {
                    // Binomial std is below 0.5 % of TOKENS here; allow 5 % of the expectation.
                    assert!(
                        (h as f64 - expected).abs() < 0.05 * expected,
                        "count {count}, k {k}, replica {i}: {h} vs {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn top_k_picks_of_a_token_are_independent() {
        // With vLLM's formula every token has all 8 picks on one replica index. With (token, k)
        // hashing and 2 replicas that happens with probability 2 / 2⁸ ≈ 0.8 %.
        const TOKENS: u64 = 20_000;
        let same = (0..TOKENS)
            .filter(|&t| {
                let first = replica_index(t, 0, 2);
                (1..8).all(|k| replica_index(t, k, 2) == first)
            })
            .count();
        assert!(
            same < (TOKENS / 50) as usize,
            "{same} tokens had all picks equal"
        );
        // Two picks of one token agree about 1 / count of the time.
        for count in [2u32, 4] {
            let agree = (0..TOKENS)
                .filter(|&t| replica_index(t, 0, count) == replica_index(t, 1, count))
                .count() as f64
                / TOKENS as f64;
            let p = 1.0 / f64::from(count);
            assert!((agree - p).abs() < 0.03, "count {count}: agreement {agree}");
        }
    }

    #[test]
    fn power_of_two_counts_do_not_degenerate_to_token_mod_count() {
        const TOKENS: u64 = 20_000;
        for count in [2u32, 4, 8] {
            let equal = (0..TOKENS)
                .filter(|&t| u64::from(replica_index(t, 0, count)) == vllm(t, u64::from(count)))
                .count() as f64
                / TOKENS as f64;
            // Independent choices agree 1 / count of the time; vLLM's agrees with itself always.
            assert!(
                (equal - 1.0 / f64::from(count)).abs() < 0.03,
                "count {count}: {equal}"
            );
        }
    }
}
