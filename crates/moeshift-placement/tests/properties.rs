//! Property tests over random loads, topologies and placements.

use moeshift_placement::{
    deepseek, migration, replica_index, LayerPlan, Layout, LoadMatrix, MigrationOptions, Placement,
    Topology,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// A valid topology with its number of logical experts and layers.
#[derive(Debug, Clone)]
struct Case {
    topo: Topology,
    experts: usize,
    layers: usize,
}

/// Topologies covering hierarchical (groups divisible by nodes) and global runs.
fn case() -> impl Strategy<Value = Case> {
    case_where(any::<bool>())
}

/// Topologies that run hierarchically.
fn hierarchical_case() -> impl Strategy<Value = Case> {
    case_where(Just(false))
}

fn case_where(global: impl Strategy<Value = bool>) -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(1usize), Just(2), Just(4)], // nodes
        1usize..=3,                                  // GPUs per node
        1usize..=3,                                  // groups per node, or a global mix
        1usize..=4,                                  // experts per group
        0usize..=3,                                  // extra slots per GPU
        1usize..=3,                                  // layers
        global,                                      // force a global run
    )
        .prop_map(|(nodes, gpn, gpnode, gs, extra, layers, global)| {
            let gpus = nodes * gpn;
            // Groups divisible by nodes runs hierarchically; nodes + 1 groups (with nodes ≥ 2)
            // runs globally.
            let groups = if global && nodes > 1 {
                nodes + 1
            } else {
                nodes * gpnode
            };
            let experts = groups * gs;
            let spr = experts.div_ceil(gpus) + extra;
            Case {
                topo: Topology::new(gpus * spr, groups, nodes, gpus),
                experts,
                layers,
            }
        })
}

/// Loads as small integers (so ties happen) or arbitrary floats.
fn load_for(c: &Case) -> impl Strategy<Value = LoadMatrix> {
    let n = c.layers * c.experts;
    let layers = c.layers;
    let experts = c.experts;
    prop_oneof![
        prop::collection::vec((0u32..20).prop_map(|x| x as f32), n),
        prop::collection::vec(0.0f32..1000.0, n),
    ]
    .prop_map(move |data| LoadMatrix::from_flat(layers, experts, data).expect("valid load"))
}

fn case_and_load() -> impl Strategy<Value = (Case, LoadMatrix)> {
    case().prop_flat_map(|c| {
        let load = load_for(&c);
        (Just(c), load)
    })
}

fn hierarchical_case_and_load() -> impl Strategy<Value = (Case, LoadMatrix)> {
    hierarchical_case().prop_flat_map(|c| {
        let load = load_for(&c);
        (Just(c), load)
    })
}

/// A random valid placement of the case: every expert once, the other slots random, shuffled.
fn placement_for(c: &Case) -> impl Strategy<Value = Placement> {
    let (p, n, layers, gpus) = (c.topo.replicas, c.experts, c.layers, c.topo.gpus);
    prop::collection::vec(
        (
            prop::collection::vec(0..n, p - n),
            Just((0..p).collect::<Vec<usize>>()).prop_shuffle(),
        ),
        layers,
    )
    .prop_map(move |rows| {
        let rows: Vec<Vec<usize>> = rows
            .into_iter()
            .map(|(extra, perm)| {
                let ids: Vec<usize> = (0..n).chain(extra).collect();
                perm.into_iter().map(|k| ids[k]).collect()
            })
            .collect();
        Placement::from_rows(n, gpus, &rows).expect("valid placement")
    })
}

fn check_invariants(p: &Placement, c: &Case) {
    assert_eq!(p.num_physical(), c.topo.replicas);
    for layer in 0..p.num_layers() {
        let cnt = p.logcnt(layer).unwrap();
        assert!(cnt.iter().all(|&k| k >= 1), "every expert has a replica");
        assert_eq!(cnt.iter().sum::<usize>(), c.topo.replicas);
        for rank in 0..c.topo.gpus {
            assert_eq!(
                p.rank_slots(layer, rank).unwrap().len(),
                c.topo.replicas / c.topo.gpus
            );
        }
        // log2phy and phy2log agree.
        let row = p.phy2log(layer).unwrap();
        for (e, &count) in cnt.iter().enumerate() {
            let slots = p.log2phy(layer, e).unwrap();
            assert_eq!(slots.len(), count);
            assert!(slots.windows(2).all(|w| w[0] < w[1]));
            assert!(slots.iter().all(|&s| row[s] == e));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn deepseek_output_is_valid_and_deterministic((c, load) in case_and_load()) {
        let p = deepseek(&load, &c.topo, None).unwrap();
        check_invariants(&p, &c);
        let again = deepseek(&load, &c.topo, None).unwrap();
        prop_assert_eq!(&p, &again);
    }

    #[test]
    fn hierarchical_gpus_only_host_their_nodes_groups((c, load) in hierarchical_case_and_load()) {
        prop_assert!(c.topo.is_hierarchical());
        let p = deepseek(&load, &c.topo, None).unwrap();
        let group_size = c.experts / c.topo.groups;
        let gpus_per_node = c.topo.gpus / c.topo.nodes;
        let spr = c.topo.replicas / c.topo.gpus;
        for layer in 0..c.layers {
            // group → nodes hosting any replica of it.
            let mut nodes_of: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for (slot, &e) in p.phy2log(layer).unwrap().iter().enumerate() {
                let node = slot / spr / gpus_per_node;
                let v = nodes_of.entry(e / group_size).or_default();
                if !v.contains(&node) {
                    v.push(node);
                }
            }
            let mut groups_per_node = vec![0usize; c.topo.nodes];
            for nodes in nodes_of.values() {
                prop_assert_eq!(nodes.len(), 1, "a group spans nodes: {:?}", nodes_of);
                groups_per_node[nodes[0]] += 1;
            }
            prop_assert!(groups_per_node.iter().all(|&g| g == c.topo.groups / c.topo.nodes));
        }
    }

    #[test]
    fn slot_preservation_keeps_rank_contents(
        (c, load, old) in case_and_load().prop_flat_map(|(c, l)| {
            let old = placement_for(&c);
            (Just(c), Just(l), old)
        })
    ) {
        let fresh = deepseek(&load, &c.topo, None).unwrap();
        let kept = deepseek(&load, &c.topo, Some(&old)).unwrap();
        check_invariants(&kept, &c);
        let spr = c.topo.replicas / c.topo.gpus;
        for layer in 0..c.layers {
            let (a, b) = (fresh.phy2log(layer).unwrap(), kept.phy2log(layer).unwrap());
            let o = old.phy2log(layer).unwrap();
            for (r, (x, y)) in a.chunks(spr).zip(b.chunks(spr)).enumerate() {
                let (mut x, mut y) = (x.to_vec(), y.to_vec());
                x.sort_unstable();
                y.sort_unstable();
                prop_assert_eq!(x, y, "rank {} contents changed", r);
            }
            // An expert that stays on a rank keeps its first old row.
            for (seg_new, seg_old) in b.chunks(spr).zip(o.chunks(spr)) {
                for (row, &e) in seg_old.iter().enumerate() {
                    if seg_old[..row].contains(&e) {
                        continue;
                    }
                    if seg_new.contains(&e) {
                        prop_assert_eq!(seg_new[row], e);
                    }
                }
            }
        }
        prop_assert_eq!(kept.moved_from(&old).unwrap(), fresh.moved_from(&old).unwrap());
    }

    #[test]
    fn migration_moves_less_and_never_loses_balance(
        (c, load, old, budget) in case_and_load().prop_flat_map(|(c, l)| {
            let old = placement_for(&c);
            (Just(c), Just(l), old, prop::option::of(0usize..6))
        })
    ) {
        let options = MigrationOptions { max_moves: budget, ..MigrationOptions::default() };
        let report = migration(&load, &c.topo, &old, &options).unwrap();
        let p = &report.placement;
        check_invariants(p, &c);
        let moved = p.moved_from(&old).unwrap();
        prop_assert_eq!(&moved, &report.moved);
        let ds = deepseek(&load, &c.topo, Some(&old)).unwrap();
        let ds_moved = ds.moved_from(&old).unwrap();
        let before = old.balancedness(&load).unwrap();
        let after = p.balancedness(&load).unwrap();
        let fresh = ds.balancedness(&load).unwrap();
        for layer in 0..c.layers {
            prop_assert!(moved[layer] <= ds_moved[layer], "layer {}: {:?} vs {:?}", layer, moved, ds_moved);
            prop_assert!(after.per_layer[layer] >= before.per_layer[layer],
                "layer {}: {} < {}", layer, after.per_layer[layer], before.per_layer[layer]);
            if let Some(b) = budget {
                prop_assert!(moved[layer] <= b);
            } else {
                // Without a budget the target is always met (the fresh plan is the fallback).
                prop_assert!(after.per_layer[layer] >= fresh.per_layer[layer] - options.tolerance - 1e-12);
            }
        }
        let again = migration(&load, &c.topo, &old, &options).unwrap();
        prop_assert_eq!(&again.placement, p);
    }

    #[test]
    fn transfer_plans_reproduce_the_new_placement(
        (c, old, new) in case().prop_flat_map(|c| {
            let old = placement_for(&c);
            let new = placement_for(&c);
            (Just(c), old, new)
        })
    ) {
        for layer in 0..c.layers {
            let (o, n) = (old.phy2log(layer).unwrap(), new.phy2log(layer).unwrap());
            let plan = LayerPlan::new(o, n, c.topo.gpus).unwrap();
            prop_assert_eq!(plan.simulate(o).unwrap(), n.to_vec());
            let again = LayerPlan::new(o, n, c.topo.gpus).unwrap();
            prop_assert_eq!(&plan, &again);

            // Each round: every rank at most once.
            for round in plan.rounds() {
                let mut seen = Vec::new();
                let mut pairs = Vec::new();
                for f in &round.flows {
                    let pair = (f.src.min(f.dst), f.src.max(f.dst));
                    if !pairs.contains(&pair) {
                        pairs.push(pair);
                        for r in [pair.0, pair.1] {
                            prop_assert!(!seen.contains(&r), "rank {} twice in a round", r);
                            seen.push(r);
                        }
                    }
                }
            }
            // Flows cover the sends and receives exactly once.
            let mut from_flows: Vec<(usize, usize, usize, usize)> = Vec::new();
            for (k, round) in plan.rounds().iter().enumerate() {
                for f in &round.flows {
                    prop_assert_ne!(f.src, f.dst);
                    for &e in &f.experts {
                        from_flows.push((f.src, f.dst, e, k));
                    }
                }
            }
            let mut from_sends: Vec<(usize, usize, usize, usize)> = Vec::new();
            let mut from_recvs: Vec<(usize, usize, usize, usize)> = Vec::new();
            for (r, rp) in plan.ranks().iter().enumerate() {
                from_sends.extend(rp.sends.iter().map(|s| (r, s.dst, s.expert, s.round)));
                from_recvs.extend(rp.recvs.iter().map(|s| (s.src, r, s.expert, s.round)));
                // Every row is accounted for exactly once.
                let mut rows: Vec<usize> = rp.unchanged_rows.clone();
                rows.extend(rp.local_copies.iter().map(|c| c.dst_row));
                rows.extend(rp.recvs.iter().map(|c| c.dst_row));
                rows.extend(rp.dup_fills.iter().map(|c| c.dst_row));
                rows.sort_unstable();
                prop_assert_eq!(rows, (0..plan.rows_per_rank()).collect::<Vec<_>>());
                // Never over the wire what the rank already held.
                let old_seg = &o[r * plan.rows_per_rank()..(r + 1) * plan.rows_per_rank()];
                for rv in &rp.recvs {
                    prop_assert!(!old_seg.contains(&rv.expert));
                    prop_assert_ne!(rv.src, r);
                }
            }
            from_flows.sort_unstable();
            from_sends.sort_unstable();
            from_recvs.sort_unstable();
            prop_assert_eq!(&from_flows, &from_sends);
            prop_assert_eq!(&from_flows, &from_recvs);
        }
    }

    #[test]
    fn replica_index_is_in_range(token in any::<u64>(), k in any::<u32>(), count in 0u32..1000) {
        let r = replica_index(token, k, count);
        prop_assert!(r < count.max(1));
    }

    #[test]
    fn initial_placement_is_valid(c in case()) {
        let p = Placement::initial(
            Layout::new(c.layers, c.experts, c.topo.replicas, c.topo.gpus).unwrap(),
        );
        check_invariants(&p, &c);
    }
}
