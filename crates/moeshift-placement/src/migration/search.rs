//! The greedy search of the migration-aware policy (see the parent module for the algorithm).

use super::MigrationOptions;
use crate::placement::{balancedness_of, rank_load, rank_loads_of_row, Layout};
use crate::preserve::{preserve_row, PreserveScratch};

/// What the search did with one layer.
pub(super) struct LayerOutcome {
    pub(super) moved: usize,
    pub(super) cross_node: usize,
    pub(super) balancedness: f64,
    pub(super) old_balancedness: f64,
    pub(super) fresh_balancedness: f64,
    pub(super) used_fresh: bool,
}

#[derive(Debug, Clone, Copy)]
enum Move {
    /// Exchange the experts of two slots on different ranks.
    Swap { i: usize, j: usize },
    /// Put a replica of `expert` into `slot`, dropping one replica of the slot's expert.
    Replace { slot: usize, expert: usize },
}

/// The best candidate so far: ordered by `(free, value)`, the first one found wins ties.
#[derive(Debug, Clone, Copy)]
struct Best {
    /// The move adds no cost.
    free: bool,
    /// Excess reduction, per unit of added cost unless `free`.
    value: f64,
    mv: Move,
    dmoves: isize,
}

/// Collects candidates and keeps the best admissible one.
struct Picker {
    best: Option<Best>,
    /// Gains at or below this are rounding noise.
    min_gain: f64,
    /// Moves left in the budget.
    room: isize,
}

impl Picker {
    /// Whether a candidate gaining at most `bound` at added cost `dcost` could be taken.
    #[inline]
    fn could_win(&self, bound: f64, dcost: f64) -> bool {
        if bound <= self.min_gain {
            return false;
        }
        match &self.best {
            None => true,
            Some(b) if dcost <= FREE => !b.free || bound > b.value,
            Some(b) => !b.free && bound / dcost > b.value,
        }
    }

    #[inline]
    fn offer(&mut self, gain: f64, dcost: f64, dmoves: isize, mv: Move) {
        if gain <= self.min_gain || dmoves > self.room {
            return;
        }
        let free = dcost <= FREE;
        let value = if free { gain } else { gain / dcost };
        let better = match &self.best {
            None => true,
            Some(b) => (free, value) > (b.free, b.value),
        };
        if better {
            self.best = Some(Best {
                free,
                value,
                mv,
                dmoves,
            });
        }
    }
}

/// Added costs at or below this count as free.
const FREE: f64 = 1e-12;

/// What the scans of one step share.
#[derive(Debug, Clone, Copy)]
struct Step {
    /// The most loaded rank.
    top: usize,
    /// Its load.
    m: f64,
    /// Ranks whose load rises, and the top rank, must end strictly below this.
    limit: f64,
    /// Load above which a rank has excess.
    threshold: f64,
    /// Excess of the top rank.
    exc_top: f64,
}

impl Step {
    #[inline]
    fn excess(&self, load: f64) -> f64 {
        (load - self.threshold).max(0.0)
    }
}

/// A slot off the top rank whose expert has other replicas, with the parts of "replace its
/// replica by one of another expert" that do not depend on the other expert.
#[derive(Debug, Clone, Copy)]
struct Spare {
    slot: usize,
    expert: usize,
    rank: usize,
    load: f64,
    exc: f64,
    /// Load of the rank once the replica is removed.
    base: f64,
    /// Excess change on the expert's other ranks (≤ 0).
    rm_gain: f64,
    /// Those ranks stay below the limit.
    ok: bool,
    cost_a: f64,
    moved_a: isize,
}

/// State of the search for one layer; buffers are reused across layers.
pub(super) struct Search {
    n: usize,
    ranks: usize,
    spr: usize,
    ranks_per_node: usize,
    tolerance: f64,
    max_moves: usize,
    intra_cost: f64,
    cross_cost: f64,
    /// Loads of the layer, `f64`.
    w: Vec<f64>,
    /// Current expert of every slot.
    slot: Vec<usize>,
    /// Expert of every slot in the old placement.
    old_slot: Vec<usize>,
    /// Rank of every slot.
    rank_of: Vec<usize>,
    /// Current replica count of every expert.
    cnt: Vec<usize>,
    /// Current load per replica of every expert, and with one more replica.
    q: Vec<f64>,
    q_up: Vec<f64>,
    /// Current per-rank load.
    load: Vec<f64>,
    /// `R × N`: replicas of expert `e` on rank `r` now.
    on_rank: Vec<u32>,
    /// `R × N`: rank `r` held expert `e` in the old placement.
    old_has: Vec<bool>,
    /// `nodes × N`: some rank of the node held expert `e` in the old placement.
    node_has: Vec<bool>,
    /// `R × N`: cost of a replica of `e` on rank `r` (0, intra-node or cross-node cost),
    /// filled when a layer needs a search.
    cost_tab: Vec<f64>,
    /// `N + 1` offsets into `by_slot`.
    by_off: Vec<usize>,
    /// Slots of each expert, ascending (so ranks ascending).
    by_slot: Vec<usize>,
    cursor: Vec<usize>,
    /// Experts by ascending `(q_up, index)`.
    order: Vec<usize>,
    /// Per expert: excess reduction on its ranks when it gets one more replica.
    add_gain: Vec<f64>,
    /// Experts with a replica on a rank over the threshold (the only ones with `add_gain`).
    hot: Vec<usize>,
    /// Per slot whose expert has ≥ 2 replicas: change of its rank when the replica is
    /// removed, excess change on the expert's other ranks, highest load reached there.
    rm_base: Vec<f64>,
    rm_gain: Vec<f64>,
    rm_max: Vec<f64>,
    spares: Vec<Spare>,
    /// Per slot, for swaps with the top rank: cost of its expert on the top rank minus on its
    /// own rank.
    swap_cost: Vec<f64>,
    /// Per rank: lowest `swap_cost` and lowest load per replica of its slots.
    rank_min_cost: Vec<f64>,
    rank_min_q: Vec<f64>,
    /// Ranks under the threshold other than the top rank.
    cool: Vec<usize>,
    /// Markers: an entry equal to `stamp` is marked in the current pass.
    expert_mark: Vec<u32>,
    rank_mark: Vec<u32>,
    stamp: u32,
    scratch_load: Vec<f64>,
    fresh_cnt: Vec<usize>,
    keep: PreserveScratch,
}

impl Search {
    pub(super) fn new(layout: Layout, nodes: usize, options: &MigrationOptions) -> Self {
        let (n, ranks, p, spr) = (
            layout.num_logical(),
            layout.num_ranks(),
            layout.num_physical(),
            layout.slots_per_rank(),
        );
        let nodes = nodes.max(1);
        Self {
            n,
            ranks,
            spr,
            ranks_per_node: ranks / nodes,
            tolerance: options.tolerance,
            max_moves: options.max_moves.unwrap_or(usize::MAX),
            intra_cost: options.intra_node_cost,
            cross_cost: options.cross_node_cost,
            w: Vec::with_capacity(n),
            slot: Vec::with_capacity(p),
            old_slot: Vec::with_capacity(p),
            rank_of: (0..p).map(|s| s / spr).collect(),
            cnt: vec![0; n],
            q: vec![0.0; n],
            q_up: vec![0.0; n],
            load: vec![0.0; ranks],
            on_rank: vec![0; ranks * n],
            old_has: vec![false; ranks * n],
            node_has: vec![false; nodes * n],
            cost_tab: vec![0.0; ranks * n],
            by_off: vec![0; n + 1],
            by_slot: vec![0; p],
            cursor: Vec::with_capacity(n),
            order: Vec::with_capacity(n),
            add_gain: vec![0.0; n],
            hot: Vec::with_capacity(p),
            rm_base: vec![0.0; p],
            rm_gain: vec![0.0; p],
            rm_max: vec![0.0; p],
            spares: Vec::with_capacity(p),
            swap_cost: vec![0.0; p],
            rank_min_cost: vec![0.0; ranks],
            rank_min_q: vec![0.0; ranks],
            cool: Vec::with_capacity(ranks),
            expert_mark: vec![0; n],
            rank_mark: vec![0; ranks],
            stamp: 0,
            scratch_load: vec![0.0; ranks],
            fresh_cnt: vec![0; n],
            keep: PreserveScratch::default(),
        }
    }

    #[inline]
    fn cost(&self, r: usize, e: usize) -> f64 {
        self.cost_tab[r * self.n + e]
    }

    /// 1 when a replica of `e` on rank `r` counts as moved.
    #[inline]
    fn moved_at(&self, r: usize, e: usize) -> isize {
        isize::from(self.cost_tab[r * self.n + e] > 0.0)
    }

    /// Cost class of a replica of `e` on rank `r`: 0 free, 1 intra-node, 2 cross-node.
    #[inline]
    fn class(&self, r: usize, e: usize) -> usize {
        let c = self.cost_tab[r * self.n + e];
        if c == 0.0 {
            0
        } else if c == self.intra_cost {
            1
        } else {
            2
        }
    }

    fn slots_of(&self, e: usize) -> &[usize] {
        &self.by_slot[self.by_off[e]..self.by_off[e + 1]]
    }

    /// A fresh marker value for `expert_mark` / `rank_mark`.
    fn next_stamp(&mut self) -> u32 {
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.expert_mark.fill(0);
            self.rank_mark.fill(0);
            self.stamp = 1;
        }
        self.stamp
    }

    /// Rebuilds the slot lists of every expert from `slot` and `cnt`.
    fn rebuild_lists(&mut self) {
        let n = self.n;
        self.by_off[0] = 0;
        for e in 0..n {
            self.by_off[e + 1] = self.by_off[e] + self.cnt[e];
        }
        // Fill each list from its end, visiting slots backwards, so it ends up ascending.
        self.cursor.clear();
        self.cursor.extend_from_slice(&self.by_off[1..]);
        for s in (0..self.slot.len()).rev() {
            let e = self.slot[s];
            self.cursor[e] -= 1;
            self.by_slot[self.cursor[e]] = s;
        }
    }

    /// Sets up the state of a layer from its old row.
    fn start_layer(&mut self, w32: &[f32], old_row: &[usize]) {
        let (n, spr, rpn) = (self.n, self.spr, self.ranks_per_node);
        self.w.clear();
        self.w.extend(w32.iter().map(|&x| f64::from(x)));
        self.slot.clear();
        self.slot.extend_from_slice(old_row);
        self.old_slot.clear();
        self.old_slot.extend_from_slice(old_row);
        self.cnt.fill(0);
        for (s, &e) in old_row.iter().enumerate() {
            let r = s / spr;
            self.cnt[e] += 1;
            self.on_rank[r * n + e] += 1;
            self.old_has[r * n + e] = true;
            self.node_has[(r / rpn) * n + e] = true;
        }
        for e in 0..n {
            self.q[e] = self.w[e] / self.cnt[e] as f64;
            self.q_up[e] = self.w[e] / (self.cnt[e] + 1) as f64;
        }
        rank_loads_of_row(&self.slot, &self.cnt, w32, spr, &mut self.load);
        self.rebuild_lists();
        self.order.clear();
        self.order.extend(0..n);
        // Non-negative values: bit patterns order like the values.
        let q_up = &self.q_up;
        self.order.sort_unstable_by_key(|&e| (q_up[e].to_bits(), e));
    }

    /// Fills `cost_tab` from the old placement of the layer.
    fn fill_costs(&mut self, old_row: &[usize]) {
        let (n, spr, rpn) = (self.n, self.spr, self.ranks_per_node);
        self.cost_tab.fill(self.cross_cost);
        for (s, &e) in old_row.iter().enumerate() {
            let node = s / spr / rpn;
            for r in node * rpn..(node + 1) * rpn {
                self.cost_tab[r * n + e] = self.intra_cost;
            }
        }
        for (s, &e) in old_row.iter().enumerate() {
            self.cost_tab[(s / spr) * n + e] = 0.0;
        }
    }

    /// Plans one layer: `w32` its loads, `old_row` and `fresh_row` the old placement and the
    /// fresh DeepSeek plan, `fresh_moves` the latter's moves; writes the new row into `out`.
    pub(super) fn run_layer(
        &mut self,
        w32: &[f32],
        old_row: &[usize],
        fresh_row: &[usize],
        fresh_moves: usize,
        out: &mut [usize],
    ) -> LayerOutcome {
        let (n, spr, rpn) = (self.n, self.spr, self.ranks_per_node);
        self.start_layer(w32, old_row);
        let old_bal = balancedness_of(&self.load);

        // The fresh plan's balancedness sets the target.
        self.fresh_cnt.fill(0);
        for &e in fresh_row {
            self.fresh_cnt[e] += 1;
        }
        rank_loads_of_row(fresh_row, &self.fresh_cnt, w32, spr, &mut self.scratch_load);
        let fresh_bal = balancedness_of(&self.scratch_load);
        let target = fresh_bal - self.tolerance;

        let mut used_fresh = false;
        if old_bal >= target {
            out.copy_from_slice(old_row);
        } else {
            self.fill_costs(old_row);
            self.search(w32, target, self.max_moves.min(fresh_moves));
            let bal = balancedness_of(&self.load);
            if bal < target && fresh_moves <= self.max_moves {
                out.copy_from_slice(fresh_row);
                used_fresh = true;
            } else if bal < old_bal {
                // Not expected (no move raises the maximum), but never end below the old
                // placement.
                out.copy_from_slice(old_row);
            } else {
                out.copy_from_slice(&self.slot);
                preserve_row(out, old_row, spr, &mut self.keep);
            }
        }

        // Final figures, from the output row.
        let (mut moved, mut cross_node) = (0, 0);
        self.cnt.fill(0);
        for (s, &e) in out.iter().enumerate() {
            let r = s / spr;
            self.cnt[e] += 1;
            if !self.old_has[r * n + e] {
                moved += 1;
                if !self.node_has[(r / rpn) * n + e] {
                    cross_node += 1;
                }
            }
        }
        rank_loads_of_row(out, &self.cnt, w32, spr, &mut self.scratch_load);
        let balancedness = balancedness_of(&self.scratch_load);

        // Reset the R × N tables through the entries that were set.
        for (s, (&now, &was)) in self.slot.iter().zip(old_row).enumerate() {
            let r = s / spr;
            self.on_rank[r * n + now] = 0;
            self.old_has[r * n + was] = false;
            self.node_has[(r / rpn) * n + was] = false;
        }
        LayerOutcome {
            moved,
            cross_node,
            balancedness,
            old_balancedness: old_bal,
            fresh_balancedness: fresh_bal,
            used_fresh,
        }
    }

    /// Greedy improvement from the current state until `target` is reached.
    fn search(&mut self, w32: &[f32], target: f64, cap: usize) {
        let mean = self.load.iter().sum::<f64>() / self.ranks as f64;
        if target <= 0.0 || mean <= 0.0 {
            return;
        }
        let threshold = mean / target;
        let mut moved: usize = 0;
        for _ in 0..4 * self.slot.len() + 16 {
            if balancedness_of(&self.load) >= target {
                break;
            }
            let Some(best) = self.best_move(threshold, moved, cap) else {
                break;
            };
            let removed = self.apply(best.mv);
            moved = moved.saturating_add_signed(best.dmoves);
            self.refresh(w32, best.mv, removed);
        }
    }

    /// Applies a move to the slots and counts; returns the expert that lost a replica (for a
    /// swap, the expert that left the first slot).
    fn apply(&mut self, mv: Move) -> usize {
        let n = self.n;
        match mv {
            Move::Swap { i, j } => {
                let (a, b) = (self.slot[i], self.slot[j]);
                let (ri, rj) = (self.rank_of[i], self.rank_of[j]);
                self.slot.swap(i, j);
                self.on_rank[ri * n + a] -= 1;
                self.on_rank[ri * n + b] += 1;
                self.on_rank[rj * n + b] -= 1;
                self.on_rank[rj * n + a] += 1;
                a
            }
            Move::Replace { slot, expert } => {
                let a = self.slot[slot];
                let r = self.rank_of[slot];
                self.slot[slot] = expert;
                self.cnt[a] -= 1;
                self.cnt[expert] += 1;
                self.on_rank[r * n + a] -= 1;
                self.on_rank[r * n + expert] += 1;
                a
            }
        }
    }

    /// Updates the state after `mv`: the slot lists, the per-replica loads and order of the
    /// experts whose count changed, and the loads of the ranks that changed (summed exactly as
    /// a full recomputation would).
    fn refresh(&mut self, w32: &[f32], mv: Move, removed: usize) {
        let spr = self.spr;
        match mv {
            // Counts are unchanged: in each of the two lists one slot replaces the other.
            Move::Swap { i, j } => {
                for (e, from, to) in [(removed, i, j), (self.slot[i], j, i)] {
                    let list = &mut self.by_slot[self.by_off[e]..self.by_off[e + 1]];
                    if let Some(x) = list.iter_mut().find(|x| **x == from) {
                        *x = to;
                    }
                    list.sort_unstable();
                }
            }
            Move::Replace { .. } => self.rebuild_lists(),
        }
        let stamp = self.next_stamp();
        let redo = |r: usize, this: &mut Self| {
            if this.rank_mark[r] != stamp {
                this.rank_mark[r] = stamp;
                this.load[r] = rank_load(&this.slot[r * spr..(r + 1) * spr], &this.cnt, w32);
            }
        };
        match mv {
            Move::Swap { i, j } => {
                redo(self.rank_of[i], self);
                redo(self.rank_of[j], self);
            }
            Move::Replace { slot, expert } => {
                for e in [removed, expert] {
                    if let Some(pos) = self.order.iter().position(|&x| x == e) {
                        self.order.remove(pos);
                    }
                    self.q[e] = self.w[e] / self.cnt[e] as f64;
                    self.q_up[e] = self.w[e] / (self.cnt[e] + 1) as f64;
                    let (q_up, key) = (&self.q_up, self.q_up[e]);
                    let pos = self
                        .order
                        .partition_point(|&x| q_up[x] < key || (q_up[x] == key && x < e));
                    self.order.insert(pos, e);
                }
                redo(self.rank_of[slot], self);
                for e in [removed, expert] {
                    for k in self.by_off[e]..self.by_off[e + 1] {
                        redo(self.rank_of[self.by_slot[k]], self);
                    }
                }
            }
        }
    }

    /// The best admissible move touching the most loaded rank.
    fn best_move(&mut self, threshold: f64, moved: usize, cap: usize) -> Option<Best> {
        let mut top = 0;
        for r in 1..self.ranks {
            if self.load[r] > self.load[top] {
                top = r;
            }
        }
        let m = self.load[top];
        let step = Step {
            top,
            m,
            // A relative margin keeps rounding from letting the maximum creep up.
            limit: m - m * 1e-12,
            threshold,
            exc_top: (m - threshold).max(0.0),
        };
        let mut pick = Picker {
            best: None,
            min_gain: m * 1e-12,
            room: cap.saturating_sub(moved).min(isize::MAX as usize) as isize,
        };
        self.scan_swaps(&step, &mut pick);
        self.prepare_replace(&step);
        self.scan_replace_on_top(&step, &mut pick);
        self.scan_replicate_top(&step, &mut pick);
        pick.best
    }

    /// Swaps between the top rank and the ranks under the threshold (a swap with a rank at or
    /// over it cannot reduce the excess).
    ///
    /// With a rank at load `l2` whose lightest replica weighs `q_min`, swapping out a replica
    /// of load `qa` gains at most `min(excess of top, threshold − l2, qa − q_min)`; this bound
    /// and the rank's cheapest slot prune ranks that cannot beat the best candidate.
    fn scan_swaps(&mut self, step: &Step, pick: &mut Picker) {
        let (n, spr, top) = (self.n, self.spr, step.top);
        let mut cool = std::mem::take(&mut self.cool);
        cool.clear();
        let top_costs = &self.cost_tab[top * n..(top + 1) * n];
        for r in 0..self.ranks {
            let l = self.load[r];
            if r == top || l >= step.threshold || l >= step.limit {
                continue;
            }
            cool.push(r);
            let costs = &self.cost_tab[r * n..(r + 1) * n];
            let slots = &self.slot[r * spr..(r + 1) * spr];
            let swap_cost = &mut self.swap_cost[r * spr..(r + 1) * spr];
            let mut min_cost = f64::INFINITY;
            let mut min_q = f64::INFINITY;
            for (&b, c_out) in slots.iter().zip(swap_cost) {
                let c = top_costs[b] - costs[b];
                *c_out = c;
                min_cost = min_cost.min(c);
                min_q = min_q.min(self.q[b]);
            }
            self.rank_min_cost[r] = min_cost;
            self.rank_min_q[r] = min_q;
        }
        // Most headroom first, so that good candidates come early and prune the rest. Loads
        // are non-negative, so their bit patterns order like the values.
        let load = &self.load;
        cool.sort_unstable_by_key(|&r| (load[r].to_bits(), r));
        for i in top * spr..(top + 1) * spr {
            let a = self.slot[i];
            let qa = self.q[a];
            let (top_a_cost, top_a_moved) = (self.cost(top, a), self.moved_at(top, a));
            for &r2 in &cool {
                let l2 = self.load[r2];
                let a_cost = self.cost(r2, a) - top_a_cost;
                let bound = step
                    .exc_top
                    .min(step.threshold - l2)
                    .min(qa - self.rank_min_q[r2]);
                if !pick.could_win(bound, self.rank_min_cost[r2] + a_cost) {
                    continue;
                }
                let room = step.limit - l2;
                for j in r2 * spr..(r2 + 1) * spr {
                    let dcost = self.swap_cost[j] + a_cost;
                    if !pick.could_win(bound, dcost) {
                        continue;
                    }
                    let b = self.slot[j];
                    let d = qa - self.q[b];
                    if d <= 0.0 || d >= room || b == a {
                        continue;
                    }
                    let gain = step.exc_top - step.excess(step.m - d) - step.excess(l2 + d);
                    let dmoves = self.moved_at(top, b) + self.moved_at(r2, a)
                        - top_a_moved
                        - self.moved_at(r2, b);
                    pick.offer(gain, dcost, dmoves, Move::Swap { i, j });
                }
            }
        }
        self.cool = cool;
    }

    /// Precomputes the parts of replace moves that depend on one side only: per expert the
    /// effect of one more replica on the ranks over the threshold, per slot whose expert has
    /// at least two replicas the effect of removing it.
    fn prepare_replace(&mut self, step: &Step) {
        let (n, spr) = (self.n, self.spr);
        // Only ranks over the threshold have excess to lose.
        for &e in &self.hot {
            self.add_gain[e] = 0.0;
        }
        self.hot.clear();
        let stamp = self.next_stamp();
        for r in 0..self.ranks {
            let l = self.load[r];
            if l <= step.threshold {
                continue;
            }
            for k in r * spr..(r + 1) * spr {
                let e = self.slot[k];
                if self.slot[r * spr..k].contains(&e) {
                    continue;
                }
                let held = f64::from(self.on_rank[r * n + e]);
                let after = l + held * (self.q_up[e] - self.q[e]);
                if self.expert_mark[e] != stamp {
                    self.expert_mark[e] = stamp;
                    self.hot.push(e);
                }
                self.add_gain[e] += step.excess(l) - step.excess(after);
            }
        }
        // Removal effects, expert by expert: one pass over its ranks gives the total excess
        // change and the two highest loads, from which each slot's "others" figures follow.
        self.spares.clear();
        for a in 0..n {
            let ca = self.cnt[a];
            if ca < 2 {
                continue;
            }
            let qa = self.q[a];
            let up = self.w[a] / (ca - 1) as f64 - qa;
            let (mut total, mut max1, mut max2, mut arg1) =
                (0.0, f64::NEG_INFINITY, f64::NEG_INFINITY, usize::MAX);
            let mut last = usize::MAX;
            for k in self.by_off[a]..self.by_off[a + 1] {
                let x = self.rank_of[self.by_slot[k]];
                if x == last {
                    continue;
                }
                last = x;
                let l = self.load[x];
                let after = l + f64::from(self.on_rank[x * n + a]) * up;
                total += step.excess(l) - step.excess(after);
                if after > max1 {
                    (max2, max1, arg1) = (max1, after, x);
                } else if after > max2 {
                    max2 = after;
                }
            }
            for k in self.by_off[a]..self.by_off[a + 1] {
                let s = self.by_slot[k];
                let rs = self.rank_of[s];
                let l = self.load[rs];
                let own_after = l + f64::from(self.on_rank[rs * n + a]) * up;
                let rm_gain = total - (step.excess(l) - step.excess(own_after));
                let rm_max = if arg1 == rs { max2 } else { max1 };
                let rm_base = -qa + f64::from(self.on_rank[rs * n + a] - 1) * up;
                self.rm_base[s] = rm_base;
                self.rm_gain[s] = rm_gain;
                self.rm_max[s] = rm_max;
                if rs != step.top {
                    self.spares.push(Spare {
                        slot: s,
                        expert: a,
                        rank: rs,
                        load: l,
                        exc: step.excess(l),
                        base: l + rm_base,
                        rm_gain,
                        ok: rm_max < step.limit,
                        cost_a: self.cost(rs, a),
                        moved_a: self.moved_at(rs, a),
                    });
                }
            }
        }
    }

    /// Gain of putting a replica of `b` into slot `s` (dropping one replica of its expert `a`,
    /// which has at least two), for `b` without a replica on the ranks of `a` other than the
    /// slot's own: then the effects add up rank by rank and this is exact. `None` when not
    /// admissible. The caller checks the top rank when it is not the slot's rank.
    #[inline]
    fn separable_gain(&self, s: usize, b: usize, step: &Step) -> Option<f64> {
        if self.rm_max[s] >= step.limit {
            return None;
        }
        let r = self.rank_of[s];
        let l = self.load[r];
        let down = self.q_up[b] - self.q[b];
        let held = f64::from(self.on_rank[r * self.n + b]);
        let after = l + self.rm_base[s] + self.q_up[b] + held * down;
        if after >= step.limit && (after > l || r == step.top) {
            return None;
        }
        // `add_gain` counts the slot's rank as if only `b` changed there: take that part out.
        let own = if held > 0.0 {
            step.excess(l) - step.excess(l + held * down)
        } else {
            0.0
        };
        Some(step.excess(l) - step.excess(after) + self.rm_gain[s] + self.add_gain[b] - own)
    }

    /// Replace a replica on the top rank (of an expert with other replicas) by a replica of
    /// another expert that has none on the replaced expert's other ranks.
    ///
    /// For such an expert `b` that is neither on the top rank nor on a rank over the
    /// threshold, the gain only falls as `b`'s load per replica rises, and the added cost and
    /// moves only depend on `b`'s cost class on the top rank. So besides the top rank's
    /// experts, the hot experts and the experts the top rank held before (the free class), only
    /// the lightest expert of the intra-node and of the cross-node class needs evaluating.
    fn scan_replace_on_top(&mut self, step: &Step, pick: &mut Picker) {
        let spr = self.spr;
        let top = step.top;
        let top_slots = top * spr..(top + 1) * spr;
        for s in top_slots.clone() {
            let a = self.slot[s];
            if self.cnt[a] < 2 {
                continue;
            }
            // Excluded: `a` and the experts on its other ranks.
            let stamp = self.next_stamp();
            self.expert_mark[a] = stamp;
            for k in self.by_off[a]..self.by_off[a + 1] {
                let r = self.rank_of[self.by_slot[k]];
                if r != top {
                    for t in r * spr..(r + 1) * spr {
                        let e = self.slot[t];
                        self.expert_mark[e] = stamp;
                    }
                }
            }
            let (base_cost, base_moved) = (self.cost(top, a), self.moved_at(top, a));
            let offer = |this: &Self, pick: &mut Picker, b: usize| {
                if let Some(gain) = this.separable_gain(s, b, step) {
                    let dmoves = this.moved_at(top, b) - base_moved;
                    let dcost = this.cost(top, b) - base_cost;
                    pick.offer(gain, dcost, dmoves, Move::Replace { slot: s, expert: b });
                }
            };
            for t in top_slots.clone() {
                let b = self.slot[t];
                if self.expert_mark[b] != stamp {
                    self.expert_mark[b] = stamp;
                    offer(self, pick, b);
                }
            }
            for &b in &self.hot {
                if self.expert_mark[b] != stamp {
                    offer(self, pick, b);
                }
            }
            // Cost class 0: the experts the top rank held before, all of them.
            for t in top_slots.clone() {
                let b = self.old_slot[t];
                if self.expert_mark[b] != stamp {
                    self.expert_mark[b] = stamp;
                    offer(self, pick, b);
                }
            }
            // Classes 1 and 2: the lightest remaining expert of each.
            let mut found = [true, false, false];
            for &b in &self.order {
                if self.expert_mark[b] == stamp {
                    continue;
                }
                let c = self.class(top, b);
                if !found[c] {
                    found[c] = true;
                    offer(self, pick, b);
                    if found == [true; 3] {
                        break;
                    }
                }
            }
        }
    }

    /// Give an expert of the top rank one more replica, in a slot elsewhere whose expert has
    /// other replicas, none of them on a rank that holds the added expert (other than the
    /// slot's own).
    fn scan_replicate_top(&mut self, step: &Step, pick: &mut Picker) {
        let (n, spr, top) = (self.n, self.spr, step.top);
        for k in 0..spr {
            let b = self.slot[top * spr + k];
            if self.slot[top * spr..top * spr + k].contains(&b) {
                continue;
            }
            // The top rank only loses load here and must end below the limit.
            let (qb, down) = (self.q_up[b], self.q_up[b] - self.q[b]);
            if step.m + f64::from(self.on_rank[top * n + b]) * down >= step.limit {
                continue;
            }
            let add = self.add_gain[b];
            let stamp = self.next_stamp();
            for t in self.by_off[b]..self.by_off[b + 1] {
                self.rank_mark[self.rank_of[self.by_slot[t]]] = stamp;
            }
            let costs_b = |r: usize| self.cost_tab[r * n + b];
            for sp in &self.spares {
                let cost_b = costs_b(sp.rank);
                let dcost = cost_b - sp.cost_a;
                // rm_gain ≤ 0 and the excess after is ≥ 0, so the gain is at most this.
                if sp.expert == b || !sp.ok || !pick.could_win(sp.exc + add, dcost) {
                    continue;
                }
                let interacts = self.slots_of(sp.expert).iter().any(|&t| {
                    let x = self.rank_of[t];
                    x != sp.rank && self.rank_mark[x] == stamp
                });
                if interacts {
                    continue;
                }
                let held = f64::from(self.on_rank[sp.rank * n + b]);
                let after = sp.base + qb + held * down;
                if after >= step.limit && after > sp.load {
                    continue;
                }
                let own = if held > 0.0 {
                    sp.exc - step.excess(sp.load + held * down)
                } else {
                    0.0
                };
                let gain = sp.exc - step.excess(after) + sp.rm_gain + add - own;
                let moved_b = isize::from(cost_b > 0.0);
                pick.offer(
                    gain,
                    dcost,
                    moved_b - sp.moved_a,
                    Move::Replace {
                        slot: sp.slot,
                        expert: b,
                    },
                );
            }
        }
    }
}
