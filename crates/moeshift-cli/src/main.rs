//! The `moeshift` command: `plan`, `launch`, `demo`, `bench`.

mod bench;
mod demo;
mod launch;
mod pattern;
mod plan;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Expert-parallel infrastructure for Mixture-of-Experts models.
#[derive(Parser)]
#[command(name = "moeshift", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compute an expert placement from a load file and print it (JSON or a table).
    Plan(plan::PlanArgs),
    /// Start N ranks of a command with torchrun-style environment variables.
    Launch(launch::LaunchArgs),
    /// Rebalance drifting expert loads across real processes, moving and verifying every row.
    Demo(demo::DemoArgs),
    /// Run a benchmark; rank 0 prints one JSON object.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => plan::run(args),
        Command::Launch(args) => launch::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("moeshift: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
