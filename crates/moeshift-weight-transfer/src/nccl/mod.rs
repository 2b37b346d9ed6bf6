//! The `nccl` engine (feature `cuda`): trainer → workers over a dedicated NCCL group, with
//! the control channel (announcements, votes, chunk headers, status rounds) over a
//! [`HostGroup`].
//!
//! # The group
//!
//! The trainer is NCCL rank 0; a worker with index `i` is NCCL rank `rank_offset + i`
//! (`rank_offset` is 1 for one inference engine; several engines sharing one trainer give
//! each engine its own offset). The control group is formed by the caller with its members
//! ordered by NCCL rank, so control rank and NCCL rank are the same number; the NCCL world
//! size is the control group's size. The communicator is created through the rendezvous
//! store: the trainer draws a fresh key (a store counter, told to the workers over the
//! control group), stores a NCCL unique id under it, and everyone joins with a deadline.
//!
//! # Protocol (one session)
//!
//! The session shape of the [`host`](crate::host) engine: per update an announcement (JSON
//! info + metadata digest) and a vote over the control group, then the payload over NCCL,
//! then a status round; an end marker closes the session. Payloads:
//!
//! * **dense** (`packed = false`): one broadcast per parameter, from the trainer's memory
//!   straight into the worker's live parameter;
//! * **packed**: chunks planned by [`plan_chunks`](crate::plan_chunks) with
//!   `packed_buffer_size_bytes` (default 1 GiB). Per chunk the trainer first sends the
//!   explicit [`ChunkHeader`](crate::ChunkHeader) over the control group (small), so each
//!   worker checks the chunk's tensor list against its own plan before the payload; then
//!   the payload is broadcast from one of two chunk buffers. Two buffers on two streams let
//!   the trainer pack chunk k+1 while chunk k is on the wire, and the worker unpack chunk k
//!   while chunk k+1 arrives. A worker whose plan disagrees still takes part in every
//!   broadcast (sized by the trainer's header, so the collective stays matched), applies
//!   nothing more, and reports the mismatch in the status round;
//! * **sparse**: per parameter, the int32 indices then the values (two broadcasts) into one
//!   device staging area for the whole update. The worker then checks every index of the
//!   update with one kernel and one device-to-host copy (see [`crate::device`]); the
//!   status round tells every rank whether all workers passed, and only then does each
//!   worker scatter the values into its parameters.
//!
//! # What a failure leaves behind
//!
//! NCCL cannot stage for free, so the guarantees depend on the payload:
//!
//! * **dense**: parameters are written in place. A trainer that dies (or a deadline that
//!   passes) in the middle of a parameter's broadcast leaves **that parameter partially
//!   written**, the ones before it updated and the ones after it untouched;
//! * **packed**: a chunk is unpacked only after all of it arrived and its header matched,
//!   so no parameter is ever partially written: a failure leaves the chunks before it
//!   applied and the rest untouched;
//! * **sparse**: staged whole, checked, and applied only when every worker is ready: all
//!   workers apply the update or none does, and a failure before the status round changes
//!   nothing.
//!
//! A refusal at the vote (unknown parameter, a parameter on another GPU) moves no payload
//! and leaves the engine usable. A NCCL failure or a passed deadline aborts the
//! communicator (nothing can hang); the engine then refuses further sessions and must be
//! rebuilt (see [`NcclTrainer::is_broken`]).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use moeshift_device_comm::nccl::NcclComm;
use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;

use crate::control::TRAINER_RANK;
use crate::device::kernels::Kernels;
use crate::device::memory::DeviceAlloc;
use crate::device::sparse::SparseStage;
use crate::device::{context, mem_error};
use crate::error::TransferError;
use crate::packing::{PackError, DEFAULT_PACKED_BUFFER_SIZE_BYTES};

mod trainer;
mod worker;

pub use trainer::NcclTrainer;
pub use worker::NcclWorker;

/// Settings of the NCCL engine, on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NcclConfig {
    /// NCCL rank of worker index 0 (default 1: right after the trainer).
    pub rank_offset: usize,
    /// Chunk size for packed dense updates (default 1 GiB). Trainer and workers plan chunks
    /// with their own value; a difference shows as a chunk header mismatch naming the tensor.
    pub packed_buffer_size_bytes: usize,
    /// Trainer: whether [`TrainerEngine::send_dense`](crate::TrainerEngine::send_dense) packs
    /// (default true).
    pub packed: bool,
    /// Trainer: announce "reuse the previous metadata" when a dense update has exactly the
    /// parameters of the previous successful dense update (default true).
    pub reuse_metadata: bool,
}

impl Default for NcclConfig {
    fn default() -> Self {
        Self {
            rank_offset: 1,
            packed_buffer_size_bytes: DEFAULT_PACKED_BUFFER_SIZE_BYTES,
            packed: true,
            reuse_metadata: true,
        }
    }
}

impl NcclConfig {
    /// Checks the settings for a group of `world` ranks.
    pub(crate) fn check(&self, world: usize) -> Result<(), TransferError> {
        if self.packed_buffer_size_bytes == 0 {
            return Err(PackError::ZeroBufferSize.into());
        }
        if self.rank_offset == 0 || self.rank_offset >= world.max(1) {
            return Err(TransferError::Config {
                detail: format!(
                    "rank_offset {} is not a worker rank of a group of {world} (the trainer is \
                     rank {TRAINER_RANK}; workers are ranks 1..{world})",
                    self.rank_offset
                ),
            });
        }
        Ok(())
    }

    /// The NCCL rank of worker `index`, which must be this process's control rank.
    pub(crate) fn worker_rank(
        &self,
        index: usize,
        group: &HostGroup,
    ) -> Result<usize, TransferError> {
        let rank = self.rank_offset.saturating_add(index);
        if rank != group.rank() || rank >= group.size() {
            return Err(TransferError::Config {
                detail: format!(
                    "worker index {index} with rank_offset {} is NCCL rank {rank}, but this \
                     process is rank {} of the control group {:?} of {} ranks: order the \
                     group's members by NCCL rank",
                    self.rank_offset,
                    group.rank(),
                    group.name(),
                    group.size()
                ),
            });
        }
        Ok(rank)
    }
}

/// What both ends of the engine set up on their GPU besides the control channel.
struct DeviceSide {
    comm: NcclComm,
    /// A second stream: packing (trainer) or unpacking (worker) runs there, overlapping the
    /// broadcasts on the communicator's stream.
    stream: Arc<CudaStream>,
    /// One event per chunk buffer, ordering its packing or unpacking with the broadcasts.
    /// Fresh events count as complete, so the first use of a buffer waits for nothing.
    events: [CudaEvent; 2],
    /// The sparse staging area, on `stream`.
    stage: SparseStage,
}

impl DeviceSide {
    /// Joins the communicator as NCCL rank `nccl_rank` on CUDA device `device` (see
    /// [`connect`]), then creates the second stream (`stream_what` names it in errors), the
    /// kernels, the events and the staging area.
    fn open(
        group: &HostGroup,
        nccl_rank: usize,
        device: usize,
        stream_what: &'static str,
        deadline: Deadline,
    ) -> Result<Self, TransferError> {
        let ctx = context(device, nccl_rank)?;
        let comm = connect(group, nccl_rank, device, deadline)?;
        let cuda = |during: &'static str| {
            move |source| TransferError::Cuda {
                rank: nccl_rank,
                device,
                during: during.into(),
                source,
            }
        };
        let stream = ctx.new_stream().map_err(cuda(stream_what))?;
        let kernels = Kernels::load(&ctx).map_err(cuda("loading the kernels"))?;
        let event = || ctx.new_event(None).map_err(cuda("creating an event"));
        let events = [event()?, event()?];
        let stage = SparseStage::new(Arc::clone(&stream), kernels);
        Ok(Self {
            comm,
            stream,
            events,
            stage,
        })
    }
}

/// Grows a chunk buffer to at least `len` bytes on `ctx` (a smaller one is freed first).
/// `rank` and `device` name this end in errors.
fn grow_chunk_buffer(
    buffer: &mut Option<DeviceAlloc>,
    ctx: &Arc<CudaContext>,
    len: usize,
    rank: usize,
    device: usize,
) -> Result<(), TransferError> {
    if buffer.as_ref().is_none_or(|s| s.len() < len) {
        *buffer = None;
        let alloc = DeviceAlloc::new(ctx, len).map_err(|e| {
            mem_error(
                rank,
                device,
                format!("allocating a {len}-byte chunk buffer"),
            )(e.into())
        })?;
        *buffer = Some(alloc);
    }
    Ok(())
}

/// Creates the transfer group's communicator: the trainer draws a fresh store key and tells
/// the workers over the control group; everyone joins through the store.
fn connect(
    group: &HostGroup,
    nccl_rank: usize,
    device: usize,
    deadline: Deadline,
) -> Result<NcclComm, TransferError> {
    let rank = group.rank();
    let base = format!(
        "moeshift/weight-transfer/nccl/{}/{}",
        group.name(),
        group.id()
    );
    let comm_err = |during: &str| {
        let during = during.to_string();
        move |source| TransferError::Comm {
            rank,
            during,
            source: Box::new(source),
        }
    };
    let epoch = if rank == TRAINER_RANK {
        let epoch = group
            .store()
            .add(&format!("{base}/epoch"), 1, deadline)
            .map_err(comm_err("drawing a communicator key"))?;
        group
            .broadcast_bytes(TRAINER_RANK, Some(&epoch.to_le_bytes()), deadline)
            .map_err(comm_err("telling the workers the communicator key"))?;
        epoch
    } else {
        let bytes = group
            .broadcast_bytes(TRAINER_RANK, None, deadline)
            .map_err(comm_err("waiting for the communicator key"))?;
        let raw: [u8; 8] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| TransferError::Protocol {
                rank,
                peer: TRAINER_RANK,
                detail: format!("communicator key of {} bytes, expected 8", bytes.len()),
            })?;
        i64::from_le_bytes(raw)
    };
    NcclComm::from_store(
        group.store(),
        nccl_rank,
        group.size(),
        &format!("{base}/{epoch}/id"),
        device,
        deadline,
    )
    .map_err(|source| TransferError::Nccl {
        rank,
        during: format!("creating the NCCL communicator on cuda:{device}"),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks() {
        let c = NcclConfig::default();
        assert_eq!(c.rank_offset, 1);
        assert_eq!(c.packed_buffer_size_bytes, 1 << 30);
        assert!(c.check(2).is_ok());
        assert!(c.check(1).is_err(), "a group of one has no worker");
        let zero = NcclConfig {
            rank_offset: 0,
            ..c
        };
        assert!(zero
            .check(4)
            .unwrap_err()
            .to_string()
            .contains("rank_offset 0"));
        let no_buffer = NcclConfig {
            packed_buffer_size_bytes: 0,
            ..c
        };
        assert!(matches!(
            no_buffer.check(3),
            Err(TransferError::Pack(PackError::ZeroBufferSize))
        ));
    }
}
