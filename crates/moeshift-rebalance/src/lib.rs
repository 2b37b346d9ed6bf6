//! The EPLB executor: rearranges expert weights in place while serving goes on.
//!
//! **Status:** this crate is laid out but not yet implemented. It will own:
//!
//! - the executor that applies a new placement layer by layer through an EPLB communicator,
//!   committing a layer's weights and maps only after every row landed and every peer finished
//!   reading from this rank;
//! - `EplbState`: the load window, step interval, trigger and balancedness log;
//! - the async worker thread, which plans and transfers while the serving thread commits each
//!   finished layer through a `CpuGpuEvent` handoff, and which reports every error and expired
//!   deadline to its owner instead of stopping silently.
//!
//! Layering: depends on `moeshift-placement`, `moeshift-eplb-comm`, `moeshift-device-comm`,
//! `moeshift-tensor` and `moeshift-sync`.
#![forbid(unsafe_code)]
