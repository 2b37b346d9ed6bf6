//! Host-side routing tables of the CUDA managers: who sends which rows where, which work
//! items a rank received, and the segment lists the reduction kernels walk. Pure functions,
//! the same on every rank for the same inputs.

use super::cuda_wire::{push_pick, NO_PICK, PICK_BYTES};
use super::dispatched::ExpertWork;
use super::placement::ExpertPlacement;

/// One destination's share of this rank's tokens.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Outgoing {
    /// Tokens (indices into this rank's batch) sent there, ascending.
    pub tokens: Vec<u32>,
    /// `top_k` pick entries per sent token (see `cuda_wire`): the slot for picks served
    /// there, [`NO_PICK`] for the others.
    pub meta: Vec<u8>,
}

/// Splits this rank's routed picks (`slots`, `weights`: `tokens × top_k`) by destination
/// rank `slot / slots_per_rank`; a token goes to a destination once, however many of its
/// picks land there.
pub(crate) fn split_by_destination(
    slots: &[u32],
    weights: &[f32],
    top_k: usize,
    slots_per_rank: usize,
    size: usize,
) -> Vec<Outgoing> {
    let n = slots.len().checked_div(top_k).unwrap_or(0);
    let mut out: Vec<Outgoing> = (0..size)
        .map(|_| Outgoing {
            tokens: Vec::with_capacity(n),
            meta: Vec::with_capacity(n * top_k * PICK_BYTES),
        })
        .collect();
    if top_k == 0 || slots_per_rank == 0 {
        return out;
    }
    // The destinations of one token, each once (at most top-k of them).
    let mut dests: Vec<usize> = Vec::with_capacity(top_k);
    for (t, (row_slots, row_weights)) in slots
        .chunks_exact(top_k)
        .zip(weights.chunks_exact(top_k))
        .enumerate()
    {
        dests.clear();
        for &s in row_slots {
            let d = s as usize / slots_per_rank;
            if !dests.contains(&d) {
                dests.push(d);
            }
        }
        for &dest in &dests {
            let Some(o) = out.get_mut(dest) else {
                continue;
            };
            o.tokens.push(t as u32);
            for (&s, &w) in row_slots.iter().zip(row_weights) {
                let mine = s as usize / slots_per_rank == dest;
                push_pick(&mut o.meta, if mine { s } else { NO_PICK }, w);
            }
        }
    }
    out
}

/// Pick entries of every token (gather / reduce-scatter sends all of them everywhere).
pub(crate) fn all_picks(slots: &[u32], weights: &[f32]) -> Vec<u8> {
    let mut meta = Vec::with_capacity(slots.len() * PICK_BYTES);
    for (&s, &w) in slots.iter().zip(weights) {
        push_pick(&mut meta, s, w);
    }
    meta
}

/// What to do with a received pick routed to another rank's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Foreign {
    /// It is an error: the sender should only send this rank's picks.
    Reject,
    /// Skip it: every rank receives every pick.
    Skip,
}

/// The work items in the pick metadata received from every rank: `rows[s]` rows from group
/// rank `s`, their metadata consecutive in `meta` in rank order, `top_k` entries per row.
/// Items come in receive order (source rank, row, pick). On a malformed entry, returns the
/// source rank and what is wrong.
pub(crate) fn parse_received(
    meta: &[u8],
    rows: &[usize],
    top_k: usize,
    placement: &ExpertPlacement,
    me: usize,
    foreign: Foreign,
) -> Result<Vec<ExpertWork>, (usize, String)> {
    let spr = placement.slots_per_rank();
    let first_slot = me * spr;
    let mut items = Vec::with_capacity(meta.len() / PICK_BYTES);
    let mut entries = meta.chunks_exact(PICK_BYTES);
    let mut base = 0usize;
    for (src, &count) in rows.iter().enumerate() {
        for i in 0..count {
            for k in 0..top_k {
                let e = entries
                    .next()
                    .ok_or_else(|| (src, format!("row {i} pick {k}: metadata is truncated")))?;
                let (slot, weight) = decode_pick(e);
                if slot == NO_PICK {
                    continue;
                }
                let slot = slot as usize;
                let logical = placement.logical_of(slot).ok_or_else(|| {
                    (
                        src,
                        format!("row {i} pick {k} is routed to slot {slot}, which holds no expert"),
                    )
                })?;
                if slot / spr != me {
                    match foreign {
                        Foreign::Skip => continue,
                        Foreign::Reject => {
                            return Err((
                                src,
                                format!(
                                    "row {i} pick {k} is routed to slot {slot}, which is not an \
                                     expert slot of this rank (slots {first_slot}..{})",
                                    first_slot + spr
                                ),
                            ))
                        }
                    }
                }
                items.push(ExpertWork {
                    row: base + i,
                    slot,
                    local_slot: slot - first_slot,
                    logical,
                    weight,
                });
            }
        }
        base += count;
    }
    Ok(items)
}

/// One 8-byte pick entry (`chunks_exact` guarantees the length).
fn decode_pick(e: &[u8]) -> (u32, f32) {
    let mut slot = [0u8; 4];
    let mut weight = [0u8; 4];
    slot.copy_from_slice(e.get(..4).unwrap_or(&[0; 4]));
    weight.copy_from_slice(e.get(4..8).unwrap_or(&[0; 4]));
    (u32::from_le_bytes(slot), f32::from_le_bytes(weight))
}

/// Received work organised for the kernels: items sorted by local slot (stable), the slot
/// boundaries, and per received row the items that read it (a CSR list of item indices,
/// ascending, with their weights).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Received {
    pub items: Vec<ExpertWork>,
    /// `items[slot_offsets[s]..slot_offsets[s + 1]]` are local slot `s`'s items.
    pub slot_offsets: Vec<usize>,
    /// Row `r`'s entries are `row_items[row_offsets[r]..row_offsets[r + 1]]`.
    pub row_offsets: Vec<u32>,
    /// Item indices (into `items`).
    pub row_items: Vec<u32>,
    /// The items' router weights, aligned with `row_items`.
    pub row_weights: Vec<f32>,
    /// `items[i].row` for every item, for the expert-input gather.
    pub item_rows: Vec<u32>,
}

impl Received {
    /// Sorts `items` (receive order) by local slot, stably, and builds the row lists for
    /// `num_rows` received rows and `slots_per_rank` slots.
    pub(crate) fn organize(items: Vec<ExpertWork>, num_rows: usize, slots_per_rank: usize) -> Self {
        // Counting sort by local slot (stable).
        let mut slot_offsets = vec![0usize; slots_per_rank + 1];
        for it in &items {
            if let Some(c) = slot_offsets.get_mut(it.local_slot + 1) {
                *c += 1;
            }
        }
        for s in 1..slot_offsets.len() {
            slot_offsets[s] += slot_offsets[s - 1];
        }
        let mut next = slot_offsets.clone();
        let mut order = vec![u32::MAX; items.len()];
        for (i, it) in items.iter().enumerate() {
            if let Some(pos) = next.get_mut(it.local_slot) {
                if let Some(cell) = order.get_mut(*pos) {
                    *cell = i as u32;
                }
                *pos += 1;
            }
        }
        let items: Vec<ExpertWork> = order
            .iter()
            .filter_map(|&i| items.get(i as usize).copied())
            .collect();

        // Per received row, its items in ascending (sorted) order, with their weights.
        let mut row_offsets = vec![0u32; num_rows + 1];
        for it in &items {
            if let Some(c) = row_offsets.get_mut(it.row + 1) {
                *c += 1;
            }
        }
        for r in 1..row_offsets.len() {
            row_offsets[r] += row_offsets[r - 1];
        }
        let total = row_offsets.last().copied().unwrap_or(0) as usize;
        let mut fill: Vec<u32> = row_offsets.clone();
        let mut row_items = vec![0u32; total];
        let mut row_weights = vec![0f32; total];
        let mut item_rows = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            item_rows.push(it.row as u32);
            if let Some(pos) = fill.get_mut(it.row) {
                let p = *pos as usize;
                if let (Some(ri), Some(rw)) = (row_items.get_mut(p), row_weights.get_mut(p)) {
                    *ri = i as u32;
                    *rw = it.weight;
                }
                *pos += 1;
            }
        }
        Self {
            items,
            slot_offsets,
            row_offsets,
            row_items,
            row_weights,
            item_rows,
        }
    }
}

/// Segment lists of the final sum on a token's own rank after all-to-all-v: the rows came
/// back destination by destination (`sent[d]` in order, blocks in rank order), and token
/// `t` sums its rows in rank order. Returns `(offsets, rows)`, `n + 1` offsets.
pub(crate) fn token_segments(sent: &[Vec<u32>], n: usize) -> (Vec<u32>, Vec<u32>) {
    let mut offsets = vec![0u32; n + 1];
    for tokens in sent {
        for &t in tokens {
            if let Some(c) = offsets.get_mut(t as usize + 1) {
                *c += 1;
            }
        }
    }
    for t in 1..offsets.len() {
        offsets[t] += offsets[t - 1];
    }
    let mut fill = offsets.clone();
    let mut rows = vec![0u32; offsets.last().copied().unwrap_or(0) as usize];
    let mut back_row = 0u32;
    for tokens in sent {
        for &t in tokens {
            if let Some(pos) = fill.get_mut(t as usize) {
                if let Some(r) = rows.get_mut(*pos as usize) {
                    *r = back_row;
                }
                *pos += 1;
            }
            back_row += 1;
        }
    }
    (offsets, rows)
}

/// Segment lists of the final sum after a reduce-scatter: `size` blocks of `n` rows, token
/// `t` sums row `t` of every block in rank order.
pub(crate) fn strided_segments(size: usize, n: usize) -> (Vec<u32>, Vec<u32>) {
    let offsets = (0..=n).map(|t| (t * size) as u32).collect();
    let rows = (0..n)
        .flat_map(|t| (0..size).map(move |s| (s * n + t) as u32))
        .collect();
    (offsets, rows)
}

#[cfg(test)]
mod tests {
    use super::super::cuda_wire::pick_at;
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn split_sends_each_token_once_per_destination_with_its_picks() {
        // 3 tokens, top-2, 2 slots per rank, 2 ranks.
        // token 0 → slots 0, 1 (both rank 0); token 1 → slots 3, 0; token 2 → 2, 3.
        let slots = [0, 1, 3, 0, 2, 3];
        let weights = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6];
        let out = split_by_destination(&slots, &weights, 2, 2, 2);
        assert_eq!(out[0].tokens, [0, 1]);
        assert_eq!(out[1].tokens, [1, 2]);
        let picks = |o: &Outgoing| {
            (0..o.meta.len() / PICK_BYTES)
                .map(|i| pick_at(&o.meta, i).expect("entry"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            picks(&out[0]),
            [(0, 0.1), (1, 0.2), (NO_PICK, 0.3), (0, 0.4)]
        );
        assert_eq!(
            picks(&out[1]),
            [(3, 0.3), (NO_PICK, 0.4), (2, 0.5), (3, 0.6)]
        );
    }

    fn placement() -> ExpertPlacement {
        // 4 slots on 2 ranks: rank 0 holds experts 0, 1; rank 1 holds 2, 0.
        ExpertPlacement::from_phy2log(0, &[0, 1, 2, 0], 3, 2).expect("placement")
    }

    #[test]
    fn received_metadata_becomes_work_items_in_receive_order() {
        let p = placement();
        // From rank 0: one row with picks (3, NO); from rank 1: two rows (2, 3), (NO, 2).
        let mut meta = Vec::new();
        push_pick(&mut meta, 3, 0.5);
        push_pick(&mut meta, NO_PICK, 0.5);
        push_pick(&mut meta, 2, 0.25);
        push_pick(&mut meta, 3, 0.75);
        push_pick(&mut meta, NO_PICK, 0.5);
        push_pick(&mut meta, 2, 1.0);
        let items = parse_received(&meta, &[1, 2], 2, &p, 1, Foreign::Reject).expect("parse");
        let got: Vec<(usize, usize, usize, f32)> = items
            .iter()
            .map(|w| (w.row, w.slot, w.logical, w.weight))
            .collect();
        assert_eq!(
            got,
            [
                (0, 3, 0, 0.5),
                (1, 2, 2, 0.25),
                (1, 3, 0, 0.75),
                (2, 2, 2, 1.0)
            ]
        );
        assert!(items.iter().all(|w| w.local_slot == w.slot - 2));

        // Rank 0 must not accept slot 3 (rank 1's), unless foreign picks are skipped.
        let (src, detail) =
            parse_received(&meta, &[1, 2], 2, &p, 0, Foreign::Reject).expect_err("foreign");
        assert_eq!(src, 0);
        assert!(detail.contains("slot 3"), "{detail}");
        let skipped = parse_received(&meta, &[1, 2], 2, &p, 0, Foreign::Skip).expect("skip");
        assert!(skipped.is_empty());
        // Truncated metadata names the source.
        let (src, _) =
            parse_received(&meta[..40], &[1, 2], 2, &p, 1, Foreign::Reject).expect_err("short");
        assert_eq!(src, 1);
    }

    fn work(row: usize, local_slot: usize, weight: f32) -> ExpertWork {
        ExpertWork {
            row,
            slot: 10 + local_slot,
            local_slot,
            logical: local_slot,
            weight,
        }
    }

    #[test]
    fn organize_sorts_stably_and_lists_each_rows_items_in_order() {
        let items = vec![
            work(0, 2, 0.1),
            work(1, 0, 0.2),
            work(2, 2, 0.3),
            work(0, 0, 0.4),
            work(1, 2, 0.5),
        ];
        let r = Received::organize(items, 4, 3);
        let order: Vec<(usize, usize)> = r.items.iter().map(|w| (w.local_slot, w.row)).collect();
        assert_eq!(order, [(0, 1), (0, 0), (2, 0), (2, 2), (2, 1)]);
        assert_eq!(r.slot_offsets, [0, 2, 2, 5]);
        // Row 0 is read by sorted items 1 and 2, row 1 by 0 and 4, row 2 by 3, row 3 by none.
        assert_eq!(r.row_offsets, [0, 2, 4, 5, 5]);
        assert_eq!(r.row_items, [1, 2, 0, 4, 3]);
        assert_eq!(r.row_weights, [0.4, 0.1, 0.2, 0.5, 0.3]);
        assert_eq!(r.item_rows, [1, 0, 0, 2, 1]);
    }

    #[test]
    fn token_segments_follow_destination_order() {
        // Token 1 went to ranks 0 and 1, token 0 only to 1, token 2 only to 0.
        let sent = vec![vec![1, 2], vec![0, 1]];
        let (offsets, rows) = token_segments(&sent, 3);
        assert_eq!(offsets, [0, 1, 3, 4]);
        // Back rows: block 0 = [t1, t2] (rows 0, 1), block 1 = [t0, t1] (rows 2, 3).
        assert_eq!(rows, [2, 0, 3, 1]);
        let (offsets, rows) = strided_segments(3, 2);
        assert_eq!(offsets, [0, 3, 6]);
        assert_eq!(rows, [0, 2, 4, 1, 3, 5]);
    }

    /// The straightforward forms of the tables, written independently: per destination,
    /// scan the picks; per slot, filter the items; per row, filter the sorted items.
    fn reference_split(
        slots: &[u32],
        weights: &[f32],
        k: usize,
        spr: usize,
        size: usize,
    ) -> Vec<Outgoing> {
        (0..size)
            .map(|dest| {
                let mut o = Outgoing::default();
                for t in 0..slots.len() / k {
                    let row = &slots[t * k..(t + 1) * k];
                    if row.iter().all(|&s| s as usize / spr != dest) {
                        continue;
                    }
                    o.tokens.push(t as u32);
                    for (j, &s) in row.iter().enumerate() {
                        let slot = if s as usize / spr == dest { s } else { NO_PICK };
                        o.meta.extend_from_slice(&slot.to_le_bytes());
                        o.meta.extend_from_slice(&weights[t * k + j].to_le_bytes());
                    }
                }
                o
            })
            .collect()
    }

    #[test]
    fn tables_match_their_straightforward_forms() {
        let mut rng = StdRng::seed_from_u64(0x7ab1e5);
        for case in 0..40 {
            let size = rng.gen_range(1..=4);
            let spr = rng.gen_range(1..=5);
            let num_physical = size * spr;
            let num_logical = rng.gen_range(1..=num_physical);
            let mut phy2log: Vec<i64> = (0..num_logical as i64).collect();
            while phy2log.len() < num_physical {
                phy2log.push(rng.gen_range(0..num_logical as i64));
            }
            let p = ExpertPlacement::from_phy2log(0, &phy2log, num_logical, size).expect("p");
            let k = rng.gen_range(1..=6);
            let n = rng.gen_range(0..50);
            let slots: Vec<u32> = (0..n * k)
                .map(|_| rng.gen_range(0..num_physical as u32))
                .collect();
            let weights: Vec<f32> = (0..n * k).map(|_| rng.gen::<f32>()).collect();
            let out = split_by_destination(&slots, &weights, k, spr, size);
            assert_eq!(
                out,
                reference_split(&slots, &weights, k, spr, size),
                "case {case}"
            );

            // What rank `me` receives from every rank (here: the same batch from each).
            let me = rng.gen_range(0..size);
            let mine = &out[me];
            let rows = vec![mine.tokens.len(); size];
            let meta = mine.meta.repeat(size);
            let items = parse_received(&meta, &rows, k, &p, me, Foreign::Reject).expect("parse");
            let mut expected = Vec::new();
            for (e, entry) in meta.chunks_exact(PICK_BYTES).enumerate() {
                let (slot, weight) = pick_at(entry, 0).expect("entry");
                if slot != NO_PICK {
                    let slot = slot as usize;
                    expected.push(ExpertWork {
                        row: e / k,
                        slot,
                        local_slot: slot - me * spr,
                        logical: p.logical_of(slot).expect("logical"),
                        weight,
                    });
                }
            }
            assert_eq!(items, expected, "case {case}");

            let num_rows = rows.iter().sum();
            let r = Received::organize(items.clone(), num_rows, spr);
            let sorted: Vec<ExpertWork> = (0..spr)
                .flat_map(|s| items.iter().filter(move |w| w.local_slot == s).copied())
                .collect();
            assert_eq!(r.items, sorted, "case {case}");
            for s in 0..spr {
                let count = sorted.iter().filter(|w| w.local_slot == s).count();
                assert_eq!(r.slot_offsets[s + 1] - r.slot_offsets[s], count);
            }
            for row in 0..num_rows {
                let lo = r.row_offsets[row] as usize;
                let hi = r.row_offsets[row + 1] as usize;
                let want: Vec<u32> = (0..sorted.len() as u32)
                    .filter(|&i| sorted[i as usize].row == row)
                    .collect();
                assert_eq!(&r.row_items[lo..hi], &want[..], "case {case} row {row}");
                let w: Vec<f32> = want.iter().map(|&i| sorted[i as usize].weight).collect();
                assert_eq!(&r.row_weights[lo..hi], &w[..]);
            }
            let item_rows: Vec<u32> = sorted.iter().map(|w| w.row as u32).collect();
            assert_eq!(r.item_rows, item_rows);
        }
    }
}
