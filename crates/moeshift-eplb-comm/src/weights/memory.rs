//! The memory side of [`LayerWeights`]: the `unsafe` constructor over raw views, and the
//! only places that turn a row address into a Rust slice.
//!
//! Soundness rests on two facts established elsewhere: every row handed out lies inside its
//! view's storage ([`ExpertRows`](moeshift_tensor::ExpertRows) checks it), and the bytes are
//! borrowed for `'a`, either through `&'a mut HostBuffer` (safe constructors) or by the
//! contract of [`LayerWeightsBuilder::raw`]. Shared access (`&LayerWeights`) only reads;
//! writes need `&mut LayerWeights`; rows of one layer never overlap (checked at build).

use moeshift_tensor::{Device, TensorView};

use super::{ExpertTensor, LayerWeights, LayerWeightsBuilder};
use crate::error::EplbCommError;

impl<'a> LayerWeightsBuilder<'a> {
    /// Adds the tensor `name` over memory the caller vouches for: device memory, or host
    /// memory owned by something other than a [`HostBuffer`](moeshift_tensor::HostBuffer).
    /// Dim 0 must be the outermost dense row dimension, as for
    /// [`host_view`](Self::host_view).
    ///
    /// # Safety
    ///
    /// For as long as the resulting [`LayerWeights<'a>`](LayerWeights) lives:
    ///
    /// * every byte of every expert row of `view` (`view.expert_rows()?.row_range(i)` for
    ///   each row `i`) is allocated memory on `view.device()`, valid for reads and writes;
    ///   for [`Device::Host`] it is memory of this process, usable from any of its threads;
    /// * no one else writes those bytes while the weights are in use (a transfer reads
    ///   them, and peers may read them remotely), and no one else reads or writes them
    ///   while the weights are borrowed mutably (a commit writes them);
    /// * device memory is never read on the host by this crate: host-side row access
    ///   returns [`EplbCommError::NotHostMemory`] for it.
    pub unsafe fn raw(self, name: &str, view: TensorView) -> Result<Self, EplbCommError> {
        let addr = usize::try_from(view.data_addr()).map_err(|_| EplbCommError::OutsideBuffer {
            tensor: name.to_string(),
            detail: format!("address {:#x} does not fit in a pointer", view.data_addr()),
        })?;
        if view.device() == Device::Host && addr == 0 && view.nbytes() > 0 {
            return Err(EplbCommError::OutsideBuffer {
                tensor: name.to_string(),
                detail: "host view at the null address".into(),
            });
        }
        // The caller vouches for the memory; the pointer takes the provenance the program
        // exposed for it (host memory) or is only ever used as a number (device memory).
        let base = std::ptr::with_exposed_provenance_mut::<u8>(addr);
        self.push(name, view, base)
    }
}

// SAFETY: `LayerWeights` is a set of `&'a mut [u8]`-like borrows of rows that never
// overlap: sending it to another thread moves that exclusive access, and sharing it only
// allows reads (writes need `&mut`). The raw pointers are never aliased mutably.
unsafe impl Send for LayerWeights<'_> {}
// SAFETY: see `Send`; `&LayerWeights` gives read-only access to the rows.
unsafe impl Sync for LayerWeights<'_> {}

impl ExpertTensor {
    /// Byte offset of row `row` from `base`, with the host check.
    fn host_row_offset(&self, row: usize, what: &'static str) -> Result<usize, EplbCommError> {
        if self.device() != Device::Host {
            return Err(EplbCommError::NotHostMemory {
                tensor: self.name.clone(),
                device: self.device(),
                what,
            });
        }
        if row >= self.rows.num_rows() {
            return Err(EplbCommError::TensorRowOutOfRange {
                tensor: self.name.clone(),
                row,
                rows: self.rows.num_rows(),
            });
        }
        // row < rows, so row · stride stays inside the storage (checked by `ExpertRows`).
        Ok(row.saturating_mul(self.rows.row_stride_bytes()))
    }

    /// The bytes of row `row` (host memory only).
    pub(crate) fn host_row(&self, row: usize) -> Result<&[u8], EplbCommError> {
        let off = self.host_row_offset(row, "reading expert rows on the host")?;
        if self.rows.row_bytes() == 0 {
            return Ok(&[]);
        }
        // SAFETY: host memory, row in range: `base + off .. + row_bytes` is row `row`, which
        // lies inside the borrowed storage (see the module docs). `&self` borrows the weights
        // shared, and nothing writes rows while they are shared.
        Ok(unsafe { std::slice::from_raw_parts(self.base.add(off), self.rows.row_bytes()) })
    }

    /// The bytes of row `row`, writable (host memory only).
    pub(crate) fn host_row_mut(&mut self, row: usize) -> Result<&mut [u8], EplbCommError> {
        let off = self.host_row_offset(row, "writing expert rows on the host")?;
        if self.rows.row_bytes() == 0 {
            return Ok(&mut []);
        }
        // SAFETY: as in `host_row`; `&mut self` (from `&mut LayerWeights`) makes the access
        // exclusive, and the slice's lifetime is tied to that borrow.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.base.add(off), self.rows.row_bytes()) })
    }

    /// Copies row `src` over row `dst` (host memory only). Rows never overlap, and copying
    /// a row onto itself does nothing.
    pub(crate) fn copy_host_row(&mut self, src: usize, dst: usize) -> Result<(), EplbCommError> {
        let from = self.host_row_offset(src, "copying expert rows on the host")?;
        let to = self.host_row_offset(dst, "copying expert rows on the host")?;
        if src == dst || self.rows.row_bytes() == 0 {
            return Ok(());
        }
        // SAFETY: both rows are in range and inside the borrowed storage; distinct rows of a
        // tensor do not overlap (`ExpertRows` guarantees stride ≥ row size), and `&mut self`
        // makes the access exclusive.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.add(from),
                self.base.add(to),
                self.rows.row_bytes(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moeshift_tensor::{DType, HostBuffer, Storage};

    #[test]
    fn overlapping_rows_are_refused() {
        let buf = HostBuffer::zeroed(64).unwrap();
        let s = Storage::new(buf.addr(), 64, DType::U8, Device::Host);
        let a = TensorView::new(s, 0, vec![4, 8], vec![16, 1]).unwrap();
        let b = TensorView::new(s, 4, vec![4, 8], vec![16, 1]).unwrap();
        // SAFETY: `buf` outlives the weights and nothing else touches it meanwhile.
        let err = unsafe {
            LayerWeights::builder()
                .raw("a", a.clone())
                .and_then(|bld| bld.raw("b", b))
                .and_then(LayerWeightsBuilder::build)
        }
        .unwrap_err();
        assert!(
            matches!(
                err,
                EplbCommError::OverlappingRows {
                    row: 0,
                    other_row: 0,
                    ..
                }
            ),
            "{err}"
        );
        // Interleaved but disjoint rows are fine.
        let c = TensorView::new(s, 8, vec![4, 8], vec![16, 1]).unwrap();
        // SAFETY: as above.
        let ok = unsafe {
            LayerWeights::builder()
                .raw("a", a)
                .and_then(|bld| bld.raw("c", c))
                .and_then(LayerWeightsBuilder::build)
        };
        assert_eq!(ok.unwrap().num_rows(), 4);
        drop(buf);
    }

    #[test]
    fn raw_host_rows_read_and_write_the_memory() {
        let mut buf = HostBuffer::zeroed(32).unwrap();
        buf.as_mut_slice()[8..16].fill(3);
        let s = Storage::new(buf.addr(), 32, DType::U8, Device::Host);
        let v = TensorView::contiguous(s, &[4, 8]).unwrap();
        // SAFETY: `buf` outlives the weights; it is not touched until they are dropped.
        let mut w = unsafe { LayerWeights::builder().raw("x", v) }
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(w.row(0, 1).unwrap(), &[3u8; 8][..]);
        w.row_mut(0, 3).unwrap().fill(5);
        w.copy_row(0, 1, 0).unwrap();
        w.copy_row(0, 2, 2).unwrap();
        drop(w);
        let mut expected = [0u8; 32];
        expected[..16].fill(3);
        expected[24..].fill(5);
        assert_eq!(buf.as_slice(), &expected[..]);
    }

    #[test]
    fn device_memory_is_described_but_not_read_on_the_host() {
        let s = Storage::new(0x7000_0000, 64, DType::Bf16, Device::Cuda(0));
        let v = TensorView::contiguous(s, &[4, 16]).unwrap();
        // SAFETY: the address is never dereferenced: device memory is only described here.
        let mut w = unsafe { LayerWeights::builder().raw("w2", v) }
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(w.device(), Device::Cuda(0));
        assert_eq!(
            w.tensor(0).unwrap().rows().row_addr(1),
            Ok(0x7000_0000 + 32)
        );
        assert!(matches!(
            w.row(0, 0),
            Err(EplbCommError::NotHostMemory { .. })
        ));
        assert!(matches!(
            w.row_mut(0, 0),
            Err(EplbCommError::NotHostMemory { .. })
        ));
        assert!(matches!(
            w.copy_row(0, 0, 1),
            Err(EplbCommError::NotHostMemory { .. })
        ));
    }
}
