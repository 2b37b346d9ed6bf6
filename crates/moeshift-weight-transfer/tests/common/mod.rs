//! Helpers shared by the GPU tests: the small model, deterministic versions of it, digests
//! computed independently of any transfer, and the skip rule.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use moeshift_device_comm::nccl::nccl_available;
use moeshift_device_comm::testing::{self, RankRole, RankTest, ENV_FAIL_POINT, ENV_FAIL_RANK};
use moeshift_device_comm::{RankStatus, World};
use moeshift_tensor::{cuda_available, CudaBuffer, DType};
use moeshift_weight_transfer::{
    DeviceDenseParam, Digest, Hasher, ParamMeta, ParamRegistry, TransferError, TRAINER_RANK,
};

pub const ROUND: Duration = Duration::from_secs(60);
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(240);

/// The deadline a worker gives the update its trainer dies in.
pub const KILL_BUDGET: Duration = Duration::from_secs(10);
/// What a worker may take beyond [`KILL_BUDGET`] to fail: NCCL's abort of a communicator
/// stuck on a dead peer and the drain of its stream (the host transport notices a dead
/// peer at once).
pub const KILL_SLACK: Duration = Duration::from_secs(17);

/// Why this machine cannot run the 2-GPU tests, if it cannot. Only the parent asks: ranks
/// are started only when the parent found the GPUs.
pub fn skip_reason(need_nccl: bool) -> Option<String> {
    if testing::is_rank_process() {
        return None;
    }
    if need_nccl {
        if let Err(err) = nccl_available() {
            return Some(format!("NCCL is not usable here: {err}"));
        }
    }
    match cuda_available() {
        Ok(n) => testing::gpu_shortage(2, n),
        Err(err) => Some(format!("CUDA is not usable here: {err}")),
    }
}

/// This rank's GPU: `LOCAL_RANK`, or a shared one ([`testing::share_gpus`]) when
/// `MOESHIFT_GPU_RANKS` lets the 2 ranks run on one GPU. Call it once, before NCCL is used.
pub fn rank_device(world: &World) -> usize {
    testing::share_gpus(world, cuda_available().unwrap_or(1))
}

/// True (after printing why) when the test must be skipped.
pub fn skipped(test: &str, need_nccl: bool) -> bool {
    match skip_reason(need_nccl) {
        Some(reason) => {
            eprintln!("skipping {test}: {reason}");
            true
        }
        None => false,
    }
}

/// Every element size, one tensor of 300 K elements (several diff tiles and scatter
/// blocks), and tensors around 8–16 KiB for chunk boundaries. 655 496 bytes in all.
pub fn model() -> Vec<ParamMeta> {
    [
        ("embed.weight", DType::Bf16, vec![64, 64]),
        ("layers.0.mlp.w1", DType::F32, vec![48, 64]),
        ("layers.0.mlp.b1", DType::F32, vec![48]),
        ("layers.0.norm.weight", DType::F16, vec![64]),
        ("layers.1.experts.w2", DType::F8E4M3Fn, vec![4, 32, 32]),
        ("layers.2.big", DType::Bf16, vec![1024, 300]),
        ("lm_head.weight", DType::Bf16, vec![128, 64]),
        ("lm_head.scale", DType::F64, vec![]),
    ]
    .into_iter()
    .map(|(n, d, s)| ParamMeta::new(n, d, s).expect("valid meta"))
    .collect()
}

/// SplitMix64 bytes seeded by the parameter name and a version number.
pub fn random_bytes(name: &str, version: u64, len: usize) -> Vec<u8> {
    let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) ^ version.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `count` distinct elements spread over `numel` by a stride coprime with the sizes here.
pub fn touched(numel: usize, count: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..count.min(numel)).map(|k| (k * 7919) % numel).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Elements changed from version `v - 1` to `v` for the sparse versions (3 and 5).
pub fn changes(meta: &ParamMeta, v: u64) -> usize {
    match v {
        3 if meta.numel() > 1 => meta.numel() / 20,
        5 => match meta.name() {
            "embed.weight" => meta.numel() * 6 / 10,
            "layers.2.big" => meta.numel() / 100,
            _ => 0,
        },
        _ => 0,
    }
}

/// Version `v` of parameter `meta`: 3 and 5 change a few elements of the version before
/// (flipping bits of each touched element's first byte), every other version is random.
pub fn version(meta: &ParamMeta, v: u64) -> Vec<u8> {
    match v {
        3 | 5 => {
            let mut b = version(meta, v - 1);
            let e = meta.dtype().size_bytes();
            let flip = if v == 3 { 0x5a } else { 0x33 };
            for i in touched(meta.numel(), changes(meta, v)) {
                b[i * e] ^= flip;
            }
            b
        }
        _ => random_bytes(meta.name(), v, meta.byte_len()),
    }
}

pub fn all_versions(metas: &[ParamMeta], v: u64) -> Vec<Vec<u8>> {
    metas.iter().map(|m| version(m, v)).collect()
}

/// The digest a worker's registry has when it holds version `v`, computed the way
/// `ParamRegistry::digest` documents it from independently generated bytes.
pub fn expected_digest(v: u64) -> Digest {
    let mut h = Hasher::new();
    for m in model() {
        h.update_framed(m.name().as_bytes());
        h.update_framed(&version(&m, v));
    }
    h.finish()
}

/// Version `v` of every parameter in device memory of `device`.
pub fn upload(device: usize, metas: &[ParamMeta], v: u64) -> Vec<CudaBuffer> {
    metas
        .iter()
        .map(|m| CudaBuffer::from_host(device, &version(m, v)).expect("upload"))
        .collect()
}

/// A worker registry holding version 0 on `device`.
pub fn device_registry(device: usize) -> ParamRegistry<CudaBuffer> {
    let metas = model();
    let mut reg = ParamRegistry::new();
    for (m, buf) in metas.iter().cloned().zip(upload(device, &metas, 0)) {
        reg.register(m, buf).expect("register");
    }
    reg
}

/// Starts a kill test `name` of 2 ranks whose trainer dies at fail point `point`: in the
/// parent, checks that the trainer died by SIGKILL and the worker passed, and returns
/// `None`; in a rank, returns its world.
pub fn kill_test(name: &str, point: &str) -> Option<World> {
    let role = RankTest::new(name, 2)
        .timeout(LAUNCH_TIMEOUT)
        .keep_going()
        .env(ENV_FAIL_RANK, &TRAINER_RANK.to_string())
        .env(ENV_FAIL_POINT, point)
        .launch()
        .expect("launch");
    match role {
        RankRole::Parent(outcome) => {
            let report = testing::failure_report(&outcome);
            let status = |r: usize| outcome.ranks.get(r).map(|x| x.status);
            assert_eq!(
                status(TRAINER_RANK),
                Some(RankStatus::Signaled(9)),
                "the trainer must die at the fail point\n{report}"
            );
            assert_eq!(
                status(1),
                Some(RankStatus::Exited(0)),
                "the worker must pass\n{report}"
            );
            None
        }
        RankRole::Rank(world) => Some(world),
    }
}

/// Runs `receive` (a session the trainer dies in, given a deadline of [`KILL_BUDGET`]) and
/// checks that it fails with a transport or NCCL error within the budget and its slack.
pub fn expect_failure_in_time<T: std::fmt::Debug>(
    rank: usize,
    receive: impl FnOnce(moeshift_sync::Deadline) -> Result<T, TransferError>,
) {
    let started = Instant::now();
    let err = receive(moeshift_sync::Deadline::after(KILL_BUDGET))
        .expect_err("the trainer died mid-update");
    let waited = started.elapsed();
    eprintln!("rank {rank}: failed as expected after {waited:.2?}: {err}");
    assert!(
        matches!(err, TransferError::Comm { .. } | TransferError::Nccl { .. }),
        "a transport or NCCL error is expected, got {err}"
    );
    assert!(
        waited < KILL_BUDGET + KILL_SLACK,
        "must fail within the deadline (waited {waited:?})"
    );
}

/// The dense parameters of `metas` held in `bufs` (one buffer per parameter, same order).
pub fn device_dense<'a>(
    metas: &'a [ParamMeta],
    bufs: &'a [CudaBuffer],
) -> Vec<DeviceDenseParam<'a>> {
    metas
        .iter()
        .zip(bufs)
        .map(|(meta, b)| DeviceDenseParam { meta, data: b })
        .collect()
}
