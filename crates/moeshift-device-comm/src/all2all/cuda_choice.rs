//! [`CudaAll2All`]: one of the three CUDA managers, chosen at run time by
//! [`CudaAll2AllKind`].

use std::borrow::Borrow;

use cudarc::driver::{CudaSlice, CudaView};
use moeshift_sync::Deadline;

use super::cuda::CudaTokens;
use super::cuda_a2av::CudaAllToAllVManager;
use super::cuda_agrs::CudaAgRsManager;
use super::cuda_dispatched::CudaDispatched;
use super::cuda_error::CudaAll2AllError;
use super::cuda_one_sided::CudaOneSidedManager;
use super::placement::ExpertPlacement;
use super::workspace::Workspace;
use super::MoeAll2All;
use crate::host::HostGroup;
use crate::nccl::NcclComm;

/// Which CUDA manager [`CudaAll2All`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CudaAll2AllKind {
    /// [`CudaAgRsManager`].
    AgRs,
    /// [`CudaAllToAllVManager`].
    AllToAllV,
    /// [`CudaOneSidedManager`] (ranks of one node).
    OneSided,
}

impl CudaAll2AllKind {
    /// Every kind.
    pub const ALL: [CudaAll2AllKind; 3] = [
        CudaAll2AllKind::AgRs,
        CudaAll2AllKind::AllToAllV,
        CudaAll2AllKind::OneSided,
    ];

    /// The manager's name: `allgather_reducescatter`, `all_to_all_v` or `one_sided_ipc`.
    pub fn name(self) -> &'static str {
        match self {
            CudaAll2AllKind::AgRs => "allgather_reducescatter",
            CudaAll2AllKind::AllToAllV => "all_to_all_v",
            CudaAll2AllKind::OneSided => "one_sided_ipc",
        }
    }

    /// The kind named `name` (as [`name`](Self::name) spells it, or `agrs`, `one_sided`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "allgather_reducescatter" | "agrs" => Some(CudaAll2AllKind::AgRs),
            "all_to_all_v" => Some(CudaAll2AllKind::AllToAllV),
            "one_sided_ipc" | "one_sided" => Some(CudaAll2AllKind::OneSided),
            _ => None,
        }
    }
}

/// A CUDA manager chosen at run time.
#[derive(Debug)]
pub enum CudaAll2All<C = NcclComm, G = HostGroup> {
    /// Gather / reduce-scatter.
    AgRs(CudaAgRsManager<C>),
    /// All-to-all-v.
    AllToAllV(CudaAllToAllVManager<C>),
    /// One-sided writes into CUDA IPC workspaces (boxed: it carries its workspace state).
    OneSided(Box<CudaOneSidedManager<C, G>>),
}

impl<C: Borrow<NcclComm>, G: Borrow<HostGroup>> CudaAll2All<C, G> {
    /// A manager of `kind` over the EP group's communicator `comm`. `group` (the same EP
    /// ranks over the host transport) and `workspace` are used by the one-sided manager
    /// only, which every EP rank creates together before `deadline`.
    pub fn new(
        kind: CudaAll2AllKind,
        comm: C,
        group: G,
        workspace: Workspace,
        deadline: Deadline,
    ) -> Result<Self, CudaAll2AllError> {
        Ok(match kind {
            CudaAll2AllKind::AgRs => CudaAll2All::AgRs(CudaAgRsManager::new(comm)?),
            CudaAll2AllKind::AllToAllV => CudaAll2All::AllToAllV(CudaAllToAllVManager::new(comm)?),
            CudaAll2AllKind::OneSided => CudaAll2All::OneSided(Box::new(CudaOneSidedManager::new(
                comm, group, workspace, deadline,
            )?)),
        })
    }

    /// Which manager this is.
    pub fn kind(&self) -> CudaAll2AllKind {
        match self {
            CudaAll2All::AgRs(_) => CudaAll2AllKind::AgRs,
            CudaAll2All::AllToAllV(_) => CudaAll2AllKind::AllToAllV,
            CudaAll2All::OneSided(_) => CudaAll2AllKind::OneSided,
        }
    }
}

impl<C: Borrow<NcclComm>, G: Borrow<HostGroup>> MoeAll2All for CudaAll2All<C, G> {
    type Tokens<'a> = CudaTokens<'a>;
    type LoadCounts<'a> = &'a mut CudaSlice<i64>;
    type ExpertOutputs<'a> = CudaView<'a, u8>;
    type Dispatched = CudaDispatched;
    type Combined = CudaSlice<u8>;
    type Error = CudaAll2AllError;

    fn name(&self) -> &'static str {
        self.kind().name()
    }

    fn ep_rank(&self) -> usize {
        match self {
            CudaAll2All::AgRs(m) => m.ep_rank(),
            CudaAll2All::AllToAllV(m) => m.ep_rank(),
            CudaAll2All::OneSided(m) => m.ep_rank(),
        }
    }

    fn ep_size(&self) -> usize {
        match self {
            CudaAll2All::AgRs(m) => m.ep_size(),
            CudaAll2All::AllToAllV(m) => m.ep_size(),
            CudaAll2All::OneSided(m) => m.ep_size(),
        }
    }

    fn dispatch(
        &self,
        tokens: CudaTokens<'_>,
        placement: &ExpertPlacement,
        load: Option<&mut CudaSlice<i64>>,
        deadline: Deadline,
    ) -> Result<CudaDispatched, CudaAll2AllError> {
        match self {
            CudaAll2All::AgRs(m) => m.dispatch(tokens, placement, load, deadline),
            CudaAll2All::AllToAllV(m) => m.dispatch(tokens, placement, load, deadline),
            CudaAll2All::OneSided(m) => m.dispatch(tokens, placement, load, deadline),
        }
    }

    fn combine(
        &self,
        dispatched: &CudaDispatched,
        expert_outputs: CudaView<'_, u8>,
        deadline: Deadline,
    ) -> Result<CudaSlice<u8>, CudaAll2AllError> {
        match self {
            CudaAll2All::AgRs(m) => m.combine(dispatched, expert_outputs, deadline),
            CudaAll2All::AllToAllV(m) => m.combine(dispatched, expert_outputs, deadline),
            CudaAll2All::OneSided(m) => m.combine(dispatched, expert_outputs, deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in CudaAll2AllKind::ALL {
            assert_eq!(CudaAll2AllKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(
            CudaAll2AllKind::from_name("one_sided"),
            Some(CudaAll2AllKind::OneSided)
        );
        assert_eq!(CudaAll2AllKind::from_name("deepep"), None);
    }
}
