//! CUDA weights for the `nixl` backend (feature `cuda`): the GPU state of a communicator,
//! the check that peers on the node can READ a tensor through CUDA IPC, and
//! [`IpcCudaBuffer`], device memory that can be so read.
//!
//! NIXL's UCX backend moves GPU memory between processes of one node with UCX's `cuda_ipc`
//! transport, which maps the peer's allocation with a CUDA IPC handle. Only memory from
//! `cuMemAlloc` / `cudaMalloc` (what PyTorch's caching allocator hands out) has such a handle;
//! memory from a stream-ordered pool (`cuMemAllocAsync`, cudarc's default allocations) has
//! none unless its pool was made with fabric handles. Without RDMA (GPUDirect) there is then
//! no zero-copy path, so the backend refuses such weights when it is built, naming the
//! tensor, instead of letting READs fail or crawl later.

use std::sync::Arc;

use cudarc::driver::sys::{self, CUpointer_attribute};
use cudarc::driver::{result, CudaContext, CudaStream, DriverError};
use moeshift_sync::Deadline;
use moeshift_tensor::{cuda_available, CudaError, DType, Device, Storage, TensorView, ViewError};

use super::error::NixlError;
use crate::cuda_stage::memory::{driver_error, CopyQueue, DeviceBuffer};
use crate::error::EplbCommError;
use crate::staging::{Staging, StagingMemory};
use crate::weights::LayerWeights;

/// Bit of `CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES` for fabric handles
/// (`CU_MEM_HANDLE_TYPE_FABRIC`), the other kind of handle UCX's `cuda_ipc` can export.
const FABRIC_HANDLE: u64 = 0x8;

/// The GPU side of a NIXL communicator whose weights live on one GPU.
#[derive(Debug)]
pub(crate) struct NixlCuda {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    /// Local copies into staging.
    stream: Arc<CudaStream>,
    /// Commits of staged layers.
    commit_stream: Arc<CudaStream>,
}

impl NixlCuda {
    /// Opens GPU `ordinal` (its primary context, which NIXL and UCX also use) and two
    /// streams; `rank` names the errors.
    pub(crate) fn new(rank: usize, ordinal: usize) -> Result<Self, EplbCommError> {
        let cuda = |source| EplbCommError::Cuda {
            rank,
            layer: None,
            source,
        };
        let count = cuda_available().map_err(cuda)?;
        if ordinal >= count {
            return Err(cuda(CudaError::InvalidOrdinal { ordinal, count }));
        }
        let drv = |op: &str| {
            let op = format!("{op} on cuda:{ordinal}");
            move |e| driver_error(rank, None, op, e)
        };
        let ctx = CudaContext::new(ordinal).map_err(drv("creating a context"))?;
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let commit_stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        ctx.bind_to_thread()
            .map_err(drv("making the context current"))?;
        Ok(Self {
            ordinal,
            ctx,
            stream,
            commit_stream,
        })
    }

    /// The GPU.
    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Makes the GPU's context current on the calling thread: NIXL posts and progresses
    /// READs into device memory on it.
    pub(crate) fn bind(&self, rank: usize, layer: Option<usize>) -> Result<(), EplbCommError> {
        self.ctx.bind_to_thread().map_err(|e| {
            driver_error(
                rank,
                layer,
                format!("making the context of cuda:{} current", self.ordinal),
                e,
            )
        })
    }

    /// One landing slot: `len` bytes of device memory from `cuMemAlloc`, committed on the
    /// commit stream.
    pub(crate) fn landing_slot(
        &self,
        rank: usize,
        layer: usize,
        len: usize,
    ) -> Result<StagingMemory, EplbCommError> {
        let buf = DeviceBuffer::shareable(&self.ctx, len).map_err(|e| {
            driver_error(
                rank,
                Some(layer),
                format!(
                    "allocating {len} bytes of landing area on cuda:{}",
                    self.ordinal
                ),
                e,
            )
        })?;
        Ok(StagingMemory::Device {
            buf,
            commit_stream: Arc::clone(&self.commit_stream),
        })
    }

    /// Checks that tensor `tensor` of layer `layer`, whose rows start at `addr`, is device
    /// memory of this GPU that peers on the node can READ through CUDA IPC. `rdma` says
    /// that RDMA devices (and UCX's modules for them) exist here, in which case memory
    /// without IPC handles is left to them.
    pub(crate) fn check_readable(
        &self,
        rank: usize,
        layer: usize,
        tensor: &str,
        addr: u64,
        rdma: bool,
    ) -> Result<(), EplbCommError> {
        self.bind(rank, Some(layer))?;
        let unsupported = |detail: String| -> EplbCommError {
            NixlError::Unsupported {
                rank,
                layer,
                tensor: tensor.to_string(),
                detail,
            }
            .into()
        };
        let facts = pointer_facts(addr).map_err(|e| {
            unsupported(format!(
                "the rows at {addr:#x} are not CUDA device memory of this process ({e})"
            ))
        })?;
        if facts.memory_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
            return Err(unsupported(format!(
                "the rows at {addr:#x} are not CUDA device memory (CUDA memory type {})",
                facts.memory_type
            )));
        }
        if usize::try_from(facts.ordinal).ok() != Some(self.ordinal) {
            return Err(unsupported(format!(
                "the rows at {addr:#x} are on cuda:{}, the weights are declared on cuda:{}",
                facts.ordinal, self.ordinal
            )));
        }
        if facts.legacy_ipc || facts.handle_types & FABRIC_HANDLE != 0 || rdma {
            return Ok(());
        }
        Err(unsupported(format!(
            "the rows at {addr:#x} come from a stream-ordered memory pool (cuMemAllocAsync) \
             without shareable handles, so peers on this node cannot READ them through CUDA IPC \
             (UCX cuda_ipc) and this machine has no RDMA device; allocate the expert weights \
             with cuMemAlloc/cudaMalloc (as PyTorch's caching allocator does, or with \
             moeshift_eplb_comm::nixl::IpcCudaBuffer)"
        )))
    }

    /// Queues the local copies of a layer staged in device memory: for each `(staged row,
    /// source row)` the source row of every tensor into the staged row. Returns the queue;
    /// the caller waits for it (or settles it) before the staging is used or released.
    pub(crate) fn queue_local_copies(
        &self,
        rank: usize,
        layer: usize,
        weights: &LayerWeights<'_>,
        staging: &mut Staging,
        copies: &[(usize, usize)],
    ) -> Result<CopyQueue<'_>, EplbCommError> {
        let queue = CopyQueue::new(&self.stream, rank, layer)?;
        let queued = (|| {
            for &(index, src_row) in copies {
                for t in 0..weights.num_tensors() {
                    let at = staging
                        .tensor_range(index, t)
                        .map(|r| r.start)
                        .ok_or_else(|| EplbCommError::PlanMismatch {
                            rank,
                            layer,
                            detail: format!(
                                "inconsistent staging: staged row {index} has no room for tensor {t}"
                            ),
                        })?;
                    let StagingMemory::Device { buf, .. } = staging.memory_mut() else {
                        return Err(EplbCommError::PlanMismatch {
                            rank,
                            layer,
                            detail: "inconsistent staging: device weights staged outside device \
                                     memory"
                                .into(),
                        });
                    };
                    queue.row_to_buffer(weights, t, src_row, buf, at)?;
                }
            }
            Ok(())
        })();
        match queued {
            Ok(()) => Ok(queue),
            Err(e) => {
                queue.settle();
                Err(e)
            }
        }
    }
}

/// Waits for local copies queued by [`NixlCuda::queue_local_copies`], or, when `failed`,
/// only lets them finish (bounded) so the staging can be released.
pub(crate) fn finish_copies(
    queue: &CopyQueue<'_>,
    deadline: Deadline,
    failed: bool,
) -> Result<(), EplbCommError> {
    if failed {
        queue.settle();
        return Ok(());
    }
    queue.wait(deadline, "staging local copies")
}

/// What the driver says about a device address.
struct PointerFacts {
    memory_type: u32,
    ordinal: i32,
    legacy_ipc: bool,
    /// Allowed shareable handle types; only asked for memory without a legacy IPC handle
    /// (0 when the driver does not say).
    handle_types: u64,
}

/// Reads one pointer attribute of `addr` into `value`.
///
/// # Safety
///
/// `T` must be at least as large as what the driver writes for `attribute`.
unsafe fn pointer_attribute<T>(
    value: &mut T,
    attribute: CUpointer_attribute,
    addr: u64,
) -> Result<(), DriverError> {
    // SAFETY: `value` is a live, writable local of a size the caller vouches for; an address
    // unknown to CUDA makes the call fail, it reads no memory.
    unsafe { sys::cuPointerGetAttribute((value as *mut T).cast(), attribute, addr) }.result()
}

/// Queries the driver about `addr` (a context must be current).
fn pointer_facts(addr: u64) -> Result<PointerFacts, DriverError> {
    let mut memory_type: u32 = 0;
    let mut ordinal: i32 = -1;
    let mut legacy: u32 = 0;
    let mut handle_types: u64 = 0;
    // SAFETY: the memory type is an unsigned int, the ordinal an int, the IPC capability a
    // boolean (at most an int): each local is at least that large.
    unsafe {
        pointer_attribute(
            &mut memory_type,
            CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            addr,
        )?;
        pointer_attribute(
            &mut ordinal,
            CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            addr,
        )?;
        pointer_attribute(
            &mut legacy,
            CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
            addr,
        )?;
    }
    if legacy == 0 {
        // SAFETY: the handle types are a 64-bit mask. A driver that cannot tell leaves 0:
        // no shareable handle.
        let asked = unsafe {
            pointer_attribute(
                &mut handle_types,
                CUpointer_attribute::CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES,
                addr,
            )
        };
        if asked.is_err() {
            handle_types = 0;
        }
    }
    Ok(PointerFacts {
        memory_type,
        ordinal,
        legacy_ipc: legacy != 0,
        handle_types,
    })
}

/// Device memory that peers on the same node can READ through NIXL: allocated with
/// `cuMemAlloc` (not from a stream-ordered pool), so CUDA IPC can share it, as it can
/// memory from `cudaMalloc` or PyTorch's caching allocator. Use it for expert weights the
/// `nixl` backend serves when nothing else owns them (tests, benchmarks, tools).
///
/// Copies to and from the host are blocking; the buffer is freed when dropped, once the
/// GPU is idle. Describe it as weights with [`view`](Self::view) and
/// [`LayerWeightsBuilder::raw`](crate::LayerWeightsBuilder::raw).
///
/// ```no_run
/// use moeshift_eplb_comm::nixl::IpcCudaBuffer;
/// use moeshift_eplb_comm::LayerWeights;
/// use moeshift_tensor::DType;
///
/// let buf = IpcCudaBuffer::from_host(0, &[7u8; 4 * 64])?;
/// // SAFETY: `buf` outlives the weights and nothing else touches it meanwhile.
/// let weights = unsafe { LayerWeights::builder().raw("w2", buf.view(&[4, 64], DType::U8)?) }?
///     .build()?;
/// assert_eq!(weights.num_rows(), 4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct IpcCudaBuffer {
    buf: DeviceBuffer,
    ctx: Arc<CudaContext>,
}

impl IpcCudaBuffer {
    /// `len` zeroed bytes on GPU `ordinal`.
    ///
    /// Errors: CUDA unusable ([`cuda_available`]'s errors), [`CudaError::InvalidOrdinal`],
    /// and `CudaError::Driver` for failed context creation, allocation or zeroing.
    pub fn zeroed(ordinal: usize, len: usize) -> Result<Self, CudaError> {
        let count = cuda_available()?;
        if ordinal >= count {
            return Err(CudaError::InvalidOrdinal { ordinal, count });
        }
        let drv = |op: String| move |source| CudaError::Driver { op, source };
        let ctx = CudaContext::new(ordinal)
            .map_err(drv(format!("creating a context on cuda:{ordinal}")))?;
        let buf = DeviceBuffer::shareable(&ctx, len)
            .map_err(drv(format!("allocating {len} bytes on cuda:{ordinal}")))?;
        let out = Self { buf, ctx };
        if len > 0 {
            out.bind("zeroing")?;
            // SAFETY: the context is current and `addr .. addr + len` is this buffer's own
            // live allocation.
            unsafe { result::memset_d8_sync(out.buf.addr(), 0, len) }
                .map_err(|e| out.driver_error("zeroing", e))?;
            out.synchronize("zeroing")?;
        }
        Ok(out)
    }

    /// A buffer on GPU `ordinal` holding a copy of `bytes`.
    pub fn from_host(ordinal: usize, bytes: &[u8]) -> Result<Self, CudaError> {
        let mut buf = Self::zeroed(ordinal, bytes.len())?;
        buf.copy_from_host(bytes)?;
        Ok(buf)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GPU.
    pub fn ordinal(&self) -> usize {
        self.buf.ordinal()
    }

    /// Device address of the first byte (0 for an empty buffer).
    pub fn addr(&self) -> u64 {
        self.buf.addr()
    }

    /// Copies `src` (exactly [`len`](Self::len) bytes) into the buffer and waits until the
    /// bytes are in device memory.
    pub fn copy_from_host(&mut self, src: &[u8]) -> Result<(), CudaError> {
        self.check_len("copy to device", src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.bind("copy to device")?;
        // SAFETY: the context is current; the destination is this buffer's whole live
        // allocation, exactly `src.len()` bytes (checked above).
        unsafe { result::memcpy_htod_sync(self.buf.addr(), src) }
            .map_err(|e| self.driver_error("copy to device", e))?;
        // A copy from pageable memory may return before the DMA finished.
        self.synchronize("copy to device")
    }

    /// Copies the buffer into `dst` (exactly [`len`](Self::len) bytes), after the work
    /// queued on the GPU so far.
    pub fn copy_to_host(&self, dst: &mut [u8]) -> Result<(), CudaError> {
        self.check_len("copy to host", dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        self.synchronize("copy to host")?;
        // SAFETY: the context is current (bound by `synchronize`); the source is this
        // buffer's whole live allocation, exactly `dst.len()` bytes (checked above).
        unsafe { result::memcpy_dtoh_sync(dst, self.buf.addr()) }
            .map_err(|e| self.driver_error("copy to host", e))
    }

    /// The buffer's bytes, copied to a new vector.
    pub fn to_vec(&self) -> Result<Vec<u8>, CudaError> {
        let mut out = vec![0; self.len()];
        self.copy_to_host(&mut out)?;
        Ok(out)
    }

    /// The buffer as storage of `dtype` elements (a partial trailing element is left out).
    pub fn storage(&self, dtype: DType) -> Storage {
        Storage::new(
            self.addr(),
            self.len() / dtype.size_bytes(),
            dtype,
            Device::Cuda(self.ordinal()),
        )
    }

    /// A row-major contiguous view of `shape` at the start of the buffer. The view is a
    /// descriptor and does not keep the buffer alive.
    pub fn view(&self, shape: &[usize], dtype: DType) -> Result<TensorView, ViewError> {
        TensorView::contiguous(self.storage(dtype), shape)
    }

    fn check_len(&self, op: &'static str, host_len: usize) -> Result<(), CudaError> {
        if host_len == self.len() {
            Ok(())
        } else {
            Err(CudaError::LengthMismatch {
                op,
                ordinal: self.ordinal(),
                host_len,
                device_len: self.len(),
            })
        }
    }

    fn bind(&self, what: &str) -> Result<(), CudaError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| self.driver_error(what, e))
    }

    fn synchronize(&self, what: &str) -> Result<(), CudaError> {
        self.bind(what)?;
        self.ctx
            .synchronize()
            .map_err(|e| self.driver_error(what, e))
    }

    fn driver_error(&self, what: &str, source: DriverError) -> CudaError {
        CudaError::Driver {
            op: format!("{what} on cuda:{}", self.ordinal()),
            source,
        }
    }
}
