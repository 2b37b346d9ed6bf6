//! moeshift: expert-parallel infrastructure for Mixture-of-Experts models.
//!
//! This facade re-exports the layers, bottom-up, so a user can depend on one crate:
//!
//! | module | crate | what it holds |
//! | --- | --- | --- |
//! | [`sync`] | `moeshift-sync` | `CpuGpuEvent`, `Handoff`, `Deadline` |
//! | [`tensor`] | `moeshift-tensor` | dtypes, devices, views, buffers |
//! | [`placement`] | `moeshift-placement` | maps, policies, transfer plans |
//! | [`device_comm`] | `moeshift-device-comm` | ranks, store, host transport, NCCL |
//! | [`eplb_comm`] | `moeshift-eplb-comm` | EPLB communicators |
//! | [`rebalance`] | `moeshift-rebalance` | the EPLB executor and worker |
//! | [`weight_transfer`] | `moeshift-weight-transfer` | trainer → inference transfer |
//!
//! Each crate can also be taken on its own.

pub use moeshift_device_comm as device_comm;
pub use moeshift_eplb_comm as eplb_comm;
pub use moeshift_placement as placement;
pub use moeshift_rebalance as rebalance;
pub use moeshift_sync as sync;
pub use moeshift_tensor as tensor;
pub use moeshift_weight_transfer as weight_transfer;
