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
#[inline]
fn entry_slot(e: &[u8]) -> u32 {
    u32::from_le_bytes(word(e))
}

/// The weight of one 8-byte pick entry.
#[inline]
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

fn truncated(i: usize, k: usize) -> String {
    format!("row {i} pick {k}: metadata is truncated")
}

fn no_expert(i: usize, k: usize, slot: usize) -> String {
    format!("row {i} pick {k} is routed to slot {slot}, which holds no expert")
}

fn not_ours(i: usize, k: usize, slot: usize, first_slot: usize, spr: usize) -> String {
    format!(
        "row {i} pick {k} is routed to slot {slot}, which is not an expert slot of this rank \
         (slots {first_slot}..{})",
        first_slot + spr
    )
}

/// Sorts a row's few `(position, weight)` pairs by position.
#[inline]
fn sort_row(row: &mut [(u32, f32)]) {
    for i in 1..row.len() {
        let mut j = i;
        while j > 0 {
            match (row.get(j - 1), row.get(j)) {
                (Some(a), Some(b)) if a.0 > b.0 => row.swap(j - 1, j),
                _ => break,
            }
            j -= 1;
        }
    }
}

/// Spare bins of [`Received::parse_with`]'s first pass.
const SPARE_BINS: usize = 8;

/// Most 64-bit words of a row's slot mask in [`Received::parse_with`] (4096 slots per
/// rank); more slots take the sorting path.
const MASK_WORDS: usize = 64;

/// The row lists being written, row after row.
struct RowLists<'a> {
    offsets: &'a mut [u32],
    items: &'a mut [u32],
    weights: &'a mut [f32],
    written: usize,
}

impl RowLists<'_> {
    /// Appends an item (its sorted position and weight) to the current row's list.
    #[inline]
    fn push(&mut self, pos: u32, weight: f32) {
        if let (Some(i), Some(w)) = (
            self.items.get_mut(self.written),
            self.weights.get_mut(self.written),
        ) {
            *i = pos;
            *w = weight;
        }
        self.written += 1;
    }

    /// Ends row `r`'s list.
    #[inline]
    fn end_row(&mut self, r: usize) {
        if let Some(o) = self.offsets.get_mut(r + 1) {
            *o = self.written as u32;
        }
    }
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

/// Buffers [`Received::parse_with`] works in, kept between calls: its own, and the row
/// tables of an earlier result (see [`keep_tables`](Self::keep_tables)).
#[derive(Debug, Default)]
pub(crate) struct ParseScratch {
    /// Logical expert of each of this rank's slots.
    logical: Vec<Option<usize>>,
    /// Per slot + 1: the entry needs no closer look (see `parse_with`).
    plain: Vec<bool>,
    /// Next sorted position of each local slot.
    next: Vec<usize>,
    /// `(row, weight)` of every item at its sorted position.
    records: Vec<(u32, f32)>,
    /// The current row's weight per local slot, and a spare one.
    slot_weight: Vec<f32>,
    /// The current row's local slots, a bit each.
    mask: Vec<u64>,
    /// The current row's items: `(sorted position, weight)`.
    row: Vec<(u32, f32)>,
    row_offsets: Vec<u32>,
    row_items: Vec<u32>,
    row_weights: Vec<f32>,
    item_rows: Vec<u32>,
}

impl ParseScratch {
    /// Keeps the row tables of `received` (after they are used) for the next parse.
    pub(crate) fn keep_tables(&mut self, received: Received) {
        self.row_offsets = received.row_offsets;
        self.row_items = received.row_items;
        self.row_weights = received.row_weights;
        self.item_rows = received.item_rows;
    }
}

impl Received {
    /// [`Received::parse_with`] with buffers of its own.
    #[cfg(test)]
    pub(crate) fn parse(
        meta: &[u8],
        rows: &[usize],
        top_k: usize,
        placement: &ExpertPlacement,
        me: usize,
        foreign: Foreign,
    ) -> Result<Self, (usize, String)> {
        Self::parse_with(
            &mut ParseScratch::default(),
            meta,
            rows,
            top_k,
            placement,
            me,
            foreign,
        )
    }

    /// The work items in the pick metadata received from every rank (`rows[s]` rows from
    /// group rank `s`, their metadata consecutive in `meta` in rank order, `top_k` entries
    /// per row), organised for the kernels; items of one local slot keep their receive
    /// order (source rank, row, pick). On a malformed entry (the first in receive order),
    /// returns the source rank and what is wrong. Row indices are `u32` in the tables: the
    /// caller keeps the row count below 2^32.
    ///
    /// A counting sort in three passes, with `scratch`'s buffers: the first checks every
    /// entry and counts each local slot's items; the second places each item's row and
    /// weight at its sorted position and writes each row's list (rows arrive in order; a
    /// row's items, in position order, are its picks in slot order, which a bit mask of
    /// the row's slots gives without sorting); the third expands the items slot by slot.
    /// Entries of other ranks are counted in spare bins and masked out rather than
    /// branched over: whether an entry is this rank's is a coin toss the branch predictor
    /// cannot learn.
    pub(crate) fn parse_with(
        scratch: &mut ParseScratch,
        meta: &[u8],
        rows: &[usize],
        top_k: usize,
        placement: &ExpertPlacement,
        me: usize,
        foreign: Foreign,
    ) -> Result<Self, (usize, String)> {
        let spr = placement.slots_per_rank();
        let num_physical = placement.num_physical();
        let first_slot = me.saturating_mul(spr);
        // This rank's slots are `first_slot..first_slot + spr`: `slot - first_slot`
        // (wrapping) is below `spr` exactly for them.
        let local = |slot: u32| (slot as usize).wrapping_sub(first_slot);
        let logical = &mut scratch.logical;
        logical.clear();
        logical.extend((0..spr).map(|ls| placement.logical_of(first_slot + ls)));
        // `plain[slot + 1]`: an entry to take as it is: a slot with an expert, this rank's
        // unless foreign picks are skipped; `plain[0]` is `NO_PICK` (wrapped to 0), the
        // last entry any slot past the placement's.
        let plain = &mut scratch.plain;
        plain.clear();
        plain.push(true);
        plain.extend((0..num_physical).map(|s| {
            placement.logical_of(s).is_some() && (foreign == Foreign::Skip || local(s as u32) < spr)
        }));
        plain.push(false);
        let plain: &[bool] = plain;
        let is_plain = |slot: u32| {
            let at = (slot.wrapping_add(1) as usize).min(num_physical + 1);
            plain.get(at).copied().unwrap_or(false)
        };
        let row_bytes = top_k * PICK_BYTES;

        // Pass 1: check every entry, count each local slot's items (`counts[ls + 1]`). The
        // other entries are counted in `SPARE_BINS` spare bins past them, by pick index,
        // so that consecutive ones do not wait for each other's count.
        let mut counts = vec![0usize; spr + 1 + SPARE_BINS];
        let mut rest = meta;
        for (src, &count) in rows.iter().enumerate() {
            for i in 0..count {
                let (row, tail) = rest.split_at(row_bytes.min(rest.len()));
                rest = tail;
                for (k, e) in row.chunks_exact(PICK_BYTES).enumerate() {
                    let slot = entry_slot(e);
                    let ls = local(slot);
                    let bin = if ls < spr { ls } else { spr + k % SPARE_BINS };
                    if let Some(c) = counts.get_mut(bin + 1) {
                        *c += 1;
                    }
                    if !is_plain(slot) {
                        let slot = slot as usize;
                        if placement.logical_of(slot).is_none() {
                            return Err((src, no_expert(i, k, slot)));
                        }
                        if foreign == Foreign::Reject {
                            return Err((src, not_ours(i, k, slot, first_slot, spr)));
                        }
                    }
                }
                if row.len() < row_bytes {
                    return Err((src, truncated(i, row.len() / PICK_BYTES)));
                }
            }
        }
        let mut slot_offsets = counts;
        slot_offsets.truncate(spr + 1);
        for s in 1..slot_offsets.len() {
            slot_offsets[s] += slot_offsets[s - 1];
        }
        let total = slot_offsets.last().copied().unwrap_or(0);
        // Every row's entries are there (pass 1 returned otherwise).
        let num_rows = rows.iter().fold(0usize, |sum, &r| sum.saturating_add(r));

        // Pass 2: each item's row and weight at its sorted position, each row's list.
        let next = &mut scratch.next;
        next.clear();
        next.extend(slot_offsets.iter().take(spr));
        let next: &mut [usize] = next;
        let records = &mut scratch.records;
        records.clear();
        records.resize(total, (0, 0.0));
        let records: &mut [(u32, f32)] = records;
        let mut row_offsets = std::mem::take(&mut scratch.row_offsets);
        let mut row_items = std::mem::take(&mut scratch.row_items);
        let mut row_weights = std::mem::take(&mut scratch.row_weights);
        row_offsets.clear();
        row_offsets.resize(num_rows.saturating_add(1), 0);
        row_items.clear();
        row_items.resize(total, 0);
        row_weights.clear();
        row_weights.resize(total, 0.0);
        let mut lists = RowLists {
            offsets: &mut row_offsets,
            items: &mut row_items,
            weights: &mut row_weights,
            written: 0,
        };
        // The weight of the current row's pick in each local slot (and a spare one).
        let slot_weight = &mut scratch.slot_weight;
        slot_weight.clear();
        slot_weight.resize(spr + 1, 0.0);
        let slot_weight: &mut [f32] = slot_weight;
        let row = &mut scratch.row;
        // A bit per local slot.
        let words = spr.div_ceil(64);
        let use_mask = words <= MASK_WORDS;
        let mask = &mut scratch.mask;
        mask.clear();
        mask.resize(words, 0);
        let mask: &mut [u64] = mask;
        for (r, entries) in meta
            .chunks_exact(row_bytes.max(1))
            .take(num_rows)
            .enumerate()
        {
            // A row's items, in sorted-position order, are its picks in local-slot order:
            // unless the row picks a slot twice, the bits of a mask of its slots give that
            // order without sorting.
            let mut mine_count = 0u32;
            if spr <= 128 {
                // The mask in a register.
                let mut bits = 0u128;
                for e in entries.chunks_exact(PICK_BYTES) {
                    let ls = local(entry_slot(e));
                    let mine = ls < spr;
                    bits |= u128::from(mine) << (ls % 128);
                    if let Some(w) = slot_weight.get_mut(if mine { ls } else { spr }) {
                        *w = entry_weight(e);
                    }
                    mine_count += u32::from(mine);
                }
                for (word, half) in mask.iter_mut().zip([bits as u64, (bits >> 64) as u64]) {
                    *word = half;
                }
            } else if use_mask {
                mask.fill(0);
                for e in entries.chunks_exact(PICK_BYTES) {
                    let ls = local(entry_slot(e));
                    let mine = ls < spr;
                    if let Some(word) = mask.get_mut(if mine { ls / 64 } else { 0 }) {
                        *word |= u64::from(mine) << (ls % 64);
                    }
                    if let Some(w) = slot_weight.get_mut(if mine { ls } else { spr }) {
                        *w = entry_weight(e);
                    }
                    mine_count += u32::from(mine);
                }
            }
            let distinct = mask.iter().map(|w| w.count_ones()).sum::<u32>() == mine_count;
            if use_mask && distinct {
                for (base, word) in (0..).step_by(64).zip(mask.iter()) {
                    let mut bits = *word;
                    while bits != 0 {
                        let ls = base + bits.trailing_zeros() as usize;
                        bits &= bits - 1;
                        let (Some(at), Some(&weight)) = (next.get_mut(ls), slot_weight.get(ls))
                        else {
                            continue;
                        };
                        let pos = *at;
                        *at += 1;
                        if let Some(rec) = records.get_mut(pos) {
                            *rec = (r as u32, weight);
                        }
                        lists.push(pos as u32, weight);
                    }
                }
            } else {
                // Any slot count, and rows that pick a slot twice: place the picks in pick
                // order, then sort the row's few positions.
                row.clear();
                for e in entries.chunks_exact(PICK_BYTES) {
                    let ls = local(entry_slot(e));
                    let Some(at) = next.get_mut(ls).filter(|_| ls < spr) else {
                        continue;
                    };
                    let (pos, weight) = (*at, entry_weight(e));
                    *at += 1;
                    if let Some(rec) = records.get_mut(pos) {
                        *rec = (r as u32, weight);
                    }
                    row.push((pos as u32, weight));
                }
                sort_row(row);
                for &(pos, weight) in row.iter() {
                    lists.push(pos, weight);
                }
            }
            lists.end_row(r);
        }

        // Pass 3: the items and their rows, slot by slot.
        let mut item_rows = std::mem::take(&mut scratch.item_rows);
        item_rows.clear();
        item_rows.reserve(total);
        let mut items = Vec::with_capacity(total);
        for (ls, l) in logical.iter().enumerate() {
            let (Some(&lo), Some(&hi)) = (slot_offsets.get(ls), slot_offsets.get(ls + 1)) else {
                continue;
            };
            let Some(recs) = records.get(lo..hi) else {
                continue;
            };
            let logical = l.unwrap_or(0);
            item_rows.extend(recs.iter().map(|&(row, _)| row));
            items.extend(recs.iter().map(|&(row, weight)| ExpertWork {
                row: row as usize,
                slot: first_slot + ls,
                local_slot: ls,
                logical,
                weight,
            }));
        }
        Ok(Self {
            items,
            slot_offsets,
            row_offsets,
            row_items,
            row_weights,
            item_rows,
        })
    }

    /// Sorts `items` (receive order) by local slot, stably, and builds the row lists for
    /// `num_rows` received rows and `slots_per_rank` slots.
    ///
    /// With [`parse_received`], the two-step form of [`Received::parse_with`] that the
    /// single pass is tested against.
    #[cfg(test)]
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
    fn one_pass_parse_matches_parse_then_organize() {
        let mut rng = StdRng::seed_from_u64(0x0ae5_0001);
        // One scratch for every case: what an earlier parse left must not leak.
        let mut scratch = ParseScratch::default();
        let mut ok = 0;
        for case in 0..400 {
            let size = rng.gen_range(1..=3);
            // Up to 64 slots fit one mask word; 4096 is the most a mask covers.
            let spr = *[1, 2, 5, 63, 64, 65, 130, 4097]
                .get(rng.gen_range(0..8))
                .expect("spr");
            let bad = rng.gen_bool(0.3);
            let p = random_placement(&mut rng, size, spr, bad);
            let k = rng.gen_range(1..=8);
            let me = rng.gen_range(0..size);
            let rows: Vec<usize> = (0..size).map(|_| rng.gen_range(0..12)).collect();
            let mut meta = random_meta(&mut rng, &p, me, &rows, k, bad);
            if bad && rng.gen_bool(0.3) {
                meta.truncate(rng.gen_range(0..=meta.len()));
            }
            let foreign = if rng.gen_bool(0.5) {
                Foreign::Reject
            } else {
                Foreign::Skip
            };
            let num_rows = rows.iter().sum();
            let expected = parse_received(&meta, &rows, k, &p, me, foreign)
                .map(|items| Received::organize(items, num_rows, spr));
            let got = Received::parse_with(&mut scratch, &meta, &rows, k, &p, me, foreign);
            assert_eq!(got, expected, "case {case}");
            if let Ok(r) = got {
                ok += 1;
                scratch.keep_tables(r);
            }
        }
        // Both outcomes were exercised.
        assert!((50..400).contains(&ok), "{ok} cases parsed");
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
}
