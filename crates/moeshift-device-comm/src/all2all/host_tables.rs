//! The dispatch tables of the CUDA managers computed on the host, the plain way: the
//! reference that the GPU kernels (`tables.cu`) are tested against, entry for entry.
//!
//! Routing (which physical slot serves each pick), the split of a batch by destination (the
//! rows sent and their pick metadata), the work items a rank received (sorted by local
//! slot, with per-row lists), and the segment lists of the final sum.

use super::cuda_tables::{no_expert, not_ours, Foreign};
use super::cuda_wire::{pick_at, pick_entry, NO_PICK, PICK_BYTES};
use super::dispatched::ExpertWork;
use super::placement::ExpertPlacement;
use super::replica::token_key;

/// A pick whose logical expert the placement does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnknownPick {
    pub token: usize,
    pub k: usize,
    pub expert: u32,
}

/// The physical slot of every pick of rank `me`'s batch (`ids`: logical expert ids,
/// `tokens × top_k`, row-major): pick `k` of token `t` goes where
/// `placement.route(token_key(me, t), k, id)` sends it. Fails on the first pick (in token,
/// pick order) whose expert the placement does not know.
pub(crate) fn route_picks(
    ids: &[u32],
    top_k: usize,
    me: usize,
    placement: &ExpertPlacement,
) -> Result<Vec<u32>, UnknownPick> {
    let top_k = top_k.max(1);
    ids.iter()
        .enumerate()
        .map(|(i, &expert)| {
            let (token, k) = (i / top_k, i % top_k);
            placement
                .route(token_key(me, token), k, expert as usize)
                .map(|s| s as u32)
                .ok_or(UnknownPick { token, k, expert })
        })
        .collect()
}

/// One destination's share of a batch.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Outgoing {
    /// Tokens (indices into the batch) sent there, ascending.
    pub tokens: Vec<u32>,
    /// `top_k` pick entries per sent token: the slot for picks served there, [`NO_PICK`] for
    /// the others.
    pub meta: Vec<u8>,
}

/// Splits routed picks (`slots`, `weights`: `tokens × top_k`) by destination rank
/// `slot / slots_per_rank`: a token goes to a destination once, however many of its picks
/// land there; slots past the group's go nowhere.
pub(crate) fn split_by_destination(
    slots: &[u32],
    weights: &[f32],
    top_k: usize,
    slots_per_rank: usize,
    size: usize,
) -> Vec<Outgoing> {
    let dest = |s: u32| (s as usize).checked_div(slots_per_rank);
    (0..size)
        .map(|d| {
            let mut o = Outgoing::default();
            for (t, (row, w)) in slots
                .chunks_exact(top_k.max(1))
                .zip(weights.chunks_exact(top_k.max(1)))
                .enumerate()
            {
                if row.iter().all(|&s| dest(s) != Some(d)) {
                    continue;
                }
                o.tokens.push(t as u32);
                for (&s, &w) in row.iter().zip(w) {
                    let slot = if dest(s) == Some(d) { s } else { NO_PICK };
                    o.meta.extend_from_slice(&pick_entry(slot, w));
                }
            }
            o
        })
        .collect()
}

/// The entry of every pick, in pick order (gather / reduce-scatter sends all of them).
pub(crate) fn all_picks(slots: &[u32], weights: &[f32]) -> Vec<u8> {
    slots
        .iter()
        .zip(weights)
        .flat_map(|(&s, &w)| pick_entry(s, w))
        .collect()
}

fn truncated(i: usize, k: usize) -> String {
    format!("row {i} pick {k}: metadata is truncated")
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
                let e = entries.next().ok_or_else(|| (src, truncated(i, k)))?;
                let (slot, weight) = pick_at(e, 0).ok_or_else(|| (src, truncated(i, k)))?;
                if slot == NO_PICK {
                    continue;
                }
                let slot = slot as usize;
                let logical = placement
                    .logical_of(slot)
                    .ok_or_else(|| (src, no_expert(i, k, slot)))?;
                if slot / spr != me {
                    match foreign {
                        Foreign::Skip => continue,
                        Foreign::Reject => {
                            return Err((src, not_ours(i, k, slot, first_slot, spr)))
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

/// Received work organised as the kernels organise it (the reference form the GPU tables
/// are checked against): items sorted by local slot (stable), the slot boundaries, and per
/// received row the items that read it (a CSR list of item indices, ascending, with their
/// weights).
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
    /// [`parse_received`] then [`organize`](Self::organize): the work items of `meta` as
    /// the kernels organise them.
    pub(crate) fn parse(
        meta: &[u8],
        rows: &[usize],
        top_k: usize,
        placement: &ExpertPlacement,
        me: usize,
        foreign: Foreign,
    ) -> Result<Self, (usize, String)> {
        let items = parse_received(meta, rows, top_k, placement, me, foreign)?;
        let num_rows = rows.iter().sum();
        Ok(Self::organize(items, num_rows, placement.slots_per_rank()))
    }

    /// Sorts `items` (receive order) by local slot, stably, and builds the row lists for
    /// `num_rows` received rows and `slots_per_rank` slots.
    ///
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
pub(crate) fn token_segments(sent: &[Outgoing], n: usize) -> (Vec<u32>, Vec<u32>) {
    // Every returned row, in arrival order, listed under its token.
    let mut per_token = vec![Vec::new(); n];
    let back = sent.iter().flat_map(|o| o.tokens.iter());
    for (r, &t) in back.enumerate() {
        if let Some(rows) = per_token.get_mut(t as usize) {
            rows.push(r as u32);
        }
    }
    let mut offsets = vec![0u32];
    let mut rows = Vec::new();
    for list in per_token {
        rows.extend(list);
        offsets.push(rows.len() as u32);
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
    use super::super::cuda_wire::push_pick;
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
        let share = |tokens: &[u32]| Outgoing {
            tokens: tokens.to_vec(),
            meta: Vec::new(),
        };
        let sent = [share(&[1, 2]), share(&[0, 1])];
        let (offsets, rows) = token_segments(&sent, 3);
        assert_eq!(offsets, [0, 1, 3, 4]);
        // Back rows: block 0 = [t1, t2] (rows 0, 1), block 1 = [t0, t1] (rows 2, 3).
        assert_eq!(rows, [2, 0, 3, 1]);
        let (offsets, rows) = strided_segments(3, 2);
        assert_eq!(offsets, [0, 3, 6]);
        assert_eq!(rows, [0, 2, 4, 1, 3, 5]);
    }

    #[test]
    fn received_tables_match_their_straightforward_forms() {
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

    /// A random placement of `num_logical ≤ size × spr` experts (some slots empty when
    /// `empty` allows it) and its `phy2log`.
    fn random_placement(rng: &mut StdRng, size: usize, spr: usize, empty: bool) -> ExpertPlacement {
        let num_physical = size * spr;
        let num_logical = rng.gen_range(1..=num_physical);
        let mut phy2log: Vec<i64> = (0..num_logical as i64).collect();
        while phy2log.len() < num_physical {
            if empty && rng.gen_bool(0.2) {
                phy2log.push(-1);
            } else {
                phy2log.push(rng.gen_range(0..num_logical as i64));
            }
        }
        // Shuffle so that replicas and empty slots land on every rank.
        for i in (1..phy2log.len()).rev() {
            phy2log.swap(i, rng.gen_range(0..=i));
        }
        ExpertPlacement::from_phy2log(0, &phy2log, num_logical, size).expect("placement")
    }

    #[test]
    fn all_picks_are_written_in_pick_order() {
        let (slots, weights) = ([3u32, NO_PICK, 0], [0.5f32, 0.25, 2.0]);
        let out = all_picks(&slots, &weights);
        let mut expected = Vec::new();
        for (&s, &w) in slots.iter().zip(&weights) {
            push_pick(&mut expected, s, w);
        }
        assert_eq!(out, expected);
    }

    /// Received metadata for rank `me`: `rows[s]` rows of `k` entries from each source,
    /// mostly this rank's slots and unused entries, some other ranks' slots, and (when
    /// `bad`) now and then an empty slot or one past the placement's.
    fn random_meta(
        rng: &mut StdRng,
        p: &ExpertPlacement,
        me: usize,
        rows: &[usize],
        k: usize,
        bad: bool,
    ) -> Vec<u8> {
        let spr = p.slots_per_rank();
        let mut meta = Vec::new();
        for _ in 0..rows.iter().sum::<usize>() * k {
            let roll = rng.gen_range(0..100);
            let slot = if roll < 30 {
                NO_PICK
            } else if roll < 85 || !bad && p.ep_size() == 1 {
                (me * spr + rng.gen_range(0..spr)) as u32
            } else if roll < 99 || !bad {
                rng.gen_range(0..p.num_physical() as u32)
            } else {
                p.num_physical() as u32 + rng.gen_range(0..3)
            };
            push_pick(&mut meta, slot, rng.gen::<f32>());
        }
        meta
    }

    #[test]
    fn a_row_that_picks_a_slot_twice_keeps_pick_order() {
        // 4 slots on 1 rank; row 0 picks slot 2 twice, then slot 0.
        let p = ExpertPlacement::from_phy2log(0, &[0, 1, 2, 3], 4, 1).expect("placement");
        let mut meta = Vec::new();
        for (slot, w) in [(2, 0.5), (NO_PICK, 0.0), (2, 0.25), (0, 1.0)] {
            push_pick(&mut meta, slot, w);
        }
        for (slot, w) in [(1, 2.0), (2, 3.0), (NO_PICK, 0.0), (NO_PICK, 0.0)] {
            push_pick(&mut meta, slot, w);
        }
        let r = Received::parse(&meta, &[2], 4, &p, 0, Foreign::Reject).expect("parse");
        let order: Vec<(usize, usize, f32)> = r
            .items
            .iter()
            .map(|w| (w.local_slot, w.row, w.weight))
            .collect();
        assert_eq!(
            order,
            [
                (0, 0, 1.0),
                (1, 1, 2.0),
                (2, 0, 0.5),
                (2, 0, 0.25),
                (2, 1, 3.0)
            ]
        );
        assert_eq!(r.slot_offsets, [0, 1, 2, 5, 5]);
        // Row 0 is read by items 0, 2, 3; row 1 by 1, 4.
        assert_eq!(r.row_offsets, [0, 3, 5]);
        assert_eq!(r.row_items, [0, 2, 3, 1, 4]);
        assert_eq!(r.row_weights, [1.0, 0.5, 0.25, 2.0, 3.0]);
        assert_eq!(r.item_rows, [0, 1, 0, 0, 1]);
    }

    // ----- the GPU-built tables against the host forms above (need a GPU; skipped without) -----

    mod gpu {
        use std::sync::Arc;

        use cudarc::driver::{result, CudaContext, CudaSlice, CudaStream, DevicePtr};

        use super::super::super::cuda_tables::{malformed_entry, placement_tables};
        use super::super::super::table_kernels::{
            DevicePlacement, HeaderFields, ItemLayout, RouteLayout, SendLayout, TableKernels,
        };
        use super::*;

        struct Gpu {
            stream: Arc<CudaStream>,
            kernels: TableKernels,
        }

        /// The first GPU, or `None` (and why, on stderr) without one.
        fn gpu(test: &str) -> Option<Gpu> {
            match moeshift_tensor::cuda_available() {
                Ok(n) if n > 0 => {}
                other => {
                    eprintln!("skipping {test}: no GPU ({other:?})");
                    return None;
                }
            }
            let ctx = CudaContext::new(0).expect("context");
            let stream = ctx.default_stream();
            let kernels = TableKernels::load(&ctx).expect("table kernels");
            Some(Gpu { stream, kernels })
        }

        fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
            let (p, record) = s.device_ptr(stream);
            drop(record);
            p
        }

        /// Uploads `data` (at least one element: the driver refuses empty buffers).
        fn up<T: cudarc::driver::DeviceRepr + Default + Clone>(
            g: &Gpu,
            data: &[T],
        ) -> CudaSlice<T> {
            let mut v = data.to_vec();
            v.push(T::default());
            g.stream.clone_htod(&v).expect("upload")
        }

        /// A zeroed buffer of `len` bytes with an all-ones error word at `err`.
        fn buffer(g: &Gpu, len: usize, err: usize) -> CudaSlice<u8> {
            let buf = g.stream.alloc_zeros::<u8>(len).expect("alloc");
            let at = ptr(&buf, &g.stream) + err as u64;
            // SAFETY: `err..err + 8` lies in `buf`.
            unsafe { result::memset_d8_async(at, 0xff, 8, g.stream.cu_stream()) }.expect("memset");
            buf
        }

        fn placement_on(g: &Gpu, p: &ExpertPlacement) -> (DevicePlacement, [CudaSlice<u32>; 3]) {
            let [a, b, c] = placement_tables(p);
            let bufs = [up(g, &a), up(g, &b), up(g, &c)];
            let dev = DevicePlacement {
                num_logical: p.num_logical() as u32,
                num_physical: p.num_physical() as u32,
                slots_per_rank: p.slots_per_rank() as u32,
                rep_start: ptr(&bufs[0], &g.stream),
                rep_slots: ptr(&bufs[1], &g.stream),
                phys_logical: ptr(&bufs[2], &g.stream),
            };
            (dev, bufs)
        }

        fn u32s(bytes: &[u8], at: usize, n: usize) -> Vec<u32> {
            bytes[at..at + n * 4]
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
                .collect()
        }

        fn f32s(bytes: &[u8], at: usize, n: usize) -> Vec<f32> {
            u32s(bytes, at, n).into_iter().map(f32::from_bits).collect()
        }

        fn u64_at(bytes: &[u8], at: usize) -> u64 {
            u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
        }

        #[test]
        fn gpu_routing_and_split_match_the_host_tables() {
            let Some(g) = gpu("gpu_routing_and_split_match_the_host_tables") else {
                return;
            };
            let mut rng = StdRng::seed_from_u64(0x06a0_5e4d);
            let mut failed_cases = 0;
            for case in 0..300 {
                let size = *[1, 2, 3, 5, 8].get(rng.gen_range(0..5)).unwrap();
                let spr = *[1, 2, 4, 9, 32, 130].get(rng.gen_range(0..6)).unwrap();
                let p = random_placement(&mut rng, size, spr, false);
                // Odd top-k values make tokens straddle the kernels' 32-pick windows.
                let k = *[1, 2, 3, 6, 8, 9].get(rng.gen_range(0..6)).unwrap();
                let n = if rng.gen_bool(0.1) {
                    0
                } else {
                    rng.gen_range(1..1500)
                };
                let me = rng.gen_range(0..size);
                let mut ids: Vec<u32> = (0..n * k)
                    .map(|_| rng.gen_range(0..p.num_logical() as u32))
                    .collect();
                if n > 0 && rng.gen_bool(0.1) {
                    let at = rng.gen_range(0..ids.len());
                    ids[at] = p.num_logical() as u32 + rng.gen_range(0..3);
                }
                let weights: Vec<f32> = (0..n * k).map(|_| rng.gen::<f32>()).collect();
                let routed = route_picks(&ids, k, me, &p);
                let want_err = match routed {
                    Err(u) => ((u.token * k + u.k) as u64) << 32 | u64::from(u.expert),
                    Ok(_) => u64::MAX,
                };

                let (dev, _tables) = placement_on(&g, &p);
                let (d_ids, d_weights) = (up(&g, &ids), up(&g, &weights));
                let (ids_at, weights_at) = (ptr(&d_ids, &g.stream), ptr(&d_weights, &g.stream));

                // Every token to every rank: slots, every pick's entry, the strided segments.
                let r = RouteLayout::new(n, k, size).expect("route layout");
                let rbuf = buffer(&g, r.len, r.err);
                // SAFETY: buffers sized for the layout, all on this stream.
                unsafe {
                    g.kernels.route_all(
                        &g.stream,
                        &r,
                        ptr(&rbuf, &g.stream),
                        ids_at,
                        weights_at,
                        me,
                        &dev,
                    )
                }
                .expect("launch");
                let rbytes = g.stream.clone_dtoh(&rbuf).expect("download");
                assert_eq!(u64_at(&rbytes, r.err), want_err, "case {case}");
                let (offsets, rows_of) = strided_segments(size, n);
                assert_eq!(
                    u32s(&rbytes, r.token_offsets, n + 1),
                    offsets,
                    "case {case}"
                );
                assert_eq!(
                    u32s(&rbytes, r.token_rows, n * size),
                    rows_of,
                    "case {case}"
                );

                // Split by destination.
                let l = SendLayout::new(n, k, size).expect("layout");
                let buf = buffer(&g, l.len, l.err);
                let base = ptr(&buf, &g.stream);
                // SAFETY: buffers sized for the layout, all on this stream.
                unsafe {
                    g.kernels
                        .route_and_split(&g.stream, &l, base, ids_at, weights_at, me, &dev)
                }
                .expect("launch");
                let bytes = g.stream.clone_dtoh(&buf).expect("download");
                assert_eq!(u64_at(&bytes, l.err), want_err, "case {case}");
                let Ok(want_slots) = routed else {
                    failed_cases += 1;
                    continue;
                };
                assert_eq!(u32s(&rbytes, r.slots, n * k), want_slots, "case {case}");
                let meta = &rbytes[r.meta..r.meta + n * k * PICK_BYTES];
                assert_eq!(meta, &all_picks(&want_slots, &weights)[..], "case {case}");
                assert_eq!(u32s(&bytes, l.slots, n * k), want_slots, "case {case}");
                let out = split_by_destination(&want_slots, &weights, k, spr, size);
                let offsets = u32s(&bytes, l.bucket_offsets, size + 1);
                let mut at = 0u32;
                for (d, o) in out.iter().enumerate() {
                    assert_eq!(offsets[d], at, "case {case} destination {d}");
                    at += o.tokens.len() as u32;
                }
                assert_eq!(offsets[size], at, "case {case}");
                let rows = at as usize;
                let index: Vec<u32> = out.iter().flat_map(|o| o.tokens.clone()).collect();
                assert_eq!(u32s(&bytes, l.send_index, rows), index, "case {case}");
                let meta: Vec<u8> = out.iter().flat_map(|o| o.meta.clone()).collect();
                let got_meta = &bytes[l.send_meta..l.send_meta + rows * k * PICK_BYTES];
                assert_eq!(got_meta, &meta[..], "case {case}");
                let (offsets, rows_of) = token_segments(&out, n);
                assert_eq!(u32s(&bytes, l.token_offsets, n + 1), offsets, "case {case}");
                assert_eq!(
                    u32s(&bytes, l.token_rows, rows_of.len()),
                    rows_of,
                    "case {case}"
                );
            }
            assert!(
                (5..100).contains(&failed_cases),
                "{failed_cases} cases failed"
            );
        }

        #[test]
        fn gpu_headers_take_the_row_counts_and_the_status() {
            let Some(g) = gpu("gpu_headers_take_the_row_counts_and_the_status") else {
                return;
            };
            let fields = HeaderFields {
                len: 64,
                rows_at: 16,
                status_at: 4,
                rejected: 7,
            };
            let headers = up(&g, &[0xabu8; 3 * 64]);
            let offsets = up(&g, &[0u32, 5, 5, 12]);
            let routed = up(&g, &[u64::MAX]);
            let failed = up(&g, &[(3u64 << 32) | 9]);
            let at = |s: &CudaSlice<u8>, h: usize, f: usize, n: usize| {
                let bytes = g.stream.clone_dtoh(s).expect("download");
                bytes[h * 64 + f..h * 64 + f + n].to_vec()
            };
            let fill = |offsets: u64, err: u64| {
                // SAFETY: 3 headers of 64 bytes, 4 offsets, one error word, on this stream.
                unsafe {
                    g.kernels.fill_headers(
                        &g.stream,
                        ptr(&headers, &g.stream),
                        3,
                        &fields,
                        offsets,
                        err,
                    )
                }
                .expect("launch")
            };
            // Routed: every destination's row count; the status is left alone.
            fill(ptr(&offsets, &g.stream), ptr(&routed, &g.stream));
            for (h, rows) in [5u64, 0, 7].into_iter().enumerate() {
                assert_eq!(at(&headers, h, 16, 8), rows.to_le_bytes());
                assert_eq!(at(&headers, h, 4, 4), [0xab; 4]);
                assert_eq!(at(&headers, h, 0, 4), [0xab; 4]);
            }
            // Failed, without offsets: the counts stay, every status says rejected.
            fill(0, ptr(&failed, &g.stream));
            for (h, rows) in [5u64, 0, 7].into_iter().enumerate() {
                assert_eq!(at(&headers, h, 16, 8), rows.to_le_bytes());
                assert_eq!(at(&headers, h, 4, 4), 7u32.to_le_bytes());
            }
        }

        #[test]
        fn gpu_work_items_match_the_host_tables() {
            let Some(g) = gpu("gpu_work_items_match_the_host_tables") else {
                return;
            };
            let mut rng = StdRng::seed_from_u64(0x0001_7ea5);
            let mut ok = 0;
            for case in 0..300 {
                let size = rng.gen_range(1..=4);
                let spr = *[1, 2, 5, 33, 130, 700].get(rng.gen_range(0..6)).unwrap();
                let bad = rng.gen_bool(0.3);
                let p = random_placement(&mut rng, size, spr, bad);
                let k = *[1, 2, 3, 6, 8].get(rng.gen_range(0..5)).unwrap();
                let me = rng.gen_range(0..size);
                let rows: Vec<usize> = (0..size).map(|_| rng.gen_range(0..400)).collect();
                let mut meta = random_meta(&mut rng, &p, me, &rows, k, bad);
                // Now and then a row that picks one slot twice.
                if rows.iter().sum::<usize>() > 0 && k > 1 && rng.gen_bool(0.3) {
                    let e = rng.gen_range(0..meta.len() / PICK_BYTES / k) * k * PICK_BYTES;
                    let first: [u8; 4] = meta[e..e + 4].try_into().unwrap();
                    meta[e + PICK_BYTES..e + PICK_BYTES + 4].copy_from_slice(&first);
                }
                let foreign = if rng.gen_bool(0.5) {
                    Foreign::Reject
                } else {
                    Foreign::Skip
                };
                let num_rows: usize = rows.iter().sum();
                let want = Received::parse(&meta, &rows, k, &p, me, foreign);

                let (dev, _tables) = placement_on(&g, &p);
                let d_meta = up(&g, &meta);
                let l = ItemLayout::new(num_rows, k, spr).expect("layout");
                let buf = buffer(&g, l.len, l.err);
                // SAFETY: buffers sized for the layout, all on this stream.
                unsafe {
                    g.kernels.items(
                        &g.stream,
                        &l,
                        ptr(&buf, &g.stream),
                        ptr(&d_meta, &g.stream),
                        me,
                        &dev,
                        foreign == Foreign::Skip,
                    )
                }
                .expect("launch");
                let bytes = g.stream.clone_dtoh(&buf).expect("download");
                let err = u64_at(&bytes, l.err);
                let got_err = malformed_entry(err, k, &rows, &p, me);
                let r = match want {
                    Err(e) => {
                        assert_eq!(got_err, Some(e), "case {case}");
                        continue;
                    }
                    Ok(r) => {
                        assert_eq!(got_err, None, "case {case}");
                        r
                    }
                };
                ok += 1;
                let offsets: Vec<usize> = u32s(&bytes, l.slot_offsets, spr + 1)
                    .into_iter()
                    .map(|o| o as usize)
                    .collect();
                assert_eq!(offsets, r.slot_offsets, "case {case}");
                let items = r.items.len();
                assert_eq!(u32s(&bytes, l.item_rows, items), r.item_rows, "case {case}");
                let weights: Vec<f32> = r.items.iter().map(|w| w.weight).collect();
                assert_eq!(f32s(&bytes, l.item_weights, items), weights, "case {case}");
                assert_eq!(
                    u32s(&bytes, l.row_offsets, num_rows + 1),
                    r.row_offsets,
                    "case {case}"
                );
                assert_eq!(u32s(&bytes, l.row_items, items), r.row_items, "case {case}");
                assert_eq!(
                    f32s(&bytes, l.row_weights, items),
                    r.row_weights,
                    "case {case}"
                );
            }
            assert!((50..300).contains(&ok), "{ok} cases parsed");
        }
    }
}
