//! [`AutoPolicy`]: choosing, per parameter, between a dense and a sparse transfer.
//!
//! # The cost model
//!
//! For a parameter of `numel` elements of `e` bytes with `nnz` changed elements:
//!
//! * dense payload = `numel · e` bytes, applied by one contiguous copy;
//! * sparse payload = `nnz · (4 + e)` bytes (int32 index plus value), applied by a scatter.
//!
//! Published measurements for bf16 (two H100 nodes: at 8 % changed, sparse communication
//! 29 ms against 87 ms dense, sparse apply 93 ms against 344 ms) put the point where sparse
//! stops winning at about 40 % density. For bf16 a sparse entry costs `(4 + 2) / 2 = 3`
//! times a dense element, so at 40 % the sparse payload is `0.4 · 3 = 1.2` times the dense
//! one: sparse may carry up to 20 % more bytes than dense and still win, because dense
//! rewrites every element. The policy keeps that payload ratio for every dtype, which scales
//! the density threshold by the byte ratio:
//!
//! ```text
//! threshold(e) = 0.40 · 3 · e / (4 + e)    →  fp8/int8 24 %, bf16/f16 40 %, f32 60 %, f64 80 %
//! ```
//!
//! A parameter goes sparse when `nnz ≤ threshold · numel`, dense otherwise, and is skipped
//! when nothing changed. Parameters with more than 2³¹ elements always go dense (sparse
//! indices are int32).

use moeshift_tensor::DType;

use crate::meta::ParamMeta;

/// The measured bf16 crossover density.
pub const BF16_CROSSOVER_DENSITY: f64 = 0.40;

/// How one parameter travels in an automatic update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Choice {
    /// Nothing changed: the parameter is left out of the update.
    Unchanged,
    /// Only the changed elements travel.
    Sparse,
    /// Every element travels.
    Dense,
}

/// The dense/sparse decision rule; see the module docs for the model.
///
/// ```
/// use moeshift_tensor::DType;
/// use moeshift_weight_transfer::{AutoPolicy, Choice, ParamMeta};
///
/// let policy = AutoPolicy::default();
/// let w = ParamMeta::new("w", DType::Bf16, vec![1000])?;
/// assert_eq!(policy.choose(&w, 0), Choice::Unchanged);
/// assert_eq!(policy.choose(&w, 400), Choice::Sparse);
/// assert_eq!(policy.choose(&w, 401), Choice::Dense);
/// # Ok::<(), moeshift_weight_transfer::MetaError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoPolicy {
    /// The crossover density for bf16, from which every dtype's threshold is scaled.
    /// Default [`BF16_CROSSOVER_DENSITY`].
    pub bf16_crossover_density: f64,
}

impl Default for AutoPolicy {
    fn default() -> Self {
        Self {
            bf16_crossover_density: BF16_CROSSOVER_DENSITY,
        }
    }
}

impl AutoPolicy {
    /// The density at or below which a parameter of `dtype` goes sparse.
    pub fn threshold(&self, dtype: DType) -> f64 {
        let e = dtype.size_bytes() as f64;
        let bf16_ratio = (4.0 + 2.0) / 2.0;
        self.bf16_crossover_density * bf16_ratio * e / (4.0 + e)
    }

    /// The choice for `param` with `nnz` changed elements.
    pub fn choose(&self, param: &ParamMeta, nnz: usize) -> Choice {
        if nnz == 0 {
            return Choice::Unchanged;
        }
        if param.numel() > (i32::MAX as usize) + 1 {
            return Choice::Dense;
        }
        // Compare nnz ≤ threshold·numel without dividing (numel may be 0 only with nnz 0).
        if (nnz as f64) <= self.threshold(param.dtype()) * param.numel() as f64 {
            Choice::Sparse
        } else {
            Choice::Dense
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_follow_the_payload_ratio() {
        let p = AutoPolicy::default();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(p.threshold(DType::Bf16), 0.40));
        assert!(close(p.threshold(DType::F16), 0.40));
        assert!(close(p.threshold(DType::F8E4M3Fn), 0.24));
        assert!(close(p.threshold(DType::F32), 0.60));
        assert!(close(p.threshold(DType::F64), 0.80));
        // At each threshold the sparse payload is 1.2 × the dense payload.
        for dtype in [DType::U8, DType::Bf16, DType::F32, DType::I64] {
            let e = dtype.size_bytes() as f64;
            assert!(close(p.threshold(dtype) * (4.0 + e) / e, 1.2), "{dtype}");
        }
    }

    #[test]
    fn choices_at_the_edges() {
        let p = AutoPolicy::default();
        let f32p = ParamMeta::new("w", DType::F32, vec![10, 10]).unwrap();
        assert_eq!(p.choose(&f32p, 60), Choice::Sparse);
        assert_eq!(p.choose(&f32p, 61), Choice::Dense);
        assert_eq!(p.choose(&f32p, 100), Choice::Dense);
        let fp8 = ParamMeta::new("q", DType::F8E5M2, vec![100]).unwrap();
        assert_eq!(p.choose(&fp8, 24), Choice::Sparse);
        assert_eq!(p.choose(&fp8, 25), Choice::Dense);
        let huge = ParamMeta::new("h", DType::U8, vec![1 << 32]).unwrap();
        assert_eq!(p.choose(&huge, 1), Choice::Dense);
        let never = AutoPolicy {
            bf16_crossover_density: 0.0,
        };
        assert_eq!(never.choose(&f32p, 1), Choice::Dense);
    }
}
