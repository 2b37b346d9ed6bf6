//! [`All2AllError`], the error type of the MoE all-to-all managers.

use crate::error::{CommError, RankRef};

/// Errors of dispatch and combine, and of the placement maps they read.
///
/// Dispatch and combine agree on failure: a rank whose own input is invalid still takes
/// part in the exchange and tells the others, so every rank of the EP group returns an
/// error for the same call (the rank at fault its own, the others
/// [`PeerRejected`](Self::PeerRejected) naming it) instead of waiting for a deadline. After
/// such an error the group is still usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum All2AllError {
    /// The placement maps are invalid.
    #[error("layer {layer}: invalid expert placement: {detail}")]
    Placement {
        /// The MoE layer.
        layer: usize,
        /// What is wrong.
        detail: String,
    },

    /// The placement was built for another number of EP ranks than the group has.
    #[error(
        "{rank} of group {group:?}: layer {layer}'s placement spreads its slots over \
         {placement_ep_size} EP ranks, but the group has {group_size}; all-to-all runs on \
         the EP group (DP·PCP·TP ranks)"
    )]
    PlacementGroup {
        /// The rank reporting.
        rank: RankRef,
        /// The group.
        group: String,
        /// The MoE layer.
        layer: usize,
        /// EP size of the placement.
        placement_ep_size: usize,
        /// Size of the group.
        group_size: usize,
    },

    /// This rank's tokens do not have a consistent shape.
    #[error("{rank}: {manager} dispatch of layer {layer}: invalid tokens: {detail}")]
    Tokens {
        /// The rank reporting.
        rank: RankRef,
        /// The manager.
        manager: &'static str,
        /// The MoE layer.
        layer: usize,
        /// What is wrong.
        detail: String,
    },

    /// A token picked a logical expert that does not exist.
    #[error(
        "{rank}: {manager} dispatch of layer {layer}: token {token} pick {k} names logical \
         expert {expert}, but the layer has {num_logical}"
    )]
    UnknownExpert {
        /// The rank reporting.
        rank: RankRef,
        /// The manager.
        manager: &'static str,
        /// The MoE layer.
        layer: usize,
        /// The token (index in this rank's batch).
        token: usize,
        /// The pick (0..top_k).
        k: usize,
        /// The expert id it named.
        expert: u32,
        /// Number of logical experts.
        num_logical: usize,
    },

    /// The load counter does not have one entry per physical slot.
    #[error(
        "{rank}: {manager} dispatch of layer {layer}: the load counter has {len} entries, \
         but the layer has {expected} physical slots"
    )]
    LoadCounter {
        /// The rank reporting.
        rank: RankRef,
        /// The manager.
        manager: &'static str,
        /// The MoE layer.
        layer: usize,
        /// Length passed.
        len: usize,
        /// Number of physical slots.
        expected: usize,
    },

    /// The expert outputs handed to combine have the wrong size.
    #[error(
        "{rank}: {manager} combine of layer {layer}: {len} output values, expected {items} \
         work items × hidden size {hidden_size}"
    )]
    ExpertOutputs {
        /// The rank reporting.
        rank: RankRef,
        /// The manager.
        manager: &'static str,
        /// The MoE layer.
        layer: usize,
        /// Values passed.
        len: usize,
        /// Work items of the dispatch.
        items: usize,
        /// Hidden size.
        hidden_size: usize,
    },

    /// Combine got the result of another manager's dispatch.
    #[error("{rank}: {manager} combine: {detail}")]
    ForeignDispatch {
        /// The rank reporting.
        rank: RankRef,
        /// The manager.
        manager: &'static str,
        /// Which manager the dispatch came from.
        detail: String,
    },

    /// A peer found its own input invalid (its own error says why), so the call failed on
    /// every rank.
    #[error(
        "{rank}: {manager} {op} of layer {layer} failed everywhere: {peer} rejected its own \
         input"
    )]
    PeerRejected {
        /// The rank reporting.
        rank: RankRef,
        /// The rank whose input was invalid.
        peer: RankRef,
        /// The manager.
        manager: &'static str,
        /// `dispatch` or `combine`.
        op: &'static str,
        /// The MoE layer.
        layer: usize,
    },

    /// A peer called with other parameters than this rank (hidden size, top-k, layer or
    /// placement).
    #[error(
        "{rank}: {manager} {op}: {peer} has {field} {theirs}, this rank has {ours} \
         (this rank's layer {layer})"
    )]
    PeerMismatch {
        /// The rank reporting.
        rank: RankRef,
        /// The disagreeing peer.
        peer: RankRef,
        /// The manager.
        manager: &'static str,
        /// `dispatch` or `combine`.
        op: &'static str,
        /// This rank's MoE layer.
        layer: usize,
        /// What differs: `hidden size`, `top-k`, `layer`, `placement fingerprint`, …
        field: &'static str,
        /// This rank's value.
        ours: u64,
        /// The peer's value.
        theirs: u64,
    },

    /// A peer's message could not be decoded.
    #[error("{rank}: {manager} {op} of layer {layer}: malformed message from {peer}: {detail}")]
    Malformed {
        /// The rank reporting.
        rank: RankRef,
        /// The sender.
        peer: RankRef,
        /// The manager.
        manager: &'static str,
        /// `dispatch` or `combine`.
        op: &'static str,
        /// The MoE layer.
        layer: usize,
        /// What is wrong.
        detail: String,
    },

    /// The host transport failed (a peer died, a deadline passed, …).
    #[error("{manager} {op} of layer {layer}: {source}")]
    Comm {
        /// The manager.
        manager: &'static str,
        /// `dispatch` or `combine`.
        op: &'static str,
        /// The MoE layer.
        layer: usize,
        /// The transport's error (it names the ranks and the group).
        #[source]
        source: Box<CommError>,
    },
}
