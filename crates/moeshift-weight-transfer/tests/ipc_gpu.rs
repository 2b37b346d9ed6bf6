//! The `ipc` engine across 2 processes on one node: trainer on GPU 0, worker on GPU 1
//! (feature `cuda`).
//!
//! Same conventions as `nccl_gpu.rs`: a `rank_` test starts copies of this binary as ranks,
//! skips with a printed reason without 2 GPUs, and checks digests of independently generated
//! versions. `ipc_trainer_dies_mid_update` kills the trainer in the middle of an update.
//!
//! Run on a GPU machine: `cargo test -p moeshift-weight-transfer --features cuda --test ipc_gpu`.
#![cfg(feature = "cuda")]

mod common;

use common::*;
use moeshift_device_comm::testing;
use moeshift_device_comm::{HostGroup, StoreClient, World};
use moeshift_sync::Deadline;
use moeshift_tensor::{CudaBuffer, DType};
use moeshift_weight_transfer::{
    diff, DenseParam, IpcConfig, IpcTrainer, IpcWorker, PackError, ParamMeta, SparseParam,
    TrainerEngine, TransferError, WeightReceiver, TRAINER_RANK,
};

const WORLD: usize = 2;
/// The big tensor (614 400 bytes) fits; the whole model (655 496 bytes) does not.
const BUFFER: usize = 620_000;

fn deadline() -> Deadline {
    Deadline::after(ROUND)
}

fn connect(world: &World) -> HostGroup {
    let store = StoreClient::connect(world, deadline()).expect("store");
    HostGroup::world(&store, deadline()).expect("host group")
}

fn config(buffer: usize) -> IpcConfig {
    IpcConfig {
        packed_buffer_size_bytes: buffer,
        ..IpcConfig::default()
    }
}

fn trainer(world: &World) {
    let device = common::rank_device(world);
    let metas = model();
    let mut t = IpcTrainer::new(connect(world), device, config(BUFFER)).expect("trainer");

    // 1. From host bytes.
    let v1 = all_versions(&metas, 1);
    let dense: Vec<DenseParam<'_>> = metas
        .iter()
        .zip(&v1)
        .map(|(meta, d)| DenseParam { meta, data: d })
        .collect();
    let r = t.send_dense(&dense, deadline()).expect("round 1");
    let total: usize = metas.iter().map(ParamMeta::byte_len).sum();
    assert_eq!(r.payload_bytes, total);

    // 2. From device memory.
    let v2 = upload(device, &metas, 2);
    let params = device_dense(&metas, &v2);
    t.send_device_dense(&params, deadline()).expect("round 2");

    // 3. A tensor larger than the exported buffer: a typed error before anything is sent.
    let huge = ParamMeta::new("huge", DType::F32, vec![BUFFER / 4 + 1]).expect("meta");
    let huge_bytes = vec![0u8; huge.byte_len()];
    let err = t
        .send_dense(
            &[DenseParam {
                meta: &huge,
                data: &huge_bytes,
            }],
            deadline(),
        )
        .expect_err("oversize tensor");
    assert!(
        matches!(err, TransferError::Pack(PackError::Oversize { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("'huge'"), "{err}");

    // 4. Sparse is not this engine's: refused before anything is sent.
    let patch = diff(
        metas[0].name(),
        &v1[0],
        &all_versions(&metas, 2)[0],
        metas[0].dtype(),
    )
    .expect("diff");
    let err = t
        .send_sparse(
            &[SparseParam {
                meta: &metas[0],
                patch: &patch,
            }],
            deadline(),
        )
        .expect_err("sparse over ipc");
    assert!(
        matches!(err, TransferError::Unsupported { engine: "ipc", .. }),
        "{err}"
    );

    // 5. A trainer whose buffer (700 000 bytes) differs from the worker's plan (620 000):
    //    the first chunk's header disagrees, the worker reports it naming the tensor, and
    //    nothing is copied.
    let mut t = IpcTrainer::new(t.into_group(), device, config(700_000)).expect("trainer 2");
    let v3 = upload(device, &metas, 3);
    let params = device_dense(&metas, &v3);
    let err = t
        .send_device_dense(&params, deadline())
        .expect_err("mismatched chunk plans");
    match &err {
        TransferError::PeersFailed { failures, .. } => {
            assert_eq!(failures.len(), 1, "{err}");
            assert!(failures[0].1.contains("chunk 0"), "{}", failures[0].1);
        }
        other => panic!("expected PeersFailed, got {other}"),
    }
    t.group().barrier(deadline()).expect("final barrier");
}

fn worker(world: &World) {
    let device = common::rank_device(world);
    let rank = world.rank();
    let engine: IpcWorker<CudaBuffer> =
        IpcWorker::new(connect(world), device, config(BUFFER)).expect("worker");
    let mut w = WeightReceiver::new(engine, device_registry(device));
    let digest = |w: &WeightReceiver<IpcWorker<CudaBuffer>>| {
        w.registry().device_digest().expect("device digest")
    };
    for v in [1u64, 2] {
        let s = w
            .receive_session(deadline())
            .unwrap_or_else(|e| panic!("rank {rank} round {v}: {e}"));
        // [embed .. w2] then [big] then [lm_head, scale]: 620 000 bytes never exceeded.
        assert_eq!(s.updates[0].chunks, 3, "chunks");
        assert_eq!(
            digest(&w),
            expected_digest(v),
            "rank {rank} after round {v}"
        );
    }
    // Rounds 3 and 4 never reach the workers. Round 5:
    let err = w
        .receive_session(deadline())
        .expect_err("the chunk plans disagree");
    assert!(err.to_string().contains("'layers.2.big'"), "{err}");
    assert_eq!(
        digest(&w),
        expected_digest(2),
        "a refused chunk must change nothing"
    );
    w.engine()
        .group()
        .barrier(deadline())
        .expect("final barrier");
}

#[test]
fn rank_ipc_engine() {
    const NAME: &str = "rank_ipc_engine";
    if skipped(NAME, false) {
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

/// The fail point of the kill test.
const KILLED: &str = "trainer-killed-mid-update";

/// Not `rank_`-prefixed: it kills a rank on purpose. The trainer dies during an update, after
/// the vote and before the first chunk notice: the worker fails within its deadline and
/// keeps version 1 byte for byte.
#[test]
fn ipc_trainer_dies_mid_update() {
    const NAME: &str = "ipc_trainer_dies_mid_update";
    if skipped(NAME, false) {
        return;
    }
    let Some(world) = kill_test(NAME, KILLED) else {
        return;
    };
    let device = common::rank_device(&world);
    let rank = world.rank();
    let metas = model();
    if rank == TRAINER_RANK {
        let mut t = IpcTrainer::new(connect(&world), device, config(BUFFER)).expect("trainer");
        let v1 = upload(device, &metas, 1);
        let params = device_dense(&metas, &v1);
        t.send_device_dense(&params, deadline())
            .expect("the first session");
        let w = world.clone();
        t.set_progress(move |p| {
            if p.messages == 0 {
                testing::fail_point(&w, KILLED);
            }
        });
        let v2 = upload(device, &metas, 2);
        let params = device_dense(&metas, &v2);
        let _ = t.send_device_dense(&params, deadline());
        panic!("the fail point should have killed the trainer");
    }
    let engine: IpcWorker<CudaBuffer> =
        IpcWorker::new(connect(&world), device, config(BUFFER)).expect("worker");
    let mut w = WeightReceiver::new(engine, device_registry(device));
    w.receive_session(deadline()).expect("the first session");
    let digest = |w: &WeightReceiver<IpcWorker<CudaBuffer>>| {
        w.registry().device_digest().expect("device digest")
    };
    assert_eq!(
        digest(&w),
        expected_digest(1),
        "rank {rank} before the kill"
    );
    expect_failure_in_time(rank, |d| w.receive_session(d));
    assert!(!w.is_active());
    assert_eq!(
        digest(&w),
        expected_digest(1),
        "rank {rank}: the previous weights must be kept"
    );
}
