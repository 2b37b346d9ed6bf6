//! The `host` backend: expert rows staged through host memory over the host (TCP)
//! transport of `moeshift-device-comm`, in the role `torch_gloo` plays in vLLM.
//!
//! # How a layer moves
//!
//! 1. **Checks, then agreement.** This rank checks the plan against its weights (ranks,
//!    rows, peers, rounds), lays out and allocates its staging, then all ranks exchange a
//!    digest of `(layer, plan)` in one `all_gather` ([`agree_on_plan`]). A plan that differs
//!    between ranks, or a rank that failed its own checks, stops every rank here, before a
//!    byte moves.
//! 2. **Local copies** are staged from the old rows.
//! 3. **Rounds.** In each round of the plan this rank talks to at most one peer (the plan
//!    guarantees it, and the pair meets in the same round on both sides). The two exchange
//!    their rows in both directions at once with one `send_recv`: all rows bound for the
//!    peer in that round go in one message, a header listing `(expert, tensor, bytes)` for
//!    each row plus the layer, the plan digest and the round, followed by the rows, expert
//!    by expert and tensor by tensor. The message is received straight into staging,
//!    header first, and the header is checked against what this rank's plan expects.
//! 4. **Barrier.** Every rank waits until every other rank has received everything, so
//!    when `transfer` returns on one rank, all ranks have their rows: all commit or none
//!    (short of a crash after the barrier). Layers with no traffic skip it.
//!
//! Senders pack rows from their weights into one reusable buffer before handing them to the
//! socket, so this rank has finished reading its own rows as soon as each exchange returns;
//! the weights are never written before [`StagedLayer::commit`].
//!
//! # Group
//!
//! The communicator owns its [`HostGroup`]: the EPLB group, formed under its own name
//! ([`EPLB_GROUP_NAME`]) so EPLB traffic never interleaves with other traffic on a shared
//! group (a group runs one operation at a time, in the same order on every rank).
//!
//! # Failures
//!
//! A lost or killed peer, an aborting peer or an expired deadline is an error on every
//! surviving rank, naming the layer, the operation and the peer; the group is then
//! unusable ([`EplbCommError::poisons_communicator`]) and a new communicator is needed.
//! A rank that cannot go on after the agreement for any other reason (a message that does
//! not match its plan) closes its connections, so its peers fail at once instead of waiting
//! for their deadline, and refuses further transfers
//! ([`EplbCommError::CommunicatorFailed`]). Errors found in step 1 leave the communicator
//! usable.
//!
//! # Memory
//!
//! Host weights are packed, received and staged in host memory, and committed by the CPU.
//! CUDA weights (feature `cuda`) go through page-locked host memory: the rows bound for a
//! peer are copied device-to-host into the outgoing message, the peer's message lands in
//! page-locked staging and its rows are copied host-to-device into device staging (while
//! the next round travels), local copies go device-to-device, and the commit is
//! device-to-device on the GPU (see `cuda_stage::host_path`). Page-locked buffers are kept
//! and reused across layers. Without feature `cuda`, CUDA weights are refused with
//! [`EplbCommError::NotHostMemory`].

use std::ops::Range;
use std::time::Instant;

use moeshift_device_comm::{HostGroup, StoreClient};
use moeshift_placement::{LayerPlan, RankPlan};
use moeshift_sync::Deadline;
use moeshift_tensor::Device;

use crate::agree::{agree_on_layouts, agree_on_plan, plan_digest};
use crate::comm::{Backend, EplbCommunicator, StagedLayer, TransferStats};
use crate::error::EplbCommError;
use crate::staging::{RowSource, Staging, StagingBuilder};
use crate::weights::{LayerLayout, LayerWeights};
use crate::wire::{Reader, Writer};

/// Name of the host group EPLB communicators form.
pub const EPLB_GROUP_NAME: &str = "eplb";

/// First word of every row message.
const MAGIC: u32 = 0x4550_4C42; // "EPLB"
/// Version of the row message layout.
const VERSION: u32 = 1;
/// Bytes of a row message header before its rows' entries: magic, version, six fields.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const HEADER_FIXED_BYTES: usize = 8 + 6 * 8;
/// Bytes of one `(expert, tensor, row bytes)` entry of a header.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const HEADER_ITEM_BYTES: usize = 3 * 8;

/// Forms the EPLB group over `members` (global ranks, in EPLB-group order) under
/// [`EPLB_GROUP_NAME`]. Only the members call it, with the same list.
pub fn eplb_group(
    store: &StoreClient,
    members: &[usize],
    deadline: Deadline,
) -> Result<HostGroup, EplbCommError> {
    HostGroup::from_store(store, EPLB_GROUP_NAME, members, deadline).map_err(|e| {
        EplbCommError::from_comm(store.rank(), None, "forming the EPLB group".into(), e)
    })
}

/// The `host` backend; see the [module documentation](self).
///
/// ```
/// use moeshift_device_comm::{StoreClient, World};
/// use moeshift_eplb_comm::{EplbCommunicator, HostCommunicator, LayerWeights};
/// use moeshift_placement::LayerPlan;
/// use moeshift_sync::Deadline;
/// use moeshift_tensor::{DType, HostBuffer};
/// use std::time::Duration;
///
/// // One rank holding experts [0, 1, 2]; the new placement is [2, 0, 0].
/// let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
/// let world = World::single_node(0, 1, "127.0.0.1", port)?;
/// let deadline = Deadline::after(Duration::from_secs(10));
/// let store = StoreClient::connect(&world, deadline)?;
///
/// let mut buf = HostBuffer::from_bytes(&[0, 0, 1, 1, 2, 2])?;
/// let mut weights = LayerWeights::builder().host("w", &mut buf, &[3, 2], DType::U8)?.build()?;
/// let mut comm = HostCommunicator::new(&store, &[0], std::slice::from_ref(&weights), deadline)?;
///
/// let plan = LayerPlan::new(&[0, 1, 2], &[2, 0, 0], 1)?;
/// let staged = comm.transfer(0, &plan, &weights, deadline)?;
/// assert_eq!(weights.row(0, 0)?, &[0, 0]); // untouched until the commit
/// // Every row changes, each a copy of an old local row: 0 ← 2, 1 ← 0, 2 ← 0.
/// assert_eq!(staged.staged_rows().len(), 3);
/// assert_eq!(staged.stats().bytes_copied_locally, 6);
/// staged.commit(&mut weights)?;
/// drop(weights);
/// assert_eq!(buf.as_slice(), &[2, 2, 0, 0, 0, 0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct HostCommunicator {
    group: Option<HostGroup>,
    /// This rank and the group's size (kept when the group is given up).
    me: usize,
    size: usize,
    layouts: Vec<LayerLayout>,
    /// Why the communicator stopped, once it did outside the transport.
    failed: Option<String>,
    /// Outgoing message of the current round (reused).
    send_buf: Vec<u8>,
    /// Page-locked buffers, streams and device staging for CUDA weights, made at the first
    /// transfer of CUDA weights.
    #[cfg(feature = "cuda")]
    cuda: Option<crate::cuda_stage::host_path::HostCuda>,
}

/// One round this rank takes part in.
struct RoundIo<'p> {
    round: usize,
    peer: usize,
    sends: Vec<&'p moeshift_placement::SendOp>,
    /// Staging bytes the peer's message lands in (header, then rows).
    recv: Range<usize>,
    /// The staged rows (indices into the staging's rows) the message carries.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    rows: Range<usize>,
    /// The header this rank expects from the peer.
    expected: Vec<u8>,
}

/// A layer checked and laid out on this rank, with its staging allocated.
struct Prepared<'p> {
    mine: &'p RankPlan,
    ios: Vec<RoundIo<'p>>,
    /// Where messages land (and, for host weights, every staged row).
    wire: Staging,
    /// Device staging, for CUDA weights.
    #[cfg(feature = "cuda")]
    device: Option<Staging>,
}

impl HostCommunicator {
    /// Forms the EPLB group over `members` (see [`eplb_group`]) and builds the
    /// communicator for the layers `all_layers` (index = layer). Every member calls it.
    pub fn new(
        store: &StoreClient,
        members: &[usize],
        all_layers: &[LayerWeights<'_>],
        deadline: Deadline,
    ) -> Result<Self, EplbCommError> {
        let group = eplb_group(store, members, deadline)?;
        Self::with_group(group, all_layers, deadline)
    }

    /// Builds the communicator over `group`, which it then owns; the group must carry no
    /// other traffic. Checks that every layer is in host memory (or, with feature `cuda`,
    /// on a GPU) and that every rank describes the same tensors (names, dtypes, row bytes,
    /// rows per rank) for every layer. Every member calls it.
    pub fn with_group(
        group: HostGroup,
        all_layers: &[LayerWeights<'_>],
        deadline: Deadline,
    ) -> Result<Self, EplbCommError> {
        for layer in all_layers {
            supported_memory(layer)?;
        }
        Self::from_layouts(
            group,
            all_layers.iter().map(LayerWeights::layout).collect(),
            deadline,
        )
    }

    /// Like [`with_group`](Self::with_group), from the layer layouts alone (the weights
    /// need not exist yet; each transfer checks the weights it gets against them).
    pub fn from_layouts(
        group: HostGroup,
        layouts: Vec<LayerLayout>,
        deadline: Deadline,
    ) -> Result<Self, EplbCommError> {
        agree_on_layouts(&group, &layouts, deadline)?;
        Ok(Self {
            me: group.rank(),
            size: group.size(),
            group: Some(group),
            layouts,
            failed: None,
            send_buf: Vec::new(),
            #[cfg(feature = "cuda")]
            cuda: None,
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

    /// The layouts every rank agreed on, by layer.
    pub fn layouts(&self) -> &[LayerLayout] {
        &self.layouts
    }

    /// The EPLB group, unless the communicator gave it up after a failure.
    pub fn group(&self) -> Option<&HostGroup> {
        self.group.as_ref()
    }

    fn transfer_inner(
        &mut self,
        layer: usize,
        plan: &LayerPlan,
        weights: &LayerWeights<'_>,
        deadline: Deadline,
    ) -> Result<StagedLayer, EplbCommError> {
        let started = Instant::now();
        let group = match (&self.group, &self.failed) {
            (Some(g), None) => g,
            (_, reason) => {
                return Err(EplbCommError::CommunicatorFailed {
                    rank: self.me,
                    reason: reason
                        .clone()
                        .unwrap_or_else(|| "the EPLB group is gone".into()),
                })
            }
        };
        let me = group.rank();
        let digest = plan_digest(layer, plan);

        // 1. Local checks and staging, then agreement (a refusal is sent, not kept).
        let prepared =
            check_plan(me, group.size(), &self.layouts, layer, plan, weights).and_then(|mine| {
                let layout = layout_of(me, &self.layouts, layer)?;
                let on_host = weights.device() == Device::Host;
                let (wire, ios) = lay_out(layout, me, layer, digest, plan, mine, on_host);
                if on_host {
                    return Ok(Prepared {
                        mine,
                        wire: wire.build(me, layer)?,
                        ios,
                        #[cfg(feature = "cuda")]
                        device: None,
                    });
                }
                #[cfg(feature = "cuda")]
                {
                    let (wire, device) = prepare_device(
                        &mut self.cuda,
                        me,
                        layer,
                        layout,
                        weights,
                        wire,
                        &ios,
                        mine,
                    )?;
                    Ok(Prepared {
                        mine,
                        wire,
                        ios,
                        device: Some(device),
                    })
                }
                #[cfg(not(feature = "cuda"))]
                {
                    supported_memory(weights)?;
                    Err(internal(
                        me,
                        layer,
                        "device weights need feature `cuda`".into(),
                    ))
                }
            });
        let refusal = prepared.as_ref().err().map(ToString::to_string);
        if let Err(e) = agree_on_plan(group, layer, digest, refusal.as_deref(), deadline) {
            if let Ok(p) = prepared {
                self.recycle(p);
            }
            return Err(e);
        }
        let mut prepared = prepared?;
        let layout = layout_of(me, &self.layouts, layer)?;
        let expert_bytes = layout.expert_bytes() as u64;
        let tensors = layout.tensors.len();

        // 2. Local copies, from the old rows; 3. one exchange per round with that round's
        //    peer.
        let mut send_buf = std::mem::take(&mut self.send_buf);
        #[cfg(feature = "cuda")]
        let device = prepared.device.as_mut();
        #[cfg(not(feature = "cuda"))]
        let device: Option<&mut Staging> = None;
        let moved = match device {
            None => {
                stage_local_copies(me, layer, tensors, weights, &mut prepared.wire).and_then(|()| {
                    exchange_rounds(
                        group,
                        layer,
                        digest,
                        layout,
                        weights,
                        &prepared.ios,
                        &mut prepared.wire,
                        &mut RoundPath::Host(&mut send_buf),
                        deadline,
                    )
                })
            }
            #[cfg(feature = "cuda")]
            Some(device) => match self.cuda.as_mut() {
                Some(cuda) => move_device_rows(
                    cuda,
                    group,
                    layer,
                    digest,
                    layout,
                    weights,
                    &prepared.ios,
                    &mut prepared.wire,
                    device,
                    deadline,
                ),
                None => Err(internal(
                    me,
                    layer,
                    "no CUDA state for device weights".into(),
                )),
            },
            #[cfg(not(feature = "cuda"))]
            Some(_) => Err(internal(
                me,
                layer,
                "device weights need feature `cuda`".into(),
            )),
        };
        send_buf.clear();
        self.send_buf = send_buf;
        if let Err(e) = moved {
            let from_transport = matches!(
                e,
                EplbCommError::DeadlineExpired { .. }
                    | EplbCommError::PeerLost { .. }
                    | EplbCommError::PeerAborted { .. }
                    | EplbCommError::Transport { .. }
            );
            if !from_transport {
                // The transport is in step but this rank cannot go on (a peer sent something
                // else than the plan says, or its GPU failed): close the connections, so that
                // peers waiting on this rank fail now rather than at their deadline. The
                // transport already told the peers about its own failures.
                self.failed = Some(e.to_string());
                self.group = None;
            }
            return Err(e);
        }

        // 4. Nobody commits before everybody has everything.
        if !plan.rounds().is_empty() {
            if let Err(e) = group.barrier(deadline) {
                self.recycle(prepared);
                return Err(EplbCommError::from_comm(
                    me,
                    Some(layer),
                    "the post-transfer barrier".into(),
                    e,
                ));
            }
        }

        let mut peers: Vec<usize> = prepared.ios.iter().map(|io| io.peer).collect();
        peers.sort_unstable();
        peers.dedup();
        let mine = prepared.mine;
        let mut stats = TransferStats {
            bytes_sent: expert_bytes.saturating_mul(mine.sends.len() as u64),
            bytes_received: expert_bytes.saturating_mul(mine.recvs.len() as u64),
            bytes_copied_locally: expert_bytes.saturating_mul(mine.local_copies.len() as u64),
            peers: peers.len(),
            rounds: prepared.ios.len(),
            staging_bytes: prepared.wire.len() as u64,
            seconds: 0.0,
        };
        let (plan_part, layout) = (mine.clone(), layout.clone());
        let staging = self.take_staging(prepared, &mut stats);
        stats.seconds = started.elapsed().as_secs_f64();
        Ok(StagedLayer::new(
            layer,
            me,
            Backend::Host,
            plan_part,
            layout,
            staging,
            stats,
        ))
    }

    /// The staging a staged layer keeps: the wire staging for host weights; for CUDA
    /// weights the device staging (the page-locked wire staging is kept for the next
    /// layer, and both count in `stats.staging_bytes`).
    fn take_staging(&mut self, prepared: Prepared<'_>, stats: &mut TransferStats) -> Staging {
        #[cfg(feature = "cuda")]
        if let Some(device) = prepared.device {
            stats.staging_bytes = stats.staging_bytes.saturating_add(device.len() as u64);
            if let Some(cuda) = self.cuda.as_mut() {
                cuda.recycle(prepared.wire);
            }
            return device;
        }
        let _ = stats;
        prepared.wire
    }

    /// Keeps a prepared layer's page-locked staging for the next layer.
    fn recycle(&mut self, prepared: Prepared<'_>) {
        #[cfg(feature = "cuda")]
        if prepared.device.is_some() {
            if let Some(cuda) = self.cuda.as_mut() {
                cuda.recycle(prepared.wire);
            }
        }
        let _ = prepared;
    }
}

/// The agreed layout of `layer`.
fn layout_of(
    me: usize,
    layouts: &[LayerLayout],
    layer: usize,
) -> Result<&LayerLayout, EplbCommError> {
    layouts.get(layer).ok_or(EplbCommError::LayerOutOfRange {
        rank: me,
        layer,
        layers: layouts.len(),
    })
}

/// Everything about a transfer that can be checked locally; returns this rank's plan.
pub(crate) fn check_plan<'p>(
    me: usize,
    size: usize,
    layouts: &[LayerLayout],
    layer: usize,
    plan: &'p LayerPlan,
    weights: &LayerWeights<'_>,
) -> Result<&'p RankPlan, EplbCommError> {
    let layout = layout_of(me, layouts, layer)?;
    if let Some((tensor, detail)) = layout.first_difference(&weights.layout()) {
        let which = tensor
            .map(|t| format!("tensor {t:?}: "))
            .unwrap_or_default();
        return Err(EplbCommError::WeightsChanged {
            rank: me,
            layer,
            detail: format!("{which}{detail} (agreed layout here, given weights there)"),
        });
    }
    supported_memory(weights)?;
    check_rank_plan(me, size, layer, layout.rows, plan)
}

/// The part of [`check_plan`] every backend shares: the plan covers `size` ranks of `rows`
/// rows, this rank has a part, every row it names is in range, and every send and receive
/// happens in a round that pairs this rank with that peer. Returns this rank's plan.
pub(crate) fn check_rank_plan(
    me: usize,
    size: usize,
    layer: usize,
    rows: usize,
    plan: &LayerPlan,
) -> Result<&RankPlan, EplbCommError> {
    let mismatch = |detail: String| EplbCommError::PlanMismatch {
        rank: me,
        layer,
        detail,
    };
    if plan.num_ranks() != size {
        return Err(mismatch(format!(
            "the plan is for {} ranks, the EPLB group has {size}",
            plan.num_ranks(),
        )));
    }
    if plan.rows_per_rank() != rows {
        return Err(mismatch(format!(
            "the plan has {} rows per rank, the weights have {rows}",
            plan.rows_per_rank(),
        )));
    }
    let mine = plan
        .rank(me)
        .map_err(|e| mismatch(format!("no part for this rank: {e}")))?;
    let row_ok = |expert: usize, row: usize| {
        if row < rows {
            Ok(())
        } else {
            Err(EplbCommError::RowOutOfRange {
                rank: me,
                layer,
                expert,
                row,
                rows,
            })
        }
    };
    for c in mine.local_copies.iter().chain(&mine.dup_fills) {
        row_ok(c.expert, c.src_row)?;
        row_ok(c.expert, c.dst_row)?;
    }
    for &r in &mine.unchanged_rows {
        if r >= rows {
            return Err(mismatch(format!(
                "unchanged row {r} is outside {rows} rows"
            )));
        }
    }
    let rounds = plan.rounds();
    let pair_ok = |what: &str, expert: usize, peer: usize, round: usize| {
        let met = rounds.get(round).and_then(|r| r.peer_of(me));
        if peer == me || met != Some(peer) {
            Err(mismatch(format!(
                "expert {expert} {what} rank {peer} in round {round}, but that round pairs this rank with {met:?} (of {} rounds)",
                rounds.len()
            )))
        } else {
            Ok(())
        }
    };
    for s in &mine.sends {
        row_ok(s.expert, s.src_row)?;
        pair_ok("goes to", s.expert, s.dst, s.round)?;
    }
    for r in &mine.recvs {
        row_ok(r.expert, r.dst_row)?;
        pair_ok("comes from", r.expert, r.src, r.round)?;
    }
    Ok(mine)
}

/// Lays out staging (per round: the peer's header, then its rows; then, when
/// `local_in_wire`, the local copies) and lists the rounds this rank takes part in.
fn lay_out<'p>(
    layout: &LayerLayout,
    me: usize,
    layer: usize,
    digest: u64,
    plan: &'p LayerPlan,
    mine: &'p RankPlan,
    local_in_wire: bool,
) -> (StagingBuilder, Vec<RoundIo<'p>>) {
    let mut b = StagingBuilder::new(layout);
    let mut ios = Vec::new();
    for (round, r) in plan.rounds().iter().enumerate() {
        let Some(peer) = r.peer_of(me) else {
            continue;
        };
        let mut recvs: Vec<_> = mine
            .recvs
            .iter()
            .filter(|x| x.round == round && x.src == peer)
            .collect();
        recvs.sort_by_key(|x| x.expert);
        let mut sends: Vec<_> = mine
            .sends
            .iter()
            .filter(|x| x.round == round && x.dst == peer)
            .collect();
        sends.sort_by_key(|x| x.expert);
        let expected = encode_header(
            layout,
            &Header {
                layer,
                digest,
                round,
                src: peer,
                dst: me,
            },
            recvs.iter().map(|x| x.expert),
        );
        let start = b.len();
        b.reserve(expected.len());
        let first_row = b.num_rows();
        for x in &recvs {
            b.push_row(x.dst_row, x.expert, RowSource::Peer { peer, round });
        }
        ios.push(RoundIo {
            round,
            peer,
            sends,
            recv: start..b.len(),
            rows: first_row..b.num_rows(),
            expected,
        });
    }
    if local_in_wire {
        for c in &mine.local_copies {
            b.push_row(c.dst_row, c.expert, RowSource::Local { src_row: c.src_row });
        }
    }
    (b, ios)
}

/// CUDA weights: the page-locked wire staging (headers and received rows), the device
/// staging (received rows in the same order, then local copies) and the outgoing message
/// buffer, allocated before the agreement so that a failure is a refusal.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn prepare_device(
    cuda: &mut Option<crate::cuda_stage::host_path::HostCuda>,
    me: usize,
    layer: usize,
    layout: &LayerLayout,
    weights: &LayerWeights<'_>,
    wire: StagingBuilder,
    ios: &[RoundIo<'_>],
    mine: &RankPlan,
) -> Result<(Staging, Staging), EplbCommError> {
    use crate::cuda_stage::host_path::HostCuda;
    let Device::Cuda(ordinal) = weights.device() else {
        return Err(internal(me, layer, "the weights are not on a GPU".into()));
    };
    if cuda.as_ref().is_none_or(|c| c.ordinal() != ordinal) {
        *cuda = None;
        *cuda = Some(HostCuda::new(me, layer, ordinal)?);
    }
    let Some(state) = cuda.as_mut() else {
        return Err(internal(
            me,
            layer,
            "no CUDA state for device weights".into(),
        ));
    };
    let mut device = StagingBuilder::new(layout);
    for io in ios {
        let mut recvs: Vec<_> = mine
            .recvs
            .iter()
            .filter(|x| x.round == io.round && x.src == io.peer)
            .collect();
        recvs.sort_by_key(|x| x.expert);
        for x in recvs {
            device.push_row(
                x.dst_row,
                x.expert,
                RowSource::Peer {
                    peer: io.peer,
                    round: io.round,
                },
            );
        }
    }
    for c in &mine.local_copies {
        device.push_row(c.dst_row, c.expert, RowSource::Local { src_row: c.src_row });
    }
    let send_bytes = ios
        .iter()
        .map(|io| {
            let header = HEADER_FIXED_BYTES.saturating_add(
                HEADER_ITEM_BYTES
                    .saturating_mul(io.sends.len().saturating_mul(layout.tensors.len())),
            );
            header.saturating_add(layout.expert_bytes().saturating_mul(io.sends.len()))
        })
        .max()
        .unwrap_or(0);
    state.prepare(me, layer, wire, device, send_bytes)
}

/// CUDA weights: local copies on the GPU, then the rounds through page-locked memory.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn move_device_rows(
    cuda: &mut crate::cuda_stage::host_path::HostCuda,
    group: &HostGroup,
    layer: usize,
    digest: u64,
    layout: &LayerLayout,
    weights: &LayerWeights<'_>,
    ios: &[RoundIo<'_>],
    wire: &mut Staging,
    device: &mut Staging,
    deadline: Deadline,
) -> Result<(), EplbCommError> {
    let mut path = cuda.round_path(group.rank(), layer, device)?;
    let moved = path
        .stage_local_copies(weights, layout.tensors.len())
        .and_then(|()| {
            exchange_rounds(
                group,
                layer,
                digest,
                layout,
                weights,
                ios,
                wire,
                &mut RoundPath::Device(&mut path),
                deadline,
            )
        })
        .and_then(|()| path.finish(deadline));
    if moved.is_err() {
        path.settle();
    }
    moved
}

impl EplbCommunicator for HostCommunicator {
    fn backend(&self) -> Backend {
        Backend::Host
    }

    fn rank(&self) -> usize {
        HostCommunicator::rank(self)
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

/// The host backend moves host memory, and CUDA memory when built with feature `cuda`
/// (see the module's "Memory" section).
fn supported_memory(weights: &LayerWeights<'_>) -> Result<(), EplbCommError> {
    let unsupported = |d: Device| match d {
        Device::Host => false,
        Device::Cuda(_) => !cfg!(feature = "cuda"),
    };
    match weights.tensors().iter().find(|t| unsupported(t.device())) {
        None => Ok(()),
        Some(t) => Err(EplbCommError::NotHostMemory {
            tensor: t.name().to_string(),
            device: t.device(),
            what: "the host EPLB backend built without feature `cuda`",
        }),
    }
}

/// Copies the old rows of every local copy into staging.
fn stage_local_copies(
    me: usize,
    layer: usize,
    tensors: usize,
    weights: &LayerWeights<'_>,
    staging: &mut Staging,
) -> Result<(), EplbCommError> {
    for (i, row) in staging.rows().to_vec().iter().enumerate() {
        if let RowSource::Local { src_row } = row.source {
            for t in 0..tensors {
                let src = weights.row(t, src_row)?;
                let dst = staging.row_tensor_mut(i, t).ok_or_else(|| {
                    internal(
                        me,
                        layer,
                        format!("staged row {i} has no room for tensor {t}"),
                    )
                })?;
                dst.copy_from_slice(src);
            }
        }
    }
    Ok(())
}

fn internal(rank: usize, layer: usize, detail: String) -> EplbCommError {
    EplbCommError::PlanMismatch {
        rank,
        layer,
        detail: format!("inconsistent staging: {detail}"),
    }
}

/// How a round's rows get into its message and out of staging.
enum RoundPath<'a, 'b> {
    /// Host weights: packed into this buffer by the CPU, received where they stay.
    Host(&'a mut Vec<u8>),
    /// CUDA weights: packed by device-to-host copies, moved on to device staging.
    #[cfg(feature = "cuda")]
    Device(&'a mut crate::cuda_stage::host_path::DevicePath<'b>),
    /// Keeps `'b` used without feature `cuda`.
    #[allow(dead_code)]
    Unused(std::marker::PhantomData<&'b ()>),
}

/// Runs every round: pack the rows for the peer, exchange with `send_recv` (the peer's
/// message lands in staging), check the header.
#[allow(clippy::too_many_arguments)]
fn exchange_rounds(
    group: &HostGroup,
    layer: usize,
    digest: u64,
    layout: &LayerLayout,
    weights: &LayerWeights<'_>,
    ios: &[RoundIo<'_>],
    staging: &mut Staging,
    path: &mut RoundPath<'_, '_>,
    deadline: Deadline,
) -> Result<(), EplbCommError> {
    let me = group.rank();
    for io in ios {
        let header = Header {
            layer,
            digest,
            round: io.round,
            src: me,
            dst: io.peer,
        };
        let send_buf: &[u8] = match path {
            RoundPath::Host(buf) => {
                pack_rows(layout, weights, &header, &io.sends, buf)?;
                buf.as_slice()
            }
            #[cfg(feature = "cuda")]
            RoundPath::Device(device) => {
                let head = encode_header(layout, &header, io.sends.iter().map(|s| s.expert));
                device.pack(layout, weights, &head, &io.sends, deadline)?
            }
            RoundPath::Unused(_) => {
                return Err(internal(me, layer, "no packing path".into()));
            }
        };
        let recv = staging.region_mut(io.recv.clone()).ok_or_else(|| {
            internal(
                me,
                layer,
                format!("round {} receive area is outside staging", io.round),
            )
        })?;
        group
            .send_recv(io.peer, send_buf, io.peer, recv, deadline)
            .map_err(|e| {
                EplbCommError::from_comm(
                    me,
                    Some(layer),
                    format!("round {} (exchanging rows with rank {})", io.round, io.peer),
                    e,
                )
            })?;
        let got = staging
            .region_mut(io.recv.start..io.recv.start.saturating_add(io.expected.len()))
            .map(|s| &*s)
            .unwrap_or(&[]);
        if got != io.expected.as_slice() {
            return Err(describe_wire_mismatch(me, layer, io, layout, got));
        }
        #[cfg(feature = "cuda")]
        if let RoundPath::Device(device) = path {
            let rows = io.recv.start.saturating_add(io.expected.len())..io.recv.end;
            device.received(staging, rows, io.rows.start)?;
        }
    }
    Ok(())
}

/// Fills `out` with the header and the rows of `sends` (old content), expert by expert,
/// tensor by tensor. For CUDA weights this is where device-to-host copies would go.
fn pack_rows(
    layout: &LayerLayout,
    weights: &LayerWeights<'_>,
    header: &Header,
    sends: &[&moeshift_placement::SendOp],
    out: &mut Vec<u8>,
) -> Result<(), EplbCommError> {
    out.clear();
    out.extend_from_slice(&encode_header(
        layout,
        header,
        sends.iter().map(|s| s.expert),
    ));
    out.reserve(layout.expert_bytes().saturating_mul(sends.len()));
    for s in sends {
        for t in 0..layout.tensors.len() {
            out.extend_from_slice(weights.row(t, s.src_row)?);
        }
    }
    Ok(())
}

/// The fixed part of a row message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    layer: usize,
    digest: u64,
    round: usize,
    src: usize,
    dst: usize,
}

/// Header of a message carrying `experts` (in order): the fixed part, then
/// `(expert, tensor, row bytes)` for every row.
fn encode_header(
    layout: &LayerLayout,
    h: &Header,
    experts: impl Iterator<Item = usize>,
) -> Vec<u8> {
    let experts: Vec<usize> = experts.collect();
    let items = experts.len().saturating_mul(layout.tensors.len());
    let mut w = Writer::with_capacity(56 + 24 * items);
    w.u32(MAGIC)
        .u32(VERSION)
        .usize(h.layer)
        .u64(h.digest)
        .usize(h.round)
        .usize(h.src)
        .usize(h.dst)
        .usize(items);
    for &e in &experts {
        for (t, spec) in layout.tensors.iter().enumerate() {
            w.usize(e).usize(t).usize(spec.row_bytes);
        }
    }
    w.finish()
}

/// Turns a header that differs from the expected one into an error naming what differs.
fn describe_wire_mismatch(
    me: usize,
    layer: usize,
    io: &RoundIo<'_>,
    layout: &LayerLayout,
    got: &[u8],
) -> EplbCommError {
    let err = |expert: Option<usize>, tensor: Option<String>, detail: String| {
        EplbCommError::WireMismatch {
            rank: me,
            layer,
            peer: io.peer,
            round: io.round,
            expert,
            tensor,
            detail,
        }
    };
    let mut a = Reader::new(&io.expected);
    let mut b = Reader::new(got);
    if b.u32() != Some(MAGIC) || b.u32() != Some(VERSION) {
        return err(
            None,
            None,
            "it is not an EPLB row message of this version".into(),
        );
    }
    let _ = (a.u32(), a.u32());
    let fields = [
        "layer",
        "plan digest",
        "round",
        "sender",
        "receiver",
        "number of rows",
    ];
    for field in fields {
        let (want, have) = (a.u64(), b.u64());
        if want != have {
            let show =
                |v: Option<u64>| v.map_or_else(|| "nothing".to_string(), |v| format!("{v:#x}"));
            return err(
                None,
                None,
                format!("{field}: expected {}, got {}", show(want), show(have)),
            );
        }
    }
    let name = |t: Option<usize>| {
        t.and_then(|t| layout.tensors.get(t))
            .map(|s| s.name.clone())
    };
    loop {
        let want = (a.usize(), a.usize(), a.usize());
        let have = (b.usize(), b.usize(), b.usize());
        if want != have {
            return err(
                want.0,
                name(want.1),
                format!(
                    "expected a row of expert {:?} tensor {:?} ({:?} bytes), got expert {:?} tensor {:?} ({:?} bytes)",
                    want.0,
                    name(want.1),
                    want.2,
                    have.0,
                    name(have.1),
                    have.2
                ),
            );
        }
        if want.0.is_none() {
            return err(
                None,
                None,
                "the headers differ in a way no field explains".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::TensorSpec;
    use moeshift_tensor::DType;

    fn layout() -> LayerLayout {
        LayerLayout {
            rows: 2,
            tensors: vec![
                TensorSpec {
                    name: "w13".into(),
                    dtype: DType::Bf16,
                    row_bytes: 8,
                },
                TensorSpec {
                    name: "w2".into(),
                    dtype: DType::F32,
                    row_bytes: 4,
                },
            ],
        }
    }

    #[test]
    fn headers_list_every_row() {
        let h = Header {
            layer: 3,
            digest: 0xABCD,
            round: 1,
            src: 2,
            dst: 0,
        };
        let bytes = encode_header(&layout(), &h, [5usize, 9].into_iter());
        // 8 bytes of magic and version, 6 fields, 2 experts × 2 tensors × 3 fields.
        assert_eq!(bytes.len(), 8 + 6 * 8 + 4 * 24);
        assert_eq!(bytes.len(), HEADER_FIXED_BYTES + 4 * HEADER_ITEM_BYTES);
        let mut r = Reader::new(&bytes);
        assert_eq!((r.u32(), r.u32()), (Some(MAGIC), Some(VERSION)));
        assert_eq!(r.usize(), Some(3));
        assert_eq!(r.u64(), Some(0xABCD));
        for want in [1, 2, 0, 4] {
            assert_eq!(r.usize(), Some(want));
        }
        for want in [(5, 0, 8), (5, 1, 4), (9, 0, 8), (9, 1, 4)] {
            assert_eq!(
                (r.usize(), r.usize(), r.usize()),
                (Some(want.0), Some(want.1), Some(want.2))
            );
        }
        assert!(r.is_empty());
    }

    #[test]
    fn mismatched_headers_name_the_expert_and_tensor() {
        let l = layout();
        let h = Header {
            layer: 3,
            digest: 7,
            round: 0,
            src: 1,
            dst: 0,
        };
        let io = RoundIo {
            round: 0,
            peer: 1,
            sends: vec![],
            recv: 0..0,
            rows: 0..0,
            expected: encode_header(&l, &h, [4usize, 6].into_iter()),
        };
        let got = encode_header(&l, &h, [4usize, 8].into_iter());
        let e = describe_wire_mismatch(0, 3, &io, &l, &got);
        assert!(
            matches!(e, EplbCommError::WireMismatch { expert: Some(6), ref tensor, peer: 1, .. } if tensor.as_deref() == Some("w13")),
            "{e}"
        );
        let other = Header { digest: 8, ..h };
        let got = encode_header(&l, &other, [4usize, 6].into_iter());
        let e = describe_wire_mismatch(0, 3, &io, &l, &got);
        assert!(e.to_string().contains("plan digest"), "{e}");
        let e = describe_wire_mismatch(0, 3, &io, &l, b"garbage!");
        assert!(e.to_string().contains("not an EPLB row message"), "{e}");
    }
}
