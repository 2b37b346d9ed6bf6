//! The CUDA MoE all-to-all managers across 2 processes with one GPU each (feature `cuda`);
//! on a machine with one GPU, one process.
//!
//! `rank_*` tests follow the crate's `testing` convention (run by `cargo test` they launch
//! their own ranks). Each test first checks for NCCL and a GPU and, without them, prints
//! why and passes without doing anything, so CI machines without GPUs run it too.
//!
//! Every round runs a host manager and its CUDA counterpart on the same tokens and checks
//! that the CUDA one returns the same work items, the same received rows, the same load
//! counts and the same combined rows. In f32 the inputs are random and the results must be
//! bit-for-bit equal (both sum `weight * output` in the same order with the same
//! roundings). In bf16 and f16 the inputs are small integers, weights 1/2 or 1 and experts
//! that scale by 1 or 2, so that every intermediate sum is exact in 8 significant bits and
//! the device results must equal the host's exactly too.
//!
//! Run on a GPU machine: `cargo test -p moeshift-device-comm --features cuda --test all2all_gpu`.
//! `MOESHIFT_GPU_RANKS=2` runs 2 ranks even on one GPU ([`testing::share_gpus`]): every
//! multi-rank path of the managers, with NCCL over loopback sockets between the ranks.
#![cfg(feature = "cuda")]

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use moeshift_device_comm::all2all::{
    AgRsManager, All2AllError, AllToAllVManager, CudaAgRsManager, CudaAll2AllError,
    CudaAllToAllVManager, CudaDispatched, CudaOneSidedManager, CudaTokens, EpGroupShape,
    ExpertPlacement, HostDispatched, HostTokens, MoeAll2All, Workspace, WorkspaceCapacity,
    WorkspaceConfig,
};
use moeshift_device_comm::nccl::{nccl_available, NcclComm};
use moeshift_device_comm::testing;
use moeshift_device_comm::{HostGroup, StoreClient};
use moeshift_sync::Deadline;
use moeshift_tensor::DType;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Most ranks: one per GPU, 2 at most, unless `MOESHIFT_GPU_RANKS` asks for more. With one
/// GPU the tests run one rank, which still runs every kernel and table of the managers
/// (every row then stays on its rank).
const MAX_WORLD: usize = 2;
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(240);
/// Slots per rank and top-k are fixed: the one-sided workspace fixes them at creation.
const SLOTS_PER_RANK: usize = 4;
const TOP_K: usize = 4;

fn deadline() -> Deadline {
    Deadline::after(Duration::from_secs(60))
}

/// Why this machine cannot run the GPU tests, if it cannot (asked by the parent only).
fn skip_reason() -> Option<String> {
    if testing::is_rank_process() {
        return None;
    }
    if let Err(err) = nccl_available() {
        return Some(format!("NCCL is not usable here: {err}"));
    }
    match CudaContext::device_count() {
        Ok(n) if n >= 1 => None,
        Ok(n) => Some(format!("{n} GPU(s) visible, the test needs one")),
        Err(err) => Some(format!("cannot count GPUs: {err}")),
    }
}

fn gpus() -> usize {
    CudaContext::device_count().map_or(1, |n| n.max(1) as usize)
}

/// The number of ranks (called once the GPUs are known to be usable).
fn ranks() -> usize {
    testing::gpu_ranks(gpus(), MAX_WORLD).expect("rank count")
}

fn skipped(test: &str) -> bool {
    match skip_reason() {
        Some(reason) => {
            eprintln!("skipping {test}: {reason}");
            true
        }
        None => false,
    }
}

// ----- element conversions (exact for the values the tests use) -----

fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    assert_eq!(bits & 0xffff, 0, "{x} is not exact in bf16");
    (bits >> 16) as u16
}

fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

fn to_f16(x: f32) -> u16 {
    if x == 0.0 {
        return ((x.to_bits() >> 16) & 0x8000) as u16;
    }
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    assert!((1..31).contains(&exp), "{x} is outside f16's normal range");
    assert_eq!(bits & 0x1fff, 0, "{x} is not exact in f16");
    sign | ((exp as u16) << 10) | ((bits >> 13) & 0x3ff) as u16
}

fn from_f16(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    if exp == 0 {
        assert_eq!(mant, 0, "subnormal f16 in a test");
        return f32::from_bits(sign);
    }
    f32::from_bits(sign | ((exp + 127 - 15) << 23) | (mant << 13))
}

fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::Bf16 => values
            .iter()
            .flat_map(|&v| to_bf16(v).to_le_bytes())
            .collect(),
        DType::F16 => values
            .iter()
            .flat_map(|&v| to_f16(v).to_le_bytes())
            .collect(),
        other => panic!("no test encoding for {other:?}"),
    }
}

fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| from_bf16(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| from_f16(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        other => panic!("no test decoding for {other:?}"),
    }
}

#[test]
fn element_conversions_round_trip() {
    for x in [0.0f32, -0.0, 1.0, -2.5, 3.0, 32.0, -0.25, 120.0] {
        assert_eq!(from_bf16(to_bf16(x)).to_bits(), x.to_bits());
        assert_eq!(from_f16(to_f16(x)).to_bits(), x.to_bits());
    }
    // Known encodings: 1.0 = 0x3f80 (bf16) = 0x3c00 (f16); -2.0 = 0xc000 in both.
    assert_eq!(to_bf16(1.0), 0x3f80);
    assert_eq!(to_f16(1.0), 0x3c00);
    assert_eq!(to_bf16(-2.0), 0xc000);
    assert_eq!(to_f16(-2.0), 0xc000);
}

// ----- rounds -----

/// One round's parameters and placement, the same on every rank.
struct Setup {
    placement: ExpertPlacement,
    hidden: usize,
    dtype: DType,
    identity: bool,
    max_tokens: usize,
}

fn setup(seed: u64, layer: usize) -> Setup {
    let mut rng = StdRng::seed_from_u64(seed);
    let num_physical = ranks() * SLOTS_PER_RANK;
    let num_logical = rng.gen_range(TOP_K..=num_physical);
    let mut phy2log: Vec<i64> = (0..num_logical as i64).collect();
    while phy2log.len() < num_physical {
        phy2log.push(rng.gen_range(0..num_logical as i64));
    }
    phy2log.shuffle(&mut rng);
    let placement =
        ExpertPlacement::from_phy2log(layer, &phy2log, num_logical, ranks()).expect("placement");
    Setup {
        placement,
        hidden: [1, 3, 8, 33, 64, 130][rng.gen_range(0..6)],
        dtype: [DType::F32, DType::Bf16, DType::F16][layer % 3],
        identity: rng.gen_bool(0.5),
        max_tokens: rng.gen_range(1..48),
    }
}

/// One rank's tokens (none on rank `zero_rank`): distinct experts per token; values that
/// are exact in 16-bit types unless the round is f32.
struct Batch {
    hidden: Vec<f32>,
    ids: Vec<u32>,
    weights: Vec<f32>,
}

fn batch(seed: u64, s: &Setup, rank: usize, zero_rank: Option<usize>) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed ^ (0x5eed_0000 + rank as u64));
    let n = if Some(rank) == zero_rank {
        0
    } else {
        rng.gen_range(0..=s.max_tokens)
    };
    let experts: Vec<u32> = (0..s.placement.num_logical() as u32).collect();
    let mut ids = Vec::with_capacity(n * TOP_K);
    for _ in 0..n {
        ids.extend(experts.choose_multiple(&mut rng, TOP_K).copied());
    }
    let exact = s.dtype != DType::F32;
    let hidden = (0..n * s.hidden)
        .map(|_| {
            if exact {
                rng.gen_range(-4i32..=4) as f32
            } else {
                rng.gen_range(-2.0f32..2.0)
            }
        })
        .collect();
    let weights = (0..n * TOP_K)
        .map(|_| {
            if exact {
                [0.5f32, 1.0][rng.gen_range(0..2)]
            } else {
                1.0 - rng.gen::<f32>()
            }
        })
        .collect();
    Batch {
        hidden,
        ids,
        weights,
    }
}

/// The factor expert `logical` scales its input by.
fn factor(s: &Setup, logical: usize) -> f32 {
    match (s.identity, s.dtype) {
        (true, _) => 1.0,
        (false, DType::F32) => logical as f32 + 1.0,
        (false, _) => (logical % 2) as f32 + 1.0,
    }
}

/// What the host manager returned for one round.
struct HostResult {
    dispatched: HostDispatched,
    outputs: Vec<f32>,
    combined: Vec<f32>,
    load: Vec<i64>,
}

fn run_host<M>(manager: &M, s: &Setup, b: &Batch) -> HostResult
where
    M: for<'a> MoeAll2All<
        Tokens<'a> = HostTokens<'a>,
        LoadCounts<'a> = &'a mut [i64],
        ExpertOutputs<'a> = &'a [f32],
        Dispatched = HostDispatched,
        Combined = Vec<f32>,
        Error = All2AllError,
    >,
{
    let tokens = HostTokens::new(&b.hidden, s.hidden, &b.ids, &b.weights, TOP_K);
    let mut load = vec![0i64; s.placement.num_physical()];
    let dispatched = manager
        .dispatch(tokens, &s.placement, Some(&mut load), deadline())
        .unwrap_or_else(|e| panic!("host {} dispatch: {e}", manager.name()));
    let outputs = dispatched.expert_outputs_with(|w, row, out| {
        let f = factor(s, w.logical);
        for (o, &x) in out.iter_mut().zip(row) {
            *o = f * x;
        }
    });
    let combined = manager
        .combine(&dispatched, &outputs, deadline())
        .unwrap_or_else(|e| panic!("host {} combine: {e}", manager.name()));
    HostResult {
        dispatched,
        outputs,
        combined,
        load,
    }
}

/// `data` on the GPU, with one padding element: the driver refuses 0-byte allocations, so
/// an empty batch is an empty view of a 1-element buffer.
struct Padded<T> {
    buf: CudaSlice<T>,
    len: usize,
}

impl<T: cudarc::driver::DeviceRepr + Default + Clone> Padded<T> {
    fn new(stream: &Arc<CudaStream>, data: &[T]) -> Self {
        let mut host = data.to_vec();
        host.push(T::default());
        Self {
            buf: stream.clone_htod(&host).expect("upload"),
            len: data.len(),
        }
    }

    fn view(&self) -> cudarc::driver::CudaView<'_, T> {
        self.buf.slice(..self.len)
    }
}

/// The batch on the GPU.
struct DeviceBatch {
    hidden: Padded<u8>,
    ids: Padded<u32>,
    weights: Padded<f32>,
}

fn upload(stream: &Arc<CudaStream>, s: &Setup, b: &Batch) -> DeviceBatch {
    DeviceBatch {
        hidden: Padded::new(stream, &encode(s.dtype, &b.hidden)),
        ids: Padded::new(stream, &b.ids),
        weights: Padded::new(stream, &b.weights),
    }
}

fn tokens<'a>(d: &'a DeviceBatch, s: &Setup) -> CudaTokens<'a> {
    CudaTokens::new(
        d.hidden.view(),
        s.dtype,
        s.hidden,
        d.ids.view(),
        d.weights.view(),
        TOP_K,
    )
}

/// Runs `manager` on the same batch and checks it against the host result.
fn check_cuda<M>(
    what: &str,
    manager: &M,
    stream: &Arc<CudaStream>,
    s: &Setup,
    b: &Batch,
    host: &HostResult,
) where
    M: for<'a> MoeAll2All<
        Tokens<'a> = CudaTokens<'a>,
        LoadCounts<'a> = &'a mut CudaSlice<i64>,
        ExpertOutputs<'a> = cudarc::driver::CudaView<'a, u8>,
        Dispatched = CudaDispatched,
        Combined = CudaSlice<u8>,
        Error = CudaAll2AllError,
    >,
{
    let dev = upload(stream, s, b);
    let mut load = stream
        .alloc_zeros::<i64>(s.placement.num_physical())
        .expect("load counter");
    let d = manager
        .dispatch(tokens(&dev, s), &s.placement, Some(&mut load), deadline())
        .unwrap_or_else(|e| panic!("{what} dispatch: {e}"));
    assert_eq!(d.items(), host.dispatched.items(), "{what}: work items");
    assert_eq!(d.num_rows(), host.dispatched.num_rows(), "{what}: rows");
    assert_eq!(d.num_local_tokens(), b.ids.len() / TOP_K, "{what}");
    let rows = decode(s.dtype, &stream.clone_dtoh(d.rows()).expect("rows"));
    assert_eq!(rows, host.dispatched.rows(), "{what}: received rows");
    for slot in 0..SLOTS_PER_RANK {
        assert_eq!(
            d.items_for_local_slot(slot),
            host.dispatched.items_for_local_slot(slot),
            "{what}: slot {slot}"
        );
    }
    let load = stream.clone_dtoh(&load).expect("load");
    assert_eq!(load, host.load, "{what}: load counts");

    // Identity experts: the gathered inputs are the outputs; else the host's outputs.
    let outputs = if s.identity {
        let inputs = d.expert_inputs().expect("expert inputs");
        let got = decode(s.dtype, &stream.clone_dtoh(&inputs).expect("inputs"));
        assert_eq!(got, host.outputs, "{what}: gathered expert inputs");
        let len = inputs.len();
        Padded { buf: inputs, len }
    } else {
        Padded::new(stream, &encode(s.dtype, &host.outputs))
    };
    let combined = manager
        .combine(&d, outputs.view(), deadline())
        .unwrap_or_else(|e| panic!("{what} combine: {e}"));
    let got = decode(s.dtype, &stream.clone_dtoh(&combined).expect("combined"));
    assert_eq!(got.len(), host.combined.len(), "{what}: combined length");
    for (i, (g, h)) in got.iter().zip(&host.combined).enumerate() {
        assert!(
            g == h,
            "{what}: combined value {i} (token {}, column {}) is {g}, the host manager's {h}",
            i / s.hidden,
            i % s.hidden
        );
    }
}

/// Dispatches `first` then `then` with `manager`; rank 0 combines the first dispatch, the
/// other ranks the second. Every rank must fail with a peer mismatch (never wait for its
/// deadline).
fn mismatched_combine<M>(
    what: &str,
    manager: &M,
    stream: &Arc<CudaStream>,
    s: &Setup,
    first: &DeviceBatch,
    then: &DeviceBatch,
    rank: usize,
) where
    M: for<'a> MoeAll2All<
        Tokens<'a> = CudaTokens<'a>,
        LoadCounts<'a> = &'a mut CudaSlice<i64>,
        ExpertOutputs<'a> = cudarc::driver::CudaView<'a, u8>,
        Dispatched = CudaDispatched,
        Combined = CudaSlice<u8>,
        Error = CudaAll2AllError,
    >,
{
    let dispatch = |b: &DeviceBatch| {
        manager
            .dispatch(tokens(b, s), &s.placement, None, deadline())
            .unwrap_or_else(|e| panic!("{what} dispatch: {e}"))
    };
    let (first, second) = (dispatch(first), dispatch(then));
    let mine = if rank == 0 { &first } else { &second };
    let outputs = Padded::new(stream, &vec![0u8; mine.items().len() * s.hidden * 4]);
    // A rank left waiting would fail at its deadline with an NCCL error instead.
    let err = manager
        .combine(mine, outputs.view(), deadline())
        .expect_err("a combine of mismatched dispatches");
    match &err {
        CudaAll2AllError::Exchange(All2AllError::PeerMismatch { .. }) => {}
        _ => panic!("{what}: rank {rank} got {err}"),
    }
}

fn one_sided_workspace(elem_bytes: usize) -> Workspace {
    Workspace::new(
        ranks(),
        EpGroupShape {
            dp: ranks(),
            pcp: 1,
            tp: 1,
        },
        WorkspaceConfig {
            top_k: TOP_K,
            num_experts: ranks() * SLOTS_PER_RANK,
            elem_bytes,
        },
        // Small on purpose: the first rounds make every rank grow it together.
        WorkspaceCapacity {
            max_tokens_per_rank: 4,
            hidden_size: 8,
            extra_bytes_per_token: 0,
        },
    )
    .expect("workspace")
}

#[test]
fn rank_cuda_managers_match_host_managers() {
    const NAME: &str = "rank_cuda_managers_match_host_managers";
    if skipped(NAME) {
        return;
    }
    let Some(world) = testing::run_as_ranks(NAME, ranks(), LAUNCH_TIMEOUT).expect("ranks") else {
        return;
    };
    let rank = world.rank();
    let gpu = testing::share_gpus(&world, gpus());
    let setup_deadline = Deadline::after(Duration::from_secs(90));
    let store = StoreClient::connect(&world, setup_deadline).expect("store");
    let group = HostGroup::world(&store, setup_deadline).expect("host group");
    let comm = NcclComm::from_store(
        &store,
        rank,
        ranks(),
        "all2all_gpu/match",
        gpu,
        setup_deadline,
    )
    .expect("NCCL communicator");
    let stream = comm.stream().clone();

    let host_agrs = AgRsManager::new(&group);
    let host_a2av = AllToAllVManager::new(&group);
    let agrs = CudaAgRsManager::new(&comm).expect("CUDA agrs");
    let a2av = CudaAllToAllVManager::new(&comm)
        .expect("CUDA all-to-all-v")
        .with_global_ranks((0..ranks()).collect())
        .expect("global ranks");
    let one_sided_16 =
        CudaOneSidedManager::new(&comm, &group, one_sided_workspace(2), setup_deadline)
            .expect("one-sided (16-bit)");
    let one_sided_32 =
        CudaOneSidedManager::new(&comm, &group, one_sided_workspace(4), setup_deadline)
            .expect("one-sided (f32)");
    assert_eq!(
        (a2av.ep_rank(), a2av.ep_size()),
        (rank, ranks()),
        "manager rank"
    );

    let rounds = 12u64;
    for round in 0..rounds {
        let seed = 0xa2a0_0000 + round;
        let s = setup(seed, round as usize);
        let zero = (round % 4 == 3).then_some(round as usize / 4 % ranks());
        let b = batch(seed, &s, rank, zero);
        let tag = |m: &str| {
            format!(
                "round {round} ({m}, {:?}, hidden {}, {} tokens, {})",
                s.dtype,
                s.hidden,
                b.ids.len() / TOP_K,
                if s.identity { "identity" } else { "scaled" }
            )
        };
        let host = run_host(&host_agrs, &s, &b);
        check_cuda(
            &tag("allgather_reducescatter"),
            &agrs,
            &stream,
            &s,
            &b,
            &host,
        );
        let host = run_host(&host_a2av, &s, &b);
        check_cuda(&tag("all_to_all_v"), &a2av, &stream, &s, &b, &host);
        let one_sided = if s.dtype == DType::F32 {
            &one_sided_32
        } else {
            &one_sided_16
        };
        check_cuda(&tag("one_sided_ipc"), one_sided, &stream, &s, &b, &host);
    }
    // Both workspaces grew (the same way on every rank: the generation is agreed).
    for (m, elem) in [(&one_sided_16, 2), (&one_sided_32, 4)] {
        let ws = m.workspace();
        assert!(m.generation() >= 1, "the {elem}-byte workspace never grew");
        assert!(ws.capacity().max_tokens_per_rank > 4);
        assert!(m.region_bytes() >= ws.bytes_per_slot());
        let mine = [
            m.generation() as i64,
            ws.capacity().max_tokens_per_rank as i64,
        ];
        let all = group.all_gather(
            &mine
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
            deadline(),
        );
        let all = all.expect("all_gather");
        assert!(
            all.windows(2).all(|w| w[0] == w[1]),
            "ranks disagree: {all:?}"
        );
    }
    one_sided_16
        .close(deadline())
        .expect("close the 16-bit workspace");
    one_sided_32
        .close(deadline())
        .expect("close the f32 workspace");
    println!("rank {rank}: {rounds} rounds of 3 CUDA managers matched the host managers");
}

#[test]
fn rank_cuda_managers_fail_together_on_bad_input() {
    const NAME: &str = "rank_cuda_managers_fail_together_on_bad_input";
    if skipped(NAME) {
        return;
    }
    let Some(world) = testing::run_as_ranks(NAME, ranks(), LAUNCH_TIMEOUT).expect("ranks") else {
        return;
    };
    let rank = world.rank();
    let gpu = testing::share_gpus(&world, gpus());
    let setup_deadline = Deadline::after(Duration::from_secs(90));
    let store = StoreClient::connect(&world, setup_deadline).expect("store");
    let group = HostGroup::world(&store, setup_deadline).expect("host group");
    let comm = NcclComm::from_store(
        &store,
        rank,
        ranks(),
        "all2all_gpu/fail",
        gpu,
        setup_deadline,
    )
    .expect("NCCL communicator");
    let host_a2av = AllToAllVManager::new(&group);
    let agrs = CudaAgRsManager::new(&comm).expect("agrs");
    let a2av = CudaAllToAllVManager::new(&comm).expect("a2av");
    let one_sided = CudaOneSidedManager::new(&comm, &group, one_sided_workspace(4), setup_deadline)
        .expect("one-sided");
    let stream = comm.stream().clone();

    let s = setup(7, 0); // f32 round
    assert_eq!(s.dtype, DType::F32);
    let mut b = batch(7, &s, rank, None);
    if b.ids.is_empty() {
        b = Batch {
            hidden: vec![1.0; s.hidden],
            ids: (0..TOP_K as u32).collect(),
            weights: vec![0.5; TOP_K],
        };
    }
    let mut bad = Batch {
        hidden: b.hidden.clone(),
        ids: b.ids.clone(),
        weights: b.weights.clone(),
    };
    // The last rank has an unknown expert (with one rank, the only one).
    let culprit = ranks() - 1;
    if rank == culprit {
        bad.ids[0] = s.placement.num_logical() as u32; // no such expert
    }
    let dev = upload(&stream, &s, &bad);

    type Dispatch<'m> = &'m dyn Fn(&DeviceBatch) -> Result<CudaDispatched, CudaAll2AllError>;
    let managers: [(&str, Dispatch<'_>); 3] = [
        ("agrs", &|d| {
            agrs.dispatch(tokens(d, &s), &s.placement, None, deadline())
        }),
        ("a2av", &|d| {
            a2av.dispatch(tokens(d, &s), &s.placement, None, deadline())
        }),
        ("one_sided", &|d| {
            one_sided.dispatch(tokens(d, &s), &s.placement, None, deadline())
        }),
    ];
    for (what, dispatch) in managers {
        let err = dispatch(&dev).expect_err("a rank has an unknown expert");
        match (rank == culprit, &err) {
            (true, CudaAll2AllError::Exchange(All2AllError::UnknownExpert { expert, .. })) => {
                assert_eq!(*expert as usize, s.placement.num_logical(), "{what}")
            }
            (false, CudaAll2AllError::Exchange(All2AllError::PeerRejected { peer, .. })) => {
                assert_eq!(peer.local, culprit, "{what}")
            }
            _ => panic!("{what}: rank {rank} got {err}"),
        }
    }
    // Two ranks combining different dispatches of one layer (say, micro-batches handed
    // over out of order): every rank dispatches a full batch, then rank 0 the same batch
    // again and the others an empty one; rank 0 combines the first dispatch, the others
    // the second. Only the rows the others sent rank 0 disagree, in one direction: rank 0
    // sees its own counts match and must still fail with them, not wait in the exchange.
    if ranks() > 1 {
        // 64 tokens picking every expert many times: rows go both ways between every pair.
        let n = 64;
        let logical = s.placement.num_logical() as u32;
        let many = Batch {
            hidden: vec![1.0; n * s.hidden],
            ids: (0..(n * TOP_K) as u32)
                .map(|i| (i / TOP_K as u32 + i % TOP_K as u32) % logical)
                .collect(),
            weights: vec![0.5; n * TOP_K],
        };
        let dev = upload(&stream, &s, &many);
        let empty = Batch {
            hidden: Vec::new(),
            ids: Vec::new(),
            weights: Vec::new(),
        };
        let none = upload(&stream, &s, &empty);
        let then = if rank == 0 { &dev } else { &none };
        mismatched_combine("agrs", &agrs, &stream, &s, &dev, then, rank);
        mismatched_combine("a2av", &a2av, &stream, &s, &dev, then, rank);
        mismatched_combine("one_sided", &one_sided, &stream, &s, &dev, then, rank);
    }
    // The managers are still usable: a good round matches the host manager.
    let host = run_host(&host_a2av, &s, &b);
    check_cuda("a2av after a failed call", &a2av, &stream, &s, &b, &host);
    check_cuda(
        "one_sided after a failed call",
        &one_sided,
        &stream,
        &s,
        &b,
        &host,
    );
    one_sided.close(deadline()).expect("close the workspace");
    println!("rank {rank}: failures were shared and the managers recovered");
}
