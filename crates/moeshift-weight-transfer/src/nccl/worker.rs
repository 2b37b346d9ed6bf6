//! [`NcclWorker`]: the receiving side of the NCCL engine.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream};
use moeshift_device_comm::nccl::NcclComm;
use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;
use moeshift_tensor::CudaBuffer;

use super::{grow_chunk_buffer, DeviceSide, NcclConfig};
use crate::control::{
    receive_update, worker_control_methods, Failure, WorkerControl, WorkerPayload, TRAINER_RANK,
};
use crate::device::memory::{self, DeviceAlloc, MemError, SpanMut};
use crate::device::sparse::SparseStage;
use crate::device::{check_storages, mem_error, DeviceStorage};
use crate::engine::{Capabilities, PreparedUpdate, UpdateReport, WorkerEngine};
use crate::error::TransferError;
use crate::info::UpdateKind;
use crate::packing::plan_chunks;
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
        let DeviceSide {
            comm,
            stream: copy_stream,
            events: unpacked,
            stage,
        } = DeviceSide::open(
            &control.group,
            nccl_rank,
            device,
            "creating the unpacking stream",
            deadline,
        )?;
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
        grow_chunk_buffer(
            &mut self.slots[i],
            &ctx,
            len,
            self.control.rank(),
            self.device,
        )
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
            let during = format!("receiving the header of chunk {seq}");
            let header =
                self.control
                    .recv_chunk_header(seq, &plan, &mut problem, during, deadline)?;
            total = header.total;
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

impl<S: DeviceStorage> WorkerPayload for NcclWorker<S> {
    type Plan = ();
    /// The number of chunks received; a sparse update is still staged.
    type Received = usize;

    fn control(&mut self) -> &mut WorkerControl {
        &mut self.control
    }

    fn check(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
    ) -> Result<(), TransferError> {
        // Every parameter's memory must be usable by this engine.
        check_storages(self.rank(), self.device, update, registry)
    }

    fn receive_payload(
        &mut self,
        update: &PreparedUpdate,
        _plan: (),
        registry: &mut ParamRegistry<S>,
        deadline: Deadline,
    ) -> Result<usize, Failure> {
        let r = &update.update;
        match (r.kind, r.packed) {
            (UpdateKind::Dense, false) => {
                self.receive_dense(update, registry, deadline).map(|()| 0)
            }
            (UpdateKind::Dense, true) => self.receive_packed(update, registry, deadline),
            (UpdateKind::SparseFlat, _) => self.receive_sparse(update, deadline).map(|()| 0),
        }
    }

    fn commit(
        &mut self,
        update: &PreparedUpdate,
        chunks: usize,
        registry: &mut ParamRegistry<S>,
    ) -> Result<usize, TransferError> {
        if update.update.kind == UpdateKind::SparseFlat {
            // Every worker staged and checked its patches: apply.
            self.apply_sparse(update, registry)?;
        }
        Ok(chunks)
    }
}

impl<S: DeviceStorage> WorkerEngine for NcclWorker<S> {
    type Storage = S;

    fn name(&self) -> &'static str {
        "nccl"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    worker_control_methods!();

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

    fn receive(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
        deadline: Deadline,
    ) -> Result<UpdateReport, TransferError> {
        receive_update(self, update, registry, deadline)
    }

    fn finish(&mut self, deadline: Deadline) -> Result<(), TransferError> {
        self.control.finish(deadline)
    }

    fn abort(&mut self) {
        self.control.end_session();
    }
}
