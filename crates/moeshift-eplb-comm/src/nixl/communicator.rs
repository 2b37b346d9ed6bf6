//! [`NixlCommunicator`]: the `nixl` backend of [`EplbCommunicator`].

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use moeshift_device_comm::{HostGroup, StoreClient};
use moeshift_placement::{LayerPlan, RankPlan};
use moeshift_sync::Deadline;
use moeshift_tensor::Device;

use super::agent::{CallError, NixlAgent, Read, ReadDesc};
use super::catalog::{check_same_tensors, LayerPlace, Published, RankDescription};
use super::config::{check_ucx_tls, NixlConfig};
use super::error::NixlError;
use super::landing::LandingArea;
use super::probe::{probe, NixlRuntime};
use crate::agree::{agree_on_plan, plan_digest};
use crate::comm::{Backend, EplbCommunicator, StagedLayer, TransferStats};
use crate::error::EplbCommError;
use crate::host::eplb_group;
use crate::staging::{RowSource, Staging, StagingBuilder};
use crate::weights::{LayerLayout, LayerWeights};
use crate::wire::{Reader, Writer};

/// Prefix of the rendezvous-store keys the backend publishes its descriptions under.
const STORE_PREFIX: &str = "eplb-nixl";
/// Bytes the warm-up READ moves from each peer (at most one row).
const WARM_UP_BYTES: usize = 64;
/// Part of the time left that a transfer keeps for the post-read check, so a rank whose
/// READs ran out of time can still tell its peers (at most [`MAX_RESERVE`]).
const RESERVE_FRACTION: u32 = 5;
/// Upper bound of the reserve.
const MAX_RESERVE: Duration = Duration::from_secs(2);
/// Polls that only yield the thread before polling starts to sleep between rounds.
const SPIN_POLLS: u32 = u32::MAX;
/// Sleep between polls once spinning is over.
const POLL_SLEEP: Duration = Duration::from_micros(50);

/// What a peer told about itself, kept for the life of the communicator.
#[derive(Debug)]
struct Peer {
    /// Its agent's name (as NIXL knows it after loading its metadata).
    agent: String,
    /// Its layers: where every tensor's rows are.
    layers: Vec<LayerPlace>,
}

/// The `nixl` backend: receivers READ the rows they need straight from their peers' live
/// weights (one-sided, zero-copy on the sender), through NIXL's UCX backend.
///
/// # Building
///
/// Every member of the EPLB group builds it together ([`new`](Self::new),
/// [`with_group`](Self::with_group) or [`with_config`](Self::with_config)), from **all**
/// layers' weights. Once, at construction, each rank:
///
/// 1. loads NIXL ([`probe`](super::probe)) and checks the UCX environment;
/// 2. creates an agent `eplb-<global rank>-<random>` with the UCX backend, and registers
///    every tensor of every layer (its span of rows) and the landing area (see below);
/// 3. publishes through the rendezvous store its agent metadata and, for every (layer,
///    tensor), the layout (rows, name, dtype, row bytes, row shape) and where the rows are
///    (base address, row stride, device); a rank whose setup failed publishes its reason
///    instead, so the others fail at once naming it;
/// 4. checks that every peer has the same tensors ([`EplbCommError::LayoutMismatch`] names
///    the peer, the layer and the tensor), loads the peers' metadata and connects;
/// 5. warms up: READs a few bytes from every peer (connections and first-touch costs are
///    paid here, not by the first layer), then all ranks confirm their setup to each other.
///
/// # A layer
///
/// 1. Local checks (the plan fits this communicator, the weights are the registered ones),
///    then one `all_gather` of a digest of `(layer, plan)` ([`agree_on_plan`]): a rank with
///    another plan, or whose checks failed, stops every rank before a byte moves.
/// 2. This rank posts one READ request per peer it receives from: one descriptor per
///    (expert row, tensor), from the peer's **old** row (the row the peer's plan sends
///    from) into the landing area. No send buffer, no copy and no call on the sender.
/// 3. Local copies are staged from the old rows while the READs run.
/// 4. The requests are polled until they complete or the deadline (minus a small reserve)
///    passes; a failed or late request is released and reported naming the peer, the layer
///    and its experts.
/// 5. Post-read check: one `all_gather` of every rank's outcome. It is the barrier that
///    keeps any rank from committing (overwriting rows) while a peer may still READ them,
///    and it makes the outcome common: if any rank's READs failed, every rank returns an
///    error and nobody commits the layer. Layers where nothing crosses ranks skip it.
///
/// The weights are only read; [`StagedLayer::commit`] writes them later. Call `transfer`
/// for a layer only after the previous [`StagedLayer`] of that layer was committed (or
/// dropped) on this rank, as every rank's plan assumes.
///
/// # Memory
///
/// Registered once: every layer's expert tensors (peers READ from them) and the landing
/// area, sized `max over layers of (rows per rank × bytes per expert)` because a rank
/// receives at most one row per local slot. A layer's [`StagedLayer`] holds only the rows
/// that change (received rows and local copies); its
/// [`staging_bytes`](TransferStats::staging_bytes) say how much. Weights must be in host
/// memory for now; registration already distinguishes host (`DRAM`) and device (`VRAM`)
/// memory, so device weights need device staging and device copies at commit, nothing in
/// the protocol.
///
/// # Failures
///
/// A dead peer fails the READs from it quickly (UCX peer error handling) or, at the latest,
/// at the deadline; every surviving rank then returns an error naming it and the layer, and
/// the communicator refuses further transfers
/// ([`EplbCommError::poisons_communicator`]): build a new one. Errors found in step 1 leave
/// it usable. On every error the weights are untouched.
#[derive(Debug)]
pub struct NixlCommunicator {
    // Field order is drop order: the agent (and its registrations) goes before the landing
    // area it registered, and before the group peers use to learn about failures.
    agent: NixlAgent,
    landing: LandingArea,
    group: Option<HostGroup>,
    runtime: NixlRuntime,
    me: usize,
    layers: Vec<LayerPlace>,
    /// By EPLB-group rank; `None` for this rank.
    peers: Vec<Option<Peer>>,
    registered_bytes: u64,
    /// Why the communicator stopped, once it did.
    failed: Option<String>,
}

/// This rank's side of the setup, before anything is exchanged.
struct LocalSetup {
    runtime: NixlRuntime,
    agent: NixlAgent,
    landing: LandingArea,
    metadata: Vec<u8>,
    registered_bytes: u64,
}

impl NixlCommunicator {
    /// Forms the EPLB group over `members` (see [`eplb_group`](crate::eplb_group)) and
    /// builds the communicator for the layers `all_layers` (index = layer) with the default
    /// [`NixlConfig`]. Every member calls it.
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
    /// traffic) with the default [`NixlConfig`]. Every member calls it.
    pub fn with_group(
        group: HostGroup,
        all_layers: &[LayerWeights<'_>],
        deadline: Deadline,
    ) -> Result<Self, EplbCommError> {
        Self::with_config(group, all_layers, NixlConfig::default(), deadline)
    }

    /// Builds the communicator over `group` with `config`; see the
    /// [type documentation](Self) for what happens. Every member calls it.
    ///
    /// The weights' memory is registered with NIXL and peers READ it during transfers: it
    /// must stay where it is for the life of the communicator (each transfer checks that it
    /// gets the registered weights, [`EplbCommError::WeightsChanged`] otherwise).
    pub fn with_config(
        group: HostGroup,
        all_layers: &[LayerWeights<'_>],
        config: NixlConfig,
        deadline: Deadline,
    ) -> Result<Self, EplbCommError> {
        let me = group.rank();
        let size = group.size();
        let layers: Vec<LayerPlace> = all_layers.iter().map(LayerPlace::of).collect();
        let local = local_setup(&group, &layers, &config);
        let published = match &local {
            Ok(s) => Published::Ready(RankDescription {
                agent: s.agent.name().to_string(),
                metadata: s.metadata.clone(),
                layers: layers.clone(),
            }),
            Err(e) => Published::Failed(e.to_string()),
        };

        // Publish (even a failure, so peers stop at once), then read every peer.
        let store = group.store();
        let round = store.next_round(&format!("{STORE_PREFIX}/{}", group.name()));
        let key = |rank: usize| format!("{STORE_PREFIX}/{}/{round}/{rank}", group.name());
        store
            .set(&key(me), &published.encode(), deadline)
            .map_err(|e| {
                EplbCommError::from_comm(
                    me,
                    None,
                    "publishing this rank's NIXL description".into(),
                    e,
                )
            })?;
        let local = local?;
        let mut peers = Vec::with_capacity(size);
        for peer in 0..size {
            if peer == me {
                peers.push(None);
                continue;
            }
            let bytes = store.get(&key(peer), deadline).map_err(|e| {
                EplbCommError::from_comm(
                    me,
                    None,
                    format!("fetching the NIXL description of peer rank {peer}"),
                    e,
                )
            })?;
            let description = match Published::decode(&bytes) {
                None => {
                    return Err(NixlError::BadPeerDescription {
                        rank: me,
                        peer,
                        bytes: bytes.len(),
                    }
                    .into())
                }
                Some(Published::Failed(reason)) => {
                    return Err(NixlError::PeerSetupFailed {
                        rank: me,
                        peer,
                        reason,
                    }
                    .into())
                }
                Some(Published::Ready(d)) => d,
            };
            check_same_tensors(me, &layers, peer, &description.layers)?;
            peers.push(Some(description));
        }

        let mut comm = Self {
            agent: local.agent,
            landing: local.landing,
            group: None,
            runtime: local.runtime,
            me,
            layers,
            peers: Vec::with_capacity(size),
            registered_bytes: local.registered_bytes,
            failed: None,
        };
        let connected = comm.connect(peers, &config, deadline);
        let outcome = connected.as_ref().err().map(ToString::to_string);
        let statuses = exchange_status(
            &group,
            None,
            "the setup check",
            outcome.as_deref(),
            deadline,
        )?;
        connected?;
        if let Some((peer, reason)) = statuses.into_iter().next() {
            return Err(NixlError::PeerSetupFailed {
                rank: me,
                peer,
                reason,
            }
            .into());
        }
        // Every rank has read every description: the key can go. Failing to delete it
        // wastes a few bytes in the store and nothing else.
        let _ = group.store().delete(&key(me), deadline);
        comm.group = Some(group);
        Ok(comm)
    }

    /// Loads every peer's metadata, connects, and warms the connections up.
    fn connect(
        &mut self,
        descriptions: Vec<Option<RankDescription>>,
        config: &NixlConfig,
        deadline: Deadline,
    ) -> Result<(), EplbCommError> {
        let me = self.me;
        let call = |e: CallError| NixlError::Call {
            rank: me,
            op: e.op,
            status: e.status,
        };
        for (peer, d) in descriptions.into_iter().enumerate() {
            let Some(d) = d else {
                self.peers.push(None);
                continue;
            };
            let loaded = self
                .agent
                .load_peer(&d.metadata, &format!("peer rank {peer}"))
                .map_err(call)?;
            if loaded != d.agent {
                return Err(NixlError::BadPeerDescription {
                    rank: me,
                    peer,
                    bytes: d.metadata.len(),
                }
                .into());
            }
            self.agent.connect(&loaded).map_err(call)?;
            self.peers.push(Some(Peer {
                agent: loaded,
                layers: d.layers,
            }));
        }
        if config.warm_up {
            self.warm_up(deadline)?;
        }
        Ok(())
    }

    /// READs a few bytes of the first non-empty row of every peer into the landing area.
    fn warm_up(&self, deadline: Deadline) -> Result<(), EplbCommError> {
        let me = self.me;
        let mut reads: Vec<(usize, Vec<usize>, Read)> = Vec::new();
        for (peer, p) in self.peers.iter().enumerate() {
            let Some(p) = p else { continue };
            let first = p.layers.iter().find_map(|l| {
                l.layout
                    .tensors
                    .iter()
                    .zip(&l.tensors)
                    .find(|(spec, _)| spec.row_bytes > 0 && l.layout.rows > 0)
                    .map(|(spec, place)| (place.base, spec.row_bytes, l.device))
            });
            let Some((remote, row_bytes, device)) = first else {
                continue;
            };
            let len = row_bytes.min(WARM_UP_BYTES).min(self.landing.len());
            if len == 0 {
                continue;
            }
            let desc = ReadDesc {
                local: self.landing.addr(),
                remote,
                len,
            };
            let warm_up = |detail: String| -> EplbCommError {
                NixlError::Call {
                    rank: me,
                    op: format!("warm-up READ from peer rank {peer}"),
                    status: detail,
                }
                .into()
            };
            let read = self
                .agent
                .post_read(&p.agent, &[desc], self.landing.device(), device)
                .map_err(|e| warm_up(format!("{}: {}", e.op, e.status)))?;
            reads.push((peer, Vec::new(), read));
        }
        self.wait_reads(&mut reads, deadline).map_err(|e| {
            let (peer, detail) = match e {
                WaitError::Failed { peer, detail, .. } => (peer, detail),
                WaitError::Timeout { peer, waited, .. } => {
                    (peer, format!("not complete after {waited:.1?} (deadline)"))
                }
            };
            NixlError::Call {
                rank: me,
                op: format!("warm-up READ from peer rank {peer}"),
                status: detail,
            }
            .into()
        })
    }

    /// This rank in the EPLB group.
    pub fn rank(&self) -> usize {
        self.me
    }

    /// Ranks in the EPLB group.
    pub fn num_ranks(&self) -> usize {
        self.peers.len()
    }

    /// The layouts every rank agreed on, by layer.
    pub fn layouts(&self) -> Vec<LayerLayout> {
        self.layers.iter().map(|l| l.layout.clone()).collect()
    }

    /// The EPLB group, unless the communicator gave it up after a failure.
    pub fn group(&self) -> Option<&HostGroup> {
        self.group.as_ref()
    }

    /// This rank's NIXL agent name (`eplb-<global rank>-<random>`).
    pub fn agent_name(&self) -> &str {
        self.agent.name()
    }

    /// Where the NIXL runtime was loaded from.
    pub fn runtime(&self) -> &NixlRuntime {
        &self.runtime
    }

    /// Bytes of the landing area registered for READs (the bound over all layers; see the
    /// type's "Memory" section).
    pub fn landing_bytes(&self) -> usize {
        self.landing.len()
    }

    /// Bytes of weights registered for peers to READ (every tensor's span of rows).
    pub fn registered_weight_bytes(&self) -> u64 {
        self.registered_bytes
    }

    /// Everything a layer's transfer needs that can be checked and built locally.
    fn prepare<'p>(
        &self,
        layer: usize,
        plan: &'p LayerPlan,
        weights: &LayerWeights<'_>,
    ) -> Result<Prepared<'p>, EplbCommError> {
        let me = self.me;
        let place = self
            .layers
            .get(layer)
            .ok_or(EplbCommError::LayerOutOfRange {
                rank: me,
                layer,
                layers: self.layers.len(),
            })?;
        if let Some(detail) = place.difference_from(weights) {
            return Err(EplbCommError::WeightsChanged {
                rank: me,
                layer,
                detail,
            });
        }
        let layout = &place.layout;
        let mismatch = |detail: String| EplbCommError::PlanMismatch {
            rank: me,
            layer,
            detail,
        };
        if plan.num_ranks() != self.peers.len() {
            return Err(mismatch(format!(
                "the plan is for {} ranks, the EPLB group has {}",
                plan.num_ranks(),
                self.peers.len()
            )));
        }
        if plan.rows_per_rank() != layout.rows {
            return Err(mismatch(format!(
                "the plan has {} rows per rank, the weights have {}",
                plan.rows_per_rank(),
                layout.rows
            )));
        }
        let mine = plan
            .rank(me)
            .map_err(|e| mismatch(format!("no part for this rank: {e}")))?;
        let rows = layout.rows;
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
        for s in &mine.sends {
            row_ok(s.expert, s.src_row)?;
        }

        // Staging: received rows first (packed exactly as in the landing area), then local
        // copies.
        let expert_bytes = layout.expert_bytes();
        let mut offsets = Vec::with_capacity(layout.tensors.len());
        let mut at = 0usize;
        for t in &layout.tensors {
            offsets.push(at);
            at = at.saturating_add(t.row_bytes);
        }
        let mut builder = StagingBuilder::new(layout);
        let mut by_peer: Vec<Option<PeerRead>> = (0..self.peers.len()).map(|_| None).collect();
        for r in &mine.recvs {
            row_ok(r.expert, r.dst_row)?;
            let peer = self
                .peers
                .get(r.src)
                .and_then(Option::as_ref)
                .ok_or_else(|| {
                    mismatch(format!(
                        "expert {} comes from rank {}, which is this rank or outside the group of {}",
                        r.expert,
                        r.src,
                        self.peers.len()
                    ))
                })?;
            // The row the sender reads from: its plan's send of this expert to this rank.
            let src_row = plan
                .rank(r.src)
                .ok()
                .and_then(|p| p.sends.iter().find(|s| s.dst == me && s.expert == r.expert))
                .map(|s| s.src_row)
                .ok_or_else(|| {
                    mismatch(format!(
                        "expert {} comes from rank {}, whose part of the plan has no such send",
                        r.expert, r.src
                    ))
                })?;
            row_ok(r.expert, src_row)?;
            let theirs = peer
                .layers
                .get(layer)
                .ok_or_else(|| mismatch(format!("rank {} registered no layer {layer}", r.src)))?;
            let index = builder.push_row(
                r.dst_row,
                r.expert,
                RowSource::Peer {
                    peer: r.src,
                    round: r.round,
                },
            );
            let base = index.saturating_mul(expert_bytes);
            let entry = by_peer
                .get_mut(r.src)
                .ok_or_else(|| mismatch(format!("rank {} is outside the group", r.src)))?
                .get_or_insert_with(|| PeerRead {
                    peer: r.src,
                    device: theirs.device,
                    experts: Vec::new(),
                    descs: Vec::new(),
                });
            entry.experts.push(r.expert);
            for ((spec, off), place) in layout.tensors.iter().zip(&offsets).zip(&theirs.tensors) {
                if spec.row_bytes == 0 {
                    continue;
                }
                entry.descs.push(ReadDesc {
                    local: self
                        .landing
                        .addr()
                        .saturating_add(base.saturating_add(*off) as u64),
                    remote: place.row_addr(src_row),
                    len: spec.row_bytes,
                });
            }
        }
        let received = mine.recvs.len().saturating_mul(expert_bytes);
        if received > self.landing.len() {
            return Err(mismatch(format!(
                "{} received rows need {received} bytes, the landing area has {}",
                mine.recvs.len(),
                self.landing.len()
            )));
        }
        for c in &mine.local_copies {
            builder.push_row(c.dst_row, c.expert, RowSource::Local { src_row: c.src_row });
        }
        let staging = builder.build(me, layer)?;
        Ok(Prepared {
            mine,
            layout: layout.clone(),
            staging,
            reads: by_peer.into_iter().flatten().collect(),
            received,
        })
    }

    /// Posts this rank's READs, stages the local copies meanwhile, waits for the READs and
    /// moves the received rows into staging.
    fn move_rows(
        &self,
        layer: usize,
        prepared: &mut Prepared<'_>,
        weights: &LayerWeights<'_>,
        deadline: Deadline,
    ) -> Result<(), EplbCommError> {
        let me = self.me;
        let mut pending = Vec::with_capacity(prepared.reads.len());
        let tp = Instant::now();
        for r in &prepared.reads {
            let peer = self.peer(r.peer).map_err(EplbCommError::from)?;
            if r.descs.is_empty() {
                continue;
            }
            let read = self
                .agent
                .post_read(&peer.agent, &r.descs, self.landing.device(), r.device)
                .map_err(|e| NixlError::ReadFailed {
                    rank: me,
                    layer,
                    peer: r.peer,
                    experts: r.experts.clone(),
                    detail: format!("{}: {}", e.op, e.status),
                })?;
            pending.push((r.peer, r.experts.clone(), read));
        }

        if std::env::var_os("TMP_TIMING").is_some() { eprintln!("TIMING post {:?} done={:?}", tp.elapsed(), pending.iter().map(|p: &(usize, Vec<usize>, Read)| p.2.is_done()).collect::<Vec<_>>()); }
        // Local copies read the old rows, which stay valid until the commit.
        let tensors = prepared.layout.tensors.len();
        let first_local = prepared.mine.recvs.len();
        for (k, c) in prepared.mine.local_copies.iter().enumerate() {
            let index = first_local.saturating_add(k);
            for t in 0..tensors {
                let src = weights.row(t, c.src_row)?;
                let dst = prepared.staging.row_tensor_mut(index, t).ok_or_else(|| {
                    EplbCommError::PlanMismatch {
                        rank: me,
                        layer,
                        detail: format!(
                            "inconsistent staging: staged row {index} has no room for tensor {t}"
                        ),
                    }
                })?;
                dst.copy_from_slice(src);
            }
        }

        self.wait_reads(&mut pending, deadline)
            .map_err(|e| match e {
                WaitError::Failed {
                    peer,
                    experts,
                    detail,
                } => NixlError::ReadFailed {
                    rank: me,
                    layer,
                    peer,
                    experts,
                    detail,
                },
                WaitError::Timeout {
                    peer,
                    experts,
                    waited,
                } => NixlError::ReadTimeout {
                    rank: me,
                    layer,
                    peer,
                    experts,
                    waited,
                },
            })?;
        if prepared.received > 0 {
            let landed = self.landing.bytes(0..prepared.received);
            let dst = prepared.staging.region_mut(0..prepared.received);
            match (landed, dst) {
                (Some(src), Some(dst)) => dst.copy_from_slice(src),
                _ => {
                    return Err(EplbCommError::PlanMismatch {
                        rank: me,
                        layer,
                        detail: format!(
                            "inconsistent staging: {} received bytes do not fit the landing area ({}) or staging ({})",
                            prepared.received,
                            self.landing.len(),
                            prepared.staging.len()
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    /// Polls `pending` READs (peer, experts, request) until all completed. On an error or
    /// at the deadline it returns, naming the peer; the caller then drops the requests,
    /// which releases (aborts) any still in flight.
    fn wait_reads(
        &self,
        pending: &mut Vec<(usize, Vec<usize>, Read)>,
        deadline: Deadline,
    ) -> Result<(), WaitError> {
        let started = Instant::now();
        let mut polls = 0u32;
        loop {
            let mut outstanding = false;
            for (peer, experts, read) in pending.iter_mut() {
                match self.agent.poll(read) {
                    Ok(true) => {}
                    Ok(false) => outstanding = true,
                    Err(e) => {
                        return Err(WaitError::Failed {
                            peer: *peer,
                            experts: experts.clone(),
                            detail: format!("{}: {}", e.op, e.status),
                        })
                    }
                }
            }
            if !outstanding {
                pending.clear();
                return Ok(());
            }
            if deadline.is_expired() {
                let (peer, experts) = pending
                    .iter()
                    .find(|(_, _, r)| !r.is_done())
                    .map(|(p, e, _)| (*p, e.clone()))
                    .unwrap_or_default();
                return Err(WaitError::Timeout {
                    peer,
                    experts,
                    waited: started.elapsed(),
                });
            }
            polls = polls.saturating_add(1);
            if polls < SPIN_POLLS {
                std::thread::yield_now();
            } else {
                std::thread::sleep(POLL_SLEEP);
            }
        }
    }

    fn peer(&self, peer: usize) -> Result<&Peer, NixlError> {
        self.peers
            .get(peer)
            .and_then(Option::as_ref)
            .ok_or_else(|| NixlError::Call {
                rank: self.me,
                op: format!("looking up peer rank {peer}"),
                status: "no such peer".into(),
            })
    }

    /// Marks the communicator unusable after `error` (when the error says so) and returns
    /// the error.
    fn fail(&mut self, error: EplbCommError) -> EplbCommError {
        if error.poisons_communicator() && self.failed.is_none() {
            self.failed = Some(error.to_string());
        }
        error
    }

    /// Marks the communicator unusable after a failure while READs may have been in flight
    /// (whatever the error is: a released request may not have stopped writing into the
    /// landing area), and returns the error.
    fn fail_after_reads(&mut self, error: EplbCommError) -> EplbCommError {
        if self.failed.is_none() {
            self.failed = Some(error.to_string());
        }
        error
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
        let group = match (&self.group, &self.failed) {
            (Some(g), None) => g,
            (_, reason) => {
                return Err(EplbCommError::CommunicatorFailed {
                    rank: me,
                    reason: reason
                        .clone()
                        .unwrap_or_else(|| "the EPLB group is gone".into()),
                })
            }
        };

        // 1. Local checks, then agreement (a refusal is sent to the peers, not kept).
        let digest = plan_digest(layer, plan);
        let prepared = self.prepare(layer, plan, weights);
        let refusal = prepared.as_ref().err().map(ToString::to_string);
        if let Err(e) = agree_on_plan(group, layer, digest, refusal.as_deref(), deadline) {
            return Err(self.fail(e));
        }
        let mut prepared = prepared?;
        let t_agree = started.elapsed();

        // 2–4. READs and local copies, keeping a reserve for the post-read check.
        let crosses_ranks = plan.num_transfers() > 0;
        let reserve = (deadline.remaining() / RESERVE_FRACTION).min(MAX_RESERVE);
        let read_deadline = Deadline::at(
            deadline
                .instant()
                .checked_sub(reserve)
                .unwrap_or(deadline.instant()),
        );
        let moved = self.move_rows(layer, &mut prepared, weights, read_deadline);
        let t_moved = started.elapsed();

        // 5. Post-read check: nobody commits while a peer may still read, and nobody
        //    commits unless everybody got its rows.
        if crosses_ranks {
            let Some(group) = self.group.as_ref() else {
                return Err(self.fail(EplbCommError::CommunicatorFailed {
                    rank: me,
                    reason: "the EPLB group is gone".into(),
                }));
            };
            let outcome = moved.as_ref().err().map(ToString::to_string);
            let checked = exchange_status(
                group,
                Some(layer),
                "the post-read check",
                outcome.as_deref(),
                deadline,
            );
            match (moved, checked) {
                (Err(e), _) => return Err(self.fail_after_reads(e)),
                (Ok(()), Err(e)) => return Err(self.fail(e)),
                (Ok(()), Ok(failed_peers)) => {
                    if let Some((peer, reason)) = failed_peers.into_iter().next() {
                        return Err(self.fail(
                            NixlError::PeerReadFailed {
                                rank: me,
                                layer,
                                peer,
                                reason,
                            }
                            .into(),
                        ));
                    }
                }
            }
        } else if let Err(e) = moved {
            return Err(self.fail_after_reads(e));
        }

        if std::env::var_os("TMP_TIMING").is_some() { eprintln!("TIMING rank {me}: agree {t_agree:?} moved {t_moved:?} total {:?}", started.elapsed()); }
        let mine = prepared.mine;
        let expert_bytes = prepared.layout.expert_bytes() as u64;
        let mut peers: Vec<usize> = mine
            .sends
            .iter()
            .map(|s| s.dst)
            .chain(mine.recvs.iter().map(|r| r.src))
            .collect();
        peers.sort_unstable();
        peers.dedup();
        let mut rounds: Vec<usize> = mine
            .sends
            .iter()
            .map(|s| s.round)
            .chain(mine.recvs.iter().map(|r| r.round))
            .collect();
        rounds.sort_unstable();
        rounds.dedup();
        let stats = TransferStats {
            bytes_sent: expert_bytes.saturating_mul(mine.sends.len() as u64),
            bytes_received: expert_bytes.saturating_mul(mine.recvs.len() as u64),
            bytes_copied_locally: expert_bytes.saturating_mul(mine.local_copies.len() as u64),
            peers: peers.len(),
            rounds: rounds.len(),
            staging_bytes: prepared.staging.len() as u64,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok(StagedLayer::new(
            layer,
            me,
            Backend::Nixl,
            mine.clone(),
            prepared.layout,
            prepared.staging,
            stats,
        ))
    }
}

impl EplbCommunicator for NixlCommunicator {
    fn backend(&self) -> Backend {
        Backend::Nixl
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

/// Why waiting for READs stopped.
enum WaitError {
    /// A request failed.
    Failed {
        peer: usize,
        experts: Vec<usize>,
        detail: String,
    },
    /// Requests were still in flight at the deadline.
    Timeout {
        peer: usize,
        experts: Vec<usize>,
        waited: Duration,
    },
}

/// A layer's transfer, prepared.
struct Prepared<'p> {
    mine: &'p RankPlan,
    layout: LayerLayout,
    staging: Staging,
    /// One READ request per peer this rank receives from.
    reads: Vec<PeerRead>,
    /// Bytes of received rows, packed at the start of both the landing area and staging.
    received: usize,
}

/// The rows this rank READs from one peer.
struct PeerRead {
    peer: usize,
    device: Device,
    experts: Vec<usize>,
    descs: Vec<ReadDesc>,
}

/// Loads NIXL, checks the environment, creates the agent and registers every layer and the
/// landing area.
fn local_setup(
    group: &HostGroup,
    layers: &[LayerPlace],
    config: &NixlConfig,
) -> Result<LocalSetup, EplbCommError> {
    let me = group.rank();
    let runtime = probe()?;
    let tls = std::env::var("UCX_TLS").ok();
    check_ucx_tls(tls.as_deref(), config.error_handling_mode())
        .map_err(|detail| NixlError::Config { rank: me, detail })?;
    for (layer, l) in layers.iter().enumerate() {
        if l.device != Device::Host {
            let tensor = l
                .layout
                .tensors
                .first()
                .map(|t| t.name.clone())
                .unwrap_or_default();
            return Err(NixlError::Unsupported {
                rank: me,
                layer,
                tensor,
                detail: format!(
                    "the weights are on {}; this build of the nixl backend stages and commits \
                     host memory only (device staging is not implemented yet)",
                    l.device
                ),
            }
            .into());
        }
    }
    let layouts: Vec<LayerLayout> = layers.iter().map(|l| l.layout.clone()).collect();
    let (landing_len, landing_layer) =
        LandingArea::bound(&layouts).ok_or_else(|| EplbCommError::PlanMismatch {
            rank: me,
            layer: 0,
            detail: "the landing area size overflows".into(),
        })?;
    let landing = LandingArea::new(me, landing_layer, landing_len)?;

    let global = group.global_rank(me).unwrap_or(me);
    let name = format!("eplb-{global}-{:08x}", random_u32());
    let call = |e: CallError| -> EplbCommError {
        NixlError::Call {
            rank: me,
            op: e.op,
            status: e.status,
        }
        .into()
    };
    let mut agent = NixlAgent::new(&runtime, &name, &config.backend_params).map_err(call)?;
    let mut registered = 0u64;
    for (layer, l) in layers.iter().enumerate() {
        for (spec, place) in l.layout.tensors.iter().zip(&l.tensors) {
            let span = place.span(l.layout.rows, spec.row_bytes);
            let len = usize::try_from(span).map_err(|_| EplbCommError::PlanMismatch {
                rank: me,
                layer,
                detail: format!("tensor {:?} spans {span} bytes", spec.name),
            })?;
            agent
                .register(
                    place.base,
                    len,
                    l.device,
                    &format!("layer {layer} tensor {:?}", spec.name),
                )
                .map_err(call)?;
            registered = registered.saturating_add(span);
        }
    }
    agent
        .register(
            landing.addr(),
            landing.len(),
            landing.device(),
            "the landing area",
        )
        .map_err(call)?;
    let metadata = agent.metadata().map_err(call)?;
    Ok(LocalSetup {
        runtime,
        agent,
        landing,
        metadata,
        registered_bytes: registered,
    })
}

/// One `all_gather` of every rank's outcome of a step (`None` = fine, or the reason it
/// failed). Returns the peers that failed, with their reasons, in rank order.
fn exchange_status(
    group: &HostGroup,
    layer: Option<usize>,
    what: &str,
    failure: Option<&str>,
    deadline: Deadline,
) -> Result<Vec<(usize, String)>, EplbCommError> {
    let me = group.rank();
    let mut w = Writer::with_capacity(32);
    match failure {
        None => w.u8(0).bytes(&[]),
        Some(reason) => w.u8(1).bytes(reason.as_bytes()),
    };
    let gathered = group
        .all_gather(w.as_slice(), deadline)
        .map_err(|e| EplbCommError::from_comm(me, layer, format!("{what} (all_gather)"), e))?;
    let mut failed = Vec::new();
    for (peer, bytes) in gathered.iter().enumerate() {
        if peer == me {
            continue;
        }
        let mut r = Reader::new(bytes);
        match (r.u8(), r.bytes()) {
            (Some(0), Some(_)) if r.is_empty() => {}
            (Some(1), Some(reason)) if r.is_empty() => {
                failed.push((peer, String::from_utf8_lossy(reason).into_owned()));
            }
            _ => failed.push((
                peer,
                format!(
                    "its {what} message ({} bytes) cannot be decoded",
                    bytes.len()
                ),
            )),
        }
    }
    Ok(failed)
}

/// A random 32-bit number (for agent names that differ between runs).
fn random_u32() -> u32 {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    (h.finish() >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_communicator_can_move_to_a_worker_thread() {
        fn is_send<T: Send>() {}
        is_send::<NixlCommunicator>();
    }

    #[test]
    fn agent_name_suffixes_differ() {
        let names: std::collections::HashSet<u32> = (0..16).map(|_| random_u32()).collect();
        assert!(names.len() > 1, "{names:?}");
    }
}
