//! [`TransferError`]: what engines, the worker lifecycle and the trainer side return.

use moeshift_device_comm::CommError;

use crate::digest::Digest;
use crate::info::InfoError;
use crate::meta::MetaError;
use crate::packing::PackError;
use crate::patch::PatchError;
use crate::registry::RegistryError;

/// Errors of a weight transfer. Each message names the rank, peer, parameter or field
/// involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// The update info is invalid.
    #[error(transparent)]
    Info(#[from] InfoError),
    /// Parameter metadata is invalid.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A sparse patch is invalid.
    #[error(transparent)]
    Patch(#[from] PatchError),
    /// Packing or a chunk header is wrong.
    #[error(transparent)]
    Pack(#[from] PackError),
    /// The update does not match the worker's registered parameters.
    #[error(transparent)]
    Registry(#[from] RegistryError),

    /// `start_update` while an update session is already active.
    #[error("a weight update session is already active; finish it before starting another")]
    AlreadyActive,
    /// A session operation without an active session.
    #[error("{operation} needs an active weight update session: call start_update first")]
    NotActive {
        /// The operation called.
        operation: &'static str,
    },
    /// The engine cannot do what was asked.
    #[error("the {engine} engine does not support {what}")]
    Unsupported {
        /// Engine name.
        engine: &'static str,
        /// What was asked.
        what: String,
    },
    /// An engine was set up wrongly (wrong rank for its role, a zero buffer size).
    #[error("weight transfer setup: {detail}")]
    Config {
        /// What is wrong.
        detail: String,
    },
    /// The update info the trainer sent differs from the one the worker was given.
    #[error(
        "rank {rank}: the trainer announced a different update than the worker was given: {detail}"
    )]
    InfoMismatch {
        /// The worker's rank.
        rank: usize,
        /// The first difference.
        detail: String,
    },
    /// The worker's resolved metadata differs from the trainer's.
    #[error(
        "rank {rank}: metadata disagreement: the trainer's parameters digest to {trainer}, \
         this worker resolved {worker}{}",
        if *.reused { " (the update reused the previous metadata)" } else { "" }
    )]
    MetadataMismatch {
        /// The worker's rank.
        rank: usize,
        /// The trainer's digest.
        trainer: Digest,
        /// The worker's digest.
        worker: Digest,
        /// The update said "reuse the previous metadata".
        reused: bool,
    },
    /// The host transport failed (a peer died, a deadline passed, the group broke).
    #[error("rank {rank}: {during}: {source}")]
    Comm {
        /// This process's rank in the transfer group.
        rank: usize,
        /// What the engine was doing, e.g. "receiving the values of 'layers.0.w'".
        during: String,
        /// The transport's error (boxed: it is large, and errors travel by value).
        #[source]
        source: Box<CommError>,
    },
    /// A peer sent something the protocol does not allow here.
    #[error("rank {rank}: protocol error from rank {peer}: {detail}")]
    Protocol {
        /// This process's rank.
        rank: usize,
        /// The peer that sent it.
        peer: usize,
        /// What was wrong.
        detail: String,
    },
    /// A payload has the wrong size for its parameter.
    #[error(
        "rank {rank}: {what} of parameter '{name}': expected {expected} bytes, received {got}"
    )]
    PayloadLength {
        /// This process's rank.
        rank: usize,
        /// The parameter.
        name: String,
        /// What the payload was ("dense values", "sparse indices and values").
        what: &'static str,
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// A registered parameter's memory cannot be used by this engine (another device, a
    /// misaligned address).
    #[error("rank {rank}: parameter '{name}': {detail}")]
    Storage {
        /// This process's rank.
        rank: usize,
        /// The parameter.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// A NCCL operation failed or passed its deadline (the communicator is then aborted and
    /// the engine must be rebuilt).
    #[cfg(feature = "cuda")]
    #[error("rank {rank}: {during}: {source}")]
    Nccl {
        /// This process's rank in the transfer group.
        rank: usize,
        /// What the engine was doing.
        during: String,
        /// NCCL's error.
        #[source]
        source: Box<moeshift_device_comm::nccl::NcclError>,
    },
    /// A CUDA driver call failed.
    #[cfg(feature = "cuda")]
    #[error("rank {rank} (cuda:{device}): {during}: {source}")]
    Cuda {
        /// This process's rank in the transfer group.
        rank: usize,
        /// The device ordinal.
        device: usize,
        /// What the engine was doing.
        during: String,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// Ranks refused or failed the update. Whether any rank applied part of it is the
    /// engine's documented staging rule (the host engine: none did).
    #[error("rank {rank}: update {update} of session {session} was abandoned: {}", describe_failures(.failures))]
    PeersFailed {
        /// This process's rank.
        rank: usize,
        /// Session number.
        session: u64,
        /// Update number within the session.
        update: u32,
        /// `(rank, reason)` for every rank that refused or failed.
        failures: Vec<(usize, String)>,
    },
}

fn describe_failures(failures: &[(usize, String)]) -> String {
    let parts: Vec<String> = failures
        .iter()
        .map(|(rank, reason)| format!("rank {rank}: {reason}"))
        .collect();
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_failed_lists_every_rank() {
        let e = TransferError::PeersFailed {
            rank: 0,
            session: 3,
            update: 1,
            failures: vec![(1, "unknown parameter 'x'".into()), (2, "shape".into())],
        };
        let text = e.to_string();
        assert!(text.contains("rank 1: unknown parameter 'x'"), "{text}");
        assert!(
            text.contains("rank 2: shape") && text.contains("session 3"),
            "{text}"
        );
    }
}
