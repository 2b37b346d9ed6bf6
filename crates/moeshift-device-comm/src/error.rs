//! [`CommError`], the error type of the rendezvous store and the host transport, and
//! [`RankRef`], how errors name a rank.

use std::fmt;
use std::time::Duration;

use crate::world::WorldError;

/// A rank as seen from a group: its group-local rank and its global rank.
///
/// Displays as `rank 2` when both agree and as `rank 2 (global rank 5)` otherwise, so an
/// error in a sub-group always tells which process is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RankRef {
    /// Rank inside the group.
    pub local: usize,
    /// Rank in the world.
    pub global: usize,
}

impl fmt::Display for RankRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.local == self.global {
            write!(f, "rank {}", self.global)
        } else {
            write!(f, "rank {} (global rank {})", self.local, self.global)
        }
    }
}

fn list(ranks: &[RankRef]) -> String {
    let parts: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    parts.join(", ")
}

/// Errors of the rendezvous store and the host transport.
///
/// Every message names the rank that reports it and, where one is involved, the peer rank,
/// the group, the operation and the store key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommError {
    /// The rank variables are missing or invalid.
    #[error(transparent)]
    World(#[from] WorldError),

    /// Rank 0 could not open the store's listening socket.
    #[error("rank {rank}: cannot host the rendezvous store on {addr}: {source}")]
    StoreBind {
        /// Rank that tried (normally 0).
        rank: usize,
        /// Address it tried to listen on.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },

    /// The store could not be reached before the deadline.
    #[error("rank {rank}: could not reach the rendezvous store at {addr} (hosted by rank 0) before the deadline; {attempts} attempt(s), last error: {last_error}")]
    StoreUnreachable {
        /// Rank that tried to connect.
        rank: usize,
        /// The store's address.
        addr: String,
        /// Connection attempts made.
        attempts: u32,
        /// The last connection error.
        last_error: String,
    },

    /// A store request failed on the wire (the store went away, or sent garbage).
    #[error("rank {rank}: store {op} via {addr} failed: {detail}")]
    StoreIo {
        /// Rank that sent the request.
        rank: usize,
        /// The store's address.
        addr: String,
        /// The request, e.g. `get("nccl/id")`.
        op: String,
        /// What went wrong.
        detail: String,
    },

    /// The store answered a request with an error.
    #[error("rank {rank}: the rendezvous store refused {op}: {reason}")]
    StoreRejected {
        /// Rank that sent the request.
        rank: usize,
        /// The request.
        op: String,
        /// The store's reason.
        reason: String,
    },

    /// Keys did not appear in the store before the deadline.
    #[error("rank {rank}: store {op} timed out; keys still missing: {missing:?}")]
    StoreTimeout {
        /// Rank that waited.
        rank: usize,
        /// The request.
        op: String,
        /// Keys that never appeared.
        missing: Vec<String>,
    },

    /// A store barrier timed out.
    #[error("rank {rank}: barrier {name:?} timed out; ranks that did not arrive: {missing:?}")]
    BarrierTimeout {
        /// Rank that waited.
        rank: usize,
        /// Barrier name.
        name: String,
        /// Global ranks that never reached the barrier.
        missing: Vec<usize>,
    },

    /// A host group could not be formed.
    #[error("group {group:?}: {rank} could not form the group: {detail}")]
    GroupSetup {
        /// Group name.
        group: String,
        /// The rank reporting.
        rank: RankRef,
        /// What went wrong.
        detail: String,
    },

    /// Group members did not connect before the deadline.
    #[error("group {group:?}: {rank} timed out forming the group; missing: {}", list(.missing))]
    GroupSetupTimeout {
        /// Group name.
        group: String,
        /// The rank reporting.
        rank: RankRef,
        /// Ranks that did not publish their address or did not connect.
        missing: Vec<RankRef>,
    },

    /// The connection to a peer broke (the peer exited, was killed, or reset).
    #[error("group {group:?}: {rank} lost {peer} during {op}: {detail}")]
    PeerLost {
        /// Group name.
        group: String,
        /// The rank reporting.
        rank: RankRef,
        /// The peer whose connection broke.
        peer: RankRef,
        /// The operation in progress.
        op: String,
        /// What happened on the connection.
        detail: String,
    },

    /// A peer gave up on the group and said why.
    #[error(
        "group {group:?}: {peer} aborted the group, so {rank} stopped {op}; its reason: {reason}"
    )]
    PeerAborted {
        /// Group name.
        group: String,
        /// The rank reporting.
        rank: RankRef,
        /// The peer that aborted.
        peer: RankRef,
        /// The operation in progress here.
        op: String,
        /// The peer's own error.
        reason: String,
    },

    /// Two ranks called different operations, or the same one with different sizes.
    #[error("group {group:?}: mismatched calls: {rank} is in {expected}, but {peer} sent {got}")]
    Mismatch {
        /// Group name.
        group: String,
        /// The rank reporting.
        rank: RankRef,
        /// The peer whose message did not match.
        peer: RankRef,
        /// What this rank expected (its own operation).
        expected: String,
        /// What the peer sent (its operation).
        got: String,
    },

    /// An operation did not complete before its deadline.
    #[error("group {group:?}: {rank} timed out in {op} after {waited:.1?}, waiting for {}", list(.waiting_for))]
    Timeout {
        /// Group name.
        group: String,
        /// The rank reporting.
        rank: RankRef,
        /// The operation.
        op: String,
        /// Peers whose messages or acknowledgements never came.
        waiting_for: Vec<RankRef>,
        /// How long the operation ran.
        waited: Duration,
    },

    /// An earlier operation on this group failed; the group cannot be used any more.
    #[error("group {group:?}: {rank} cannot run {op}: the group failed earlier: {cause}")]
    Poisoned {
        /// Group name.
        group: String,
        /// The rank reporting.
        rank: RankRef,
        /// The refused operation.
        op: String,
        /// The first failure.
        cause: String,
    },

    /// A caller passed arguments that cannot work (wrong count of buffers, rank out of range…).
    #[error("{context}: invalid argument: {detail}")]
    InvalidArgument {
        /// Where, e.g. `group "world" rank 1: all_to_all_v`.
        context: String,
        /// What is wrong.
        detail: String,
    },

    /// An operating-system call failed outside a peer connection.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_ref_shows_global_rank_only_when_it_differs() {
        assert_eq!(
            RankRef {
                local: 2,
                global: 2
            }
            .to_string(),
            "rank 2"
        );
        assert_eq!(
            RankRef {
                local: 1,
                global: 5
            }
            .to_string(),
            "rank 1 (global rank 5)"
        );
    }

    #[test]
    fn timeout_lists_every_missing_peer() {
        let err = CommError::Timeout {
            group: "world".into(),
            rank: RankRef {
                local: 0,
                global: 0,
            },
            op: "all_gather #3".into(),
            waiting_for: vec![
                RankRef {
                    local: 2,
                    global: 2,
                },
                RankRef {
                    local: 3,
                    global: 7,
                },
            ],
            waited: Duration::from_millis(1500),
        };
        let text = err.to_string();
        assert!(text.contains("rank 2, rank 3 (global rank 7)"), "{text}");
        assert!(
            text.contains("all_gather #3") && text.contains("\"world\""),
            "{text}"
        );
    }
}
