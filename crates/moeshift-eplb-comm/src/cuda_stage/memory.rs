//! The `unsafe` side of CUDA staging: device buffers, page-locked host buffers, and
//! stream-ordered copies between them and expert rows.
//!
//! Every copy is *queued* on a stream and finishes later. The methods of [`CopyQueue`]
//! check every range before queueing (rows through [`ExpertRows`](moeshift_tensor::ExpertRows),
//! buffers against their length), so a copy can never reach outside memory this crate owns
//! or the caller vouched for ([`LayerWeightsBuilder::raw`](crate::LayerWeightsBuilder::raw)).
//! What the types cannot express is *when* a copy finishes, so this crate follows one rule:
//! **every path that queued copies waits for them ([`CopyQueue::wait`] or
//! [`CopyQueue::settle`]) before it returns to the caller or releases a buffer they touch.**
//! Device buffers are in addition freed stream-ordered, after the work queued before.

use std::ops::Range;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUevent_flags};
use cudarc::driver::{
    result, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DriverError,
};
use moeshift_sync::Deadline;
use moeshift_tensor::{CudaError, Device};

use crate::error::EplbCommError;
use crate::weights::LayerWeights;

/// Device allocations are rounded up to this, so that a cached staging buffer serves layers
/// of slightly different sizes.
const DEVICE_GRANULE: usize = 2 << 20;
/// How long [`CopyQueue::settle`] waits for queued copies after a failure.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// A driver error as this crate's error: `rank`, `layer` and what was attempted.
pub(crate) fn driver_error(
    rank: usize,
    layer: Option<usize>,
    op: String,
    source: DriverError,
) -> EplbCommError {
    EplbCommError::Cuda {
        rank,
        layer,
        source: CudaError::Driver { op, source },
    }
}

/// Device memory on one GPU: staging, or a pack buffer. Its first `len` bytes are in use; the
/// allocation may be larger (a reused buffer).
#[derive(Debug)]
pub(crate) struct DeviceBuffer {
    /// `None` for zero bytes, and while being handed back to a pool.
    slice: Option<CudaSlice<u8>>,
    addr: u64,
    len: usize,
    ordinal: usize,
    /// Where the allocation goes when the buffer is dropped.
    pool: Option<Arc<StagingPool>>,
    /// A `cuMemAlloc` allocation the buffer owns instead of `slice` (see
    /// [`DeviceBuffer::shareable`]).
    shareable: Option<ShareableAlloc>,
}

impl DeviceBuffer {
    /// `len` bytes (contents undefined) on `stream`'s device, allocated and later freed in
    /// `stream`'s order.
    pub(crate) fn new(stream: &Arc<CudaStream>, len: usize) -> Result<Self, DriverError> {
        let ordinal = stream.context().ordinal();
        if len == 0 {
            return Ok(Self {
                slice: None,
                addr: 0,
                len: 0,
                ordinal,
                pool: None,
                shareable: None,
            });
        }
        let capacity = len.checked_next_multiple_of(DEVICE_GRANULE).unwrap_or(len);
        // SAFETY: the bytes are left undefined; this crate only reads a range of a buffer
        // after a copy or a receive wrote it (staged rows are filled before the commit reads
        // them, packed rows before they are sent). `u8` has no invalid values.
        let slice = unsafe { stream.alloc::<u8>(capacity) }?;
        let addr = {
            let (ptr, _record) = slice.device_ptr(stream);
            ptr
        };
        Ok(Self {
            slice: Some(slice),
            addr,
            len,
            ordinal,
            pool: None,
            shareable: None,
        })
    }

    /// `len` bytes (contents undefined) on `ctx`'s device from `cuMemAlloc`, not from a
    /// stream-ordered pool: memory CUDA IPC can share with other processes of the node (what
    /// NIXL's `cuda_ipc` transport needs), freed on drop once the device is idle. Used for
    /// memory kept for the life of a communicator, never per layer.
    pub(crate) fn shareable(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, DriverError> {
        let ordinal = ctx.ordinal();
        if len == 0 {
            return Ok(Self {
                slice: None,
                addr: 0,
                len: 0,
                ordinal,
                pool: None,
                shareable: None,
            });
        }
        ctx.bind_to_thread()?;
        // SAFETY: the context is current on this thread; the bytes are left undefined and,
        // as for `new`, only read after a copy or a READ wrote them.
        let addr = unsafe { result::malloc_sync(len) }?;
        Ok(Self {
            slice: None,
            addr,
            len,
            ordinal,
            pool: None,
            shareable: Some(ShareableAlloc {
                addr,
                ctx: Arc::clone(ctx),
            }),
        })
    }

    /// Bytes in use.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Device address of the first byte.
    pub(crate) fn addr(&self) -> u64 {
        self.addr
    }

    /// The GPU.
    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The stream that allocated the buffer and will free it.
    pub(crate) fn stream(&self) -> Option<&Arc<CudaStream>> {
        self.slice.as_ref().map(CudaSlice::stream)
    }

    /// The device address of `range` (bytes in use), if it lies inside.
    pub(crate) fn range_addr(&self, range: &Range<usize>) -> Option<u64> {
        (range.start <= range.end && range.end <= self.len)
            .then(|| self.addr.saturating_add(range.start as u64))
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // A `cuMemAlloc` allocation frees itself once the device is idle.
        drop(self.shareable.take());
        let Some(slice) = self.slice.take() else {
            return;
        };
        // cudarc frees on the allocating stream; the context must be current for that.
        let _ = slice.context().bind_to_thread();
        match &self.pool {
            Some(pool) => pool.put(slice),
            None => drop(slice),
        }
    }
}

/// A `cuMemAlloc` allocation owned by a [`DeviceBuffer`].
#[derive(Debug)]
struct ShareableAlloc {
    addr: u64,
    ctx: Arc<CudaContext>,
}

impl Drop for ShareableAlloc {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // Copies queued on any stream of the context may still use the memory.
            let _ = self.ctx.synchronize();
            // SAFETY: allocated by `cuMemAlloc` in this context and freed exactly once, after
            // the synchronisation above (and copies are waited for before buffers are
            // released anyway, see the module docs).
            let _ = unsafe { result::free_sync(self.addr) };
        }
    }
}

/// Keeps the largest released staging buffer for the next layer, so a cycle of layers does
/// not allocate (and map) device memory for every layer.
#[derive(Debug)]
pub(crate) struct StagingPool {
    stream: Arc<CudaStream>,
    cached: Mutex<Option<CudaSlice<u8>>>,
}

impl StagingPool {
    /// A pool allocating on `stream`.
    pub(crate) fn new(stream: Arc<CudaStream>) -> Arc<Self> {
        Arc::new(Self {
            stream,
            cached: Mutex::new(None),
        })
    }

    /// A staging buffer of `len` bytes: the cached one when it is large enough, else a new
    /// one (and the cached one is freed).
    pub(crate) fn take(self: &Arc<Self>, len: usize) -> Result<DeviceBuffer, DriverError> {
        if len == 0 {
            return DeviceBuffer::new(&self.stream, 0);
        }
        let cached = self.lock().take();
        let mut buf = match cached {
            Some(slice) if slice.len() >= len => {
                let addr = {
                    let (ptr, _record) = slice.device_ptr(&self.stream);
                    ptr
                };
                DeviceBuffer {
                    addr,
                    len,
                    ordinal: self.stream.context().ordinal(),
                    slice: Some(slice),
                    pool: None,
                    shareable: None,
                }
            }
            other => {
                if let Some(slice) = other {
                    let _ = slice.context().bind_to_thread();
                    drop(slice);
                }
                DeviceBuffer::new(&self.stream, len)?
            }
        };
        buf.pool = Some(Arc::clone(self));
        Ok(buf)
    }

    fn put(&self, slice: CudaSlice<u8>) {
        let mut cached = self.lock();
        let keep_new = cached.as_ref().is_none_or(|c| c.len() < slice.len());
        if keep_new {
            *cached = Some(slice);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<CudaSlice<u8>>> {
        match self.cached.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Page-locked host memory (`cuMemHostAlloc`, not write-combined: the CPU reads it too),
/// so that copies to and from the GPU run at full speed and asynchronously.
#[derive(Debug)]
pub(crate) struct PinnedBuffer {
    ptr: NonNull<u8>,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer exclusively owns its allocation, which is plain host memory usable from
// any thread; `&PinnedBuffer` only reads it and `&mut PinnedBuffer` is needed to write it.
unsafe impl Send for PinnedBuffer {}
// SAFETY: as above.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// `len` zeroed bytes of page-locked memory registered with `ctx`.
    pub(crate) fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, DriverError> {
        if len == 0 {
            return Ok(Self {
                ptr: NonNull::dangling(),
                len: 0,
                ctx: Arc::clone(ctx),
            });
        }
        ctx.bind_to_thread()?;
        // SAFETY: the context is current; flags 0 asks for plain page-locked memory.
        let raw = unsafe { result::malloc_host(len, 0) }?;
        let Some(ptr) = NonNull::new(raw.cast::<u8>()) else {
            return Err(DriverError(sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY));
        };
        // SAFETY: `ptr` points to `len` freshly allocated bytes that nothing else uses.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        Ok(Self {
            ptr,
            len,
            ctx: Arc::clone(ctx),
        })
    }

    /// Size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Host address of the first byte.
    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr().expose_provenance() as u64
    }

    /// The bytes in `range`, or `None` when it does not lie inside.
    pub(crate) fn region(&self, range: Range<usize>) -> Option<&[u8]> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        // SAFETY: the range lies inside the allocation; `&self` only reads, and copies
        // writing into the buffer are waited for before anyone reads it (module docs).
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(range.start), range.len()) })
    }

    /// The bytes in `range`, writable, or `None` when it does not lie inside. Only that
    /// range is borrowed, so copies still reading other ranges are not aliased.
    pub(crate) fn region_mut(&mut self, range: Range<usize>) -> Option<&mut [u8]> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        // SAFETY: as in `region`, and `&mut self` makes the access exclusive.
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(range.start), range.len())
        })
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `cuMemHostAlloc` and is freed once. `cuMemFreeHost`
        // synchronizes with the device, so no copy still uses the memory afterwards.
        let _ = unsafe { result::free_host(self.ptr.as_ptr().cast()) };
    }
}

/// Queues copies on one stream, checking every range first; see the module docs for the
/// waiting rule. `rank` and `layer` name the errors.
#[derive(Debug)]
pub(crate) struct CopyQueue<'s> {
    stream: &'s Arc<CudaStream>,
    ordinal: usize,
    rank: usize,
    layer: usize,
}

/// A checked row of a tensor: its device address and length.
struct Row {
    addr: u64,
    bytes: usize,
}

impl<'s> CopyQueue<'s> {
    /// A queue on `stream`; makes the stream's context current on this thread.
    pub(crate) fn new(
        stream: &'s Arc<CudaStream>,
        rank: usize,
        layer: usize,
    ) -> Result<Self, EplbCommError> {
        let ordinal = stream.context().ordinal();
        stream.context().bind_to_thread().map_err(|e| {
            driver_error(
                rank,
                Some(layer),
                format!("making the context of cuda:{ordinal} current"),
                e,
            )
        })?;
        Ok(Self {
            stream,
            ordinal,
            rank,
            layer,
        })
    }

    fn driver(&self, op: String, e: DriverError) -> EplbCommError {
        driver_error(self.rank, Some(self.layer), op, e)
    }

    /// A range this crate computed does not fit its buffer: an internal inconsistency,
    /// reported instead of copying.
    fn inconsistent(&self, detail: String) -> EplbCommError {
        EplbCommError::PlanMismatch {
            rank: self.rank,
            layer: self.layer,
            detail: format!("inconsistent staging: {detail}"),
        }
    }

    /// Row `row` of tensor `tensor`, which must live on this queue's GPU.
    fn row(
        &self,
        weights: &LayerWeights<'_>,
        tensor: usize,
        row: usize,
    ) -> Result<Row, EplbCommError> {
        let t = weights.tensor(tensor)?;
        if t.device() != Device::Cuda(self.ordinal) {
            return Err(EplbCommError::DeviceMismatch {
                tensor: t.name().to_string(),
                device: t.device(),
                first: "(the communicator's GPU)".into(),
                expected: Device::Cuda(self.ordinal),
            });
        }
        let addr = t
            .rows()
            .row_addr(row)
            .map_err(|_| EplbCommError::TensorRowOutOfRange {
                tensor: t.name().to_string(),
                row,
                rows: t.rows().num_rows(),
            })?;
        Ok(Row {
            addr,
            bytes: t.row_bytes(),
        })
    }

    fn buffer_range(
        &self,
        buf: &DeviceBuffer,
        offset: usize,
        bytes: usize,
        what: &str,
    ) -> Result<u64, EplbCommError> {
        let range = offset..offset.saturating_add(bytes);
        if buf.ordinal() != self.ordinal {
            return Err(self.inconsistent(format!(
                "{what}: the buffer is on cuda:{}, the stream on cuda:{}",
                buf.ordinal(),
                self.ordinal
            )));
        }
        buf.range_addr(&range).ok_or_else(|| {
            self.inconsistent(format!(
                "{what}: bytes {range:?} lie outside the {}-byte device buffer",
                buf.len()
            ))
        })
    }

    /// Queues a copy of tensor `tensor`'s row `row` into `dst` at `offset`.
    pub(crate) fn row_to_buffer(
        &self,
        weights: &LayerWeights<'_>,
        tensor: usize,
        row: usize,
        dst: &mut DeviceBuffer,
        offset: usize,
    ) -> Result<(), EplbCommError> {
        let src = self.row(weights, tensor, row)?;
        if src.bytes == 0 {
            return Ok(());
        }
        let to = self.buffer_range(dst, offset, src.bytes, "staging a row")?;
        // SAFETY: both ranges were checked: the row lies inside its tensor's storage on this
        // GPU (valid by the weights' contract), the destination inside `dst`. The copy is
        // waited for before the buffer or the weights are released (module docs).
        unsafe { result::memcpy_dtod_async(to, src.addr, src.bytes, self.stream.cu_stream()) }
            .map_err(|e| {
                self.driver(
                    format!("copying a row of tensor {tensor} (row {row}) into device staging"),
                    e,
                )
            })
    }

    /// Queues a copy of `bytes` bytes of `src` at `offset` over tensor `tensor`'s row `row`.
    pub(crate) fn buffer_to_row(
        &self,
        src: &DeviceBuffer,
        offset: usize,
        weights: &mut LayerWeights<'_>,
        tensor: usize,
        row: usize,
    ) -> Result<(), EplbCommError> {
        let dst = self.row(weights, tensor, row)?;
        if dst.bytes == 0 {
            return Ok(());
        }
        let from = self.buffer_range(src, offset, dst.bytes, "committing a row")?;
        // SAFETY: as in `row_to_buffer`; `&mut weights` gives this crate the right to write
        // the row, and the copy is waited for before the commit returns.
        unsafe { result::memcpy_dtod_async(dst.addr, from, dst.bytes, self.stream.cu_stream()) }
            .map_err(|e| {
                self.driver(
                    format!("writing row {row} of tensor {tensor} from device staging"),
                    e,
                )
            })
    }

    /// Queues a copy of tensor `tensor`'s row `src_row` over its row `dst_row`.
    pub(crate) fn row_to_row(
        &self,
        weights: &mut LayerWeights<'_>,
        tensor: usize,
        src_row: usize,
        dst_row: usize,
    ) -> Result<(), EplbCommError> {
        let src = self.row(weights, tensor, src_row)?;
        let dst = self.row(weights, tensor, dst_row)?;
        if src_row == dst_row || src.bytes == 0 {
            return Ok(());
        }
        // SAFETY: both rows lie inside the tensor's storage and never overlap (checked when
        // the weights were built); `&mut weights` gives the right to write `dst_row`.
        unsafe { result::memcpy_dtod_async(dst.addr, src.addr, src.bytes, self.stream.cu_stream()) }
            .map_err(|e| {
                self.driver(
                    format!("copying row {src_row} over row {dst_row} of tensor {tensor}"),
                    e,
                )
            })
    }

    /// Queues a copy of tensor `tensor`'s row `row` into `dst` at `offset` (device to host).
    pub(crate) fn row_to_pinned(
        &self,
        weights: &LayerWeights<'_>,
        tensor: usize,
        row: usize,
        dst: &mut PinnedBuffer,
        offset: usize,
    ) -> Result<(), EplbCommError> {
        let src = self.row(weights, tensor, row)?;
        if src.bytes == 0 {
            return Ok(());
        }
        let range = offset..offset.saturating_add(src.bytes);
        let Some(to) = dst.region_mut(range.clone()) else {
            return Err(self.inconsistent(format!(
                "copying a row to the host: bytes {range:?} lie outside the {}-byte page-locked buffer",
                dst.len()
            )));
        };
        let to = to.as_mut_ptr();
        // SAFETY: the row is valid device memory (checked above) and `to` points to
        // `src.bytes` bytes of page-locked memory inside `dst`; the copy is waited for before
        // the buffer is read or released.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(to.cast(), src.addr, src.bytes, self.stream.cu_stream())
        }
        .result()
        .map_err(|e| {
            self.driver(
                format!("copying row {row} of tensor {tensor} to page-locked host memory"),
                e,
            )
        })
    }

    /// Queues a copy of `src[range]` into `dst` at `offset` (host to device).
    pub(crate) fn pinned_to_buffer(
        &self,
        src: &PinnedBuffer,
        range: Range<usize>,
        dst: &mut DeviceBuffer,
        offset: usize,
    ) -> Result<(), EplbCommError> {
        if range.is_empty() {
            return Ok(());
        }
        let Some(from) = src.region(range.clone()) else {
            return Err(self.inconsistent(format!(
                "received bytes {range:?} lie outside the {}-byte page-locked buffer",
                src.len()
            )));
        };
        let to = self.buffer_range(dst, offset, from.len(), "moving received rows to the GPU")?;
        // SAFETY: `from` is page-locked memory inside `src`, `to` a checked range of `dst`;
        // the copy is waited for before either buffer is reused or released.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                to,
                from.as_ptr().cast(),
                from.len(),
                self.stream.cu_stream(),
            )
        }
        .result()
        .map_err(|e| self.driver("copying received rows to device staging".into(), e))
    }

    /// Waits until everything queued on the stream so far has finished, or `deadline`
    /// passes ([`EplbCommError::DeviceTimeout`] naming `what`).
    pub(crate) fn wait(&self, deadline: Deadline, what: &str) -> Result<(), EplbCommError> {
        match wait_stream(self.stream, deadline) {
            Ok(true) => Ok(()),
            Ok(false) => Err(EplbCommError::DeviceTimeout {
                rank: self.rank,
                layer: Some(self.layer),
                op: what.to_string(),
            }),
            Err(e) => Err(self.driver(format!("waiting for {what}"), e)),
        }
    }

    /// After a failure: waits a bounded time for what was queued, so buffers can be released.
    pub(crate) fn settle(&self) {
        let _ = wait_stream(self.stream, Deadline::after(SETTLE_WAIT));
    }
}

/// Waits until the work queued on `stream` so far finished (`Ok(true)`), or `deadline`
/// passed (`Ok(false)`). Spins briefly, then sleeps a small fraction of the time waited.
pub(crate) fn wait_stream(stream: &CudaStream, deadline: Deadline) -> Result<bool, DriverError> {
    let event = stream.record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
    wait_event(&event, deadline)
}

/// Waits until `event` completed (`Ok(true)`), or `deadline` passed (`Ok(false)`). Spins
/// briefly, then sleeps a small fraction of the time waited.
pub(crate) fn wait_event(event: &CudaEvent, deadline: Deadline) -> Result<bool, DriverError> {
    let started = Instant::now();
    loop {
        if event.try_is_complete()? {
            return Ok(true);
        }
        if deadline.is_expired() {
            return Ok(false);
        }
        let waited = started.elapsed();
        if waited < Duration::from_micros(200) {
            std::thread::yield_now();
        } else {
            let nap = (waited / 32).clamp(Duration::from_micros(10), Duration::from_millis(1));
            std::thread::sleep(nap.min(deadline.remaining()));
        }
    }
}

/// Makes `waiter` wait (on the GPU) for the work queued on `other` so far.
pub(crate) fn join_streams(waiter: &CudaStream, other: &CudaStream) -> Result<(), DriverError> {
    if waiter == other {
        return Ok(());
    }
    waiter.join(other)
}
