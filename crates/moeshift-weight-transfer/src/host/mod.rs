//! The `host` engine: weight transfer over the host (TCP) transport, between host buffers.
//!
//! The trainer is rank 0 of a [`HostGroup`](moeshift_device_comm::HostGroup); every other rank is a worker. It serves CPU
//! users, tests, and machines without NCCL; the NCCL and CUDA-IPC engines follow the same
//! protocol shape with device payloads.
//!
//! # Protocol (one session)
//!
//! The control protocol every engine shares (see the crate docs). For each update:
//!
//! 1. **Announce**: the trainer's JSON control message: session and update numbers, the
//!    [`UpdateInfo`](crate::UpdateInfo) and the [`metadata_digest`](crate::metadata_digest)
//!    of the update's parameters. The first update's announcement is broadcast; every later
//!    one rides on the status round of the update before it.
//! 2. **Vote**: every rank all-gathers "accept" or "refuse: reason". A worker refuses when
//!    the info is invalid, the metadata digest differs from its own resolution, or the
//!    update does not match its registry. One refusal and every rank abandons the update
//!    ([`TransferError::PeersFailed`](crate::TransferError::PeersFailed) names who refused
//!    and why); nothing is sent.
//! 3. **Payload**: the trainer sends to each worker, in update order:
//!    * dense: one message per parameter (its bytes);
//!    * packed: per chunk, the encoded [`ChunkHeader`](crate::ChunkHeader) then the chunk
//!      payload; the worker checks each header against its own plan (its own
//!      `packed_buffer_size_bytes`);
//!    * sparse: one message per parameter, its int32 indices (little-endian) then its
//!      values.
//!
//!    Workers stage everything. A worker that finds a problem here (a chunk header that
//!    differs from its plan, a patch index out of range) keeps receiving, discarding, so
//!    that the stream stays in step, and reports the problem in the next phase.
//! 4. **Status**: every rank all-gathers "ready" or "failed: reason" (the trainer's status
//!    carries the next announcement, or the end of the session after the last update).
//!    Only if every rank is ready do the workers apply what they staged; otherwise no
//!    worker applies anything.
//!
//! A refusal moves no payload, so this engine keeps the vote before the payload: per
//! update, two host rounds (vote and status) plus the payload messages, and one broadcast
//! per session for the first announcement.
//!
//! # Staging and memory
//!
//! Every update is staged whole before any byte is applied, so a failed update (a dead
//! trainer, a missed deadline, a refusal anywhere) leaves every worker's weights exactly as
//! they were, and either all workers apply an update or none does. The price is host memory
//! equal to the update's payload on each worker, on top of the weights. A trainer that must
//! bound it splits a large dense transfer into several updates of one session (each update is
//! atomic on its own; the session as a whole is not). Sparse updates stage only their
//! patches.
//!
//! A transport failure (a dead peer, a passed deadline) breaks the group: the caller builds
//! a new one. Refusals and staging failures do not; the group stays usable.

use crate::packing::DEFAULT_PACKED_BUFFER_SIZE_BYTES;

mod trainer;
mod worker;

pub use crate::control::TRAINER_RANK;
pub use crate::progress::Progress;
pub use trainer::HostTrainer;
pub use worker::HostWorker;

/// Settings of the host engine, on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostConfig {
    /// Chunk size for packed dense updates (default 1 GiB). Trainer and workers plan chunks
    /// with their own value; a difference shows as a chunk header mismatch naming the tensor.
    pub packed_buffer_size_bytes: usize,
    /// Trainer: whether [`TrainerEngine::send_dense`](crate::TrainerEngine::send_dense) packs (default true).
    pub packed: bool,
    /// Trainer: announce "reuse the previous metadata" (empty lists) when a dense update
    /// has exactly the parameters of the previous successful dense update (default true).
    pub reuse_metadata: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            packed_buffer_size_bytes: DEFAULT_PACKED_BUFFER_SIZE_BYTES,
            packed: true,
            reuse_metadata: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config() {
        let c = HostConfig::default();
        assert_eq!(c.packed_buffer_size_bytes, 1 << 30);
        assert!(c.packed && c.reuse_metadata);
    }
}
