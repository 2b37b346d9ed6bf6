//! The `nixl` EPLB backend between CUDA weights: two processes with one GPU each, rows READ
//! GPU to GPU through NIXL (UCX `cuda_ipc` on one node), staged in a device landing slot
//! and committed by device-to-device copies (feature `cuda`).
//!
//! Multi-rank scenarios follow `moeshift_device_comm::testing` (`rank_*` tests start copies
//! of this binary as the ranks; each rank uses GPU `LOCAL_RANK`). Every test first checks
//! that CUDA with two GPUs and the NIXL runtime (`MOESHIFT_NIXL_LIB_DIR`) are there and, if
//! not, prints why and passes without doing anything, so machines without GPUs run it too.
//!
//! Expected contents come from the placements alone (see `common`): every row of expert `e` in tensor `t`
//! of layer `l` holds a pattern derived from `(l, e, t)`, and the bytes around the rows
//! (gaps of strided tensors, a tail after the last row) hold a canary. Before a commit every
//! byte must still be as the old placement says; after it, as the new one says.
//!
//! Run on a GPU machine: `cargo test -p moeshift-eplb-comm --features cuda --test nixl_gpu`.
#![cfg(feature = "cuda")]

mod common;

use std::time::{Duration, Instant};

use common::gpu::{device_weights, GpuRank};
use common::{check_staged, random_map, Churn, Fill, LayerDesc, TensorDesc};
use moeshift_eplb_comm::nixl::{probe, IpcCudaBuffer, NixlCommunicator, NixlConfig};
use moeshift_eplb_comm::{
    eplb_group, Backend, EplbCommError, EplbCommunicator, LayerWeights, RowSource,
};
use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;
use moeshift_tensor::{CudaBuffer, DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const RANKS: usize = 2;
const MEMBERS: [usize; RANKS] = [0, 1];
const FILL: Fill = Fill {
    salt: 77,
    canary: 0x5C,
};
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Skipping and starting.

/// Starts `name` as the ranks: this rank, or `None` in the parent and where CUDA with two
/// GPUs or the NIXL runtime is missing (after printing why).
fn start(name: &str) -> Option<GpuRank> {
    let skip = common::gpu::skip_reason(RANKS, "NIXL", probe);
    common::gpu::start_ranks(name, RANKS, LAUNCH_TIMEOUT, skip)
}

// ---------------------------------------------------------------------------------------
// Row contents and layers.

#[test]
fn patterns_differ_between_experts_tensors_and_layers() {
    let p = FILL.pattern(1, 2, 0, 40);
    assert_eq!(p.len(), 40);
    assert_eq!(FILL.pattern(1, 2, 0, 40), p);
    assert_ne!(FILL.pattern(1, 3, 0, 40), p);
    assert_ne!(FILL.pattern(1, 2, 1, 40), p);
    assert_ne!(FILL.pattern(2, 2, 0, 40), p);
    assert_eq!(FILL.pattern(1, 2, 0, 13), p[..13]);
}

/// Four layers of different shapes: several dtypes, strided rows with gaps, rows of 128 KiB,
/// rows of odd sizes and a tensor with empty rows.
fn layers() -> Vec<LayerDesc> {
    vec![
        LayerDesc {
            rows: 4,
            tensors: vec![
                TensorDesc::plain(DType::Bf16, &[16, 24]),
                TensorDesc::strided(DType::F32, 2, 10, 1),
                TensorDesc::plain(DType::F8E4M3Fn, &[5]),
            ],
        },
        LayerDesc {
            rows: 6,
            tensors: vec![
                TensorDesc::plain(DType::Bf16, &[256, 256]),
                TensorDesc::plain(DType::I32, &[7]),
            ],
        },
        LayerDesc {
            rows: 3,
            tensors: vec![
                TensorDesc::plain(DType::F16, &[3, 5]),
                TensorDesc::plain(DType::F64, &[0]),
                TensorDesc::plain(DType::F32, &[1024]),
            ],
        },
        LayerDesc {
            rows: 5,
            tensors: vec![
                TensorDesc::plain(DType::U8, &[33]),
                TensorDesc::strided(DType::Bf16, 1, 64, 3),
            ],
        },
    ]
}

/// How far random plans move a layer's placement.
const CHURN: Churn = Churn {
    fresh: 11,
    max_moves: 3,
};

/// Random expert counts and starting placements of `descs`: every layer has between `rows`
/// and `2 · rows` experts (so some have replicas).
fn random_start(rng: &mut StdRng, descs: &[LayerDesc]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let experts: Vec<usize> = descs
        .iter()
        .map(|l| rng.gen_range(l.rows..=l.rows * RANKS))
        .collect();
    let maps = descs
        .iter()
        .zip(&experts)
        .map(|(l, &n)| random_map(rng, n, l.rows * RANKS))
        .collect();
    (experts, maps)
}

/// Every layer's rows (as `maps` place them) in CUDA-IPC-shareable memory on this rank's GPU.
fn upload_layers(
    descs: &[LayerDesc],
    maps: &[Vec<usize>],
    rank: &GpuRank,
) -> Vec<Vec<IpcCudaBuffer>> {
    descs
        .iter()
        .enumerate()
        .map(|(i, l)| FILL.upload(i, rank.gpu, &l.tensors, l.seg(&maps[i], rank.me)))
        .collect()
}

/// The weights of every layer, borrowing `bufs`.
fn layer_weights<'a>(descs: &[LayerDesc], bufs: &'a [Vec<IpcCudaBuffer>]) -> Vec<LayerWeights<'a>> {
    descs
        .iter()
        .zip(bufs)
        .map(|(l, b)| device_weights(&l.tensors, l.rows, b))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// Random layer plans over four registered layers of CUDA weights (bf16, f32 with gaps
/// between strided rows, fp8, i32, f16, f64 with empty rows, u8 of odd sizes; rows up to
/// 128 KiB), with replicas, moved by a communicator with one READ stream, then by one with
/// four (each peer's rows split over four requests on four UCX workers, rows of 128 KiB cut
/// into pieces), 240 plans each, the placements carrying over: after each transfer every
/// byte of the layer still holds the old placement and the staging holds exactly the
/// changed rows (on the GPU); after each commit every byte holds the new placement. The
/// reported phases fit in the transfer's time and count one to `read_streams` requests
/// from the peer.
#[test]
fn rank_nixl_random_plans_gpu() {
    const NAME: &str = "rank_nixl_random_plans_gpu";
    const PLANS: usize = 240;
    const STREAMS: [usize; 2] = [1, 4];
    let Some(rank) = start(NAME) else {
        return;
    };
    let (me, gpu, store) = (rank.me, rank.gpu, &rank.store);
    let descs = layers();
    let mut rng = StdRng::seed_from_u64(0x4E1C_6A7E);
    let (experts, mut maps) = random_start(&mut rng, &descs);
    let bufs = upload_layers(&descs, &maps, &rank);
    let mut weights = layer_weights(&descs, &bufs);
    let largest = descs
        .iter()
        .map(|l| l.rows * l.expert_bytes())
        .max()
        .unwrap_or(0);

    for streams in STREAMS {
        let setup = Deadline::after(Duration::from_secs(60));
        let started = Instant::now();
        let group = eplb_group(store, &MEMBERS, setup).expect("group");
        let config = NixlConfig::default().read_streams(streams);
        let mut comm = NixlCommunicator::with_config(group, &weights, config, setup)
            .unwrap_or_else(|e| panic!("rank {me}: communicator with {streams} streams: {e}"));
        println!(
            "rank {me}: nixl communicator on cuda:{gpu} with {streams} READ streams ready in \
             {:.2?}",
            started.elapsed()
        );
        assert_eq!(comm.device(), Device::Cuda(gpu));
        assert_eq!(comm.landing_slots(), 1);
        assert_eq!(comm.read_streams(), streams);
        assert_eq!(comm.landing_bytes(), largest);

        let (mut received, mut fills, mut local_total, mut crossing) =
            (0usize, 0usize, 0usize, 0usize);
        let (mut bytes_read, mut split) = (0u64, 0usize);
        let started = Instant::now();
        for step in 0..PLANS {
            let l = rng.gen_range(0..descs.len());
            let d = &descs[l];
            let new = common::next_map(&mut rng, &maps[l], experts[l], CHURN);
            let plan = LayerPlan::new(&maps[l], &new, RANKS).expect("plan");
            let what = format!("{streams} streams, step {step}, layer {l}");
            let staged = comm
                .transfer(
                    l,
                    &plan,
                    &weights[l],
                    Deadline::after(Duration::from_secs(30)),
                )
                .unwrap_or_else(|e| panic!("rank {me}, {what}: {e}"));
            FILL.check_device(
                &bufs[l],
                l,
                &d.tensors,
                d.seg(&maps[l], me),
                &format!("{what}: after the transfer, before the commit"),
            );
            assert_eq!(staged.backend(), Backend::Nixl);
            assert_eq!(staged.staging_device(), Device::Cuda(gpu), "{what}");

            let kinds = check_staged(&staged, d, &maps[l], &new, me, &what);
            for (i, r) in staged.staged_rows().iter().enumerate() {
                if let RowSource::Peer { peer, .. } = r.source {
                    assert_ne!(peer, me, "{what}");
                }
                assert_eq!(
                    staged.staged_bytes(i, 0),
                    None,
                    "device staging is not host memory"
                );
            }
            let eb = d.expert_bytes() as u64;
            let stats = *staged.stats();
            // Exactly the rows received and copied, nothing more: they are READ into the
            // landing slot, which is the staging.
            assert_eq!(
                stats.staging_bytes,
                kinds.staged().len() as u64 * eb,
                "{what}"
            );
            // With two ranks, every received row comes from the one peer.
            let phases = *comm.last_phases().expect("phases of the last transfer");
            let peers = usize::from(!kinds.recv.is_empty());
            assert_eq!(phases.layer, l, "{what}");
            assert_eq!(phases.bytes_read, stats.bytes_received, "{what}");
            assert!(
                (peers..=peers * streams).contains(&phases.read_requests),
                "{what}: {} requests",
                phases.read_requests
            );
            let sum: f64 = phases.named().iter().map(|(_, s)| s).sum();
            assert!(sum <= phases.total, "{what}: {sum} s of {} s", phases.total);
            split += usize::from(phases.read_requests > peers);

            let done = staged
                .commit(&mut weights[l])
                .unwrap_or_else(|e| panic!("rank {me}, {what}: commit: {e}"));
            kinds.check_commit(&done, eb, &what);
            maps[l] = new;
            FILL.check_device(
                &bufs[l],
                l,
                &d.tensors,
                d.seg(&maps[l], me),
                &format!("{what}: after the commit"),
            );
            received += kinds.recv.len();
            fills += kinds.dup.len();
            local_total += kinds.local.len();
            crossing += usize::from(plan.num_transfers() > 0);
            bytes_read += stats.bytes_received;
        }
        let elapsed = started.elapsed();
        for (l, d) in descs.iter().enumerate() {
            FILL.check_device(&bufs[l], l, &d.tensors, d.seg(&maps[l], me), "at the end");
        }
        println!(
            "rank {me}, {streams} streams: {PLANS} plans ({crossing} crossing ranks, {split} \
             split) in {elapsed:.2?}: {received} rows ({bytes_read} bytes) READ GPU to GPU, \
             {local_total} local copies, {fills} duplicate fills"
        );
        // The random plans exercised every kind of row, and split READs with several
        // streams.
        assert!(crossing > PLANS / 2, "only {crossing} plans crossed ranks");
        assert!(
            received >= PLANS / 4 && fills >= 1 && local_total >= PLANS / 8,
            "{received} {fills} {local_total}"
        );
        if streams > 1 {
            assert!(split > PLANS / 4, "only {split} plans split their READs");
        } else {
            assert_eq!(split, 0);
        }
        drop(comm);
    }
    drop(weights);
}

/// Several layers per call through `rearrange` on CUDA weights: the pipelined `nixl` one
/// with two landing slots (commits queued on the GPU while the next layer's READs run) and
/// with one, and the `nccl` backend's (each commit queued while the next layer transfers).
/// 30 calls each, every call a random subset of the four layers in random order with
/// fresh placements (replicas included); after each call every byte of every layer holds
/// its new placement, and the statistics come back in call order with each layer's
/// received bytes and local copies.
#[test]
fn rank_rearrange_gpu() {
    const NAME: &str = "rank_rearrange_gpu";
    const CALLS: usize = 30;
    let Some(rank) = start(NAME) else {
        return;
    };
    let (me, store) = (rank.me, &rank.store);
    let descs = layers();
    let mut rng = StdRng::seed_from_u64(0x2EA2_6A7E);
    let (experts, mut maps) = random_start(&mut rng, &descs);
    let bufs = upload_layers(&descs, &maps, &rank);
    let mut weights = layer_weights(&descs, &bufs);

    for backend in ["nixl, 2 slots", "nixl, 1 slot", "nccl"] {
        let setup = Deadline::after(Duration::from_secs(60));
        let mut comm: Box<dyn EplbCommunicator> = match backend {
            "nccl" => Box::new(
                moeshift_eplb_comm::nccl::NcclCommunicator::new(store, &MEMBERS, &weights, setup)
                    .expect("nccl communicator"),
            ),
            _ => {
                let slots = if backend.contains('2') { 2 } else { 1 };
                let group = eplb_group(store, &MEMBERS, setup).expect("group");
                let config = NixlConfig::default().landing_slots(slots);
                Box::new(
                    NixlCommunicator::with_config(group, &weights, config, setup)
                        .expect("nixl communicator"),
                )
            }
        };
        let (mut crossing, mut received) = (0usize, 0u64);
        let started = Instant::now();
        for call in 0..CALLS {
            let what = format!("rank {me}, {backend}, call {call}");
            let mut order: Vec<usize> = (0..descs.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.gen_range(0..=i));
            }
            order.truncate(rng.gen_range(1..=descs.len()));
            let news: Vec<Vec<usize>> = order
                .iter()
                .map(|&l| common::next_map(&mut rng, &maps[l], experts[l], CHURN))
                .collect();
            let plans: Vec<LayerPlan> = order
                .iter()
                .zip(&news)
                .map(|(&l, new)| LayerPlan::new(&maps[l], new, RANKS).expect("plan"))
                .collect();
            crossing += plans.iter().filter(|p| p.num_transfers() > 0).count();
            let mut moves = common::moves_in_order(&mut weights, &order, &plans);
            let stats = comm
                .rearrange(&mut moves, Deadline::after(Duration::from_secs(30)))
                .unwrap_or_else(|e| panic!("{what}, layers {order:?}: {e}"));
            assert_eq!(stats.len(), order.len(), "{what}");
            for ((&l, new), s) in order.iter().zip(&news).zip(&stats) {
                let d = &descs[l];
                let kinds = common::RowKinds::new(d.seg(&maps[l], me), d.seg(new, me));
                let eb = d.expert_bytes() as u64;
                kinds.check_commit(s, eb, &format!("{what}, layer {l}"));
                assert_eq!(s.bytes_received, kinds.recv.len() as u64 * eb, "{what}");
                received += s.bytes_received;
            }
            for (&l, new) in order.iter().zip(news) {
                maps[l] = new;
            }
            for (l, d) in descs.iter().enumerate() {
                FILL.check_device(&bufs[l], l, &d.tensors, d.seg(&maps[l], me), &what);
            }
        }
        println!(
            "rank {me}, {backend}: {CALLS} rearrangements ({crossing} layers crossing ranks, \
             {received} bytes received) in {:.2?}",
            started.elapsed()
        );
        assert!(crossing > CALLS, "only {crossing} layers crossed ranks");
    }
    drop(weights);
}

/// The device landing slot is lent to one staged layer: a second transfer while it is held
/// is refused on both ranks (weights untouched, communicator usable), and the layer moves
/// once the first is committed. Weights from a stream-ordered pool (cudarc's default
/// allocations), which CUDA IPC cannot share, are refused when the communicator is built,
/// naming the tensor, on machines without RDMA.
#[test]
fn rank_nixl_gpu_slots_and_refusals() {
    const NAME: &str = "rank_nixl_gpu_slots_and_refusals";
    let Some(rank) = start(NAME) else {
        return;
    };
    let (me, gpu, deadline, store) = (rank.me, rank.gpu, rank.deadline, &rank.store);
    let descs: Vec<LayerDesc> = layers().into_iter().take(2).collect();
    // Experts 0..2·rows, no replicas; in the new placement every slot takes the expert of
    // the slot before it: row 0 of each rank is received, the other rows are local copies.
    let mut maps: Vec<Vec<usize>> = descs
        .iter()
        .map(|l| (0..l.rows * RANKS).collect())
        .collect();
    let bufs = upload_layers(&descs, &maps, &rank);
    let mut weights = layer_weights(&descs, &bufs);
    let mut comm =
        NixlCommunicator::new(store, &MEMBERS, &weights, deadline).expect("communicator");
    let shifted = |m: &[usize]| -> Vec<usize> {
        let slots = m.len();
        (0..slots).map(|s| m[(s + slots - 1) % slots]).collect()
    };
    let new: Vec<Vec<usize>> = maps.iter().map(|m| shifted(m)).collect();
    let plans: Vec<LayerPlan> = (0..descs.len())
        .map(|l| LayerPlan::new(&maps[l], &new[l], RANKS).expect("plan"))
        .collect();
    let short = || Deadline::after(Duration::from_secs(20));

    let held = comm
        .transfer(0, &plans[0], &weights[0], short())
        .expect("layer 0");
    assert_eq!(comm.staged_layers_held(), vec![0]);
    let err = comm
        .transfer(1, &plans[1], &weights[1], short())
        .expect_err("the landing slot is held by layer 0");
    assert!(
        matches!(&err, EplbCommError::StagingInUse { rank, layer: 1, held_by, slots: 1 }
            if *rank == me && held_by == &vec![0]),
        "rank {me}: {err}"
    );
    assert!(!err.poisons_communicator());
    for (l, d) in descs.iter().enumerate() {
        FILL.check_device(
            &bufs[l],
            l,
            &d.tensors,
            d.seg(&maps[l], me),
            "after the refused transfer",
        );
    }
    held.commit(&mut weights[0]).expect("commit layer 0");
    maps[0] = new[0].clone();
    comm.transfer_and_commit(1, &plans[1], &mut weights[1], short())
        .expect("layer 1 once the slot is free");
    maps[1] = new[1].clone();
    for (l, d) in descs.iter().enumerate() {
        FILL.check_device(
            &bufs[l],
            l,
            &d.tensors,
            d.seg(&maps[l], me),
            "after both layers",
        );
    }
    drop(comm);
    drop(weights);

    // Pool memory: refused at construction on a machine without RDMA.
    let runtime = probe().expect("NIXL loads");
    let pooled = cudarc::driver::CudaContext::new(gpu)
        .expect("context")
        .has_async_alloc();
    if !pooled || runtime.rdma_possible() {
        println!(
            "rank {me}: pool memory check skipped (pool allocations: {pooled}, RDMA possible: {})",
            runtime.rdma_possible()
        );
        return;
    }
    let l = &descs[0];
    let pool_bufs: Vec<CudaBuffer> = FILL.upload(0, gpu, &l.tensors, l.seg(&maps[0], me));
    let pool_weights = device_weights(&l.tensors, l.rows, &pool_bufs);
    let started = Instant::now();
    let err = NixlCommunicator::new(
        store,
        &MEMBERS,
        std::slice::from_ref(&pool_weights),
        short(),
    )
    .expect_err("pool memory cannot be shared through CUDA IPC");
    let text = err.to_string();
    println!(
        "rank {me}: pool memory refused after {:.2?}: {text}",
        started.elapsed()
    );
    assert!(matches!(err, EplbCommError::Nixl { .. }), "{text}");
    for part in [
        format!("rank {me}"),
        "\"t0\"".into(),
        "stream-ordered".into(),
        "cuMemAlloc".into(),
    ] {
        assert!(text.contains(&part), "{part:?} missing in {text}");
    }
    drop(pool_weights);
}
