//! The [`EplbCommunicator`] trait, the [`Backend`] names, [`TransferStats`] and
//! [`StagedLayer`]: what every backend returns and how a staged layer is committed.
//!
//! A transfer has two halves:
//!
//! 1. [`EplbCommunicator::transfer`] moves this rank's part of a layer's plan into
//!    staging. The weights are only read: they stay valid, with the old placement, until
//!    the commit. It returns once every row this rank needs has landed in staging **and**
//!    every peer finished reading from this rank, so no row a peer still reads is
//!    overwritten by the commit.
//! 2. [`StagedLayer::commit`] writes the staged rows into place, then fills duplicate rows
//!    from their freshly written primaries. It is purely local: it cannot fail on the
//!    network, and it checks everything before writing the first byte.
//!
//! Splitting them lets an asynchronous worker transfer while the serving thread keeps using
//! the old weights, and commit between two forward passes.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use moeshift_placement::{LayerPlan, RankPlan};
use moeshift_sync::Deadline;
use moeshift_tensor::Device;

use crate::error::EplbCommError;
use crate::pending::PendingCommit;
use crate::rearrange::{LayerMove, RearrangeError};
use crate::staging::{StagedRow, Staging};
use crate::weights::{LayerLayout, LayerWeights};

/// An EPLB communicator backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Staged through host memory over the host (TCP) transport of `moeshift-device-comm`:
    /// the role `torch_gloo` plays in vLLM. Works everywhere; slowest.
    Host,
    /// Grouped NCCL point-to-point in symmetric rounds between CUDA weights. Built with
    /// feature `cuda`; without it, selecting it returns
    /// [`EplbCommError::BackendUnavailable`].
    Nccl,
    /// Zero-copy one-sided READs from peers' registered weights through NIXL.
    Nixl,
}

impl Backend {
    /// Every backend, in the order of their names.
    pub const ALL: [Backend; 3] = [Backend::Host, Backend::Nccl, Backend::Nixl];

    /// The backend's name: `"host"`, `"nccl"` or `"nixl"`.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Host => "host",
            Backend::Nccl => "nccl",
            Backend::Nixl => "nixl",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = EplbCommError;

    /// Parses `"host"`, `"nccl"` or `"nixl"` (case-insensitive). `"auto"` is not a backend:
    /// parse a [`BackendChoice`] to accept it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "host" => Ok(Backend::Host),
            "nccl" => Ok(Backend::Nccl),
            "nixl" => Ok(Backend::Nixl),
            _ => Err(EplbCommError::UnknownBackend {
                name: s.to_string(),
            }),
        }
    }
}

/// What the user asked for: a backend, or `auto` (the default selection of
/// [`select_backend`](crate::select_backend)).
///
/// ```
/// use moeshift_eplb_comm::{Backend, BackendChoice};
/// assert_eq!("auto".parse::<BackendChoice>()?, BackendChoice::Auto);
/// assert_eq!("NIXL".parse::<BackendChoice>()?, BackendChoice::Explicit(Backend::Nixl));
/// assert!("gloo".parse::<BackendChoice>().is_err());
/// # Ok::<(), moeshift_eplb_comm::EplbCommError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BackendChoice {
    /// Let the default selection decide.
    #[default]
    Auto,
    /// This backend, or an error if it is unavailable (never a silent fallback).
    Explicit(Backend),
}

impl From<Backend> for BackendChoice {
    fn from(b: Backend) -> Self {
        BackendChoice::Explicit(b)
    }
}

impl From<Option<Backend>> for BackendChoice {
    fn from(b: Option<Backend>) -> Self {
        b.map_or(BackendChoice::Auto, BackendChoice::Explicit)
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendChoice::Auto => f.write_str("auto"),
            BackendChoice::Explicit(b) => b.fmt(f),
        }
    }
}

impl FromStr for BackendChoice {
    type Err = EplbCommError;

    /// Parses `"host"`, `"nccl"`, `"nixl"` or `"auto"` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("auto") {
            Ok(BackendChoice::Auto)
        } else {
            s.parse().map(BackendChoice::Explicit)
        }
    }
}

/// What one layer's transfer did on this rank. Byte counts are expert-row payload only
/// (message headers and control traffic are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TransferStats {
    /// Row bytes this rank sent to peers (or peers read from it).
    pub bytes_sent: u64,
    /// Row bytes this rank received from peers.
    pub bytes_received: u64,
    /// Row bytes copied from one local row to another: local copies staged during the
    /// transfer, plus duplicate fills once committed.
    pub bytes_copied_locally: u64,
    /// Distinct peers this rank exchanged rows with.
    pub peers: usize,
    /// Rounds of the plan in which this rank talked to a peer.
    pub rounds: usize,
    /// Bytes of staging memory this layer used: the rows received or copied, held until the
    /// commit, plus, for backends that pack rows before sending them (`nccl`), the packed
    /// rows.
    pub staging_bytes: u64,
    /// Wall time of the transfer, plus the commit's once committed.
    pub seconds: f64,
}

/// A layer whose changed rows are staged and ready to be committed; see the
/// [module documentation](self).
///
/// Staging holds only the rows that change on this rank: received primaries and local
/// copies. Duplicate rows of a received expert are filled at commit from the primary.
/// Dropping a `StagedLayer` without committing abandons the layer: the weights keep the
/// old placement.
///
/// The staging may be memory the communicator lends rather than memory of its own (the
/// `nixl` backend's registered landing area, which peers' rows are READ straight into):
/// committing or dropping the `StagedLayer` gives it back, and until then that
/// communicator refuses transfers that would need it
/// ([`EplbCommError::StagingInUse`]) rather than overwrite it.
#[derive(Debug)]
pub struct StagedLayer {
    layer: usize,
    rank: usize,
    backend: Backend,
    plan: RankPlan,
    layout: LayerLayout,
    staging: Staging,
    stats: TransferStats,
}

impl StagedLayer {
    /// A staged layer, for backends: `staging` must hold a row for every local copy and
    /// every receive of `plan` (checked at commit), filled with the rows' new content.
    pub(crate) fn new(
        layer: usize,
        rank: usize,
        backend: Backend,
        plan: RankPlan,
        layout: LayerLayout,
        staging: Staging,
        stats: TransferStats,
    ) -> Self {
        Self {
            layer,
            rank,
            backend,
            plan,
            layout,
            staging,
            stats,
        }
    }

    /// The layer.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// This rank (in the EPLB group).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The backend that staged it.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// This rank's part of the plan.
    pub fn plan(&self) -> &RankPlan {
        &self.plan
    }

    /// The layout the rows were staged for.
    pub fn layout(&self) -> &LayerLayout {
        &self.layout
    }

    /// The staged rows.
    pub fn staged_rows(&self) -> &[StagedRow] {
        self.staging.rows()
    }

    /// Statistics of the transfer so far.
    pub fn stats(&self) -> &TransferStats {
        &self.stats
    }

    /// The staged bytes of tensor `tensor` of staged row `index` (see
    /// [`staged_rows`](Self::staged_rows)), for inspection; `None` when the layer is staged
    /// in device memory.
    pub fn staged_bytes(&self, index: usize, tensor: usize) -> Option<&[u8]> {
        self.staging.row_tensor(index, tensor)
    }

    /// Where the staged rows live: the host, or the weights' GPU.
    pub fn staging_device(&self) -> Device {
        self.staging.device()
    }

    /// Writes the staged rows into `weights`, then fills duplicate rows from their
    /// primaries, and returns the layer's statistics. Purely local. Everything is checked
    /// first (same layout as staged, rows in range, weights on the staging's device), so on
    /// error nothing is written.
    ///
    /// Host weights are written by the CPU. CUDA weights (staged on their GPU) are written
    /// by device-to-device copies on a stream of the staging's own, and `commit` returns
    /// once the copies finished, so any stream sees the new rows afterwards; the caller
    /// must make sure no kernel still reads the replaced rows (for instance by committing
    /// between two forward passes, after synchronizing the serving stream). The GPU gets
    /// [`DEVICE_COMMIT_WAIT`] to finish the copies; [`commit_within`](Self::commit_within)
    /// takes a deadline instead.
    pub fn commit(self, weights: &mut LayerWeights<'_>) -> Result<TransferStats, EplbCommError> {
        self.commit_within(weights, Deadline::after(DEVICE_COMMIT_WAIT))
    }

    /// [`commit`](Self::commit), waiting for the GPU's copies at most until `deadline`
    /// ([`EplbCommError::DeviceTimeout`] after it). Host commits do not wait for anything.
    pub fn commit_within(
        self,
        weights: &mut LayerWeights<'_>,
        deadline: Deadline,
    ) -> Result<TransferStats, EplbCommError> {
        let started = Instant::now();
        self.check_commit(weights)?;
        if let Device::Cuda(_) = self.staging.device() {
            return self.commit_device(weights, deadline, started);
        }
        let tensors = self.layout.tensors.len();
        for (i, row) in self.staging.rows().iter().enumerate() {
            for t in 0..tensors {
                let src = self.staging.row_tensor(i, t).ok_or_else(|| {
                    self.mismatch(format!(
                        "staged row {i} (expert {}) has no bytes for tensor {t}",
                        row.expert
                    ))
                })?;
                weights.row_mut(t, row.dst_row)?.copy_from_slice(src);
            }
        }
        for fill in &self.plan.dup_fills {
            for t in 0..tensors {
                weights.copy_row(t, fill.src_row, fill.dst_row)?;
            }
        }
        Ok(self.finish_stats(started))
    }

    /// Starts the commit and returns without waiting for the GPU: the same checks and writes
    /// as [`commit`](Self::commit), but a device commit's copies are only queued (on the
    /// staging's own stream), so this rank can go on with the next layer's transfer while
    /// they run. The returned [`PendingCommit`] mutably borrows `weights` until it is
    /// waited for or dropped, so the layer can be neither used nor transferred again before
    /// its new rows are in place; it also keeps the staging (or the landing slot it
    /// borrows) until the copies finished. Host commits are written before this returns.
    ///
    /// On error nothing was written (everything is checked before the first copy is
    /// queued), except when the driver fails while queueing, in which case the copies
    /// already queued are waited for before the error is returned.
    pub fn commit_async<'w>(
        self,
        weights: &'w mut LayerWeights<'_>,
    ) -> Result<PendingCommit<'w>, EplbCommError> {
        if let Device::Cuda(_) = self.staging.device() {
            self.check_commit(weights)?;
            return self.queue_device(weights);
        }
        let (rank, layer) = (self.rank, self.layer);
        let stats = self.commit_within(weights, Deadline::after(DEVICE_COMMIT_WAIT))?;
        Ok(PendingCommit::finished(rank, layer, stats))
    }

    /// Queues a device commit (feature `cuda`).
    #[cfg(feature = "cuda")]
    fn queue_device<'w>(
        self,
        weights: &'w mut LayerWeights<'_>,
    ) -> Result<PendingCommit<'w>, EplbCommError> {
        let started = Instant::now();
        let done = crate::cuda_stage::commit::queue_commit_on_device(
            self.rank,
            self.layer,
            &self.staging,
            &self.plan,
            weights,
        )?;
        let stats = self.stats_with_fills();
        Ok(PendingCommit::on_device(
            self.rank,
            self.layer,
            stats,
            started,
            done,
            self.staging,
        ))
    }

    /// Without feature `cuda` no layer is staged in device memory.
    #[cfg(not(feature = "cuda"))]
    fn queue_device<'w>(
        self,
        _weights: &'w mut LayerWeights<'_>,
    ) -> Result<PendingCommit<'w>, EplbCommError> {
        Err(self.mismatch("device staging needs feature `cuda`".into()))
    }

    /// Device-to-device copies from device staging (feature `cuda`).
    #[cfg(feature = "cuda")]
    fn commit_device(
        self,
        weights: &mut LayerWeights<'_>,
        deadline: Deadline,
        started: Instant,
    ) -> Result<TransferStats, EplbCommError> {
        crate::cuda_stage::commit::commit_on_device(
            self.rank,
            self.layer,
            &self.staging,
            &self.plan,
            weights,
            deadline,
        )?;
        Ok(self.finish_stats(started))
    }

    /// Without feature `cuda` no layer is staged in device memory.
    #[cfg(not(feature = "cuda"))]
    fn commit_device(
        self,
        _weights: &mut LayerWeights<'_>,
        _deadline: Deadline,
        _started: Instant,
    ) -> Result<TransferStats, EplbCommError> {
        Err(self.mismatch("device staging needs feature `cuda`".into()))
    }

    /// The transfer's statistics plus the duplicate fills and the commit's time.
    fn finish_stats(&self, started: Instant) -> TransferStats {
        let mut stats = self.stats_with_fills();
        stats.seconds += started.elapsed().as_secs_f64();
        stats
    }

    /// The transfer's statistics plus the duplicate fills.
    fn stats_with_fills(&self) -> TransferStats {
        let mut stats = self.stats;
        let fills =
            (self.plan.dup_fills.len() as u64).saturating_mul(self.layout.expert_bytes() as u64);
        stats.bytes_copied_locally = stats.bytes_copied_locally.saturating_add(fills);
        stats
    }

    fn mismatch(&self, detail: String) -> EplbCommError {
        EplbCommError::CommitMismatch {
            rank: self.rank,
            layer: self.layer,
            detail,
        }
    }

    /// Everything a commit relies on, checked before the first write.
    fn check_commit(&self, weights: &LayerWeights<'_>) -> Result<(), EplbCommError> {
        let layout = weights.layout();
        if let Some((tensor, detail)) = self.layout.first_difference(&layout) {
            let which = tensor
                .map(|t| format!("tensor {t:?}: "))
                .unwrap_or_default();
            return Err(self.mismatch(format!(
                "the weights differ from the ones staged for: {which}{detail}"
            )));
        }
        let staged_on = self.staging.device();
        if weights.device() != staged_on {
            let name = weights
                .tensors()
                .first()
                .map(|t| t.name().to_string())
                .unwrap_or_default();
            if staged_on == Device::Host {
                return Err(EplbCommError::NotHostMemory {
                    tensor: name,
                    device: weights.device(),
                    what: "committing host-staged rows",
                });
            }
            return Err(self.mismatch(format!(
                "the rows are staged on {staged_on} but tensor {name:?} lives on {}",
                weights.device()
            )));
        }
        let rows = layout.rows;
        let in_range = |row: usize| row < rows;
        let staged = self.staging.rows();
        let expected = self.plan.local_copies.len() + self.plan.recvs.len();
        if staged.len() != expected {
            return Err(self.mismatch(format!(
                "{} rows are staged but the plan has {} local copies and {} receives",
                staged.len(),
                self.plan.local_copies.len(),
                self.plan.recvs.len()
            )));
        }
        for (i, r) in staged.iter().enumerate() {
            if !in_range(r.dst_row) {
                return Err(self.mismatch(format!(
                    "staged row {i} (expert {}) targets row {} of {rows}",
                    r.expert, r.dst_row
                )));
            }
            if !self
                .staging
                .has_row_tensor(i, self.layout.tensors.len().saturating_sub(1))
            {
                return Err(
                    self.mismatch(format!("staged row {i} (expert {}) is truncated", r.expert))
                );
            }
        }
        for f in &self.plan.dup_fills {
            if !in_range(f.src_row) || !in_range(f.dst_row) {
                return Err(self.mismatch(format!(
                    "duplicate fill of expert {} from row {} to row {} is outside {rows} rows",
                    f.expert, f.src_row, f.dst_row
                )));
            }
        }
        Ok(())
    }
}

/// How long [`StagedLayer::commit`] lets the GPU take for a device commit's copies.
pub const DEVICE_COMMIT_WAIT: Duration = Duration::from_secs(30);

/// Executes a layer's transfer plan over some transport. See the
/// [module documentation](self) for the contract of the two halves.
pub trait EplbCommunicator {
    /// Which backend this is.
    fn backend(&self) -> Backend;

    /// This rank in the EPLB group.
    fn rank(&self) -> usize;

    /// Moves this rank's part of `plan` for `layer`. Returns once every row this rank needs
    /// has landed in staging **and** every peer finished reading from this rank. The
    /// weights are **not** modified: they stay valid (old placement) until
    /// [`StagedLayer::commit`]. Every rank of the EPLB group calls it for the same layers in
    /// the same order, with the same plan; a plan that differs between ranks is a typed
    /// error on every rank, never corruption.
    fn transfer(
        &mut self,
        layer: usize,
        plan: &LayerPlan,
        weights: &LayerWeights<'_>,
        deadline: Deadline,
    ) -> Result<StagedLayer, EplbCommError>;

    /// [`transfer`](Self::transfer) then [`StagedLayer::commit`], for synchronous use. On
    /// error the weights are untouched.
    fn transfer_and_commit(
        &mut self,
        layer: usize,
        plan: &LayerPlan,
        weights: &mut LayerWeights<'_>,
        deadline: Deadline,
    ) -> Result<TransferStats, EplbCommError> {
        let staged = self.transfer(layer, plan, weights, deadline)?;
        staged.commit(weights)
    }

    /// Moves several layers, one rearrangement of the model: every layer's plan is
    /// transferred and committed, in the order given, and the statistics of each are
    /// returned in that order. Every rank of the EPLB group calls it with the same layers
    /// and plans; each layer appears at most once.
    ///
    /// Layers are pipelined: a layer's commit ([`StagedLayer::commit_async`]) runs on the
    /// GPU while the next layer is transferred, and backends may overlap more (the `nixl`
    /// backend agrees on all plans at once and exchanges a layer's post-read check while
    /// the next layer's READs run). Each layer keeps the all-or-nothing rule of
    /// [`transfer`](Self::transfer): its weights change only once every rank has all its
    /// rows. On error, the layers committed before the failure are named in the
    /// [`RearrangeError`] (their commits finished); the failing layer and the ones after it
    /// keep their old weights.
    fn rearrange(
        &mut self,
        moves: &mut [LayerMove<'_, '_>],
        deadline: Deadline,
    ) -> Result<Vec<TransferStats>, RearrangeError> {
        crate::rearrange::in_turn(self, moves, deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::{RowSource, StagingBuilder};
    use moeshift_placement::LocalCopy;
    use moeshift_tensor::{DType, HostBuffer};

    #[test]
    fn staged_layers_and_host_communicators_cross_threads() {
        // The asynchronous worker transfers on its own thread and hands staged layers to the
        // serving thread, which commits into weights it shares with the worker.
        fn send<T: Send>() {}
        fn sync<T: Sync>() {}
        send::<StagedLayer>();
        sync::<StagedLayer>();
        send::<crate::HostCommunicator>();
        send::<LayerWeights<'static>>();
        sync::<LayerWeights<'static>>();
        send::<EplbCommError>();
        sync::<EplbCommError>();
    }

    #[test]
    fn backend_names_parse_and_print() {
        for b in Backend::ALL {
            assert_eq!(b.to_string().parse::<Backend>().unwrap(), b);
            assert_eq!(
                b.name().parse::<BackendChoice>().unwrap(),
                BackendChoice::Explicit(b)
            );
        }
        assert_eq!(" Host ".parse::<Backend>().unwrap(), Backend::Host);
        assert!(matches!(
            "auto".parse::<Backend>(),
            Err(EplbCommError::UnknownBackend { .. })
        ));
        assert_eq!(
            "AUTO".parse::<BackendChoice>().unwrap(),
            BackendChoice::Auto
        );
        assert_eq!(BackendChoice::from(None), BackendChoice::Auto);
        assert_eq!(BackendChoice::from(Some(Backend::Nccl)).to_string(), "nccl");
        let err = "torch_gloo".parse::<BackendChoice>().unwrap_err();
        assert!(err.to_string().contains("torch_gloo"), "{err}");
    }

    /// Rank plan for 3 rows: row 0 unchanged, row 1 ← local copy of row 0 (expert 5), row 2
    /// ← expert 8 received, and (for the fill) row 1 … built by hand.
    fn staged(layout: &LayerLayout) -> StagedLayer {
        let plan = RankPlan {
            local_copies: vec![LocalCopy {
                expert: 5,
                src_row: 0,
                dst_row: 1,
            }],
            sends: vec![],
            recvs: vec![moeshift_placement::RecvOp {
                src: 1,
                expert: 8,
                dst_row: 2,
                round: 0,
            }],
            dup_fills: vec![LocalCopy {
                expert: 8,
                src_row: 2,
                dst_row: 3,
            }],
            unchanged_rows: vec![0],
        };
        let mut b = StagingBuilder::new(layout);
        b.push_row(1, 5, RowSource::Local { src_row: 0 });
        b.push_row(2, 8, RowSource::Peer { peer: 1, round: 0 });
        let mut s = b.build(0, 0).unwrap();
        s.row_tensor_mut(0, 0).unwrap().fill(0x55);
        s.row_tensor_mut(1, 0).unwrap().fill(0x88);
        StagedLayer::new(
            0,
            0,
            Backend::Host,
            plan,
            layout.clone(),
            s,
            TransferStats::default(),
        )
    }

    #[test]
    fn commit_writes_staged_rows_then_duplicate_fills() {
        let mut buf = HostBuffer::zeroed(4 * 6).unwrap();
        buf.as_mut_slice().fill(0x11);
        let mut w = LayerWeights::builder()
            .host("x", &mut buf, &[4, 6], DType::U8)
            .unwrap()
            .build()
            .unwrap();
        let s = staged(&w.layout());
        assert_eq!(s.staged_rows().len(), 2);
        assert_eq!(s.staged_bytes(1, 0), Some(&[0x88u8; 6][..]));
        let stats = s.commit(&mut w).unwrap();
        // One duplicate fill of 6 bytes.
        assert_eq!(stats.bytes_copied_locally, 6);
        drop(w);
        let mut expected = vec![0x11u8; 6];
        expected.extend([0x55; 6]);
        expected.extend([0x88; 6]);
        expected.extend([0x88; 6]);
        assert_eq!(buf.as_slice(), &expected[..]);
    }

    #[test]
    fn commit_into_other_weights_writes_nothing() {
        let mut buf = HostBuffer::zeroed(4 * 6).unwrap();
        let layout = LayerWeights::builder()
            .host("x", &mut buf, &[4, 6], DType::U8)
            .unwrap()
            .build()
            .unwrap()
            .layout();
        let s = staged(&layout);
        let mut other = HostBuffer::zeroed(4 * 8).unwrap();
        let mut w = LayerWeights::builder()
            .host("x", &mut other, &[4, 8], DType::U8)
            .unwrap()
            .build()
            .unwrap();
        let err = s.commit(&mut w).unwrap_err();
        assert!(matches!(err, EplbCommError::CommitMismatch { .. }), "{err}");
        assert!(err.to_string().contains("\"x\""), "{err}");
        drop(w);
        assert!(other.as_slice().iter().all(|&b| b == 0));
    }
}
