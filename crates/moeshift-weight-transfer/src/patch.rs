//! [`SparsePatch`]: the changed elements of one parameter as flat int32 indices and raw
//! values; [`diff`] to compute one, validation against a parameter, and in-place apply.

use moeshift_tensor::DType;

use crate::digest::{Digest, Hasher};
use crate::meta::ParamMeta;

/// Why a patch cannot be built or applied. Messages name the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatchError {
    /// The patch is for another parameter.
    #[error("patch for '{patch}' was offered to parameter '{param}'")]
    NameMismatch {
        /// The patch's name.
        patch: String,
        /// The parameter's name.
        param: String,
    },
    /// The patch's dtype differs from the parameter's.
    #[error("patch for '{name}' carries {patch} values but the parameter is {param}")]
    DTypeMismatch {
        /// Parameter name.
        name: String,
        /// The patch's dtype.
        patch: String,
        /// The parameter's dtype.
        param: String,
    },
    /// `values` does not hold exactly one element per index.
    #[error(
        "patch for '{name}': {indices} indices need {expected} bytes of {dtype} values, got {got}"
    )]
    ValuesLength {
        /// Parameter name.
        name: String,
        /// Number of indices.
        indices: usize,
        /// The dtype.
        dtype: String,
        /// `indices · dtype size`.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// An index is negative or not below the parameter's element count.
    #[error("patch for '{name}': indices[{position}] = {index} is outside [0, {numel})")]
    IndexOutOfRange {
        /// Parameter name.
        name: String,
        /// Position in `indices`.
        position: usize,
        /// The index.
        index: i32,
        /// Elements of the parameter.
        numel: usize,
    },
    /// Device engines apply patches whose indices strictly increase (so no two entries of
    /// one patch write the same element, and the scatter needs no ordering); this one does
    /// not.
    #[error(
        "patch for '{name}': indices[{position}] = {index} does not exceed indices[{}] = {previous}; \
         device engines need strictly increasing indices",
        .position.saturating_sub(1)
    )]
    NotIncreasing {
        /// Parameter name.
        name: String,
        /// Position of the offending entry.
        position: usize,
        /// The index before it.
        previous: i32,
        /// The index at `position`.
        index: i32,
    },
    /// The number of entries differs from what the update announced.
    #[error("patch for '{name}': the update announced {expected} entries, the patch has {got}")]
    CountMismatch {
        /// Parameter name.
        name: String,
        /// Entries announced in `num_updates_list`.
        expected: usize,
        /// Entries in the patch.
        got: usize,
    },
    /// The destination buffer is not the parameter's size.
    #[error("parameter '{name}': destination holds {got} bytes, the parameter needs {expected}")]
    DestinationLength {
        /// Parameter name.
        name: String,
        /// Bytes the parameter needs.
        expected: usize,
        /// Bytes in the destination.
        got: usize,
    },
    /// The two sides of a diff have different lengths, or a length that is not a whole
    /// number of elements.
    #[error(
        "diff of '{name}': previous has {previous} bytes and current {current}; both must be \
         the same whole number of {dtype} elements"
    )]
    DiffLength {
        /// Parameter name.
        name: String,
        /// Bytes of the previous version.
        previous: usize,
        /// Bytes of the current version.
        current: usize,
        /// The dtype.
        dtype: String,
    },
    /// A changed element's flat index does not fit in an int32 index.
    #[error("diff of '{name}': element {index} changed, but sparse indices are int32")]
    IndexOverflow {
        /// Parameter name.
        name: String,
        /// The element's flat index.
        index: usize,
    },
}

/// The changed elements of one parameter: flat (row-major) int32 indices into the
/// parameter and, for each, the new value's bytes in the parameter's dtype (little-endian,
/// as the parameter stores them).
///
/// Indices need not be sorted. When an index repeats, the later entry wins on apply.
///
/// ```
/// use moeshift_tensor::DType;
/// use moeshift_weight_transfer::{diff, ParamMeta};
///
/// let before: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
/// let after: Vec<u8> = [1.0f32, 2.5, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
/// let patch = diff("layer.weight", &before, &after, DType::F32)?;
/// assert_eq!(patch.indices, vec![1]);
/// assert_eq!(patch.values, 2.5f32.to_le_bytes().to_vec());
///
/// let meta = ParamMeta::new("layer.weight", DType::F32, vec![4])?;
/// let mut weights = before.clone();
/// patch.apply(&meta, &mut weights)?;
/// assert_eq!(weights, after);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparsePatch {
    /// The parameter's name.
    pub name: String,
    /// The dtype of `values` (the parameter's dtype).
    pub dtype: DType,
    /// Flat indices into the parameter.
    pub indices: Vec<i32>,
    /// `indices.len()` elements of `dtype`, back to back.
    pub values: Vec<u8>,
}

impl SparsePatch {
    /// A patch, checking that `values` holds one element per index.
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        indices: Vec<i32>,
        values: Vec<u8>,
    ) -> Result<Self, PatchError> {
        let patch = Self {
            name: name.into(),
            dtype,
            indices,
            values,
        };
        patch.check_lengths()?;
        Ok(patch)
    }

    /// Number of entries.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    /// Bytes on the wire: 4 per index plus the values.
    pub fn payload_bytes(&self) -> usize {
        self.indices
            .len()
            .saturating_mul(4)
            .saturating_add(self.values.len())
    }

    /// The indices as little-endian bytes, as they travel.
    pub fn index_bytes(&self) -> Vec<u8> {
        self.indices.iter().flat_map(|i| i.to_le_bytes()).collect()
    }

    fn check_lengths(&self) -> Result<(), PatchError> {
        let expected = self.indices.len().checked_mul(self.dtype.size_bytes());
        if expected != Some(self.values.len()) {
            return Err(PatchError::ValuesLength {
                name: self.name.clone(),
                indices: self.indices.len(),
                dtype: self.dtype.name().to_string(),
                expected: expected.unwrap_or(usize::MAX),
                got: self.values.len(),
            });
        }
        Ok(())
    }

    /// Checks the patch against the parameter it is meant for: same name, same dtype, one
    /// value per index, every index in `[0, numel)`. Reads only; writes nothing.
    pub fn validate_for(&self, param: &ParamMeta) -> Result<(), PatchError> {
        if self.name != param.name() {
            return Err(PatchError::NameMismatch {
                patch: self.name.clone(),
                param: param.name().to_string(),
            });
        }
        if self.dtype != param.dtype() {
            return Err(PatchError::DTypeMismatch {
                name: self.name.clone(),
                patch: self.dtype.name().to_string(),
                param: param.dtype().name().to_string(),
            });
        }
        self.check_lengths()?;
        let numel = param.numel();
        let bad = self
            .indices
            .iter()
            .position(|&i| usize::try_from(i).map_or(true, |i| i >= numel));
        if let Some(position) = bad {
            return Err(PatchError::IndexOutOfRange {
                name: self.name.clone(),
                position,
                index: self.indices[position],
                numel,
            });
        }
        Ok(())
    }

    /// Validates against `param` (see [`SparsePatch::validate_for`]) and that `dest` is the
    /// parameter's size, then writes every value in place. On error nothing is written.
    pub fn apply(&self, param: &ParamMeta, dest: &mut [u8]) -> Result<(), PatchError> {
        self.validate_for(param)?;
        if dest.len() != param.byte_len() {
            return Err(PatchError::DestinationLength {
                name: param.name().to_string(),
                expected: param.byte_len(),
                got: dest.len(),
            });
        }
        self.write_validated(dest);
        Ok(())
    }

    /// Writes values into `dest`; the caller has validated the patch and `dest`'s length.
    /// Entries that would still fall outside `dest` are skipped rather than panicking.
    pub(crate) fn write_validated(&self, dest: &mut [u8]) {
        let elem = self.dtype.size_bytes();
        for (&index, value) in self.indices.iter().zip(self.values.chunks_exact(elem)) {
            let start = usize::try_from(index).unwrap_or(usize::MAX);
            let slot = start
                .checked_mul(elem)
                .and_then(|s| dest.get_mut(s..s.checked_add(elem)?));
            if let Some(slot) = slot {
                slot.copy_from_slice(value);
            }
        }
    }

    /// True when the indices strictly increase (what device engines apply).
    pub fn is_strictly_increasing(&self) -> bool {
        self.indices.windows(2).all(|w| w[0] < w[1])
    }

    /// The same update with strictly increasing indices: entries sorted by index and, where
    /// an index repeats, only the last entry kept (the one [`SparsePatch::apply`] leaves in
    /// place). Applying either patch gives the same bytes. Fails only when the values do not
    /// hold one element per index.
    pub fn to_strictly_increasing(&self) -> Result<SparsePatch, PatchError> {
        self.check_lengths()?;
        if self.is_strictly_increasing() {
            return Ok(self.clone());
        }
        let elem = self.dtype.size_bytes();
        let mut order: Vec<usize> = (0..self.indices.len()).collect();
        // Stable: among equal indices the original order is kept, so the last one wins.
        order.sort_by_key(|&k| self.indices[k]);
        let mut indices: Vec<i32> = Vec::with_capacity(order.len());
        let mut values: Vec<u8> = Vec::with_capacity(self.values.len());
        for &k in &order {
            let value = &self.values[k * elem..(k + 1) * elem];
            if indices.last() == Some(&self.indices[k]) {
                let at = values.len() - elem;
                values[at..].copy_from_slice(value);
            } else {
                indices.push(self.indices[k]);
                values.extend_from_slice(value);
            }
        }
        Ok(SparsePatch {
            name: self.name.clone(),
            dtype: self.dtype,
            indices,
            values,
        })
    }

    /// SHA-256 of the little-endian int32 indices followed by the raw value bytes (in the
    /// parameter's own dtype, not converted to float32): two patches with equal digests
    /// write the same bits to the same elements. Name and dtype are not hashed.
    pub fn digest(&self) -> Digest {
        let mut h = Hasher::new();
        h.update(&self.index_bytes());
        h.update(&self.values);
        h.finish()
    }
}

/// The patch that turns `previous` into `current`, both the raw bytes of a parameter of
/// `dtype`. Elements are compared bit for bit, so a NaN whose payload changes, or `0.0`
/// becoming `-0.0`, is a change, and an unchanged NaN is not. Indices come out ascending.
///
/// Fails if the lengths differ or are not a whole number of elements, or if a changed
/// element's index does not fit in int32.
pub fn diff(
    name: impl Into<String>,
    previous: &[u8],
    current: &[u8],
    dtype: DType,
) -> Result<SparsePatch, PatchError> {
    let name = name.into();
    let elem = dtype.size_bytes();
    if previous.len() != current.len() || elem == 0 || previous.len() % elem != 0 {
        return Err(PatchError::DiffLength {
            name,
            previous: previous.len(),
            current: current.len(),
            dtype: dtype.name().to_string(),
        });
    }
    let mut indices = Vec::new();
    let mut values = Vec::new();
    // Most elements are unchanged after an optimizer step: compare blocks of elements
    // first and look inside only the blocks that differ.
    const BLOCK_ELEMS: usize = 64;
    let block = BLOCK_ELEMS * elem;
    for (block_index, (p, c)) in previous
        .chunks(block)
        .zip(current.chunks(block))
        .enumerate()
    {
        if p == c {
            continue;
        }
        for (k, (pe, ce)) in p.chunks_exact(elem).zip(c.chunks_exact(elem)).enumerate() {
            if pe != ce {
                let index = block_index * BLOCK_ELEMS + k;
                let index32 = i32::try_from(index).map_err(|_| PatchError::IndexOverflow {
                    name: name.clone(),
                    index,
                })?;
                indices.push(index32);
                values.extend_from_slice(ce);
            }
        }
    }
    Ok(SparsePatch {
        name,
        dtype,
        indices,
        values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn meta(name: &str, dtype: DType, shape: Vec<usize>) -> ParamMeta {
        ParamMeta::new(name, dtype, shape).unwrap()
    }

    #[test]
    fn worker_vector_patch_applies() {
        // names=[layer.weight], float32 [4], one update: index 1 becomes 2.0.
        let m = meta("layer.weight", DType::F32, vec![4]);
        let patch =
            SparsePatch::new("layer.weight", DType::F32, vec![1], f32_bytes(&[2.0])).unwrap();
        let mut w = f32_bytes(&[0.0, 0.0, 0.0, 0.0]);
        patch.apply(&m, &mut w).unwrap();
        assert_eq!(w, f32_bytes(&[0.0, 2.0, 0.0, 0.0]));
    }

    #[test]
    fn out_of_range_index_changes_nothing() {
        let m = meta("w", DType::F32, vec![2, 2]);
        let original = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
        for bad in [4, -1, i32::MAX] {
            let mut w = original.clone();
            let patch =
                SparsePatch::new("w", DType::F32, vec![0, bad], f32_bytes(&[9.0, 9.0])).unwrap();
            let err = patch.apply(&m, &mut w).unwrap_err();
            assert!(
                matches!(err, PatchError::IndexOutOfRange { position: 1, index, numel: 4, .. } if index == bad),
                "{err}"
            );
            assert!(err.to_string().contains("'w'"));
            assert_eq!(w, original, "index {bad} must not write anything");
        }
    }

    #[test]
    fn wrong_dtype_and_name_change_nothing() {
        let m = meta("w", DType::F32, vec![4]);
        let original = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
        let mut w = original.clone();
        let bf16 = SparsePatch::new("w", DType::Bf16, vec![0], vec![0, 0x3f]).unwrap();
        let err = bf16.apply(&m, &mut w).unwrap_err();
        assert!(matches!(err, PatchError::DTypeMismatch { .. }), "{err}");
        assert!(err.to_string().contains("bfloat16") && err.to_string().contains("float32"));
        let other = SparsePatch::new("v", DType::F32, vec![0], f32_bytes(&[0.5])).unwrap();
        assert!(matches!(
            other.apply(&m, &mut w),
            Err(PatchError::NameMismatch { .. })
        ));
        assert_eq!(w, original);
    }

    #[test]
    fn lengths_are_checked() {
        assert!(matches!(
            SparsePatch::new("w", DType::F32, vec![0, 1], f32_bytes(&[1.0])),
            Err(PatchError::ValuesLength {
                expected: 8,
                got: 4,
                ..
            })
        ));
        // A patch built by hand with bad lengths is caught by validation too.
        let m = meta("w", DType::F32, vec![4]);
        let bad = SparsePatch {
            name: "w".into(),
            dtype: DType::F32,
            indices: vec![0],
            values: vec![1, 2],
        };
        let mut w = f32_bytes(&[0.0; 4]);
        assert!(bad.apply(&m, &mut w).is_err());
        assert_eq!(w, f32_bytes(&[0.0; 4]));
        // Destination of the wrong size.
        let ok = SparsePatch::new("w", DType::F32, vec![0], f32_bytes(&[1.0])).unwrap();
        let mut short = vec![0u8; 12];
        assert!(matches!(
            ok.apply(&m, &mut short),
            Err(PatchError::DestinationLength {
                expected: 16,
                got: 12,
                ..
            })
        ));
    }

    #[test]
    fn repeated_index_later_entry_wins() {
        let m = meta("w", DType::F32, vec![2]);
        let patch = SparsePatch::new("w", DType::F32, vec![1, 1], f32_bytes(&[5.0, 6.0])).unwrap();
        let mut w = f32_bytes(&[0.0, 0.0]);
        patch.apply(&m, &mut w).unwrap();
        assert_eq!(w, f32_bytes(&[0.0, 6.0]));
    }

    #[test]
    fn strictly_increasing_form_keeps_the_last_write() {
        // Entries (index, value): (3, 1.0), (1, 2.0), (3, 5.0), (0, 7.0), (1, 8.0).
        // Applied in order, element 3 ends as 5.0 and element 1 as 8.0.
        let patch = SparsePatch::new(
            "w",
            DType::F32,
            vec![3, 1, 3, 0, 1],
            f32_bytes(&[1.0, 2.0, 5.0, 7.0, 8.0]),
        )
        .unwrap();
        assert!(!patch.is_strictly_increasing());
        let inc = patch.to_strictly_increasing().unwrap();
        assert!(inc.is_strictly_increasing());
        assert_eq!(inc.indices, vec![0, 1, 3]);
        assert_eq!(inc.values, f32_bytes(&[7.0, 8.0, 5.0]));
        let m = meta("w", DType::F32, vec![4]);
        let (mut a, mut b) = (f32_bytes(&[0.0; 4]), f32_bytes(&[0.0; 4]));
        patch.apply(&m, &mut a).unwrap();
        inc.apply(&m, &mut b).unwrap();
        assert_eq!(a, b);
        // Already increasing: unchanged.
        let sorted = SparsePatch::new("w", DType::U8, vec![0, 2], vec![1, 2]).unwrap();
        assert_eq!(sorted.to_strictly_increasing().unwrap(), sorted);
        let err = PatchError::NotIncreasing {
            name: "w".into(),
            position: 4,
            previous: 9,
            index: 9,
        };
        assert!(err
            .to_string()
            .contains("indices[4] = 9 does not exceed indices[3] = 9"));
    }

    #[test]
    fn diff_is_bitwise() {
        let nan_a = f32::from_bits(0x7fc0_0001);
        let nan_b = f32::from_bits(0x7fc0_0002);
        let prev = f32_bytes(&[0.0, 1.0, nan_a, nan_a, 7.0]);
        let cur = f32_bytes(&[-0.0, 1.0, nan_a, nan_b, 7.0]);
        let patch = diff("w", &prev, &cur, DType::F32).unwrap();
        // -0.0 differs from 0.0 in its sign bit; the NaN at 2 kept its bits; the one at 3
        // changed payload.
        assert_eq!(patch.indices, vec![0, 3]);
        assert_eq!(patch.values, f32_bytes(&[-0.0, nan_b]));
        let mut w = prev.clone();
        patch
            .apply(&meta("w", DType::F32, vec![5]), &mut w)
            .unwrap();
        assert_eq!(w, cur);
    }

    #[test]
    fn diff_across_block_boundaries_and_bf16() {
        // 200 bf16 elements; change elements 0, 63, 64, 127, 199 (block edges of 64).
        let prev: Vec<u8> = (0..200u16).flat_map(|i| i.to_le_bytes()).collect();
        let mut cur = prev.clone();
        let changed = [0usize, 63, 64, 127, 199];
        for &i in &changed {
            cur[2 * i] ^= 0x01;
        }
        let patch = diff("b", &prev, &cur, DType::Bf16).unwrap();
        assert_eq!(
            patch.indices,
            changed.iter().map(|&i| i as i32).collect::<Vec<_>>()
        );
        assert_eq!(patch.values.len(), changed.len() * 2);
        let mut w = prev.clone();
        patch
            .apply(&meta("b", DType::Bf16, vec![10, 20]), &mut w)
            .unwrap();
        assert_eq!(w, cur);
        // No change, no entries.
        assert_eq!(diff("b", &prev, &prev, DType::Bf16).unwrap().nnz(), 0);
    }

    #[test]
    fn diff_rejects_mismatched_lengths() {
        assert!(matches!(
            diff("w", &[0; 8], &[0; 4], DType::F32),
            Err(PatchError::DiffLength { .. })
        ));
        assert!(matches!(
            diff("w", &[0; 6], &[0; 6], DType::F32),
            Err(PatchError::DiffLength { .. })
        ));
    }

    #[test]
    fn digest_covers_indices_then_values() {
        let patch = SparsePatch::new("w", DType::F32, vec![1, 3], f32_bytes(&[2.0, 4.0])).unwrap();
        // Independently: the same bytes laid out by hand.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&1i32.to_le_bytes());
        bytes.extend_from_slice(&3i32.to_le_bytes());
        bytes.extend_from_slice(&2.0f32.to_le_bytes());
        bytes.extend_from_slice(&4.0f32.to_le_bytes());
        assert_eq!(patch.digest(), Digest::of(&bytes));
        let mut other = patch.clone();
        other.indices[1] = 2;
        assert_ne!(patch.digest(), other.digest());
        assert_eq!(patch.payload_bytes(), 16);
    }
}
