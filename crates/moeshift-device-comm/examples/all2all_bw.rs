//! MoE dispatch + combine bandwidth of the three CUDA all-to-all managers, one rank per GPU
//! (2 by default; any count that divides the 256 experts).
//!
//! Each rank dispatches 4096 tokens of hidden size 7168 (bf16) with top-8 routing over 256
//! experts (256 / ranks per GPU, uniform random picks with a fixed seed per rank, weights 1/8),
//! the experts are identities (their inputs gathered once before timing), and the
//! combined rows are checked to equal the input rows exactly. After warm-up, each timed
//! repetition starts after an NCCL barrier and measures dispatch, then combine until its
//! output is ready; the medians are reported. GB/s per GPU = token-row bytes this GPU sends
//! to and receives from the other GPUs in dispatch plus combine, over the total time.
//!
//! ```text
//! cargo build --release --features cuda -p moeshift-device-comm --example all2all_bw
//! moeshift launch --nproc 2 -- target/release/examples/all2all_bw [--reps 9] [--splits-out F]
//! target/release/examples/all2all_bw [--ranks 8]            # starts the ranks itself (2)
//! target/release/examples/all2all_bw --ranks 2 --share-gpus  # 2 ranks on fewer GPUs
//! ```
//!
//! `--share-gpus` lets the ranks outnumber the GPUs ([`testing::share_gpus`]: ranks on one
//! GPU take turns on it and NCCL carries their rows over loopback sockets). It checks the
//! multi-rank paths at full size; its timings say nothing about bandwidth, and the JSON
//! says `"shared_gpus": true`.
//!
//! [`testing::share_gpus`]: moeshift_device_comm::testing::share_gpus
//!
//! `--splits-out FILE` writes the rows each rank sends each rank (all-to-all-v routing) as
//! JSON, for `bench/torch_all2all_peer.py` to exchange the same bytes. Rank 0 prints one
//! JSON object.
//!
//! Like PyTorch's caching allocator, the benchmark keeps freed device memory in the pool
//! (release threshold of the default memory pool set to the maximum), so repeated calls do
//! not return memory to the driver between repetitions.

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("all2all_bw needs the `cuda` feature: cargo run --release --features cuda --example all2all_bw");
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(err) = bench::main() {
        eprintln!("all2all_bw: {err}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
mod bench {
    use std::error::Error;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
    use moeshift_device_comm::all2all::{
        token_key, CudaAgRsManager, CudaAll2AllError, CudaAllToAllVManager, CudaDispatched,
        CudaOneSidedManager, CudaTokens, EpGroupShape, ExpertPlacement, MoeAll2All, Workspace,
        WorkspaceCapacity, WorkspaceConfig,
    };
    use moeshift_device_comm::launch::OutputMode;
    use moeshift_device_comm::nccl::{nccl_available, NcclComm};
    use moeshift_device_comm::{testing, HostGroup, Launcher, StoreClient, World};
    use moeshift_sync::Deadline;
    use moeshift_tensor::DType;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    type Result<T> = std::result::Result<T, Box<dyn Error>>;

    /// Ranks started without a launcher, unless `--ranks` says otherwise.
    const DEFAULT_RANKS: usize = 2;
    const TOP_K: usize = 8;
    const EXPERTS: usize = 256;
    const OP_TIMEOUT: Duration = Duration::from_secs(60);
    const RESULT_TAG: &str = "A2A_BW_RESULT ";

    struct Args {
        reps: usize,
        warmup: usize,
        tokens: usize,
        hidden: usize,
        splits_out: Option<String>,
        ranks: usize,
        share_gpus: bool,
    }

    fn parse_args() -> Result<Args> {
        let mut a = Args {
            reps: 9,
            warmup: 3,
            tokens: 4096,
            hidden: 7168,
            splits_out: None,
            ranks: DEFAULT_RANKS,
            share_gpus: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or(format!("{flag} needs a value"));
            match flag.as_str() {
                "--reps" => a.reps = value()?.parse()?,
                "--warmup" => a.warmup = value()?.parse()?,
                "--tokens" => a.tokens = value()?.parse()?,
                "--hidden" => a.hidden = value()?.parse()?,
                "--splits-out" => a.splits_out = Some(value()?),
                "--ranks" => a.ranks = value()?.parse()?,
                "--share-gpus" => a.share_gpus = true,
                other => {
                    return Err(format!(
                        "unexpected argument {other:?}; usage: all2all_bw [--reps N] [--warmup N] \
                     [--tokens N] [--hidden N] [--splits-out FILE] [--ranks N] [--share-gpus]"
                    )
                    .into())
                }
            }
        }
        if a.reps < 5 {
            return Err("--reps must be at least 5".into());
        }
        if a.ranks == 0 || EXPERTS % a.ranks != 0 {
            return Err(
                format!("--ranks {} does not divide the {EXPERTS} experts", a.ranks).into(),
            );
        }
        Ok(a)
    }

    pub fn main() -> Result<()> {
        let args = parse_args()?;
        if std::env::var_os("RANK").is_none() {
            return launch(&args);
        }
        run_rank(&args)
    }

    /// Starts `ranks` ranks of this program and prints rank 0's JSON.
    fn launch(args: &Args) -> Result<()> {
        let ranks = args.ranks;
        nccl_available()?;
        let gpus = CudaContext::device_count()?;
        if gpus < ranks as i32 && !args.share_gpus {
            return Err(format!(
                "{gpus} GPU(s) visible; the benchmark needs {ranks} (or --share-gpus)"
            )
            .into());
        }
        let exe = std::env::current_exe()?;
        let outcome = Launcher::new(ranks, exe)
            .args(std::env::args().skip(1))
            .output(OutputMode::Capture)
            .timeout(Duration::from_secs(600))
            .run()?;
        let json = outcome.ranks.first().and_then(|r| {
            r.output
                .iter()
                .find_map(|line| line.text.strip_prefix(RESULT_TAG))
        });
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

    fn deadline() -> Deadline {
        Deadline::after(OP_TIMEOUT)
    }

    /// Waits for `stream` with a deadline (polling an event).
    fn wait(stream: &Arc<CudaStream>) -> Result<()> {
        let event = stream.record_event(None)?;
        let d = deadline();
        while !event.try_is_complete()? {
            if d.is_expired() {
                return Err("the GPU did not finish within the deadline".into());
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    /// bf16 bits of `x`, exact for the values used here: integers in -8..=8, whose eighths
    /// and every partial sum of eighths are exact in bf16 too, so combine must return the
    /// input rows unchanged.
    fn bf16_bits(x: f32) -> u16 {
        (x.to_bits() >> 16) as u16
    }

    struct Timing {
        dispatch: f64,
        combine: f64,
        total: f64,
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    #[allow(clippy::too_many_arguments)]
    fn time_manager<M>(
        m: &M,
        comm: &NcclComm,
        stream: &Arc<CudaStream>,
        hidden: &CudaSlice<u8>,
        ids: &CudaSlice<u32>,
        weights: &CudaSlice<f32>,
        placement: &ExpertPlacement,
        args: &Args,
        expected: &[u8],
        reset_steps: &dyn Fn(),
    ) -> Result<(Timing, usize)>
    where
        M: for<'a> MoeAll2All<
            Tokens<'a> = CudaTokens<'a>,
            LoadCounts<'a> = &'a mut CudaSlice<i64>,
            ExpertOutputs<'a> = cudarc::driver::CudaView<'a, u8>,
            Dispatched = CudaDispatched,
            Combined = CudaSlice<u8>,
            Error = CudaAll2AllError,
        >,
    {
        let tokens = || {
            CudaTokens::new(
                hidden.as_view(),
                DType::Bf16,
                args.hidden,
                ids.as_view(),
                weights.as_view(),
                TOP_K,
            )
        };
        let mut barrier_buf = stream.alloc_zeros::<f32>(1)?;
        let mut load = stream.alloc_zeros::<i64>(EXPERTS)?;
        // Warm-up, and the identity experts' outputs (the gathered inputs).
        let d = m.dispatch(tokens(), placement, Some(&mut load), deadline())?;
        let outputs = d.expert_inputs()?;
        let received = d.num_rows();
        for _ in 0..args.warmup {
            let d = m.dispatch(tokens(), placement, Some(&mut load), deadline())?;
            let c = m.combine(&d, outputs.as_view(), deadline())?;
            wait(stream)?;
            drop(c);
        }
        let (mut ds, mut cs, mut ts) = (Vec::new(), Vec::new(), Vec::new());
        let mut last = None;
        reset_steps();
        for _ in 0..args.reps {
            comm.all_reduce_sum(&mut barrier_buf, deadline())?;
            let t0 = Instant::now();
            let d = m.dispatch(tokens(), placement, Some(&mut load), deadline())?;
            let t1 = Instant::now();
            let c = m.combine(&d, outputs.as_view(), deadline())?;
            wait(stream)?;
            let t2 = Instant::now();
            ds.push((t1 - t0).as_secs_f64());
            cs.push((t2 - t1).as_secs_f64());
            ts.push((t2 - t0).as_secs_f64());
            last = Some(c);
        }
        let combined = stream.clone_dtoh(last.as_ref().ok_or("no repetition ran")?)?;
        if combined != expected {
            let i = combined
                .iter()
                .zip(expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!(
                "{}: combined rows differ from the input rows at byte {i}",
                m.name()
            )
            .into());
        }
        Ok((
            Timing {
                dispatch: median(ds),
                combine: median(cs),
                total: median(ts),
            },
            received,
        ))
    }

    fn run_rank(args: &Args) -> Result<()> {
        let world = World::from_env()?;
        let ranks = world.world_size();
        if EXPERTS % ranks != 0 {
            return Err(format!("{ranks} ranks do not divide the {EXPERTS} experts").into());
        }
        let rank = world.rank();
        // Before any other thread runs: sharing GPUs sets NCCL's variables.
        let device = if args.share_gpus {
            let gpus = CudaContext::device_count()?.max(1) as usize;
            testing::share_gpus(&world, gpus)
        } else {
            world.local_rank()
        };
        let setup = Deadline::after(Duration::from_secs(120));
        let store = StoreClient::connect(&world, setup)?;
        let group = HostGroup::world(&store, setup)?;
        let version = nccl_available()?;
        let comm =
            NcclComm::from_store(&store, rank, ranks, "all2all_bw/unique_id", device, setup)?;
        let stream = comm.stream().clone();
        let gpu = stream.context().name()?;

        // Tokens, routing and placement (256 experts, 256 / ranks slots per GPU, no
        // redundancy).
        let (n, h) = (args.tokens, args.hidden);
        let row_bytes = h * 2;
        let values: Vec<u16> = (0..n * h)
            .map(|i| bf16_bits(((i * 7 + rank * 3) % 17) as f32 - 8.0))
            .collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut rng = StdRng::seed_from_u64(0x5eed_a2a0 + rank as u64);
        let mut ids: Vec<u32> = Vec::with_capacity(n * TOP_K);
        for _ in 0..n {
            ids.extend(
                rand::seq::index::sample(&mut rng, EXPERTS, TOP_K)
                    .into_iter()
                    .map(|e| e as u32),
            );
        }
        let weights = vec![1.0f32 / TOP_K as f32; n * TOP_K];
        let phy2log: Vec<i64> = (0..EXPERTS as i64).collect();
        let placement = ExpertPlacement::from_phy2log(0, &phy2log, EXPERTS, ranks)?;
        let hidden = stream.clone_htod(&bytes)?;
        let ids_dev = stream.clone_htod(&ids)?;
        let weights_dev = stream.clone_htod(&weights)?;

        // Rows sent to each rank by the all-to-all-v routing (the managers' own rule).
        let spr = placement.slots_per_rank();
        let mut send_rows = vec![0u64; ranks];
        for t in 0..n {
            let mut seen = vec![false; ranks];
            for k in 0..TOP_K {
                let e = ids[t * TOP_K + k] as usize;
                let slot = placement
                    .route(token_key(rank, t), k, e)
                    .ok_or("routing failed")?;
                seen[slot / spr] = true;
            }
            for (d, s) in seen.iter().enumerate() {
                send_rows[d] += u64::from(*s);
            }
        }
        let mine: Vec<u8> = send_rows.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = group.all_gather(&mine, setup)?;
        let matrix: Vec<Vec<u64>> = all
            .iter()
            .map(|b| {
                b.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect()
            })
            .collect();

        let workspace = Workspace::new(
            ranks,
            EpGroupShape {
                dp: ranks,
                pcp: 1,
                tp: 1,
            },
            WorkspaceConfig {
                top_k: TOP_K,
                num_experts: EXPERTS,
                elem_bytes: 2,
            },
            WorkspaceCapacity {
                max_tokens_per_rank: n,
                hidden_size: h,
                extra_bytes_per_token: 0,
            },
        )?;
        let agrs = CudaAgRsManager::new(&comm)?;
        let a2av = CudaAllToAllVManager::new(&comm)?;
        let one_sided = CudaOneSidedManager::new(&comm, &group, workspace, setup)?;

        // Rows this rank sends to and receives from the other ranks, in dispatch and again
        // (reversed) in combine.
        let others = |d: &usize| *d != rank;
        let sent: u64 = (0..ranks).filter(others).map(|d| send_rows[d]).sum();
        let got: u64 = (0..ranks).filter(others).map(|s| matrix[s][rank]).sum();
        let cross_a2av = (sent + got) as f64 * row_bytes as f64 * 2.0;
        let cross_agrs = (2 * (ranks - 1) * n) as f64 * row_bytes as f64 * 2.0;
        let mut fields: Vec<String> = Vec::new();
        let reps = args.reps.max(1) as f64;
        let mut report = |name: &str, t: &Timing, bytes: f64, steps: Vec<(String, Duration)>| {
            // Mean host time per timed call of each step, in ms.
            let steps: Vec<String> = steps
                .iter()
                .map(|(step, total)| format!("\"{step}\": {:.4}", total.as_secs_f64() * 1e3 / reps))
                .collect();
            fields.push(format!(
                "\"{name}\": {{\"dispatch_ms\": {:.4}, \"combine_ms\": {:.4}, \"total_ms\": {:.4}, \
                 \"bytes_per_gpu\": {bytes:.0}, \"GBps_per_gpu\": {:.3}, \"step_ms\": {{{}}}}}",
                t.dispatch * 1e3,
                t.combine * 1e3,
                t.total * 1e3,
                bytes / t.total / 1e9,
                steps.join(", ")
            ));
        };
        let common = (&comm, &stream, &hidden, &ids_dev, &weights_dev, &placement);
        let (t, received) = time_manager(
            &agrs,
            common.0,
            common.1,
            common.2,
            common.3,
            common.4,
            common.5,
            args,
            &bytes,
            &|| agrs.reset_step_times(),
        )?;
        if received != ranks * n {
            return Err(format!("agrs received {received} rows, expected {}", ranks * n).into());
        }
        report("allgather_reducescatter", &t, cross_agrs, agrs.step_times());
        let (t, _) = time_manager(
            &a2av,
            common.0,
            common.1,
            common.2,
            common.3,
            common.4,
            common.5,
            args,
            &bytes,
            &|| a2av.reset_step_times(),
        )?;
        report("all_to_all_v", &t, cross_a2av, a2av.step_times());
        let (t, _) = time_manager(
            &one_sided,
            common.0,
            common.1,
            common.2,
            common.3,
            common.4,
            common.5,
            args,
            &bytes,
            &|| one_sided.reset_step_times(),
        )?;
        report("one_sided_ipc", &t, cross_a2av, one_sided.step_times());

        if rank == 0 {
            if let Some(path) = &args.splits_out {
                let rows: Vec<String> = matrix
                    .iter()
                    .map(|r| {
                        let v: Vec<String> = r.iter().map(u64::to_string).collect();
                        format!("[{}]", v.join(", "))
                    })
                    .collect();
                std::fs::write(
                    path,
                    format!(
                        "{{\"ranks\": {ranks}, \"tokens_per_rank\": {n}, \"hidden\": {h}, \
                         \"dtype\": \"bf16\", \"send_rows\": [{}]}}\n",
                        rows.join(", ")
                    ),
                )?;
            }
            println!(
                "{RESULT_TAG}{{\"bench\": \"all2all_bw\", \"impl\": \"moeshift\", \"gpu\": \"{}\", \
                 \"nccl\": \"{version}\", \"ranks\": {ranks}, \"tokens_per_rank\": {n}, \
                 \"hidden\": {h}, \"dtype\": \"bf16\", \"top_k\": {TOP_K}, \"experts\": {EXPERTS}, \
                 \"reps\": {}, \"warmup\": {}, \"send_rows\": {:?}, \"shared_gpus\": {}, \"verified\": true, \
                 \"timing\": \"rank 0 wall clock, median; each repetition starts after an NCCL \
                 barrier; dispatch returns when its rows arrived, combine when its output is \
                 ready; GBps = token-row bytes sent to + received from the other GPUs in dispatch \
                 and combine / total\", \"managers\": {{{}}}}}",
                gpu.replace('"', "'"),
                args.reps,
                args.warmup,
                matrix,
                args.share_gpus,
                fields.join(", ")
            );
        }
        drop((agrs, a2av));
        one_sided.close(deadline())?;
        comm.close(deadline())?;
        Ok(())
    }
}
