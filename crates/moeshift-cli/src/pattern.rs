//! Deterministic randomness and verifiable row contents shared by `demo` and `bench`.
//!
//! Every rank derives the same numbers from the same seed, so ranks agree on loads and plans
//! without talking, and any expert row can be checked against the pattern of the expert it
//! should hold.

/// A small deterministic generator (splitmix64), identical on every rank.
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// A uniform integer in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A uniform float in `(0, 1]`.
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// A standard normal draw (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Shuffles `v` in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    /// A permutation of `0..n` with no fixed point when `n ≥ 2`, by rejection.
    pub fn derangement(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        loop {
            self.shuffle(&mut p);
            if n < 2 || p.iter().enumerate().all(|(i, &x)| i != x) {
                return p;
            }
        }
    }
}

/// The splitmix64 finaliser.
pub fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn row_seed(expert: usize, tensor: usize) -> u64 {
    mix(mix(expert as u64 ^ 0x5EED) ^ (tensor as u64).wrapping_mul(0x9E37_79B9))
}

/// Fills a row with the pattern of `(expert, tensor)`: byte `i` is byte `i % 8` of
/// `mix(seed ^ i / 8)`.
pub fn fill_row(row: &mut [u8], expert: usize, tensor: usize) {
    let seed = row_seed(expert, tensor);
    for (w, chunk) in row.chunks_mut(8).enumerate() {
        let word = mix(seed ^ w as u64).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// The first byte of `row` that differs from the pattern of `(expert, tensor)`.
pub fn first_mismatch(row: &[u8], expert: usize, tensor: usize) -> Option<usize> {
    let seed = row_seed(expert, tensor);
    for (w, chunk) in row.chunks(8).enumerate() {
        let word = mix(seed ^ w as u64).to_le_bytes();
        if let Some(k) = chunk.iter().zip(&word).position(|(a, b)| a != b) {
            return Some(w * 8 + k);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_between_experts_and_tensors_and_detect_changes() {
        let mut a = vec![0u8; 100];
        fill_row(&mut a, 3, 0);
        assert_eq!(first_mismatch(&a, 3, 0), None);
        assert!(first_mismatch(&a, 4, 0).is_some());
        assert!(first_mismatch(&a, 3, 1).is_some());
        a[97] ^= 1;
        assert_eq!(first_mismatch(&a, 3, 0), Some(97));
    }

    #[test]
    fn derangement_has_no_fixed_point_and_normal_is_centred() {
        let mut rng = SplitMix(1);
        for n in 2..20 {
            let p = rng.derangement(n);
            let mut sorted = p.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            assert!(p.iter().enumerate().all(|(i, &x)| i != x));
        }
        let draws: Vec<f64> = (0..20_000).map(|_| rng.normal()).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }
}
