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
//! The control protocol every engine shares (see the crate docs): the first announcement
//! is broadcast over the control group, each later one rides on the status round of the
//! update before it, and the last status round carries the end of the session. Per update:
//!
//! * **dense** (`packed = false`): vote, then the parameters straight from the trainer's
//!   memory into the workers' live parameters, grouped: consecutive parameters, at most
//!   [`DENSE_GROUP_PARAMS`] and [`DENSE_GROUP_BYTES`] a group (a larger parameter goes
//!   alone), are broadcast in one NCCL group (one launch, one wait). Both sides derive the
//!   groups from the update's metadata alone, so they always match. Trainer values in host
//!   memory (or overlapping another of the group) go through a device buffer first; then
//!   the status round;
//! * **packed**: vote, then chunks planned by [`plan_chunks`](crate::plan_chunks) with
//!   `packed_buffer_size_bytes` (default 1 GiB). Per chunk the trainer first sends the
//!   explicit [`ChunkHeader`](crate::ChunkHeader) over the control group (one message, no
//!   round), so each worker checks the chunk's tensor list against its own plan before the
//!   payload; then the payload is broadcast from one of two chunk buffers. Two buffers on
//!   two streams let the trainer pack chunk k+1 while chunk k is on the wire, and the
//!   worker unpack chunk k while chunk k+1 arrives. The last chunk stays in its buffer until
//!   the status round: a worker unpacks it only once every rank said ok. A worker whose
//!   plan disagrees still takes part in every broadcast (sized by the trainer's header, so
//!   the collective stays matched), applies nothing more, and reports the mismatch in the
//!   status round;
//! * **sparse**: staged, with no vote. The announcement says how large the update's two
//!   arrays are (all indices, then all values, laid out by
//!   [`SparseLayout`](crate::sparse_layout::SparseLayout)); the trainer stages every patch
//!   on its packing stream (all device patches with one gather kernel, host patches by
//!   upload) and broadcasts both arrays in one NCCL group right after the announcement. Every worker
//!   receives them into its own staging area as soon as it read the announcement, whatever
//!   it then decides, so the collective always matches. Only then does it check the
//!   announcement and its registry, and check every index of the update with one kernel
//!   and one device-to-host copy (see [`crate::device`]). The status round is the vote and
//!   the check at once: when every rank said ok, each worker scatters all the values into
//!   its parameters with one kernel launch.
//!
//! Per update, before and after this layout (one trainer, `n` parameters, `c` chunks, `g`
//! dense groups: one for up to 1 GiB in up to 128 parameters):
//!
//! | update | host rounds | NCCL waits | trainer staging | worker syncs |
//! | --- | --- | --- | --- | --- |
//! | dense, before | announce, vote, status (+ end) | `n` | — | — |
//! | dense, now | vote, status (+ first announce) | `g` | — | — |
//! | packed, before | announce, vote, status (+ end); `c` header messages | `c` | `c` packs | 1 |
//! | packed, now | vote, status (+ first announce); `c` header messages | `c` | `c` packs | 2 |
//! | sparse, before | announce, vote, status (+ end) | `2 n` | `2 n` copies (host patches) | 2 (check, scatter) |
//! | sparse, now | status (+ first announce) | 1 | 1 kernel (device patches) | 2 (check, scatter) |
//!
//! "+ first announce" is one broadcast per session; "+ end" was one per session too. Each
//! session also starts with one device synchronisation on each side (pending work on the
//! trainer's sources and on the workers' parameters).
//!
//! # What a failure leaves behind
//!
//! NCCL cannot stage for free, so the guarantees depend on the payload:
//!
//! * **dense**: parameters are written in place. A trainer that dies (or a deadline that
//!   passes) in the middle of the payload leaves **the parameters of that group partially
//!   written**, the groups before it updated and the ones after it untouched;
//! * **packed**: a chunk is unpacked only after all of it arrived and its header matched,
//!   and the last chunk only after the status round, so no parameter is ever partially
//!   written: a failure leaves the chunks before the failing one applied (never the last
//!   one) and the rest untouched. An update that fits one chunk is applied by every worker
//!   or by none;
//! * **sparse**: staged, checked, and applied only when every worker is ready: all workers
//!   apply the update or none does, and a failure before the status round changes nothing.
//!
//! A refusal at the vote (unknown parameter, a parameter on another GPU) moves no payload
//! and leaves the engine usable; a refused sparse update moved its payload into the
//! workers' staging areas only. A NCCL failure or a passed deadline aborts the
//! communicator (nothing can hang); the engine then refuses further sessions and must be
//! rebuilt (see [`NcclTrainer::is_broken`]). A worker that cannot allocate the staging area
//! a sparse announcement asks for leaves the trainer to fail at its deadline.

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
use crate::meta::ParamMeta;
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
    /// Orders the trainer's staging copies (sparse arrays, host-held dense values) before
    /// the broadcasts that read them.
    staged: CudaEvent,
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
        let staged = event()?;
        let stage = SparseStage::new(Arc::clone(&stream), kernels);
        Ok(Self {
            comm,
            stream,
            events,
            staged,
            stage,
        })
    }
}

/// Most bytes of one grouped dense broadcast (a larger parameter travels alone). It also
/// bounds the device buffer a trainer stages host-held values of a group in.
pub const DENSE_GROUP_BYTES: usize = 1 << 30;
/// Most parameters of one grouped dense broadcast.
pub const DENSE_GROUP_PARAMS: usize = 128;

/// The groups in which the parameters `metas` of an unpacked dense update are broadcast:
/// consecutive ranges of at most [`DENSE_GROUP_PARAMS`] parameters and
/// [`DENSE_GROUP_BYTES`] bytes, except that a parameter larger than that is a group of its
/// own. Trainer and workers compute it from the same metadata, so their NCCL groups match.
pub(crate) fn dense_groups(metas: &[ParamMeta]) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0usize, 0usize);
    for (i, meta) in metas.iter().enumerate() {
        let len = meta.byte_len();
        let full = i - start >= DENSE_GROUP_PARAMS || bytes.saturating_add(len) > DENSE_GROUP_BYTES;
        if i > start && full {
            groups.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(len);
    }
    if start < metas.len() {
        groups.push(start..metas.len());
    }
    groups
}

/// A short name for a group of parameters in errors: `'a'` or `'a' … 'z' (n parameters)`.
pub(crate) fn describe_params(metas: &[ParamMeta]) -> String {
    match (metas.first(), metas.last()) {
        (Some(first), Some(last)) if metas.len() > 1 => format!(
            "'{}' … '{}' ({} parameters)",
            first.name(),
            last.name(),
            metas.len()
        ),
        (Some(only), _) => format!("'{}'", only.name()),
        _ => "no parameters".into(),
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
    use moeshift_tensor::DType;

    fn bf16(n: usize, count: usize) -> Vec<ParamMeta> {
        (0..count)
            .map(|i| ParamMeta::new(format!("p{i}"), DType::Bf16, vec![n]).unwrap())
            .collect()
    }

    #[test]
    fn dense_groups_bound_params_and_bytes() {
        // 494 M bf16 elements in 24 tensors (about 41 MB each, 988 MB in all): one group.
        assert_eq!(dense_groups(&bf16(494_000_000 / 24, 24)), vec![0..24]);
        // 300 tiny tensors: groups of 128.
        assert_eq!(
            dense_groups(&bf16(4, 300)),
            vec![0..128, 128..256, 256..300]
        );
        // 300 MiB each (bf16): three fit in 1 GiB (900 MiB), a fourth would not.
        let mib300 = 300 * (1 << 20) / 2;
        assert_eq!(dense_groups(&bf16(mib300, 7)), vec![0..3, 3..6, 6..7]);
        // A 2 GiB tensor travels alone, between groups of small ones.
        let mut metas = bf16(8, 2);
        metas.push(ParamMeta::new("huge", DType::Bf16, vec![1 << 30]).unwrap());
        metas.extend(bf16(8, 2));
        assert_eq!(dense_groups(&metas), vec![0..2, 2..3, 3..5]);
        assert!(dense_groups(&[]).is_empty());
        // Every parameter is in exactly one group, in order.
        let groups = dense_groups(&bf16(mib300, 10));
        let flat: Vec<usize> = groups.into_iter().flatten().collect();
        assert_eq!(flat, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn group_names_in_errors() {
        let metas = bf16(1, 3);
        assert_eq!(describe_params(&metas), "'p0' … 'p2' (3 parameters)");
        assert_eq!(describe_params(&metas[1..2]), "'p1'");
        assert_eq!(describe_params(&[]), "no parameters");
    }

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
