//! [`AgRsManager`]: dispatch by gathering every token to every rank, combine by a
//! reduce-scatter (vLLM's default `allgather_reducescatter` backend, over the host
//! transport).

use std::borrow::Borrow;

use moeshift_sync::Deadline;

use super::dispatched::{ExpertWork, HostDispatched, Origin, Route};
use super::error::All2AllError;
use super::exchange::Ctx;
use super::placement::ExpertPlacement;
use super::tokens::HostTokens;
use super::wire::{CombineHeader, DispatchHeader, Reader, Writer, STATUS_OK, STATUS_REJECTED};
use super::{route_tokens, MoeAll2All};
use crate::host::HostGroup;

const NAME: &str = "allgather_reducescatter";

/// Gather / reduce-scatter over a [`HostGroup`] (the EP group).
///
/// - **dispatch**: the ranks first all-gather a fixed-size header (token count, hidden
///   size, top-k, layer, placement fingerprint, status), so token counts may differ per
///   rank (zero included) and a rank with bad input or another placement fails the call on
///   every rank; then they all-gather every rank's rows, routed physical slots and
///   weights. Every rank receives **all** tokens of the group and gets a work item for
///   every pick routed to one of its slots.
/// - **combine**: each rank sums its items' weighted outputs per token and reduce-scatters
///   the sums back: rank `j` receives, from every rank, partial sums for exactly its own
///   tokens and adds them in rank order.
///
/// The replica of each pick is chosen once, by the rank that owns the token, with
/// [`replica_index`](super::replica_index); that is also where the load hook counts, so
/// loads are counted once per pick. (vLLM's AgRs path counts on every rank from the
/// gathered tokens, which inflates its loads by the DP size.)
///
/// Moves `size × tokens` rows each way; [`AllToAllVManager`](super::AllToAllVManager)
/// moves each row only to the ranks that need it.
#[derive(Debug)]
pub struct AgRsManager<G = HostGroup> {
    group: G,
}

impl<G: Borrow<HostGroup>> AgRsManager<G> {
    /// A manager over `group`, which must be the EP group (`&HostGroup`, `Arc<HostGroup>` or
    /// an owned `HostGroup`).
    pub fn new(group: G) -> Self {
        Self { group }
    }

    /// The group dispatch and combine run on.
    pub fn group(&self) -> &HostGroup {
        self.group.borrow()
    }

    /// Gives the group back.
    pub fn into_group(self) -> G {
        self.group
    }
}

impl<G: Borrow<HostGroup>> MoeAll2All for AgRsManager<G> {
    type Tokens<'a> = HostTokens<'a>;
    type LoadCounts<'a> = &'a mut [i64];
    type ExpertOutputs<'a> = &'a [f32];
    type Dispatched = HostDispatched;
    type Combined = Vec<f32>;
    type Error = All2AllError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn ep_rank(&self) -> usize {
        self.group().rank()
    }

    fn ep_size(&self) -> usize {
        self.group().size()
    }

    fn dispatch(
        &self,
        tokens: HostTokens<'_>,
        placement: &ExpertPlacement,
        load: Option<&mut [i64]>,
        deadline: Deadline,
    ) -> Result<HostDispatched, All2AllError> {
        let group = self.group();
        let ctx = Ctx::new(group, NAME, placement.layer());
        let (me, size) = (group.rank(), group.size());
        let (n, hidden, top_k) = (tokens.num_tokens(), tokens.hidden_size(), tokens.top_k());
        let local = tokens
            .check(&ctx, placement, load.as_ref().map(|l| l.len()))
            .and_then(|()| route_tokens(&ctx, &tokens, placement));
        let ours = match &local {
            Ok(_) => DispatchHeader {
                status: STATUS_OK,
                rows: n as u64,
                picks: (n * top_k) as u64,
                hidden_size: hidden as u32,
                top_k: top_k as u32,
                layer: placement.layer() as u64,
                fingerprint: placement.fingerprint(),
            },
            Err(_) => DispatchHeader::rejected(),
        };

        // 1. Counts and parameters.
        let mut w = Writer::with_capacity(DispatchHeader::LEN);
        ours.write(&mut w);
        let mut headers = vec![0u8; DispatchHeader::LEN * size];
        group
            .all_gather_into(&w.finish(), &mut headers, deadline)
            .map_err(ctx.comm("dispatch"))?;
        let slots = local?;
        let mut counts = Vec::with_capacity(size);
        for (r, chunk) in headers.chunks_exact(DispatchHeader::LEN).enumerate() {
            let h = DispatchHeader::read(&mut Reader::new(chunk))
                .map_err(|d| ctx.malformed("dispatch", r, d))?;
            ctx.check_dispatch(r, &h, &ours)?;
            let count = usize::try_from(h.rows)
                .ok()
                .filter(|c| c.checked_mul(top_k) == usize::try_from(h.picks).ok())
                .ok_or_else(|| {
                    ctx.malformed(
                        "dispatch",
                        r,
                        format!("{} rows with {} picks at top-k {top_k}", h.rows, h.picks),
                    )
                })?;
            counts.push(count);
        }

        // 2. Rows, routed slots and weights of every rank.
        let mut w = Writer::with_capacity(4 * n * (hidden + 2 * top_k));
        w.f32s(tokens.hidden());
        w.u32s(&slots);
        w.f32s(tokens.topk_weights());
        let gathered = group
            .all_gather(&w.finish(), deadline)
            .map_err(ctx.comm("dispatch"))?;

        // 3. This rank's work: every pick routed to one of its slots.
        let spr = placement.slots_per_rank();
        let first_slot = me * spr;
        let total: usize = gathered.iter().map(|b| b.len() / 4).sum();
        let mut rows = Vec::with_capacity(total);
        let mut items = Vec::new();
        let mut base = 0usize;
        let (mut peer_slots, mut peer_weights) = (Vec::new(), Vec::new());
        for (src, (bytes, &count)) in gathered.iter().zip(&counts).enumerate() {
            let bad = |d: String| ctx.malformed("dispatch", src, d);
            let mut r = Reader::new(bytes);
            let values = count
                .checked_mul(hidden)
                .ok_or_else(|| bad(format!("{count} rows of {hidden} values overflow")))?;
            r.f32s_into(values, &mut rows, "token rows").map_err(bad)?;
            peer_slots.clear();
            peer_weights.clear();
            // `count * top_k` was checked against the header's pick count above.
            r.u32s_into(count * top_k, &mut peer_slots, "routed slots")
                .map_err(bad)?;
            r.f32s_into(count * top_k, &mut peer_weights, "router weights")
                .map_err(bad)?;
            r.finish().map_err(bad)?;
            for (i, (&slot, &weight)) in peer_slots.iter().zip(&peer_weights).enumerate() {
                let slot = slot as usize;
                let logical = placement.logical_of(slot).ok_or_else(|| {
                    bad(format!(
                        "token {} pick {} is routed to slot {slot}, which holds no expert",
                        i / top_k,
                        i % top_k
                    ))
                })?;
                if slot / spr == me {
                    items.push(ExpertWork {
                        row: base + i / top_k,
                        slot,
                        local_slot: slot - first_slot,
                        logical,
                        weight,
                    });
                }
            }
            base += count;
        }

        if let Some(load) = load {
            for &s in &slots {
                if let Some(c) = load.get_mut(s as usize) {
                    *c = c.saturating_add(1);
                }
            }
        }
        let origin = Origin {
            manager: NAME,
            group_id: group.id(),
            rank: me,
        };
        Ok(HostDispatched::new(
            origin,
            placement.layer(),
            hidden,
            rows,
            items,
            spr,
            Route::AgRs { counts },
        ))
    }

    fn combine(
        &self,
        dispatched: &HostDispatched,
        outputs: &[f32],
        deadline: Deadline,
    ) -> Result<Vec<f32>, All2AllError> {
        let group = self.group();
        let ctx = Ctx::new(group, NAME, dispatched.layer());
        let (me, size, h) = (group.rank(), group.size(), dispatched.hidden_size());
        let local = dispatched
            .check_combine(&ctx, outputs.len())
            .and_then(|()| match &dispatched.route {
                Route::AgRs { counts } if counts.len() == size => Ok(counts),
                _ => Err(All2AllError::ForeignDispatch {
                    rank: ctx.me(),
                    manager: NAME,
                    detail: "the dispatch has no gather route for this group".into(),
                }),
            });
        let layer = dispatched.layer() as u64;
        let messages: Vec<Vec<u8>> = match &local {
            Ok(counts) => {
                let partial = dispatched.weighted_partials(outputs);
                let mut start = 0usize;
                counts
                    .iter()
                    .map(|&c| {
                        let rows = partial.get(start * h..(start + c) * h).unwrap_or_default();
                        start += c;
                        let mut w = Writer::with_capacity(CombineHeader::LEN + 4 * rows.len());
                        CombineHeader {
                            status: STATUS_OK,
                            rows: c as u64,
                            hidden_size: h as u32,
                            layer,
                        }
                        .write(&mut w);
                        w.f32s(rows);
                        w.finish()
                    })
                    .collect()
            }
            Err(_) => (0..size).map(|_| rejected_combine(layer)).collect(),
        };
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        let got = group
            .all_to_all_v(&refs, deadline)
            .map_err(ctx.comm("combine"))?;
        let counts = local?;
        let mine = counts.get(me).copied().unwrap_or(0);
        let mut out = vec![0.0f32; mine * h];
        for (src, bytes) in got.iter().enumerate() {
            let bad = |d: String| ctx.malformed("combine", src, d);
            let mut r = Reader::new(bytes);
            let header = CombineHeader::read(&mut r).map_err(bad)?;
            ctx.check_combine(src, &header, h, mine)?;
            r.f32s_add(&mut out, "partial sums").map_err(bad)?;
            r.finish().map_err(bad)?;
        }
        Ok(out)
    }
}

/// The combine message of a rank that rejected its own input.
pub(crate) fn rejected_combine(layer: u64) -> Vec<u8> {
    let mut w = Writer::with_capacity(CombineHeader::LEN);
    CombineHeader {
        status: STATUS_REJECTED,
        rows: 0,
        hidden_size: 0,
        layer,
    }
    .write(&mut w);
    w.finish()
}
