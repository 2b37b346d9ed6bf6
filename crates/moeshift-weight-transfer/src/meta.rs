//! [`ParamMeta`]: a parameter's name, dtype and shape, and the digest of a metadata list.

use moeshift_tensor::DType;

use crate::digest::{Digest, Hasher};

/// Errors building a [`ParamMeta`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// The name is empty.
    #[error("a parameter name is empty")]
    EmptyName,
    /// The element count or byte length does not fit in `usize`.
    #[error("parameter '{name}': shape {shape:?} of {dtype} overflows the address space")]
    Overflow {
        /// Parameter name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Its dtype (PyTorch name).
        dtype: String,
    },
}

/// A parameter's name, dtype and shape, with its element count and byte length precomputed
/// (checked: building one never overflows).
///
/// ```
/// use moeshift_tensor::DType;
/// use moeshift_weight_transfer::ParamMeta;
///
/// let m = ParamMeta::new("layers.0.mlp.w1", DType::Bf16, vec![4, 8])?;
/// assert_eq!(m.numel(), 32);
/// assert_eq!(m.byte_len(), 64);
/// # Ok::<(), moeshift_weight_transfer::MetaError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ParamMeta {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    numel: usize,
    byte_len: usize,
}

impl ParamMeta {
    /// Metadata for `name`; fails on an empty name or a shape whose byte length overflows.
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<usize>,
    ) -> Result<Self, MetaError> {
        let name = name.into();
        if name.is_empty() {
            return Err(MetaError::EmptyName);
        }
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let byte_len = numel.and_then(|n| n.checked_mul(dtype.size_bytes()));
        match (numel, byte_len) {
            (Some(numel), Some(byte_len)) => Ok(Self {
                name,
                dtype,
                shape,
                numel,
                byte_len,
            }),
            _ => Err(MetaError::Overflow {
                name,
                shape,
                dtype: dtype.name().to_string(),
            }),
        }
    }

    /// Parameter name (the runtime name the worker registered).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Element dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements (1 for a scalar, 0 if any dimension is 0).
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Bytes of a contiguous copy: `numel · dtype size`.
    pub fn byte_len(&self) -> usize {
        self.byte_len
    }

    /// `name (dtype, [d0, d1])`, the way errors name a parameter.
    pub fn describe(&self) -> String {
        format!("'{}' ({}, {:?})", self.name, self.dtype.name(), self.shape)
    }
}

/// The digest of a metadata list: names, dtype names and shapes in order.
///
/// Two sides that computed the same digest agree on every parameter of an update, its
/// position, dtype and shape; this is what lets a worker check a "reuse the previous
/// metadata" update against what the trainer meant.
pub fn metadata_digest(params: &[ParamMeta]) -> Digest {
    let mut h = Hasher::new();
    h.update(b"moeshift.metadata.v1");
    h.update(&(params.len() as u64).to_le_bytes());
    for p in params {
        h.update_framed(p.name.as_bytes());
        h.update_framed(p.dtype.name().as_bytes());
        h.update(&(p.shape.len() as u64).to_le_bytes());
        for &d in &p.shape {
            h.update(&(d as u64).to_le_bytes());
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_dtype_and_shape() {
        let m = ParamMeta::new("w", DType::F32, vec![100, 100]).unwrap();
        assert_eq!((m.numel(), m.byte_len()), (10_000, 40_000));
        let s = ParamMeta::new("scalar", DType::F64, vec![]).unwrap();
        assert_eq!((s.numel(), s.byte_len()), (1, 8));
        let z = ParamMeta::new("empty", DType::Bf16, vec![3, 0]).unwrap();
        assert_eq!((z.numel(), z.byte_len()), (0, 0));
    }

    #[test]
    fn empty_name_and_overflow_are_errors() {
        assert_eq!(
            ParamMeta::new("", DType::F32, vec![1]),
            Err(MetaError::EmptyName)
        );
        let err = ParamMeta::new("huge", DType::F32, vec![usize::MAX / 2, 3]).unwrap_err();
        assert!(err.to_string().contains("'huge'"), "{err}");
    }

    #[test]
    fn digest_sees_every_field_and_order() {
        let a = ParamMeta::new("a", DType::F32, vec![2]).unwrap();
        let b = ParamMeta::new("b", DType::F32, vec![2]).unwrap();
        let base = metadata_digest(&[a.clone(), b.clone()]);
        assert_eq!(base, metadata_digest(&[a.clone(), b.clone()]));
        assert_ne!(base, metadata_digest(&[b.clone(), a.clone()]));
        let a_bf16 = ParamMeta::new("a", DType::Bf16, vec![2]).unwrap();
        assert_ne!(base, metadata_digest(&[a_bf16, b.clone()]));
        let a_2d = ParamMeta::new("a", DType::F32, vec![2, 1]).unwrap();
        assert_ne!(base, metadata_digest(&[a_2d, b]));
    }
}
