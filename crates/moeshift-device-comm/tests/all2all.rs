//! MoE all-to-all over the host transport, across processes.
//!
//! `rank_*` tests follow the convention of `moeshift_device_comm::testing`: run by
//! `cargo test` they launch their own ranks; run with `RANK` set they are one rank.
//!
//! Expected results are computed independently of the managers: a token's combined output
//! is `Σ_k w_k · expert(ids_k)(row)`, with experts that scale their input by a factor that
//! depends only on the logical expert, so the answer does not depend on which replica (or
//! rank) served a pick.

use std::time::Duration;

use moeshift_device_comm::all2all::{
    replica_index, token_key, All2AllError, EpGroupShape, ExpertPlacement, HostAll2All,
    HostAll2AllKind, HostTokens, MoeAll2All, Workspace, WorkspaceCapacity, WorkspaceConfig,
    WorkspaceError,
};
use moeshift_device_comm::layout::{GroupKind, ParallelLayout, ParallelSizes};
use moeshift_device_comm::testing::{self, fail_point, RankRole, RankTest};
use moeshift_device_comm::testing::{ENV_FAIL_POINT, ENV_FAIL_RANK};
use moeshift_device_comm::{HostGroup, RankStatus, ReduceOp, StoreClient, World};
use moeshift_sync::Deadline;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const LAUNCH_TIMEOUT: Duration = Duration::from_secs(90);

fn deadline() -> Deadline {
    Deadline::after(Duration::from_secs(30))
}

fn ranks(name: &str, n: usize) -> Option<World> {
    testing::run_as_ranks(name, n, LAUNCH_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

fn sizes(dp: usize, pp: usize, tp: usize) -> ParallelSizes {
    ParallelSizes {
        dp,
        pp,
        tp,
        ..ParallelSizes::default()
    }
}

/// One round's placement, shared by every rank (generated from the round's seed only).
struct Setup {
    phy2log: Vec<i64>,
    placement: ExpertPlacement,
    hidden: usize,
    top_k: usize,
    max_tokens: usize,
}

fn setup(seed: u64, ep_size: usize, layer: usize) -> Setup {
    let mut rng = StdRng::seed_from_u64(seed);
    let spr = rng.gen_range(1..=4);
    let num_physical = ep_size * spr;
    let num_logical = rng.gen_range((num_physical / 2).max(1)..=num_physical);
    // Every logical expert once, the redundant slots random, then shuffled.
    let mut phy2log: Vec<i64> = (0..num_logical as i64).collect();
    while phy2log.len() < num_physical {
        phy2log.push(rng.gen_range(0..num_logical as i64));
    }
    phy2log.shuffle(&mut rng);
    let placement =
        ExpertPlacement::from_phy2log(layer, &phy2log, num_logical, ep_size).expect("placement");
    Setup {
        phy2log,
        placement,
        hidden: [1, 3, 8, 16][rng.gen_range(0..4)],
        top_k: rng.gen_range(1..=num_logical.min(4)),
        max_tokens: rng.gen_range(0..40),
    }
}

/// One rank's tokens: a random count (zero on rank `zero_rank`), distinct experts per
/// token, weights in (0, 1].
struct Batch {
    hidden: Vec<f32>,
    ids: Vec<u32>,
    weights: Vec<f32>,
}

fn batch(seed: u64, s: &Setup, rank: usize, zero_rank: usize) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed ^ (0x5eed_0000 + rank as u64));
    let n = if rank == zero_rank {
        0
    } else {
        rng.gen_range(0..=s.max_tokens)
    };
    let experts: Vec<u32> = (0..s.placement.num_logical() as u32).collect();
    let mut ids = Vec::with_capacity(n * s.top_k);
    for _ in 0..n {
        ids.extend(experts.choose_multiple(&mut rng, s.top_k).copied());
    }
    Batch {
        hidden: (0..n * s.hidden)
            .map(|_| rng.gen_range(-2.0f32..2.0))
            .collect(),
        ids,
        weights: (0..n * s.top_k).map(|_| 1.0 - rng.gen::<f32>()).collect(),
    }
}

/// The factor expert `e` scales its input by: 1 for identity experts.
fn factor(identity: bool, e: usize) -> f64 {
    if identity {
        1.0
    } else {
        e as f64 + 1.0
    }
}

/// Dispatch then combine on `ep` with both host managers for several random rounds,
/// checking outputs, work items and load counts.
fn dispatch_combine(ep: &HostGroup, rounds: u64) {
    let (me, size) = (ep.rank(), ep.size());
    for kind in HostAll2AllKind::ALL {
        let manager = HostAll2All::new(kind, ep);
        assert_eq!((manager.ep_rank(), manager.ep_size()), (me, size));
        for round in 0..rounds {
            let seed = 1000 * size as u64 + round;
            let identity = round % 2 == 0;
            let s = setup(seed, size, round as usize);
            let b = batch(seed, &s, me, round as usize % size);
            let n = b.ids.len() / s.top_k;
            let tokens = HostTokens::new(&b.hidden, s.hidden, &b.ids, &b.weights, s.top_k);
            let slots = s.placement.num_physical();
            let spr = s.placement.slots_per_rank();
            let mut load = vec![0i64; slots];
            let d = manager
                .dispatch(tokens, &s.placement, Some(&mut load), deadline())
                .unwrap_or_else(|e| panic!("{}: dispatch: {e}", kind.name()));
            assert_eq!(d.num_local_tokens(), n);
            assert_eq!(d.slots_per_rank(), spr);

            // Every work item is a pick of a slot on this rank, of the expert that slot holds.
            for w in d.items() {
                assert_eq!(
                    w.slot / spr,
                    me,
                    "{}: slot {} is not mine",
                    kind.name(),
                    w.slot
                );
                assert_eq!(w.local_slot, w.slot - me * spr);
                assert_eq!(w.logical as i64, s.phy2log[w.slot]);
                assert!(w.row < d.num_rows());
                assert!(w.weight > 0.0 && w.weight <= 1.0);
            }
            let grouped: usize = (0..spr).map(|l| d.items_for_local_slot(l).len()).sum();
            assert_eq!(grouped, d.items().len());

            let outputs = d.expert_outputs_with(|w, row, out| {
                let f = factor(identity, w.logical) as f32;
                for (o, x) in out.iter_mut().zip(row) {
                    *o = f * x;
                }
            });
            let combined = manager
                .combine(&d, &outputs, deadline())
                .unwrap_or_else(|e| panic!("{}: combine: {e}", kind.name()));
            assert_eq!(combined.len(), n * s.hidden);
            for t in 0..n {
                let scale: f64 = (0..s.top_k)
                    .map(|k| {
                        let i = t * s.top_k + k;
                        f64::from(b.weights[i]) * factor(identity, b.ids[i] as usize)
                    })
                    .sum();
                for c in 0..s.hidden {
                    let x = f64::from(b.hidden[t * s.hidden + c]);
                    let want = scale * x;
                    let got = f64::from(combined[t * s.hidden + c]);
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{} round {round}: token {t} value {c}: got {got}, want {want}",
                        kind.name()
                    );
                }
            }

            // Rows: AgRs hands every rank every token; all-to-all-v at most this rank's share.
            let mut totals = [n as i64, d.num_rows() as i64];
            ep.all_reduce(&mut totals, ReduceOp::Sum, deadline())
                .expect("sum token counts");
            let all_tokens = totals[0] as usize;
            match kind {
                HostAll2AllKind::AgRs => assert_eq!(d.num_rows(), all_tokens),
                HostAll2AllKind::AllToAllV => {
                    assert!(d.num_rows() <= all_tokens);
                    // A row arrives once per token and destination; each token has picks.
                    assert!(totals[1] as usize >= all_tokens);
                    assert!(totals[1] as usize <= all_tokens * s.top_k.min(size));
                }
            }

            // Load hook: summed over ranks, the counts are the picks each slot received…
            let mut delivered = vec![0i64; slots];
            for w in d.items() {
                delivered[w.slot] += 1;
            }
            ep.all_reduce(&mut load, ReduceOp::Sum, deadline())
                .expect("sum loads");
            ep.all_reduce(&mut delivered, ReduceOp::Sum, deadline())
                .expect("sum deliveries");
            assert_eq!(load, delivered, "{} round {round}", kind.name());
            // …and per logical expert, the picks the routers made (counted from the ids).
            let mut picks = vec![0i64; s.placement.num_logical()];
            for &e in &b.ids {
                picks[e as usize] += 1;
            }
            ep.all_reduce(&mut picks, ReduceOp::Sum, deadline())
                .expect("sum picks");
            for (e, &want) in picks.iter().enumerate() {
                let got: i64 = s
                    .placement
                    .replicas(e)
                    .expect("expert")
                    .iter()
                    .map(|&slot| load[slot])
                    .sum();
                assert_eq!(got, want, "{} round {round}: expert {e}", kind.name());
            }
            assert_eq!(
                load.iter().sum::<i64>() as usize,
                all_tokens * s.top_k,
                "every (token, k) pick counted once"
            );
        }
    }
}

fn ep_scenario(world: World, layout_sizes: ParallelSizes, rounds: u64) {
    let store = StoreClient::connect(&world, deadline()).expect("store");
    let layout = ParallelLayout::new(world.world_size(), layout_sizes).expect("layout");
    let ep = layout
        .form_host_group(GroupKind::Ep, &store, deadline())
        .expect("EP group");
    assert_eq!(ep.size(), layout.ep_size());
    dispatch_combine(&ep, rounds);
}

#[test]
fn rank_dispatch_combine_2() {
    if let Some(world) = ranks("rank_dispatch_combine_2", 2) {
        ep_scenario(world, sizes(2, 1, 1), 8);
    }
}

#[test]
fn rank_dispatch_combine_4() {
    if let Some(world) = ranks("rank_dispatch_combine_4", 4) {
        // DP 2 × TP 2: one EP group of all 4 ranks.
        ep_scenario(world, sizes(2, 1, 2), 8);
    }
}

#[test]
fn rank_dispatch_combine_8() {
    if let Some(world) = ranks("rank_dispatch_combine_8", 8) {
        // DP 4 × TP 2: the EP group is 8 ranks, twice the DP group.
        ep_scenario(world, sizes(4, 1, 2), 6);
    }
}

/// World 8 with DP 2, PP 2, TP 2: every group of the reference layout forms and connects
/// exactly its ranks, and each pipeline stage runs all-to-all in its own EP group (two
/// groups of 4 at once).
#[test]
fn rank_layout_groups_and_per_stage_ep_8() {
    let Some(world) = ranks("rank_layout_groups_and_per_stage_ep_8", 8) else {
        return;
    };
    let store = StoreClient::connect(&world, deadline()).expect("store");
    let layout = ParallelLayout::new(8, sizes(2, 2, 2)).expect("layout");
    let groups = layout
        .form_host_groups(&store, deadline())
        .expect("host groups");
    let expected: [(GroupKind, &[&[usize]]); 4] = [
        (GroupKind::Tp, &[&[0, 1], &[2, 3], &[4, 5], &[6, 7]]),
        (GroupKind::Pp, &[&[0, 2], &[1, 3], &[4, 6], &[5, 7]]),
        (GroupKind::Dp, &[&[0, 4], &[2, 6], &[1, 5], &[3, 7]]),
        (GroupKind::Ep, &[&[0, 1, 4, 5], &[2, 3, 6, 7]]),
    ];
    for (kind, lists) in expected {
        let mine: &[usize] = lists
            .iter()
            .copied()
            .find(|l| l.contains(&world.rank()))
            .expect("rank listed");
        // Ask the members themselves who they are.
        let g = groups.get(kind);
        let seen = g
            .all_gather(&(world.rank() as u32).to_le_bytes(), deadline())
            .expect("all_gather");
        let seen: Vec<usize> = seen
            .iter()
            .map(|b| u32::from_le_bytes(b.as_slice().try_into().expect("4 bytes")) as usize)
            .collect();
        assert_eq!(seen, mine, "{kind} group of rank {}", world.rank());
    }
    assert_eq!(groups.eplb.members(), groups.ep.members());
    assert_ne!(
        groups.eplb.id(),
        groups.ep.id(),
        "EPLB has its own communicator"
    );
    assert_eq!(groups.pcp.size(), 1);
    dispatch_combine(&groups.ep, 2);
}

/// Invalid input on one rank fails the call on every rank (no waiting for the deadline),
/// load counters are untouched, and the group stays usable.
#[test]
fn rank_invalid_input_fails_everywhere_3() {
    let Some(world) = ranks("rank_invalid_input_fails_everywhere_3", 3) else {
        return;
    };
    let store = StoreClient::connect(&world, deadline()).expect("store");
    let ep = HostGroup::world(&store, deadline()).expect("group");
    let me = ep.rank();
    let p2l = [0i64, 1, 2, 3, 0, 1];
    let placement = ExpertPlacement::from_phy2log(4, &p2l, 4, 3).expect("placement");
    let other = ExpertPlacement::from_phy2log(4, &[0, 1, 2, 3, 1, 0], 4, 3).expect("other");
    let hidden = [1.0f32, 2.0, 3.0, 4.0];
    let good_ids = [0u32, 1, 2, 3];
    let weights = [0.5f32, 0.5, 0.5, 0.5];
    for kind in HostAll2AllKind::ALL {
        let manager = HostAll2All::new(kind, &ep);
        let started = std::time::Instant::now();

        // Rank 1 routes to logical expert 9 of 4.
        let bad_ids = [0u32, 9, 2, 3];
        let ids = if me == 1 { &bad_ids } else { &good_ids };
        let tokens = HostTokens::new(&hidden, 2, ids, &weights, 2);
        let mut load = vec![0i64; 6];
        let err = manager
            .dispatch(tokens, &placement, Some(&mut load), deadline())
            .expect_err("rank 1's input is invalid");
        match (&err, me) {
            (
                All2AllError::UnknownExpert {
                    token: 0,
                    k: 1,
                    expert: 9,
                    layer: 4,
                    ..
                },
                1,
            ) => {}
            (All2AllError::PeerRejected { peer, layer: 4, .. }, 0 | 2) if peer.local == 1 => {}
            _ => panic!("{}: rank {me} got {err}", kind.name()),
        }
        assert!(load.iter().all(|&c| c == 0), "no counts from a failed call");

        // Rank 2 holds another placement: every rank notices.
        let plc = if me == 2 { &other } else { &placement };
        let tokens = HostTokens::new(&hidden, 2, &good_ids, &weights, 2);
        let err = manager
            .dispatch(tokens, plc, None, deadline())
            .expect_err("placements differ");
        match &err {
            All2AllError::PeerMismatch {
                field: "placement fingerprint",
                peer,
                ..
            } => assert!(me == 2 || peer.local == 2, "rank {me}: {err}"),
            _ => panic!("{}: rank {me} got {err}", kind.name()),
        }

        // A valid dispatch, then rank 0 hands combine too few outputs.
        let tokens = HostTokens::new(&hidden, 2, &good_ids, &weights, 2);
        let d = manager
            .dispatch(tokens, &placement, None, deadline())
            .expect("valid dispatch");
        let outputs = d.expert_outputs_with(|_, row, out| out.copy_from_slice(row));
        let short = &outputs[..outputs.len().saturating_sub(1)];
        let given = if me == 0 { short } else { &outputs[..] };
        match manager.combine(&d, given, deadline()) {
            Err(All2AllError::ExpertOutputs { .. }) if me == 0 && !d.items().is_empty() => {}
            Err(All2AllError::PeerRejected { peer, .. }) if me != 0 && peer.local == 0 => {}
            Ok(_) if me == 0 && d.items().is_empty() => {
                // Rank 0 had no work, so its "short" outputs were complete; the others
                // then succeed too.
            }
            Ok(_) if me != 0 => {}
            other => panic!("{}: rank {me}: combine gave {other:?}", kind.name()),
        }

        // A wrong-length load counter on rank 2 only.
        let tokens = HostTokens::new(&hidden, 2, &good_ids, &weights, 2);
        let mut short_load = vec![0i64; 5];
        let mut load = vec![0i64; 6];
        let counter: &mut [i64] = if me == 2 { &mut short_load } else { &mut load };
        let err = manager
            .dispatch(tokens, &placement, Some(counter), deadline())
            .expect_err("rank 2's counter is short");
        match &err {
            All2AllError::LoadCounter {
                len: 5,
                expected: 6,
                ..
            } if me == 2 => {}
            All2AllError::PeerRejected { peer, .. } if me != 2 && peer.local == 2 => {}
            _ => panic!("{}: rank {me} got {err}", kind.name()),
        }

        // The group still works: a valid round trip, identity experts.
        let tokens = HostTokens::new(&hidden, 2, &good_ids, &weights, 2);
        let d = manager
            .dispatch(tokens, &placement, None, deadline())
            .expect("dispatch after failures");
        let outputs = d.expert_outputs_with(|_, row, out| out.copy_from_slice(row));
        let out = manager
            .combine(&d, &outputs, deadline())
            .expect("combine after failures");
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0], "weights sum to 1 per token");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "failures were reported without waiting for deadlines"
        );
    }

    // Two dispatches of one layer combined out of order: rank 0 dispatches a token twice
    // and combines the first dispatch; ranks 1 and 2 dispatch a token, then nothing, and
    // combine the second. Rank 0 receives exactly the rows it sent, yet the others' rows to
    // it disagree, so every rank fails (none returns sums of another dispatch).
    let plain = ExpertPlacement::from_phy2log(5, &[0, 1, 2, 3, 4, 5], 6, 3).expect("placement");
    let (ids, half) = ([0u32, 2], [0.5f32, 0.5]); // experts on ranks 0 and 1
    for kind in HostAll2AllKind::ALL {
        let manager = HostAll2All::new(kind, &ep);
        let one = || HostTokens::new(&hidden[..2], 2, &ids, &half, 2);
        let first = manager
            .dispatch(one(), &plain, None, deadline())
            .expect("first dispatch");
        let then = if me == 0 {
            one()
        } else {
            HostTokens::new(&[], 2, &[], &[], 2)
        };
        let second = manager
            .dispatch(then, &plain, None, deadline())
            .expect("second dispatch");
        let mine = if me == 0 { &first } else { &second };
        let outputs = mine.expert_outputs_with(|_, row, out| out.copy_from_slice(row));
        match manager.combine(mine, &outputs, deadline()) {
            Err(All2AllError::PeerMismatch { op: "combine", .. }) => {}
            other => panic!("{}: rank {me}: combine gave {other:?}", kind.name()),
        }
        // The pairs that do match still combine.
        let outputs = first.expert_outputs_with(|_, row, out| out.copy_from_slice(row));
        let out = manager
            .combine(&first, &outputs, deadline())
            .expect("combine of the first dispatch everywhere");
        assert_eq!(out, [1.0, 2.0], "{}", kind.name());
    }

    // Combine refuses another manager's dispatch, on every rank, and the group survives.
    let agrs = HostAll2All::new(HostAll2AllKind::AgRs, &ep);
    let a2av = HostAll2All::new(HostAll2AllKind::AllToAllV, &ep);
    let tokens = HostTokens::new(&hidden, 2, &good_ids, &weights, 2);
    let d = agrs
        .dispatch(tokens, &placement, None, deadline())
        .expect("dispatch");
    let outputs = d.expert_outputs_with(|_, row, out| out.copy_from_slice(row));
    match a2av.combine(&d, &outputs, deadline()) {
        Err(All2AllError::ForeignDispatch { detail, .. }) => {
            assert!(detail.contains("allgather_reducescatter"), "{detail}")
        }
        other => panic!("rank {me}: {other:?}"),
    }
    let out = agrs
        .combine(&d, &outputs, deadline())
        .expect("the right manager combines it");
    assert_eq!(out, [1.0, 2.0, 3.0, 4.0]);
}

/// Rank 2 of 3 dies between dispatch and combine: the survivors' combine fails within
/// their deadline with a transport error naming rank 2, instead of hanging.
#[test]
fn fail_rank_killed_before_combine() {
    let test = RankTest::new("fail_rank_killed_before_combine", 3)
        .env(ENV_FAIL_RANK, "2")
        .env(ENV_FAIL_POINT, "before_combine")
        .timeout(LAUNCH_TIMEOUT)
        .keep_going();
    let world = match test.launch().unwrap_or_else(|e| panic!("{e}")) {
        RankRole::Rank(world) => world,
        RankRole::Parent(outcome) => {
            let report = testing::failure_report(&outcome);
            assert_eq!(outcome.ranks[2].status, RankStatus::Signaled(9), "{report}");
            for rank in [0, 1] {
                assert_eq!(
                    outcome.ranks[rank].status,
                    RankStatus::Exited(0),
                    "{report}"
                );
                let out: Vec<&str> = outcome.ranks[rank]
                    .output
                    .iter()
                    .map(|l| l.text.as_str())
                    .collect();
                assert!(
                    out.iter().any(|l| l.contains("survivor error:")),
                    "rank {rank}: {out:?}"
                );
            }
            return;
        }
    };
    let store = StoreClient::connect(&world, deadline()).expect("store");
    let ep = HostGroup::world(&store, deadline()).expect("group");
    let s = setup(7, 3, 0);
    let b = batch(7, &s, ep.rank(), usize::MAX);
    let manager = HostAll2All::new(HostAll2AllKind::AllToAllV, &ep);
    let tokens = HostTokens::new(&b.hidden, s.hidden, &b.ids, &b.weights, s.top_k);
    let d = manager
        .dispatch(tokens, &s.placement, None, deadline())
        .expect("dispatch");
    fail_point(&world, "before_combine");
    let outputs = d.expert_outputs_with(|_, row, out| out.copy_from_slice(row));
    let started = std::time::Instant::now();
    let err = manager
        .combine(&d, &outputs, Deadline::after(Duration::from_secs(20)))
        .expect_err("rank 2 is dead");
    println!("survivor error: {err}");
    assert!(started.elapsed() < Duration::from_secs(15), "{err}");
    assert!(matches!(err, All2AllError::Comm { .. }), "{err}");
    assert!(err.to_string().contains("rank 2"), "{err}");
    // Let the other survivor see the failure before the store host exits.
    std::thread::sleep(Duration::from_millis(300));
}

/// The one-sided workspace's resize is agreed on the EP group: every rank gets the maximum
/// of every rank's need, capacity never shrinks, and a rank with another configuration
/// fails the agreement everywhere.
#[test]
fn rank_workspace_resize_agreement_4() {
    let Some(world) = ranks("rank_workspace_resize_agreement_4", 4) else {
        return;
    };
    let store = StoreClient::connect(&world, deadline()).expect("store");
    let layout = ParallelLayout::new(4, sizes(2, 1, 2)).expect("layout");
    let ep = layout
        .form_host_group(GroupKind::Ep, &store, deadline())
        .expect("EP group");
    let dp = layout
        .form_host_group(GroupKind::Dp, &store, deadline())
        .expect("DP group");
    let me = ep.rank();
    let config = WorkspaceConfig {
        top_k: 2,
        num_experts: 16,
        elem_bytes: 2,
    };
    let cap = |tokens, hidden, extra| WorkspaceCapacity {
        max_tokens_per_rank: tokens,
        hidden_size: hidden,
        extra_bytes_per_token: extra,
    };
    let shape = EpGroupShape::from_layout(&layout);
    let mut ws = Workspace::new(4, shape, config, cap(16, 64, 0)).expect("workspace");

    // Rank r needs 10(r+1) tokens; rank 3 a wider hidden size; rank r r extra bytes.
    let need = cap(10 * (me + 1), if me == 3 { 128 } else { 32 }, me);
    let plan = ws
        .agree_resize(&ep, &config, &need, deadline())
        .expect("agree")
        .expect("grows");
    assert_eq!(plan.from, cap(16, 64, 0));
    assert_eq!(plan.to, cap(40, 128, 3));
    // 4 ranks × 40 tokens × (128 × 2 + 2 × 8 + 3) bytes.
    assert_eq!(plan.bytes_per_slot, 4 * 40 * 275);
    ws.apply(&plan).expect("apply");

    // Smaller needs: nothing to do, on every rank.
    let none = ws
        .agree_resize(&ep, &config, &cap(me, 8, 0), deadline())
        .expect("agree");
    assert_eq!(none, None);

    // Rank 1 asks with another top-k: every rank refuses.
    let asked = if me == 1 {
        WorkspaceConfig { top_k: 4, ..config }
    } else {
        config
    };
    match ws.agree_resize(&ep, &asked, &cap(50, 8, 0), deadline()) {
        Err(WorkspaceError::FixedParameter { field: "top-k", .. }) if me == 1 => {}
        Err(WorkspaceError::PeerRejected { peer: 1, .. }) if me != 1 => {}
        other => panic!("rank {me}: {other:?}"),
    }
    assert_eq!(ws.capacity(), cap(40, 128, 3));

    // The DP group is not the group a workspace of the EP group resizes on.
    match ws.agree_resize(&dp, &config, &cap(50, 8, 0), deadline()) {
        Err(WorkspaceError::WrongGroup {
            group_size: 2,
            ep_size: 4,
            ..
        }) => {}
        other => panic!("rank {me}: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Replica choice (single process)

/// The picks of one expert spread evenly over its replicas: with a fixed seed, random
/// token keys and all k, each replica's share stays within 10% of the mean.
#[test]
fn replica_hash_spreads_picks_over_replicas() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for count in [2usize, 3, 4, 7, 8] {
        let mut hits = vec![0usize; count];
        let picks = 20_000;
        for _ in 0..picks / 8 {
            let key = token_key(rng.gen_range(0..64), rng.gen_range(0..100_000));
            for k in 0..8 {
                hits[replica_index(key, k, count)] += 1;
            }
        }
        let mean = picks as f64 / count as f64;
        for (r, &h) in hits.iter().enumerate() {
            assert!(
                (h as f64 - mean).abs() < 0.1 * mean,
                "{count} replicas: replica {r} got {h} of {picks} picks (mean {mean})"
            );
        }
    }
    // Consecutive tokens of one rank (the common case) spread as well.
    let count = 4;
    let mut hits = vec![0usize; count];
    for t in 0..10_000 {
        hits[replica_index(token_key(3, t), 0, count)] += 1;
    }
    assert!(
        hits.iter().all(|&h| (2_250..=2_750).contains(&h)),
        "{hits:?}"
    );
}

/// Unlike vLLM's hash (one replica index for all picks of a token), the k picks of one
/// token land on different replicas.
#[test]
fn replica_hash_differs_across_k() {
    let count = 8;
    let tokens = 2_000;
    let mut all_same = 0;
    let mut distinct_total = 0;
    for t in 0..tokens {
        let key = token_key(1, t);
        let mut seen: Vec<usize> = (0..8).map(|k| replica_index(key, k, count)).collect();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() == 1 {
            all_same += 1;
        }
        distinct_total += seen.len();
    }
    // Uniform picks: P(all 8 equal) = 8^-7, and 8 picks over 8 replicas hit about 5.25
    // distinct ones on average.
    assert_eq!(all_same, 0);
    let mean = distinct_total as f64 / tokens as f64;
    assert!((4.9..5.6).contains(&mean), "mean distinct replicas {mean}");

    // Through a placement: one token's top-8 picks of the same expert use several slots.
    let p2l: Vec<i64> = (0..8).map(|s| if s < 4 { 0 } else { s - 3 }).collect();
    let placement = ExpertPlacement::from_phy2log(0, &p2l, 5, 2).expect("placement");
    let slots: Vec<usize> = (0..8)
        .map(|k| placement.route(token_key(0, 17), k, 0).expect("expert 0"))
        .collect();
    assert!(slots.iter().all(|s| *s < 4));
    let mut distinct = slots.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() > 1, "{slots:?}");
}
