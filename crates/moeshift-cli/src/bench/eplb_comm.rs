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
//! * `verified`: true when `--verify` checked every row (a mismatch is an error instead);
//! * `phases`: where the time went, in seconds, as `{"per_layer": {NAME: [...]}, "median":
//!   {NAME: s}}`: `per_layer` lists, for every layer, the slowest rank's time in phase
//!   `NAME`; `median` is the median of that list over the layers. Every backend reports
//!   `transfer` (the transfer call) and `commit` (the commit call); the `nixl` backend
//!   splits its transfer into `agreement` (local checks and the plan agreement),
//!   `local_copies` (copies not hidden behind the READs), `reads` (posting the READs until
//!   all completed) and `status_exchange` (the post-read check);
//! * `mode`: `per_layer` (a transfer then a commit per layer) or `rearrange` (`--rearrange`:
//!   all layers in one pipelined `rearrange` call; `layer_seconds` are then each layer's own
//!   time from its transfer's start to its commit's end, which overlap, `phases` is empty
//!   and `GBps_per_rank_after_first` is `null`);
//! * `nixl_landing_slots`: the `nixl` backend's landing slots (`--nixl-landing-slots`,
//!   default 2 with `--rearrange`, else 1), `null` for other backends;
//! * `nixl_read_streams`: READ requests per peer and layer, each on its own UCX worker
//!   (`--nixl-read-streams`), and `nixl_read_requests`: per layer, the READ requests all
//!   ranks posted; both `null` for other backends (the requests also with `--rearrange`).
//!
//! Any rank's failure makes the command exit non-zero with the error on standard error.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moeshift_device_comm::{HostGroup, StoreClient, World};
use moeshift_eplb_comm::nixl::{NixlCommunicator, NixlConfig, DEFAULT_READ_STREAMS};
use moeshift_eplb_comm::{
    choose_backend, create_communicator, eplb_group, set_log_hook, Backend, BackendChoice,
    EplbCommunicator, LayerMove, LayerWeights,
};
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
GBps_per_rank_after_first, staging_bytes, verified, phases, mode, nixl_read_streams, \
nixl_landing_slots, nixl_read_requests."
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
    /// For the nixl backend: READ requests each peer's rows of a layer are split into, each
    /// on its own UCX worker (so copies from one peer GPU run on that many CUDA streams).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_READ_STREAMS)]
    nixl_read_streams: usize,
    /// Move all layers in one pipelined `rearrange` call (each layer's commit overlapping
    /// the next layer's transfer) instead of a transfer and a commit per layer.
    #[arg(long)]
    rearrange: bool,
    /// For the nixl backend: landing slots (staged layers held at once); default 2 with
    /// `--rearrange` (so commits overlap the next layer's READs), 1 otherwise.
    #[arg(long, value_name = "N")]
    nixl_landing_slots: Option<usize>,
}

impl Args {
    /// The nixl backend's landing slots for this run.
    fn landing_slots(&self) -> usize {
        self.nixl_landing_slots
            .unwrap_or(if self.rearrange { 2 } else { 1 })
    }
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
    /// Per layer, the seconds of each phase, by name, in the order they ran.
    layer_phases: Vec<Vec<(String, f64)>>,
    /// Per layer, the READ requests posted (`nixl` only).
    layer_read_requests: Vec<usize>,
}

/// The communicator of the run: the `nixl` backend is kept as itself, for its phases.
enum Comm<'w> {
    Nixl(Box<NixlCommunicator>),
    Other(Box<dyn EplbCommunicator + 'w>),
}

impl<'w> Comm<'w> {
    /// Chooses the backend for `args` and builds it over the EPLB group of `members`.
    fn open(
        args: &Args,
        store: &StoreClient,
        members: &[usize],
        weights: &[LayerWeights<'w>],
        deadline: Deadline,
    ) -> anyhow::Result<Self> {
        let selection = choose_backend(args.backend, false)?;
        let group = eplb_group(store, members, deadline)?;
        Ok(match selection.backend {
            Backend::Nixl => {
                let config = NixlConfig::default()
                    .read_streams(args.nixl_read_streams)
                    .landing_slots(args.landing_slots());
                Comm::Nixl(Box::new(NixlCommunicator::with_config(
                    group, weights, config, deadline,
                )?))
            }
            other => Comm::Other(create_communicator(other, group, weights, deadline)?),
        })
    }

    fn get(&mut self) -> &mut (dyn EplbCommunicator + 'w) {
        match self {
            Comm::Nixl(c) => c.as_mut(),
            Comm::Other(c) => c.as_mut(),
        }
    }

    /// The `nixl` backend's phases of the last transfer (seconds by name) and its READ
    /// requests; nothing for other backends.
    fn last_phases(&self) -> Option<(Vec<(String, f64)>, usize)> {
        match self {
            Comm::Nixl(c) => c.last_phases().map(|p| {
                let named = p.named().iter().map(|&(n, s)| (n.to_string(), s)).collect();
                (named, p.read_requests)
            }),
            Comm::Other(_) => None,
        }
    }
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
        // Most errors name their rank already.
        if e.starts_with(&format!("rank {rank}")) {
            bail!("{e}");
        }
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
    let nixl = backend == Backend::Nixl.name();
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
    // Pipelined layers overlap: their own times do not add up to the run's.
    let after_first = (args.layers >= 2 && !args.rearrange).then(|| {
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
        "phases": phases(args.layers, reports),
        "mode": if args.rearrange { "rearrange" } else { "per_layer" },
        "nixl_read_streams": nixl.then_some(args.nixl_read_streams),
        "nixl_landing_slots": nixl.then_some(args.landing_slots()),
        "nixl_read_requests": (nixl && !args.rearrange).then(|| {
            (0..args.layers)
                .map(|l| {
                    reports
                        .iter()
                        .filter_map(|r| r.layer_read_requests.get(l))
                        .sum::<usize>()
                })
                .collect::<Vec<_>>()
        }),
    })
}

/// The `phases` object: for every phase the first rank reported, the slowest rank's
/// seconds in every layer, and their median over the layers.
fn phases(layers: usize, reports: &[RankReport]) -> serde_json::Value {
    let names: Vec<String> = reports
        .first()
        .and_then(|r| r.layer_phases.first())
        .map(|p| p.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let mut per_layer = serde_json::Map::new();
    let mut median = serde_json::Map::new();
    for name in names {
        let slowest: Vec<f64> = (0..layers)
            .map(|l| {
                reports
                    .iter()
                    .filter_map(|r| r.layer_phases.get(l))
                    .flat_map(|p| p.iter().filter(|(n, _)| *n == name).map(|(_, s)| *s))
                    .fold(0.0f64, f64::max)
            })
            .collect();
        median.insert(name.clone(), serde_json::json!(median_of(&slowest)));
        per_layer.insert(name, serde_json::json!(slowest));
    }
    serde_json::json!({ "per_layer": per_layer, "median": median })
}

/// The median of `values` (the mean of the two middle ones for an even count; 0 for none).
fn median_of(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
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
        let mut comm = Comm::open(args, store, &members, &weights, setup)?;
        report.backend = comm.get().backend().name().to_string();
        // Every rank starts the timed loop together.
        comm_barrier(store, setup)?;

        let started = Instant::now();
        if args.rearrange {
            let mut moves: Vec<LayerMove<'_, '_>> = plans
                .iter()
                .zip(weights.iter_mut())
                .enumerate()
                .map(|(layer, (plan, weights))| LayerMove {
                    layer,
                    plan,
                    weights,
                })
                .collect();
            let stats = comm
                .get()
                .rearrange(&mut moves, Deadline::after(deadline_for))
                .context("rearranging every layer")?;
            report.seconds = started.elapsed().as_secs_f64();
            for s in &stats {
                report.layer_seconds.push(s.seconds);
                report.layer_bytes.push(s.bytes_received);
                report.bytes_received += s.bytes_received;
                report.staging_peak = report.staging_peak.max(s.staging_bytes);
            }
        }
        for (layer, (plan, w)) in plans
            .iter()
            .zip(weights.iter_mut())
            .enumerate()
            .filter(|_| !args.rearrange)
        {
            let layer_started = Instant::now();
            let staged = comm
                .get()
                .transfer(layer, plan, w, Deadline::after(deadline_for))
                .with_context(|| format!("layer {layer}"))?;
            let transferred = layer_started.elapsed().as_secs_f64();
            let commit_started = Instant::now();
            let stats = staged
                .commit_within(w, Deadline::after(deadline_for))
                .with_context(|| format!("committing layer {layer}"))?;
            let committed = commit_started.elapsed().as_secs_f64();
            report
                .layer_seconds
                .push(layer_started.elapsed().as_secs_f64());
            let mut phases = Vec::new();
            if let Some((named, requests)) = comm.last_phases() {
                phases.extend(named);
                report.layer_read_requests.push(requests);
            }
            phases.push(("transfer".to_string(), transferred));
            phases.push(("commit".to_string(), committed));
            report.layer_phases.push(phases);
            report.layer_bytes.push(stats.bytes_received);
            report.bytes_received += stats.bytes_received;
            report.staging_peak = report.staging_peak.max(stats.staging_bytes);
        }
        if !args.rearrange {
            report.seconds = started.elapsed().as_secs_f64();
        }
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
            // Commits take a tenth of each layer.
            layer_phases: secs
                .iter()
                .map(|&s| vec![("transfer".into(), s * 0.9), ("commit".into(), s * 0.1)])
                .collect(),
            layer_read_requests: vec![],
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
        // Per layer the slowest rank's phases: transfers of 1.8 s and 0.45 s, commits of
        // 0.2 s and 0.05 s; medians of two layers are their means.
        let close = |v: &serde_json::Value, want: f64| {
            let got = v.as_f64().unwrap();
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        };
        let per_layer = &s["phases"]["per_layer"];
        close(&per_layer["transfer"][0], 1.8);
        close(&per_layer["transfer"][1], 0.45);
        close(&per_layer["commit"][0], 0.2);
        close(&per_layer["commit"][1], 0.05);
        close(&s["phases"]["median"]["transfer"], (1.8 + 0.45) / 2.0);
        close(&s["phases"]["median"]["commit"], 0.125);
        // Not the nixl backend: no READ streams.
        assert!(s["nixl_read_streams"].is_null());
        assert!(s["nixl_read_requests"].is_null());
    }

    #[test]
    fn nixl_summaries_report_the_read_streams_and_phases() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let parse = |line: &str| {
            <Cli as clap::Parser>::try_parse_from(line.split_whitespace())
                .unwrap()
                .args
        };
        assert_eq!(parse("x").nixl_read_streams, DEFAULT_READ_STREAMS);
        let args = parse("x --layers 3 --backend nixl --nixl-read-streams 2");
        assert_eq!(args.nixl_read_streams, 2);
        let phases = |reads: f64| {
            vec![
                ("agreement".to_string(), 0.01),
                ("local_copies".to_string(), 0.02),
                ("reads".to_string(), reads),
                ("status_exchange".to_string(), 0.001),
                ("transfer".to_string(), reads + 0.05),
                ("commit".to_string(), 0.03),
            ]
        };
        let report = |reads: [f64; 3], requests: Vec<usize>| RankReport {
            backend: "nixl".into(),
            layer_phases: reads.iter().map(|&r| phases(r)).collect(),
            layer_read_requests: requests,
            ..RankReport::default()
        };
        let reports = [
            report([0.5, 0.2, 0.3], vec![2, 2, 1]),
            report([0.4, 0.3, 0.1], vec![2, 1, 2]),
        ];
        let s = summary(&args, &[4], 2, &reports);
        assert_eq!(s["nixl_read_streams"], 2);
        assert_eq!(s["nixl_read_requests"], serde_json::json!([4, 3, 3]));
        // The slowest READs per layer: 0.5, 0.3, 0.3; their median is 0.3.
        assert_eq!(
            s["phases"]["per_layer"]["reads"],
            serde_json::json!([0.5, 0.3, 0.3])
        );
        assert_eq!(s["phases"]["median"]["reads"], 0.3);
        let names: Vec<&String> = s["phases"]["median"].as_object().unwrap().keys().collect();
        for name in [
            "agreement",
            "local_copies",
            "reads",
            "status_exchange",
            "transfer",
            "commit",
        ] {
            assert!(
                names.iter().any(|n| *n == name),
                "{name} missing: {names:?}"
            );
        }
    }
}
