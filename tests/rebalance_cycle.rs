//! Cross-crate scenario through the `moeshift` facade: four ranks place experts with the
//! DeepSeek-compatible policy, then follow drifting loads with the migration-aware policy;
//! each window's plans move real rows (a bf16 weight tensor and an f32 scale tensor per
//! expert) through the host EPLB communicator, and every rank checks every row it holds.
//! Sizes follow the number of ranks, so `cargo xtask test-multirank --ranks N` runs it for any N.

use std::time::Duration;

use moeshift::device_comm::{testing, StoreClient};
use moeshift::eplb_comm::{open_communicator, Backend, LayerWeights};
use moeshift::placement::{
    deepseek, migration, LayerPlan, Layout, LoadMatrix, MigrationOptions, Placement, Topology,
};
use moeshift::sync::Deadline;
use moeshift::tensor::{DType, HostBuffer};

const LAYERS: usize = 3;
const EXPERTS: usize = 16;
const WEIGHT_ELEMS: usize = 96; // bf16 elements per expert row
const SCALE_ELEMS: usize = 6; // f32 scales per expert row

/// The bytes expert `e` of `layer` holds in tensor `t`: distinct for every (layer, e, t).
fn expected_row(layer: usize, e: usize, t: usize) -> Vec<u8> {
    let len = if t == 0 {
        WEIGHT_ELEMS * 2
    } else {
        SCALE_ELEMS * 4
    };
    (0..len)
        .map(|i| (i as u64 * 31 + e as u64 * 131 + layer as u64 * 17 + t as u64 * 7) as u8)
        .collect()
}

fn load(window: u64) -> LoadMatrix {
    let rows: Vec<Vec<f32>> = (0..LAYERS as u64)
        .map(|l| {
            (0..EXPERTS as u64)
                .map(|e| 1.0 + ((e * 7 + l * 3 + window * 5) % 13) as f32 * (1 + (e % 3)) as f32)
                .collect()
        })
        .collect();
    LoadMatrix::from_rows(&rows).expect("valid load")
}

#[test]
fn rank_rebalance_cycle_moves_every_row_it_plans() {
    let Some(world) = testing::run_as_ranks(
        "rank_rebalance_cycle_moves_every_row_it_plans",
        4,
        Duration::from_secs(120),
    )
    .expect("ranks ran") else {
        return;
    };
    let (rank, ranks) = (world.rank(), world.world_size());
    let deadline = || Deadline::after(Duration::from_secs(30));
    let store = StoreClient::connect(&world, deadline()).expect("store");
    // At least one redundant slot per rank; two nodes when the ranks split evenly.
    let slots_per_rank = (EXPERTS + ranks).div_ceil(ranks);
    let slots = ranks * slots_per_rank;
    let nodes = if ranks % 2 == 0 { 2 } else { 1 };
    let topo = Topology::new(slots, 4, nodes, ranks);
    let initial = Placement::initial(Layout::new(LAYERS, EXPERTS, slots, ranks).expect("layout"));

    let mut buffers: Vec<[HostBuffer; 2]> = (0..LAYERS)
        .map(|layer| {
            let owned = initial.rank_slots(layer, rank).expect("rank slots");
            let mut w = HostBuffer::zeroed(slots_per_rank * WEIGHT_ELEMS * 2).expect("alloc");
            let mut s = HostBuffer::zeroed(slots_per_rank * SCALE_ELEMS * 4).expect("alloc");
            for (row, &e) in owned.iter().enumerate() {
                let (wl, sl) = (WEIGHT_ELEMS * 2, SCALE_ELEMS * 4);
                w.as_mut_slice()[row * wl..(row + 1) * wl]
                    .copy_from_slice(&expected_row(layer, e, 0));
                s.as_mut_slice()[row * sl..(row + 1) * sl]
                    .copy_from_slice(&expected_row(layer, e, 1));
            }
            [w, s]
        })
        .collect();
    let mut weights: Vec<LayerWeights<'_>> = buffers
        .iter_mut()
        .map(|[w, s]| {
            LayerWeights::builder()
                .host("w13", w, &[slots_per_rank, WEIGHT_ELEMS], DType::Bf16)
                .and_then(|b| b.host("w13_scale", s, &[slots_per_rank, SCALE_ELEMS], DType::F32))
                .and_then(|b| b.build())
                .expect("layer weights")
        })
        .collect();
    let members: Vec<usize> = (0..ranks).collect();
    let mut comm = open_communicator(
        Backend::Host.into(),
        false,
        &store,
        &members,
        &weights,
        deadline(),
    )
    .expect("communicator");

    // Window 0: DeepSeek from the initial placement; later windows: migration.
    let mut current = initial;
    for window in 0..4u64 {
        let next = if window == 0 {
            deepseek(&load(window), &topo, Some(&current)).expect("deepseek")
        } else {
            migration(&load(window), &topo, &current, &MigrationOptions::default())
                .expect("migration")
                .placement
        };
        for (layer, lw) in weights.iter_mut().enumerate() {
            let plan = LayerPlan::new(
                current.phy2log(layer).expect("old row"),
                next.phy2log(layer).expect("new row"),
                ranks,
            )
            .expect("plan");
            comm.transfer_and_commit(layer, &plan, lw, deadline())
                .expect("transfer");
            let owned = next.rank_slots(layer, rank).expect("rank slots");
            for (row, &e) in owned.iter().enumerate() {
                for t in 0..2 {
                    assert_eq!(
                        lw.row(t, row).expect("row"),
                        expected_row(layer, e, t).as_slice(),
                        "window {window}, layer {layer}, rank {rank}, row {row}, tensor {t}: \
                         should hold expert {e}"
                    );
                }
            }
        }
        current = next;
    }
}
