//! [`ExpertRows`]: the checked "one byte range per expert" layout that transports rely on.
//!
//! Expert weights are tensors shaped `[num_local_experts, ...]`, and transports move whole
//! experts as byte ranges: a remote read of expert `i` reads `row_bytes` bytes at
//! `row_addr(i)`. That is only correct when dim 0 is outermost and each row is one contiguous,
//! row-major byte range. Weak contiguity (vLLM's check) is not enough: the transpose of a
//! contiguous matrix covers its storage exactly, yet its "rows" are strided columns, and a
//! transport computing `base + i·nbytes/rows` would read the wrong bytes. [`ExpertRows`] is
//! only handed out for views where the per-row byte range is right.

use std::ops::Range;

use crate::dtype::DType;
use crate::view::{dims_contiguous, TensorView};
use crate::Device;

/// Why a view cannot be addressed as expert rows, or a row index is bad.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExpertRowsError {
    /// A rank-0 view has no row dimension.
    #[error("expert rows need at least one dimension (the expert dim); the view is a scalar")]
    NoRowDimension,
    /// The elements of one row are not one dense row-major range (e.g. a transposed or
    /// column-major view, or a column slice of each row).
    #[error(
        "expert rows are not contiguous: dim {dim} (size {size}) has stride {stride}, \
         a dense row needs {expected}"
    )]
    RowNotContiguous {
        /// The first dimension (counted in the full view) that breaks density.
        dim: usize,
        /// Its size.
        size: usize,
        /// Its stride in elements.
        stride: usize,
        /// The stride a dense row-major row would have there.
        expected: usize,
    },
    /// Dim 0 is not outermost: consecutive rows overlap.
    #[error(
        "dim 0 is not outermost: row stride {row_stride} elements is smaller than the row size \
         of {row_numel} elements, so rows overlap"
    )]
    RowsOverlap {
        /// Stride of dim 0, in elements.
        row_stride: usize,
        /// Elements per row.
        row_numel: usize,
    },
    /// A row index not below the number of rows.
    #[error("expert row {row} out of range: the view has {rows} rows")]
    RowOutOfRange {
        /// The index asked for.
        row: usize,
        /// The number of rows.
        rows: usize,
    },
}

/// Row-wise byte addressing of a view whose dim 0 indexes experts.
///
/// Guarantees (checked by [`TensorView::expert_rows`]): row `i` is exactly the bytes
/// `row_addr(i) .. row_addr(i) + row_bytes`, holding the row's elements in row-major order;
/// rows are `row_stride_bytes` apart with `row_stride_bytes ≥ row_bytes`, so they do not
/// overlap; every row lies inside the view's storage.
///
/// ```
/// use moeshift_tensor::{DType, Device, Storage, TensorView};
///
/// // 4 experts × 8 values of bf16.
/// let w = TensorView::contiguous(Storage::new(0x1000, 32, DType::Bf16, Device::Cuda(0)), &[4, 8])?;
/// let rows = w.expert_rows()?;
/// assert_eq!((rows.num_rows(), rows.row_bytes()), (4, 16));
/// assert_eq!(rows.row_addr(2)?, 0x1000 + 2 * 16);
/// assert!(rows.row_addr(4).is_err());
/// // The transpose covers the same storage, but its rows are columns: refused.
/// assert!(w.t()?.expert_rows().is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExpertRows {
    first_row_addr: u64,
    rows: usize,
    row_bytes: usize,
    row_stride_bytes: usize,
    dtype: DType,
    device: Device,
}

impl ExpertRows {
    pub(crate) fn from_view(view: &TensorView) -> Result<Self, ExpertRowsError> {
        let (&rows, row_shape) = view
            .shape()
            .split_first()
            .ok_or(ExpertRowsError::NoRowDimension)?;
        let (&dim0_stride, row_strides) = view
            .strides()
            .split_first()
            .ok_or(ExpertRowsError::NoRowDimension)?;
        // With no rows there is nothing to address, whatever the strides say.
        if rows > 0 && !dims_contiguous(row_shape, row_strides) {
            return Err(first_break(row_shape, row_strides));
        }
        let row_numel = row_shape.iter().fold(1usize, |n, &s| n.saturating_mul(s));
        let elem = view.dtype().size_bytes();
        let row_bytes = row_numel.saturating_mul(elem);
        let row_stride_bytes = if rows > 1 && row_numel > 0 {
            if dim0_stride < row_numel {
                return Err(ExpertRowsError::RowsOverlap {
                    row_stride: dim0_stride,
                    row_numel,
                });
            }
            dim0_stride.saturating_mul(elem)
        } else {
            // One row (or empty rows): the stride never moves to a real row; report the dense
            // one so that `row_stride_bytes ≥ row_bytes` holds.
            row_bytes
        };
        Ok(Self {
            first_row_addr: view.data_addr(),
            rows,
            row_bytes,
            row_stride_bytes,
            dtype: view.dtype(),
            device: view.device(),
        })
    }

    /// Number of rows (size of dim 0).
    pub fn num_rows(&self) -> usize {
        self.rows
    }

    /// Bytes in one row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Distance in bytes between the starts of consecutive rows (≥ `row_bytes`).
    pub fn row_stride_bytes(&self) -> usize {
        self.row_stride_bytes
    }

    /// True when rows follow each other with no gap, so any run of rows is one byte range.
    pub fn is_dense(&self) -> bool {
        self.row_stride_bytes == self.row_bytes
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where the memory lives.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Address of the first byte of row `row`.
    pub fn row_addr(&self, row: usize) -> Result<u64, ExpertRowsError> {
        if row >= self.rows {
            return Err(ExpertRowsError::RowOutOfRange {
                row,
                rows: self.rows,
            });
        }
        // Inside the storage (checked when the view was made), so no overflow; saturating
        // keeps this panic-free regardless.
        let step = row.saturating_mul(self.row_stride_bytes);
        Ok(self
            .first_row_addr
            .saturating_add(u64::try_from(step).unwrap_or(u64::MAX)))
    }

    /// The bytes of row `row`, as an address range.
    pub fn row_range(&self, row: usize) -> Result<Range<u64>, ExpertRowsError> {
        let start = self.row_addr(row)?;
        let len = u64::try_from(self.row_bytes).unwrap_or(u64::MAX);
        Ok(start..start.saturating_add(len))
    }
}

/// The first trailing dim (from the innermost) that breaks row-major density, for the error.
fn first_break(row_shape: &[usize], row_strides: &[usize]) -> ExpertRowsError {
    let mut expected = 1usize;
    for (i, (&size, &stride)) in row_shape.iter().zip(row_strides).enumerate().rev() {
        if size != 1 {
            if stride != expected {
                return ExpertRowsError::RowNotContiguous {
                    dim: i + 1,
                    size,
                    stride,
                    expected,
                };
            }
            expected = expected.saturating_mul(size);
        }
    }
    // Only reached if the caller's check disagreed; report dim 1 generically.
    ExpertRowsError::RowNotContiguous {
        dim: 1,
        size: row_shape.first().copied().unwrap_or(0),
        stride: row_strides.first().copied().unwrap_or(0),
        expected: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::Storage;

    fn w() -> TensorView {
        TensorView::contiguous(Storage::new(0x4000, 32, DType::F32, Device::Host), &[4, 8]).unwrap()
    }

    #[test]
    fn dense_rows() {
        let rows = w().expert_rows().unwrap();
        assert_eq!(rows.num_rows(), 4);
        assert_eq!(rows.row_bytes(), 32);
        assert_eq!(rows.row_stride_bytes(), 32);
        assert!(rows.is_dense());
        assert_eq!(rows.row_addr(0), Ok(0x4000));
        assert_eq!(rows.row_range(3), Ok(0x4000 + 96..0x4000 + 128));
        assert_eq!(
            rows.row_addr(4),
            Err(ExpertRowsError::RowOutOfRange { row: 4, rows: 4 })
        );
    }

    #[test]
    fn column_slice_rows_are_strided_but_each_contiguous() {
        // x[:, 2:6]: each row is 4 contiguous floats, rows 8 floats apart.
        let rows = w().narrow(1, 2, 4).unwrap().expert_rows().unwrap();
        assert_eq!(rows.row_bytes(), 16);
        assert_eq!(rows.row_stride_bytes(), 32);
        assert!(!rows.is_dense());
        assert_eq!(rows.row_addr(1), Ok(0x4000 + 32 + 8));
    }

    #[test]
    fn transposed_and_column_major_views_are_refused_even_if_weakly_contiguous() {
        let xt = w().t().unwrap();
        assert!(xt.is_weak_contiguous());
        assert_eq!(
            xt.expert_rows(),
            Err(ExpertRowsError::RowNotContiguous {
                dim: 1,
                size: 4,
                stride: 8,
                expected: 1
            })
        );
        // A column-major [4, 8] view: strides (1, 4).
        let s = Storage::new(0, 32, DType::F32, Device::Host);
        let colmajor = TensorView::new(s, 0, vec![4, 8], vec![1, 4]).unwrap();
        assert!(colmajor.is_weak_contiguous());
        assert!(matches!(
            colmajor.expert_rows(),
            Err(ExpertRowsError::RowNotContiguous { dim: 1, .. })
        ));
    }

    #[test]
    fn overlapping_rows_are_refused() {
        // Rows one element apart, each 8 long: an expanded / overlapping layout.
        let s = Storage::new(0, 32, DType::F32, Device::Host);
        let v = TensorView::new(s, 0, vec![4, 8], vec![1, 1]).unwrap();
        assert!(matches!(
            v.expert_rows(),
            Err(ExpertRowsError::RowsOverlap { row_stride: 1, .. })
        ));
        let v = TensorView::new(s, 0, vec![4, 8], vec![2, 1]).unwrap();
        assert_eq!(
            v.expert_rows(),
            Err(ExpertRowsError::RowsOverlap {
                row_stride: 2,
                row_numel: 8
            })
        );
        let broadcast = TensorView::new(s, 0, vec![3, 8], vec![0, 1]).unwrap();
        assert!(matches!(
            broadcast.expert_rows(),
            Err(ExpertRowsError::RowsOverlap { row_stride: 0, .. })
        ));
    }

    #[test]
    fn scalars_and_single_rows() {
        let s = Storage::new(0, 32, DType::F32, Device::Host);
        let scalar = TensorView::new(s, 5, vec![], vec![]).unwrap();
        assert_eq!(scalar.expert_rows(), Err(ExpertRowsError::NoRowDimension));
        // A single row: its dim-0 stride never matters.
        let one = TensorView::new(s, 8, vec![1, 8], vec![0, 1]).unwrap();
        let rows = one.expert_rows().unwrap();
        assert_eq!((rows.num_rows(), rows.row_addr(0)), (1, Ok(32)));
        // A 1-D view: every row is one element.
        let flat = TensorView::contiguous(s, &[32])
            .unwrap()
            .expert_rows()
            .unwrap();
        assert_eq!((flat.row_bytes(), flat.row_addr(31)), (4, Ok(124)));
    }
}
