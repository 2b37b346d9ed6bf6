//! The `nccl` engine across 2 processes: trainer on GPU 0, worker on GPU 1 (feature
//! `cuda`).
//!
//! Follows device-comm's `testing` convention (the `rank_` test starts copies of this binary
//! as ranks). The parent first checks that NCCL and 2 GPUs are there and otherwise prints
//! why and passes, so machines without GPUs run it too. Expected weights never come from the
//! transfer: both ranks generate each version of the model themselves, and the worker
//! compares the SHA-256 digest of its device parameters with the digest of what it
//! generated.
//!
//! The `*_dies_*` tests kill the trainer in the middle of an update and check that the
//! worker fails within its deadline and keeps its previous weights byte for byte.
//!
//! Run on a GPU machine: `cargo test -p moeshift-weight-transfer --features cuda --test nccl_gpu`.
#![cfg(feature = "cuda")]

mod common;

use common::*;
use moeshift_device_comm::testing;
use moeshift_device_comm::{HostGroup, StoreClient, World};
use moeshift_sync::Deadline;
use moeshift_tensor::CudaBuffer;
use moeshift_weight_transfer::{
    diff, AutoPolicy, DenseParam, DeviceAutoParam, DeviceDiff, DeviceOutgoing, DevicePatch,
    DeviceSparseParam, NcclConfig, NcclTrainer, NcclWorker, Outgoing, ParamMeta, SparseParam,
    SparsePatch, TrainerEngine, TransferError, WeightReceiver, TRAINER_RANK,
};

const WORLD: usize = 2;
/// Chunks of 10 KiB: `layers.0.mlp.w1` (12 KiB) and the big tensor travel alone.
const BUFFER: usize = 10 * 1024;

fn deadline() -> Deadline {
    Deadline::after(ROUND)
}

fn connect(world: &World) -> HostGroup {
    let store = StoreClient::connect(world, deadline()).expect("store");
    HostGroup::world(&store, deadline()).expect("host group")
}

fn config() -> NcclConfig {
    NcclConfig {
        packed_buffer_size_bytes: BUFFER,
        packed: false,
        ..NcclConfig::default()
    }
}

fn trainer(world: &World) {
    let device = common::rank_device(world);
    let metas = model();
    let mut t = NcclTrainer::new(connect(world), device, config(), deadline()).expect("trainer");

    // 1. Dense, one broadcast per parameter, from host bytes.
    let v1 = all_versions(&metas, 1);
    let dense: Vec<DenseParam<'_>> = metas
        .iter()
        .zip(&v1)
        .map(|(meta, d)| DenseParam { meta, data: d })
        .collect();
    let r = t
        .send_session(
            &[Outgoing::Dense {
                params: &dense,
                packed: false,
            }],
            deadline(),
        )
        .expect("round 1: dense from host");
    let total: usize = metas.iter().map(ParamMeta::byte_len).sum();
    assert_eq!((r.dense_params, r.payload_bytes), (metas.len(), total));

    // 2. Packed in 10 KiB chunks from device memory (same parameters: announced as "reuse").
    let v2 = upload(device, &metas, 2);
    let r = t
        .send_device_session(
            &[DeviceOutgoing::Dense {
                params: &device_dense(&metas, &v2),
                packed: true,
            }],
            deadline(),
        )
        .expect("round 2: packed from device");
    assert_eq!(r.payload_bytes, total);

    // 3. Sparse from host patches (about 5 % of each tensor).
    let host_v2 = all_versions(&metas, 2);
    let host_v3 = all_versions(&metas, 3);
    let patches: Vec<SparsePatch> = metas
        .iter()
        .zip(host_v2.iter().zip(&host_v3))
        .map(|(m, (a, b))| diff(m.name(), a, b, m.dtype()).expect("diff"))
        .collect();
    let sparse: Vec<SparseParam<'_>> = metas
        .iter()
        .zip(&patches)
        .map(|(meta, patch)| SparseParam { meta, patch })
        .collect();
    let r = t
        .send_sparse(&sparse, deadline())
        .expect("round 3: sparse from host");
    let expected_bytes: usize = patches.iter().map(SparsePatch::payload_bytes).sum();
    assert_eq!(r.payload_bytes, expected_bytes);

    // 4. Sparse from patches diffed on the GPU (version 3 → random version 4: nearly every
    //    element changes). The GPU diff must equal the host diff exactly.
    let d3 = upload(device, &metas, 3);
    let d4 = upload(device, &metas, 4);
    let mut differ = DeviceDiff::new(device).expect("differ");
    let host_v4 = all_versions(&metas, 4);
    let mut dpatches: Vec<DevicePatch> = Vec::new();
    for (i, m) in metas.iter().enumerate() {
        let p = differ.diff(m, &d3[i], &d4[i]).expect("gpu diff");
        let host = diff(m.name(), &host_v3[i], &host_v4[i], m.dtype()).expect("host diff");
        assert_eq!(
            p.to_host().expect("download patch"),
            host,
            "GPU diff of {}",
            m.name()
        );
        dpatches.push(p);
    }
    let dsparse: Vec<DeviceSparseParam<'_>> = metas
        .iter()
        .zip(&dpatches)
        .map(|(meta, patch)| DeviceSparseParam { meta, patch })
        .collect();
    t.send_device_sparse(&dsparse, deadline())
        .expect("round 4: sparse from device");

    // 5. An index out of range in one patch, a valid patch for another parameter: the worker
    //    checks the whole update before writing, refuses, and nothing changes.
    let big = &metas[5];
    let bad = SparsePatch::new(
        big.name(),
        big.dtype(),
        vec![3, big.numel() as i32],
        vec![1, 2, 3, 4],
    )
    .expect("patch");
    let good_meta = &metas[0];
    let good =
        SparsePatch::new(good_meta.name(), good_meta.dtype(), vec![0], vec![9, 9]).expect("patch");
    let bad_d = DevicePatch::upload(device, &bad).expect("upload bad");
    let good_d = DevicePatch::upload(device, &good).expect("upload good");
    let err = t
        .send_device_sparse(
            &[
                DeviceSparseParam {
                    meta: good_meta,
                    patch: &good_d,
                },
                DeviceSparseParam {
                    meta: big,
                    patch: &bad_d,
                },
            ],
            deadline(),
        )
        .expect_err("round 5: out-of-range index");
    match &err {
        TransferError::PeersFailed { failures, .. } => {
            assert_eq!(failures.len(), 1, "{err}");
            let reason = &failures[0].1;
            assert!(
                reason.contains("'layers.2.big'") && reason.contains("indices[1] = 307200"),
                "{reason}"
            );
        }
        other => panic!("expected PeersFailed, got {other}"),
    }
    assert!(!t.is_broken(), "a refusal must leave the engine usable");

    // 6. Automatic from device memory: 4 → 5 changes 60 % of embed.weight (dense) and 1 %
    //    of the big tensor (sparse); the rest is unchanged.
    let d5 = upload(device, &metas, 5);
    let auto: Vec<DeviceAutoParam<'_>> = metas
        .iter()
        .enumerate()
        .map(|(i, meta)| DeviceAutoParam {
            meta,
            previous: &d4[i],
            current: &d5[i],
        })
        .collect();
    let r = t
        .send_device_auto(&auto, &AutoPolicy::default(), &mut differ, deadline())
        .expect("round 6: auto");
    assert_eq!(
        (
            r.updates,
            r.dense_params,
            r.sparse_params,
            r.unchanged_params
        ),
        (2, 1, 1, metas.len() - 2)
    );

    // 7. Dense unpacked straight from device memory.
    let v6 = upload(device, &metas, 6);
    t.send_device_session(
        &[DeviceOutgoing::Dense {
            params: &device_dense(&metas, &v6),
            packed: false,
        }],
        deadline(),
    )
    .expect("round 7: dense from device");
    t.group().barrier(deadline()).expect("final barrier");
}

fn worker(world: &World) {
    let device = common::rank_device(world);
    let rank = world.rank();
    let group = connect(world);
    let engine: NcclWorker<CudaBuffer> =
        NcclWorker::new(group, rank - 1, device, config(), deadline()).expect("worker");
    let mut w = WeightReceiver::new(engine, device_registry(device));
    let digest = |w: &WeightReceiver<NcclWorker<CudaBuffer>>| {
        w.registry().device_digest().expect("device digest")
    };
    assert_eq!(digest(&w), expected_digest(0));

    for (round, v) in [(1, 1u64), (2, 2), (3, 3), (4, 4)] {
        let s = w
            .receive_session(deadline())
            .unwrap_or_else(|e| panic!("rank {rank} round {round}: {e}"));
        if round == 2 {
            // [embed 8 KiB] [w1 12 KiB alone] [b1, norm, w2 4.3 KiB] [big alone]
            // [lm_head 16 KiB alone] [scale]
            assert_eq!(s.updates[0].chunks, 6, "packed chunks");
        }
        assert_eq!(
            digest(&w),
            expected_digest(v),
            "rank {rank} after round {round}"
        );
    }

    let err = w
        .receive_session(deadline())
        .expect_err("round 5 must be refused");
    assert!(err.to_string().contains("outside [0, 307200)"), "{err}");
    assert_eq!(
        digest(&w),
        expected_digest(4),
        "round 5 must change nothing"
    );
    assert!(!w.is_active());

    let s = w.receive_session(deadline()).expect("round 6");
    assert_eq!(s.updates.len(), 2);
    assert_eq!(digest(&w), expected_digest(5), "rank {rank} after round 6");

    w.receive_session(deadline()).expect("round 7");
    assert_eq!(digest(&w), expected_digest(6), "rank {rank} after round 7");
    w.engine()
        .group()
        .barrier(deadline())
        .expect("final barrier");
}

#[test]
fn rank_nccl_engine() {
    const NAME: &str = "rank_nccl_engine";
    if skipped(NAME, true) {
        return;
    }
    let Some(world) = testing::run_as_ranks(NAME, WORLD, LAUNCH_TIMEOUT).expect("ranks") else {
        return;
    };
    if world.rank() == TRAINER_RANK {
        trainer(&world);
    } else {
        worker(&world);
    }
}

/// The fail point of the kill tests.
const KILLED: &str = "trainer-killed-mid-update";

/// A worker of the kill tests: receives version `v` in one session, then the session its
/// trainer dies in, which must fail in time and leave version `v` in place byte for byte.
fn kill_test_worker(world: &World, v: u64) {
    let device = common::rank_device(world);
    let rank = world.rank();
    let engine: NcclWorker<CudaBuffer> = NcclWorker::new(
        connect(world),
        rank - 1,
        device,
        NcclConfig::default(),
        deadline(),
    )
    .expect("worker");
    let mut w = WeightReceiver::new(engine, device_registry(device));
    w.receive_session(deadline()).expect("the first session");
    let digest = |w: &WeightReceiver<NcclWorker<CudaBuffer>>| {
        w.registry().device_digest().expect("device digest")
    };
    assert_eq!(
        digest(&w),
        expected_digest(v),
        "rank {rank} before the kill"
    );
    expect_failure_in_time(rank, |d| w.receive_session(d));
    assert!(!w.is_active());
    assert_eq!(
        digest(&w),
        expected_digest(v),
        "rank {rank}: the previous weights must be kept"
    );
}

/// Not `rank_`-prefixed: it kills a rank on purpose. The trainer dies during a packed
/// update that fits one chunk, once the chunk was broadcast: the worker holds the whole
/// payload in its chunk buffer but unpacks it only after the status round, which never
/// comes, so it keeps version 1.
#[test]
fn nccl_trainer_dies_mid_packed_update() {
    const NAME: &str = "nccl_trainer_dies_mid_packed_update";
    if skipped(NAME, true) {
        return;
    }
    let Some(world) = kill_test(NAME, KILLED) else {
        return;
    };
    if world.rank() != TRAINER_RANK {
        kill_test_worker(&world, 1);
        return;
    }
    let device = common::rank_device(&world);
    let metas = model();
    // The default 1 GiB chunk holds the whole model.
    let config = NcclConfig {
        packed: true,
        ..NcclConfig::default()
    };
    let mut t = NcclTrainer::new(connect(&world), device, config, deadline()).expect("trainer");
    let v1 = upload(device, &metas, 1);
    t.send_device_dense(&device_dense(&metas, &v1), deadline())
        .expect("the first session");
    let w = world.clone();
    t.set_progress(move |p| {
        if p.messages == 1 {
            // Give the worker time to finish receiving the chunk, so it waits in the
            // status round rather than in the broadcast.
            std::thread::sleep(std::time::Duration::from_millis(500));
            testing::fail_point(&w, KILLED);
        }
    });
    let v2 = upload(device, &metas, 2);
    let _ = t.send_device_dense(&device_dense(&metas, &v2), deadline());
    panic!("the fail point should have killed the trainer");
}

/// Not `rank_`-prefixed: it kills a rank on purpose. The trainer dies during a sparse
/// update right after announcing it, before the staged broadcast: the worker waits in that
/// broadcast until its deadline (NCCL then aborts the communicator), and keeps version 2.
#[test]
fn nccl_trainer_dies_mid_sparse_update() {
    const NAME: &str = "nccl_trainer_dies_mid_sparse_update";
    if skipped(NAME, true) {
        return;
    }
    let Some(world) = kill_test(NAME, KILLED) else {
        return;
    };
    if world.rank() != TRAINER_RANK {
        kill_test_worker(&world, 2);
        return;
    }
    let device = common::rank_device(&world);
    let metas = model();
    let mut t = NcclTrainer::new(connect(&world), device, NcclConfig::default(), deadline())
        .expect("trainer");
    let v2 = upload(device, &metas, 2);
    t.send_device_session(
        &[DeviceOutgoing::Dense {
            params: &device_dense(&metas, &v2),
            packed: false,
        }],
        deadline(),
    )
    .expect("the first session");
    // Version 3 changes about 5 % of each tensor of version 2.
    let (host_v2, host_v3) = (all_versions(&metas, 2), all_versions(&metas, 3));
    let patches: Vec<SparsePatch> = metas
        .iter()
        .zip(host_v2.iter().zip(&host_v3))
        .map(|(m, (a, b))| diff(m.name(), a, b, m.dtype()).expect("diff"))
        .collect();
    let sparse: Vec<SparseParam<'_>> = metas
        .iter()
        .zip(&patches)
        .map(|(meta, patch)| SparseParam { meta, patch })
        .collect();
    let w = world.clone();
    t.set_progress(move |p| {
        if p.messages == 0 {
            testing::fail_point(&w, KILLED);
        }
    });
    let _ = t.send_sparse(&sparse, deadline());
    panic!("the fail point should have killed the trainer");
}
