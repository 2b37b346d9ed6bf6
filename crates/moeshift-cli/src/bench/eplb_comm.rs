//! `moeshift bench eplb-comm`: moves layer plans through an EPLB communicator and reports the
//! throughput. Run it under `moeshift launch` (or any torchrun-style launcher):
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
//! # Plans
//!
//! `--plan random` (the default): every layer holds `E = --experts-per-rank` experts per
//! rank (no replicas) and moves a random plan in which exactly `M = --moved-per-rank`
//! (default 2) experts of every rank go to other ranks, and `M` arrive from them.
//!
//! `--plan migration`: a rebalance as the serving side would run it. `--experts-per-rank` is
//! the number of physical slots `S` per rank, `--logical-experts L` (default 256, at most
//! `S × ranks`) the logical experts; the extra slots hold replicas. For every layer the
//! bench draws log-normal expert loads (σ = 1), places them with [`deepseek()`] (the old
//! placement), multiplies every load by `exp(N(0, σ_d))` (`--drift-sigma σ_d`, default
//! 0.25: one window of drift) and re-plans with [`migration()`] from the old placement (the
//! new placement), on one node of `ranks` GPUs with 8 expert groups when `L` is a multiple
//! of 8, else 1. The moves are those [`LayerPlan`] derives from the two maps: receives over
//! the wire, local copies and duplicate fills. `--moved-per-rank` is rejected in this mode.
//! With 36 slots for 256 experts per 8 GPUs and the default drift, the migration-aware
//! policy mostly rebalances with local copies (a second replica of an expert the rank
//! already holds) and sends only a few rows, if any, over the wire per layer.
//!
//! `--plan deepseek`: the same old placement and drift, re-planned with [`deepseek()`] and
//! slot preservation (what vLLM's default policy does): most replicas change rank, so
//! this is the heavy rearrangement to compare transports on.
//!
//! In every mode every rank derives the same placements from `--seed`. Expert rows hold a
//! pattern derived from `(expert, tensor, byte index)` (replicas of an expert hold the same
//! bytes), so `--verify` checks every row of every layer byte for byte against the new
//! placement after the moves (for `--device cuda`, after copying the rows back to the host).
//! With `--device cuda`, each rank's weights live on GPU `LOCAL_RANK` (`--share-gpus`: ranks
//! may outnumber the GPUs and share them, for checking only), allocated with
//! `cuMemAlloc` as PyTorch's caching allocator does (not from a stream-ordered pool), so
//! the `nixl` backend's peers can READ them through CUDA IPC.
//!
//! # Plan file
//!
//! With `--plan-out FILE`, rank 0 writes the rows the bench moves as one JSON object, for
//! `bench/torch_eplb_peer.py` to replay the same moves with `torch.distributed`:
//!
//! * `ranks`, `slots_per_rank` (rows per rank and tensor), `tensor_bytes` (bytes of one
//!   expert row of each tensor), `plan` (`random`, `migration` or `deepseek`), `seed`;
//! * `layers`: one object per layer with
//!   * `moves`: `[src_rank, src_row, dst_rank, dst_row]` for every row written from the
//!     *old* content of another row: the receives over the wire (`src_rank ≠ dst_rank`,
//!     the source being the row the sender actually sends from) and the local copies
//!     (`src_rank = dst_rank`), sorted by `(src_rank, dst_rank, dst_row)`. One source row
//!     may feed several moves;
//!   * `fills`: `[rank, src_row, dst_row]` for every further replica of an expert that
//!     arrived over the wire: copied on `rank` from row `src_row` *after* it received its
//!     new content (the `dst_row` of a move of the same layer);
//!   * `old_phy2log`, `new_phy2log`: the layer's maps (rank-major, `ranks × slots_per_rank`
//!     logical expert ids), for checking.
//!
//! Rows are local slot indices; every row that changes content appears once as the
//! destination of a move or a fill. Example for EP = 8 with DeepSeek-V3's shapes (36 slots per
//! GPU, 256 logical experts), then the PyTorch peer on the same GPUs:
//!
//! ```text
//! moeshift launch --nproc 8 -- moeshift bench eplb-comm --device cuda --backend nccl \
//!     --plan migration --experts-per-rank 36 --logical-experts 256 --layers 3 \
//!     --tensor-bytes 58720256,29360128 --verify --plan-out plan.json
//! python3 bench/torch_eplb_peer.py --plan plan.json
//! ```
//!
//! (`--plan deepseek` instead gives the heavy rearrangement of a full re-plan.)
//!
//! Rank 0 prints one JSON object:
//!
//! * `backend`, `device`, `ranks`, `layers`, `experts_per_rank`, `moved_per_rank` (`null`
//!   with `--plan migration` or `deepseek`), `tensor_bytes` (bytes of one expert's row of each tensor),
//!   `expert_bytes`;
//! * `plan`: `random`, `migration` or `deepseek`; with the last two also `logical_experts`,
//!   `drift_sigma`, `expert_groups` (the groups of the topology the policies ran on), and
//!   per layer, summed over ranks, `layer_rows_received` (expert rows received over the
//!   wire) and `layer_rows_copied` (rows copied on their rank: local copies and duplicate
//!   fills);
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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moeshift_device_comm::{HostGroup, StoreClient, World};
use moeshift_eplb_comm::nixl::{NixlCommunicator, NixlConfig, DEFAULT_READ_STREAMS};
use moeshift_eplb_comm::{
    choose_backend, create_communicator, eplb_group, set_log_hook, Backend, BackendChoice,
    EplbCommunicator, LayerMove, LayerWeights,
};
use moeshift_placement::{deepseek, migration, LayerPlan, LoadMatrix, MigrationOptions, Topology};
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

/// How the layers' placements are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PlanArg {
    /// No replicas; exactly `--moved-per-rank` experts of every rank move to other ranks.
    Random,
    /// DeepSeek placement of log-normal loads, then the migration-aware policy after one
    /// window of drift.
    Migration,
    /// As `migration`, but re-planned with the DeepSeek policy (with slot preservation), as
    /// vLLM's default policy rebalances.
    Deepseek,
}

/// Default of `--moved-per-rank` with `--plan random`.
const DEFAULT_MOVED_PER_RANK: usize = 2;
/// Default of `--logical-experts` with `--plan migration` (DeepSeek-V3's routed experts).
const DEFAULT_LOGICAL_EXPERTS: usize = 256;
/// Default of `--drift-sigma` with `--plan migration`.
const DEFAULT_DRIFT_SIGMA: f64 = 0.25;

/// The policy that re-plans the drifted loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DriftPolicy {
    /// [`migration()`] from the old placement.
    Migration,
    /// [`deepseek()`] with slot preservation.
    DeepSeek,
}

/// The plan options, resolved and checked.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PlanKind {
    /// `--plan random`.
    Random {
        /// Experts of every rank that move to another rank.
        moved_per_rank: usize,
    },
    /// `--plan migration` or `--plan deepseek`.
    Drift {
        /// The policy of the new placement.
        policy: DriftPolicy,
        /// Logical experts.
        logical_experts: usize,
        /// Standard deviation of the log-normal drift of every load.
        drift_sigma: f64,
    },
}

impl PlanKind {
    fn name(&self) -> &'static str {
        match self {
            PlanKind::Random { .. } => "random",
            PlanKind::Drift {
                policy: DriftPolicy::Migration,
                ..
            } => "migration",
            PlanKind::Drift {
                policy: DriftPolicy::DeepSeek,
                ..
            } => "deepseek",
        }
    }

    /// `--plan migration` with the given shape (for tests).
    #[cfg(test)]
    fn migration(logical_experts: usize, drift_sigma: f64) -> Self {
        PlanKind::Drift {
            policy: DriftPolicy::Migration,
            logical_experts,
            drift_sigma,
        }
    }
}

/// Arguments of `moeshift bench eplb-comm`.
#[derive(clap::Args)]
#[command(
    after_help = "Run under `moeshift launch --nproc N -- moeshift bench eplb-comm …`. Rank 0 prints \
one JSON object: backend, device, ranks, layers, plan, bytes_moved, seconds, GBps_per_rank, \
layer_seconds, GBps_per_rank_after_first, staging_bytes, verified, phases, mode, nixl_read_streams, \
nixl_landing_slots, nixl_read_requests; with --plan migration or deepseek also logical_experts, drift_sigma, \
expert_groups, layer_rows_received, layer_rows_copied. --plan-out FILE writes the moved rows for \
bench/torch_eplb_peer.py."
)]
pub struct Args {
    /// EPLB communicator backend: host, nccl, nixl or auto.
    #[arg(long, default_value = "auto", value_parser = parse_backend)]
    backend: BackendChoice,
    /// MoE layers to move.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Expert rows (physical slots) per rank in every layer.
    #[arg(long, default_value_t = 8)]
    experts_per_rank: usize,
    /// How the placements are drawn: random (no replicas, `--moved-per-rank` experts of
    /// every rank move), migration (DeepSeek placement of log-normal loads, re-planned by
    /// the migration-aware policy after one window of drift) or deepseek (the same, re-planned
    /// by the DeepSeek policy).
    #[arg(long, value_enum, default_value_t = PlanArg::Random)]
    plan: PlanArg,
    /// With `--plan random`: experts of every rank that move to another rank in every layer
    /// [default: 2].
    #[arg(long)]
    moved_per_rank: Option<usize>,
    /// With `--plan migration` or `deepseek`: logical experts, at most `--experts-per-rank`
    /// × ranks [default: 256].
    #[arg(long, value_name = "L")]
    logical_experts: Option<usize>,
    /// With `--plan migration` or `deepseek`: standard deviation of the drift, every load
    /// being multiplied by `exp(N(0, sigma))` between the old and the new placement
    /// [default: 0.25].
    #[arg(long, value_name = "SIGMA", allow_negative_numbers = true)]
    drift_sigma: Option<f64>,
    /// Rank 0 writes the rows moved in every layer to this JSON file (for
    /// `bench/torch_eplb_peer.py`).
    #[arg(long, value_name = "FILE")]
    plan_out: Option<PathBuf>,
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
    /// With `--device cuda`: let the ranks outnumber the GPUs, sharing them (NCCL between
    /// them over loopback sockets). Checks the multi-rank paths; not for figures.
    #[arg(long)]
    share_gpus: bool,
}

impl Args {
    /// The plan options, resolved and checked (everything that does not need the rank count).
    fn plan_kind(&self) -> anyhow::Result<PlanKind> {
        match self.plan {
            PlanArg::Random => {
                if self.logical_experts.is_some() || self.drift_sigma.is_some() {
                    bail!(
                        "--logical-experts and --drift-sigma apply to --plan migration or \
                         deepseek only"
                    );
                }
                Ok(PlanKind::Random {
                    moved_per_rank: self.moved_per_rank.unwrap_or(DEFAULT_MOVED_PER_RANK),
                })
            }
            PlanArg::Migration | PlanArg::Deepseek => {
                let policy = if self.plan == PlanArg::Migration {
                    DriftPolicy::Migration
                } else {
                    DriftPolicy::DeepSeek
                };
                if let Some(m) = self.moved_per_rank {
                    bail!(
                        "--moved-per-rank {m} does not apply to --plan migration or deepseek: \
                         their moves follow from the old and new placements"
                    );
                }
                let logical_experts = self.logical_experts.unwrap_or(DEFAULT_LOGICAL_EXPERTS);
                if logical_experts == 0 {
                    bail!("--logical-experts must be at least 1");
                }
                let drift_sigma = self.drift_sigma.unwrap_or(DEFAULT_DRIFT_SIGMA);
                if !(drift_sigma.is_finite() && drift_sigma >= 0.0) {
                    bail!("--drift-sigma must be a finite number ≥ 0, not {drift_sigma}");
                }
                Ok(PlanKind::Drift {
                    policy,
                    logical_experts,
                    drift_sigma,
                })
            }
        }
    }

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
    /// Per layer, the expert rows this rank received over the wire.
    layer_rows_received: Vec<usize>,
    /// Per layer, the rows this rank copied from its own rows (local copies and duplicate
    /// fills).
    layer_rows_copied: Vec<usize>,
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
    let kind = args.plan_kind()?;
    check_sizes(&args, &kind)?;
    let world =
        World::from_env().context("moeshift bench eplb-comm must run under `moeshift launch`")?;
    let (rank, ranks) = (world.rank(), world.world_size());
    let gpu = match args.device {
        DeviceArg::Cuda => super::rank_gpu(&world, args.share_gpus)?,
        DeviceArg::Cpu if args.share_gpus => bail!("--share-gpus applies to --device cuda"),
        DeviceArg::Cpu => 0,
    };
    if let PlanKind::Random { moved_per_rank } = kind {
        if ranks < 2 && moved_per_rank > 0 {
            bail!("moving experts between ranks needs at least 2 ranks (WORLD_SIZE is {ranks})");
        }
    }
    // Every rank derives the same maps; a bad shape fails on every rank alike, before any
    // rank waits for the others.
    let maps = plan_maps(&kind, ranks, args.experts_per_rank, args.layers, args.seed)?;
    if rank != 0 {
        // One log line for the whole job is enough.
        set_log_hook(Some(Box::new(|_| {})));
    }
    let setup = Deadline::after(deadline_for);
    let store =
        StoreClient::connect(&world, setup).context("connecting to the rendezvous store")?;
    let control = HostGroup::world(&store, setup).context("forming the control group")?;

    let report = match run_rank(
        &args,
        &kind,
        &tensor_bytes,
        &maps,
        (&store, &world, gpu),
        deadline_for,
    ) {
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
        println!("{}", summary(&args, &kind, &tensor_bytes, ranks, &reports));
    }
    Ok(ExitCode::SUCCESS)
}

/// Rank 0's JSON object from every rank's report.
fn summary(
    args: &Args,
    kind: &PlanKind,
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
    let moved_per_rank = match kind {
        PlanKind::Random { moved_per_rank } => Some(*moved_per_rank),
        PlanKind::Drift { .. } => None,
    };
    let mut out = serde_json::json!({
        "backend": backend,
        "device": args.device.name(),
        "ranks": ranks,
        "shared_gpus": args.share_gpus,
        "layers": args.layers,
        "plan": kind.name(),
        "experts_per_rank": args.experts_per_rank,
        "moved_per_rank": moved_per_rank,
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
    });
    if let (
        PlanKind::Drift {
            logical_experts,
            drift_sigma,
            ..
        },
        Some(obj),
    ) = (kind, out.as_object_mut())
    {
        let per_layer = |rows: fn(&RankReport) -> &Vec<usize>| -> Vec<usize> {
            (0..args.layers)
                .map(|l| reports.iter().filter_map(|r| rows(r).get(l)).sum())
                .collect()
        };
        obj.insert("logical_experts".into(), serde_json::json!(logical_experts));
        obj.insert("drift_sigma".into(), serde_json::json!(drift_sigma));
        obj.insert(
            "expert_groups".into(),
            serde_json::json!(expert_groups(*logical_experts)),
        );
        obj.insert(
            "layer_rows_received".into(),
            serde_json::json!(per_layer(|r| &r.layer_rows_received)),
        );
        obj.insert(
            "layer_rows_copied".into(),
            serde_json::json!(per_layer(|r| &r.layer_rows_copied)),
        );
    }
    out
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

fn check_sizes(args: &Args, kind: &PlanKind) -> anyhow::Result<()> {
    if args.layers == 0 || args.experts_per_rank == 0 {
        bail!("--layers and --experts-per-rank must be at least 1");
    }
    if let PlanKind::Random { moved_per_rank } = *kind {
        if moved_per_rank > args.experts_per_rank {
            bail!(
                "--moved-per-rank {moved_per_rank} exceeds --experts-per-rank {}",
                args.experts_per_rank
            );
        }
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
    kind: &PlanKind,
    tensor_bytes: &[usize],
    maps: &[(Vec<usize>, Vec<usize>)],
    (store, world, gpu): (&StoreClient, &World, usize),
    deadline_for: Duration,
) -> anyhow::Result<RankReport> {
    let (rank, ranks) = (world.rank(), world.world_size());
    let e = args.experts_per_rank;
    let mine = |map: &[usize]| map[rank * e..(rank + 1) * e].to_vec();

    let mut storage = Weights::new(
        args.device,
        gpu,
        tensor_bytes,
        e,
        maps.iter().map(|(old, _)| mine(old)),
    )?;
    let plans = maps
        .iter()
        .map(|(old, new)| LayerPlan::new(old, new, ranks))
        .collect::<Result<Vec<_>, _>>()?;
    if rank == 0 {
        if let Some(path) = &args.plan_out {
            write_plan_file(path, kind, args.seed, tensor_bytes, maps, &plans)?;
        }
    }

    let mut report = RankReport::default();
    for plan in &plans {
        let me = plan.rank(rank)?;
        report.layer_rows_received.push(me.recvs.len());
        report
            .layer_rows_copied
            .push(me.local_copies.len() + me.dup_fills.len());
    }
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

/// Expert groups of the topology the migration plan runs on: 8 (as DeepSeek-V3) when they
/// divide the logical experts, else 1. With one node the groups only order the experts
/// inside the DeepSeek policy; they never make a shape invalid.
fn expert_groups(logical_experts: usize) -> usize {
    if logical_experts % 8 == 0 {
        8
    } else {
        1
    }
}

/// Every layer's old and new `phy2log` (rank-major, `ranks · e` slots), the same on every
/// rank for the same arguments.
fn plan_maps(
    kind: &PlanKind,
    ranks: usize,
    e: usize,
    layers: usize,
    seed: u64,
) -> anyhow::Result<Vec<(Vec<usize>, Vec<usize>)>> {
    match *kind {
        PlanKind::Random { moved_per_rank } => {
            let mut rng = SplitMix(seed);
            Ok((0..layers)
                .map(|_| layer_maps(&mut rng, ranks, e, moved_per_rank))
                .collect())
        }
        PlanKind::Drift {
            policy,
            logical_experts,
            drift_sigma,
        } => drift_maps(policy, ranks, e, logical_experts, layers, drift_sigma, seed),
    }
}

/// `--plan migration` and `deepseek`: per layer, log-normal loads (σ = 1, median 1000)
/// placed by the DeepSeek policy on `ranks` GPUs of `slots` slots (the old map), then every
/// load multiplied by `exp(N(0, drift_sigma))` and `policy` run from the old placement (the
/// new map).
fn drift_maps(
    policy: DriftPolicy,
    ranks: usize,
    slots: usize,
    logical_experts: usize,
    layers: usize,
    drift_sigma: f64,
    seed: u64,
) -> anyhow::Result<Vec<(Vec<usize>, Vec<usize>)>> {
    let total = slots
        .checked_mul(ranks)
        .context("--experts-per-rank × ranks overflows")?;
    if logical_experts > total {
        bail!(
            "--logical-experts {logical_experts} exceeds the {total} slots \
             (--experts-per-rank {slots} × {ranks} ranks): every logical expert needs a slot"
        );
    }
    let topo = Topology::new(total, expert_groups(logical_experts), 1, ranks);
    let mut rng = SplitMix(seed);
    let mut loads: Vec<f64> = (0..layers * logical_experts)
        .map(|_| 1000.0 * rng.normal().exp())
        .collect();
    let matrix = |w: &[f64]| {
        LoadMatrix::from_flat(
            layers,
            logical_experts,
            w.iter().map(|&x| x as f32).collect(),
        )
        .context("building the expert loads")
    };
    let old = deepseek(&matrix(&loads)?, &topo, None).with_context(|| {
        format!(
            "placing {logical_experts} experts on {ranks} ranks of {slots} slots \
             with the DeepSeek policy"
        )
    })?;
    for w in &mut loads {
        *w *= (drift_sigma * rng.normal()).exp();
    }
    let load = matrix(&loads)?;
    let new = match policy {
        DriftPolicy::Migration => {
            migration(&load, &topo, &old, &MigrationOptions::default())
                .context("re-planning with the migration-aware policy")?
                .placement
        }
        DriftPolicy::DeepSeek => {
            deepseek(&load, &topo, Some(&old)).context("re-planning with the DeepSeek policy")?
        }
    };
    Ok(old
        .phy2log_rows()
        .into_iter()
        .zip(new.phy2log_rows())
        .collect())
}

/// One layer of the `--plan-out` file (see the module documentation).
#[derive(Debug, Serialize)]
struct PlanFileLayer {
    moves: Vec<[usize; 4]>,
    fills: Vec<[usize; 3]>,
    old_phy2log: Vec<usize>,
    new_phy2log: Vec<usize>,
}

/// The rows `plan` writes, as `moves` and `fills` of the plan file: every receive with the
/// row its sender reads, every local copy, every duplicate fill.
fn plan_file_layer(
    plan: &LayerPlan,
    old: &[usize],
    new: &[usize],
) -> anyhow::Result<PlanFileLayer> {
    // (sender, receiver, expert) → the sender's row.
    let mut sent_from = BTreeMap::new();
    for (src, me) in plan.ranks().iter().enumerate() {
        for s in &me.sends {
            sent_from.insert((src, s.dst, s.expert), s.src_row);
        }
    }
    let mut moves = Vec::new();
    let mut fills = Vec::new();
    for (dst, me) in plan.ranks().iter().enumerate() {
        for r in &me.recvs {
            let src_row = sent_from.get(&(r.src, dst, r.expert)).with_context(|| {
                format!(
                    "rank {dst} receives expert {} from rank {}, which does not send it",
                    r.expert, r.src
                )
            })?;
            moves.push([r.src, *src_row, dst, r.dst_row]);
        }
        for c in &me.local_copies {
            moves.push([dst, c.src_row, dst, c.dst_row]);
        }
        for c in &me.dup_fills {
            fills.push([dst, c.src_row, c.dst_row]);
        }
    }
    moves.sort_unstable_by_key(|m| (m[0], m[2], m[3]));
    fills.sort_unstable();
    Ok(PlanFileLayer {
        moves,
        fills,
        old_phy2log: old.to_vec(),
        new_phy2log: new.to_vec(),
    })
}

/// The `--plan-out` file's object.
fn plan_file(
    kind: &PlanKind,
    seed: u64,
    tensor_bytes: &[usize],
    maps: &[(Vec<usize>, Vec<usize>)],
    plans: &[LayerPlan],
) -> anyhow::Result<serde_json::Value> {
    let (ranks, slots) = plans
        .first()
        .map_or((0, 0), |p| (p.num_ranks(), p.rows_per_rank()));
    let layers = plans
        .iter()
        .zip(maps)
        .map(|(plan, (old, new))| plan_file_layer(plan, old, new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(serde_json::json!({
        "ranks": ranks,
        "slots_per_rank": slots,
        "tensor_bytes": tensor_bytes,
        "plan": kind.name(),
        "seed": seed,
        "layers": layers,
    }))
}

fn write_plan_file(
    path: &Path,
    kind: &PlanKind,
    seed: u64,
    tensor_bytes: &[usize],
    maps: &[(Vec<usize>, Vec<usize>)],
    plans: &[LayerPlan],
) -> anyhow::Result<()> {
    let value = plan_file(kind, seed, tensor_bytes, maps, plans)?;
    let mut text = serde_json::to_string(&value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing the plan to {}", path.display()))
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

    /// Replays a plan file layer on expert ids: moves read the old rows, fills the rows
    /// written by the moves.
    fn replay(layer: &PlanFileLayer, ranks: usize, slots: usize) -> Vec<usize> {
        let old = &layer.old_phy2log;
        assert_eq!(old.len(), ranks * slots);
        let mut rows = old.clone();
        let mut written = vec![false; rows.len()];
        for &[src, src_row, dst, dst_row] in &layer.moves {
            assert!(src < ranks && dst < ranks && src_row < slots && dst_row < slots);
            let at = dst * slots + dst_row;
            assert!(!written[at], "row {dst_row} of rank {dst} written twice");
            written[at] = true;
            rows[at] = old[src * slots + src_row];
        }
        for &[rank, src_row, dst_row] in &layer.fills {
            let src = rank * slots + src_row;
            assert!(
                written[src],
                "a fill reads row {src_row} of rank {rank}, never received"
            );
            let at = rank * slots + dst_row;
            assert!(!written[at], "row {dst_row} of rank {rank} written twice");
            written[at] = true;
            rows[at] = rows[src];
        }
        rows
    }

    fn parse_args(line: &str) -> Args {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        <Cli as clap::Parser>::try_parse_from(line.split_whitespace())
            .unwrap()
            .args
    }

    /// The rows a plan receives over the wire and the rows it copies on their rank.
    fn rows_of(plan: &LayerPlan) -> (usize, usize) {
        let copied = plan
            .ranks()
            .iter()
            .map(|r| r.local_copies.len() + r.dup_fills.len())
            .sum();
        (plan.num_transfers(), copied)
    }

    #[test]
    fn migration_plans_are_reproducible_and_move_rows() {
        // DeepSeek-V3 at EP 8: 36 slots per GPU, 256 logical experts.
        let kind = parse_args("x --plan migration").plan_kind().unwrap();
        assert_eq!(kind, PlanKind::migration(256, 0.25));
        let fresh = parse_args("x --plan deepseek").plan_kind().unwrap();
        assert_eq!(fresh.name(), "deepseek");
        let maps = plan_maps(&kind, 8, 36, 2, 5).unwrap();
        assert_eq!(maps, plan_maps(&kind, 8, 36, 2, 5).unwrap(), "same seed");
        assert_ne!(maps, plan_maps(&kind, 8, 36, 2, 6).unwrap(), "other seed");
        let fresh_maps = plan_maps(&fresh, 8, 36, 2, 5).unwrap();
        for (layer, ((old, new), (fresh_old, fresh_new))) in
            maps.iter().zip(&fresh_maps).enumerate()
        {
            assert_eq!((old.len(), new.len()), (288, 288));
            assert_eq!(
                old, fresh_old,
                "both policies start from the same placement"
            );
            for map in [old, new, fresh_new] {
                for expert in 0..256 {
                    assert!(map.contains(&expert), "layer {layer} lost expert {expert}");
                }
                assert!(map.iter().all(|&x| x < 256));
            }
            let plan = LayerPlan::new(old, new, 8).unwrap();
            let fresh_plan = LayerPlan::new(fresh_old, fresh_new, 8).unwrap();
            // The drifted load changes rows; the migration-aware policy moves far fewer
            // experts over the wire than re-planning from scratch.
            let (received, copied) = rows_of(&plan);
            assert!(received + copied > 0, "layer {layer}: nothing changes");
            let (fresh_received, _) = rows_of(&fresh_plan);
            assert!(
                fresh_received > 100 && received * 10 < fresh_received,
                "layer {layer}: {received} vs {fresh_received} rows over the wire"
            );
            // The plan file describes exactly the plans' rows.
            for (plan, old, new) in [(&plan, old, new), (&fresh_plan, fresh_old, fresh_new)] {
                let file = plan_file_layer(plan, old, new).unwrap();
                assert_eq!(replay(&file, 8, 36), *new, "layer {layer}");
                let cross = file.moves.iter().filter(|m| m[0] != m[2]).count();
                assert_eq!(cross, plan.num_transfers());
                let local = file.moves.len() - cross + file.fills.len();
                assert_eq!(local, rows_of(plan).1);
            }
        }
        // A stronger drift makes the migration-aware policy move experts between ranks too.
        let strong = PlanKind::migration(256, 1.0);
        let received: usize = plan_maps(&strong, 8, 36, 4, 2)
            .unwrap()
            .iter()
            .map(|(old, new)| LayerPlan::new(old, new, 8).unwrap().num_transfers())
            .sum();
        assert!(received > 0);
        // Without drift the old placement is already balanced: nothing moves.
        for (old, new) in plan_maps(&PlanKind::migration(256, 0.0), 8, 36, 2, 5).unwrap() {
            assert_eq!(old, new);
        }
        // Logical experts that 8 groups do not divide still plan (on one group).
        assert_eq!(expert_groups(20), 1);
        let odd = PlanKind::migration(20, 0.5);
        assert_eq!(plan_maps(&odd, 4, 6, 3, 1).unwrap().len(), 3);
    }

    #[test]
    fn plan_options_fail_with_a_reason() {
        let err = |line: &str| format!("{:#}", parse_args(line).plan_kind().unwrap_err());
        assert!(err("x --plan migration --moved-per-rank 2").contains("--moved-per-rank"));
        assert!(err("x --logical-experts 16").contains("--plan migration"));
        assert!(err("x --drift-sigma 0.1").contains("--plan migration"));
        assert!(err("x --plan migration --logical-experts 0").contains("at least 1"));
        assert!(err("x --plan migration --drift-sigma -1").contains("--drift-sigma"));
        assert!(err("x --plan deepseek --moved-per-rank 1").contains("--moved-per-rank"));
        assert!(err("x --plan migration --drift-sigma NaN").contains("--drift-sigma"));
        let kind = PlanKind::migration(25, 0.25);
        let e = format!("{:#}", plan_maps(&kind, 4, 6, 1, 0).unwrap_err());
        assert!(
            e.contains("--logical-experts 25 exceeds the 24 slots"),
            "{e}"
        );
        let random = parse_args("x --experts-per-rank 2 --moved-per-rank 3");
        let kind = random.plan_kind().unwrap();
        assert!(check_sizes(&random, &kind).is_err());
    }

    #[test]
    fn plan_files_list_receives_local_copies_and_fills() {
        // Two ranks of three rows. Rank 0 receives expert 2 into row 0, copies its old
        // expert 0 from row 0 into row 1 (reading the old content) and fills row 2 from the
        // received row 0; rank 1 keeps row 0, copies it into row 1 and receives expert 0.
        let old = [0, 1, 5, 2, 3, 4];
        let new = [2, 0, 2, 2, 2, 0];
        let plan = LayerPlan::new(&old, &new, 2).unwrap();
        let layer = plan_file_layer(&plan, &old, &new).unwrap();
        assert_eq!(
            layer.moves,
            vec![[0, 0, 0, 1], [0, 0, 1, 2], [1, 0, 0, 0], [1, 0, 1, 1]]
        );
        assert_eq!(layer.fills, vec![[0, 0, 2]]);
        assert_eq!(replay(&layer, 2, 3), new);
        let kind = PlanKind::migration(6, 0.25);
        let maps = vec![(old.to_vec(), new.to_vec())];
        let file = plan_file(&kind, 9, &[8, 4], &maps, &[plan]).unwrap();
        assert_eq!(file["ranks"], 2);
        assert_eq!(file["slots_per_rank"], 3);
        assert_eq!(file["tensor_bytes"], serde_json::json!([8, 4]));
        assert_eq!(file["plan"], "migration");
        assert_eq!(file["seed"], 9);
        assert_eq!(file["layers"][0]["fills"], serde_json::json!([[0, 0, 2]]));
        assert_eq!(file["layers"][0]["new_phy2log"], serde_json::json!(new));
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
            layer_rows_received: vec![],
            layer_rows_copied: vec![],
        };
        let reports = [
            report([1.0, 0.5], [4_000_000_000, 2_000_000_000], 10),
            report([2.0, 0.25], [4_000_000_000, 2_000_000_000], 30),
        ];
        let kind = args.plan_kind().unwrap();
        assert_eq!(kind, PlanKind::Random { moved_per_rank: 2 });
        let s = summary(&args, &kind, &[3, 5], 2, &reports);
        assert_eq!(s["plan"], "random");
        assert_eq!(s["moved_per_rank"], 2);
        assert!(s.get("logical_experts").is_none() && s.get("layer_rows_received").is_none());
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
        let s = summary(&args, &args.plan_kind().unwrap(), &[4], 2, &reports);
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
