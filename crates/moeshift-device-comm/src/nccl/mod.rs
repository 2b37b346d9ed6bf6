//! NCCL communicator with deadlines (feature `cuda`).
//!
//! GPU-to-GPU transfers for moeshift over NCCL, loaded at run time through cudarc. The
//! difference from using NCCL directly is that nothing can hang: everything that waits for
//! peers on the host (creation, connection set-up) runs on a non-blocking communicator,
//! operations run on a blocking one split from it that shares its connections (so a launch
//! costs what it costs in PyTorch), every operation takes a
//! [`Deadline`](moeshift_sync::Deadline), and a peer that dies or never shows up turns into
//! an [`NcclError::Timeout`] naming the operation and the peer, after which the communicator
//! is aborted. See [`NcclComm`] for the details.
//!
//! Layers, each its own module (as in cudarc):
//! - [`probe`]: is there a driver and a NCCL library? ([`nccl_available`], never panics);
//! - `config` and `result`: the `ncclConfig_t`s of the two communicators, and checked calls
//!   over `cudarc::nccl::sys` (crate-internal);
//! - [`schedule`]: pure ordering of grouped point-to-point work into symmetric tournament
//!   rounds of at most [`MAX_P2P_OPS_PER_GROUP`] operations per group;
//! - [`NcclComm`]: the safe communicator — [`send`](NcclComm::send),
//!   [`recv`](NcclComm::recv), [`grouped`](NcclComm::grouped),
//!   [`all_to_all_v`](NcclComm::all_to_all_v), [`broadcast`](NcclComm::broadcast),
//!   [`broadcast_many_raw`](NcclComm::broadcast_many_raw),
//!   [`all_reduce_sum`](NcclComm::all_reduce_sum).
//!
//! A communicator is created either from a [`UniqueId`] the caller distributes, or through the
//! rendezvous store ([`NcclComm::from_store`]): rank 0 stores the id under a key and the other
//! ranks wait for it.
//!
//! ```
//! use std::time::Duration;
//! use cudarc::driver::CudaContext;
//! use moeshift_device_comm::nccl::{nccl_available, NcclComm, UniqueId};
//! use moeshift_sync::Deadline;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Skip quietly on machines without a GPU, a driver or NCCL.
//! if nccl_available().is_err() || CudaContext::device_count().unwrap_or(0) < 1 {
//!     return Ok(());
//! }
//! // A one-rank communicator; with more ranks, rank 0 shares `id` (e.g. through the store).
//! let stream = CudaContext::new(0)?.new_stream()?;
//! let id = UniqueId::new()?;
//! let comm = NcclComm::from_unique_id(&id, 0, 1, stream.clone(), Deadline::after(Duration::from_secs(30)))?;
//! let mut buf = stream.clone_htod(&[1.0f32, 2.0, 3.0])?;
//! comm.all_reduce_sum(&mut buf, Deadline::after(Duration::from_secs(5)))?;
//! assert_eq!(stream.clone_dtoh(&buf)?, vec![1.0, 2.0, 3.0]);
//! # Ok(())
//! # }
//! ```

mod comm;
mod config;
mod error;
mod op;
pub mod probe;
mod result;
pub mod schedule;
mod unique_id;
mod version;
mod wait;

pub use comm::NcclComm;
pub use error::NcclError;
pub use op::{P2pKind, P2pOp};
pub use probe::{nccl_available, MIN_NCCL_VERSION};
pub use schedule::MAX_P2P_OPS_PER_GROUP;
pub use unique_id::{UniqueId, UNIQUE_ID_BYTES};
pub use version::NcclVersion;
