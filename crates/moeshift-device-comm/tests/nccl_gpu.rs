//! NCCL communicator across 2 processes with one GPU each (feature `cuda`).
//!
//! Multi-rank scenarios follow the crate's `testing` convention (`rank_` tests start copies of
//! this binary as ranks). Every test checks first whether NCCL and 2 GPUs are there and, if
//! not, prints why and passes without doing anything, so CI machines without GPUs run it too.
//! With `MOESHIFT_GPU_RANKS=2` the 2 ranks share one GPU ([`testing::share_gpus`]: NCCL over
//! loopback sockets).
//!
//! Run on a GPU machine: `cargo test -p moeshift-device-comm --features cuda --test nccl_gpu`.
#![cfg(feature = "cuda")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use moeshift_device_comm::nccl::{nccl_available, NcclComm, NcclError, P2pOp};
use moeshift_device_comm::testing::{self, RankRole, RankTest, ENV_FAIL_POINT, ENV_FAIL_RANK};
use moeshift_device_comm::{StoreClient, World};
use moeshift_sync::Deadline;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WORLD: usize = 2;
const SETUP: Duration = Duration::from_secs(60);
const OP: Duration = Duration::from_secs(30);
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(180);

/// Why this machine cannot run the GPU tests, if it cannot. Only the parent asks: ranks are
/// started only when the parent found the GPUs.
fn skip_reason() -> Option<String> {
    if testing::is_rank_process() {
        return None;
    }
    if let Err(err) = nccl_available() {
        return Some(format!("NCCL is not usable here: {err}"));
    }
    match CudaContext::device_count() {
        Ok(n) => testing::gpu_shortage(WORLD, n.max(0) as usize),
        Err(err) => Some(format!("cannot count GPUs: {err}")),
    }
}

/// This rank's GPU: `LOCAL_RANK`, or a shared one ([`testing::share_gpus`]) when
/// `MOESHIFT_GPU_RANKS` lets the ranks outnumber the GPUs.
fn rank_gpu(world: &World) -> usize {
    let gpus = CudaContext::device_count().map_or(1, |n| n.max(1) as usize);
    testing::share_gpus(world, gpus)
}

/// True (after printing why) when the test must be skipped.
fn skipped(test: &str) -> bool {
    match skip_reason() {
        Some(reason) => {
            eprintln!("skipping {test}: {reason}");
            true
        }
        None => false,
    }
}

/// The store and a communicator on this rank's GPU ([`rank_gpu`]).
fn setup(world: &World, key: &str) -> (StoreClient, NcclComm) {
    let gpu = rank_gpu(world);
    let deadline = Deadline::after(SETUP);
    let store = StoreClient::connect(world, deadline).expect("connect to the store");
    let comm = NcclComm::from_store(&store, world.rank(), world.world_size(), key, gpu, deadline)
        .expect("create the NCCL communicator");
    (store, comm)
}

fn op_deadline() -> Deadline {
    Deadline::after(OP)
}

/// A well-mixed 32-bit value for element `i` of the message `tag` (splitmix64 finaliser), so
/// that a misplaced, shifted or stale element never matches by accident.
fn value(tag: u64, i: usize) -> u32 {
    let mut z = tag
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(1);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

/// Tag of the message `index` sent from `src` to `dst` in `round` of test `test`.
fn tag(test: u64, round: usize, src: usize, dst: usize, index: usize) -> u64 {
    (test << 56)
        ^ ((round as u64) << 40)
        ^ ((src as u64) << 32)
        ^ ((dst as u64) << 24)
        ^ index as u64
}

fn upload(stream: &Arc<CudaStream>, host: &[u32]) -> CudaSlice<u32> {
    stream.clone_htod(host).expect("host to device copy")
}

fn download(stream: &Arc<CudaStream>, dev: &CudaSlice<u32>) -> Vec<u32> {
    stream.clone_dtoh(dev).expect("device to host copy")
}

/// Asserts `got[offset..offset+len]` holds message `tag`, element by element.
fn check_message(got: &[u32], offset: usize, len: usize, tag: u64, what: &str) {
    for i in 0..len {
        let expected = value(tag, i);
        let actual = got[offset + i];
        assert_eq!(
            actual,
            expected,
            "{what}: element {i} of {len} (buffer index {}) is {actual:#x}, expected {expected:#x}",
            offset + i
        );
    }
}

#[test]
fn rank_nccl_p2p() {
    const NAME: &str = "rank_nccl_p2p";
    if skipped(NAME) {
        return;
    }
    let Some(world) = testing::run_as_ranks(NAME, WORLD, LAUNCH_TIMEOUT).expect("ranks") else {
        return;
    };
    let (store, comm) = setup(&world, "nccl_gpu/p2p");
    let (rank, peer) = (world.rank(), 1 - world.rank());
    let stream = comm.stream().clone();
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);

    // Single sends and receives, alternating direction, sizes from empty to 16 MiB.
    let mut sizes = vec![0usize, 1, 3, 4096, (4 << 20) + 7];
    sizes.extend((0..6).map(|_| rng.gen_range(0..=1 << 20)));
    for (round, &len) in sizes.iter().enumerate() {
        let src = round % 2;
        let t = tag(1, round, src, 1 - src, 0);
        if rank == src {
            let data: Vec<u32> = (0..len).map(|i| value(t, i)).collect();
            let buf = upload(&stream, &data);
            comm.send(peer, &buf, op_deadline()).expect("send");
        } else {
            let mut buf = stream.alloc_zeros::<u32>(len).expect("alloc");
            comm.recv(peer, &mut buf, op_deadline()).expect("recv");
            check_message(
                &download(&stream, &buf),
                0,
                len,
                t,
                &format!("recv round {round}"),
            );
        }
    }

    // Both directions at once, with different sizes each way.
    for round in 0..4 {
        let lens = [rng.gen_range(1..=1 << 20), rng.gen_range(1..=1 << 20)];
        let out_tag = tag(2, round, rank, peer, 0);
        let data: Vec<u32> = (0..lens[rank]).map(|i| value(out_tag, i)).collect();
        let send_buf = upload(&stream, &data);
        let mut recv_buf = stream.alloc_zeros::<u32>(lens[peer]).expect("alloc");
        comm.grouped(
            &[
                P2pOp::send(peer, &send_buf),
                P2pOp::recv(peer, &mut recv_buf),
            ],
            op_deadline(),
        )
        .expect("grouped both ways");
        let got = download(&stream, &recv_buf);
        check_message(
            &got,
            0,
            lens[peer],
            tag(2, round, peer, rank, 0),
            "both ways",
        );
    }

    // 600 messages from rank 0 and 300 from rank 1 in one call: 900 operations per rank, more
    // than fit in one NCCL group, so the exchange is cut into several symmetric groups.
    let counts = [600usize, 300];
    let lens = [rng.gen_range(1..=2048usize), rng.gen_range(1..=2048usize)];
    let mine: Vec<u32> = (0..counts[rank])
        .flat_map(|m| (0..lens[rank]).map(move |i| value(tag(3, 0, rank, peer, m), i)))
        .collect();
    let send_buf = upload(&stream, &mine);
    let mut recv_buf = stream
        .alloc_zeros::<u32>(counts[peer] * lens[peer])
        .expect("alloc");
    {
        let sends: Vec<_> = (0..counts[rank])
            .map(|m| send_buf.slice(m * lens[rank]..(m + 1) * lens[rank]))
            .collect();
        let mut recvs: Vec<_> = recv_buf
            .as_view_mut()
            .chunks_exact_mut(lens[peer])
            .collect();
        let mut ops: Vec<P2pOp<'_>> = sends.iter().map(|v| P2pOp::send(peer, v)).collect();
        ops.extend(recvs.iter_mut().map(|v| P2pOp::recv(peer, v)));
        assert_eq!(ops.len(), counts[0] + counts[1]);
        comm.grouped(&ops, op_deadline())
            .expect("900-operation exchange");
    }
    let got = download(&stream, &recv_buf);
    for m in 0..counts[peer] {
        let what = format!("message {m} of {} from rank {peer}", counts[peer]);
        check_message(
            &got,
            m * lens[peer],
            lens[peer],
            tag(3, 0, peer, rank, m),
            &what,
        );
    }

    // Broadcast from rank 1.
    let len = rng.gen_range(1..=1 << 20);
    let t = tag(4, 0, 1, 0, 0);
    let init: Vec<u32> = if rank == 1 {
        (0..len).map(|i| value(t, i)).collect()
    } else {
        vec![0; len]
    };
    let mut buf = upload(&stream, &init);
    comm.broadcast(&mut buf, 1, op_deadline())
        .expect("broadcast");
    check_message(&download(&stream, &buf), 0, len, t, "broadcast from rank 1");

    // Sum: rank r contributes (r + 1) * (i % 100000); the sum is 3 * (i % 100000) for 2 ranks.
    let len: usize = 1 << 18;
    let contribution: Vec<i32> = (0..len)
        .map(|i| (i % 100_000) as i32 * (rank as i32 + 1))
        .collect();
    let mut buf = stream.clone_htod(&contribution).expect("upload");
    comm.all_reduce_sum(&mut buf, op_deadline())
        .expect("all_reduce");
    let got = stream.clone_dtoh(&buf).expect("download");
    for (i, &x) in got.iter().enumerate() {
        assert_eq!(x, 3 * (i % 100_000) as i32, "all_reduce element {i}");
    }

    assert!(!comm.is_aborted());
    store
        .barrier("nccl_gpu/p2p/done", op_deadline())
        .expect("final barrier");
    comm.close(op_deadline()).expect("close");
}

#[test]
fn rank_nccl_all_to_all_v() {
    const NAME: &str = "rank_nccl_all_to_all_v";
    if skipped(NAME) {
        return;
    }
    let Some(world) = testing::run_as_ranks(NAME, WORLD, LAUNCH_TIMEOUT).expect("ranks") else {
        return;
    };
    let (store, comm) = setup(&world, "nccl_gpu/a2a");
    let (rank, n) = (world.rank(), world.world_size());
    let stream = comm.stream().clone();
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    const SENTINEL: u32 = 0xDEAD_BEEF;
    const SLACK: usize = 17;

    for round in 0..8 {
        // counts[src][dst], the same on every rank; some blocks empty, some rounds all empty.
        let counts: Vec<Vec<usize>> = (0..n)
            .map(|_| {
                (0..n)
                    .map(|_| match round {
                        0 => 0,
                        _ if rng.gen_bool(0.25) => 0,
                        _ => rng.gen_range(1..=300_000),
                    })
                    .collect()
            })
            .collect();
        let send_counts: Vec<usize> = counts[rank].clone();
        let recv_counts: Vec<usize> = (0..n).map(|src| counts[src][rank]).collect();

        let mut data = Vec::new();
        for (dst, &c) in send_counts.iter().enumerate() {
            let t = tag(5, round, rank, dst, 0);
            data.extend((0..c).map(|i| value(t, i)));
        }
        data.push(SENTINEL); // never sent: the send buffer may be longer than the blocks
        let send_buf = upload(&stream, &data);
        let recv_len: usize = recv_counts.iter().sum::<usize>() + SLACK;
        let mut recv_buf = upload(&stream, &vec![SENTINEL; recv_len]);

        comm.all_to_all_v(
            &send_buf,
            &send_counts,
            &mut recv_buf,
            &recv_counts,
            op_deadline(),
        )
        .unwrap_or_else(|e| panic!("all_to_all_v round {round} (counts {counts:?}): {e}"));

        let got = download(&stream, &recv_buf);
        let mut offset = 0;
        for (src, &c) in recv_counts.iter().enumerate() {
            let what = format!("round {round}: block from rank {src}");
            check_message(&got, offset, c, tag(5, round, src, rank, 0), &what);
            offset += c;
        }
        assert!(
            got[offset..].iter().all(|&x| x == SENTINEL),
            "round {round}: the receive wrote past its blocks"
        );
    }

    // Bad counts are refused before anything is sent, and the communicator stays usable.
    let send_buf = upload(&stream, &[1, 2, 3]);
    let mut recv_buf = stream.alloc_zeros::<u32>(3).expect("alloc");
    let err = comm
        .all_to_all_v(&send_buf, &[1], &mut recv_buf, &[1, 1], op_deadline())
        .expect_err("one count for two ranks");
    assert!(
        matches!(
            err,
            NcclError::InvalidArgument {
                field: "send_counts",
                ..
            }
        ),
        "{err}"
    );
    let err = comm
        .all_to_all_v(&send_buf, &[2, 2], &mut recv_buf, &[2, 2], op_deadline())
        .expect_err("blocks larger than the buffer");
    assert!(err.to_string().contains("past the buffer"), "{err}");
    assert!(!comm.is_aborted());

    store
        .barrier("nccl_gpu/a2a/done", op_deadline())
        .expect("final barrier");
    comm.close(op_deadline()).expect("close");
}

#[test]
fn rank_nccl_unmatched_recv_times_out() {
    const NAME: &str = "rank_nccl_unmatched_recv_times_out";
    if skipped(NAME) {
        return;
    }
    let Some(world) = testing::run_as_ranks(NAME, WORLD, LAUNCH_TIMEOUT).expect("ranks") else {
        return;
    };
    let (store, comm) = setup(&world, "nccl_gpu/unmatched");
    let stream = comm.stream().clone();
    // Connect the pair first, so the receive below waits on the GPU rather than in setup.
    let warm = stream.alloc_zeros::<u32>(1024).expect("alloc");
    let mut warm_in = stream.alloc_zeros::<u32>(1024).expect("alloc");
    let peer = 1 - world.rank();
    comm.grouped(
        &[P2pOp::send(peer, &warm), P2pOp::recv(peer, &mut warm_in)],
        op_deadline(),
    )
    .expect("warm-up exchange");

    if world.rank() == 1 {
        // Rank 0 never sends: the receive must give up at its deadline and name rank 0.
        let wait = Duration::from_secs(3);
        let mut buf = stream.alloc_zeros::<u32>(1 << 20).expect("alloc");
        let start = Instant::now();
        let err = comm
            .recv(0, &mut buf, Deadline::after(wait))
            .expect_err("nobody sends");
        let took = start.elapsed();
        eprintln!("rank 1: unmatched receive failed after {took:?}: {err}");
        match &err {
            NcclError::Timeout { rank, peers, .. } => {
                assert_eq!((*rank, peers.as_slice()), (1, &[0][..]), "{err}")
            }
            other => panic!("expected a timeout naming rank 0, got: {other}"),
        }
        assert!(took >= wait, "gave up early: {took:?}");
        assert!(
            took < wait + Duration::from_secs(10),
            "gave up late: {took:?}"
        );
        assert!(comm.is_aborted());
        let err = comm
            .send(0, &warm, op_deadline())
            .expect_err("an aborted communicator refuses work");
        assert!(matches!(err, NcclError::Aborted { rank: 1, .. }), "{err}");
    }
    store
        .barrier("nccl_gpu/unmatched/done", Deadline::after(SETUP))
        .expect("final barrier");
    // Rank 0's peer is gone from the communicator: abort rather than finalize.
    comm.abort();
}

/// The very first operations of fresh communicators, with a peer that never takes part: a
/// receive, and a broadcast (a collective). Connections are opened when a communicator is
/// created, so neither launch waits for the silent peer: each gives up at its own deadline,
/// naming rank 0.
#[test]
fn rank_nccl_first_ops_with_a_silent_peer_time_out() {
    const NAME: &str = "rank_nccl_first_ops_with_a_silent_peer_time_out";
    if skipped(NAME) {
        return;
    }
    let Some(world) = testing::run_as_ranks(NAME, WORLD, LAUNCH_TIMEOUT).expect("ranks") else {
        return;
    };
    let wait = Duration::from_secs(3);
    // One store for both cases (rank 0 hosts it: it must outlive both communicators).
    let gpu = rank_gpu(&world);
    let store = StoreClient::connect(&world, Deadline::after(SETUP)).expect("connect");
    for (case, key) in [
        ("recv", "nccl_gpu/silent/recv"),
        ("broadcast", "nccl_gpu/silent/bcast"),
    ] {
        let comm = NcclComm::from_store(
            &store,
            world.rank(),
            world.world_size(),
            key,
            gpu,
            Deadline::after(SETUP),
        )
        .expect("create the NCCL communicator");
        if world.rank() == 1 {
            let stream = comm.stream().clone();
            let mut buf = stream.alloc_zeros::<u32>(1 << 20).expect("alloc");
            let start = Instant::now();
            let err = match case {
                "recv" => comm.recv(0, &mut buf, Deadline::after(wait)),
                _ => comm.broadcast(&mut buf, 0, Deadline::after(wait)),
            }
            .expect_err("rank 0 never takes part");
            let took = start.elapsed();
            eprintln!("rank 1: first {case} with a silent rank 0 failed after {took:?}: {err}");
            match &err {
                NcclError::Timeout { rank, peers, .. } => {
                    assert_eq!((*rank, peers.as_slice()), (1, &[0][..]), "{err}")
                }
                other => panic!("{case}: expected a timeout naming rank 0, got: {other}"),
            }
            assert!(took >= wait, "{case}: gave up early: {took:?}");
            assert!(
                took < wait + Duration::from_secs(10),
                "{case}: gave up late: {took:?}"
            );
        }
        store
            .barrier(&format!("{key}/done"), Deadline::after(SETUP))
            .expect("barrier");
        comm.abort();
    }
}

/// Rank 1 is killed (SIGKILL) while rank 0 waits in a receive from it: rank 0 must get an
/// error naming rank 1 within its deadline, not hang.
#[test]
fn nccl_peer_death_during_recv() {
    const NAME: &str = "nccl_peer_death_during_recv";
    const POINT: &str = "during_peer_recv";
    if skipped(NAME) {
        return;
    }
    let role = RankTest::new(NAME, WORLD)
        .timeout(LAUNCH_TIMEOUT)
        .keep_going()
        .env(ENV_FAIL_RANK, "1")
        .env(ENV_FAIL_POINT, POINT)
        .launch()
        .expect("launch");
    let world = match role {
        RankRole::Parent(outcome) => {
            let report = testing::failure_report(&outcome);
            let status = |r: usize| outcome.ranks.get(r).map(|x| x.status);
            assert!(
                status(0).is_some_and(|s| s.success()),
                "the surviving rank 0 must pass:\n{report}"
            );
            assert!(
                status(1).is_some_and(|s| !s.success()),
                "rank 1 was meant to die:\n{report}"
            );
            return;
        }
        RankRole::Rank(world) => world,
    };

    let (store, comm) = setup(&world, "nccl_gpu/peer_death");
    let stream = comm.stream().clone();
    let peer = 1 - world.rank();
    let warm = stream.alloc_zeros::<u32>(1024).expect("alloc");
    let mut warm_in = stream.alloc_zeros::<u32>(1024).expect("alloc");
    comm.grouped(
        &[P2pOp::send(peer, &warm), P2pOp::recv(peer, &mut warm_in)],
        op_deadline(),
    )
    .expect("warm-up exchange");
    store
        .barrier("nccl_gpu/peer_death/armed", op_deadline())
        .expect("barrier");

    let len = 16 << 20;
    if world.rank() == 1 {
        // Let rank 0 get well into its receive, then die before sending.
        std::thread::sleep(Duration::from_millis(500));
        testing::fail_point(&world, POINT);
        // Reached only when the fail point is not armed: then the data does arrive, and rank
        // 0's assertion that its receive failed catches the broken setup.
        let data = stream.alloc_zeros::<u32>(len).expect("alloc");
        comm.send(0, &data, op_deadline()).expect("send");
        return;
    }

    let wait = Duration::from_secs(5);
    let mut buf = stream.alloc_zeros::<u32>(len).expect("alloc");
    let start = Instant::now();
    let err = comm
        .recv(1, &mut buf, Deadline::after(wait))
        .expect_err("the sender died");
    let took = start.elapsed();
    eprintln!("rank 0: receive from the dead rank 1 failed after {took:?}: {err}");
    let names_rank_1 = match &err {
        NcclError::Timeout { peers, .. } | NcclError::Call { peers, .. } => peers.contains(&1),
        _ => false,
    };
    assert!(names_rank_1, "the error must name rank 1: {err}");
    assert!(
        took < wait + Duration::from_secs(10),
        "gave up late: {took:?}"
    );
    assert!(comm.is_aborted());
    let err = comm
        .recv(1, &mut buf, op_deadline())
        .expect_err("an aborted communicator refuses work");
    assert!(matches!(err, NcclError::Aborted { rank: 0, .. }), "{err}");
}

/// Runs everywhere: without NCCL or GPUs the probe is a typed error and nothing panics.
#[test]
fn probe_is_typed_on_any_machine() {
    match nccl_available() {
        Ok(version) => assert!(version >= moeshift_device_comm::nccl::MIN_NCCL_VERSION),
        Err(err) => {
            assert!(err.is_unavailable(), "{err}");
            eprintln!("no NCCL here: {err}");
        }
    }
}
