//! The `nccl` backend (feature `cuda`): expert rows move GPU to GPU with grouped NCCL
//! point-to-point operations, between CUDA weights.
//!
//! # How a layer moves
//!
//! 1. **Checks, then agreement**, exactly as in the [`host`](crate::host) backend: this rank
//!    checks the plan against its weights (which must live on the communicator's GPU), lays
//!    out and allocates its device staging, then all ranks compare a digest of
//!    `(layer, plan)` over the EPLB group ([`agree_on_plan`](crate::agree_on_plan)). A plan
//!    that differs between ranks, or a rank that failed its own checks, is a typed error on
//!    every rank before NCCL moves a byte, and the communicator stays usable.
//! 2. **Local copies** are staged by device-to-device copies from the old rows, and the rows
//!    to be sent in packed rounds are packed (see below), all on NCCL's stream.
//! 3. **One grouped exchange** carries every round of the plan's symmetric schedule: in each
//!    round this rank talks to at most one peer, and the NCCL communicator issues the
//!    operations pair by pair in tournament rounds of at most 256 operations per group.
//!    Rows are received straight into device staging, which holds only the rows that
//!    change (received primaries and local copies), never a whole layer.
//! 4. **Barrier** on the EPLB group, so that no rank commits (overwrites rows a peer might
//!    still be reading) while a peer is still receiving, and all ranks have their rows when
//!    any of them commits. Layers with no traffic skip it.
//!
//! The commit ([`StagedLayer::commit`](crate::StagedLayer::commit)) is device-to-device:
//! staged rows into place, then duplicate rows from their new primaries, on a stream of
//! its own, so the serving thread can commit layer `l` while this communicator's thread
//! already moves layer `l + 1`.
//!
//! # Packing rule
//!
//! In a round, the rows bound for the round's peer travel as **one** operation, packed into
//! one contiguous device buffer, when there are **several**; a **single** row travels as one
//! operation per tensor, straight from the live weights (no copy). Both sides derive the
//! case from the plan, and the receiver lays the round's rows out in staging exactly as the
//! sender packs them (ascending expert, tensors back to back). The pack buffer is kept and
//! reused; [`TransferStats::staging_bytes`](crate::TransferStats::staging_bytes) counts the
//! staged rows plus the rows a layer packed.
//!
//! # Failures
//!
//! Every step has the caller's deadline. A peer that dies or never shows up during the
//! NCCL exchange makes it time out: the NCCL communicator is aborted (which also stops NCCL
//! kernels still waiting on the peer) and the error names the peer
//! ([`EplbCommError::Nccl`](crate::EplbCommError)); a peer lost during agreement or the
//! barrier is reported by the host transport. The weights are never written before the
//! commit, so they keep the old placement. After a NCCL failure the communicator refuses
//! further transfers ([`EplbCommError::CommunicatorFailed`](crate::EplbCommError)); build a
//! new one.
//!
//! # Threads and streams
//!
//! [`NcclCommunicator`] is **not `Send`**: NCCL binds a communicator to the thread that
//! drives it, so it is built and used on one thread (the EPLB worker). Staged layers are
//! `Send`. Weights given to a transfer must not have writes still pending on another
//! stream (synchronize first); the transfer only reads them.
//!
//! # Example
//!
//! One rank on GPU 0 holding experts `[0, 1, 2]` (rows of 4 bytes) moves to `[2, 0, 1]`
//! (all local copies; with more ranks, rows held elsewhere arrive over NCCL):
//!
//! ```
//! use moeshift_device_comm::{StoreClient, World};
//! use moeshift_eplb_comm::nccl::NcclCommunicator;
//! use moeshift_eplb_comm::{EplbCommunicator, LayerWeights};
//! use moeshift_placement::LayerPlan;
//! use moeshift_sync::Deadline;
//! use moeshift_tensor::{cuda_available, CudaBuffer, DType};
//! use std::time::Duration;
//!
//! if cuda_available().is_err() || moeshift_device_comm::nccl::nccl_available().is_err() {
//!     return Ok(()); // nothing to show on a machine without a GPU and NCCL
//! }
//! let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
//! let world = World::single_node(0, 1, "127.0.0.1", port)?;
//! let deadline = Deadline::after(Duration::from_secs(60));
//! let store = StoreClient::connect(&world, deadline)?;
//!
//! let buf = CudaBuffer::from_host(0, &[[0u8; 4], [1; 4], [2; 4]].concat())?;
//! // SAFETY: `buf` outlives `weights`, and nothing else touches it meanwhile.
//! let mut weights =
//!     unsafe { LayerWeights::builder().raw("w", buf.view(&[3, 4], DType::U8)?) }?.build()?;
//! let mut comm = NcclCommunicator::new(&store, &[0], std::slice::from_ref(&weights), deadline)?;
//!
//! let plan = LayerPlan::new(&[0, 1, 2], &[2, 0, 1], 1)?;
//! let staged = comm.transfer(0, &plan, &weights, deadline)?;
//! assert_eq!(staged.stats().staging_bytes, 12); // three changed rows, nothing more
//! staged.commit(&mut weights)?;
//! drop(weights);
//! assert_eq!(buf.to_vec()?, [[2u8; 4], [0; 4], [1; 4]].concat());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod communicator;
mod exchange;
#[allow(unsafe_code)]
mod ops;

pub use communicator::NcclCommunicator;
