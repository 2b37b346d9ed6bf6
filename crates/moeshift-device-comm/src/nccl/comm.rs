//! [`NcclComm`]: a NCCL communicator whose every operation has a deadline.

use std::cell::{Cell, RefCell};
use std::ffi::c_int;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclResult_t};
use cudarc::nccl::NcclType;
use moeshift_sync::Deadline;

use super::config::{control_config, data_config};
use super::result::{self, CallError, Progress};
use super::schedule::{schedule_p2p, MAX_P2P_OPS_PER_GROUP};
use super::wait::{poll_until, Poll};
use super::{nccl_available, NcclError, P2pKind, P2pOp, UniqueId};
use crate::StoreClient;

/// Where NCCL stores the handle of a split communicator (from its own thread).
type SplitSlot = AtomicPtr<cudarc::nccl::sys::ncclComm>;

/// How long [`Drop`] waits for a healthy communicator to finalize before aborting it.
const DROP_GRACE: Duration = Duration::from_secs(10);
/// How long an abort waits for the communicator's stream to drain (aborted kernels exit).
const ABORT_DRAIN: Duration = Duration::from_secs(5);

/// A NCCL communicator for one rank, on one GPU, driven from one thread.
///
/// No NCCL call can keep the host waiting on a peer past a [`Deadline`]. Everything that
/// waits for peers on the host happens on a *control* communicator created non-blocking
/// (`ncclCommInitRankConfig` with `blocking = 0`, polled with `ncclCommGetAsyncError`):
/// initialisation, then one small exchange with every peer that opens all point-to-point
/// connections, then `ncclCommSplit` into the *data* communicator that carries every
/// operation. The split shares the control communicator's channels and connections
/// (`splitShare = 1`) and is blocking, so a group of operations is launched by the calling
/// thread (a non-blocking communicator starts a thread per group: about 200 µs per operation
/// instead of 20). Collective connections are opened at initialisation too: unless the
/// environment says otherwise, the first communicator sets `NCCL_RUNTIME_CONNECT=0` for the
/// process. A launch therefore never waits for a peer; the GPU work it queued does, and is
/// polled (a CUDA event per group, and `ncclCommGetAsyncError`) until it finishes, fails, or
/// the deadline passes.
///
/// On expiry or failure both communicators are aborted (`ncclCommAbort`, which also stops
/// NCCL kernels still waiting on a dead peer) and the error names the operation and the peers
/// it was waiting for. An aborted communicator refuses further calls with
/// [`NcclError::Aborted`]; create a new one.
///
/// Every operation is synchronous from the caller's point of view: it queues work on the
/// communicator's stream, after the pending work of the buffers' own streams, and returns once
/// the GPU finished it.
///
/// `NcclComm` is neither `Send` nor `Sync`: NCCL keeps group state per thread, so create the
/// communicator on the thread that uses it, and keep it there.
#[derive(Debug)]
pub struct NcclComm {
    /// The handle operations run on (the data communicator once created; the control
    /// communicator while it is being set up); null once aborted or destroyed.
    raw: Cell<ncclComm_t>,
    /// The non-blocking communicator the data communicator was split from; it owns the shared
    /// channels and connections. Null until the split finished, and once aborted or destroyed.
    control: Cell<ncclComm_t>,
    stream: Arc<CudaStream>,
    /// One event per group of the current operation, reused across operations.
    events: RefCell<Vec<CudaEvent>>,
    rank: usize,
    world: usize,
    device: usize,
    /// Why the communicator was aborted, once it was.
    aborted: RefCell<Option<String>>,
}

/// One NCCL group of an operation.
enum Step<'o> {
    /// Point-to-point operations with one peer (a round, or a chunk of one).
    P2p {
        peer: usize,
        round: Option<usize>,
        chunk: usize,
        ops: Vec<&'o P2pOp<'o>>,
    },
    /// In-place broadcasts of one or more buffers from `root`, in one group.
    Broadcast {
        bufs: Vec<(CUdeviceptr, usize)>,
        root: usize,
    },
    /// In-place sum over all ranks.
    AllReduceSum {
        ptr: CUdeviceptr,
        count: usize,
        dtype: ncclDataType_t,
    },
}

/// Why a wait ended early.
enum Failure {
    Call(CallError),
    Async(ncclResult_t),
    Cuda(&'static str, DriverError),
}

impl NcclComm {
    /// Joins a communicator of `world` ranks as `rank`, with the [`UniqueId`] rank 0 created
    /// and shared. NCCL work runs on `stream` (and on its device). Every rank must call this
    /// with the same id and world size before `deadline`.
    pub fn from_unique_id(
        id: &UniqueId,
        rank: usize,
        world: usize,
        stream: Arc<CudaStream>,
        deadline: Deadline,
    ) -> Result<Self, NcclError> {
        nccl_available()?;
        let (rank_c, world_c) = check_rank(rank, world)?;
        let ctx = stream.context().clone();
        let device = ctx.ordinal();
        ctx.bind_to_thread().map_err(|source| NcclError::Cuda {
            call: "cuCtxSetCurrent",
            rank: Some(rank),
            device,
            source,
        })?;
        let others: Vec<usize> = (0..world).filter(|&r| r != rank).collect();
        let started = Instant::now();
        prefer_init_time_connections();

        let mut config = control_config();
        // SAFETY: the stream's context is current on this thread (bound above) and `config`
        // lives until the call returns.
        let (raw, status) =
            unsafe { result::comm_init_rank_config(world_c, id.to_raw(), rank_c, &mut config) };
        if let Err(err) = status {
            // SAFETY: a handle returned alongside an error is live until aborted; null is
            // accepted by ncclGetLastError.
            let last = unsafe { result::last_error(raw) };
            if !raw.is_null() {
                // SAFETY: `raw` came from ncclCommInitRankConfig and is not used afterwards.
                let _ = unsafe { result::comm_abort(raw) };
            }
            return Err(err.into_error(Some(rank), others, last));
        }
        if raw.is_null() {
            return Err(NcclError::InvalidArgument {
                rank: Some(rank),
                field: "communicator",
                what: "ncclCommInitRankConfig returned no communicator".into(),
            });
        }

        let comm = Self {
            raw: Cell::new(raw),
            control: Cell::new(std::ptr::null_mut()),
            stream,
            events: RefCell::new(Vec::new()),
            rank,
            world,
            device,
            aborted: RefCell::new(None),
        };
        comm.wait_ready(
            raw,
            "ncclCommInitRankConfig",
            "communicator init",
            &others,
            started,
            deadline,
        )?;
        comm.connect_peers(deadline)?;
        comm.split_data_comm(&others, started, deadline)?;
        Ok(comm)
    }

    /// Creates the communicator through the rendezvous store: rank 0 makes a [`UniqueId`] and
    /// stores it under `key`; the other ranks wait for it (until `deadline`). Creates a CUDA
    /// context for `device_ordinal` and a new stream for NCCL work on it.
    ///
    /// `key` must be new for every communicator created through the same store: an id is
    /// only good once.
    pub fn from_store(
        store: &StoreClient,
        rank: usize,
        world: usize,
        key: &str,
        device_ordinal: usize,
        deadline: Deadline,
    ) -> Result<Self, NcclError> {
        nccl_available()?;
        check_rank(rank, world)?;
        let cuda = |call: &'static str| {
            move |source| NcclError::Cuda {
                call,
                rank: Some(rank),
                device: device_ordinal,
                source,
            }
        };
        let ctx = CudaContext::new(device_ordinal).map_err(cuda("cuDevicePrimaryCtxRetain"))?;
        let stream = ctx.new_stream().map_err(cuda("cuStreamCreate"))?;
        let store_err = |source| NcclError::Store {
            rank,
            key: key.to_owned(),
            source: Box::new(source),
        };
        let id = if rank == 0 {
            let id = UniqueId::new()?;
            store.set(key, id.as_bytes(), deadline).map_err(store_err)?;
            id
        } else {
            let bytes = store.get(key, deadline).map_err(store_err)?;
            UniqueId::from_bytes(&bytes).map_err(|err| match err {
                NcclError::InvalidArgument { field, what, .. } => NcclError::InvalidArgument {
                    rank: Some(rank),
                    field,
                    what: format!("store key {key:?}: {what}"),
                },
                other => other,
            })?
        };
        Self::from_unique_id(&id, rank, world, stream, deadline)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The CUDA device ordinal NCCL works on.
    pub fn device_ordinal(&self) -> usize {
        self.device
    }

    /// The stream NCCL work is queued on. Buffers written on this stream need no extra
    /// synchronisation before an operation.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Why the communicator was aborted, or `None` while it is usable.
    pub fn abort_reason(&self) -> Option<String> {
        self.aborted.borrow().clone()
    }

    /// True once the communicator was aborted (after a failure, a deadline, or [`Self::abort`]).
    pub fn is_aborted(&self) -> bool {
        self.aborted.borrow().is_some()
    }

    /// Aborts the communicator now; later calls return [`NcclError::Aborted`]. Peers waiting
    /// on this rank will hit their own deadlines.
    pub fn abort(&self) {
        self.abort_with("aborted by its owner".into());
    }

    /// Sends all of `buf` to `peer`; returns when the data left this GPU.
    pub fn send<T, B: DevicePtr<T>>(
        &self,
        peer: usize,
        buf: &B,
        deadline: Deadline,
    ) -> Result<(), NcclError> {
        self.run_p2p("send", &[P2pOp::send(peer, buf)], deadline)
    }

    /// Receives from `peer` into all of `buf` (the sender must send exactly as many bytes);
    /// returns when the data arrived.
    pub fn recv<T, B: DevicePtrMut<T>>(
        &self,
        peer: usize,
        buf: &mut B,
        deadline: Deadline,
    ) -> Result<(), NcclError> {
        self.run_p2p("recv", &[P2pOp::recv(peer, buf)], deadline)
    }

    /// Runs a batch of sends and receives (any peers, any number), scheduled in symmetric
    /// tournament rounds with at most [`MAX_P2P_OPS_PER_GROUP`] operations per NCCL group (see
    /// [`super::schedule`]). Every rank involved must call this with matching lists.
    /// Zero-length operations are skipped (on both sides, since lengths match).
    pub fn grouped(&self, ops: &[P2pOp<'_>], deadline: Deadline) -> Result<(), NcclError> {
        self.run_p2p("grouped send/recv", ops, deadline)
    }

    /// All-to-all with per-peer counts (in elements of `T`): this rank sends
    /// `send_counts[p]` elements to rank `p` from `send`, where the blocks for ranks
    /// `0, 1, …` follow one another, and receives `recv_counts[p]` elements from rank `p` into
    /// consecutive blocks of `recv`. `recv_counts[p]` must equal what rank `p` sends here,
    /// and `send_counts[rank] == recv_counts[rank]` (the local block is copied).
    ///
    /// Runs as grouped point-to-point in tournament rounds: each round pairs every rank with
    /// at most one peer and exchanges both directions at once.
    pub fn all_to_all_v<T, S: DevicePtr<T>, R: DevicePtrMut<T>>(
        &self,
        send: &S,
        send_counts: &[usize],
        recv: &mut R,
        recv_counts: &[usize],
        deadline: Deadline,
    ) -> Result<(), NcclError> {
        let op = "all_to_all_v";
        self.check_alive(op)?;
        let elem = std::mem::size_of::<T>();
        let send_offsets = self.byte_offsets("send_counts", send_counts, send.len(), elem)?;
        let recv_offsets = self.byte_offsets("recv_counts", recv_counts, recv.len(), elem)?;
        let own_send = send_counts.get(self.rank).copied().unwrap_or(0);
        let own_recv = recv_counts.get(self.rank).copied().unwrap_or(0);
        if own_send != own_recv {
            return Err(self.invalid(
                "send_counts",
                format!(
                    "rank {} sends {own_send} elements to itself but expects {own_recv}",
                    self.rank
                ),
            ));
        }

        let send_stream = send.stream().clone();
        let recv_stream = recv.stream().clone();
        let (send_base, record_send) = send.device_ptr(&send_stream);
        drop(record_send);
        let (recv_base, record_recv) = recv.device_ptr_mut(&recv_stream);
        drop(record_recv);

        let mut ops = Vec::with_capacity(2 * self.world);
        for peer in 0..self.world {
            let (Some(&(s_off, s_len)), Some(&(r_off, r_len))) =
                (send_offsets.get(peer), recv_offsets.get(peer))
            else {
                continue;
            };
            ops.push(P2pOp::from_parts(
                P2pKind::Send,
                peer,
                send_base + s_off as u64,
                s_len,
                Some(send_stream.clone()),
            ));
            ops.push(P2pOp::from_parts(
                P2pKind::Recv,
                peer,
                recv_base + r_off as u64,
                r_len,
                Some(recv_stream.clone()),
            ));
        }
        // The ops point into `send` and `recv`, which stay borrowed until this call returns.
        self.run_p2p(op, &ops, deadline)
    }

    /// Broadcasts `buf` from rank `root` into `buf` on every rank (in place).
    pub fn broadcast<T, B: DevicePtrMut<T>>(
        &self,
        buf: &mut B,
        root: usize,
        deadline: Deadline,
    ) -> Result<(), NcclError> {
        let stream = buf.stream().clone();
        let bytes = buf.num_bytes();
        let (ptr, record) = buf.device_ptr_mut(&stream);
        drop(record);
        // SAFETY: `ptr..ptr+bytes` is `buf`, borrowed mutably for the whole call, and its
        // stream is joined before the broadcast starts.
        unsafe { self.broadcast_inner(vec![(ptr, bytes)], root, Some(stream), deadline) }
    }

    /// Broadcasts `bytes` bytes at device address `ptr` from rank `root`, in place.
    ///
    /// # Safety
    /// `ptr..ptr+bytes` must be device memory of this communicator's GPU, not accessed by
    /// anything else until the call returns, with earlier writes ordered before the
    /// communicator's stream (see [`P2pOp::send_raw`]).
    pub unsafe fn broadcast_raw(
        &self,
        ptr: CUdeviceptr,
        bytes: usize,
        root: usize,
        deadline: Deadline,
    ) -> Result<(), NcclError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.broadcast_inner(vec![(ptr, bytes)], root, None, deadline) }
    }

    /// Broadcasts several buffers from rank `root`, in place, as one NCCL group (one launch
    /// instead of one per buffer). Each entry is a device address and a length in bytes;
    /// zero-length entries are skipped. Every rank must pass the same lengths in the same order.
    ///
    /// # Safety
    /// Each `ptr..ptr+bytes` must be device memory of this communicator's GPU, not accessed by
    /// anything else until the call returns, with earlier writes ordered before the
    /// communicator's stream (see [`P2pOp::send_raw`]); the ranges must not overlap.
    pub unsafe fn broadcast_many_raw(
        &self,
        bufs: &[(CUdeviceptr, usize)],
        root: usize,
        deadline: Deadline,
    ) -> Result<(), NcclError> {
        let bufs: Vec<(CUdeviceptr, usize)> = bufs
            .iter()
            .copied()
            .filter(|&(_, bytes)| bytes > 0)
            .collect();
        // SAFETY: forwarded from the caller.
        unsafe { self.broadcast_inner(bufs, root, None, deadline) }
    }

    /// Sums `buf` element-wise over all ranks, in place.
    pub fn all_reduce_sum<T: NcclType, B: DevicePtrMut<T>>(
        &self,
        buf: &mut B,
        deadline: Deadline,
    ) -> Result<(), NcclError> {
        let op = "all_reduce";
        self.check_alive(op)?;
        let stream = buf.stream().clone();
        let count = buf.len();
        let (ptr, record) = buf.device_ptr_mut(&stream);
        drop(record);
        if count == 0 {
            return Ok(());
        }
        let step = Step::AllReduceSum {
            ptr,
            count,
            dtype: T::as_nccl_type(),
        };
        self.run_steps(op, &[step], &[&stream], deadline)
    }

    /// Shuts the communicator down cleanly (`ncclCommFinalize`, then `ncclCommDestroy`),
    /// aborting it if that fails or does not finish before `deadline`. Dropping a
    /// communicator does the same with a grace period of a few seconds.
    pub fn close(self, deadline: Deadline) -> Result<(), NcclError> {
        self.shutdown(deadline)
    }

    // ----- internals -----

    /// Opens the point-to-point connection with every peer on the (non-blocking) control
    /// communicator: one 4-byte send and receive per peer, in the usual tournament rounds.
    /// The data communicator split from it reuses these connections, so its operations never
    /// wait for a peer while being launched.
    fn connect_peers(&self, deadline: Deadline) -> Result<(), NcclError> {
        if self.world < 2 {
            return Ok(());
        }
        let slot = std::mem::size_of::<u32>();
        let mut buf = self
            .stream
            .alloc_zeros::<u8>(2 * self.world * slot)
            .map_err(|source| self.cuda_error("cuMemAlloc", source))?;
        let (base, record) = buf.device_ptr_mut(&self.stream);
        drop(record);
        let recv_base = base + (self.world * slot) as u64;
        let mut ops = Vec::with_capacity(2 * self.world);
        for peer in (0..self.world).filter(|&p| p != self.rank) {
            let at = (peer * slot) as u64;
            // SAFETY: both 4-byte ranges lie inside `buf`, which outlives the exchange (it is
            // dropped after `run_p2p` returned) and is written by nothing else.
            unsafe {
                ops.push(P2pOp::send_raw(peer, base + at, slot));
                ops.push(P2pOp::recv_raw(peer, recv_base + at, slot));
            }
        }
        self.run_p2p("connect peers", &ops, deadline)?;
        drop(buf);
        Ok(())
    }

    /// Splits the (ready, connected) control communicator into the blocking data
    /// communicator, polled with the deadline, and makes the data communicator the one
    /// operations run on.
    fn split_data_comm(
        &self,
        others: &[usize],
        started: Instant,
        deadline: Deadline,
    ) -> Result<(), NcclError> {
        let parent = self.check_alive("ncclCommSplit")?;
        self.bind()?;
        // NCCL stores the new handle from its own thread when the split finishes; the slot is
        // leaked on every failure path, where that store may still be pending or racing.
        let slot: &'static SplitSlot = Box::leak(Box::new(AtomicPtr::new(std::ptr::null_mut())));
        let mut config = data_config();
        // SAFETY: `parent` is live and its context current (bound above); the slot lives
        // forever unless freed below after the split finished; `config` outlives the call.
        let status = unsafe {
            result::comm_split(parent, 0, self.rank as c_int, slot.as_ptr(), &mut config)
        };
        if let Err(err) = status {
            return Err(self.fail(err, others.to_vec()));
        }
        // A split of a non-blocking communicator returns `ncclSuccess` while it still runs on
        // NCCL's thread (the group's `ncclInProgress` is not passed on): whatever it returned,
        // the split is over only once the parent leaves `ncclInProgress`.
        self.wait_ready(
            parent,
            "ncclCommSplit",
            "data communicator split",
            others,
            started,
            deadline,
        )?;
        let child = slot.load(Ordering::Acquire);
        // SAFETY: the split finished (the parent left `ncclInProgress`), so NCCL no longer
        // touches the slot; it came from `Box::leak` above and nothing else refers to it.
        drop(unsafe { Box::from_raw(slot as *const SplitSlot as *mut SplitSlot) });
        if child.is_null() {
            let error = self.invalid(
                "communicator",
                "ncclCommSplit finished without a communicator".into(),
            );
            self.abort_with(error.to_string());
            return Err(error);
        }
        self.control.set(parent);
        self.raw.set(child);
        Ok(())
    }

    unsafe fn broadcast_inner(
        &self,
        bufs: Vec<(CUdeviceptr, usize)>,
        root: usize,
        after: Option<Arc<CudaStream>>,
        deadline: Deadline,
    ) -> Result<(), NcclError> {
        let op = "broadcast";
        self.check_alive(op)?;
        if root >= self.world {
            return Err(self.invalid(
                "root",
                format!("root {root} is outside a world of {}", self.world),
            ));
        }
        if bufs.iter().all(|&(_, bytes)| bytes == 0) {
            return Ok(());
        }
        let joins: Vec<&Arc<CudaStream>> = after.iter().collect();
        self.run_steps(op, &[Step::Broadcast { bufs, root }], &joins, deadline)
    }

    /// Schedules `ops` into tournament rounds and runs them.
    fn run_p2p(
        &self,
        op: &'static str,
        ops: &[P2pOp<'_>],
        deadline: Deadline,
    ) -> Result<(), NcclError> {
        self.check_alive(op)?;
        if let Some((index, bad)) = ops.iter().enumerate().find(|(_, o)| o.peer >= self.world) {
            return Err(self.invalid(
                "peer",
                format!(
                    "{op}: operation {index} ({:?}) names peer {}, outside a world of {}",
                    bad.kind, bad.peer, self.world
                ),
            ));
        }
        let live: Vec<&P2pOp<'_>> = ops.iter().filter(|o| o.bytes > 0).collect();
        let pairs: Vec<(P2pKind, usize)> = live.iter().map(|o| (o.kind, o.peer)).collect();
        let groups = schedule_p2p(self.rank, self.world, &pairs, MAX_P2P_OPS_PER_GROUP)?;
        let steps: Vec<Step<'_>> = groups
            .iter()
            .map(|g| Step::P2p {
                peer: g.peer,
                round: g.round,
                chunk: g.chunk,
                ops: g.ops.iter().filter_map(|&i| live.get(i).copied()).collect(),
            })
            .collect();
        let joins: Vec<&Arc<CudaStream>> = live.iter().filter_map(|o| o.after.as_ref()).collect();
        self.run_steps(op, &steps, &joins, deadline)
    }

    /// Queues `steps` (one NCCL group each) after the pending work of `joins`, then waits for
    /// all of them on the GPU, with the deadline; aborts on expiry or failure.
    fn run_steps(
        &self,
        op: &'static str,
        steps: &[Step<'_>],
        joins: &[&Arc<CudaStream>],
        deadline: Deadline,
    ) -> Result<(), NcclError> {
        let raw = self.check_alive(op)?;
        if steps.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        self.bind()?;
        let mut joined: Vec<cudarc::driver::sys::CUstream> = vec![self.stream.cu_stream()];
        for stream in joins {
            if !joined.contains(&stream.cu_stream()) {
                joined.push(stream.cu_stream());
                self.stream
                    .join(stream)
                    .map_err(|source| self.cuda_error("cuStreamWaitEvent", source))?;
            }
        }
        self.ensure_events(steps.len())?;
        let cu_stream = self.stream.cu_stream() as cudaStream_t;

        for (index, step) in steps.iter().enumerate() {
            let peers = self.step_peers(step);
            let what = describe(op, step, steps.len());
            if deadline.is_expired() {
                return Err(self.timeout(what, peers, started));
            }
            match self.enqueue(raw, cu_stream, step) {
                Ok(Progress::Done) => {}
                Ok(Progress::InProgress) => {
                    self.wait_ready(raw, "ncclGroupEnd", &what, &peers, started, deadline)?
                }
                Err(err) => return Err(self.fail(err, peers)),
            }
            let recorded = match self.events.borrow().get(index) {
                Some(event) => event.record(&self.stream),
                None => Ok(()),
            };
            if let Err(source) = recorded {
                // Work is already queued: abort so nothing keeps using the buffers.
                let failure = Failure::Cuda("cuEventRecord", source);
                return Err(self.fail_with(failure, "cuEventRecord", peers));
            }
        }

        // Wait for the GPU: events complete in order; track the first pending one so a
        // timeout can name the round and peer it was stuck in.
        let mut done = 0usize;
        let outcome = poll_until(deadline, || {
            let events = self.events.borrow();
            while done < steps.len() {
                match events.get(done).map(CudaEvent::try_is_complete) {
                    Some(Ok(true)) | None => done += 1,
                    Some(Ok(false)) => break,
                    Some(Err(source)) => return Err(Failure::Cuda("cuEventQuery", source)),
                }
            }
            if done == steps.len() {
                return Ok(Poll::Ready(()));
            }
            // SAFETY: `raw` is live: nothing aborts it while this loop runs.
            match unsafe { result::async_error(raw) } {
                Ok(ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress) => Ok(Poll::Pending),
                Ok(code) => Err(Failure::Async(code)),
                Err(err) => Err(Failure::Call(err)),
            }
        });
        let stuck = steps.get(done);
        let peers = stuck.map(|s| self.step_peers(s)).unwrap_or_default();
        match outcome {
            Ok(Some(())) => Ok(()),
            Ok(None) => {
                let what = stuck
                    .map(|s| describe(op, s, steps.len()))
                    .unwrap_or_else(|| op.to_owned());
                Err(self.timeout(what, peers, started))
            }
            Err(failure) => Err(self.fail_with(failure, "ncclCommGetAsyncError", peers)),
        }
    }

    /// Issues one NCCL group for `step`.
    fn enqueue(
        &self,
        raw: ncclComm_t,
        stream: cudaStream_t,
        step: &Step<'_>,
    ) -> Result<Progress, CallError> {
        result::group_start()?;
        let issued: Result<Progress, CallError> = match step {
            Step::P2p { ops, .. } => ops.iter().try_fold(Progress::Done, |_, op| {
                let peer = op.peer as c_int;
                // SAFETY: the op's memory is valid for the whole exchange (borrowed by the op
                // or guaranteed by the caller of the raw constructor); `raw` is live and
                // `stream` belongs to its device.
                unsafe {
                    match op.kind {
                        P2pKind::Send => result::send(op.ptr, op.bytes, peer, raw, stream),
                        P2pKind::Recv => result::recv(op.ptr, op.bytes, peer, raw, stream),
                    }
                }
            }),
            Step::Broadcast { bufs, root } => bufs
                .iter()
                .filter(|&&(_, bytes)| bytes > 0)
                .try_fold(Progress::Done, |_, &(ptr, bytes)| {
                    // SAFETY: as above, for each broadcast buffer.
                    unsafe { result::broadcast(ptr, bytes, *root as c_int, raw, stream) }
                }),
            Step::AllReduceSum { ptr, count, dtype } => {
                // SAFETY: as above, for the reduced buffer.
                unsafe {
                    result::all_reduce(*ptr, *count, *dtype, ncclRedOp_t::ncclSum, raw, stream)
                }
            }
        };
        // The group must be closed even after an error: NCCL's group depth is per thread.
        let end = result::group_end();
        issued.and(end)
    }

    /// Polls `ncclCommGetAsyncError` until `raw` (one of this communicator's live handles)
    /// leaves `ncclInProgress`.
    fn wait_ready(
        &self,
        raw: ncclComm_t,
        call: &'static str,
        what: &str,
        peers: &[usize],
        started: Instant,
        deadline: Deadline,
    ) -> Result<(), NcclError> {
        let outcome = poll_until(deadline, || {
            // SAFETY: `raw` is live: nothing aborts it while this loop runs.
            match unsafe { result::async_error(raw) } {
                Ok(ncclResult_t::ncclInProgress) => Ok(Poll::Pending),
                Ok(ncclResult_t::ncclSuccess) => Ok(Poll::Ready(())),
                Ok(code) => Err(Failure::Async(code)),
                Err(err) => Err(Failure::Call(err)),
            }
        });
        match outcome {
            Ok(Some(())) => Ok(()),
            Ok(None) => Err(self.timeout(what.to_owned(), peers.to_vec(), started)),
            Err(failure) => Err(self.fail_with(failure, call, peers.to_vec())),
        }
    }

    /// The live handle, or [`NcclError::Aborted`].
    fn check_alive(&self, op: &'static str) -> Result<ncclComm_t, NcclError> {
        if let Some(reason) = self.aborted.borrow().as_ref() {
            return Err(NcclError::Aborted {
                rank: self.rank,
                op,
                reason: reason.clone(),
            });
        }
        let raw = self.raw.get();
        if raw.is_null() {
            return Err(NcclError::Aborted {
                rank: self.rank,
                op,
                reason: "the communicator was closed".into(),
            });
        }
        Ok(raw)
    }

    fn bind(&self) -> Result<(), NcclError> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|source| self.cuda_error("cuCtxSetCurrent", source))
    }

    fn ensure_events(&self, n: usize) -> Result<(), NcclError> {
        let mut events = self.events.borrow_mut();
        while events.len() < n {
            let event = self
                .stream
                .context()
                .new_event(None)
                .map_err(|source| self.cuda_error("cuEventCreate", source))?;
            events.push(event);
        }
        Ok(())
    }

    /// The peers a step waits for.
    fn step_peers(&self, step: &Step<'_>) -> Vec<usize> {
        match step {
            Step::P2p { peer, .. } => vec![*peer],
            Step::Broadcast { root, .. } if *root != self.rank => vec![*root],
            Step::Broadcast { .. } | Step::AllReduceSum { .. } => {
                (0..self.world).filter(|&r| r != self.rank).collect()
            }
        }
    }

    /// Byte `(offset, length)` of each peer's block, checked against the buffer length.
    fn byte_offsets(
        &self,
        field: &'static str,
        counts: &[usize],
        len: usize,
        elem: usize,
    ) -> Result<Vec<(usize, usize)>, NcclError> {
        if counts.len() != self.world {
            return Err(self.invalid(
                field,
                format!("{} counts for a world of {}", counts.len(), self.world),
            ));
        }
        let mut offsets = Vec::with_capacity(counts.len());
        let mut total = 0usize;
        for (peer, &count) in counts.iter().enumerate() {
            let end = total.checked_add(count).filter(|&end| end <= len);
            let Some(end) = end else {
                return Err(self.invalid(
                    field,
                    format!(
                        "the block for peer {peer} ({count} elements at element {total}) ends \
                         past the buffer's {len} elements"
                    ),
                ));
            };
            // `end <= len` elements of a live allocation, so byte sizes cannot overflow.
            offsets.push((total * elem, count * elem));
            total = end;
        }
        Ok(offsets)
    }

    fn invalid(&self, field: &'static str, what: String) -> NcclError {
        NcclError::InvalidArgument {
            rank: Some(self.rank),
            field,
            what,
        }
    }

    fn cuda_error(&self, call: &'static str, source: DriverError) -> NcclError {
        NcclError::Cuda {
            call,
            rank: Some(self.rank),
            device: self.device,
            source,
        }
    }

    /// Aborts after a deadline and builds the error.
    fn timeout(&self, op: String, peers: Vec<usize>, started: Instant) -> NcclError {
        let waited = started.elapsed();
        self.abort_with(format!(
            "{op} with peer(s) {peers:?} timed out after {waited:?}"
        ));
        NcclError::Timeout {
            rank: self.rank,
            op,
            peers,
            waited,
        }
    }

    /// Aborts after a failed call and builds the error (with NCCL's last message).
    fn fail(&self, err: CallError, peers: Vec<usize>) -> NcclError {
        let raw = self.raw.get();
        // SAFETY: `raw` is live or null (both accepted) until the abort below.
        let last = unsafe { result::last_error(raw) };
        let error = err.into_error(Some(self.rank), peers, last);
        self.abort_with(error.to_string());
        error
    }

    fn fail_with(&self, failure: Failure, call: &'static str, peers: Vec<usize>) -> NcclError {
        match failure {
            Failure::Call(err) => self.fail(err, peers),
            Failure::Async(code) => self.fail(CallError { call, code }, peers),
            Failure::Cuda(call, source) => {
                let error = self.cuda_error(call, source);
                self.abort_with(error.to_string());
                error
            }
        }
    }

    /// Aborts the NCCL communicators (those still live: data first, then control), remembers
    /// why, and gives aborted kernels a moment to leave the stream.
    fn abort_with(&self, reason: String) {
        let raw = self.raw.replace(std::ptr::null_mut());
        let control = self.control.replace(std::ptr::null_mut());
        {
            let mut aborted = self.aborted.borrow_mut();
            if aborted.is_none() {
                *aborted = Some(reason);
            }
        }
        if raw.is_null() && control.is_null() {
            return;
        }
        let _ = self.bind();
        for handle in [raw, control] {
            if !handle.is_null() {
                // SAFETY: `handle` is live and, having been swapped out above, never used
                // again.
                let _ = unsafe { result::comm_abort(handle) };
            }
        }
        // Aborted NCCL kernels notice the abort flag and exit; wait briefly so buffers the
        // caller frees next are no longer in use.
        if let Ok(event) = self.stream.record_event(None) {
            let _ = poll_until(Deadline::after(ABORT_DRAIN), || {
                Ok::<_, ()>(match event.try_is_complete() {
                    Ok(false) => Poll::Pending,
                    _ => Poll::Ready(()),
                })
            });
        }
    }

    /// Finalizes and destroys the data communicator, then the control communicator it shares
    /// resources with; aborts what is left on failure or expiry.
    fn shutdown(&self, deadline: Deadline) -> Result<(), NcclError> {
        if self.raw.get().is_null() && self.control.get().is_null() {
            return Ok(());
        }
        let started = Instant::now();
        self.bind()?;
        for cell in [&self.raw, &self.control] {
            let handle = cell.get();
            if handle.is_null() {
                continue;
            }
            // SAFETY: `handle` is live and has not been finalized (each handle is finalized
            // at most once: its cell is nulled below before it is destroyed).
            match unsafe { result::comm_finalize(handle) } {
                Ok(Progress::Done) => {}
                Ok(Progress::InProgress) => {
                    let others: Vec<usize> = (0..self.world).filter(|&r| r != self.rank).collect();
                    self.wait_ready(
                        handle,
                        "ncclCommFinalize",
                        "close",
                        &others,
                        started,
                        deadline,
                    )?;
                }
                Err(err) => return Err(self.fail(err, Vec::new())),
            }
            cell.set(std::ptr::null_mut());
            // SAFETY: `handle` is live and finalized; it is not used after this call.
            if let Err(err) = unsafe { result::comm_destroy(handle) } {
                let error = err.into_error(Some(self.rank), Vec::new(), String::new());
                self.abort_with(error.to_string());
                return Err(error);
            }
        }
        Ok(())
    }
}

impl P2pOp<'_> {
    /// An op over memory the caller keeps borrowed (crate-internal: `all_to_all_v`).
    fn from_parts(
        kind: P2pKind,
        peer: usize,
        ptr: CUdeviceptr,
        bytes: usize,
        after: Option<Arc<CudaStream>>,
    ) -> P2pOp<'static> {
        // SAFETY: crate-internal; callers keep the memory borrowed until the exchange returns.
        let mut op = unsafe {
            match kind {
                P2pKind::Send => P2pOp::send_raw(peer, ptr, bytes),
                P2pKind::Recv => P2pOp::recv_raw(peer, ptr, bytes),
            }
        };
        op.after = after;
        op
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.raw.get().is_null() || !self.control.get().is_null() {
            let _ = self.shutdown(Deadline::after(DROP_GRACE));
        }
    }
}

/// Asks NCCL (once per process, before the first communicator reads its parameters) to open
/// collective connections when a communicator is created rather than at its first
/// collective, so that a blocking data communicator never waits for peers while launching.
/// An explicit `NCCL_RUNTIME_CONNECT` in the environment wins.
fn prefer_init_time_connections() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("NCCL_RUNTIME_CONNECT").is_none() {
            std::env::set_var("NCCL_RUNTIME_CONNECT", "0");
        }
    });
}

/// The rank and world size as NCCL's `int`s, checked.
fn check_rank(rank: usize, world: usize) -> Result<(c_int, c_int), NcclError> {
    let invalid = |what: String| NcclError::InvalidArgument {
        rank: Some(rank),
        field: "rank",
        what,
    };
    if world == 0 || rank >= world {
        return Err(invalid(format!(
            "rank {rank} is outside a world of {world}"
        )));
    }
    let world_c = c_int::try_from(world)
        .map_err(|_| invalid(format!("a world of {world} ranks is too large for NCCL")))?;
    // rank < world <= c_int::MAX.
    Ok((rank as c_int, world_c))
}

/// `op`, plus the round/chunk of a multi-group operation, for messages.
fn describe(op: &str, step: &Step<'_>, steps: usize) -> String {
    match step {
        Step::P2p {
            round: Some(round),
            chunk,
            ..
        } if steps > 1 => format!("{op} (round {round}, chunk {chunk})"),
        Step::P2p {
            round: None, chunk, ..
        } if steps > 1 => format!("{op} (local copy, chunk {chunk})"),
        _ => op.to_owned(),
    }
}
