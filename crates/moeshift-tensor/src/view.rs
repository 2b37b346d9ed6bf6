//! [`TensorView`]: a strided view descriptor over host or device memory, with PyTorch's
//! view rules (`select`, `narrow`, `transpose`, contiguity).
//!
//! A view does not own or borrow memory: it records the address of its storage and where its
//! elements are. Whoever creates it keeps the memory alive while the view is used.

use crate::dtype::DType;
use crate::expert_rows::{ExpertRows, ExpertRowsError};
use crate::Device;

/// The allocation a view looks into: base address, length in elements, dtype and device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Storage {
    /// Address of the first byte (a host pointer or a CUDA device pointer).
    pub addr: u64,
    /// Length in elements of `dtype`.
    pub len: usize,
    /// Element type.
    pub dtype: DType,
    /// Where the memory lives.
    pub device: Device,
}

impl Storage {
    /// A storage description. Checked when a view is made from it.
    pub const fn new(addr: u64, len: usize, dtype: DType, device: Device) -> Self {
        Self {
            addr,
            len,
            dtype,
            device,
        }
    }

    /// Length in bytes, or `None` if it does not fit in `usize`.
    pub fn nbytes(&self) -> Option<usize> {
        self.len.checked_mul(self.dtype.size_bytes())
    }
}

/// Error when a view would be malformed or an operation is out of range. Variants name the
/// dimension, index and sizes involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// `shape` and `strides` have different lengths.
    #[error("shape has {shape_rank} dims but strides have {strides_rank}")]
    RankMismatch {
        /// `shape.len()`.
        shape_rank: usize,
        /// `strides.len()`.
        strides_rank: usize,
    },
    /// The view reaches past the end of its storage.
    #[error(
        "view out of bounds: elements from offset {offset} up to element {end} (exclusive) \
         but the storage holds {storage_len} elements"
    )]
    OutOfBounds {
        /// Element offset of the view.
        offset: usize,
        /// One past the furthest element the view reaches.
        end: usize,
        /// Storage length in elements.
        storage_len: usize,
    },
    /// A size, address or byte count does not fit in the integer types.
    #[error("{what} overflows")]
    Overflow {
        /// Which quantity overflowed.
        what: &'static str,
    },
    /// A dimension argument is not below the rank.
    #[error("{op}: dim {dim} out of range for a view of rank {rank}")]
    DimOutOfRange {
        /// The operation.
        op: &'static str,
        /// The dimension given.
        dim: usize,
        /// The view's rank.
        rank: usize,
    },
    /// `select` with an index not below the dimension's size.
    #[error("select: index {index} out of range for dim {dim} of size {size}")]
    IndexOutOfRange {
        /// The dimension.
        dim: usize,
        /// The index given.
        index: usize,
        /// The dimension's size.
        size: usize,
    },
    /// `narrow` past the end of a dimension.
    #[error("narrow: start {start} + length {len} exceeds size {size} of dim {dim}")]
    NarrowOutOfRange {
        /// The dimension.
        dim: usize,
        /// Start index.
        start: usize,
        /// Length.
        len: usize,
        /// The dimension's size.
        size: usize,
    },
    /// `t()` on a view of rank above 2.
    #[error("t() expects a view of rank at most 2, got rank {rank}")]
    NotAMatrix {
        /// The view's rank.
        rank: usize,
    },
}

/// A strided view: `shape`, `strides` (in elements), an element `offset` into a [`Storage`].
///
/// Element `(i0, i1, …)` is at `storage.addr + (offset + Σ ik·strides[k]) · elem_size`.
/// Constructors check that every element lies inside the storage, so every address a valid
/// view yields is inside its storage.
///
/// ```
/// use moeshift_tensor::{DType, Device, Storage, TensorView};
///
/// // x = torch.zeros(4, 8)
/// let x = TensorView::contiguous(Storage::new(0x1000, 32, DType::F32, Device::Host), &[4, 8])?;
/// assert!(x.is_contiguous());
/// let tail_t = x.narrow(0, 2, 2)?.t()?; // x[2:].t()
/// assert_eq!(tail_t.shape(), &[8, 2]);
/// assert!(!tail_t.is_contiguous());
/// assert!(tail_t.is_weak_contiguous()); // it covers the rest of the storage exactly
/// # Ok::<(), moeshift_tensor::ViewError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorView {
    storage: Storage,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl TensorView {
    /// A view with explicit `offset` (elements), `shape` and `strides` (elements).
    ///
    /// Errors: [`ViewError::RankMismatch`], [`ViewError::OutOfBounds`] when an element would lie
    /// outside the storage, [`ViewError::Overflow`] when the storage's byte size, its end address
    /// or the view's byte size does not fit. Like PyTorch, an empty view (a zero-size dim) is
    /// not bounds-checked.
    pub fn new(
        storage: Storage,
        offset: usize,
        shape: Vec<usize>,
        strides: Vec<usize>,
    ) -> Result<Self, ViewError> {
        if shape.len() != strides.len() {
            return Err(ViewError::RankMismatch {
                shape_rank: shape.len(),
                strides_rank: strides.len(),
            });
        }
        let elem = storage.dtype.size_bytes();
        let storage_nbytes = storage.nbytes().ok_or(ViewError::Overflow {
            what: "storage length in bytes",
        })?;
        u64::try_from(storage_nbytes)
            .ok()
            .and_then(|n| storage.addr.checked_add(n))
            .ok_or(ViewError::Overflow {
                what: "storage end address",
            })?;
        let numel = checked_numel(&shape).ok_or(ViewError::Overflow {
            what: "element count",
        })?;
        numel.checked_mul(elem).ok_or(ViewError::Overflow {
            what: "view size in bytes",
        })?;
        if numel > 0 {
            let mut reach = offset;
            for (&size, &stride) in shape.iter().zip(&strides) {
                reach = (size - 1)
                    .checked_mul(stride)
                    .and_then(|step| reach.checked_add(step))
                    .ok_or(ViewError::Overflow {
                        what: "furthest element offset",
                    })?;
            }
            // `reach` is the furthest element; `reach < storage.len` keeps it inside.
            if reach >= storage.len {
                return Err(ViewError::OutOfBounds {
                    offset,
                    end: reach.saturating_add(1),
                    storage_len: storage.len,
                });
            }
        } else {
            offset
                .checked_mul(elem)
                .and_then(|b| u64::try_from(b).ok())
                .and_then(|b| storage.addr.checked_add(b))
                .ok_or(ViewError::Overflow {
                    what: "data address",
                })?;
        }
        Ok(Self {
            storage,
            offset,
            shape,
            strides,
        })
    }

    /// A row-major contiguous view of `shape` at the start of `storage`.
    pub fn contiguous(storage: Storage, shape: &[usize]) -> Result<Self, ViewError> {
        let strides = contiguous_strides(shape).ok_or(ViewError::Overflow {
            what: "contiguous strides",
        })?;
        Self::new(storage, 0, shape.to_vec(), strides)
    }

    /// The storage this view looks into.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype
    }

    /// Where the memory lives.
    pub fn device(&self) -> Device {
        self.storage.device
    }

    /// Element offset of the view's first element in its storage.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Sizes of the dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Strides of the dimensions, in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements (1 for rank 0).
    pub fn numel(&self) -> usize {
        // Checked at construction; saturating keeps this panic-free regardless.
        self.shape.iter().fold(1usize, |n, &s| n.saturating_mul(s))
    }

    /// Bytes covered by the elements: `numel × element size`.
    pub fn nbytes(&self) -> usize {
        self.numel().saturating_mul(self.dtype().size_bytes())
    }

    /// Storage length in elements.
    pub fn storage_len(&self) -> usize {
        self.storage.len
    }

    /// Storage length in bytes.
    pub fn storage_nbytes(&self) -> usize {
        self.storage
            .len
            .saturating_mul(self.storage.dtype.size_bytes())
    }

    /// Address of the view's first element (`storage.addr + offset × element size`).
    pub fn data_addr(&self) -> u64 {
        let bytes = self.offset.saturating_mul(self.dtype().size_bytes());
        self.storage
            .addr
            .saturating_add(u64::try_from(bytes).unwrap_or(u64::MAX))
    }

    /// PyTorch's `is_contiguous()`: row-major dense, ignoring the strides of size-1 dims; every
    /// empty view is contiguous.
    pub fn is_contiguous(&self) -> bool {
        dims_contiguous(&self.shape, &self.strides)
    }

    /// vLLM's `is_weak_contiguous`: contiguous, or the view covers exactly the rest of its
    /// storage from its offset (`storage_nbytes − offset·elem == numel·elem`), whatever its
    /// strides. A permuted view can pass this rule, so it does not say that rows are laid out
    /// densely; use [`TensorView::expert_rows`] for that.
    pub fn is_weak_contiguous(&self) -> bool {
        self.is_contiguous()
            || self
                .storage
                .len
                .checked_sub(self.offset)
                .is_some_and(|rest| rest == self.numel())
    }

    /// `x[.., index, ..]` along `dim`: drops the dimension (PyTorch `select`, `x[i]` for dim 0).
    pub fn select(&self, dim: usize, index: usize) -> Result<Self, ViewError> {
        let size = self.dim_size("select", dim)?;
        if index >= size {
            return Err(ViewError::IndexOutOfRange { dim, index, size });
        }
        let offset = self.shifted_offset(dim, index)?;
        let mut shape = self.shape.clone();
        let mut strides = self.strides.clone();
        shape.remove(dim);
        strides.remove(dim);
        Self::new(self.storage, offset, shape, strides)
    }

    /// `x[.., start:start+len, ..]` along `dim` (PyTorch `narrow`).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self, ViewError> {
        let size = self.dim_size("narrow", dim)?;
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(ViewError::NarrowOutOfRange {
                dim,
                start,
                len,
                size,
            });
        }
        let offset = self.shifted_offset(dim, start)?;
        let mut shape = self.shape.clone();
        if let Some(s) = shape.get_mut(dim) {
            *s = len;
        }
        Self::new(self.storage, offset, shape, self.strides.clone())
    }

    /// Swaps two dimensions (PyTorch `transpose`).
    pub fn transpose(&self, dim0: usize, dim1: usize) -> Result<Self, ViewError> {
        self.dim_size("transpose", dim0)?;
        self.dim_size("transpose", dim1)?;
        let mut out = self.clone();
        out.shape.swap(dim0, dim1);
        out.strides.swap(dim0, dim1);
        Ok(out)
    }

    /// PyTorch `t()`: rank 0 and 1 unchanged, rank 2 transposed, error above.
    pub fn t(&self) -> Result<Self, ViewError> {
        match self.rank() {
            0 | 1 => Ok(self.clone()),
            2 => self.transpose(0, 1),
            rank => Err(ViewError::NotAMatrix { rank }),
        }
    }

    /// Expert-row access: dim 0 indexes rows (experts), each row must be one contiguous byte
    /// range, and rows must not overlap (row stride ≥ row size). See [`ExpertRows`].
    pub fn expert_rows(&self) -> Result<ExpertRows, ExpertRowsError> {
        ExpertRows::from_view(self)
    }

    fn dim_size(&self, op: &'static str, dim: usize) -> Result<usize, ViewError> {
        self.shape
            .get(dim)
            .copied()
            .ok_or(ViewError::DimOutOfRange {
                op,
                dim,
                rank: self.rank(),
            })
    }

    fn shifted_offset(&self, dim: usize, index: usize) -> Result<usize, ViewError> {
        let stride = self.strides.get(dim).copied().unwrap_or(0);
        index
            .checked_mul(stride)
            .and_then(|step| self.offset.checked_add(step))
            .ok_or(ViewError::Overflow {
                what: "element offset",
            })
    }
}

/// Product of `shape`, or `None` on overflow. A zero-size dim makes it 0 whatever the others.
fn checked_numel(shape: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape.iter().try_fold(1usize, |n, &s| n.checked_mul(s))
}

/// Row-major strides of `shape`, or `None` on overflow.
pub(crate) fn contiguous_strides(shape: &[usize]) -> Option<Vec<usize>> {
    let mut strides = vec![0; shape.len()];
    let mut step = 1usize;
    for (stride, &size) in strides.iter_mut().zip(shape).rev() {
        *stride = step;
        step = step.checked_mul(size.max(1))?;
    }
    Some(strides)
}

/// PyTorch's contiguity rule on a list of dims: dense row-major, size-1 dims' strides ignored,
/// empty always contiguous.
pub(crate) fn dims_contiguous(shape: &[usize], strides: &[usize]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut expected = 1usize;
    for (&size, &stride) in shape.iter().zip(strides).rev() {
        if size != 1 {
            if stride != expected {
                return false;
            }
            expected = expected.saturating_mul(size);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `torch.zeros(4, 8)` (float32) at a made-up address.
    fn x() -> TensorView {
        TensorView::contiguous(
            Storage::new(0x10_000, 32, DType::F32, Device::Host),
            &[4, 8],
        )
        .unwrap()
    }

    #[test]
    fn weak_contiguity_vectors_from_the_reference() {
        let x = x();
        // x, x[0], x.t() → true
        assert!(x.is_weak_contiguous());
        assert!(x.select(0, 0).unwrap().is_weak_contiguous());
        assert!(x.t().unwrap().is_weak_contiguous());
        // x[:, :4] → false
        assert!(!x.narrow(1, 0, 4).unwrap().is_weak_contiguous());
        // x[2:].t() → true (reaches the end of the storage)
        assert!(x.narrow(0, 2, 2).unwrap().t().unwrap().is_weak_contiguous());
        // x[:2].t() → false (dense, but stops short of the end)
        assert!(!x.narrow(0, 0, 2).unwrap().t().unwrap().is_weak_contiguous());
    }

    #[test]
    fn derived_views_have_pytorch_geometry() {
        let x = x();
        assert_eq!(x.strides(), &[8, 1]);
        let row = x.select(0, 3).unwrap();
        assert_eq!(
            (row.shape(), row.strides(), row.offset()),
            (&[8][..], &[1][..], 24)
        );
        let xt = x.t().unwrap();
        assert_eq!((xt.shape(), xt.strides()), (&[8, 4][..], &[1, 8][..]));
        assert!(!xt.is_contiguous());
        let cols = x.narrow(1, 2, 4).unwrap();
        assert_eq!((cols.shape(), cols.offset()), (&[4, 4][..], 2));
        assert!(!cols.is_contiguous());
        let tail = x.narrow(0, 2, 2).unwrap();
        assert_eq!(tail.offset(), 16);
        assert!(tail.is_contiguous());
        assert_eq!(tail.data_addr(), 0x10_000 + 16 * 4);
        assert_eq!(x.nbytes(), 128);
        assert_eq!(cols.numel(), 16);
    }

    #[test]
    fn size_one_dims_strides_are_ignored_for_contiguity() {
        let s = Storage::new(0, 8, DType::Bf16, Device::Cuda(0));
        let v = TensorView::new(s, 0, vec![1, 8], vec![999, 1]);
        // Stride 999 on a size-1 dim reaches nothing beyond element 7.
        let v = v.unwrap();
        assert!(v.is_contiguous());
        let empty = TensorView::new(s, 0, vec![0, 3], vec![5, 7]).unwrap();
        assert!(empty.is_contiguous());
        assert_eq!(empty.numel(), 0);
    }

    #[test]
    fn constructor_rejects_bad_geometry() {
        let s = Storage::new(0, 32, DType::F32, Device::Host);
        assert_eq!(
            TensorView::new(s, 0, vec![4, 8], vec![8]),
            Err(ViewError::RankMismatch {
                shape_rank: 2,
                strides_rank: 1
            })
        );
        assert_eq!(
            TensorView::new(s, 1, vec![4, 8], vec![8, 1]),
            Err(ViewError::OutOfBounds {
                offset: 1,
                end: 33,
                storage_len: 32
            })
        );
        assert!(matches!(
            TensorView::new(s, 0, vec![usize::MAX, 2], vec![1, 1]),
            Err(ViewError::Overflow { .. })
        ));
        let huge = Storage::new(u64::MAX - 8, 4, DType::F32, Device::Host);
        assert!(matches!(
            TensorView::contiguous(huge, &[4]),
            Err(ViewError::Overflow { .. })
        ));
        // A scalar (rank 0) needs one element.
        assert!(TensorView::new(s, 31, vec![], vec![]).is_ok());
        assert!(TensorView::new(s, 32, vec![], vec![]).is_err());
    }

    #[test]
    fn operations_reject_out_of_range_arguments() {
        let x = x();
        assert_eq!(
            x.select(2, 0),
            Err(ViewError::DimOutOfRange {
                op: "select",
                dim: 2,
                rank: 2
            })
        );
        assert_eq!(
            x.select(0, 4),
            Err(ViewError::IndexOutOfRange {
                dim: 0,
                index: 4,
                size: 4
            })
        );
        assert_eq!(
            x.narrow(1, 5, 4),
            Err(ViewError::NarrowOutOfRange {
                dim: 1,
                start: 5,
                len: 4,
                size: 8
            })
        );
        assert!(x.narrow(1, usize::MAX, 2).is_err());
        assert!(x.transpose(0, 2).is_err());
        let cube = TensorView::contiguous(*x.storage(), &[2, 2, 8]).unwrap();
        assert_eq!(cube.t(), Err(ViewError::NotAMatrix { rank: 3 }));
        // An empty narrow at the very end is allowed, as in PyTorch (x[4:]).
        let empty = x.narrow(0, 4, 0).unwrap();
        assert_eq!(empty.numel(), 0);
        assert!(empty.is_weak_contiguous());
    }
}
