//! Multi-process tests of the `host` EPLB backend, four ranks each (see
//! `moeshift_device_comm::testing` for the convention: `rank_*` tests re-run this binary as
//! the ranks).
//!
//! Expected contents come from the placements alone (see `common`): every row of expert `e`
//! in tensor `t` of layer `l` holds a pattern derived from `(l, e, t)` (replicas are
//! identical, as real weights are), and bytes around the rows hold a canary. After a layer
//! is committed every row must hold the pattern of its expert in the *new* map and every
//! other byte must be unchanged; before the commit every row must still hold its *old*
//! expert.

mod common;

use std::time::{Duration, Instant};

use common::{assert_only_killed, check_staged, host_weights, Churn, Fill, LayerCase, TensorDesc};
use moeshift_device_comm::testing::{self, RankRole, RankTest, ENV_FAIL_POINT, ENV_FAIL_RANK};
use moeshift_device_comm::{StoreClient, World};
use moeshift_eplb_comm::{
    select_backend, Backend, BackendChoice, EplbCommError, EplbCommunicator, HostCommunicator,
    LayerMove, LayerWeights, SelectionReason,
};
use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;
use moeshift_tensor::{DType, HostBuffer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const RANKS: usize = 4;
const MEMBERS: [usize; RANKS] = [0, 1, 2, 3];
const FILL: Fill = Fill {
    salt: 0,
    canary: 0xA5,
};

// ---------------------------------------------------------------------------------------
// Random layers.

/// A random layer: 1–4 rows per rank, placements with replicas, often a few moves away
/// from each other.
fn random_case(rng: &mut StdRng) -> LayerCase {
    const CHURN: Churn = Churn {
        fresh: 9,
        max_moves: 4,
    };
    common::random_case(rng, RANKS, 4, CHURN, random_tensor)
}

/// A tensor of a random layer: empty rows, strided rows, 2-D rows or 1-D rows.
fn random_tensor(rng: &mut StdRng) -> TensorDesc {
    const DTYPES: [DType; 6] = [
        DType::Bf16,
        DType::F32,
        DType::U8,
        DType::F64,
        DType::F8E4M3Fn,
        DType::I32,
    ];
    let dtype = *DTYPES.choose(rng).unwrap();
    match rng.gen_range(0..10) {
        0 => TensorDesc::plain(dtype, &[0]),
        1..=3 => {
            let cols = rng.gen_range(1..=24);
            let (lead, trail) = (rng.gen_range(0..=3), rng.gen_range(1..=3));
            TensorDesc::strided(dtype, lead, cols, trail)
        }
        4..=6 => TensorDesc::plain(dtype, &[rng.gen_range(1..=6), rng.gen_range(1..=6)]),
        _ => TensorDesc::plain(dtype, &[rng.gen_range(1..=48)]),
    }
}

/// This rank's buffers of every case, holding its old placement.
fn old_buffers(cases: &[LayerCase], me: usize) -> Vec<Vec<HostBuffer>> {
    cases
        .iter()
        .enumerate()
        .map(|(l, c)| FILL.host_buffers(l, &c.desc.tensors, c.desc.seg(&c.old, me)))
        .collect()
}

/// The weights of every case over `buffers`.
fn case_weights<'a>(
    cases: &[LayerCase],
    buffers: &'a mut [Vec<HostBuffer>],
) -> Vec<LayerWeights<'a>> {
    buffers
        .iter_mut()
        .zip(cases)
        .map(|(bufs, c)| host_weights(&c.desc.tensors, c.desc.rows, bufs))
        .collect()
}

/// Every byte of every case's buffers is as its new placement says (rows and canaries).
fn check_new_buffers(cases: &[LayerCase], buffers: &[Vec<HostBuffer>], me: usize) {
    for (l, c) in cases.iter().enumerate() {
        for (t, d) in c.desc.tensors.iter().enumerate() {
            let want = FILL.buffer(l, t, d, c.desc.seg(&c.new, me));
            assert!(
                buffers[l][t].as_slice() == want.as_slice(),
                "layer {l}, tensor {t}: bytes outside the rows changed, or a row is wrong"
            );
        }
    }
}

fn connect(world: &World, deadline: Deadline) -> StoreClient {
    StoreClient::connect(world, deadline).expect("store")
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// 240 random layers: random old/new placements with replicas, 1–3 tensors of different
/// dtypes and row shapes (some strided, some empty), every row checked before and after
/// the commit, every other byte checked at the end.
#[test]
fn rank_random_plans_4() {
    let Some(world) = testing::run_as_ranks("rank_random_plans_4", RANKS, Duration::from_secs(120))
        .expect("ranks")
    else {
        return;
    };
    const LAYERS: usize = 240;
    let me = world.rank();
    let deadline = Deadline::after(Duration::from_secs(90));
    let store = connect(&world, deadline);
    let mut rng = StdRng::seed_from_u64(0x00E9_1B5E_ED00);
    let cases: Vec<LayerCase> = (0..LAYERS).map(|_| random_case(&mut rng)).collect();

    let mut buffers = old_buffers(&cases, me);
    let mut weights = case_weights(&cases, &mut buffers);
    let mut comm =
        HostCommunicator::new(&store, &MEMBERS, &weights, deadline).expect("communicator");
    assert_eq!((comm.rank(), comm.num_ranks()), (me, RANKS));

    let (mut moved, mut fills, mut local_total) = (0usize, 0usize, 0usize);
    for (l, c) in cases.iter().enumerate() {
        let d = &c.desc;
        let plan = LayerPlan::new(&c.old, &c.new, RANKS).unwrap();
        let w = &mut weights[l];
        let staged = comm
            .transfer(l, &plan, w, Deadline::after(Duration::from_secs(20)))
            .unwrap_or_else(|e| panic!("layer {l} ({c:?}): {e}"));
        FILL.check_rows(
            w,
            l,
            d.seg(&c.old, me),
            "after the transfer, before the commit",
        );

        // Staging holds exactly the rows that change and are not duplicate fills.
        let what = format!("layer {l}");
        let kinds = check_staged(&staged, d, &c.old, &c.new, me, &what);
        let eb = d.expert_bytes() as u64;
        let stats = *staged.stats();
        // Rows plus small per-round headers, never a whole layer.
        let rows_bytes = kinds.staged().len() as u64 * eb;
        let headers =
            stats.rounds as u64 * 56 + 24 * d.tensors.len() as u64 * kinds.recv.len() as u64;
        assert!(
            stats.staging_bytes >= rows_bytes && stats.staging_bytes <= rows_bytes + headers,
            "layer {l}: staging {} bytes for {rows_bytes} bytes of rows",
            stats.staging_bytes
        );

        let done = staged
            .commit(w)
            .unwrap_or_else(|e| panic!("layer {l}: commit: {e}"));
        kinds.check_commit(&done, eb, &what);
        FILL.check_rows(w, l, d.seg(&c.new, me), "after the commit");
        moved += kinds.recv.len();
        fills += kinds.dup.len();
        local_total += kinds.local.len();
    }
    drop(comm);
    drop(weights);
    check_new_buffers(&cases, &buffers, me);
    // The random layers really exercised every kind of row.
    assert!(
        moved > 60 && fills >= 5 && local_total > 30,
        "{moved} {fills} {local_total}"
    );
}

/// 60 random layers moved as 12 rearrangements of 5 layers each (the default pipelined
/// `rearrange`: each commit overlaps the next layer's transfer), in shuffled order: every
/// row of every layer holds its new expert afterwards, the statistics come back in call
/// order, and a rearrangement that names a layer twice is refused on every rank before
/// anything moves.
#[test]
fn rank_rearrange_4() {
    let Some(world) =
        testing::run_as_ranks("rank_rearrange_4", RANKS, Duration::from_secs(120)).expect("ranks")
    else {
        return;
    };
    const LAYERS: usize = 60;
    const PER_CALL: usize = 5;
    let me = world.rank();
    let deadline = Deadline::after(Duration::from_secs(90));
    let store = connect(&world, deadline);
    let mut rng = StdRng::seed_from_u64(0x2EA2_2A46_E000);
    let cases: Vec<LayerCase> = (0..LAYERS).map(|_| random_case(&mut rng)).collect();
    let mut buffers = old_buffers(&cases, me);
    let mut weights = case_weights(&cases, &mut buffers);
    let mut comm =
        HostCommunicator::new(&store, &MEMBERS, &weights, deadline).expect("communicator");
    let plans: Vec<LayerPlan> = cases
        .iter()
        .map(|c| LayerPlan::new(&c.old, &c.new, RANKS).unwrap())
        .collect();

    // A layer named twice: refused, nothing written.
    {
        let (a, rest) = weights.split_at_mut(1);
        let mut moves = [
            LayerMove {
                layer: 0,
                plan: &plans[0],
                weights: &mut a[0],
            },
            LayerMove {
                layer: 0,
                plan: &plans[0],
                weights: &mut rest[0],
            },
        ];
        let err = comm
            .rearrange(&mut moves, Deadline::after(Duration::from_secs(20)))
            .expect_err("a repeated layer is refused");
        assert!(err.committed.is_empty(), "{err}");
        assert_eq!(err.layer, 0);
        assert!(err.to_string().contains("twice"), "{err}");
        FILL.check_rows(
            &weights[0],
            0,
            cases[0].desc.seg(&cases[0].old, me),
            "refused",
        );
    }

    let mut order: Vec<usize> = (0..LAYERS).collect();
    order.shuffle(&mut rng);
    for (call, chunk) in order.chunks(PER_CALL).enumerate() {
        let mut picked: Vec<(usize, &mut LayerWeights<'_>)> = weights
            .iter_mut()
            .enumerate()
            .filter(|(l, _)| chunk.contains(l))
            .collect();
        // In the shuffled order of the chunk.
        picked.sort_by_key(|(l, _)| chunk.iter().position(|c| c == l));
        let mut moves: Vec<LayerMove<'_, '_>> = picked
            .into_iter()
            .map(|(l, w)| LayerMove {
                layer: l,
                plan: &plans[l],
                weights: w,
            })
            .collect();
        let stats = comm
            .rearrange(&mut moves, Deadline::after(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("rank {me}, call {call} (layers {chunk:?}): {e}"));
        assert_eq!(stats.len(), chunk.len());
        for (s, &l) in stats.iter().zip(chunk) {
            let kinds = common::RowKinds::new(
                cases[l].desc.seg(&cases[l].old, me),
                cases[l].desc.seg(&cases[l].new, me),
            );
            let eb = cases[l].desc.expert_bytes() as u64;
            kinds.check_commit(s, eb, &format!("call {call}, layer {l}"));
            assert_eq!(
                s.bytes_received,
                kinds.recv.len() as u64 * eb,
                "call {call}, layer {l}: received"
            );
        }
    }
    for (l, c) in cases.iter().enumerate() {
        FILL.check_rows(
            &weights[l],
            l,
            c.desc.seg(&c.new, me),
            "after the rearrangements",
        );
    }
    drop(comm);
    drop(weights);
    check_new_buffers(&cases, &buffers, me);
}

/// Layer 0 of the mismatch scenario: two rows per rank, experts move to the next-but-one
/// rank's rows.
fn mismatch_case() -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let old: Vec<usize> = (0..8).collect();
    let new = vec![2, 3, 4, 5, 6, 7, 0, 1];
    let other = vec![3, 2, 5, 4, 7, 6, 1, 0];
    (old, new, other)
}

/// A plan that differs between ranks, and a rank whose own checks fail: a typed error on
/// every rank, quickly, with the weights untouched; the communicator stays usable.
#[test]
fn rank_plan_mismatch_4() {
    let Some(world) = testing::run_as_ranks("rank_plan_mismatch_4", RANKS, Duration::from_secs(60))
        .expect("ranks")
    else {
        return;
    };
    let me = world.rank();
    let deadline = Deadline::after(Duration::from_secs(40));
    let store = connect(&world, deadline);
    let (old, new, other) = mismatch_case();
    let d = vec![
        TensorDesc::plain(DType::Bf16, &[4, 3]),
        TensorDesc::strided(DType::F32, 1, 5, 2),
    ];
    let seg = |m: &[usize]| m[me * 2..me * 2 + 2].to_vec();
    let mut bufs = FILL.host_buffers(0, &d, &seg(&old));
    let mut w = host_weights(&d, 2, &mut bufs);
    let mut comm = HostCommunicator::new(&store, &MEMBERS, std::slice::from_ref(&w), deadline)
        .expect("communicator");

    // 1. Rank 3 computed its plan from another map.
    let plan = LayerPlan::new(&old, if me == 3 { &other } else { &new }, RANKS).unwrap();
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
            let want: Vec<usize> = if me == 3 { vec![0, 1, 2] } else { vec![3] };
            assert_eq!(peers, &want, "{err}");
        }
        other => panic!("expected a plan digest mismatch, got {other}"),
    }
    assert!(!err.poisons_communicator());
    FILL.check_rows(&w, 0, &seg(&old), "after a refused plan");

    // 2. Rank 1 asks for a layer the communicator does not know: it refuses, the others
    //    are told why.
    let plan = LayerPlan::new(&old, &new, RANKS).unwrap();
    let layer = if me == 1 { 1 } else { 0 };
    let err = comm
        .transfer(layer, &plan, &w, Deadline::after(Duration::from_secs(10)))
        .unwrap_err();
    if me == 1 {
        assert!(
            matches!(
                err,
                EplbCommError::LayerOutOfRange {
                    layer: 1,
                    layers: 1,
                    ..
                }
            ),
            "{err}"
        );
    } else {
        match &err {
            EplbCommError::PeerRefused {
                peer: 1, reason, ..
            } => {
                assert!(reason.contains("layer 1 is out of range"), "{err}");
            }
            other => panic!("expected rank 1's refusal, got {other}"),
        }
    }
    FILL.check_rows(&w, 0, &seg(&old), "after a refused layer");

    // 3. The same communicator still works once the ranks agree.
    let stats = comm
        .transfer_and_commit(0, &plan, &mut w, Deadline::after(Duration::from_secs(10)))
        .expect("agreed transfer");
    let eb = (4 * 3 * 2 + 5 * 4) as u64;
    assert_eq!(stats.bytes_received, 2 * eb);
    assert_eq!(stats.bytes_sent, 2 * eb);
    assert_eq!(stats.peers, 2);
    FILL.check_rows(&w, 0, &seg(&new), "after the agreed transfer");
    drop(comm);
    drop(w);
    for (t, desc) in d.iter().enumerate() {
        assert_eq!(
            bufs[t].as_slice(),
            FILL.buffer(0, t, desc, &seg(&new)).as_slice()
        );
    }
}

/// A rank that never shows up for a layer: the others give up at their deadline, naming it
/// (or the rank that gave up first), with the weights untouched.
#[test]
fn rank_absent_peer_4() {
    let Some(world) =
        testing::run_as_ranks("rank_absent_peer_4", RANKS, Duration::from_secs(60)).expect("ranks")
    else {
        return;
    };
    let me = world.rank();
    let deadline = Deadline::after(Duration::from_secs(30));
    let store = connect(&world, deadline);
    let (old, new, _) = mismatch_case();
    let d = vec![TensorDesc::plain(DType::U8, &[64])];
    let seg = |m: &[usize]| m[me * 2..me * 2 + 2].to_vec();
    let mut bufs = FILL.host_buffers(0, &d, &seg(&old));
    let w = host_weights(&d, 2, &mut bufs);
    let mut comm = HostCommunicator::new(&store, &MEMBERS, std::slice::from_ref(&w), deadline)
        .expect("communicator");
    if me == 3 {
        // Alive but absent: outlives the others' deadline, then leaves.
        std::thread::sleep(Duration::from_millis(2500));
        return;
    }
    let plan = LayerPlan::new(&old, &new, RANKS).unwrap();
    let started = Instant::now();
    let err = comm
        .transfer(0, &plan, &w, Deadline::after(Duration::from_millis(1200)))
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2300),
        "gave up after {took:?}: {err}"
    );
    assert!(err.poisons_communicator(), "{err}");
    match &err {
        EplbCommError::DeadlineExpired {
            waiting_for,
            layer: Some(0),
            ..
        } => {
            assert!(waiting_for.contains(&3), "{err}");
            assert!(
                took >= Duration::from_millis(1100),
                "expired early: {took:?}"
            );
        }
        // Another rank reached its deadline first and told the group.
        EplbCommError::PeerAborted {
            peer,
            layer: Some(0),
            ..
        } => assert_ne!(*peer, 3, "{err}"),
        other => panic!("expected a deadline error, got {other}"),
    }
    FILL.check_rows(&w, 0, &seg(&old), "after the deadline");
    // The group is poisoned now: the next transfer fails at once.
    let again = comm
        .transfer(0, &plan, &w, Deadline::after(Duration::from_secs(5)))
        .unwrap_err();
    assert!(again.poisons_communicator(), "{again}");
}

/// Rank 2 is killed (SIGKILL) while the ranks move large layers back and forth: every
/// survivor gets an error naming a peer within the deadline, and the layer whose transfer
/// failed still holds its old rows.
#[test]
fn peer_killed_mid_transfer_4() {
    let role = RankTest::new("peer_killed_mid_transfer_4", RANKS)
        .timeout(Duration::from_secs(60))
        .keep_going()
        .env(ENV_FAIL_RANK, "2")
        .env(ENV_FAIL_POINT, "mid-transfer")
        .launch()
        .expect("launch");
    let world = match role {
        RankRole::Parent(outcome) => {
            assert_only_killed(&outcome, 2);
            return;
        }
        RankRole::Rank(world) => world,
    };
    let me = world.rank();
    let deadline = Deadline::after(Duration::from_secs(40));
    let store = connect(&world, deadline);
    // 8 rows per rank of 2 tensors, 192 KiB per expert: each layer moves ~3 MiB per rank.
    const ROWS: usize = 8;
    let d = vec![
        TensorDesc::plain(DType::Bf16, &[256, 256]),
        TensorDesc::plain(DType::F32, &[16384]),
    ];
    let old: Vec<usize> = (0..ROWS * RANKS).collect();
    // Rank r's rows go to rank r+1 (rows shifted by one rank), then back.
    let mut new = old.clone();
    new.rotate_right(ROWS);
    let there = LayerPlan::new(&old, &new, RANKS).unwrap();
    let back = LayerPlan::new(&new, &old, RANKS).unwrap();
    let seg = |m: &[usize]| m[me * ROWS..(me + 1) * ROWS].to_vec();
    let mut bufs = FILL.host_buffers(0, &d, &seg(&old));
    let mut w = host_weights(&d, ROWS, &mut bufs);
    let mut comm = HostCommunicator::new(&store, &MEMBERS, std::slice::from_ref(&w), deadline)
        .expect("communicator");

    if testing::fail_point_hit(&world, "mid-transfer") {
        let killer = world.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            testing::fail_point(&killer, "mid-transfer");
        });
    }
    let started = Instant::now();
    let mut current = old.clone();
    for i in 0.. {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no failure seen after {i} layers"
        );
        let (plan, next) = if i % 2 == 0 {
            (&there, &new)
        } else {
            (&back, &old)
        };
        let attempt = Instant::now();
        match comm.transfer_and_commit(0, plan, &mut w, Deadline::after(Duration::from_secs(10))) {
            Ok(_) => current = next.clone(),
            Err(err) => {
                assert!(
                    attempt.elapsed() < Duration::from_secs(10),
                    "after {:?}: {err}",
                    attempt.elapsed()
                );
                assert!(err.poisons_communicator(), "{err}");
                assert!(err.peer().is_some(), "the error names no peer: {err}");
                assert!(
                    matches!(
                        err,
                        EplbCommError::PeerLost { layer: Some(0), .. }
                            | EplbCommError::PeerAborted { layer: Some(0), .. }
                    ),
                    "expected a lost or aborting peer, got {err}"
                );
                if let EplbCommError::PeerLost { peer, .. } = err {
                    assert_eq!(peer, 2, "only rank 2 died");
                }
                eprintln!("rank {me}: layer transfer {i} failed as expected: {err}");
                break;
            }
        }
    }
    assert!(me != 2, "rank 2 should have been killed");
    FILL.check_rows(&w, 0, &seg(&current), "after the failed transfer");
}

/// Default selection, with and without NIXL present (the pure rule).
#[test]
fn default_selection_with_and_without_nixl() {
    let auto = BackendChoice::Auto;
    let with = select_backend(auto, false, true).unwrap();
    assert_eq!(
        (with.backend, with.reason),
        (Backend::Nixl, SelectionReason::NixlAvailable)
    );
    let without = select_backend(auto, false, false).unwrap();
    assert_eq!(
        (without.backend, without.reason),
        (Backend::Host, SelectionReason::NixlUnavailable)
    );
    // An explicit choice wins over what is available…
    assert_eq!(
        select_backend(Backend::Host.into(), false, true)
            .unwrap()
            .backend,
        Backend::Host
    );
    // …but an explicit nixl without NIXL is an error, never a fallback to host.
    assert!(matches!(
        select_backend("nixl".parse().unwrap(), false, false),
        Err(EplbCommError::NixlUnavailable { .. })
    ));
    // Elastic mode wants nccl whatever NIXL says: chosen in a build with feature `cuda`,
    // a typed error without it.
    for nixl in [false, true] {
        let elastic = select_backend(auto, true, nixl);
        if cfg!(feature = "cuda") {
            let s = elastic.unwrap();
            assert_eq!(
                (s.backend, s.reason),
                (Backend::Nccl, SelectionReason::Elastic)
            );
        } else {
            assert!(matches!(
                elastic,
                Err(EplbCommError::BackendUnavailable {
                    backend: Backend::Nccl,
                    ..
                })
            ));
        }
    }
}
