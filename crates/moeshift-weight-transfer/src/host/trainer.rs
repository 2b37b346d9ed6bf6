//! [`HostTrainer`]: the sending side of the host engine.

use std::time::Instant;

use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;

use super::HostConfig;
use crate::control::{send_session, TrainerControl, TrainerPayload};
use crate::engine::{outgoing_info, Capabilities, Outgoing, SendReport, TrainerEngine};
use crate::error::TransferError;
use crate::info::UpdateInfo;
use crate::meta::ParamMeta;
use crate::packing::{pack_chunk, plan_chunks, PackError};
use crate::progress::{Observer, Progress, Tracker};

/// The trainer side of the host engine: group rank 0.
pub struct HostTrainer {
    control: TrainerControl,
    config: HostConfig,
    progress: Option<Observer>,
}

impl std::fmt::Debug for HostTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTrainer")
            .field("group", &self.control.group)
            .field("config", &self.config)
            .field("session", &self.control.session)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl HostTrainer {
    /// The trainer over `group`, whose rank must be [`TRAINER_RANK`](crate::TRAINER_RANK).
    pub fn new(group: HostGroup, config: HostConfig) -> Result<Self, TransferError> {
        let control = TrainerControl::new(group, config.reuse_metadata)?;
        if config.packed_buffer_size_bytes == 0 {
            return Err(PackError::ZeroBufferSize.into());
        }
        Ok(Self {
            control,
            config,
            progress: None,
        })
    }

    /// Calls `observer` when an update's payload starts and after every payload message
    /// (see [`Progress`]; for progress bars and metrics on long transfers). It runs on the
    /// sending thread, so it should be quick.
    pub fn set_progress(&mut self, observer: impl FnMut(&Progress) + Send + 'static) {
        self.progress = Some(Box::new(observer));
    }

    /// The transport group.
    pub fn group(&self) -> &HostGroup {
        &self.control.group
    }

    /// Gives back the group.
    pub fn into_group(self) -> HostGroup {
        self.control.group
    }
}

impl TrainerPayload for HostTrainer {
    type Update<'u> = Outgoing<'u>;

    fn control(&mut self) -> &mut TrainerControl {
        &mut self.control
    }

    fn send_payload(
        &mut self,
        index: u32,
        update: &Outgoing<'_>,
        info: &UpdateInfo,
        metas: &[ParamMeta],
        deadline: Deadline,
    ) -> Result<usize, TransferError> {
        let total_bytes = info.resolve(None)?.payload_bytes();
        let session = self.control.session;
        let mut progress = Tracker::start(&mut self.progress, session, index, total_bytes);
        let mut step = |this: &mut Self, data: &[u8], what: &str| -> Result<(), TransferError> {
            this.control.send_all(data, what, deadline)?;
            progress.step(&mut this.progress, data.len());
            Ok(())
        };
        match *update {
            Outgoing::Dense {
                params,
                packed: false,
            } => {
                for p in params {
                    step(self, p.data, &format!("the values of '{}'", p.meta.name()))?;
                }
            }
            Outgoing::Dense {
                params,
                packed: true,
            } => {
                let plan = plan_chunks(metas, self.config.packed_buffer_size_bytes)?;
                let mut next = 0usize;
                for header in &plan {
                    let n = header.entries.len();
                    let tensors: Vec<&[u8]> =
                        params.iter().skip(next).take(n).map(|p| p.data).collect();
                    next += n;
                    let payload = pack_chunk(header, &tensors)?;
                    let what = format!("chunk {} of {}", header.seq, header.total);
                    // The header is control data: it is not counted as payload.
                    self.control.send_all(
                        &header.encode(),
                        &format!("the header of {what}"),
                        deadline,
                    )?;
                    step(self, &payload, &what)?;
                }
            }
            Outgoing::Sparse { params } => {
                for p in params {
                    let mut msg = p.patch.index_bytes();
                    msg.extend_from_slice(&p.patch.values);
                    step(self, &msg, &format!("the patch of '{}'", p.meta.name()))?;
                }
            }
        }
        Ok(progress.bytes())
    }
}

impl TrainerEngine for HostTrainer {
    fn name(&self) -> &'static str {
        "host"
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
        let started = Instant::now();
        // Check everything before the first byte leaves.
        let mut checked = Vec::with_capacity(updates.len());
        for u in updates {
            if let Some(info) = outgoing_info(u)? {
                checked.push((*u, info));
            }
        }
        send_session(self, &checked, started, deadline)
    }
}
