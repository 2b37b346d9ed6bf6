//! Run-time probe: is there a CUDA driver and a usable NCCL library in this process?
//!
//! cudarc loads `libcuda` and `libnccl` on first use and *panics* when either is missing, so
//! every entry point of this module calls [`nccl_available`] first and turns "absent" into a
//! typed [`NcclError`].

use std::env;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::result;
use super::{NcclError, NcclVersion};

/// The oldest NCCL this module supports: `ncclCommInitRankConfig` with a sized, versioned config
/// (non-blocking communicators), `ncclCommFinalize` and `ncclGetLastError` exist from 2.14;
/// `ncclCommSplit` and the config's `splitShare` (the shared data communicator) from 2.18.
pub const MIN_NCCL_VERSION: NcclVersion = NcclVersion::new(2, 18, 0);

/// The file name NCCL actually installs as its soname, which cudarc never tries.
const NCCL_SONAME: &str = "libnccl.so.2";
/// The unversioned name cudarc tries first.
const NCCL_DEV_NAME: &str = "libnccl.so";

/// Checks that the CUDA driver and NCCL libraries can be loaded and that NCCL is recent enough;
/// returns the NCCL version.
///
/// Never panics: a missing driver gives [`NcclError::DriverMissing`], a missing NCCL gives
/// [`NcclError::LibraryMissing`] whose hint explains the `libnccl.so.2`-only case (NCCL's pip
/// wheel ships only `libnccl.so.2`, which cudarc does not look for; put a `libnccl.so` symlink
/// to it in a directory on `LD_LIBRARY_PATH`).
///
/// ```
/// use moeshift_device_comm::nccl::nccl_available;
///
/// match nccl_available() {
///     Ok(version) => println!("NCCL {version}"),
///     Err(err) => println!("no NCCL here: {err}"),
/// }
/// ```
pub fn nccl_available() -> Result<NcclVersion, NcclError> {
    static FOUND: OnceLock<NcclVersion> = OnceLock::new();
    if let Some(version) = FOUND.get() {
        return Ok(*version);
    }
    // SAFETY: `is_culib_present` only tries `dlopen` on a list of library names and returns
    // whether one succeeded; it has no preconditions and does not panic.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(NcclError::DriverMissing);
    }
    // SAFETY: as above, for the NCCL library names.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(NcclError::LibraryMissing {
            hint: missing_library_hint(&library_search_dirs()),
        });
    }
    let version = result::version().map_err(|e| e.into_error(None, Vec::new(), String::new()))?;
    if version < MIN_NCCL_VERSION {
        return Err(NcclError::UnsupportedVersion {
            found: version,
            required: MIN_NCCL_VERSION,
        });
    }
    Ok(*FOUND.get_or_init(|| version))
}

/// The hint of [`NcclError::LibraryMissing`], given the directories to look in.
pub(crate) fn missing_library_hint(dirs: &[PathBuf]) -> String {
    let tried = "cudarc looks for libnccl.so, then libnccl.so.<N> for N in 13, 12, 11, 10, 9 and \
                 1, but never libnccl.so.2 (NCCL's own soname)";
    match find_soname_only(dirs) {
        Some(found) => {
            let dir = found.parent().unwrap_or(Path::new("."));
            format!(
                "{tried}; only {} was found. Fix: create a symlink named libnccl.so pointing to \
                 it in a directory on LD_LIBRARY_PATH, e.g. `mkdir -p /tmp/nccl-lib && ln -sf {} \
                 /tmp/nccl-lib/libnccl.so && export LD_LIBRARY_PATH=/tmp/nccl-lib:$LD_LIBRARY_PATH` \
                 (or put the link in {})",
                found.display(),
                found.display(),
                dir.display()
            )
        }
        None => format!(
            "{tried}; none was found on LD_LIBRARY_PATH or in the system library directories. \
             Install NCCL (e.g. the libnccl2 + libnccl-dev packages, or the nvidia-nccl-cu13 \
             wheel plus a libnccl.so symlink) and put its directory on LD_LIBRARY_PATH"
        ),
    }
}

/// The first `libnccl.so.2` in `dirs` that has no `libnccl.so` beside it.
pub(crate) fn find_soname_only(dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter()
        .filter(|dir| !dir.join(NCCL_DEV_NAME).exists())
        .map(|dir| dir.join(NCCL_SONAME))
        .find(|candidate| candidate.exists())
}

/// Where the dynamic loader (and common NCCL installs) put libraries: `LD_LIBRARY_PATH`,
/// `NCCL_HOME`/`NCCL_ROOT`/`CUDA_HOME` lib folders, the directories named in
/// `/etc/ld.so.conf.d/*.conf`, then the usual system directories.
fn library_search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(paths) = env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    for var in ["NCCL_HOME", "NCCL_ROOT", "CUDA_HOME"] {
        if let Some(root) = env::var_os(var) {
            dirs.push(PathBuf::from(&root).join("lib"));
            dirs.push(PathBuf::from(&root).join("lib64"));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/etc/ld.so.conf.d") {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "conf") {
                if let Ok(text) = std::fs::read_to_string(entry.path()) {
                    dirs.extend(parse_ld_conf(&text));
                }
            }
        }
    }
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/lib64",
        "/lib",
        "/usr/local/lib",
        "/usr/local/cuda/lib64",
    ] {
        dirs.push(PathBuf::from(dir));
    }
    dirs
}

/// The absolute directories listed in an `ld.so.conf` fragment (comments and `include` lines
/// are skipped).
fn parse_ld_conf(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| line.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A fresh empty directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let path = env::temp_dir().join(format!(
                "moeshift-nccl-probe-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn probe_returns_a_typed_answer_without_panicking() {
        match nccl_available() {
            Ok(version) => assert!(version >= MIN_NCCL_VERSION, "{version}"),
            Err(err) => {
                assert!(err.is_unavailable(), "unexpected probe error: {err}");
                assert!(!err.to_string().is_empty());
            }
        }
    }

    #[test]
    fn soname_only_directory_is_reported_with_the_symlink_fix() {
        let wheel = TempDir::new("wheel");
        fs::write(wheel.0.join("libnccl.so.2"), b"").expect("write");
        let empty = TempDir::new("empty");
        let dirs = vec![empty.0.clone(), wheel.0.clone()];

        let found = find_soname_only(&dirs).expect("libnccl.so.2 must be found");
        assert_eq!(found, wheel.0.join("libnccl.so.2"));

        let hint = missing_library_hint(&dirs);
        assert!(hint.contains("never libnccl.so.2"), "{hint}");
        assert!(hint.contains(&found.display().to_string()), "{hint}");
        assert!(hint.contains("symlink named libnccl.so"), "{hint}");
        assert!(hint.contains("LD_LIBRARY_PATH"), "{hint}");
    }

    #[test]
    fn directory_with_the_dev_symlink_is_not_reported() {
        let dev = TempDir::new("dev");
        fs::write(dev.0.join("libnccl.so.2"), b"").expect("write");
        fs::write(dev.0.join("libnccl.so"), b"").expect("write");
        assert_eq!(find_soname_only(std::slice::from_ref(&dev.0)), None);
        let hint = missing_library_hint(std::slice::from_ref(&dev.0));
        assert!(hint.contains("none was found"), "{hint}");
    }

    #[test]
    fn ld_conf_fragments_yield_absolute_directories_only() {
        let text =
            "# comment\n/usr/local/nccl/lib\ninclude /etc/other.conf\n  /opt/x/lib # tail\n\n";
        assert_eq!(
            parse_ld_conf(text),
            vec![
                PathBuf::from("/usr/local/nccl/lib"),
                PathBuf::from("/opt/x/lib")
            ]
        );
    }
}
