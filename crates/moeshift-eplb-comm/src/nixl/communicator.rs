//! [`NixlCommunicator`]: the `nixl` backend of [`EplbCommunicator`]. How it is built lives
//! in `setup`, how a layer moves in `transfer`.

use moeshift_device_comm::HostGroup;
use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;

use super::agent::NixlAgent;
use super::catalog::LayerPlace;
use super::landing::LandingArea;
use super::probe::NixlRuntime;
use crate::comm::{Backend, EplbCommunicator, StagedLayer};
use crate::error::EplbCommError;
use crate::weights::{LayerLayout, LayerWeights};

/// What a peer told about itself, kept for the life of the communicator.
#[derive(Debug)]
pub(super) struct Peer {
    /// Its agent's name (as NIXL knows it after loading its metadata).
    pub(super) agent: String,
    /// Its layers: where every tensor's rows are.
    pub(super) layers: Vec<LayerPlace>,
}

/// The `nixl` backend: receivers READ the rows they need straight from their peers' live
/// weights (one-sided, zero-copy on the sender), through NIXL's UCX backend.
///
/// # Building
///
/// Every member of the EPLB group builds it together ([`new`](Self::new),
/// [`with_group`](Self::with_group) or [`with_config`](Self::with_config)), from **all**
/// layers' weights. Once, at construction, each rank:
///
/// 1. loads NIXL ([`probe`](super::probe)) and checks the UCX environment;
/// 2. creates an agent `eplb-<global rank>-<random>` with the UCX backend, and registers
///    every tensor of every layer (its span of rows) and the landing area (see below);
/// 3. publishes through the rendezvous store its agent metadata and, for every (layer,
///    tensor), the layout (rows, name, dtype, row bytes, row shape) and where the rows are
///    (base address, row stride, device); a rank whose setup failed publishes its reason
///    instead, so the others fail at once naming it;
/// 4. checks that every peer has the same tensors ([`EplbCommError::LayoutMismatch`] names
///    the peer, the layer and the tensor), loads the peers' metadata and connects;
/// 5. warms up: READs a few bytes from every peer (connections and first-touch costs are
///    paid here, not by the first layer), then all ranks confirm their setup to each other.
///
/// # A layer
///
/// 1. Local checks (the plan fits this communicator, the weights are the registered ones),
///    then one `all_gather` of a digest of `(layer, plan)`
///    ([`agree_on_plan`](crate::agree_on_plan)): a rank with another plan, or whose checks
///    failed, stops every rank before a byte moves.
/// 2. This rank posts one READ request per peer it receives from: one descriptor per
///    (expert row, tensor), from the peer's **old** row (the row the peer's plan sends
///    from) into the landing area. No send buffer, no copy and no call on the sender.
/// 3. Local copies are staged from the old rows while the READs run.
/// 4. The requests are polled until they complete or the deadline (minus a small reserve)
///    passes; a failed or late request is released and reported naming the peer, the layer
///    and its experts.
/// 5. Post-read check: one `all_gather` of every rank's outcome. It is the barrier that
///    keeps any rank from committing (overwriting rows) while a peer may still READ them,
///    and it makes the outcome common: if any rank's READs failed, every rank returns an
///    error and nobody commits the layer. Layers where nothing crosses ranks skip it.
///
/// The weights are only read; [`StagedLayer::commit`] writes them later. Call `transfer`
/// for a layer only after the previous [`StagedLayer`] of that layer was committed (or
/// dropped) on this rank, as every rank's plan assumes.
///
/// # Memory
///
/// Registered once: every layer's expert tensors (peers READ from them) and the landing
/// area, sized `max over layers of (rows per rank × bytes per expert)` because a rank
/// receives at most one row per local slot. A layer's [`StagedLayer`] holds only the rows
/// that change (received rows and local copies); its
/// [`staging_bytes`](crate::TransferStats::staging_bytes) say how much. A `StagedLayer` owns its
/// staging, so received rows are copied once from the landing area into it when the READs
/// have landed, which frees the landing area for the next layer at once.
///
/// Weights must be in host memory for now; registration already distinguishes host
/// (`DRAM`) and device (`VRAM`) memory, so device weights need device staging and device
/// copies at commit, nothing in the protocol.
///
/// # Failures
///
/// A dead peer fails the READs from it quickly (UCX peer error handling) or, at the latest,
/// at the deadline; every surviving rank then returns an error naming it and the layer, and
/// the communicator refuses further transfers
/// ([`EplbCommError::poisons_communicator`]): build a new one. Errors found in step 1 leave
/// it usable. On every error the weights are untouched.
#[derive(Debug)]
pub struct NixlCommunicator {
    // Field order is drop order: the agent (and its registrations) goes before the landing
    // area it registered, and before the group peers use to learn about failures.
    pub(super) agent: NixlAgent,
    pub(super) landing: LandingArea,
    pub(super) group: Option<HostGroup>,
    pub(super) runtime: NixlRuntime,
    pub(super) me: usize,
    pub(super) layers: Vec<LayerPlace>,
    /// By EPLB-group rank; `None` for this rank.
    pub(super) peers: Vec<Option<Peer>>,
    pub(super) registered_bytes: u64,
    /// Why the communicator stopped, once it did.
    pub(super) failed: Option<String>,
}
impl NixlCommunicator {
    /// This rank in the EPLB group.
    pub fn rank(&self) -> usize {
        self.me
    }

    /// Ranks in the EPLB group.
    pub fn num_ranks(&self) -> usize {
        self.peers.len()
    }

    /// The layouts every rank agreed on, by layer.
    pub fn layouts(&self) -> Vec<LayerLayout> {
        self.layers.iter().map(|l| l.layout.clone()).collect()
    }

    /// The EPLB group, unless the communicator gave it up after a failure.
    pub fn group(&self) -> Option<&HostGroup> {
        self.group.as_ref()
    }

    /// This rank's NIXL agent name (`eplb-<global rank>-<random>`).
    pub fn agent_name(&self) -> &str {
        self.agent.name()
    }

    /// Where the NIXL runtime was loaded from.
    pub fn runtime(&self) -> &NixlRuntime {
        &self.runtime
    }

    /// Bytes of the landing area registered for READs (the bound over all layers; see the
    /// type's "Memory" section).
    pub fn landing_bytes(&self) -> usize {
        self.landing.len()
    }

    /// Bytes of weights registered for peers to READ (every tensor's span of rows).
    pub fn registered_weight_bytes(&self) -> u64 {
        self.registered_bytes
    }
}

impl EplbCommunicator for NixlCommunicator {
    fn backend(&self) -> Backend {
        Backend::Nixl
    }

    fn transfer(
        &mut self,
        layer: usize,
        plan: &LayerPlan,
        weights: &LayerWeights<'_>,
        deadline: Deadline,
    ) -> Result<StagedLayer, EplbCommError> {
        self.transfer_inner(layer, plan, weights, deadline)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_communicator_can_move_to_a_worker_thread() {
        fn is_send<T: Send>() {}
        is_send::<NixlCommunicator>();
    }
}
