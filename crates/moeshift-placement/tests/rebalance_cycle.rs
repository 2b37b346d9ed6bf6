//! A whole rebalance cycle on a mid-sized model: plan with each policy, then plan and replay the
//! transfers of every layer.

use moeshift_placement::{
    deepseek, migration, rebalance, LayerPlan, LoadMatrix, MigrationOptions, Placement, Policy,
    Topology,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;

const LAYERS: usize = 6;
const EXPERTS: usize = 64;

fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Log-normal loads (σ = 1), then the same loads after one drift window (σ = 0.25).
fn loads(seed: u64) -> (LoadMatrix, LoadMatrix) {
    let mut rng = StdRng::seed_from_u64(seed);
    let base: Vec<f64> = (0..LAYERS * EXPERTS)
        .map(|_| 1000.0 * normal(&mut rng).exp())
        .collect();
    let drifted: Vec<f32> = base
        .iter()
        .map(|&x| (x * (0.25 * normal(&mut rng)).exp()) as f32)
        .collect();
    (
        LoadMatrix::from_flat(LAYERS, EXPERTS, base.iter().map(|&x| x as f32).collect()).unwrap(),
        LoadMatrix::from_flat(LAYERS, EXPERTS, drifted).unwrap(),
    )
}

/// (rank, expert) pairs of a layer that `new` has and `old` had not: the receives.
fn new_pairs(old: &Placement, new: &Placement, layer: usize) -> usize {
    let spr = old.slots_per_rank();
    let held = |p: &Placement| -> BTreeSet<(usize, usize)> {
        p.phy2log(layer)
            .unwrap()
            .iter()
            .enumerate()
            .map(|(s, &e)| (s / spr, e))
            .collect()
    };
    held(new).difference(&held(old)).count()
}

#[test]
fn migration_cycle_moves_few_replicas_and_replays_exactly() {
    // 8 groups on 2 nodes of 4 GPUs, 72 slots: DeepSeek-V3's proportions, scaled down.
    let topo = Topology::new(72, 8, 2, 8);
    for seed in [1u64, 2, 3] {
        let (before, after) = loads(seed);
        let old = deepseek(&before, &topo, None).unwrap();

        let fresh = rebalance(&Policy::DeepSeek, &after, &topo, Some(&old)).unwrap();
        let report = migration(&after, &topo, &old, &MigrationOptions::default()).unwrap();
        let new = &report.placement;

        let fresh_bal = fresh.placement.balancedness(&after).unwrap();
        let new_bal = new.balancedness(&after).unwrap();
        let old_bal = old.balancedness(&after).unwrap();
        for layer in 0..LAYERS {
            assert!(report.moved[layer] <= fresh.moved[layer]);
            assert!(new_bal.per_layer[layer] >= fresh_bal.per_layer[layer] - 0.01 - 1e-12);
            assert!(new_bal.per_layer[layer] >= old_bal.per_layer[layer]);
        }
        // Re-planning from scratch moves most replicas; the migration policy a fraction.
        let fresh_total: usize = fresh.moved.iter().sum();
        let total: usize = report.moved.iter().sum();
        assert!(
            2 * total < fresh_total,
            "seed {seed}: migration moved {total}, deepseek {fresh_total}"
        );

        for layer in 0..LAYERS {
            let plan = LayerPlan::between(&old, new, layer).unwrap();
            assert_eq!(
                plan.simulate(old.phy2log(layer).unwrap()).unwrap(),
                new.phy2log(layer).unwrap().to_vec()
            );
            assert_eq!(plan.num_transfers(), new_pairs(&old, new, layer));
            // A rank talks to each peer in one round only, so there are at least as many
            // rounds as the most peers any rank has.
            let mut peers = vec![BTreeSet::new(); topo.gpus];
            for (r, rp) in plan.ranks().iter().enumerate() {
                for s in &rp.sends {
                    peers[r].insert(s.dst);
                    peers[s.dst].insert(r);
                }
            }
            let degree = peers.iter().map(BTreeSet::len).max().unwrap_or(0);
            assert!(plan.rounds().len() >= degree);
            for round in plan.rounds() {
                let pairs: BTreeSet<(usize, usize)> = round
                    .flows
                    .iter()
                    .map(|f| (f.src.min(f.dst), f.src.max(f.dst)))
                    .collect();
                let mut seen = BTreeSet::new();
                for (a, b) in pairs {
                    assert!(seen.insert(a) && seen.insert(b), "a rank twice in a round");
                    assert_eq!(round.peer_of(a), Some(b));
                }
            }
        }
    }
}

#[test]
fn a_budget_of_zero_keeps_the_old_placement() {
    let topo = Topology::new(72, 8, 2, 8);
    let (before, after) = loads(9);
    let old = deepseek(&before, &topo, None).unwrap();
    let options = MigrationOptions {
        max_moves: Some(0),
        ..MigrationOptions::default()
    };
    let report = migration(&after, &topo, &old, &options).unwrap();
    // Only moves that bring nothing new to a rank (a second replica of an expert it holds)
    // fit in a budget of zero.
    assert_eq!(report.moved, vec![0; LAYERS]);
    assert_eq!(report.placement.moved_from(&old).unwrap(), vec![0; LAYERS]);
    let b = report.placement.balancedness(&after).unwrap();
    let o = old.balancedness(&after).unwrap();
    for layer in 0..LAYERS {
        assert!(b.per_layer[layer] >= o.per_layer[layer]);
    }
}
