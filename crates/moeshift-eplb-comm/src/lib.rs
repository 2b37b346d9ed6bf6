//! EPLB communicators: move the expert rows of one MoE layer between ranks according to a
//! transfer plan, with a deadline, staging only the rows that change.
//!
//! Expert-parallel load balancing (EPLB) periodically changes which GPU holds which
//! experts. `moeshift-placement` decides the new placement and computes, per layer, a
//! [`LayerPlan`](moeshift_placement::LayerPlan): every rank's local copies, sends, receives
//! and duplicate fills, in rounds where each rank talks to at most one peer. This crate
//! executes such a plan:
//!
//! * [`LayerWeights`]: one layer's expert tensors on this rank (`w13`, `w2`, scales, …),
//!   validated together: dim 0 is the outermost dense expert-row dimension of every tensor,
//!   all tensors have the same rows and device, no two rows overlap.
//! * [`EplbCommunicator`]: `transfer` moves this rank's part of a layer's plan into
//!   staging, without touching the weights, and returns a [`StagedLayer`] once every row
//!   landed and every peer finished reading; [`StagedLayer::commit`] then writes the rows
//!   into place, locally, checking everything before the first write. Staging holds only
//!   the rows that change, never a whole layer.
//! * [`EplbCommunicator::rearrange`]: a whole rearrangement (several layers) in one call,
//!   pipelined: each layer's commit is queued on the GPU
//!   ([`StagedLayer::commit_async`], a [`PendingCommit`] that borrows the layer's weights
//!   until it finished) while the next layer transfers; the `nixl` backend also agrees on
//!   every plan at once and runs each layer's post-read check during the next layer's
//!   READs. Failures name the layers committed before them ([`RearrangeError`]).
//! * Backends: [`HostCommunicator`] (`host`: host or CUDA weights staged through host
//!   memory over the host TCP transport, the role of vLLM's `torch_gloo`), [`nixl`]
//!   (zero-copy one-sided READs from peers' registered weights, host memory or, with feature
//!   `cuda`, GPU memory, straight into a landing slot lent to the staged layer) and, with
//!   feature `cuda`,
//!   `nccl` (grouped NCCL point-to-point between CUDA weights, the `nccl` module; without
//!   the feature, selecting it is a typed error).
//! * [`choose_backend`] / [`select_backend`]: the default selection (elastic → `nccl`,
//!   NIXL available → `nixl`, otherwise `host`; an explicit choice wins and never falls back
//!   silently); [`create_communicator`], the factory over a chosen backend, and
//!   [`open_communicator`], which chooses, forms the EPLB group and builds in one call.
//!
//! Ranks never trust each other blindly: the tensor list of every layer is compared across
//! ranks when a communicator is built, and each transfer starts by comparing a digest of
//! `(layer, plan)` ([`plan_digest`]), so a mismatch is a typed error on every rank, never
//! corrupted weights. Every blocking call takes a [`Deadline`](moeshift_sync::Deadline); a
//! dead peer is an error naming it, and the weights stay as they were.
//!
//! # Example
//!
//! Two ranks (threads here, processes in real use) swap their experts: rank 0 holds
//! experts `[0, 1]`, rank 1 holds `[2, 3]`, and the new placement is `[2, 1, 0, 3]`.
//!
//! ```
//! use moeshift_device_comm::{StoreClient, World};
//! use moeshift_eplb_comm::{EplbCommunicator, HostCommunicator, LayerWeights};
//! use moeshift_placement::LayerPlan;
//! use moeshift_sync::Deadline;
//! use moeshift_tensor::{DType, HostBuffer};
//! use std::time::Duration;
//!
//! let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
//! let rank = move |r: usize| -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
//!     let deadline = Deadline::after(Duration::from_secs(20));
//!     let store = StoreClient::connect(&World::single_node(r, 2, "127.0.0.1", port)?, deadline)?;
//!     // Each row (expert) is 4 bytes holding its expert id.
//!     let first = 2 * r as u8;
//!     let mut buf = HostBuffer::from_bytes(&[[first; 4], [first + 1; 4]].concat())?;
//!     let mut weights = LayerWeights::builder().host("w", &mut buf, &[2, 4], DType::U8)?.build()?;
//!     let mut comm = HostCommunicator::new(&store, &[0, 1], std::slice::from_ref(&weights), deadline)?;
//!
//!     let plan = LayerPlan::new(&[0, 1, 2, 3], &[2, 1, 0, 3], 2)?;
//!     let staged = comm.transfer(0, &plan, &weights, deadline)?;
//!     assert_eq!(staged.staged_rows().len(), 1); // only row 0 changes on either rank
//!     staged.commit(&mut weights)?;
//!     drop(weights);
//!     Ok(buf.as_slice().to_vec())
//! };
//! let peer = std::thread::spawn(move || rank(1).map_err(|e| e.to_string()));
//! assert_eq!(rank(0).map_err(|e| e.to_string())?, [[2; 4], [1; 4]].concat());
//! assert_eq!(peer.join().map_err(|_| "rank 1 panicked")??, [[0; 4], [3; 4]].concat());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//!
//! * `cuda`: CUDA weights (described with
//!   [`LayerWeightsBuilder::raw`](crate::LayerWeightsBuilder::raw) over device memory),
//!   staged in device memory and committed by device-to-device copies; the `nccl` backend;
//!   CUDA weights for the `host` backend, through page-locked host memory; GPU memory for
//!   the `nixl` backend (weights peers can map: `nixl::IpcCudaBuffer`). CUDA and NCCL
//!   are loaded at run time (cudarc), so the feature builds on machines without either.
//!
//! Layering: depends on `moeshift-sync`, `moeshift-tensor`, `moeshift-placement` and
//! `moeshift-device-comm`, never on crates above it.
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod agree;
pub mod comm;
#[cfg(feature = "cuda")]
mod cuda_stage;
pub mod error;
pub mod factory;
pub mod host;
#[cfg(feature = "cuda")]
pub mod nccl;
#[allow(unsafe_code)]
pub mod nixl;
pub mod pending;
pub mod rearrange;
pub mod select;
pub mod staging;
pub mod weights;
mod wire;

pub use agree::{agree_on_layouts, agree_on_plan, plan_digest, plans_digest};
pub use comm::{Backend, BackendChoice, EplbCommunicator, StagedLayer, TransferStats};
pub use error::EplbCommError;
pub use factory::{create_communicator, open_communicator};
pub use host::{eplb_group, HostCommunicator, EPLB_GROUP_NAME};
pub use pending::PendingCommit;
pub use rearrange::{LayerMove, RearrangeError};
pub use select::{
    choose_backend, default_backend, is_built, select_backend, set_log_hook, LogHook, Selection,
    SelectionReason,
};
pub use staging::{RowSource, StagedRow};
pub use weights::{ExpertTensor, LayerLayout, LayerWeights, LayerWeightsBuilder, TensorSpec};
