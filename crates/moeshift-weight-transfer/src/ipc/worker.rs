//! [`IpcWorker`]: the receiving side of the CUDA-IPC engine.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaStream;
use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;
use moeshift_tensor::CudaBuffer;

use super::{ChunkNotice, IpcConfig};
use crate::control::{status_ok, WorkerControl, TRAINER_RANK};
use crate::device::memory::{self, IpcMapping, MemError, SpanMut};
use crate::device::{check_storage, context, mem_error, DeviceStorage};
use crate::engine::{Announcement, Capabilities, PreparedUpdate, UpdateReport, WorkerEngine};
use crate::error::TransferError;
use crate::packing::{plan_chunks, PackError};
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
    /// parameter position.
    fn copy_chunk(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
        seq: u32,
        expected: Option<&crate::packing::ChunkHeader>,
        next_param: &mut usize,
        deadline: Deadline,
    ) -> Result<u32, Step> {
        let raw = self
            .control
            .group
            .recv(TRAINER_RANK, deadline)
            .map_err(|e| {
                Step::Fatal(self
                    .control
                    .comm(format!("receiving the notice of chunk {seq}"))(
                    e
                ))
            })?;
        let notice = ChunkNotice::decode(&raw).map_err(|e| Step::Refused(e.into()))?;
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
        check.map_err(|e| Step::Refused(e.into()))?;
        let m = self.mapping(&notice).map_err(Step::Refused)?;
        let (rank, device) = (self.control.rank(), self.device);
        let what = format!("copying chunk {seq} of {total} out of the trainer's buffer");
        let err = |e: MemError| Step::Refused(mem_error(rank, device, what.clone())(e));
        let slots = update
            .slots
            .get(*next_param..*next_param + notice.header.entries.len())
            .ok_or_else(|| {
                Step::Refused(TransferError::Config {
                    detail: format!("rank {rank}: chunk {seq} lists more tensors than the update"),
                })
            })?;
        let mut dsts = registry
            .storages_mut(slots)
            .map_err(|e| Step::Refused(e.into()))?;
        let src = match self.mappings.get(m) {
            Some((_, mapping)) => mapping.span(),
            None => {
                return Err(Step::Refused(TransferError::Config {
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

/// The outcome of one chunk that failed.
enum Step {
    /// This worker cannot apply the chunk; the others hear it in the chunk's status round.
    Refused(TransferError),
    /// The control group broke.
    Fatal(TransferError),
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

    fn rank(&self) -> usize {
        self.control.rank()
    }

    fn start(&mut self, _deadline: Deadline) -> Result<(), TransferError> {
        // Let pending work on the parameters finish before they change.
        self.stream.context().synchronize().map_err(|e| {
            mem_error(self.control.rank(), self.device, "waiting for pending work")(e.into())
        })
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
        let rank = self.control.rank();
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
        let plan = plan_chunks(&update.update.params, self.config.packed_buffer_size_bytes);
        let problem = unusable.or_else(|| plan.as_ref().err().map(|e| e.clone().into()));
        if let Some(e) = problem {
            return Err(self.control.fail_round(e, "vote", deadline));
        }
        let plan = plan.unwrap_or_default();
        self.control.status_round(status_ok(), "vote", deadline)?;
        let mut total = plan.len() as u32;
        let mut seq = 0u32;
        let mut next_param = 0usize;
        while seq < total {
            let what = format!("chunk {seq}");
            match self.copy_chunk(
                update,
                registry,
                seq,
                plan.get(seq as usize),
                &mut next_param,
                deadline,
            ) {
                Ok(t) => {
                    total = t;
                    self.control.status_round(status_ok(), &what, deadline)?;
                }
                Err(Step::Fatal(e)) => return Err(e),
                Err(Step::Refused(e)) => return Err(self.control.fail_round(e, &what, deadline)),
            }
            seq += 1;
        }
        self.control.status_round(status_ok(), "commit", deadline)?;
        self.control.updates += 1;
        Ok(UpdateReport {
            params: update.slots.len(),
            payload_bytes: update.update.payload_bytes(),
            chunks: plan.len(),
            elapsed: started.elapsed(),
        })
    }

    fn finish(&mut self, deadline: Deadline) -> Result<(), TransferError> {
        // Close the mappings before the trainer may free its buffer (freeing an exported
        // allocation that another process still has open is undefined behaviour in CUDA).
        self.mappings.clear();
        self.control.finish(deadline)
    }

    fn abort(&mut self) {
        self.mappings.clear();
        self.control.end_session();
    }
}
