//! Re-planning from scratch versus migration-aware re-planning on drifting loads.
//!
//! DeepSeek-V3 shape: 58 layers × 256 logical experts, 288 slots, 8 groups, 4 nodes, 32 GPUs.
//! Loads start log-normal (σ = 1, median 1000 tokens per expert); each window multiplies every
//! expert's load by `exp(N(0, s))` with standard deviation `s = 0.25` (change it with
//! `--sigma`). Both policies start from the same DeepSeek plan of the first load; per window the
//! example prints the share of slots moved and the balancedness for `deepseek` (re-planning
//! with slot preservation) and `migration`, then one JSON summary line.
//!
//! ```text
//! cargo run --release -p moeshift-placement --example drift [-- --windows 10 --sigma 0.25 --seed 7]
//! ```

use moeshift_placement::{deepseek, migration, LoadMatrix, MigrationOptions, Topology};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

const LAYERS: usize = 58;
const EXPERTS: usize = 256;

/// One standard normal sample (Box–Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let windows: usize = arg("--windows", 10);
    let sigma: f64 = arg("--sigma", 0.25);
    let seed: u64 = arg("--seed", 7);
    let topo = Topology::new(288, 8, 4, 32);
    let slots = (LAYERS * topo.replicas) as f64;
    let options = MigrationOptions::default();

    let mut rng = StdRng::seed_from_u64(seed);
    let mut w: Vec<f64> = (0..LAYERS * EXPERTS)
        .map(|_| 1000.0 * normal(&mut rng).exp())
        .collect();
    let to_load =
        |w: &[f64]| LoadMatrix::from_flat(LAYERS, EXPERTS, w.iter().map(|&x| x as f32).collect());

    let start = deepseek(&to_load(&w)?, &topo, None)?;
    let mut ds_prev = start.clone();
    let mut mig_prev = start;

    println!(
        "DeepSeek-V3 shape: {LAYERS} layers x {EXPERTS} experts, {} slots, {} groups, {} nodes, \
         {} GPUs; drift sigma {sigma}, seed {seed}, tolerance {}",
        topo.replicas, topo.groups, topo.nodes, topo.gpus, options.tolerance
    );
    println!(
        "{:>6} | {:>9} {:>8} {:>7} | {:>9} {:>8} {:>7} {:>9} {:>10} {:>6} {:>7}",
        "window",
        "ds moved",
        "ds bal",
        "ds ms",
        "mig moved",
        "mig bal",
        "mig ms",
        "old bal",
        "worst gap",
        "fresh",
        "x-node"
    );
    let (mut ds_share_sum, mut ds_bal_sum) = (0.0, 0.0);
    let (mut mig_share_sum, mut mig_bal_sum) = (0.0, 0.0);
    let (mut mig_share_max, mut gap_max, mut overall_gap_max) = (0.0f64, 0.0f64, 0.0f64);
    let mut fresh_layers = 0usize;
    for window in 1..=windows {
        for x in w.iter_mut() {
            *x *= (sigma * normal(&mut rng)).exp();
        }
        let load = to_load(&w)?;

        let t = Instant::now();
        let ds = deepseek(&load, &topo, Some(&ds_prev))?;
        let ds_ms = t.elapsed().as_secs_f64() * 1e3;
        let ds_moved: usize = ds.moved_from(&ds_prev)?.iter().sum();
        let ds_bal = ds.balancedness(&load)?.overall;

        let t = Instant::now();
        let report = migration(&load, &topo, &mig_prev, &options)?;
        let mig_ms = t.elapsed().as_secs_f64() * 1e3;
        let mig_moved: usize = report.moved.iter().sum();
        let cross: usize = report.cross_node.iter().sum();
        let mig_bal = report.placement.balancedness(&load)?.overall;
        let old_bal = mig_prev.balancedness(&load)?.overall;
        let worst_gap = report
            .fresh_balancedness
            .iter()
            .zip(&report.balancedness)
            .map(|(f, b)| f - b)
            .fold(f64::MIN, f64::max);
        let fresh_used = report.used_fresh_plan.iter().filter(|&&u| u).count();

        let ds_share = ds_moved as f64 / slots;
        let mig_share = mig_moved as f64 / slots;
        println!(
            "{window:>6} | {:>8.1}% {ds_bal:>8.4} {ds_ms:>7.2} | {:>8.1}% {mig_bal:>8.4} \
             {mig_ms:>7.2} {old_bal:>9.4} {worst_gap:>10.4} {fresh_used:>6} {cross:>7}",
            100.0 * ds_share,
            100.0 * mig_share,
        );
        ds_share_sum += ds_share;
        ds_bal_sum += ds_bal;
        mig_share_sum += mig_share;
        mig_bal_sum += mig_bal;
        mig_share_max = mig_share_max.max(mig_share);
        gap_max = gap_max.max(worst_gap);
        overall_gap_max = overall_gap_max.max(ds_bal - mig_bal);
        fresh_layers += fresh_used;
        ds_prev = ds;
        mig_prev = report.placement;
    }
    let n = windows.max(1) as f64;
    let summary = serde_json::json!({
        "shape": {"layers": LAYERS, "experts": EXPERTS, "slots": topo.replicas,
                  "groups": topo.groups, "nodes": topo.nodes, "gpus": topo.gpus},
        "windows": windows,
        "drift_sigma": sigma,
        "seed": seed,
        "deepseek": {
            "mean_moved_share": ds_share_sum / n,
            "mean_balancedness": ds_bal_sum / n,
        },
        "migration": {
            "mean_moved_share": mig_share_sum / n,
            "max_moved_share": mig_share_max,
            "mean_balancedness": mig_bal_sum / n,
            "max_layer_gap_to_fresh": gap_max,
            "max_overall_gap_to_deepseek": overall_gap_max,
            "layers_using_fresh_plan": fresh_layers,
        },
    });
    println!("{summary}");
    Ok(())
}
