//! [`HostBuffer`]: an owned, aligned, zeroed host allocation.
//!
//! This module holds the crate's host-memory `unsafe`: one allocation, its slices, its
//! deallocation.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::{self, NonNull};

use crate::dtype::DType;
use crate::view::{Storage, TensorView, ViewError};
use crate::Device;

/// Default alignment of a [`HostBuffer`]: one 4 KiB page.
pub const PAGE_ALIGN: usize = 4096;

/// Why a host buffer could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostBufferError {
    /// The alignment is not a power of two.
    #[error("host buffer alignment {align} is not a power of two")]
    BadAlignment {
        /// The alignment asked for.
        align: usize,
    },
    /// The size, rounded up to the alignment, does not fit in `isize`.
    #[error("host buffer of {len} bytes with alignment {align} is too large")]
    TooLarge {
        /// Bytes asked for.
        len: usize,
        /// Alignment asked for.
        align: usize,
    },
    /// The allocator returned no memory.
    #[error("allocating a host buffer of {len} bytes failed")]
    AllocFailed {
        /// Bytes asked for.
        len: usize,
    },
}

/// An owned host allocation of `len` bytes, zeroed, aligned to [`PAGE_ALIGN`] unless asked
/// otherwise.
///
/// Page alignment is what page-locking (`cuMemHostRegister`) and RDMA registration want, so a
/// buffer can later be pinned in place without copying; this type does not pin by itself.
///
/// ```
/// use moeshift_tensor::{DType, HostBuffer};
///
/// let mut buf = HostBuffer::zeroed(4 * 8 * 2)?; // 4 experts × 8 bf16 values
/// assert!(buf.as_slice().iter().all(|&b| b == 0));
/// buf.as_mut_slice()[0] = 1;
/// let view = buf.view(&[4, 8], DType::Bf16)?;
/// assert_eq!(view.expert_rows()?.row_addr(1)?, buf.addr() + 16);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    align: usize,
}

// SAFETY: `HostBuffer` owns its allocation exclusively (like `Vec<u8>`); no other handle to the
// memory exists, so moving it to another thread is sound.
unsafe impl Send for HostBuffer {}
// SAFETY: shared access only hands out `&[u8]`; mutation needs `&mut self`.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// `len` zeroed bytes aligned to [`PAGE_ALIGN`].
    pub fn zeroed(len: usize) -> Result<Self, HostBufferError> {
        Self::zeroed_aligned(len, PAGE_ALIGN)
    }

    /// `len` zeroed bytes aligned to `align` (a power of two).
    pub fn zeroed_aligned(len: usize, align: usize) -> Result<Self, HostBufferError> {
        let layout = Layout::from_size_align(len, align).map_err(|_| {
            if align.is_power_of_two() {
                HostBufferError::TooLarge { len, align }
            } else {
                HostBufferError::BadAlignment { align }
            }
        })?;
        if len == 0 {
            // No allocation: an aligned, non-null address that is never dereferenced.
            let ptr = NonNull::new(ptr::without_provenance_mut::<u8>(align))
                .ok_or(HostBufferError::BadAlignment { align })?;
            return Ok(Self { ptr, len, align });
        }
        // SAFETY: `layout` has a non-zero size (checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(HostBufferError::AllocFailed { len })?;
        Ok(Self { ptr, len, align })
    }

    /// A buffer holding a copy of `bytes`, aligned to [`PAGE_ALIGN`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, HostBufferError> {
        let mut buf = Self::zeroed(bytes.len())?;
        buf.as_mut_slice().copy_from_slice(bytes);
        Ok(buf)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The alignment of the first byte.
    pub fn alignment(&self) -> usize {
        self.align
    }

    /// Pointer to the first byte.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable pointer to the first byte.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Address of the first byte, as views and transports take it.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as usize as u64
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised (zeroed at allocation) bytes, or is an
        // aligned non-null dangling pointer with `len == 0`; the borrow of `self` keeps the
        // memory alive and unaliased by `&mut` for the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer as storage of `dtype` elements (trailing bytes that do not fill a whole
    /// element are not part of it).
    pub fn storage(&self, dtype: DType) -> Storage {
        Storage::new(
            self.addr(),
            self.len / dtype.size_bytes(),
            dtype,
            Device::Host,
        )
    }

    /// A row-major contiguous view of `shape` at the start of the buffer.
    ///
    /// The view is a descriptor: it does not keep the buffer alive.
    pub fn view(&self, shape: &[usize], dtype: DType) -> Result<TensorView, ViewError> {
        TensorView::contiguous(self.storage(dtype), shape)
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: a non-empty buffer was allocated by `alloc_zeroed` with exactly this size and
        // alignment (validated then), and is freed only here, once.
        unsafe {
            let layout = Layout::from_size_align_unchecked(self.len, self.align);
            alloc::dealloc(self.ptr.as_ptr(), layout);
        }
    }
}

impl fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostBuffer")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .field("align", &self.align)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_and_aligned() {
        for (len, align) in [(1, 64), (4096, PAGE_ALIGN), (10_000, PAGE_ALIGN), (3, 8)] {
            let buf = HostBuffer::zeroed_aligned(len, align).unwrap();
            assert_eq!(buf.len(), len);
            assert_eq!(buf.addr() % align as u64, 0, "len {len} align {align}");
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn empty_buffer_is_aligned_and_usable() {
        let mut buf = HostBuffer::zeroed(0).unwrap();
        assert!(buf.is_empty());
        assert_eq!(buf.addr() % PAGE_ALIGN as u64, 0);
        assert!(buf.as_slice().is_empty());
        assert!(buf.as_mut_slice().is_empty());
        assert_eq!(buf.view(&[0, 8], DType::F32).unwrap().numel(), 0);
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        assert_eq!(
            HostBuffer::zeroed_aligned(16, 48).unwrap_err(),
            HostBufferError::BadAlignment { align: 48 }
        );
        assert_eq!(
            HostBuffer::zeroed_aligned(16, 0).unwrap_err(),
            HostBufferError::BadAlignment { align: 0 }
        );
        assert_eq!(
            HostBuffer::zeroed(usize::MAX).unwrap_err(),
            HostBufferError::TooLarge {
                len: usize::MAX,
                align: PAGE_ALIGN
            }
        );
    }

    #[test]
    fn writes_are_visible_and_views_address_them() {
        let mut buf = HostBuffer::zeroed(4 * 8 * 4).unwrap();
        for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let copy = HostBuffer::from_bytes(buf.as_slice()).unwrap();
        assert_eq!(copy.as_slice(), buf.as_slice());
        let view = buf.view(&[4, 8], DType::F32).unwrap();
        assert_eq!(view.storage_len(), 32);
        let rows = view.expert_rows().unwrap();
        let start = usize::try_from(rows.row_addr(2).unwrap() - buf.addr()).unwrap();
        assert_eq!(start, 64);
        assert_eq!(buf.as_slice()[start], 64);
        // Too big a view for the buffer is refused.
        assert!(matches!(
            buf.view(&[5, 8], DType::F32),
            Err(ViewError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn buffers_move_across_threads() {
        let mut buf = HostBuffer::zeroed(64).unwrap();
        buf.as_mut_slice()[63] = 9;
        let back = std::thread::spawn(move || {
            assert_eq!(buf.as_slice()[63], 9);
            buf
        })
        .join()
        .unwrap();
        assert_eq!(back.len(), 64);
    }
}
