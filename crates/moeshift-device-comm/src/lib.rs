//! Ranks, groups and host-side communication for moeshift.
//!
//! A rank is an OS process (one per GPU on GPU machines). This crate gives a rank what it
//! needs to find and talk to the others:
//!
//! - [`World`]: who this process is, read from torchrun's variables (`RANK`, `WORLD_SIZE`,
//!   `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), so moeshift runs under
//!   torchrun, Slurm wrappers or its own launcher alike;
//! - the rendezvous [`store`]: a key-value server that rank 0 hosts over TCP
//!   ([`StoreServer`]) and every rank reaches through a [`StoreClient`] (`set`, `get`,
//!   `add`, `wait`, `barrier`); it carries host-transport addresses, the NCCL unique id and
//!   NIXL metadata;
//! - the [`host`] transport: [`HostGroup`], a full TCP mesh over a group of ranks with
//!   send/recv, barrier, broadcast, all-gather, all-to-all-v and all-reduce — the role Gloo
//!   plays for PyTorch;
//! - the [`launch`]er: [`Launcher`] starts N ranks of a command with those variables,
//!   prefixes their output with `[rank K] `, and stops everyone on the first failure;
//! - [`testing`]: the convention for multi-process tests as ordinary `#[test]` functions;
//! - `nccl` (feature `cuda`): the NCCL communicator, bootstrapped through the store.
//!
//! Every blocking call takes a [`Deadline`](moeshift_sync::Deadline). A dead peer, a rank that
//! never shows up, or two ranks calling different operations become a [`CommError`] naming
//! the ranks, the group, the operation or the store key involved — never a hang and never
//! silently mixed-up bytes.
//!
//! # Example
//!
//! Every rank runs the same code; here a world of one rank, so the example runs alone:
//!
//! ```
//! use moeshift_device_comm::{HostGroup, ReduceOp, StoreClient, World};
//! use moeshift_sync::Deadline;
//! use std::time::Duration;
//!
//! # let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
//! # let vars = [("RANK", "0".to_string()), ("WORLD_SIZE", "1".into()), ("LOCAL_RANK", "0".into()),
//! #             ("LOCAL_WORLD_SIZE", "1".into()), ("MASTER_ADDR", "127.0.0.1".into()),
//! #             ("MASTER_PORT", port.to_string())];
//! # let from_env = || World::from_vars(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()));
//! // Under a launcher: let world = World::from_env()?;
//! let world = from_env()?;
//! let deadline = Deadline::after(Duration::from_secs(30));
//!
//! // Rank 0 hosts the store; everyone connects to it.
//! let store = StoreClient::connect(&world, deadline)?;
//! store.set(&format!("hello/{}", world.rank()), b"ready", deadline)?;
//! store.barrier("hello", deadline)?;
//!
//! // A host group over all ranks: sum per-expert load statistics.
//! let group = HostGroup::world(&store, deadline)?;
//! let mut load = vec![3i64, 0, 7, 1];
//! group.all_reduce(&mut load, ReduceOp::Sum, deadline)?;
//! assert_eq!(load.len(), 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Start several ranks with `moeshift launch --nproc 4 -- my-program`, with torchrun, or
//! from Rust with [`Launcher`].
#![deny(missing_docs)]

pub mod all2all;
pub mod error;
pub mod host;
pub mod launch;
pub mod layout;
mod net;
pub mod store;
pub mod testing;
pub mod world;

pub use error::{CommError, RankRef};
pub use host::{HostGroup, ReduceOp, Reducible};
pub use launch::{LaunchError, LaunchOutcome, Launcher, RankStatus};
pub use store::{StoreClient, StoreServer};
pub use world::{World, WorldError};

#[cfg(feature = "cuda")]
pub mod nccl;
