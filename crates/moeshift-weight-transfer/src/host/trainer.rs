//! [`HostTrainer`]: the sending side of the host engine.

use std::time::Instant;

use moeshift_device_comm::{CommError, HostGroup};
use moeshift_sync::Deadline;

use super::{failures, status_ok, Control, HostConfig, TRAINER_RANK};
use crate::engine::{outgoing_info, Capabilities, Outgoing, SendReport, TrainerEngine};
use crate::error::TransferError;
use crate::info::UpdateInfo;
use crate::meta::{metadata_digest, ParamMeta};
use crate::packing::{pack_chunk, plan_chunks, PackError};

/// Where a trainer's update stands, reported after every payload message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Session number (from 1).
    pub session: u64,
    /// Update number within the session (from 0).
    pub update: u32,
    /// Payload messages of this update handed to every worker so far.
    pub messages: usize,
    /// Payload bytes of this update sent to each worker so far.
    pub bytes: usize,
    /// Payload bytes of the whole update, per worker.
    pub total_bytes: usize,
}

type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

/// The trainer side of the host engine: group rank 0.
pub struct HostTrainer {
    group: HostGroup,
    config: HostConfig,
    session: u64,
    /// Parameters of the last dense update every worker applied, for "reuse".
    last_dense: Option<Vec<ParamMeta>>,
    progress: Option<ProgressFn>,
}

impl std::fmt::Debug for HostTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTrainer")
            .field("group", &self.group)
            .field("config", &self.config)
            .field("session", &self.session)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl HostTrainer {
    /// The trainer over `group`, whose rank must be [`TRAINER_RANK`].
    pub fn new(group: HostGroup, config: HostConfig) -> Result<Self, TransferError> {
        if group.rank() != TRAINER_RANK {
            return Err(TransferError::Config {
                detail: format!(
                    "group {:?}: the trainer must be rank {TRAINER_RANK}, this is rank {}",
                    group.name(),
                    group.rank()
                ),
            });
        }
        if config.packed_buffer_size_bytes == 0 {
            return Err(PackError::ZeroBufferSize.into());
        }
        Ok(Self {
            group,
            config,
            session: 0,
            last_dense: None,
            progress: None,
        })
    }

    /// Calls `observer` after every payload message (for progress bars and metrics on long
    /// transfers). It runs on the sending thread, so it should be quick.
    pub fn set_progress(&mut self, observer: impl FnMut(&Progress) + Send + 'static) {
        self.progress = Some(Box::new(observer));
    }

    /// The transport group.
    pub fn group(&self) -> &HostGroup {
        &self.group
    }

    /// Gives back the group.
    pub fn into_group(self) -> HostGroup {
        self.group
    }

    fn comm(&self, during: impl Into<String>) -> impl FnOnce(CommError) -> TransferError {
        let during = during.into();
        move |source| TransferError::Comm {
            rank: TRAINER_RANK,
            during,
            source: Box::new(source),
        }
    }

    fn workers(&self) -> std::ops::Range<usize> {
        1..self.group.size()
    }

    /// Sends `data` to every worker.
    fn send_all(&self, data: &[u8], what: &str, deadline: Deadline) -> Result<(), TransferError> {
        for w in self.workers() {
            self.group
                .send(w, data, deadline)
                .map_err(self.comm(format!("sending {what} to rank {w}")))?;
        }
        Ok(())
    }

    fn status_round(
        &self,
        update: u32,
        what: &str,
        deadline: Deadline,
    ) -> Result<(), TransferError> {
        let statuses = self
            .group
            .all_gather(&status_ok(), deadline)
            .map_err(self.comm(format!("{what} of update {update}")))?;
        let failed = failures(&statuses);
        if failed.is_empty() {
            Ok(())
        } else {
            Err(TransferError::PeersFailed {
                rank: TRAINER_RANK,
                session: self.session,
                update,
                failures: failed,
            })
        }
    }

    fn announce(&self, control: &Control, deadline: Deadline) -> Result<(), TransferError> {
        let bytes = serde_json::to_vec(control).map_err(|e| TransferError::Config {
            detail: format!("encoding an announcement: {e}"),
        })?;
        self.group
            .broadcast_bytes(TRAINER_RANK, Some(&bytes), deadline)
            .map_err(self.comm("announcing to the workers"))?;
        Ok(())
    }

    fn send_payload(
        &mut self,
        index: u32,
        update: &Outgoing<'_>,
        total_bytes: usize,
        deadline: Deadline,
    ) -> Result<usize, TransferError> {
        let mut progress = Progress {
            session: self.session,
            update: index,
            messages: 0,
            bytes: 0,
            total_bytes,
        };
        let mut step = |this: &mut Self, data: &[u8], what: &str| -> Result<(), TransferError> {
            this.send_all(data, what, deadline)?;
            progress.messages += 1;
            progress.bytes += data.len();
            if let Some(observer) = this.progress.as_mut() {
                observer(&progress);
            }
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
                let metas: Vec<ParamMeta> = params.iter().map(|p| p.meta.clone()).collect();
                let plan = plan_chunks(&metas, self.config.packed_buffer_size_bytes)?;
                let mut next = 0usize;
                for header in &plan {
                    let n = header.entries.len();
                    let tensors: Vec<&[u8]> =
                        params.iter().skip(next).take(n).map(|p| p.data).collect();
                    next += n;
                    let payload = pack_chunk(header, &tensors)?;
                    let what = format!("chunk {} of {}", header.seq, header.total);
                    // The header is control data: it is not counted as payload.
                    self.send_all(&header.encode(), &format!("the header of {what}"), deadline)?;
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
        Ok(progress.bytes)
    }

    fn run_session(
        &mut self,
        updates: &[(Outgoing<'_>, UpdateInfo)],
        report: &mut SendReport,
        deadline: Deadline,
    ) -> Result<(), TransferError> {
        for (index, (update, full_info)) in updates.iter().enumerate() {
            let index = index as u32;
            let metas: Vec<ParamMeta> = match update {
                Outgoing::Dense { params, .. } => params.iter().map(|p| p.meta.clone()).collect(),
                Outgoing::Sparse { params } => params.iter().map(|p| p.meta.clone()).collect(),
            };
            let digest = metadata_digest(&metas);
            let info = match update {
                Outgoing::Dense { packed, .. }
                    if self.config.reuse_metadata
                        && self.last_dense.as_deref() == Some(metas.as_slice()) =>
                {
                    UpdateInfo::dense_reuse(*packed)
                }
                _ => full_info.clone(),
            };
            let control = Control::Update {
                session: self.session,
                update: index,
                info,
                metadata_digest: digest.to_string(),
            };
            self.announce(&control, deadline)?;
            self.status_round(index, "vote", deadline)?;
            let total = full_info.resolve(None)?.payload_bytes();
            report.payload_bytes += self.send_payload(index, update, total, deadline)?;
            self.status_round(index, "commit", deadline)?;
            report.updates += 1;
            match update {
                Outgoing::Dense { params, .. } => {
                    report.dense_params += params.len();
                    self.last_dense = Some(metas);
                }
                Outgoing::Sparse { params } => report.sparse_params += params.len(),
            }
        }
        self.announce(
            &Control::End {
                session: self.session,
                updates: updates.len() as u32,
            },
            deadline,
        )
    }
}

impl TrainerEngine for HostTrainer {
    fn name(&self) -> &'static str {
        "host"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            dense: true,
            packed: true,
            sparse: true,
            info_in_band: true,
        }
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
        self.session += 1;
        let mut report = SendReport::default();
        let r = self.run_session(&checked, &mut report, deadline);
        if r.is_err() {
            // Workers may disagree about the last metadata now: send full lists next time.
            self.last_dense = None;
        }
        r?;
        report.elapsed = started.elapsed();
        Ok(report)
    }
}
