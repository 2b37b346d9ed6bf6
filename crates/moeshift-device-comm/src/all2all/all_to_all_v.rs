//! [`AllToAllVManager`]: dispatch each token only to the ranks that host its chosen
//! experts, and send the expert outputs straight back (all-to-all-v both ways).

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

const NAME: &str = "all_to_all_v";

/// Bytes of one pick on the wire: row position (u32), physical slot (u32), weight (f32).
const PICK_BYTES: usize = 12;

/// All-to-all-v over a [`HostGroup`] (the EP group).
///
/// - **dispatch**: each rank routes its own picks (logical expert → replica with
///   [`replica_index`](super::replica_index) → physical slot → rank
///   `slot / slots_per_rank`) and sends every destination rank one message: a header
///   (status, row and pick counts, hidden size, top-k, layer, placement fingerprint), each
///   token row that has at least one pick there (once, however many of its picks go there),
///   and the picks. One all-to-all-v carries everything; a rank with bad input sends
///   headers that say so, and every rank fails the call with it.
/// - **combine**: each rank sums the weighted outputs of its items per received row and
///   sends each source rank its rows' sums, in the order they came; the source adds them
///   into its tokens' outputs, destination by destination in rank order.
///
/// The load hook counts where the routing is computed: each rank counts its own picks.
#[derive(Debug)]
pub struct AllToAllVManager<G = HostGroup> {
    group: G,
}

host_manager!(AllToAllVManager);

/// One destination's share of this rank's tokens.
#[derive(Default)]
struct Outgoing {
    /// Tokens (indices into this rank's batch) sent there, in order.
    tokens: Vec<u32>,
    /// Picks: (position in `tokens`, physical slot, weight).
    picks: Vec<(u32, u32, f32)>,
}

impl<G: Borrow<HostGroup>> AllToAllVManager<G> {
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
        let spr = placement.slots_per_rank();
        let local = tokens
            .check(&ctx, placement, load.as_ref().map(|l| l.len()))
            .and_then(|()| route_tokens(&ctx, &tokens, placement));
        // The parameters every message must agree on (row and pick counts may differ).
        let ours = DispatchHeader {
            status: STATUS_OK,
            rows: 0,
            picks: 0,
            hidden_size: hidden as u32,
            top_k: top_k as u32,
            layer: placement.layer() as u64,
            fingerprint: placement.fingerprint(),
        };

        let (messages, sent): (Vec<Vec<u8>>, Vec<Vec<u32>>) = match &local {
            Ok(slots) => {
                let out = split_by_destination(slots, tokens.topk_weights(), top_k, spr, size);
                let messages = out.iter().map(|o| o.encode(&ours, &tokens)).collect();
                (messages, out.into_iter().map(|o| o.tokens).collect())
            }
            Err(_) => {
                let mut w = Writer::with_capacity(DispatchHeader::LEN);
                DispatchHeader::rejected().write(&mut w);
                (vec![w.finish(); size], Vec::new())
            }
        };
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        let got = group
            .all_to_all_v(&refs, deadline)
            .map_err(ctx.comm("dispatch"))?;
        let slots = local?;

        let first_slot = me * spr;
        let mut rows = Vec::new();
        let mut items = Vec::new();
        let mut recv_rows = Vec::with_capacity(size);
        let mut base = 0usize;
        for (src, bytes) in got.iter().enumerate() {
            let bad = |d: String| ctx.malformed("dispatch", src, d);
            let mut r = Reader::new(bytes);
            let h = DispatchHeader::read(&mut r).map_err(bad)?;
            ctx.check_dispatch(src, &h, &ours)?;
            let count = usize::try_from(h.rows)
                .ok()
                .and_then(|c| c.checked_mul(hidden).map(|v| (c, v)));
            let (count, values) =
                count.ok_or_else(|| bad(format!("{} rows is too many", h.rows)))?;
            r.f32s_into(values, &mut rows, "token rows").map_err(bad)?;
            for j in 0..h.picks {
                let what = |f: &str| format!("pick {j} {f}");
                let pos = r.u32(&what("row")).map_err(bad)? as usize;
                let slot = r.u32(&what("slot")).map_err(bad)? as usize;
                let weight = r.f32(&what("weight")).map_err(bad)?;
                if pos >= count {
                    return Err(bad(format!(
                        "pick {j} names row {pos} of a message with {count} rows"
                    )));
                }
                let logical = placement
                    .logical_of(slot)
                    .filter(|_| slot / spr == me)
                    .ok_or_else(|| {
                        bad(format!(
                            "pick {j} is routed to slot {slot}, which is not an expert slot of \
                             this rank (slots {first_slot}..{})",
                            first_slot + spr
                        ))
                    })?;
                items.push(ExpertWork {
                    row: base + pos,
                    slot,
                    local_slot: slot - first_slot,
                    logical,
                    weight,
                });
            }
            r.finish().map_err(bad)?;
            recv_rows.push(count);
            base += count;
        }

        count_load(load, &slots);
        let route = Route::AllToAllV {
            recv_rows,
            sent,
            num_local_tokens: n,
        };
        Ok(ctx.dispatched(placement, hidden, rows, items, route))
    }

    fn run_combine(
        &self,
        dispatched: &HostDispatched,
        outputs: &[f32],
        deadline: Deadline,
    ) -> Result<Vec<f32>, All2AllError> {
        let group = self.group();
        let ctx = Ctx::new(group, NAME, dispatched.layer());
        let (size, h) = (group.size(), dispatched.hidden_size());
        let local = dispatched
            .check_combine(&ctx, outputs.len())
            .and_then(|()| match &dispatched.route {
                Route::AllToAllV {
                    recv_rows,
                    sent,
                    num_local_tokens,
                } if recv_rows.len() == size && sent.len() == size => {
                    let sent_rows: Vec<usize> = sent.iter().map(Vec::len).collect();
                    Ok((recv_rows, sent, *num_local_tokens, sent_rows))
                }
                _ => Err(ctx.foreign("the dispatch has no all-to-all-v route for this group")),
            });
        let got = ctx.exchange_partials(
            dispatched,
            outputs,
            local
                .as_ref()
                .ok()
                .map(|(recv_rows, _, _, sent_rows)| (recv_rows.as_slice(), sent_rows.as_slice())),
            deadline,
        )?;
        let (recv_rows, sent, n, _) = local?;
        let mut out = vec![0.0f32; n * h];
        for (dest, (bytes, tokens)) in got.iter().zip(sent).enumerate() {
            let counts = (tokens.len(), recv_rows[dest]);
            ctx.read_partials(dest, bytes, h, counts, |r| {
                for &t in tokens {
                    let t = t as usize;
                    let row = out.get_mut(t * h..(t + 1) * h).unwrap_or_default();
                    r.f32s_add(row, "partial sums")?;
                }
                Ok(())
            })?;
        }
        Ok(out)
    }
}

/// Splits this rank's routed picks (`slots`, `weights`: `tokens × top_k`) by destination
/// rank; a token goes to a destination once, however many of its picks land there.
fn split_by_destination(
    slots: &[u32],
    weights: &[f32],
    top_k: usize,
    slots_per_rank: usize,
    size: usize,
) -> Vec<Outgoing> {
    let mut out: Vec<Outgoing> = (0..size).map(|_| Outgoing::default()).collect();
    // Per destination: the last token added there and its position.
    let mut last: Vec<(usize, u32)> = vec![(usize::MAX, 0); size];
    for (i, (&slot, &weight)) in slots.iter().zip(weights).enumerate() {
        let t = i / top_k;
        let dest = slot as usize / slots_per_rank;
        let (Some(o), Some(l)) = (out.get_mut(dest), last.get_mut(dest)) else {
            continue;
        };
        if l.0 != t {
            *l = (t, o.tokens.len() as u32);
            o.tokens.push(t as u32);
        }
        o.picks.push((l.1, slot, weight));
    }
    out
}

impl Outgoing {
    /// The dispatch message: header, rows, picks.
    fn encode(&self, params: &DispatchHeader, tokens: &HostTokens<'_>) -> Vec<u8> {
        let hidden = tokens.hidden_size();
        let mut w = Writer::with_capacity(
            DispatchHeader::LEN + 4 * self.tokens.len() * hidden + PICK_BYTES * self.picks.len(),
        );
        DispatchHeader {
            rows: self.tokens.len() as u64,
            picks: self.picks.len() as u64,
            ..*params
        }
        .write(&mut w);
        for &t in &self.tokens {
            w.f32s(tokens.row(t as usize).unwrap_or_default());
        }
        for &(pos, slot, weight) in &self.picks {
            w.u32(pos);
            w.u32(slot);
            w.f32(weight);
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_goes_once_to_each_destination() {
        // 3 tokens, top-2, 2 slots per rank, 2 ranks.
        // token 0 → slots 0, 1 (both rank 0); token 1 → slots 3, 0; token 2 → 2, 3.
        let slots = [0, 1, 3, 0, 2, 3];
        let weights = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6];
        let out = split_by_destination(&slots, &weights, 2, 2, 2);
        assert_eq!(out[0].tokens, [0, 1]);
        assert_eq!(out[0].picks, [(0, 0, 0.1), (0, 1, 0.2), (1, 0, 0.4)]);
        assert_eq!(out[1].tokens, [1, 2]);
        assert_eq!(out[1].picks, [(0, 3, 0.3), (1, 2, 0.5), (1, 3, 0.6)]);
    }
}
