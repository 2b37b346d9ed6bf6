//! EPLB transfers between CUDA weights, two processes with one GPU each (feature `cuda`):
//! the `nccl` backend, and the `host` backend staging CUDA weights through page-locked
//! memory.
//!
//! Multi-rank scenarios follow `moeshift_device_comm::testing` (`rank_*` tests start copies
//! of this binary as the ranks; each rank uses GPU `LOCAL_RANK`). Every test first checks
//! that CUDA, NCCL and two GPUs are there and, if not, prints why and passes without doing
//! anything, so machines without GPUs run it too.
//!
//! Expected contents come from the placements alone, as in `host_comm.rs`: every row of
//! expert `e` in tensor `t` of layer `l` holds a pattern derived from `(l, e, t)`, and bytes
//! around the rows hold a canary. Before a commit every row must still hold its old expert;
//! after it, its new expert, and every other byte must be unchanged.
//!
//! Run on a GPU machine: `cargo test -p moeshift-eplb-comm --features cuda --test nccl_gpu`.
#![cfg(feature = "cuda")]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use moeshift_device_comm::nccl::nccl_available;
use moeshift_device_comm::testing::{self, RankRole, RankTest, ENV_FAIL_POINT, ENV_FAIL_RANK};
use moeshift_device_comm::{HostGroup, RankStatus, StoreClient};
use moeshift_eplb_comm::nccl::NcclCommunicator;
use moeshift_eplb_comm::{
    Backend, EplbCommError, EplbCommunicator, HostCommunicator, LayerWeights, RowSource,
};
use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;
use moeshift_tensor::{cuda_available, CudaBuffer, DType, Device, HostBuffer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const RANKS: usize = 2;
const MEMBERS: [usize; RANKS] = [0, 1];
const CANARY: u8 = 0xA5;
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------------------
// Skipping.

/// Why this machine cannot run the GPU tests, if it cannot. Only the parent asks.
fn skip_reason() -> Option<String> {
    if testing::is_rank_process() {
        return None;
    }
    match cuda_available() {
        Ok(n) if n >= RANKS => {}
        Ok(n) => return Some(format!("{n} GPU(s) visible, the test needs {RANKS}")),
        Err(e) => return Some(format!("CUDA is not usable here: {e}")),
    }
    nccl_available()
        .err()
        .map(|e| format!("NCCL is not usable here: {e}"))
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

/// One tensor of a test layer: rows of `inner` elements, contiguous, or (1-D rows) the
/// middle of wider rows with `(lead, trail)` elements around them.
#[derive(Debug, Clone)]
struct TensorDesc {
    dtype: DType,
    inner: Vec<usize>,
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

/// One layer's tensors in device memory on `gpu`, rows holding `experts`.
fn upload(layer: usize, gpu: usize, tensors: &[TensorDesc], experts: &[usize]) -> Vec<CudaBuffer> {
    tensors
        .iter()
        .enumerate()
        .map(|(t, d)| {
            CudaBuffer::from_host(gpu, &expected_buffer(layer, t, d, experts)).expect("upload")
        })
        .collect()
}

/// Describes device buffers as a layer's weights.
fn device_weights<'a>(
    tensors: &[TensorDesc],
    rows: usize,
    bufs: &'a [CudaBuffer],
) -> LayerWeights<'a> {
    let mut b = LayerWeights::builder();
    for (t, (d, buf)) in tensors.iter().zip(bufs).enumerate() {
        let view = match d.gap {
            Some((lead, trail)) => buf
                .view(&[rows, lead + d.inner[0] + trail], d.dtype)
                .and_then(|v| v.narrow(1, lead, d.inner[0])),
            None => {
                let mut shape = vec![rows];
                shape.extend(&d.inner);
                buf.view(&shape, d.dtype)
            }
        }
        .expect("view");
        // SAFETY: `bufs` are live device buffers that outlive the weights (borrowed for
        // 'a); the test touches them only through the weights until it reads them back
        // after the commit has returned (copies finished).
        b = unsafe { b.raw(&format!("t{t}"), view) }.expect("raw tensor");
    }
    b.build().expect("layer weights")
}

/// Every byte of every tensor of a layer equals the buffer the rows `experts` give.
fn check_device(
    bufs: &[CudaBuffer],
    layer: usize,
    tensors: &[TensorDesc],
    experts: &[usize],
    when: &str,
) {
    for (t, (d, buf)) in tensors.iter().zip(bufs).enumerate() {
        let got = buf.to_vec().expect("download");
        let want = expected_buffer(layer, t, d, experts);
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            let row = at / d.row_stride().max(1);
            panic!(
                "layer {layer}, tensor {t}: {when}, byte {at} (row {row}) differs: rows should hold {experts:?}"
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

fn random_map(rng: &mut StdRng, n: usize, slots: usize) -> Vec<usize> {
    let mut m: Vec<usize> = (0..n).collect();
    while m.len() < slots {
        m.push(rng.gen_range(0..n));
    }
    m.shuffle(rng);
    m
}

fn random_case(rng: &mut StdRng) -> LayerCase {
    let rows = rng.gen_range(1..=6);
    let slots = rows * RANKS;
    let n = rng.gen_range(1..=slots);
    let old = random_map(rng, n, slots);
    let new = match rng.gen_range(0..20) {
        0 => old.clone(),
        1..=11 => random_map(rng, n, slots),
        _ => {
            let mut m = old.clone();
            for _ in 0..rng.gen_range(1..=3) {
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
        DType::F16,
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
                1..=2 => TensorDesc {
                    dtype,
                    inner: vec![rng.gen_range(1..=40)],
                    gap: Some((rng.gen_range(0..=3), rng.gen_range(1..=3))),
                },
                3..=5 => TensorDesc {
                    dtype,
                    inner: vec![rng.gen_range(1..=16), rng.gen_range(1..=16)],
                    gap: None,
                },
                6 => TensorDesc {
                    dtype,
                    inner: vec![rng.gen_range(4096..=65536)],
                    gap: None,
                },
                _ => TensorDesc {
                    dtype,
                    inner: vec![rng.gen_range(1..=200)],
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

/// What a rank must stage, from the maps alone: `(local rows, received rows, duplicate
/// rows)`. A changed row whose expert the rank already held is a local copy; the first row
/// of an expert new to the rank is received; later rows of it are duplicates.
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

/// Moves `layers` random layers through `comm` on this rank's GPU, checking every row before
/// and after every commit and the staging's contents against the maps.
fn run_random_layers(
    comm: &mut dyn EplbCommunicator,
    cases: &[LayerCase],
    bufs: &[Vec<CudaBuffer>],
    me: usize,
    gpu: usize,
) {
    let (mut moved, mut fills, mut local_total, mut packed_rounds) = (0, 0, 0, 0);
    for (l, c) in cases.iter().enumerate() {
        let plan = LayerPlan::new(&c.old, &c.new, RANKS).unwrap();
        let mut w = device_weights(&c.tensors, c.rows, &bufs[l]);
        let staged = comm
            .transfer(l, &plan, &w, Deadline::after(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("layer {l} ({c:?}): {e}"));
        check_device(
            &bufs[l],
            l,
            &c.tensors,
            c.seg(&c.old, me),
            "after the transfer, before the commit",
        );
        assert_eq!(staged.staging_device(), Device::Cuda(gpu), "layer {l}");
        assert_eq!(staged.backend(), comm.backend());

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
            assert_eq!(r.expert, c.seg(&c.new, me)[r.dst_row], "layer {l}");
            match r.source {
                RowSource::Local { src_row } => {
                    assert!(local.contains(&r.dst_row), "layer {l}");
                    assert_eq!(c.seg(&c.old, me)[src_row], r.expert, "layer {l}");
                }
                RowSource::Peer { peer, .. } => {
                    assert!(recv.contains(&r.dst_row), "layer {l}");
                    assert!(c.seg(&c.old, peer).contains(&r.expert), "layer {l}");
                }
            }
            assert_eq!(
                staged.staged_bytes(0, 0),
                None,
                "device staging is not readable on the host"
            );
        }
        let eb: u64 = c.tensors.iter().map(|d| d.row_bytes() as u64).sum();
        let stats = *staged.stats();
        assert_eq!(stats.bytes_received, recv.len() as u64 * eb, "layer {l}");
        assert_eq!(
            stats.bytes_copied_locally,
            local.len() as u64 * eb,
            "layer {l}"
        );
        // Staged rows, plus (nccl) the rows packed for sending, or (host) the wire staging
        // with its headers; never a whole layer more.
        let rows_bytes = want.len() as u64 * eb;
        let sent = plan.rank(me).unwrap().sends.len() as u64;
        let extra = match comm.backend() {
            Backend::Nccl => {
                if sent > 1 {
                    packed_rounds += 1;
                }
                if sent > 1 {
                    sent * eb
                } else {
                    0
                }
            }
            _ => {
                recv.len() as u64 * eb
                    + 56 * stats.rounds as u64
                    + 24 * c.tensors.len() as u64 * recv.len() as u64
            }
        };
        assert!(
            stats.staging_bytes >= rows_bytes && stats.staging_bytes <= rows_bytes + extra,
            "layer {l}: staging {} bytes for {rows_bytes} bytes of rows (+{extra})",
            stats.staging_bytes
        );

        let done = staged
            .commit(&mut w)
            .unwrap_or_else(|e| panic!("layer {l}: commit: {e}"));
        assert_eq!(
            done.bytes_copied_locally,
            (local.len() + dup.len()) as u64 * eb,
            "layer {l}"
        );
        drop(w);
        check_device(
            &bufs[l],
            l,
            &c.tensors,
            c.seg(&c.new, me),
            "after the commit",
        );
        moved += recv.len();
        fills += dup.len();
        local_total += local.len();
    }
    eprintln!(
        "rank {me}: {} layers, {moved} rows received, {local_total} local copies, {fills} duplicate fills, {packed_rounds} packed sends",
        cases.len()
    );
    // The random layers exercised every kind of row (and both cases of NCCL's packing).
    assert!(
        moved >= cases.len() / 8 && fills >= 1 && local_total >= cases.len() / 8,
        "{moved} {fills} {local_total}"
    );
    if comm.backend() == Backend::Nccl {
        assert!(packed_rounds >= 3, "{packed_rounds}");
    }
}

fn cases(seed: u64, n: usize) -> Vec<LayerCase> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| random_case(&mut rng)).collect()
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// 240 random layers through the `nccl` backend: random placements with replicas, 1–3
/// tensors of different dtypes and row shapes (some strided, some empty, some of 100+
/// KiB), every row checked before and after each commit, every other byte after it.
#[test]
fn rank_nccl_random_plans_gpu() {
    const NAME: &str = "rank_nccl_random_plans_gpu";
    if skipped(NAME) {
        return;
    }
    let Some(world) = testing::run_as_ranks(NAME, RANKS, LAUNCH_TIMEOUT).expect("ranks") else {
        return;
    };
    let (me, gpu) = (world.rank(), world.local_rank());
    let deadline = Deadline::after(Duration::from_secs(60));
    let store = StoreClient::connect(&world, deadline).expect("store");
    let cases = cases(0x00E9_1B5E_ED01, 240);
    let bufs: Vec<Vec<CudaBuffer>> = cases
        .iter()
        .enumerate()
        .map(|(l, c)| upload(l, gpu, &c.tensors, c.seg(&c.old, me)))
        .collect();
    let weights: Vec<LayerWeights<'_>> = cases
        .iter()
        .zip(&bufs)
        .map(|(c, b)| device_weights(&c.tensors, c.rows, b))
        .collect();
    let started = Instant::now();
    let mut comm =
        NcclCommunicator::new(&store, &MEMBERS, &weights, deadline).expect("communicator");
    eprintln!(
        "rank {me}: nccl communicator ready in {:?}",
        started.elapsed()
    );
    drop(weights);
    assert_eq!(
        (comm.rank(), comm.num_ranks(), comm.device_ordinal()),
        (me, RANKS, gpu)
    );
    let started = Instant::now();
    run_random_layers(&mut comm, &cases, &bufs, me, gpu);
    eprintln!("rank {me}: 240 layers in {:?}", started.elapsed());
    assert!(comm.pack_buffer_bytes() > 0);
}

/// 80 random layers through the `host` backend with CUDA weights (page-locked staging,
/// device commit).
#[test]
fn rank_host_cuda_random_plans_gpu() {
    const NAME: &str = "rank_host_cuda_random_plans_gpu";
    if skipped(NAME) {
        return;
    }
    let Some(world) = testing::run_as_ranks(NAME, RANKS, LAUNCH_TIMEOUT).expect("ranks") else {
        return;
    };
    let (me, gpu) = (world.rank(), world.local_rank());
    let deadline = Deadline::after(Duration::from_secs(60));
    let store = StoreClient::connect(&world, deadline).expect("store");
    let cases = cases(0x00E9_1B5E_ED02, 80);
    let bufs: Vec<Vec<CudaBuffer>> = cases
        .iter()
        .enumerate()
        .map(|(l, c)| upload(l, gpu, &c.tensors, c.seg(&c.old, me)))
        .collect();
    let weights: Vec<LayerWeights<'_>> = cases
        .iter()
        .zip(&bufs)
        .map(|(c, b)| device_weights(&c.tensors, c.rows, b))
        .collect();
    let mut comm =
        HostCommunicator::new(&store, &MEMBERS, &weights, deadline).expect("communicator");
    drop(weights);
    run_random_layers(&mut comm, &cases, &bufs, me, gpu);
}

/// Set-up and plan mismatches: a rank with host weights makes both ranks fail set-up (it
/// names itself, its peer names it); a plan that differs between ranks and a rank that
/// refuses its layer are typed errors on both ranks with the weights untouched; the same
/// communicator then moves the agreed layer.
#[test]
fn rank_nccl_plan_mismatch_gpu() {
    const NAME: &str = "rank_nccl_plan_mismatch_gpu";
    if skipped(NAME) {
        return;
    }
    let Some(world) = testing::run_as_ranks(NAME, RANKS, LAUNCH_TIMEOUT).expect("ranks") else {
        return;
    };
    let (me, gpu) = (world.rank(), world.local_rank());
    let deadline = Deadline::after(Duration::from_secs(60));
    let store = StoreClient::connect(&world, deadline).expect("store");
    let tensors = vec![
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
    // Two rows per rank; the experts swap ranks, or (rank 1's view) swap rows too.
    let old: Vec<usize> = vec![0, 1, 2, 3];
    let new = vec![2, 3, 0, 1];
    let other = vec![3, 2, 1, 0];
    let seg = |m: &[usize]| m[me * 2..me * 2 + 2].to_vec();

    // 1. Rank 1 describes host weights: nothing is built, both ranks say who failed.
    let mut host_buf = HostBuffer::zeroed(2 * 64).unwrap();
    let host_w = LayerWeights::builder()
        .host("t0", &mut host_buf, &[2, 64], DType::U8)
        .unwrap()
        .build()
        .unwrap();
    let bufs = upload(0, gpu, &tensors, &seg(&old));
    let dev_w = device_weights(&tensors, 2, &bufs);
    let group =
        HostGroup::from_store(&store, "nccl-setup-check", &MEMBERS, deadline).expect("group");
    let started = Instant::now();
    let err = if me == 1 {
        NcclCommunicator::with_group(group, std::slice::from_ref(&host_w), deadline).unwrap_err()
    } else {
        NcclCommunicator::with_group(group, std::slice::from_ref(&dev_w), deadline).unwrap_err()
    };
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    // The layouts differ too (one tensor here, two there): the layout check comes first.
    assert!(
        matches!(err, EplbCommError::LayoutMismatch { .. }),
        "expected a layout mismatch, got {err}"
    );
    drop(host_w);

    // Same layouts, but rank 1's weights are on the host.
    let mut host_bufs: Vec<HostBuffer> = tensors
        .iter()
        .enumerate()
        .map(|(t, d)| HostBuffer::from_bytes(&expected_buffer(0, t, d, &seg(&old))).unwrap())
        .collect();
    let mut hb = LayerWeights::builder();
    for (t, (d, buf)) in tensors.iter().zip(host_bufs.iter_mut()).enumerate() {
        let view = match d.gap {
            Some((lead, trail)) => buf
                .view(&[2, lead + d.inner[0] + trail], d.dtype)
                .unwrap()
                .narrow(1, lead, d.inner[0])
                .unwrap(),
            None => {
                let mut shape = vec![2];
                shape.extend(&d.inner);
                buf.view(&shape, d.dtype).unwrap()
            }
        };
        hb = hb.host_view(&format!("t{t}"), buf, view).unwrap();
    }
    let host_w = hb.build().unwrap();
    let group =
        HostGroup::from_store(&store, "nccl-setup-check-2", &MEMBERS, deadline).expect("group");
    let err = if me == 1 {
        NcclCommunicator::with_group(group, std::slice::from_ref(&host_w), deadline).unwrap_err()
    } else {
        NcclCommunicator::with_group(group, std::slice::from_ref(&dev_w), deadline).unwrap_err()
    };
    if me == 1 {
        assert!(
            matches!(err, EplbCommError::NotDeviceMemory { .. }),
            "{err}"
        );
    } else {
        match &err {
            EplbCommError::PeerSetupFailed {
                peer: 1,
                backend: Backend::Nccl,
                reason,
                ..
            } => {
                // Rank 1's own error travels as the reason.
                assert!(
                    reason.contains("\"t0\"") && reason.contains("needs CUDA device memory"),
                    "{err}"
                )
            }
            other => panic!("expected rank 1's set-up failure, got {other}"),
        }
    }
    drop(host_w);

    // 2. A working communicator; rank 1 computed its plan from another map.
    let mut w = dev_w;
    let mut comm = NcclCommunicator::new(&store, &MEMBERS, std::slice::from_ref(&w), deadline)
        .expect("communicator");
    let plan = LayerPlan::new(&old, if me == 1 { &other } else { &new }, RANKS).unwrap();
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
            assert_eq!(peers, &vec![1 - me], "{err}");
        }
        other => panic!("expected a plan digest mismatch, got {other}"),
    }
    assert!(!err.poisons_communicator());
    check_device(&bufs, 0, &tensors, &seg(&old), "after a refused plan");

    // 3. Rank 0 asks for a layer the communicator does not know.
    let plan = LayerPlan::new(&old, &new, RANKS).unwrap();
    let layer = if me == 0 { 3 } else { 0 };
    let err = comm
        .transfer(layer, &plan, &w, Deadline::after(Duration::from_secs(10)))
        .unwrap_err();
    if me == 0 {
        assert!(
            matches!(err, EplbCommError::LayerOutOfRange { layer: 3, .. }),
            "{err}"
        );
    } else {
        assert!(
            matches!(err, EplbCommError::PeerRefused { peer: 0, ref reason, .. } if reason.contains("layer 3")),
            "{err}"
        );
    }
    check_device(&bufs, 0, &tensors, &seg(&old), "after a refused layer");

    // 4. The same communicator moves the agreed layer.
    let stats = comm
        .transfer_and_commit(0, &plan, &mut w, Deadline::after(Duration::from_secs(20)))
        .expect("agreed transfer");
    let eb = (4 * 3 * 2 + 5 * 4) as u64;
    assert_eq!(
        (stats.bytes_received, stats.bytes_sent, stats.peers),
        (2 * eb, 2 * eb, 1)
    );
    drop(w);
    check_device(&bufs, 0, &tensors, &seg(&new), "after the agreed transfer");
}

/// Rank 1 is killed (SIGKILL) while the ranks move large layers back and forth over NCCL:
/// rank 0 gets an error naming rank 1 within its deadline (plus NCCL's abort), and the
/// layer whose transfer failed still holds its old rows.
#[test]
fn nccl_peer_killed_gpu() {
    const NAME: &str = "nccl_peer_killed_gpu";
    if skipped(NAME) {
        return;
    }
    let role = RankTest::new(NAME, RANKS)
        .timeout(LAUNCH_TIMEOUT)
        .keep_going()
        .env(ENV_FAIL_RANK, "1")
        .env(ENV_FAIL_POINT, "mid-transfer")
        .launch()
        .expect("launch");
    let world = match role {
        RankRole::Parent(outcome) => {
            let report = testing::failure_report(&outcome);
            for r in &outcome.ranks {
                if r.rank == 1 {
                    assert!(
                        matches!(r.status, RankStatus::Signaled(9)),
                        "rank 1 should have been killed: {report}"
                    );
                } else {
                    assert!(r.status.success(), "rank {} failed: {report}", r.rank);
                }
            }
            return;
        }
        RankRole::Rank(world) => world,
    };
    let (me, gpu) = (world.rank(), world.local_rank());
    let deadline = Deadline::after(Duration::from_secs(60));
    let store = StoreClient::connect(&world, deadline).expect("store");
    // 8 rows per rank of 2 tensors, 5 MiB per expert: 40 MiB move each way per layer.
    const ROWS: usize = 8;
    let tensors = vec![
        TensorDesc {
            dtype: DType::Bf16,
            inner: vec![1024, 2048],
            gap: None,
        },
        TensorDesc {
            dtype: DType::F32,
            inner: vec![256, 1024],
            gap: None,
        },
    ];
    let old: Vec<usize> = (0..ROWS * RANKS).collect();
    let mut new = old.clone();
    new.rotate_right(ROWS);
    let there = LayerPlan::new(&old, &new, RANKS).unwrap();
    let back = LayerPlan::new(&new, &old, RANKS).unwrap();
    let seg = |m: &[usize]| m[me * ROWS..(me + 1) * ROWS].to_vec();
    let bufs = upload(0, gpu, &tensors, &seg(&old));
    let mut w = device_weights(&tensors, ROWS, &bufs);
    let mut comm = NcclCommunicator::new(&store, &MEMBERS, std::slice::from_ref(&w), deadline)
        .expect("communicator");

    if testing::fail_point_hit(&world, "mid-transfer") {
        let killer = world.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            testing::fail_point(&killer, "mid-transfer");
        });
    }
    const LAYER_DEADLINE: Duration = Duration::from_secs(5);
    let started = Instant::now();
    let mut current = old.clone();
    for i in 0.. {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no failure seen after {i} layers"
        );
        let (plan, next) = if i % 2 == 0 {
            (&there, &new)
        } else {
            (&back, &old)
        };
        let attempt = Instant::now();
        match comm.transfer_and_commit(0, plan, &mut w, Deadline::after(LAYER_DEADLINE)) {
            Ok(_) => current = next.clone(),
            Err(err) => {
                let took = attempt.elapsed();
                // The deadline, plus NCCL's abort and the drain of its stream.
                assert!(
                    took < LAYER_DEADLINE + Duration::from_secs(17),
                    "after {took:?}: {err}"
                );
                assert!(err.poisons_communicator(), "{err}");
                assert_eq!(err.peer(), Some(1), "the error should name rank 1: {err}");
                eprintln!("rank {me}: layer transfer {i} failed as expected after {took:?}: {err}");
                break;
            }
        }
    }
    assert!(me != 1, "rank 1 should have been killed");
    drop(w);
    check_device(
        &bufs,
        0,
        &tensors,
        &seg(&current),
        "after the failed transfer",
    );
    // A failed communicator refuses further work at once.
    let w = device_weights(&tensors, ROWS, &bufs);
    let again = comm
        .transfer(0, &there, &w, Deadline::after(Duration::from_secs(5)))
        .unwrap_err();
    assert!(again.poisons_communicator(), "{again}");
}
