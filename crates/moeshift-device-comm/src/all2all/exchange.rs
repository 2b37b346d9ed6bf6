//! What both host managers share: the calling context (rank, manager, layer) that errors
//! name, and the checks of peers' headers that make every rank fail a bad call together.

use super::error::All2AllError;
use super::wire::{CombineHeader, DispatchHeader, STATUS_OK};
use crate::error::{CommError, RankRef};
use crate::host::HostGroup;

/// The rank, manager and layer of one dispatch or combine call.
pub(crate) struct Ctx<'g> {
    pub group: &'g HostGroup,
    pub manager: &'static str,
    pub layer: usize,
}

impl<'g> Ctx<'g> {
    pub(crate) fn new(group: &'g HostGroup, manager: &'static str, layer: usize) -> Self {
        Self {
            group,
            manager,
            layer,
        }
    }

    /// This rank.
    pub(crate) fn me(&self) -> RankRef {
        self.peer(self.group.rank())
    }

    /// Group rank `r`.
    pub(crate) fn peer(&self, r: usize) -> RankRef {
        RankRef {
            local: r,
            global: self.group.global_rank(r).unwrap_or(usize::MAX),
        }
    }

    /// Wraps a transport error of operation `op`.
    pub(crate) fn comm(&self, op: &'static str) -> impl FnOnce(CommError) -> All2AllError + '_ {
        move |source| All2AllError::Comm {
            manager: self.manager,
            op,
            layer: self.layer,
            source: Box::new(source),
        }
    }

    /// A message from `peer` that does not decode.
    pub(crate) fn malformed(&self, op: &'static str, peer: usize, detail: String) -> All2AllError {
        All2AllError::Malformed {
            rank: self.me(),
            peer: self.peer(peer),
            manager: self.manager,
            op,
            layer: self.layer,
            detail,
        }
    }

    /// Checks the dispatch header `theirs` from `peer` against this rank's `ours`.
    pub(crate) fn check_dispatch(
        &self,
        peer: usize,
        theirs: &DispatchHeader,
        ours: &DispatchHeader,
    ) -> Result<(), All2AllError> {
        if theirs.status != STATUS_OK {
            return Err(self.rejected("dispatch", peer));
        }
        match theirs.mismatch(ours) {
            None => Ok(()),
            Some((field, ours, theirs)) => Err(All2AllError::PeerMismatch {
                rank: self.me(),
                peer: self.peer(peer),
                manager: self.manager,
                op: "dispatch",
                layer: self.layer,
                field,
                ours,
                theirs,
            }),
        }
    }

    /// Checks the combine header from `peer`: valid status, this rank's hidden size and
    /// layer, and `rows` rows.
    pub(crate) fn check_combine(
        &self,
        peer: usize,
        h: &CombineHeader,
        hidden_size: usize,
        rows: usize,
    ) -> Result<(), All2AllError> {
        if h.status != STATUS_OK {
            return Err(self.rejected("combine", peer));
        }
        let mismatch = |field, ours: u64, theirs: u64| All2AllError::PeerMismatch {
            rank: self.me(),
            peer: self.peer(peer),
            manager: self.manager,
            op: "combine",
            layer: self.layer,
            field,
            ours,
            theirs,
        };
        if h.layer != self.layer as u64 {
            return Err(mismatch("layer", self.layer as u64, h.layer));
        }
        if u64::from(h.hidden_size) != hidden_size as u64 {
            return Err(mismatch(
                "hidden size",
                hidden_size as u64,
                u64::from(h.hidden_size),
            ));
        }
        if h.rows != rows as u64 {
            return Err(mismatch("row count for this rank", rows as u64, h.rows));
        }
        Ok(())
    }

    fn rejected(&self, op: &'static str, peer: usize) -> All2AllError {
        All2AllError::PeerRejected {
            rank: self.me(),
            peer: self.peer(peer),
            manager: self.manager,
            op,
            layer: self.layer,
        }
    }
}
