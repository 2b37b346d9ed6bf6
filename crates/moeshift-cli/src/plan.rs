//! `moeshift plan` (filled in with the placement crate).
use std::process::ExitCode;

/// Arguments of `moeshift plan`.
#[derive(clap::Args)]
pub struct PlanArgs {}

/// Runs `moeshift plan`.
pub fn run(_args: PlanArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("moeshift plan is not implemented yet")
}
