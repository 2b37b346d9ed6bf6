//! `moeshift launch`: start N ranks of a command with torchrun-style variables.
use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use moeshift_device_comm::launch::StopReason;
use moeshift_device_comm::Launcher;

/// Arguments of `moeshift launch`.
#[derive(clap::Args)]
#[command(
    after_help = "Each rank gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, \
MASTER_PORT and NCCL_NVLS_ENABLE=0. Output lines are prefixed with `[rank K] `. On the first \
failing rank the others get SIGTERM, then SIGKILL after the grace period. The exit code is 0 \
when every rank exits 0, else the failed rank's code (128+signal when killed), 124 on timeout."
)]
pub struct LaunchArgs {
    /// Number of ranks to start.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    nproc: u32,
    /// MASTER_PORT for the rendezvous store (default: a free port).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    master_port: Option<u16>,
    /// Stop every rank after this many seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL when stopping ranks.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    grace: f64,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<OsString>,
}

fn seconds(what: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{what} must be a positive number of seconds, not {secs}"))
}

/// Runs `moeshift launch`.
pub fn run(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    let Some((program, rest)) = args.command.split_first() else {
        anyhow::bail!("no command given after `--`");
    };
    let mut launcher = Launcher::new(args.nproc as usize, program)
        .args(rest)
        .grace_period(seconds("grace", args.grace)?)
        .cancel_on_signals()
        .context("moeshift launch")?;
    if let Some(port) = args.master_port {
        launcher = launcher.master_port(port);
    }
    if let Some(t) = args.timeout {
        launcher = launcher.timeout(seconds("timeout", t)?);
    }
    let outcome = launcher
        .run()
        .with_context(|| format!("launching {} rank(s) of {program:?}", args.nproc))?;
    if !outcome.success() {
        eprint!("moeshift launch: {}", outcome.summary());
        if let Some(StopReason::RankFailed { rank, .. }) = outcome.stopped {
            if let Some(r) = outcome.ranks.get(rank) {
                if r.output.is_empty() {
                    eprintln!("moeshift launch: rank {rank} printed nothing");
                }
            }
        }
    }
    Ok(ExitCode::from(outcome.exit_code()))
}
