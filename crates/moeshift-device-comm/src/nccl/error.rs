//! [`NcclError`]: everything that can go wrong with the NCCL communicator.

use std::fmt;
use std::time::Duration;

use cudarc::driver::DriverError;
use cudarc::nccl::sys::ncclResult_t;

use super::NcclVersion;
use crate::CommError;

/// An error of the NCCL layer. Messages name the rank, the peer(s) and the operation involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NcclError {
    /// The CUDA driver library (`libcuda.so`) could not be loaded: no GPU driver on this machine.
    #[error(
        "the CUDA driver library (libcuda.so) could not be loaded: NCCL needs an NVIDIA driver"
    )]
    DriverMissing,

    /// The NCCL library could not be loaded; `hint` says what was looked for and how to fix it.
    #[error("the NCCL library could not be loaded: {hint}")]
    LibraryMissing {
        /// What was searched for, what was found instead, and the fix.
        hint: String,
    },

    /// The NCCL library is older than the oldest release this module supports.
    #[error("NCCL {found} is too old: moeshift needs NCCL {required} or newer")]
    UnsupportedVersion {
        /// The version that was loaded.
        found: NcclVersion,
        /// The oldest supported version.
        required: NcclVersion,
    },

    /// A NCCL call (or an asynchronous error it reported later) failed.
    #[error(
        "{}: {call} failed with {code:?} ({message}){}{}",
        RankLabel(*.rank),
        PeerLabel(.peers),
        LastError(.last_error)
    )]
    Call {
        /// The NCCL function, e.g. `ncclGroupEnd` or `ncclCommGetAsyncError`.
        call: &'static str,
        /// This process's rank, when a communicator exists.
        rank: Option<usize>,
        /// The peer ranks of the operation that failed (empty when not peer-specific).
        peers: Vec<usize>,
        /// The `ncclResult_t` returned or reported.
        code: ncclResult_t,
        /// NCCL's description of `code` (`ncclGetErrorString`).
        message: String,
        /// NCCL's last error message (`ncclGetLastError`), often naming the failing transport.
        last_error: String,
    },

    /// A CUDA driver call failed.
    #[error("{} (device {device}): CUDA {call} failed: {source}", RankLabel(*.rank))]
    Cuda {
        /// The driver operation, e.g. `cuEventQuery`.
        call: &'static str,
        /// This process's rank, when known.
        rank: Option<usize>,
        /// The CUDA device ordinal.
        device: usize,
        /// The driver's error.
        #[source]
        source: DriverError,
    },

    /// An operation did not finish before its deadline; the communicator was aborted.
    #[error(
        "rank {rank}: {op} with peer(s) {peers:?} did not finish within {waited:?} (deadline \
         expired); the communicator was aborted"
    )]
    Timeout {
        /// This process's rank.
        rank: usize,
        /// The operation, e.g. `recv` or `all_to_all_v (round 2 of 3)`.
        op: String,
        /// The peers the operation was waiting for.
        peers: Vec<usize>,
        /// How long the operation waited.
        waited: Duration,
    },

    /// The communicator was aborted by an earlier failure and cannot be used any more.
    #[error("rank {rank}: {op} refused: the communicator was aborted earlier ({reason}); create a new one")]
    Aborted {
        /// This process's rank.
        rank: usize,
        /// The operation that was refused.
        op: &'static str,
        /// Why the communicator was aborted.
        reason: String,
    },

    /// An argument was out of range or inconsistent; nothing was sent.
    #[error("{}: invalid {field}: {what}", RankLabel(*.rank))]
    InvalidArgument {
        /// This process's rank, when known.
        rank: Option<usize>,
        /// The argument or field at fault, e.g. `peer` or `send_counts`.
        field: &'static str,
        /// What is wrong with it.
        what: String,
    },

    /// The rendezvous store failed while sharing the NCCL unique id.
    #[error("rank {rank}: sharing the NCCL unique id under store key {key:?} failed: {source}")]
    Store {
        /// This process's rank.
        rank: usize,
        /// The store key of the unique id.
        key: String,
        /// The store's error (boxed: it is large, and rare).
        #[source]
        source: Box<CommError>,
    },
}

impl NcclError {
    /// The `ncclResult_t` of a [`NcclError::Call`], if this is one.
    pub fn nccl_code(&self) -> Option<ncclResult_t> {
        match self {
            NcclError::Call { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True for errors that mean the machine cannot run NCCL at all (no driver, no library, a
    /// library too old): callers use it to skip GPU work instead of failing.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            NcclError::DriverMissing
                | NcclError::LibraryMissing { .. }
                | NcclError::UnsupportedVersion { .. }
        )
    }
}

/// `rank N` or `rank ?` in messages.
struct RankLabel(Option<usize>);

impl fmt::Display for RankLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(rank) => write!(f, "rank {rank}"),
            None => f.write_str("rank ?"),
        }
    }
}

/// ` with peer(s) [..]`, or nothing when no peer is involved.
struct PeerLabel<'a>(&'a [usize]);

impl fmt::Display for PeerLabel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " [peer(s) {:?}]", self.0)
        }
    }
}

/// `: <last error>`, or nothing when NCCL had no message.
struct LastError<'a>(&'a str);

impl fmt::Display for LastError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "; NCCL says: {}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_error_names_rank_peers_code_and_messages() {
        let err = NcclError::Call {
            call: "ncclGroupEnd",
            rank: Some(3),
            peers: vec![5],
            code: ncclResult_t::ncclRemoteError,
            message: "remote process exited or there was a network error".into(),
            last_error: "socket closed".into(),
        };
        let text = err.to_string();
        assert!(
            text.starts_with("rank 3: ncclGroupEnd failed with ncclRemoteError"),
            "{text}"
        );
        assert!(text.contains("[peer(s) [5]]"), "{text}");
        assert!(text.contains("NCCL says: socket closed"), "{text}");
        assert_eq!(err.nccl_code(), Some(ncclResult_t::ncclRemoteError));
        assert!(!err.is_unavailable());
    }

    #[test]
    fn call_error_without_rank_or_peers_stays_short() {
        let err = NcclError::Call {
            call: "ncclGetUniqueId",
            rank: None,
            peers: vec![],
            code: ncclResult_t::ncclSystemError,
            message: "unhandled system error".into(),
            last_error: String::new(),
        };
        assert_eq!(
            err.to_string(),
            "rank ?: ncclGetUniqueId failed with ncclSystemError (unhandled system error)"
        );
    }

    #[test]
    fn timeout_names_operation_and_peers() {
        let err = NcclError::Timeout {
            rank: 1,
            op: "recv".into(),
            peers: vec![0],
            waited: Duration::from_secs(2),
        };
        let text = err.to_string();
        assert!(text.contains("rank 1: recv with peer(s) [0]"), "{text}");
        assert!(text.contains("aborted"), "{text}");
    }

    #[test]
    fn unavailable_errors_are_flagged() {
        assert!(NcclError::DriverMissing.is_unavailable());
        assert!(NcclError::LibraryMissing { hint: "x".into() }.is_unavailable());
        assert!(NcclError::UnsupportedVersion {
            found: NcclVersion::new(2, 10, 3),
            required: NcclVersion::new(2, 19, 0),
        }
        .is_unavailable());
    }
}
