//! [`IpcWorker`]: the receiving side of the CUDA-IPC engine.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::CudaStream;
use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;
use moeshift_tensor::CudaBuffer;

use super::{ChunkNotice, IpcConfig};
use crate::control::{
    receive_update, status_ok, worker_control_methods, Failure, WorkerControl, WorkerPayload,
    TRAINER_RANK,
};
use crate::device::memory::{self, IpcMapping, MemError, SpanMut};
use crate::device::{check_storages, context, mem_error, DeviceStorage};
use crate::engine::{Capabilities, PreparedUpdate, UpdateReport, WorkerEngine};
use crate::error::TransferError;
use crate::packing::{plan_chunks, ChunkHeader, PackError};
use crate::registry::ParamRegistry;

/// Exported buffers a worker keeps mapped (a trainer normally has one).
const MAPPINGS: usize = 2;

/// The worker side of the CUDA-IPC engine, on one GPU of the trainer's node, writing
/// parameters of storage type `S` (device memory on that GPU).
pub struct IpcWorker<S = CudaBuffer> {
    control: WorkerControl,
    config: IpcConfig,
    device: usize,
    stream: Arc<CudaStream>,
    /// Buffers opened in the current session by handle, most recent last; one mapping per
    /// export, closed when the session ends.
    mappings: Vec<([u8; 64], IpcMapping)>,
    _storage: PhantomData<fn() -> S>,
}

impl<S> std::fmt::Debug for IpcWorker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpcWorker")
            .field("control", &self.control)
            .field("config", &self.config)
            .field("device", &self.device)
            .field("mappings", &self.mappings.len())
            .finish()
    }
}

impl<S: DeviceStorage> IpcWorker<S> {
    /// A worker over the control `group` (its rank must not be 0) on CUDA device `device`.
    pub fn new(group: HostGroup, device: usize, config: IpcConfig) -> Result<Self, TransferError> {
        config.check()?;
        let control = WorkerControl::new(group)?;
        let rank = control.rank();
        let ctx = context(device, rank)?;
        let stream = ctx.new_stream().map_err(|source| TransferError::Cuda {
            rank,
            device,
            during: "creating the copy stream".into(),
            source,
        })?;
        Ok(Self {
            control,
            config,
            device,
            stream,
            mappings: Vec::new(),
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

    /// The mapping of `notice`'s buffer, opened on first use.
    fn mapping(&mut self, notice: &ChunkNotice) -> Result<usize, TransferError> {
        if let Some(i) = self.mappings.iter().position(|(h, _)| *h == notice.handle) {
            return Ok(i);
        }
        let len = usize::try_from(notice.buffer_len).unwrap_or(usize::MAX);
        let mapping =
            IpcMapping::open(self.stream.context(), &notice.handle, len).map_err(|source| {
                TransferError::Cuda {
                    rank: self.control.rank(),
                    device: self.device,
                    during:
                        "opening the trainer's CUDA IPC buffer (cuIpcOpenMemHandle; the trainer \
                         and its workers must share a node, and the buffer's GPU must be \
                         reachable from this one)"
                            .into(),
                    source,
                }
            })?;
        if self.mappings.len() >= MAPPINGS {
            self.mappings.remove(0);
        }
        self.mappings.push((notice.handle, mapping));
        Ok(self.mappings.len() - 1)
    }

    /// Reads one chunk notice and copies the chunk out. `next_param` is the update's next
    /// parameter position. A refusal is this worker's, to report in the chunk's status
    /// round; a fatal error means the control group broke.
    fn copy_chunk(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
        seq: u32,
        expected: Option<&ChunkHeader>,
        next_param: &mut usize,
        deadline: Deadline,
    ) -> Result<u32, Failure> {
        let raw = self
            .control
            .group
            .recv(TRAINER_RANK, deadline)
            .map_err(|e| {
                Failure::Fatal(self
                    .control
                    .comm(format!("receiving the notice of chunk {seq}"))(
                    e
                ))
            })?;
        let notice = ChunkNotice::decode(&raw).map_err(|e| Failure::Refused(e.into()))?;
        let total = notice.header.total;
        let check = match expected {
            Some(expected) => notice.header.check_matches(expected),
            None => Err(PackError::Sequence {
                expected_seq: seq,
                expected_total: seq,
                got_seq: notice.header.seq,
                got_total: notice.header.total,
            }),
        };
        check.map_err(|e| Failure::Refused(e.into()))?;
        let m = self.mapping(&notice).map_err(Failure::Refused)?;
        let (rank, device) = (self.control.rank(), self.device);
        let what = format!("copying chunk {seq} of {total} out of the trainer's buffer");
        let err = |e: MemError| Failure::Refused(mem_error(rank, device, what.clone())(e));
        let slots = update
            .slots
            .get(*next_param..*next_param + notice.header.entries.len())
            .ok_or_else(|| {
                Failure::Refused(TransferError::Config {
                    detail: format!("rank {rank}: chunk {seq} lists more tensors than the update"),
                })
            })?;
        let mut dsts = registry
            .storages_mut(slots)
            .map_err(|e| Failure::Refused(e.into()))?;
        let src = match self.mappings.get(m) {
            Some((_, mapping)) => mapping.span(),
            None => {
                return Err(Failure::Refused(TransferError::Config {
                    detail: format!("rank {rank}: IPC mapping missing"),
                }))
            }
        };
        for (dst, entry) in dsts.iter_mut().zip(&notice.header.entries) {
            let mut span = SpanMut::of_storage(&mut **dst);
            memory::copy(
                &self.stream,
                &mut span,
                0,
                &src,
                entry.offset as usize,
                entry.len as usize,
            )
            .map_err(err)?;
        }
        self.stream.synchronize().map_err(|e| err(e.into()))?;
        *next_param += notice.header.entries.len();
        Ok(total)
    }
}

impl<S: DeviceStorage> WorkerPayload for IpcWorker<S> {
    /// This worker's chunk plan.
    type Plan = Vec<ChunkHeader>;
    /// The number of chunks copied (each already applied).
    type Received = usize;

    fn control(&mut self) -> &mut WorkerControl {
        &mut self.control
    }

    fn check(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
    ) -> Result<Vec<ChunkHeader>, TransferError> {
        let unusable = check_storages(self.control.rank(), self.device, update, registry);
        let plan = plan_chunks(&update.update.params, self.config.packed_buffer_size_bytes);
        unusable?;
        Ok(plan?)
    }

    fn receive_payload(
        &mut self,
        update: &PreparedUpdate,
        plan: Vec<ChunkHeader>,
        registry: &mut ParamRegistry<S>,
        deadline: Deadline,
    ) -> Result<usize, Failure> {
        let mut total = plan.len() as u32;
        let mut seq = 0u32;
        let mut next_param = 0usize;
        while seq < total {
            // A refusal is reported in the round that follows this chunk on the trainer: the
            // chunk's own round, or the update's status round after the last chunk. Either
            // way it is the one round this worker still takes part in.
            total = self.copy_chunk(
                update,
                registry,
                seq,
                plan.get(seq as usize),
                &mut next_param,
                deadline,
            )?;
            if seq + 1 < total {
                self.control
                    .status_round(status_ok(), &format!("chunk {seq}"), deadline)
                    .map_err(Failure::Fatal)?;
            }
            seq += 1;
        }
        Ok(plan.len())
    }

    fn commit(
        &mut self,
        _update: &PreparedUpdate,
        chunks: usize,
        _registry: &mut ParamRegistry<S>,
    ) -> Result<usize, TransferError> {
        Ok(chunks)
    }
}

impl<S: DeviceStorage> WorkerEngine for IpcWorker<S> {
    type Storage = S;

    fn name(&self) -> &'static str {
        "ipc"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            dense: false,
            packed: true,
            sparse: false,
            info_in_band: true,
        }
    }

    worker_control_methods!();

    fn start(&mut self, _deadline: Deadline) -> Result<(), TransferError> {
        // Let pending work on the parameters finish before they change.
        self.stream.context().synchronize().map_err(|e| {
            mem_error(self.control.rank(), self.device, "waiting for pending work")(e.into())
        })
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
        // Close the mappings before the trainer may free its buffer (freeing an exported
        // allocation that another process still has open is undefined behaviour in CUDA).
        self.mappings.clear();
        crate::control::finish(self, deadline)
    }

    fn abort(&mut self) {
        self.mappings.clear();
        self.control.end_session();
    }
}
