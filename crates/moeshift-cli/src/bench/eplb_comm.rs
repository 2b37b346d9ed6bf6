//! `moeshift bench eplb-comm`: moves random layer plans through an EPLB communicator and
//! reports the throughput. Run it under `moeshift launch` (or any torchrun-style launcher):
//!
//! ```text
//! moeshift launch --nproc 4 -- moeshift bench eplb-comm --backend host --layers 8 \
//!     --experts-per-rank 16 --moved-per-rank 4 --expert-bytes 4194304 --tensors 2 --verify
//! ```
//!
//! Every layer holds `E` experts per rank (no replicas) and moves a random plan in which
//! exactly `M` experts of every rank go to other ranks, and `M` arrive from them. Every
//! rank derives the same placements from `--seed`. Expert rows hold a pattern derived from
//! `(expert, tensor, byte index)`, so `--verify` checks every row of every layer byte for
//! byte after the moves. Rank 0 prints one JSON object:
//!
//! * `backend`, `ranks`, `layers`;
//! * `bytes_moved`: expert-row bytes received over the wire, summed over ranks;
//! * `seconds`: the slowest rank's time for all layers (transfer and commit);
//! * `GBps_per_rank`: `bytes_moved / ranks / seconds / 1e9`;
//! * `staging_bytes`: the largest staging any rank used for one layer;
//! * `verified`: true when `--verify` checked every row (a mismatch is an error instead).
//!
//! Any rank's failure makes the command exit non-zero with the error on standard error.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moeshift_device_comm::{HostGroup, StoreClient, World};
use moeshift_eplb_comm::{open_communicator, set_log_hook, BackendChoice, LayerWeights};
use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;
use moeshift_tensor::{DType, HostBuffer};
use serde::{Deserialize, Serialize};

/// Where the expert weights live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DeviceArg {
    /// Host memory.
    Cpu,
    /// CUDA device memory (not supported yet).
    Cuda,
}

/// Arguments of `moeshift bench eplb-comm`.
#[derive(clap::Args)]
#[command(
    after_help = "Run under `moeshift launch --nproc N -- moeshift bench eplb-comm …`. Rank 0 prints \
one JSON object: backend, ranks, layers, bytes_moved, seconds, GBps_per_rank, staging_bytes, verified."
)]
pub struct Args {
    /// EPLB communicator backend: host, nccl, nixl or auto.
    #[arg(long, default_value = "auto", value_parser = parse_backend)]
    backend: BackendChoice,
    /// MoE layers to move.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Expert rows (local physical experts) per rank in every layer.
    #[arg(long, default_value_t = 8)]
    experts_per_rank: usize,
    /// Experts of every rank that move to another rank in every layer.
    #[arg(long, default_value_t = 2)]
    moved_per_rank: usize,
    /// Bytes of one expert across all its tensors.
    #[arg(long, default_value_t = 1 << 20)]
    expert_bytes: usize,
    /// Tensors per expert (the expert's bytes are split between them).
    #[arg(long, default_value_t = 1)]
    tensors: usize,
    /// Where the weights live: cpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Check every row of every layer byte for byte after the moves.
    #[arg(long)]
    verify: bool,
    /// Deadline in seconds for setup, for each layer, and for the final report.
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    deadline: f64,
    /// Seed of the random placements (use the same on every rank).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    s.parse::<BackendChoice>().map_err(|e| e.to_string())
}

/// What each rank reports to rank 0.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RankReport {
    error: Option<String>,
    backend: String,
    seconds: f64,
    bytes_received: u64,
    staging_peak: u64,
    verified: bool,
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.device == DeviceArg::Cuda {
        bail!(
            "--device cuda is not supported yet: the EPLB communicators here move host memory only \
             (use --device cpu)"
        );
    }
    let deadline_for = seconds(args.deadline)?;
    check_sizes(&args)?;
    let world =
        World::from_env().context("moeshift bench eplb-comm must run under `moeshift launch`")?;
    let (rank, ranks) = (world.rank(), world.world_size());
    if ranks < 2 && args.moved_per_rank > 0 {
        bail!("moving experts between ranks needs at least 2 ranks (WORLD_SIZE is {ranks})");
    }
    if rank != 0 {
        // One log line for the whole job is enough.
        set_log_hook(Some(Box::new(|_| {})));
    }
    let setup = Deadline::after(deadline_for);
    let store =
        StoreClient::connect(&world, setup).context("connecting to the rendezvous store")?;
    let control = HostGroup::world(&store, setup).context("forming the control group")?;

    let report = match run_rank(&args, &store, rank, ranks, deadline_for) {
        Ok(r) => r,
        Err(e) => RankReport {
            error: Some(format!("{e:#}")),
            ..RankReport::default()
        },
    };
    let mine = serde_json::to_vec(&report)?;
    let gathered = control
        .all_gather(&mine, Deadline::after(deadline_for))
        .context("gathering the ranks' results")?;
    if let Some(e) = &report.error {
        bail!("rank {rank}: {e}");
    }
    let reports = gathered
        .iter()
        .map(|b| serde_json::from_slice::<RankReport>(b))
        .collect::<Result<Vec<_>, _>>()
        .context("decoding the ranks' results")?;
    if let Some((r, e)) = reports
        .iter()
        .enumerate()
        .find_map(|(r, rep)| rep.error.as_ref().map(|e| (r, e)))
    {
        bail!("rank {r} failed: {e}");
    }
    if rank == 0 {
        let backend = reports
            .first()
            .map(|r| r.backend.clone())
            .unwrap_or_default();
        let bytes_moved: u64 = reports.iter().map(|r| r.bytes_received).sum();
        let secs = reports.iter().map(|r| r.seconds).fold(0.0f64, f64::max);
        let gbps = if secs > 0.0 {
            bytes_moved as f64 / ranks as f64 / secs / 1e9
        } else {
            0.0
        };
        let out = serde_json::json!({
            "backend": backend,
            "ranks": ranks,
            "layers": args.layers,
            "bytes_moved": bytes_moved,
            "seconds": secs,
            "GBps_per_rank": gbps,
            "staging_bytes": reports.iter().map(|r| r.staging_peak).max().unwrap_or(0),
            "verified": args.verify && reports.iter().all(|r| r.verified),
        });
        println!("{out}");
    }
    Ok(ExitCode::SUCCESS)
}

fn seconds(secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--deadline must be a positive number of seconds, not {secs}"))
}

fn check_sizes(args: &Args) -> anyhow::Result<()> {
    if args.layers == 0 || args.experts_per_rank == 0 || args.tensors == 0 {
        bail!("--layers, --experts-per-rank and --tensors must be at least 1");
    }
    if args.moved_per_rank > args.experts_per_rank {
        bail!(
            "--moved-per-rank {} exceeds --experts-per-rank {}",
            args.moved_per_rank,
            args.experts_per_rank
        );
    }
    if args.expert_bytes < args.tensors {
        bail!(
            "--expert-bytes {} cannot be split into {} tensors of at least one byte",
            args.expert_bytes,
            args.tensors
        );
    }
    Ok(())
}

/// Everything one rank does between setup and the report.
fn run_rank(
    args: &Args,
    store: &StoreClient,
    rank: usize,
    ranks: usize,
    deadline_for: Duration,
) -> anyhow::Result<RankReport> {
    let e = args.experts_per_rank;
    let tensor_bytes = split_bytes(args.expert_bytes, args.tensors);
    let mut rng = SplitMix(args.seed);
    let maps: Vec<(Vec<usize>, Vec<usize>)> = (0..args.layers)
        .map(|_| layer_maps(&mut rng, ranks, e, args.moved_per_rank))
        .collect();

    // Weights: per layer, one buffer per tensor, rows holding their old experts' patterns.
    let mut buffers = Vec::with_capacity(args.layers);
    for (old, _) in &maps {
        let mut bufs = Vec::with_capacity(args.tensors);
        for (t, &bytes) in tensor_bytes.iter().enumerate() {
            let mut buf = HostBuffer::zeroed(e * bytes).context("allocating expert weights")?;
            for (row, chunk) in buf
                .as_mut_slice()
                .chunks_exact_mut(bytes.max(1))
                .enumerate()
            {
                fill_row(chunk, old[rank * e + row], t);
            }
            bufs.push(buf);
        }
        buffers.push(bufs);
    }
    let mut weights = Vec::with_capacity(args.layers);
    for bufs in buffers.iter_mut() {
        let mut b = LayerWeights::builder();
        for (t, (buf, &bytes)) in bufs.iter_mut().zip(&tensor_bytes).enumerate() {
            b = b.host(&format!("t{t}"), buf, &[e, bytes], DType::U8)?;
        }
        weights.push(b.build()?);
    }
    let plans = maps
        .iter()
        .map(|(old, new)| LayerPlan::new(old, new, ranks))
        .collect::<Result<Vec<_>, _>>()?;

    let setup = Deadline::after(deadline_for);
    let members: Vec<usize> = (0..ranks).collect();
    let mut comm = open_communicator(args.backend, false, store, &members, &weights, setup)?;
    // Every rank starts the timed loop together.
    comm_barrier(store, setup)?;

    let started = Instant::now();
    let mut report = RankReport {
        backend: comm.backend().name().to_string(),
        ..RankReport::default()
    };
    for (layer, (plan, w)) in plans.iter().zip(weights.iter_mut()).enumerate() {
        let stats = comm
            .transfer_and_commit(layer, plan, w, Deadline::after(deadline_for))
            .with_context(|| format!("layer {layer}"))?;
        report.bytes_received += stats.bytes_received;
        report.staging_peak = report.staging_peak.max(stats.staging_bytes);
    }
    report.seconds = started.elapsed().as_secs_f64();
    drop(comm);
    drop(weights);

    if args.verify {
        for (layer, ((_, new), bufs)) in maps.iter().zip(&buffers).enumerate() {
            for (t, (buf, &bytes)) in bufs.iter().zip(&tensor_bytes).enumerate() {
                for (row, got) in buf.as_slice().chunks_exact(bytes.max(1)).enumerate() {
                    let expert = new[rank * e + row];
                    if let Some(at) = first_mismatch(got, expert, t) {
                        bail!(
                            "verification failed: layer {layer}, row {row}, tensor t{t} should hold \
                             expert {expert} but byte {at} differs"
                        );
                    }
                }
            }
        }
        report.verified = true;
    }
    Ok(report)
}

/// A store barrier, so the timed loop starts together on every rank.
fn comm_barrier(store: &StoreClient, deadline: Deadline) -> anyhow::Result<()> {
    store
        .barrier("bench-eplb-comm/start", deadline)
        .context("waiting for every rank to be ready")
}

/// `total` bytes split into `n` parts, the first ones one byte larger when it does not
/// divide.
fn split_bytes(total: usize, n: usize) -> Vec<usize> {
    (0..n)
        .map(|i| total / n + usize::from(i < total % n))
        .collect()
}

/// The old and new `phy2log` of one layer: a random permutation of `ranks · e` experts,
/// then, for each of the `m` moves, a random derangement of the ranks sends every rank's
/// next leaving expert into the next vacated row of its image. Exactly `m` experts leave
/// and `m` arrive on every rank.
fn layer_maps(rng: &mut SplitMix, ranks: usize, e: usize, m: usize) -> (Vec<usize>, Vec<usize>) {
    let mut old: Vec<usize> = (0..ranks * e).collect();
    rng.shuffle(&mut old);
    let mut new = old.clone();
    // Each rank's leaving rows: m distinct rows, in random order.
    let leaving: Vec<Vec<usize>> = (0..ranks)
        .map(|_| {
            let mut rows: Vec<usize> = (0..e).collect();
            rng.shuffle(&mut rows);
            rows.truncate(m);
            rows
        })
        .collect();
    for j in 0..m {
        let to = rng.derangement(ranks);
        for (r, &dst) in to.iter().enumerate() {
            // Rank r's j-th leaving expert fills dst's j-th vacated row.
            new[dst * e + leaving[dst][j]] = old[r * e + leaving[r][j]];
        }
    }
    (old, new)
}

/// A small deterministic generator (splitmix64), identical on every rank.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    /// A permutation of `0..n` with no fixed point (`n ≥ 2`), by rejection.
    fn derangement(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        loop {
            self.shuffle(&mut p);
            if p.iter().enumerate().all(|(i, &x)| i != x) || n < 2 {
                return p;
            }
        }
    }
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn row_seed(expert: usize, tensor: usize) -> u64 {
    mix(mix(expert as u64 ^ 0x5EED) ^ (tensor as u64).wrapping_mul(0x9E37_79B9))
}

/// Fills a row with the pattern of `(expert, tensor)`: byte `i` is byte `i % 8` of
/// `mix(seed ^ i / 8)`.
fn fill_row(row: &mut [u8], expert: usize, tensor: usize) {
    let seed = row_seed(expert, tensor);
    for (w, chunk) in row.chunks_mut(8).enumerate() {
        let word = mix(seed ^ w as u64).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// The first byte of `row` that differs from the pattern of `(expert, tensor)`.
fn first_mismatch(row: &[u8], expert: usize, tensor: usize) -> Option<usize> {
    let seed = row_seed(expert, tensor);
    for (w, chunk) in row.chunks(8).enumerate() {
        let word = mix(seed ^ w as u64).to_le_bytes();
        if let Some(k) = chunk.iter().zip(&word).position(|(a, b)| a != b) {
            return Some(w * 8 + k);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_sends_and_receives_exactly_m() {
        let mut rng = SplitMix(7);
        for (ranks, e, m) in [(2, 1, 1), (4, 8, 3), (5, 4, 4), (8, 16, 0), (3, 5, 2)] {
            let (old, new) = layer_maps(&mut rng, ranks, e, m);
            let mut sorted = new.clone();
            sorted.sort_unstable();
            assert_eq!(
                sorted,
                (0..ranks * e).collect::<Vec<_>>(),
                "no replicas, none lost"
            );
            for r in 0..ranks {
                let old_seg = &old[r * e..(r + 1) * e];
                let new_seg = &new[r * e..(r + 1) * e];
                let arrived = new_seg.iter().filter(|x| !old_seg.contains(x)).count();
                let left = old_seg.iter().filter(|x| !new_seg.contains(x)).count();
                assert_eq!((arrived, left), (m, m), "rank {r} of {ranks}, e {e}, m {m}");
            }
            // The plan moves exactly m experts into every rank.
            let plan = LayerPlan::new(&old, &new, ranks).unwrap();
            for r in 0..ranks {
                assert_eq!(plan.rank(r).unwrap().recvs.len(), m);
            }
        }
    }

    #[test]
    fn patterns_differ_between_experts_and_tensors() {
        let mut a = vec![0u8; 37];
        fill_row(&mut a, 3, 0);
        assert_eq!(first_mismatch(&a, 3, 0), None);
        assert!(first_mismatch(&a, 4, 0).is_some());
        assert!(first_mismatch(&a, 3, 1).is_some());
        a[36] ^= 1;
        assert_eq!(first_mismatch(&a, 3, 0), Some(36));
        assert_eq!(split_bytes(10, 3), vec![4, 3, 3]);
        assert_eq!(split_bytes(6, 3), vec![2, 2, 2]);
    }
}
