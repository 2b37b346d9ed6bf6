//! `cargo xtask test-multigpu`: a self-contained folder for GPU machines.
//!
//! A GPU machine that has CUDA, NCCL and Python but no Rust toolchain and no network gets one
//! folder, `target/gpu-bundle`, holding everything it needs:
//!
//! - `bin/moeshift`, built with CUDA/NCCL support (libraries are loaded at run time);
//! - `tests/*`: the GPU test executables (names containing `gpu`, and the unit tests of the
//!   crates in `GPU_UNIT_TESTS` as `<crate>_lib_gpu`, of which only the `gpu_` tests run),
//!   release-built with all features, or every test executable with `--all-tests`;
//!   `run.sh gpu` runs the GPU ones, `run.sh all` every one in the bundle, `run.sh shared`
//!   the GPU tests and the multi-rank programs as 2 (or `MOESHIFT_GPU_RANKS`) ranks even on
//!   one GPU;
//! - `examples/*`: benchmark programs, run by `run.sh bench`;
//! - `nixl-runtime.tar.xz`: the NIXL runtime files, unpacked by `run.sh` at start;
//! - `torch_peer_baseline.py` and `bench/*.py`: the PyTorch peers measured beside moeshift's
//!   own figures;
//! - `run.sh`: the entry point (copied from `xtask/gpu/run.sh`).

use crate::{setup, util};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn test_multigpu(rest: &[String]) -> Result<()> {
    let mut bundle_only = false;
    let mut all_tests = false;
    let mut out: Option<PathBuf> = None;
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bundle-only" => bundle_only = true,
            "--all-tests" => all_tests = true,
            "--out" => out = Some(it.next().context("--out takes a folder")?.into()),
            other => bail!("unknown option `{other}` (see `cargo xtask help`)"),
        }
    }
    setup::setup()?;
    let dir = out.unwrap_or_else(|| util::root().join("target").join("gpu-bundle"));
    build_bundle(&dir, all_tests)?;
    if bundle_only {
        return Ok(());
    }
    let gpus = Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .map(|o| o.status.success() && !o.stdout.is_empty())
        .unwrap_or(false);
    if !gpus {
        println!(
            "no GPU visible here (nvidia-smi -L); copy {} to a GPU machine and run `bash run.sh`",
            dir.display()
        );
        return Ok(());
    }
    util::run(
        Command::new("bash")
            .arg(dir.join("run.sh"))
            .arg("gpu+bench"),
    )
}

/// Crates whose unit tests include GPU tests (named `gpu_…`): their unit-test executable goes
/// in as `<crate>_lib_gpu`.
const GPU_UNIT_TESTS: [&str; 1] = ["moeshift_device_comm"];

/// Builds the bundle. Only the GPU test executables (names containing `gpu`) go in unless
/// `all_tests`: every test executable together is larger than a GPU machine's upload limit.
fn build_bundle(dir: &Path, all_tests: bool) -> Result<()> {
    let profile = "gpu";
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    for sub in ["bin", "tests", "examples"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let root = util::root();
    let target = root.join("target").join(profile);

    util::run(util::cargo().args([
        "build",
        "--profile",
        profile,
        "--all-features",
        "-p",
        "moeshift-cli",
    ]))?;
    copy(&target.join("moeshift"), &dir.join("bin/moeshift"))?;

    for exe in util::test_executables(&["--workspace", "--all-features"], Some(profile))? {
        let name = exe.file_name().context("test executable without a name")?;
        let name = name.to_string_lossy();
        if all_tests || name.contains("gpu") {
            copy(&exe, &dir.join("tests").join(&*name))?;
        } else if let Some(lib) = GPU_UNIT_TESTS
            .iter()
            .find(|lib| name.strip_prefix(**lib).is_some_and(|h| h.starts_with('-')))
        {
            // `run.sh` runs only its `gpu_` tests.
            copy(&exe, &dir.join("tests").join(format!("{lib}_lib_gpu")))?;
        }
    }

    util::run(util::cargo().args([
        "build",
        "--profile",
        profile,
        "--all-features",
        "--workspace",
        "--examples",
    ]))?;
    let examples = target.join("examples");
    if examples.is_dir() {
        for e in std::fs::read_dir(&examples)?.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            // Skip cargo's hashed duplicates and dependency files; keep the plain executables.
            if p.is_file() && !name.contains('-') && !name.contains('.') {
                copy(&p, &dir.join("examples").join(&name))?;
            }
        }
    }

    let nixl = setup::nixl_root();
    util::run(
        Command::new("tar")
            .arg("-C")
            .arg(&nixl)
            .args(["-cJf"])
            .arg(dir.join("nixl-runtime.tar.xz"))
            .args([".nixl_cu13.mesonpy.libs", "nixl_cu13.libs"]),
    )?;

    let baseline = root.join("../shared/bench/torch_peer_baseline.py");
    if baseline.exists() {
        copy(&baseline, &dir.join("torch_peer_baseline.py"))?;
    } else {
        eprintln!(
            "note: {} not found; run.sh bench will skip the PyTorch peer",
            baseline.display()
        );
    }
    // moeshift's own peer scripts (e.g. the all-to-all peer).
    let peers = root.join("bench");
    if peers.is_dir() {
        for e in std::fs::read_dir(&peers)?.flatten() {
            if e.path().extension().is_some_and(|x| x == "py") {
                copy(&e.path(), &dir.join(e.file_name()))?;
            }
        }
    }
    copy(&root.join("xtask/gpu/run.sh"), &dir.join("run.sh"))?;

    let size = dir_size(dir)?;
    println!(
        "bundle: {} ({:.1} MiB)",
        dir.display(),
        size as f64 / (1 << 20) as f64
    );
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        total += if p.is_dir() {
            dir_size(&p)?
        } else {
            e.metadata()?.len()
        };
    }
    Ok(total)
}
