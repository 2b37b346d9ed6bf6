//! `moeshift launch` (filled in with the device-comm crate).
use std::process::ExitCode;

/// Arguments of `moeshift launch`.
#[derive(clap::Args)]
pub struct LaunchArgs {}

/// Runs `moeshift launch`.
pub fn run(_args: LaunchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("moeshift launch is not implemented yet")
}
