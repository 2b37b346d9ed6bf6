//! `moeshift bench weight-sync` (arrives with the weight-transfer engines).
use std::process::ExitCode;

/// Arguments of `moeshift bench weight-sync`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the benchmark.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("moeshift bench weight-sync is not available yet")
}
