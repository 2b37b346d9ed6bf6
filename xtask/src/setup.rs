//! `cargo xtask setup`: libclang for bindgen, and the NIXL runtime files.

use crate::util;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The NIXL wheel whose shared libraries moeshift loads at run time.
pub const NIXL_WHEEL: &str = "nixl-cu13==1.5.1";

/// Where the unpacked NIXL runtime lives: `<root>/.deps/nixl`.
pub fn nixl_root() -> PathBuf {
    util::root().join(".deps").join("nixl")
}

/// The folder holding `libnixl_capi.so` (the wheel's `.nixl_cu13.mesonpy.libs`).
pub fn nixl_lib_dir() -> PathBuf {
    nixl_root().join(".nixl_cu13.mesonpy.libs")
}

/// Points a command at the unpacked NIXL runtime, when it exists.
pub fn nixl_env(cmd: &mut Command) {
    let dir = nixl_lib_dir();
    if dir.join("libnixl_capi.so").exists() {
        cmd.env("MOESHIFT_NIXL_LIB_DIR", &dir);
        cmd.env("NIXL_PLUGIN_DIR", dir.join("plugins"));
    }
}

pub fn setup() -> Result<()> {
    ensure_libclang()?;
    ensure_nixl()?;
    Ok(())
}

fn libclang_present() -> bool {
    let from_ldconfig = Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| is_libclang_name(l.trim_start().split(' ').next().unwrap_or("")))
        })
        .unwrap_or(false);
    if from_ldconfig {
        return true;
    }
    // Debian puts the unversioned library under /usr/lib/llvm-N/lib.
    std::fs::read_dir("/usr/lib")
        .map(|entries| {
            entries.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with("llvm-")
                    && e.path().join("lib/libclang.so").exists()
            })
        })
        .unwrap_or(false)
}

/// `libclang.so`, `libclang.so.N` or `libclang-N.so…`, but not `libclang-cpp` (a different
/// library that Debian installs without libclang itself).
fn is_libclang_name(name: &str) -> bool {
    name.starts_with("libclang.so")
        || name
            .strip_prefix("libclang-")
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn ensure_libclang() -> Result<()> {
    if libclang_present() {
        return Ok(());
    }
    let install = "apt-get update && apt-get install -y --no-install-recommends libclang-dev";
    if !is_root() {
        bail!(
            "libclang is missing (bindgen needs it to build nixl-sys); run as root:\n  {install}"
        );
    }
    eprintln!("setup: installing libclang-dev");
    util::run(
        Command::new("sh")
            .args(["-c", install])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    if !libclang_present() {
        bail!("libclang-dev was installed but libclang.so is still not found");
    }
    Ok(())
}

fn ensure_nixl() -> Result<()> {
    let root = nixl_root();
    let marker = root.join(".complete");
    if std::fs::read_to_string(&marker).is_ok_and(|s| s.trim() == NIXL_WHEEL) {
        return Ok(());
    }
    let wheels = util::root().join(".deps").join("wheel");
    std::fs::create_dir_all(&wheels)?;
    eprintln!("setup: downloading {NIXL_WHEEL}");
    util::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
            ])
            .arg(NIXL_WHEEL)
            .arg("-d")
            .arg(&wheels),
    )
    .context("downloading the NIXL wheel with pip (python3 -m pip) failed")?;
    let wheel = std::fs::read_dir(&wheels)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("nixl_cu13-1.5.1-"))
        })
        .context("pip reported success but no nixl_cu13-1.5.1 wheel is in .deps/wheel")?;
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&root)?;
    unpack_runtime(&wheel, &root)?;
    if !nixl_lib_dir().join("libnixl_capi.so").exists() {
        bail!("the NIXL wheel did not contain .nixl_cu13.mesonpy.libs/libnixl_capi.so");
    }
    std::fs::write(&marker, NIXL_WHEEL)?;
    eprintln!("setup: NIXL runtime in {}", root.display());
    Ok(())
}

/// Unpacks the runtime closure: the two `.libs` folders side by side (their RPATHs are
/// `$ORIGIN`-relative), only the UCX plugin, and no InfiniBand UCX modules (with system ibverbs
/// providers present, two libnl copies make NIXL processes crash at exit).
fn unpack_runtime(wheel: &Path, dest: &Path) -> Result<()> {
    const SCRIPT: &str = r#"
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        top = name.split('/', 1)[0]
        if top not in ('.nixl_cu13.mesonpy.libs', 'nixl_cu13.libs') or name.endswith('/'):
            continue
        base = os.path.basename(name)
        if '/plugins/' in name and base != 'libplugin_UCX.so':
            continue
        if '/ucx/' in name and base.startswith('libuct_ib'):
            continue
        z.extract(info, dest)
        os.chmod(os.path.join(dest, name), 0o755)
        n += 1
# Keep only what the C API, the UCX plugin and UCX's transport modules need (readelf NEEDED
# closure); the wheel also carries storage plugins (S3, Azure, GDS, ...) moeshift never loads.
import glob, subprocess, shutil
if shutil.which('readelf'):
    libs = [p for p in glob.glob(os.path.join(dest, '**', '*.so*'), recursive=True)]
    libs += glob.glob(os.path.join(dest, '.*', '**', '*.so*'), recursive=True)
    by_name = {os.path.basename(p): p for p in libs}
    roots = [p for p in by_name.values()
             if p.endswith('/libnixl_capi.so') or p.endswith('/libplugin_UCX.so') or '/ucx/' in p]
    keep, stack = set(), list(roots)
    while stack:
        p = stack.pop()
        if p in keep:
            continue
        keep.add(p)
        out = subprocess.run(['readelf', '-d', p], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if '(NEEDED)' in line:
                dep = line.split('[', 1)[1].split(']', 1)[0]
                if dep in by_name:
                    stack.append(by_name[dep])
    for p in set(by_name.values()) - keep:
        os.remove(p)
        n -= 1
print(f"unpacked {n} files")
"#;
    util::run(
        Command::new("python3")
            .args(["-c", SCRIPT])
            .arg(wheel)
            .arg(dest),
    )
}

#[cfg(test)]
mod tests {
    use super::is_libclang_name;

    #[test]
    fn libclang_names() {
        assert!(is_libclang_name("libclang.so"));
        assert!(is_libclang_name("libclang.so.1"));
        assert!(is_libclang_name("libclang-14.so.14.0.6"));
        assert!(!is_libclang_name("libclang-cpp.so.14"));
        assert!(!is_libclang_name("libclangBasic.a"));
    }
}
