//! [`HostWorker`]: the receiving side of the host engine.

use std::marker::PhantomData;

use moeshift_device_comm::HostGroup;
use moeshift_sync::Deadline;

use super::HostConfig;
use crate::control::{
    receive_update, worker_control_methods, Failure, WorkerControl, WorkerPayload, TRAINER_RANK,
};
use crate::engine::{Capabilities, PreparedUpdate, UpdateReport, WorkerEngine};
use crate::error::TransferError;
use crate::info::UpdateKind;
use crate::packing::{plan_chunks, split_chunk, ChunkHeader, PackError};
use crate::patch::SparsePatch;
use crate::registry::{HostStorage, ParamRegistry};

/// The worker side of the host engine: group ranks 1 and up.
///
/// `S` is the registry's storage type; the default mixes any host memory.
pub struct HostWorker<S = Box<dyn HostStorage + Send>> {
    control: WorkerControl,
    config: HostConfig,
    _storage: PhantomData<fn() -> S>,
}

impl<S> std::fmt::Debug for HostWorker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostWorker")
            .field("control", &self.control)
            .field("config", &self.config)
            .finish()
    }
}

impl<S: HostStorage> HostWorker<S> {
    /// A worker over `group`, whose rank must not be [`TRAINER_RANK`](crate::TRAINER_RANK).
    pub fn new(group: HostGroup, config: HostConfig) -> Result<Self, TransferError> {
        let control = WorkerControl::new(group)?;
        if config.packed_buffer_size_bytes == 0 {
            return Err(PackError::ZeroBufferSize.into());
        }
        Ok(Self {
            control,
            config,
            _storage: PhantomData,
        })
    }

    /// The transport group.
    pub fn group(&self) -> &HostGroup {
        &self.control.group
    }

    /// Gives back the group.
    pub fn into_group(self) -> HostGroup {
        self.control.group
    }

    /// Receives the payload of `update` into staging. Returns the staged data, or the first
    /// problem found (after draining the rest of the update's messages).
    fn stage(&self, update: &PreparedUpdate, deadline: Deadline) -> Result<Staged, Failure> {
        let r = &update.update;
        match (r.kind, r.packed) {
            (UpdateKind::Dense, false) => {
                let mut out = Vec::with_capacity(r.params.len());
                for (p, &slot) in r.params.iter().zip(&update.slots) {
                    let mut buf = vec![0u8; p.byte_len()];
                    self.control
                        .group
                        .recv_into(TRAINER_RANK, &mut buf, deadline)
                        .map_err(|e| {
                            let during = format!("receiving the dense values of '{}'", p.name());
                            Failure::Fatal(self.control.comm(during)(e))
                        })?;
                    out.push((slot, buf));
                }
                Ok(Staged::Dense(out))
            }
            (UpdateKind::Dense, true) => self.stage_packed(update, deadline),
            (UpdateKind::SparseFlat, _) => {
                let mut out = Vec::with_capacity(r.params.len());
                let mut problem = None;
                for (p, &n) in r.params.iter().zip(&r.num_updates) {
                    let elem = p.dtype().size_bytes();
                    let mut buf = vec![0u8; n.saturating_mul(4 + elem)];
                    self.control
                        .group
                        .recv_into(TRAINER_RANK, &mut buf, deadline)
                        .map_err(|e| {
                            let during = format!("receiving the sparse patch of '{}'", p.name());
                            Failure::Fatal(self.control.comm(during)(e))
                        })?;
                    if problem.is_some() {
                        continue;
                    }
                    // The message is the indices, then the values.
                    let values = buf.split_off(n * 4);
                    let indices = buf
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    let patch = SparsePatch {
                        name: p.name().to_string(),
                        dtype: p.dtype(),
                        indices,
                        values,
                    };
                    match patch.validate_for(p) {
                        Ok(()) => out.push(patch),
                        Err(e) => problem = Some(TransferError::from(e)),
                    }
                }
                match problem {
                    Some(e) => Err(Failure::Refused(e)),
                    None => Ok(Staged::Sparse(out)),
                }
            }
        }
    }

    fn stage_packed(&self, update: &PreparedUpdate, deadline: Deadline) -> Result<Staged, Failure> {
        let plan = plan_chunks(&update.update.params, self.config.packed_buffer_size_bytes)
            .map_err(|e| Failure::Refused(e.into()))?;
        let mut staged = Vec::with_capacity(plan.len());
        let mut problem: Option<TransferError> = None;
        // The trainer's headers say how many chunks it sends; until the first one arrives,
        // expect the planned count.
        let mut total = plan.len() as u32;
        let mut seq = 0u32;
        while seq < total {
            let during = || format!("receiving packed chunk {seq}");
            let fatal = |e| Failure::Fatal(self.control.comm(during())(e));
            let header =
                self.control
                    .recv_chunk_header(seq, &plan, &mut problem, during(), deadline)?;
            total = header.total;
            if problem.is_some() {
                // Keep the stream in step; the payload is discarded.
                self.control
                    .group
                    .recv(TRAINER_RANK, deadline)
                    .map_err(fatal)?;
            } else {
                // The header matched the plan, so its length is the one we expect.
                let mut payload = vec![0u8; usize::try_from(header.payload_len).unwrap_or(0)];
                self.control
                    .group
                    .recv_into(TRAINER_RANK, &mut payload, deadline)
                    .map_err(fatal)?;
                staged.push((header, payload));
            }
            seq += 1;
        }
        match problem {
            Some(e) => Err(Failure::Refused(e)),
            None => Ok(Staged::Packed(staged)),
        }
    }
}

/// What a worker staged for one update.
pub(crate) enum Staged {
    Dense(Vec<(usize, Vec<u8>)>),
    Packed(Vec<(ChunkHeader, Vec<u8>)>),
    Sparse(Vec<SparsePatch>),
}

impl Staged {
    fn apply<S: HostStorage>(
        &self,
        slots: &[usize],
        registry: &mut ParamRegistry<S>,
    ) -> Result<(), TransferError> {
        match self {
            Staged::Dense(bufs) => {
                let writes: Vec<(usize, &[u8])> =
                    bufs.iter().map(|(slot, b)| (*slot, b.as_slice())).collect();
                registry.apply_dense(&writes)?;
            }
            Staged::Packed(chunks) => {
                let mut writes: Vec<(usize, &[u8])> = Vec::with_capacity(slots.len());
                let mut slot_iter = slots.iter();
                for (header, payload) in chunks {
                    for part in split_chunk(header, payload)? {
                        if let Some(&slot) = slot_iter.next() {
                            writes.push((slot, part));
                        }
                    }
                }
                registry.apply_dense(&writes)?;
            }
            Staged::Sparse(patches) => registry.apply_patches(patches)?,
        }
        Ok(())
    }
}

impl<S: HostStorage> WorkerPayload for HostWorker<S> {
    /// Nothing is checked before the vote beyond what the lifecycle checked.
    type Plan = ();
    /// The whole update, staged: nothing is applied before every rank committed.
    type Received = Staged;

    fn control(&mut self) -> &mut WorkerControl {
        &mut self.control
    }

    fn check(
        &mut self,
        _update: &PreparedUpdate,
        _registry: &mut ParamRegistry<S>,
    ) -> Result<(), TransferError> {
        Ok(())
    }

    fn receive_payload(
        &mut self,
        update: &PreparedUpdate,
        _plan: (),
        _registry: &mut ParamRegistry<S>,
        deadline: Deadline,
    ) -> Result<Staged, Failure> {
        self.stage(update, deadline)
    }

    fn commit(
        &mut self,
        update: &PreparedUpdate,
        staged: Staged,
        registry: &mut ParamRegistry<S>,
    ) -> Result<usize, TransferError> {
        let chunks = match &staged {
            Staged::Packed(c) => c.len(),
            _ => 0,
        };
        staged.apply(&update.slots, registry)?;
        Ok(chunks)
    }
}

impl<S: HostStorage> WorkerEngine for HostWorker<S> {
    type Storage = S;

    fn name(&self) -> &'static str {
        "host"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    worker_control_methods!();

    fn receive(
        &mut self,
        update: &PreparedUpdate,
        registry: &mut ParamRegistry<S>,
        deadline: Deadline,
    ) -> Result<UpdateReport, TransferError> {
        receive_update(self, update, registry, deadline)
    }

    fn finish(&mut self, deadline: Deadline) -> Result<(), TransferError> {
        crate::control::finish(self, deadline)
    }

    fn abort(&mut self) {
        self.control.end_session();
    }
}
