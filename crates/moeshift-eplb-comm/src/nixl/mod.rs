//! The `nixl` backend: zero-copy one-sided READs from peers' registered expert weights.
//!
//! Each rank registers its expert weights with NIXL once; during a transfer the receiver
//! READs every row it needs straight from the sender's live (old) weights into its own
//! staging, so the sender packs nothing, copies nothing and is not even called. The
//! staging is a landing area registered once and lent to the layer, so received rows land
//! in their final staging place and no layer allocates. A post-read check keeps every rank
//! from committing while a peer may still read its rows. See [`NixlCommunicator`] for the
//! protocol, the memory it registers and how failures are reported.
//!
//! Each peer's READs of a layer are split into [`NixlConfig::read_streams`] requests of
//! nearly equal bytes, each on a UCX worker of its own, so rows from one peer GPU move on
//! several CUDA streams (copy engines) at once. [`NixlCommunicator::last_phases`] tells
//! where the last layer's time went ([`NixlPhases`]).
//!
//! Weights may live in host memory or, with feature `cuda`, in GPU memory: rows then move
//! GPU to GPU (UCX's `cuda_ipc` between processes of a node), are staged on the GPU and
//! committed by device-to-device copies. GPU weights must be shareable through CUDA IPC
//! (`cuMemAlloc`/`cudaMalloc` memory, as PyTorch allocates; `IpcCudaBuffer` for weights
//! this crate's user allocates itself); weights from a stream-ordered pool are refused
//! with an error naming the tensor on machines without RDMA.
//!
//! NIXL is loaded at run time and probed first ([`probe`], [`is_nixl_available`]): the
//! crate builds and its other backends work on machines without it, and a missing or
//! incomplete runtime is an error, never an abort. The runtime is found through
//! `MOESHIFT_NIXL_LIB_DIR` (the folder holding `libnixl_capi.so`, as `cargo xtask setup`
//! unpacks it) or the system library path.
//!
//! # Example
//!
//! One rank holding experts `[0, 1, 2]` (rows of 4 bytes) moves to `[2, 0, 1]`: every row
//! changes, all from local rows. With more ranks, rows held elsewhere are READ from the
//! peers that hold them.
//!
//! ```
//! use moeshift_device_comm::{StoreClient, World};
//! use moeshift_eplb_comm::nixl::{is_nixl_available, NixlCommunicator};
//! use moeshift_eplb_comm::{EplbCommunicator, LayerWeights};
//! use moeshift_placement::LayerPlan;
//! use moeshift_sync::Deadline;
//! use moeshift_tensor::{DType, HostBuffer};
//! use std::time::Duration;
//!
//! if !is_nixl_available() {
//!     return Ok(()); // nothing to show on a machine without the NIXL runtime
//! }
//! let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
//! let world = World::single_node(0, 1, "127.0.0.1", port)?;
//! let deadline = Deadline::after(Duration::from_secs(30));
//! let store = StoreClient::connect(&world, deadline)?;
//!
//! let mut buf = HostBuffer::from_bytes(&[[0u8; 4], [1; 4], [2; 4]].concat())?;
//! let mut weights = LayerWeights::builder().host("w", &mut buf, &[3, 4], DType::U8)?.build()?;
//! let mut comm = NixlCommunicator::new(&store, &[0], std::slice::from_ref(&weights), deadline)?;
//! assert!(comm.agent_name().starts_with("eplb-0-"));
//!
//! let plan = LayerPlan::new(&[0, 1, 2], &[2, 0, 1], 1)?;
//! let staged = comm.transfer(0, &plan, &weights, deadline)?;
//! assert_eq!(weights.row(0, 0)?, &[0; 4]); // untouched until the commit
//! assert_eq!(staged.stats().staging_bytes, 12); // three changed rows, nothing more
//! staged.commit(&mut weights)?;
//! drop(weights);
//! assert_eq!(buf.as_slice(), &[[2u8; 4], [0; 4], [1; 4]].concat()[..]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod agent;
mod catalog;
mod communicator;
mod config;
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda;
mod error;
mod landing;
mod phases;
mod pipeline;
#[allow(unsafe_code)]
mod probe;
mod setup;
mod split;
mod status;
mod transfer;

pub use communicator::NixlCommunicator;
pub use config::{NixlConfig, DEFAULT_READ_STREAMS, ERROR_HANDLING_MODE, NUM_WORKERS};
#[cfg(feature = "cuda")]
pub use cuda::IpcCudaBuffer;
pub use error::NixlError;
pub use phases::NixlPhases;
pub use probe::{
    is_nixl_available, probe, NixlRuntime, ENV_LIB_DIR, ENV_PLUGIN_DIR, ENV_UCX_MODULES, LIBRARY,
};
