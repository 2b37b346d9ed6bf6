//! [`WeightReceiver`]: the worker-side session lifecycle shared by every engine:
//! `start_update` → `update` (once or more) → `finish_update`.
//!
//! Rules:
//!
//! * `start_update` while a session is active is [`TransferError::AlreadyActive`];
//!   `update` or `finish_update` without one is [`TransferError::NotActive`].
//! * Any error from a session operation (including those two) ends the session: the engine
//!   drops what it staged ([`WorkerEngine::abort`]) and the receiver is idle again, ready for
//!   a new `start_update`.
//! * Before the engine receives a byte, the update info is validated, "reuse the previous
//!   metadata" is resolved, and every parameter's name, dtype and shape is checked against
//!   the registry. A dense update that passes this check becomes the metadata a later
//!   "reuse" update refers to.

use std::time::Instant;

use moeshift_sync::Deadline;

use crate::engine::{Announcement, PreparedUpdate, UpdateReport, WorkerEngine};
use crate::error::TransferError;
use crate::info::{UpdateInfo, UpdateKind};
use crate::meta::{metadata_digest, ParamMeta};
use crate::registry::ParamRegistry;

/// What a whole received session did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionReport {
    /// One report per update, in order.
    pub updates: Vec<UpdateReport>,
}

/// The worker side of weight transfer: an engine, the registered parameters, and the
/// session state.
///
/// ```no_run
/// # use moeshift_weight_transfer::*;
/// # use moeshift_sync::Deadline;
/// # use std::time::Duration;
/// # fn demo(engine: HostWorker, registry: ParamRegistry<Box<dyn HostStorage + Send>>)
/// #     -> Result<(), TransferError> {
/// let mut receiver = WeightReceiver::new(engine, registry);
/// // Driven by the trainer's in-band announcements:
/// let report = receiver.receive_session(Deadline::after(Duration::from_secs(60)))?;
/// println!("{} updates applied", report.updates.len());
/// # Ok(()) }
/// ```
pub struct WeightReceiver<E: WorkerEngine> {
    engine: E,
    registry: ParamRegistry<E::Storage>,
    active: bool,
    previous: Option<Vec<ParamMeta>>,
}

impl<E: WorkerEngine> WeightReceiver<E> {
    /// A receiver, idle, with no previous metadata.
    pub fn new(engine: E, registry: ParamRegistry<E::Storage>) -> Self {
        Self {
            engine,
            registry,
            active: false,
            previous: None,
        }
    }

    /// True between `start_update` and `finish_update` (or an error).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The registered parameters (read their bytes between sessions).
    pub fn registry(&self) -> &ParamRegistry<E::Storage> {
        &self.registry
    }

    /// The registered parameters, to register more. Refused during a session.
    pub fn registry_mut(&mut self) -> Result<&mut ParamRegistry<E::Storage>, TransferError> {
        if self.active {
            return Err(TransferError::AlreadyActive);
        }
        Ok(&mut self.registry)
    }

    /// The engine.
    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// The metadata a "reuse" update would resolve to.
    pub fn previous_metadata(&self) -> Option<&[ParamMeta]> {
        self.previous.as_deref()
    }

    /// Gives back the engine and the registry.
    pub fn into_parts(self) -> (E, ParamRegistry<E::Storage>) {
        (self.engine, self.registry)
    }

    /// Begins a session.
    pub fn start_update(&mut self, deadline: Deadline) -> Result<(), TransferError> {
        if self.active {
            return self.fail(TransferError::AlreadyActive);
        }
        self.active = true;
        let r = self.engine.start(deadline);
        self.end_on_error(r)
    }

    /// Receives and applies one update described by `info` (given out of band, e.g. by an
    /// RPC). Engines that also carry the info in band check that the trainer announced the
    /// same update.
    pub fn update(
        &mut self,
        info: &UpdateInfo,
        deadline: Deadline,
    ) -> Result<UpdateReport, TransferError> {
        if !self.active {
            return self.fail(TransferError::NotActive {
                operation: "update",
            });
        }
        let rank = self.engine.rank();
        let r = self.update_inner(Some(info), deadline).and_then(|report| {
            report.ok_or(TransferError::Protocol {
                rank,
                peer: 0,
                detail: "the trainer ended the session instead of sending the update".into(),
            })
        });
        self.end_on_error(r)
    }

    /// Ends the session.
    pub fn finish_update(&mut self, deadline: Deadline) -> Result<(), TransferError> {
        if !self.active {
            return self.fail(TransferError::NotActive {
                operation: "finish_update",
            });
        }
        let r = self.engine.finish(deadline);
        self.active = false;
        self.end_on_error(r)
    }

    /// A whole session driven by the trainer's in-band announcements: start, every
    /// announced update, then finish when the trainer ends the session.
    pub fn receive_session(&mut self, deadline: Deadline) -> Result<SessionReport, TransferError> {
        self.start_update(deadline)?;
        let mut report = SessionReport::default();
        loop {
            let r = self.update_inner(None, deadline);
            match self.end_on_error(r)? {
                Some(u) => report.updates.push(u),
                None => break,
            }
        }
        // The end marker was consumed by the announcement loop.
        self.active = false;
        Ok(report)
    }

    /// One update. `given` is the out-of-band info, if any. Returns `None` when an in-band
    /// engine announced the end of the session (only when `given` is `None`).
    fn update_inner(
        &mut self,
        given: Option<&UpdateInfo>,
        deadline: Deadline,
    ) -> Result<Option<UpdateReport>, TransferError> {
        let started = Instant::now();
        let rank = self.engine.rank();
        let (info, digest) = if self.engine.capabilities().info_in_band {
            match self.engine.announcement(deadline)? {
                Announcement::Update {
                    info,
                    metadata_digest,
                } => (info, metadata_digest),
                Announcement::End => {
                    if given.is_some() {
                        return Err(TransferError::Protocol {
                            rank,
                            peer: 0,
                            detail: "the trainer ended the session while this worker was \
                                     given another update"
                                .into(),
                        });
                    }
                    self.engine.finish(deadline)?;
                    return Ok(None);
                }
            }
        } else {
            match given {
                Some(i) => (i.clone(), None),
                None => {
                    return Err(TransferError::Unsupported {
                        engine: self.engine.name(),
                        what: "sessions driven by in-band announcements".into(),
                    })
                }
            }
        };
        let prepared = match self.prepare(given, &info, digest) {
            Ok(p) => p,
            Err(e) => {
                // Best effort: the reason this worker refuses is what the trainer needs to
                // hear; a failure to say so is secondary.
                let _ = self.engine.reject(&e, deadline);
                return Err(e);
            }
        };
        if prepared.update.kind == UpdateKind::Dense {
            self.previous = Some(prepared.update.params.clone());
        }
        let mut report = self
            .engine
            .receive(&prepared, &mut self.registry, deadline)?;
        report.elapsed = started.elapsed();
        Ok(Some(report))
    }

    fn prepare(
        &self,
        given: Option<&UpdateInfo>,
        info: &UpdateInfo,
        digest: Option<crate::digest::Digest>,
    ) -> Result<PreparedUpdate, TransferError> {
        let rank = self.engine.rank();
        let update = info.resolve(self.previous.as_deref())?;
        if let Some(given) = given {
            if given != info {
                let mine = given.resolve(self.previous.as_deref())?;
                if mine != update {
                    return Err(TransferError::InfoMismatch {
                        rank,
                        detail: first_difference(given, info),
                    });
                }
            }
        }
        if let Some(trainer) = digest {
            let worker = metadata_digest(&update.params);
            if worker != trainer {
                return Err(TransferError::MetadataMismatch {
                    rank,
                    trainer,
                    worker,
                    reused: update.reused,
                });
            }
        }
        let caps = self.engine.capabilities();
        let supported = match (update.kind, update.packed) {
            (UpdateKind::Dense, false) => caps.dense,
            (UpdateKind::Dense, true) => caps.packed,
            (UpdateKind::SparseFlat, _) => caps.sparse,
        };
        if !supported {
            return Err(TransferError::Unsupported {
                engine: self.engine.name(),
                what: format!(
                    "update_kind='{}' with packed={}",
                    update.kind, update.packed
                ),
            });
        }
        let slots = self.registry.check(&update.params)?;
        Ok(PreparedUpdate { update, slots })
    }

    fn fail<T>(&mut self, e: TransferError) -> Result<T, TransferError> {
        self.end_on_error(Err(e))
    }

    fn end_on_error<T>(&mut self, r: Result<T, TransferError>) -> Result<T, TransferError> {
        if r.is_err() {
            self.engine.abort();
            self.active = false;
        }
        r
    }
}

fn first_difference(given: &UpdateInfo, announced: &UpdateInfo) -> String {
    if given.update_kind != announced.update_kind {
        return format!(
            "update_kind '{}' given, '{}' announced",
            given.update_kind, announced.update_kind
        );
    }
    if given.packed != announced.packed {
        return format!(
            "packed={} given, packed={} announced",
            given.packed, announced.packed
        );
    }
    if given.num_updates_list != announced.num_updates_list {
        return format!(
            "num_updates_list {:?} given, {:?} announced",
            given.num_updates_list, announced.num_updates_list
        );
    }
    let rows = given.names.iter().zip(&announced.names).enumerate();
    for (i, (g, a)) in rows {
        if g != a {
            return format!("names[{i}]: '{g}' given, '{a}' announced");
        }
    }
    format!(
        "{} parameters given ({:?} …), {} announced",
        given.names.len(),
        given.names.first(),
        announced.names.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Capabilities;
    use crate::patch::SparsePatch;
    use moeshift_tensor::DType;
    use std::collections::VecDeque;
    use std::time::Duration;

    /// An engine whose "wire" is a queue of payloads the test fills: dense values or sparse
    /// patches, staged whole and applied only once the update is complete.
    #[derive(Default)]
    struct QueueEngine {
        dense: VecDeque<Vec<u8>>,
        patches: VecDeque<SparsePatch>,
        in_band: VecDeque<Announcement>,
        use_in_band: bool,
        fail_receive: bool,
        aborted: usize,
        rejected: Vec<String>,
    }

    impl WorkerEngine for QueueEngine {
        type Storage = Vec<u8>;
        fn name(&self) -> &'static str {
            "queue"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities {
                dense: true,
                packed: false,
                sparse: true,
                info_in_band: self.use_in_band,
            }
        }
        fn rank(&self) -> usize {
            1
        }
        fn announcement(&mut self, _d: Deadline) -> Result<Announcement, TransferError> {
            self.in_band.pop_front().ok_or(TransferError::Protocol {
                rank: 1,
                peer: 0,
                detail: "nothing announced".into(),
            })
        }
        fn reject(&mut self, reason: &TransferError, _d: Deadline) -> Result<(), TransferError> {
            self.rejected.push(reason.to_string());
            Ok(())
        }
        fn receive(
            &mut self,
            update: &PreparedUpdate,
            registry: &mut ParamRegistry<Vec<u8>>,
            _d: Deadline,
        ) -> Result<UpdateReport, TransferError> {
            if self.fail_receive {
                return Err(TransferError::Protocol {
                    rank: 1,
                    peer: 0,
                    detail: "wire broke".into(),
                });
            }
            match update.update.kind {
                UpdateKind::Dense => {
                    let staged: Vec<Vec<u8>> = update
                        .slots
                        .iter()
                        .map(|_| self.dense.pop_front().unwrap_or_default())
                        .collect();
                    let writes: Vec<(usize, &[u8])> = update
                        .slots
                        .iter()
                        .copied()
                        .zip(staged.iter().map(|v| v.as_slice()))
                        .collect();
                    registry.apply_dense(&writes)?;
                }
                UpdateKind::SparseFlat => {
                    let staged: Vec<SparsePatch> = update
                        .slots
                        .iter()
                        .filter_map(|_| self.patches.pop_front())
                        .collect();
                    registry.apply_patches(&staged)?;
                }
            }
            Ok(UpdateReport {
                params: update.slots.len(),
                ..UpdateReport::default()
            })
        }
        fn abort(&mut self) {
            self.aborted += 1;
        }
    }

    fn deadline() -> Deadline {
        Deadline::after(Duration::from_secs(5))
    }

    fn receiver() -> WeightReceiver<QueueEngine> {
        let mut reg = ParamRegistry::new();
        reg.register(
            ParamMeta::new("w", DType::F32, vec![2]).unwrap(),
            vec![0; 8],
        )
        .unwrap();
        reg.register(ParamMeta::new("b", DType::U8, vec![3]).unwrap(), vec![0; 3])
            .unwrap();
        WeightReceiver::new(QueueEngine::default(), reg)
    }

    fn dense_info() -> UpdateInfo {
        UpdateInfo::dense(
            &[
                ParamMeta::new("w", DType::F32, vec![2]).unwrap(),
                ParamMeta::new("b", DType::U8, vec![3]).unwrap(),
            ],
            false,
        )
    }

    #[test]
    fn update_before_start_is_an_error() {
        let mut r = receiver();
        assert!(matches!(
            r.update(&dense_info(), deadline()),
            Err(TransferError::NotActive {
                operation: "update"
            })
        ));
        assert!(matches!(
            r.finish_update(deadline()),
            Err(TransferError::NotActive { .. })
        ));
    }

    #[test]
    fn second_start_is_an_error_and_resets() {
        let mut r = receiver();
        r.start_update(deadline()).unwrap();
        assert!(matches!(
            r.start_update(deadline()),
            Err(TransferError::AlreadyActive)
        ));
        assert!(!r.is_active());
        assert_eq!(r.engine().aborted, 1);
        // A fresh session works after the reset.
        r.start_update(deadline()).unwrap();
        r.finish_update(deadline()).unwrap();
        assert!(!r.is_active());
    }

    #[test]
    fn full_session_then_reuse() {
        let mut r = receiver();
        r.engine.dense.extend([vec![1; 8], vec![2; 3]]);
        r.start_update(deadline()).unwrap();
        assert!(r.registry_mut().is_err());
        let rep = r.update(&dense_info(), deadline()).unwrap();
        assert_eq!(rep.params, 2);
        r.finish_update(deadline()).unwrap();
        assert_eq!(r.registry().bytes("w"), Some(&[1u8; 8][..]));
        assert_eq!(r.registry().bytes("b"), Some(&[2u8; 3][..]));

        // Reuse: empty lists resolve to the previous dense metadata.
        r.engine.dense.extend([vec![3; 8], vec![4; 3]]);
        r.start_update(deadline()).unwrap();
        r.update(&UpdateInfo::dense_reuse(false), deadline())
            .unwrap();
        r.finish_update(deadline()).unwrap();
        assert_eq!(r.registry().bytes("b"), Some(&[4u8; 3][..]));
    }

    #[test]
    fn reuse_without_previous_is_an_error() {
        let mut r = receiver();
        r.start_update(deadline()).unwrap();
        assert!(matches!(
            r.update(&UpdateInfo::dense_reuse(false), deadline()),
            Err(TransferError::Info(crate::InfoError::NoPreviousMetadata))
        ));
        assert!(!r.is_active());
    }

    #[test]
    fn registry_mismatch_writes_nothing_and_resets() {
        let mut r = receiver();
        let before = r.registry().digest();
        r.engine.dense.extend([vec![1; 8], vec![2; 3]]);
        r.start_update(deadline()).unwrap();
        let info = UpdateInfo::dense(
            &[
                ParamMeta::new("w", DType::F32, vec![2]).unwrap(),
                ParamMeta::new("b", DType::I8, vec![3]).unwrap(),
            ],
            false,
        );
        let err = r.update(&info, deadline()).unwrap_err();
        assert!(err.to_string().contains("'b'"), "{err}");
        assert_eq!(r.registry().digest(), before);
        assert!(!r.is_active());
        // A refused dense update does not become the "previous" metadata.
        assert!(r.previous_metadata().is_none());
    }

    #[test]
    fn unsupported_kind_is_refused() {
        let mut r = receiver();
        r.start_update(deadline()).unwrap();
        let mut info = dense_info();
        info.packed = true;
        assert!(matches!(
            r.update(&info, deadline()),
            Err(TransferError::Unsupported {
                engine: "queue",
                ..
            })
        ));
    }

    #[test]
    fn engine_error_resets_and_keeps_weights() {
        let mut r = receiver();
        r.engine.fail_receive = true;
        r.start_update(deadline()).unwrap();
        assert!(r.update(&dense_info(), deadline()).is_err());
        assert!(!r.is_active());
        assert_eq!(r.engine().aborted, 1);
        assert_eq!(r.registry().bytes("w"), Some(&[0u8; 8][..]));
    }

    #[test]
    fn sparse_out_of_range_changes_nothing() {
        let mut r = receiver();
        let before = r.registry().digest();
        r.engine.patches.extend([
            SparsePatch::new("w", DType::F32, vec![0], vec![9; 4]).unwrap(),
            SparsePatch::new("b", DType::U8, vec![3], vec![9]).unwrap(),
        ]);
        let info = UpdateInfo::sparse(
            &[
                ParamMeta::new("w", DType::F32, vec![2]).unwrap(),
                ParamMeta::new("b", DType::U8, vec![3]).unwrap(),
            ],
            &[1, 1],
        );
        r.start_update(deadline()).unwrap();
        let err = r.update(&info, deadline()).unwrap_err();
        assert!(err.to_string().contains("outside [0, 3)"), "{err}");
        assert_eq!(r.registry().digest(), before);
    }

    #[test]
    fn in_band_session_and_mismatch() {
        let mut r = receiver();
        r.engine.use_in_band = true;
        r.engine.in_band.extend([
            Announcement::Update {
                info: dense_info(),
                metadata_digest: Some(metadata_digest(&dense_info().resolve(None).unwrap().params)),
            },
            Announcement::End,
        ]);
        r.engine.dense.extend([vec![5; 8], vec![6; 3]]);
        let rep = r.receive_session(deadline()).unwrap();
        assert_eq!(rep.updates.len(), 1);
        assert!(!r.is_active());
        assert_eq!(r.registry().bytes("w"), Some(&[5u8; 8][..]));

        // The given info differs from the announced one: refused, and the refusal is
        // reported through the engine.
        r.engine.in_band.push_back(Announcement::Update {
            info: dense_info(),
            metadata_digest: None,
        });
        let mut other = dense_info();
        other.names.swap(0, 1);
        other.dtype_names.swap(0, 1);
        other.shapes.swap(0, 1);
        r.start_update(deadline()).unwrap();
        let err = r.update(&other, deadline()).unwrap_err();
        assert!(matches!(err, TransferError::InfoMismatch { .. }), "{err}");
        assert_eq!(r.engine().rejected.len(), 1);

        // A wrong metadata digest is refused.
        r.engine.in_band.push_back(Announcement::Update {
            info: UpdateInfo::dense_reuse(false),
            metadata_digest: Some(crate::Digest::of(b"something else")),
        });
        assert!(matches!(
            r.receive_session(deadline()),
            Err(TransferError::MetadataMismatch { reused: true, .. })
        ));
    }
}
