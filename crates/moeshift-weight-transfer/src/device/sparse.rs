//! [`SparseStage`]: a sparse update staged in device memory, checked with one kernel and one
//! device-to-host copy, then scattered in place.
#![allow(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::{CudaStream, DriverError};

use super::kernels::Kernels;
use super::memory::{self, DeviceAlloc, MemError, RangeError, Span, SpanMut};
use crate::sparse_layout::SparseLayout;

/// "No bad entry" in the check kernel's output.
const NO_BAD: u64 = u64::MAX;
/// u64 arrays in the per-update table: starts, counts, numels, dsts, val_starts, elems,
/// first_bad.
const TABLE_ARRAYS: usize = 7;
/// u64 arrays the trainer's gather puts in the same table: src_idx, src_vals, idx_starts,
/// counts, val_starts, elems (fewer than [`TABLE_ARRAYS`]).
const GATHER_ARRAYS: usize = 6;

/// Device buffers for one sparse update at a time (grown as needed, reused across updates).
#[derive(Debug)]
pub(crate) struct SparseStage {
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    indices: Option<DeviceAlloc>,
    values: Option<DeviceAlloc>,
    table: Option<DeviceAlloc>,
    layout: SparseLayout,
    /// The staged indices passed [`SparseStage::check`] and were not handed out for writing
    /// since.
    checked: bool,
}

fn grow(
    slot: &mut Option<DeviceAlloc>,
    stream: &CudaStream,
    len: usize,
) -> Result<(), DriverError> {
    if slot.as_ref().is_none_or(|a| a.len() < len) {
        // Free the old buffer first: the new one is larger.
        *slot = None;
        *slot = Some(DeviceAlloc::new(stream.context(), len)?);
    }
    Ok(())
}

fn missing() -> MemError {
    MemError::Range(RangeError::OutOfBounds {
        offset: 0,
        len: 1,
        size: 0,
    })
}

impl SparseStage {
    pub(crate) fn new(stream: Arc<CudaStream>, kernels: Arc<Kernels>) -> Self {
        Self {
            stream,
            kernels,
            indices: None,
            values: None,
            table: None,
            layout: SparseLayout::default(),
            checked: false,
        }
    }

    /// Makes room for `index_bytes` of indices and `value_bytes` of values, for receiving a
    /// staged update before its layout is known; forgets the layout and any check.
    pub(crate) fn reserve(
        &mut self,
        index_bytes: usize,
        value_bytes: usize,
    ) -> Result<(), MemError> {
        self.checked = false;
        self.layout = SparseLayout::default();
        grow(&mut self.indices, &self.stream, index_bytes)?;
        grow(&mut self.values, &self.stream, value_bytes)?;
        Ok(())
    }

    /// Sets the layout of what the buffers hold (they must be large enough for it, see
    /// [`SparseStage::reserve`]); forgets any check.
    pub(crate) fn set_layout(&mut self, layout: SparseLayout) -> Result<(), MemError> {
        self.checked = false;
        let held = |a: &Option<DeviceAlloc>| a.as_ref().map_or(0, DeviceAlloc::len);
        for (need, have) in [
            (layout.index_bytes(), held(&self.indices)),
            (layout.value_bytes, held(&self.values)),
        ] {
            if need > have {
                return Err(MemError::Range(RangeError::OutOfBounds {
                    offset: 0,
                    len: need,
                    size: have,
                }));
            }
        }
        grow(
            &mut self.table,
            &self.stream,
            layout.entries.len() * TABLE_ARRAYS * 8,
        )?;
        self.layout = layout;
        Ok(())
    }

    /// Makes room for an update laid out as `layout` (the trainer's staging).
    pub(crate) fn prepare(&mut self, layout: SparseLayout) -> Result<(), MemError> {
        self.reserve(layout.index_bytes(), layout.value_bytes)?;
        self.set_layout(layout)
    }

    /// The index array and the value array, for writing into (invalidates an earlier
    /// check).
    pub(crate) fn buffers_mut(&mut self) -> Result<(SpanMut<'_>, SpanMut<'_>), MemError> {
        self.checked = false;
        match (self.indices.as_mut(), self.values.as_mut()) {
            (Some(i), Some(v)) => Ok((i.span_mut(), v.span_mut())),
            _ => Err(missing()),
        }
    }

    /// Queues, on the stage's stream, one kernel that copies device patches into the staged
    /// arrays at their places in the layout set by [`SparseStage::prepare`]. Each source is
    /// `(entry, indices, values)`: the layout entry it fills (strictly increasing over the
    /// sources), and its patch's index and value arrays, which must stay allocated until the
    /// stream ran the copy.
    pub(crate) fn gather(
        &mut self,
        sources: &[(usize, Span<'_>, Span<'_>)],
    ) -> Result<(), MemError> {
        self.checked = false;
        let n = sources.len();
        if n == 0 {
            return Ok(());
        }
        let engine = self.stream.context().ordinal();
        let mut host: Vec<u64> = vec![0; n * GATHER_ARRAYS];
        let mut max_count = 0;
        let mut previous: Option<usize> = None;
        for (k, (entry, indices, values)) in sources.iter().enumerate() {
            let bad = |len: usize, size: usize| {
                MemError::Range(RangeError::OutOfBounds {
                    offset: 0,
                    len,
                    size,
                })
            };
            if previous.is_some_and(|p| p >= *entry) {
                return Err(bad(*entry, previous.unwrap_or(0)));
            }
            previous = Some(*entry);
            let Some(e) = self.layout.entries.get(*entry) else {
                return Err(bad(*entry, self.layout.entries.len()));
            };
            for span in [indices, values] {
                if span.ordinal() != engine {
                    return Err(MemError::Range(RangeError::WrongDevice {
                        memory: span.ordinal(),
                        engine,
                    }));
                }
            }
            if indices.len() < e.index_bytes() || indices.addr() % 4 != 0 {
                return Err(bad(e.index_bytes(), indices.len()));
            }
            if values.len() < e.value_bytes() || values.addr() % e.elem.max(1) as u64 != 0 {
                return Err(bad(e.value_bytes(), values.len()));
            }
            let row = [
                indices.addr(),
                values.addr(),
                e.index_start as u64,
                e.count as u64,
                e.value_start as u64,
                e.elem as u64,
            ];
            for (array, v) in row.into_iter().enumerate() {
                host[array * n + k] = v;
            }
            max_count = max_count.max(e.count);
        }
        let bytes: Vec<u8> = host.iter().flat_map(|v| v.to_le_bytes()).collect();
        let table = self.table.as_mut().ok_or_else(missing)?;
        let mut table_span = table.span_mut();
        memory::upload(&self.stream, &mut table_span, 0, &bytes)?;
        let idx = self.indices.as_ref().ok_or_else(missing)?.span();
        let vals = self.values.as_ref().ok_or_else(missing)?.span();
        // The layout's ranges lie inside the buffers, which `prepare` sized for it.
        if self.layout.index_bytes() > idx.len() || self.layout.value_bytes > vals.len() {
            return Err(missing());
        }
        // SAFETY: the table holds the six arrays just uploaded (it has room for seven per
        // entry, and the upload checked its bounds); each source was checked above to be on
        // this device, to hold its entry's indices and values with the alignment the kernel
        // needs, and the caller keeps it allocated until the stream ran the kernel; each
        // destination range is its entry's place in the layout, inside the staged buffers
        // (checked above), and entries are distinct (strictly increasing), so no two
        // destinations overlap; the staged buffers are borrowed mutably for this call and
        // stay allocated (freeing them synchronises the context first).
        unsafe {
            self.kernels.gather(
                &self.stream,
                idx.addr(),
                vals.addr(),
                table_span.addr(),
                n,
                max_count,
            )
        }?;
        Ok(())
    }

    pub(crate) fn indices(&self) -> Result<Span<'_>, MemError> {
        self.indices.as_ref().map(|a| a.span()).ok_or_else(missing)
    }

    pub(crate) fn values(&self) -> Result<Span<'_>, MemError> {
        self.values.as_ref().map(|a| a.span()).ok_or_else(missing)
    }

    /// Checks every staged index against its parameter: one table upload, one kernel, one
    /// copy of `8 · params` bytes back. Returns, per parameter, the first position whose
    /// index is out of range or not above the one before (`None`: all fine).
    pub(crate) fn check(&mut self) -> Result<Vec<Option<u64>>, MemError> {
        self.checked = false;
        let n = self.layout.entries.len();
        if n == 0 {
            self.checked = true;
            return Ok(Vec::new());
        }
        let mut host: Vec<u64> = Vec::with_capacity(n * TABLE_ARRAYS);
        host.extend(self.layout.entries.iter().map(|e| e.index_start as u64));
        host.extend(self.layout.entries.iter().map(|e| e.count as u64));
        host.extend(self.layout.entries.iter().map(|e| e.numel as u64));
        host.resize(n * TABLE_ARRAYS, NO_BAD);
        let bytes: Vec<u8> = host.iter().flat_map(|v| v.to_le_bytes()).collect();
        let table = self.table.as_mut().ok_or_else(missing)?;
        let mut span = table.span_mut();
        memory::upload(&self.stream, &mut span, 0, &bytes)?;
        let idx = self.indices.as_ref().ok_or_else(missing)?.span();
        // The layout's index ranges lie inside the index buffer, which `prepare` sized to
        // `layout.index_bytes()`.
        if self.layout.index_bytes() > idx.len() || bytes.len() > span.len() {
            return Err(missing());
        }
        let first_bad_at = span.addr() + (n * (TABLE_ARRAYS - 1) * 8) as u64;
        // SAFETY: `table` holds the uploaded starts/counts/numels and the first_bad array
        // (checked just above); every `starts[p] + counts[p]` is within the index buffer by
        // construction of the layout; the buffers stay borrowed until the synchronising
        // download below returns.
        unsafe {
            self.kernels.check_indices(
                &self.stream,
                idx.addr(),
                span.addr(),
                n,
                self.layout.max_count(),
                first_bad_at,
            )
        }?;
        let mut out = vec![0u8; n * 8];
        memory::download(
            &self.stream,
            &span.as_span(),
            n * (TABLE_ARRAYS - 1) * 8,
            &mut out,
        )?;
        let firsts: Vec<Option<u64>> = out
            .chunks_exact(8)
            .map(|c| {
                let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                (v != NO_BAD).then_some(v)
            })
            .collect();
        self.checked = firsts.iter().all(Option::is_none);
        Ok(firsts)
    }

    /// The staged index at absolute position `pos` (for error messages).
    pub(crate) fn index_at(&self, pos: usize) -> Result<i32, MemError> {
        let mut b = [0u8; 4];
        memory::download(&self.stream, &self.indices()?, pos * 4, &mut b)?;
        Ok(i32::from_le_bytes(b))
    }

    /// Scatters the staged values into `dsts` (one per parameter, in update order), after a
    /// passing [`SparseStage::check`] of the same staged indices. Returns once the values
    /// are written.
    pub(crate) fn scatter(&mut self, dsts: &mut [SpanMut<'_>]) -> Result<(), MemError> {
        let n = self.layout.entries.len();
        if !self.checked || dsts.len() != n {
            return Err(MemError::Range(RangeError::OutOfBounds {
                offset: 0,
                len: n,
                size: dsts.len(),
            }));
        }
        for (d, e) in dsts.iter().zip(&self.layout.entries) {
            let need = e.numel.saturating_mul(e.elem);
            if d.len() < need || d.addr() % e.elem as u64 != 0 {
                return Err(MemError::Range(RangeError::OutOfBounds {
                    offset: 0,
                    len: need,
                    size: d.len(),
                }));
            }
            if d.ordinal() != self.stream.context().ordinal() {
                return Err(MemError::Range(RangeError::WrongDevice {
                    memory: d.ordinal(),
                    engine: self.stream.context().ordinal(),
                }));
            }
        }
        if n == 0 {
            return Ok(());
        }
        // dsts, val_starts, elems go after starts, counts, numels (uploaded by `check`).
        let mut host: Vec<u64> = Vec::with_capacity(3 * n);
        host.extend(dsts.iter().map(|d| d.addr()));
        host.extend(self.layout.entries.iter().map(|e| e.value_start as u64));
        host.extend(self.layout.entries.iter().map(|e| e.elem as u64));
        let bytes: Vec<u8> = host.iter().flat_map(|v| v.to_le_bytes()).collect();
        let table = self.table.as_mut().ok_or_else(missing)?;
        let mut span = table.span_mut();
        memory::upload(&self.stream, &mut span, 3 * n * 8, &bytes)?;
        let idx = self.indices.as_ref().ok_or_else(missing)?.span();
        let vals = self.values.as_ref().ok_or_else(missing)?.span();
        if self.layout.value_bytes > vals.len() {
            return Err(missing());
        }
        // SAFETY: `check` passed for exactly these staged indices (`checked` is cleared
        // whenever the index buffer is handed out for writing), so every index of parameter
        // p is in [0, numel[p]); each destination was checked above to hold numel · elem
        // bytes aligned to elem on this device, and stays exclusively borrowed until the
        // synchronisation below; value ranges lie inside the value buffer by construction
        // of the layout.
        unsafe {
            self.kernels.scatter(
                &self.stream,
                idx.addr(),
                vals.addr(),
                span.addr(),
                n,
                self.layout.max_count(),
            )
        }?;
        self.stream.synchronize()?;
        Ok(())
    }
}
