//! The `host` engine across processes: a trainer (rank 0) and workers (every other rank).
//!
//! `rank_host_engine_rounds` runs as 3 processes under `cargo test` and with any number of
//! ranks under an external launcher. `trainer_dies_mid_update` kills the trainer part-way
//! through an update and checks that the workers fail within their deadline and keep their
//! previous weights.
//!
//! Expected weights never come from the transfer: every rank generates each version of the
//! model itself from a deterministic rule, and workers compare SHA-256 digests of what they
//! hold against digests of what they generated.

use std::time::{Duration, Instant};

use moeshift_device_comm::testing::{self, RankRole, RankTest, ENV_FAIL_POINT, ENV_FAIL_RANK};
use moeshift_device_comm::{HostGroup, RankStatus, StoreClient, World};
use moeshift_sync::Deadline;
use moeshift_tensor::{DType, HostBuffer};
use moeshift_weight_transfer::{
    diff, AutoParam, AutoPolicy, DenseParam, Digest, Hasher, HostConfig, HostStorage, HostTrainer,
    HostWorker, Outgoing, ParamMeta, ParamRegistry, SparseParam, SparsePatch, TrainerEngine,
    TransferError, UpdateInfo, WeightReceiver, TRAINER_RANK,
};

type Receiver = WeightReceiver<HostWorker<Box<dyn HostStorage + Send>>>;

const ROUND: Duration = Duration::from_secs(20);

/// A small model covering every element size: 4096 + 6144 + 192 + 64 + 2048 + 8 bytes.
fn model() -> Vec<ParamMeta> {
    [
        ("embed.weight", DType::Bf16, vec![64, 32]),
        ("layers.0.mlp.w1", DType::F32, vec![32, 48]),
        ("layers.0.mlp.b1", DType::F32, vec![48]),
        ("layers.0.norm.weight", DType::F16, vec![32]),
        ("layers.1.experts.w2", DType::F8E4M3Fn, vec![4, 32, 16]),
        ("lm_head.scale", DType::F64, vec![]),
    ]
    .into_iter()
    .map(|(n, d, s)| ParamMeta::new(n, d, s).expect("valid meta"))
    .collect()
}

/// SplitMix64 bytes seeded by the parameter name and a version number.
fn random_bytes(name: &str, version: u64, len: usize) -> Vec<u8> {
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

/// The element indices changed by [`touch`]: `count` distinct elements spread by a stride
/// coprime with the sizes used here.
fn touched(numel: usize, count: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..count.min(numel)).map(|k| (k * 7919) % numel).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Flips bits in the first byte of each touched element (so each really changes).
fn touch(meta: &ParamMeta, bytes: &mut [u8], count: usize) {
    let e = meta.dtype().size_bytes();
    for i in touched(meta.numel(), count) {
        bytes[i * e] ^= 0x5a;
    }
}

/// How many elements version 3 changes in each parameter (about 5 %, none in the scalar).
fn v3_changes(meta: &ParamMeta) -> usize {
    if meta.numel() <= 1 {
        0
    } else {
        meta.numel() / 20
    }
}

/// Version `v` of parameter `meta`:
/// - 0, 1, 2, 5: independent random bytes;
/// - 3: version 2 with about 5 % of the elements changed (sparse round);
/// - 4: version 3 with 60 % of `embed.weight` and 1 % of `layers.0.mlp.w1` changed and
///   nothing else (automatic round: one dense, one sparse, four unchanged).
fn version(meta: &ParamMeta, v: u64) -> Vec<u8> {
    match v {
        3 => {
            let mut b = version(meta, 2);
            touch(meta, &mut b, v3_changes(meta));
            b
        }
        4 => {
            let mut b = version(meta, 3);
            let count = match meta.name() {
                "embed.weight" => meta.numel() * 6 / 10,
                "layers.0.mlp.w1" => meta.numel() / 100,
                _ => 0,
            };
            // Offset the touched set from version 3's so the changes are new ones.
            let e = meta.dtype().size_bytes();
            for i in touched(meta.numel(), count) {
                b[i * e] ^= 0x33;
            }
            b
        }
        _ => random_bytes(meta.name(), v, meta.byte_len()),
    }
}

/// The digest a worker's registry should have when it holds version `v` of the model:
/// computed the way `ParamRegistry::digest` documents it, from independently generated
/// bytes.
fn expected_digest(v: u64) -> Digest {
    let mut h = Hasher::new();
    for m in model() {
        h.update_framed(m.name().as_bytes());
        h.update_framed(&version(&m, v));
    }
    h.finish()
}

fn connect(world: &World, name: &str) -> HostGroup {
    let deadline = Deadline::after(ROUND);
    let store = StoreClient::connect(world, deadline).expect("store");
    HostGroup::from_store(
        &store,
        name,
        &(0..world.world_size()).collect::<Vec<_>>(),
        deadline,
    )
    .expect("host group")
}

/// A worker with version 0 registered, half the parameters in page-aligned host buffers
/// and half in plain vectors.
fn worker(group: HostGroup, config: HostConfig) -> Receiver {
    let mut reg: ParamRegistry<Box<dyn HostStorage + Send>> = ParamRegistry::new();
    for (i, m) in model().into_iter().enumerate() {
        let bytes = version(&m, 0);
        let storage: Box<dyn HostStorage + Send> = if i % 2 == 0 {
            Box::new(HostBuffer::from_bytes(&bytes).expect("host buffer"))
        } else {
            Box::new(bytes)
        };
        reg.register(m, storage).expect("register");
    }
    let engine = HostWorker::new(group, config).expect("worker engine");
    WeightReceiver::new(engine, reg)
}

fn dense<'a>(metas: &'a [ParamMeta], data: &'a [Vec<u8>]) -> Vec<DenseParam<'a>> {
    metas
        .iter()
        .zip(data)
        .map(|(meta, d)| DenseParam { meta, data: d })
        .collect()
}

fn all_versions(metas: &[ParamMeta], v: u64) -> Vec<Vec<u8>> {
    metas.iter().map(|m| version(m, v)).collect()
}

fn trainer_rounds(world: &World, group: HostGroup) {
    let workers = world.world_size() - 1;
    let metas = model();
    let config = HostConfig {
        packed_buffer_size_bytes: 4096,
        packed: false,
        reuse_metadata: true,
    };
    let mut t = HostTrainer::new(group, config).expect("trainer engine");

    // Round 1: dense, one message per parameter.
    let v1 = all_versions(&metas, 1);
    let r = t
        .send_dense(&dense(&metas, &v1), Deadline::after(ROUND))
        .expect("round 1");
    assert_eq!((r.updates, r.dense_params), (1, metas.len()));
    assert_eq!(r.payload_bytes, 4096 + 6144 + 192 + 64 + 2048 + 8);

    // Round 2: dense packed in 4 KiB chunks (`layers.0.mlp.w1`, 6144 bytes, travels alone);
    // the metadata is the same as round 1, so the trainer announces "reuse".
    let v2 = all_versions(&metas, 2);
    let params = dense(&metas, &v2);
    let r = t
        .send_session(
            &[Outgoing::Dense {
                params: &params,
                packed: true,
            }],
            Deadline::after(ROUND),
        )
        .expect("round 2");
    assert_eq!(r.dense_params, metas.len());

    // Round 3: sparse patches from a diff against what the workers hold.
    let v3 = all_versions(&metas, 3);
    let patches: Vec<SparsePatch> = metas
        .iter()
        .zip(v2.iter().zip(&v3))
        .map(|(m, (a, b))| diff(m.name(), a, b, m.dtype()).expect("diff"))
        .collect();
    for (m, p) in metas.iter().zip(&patches) {
        assert_eq!(p.nnz(), v3_changes(m), "{}", m.name());
    }
    let sparse: Vec<SparseParam<'_>> = metas
        .iter()
        .zip(&patches)
        .map(|(meta, patch)| SparseParam { meta, patch })
        .collect();
    let r = t
        .send_sparse(&sparse, Deadline::after(ROUND))
        .expect("round 3");
    assert_eq!(r.sparse_params, metas.len());
    let nnz: usize = patches.iter().map(|p| p.nnz()).sum();
    let sparse_bytes: usize = patches.iter().map(|p| p.payload_bytes()).sum();
    assert_eq!(r.payload_bytes, sparse_bytes);
    assert!(nnz > 0);

    // Round 4: automatic. embed.weight changed 60 % (> 40 % for bf16: dense),
    // layers.0.mlp.w1 changed 1 % (< 60 % for f32: sparse), the rest unchanged.
    let v4 = all_versions(&metas, 4);
    let auto: Vec<AutoParam<'_>> = metas
        .iter()
        .zip(v3.iter().zip(&v4))
        .map(|(meta, (previous, current))| AutoParam {
            meta,
            previous,
            current,
        })
        .collect();
    let r = t
        .send_auto(&auto, &AutoPolicy::default(), Deadline::after(ROUND))
        .expect("round 4");
    assert_eq!(
        (
            r.updates,
            r.dense_params,
            r.sparse_params,
            r.unchanged_params
        ),
        (2, 1, 1, 4)
    );

    // Round 5: a parameter the workers never registered: every worker refuses, nothing is
    // sent, nothing changes, and the group stays usable.
    let extra = ParamMeta::new("extra.bias", DType::F32, vec![4]).expect("meta");
    let extra_bytes = vec![0u8; 16];
    let err = t
        .send_dense(
            &[DenseParam {
                meta: &extra,
                data: &extra_bytes,
            }],
            Deadline::after(ROUND),
        )
        .expect_err("workers must refuse an unknown parameter");
    match &err {
        TransferError::PeersFailed { failures, .. } => {
            let ranks: Vec<usize> = failures.iter().map(|(r, _)| *r).collect();
            assert_eq!(ranks, (1..=workers).collect::<Vec<_>>(), "{err}");
            for (_, reason) in failures {
                assert!(reason.contains("'extra.bias'"), "{reason}");
            }
        }
        other => panic!("expected PeersFailed, got {other}"),
    }

    // Round 6: a trainer whose packed buffer (12 KiB) differs from the workers' (4 KiB):
    // its first chunk carries embed.weight and layers.0.mlp.w1, the workers planned
    // embed.weight alone. Every worker reports the header mismatch naming the tensor,
    // keeps the stream in step, and applies nothing.
    let group = t.into_group();
    let mut t = HostTrainer::new(
        group,
        HostConfig {
            packed_buffer_size_bytes: 12 * 1024,
            packed: true,
            reuse_metadata: true,
        },
    )
    .expect("trainer engine");
    let v5 = all_versions(&metas, 5);
    let err = t
        .send_dense(&dense(&metas, &v5), Deadline::after(ROUND))
        .expect_err("chunk headers must disagree");
    match &err {
        TransferError::PeersFailed { failures, .. } => {
            assert_eq!(failures.len(), workers, "{err}");
            for (_, reason) in failures {
                assert!(reason.contains("'layers.0.mlp.w1'"), "{reason}");
            }
        }
        other => panic!("expected PeersFailed, got {other}"),
    }

    // Round 7: dense again, unpacked, over the same group.
    let params = dense(&metas, &v5);
    t.send_session(
        &[Outgoing::Dense {
            params: &params,
            packed: false,
        }],
        Deadline::after(ROUND),
    )
    .expect("round 7");

    t.group()
        .barrier(Deadline::after(ROUND))
        .expect("final barrier");
}

fn worker_rounds(world: &World, group: HostGroup) {
    let rank = world.rank();
    let metas = model();
    let mut w = worker(
        group,
        HostConfig {
            packed_buffer_size_bytes: 4096,
            ..HostConfig::default()
        },
    );
    assert_eq!(w.registry().digest(), expected_digest(0));

    // Round 1: dense.
    let s = w.receive_session(Deadline::after(ROUND)).expect("round 1");
    assert_eq!(s.updates.len(), 1);
    assert_eq!(
        w.registry().digest(),
        expected_digest(1),
        "rank {rank} after round 1"
    );

    // Round 2: packed, three chunks: [embed.weight], [layers.0.mlp.w1] alone (larger than
    // the buffer), [the four small ones].
    let s = w.receive_session(Deadline::after(ROUND)).expect("round 2");
    assert_eq!(s.updates[0].chunks, 3);
    assert_eq!(
        w.registry().digest(),
        expected_digest(2),
        "rank {rank} after round 2"
    );

    // Round 3: sparse, driven through the explicit lifecycle with the info given out of
    // band (the engine checks it against the trainer's announcement).
    let counts: Vec<usize> = metas.iter().map(v3_changes).collect();
    let info = UpdateInfo::sparse(&metas, &counts);
    let d = Deadline::after(ROUND);
    w.start_update(d).expect("start");
    w.update(&info, d).expect("round 3");
    w.finish_update(d).expect("finish");
    assert_eq!(
        w.registry().digest(),
        expected_digest(3),
        "rank {rank} after round 3"
    );

    // Round 4: automatic, one dense update then one sparse update.
    let s = w.receive_session(Deadline::after(ROUND)).expect("round 4");
    assert_eq!(s.updates.len(), 2);
    assert_eq!(
        w.registry().digest(),
        expected_digest(4),
        "rank {rank} after round 4"
    );

    // Round 5: refused here and everywhere; weights unchanged.
    let err = w
        .receive_session(Deadline::after(ROUND))
        .expect_err("unknown parameter must be refused");
    assert!(err.to_string().contains("'extra.bias'"), "{err}");
    assert!(!w.is_active());
    assert_eq!(
        w.registry().digest(),
        expected_digest(4),
        "rank {rank} after round 5"
    );

    // Round 6: packed with the trainer's chunks planned for another buffer size.
    let err = w
        .receive_session(Deadline::after(ROUND))
        .expect_err("chunk header mismatch");
    assert!(err.to_string().contains("'layers.0.mlp.w1'"), "{err}");
    assert_eq!(
        w.registry().digest(),
        expected_digest(4),
        "rank {rank} after round 6"
    );

    // Round 7.
    w.receive_session(Deadline::after(ROUND)).expect("round 7");
    assert_eq!(
        w.registry().digest(),
        expected_digest(5),
        "rank {rank} after round 7"
    );

    w.engine()
        .group()
        .barrier(Deadline::after(ROUND))
        .expect("final barrier");
}

#[test]
fn rank_host_engine_rounds() {
    let Some(world) = testing::run_as_ranks("rank_host_engine_rounds", 3, Duration::from_secs(60))
        .expect("ranks")
    else {
        return;
    };
    if world.world_size() < 2 {
        eprintln!("rank_host_engine_rounds needs a trainer and at least one worker; skipped");
        return;
    }
    let group = connect(&world, "weight-transfer-rounds");
    if world.rank() == TRAINER_RANK {
        trainer_rounds(&world, group);
    } else {
        worker_rounds(&world, group);
    }
}

/// Not `rank_`-prefixed: it kills a rank on purpose, so external launchers running every
/// `rank_` scenario must not pick it up.
#[test]
fn trainer_dies_mid_update() {
    const NAME: &str = "trainer_dies_mid_update";
    const POINT: &str = "after-second-payload-message";
    let role = RankTest::new(NAME, 3)
        .timeout(Duration::from_secs(60))
        .keep_going()
        .env(ENV_FAIL_RANK, &TRAINER_RANK.to_string())
        .env(ENV_FAIL_POINT, POINT)
        .launch()
        .expect("launch");
    let world = match role {
        RankRole::Parent(outcome) => {
            let report = testing::failure_report(&outcome);
            let status = |r: usize| outcome.ranks.get(r).map(|x| x.status);
            assert_eq!(
                status(TRAINER_RANK),
                Some(RankStatus::Signaled(9)),
                "the trainer must die at the fail point\n{report}"
            );
            for r in 1..3 {
                assert_eq!(
                    status(r),
                    Some(RankStatus::Exited(0)),
                    "worker {r} must pass\n{report}"
                );
            }
            return;
        }
        RankRole::Rank(world) => world,
    };
    let group = connect(&world, "weight-transfer-dies");
    let metas = model();
    if world.rank() == TRAINER_RANK {
        let mut t = HostTrainer::new(
            group,
            HostConfig {
                packed: false,
                ..HostConfig::default()
            },
        )
        .expect("trainer engine");
        let v1 = all_versions(&metas, 1);
        t.send_dense(&dense(&metas, &v1), Deadline::after(ROUND))
            .expect("round 1");
        let w = world.clone();
        t.set_progress(move |p| {
            if p.messages == 2 {
                testing::fail_point(&w, POINT);
            }
        });
        let v2 = all_versions(&metas, 2);
        let _ = t.send_dense(&dense(&metas, &v2), Deadline::after(ROUND));
        panic!("the fail point should have killed the trainer");
    }
    let mut w = worker(group, HostConfig::default());
    w.receive_session(Deadline::after(ROUND)).expect("round 1");
    assert_eq!(w.registry().digest(), expected_digest(1));

    let budget = Duration::from_secs(10);
    let started = Instant::now();
    let err = w
        .receive_session(Deadline::after(budget))
        .expect_err("the trainer died mid-update");
    let waited = started.elapsed();
    eprintln!(
        "rank {}: failed as expected after {waited:.2?}: {err}",
        world.rank()
    );
    assert!(
        matches!(err, TransferError::Comm { .. }),
        "a transport error is expected, got {err}"
    );
    assert!(
        waited < budget + Duration::from_secs(1),
        "must fail within the deadline"
    );
    assert!(!w.is_active());
    assert_eq!(
        w.registry().digest(),
        expected_digest(1),
        "the previous weights must be kept"
    );
}
