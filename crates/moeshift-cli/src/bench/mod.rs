//! `moeshift bench`: benchmarks that print one JSON object on rank 0.

mod eplb_comm;
mod weight_sync;

use std::process::ExitCode;

use anyhow::Context;
use moeshift_device_comm::{testing, World};

/// Arguments of `moeshift bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(clap::Subcommand)]
enum Which {
    /// Move random layer plans through an EPLB communicator (run under `moeshift launch`).
    EplbComm(eplb_comm::Args),
    /// Push weights from a trainer (rank 0) into workers (run under `moeshift launch`).
    WeightSync(weight_sync::Args),
}

/// Runs `moeshift bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.which {
        Which::EplbComm(a) => eplb_comm::run(a),
        Which::WeightSync(a) => weight_sync::run(a),
    }
}

/// This rank's GPU: `LOCAL_RANK` modulo the visible GPUs. With `share` (`--share-gpus`) the
/// ranks may outnumber the GPUs: they share them round robin and NCCL treats every rank as a
/// host of its own, carrying their traffic over loopback sockets ([`testing::share_gpus`]).
/// That checks multi-rank paths on fewer GPUs; its timings are not bandwidth figures. Call it
/// once per rank, before NCCL is used.
fn rank_gpu(world: &World, share: bool) -> anyhow::Result<usize> {
    let gpus = moeshift_tensor::cuda_available().context("a CUDA benchmark needs a GPU")?;
    if share {
        return Ok(testing::share_gpus(world, gpus));
    }
    Ok(world.local_rank() % gpus.max(1))
}
