//! `moeshift bench weight-sync`: push a synthetic model from a trainer (rank 0) into every
//! other rank through one of the weight-transfer engines, and time it.
//!
//! Run under `moeshift launch` (or any torchrun-style launcher). The model is `--params`
//! elements of `--dtype` split into `--tensors` flat tensors named `layers.<i>.weight`.
//! Every rank generates version 0 itself (seeded random bytes); the trainer generates
//! version 1: fresh random bytes for `dense`/`packed`, and for `sparse`/`auto` version 0 with
//! `round(F · n)` elements of each `n`-element tensor changed, at positions
//! `floor(k · n / m)` for `k < m` (the first byte of each is XORed with `0x5a`).
//!
//! After one untimed warm-up, the same update is sent `--reps` times (applying it again is
//! idempotent); `seconds` is the median trainer-side time of one session, from the first
//! announcement to the last worker's acknowledgement. `bytes_on_wire` is the payload each
//! worker receives per session (values, plus int32 indices for sparse), and
//! `GBps_per_worker` is `bytes_on_wire / seconds / 1e9`. With `--verify`, every rank hashes
//! its parameters afterwards (SHA-256 over names and bytes) and rank 0 compares them with
//! the trainer's version 1.
//!
//! `phases` splits the trainer's session time as the engine reports it
//! ([`SendReport::phases`]): for each phase (`prepare`, `announce`, `vote`, `payload`,
//! `status`, `end`) the median over the timed sessions, in seconds. The sessions of
//! `dense`, `packed` and `sparse` hold one update, so these are per-update times; `auto`
//! sends up to two updates (one dense, one sparse) per session.
//!
//! Rank 0 prints one JSON object on stdout.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use moeshift_device_comm::{HostGroup, StoreClient, World};
use moeshift_sync::Deadline;
use moeshift_tensor::DType;
use moeshift_weight_transfer::{
    diff, AutoParam, AutoPolicy, DenseParam, Digest, Hasher, HostConfig, HostTrainer, HostWorker,
    Outgoing, ParamMeta, ParamRegistry, Phases, SendReport, SparseParam, SparsePatch,
    TrainerEngine, TransferError, WeightReceiver,
};
use serde_json::json;

/// Which engine moves the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Engine {
    /// Host buffers over the TCP transport.
    Host,
    /// GPU to GPU over NCCL.
    Nccl,
    /// Same-node CUDA IPC (packed dense only).
    Ipc,
}

/// How the update travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Full values, one message per tensor.
    Dense,
    /// Full values, packed in chunks with headers.
    Packed,
    /// Changed elements only: int32 indices and values.
    Sparse,
    /// Dense or sparse per tensor, by density (diff included in the timing).
    Auto,
}

/// Where the trainer's tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Place {
    /// Host memory.
    Cpu,
    /// The rank's GPU (`LOCAL_RANK` modulo the GPU count).
    Cuda,
}

/// Arguments of `moeshift bench weight-sync`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Engine: host, nccl or ipc.
    #[arg(long, value_enum, default_value_t = Engine::Host)]
    engine: Engine,
    /// Elements in the whole model.
    #[arg(long)]
    params: u64,
    /// Number of tensors the elements are split into.
    #[arg(long, default_value_t = 8)]
    tensors: usize,
    /// Element type: bf16, f16, f32, f64, fp8 (e4m3), u8, i8, i32, i64, or a PyTorch name.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// dense, packed, sparse or auto.
    #[arg(long, value_enum, default_value_t = Mode::Dense)]
    mode: Mode,
    /// Fraction of each tensor's elements changed for sparse and auto.
    #[arg(long, default_value_t = 0.001)]
    sparse_fraction: f64,
    /// Where the trainer's tensors live (default: cpu for host, cuda otherwise). Workers of
    /// the nccl and ipc engines always hold their parameters on their GPU.
    #[arg(long, value_enum)]
    device: Option<Place>,
    /// Compare every worker's parameters with the trainer's by digest afterwards.
    #[arg(long)]
    verify: bool,
    /// Deadline of each session (and of setup), in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    deadline: f64,
    /// Timed repetitions after one warm-up.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Packed chunk size in MiB.
    #[arg(long, default_value_t = 1024)]
    buffer_mib: usize,
    /// Let the ranks outnumber the GPUs, sharing them (NCCL between them over loopback
    /// sockets). Checks the multi-rank paths; not for figures.
    #[arg(long)]
    share_gpus: bool,
}

impl Args {
    fn place(&self) -> Place {
        self.device.unwrap_or(match self.engine {
            Engine::Host => Place::Cpu,
            Engine::Nccl | Engine::Ipc => Place::Cuda,
        })
    }

    fn deadline(&self) -> anyhow::Result<Deadline> {
        let d = Duration::try_from_secs_f64(self.deadline)
            .ok()
            .filter(|d| !d.is_zero())
            .with_context(|| format!("--deadline must be positive, not {}", self.deadline))?;
        Ok(Deadline::after(d))
    }

    fn buffer_bytes(&self) -> anyhow::Result<usize> {
        self.buffer_mib
            .checked_mul(1 << 20)
            .filter(|&b| b > 0)
            .with_context(|| format!("--buffer-mib {} is not a usable size", self.buffer_mib))
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.tensors == 0 {
            bail!("--tensors must be at least 1");
        }
        if self.reps == 0 {
            bail!("--reps must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.sparse_fraction) {
            bail!(
                "--sparse-fraction must be within [0, 1], not {}",
                self.sparse_fraction
            );
        }
        match (self.engine, self.place(), self.mode) {
            (Engine::Host, Place::Cuda, _) => {
                bail!("the host engine moves host buffers: use --device cpu")
            }
            (Engine::Ipc, _, Mode::Dense | Mode::Sparse | Mode::Auto) => {
                bail!("the ipc engine moves packed dense updates only: use --mode packed")
            }
            (Engine::Host, _, _) if self.share_gpus => {
                bail!("--share-gpus applies to the nccl and ipc engines")
            }
            _ => Ok(()),
        }
    }
}

/// `bf16`-style short names, then PyTorch names.
fn parse_dtype(name: &str) -> anyhow::Result<DType> {
    let short = match name {
        "bf16" => Some(DType::Bf16),
        "f16" | "fp16" => Some(DType::F16),
        "f32" | "fp32" => Some(DType::F32),
        "f64" | "fp64" => Some(DType::F64),
        "fp8" | "e4m3" => Some(DType::F8E4M3Fn),
        "e5m2" => Some(DType::F8E5M2),
        "u8" => Some(DType::U8),
        "i8" => Some(DType::I8),
        "i32" => Some(DType::I32),
        "i64" => Some(DType::I64),
        _ => None,
    };
    match short {
        Some(d) => Ok(d),
        None => Ok(DType::parse(name)?),
    }
}

/// `params` elements split into `tensors` flat tensors, the first ones one element larger
/// when the split is uneven.
fn model(params: u64, tensors: usize, dtype: DType) -> anyhow::Result<Vec<ParamMeta>> {
    let total = usize::try_from(params).context("--params does not fit this machine")?;
    let (base, extra) = (total / tensors, total % tensors);
    (0..tensors)
        .map(|i| {
            let n = base + usize::from(i < extra);
            Ok(ParamMeta::new(
                format!("layers.{i}.weight"),
                dtype,
                vec![n],
            )?)
        })
        .collect()
}

/// Seeded random bytes (SplitMix64) for tensor `name` at `version`.
fn random_bytes(name: &str, version: u64, len: usize) -> Vec<u8> {
    let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) ^ version.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let bytes = (z ^ (z >> 31)).to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    out
}

/// Number of elements changed in an `n`-element tensor at fraction `f`.
fn changed_count(n: usize, f: f64) -> usize {
    ((n as f64) * f).round().min(n as f64) as usize
}

/// Version 1 for sparse and auto: `v0` with `changed_count` elements changed at
/// `floor(k · n / m)`.
fn touch(meta: &ParamMeta, v0: &[u8], fraction: f64) -> Vec<u8> {
    let mut v1 = v0.to_vec();
    let n = meta.numel();
    let m = changed_count(n, fraction);
    let e = meta.dtype().size_bytes();
    for k in 0..m {
        let i = ((k as u128 * n as u128) / m as u128) as usize;
        if let Some(b) = v1.get_mut(i * e) {
            *b ^= 0x5a;
        }
    }
    v1
}

/// The digest `ParamRegistry::digest` gives for these names and bytes.
fn host_digest(metas: &[ParamMeta], data: &[Vec<u8>]) -> Digest {
    let mut h = Hasher::new();
    for (m, d) in metas.iter().zip(data) {
        h.update_framed(m.name().as_bytes());
        h.update_framed(d);
    }
    h.finish()
}

/// All-gathers every rank's digest (rank 0 gives the expected one); true when all agree.
fn agree(group: &HostGroup, mine: Digest, deadline: Deadline) -> anyhow::Result<bool> {
    let all = group
        .all_gather(mine.as_bytes(), deadline)
        .context("gathering the digests")?;
    Ok(all.iter().all(|d| d.as_slice() == mine.as_bytes()))
}

/// What the timed sessions of [`timed`] gave: each session's time, each session's phases,
/// and the last report.
struct Timed {
    times: Vec<f64>,
    phases: Vec<Phases>,
    report: SendReport,
}

/// Sends one warm-up and `reps` timed sessions.
fn timed(
    reps: usize,
    args: &Args,
    mut send: impl FnMut(Deadline) -> Result<SendReport, TransferError>,
) -> anyhow::Result<Timed> {
    send(args.deadline()?).context("warm-up send")?;
    let mut t = Timed {
        times: Vec::with_capacity(reps),
        phases: Vec::with_capacity(reps),
        report: SendReport::default(),
    };
    for rep in 0..reps {
        let started = Instant::now();
        t.report = send(args.deadline()?).with_context(|| format!("send {rep}"))?;
        t.times.push(started.elapsed().as_secs_f64());
        t.phases.push(t.report.phases);
    }
    Ok(t)
}

/// The median of `values` (the upper one of an even count); 0 for none.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The median of every phase over `phases`, in seconds, as a JSON object.
fn phases_json(phases: &[Phases]) -> serde_json::Value {
    let of =
        |f: fn(&Phases) -> Duration| median(phases.iter().map(|p| f(p).as_secs_f64()).collect());
    json!({
        "prepare": of(|p| p.prepare),
        "announce": of(|p| p.announce),
        "vote": of(|p| p.vote),
        "payload": of(|p| p.payload),
        "status": of(|p| p.status),
        "end": of(|p| p.end),
    })
}

/// What the trainer measured.
struct Measured {
    times: Vec<f64>,
    phases: Vec<Phases>,
    report: SendReport,
    nnz: Option<usize>,
    diff_seconds: Option<f64>,
    verified: Option<bool>,
}

impl Measured {
    fn new() -> Self {
        Self {
            times: Vec::new(),
            phases: Vec::new(),
            report: SendReport::default(),
            nnz: None,
            diff_seconds: None,
            verified: None,
        }
    }

    /// Takes the timed sessions' results.
    fn set(&mut self, t: Timed) {
        self.times = t.times;
        self.phases = t.phases;
        self.report = t.report;
    }
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    args.check()?;
    let dtype = parse_dtype(&args.dtype)?;
    let metas = model(args.params, args.tensors, dtype)?;
    let world = World::from_env().context("moeshift bench weight-sync runs under a launcher")?;
    if world.world_size() < 2 {
        bail!("weight-sync needs a trainer and at least one worker: run it with --nproc 2 or more");
    }
    if args.share_gpus {
        // Before any NCCL call: ranks sharing a GPU need their own NCCL host identity.
        super::rank_gpu(&world, true)?;
    }
    let deadline = args.deadline()?;
    let store = StoreClient::connect(&world, deadline).context("connecting to the store")?;
    let group = HostGroup::world(&store, deadline).context("forming the host group")?;
    if world.rank() != 0 {
        worker(&args, &world, &metas, group)?;
        return Ok(ExitCode::SUCCESS);
    }
    let m = trainer(&args, &world, &metas, group)?;
    let mut sorted = m.times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = median(m.times.clone());
    let bytes = m.report.payload_bytes;
    let mut out = json!({
        "engine": format!("{:?}", args.engine).to_lowercase(),
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "workers": world.world_size() - 1,
        "params": args.params,
        "bytes_on_wire": bytes,
        "seconds": median,
        "GBps_per_worker": bytes as f64 / median / 1e9,
        "verified": m.verified,
        "dtype": dtype.name(),
        "tensors": args.tensors,
        "device": format!("{:?}", args.place()).to_lowercase(),
        "shared_gpus": args.share_gpus,
        "reps": args.reps,
        "seconds_min": sorted.first().copied(),
        "seconds_max": sorted.last().copied(),
        "dense_params": m.report.dense_params,
        "sparse_params": m.report.sparse_params,
        "phases": phases_json(&m.phases),
    });
    if matches!(args.mode, Mode::Sparse | Mode::Auto) {
        out["sparse_fraction"] = json!(args.sparse_fraction);
        out["nnz"] = json!(m.nnz);
        out["diff_seconds"] = json!(m.diff_seconds);
    }
    println!("{out}");
    Ok(if m.verified == Some(false) {
        eprintln!("moeshift bench weight-sync: a worker's parameters differ from the trainer's");
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The trainer's version 1 of every tensor, and version 0 when the mode diffs.
fn trainer_data(args: &Args, metas: &[ParamMeta]) -> (Option<Vec<Vec<u8>>>, Vec<Vec<u8>>) {
    match args.mode {
        Mode::Dense | Mode::Packed => (
            None,
            metas
                .iter()
                .map(|m| random_bytes(m.name(), 1, m.byte_len()))
                .collect(),
        ),
        Mode::Sparse | Mode::Auto => {
            let v0: Vec<Vec<u8>> = metas
                .iter()
                .map(|m| random_bytes(m.name(), 0, m.byte_len()))
                .collect();
            let v1 = metas
                .iter()
                .zip(&v0)
                .map(|(m, b)| touch(m, b, args.sparse_fraction))
                .collect();
            (Some(v0), v1)
        }
    }
}

fn host_patches(
    metas: &[ParamMeta],
    v0: &[Vec<u8>],
    v1: &[Vec<u8>],
) -> anyhow::Result<Vec<SparsePatch>> {
    metas
        .iter()
        .zip(v0.iter().zip(v1))
        .map(|(m, (a, b))| Ok(diff(m.name(), a, b, m.dtype())?))
        .collect()
}

/// Times host-sourced sends through any engine's [`TrainerEngine`] side.
fn send_host<T: TrainerEngine>(
    args: &Args,
    engine: &mut T,
    metas: &[ParamMeta],
    v0: Option<&[Vec<u8>]>,
    v1: &[Vec<u8>],
) -> anyhow::Result<Measured> {
    let mut m = Measured::new();
    let t = match (args.mode, v0) {
        (Mode::Dense | Mode::Packed, _) => {
            let params: Vec<DenseParam<'_>> = metas
                .iter()
                .zip(v1)
                .map(|(meta, data)| DenseParam { meta, data })
                .collect();
            let packed = args.mode == Mode::Packed;
            timed(args.reps, args, |d| {
                engine.send_session(
                    &[Outgoing::Dense {
                        params: &params,
                        packed,
                    }],
                    d,
                )
            })?
        }
        (Mode::Sparse, Some(v0)) => {
            let started = Instant::now();
            let patches = host_patches(metas, v0, v1)?;
            m.diff_seconds = Some(started.elapsed().as_secs_f64());
            m.nnz = Some(patches.iter().map(SparsePatch::nnz).sum());
            let params: Vec<SparseParam<'_>> = metas
                .iter()
                .zip(&patches)
                .map(|(meta, patch)| SparseParam { meta, patch })
                .collect();
            timed(args.reps, args, |d| engine.send_sparse(&params, d))?
        }
        (Mode::Auto, Some(v0)) => {
            let params: Vec<AutoParam<'_>> = metas
                .iter()
                .zip(v0.iter().zip(v1))
                .map(|(meta, (previous, current))| AutoParam {
                    meta,
                    previous,
                    current,
                })
                .collect();
            let policy = AutoPolicy::default();
            timed(args.reps, args, |d| engine.send_auto(&params, &policy, d))?
        }
        _ => bail!("internal: version 0 missing for {:?}", args.mode),
    };
    m.set(t);
    Ok(m)
}

fn trainer(
    args: &Args,
    world: &World,
    metas: &[ParamMeta],
    group: HostGroup,
) -> anyhow::Result<Measured> {
    let (v0, v1) = trainer_data(args, metas);
    match (args.engine, args.place()) {
        (Engine::Host, _) => {
            let config = HostConfig {
                packed_buffer_size_bytes: args.buffer_bytes()?,
                packed: args.mode == Mode::Packed,
                reuse_metadata: true,
            };
            let mut t = HostTrainer::new(group, config)?;
            let mut m = send_host(args, &mut t, metas, v0.as_deref(), &v1)?;
            if args.verify {
                m.verified = Some(agree(t.group(), host_digest(metas, &v1), args.deadline()?)?);
            }
            Ok(m)
        }
        (Engine::Nccl | Engine::Ipc, place) => {
            gpu::trainer(args, world, metas, group, place, v0, v1)
        }
    }
}

fn worker(args: &Args, world: &World, metas: &[ParamMeta], group: HostGroup) -> anyhow::Result<()> {
    let sessions = args.reps + 1;
    match args.engine {
        Engine::Host => {
            let mut reg: ParamRegistry<Vec<u8>> = ParamRegistry::new();
            for m in metas {
                reg.register(m.clone(), random_bytes(m.name(), 0, m.byte_len()))?;
            }
            let config = HostConfig {
                packed_buffer_size_bytes: args.buffer_bytes()?,
                ..HostConfig::default()
            };
            let mut w = WeightReceiver::new(HostWorker::<Vec<u8>>::new(group, config)?, reg);
            for s in 0..sessions {
                w.receive_session(args.deadline()?)
                    .with_context(|| format!("rank {}: session {s}", world.rank()))?;
            }
            if args.verify {
                agree(w.engine().group(), w.registry().digest(), args.deadline()?)?;
            }
            Ok(())
        }
        Engine::Nccl | Engine::Ipc => gpu::worker(args, world, metas, group, sessions),
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use super::*;

    pub(super) fn trainer(
        args: &Args,
        _world: &World,
        _metas: &[ParamMeta],
        _group: HostGroup,
        _place: Place,
        _v0: Option<Vec<Vec<u8>>>,
        _v1: Vec<Vec<u8>>,
    ) -> anyhow::Result<Measured> {
        bail!(
            "the {:?} engine needs a moeshift built with feature `cuda`",
            args.engine
        )
    }

    pub(super) fn worker(
        args: &Args,
        _world: &World,
        _metas: &[ParamMeta],
        _group: HostGroup,
        _sessions: usize,
    ) -> anyhow::Result<()> {
        bail!(
            "the {:?} engine needs a moeshift built with feature `cuda`",
            args.engine
        )
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use moeshift_tensor::{cuda_available, CudaBuffer};
    use moeshift_weight_transfer::{
        device_digest, DeviceAutoParam, DeviceDenseParam, DeviceDiff, DeviceOutgoing, DevicePatch,
        DeviceSparseParam, DeviceStorage, IpcConfig, IpcTrainer, IpcWorker, NcclConfig,
        NcclTrainer, NcclWorker,
    };

    /// This rank's GPU: `LOCAL_RANK` modulo the GPUs visible (with `--share-gpus`, NCCL
    /// was set up for the sharing at the start of the run).
    fn device(world: &World) -> anyhow::Result<usize> {
        let count = cuda_available().context("the nccl and ipc engines need a GPU")?;
        Ok(world.local_rank() % count)
    }

    fn upload(device: usize, data: &[Vec<u8>]) -> anyhow::Result<Vec<CudaBuffer>> {
        data.iter()
            .map(|d| Ok(CudaBuffer::from_host(device, d)?))
            .collect()
    }

    fn device_digest_of(metas: &[ParamMeta], bufs: &[CudaBuffer]) -> anyhow::Result<Digest> {
        Ok(device_digest(
            metas
                .iter()
                .zip(bufs)
                .map(|(m, b)| (m.name(), b as &dyn DeviceStorage)),
        )?)
    }

    fn nccl_config(args: &Args) -> anyhow::Result<NcclConfig> {
        Ok(NcclConfig {
            packed_buffer_size_bytes: args.buffer_bytes()?,
            packed: args.mode == Mode::Packed,
            ..NcclConfig::default()
        })
    }

    fn ipc_config(args: &Args) -> anyhow::Result<IpcConfig> {
        Ok(IpcConfig {
            packed_buffer_size_bytes: args.buffer_bytes()?,
            ..IpcConfig::default()
        })
    }

    pub(super) fn trainer(
        args: &Args,
        world: &World,
        metas: &[ParamMeta],
        group: HostGroup,
        place: Place,
        v0: Option<Vec<Vec<u8>>>,
        v1: Vec<Vec<u8>>,
    ) -> anyhow::Result<Measured> {
        let dev = device(world)?;
        let setup = args.deadline()?;
        match (args.engine, place) {
            (Engine::Nccl, Place::Cpu) => {
                let mut t = NcclTrainer::new(group, dev, nccl_config(args)?, setup)?;
                let mut m = send_host(args, &mut t, metas, v0.as_deref(), &v1)?;
                if args.verify {
                    m.verified = Some(agree(t.group(), host_digest(metas, &v1), args.deadline()?)?);
                }
                Ok(m)
            }
            (Engine::Ipc, Place::Cpu) => {
                let mut t = IpcTrainer::new(group, dev, ipc_config(args)?)?;
                let mut m = send_host(args, &mut t, metas, None, &v1)?;
                if args.verify {
                    m.verified = Some(agree(t.group(), host_digest(metas, &v1), args.deadline()?)?);
                }
                Ok(m)
            }
            (Engine::Nccl, Place::Cuda) => {
                let mut t = NcclTrainer::new(group, dev, nccl_config(args)?, setup)?;
                let d1 = upload(dev, &v1)?;
                let d0 = match &v0 {
                    Some(v0) => Some(upload(dev, v0)?),
                    None => None,
                };
                drop(v0);
                let mut m = Measured::new();
                let timings = match (args.mode, &d0) {
                    (Mode::Dense | Mode::Packed, _) => {
                        let params: Vec<DeviceDenseParam<'_>> = metas
                            .iter()
                            .zip(&d1)
                            .map(|(meta, b)| DeviceDenseParam { meta, data: b })
                            .collect();
                        let packed = args.mode == Mode::Packed;
                        timed(args.reps, args, |d| {
                            t.send_device_session(
                                &[DeviceOutgoing::Dense {
                                    params: &params,
                                    packed,
                                }],
                                d,
                            )
                        })?
                    }
                    (Mode::Sparse, Some(d0)) => {
                        let mut differ = DeviceDiff::new(dev)?;
                        let started = Instant::now();
                        let patches: Vec<DevicePatch> = metas
                            .iter()
                            .enumerate()
                            .map(|(i, meta)| differ.diff(meta, &d0[i], &d1[i]))
                            .collect::<Result<_, _>>()?;
                        m.diff_seconds = Some(started.elapsed().as_secs_f64());
                        m.nnz = Some(patches.iter().map(DevicePatch::nnz).sum());
                        let params: Vec<DeviceSparseParam<'_>> = metas
                            .iter()
                            .zip(&patches)
                            .map(|(meta, patch)| DeviceSparseParam { meta, patch })
                            .collect();
                        timed(args.reps, args, |d| t.send_device_sparse(&params, d))?
                    }
                    (Mode::Auto, Some(d0)) => {
                        let mut differ = DeviceDiff::new(dev)?;
                        let params: Vec<DeviceAutoParam<'_>> = metas
                            .iter()
                            .enumerate()
                            .map(|(i, meta)| DeviceAutoParam {
                                meta,
                                previous: &d0[i],
                                current: &d1[i],
                            })
                            .collect();
                        let policy = AutoPolicy::default();
                        timed(args.reps, args, |d| {
                            t.send_device_auto(&params, &policy, &mut differ, d)
                        })?
                    }
                    _ => bail!("internal: version 0 missing for {:?}", args.mode),
                };
                m.set(timings);
                if args.verify {
                    let mine = device_digest_of(metas, &d1)?;
                    m.verified = Some(agree(t.group(), mine, args.deadline()?)?);
                }
                Ok(m)
            }
            (Engine::Ipc, Place::Cuda) => {
                let mut t = IpcTrainer::new(group, dev, ipc_config(args)?)?;
                let d1 = upload(dev, &v1)?;
                let params: Vec<DeviceDenseParam<'_>> = metas
                    .iter()
                    .zip(&d1)
                    .map(|(meta, b)| DeviceDenseParam { meta, data: b })
                    .collect();
                let mut m = Measured::new();
                m.set(timed(args.reps, args, |d| t.send_device_dense(&params, d))?);
                if args.verify {
                    let mine = device_digest_of(metas, &d1)?;
                    m.verified = Some(agree(t.group(), mine, args.deadline()?)?);
                }
                Ok(m)
            }
            (Engine::Host, _) => bail!("internal: the host engine is not a GPU engine"),
        }
    }

    pub(super) fn worker(
        args: &Args,
        world: &World,
        metas: &[ParamMeta],
        group: HostGroup,
        sessions: usize,
    ) -> anyhow::Result<()> {
        let dev = device(world)?;
        let mut reg: ParamRegistry<CudaBuffer> = ParamRegistry::new();
        for m in metas {
            let buf = CudaBuffer::from_host(dev, &random_bytes(m.name(), 0, m.byte_len()))?;
            reg.register(m.clone(), buf)?;
        }
        let rank = world.rank();
        match args.engine {
            Engine::Nccl => {
                let engine: NcclWorker<CudaBuffer> =
                    NcclWorker::new(group, rank - 1, dev, nccl_config(args)?, args.deadline()?)?;
                let mut w = WeightReceiver::new(engine, reg);
                for s in 0..sessions {
                    w.receive_session(args.deadline()?)
                        .with_context(|| format!("rank {rank}: session {s}"))?;
                }
                if args.verify {
                    agree(
                        w.engine().group(),
                        w.registry().device_digest()?,
                        args.deadline()?,
                    )?;
                }
            }
            Engine::Ipc => {
                let engine: IpcWorker<CudaBuffer> = IpcWorker::new(group, dev, ipc_config(args)?)?;
                let mut w = WeightReceiver::new(engine, reg);
                for s in 0..sessions {
                    w.receive_session(args.deadline()?)
                        .with_context(|| format!("rank {rank}: session {s}"))?;
                }
                if args.verify {
                    agree(
                        w.engine().group(),
                        w.registry().device_digest()?,
                        args.deadline()?,
                    )?;
                }
            }
            Engine::Host => bail!("internal: the host engine is not a GPU engine"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_names() {
        let m = model(10, 3, DType::Bf16).unwrap();
        let sizes: Vec<usize> = m.iter().map(ParamMeta::numel).collect();
        assert_eq!(sizes, vec![4, 3, 3]);
        assert_eq!(m[2].name(), "layers.2.weight");
        assert_eq!(m[0].byte_len(), 8);
    }

    #[test]
    fn touched_elements_are_distinct_and_counted() {
        let meta = ParamMeta::new("w", DType::Bf16, vec![1000]).unwrap();
        let v0 = random_bytes("w", 0, 2000);
        let v1 = touch(&meta, &v0, 0.01);
        let patch = diff("w", &v0, &v1, DType::Bf16).unwrap();
        // round(1000 · 0.01) = 10 elements, at floor(k · 1000 / 10) = 0, 100, …, 900.
        assert_eq!(
            patch.indices,
            (0..10).map(|k| k * 100).collect::<Vec<i32>>()
        );
        assert_eq!(changed_count(3, 0.5), 2);
        assert_eq!(changed_count(5, 1.0), 5);
        assert_eq!(changed_count(5, 0.0), 0);
    }

    #[test]
    fn phase_medians() {
        let ms = |v: u64| Duration::from_millis(v);
        let phases: Vec<Phases> = [(1, 5), (3, 7), (2, 9)]
            .into_iter()
            .map(|(vote, payload)| Phases {
                vote: ms(vote),
                payload: ms(payload),
                ..Phases::default()
            })
            .collect();
        let j = phases_json(&phases);
        assert_eq!(j["vote"], json!(0.002));
        assert_eq!(j["payload"], json!(0.007));
        assert_eq!(j["status"], json!(0.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(median(Vec::new()), 0.0);
    }

    #[test]
    fn dtype_names() {
        assert_eq!(parse_dtype("bf16").unwrap(), DType::Bf16);
        assert_eq!(parse_dtype("float32").unwrap(), DType::F32);
        assert!(parse_dtype("bf17").is_err());
    }

    #[test]
    fn random_bytes_are_seeded() {
        assert_eq!(random_bytes("a", 1, 13), random_bytes("a", 1, 13));
        assert_ne!(random_bytes("a", 1, 16), random_bytes("a", 2, 16));
        assert_eq!(random_bytes("a", 1, 13)[..8], random_bytes("a", 1, 8)[..]);
    }
}
