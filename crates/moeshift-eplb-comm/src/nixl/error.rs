//! [`NixlError`]: what can go wrong in the NIXL backend specifically, converted into
//! [`EplbCommError`] at the trait boundary.
//!
//! Every variant names the rank that reports it (its rank in the EPLB group) and, where one
//! is involved, the peer, the layer and the experts.

use std::time::Duration;

use crate::comm::Backend;
use crate::error::EplbCommError;

/// Errors of the NIXL backend. They convert into [`EplbCommError`]
/// ([`EplbCommError::NixlUnavailable`] or [`EplbCommError::Nixl`], whose message keeps the
/// peer, layer and experts named here).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NixlError {
    /// The NIXL runtime cannot be loaded (see [`probe`](super::probe)).
    #[error("NIXL is not available: {detail}")]
    Unavailable {
        /// What the probe found.
        detail: String,
    },

    /// The environment or the configuration cannot work (e.g. `UCX_TLS` without `tcp`).
    #[error("rank {rank}: unusable NIXL configuration: {detail}")]
    Config {
        /// This rank.
        rank: usize,
        /// What is wrong and how to fix it.
        detail: String,
    },

    /// The weights cannot be served by this backend (e.g. device memory in a build that
    /// cannot stage it).
    #[error("rank {rank}, layer {layer}, tensor {tensor:?}: {detail}")]
    Unsupported {
        /// This rank.
        rank: usize,
        /// The layer.
        layer: usize,
        /// The tensor.
        tensor: String,
        /// What is not supported.
        detail: String,
    },

    /// A NIXL call failed.
    #[error("rank {rank}: NIXL {op} failed: {status}")]
    Call {
        /// This rank.
        rank: usize,
        /// The call and what it was for.
        op: String,
        /// NIXL's status.
        status: String,
    },

    /// A peer could not set up its side of the backend and said why.
    #[error("rank {rank}: peer rank {peer} could not set up NIXL: {reason}")]
    PeerSetupFailed {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// The peer's own error.
        reason: String,
    },

    /// A peer's published description cannot be decoded (another version, or corruption).
    #[error(
        "rank {rank}: the NIXL description of peer rank {peer} ({bytes} bytes) cannot be decoded"
    )]
    BadPeerDescription {
        /// This rank.
        rank: usize,
        /// The peer.
        peer: usize,
        /// Its size.
        bytes: usize,
    },

    /// The warm-up READ from a peer (while the communicator is built) failed or did not
    /// complete in time.
    #[error("rank {rank}: warm-up READ from peer rank {peer} failed: {detail}")]
    WarmUpFailed {
        /// This rank.
        rank: usize,
        /// The peer read from.
        peer: usize,
        /// NIXL's status, or how long it waited.
        detail: String,
    },

    /// A one-sided READ from a peer failed.
    #[error("rank {rank}, layer {layer}: READ of expert(s) {experts:?} from peer rank {peer} failed: {detail}")]
    ReadFailed {
        /// This rank.
        rank: usize,
        /// The layer.
        layer: usize,
        /// The peer read from.
        peer: usize,
        /// The experts of the failed request.
        experts: Vec<usize>,
        /// NIXL's status.
        detail: String,
    },

    /// A one-sided READ from a peer had not completed when its deadline passed; the request
    /// was released.
    #[error("rank {rank}, layer {layer}: READ of expert(s) {experts:?} from peer rank {peer} did not complete within {waited:.1?} (deadline)")]
    ReadTimeout {
        /// This rank.
        rank: usize,
        /// The layer.
        layer: usize,
        /// The peer read from.
        peer: usize,
        /// The experts still outstanding.
        experts: Vec<usize>,
        /// How long the READs ran.
        waited: Duration,
    },

    /// A peer's READs for the layer failed (it reported so in the post-read check), so no
    /// rank commits the layer.
    #[error("rank {rank}, layer {layer}: peer rank {peer} could not read its rows: {reason}")]
    PeerReadFailed {
        /// This rank.
        rank: usize,
        /// The layer.
        layer: usize,
        /// The peer.
        peer: usize,
        /// The peer's own error.
        reason: String,
    },
}

impl NixlError {
    /// The peer this error is about, if one.
    pub fn peer(&self) -> Option<usize> {
        match self {
            Self::PeerSetupFailed { peer, .. }
            | Self::BadPeerDescription { peer, .. }
            | Self::WarmUpFailed { peer, .. }
            | Self::ReadFailed { peer, .. }
            | Self::ReadTimeout { peer, .. }
            | Self::PeerReadFailed { peer, .. } => Some(*peer),
            _ => None,
        }
    }

    /// The fields of [`EplbCommError::Nixl`]; `None` for [`NixlError::Unavailable`], which
    /// has its own variant.
    fn parts(&self) -> Option<Parts> {
        let peer = self.peer();
        let (rank, layer, op, detail) = match self {
            Self::Unavailable { .. } => return None,
            Self::Config { rank, detail } => (*rank, None, "configuration".into(), detail.clone()),
            Self::Unsupported {
                rank,
                layer,
                tensor,
                detail,
            } => (
                *rank,
                Some(*layer),
                format!("registration of tensor {tensor:?}"),
                detail.clone(),
            ),
            Self::Call { rank, op, status } => (*rank, None, op.clone(), status.clone()),
            Self::PeerSetupFailed { rank, peer, reason } => (
                *rank,
                None,
                "setup".into(),
                format!("peer rank {peer} could not set up NIXL: {reason}"),
            ),
            Self::BadPeerDescription { rank, peer, bytes } => (
                *rank,
                None,
                "setup".into(),
                format!("the description of peer rank {peer} ({bytes} bytes) cannot be decoded"),
            ),
            Self::WarmUpFailed { rank, peer, detail } => (
                *rank,
                None,
                format!("warm-up READ from peer rank {peer}"),
                detail.clone(),
            ),
            Self::ReadFailed {
                rank,
                layer,
                peer,
                experts,
                detail,
            } => (
                *rank,
                Some(*layer),
                format!("READ of expert(s) {experts:?} from peer rank {peer}"),
                detail.clone(),
            ),
            Self::ReadTimeout {
                rank,
                layer,
                peer,
                experts,
                waited,
            } => (
                *rank,
                Some(*layer),
                format!("READ of expert(s) {experts:?} from peer rank {peer}"),
                format!("not complete within {waited:.1?} (deadline); the request was released"),
            ),
            Self::PeerReadFailed {
                rank,
                layer,
                peer,
                reason,
            } => (
                *rank,
                Some(*layer),
                "post-read check".into(),
                format!("peer rank {peer} could not read its rows: {reason}"),
            ),
        };
        Some(Parts {
            rank,
            layer,
            peer,
            op,
            detail,
        })
    }
}

/// The fields of [`EplbCommError::Nixl`].
struct Parts {
    rank: usize,
    layer: Option<usize>,
    peer: Option<usize>,
    op: String,
    detail: String,
}

impl From<NixlError> for EplbCommError {
    fn from(e: NixlError) -> Self {
        if let NixlError::PeerSetupFailed { rank, peer, reason } = e {
            return EplbCommError::PeerSetupFailed {
                rank,
                peer,
                backend: Backend::Nixl,
                reason,
            };
        }
        match e.parts() {
            Some(Parts {
                rank,
                layer,
                peer,
                op,
                detail,
            }) => EplbCommError::Nixl {
                rank,
                layer,
                peer,
                op,
                detail,
            },
            None => EplbCommError::NixlUnavailable {
                detail: match e {
                    NixlError::Unavailable { detail } => detail,
                    other => other.to_string(),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converted_errors_keep_rank_peer_layer_and_experts() {
        let e = NixlError::ReadTimeout {
            rank: 1,
            layer: 7,
            peer: 3,
            experts: vec![4, 9],
            waited: Duration::from_millis(2500),
        };
        assert_eq!(e.peer(), Some(3));
        let converted = EplbCommError::from(e);
        let text = converted.to_string();
        for part in ["rank 1", "layer 7", "peer rank 3", "[4, 9]", "2.5s"] {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }
        assert!(converted.poisons_communicator(), "{text}");
        assert_eq!(converted.peer(), Some(3), "{text}");

        let e = EplbCommError::from(NixlError::Unavailable {
            detail: "libnixl_capi.so is not in /x".into(),
        });
        assert!(matches!(e, EplbCommError::NixlUnavailable { .. }), "{e}");
        assert!(e.to_string().contains("/x"), "{e}");

        let e = EplbCommError::from(NixlError::PeerSetupFailed {
            rank: 0,
            peer: 2,
            reason: "registration failed".into(),
        });
        assert_eq!(e.peer(), Some(2));
        let text = e.to_string();
        for part in ["rank 0", "peer rank 2", "registration failed", "nixl"] {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }

        let e = EplbCommError::from(NixlError::ReadFailed {
            rank: 3,
            layer: 1,
            peer: 0,
            experts: vec![6],
            detail: "backend error".into(),
        });
        let text = e.to_string();
        for part in ["rank 3", "layer 1", "peer rank 0", "[6]", "backend error"] {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }
        // The cause appears once, not repeated by the wrapper.
        assert_eq!(text.matches("backend error").count(), 1, "{text}");
        // `peer()` names the peer of the failed READ.
        assert_eq!(e.peer(), Some(0), "{text}");

        let e = EplbCommError::from(NixlError::WarmUpFailed {
            rank: 2,
            peer: 1,
            detail: "not complete after 3.0s (deadline)".into(),
        });
        assert_eq!(e.peer(), Some(1));
        assert!(
            e.to_string().contains("warm-up READ from peer rank 1"),
            "{e}"
        );
        let e = EplbCommError::from(NixlError::Call {
            rank: 2,
            op: "creating the UCX backend".into(),
            status: "backend error".into(),
        });
        assert_eq!(e.peer(), None, "{e}");
    }
}
