//! Checked layer over `cudarc::nccl::sys`: each NCCL function moeshift uses, returning
//! [`Progress`] or a [`CallError`] that names the call, with NCCL's own error strings.
//!
//! Only this module and [`super::comm`] call into NCCL. The functions here do no bookkeeping;
//! the safe communicator decides when to poll, wait and abort.

use std::ffi::{c_int, c_void, CStr};
use std::mem::MaybeUninit;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::nccl::sys::{
    self, cudaStream_t, ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclResult_t,
    ncclUniqueId,
};

use super::{NcclError, NcclVersion};

/// What a successful NCCL call says about its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The call finished (`ncclSuccess`).
    Done,
    /// A non-blocking communicator is still working (`ncclInProgress`); poll
    /// [`async_error`] until it reports something else.
    InProgress,
}

/// A failed NCCL call: which function, and the `ncclResult_t` it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallError {
    /// The NCCL function name.
    pub call: &'static str,
    /// What it returned.
    pub code: ncclResult_t,
}

impl CallError {
    /// The public error, with NCCL's description of the code and the context the caller knows.
    pub fn into_error(
        self,
        rank: Option<usize>,
        peers: Vec<usize>,
        last_error: String,
    ) -> NcclError {
        NcclError::Call {
            call: self.call,
            rank,
            peers,
            code: self.code,
            message: error_string(self.code),
            last_error,
        }
    }
}

/// Maps a returned code to [`Progress`] or a [`CallError`] for `call`.
pub fn check(call: &'static str, code: ncclResult_t) -> Result<Progress, CallError> {
    match code {
        ncclResult_t::ncclSuccess => Ok(Progress::Done),
        ncclResult_t::ncclInProgress => Ok(Progress::InProgress),
        code => Err(CallError { call, code }),
    }
}

/// `ncclGetVersion`.
pub fn version() -> Result<NcclVersion, CallError> {
    let mut code: c_int = 0;
    // SAFETY: `code` is a valid out-pointer for the duration of the call.
    check("ncclGetVersion", unsafe { sys::ncclGetVersion(&mut code) })?;
    Ok(NcclVersion::from_code(code))
}

/// `ncclGetUniqueId`.
pub fn unique_id() -> Result<ncclUniqueId, CallError> {
    let mut id = MaybeUninit::<ncclUniqueId>::uninit();
    // SAFETY: NCCL writes the whole 128-byte id through the out-pointer on success.
    check("ncclGetUniqueId", unsafe {
        sys::ncclGetUniqueId(id.as_mut_ptr())
    })?;
    // SAFETY: the call succeeded, so the id was written.
    Ok(unsafe { id.assume_init() })
}

/// `ncclGetErrorString`: NCCL's one-line description of a result code.
pub fn error_string(code: ncclResult_t) -> String {
    // SAFETY: NCCL returns a pointer to a static NUL-terminated string for every code.
    let ptr = unsafe { sys::ncclGetErrorString(code) };
    if ptr.is_null() {
        return format!("{code:?}");
    }
    // SAFETY: non-null pointers from ncclGetErrorString point to static C strings.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// `ncclGetLastError`: NCCL's last detailed error message (for `comm`, or the thread's last
/// one when `comm` is null); empty when there is none.
///
/// # Safety
/// `comm` must be null or a communicator that has not been destroyed or aborted.
pub unsafe fn last_error(comm: ncclComm_t) -> String {
    // SAFETY: guaranteed by the caller; NCCL accepts a null communicator here.
    let ptr = unsafe { sys::ncclGetLastError(comm) };
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: NCCL returns a NUL-terminated string that lives until the next NCCL call.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .trim()
        .to_owned()
}

/// `ncclCommInitRankConfig`. Returns the communicator handle even when the call is still in
/// progress (non-blocking config); on error, a non-null handle must still be aborted.
///
/// # Safety
/// The CUDA context of the intended device must be current on this thread, and `config` must
/// stay valid until the call returns.
pub unsafe fn comm_init_rank_config(
    world: c_int,
    id: ncclUniqueId,
    rank: c_int,
    config: &mut ncclConfig_t,
) -> (ncclComm_t, Result<Progress, CallError>) {
    let mut comm: ncclComm_t = std::ptr::null_mut();
    // SAFETY: `comm` and `config` are valid pointers for the call; the caller guarantees the
    // device context.
    let code = unsafe { sys::ncclCommInitRankConfig(&mut comm, world, id, rank, config) };
    (comm, check("ncclCommInitRankConfig", code))
}

/// `ncclCommSplit` of `comm` into the communicator of the ranks that pass the same `color`,
/// ordered by `key`, with `config`. NCCL writes the new handle into `*newcomm` once the split
/// finished, which for a non-blocking `comm` is after this call returned (poll
/// [`async_error`] on `comm`).
///
/// # Safety
/// `comm` must be a live communicator whose device context is current on this thread;
/// `newcomm` must stay valid, and not be read non-atomically, until the split finished or
/// `comm` was aborted; `config` must stay valid until the call returns.
pub unsafe fn comm_split(
    comm: ncclComm_t,
    color: c_int,
    key: c_int,
    newcomm: *mut ncclComm_t,
    config: &mut ncclConfig_t,
) -> Result<Progress, CallError> {
    // SAFETY: guaranteed by the caller.
    check("ncclCommSplit", unsafe {
        sys::ncclCommSplit(comm, color, key, newcomm, config)
    })
}

/// `ncclCommGetAsyncError`: the communicator's state — `ncclSuccess`, `ncclInProgress`, or the
/// error an earlier asynchronous call hit.
///
/// # Safety
/// `comm` must be a live communicator (not destroyed or aborted).
pub unsafe fn async_error(comm: ncclComm_t) -> Result<ncclResult_t, CallError> {
    let mut state = ncclResult_t::ncclSuccess;
    // SAFETY: `state` is a valid out-pointer; the caller guarantees `comm`.
    check("ncclCommGetAsyncError", unsafe {
        sys::ncclCommGetAsyncError(comm, &mut state)
    })?;
    Ok(state)
}

/// `ncclCommAbort`: stops every operation of `comm` (kernels included) and frees it.
///
/// # Safety
/// `comm` must be a live communicator; it must not be used afterwards.
pub unsafe fn comm_abort(comm: ncclComm_t) -> Result<Progress, CallError> {
    // SAFETY: guaranteed by the caller.
    check("ncclCommAbort", unsafe { sys::ncclCommAbort(comm) })
}

/// `ncclCommFinalize`: flushes outstanding work; completion is polled with [`async_error`].
///
/// # Safety
/// `comm` must be a live communicator that has not been finalized.
pub unsafe fn comm_finalize(comm: ncclComm_t) -> Result<Progress, CallError> {
    // SAFETY: guaranteed by the caller.
    check("ncclCommFinalize", unsafe { sys::ncclCommFinalize(comm) })
}

/// `ncclCommDestroy`: frees a (finalized) communicator.
///
/// # Safety
/// `comm` must be a live communicator; it must not be used afterwards.
pub unsafe fn comm_destroy(comm: ncclComm_t) -> Result<Progress, CallError> {
    // SAFETY: guaranteed by the caller.
    check("ncclCommDestroy", unsafe { sys::ncclCommDestroy(comm) })
}

/// `ncclGroupStart`.
pub fn group_start() -> Result<Progress, CallError> {
    // SAFETY: ncclGroupStart only increments a thread-local depth counter.
    check("ncclGroupStart", unsafe { sys::ncclGroupStart() })
}

/// `ncclGroupEnd`: launches the operations queued since the matching [`group_start`].
pub fn group_end() -> Result<Progress, CallError> {
    // SAFETY: ncclGroupEnd has no pointer arguments; a call without an open group returns an
    // error code instead of misbehaving.
    check("ncclGroupEnd", unsafe { sys::ncclGroupEnd() })
}

/// `ncclSend` of `bytes` bytes from device address `src` to `peer`.
///
/// # Safety
/// `src..src+bytes` must be device memory readable until the operation completes on
/// `stream`; `comm` must be live and `stream` must belong to its device.
pub unsafe fn send(
    src: CUdeviceptr,
    bytes: usize,
    peer: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> Result<Progress, CallError> {
    // SAFETY: guaranteed by the caller.
    check("ncclSend", unsafe {
        sys::ncclSend(
            src as *const c_void,
            bytes,
            ncclDataType_t::ncclUint8,
            peer,
            comm,
            stream,
        )
    })
}

/// `ncclRecv` of `bytes` bytes from `peer` into device address `dst`.
///
/// # Safety
/// `dst..dst+bytes` must be device memory writable, and not accessed by anything else, until
/// the operation completes on `stream`; `comm` must be live and `stream` on its device.
pub unsafe fn recv(
    dst: CUdeviceptr,
    bytes: usize,
    peer: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> Result<Progress, CallError> {
    // SAFETY: guaranteed by the caller.
    check("ncclRecv", unsafe {
        sys::ncclRecv(
            dst as *mut c_void,
            bytes,
            ncclDataType_t::ncclUint8,
            peer,
            comm,
            stream,
        )
    })
}

/// In-place `ncclBroadcast` of `bytes` bytes at `buf` from `root`.
///
/// # Safety
/// As for [`recv`], for `buf..buf+bytes`.
pub unsafe fn broadcast(
    buf: CUdeviceptr,
    bytes: usize,
    root: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> Result<Progress, CallError> {
    // SAFETY: guaranteed by the caller; in-place broadcast passes the same buffer twice.
    check("ncclBroadcast", unsafe {
        sys::ncclBroadcast(
            buf as *const c_void,
            buf as *mut c_void,
            bytes,
            ncclDataType_t::ncclUint8,
            root,
            comm,
            stream,
        )
    })
}

/// In-place `ncclAllReduce` of `count` elements of `dtype` at `buf`.
///
/// # Safety
/// As for [`recv`], for `count` elements of `dtype` at `buf`.
pub unsafe fn all_reduce(
    buf: CUdeviceptr,
    count: usize,
    dtype: ncclDataType_t,
    op: ncclRedOp_t,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> Result<Progress, CallError> {
    // SAFETY: guaranteed by the caller; in-place all-reduce passes the same buffer twice.
    check("ncclAllReduce", unsafe {
        sys::ncclAllReduce(
            buf as *const c_void,
            buf as *mut c_void,
            count,
            dtype,
            op,
            comm,
            stream,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_maps_success_progress_and_errors() {
        assert_eq!(check("x", ncclResult_t::ncclSuccess), Ok(Progress::Done));
        assert_eq!(
            check("x", ncclResult_t::ncclInProgress),
            Ok(Progress::InProgress)
        );
        assert_eq!(
            check("ncclSend", ncclResult_t::ncclInvalidArgument),
            Err(CallError {
                call: "ncclSend",
                code: ncclResult_t::ncclInvalidArgument
            })
        );
    }
}
