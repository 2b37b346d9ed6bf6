//! The `nixl` EPLB backend between CUDA weights: two processes with one GPU each, rows READ
//! GPU to GPU through NIXL (UCX `cuda_ipc` on one node), staged in a device landing slot
//! and committed by device-to-device copies (feature `cuda`).
//!
//! Multi-rank scenarios follow `moeshift_device_comm::testing` (`rank_*` tests start copies
//! of this binary as the ranks; each rank uses GPU `LOCAL_RANK`). Every test first checks
//! that CUDA with two GPUs and the NIXL runtime (`MOESHIFT_NIXL_LIB_DIR`) are there and, if
//! not, prints why and passes without doing anything, so machines without GPUs run it too.
//!
//! Expected contents come from the placements alone: every row of expert `e` in tensor `t`
//! of layer `l` holds a pattern derived from `(l, e, t)`, and the bytes around the rows
//! (gaps of strided tensors, a tail after the last row) hold a canary. Before a commit every
//! byte must still be as the old placement says; after it, as the new one says.
//!
//! Run on a GPU machine: `cargo test -p moeshift-eplb-comm --features cuda --test nixl_gpu`.
#![cfg(feature = "cuda")]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use moeshift_device_comm::testing;
use moeshift_device_comm::StoreClient;
use moeshift_eplb_comm::nixl::{probe, IpcCudaBuffer, NixlCommunicator};
use moeshift_eplb_comm::{Backend, EplbCommError, EplbCommunicator, LayerWeights, RowSource};
use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;
use moeshift_tensor::{cuda_available, CudaBuffer, DType, Device};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const RANKS: usize = 2;
const MEMBERS: [usize; RANKS] = [0, 1];
const CANARY: u8 = 0x5C;
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(120);

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
    probe()
        .err()
        .map(|e| format!("NIXL is not usable here: {e}"))
}

/// True (after printing why) when the test must be skipped.
fn skipped(test: &str) -> bool {
    match skip_reason() {
        Some(reason) => {
            println!("skipping {test}: {reason}");
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
    let seed = splitmix(splitmix(splitmix(layer as u64 + 77) ^ expert as u64) ^ tensor as u64);
    let mut out = Vec::with_capacity(len + 8);
    let mut word = 0u64;
    while out.len() < len {
        out.extend_from_slice(&splitmix(seed ^ word).to_le_bytes());
        word += 1;
    }
    out.truncate(len);
    out
}

#[test]
fn patterns_differ_between_experts_tensors_and_layers() {
    let p = pattern(1, 2, 0, 40);
    assert_eq!(p.len(), 40);
    assert_eq!(pattern(1, 2, 0, 40), p);
    assert_ne!(pattern(1, 3, 0, 40), p);
    assert_ne!(pattern(1, 2, 1, 40), p);
    assert_ne!(pattern(2, 2, 0, 40), p);
    assert_eq!(pattern(1, 2, 0, 13), p[..13]);
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
    fn plain(dtype: DType, inner: &[usize]) -> Self {
        Self {
            dtype,
            inner: inner.to_vec(),
            gap: None,
        }
    }
    fn strided(dtype: DType, lead: usize, inner: usize, trail: usize) -> Self {
        Self {
            dtype,
            inner: vec![inner],
            gap: Some((lead, trail)),
        }
    }
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

/// A layer: rows per rank and its tensors.
#[derive(Debug, Clone)]
struct LayerDesc {
    rows: usize,
    tensors: Vec<TensorDesc>,
}

impl LayerDesc {
    fn expert_bytes(&self) -> usize {
        self.tensors.iter().map(TensorDesc::row_bytes).sum()
    }
    fn seg<'a>(&self, map: &'a [usize], rank: usize) -> &'a [usize] {
        &map[rank * self.rows..(rank + 1) * self.rows]
    }
}

/// Four layers of different shapes: several dtypes, strided rows with gaps, rows of 128 KiB,
/// rows of odd sizes and a tensor with empty rows.
fn layers() -> Vec<LayerDesc> {
    vec![
        LayerDesc {
            rows: 4,
            tensors: vec![
                TensorDesc::plain(DType::Bf16, &[16, 24]),
                TensorDesc::strided(DType::F32, 2, 10, 1),
                TensorDesc::plain(DType::F8E4M3Fn, &[5]),
            ],
        },
        LayerDesc {
            rows: 6,
            tensors: vec![
                TensorDesc::plain(DType::Bf16, &[256, 256]),
                TensorDesc::plain(DType::I32, &[7]),
            ],
        },
        LayerDesc {
            rows: 3,
            tensors: vec![
                TensorDesc::plain(DType::F16, &[3, 5]),
                TensorDesc::plain(DType::F64, &[0]),
                TensorDesc::plain(DType::F32, &[1024]),
            ],
        },
        LayerDesc {
            rows: 5,
            tensors: vec![
                TensorDesc::plain(DType::U8, &[33]),
                TensorDesc::strided(DType::Bf16, 1, 64, 3),
            ],
        },
    ]
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

/// One layer's tensors in CUDA-IPC-shareable device memory on `gpu`, rows holding
/// `experts`.
fn upload(layer: usize, gpu: usize, l: &LayerDesc, experts: &[usize]) -> Vec<IpcCudaBuffer> {
    l.tensors
        .iter()
        .enumerate()
        .map(|(t, d)| {
            IpcCudaBuffer::from_host(gpu, &expected_buffer(layer, t, d, experts)).expect("upload")
        })
        .collect()
}

/// Describes device buffers on `gpu` (`place` gives each one's address and length) as a
/// layer's weights, borrowing them.
fn device_weights<'a, B>(
    l: &LayerDesc,
    gpu: usize,
    bufs: &'a [B],
    place: impl Fn(&B) -> (u64, usize),
) -> LayerWeights<'a> {
    let mut b = LayerWeights::builder();
    for (t, (d, buf)) in l.tensors.iter().zip(bufs).enumerate() {
        let (addr, len) = place(buf);
        let storage =
            moeshift_tensor::Storage::new(addr, len / d.elem(), d.dtype, Device::Cuda(gpu));
        let view = match d.gap {
            Some((lead, trail)) => moeshift_tensor::TensorView::contiguous(
                storage,
                &[l.rows, lead + d.inner[0] + trail],
            )
            .and_then(|v| v.narrow(1, lead, d.inner[0])),
            None => {
                let mut shape = vec![l.rows];
                shape.extend(&d.inner);
                moeshift_tensor::TensorView::contiguous(storage, &shape)
            }
        }
        .expect("view");
        // SAFETY: `bufs` are live device buffers borrowed for 'a, so they outlive the
        // weights; the test touches them meanwhile only to read them back after transfers
        // and commits returned (their copies finished).
        b = unsafe { b.raw(&format!("t{t}"), view) }.expect("raw tensor");
    }
    b.build().expect("layer weights")
}

fn ipc_place(b: &IpcCudaBuffer) -> (u64, usize) {
    (b.addr(), b.len())
}

/// Every byte of every tensor of a layer equals the buffer the rows `experts` give.
fn check_device(
    bufs: &[IpcCudaBuffer],
    layer: usize,
    l: &LayerDesc,
    experts: &[usize],
    when: &str,
) {
    for (t, (d, buf)) in l.tensors.iter().zip(bufs).enumerate() {
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
// Random placements.

/// A placement of `slots` slots over experts `0..n`: every expert at least once.
fn random_map(rng: &mut StdRng, n: usize, slots: usize) -> Vec<usize> {
    let mut m: Vec<usize> = (0..n).collect();
    while m.len() < slots {
        m.push(rng.gen_range(0..n));
    }
    m.shuffle(rng);
    m
}

/// The next placement: the same, a fresh random one, or a few swaps and replica changes
/// (every expert keeps at least one slot).
fn next_map(rng: &mut StdRng, old: &[usize], n: usize) -> Vec<usize> {
    let slots = old.len();
    match rng.gen_range(0..20) {
        0 => old.to_vec(),
        1..=11 => random_map(rng, n, slots),
        _ => {
            let mut m = old.to_vec();
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

// ---------------------------------------------------------------------------------------
// Scenarios.

/// 240 random layer plans over four registered layers of CUDA weights (bf16, f32 with gaps
/// between strided rows, fp8, i32, f16, f64 with empty rows, u8 of odd sizes; rows up to
/// 128 KiB), with replicas: after each transfer every byte of the layer still holds the old
/// placement and the staging holds exactly the changed rows (on the GPU); after each commit
/// every byte holds the new placement.
#[test]
fn rank_nixl_random_plans_gpu() {
    const NAME: &str = "rank_nixl_random_plans_gpu";
    const PLANS: usize = 240;
    if skipped(NAME) {
        return;
    }
    let Some(world) = testing::run_as_ranks(NAME, RANKS, LAUNCH_TIMEOUT).expect("ranks") else {
        return;
    };
    let (me, gpu) = (world.rank(), world.local_rank());
    let deadline = Deadline::after(Duration::from_secs(60));
    let store = StoreClient::connect(&world, deadline).expect("store");
    let descs = layers();
    let mut rng = StdRng::seed_from_u64(0x4E1C_6A7E);
    // Every layer has between `rows` and `2 · rows` experts (so some have replicas).
    let experts: Vec<usize> = descs
        .iter()
        .map(|l| rng.gen_range(l.rows..=l.rows * RANKS))
        .collect();
    let mut maps: Vec<Vec<usize>> = descs
        .iter()
        .zip(&experts)
        .map(|(l, &n)| random_map(&mut rng, n, l.rows * RANKS))
        .collect();
    let bufs: Vec<Vec<IpcCudaBuffer>> = descs
        .iter()
        .enumerate()
        .map(|(i, l)| upload(i, gpu, l, l.seg(&maps[i], me)))
        .collect();
    let mut weights: Vec<LayerWeights<'_>> = descs
        .iter()
        .zip(&bufs)
        .map(|(l, b)| device_weights(l, gpu, b, ipc_place))
        .collect();

    let started = Instant::now();
    let mut comm =
        NixlCommunicator::new(&store, &MEMBERS, &weights, deadline).expect("communicator");
    println!(
        "rank {me}: nixl communicator on cuda:{gpu} ready in {:.2?}",
        started.elapsed()
    );
    assert_eq!(comm.device(), Device::Cuda(gpu));
    assert_eq!(comm.landing_slots(), 1);
    let largest = descs
        .iter()
        .map(|l| l.rows * l.expert_bytes())
        .max()
        .unwrap_or(0);
    assert_eq!(comm.landing_bytes(), largest);

    let (mut received, mut fills, mut local_total, mut crossing) = (0usize, 0usize, 0usize, 0usize);
    let mut bytes_read = 0u64;
    let started = Instant::now();
    for step in 0..PLANS {
        let l = rng.gen_range(0..descs.len());
        let d = &descs[l];
        let new = next_map(&mut rng, &maps[l], experts[l]);
        let plan = LayerPlan::new(&maps[l], &new, RANKS).expect("plan");
        let staged = comm
            .transfer(
                l,
                &plan,
                &weights[l],
                Deadline::after(Duration::from_secs(30)),
            )
            .unwrap_or_else(|e| panic!("rank {me}, step {step}, layer {l}: {e}"));
        check_device(
            &bufs[l],
            l,
            d,
            d.seg(&maps[l], me),
            &format!("step {step}: after the transfer, before the commit"),
        );
        assert_eq!(staged.backend(), Backend::Nixl);
        assert_eq!(staged.staging_device(), Device::Cuda(gpu), "step {step}");

        let (local, recv, dup) = expected_rows(d.seg(&maps[l], me), d.seg(&new, me));
        let staged_dst: BTreeSet<usize> = staged.staged_rows().iter().map(|r| r.dst_row).collect();
        let want: BTreeSet<usize> = local.union(&recv).copied().collect();
        assert_eq!(staged_dst, want, "step {step}, layer {l}: staged rows");
        assert_eq!(
            staged.staged_rows().len(),
            want.len(),
            "step {step}: a row staged twice"
        );
        for (i, r) in staged.staged_rows().iter().enumerate() {
            assert_eq!(r.expert, d.seg(&new, me)[r.dst_row], "step {step}");
            match r.source {
                RowSource::Local { src_row } => {
                    assert!(local.contains(&r.dst_row), "step {step}");
                    assert_eq!(d.seg(&maps[l], me)[src_row], r.expert, "step {step}");
                }
                RowSource::Peer { peer, .. } => {
                    assert!(recv.contains(&r.dst_row), "step {step}");
                    assert_ne!(peer, me, "step {step}");
                    assert!(d.seg(&maps[l], peer).contains(&r.expert), "step {step}");
                }
            }
            assert_eq!(
                staged.staged_bytes(i, 0),
                None,
                "device staging is not host memory"
            );
        }
        let eb = d.expert_bytes() as u64;
        let stats = *staged.stats();
        assert_eq!(stats.bytes_received, recv.len() as u64 * eb, "step {step}");
        assert_eq!(
            stats.bytes_copied_locally,
            local.len() as u64 * eb,
            "step {step}"
        );
        // Exactly the rows received and copied, nothing more: they are READ into the landing
        // slot, which is the staging.
        assert_eq!(
            stats.staging_bytes,
            (recv.len() + local.len()) as u64 * eb,
            "step {step}"
        );

        let done = staged
            .commit(&mut weights[l])
            .unwrap_or_else(|e| panic!("rank {me}, step {step}, layer {l}: commit: {e}"));
        assert_eq!(
            done.bytes_copied_locally,
            (local.len() + dup.len()) as u64 * eb,
            "step {step}"
        );
        maps[l] = new;
        check_device(
            &bufs[l],
            l,
            d,
            d.seg(&maps[l], me),
            &format!("step {step}: after the commit"),
        );
        received += recv.len();
        fills += dup.len();
        local_total += local.len();
        crossing += usize::from(plan.num_transfers() > 0);
        bytes_read += stats.bytes_received;
    }
    let elapsed = started.elapsed();
    for (l, d) in descs.iter().enumerate() {
        check_device(&bufs[l], l, d, d.seg(&maps[l], me), "at the end");
    }
    println!(
        "rank {me}: {PLANS} plans ({crossing} crossing ranks) in {elapsed:.2?}: {received} rows \
         ({bytes_read} bytes) READ GPU to GPU, {local_total} local copies, {fills} duplicate fills"
    );
    // The random plans exercised every kind of row.
    assert!(crossing > PLANS / 2, "only {crossing} plans crossed ranks");
    assert!(
        received >= PLANS / 4 && fills >= 1 && local_total >= PLANS / 8,
        "{received} {fills} {local_total}"
    );
    drop(comm);
    drop(weights);
}

/// The device landing slot is lent to one staged layer: a second transfer while it is held
/// is refused on both ranks (weights untouched, communicator usable), and the layer moves
/// once the first is committed. Weights from a stream-ordered pool (cudarc's default
/// allocations), which CUDA IPC cannot share, are refused when the communicator is built,
/// naming the tensor, on machines without RDMA.
#[test]
fn rank_nixl_gpu_slots_and_refusals() {
    const NAME: &str = "rank_nixl_gpu_slots_and_refusals";
    if skipped(NAME) {
        return;
    }
    let Some(world) = testing::run_as_ranks(NAME, RANKS, LAUNCH_TIMEOUT).expect("ranks") else {
        return;
    };
    let (me, gpu) = (world.rank(), world.local_rank());
    let deadline = Deadline::after(Duration::from_secs(60));
    let store = StoreClient::connect(&world, deadline).expect("store");
    let descs: Vec<LayerDesc> = layers().into_iter().take(2).collect();
    // Experts 0..2·rows, no replicas; in the new placement every slot takes the expert of
    // the slot before it: row 0 of each rank is received, the other rows are local copies.
    let mut maps: Vec<Vec<usize>> = descs
        .iter()
        .map(|l| (0..l.rows * RANKS).collect())
        .collect();
    let bufs: Vec<Vec<IpcCudaBuffer>> = descs
        .iter()
        .enumerate()
        .map(|(i, l)| upload(i, gpu, l, l.seg(&maps[i], me)))
        .collect();
    let mut weights: Vec<LayerWeights<'_>> = descs
        .iter()
        .zip(&bufs)
        .map(|(l, b)| device_weights(l, gpu, b, ipc_place))
        .collect();
    let mut comm =
        NixlCommunicator::new(&store, &MEMBERS, &weights, deadline).expect("communicator");
    let shifted = |m: &[usize]| -> Vec<usize> {
        let slots = m.len();
        (0..slots).map(|s| m[(s + slots - 1) % slots]).collect()
    };
    let new: Vec<Vec<usize>> = maps.iter().map(|m| shifted(m)).collect();
    let plans: Vec<LayerPlan> = (0..descs.len())
        .map(|l| LayerPlan::new(&maps[l], &new[l], RANKS).expect("plan"))
        .collect();
    let short = || Deadline::after(Duration::from_secs(20));

    let held = comm
        .transfer(0, &plans[0], &weights[0], short())
        .expect("layer 0");
    assert_eq!(comm.staged_layers_held(), vec![0]);
    let err = comm
        .transfer(1, &plans[1], &weights[1], short())
        .expect_err("the landing slot is held by layer 0");
    assert!(
        matches!(&err, EplbCommError::StagingInUse { rank, layer: 1, held_by, slots: 1 }
            if *rank == me && held_by == &vec![0]),
        "rank {me}: {err}"
    );
    assert!(!err.poisons_communicator());
    for (l, d) in descs.iter().enumerate() {
        check_device(
            &bufs[l],
            l,
            d,
            d.seg(&maps[l], me),
            "after the refused transfer",
        );
    }
    held.commit(&mut weights[0]).expect("commit layer 0");
    maps[0] = new[0].clone();
    comm.transfer_and_commit(1, &plans[1], &mut weights[1], short())
        .expect("layer 1 once the slot is free");
    maps[1] = new[1].clone();
    for (l, d) in descs.iter().enumerate() {
        check_device(&bufs[l], l, d, d.seg(&maps[l], me), "after both layers");
    }
    drop(comm);
    drop(weights);

    // Pool memory: refused at construction on a machine without RDMA.
    let runtime = probe().expect("NIXL loads");
    let pooled = cudarc::driver::CudaContext::new(gpu)
        .expect("context")
        .has_async_alloc();
    if !pooled || runtime.rdma_possible() {
        println!(
            "rank {me}: pool memory check skipped (pool allocations: {pooled}, RDMA possible: {})",
            runtime.rdma_possible()
        );
        return;
    }
    let l = &descs[0];
    let pool_bufs: Vec<CudaBuffer> = l
        .tensors
        .iter()
        .enumerate()
        .map(|(t, d)| {
            CudaBuffer::from_host(gpu, &expected_buffer(0, t, d, l.seg(&maps[0], me)))
                .expect("upload")
        })
        .collect();
    let pool_weights = device_weights(l, gpu, &pool_bufs, |b: &CudaBuffer| (b.addr(), b.len()));
    let started = Instant::now();
    let err = NixlCommunicator::new(
        &store,
        &MEMBERS,
        std::slice::from_ref(&pool_weights),
        short(),
    )
    .expect_err("pool memory cannot be shared through CUDA IPC");
    let text = err.to_string();
    println!(
        "rank {me}: pool memory refused after {:.2?}: {text}",
        started.elapsed()
    );
    assert!(matches!(err, EplbCommError::Nixl { .. }), "{text}");
    for part in [
        format!("rank {me}"),
        "\"t0\"".into(),
        "stream-ordered".into(),
        "cuMemAlloc".into(),
    ] {
        assert!(text.contains(&part), "{part:?} missing in {text}");
    }
    drop(pool_weights);
}
