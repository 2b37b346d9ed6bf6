//! Raw device memory: owned allocations, borrowed byte ranges with bounds, copies, NCCL
//! broadcasts of ranges, and CUDA IPC export/import.
//!
//! This is where the crate's raw pointers live. Everything outside this module and the
//! kernel modules works with [`Span`] / [`SpanMut`] (a device byte range borrowed for a
//! lifetime, made only from memory known to be valid) and offsets, which are checked here
//! against the range before any driver call.
//!
//! Copies, uploads and fills are queued on a stream and return before the GPU ran them:
//! callers synchronise that stream (or order later work after it) before the borrowed
//! memory's owner may free or reuse it. Every engine synchronises before returning.
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr};
use cudarc::driver::{result, CudaContext, CudaStream, DriverError};
use moeshift_device_comm::nccl::{NcclComm, NcclError};
use moeshift_sync::Deadline;

use super::DeviceStorage;

/// Why a range operation was refused before reaching the driver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RangeError {
    /// `offset + len` runs past the range.
    #[error("bytes {offset}..{offset}+{len} lie outside a device range of {size} bytes")]
    OutOfBounds {
        offset: usize,
        len: usize,
        size: usize,
    },
    /// The memory is on another device than the operation.
    #[error("the memory is on cuda:{memory}, the operation runs on cuda:{engine}")]
    WrongDevice { memory: usize, engine: usize },
    /// Two ranges of one grouped operation overlap.
    #[error(
        "device ranges {first:#x}+{first_len} and {second:#x}+{second_len} overlap in one \
         grouped operation"
    )]
    Overlap {
        first: u64,
        first_len: usize,
        second: u64,
        second_len: usize,
    },
}

/// A device error of a range operation: refused up front, or failed in the driver or NCCL.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MemError {
    #[error(transparent)]
    Range(#[from] RangeError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Nccl(#[from] NcclError),
}

/// A read-only device byte range, valid for `'a`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span<'a> {
    addr: CUdeviceptr,
    len: usize,
    ordinal: usize,
    _life: PhantomData<&'a [u8]>,
}

/// A writable device byte range, borrowed exclusively for `'a`.
#[derive(Debug)]
pub(crate) struct SpanMut<'a> {
    addr: CUdeviceptr,
    len: usize,
    ordinal: usize,
    _life: PhantomData<&'a mut [u8]>,
}

impl<'a> Span<'a> {
    /// The memory of a device storage.
    pub(crate) fn of_storage<S: DeviceStorage + ?Sized>(s: &'a S) -> Self {
        Self {
            addr: s.device_addr(),
            len: s.byte_len(),
            ordinal: s.ordinal(),
            _life: PhantomData,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub(crate) fn addr(&self) -> u64 {
        self.addr
    }

    /// The address of `offset..offset+len`, checked.
    fn at(&self, offset: usize, len: usize) -> Result<CUdeviceptr, RangeError> {
        checked(self.addr, self.len, offset, len)
    }
}

impl<'a> SpanMut<'a> {
    /// The memory of a device storage, borrowed for writing.
    pub(crate) fn of_storage<S: DeviceStorage + ?Sized>(s: &'a mut S) -> Self {
        Self {
            addr: s.device_addr(),
            len: s.byte_len(),
            ordinal: s.ordinal(),
            _life: PhantomData,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub(crate) fn addr(&self) -> u64 {
        self.addr
    }

    /// A read-only view of the same range.
    pub(crate) fn as_span(&self) -> Span<'_> {
        Span {
            addr: self.addr,
            len: self.len,
            ordinal: self.ordinal,
            _life: PhantomData,
        }
    }

    fn at(&self, offset: usize, len: usize) -> Result<CUdeviceptr, RangeError> {
        checked(self.addr, self.len, offset, len)
    }
}

fn checked(
    addr: CUdeviceptr,
    size: usize,
    offset: usize,
    len: usize,
) -> Result<CUdeviceptr, RangeError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(addr + offset as u64),
        _ => Err(RangeError::OutOfBounds { offset, len, size }),
    }
}

/// True when the byte ranges `a` and `b` (address, length) share a byte.
pub(crate) fn overlaps(a: (u64, usize), b: (u64, usize)) -> bool {
    let end = |(addr, len): (u64, usize)| addr.saturating_add(len as u64);
    a.1 > 0 && b.1 > 0 && a.0 < end(b) && b.0 < end(a)
}

/// Checks that no two of `ranges` (address, length) overlap.
fn disjoint(ranges: &[(CUdeviceptr, usize)]) -> Result<(), RangeError> {
    let mut sorted: Vec<(CUdeviceptr, usize)> =
        ranges.iter().copied().filter(|&(_, len)| len > 0).collect();
    sorted.sort_unstable();
    match sorted.windows(2).find(|w| overlaps(w[0], w[1])) {
        Some(w) => Err(RangeError::Overlap {
            first: w[0].0,
            first_len: w[0].1,
            second: w[1].0,
            second_len: w[1].1,
        }),
        None => Ok(()),
    }
}

fn same_device(memory: usize, engine: usize) -> Result<(), RangeError> {
    if memory == engine {
        Ok(())
    } else {
        Err(RangeError::WrongDevice { memory, engine })
    }
}

/// Device memory from `cuMemAlloc` (not from a stream-ordered pool, so it can be exported
/// through CUDA IPC), freed on drop after the device finished with it.
#[derive(Debug)]
pub(crate) struct DeviceAlloc {
    addr: CUdeviceptr,
    len: usize,
    ctx: Arc<CudaContext>,
}

impl DeviceAlloc {
    /// `len` bytes (at least one byte is allocated, so the address is always valid),
    /// contents undefined.
    pub(crate) fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        // SAFETY: the context is current on this thread; the memory is only handed out
        // through spans bounded by `len`.
        let addr = unsafe { result::malloc_sync(len.max(1)) }?;
        Ok(Self {
            addr,
            len,
            ctx: Arc::clone(ctx),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn span(&self) -> Span<'_> {
        Span {
            addr: self.addr,
            len: self.len,
            ordinal: self.ctx.ordinal(),
            _life: PhantomData,
        }
    }

    pub(crate) fn span_mut(&mut self) -> SpanMut<'_> {
        SpanMut {
            addr: self.addr,
            len: self.len,
            ordinal: self.ctx.ordinal(),
            _life: PhantomData,
        }
    }

    /// The CUDA IPC handle of this allocation (64 opaque bytes another process on the same
    /// node opens with [`IpcMapping::open`]).
    pub(crate) fn ipc_handle(&self) -> Result<[u8; 64], DriverError> {
        self.ctx.bind_to_thread()?;
        let mut handle = std::mem::MaybeUninit::<sys::CUipcMemHandle>::uninit();
        // SAFETY: `addr` is the base of a live cuMemAlloc allocation of this context, and
        // `handle` is a valid out-pointer.
        unsafe { sys::cuIpcGetMemHandle(handle.as_mut_ptr(), self.addr) }.result()?;
        // SAFETY: initialised by the successful call above.
        let handle = unsafe { handle.assume_init() };
        Ok(handle.reserved.map(|c| c as u8))
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // Work queued on any stream of the context may still use the memory.
            let _ = self.ctx.synchronize();
            // SAFETY: allocated by cuMemAlloc in this context, freed once, and no work uses
            // it after the synchronisation above.
            let _ = unsafe { result::free_sync(self.addr) };
        }
    }
}

/// Another process's allocation, opened from its CUDA IPC handle; closed on drop.
#[derive(Debug)]
pub(crate) struct IpcMapping {
    addr: CUdeviceptr,
    len: usize,
    ctx: Arc<CudaContext>,
}

impl IpcMapping {
    /// Opens `handle` (an allocation of at least `len` bytes in another process) in `ctx`,
    /// enabling peer access when the memory is on another GPU.
    pub(crate) fn open(
        ctx: &Arc<CudaContext>,
        handle: &[u8; 64],
        len: usize,
    ) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        let raw = sys::CUipcMemHandle {
            reserved: handle.map(|b| b as std::ffi::c_char),
        };
        let mut addr: CUdeviceptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: the context is current; `addr` is a valid out-pointer; the handle is plain
        // bytes the driver validates.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut addr, raw, flags) }.result()?;
        Ok(Self {
            addr,
            len,
            ctx: Arc::clone(ctx),
        })
    }

    pub(crate) fn span(&self) -> Span<'_> {
        Span {
            addr: self.addr,
            len: self.len,
            ordinal: self.ctx.ordinal(),
            _life: PhantomData,
        }
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            let _ = self.ctx.synchronize();
            // SAFETY: opened by cuIpcOpenMemHandle in this context, closed once, no work uses
            // it after the synchronisation above.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.addr) }.result();
        }
    }
}

/// Queues a device-to-device copy of `len` bytes on `stream`. Both ranges must be usable
/// from `stream`'s context (same device, or peer memory mapped into it).
pub(crate) fn copy(
    stream: &CudaStream,
    dst: &mut SpanMut<'_>,
    dst_offset: usize,
    src: &Span<'_>,
    src_offset: usize,
    len: usize,
) -> Result<(), MemError> {
    let d = dst.at(dst_offset, len)?;
    let s = src.at(src_offset, len)?;
    if len == 0 {
        return Ok(());
    }
    stream.context().bind_to_thread()?;
    // SAFETY: both ranges were checked against live memory borrowed for the call; the caller
    // orders the copy against other work on them (stream order, events).
    unsafe { result::memcpy_dtod_async(d, s, len, stream.cu_stream()) }?;
    Ok(())
}

/// Queues a host-to-device copy of `src` on `stream`. With pageable host memory the driver
/// stages `src` before returning, so it may be dropped afterwards.
pub(crate) fn upload(
    stream: &CudaStream,
    dst: &mut SpanMut<'_>,
    dst_offset: usize,
    src: &[u8],
) -> Result<(), MemError> {
    let d = dst.at(dst_offset, src.len())?;
    if src.is_empty() {
        return Ok(());
    }
    stream.context().bind_to_thread()?;
    // SAFETY: the range was checked; `src` outlives the call, and for pageable memory the
    // driver has copied it out when the call returns. Callers passing pinned memory keep it
    // alive until the stream synchronises (they synchronise before returning).
    unsafe { result::memcpy_htod_async(d, src, stream.cu_stream()) }?;
    Ok(())
}

/// Copies `dst.len()` bytes from `src` at `src_offset` to the host and waits for them.
pub(crate) fn download(
    stream: &CudaStream,
    src: &Span<'_>,
    src_offset: usize,
    dst: &mut [u8],
) -> Result<(), MemError> {
    let s = src.at(src_offset, dst.len())?;
    if dst.is_empty() {
        return Ok(());
    }
    stream.context().bind_to_thread()?;
    // SAFETY: the range was checked; `dst` is borrowed until the synchronisation below.
    unsafe { result::memcpy_dtoh_async(dst, s, stream.cu_stream()) }?;
    stream.synchronize()?;
    Ok(())
}

/// Fills `len` bytes at `offset` with `byte` on `stream`.
pub(crate) fn fill(
    stream: &CudaStream,
    dst: &mut SpanMut<'_>,
    offset: usize,
    len: usize,
    byte: u8,
) -> Result<(), MemError> {
    let d = dst.at(offset, len)?;
    if len == 0 {
        return Ok(());
    }
    stream.context().bind_to_thread()?;
    // SAFETY: the range was checked.
    unsafe { result::memset_d8_async(d, byte, len, stream.cu_stream()) }?;
    Ok(())
}

/// Broadcast, root side: sends `len` bytes of `src` at `offset` to every rank. The caller
/// has ordered earlier writes to the range before `comm`'s stream.
pub(crate) fn broadcast_send(
    comm: &NcclComm,
    src: &Span<'_>,
    offset: usize,
    len: usize,
    deadline: Deadline,
) -> Result<(), MemError> {
    same_device(src.ordinal, comm.device_ordinal())?;
    let p = src.at(offset, len)?;
    // SAFETY: the range is live device memory of the communicator's GPU, borrowed for the
    // call; on the root NCCL only reads it (in-place broadcast); the call returns after the
    // GPU finished.
    unsafe { comm.broadcast_raw(p, len, comm.rank(), deadline) }?;
    Ok(())
}

/// Broadcast, receiving side: receives `len` bytes from `root` into `dst` at `offset`.
pub(crate) fn broadcast_recv(
    comm: &NcclComm,
    dst: &mut SpanMut<'_>,
    offset: usize,
    len: usize,
    root: usize,
    deadline: Deadline,
) -> Result<(), MemError> {
    same_device(dst.ordinal, comm.device_ordinal())?;
    let p = dst.at(offset, len)?;
    // SAFETY: the range is live device memory of the communicator's GPU, borrowed
    // exclusively for the call, which returns after the GPU finished writing it.
    unsafe { comm.broadcast_raw(p, len, root, deadline) }?;
    Ok(())
}

/// Grouped broadcast, root side: sends `len` bytes of each `(src, offset, len)` to every
/// rank, as one NCCL group (one launch, one wait). The receivers pass the same lengths in the
/// same order. The ranges must not overlap; the caller has ordered earlier writes to them
/// before `comm`'s stream.
pub(crate) fn broadcast_many_send(
    comm: &NcclComm,
    parts: &[(Span<'_>, usize, usize)],
    deadline: Deadline,
) -> Result<(), MemError> {
    let mut bufs = Vec::with_capacity(parts.len());
    for (src, offset, len) in parts {
        same_device(src.ordinal, comm.device_ordinal())?;
        bufs.push((src.at(*offset, *len)?, *len));
    }
    disjoint(&bufs)?;
    // SAFETY: every range is live device memory of the communicator's GPU, borrowed for the
    // call (the spans' lifetimes), checked above to lie inside its span and not to overlap
    // another; on the root NCCL only reads them; the call returns after the GPU finished.
    unsafe { comm.broadcast_many_raw(&bufs, comm.rank(), deadline) }?;
    Ok(())
}

/// Grouped broadcast, receiving side: receives `len` bytes from `root` into each
/// `(dst, offset, len)`, as one NCCL group, matching the root's [`broadcast_many_send`].
pub(crate) fn broadcast_many_recv(
    comm: &NcclComm,
    parts: &mut [(SpanMut<'_>, usize, usize)],
    root: usize,
    deadline: Deadline,
) -> Result<(), MemError> {
    let mut bufs = Vec::with_capacity(parts.len());
    for (dst, offset, len) in parts.iter() {
        same_device(dst.ordinal, comm.device_ordinal())?;
        bufs.push((dst.at(*offset, *len)?, *len));
    }
    disjoint(&bufs)?;
    // SAFETY: every range is live device memory of the communicator's GPU, borrowed
    // exclusively for the call (`parts` holds the only writable spans), checked above to lie
    // inside its span and not to overlap another; the call returns after the GPU finished
    // writing them.
    unsafe { comm.broadcast_many_raw(&bufs, root, deadline) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_before_any_driver_call() {
        assert_eq!(checked(0x1000, 64, 0, 64), Ok(0x1000));
        assert_eq!(checked(0x1000, 64, 60, 4), Ok(0x103c));
        assert_eq!(checked(0x1000, 64, 64, 0), Ok(0x1040));
        assert_eq!(
            checked(0x1000, 64, 60, 5),
            Err(RangeError::OutOfBounds {
                offset: 60,
                len: 5,
                size: 64
            })
        );
        assert!(checked(0x1000, 64, usize::MAX, 2).is_err());
        assert!(same_device(1, 1).is_ok());
        // Overlap: touching ranges and empty ranges do not overlap.
        assert!(overlaps((0x1000, 16), (0x100f, 1)));
        assert!(overlaps((0x1008, 4), (0x1000, 64)));
        assert!(!overlaps((0x1000, 16), (0x1010, 16)));
        assert!(!overlaps((0x1000, 0), (0x1000, 16)));
        assert!(!overlaps((0x1004, 16), (0x1008, 0)));
        assert_eq!(disjoint(&[(0x2000, 8), (0x1000, 16), (0x1010, 8)]), Ok(()));
        assert_eq!(
            disjoint(&[(0x2000, 8), (0x1000, 16), (0x100c, 8)]),
            Err(RangeError::Overlap {
                first: 0x1000,
                first_len: 16,
                second: 0x100c,
                second_len: 8
            })
        );
        assert_eq!(
            same_device(0, 1),
            Err(RangeError::WrongDevice {
                memory: 0,
                engine: 1
            })
        );
    }
}
