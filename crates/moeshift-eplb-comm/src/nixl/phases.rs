//! [`NixlPhases`]: where the time of one layer's transfer went on this rank.

/// Where one layer's [`transfer`](crate::EplbCommunicator::transfer) spent its time on this
/// rank, in wall-clock seconds of the calling thread, phase by phase (see
/// [`NixlCommunicator`](super::NixlCommunicator), "A layer"). The phases do not overlap;
/// what is left of [`total`](Self::total) is bookkeeping between them.
///
/// The commit is not part of the transfer: [`StagedLayer::commit`](crate::StagedLayer::commit)
/// returns statistics whose [`seconds`](crate::TransferStats::seconds) are the transfer's
/// plus the commit's, so the commit took their difference.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NixlPhases {
    /// The layer.
    pub layer: usize,
    /// Local checks, laying out the READs, and the plan agreement with every rank (which
    /// also waits for the slowest rank to arrive).
    pub agreement: f64,
    /// Local copies, where they do not run behind the READs: host weights are copied by the
    /// CPU before any READ is posted; device copies are queued while the READs run, and
    /// only queueing them and waiting for them after the READs completed count here.
    pub local_copies: f64,
    /// Posting every READ request until the last one completed.
    pub reads: f64,
    /// The post-read status exchange with every rank (0 when nothing crossed ranks).
    pub status_exchange: f64,
    /// The whole transfer (what [`TransferStats::seconds`](crate::TransferStats::seconds)
    /// reports before the commit).
    pub total: f64,
    /// READ requests posted: up to [`read_streams`](super::NixlConfig::read_streams) per
    /// peer this rank received rows from (fewer where a peer's rows cannot be split that
    /// far).
    pub read_requests: usize,
    /// Bytes READ from peers.
    pub bytes_read: u64,
}

impl NixlPhases {
    /// The phases by name, in the order they run: `agreement`, `local_copies`, `reads`,
    /// `status_exchange`.
    pub fn named(&self) -> [(&'static str, f64); 4] {
        [
            ("agreement", self.agreement),
            ("local_copies", self.local_copies),
            ("reads", self.reads),
            ("status_exchange", self.status_exchange),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_named_in_the_order_they_run() {
        let p = NixlPhases {
            layer: 3,
            agreement: 1.0,
            local_copies: 2.0,
            reads: 3.0,
            status_exchange: 4.0,
            total: 10.5,
            read_requests: 4,
            bytes_read: 1 << 20,
        };
        // Each name reports its own field.
        assert_eq!(
            p.named(),
            [
                ("agreement", 1.0),
                ("local_copies", 2.0),
                ("reads", 3.0),
                ("status_exchange", 4.0)
            ]
        );
    }
}
