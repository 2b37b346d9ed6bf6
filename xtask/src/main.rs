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
  test-multirank --ranks N  Build the workspace's test binaries and run every multi-process
                            scenario (tests named rank_*) with N ranks under `moeshift launch`.
  test-multigpu [--bundle-only] [--all-tests] [--out DIR]
                            Build target/gpu-bundle: release test binaries, examples and the
                            moeshift binary built with CUDA/NCCL support, the NIXL runtime
                            (.tar.xz), the PyTorch peer baseline script and run.sh, a folder that
                            a GPU machine with no Rust toolchain and no network can run
                            (`bash run.sh [gpu|all|bench|gpu+bench]`). When GPUs are visible here
                            (nvidia-smi -L), runs `gpu+bench` directly unless --bundle-only.
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
    for exe in &exes {
        for name in util::list_tests(exe)?.into_iter().filter(|n| {
            n.rsplit("::")
                .next()
                .is_some_and(|last| last.starts_with("rank_"))
        }) {
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
