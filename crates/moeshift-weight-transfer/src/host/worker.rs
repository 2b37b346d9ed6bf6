//! [`HostWorker`]: the receiving side of the host engine.

use std::marker::PhantomData;
use std::time::Instant;

use moeshift_device_comm::{CommError, HostGroup};
use moeshift_sync::Deadline;

use super::{failures, status_failed, status_ok, Control, HostConfig, TRAINER_RANK};
use crate::digest::Digest;
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
    group: HostGroup,
    config: HostConfig,
    /// Session being received, once its first message arrived.
    session: Option<u64>,
    /// Updates received in the current session.
    updates: u32,
    /// `announcement` already returned the end marker of the current session.
    ended: bool,
    _storage: PhantomData<fn() -> S>,
}

impl<S> std::fmt::Debug for HostWorker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostWorker")
            .field("group", &self.group)
            .field("config", &self.config)
            .field("session", &self.session)
            .finish()
    }
}

impl<S: HostStorage> HostWorker<S> {
    /// A worker over `group`, whose rank must not be [`TRAINER_RANK`].
    pub fn new(group: HostGroup, config: HostConfig) -> Result<Self, TransferError> {
        if group.rank() == TRAINER_RANK {
            return Err(TransferError::Config {
                detail: format!(
                    "group {:?}: rank {TRAINER_RANK} is the trainer; workers are ranks 1..{}",
                    group.name(),
                    group.size()
                ),
            });
        }
        if config.packed_buffer_size_bytes == 0 {
            return Err(PackError::ZeroBufferSize.into());
        }
        Ok(Self {
            group,
            config,
            session: None,
            updates: 0,
            ended: false,
            _storage: PhantomData,
        })
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
        let rank = self.group.rank();
        let during = during.into();
        move |source| TransferError::Comm {
            rank,
            during,
            source: Box::new(source),
        }
    }

    fn protocol(&self, detail: String) -> TransferError {
        TransferError::Protocol {
            rank: self.group.rank(),
            peer: TRAINER_RANK,
            detail,
        }
    }

    fn session_label(&self) -> (u64, u32) {
        (self.session.unwrap_or(0), self.updates)
    }

    fn peers_failed(&self, failures: Vec<(usize, String)>) -> TransferError {
        let (session, update) = self.session_label();
        TransferError::PeersFailed {
            rank: self.group.rank(),
            session,
            update,
            failures,
        }
    }

    /// One all-gathered status round; `Ok` when every rank said ok.
    fn status_round(
        &self,
        mine: Vec<u8>,
        what: &str,
        deadline: Deadline,
    ) -> Result<(), TransferError> {
        let statuses = self
            .group
            .all_gather(&mine, deadline)
            .map_err(self.comm(format!("{what} of update {}", self.updates)))?;
        let failed = failures(&statuses);
        if failed.is_empty() {
            Ok(())
        } else {
            Err(self.peers_failed(failed))
        }
    }

    fn read_control(&mut self, deadline: Deadline) -> Result<Control, TransferError> {
        let bytes = self
            .group
            .broadcast_bytes(TRAINER_RANK, None, deadline)
            .map_err(self.comm("waiting for the trainer's next announcement"))?;
        let control: Control = match serde_json::from_slice(&bytes) {
            Ok(c) => c,
            Err(e) => {
                // The trainer is waiting for votes on what it announced: refuse, so it
                // hears why instead of waiting for its deadline.
                let reason = format!("unreadable announcement: {e}");
                let _ = self.group.all_gather(&status_failed(&reason), deadline);
                return Err(self.protocol(reason));
            }
        };
        let session = match &control {
            Control::Update { session, .. } | Control::End { session, .. } => *session,
        };
        if let Some(current) = self.session {
            if current != session {
                return Err(self.protocol(format!(
                    "message of session {session} inside session {current}"
                )));
            }
        }
        self.session = Some(session);
        Ok(control)
    }

    fn end_session(&mut self) {
        self.session = None;
        self.updates = 0;
        self.ended = false;
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
                    self.group
                        .recv_into(TRAINER_RANK, &mut buf, deadline)
                        .map_err(|e| {
                            let during = format!("receiving the dense values of '{}'", p.name());
                            StageError::Fatal(self.comm(during)(e))
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
                    self.group
                        .recv_into(TRAINER_RANK, &mut buf, deadline)
                        .map_err(|e| {
                            let during = format!("receiving the sparse patch of '{}'", p.name());
                            StageError::Fatal(self.comm(during)(e))
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
            let fatal =
                |e| StageError::Fatal(self.comm(format!("receiving packed chunk {seq}"))(e));
            let raw = self.group.recv(TRAINER_RANK, deadline).map_err(fatal)?;
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
                self.group.recv(TRAINER_RANK, deadline).map_err(fatal)?;
            } else {
                // The header matched the plan, so its length is the one we expect.
                let mut payload = vec![0u8; usize::try_from(header.payload_len).unwrap_or(0)];
                self.group
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
        self.group.rank()
    }

    fn announcement(&mut self, deadline: Deadline) -> Result<Announcement, TransferError> {
        match self.read_control(deadline)? {
            Control::Update {
                update,
                info,
                metadata_digest,
                ..
            } => {
                let problem = if update != self.updates {
                    Some(format!(
                        "update {update} announced, expected update {}",
                        self.updates
                    ))
                } else if Digest::from_hex(&metadata_digest).is_none() {
                    Some(format!("metadata digest '{metadata_digest}' is not hex"))
                } else {
                    None
                };
                if let Some(detail) = problem {
                    // The trainer waits for votes on this announcement: refuse it.
                    let e = self.protocol(detail);
                    let _ = self.reject(&e, deadline);
                    return Err(e);
                }
                Ok(Announcement::Update {
                    info,
                    metadata_digest: Digest::from_hex(&metadata_digest),
                })
            }
            Control::End { updates, .. } => {
                if updates != self.updates {
                    return Err(self.protocol(format!(
                        "the trainer ended the session after {updates} updates; this worker \
                         received {}",
                        self.updates
                    )));
                }
                self.ended = true;
                Ok(Announcement::End)
            }
        }
    }

    fn reject(&mut self, reason: &TransferError, deadline: Deadline) -> Result<(), TransferError> {
        let r = self.status_round(status_failed(&reason.to_string()), "refusal", deadline);
        self.updates += 1;
        r
    }

    fn receive(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
        deadline: Deadline,
    ) -> Result<UpdateReport, TransferError> {
        let started = Instant::now();
        self.status_round(status_ok(), "vote", deadline)?;
        let staged = self.stage(update, deadline);
        let (staged, status) = match staged {
            Ok(s) => (Some(s), status_ok()),
            Err(StageError::Refused(e)) => {
                let status = status_failed(&e.to_string());
                // Commit round: tell everyone, then report our own reason.
                let _ = self.status_round(status, "commit", deadline);
                self.updates += 1;
                return Err(e);
            }
            Err(StageError::Fatal(e)) => return Err(e),
        };
        self.status_round(status, "commit", deadline)?;
        self.updates += 1;
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
        if !self.ended {
            match self.announcement(deadline)? {
                Announcement::End => {}
                Announcement::Update { .. } => {
                    let e = self.protocol(format!(
                        "the trainer announced update {} while this worker finished the session",
                        self.updates
                    ));
                    // Refuse it so the trainer learns why.
                    let _ = self.status_round(status_failed(&e.to_string()), "refusal", deadline);
                    self.end_session();
                    return Err(e);
                }
            }
        }
        self.end_session();
        Ok(())
    }

    fn abort(&mut self) {
        self.end_session();
    }
}
