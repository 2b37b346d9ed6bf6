//! EPLB transfers between CUDA weights, two processes with one GPU each (feature `cuda`):
//! the `nccl` backend, and the `host` backend staging CUDA weights through page-locked
//! memory.
//!
//! Multi-rank scenarios follow `moeshift_device_comm::testing` (`rank_*` tests start copies
//! of this binary as the ranks; each rank uses GPU `LOCAL_RANK`). Every test first checks
//! that CUDA, NCCL and two GPUs are there and, if not, prints why and passes without doing
//! anything, so machines without GPUs run it too.
//!
//! Expected contents come from the placements alone (see `common`), as in `host_comm.rs`: every row of
//! expert `e` in tensor `t` of layer `l` holds a pattern derived from `(l, e, t)`, and bytes
//! around the rows hold a canary. Before a commit every row must still hold its old expert;
//! after it, its new expert, and every other byte must be unchanged.
//!
//! Run on a GPU machine: `cargo test -p moeshift-eplb-comm --features cuda --test nccl_gpu`.
#![cfg(feature = "cuda")]

mod common;

use std::time::{Duration, Instant};

use common::gpu::{device_weights, GpuRank};
use common::{assert_only_killed, check_staged, host_weights, Churn, Fill, LayerCase, TensorDesc};
use moeshift_device_comm::nccl::nccl_available;
use moeshift_device_comm::testing::{self, RankRole, RankTest, ENV_FAIL_POINT, ENV_FAIL_RANK};
use moeshift_device_comm::{HostGroup, StoreClient};
use moeshift_eplb_comm::nccl::NcclCommunicator;
use moeshift_eplb_comm::{
    Backend, EplbCommError, EplbCommunicator, HostCommunicator, LayerWeights,
};
use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;
use moeshift_tensor::{CudaBuffer, DType, Device, HostBuffer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const RANKS: usize = 2;
const MEMBERS: [usize; RANKS] = [0, 1];
const FILL: Fill = Fill {
    salt: 0,
    canary: 0xA5,
};
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------------------
// Skipping and starting.

/// Why this machine cannot run the GPU tests, if it cannot. Only the parent asks.
fn skip_reason() -> Option<String> {
    common::gpu::skip_reason(RANKS, "NCCL", nccl_available)
}

/// Starts `name` as the ranks: this rank, or `None` in the parent and where skipped.
fn start(name: &str) -> Option<GpuRank> {
    common::gpu::start_ranks(name, RANKS, LAUNCH_TIMEOUT, skip_reason())
}

// ---------------------------------------------------------------------------------------
// Random layers.

/// A random layer: 1–6 rows per rank, placements with replicas, sometimes a few moves away
/// from each other.
fn random_case(rng: &mut StdRng) -> LayerCase {
    const CHURN: Churn = Churn {
        fresh: 11,
        max_moves: 3,
    };
    common::random_case(rng, RANKS, 6, CHURN, random_tensor)
}

/// A tensor of a random layer: empty rows, strided rows, 2-D rows, rows of 8 to 512 KiB
/// or small 1-D rows.
fn random_tensor(rng: &mut StdRng) -> TensorDesc {
    const DTYPES: [DType; 7] = [
        DType::Bf16,
        DType::F32,
        DType::U8,
        DType::F64,
        DType::F8E4M3Fn,
        DType::I32,
        DType::F16,
    ];
    let dtype = *DTYPES.choose(rng).unwrap();
    match rng.gen_range(0..10) {
        0 => TensorDesc::plain(dtype, &[0]),
        1..=2 => {
            let cols = rng.gen_range(1..=40);
            let (lead, trail) = (rng.gen_range(0..=3), rng.gen_range(1..=3));
            TensorDesc::strided(dtype, lead, cols, trail)
        }
        3..=5 => TensorDesc::plain(dtype, &[rng.gen_range(1..=16), rng.gen_range(1..=16)]),
        6 => TensorDesc::plain(dtype, &[rng.gen_range(4096..=65536)]),
        _ => TensorDesc::plain(dtype, &[rng.gen_range(1..=200)]),
    }
}

fn cases(seed: u64, n: usize) -> Vec<LayerCase> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| random_case(&mut rng)).collect()
}

/// Every case's old rows on this rank's GPU.
fn upload_cases(cases: &[LayerCase], rank: &GpuRank) -> Vec<Vec<CudaBuffer>> {
    cases
        .iter()
        .enumerate()
        .map(|(l, c)| FILL.upload(l, rank.gpu, &c.desc.tensors, c.desc.seg(&c.old, rank.me)))
        .collect()
}

/// The weights of every case, borrowing `bufs`.
fn case_weights<'a>(cases: &[LayerCase], bufs: &'a [Vec<CudaBuffer>]) -> Vec<LayerWeights<'a>> {
    cases
        .iter()
        .zip(bufs)
        .map(|(c, b)| device_weights(&c.desc.tensors, c.desc.rows, b))
        .collect()
}

/// Moves `layers` random layers through `comm` on this rank's GPU, checking every row before
/// and after every commit and the staging's contents against the maps.
fn run_random_layers(
    comm: &mut dyn EplbCommunicator,
    cases: &[LayerCase],
    bufs: &[Vec<CudaBuffer>],
    me: usize,
    gpu: usize,
) {
    let (mut moved, mut fills, mut local_total, mut packed_rounds) = (0, 0, 0, 0);
    for (l, c) in cases.iter().enumerate() {
        let d = &c.desc;
        let plan = LayerPlan::new(&c.old, &c.new, RANKS).unwrap();
        let mut w = device_weights(&d.tensors, d.rows, &bufs[l]);
        let staged = comm
            .transfer(l, &plan, &w, Deadline::after(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("layer {l} ({c:?}): {e}"));
        FILL.check_device(
            &bufs[l],
            l,
            &d.tensors,
            d.seg(&c.old, me),
            "after the transfer, before the commit",
        );
        assert_eq!(staged.staging_device(), Device::Cuda(gpu), "layer {l}");
        assert_eq!(staged.backend(), comm.backend());

        let what = format!("layer {l}");
        let kinds = check_staged(&staged, d, &c.old, &c.new, me, &what);
        if !staged.staged_rows().is_empty() {
            assert_eq!(
                staged.staged_bytes(0, 0),
                None,
                "device staging is not readable on the host"
            );
        }
        let eb = d.expert_bytes() as u64;
        let stats = *staged.stats();
        // Staged rows, plus (nccl) the rows packed for sending, or (host) the wire staging
        // with its headers; never a whole layer more.
        let rows_bytes = kinds.staged().len() as u64 * eb;
        let sent = plan.rank(me).unwrap().sends.len() as u64;
        let extra = match comm.backend() {
            Backend::Nccl => {
                if sent > 1 {
                    packed_rounds += 1;
                }
                if sent > 1 {
                    sent * eb
                } else {
                    0
                }
            }
            _ => {
                kinds.recv.len() as u64 * eb
                    + 56 * stats.rounds as u64
                    + 24 * d.tensors.len() as u64 * kinds.recv.len() as u64
            }
        };
        assert!(
            stats.staging_bytes >= rows_bytes && stats.staging_bytes <= rows_bytes + extra,
            "layer {l}: staging {} bytes for {rows_bytes} bytes of rows (+{extra})",
            stats.staging_bytes
        );

        let done = staged
            .commit(&mut w)
            .unwrap_or_else(|e| panic!("layer {l}: commit: {e}"));
        kinds.check_commit(&done, eb, &what);
        drop(w);
        FILL.check_device(
            &bufs[l],
            l,
            &d.tensors,
            d.seg(&c.new, me),
            "after the commit",
        );
        moved += kinds.recv.len();
        fills += kinds.dup.len();
        local_total += kinds.local.len();
    }
    eprintln!(
        "rank {me}: {} layers, {moved} rows received, {local_total} local copies, {fills} duplicate fills, {packed_rounds} packed sends",
        cases.len()
    );
    // The random layers exercised every kind of row (and both cases of NCCL's packing).
    assert!(
        moved >= cases.len() / 8 && fills >= 1 && local_total >= cases.len() / 8,
        "{moved} {fills} {local_total}"
    );
    if comm.backend() == Backend::Nccl {
        assert!(packed_rounds >= 3, "{packed_rounds}");
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// 240 random layers through the `nccl` backend: random placements with replicas, 1–3
/// tensors of different dtypes and row shapes (some strided, some empty, some of 100+
/// KiB), every row checked before and after each commit, every other byte after it.
#[test]
fn rank_nccl_random_plans_gpu() {
    const NAME: &str = "rank_nccl_random_plans_gpu";
    let Some(rank) = start(NAME) else {
        return;
    };
    let (me, gpu, deadline, store) = (rank.me, rank.gpu, rank.deadline, &rank.store);
    let cases = cases(0x00E9_1B5E_ED01, 240);
    let bufs = upload_cases(&cases, &rank);
    let weights = case_weights(&cases, &bufs);
    let started = Instant::now();
    let mut comm =
        NcclCommunicator::new(store, &MEMBERS, &weights, deadline).expect("communicator");
    eprintln!(
        "rank {me}: nccl communicator ready in {:?}",
        started.elapsed()
    );
    drop(weights);
    assert_eq!(
        (comm.rank(), comm.num_ranks(), comm.device_ordinal()),
        (me, RANKS, gpu)
    );
    let started = Instant::now();
    run_random_layers(&mut comm, &cases, &bufs, me, gpu);
    eprintln!("rank {me}: 240 layers in {:?}", started.elapsed());
    assert!(comm.pack_buffer_bytes() > 0);
}

/// 80 random layers through the `host` backend with CUDA weights (page-locked staging,
/// device commit).
#[test]
fn rank_host_cuda_random_plans_gpu() {
    const NAME: &str = "rank_host_cuda_random_plans_gpu";
    let Some(rank) = start(NAME) else {
        return;
    };
    let (me, gpu, deadline, store) = (rank.me, rank.gpu, rank.deadline, &rank.store);
    let cases = cases(0x00E9_1B5E_ED02, 80);
    let bufs = upload_cases(&cases, &rank);
    let weights = case_weights(&cases, &bufs);
    let mut comm =
        HostCommunicator::new(store, &MEMBERS, &weights, deadline).expect("communicator");
    drop(weights);
    run_random_layers(&mut comm, &cases, &bufs, me, gpu);
}

/// Set-up and plan mismatches: a rank with host weights makes both ranks fail set-up (it
/// names itself, its peer names it); a plan that differs between ranks and a rank that
/// refuses its layer are typed errors on both ranks with the weights untouched; the same
/// communicator then moves the agreed layer.
#[test]
fn rank_nccl_plan_mismatch_gpu() {
    const NAME: &str = "rank_nccl_plan_mismatch_gpu";
    let Some(rank) = start(NAME) else {
        return;
    };
    let (me, gpu, deadline, store) = (rank.me, rank.gpu, rank.deadline, &rank.store);
    let tensors = vec![
        TensorDesc::plain(DType::Bf16, &[4, 3]),
        TensorDesc::strided(DType::F32, 1, 5, 2),
    ];
    // Two rows per rank; the experts swap ranks, or (rank 1's view) swap rows too.
    let old: Vec<usize> = vec![0, 1, 2, 3];
    let new = vec![2, 3, 0, 1];
    let other = vec![3, 2, 1, 0];
    let seg = |m: &[usize]| m[me * 2..me * 2 + 2].to_vec();

    // 1. Rank 1 describes host weights: nothing is built, both ranks say who failed.
    let mut host_buf = HostBuffer::zeroed(2 * 64).unwrap();
    let host_w = LayerWeights::builder()
        .host("t0", &mut host_buf, &[2, 64], DType::U8)
        .unwrap()
        .build()
        .unwrap();
    let bufs: Vec<CudaBuffer> = FILL.upload(0, gpu, &tensors, &seg(&old));
    let dev_w = device_weights(&tensors, 2, &bufs);
    let group =
        HostGroup::from_store(store, "nccl-setup-check", &MEMBERS, deadline).expect("group");
    let started = Instant::now();
    let mine = if me == 1 { &host_w } else { &dev_w };
    let err =
        NcclCommunicator::with_group(group, std::slice::from_ref(mine), deadline).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    // The layouts differ too (one tensor here, two there): the layout check comes first.
    assert!(
        matches!(err, EplbCommError::LayoutMismatch { .. }),
        "expected a layout mismatch, got {err}"
    );
    drop(host_w);

    // Same layouts, but rank 1's weights are on the host.
    let mut host_bufs = FILL.host_buffers(0, &tensors, &seg(&old));
    let host_w = host_weights(&tensors, 2, &mut host_bufs);
    let group =
        HostGroup::from_store(store, "nccl-setup-check-2", &MEMBERS, deadline).expect("group");
    let mine = if me == 1 { &host_w } else { &dev_w };
    let err =
        NcclCommunicator::with_group(group, std::slice::from_ref(mine), deadline).unwrap_err();
    if me == 1 {
        assert!(
            matches!(err, EplbCommError::NotDeviceMemory { .. }),
            "{err}"
        );
    } else {
        match &err {
            EplbCommError::PeerSetupFailed {
                peer: 1,
                backend: Backend::Nccl,
                reason,
                ..
            } => {
                // Rank 1's own error travels as the reason.
                assert!(
                    reason.contains("\"t0\"") && reason.contains("needs CUDA device memory"),
                    "{err}"
                )
            }
            other => panic!("expected rank 1's set-up failure, got {other}"),
        }
    }
    drop(host_w);

    // 2. A working communicator; rank 1 computed its plan from another map.
    let mut w = dev_w;
    let mut comm = NcclCommunicator::new(store, &MEMBERS, std::slice::from_ref(&w), deadline)
        .expect("communicator");
    let plan = LayerPlan::new(&old, if me == 1 { &other } else { &new }, RANKS).unwrap();
    let started = Instant::now();
    let err = comm
        .transfer(0, &plan, &w, Deadline::after(Duration::from_secs(10)))
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    match &err {
        EplbCommError::PlanDigestMismatch {
            rank,
            layer: 0,
            peers,
            ..
        } => {
            assert_eq!(*rank, me);
            assert_eq!(peers, &vec![1 - me], "{err}");
        }
        other => panic!("expected a plan digest mismatch, got {other}"),
    }
    assert!(!err.poisons_communicator());
    FILL.check_device(&bufs, 0, &tensors, &seg(&old), "after a refused plan");

    // 3. Rank 0 asks for a layer the communicator does not know.
    let plan = LayerPlan::new(&old, &new, RANKS).unwrap();
    let layer = if me == 0 { 3 } else { 0 };
    let err = comm
        .transfer(layer, &plan, &w, Deadline::after(Duration::from_secs(10)))
        .unwrap_err();
    if me == 0 {
        assert!(
            matches!(err, EplbCommError::LayerOutOfRange { layer: 3, .. }),
            "{err}"
        );
    } else {
        assert!(
            matches!(err, EplbCommError::PeerRefused { peer: 0, ref reason, .. } if reason.contains("layer 3")),
            "{err}"
        );
    }
    FILL.check_device(&bufs, 0, &tensors, &seg(&old), "after a refused layer");

    // 4. The same communicator moves the agreed layer.
    let stats = comm
        .transfer_and_commit(0, &plan, &mut w, Deadline::after(Duration::from_secs(20)))
        .expect("agreed transfer");
    let eb = (4 * 3 * 2 + 5 * 4) as u64;
    assert_eq!(
        (stats.bytes_received, stats.bytes_sent, stats.peers),
        (2 * eb, 2 * eb, 1)
    );
    drop(w);
    FILL.check_device(&bufs, 0, &tensors, &seg(&new), "after the agreed transfer");
}

/// Rank 1 is killed (SIGKILL) while the ranks move large layers back and forth over NCCL:
/// rank 0 gets an error naming rank 1 within its deadline (plus NCCL's abort), and the
/// layer whose transfer failed still holds its old rows.
#[test]
fn nccl_peer_killed_gpu() {
    const NAME: &str = "nccl_peer_killed_gpu";
    if common::gpu::skipped(NAME, skip_reason()) {
        return;
    }
    let role = RankTest::new(NAME, RANKS)
        .timeout(LAUNCH_TIMEOUT)
        .keep_going()
        .env(ENV_FAIL_RANK, "1")
        .env(ENV_FAIL_POINT, "mid-transfer")
        .launch()
        .expect("launch");
    let world = match role {
        RankRole::Parent(outcome) => {
            assert_only_killed(&outcome, 1);
            return;
        }
        RankRole::Rank(world) => world,
    };
    let (me, gpu) = (world.rank(), common::gpu::rank_gpu(&world));
    let deadline = Deadline::after(Duration::from_secs(60));
    let store = StoreClient::connect(&world, deadline).expect("store");
    // 8 rows per rank of 2 tensors, 5 MiB per expert: 40 MiB move each way per layer.
    const ROWS: usize = 8;
    let tensors = vec![
        TensorDesc::plain(DType::Bf16, &[1024, 2048]),
        TensorDesc::plain(DType::F32, &[256, 1024]),
    ];
    let old: Vec<usize> = (0..ROWS * RANKS).collect();
    let mut new = old.clone();
    new.rotate_right(ROWS);
    let there = LayerPlan::new(&old, &new, RANKS).unwrap();
    let back = LayerPlan::new(&new, &old, RANKS).unwrap();
    let seg = |m: &[usize]| m[me * ROWS..(me + 1) * ROWS].to_vec();
    let bufs: Vec<CudaBuffer> = FILL.upload(0, gpu, &tensors, &seg(&old));
    let mut w = device_weights(&tensors, ROWS, &bufs);
    let mut comm = NcclCommunicator::new(&store, &MEMBERS, std::slice::from_ref(&w), deadline)
        .expect("communicator");

    if testing::fail_point_hit(&world, "mid-transfer") {
        let killer = world.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            testing::fail_point(&killer, "mid-transfer");
        });
    }
    const LAYER_DEADLINE: Duration = Duration::from_secs(5);
    let started = Instant::now();
    let mut current = old.clone();
    for i in 0.. {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no failure seen after {i} layers"
        );
        let (plan, next) = if i % 2 == 0 {
            (&there, &new)
        } else {
            (&back, &old)
        };
        let attempt = Instant::now();
        match comm.transfer_and_commit(0, plan, &mut w, Deadline::after(LAYER_DEADLINE)) {
            Ok(_) => current = next.clone(),
            Err(err) => {
                let took = attempt.elapsed();
                // The deadline, plus NCCL's abort and the drain of its stream.
                assert!(
                    took < LAYER_DEADLINE + Duration::from_secs(17),
                    "after {took:?}: {err}"
                );
                assert!(err.poisons_communicator(), "{err}");
                assert_eq!(err.peer(), Some(1), "the error should name rank 1: {err}");
                eprintln!("rank {me}: layer transfer {i} failed as expected after {took:?}: {err}");
                break;
            }
        }
    }
    assert!(me != 1, "rank 1 should have been killed");
    drop(w);
    FILL.check_device(
        &bufs,
        0,
        &tensors,
        &seg(&current),
        "after the failed transfer",
    );
    // A failed communicator refuses further work at once.
    let w = device_weights(&tensors, ROWS, &bufs);
    let again = comm
        .transfer(0, &there, &w, Deadline::after(Duration::from_secs(5)))
        .unwrap_err();
    assert!(again.poisons_communicator(), "{again}");
}
