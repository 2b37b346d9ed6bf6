//! The engine traits: [`WorkerEngine`] (the receiving side, driven by
//! [`WeightReceiver`](crate::WeightReceiver)) and [`TrainerEngine`] (the sending side), and
//! the trainer's input types.
//!
//! An engine moves bytes; everything engine-independent (validating the update info,
//! resolving "reuse the previous metadata", checking the update against the registry, the
//! session state machine) lives in the lifecycle, so the `host` engine here and the NCCL and
//! CUDA-IPC engines share it.
//!
//! # A session, seen from the worker
//!
//! 1. [`WorkerEngine::start`] prepares (e.g. a layerwise reload for device engines).
//! 2. For each update: engines that carry the update info in band return it from
//!    [`WorkerEngine::announcement`]; the lifecycle validates it and either calls
//!    [`WorkerEngine::receive`] with the prepared update or [`WorkerEngine::reject`] with
//!    the reason, so the engine can tell the trainer instead of leaving it sending into the
//!    void.
//! 3. [`WorkerEngine::finish`] finalizes; after any error [`WorkerEngine::abort`] drops
//!    whatever the engine staged.

use std::time::Duration;

use moeshift_sync::Deadline;

use crate::auto::{AutoPolicy, Choice};
use crate::control::{ParamCount, SessionUpdate};
use crate::digest::Digest;
use crate::error::TransferError;
use crate::info::{ResolvedUpdate, UpdateInfo};
use crate::meta::ParamMeta;
use crate::patch::{diff, SparsePatch};
use crate::registry::{ParamRegistry, ParamStorage};

/// What an engine can move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Dense, one message per parameter.
    pub dense: bool,
    /// Dense, packed in chunks with headers.
    pub packed: bool,
    /// Sparse patches.
    pub sparse: bool,
    /// The trainer sends the update info in band, before the payload.
    pub info_in_band: bool,
}

impl Capabilities {
    /// Everything: dense, packed and sparse updates, with the info in band.
    pub(crate) const ALL: Self = Self {
        dense: true,
        packed: true,
        sparse: true,
        info_in_band: true,
    };
}

/// What an in-band engine received from the trainer next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// Another update of the current session.
    Update {
        /// The update info, as the trainer sent it.
        info: UpdateInfo,
        /// The trainer's [`metadata_digest`](crate::metadata_digest) of the update's
        /// parameters, when the engine carries one.
        metadata_digest: Option<Digest>,
    },
    /// The trainer ended the session.
    End,
}

/// An update that passed every check on this worker: validated info, resolved metadata and
/// the registry slot of every parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedUpdate {
    /// The update.
    pub update: ResolvedUpdate,
    /// `slots[i]` is the registry slot of `update.params[i]`.
    pub slots: Vec<usize>,
}

/// What one received update did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpdateReport {
    /// Parameters written.
    pub params: usize,
    /// Payload bytes received (values, and indices for sparse).
    pub payload_bytes: usize,
    /// Chunks received (packed updates).
    pub chunks: usize,
    /// Time from the announcement to the last byte applied.
    pub elapsed: Duration,
}

/// The receiving side of an engine.
pub trait WorkerEngine {
    /// The memory of the parameters it writes (host bytes, device views).
    type Storage: ParamStorage;

    /// Short name for errors, e.g. `"host"`.
    fn name(&self) -> &'static str;

    /// What the engine can receive.
    fn capabilities(&self) -> Capabilities;

    /// This worker's rank in the transfer group (the trainer is rank 0).
    fn rank(&self) -> usize;

    /// Prepares for a session.
    fn start(&mut self, _deadline: Deadline) -> Result<(), TransferError> {
        Ok(())
    }

    /// The trainer's next announcement, for engines with
    /// [`Capabilities::info_in_band`]; others keep the default, which refuses.
    fn announcement(&mut self, _deadline: Deadline) -> Result<Announcement, TransferError> {
        Err(TransferError::Unsupported {
            engine: self.name(),
            what: "in-band update info: pass the info to update()".into(),
        })
    }

    /// Tells the trainer (and peers) that this worker refuses the announced update. Called
    /// by the lifecycle when an announced update fails validation here. The default does
    /// nothing (engines without a back channel).
    fn reject(
        &mut self,
        _reason: &TransferError,
        _deadline: Deadline,
    ) -> Result<(), TransferError> {
        Ok(())
    }

    /// Receives the payload of a prepared update and applies it to `registry`. An error
    /// must leave every parameter either as it was or fully updated; which, is the engine's
    /// documented staging rule.
    fn receive(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<Self::Storage>,
        deadline: Deadline,
    ) -> Result<UpdateReport, TransferError>;

    /// Finalizes a session. In-band engines also consume the trainer's end marker here,
    /// unless [`WorkerEngine::announcement`] already returned it (then the lifecycle calls
    /// `finish` right after).
    fn finish(&mut self, _deadline: Deadline) -> Result<(), TransferError> {
        Ok(())
    }

    /// Drops anything staged after an error. Must not block.
    fn abort(&mut self) {}
}

/// One parameter's full new value, trainer side.
#[derive(Debug, Clone, Copy)]
pub struct DenseParam<'a> {
    /// Name, dtype and shape.
    pub meta: &'a ParamMeta,
    /// `meta.byte_len()` bytes.
    pub data: &'a [u8],
}

/// One parameter's sparse patch, trainer side.
#[derive(Debug, Clone, Copy)]
pub struct SparseParam<'a> {
    /// Name, dtype and shape (sent in the update info; the worker checks them).
    pub meta: &'a ParamMeta,
    /// The patch; its name and dtype must match `meta`.
    pub patch: &'a SparsePatch,
}

/// One parameter for [`TrainerEngine::send_auto`]: its value at the last transfer and now.
#[derive(Debug, Clone, Copy)]
pub struct AutoParam<'a> {
    /// Name, dtype and shape.
    pub meta: &'a ParamMeta,
    /// The bytes the workers hold (the last value sent).
    pub previous: &'a [u8],
    /// The new bytes.
    pub current: &'a [u8],
}

/// One update of a session, trainer side.
#[derive(Debug, Clone, Copy)]
pub enum Outgoing<'a> {
    /// Full values.
    Dense {
        /// The parameters.
        params: &'a [DenseParam<'a>],
        /// Send packed in chunks.
        packed: bool,
    },
    /// Patches.
    Sparse {
        /// The parameters.
        params: &'a [SparseParam<'a>],
    },
}

/// What a trainer send did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SendReport {
    /// Updates sent (empty ones are skipped).
    pub updates: usize,
    /// Parameters sent dense.
    pub dense_params: usize,
    /// Parameters sent sparse.
    pub sparse_params: usize,
    /// Parameters left out because nothing changed ([`TrainerEngine::send_auto`]).
    pub unchanged_params: usize,
    /// Payload bytes sent to each worker.
    pub payload_bytes: usize,
    /// Time from the first announcement to the last acknowledgement.
    pub elapsed: Duration,
    /// Where that time went, summed over the session's updates.
    pub phases: Phases,
}

/// Where a trainer's session spent its time, summed over its updates (see the control
/// protocol in the crate docs). `elapsed` is about the sum of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Phases {
    /// Checks before the first announcement (update infos, patches, data lengths) and
    /// waiting for pending work on the trainer's device.
    pub prepare: Duration,
    /// Broadcasting the first announcement (later ones ride on the status round before them).
    pub announce: Duration,
    /// Vote rounds (none for updates whose payload travels before the vote).
    pub vote: Duration,
    /// Moving the payloads, including any per-chunk rounds of the engine.
    pub payload: Duration,
    /// The status round that ends each update (it carries the next announcement, or the
    /// end of the session).
    pub status: Duration,
    /// A separate end marker: only for a session without updates.
    pub end: Duration,
}

impl Phases {
    /// The sum of every phase.
    pub fn total(&self) -> Duration {
        self.prepare + self.announce + self.vote + self.payload + self.status + self.end
    }
}

/// The sending side of an engine.
pub trait TrainerEngine {
    /// Short name for errors.
    fn name(&self) -> &'static str;

    /// What the engine can send.
    fn capabilities(&self) -> Capabilities;

    /// Whether [`TrainerEngine::send_dense`] packs (the engine's configuration).
    fn packs_dense(&self) -> bool;

    /// Sends one session made of `updates`, in order. Every update is checked before its
    /// first byte leaves (data lengths, patches against their metadata). Empty updates are
    /// skipped.
    fn send_session(
        &mut self,
        updates: &[Outgoing<'_>],
        deadline: Deadline,
    ) -> Result<SendReport, TransferError>;

    /// One session with one dense update of `params`.
    fn send_dense(
        &mut self,
        params: &[DenseParam<'_>],
        deadline: Deadline,
    ) -> Result<SendReport, TransferError> {
        let packed = self.packs_dense();
        self.send_session(&[Outgoing::Dense { params, packed }], deadline)
    }

    /// One session with one sparse update of `params`.
    fn send_sparse(
        &mut self,
        params: &[SparseParam<'_>],
        deadline: Deadline,
    ) -> Result<SendReport, TransferError> {
        self.send_session(&[Outgoing::Sparse { params }], deadline)
    }

    /// Diffs every parameter and sends each the cheaper way under `policy`: one session
    /// with a dense update (if any parameter went dense) then a sparse update (if any went
    /// sparse). Unchanged parameters are left out.
    fn send_auto(
        &mut self,
        params: &[AutoParam<'_>],
        policy: &AutoPolicy,
        deadline: Deadline,
    ) -> Result<SendReport, TransferError> {
        let plan = plan_auto(params, policy)?;
        let dense: Vec<DenseParam<'_>> = plan
            .dense
            .iter()
            .map(|&i| DenseParam {
                meta: params[i].meta,
                data: params[i].current,
            })
            .collect();
        let sparse: Vec<SparseParam<'_>> = plan
            .sparse
            .iter()
            .map(|(i, patch)| SparseParam {
                meta: params[*i].meta,
                patch,
            })
            .collect();
        let packed = self.packs_dense();
        let mut report = self.send_session(
            &[
                Outgoing::Dense {
                    params: &dense,
                    packed,
                },
                Outgoing::Sparse { params: &sparse },
            ],
            deadline,
        )?;
        report.unchanged_params = plan.unchanged;
        Ok(report)
    }
}

/// The outcome of diffing for [`TrainerEngine::send_auto`].
struct AutoPlan {
    dense: Vec<usize>,
    sparse: Vec<(usize, SparsePatch)>,
    unchanged: usize,
}

fn plan_auto(params: &[AutoParam<'_>], policy: &AutoPolicy) -> Result<AutoPlan, TransferError> {
    let mut plan = AutoPlan {
        dense: Vec::new(),
        sparse: Vec::new(),
        unchanged: 0,
    };
    for (i, p) in params.iter().enumerate() {
        let meta = p.meta;
        if p.current.len() != meta.byte_len() || p.previous.len() != meta.byte_len() {
            return Err(crate::patch::PatchError::DiffLength {
                name: meta.name().to_string(),
                previous: p.previous.len(),
                current: p.current.len(),
                dtype: meta.dtype().name().to_string(),
            }
            .into());
        }
        if meta.numel() > (i32::MAX as usize) + 1 {
            // Too large for int32 indices: dense if anything changed.
            if p.previous == p.current {
                plan.unchanged += 1;
            } else {
                plan.dense.push(i);
            }
            continue;
        }
        let patch = diff(meta.name(), p.previous, p.current, meta.dtype())?;
        match policy.choose(meta, patch.nnz()) {
            Choice::Unchanged => plan.unchanged += 1,
            Choice::Dense => plan.dense.push(i),
            Choice::Sparse => plan.sparse.push((i, patch)),
        }
    }
    Ok(plan)
}

impl SessionUpdate for Outgoing<'_> {
    fn metas(&self) -> Vec<ParamMeta> {
        match self {
            Outgoing::Dense { params, .. } => params.iter().map(|p| p.meta.clone()).collect(),
            Outgoing::Sparse { params } => params.iter().map(|p| p.meta.clone()).collect(),
        }
    }

    fn param_count(&self) -> ParamCount {
        match self {
            Outgoing::Dense { params, .. } => ParamCount::Dense(params.len()),
            Outgoing::Sparse { params } => ParamCount::Sparse(params.len()),
        }
    }
}

/// Checks an outgoing update before anything is sent: data lengths for dense, patches
/// against their metadata for sparse. Returns the update info to announce (`None` for an
/// empty update, which is skipped).
pub(crate) fn outgoing_info(update: &Outgoing<'_>) -> Result<Option<UpdateInfo>, TransferError> {
    match *update {
        Outgoing::Dense { params, packed } => {
            if params.is_empty() {
                return Ok(None);
            }
            for p in params {
                if p.data.len() != p.meta.byte_len() {
                    return Err(crate::registry::RegistryError::DenseLength {
                        name: p.meta.name().to_string(),
                        expected: p.meta.byte_len(),
                        got: p.data.len(),
                    }
                    .into());
                }
            }
            let metas: Vec<ParamMeta> = params.iter().map(|p| p.meta.clone()).collect();
            let info = UpdateInfo::dense(&metas, packed);
            info.validate()?;
            Ok(Some(info))
        }
        Outgoing::Sparse { params } => {
            if params.is_empty() {
                return Ok(None);
            }
            for p in params {
                p.patch.validate_for(p.meta)?;
            }
            let metas: Vec<ParamMeta> = params.iter().map(|p| p.meta.clone()).collect();
            let counts: Vec<usize> = params.iter().map(|p| p.patch.nnz()).collect();
            let info = UpdateInfo::sparse(&metas, &counts);
            info.validate()?;
            Ok(Some(info))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moeshift_tensor::DType;

    #[test]
    fn auto_plan_splits_by_density() {
        // 10 bf16 elements each: 'a' unchanged, 'b' 3 changed (sparse), 'c' 5 changed (dense).
        let meta: Vec<ParamMeta> = ["a", "b", "c"]
            .iter()
            .map(|n| ParamMeta::new(*n, DType::Bf16, vec![10]).unwrap())
            .collect();
        let prev = vec![0u8; 20];
        let mut b = prev.clone();
        for i in [0, 4, 9] {
            b[2 * i] = 1;
        }
        let mut c = prev.clone();
        for i in 0..5 {
            c[2 * i + 1] = 7;
        }
        let params = [
            AutoParam {
                meta: &meta[0],
                previous: &prev,
                current: &prev,
            },
            AutoParam {
                meta: &meta[1],
                previous: &prev,
                current: &b,
            },
            AutoParam {
                meta: &meta[2],
                previous: &prev,
                current: &c,
            },
        ];
        let plan = plan_auto(&params, &AutoPolicy::default()).unwrap();
        assert_eq!(plan.unchanged, 1);
        assert_eq!(plan.dense, vec![2]);
        assert_eq!(plan.sparse.len(), 1);
        assert_eq!(plan.sparse[0].0, 1);
        assert_eq!(plan.sparse[0].1.indices, vec![0, 4, 9]);

        let short = [AutoParam {
            meta: &meta[0],
            previous: &prev,
            current: &prev[..4],
        }];
        assert!(plan_auto(&short, &AutoPolicy::default()).is_err());
    }

    #[test]
    fn outgoing_checks_before_sending() {
        let m = ParamMeta::new("w", DType::F32, vec![2]).unwrap();
        let bad = [DenseParam {
            meta: &m,
            data: &[0u8; 4],
        }];
        assert!(matches!(
            outgoing_info(&Outgoing::Dense {
                params: &bad,
                packed: false
            }),
            Err(TransferError::Registry(_))
        ));
        let good = [DenseParam {
            meta: &m,
            data: &[0u8; 8],
        }];
        let info = outgoing_info(&Outgoing::Dense {
            params: &good,
            packed: true,
        })
        .unwrap()
        .unwrap();
        assert!(info.packed && info.names == vec!["w".to_string()]);
        assert!(outgoing_info(&Outgoing::Dense {
            params: &[],
            packed: false
        })
        .unwrap()
        .is_none());

        let patch = SparsePatch::new("w", DType::F32, vec![2], vec![0; 4]).unwrap();
        let sp = [SparseParam {
            meta: &m,
            patch: &patch,
        }];
        assert!(matches!(
            outgoing_info(&Outgoing::Sparse { params: &sp }),
            Err(TransferError::Patch(
                crate::PatchError::IndexOutOfRange { .. }
            ))
        ));
        let patch = SparsePatch::new("w", DType::F32, vec![1], vec![0; 4]).unwrap();
        let sp = [SparseParam {
            meta: &m,
            patch: &patch,
        }];
        let info = outgoing_info(&Outgoing::Sparse { params: &sp })
            .unwrap()
            .unwrap();
        assert_eq!(info.num_updates_list, Some(vec![1]));
    }
}
