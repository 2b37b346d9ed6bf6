//! Project automation for moeshift. Run `cargo xtask help`.
//!
//! Everything CI does goes through here, so that a developer's machine and CI run the same
//! steps: `setup` installs what the build and tests need (libclang for bindgen, the NIXL runtime
//! files from the `nixl-cu13` wheel), `test` runs every test, `lint` runs fmt/clippy/doc, `ci`
//! runs both, `test-multirank` runs the multi-process scenarios under `moeshift launch`, and
//! `test-multigpu` builds a self-contained folder of release binaries for a GPU machine.

mod bundle;
mod setup;
mod util;

use anyhow::{bail, Result};
use std::env;

const HELP: &str = "\
cargo xtask <command> [options]

Commands:
  setup                     Install what building and testing need (idempotent): libclang-dev
                            (apt, when root; otherwise prints the command) and the NIXL runtime
                            files from the nixl-cu13==1.5.1 wheel, unpacked into .deps/nixl.
  test                      setup, then every test of the workspace (all features), the loom
                            model checks of moeshift-sync, and the multi-process scenarios.
  lint                      cargo fmt --check, clippy -D warnings (all targets, all features),
                            cargo doc with warnings denied.
  ci                        lint, then test. This is what .ci/run runs.
  demo [ARGS...]            Build and run `moeshift demo` (release).
  test-multirank --ranks N  Build the workspace's test binaries and run the multi-process
                            scenarios (integration tests named rank_*) with N ranks under
                            `moeshift launch`: every generic one, and those named rank_..._N
                            only when N matches (they are written for N ranks). The GPU test
                            executables (*gpu*) are left to test-multigpu.
  test-multigpu [--bundle-only] [--all-tests] [--out DIR]
                            Build target/gpu-bundle: release test binaries, examples and the
                            moeshift binary built with CUDA/NCCL support, the NIXL runtime
                            (.tar.xz), the PyTorch peer baseline script and run.sh, a folder that
                            a GPU machine with no Rust toolchain and no network can run
                            (`bash run.sh [gpu|all|bench|gpu+bench|scale]`; `scale` runs the
                            expert-parallel stress and benchmarks on every visible GPU). When GPUs
                            are visible here (nvidia-smi -L), runs `gpu+bench` directly unless
                            --bundle-only.
  help                      This text.
";

fn main() -> Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => ("help", &[][..]),
    };
    match cmd {
        "setup" => setup::setup(),
        "test" => {
            setup::setup()?;
            test()
        }
        "lint" => lint(),
        "ci" => {
            lint()?;
            setup::setup()?;
            test()
        }
        "demo" => demo(rest),
        "test-multirank" => test_multirank(rest),
        "test-multigpu" => bundle::test_multigpu(rest),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        other => bail!("unknown xtask command `{other}`\n\n{HELP}"),
    }
}

/// Every test: the workspace with all features, then the loom models.
fn test() -> Result<()> {
    let root = util::root();
    let mut cmd = util::cargo();
    cmd.args(["test", "--workspace", "--all-features"]);
    // Multi-process scenarios start up to 8 ranks each; on small machines running many of them
    // at once only measures the scheduler. Two test threads keep every deadline meaningful.
    if std::env::var_os("RUST_TEST_THREADS").is_none() {
        cmd.env("RUST_TEST_THREADS", "2");
    }
    setup::nixl_env(&mut cmd);
    util::run(&mut cmd)?;

    // loom needs its own cfg, hence its own target dir so the main build is not invalidated.
    let mut loom = util::cargo();
    loom.args(["test", "-p", "moeshift-sync", "--test", "loom", "--release"])
        .env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", root.join("target").join("loom"));
    util::run(&mut loom)
}

fn lint() -> Result<()> {
    util::run(util::cargo().args(["fmt", "--all", "--", "--check"]))?;
    util::run(util::cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]))?;
    util::run(
        util::cargo()
            .args(["doc", "--workspace", "--no-deps", "--all-features"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )
}

fn demo(rest: &[String]) -> Result<()> {
    let mut cmd = util::cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "moeshift-cli",
        "--",
        "demo",
    ])
    .args(rest);
    setup::nixl_env(&mut cmd);
    util::run(&mut cmd)
}

/// Whether the test `name` is a multi-process scenario to run with `ranks` ranks: a test of an
/// integration-test file (not a unit test in a `tests` module) whose name starts with `rank_`.
/// A scenario whose name ends in `_N` (N a number) is written for exactly N ranks and runs only
/// when `ranks == N`; any other scenario must work for every rank count.
fn runs_at(name: &str, ranks: usize) -> bool {
    let last = name.rsplit("::").next().unwrap_or(name);
    if !last.starts_with("rank_") || name.contains("tests::") {
        return false;
    }
    match last.rsplit_once('_').map(|(_, n)| n.parse::<usize>()) {
        Some(Ok(n)) => n == ranks,
        _ => true,
    }
}

fn test_multirank(rest: &[String]) -> Result<()> {
    let ranks: usize = match rest {
        [flag, n] if flag == "--ranks" => n
            .parse()
            .map_err(|_| anyhow::anyhow!("--ranks takes a whole number, got `{n}`"))?,
        [] => 4,
        _ => bail!("usage: cargo xtask test-multirank --ranks N"),
    };
    if ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    util::run(util::cargo().args(["build", "-p", "moeshift-cli"]))?;
    let launcher = util::root().join("target/debug/moeshift");
    let exes = util::test_executables(&["--workspace", "--all-features"], None)?;
    let mut ran = 0usize;
    let mut failed = Vec::new();
    // GPU test executables (`*gpu*`) belong to `test-multigpu`, which runs them where GPUs are.
    for exe in exes.iter().filter(|e| {
        e.file_name()
            .is_some_and(|n| !n.to_string_lossy().contains("gpu"))
    }) {
        for name in util::list_tests(exe)?
            .into_iter()
            .filter(|n| runs_at(n, ranks))
        {
            println!("==> {ranks} ranks: {} {name}", exe.display());
            let mut cmd = std::process::Command::new(&launcher);
            cmd.args([
                "launch",
                "--nproc",
                &ranks.to_string(),
                "--timeout",
                "300",
                "--",
            ])
            .arg(exe)
            .args(["--exact", &name, "--nocapture", "--test-threads=1"]);
            setup::nixl_env(&mut cmd);
            ran += 1;
            if util::run(&mut cmd).is_err() {
                failed.push(name);
            }
        }
    }
    let passed = ran - failed.len();
    println!(
        "multirank ({ranks} ranks): {passed} passed, {} failed",
        failed.len()
    );
    if !failed.is_empty() {
        bail!("failed scenarios: {}", failed.join(", "));
    }
    if ran == 0 {
        bail!("no rank_* scenario found in the workspace's test binaries");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::runs_at;

    #[test]
    fn scenario_selection() {
        assert!(runs_at("rank_store_ops_8", 8));
        assert!(!runs_at("rank_store_ops_8", 4));
        assert!(runs_at("rank_rebalance_cycle_moves_every_row_it_plans", 3));
        assert!(runs_at("module::rank_nccl_p2p", 8));
        assert!(!runs_at("world::tests::rank_must_be_below_world_size", 8));
        assert!(!runs_at("store_roundtrip", 2));
        assert!(!runs_at("kill_rank_mid_collective", 2));
    }
}
