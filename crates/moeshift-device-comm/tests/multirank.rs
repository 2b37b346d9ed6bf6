//! Multi-process tests of the rendezvous store and the host transport.
//!
//! `rank_*` tests follow the convention of `moeshift_device_comm::testing`: run by
//! `cargo test` they launch their own ranks; run with `RANK` set (e.g. under
//! `moeshift launch --nproc N -- <this binary> --exact rank_… --nocapture`) they are one rank
//! of any world size. The `fail_*` tests inject failures into chosen ranks.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moeshift_device_comm::launch::StopReason;
use moeshift_device_comm::testing::{
    self, fail_point, fail_point_hit, RankRole, RankTest, ENV_FAIL_POINT, ENV_FAIL_RANK,
};
use moeshift_device_comm::{
    CommError, HostGroup, LaunchOutcome, RankStatus, ReduceOp, StoreClient, World,
};
use moeshift_sync::Deadline;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LAUNCH_TIMEOUT: Duration = Duration::from_secs(90);

fn deadline() -> Deadline {
    Deadline::after(Duration::from_secs(45))
}

fn ranks(name: &str, n: usize) -> Option<World> {
    testing::run_as_ranks(name, n, LAUNCH_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------
// Rendezvous store

fn store_ops(world: World) {
    let (r, n) = (world.rank(), world.world_size());
    let store = StoreClient::connect(&world, deadline()).expect("connect to the store");
    assert_eq!(
        store.server().is_some(),
        r == 0,
        "only rank 0 hosts the store"
    );

    // Every rank publishes a value; every rank reads every value (waiting where needed).
    store
        .set(
            &format!("value/{r}"),
            format!("from {r}").as_bytes(),
            deadline(),
        )
        .expect("set");
    for j in 0..n {
        let v = store.get(&format!("value/{j}"), deadline()).expect("get");
        assert_eq!(v, format!("from {j}").into_bytes());
    }
    let keys: Vec<String> = (0..n).map(|j| format!("value/{j}")).collect();
    store.wait(&keys, deadline()).expect("wait for all values");
    assert_eq!(
        store.try_get("value/none", deadline()).expect("try_get"),
        None
    );

    // Atomic add: rank r adds r + 1, so the total is n(n+1)/2 once everyone has added.
    let mine = store.add("counter", r as i64 + 1, deadline()).expect("add");
    assert!(mine > r as i64 && mine <= (n * (n + 1) / 2) as i64);
    store.barrier("after-add", deadline()).expect("barrier");
    let total = store.add("counter", 0, deadline()).expect("read counter");
    assert_eq!(total, (n * (n + 1) / 2) as i64);
    assert_eq!(
        store.get("counter", deadline()).expect("get counter"),
        total.to_string().into_bytes()
    );

    // Repeated barriers of one name, each one really waiting for everyone: a rank only
    // passes round k once every rank has added to round k's counter.
    for round in 0..5 {
        store
            .add(&format!("round/{round}"), 1, deadline())
            .expect("count in");
        store.barrier("loop", deadline()).expect("loop barrier");
        let seen = store
            .add(&format!("round/{round}"), 0, deadline())
            .expect("count");
        assert_eq!(seen, n as i64, "round {round}: barrier passed early");
    }
    store.barrier("end", deadline()).expect("final barrier");
}

#[test]
fn rank_store_ops_2() {
    if let Some(world) = ranks("rank_store_ops_2", 2) {
        store_ops(world);
    }
}

#[test]
fn rank_store_ops_4() {
    if let Some(world) = ranks("rank_store_ops_4", 4) {
        store_ops(world);
    }
}

#[test]
fn rank_store_ops_8() {
    if let Some(world) = ranks("rank_store_ops_8", 8) {
        store_ops(world);
    }
}

// ---------------------------------------------------------------------------------------
// Host collectives

/// The byte rank `from` sends to rank `to` at position `k` in the all-to-all test.
fn pattern(from: usize, to: usize, k: usize) -> u8 {
    (from * 31 + to * 7 + k) as u8
}

/// Sizes of the all-to-all parts: `sizes[from][to]`, the same on every rank (shared seed),
/// zero for about a quarter of the pairs.
fn a2a_sizes(n: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            (0..n)
                .map(|_| {
                    if rng.gen_bool(0.25) {
                        0
                    } else {
                        rng.gen_range(1..200_000)
                    }
                })
                .collect()
        })
        .collect()
}

fn host_collectives(world: World) {
    let (r, n) = (world.rank(), world.world_size());
    let store = StoreClient::connect(&world, deadline()).expect("store");
    let g = HostGroup::world(&store, deadline()).expect("world group");
    assert_eq!((g.rank(), g.size()), (r, n));

    // Ring of send/recv: pass a token around; each rank appends its rank.
    if n > 1 {
        let next = (r + 1) % n;
        let prev = (r + n - 1) % n;
        if r == 0 {
            g.send(next, &[0], deadline()).expect("send token");
            let token = g.recv(prev, deadline()).expect("recv token");
            assert_eq!(token, (0..n as u8).collect::<Vec<u8>>());
        } else {
            let mut token = g.recv(prev, deadline()).expect("recv token");
            token.push(r as u8);
            g.send(next, &token, deadline()).expect("send token");
        }
    }

    g.barrier(deadline()).expect("barrier");

    // Broadcast from every root in turn.
    for root in 0..n {
        let mut buf = vec![0u8; 1000 + root];
        if r == root {
            buf.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i + root) as u8);
        }
        g.broadcast(root, &mut buf, deadline()).expect("broadcast");
        assert!(buf.iter().enumerate().all(|(i, &b)| b == (i + root) as u8));
        let text = g
            .broadcast_bytes(
                root,
                (r == root).then_some(b"root says hi".as_slice()),
                deadline(),
            )
            .expect("broadcast_bytes");
        assert_eq!(text, b"root says hi");
    }

    // All-gather, variable and fixed sizes.
    let gathered = g
        .all_gather(&vec![r as u8; r * 3], deadline())
        .expect("all_gather");
    for (j, part) in gathered.iter().enumerate() {
        assert_eq!(part, &vec![j as u8; j * 3]);
    }
    let mut all = vec![0u8; 16 * n];
    g.all_gather_into(&[r as u8 + 1; 16], &mut all, deadline())
        .expect("all_gather_into");
    for (j, chunk) in all.chunks(16).enumerate() {
        assert!(chunk.iter().all(|&b| b == j as u8 + 1));
    }

    // All-to-all-v with random sizes, zero included, both flavours.
    for seed in [1u64, 2, 3] {
        let sizes = a2a_sizes(n, seed);
        let parts: Vec<Vec<u8>> = (0..n)
            .map(|to| (0..sizes[r][to]).map(|k| pattern(r, to, k)).collect())
            .collect();
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        let got = g.all_to_all_v(&refs, deadline()).expect("all_to_all_v");
        for (from, part) in got.iter().enumerate() {
            assert_eq!(part.len(), sizes[from][r], "size from rank {from}");
            assert!(part
                .iter()
                .enumerate()
                .all(|(k, &b)| b == pattern(from, r, k)));
        }
        let mut bufs: Vec<Vec<u8>> = (0..n).map(|from| vec![0u8; sizes[from][r]]).collect();
        let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        g.all_to_all_v_into(&refs, &mut outs, deadline())
            .expect("all_to_all_v_into");
        assert_eq!(bufs, got);
    }

    // All-reduce: sums with known closed forms, in each element type.
    let mut f = [r as f64, 0.5, -(r as f64)];
    g.all_reduce(&mut f, ReduceOp::Sum, deadline())
        .expect("f64 sum");
    let tri = (n * (n - 1) / 2) as f64;
    assert_eq!(f, [tri, 0.5 * n as f64, -tri]);
    let mut i = [1i64 << r.min(40), r as i64 * 1_000_000_000_000];
    g.all_reduce(&mut i, ReduceOp::Sum, deadline())
        .expect("i64 sum");
    let pow: i64 = (0..n).map(|k| 1i64 << k.min(40)).sum();
    assert_eq!(i, [pow, tri as i64 * 1_000_000_000_000]);
    let mut s = [0.25f32 * r as f32];
    g.all_reduce(&mut s, ReduceOp::Sum, deadline())
        .expect("f32 sum");
    assert_eq!(s, [0.25 * tri as f32]);
    let mut m = [r as i32, -(r as i32)];
    g.all_reduce(&mut m, ReduceOp::Max, deadline())
        .expect("i32 max");
    assert_eq!(m, [n as i32 - 1, 0]);

    g.barrier(deadline()).expect("final barrier");
}

#[test]
fn rank_host_collectives_2() {
    if let Some(world) = ranks("rank_host_collectives_2", 2) {
        host_collectives(world);
    }
}

#[test]
fn rank_host_collectives_4() {
    if let Some(world) = ranks("rank_host_collectives_4", 4) {
        host_collectives(world);
    }
}

#[test]
fn rank_host_collectives_8() {
    if let Some(world) = ranks("rank_host_collectives_8", 8) {
        host_collectives(world);
    }
}

/// Sub-groups: even and odd ranks form one each (two disjoint groups working at the same
/// time), then the first half forms a third.
#[test]
fn rank_subgroups_4() {
    let Some(world) = ranks("rank_subgroups_4", 4) else {
        return;
    };
    let (r, n) = (world.rank(), world.world_size());
    let store = StoreClient::connect(&world, deadline()).expect("store");
    let g = HostGroup::world(&store, deadline()).expect("world group");
    let parity: Vec<usize> = (0..n).filter(|k| k % 2 == r % 2).collect();
    let sub = g
        .new_subgroup(&parity, deadline())
        .expect("parity sub-group");
    assert_eq!(sub.rank(), r / 2);
    assert_eq!(sub.members(), parity.as_slice());
    let mut v = [r as i64];
    sub.all_reduce(&mut v, ReduceOp::Sum, deadline())
        .expect("sub all_reduce");
    assert_eq!(v, [parity.iter().map(|&k| k as i64).sum::<i64>()]);
    let gathered = sub
        .all_gather(&[r as u8], deadline())
        .expect("sub all_gather");
    assert_eq!(
        gathered,
        parity.iter().map(|&k| vec![k as u8]).collect::<Vec<_>>()
    );
    let half: Vec<usize> = (0..(n / 2).max(1)).collect();
    if r < half.len() {
        let h = g.new_subgroup(&half, deadline()).expect("half sub-group");
        h.barrier(deadline()).expect("half barrier");
    }
    g.barrier(deadline()).expect("world barrier");
}

/// Several megabytes each way between every pair at once, both as `send_recv` and inside
/// an all-to-all: nothing waits for the other side to read first.
#[test]
fn rank_big_exchange_2() {
    let Some(world) = ranks("rank_big_exchange_2", 2) else {
        return;
    };
    let (r, n) = (world.rank(), world.world_size());
    let store = StoreClient::connect(&world, deadline()).expect("store");
    let g = HostGroup::world(&store, deadline()).expect("world group");
    let size = 24 << 20;
    if n > 1 {
        let next = (r + 1) % n;
        let prev = (r + n - 1) % n;
        let out = vec![r as u8 ^ 0x5a; size];
        let mut inb = vec![0u8; size];
        g.send_recv(next, &out, prev, &mut inb, deadline())
            .expect("send_recv");
        assert!(inb.iter().all(|&b| b == prev as u8 ^ 0x5a));
    }
    let parts: Vec<Vec<u8>> = (0..n)
        .map(|to| vec![(r * n + to) as u8; size / n])
        .collect();
    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    let got = g.all_to_all_v(&refs, deadline()).expect("big all_to_all_v");
    for (from, part) in got.iter().enumerate() {
        assert_eq!(part.len(), size / n);
        assert!(part.iter().all(|&b| b == (from * n + r) as u8));
    }
}

// ---------------------------------------------------------------------------------------
// Failure injection

fn parent_outcome(test: &RankTest) -> Option<LaunchOutcome> {
    match test.launch().unwrap_or_else(|e| panic!("{e}")) {
        RankRole::Rank(_) => None,
        RankRole::Parent(outcome) => Some(outcome),
    }
}

fn rank_world() -> World {
    World::from_env().expect("rank variables")
}

fn output_of(outcome: &LaunchOutcome, rank: usize) -> String {
    outcome.ranks[rank]
        .output
        .iter()
        .map(|l| l.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Rank 2 of 4 is killed (SIGKILL) while a large all-gather is in flight. The survivors
/// fail within their deadline with an error naming rank 2, instead of hanging.
#[test]
fn fail_rank_killed_mid_collective() {
    let test = RankTest::new("fail_rank_killed_mid_collective", 4)
        .env(ENV_FAIL_RANK, "2")
        .env(ENV_FAIL_POINT, "mid_all_gather")
        .timeout(LAUNCH_TIMEOUT)
        .keep_going();
    if let Some(outcome) = parent_outcome(&test) {
        let report = testing::failure_report(&outcome);
        assert_eq!(
            outcome.ranks[2].status,
            RankStatus::Signaled(libc_sigkill()),
            "{report}"
        );
        for rank in [0, 1, 3] {
            assert_eq!(
                outcome.ranks[rank].status,
                RankStatus::Exited(0),
                "{report}"
            );
            let out = output_of(&outcome, rank);
            assert!(out.contains("survivor error:"), "rank {rank}:\n{out}");
        }
        return;
    }
    let world = rank_world();
    let store = StoreClient::connect(&world, deadline()).expect("store");
    let g = HostGroup::world(&store, deadline()).expect("world group");
    g.barrier(deadline()).expect("warm-up barrier");
    let data = vec![world.rank() as u8; 16 << 20];
    if fail_point_hit(&world, "mid_all_gather") {
        // Die a few milliseconds into the collective, while its data is on the wire.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(15));
            fail_point(&world, "mid_all_gather");
        });
        let _ = g.all_gather(&data, deadline());
        std::thread::sleep(Duration::from_secs(60));
        unreachable!("the fail point kills this rank");
    }
    let op_deadline = Deadline::after(Duration::from_secs(20));
    let started = Instant::now();
    let err = match g.all_gather(&data, op_deadline) {
        Err(e) => e,
        // Rank 2's data may all have arrived before it died; the next collective needs it.
        Ok(_) => g.barrier(op_deadline).expect_err("rank 2 is dead"),
    };
    let text = err.to_string();
    println!("survivor error: {text}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(text.contains("rank 2"), "{text}");
    assert!(
        matches!(
            err,
            CommError::PeerLost { .. } | CommError::PeerAborted { .. }
        ),
        "{text}"
    );
}

fn libc_sigkill() -> i32 {
    9
}

/// Rank 2 of 3 never joins: the others' barrier and group formation time out naming it.
#[test]
fn fail_rank_never_starts() {
    let test = RankTest::new("fail_rank_never_starts", 3)
        .env(ENV_FAIL_RANK, "2")
        .env(ENV_FAIL_POINT, "start")
        .timeout(LAUNCH_TIMEOUT)
        .keep_going();
    if let Some(outcome) = parent_outcome(&test) {
        assert!(outcome.success(), "{}", testing::failure_report(&outcome));
        for rank in [0, 1] {
            let out = output_of(&outcome, rank);
            assert!(
                out.contains("barrier error:") && out.contains("group error:"),
                "{out}"
            );
        }
        return;
    }
    let world = rank_world();
    if fail_point_hit(&world, "start") {
        return;
    }
    let store = StoreClient::connect(&world, deadline()).expect("store");
    let started = Instant::now();
    let err = store
        .barrier("start", Deadline::after(Duration::from_secs(2)))
        .expect_err("rank 2 never arrives");
    println!("barrier error: {err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    match &err {
        CommError::BarrierTimeout { missing, .. } => assert_eq!(missing, &vec![2]),
        other => panic!("unexpected error {other}"),
    }
    let err = HostGroup::world(&store, Deadline::after(Duration::from_secs(2)))
        .expect_err("rank 2 never connects");
    println!("group error: {err}");
    let text = err.to_string();
    assert!(matches!(err, CommError::GroupSetupTimeout { .. }), "{text}");
    assert!(text.contains("missing: rank 2"), "{text}");
    // Let the other survivor finish its own timeouts before the store host exits.
    std::thread::sleep(Duration::from_millis(500));
}

/// Rank 0, which hosts the store, never starts: the others cannot reach the store and say
/// where they looked and who should have been there.
#[test]
fn fail_store_host_never_starts() {
    let test = RankTest::new("fail_store_host_never_starts", 3)
        .env(ENV_FAIL_RANK, "0")
        .env(ENV_FAIL_POINT, "start")
        .timeout(LAUNCH_TIMEOUT)
        .keep_going();
    if let Some(outcome) = parent_outcome(&test) {
        assert!(outcome.success(), "{}", testing::failure_report(&outcome));
        for rank in [1, 2] {
            let out = output_of(&outcome, rank);
            assert!(out.contains("store error:"), "{out}");
        }
        return;
    }
    let world = rank_world();
    if fail_point_hit(&world, "start") {
        return;
    }
    let started = Instant::now();
    let err = StoreClient::connect(&world, Deadline::after(Duration::from_millis(1500)))
        .expect_err("nobody hosts the store");
    println!("store error: {err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let text = err.to_string();
    assert!(matches!(err, CommError::StoreUnreachable { .. }), "{text}");
    assert!(
        text.contains(&world.master_endpoint()) && text.contains("hosted by rank 0"),
        "{text}"
    );
}

/// The launcher stops the other ranks as soon as one dies, even when they would otherwise
/// sit idle for a minute.
#[test]
fn fail_launcher_stops_the_others() {
    let test = RankTest::new("fail_launcher_stops_the_others", 3)
        .env(ENV_FAIL_RANK, "1")
        .env(ENV_FAIL_POINT, "after_barrier")
        .timeout(LAUNCH_TIMEOUT);
    let started = Instant::now();
    if let Some(outcome) = parent_outcome(&test) {
        let report = testing::failure_report(&outcome);
        assert!(started.elapsed() < Duration::from_secs(20), "{report}");
        assert_eq!(
            outcome.stopped,
            Some(StopReason::RankFailed {
                rank: 1,
                status: RankStatus::Signaled(libc_sigkill())
            }),
            "{report}"
        );
        for rank in [0, 2] {
            assert!(
                matches!(outcome.ranks[rank].status, RankStatus::Stopped { .. }),
                "{report}"
            );
        }
        assert_ne!(outcome.exit_code(), 0);
        return;
    }
    let world = rank_world();
    let store = StoreClient::connect(&world, deadline()).expect("store");
    store.barrier("up", deadline()).expect("barrier");
    fail_point(&world, "after_barrier");
    std::thread::sleep(Duration::from_secs(60));
}

/// Bad rank variables make a rank fail at once with a message naming the variable.
#[test]
fn fail_bad_env() {
    if testing::is_rank_process() {
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("RANK", "abc"), ("WORLD_SIZE", "2")], "RANK=\"abc\""),
        (&[("RANK", "5"), ("WORLD_SIZE", "2")], "RANK=5"),
        (&[("RANK", "0")], "WORLD_SIZE"),
    ];
    for (vars, expected) in cases {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "--exact",
            "rank_store_ops_2",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_remove("WORLD_SIZE")
        .env_remove("LOCAL_RANK")
        .env_remove("LOCAL_WORLD_SIZE")
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT")
        .env("LOCAL_RANK", "0")
        .env("LOCAL_WORLD_SIZE", "1")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the test binary");
        let until = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > until {
                let _ = child.kill();
                panic!("the rank with bad variables {vars:?} did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().expect("output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{vars:?} should fail:\n{text}");
        assert!(
            text.contains(expected),
            "{vars:?}: expected {expected:?} in\n{text}"
        );
    }
}
