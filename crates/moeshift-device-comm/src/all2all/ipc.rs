//! CUDA IPC for the one-sided workspace: device memory another process can map
//! ([`IpcRegion`]: `cuMemAlloc` + `cuIpcGetMemHandle`), and such a mapping
//! ([`PeerRegion`]: `cuIpcOpenMemHandle` / `cuIpcCloseMemHandle`).
//!
//! The region is allocated with `cuMemAlloc`, not through cudarc's stream-ordered pools:
//! memory from the default pool (`cuMemAllocAsync`) cannot be exported with
//! `cuIpcGetMemHandle`.

use std::mem::MaybeUninit;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr, CUipcMemHandle, CUipcMem_flags};
use cudarc::driver::{result, CudaContext, DriverError};

/// Bytes of an IPC memory handle.
pub(crate) const HANDLE_BYTES: usize = 64;

/// Device memory of this process, exportable to other processes of the node.
#[derive(Debug)]
pub(crate) struct IpcRegion {
    ctx: Arc<CudaContext>,
    ptr: CUdeviceptr,
    bytes: usize,
}

impl IpcRegion {
    /// Allocates `bytes` (at least 1) on `ctx`'s device.
    pub(crate) fn alloc(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, DriverError> {
        ctx.bind_to_thread()?;
        // SAFETY: the context is current; the memory is only handed out as an address and
        // freed once, on drop.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }?;
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
            bytes,
        })
    }

    /// Device address of the first byte.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The handle another process opens with [`PeerRegion::open`].
    pub(crate) fn handle(&self) -> Result<[u8; HANDLE_BYTES], DriverError> {
        self.ctx.bind_to_thread()?;
        let mut handle = MaybeUninit::<CUipcMemHandle>::uninit();
        // SAFETY: `ptr` is the base of a live `cuMemAlloc` allocation of this context and
        // `handle` is writable storage for one handle.
        unsafe { sys::cuIpcGetMemHandle(handle.as_mut_ptr(), self.ptr) }.result()?;
        // SAFETY: the call succeeded, so the handle is initialised.
        let handle = unsafe { handle.assume_init() };
        let mut out = [0u8; HANDLE_BYTES];
        for (o, &c) in out.iter_mut().zip(handle.reserved.iter()) {
            *o = c as u8;
        }
        Ok(out)
    }

    /// Bytes allocated.
    pub(crate) fn len(&self) -> usize {
        self.bytes
    }
}

impl Drop for IpcRegion {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated with `cuMemAlloc` in this context and freed exactly once; the
            // owner waits for its work on the region and for every peer to close its
            // mapping before dropping it.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// This process's mapping of another process's [`IpcRegion`].
#[derive(Debug)]
pub(crate) struct PeerRegion {
    ctx: Arc<CudaContext>,
    ptr: CUdeviceptr,
}

impl PeerRegion {
    /// Maps the region behind `handle` (from another process) into `ctx`, with peer access
    /// enabled so copies go GPU to GPU.
    pub(crate) fn open(ctx: &Arc<CudaContext>, handle: &[u8]) -> Result<Self, String> {
        let bytes: &[u8; HANDLE_BYTES] = handle.try_into().map_err(|_| {
            format!(
                "an IPC handle has {HANDLE_BYTES} bytes, the store holds {}",
                handle.len()
            )
        })?;
        ctx.bind_to_thread().map_err(|e| e.to_string())?;
        let mut raw = CUipcMemHandle {
            reserved: [0; HANDLE_BYTES],
        };
        for (r, &b) in raw.reserved.iter_mut().zip(bytes.iter()) {
            *r = b as _;
        }
        let mut ptr: CUdeviceptr = 0;
        // SAFETY: `raw` is a handle exported by `cuIpcGetMemHandle` in another process (a
        // garbage handle makes the call fail, not misbehave) and `ptr` receives the address.
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                raw,
                CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as std::ffi::c_uint,
            )
        }
        .result()
        .map_err(|e| format!("cuIpcOpenMemHandle: {e}"))?;
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
        })
    }

    /// Address of the peer's first byte in this process.
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for PeerRegion {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from `cuIpcOpenMemHandle` in this context and is closed
            // once; the owner waits for its copies into the region before dropping it.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.ptr) }.result();
        }
    }
}
