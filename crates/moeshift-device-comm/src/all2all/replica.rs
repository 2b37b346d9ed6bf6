//! Replica choice: which physical copy of a logical expert serves one `(token, k)` pick.
//!
//! A logical expert with `count` replicas is served by replica
//! [`replica_index`]`(token, k, count)`: a [`splitmix64`] of `(token << 8) | k`, reduced
//! modulo `count`. Every rank computes the same answer for the same pick, so the choice
//! needs no communication, and the picks of one expert spread evenly over its replicas.
//!
//! # Why not vLLM's hash
//!
//! vLLM picks replica `((t · 2654435769) mod 2^32) mod count` for flat token index `t`
//! ([`vllm_replica_index`]). Two properties make its load statistics and balance worse:
//!
//! - the multiplier is odd, so for a power-of-two `count` the low bits of the product
//!   depend only on the low bits of `t`: the choice degenerates to a fixed permutation of
//!   `t mod count`, and to exactly `t mod count` for counts up to 8 (the multiplier is
//!   1 mod 8). That is a round-robin over token positions, which lines up with any
//!   periodic structure in the batch;
//! - `k` does not enter the hash, so all top-k picks of one token get the same replica
//!   index, and a token whose experts share a placement pattern lands on one rank.
//!
//! Hashing `(token, k)` through a full 64-bit mixer fixes both.
//!
//! Token keys come from [`token_key`]: the EP rank that owns the token in the high 32 bits,
//! its index in that rank's batch in the low 32 bits. After the shift by 8, EP ranks below
//! 2^24 keep distinct keys.

/// Largest supported top-k: `k` takes the low 8 bits of the hashed word.
pub const MAX_TOP_K: usize = 256;

/// The splitmix64 finalizer (Steele, Lea and Flood): a bijective 64-bit mixer whose
/// every output bit depends on every input bit.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of token `index` of the batch that EP rank `ep_rank` dispatches.
pub fn token_key(ep_rank: usize, index: usize) -> u64 {
    ((ep_rank as u64) << 32) | (index as u64 & 0xffff_ffff)
}

/// The replica (in `0..count`) that serves pick `k` of token `token`; 0 when `count` is 0.
pub fn replica_index(token: u64, k: usize, count: usize) -> usize {
    if count <= 1 {
        return 0;
    }
    let h = splitmix64((token << 8) | (k as u64 & 0xff));
    (h % count as u64) as usize
}

/// vLLM's replica choice, `((token · 2654435769) mod 2^32) mod count` (0 when `count` is
/// 0), kept to document and measure the difference (see the [module docs](self)); moeshift
/// routes with [`replica_index`].
pub fn vllm_replica_index(token: u64, count: usize) -> usize {
    if count == 0 {
        return 0;
    }
    let h = token.wrapping_mul(2_654_435_769) & 0xffff_ffff;
    (h % count as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_published_sequence() {
        // The reference generator with seed 0 returns splitmix64(0), splitmix64(γ), …
        // (γ = 0x9e3779b97f4a7c15); its first output is 0xe220a8397b1dcdaf.
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(0x9e37_79b9_7f4a_7c15), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn vllm_hash_matches_the_reference_vectors() {
        // Study §10.3, tokens 0..8.
        let picks = |rc| {
            (0..8u64)
                .map(|t| vllm_replica_index(t, rc))
                .collect::<Vec<_>>()
        };
        assert_eq!(picks(2), [0, 1, 0, 1, 0, 1, 0, 1]);
        assert_eq!(picks(3), [0, 0, 2, 2, 1, 0, 0, 2]);
        assert_eq!(picks(4), [0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn vllm_hash_degenerates_for_power_of_two_counts() {
        // The multiplier 2654435769 is 1 mod 8: exactly `t mod rc` up to 8 replicas…
        for rc in [2usize, 4, 8] {
            for t in 0..1000u64 {
                assert_eq!(vllm_replica_index(t, rc), (t % rc as u64) as usize);
            }
        }
        // …and beyond, still a function of `t mod rc` only.
        for rc in [16usize, 32, 64] {
            for t in 0..1000u64 {
                assert_eq!(
                    vllm_replica_index(t, rc),
                    vllm_replica_index(t % rc as u64, rc)
                );
            }
        }
    }

    #[test]
    fn replica_is_in_range_and_single_replicas_are_trivial() {
        for count in [0usize, 1, 2, 3, 7] {
            for t in 0..64u64 {
                for k in 0..8 {
                    let r = replica_index(token_key(t as usize % 5, t as usize), k, count);
                    assert!(r < count.max(1), "count {count}: replica {r}");
                }
            }
        }
        assert_eq!(replica_index(12345, 3, 1), 0);
    }

    #[test]
    fn token_keys_separate_ranks_and_indices() {
        assert_eq!(token_key(0, 5), 5);
        assert_eq!(token_key(3, 5), (3u64 << 32) | 5);
        assert_ne!(token_key(1, 0), token_key(0, 1));
    }
}
