//! The DeepSeek-compatible policy (DeepSeek's EPLB, as vLLM's default policy runs it).
//!
//! Per layer, in `f32`:
//!
//! 1. **Groups to nodes.** Sum each expert group's load and pack the `G` groups onto the nodes
//!    with balanced packing (`G / nodes` groups per node). Experts get
//!    node-major "meta" ids: `(node · G/nodes + position of the group on the node) · group
//!    size + offset in the group`.
//! 2. **Replicate within each node.** Each node's `N / nodes` experts get `P / nodes` slots,
//!    extra slots going one by one to the expert with the highest load per replica.
//! 3. **Replicas to GPUs within each node.** The node's replicas, each weighing
//!    `load / count`, are packed onto the node's `gpus / nodes` GPUs (`P / gpus` each); a
//!    replica's slot is `GPU · P/gpus + position on the GPU`.
//! 4. Meta ids are mapped back to logical ids.
//!
//! The hierarchical form runs when `groups % nodes == 0`; otherwise the same routine runs with
//! one group on one node (global). On input without ties the result is DeepSeek's `eplb.py`
//! output. When an old placement is given, [slot preservation](crate::preserve) is applied
//! afterwards.
//!
//! # The two greedy steps
//!
//! * **Balanced packing** puts `n` weighted items into `m` packs of exactly `n/m` items:
//!   items are visited heaviest first and each goes to the lightest pack that is not full.
//!   With one item per pack, item `i` simply goes to pack `i` (as in DeepSeek).
//! * **Replication** gives the `P − N` extra slots one at a time, each to the expert whose load
//!   per replica (`load / count`, in `f32`) is currently highest.
//!
//! # Ties
//!
//! Ties are broken the same way everywhere: heavier first, then lower index. Items are visited
//! by descending weight, then ascending index; among equally light packs the lowest index
//! wins; among equal loads per replica the lowest expert index wins. numpy's default sort,
//! which vLLM uses, is not stable, so vLLM's output on tied input depends on the platform
//!; this one does not.

use crate::load::LoadMatrix;
use crate::packing::{balanced_packing, replicate, PackScratch};
use crate::placement::Placement;
use crate::policy::{check_old, Dims, PolicyError, Topology};
use crate::preserve::{preserve_row, PreserveScratch};

/// DeepSeek's EPLB on every layer of `load` (see the [module documentation](self)).
///
/// With `old`, slot preservation keeps every expert that stays on a rank in its old row; the
/// old placement must have exactly the new layout (layers, experts, `replicas` slots, `gpus`
/// ranks).
///
/// # Errors
/// [`PolicyError`] for a zero topology field, a violated divisibility constraint
/// (`N % groups`, `gpus % nodes` in hierarchical mode, `replicas % gpus`), fewer replicas than
/// experts, or an old placement of another shape. (vLLM silently falls back to one node when
/// `gpus % nodes ≠ 0`; a caller that wants that passes `nodes = 1` itself.)
///
/// ```
/// use moeshift_placement::{deepseek, LoadMatrix, Topology};
/// let load = LoadMatrix::from_rows(&[[10.0f32, 20.0, 30.0, 40.0]])?;
/// let p = deepseek(&load, &Topology::new(6, 2, 1, 2), None)?;
/// assert_eq!(p.phy2log(0), Some(&[3, 3, 0, 1, 2, 2][..]));
/// assert_eq!(p.logcnt(0), Some(&[1, 1, 2, 2][..]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn deepseek(
    load: &LoadMatrix,
    topo: &Topology,
    old: Option<&Placement>,
) -> Result<Placement, PolicyError> {
    let dims = topo.deepseek_dims(load.num_experts())?;
    let layout = topo.layout_for(load)?;
    if let Some(old) = old {
        check_old(old, load, topo)?;
    }
    let p = dims.replicas;
    let mut rows = vec![0usize; load.num_layers() * p];
    let mut scratch = DeepSeekScratch::default();
    let mut keep = PreserveScratch::default();
    for (layer, (w, out)) in load.rows().zip(rows.chunks_exact_mut(p)).enumerate() {
        scratch.plan_layer(w, &dims, out);
        if let Some(old) = old {
            if let Some(old_row) = old.phy2log(layer) {
                preserve_row(out, old_row, layout.slots_per_rank(), &mut keep);
            }
        }
    }
    Ok(Placement::from_flat(layout, rows)?)
}

/// Buffers for one layer's run, reused across layers.
#[derive(Debug, Default)]
pub(crate) struct DeepSeekScratch {
    pack: PackScratch,
    group_load: Vec<f32>,
    group_pack: Vec<usize>,
    group_rank: Vec<usize>,
    log2mlog: Vec<usize>,
    mlog2log: Vec<usize>,
    mlog_load: Vec<f32>,
    phy2mlog: Vec<usize>,
    mlog_count: Vec<usize>,
    per_replica: Vec<f32>,
    phy_load: Vec<f32>,
    phy_pack: Vec<usize>,
    phy_rank: Vec<usize>,
}

impl DeepSeekScratch {
    /// Plans one layer with loads `w` (length `N`) into `out` (length `P`). The caller checked
    /// `dims` with [`Topology::deepseek_dims`].
    pub(crate) fn plan_layer(&mut self, w: &[f32], dims: &Dims, out: &mut [usize]) {
        let n = dims.experts;
        let group_size = n / dims.groups;
        let groups_per_node = dims.groups / dims.nodes;
        let experts_per_node = n / dims.nodes;
        let phys_per_node = dims.replicas / dims.nodes;
        let gpus_per_node = dims.gpus / dims.nodes;
        let slots_per_gpu = dims.replicas / dims.gpus;

        // 1. Groups to nodes.
        self.group_load.clear();
        self.group_load
            .extend(w.chunks_exact(group_size).map(|g| g.iter().sum::<f32>()));
        resize(&mut self.group_pack, dims.groups);
        resize(&mut self.group_rank, dims.groups);
        balanced_packing(
            &self.group_load,
            dims.nodes,
            &mut self.group_pack,
            &mut self.group_rank,
            &mut self.pack,
        );
        resize(&mut self.log2mlog, n);
        resize(&mut self.mlog2log, n);
        for e in 0..n {
            let g = e / group_size;
            let m = (self.group_pack[g] * groups_per_node + self.group_rank[g]) * group_size
                + e % group_size;
            self.log2mlog[e] = m;
            self.mlog2log[m] = e;
        }
        self.mlog_load.clear();
        self.mlog_load.extend(self.mlog2log.iter().map(|&e| w[e]));

        // 2. and 3., node by node.
        resize(&mut self.phy2mlog, phys_per_node);
        resize(&mut self.mlog_count, experts_per_node);
        resize(&mut self.phy_pack, phys_per_node);
        resize(&mut self.phy_rank, phys_per_node);
        for node in 0..dims.nodes {
            let node_load = &self.mlog_load[node * experts_per_node..(node + 1) * experts_per_node];
            replicate(
                node_load,
                &mut self.phy2mlog,
                &mut self.mlog_count,
                &mut self.per_replica,
            );
            self.phy_load.clear();
            self.phy_load.extend(
                self.phy2mlog
                    .iter()
                    .map(|&m| node_load[m] / self.mlog_count[m] as f32),
            );
            balanced_packing(
                &self.phy_load,
                gpus_per_node,
                &mut self.phy_pack,
                &mut self.phy_rank,
                &mut self.pack,
            );
            let node_out = &mut out[node * phys_per_node..(node + 1) * phys_per_node];
            for x in 0..phys_per_node {
                let pos = self.phy_pack[x] * slots_per_gpu + self.phy_rank[x];
                node_out[pos] = self.mlog2log[self.phy2mlog[x] + node * experts_per_node];
            }
        }
    }
}

fn resize(v: &mut Vec<usize>, n: usize) {
    v.clear();
    v.resize(n, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::MapError;

    fn plan(w: &[&[f32]], r: usize, g: usize, n: usize, gpus: usize) -> Placement {
        let load = LoadMatrix::from_rows(w).unwrap();
        deepseek(&load, &Topology::new(r, g, n, gpus), None).unwrap()
    }

    fn check(
        w: &[&[f32]],
        (r, g, n, gpus): (usize, usize, usize, usize),
        phy2log: &[&[usize]],
        logcnt: &[&[usize]],
    ) {
        let p = plan(w, r, g, n, gpus);
        let rows: Vec<&[usize]> = (0..w.len()).map(|l| p.phy2log(l).unwrap()).collect();
        assert_eq!(rows, phy2log, "phy2log for {w:?}");
        let cnts: Vec<&[usize]> = (0..w.len()).map(|l| p.logcnt(l).unwrap()).collect();
        assert_eq!(cnts, logcnt, "logcnt for {w:?}");
    }

    // The rows of study §10.1, "stable order" column where it differs.

    const BASIC: [&[f32]; 2] = [
        &[
            90., 132., 40., 61., 104., 165., 39., 4., 73., 56., 183., 86.,
        ],
        &[
            20., 107., 104., 64., 19., 197., 187., 157., 172., 86., 16., 27.,
        ],
    ];

    #[test]
    fn basic_is_deepseeks_readme_example() {
        check(
            &BASIC,
            (16, 4, 2, 8),
            &[
                &[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                &[7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
            ],
            &[
                &[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                &[1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1],
            ],
        );
    }

    #[test]
    fn basic_with_an_old_map_preserves_slots() {
        let load = LoadMatrix::from_rows(&BASIC).unwrap();
        let old_row = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 3];
        let old = Placement::from_rows(12, 8, &[old_row, old_row]).unwrap();
        let p = deepseek(&load, &Topology::new(16, 4, 2, 8), Some(&old)).unwrap();
        assert_eq!(
            p.phy2log_rows(),
            vec![
                vec![5, 6, 5, 7, 4, 8, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                vec![7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 0, 5, 1, 3]
            ]
        );
    }

    #[test]
    fn single_gpu() {
        check(
            &[&[10., 20., 30., 40.]],
            (4, 1, 1, 1),
            &[&[3, 2, 1, 0]],
            &[&[1, 1, 1, 1]],
        );
    }

    #[test]
    fn equal_loads() {
        check(
            &[&[50.; 8]],
            (8, 2, 2, 4),
            &[&[0, 2, 1, 3, 4, 6, 5, 7]],
            &[&[1; 8]],
        );
    }

    #[test]
    fn extreme() {
        check(
            &[&[1000., 1., 1., 1., 1., 1., 1., 1.]],
            (12, 2, 2, 4),
            &[&[0, 0, 3, 0, 1, 2, 6, 4, 4, 7, 5, 5]],
            &[&[3, 1, 1, 1, 2, 2, 1, 1]],
        );
    }

    #[test]
    fn three_layers() {
        check(
            &[
                &[10., 20., 30., 40., 50., 60.],
                &[60., 50., 40., 30., 20., 10.],
                &[25.; 6],
            ],
            (8, 2, 2, 4),
            &[
                &[1, 0, 2, 2, 4, 5, 3, 5],
                &[1, 0, 2, 0, 4, 5, 3, 3],
                &[1, 0, 2, 0, 4, 3, 5, 3],
            ],
            &[
                &[1, 1, 2, 1, 1, 2],
                &[2, 1, 1, 2, 1, 1],
                &[2, 1, 1, 2, 1, 1],
            ],
        );
    }

    #[test]
    fn groups_not_divisible_by_nodes_runs_global() {
        check(
            &[&[10., 20., 30., 40.]],
            (8, 3, 2, 4),
            &[&[2, 1, 2, 1, 3, 3, 3, 0]],
            &[&[1, 2, 2, 3]],
        );
    }

    #[test]
    fn small_hierarchical() {
        check(
            &[&[100., 50., 200., 75., 150., 25., 300., 80.]],
            (12, 4, 2, 4),
            &[&[6, 6, 7, 0, 6, 1, 2, 3, 4, 2, 4, 5]],
            &[&[1, 1, 2, 1, 2, 1, 3, 1]],
        );
    }

    #[test]
    fn global_fallback() {
        check(
            &[&[10., 20., 30., 40., 50., 60.]],
            (8, 3, 2, 4),
            &[&[3, 0, 2, 4, 5, 4, 5, 1]],
            &[&[1, 1, 1, 1, 2, 2]],
        );
    }

    #[test]
    fn one_node() {
        check(
            &[&[10., 20., 30., 40.]],
            (6, 2, 1, 2),
            &[&[3, 3, 0, 1, 2, 2]],
            &[&[1, 1, 2, 2]],
        );
    }

    #[test]
    fn sixteen_experts() {
        check(
            &[&[
                50., 100., 75., 120., 90., 60., 80., 110., 40., 70., 95., 85., 65., 55., 45., 35.,
            ]],
            (24, 8, 4, 8),
            &[&[
                3, 14, 15, 3, 2, 2, 9, 6, 8, 7, 7, 6, 12, 10, 11, 13, 10, 11, 5, 1, 4, 0, 1, 4,
            ]],
            &[&[1, 2, 2, 2, 2, 1, 2, 2, 1, 1, 2, 2, 1, 1, 1, 1]],
        );
    }

    #[test]
    fn two_layers() {
        check(
            &[
                &[200., 150., 100., 50., 25., 12.],
                &[12., 25., 50., 100., 150., 200.],
            ],
            (10, 3, 1, 2),
            &[
                &[1, 0, 0, 2, 5, 1, 0, 2, 3, 4],
                &[4, 5, 5, 3, 0, 4, 5, 2, 3, 1],
            ],
            &[&[3, 2, 2, 1, 1, 1], &[1, 1, 1, 2, 2, 3]],
        );
    }

    #[test]
    fn invalid_topology_is_a_typed_error() {
        let load = LoadMatrix::from_rows(&[[10.0f32, 20., 30., 40.]]).unwrap();
        let err = deepseek(&load, &Topology::new(7, 2, 2, 4), None).unwrap_err();
        assert_eq!(
            err,
            PolicyError::NotDivisible {
                dividend: "replicas",
                dividend_value: 7,
                divisor: "gpus",
                divisor_value: 4
            }
        );
    }

    #[test]
    fn old_placement_of_another_width_is_rejected() {
        let load = LoadMatrix::from_rows(&[[10.0f32, 20., 30., 40.]]).unwrap();
        let old = Placement::from_rows(4, 4, &[[0, 1, 2, 3]]).unwrap();
        let err = deepseek(&load, &Topology::new(8, 2, 2, 4), Some(&old)).unwrap_err();
        assert_eq!(
            err,
            PolicyError::OldMismatch {
                field: "num_physical",
                expected: 8,
                found: 4
            }
        );
        let old = Placement::from_rows(4, 2, &[[0, 1, 2, 3, 0, 1, 2, 3]]).unwrap();
        assert!(matches!(
            deepseek(&load, &Topology::new(8, 2, 2, 4), Some(&old)),
            Err(PolicyError::OldMismatch {
                field: "num_ranks",
                ..
            })
        ));
    }

    #[test]
    fn too_few_replicas() {
        let load = LoadMatrix::from_rows(&[[1.0f32; 8]]).unwrap();
        assert_eq!(
            deepseek(&load, &Topology::new(4, 1, 1, 2), None).unwrap_err(),
            PolicyError::TooFewReplicas {
                replicas: 4,
                experts: 8
            }
        );
        // The map layer would refuse it as well.
        assert!(matches!(
            crate::Layout::new(1, 8, 4, 2),
            Err(MapError::TooFewSlots { .. })
        ));
    }
}
