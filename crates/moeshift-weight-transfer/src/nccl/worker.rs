//! [`NcclWorker`]: the receiving side of the NCCL engine.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaStream};
use moeshift_device_comm::nccl::NcclComm;
use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;
use moeshift_tensor::CudaBuffer;

use super::{connect, NcclConfig};
use crate::control::{status_ok, WorkerControl, TRAINER_RANK};
use crate::device::kernels::Kernels;
use crate::device::memory::{self, DeviceAlloc, MemError, SpanMut};
use crate::device::sparse::SparseStage;
use crate::device::{check_storage, context, mem_error, DeviceStorage};
use crate::engine::{Announcement, Capabilities, PreparedUpdate, UpdateReport, WorkerEngine};
use crate::error::TransferError;
use crate::info::UpdateKind;
use crate::packing::{plan_chunks, ChunkHeader, PackError};
use crate::patch::PatchError;
use crate::registry::ParamRegistry;
use crate::sparse_layout::SparseLayout;

/// The worker side of the NCCL engine: control rank and NCCL rank `rank_offset + index`, on
/// one GPU, writing parameters of storage type `S` (device memory on that GPU).
///
/// Not `Send`: a NCCL communicator stays on the thread that created it.
pub struct NcclWorker<S = CudaBuffer> {
    control: WorkerControl,
    config: NcclConfig,
    device: usize,
    comm: NcclComm,
    /// Unpacking chunks runs here, overlapping the next chunk's broadcast.
    copy_stream: Arc<CudaStream>,
    slots: [Option<DeviceAlloc>; 2],
    /// Recorded after a chunk buffer's unpacking; the next broadcast into it waits on it.
    unpacked: [CudaEvent; 2],
    stage: SparseStage,
    _storage: PhantomData<fn() -> S>,
}

impl<S> std::fmt::Debug for NcclWorker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclWorker")
            .field("control", &self.control)
            .field("config", &self.config)
            .field("device", &self.device)
            .field("broken", &self.comm.is_aborted())
            .finish()
    }
}

/// A problem found while receiving that keeps the stream in step (reported in the status
/// round), or one that does not (the transport broke).
enum Failure {
    Refused(TransferError),
    Fatal(TransferError),
}

impl<S: DeviceStorage> NcclWorker<S> {
    /// Worker `index` over the control `group`, on CUDA device `device`. Its control rank
    /// must be `config.rank_offset + index` (the group's members are ordered by NCCL rank).
    /// Every member calls its side's constructor before `deadline`: this creates the NCCL
    /// communicator.
    pub fn new(
        group: HostGroup,
        index: usize,
        device: usize,
        config: NcclConfig,
        deadline: Deadline,
    ) -> Result<Self, TransferError> {
        config.check(group.size())?;
        let nccl_rank = config.worker_rank(index, &group)?;
        let control = WorkerControl::new(group)?;
        let ctx = context(device, nccl_rank)?;
        let comm = connect(&control.group, nccl_rank, device, deadline)?;
        let cuda = |during: &'static str| {
            move |source| TransferError::Cuda {
                rank: nccl_rank,
                device,
                during: during.into(),
                source,
            }
        };
        let copy_stream = ctx
            .new_stream()
            .map_err(cuda("creating the unpacking stream"))?;
        let kernels = Kernels::load(&ctx).map_err(cuda("loading the kernels"))?;
        let event = || ctx.new_event(None).map_err(cuda("creating an event"));
        let unpacked = [event()?, event()?];
        // Fresh events count as complete, so the first broadcast into a buffer waits for
        // nothing.
        let stage = SparseStage::new(Arc::clone(&copy_stream), kernels);
        Ok(Self {
            control,
            config,
            device,
            comm,
            copy_stream,
            slots: [None, None],
            unpacked,
            stage,
            _storage: PhantomData,
        })
    }

    /// The control group.
    pub fn group(&self) -> &HostGroup {
        &self.control.group
    }

    /// The CUDA device the engine works on.
    pub fn device(&self) -> usize {
        self.device
    }

    /// True once the NCCL communicator was aborted: build a new engine.
    pub fn is_broken(&self) -> bool {
        self.comm.is_aborted()
    }

    fn rank(&self) -> usize {
        self.control.rank()
    }

    fn mem(&self, during: impl Into<String>) -> impl FnOnce(MemError) -> TransferError {
        mem_error(self.control.rank(), self.device, during)
    }

    fn slot(&mut self, i: usize, len: usize) -> Result<(), TransferError> {
        let ctx = Arc::clone(self.copy_stream.context());
        if self.slots[i].as_ref().is_none_or(|s| s.len() < len) {
            self.slots[i] = None;
            let alloc = DeviceAlloc::new(&ctx, len)
                .map_err(|e| self.mem(format!("allocating a {len}-byte chunk buffer"))(e.into()))?;
            self.slots[i] = Some(alloc);
        }
        Ok(())
    }

    fn receive_dense(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
        deadline: Deadline,
    ) -> Result<(), Failure> {
        for (meta, &slot) in update.update.params.iter().zip(&update.slots) {
            let err = self.mem(format!("receiving the values of '{}'", meta.name()));
            let storage = registry
                .storage_mut(slot)
                .map_err(|e| Failure::Fatal(e.into()))?;
            let mut dst = SpanMut::of_storage(storage);
            let len = dst.len();
            memory::broadcast_recv(&self.comm, &mut dst, 0, len, TRAINER_RANK, deadline)
                .map_err(|e| Failure::Fatal(err(e)))?;
        }
        Ok(())
    }

    fn receive_packed(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
        deadline: Deadline,
    ) -> Result<usize, Failure> {
        let plan = plan_chunks(&update.update.params, self.config.packed_buffer_size_bytes)
            .map_err(|e| Failure::Fatal(e.into()))?;
        let mut problem: Option<TransferError> = None;
        let mut total = plan.len() as u32;
        let mut seq = 0u32;
        let mut next_param = 0usize;
        while seq < total {
            let fatal = |e| {
                Failure::Fatal(self
                    .control
                    .comm(format!("receiving the header of chunk {seq}"))(
                    e
                ))
            };
            let raw = self
                .control
                .group
                .recv(TRAINER_RANK, deadline)
                .map_err(fatal)?;
            // A header that cannot be read does not say how long its payload is: the
            // collective cannot be followed any further.
            let header = ChunkHeader::decode(&raw).map_err(|e| Failure::Fatal(e.into()))?;
            total = header.total;
            if problem.is_none() {
                let check = match plan.get(seq as usize) {
                    Some(expected) => header.check_matches(expected),
                    None => Err(PackError::Sequence {
                        expected_seq: seq,
                        expected_total: plan.len() as u32,
                        got_seq: header.seq,
                        got_total: header.total,
                    }),
                };
                if let Err(e) = check {
                    problem = Some(e.into());
                }
            }
            // The broadcast is sized by the trainer's header (checksummed), so it matches
            // the trainer's even when this worker's plan does not.
            let len = usize::try_from(header.payload_len).unwrap_or(usize::MAX);
            let b = (seq % 2) as usize;
            self.slot(b, len).map_err(Failure::Fatal)?;
            let what = format!("chunk {seq} of {total}");
            self.comm
                .stream()
                .wait(&self.unpacked[b])
                .map_err(|e| Failure::Fatal(self.mem(format!("ordering {what}"))(e.into())))?;
            let err = self.mem(format!("receiving {what}"));
            let Some(buf) = self.slots[b].as_mut() else {
                return Err(Failure::Fatal(TransferError::Config {
                    detail: format!("rank {}: chunk buffer {b} missing", self.control.rank()),
                }));
            };
            memory::broadcast_recv(
                &self.comm,
                &mut buf.span_mut(),
                0,
                len,
                TRAINER_RANK,
                deadline,
            )
            .map_err(|e| Failure::Fatal(err(e)))?;
            if problem.is_none() {
                // The header matched the plan: its entries are this update's next
                // parameters, in order. Unpack on the copy stream while the next chunk
                // arrives.
                let src = buf.span();
                let (rank, device) = (self.control.rank(), self.device);
                let err = |e| mem_error(rank, device, format!("unpacking {what}"))(e);
                for entry in &header.entries {
                    let Some(&slot) = update.slots.get(next_param) else {
                        break;
                    };
                    next_param += 1;
                    let storage = registry
                        .storage_mut(slot)
                        .map_err(|e| Failure::Fatal(e.into()))?;
                    let mut dst = SpanMut::of_storage(storage);
                    memory::copy(
                        &self.copy_stream,
                        &mut dst,
                        0,
                        &src,
                        entry.offset as usize,
                        entry.len as usize,
                    )
                    .map_err(|e| Failure::Fatal(err(e)))?;
                }
                self.unpacked[b]
                    .record(&self.copy_stream)
                    .map_err(|e| Failure::Fatal(self.mem(format!("recording {what}"))(e.into())))?;
            }
            seq += 1;
        }
        self.copy_stream
            .synchronize()
            .map_err(|e| Failure::Fatal(self.mem("finishing the unpacking")(e.into())))?;
        match problem {
            Some(e) => Err(Failure::Refused(e)),
            None => Ok(plan.len()),
        }
    }

    /// Receives every patch into the staging area and checks all indices; returns the
    /// first problem as a refusal.
    fn receive_sparse(
        &mut self,
        update: &PreparedUpdate,
        deadline: Deadline,
    ) -> Result<(), Failure> {
        let r = &update.update;
        let layout = SparseLayout::new(&r.params, &r.num_updates).ok_or_else(|| {
            Failure::Fatal(TransferError::Config {
                detail: format!(
                    "rank {}: the sparse update is too large to stage",
                    self.rank()
                ),
            })
        })?;
        self.stage
            .prepare(layout.clone())
            .map_err(|e| Failure::Fatal(self.mem("allocating the sparse staging area")(e)))?;
        let (rank, device) = (self.rank(), self.device);
        for (meta, e) in r.params.iter().zip(&layout.entries) {
            let name = meta.name();
            let during = format!("receiving the indices of '{name}'");
            let fatal = |e| Failure::Fatal(mem_error(rank, device, during.clone())(e));
            let mut idx = self.stage.indices_mut().map_err(fatal)?;
            memory::broadcast_recv(
                &self.comm,
                &mut idx,
                e.index_start * 4,
                e.index_bytes(),
                TRAINER_RANK,
                deadline,
            )
            .map_err(fatal)?;
            let during = format!("receiving the values of '{name}'");
            let fatal = |e| Failure::Fatal(mem_error(rank, device, during.clone())(e));
            let mut vals = self.stage.values_mut().map_err(fatal)?;
            memory::broadcast_recv(
                &self.comm,
                &mut vals,
                e.value_start,
                e.value_bytes(),
                TRAINER_RANK,
                deadline,
            )
            .map_err(fatal)?;
        }
        let err = self.mem("checking the sparse indices");
        let firsts = self.stage.check().map_err(|e| Failure::Fatal(err(e)))?;
        let bad = firsts
            .iter()
            .zip(r.params.iter().zip(&layout.entries))
            .find_map(|(f, (meta, e))| f.map(|pos| (meta, e, pos as usize)));
        if let Some((meta, e, position)) = bad {
            let read = |at: usize| {
                self.stage
                    .index_at(e.index_start + at)
                    .map_err(|err| Failure::Fatal(self.mem("reading a bad index")(err)))
            };
            let index = read(position)?;
            let out_of_range = usize::try_from(index).map_or(true, |i| i >= e.numel);
            let patch_error = if out_of_range || position == 0 {
                PatchError::IndexOutOfRange {
                    name: meta.name().to_string(),
                    position,
                    index,
                    numel: e.numel,
                }
            } else {
                PatchError::NotIncreasing {
                    name: meta.name().to_string(),
                    position,
                    previous: read(position - 1)?,
                    index,
                }
            };
            return Err(Failure::Refused(patch_error.into()));
        }
        Ok(())
    }

    fn apply_sparse(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
    ) -> Result<(), TransferError> {
        let rank = self.control.rank();
        let mut spans: Vec<SpanMut<'_>> = registry
            .storages_mut(&update.slots)?
            .into_iter()
            .map(|s| SpanMut::of_storage(s))
            .collect();
        self.stage.scatter(&mut spans).map_err(mem_error(
            rank,
            self.device,
            "scattering the sparse values",
        ))
    }
}

impl<S: DeviceStorage> WorkerEngine for NcclWorker<S> {
    type Storage = S;

    fn name(&self) -> &'static str {
        "nccl"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            dense: true,
            packed: true,
            sparse: true,
            info_in_band: true,
        }
    }

    fn rank(&self) -> usize {
        self.control.rank()
    }

    fn start(&mut self, _deadline: Deadline) -> Result<(), TransferError> {
        if let Some(reason) = self.comm.abort_reason() {
            return Err(TransferError::Config {
                detail: format!(
                    "rank {}: the NCCL communicator was aborted earlier ({reason}); build a \
                     new engine",
                    self.rank()
                ),
            });
        }
        // Engines order only their own work: let pending work on the parameters (a forward
        // pass on another stream) finish before they change.
        self.copy_stream
            .context()
            .synchronize()
            .map_err(|e| self.mem("waiting for pending work on the device")(e.into()))
    }

    fn announcement(&mut self, deadline: Deadline) -> Result<Announcement, TransferError> {
        self.control.announcement(deadline)
    }

    fn reject(&mut self, reason: &TransferError, deadline: Deadline) -> Result<(), TransferError> {
        self.control.reject(reason, deadline)
    }

    fn receive(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
        deadline: Deadline,
    ) -> Result<UpdateReport, TransferError> {
        let started = Instant::now();
        // Before voting: every parameter's memory must be usable by this engine.
        let rank = self.rank();
        let unusable = update
            .update
            .params
            .iter()
            .zip(&update.slots)
            .find_map(|(meta, &slot)| {
                registry
                    .storages_mut(&[slot])
                    .map_err(TransferError::from)
                    .and_then(|s| match s.first() {
                        Some(s) => check_storage(rank, self.device, meta, &**s),
                        None => Ok(()),
                    })
                    .err()
            });
        if let Some(e) = unusable {
            return Err(self.control.fail_round(e, "vote", deadline));
        }
        self.control.status_round(status_ok(), "vote", deadline)?;
        let r = &update.update;
        let mut chunks = 0;
        let outcome = match (r.kind, r.packed) {
            (UpdateKind::Dense, false) => self.receive_dense(update, registry, deadline),
            (UpdateKind::Dense, true) => self
                .receive_packed(update, registry, deadline)
                .map(|n| chunks = n),
            (UpdateKind::SparseFlat, _) => self.receive_sparse(update, deadline),
        };
        match outcome {
            Ok(()) => {}
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Refused(e)) => return Err(self.control.fail_round(e, "commit", deadline)),
        }
        self.control.status_round(status_ok(), "commit", deadline)?;
        self.control.updates += 1;
        if r.kind == UpdateKind::SparseFlat {
            // Every worker staged and checked its patches: apply.
            self.apply_sparse(update, registry)?;
        }
        Ok(UpdateReport {
            params: update.slots.len(),
            payload_bytes: r.payload_bytes(),
            chunks,
            elapsed: started.elapsed(),
        })
    }

    fn finish(&mut self, deadline: Deadline) -> Result<(), TransferError> {
        self.control.finish(deadline)
    }

    fn abort(&mut self) {
        self.control.end_session();
    }
}
