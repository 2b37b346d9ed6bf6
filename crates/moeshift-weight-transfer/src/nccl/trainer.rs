//! [`NcclTrainer`]: the sending side of the NCCL engine.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaStream};
use moeshift_device_comm::nccl::NcclComm;
use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;

use super::{dense_groups, describe_params, grow_chunk_buffer, DeviceSide, NcclConfig};
use crate::auto::{AutoPolicy, Choice};
use crate::control::{send_session, Staged, TrainerControl, TrainerPayload, TRAINER_RANK};
use crate::device::jobs::{fill, DenseSrc, Job, SparseSrc};
use crate::device::memory::{self, overlaps, DeviceAlloc, MemError, Span};
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
use crate::progress::{Observer, Progress, Tracker};
use crate::sparse_layout::SparseLayout;

/// Alignment of each value staged in the dense staging buffer.
const STAGE_ALIGN: usize = 256;

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
    /// Recorded after the staging copies of a sparse update or a dense group.
    staged_event: CudaEvent,
    stage: SparseStage,
    progress: Option<Observer>,
}

impl std::fmt::Debug for NcclTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclTrainer")
            .field("control", &self.control)
            .field("config", &self.config)
            .field("device", &self.device)
            .field("broken", &self.is_broken())
            .field("progress", &self.progress.is_some())
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
            staged: staged_event,
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
            staged_event,
            stage,
            progress: None,
        })
    }

    /// Calls `observer` when an update's payload starts and after every payload operation
    /// (a dense group, a packed chunk, a whole sparse update; see [`Progress`]). It runs on
    /// the sending thread, so it should be quick.
    pub fn set_progress(&mut self, observer: impl FnMut(&Progress) + Send + 'static) {
        self.progress = Some(Box::new(observer));
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

    /// Orders the staging copies queued so far on the packing stream before the next
    /// broadcast on the communicator's stream.
    fn order_staging(&self, what: &str) -> Result<(), TransferError> {
        self.staged_event
            .record(&self.pack_stream)
            .and_then(|()| self.comm.stream().wait(&self.staged_event))
            .map_err(|e| self.mem(format!("ordering {what} after its staging"))(e.into()))
    }

    /// Unpacked dense: each group of [`dense_groups`] in one grouped broadcast, device
    /// values in place; host values, and device values overlapping another of the group,
    /// staged in chunk buffer 0 first.
    fn send_dense(
        &mut self,
        params: &[(&ParamMeta, DenseSrc<'_>)],
        metas: &[ParamMeta],
        tracker: &mut Tracker,
        deadline: Deadline,
    ) -> Result<usize, TransferError> {
        let device = self.device;
        let mut bytes = 0;
        for group in dense_groups(metas) {
            let entries = params.get(group.clone()).unwrap_or(&[]);
            let what = format!(
                "the values of {}",
                describe_params(metas.get(group).unwrap_or(&[]))
            );
            // Where each staged value goes in the buffer; `None`: broadcast in place.
            let mut staged_at: Vec<Option<usize>> = Vec::with_capacity(entries.len());
            let mut in_place: Vec<(u64, usize)> = Vec::new();
            let mut staged_len = 0usize;
            for (meta, src) in entries {
                let stage = match src {
                    DenseSrc::Host(_) => true,
                    DenseSrc::Device(span) => {
                        let range = (span.addr(), span.len());
                        let clash = in_place.iter().any(|&r| overlaps(r, range));
                        if !clash {
                            in_place.push(range);
                        }
                        clash
                    }
                };
                if stage {
                    staged_at.push(Some(staged_len));
                    staged_len = meta
                        .byte_len()
                        .checked_next_multiple_of(STAGE_ALIGN)
                        .and_then(|n| staged_len.checked_add(n))
                        .ok_or_else(|| TransferError::Config {
                            detail: format!("staging {what}: the size overflows"),
                        })?;
                } else {
                    staged_at.push(None);
                }
            }
            if staged_len > 0 {
                self.slot(0, staged_len)?;
                let stream = Arc::clone(&self.pack_stream);
                let Some(buf) = self.slots[0].as_mut() else {
                    return Err(missing_buffer(device));
                };
                let mut span = buf.span_mut();
                for ((_, src), at) in entries.iter().zip(&staged_at) {
                    if let Some(at) = at {
                        fill(&stream, &mut span, *at, src).map_err(|e| {
                            mem_error(TRAINER_RANK, device, format!("staging {what}"))(e)
                        })?;
                    }
                }
                self.order_staging(&what)?;
            }
            let buffer = self.slots[0].as_ref().map(DeviceAlloc::span);
            let mut parts: Vec<(Span<'_>, usize, usize)> = Vec::with_capacity(entries.len());
            for ((meta, src), at) in entries.iter().zip(&staged_at) {
                let part = match (src, at, buffer) {
                    (_, Some(at), Some(buf)) => (buf, *at, meta.byte_len()),
                    (DenseSrc::Device(span), None, _) => (*span, 0, meta.byte_len()),
                    _ => return Err(missing_buffer(device)),
                };
                parts.push(part);
            }
            memory::broadcast_many_send(&self.comm, &parts, deadline)
                .map_err(self.mem(format!("broadcasting {what}")))?;
            let group_bytes: usize = entries.iter().map(|(m, _)| m.byte_len()).sum();
            bytes += group_bytes;
            tracker.step(&mut self.progress, group_bytes);
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
        tracker: &mut Tracker,
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
                return Err(missing_buffer(self.device));
            };
            self.broadcast(&buf.span(), 0, len, &what, deadline)?;
            bytes += len;
            tracker.step(&mut self.progress, len);
        }
        Ok(bytes)
    }

    /// Sparse, staged: every patch copied into the staging area on the packing stream (one
    /// kernel for all device patches), then the index array and the value array in one
    /// grouped broadcast.
    fn send_sparse(
        &mut self,
        params: &[(&ParamMeta, SparseSrc<'_>)],
        metas: &[ParamMeta],
        tracker: &mut Tracker,
        deadline: Deadline,
    ) -> Result<usize, TransferError> {
        let layout = sparse_layout(params, metas)?;
        let device = self.device;
        let stream = Arc::clone(&self.pack_stream);
        self.stage
            .prepare(layout.clone())
            .map_err(self.mem("allocating the sparse staging area"))?;
        // Host patches are uploaded one by one; device patches are gathered by one kernel.
        let mut gathered: Vec<(usize, Span<'_>, Span<'_>)> = Vec::new();
        {
            let (mut idx, mut vals) = self.stage.buffers_mut().map_err(mem_error(
                TRAINER_RANK,
                device,
                "staging the sparse patches",
            ))?;
            for (k, ((meta, src), e)) in params.iter().zip(&layout.entries).enumerate() {
                match src {
                    SparseSrc::Host(p) => {
                        memory::upload(&stream, &mut idx, e.index_start * 4, &p.index_bytes())
                            .and_then(|()| {
                                memory::upload(&stream, &mut vals, e.value_start, &p.values)
                            })
                            .map_err(|err| {
                                mem_error(
                                    TRAINER_RANK,
                                    device,
                                    format!("staging the patch of '{}'", meta.name()),
                                )(err)
                            })?;
                    }
                    SparseSrc::Device(p) => gathered.push((k, p.index_span(), p.value_span())),
                }
            }
        }
        self.stage.gather(&gathered).map_err(mem_error(
            TRAINER_RANK,
            device,
            format!(
                "gathering {} device patches into the staging area",
                gathered.len()
            ),
        ))?;
        let what = format!("the sparse patches of {}", describe_params(metas));
        self.order_staging(&what)?;
        let err = self.mem(format!("broadcasting {what}"));
        let arrays = self
            .stage
            .indices()
            .and_then(|i| Ok((i, self.stage.values()?)))
            .and_then(|(i, v)| {
                memory::broadcast_many_send(
                    &self.comm,
                    &[(i, 0, layout.index_bytes()), (v, 0, layout.value_bytes)],
                    deadline,
                )
            });
        arrays.map_err(err)?;
        let bytes = layout.payload_bytes();
        tracker.step(&mut self.progress, bytes);
        Ok(bytes)
    }
}

/// The staged layout of a sparse update (the same arithmetic on both sides).
fn sparse_layout(
    params: &[(&ParamMeta, SparseSrc<'_>)],
    metas: &[ParamMeta],
) -> Result<SparseLayout, TransferError> {
    let counts: Vec<usize> = params.iter().map(|(_, s)| s.nnz()).collect();
    SparseLayout::new(metas, &counts).ok_or_else(|| TransferError::Config {
        detail: "the sparse update is too large to stage".into(),
    })
}

fn missing_buffer(device: usize) -> TransferError {
    TransferError::Config {
        detail: format!("rank {TRAINER_RANK} (cuda:{device}): the staging buffer is missing"),
    }
}

impl TrainerPayload for NcclTrainer {
    type Update<'u> = Job<'u>;

    fn control(&mut self) -> &mut TrainerControl {
        &mut self.control
    }

    fn staged(&self, job: &Job<'_>, metas: &[ParamMeta]) -> Result<Option<Staged>, TransferError> {
        match job {
            Job::Sparse { params } => {
                let layout = sparse_layout(params, metas)?;
                Ok(Some(Staged {
                    index_bytes: layout.index_bytes() as u64,
                    value_bytes: layout.value_bytes as u64,
                }))
            }
            Job::Dense { .. } => Ok(None),
        }
    }

    fn send_payload(
        &mut self,
        index: u32,
        job: &Job<'_>,
        info: &UpdateInfo,
        metas: &[ParamMeta],
        deadline: Deadline,
    ) -> Result<usize, TransferError> {
        let total = info.resolve(None)?.payload_bytes();
        let session = self.control.session;
        let mut tracker = Tracker::start(&mut self.progress, session, index, total);
        match job {
            Job::Dense {
                params,
                packed: false,
            } => self.send_dense(params, metas, &mut tracker, deadline),
            Job::Dense {
                params,
                packed: true,
            } => self.send_packed(params, metas, &mut tracker, deadline),
            Job::Sparse { params } => self.send_sparse(params, metas, &mut tracker, deadline),
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
