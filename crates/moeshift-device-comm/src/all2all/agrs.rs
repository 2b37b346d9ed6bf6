//! [`AgRsManager`]: dispatch by gathering every token to every rank, combine by a
//! reduce-scatter (vLLM's default `allgather_reducescatter` backend, over the host
//! transport).

use std::borrow::Borrow;

use moeshift_sync::Deadline;

use super::dispatched::{ExpertWork, HostDispatched, Route};
use super::error::All2AllError;
use super::exchange::{count_load, host_manager, Ctx};
use super::placement::ExpertPlacement;
use super::route_tokens;
use super::tokens::HostTokens;
use super::wire::{DispatchHeader, Reader, Writer, STATUS_OK};
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

host_manager!(AgRsManager);

impl<G: Borrow<HostGroup>> AgRsManager<G> {
    fn run_dispatch(
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

        count_load(load, &slots);
        Ok(ctx.dispatched(placement, hidden, rows, items, Route::AgRs { counts }))
    }

    fn run_combine(
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
                // Every rank got all `mine` tokens of this rank.
                Route::AgRs { counts } if counts.len() == size => {
                    Ok((counts, vec![counts[me]; size]))
                }
                _ => Err(ctx.foreign("the dispatch has no gather route for this group")),
            });
        // This rank holds every rank's tokens (`counts[r]` of rank `r`, in rank order) and
        // sends each rank the sums of its own tokens.
        let got = ctx.exchange_partials(
            dispatched,
            outputs,
            local
                .as_ref()
                .ok()
                .map(|(counts, sent)| (counts.as_slice(), sent.as_slice())),
            deadline,
        )?;
        let (counts, _) = local?;
        let mine = counts.get(me).copied().unwrap_or(0);
        let mut out = vec![0.0f32; mine * h];
        for (src, bytes) in got.iter().enumerate() {
            ctx.read_partials(src, bytes, h, (mine, counts[src]), |r| {
                r.f32s_add(&mut out, "partial sums")
            })?;
        }
        Ok(out)
    }
}
