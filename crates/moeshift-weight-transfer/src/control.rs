//! The control channel every engine shares: announcements and status rounds over a
//! [`HostGroup`] whose rank 0 is the trainer.
//!
//! Engines differ in how payload bytes travel (TCP, NCCL, CUDA IPC); the session shape is
//! the same for all of them: per update the trainer broadcasts an announcement
//! ([`Control::Update`]), every rank votes in an all-gathered status round, the payload
//! moves, and a second status round ends the update; then the trainer broadcasts
//! [`Control::End`].
//!
//! The session shape is written once here: [`send_session`] drives a trainer engine
//! ([`TrainerPayload`]) and [`receive_update`] a worker engine ([`WorkerPayload`]); each
//! engine supplies only its payload path.

use std::time::Instant;

use moeshift_device_comm::{CommError, HostGroup};
use moeshift_sync::Deadline;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::engine::{Announcement, PreparedUpdate, SendReport, UpdateReport, WorkerEngine};
use crate::error::TransferError;
use crate::info::UpdateInfo;
use crate::meta::{metadata_digest, ParamMeta};
use crate::packing::{ChunkHeader, PackError};
use crate::registry::ParamRegistry;

/// The trainer's rank in the transfer group.
pub const TRAINER_RANK: usize = 0;

/// A control message from the trainer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Control {
    Update {
        session: u64,
        update: u32,
        info: UpdateInfo,
        metadata_digest: String,
    },
    End {
        session: u64,
        updates: u32,
    },
}

const OK: u8 = 1;
const FAILED: u8 = 0;

pub(crate) fn status_ok() -> Vec<u8> {
    vec![OK]
}

pub(crate) fn status_failed(reason: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + reason.len());
    v.push(FAILED);
    v.extend_from_slice(reason.as_bytes());
    v
}

/// `(rank, reason)` for every rank whose status is not "ok".
pub(crate) fn failures(statuses: &[Vec<u8>]) -> Vec<(usize, String)> {
    statuses
        .iter()
        .enumerate()
        .filter_map(|(rank, s)| match s.split_first() {
            Some((&OK, _)) => None,
            Some((_, reason)) => Some((rank, String::from_utf8_lossy(reason).into_owned())),
            None => Some((rank, "sent an empty status".into())),
        })
        .collect()
}

/// The trainer's side of the control channel.
#[derive(Debug)]
pub(crate) struct TrainerControl {
    pub(crate) group: HostGroup,
    /// Current session number (from 1 once a session started).
    pub(crate) session: u64,
    /// Parameters of the last dense update every worker applied, for "reuse".
    last_dense: Option<Vec<ParamMeta>>,
    reuse_metadata: bool,
}

impl TrainerControl {
    /// The control channel over `group`, whose rank must be [`TRAINER_RANK`].
    pub(crate) fn new(group: HostGroup, reuse_metadata: bool) -> Result<Self, TransferError> {
        if group.rank() != TRAINER_RANK {
            return Err(TransferError::Config {
                detail: format!(
                    "group {:?}: the trainer must be rank {TRAINER_RANK}, this is rank {}",
                    group.name(),
                    group.rank()
                ),
            });
        }
        Ok(Self {
            group,
            session: 0,
            last_dense: None,
            reuse_metadata,
        })
    }

    pub(crate) fn comm(during: impl Into<String>) -> impl FnOnce(CommError) -> TransferError {
        let during = during.into();
        move |source| TransferError::Comm {
            rank: TRAINER_RANK,
            during,
            source: Box::new(source),
        }
    }

    pub(crate) fn workers(&self) -> std::ops::Range<usize> {
        1..self.group.size()
    }

    /// Sends `data` to every worker.
    pub(crate) fn send_all(
        &self,
        data: &[u8],
        what: &str,
        deadline: Deadline,
    ) -> Result<(), TransferError> {
        for w in self.workers() {
            self.group
                .send(w, data, deadline)
                .map_err(Self::comm(format!("sending {what} to rank {w}")))?;
        }
        Ok(())
    }

    /// One status round: the trainer says ok; any worker's failure is
    /// [`TransferError::PeersFailed`].
    pub(crate) fn status_round(
        &self,
        update: u32,
        what: &str,
        deadline: Deadline,
    ) -> Result<(), TransferError> {
        let statuses = self
            .group
            .all_gather(&status_ok(), deadline)
            .map_err(Self::comm(format!("{what} of update {update}")))?;
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

    fn broadcast(&self, control: &Control, deadline: Deadline) -> Result<(), TransferError> {
        let bytes = serde_json::to_vec(control).map_err(|e| TransferError::Config {
            detail: format!("encoding an announcement: {e}"),
        })?;
        self.group
            .broadcast_bytes(TRAINER_RANK, Some(&bytes), deadline)
            .map_err(Self::comm("announcing to the workers"))?;
        Ok(())
    }

    /// Starts a session (numbers it).
    pub(crate) fn begin_session(&mut self) {
        self.session += 1;
    }

    /// Announces update `index` of `metas` (full info `full_info`) and runs the vote. A dense
    /// update with the same parameters as the last one every worker applied is announced as
    /// "reuse the previous metadata" when the engine is configured so.
    pub(crate) fn announce(
        &mut self,
        index: u32,
        full_info: &UpdateInfo,
        metas: &[ParamMeta],
        deadline: Deadline,
    ) -> Result<(), TransferError> {
        let digest = metadata_digest(metas);
        let info = if full_info.update_kind == crate::info::UpdateKind::Dense
            && self.reuse_metadata
            && self.last_dense.as_deref() == Some(metas)
        {
            UpdateInfo::dense_reuse(full_info.packed)
        } else {
            full_info.clone()
        };
        let control = Control::Update {
            session: self.session,
            update: index,
            info,
            metadata_digest: digest.to_string(),
        };
        self.broadcast(&control, deadline)?;
        self.status_round(index, "vote", deadline)
    }

    /// Records that every worker applied a dense update of `metas`.
    pub(crate) fn dense_applied(&mut self, metas: Vec<ParamMeta>) {
        self.last_dense = Some(metas);
    }

    /// Forgets the last dense metadata (after a failure workers may disagree about it).
    pub(crate) fn forget_metadata(&mut self) {
        self.last_dense = None;
    }

    /// Ends the session.
    pub(crate) fn end(&self, updates: u32, deadline: Deadline) -> Result<(), TransferError> {
        self.broadcast(
            &Control::End {
                session: self.session,
                updates,
            },
            deadline,
        )
    }
}

/// The parameters of one update a trainer sends, as the session counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParamCount {
    /// A dense update of this many parameters (remembered for "reuse the metadata").
    Dense(usize),
    /// A sparse update of this many parameters.
    Sparse(usize),
}

/// What the session loop needs of one checked update, whatever form the engine keeps it in.
pub(crate) trait SessionUpdate {
    /// The parameters' metadata, in order.
    fn metas(&self) -> Vec<ParamMeta>;

    /// Dense or sparse, and how many parameters.
    fn param_count(&self) -> ParamCount;
}

/// A trainer engine's own part of a session: how an update's payload travels.
pub(crate) trait TrainerPayload {
    /// One checked update, as the engine keeps it.
    type Update<'u>: SessionUpdate;

    /// The engine's control channel.
    fn control(&mut self) -> &mut TrainerControl;

    /// Sends the payload of update `index` (announced as `info`, parameters `metas`) after
    /// a successful vote; returns the payload bytes each worker got.
    fn send_payload(
        &mut self,
        index: u32,
        update: &Self::Update<'_>,
        info: &UpdateInfo,
        metas: &[ParamMeta],
        deadline: Deadline,
    ) -> Result<usize, TransferError>;
}

/// Sends one session of checked `updates` (each with the info that announces it) through
/// `engine`: per update the announcement and vote, the engine's payload and the commit
/// round, then the end marker. After a failure the "reuse" metadata is forgotten (workers
/// may disagree about it). `started` is when the send began, for the report.
pub(crate) fn send_session<E: TrainerPayload>(
    engine: &mut E,
    updates: &[(E::Update<'_>, UpdateInfo)],
    started: Instant,
    deadline: Deadline,
) -> Result<SendReport, TransferError> {
    engine.control().begin_session();
    let mut report = SendReport::default();
    let r = send_updates(engine, updates, &mut report, deadline);
    if r.is_err() {
        // Workers may disagree about the last metadata now: send full lists next time.
        engine.control().forget_metadata();
    }
    r?;
    report.elapsed = started.elapsed();
    Ok(report)
}

fn send_updates<E: TrainerPayload>(
    engine: &mut E,
    updates: &[(E::Update<'_>, UpdateInfo)],
    report: &mut SendReport,
    deadline: Deadline,
) -> Result<(), TransferError> {
    for (index, (update, info)) in updates.iter().enumerate() {
        let index = index as u32;
        let metas = update.metas();
        engine.control().announce(index, info, &metas, deadline)?;
        report.payload_bytes += engine.send_payload(index, update, info, &metas, deadline)?;
        engine.control().status_round(index, "commit", deadline)?;
        report.updates += 1;
        match update.param_count() {
            ParamCount::Dense(n) => {
                report.dense_params += n;
                engine.control().dense_applied(metas);
            }
            ParamCount::Sparse(n) => report.sparse_params += n,
        }
    }
    engine.control().end(updates.len() as u32, deadline)
}

/// A problem a worker found while receiving a payload.
pub(crate) enum Failure {
    /// This worker cannot apply the update, but the stream is still in step: the others
    /// hear it in the commit round.
    Refused(TransferError),
    /// No further round of this update can be trusted (the transport broke, or the
    /// failure was already reported in a round of its own): returned as it is.
    Fatal(TransferError),
}

/// A worker engine's own part of an update: the checks before the vote, the payload path
/// and what happens once every rank committed.
pub(crate) trait WorkerPayload: WorkerEngine {
    /// What the checks before the vote hand the payload step.
    type Plan;
    /// What the payload step hands the commit step.
    type Received;

    /// The engine's control channel.
    fn control(&mut self) -> &mut WorkerControl;

    /// Checks that must pass before this worker votes for `update`; an error is this
    /// worker's refusal, and no payload moves.
    fn check(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<Self::Storage>,
    ) -> Result<Self::Plan, TransferError>;

    /// Receives the payload of `update` after a successful vote.
    fn receive_payload(
        &mut self,
        update: &PreparedUpdate,
        plan: Self::Plan,
        registry: &mut ParamRegistry<Self::Storage>,
        deadline: Deadline,
    ) -> Result<Self::Received, Failure>;

    /// Applies what is still staged once every rank committed; returns the number of
    /// chunks received, for the report.
    fn commit(
        &mut self,
        update: &PreparedUpdate,
        received: Self::Received,
        registry: &mut ParamRegistry<Self::Storage>,
    ) -> Result<usize, TransferError>;
}

/// Receives one update through `engine` (see [`WorkerEngine::receive`]): the checks and the
/// vote, the payload, the commit round, then the engine's commit.
pub(crate) fn receive_update<E: WorkerPayload>(
    engine: &mut E,
    update: &PreparedUpdate,
    registry: &mut ParamRegistry<E::Storage>,
    deadline: Deadline,
) -> Result<UpdateReport, TransferError> {
    let started = Instant::now();
    let plan = match engine.check(update, registry) {
        Ok(plan) => plan,
        Err(e) => return Err(engine.control().fail_round(e, "vote", deadline)),
    };
    engine
        .control()
        .status_round(status_ok(), "vote", deadline)?;
    let received = match engine.receive_payload(update, plan, registry, deadline) {
        Ok(r) => r,
        // Commit round: tell everyone, then report our own reason.
        Err(Failure::Refused(e)) => return Err(engine.control().fail_round(e, "commit", deadline)),
        Err(Failure::Fatal(e)) => return Err(e),
    };
    engine
        .control()
        .status_round(status_ok(), "commit", deadline)?;
    engine.control().updates += 1;
    let chunks = engine.commit(update, received, registry)?;
    Ok(UpdateReport {
        params: update.slots.len(),
        payload_bytes: update.update.payload_bytes(),
        chunks,
        elapsed: started.elapsed(),
    })
}

/// The [`WorkerEngine`] methods every in-band engine answers from its control channel (a
/// field `control: WorkerControl`): its rank, the trainer's next announcement and a
/// refusal.
macro_rules! worker_control_methods {
    () => {
        fn rank(&self) -> usize {
            self.control.rank()
        }

        fn announcement(
            &mut self,
            deadline: ::moeshift_sync::Deadline,
        ) -> Result<$crate::engine::Announcement, $crate::error::TransferError> {
            self.control.announcement(deadline)
        }

        fn reject(
            &mut self,
            reason: &$crate::error::TransferError,
            deadline: ::moeshift_sync::Deadline,
        ) -> Result<(), $crate::error::TransferError> {
            self.control.reject(reason, deadline)
        }
    };
}
pub(crate) use worker_control_methods;

/// A worker's side of the control channel.
#[derive(Debug)]
pub(crate) struct WorkerControl {
    pub(crate) group: HostGroup,
    /// Session being received, once its first message arrived.
    session: Option<u64>,
    /// Updates received in the current session.
    pub(crate) updates: u32,
    /// `announcement` already returned the end marker of the current session.
    ended: bool,
}

impl WorkerControl {
    /// The control channel over `group`, whose rank must not be [`TRAINER_RANK`].
    pub(crate) fn new(group: HostGroup) -> Result<Self, TransferError> {
        if group.rank() == TRAINER_RANK {
            return Err(TransferError::Config {
                detail: format!(
                    "group {:?}: rank {TRAINER_RANK} is the trainer; workers are ranks 1..{}",
                    group.name(),
                    group.size()
                ),
            });
        }
        Ok(Self {
            group,
            session: None,
            updates: 0,
            ended: false,
        })
    }

    pub(crate) fn rank(&self) -> usize {
        self.group.rank()
    }

    pub(crate) fn comm(
        &self,
        during: impl Into<String>,
    ) -> impl FnOnce(CommError) -> TransferError {
        let rank = self.group.rank();
        let during = during.into();
        move |source| TransferError::Comm {
            rank,
            during,
            source: Box::new(source),
        }
    }

    pub(crate) fn protocol(&self, detail: String) -> TransferError {
        TransferError::Protocol {
            rank: self.group.rank(),
            peer: TRAINER_RANK,
            detail,
        }
    }

    fn peers_failed(&self, failures: Vec<(usize, String)>) -> TransferError {
        TransferError::PeersFailed {
            rank: self.group.rank(),
            session: self.session.unwrap_or(0),
            update: self.updates,
            failures,
        }
    }

    /// One all-gathered status round; `Ok` when every rank said ok.
    pub(crate) fn status_round(
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

    /// Tells everyone this worker failed `what` for `reason` (best effort), counts the
    /// update as done, and returns `reason`.
    pub(crate) fn fail_round(
        &mut self,
        reason: TransferError,
        what: &str,
        deadline: Deadline,
    ) -> TransferError {
        let _ = self.status_round(status_failed(&reason.to_string()), what, deadline);
        self.updates += 1;
        reason
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

    /// Receives the header of packed chunk `seq` (`during` names the step in errors) and
    /// checks it against `plan`, this worker's own chunk plan: the first mismatch is kept in
    /// `problem` and the stream stays in step (the header says how long its payload is). A
    /// header that cannot be read does not, so it ends the update.
    pub(crate) fn recv_chunk_header(
        &self,
        seq: u32,
        plan: &[ChunkHeader],
        problem: &mut Option<TransferError>,
        during: String,
        deadline: Deadline,
    ) -> Result<ChunkHeader, Failure> {
        let raw = self
            .group
            .recv(TRAINER_RANK, deadline)
            .map_err(|e| Failure::Fatal(self.comm(during)(e)))?;
        let header = ChunkHeader::decode(&raw).map_err(|e| Failure::Fatal(e.into()))?;
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
                *problem = Some(e.into());
            }
        }
        Ok(header)
    }

    /// Forgets the current session.
    pub(crate) fn end_session(&mut self) {
        self.session = None;
        self.updates = 0;
        self.ended = false;
    }

    /// The trainer's next announcement (see [`crate::WorkerEngine::announcement`]).
    pub(crate) fn announcement(
        &mut self,
        deadline: Deadline,
    ) -> Result<Announcement, TransferError> {
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

    /// Refuses the announced update (see [`crate::WorkerEngine::reject`]).
    pub(crate) fn reject(
        &mut self,
        reason: &TransferError,
        deadline: Deadline,
    ) -> Result<(), TransferError> {
        let r = self.status_round(status_failed(&reason.to_string()), "refusal", deadline);
        self.updates += 1;
        r
    }

    /// Ends the session, consuming the trainer's end marker if not seen yet (see
    /// [`crate::WorkerEngine::finish`]).
    pub(crate) fn finish(&mut self, deadline: Deadline) -> Result<(), TransferError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_encoding() {
        let statuses = vec![
            status_ok(),
            status_failed("bad shape for 'w'"),
            Vec::new(),
            status_ok(),
        ];
        assert_eq!(
            failures(&statuses),
            vec![
                (1, "bad shape for 'w'".to_string()),
                (2, "sent an empty status".to_string())
            ]
        );
        assert!(failures(&[status_ok(), status_ok()]).is_empty());
    }

    #[test]
    fn control_json_shape() {
        let c = Control::End {
            session: 4,
            updates: 2,
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(text, r#"{"type":"end","session":4,"updates":2}"#);
        let bad = r#"{"type":"update","session":1,"update":0,"metadata_digest":"00",
            "info":{"names":[],"dtype_names":[],"shapes":[],"update_kind":"sparse_coo"}}"#;
        let err = serde_json::from_str::<Control>(bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Unsupported update_kind 'sparse_coo'"),
            "{err}"
        );
    }
}
