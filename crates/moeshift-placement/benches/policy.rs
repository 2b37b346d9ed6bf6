//! One full call of each policy on the DeepSeek-V3 shape: 58 layers × 256 logical experts,
//! 288 slots, 8 groups, 4 nodes, 32 GPUs.
//!
//! Loads are log-normal (σ = 1, fixed seed). `deepseek` plans them from scratch with an old
//! placement to preserve slots from; `migration` starts from the DeepSeek plan of the previous
//! window, after every load was multiplied by `exp(N(0, 0.25))`.
//!
//! ```text
//! cargo bench -p moeshift-placement --bench policy -- --quick
//! ```

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use moeshift_placement::{
    deepseek, migration, LayerPlan, LoadMatrix, MigrationOptions, Placement, Topology,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

const LAYERS: usize = 58;
const EXPERTS: usize = 256;

fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

struct Inputs {
    topo: Topology,
    previous: LoadMatrix,
    load: LoadMatrix,
    old: Placement,
}

fn inputs() -> Inputs {
    let mut rng = StdRng::seed_from_u64(42);
    let base: Vec<f64> = (0..LAYERS * EXPERTS)
        .map(|_| 1000.0 * normal(&mut rng).exp())
        .collect();
    let drifted: Vec<f32> = base
        .iter()
        .map(|&x| (x * (0.25 * normal(&mut rng)).exp()) as f32)
        .collect();
    let previous = LoadMatrix::from_flat(LAYERS, EXPERTS, base.iter().map(|&x| x as f32).collect())
        .expect("valid load");
    let load = LoadMatrix::from_flat(LAYERS, EXPERTS, drifted).expect("valid load");
    let topo = Topology::new(288, 8, 4, 32);
    let old = deepseek(&previous, &topo, None).expect("valid topology");
    Inputs {
        topo,
        previous,
        load,
        old,
    }
}

fn policies(c: &mut Criterion) {
    let inp = inputs();
    let mut group = c.benchmark_group("deepseek_v3_shape");
    group.bench_function("deepseek_from_scratch", |b| {
        b.iter(|| deepseek(black_box(&inp.load), &inp.topo, None).expect("plan"))
    });
    group.bench_function("deepseek_with_old", |b| {
        b.iter(|| deepseek(black_box(&inp.load), &inp.topo, Some(&inp.old)).expect("plan"))
    });
    let options = MigrationOptions::default();
    group.bench_function("migration", |b| {
        b.iter(|| migration(black_box(&inp.load), &inp.topo, &inp.old, &options).expect("plan"))
    });
    let new = migration(&inp.load, &inp.topo, &inp.old, &options)
        .expect("plan")
        .placement;
    group.bench_function("transfer_plans_all_layers", |b| {
        b.iter(|| {
            (0..LAYERS)
                .map(|l| LayerPlan::between(&inp.old, &new, l).expect("plan"))
                .map(|p| p.num_transfers())
                .sum::<usize>()
        })
    });
    group.finish();
    black_box(&inp.previous);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = policies
}
criterion_main!(benches);
