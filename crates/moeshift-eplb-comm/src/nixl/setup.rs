//! Building a [`NixlCommunicator`]: load NIXL, create the agent, register the weights and
//! the landing area, exchange descriptions through the rendezvous store, check that every
//! rank holds the same tensors, connect, warm up. See the type's documentation.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use moeshift_device_comm::{HostGroup, StoreClient};
use moeshift_sync::Deadline;
use moeshift_tensor::Device;

use super::agent::{CallError, NixlAgent, ReadDesc};
use super::catalog::{check_same_tensors, LayerPlace, Published, RankDescription};
use super::communicator::{NixlCommunicator, Peer};
use super::config::{check_ucx_tls, NixlConfig};
use super::error::NixlError;
use super::landing::LandingArea;
use super::probe::{probe, NixlRuntime};
use super::status::exchange_status;
use super::transfer::{PendingRead, WaitError};
use crate::error::EplbCommError;
use crate::host::eplb_group;
use crate::weights::{LayerLayout, LayerWeights};

/// Prefix of the rendezvous-store keys the backend publishes its descriptions under.
const STORE_PREFIX: &str = "eplb-nixl";
/// Bytes the warm-up READ moves from each peer (at most one row).
const WARM_UP_BYTES: usize = 64;

/// This rank's side of the setup, before anything is exchanged.
struct LocalSetup {
    runtime: NixlRuntime,
    agent: NixlAgent,
    landing: LandingArea,
    #[cfg(feature = "cuda")]
    cuda: Option<super::cuda::NixlCuda>,
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
            #[cfg(feature = "cuda")]
            cuda: local.cuda,
            group: None,
            runtime: local.runtime,
            me,
            layers,
            peers: Vec::with_capacity(size),
            registered_bytes: local.registered_bytes,
            read_streams: config.read_streams,
            last_phases: None,
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

    /// READs a few bytes of every registered tensor of every peer into the first landing
    /// slot (free while the communicator is built), one request per peer and UCX worker:
    /// connections, memory keys, CUDA IPC mappings and each worker's streams are set up
    /// here rather than by the first layer.
    fn warm_up(&self, deadline: Deadline) -> Result<(), EplbCommError> {
        let me = self.me;
        let Some(&slot) = self.landing.slot_addrs().first() else {
            return Ok(());
        };
        if self.landing.device() != Device::Host {
            self.bind_gpu(None)?;
        }
        let room = self.landing.len();
        let workers = self.read_streams.max(1);
        let mut reads: Vec<PendingRead> = Vec::new();
        let mut at = 0usize;
        for (peer, p) in self.peers.iter().enumerate() {
            let Some(p) = p else { continue };
            let mut sources = Vec::new();
            let mut device = Device::Host;
            for l in &p.layers {
                if l.layout.rows == 0 {
                    continue;
                }
                device = l.device;
                for (spec, place) in l.layout.tensors.iter().zip(&l.tensors) {
                    let len = spec.row_bytes.min(WARM_UP_BYTES).min(room);
                    if len > 0 {
                        sources.push((place.base, len));
                    }
                }
            }
            if sources.is_empty() {
                continue;
            }
            for worker in 0..workers {
                // Spread over the slot where it is large enough; overlapping bytes of the
                // slot are only ever garbage here.
                let descs: Vec<ReadDesc> = sources
                    .iter()
                    .map(|&(remote, len)| {
                        let local = at.min(room - len);
                        at = at.saturating_add(WARM_UP_BYTES);
                        ReadDesc {
                            local: slot.saturating_add(local as u64),
                            remote,
                            len,
                        }
                    })
                    .collect();
                let read = self
                    .agent
                    .post_read(&p.agent, &descs, self.landing.device(), device, worker)
                    .map_err(|e| NixlError::WarmUpFailed {
                        rank: me,
                        peer,
                        detail: format!("{}: {}", e.op, e.status),
                    })?;
                reads.push(PendingRead {
                    peer,
                    request: worker,
                    requests: workers,
                    experts: Vec::new(),
                    read,
                });
            }
        }
        self.wait_reads(&mut reads, deadline).map_err(|e| {
            let (peer, detail) = match e {
                WaitError::Failed { peer, detail, .. } => (peer, detail),
                WaitError::Timeout { peer, waited, .. } => {
                    (peer, format!("not complete after {waited:.1?} (deadline)"))
                }
            };
            NixlError::WarmUpFailed {
                rank: me,
                peer,
                detail,
            }
            .into()
        })
    }
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
    if config.landing_slots == 0 {
        return Err(NixlError::Config {
            rank: me,
            detail: "landing_slots is 0; a transfer needs at least one landing slot".into(),
        }
        .into());
    }
    let params = config
        .agent_params()
        .map_err(|detail| NixlError::Config { rank: me, detail })?;
    let device = weights_device(me, layers)?;
    let layouts: Vec<LayerLayout> = layers.iter().map(|l| l.layout.clone()).collect();
    let (landing_len, landing_layer) =
        LandingArea::bound(&layouts).ok_or_else(|| EplbCommError::PlanMismatch {
            rank: me,
            layer: 0,
            detail: "the landing area size overflows".into(),
        })?;
    let slots = config.landing_slots;
    #[cfg(feature = "cuda")]
    let (landing, cuda) = match device {
        Device::Host => (
            LandingArea::new_host(me, landing_layer, landing_len, slots)?,
            None,
        ),
        Device::Cuda(ordinal) => {
            let cuda = super::cuda::NixlCuda::new(me, ordinal)?;
            for (layer, l) in layers.iter().enumerate() {
                for (spec, place) in l.layout.tensors.iter().zip(&l.tensors) {
                    if place.span(l.layout.rows, spec.row_bytes) > 0 {
                        cuda.check_readable(
                            me,
                            layer,
                            &spec.name,
                            place.base,
                            runtime.rdma_possible(),
                        )?;
                    }
                }
            }
            let landing = LandingArea::new_device(me, landing_layer, landing_len, slots, &cuda)?;
            (landing, Some(cuda))
        }
    };
    #[cfg(not(feature = "cuda"))]
    let landing = match device {
        Device::Host => LandingArea::new_host(me, landing_layer, landing_len, slots)?,
        Device::Cuda(_) => {
            let tensor = layers
                .first()
                .and_then(|l| l.layout.tensors.first())
                .map(|t| t.name.clone())
                .unwrap_or_default();
            return Err(NixlError::Unsupported {
                rank: me,
                layer: 0,
                tensor,
                detail: format!(
                    "the weights are on {device}; CUDA weights need moeshift-eplb-comm built \
                     with feature `cuda`"
                ),
            }
            .into());
        }
    };

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
    let mut agent = NixlAgent::new(&runtime, &name, &params).map_err(call)?;
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
    for (slot, &addr) in landing.slot_addrs().iter().enumerate() {
        agent
            .register(
                addr,
                landing.len(),
                landing.device(),
                &format!("landing slot {slot}"),
            )
            .map_err(call)?;
    }
    let metadata = agent.metadata().map_err(call)?;
    Ok(LocalSetup {
        runtime,
        agent,
        landing,
        #[cfg(feature = "cuda")]
        cuda,
        metadata,
        registered_bytes: registered,
    })
}

/// The one device every layer lives on (the host when there are no layers); a layer on
/// another device than layer 0 is an error naming it.
fn weights_device(me: usize, layers: &[LayerPlace]) -> Result<Device, EplbCommError> {
    let Some(first) = layers.first() else {
        return Ok(Device::Host);
    };
    for (layer, l) in layers.iter().enumerate() {
        if l.device != first.device {
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
                    "layer {layer} is on {}, layer 0 on {}; the nixl backend serves the layers \
                     of one device (the host or one GPU) per rank",
                    l.device, first.device
                ),
            }
            .into());
        }
    }
    Ok(first.device)
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
    fn agent_name_suffixes_differ() {
        let names: std::collections::HashSet<u32> = (0..16).map(|_| random_u32()).collect();
        assert!(names.len() > 1, "{names:?}");
    }
}
