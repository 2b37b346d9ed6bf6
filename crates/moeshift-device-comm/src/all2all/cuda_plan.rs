//! Host-side routing tables of the CUDA managers: which physical slot serves each pick,
//! who sends which rows where, which work items a rank received, and the segment lists the
//! reduction kernels walk. Pure functions, the same on every rank for the same inputs.
//!
//! They run on every dispatch, between GPU steps, so each is a fixed number of linear
//! passes with exact sizes, and the `*_into` forms write into buffers kept from the
//! previous call (the managers keep them in their engine): no per-element searches, no
//! reallocation, no fresh memory to fault in.

#[cfg(test)]
use super::cuda_wire::push_pick;
use super::cuda_wire::{pick_entry, NO_PICK, PICK_BYTES};
#[cfg(test)]
use super::dispatched::ExpertWork;
use super::placement::ExpertPlacement;
use super::replica::{replica_index, token_key};

/// A pick whose logical expert the placement does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnknownPick {
    pub token: usize,
    pub k: usize,
    pub expert: u32,
}

/// Routes every pick of this rank's batch to its physical slot, into `slots` (replacing its
/// contents): `ids` holds the router's logical expert ids (little-endian `u32`,
/// `tokens × top_k`, row-major), and pick `k` of token `t` goes where
/// `placement.route(token_key(me, t), k, id)` sends it: replica
/// [`replica_index`]`(token_key(me, t), k, count)` of the expert's replicas. Experts with
/// one replica skip the hash (their replica index is always 0). On an unknown expert,
/// returns the first such pick (in token, pick order).
pub(crate) fn route_picks_into(
    slots: &mut Vec<u32>,
    ids: &[u8],
    top_k: usize,
    me: usize,
    placement: &ExpertPlacement,
) -> Result<(), UnknownPick> {
    // Per logical expert: its only slot, `SEVERAL` (hash among its replicas) or `NONE`.
    const SEVERAL: u32 = u32::MAX;
    const NONE: u32 = u32::MAX - 1;
    let replicas: Vec<&[usize]> = (0..placement.num_logical())
        .map(|e| placement.replicas(e).unwrap_or_default())
        .collect();
    let direct: Vec<u32> = replicas
        .iter()
        .map(|r| match r {
            [slot] => u32::try_from(*slot)
                .ok()
                .filter(|&s| s < NONE)
                .unwrap_or(SEVERAL),
            [] => NONE,
            _ => SEVERAL,
        })
        .collect();
    slots.clear();
    if top_k == 0 {
        return Ok(());
    }
    slots.reserve(ids.len() / 4);
    for (t, row) in ids.chunks_exact(4 * top_k).enumerate() {
        for (k, id) in row.chunks_exact(4).enumerate() {
            let expert = u32::from_le_bytes(word(id));
            let slot = match direct.get(expert as usize) {
                Some(&s) if s < NONE => Some(s),
                Some(&SEVERAL) => replicas.get(expert as usize).and_then(|r| {
                    r.get(replica_index(token_key(me, t), k, r.len()))
                        .map(|&s| s as u32)
                }),
                _ => None,
            };
            slots.push(slot.ok_or(UnknownPick {
                token: t,
                k,
                expert,
            })?);
        }
    }
    Ok(())
}

/// Little-endian `f32` values into `out` (replacing its contents; a trailing partial word
/// is dropped).
pub(crate) fn decode_f32s_into(out: &mut Vec<f32>, bytes: &[u8]) {
    out.clear();
    out.extend(bytes.chunks_exact(4).map(|w| f32::from_le_bytes(word(w))));
}

/// One destination's share of this rank's tokens.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Outgoing {
    /// Tokens (indices into this rank's batch) sent there, ascending.
    pub tokens: Vec<u32>,
    /// `top_k` pick entries per sent token (see `cuda_wire`): the slot for picks served
    /// there, [`NO_PICK`] for the others.
    pub meta: Vec<u8>,
}

impl AsRef<[u32]> for Outgoing {
    fn as_ref(&self) -> &[u32] {
        &self.tokens
    }
}

/// The destination rank of a physical slot: looked up in a table over the group's slots
/// (slots past them have none, reported as `size`).
struct SlotRanks {
    table: Vec<u32>,
    slots_per_rank: usize,
    size: usize,
}

impl SlotRanks {
    /// Largest slot count looked up in a table rather than divided.
    const TABLE_MAX: usize = 1 << 20;

    fn new(slots_per_rank: usize, size: usize) -> Self {
        let slots = slots_per_rank.saturating_mul(size);
        let table = if slots_per_rank > 0 && slots <= Self::TABLE_MAX {
            (0..slots).map(|s| (s / slots_per_rank) as u32).collect()
        } else {
            Vec::new()
        };
        Self {
            table,
            slots_per_rank,
            size,
        }
    }

    /// The destinations of token `t`'s picks `row_slots`: each pick's into `dest`; the
    /// token's, each once, as a bit mask for up to 64 ranks, or else in `new` (those not
    /// yet marked with `t` in `stamp`, then marked).
    #[inline]
    fn destinations(
        &self,
        t: usize,
        row_slots: &[u32],
        dest: &mut [usize],
        stamp: &mut [usize],
        new: &mut Vec<usize>,
    ) -> u64 {
        let mut mask = 0u64;
        for (d, &s) in dest.iter_mut().zip(row_slots) {
            *d = self.of(s);
            mask |= 1u64.checked_shl(*d as u32).unwrap_or(0);
        }
        if self.size <= 64 {
            return mask;
        }
        new.clear();
        for &d in dest.iter() {
            if let Some(seen) = stamp.get_mut(d) {
                if *seen != t {
                    *seen = t;
                    new.push(d);
                }
            }
        }
        0
    }

    /// The rank of `slot`, or `size` (no rank) past the group's slots.
    #[inline]
    fn of(&self, slot: u32) -> usize {
        match self.table.get(slot as usize) {
            Some(&d) => d as usize,
            None if self.table.is_empty() && self.slots_per_rank > 0 => {
                (slot as usize / self.slots_per_rank).min(self.size)
            }
            None => self.size,
        }
    }
}

/// Splits this rank's routed picks (`slots`, `weights`: `tokens × top_k`) by destination
/// rank `slot / slots_per_rank`; a token goes to a destination once, however many of its
/// picks land there.
#[cfg(test)]
pub(crate) fn split_by_destination(
    slots: &[u32],
    weights: &[f32],
    top_k: usize,
    slots_per_rank: usize,
    size: usize,
) -> Vec<Outgoing> {
    let mut out = Vec::new();
    split_by_destination_into(&mut out, slots, weights, top_k, slots_per_rank, size);
    out
}

/// [`split_by_destination`] into `out` (`size` shares, their buffers reused).
///
/// Two passes over the picks: the first counts each destination's tokens, so that the
/// second writes every share's entries into a buffer of the exact size. A token's
/// destinations are a bit mask for groups of up to 64 ranks; larger groups mark each
/// destination with the last token that went there.
pub(crate) fn split_by_destination_into(
    out: &mut Vec<Outgoing>,
    slots: &[u32],
    weights: &[f32],
    top_k: usize,
    slots_per_rank: usize,
    size: usize,
) {
    out.resize_with(size, Outgoing::default);
    out.truncate(size);
    for o in out.iter_mut() {
        o.tokens.clear();
        o.meta.clear();
    }
    if top_k == 0 || slots_per_rank == 0 {
        return;
    }
    let ranks = SlotRanks::new(slots_per_rank, size);
    let rows = || slots.chunks_exact(top_k).zip(weights.chunks_exact(top_k));
    // The destination of each pick of the current token, and the token's destinations:
    // up to 64 ranks a bit mask, past that the destinations not yet marked with the token.
    let mut dest = vec![0usize; top_k];
    let mut stamp = vec![usize::MAX; if size > 64 { size } else { 0 }];
    let mut new = Vec::with_capacity(top_k);
    // Pass 1: each destination's tokens.
    let mut count = vec![0usize; size];
    for (t, (row_slots, _)) in rows().enumerate() {
        let mut mask = ranks.destinations(t, row_slots, &mut dest, &mut stamp, &mut new);
        while mask != 0 {
            if let Some(c) = count.get_mut(mask.trailing_zeros() as usize) {
                *c += 1;
            }
            mask &= mask - 1;
        }
        for &d in &new {
            if let Some(c) = count.get_mut(d) {
                *c += 1;
            }
        }
    }
    let row_bytes = top_k * PICK_BYTES;
    for (o, &c) in out.iter_mut().zip(&count) {
        o.tokens.reserve(c);
        o.meta.resize(c * row_bytes, 0);
    }

    // Pass 2: every (token, destination) once, with all of the token's entries; `at[d]`:
    // the bytes of share `d` written so far.
    let mut at = vec![0usize; size];
    let mut send = |t: usize, d: usize, dest: &[usize], row_slots: &[u32], row_weights: &[f32]| {
        let (Some(o), Some(a)) = (out.get_mut(d), at.get_mut(d)) else {
            return;
        };
        let Some(entries) = o.meta.get_mut(*a..*a + row_bytes) else {
            return;
        };
        *a += row_bytes;
        o.tokens.push(t as u32);
        let picks = dest.iter().zip(row_slots).zip(row_weights);
        for (e, ((&pd, &s), &w)) in entries.chunks_exact_mut(PICK_BYTES).zip(picks) {
            e.copy_from_slice(&pick_entry(if pd == d { s } else { NO_PICK }, w));
        }
    };
    stamp.fill(usize::MAX);
    for (t, (row_slots, row_weights)) in rows().enumerate() {
        let mut mask = ranks.destinations(t, row_slots, &mut dest, &mut stamp, &mut new);
        while mask != 0 {
            let d = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            send(t, d, &dest, row_slots, row_weights);
        }
        for &d in &new {
            send(t, d, &dest, row_slots, row_weights);
        }
    }
}

/// Writes the pick entry of every pick into `out` (gather / reduce-scatter sends all of
/// them everywhere): `out` holds `PICK_BYTES` per pick; entries past its end are dropped.
pub(crate) fn write_all_picks(out: &mut [u8], slots: &[u32], weights: &[f32]) {
    for ((e, &s), &w) in out.chunks_exact_mut(PICK_BYTES).zip(slots).zip(weights) {
        e.copy_from_slice(&pick_entry(s, w));
    }
}

/// What to do with a received pick routed to another rank's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Foreign {
    /// It is an error: the sender should only send this rank's picks.
    Reject,
    /// Skip it: every rank receives every pick.
    Skip,
}

/// The first four bytes of `b` (zeros past its end; callers pass whole words).
#[inline]
fn word(b: &[u8]) -> [u8; 4] {
    match b {
        [a, b, c, d, ..] => [*a, *b, *c, *d],
        _ => [0; 4],
    }
}

/// The slot of one 8-byte pick entry (`chunks_exact` guarantees the length).
#[cfg(test)]
fn entry_slot(e: &[u8]) -> u32 {
    u32::from_le_bytes(word(e))
}

/// The weight of one 8-byte pick entry.
#[cfg(test)]
fn entry_weight(e: &[u8]) -> f32 {
    f32::from_le_bytes(word(e.get(4..).unwrap_or_default()))
}

/// One 8-byte pick entry.
#[cfg(test)]
fn decode_pick(e: &[u8]) -> (u32, f32) {
    (entry_slot(e), entry_weight(e))
}

/// The work items in the pick metadata received from every rank: `rows[s]` rows from group
/// rank `s`, their metadata consecutive in `meta` in rank order, `top_k` entries per row.
/// Items come in receive order (source rank, row, pick). On a malformed entry, returns the
/// source rank and what is wrong.
///
/// With [`Received::organize`], the two-step form of [`Received::parse_with`] that the
/// single pass is tested against.
#[cfg(test)]
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
                let (slot, weight) = decode_pick(e);
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

#[cfg(test)]
fn truncated(i: usize, k: usize) -> String {
    format!("row {i} pick {k}: metadata is truncated")
}

pub(crate) fn no_expert(i: usize, k: usize, slot: usize) -> String {
    format!("row {i} pick {k} is routed to slot {slot}, which holds no expert")
}

pub(crate) fn not_ours(i: usize, k: usize, slot: usize, first_slot: usize, spr: usize) -> String {
    format!(
        "row {i} pick {k} is routed to slot {slot}, which is not an expert slot of this rank \
         (slots {first_slot}..{})",
        first_slot + spr
    )
}

/// Received work organised as the kernels organise it (the reference form the GPU tables
/// are checked against): items sorted by local slot (stable), the slot boundaries, and per
/// received row the items that read it (a CSR list of item indices, ascending, with their
/// weights).
#[cfg(test)]
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

#[cfg(test)]
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
#[cfg(test)]
pub(crate) fn token_segments<T: AsRef<[u32]>>(sent: &[T], n: usize) -> (Vec<u32>, Vec<u32>) {
    let mut out = (Vec::new(), Vec::new());
    token_segments_into(&mut out, sent, n);
    out
}

/// [`token_segments`] into `out` (its buffers reused).
pub(crate) fn token_segments_into<T: AsRef<[u32]>>(
    out: &mut (Vec<u32>, Vec<u32>),
    sent: &[T],
    n: usize,
) {
    let (offsets, rows) = out;
    offsets.clear();
    offsets.resize(n + 1, 0);
    for tokens in sent {
        for &t in tokens.as_ref() {
            if let Some(c) = offsets.get_mut(t as usize + 1) {
                *c += 1;
            }
        }
    }
    for t in 1..offsets.len() {
        offsets[t] += offsets[t - 1];
    }
    rows.clear();
    rows.resize(offsets.last().copied().unwrap_or(0) as usize, 0);
    // Each token's next row, starting at its offset.
    let mut fill = offsets.clone();
    let mut back_row = 0u32;
    for tokens in sent {
        for &t in tokens.as_ref() {
            if let Some(pos) = fill.get_mut(t as usize) {
                if let Some(r) = rows.get_mut(*pos as usize) {
                    *r = back_row;
                }
                *pos += 1;
            }
            back_row += 1;
        }
    }
}

/// Segment lists of the final sum after a reduce-scatter: `size` blocks of `n` rows, token
/// `t` sums row `t` of every block in rank order.
#[cfg(test)]
pub(crate) fn strided_segments(size: usize, n: usize) -> (Vec<u32>, Vec<u32>) {
    let mut out = (Vec::new(), Vec::new());
    strided_segments_into(&mut out, size, n);
    out
}

/// [`strided_segments`] into `out` (its buffers reused).
pub(crate) fn strided_segments_into(out: &mut (Vec<u32>, Vec<u32>), size: usize, n: usize) {
    let (offsets, rows) = out;
    offsets.clear();
    offsets.extend((0..=n).map(|t| (t * size) as u32));
    rows.clear();
    rows.extend((0..n).flat_map(|t| (0..size).map(move |s| (s * n + t) as u32)));
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
    fn routing_matches_the_placement_pick_by_pick() {
        let mut rng = StdRng::seed_from_u64(0x00e0_a7e5);
        let mut slots = vec![7u32; 3]; // leftovers are replaced
        for case in 0..60 {
            let size = rng.gen_range(1..=4);
            let spr = rng.gen_range(1..=6);
            let p = random_placement(&mut rng, size, spr, false);
            let k = rng.gen_range(1..=8);
            let n = rng.gen_range(0..40);
            let me = rng.gen_range(0..size);
            let unknown = rng.gen_bool(0.3);
            let ids: Vec<u32> = (0..n * k)
                .map(|_| {
                    if unknown && rng.gen_bool(0.05) {
                        (p.num_logical() + rng.gen_range(0..3)) as u32
                    } else {
                        rng.gen_range(0..p.num_logical() as u32)
                    }
                })
                .collect();
            let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
            let mut expected = Vec::new();
            let mut first_unknown = None;
            for (i, &e) in ids.iter().enumerate() {
                match p.route(token_key(me, i / k), i % k, e as usize) {
                    Some(s) => expected.push(s as u32),
                    None => {
                        first_unknown = Some(UnknownPick {
                            token: i / k,
                            k: i % k,
                            expert: e,
                        });
                        break;
                    }
                }
            }
            let got = route_picks_into(&mut slots, &bytes, k, me, &p);
            match first_unknown {
                Some(u) => assert_eq!(got, Err(u), "case {case}"),
                None => {
                    assert_eq!(got, Ok(()), "case {case}");
                    assert_eq!(slots, expected, "case {case}");
                }
            }
        }
    }

    #[test]
    fn split_matches_its_straightforward_form_for_any_group_size() {
        let mut rng = StdRng::seed_from_u64(0x5b11_7000);
        // One set of buffers for every case: what an earlier split left must not leak.
        let mut out = Vec::new();
        for case in 0..80 {
            // Past 64 ranks the destinations are marked per token rather than masked.
            let size = *[1, 2, 3, 8, 63, 64, 65, 100]
                .get(rng.gen_range(0..8))
                .expect("size");
            let spr = rng.gen_range(1..=5);
            let k = rng.gen_range(1..=8);
            let n = rng.gen_range(0..40);
            // A few slots past the group's: such picks go nowhere.
            let slots: Vec<u32> = (0..n * k)
                .map(|_| rng.gen_range(0..(size * spr + 2) as u32))
                .collect();
            let weights: Vec<f32> = (0..n * k).map(|_| rng.gen::<f32>()).collect();
            split_by_destination_into(&mut out, &slots, &weights, k, spr, size);
            assert_eq!(
                out,
                reference_split(&slots, &weights, k, spr, size),
                "case {case}"
            );
        }
    }

    #[test]
    fn all_picks_are_written_in_pick_order() {
        let (slots, weights) = ([3u32, NO_PICK, 0], [0.5f32, 0.25, 2.0]);
        let mut out = vec![0xaau8; 3 * PICK_BYTES];
        write_all_picks(&mut out, &slots, &weights);
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

    #[test]
    fn segment_buffers_are_reused_without_leftovers() {
        let mut out = (vec![9u32; 20], vec![9u32; 20]);
        token_segments_into(&mut out, &[vec![1u32, 2], vec![0, 1]], 3);
        assert_eq!(out, token_segments(&[vec![1u32, 2], vec![0, 1]], 3));
        assert_eq!(out.0, [0, 1, 3, 4]);
        strided_segments_into(&mut out, 2, 2);
        assert_eq!(out, (vec![0, 2, 4], vec![0, 2, 1, 3]));
    }

    // ----- the GPU-built tables against the host forms above (need a GPU; skipped without) -----

    mod gpu {
        use std::sync::Arc;

        use cudarc::driver::{result, CudaContext, CudaSlice, CudaStream, DevicePtr};

        use super::super::super::cuda_tables::{malformed_entry, placement_tables};
        use super::super::super::table_kernels::{
            DevicePlacement, ItemLayout, SendLayout, TableKernels,
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
                let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
                let mut want_slots = Vec::new();
                let routed = route_picks_into(&mut want_slots, &id_bytes, k, me, &p);

                let (dev, _tables) = placement_on(&g, &p);
                let (d_ids, d_weights) = (up(&g, &ids), up(&g, &weights));
                let l = SendLayout::new(n, k, size).expect("layout");
                let buf = buffer(&g, l.len, l.err);
                let base = ptr(&buf, &g.stream);
                // SAFETY: buffers sized for the layout, all on this stream.
                unsafe {
                    g.kernels.route_and_split(
                        &g.stream,
                        &l,
                        base,
                        ptr(&d_ids, &g.stream),
                        ptr(&d_weights, &g.stream),
                        0,
                        me,
                        &dev,
                    )
                }
                .expect("launch");
                let bytes = g.stream.clone_dtoh(&buf).expect("download");
                let err = u64_at(&bytes, l.err);
                match routed {
                    Err(u) => {
                        failed_cases += 1;
                        let pick = (u.token * k + u.k) as u64;
                        assert_eq!(err, (pick << 32) | u64::from(u.expert), "case {case}");
                        continue;
                    }
                    Ok(()) => assert_eq!(err, u64::MAX, "case {case}"),
                }
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
