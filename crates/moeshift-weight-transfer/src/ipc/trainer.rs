//! [`IpcTrainer`]: the sending side of the CUDA-IPC engine.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaStream;
use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;

use super::{ChunkNotice, IpcConfig};
use crate::control::{
    send_session, ParamCount, SessionUpdate, TrainerControl, TrainerPayload, TRAINER_RANK,
};
use crate::device::jobs::{fill, DenseSrc, Job};
use crate::device::memory::{DeviceAlloc, MemError};
use crate::device::{context, mem_error, DeviceDenseParam, DeviceOutgoing};
use crate::engine::{Capabilities, Outgoing, SendReport, TrainerEngine};
use crate::error::TransferError;
use crate::info::UpdateInfo;
use crate::meta::ParamMeta;
use crate::packing::{plan_chunks_within, ChunkHeader};
use crate::progress::{Observer, Progress, Tracker};

/// The trainer side of the CUDA-IPC engine: control rank 0, one GPU, one exported buffer of
/// exactly `packed_buffer_size_bytes`.
pub struct IpcTrainer {
    control: TrainerControl,
    config: IpcConfig,
    device: usize,
    stream: Arc<CudaStream>,
    buffer: DeviceAlloc,
    handle: [u8; 64],
    progress: Option<Observer>,
}

impl std::fmt::Debug for IpcTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpcTrainer")
            .field("control", &self.control)
            .field("config", &self.config)
            .field("device", &self.device)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl IpcTrainer {
    /// The trainer over the control `group` (its rank must be 0) on CUDA device `device`.
    /// Allocates and exports the buffer now, so a failure shows here.
    pub fn new(group: HostGroup, device: usize, config: IpcConfig) -> Result<Self, TransferError> {
        config.check()?;
        let control = TrainerControl::new(group, config.reuse_metadata)?;
        let ctx = context(device, TRAINER_RANK)?;
        let cuda = |during: String| {
            move |source| TransferError::Cuda {
                rank: TRAINER_RANK,
                device,
                during,
                source,
            }
        };
        let stream = ctx
            .new_stream()
            .map_err(cuda("creating the packing stream".into()))?;
        let size = config.packed_buffer_size_bytes;
        let buffer = DeviceAlloc::new(&ctx, size)
            .map_err(cuda(format!("allocating the {size}-byte IPC buffer")))?;
        let handle = buffer
            .ipc_handle()
            .map_err(cuda("exporting the IPC buffer (cuIpcGetMemHandle)".into()))?;
        Ok(Self {
            control,
            config,
            device,
            stream,
            buffer,
            handle,
            progress: None,
        })
    }

    /// Calls `observer` when an update's payload starts and after every chunk the workers
    /// were told about (see [`Progress`]). It runs on the sending thread, so it should be
    /// quick.
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

    /// Gives back the control group (the exported buffer is freed).
    pub fn into_group(self) -> HostGroup {
        self.control.group
    }

    /// Sends one session of dense updates whose values are in device memory on this
    /// engine's GPU (always packed). Waits for pending work on the device first.
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

    /// One session with one dense update of device parameters.
    pub fn send_device_dense(
        &mut self,
        params: &[DeviceDenseParam<'_>],
        deadline: Deadline,
    ) -> Result<SendReport, TransferError> {
        self.send_device_session(
            &[DeviceOutgoing::Dense {
                params,
                packed: true,
            }],
            deadline,
        )
    }

    fn mem(&self, during: impl Into<String>) -> impl FnOnce(MemError) -> TransferError {
        mem_error(TRAINER_RANK, self.device, during)
    }

    fn run(&mut self, jobs: Vec<Job<'_>>, deadline: Deadline) -> Result<SendReport, TransferError> {
        let started = Instant::now();
        let mut checked = Vec::with_capacity(jobs.len());
        for job in jobs {
            if job.is_empty() {
                continue;
            }
            let plan = match &job {
                Job::Dense { packed: true, .. } => {
                    plan_chunks_within(&job.metas(), self.config.packed_buffer_size_bytes)?
                }
                Job::Dense { packed: false, .. } => {
                    return Err(TransferError::Unsupported {
                        engine: "ipc",
                        what: "unpacked dense updates (it always packs into its exported buffer)"
                            .into(),
                    })
                }
                Job::Sparse { .. } => {
                    return Err(TransferError::Unsupported {
                        engine: "ipc",
                        what: "sparse updates (use the nccl engine)".into(),
                    })
                }
            };
            let info = job.info()?;
            // Only packed dense jobs are left (the others were refused above).
            if let Job::Dense { params, .. } = job {
                checked.push((Planned { params, plan }, info));
            }
        }
        self.stream
            .context()
            .synchronize()
            .map_err(|e| self.mem("waiting for pending work on the device")(e.into()))?;
        send_session(self, &checked, started, deadline)
    }

    fn send_chunks(
        &mut self,
        index: u32,
        params: &[(&ParamMeta, DenseSrc<'_>)],
        plan: &[ChunkHeader],
        deadline: Deadline,
    ) -> Result<usize, TransferError> {
        let total: usize = plan.iter().map(|h| h.payload_len as usize).sum();
        let session = self.control.session;
        let mut tracker = Tracker::start(&mut self.progress, session, index, total);
        let mut next = 0usize;
        for (k, header) in plan.iter().enumerate() {
            let what = format!("chunk {} of {}", header.seq, header.total);
            let entries = params.get(next..next + header.entries.len()).unwrap_or(&[]);
            next += header.entries.len();
            let stream = Arc::clone(&self.stream);
            let err = self.mem(format!("packing {what}"));
            let mut span = self.buffer.span_mut();
            let packed: Result<(), MemError> = entries
                .iter()
                .zip(&header.entries)
                .try_for_each(|((_, src), e)| fill(&stream, &mut span, e.offset as usize, src))
                .and_then(|()| stream.synchronize().map_err(MemError::from));
            packed.map_err(err)?;
            let notice = ChunkNotice {
                handle: self.handle,
                buffer_len: self.buffer.len() as u64,
                header: header.clone(),
            };
            self.control
                .send_all(&notice.encode(), &format!("the notice of {what}"), deadline)?;
            tracker.step(&mut self.progress, header.payload_len as usize);
            // Every worker copied the chunk out (or failed) before the buffer is reused. The
            // status round of the update does this for the last chunk.
            if k + 1 < plan.len() {
                self.control.status_round(index, &what, deadline)?;
            }
        }
        Ok(tracker.bytes())
    }
}

/// A packed dense update and its chunk plan, checked against the exported buffer.
pub(crate) struct Planned<'a> {
    params: Vec<(&'a ParamMeta, DenseSrc<'a>)>,
    plan: Vec<ChunkHeader>,
}

impl SessionUpdate for Planned<'_> {
    fn metas(&self) -> Vec<ParamMeta> {
        self.params.iter().map(|(m, _)| (*m).clone()).collect()
    }

    fn param_count(&self) -> ParamCount {
        ParamCount::Dense(self.params.len())
    }
}

impl TrainerPayload for IpcTrainer {
    type Update<'u> = Planned<'u>;

    fn control(&mut self) -> &mut TrainerControl {
        &mut self.control
    }

    fn send_payload(
        &mut self,
        index: u32,
        update: &Planned<'_>,
        _info: &UpdateInfo,
        _metas: &[ParamMeta],
        deadline: Deadline,
    ) -> Result<usize, TransferError> {
        self.send_chunks(index, &update.params, &update.plan, deadline)
    }
}

impl TrainerEngine for IpcTrainer {
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

    fn packs_dense(&self) -> bool {
        true
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
