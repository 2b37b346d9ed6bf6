//! Parallel layout: which global ranks form the tensor-parallel (TP), prefill-context-parallel
//! (PCP), pipeline-parallel (PP), data-parallel (DP), expert-parallel (EP) and EPLB groups.
//!
//! Ranks are laid out as `[DP, PP, PCP, TP]` with TP fastest, as vLLM does:
//! `rank = ((dp · PP + pp) · PCP + pcp) · TP + tp`. From that layout:
//!
//! | kind | ranks of one group | groups ordered by |
//! | --- | --- | --- |
//! | [`Tp`](GroupKind::Tp) | the TP ranks of one `(dp, pp, pcp)` | `(dp, pp, pcp)` |
//! | [`Pcp`](GroupKind::Pcp) | the PCP ranks of one `(dp, pp, tp)` | `(dp, pp, tp)` |
//! | [`Pp`](GroupKind::Pp) | the PP stages of one `(dp, pcp, tp)` | `(dp, tp, pcp)` |
//! | [`Dp`](GroupKind::Dp) | the DP replicas of one `(pp, pcp, tp)` | `(tp, pp, pcp)` |
//! | [`Ep`](GroupKind::Ep) | every rank of one PP stage, ordered `(dp, pcp, tp)`: DP·PCP·TP ranks | `pp` |
//! | [`Eplb`](GroupKind::Eplb) | the same ranks as EP | `pp` |
//!
//! The EPLB group holds the same ranks as EP but gets communicators of its own, so that
//! rebalancing traffic never interleaves with the MoE forward collectives on the EP group.
//!
//! The EP group is DP·PCP·TP ranks, **not** the DP group: with TP = 2 and DP = 4 the EP
//! group has 8 ranks while a DP group has 4. Anything sized per EP rank (all-to-all
//! workspaces, load counters) must use [`ParallelLayout::ep_size`].
//!
//! # Communicators
//!
//! [`ParallelLayout::form_host_group`] and [`ParallelLayout::form_host_groups`] create
//! [`HostGroup`]s through the rendezvous store, named `"{kind}/{index}"` (for example
//! `"ep/1"`), so errors name the group. An NCCL communicator for a group (feature `cuda`) is
//! created the same way through the store: every member calls
//! `NcclComm::from_store(store, m.rank_in_group, m.ranks.len(), key, device, deadline)` with
//! `m` its [`GroupMembership`] and `key` a store key that is new for every communicator
//! (an NCCL unique id is good once), e.g. `format!("nccl/{}/{generation}", m.name())`.
//!
//! # Example
//!
//! ```
//! use moeshift_device_comm::layout::{GroupKind, ParallelLayout, ParallelSizes};
//!
//! let sizes = ParallelSizes { dp: 2, pp: 2, tp: 2, ..ParallelSizes::default() };
//! let layout = ParallelLayout::new(8, sizes)?;
//! assert_eq!(layout.groups(GroupKind::Ep), [vec![0, 1, 4, 5], vec![2, 3, 6, 7]]);
//! assert_eq!(layout.ep_size(), 4);
//!
//! let m = layout.membership(GroupKind::Dp, 6)?;
//! assert_eq!((m.index, m.ranks, m.rank_in_group), (1, &[2, 6][..], 1));
//! # Ok::<(), moeshift_device_comm::layout::LayoutError>(())
//! ```

use std::fmt;

use moeshift_sync::Deadline;

use crate::error::CommError;
use crate::host::HostGroup;
use crate::store::StoreClient;

/// The kinds of parallel groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupKind {
    /// Tensor parallel.
    Tp,
    /// Prefill context parallel.
    Pcp,
    /// Pipeline parallel.
    Pp,
    /// Data parallel.
    Dp,
    /// Expert parallel: DP·PCP·TP ranks of one pipeline stage.
    Ep,
    /// EPLB: the ranks of EP, as a group of its own.
    Eplb,
}

impl GroupKind {
    /// Every kind, in the order [`ParallelLayout::form_host_groups`] forms them.
    pub const ALL: [GroupKind; 6] = [
        GroupKind::Tp,
        GroupKind::Pcp,
        GroupKind::Pp,
        GroupKind::Dp,
        GroupKind::Ep,
        GroupKind::Eplb,
    ];

    /// The short lower-case name used in group names: `tp`, `pcp`, `pp`, `dp`, `ep`, `eplb`.
    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Tp => "tp",
            GroupKind::Pcp => "pcp",
            GroupKind::Pp => "pp",
            GroupKind::Dp => "dp",
            GroupKind::Ep => "ep",
            GroupKind::Eplb => "eplb",
        }
    }

    fn slot(self) -> usize {
        match self {
            GroupKind::Tp => 0,
            GroupKind::Pcp => 1,
            GroupKind::Pp => 2,
            GroupKind::Dp => 3,
            GroupKind::Ep => 4,
            GroupKind::Eplb => 5,
        }
    }
}

impl fmt::Display for GroupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Sizes of the parallel dimensions. Each defaults to 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParallelSizes {
    /// Tensor-parallel size (fastest-varying dimension of the rank).
    pub tp: usize,
    /// Prefill-context-parallel size.
    pub pcp: usize,
    /// Pipeline-parallel size.
    pub pp: usize,
    /// Data-parallel size (slowest-varying dimension of the rank).
    pub dp: usize,
}

impl Default for ParallelSizes {
    fn default() -> Self {
        Self {
            tp: 1,
            pcp: 1,
            pp: 1,
            dp: 1,
        }
    }
}

/// Why a layout could not be built, or a group could not be looked up or formed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// A size is zero.
    #[error("parallel layout: {field} size is 0; every size must be at least 1")]
    ZeroSize {
        /// The dimension: `world`, `tp`, `pcp`, `pp` or `dp`.
        field: &'static str,
    },
    /// The sizes do not multiply to the world size.
    #[error(
        "parallel layout: DP {dp} × PP {pp} × PCP {pcp} × TP {tp} = {product} ranks, \
         but the world has {world_size}"
    )]
    SizeMismatch {
        /// World size.
        world_size: usize,
        /// Data-parallel size.
        dp: usize,
        /// Pipeline-parallel size.
        pp: usize,
        /// Prefill-context-parallel size.
        pcp: usize,
        /// Tensor-parallel size.
        tp: usize,
        /// Their product (saturated at `usize::MAX` on overflow).
        product: usize,
    },
    /// A global rank outside the world.
    #[error("parallel layout: rank {rank} is outside the world of {world_size} ranks")]
    RankOutOfRange {
        /// The rank asked about.
        rank: usize,
        /// World size.
        world_size: usize,
    },
    /// The store serves a world of another size than the layout's.
    #[error(
        "parallel layout of {layout_world} ranks cannot form groups through a store of a \
         {store_world}-rank world (rank {rank})"
    )]
    WorldMismatch {
        /// This rank.
        rank: usize,
        /// The layout's world size.
        layout_world: usize,
        /// The store's world size.
        store_world: usize,
    },
    /// Forming a group's communicator failed.
    #[error("rank {rank}: forming {kind} group {index} (global ranks {ranks:?}) failed: {source}")]
    Group {
        /// This rank (global).
        rank: usize,
        /// The group's kind.
        kind: GroupKind,
        /// The group's index among the groups of its kind.
        index: usize,
        /// The group's global ranks.
        ranks: Vec<usize>,
        /// The transport's error.
        #[source]
        source: Box<CommError>,
    },
}

/// A rank's coordinates in the `[DP, PP, PCP, TP]` layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RankCoords {
    /// Data-parallel index.
    pub dp: usize,
    /// Pipeline stage.
    pub pp: usize,
    /// Prefill-context-parallel index.
    pub pcp: usize,
    /// Tensor-parallel index.
    pub tp: usize,
}

/// One rank's group of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupMembership<'a> {
    /// The group's kind.
    pub kind: GroupKind,
    /// The group's index among the groups of its kind (as in [`ParallelLayout::groups`]).
    pub index: usize,
    /// The group's global ranks, in group-rank order.
    pub ranks: &'a [usize],
    /// The rank's position in `ranks` (its group-local rank).
    pub rank_in_group: usize,
}

impl GroupMembership<'_> {
    /// The group's name, `"{kind}/{index}"`: the name its host group is formed under.
    pub fn name(&self) -> String {
        format!("{}/{}", self.kind, self.index)
    }
}

/// The host groups of one rank, one per kind (see [`ParallelLayout::form_host_groups`]).
#[derive(Debug)]
pub struct HostGroups {
    /// The rank's TP group.
    pub tp: HostGroup,
    /// The rank's PCP group.
    pub pcp: HostGroup,
    /// The rank's PP group.
    pub pp: HostGroup,
    /// The rank's DP group.
    pub dp: HostGroup,
    /// The rank's EP group: the group MoE all-to-all runs on.
    pub ep: HostGroup,
    /// The rank's EPLB group: the EP ranks again, for rebalancing traffic.
    pub eplb: HostGroup,
}

impl HostGroups {
    /// The group of `kind`.
    pub fn get(&self, kind: GroupKind) -> &HostGroup {
        match kind {
            GroupKind::Tp => &self.tp,
            GroupKind::Pcp => &self.pcp,
            GroupKind::Pp => &self.pp,
            GroupKind::Dp => &self.dp,
            GroupKind::Ep => &self.ep,
            GroupKind::Eplb => &self.eplb,
        }
    }
}

/// The rank lists of every parallel group of a world (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParallelLayout {
    world_size: usize,
    sizes: ParallelSizes,
    /// Indexed by [`GroupKind::slot`].
    groups: [Vec<Vec<usize>>; 6],
}

impl ParallelLayout {
    /// The layout of `world_size` ranks with the given sizes. Every size must be at least 1
    /// and DP·PP·PCP·TP must equal `world_size`.
    pub fn new(world_size: usize, sizes: ParallelSizes) -> Result<Self, LayoutError> {
        let ParallelSizes { tp, pcp, pp, dp } = sizes;
        for (field, v) in [
            ("world", world_size),
            ("tp", tp),
            ("pcp", pcp),
            ("pp", pp),
            ("dp", dp),
        ] {
            if v == 0 {
                return Err(LayoutError::ZeroSize { field });
            }
        }
        let product = dp
            .checked_mul(pp)
            .and_then(|x| x.checked_mul(pcp))
            .and_then(|x| x.checked_mul(tp));
        if product != Some(world_size) {
            return Err(LayoutError::SizeMismatch {
                world_size,
                dp,
                pp,
                pcp,
                tp,
                product: product.unwrap_or(usize::MAX),
            });
        }
        let mut layout = Self {
            world_size,
            sizes,
            groups: Default::default(),
        };
        for kind in GroupKind::ALL {
            let (count, size) = (layout.group_count(kind), layout.group_size(kind));
            let mut groups = vec![vec![0usize; size]; count];
            for rank in 0..world_size {
                let c = layout.coords_unchecked(rank);
                let (index, pos) = layout.place(kind, c);
                if let Some(slot) = groups.get_mut(index).and_then(|g| g.get_mut(pos)) {
                    *slot = rank;
                }
            }
            layout.groups[kind.slot()] = groups;
        }
        Ok(layout)
    }

    /// World size.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The sizes the layout was built from.
    pub fn sizes(&self) -> ParallelSizes {
        self.sizes
    }

    /// Size of the EP group (and of the EPLB group): DP·PCP·TP.
    pub fn ep_size(&self) -> usize {
        self.group_size(GroupKind::Ep)
    }

    /// Number of ranks in each group of `kind`.
    pub fn group_size(&self, kind: GroupKind) -> usize {
        let s = &self.sizes;
        match kind {
            GroupKind::Tp => s.tp,
            GroupKind::Pcp => s.pcp,
            GroupKind::Pp => s.pp,
            GroupKind::Dp => s.dp,
            GroupKind::Ep | GroupKind::Eplb => s.dp * s.pcp * s.tp,
        }
    }

    /// Number of groups of `kind` (world size / group size).
    pub fn group_count(&self, kind: GroupKind) -> usize {
        self.world_size / self.group_size(kind)
    }

    /// Every group of `kind`, each a list of global ranks in group-rank order.
    pub fn groups(&self, kind: GroupKind) -> &[Vec<usize>] {
        self.groups
            .get(kind.slot())
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The coordinates of global rank `rank`.
    pub fn coords(&self, rank: usize) -> Result<RankCoords, LayoutError> {
        self.check_rank(rank)?;
        Ok(self.coords_unchecked(rank))
    }

    /// The global rank at the given coordinates, if they are inside the layout.
    pub fn rank_at(&self, c: RankCoords) -> Option<usize> {
        let s = &self.sizes;
        if c.dp >= s.dp || c.pp >= s.pp || c.pcp >= s.pcp || c.tp >= s.tp {
            return None;
        }
        Some(((c.dp * s.pp + c.pp) * s.pcp + c.pcp) * s.tp + c.tp)
    }

    /// Global rank `rank`'s group of `kind` and its position in it.
    pub fn membership(
        &self,
        kind: GroupKind,
        rank: usize,
    ) -> Result<GroupMembership<'_>, LayoutError> {
        self.check_rank(rank)?;
        let (index, rank_in_group) = self.place(kind, self.coords_unchecked(rank));
        let ranks = self
            .groups(kind)
            .get(index)
            .map(Vec::as_slice)
            .unwrap_or_default();
        Ok(GroupMembership {
            kind,
            index,
            ranks,
            rank_in_group,
        })
    }

    /// Forms global rank `store.rank()`'s host group of `kind` through the store. Every
    /// member of that group calls it (with the same layout); ranks of other groups of the
    /// same kind may form theirs at the same time.
    pub fn form_host_group(
        &self,
        kind: GroupKind,
        store: &StoreClient,
        deadline: Deadline,
    ) -> Result<HostGroup, LayoutError> {
        let rank = store.rank();
        if store.world_size() != self.world_size {
            return Err(LayoutError::WorldMismatch {
                rank,
                layout_world: self.world_size,
                store_world: store.world_size(),
            });
        }
        let m = self.membership(kind, rank)?;
        HostGroup::from_store(store, &m.name(), m.ranks, deadline).map_err(|source| {
            LayoutError::Group {
                rank,
                kind,
                index: m.index,
                ranks: m.ranks.to_vec(),
                source: Box::new(source),
            }
        })
    }

    /// Forms all of `store.rank()`'s host groups, in the order of [`GroupKind::ALL`]. Every
    /// rank of the world calls it: each step only waits for ranks that are at the same step,
    /// so the groups form without any rank waiting on another kind.
    pub fn form_host_groups(
        &self,
        store: &StoreClient,
        deadline: Deadline,
    ) -> Result<HostGroups, LayoutError> {
        Ok(HostGroups {
            tp: self.form_host_group(GroupKind::Tp, store, deadline)?,
            pcp: self.form_host_group(GroupKind::Pcp, store, deadline)?,
            pp: self.form_host_group(GroupKind::Pp, store, deadline)?,
            dp: self.form_host_group(GroupKind::Dp, store, deadline)?,
            ep: self.form_host_group(GroupKind::Ep, store, deadline)?,
            eplb: self.form_host_group(GroupKind::Eplb, store, deadline)?,
        })
    }

    fn check_rank(&self, rank: usize) -> Result<(), LayoutError> {
        if rank >= self.world_size {
            return Err(LayoutError::RankOutOfRange {
                rank,
                world_size: self.world_size,
            });
        }
        Ok(())
    }

    fn coords_unchecked(&self, rank: usize) -> RankCoords {
        let s = &self.sizes;
        RankCoords {
            tp: rank % s.tp,
            pcp: (rank / s.tp) % s.pcp,
            pp: (rank / (s.tp * s.pcp)) % s.pp,
            dp: rank / (s.tp * s.pcp * s.pp),
        }
    }

    /// (group index, position in the group) of the rank at `c` in its group of `kind`.
    fn place(&self, kind: GroupKind, c: RankCoords) -> (usize, usize) {
        let s = &self.sizes;
        match kind {
            // Groups vary the named dimension fastest; the others, in layout order, pick
            // the group (vLLM swaps the dimension with TP and takes contiguous blocks).
            GroupKind::Tp => ((c.dp * s.pp + c.pp) * s.pcp + c.pcp, c.tp),
            GroupKind::Pcp => ((c.dp * s.pp + c.pp) * s.tp + c.tp, c.pcp),
            GroupKind::Pp => ((c.dp * s.tp + c.tp) * s.pcp + c.pcp, c.pp),
            GroupKind::Dp => ((c.tp * s.pp + c.pp) * s.pcp + c.pcp, c.dp),
            GroupKind::Ep | GroupKind::Eplb => (c.pp, (c.dp * s.pcp + c.pcp) * s.tp + c.tp),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(dp: usize, pp: usize, pcp: usize, tp: usize) -> ParallelSizes {
        ParallelSizes { tp, pcp, pp, dp }
    }

    #[test]
    fn reference_vector_world_8_dp2_pp2_tp2() {
        // Study §9.1: rank = dp·4 + pp·2 + tp.
        let layout = ParallelLayout::new(8, sizes(2, 2, 1, 2)).expect("layout");
        assert_eq!(
            layout.groups(GroupKind::Tp),
            [vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]
        );
        assert_eq!(
            layout.groups(GroupKind::Pp),
            [vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]
        );
        assert_eq!(
            layout.groups(GroupKind::Dp),
            [vec![0, 4], vec![2, 6], vec![1, 5], vec![3, 7]]
        );
        assert_eq!(
            layout.groups(GroupKind::Ep),
            [vec![0, 1, 4, 5], vec![2, 3, 6, 7]]
        );
        assert_eq!(layout.groups(GroupKind::Eplb), layout.groups(GroupKind::Ep));
        assert_eq!(
            layout.groups(GroupKind::Pcp),
            (0..8).map(|r| vec![r]).collect::<Vec<_>>()
        );
    }

    #[test]
    fn membership_names_group_and_position() {
        let layout = ParallelLayout::new(8, sizes(2, 2, 1, 2)).expect("layout");
        let m = layout.membership(GroupKind::Ep, 6).expect("ep of 6");
        assert_eq!(
            (m.index, m.ranks, m.rank_in_group),
            (1, &[2, 3, 6, 7][..], 2)
        );
        assert_eq!(m.name(), "ep/1");
        let m = layout.membership(GroupKind::Pp, 5).expect("pp of 5");
        assert_eq!((m.index, m.ranks, m.rank_in_group), (3, &[5, 7][..], 0));
        let c = layout.coords(6).expect("coords");
        assert_eq!(
            c,
            RankCoords {
                dp: 1,
                pp: 1,
                pcp: 0,
                tp: 0
            }
        );
        assert_eq!(layout.rank_at(c), Some(6));
        assert_eq!(
            layout.rank_at(RankCoords {
                dp: 2,
                pp: 0,
                pcp: 0,
                tp: 0
            }),
            None
        );
    }

    #[test]
    fn ep_is_dp_pcp_tp_not_dp() {
        // The seed case: TP = 2, DP = 4 gives DP groups of 4 but one EP group of 8.
        let layout = ParallelLayout::new(8, sizes(4, 1, 1, 2)).expect("layout");
        assert_eq!(layout.group_size(GroupKind::Dp), 4);
        assert_eq!(layout.ep_size(), 8);
        assert_eq!(layout.groups(GroupKind::Ep), [(0..8).collect::<Vec<_>>()]);
        assert_eq!(
            layout.groups(GroupKind::Dp),
            [vec![0, 2, 4, 6], vec![1, 3, 5, 7]]
        );
    }

    #[test]
    fn pcp_sits_between_pp_and_tp() {
        // world 8 = PCP 2 × TP 2 × DP 2: rank = dp·4 + pcp·2 + tp.
        let layout = ParallelLayout::new(8, sizes(2, 1, 2, 2)).expect("layout");
        assert_eq!(
            layout.groups(GroupKind::Pcp),
            [vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]
        );
        assert_eq!(layout.groups(GroupKind::Ep), [(0..8).collect::<Vec<_>>()]);
        assert_eq!(
            layout.groups(GroupKind::Dp),
            [vec![0, 4], vec![2, 6], vec![1, 5], vec![3, 7]]
        );
    }

    #[test]
    fn bad_sizes_are_typed_errors() {
        match ParallelLayout::new(8, sizes(2, 2, 1, 3)) {
            Err(LayoutError::SizeMismatch { product: 12, .. }) => {}
            other => panic!("expected a size mismatch, got {other:?}"),
        }
        match ParallelLayout::new(8, sizes(2, 0, 1, 2)) {
            Err(LayoutError::ZeroSize { field: "pp" }) => {}
            other => panic!("expected a zero pp size, got {other:?}"),
        }
        match ParallelLayout::new(0, ParallelSizes::default()) {
            Err(LayoutError::ZeroSize { field: "world" }) => {}
            other => panic!("expected a zero world, got {other:?}"),
        }
        match ParallelLayout::new(4, sizes(usize::MAX, 2, 1, 2)) {
            Err(LayoutError::SizeMismatch {
                product: usize::MAX,
                ..
            }) => {}
            other => panic!("expected an overflowing product, got {other:?}"),
        }
        let err = ParallelLayout::new(8, sizes(2, 2, 1, 3)).expect_err("mismatch");
        let text = err.to_string();
        assert!(
            text.contains("= 12 ranks") && text.contains("world has 8"),
            "{text}"
        );
        let layout = ParallelLayout::new(2, sizes(2, 1, 1, 1)).expect("layout");
        assert!(matches!(
            layout.membership(GroupKind::Tp, 2),
            Err(LayoutError::RankOutOfRange {
                rank: 2,
                world_size: 2
            })
        ));
    }
}
