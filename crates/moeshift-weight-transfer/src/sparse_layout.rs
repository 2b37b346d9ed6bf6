//! Where the patches of one sparse update live when staged back to back: the indices of every
//! parameter in one int32 array, the values in one byte array with each parameter's values
//! aligned to 8 bytes (so a kernel can load any element size from them).
//!
//! Device engines stage a sparse update this way (one allocation for indices, one for values,
//! one small table per update); the layout is plain arithmetic and is tested without a GPU.

use crate::meta::ParamMeta;

/// Alignment of each parameter's values inside the value array.
pub const VALUE_ALIGN: usize = 8;

/// One parameter's place in a staged sparse update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayoutEntry {
    /// First index position (in int32 elements) of the parameter's indices.
    pub index_start: usize,
    /// Number of entries.
    pub count: usize,
    /// Byte offset of the parameter's first value.
    pub value_start: usize,
    /// Bytes per value (the dtype's size).
    pub elem: usize,
    /// Elements of the parameter.
    pub numel: usize,
}

impl LayoutEntry {
    /// Bytes of index data.
    pub fn index_bytes(&self) -> usize {
        self.count * 4
    }

    /// Bytes of value data.
    pub fn value_bytes(&self) -> usize {
        self.count * self.elem
    }
}

/// The layout of a whole update; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SparseLayout {
    /// One entry per parameter, in update order.
    pub entries: Vec<LayoutEntry>,
    /// Total int32 indices.
    pub index_count: usize,
    /// Total bytes of the value array (with alignment padding).
    pub value_bytes: usize,
}

impl SparseLayout {
    /// The layout of `counts[i]` entries for `params[i]`. `None` when the sizes overflow
    /// `usize` or the two lists differ in length.
    pub fn new(params: &[ParamMeta], counts: &[usize]) -> Option<Self> {
        if params.len() != counts.len() {
            return None;
        }
        let mut layout = SparseLayout::default();
        for (p, &count) in params.iter().zip(counts) {
            let elem = p.dtype().size_bytes();
            let value_start = layout.value_bytes.checked_next_multiple_of(VALUE_ALIGN)?;
            let entry = LayoutEntry {
                index_start: layout.index_count,
                count,
                value_start,
                elem,
                numel: p.numel(),
            };
            count.checked_mul(4)?;
            layout.index_count = layout.index_count.checked_add(count)?;
            layout.value_bytes = value_start.checked_add(count.checked_mul(elem)?)?;
            layout.entries.push(entry);
        }
        // Index bytes must fit too.
        layout.index_count.checked_mul(4)?;
        Some(layout)
    }

    /// Bytes of the index array.
    pub fn index_bytes(&self) -> usize {
        self.index_count * 4
    }

    /// Payload bytes on the wire (indices and values, without padding).
    pub fn payload_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.index_bytes() + e.value_bytes())
            .sum()
    }

    /// The largest entry count (sizes the kernel grids).
    pub fn max_count(&self) -> usize {
        self.entries.iter().map(|e| e.count).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moeshift_tensor::DType;

    #[test]
    fn values_are_aligned_and_indices_packed() {
        let params = [
            ParamMeta::new("a", DType::Bf16, vec![10]).unwrap(),
            ParamMeta::new("b", DType::F32, vec![4, 4]).unwrap(),
            ParamMeta::new("c", DType::U8, vec![7]).unwrap(),
            ParamMeta::new("d", DType::F64, vec![3]).unwrap(),
        ];
        let layout = SparseLayout::new(&params, &[3, 2, 5, 1]).unwrap();
        // Indices: a at 0..3, b at 3..5, c at 5..10, d at 10..11.
        let starts: Vec<usize> = layout.entries.iter().map(|e| e.index_start).collect();
        assert_eq!(starts, vec![0, 3, 5, 10]);
        assert_eq!(layout.index_count, 11);
        // Values: a 6 bytes at 0, b 8 bytes at 8 (6 rounded up), c 5 bytes at 16, d 8 bytes
        // at 24 (21 rounded up); 32 bytes in all.
        let vstarts: Vec<usize> = layout.entries.iter().map(|e| e.value_start).collect();
        assert_eq!(vstarts, vec![0, 8, 16, 24]);
        assert_eq!(layout.value_bytes, 32);
        // On the wire: 11 indices (44 bytes) + 6 + 8 + 5 + 8 value bytes.
        assert_eq!(layout.payload_bytes(), 44 + 27);
        assert_eq!(layout.max_count(), 5);
        assert_eq!(layout.entries[1].numel, 16);
    }

    #[test]
    fn mismatched_or_empty_inputs() {
        let p = [ParamMeta::new("a", DType::F32, vec![2]).unwrap()];
        assert!(SparseLayout::new(&p, &[1, 2]).is_none());
        let empty = SparseLayout::new(&[], &[]).unwrap();
        assert_eq!((empty.index_count, empty.value_bytes), (0, 0));
        let zero = SparseLayout::new(&p, &[0]).unwrap();
        assert_eq!(zero.payload_bytes(), 0);
        assert!(SparseLayout::new(&p, &[usize::MAX / 2]).is_none());
    }
}
