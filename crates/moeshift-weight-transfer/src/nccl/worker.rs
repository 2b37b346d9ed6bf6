//! [`NcclWorker`]: the receiving side of the NCCL engine.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream};
use moeshift_device_comm::nccl::NcclComm;
use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;
use moeshift_tensor::CudaBuffer;

use super::{dense_groups, describe_params, grow_chunk_buffer, DeviceSide, NcclConfig};
use crate::control::{
    receive_update, worker_control_methods, Failure, Staged, WorkerControl, WorkerPayload,
    TRAINER_RANK,
};
use crate::device::memory::{self, DeviceAlloc, MemError, SpanMut};
use crate::device::sparse::SparseStage;
use crate::device::{check_storages, mem_error, DeviceStorage};
use crate::engine::{Capabilities, PreparedUpdate, UpdateReport, WorkerEngine};
use crate::error::TransferError;
use crate::info::UpdateKind;
use crate::packing::{plan_chunks, ChunkHeader};
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
            staged: _,
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

    /// Unpacked dense: each group of [`dense_groups`] straight into the live parameters, in
    /// one grouped broadcast.
    fn receive_dense(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
        deadline: Deadline,
    ) -> Result<(), Failure> {
        let (rank, device) = (self.rank(), self.device);
        let params = &update.update.params;
        for group in dense_groups(params) {
            let metas = params.get(group.clone()).unwrap_or(&[]);
            let what = format!("receiving the values of {}", describe_params(metas));
            let slots = update.slots.get(group).ok_or_else(|| {
                Failure::Fatal(TransferError::Config {
                    detail: format!("rank {rank}: {what}: the update lists fewer slots"),
                })
            })?;
            let mut storages = registry
                .storages_mut(slots)
                .map_err(|e| Failure::Fatal(e.into()))?;
            let mut parts: Vec<(SpanMut<'_>, usize, usize)> = storages
                .iter_mut()
                .zip(metas)
                .map(|(storage, meta)| (SpanMut::of_storage(&mut **storage), 0, meta.byte_len()))
                .collect();
            memory::broadcast_many_recv(&self.comm, &mut parts, TRAINER_RANK, deadline)
                .map_err(|e| Failure::Fatal(mem_error(rank, device, what)(e)))?;
        }
        Ok(())
    }

    /// Queues the copies of chunk buffer `b` (holding `header`, whose entries are the
    /// update's parameters from position `first`) into the parameters, on the copy stream.
    fn unpack(
        &self,
        b: usize,
        header: &ChunkHeader,
        first: usize,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
    ) -> Result<(), TransferError> {
        let (rank, device) = (self.rank(), self.device);
        let what = format!("unpacking chunk {} of {}", header.seq, header.total);
        let Some(buf) = self.slots.get(b).and_then(Option::as_ref) else {
            return Err(TransferError::Config {
                detail: format!("rank {rank}: {what}: chunk buffer {b} missing"),
            });
        };
        let src = buf.span();
        for (k, entry) in header.entries.iter().enumerate() {
            let Some(&slot) = update.slots.get(first + k) else {
                return Err(TransferError::Config {
                    detail: format!("rank {rank}: {what}: more tensors than the update has"),
                });
            };
            let mut dst = SpanMut::of_storage(registry.storage_mut(slot)?);
            memory::copy(
                &self.copy_stream,
                &mut dst,
                0,
                &src,
                entry.offset as usize,
                entry.len as usize,
            )
            .map_err(mem_error(rank, device, what.clone()))?;
        }
        Ok(())
    }

    fn receive_packed(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
        deadline: Deadline,
    ) -> Result<Received, Failure> {
        let plan = plan_chunks(&update.update.params, self.config.packed_buffer_size_bytes)
            .map_err(|e| Failure::Fatal(e.into()))?;
        let mut problem: Option<TransferError> = None;
        let mut total = plan.len() as u32;
        let mut seq = 0u32;
        let mut next_param = 0usize;
        let mut last = None;
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
                // parameters, in order.
                let first = next_param;
                next_param += header.entries.len();
                if seq + 1 == total {
                    // The last chunk waits in its buffer for the status round (`commit`).
                    last = Some(LastChunk {
                        buffer: b,
                        first,
                        header,
                    });
                } else {
                    // Unpack on the copy stream while the next chunk arrives.
                    self.unpack(b, &header, first, update, registry)
                        .map_err(Failure::Fatal)?;
                    self.unpacked[b].record(&self.copy_stream).map_err(|e| {
                        Failure::Fatal(self.mem(format!("recording {what}"))(e.into()))
                    })?;
                }
            }
            seq += 1;
        }
        self.copy_stream
            .synchronize()
            .map_err(|e| Failure::Fatal(self.mem("finishing the unpacking")(e.into())))?;
        match problem {
            Some(e) => Err(Failure::Refused(e)),
            None => Ok(Received {
                chunks: plan.len(),
                last,
            }),
        }
    }

    /// Receives the arrays of a staged sparse update into the staging area (see
    /// [`WorkerPayload::receive_staged`]).
    fn receive_arrays(&mut self, staged: Staged, deadline: Deadline) -> Result<(), TransferError> {
        let (rank, device) = (self.rank(), self.device);
        let size = |n: u64| {
            usize::try_from(n).map_err(|_| TransferError::Protocol {
                rank,
                peer: TRAINER_RANK,
                detail: format!("a staged sparse payload of {n} bytes does not fit this machine"),
            })
        };
        let (index_bytes, value_bytes) = (size(staged.index_bytes)?, size(staged.value_bytes)?);
        self.stage
            .reserve(index_bytes, value_bytes)
            .map_err(mem_error(
                rank,
                device,
                format!("allocating a {index_bytes} + {value_bytes}-byte sparse staging area"),
            ))?;
        let err = mem_error(rank, device, "receiving the staged sparse patches");
        let (idx, vals) = match self.stage.buffers_mut() {
            Ok(b) => b,
            Err(e) => return Err(err(e)),
        };
        let mut parts = [(idx, 0, index_bytes), (vals, 0, value_bytes)];
        memory::broadcast_many_recv(&self.comm, &mut parts, TRAINER_RANK, deadline).map_err(err)
    }

    /// Checks the staged sparse update against its announcement: the sizes, then every
    /// index with one kernel and one device-to-host copy; the first problem is a refusal.
    fn check_staged(&mut self, update: &PreparedUpdate) -> Result<(), Failure> {
        let r = &update.update;
        let rank = self.rank();
        let refuse = |detail: String| {
            Failure::Refused(TransferError::Protocol {
                rank,
                peer: TRAINER_RANK,
                detail,
            })
        };
        let Some(staged) = self.control.staged else {
            return Err(refuse(
                "a sparse update arrived without its staged payload".into(),
            ));
        };
        let Some(layout) = SparseLayout::new(&r.params, &r.num_updates) else {
            return Err(refuse("the sparse update is too large to stage".into()));
        };
        if layout.index_bytes() as u64 != staged.index_bytes
            || layout.value_bytes as u64 != staged.value_bytes
        {
            return Err(refuse(format!(
                "the trainer staged {} + {} bytes of indices and values; the announced update \
                 lays out as {} + {}",
                staged.index_bytes,
                staged.value_bytes,
                layout.index_bytes(),
                layout.value_bytes
            )));
        }
        self.stage
            .set_layout(layout.clone())
            .map_err(|e| Failure::Fatal(self.mem("allocating the sparse check table")(e)))?;
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

/// The last chunk of a packed update, received and waiting in its buffer for the status
/// round.
struct LastChunk {
    buffer: usize,
    /// Position in the update of the chunk's first parameter.
    first: usize,
    header: ChunkHeader,
}

/// What the NCCL worker's payload step hands its commit step.
pub(crate) struct Received {
    /// Chunks received (packed updates).
    chunks: usize,
    /// A packed update's last chunk, still to unpack.
    last: Option<LastChunk>,
}

impl<S: DeviceStorage> WorkerPayload for NcclWorker<S> {
    type Plan = ();
    /// A sparse update is still staged, and a packed one's last chunk still in its buffer.
    type Received = Received;

    fn control(&mut self) -> &mut WorkerControl {
        &mut self.control
    }

    fn receive_staged(&mut self, staged: Staged, deadline: Deadline) -> Result<(), TransferError> {
        self.receive_arrays(staged, deadline)
    }

    fn check(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
    ) -> Result<(), TransferError> {
        // Every parameter's memory must be usable by this engine.
        check_storages(self.rank(), self.device, update, registry)?;
        match (update.update.kind, self.control.staged.is_some()) {
            (UpdateKind::SparseFlat, false) => Err(self
                .control
                .protocol("a sparse update was announced without its staged payload".into())),
            (UpdateKind::Dense, true) => Err(self
                .control
                .protocol("a dense update was announced with a staged payload".into())),
            _ => Ok(()),
        }
    }

    fn receive_payload(
        &mut self,
        update: &PreparedUpdate,
        _plan: (),
        registry: &mut ParamRegistry<S>,
        deadline: Deadline,
    ) -> Result<Received, Failure> {
        let nothing_left = Received {
            chunks: 0,
            last: None,
        };
        let r = &update.update;
        match (r.kind, r.packed) {
            (UpdateKind::Dense, false) => self
                .receive_dense(update, registry, deadline)
                .map(|()| nothing_left),
            (UpdateKind::Dense, true) => self.receive_packed(update, registry, deadline),
            (UpdateKind::SparseFlat, _) => self.check_staged(update).map(|()| nothing_left),
        }
    }

    fn commit(
        &mut self,
        update: &PreparedUpdate,
        received: Received,
        registry: &mut ParamRegistry<S>,
    ) -> Result<usize, TransferError> {
        if update.update.kind == UpdateKind::SparseFlat {
            // Every worker staged and checked its patches: apply.
            self.apply_sparse(update, registry)?;
        }
        if let Some(last) = received.last {
            // Every rank received the whole update: unpack its last chunk.
            let unpacked = self.unpack(last.buffer, &last.header, last.first, update, registry);
            // Wait for what was queued also after a failure: nothing may still write the
            // parameters once this returns.
            let waited = self.copy_stream.synchronize();
            unpacked?;
            waited.map_err(|e| self.mem("unpacking the last chunk")(e.into()))?;
        }
        Ok(received.chunks)
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
        crate::control::finish(self, deadline)
    }

    fn abort(&mut self) {
        self.control.end_session();
    }
}
