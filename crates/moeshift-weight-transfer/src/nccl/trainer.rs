//! [`NcclTrainer`]: the sending side of the NCCL engine.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaStream};
use moeshift_device_comm::nccl::NcclComm;
use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;

use super::{grow_chunk_buffer, DeviceSide, NcclConfig};
use crate::auto::{AutoPolicy, Choice};
use crate::control::{send_session, TrainerControl, TrainerPayload, TRAINER_RANK};
use crate::device::jobs::{fill, DenseSrc, Job, SparseSrc};
use crate::device::memory::{self, DeviceAlloc, MemError, Span};
use crate::device::sparse::SparseStage;
use crate::device::{
    mem_error, DeviceAutoParam, DeviceDenseParam, DeviceDiff, DeviceOutgoing, DevicePatch,
    DeviceSparseParam,
};
use crate::engine::{Capabilities, Outgoing, SendReport, TrainerEngine};
use crate::error::TransferError;
use crate::info::UpdateInfo;
use crate::meta::ParamMeta;
use crate::packing::plan_chunks;
use crate::sparse_layout::SparseLayout;

/// The trainer side of the NCCL engine: control rank and NCCL rank 0, on one GPU.
///
/// Sends host bytes through [`TrainerEngine`] (uploaded to the GPU on the way) and device
/// memory through [`NcclTrainer::send_device_session`] and friends. Not `Send`: a NCCL
/// communicator stays on the thread that created it.
pub struct NcclTrainer {
    control: TrainerControl,
    config: NcclConfig,
    device: usize,
    comm: NcclComm,
    /// Packing runs here, overlapping the broadcasts on the communicator's stream.
    pack_stream: Arc<CudaStream>,
    slots: [Option<DeviceAlloc>; 2],
    packed_events: [CudaEvent; 2],
    stage: SparseStage,
}

impl std::fmt::Debug for NcclTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclTrainer")
            .field("control", &self.control)
            .field("config", &self.config)
            .field("device", &self.device)
            .field("broken", &self.is_broken())
            .finish()
    }
}

impl NcclTrainer {
    /// The trainer over the control `group` (its rank must be 0; its size is the NCCL
    /// world), on CUDA device `device`. Every member calls its side's constructor before
    /// `deadline`: this creates the NCCL communicator.
    pub fn new(
        group: HostGroup,
        device: usize,
        config: NcclConfig,
        deadline: Deadline,
    ) -> Result<Self, TransferError> {
        config.check(group.size())?;
        let control = TrainerControl::new(group, config.reuse_metadata)?;
        let DeviceSide {
            comm,
            stream: pack_stream,
            events: packed_events,
            stage,
        } = DeviceSide::open(
            &control.group,
            TRAINER_RANK,
            device,
            "creating the packing stream",
            deadline,
        )?;
        Ok(Self {
            control,
            config,
            device,
            comm,
            pack_stream,
            slots: [None, None],
            packed_events,
            stage,
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

    /// True once the NCCL communicator was aborted (a failure or a passed deadline): the
    /// engine refuses further sessions; build a new one.
    pub fn is_broken(&self) -> bool {
        self.comm.is_aborted()
    }

    /// Sends one session of updates whose values are in device memory on this engine's
    /// GPU. Every update is checked before the first byte leaves; empty updates are skipped.
    /// Waits for pending work on the device first (e.g. the optimizer step that produced
    /// the values).
    pub fn send_device_session(
        &mut self,
        updates: &[DeviceOutgoing<'_>],
        deadline: Deadline,
    ) -> Result<SendReport, TransferError> {
        let jobs = updates
            .iter()
            .map(|u| Job::from_device(u, self.device))
            .collect::<Result<Vec<_>, _>>()?;
        self.run(jobs, deadline)
    }

    /// One session with one dense update of device parameters, packed as configured.
    pub fn send_device_dense(
        &mut self,
        params: &[DeviceDenseParam<'_>],
        deadline: Deadline,
    ) -> Result<SendReport, TransferError> {
        let packed = self.config.packed;
        self.send_device_session(&[DeviceOutgoing::Dense { params, packed }], deadline)
    }

    /// One session with one sparse update of device patches.
    pub fn send_device_sparse(
        &mut self,
        params: &[DeviceSparseParam<'_>],
        deadline: Deadline,
    ) -> Result<SendReport, TransferError> {
        self.send_device_session(&[DeviceOutgoing::Sparse { params }], deadline)
    }

    /// Diffs every parameter on the GPU with `differ` and sends each the cheaper way under
    /// `policy` (see [`AutoPolicy`]): one session with a dense update then a sparse update.
    /// Unchanged parameters are left out.
    pub fn send_device_auto(
        &mut self,
        params: &[DeviceAutoParam<'_>],
        policy: &AutoPolicy,
        differ: &mut DeviceDiff,
        deadline: Deadline,
    ) -> Result<SendReport, TransferError> {
        let mut dense: Vec<DeviceDenseParam<'_>> = Vec::new();
        let mut patches: Vec<(&ParamMeta, DevicePatch)> = Vec::new();
        let mut unchanged = 0;
        for p in params {
            if p.meta.numel() > (i32::MAX as usize) + 1 {
                // Too large for int32 indices: always dense.
                dense.push(DeviceDenseParam {
                    meta: p.meta,
                    data: p.current,
                });
                continue;
            }
            let patch = differ.diff(p.meta, p.previous, p.current)?;
            match policy.choose(p.meta, patch.nnz()) {
                Choice::Unchanged => unchanged += 1,
                Choice::Dense => dense.push(DeviceDenseParam {
                    meta: p.meta,
                    data: p.current,
                }),
                Choice::Sparse => patches.push((p.meta, patch)),
            }
        }
        let sparse: Vec<DeviceSparseParam<'_>> = patches
            .iter()
            .map(|(meta, patch)| DeviceSparseParam { meta, patch })
            .collect();
        let packed = self.config.packed;
        let mut report = self.send_device_session(
            &[
                DeviceOutgoing::Dense {
                    params: &dense,
                    packed,
                },
                DeviceOutgoing::Sparse { params: &sparse },
            ],
            deadline,
        )?;
        report.unchanged_params = unchanged;
        Ok(report)
    }

    fn mem(&self, during: impl Into<String>) -> impl FnOnce(MemError) -> TransferError {
        mem_error(TRAINER_RANK, self.device, during)
    }

    fn run(&mut self, jobs: Vec<Job<'_>>, deadline: Deadline) -> Result<SendReport, TransferError> {
        let started = Instant::now();
        let mut checked = Vec::with_capacity(jobs.len());
        for job in jobs {
            if !job.is_empty() {
                let info = job.info()?;
                checked.push((job, info));
            }
        }
        if let Some(reason) = self.comm.abort_reason() {
            return Err(TransferError::Config {
                detail: format!(
                    "the NCCL communicator was aborted earlier ({reason}); build a new engine"
                ),
            });
        }
        self.stage_sync()?;
        send_session(self, &checked, started, deadline)
    }

    /// Waits for pending work on the device (the sources may still be being written).
    fn stage_sync(&self) -> Result<(), TransferError> {
        self.pack_stream
            .context()
            .synchronize()
            .map_err(|e| self.mem("waiting for pending work on the device")(e.into()))
    }

    /// Grows chunk buffer `i` to at least `len` bytes.
    fn slot(&mut self, i: usize, len: usize) -> Result<(), TransferError> {
        let ctx = Arc::clone(self.pack_stream.context());
        grow_chunk_buffer(&mut self.slots[i], &ctx, len, TRAINER_RANK, self.device)
    }

    fn broadcast(
        &self,
        src: &Span<'_>,
        offset: usize,
        len: usize,
        what: &str,
        deadline: Deadline,
    ) -> Result<(), TransferError> {
        memory::broadcast_send(&self.comm, src, offset, len, deadline)
            .map_err(self.mem(format!("broadcasting {what}")))
    }

    fn send_dense(
        &mut self,
        params: &[(&ParamMeta, DenseSrc<'_>)],
        deadline: Deadline,
    ) -> Result<usize, TransferError> {
        let mut bytes = 0;
        for (meta, src) in params {
            let what = format!("the values of '{}'", meta.name());
            match src {
                DenseSrc::Device(span) => self.broadcast(span, 0, span.len(), &what, deadline)?,
                DenseSrc::Host(data) => {
                    // Host bytes go through a device buffer.
                    self.slot(0, data.len())?;
                    let stream = Arc::clone(&self.pack_stream);
                    let err = self.mem(format!("uploading {what}"));
                    let Some(slot) = self.slots[0].as_mut() else {
                        continue;
                    };
                    memory::upload(&stream, &mut slot.span_mut(), 0, data)
                        .and_then(|()| stream.synchronize().map_err(MemError::from))
                        .map_err(err)?;
                    let Some(slot) = self.slots[0].as_ref() else {
                        continue;
                    };
                    self.broadcast(&slot.span(), 0, data.len(), &what, deadline)?;
                }
            }
            bytes += meta.byte_len();
        }
        Ok(bytes)
    }

    /// Packs chunk `header` into buffer `slot` on the packing stream and records its event.
    fn pack(
        &mut self,
        slot: usize,
        entries: &[(&ParamMeta, DenseSrc<'_>)],
        header: &crate::packing::ChunkHeader,
    ) -> Result<(), TransferError> {
        self.slot(slot, header.payload_len as usize)?;
        let stream = Arc::clone(&self.pack_stream);
        let err = self.mem(format!("packing chunk {}", header.seq));
        let Some(buf) = self.slots[slot].as_mut() else {
            return Ok(());
        };
        let mut span = buf.span_mut();
        for ((_, src), entry) in entries.iter().zip(&header.entries) {
            if let Err(e) = fill(&stream, &mut span, entry.offset as usize, src) {
                return Err(err(e));
            }
        }
        self.packed_events[slot]
            .record(&stream)
            .map_err(|e| self.mem(format!("recording chunk {}", header.seq))(e.into()))
    }

    fn send_packed(
        &mut self,
        params: &[(&ParamMeta, DenseSrc<'_>)],
        metas: &[ParamMeta],
        deadline: Deadline,
    ) -> Result<usize, TransferError> {
        let plan = plan_chunks(metas, self.config.packed_buffer_size_bytes)?;
        let mut starts = Vec::with_capacity(plan.len());
        let mut next = 0;
        for h in &plan {
            starts.push(next);
            next += h.entries.len();
        }
        let entries = |k: usize| -> &[(&ParamMeta, DenseSrc<'_>)] {
            let (s, h) = (starts[k], &plan[k]);
            params.get(s..s + h.entries.len()).unwrap_or(&[])
        };
        let mut bytes = 0;
        if let Some(first) = plan.first() {
            self.pack(0, entries(0), first)?;
        }
        for (k, header) in plan.iter().enumerate() {
            let slot = k % 2;
            // The other buffer's previous chunk has been broadcast (broadcasts return when
            // the GPU finished): pack the next chunk into it while this one is on the wire.
            if let Some(next_header) = plan.get(k + 1) {
                self.pack(1 - slot, entries(k + 1), next_header)?;
            }
            let what = format!("chunk {} of {}", header.seq, header.total);
            self.control
                .send_all(&header.encode(), &format!("the header of {what}"), deadline)?;
            self.comm
                .stream()
                .wait(&self.packed_events[slot])
                .map_err(|e| self.mem(format!("ordering {what} after its packing"))(e.into()))?;
            let len = header.payload_len as usize;
            let Some(buf) = self.slots[slot].as_ref() else {
                continue;
            };
            self.broadcast(&buf.span(), 0, len, &what, deadline)?;
            bytes += len;
        }
        Ok(bytes)
    }

    fn send_sparse(
        &mut self,
        params: &[(&ParamMeta, SparseSrc<'_>)],
        metas: &[ParamMeta],
        deadline: Deadline,
    ) -> Result<usize, TransferError> {
        // Host patches are staged in device memory first (device patches go as they are).
        let counts: Vec<usize> = params.iter().map(|(_, s)| s.nnz()).collect();
        let layout = SparseLayout::new(metas, &counts).ok_or_else(|| TransferError::Config {
            detail: "the sparse update is too large to stage".into(),
        })?;
        if params.iter().any(|(_, s)| matches!(s, SparseSrc::Host(_))) {
            let err = self.mem("staging the sparse patches");
            let stream = Arc::clone(&self.pack_stream);
            let staged: Result<(), MemError> = (|| {
                self.stage.prepare(layout.clone())?;
                for ((_, src), e) in params.iter().zip(&layout.entries) {
                    if let SparseSrc::Host(p) = src {
                        memory::upload(
                            &stream,
                            &mut self.stage.indices_mut()?,
                            e.index_start * 4,
                            &p.index_bytes(),
                        )?;
                        memory::upload(
                            &stream,
                            &mut self.stage.values_mut()?,
                            e.value_start,
                            &p.values,
                        )?;
                    }
                }
                stream.synchronize()?;
                Ok(())
            })();
            staged.map_err(err)?;
        }
        let mut bytes = 0;
        for ((meta, src), e) in params.iter().zip(&layout.entries) {
            let (idx, idx_off, vals, val_off) = match src {
                SparseSrc::Device(p) => (p.index_span(), 0, p.value_span(), 0),
                SparseSrc::Host(_) => {
                    let err = |e| self.mem("reading the staged patches")(e);
                    (
                        self.stage.indices().map_err(err)?,
                        e.index_start * 4,
                        self.stage.values().map_err(err)?,
                        e.value_start,
                    )
                }
            };
            let name = meta.name();
            self.broadcast(
                &idx,
                idx_off,
                e.index_bytes(),
                &format!("the indices of '{name}'"),
                deadline,
            )?;
            self.broadcast(
                &vals,
                val_off,
                e.value_bytes(),
                &format!("the values of '{name}'"),
                deadline,
            )?;
            bytes += e.index_bytes() + e.value_bytes();
        }
        Ok(bytes)
    }
}

impl TrainerPayload for NcclTrainer {
    type Update<'u> = Job<'u>;

    fn control(&mut self) -> &mut TrainerControl {
        &mut self.control
    }

    fn send_payload(
        &mut self,
        _index: u32,
        job: &Job<'_>,
        _info: &UpdateInfo,
        metas: &[ParamMeta],
        deadline: Deadline,
    ) -> Result<usize, TransferError> {
        match job {
            Job::Dense {
                params,
                packed: false,
            } => self.send_dense(params, deadline),
            Job::Dense {
                params,
                packed: true,
            } => self.send_packed(params, metas, deadline),
            Job::Sparse { params } => self.send_sparse(params, metas, deadline),
        }
    }
}

impl TrainerEngine for NcclTrainer {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    fn packs_dense(&self) -> bool {
        self.config.packed
    }

    fn send_session(
        &mut self,
        updates: &[Outgoing<'_>],
        deadline: Deadline,
    ) -> Result<SendReport, TransferError> {
        let jobs = updates
            .iter()
            .map(Job::from_host)
            .collect::<Result<Vec<_>, _>>()?;
        self.run(jobs, deadline)
    }
}
