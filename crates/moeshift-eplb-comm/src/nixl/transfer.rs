//! How a [`NixlCommunicator`] moves one layer: local checks and plan agreement, READ
//! requests from every peer (split over the UCX workers) straight into a lent landing slot
//! (the layer's staging), local copies next to the received rows, polling with a deadline,
//! then the post-read check, timing each phase. See the type's documentation.

use std::time::{Duration, Instant};

use moeshift_placement::{LayerPlan, RankPlan};
use moeshift_sync::Deadline;
use moeshift_tensor::Device;

use super::agent::{Read, ReadDesc};
use super::communicator::{NixlCommunicator, Peer};
use super::error::NixlError;
use super::phases::NixlPhases;
use super::split::{experts_of, split_even, Piece, GRAIN};
use super::status::exchange_status;
use crate::agree::{agree_on_plan, plan_digest};
use crate::comm::{Backend, StagedLayer, TransferStats};
use crate::error::EplbCommError;
use crate::host::check_rank_plan;
use crate::staging::{LentMemory, RowSource, Staging, StagingBuilder};
use crate::weights::{LayerLayout, LayerWeights};

/// The error of an internal inconsistency between the staging laid out and its memory.
fn inconsistent(rank: usize, layer: usize, detail: String) -> EplbCommError {
    EplbCommError::PlanMismatch {
        rank,
        layer,
        detail: format!("inconsistent staging: {detail}"),
    }
}

/// Part of the time left that a transfer keeps for the post-read check, so a rank whose
/// READs ran out of time can still tell its peers (at most [`MAX_RESERVE`]).
const RESERVE_FRACTION: u32 = 5;
/// Upper bound of the reserve.
const MAX_RESERVE: Duration = Duration::from_secs(2);
/// How long polling only yields the thread between rounds. Host-memory READs (UCX `cma`)
/// progress only while this rank polls, so polling is tight at first; RDMA READs progress
/// on their own, and a long transfer then costs a few wake-ups, not a spinning core.
const SPIN: Duration = Duration::from_millis(2);
/// Sleep between polls once spinning is over.
const POLL_SLEEP: Duration = Duration::from_micros(50);

impl NixlCommunicator {
    /// Everything a layer's transfer needs that can be checked and built locally, staged in
    /// a landing slot lent here. Taking the slot before the agreement makes a busy landing
    /// area a refusal every rank hears of.
    fn prepare<'p>(
        &self,
        layer: usize,
        plan: &'p LayerPlan,
        weights: &LayerWeights<'_>,
    ) -> Result<Prepared<'p>, EplbCommError> {
        let (slot_addr, lent) = self.landing.lend(self.me, layer)?;
        let planned = self.plan_reads(layer, plan, weights)?;
        self.land(layer, planned, slot_addr, lent)
    }

    /// Lays a planned layer out in a lent landing slot at `slot_addr`: its READs' local
    /// addresses become addresses in the slot. Fails (before any READ is posted) if the rows
    /// do not fit the slot.
    pub(super) fn land<'p>(
        &self,
        layer: usize,
        planned: Planned<'p>,
        slot_addr: u64,
        lent: LentMemory,
    ) -> Result<Prepared<'p>, EplbCommError> {
        let Planned {
            mine,
            layout,
            builder,
            mut reads,
            local,
        } = planned;
        for r in &mut reads {
            for piece in &mut r.pieces {
                piece.desc.local = slot_addr.saturating_add(piece.desc.local);
            }
        }
        let staging = builder.build_lent(self.me, layer, lent)?;
        Ok(Prepared {
            mine,
            layout,
            staging,
            reads,
            local,
        })
    }

    /// Everything a layer's transfer needs that can be checked and built locally, before a
    /// landing slot is known: the READs' local addresses are offsets into the slot.
    pub(super) fn plan_reads<'p>(
        &self,
        layer: usize,
        plan: &'p LayerPlan,
        weights: &LayerWeights<'_>,
    ) -> Result<Planned<'p>, EplbCommError> {
        let me = self.me;
        let place = self
            .layers
            .get(layer)
            .ok_or(EplbCommError::LayerOutOfRange {
                rank: me,
                layer,
                layers: self.layers.len(),
            })?;
        if let Some(detail) = place.difference_from(weights) {
            return Err(EplbCommError::WeightsChanged {
                rank: me,
                layer,
                detail,
            });
        }
        let layout = &place.layout;
        let mismatch = |detail: String| EplbCommError::PlanMismatch {
            rank: me,
            layer,
            detail,
        };
        let mine = check_rank_plan(me, self.peers.len(), layer, layout.rows, plan)?;
        let rows = layout.rows;
        let row_ok = |expert: usize, row: usize| {
            if row < rows {
                Ok(())
            } else {
                Err(EplbCommError::RowOutOfRange {
                    rank: me,
                    layer,
                    expert,
                    row,
                    rows,
                })
            }
        };

        // Staging is a lent landing slot: received rows first, each READ straight into its
        // place, then local copies.
        let expert_bytes = layout.expert_bytes();
        let mut offsets = Vec::with_capacity(layout.tensors.len());
        let mut at = 0usize;
        for t in &layout.tensors {
            offsets.push(at);
            at = at.saturating_add(t.row_bytes);
        }
        let mut builder = StagingBuilder::new(layout);
        let mut by_peer: Vec<Option<PeerRead>> = (0..self.peers.len()).map(|_| None).collect();
        for r in &mine.recvs {
            row_ok(r.expert, r.dst_row)?;
            let peer = self
                .peers
                .get(r.src)
                .and_then(Option::as_ref)
                .ok_or_else(|| {
                    mismatch(format!(
                        "expert {} comes from rank {}, which is this rank or outside the group of {}",
                        r.expert,
                        r.src,
                        self.peers.len()
                    ))
                })?;
            // The row the sender reads from: its plan's send of this expert to this rank.
            let src_row = plan
                .rank(r.src)
                .ok()
                .and_then(|p| p.sends.iter().find(|s| s.dst == me && s.expert == r.expert))
                .map(|s| s.src_row)
                .ok_or_else(|| {
                    mismatch(format!(
                        "expert {} comes from rank {}, whose part of the plan has no such send",
                        r.expert, r.src
                    ))
                })?;
            row_ok(r.expert, src_row)?;
            let theirs = peer
                .layers
                .get(layer)
                .ok_or_else(|| mismatch(format!("rank {} registered no layer {layer}", r.src)))?;
            let index = builder.push_row(
                r.dst_row,
                r.expert,
                RowSource::Peer {
                    peer: r.src,
                    round: r.round,
                },
            );
            let base = index.saturating_mul(expert_bytes);
            let entry = by_peer
                .get_mut(r.src)
                .ok_or_else(|| mismatch(format!("rank {} is outside the group", r.src)))?
                .get_or_insert_with(|| PeerRead {
                    peer: r.src,
                    device: theirs.device,
                    pieces: Vec::new(),
                });
            for ((spec, off), place) in layout.tensors.iter().zip(&offsets).zip(&theirs.tensors) {
                if spec.row_bytes == 0 {
                    continue;
                }
                entry.pieces.push(Piece {
                    expert: r.expert,
                    desc: ReadDesc {
                        local: base.saturating_add(*off) as u64,
                        remote: place.row_addr(src_row),
                        len: spec.row_bytes,
                    },
                });
            }
        }
        let mut local = Vec::with_capacity(mine.local_copies.len());
        for c in &mine.local_copies {
            let index =
                builder.push_row(c.dst_row, c.expert, RowSource::Local { src_row: c.src_row });
            local.push((index, c.src_row));
        }
        Ok(Planned {
            mine,
            layout: layout.clone(),
            builder,
            reads: by_peer.into_iter().flatten().collect(),
            local,
        })
    }

    /// Copies the local rows into host staging, by the CPU. Done before any READ is posted,
    /// so no reference into the slot exists while READs write into it.
    fn copy_local_rows_on_host(
        &self,
        layer: usize,
        prepared: &mut Prepared<'_>,
        weights: &LayerWeights<'_>,
    ) -> Result<(), EplbCommError> {
        let tensors = prepared.layout.tensors.len();
        for &(index, src_row) in &prepared.local {
            for t in 0..tensors {
                let src = weights.row(t, src_row)?;
                let dst = prepared.staging.row_tensor_mut(index, t).ok_or_else(|| {
                    inconsistent(
                        self.me,
                        layer,
                        format!("staged row {index} has no room for tensor {t}"),
                    )
                })?;
                dst.copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Posts the READs from every peer this rank receives from: each peer's rows split into
    /// up to `read_streams` requests of nearly equal bytes, request `i` on UCX worker `i`.
    /// On error, the requests already posted are released (dropped) before it returns.
    fn post_reads(
        &self,
        layer: usize,
        prepared: &Prepared<'_>,
    ) -> Result<Vec<PendingRead>, EplbCommError> {
        let me = self.me;
        let mut pending = Vec::with_capacity(prepared.reads.len() * self.read_streams);
        for r in &prepared.reads {
            let peer = self.peer(r.peer).map_err(EplbCommError::from)?;
            let requests = split_even(&r.pieces, self.read_streams, GRAIN);
            let count = requests.len();
            for (i, request) in requests.iter().enumerate() {
                let descs: Vec<ReadDesc> = request.iter().map(|p| p.desc).collect();
                let experts = experts_of(request);
                let read = self
                    .agent
                    .post_read(&peer.agent, &descs, self.landing.device(), r.device, i)
                    .map_err(|e| NixlError::ReadFailed {
                        rank: me,
                        layer,
                        peer: r.peer,
                        experts: experts.clone(),
                        detail: format!("{}{}: {}", request_label(i, count), e.op, e.status),
                    })?;
                pending.push(PendingRead {
                    peer: r.peer,
                    request: i,
                    requests: count,
                    experts,
                    read,
                });
            }
        }
        Ok(pending)
    }

    /// Stages the layer: local copies (host: by the CPU first; device: queued on the GPU
    /// while the READs run) and this rank's READs, straight into the lent slot. Returns once
    /// every READ landed and every copy finished. Adds the time of the copies and of the
    /// READs to `phases` (see [`NixlPhases`] for what counts where).
    fn move_rows(
        &self,
        layer: usize,
        prepared: &mut Prepared<'_>,
        weights: &LayerWeights<'_>,
        deadline: Deadline,
        phases: &mut NixlPhases,
    ) -> Result<(), EplbCommError> {
        let started = self.start_rows(layer, prepared, weights, phases)?;
        self.finish_rows(layer, started, deadline, phases)
    }

    /// The first half of [`move_rows`](Self::move_rows): local copies (host: done by the CPU;
    /// device: queued) and the READs, posted. On error, nothing it started is left running
    /// except READs it released (so the landing slot must not be reused: the caller poisons
    /// the communicator).
    pub(super) fn start_rows<'s>(
        &'s self,
        layer: usize,
        prepared: &mut Prepared<'_>,
        weights: &LayerWeights<'_>,
        phases: &mut NixlPhases,
    ) -> Result<StartedRows<'s>, EplbCommError> {
        let on_host = self.landing.device() == Device::Host;
        if on_host {
            let copying = Instant::now();
            self.copy_local_rows_on_host(layer, prepared, weights)?;
            phases.local_copies += copying.elapsed().as_secs_f64();
        } else {
            self.bind_gpu(Some(layer))?;
        }
        let posting = Instant::now();
        let pending = self.post_reads(layer, prepared)?;
        phases.read_requests = pending.len();
        phases.reads += posting.elapsed().as_secs_f64();
        #[cfg(feature = "cuda")]
        let copies = match (&self.cuda, on_host) {
            (Some(cuda), false) => {
                let queueing = Instant::now();
                let queue = cuda.queue_local_copies(
                    self.me,
                    layer,
                    weights,
                    &mut prepared.staging,
                    &prepared.local,
                )?;
                phases.local_copies += queueing.elapsed().as_secs_f64();
                Some(queue)
            }
            _ => None,
        };
        Ok(StartedRows {
            pending,
            #[cfg(feature = "cuda")]
            copies,
            #[cfg(not(feature = "cuda"))]
            _stream: std::marker::PhantomData,
            posted: Instant::now(),
        })
    }

    /// The second half of [`move_rows`](Self::move_rows): waits for the READs (until
    /// `deadline`) and the local copies.
    pub(super) fn finish_rows(
        &self,
        layer: usize,
        started: StartedRows<'_>,
        deadline: Deadline,
        phases: &mut NixlPhases,
    ) -> Result<(), EplbCommError> {
        let me = self.me;
        let StartedRows {
            mut pending,
            #[cfg(feature = "cuda")]
            copies,
            posted,
            ..
        } = started;
        let waited = self
            .wait_reads(&mut pending, deadline)
            .map_err(|e| match e {
                WaitError::Failed {
                    peer,
                    experts,
                    detail,
                } => EplbCommError::from(NixlError::ReadFailed {
                    rank: me,
                    layer,
                    peer,
                    experts,
                    detail,
                }),
                WaitError::Timeout {
                    peer,
                    experts,
                    waited,
                } => EplbCommError::from(NixlError::ReadTimeout {
                    rank: me,
                    layer,
                    peer,
                    experts,
                    waited,
                }),
            });
        phases.reads += posted.elapsed().as_secs_f64();
        #[cfg(feature = "cuda")]
        if let Some(queue) = &copies {
            let finishing = Instant::now();
            let copied = super::cuda::finish_copies(queue, deadline, waited.is_err());
            phases.local_copies += finishing.elapsed().as_secs_f64();
            waited?;
            return copied;
        }
        waited
    }

    /// Makes the GPU's context current on this thread (weights on a GPU only).
    #[cfg(feature = "cuda")]
    pub(super) fn bind_gpu(&self, layer: Option<usize>) -> Result<(), EplbCommError> {
        match &self.cuda {
            Some(cuda) => cuda.bind(self.me, layer),
            None => Err(EplbCommError::CommunicatorFailed {
                rank: self.me,
                reason: "device weights without a GPU context".into(),
            }),
        }
    }

    /// Without feature `cuda` no communicator has device weights.
    #[cfg(not(feature = "cuda"))]
    pub(super) fn bind_gpu(&self, _layer: Option<usize>) -> Result<(), EplbCommError> {
        Err(EplbCommError::CommunicatorFailed {
            rank: self.me,
            reason: "device weights need feature `cuda`".into(),
        })
    }

    /// Polls every `pending` READ request (polling one progresses its UCX worker) until all
    /// completed. On an error or at the deadline it returns, naming the peer and the
    /// request's experts; the caller then drops the requests, which releases (aborts) any
    /// still in flight.
    pub(super) fn wait_reads(
        &self,
        pending: &mut Vec<PendingRead>,
        deadline: Deadline,
    ) -> Result<(), WaitError> {
        let started = Instant::now();
        loop {
            let mut outstanding = false;
            for p in pending.iter_mut() {
                match self.agent.poll(&mut p.read) {
                    Ok(true) => {}
                    Ok(false) => outstanding = true,
                    Err(e) => {
                        return Err(WaitError::Failed {
                            peer: p.peer,
                            experts: p.experts.clone(),
                            detail: format!(
                                "{}{}: {}",
                                request_label(p.request, p.requests),
                                e.op,
                                e.status
                            ),
                        })
                    }
                }
            }
            if !outstanding {
                pending.clear();
                return Ok(());
            }
            if deadline.is_expired() {
                let (peer, experts) = pending
                    .iter()
                    .find(|p| !p.read.is_done())
                    .map(|p| (p.peer, p.experts.clone()))
                    .unwrap_or_default();
                return Err(WaitError::Timeout {
                    peer,
                    experts,
                    waited: started.elapsed(),
                });
            }
            if started.elapsed() < SPIN {
                std::thread::yield_now();
            } else {
                std::thread::sleep(POLL_SLEEP);
            }
        }
    }

    fn peer(&self, peer: usize) -> Result<&Peer, NixlError> {
        self.peers
            .get(peer)
            .and_then(Option::as_ref)
            .ok_or_else(|| NixlError::Call {
                rank: self.me,
                op: format!("looking up peer rank {peer}"),
                status: "no such peer".into(),
            })
    }

    /// Marks the communicator unusable after `error` (when the error says so) and returns
    /// the error.
    fn fail(&mut self, error: EplbCommError) -> EplbCommError {
        if error.poisons_communicator() && self.failed.is_none() {
            self.failed = Some(error.to_string());
        }
        error
    }

    /// Marks the communicator unusable after a failure while READs may have been in flight
    /// (whatever the error is: a released request may not have stopped writing into the
    /// landing area), and returns the error.
    fn fail_after_reads(&mut self, error: EplbCommError) -> EplbCommError {
        if self.failed.is_none() {
            self.failed = Some(error.to_string());
        }
        error
    }

    pub(super) fn transfer_inner(
        &mut self,
        layer: usize,
        plan: &LayerPlan,
        weights: &LayerWeights<'_>,
        deadline: Deadline,
    ) -> Result<StagedLayer, EplbCommError> {
        let started = Instant::now();
        let me = self.me;
        let group = match (&self.group, &self.failed) {
            (Some(g), None) => g,
            (_, reason) => {
                return Err(EplbCommError::CommunicatorFailed {
                    rank: me,
                    reason: reason
                        .clone()
                        .unwrap_or_else(|| "the EPLB group is gone".into()),
                })
            }
        };

        let mut phases = NixlPhases {
            layer,
            ..NixlPhases::default()
        };

        // 1. Local checks, then agreement (a refusal is sent to the peers, not kept).
        let digest = plan_digest(layer, plan);
        let prepared = self.prepare(layer, plan, weights);
        let refusal = prepared.as_ref().err().map(ToString::to_string);
        if let Err(e) = agree_on_plan(group, layer, digest, refusal.as_deref(), deadline) {
            return Err(self.fail(e));
        }
        let mut prepared = prepared?;
        phases.agreement = started.elapsed().as_secs_f64();

        // 2–4. READs and local copies, keeping a reserve for the post-read check.
        let crosses_ranks = plan.num_transfers() > 0;
        let reads_until = read_deadline(deadline);
        let moved = self.move_rows(layer, &mut prepared, weights, reads_until, &mut phases);

        // 5. Post-read check: nobody commits while a peer may still read, and nobody
        //    commits unless everybody got its rows.
        if crosses_ranks {
            let Some(group) = self.group.as_ref() else {
                return Err(self.fail(EplbCommError::CommunicatorFailed {
                    rank: me,
                    reason: "the EPLB group is gone".into(),
                }));
            };
            let outcome = moved.as_ref().err().map(ToString::to_string);
            let exchanging = Instant::now();
            let checked = exchange_status(
                group,
                Some(layer),
                "the post-read check",
                outcome.as_deref(),
                deadline,
            );
            phases.status_exchange = exchanging.elapsed().as_secs_f64();
            match (moved, checked) {
                (Err(e), _) => return Err(self.fail_after_reads(e)),
                (Ok(()), Err(e)) => return Err(self.fail(e)),
                (Ok(()), Ok(failed_peers)) => {
                    if let Some((peer, reason)) = failed_peers.into_iter().next() {
                        return Err(self.fail(
                            NixlError::PeerReadFailed {
                                rank: me,
                                layer,
                                peer,
                                reason,
                            }
                            .into(),
                        ));
                    }
                }
            }
        } else if let Err(e) = moved {
            return Err(self.fail_after_reads(e));
        }

        let stats = layer_stats(
            prepared.mine,
            &prepared.layout,
            prepared.staging.len(),
            started.elapsed().as_secs_f64(),
        );
        phases.total = stats.seconds;
        phases.bytes_read = stats.bytes_received;
        self.last_phases = Some(phases);
        Ok(StagedLayer::new(
            layer,
            me,
            Backend::Nixl,
            prepared.mine.clone(),
            prepared.layout,
            prepared.staging,
            stats,
        ))
    }
}

/// The deadline of READs: `deadline` less a reserve for the post-read check, so a rank whose
/// READs ran out of time can still tell its peers.
pub(super) fn read_deadline(deadline: Deadline) -> Deadline {
    let reserve = (deadline.remaining() / RESERVE_FRACTION).min(MAX_RESERVE);
    Deadline::at(
        deadline
            .instant()
            .checked_sub(reserve)
            .unwrap_or(deadline.instant()),
    )
}

/// What a layer's transfer did on this rank: `mine` moved with `layout`, staging
/// `staging_bytes`, in `seconds`.
pub(super) fn layer_stats(
    mine: &RankPlan,
    layout: &LayerLayout,
    staging_bytes: usize,
    seconds: f64,
) -> TransferStats {
    let expert_bytes = layout.expert_bytes() as u64;
    let mut peers: Vec<usize> = mine
        .sends
        .iter()
        .map(|s| s.dst)
        .chain(mine.recvs.iter().map(|r| r.src))
        .collect();
    peers.sort_unstable();
    peers.dedup();
    let mut rounds: Vec<usize> = mine
        .sends
        .iter()
        .map(|s| s.round)
        .chain(mine.recvs.iter().map(|r| r.round))
        .collect();
    rounds.sort_unstable();
    rounds.dedup();
    TransferStats {
        bytes_sent: expert_bytes.saturating_mul(mine.sends.len() as u64),
        bytes_received: expert_bytes.saturating_mul(mine.recvs.len() as u64),
        bytes_copied_locally: expert_bytes.saturating_mul(mine.local_copies.len() as u64),
        peers: peers.len(),
        rounds: rounds.len(),
        staging_bytes: staging_bytes as u64,
        seconds,
    }
}

/// Why waiting for READs stopped.
pub(super) enum WaitError {
    /// A request failed.
    Failed {
        peer: usize,
        experts: Vec<usize>,
        detail: String,
    },
    /// Requests were still in flight at the deadline.
    Timeout {
        peer: usize,
        experts: Vec<usize>,
        waited: Duration,
    },
}

/// A posted READ request and what it is for.
pub(super) struct PendingRead {
    /// The peer read from.
    pub(super) peer: usize,
    /// Its index among the peer's requests (and its UCX worker).
    pub(super) request: usize,
    /// How many requests read from the peer.
    pub(super) requests: usize,
    /// The experts whose rows (or pieces of them) it reads.
    pub(super) experts: Vec<usize>,
    /// The request.
    pub(super) read: Read,
}

/// How a message names request `request` of `requests` from one peer (nothing when there
/// is only one).
fn request_label(request: usize, requests: usize) -> String {
    if requests > 1 {
        format!(
            "request {} of {requests} (UCX worker {request}): ",
            request + 1
        )
    } else {
        String::new()
    }
}

/// A layer's transfer, checked and laid out, before a landing slot is chosen.
pub(super) struct Planned<'p> {
    mine: &'p RankPlan,
    layout: LayerLayout,
    /// The staged rows, laid out: received rows first, then local copies.
    builder: StagingBuilder,
    /// The rows to READ, by peer this rank receives from; local addresses are offsets into
    /// the landing slot.
    reads: Vec<PeerRead>,
    /// Local copies: (staged row, source row).
    local: Vec<(usize, usize)>,
}

/// A layer's transfer, prepared.
pub(super) struct Prepared<'p> {
    pub(super) mine: &'p RankPlan,
    pub(super) layout: LayerLayout,
    /// Laid out in a lent landing slot: received rows first, then local copies.
    pub(super) staging: Staging,
    /// The rows to READ, by peer this rank receives from.
    reads: Vec<PeerRead>,
    /// Local copies: (staged row, source row).
    local: Vec<(usize, usize)>,
}

/// A layer's rows on their way: READs posted, local copies queued (device weights).
pub(super) struct StartedRows<'s> {
    pending: Vec<PendingRead>,
    #[cfg(feature = "cuda")]
    copies: Option<crate::cuda_stage::memory::CopyQueue<'s>>,
    #[cfg(not(feature = "cuda"))]
    _stream: std::marker::PhantomData<&'s ()>,
    posted: Instant,
}

/// The rows this rank READs from one peer: one piece per (expert row, tensor), in plan
/// order, split into requests when posted.
struct PeerRead {
    peer: usize,
    device: Device,
    pieces: Vec<Piece>,
}
