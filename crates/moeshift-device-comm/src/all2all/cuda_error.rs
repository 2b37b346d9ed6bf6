//! [`CudaAll2AllError`], the error type of the CUDA all-to-all managers.

use std::fmt;
use std::time::Duration;

use cudarc::driver::DriverError;

use super::error::All2AllError;
use super::workspace::WorkspaceError;
use crate::error::{CommError, RankRef};
use crate::nccl::NcclError;

/// Errors of the CUDA managers' dispatch and combine.
///
/// Invalid input, a peer's rejection, a peer with other parameters and malformed messages
/// are the same [`All2AllError`]s the host managers return (variant
/// [`Exchange`](Self::Exchange)), with the same agreement: a rank whose own input is invalid
/// still takes part in the header exchange, so every rank fails the call together. Errors of
/// the GPU layers (NCCL, the CUDA driver, deadlines on the GPU, CUDA IPC) name the rank, its
/// device, the manager, the operation and the layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaAll2AllError {
    /// Invalid input, or a disagreement between ranks, as for the host managers.
    #[error(transparent)]
    Exchange(#[from] All2AllError),

    /// NCCL failed or timed out (the communicator is aborted then; see [`NcclError`]).
    #[error("{rank}: {manager} {op} of layer {layer}: {source}")]
    Nccl {
        /// The rank reporting.
        rank: RankRef,
        /// The manager.
        manager: &'static str,
        /// `dispatch`, `combine` or `setup`.
        op: &'static str,
        /// The MoE layer.
        layer: usize,
        /// NCCL's error (it names the peers).
        #[source]
        source: Box<NcclError>,
    },

    /// A CUDA driver call failed.
    #[error(
        "{rank} (device {device}): {manager} {op} of layer {layer}: CUDA {call} failed: {source}"
    )]
    Cuda {
        /// The rank reporting.
        rank: RankRef,
        /// Its CUDA device.
        device: usize,
        /// The manager.
        manager: &'static str,
        /// `dispatch`, `combine` or `setup`.
        op: &'static str,
        /// The MoE layer.
        layer: usize,
        /// The driver call or kernel, e.g. `cuMemcpyDtoDAsync` or `gather_rows`.
        call: &'static str,
        /// The driver's error.
        #[source]
        source: DriverError,
    },

    /// Work this rank queued on its GPU did not finish before the deadline.
    #[error(
        "{rank} (device {device}): {manager} {op} of layer {layer}: the GPU did not finish \
         {what} within {waited:?} (deadline expired)"
    )]
    Timeout {
        /// The rank reporting.
        rank: RankRef,
        /// Its CUDA device.
        device: usize,
        /// The manager.
        manager: &'static str,
        /// `dispatch` or `combine`.
        op: &'static str,
        /// The MoE layer.
        layer: usize,
        /// What it waited for.
        what: &'static str,
        /// How long it waited.
        waited: Duration,
    },

    /// A size does not fit a kernel's 32-bit parameters.
    #[error("{rank}: {manager} {op} of layer {layer}: {what} is {value}, more than 2^32 - 1")]
    TooLarge {
        /// The rank reporting.
        rank: RankRef,
        /// The manager.
        manager: &'static str,
        /// `dispatch` or `combine`.
        op: &'static str,
        /// The MoE layer.
        layer: usize,
        /// What is too large.
        what: &'static str,
        /// Its value.
        value: usize,
    },

    /// The device kernels could not be JIT-compiled or found.
    #[error("device {device}: the {manager} kernels did not load: {source}{}", JitLog(.log))]
    Kernels {
        /// The CUDA device.
        device: usize,
        /// The manager.
        manager: &'static str,
        /// The driver's error.
        #[source]
        source: DriverError,
        /// The JIT compiler's error log, if it wrote one.
        log: String,
    },

    /// The manager cannot be built on these communicators.
    #[error("{rank}: {manager}: {detail}")]
    Setup {
        /// The rank reporting.
        rank: RankRef,
        /// The manager.
        manager: &'static str,
        /// What does not fit.
        detail: String,
    },

    /// The one-sided workspace could not be sized or resized.
    #[error("{rank}: {manager} {op} of layer {layer}: {source}")]
    Workspace {
        /// The rank reporting.
        rank: RankRef,
        /// The manager.
        manager: &'static str,
        /// `setup` or `dispatch`.
        op: &'static str,
        /// The MoE layer.
        layer: usize,
        /// The workspace's error.
        #[source]
        source: WorkspaceError,
    },

    /// A CUDA IPC mapping of a peer's workspace region failed.
    #[error(
        "{rank}: {manager} workspace generation {generation}: {what} for {peer}'s region \
         failed: {detail}"
    )]
    Ipc {
        /// The rank reporting.
        rank: RankRef,
        /// The peer whose region it is (this rank for its own).
        peer: RankRef,
        /// The manager.
        manager: &'static str,
        /// Which allocation of the workspace (0 = the first).
        generation: u64,
        /// The step: `cuIpcGetMemHandle`, `cuIpcOpenMemHandle`, handle size, …
        what: &'static str,
        /// What went wrong.
        detail: String,
    },

    /// The rendezvous store failed while exchanging IPC handles.
    #[error("{rank}: {manager}: store key {key:?}: {source}")]
    Store {
        /// The rank reporting.
        rank: RankRef,
        /// The manager.
        manager: &'static str,
        /// The key.
        key: String,
        /// The store's error.
        #[source]
        source: Box<CommError>,
    },
}

/// `; JIT log: …`, or nothing.
struct JitLog<'a>(&'a str);

impl fmt::Display for JitLog<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let log = self.0.trim();
        if log.is_empty() {
            Ok(())
        } else {
            write!(f, "; JIT log: {log}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `DriverError`'s `Display` asks the driver for its text, so these tests format only
    // variants without one (the machine running them may have no driver).

    #[test]
    fn messages_name_rank_device_manager_and_layer() {
        let rank = RankRef {
            local: 1,
            global: 5,
        };
        let err = CudaAll2AllError::Timeout {
            rank,
            device: 3,
            manager: "all_to_all_v",
            op: "dispatch",
            layer: 7,
            what: "a device-to-host copy",
            waited: Duration::from_millis(1500),
        };
        let text = err.to_string();
        assert!(
            text.starts_with("rank 1 (global rank 5) (device 3): all_to_all_v dispatch of layer 7"),
            "{text}"
        );
        assert!(text.contains("a device-to-host copy within 1.5s"), "{text}");
        let err = CudaAll2AllError::TooLarge {
            rank,
            manager: "one_sided_ipc",
            op: "combine",
            layer: 2,
            what: "row count",
            value: 1 << 33,
        };
        assert!(err.to_string().contains("row count is 8589934592"), "{err}");
    }

    #[test]
    fn jit_log_is_appended_only_when_present() {
        assert_eq!(
            JitLog("ptxas fatal : bad line 12\n").to_string(),
            "; JIT log: ptxas fatal : bad line 12"
        );
        assert_eq!(JitLog(" \n").to_string(), "");
    }
}
