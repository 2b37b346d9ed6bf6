//! [`NixlCommunicator`]: the `nixl` backend of [`EplbCommunicator`]. How it is built lives
//! in `setup`, how a layer moves in `transfer`.

use moeshift_device_comm::HostGroup;
use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;
use moeshift_tensor::Device;

use super::agent::NixlAgent;
use super::catalog::LayerPlace;
use super::landing::LandingArea;
use super::phases::NixlPhases;
use super::probe::NixlRuntime;
use crate::comm::{Backend, EplbCommunicator, StagedLayer, TransferStats};
use crate::error::EplbCommError;
use crate::rearrange::{LayerMove, RearrangeError};
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
/// weights (one-sided, zero-copy on the sender), through NIXL's UCX backend. Weights may
/// live in host memory (`DRAM`) or, with feature `cuda`, in GPU memory (`VRAM`).
///
/// # Building
///
/// Every member of the EPLB group builds it together ([`new`](Self::new),
/// [`with_group`](Self::with_group) or [`with_config`](Self::with_config)), from **all**
/// layers' weights, which must all live on one device (the host, or one GPU). Once, at
/// construction, each rank:
///
/// 1. loads NIXL ([`probe`](super::probe)) and checks the UCX environment; for CUDA
///    weights, opens the GPU and checks that peers on the node can READ every tensor through
///    CUDA IPC (memory from `cuMemAlloc`/`cudaMalloc`; see `IpcCudaBuffer`, feature `cuda`);
/// 2. creates an agent `eplb-<global rank>-<random>` with the UCX backend, and registers
///    every tensor of every layer (its span of rows, as `DRAM` or as `VRAM` of its GPU) and
///    the landing area (see below);
/// 3. publishes through the rendezvous store its agent metadata and, for every (layer,
///    tensor), the layout (rows, name, dtype, row bytes, row shape) and where the rows are
///    (base address, row stride, device); a rank whose setup failed publishes its reason
///    instead, so the others fail at once naming it;
/// 4. checks that every peer has the same tensors ([`EplbCommError::LayoutMismatch`] names
///    the peer, the layer and the tensor), loads the peers' metadata and connects;
/// 5. warms up: READs a few bytes of every registered tensor of every peer, on every UCX
///    worker (connections, CUDA IPC mappings, the workers' streams and first-touch costs
///    are paid here, not by the first layer), then all ranks confirm their setup to each
///    other.
///
/// # A layer
///
/// 1. Local checks (the plan fits this communicator, the weights are the registered ones, a
///    landing slot is free), then one `all_gather` of a digest of `(layer, plan)`
///    ([`agree_on_plan`](crate::agree_on_plan)): a rank with another plan, or whose checks
///    failed, stops every rank before a byte moves.
/// 2. Local copies are staged from the old rows: host weights by the CPU, before any READ;
///    CUDA weights by device-to-device copies on a stream of the communicator's, while the
///    READs run.
/// 3. This rank READs from every peer it receives from: one descriptor per (expert row,
///    tensor), from the peer's **old** row (the row the peer's plan sends from) straight
///    into its place in the layer's staging. A peer's descriptors are split by bytes into
///    [`NixlConfig::read_streams`](super::NixlConfig::read_streams) requests (large rows
///    may be cut into pieces), request `i` posted on UCX worker `i`: UCX queues the copies
///    of one worker from one peer GPU on one CUDA stream, so the requests run on as many
///    streams. No send buffer, no copy and no call on the sender; between GPUs of one
///    node, UCX's `cuda_ipc` moves the rows GPU to GPU.
/// 4. Every request is polled until all completed or the deadline (minus a small reserve)
///    passes; a failed or late request is reported naming the peer, the layer and its
///    experts ([`EplbCommError::peer`] returns the peer), and every request still in flight
///    is released.
/// 5. Post-read check: one `all_gather` of every rank's outcome. It is the barrier that
///    keeps any rank from committing (overwriting rows) while a peer may still READ them,
///    and it makes the outcome common: if any rank's READs failed, every rank returns an
///    error and nobody commits the layer. Layers where nothing crosses ranks skip it.
///
/// [`last_phases`](Self::last_phases) tells how long each step took.
///
/// # Several layers
///
/// [`rearrange`](EplbCommunicator::rearrange) moves several layers in one call, pipelined:
/// one agreement covers every layer's plan, a layer's post-read check runs on a helper
/// thread while the next layer's READs run, and each layer's commit is queued on the GPU as
/// soon as every rank READ that layer, overlapping the next layer's READs. Every layer still
/// changes all at once and only after every rank READ its rows of it. With two landing
/// slots ([`NixlConfig::landing_slots`](super::NixlConfig::landing_slots)) the pipeline stays
/// full; with one, each layer waits for the previous layer's commit.
///
/// The weights are only read; [`StagedLayer::commit`] writes them later (host weights by the
/// CPU, CUDA weights by device-to-device copies from the staging on the GPU). Call
/// `transfer` for a layer only after the previous [`StagedLayer`] of that layer was
/// committed (or dropped) on this rank, as every rank's plan assumes.
///
/// # Memory
///
/// Registered once: every layer's expert tensors (peers READ from them) and the landing
/// area: [`NixlConfig::landing_slots`](super::NixlConfig::landing_slots) slots (one by
/// default) of `max over layers of (rows per rank × bytes per expert)` each, in host memory
/// for host weights and in device memory on the weights' GPU for CUDA weights. A rank
/// stages at most one row per local slot (received or copied; duplicates are filled at
/// commit), so one landing slot holds any layer's staging.
///
/// **The landing slot is the staging**: a transfer borrows a free slot, READs every
/// received row straight into its final place there and copies the local rows next to
/// them; the [`StagedLayer`] holds the slot until it is committed or dropped, and the
/// commit copies from it into the weights. No layer allocates memory and no received byte
/// is copied twice. A transfer that finds every slot held by uncommitted staged layers is
/// refused on every rank before any byte moves ([`EplbCommError::StagingInUse`] here,
/// [`EplbCommError::PeerRefused`] on the peers; the communicator stays usable): a slot is
/// never overwritten under a staged layer. Use two slots to transfer layer `l + 1` while
/// layer `l` waits for its commit. [`staging_bytes`](crate::TransferStats::staging_bytes)
/// reports the rows a layer actually staged (received rows and local copies).
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
    /// The GPU of CUDA weights (`None` for host weights).
    #[cfg(feature = "cuda")]
    pub(super) cuda: Option<super::cuda::NixlCuda>,
    pub(super) group: Option<HostGroup>,
    pub(super) runtime: NixlRuntime,
    pub(super) me: usize,
    pub(super) layers: Vec<LayerPlace>,
    /// By EPLB-group rank; `None` for this rank.
    pub(super) peers: Vec<Option<Peer>>,
    pub(super) registered_bytes: u64,
    /// READ requests per peer and layer, each on its own UCX worker.
    pub(super) read_streams: usize,
    /// The phases of the last successful transfer.
    pub(super) last_phases: Option<NixlPhases>,
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

    /// Bytes of one slot of the landing area registered for READs (the bound over all
    /// layers; see the type's "Memory" section).
    pub fn landing_bytes(&self) -> usize {
        self.landing.len()
    }

    /// Slots of the landing area: how many staged layers may hold rows at once.
    pub fn landing_slots(&self) -> usize {
        self.landing.num_slots()
    }

    /// The layers whose [`StagedLayer`]s hold a landing slot now (neither committed nor
    /// dropped yet).
    pub fn staged_layers_held(&self) -> Vec<usize> {
        self.landing.holders()
    }

    /// Where the weights, the landing area and the staging live: the host, or the weights'
    /// GPU.
    pub fn device(&self) -> Device {
        self.landing.device()
    }

    /// Bytes of weights registered for peers to READ (every tensor's span of rows).
    pub fn registered_weight_bytes(&self) -> u64 {
        self.registered_bytes
    }

    /// How many READ requests (each on its own UCX worker) a peer's rows of a layer are
    /// split into ([`NixlConfig::read_streams`](super::NixlConfig::read_streams)).
    pub fn read_streams(&self) -> usize {
        self.read_streams
    }

    /// Where the time of the last successful [`transfer`](EplbCommunicator::transfer) went,
    /// phase by phase; `None` before the first one.
    pub fn last_phases(&self) -> Option<&NixlPhases> {
        self.last_phases.as_ref()
    }
}

impl EplbCommunicator for NixlCommunicator {
    fn backend(&self) -> Backend {
        Backend::Nixl
    }

    fn rank(&self) -> usize {
        NixlCommunicator::rank(self)
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

    /// Pipelined: one agreement on every plan, each layer's post-read check exchanged while
    /// the next layer's READs run, and each commit queued on the GPU as soon as every rank
    /// READ that layer (see the type's "Several layers" section).
    fn rearrange(
        &mut self,
        moves: &mut [LayerMove<'_, '_>],
        deadline: Deadline,
    ) -> Result<Vec<TransferStats>, RearrangeError> {
        self.rearrange_inner(moves, deadline)
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
