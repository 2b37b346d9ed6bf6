//! The control channel every engine shares: announcements and status rounds over a
//! [`HostGroup`] whose rank 0 is the trainer.
//!
//! Engines differ in how payload bytes travel (TCP, NCCL, CUDA IPC); the session shape is
//! the same for all of them and is written once here: [`send_session`] drives a trainer
//! engine ([`TrainerPayload`]) and [`receive_update`] a worker engine ([`WorkerPayload`]);
//! each engine supplies only its payload path.
//!
//! # One session
//!
//! ```text
//! trainer                                  every worker
//! announce update 0 (broadcast)      ->    read it; take a staged payload (if any)
//! [vote (all-gather)]                <->   [vote: accept, or refuse with the reason]
//! payload                            ->    receive it
//! status (all-gather), carrying the  <->   status: ok, or failed with the reason;
//!   announcement of update 1                 keep what the trainer's status carries
//! [vote]  payload  status, carrying ...
//! ... the last status carries the end of the session
//! ```
//!
//! Per update that is one status round (an all-gather in which each rank says "ok" or
//! "failed: reason"), one vote round before the payload unless the payload is staged (see
//! below), and the engine's payload. Only the first announcement of a session is a round of
//! its own: the trainer's status in the round that ends update `k` carries the
//! announcement of update `k + 1`, or the end marker after the last update (a session
//! without updates sends its end marker alone). A worker reads the carried message only
//! when every rank said ok; otherwise the update failed everywhere and the session ends.
//!
//! **Staged payloads.** A payload that lands in a worker's staging area (not in a live
//! parameter) can move before the vote: the announcement then says how many bytes follow
//! ([`Staged`]), every worker receives them right after reading the announcement, whatever
//! it then decides, and the vote and the status round become one round. The NCCL engine
//! sends sparse updates this way. A worker that cannot parse such an announcement still
//! reads the sizes from it, so the payload's collective stays matched and the trainer hears
//! the reason in the status round.
//!
//! The rules that hold throughout: a worker that cannot accept an update (unknown name,
//! wrong dtype or shape, a bad index in a sparse update, a chunk header that differs from
//! its plan) says so in the next round, so the update fails on every rank with an error
//! naming that rank and its reason ([`TransferError::PeersFailed`] on the others); a dead
//! peer is a transport error before the deadline.

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

/// Sizes of a sparse payload the trainer moves right after the announcement, before any
/// vote: the staged int32 index array, then the value array (each parameter's values
/// aligned as [`SparseLayout`](crate::sparse_layout::SparseLayout) lays them out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Staged {
    pub(crate) index_bytes: u64,
    pub(crate) value_bytes: u64,
}

/// A control message from the trainer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Control {
    Update {
        session: u64,
        update: u32,
        info: UpdateInfo,
        metadata_digest: String,
        /// The payload follows at once, before the vote (see the module docs).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        staged: Option<Staged>,
    },
    End {
        session: u64,
        updates: u32,
    },
}

/// What a worker still reads from an announcement it cannot parse: whether a staged payload
/// follows (unknown fields are skipped).
#[derive(Deserialize)]
struct StagedOnly {
    #[serde(default)]
    staged: Option<Staged>,
}

impl Control {
    fn encode(&self) -> Result<Vec<u8>, TransferError> {
        serde_json::to_vec(self).map_err(|e| TransferError::Config {
            detail: format!("encoding a control message: {e}"),
        })
    }
}

const OK: u8 = 1;
const FAILED: u8 = 0;

pub(crate) fn status_ok() -> Vec<u8> {
    vec![OK]
}

/// "Ok", carrying `next` (the trainer's next control message) to every worker.
fn status_ok_with(next: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(1 + next.len());
    v.push(OK);
    v.extend_from_slice(next);
    v
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

    /// One status round in which the trainer says ok; any worker's failure is
    /// [`TransferError::PeersFailed`].
    pub(crate) fn status_round(
        &self,
        update: u32,
        what: &str,
        deadline: Deadline,
    ) -> Result<(), TransferError> {
        self.round(update, what, &status_ok(), deadline)
    }

    fn round(
        &self,
        update: u32,
        what: &str,
        mine: &[u8],
        deadline: Deadline,
    ) -> Result<(), TransferError> {
        let statuses = self
            .group
            .all_gather(mine, deadline)
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

    fn broadcast(&self, bytes: &[u8], deadline: Deadline) -> Result<(), TransferError> {
        self.group
            .broadcast_bytes(TRAINER_RANK, Some(bytes), deadline)
            .map_err(Self::comm("announcing to the workers"))?;
        Ok(())
    }

    /// Starts a session (numbers it).
    pub(crate) fn begin_session(&mut self) {
        self.session += 1;
    }

    /// The announcement of update `index` of `metas` (full info `full_info`), encoded. A
    /// dense update with the same parameters as the last one every worker applied is
    /// announced as "reuse the previous metadata" when the engine is configured so.
    fn announcement(
        &self,
        index: u32,
        full_info: &UpdateInfo,
        metas: &[ParamMeta],
        staged: Option<Staged>,
    ) -> Result<Vec<u8>, TransferError> {
        let digest = metadata_digest(metas);
        let info = if full_info.update_kind == crate::info::UpdateKind::Dense
            && self.reuse_metadata
            && self.last_dense.as_deref() == Some(metas)
        {
            UpdateInfo::dense_reuse(full_info.packed)
        } else {
            full_info.clone()
        };
        Control::Update {
            session: self.session,
            update: index,
            info,
            metadata_digest: digest.to_string(),
            staged,
        }
        .encode()
    }

    /// The end marker of a session of `updates` updates, encoded.
    fn end_marker(&self, updates: u32) -> Result<Vec<u8>, TransferError> {
        Control::End {
            session: self.session,
            updates,
        }
        .encode()
    }

    /// Records that a dense update of `metas` is applied by every worker.
    fn dense_applied(&mut self, metas: Vec<ParamMeta>) {
        self.last_dense = Some(metas);
    }

    /// Forgets the last dense metadata (after a failure workers may disagree about it).
    fn forget_metadata(&mut self) {
        self.last_dense = None;
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

    /// `Some` when the payload of `update` (parameters `metas`) travels staged, before the
    /// vote (see the module docs); the default: never.
    fn staged(
        &self,
        _update: &Self::Update<'_>,
        _metas: &[ParamMeta],
    ) -> Result<Option<Staged>, TransferError> {
        Ok(None)
    }

    /// Sends the payload of update `index` (announced as `info`, parameters `metas`): after
    /// a successful vote, or right after the announcement for a staged payload. Returns the
    /// payload bytes each worker got.
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
/// `engine` (see the module docs). After a failure the "reuse" metadata is forgotten
/// (workers may disagree about it). `started` is when the send began, for the report.
pub(crate) fn send_session<E: TrainerPayload>(
    engine: &mut E,
    updates: &[(E::Update<'_>, UpdateInfo)],
    started: Instant,
    deadline: Deadline,
) -> Result<SendReport, TransferError> {
    engine.control().begin_session();
    let mut report = SendReport::default();
    report.phases.prepare = started.elapsed();
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
    let count = u32::try_from(updates.len()).map_err(|_| TransferError::Config {
        detail: format!("a session of {} updates is too long", updates.len()),
    })?;
    let plans = updates
        .iter()
        .map(|(update, _)| {
            let metas = update.metas();
            let staged = engine.staged(update, &metas)?;
            Ok((metas, staged))
        })
        .collect::<Result<Vec<_>, TransferError>>()?;
    let Some(((_, first_info), (first_metas, first_staged))) = updates.first().zip(plans.first())
    else {
        // Nothing to announce: the end marker goes alone.
        let t = Instant::now();
        let end = engine.control().end_marker(0)?;
        engine.control().broadcast(&end, deadline)?;
        report.phases.end += t.elapsed();
        return Ok(());
    };
    let t = Instant::now();
    let announcement = engine
        .control()
        .announcement(0, first_info, first_metas, *first_staged)?;
    engine.control().broadcast(&announcement, deadline)?;
    report.phases.announce += t.elapsed();

    for (index, ((update, info), (metas, staged))) in updates.iter().zip(&plans).enumerate() {
        let index = index as u32;
        if staged.is_none() {
            let t = Instant::now();
            engine.control().status_round(index, "vote", deadline)?;
            report.phases.vote += t.elapsed();
        }
        let t = Instant::now();
        report.payload_bytes += engine.send_payload(index, update, info, metas, deadline)?;
        report.phases.payload += t.elapsed();

        let t = Instant::now();
        let dense = update.param_count();
        if let ParamCount::Dense(_) = dense {
            // Announce the next update as if this one succeeds: if it fails, the session
            // ends here and the metadata is forgotten.
            engine.control().dense_applied(metas.clone());
        }
        let following = index as usize + 1;
        let next = match updates.get(following).zip(plans.get(following)) {
            Some(((_, info), (metas, staged))) => {
                engine
                    .control()
                    .announcement(index + 1, info, metas, *staged)?
            }
            None => engine.control().end_marker(count)?,
        };
        engine
            .control()
            .round(index, "status", &status_ok_with(&next), deadline)?;
        report.phases.status += t.elapsed();
        report.updates += 1;
        match dense {
            ParamCount::Dense(n) => report.dense_params += n,
            ParamCount::Sparse(n) => report.sparse_params += n,
        }
    }
    Ok(())
}

/// A problem a worker found while receiving a payload.
pub(crate) enum Failure {
    /// This worker cannot apply the update, but the stream is still in step: the others
    /// hear it in the status round.
    Refused(TransferError),
    /// No further round of this update can be trusted (the transport broke, or the
    /// failure was already reported in a round of its own): returned as it is.
    Fatal(TransferError),
}

/// A worker engine's own part of an update: a staged payload, the checks before the vote,
/// the payload path and what happens once every rank committed.
pub(crate) trait WorkerPayload: WorkerEngine {
    /// What the checks before the vote hand the payload step.
    type Plan;
    /// What the payload step hands the commit step.
    type Received;

    /// The engine's control channel.
    fn control(&mut self) -> &mut WorkerControl;

    /// Receives a payload the trainer moves right after its announcement (see the module
    /// docs) into the engine's staging area. Called before the announcement is checked, so
    /// the transfer stays matched whatever this worker decides; an error ends the update
    /// without a round. The default refuses: the engine stages nothing.
    fn receive_staged(&mut self, staged: Staged, _deadline: Deadline) -> Result<(), TransferError> {
        let engine = self.name();
        Err(self.control().protocol(format!(
            "the trainer moves a payload of {} + {} bytes before the vote; the {engine} \
             engine cannot stage one (are both sides the same engine?)",
            staged.index_bytes, staged.value_bytes,
        )))
    }

    /// Checks that must pass before this worker votes for `update` (or, for a staged
    /// payload, before the payload is examined); an error is this worker's refusal.
    fn check(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<Self::Storage>,
    ) -> Result<Self::Plan, TransferError>;

    /// Receives the payload of `update` after a successful vote, or examines the staged
    /// payload of a staged update.
    fn receive_payload(
        &mut self,
        update: &PreparedUpdate,
        plan: Self::Plan,
        registry: &mut ParamRegistry<Self::Storage>,
        deadline: Deadline,
    ) -> Result<Self::Received, Failure>;

    /// Applies what is still staged once every rank said ok; returns the number of chunks
    /// received, for the report.
    fn commit(
        &mut self,
        update: &PreparedUpdate,
        received: Self::Received,
        registry: &mut ParamRegistry<Self::Storage>,
    ) -> Result<usize, TransferError>;
}

/// Receives one update through `engine` (see [`WorkerEngine::receive`]): the checks and the
/// vote (unless the payload was staged), the payload, the status round, then the engine's
/// commit.
pub(crate) fn receive_update<E: WorkerPayload>(
    engine: &mut E,
    update: &PreparedUpdate,
    registry: &mut ParamRegistry<E::Storage>,
    deadline: Deadline,
) -> Result<UpdateReport, TransferError> {
    let started = Instant::now();
    // With a staged payload, the vote and the status round are one round.
    let staged = engine.control().staged.is_some();
    let plan = match engine.check(update, registry) {
        Ok(plan) => plan,
        Err(e) => {
            let round = if staged { "status" } else { "vote" };
            return Err(engine.control().fail_round(e, round, deadline));
        }
    };
    if !staged {
        engine
            .control()
            .status_round(status_ok(), "vote", deadline)?;
    }
    let received = match engine.receive_payload(update, plan, registry, deadline) {
        Ok(r) => r,
        // Status round: tell everyone, then report our own reason.
        Err(Failure::Refused(e)) => return Err(engine.control().fail_round(e, "status", deadline)),
        Err(Failure::Fatal(e)) => return Err(e),
    };
    engine.control().final_round("status", deadline)?;
    let chunks = engine.commit(update, received, registry)?;
    Ok(UpdateReport {
        params: update.slots.len(),
        payload_bytes: update.update.payload_bytes(),
        chunks,
        elapsed: started.elapsed(),
    })
}

/// The trainer's next announcement for `engine` (see [`WorkerEngine::announcement`]): the
/// one the last status round carried, or the next broadcast. A staged payload is received
/// before anything else (see the module docs).
pub(crate) fn announcement<E: WorkerPayload>(
    engine: &mut E,
    deadline: Deadline,
) -> Result<Announcement, TransferError> {
    let bytes = engine.control().next_control(deadline)?;
    let parsed = serde_json::from_slice::<Control>(&bytes);
    let staged = match &parsed {
        Ok(Control::Update { staged, .. }) => *staged,
        Ok(Control::End { .. }) => None,
        Err(_) => serde_json::from_slice::<StagedOnly>(&bytes)
            .ok()
            .and_then(|s| s.staged),
    };
    if let Some(sizes) = staged {
        engine.receive_staged(sizes, deadline)?;
        engine.control().staged = Some(sizes);
    }
    engine.control().interpret(parsed, deadline)
}

/// Ends `engine`'s session, consuming the trainer's end marker if not seen yet (see
/// [`WorkerEngine::finish`]).
pub(crate) fn finish<E: WorkerPayload>(
    engine: &mut E,
    deadline: Deadline,
) -> Result<(), TransferError> {
    if !engine.control().ended {
        match announcement(engine, deadline)? {
            Announcement::End => {}
            Announcement::Update { .. } => {
                let control = engine.control();
                let e = control.protocol(format!(
                    "the trainer announced update {} while this worker finished the session",
                    control.updates
                ));
                // Refuse it so the trainer learns why.
                let _ = control.status_round(status_failed(&e.to_string()), "refusal", deadline);
                control.end_session();
                return Err(e);
            }
        }
    }
    engine.control().end_session();
    Ok(())
}

/// The [`WorkerEngine`] methods every in-band engine answers from its control channel (a
/// field `control: WorkerControl`, and a [`WorkerPayload`] implementation): its rank, the
/// trainer's next announcement, a refusal, and the end of a session.
macro_rules! worker_control_methods {
    () => {
        fn rank(&self) -> usize {
            self.control.rank()
        }

        fn announcement(
            &mut self,
            deadline: ::moeshift_sync::Deadline,
        ) -> Result<$crate::engine::Announcement, $crate::error::TransferError> {
            $crate::control::announcement(self, deadline)
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
    /// The trainer's next control message, carried by the last status round.
    pending: Option<Vec<u8>>,
    /// The current update's payload was staged before the vote (sizes as announced).
    pub(crate) staged: Option<Staged>,
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
            pending: None,
            staged: None,
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

    /// One all-gathered status round; every rank's status when all said ok.
    fn round(
        &self,
        mine: Vec<u8>,
        what: &str,
        deadline: Deadline,
    ) -> Result<Vec<Vec<u8>>, TransferError> {
        let statuses = self
            .group
            .all_gather(&mine, deadline)
            .map_err(self.comm(format!("{what} of update {}", self.updates)))?;
        let failed = failures(&statuses);
        if failed.is_empty() {
            Ok(statuses)
        } else {
            Err(self.peers_failed(failed))
        }
    }

    /// One all-gathered status round; `Ok` when every rank said ok.
    pub(crate) fn status_round(
        &self,
        mine: Vec<u8>,
        what: &str,
        deadline: Deadline,
    ) -> Result<(), TransferError> {
        self.round(mine, what, deadline).map(|_| ())
    }

    /// The round that ends an update: this worker says ok; when every rank did, the update
    /// counts as done and the trainer's next control message (which its status carries) is
    /// kept for [`announcement`].
    fn final_round(&mut self, what: &str, deadline: Deadline) -> Result<(), TransferError> {
        let mut statuses = self.round(status_ok(), what, deadline)?;
        self.updates += 1;
        let carried = statuses
            .get_mut(TRAINER_RANK)
            .map(std::mem::take)
            .unwrap_or_default();
        // `failures` found the trainer's status to start with "ok".
        self.pending = carried
            .get(1..)
            .filter(|next| !next.is_empty())
            .map(<[u8]>::to_vec);
        Ok(())
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

    /// The bytes of the trainer's next control message: carried by the last status round,
    /// or broadcast now. Forgets the previous update's staged payload.
    fn next_control(&mut self, deadline: Deadline) -> Result<Vec<u8>, TransferError> {
        self.staged = None;
        match self.pending.take() {
            Some(bytes) => Ok(bytes),
            None => self
                .group
                .broadcast_bytes(TRAINER_RANK, None, deadline)
                .map_err(self.comm("waiting for the trainer's next announcement")),
        }
    }

    /// Checks a control message the trainer sent (`parsed` from its bytes) and turns it into
    /// an announcement. A message this worker cannot take while the trainer waits for its
    /// vote is refused in that round, so the trainer hears why.
    fn interpret(
        &mut self,
        parsed: Result<Control, serde_json::Error>,
        deadline: Deadline,
    ) -> Result<Announcement, TransferError> {
        let control = match parsed {
            Ok(c) => c,
            Err(e) => {
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
        match control {
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
        self.pending = None;
        self.staged = None;
    }

    /// Refuses the announced update (see [`crate::WorkerEngine::reject`]): one failed
    /// status round, which is the vote, or the status round of a staged update.
    pub(crate) fn reject(
        &mut self,
        reason: &TransferError,
        deadline: Deadline,
    ) -> Result<(), TransferError> {
        let r = self.status_round(status_failed(&reason.to_string()), "refusal", deadline);
        self.updates += 1;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_encoding() {
        let statuses = vec![
            status_ok_with(b"{\"type\":\"end\"}"),
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
        assert!(failures(&[status_ok_with(b"next"), status_ok()]).is_empty());
        assert_eq!(status_ok_with(b"ab"), vec![OK, b'a', b'b']);
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

    #[test]
    fn staged_sizes_travel_and_survive_an_unreadable_announcement() {
        // Without a staged payload the field is left out, as before.
        let plain = Control::Update {
            session: 1,
            update: 0,
            info: UpdateInfo::dense_reuse(true),
            metadata_digest: "00".into(),
            staged: None,
        };
        let text = serde_json::to_string(&plain).unwrap();
        assert!(!text.contains("staged"), "{text}");

        let staged = r#"{"type":"update","session":1,"update":0,"metadata_digest":"00",
            "info":{"names":[],"dtype_names":[],"shapes":[]},
            "staged":{"index_bytes":44,"value_bytes":32}}"#;
        match serde_json::from_str::<Control>(staged).unwrap() {
            Control::Update { staged, .. } => assert_eq!(
                staged,
                Some(Staged {
                    index_bytes: 44,
                    value_bytes: 32
                })
            ),
            other => panic!("{other:?}"),
        }
        // An announcement this worker cannot parse (an unknown field, an unknown kind) still
        // says how many bytes follow it, so the worker can take them before refusing.
        let unknown = r#"{"type":"update","session":1,"update":0,"metadata_digest":"00",
            "info":{"names":[],"dtype_names":[],"shapes":[],"update_kind":"sparse_coo"},
            "priority":3,"staged":{"index_bytes":8,"value_bytes":16}}"#;
        assert!(serde_json::from_str::<Control>(unknown).is_err());
        let sizes = serde_json::from_str::<StagedOnly>(unknown).unwrap().staged;
        assert_eq!(
            sizes,
            Some(Staged {
                index_bytes: 8,
                value_bytes: 16
            })
        );
        let end = serde_json::from_str::<StagedOnly>(r#"{"type":"end","session":1,"updates":0}"#);
        assert_eq!(end.unwrap().staged, None);
    }
}
