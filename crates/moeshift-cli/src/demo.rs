//! `moeshift demo`: expert-parallel load balancing end to end, on real processes.
//!
//! The demo starts `--ranks` processes (through the launcher, exactly as `moeshift launch`
//! would). Every rank holds `--layers` MoE layers of expert weights in host memory, two tensors
//! per expert (a `w13`-like and a `w2`-like one), each row filled with a pattern that identifies
//! its logical expert. Then, for `--windows` load windows:
//!
//! 1. the expert load drifts (log-normal start, each window multiplies every expert's load by
//!    `exp(0.5·Z)`, Z standard normal, i.e. a variance of 0.25; every rank derives the same
//!    numbers from `--seed`);
//! 2. every rank runs the migration-aware policy from the current placement (pure and
//!    deterministic, so ranks agree without talking) and builds each layer's transfer plan;
//! 3. the EPLB communicator (`--backend`: `auto` picks NIXL when its runtime is present,
//!    otherwise the host transport) moves the expert rows that change, and commits them;
//! 4. every rank checks every row of every layer against the pattern of the expert the new
//!    placement puts there.
//!
//! Rank 0 prints one line per window (balancedness before/after, the fresh DeepSeek plan's
//! balancedness and moves for comparison, bytes moved, time) and a JSON summary at the end.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moeshift_device_comm::{HostGroup, Launcher, ReduceOp, StoreClient, World};
use moeshift_eplb_comm::{open_communicator, BackendChoice, LayerWeights};
use moeshift_placement::{
    migration, LayerPlan, Layout, LoadMatrix, MigrationOptions, Placement, Topology,
};
use moeshift_sync::Deadline;
use moeshift_tensor::{DType, HostBuffer};

use crate::pattern::{fill_row, first_mismatch, SplitMix};

/// Arguments of `moeshift demo`.
#[derive(clap::Args, Clone)]
pub struct DemoArgs {
    /// Number of ranks (processes) to start.
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    /// Load windows to rebalance.
    #[arg(long, default_value_t = 6)]
    windows: usize,
    /// MoE layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Logical experts per layer.
    #[arg(long, default_value_t = 64)]
    experts: usize,
    /// Physical expert slots per rank (ranks × slots must be at least the logical experts).
    #[arg(long, default_value_t = 20)]
    slots_per_rank: usize,
    /// Expert groups (DeepSeek's node-limited routing groups).
    #[arg(long, default_value_t = 8)]
    groups: usize,
    /// Nodes the ranks are spread over (contiguous blocks of ranks).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Bytes of one expert's first tensor; the second is half of it.
    #[arg(long, default_value_t = 256 * 1024)]
    expert_bytes: usize,
    /// EPLB communicator: host, nixl, nccl or auto.
    #[arg(long, default_value = "auto", value_parser = parse_backend)]
    backend: BackendChoice,
    /// Seed of the load drift (the same on every rank).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Deadline, in seconds, for start-up and for each layer's transfer.
    #[arg(long, default_value_t = 60.0)]
    deadline: f64,
}

fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    s.parse::<BackendChoice>().map_err(|e| e.to_string())
}

/// Runs `moeshift demo`: as the launcher when `RANK` is unset, as one rank otherwise.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    check_args(&args)?;
    if std::env::var_os("RANK").is_some() {
        let world = World::from_env().context("reading the rank's environment")?;
        run_rank(&args, &world)?;
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe().context("locating the moeshift executable")?;
    let outcome = Launcher::new(args.ranks, exe)
        .args(std::env::args_os().skip(1))
        .timeout(Duration::from_secs_f64(
            args.deadline * (args.windows as f64 + 2.0),
        ))
        .run()
        .context("starting the demo's ranks")?;
    if !outcome.success() {
        eprint!("moeshift demo: {}", outcome.summary());
    }
    Ok(ExitCode::from(outcome.exit_code()))
}

fn check_args(a: &DemoArgs) -> anyhow::Result<()> {
    for (name, v) in [
        ("ranks", a.ranks),
        ("windows", a.windows),
        ("layers", a.layers),
        ("experts", a.experts),
        ("slots-per-rank", a.slots_per_rank),
        ("groups", a.groups),
        ("nodes", a.nodes),
        ("expert-bytes", a.expert_bytes),
    ] {
        if v == 0 {
            bail!("--{name} must be at least 1");
        }
    }
    if a.ranks * a.slots_per_rank < a.experts {
        bail!(
            "{} ranks × {} slots cannot hold {} experts",
            a.ranks,
            a.slots_per_rank,
            a.experts
        );
    }
    if !(a.deadline.is_finite() && a.deadline > 0.0) {
        bail!("--deadline must be a positive number of seconds");
    }
    Ok(())
}

/// Per-window figures, summed over ranks where they are counts.
struct Window {
    old_balancedness: f64,
    balancedness: f64,
    fresh_balancedness: f64,
    moved: usize,
    fresh_moved: usize,
    bytes: f64,
    seconds: f64,
}

fn run_rank(args: &DemoArgs, world: &World) -> anyhow::Result<()> {
    let rank = world.rank();
    let ranks = world.world_size();
    if ranks != args.ranks {
        bail!("WORLD_SIZE is {ranks} but --ranks is {}", args.ranks);
    }
    let deadline = || Deadline::after_secs_f64(args.deadline);
    let spr = args.slots_per_rank;
    let slots = ranks * spr;
    let layout = Layout::new(args.layers, args.experts, slots, ranks)?;
    let topo = Topology::new(slots, args.groups, args.nodes, ranks);
    let tensor_bytes = [args.expert_bytes, args.expert_bytes.div_ceil(2)];

    let store = StoreClient::connect(world, deadline()).context("joining the rendezvous store")?;
    let mut placement = Placement::initial(layout);

    // Expert weights: per layer one buffer per tensor, rows holding their experts' patterns.
    let mut buffers: Vec<Vec<HostBuffer>> = Vec::with_capacity(args.layers);
    for layer in 0..args.layers {
        let owned = placement
            .rank_slots(layer, rank)
            .context("rank outside the placement")?;
        let mut bufs = Vec::with_capacity(tensor_bytes.len());
        for (t, &bytes) in tensor_bytes.iter().enumerate() {
            let mut buf = HostBuffer::zeroed(spr * bytes)?;
            for (row, chunk) in buf.as_mut_slice().chunks_exact_mut(bytes).enumerate() {
                fill_row(chunk, owned[row], t);
            }
            bufs.push(buf);
        }
        buffers.push(bufs);
    }
    let mut weights = Vec::with_capacity(args.layers);
    for bufs in buffers.iter_mut() {
        let mut b = LayerWeights::builder();
        for ((name, buf), &bytes) in ["w13", "w2"].iter().zip(bufs.iter_mut()).zip(&tensor_bytes) {
            b = b.host(name, buf, &[spr, bytes], DType::U8)?;
        }
        weights.push(b.build()?);
    }
    let members: Vec<usize> = (0..ranks).collect();
    let mut comm = open_communicator(args.backend, false, &store, &members, &weights, deadline())
        .context("building the EPLB communicator")?;
    // Statistics travel on a group of their own, never interleaved with EPLB traffic.
    let stats_group = HostGroup::from_store(&store, "demo-stats", &members, deadline())?;

    let backend_name = comm.backend().name();
    let mut rng = SplitMix(args.seed);
    let mut load: Vec<f64> = (0..args.layers * args.experts)
        .map(|_| (1000.0 * rng.normal().exp()).max(1.0))
        .collect();
    if rank == 0 {
        println!(
            "moeshift demo: {ranks} ranks, {} layers, {} experts in {slots} slots, backend {}, \
             {} KiB per expert",
            args.layers,
            args.experts,
            backend_name,
            (tensor_bytes[0] + tensor_bytes[1]) / 1024
        );
        println!(
            "window  balancedness old -> new (fresh plan)  moved/slots (fresh plan)  MB moved   ms"
        );
    }
    let mut windows = Vec::with_capacity(args.windows);
    for w in 0..args.windows {
        for x in load.iter_mut() {
            *x = (*x * (0.5 * rng.normal()).exp()).max(1.0);
        }
        let matrix = LoadMatrix::from_f64_rows(&load.chunks(args.experts).collect::<Vec<_>>())?;
        let report = migration(&matrix, &topo, &placement, &MigrationOptions::default())?;
        let started = Instant::now();
        let mut bytes = 0u64;
        for (layer, lw) in weights.iter_mut().enumerate() {
            let old = placement
                .phy2log(layer)
                .context("layer outside the placement")?;
            let new = report
                .placement
                .phy2log(layer)
                .context("layer outside the new placement")?;
            let plan = LayerPlan::new(old, new, ranks)?;
            let stats = comm
                .transfer_and_commit(layer, &plan, lw, deadline())
                .with_context(|| format!("window {w}, layer {layer}"))?;
            bytes += stats.bytes_received;
        }
        let seconds = started.elapsed().as_secs_f64();
        placement = report.placement.clone();
        verify(&weights, &placement, rank, &tensor_bytes).with_context(|| format!("window {w}"))?;

        // Sum bytes over ranks and take the slowest rank's time.
        let mut sums = [bytes as f64];
        let mut slowest = [seconds];
        stats_group.all_reduce(&mut sums, ReduceOp::Sum, deadline())?;
        stats_group.all_reduce(&mut slowest, ReduceOp::Max, deadline())?;
        let sum_over = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        windows.push(Window {
            old_balancedness: sum_over(&report.old_balancedness),
            balancedness: sum_over(&report.balancedness),
            fresh_balancedness: sum_over(&report.fresh_balancedness),
            moved: report.moved.iter().sum(),
            fresh_moved: report.fresh_moved.iter().sum(),
            bytes: sums[0],
            seconds: slowest[0],
        });
        if rank == 0 {
            let x = windows.last().context("no window recorded")?;
            println!(
                "{w:>6}  {:>16.3} -> {:.3} ({:.3})  {:>6}/{:<5} ({:>4})         {:>8.1} {:>5.0}",
                x.old_balancedness,
                x.balancedness,
                x.fresh_balancedness,
                x.moved,
                slots * args.layers,
                x.fresh_moved,
                x.bytes / 1e6,
                x.seconds * 1e3
            );
        }
    }
    drop(comm);
    if rank == 0 {
        let n = windows.len() as f64;
        let total_slots = (slots * args.layers) as f64;
        let mean = |f: &dyn Fn(&Window) -> f64| windows.iter().map(f).sum::<f64>() / n;
        let summary = serde_json::json!({
            "ranks": ranks,
            "windows": windows.len(),
            "backend": backend_name,
            "mean_balancedness_before": mean(&|x| x.old_balancedness),
            "mean_balancedness_after": mean(&|x| x.balancedness),
            "mean_balancedness_fresh_plan": mean(&|x| x.fresh_balancedness),
            "mean_share_moved": mean(&|x| x.moved as f64 / total_slots),
            "mean_share_moved_fresh_plan": mean(&|x| x.fresh_moved as f64 / total_slots),
            "bytes_moved": windows.iter().map(|x| x.bytes).sum::<f64>(),
            "every_row_verified": true,
        });
        println!("{summary}");
    }
    Ok(())
}

/// Checks every row of every layer on this rank against the expert the placement puts there.
fn verify(
    weights: &[LayerWeights<'_>],
    placement: &Placement,
    rank: usize,
    tensor_bytes: &[usize],
) -> anyhow::Result<()> {
    for (layer, w) in weights.iter().enumerate() {
        let owned = placement
            .rank_slots(layer, rank)
            .context("rank outside the placement")?;
        for (row, &expert) in owned.iter().enumerate() {
            for (t, _) in tensor_bytes.iter().enumerate() {
                let bytes = w.row(t, row)?;
                if let Some(at) = first_mismatch(bytes, expert, t) {
                    bail!(
                        "layer {layer}, row {row}, tensor {t} should hold expert {expert} but \
                         byte {at} differs"
                    );
                }
            }
        }
    }
    Ok(())
}
