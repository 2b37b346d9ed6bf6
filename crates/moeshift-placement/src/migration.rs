//! The migration-aware policy: reach the balancedness of a fresh DeepSeek plan (within a
//! tolerance) while moving as few replicas between ranks as possible.
//!
//! Re-planning from scratch moves most replicas at every rebalance, although the load drifts
//! only a little between two rebalances. This policy starts from the old placement instead and
//! improves it with single moves, layer by layer.
//!
//! # Vocabulary
//!
//! * A replica is **moved** when its rank did not hold that logical expert in the old
//!   placement (positions inside a rank do not count). The budget `max_moves` and the reported
//!   move counts use this measure.
//! * The **cost** of a moved replica is `intra_node_cost` when some rank of its node held the
//!   expert before (the weights can come over NVLink) and `cross_node_cost` otherwise. Nodes
//!   are the ranks split evenly into `nodes` contiguous blocks. A replica that is not moved
//!   costs nothing.
//! * The **target** of a layer is `b_fresh − tolerance`, where `b_fresh` is the balancedness
//!   (mean / max per-rank load) of [`deepseek`]'s fresh plan. Since the mean is fixed by the
//!   load, reaching the target means bringing every rank's load under
//!   `T = mean / target`. The **excess** of a placement is `Σ_ranks max(0, load − T)`; it is
//!   zero exactly when the target is reached.
//!
//! # Algorithm (per layer)
//!
//! 1. If the old placement already reaches the target, keep it (0 moves).
//! 2. Otherwise repeat, on the most loaded rank `r*` (lowest index on ties), until the target
//!    is reached, no move helps, or a step limit (`4·P + 16`):
//!    * consider the single moves that unload `r*`:
//!      - **swap** a replica on `r*` with a lighter replica of another expert on a rank under
//!        `T` (a swap with a rank at or over `T` cannot reduce the excess);
//!      - **replace** a replica on `r*` whose expert `a` has other replicas by a replica of
//!        another expert `b` (`a`'s load moves to its remaining replicas, `b`'s is shared by
//!        one more replica);
//!      - **replicate** an expert `b` of `r*` into a slot elsewhere whose expert `a` has other
//!        replicas (every replica of `b`, the one on `r*` included, gets lighter);
//!
//!      replacements are only considered when `b` has no replica on a rank of `a` other than
//!      the slot's own, so that the effect on every rank is a sum of independent parts that
//!      are precomputed once per step;
//!    * keep the moves that leave every rank whose load rises, and `r*` itself, strictly below
//!      `r*`'s current load (so the maximum never rises and balancedness never drops), that
//!      reduce the excess, and that keep the move count within
//!      `min(max_moves, moves of the fresh plan)`;
//!    * apply the one with the largest excess reduction per unit of added cost. Moves that add
//!      no cost come first (for instance a second replica of an expert the rank already
//!      holds, which is a local copy, or bringing an expert back to a rank that held it).
//!
//!    Each applied move strictly lowers the per-rank loads sorted in descending order
//!    (lexicographically), so the search cannot cycle.
//! 3. If the result still misses the target and the fresh plan's move count is within
//!    `max_moves`, the fresh plan is used instead: it reaches the target by definition and
//!    moves no more than the budget allows. So this policy never moves more replicas than
//!    [`deepseek`] with slot preservation does, and never ends below the old placement's
//!    balancedness.
//! 4. [Slot preservation](crate::preserve) keeps every expert that stays on a rank in its old
//!    row.
//!
//! Candidates are visited in a fixed order and a candidate must be strictly better than the
//! best so far to replace it, so the output is deterministic. The loads of the ranks a move
//! touches are summed again from their slots after every move (exactly as a full
//! recomputation would), so rounding does not accumulate.
//!
//! # Cost
//!
//! One DeepSeek run for the targets, then per step about `S·R` swap candidates (`S` slots per
//! rank, `R` ranks; whole ranks are skipped when an upper bound on their gain per cost cannot
//! beat the best candidate), for each replica on `r*` whose expert has other replicas a
//! handful of replacement candidates (the lightest expert of each cost class stands for all
//! the others of its class), and `S` times the number of such replicas elsewhere for
//! replication. On the DeepSeek-V3 shape (58 layers, 288 slots, 32 GPUs) a rebalance after a
//! typical drift takes about ten steps per layer.

mod search;

use crate::deepseek::deepseek;
use crate::load::LoadMatrix;
use crate::placement::Placement;
use crate::policy::{check_old, PolicyError, Topology};
use search::Search;
use serde::Serialize;

/// Options of the migration-aware policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationOptions {
    /// How far below the fresh DeepSeek plan's balancedness a layer may stay (absolute,
    /// default 0.01). Must be finite and non-negative.
    pub tolerance: f64,
    /// Hard limit on moved replicas per layer (default: none).
    pub max_moves: Option<usize>,
    /// Cost of a moved replica whose expert was already on the same node (default 1).
    pub intra_node_cost: f64,
    /// Cost of a moved replica whose expert must come from another node (default 2).
    pub cross_node_cost: f64,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            tolerance: 0.01,
            max_moves: None,
            intra_node_cost: 1.0,
            cross_node_cost: 2.0,
        }
    }
}

impl MigrationOptions {
    fn validate(&self) -> Result<(), PolicyError> {
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return Err(PolicyError::InvalidOption {
                field: "tolerance",
                value: self.tolerance,
                reason: "must be finite and non-negative",
            });
        }
        for (field, value) in [
            ("intra_node_cost", self.intra_node_cost),
            ("cross_node_cost", self.cross_node_cost),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(PolicyError::InvalidOption {
                    field,
                    value,
                    reason: "must be finite and positive",
                });
            }
        }
        Ok(())
    }
}

/// What the migration-aware policy did, per layer.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationReport {
    /// The new placement.
    pub placement: Placement,
    /// Moved replicas per layer (their rank did not hold the expert before).
    pub moved: Vec<usize>,
    /// Of those, the replicas whose node did not hold the expert before either.
    pub cross_node: Vec<usize>,
    /// Balancedness of the new placement, per layer.
    pub balancedness: Vec<f64>,
    /// Balancedness of the old placement under the new load, per layer.
    pub old_balancedness: Vec<f64>,
    /// Balancedness of the fresh DeepSeek plan, per layer.
    pub fresh_balancedness: Vec<f64>,
    /// Moved replicas of the fresh DeepSeek plan (with slot preservation), per layer.
    pub fresh_moved: Vec<usize>,
    /// Layers where the search missed the target and the fresh plan was taken instead.
    pub used_fresh_plan: Vec<bool>,
}

/// The migration-aware policy (see the [module documentation](self)).
///
/// # Errors
/// [`PolicyError`] for invalid options, a topology the DeepSeek policy rejects or with
/// `gpus % nodes ≠ 0`, or an old placement whose shape does not match.
///
/// ```
/// use moeshift_placement::{migration, LoadMatrix, MigrationOptions, Placement, Topology};
/// // Two ranks of two slots; expert 0 became hot.
/// let old = Placement::from_rows(3, 2, &[[0, 1, 2, 0]])?;
/// let load = LoadMatrix::from_rows(&[[90.0f32, 20.0, 30.0]])?;
/// let report = migration(&load, &Topology::new(4, 1, 1, 2), &old, &MigrationOptions::default())?;
/// assert!(report.balancedness[0] >= report.fresh_balancedness[0] - 0.01);
/// assert!(report.moved[0] <= report.fresh_moved[0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn migration(
    load: &LoadMatrix,
    topo: &Topology,
    old: &Placement,
    options: &MigrationOptions,
) -> Result<MigrationReport, PolicyError> {
    options.validate()?;
    topo.check_common(load.num_experts())?;
    check_old(old, load, topo)?;
    let fresh = deepseek(load, topo, Some(old))?;
    let fresh_moved = fresh.moved_from(old)?;
    let layout = old.layout();
    let p = layout.num_physical();
    let layers = layout.num_layers();

    let mut search = Search::new(layout, topo.nodes, options);
    let mut rows = vec![0usize; layers * p];
    let mut report = MigrationReport {
        placement: old.clone(),
        moved: Vec::with_capacity(layers),
        cross_node: Vec::with_capacity(layers),
        balancedness: Vec::with_capacity(layers),
        old_balancedness: Vec::with_capacity(layers),
        fresh_balancedness: Vec::with_capacity(layers),
        fresh_moved: fresh_moved.clone(),
        used_fresh_plan: Vec::with_capacity(layers),
    };
    let per_layer = load
        .rows()
        .zip(old.phy2log_flat().chunks_exact(p))
        .zip(fresh.phy2log_flat().chunks_exact(p))
        .zip(rows.chunks_exact_mut(p))
        .zip(fresh_moved.iter());
    for ((((w, old_row), fresh_row), out), &fresh_moves) in per_layer {
        let o = search.run_layer(w, old_row, fresh_row, fresh_moves, out);
        report.moved.push(o.moved);
        report.cross_node.push(o.cross_node);
        report.balancedness.push(o.balancedness);
        report.old_balancedness.push(o.old_balancedness);
        report.fresh_balancedness.push(o.fresh_balancedness);
        report.used_fresh_plan.push(o.used_fresh);
    }
    report.placement = Placement::from_flat(layout, rows)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> MigrationOptions {
        MigrationOptions::default()
    }

    #[test]
    fn balanced_old_placement_is_kept() {
        // Old placement is the fresh plan itself: nothing to do.
        let load = LoadMatrix::from_rows(&[[10.0f32, 20., 30., 40.]]).unwrap();
        let topo = Topology::new(6, 2, 1, 2);
        let old = deepseek(&load, &topo, None).unwrap();
        let r = migration(&load, &topo, &old, &opts()).unwrap();
        assert_eq!(r.placement, old);
        assert_eq!(r.moved, vec![0]);
        assert_eq!(r.used_fresh_plan, vec![false]);
    }

    #[test]
    fn one_swap_fixes_a_swapped_pair() {
        // 4 experts on 2 ranks of 2 slots. Old: rank 0 = [0, 1], rank 1 = [2, 3].
        // Loads 40, 30, 20, 10: rank 0 = 70, rank 1 = 30, balancedness 50/70.
        // The fresh plan packs {0, 3} and {1, 2}: 50/50. Swapping 0 and 2 (the first of the
        // two best swaps, 0↔2 and 1↔3) also reaches 50/50 with two moved replicas.
        let load = LoadMatrix::from_rows(&[[40.0f32, 30., 20., 10.]]).unwrap();
        let topo = Topology::new(4, 1, 1, 2);
        let old = Placement::from_rows(4, 2, &[[0, 1, 2, 3]]).unwrap();
        let r = migration(&load, &topo, &old, &opts()).unwrap();
        assert_eq!(r.balancedness, vec![1.0]);
        assert_eq!(r.moved, vec![2]);
        // Expert 1 stays in its row on rank 0, expert 3 stays in its row on rank 1.
        assert_eq!(r.placement.phy2log(0), Some(&[2, 1, 0, 3][..]));
        assert!(r.moved[0] <= r.fresh_moved[0]);
    }

    #[test]
    fn hot_expert_gets_a_replica() {
        // 3 experts, 4 slots on 2 ranks: old = rank 0 [0, 1], rank 1 [2, 1].
        // Expert 0 is now hot (90): rank 0 = 90 + 10 = 100, rank 1 = 30 + 10 = 40.
        // Replacing the spare replica of 1 on rank 1 by a replica of 0 gives
        // rank 0 = 45 + 20 = 65, rank 1 = 30 + 45 = 75: max 75 < 100. One move.
        let load = LoadMatrix::from_rows(&[[90.0f32, 20., 30.]]).unwrap();
        let topo = Topology::new(4, 1, 1, 2);
        let old = Placement::from_rows(3, 2, &[[0, 1, 2, 1]]).unwrap();
        let r = migration(&load, &topo, &old, &opts()).unwrap();
        assert!(r.balancedness[0] >= r.fresh_balancedness[0] - 0.01);
        assert!(r.balancedness[0] > r.old_balancedness[0]);
        assert!(r.moved[0] <= r.fresh_moved[0]);
        assert_eq!(r.placement.logcnt(0).unwrap()[0], 2);
    }

    #[test]
    fn budget_is_respected_and_never_worse_than_old() {
        let load = LoadMatrix::from_rows(&[[40.0f32, 30., 20., 10.]]).unwrap();
        let topo = Topology::new(4, 1, 1, 2);
        let old = Placement::from_rows(4, 2, &[[0, 1, 2, 3]]).unwrap();
        let o = MigrationOptions {
            max_moves: Some(1),
            ..opts()
        };
        let r = migration(&load, &topo, &old, &o).unwrap();
        // A swap needs two moves: nothing fits in a budget of one.
        assert_eq!(r.moved, vec![0]);
        assert_eq!(r.placement, old);
        assert_eq!(r.balancedness, r.old_balancedness);
    }

    #[test]
    fn options_are_validated() {
        let load = LoadMatrix::from_rows(&[[1.0f32, 2.0]]).unwrap();
        let topo = Topology::new(2, 1, 1, 1);
        let old = Placement::from_rows(2, 1, &[[0, 1]]).unwrap();
        for (o, field) in [
            (
                MigrationOptions {
                    tolerance: -0.1,
                    ..opts()
                },
                "tolerance",
            ),
            (
                MigrationOptions {
                    tolerance: f64::NAN,
                    ..opts()
                },
                "tolerance",
            ),
            (
                MigrationOptions {
                    cross_node_cost: 0.0,
                    ..opts()
                },
                "cross_node_cost",
            ),
        ] {
            assert!(matches!(
                migration(&load, &topo, &old, &o),
                Err(PolicyError::InvalidOption { field: f, .. }) if f == field
            ));
        }
        let wide = Placement::from_rows(2, 1, &[[0, 1, 0]]).unwrap();
        assert!(matches!(
            migration(&load, &topo, &wide, &opts()),
            Err(PolicyError::OldMismatch {
                field: "num_physical",
                ..
            })
        ));
    }

    #[test]
    fn cross_node_moves_cost_more() {
        // 4 ranks of 2 slots, nodes {r0, r1} and {r2, r3}. Old: r0 [0, 1], r1 [2, 3],
        // r2 [4, 5], r3 [6, 7]. Rank 2 is hot (50 + 10); r0 and r3 are mirror images
        // (30 + 1), r1 holds 20 + 20. Mean 40.5; the fresh plan's maximum is 51.
        // Swapping expert 4 with expert 0 (r0, other node) or with expert 6 (r3, same node)
        // both bring the maximum to 51. Rank 0 is enumerated first, so with equal costs the
        // cross-node swap is taken; with the default costs the intra-node one wins.
        let w = [30.0f32, 1., 20., 20., 50., 10., 30., 1.];
        let load = LoadMatrix::from_rows(&[w]).unwrap();
        let topo = Topology::new(8, 1, 2, 4);
        let old = Placement::from_rows(8, 4, &[[0, 1, 2, 3, 4, 5, 6, 7]]).unwrap();
        let flat = MigrationOptions {
            cross_node_cost: 1.0,
            ..opts()
        };
        let r = migration(&load, &topo, &old, &flat).unwrap();
        assert_eq!(
            (r.moved[0], r.cross_node[0]),
            (2, 2),
            "{:?}",
            r.placement.phy2log(0)
        );
        let r = migration(&load, &topo, &old, &opts()).unwrap();
        assert_eq!(
            (r.moved[0], r.cross_node[0]),
            (2, 0),
            "{:?}",
            r.placement.phy2log(0)
        );
        assert_eq!(r.placement.phy2log(0), Some(&[0, 1, 2, 3, 6, 5, 4, 7][..]));
        assert!(r.balancedness[0] >= r.fresh_balancedness[0] - 0.01);
    }
}
