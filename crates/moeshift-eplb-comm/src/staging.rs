//! Staging memory for one layer: room for exactly the expert rows that change on this rank
//! (rows received from peers and rows copied from another local row), never a whole layer.
//!
//! Each staged row holds the expert's row of every tensor back to back, in tensor order, so
//! a run of staged rows is one byte range a transport can fill with a single receive or
//! READ. Backends may also reserve bytes between rows (the host backend receives each
//! message's header right in front of its rows).
//!
//! Staging lives where the commit reads it from: in host memory ([`HostBuffer`]) for host
//! weights; with feature `cuda`, in device memory on the weights' GPU for CUDA weights (the
//! commit is then device-to-device copies), or in page-locked host memory for the rows a
//! host transport receives before they are copied to the GPU.
//!
//! Staging need not own its memory: a backend may keep memory it prepared once (the `nixl`
//! backend's registered landing area) in a lending slot and lend it to one layer at a
//! time. Rows then land in their final staging place directly, and
//! the memory goes back to the slot when the staging is dropped, that is when its
//! [`StagedLayer`](crate::StagedLayer) is committed or dropped. A slot lent twice is refused,
//! never shared.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use moeshift_tensor::{Device, HostBuffer, HostBufferError, PAGE_ALIGN};

#[cfg(feature = "cuda")]
use crate::cuda_stage::memory::{driver_error, DeviceBuffer, PinnedBuffer, StagingPool};
use crate::error::EplbCommError;
use crate::weights::LayerLayout;

/// Where a staged row's content comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowSource {
    /// Copied from another row of this rank (its old content), before anything is written.
    Local {
        /// The row read.
        src_row: usize,
    },
    /// Received from a peer (EPLB-group rank) in a round of the plan.
    Peer {
        /// The sending peer.
        peer: usize,
        /// The round.
        round: usize,
    },
}

/// One expert row held in staging until commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StagedRow {
    /// The row it will be written to.
    pub dst_row: usize,
    /// The logical expert.
    pub expert: usize,
    /// Where the content comes from.
    pub source: RowSource,
    /// Byte offset of the row's first tensor in the staging memory.
    pub offset: usize,
}

/// Lays out staging memory before it is allocated.
#[derive(Debug)]
pub(crate) struct StagingBuilder {
    /// Start of each tensor's bytes inside a staged row.
    tensor_offsets: Vec<usize>,
    /// Bytes of each tensor's row.
    tensor_bytes: Vec<usize>,
    expert_bytes: usize,
    len: usize,
    overflow: bool,
    rows: Vec<StagedRow>,
}

impl StagingBuilder {
    /// Staging for rows of `layout`.
    pub(crate) fn new(layout: &LayerLayout) -> Self {
        let mut tensor_offsets = Vec::with_capacity(layout.tensors.len());
        let mut at = 0usize;
        let mut overflow = false;
        for t in &layout.tensors {
            tensor_offsets.push(at);
            at = at.checked_add(t.row_bytes).unwrap_or_else(|| {
                overflow = true;
                0
            });
        }
        Self {
            tensor_offsets,
            tensor_bytes: layout.tensors.iter().map(|t| t.row_bytes).collect(),
            expert_bytes: at,
            len: 0,
            overflow,
            rows: Vec::new(),
        }
    }

    fn grow(&mut self, bytes: usize) -> usize {
        let at = self.len;
        match self.len.checked_add(bytes) {
            Some(end) => self.len = end,
            None => self.overflow = true,
        }
        at
    }

    /// Reserves `bytes` for the backend's own use and returns where they start.
    pub(crate) fn reserve(&mut self, bytes: usize) -> Range<usize> {
        let at = self.grow(bytes);
        at..at.saturating_add(bytes)
    }

    /// Adds a staged row and returns its index in [`Staging::rows`].
    pub(crate) fn push_row(&mut self, dst_row: usize, expert: usize, source: RowSource) -> usize {
        let offset = self.grow(self.expert_bytes);
        self.rows.push(StagedRow {
            dst_row,
            expert,
            source,
            offset,
        });
        self.rows.len() - 1
    }

    /// Bytes laid out so far.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Rows laid out so far.
    pub(crate) fn num_rows(&self) -> usize {
        self.rows.len()
    }

    /// The rows laid out so far.
    #[cfg(all(test, feature = "cuda"))]
    pub(crate) fn rows_for_tests(&self) -> &[StagedRow] {
        &self.rows
    }

    /// Allocates the staging memory (`rank` and `layer` name the error).
    pub(crate) fn build(self, rank: usize, layer: usize) -> Result<Staging, EplbCommError> {
        let err = |source| EplbCommError::Staging {
            rank,
            layer,
            bytes: self.len,
            source,
        };
        if self.overflow {
            return Err(err(HostBufferError::TooLarge {
                len: usize::MAX,
                align: PAGE_ALIGN,
            }));
        }
        let buf = HostBuffer::zeroed(self.len).map_err(err)?;
        Ok(self.with_memory(StagingMemory::Host(buf)))
    }

    /// Lays the staging out in `lent` memory (see [`LendingSlot`]): no allocation. Fails when
    /// the rows laid out do not fit it.
    pub(crate) fn build_lent(
        self,
        rank: usize,
        layer: usize,
        lent: LentMemory,
    ) -> Result<Staging, EplbCommError> {
        if self.overflow {
            return Err(EplbCommError::Staging {
                rank,
                layer,
                bytes: self.len,
                source: HostBufferError::TooLarge {
                    len: usize::MAX,
                    align: PAGE_ALIGN,
                },
            });
        }
        let room = lent.len();
        if self.len > room {
            return Err(EplbCommError::PlanMismatch {
                rank,
                layer,
                detail: format!(
                    "{} rows need {} bytes of staging, the lent staging memory has {room}",
                    self.rows.len(),
                    self.len
                ),
            });
        }
        Ok(self.with_memory(StagingMemory::Lent(lent)))
    }

    fn with_memory(self, mem: StagingMemory) -> Staging {
        Staging {
            len: self.len,
            mem,
            rows: self.rows,
            tensor_offsets: self.tensor_offsets,
            tensor_bytes: self.tensor_bytes,
            expert_bytes: self.expert_bytes,
        }
    }

    /// Refuses layouts whose size overflowed.
    #[cfg(feature = "cuda")]
    fn check_overflow(&self, rank: usize, layer: usize) -> Result<(), EplbCommError> {
        if self.overflow {
            return Err(EplbCommError::Staging {
                rank,
                layer,
                bytes: self.len,
                source: HostBufferError::TooLarge {
                    len: usize::MAX,
                    align: PAGE_ALIGN,
                },
            });
        }
        Ok(())
    }

    /// Allocates the staging in device memory from `pool` (on the pool's GPU);
    /// `commit_stream` is the stream the commit will copy on.
    #[cfg(feature = "cuda")]
    pub(crate) fn build_device(
        self,
        rank: usize,
        layer: usize,
        pool: &std::sync::Arc<StagingPool>,
        commit_stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<Staging, EplbCommError> {
        self.check_overflow(rank, layer)?;
        let buf = pool.take(self.len).map_err(|e| {
            driver_error(
                rank,
                Some(layer),
                format!("allocating {} bytes of device staging", self.len),
                e,
            )
        })?;
        Ok(self.with_memory(StagingMemory::Device {
            buf,
            commit_stream: std::sync::Arc::clone(commit_stream),
        }))
    }

    /// Lays the staging out in page-locked host memory: `cached` when it is large enough
    /// (it is taken), otherwise a new allocation registered with `ctx`.
    #[cfg(feature = "cuda")]
    pub(crate) fn build_pinned(
        self,
        rank: usize,
        layer: usize,
        cached: &mut Option<PinnedBuffer>,
        ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
    ) -> Result<Staging, EplbCommError> {
        self.check_overflow(rank, layer)?;
        let buf = match cached.take() {
            Some(buf) if buf.len() >= self.len => buf,
            old => {
                drop(old);
                PinnedBuffer::new(ctx, self.len).map_err(|e| {
                    driver_error(
                        rank,
                        Some(layer),
                        format!("allocating {} bytes of page-locked host memory", self.len),
                        e,
                    )
                })?
            }
        };
        Ok(self.with_memory(StagingMemory::Pinned(buf)))
    }
}

/// The memory behind a [`Staging`].
#[derive(Debug)]
pub(crate) enum StagingMemory {
    /// Ordinary host memory.
    Host(HostBuffer),
    /// Page-locked host memory (possibly larger than the staging).
    #[cfg(feature = "cuda")]
    Pinned(PinnedBuffer),
    /// Device memory, and the stream a commit copies on.
    #[cfg(feature = "cuda")]
    Device {
        /// The staged rows.
        buf: DeviceBuffer,
        /// The commit's stream.
        commit_stream: std::sync::Arc<cudarc::driver::CudaStream>,
    },
    /// Memory lent by a [`LendingSlot`], given back when dropped.
    Lent(LentMemory),
}

impl StagingMemory {
    /// The memory itself: what a [`Lent`](Self::Lent) memory holds, otherwise `self`. A lent
    /// memory that holds nothing (only while it is being given back) stays `Lent`.
    pub(crate) fn resolved(&self) -> &StagingMemory {
        match self {
            StagingMemory::Lent(LentMemory {
                mem: Some(inner), ..
            }) => inner.resolved(),
            other => other,
        }
    }

    /// [`resolved`](Self::resolved), writable.
    pub(crate) fn resolved_mut(&mut self) -> &mut StagingMemory {
        match self {
            StagingMemory::Lent(LentMemory {
                mem: Some(inner), ..
            }) => inner.resolved_mut(),
            other => other,
        }
    }

    /// Bytes of memory (possibly more than a staging lays out).
    pub(crate) fn len(&self) -> usize {
        match self.resolved() {
            StagingMemory::Host(buf) => buf.len(),
            #[cfg(feature = "cuda")]
            StagingMemory::Pinned(buf) => buf.len(),
            #[cfg(feature = "cuda")]
            StagingMemory::Device { buf, .. } => buf.len(),
            StagingMemory::Lent(_) => 0,
        }
    }
}

/// Staging memory prepared once and lent to one staging at a time: the `nixl` backend keeps
/// its registered landing area in slots, so peers' rows are READ straight into their final
/// staging place and no layer allocates. Lending a slot that is lent is refused (the layer
/// holding it is named); the memory comes back when the [`LentMemory`] is dropped, that is
/// when the [`Staging`] built on it is.
#[derive(Debug)]
pub(crate) struct LendingSlot {
    state: Mutex<SlotState>,
}

#[derive(Debug)]
struct SlotState {
    /// The memory while it is home; `None` while lent.
    mem: Option<Box<StagingMemory>>,
    /// The layer it is lent for, while lent.
    lent_for: Option<usize>,
}

impl LendingSlot {
    /// A slot holding `mem`.
    pub(crate) fn new(mem: StagingMemory) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SlotState {
                mem: Some(Box::new(mem)),
                lent_for: None,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A panic while holding the lock cannot leave the state half-updated (each update
        // is one assignment pair), so a poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lends the memory for `layer`; `Err(holder)` names the layer holding it when it is
    /// already lent.
    pub(crate) fn lend(self: &Arc<Self>, layer: usize) -> Result<LentMemory, usize> {
        let mut state = self.lock();
        match state.mem.take() {
            Some(mem) => {
                state.lent_for = Some(layer);
                Ok(LentMemory {
                    mem: Some(mem),
                    slot: Arc::clone(self),
                })
            }
            None => Err(state.lent_for.unwrap_or(layer)),
        }
    }

    /// The layer holding the memory, while it is lent.
    pub(crate) fn holder(&self) -> Option<usize> {
        let state = self.lock();
        state.mem.is_none().then_some(state.lent_for).flatten()
    }

    /// Runs `f` on the memory while it is home (not lent); `None` while lent.
    #[cfg(test)]
    pub(crate) fn with_memory<R>(&self, f: impl FnOnce(&StagingMemory) -> R) -> Option<R> {
        let state = self.lock();
        state.mem.as_deref().map(f)
    }
}

/// Memory lent by a [`LendingSlot`]; dropping it gives the memory back.
#[derive(Debug)]
pub(crate) struct LentMemory {
    /// `None` only while being given back.
    mem: Option<Box<StagingMemory>>,
    slot: Arc<LendingSlot>,
}

impl LentMemory {
    /// The memory.
    pub(crate) fn memory(&self) -> Option<&StagingMemory> {
        self.mem.as_deref()
    }

    /// Bytes of memory.
    pub(crate) fn len(&self) -> usize {
        self.memory().map_or(0, StagingMemory::len)
    }
}

impl Drop for LentMemory {
    fn drop(&mut self) {
        if let Some(mem) = self.mem.take() {
            let mut state = self.slot.lock();
            state.mem = Some(mem);
            state.lent_for = None;
        }
    }
}

/// Allocated staging memory with its rows.
#[derive(Debug)]
pub(crate) struct Staging {
    /// Bytes laid out (the memory may be larger).
    len: usize,
    mem: StagingMemory,
    rows: Vec<StagedRow>,
    tensor_offsets: Vec<usize>,
    tensor_bytes: Vec<usize>,
    expert_bytes: usize,
}

impl Staging {
    /// The staged rows, in the order they were laid out.
    pub(crate) fn rows(&self) -> &[StagedRow] {
        &self.rows
    }

    /// Total bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Address of the first byte: a host address, or a device address for device staging
    /// (for transports that write into staging directly).
    #[allow(dead_code)]
    pub(crate) fn addr(&self) -> u64 {
        match self.mem.resolved() {
            StagingMemory::Host(buf) => buf.addr(),
            #[cfg(feature = "cuda")]
            StagingMemory::Pinned(buf) => buf.addr(),
            #[cfg(feature = "cuda")]
            StagingMemory::Device { buf, .. } => buf.addr(),
            StagingMemory::Lent(_) => 0,
        }
    }

    /// Where the staged bytes live: the host (ordinary or page-locked memory) or a GPU.
    pub(crate) fn device(&self) -> Device {
        match self.mem.resolved() {
            StagingMemory::Host(_) | StagingMemory::Lent(_) => Device::Host,
            #[cfg(feature = "cuda")]
            StagingMemory::Pinned(_) => Device::Host,
            #[cfg(feature = "cuda")]
            StagingMemory::Device { buf, .. } => Device::Cuda(buf.ordinal()),
        }
    }

    /// The memory (what lent memory holds, for lent staging).
    #[allow(dead_code)]
    pub(crate) fn memory(&self) -> &StagingMemory {
        self.mem.resolved()
    }

    /// The memory, writable (what lent memory holds, for lent staging).
    #[allow(dead_code)]
    pub(crate) fn memory_mut(&mut self) -> &mut StagingMemory {
        self.mem.resolved_mut()
    }

    /// True when the memory is lent (see [`LendingSlot`]) rather than owned.
    #[allow(dead_code)]
    pub(crate) fn is_lent(&self) -> bool {
        matches!(self.mem, StagingMemory::Lent(_))
    }

    /// Gives the memory back (to reuse a page-locked buffer); lent memory comes back as
    /// [`StagingMemory::Lent`].
    #[allow(dead_code)]
    pub(crate) fn into_memory(self) -> StagingMemory {
        self.mem
    }

    /// Bytes of one expert row across all tensors.
    #[allow(dead_code)]
    pub(crate) fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }

    fn host_bytes(&self) -> Option<&[u8]> {
        match self.mem.resolved() {
            StagingMemory::Host(buf) => buf.as_slice().get(..self.len),
            #[cfg(feature = "cuda")]
            StagingMemory::Pinned(buf) => buf.region(0..self.len),
            #[cfg(feature = "cuda")]
            StagingMemory::Device { .. } => None,
            StagingMemory::Lent(_) => None,
        }
    }

    fn host_bytes_mut(&mut self, range: Range<usize>) -> Option<&mut [u8]> {
        if range.end > self.len {
            return None;
        }
        match self.mem.resolved_mut() {
            StagingMemory::Host(buf) => buf.as_mut_slice().get_mut(range),
            #[cfg(feature = "cuda")]
            StagingMemory::Pinned(buf) => buf.region_mut(range),
            #[cfg(feature = "cuda")]
            StagingMemory::Device { .. } => None,
            StagingMemory::Lent(_) => None,
        }
    }

    /// The bytes in `range` (host staging only).
    #[allow(dead_code)]
    pub(crate) fn region(&self, range: Range<usize>) -> Option<&[u8]> {
        self.host_bytes()?.get(range)
    }

    /// The bytes in `range`, writable (host staging only).
    pub(crate) fn region_mut(&mut self, range: Range<usize>) -> Option<&mut [u8]> {
        self.host_bytes_mut(range)
    }

    /// Byte range of tensor `tensor` of staged row `row`, if both exist.
    pub(crate) fn tensor_range(&self, row: usize, tensor: usize) -> Option<Range<usize>> {
        let base = self.rows.get(row)?.offset;
        let start = base.checked_add(*self.tensor_offsets.get(tensor)?)?;
        Some(start..start.checked_add(*self.tensor_bytes.get(tensor)?)?)
    }

    /// True when tensor `tensor` of staged row `row` exists and lies inside the staging.
    pub(crate) fn has_row_tensor(&self, row: usize, tensor: usize) -> bool {
        self.tensor_range(row, tensor)
            .is_some_and(|r| r.end <= self.len)
    }

    /// Tensor `tensor`'s bytes of staged row `row` (an index into [`rows`](Self::rows));
    /// `None` for device staging.
    pub(crate) fn row_tensor(&self, row: usize, tensor: usize) -> Option<&[u8]> {
        let range = self.tensor_range(row, tensor)?;
        self.host_bytes()?.get(range)
    }

    /// Tensor `tensor`'s bytes of staged row `row`, writable; `None` for device staging.
    pub(crate) fn row_tensor_mut(&mut self, row: usize, tensor: usize) -> Option<&mut [u8]> {
        let range = self.tensor_range(row, tensor)?;
        self.host_bytes_mut(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::TensorSpec;
    use moeshift_tensor::DType;

    fn layout() -> LayerLayout {
        LayerLayout {
            rows: 4,
            tensors: vec![
                TensorSpec {
                    name: "a".into(),
                    dtype: DType::F32,
                    row_bytes: 12,
                },
                TensorSpec {
                    name: "b".into(),
                    dtype: DType::U8,
                    row_bytes: 5,
                },
            ],
        }
    }

    #[test]
    fn rows_are_packed_tensor_after_tensor_with_reserved_gaps() {
        let mut b = StagingBuilder::new(&layout());
        let header = b.reserve(8);
        assert_eq!(header, 0..8);
        assert_eq!(b.push_row(2, 7, RowSource::Peer { peer: 1, round: 0 }), 0);
        assert_eq!(b.push_row(3, 9, RowSource::Local { src_row: 0 }), 1);
        assert_eq!(b.len(), 8 + 2 * 17);
        let mut s = b.build(0, 0).unwrap();
        assert_eq!(s.len(), 42);
        assert_eq!(s.rows()[1].offset, 8 + 17);
        s.row_tensor_mut(1, 1).unwrap().fill(4);
        s.row_tensor_mut(0, 0).unwrap().fill(1);
        let all = s.region(0..42).unwrap();
        assert!(all[8..20].iter().all(|&x| x == 1));
        assert!(all[20..37].iter().all(|&x| x == 0));
        assert!(all[37..42].iter().all(|&x| x == 4));
        assert_eq!(s.row_tensor(0, 2), None);
        assert_eq!(s.row_tensor(2, 0), None);
        assert_eq!(s.region_mut(40..43), None);
    }

    #[test]
    fn overflowing_layouts_are_an_error() {
        let mut l = layout();
        l.tensors[0].row_bytes = usize::MAX;
        let mut b = StagingBuilder::new(&l);
        b.push_row(0, 0, RowSource::Local { src_row: 1 });
        assert!(matches!(
            b.build(3, 4),
            Err(EplbCommError::Staging {
                rank: 3,
                layer: 4,
                ..
            })
        ));
    }

    #[test]
    fn lent_memory_stages_rows_and_comes_back_when_the_staging_goes() {
        let mut mem = HostBuffer::zeroed(64).unwrap();
        mem.as_mut_slice().fill(0xA5);
        let base = mem.addr();
        let slot = LendingSlot::new(StagingMemory::Host(mem));
        assert_eq!(slot.holder(), None);
        assert_eq!(slot.with_memory(StagingMemory::len), Some(64));

        let lent = slot.lend(7).unwrap();
        assert_eq!(lent.len(), 64);
        // Lent once: a second loan names the layer holding it, and nothing is shared.
        assert_eq!(slot.lend(8).unwrap_err(), 7);
        assert_eq!(slot.holder(), Some(7));
        assert_eq!(slot.with_memory(StagingMemory::len), None);

        let mut b = StagingBuilder::new(&layout());
        b.push_row(1, 3, RowSource::Peer { peer: 1, round: 0 });
        b.push_row(2, 4, RowSource::Local { src_row: 0 });
        let mut s = b.build_lent(0, 7, lent).unwrap();
        assert!(s.is_lent());
        // The rows live in the lent memory itself, from its first byte: no copy, no
        // allocation.
        assert_eq!(s.addr(), base);
        assert_eq!(s.len(), 2 * 17);
        assert_eq!(s.device(), Device::Host);
        assert_eq!(s.memory().len(), 64);
        s.row_tensor_mut(1, 1).unwrap().fill(9);
        assert_eq!(s.row_tensor(1, 1), Some(&[9u8; 5][..]));
        // Bytes the staging laid out are reachable; the lent memory's rest is not.
        assert_eq!(s.row_tensor(0, 0), Some(&[0xA5u8; 12][..]));
        assert_eq!(s.region(0..35), None);
        assert_eq!(s.row_tensor(2, 0), None);

        drop(s);
        assert_eq!(slot.holder(), None);
        // The memory is back, with what the staging wrote into it.
        let again = slot.lend(8).unwrap();
        let StagingMemory::Host(buf) = again.memory().unwrap() else {
            panic!("host memory was lent");
        };
        assert_eq!(buf.as_slice()[17 + 12..17 + 17], [9u8; 5]);
        assert_eq!(slot.holder(), Some(8));
    }

    #[test]
    fn lent_memory_too_small_for_the_rows_is_an_error_and_comes_back() {
        let slot = LendingSlot::new(StagingMemory::Host(HostBuffer::zeroed(20).unwrap()));
        let mut b = StagingBuilder::new(&layout());
        b.push_row(0, 0, RowSource::Local { src_row: 1 });
        b.push_row(1, 1, RowSource::Local { src_row: 0 });
        let err = b.build_lent(2, 5, slot.lend(5).unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                EplbCommError::PlanMismatch {
                    rank: 2,
                    layer: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("34 bytes"), "{err}");
        assert_eq!(slot.holder(), None);
        assert!(slot.lend(6).is_ok());
    }
}
