//! EPLB communicators: execute one layer's expert transfer plan over a transport.
//!
//! **Status:** this crate is laid out but not yet implemented. It will own:
//!
//! - the `EplbCommunicator` trait: execute a whole layer's transfer plan (computed by
//!   `moeshift-placement`) over expert-row views of that layer's weight tensors, with a
//!   deadline, staging only the rows that change;
//! - the `host` backend (staged through host memory over the host transport of
//!   `moeshift-device-comm`), the `nccl` backend (grouped point-to-point in symmetric rounds,
//!   at most 256 operations per group) and the `nixl` backend (zero-copy one-sided READs from
//!   peers' registered weights);
//! - default selection: elastic mode → `nccl`; NIXL available → `nixl`; otherwise `host`.
//!
//! Layering: depends on `moeshift-sync`, `moeshift-tensor`, `moeshift-placement` and
//! `moeshift-device-comm`, never on crates above it.
#![forbid(unsafe_code)]
