//! `moeshift bench eplb-comm` (arrives with the EPLB communicators).
use std::process::ExitCode;

/// Arguments of `moeshift bench eplb-comm`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the benchmark.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("moeshift bench eplb-comm is not available yet")
}
