//! What the CUDA managers share: their input type [`CudaTokens`], the calling context that
//! names ranks in errors, the per-manager engine (kernels, side stream, call counter), the
//! one-upload staging of host tables, waits with deadlines, the header exchange over NCCL
//! and the checks of a rank's batch.
//!
//! # Data path
//!
//! Token rows (bf16, f16 or f32, handled as raw bytes) stay on the GPU: they move between
//! ranks through NCCL (or, for the one-sided manager, `cuMemcpyDtoDAsync` into CUDA IPC
//! mappings), are gathered and reduced by this crate's own kernels, and the combined rows
//! are written by a kernel on the manager's stream. The tables of a dispatch are built on
//! the GPU ([`super::cuda_tables`]) and the router output never reaches the host: every
//! manager routes each pick with its own kernels; the all-to-all-v and one-sided managers
//! also split the batch by destination and lay out the returned rows there, so that only the
//! per-destination row counts and the routing error word reach the host (with the header
//! exchange, or in one small copy for one-sided, which sizes its writes to the peers by
//! them); on the receiving side every manager sorts the received picks into work items on
//! the GPU and copies them to the host once (for
//! [`CudaDispatched::items`](super::CudaDispatched::items)). The EPLB load hook counts picks
//! per physical slot with an atomic add kernel on the manager's stream, with no host
//! synchronisation of its own.
//!
//! # Host copies
//!
//! Tables go to the GPU and results come back through page-locked buffers that each
//! manager keeps ([`HostIo`]): a table upload is one copy into the buffer and one
//! asynchronous host-to-device copy, a download is one or more asynchronous device-to-host
//! copies and one wait (polled, with the call's deadline). A buffer is refilled only once
//! the copy that last used it is done (an event recorded after each copy says so).

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{
    result, CudaContext, CudaEvent, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut,
    DeviceSlice, DriverError, PinnedHostSlice,
};
use moeshift_sync::Deadline;
use moeshift_tensor::DType;

use super::cuda_error::CudaAll2AllError;
use super::cuda_wire::{check_headers, DeviceHeader, HeaderErrors};
use super::error::All2AllError;
use super::kernels::{Elem, Kernels, LaunchError};
use super::placement::ExpertPlacement;
use super::replica::MAX_TOP_K;
use super::table_kernels::TableKernels;
use crate::error::RankRef;
use crate::nccl::{NcclComm, NcclError};

/// One rank's routed tokens on its GPU: hidden-state rows (`num_tokens × hidden_size`
/// elements of `dtype`, row-major, as bytes) with the router's top-k logical expert ids
/// (32-bit) and weights (`f32`), row-major `num_tokens × top_k` each.
///
/// Building one checks nothing; dispatch checks shapes, the element type (bf16, f16 or
/// f32), the device and the ids, and reports errors that name the rank, the layer, the
/// token and the pick.
#[derive(Debug)]
pub struct CudaTokens<'a> {
    pub(crate) hidden: CudaView<'a, u8>,
    pub(crate) dtype: DType,
    pub(crate) hidden_size: usize,
    pub(crate) topk_ids: CudaView<'a, u32>,
    pub(crate) topk_weights: CudaView<'a, f32>,
    pub(crate) top_k: usize,
}

impl<'a> CudaTokens<'a> {
    /// Tokens from device views: `hidden` holds `num_tokens × hidden_size` elements of
    /// `dtype`; `topk_ids` and `topk_weights` hold `num_tokens × top_k` entries;
    /// `num_tokens` is `topk_ids.len() / top_k`.
    pub fn new(
        hidden: CudaView<'a, u8>,
        dtype: DType,
        hidden_size: usize,
        topk_ids: CudaView<'a, u32>,
        topk_weights: CudaView<'a, f32>,
        top_k: usize,
    ) -> Self {
        Self {
            hidden,
            dtype,
            hidden_size,
            topk_ids,
            topk_weights,
            top_k,
        }
    }

    /// Number of tokens (`topk_ids.len() / top_k`; 0 when `top_k` is 0).
    pub fn num_tokens(&self) -> usize {
        self.topk_ids.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// Elements per row.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Element type of the rows.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// The element kernels use for `dtype`, and its code in headers.
pub(crate) fn elem_of(dtype: DType) -> Option<(Elem, u8)> {
    match dtype {
        DType::Bf16 => Some((Elem::Bf16, 1)),
        DType::F16 => Some((Elem::F16, 2)),
        DType::F32 => Some((Elem::F32, 3)),
        _ => None,
    }
}

/// The rank, manager, operation and layer of one call: names ranks in errors.
pub(crate) struct Call<'c> {
    pub comm: &'c NcclComm,
    pub manager: &'static str,
    pub op: &'static str,
    pub layer: usize,
    /// Global rank of each group rank (empty: the same numbers).
    pub globals: &'c [usize],
    /// Where the call's steps add their host wall time (see [`Call::mark`]).
    pub clock: Option<&'c PhaseClock>,
    /// The manager's page-locked copy buffers (without them, copies go through pageable
    /// memory).
    pub host: Option<&'c HostIo>,
    /// When the previous step ended.
    pub since: Cell<Instant>,
}

/// Host wall time a manager's calls spent in each named step, summed over calls.
#[derive(Debug, Default)]
pub(crate) struct PhaseClock {
    /// `((operation, step), total)`.
    totals: RefCell<Vec<((&'static str, &'static str), Duration)>>,
}

impl PhaseClock {
    fn add(&self, key: (&'static str, &'static str), time: Duration) {
        let mut totals = self.totals.borrow_mut();
        match totals.iter_mut().find(|(k, _)| *k == key) {
            Some((_, total)) => *total += time,
            None => totals.push((key, time)),
        }
    }

    /// The totals as `("<operation>: <step>", time)`, in the order steps were first seen.
    pub(crate) fn totals(&self) -> Vec<(String, Duration)> {
        self.totals
            .borrow()
            .iter()
            .map(|((op, step), t)| (format!("{op}: {step}"), *t))
            .collect()
    }

    /// Forgets every total.
    pub(crate) fn reset(&self) {
        self.totals.borrow_mut().clear();
    }
}

impl<'c> Call<'c> {
    /// Ends step `step` of this call: adds the time since the previous step ended (or the
    /// call began) to the manager's total for `step`, as `"<op> <step>"`.
    pub(crate) fn mark(&self, step: &'static str) {
        let now = Instant::now();
        if let Some(clock) = self.clock {
            clock.add(
                (self.op, step),
                now.saturating_duration_since(self.since.get()),
            );
        }
        self.since.set(now);
    }

    pub(crate) fn me(&self) -> RankRef {
        self.peer(self.comm.rank())
    }

    pub(crate) fn peer(&self, r: usize) -> RankRef {
        RankRef {
            local: r,
            global: self.globals.get(r).copied().unwrap_or(r),
        }
    }

    pub(crate) fn device(&self) -> usize {
        self.comm.device_ordinal()
    }

    pub(crate) fn cuda(&self, call: &'static str) -> impl FnOnce(DriverError) -> CudaAll2AllError {
        let (rank, device, manager, op, layer) =
            (self.me(), self.device(), self.manager, self.op, self.layer);
        move |source| CudaAll2AllError::Cuda {
            rank,
            device,
            manager,
            op,
            layer,
            call,
            source,
        }
    }

    pub(crate) fn nccl(&self) -> impl FnOnce(NcclError) -> CudaAll2AllError {
        let (rank, manager, op, layer) = (self.me(), self.manager, self.op, self.layer);
        move |source| CudaAll2AllError::Nccl {
            rank,
            manager,
            op,
            layer,
            source: Box::new(source),
        }
    }

    pub(crate) fn launch(
        &self,
        kernel: &'static str,
    ) -> impl FnOnce(LaunchError) -> CudaAll2AllError {
        let (rank, device, manager, op, layer) =
            (self.me(), self.device(), self.manager, self.op, self.layer);
        move |e| match e {
            LaunchError::Driver(source) => CudaAll2AllError::Cuda {
                rank,
                device,
                manager,
                op,
                layer,
                call: kernel,
                source,
            },
            LaunchError::TooLarge { what, value } => CudaAll2AllError::TooLarge {
                rank,
                manager,
                op,
                layer,
                what,
                value,
            },
        }
    }

    pub(crate) fn too_large(&self, what: &'static str, value: usize) -> CudaAll2AllError {
        CudaAll2AllError::TooLarge {
            rank: self.me(),
            manager: self.manager,
            op: self.op,
            layer: self.layer,
            what,
            value,
        }
    }

    /// Pick `k` of token `token` names `expert`, which `placement` does not know.
    pub(crate) fn unknown_expert(
        &self,
        placement: &ExpertPlacement,
        (token, k, expert): (usize, usize, u32),
    ) -> CudaAll2AllError {
        All2AllError::UnknownExpert {
            rank: self.me(),
            manager: self.manager,
            layer: self.layer,
            token,
            k,
            expert,
            num_logical: placement.num_logical(),
        }
        .into()
    }

    pub(crate) fn tokens(&self, detail: String) -> CudaAll2AllError {
        All2AllError::Tokens {
            rank: self.me(),
            manager: self.manager,
            layer: self.layer,
            detail,
        }
        .into()
    }

    pub(crate) fn malformed(&self, peer: usize, detail: String) -> CudaAll2AllError {
        All2AllError::Malformed {
            rank: self.me(),
            peer: self.peer(peer),
            manager: self.manager,
            op: self.op,
            layer: self.layer,
            detail,
        }
        .into()
    }

    pub(crate) fn mismatch_error(
        &self,
        peer: usize,
        field: &'static str,
        ours: u64,
        theirs: u64,
    ) -> CudaAll2AllError {
        HeaderErrors::mismatch(self, peer, field, ours, theirs).into()
    }

    /// Waits (polling, with the deadline) until the work queued on `stream` so far is done.
    pub(crate) fn wait(
        &self,
        stream: &CudaStream,
        what: &'static str,
        deadline: Deadline,
    ) -> Result<(), CudaAll2AllError> {
        let event = stream
            .record_event(None)
            .map_err(self.cuda("cuEventRecord"))?;
        self.wait_event(&event, what, deadline)
    }

    /// Waits (polling, with the deadline) until the work recorded in `event` is done.
    pub(crate) fn wait_event(
        &self,
        event: &CudaEvent,
        what: &'static str,
        deadline: Deadline,
    ) -> Result<(), CudaAll2AllError> {
        let started = Instant::now();
        let mut polls = 0u32;
        loop {
            if event.try_is_complete().map_err(self.cuda("cuEventQuery"))? {
                return Ok(());
            }
            if deadline.is_expired() {
                return Err(CudaAll2AllError::Timeout {
                    rank: self.me(),
                    device: self.device(),
                    manager: self.manager,
                    op: self.op,
                    layer: self.layer,
                    what,
                    waited: started.elapsed(),
                });
            }
            polls = polls.saturating_add(1);
            if polls < 4096 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Copies the device ranges `srcs` (`(address, bytes)`, after the work queued on
    /// `stream` so far) to the host, back to back, waits for them (`what`, with the
    /// deadline) and hands the bytes to `f`. Nothing is copied or waited for when the
    /// ranges are empty.
    ///
    /// # Safety
    /// Every range is device memory of this context that stays alive, and that no other
    /// work writes, until this returns.
    pub(crate) unsafe fn download_with<R>(
        &self,
        stream: &Arc<CudaStream>,
        srcs: &[(u64, usize)],
        what: &'static str,
        deadline: Deadline,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, CudaAll2AllError> {
        let total = srcs
            .iter()
            .fold(0usize, |sum, &(_, len)| sum.saturating_add(len));
        if total > MAX_HOST_BYTES {
            return Err(self.too_large("bytes to copy to the host", total));
        }
        if total == 0 {
            return Ok(f(&[]));
        }
        let pinned = self.host.and_then(|io| io.download.try_borrow_mut().ok());
        let Some(mut pinned) = pinned else {
            // Pageable memory: each copy returns once it is done.
            self.wait(stream, what, deadline)?;
            let mut out = vec![0u8; total];
            let mut at = 0usize;
            for &(src, len) in srcs {
                if let Some(dst) = out.get_mut(at..at + len) {
                    // SAFETY: `src..src + len` is live device memory (the caller's
                    // contract) and `dst` holds `len` bytes.
                    unsafe { result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }
                        .map_err(self.cuda("cuMemcpyDtoHAsync"))?;
                }
                at += len;
            }
            return Ok(f(&out));
        };
        let host = pinned.ready(self, stream, total, deadline)?;
        let mut at = 0usize;
        for &(src, len) in srcs {
            if let Some(dst) = host.get_mut(at..at + len) {
                // SAFETY: `dst` is page-locked memory of `len` bytes that nothing reads or
                // writes until the event recorded below completes (`ready` waits for it
                // before the buffer is used again, and a buffer dropped before it completes
                // is leaked, never freed); `src..src + len` is live device memory (the
                // caller's contract).
                unsafe { result::memcpy_dtoh_async(dst, src, stream.cu_stream()) }
                    .map_err(self.cuda("cuMemcpyDtoHAsync"))?;
            }
            at += len;
        }
        pinned.record(self, stream)?;
        pinned.wait(self, what, deadline)?;
        let bytes = pinned.filled(self, total)?;
        Ok(f(bytes))
    }
}

impl HeaderErrors for Call<'_> {
    fn rejected(&self, peer: usize) -> All2AllError {
        All2AllError::PeerRejected {
            rank: self.me(),
            peer: self.peer(peer),
            manager: self.manager,
            op: self.op,
            layer: self.layer,
        }
    }

    fn mismatch(&self, peer: usize, field: &'static str, ours: u64, theirs: u64) -> All2AllError {
        All2AllError::PeerMismatch {
            rank: self.me(),
            peer: self.peer(peer),
            manager: self.manager,
            op: self.op,
            layer: self.layer,
            field,
            ours,
            theirs,
        }
    }
}

/// What every CUDA manager holds besides its communicator.
#[derive(Debug)]
pub(crate) struct Engine {
    /// The manager's name, in errors.
    pub manager: &'static str,
    pub kernels: Arc<Kernels>,
    /// The kernels that build dispatch tables.
    pub tables: TableKernels,
    /// A second stream of the communicator's device, for copies that overlap NCCL.
    pub side: Arc<CudaStream>,
    /// Unique per manager in this process: combine refuses another manager's dispatch.
    pub id: u64,
    pub globals: Vec<usize>,
    seq: Cell<u32>,
    /// Host time per step of this manager's calls.
    pub clock: PhaseClock,
    /// Page-locked buffers of the host copies, and the staging scratch.
    pub host: HostIo,
}

impl Engine {
    /// Loads the kernels on `comm`'s device.
    pub(crate) fn new(comm: &NcclComm, manager: &'static str) -> Result<Self, CudaAll2AllError> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let ctx = comm.stream().context().clone();
        let device = comm.device_ordinal();
        let kernels = Kernels::load(&ctx).map_err(|e| CudaAll2AllError::Kernels {
            device,
            manager,
            source: e.source,
            log: e.log,
        })?;
        let tables = TableKernels::load(&ctx).map_err(|source| CudaAll2AllError::Kernels {
            device,
            manager,
            source,
            log: "loading the table kernels (tables.ptx)".into(),
        })?;
        let setup = Call {
            comm,
            manager,
            op: "setup",
            layer: 0,
            globals: &[],
            clock: None,
            host: None,
            since: Cell::new(Instant::now()),
        };
        keep_freed_memory_in_pool(&ctx).map_err(setup.cuda("cuMemPoolSetAttribute"))?;
        let side = ctx.new_stream().map_err(setup.cuda("cuStreamCreate"))?;
        Ok(Self {
            manager,
            kernels: Arc::new(kernels),
            tables,
            side,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            globals: Vec::new(),
            seq: Cell::new(0),
            clock: PhaseClock::default(),
            host: HostIo::default(),
        })
    }

    /// The number of this call (every rank's manager counts the same calls).
    pub(crate) fn next_seq(&self) -> u32 {
        let s = self.seq.get();
        self.seq.set(s.wrapping_add(1));
        s
    }

    /// The context of operation `op` on `layer` over `comm`, naming ranks by their global
    /// numbers.
    pub(crate) fn call<'a>(
        &'a self,
        comm: &'a NcclComm,
        op: &'static str,
        layer: usize,
    ) -> Call<'a> {
        Call {
            comm,
            manager: self.manager,
            op,
            layer,
            globals: &self.globals,
            clock: Some(&self.clock),
            host: Some(&self.host),
            since: Cell::new(Instant::now()),
        }
    }

    /// Starts a dispatch or combine: numbers the call ([`next_seq`](Self::next_seq)) and
    /// returns its context.
    pub(crate) fn begin<'a>(
        &'a self,
        comm: &'a NcclComm,
        op: &'static str,
        layer: usize,
    ) -> (u32, Call<'a>) {
        let seq = self.next_seq();
        (seq, self.call(comm, op, layer))
    }

    /// Sets the global rank of every EP rank (`globals[r]` for group rank `r`), used in
    /// errors.
    pub(crate) fn set_globals(
        &mut self,
        comm: &NcclComm,
        globals: Vec<usize>,
    ) -> Result<(), CudaAll2AllError> {
        if globals.len() != comm.world_size() {
            return Err(CudaAll2AllError::Setup {
                rank: RankRef {
                    local: comm.rank(),
                    global: comm.rank(),
                },
                manager: self.manager,
                detail: format!(
                    "{} global ranks given for an EP communicator of {}",
                    globals.len(),
                    comm.world_size()
                ),
            });
        }
        self.globals = globals;
        Ok(())
    }
}

/// The public surface every NCCL manager (a struct with fields `comm: C` and `engine:
/// Engine`, and a `NAME`) shares: construction, global rank names, the communicator and its
/// stream.
macro_rules! nccl_manager_api {
    ($manager:ident) => {
        impl<C: ::std::borrow::Borrow<$crate::nccl::NcclComm>> $manager<C> {
            /// A manager over `comm`, the EP group's communicator (`NcclComm`, `&NcclComm`,
            /// …). Loads the kernels on its device.
            pub fn new(comm: C) -> Result<Self, $crate::all2all::CudaAll2AllError> {
                let engine = $crate::all2all::cuda::Engine::new(comm.borrow(), NAME)?;
                Ok(Self { comm, engine })
            }

            /// Names the global rank of every EP rank in errors (`globals[r]` for EP rank
            /// `r`).
            pub fn with_global_ranks(
                mut self,
                globals: Vec<usize>,
            ) -> Result<Self, $crate::all2all::CudaAll2AllError> {
                self.engine.set_globals(self.comm.borrow(), globals)?;
                Ok(self)
            }

            /// The communicator.
            pub fn comm(&self) -> &$crate::nccl::NcclComm {
                self.comm.borrow()
            }

            /// The stream results are ordered on (the communicator's).
            pub fn stream(&self) -> &::std::sync::Arc<::cudarc::driver::CudaStream> {
                self.comm.borrow().stream()
            }

            /// Gives the communicator back.
            pub fn into_comm(self) -> C {
                self.comm
            }

            /// Host wall time this manager's calls spent in each step (named
            /// `"dispatch: …"` / `"combine: …"`), summed over every call since it was created
            /// or [`reset_step_times`](Self::reset_step_times) was called: where a call's
            /// time goes. Steps that wait for the GPU include that wait.
            pub fn step_times(&self) -> Vec<(String, ::std::time::Duration)> {
                self.engine.clock.totals()
            }

            /// Starts [`step_times`](Self::step_times) over.
            pub fn reset_step_times(&self) {
                self.engine.clock.reset()
            }
        }
    };
}
pub(crate) use nccl_manager_api;

/// Makes the device's default memory pool keep the memory buffers free into it, instead of
/// handing it back to the driver at the next synchronisation (its default): the managers
/// allocate and free buffers of up to a batch of rows every call, which would otherwise be
/// mapped anew each time. A threshold someone already set is left alone.
fn keep_freed_memory_in_pool(ctx: &CudaContext) -> Result<(), DriverError> {
    use cudarc::driver::sys::{cuDeviceGetDefaultMemPool, CUmemPool_attribute, CUmemoryPool};
    let mut pool: CUmemoryPool = std::ptr::null_mut();
    let attr = CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
    // SAFETY: `pool` is a valid out-pointer; the device handle comes from a live context.
    unsafe { cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result()?;
    let mut threshold: u64 = 0;
    // SAFETY: the release threshold is a `cuuint64_t`, read into `threshold`.
    unsafe {
        cudarc::driver::sys::cuMemPoolGetAttribute(pool, attr, (&mut threshold as *mut u64).cast())
    }
    .result()?;
    if threshold == 0 {
        threshold = u64::MAX;
        // SAFETY: as above, written from `threshold`.
        unsafe {
            cudarc::driver::sys::cuMemPoolSetAttribute(
                pool,
                attr,
                (&mut threshold as *mut u64).cast(),
            )
        }
        .result()?;
    }
    Ok(())
}

/// Implements [`MoeAll2All`](super::MoeAll2All) over device buffers for a CUDA manager
/// named `$name` that has `comm(&self) -> &NcclComm` and inherent `run_dispatch` /
/// `run_combine` with the trait's signatures.
macro_rules! impl_cuda_all2all {
    (impl[$($generics:tt)*] $manager:ty, $name:expr) => {
        impl<$($generics)*> $crate::all2all::MoeAll2All for $manager {
            type Tokens<'a> = $crate::all2all::CudaTokens<'a>;
            type LoadCounts<'a> = &'a mut ::cudarc::driver::CudaSlice<i64>;
            type ExpertOutputs<'a> = ::cudarc::driver::CudaView<'a, u8>;
            type Dispatched = $crate::all2all::CudaDispatched;
            type Combined = ::cudarc::driver::CudaSlice<u8>;
            type Error = $crate::all2all::CudaAll2AllError;

            fn name(&self) -> &'static str {
                $name
            }

            fn ep_rank(&self) -> usize {
                self.comm().rank()
            }

            fn ep_size(&self) -> usize {
                self.comm().world_size()
            }

            fn dispatch(
                &self,
                tokens: $crate::all2all::CudaTokens<'_>,
                placement: &$crate::all2all::ExpertPlacement,
                load: Option<&mut ::cudarc::driver::CudaSlice<i64>>,
                deadline: ::moeshift_sync::Deadline,
            ) -> Result<$crate::all2all::CudaDispatched, $crate::all2all::CudaAll2AllError> {
                self.run_dispatch(tokens, placement, load, deadline)
            }

            fn combine(
                &self,
                dispatched: &$crate::all2all::CudaDispatched,
                expert_outputs: ::cudarc::driver::CudaView<'_, u8>,
                deadline: ::moeshift_sync::Deadline,
            ) -> Result<::cudarc::driver::CudaSlice<u8>, $crate::all2all::CudaAll2AllError> {
                self.run_combine(dispatched, expert_outputs, deadline)
            }
        }
    };
}
pub(crate) use impl_cuda_all2all;

/// A section of an upload: byte offset and length.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Section {
    pub offset: usize,
    pub len: usize,
}

/// Host tables gathered into one buffer so that they reach the GPU in one copy. Each
/// section starts on a 16-byte boundary; values are little-endian.
#[derive(Debug, Default)]
pub(crate) struct Staging {
    bytes: Vec<u8>,
}

impl Staging {
    /// An empty staging area over the manager's scratch (kept between calls, so that its
    /// memory is reused), or a new one without it.
    pub(crate) fn new(call: &Call<'_>) -> Self {
        let mut bytes = call
            .host
            .and_then(|io| {
                io.scratch
                    .try_borrow_mut()
                    .ok()
                    .map(|mut s| std::mem::take(&mut *s))
            })
            .unwrap_or_default();
        bytes.clear();
        Self { bytes }
    }

    /// Pads to the next aligned offset and returns it.
    fn align(&mut self) -> usize {
        let offset = self.bytes.len().next_multiple_of(16);
        self.bytes.resize(offset, 0);
        offset
    }

    /// A new zeroed section of `len` bytes at the next aligned offset, to be filled in.
    pub(crate) fn section(&mut self, len: usize) -> (Section, &mut [u8]) {
        let offset = self.align();
        self.bytes.resize(offset + len, 0);
        let out = self.bytes.get_mut(offset..).unwrap_or_default();
        (Section { offset, len }, out)
    }

    pub(crate) fn bytes(&mut self, data: &[u8]) -> Section {
        let offset = self.align();
        self.bytes.extend_from_slice(data);
        Section {
            offset,
            len: data.len(),
        }
    }

    pub(crate) fn u32s(&mut self, data: &[u32]) -> Section {
        let (section, out) = self.section(data.len() * 4);
        for (o, v) in out.chunks_exact_mut(4).zip(data) {
            o.copy_from_slice(&v.to_le_bytes());
        }
        section
    }

    #[cfg(test)]
    pub(crate) fn f32s(&mut self, data: &[f32]) -> Section {
        let (section, out) = self.section(data.len() * 4);
        for (o, v) in out.chunks_exact_mut(4).zip(data) {
            o.copy_from_slice(&v.to_le_bytes());
        }
        section
    }

    /// Copies everything to a new device buffer on `stream`: one copy into the manager's
    /// page-locked upload buffer (once the copy that last read it is done, waited for with
    /// the deadline) and one asynchronous host-to-device copy. Without that buffer, the copy
    /// goes from pageable memory, which the driver stages and synchronises.
    pub(crate) fn upload(
        self,
        call: &Call<'_>,
        stream: &Arc<CudaStream>,
        deadline: Deadline,
    ) -> Result<CudaSlice<u8>, CudaAll2AllError> {
        let uploaded = self.copy_to_device(call, stream, deadline);
        if let Some(mut scratch) = call.host.and_then(|io| io.scratch.try_borrow_mut().ok()) {
            *scratch = self.bytes;
        }
        uploaded
    }

    fn copy_to_device(
        &self,
        call: &Call<'_>,
        stream: &Arc<CudaStream>,
        deadline: Deadline,
    ) -> Result<CudaSlice<u8>, CudaAll2AllError> {
        let len = self.bytes.len();
        if len == 0 {
            return empty_slice(stream).map_err(call.cuda("cuMemAllocAsync"));
        }
        let pinned = call.host.and_then(|io| io.upload.try_borrow_mut().ok());
        let Some(mut pinned) = pinned else {
            return stream
                .clone_htod(&self.bytes)
                .map_err(call.cuda("cuMemcpyHtoDAsync"));
        };
        let host = pinned.ready(call, stream, len, deadline)?;
        host.copy_from_slice(&self.bytes);
        let mut dst = alloc_bytes(call, stream, len)?;
        let (ptr, record) = dst.device_ptr_mut(stream);
        // SAFETY: `dst` is a new device buffer of `len` bytes on `stream`; `host` is
        // page-locked memory of `len` bytes that nothing writes until the event recorded
        // below completes (`ready` waits for it before the buffer is refilled, and a buffer
        // dropped before it completes is leaked, never freed).
        let copied = unsafe { result::memcpy_htod_async(ptr, &*host, stream.cu_stream()) };
        drop(record);
        copied.map_err(call.cuda("cuMemcpyHtoDAsync"))?;
        pinned.record(call, stream)?;
        Ok(dst)
    }
}

/// The page-locked host buffers a manager copies through, and the staging scratch: reused
/// call after call (the managers are single-threaded).
#[derive(Debug)]
pub(crate) struct HostIo {
    /// Tables on their way to the GPU (write-combined: the host only writes it).
    upload: RefCell<Pinned>,
    /// Results on their way to the host (cached: the host reads it).
    download: RefCell<Pinned>,
    /// The bytes of the last [`Staging`], for the next one.
    scratch: RefCell<Vec<u8>>,
}

impl Default for HostIo {
    fn default() -> Self {
        Self {
            upload: RefCell::new(Pinned::new(true)),
            download: RefCell::new(Pinned::new(false)),
            scratch: RefCell::default(),
        }
    }
}

/// Most bytes one host copy moves (allocators refuse `isize::MAX` bytes and more).
const MAX_HOST_BYTES: usize = isize::MAX as usize / 2;

/// One page-locked buffer (allocated on first use) and the event recorded after the last
/// copy that used it.
#[derive(Debug)]
struct Pinned {
    buf: Option<PinnedHostSlice<u8>>,
    /// Recorded on the copy's stream after every copy to or from `buf`.
    done: Option<CudaEvent>,
    /// Write-combined memory: fast for the host to write and the GPU to read, very slow for
    /// the host to read (uploads only).
    write_combined: bool,
}

impl Pinned {
    /// Smallest buffer allocated.
    const MIN_BYTES: usize = 64 << 10;

    fn new(write_combined: bool) -> Self {
        Self {
            buf: None,
            done: None,
            write_combined,
        }
    }

    /// The first `len` bytes of the buffer, once no copy uses it any more (waited for with
    /// the deadline); grows it (by half at least) when it is too small.
    fn ready(
        &mut self,
        call: &Call<'_>,
        stream: &Arc<CudaStream>,
        len: usize,
        deadline: Deadline,
    ) -> Result<&mut [u8], CudaAll2AllError> {
        self.wait(
            call,
            "an earlier copy through the page-locked buffer",
            deadline,
        )?;
        if len > MAX_HOST_BYTES {
            return Err(call.too_large("bytes of a page-locked buffer", len));
        }
        let have = self.buf.as_ref().map_or(0, |b| b.len());
        if have < len {
            // At most `MAX_HOST_BYTES` (as `len` is, checked above).
            let want = len
                .max(Self::MIN_BYTES)
                .max((have + have / 2).min(MAX_HOST_BYTES));
            let flags = if self.write_combined {
                cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED
            } else {
                0
            };
            // The old buffer goes first (no copy uses it: waited for above).
            self.buf = None;
            let ctx = stream.context();
            // SAFETY: the bytes are uninitialised; every byte is written (by the host or by
            // a copy) before it is read.
            let buf = unsafe { ctx.alloc_pinned_with_flags::<u8>(want, flags) }
                .map_err(call.cuda("cuMemHostAlloc"))?;
            self.buf = Some(buf);
        }
        self.filled_mut(call, len)
    }

    /// The first `len` bytes of the buffer (which holds at least that many).
    fn filled_mut(&mut self, call: &Call<'_>, len: usize) -> Result<&mut [u8], CudaAll2AllError> {
        let Some(buf) = self.buf.as_mut() else {
            return Ok(&mut []);
        };
        // The slice's own event is never recorded (copies go through `result`), so this
        // does not block.
        let all = buf
            .as_mut_slice()
            .map_err(call.cuda("cuEventSynchronize"))?;
        Ok(all.get_mut(..len).unwrap_or_default())
    }

    /// The first `len` bytes of the buffer, to read.
    fn filled(&mut self, call: &Call<'_>, len: usize) -> Result<&[u8], CudaAll2AllError> {
        self.filled_mut(call, len).map(|b| &*b)
    }

    /// Records that the copies just queued on `stream` use the buffer. If that fails, the
    /// buffer is given up (leaked): a copy may still use it.
    fn record(&mut self, call: &Call<'_>, stream: &CudaStream) -> Result<(), CudaAll2AllError> {
        let recorded = match &self.done {
            Some(event) => event.record(stream),
            None => stream.record_event(None).map(|e| {
                self.done = Some(e);
            }),
        };
        if recorded.is_err() {
            std::mem::forget(self.buf.take());
            self.done = None;
        }
        recorded.map_err(call.cuda("cuEventRecord"))
    }

    /// Waits (with the deadline) until the last copy that used the buffer is done.
    fn wait(
        &self,
        call: &Call<'_>,
        what: &'static str,
        deadline: Deadline,
    ) -> Result<(), CudaAll2AllError> {
        match &self.done {
            Some(event) => call.wait_event(event, what, deadline),
            None => Ok(()),
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // Free the buffer only when no copy can still use it; otherwise leak it (waiting
        // here could block without a deadline).
        let idle = self
            .done
            .as_ref()
            .is_none_or(|e| matches!(e.try_is_complete(), Ok(true)));
        if !idle {
            std::mem::forget(self.buf.take());
        }
    }
}

/// Device address of `buf` (its pending writes ordered before `stream`).
pub(crate) fn addr<T, B: DevicePtr<T>>(buf: &B, stream: &CudaStream) -> u64 {
    let (ptr, record) = buf.device_ptr(stream);
    drop(record);
    ptr
}

/// A slice of length 0 on `stream`, backed by a 1-byte allocation: the driver refuses
/// 0-byte allocations (`cuMemAlloc`), so empty buffers never ask it for one.
pub(crate) fn empty_slice(stream: &Arc<CudaStream>) -> Result<CudaSlice<u8>, DriverError> {
    // SAFETY: one byte that nothing reads.
    let one = unsafe { stream.alloc::<u8>(1) }?;
    let ptr = one.leak();
    // SAFETY: `ptr` is a live 1-byte allocation made on `stream`, owned by nothing else
    // after `leak`; the new slice frees it on drop and covers none of its bytes.
    Ok(unsafe { stream.upgrade_device_ptr::<u8>(ptr, 0) })
}

/// `len` uninitialised bytes on `stream` (every byte is written before it is read).
pub(crate) fn alloc_bytes(
    call: &Call<'_>,
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<u8>, CudaAll2AllError> {
    if len == 0 {
        return empty_slice(stream).map_err(call.cuda("cuMemAllocAsync"));
    }
    // SAFETY: `u8` accepts any bit pattern; callers overwrite the bytes they read.
    unsafe { stream.alloc::<u8>(len) }.map_err(call.cuda("cuMemAllocAsync"))
}

/// Exchanges one header with every rank over NCCL: `send` holds `size` headers (for ranks
/// `0..size`, in a device buffer); returns the `size` headers received.
pub(crate) fn exchange_headers(
    call: &Call<'_>,
    send: &CudaView<'_, u8>,
    deadline: Deadline,
) -> Result<Vec<DeviceHeader>, CudaAll2AllError> {
    // SAFETY: no extra ranges.
    unsafe { exchange_headers_with(call, send, &[], deadline) }.map(|(headers, _)| headers)
}

/// [`exchange_headers`], copying the device ranges `extra` (`(address, bytes)`) to the host
/// in the same wait: returns their bytes too, back to back.
///
/// # Safety
/// Every range of `extra` is device memory of this context, ordered on the communicator's
/// stream, alive and not written by other work until this returns.
pub(crate) unsafe fn exchange_headers_with(
    call: &Call<'_>,
    send: &CudaView<'_, u8>,
    extra: &[(u64, usize)],
    deadline: Deadline,
) -> Result<(Vec<DeviceHeader>, Vec<u8>), CudaAll2AllError> {
    let comm = call.comm;
    let size = comm.world_size();
    let stream = comm.stream();
    let mut recv = stream
        .alloc_zeros::<u8>(size * DeviceHeader::LEN)
        .map_err(call.cuda("cuMemAllocAsync"))?;
    let counts = vec![DeviceHeader::LEN; size];
    comm.all_to_all_v(send, &counts, &mut recv, &counts, deadline)
        .map_err(call.nccl())?;
    let mut ranges = vec![(addr(&recv, stream), recv.len())];
    ranges.extend_from_slice(extra);
    let header_bytes = recv.len();
    // SAFETY: `recv` is alive until the end of this function and nothing else uses it; the
    // extra ranges are the caller's contract.
    unsafe {
        call.download_with(stream, &ranges, "the header exchange", deadline, |bytes| {
            let (headers, rest) = bytes.split_at(header_bytes.min(bytes.len()));
            read_headers(call, headers).map(|h| (h, rest.to_vec()))
        })
    }?
}

/// The headers in `bytes`, one per rank in rank order.
pub(crate) fn read_headers(
    call: &Call<'_>,
    bytes: &[u8],
) -> Result<Vec<DeviceHeader>, CudaAll2AllError> {
    bytes
        .chunks_exact(DeviceHeader::LEN)
        .enumerate()
        .map(|(r, b)| DeviceHeader::read(b).map_err(|d| call.malformed(r, d)))
        .collect()
}

/// Checks every rank's header against `ours` (see [`check_headers`]).
pub(crate) fn check_all(
    call: &Call<'_>,
    headers: &[DeviceHeader],
    ours: &DeviceHeader,
) -> Result<(), CudaAll2AllError> {
    check_headers(headers, ours, call).map_err(CudaAll2AllError::from)
}

/// This rank's checked batch.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub n: usize,
    pub elem: Elem,
    pub dtype_code: u8,
    pub row_bytes: usize,
}

/// The element type and row size of `tokens`, checked.
pub(crate) fn row_format(
    call: &Call<'_>,
    tokens: &CudaTokens<'_>,
) -> Result<(Elem, u8, usize), CudaAll2AllError> {
    let (elem, code) = elem_of(tokens.dtype).ok_or_else(|| {
        call.tokens(format!(
            "rows of {} are not supported: bfloat16, float16 and float32 are",
            tokens.dtype.name()
        ))
    })?;
    if tokens.hidden_size == 0 || u32::try_from(tokens.hidden_size).is_err() {
        return Err(call.tokens(format!(
            "hidden size {} is not in 1..=u32::MAX",
            tokens.hidden_size
        )));
    }
    let row_bytes = tokens
        .hidden_size
        .checked_mul(elem.bytes())
        .ok_or_else(|| call.tokens(format!("hidden size {} overflows", tokens.hidden_size)))?;
    Ok((elem, code, row_bytes))
}

/// Checks `tokens` against `placement` and the communicator (shapes, devices, top-k, the
/// load counter's length) and orders the communicator's stream after the streams of the
/// batch's buffers.
pub(crate) fn check_batch(
    call: &Call<'_>,
    tokens: &CudaTokens<'_>,
    placement: &ExpertPlacement,
    load_len: Option<usize>,
) -> Result<Prepared, CudaAll2AllError> {
    let comm = call.comm;
    if placement.ep_size() != comm.world_size() {
        return Err(All2AllError::PlacementGroup {
            rank: call.me(),
            group: format!("NCCL EP communicator on device {}", call.device()),
            layer: call.layer,
            placement_ep_size: placement.ep_size(),
            group_size: comm.world_size(),
        }
        .into());
    }
    let (elem, dtype_code, row_bytes) = row_format(call, tokens)?;
    let top_k = tokens.top_k;
    if top_k == 0 || top_k > MAX_TOP_K {
        return Err(call.tokens(format!("top-k {top_k} is not in 1..={MAX_TOP_K}")));
    }
    let ids_len = tokens.topk_ids.len();
    if ids_len % top_k != 0 {
        return Err(call.tokens(format!(
            "{ids_len} top-k ids are not a whole number of tokens of top-k {top_k}"
        )));
    }
    let n = ids_len / top_k;
    if u32::try_from(ids_len).is_err() {
        return Err(call.tokens(format!(
            "{n} tokens × top-k {top_k} is more than one batch can hold"
        )));
    }
    if tokens.topk_weights.len() != ids_len {
        return Err(call.tokens(format!(
            "{} top-k weights for {ids_len} top-k ids ({n} tokens × top-k {top_k})",
            tokens.topk_weights.len()
        )));
    }
    if Some(tokens.hidden.len()) != n.checked_mul(row_bytes) {
        return Err(call.tokens(format!(
            "{} bytes of rows for {n} tokens × hidden size {} × {} bytes",
            tokens.hidden.len(),
            tokens.hidden_size,
            elem.bytes()
        )));
    }
    let device = call.device();
    for (what, ordinal) in [
        ("rows", tokens.hidden.stream().context().ordinal()),
        ("top-k ids", tokens.topk_ids.stream().context().ordinal()),
        (
            "top-k weights",
            tokens.topk_weights.stream().context().ordinal(),
        ),
    ] {
        if ordinal != device {
            return Err(call.tokens(format!(
                "the {what} are on device {ordinal}, the EP communicator on device {device}"
            )));
        }
    }
    if let Some(len) = load_len {
        if len != placement.num_physical() {
            return Err(All2AllError::LoadCounter {
                rank: call.me(),
                manager: call.manager,
                layer: call.layer,
                len,
                expected: placement.num_physical(),
            }
            .into());
        }
    }

    // The router output is read after the caller's work on it.
    let stream = comm.stream();
    for s in [
        tokens.hidden.stream(),
        tokens.topk_ids.stream(),
        tokens.topk_weights.stream(),
    ] {
        if s.cu_stream() != stream.cu_stream() {
            stream.join(s).map_err(call.cuda("cuStreamWaitEvent"))?;
        }
    }
    Ok(Prepared {
        n,
        elem,
        dtype_code,
        row_bytes,
    })
}

/// Queues the load hook: `load[slot] += 1` for every pick in `slots` (a device section of
/// `count` `u32`), on the communicator's stream.
pub(crate) fn count_load(
    call: &Call<'_>,
    kernels: &Kernels,
    load: &mut CudaSlice<i64>,
    slots_ptr: u64,
    count: usize,
) -> Result<(), CudaAll2AllError> {
    let stream = call.comm.stream();
    let (ptr, record) = cudarc::driver::DevicePtrMut::device_ptr_mut(load, stream);
    // SAFETY: `load` has one counter per physical slot (checked) and every slot in the
    // section is a physical slot of the placement; both live until the kernel is done
    // (the section's buffer is freed in stream order after it).
    let launched = unsafe { kernels.count_slots(stream.cu_stream(), ptr, slots_ptr, count) };
    drop(record);
    launched.map_err(call.launch("count_slots"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_aligns_sections_and_writes_little_endian_values() {
        let mut st = Staging::default();
        let a = st.bytes(&[1, 2, 3]);
        let b = st.u32s(&[0x0403_0201, 7]);
        let c = st.f32s(&[1.5]);
        let (f, out) = st.section(2);
        out.copy_from_slice(&[9, 9]);
        let at = |offset, len| Section { offset, len };
        assert_eq!([a, b, c, f], [at(0, 3), at(16, 8), at(32, 4), at(48, 2)]);
        let mut expected = vec![0u8; 50];
        expected[..3].copy_from_slice(&[1, 2, 3]);
        expected[16..24].copy_from_slice(&[1, 2, 3, 4, 7, 0, 0, 0]);
        // 1.5 = 0x3fc0_0000.
        expected[32..36].copy_from_slice(&[0, 0, 0xc0, 0x3f]);
        expected[48..50].copy_from_slice(&[9, 9]);
        assert_eq!(st.bytes, expected);
    }
}
