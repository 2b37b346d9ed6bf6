//! The host transport: [`HostGroup`], a full mesh of TCP connections between the ranks of a
//! group, with point-to-point messages and collectives (barrier, broadcast, all-gather,
//! all-to-all-v, all-reduce).

pub mod frame;
mod group;
mod peer;
mod reduce;
mod setup;
mod target;

pub use group::HostGroup;
pub use reduce::{ReduceOp, Reducible};
