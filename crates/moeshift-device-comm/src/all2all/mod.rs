//! MoE all-to-all: send each token to the ranks that host its chosen experts (dispatch),
//! and bring the expert outputs back to the token's rank, summed with the router weights
//! (combine).
//!
//! Every manager implements [`MoeAll2All`]. Its associated types say what memory it works
//! on, so a GPU manager can implement the same trait over device buffers; the host
//! managers here work on `f32` rows in host memory over a [`HostGroup`], which must be the
//! **EP group** (DP·PCP·TP ranks, see [`layout`](crate::layout)):
//!
//! - [`AgRsManager`]: gather every token to every rank, reduce-scatter the outputs back
//!   (vLLM's default `allgather_reducescatter`);
//! - [`AllToAllVManager`]: each token goes only to the ranks hosting its chosen replicas,
//!   and only its outputs come back;
//! - [`HostAll2All`] picks one of the two at run time.
//!
//! The expert computation is the caller's: dispatch returns a [`HostDispatched`] with the
//! token rows this rank received and one [`ExpertWork`] item per `(token, k)` pick routed
//! to one of its slots; the caller computes each item's expert output (without the router
//! weight) and hands them to combine, which returns one row per token this rank dispatched:
//! `Σ_k weight_k · expert_k(row)`.
//!
//! Routing reads an [`ExpertPlacement`] (logical → physical replicas, physical slot `g` on
//! EP rank `g / slots_per_rank`) and picks one replica per pick with [`replica_index`], a
//! hash of `(token, k)` (see [`replica`] for why not vLLM's). Dispatch can also count picks
//! per global physical slot into a caller's array (the EPLB load hook): each rank counts
//! its own tokens' picks, as it routes them, with no extra communication; summed over the
//! EP ranks the counts are exactly the picks per slot.
//!
//! Failures are shared: the ranks exchange a header (status, shape, layer, placement
//! fingerprint, and in combine the row counts of both directions of every pair) with the
//! data, so a rank with invalid input, another hidden size, another placement or another
//! dispatch to combine makes every rank return an error for that call instead of
//! misrouting or waiting for its deadline.
//!
//! With feature `cuda`, the same trait runs on the GPU over the EP group's NCCL
//! communicator: `CudaAgRsManager` and `CudaAllToAllVManager` (rows move through NCCL,
//! reductions run in this crate's kernels), and `CudaOneSidedManager`, which writes rows
//! straight into the peers' CUDA IPC workspace regions on one node, sized by [`Workspace`]
//! (dim 0 = EP size) and grown together on every rank. `CudaAll2All` picks one at run time.
//! Their results equal the host managers' on the same inputs (bit for bit in f32). On the
//! GPU, a rank whose own resources fail before the header exchange (routing buffers, a
//! kernel launch, packing its rows) sends a rejection too; one that runs out of device
//! memory or hits a CUDA error after it (sizing its receive buffers, say) can no longer
//! tell its peers: they stop at their deadline, which aborts the NCCL communicator, so
//! the group must be built again.
//!
//! # Example
//!
//! One rank (an EP group of one), identity experts:
//!
//! ```
//! use moeshift_device_comm::all2all::{AllToAllVManager, ExpertPlacement, HostTokens, MoeAll2All};
//! use moeshift_device_comm::{HostGroup, StoreClient, World};
//! use moeshift_sync::Deadline;
//! use std::time::Duration;
//!
//! let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
//! let world = World::single_node(0, 1, "127.0.0.1", port)?;
//! let deadline = Deadline::after(Duration::from_secs(10));
//! let store = StoreClient::connect(&world, deadline)?;
//! let ep = HostGroup::world(&store, deadline)?;
//! let manager = AllToAllVManager::new(&ep);
//!
//! // 3 logical experts in 4 slots (expert 0 twice), top-2 routing of 2 tokens.
//! let placement = ExpertPlacement::from_phy2log(0, &[0, 1, 2, 0], 3, 1)?;
//! let hidden = [1.0, 2.0, 3.0, 4.0];
//! let tokens = HostTokens::new(&hidden, 2, &[0, 2, 1, 0], &[0.5, 0.25, 1.0, 1.0], 2);
//! let mut load = vec![0i64; 4];
//!
//! let dispatched = manager.dispatch(tokens, &placement, Some(&mut load), deadline)?;
//! assert_eq!(dispatched.items().len(), 4);
//! let outputs = dispatched.expert_outputs_with(|_work, row, out| out.copy_from_slice(row));
//! let combined = manager.combine(&dispatched, &outputs, deadline)?;
//!
//! // Each token comes back times the sum of its weights.
//! assert_eq!(combined, [0.75, 1.5, 6.0, 8.0]);
//! assert_eq!(load[0] + load[3], 2); // expert 0's two picks, over its two replicas
//! assert_eq!((load[1], load[2]), (1, 1));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod agrs;
mod all_to_all_v;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_a2av;
#[cfg(feature = "cuda")]
mod cuda_agrs;
#[cfg(feature = "cuda")]
mod cuda_choice;
#[cfg(feature = "cuda")]
mod cuda_dispatched;
#[cfg(feature = "cuda")]
mod cuda_error;
#[cfg(feature = "cuda")]
mod cuda_one_sided;
#[cfg(feature = "cuda")]
mod cuda_steps;
#[cfg(feature = "cuda")]
mod cuda_tables;
#[cfg(feature = "cuda")]
mod cuda_wire;
mod dispatched;
mod error;
mod exchange;
#[cfg(all(test, feature = "cuda"))]
mod host_tables;
#[cfg(feature = "cuda")]
mod ipc;
#[cfg(feature = "cuda")]
mod kernels;
mod placement;
pub mod replica;
#[cfg(feature = "cuda")]
mod table_kernels;
mod tokens;
mod wire;
mod workspace;

use std::borrow::Borrow;

use moeshift_sync::Deadline;

pub use agrs::AgRsManager;
pub use all_to_all_v::AllToAllVManager;
#[cfg(feature = "cuda")]
pub use cuda::CudaTokens;
#[cfg(feature = "cuda")]
pub use cuda_a2av::CudaAllToAllVManager;
#[cfg(feature = "cuda")]
pub use cuda_agrs::CudaAgRsManager;
#[cfg(feature = "cuda")]
pub use cuda_choice::{CudaAll2All, CudaAll2AllKind};
#[cfg(feature = "cuda")]
pub use cuda_dispatched::CudaDispatched;
#[cfg(feature = "cuda")]
pub use cuda_error::CudaAll2AllError;
#[cfg(feature = "cuda")]
pub use cuda_one_sided::CudaOneSidedManager;
pub use dispatched::{ExpertWork, HostDispatched};
pub use error::All2AllError;
pub use placement::ExpertPlacement;
pub use replica::{replica_index, token_key, MAX_TOP_K};
pub use tokens::HostTokens;
pub use workspace::{
    EpGroupShape, ResizePlan, Workspace, WorkspaceCapacity, WorkspaceConfig, WorkspaceError,
};

use crate::host::HostGroup;
use exchange::Ctx;

/// A MoE all-to-all manager: dispatch tokens to the ranks hosting their experts, combine
/// the expert outputs back. Every rank of the EP group calls the same operations in the
/// same order.
///
/// The associated types name the memory the manager works on; for the host managers they
/// are [`HostTokens`], `&mut [i64]`, `&[f32]`, [`HostDispatched`] and `Vec<f32>`. A GPU
/// manager implements the same contract over device buffers (bf16 rows, device load
/// counters).
pub trait MoeAll2All {
    /// One rank's routed tokens: rows plus top-k logical expert ids and router weights.
    type Tokens<'a>;
    /// The load hook's counter array: one counter per **global** physical slot.
    type LoadCounts<'a>;
    /// The expert outputs handed to combine, one row per work item, in the dispatched
    /// items' order, without the router weight.
    type ExpertOutputs<'a>;
    /// What dispatch hands this rank: the rows and work items its experts must process,
    /// and the routing combine needs.
    type Dispatched;
    /// What combine returns: one row per token this rank dispatched.
    type Combined;
    /// The error type.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The manager's name (used in errors and logs).
    fn name(&self) -> &'static str;

    /// This rank in the EP group.
    fn ep_rank(&self) -> usize;

    /// Number of ranks in the EP group.
    fn ep_size(&self) -> usize;

    /// Routes `tokens` with `placement` and delivers every pick to the rank hosting its
    /// replica. With `load`, adds 1 per pick of this rank's tokens to the counter of its
    /// physical slot (only when the call succeeds).
    fn dispatch(
        &self,
        tokens: Self::Tokens<'_>,
        placement: &ExpertPlacement,
        load: Option<Self::LoadCounts<'_>>,
        deadline: Deadline,
    ) -> Result<Self::Dispatched, Self::Error>;

    /// Sends the expert outputs of `dispatched`'s work items back and returns, for every
    /// token this rank dispatched, `Σ_k weight_k · output_k`.
    fn combine(
        &self,
        dispatched: &Self::Dispatched,
        expert_outputs: Self::ExpertOutputs<'_>,
        deadline: Deadline,
    ) -> Result<Self::Combined, Self::Error>;
}

/// Which host manager [`HostAll2All`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostAll2AllKind {
    /// [`AgRsManager`].
    AgRs,
    /// [`AllToAllVManager`].
    AllToAllV,
}

impl HostAll2AllKind {
    /// Both kinds.
    pub const ALL: [HostAll2AllKind; 2] = [HostAll2AllKind::AgRs, HostAll2AllKind::AllToAllV];

    /// The manager's name: `allgather_reducescatter` or `all_to_all_v`.
    pub fn name(self) -> &'static str {
        match self {
            HostAll2AllKind::AgRs => "allgather_reducescatter",
            HostAll2AllKind::AllToAllV => "all_to_all_v",
        }
    }

    /// The kind named `name` (as [`name`](Self::name) spells it, or `agrs`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "allgather_reducescatter" | "agrs" => Some(HostAll2AllKind::AgRs),
            "all_to_all_v" => Some(HostAll2AllKind::AllToAllV),
            _ => None,
        }
    }
}

/// A host manager chosen at run time.
#[derive(Debug)]
pub enum HostAll2All<G = HostGroup> {
    /// Gather / reduce-scatter.
    AgRs(AgRsManager<G>),
    /// All-to-all-v.
    AllToAllV(AllToAllVManager<G>),
}

impl<G: Borrow<HostGroup>> HostAll2All<G> {
    /// A manager of `kind` over the EP group `group`.
    pub fn new(kind: HostAll2AllKind, group: G) -> Self {
        match kind {
            HostAll2AllKind::AgRs => HostAll2All::AgRs(AgRsManager::new(group)),
            HostAll2AllKind::AllToAllV => HostAll2All::AllToAllV(AllToAllVManager::new(group)),
        }
    }

    /// Which manager this is.
    pub fn kind(&self) -> HostAll2AllKind {
        match self {
            HostAll2All::AgRs(_) => HostAll2AllKind::AgRs,
            HostAll2All::AllToAllV(_) => HostAll2AllKind::AllToAllV,
        }
    }
}

impl<G: Borrow<HostGroup>> MoeAll2All for HostAll2All<G> {
    type Tokens<'a> = HostTokens<'a>;
    type LoadCounts<'a> = &'a mut [i64];
    type ExpertOutputs<'a> = &'a [f32];
    type Dispatched = HostDispatched;
    type Combined = Vec<f32>;
    type Error = All2AllError;

    fn name(&self) -> &'static str {
        self.kind().name()
    }

    fn ep_rank(&self) -> usize {
        match self {
            HostAll2All::AgRs(m) => m.ep_rank(),
            HostAll2All::AllToAllV(m) => m.ep_rank(),
        }
    }

    fn ep_size(&self) -> usize {
        match self {
            HostAll2All::AgRs(m) => m.ep_size(),
            HostAll2All::AllToAllV(m) => m.ep_size(),
        }
    }

    fn dispatch(
        &self,
        tokens: HostTokens<'_>,
        placement: &ExpertPlacement,
        load: Option<&mut [i64]>,
        deadline: Deadline,
    ) -> Result<HostDispatched, All2AllError> {
        match self {
            HostAll2All::AgRs(m) => m.dispatch(tokens, placement, load, deadline),
            HostAll2All::AllToAllV(m) => m.dispatch(tokens, placement, load, deadline),
        }
    }

    fn combine(
        &self,
        dispatched: &HostDispatched,
        expert_outputs: &[f32],
        deadline: Deadline,
    ) -> Result<Vec<f32>, All2AllError> {
        match self {
            HostAll2All::AgRs(m) => m.combine(dispatched, expert_outputs, deadline),
            HostAll2All::AllToAllV(m) => m.combine(dispatched, expert_outputs, deadline),
        }
    }
}

/// The physical slot of every pick of this rank's (checked) tokens, row-major
/// `tokens × top_k`: replica [`replica_index`]`(token_key(rank, t), k, count)` of the
/// picked expert.
fn route_tokens(
    ctx: &Ctx<'_>,
    tokens: &HostTokens<'_>,
    placement: &ExpertPlacement,
) -> Result<Vec<u32>, All2AllError> {
    let top_k = tokens.top_k();
    let me = ctx.group.rank();
    tokens
        .topk_ids()
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            let (t, k) = (i / top_k, i % top_k);
            placement
                .route(token_key(me, t), k, e as usize)
                .map(|s| s as u32)
                .ok_or(All2AllError::UnknownExpert {
                    rank: ctx.me(),
                    manager: ctx.manager,
                    layer: ctx.layer,
                    token: t,
                    k,
                    expert: e,
                    num_logical: placement.num_logical(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in HostAll2AllKind::ALL {
            assert_eq!(HostAll2AllKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(
            HostAll2AllKind::from_name("agrs"),
            Some(HostAll2AllKind::AgRs)
        );
        assert_eq!(HostAll2AllKind::from_name("naive"), None);
    }
}
