//! Scaffolding shared by the EPLB communicator tests: row patterns, test tensors and
//! layers, random placements, weight construction and the checks every backend must pass.
//!
//! Expected contents come from the placements alone: every row of expert `e` in tensor `t`
//! of layer `l` holds a pattern derived from `(l, e, t)` (replicas are identical, as real
//! weights are), and bytes around the rows hold a canary. Nothing here knows how a backend
//! moves rows, so the checks hold every backend to the same expectations.
//!
//! Each test binary uses a part of this module; the rest is dead code there.
#![allow(dead_code)]

use std::collections::BTreeSet;

use moeshift_device_comm::{LaunchOutcome, RankStatus};
use moeshift_eplb_comm::{LayerMove, LayerWeights, RowSource, StagedLayer, TransferStats};
use moeshift_placement::LayerPlan;
use moeshift_tensor::{DType, HostBuffer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

// ---------------------------------------------------------------------------------------
// Row contents.

/// SplitMix64's output function applied to `x` (one step of the generator seeded with `x`).
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// How a test fills its buffers: `salt` offsets the layer in the row patterns (so two test
/// binaries can use different contents) and `canary` is the byte around the rows.
#[derive(Debug, Clone, Copy)]
pub struct Fill {
    /// Added to the layer index before it seeds a row pattern.
    pub salt: u64,
    /// The byte outside the expert rows (gaps of strided tensors, the tail).
    pub canary: u8,
}

impl Fill {
    /// The bytes of a row of expert `expert`, tensor `tensor`, layer `layer`.
    pub fn pattern(&self, layer: usize, expert: usize, tensor: usize, len: usize) -> Vec<u8> {
        let seed =
            splitmix(splitmix(splitmix(layer as u64 + self.salt) ^ expert as u64) ^ tensor as u64);
        let mut out = Vec::with_capacity(len + 8);
        let mut word = 0u64;
        while out.len() < len {
            out.extend_from_slice(&splitmix(seed ^ word).to_le_bytes());
            word += 1;
        }
        out.truncate(len);
        out
    }

    /// The whole buffer of tensor `t` on a rank whose rows hold `experts`.
    pub fn buffer(&self, layer: usize, t: usize, d: &TensorDesc, experts: &[usize]) -> Vec<u8> {
        let mut buf = vec![self.canary; d.buffer_len(experts.len())];
        for (row, &e) in experts.iter().enumerate() {
            let start = d.row_start(row);
            buf[start..start + d.row_bytes()].copy_from_slice(&self.pattern(
                layer,
                e,
                t,
                d.row_bytes(),
            ));
        }
        buf
    }

    /// Host buffers of one layer's tensors, rows holding `experts`.
    pub fn host_buffers(
        &self,
        layer: usize,
        tensors: &[TensorDesc],
        experts: &[usize],
    ) -> Vec<HostBuffer> {
        tensors
            .iter()
            .enumerate()
            .map(|(t, d)| HostBuffer::from_bytes(&self.buffer(layer, t, d, experts)).unwrap())
            .collect()
    }

    /// Every row of `w` holds the pattern of its expert in `experts`.
    pub fn check_rows(&self, w: &LayerWeights<'_>, layer: usize, experts: &[usize], when: &str) {
        for (row, &e) in experts.iter().enumerate() {
            for t in 0..w.num_tensors() {
                let got = w.row(t, row).unwrap();
                assert!(
                    got == self.pattern(layer, e, t, got.len()).as_slice(),
                    "layer {layer}, row {row}, tensor {t}: {when}, the row does not hold expert {e}"
                );
            }
        }
    }

    /// Every byte of every tensor of a layer (`got`, one vector a tensor) equals the buffer
    /// the rows `experts` give.
    pub fn check_bytes(
        &self,
        got: impl IntoIterator<Item = Vec<u8>>,
        layer: usize,
        tensors: &[TensorDesc],
        experts: &[usize],
        when: &str,
    ) {
        for (t, (d, got)) in tensors.iter().zip(got).enumerate() {
            let want = self.buffer(layer, t, d, experts);
            if got != want {
                let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                let row = at / d.row_stride().max(1);
                panic!(
                    "layer {layer}, tensor {t}: {when}, byte {at} (row {row}) differs: rows should hold {experts:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Test tensors and layers.

/// One tensor of a test layer: rows of `inner` elements, contiguous, or (1-D rows) the
/// middle of wider rows with `(lead, trail)` elements around them.
#[derive(Debug, Clone)]
pub struct TensorDesc {
    /// Element type.
    pub dtype: DType,
    /// Shape of one row.
    pub inner: Vec<usize>,
    /// `(lead, trail)` elements around each row (1-D rows only).
    pub gap: Option<(usize, usize)>,
}

impl TensorDesc {
    /// Contiguous rows of shape `inner`.
    pub fn plain(dtype: DType, inner: &[usize]) -> Self {
        Self {
            dtype,
            inner: inner.to_vec(),
            gap: None,
        }
    }

    /// Rows of `inner` elements with `lead` elements before and `trail` after each.
    pub fn strided(dtype: DType, lead: usize, inner: usize, trail: usize) -> Self {
        Self {
            dtype,
            inner: vec![inner],
            gap: Some((lead, trail)),
        }
    }

    /// Bytes of one element.
    pub fn elem(&self) -> usize {
        self.dtype.size_bytes()
    }

    /// Bytes of one row (the expert's part only).
    pub fn row_bytes(&self) -> usize {
        self.inner.iter().product::<usize>() * self.elem()
    }

    /// Bytes from one row's start to the next.
    pub fn row_stride(&self) -> usize {
        match self.gap {
            Some((lead, trail)) => self.row_bytes() + (lead + trail) * self.elem(),
            None => self.row_bytes(),
        }
    }

    /// Where row `row` starts in the buffer.
    pub fn row_start(&self, row: usize) -> usize {
        row * self.row_stride() + self.gap.map_or(0, |(lead, _)| lead * self.elem())
    }

    /// Bytes of the buffer: the rows, plus 24 canary bytes after them.
    pub fn buffer_len(&self, rows: usize) -> usize {
        rows * self.row_stride() + 24
    }

    /// The full shape of the buffer as a view (`[rows, lead + cols + trail]` when strided),
    /// and the column range of dim 1 that is the tensor, if only a part is.
    fn view_shape(&self, rows: usize) -> (Vec<usize>, Option<(usize, usize)>) {
        match self.gap {
            Some((lead, trail)) => {
                let cols = self.inner.first().copied().unwrap_or(0);
                (vec![rows, lead + cols + trail], Some((lead, cols)))
            }
            None => {
                let mut shape = vec![rows];
                shape.extend(&self.inner);
                (shape, None)
            }
        }
    }
}

/// A layer: rows per rank and its tensors.
#[derive(Debug, Clone)]
pub struct LayerDesc {
    /// Expert rows on each rank.
    pub rows: usize,
    /// The layer's tensors.
    pub tensors: Vec<TensorDesc>,
}

impl LayerDesc {
    /// Bytes of one expert over all tensors.
    pub fn expert_bytes(&self) -> usize {
        self.tensors.iter().map(TensorDesc::row_bytes).sum()
    }

    /// The slots of `map` that live on `rank`.
    pub fn seg<'a>(&self, map: &'a [usize], rank: usize) -> &'a [usize] {
        &map[rank * self.rows..(rank + 1) * self.rows]
    }
}

/// Describes host buffers as a layer's weights, borrowing them.
pub fn host_weights<'a>(
    tensors: &[TensorDesc],
    rows: usize,
    bufs: &'a mut [HostBuffer],
) -> LayerWeights<'a> {
    let mut b = LayerWeights::builder();
    for (t, (d, buf)) in tensors.iter().zip(bufs.iter_mut()).enumerate() {
        let name = format!("t{t}");
        let (shape, narrow) = d.view_shape(rows);
        b = match narrow {
            Some((lead, cols)) => {
                let view = buf
                    .view(&shape, d.dtype)
                    .unwrap()
                    .narrow(1, lead, cols)
                    .unwrap();
                b.host_view(&name, buf, view).unwrap()
            }
            None => b.host(&name, buf, &shape, d.dtype).unwrap(),
        };
    }
    b.build().unwrap()
}

// ---------------------------------------------------------------------------------------
// Random layers.

/// A layer moving from the placement `old` to `new` (both over every rank's slots).
#[derive(Debug, Clone)]
pub struct LayerCase {
    /// Rows per rank and tensors.
    pub desc: LayerDesc,
    /// The placement before the transfer.
    pub old: Vec<usize>,
    /// The placement after it.
    pub new: Vec<usize>,
}

/// How a next placement differs from the last, out of 20 draws: one keeps it, `fresh` draw
/// a new random placement, the rest make `1..=max_moves` swaps or replica changes.
///
/// The draws are `i32`s: the type decides how many random bits a draw takes, and with it
/// every placement the tests' fixed seeds give.
#[derive(Debug, Clone, Copy)]
pub struct Churn {
    /// Draws (of 20) that give a fresh random placement.
    pub fresh: i32,
    /// Most swaps or replica changes of a small move.
    pub max_moves: i32,
}

/// A placement of `slots` slots over experts `0..n`: every expert at least once, the rest
/// random replicas, shuffled.
pub fn random_map(rng: &mut StdRng, n: usize, slots: usize) -> Vec<usize> {
    let mut m: Vec<usize> = (0..n).collect();
    while m.len() < slots {
        m.push(rng.gen_range(0..n));
    }
    m.shuffle(rng);
    m
}

/// The next placement after `old` over experts `0..n`: the same, a fresh random one, or a
/// few swaps and replica changes (every expert keeps at least one slot).
pub fn next_map(rng: &mut StdRng, old: &[usize], n: usize, churn: Churn) -> Vec<usize> {
    let slots = old.len();
    let draw: i32 = rng.gen_range(0..20);
    if draw == 0 {
        old.to_vec()
    } else if draw <= churn.fresh {
        random_map(rng, n, slots)
    } else {
        let mut m = old.to_vec();
        for _ in 0..rng.gen_range(1..=churn.max_moves) {
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

/// A random layer over `ranks` ranks: `1..=max_rows` rows per rank, a random placement
/// with replicas and its next one, and 1–3 tensors drawn by `tensor`.
pub fn random_case(
    rng: &mut StdRng,
    ranks: usize,
    max_rows: usize,
    churn: Churn,
    mut tensor: impl FnMut(&mut StdRng) -> TensorDesc,
) -> LayerCase {
    let rows = rng.gen_range(1..=max_rows);
    let slots = rows * ranks;
    let n = rng.gen_range(1..=slots);
    let old = random_map(rng, n, slots);
    let new = next_map(rng, &old, n, churn);
    let count: i32 = rng.gen_range(1..=3);
    let tensors = (0..count).map(|_| tensor(rng)).collect();
    LayerCase {
        desc: LayerDesc { rows, tensors },
        old,
        new,
    }
}

// ---------------------------------------------------------------------------------------
// What a rank must stage.

/// The changed rows of a rank, reasoned from its old and new rows alone.
#[derive(Debug, Clone, Default)]
pub struct RowKinds {
    /// Rows whose new expert the rank already held: copied locally.
    pub local: BTreeSet<usize>,
    /// First rows of an expert new to the rank: received.
    pub recv: BTreeSet<usize>,
    /// Later rows of an expert new to the rank: filled at commit.
    pub dup: BTreeSet<usize>,
}

impl RowKinds {
    /// Sorts the changed rows of `new` (this rank's new rows; `old` its old ones).
    pub fn new(old: &[usize], new: &[usize]) -> Self {
        let mut kinds = Self::default();
        for (i, &e) in new.iter().enumerate() {
            if old[i] == e {
                continue;
            }
            if old.contains(&e) {
                kinds.local.insert(i);
            } else if new[..i].contains(&e) {
                kinds.dup.insert(i);
            } else {
                kinds.recv.insert(i);
            }
        }
        kinds
    }

    /// The rows staging must hold: local copies and received rows.
    pub fn staged(&self) -> BTreeSet<usize> {
        self.local.union(&self.recv).copied().collect()
    }

    /// The local copies (and duplicate fills) a commit must report, `eb` bytes per expert.
    pub fn check_commit(&self, done: &TransferStats, eb: u64, what: &str) {
        assert_eq!(
            done.bytes_copied_locally,
            (self.local.len() + self.dup.len()) as u64 * eb,
            "{what}: bytes copied locally at the commit"
        );
    }
}

/// Checks that `staged` (rank `me`'s transfer of `desc` from `old` to `new`) holds exactly
/// the rows that change and are not duplicate fills, each from a source that holds its
/// expert, and that its byte counts match; returns the kinds of rows it reasoned.
pub fn check_staged(
    staged: &StagedLayer,
    desc: &LayerDesc,
    old: &[usize],
    new: &[usize],
    me: usize,
    what: &str,
) -> RowKinds {
    let kinds = RowKinds::new(desc.seg(old, me), desc.seg(new, me));
    let staged_dst: BTreeSet<usize> = staged.staged_rows().iter().map(|r| r.dst_row).collect();
    let want = kinds.staged();
    assert_eq!(staged_dst, want, "{what}: staged rows");
    assert_eq!(
        staged.staged_rows().len(),
        want.len(),
        "{what}: a row staged twice"
    );
    for r in staged.staged_rows() {
        assert_eq!(
            r.expert,
            desc.seg(new, me)[r.dst_row],
            "{what}: staged expert"
        );
        match r.source {
            RowSource::Local { src_row } => {
                assert!(kinds.local.contains(&r.dst_row), "{what}");
                assert_eq!(desc.seg(old, me)[src_row], r.expert, "{what}: copy source");
            }
            RowSource::Peer { peer, .. } => {
                assert!(kinds.recv.contains(&r.dst_row), "{what}");
                assert!(
                    desc.seg(old, peer).contains(&r.expert),
                    "{what}: sender lacks the expert"
                );
            }
        }
    }
    let eb = desc.expert_bytes() as u64;
    let stats = staged.stats();
    assert_eq!(
        stats.bytes_received,
        kinds.recv.len() as u64 * eb,
        "{what}: bytes received"
    );
    assert_eq!(
        stats.bytes_copied_locally,
        kinds.local.len() as u64 * eb,
        "{what}: bytes copied locally"
    );
    kinds
}

// ---------------------------------------------------------------------------------------
// Launch outcomes.

/// Checks, in the parent of a launch, that rank `victim` was killed (SIGKILL) and every
/// other rank succeeded.
pub fn assert_only_killed(outcome: &LaunchOutcome, victim: usize) {
    let report = moeshift_device_comm::testing::failure_report(outcome);
    for r in &outcome.ranks {
        if r.rank == victim {
            assert!(
                matches!(r.status, RankStatus::Signaled(9)),
                "rank {victim} should have been killed: {report}"
            );
        } else {
            assert!(r.status.success(), "rank {} failed: {report}", r.rank);
        }
    }
}

// ---------------------------------------------------------------------------------------
// CUDA weights.

/// Helpers for tests on CUDA weights.
#[cfg(feature = "cuda")]
pub mod gpu {
    use std::time::Duration;

    use moeshift_device_comm::testing;
    use moeshift_device_comm::{StoreClient, World};
    use moeshift_eplb_comm::nixl::IpcCudaBuffer;
    use moeshift_eplb_comm::LayerWeights;
    use moeshift_sync::Deadline;
    use moeshift_tensor::{cuda_available, CudaBuffer, CudaError, TensorView, ViewError};
    use moeshift_tensor::{DType, Device};

    use super::{Fill, TensorDesc};

    /// Device memory a test layer can live in.
    pub trait DeviceBuffer: Sized {
        /// A buffer on GPU `gpu` holding `bytes`.
        fn upload(gpu: usize, bytes: &[u8]) -> Result<Self, CudaError>;
        /// A contiguous view of `shape` at the start of the buffer.
        fn view(&self, shape: &[usize], dtype: DType) -> Result<TensorView, ViewError>;
        /// The buffer's bytes, copied to the host.
        fn download(&self) -> Vec<u8>;
    }

    impl DeviceBuffer for CudaBuffer {
        fn upload(gpu: usize, bytes: &[u8]) -> Result<Self, CudaError> {
            CudaBuffer::from_host(gpu, bytes)
        }
        fn view(&self, shape: &[usize], dtype: DType) -> Result<TensorView, ViewError> {
            CudaBuffer::view(self, shape, dtype)
        }
        fn download(&self) -> Vec<u8> {
            self.to_vec().expect("download")
        }
    }

    impl DeviceBuffer for IpcCudaBuffer {
        fn upload(gpu: usize, bytes: &[u8]) -> Result<Self, CudaError> {
            IpcCudaBuffer::from_host(gpu, bytes)
        }
        fn view(&self, shape: &[usize], dtype: DType) -> Result<TensorView, ViewError> {
            IpcCudaBuffer::view(self, shape, dtype)
        }
        fn download(&self) -> Vec<u8> {
            self.to_vec().expect("download")
        }
    }

    impl Fill {
        /// One layer's tensors in device memory on `gpu`, rows holding `experts`.
        pub fn upload<B: DeviceBuffer>(
            &self,
            layer: usize,
            gpu: usize,
            tensors: &[TensorDesc],
            experts: &[usize],
        ) -> Vec<B> {
            tensors
                .iter()
                .enumerate()
                .map(|(t, d)| B::upload(gpu, &self.buffer(layer, t, d, experts)).expect("upload"))
                .collect()
        }

        /// Every byte of every tensor of a layer in device memory equals the buffer the
        /// rows `experts` give.
        pub fn check_device<B: DeviceBuffer>(
            &self,
            bufs: &[B],
            layer: usize,
            tensors: &[TensorDesc],
            experts: &[usize],
            when: &str,
        ) {
            self.check_bytes(
                bufs.iter().map(DeviceBuffer::download),
                layer,
                tensors,
                experts,
                when,
            );
        }
    }

    /// Describes device buffers as a layer's weights, borrowing them.
    pub fn device_weights<'a, B: DeviceBuffer>(
        tensors: &[TensorDesc],
        rows: usize,
        bufs: &'a [B],
    ) -> LayerWeights<'a> {
        let mut b = LayerWeights::builder();
        for (t, (d, buf)) in tensors.iter().zip(bufs).enumerate() {
            let (shape, narrow) = d.view_shape(rows);
            let view = match narrow {
                Some((lead, cols)) => buf
                    .view(&shape, d.dtype)
                    .and_then(|v| v.narrow(1, lead, cols)),
                None => buf.view(&shape, d.dtype),
            }
            .expect("view");
            // SAFETY: `bufs` are live device buffers borrowed for 'a, so they outlive the
            // weights; the tests touch them meanwhile only to read them back after
            // transfers and commits returned (their copies finished).
            b = unsafe { b.raw(&format!("t{t}"), view) }.expect("raw tensor");
        }
        b.build().expect("layer weights")
    }

    /// Why this machine cannot run a GPU test on `ranks` ranks, if it cannot: too few GPUs,
    /// or `runtime` (what `probe` checks) unusable. Only the parent asks.
    pub fn skip_reason<T, E: std::fmt::Display>(
        ranks: usize,
        runtime: &str,
        probe: impl FnOnce() -> Result<T, E>,
    ) -> Option<String> {
        if testing::is_rank_process() {
            return None;
        }
        match cuda_available() {
            Ok(n) => {
                if let Some(short) = testing::gpu_shortage(ranks, n) {
                    return Some(short);
                }
            }
            Err(e) => return Some(format!("CUDA is not usable here: {e}")),
        }
        probe()
            .err()
            .map(|e| format!("{runtime} is not usable here: {e}"))
    }

    /// True (after printing why) when `test` must be skipped for `reason`.
    pub fn skipped(test: &str, reason: Option<String>) -> bool {
        match reason {
            Some(reason) => {
                println!("skipping {test}: {reason}");
                true
            }
            None => false,
        }
    }

    /// One rank of a GPU test: its world, rank, GPU, set-up deadline and store client.
    pub struct GpuRank {
        /// The rank's world.
        pub world: World,
        /// This rank.
        pub me: usize,
        /// This rank's GPU ([`rank_gpu`]).
        pub gpu: usize,
        /// Deadline for the whole set-up (60 s from the rank's start).
        pub deadline: Deadline,
        /// Client of the world's store.
        pub store: StoreClient,
    }

    impl GpuRank {
        /// The device this rank's weights live on.
        pub fn device(&self) -> Device {
            Device::Cuda(self.gpu)
        }
    }

    /// This rank's GPU: `LOCAL_RANK`, or a shared one ([`testing::share_gpus`]) when
    /// `MOESHIFT_GPU_RANKS` lets the ranks outnumber the GPUs. Call it once, before NCCL or
    /// NIXL is used.
    pub fn rank_gpu(world: &World) -> usize {
        testing::share_gpus(world, cuda_available().unwrap_or(1))
    }

    /// Starts `name` as `ranks` ranks unless `skip` says why not: `None` in the parent (or
    /// when skipped), this rank otherwise.
    pub fn start_ranks(
        name: &str,
        ranks: usize,
        launch_timeout: Duration,
        skip: Option<String>,
    ) -> Option<GpuRank> {
        if skipped(name, skip) {
            return None;
        }
        let world = testing::run_as_ranks(name, ranks, launch_timeout).expect("ranks")?;
        let (me, gpu) = (world.rank(), rank_gpu(&world));
        let deadline = Deadline::after(Duration::from_secs(60));
        let store = StoreClient::connect(&world, deadline).expect("store");
        Some(GpuRank {
            world,
            me,
            gpu,
            deadline,
            store,
        })
    }
}

/// The moves of one rearrangement: layer `layers[i]` with `plans[i]` and its weights from
/// `weights` (indexed by layer), in the order of `layers`.
pub fn moves_in_order<'a, 'w>(
    weights: &'a mut [LayerWeights<'w>],
    layers: &[usize],
    plans: &'a [LayerPlan],
) -> Vec<LayerMove<'a, 'w>> {
    let mut picked: Vec<(usize, &'a mut LayerWeights<'w>)> = weights
        .iter_mut()
        .enumerate()
        .filter(|(l, _)| layers.contains(l))
        .collect();
    picked.sort_by_key(|(l, _)| layers.iter().position(|x| x == l));
    picked
        .into_iter()
        .zip(plans)
        .map(|((layer, weights), plan)| LayerMove {
            layer,
            plan,
            weights,
        })
        .collect()
}
