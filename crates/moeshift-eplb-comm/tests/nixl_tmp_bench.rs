use std::time::{Duration, Instant};
use moeshift_device_comm::{testing, StoreClient};
use moeshift_eplb_comm::nixl::NixlCommunicator;
use moeshift_eplb_comm::{EplbCommunicator, HostCommunicator, LayerWeights};
use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;
use moeshift_tensor::{DType, HostBuffer};

fn run(backend: &str) {
    let name = format!("rank_tmp_bench_{backend}");
    let Some(world) = testing::run_as_ranks(&name, 4, Duration::from_secs(120)).unwrap() else { return };
    let (me, n) = (world.rank(), world.world_size());
    const ROWS: usize = 8;
    let row_elems = 512 * 1024; // 1 MiB bf16
    let mut buf = HostBuffer::zeroed(ROWS * row_elems * 2).unwrap();
    buf.as_mut_slice().fill(me as u8);
    let mut w = vec![LayerWeights::builder().host("w13", &mut buf, &[ROWS, row_elems], DType::Bf16).unwrap().build().unwrap()];
    let d = Deadline::after(Duration::from_secs(60));
    let store = StoreClient::connect(&world, d).unwrap();
    let members: Vec<usize> = (0..n).collect();
    let mut comm: Box<dyn EplbCommunicator> = if backend == "nixl" {
        Box::new(NixlCommunicator::new(&store, &members, &w, d).unwrap())
    } else {
        Box::new(HostCommunicator::new(&store, &members, &w, d).unwrap())
    };
    let slots = n * ROWS;
    let mut map: Vec<usize> = (0..slots).collect();
    let mut times = vec![];
    for _ in 0..12 {
        let new: Vec<usize> = (0..slots).map(|s| map[(s + slots - ROWS) % slots]).collect();
        let plan = LayerPlan::new(&map, &new, n).unwrap();
        let t = Instant::now();
        let staged = comm.transfer(0, &plan, &w[0], Deadline::after(Duration::from_secs(30))).unwrap();
        let tt = t.elapsed();
        staged.commit(&mut w[0]).unwrap();
        times.push((tt, t.elapsed()));
        map = new;
    }
    times.sort();
    let (tt, tc) = times[times.len() / 2];
    println!("{backend} rank {me}: median transfer {tt:.2?} (+commit {tc:.2?}) for {} MiB received: {:.2} GB/s", ROWS, (ROWS << 20) as f64 / tt.as_secs_f64() / 1e9);
}

#[test]
fn rank_tmp_bench_nixl() { run("nixl") }
#[test]
fn rank_tmp_bench_host() { run("host") }
