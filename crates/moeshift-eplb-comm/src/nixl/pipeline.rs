//! How a [`NixlCommunicator`] rearranges several layers in one call, pipelined.
//!
//! Per layer, a transfer pays for its own host rounds: the plan agreement before the READs
//! and the post-read check after them, and its commit copies every moved byte once more
//! after that. Across layers none of this has to wait:
//!
//! 1. every layer is checked locally and **one** agreement covers all their plans
//!    ([`plans_digest`]);
//! 2. layer `l`'s post-read check is an `all_gather` run by a helper thread on the EPLB
//!    group while this thread posts layer `l + 1`'s READs;
//! 3. once every rank's verdict on layer `l` is in (good), layer `l`'s commit is queued on
//!    the GPU ([`StagedLayer::commit_async`]) while layer `l + 1`'s READs run.
//!
//! The per-layer rules stay as they are: a layer's weights change only after every rank
//! READ all its rows of that layer (the verdict), and a landing slot is reused only after the
//! commit that read it finished, so two slots keep the pipeline full (with one, each layer
//! waits for the previous commit). Only layers in this call run concurrently, and each
//! layer appears once, so no rank READs rows that a commit is writing.
//!
//! Stopping: every rank sends its status of every layer whose READs it started, until a
//! verdict fails; a verdict is the same on every rank, so all stop after the same layer,
//! commit the same layers, and leave the status thread in step. A rank that fails on its
//! own first honours the previous layer's verdict (committing it if it passed), then
//! reports its failure in the current layer's status.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use moeshift_sync::Deadline;

use super::communicator::NixlCommunicator;
use super::error::NixlError;
use super::phases::NixlPhases;
use super::status::exchange_status;
use super::transfer::{layer_stats, read_deadline, Planned};
use crate::agree::{agree_on_plan, plans_digest};
use crate::comm::{Backend, StagedLayer, TransferStats};
use crate::error::EplbCommError;
use crate::pending::PendingCommit;
use crate::rearrange::{repeated, repeated_layer, Committed, LayerMove, RearrangeError};
use crate::staging::LentMemory;
use crate::weights::LayerWeights;

/// How long past the deadline this thread waits for a verdict the status thread owes it
/// (the status thread's own exchange is bounded by the deadline).
const VERDICT_MARGIN: Duration = Duration::from_secs(5);

/// A verdict from the status thread: the layer, and the peers whose part failed (or why
/// the exchange itself failed).
type Verdict = (usize, Result<Vec<(usize, String)>, EplbCommError>);

/// Why the pipeline stopped.
struct Stop {
    /// The layer reported as failing.
    layer: usize,
    error: EplbCommError,
    /// READs may have been released in flight: the landing area must not be reused.
    after_reads: bool,
    /// Every rank knows the pipeline stops here (a common verdict, or this rank's failure
    /// reported in a post-read check): no more status is owed.
    told: bool,
}

impl Stop {
    fn local(layer: usize, error: EplbCommError, after_reads: bool) -> Self {
        Self {
            layer,
            error,
            after_reads,
            told: false,
        }
    }
}

/// A layer whose rows all landed here, waiting for every rank's verdict before its commit.
struct Awaiting<'x, 'w> {
    staged: StagedLayer,
    weights: &'x mut LayerWeights<'w>,
}

/// The state of one pipelined rearrangement on this rank.
struct Pipe<'c, 'x, 'w> {
    comm: &'c NixlCommunicator,
    to_status: Sender<(usize, Option<String>)>,
    verdicts: Receiver<Verdict>,
    awaiting: Option<Awaiting<'x, 'w>>,
    /// Commits queued on the GPU, oldest first.
    pending: VecDeque<PendingCommit<'x>>,
    done: Committed,
    /// A commit that failed after this rank's status of a later layer went out as good:
    /// reported in the next status.
    deferred: Option<Stop>,
    deadline: Deadline,
}

impl NixlCommunicator {
    /// [`EplbCommunicator::rearrange`](crate::EplbCommunicator::rearrange) for `nixl`; see
    /// the module documentation.
    pub(super) fn rearrange_inner(
        &mut self,
        moves: &mut [LayerMove<'_, '_>],
        deadline: Deadline,
    ) -> Result<Vec<TransferStats>, RearrangeError> {
        let me = self.me;
        let Some(first) = moves.first().map(|m| m.layer) else {
            return Ok(Vec::new());
        };
        let stopped = |layer: usize, e: EplbCommError| RearrangeError {
            layer,
            committed: Vec::new(),
            source: Box::new(e),
        };
        let group = match (&self.group, &self.failed) {
            (Some(g), None) => g,
            (_, reason) => {
                return Err(stopped(
                    first,
                    EplbCommError::CommunicatorFailed {
                        rank: me,
                        reason: reason
                            .clone()
                            .unwrap_or_else(|| "the EPLB group is gone".into()),
                    },
                ))
            }
        };

        // 1. Every layer checked here, then one agreement on all plans.
        let mut refusal: Option<(usize, EplbCommError)> = None;
        if let Some(layer) = repeated_layer(moves) {
            refusal = Some((layer, repeated(me, layer)));
        } else if self.landing.holders().len() >= self.landing.num_slots() {
            refusal = Some((
                first,
                EplbCommError::StagingInUse {
                    rank: me,
                    layer: first,
                    held_by: self.landing.holders(),
                    slots: self.landing.num_slots(),
                },
            ));
        }
        let mut planned = Vec::with_capacity(moves.len());
        if refusal.is_none() {
            for m in moves.iter() {
                match self.plan_reads(m.layer, m.plan, m.weights) {
                    Ok(p) => planned.push(p),
                    Err(e) => {
                        refusal = Some((m.layer, e));
                        break;
                    }
                }
            }
        }
        let digest = plans_digest(moves.iter().map(|m| (m.layer, m.plan)));
        let reason = refusal.as_ref().map(|(_, e)| e.to_string());
        if let Err(e) = agree_on_plan(group, first, digest, reason.as_deref(), deadline) {
            let poisons = e.poisons_communicator();
            if poisons && self.failed.is_none() {
                self.failed = Some(e.to_string());
            }
            return Err(stopped(first, e));
        }
        if let Some((layer, e)) = refusal {
            return Err(stopped(layer, e));
        }

        // 2. The pipeline, with the post-read checks on a thread of their own.
        let reads_until = read_deadline(deadline);
        let this: &NixlCommunicator = self;
        let outcome = std::thread::scope(|scope| {
            let (to_status, statuses) = mpsc::channel::<(usize, Option<String>)>();
            let (to_main, verdicts) = mpsc::channel::<Verdict>();
            scope.spawn(move || {
                for (layer, outcome) in statuses {
                    let verdict = exchange_status(
                        group,
                        Some(layer),
                        "the post-read check",
                        outcome.as_deref(),
                        deadline,
                    );
                    let broken = verdict.is_err();
                    if to_main.send((layer, verdict)).is_err() || broken {
                        break;
                    }
                }
            });
            let mut pipe = Pipe {
                comm: this,
                to_status,
                verdicts,
                awaiting: None,
                pending: VecDeque::new(),
                done: Committed::default(),
                deferred: None,
                deadline,
            };
            let layers = moves
                .iter_mut()
                .zip(planned)
                .map(|(m, p)| (m.layer, p, &mut *m.weights));
            let run = pipe.run(layers, reads_until);
            // Commits already queued passed their verdict on every rank: let them finish.
            let stop = run.err().inspect(|_| {
                while let Some(p) = pipe.pending.pop_front() {
                    let _ = pipe.done.wait(p, deadline);
                }
            });
            let Pipe { done, .. } = pipe;
            (done, stop)
        });
        match outcome {
            (done, None) => Ok(done.stats),
            (done, Some(stop)) => {
                if (stop.after_reads || stop.error.poisons_communicator()) && self.failed.is_none()
                {
                    self.failed = Some(stop.error.to_string());
                }
                Err(done.stopped(stop.layer, stop.error))
            }
        }
    }
}

impl<'c, 'x, 'w> Pipe<'c, 'x, 'w> {
    /// Every layer in turn, then the last verdict and every commit.
    fn run<'p>(
        &mut self,
        layers: impl Iterator<Item = (usize, Planned<'p>, &'x mut LayerWeights<'w>)>,
        reads_until: Deadline,
    ) -> Result<(), Stop> {
        for (layer, planned, weights) in layers {
            self.layer(layer, planned, weights, reads_until)?;
        }
        self.settle_awaiting()?;
        if let Some(stop) = self.deferred.take() {
            return Err(stop);
        }
        while let Some(p) = self.pending.pop_front() {
            self.done
                .wait(p, self.deadline)
                .map_err(|(layer, e)| Stop::local(layer, e, false))?;
        }
        Ok(())
    }

    /// One layer: a landing slot, its READs, the previous layer's verdict and commit while
    /// they run, then this layer's status.
    fn layer(
        &mut self,
        layer: usize,
        planned: Planned<'_>,
        weights: &'x mut LayerWeights<'w>,
        reads_until: Deadline,
    ) -> Result<(), Stop> {
        let comm = self.comm;
        let started_at = Instant::now();
        let (addr, lent) = match self.free_slot(layer) {
            Ok(slot) => slot,
            Err(stop) => return Err(self.tell(layer, stop)),
        };
        let mut prepared = match comm.land(layer, planned, addr, lent) {
            Ok(p) => p,
            Err(e) => return Err(self.tell(layer, Stop::local(layer, e, false))),
        };
        let mut phases = NixlPhases::default();
        let started = match comm.start_rows(layer, &mut prepared, weights, &mut phases) {
            Ok(s) => s,
            Err(e) => return Err(self.tell(layer, Stop::local(layer, e, true))),
        };
        let previous = self.settle_awaiting();
        let moved = comm
            .finish_rows(layer, started, reads_until, &mut phases)
            .map_err(|e| Stop::local(layer, e, true));
        match (previous, moved) {
            (Err(mut stop), moved) => {
                stop.after_reads |= moved.is_err();
                return Err(self.tell(layer, stop));
            }
            (Ok(()), Err(stop)) => return Err(self.tell(layer, stop)),
            (Ok(()), Ok(())) => {}
        }
        if let Some(stop) = self.deferred.take() {
            return Err(self.tell(layer, stop));
        }
        self.send_status(layer, None)?;
        let stats = layer_stats(
            prepared.mine,
            &prepared.layout,
            prepared.staging.len(),
            started_at.elapsed().as_secs_f64(),
        );
        self.awaiting = Some(Awaiting {
            staged: StagedLayer::new(
                layer,
                comm.me,
                Backend::Nixl,
                prepared.mine.clone(),
                prepared.layout,
                prepared.staging,
                stats,
            ),
            weights,
        });
        self.reap();
        Ok(())
    }

    /// A free landing slot for `layer`: finished commits give theirs back; if none is free,
    /// the oldest commit is waited for, or the awaiting layer is settled first.
    fn free_slot(&mut self, layer: usize) -> Result<(u64, LentMemory), Stop> {
        loop {
            match self.comm.landing.lend(self.comm.me, layer) {
                Ok(slot) => return Ok(slot),
                Err(busy) => {
                    if let Some(p) = self.pending.pop_front() {
                        self.done
                            .wait(p, self.deadline)
                            .map_err(|(layer, e)| Stop::local(layer, e, false))?;
                    } else if self.awaiting.is_some() {
                        self.settle_awaiting()?;
                    } else {
                        return Err(Stop::local(layer, busy, false));
                    }
                }
            }
        }
    }

    /// The awaiting layer's verdict; if every rank READ its rows, its commit is queued.
    fn settle_awaiting(&mut self) -> Result<(), Stop> {
        let Some(Awaiting { staged, weights }) = self.awaiting.take() else {
            return Ok(());
        };
        let layer = staged.layer();
        // On a failed verdict the staged rows are dropped: they all landed, nobody reads
        // them, and the slot goes back.
        self.verdict(layer)?;
        let commit = staged
            .commit_async(weights)
            .map_err(|e| Stop::local(layer, e, false))?;
        self.pending.push_back(commit);
        Ok(())
    }

    /// Waits for the status thread's verdict on `layer`: fine, or a stop every rank shares.
    fn verdict(&self, layer: usize) -> Result<(), Stop> {
        let me = self.comm.me;
        let told = |error: EplbCommError| Stop {
            layer,
            error,
            after_reads: false,
            told: true,
        };
        let wait = self.deadline.remaining().saturating_add(VERDICT_MARGIN);
        match self.verdicts.recv_timeout(wait) {
            Ok((_, Ok(failed))) => match failed.into_iter().next() {
                None => Ok(()),
                Some((peer, reason)) => Err(told(
                    NixlError::PeerReadFailed {
                        rank: me,
                        layer,
                        peer,
                        reason,
                    }
                    .into(),
                )),
            },
            Ok((_, Err(e))) => Err(told(e)),
            Err(_) => Err(told(EplbCommError::CommunicatorFailed {
                rank: me,
                reason: format!("the post-read check of layer {layer} did not finish"),
            })),
        }
    }

    /// Hands this rank's status of `layer` to the status thread.
    fn send_status(&self, layer: usize, failure: Option<String>) -> Result<(), Stop> {
        self.to_status.send((layer, failure)).map_err(|_| Stop {
            layer,
            error: EplbCommError::CommunicatorFailed {
                rank: self.comm.me,
                reason: format!("the post-read check of layer {layer} stopped"),
            },
            after_reads: false,
            told: true,
        })
    }

    /// Makes a local stop at `layer` known to every rank: first the previous layer's verdict
    /// (committing it if it passed, as every rank does), then this rank's failure as its
    /// status of `layer`. Returns the stop to report.
    fn tell(&mut self, layer: usize, stop: Stop) -> Stop {
        if stop.told {
            return stop;
        }
        let mut stop = stop;
        if let Err(previous) = self.settle_awaiting() {
            if previous.told {
                // The group stops at the previous layer; nobody waits for this one.
                return Stop {
                    after_reads: previous.after_reads || stop.after_reads,
                    ..previous
                };
            }
            // The previous layer's commit failed here (an earlier error is reported).
            stop = Stop {
                after_reads: previous.after_reads || stop.after_reads,
                ..previous
            };
        }
        if self
            .send_status(layer, Some(stop.error.to_string()))
            .is_ok()
        {
            // Consumed so the status thread ends in step; it can only say "failed".
            let _ = self.verdict(layer);
        }
        stop.told = true;
        stop
    }

    /// Collects the commits that finished, without waiting.
    fn reap(&mut self) {
        while let Some(front) = self.pending.front() {
            match front.is_complete() {
                Ok(false) => break,
                Ok(true) | Err(_) => {
                    let Some(p) = self.pending.pop_front() else {
                        break;
                    };
                    if let Err((layer, e)) = self.done.wait(p, self.deadline) {
                        self.deferred.get_or_insert(Stop::local(layer, e, false));
                    }
                }
            }
        }
    }
}
