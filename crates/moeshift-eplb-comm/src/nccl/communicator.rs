//! [`NcclCommunicator`]: the `nccl` backend.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaStream};
use moeshift_device_comm::nccl::{nccl_available, NcclComm, NcclError, UniqueId};
use moeshift_device_comm::{HostGroup, StoreClient};
use moeshift_placement::{LayerPlan, RankPlan};
use moeshift_sync::Deadline;
use moeshift_tensor::{cuda_available, CudaError, Device};

use super::exchange::{lay_out, Exchange};
use super::ops::{p2p_ops, warm_up_ops};
use crate::agree::{agree_on_layouts, agree_on_plan, plan_digest};
use crate::comm::{Backend, EplbCommunicator, StagedLayer, TransferStats};
use crate::cuda_stage::memory::{driver_error, CopyQueue, DeviceBuffer, StagingPool};
use crate::error::EplbCommError;
use crate::host::{check_plan, eplb_group};
use crate::staging::{RowSource, Staging, StagingMemory};
use crate::weights::{LayerLayout, LayerWeights};

/// Tag of the set-up message every rank sends: accepted (and rank 0's NCCL id).
const SETUP_OK: u8 = 0;
/// Tag of the set-up message of a rank that cannot take part (and why).
const SETUP_REFUSED: u8 = 1;

/// The `nccl` EPLB backend: grouped NCCL point-to-point between CUDA weights; see the
/// [module documentation](super).
///
/// **Not `Send`**: it owns a NCCL communicator, which NCCL binds to the thread that drives
/// it. Build it on the thread that will run the transfers (the EPLB worker thread) and keep
/// it there. The [`StagedLayer`]s it returns are `Send`: another thread (the serving
/// thread) may commit them.
#[derive(Debug)]
pub struct NcclCommunicator {
    /// The EPLB group: layout and plan agreement, set-up, the post-transfer barrier.
    group: HostGroup,
    /// `None` once the communicator failed.
    comm: Option<NcclComm>,
    me: usize,
    size: usize,
    ordinal: usize,
    layouts: Vec<LayerLayout>,
    /// Why the communicator stopped, once it did.
    failed: Option<String>,
    /// Stream that commits copy on (NCCL's own stream may be busy with the next layer).
    commit_stream: Arc<CudaStream>,
    /// Device staging for received rows and local copies, reused across layers.
    pool: Arc<StagingPool>,
    /// Rows packed for sending, reused across layers (grows to the largest layer's need).
    pack: Option<DeviceBuffer>,
}

/// This rank's CUDA side before the NCCL communicator exists.
struct Local {
    ordinal: usize,
    stream: Arc<CudaStream>,
    commit_stream: Arc<CudaStream>,
    /// Rank 0's fresh id.
    id: Option<UniqueId>,
}

impl NcclCommunicator {
    /// Forms the EPLB group over `members` (global ranks, in EPLB-group order) and builds
    /// the communicator for the layers `all_layers` (index = layer), which must all live on
    /// one GPU of this rank. Every member calls it.
    pub fn new(
        store: &StoreClient,
        members: &[usize],
        all_layers: &[LayerWeights<'_>],
        deadline: Deadline,
    ) -> Result<Self, EplbCommError> {
        let group = eplb_group(store, members, deadline)?;
        Self::with_group(group, all_layers, deadline)
    }

    /// Builds the communicator over `group` (which it then owns; it must carry no other
    /// traffic). Checks that every rank describes the same tensors for every layer, that
    /// this rank's weights all live on one GPU, and that CUDA and NCCL work here; a rank
    /// whose checks fail tells the others, so every rank fails at once with an error
    /// naming it. Then creates the NCCL communicator on that GPU (rank 0's id travels over
    /// the group) and opens its connections to every peer. Every member calls it.
    pub fn with_group(
        group: HostGroup,
        all_layers: &[LayerWeights<'_>],
        deadline: Deadline,
    ) -> Result<Self, EplbCommError> {
        let layouts = all_layers.iter().map(LayerWeights::layout).collect();
        let ordinal = weights_gpu(all_layers);
        Self::build(group, ordinal, layouts, deadline)
    }

    /// Like [`with_group`](Self::with_group), from the layer layouts alone, for weights
    /// that will live on GPU `device_ordinal` (each transfer checks the weights it gets).
    pub fn from_layouts(
        group: HostGroup,
        device_ordinal: usize,
        layouts: Vec<LayerLayout>,
        deadline: Deadline,
    ) -> Result<Self, EplbCommError> {
        Self::build(group, Ok(device_ordinal), layouts, deadline)
    }

    fn build(
        group: HostGroup,
        ordinal: Result<usize, EplbCommError>,
        layouts: Vec<LayerLayout>,
        deadline: Deadline,
    ) -> Result<Self, EplbCommError> {
        let (me, size) = (group.rank(), group.size());
        agree_on_layouts(&group, &layouts, deadline)?;
        let local = ordinal.and_then(|ordinal| Local::new(me, ordinal));
        let id = exchange_setup(&group, &local, deadline)?;
        let local = local?;
        let id = id.ok_or_else(|| EplbCommError::PeerSetupFailed {
            rank: me,
            peer: 0,
            backend: Backend::Nccl,
            reason: "it sent no NCCL id".into(),
        })?;
        let comm = NcclComm::from_unique_id(&id, me, size, Arc::clone(&local.stream), deadline)
            .map_err(|e| nccl_error(me, None, "creating the communicator", e))?;
        warm_up(&comm, me, deadline)?;
        Ok(Self {
            pool: StagingPool::new(Arc::clone(&local.stream)),
            group,
            comm: Some(comm),
            me,
            size,
            ordinal: local.ordinal,
            layouts,
            failed: None,
            commit_stream: local.commit_stream,
            pack: None,
        })
    }

    /// This rank in the EPLB group.
    pub fn rank(&self) -> usize {
        self.me
    }

    /// Ranks in the EPLB group.
    pub fn num_ranks(&self) -> usize {
        self.size
    }

    /// The GPU this rank's weights live on.
    pub fn device_ordinal(&self) -> usize {
        self.ordinal
    }

    /// The layouts every rank agreed on, by layer.
    pub fn layouts(&self) -> &[LayerLayout] {
        &self.layouts
    }

    /// Bytes of the pack buffer kept for sending (the largest any layer needed so far).
    pub fn pack_buffer_bytes(&self) -> usize {
        self.pack.as_ref().map_or(0, DeviceBuffer::len)
    }

    /// Why the communicator stopped, once it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    fn transfer_inner(
        &mut self,
        layer: usize,
        plan: &LayerPlan,
        weights: &LayerWeights<'_>,
        deadline: Deadline,
    ) -> Result<StagedLayer, EplbCommError> {
        let started = Instant::now();
        let me = self.me;
        let comm = match (&self.comm, &self.failed) {
            (Some(comm), None) => comm,
            (_, reason) => {
                return Err(EplbCommError::CommunicatorFailed {
                    rank: me,
                    reason: reason
                        .clone()
                        .unwrap_or_else(|| "the NCCL communicator is gone".into()),
                })
            }
        };
        let digest = plan_digest(layer, plan);

        // 1. Local checks, layout and staging; then agreement (a refusal is sent, not kept).
        let (layouts, pool, commit_stream, pack) = (
            &self.layouts,
            &self.pool,
            &self.commit_stream,
            &mut self.pack,
        );
        let prepared = check_plan(me, self.size, layouts, layer, plan, weights).and_then(|mine| {
            on_gpu(weights, self.ordinal, "the nccl EPLB backend")?;
            let layout = layouts.get(layer).ok_or(EplbCommError::LayerOutOfRange {
                rank: me,
                layer,
                layers: layouts.len(),
            })?;
            let (builder, ex) = lay_out(layout, me, plan, mine);
            let staging = builder.build_device(me, layer, pool, commit_stream)?;
            ensure_pack(pack, comm.stream(), ex.pack_bytes, me, layer)?;
            Ok((mine, layout, ex, staging))
        });
        let refusal = prepared.as_ref().err().map(ToString::to_string);
        agree_on_plan(&self.group, layer, digest, refusal.as_deref(), deadline)?;
        let (mine, layout, ex, mut staging) = prepared?;

        // 2. Local copies and packs on NCCL's stream, then the grouped exchange.
        let moved = move_rows(
            comm,
            self.ordinal,
            layer,
            weights,
            &ex,
            &mut staging,
            self.pack.as_mut(),
            deadline,
        );
        if let Err(e) = moved {
            // NCCL aborted itself if it failed; abort it for any other failure too, so
            // nothing keeps using the buffers and the communicator is not used again.
            comm.abort();
            self.failed = Some(e.to_string());
            return Err(e);
        }

        // 3. Nobody commits before everybody has everything.
        if !plan.rounds().is_empty() {
            self.group.barrier(deadline).map_err(|e| {
                EplbCommError::from_comm(me, Some(layer), "the post-transfer barrier".into(), e)
            })?;
        }

        let expert_bytes = layout.expert_bytes() as u64;
        let stats = TransferStats {
            bytes_sent: expert_bytes.saturating_mul(mine.sends.len() as u64),
            bytes_received: expert_bytes.saturating_mul(mine.recvs.len() as u64),
            bytes_copied_locally: expert_bytes.saturating_mul(mine.local_copies.len() as u64),
            peers: ex.peers,
            rounds: ex.rounds,
            staging_bytes: (staging.len() as u64).saturating_add(ex.pack_bytes as u64),
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok(StagedLayer::new(
            layer,
            me,
            Backend::Nccl,
            RankPlan::clone(mine),
            layout.clone(),
            staging,
            stats,
        ))
    }
}

impl EplbCommunicator for NcclCommunicator {
    fn backend(&self) -> Backend {
        Backend::Nccl
    }

    fn rank(&self) -> usize {
        NcclCommunicator::rank(self)
    }

    fn transfer(
        &mut self,
        layer: usize,
        plan: &LayerPlan,
        weights: &LayerWeights<'_>,
        deadline: Deadline,
    ) -> Result<StagedLayer, EplbCommError> {
        self.transfer_inner(layer, plan, weights, deadline)
    }
}

impl Local {
    /// Probes CUDA and NCCL and opens this rank's streams on GPU `ordinal`; rank 0 also
    /// makes the NCCL id.
    fn new(me: usize, ordinal: usize) -> Result<Self, EplbCommError> {
        let cuda = |source| EplbCommError::Cuda {
            rank: me,
            layer: None,
            source,
        };
        let count = cuda_available().map_err(cuda)?;
        if ordinal >= count {
            return Err(cuda(CudaError::InvalidOrdinal { ordinal, count }));
        }
        nccl_available().map_err(|e| nccl_error(me, None, "probing the library", e))?;
        let drv = |op: &str| {
            let op = format!("{op} on cuda:{ordinal}");
            move |e| driver_error(me, None, op, e)
        };
        let ctx = CudaContext::new(ordinal).map_err(drv("creating a context"))?;
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let commit_stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let id = if me == 0 {
            Some(UniqueId::new().map_err(|e| nccl_error(me, None, "creating the unique id", e))?)
        } else {
            None
        };
        Ok(Self {
            ordinal,
            stream,
            commit_stream,
            id,
        })
    }
}

/// One `all_gather` over the group: every rank says whether its set-up worked (rank 0
/// adds the NCCL id, a rank that failed adds why). Returns rank 0's id when every rank is
/// ready, `None` when this rank itself failed (the caller returns its own error).
fn exchange_setup(
    group: &HostGroup,
    local: &Result<Local, EplbCommError>,
    deadline: Deadline,
) -> Result<Option<UniqueId>, EplbCommError> {
    let me = group.rank();
    let mut msg = Vec::new();
    match local {
        Ok(l) => {
            msg.push(SETUP_OK);
            if let Some(id) = &l.id {
                msg.extend_from_slice(id.as_bytes());
            }
        }
        Err(e) => {
            msg.push(SETUP_REFUSED);
            msg.extend_from_slice(e.to_string().as_bytes());
        }
    }
    let gathered = group.all_gather(&msg, deadline).map_err(|e| {
        EplbCommError::from_comm(me, None, "the nccl backend set-up (all_gather)".into(), e)
    })?;
    if local.is_err() {
        return Ok(None);
    }
    for (peer, m) in gathered.iter().enumerate() {
        match m.split_first() {
            Some((&SETUP_OK, _)) => {}
            Some((&SETUP_REFUSED, why)) => {
                return Err(EplbCommError::PeerSetupFailed {
                    rank: me,
                    peer,
                    backend: Backend::Nccl,
                    reason: String::from_utf8_lossy(why).into_owned(),
                })
            }
            _ => {
                return Err(EplbCommError::PeerSetupFailed {
                    rank: me,
                    peer,
                    backend: Backend::Nccl,
                    reason: format!("its set-up message ({} bytes) cannot be decoded", m.len()),
                })
            }
        }
    }
    let from_root = gathered.first().map(|m| m.get(1..).unwrap_or(&[]));
    UniqueId::from_bytes(from_root.unwrap_or(&[]))
        .map(Some)
        .map_err(|e| EplbCommError::PeerSetupFailed {
            rank: me,
            peer: 0,
            backend: Backend::Nccl,
            reason: format!("its NCCL id is malformed: {e}"),
        })
}

/// Opens NCCL's connections to every peer now (NCCL connects lazily, on the first exchange
/// with a peer), with one byte each way, so the first layer does not pay for it.
fn warm_up(comm: &NcclComm, me: usize, deadline: Deadline) -> Result<(), EplbCommError> {
    let world = comm.world_size();
    if world < 2 {
        return Ok(());
    }
    let buf = DeviceBuffer::new(comm.stream(), world)
        .map_err(|e| driver_error(me, None, "allocating the warm-up buffer".into(), e))?;
    let ops = warm_up_ops(me, world, &buf);
    comm.grouped(&ops, deadline)
        .map_err(|e| nccl_error(me, None, "opening connections (warm-up exchange)", e))
}

/// The GPU all of `layers` live on.
fn weights_gpu(layers: &[LayerWeights<'_>]) -> Result<usize, EplbCommError> {
    let first = layers
        .iter()
        .flat_map(|l| l.tensors())
        .next()
        .ok_or(EplbCommError::NoTensors)?;
    let Device::Cuda(ordinal) = first.device() else {
        return Err(EplbCommError::NotDeviceMemory {
            tensor: first.name().to_string(),
            device: first.device(),
            what: "the nccl EPLB backend",
        });
    };
    for l in layers {
        on_gpu(l, ordinal, "the nccl EPLB backend")?;
    }
    Ok(ordinal)
}

/// Every tensor of `weights` lives on GPU `ordinal`.
fn on_gpu(
    weights: &LayerWeights<'_>,
    ordinal: usize,
    what: &'static str,
) -> Result<(), EplbCommError> {
    for t in weights.tensors() {
        match t.device() {
            Device::Cuda(o) if o == ordinal => {}
            Device::Cuda(_) => {
                return Err(EplbCommError::DeviceMismatch {
                    tensor: t.name().to_string(),
                    device: t.device(),
                    first: "(the communicator's GPU)".into(),
                    expected: Device::Cuda(ordinal),
                })
            }
            Device::Host => {
                return Err(EplbCommError::NotDeviceMemory {
                    tensor: t.name().to_string(),
                    device: t.device(),
                    what,
                })
            }
        }
    }
    Ok(())
}

/// Makes the pack buffer hold at least `bytes`.
fn ensure_pack(
    pack: &mut Option<DeviceBuffer>,
    stream: &Arc<CudaStream>,
    bytes: usize,
    me: usize,
    layer: usize,
) -> Result<(), EplbCommError> {
    if bytes == 0 || pack.as_ref().is_some_and(|p| p.len() >= bytes) {
        return Ok(());
    }
    *pack = None;
    *pack = Some(DeviceBuffer::new(stream, bytes).map_err(|e| {
        driver_error(
            me,
            Some(layer),
            format!("allocating a {bytes}-byte pack buffer"),
            e,
        )
    })?);
    Ok(())
}

/// Local copies and packs (device-to-device, on NCCL's stream), then one grouped exchange
/// of the layer's sends and receives, then a wait for everything queued.
#[allow(clippy::too_many_arguments)]
fn move_rows(
    comm: &NcclComm,
    ordinal: usize,
    layer: usize,
    weights: &LayerWeights<'_>,
    ex: &Exchange,
    staging: &mut Staging,
    mut pack: Option<&mut DeviceBuffer>,
    deadline: Deadline,
) -> Result<(), EplbCommError> {
    let me = comm.rank();
    let queue = CopyQueue::new(comm.stream(), me, layer)?;
    let tensors = weights.num_tensors();
    let mut locals = Vec::new();
    for (i, row) in staging.rows().iter().enumerate() {
        if let RowSource::Local { src_row } = row.source {
            for t in 0..tensors {
                let at = staging.tensor_range(i, t).map(|r| r.start);
                locals.push((src_row, t, at));
            }
        }
    }
    let StagingMemory::Device { buf, .. } = staging.memory_mut() else {
        return Err(inconsistent(
            me,
            layer,
            "staging is not in device memory".into(),
        ));
    };
    let moved = (|| {
        for (src_row, t, at) in locals {
            let at =
                at.ok_or_else(|| inconsistent(me, layer, format!("no staged row for tensor {t}")))?;
            queue.row_to_buffer(weights, t, src_row, buf, at)?;
        }
        if !ex.packs.is_empty() {
            let Some(pack) = pack.as_deref_mut() else {
                return Err(inconsistent(me, layer, "no pack buffer".into()));
            };
            for p in &ex.packs {
                queue.row_to_buffer(weights, p.tensor, p.row, pack, p.offset)?;
            }
        }
        let ops = p2p_ops(ordinal, weights, ex, buf, pack.as_deref())
            .map_err(|detail| inconsistent(me, layer, detail))?;
        comm.grouped(&ops, deadline)
            .map_err(|e| nccl_error(me, Some(layer), "exchanging rows (grouped send/recv)", e))?;
        queue.wait(deadline, "staging local copies")
    })();
    if moved.is_err() {
        queue.settle();
    }
    moved
}

fn inconsistent(rank: usize, layer: usize, detail: String) -> EplbCommError {
    EplbCommError::PlanMismatch {
        rank,
        layer,
        detail: format!("inconsistent staging: {detail}"),
    }
}

fn nccl_error(rank: usize, layer: Option<usize>, op: &str, source: NcclError) -> EplbCommError {
    EplbCommError::Nccl {
        rank,
        layer,
        op: op.to_string(),
        source: Box::new(source),
    }
}
