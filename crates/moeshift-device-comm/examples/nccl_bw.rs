//! NCCL point-to-point bandwidth between two GPUs through `moeshift_device_comm::nccl`.
//!
//! Measures what `torch_peer_baseline.py` measures for PyTorch (one way and both ways at once,
//! 64 MiB and 1 GiB, 2 warm-up calls then the median of the timed calls, each timed call
//! starting right after a barrier), plus the time of a 4-byte transfer (the fixed cost of one
//! call) and one grouped exchange of 1000 small operations per rank (the batch size that hangs
//! PyTorch's `batch_isend_irecv` over NCCL under load). Prints one JSON object.
//!
//! ```text
//! cargo build --release --features cuda -p moeshift-device-comm --example nccl_bw
//! target/release/examples/nccl_bw [--reps 7]              # starts 2 ranks itself
//! moeshift launch --nproc 2 -- target/release/examples/nccl_bw   # or under a launcher
//! ```

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!(
        "nccl_bw needs the `cuda` feature: cargo run --release --features cuda --example nccl_bw"
    );
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(err) = bench::main() {
        eprintln!("nccl_bw: {err}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
mod bench {
    use std::error::Error;
    use std::time::{Duration, Instant};

    use cudarc::driver::{CudaContext, CudaSlice};
    use moeshift_device_comm::launch::OutputMode;
    use moeshift_device_comm::nccl::{nccl_available, NcclComm, P2pOp};
    use moeshift_device_comm::{Launcher, StoreClient, World};
    use moeshift_sync::Deadline;

    type Result<T> = std::result::Result<T, Box<dyn Error>>;

    /// Deadline of every single operation.
    const OP_TIMEOUT: Duration = Duration::from_secs(60);
    /// Warm-up calls before timing (as the PyTorch peer).
    const WARMUP: usize = 2;
    /// Messages per direction of the grouped many-operations exchange.
    const MANY_OPS_PER_DIRECTION: usize = 500;
    /// Bytes of each of those messages (8192 f32, the tensor size of PyTorch's batched-P2P hang).
    const MANY_OPS_BYTES: usize = 8192 * 4;
    /// Marks the result line in rank 0's output.
    const RESULT_TAG: &str = "NCCL_BW_RESULT ";

    pub fn main() -> Result<()> {
        let reps = parse_reps()?;
        if std::env::var_os("RANK").is_none() {
            return launch(reps);
        }
        run_rank(reps)
    }

    fn parse_reps() -> Result<usize> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        match args.as_slice() {
            [] => Ok(7),
            [flag, n] if flag == "--reps" => {
                let n: usize = n.parse()?;
                if n < 5 {
                    return Err("--reps must be at least 5".into());
                }
                Ok(n)
            }
            other => {
                Err(format!("unexpected arguments {other:?}; usage: nccl_bw [--reps N]").into())
            }
        }
    }

    /// Starts two ranks of this program and prints rank 0's JSON.
    fn launch(reps: usize) -> Result<()> {
        nccl_available()?;
        let gpus = CudaContext::device_count()?;
        if gpus < 2 {
            return Err(format!("{gpus} GPU(s) visible; the benchmark needs 2").into());
        }
        let exe = std::env::current_exe()?;
        let outcome = Launcher::new(2, exe)
            .args(["--reps".to_string(), reps.to_string()])
            .output(OutputMode::Capture)
            .timeout(Duration::from_secs(600))
            .run()?;
        let rank0 = outcome
            .ranks
            .first()
            .ok_or("no rank 0 in the launch outcome")?;
        let json = rank0
            .output
            .iter()
            .find_map(|line| line.text.strip_prefix(RESULT_TAG));
        match (outcome.success(), json) {
            (true, Some(json)) => {
                println!("{json}");
                Ok(())
            }
            _ => {
                for rank in &outcome.ranks {
                    for line in &rank.output {
                        eprintln!("[rank {}] {}", rank.rank, line.text);
                    }
                }
                Err(format!("the benchmark ranks failed:\n{}", outcome.summary()).into())
            }
        }
    }

    fn run_rank(reps: usize) -> Result<()> {
        let world = World::from_env()?;
        if world.world_size() != 2 {
            return Err(format!("run with 2 ranks, not {}", world.world_size()).into());
        }
        let (rank, peer) = (world.rank(), 1 - world.rank());
        let setup = Deadline::after(Duration::from_secs(120));
        let store = StoreClient::connect(&world, setup)?;
        let version = nccl_available()?;
        let comm = NcclComm::from_store(
            &store,
            rank,
            2,
            "nccl_bw/unique_id",
            world.local_rank(),
            setup,
        )?;
        let stream = comm.stream().clone();
        let gpu = stream.context().name()?;
        let mut barrier_buf = stream.alloc_zeros::<f32>(1)?;
        let mut barrier = || comm.all_reduce_sum(&mut barrier_buf, op_deadline());

        let mut fields: Vec<(String, String)> = Vec::new();
        for mib in [64usize, 1024] {
            let bytes = mib << 20;
            let a: CudaSlice<u8> = stream.clone_htod(&vec![1u8; bytes])?;
            let mut b: CudaSlice<u8> = stream.alloc_zeros(bytes)?;
            let one_way = time_median(reps, &mut barrier, &mut || {
                if rank == 0 {
                    comm.send(peer, &a, op_deadline())
                } else {
                    comm.recv(peer, &mut b, op_deadline())
                }
            })?;
            let both_ways = time_median(reps, &mut barrier, &mut || {
                comm.grouped(
                    &[P2pOp::send(peer, &a), P2pOp::recv(peer, &mut b)],
                    op_deadline(),
                )
            })?;
            // The receiver saw every byte of the last transfer.
            let landed = stream.clone_dtoh(&b)?;
            if let Some(i) = landed.iter().position(|&x| x != 1) {
                return Err(format!(
                    "rank {rank}: byte {i} of the {mib} MiB receive is {}",
                    landed[i]
                )
                .into());
            }
            fields.push((
                format!("p2p_one_way_{mib}MiB_GBps"),
                fmt_f64(bytes as f64 / one_way / 1e9),
            ));
            fields.push((
                format!("p2p_both_ways_{mib}MiB_GBps_per_direction"),
                fmt_f64(bytes as f64 / both_ways / 1e9),
            ));
        }

        // The fixed cost of one call: 4 bytes one way and both ways.
        let tiny: CudaSlice<u8> = stream.clone_htod(&[1u8, 2, 3, 4])?;
        let mut tiny_in: CudaSlice<u8> = stream.alloc_zeros(4)?;
        let one_way = time_median(reps, &mut barrier, &mut || {
            if rank == 0 {
                comm.send(peer, &tiny, op_deadline())
            } else {
                comm.recv(peer, &mut tiny_in, op_deadline())
            }
        })?;
        let both_ways = time_median(reps, &mut barrier, &mut || {
            comm.grouped(
                &[P2pOp::send(peer, &tiny), P2pOp::recv(peer, &mut tiny_in)],
                op_deadline(),
            )
        })?;
        fields.push(("p2p_one_way_4B_us".into(), fmt_f64(one_way * 1e6)));
        fields.push(("p2p_both_ways_4B_us".into(), fmt_f64(both_ways * 1e6)));

        // 1000 operations per rank in one call: 500 sends and 500 receives of 32 KiB.
        let n = MANY_OPS_PER_DIRECTION;
        let src: CudaSlice<u8> = stream.clone_htod(&vec![7u8; n * MANY_OPS_BYTES])?;
        let mut dst: CudaSlice<u8> = stream.alloc_zeros(n * MANY_OPS_BYTES)?;
        let many = time_median(reps, &mut barrier, &mut || {
            let sends: Vec<_> = (0..n)
                .map(|i| src.slice(i * MANY_OPS_BYTES..(i + 1) * MANY_OPS_BYTES))
                .collect();
            let mut recvs: Vec<_> = dst.as_view_mut().chunks_exact_mut(MANY_OPS_BYTES).collect();
            let mut ops: Vec<P2pOp<'_>> = sends.iter().map(|v| P2pOp::send(peer, v)).collect();
            ops.extend(recvs.iter_mut().map(|v| P2pOp::recv(peer, v)));
            comm.grouped(&ops, op_deadline())
        })?;
        let landed = stream.clone_dtoh(&dst)?;
        if let Some(i) = landed.iter().position(|&x| x != 7) {
            return Err(format!(
                "rank {rank}: byte {i} of the grouped receives is {}",
                landed[i]
            )
            .into());
        }
        fields.push(("grouped_1000_ops_32KiB_s".into(), fmt_f64(many)));
        fields.push((
            "grouped_1000_ops_32KiB_GBps_per_direction".into(),
            fmt_f64((n * MANY_OPS_BYTES) as f64 / many / 1e9),
        ));

        if rank == 0 {
            fields.push(("nccl".into(), format!("\"{version}\"")));
            fields.push(("gpu".into(), format!("\"{}\"", gpu.replace('"', "'"))));
            fields.push(("reps".into(), reps.to_string()));
            fields.push(("warmup".into(), WARMUP.to_string()));
            fields.push((
                "timing".into(),
                "\"wall clock of rank 0's call (returns when its GPU finished), median; every \
                 timed call starts after an NCCL all-reduce barrier\""
                    .into(),
            ));
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("\"{k}\": {v}"))
                .collect();
            println!("{RESULT_TAG}{{{}}}", body.join(", "));
        }
        comm.close(op_deadline())?;
        Ok(())
    }

    fn op_deadline() -> Deadline {
        Deadline::after(OP_TIMEOUT)
    }

    /// Median seconds of `reps` timed calls of `op` after `WARMUP` untimed ones; each call
    /// starts right after `barrier`.
    fn time_median<E: Error + 'static>(
        reps: usize,
        barrier: &mut dyn FnMut() -> std::result::Result<(), E>,
        op: &mut dyn FnMut() -> std::result::Result<(), E>,
    ) -> Result<f64> {
        for _ in 0..WARMUP {
            op()?;
        }
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            barrier()?;
            let start = Instant::now();
            op()?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    fn fmt_f64(x: f64) -> String {
        if x.is_finite() {
            format!("{x:.6}")
        } else {
            "null".into()
        }
    }
}
