//! [`HostWorker`]: the receiving side of the host engine.

use std::marker::PhantomData;
use std::time::Instant;

use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;

use super::HostConfig;
use crate::control::{status_ok, WorkerControl, TRAINER_RANK};
use crate::engine::{Announcement, Capabilities, PreparedUpdate, UpdateReport, WorkerEngine};
use crate::error::TransferError;
use crate::info::UpdateKind;
use crate::packing::{plan_chunks, split_chunk, ChunkHeader, PackError};
use crate::patch::SparsePatch;
use crate::registry::{HostStorage, ParamRegistry};

/// The worker side of the host engine: group ranks 1 and up.
///
/// `S` is the registry's storage type; the default mixes any host memory.
pub struct HostWorker<S = Box<dyn HostStorage + Send>> {
    control: WorkerControl,
    config: HostConfig,
    _storage: PhantomData<fn() -> S>,
}

impl<S> std::fmt::Debug for HostWorker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostWorker")
            .field("control", &self.control)
            .field("config", &self.config)
            .finish()
    }
}

impl<S: HostStorage> HostWorker<S> {
    /// A worker over `group`, whose rank must not be [`TRAINER_RANK`](crate::TRAINER_RANK).
    pub fn new(group: HostGroup, config: HostConfig) -> Result<Self, TransferError> {
        let control = WorkerControl::new(group)?;
        if config.packed_buffer_size_bytes == 0 {
            return Err(PackError::ZeroBufferSize.into());
        }
        Ok(Self {
            control,
            config,
            _storage: PhantomData,
        })
    }

    /// The transport group.
    pub fn group(&self) -> &HostGroup {
        &self.control.group
    }

    /// Gives back the group.
    pub fn into_group(self) -> HostGroup {
        self.control.group
    }

    /// Receives the payload of `update` into staging. Returns the staged data, or the first
    /// problem found (after draining the rest of the update's messages).
    fn stage(&self, update: &PreparedUpdate, deadline: Deadline) -> Result<Staged, StageError> {
        let r = &update.update;
        match (r.kind, r.packed) {
            (UpdateKind::Dense, false) => {
                let mut out = Vec::with_capacity(r.params.len());
                for (p, &slot) in r.params.iter().zip(&update.slots) {
                    let mut buf = vec![0u8; p.byte_len()];
                    self.control
                        .group
                        .recv_into(TRAINER_RANK, &mut buf, deadline)
                        .map_err(|e| {
                            let during = format!("receiving the dense values of '{}'", p.name());
                            StageError::Fatal(self.control.comm(during)(e))
                        })?;
                    out.push((slot, buf));
                }
                Ok(Staged::Dense(out))
            }
            (UpdateKind::Dense, true) => self.stage_packed(update, deadline),
            (UpdateKind::SparseFlat, _) => {
                let mut out = Vec::with_capacity(r.params.len());
                let mut problem = None;
                for (p, &n) in r.params.iter().zip(&r.num_updates) {
                    let elem = p.dtype().size_bytes();
                    let mut buf = vec![0u8; n.saturating_mul(4 + elem)];
                    self.control
                        .group
                        .recv_into(TRAINER_RANK, &mut buf, deadline)
                        .map_err(|e| {
                            let during = format!("receiving the sparse patch of '{}'", p.name());
                            StageError::Fatal(self.control.comm(during)(e))
                        })?;
                    if problem.is_some() {
                        continue;
                    }
                    // The message is the indices, then the values.
                    let values = buf.split_off(n * 4);
                    let indices = buf
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    let patch = SparsePatch {
                        name: p.name().to_string(),
                        dtype: p.dtype(),
                        indices,
                        values,
                    };
                    match patch.validate_for(p) {
                        Ok(()) => out.push(patch),
                        Err(e) => problem = Some(TransferError::from(e)),
                    }
                }
                match problem {
                    Some(e) => Err(StageError::Refused(e)),
                    None => Ok(Staged::Sparse(out)),
                }
            }
        }
    }

    fn stage_packed(
        &self,
        update: &PreparedUpdate,
        deadline: Deadline,
    ) -> Result<Staged, StageError> {
        let plan = plan_chunks(&update.update.params, self.config.packed_buffer_size_bytes)
            .map_err(|e| StageError::Refused(e.into()))?;
        let mut staged = Vec::with_capacity(plan.len());
        let mut problem: Option<TransferError> = None;
        // The trainer's headers say how many chunks it sends; until the first one arrives,
        // expect the planned count.
        let mut total = plan.len() as u32;
        let mut seq = 0u32;
        while seq < total {
            let fatal = |e| {
                StageError::Fatal(self.control.comm(format!("receiving packed chunk {seq}"))(
                    e,
                ))
            };
            let raw = self
                .control
                .group
                .recv(TRAINER_RANK, deadline)
                .map_err(fatal)?;
            // A header that cannot be read does not say how long its payload is: the
            // stream cannot be followed any further.
            let header = ChunkHeader::decode(&raw).map_err(|e| StageError::Fatal(e.into()))?;
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
            if problem.is_some() {
                // Keep the stream in step; the payload is discarded.
                self.control
                    .group
                    .recv(TRAINER_RANK, deadline)
                    .map_err(fatal)?;
            } else {
                // The header matched the plan, so its length is the one we expect.
                let mut payload = vec![0u8; usize::try_from(header.payload_len).unwrap_or(0)];
                self.control
                    .group
                    .recv_into(TRAINER_RANK, &mut payload, deadline)
                    .map_err(fatal)?;
                staged.push((header, payload));
            }
            seq += 1;
        }
        match problem {
            Some(e) => Err(StageError::Refused(e)),
            None => Ok(Staged::Packed(staged)),
        }
    }
}

/// What a worker staged for one update.
enum Staged {
    Dense(Vec<(usize, Vec<u8>)>),
    Packed(Vec<(ChunkHeader, Vec<u8>)>),
    Sparse(Vec<SparsePatch>),
}

enum StageError {
    /// The transport broke: no further message can be trusted.
    Fatal(TransferError),
    /// The stream is still in step but this worker cannot apply the update.
    Refused(TransferError),
}

impl Staged {
    fn apply<S: HostStorage>(
        &self,
        slots: &[usize],
        registry: &mut ParamRegistry<S>,
    ) -> Result<(), TransferError> {
        match self {
            Staged::Dense(bufs) => {
                let writes: Vec<(usize, &[u8])> =
                    bufs.iter().map(|(slot, b)| (*slot, b.as_slice())).collect();
                registry.apply_dense(&writes)?;
            }
            Staged::Packed(chunks) => {
                let mut writes: Vec<(usize, &[u8])> = Vec::with_capacity(slots.len());
                let mut slot_iter = slots.iter();
                for (header, payload) in chunks {
                    for part in split_chunk(header, payload)? {
                        if let Some(&slot) = slot_iter.next() {
                            writes.push((slot, part));
                        }
                    }
                }
                registry.apply_dense(&writes)?;
            }
            Staged::Sparse(patches) => registry.apply_patches(patches)?,
        }
        Ok(())
    }
}

impl<S: HostStorage> WorkerEngine for HostWorker<S> {
    type Storage = S;

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

    fn rank(&self) -> usize {
        self.control.rank()
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
        self.control.status_round(status_ok(), "vote", deadline)?;
        let staged = match self.stage(update, deadline) {
            Ok(s) => Some(s),
            Err(StageError::Refused(e)) => {
                // Commit round: tell everyone, then report our own reason.
                return Err(self.control.fail_round(e, "commit", deadline));
            }
            Err(StageError::Fatal(e)) => return Err(e),
        };
        self.control.status_round(status_ok(), "commit", deadline)?;
        self.control.updates += 1;
        let chunks = match &staged {
            Some(Staged::Packed(c)) => c.len(),
            _ => 0,
        };
        if let Some(s) = staged {
            s.apply(&update.slots, registry)?;
        }
        Ok(UpdateReport {
            params: update.slots.len(),
            payload_bytes: update.update.payload_bytes(),
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
