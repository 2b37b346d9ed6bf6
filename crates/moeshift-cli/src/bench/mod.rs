//! `moeshift bench`: benchmarks that print one JSON object on rank 0.

mod eplb_comm;
mod weight_sync;

use std::process::ExitCode;

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
