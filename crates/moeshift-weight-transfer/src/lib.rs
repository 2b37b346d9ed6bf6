//! Trainer → inference weight transfer, dense and sparse.
//!
//! **Status:** this crate is laid out but not yet implemented. It will own:
//!
//! - `UpdateInfo` (`dense` | `sparse_flat`, `num_updates_list`, `packed`) with validation and
//!   a JSON round trip, and `SparsePatch` (int32 flat indices and values);
//! - engines behind one worker-side lifecycle (`start_update` → `update` → `finish_update`):
//!   `nccl` (dense, packed with explicit chunk headers, sparse scatter in place), `ipc` (CUDA IPC
//!   on one node) and `host` (the host transport, for CPU users and tests);
//! - the trainer side: `send_dense`, `send_sparse`, `diff` and an `auto` mode.
//!
//! Layering: depends on `moeshift-device-comm`, `moeshift-tensor` and `moeshift-sync`.
#![forbid(unsafe_code)]
