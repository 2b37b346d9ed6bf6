//! [`EplbCommError`]: everything that can go wrong while validating expert weights,
//! agreeing on a plan and moving rows between ranks.
//!
//! Every message names the rank that reports it (its rank in the EPLB group) and, where
//! they are involved, the peer rank, the layer, the expert and the tensor. On every error
//! returned by [`EplbCommunicator::transfer`](crate::EplbCommunicator::transfer) or
//! [`StagedLayer::commit`](crate::StagedLayer::commit) the weights are untouched.

use std::fmt;

use moeshift_device_comm::CommError;
use moeshift_tensor::{CudaError, Device, ExpertRowsError, HostBufferError, ViewError};

use crate::comm::Backend;

/// `", layer 3"` or nothing, for messages about an operation that may or may not concern one
/// layer.
struct AtLayer<'a>(&'a Option<usize>);

impl fmt::Display for AtLayer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(layer) => write!(f, ", layer {layer}"),
            None => Ok(()),
        }
    }
}

/// `"layer 3"` or `"the layer list"`.
struct Where<'a>(&'a Option<usize>);

impl fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(layer) => write!(f, "layer {layer}"),
            None => f.write_str("the layer list"),
        }
    }
}

/// `" (expert 5, tensor \"w2\")"`, `" (expert 5)"` or nothing.
struct Item<'a>(&'a Option<usize>, &'a Option<String>);

impl fmt::Display for Item<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(e), Some(t)) => write!(f, " (expert {e}, tensor {t:?})"),
            (Some(e), None) => write!(f, " (expert {e})"),
            (None, Some(t)) => write!(f, " (tensor {t:?})"),
            (None, None) => Ok(()),
        }
    }
}

/// Errors of the EPLB communicators. See the [module documentation](self).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EplbCommError {
    /// A layer was described with no tensor at all.
    #[error("layer weights need at least one expert tensor")]
    NoTensors,

    /// Two tensors of one layer have the same name.
    #[error("tensor {tensor:?} is listed twice in one layer")]
    DuplicateTensor {
        /// The repeated name.
        tensor: String,
    },

    /// A tensor's view is malformed.
    #[error("tensor {tensor:?}: {source}")]
    View {
        /// The tensor.
        tensor: String,
        /// Why the view is malformed.
        #[source]
        source: ViewError,
    },

    /// A tensor's dim 0 cannot be addressed as one byte range per expert.
    #[error("tensor {tensor:?} cannot be moved expert by expert: {source}")]
    NotExpertRows {
        /// The tensor.
        tensor: String,
        /// Why its rows are not byte ranges.
        #[source]
        source: ExpertRowsError,
    },

    /// Tensors of one layer have different numbers of expert rows.
    #[error("tensor {tensor:?} has {rows} expert rows but tensor {first:?} of the same layer has {expected}")]
    RowCountMismatch {
        /// The tensor that differs.
        tensor: String,
        /// Its rows.
        rows: usize,
        /// The layer's first tensor.
        first: String,
        /// The first tensor's rows.
        expected: usize,
    },

    /// Tensors of one layer live on different devices.
    #[error(
        "tensor {tensor:?} is on {device} but tensor {first:?} of the same layer is on {expected}"
    )]
    DeviceMismatch {
        /// The tensor that differs.
        tensor: String,
        /// Its device.
        device: Device,
        /// The layer's first tensor.
        first: String,
        /// The first tensor's device.
        expected: Device,
    },

    /// A view given together with a host buffer reaches outside that buffer.
    #[error("tensor {tensor:?}: the view does not lie inside its host buffer: {detail}")]
    OutsideBuffer {
        /// The tensor.
        tensor: String,
        /// Addresses and sizes involved.
        detail: String,
    },

    /// Two expert rows of one layer share bytes, so writing one would corrupt the other.
    #[error(
        "row {row} of tensor {tensor:?} overlaps row {other_row} of tensor {other:?} in memory"
    )]
    OverlappingRows {
        /// One tensor.
        tensor: String,
        /// Its row.
        row: usize,
        /// The other tensor (may be the same one).
        other: String,
        /// The other row.
        other_row: usize,
    },

    /// An operation that reads or writes bytes on the host met device memory.
    #[error("tensor {tensor:?} lives in {device} memory, but {what} needs host memory")]
    NotHostMemory {
        /// The tensor.
        tensor: String,
        /// Where it lives.
        device: Device,
        /// What needed host memory.
        what: &'static str,
    },

    /// A tensor index not below the number of tensors.
    #[error("tensor index {index} is out of range: the layer has {tensors} tensors")]
    TensorOutOfRange {
        /// The index asked for.
        index: usize,
        /// Tensors in the layer.
        tensors: usize,
    },

    /// A row index not below the number of rows of a tensor.
    #[error("row {row} of tensor {tensor:?} is out of range: it has {rows} rows")]
    TensorRowOutOfRange {
        /// The tensor.
        tensor: String,
        /// The row asked for.
        row: usize,
        /// Its rows.
        rows: usize,
    },

    /// A layer index the communicator was not built for.
    #[error("rank {rank}: layer {layer} is out of range: the communicator was built for {layers} layers")]
    LayerOutOfRange {
        /// This rank.
        rank: usize,
        /// The layer asked for.
        layer: usize,
        /// Layers known.
        layers: usize,
    },

    /// The weights passed for a layer differ from the ones the communicator was built with.
    #[error("rank {rank}, layer {layer}: the weights do not match the layout agreed at construction: {detail}")]
    WeightsChanged {
        /// This rank.
        rank: usize,
        /// The layer.
        layer: usize,
        /// What differs (tensor, field, both values).
        detail: String,
    },

    /// Two ranks described their expert tensors differently (names, dtypes, row sizes,
    /// rows per rank or number of layers). Checked once, when the communicator is built.
    #[error("rank {rank} and peer rank {peer} disagree on the expert tensors of {}{}: {detail}", Where(.layer), .tensor.as_ref().map(|t| format!(", tensor {t:?}")).unwrap_or_default())]
    LayoutMismatch {
        /// This rank.
        rank: usize,
        /// The first peer that differs.
        peer: usize,
        /// The layer that differs, if the layer count agrees.
        layer: Option<usize>,
        /// The tensor that differs, if one does.
        tensor: Option<String>,
        /// The field and both values.
        detail: String,
    },

    /// The plan does not fit this communicator or these weights (number of ranks, rows per
    /// rank, a peer or round index).
    #[error("rank {rank}, layer {layer}: the transfer plan does not fit: {detail}")]
    PlanMismatch {
        /// This rank.
        rank: usize,
        /// The layer.
        layer: usize,
        /// What does not fit.
        detail: String,
    },

    /// The plan refers to a row outside the layer.
    #[error("rank {rank}, layer {layer}: the plan puts expert {expert} in row {row}, but the layer has {rows} rows per rank")]
    RowOutOfRange {
        /// This rank.
        rank: usize,
        /// The layer.
        layer: usize,
        /// The expert concerned.
        expert: usize,
        /// The row.
        row: usize,
        /// Rows per rank.
        rows: usize,
    },

    /// Ranks computed different plans for one layer (different maps, or different layer
    /// indices). Detected before any byte moves; every rank reports it.
    #[error("rank {rank}, layer {layer}: rank(s) {peers:?} computed a different transfer plan (plan digest {ours:#018x} here, {theirs:#018x} on rank {})", .peers.first().copied().unwrap_or(usize::MAX))]
    PlanDigestMismatch {
        /// This rank.
        rank: usize,
        /// The layer.
        layer: usize,
        /// The ranks whose digest differs from this rank's.
        peers: Vec<usize>,
        /// This rank's digest.
        ours: u64,
        /// The first differing rank's digest.
        theirs: u64,
    },

    /// A peer could not take part in the layer's transfer (its own validation failed) and
    /// said why. No byte moved.
    #[error("rank {rank}, layer {layer}: peer rank {peer} refused the transfer: {reason}")]
    PeerRefused {
        /// This rank.
        rank: usize,
        /// The layer.
        layer: usize,
        /// The refusing peer.
        peer: usize,
        /// Its error.
        reason: String,
    },

    /// A message from a peer does not carry what the plan says it should.
    #[error("rank {rank}, layer {layer}, round {round}: the message from peer rank {peer} does not match the plan{}: {detail}", Item(.expert, .tensor))]
    WireMismatch {
        /// This rank.
        rank: usize,
        /// The layer.
        layer: usize,
        /// The sending peer.
        peer: usize,
        /// The round.
        round: usize,
        /// The expert concerned, if one.
        expert: Option<usize>,
        /// The tensor concerned, if one.
        tensor: Option<String>,
        /// What differs.
        detail: String,
    },

    /// The deadline passed before the operation completed.
    #[error("rank {rank}{}: deadline expired during {op}, waiting for rank(s) {waiting_for:?}: {source}", AtLayer(.layer))]
    DeadlineExpired {
        /// This rank.
        rank: usize,
        /// The layer, if the operation concerned one.
        layer: Option<usize>,
        /// The operation.
        op: String,
        /// EPLB-group ranks still awaited.
        waiting_for: Vec<usize>,
        /// The transport's error.
        #[source]
        source: Box<CommError>,
    },

    /// A peer exited, was killed or became unreachable.
    #[error("rank {rank}{}: peer rank {peer} is gone (exited, killed or unreachable) during {op}: {source}", AtLayer(.layer))]
    PeerLost {
        /// This rank.
        rank: usize,
        /// The layer, if the operation concerned one.
        layer: Option<usize>,
        /// The lost peer.
        peer: usize,
        /// The operation.
        op: String,
        /// The transport's error.
        #[source]
        source: Box<CommError>,
    },

    /// A peer gave up on the group (usually because it lost another rank) and said why.
    #[error("rank {rank}{}: peer rank {peer} aborted the EPLB group during {op}: {source}", AtLayer(.layer))]
    PeerAborted {
        /// This rank.
        rank: usize,
        /// The layer, if the operation concerned one.
        layer: Option<usize>,
        /// The aborting peer.
        peer: usize,
        /// The operation.
        op: String,
        /// The transport's error (it carries the peer's reason).
        #[source]
        source: Box<CommError>,
    },

    /// Any other transport failure (mismatched calls, a group that failed earlier, …).
    #[error("rank {rank}{}: {op} failed: {source}", AtLayer(.layer))]
    Transport {
        /// This rank.
        rank: usize,
        /// The layer, if the operation concerned one.
        layer: Option<usize>,
        /// The operation.
        op: String,
        /// The transport's error.
        #[source]
        source: Box<CommError>,
    },

    /// The communicator stopped after an earlier failure (it closed its connections so that
    /// peers would not wait for it); build a new one.
    #[error("rank {rank}: the EPLB communicator failed earlier and cannot be used: {reason}")]
    CommunicatorFailed {
        /// This rank.
        rank: usize,
        /// The earlier failure.
        reason: String,
    },

    /// A backend that this build does not provide.
    #[error("the {backend} EPLB backend is not available in this build: {reason}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: Backend,
        /// Why, and what to use instead.
        reason: String,
    },

    /// A backend name that is none of `host`, `nccl`, `nixl`, `auto`.
    #[error("unknown EPLB backend {name:?}: expected one of host, nccl, nixl, auto")]
    UnknownBackend {
        /// The name given.
        name: String,
    },

    /// The `nixl` backend was asked for, but the NIXL runtime cannot be loaded.
    #[error("the nixl EPLB backend was requested but NIXL is not available: {detail}")]
    NixlUnavailable {
        /// What the probe found.
        detail: String,
    },

    /// A NIXL call failed.
    #[error("rank {rank}{}: NIXL {op} failed: {detail}", AtLayer(.layer))]
    Nixl {
        /// This rank.
        rank: usize,
        /// The layer, if the call concerned one.
        layer: Option<usize>,
        /// The peer (EPLB-group rank) the call concerned, if one: the peer a failed or late
        /// READ was reading from, or whose description or outcome was bad. The message
        /// names it too.
        peer: Option<usize>,
        /// The call or step.
        op: String,
        /// NIXL's status and anything else known.
        detail: String,
    },

    /// The staging memory a backend lends to staged layers (the `nixl` backend's registered
    /// landing area) is still held by staged layers that were neither committed nor
    /// dropped, so this layer cannot be staged without overwriting theirs. Found before any
    /// byte moved; the communicator stays usable.
    #[error("rank {rank}, layer {layer}: the staging memory ({slots} slot(s)) is still held by the staged layer(s) {held_by:?}; commit or drop them before transferring another layer, or give the communicator more staging slots")]
    StagingInUse {
        /// This rank.
        rank: usize,
        /// The layer asked for.
        layer: usize,
        /// The layers whose staged rows hold the memory.
        held_by: Vec<usize>,
        /// Slots the communicator has.
        slots: usize,
    },

    /// Staging memory could not be allocated.
    #[error(
        "rank {rank}, layer {layer}: cannot allocate {bytes} bytes of staging memory: {source}"
    )]
    Staging {
        /// This rank.
        rank: usize,
        /// The layer.
        layer: usize,
        /// Bytes asked for.
        bytes: usize,
        /// The allocator's error.
        #[source]
        source: HostBufferError,
    },

    /// A backend that moves device memory met a tensor outside CUDA device memory.
    #[error("tensor {tensor:?} lives in {device} memory, but {what} needs CUDA device memory")]
    NotDeviceMemory {
        /// The tensor.
        tensor: String,
        /// Where it lives.
        device: Device,
        /// What needed device memory.
        what: &'static str,
    },

    /// A CUDA driver call failed: a device or page-locked allocation, a copy, a stream.
    #[error("rank {rank}{}: {source}", AtLayer(.layer))]
    Cuda {
        /// This rank.
        rank: usize,
        /// The layer, if the call concerned one.
        layer: Option<usize>,
        /// The driver's error, naming the operation and the device.
        #[source]
        source: CudaError,
    },

    /// Copies queued on a GPU did not finish before the deadline.
    #[error("rank {rank}{}: deadline expired while the GPU was {op}", AtLayer(.layer))]
    DeviceTimeout {
        /// This rank.
        rank: usize,
        /// The layer, if the copies concerned one.
        layer: Option<usize>,
        /// What the GPU was doing.
        op: String,
    },

    /// A NCCL operation failed or did not finish before its deadline; the NCCL
    /// communicator was aborted (a new EPLB communicator is needed).
    #[cfg(feature = "cuda")]
    #[error("rank {rank}{}: NCCL {op} failed: {source}", AtLayer(.layer))]
    Nccl {
        /// This rank.
        rank: usize,
        /// The layer, if the operation concerned one.
        layer: Option<usize>,
        /// The step, e.g. "exchanging rows".
        op: String,
        /// NCCL's error, naming the peers waited for.
        #[source]
        source: Box<moeshift_device_comm::nccl::NcclError>,
    },

    /// A peer could not set up its side of a backend and said why; nothing was built.
    #[error("rank {rank}: peer rank {peer} could not set up the {backend} EPLB backend: {reason}")]
    PeerSetupFailed {
        /// This rank.
        rank: usize,
        /// The peer that failed.
        peer: usize,
        /// The backend.
        backend: Backend,
        /// Its error.
        reason: String,
    },

    /// [`StagedLayer::commit`](crate::StagedLayer::commit) was given weights that do not
    /// match the ones the layer was staged for. Nothing was written.
    #[error("rank {rank}, layer {layer}: cannot commit into these weights: {detail}")]
    CommitMismatch {
        /// This rank.
        rank: usize,
        /// The layer.
        layer: usize,
        /// What differs.
        detail: String,
    },
}

impl EplbCommError {
    /// True when the error left the communicator unusable: the transport failed (a lost or
    /// aborting peer, an expired deadline, mismatched calls), so its group is poisoned and a
    /// new communicator is needed. Errors found before any byte moved (a plan mismatch, a
    /// refusing peer, invalid weights) leave every rank in step and the communicator usable.
    pub fn poisons_communicator(&self) -> bool {
        matches!(
            self,
            Self::DeadlineExpired { .. }
                | Self::PeerLost { .. }
                | Self::PeerAborted { .. }
                | Self::Transport { .. }
                | Self::WireMismatch { .. }
                | Self::CommunicatorFailed { .. }
                | Self::Nixl { .. }
                | Self::Cuda { .. }
                | Self::DeviceTimeout { .. }
        ) || self.is_nccl()
    }

    #[cfg(feature = "cuda")]
    fn is_nccl(&self) -> bool {
        matches!(self, Self::Nccl { .. })
    }

    #[cfg(not(feature = "cuda"))]
    fn is_nccl(&self) -> bool {
        false
    }

    /// The peer this error is about, if one (EPLB-group rank).
    pub fn peer(&self) -> Option<usize> {
        match self {
            Self::LayoutMismatch { peer, .. }
            | Self::PeerRefused { peer, .. }
            | Self::WireMismatch { peer, .. }
            | Self::PeerLost { peer, .. }
            | Self::PeerAborted { peer, .. }
            | Self::PeerSetupFailed { peer, .. } => Some(*peer),
            Self::PlanDigestMismatch { peers, .. } => peers.first().copied(),
            Self::Nixl { peer, .. } => *peer,
            Self::DeadlineExpired { waiting_for, .. } => waiting_for.first().copied(),
            #[cfg(feature = "cuda")]
            Self::Nccl { source, .. } => match source.as_ref() {
                moeshift_device_comm::nccl::NcclError::Timeout { peers, .. }
                | moeshift_device_comm::nccl::NcclError::Call { peers, .. } => {
                    peers.first().copied()
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// Wraps a transport error of operation `op` on this `rank`, naming the peer it concerns.
    pub(crate) fn from_comm(
        rank: usize,
        layer: Option<usize>,
        op: String,
        source: CommError,
    ) -> Self {
        match &source {
            CommError::PeerLost { peer, .. } => Self::PeerLost {
                rank,
                layer,
                peer: peer.local,
                op,
                source: Box::new(source),
            },
            CommError::PeerAborted { peer, .. } => Self::PeerAborted {
                rank,
                layer,
                peer: peer.local,
                op,
                source: Box::new(source),
            },
            CommError::Timeout { waiting_for, .. } => Self::DeadlineExpired {
                rank,
                layer,
                waiting_for: waiting_for.iter().map(|r| r.local).collect(),
                op,
                source: Box::new(source),
            },
            _ => Self::Transport {
                rank,
                layer,
                op,
                source: Box::new(source),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_rank_peer_layer_expert_and_tensor() {
        let e = EplbCommError::WireMismatch {
            rank: 1,
            layer: 7,
            peer: 3,
            round: 2,
            expert: Some(42),
            tensor: Some("w2".into()),
            detail: "expected 128 bytes, got 64".into(),
        };
        let text = e.to_string();
        for part in [
            "rank 1",
            "layer 7",
            "round 2",
            "peer rank 3",
            "expert 42",
            "\"w2\"",
            "128 bytes",
        ] {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }
        let e = EplbCommError::LayoutMismatch {
            rank: 0,
            peer: 2,
            layer: Some(5),
            tensor: Some("w13".into()),
            detail: "dtype bfloat16 here, float16 there".into(),
        };
        let text = e.to_string();
        for part in ["rank 0", "peer rank 2", "layer 5", "\"w13\"", "bfloat16"] {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }
        let e = EplbCommError::LayoutMismatch {
            rank: 0,
            peer: 2,
            layer: None,
            tensor: None,
            detail: "4 layers here, 3 there".into(),
        };
        assert!(e.to_string().contains("the layer list"), "{e}");
        let e = EplbCommError::PlanDigestMismatch {
            rank: 0,
            layer: 4,
            peers: vec![3],
            ours: 1,
            theirs: 2,
        };
        let text = e.to_string();
        assert!(
            text.contains("[3]") && text.contains("on rank 3") && text.contains("layer 4"),
            "{text}"
        );
        assert_eq!(e.peer(), Some(3));
        assert!(!e.poisons_communicator());
    }

    #[test]
    fn nixl_errors_name_their_peer_and_busy_staging_does_not_poison() {
        let e = EplbCommError::Nixl {
            rank: 1,
            layer: Some(4),
            peer: Some(2),
            op: "READ of expert(s) [7] from peer rank 2".into(),
            detail: "backend error".into(),
        };
        assert_eq!(e.peer(), Some(2));
        assert!(e.poisons_communicator());
        let e = EplbCommError::Nixl {
            rank: 1,
            layer: None,
            peer: None,
            op: "registering the landing area".into(),
            detail: "out of memory".into(),
        };
        assert_eq!(e.peer(), None);

        let e = EplbCommError::StagingInUse {
            rank: 0,
            layer: 5,
            held_by: vec![4],
            slots: 1,
        };
        let text = e.to_string();
        for part in ["rank 0", "layer 5", "[4]", "1 slot"] {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }
        assert!(!e.poisons_communicator());
        assert_eq!(e.peer(), None);
    }
}
