//! Ranks, groups, rendezvous store, host transport, NCCL and MoE all-to-all.
#![deny(missing_docs)]

#[cfg(feature = "cuda")]
pub mod nccl;
