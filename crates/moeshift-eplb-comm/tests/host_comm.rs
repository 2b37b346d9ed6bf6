//! Multi-process tests of the `host` EPLB backend, four ranks each (see
//! `moeshift_device_comm::testing` for the convention: `rank_*` tests re-run this binary as
//! the ranks).
//!
//! Expected contents come from the placements alone: every row of expert `e` in tensor `t`
//! of layer `l` holds a pattern derived from `(l, e, t)` (replicas are identical, as real
//! weights are), and bytes around the rows hold a canary. After a layer is committed every
//! row must hold the pattern of its expert in the *new* map and every other byte must be
//! unchanged; before the commit every row must still hold its *old* expert.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use moeshift_device_comm::testing::{self, RankRole, RankTest, ENV_FAIL_POINT, ENV_FAIL_RANK};
use moeshift_device_comm::{RankStatus, StoreClient, World};
use moeshift_eplb_comm::{
    select_backend, Backend, BackendChoice, EplbCommError, EplbCommunicator, HostCommunicator,
    LayerWeights, RowSource, SelectionReason,
};
use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;
use moeshift_tensor::{DType, HostBuffer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const RANKS: usize = 4;
const MEMBERS: [usize; RANKS] = [0, 1, 2, 3];
const CANARY: u8 = 0xA5;

// ---------------------------------------------------------------------------------------
// Row contents.

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The bytes of a row of expert `expert`, tensor `tensor`, layer `layer`.
fn pattern(layer: usize, expert: usize, tensor: usize, len: usize) -> Vec<u8> {
    let seed = splitmix(splitmix(splitmix(layer as u64) ^ expert as u64) ^ tensor as u64);
    let mut out = Vec::with_capacity(len + 8);
    let mut word = 0u64;
    while out.len() < len {
        out.extend_from_slice(&splitmix(seed ^ word).to_le_bytes());
        word += 1;
    }
    out.truncate(len);
    out
}

/// One tensor of a test layer: `[rows, lead + cols + trail]` elements per row when strided
/// (the expert rows are the `cols` in the middle), or `[rows, inner...]` contiguous.
#[derive(Debug, Clone)]
struct TensorDesc {
    dtype: DType,
    inner: Vec<usize>,
    /// `(lead, trail)` elements around each row (1-D rows only).
    gap: Option<(usize, usize)>,
}

impl TensorDesc {
    fn elem(&self) -> usize {
        self.dtype.size_bytes()
    }
    fn row_bytes(&self) -> usize {
        self.inner.iter().product::<usize>() * self.elem()
    }
    fn row_stride(&self) -> usize {
        match self.gap {
            Some((lead, trail)) => self.row_bytes() + (lead + trail) * self.elem(),
            None => self.row_bytes(),
        }
    }
    fn row_start(&self, row: usize) -> usize {
        row * self.row_stride() + self.gap.map_or(0, |(lead, _)| lead * self.elem())
    }
    /// Bytes of the buffer: the rows, plus 24 canary bytes after them.
    fn buffer_len(&self, rows: usize) -> usize {
        rows * self.row_stride() + 24
    }
}

/// The whole buffer of tensor `t` on a rank whose rows hold `experts`.
fn expected_buffer(layer: usize, t: usize, d: &TensorDesc, experts: &[usize]) -> Vec<u8> {
    let mut buf = vec![CANARY; d.buffer_len(experts.len())];
    for (row, &e) in experts.iter().enumerate() {
        let start = d.row_start(row);
        buf[start..start + d.row_bytes()].copy_from_slice(&pattern(layer, e, t, d.row_bytes()));
    }
    buf
}

fn build_weights<'a>(
    tensors: &[TensorDesc],
    rows: usize,
    bufs: &'a mut [HostBuffer],
) -> LayerWeights<'a> {
    let mut b = LayerWeights::builder();
    for (t, (d, buf)) in tensors.iter().zip(bufs.iter_mut()).enumerate() {
        let name = format!("t{t}");
        b = match d.gap {
            Some((lead, trail)) => {
                let cols = d.inner[0];
                let view = buf
                    .view(&[rows, lead + cols + trail], d.dtype)
                    .unwrap()
                    .narrow(1, lead, cols)
                    .unwrap();
                b.host_view(&name, buf, view).unwrap()
            }
            None => {
                let mut shape = vec![rows];
                shape.extend(&d.inner);
                b.host(&name, buf, &shape, d.dtype).unwrap()
            }
        };
    }
    b.build().unwrap()
}

/// Every row of `w` holds the pattern of its expert in `experts`.
fn check_rows(w: &LayerWeights<'_>, layer: usize, experts: &[usize], when: &str) {
    for (row, &e) in experts.iter().enumerate() {
        for t in 0..w.num_tensors() {
            let got = w.row(t, row).unwrap();
            assert!(
                got == pattern(layer, e, t, got.len()).as_slice(),
                "layer {layer}, row {row}, tensor {t}: {when}, the row does not hold expert {e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Random layers.

#[derive(Debug, Clone)]
struct LayerCase {
    rows: usize,
    old: Vec<usize>,
    new: Vec<usize>,
    tensors: Vec<TensorDesc>,
}

impl LayerCase {
    fn seg<'a>(&self, map: &'a [usize], rank: usize) -> &'a [usize] {
        &map[rank * self.rows..(rank + 1) * self.rows]
    }
}

/// A placement of `n` experts in `slots` slots: each expert at least once, the rest random
/// replicas, shuffled.
fn random_map(rng: &mut StdRng, n: usize, slots: usize) -> Vec<usize> {
    let mut m: Vec<usize> = (0..n).collect();
    while m.len() < slots {
        m.push(rng.gen_range(0..n));
    }
    m.shuffle(rng);
    m
}

fn random_case(rng: &mut StdRng) -> LayerCase {
    let rows = rng.gen_range(1..=4);
    let slots = rows * RANKS;
    let n = rng.gen_range(1..=slots);
    let old = random_map(rng, n, slots);
    let new = match rng.gen_range(0..20) {
        0 => old.clone(),
        1..=9 => random_map(rng, n, slots),
        _ => {
            // A few moves away from the old map: swaps and replica changes.
            let mut m = old.clone();
            for _ in 0..rng.gen_range(1..=4) {
                let (a, b) = (rng.gen_range(0..slots), rng.gen_range(0..slots));
                if rng.gen_bool(0.5) {
                    m.swap(a, b);
                } else if m.iter().filter(|&&x| x == m[a]).count() > 1 {
                    m[a] = rng.gen_range(0..n);
                }
            }
            m
        }
    };
    let dtypes = [
        DType::Bf16,
        DType::F32,
        DType::U8,
        DType::F64,
        DType::F8E4M3Fn,
        DType::I32,
    ];
    let tensors = (0..rng.gen_range(1..=3))
        .map(|_| {
            let dtype = *dtypes.choose(rng).unwrap();
            match rng.gen_range(0..10) {
                0 => TensorDesc {
                    dtype,
                    inner: vec![0],
                    gap: None,
                },
                1..=3 => TensorDesc {
                    dtype,
                    inner: vec![rng.gen_range(1..=24)],
                    gap: Some((rng.gen_range(0..=3), rng.gen_range(1..=3))),
                },
                4..=6 => TensorDesc {
                    dtype,
                    inner: vec![rng.gen_range(1..=6), rng.gen_range(1..=6)],
                    gap: None,
                },
                _ => TensorDesc {
                    dtype,
                    inner: vec![rng.gen_range(1..=48)],
                    gap: None,
                },
            }
        })
        .collect();
    LayerCase {
        rows,
        old,
        new,
        tensors,
    }
}

/// What a rank must stage, reasoned from the maps alone: `(local rows, received rows,
/// duplicate rows)`. A changed row whose expert the rank already held is a local copy; the
/// first row of an expert new to the rank is received; later rows of it are duplicates.
fn expected_rows(
    old: &[usize],
    new: &[usize],
) -> (BTreeSet<usize>, BTreeSet<usize>, BTreeSet<usize>) {
    let (mut local, mut recv, mut dup) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for (i, &e) in new.iter().enumerate() {
        if old[i] == e {
            continue;
        }
        if old.contains(&e) {
            local.insert(i);
        } else if new[..i].contains(&e) {
            dup.insert(i);
        } else {
            recv.insert(i);
        }
    }
    (local, recv, dup)
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

    let mut buffers: Vec<Vec<HostBuffer>> = cases
        .iter()
        .enumerate()
        .map(|(l, c)| {
            let experts = c.seg(&c.old, me);
            c.tensors
                .iter()
                .enumerate()
                .map(|(t, d)| HostBuffer::from_bytes(&expected_buffer(l, t, d, experts)).unwrap())
                .collect()
        })
        .collect();
    let mut weights: Vec<LayerWeights<'_>> = buffers
        .iter_mut()
        .zip(&cases)
        .map(|(bufs, c)| build_weights(&c.tensors, c.rows, bufs))
        .collect();
    let mut comm =
        HostCommunicator::new(&store, &MEMBERS, &weights, deadline).expect("communicator");
    assert_eq!((comm.rank(), comm.num_ranks()), (me, RANKS));

    let (mut moved, mut fills, mut local_total) = (0usize, 0usize, 0usize);
    for (l, c) in cases.iter().enumerate() {
        let plan = LayerPlan::new(&c.old, &c.new, RANKS).unwrap();
        let w = &mut weights[l];
        let staged = comm
            .transfer(l, &plan, w, Deadline::after(Duration::from_secs(20)))
            .unwrap_or_else(|e| panic!("layer {l} ({c:?}): {e}"));
        check_rows(
            w,
            l,
            c.seg(&c.old, me),
            "after the transfer, before the commit",
        );

        // Staging holds exactly the rows that change and are not duplicate fills.
        let (local, recv, dup) = expected_rows(c.seg(&c.old, me), c.seg(&c.new, me));
        let staged_dst: BTreeSet<usize> = staged.staged_rows().iter().map(|r| r.dst_row).collect();
        let want: BTreeSet<usize> = local.union(&recv).copied().collect();
        assert_eq!(staged_dst, want, "layer {l}: staged rows");
        assert_eq!(
            staged.staged_rows().len(),
            want.len(),
            "layer {l}: a row staged twice"
        );
        for r in staged.staged_rows() {
            assert_eq!(
                r.expert,
                c.seg(&c.new, me)[r.dst_row],
                "layer {l}: staged expert"
            );
            match r.source {
                RowSource::Local { src_row } => {
                    assert!(local.contains(&r.dst_row), "layer {l}");
                    assert_eq!(
                        c.seg(&c.old, me)[src_row],
                        r.expert,
                        "layer {l}: copy source"
                    );
                }
                RowSource::Peer { peer, .. } => {
                    assert!(recv.contains(&r.dst_row), "layer {l}");
                    assert!(
                        c.seg(&c.old, peer).contains(&r.expert),
                        "layer {l}: sender lacks the expert"
                    );
                }
            }
        }
        let eb: u64 = c.tensors.iter().map(|d| d.row_bytes() as u64).sum();
        let stats = *staged.stats();
        assert_eq!(stats.bytes_received, recv.len() as u64 * eb, "layer {l}");
        assert_eq!(
            stats.bytes_copied_locally,
            local.len() as u64 * eb,
            "layer {l}"
        );
        // Rows plus small per-round headers, never a whole layer.
        let rows_bytes = want.len() as u64 * eb;
        let headers = stats.rounds as u64 * 56 + 24 * c.tensors.len() as u64 * recv.len() as u64;
        assert!(
            stats.staging_bytes >= rows_bytes && stats.staging_bytes <= rows_bytes + headers,
            "layer {l}: staging {} bytes for {rows_bytes} bytes of rows",
            stats.staging_bytes
        );

        let done = staged
            .commit(w)
            .unwrap_or_else(|e| panic!("layer {l}: commit: {e}"));
        assert_eq!(
            done.bytes_copied_locally,
            (local.len() + dup.len()) as u64 * eb,
            "layer {l}"
        );
        check_rows(w, l, c.seg(&c.new, me), "after the commit");
        moved += recv.len();
        fills += dup.len();
        local_total += local.len();
    }
    drop(comm);
    drop(weights);
    for (l, c) in cases.iter().enumerate() {
        for (t, d) in c.tensors.iter().enumerate() {
            let want = expected_buffer(l, t, d, c.seg(&c.new, me));
            assert!(
                buffers[l][t].as_slice() == want.as_slice(),
                "layer {l}, tensor {t}: bytes outside the rows changed, or a row is wrong"
            );
        }
    }
    // The random layers really exercised every kind of row.
    assert!(
        moved > 60 && fills >= 5 && local_total > 30,
        "{moved} {fills} {local_total}"
    );
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
        TensorDesc {
            dtype: DType::Bf16,
            inner: vec![4, 3],
            gap: None,
        },
        TensorDesc {
            dtype: DType::F32,
            inner: vec![5],
            gap: Some((1, 2)),
        },
    ];
    let seg = |m: &[usize]| m[me * 2..me * 2 + 2].to_vec();
    let mut bufs: Vec<HostBuffer> = d
        .iter()
        .enumerate()
        .map(|(t, desc)| HostBuffer::from_bytes(&expected_buffer(0, t, desc, &seg(&old))).unwrap())
        .collect();
    let mut w = build_weights(&d, 2, &mut bufs);
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
    check_rows(&w, 0, &seg(&old), "after a refused plan");

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
    check_rows(&w, 0, &seg(&old), "after a refused layer");

    // 3. The same communicator still works once the ranks agree.
    let stats = comm
        .transfer_and_commit(0, &plan, &mut w, Deadline::after(Duration::from_secs(10)))
        .expect("agreed transfer");
    let eb = (4 * 3 * 2 + 5 * 4) as u64;
    assert_eq!(stats.bytes_received, 2 * eb);
    assert_eq!(stats.bytes_sent, 2 * eb);
    assert_eq!(stats.peers, 2);
    check_rows(&w, 0, &seg(&new), "after the agreed transfer");
    drop(comm);
    drop(w);
    for (t, desc) in d.iter().enumerate() {
        assert_eq!(
            bufs[t].as_slice(),
            expected_buffer(0, t, desc, &seg(&new)).as_slice()
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
    let d = vec![TensorDesc {
        dtype: DType::U8,
        inner: vec![64],
        gap: None,
    }];
    let seg = |m: &[usize]| m[me * 2..me * 2 + 2].to_vec();
    let mut bufs = vec![HostBuffer::from_bytes(&expected_buffer(0, 0, &d[0], &seg(&old))).unwrap()];
    let w = build_weights(&d, 2, &mut bufs);
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
    check_rows(&w, 0, &seg(&old), "after the deadline");
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
            let report = testing::failure_report(&outcome);
            for r in &outcome.ranks {
                if r.rank == 2 {
                    assert!(
                        matches!(r.status, RankStatus::Signaled(9)),
                        "rank 2 should have been killed: {report}"
                    );
                } else {
                    assert!(r.status.success(), "rank {} failed: {report}", r.rank);
                }
            }
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
        TensorDesc {
            dtype: DType::Bf16,
            inner: vec![256, 256],
            gap: None,
        },
        TensorDesc {
            dtype: DType::F32,
            inner: vec![16384],
            gap: None,
        },
    ];
    let old: Vec<usize> = (0..ROWS * RANKS).collect();
    // Rank r's rows go to rank r+1 (rows shifted by one rank), then back.
    let mut new = old.clone();
    new.rotate_right(ROWS);
    let there = LayerPlan::new(&old, &new, RANKS).unwrap();
    let back = LayerPlan::new(&new, &old, RANKS).unwrap();
    let seg = |m: &[usize]| m[me * ROWS..(me + 1) * ROWS].to_vec();
    let mut bufs: Vec<HostBuffer> = d
        .iter()
        .enumerate()
        .map(|(t, desc)| HostBuffer::from_bytes(&expected_buffer(0, t, desc, &seg(&old))).unwrap())
        .collect();
    let mut w = build_weights(&d, ROWS, &mut bufs);
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
    check_rows(&w, 0, &seg(&current), "after the failed transfer");
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
