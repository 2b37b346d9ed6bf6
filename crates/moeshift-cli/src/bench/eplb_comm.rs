//! `moeshift bench eplb-comm`: moves random layer plans through an EPLB communicator and
//! reports the throughput. Run it under `moeshift launch` (or any torchrun-style launcher):
//!
//! ```text
//! moeshift launch --nproc 4 -- moeshift bench eplb-comm --backend host --layers 8 \
//!     --experts-per-rank 16 --moved-per-rank 4 --expert-bytes 4194304 --tensors 2 --verify
//! ```
//!
//! A DeepSeek-V3 MoE layer on GPUs (w13 `[4096, 7168]` and w2 `[7168, 2048]` in bf16 per
//! expert, 32 experts per rank, 8 of them moving), with a binary built with feature `cuda`:
//!
//! ```text
//! moeshift launch --nproc 2 -- moeshift bench eplb-comm --device cuda --backend nccl \
//!     --layers 3 --experts-per-rank 32 --moved-per-rank 8 \
//!     --tensor-bytes 58720256,29360128 --verify
//! ```
//!
//! Every layer holds `E` experts per rank (no replicas) and moves a random plan in which
//! exactly `M` experts of every rank go to other ranks, and `M` arrive from them. Every
//! rank derives the same placements from `--seed`. Expert rows hold a pattern derived from
//! `(expert, tensor, byte index)`, so `--verify` checks every row of every layer byte for
//! byte after the moves (for `--device cuda`, after copying the rows back to the host).
//! With `--device cuda`, each rank's weights live on GPU `LOCAL_RANK`, allocated with
//! `cuMemAlloc` as PyTorch's caching allocator does (not from a stream-ordered pool), so
//! the `nixl` backend's peers can READ them through CUDA IPC.
//!
//! Rank 0 prints one JSON object:
//!
//! * `backend`, `device`, `ranks`, `layers`, `experts_per_rank`, `moved_per_rank`,
//!   `tensor_bytes` (bytes of one expert's row of each tensor), `expert_bytes`;
//! * `bytes_moved`: expert-row bytes received over the wire, summed over ranks;
//! * `seconds`: the slowest rank's time for all layers (transfer and commit);
//! * `GBps_per_rank`: `bytes_moved / ranks / seconds / 1e9`;
//! * `layer_seconds`: per layer, the slowest rank's time;
//! * `GBps_per_rank_after_first`: the same rate over the layers after the first (which
//!   also pays for first-use allocations), when there are at least two;
//! * `staging_bytes`: the largest staging any rank used for one layer (as the backend
//!   reports it: staged rows, plus packed rows for `nccl`, plus page-locked wire staging for
//!   `host` with CUDA weights);
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

use crate::pattern::{fill_row, first_mismatch, SplitMix};

/// Where the expert weights live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DeviceArg {
    /// Host memory.
    Cpu,
    /// CUDA device memory on GPU `LOCAL_RANK` (needs a binary built with feature `cuda`).
    Cuda,
}

impl DeviceArg {
    fn name(self) -> &'static str {
        match self {
            DeviceArg::Cpu => "cpu",
            DeviceArg::Cuda => "cuda",
        }
    }
}

/// Arguments of `moeshift bench eplb-comm`.
#[derive(clap::Args)]
#[command(
    after_help = "Run under `moeshift launch --nproc N -- moeshift bench eplb-comm …`. Rank 0 prints \
one JSON object: backend, device, ranks, layers, bytes_moved, seconds, GBps_per_rank, layer_seconds, \
GBps_per_rank_after_first, staging_bytes, verified."
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
    /// Bytes of one expert across all its tensors (split evenly between `--tensors`).
    #[arg(long, default_value_t = 1 << 20, conflicts_with = "tensor_bytes")]
    expert_bytes: usize,
    /// Tensors per expert.
    #[arg(long, default_value_t = 1)]
    tensors: usize,
    /// Bytes of one expert's row of each tensor, comma-separated (e.g. `58720256,29360128`
    /// for DeepSeek-V3's w13 and w2 in bf16); replaces `--expert-bytes`, and `--tensors`
    /// must match the count when given.
    #[arg(long, value_delimiter = ',', value_name = "BYTES,...")]
    tensor_bytes: Vec<usize>,
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
    layer_seconds: Vec<f64>,
    layer_bytes: Vec<u64>,
    bytes_received: u64,
    staging_peak: u64,
    verified: bool,
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.device == DeviceArg::Cuda && !cfg!(feature = "cuda") {
        bail!(
            "--device cuda needs a moeshift binary built with feature `cuda` \
             (cargo build -p moeshift-cli --features cuda)"
        );
    }
    let deadline_for = seconds(args.deadline)?;
    let tensor_bytes = tensor_sizes(&args)?;
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

    let report = match run_rank(&args, &tensor_bytes, &store, &world, deadline_for) {
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
        println!("{}", summary(&args, &tensor_bytes, ranks, &reports));
    }
    Ok(ExitCode::SUCCESS)
}

/// Rank 0's JSON object from every rank's report.
fn summary(
    args: &Args,
    tensor_bytes: &[usize],
    ranks: usize,
    reports: &[RankReport],
) -> serde_json::Value {
    let backend = reports
        .first()
        .map(|r| r.backend.clone())
        .unwrap_or_default();
    let bytes_moved: u64 = reports.iter().map(|r| r.bytes_received).sum();
    let secs = reports.iter().map(|r| r.seconds).fold(0.0f64, f64::max);
    let rate = |bytes: u64, secs: f64| {
        if secs > 0.0 {
            bytes as f64 / ranks as f64 / secs / 1e9
        } else {
            0.0
        }
    };
    // Per layer: the slowest rank's time, and the bytes all ranks received.
    let layer_seconds: Vec<f64> = (0..args.layers)
        .map(|l| {
            reports
                .iter()
                .filter_map(|r| r.layer_seconds.get(l).copied())
                .fold(0.0f64, f64::max)
        })
        .collect();
    let layer_bytes: Vec<u64> = (0..args.layers)
        .map(|l| {
            reports
                .iter()
                .filter_map(|r| r.layer_bytes.get(l).copied())
                .sum()
        })
        .collect();
    let after_first = (args.layers >= 2).then(|| {
        rate(
            layer_bytes.iter().skip(1).sum(),
            layer_seconds.iter().skip(1).sum(),
        )
    });
    serde_json::json!({
        "backend": backend,
        "device": args.device.name(),
        "ranks": ranks,
        "layers": args.layers,
        "experts_per_rank": args.experts_per_rank,
        "moved_per_rank": args.moved_per_rank,
        "tensor_bytes": tensor_bytes,
        "expert_bytes": tensor_bytes.iter().sum::<usize>(),
        "bytes_moved": bytes_moved,
        "seconds": secs,
        "GBps_per_rank": rate(bytes_moved, secs),
        "layer_seconds": layer_seconds,
        "GBps_per_rank_after_first": after_first,
        "staging_bytes": reports.iter().map(|r| r.staging_peak).max().unwrap_or(0),
        "verified": args.verify && reports.iter().all(|r| r.verified),
    })
}

fn seconds(secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--deadline must be a positive number of seconds, not {secs}"))
}

/// Bytes of one expert's row of each tensor: `--tensor-bytes`, or `--expert-bytes` split
/// into `--tensors` parts.
fn tensor_sizes(args: &Args) -> anyhow::Result<Vec<usize>> {
    if args.tensor_bytes.is_empty() {
        if args.tensors == 0 {
            bail!("--tensors must be at least 1");
        }
        if args.expert_bytes < args.tensors {
            bail!(
                "--expert-bytes {} cannot be split into {} tensors of at least one byte",
                args.expert_bytes,
                args.tensors
            );
        }
        return Ok(split_bytes(args.expert_bytes, args.tensors));
    }
    // `--tensors` keeps its default of 1 unless given; with a list it must match.
    if args.tensors != 1 && args.tensors != args.tensor_bytes.len() {
        bail!(
            "--tensors {} does not match the {} sizes of --tensor-bytes",
            args.tensors,
            args.tensor_bytes.len()
        );
    }
    if let Some(t) = args.tensor_bytes.iter().position(|&b| b == 0) {
        bail!("--tensor-bytes: tensor {t} has empty rows");
    }
    Ok(args.tensor_bytes.clone())
}

fn check_sizes(args: &Args) -> anyhow::Result<()> {
    if args.layers == 0 || args.experts_per_rank == 0 {
        bail!("--layers and --experts-per-rank must be at least 1");
    }
    if args.moved_per_rank > args.experts_per_rank {
        bail!(
            "--moved-per-rank {} exceeds --experts-per-rank {}",
            args.moved_per_rank,
            args.experts_per_rank
        );
    }
    Ok(())
}

/// The expert weights of every layer, in host or device memory.
enum Weights {
    Host(Vec<Vec<HostBuffer>>),
    #[cfg(feature = "cuda")]
    Cuda(Vec<Vec<moeshift_eplb_comm::nixl::IpcCudaBuffer>>),
}

impl Weights {
    /// Per layer one buffer per tensor, row `r` holding the pattern of expert `experts(l)[r]`.
    fn new(
        device: DeviceArg,
        gpu: usize,
        tensor_bytes: &[usize],
        e: usize,
        layers: impl Iterator<Item = Vec<usize>>,
    ) -> anyhow::Result<Self> {
        let fill = |experts: &[usize], t: usize, bytes: usize, buf: &mut [u8]| {
            for (row, chunk) in buf.chunks_exact_mut(bytes).enumerate() {
                fill_row(chunk, experts[row], t);
            }
        };
        match device {
            DeviceArg::Cpu => {
                let mut all = Vec::new();
                for experts in layers {
                    let mut bufs = Vec::with_capacity(tensor_bytes.len());
                    for (t, &bytes) in tensor_bytes.iter().enumerate() {
                        let mut buf =
                            HostBuffer::zeroed(e * bytes).context("allocating expert weights")?;
                        fill(&experts, t, bytes, buf.as_mut_slice());
                        bufs.push(buf);
                    }
                    all.push(bufs);
                }
                Ok(Weights::Host(all))
            }
            #[cfg(feature = "cuda")]
            DeviceArg::Cuda => {
                let mut all = Vec::new();
                let mut host = Vec::new();
                for experts in layers {
                    let mut bufs = Vec::with_capacity(tensor_bytes.len());
                    for (t, &bytes) in tensor_bytes.iter().enumerate() {
                        host.resize(e * bytes, 0u8);
                        fill(&experts, t, bytes, &mut host);
                        bufs.push(
                            moeshift_eplb_comm::nixl::IpcCudaBuffer::from_host(gpu, &host)
                                .with_context(|| {
                                    format!(
                                        "putting {} bytes of expert weights on cuda:{gpu}",
                                        e * bytes
                                    )
                                })?,
                        );
                    }
                    all.push(bufs);
                }
                Ok(Weights::Cuda(all))
            }
            #[cfg(not(feature = "cuda"))]
            DeviceArg::Cuda => {
                let _ = (gpu, layers);
                bail!("--device cuda needs a moeshift binary built with feature `cuda`")
            }
        }
    }

    /// The layers as [`LayerWeights`], tensors named `t0`, `t1`, ….
    fn layers(
        &mut self,
        tensor_bytes: &[usize],
        e: usize,
    ) -> anyhow::Result<Vec<LayerWeights<'_>>> {
        let mut out = Vec::new();
        match self {
            Weights::Host(all) => {
                for bufs in all.iter_mut() {
                    let mut b = LayerWeights::builder();
                    for (t, (buf, &bytes)) in bufs.iter_mut().zip(tensor_bytes).enumerate() {
                        b = b.host(&format!("t{t}"), buf, &[e, bytes], DType::U8)?;
                    }
                    out.push(b.build()?);
                }
            }
            #[cfg(feature = "cuda")]
            Weights::Cuda(all) => {
                for bufs in all.iter() {
                    out.push(device_layer(bufs, tensor_bytes, e)?);
                }
            }
        }
        Ok(out)
    }

    /// Row `row` of tensor `t` of every layer must hold expert `experts(l)[row]`.
    fn verify(
        &self,
        tensor_bytes: &[usize],
        experts: impl Fn(usize) -> Vec<usize>,
    ) -> anyhow::Result<()> {
        let check = |layer: usize, t: usize, bytes: usize, data: &[u8]| -> anyhow::Result<()> {
            let want = experts(layer);
            for (row, got) in data.chunks_exact(bytes).enumerate() {
                let expert = want[row];
                if let Some(at) = first_mismatch(got, expert, t) {
                    bail!(
                        "verification failed: layer {layer}, row {row}, tensor t{t} should hold \
                         expert {expert} but byte {at} differs"
                    );
                }
            }
            Ok(())
        };
        match self {
            Weights::Host(all) => {
                for (layer, bufs) in all.iter().enumerate() {
                    for (t, (buf, &bytes)) in bufs.iter().zip(tensor_bytes).enumerate() {
                        check(layer, t, bytes, buf.as_slice())?;
                    }
                }
            }
            #[cfg(feature = "cuda")]
            Weights::Cuda(all) => {
                for (layer, bufs) in all.iter().enumerate() {
                    for (t, (buf, &bytes)) in bufs.iter().zip(tensor_bytes).enumerate() {
                        let data = buf.to_vec().context("copying expert weights back")?;
                        check(layer, t, bytes, &data)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Device buffers (`e` rows of `tensor_bytes[t]` bytes each) as one layer's weights.
#[cfg(feature = "cuda")]
fn device_layer<'a>(
    bufs: &'a [moeshift_eplb_comm::nixl::IpcCudaBuffer],
    tensor_bytes: &[usize],
    e: usize,
) -> anyhow::Result<LayerWeights<'a>> {
    let mut b = LayerWeights::builder();
    for (t, (buf, &bytes)) in bufs.iter().zip(tensor_bytes).enumerate() {
        let view = buf.view(&[e, bytes], DType::U8)?;
        // SAFETY: `view` covers the start of `buf`, a live device allocation borrowed for
        // 'a, so it outlives the weights; the benchmark touches the buffers only through the
        // weights until they are dropped, then reads them back.
        b = unsafe { b.raw(&format!("t{t}"), view) }?;
    }
    Ok(b.build()?)
}

/// Everything one rank does between setup and the report.
fn run_rank(
    args: &Args,
    tensor_bytes: &[usize],
    store: &StoreClient,
    world: &World,
    deadline_for: Duration,
) -> anyhow::Result<RankReport> {
    let (rank, ranks) = (world.rank(), world.world_size());
    let e = args.experts_per_rank;
    let mut rng = SplitMix(args.seed);
    let maps: Vec<(Vec<usize>, Vec<usize>)> = (0..args.layers)
        .map(|_| layer_maps(&mut rng, ranks, e, args.moved_per_rank))
        .collect();
    let mine = |map: &[usize]| map[rank * e..(rank + 1) * e].to_vec();

    let mut storage = Weights::new(
        args.device,
        world.local_rank(),
        tensor_bytes,
        e,
        maps.iter().map(|(old, _)| mine(old)),
    )?;
    let plans = maps
        .iter()
        .map(|(old, new)| LayerPlan::new(old, new, ranks))
        .collect::<Result<Vec<_>, _>>()?;

    let mut report = RankReport::default();
    {
        let mut weights = storage.layers(tensor_bytes, e)?;
        let setup = Deadline::after(deadline_for);
        let members: Vec<usize> = (0..ranks).collect();
        let mut comm = open_communicator(args.backend, false, store, &members, &weights, setup)?;
        report.backend = comm.backend().name().to_string();
        // Every rank starts the timed loop together.
        comm_barrier(store, setup)?;

        let started = Instant::now();
        for (layer, (plan, w)) in plans.iter().zip(weights.iter_mut()).enumerate() {
            let layer_started = Instant::now();
            let stats = comm
                .transfer_and_commit(layer, plan, w, Deadline::after(deadline_for))
                .with_context(|| format!("layer {layer}"))?;
            report
                .layer_seconds
                .push(layer_started.elapsed().as_secs_f64());
            report.layer_bytes.push(stats.bytes_received);
            report.bytes_received += stats.bytes_received;
            report.staging_peak = report.staging_peak.max(stats.staging_bytes);
        }
        report.seconds = started.elapsed().as_secs_f64();
    }

    if args.verify {
        storage.verify(tensor_bytes, |layer| mine(&maps[layer].1))?;
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
    fn byte_splits_and_tensor_sizes() {
        assert_eq!(split_bytes(10, 3), vec![4, 3, 3]);
        assert_eq!(split_bytes(6, 3), vec![2, 2, 2]);
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let parse = |line: &str| {
            <Cli as clap::Parser>::try_parse_from(line.split_whitespace()).map(|c| c.args)
        };
        // DeepSeek-V3: w13 [4096, 7168] and w2 [7168, 2048] in bf16.
        let a = parse("x --tensors 2 --tensor-bytes 58720256,29360128 --device cuda").unwrap();
        assert_eq!(
            tensor_sizes(&a).unwrap(),
            vec![4096 * 7168 * 2, 7168 * 2048 * 2]
        );
        assert_eq!(a.device, DeviceArg::Cuda);
        let a = parse("x --tensor-bytes 8,4,2").unwrap();
        assert_eq!(tensor_sizes(&a).unwrap(), vec![8, 4, 2]);
        let a = parse("x --tensors 3 --tensor-bytes 8,4").unwrap();
        assert!(tensor_sizes(&a)
            .unwrap_err()
            .to_string()
            .contains("--tensors 3"));
        let a = parse("x --tensor-bytes 8,0").unwrap();
        assert!(tensor_sizes(&a).is_err());
        let a = parse("x --expert-bytes 10 --tensors 3").unwrap();
        assert_eq!(tensor_sizes(&a).unwrap(), vec![4, 3, 3]);
        assert!(parse("x --expert-bytes 10 --tensor-bytes 5,5").is_err());
    }

    #[test]
    fn summary_takes_the_slowest_rank_per_layer() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let args =
            <Cli as clap::Parser>::try_parse_from(["x", "--layers", "2", "--backend", "nccl"])
                .unwrap()
                .args;
        let report = |secs: [f64; 2], bytes: [u64; 2], staging: u64| RankReport {
            backend: "nccl".into(),
            seconds: secs[0] + secs[1],
            layer_seconds: secs.to_vec(),
            layer_bytes: bytes.to_vec(),
            bytes_received: bytes[0] + bytes[1],
            staging_peak: staging,
            verified: false,
            error: None,
        };
        let reports = [
            report([1.0, 0.5], [4_000_000_000, 2_000_000_000], 10),
            report([2.0, 0.25], [4_000_000_000, 2_000_000_000], 30),
        ];
        let s = summary(&args, &[3, 5], 2, &reports);
        assert_eq!(s["layer_seconds"], serde_json::json!([2.0, 0.5]));
        // 12 GB over 2 ranks in the slowest rank's 2.25 s; after the first layer, 4 GB over
        // 2 ranks in 0.5 s.
        assert_eq!(s["bytes_moved"], 12_000_000_000u64);
        assert!((s["GBps_per_rank"].as_f64().unwrap() - 6.0 / 2.25).abs() < 1e-9);
        assert!((s["GBps_per_rank_after_first"].as_f64().unwrap() - 4.0).abs() < 1e-9);
        assert_eq!(s["staging_bytes"], 30);
        assert_eq!(s["expert_bytes"], 8);
        assert_eq!(s["verified"], false);
    }
}
