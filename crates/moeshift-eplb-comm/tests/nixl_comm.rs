//! Multi-process tests of the `nixl` EPLB backend: real NIXL agents in separate processes
//! READing each other's host memory through UCX.
//!
//! `rank_*` tests follow the convention of `moeshift_device_comm::testing`: under
//! `cargo test` they launch their own ranks; with `RANK` set they are one rank of any world
//! size. Every test runs only where the NIXL runtime loads (`MOESHIFT_NIXL_LIB_DIR`, set by
//! `cargo xtask test`); elsewhere it prints that it was skipped and passes.
//!
//! Expected row contents come from [`pattern`], a function of (layer, tensor, expert, byte)
//! that knows nothing of the code under test: after any sequence of plans, row `r` of rank
//! `k` must hold the pattern of the expert the current map puts in slot `k·rows + r`.

mod common;

use std::time::{Duration, Instant};

use common::splitmix;

use moeshift_device_comm::testing::{
    self, fail_point, fail_point_hit, RankRole, RankTest, ENV_FAIL_POINT, ENV_FAIL_RANK,
};
use moeshift_device_comm::{LaunchOutcome, StoreClient, World};
use moeshift_eplb_comm::nixl::{probe, NixlCommunicator, NixlConfig, NUM_WORKERS};
use moeshift_eplb_comm::{
    agree_on_plan, eplb_group, plan_digest, plans_digest, EplbCommError, EplbCommunicator,
    LayerWeights, RowSource, StagedLayer, TransferStats,
};
use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;
use moeshift_tensor::{DType, HostBuffer};

const LAUNCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Byte the bytes between strided rows are set to; they must never change.
const GAP: u8 = 0xEE;

fn setup_deadline() -> Deadline {
    Deadline::after(Duration::from_secs(60))
}

/// True when NIXL loads here; otherwise prints that `test` is skipped.
fn nixl_or_skip(test: &str) -> bool {
    match probe() {
        Ok(_) => true,
        Err(e) => {
            println!("{test}: skipped: {e}");
            false
        }
    }
}

/// Runs `test` as `ranks` ranks where NIXL loads: this rank's world, or `None` in the
/// parent, where NIXL is missing, and where the world has fewer than `min_ranks` ranks (all
/// after printing why).
fn nixl_ranks(test: &str, ranks: usize, min_ranks: usize) -> Option<World> {
    if !nixl_or_skip(test) {
        return None;
    }
    let world =
        testing::run_as_ranks(test, ranks, LAUNCH_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))?;
    let n = world.world_size();
    if n < min_ranks {
        println!("{test}: needs at least {min_ranks} ranks, skipped with {n}");
        return None;
    }
    Some(world)
}

// ---------------------------------------------------------------------------------------
// Expected contents

/// Byte `j` of expert `expert`'s row of tensor `tensor` in layer `layer`.
fn pattern(layer: usize, tensor: usize, expert: usize, j: usize) -> u8 {
    let word = splitmix(
        ((layer as u64) << 48) ^ ((tensor as u64) << 40) ^ ((expert as u64) << 20) ^ (j as u64 / 8),
    );
    word.to_le_bytes()[j % 8]
}

/// The whole row, a word of [`pattern`] at a time (equal to `pattern` at every byte).
fn expected_row(layer: usize, tensor: usize, expert: usize, len: usize) -> Vec<u8> {
    let mut row = Vec::with_capacity(len + 8);
    for w in 0..len.div_ceil(8) {
        let word = splitmix(
            ((layer as u64) << 48) ^ ((tensor as u64) << 40) ^ ((expert as u64) << 20) ^ w as u64,
        );
        row.extend_from_slice(&word.to_le_bytes());
    }
    row.truncate(len);
    row
}

#[test]
fn expected_rows_follow_the_byte_pattern() {
    for len in [0, 1, 5, 8, 13, 64] {
        let row = expected_row(2, 1, 7, len);
        assert_eq!(row.len(), len);
        for (j, &b) in row.iter().enumerate() {
            assert_eq!(b, pattern(2, 1, 7, j), "byte {j} of {len}");
        }
    }
    // Different experts, tensors and layers give different rows.
    assert_ne!(expected_row(0, 0, 1, 16), expected_row(0, 0, 2, 16));
    assert_ne!(expected_row(0, 0, 1, 16), expected_row(0, 1, 1, 16));
    assert_ne!(expected_row(0, 0, 1, 16), expected_row(1, 0, 1, 16));
}

/// A small deterministic generator (the same sequence on every rank).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix(self.0)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Model: layers of several tensors with different dtypes, one of them strided

/// One expert tensor: full shape `[rows, cols...]`, and optionally only the column range
/// `cols.0 .. cols.0 + cols.1` of dim 1 is the tensor (strided rows with gaps).
#[derive(Clone)]
struct TensorSpec {
    name: &'static str,
    dtype: DType,
    shape: Vec<usize>,
    narrow: Option<(usize, usize)>,
}

impl TensorSpec {
    fn row_bytes(&self) -> usize {
        let mut shape = self.shape.clone();
        if let Some((_, len)) = self.narrow {
            shape[1] = len;
        }
        shape[1..].iter().product::<usize>() * self.dtype.size_bytes()
    }

    fn buffer_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_bytes()
    }
}

/// The tensors of `layer`; layers differ in size on purpose.
fn specs(layer: usize, rows: usize) -> Vec<TensorSpec> {
    vec![
        TensorSpec {
            name: "w13",
            dtype: DType::Bf16,
            shape: vec![rows, 16, 8 * (layer + 1)],
            narrow: None,
        },
        TensorSpec {
            name: "w2",
            dtype: DType::F32,
            shape: vec![rows, 24],
            narrow: Some((4, 16)),
        },
        TensorSpec {
            name: "scale",
            dtype: DType::F8E4M3Fn,
            shape: vec![rows, 5],
            narrow: None,
        },
    ]
}

/// Buffers of every (layer, tensor), the bytes outside the tensors' rows set to [`GAP`] and
/// row `r` holding the pattern of `map[rank·rows + r]`.
fn make_buffers(
    all_specs: &[Vec<TensorSpec>],
    maps: &[Vec<usize>],
    rank: usize,
    rows: usize,
) -> Vec<Vec<HostBuffer>> {
    all_specs
        .iter()
        .enumerate()
        .map(|(layer, specs)| {
            specs
                .iter()
                .enumerate()
                .map(|(t, spec)| {
                    let mut buf = HostBuffer::zeroed(spec.buffer_bytes()).expect("buffer");
                    buf.as_mut_slice().fill(GAP);
                    let (stride, start) = row_geometry(spec);
                    for r in 0..rows {
                        let expert = maps[layer][rank * rows + r];
                        let at = r * stride + start;
                        buf.as_mut_slice()[at..at + spec.row_bytes()]
                            .copy_from_slice(&expected_row(layer, t, expert, spec.row_bytes()));
                    }
                    buf
                })
                .collect()
        })
        .collect()
}

/// Bytes between row starts, and where a row starts inside its stride.
fn row_geometry(spec: &TensorSpec) -> (usize, usize) {
    let stride = spec.shape[1..].iter().product::<usize>() * spec.dtype.size_bytes();
    let start = spec.narrow.map_or(0, |(s, _)| s * spec.dtype.size_bytes());
    (stride, start)
}

fn make_weights<'a>(
    all_specs: &[Vec<TensorSpec>],
    buffers: &'a mut [Vec<HostBuffer>],
) -> Vec<LayerWeights<'a>> {
    buffers
        .iter_mut()
        .zip(all_specs)
        .map(|(bufs, specs)| {
            let mut b = LayerWeights::builder();
            for (buf, spec) in bufs.iter_mut().zip(specs) {
                let mut view = buf.view(&spec.shape, spec.dtype).expect("view");
                if let Some((start, len)) = spec.narrow {
                    view = view.narrow(1, start, len).expect("narrow");
                }
                b = b.host_view(spec.name, buf, view).expect("tensor");
            }
            b.build().expect("layer weights")
        })
        .collect()
}

/// Checks that every row of `layer` holds the pattern of the expert `map` puts there.
fn check_layer(
    weights: &LayerWeights<'_>,
    specs: &[TensorSpec],
    layer: usize,
    map: &[usize],
    rank: usize,
    what: &str,
) {
    let rows = weights.num_rows();
    for (t, spec) in specs.iter().enumerate() {
        for r in 0..rows {
            let expert = map[rank * rows + r];
            let got = weights.row(t, r).expect("row");
            assert!(
                got == expected_row(layer, t, expert, spec.row_bytes()).as_slice(),
                "rank {rank}, {what}: layer {layer} tensor {:?} row {r} should hold expert {expert}",
                spec.name
            );
        }
    }
}

/// Checks that the bytes between strided rows still hold [`GAP`].
fn check_gaps(all_specs: &[Vec<TensorSpec>], buffers: &[Vec<HostBuffer>], rows: usize) {
    for (layer, specs) in all_specs.iter().enumerate() {
        for (t, spec) in specs.iter().enumerate() {
            let (stride, start) = row_geometry(spec);
            let bytes = buffers[layer][t].as_slice();
            for r in 0..rows {
                let row = r * stride + start..r * stride + start + spec.row_bytes();
                for (i, &b) in bytes[r * stride..(r + 1) * stride].iter().enumerate() {
                    let at = r * stride + i;
                    if !row.contains(&at) {
                        assert_eq!(
                            b, GAP,
                            "layer {layer} tensor {:?}: gap byte {at} changed",
                            spec.name
                        );
                    }
                }
            }
        }
    }
}

/// A random new map from `old`: mostly a fresh random placement (every expert at least
/// once), sometimes no change, a permutation inside each rank (local copies only) or one
/// swap of two slots.
fn next_map(rng: &mut Rng, old: &[usize], experts: usize, rows: usize) -> Vec<usize> {
    let mut new = old.to_vec();
    match rng.below(8) {
        0 => {}
        1 => {
            for seg in new.chunks_mut(rows) {
                rng.shuffle(seg);
            }
        }
        2 => {
            let (a, b) = (rng.below(new.len()), rng.below(new.len()));
            new.swap(a, b);
        }
        _ => {
            new = (0..experts).collect();
            while new.len() < old.len() {
                new.push(rng.below(experts));
            }
            rng.shuffle(&mut new);
        }
    }
    new
}

// ---------------------------------------------------------------------------------------
// Random plans

/// The tensors of `layer` in the random-plan test: those of [`specs`] plus rows of a little
/// over three 4 KiB pages, which the `nixl` backend cuts into pieces when it spreads a
/// peer's READs over several requests.
fn specs_with_large_rows(layer: usize, rows: usize) -> Vec<TensorSpec> {
    let mut s = specs(layer, rows);
    s.push(TensorSpec {
        name: "w_large",
        dtype: DType::Bf16,
        shape: vec![rows, 3 * 2048 + 500 + 4 * layer],
        narrow: None,
    });
    s
}

/// Random layer plans over 3 layers of 4 tensors (bf16, a strided f32 column slice, fp8
/// rows of 5 bytes, bf16 rows of over 12 KiB), moved by communicators that split each
/// peer's READs into 1, 2 and 4 requests in turn, 80 plans each, the placements carrying
/// over from one to the next. After each transfer the weights still hold the old
/// placement; after each commit every row of every layer holds exactly its new expert, and
/// the bytes between strided rows never change. The reported phases fit in the transfer's
/// time and count between one request per peer read from and `read_streams` of them; with
/// several streams some peer's rows are split.
#[test]
fn rank_nixl_random_plans() {
    const TEST: &str = "rank_nixl_random_plans";
    let Some(world) = nixl_ranks(TEST, 4, 1) else {
        return;
    };
    let (me, n) = (world.rank(), world.world_size());
    const ROWS: usize = 4;
    const LAYERS: usize = 3;
    const PLANS: usize = 80;
    const STREAMS: [usize; 3] = [1, 2, 4];
    let slots = n * ROWS;
    let experts = (slots * 3 / 4).max(1);
    let all_specs: Vec<Vec<TensorSpec>> = (0..LAYERS)
        .map(|l| specs_with_large_rows(l, ROWS))
        .collect();
    let mut maps: Vec<Vec<usize>> = vec![(0..slots).map(|s| s % experts).collect(); LAYERS];
    let mut buffers = make_buffers(&all_specs, &maps, me, ROWS);
    let mut weights = make_weights(&all_specs, &mut buffers);
    // The landing area is registered once, for the largest layer: ROWS whole experts.
    let largest = all_specs
        .iter()
        .map(|s| ROWS * s.iter().map(TensorSpec::row_bytes).sum::<usize>())
        .max()
        .unwrap_or(0);

    let store = StoreClient::connect(&world, setup_deadline()).expect("store");
    let members: Vec<usize> = (0..n).collect();
    let mut rng = Rng(0x5EED);
    for streams in STREAMS {
        let group = eplb_group(&store, &members, setup_deadline()).expect("group");
        let config = NixlConfig::default().read_streams(streams);
        let mut comm = NixlCommunicator::with_config(group, &weights, config, setup_deadline())
            .unwrap_or_else(|e| panic!("rank {me}: building with {streams} streams: {e}"));
        assert_eq!((comm.rank(), comm.num_ranks()), (me, n));
        assert_eq!(comm.read_streams(), streams);
        assert_eq!(comm.landing_bytes(), largest);
        assert!(comm.last_phases().is_none());

        let started = Instant::now();
        let (mut received, mut moved_plans, mut split_plans) = (0u64, 0usize, 0usize);
        for step in 0..PLANS {
            let what = format!("rank {me}, {streams} streams, step {step}");
            let layer = rng.below(LAYERS);
            let new = next_map(&mut rng, &maps[layer], experts, ROWS);
            let plan = LayerPlan::new(&maps[layer], &new, n).expect("plan");
            let deadline = Deadline::after(Duration::from_secs(30));
            let staged = comm
                .transfer(layer, &plan, &weights[layer], deadline)
                .unwrap_or_else(|e| panic!("{what}, layer {layer}: {e}"));
            // Transferring never writes the weights.
            check_layer(
                &weights[layer],
                &all_specs[layer],
                layer,
                &maps[layer],
                me,
                "after transfer",
            );
            let mine = plan.rank(me).expect("rank plan");
            let expert_bytes: usize = all_specs[layer].iter().map(TensorSpec::row_bytes).sum();
            let stats = *staged.stats();
            // Staging holds exactly the rows that change and are not duplicate fills.
            assert_eq!(
                stats.staging_bytes as usize,
                (mine.recvs.len() + mine.local_copies.len()) * expert_bytes,
                "{what}"
            );
            assert_eq!(
                stats.bytes_received as usize,
                mine.recvs.len() * expert_bytes
            );
            check_phases(&comm, &stats, &plan, me, layer, streams, &what);
            let peers_read = distinct_sources(&plan, me);
            let requests = comm.last_phases().map_or(0, |p| p.read_requests);
            split_plans += usize::from(requests > peers_read);
            received += stats.bytes_received;
            moved_plans += usize::from(plan.num_transfers() > 0);
            staged.commit(&mut weights[layer]).expect("commit");
            maps[layer] = new;
            for (l, w) in weights.iter().enumerate() {
                check_layer(w, &all_specs[l], l, &maps[l], me, &format!("after {what}"));
            }
        }
        let elapsed = started.elapsed();
        assert!(
            moved_plans > PLANS / 2 || n == 1,
            "only {moved_plans} plans crossed ranks"
        );
        if streams > 1 && n > 1 {
            assert!(
                split_plans > PLANS / 4,
                "rank {me}, {streams} streams: only {split_plans} plans split a peer's READs"
            );
        } else {
            assert_eq!(split_plans, 0, "rank {me}, {streams} streams");
        }
        println!(
            "rank {me}, {streams} streams: {PLANS} plans ({moved_plans} crossing ranks, \
             {split_plans} split) in {elapsed:.2?}, {received} bytes READ"
        );
    }
    drop(weights);
    check_gaps(&all_specs, &buffers, ROWS);
}

/// Several layers rearranged per call through the pipelined `nixl` `rearrange`, with one
/// landing slot (each layer waits for the previous commit) and with two (commits overlap
/// the next layer's READs): 12 calls each, every call a random subset of the 4 layers in
/// random order with fresh placements. After each call every row of every layer holds its
/// new expert, the statistics come back in call order with the staged and received bytes
/// of each layer's plan, and no landing slot is held. Then plans that differ on one rank
/// are refused by every rank before any byte moves (nothing committed, weights unchanged,
/// the communicator still usable), and the bytes between strided rows never change.
#[test]
fn rank_nixl_rearrange() {
    const TEST: &str = "rank_nixl_rearrange";
    let Some(world) = nixl_ranks(TEST, 4, 1) else {
        return;
    };
    let (me, n) = (world.rank(), world.world_size());
    const ROWS: usize = 4;
    const LAYERS: usize = 4;
    const CALLS: usize = 12;
    let slots = n * ROWS;
    let experts = (slots * 3 / 4).max(1);
    let all_specs: Vec<Vec<TensorSpec>> = (0..LAYERS)
        .map(|l| specs_with_large_rows(l, ROWS))
        .collect();
    let mut maps: Vec<Vec<usize>> = vec![(0..slots).map(|s| s % experts).collect(); LAYERS];
    let mut buffers = make_buffers(&all_specs, &maps, me, ROWS);
    let mut weights = make_weights(&all_specs, &mut buffers);
    let store = StoreClient::connect(&world, setup_deadline()).expect("store");
    let members: Vec<usize> = (0..n).collect();
    let mut rng = Rng(0xEA2A);
    let check_all = |weights: &[LayerWeights<'_>], maps: &[Vec<usize>], what: &str| {
        for (l, w) in weights.iter().enumerate() {
            check_layer(w, &all_specs[l], l, &maps[l], me, what);
        }
    };

    for landing_slots in [1, 2] {
        let group = eplb_group(&store, &members, setup_deadline()).expect("group");
        let config = NixlConfig::default()
            .landing_slots(landing_slots)
            .read_streams(2);
        let mut comm = NixlCommunicator::with_config(group, &weights, config, setup_deadline())
            .unwrap_or_else(|e| panic!("rank {me}: building with {landing_slots} slots: {e}"));
        assert_eq!(comm.landing_slots(), landing_slots);
        let mut crossed = 0usize;
        for call in 0..CALLS {
            let what = format!("rank {me}, {landing_slots} slot(s), call {call}");
            let mut layers: Vec<usize> = (0..LAYERS).collect();
            rng.shuffle(&mut layers);
            layers.truncate(1 + rng.below(LAYERS));
            let news: Vec<Vec<usize>> = layers
                .iter()
                .map(|&l| next_map(&mut rng, &maps[l], experts, ROWS))
                .collect();
            let plans: Vec<LayerPlan> = layers
                .iter()
                .zip(&news)
                .map(|(&l, new)| LayerPlan::new(&maps[l], new, n).expect("plan"))
                .collect();
            crossed += plans.iter().filter(|p| p.num_transfers() > 0).count();
            let mut moves = common::moves_in_order(&mut weights, &layers, &plans);
            let stats = comm
                .rearrange(&mut moves, Deadline::after(Duration::from_secs(30)))
                .unwrap_or_else(|e| panic!("{what}, layers {layers:?}: {e}"));
            assert_eq!(stats.len(), layers.len(), "{what}");
            for ((&l, plan), s) in layers.iter().zip(&plans).zip(&stats) {
                let mine = plan.rank(me).expect("rank plan");
                let eb: usize = all_specs[l].iter().map(TensorSpec::row_bytes).sum();
                assert_eq!(
                    s.staging_bytes as usize,
                    (mine.recvs.len() + mine.local_copies.len()) * eb,
                    "{what}, layer {l}: staging"
                );
                assert_eq!(
                    s.bytes_received as usize,
                    mine.recvs.len() * eb,
                    "{what}, layer {l}: received"
                );
                assert_eq!(
                    s.bytes_copied_locally as usize,
                    (mine.local_copies.len() + mine.dup_fills.len()) * eb,
                    "{what}, layer {l}: local copies and fills"
                );
            }
            for (&l, new) in layers.iter().zip(news) {
                maps[l] = new;
            }
            check_all(&weights, &maps, &format!("after {what}"));
            assert!(comm.staged_layers_held().is_empty(), "{what}");
        }
        assert!(
            crossed > CALLS || n == 1,
            "only {crossed} plans crossed ranks"
        );
    }

    // Plans that differ on one rank: every rank refuses before any byte moves.
    if n > 1 {
        let group = eplb_group(&store, &members, setup_deadline()).expect("group");
        let config = NixlConfig::default().landing_slots(2);
        let mut comm = NixlCommunicator::with_config(group, &weights, config, setup_deadline())
            .expect("communicator");
        let news: Vec<Vec<usize>> = (0..2).map(|l| shifted(&maps[l])).collect();
        let mut plans: Vec<LayerPlan> = (0..2)
            .map(|l| LayerPlan::new(&maps[l], &news[l], n).expect("plan"))
            .collect();
        if me == 1 {
            plans[1] = LayerPlan::new(&maps[1], &shifted(&news[1]), n).expect("plan");
        }
        let mut moves = common::moves_in_order(&mut weights, &[0, 1], &plans);
        let err = comm
            .rearrange(&mut moves, Deadline::after(Duration::from_secs(20)))
            .expect_err("plans differ on rank 1");
        assert!(err.committed.is_empty(), "rank {me}: {err}");
        assert!(
            matches!(*err.source, EplbCommError::PlanDigestMismatch { .. }),
            "rank {me}: {err}"
        );
        assert!(!err.poisons_communicator(), "rank {me}: {err}");
        check_all(&weights, &maps, "after the refused rearrangement");
        // Still usable: the agreed plans move.
        let plans: Vec<LayerPlan> = (0..2)
            .map(|l| LayerPlan::new(&maps[l], &news[l], n).expect("plan"))
            .collect();
        let mut moves = common::moves_in_order(&mut weights, &[0, 1], &plans);
        comm.rearrange(&mut moves, Deadline::after(Duration::from_secs(20)))
            .unwrap_or_else(|e| panic!("rank {me}: after the refusal: {e}"));
        for (l, new) in news.into_iter().enumerate() {
            maps[l] = new;
        }
        check_all(&weights, &maps, "after the agreed rearrangement");
    }
    drop(weights);
    check_gaps(&all_specs, &buffers, ROWS);
}

/// How many distinct peers `rank` receives rows from in `plan`.
fn distinct_sources(plan: &LayerPlan, rank: usize) -> usize {
    let mut sources: Vec<usize> = plan
        .rank(rank)
        .expect("rank plan")
        .recvs
        .iter()
        .map(|r| r.src)
        .collect();
    sources.sort_unstable();
    sources.dedup();
    sources.len()
}

/// The phases `comm` reports for the transfer of `layer` that returned `stats`: the layer,
/// the bytes, one to `streams` requests per peer read from, and times that fit in the
/// transfer's.
fn check_phases(
    comm: &NixlCommunicator,
    stats: &TransferStats,
    plan: &LayerPlan,
    me: usize,
    layer: usize,
    streams: usize,
    what: &str,
) {
    let phases = *comm.last_phases().expect("phases of the last transfer");
    assert_eq!(phases.layer, layer, "{what}");
    assert_eq!(phases.bytes_read, stats.bytes_received, "{what}");
    assert_eq!(phases.total, stats.seconds, "{what}");
    let peers = distinct_sources(plan, me);
    assert!(
        (peers..=peers * streams).contains(&phases.read_requests),
        "{what}: {} requests from {peers} peers",
        phases.read_requests
    );
    let mut sum = 0.0;
    for (name, secs) in phases.named() {
        assert!(secs >= 0.0, "{what}: {name} took {secs}");
        sum += secs;
    }
    assert!(
        sum <= phases.total,
        "{what}: phases {sum} s of {} s",
        phases.total
    );
    if plan.num_transfers() == 0 {
        assert_eq!(phases.status_exchange, 0.0, "{what}");
        assert_eq!(phases.read_requests, 0, "{what}");
    }
    if phases.read_requests > 0 {
        assert!(phases.reads > 0.0, "{what}");
    }
}

// ---------------------------------------------------------------------------------------
// Tensor mismatch at construction

/// The last rank declares one tensor differently (another dtype of the same size, then
/// another row shape of the same size): every rank's construction fails, naming the tensor
/// and the rank it disagrees with.
#[test]
fn rank_nixl_tensor_mismatch() {
    const TEST: &str = "rank_nixl_tensor_mismatch";
    let Some(world) = nixl_ranks(TEST, 4, 2) else {
        return;
    };
    let (me, n) = (world.rank(), world.world_size());
    const ROWS: usize = 2;
    let odd = n - 1;
    let store = StoreClient::connect(&world, setup_deadline()).expect("store");
    let members: Vec<usize> = (0..n).collect();
    let expected_peer = if me == odd { 0 } else { odd };

    /// How the odd rank alters layer 0, and a word the error must contain.
    type Alter = (&'static str, fn(&mut [TensorSpec]));
    let cases: [Alter; 2] = [
        ("float16", |s| {
            // Same bytes per row as [rows, 24] f32 with a 16-column slice: 16 × 4 = 32 × 2.
            s[1] = TensorSpec {
                name: "w2",
                dtype: DType::F16,
                shape: vec![ROWS, 48],
                narrow: Some((8, 32)),
            }
        }),
        ("row shape", |s| {
            // Same dtype and bytes per row as [rows, 16, 8] bf16, shaped [rows, 8, 16].
            s[0].shape = vec![ROWS, 8, 16];
        }),
    ];
    for (what, alter) in cases {
        let mut all_specs: Vec<Vec<TensorSpec>> = (0..2).map(|l| specs(l, ROWS)).collect();
        if me == odd {
            alter(&mut all_specs[0]);
        }
        let maps: Vec<Vec<usize>> = vec![(0..n * ROWS).collect(); 2];
        let mut buffers = make_buffers(&all_specs, &maps, me, ROWS);
        let weights = make_weights(&all_specs, &mut buffers);
        let err = NixlCommunicator::new(&store, &members, &weights, setup_deadline())
            .expect_err("ranks describe different tensors");
        let text = err.to_string();
        println!("rank {me}: {text}");
        assert!(
            matches!(err, EplbCommError::LayoutMismatch { .. }),
            "{text}"
        );
        assert_eq!(err.peer(), Some(expected_peer), "{text}");
        for part in [
            format!("rank {me} "),
            format!("peer rank {expected_peer}"),
            "layer 0".to_string(),
            what.to_string(),
        ] {
            assert!(text.contains(&part), "{part:?} missing in {text}");
        }
        let tensor = if what == "float16" {
            "\"w2\""
        } else {
            "\"w13\""
        };
        assert!(text.contains(tensor), "{tensor} missing in {text}");
    }
}

// ---------------------------------------------------------------------------------------
// A peer killed mid-transfer

/// Runs `test` as 4 ranks where rank `victim` is killed at fail point `point`: this rank's
/// world, or `None` in the parent (after checking the survivors with [`check_survivors`])
/// and where NIXL is missing.
fn killed_peer_rank(test: &str, point: &str, victim: usize) -> Option<World> {
    if !nixl_or_skip(test) {
        return None;
    }
    let launch = RankTest::new(test, 4)
        .env(ENV_FAIL_RANK, &victim.to_string())
        .env(ENV_FAIL_POINT, point)
        .timeout(LAUNCH_TIMEOUT)
        .keep_going();
    if let Some(outcome) = parent_outcome(&launch) {
        check_survivors(&outcome, victim);
        return None;
    }
    Some(World::from_env().expect("rank variables"))
}

fn parent_outcome(test: &RankTest) -> Option<LaunchOutcome> {
    match test.launch().unwrap_or_else(|e| panic!("{e}")) {
        RankRole::Rank(_) => None,
        RankRole::Parent(outcome) => Some(outcome),
    }
}

/// In the parent: `victim` was killed, and every other rank passed after printing its
/// error as a survivor.
fn check_survivors(outcome: &LaunchOutcome, victim: usize) {
    common::assert_only_killed(outcome, victim);
    for rank in (0..outcome.ranks.len()).filter(|&r| r != victim) {
        let out = output_of(outcome, rank);
        assert!(out.contains("survivor error:"), "rank {rank}:\n{out}");
    }
}

fn output_of(outcome: &LaunchOutcome, rank: usize) -> String {
    outcome.ranks[rank]
        .output
        .iter()
        .map(|l| l.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Rank 2 of 4 is killed (SIGKILL) in the middle of a transfer in which every other rank
/// READs rows from it: it takes part in the plan agreement, then dies while the others
/// post their READs. The survivors fail within their deadline with an error naming rank 2
/// (their READ from it fails, or the post-read check finds it gone); their weights keep the
/// last committed placement and the communicator refuses further transfers.
#[test]
fn nixl_peer_killed_mid_transfer() {
    const POINT: &str = "after_plan_agreement";
    const VICTIM: usize = 2;
    let Some(world) = killed_peer_rank("nixl_peer_killed_mid_transfer", POINT, VICTIM) else {
        return;
    };
    let (me, n) = (world.rank(), world.world_size());
    const ROWS: usize = 4;
    const LAYERS: usize = 2;
    // 1 MiB per row of w13: each layer moves several MiB into every rank.
    let all_specs: Vec<Vec<TensorSpec>> = (0..LAYERS)
        .map(|_| {
            vec![
                TensorSpec {
                    name: "w13",
                    dtype: DType::Bf16,
                    shape: vec![ROWS, 512, 1024],
                    narrow: None,
                },
                TensorSpec {
                    name: "scale",
                    dtype: DType::F32,
                    shape: vec![ROWS, 16],
                    narrow: None,
                },
            ]
        })
        .collect();
    let slots = n * ROWS;
    let mut maps: Vec<Vec<usize>> = vec![(0..slots).collect(); LAYERS];
    let mut buffers = make_buffers(&all_specs, &maps, me, ROWS);
    let mut weights = make_weights(&all_specs, &mut buffers);
    let store = StoreClient::connect(&world, setup_deadline()).expect("store");
    let members: Vec<usize> = (0..n).collect();
    let mut comm = NixlCommunicator::new(&store, &members, &weights, setup_deadline())
        .expect("build the communicator");

    // A few healthy layers first: rotate by one rank, so every rank READs from its left
    // neighbour.
    for step in 0..4 {
        let layer = step % LAYERS;
        let new: Vec<usize> = (0..slots)
            .map(|s| maps[layer][(s + slots - ROWS) % slots])
            .collect();
        let plan = LayerPlan::new(&maps[layer], &new, n).expect("plan");
        let deadline = Deadline::after(Duration::from_secs(20));
        comm.transfer_and_commit(layer, &plan, &mut weights[layer], deadline)
            .unwrap_or_else(|e| panic!("rank {me}, healthy step {step}: {e}"));
        maps[layer] = new;
    }
    for (l, w) in weights.iter().enumerate() {
        check_layer(w, &all_specs[l], l, &maps[l], me, "after the healthy steps");
    }

    // Every rank takes the victim's experts: all survivors READ from it.
    let layer = 0;
    let victim_rows = &maps[layer][VICTIM * ROWS..(VICTIM + 1) * ROWS];
    let new: Vec<usize> = (0..slots).map(|s| victim_rows[s % ROWS]).collect();
    let plan = LayerPlan::new(&maps[layer], &new, n).expect("plan");
    let deadline = Deadline::after(Duration::from_secs(20));
    if fail_point_hit(&world, POINT) {
        let group = comm.group().expect("the EPLB group");
        agree_on_plan(group, layer, plan_digest(layer, &plan), None, deadline)
            .expect("the plan agreement");
        fail_point(&world, POINT);
        unreachable!("the fail point kills this rank");
    }
    let started = Instant::now();
    let err = comm
        .transfer_and_commit(layer, &plan, &mut weights[layer], deadline)
        .expect_err("rank 2 dies during this transfer");
    let text = err.to_string();
    println!("survivor error: after {:.1?}: {text}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(text.contains("rank 2"), "{text}");
    assert!(err.poisons_communicator(), "{text}");
    // A READ of this rank's that failed or timed out names the peer it read from (the
    // survivor may also learn of the death from the post-read check instead).
    if let EplbCommError::Nixl { op, .. } = &err {
        if op.starts_with("READ of expert") {
            assert_eq!(err.peer(), Some(VICTIM), "{text}");
        }
    }
    // Nothing was committed: every layer keeps its last placement.
    for (l, w) in weights.iter().enumerate() {
        check_layer(w, &all_specs[l], l, &maps[l], me, "after the failure");
    }
    let again = comm
        .transfer(layer, &plan, &weights[layer], deadline)
        .expect_err("the communicator is unusable after the failure");
    assert!(
        matches!(again, EplbCommError::CommunicatorFailed { .. }),
        "{again}"
    );
}

/// Rank 2 of 4 is killed (SIGKILL) after the agreement of a pipelined rearrangement of two
/// layers in which every other rank READs rows from it. The survivors fail within their
/// deadline with a [`RearrangeError`] at layer 0 naming rank 2, nothing committed, their
/// weights as they were, and the communicator refusing further work.
///
/// [`RearrangeError`]: moeshift_eplb_comm::RearrangeError
#[test]
fn nixl_peer_killed_mid_rearrange() {
    const POINT: &str = "after_rearrange_agreement";
    const VICTIM: usize = 2;
    let Some(world) = killed_peer_rank("nixl_peer_killed_mid_rearrange", POINT, VICTIM) else {
        return;
    };
    let (me, n) = (world.rank(), world.world_size());
    const ROWS: usize = 4;
    const LAYERS: usize = 2;
    let all_specs: Vec<Vec<TensorSpec>> = (0..LAYERS)
        .map(|_| {
            vec![TensorSpec {
                name: "w13",
                dtype: DType::Bf16,
                shape: vec![ROWS, 512, 1024],
                narrow: None,
            }]
        })
        .collect();
    let slots = n * ROWS;
    let maps: Vec<Vec<usize>> = vec![(0..slots).collect(); LAYERS];
    let mut buffers = make_buffers(&all_specs, &maps, me, ROWS);
    let mut weights = make_weights(&all_specs, &mut buffers);
    let store = StoreClient::connect(&world, setup_deadline()).expect("store");
    let members: Vec<usize> = (0..n).collect();
    let group = eplb_group(&store, &members, setup_deadline()).expect("group");
    let config = NixlConfig::default().landing_slots(2);
    let mut comm = NixlCommunicator::with_config(group, &weights, config, setup_deadline())
        .expect("build the communicator");

    // Every rank takes the victim's experts in both layers: all survivors READ from it.
    let plans: Vec<LayerPlan> = maps
        .iter()
        .map(|map| {
            let victim_rows = &map[VICTIM * ROWS..(VICTIM + 1) * ROWS];
            let new: Vec<usize> = (0..slots).map(|s| victim_rows[s % ROWS]).collect();
            LayerPlan::new(map, &new, n).expect("plan")
        })
        .collect();
    let deadline = Deadline::after(Duration::from_secs(20));
    if fail_point_hit(&world, POINT) {
        let group = comm.group().expect("the EPLB group");
        let digest = plans_digest(plans.iter().enumerate());
        agree_on_plan(group, 0, digest, None, deadline).expect("the plan agreement");
        fail_point(&world, POINT);
        unreachable!("the fail point kills this rank");
    }
    let started = Instant::now();
    let mut moves = common::moves_in_order(&mut weights, &[0, 1], &plans);
    let err = comm
        .rearrange(&mut moves, deadline)
        .expect_err("rank 2 dies during this rearrangement");
    let text = err.to_string();
    println!("survivor error: after {:.1?}: {text}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(text.contains("rank 2"), "{text}");
    assert_eq!(
        (err.layer, err.committed.as_slice()),
        (0, &[][..]),
        "{text}"
    );
    assert!(err.poisons_communicator(), "{text}");
    for (l, w) in weights.iter().enumerate() {
        check_layer(w, &all_specs[l], l, &maps[l], me, "after the failure");
    }
    let again = comm
        .transfer(0, &plans[0], &weights[0], deadline)
        .expect_err("the communicator is unusable after the failure");
    assert!(
        matches!(again, EplbCommError::CommunicatorFailed { .. }),
        "{again}"
    );
}

// ---------------------------------------------------------------------------------------
// The landing area is the staging: lent to one staged layer per slot

/// Every rank's new map for `layer`: every slot takes the expert of the slot before it, so
/// each rank receives its row 0 from the previous rank and copies the others locally.
fn shifted(map: &[usize]) -> Vec<usize> {
    let slots = map.len();
    (0..slots).map(|s| map[(s + slots - 1) % slots]).collect()
}

/// Checks that a host-staged layer holds, for every staged row, the pattern of its expert
/// (received rows READ from a peer, local rows copied), before anything is committed.
fn check_staged(staged: &StagedLayer, specs: &[TensorSpec], layer: usize, what: &str) {
    let mut peers = 0;
    for (i, row) in staged.staged_rows().iter().enumerate() {
        peers += usize::from(matches!(row.source, RowSource::Peer { .. }));
        for (t, spec) in specs.iter().enumerate() {
            let got = staged.staged_bytes(i, t).expect("host staging is readable");
            assert!(
                got == expected_row(layer, t, row.expert, spec.row_bytes()).as_slice(),
                "{what}: staged row {i} (expert {}) tensor {:?}",
                row.expert,
                spec.name
            );
        }
    }
    assert!(peers > 0, "{what}: no row crossed ranks");
}

/// One landing slot (the default): a rank whose staged layer is neither committed nor
/// dropped cannot transfer another layer; it refuses with `StagingInUse` (naming the layer
/// holding the slot) and its peers hear of it (`PeerRefused`), before any byte moves and
/// without poisoning the communicator. Received rows sit in their final staging place
/// (checked byte for byte before the commit). With two slots, two layers are staged at once
/// without touching each other, a third is refused, and commits in any order work.
#[test]
fn rank_nixl_landing_slots() {
    const TEST: &str = "rank_nixl_landing_slots";
    let Some(world) = nixl_ranks(TEST, 3, 2) else {
        return;
    };
    let (me, n) = (world.rank(), world.world_size());
    const ROWS: usize = 3;
    const LAYERS: usize = 3;
    let slots = n * ROWS;
    let all_specs: Vec<Vec<TensorSpec>> = (0..LAYERS).map(|l| specs(l, ROWS)).collect();
    let mut maps: Vec<Vec<usize>> = vec![(0..slots).collect(); LAYERS];
    let mut buffers = make_buffers(&all_specs, &maps, me, ROWS);
    let mut weights = make_weights(&all_specs, &mut buffers);
    let store = StoreClient::connect(&world, setup_deadline()).expect("store");
    let members: Vec<usize> = (0..n).collect();
    let deadline = || Deadline::after(Duration::from_secs(20));
    let check_all = |weights: &[LayerWeights<'_>], maps: &[Vec<usize>], what: &str| {
        for (l, w) in weights.iter().enumerate() {
            check_layer(w, &all_specs[l], l, &maps[l], me, what);
        }
    };

    // 1. One slot.
    let mut comm = NixlCommunicator::new(&store, &members, &weights, setup_deadline())
        .expect("build the communicator");
    assert_eq!(comm.landing_slots(), 1);
    let new0 = shifted(&maps[0]);
    let plan0 = LayerPlan::new(&maps[0], &new0, n).expect("plan");
    let staged0 = comm
        .transfer(0, &plan0, &weights[0], deadline())
        .expect("layer 0");
    check_staged(&staged0, &all_specs[0], 0, "layer 0 before its commit");
    assert_eq!(comm.staged_layers_held(), vec![0]);

    // Every rank still holds layer 0: every rank refuses layer 1 itself.
    let new1 = shifted(&maps[1]);
    let plan1 = LayerPlan::new(&maps[1], &new1, n).expect("plan");
    let err = comm
        .transfer(1, &plan1, &weights[1], deadline())
        .expect_err("the only slot is held by layer 0");
    match &err {
        EplbCommError::StagingInUse {
            rank,
            layer: 1,
            held_by,
            slots: 1,
        } => {
            assert_eq!((*rank, held_by.as_slice()), (me, &[0][..]), "{err}");
        }
        other => panic!("rank {me}: expected StagingInUse, got {other}"),
    }
    assert!(!err.poisons_communicator());
    // Layer 0's staged rows are intact, and nothing was written.
    check_staged(
        &staged0,
        &all_specs[0],
        0,
        "layer 0 after a refused transfer",
    );
    check_all(&weights, &maps, "after the refused transfer");

    // Only rank 0 commits: it is ready, the others still refuse, and it hears of them.
    let staged0 = if me == 0 {
        staged0.commit(&mut weights[0]).expect("commit layer 0");
        None
    } else {
        Some(staged0)
    };
    let err = comm
        .transfer(1, &plan1, &weights[1], deadline())
        .expect_err("ranks 1.. still hold layer 0");
    if me == 0 {
        assert!(
            matches!(err, EplbCommError::PeerRefused { peer: 1, ref reason, .. }
                if reason.contains("still held")),
            "{err}"
        );
        assert_eq!(comm.staged_layers_held(), Vec::<usize>::new());
    } else {
        assert!(matches!(err, EplbCommError::StagingInUse { .. }), "{err}");
    }
    if let Some(staged0) = staged0 {
        staged0.commit(&mut weights[0]).expect("commit layer 0");
    }
    maps[0] = new0;
    check_all(&weights, &maps, "after layer 0");

    // Now layer 1 moves.
    comm.transfer_and_commit(1, &plan1, &mut weights[1], deadline())
        .expect("layer 1 once the slot is free");
    maps[1] = new1;
    check_all(&weights, &maps, "after layer 1");
    drop(comm);

    // 2. Two slots: two layers staged at once, a third refused, commits out of order.
    let group = eplb_group(&store, &members, setup_deadline()).expect("group");
    let mut comm = NixlCommunicator::with_config(
        group,
        &weights,
        NixlConfig::default().landing_slots(2),
        setup_deadline(),
    )
    .expect("build the two-slot communicator");
    assert_eq!(comm.landing_slots(), 2);
    let next: Vec<Vec<usize>> = maps.iter().map(|m| shifted(m)).collect();
    let plans: Vec<LayerPlan> = (0..LAYERS)
        .map(|l| LayerPlan::new(&maps[l], &next[l], n).expect("plan"))
        .collect();
    let a = comm
        .transfer(0, &plans[0], &weights[0], deadline())
        .expect("layer 0 in slot 1");
    let b = comm
        .transfer(1, &plans[1], &weights[1], deadline())
        .expect("layer 1 in slot 2");
    // Layer 1's READs did not land on layer 0's rows.
    check_staged(&a, &all_specs[0], 0, "layer 0 after layer 1 was staged");
    check_staged(&b, &all_specs[1], 1, "layer 1");
    let err = comm
        .transfer(2, &plans[2], &weights[2], deadline())
        .expect_err("both slots held");
    match &err {
        EplbCommError::StagingInUse {
            held_by, slots: 2, ..
        } => assert_eq!(held_by, &vec![0, 1], "{err}"),
        other => panic!("rank {me}: expected StagingInUse, got {other}"),
    }
    check_all(&weights, &maps, "before the two commits");
    b.commit(&mut weights[1]).expect("commit layer 1");
    maps[1] = next[1].clone();
    a.commit(&mut weights[0]).expect("commit layer 0");
    maps[0] = next[0].clone();
    check_all(&weights, &maps, "after committing layers 1 and 0");
    // A staged layer that is dropped gives its slot back too.
    let dropped = comm
        .transfer(2, &plans[2], &weights[2], deadline())
        .expect("layer 2");
    assert_eq!(comm.staged_layers_held(), vec![2]);
    drop(dropped);
    assert_eq!(comm.staged_layers_held(), Vec::<usize>::new());
    check_all(&weights, &maps, "after dropping layer 2's staging");
    comm.transfer_and_commit(2, &plans[2], &mut weights[2], deadline())
        .expect("layer 2 again");
    maps[2] = next[2].clone();
    check_all(&weights, &maps, "at the end");
    drop(weights);
    check_gaps(&all_specs, &buffers, ROWS);
}

// ---------------------------------------------------------------------------------------
// Weights the backend cannot serve: typed errors at construction, never a panic

/// A store and a one-rank world, in this process.
fn lone_store() -> StoreClient {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let world = World::single_node(0, 1, "127.0.0.1", port).expect("world");
    StoreClient::connect(&world, setup_deadline()).expect("store")
}

/// Weights described on GPU 0 at an address nothing was allocated at: never dereferenced on
/// the host, and the backend must refuse them before any READ.
fn phantom_device_weights<'a>() -> LayerWeights<'a> {
    let storage = moeshift_tensor::Storage::new(
        0x7f00_0000_0000,
        4 * 16,
        DType::Bf16,
        moeshift_tensor::Device::Cuda(0),
    );
    let view = moeshift_tensor::TensorView::contiguous(storage, &[4, 16]).expect("view");
    // SAFETY: the memory is only described: the backend refuses it (no GPU, no feature
    // `cuda`, or no allocation at that address) before anything reads or writes it.
    unsafe { LayerWeights::builder().raw("w13", view) }
        .expect("tensor")
        .build()
        .expect("weights")
}

/// Device weights the backend cannot serve here (a build without feature `cuda`, a machine
/// without a GPU, or memory CUDA does not know) are a typed error naming the rank, never a
/// panic or an abort; layers on two devices are refused naming the odd layer.
#[test]
fn nixl_unservable_weights_are_typed_errors() {
    const TEST: &str = "nixl_unservable_weights_are_typed_errors";
    if !nixl_or_skip(TEST) {
        return;
    }
    let store = lone_store();
    let err = NixlCommunicator::new(&store, &[0], &[phantom_device_weights()], setup_deadline())
        .expect_err("nothing is allocated at the phantom address");
    let text = err.to_string();
    println!("{TEST}: device weights: {text}");
    assert!(text.contains("rank 0"), "{text}");
    if cfg!(feature = "cuda") {
        // No GPU (a CUDA error), or a GPU that does not know the address.
        assert!(
            matches!(err, EplbCommError::Cuda { .. })
                || (matches!(err, EplbCommError::Nixl { .. })
                    && text.contains("\"w13\"")
                    && text.contains("not CUDA device memory")),
            "{text}"
        );
    } else {
        assert!(matches!(err, EplbCommError::Nixl { .. }), "{text}");
        assert!(
            text.contains("\"w13\"") && text.contains("feature `cuda`"),
            "{text}"
        );
    }
    assert_eq!(err.peer(), None, "{text}");

    // Layer 0 on the host, layer 1 on a GPU: refused naming layer 1, before any CUDA call.
    let mut buf = HostBuffer::zeroed(4 * 32).expect("buffer");
    let host = LayerWeights::builder()
        .host("w13", &mut buf, &[4, 16], DType::Bf16)
        .expect("tensor")
        .build()
        .expect("weights");
    let err = NixlCommunicator::new(
        &store,
        &[0],
        &[host, phantom_device_weights()],
        setup_deadline(),
    )
    .expect_err("layers on two devices");
    let text = err.to_string();
    assert!(matches!(err, EplbCommError::Nixl { .. }), "{text}");
    for part in ["rank 0", "layer 1", "cuda:0", "host"] {
        assert!(text.contains(part), "{part:?} missing in {text}");
    }

    // No landing slot at all cannot work.
    let mut buf = HostBuffer::zeroed(4 * 32).expect("buffer");
    let host = LayerWeights::builder()
        .host("w13", &mut buf, &[4, 16], DType::Bf16)
        .expect("tensor")
        .build()
        .expect("weights");
    let group = eplb_group(&store, &[0], setup_deadline()).expect("group");
    let err = NixlCommunicator::with_config(
        group,
        std::slice::from_ref(&host),
        NixlConfig::default().landing_slots(0),
        setup_deadline(),
    )
    .expect_err("zero landing slots");
    assert!(err.to_string().contains("landing_slots"), "{err}");

    // No READ stream at all cannot work either, nor more streams than UCX workers.
    let cases = [
        (NixlConfig::default().read_streams(0), "read_streams is 0"),
        (
            NixlConfig::default()
                .read_streams(3)
                .backend_param(NUM_WORKERS, "2"),
            "read_streams is 3",
        ),
    ];
    for (config, expected) in cases {
        let group = eplb_group(&store, &[0], setup_deadline()).expect("group");
        let err = NixlCommunicator::with_config(
            group,
            std::slice::from_ref(&host),
            config,
            setup_deadline(),
        )
        .expect_err("an unusable number of READ streams");
        let text = err.to_string();
        assert!(matches!(err, EplbCommError::Nixl { .. }), "{text}");
        assert!(
            text.contains(expected) && text.contains("rank 0"),
            "{expected:?} missing in {text}"
        );
    }
}
