//! Host-transport throughput between two ranks, next to a plain memcpy of the same size.
//!
//! ```text
//! cargo build --release --example host_bw -p moeshift-device-comm
//! moeshift launch --nproc 2 -- target/release/examples/host_bw [SIZE_MIB …] [--iters N]
//! ```
//!
//! Run without `RANK` set (e.g. `cargo run --release --example host_bw`) it launches its own
//! two ranks. Rank 0 prints one JSON object: for each size, the one-way rate (rank 0 sends,
//! rank 1 receives into a buffer), the both-ways rate (both send and receive at once), the
//! memcpy rate in one process, and the ratios. Rates are 10^9 bytes per second.

use std::time::{Duration, Instant};

use moeshift_device_comm::launch::{OutputMode, Stream};
use moeshift_device_comm::{HostGroup, Launcher, ReduceOp, StoreClient, World};
use moeshift_sync::Deadline;

struct Args {
    sizes_mib: Vec<usize>,
    iters: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut sizes_mib = Vec::new();
    let mut iters = 5;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--iters" {
            let v = it.next().ok_or("--iters needs a value")?;
            iters = v.parse().map_err(|e| format!("--iters {v}: {e}"))?;
        } else {
            sizes_mib.push(a.parse().map_err(|e| format!("size {a}: {e}"))?);
        }
    }
    if sizes_mib.is_empty() {
        sizes_mib = vec![64, 256];
    }
    if iters == 0 {
        return Err("--iters must be at least 1".into());
    }
    Ok(Args { sizes_mib, iters })
}

fn gbps(bytes: usize, iters: usize, secs: f64) -> f64 {
    (bytes * iters) as f64 / secs / 1e9
}

/// Fills `buf` so that every page is touched before timing.
fn touch(buf: &mut [u8], seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

fn memcpy_gbps(size: usize, iters: usize) -> f64 {
    let mut src = vec![0u8; size];
    let mut dst = vec![0u8; size];
    touch(&mut src, 1);
    touch(&mut dst, 2);
    dst.copy_from_slice(&src);
    let started = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    gbps(size, iters, started.elapsed().as_secs_f64())
}

fn run_rank(world: World, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = || Deadline::after(Duration::from_secs(300));
    let store = StoreClient::connect(&world, deadline())?;
    let g = HostGroup::world(&store, deadline())?;
    if g.size() != 2 {
        return Err(format!("host_bw needs exactly 2 ranks, got {}", g.size()).into());
    }
    let me = g.rank();
    let peer = 1 - me;
    let mut results = Vec::new();
    for &mib in &args.sizes_mib {
        let size = mib << 20;
        let mut send = vec![0u8; size];
        let mut recv = vec![0u8; size];
        touch(&mut send, me as u8);
        touch(&mut recv, 9);

        // Warm-up in both directions (connections, socket buffers, page tables).
        g.send_recv(peer, &send, peer, &mut recv, deadline())?;

        // One way: rank 0 sends `iters` messages, rank 1 receives them into its buffer and
        // acknowledges the last one.
        g.barrier(deadline())?;
        let started = Instant::now();
        if me == 0 {
            for _ in 0..args.iters {
                g.send(1, &send, deadline())?;
            }
            g.recv(1, deadline())?;
        } else {
            for _ in 0..args.iters {
                g.recv_into(0, &mut recv, deadline())?;
            }
            g.send(0, b"done", deadline())?;
        }
        let one_way = started.elapsed().as_secs_f64();

        // Both ways at once.
        g.barrier(deadline())?;
        let started = Instant::now();
        for _ in 0..args.iters {
            g.send_recv(peer, &send, peer, &mut recv, deadline())?;
        }
        let mut both = [started.elapsed().as_secs_f64()];
        g.all_reduce(&mut both, ReduceOp::Max, deadline())?;
        if recv.first() != Some(&(peer as u8)) {
            return Err("received bytes are not the peer's".into());
        }

        // A memcpy of the same size on rank 0 while rank 1 waits.
        g.barrier(deadline())?;
        let memcpy = if me == 0 {
            memcpy_gbps(size, args.iters)
        } else {
            0.0
        };
        g.barrier(deadline())?;

        let one_way_gbps = gbps(size, args.iters, one_way);
        let both_dir = gbps(size, args.iters, both[0]);
        results.push(format!(
            "{{\"size_bytes\":{size},\"one_way_gbps\":{one_way_gbps:.3},\"both_ways_gbps_per_direction\":{both_dir:.3},\"both_ways_gbps_total\":{:.3},\"memcpy_gbps\":{memcpy:.3},\"one_way_vs_memcpy\":{:.3},\"both_ways_total_vs_memcpy\":{:.3}}}",
            2.0 * both_dir,
            one_way_gbps / memcpy.max(f64::MIN_POSITIVE),
            2.0 * both_dir / memcpy.max(f64::MIN_POSITIVE),
        ));
    }
    if me == 0 {
        println!(
            "{{\"bench\":\"host_bw\",\"ranks\":2,\"iters\":{},\"cpus\":{},\"results\":[{}]}}",
            args.iters,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            results.join(",")
        );
    }
    g.barrier(deadline())?;
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("host_bw: {e}");
            std::process::exit(2);
        }
    };
    if std::env::var_os("RANK").is_none() {
        // Not under a launcher: start our own two ranks.
        let exe = std::env::current_exe().expect("path of this example");
        let outcome = Launcher::new(2, exe)
            .args(std::env::args_os().skip(1))
            .timeout(Duration::from_secs(600))
            .output(OutputMode::Capture)
            .run()
            .expect("launch two ranks");
        // Rank 0's stdout is the JSON result: print it as is; everything else to stderr.
        for r in &outcome.ranks {
            for line in &r.output {
                if r.rank == 0 && line.stream == Stream::Stdout {
                    println!("{}", line.text);
                } else {
                    eprintln!("[rank {}] {}", r.rank, line.text);
                }
            }
        }
        if !outcome.success() {
            eprint!("{}", outcome.summary());
        }
        std::process::exit(i32::from(outcome.exit_code()));
    }
    let world = World::from_env().expect("rank variables");
    if let Err(e) = run_rank(world, &args) {
        eprintln!("host_bw: {e}");
        std::process::exit(1);
    }
}
