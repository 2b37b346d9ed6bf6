//! [`PendingCommit`]: a commit whose copies may still be running on the GPU.
//!
//! [`StagedLayer::commit_async`](crate::StagedLayer::commit_async) queues a device commit's
//! copies and returns at once, so the next layer's transfer can run while the GPU writes
//! this one. The pending commit keeps what the copies read (the staging, or the landing slot
//! it borrows) alive until they finished, and mutably borrows the layer's weights, so
//! nothing else can read or write them (nor transfer that layer again) before it is waited
//! for.

use std::marker::PhantomData;
use std::time::Instant;

use moeshift_sync::Deadline;

use crate::comm::{TransferStats, DEVICE_COMMIT_WAIT};
use crate::error::EplbCommError;

/// A commit that was started and may not have finished yet; see the
/// [module documentation](self).
///
/// [`wait`](Self::wait) for it to get the layer's statistics. Dropping it without waiting
/// blocks until the copies finished (at most [`DEVICE_COMMIT_WAIT`]); if they do not finish
/// in time, the staging they read is never released (a landing slot stays held, so its
/// communicator refuses to reuse it) rather than risk overwriting it under them.
#[derive(Debug)]
#[must_use = "a pending commit must be waited for before its weights are used"]
pub struct PendingCommit<'w> {
    /// This rank (names device errors).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    rank: usize,
    layer: usize,
    stats: TransferStats,
    started: Instant,
    state: State,
    _weights: PhantomData<&'w mut ()>,
}

#[derive(Debug)]
enum State {
    /// Nothing runs (a host commit, written before `commit_async` returned; or waited for).
    Done,
    /// Copies queued on a GPU stream, finished once `done` completed.
    #[cfg(feature = "cuda")]
    Device {
        done: cudarc::driver::CudaEvent,
        /// What the copies read, kept until they finished.
        staging: Box<crate::staging::Staging>,
    },
}

impl<'w> PendingCommit<'w> {
    /// A commit that already finished, with its final statistics.
    pub(crate) fn finished(rank: usize, layer: usize, stats: TransferStats) -> Self {
        Self {
            rank,
            layer,
            stats,
            started: Instant::now(),
            state: State::Done,
            _weights: PhantomData,
        }
    }

    /// A device commit whose copies end with `done`, started at `started`; `stats` are the
    /// layer's statistics without the commit's time.
    #[cfg(feature = "cuda")]
    pub(crate) fn on_device(
        rank: usize,
        layer: usize,
        stats: TransferStats,
        started: Instant,
        done: cudarc::driver::CudaEvent,
        staging: crate::staging::Staging,
    ) -> Self {
        Self {
            rank,
            layer,
            stats,
            started,
            state: State::Device {
                done,
                staging: Box::new(staging),
            },
            _weights: PhantomData,
        }
    }

    /// The layer being committed.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// True once the commit finished (without waiting). A driver error is returned as such.
    pub fn is_complete(&self) -> Result<bool, EplbCommError> {
        match &self.state {
            State::Done => Ok(true),
            #[cfg(feature = "cuda")]
            State::Device { done, .. } => done.try_is_complete().map_err(|e| {
                crate::cuda_stage::memory::driver_error(
                    self.rank,
                    Some(self.layer),
                    "asking whether the commit's copies finished".into(),
                    e,
                )
            }),
        }
    }

    /// Waits until the commit finished, at most until `deadline`
    /// ([`EplbCommError::DeviceTimeout`] after it), and returns the layer's statistics:
    /// the transfer's plus the commit's time (from the start of the commit until this call
    /// saw it finished) and the duplicate fills.
    pub fn wait(mut self, deadline: Deadline) -> Result<TransferStats, EplbCommError> {
        self.wait_inner(deadline)?;
        let mut stats = self.stats;
        stats.seconds += self.started.elapsed().as_secs_f64();
        Ok(stats)
    }

    /// Waits for the copies; on failure the staging is never released.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn wait_inner(&mut self, deadline: Deadline) -> Result<(), EplbCommError> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Done => Ok(()),
            #[cfg(feature = "cuda")]
            State::Device { done, staging } => {
                let waited =
                    crate::cuda_stage::commit::wait_commit(self.rank, self.layer, &done, deadline);
                if waited.is_err() {
                    // The copies may still read it: never give it back.
                    std::mem::forget(staging);
                }
                waited
            }
        }
    }
}

impl Drop for PendingCommit<'_> {
    fn drop(&mut self) {
        let _ = self.wait_inner(Deadline::after(DEVICE_COMMIT_WAIT));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_commit_is_complete_and_keeps_its_statistics() {
        let stats = TransferStats {
            bytes_received: 7,
            seconds: 0.5,
            ..TransferStats::default()
        };
        let p = PendingCommit::finished(1, 3, stats);
        assert_eq!(p.layer(), 3);
        assert!(p.is_complete().unwrap());
        let got = p
            .wait(Deadline::after(std::time::Duration::from_secs(1)))
            .unwrap();
        assert_eq!(got.bytes_received, 7);
        assert!(got.seconds >= 0.5);
    }

    #[test]
    fn a_pending_commit_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<PendingCommit<'static>>();
    }
}
