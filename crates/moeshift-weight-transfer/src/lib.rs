//! Trainer → inference weight transfer for online RL, dense and sparse.
//!
//! After every optimizer step a trainer pushes new weights into the inference workers.
//! Usually most elements did not change (more than 99 % of bf16 elements after one step
//! is common), so moeshift moves either every element of a parameter (**dense**) or only
//! `(int32 flat index, value)` patches applied in place (**sparse**, `sparse_flat`).
//!
//! # Pieces
//!
//! * [`UpdateInfo`]: the description of one update (`names`, `dtype_names`, `shapes`,
//!   `update_kind` = `"dense"` | `"sparse_flat"`, `num_updates_list`, `packed`) with its
//!   validation rules and JSON form. Empty lists in a dense update mean "reuse the previous
//!   metadata". [`ParamMeta`] is the typed form of one parameter.
//! * [`SparsePatch`] and [`diff`]: patches, bit-for-bit diffs, validation against a
//!   parameter before anything is written, in-place apply, and a SHA-256
//!   [`digest`](SparsePatch::digest) of indices and raw values.
//! * [`packing`]: chunk planning for packed dense updates and the explicit, checksummed
//!   [`ChunkHeader`] that both sides compare, so they can never disagree silently on chunk
//!   boundaries.
//! * [`ParamRegistry`]: the worker's parameters by name; an update whose names, dtypes or
//!   shapes differ from the registration is refused before any byte is written.
//! * [`WeightReceiver`]: the worker-side lifecycle for every engine (`start_update` →
//!   `update` → `finish_update`; an error anywhere ends the session).
//! * [`WorkerEngine`] / [`TrainerEngine`]: the engine traits. The trainer side offers
//!   `send_dense`, `send_sparse` and `send_auto`, which picks dense or sparse per parameter
//!   under an [`AutoPolicy`].
//! * [`host`]: the engine over the host (TCP) transport between host buffers. Updates are
//!   staged whole and committed only when every rank is ready, so a failed update (a dead
//!   trainer, a refusal, a passed deadline) leaves every worker's weights as they were.
//! * `nccl` (feature `cuda`): GPU to GPU over a dedicated NCCL group (trainer rank 0,
//!   workers `rank_offset + index`): dense broadcasts straight into the live parameters,
//!   grouped into few NCCL launches; packed chunks with headers through two pipelined chunk
//!   buffers; sparse updates staged whole (all indices, then all values, in one grouped
//!   broadcast), checked with one kernel and one device-to-host copy, then scattered in
//!   place with one kernel. Each payload kind documents what a failure leaves behind.
//! * `ipc` (feature `cuda`): one node; the trainer exports a packed buffer through CUDA
//!   IPC and the workers copy straight out of it.
//! * `device` (feature `cuda`): `DeviceStorage` (device parameters), `DevicePatch`,
//!   `DeviceDiff` (the trainer-side diff on the GPU) and `device_digest`.
//!
//! # The control protocol
//!
//! Every engine shares one control protocol over a
//! [`HostGroup`](moeshift_device_comm::HostGroup) whose rank 0 is the trainer; every
//! blocking step has a deadline. Per update:
//!
//! 1. **announcement**: the info and a metadata digest. The first update of a session is
//!    announced in a broadcast of its own; every later one rides on the status round of
//!    the update before it, and the last status round carries the end of the session (a
//!    session without updates sends its end marker alone);
//! 2. **vote**: an all-gather in which each worker accepts or refuses with its reason; a
//!    refusal anywhere moves no payload;
//! 3. **payload**, the engine's own way;
//! 4. **status**: an all-gather in which each rank says "ok" or "failed: reason". What is
//!    still staged is applied only when every rank said ok.
//!
//! A payload that lands in the workers' staging areas rather than in live parameters may
//! travel right after the announcement, with no vote: the status round then is the vote and
//! the check of the payload at once (the NCCL engine's sparse updates). A worker takes such
//! a payload whatever it then decides, so the transfer always matches, and refuses in the
//! status round. Either way a worker that cannot take an update makes it fail on every rank
//! with an error naming that rank and its reason, and a dead peer is an error before the
//! deadline. [`SendReport::phases`] tells where a trainer's session spent its time.
//!
//! # Example
//!
//! A trainer (rank 0) sends a sparse patch to one worker (rank 1). The two ranks are
//! threads here; in real use they are processes started by a launcher.
//!
//! ```
//! use moeshift_device_comm::{HostGroup, StoreClient, World};
//! use moeshift_sync::Deadline;
//! use moeshift_tensor::DType;
//! use moeshift_weight_transfer::{
//!     diff, HostConfig, HostTrainer, HostWorker, ParamMeta, ParamRegistry, SparseParam,
//!     TrainerEngine, WeightReceiver,
//! };
//! use std::time::Duration;
//!
//! type Error = Box<dyn std::error::Error + Send + Sync>;
//!
//! let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
//! let meta = ParamMeta::new("layer.weight", DType::F32, vec![4])?;
//! let old = vec![0u8; 16];
//! let new: Vec<u8> = [0.0f32, 2.0, 0.0, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
//!
//! let worker = std::thread::spawn({
//!     let (meta, old) = (meta.clone(), old.clone());
//!     move || -> Result<Vec<u8>, Error> {
//!         let deadline = Deadline::after(Duration::from_secs(30));
//!         let store = StoreClient::connect(&World::single_node(1, 2, "127.0.0.1", port)?, deadline)?;
//!         let group = HostGroup::world(&store, deadline)?;
//!         let mut registry = ParamRegistry::new();
//!         registry.register(meta, old)?;
//!         let engine = HostWorker::new(group, HostConfig::default())?;
//!         let mut receiver = WeightReceiver::new(engine, registry);
//!         receiver.receive_session(deadline)?;
//!         Ok(receiver.registry().bytes("layer.weight").unwrap_or_default().to_vec())
//!     }
//! });
//!
//! let deadline = Deadline::after(Duration::from_secs(30));
//! let store = StoreClient::connect(&World::single_node(0, 2, "127.0.0.1", port)?, deadline)?;
//! let mut trainer = HostTrainer::new(HostGroup::world(&store, deadline)?, HostConfig::default())?;
//! let patch = diff("layer.weight", &old, &new, DType::F32)?;
//! assert_eq!(patch.indices, vec![1]); // one element changed: index 1 became 2.0
//! trainer.send_sparse(&[SparseParam { meta: &meta, patch: &patch }], deadline)?;
//!
//! assert_eq!(worker.join().expect("worker thread")?, new);
//! # Ok::<(), Error>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod auto;
mod control;
#[cfg(feature = "cuda")]
pub mod device;
pub mod digest;
pub mod engine;
pub mod error;
pub mod host;
pub mod info;
#[cfg(feature = "cuda")]
pub mod ipc;
pub mod lifecycle;
pub mod meta;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod packing;
pub mod patch;
mod progress;
pub mod registry;
pub mod sparse_layout;

pub use auto::{AutoPolicy, Choice, BF16_CROSSOVER_DENSITY};
pub use control::TRAINER_RANK;
#[cfg(feature = "cuda")]
pub use device::{
    device_digest, DeviceAutoParam, DeviceDenseParam, DeviceDiff, DeviceOutgoing, DevicePatch,
    DeviceSparseParam, DeviceStorage,
};
pub use digest::{Digest, Hasher};
pub use engine::{
    Announcement, AutoParam, Capabilities, DenseParam, Outgoing, Phases, PreparedUpdate,
    SendReport, SparseParam, TrainerEngine, UpdateReport, WorkerEngine,
};
pub use error::TransferError;
pub use host::{HostConfig, HostTrainer, HostWorker, Progress};
pub use info::{InfoError, ResolvedUpdate, UpdateInfo, UpdateKind};
#[cfg(feature = "cuda")]
pub use ipc::{ChunkNotice, IpcConfig, IpcTrainer, IpcWorker};
pub use lifecycle::{SessionReport, WeightReceiver};
pub use meta::{metadata_digest, MetaError, ParamMeta};
#[cfg(feature = "cuda")]
pub use nccl::{NcclConfig, NcclTrainer, NcclWorker};
pub use packing::{
    pack_chunk, plan_chunks, plan_chunks_within, split_chunk, ChunkEntry, ChunkHeader, PackError,
    DEFAULT_PACKED_BUFFER_SIZE_BYTES,
};
pub use patch::{diff, PatchError, SparsePatch};
pub use registry::{HostStorage, ParamRegistry, ParamStorage, Registered, RegistryError};
