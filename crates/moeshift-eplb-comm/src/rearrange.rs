//! Rearranging several layers in one call: [`LayerMove`], [`RearrangeError`], and the
//! pipelined loop every backend gets by default
//! ([`EplbCommunicator::rearrange`]).
//!
//! The default loop transfers layer `l + 1` while layer `l`'s commit runs on the GPU
//! ([`StagedLayer::commit_async`](crate::StagedLayer::commit_async)), so a model's
//! rearrangement costs about one transfer per layer, not a transfer plus a commit.

use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;

use crate::comm::{EplbCommunicator, TransferStats};
use crate::error::EplbCommError;
use crate::pending::PendingCommit;
use crate::weights::LayerWeights;

/// One layer of a rearrangement: which layer, its plan, and its weights on this rank.
#[derive(Debug)]
pub struct LayerMove<'a, 'w> {
    /// The layer (as the communicator was built with it).
    pub layer: usize,
    /// The layer's transfer plan, the same on every rank.
    pub plan: &'a LayerPlan,
    /// The layer's weights on this rank; written once the layer's rows all landed.
    pub weights: &'a mut LayerWeights<'w>,
}

/// Why a rearrangement stopped, and which layers it committed before stopping.
#[derive(Debug, thiserror::Error)]
#[error("rearrangement stopped at layer {layer} after committing layers {committed:?}: {source}")]
pub struct RearrangeError {
    /// The layer that failed; it and the layers after it keep their old weights.
    pub layer: usize,
    /// The layers committed (their copies finished) before the failure, in order.
    pub committed: Vec<usize>,
    /// What went wrong.
    #[source]
    pub source: Box<EplbCommError>,
}

impl RearrangeError {
    /// See [`EplbCommError::poisons_communicator`].
    pub fn poisons_communicator(&self) -> bool {
        self.source.poisons_communicator()
    }
}

/// The first layer that appears twice in `moves`, if any.
pub(crate) fn repeated_layer(moves: &[LayerMove<'_, '_>]) -> Option<usize> {
    let mut seen: Vec<usize> = moves.iter().map(|m| m.layer).collect();
    seen.sort_unstable();
    seen.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

/// The error for a layer given twice.
pub(crate) fn repeated(rank: usize, layer: usize) -> EplbCommError {
    EplbCommError::PlanMismatch {
        rank,
        layer,
        detail: "the layer appears twice in one rearrangement".into(),
    }
}

/// Commits that finished, and the layers they were for.
#[derive(Debug, Default)]
pub(crate) struct Committed {
    pub(crate) layers: Vec<usize>,
    pub(crate) stats: Vec<TransferStats>,
}

impl Committed {
    /// Waits for `pending` and records it; on error, the error for its layer.
    pub(crate) fn wait(
        &mut self,
        pending: PendingCommit<'_>,
        deadline: Deadline,
    ) -> Result<(), (usize, EplbCommError)> {
        let layer = pending.layer();
        let stats = pending.wait(deadline).map_err(|e| (layer, e))?;
        self.layers.push(layer);
        self.stats.push(stats);
        Ok(())
    }

    /// The error of a rearrangement that stopped at `layer`.
    pub(crate) fn stopped(self, layer: usize, source: EplbCommError) -> RearrangeError {
        RearrangeError {
            layer,
            committed: self.layers,
            source: Box::new(source),
        }
    }
}

/// The default [`EplbCommunicator::rearrange`]: layer after layer, each layer's commit
/// queued before the next layer's transfer and waited for after it.
pub(crate) fn in_turn<C: EplbCommunicator + ?Sized>(
    comm: &mut C,
    moves: &mut [LayerMove<'_, '_>],
    deadline: Deadline,
) -> Result<Vec<TransferStats>, RearrangeError> {
    let mut done = Committed::default();
    if let Some(layer) = repeated_layer(moves) {
        // Before anything moved; every rank given the same layers refuses the same way.
        return Err(done.stopped(layer, repeated(comm.rank(), layer)));
    }
    let mut pending: Option<PendingCommit<'_>> = None;
    for m in moves.iter_mut() {
        let staged = comm.transfer(m.layer, m.plan, m.weights, deadline);
        // The previous layer's copies ran meanwhile: collect them first, whatever happened.
        if let Some(p) = pending.take() {
            if let Err((layer, e)) = done.wait(p, deadline) {
                return Err(done.stopped(layer, e));
            }
        }
        let staged = staged.map_err(|e| (m.layer, e));
        match staged.and_then(|s| s.commit_async(m.weights).map_err(|e| (m.layer, e))) {
            Ok(p) => pending = Some(p),
            Err((layer, e)) => return Err(done.stopped(layer, e)),
        }
    }
    if let Some(p) = pending.take() {
        if let Err((layer, e)) = done.wait(p, deadline) {
            return Err(done.stopped(layer, e));
        }
    }
    Ok(done.stats)
}
