//! Finding and loading the NIXL runtime without ever letting it abort the process.
//!
//! `nixl-sys` is built with its `stub-api` feature: every NIXL call goes through a shim that
//! `dlopen`s `libnixl_capi.so` on first use and calls `abort()` when the library (or one
//! symbol) is missing. So no `nixl-sys` function may run before this module has loaded the
//! library itself and found every symbol the backend calls. Once loaded here (by absolute
//! path, handle kept for the life of the process), the shim's own
//! `dlopen("libnixl_capi.so")` finds the same library by its soname, with no
//! `LD_LIBRARY_PATH`.
//!
//! Where the library is looked for:
//! * `MOESHIFT_NIXL_LIB_DIR` set (non-empty): only `<dir>/libnixl_capi.so`. An explicit
//!   directory is authoritative, so a configured runtime is never silently swapped for
//!   another one found elsewhere;
//! * otherwise: the dynamic loader's default search (`LD_LIBRARY_PATH`, the loader cache,
//!   system directories).
//!
//! NIXL finds its transport plugins through `NIXL_PLUGIN_DIR`. When that variable is unset
//! and the library came from a known directory with a `plugins` folder (the layout of the
//! `nixl-cu13` wheel), [`probe`] sets it to that folder before any agent exists.
//!
//! UCX's InfiniBand modules (`ucx/libuct_ib*`, next to the library folder in the wheel's
//! layout) make every NIXL process crash at exit when the system's ibverbs providers are
//! installed (two copies of libnl), and they serve no purpose without RDMA devices. When
//! the runtime ships them, the machine has no RDMA device (`/sys/class/infiniband` is empty)
//! and `UCX_MODULES` is unset, [`probe`] sets `UCX_MODULES=^ib`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::error::NixlError;

/// Variable naming the directory that holds `libnixl_capi.so`.
pub const ENV_LIB_DIR: &str = "MOESHIFT_NIXL_LIB_DIR";
/// Variable NIXL reads to find its plugins (`libplugin_UCX.so`).
pub const ENV_PLUGIN_DIR: &str = "NIXL_PLUGIN_DIR";
/// File name (and soname) of NIXL's C API library.
pub const LIBRARY: &str = "libnixl_capi.so";
/// Variable selecting UCX's loadable modules.
pub const ENV_UCX_MODULES: &str = "UCX_MODULES";
/// Where the kernel lists RDMA devices.
const RDMA_DEVICES: &str = "/sys/class/infiniband";

/// Every C API function that `nixl-sys` calls on the paths this backend uses. The stub
/// resolves each lazily and aborts on a missing one, so all are checked up front.
const REQUIRED_SYMBOLS: &[&str] = &[
    "nixl_capi_is_stub",
    "nixl_capi_create_agent",
    "nixl_capi_destroy_agent",
    "nixl_capi_get_plugin_params",
    "nixl_capi_destroy_mem_list",
    "nixl_capi_params_add",
    "nixl_capi_params_create_iterator",
    "nixl_capi_params_iterator_next",
    "nixl_capi_params_destroy_iterator",
    "nixl_capi_create_params",
    "nixl_capi_destroy_params",
    "nixl_capi_create_backend",
    "nixl_capi_destroy_backend",
    "nixl_capi_create_opt_args",
    "nixl_capi_destroy_opt_args",
    "nixl_capi_opt_args_set_custom_param",
    "nixl_capi_create_reg_dlist",
    "nixl_capi_reg_dlist_add_desc",
    "nixl_capi_reg_dlist_clear",
    "nixl_capi_destroy_reg_dlist",
    "nixl_capi_register_mem",
    "nixl_capi_deregister_mem",
    "nixl_capi_get_local_md",
    "nixl_capi_load_remote_md",
    "nixl_capi_invalidate_remote_md",
    "nixl_capi_agent_make_connection",
    "nixl_capi_create_xfer_dlist",
    "nixl_capi_xfer_dlist_add_desc",
    "nixl_capi_xfer_dlist_clear",
    "nixl_capi_destroy_xfer_dlist",
    "nixl_capi_create_xfer_req",
    "nixl_capi_post_xfer_req",
    "nixl_capi_get_xfer_status",
    "nixl_capi_release_xfer_req",
    "nixl_capi_destroy_xfer_req",
];

/// Proof that the NIXL runtime is loaded, and where it came from. Only [`probe`] makes one;
/// the backend asks for it before its first NIXL call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixlRuntime {
    library: PathBuf,
    lib_dir: Option<PathBuf>,
    plugin_dir: Option<PathBuf>,
    rdma: bool,
}

impl NixlRuntime {
    /// The library loaded: an absolute path when it came from `MOESHIFT_NIXL_LIB_DIR`, the
    /// bare file name when the default loader search found it.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// The directory given by `MOESHIFT_NIXL_LIB_DIR`, if the library came from there.
    pub fn lib_dir(&self) -> Option<&Path> {
        self.lib_dir.as_deref()
    }

    /// Where NIXL looks for plugins: `NIXL_PLUGIN_DIR` as found, or as [`probe`] set it.
    /// `None` when it is unset and no candidate folder exists (NIXL then uses its built-in
    /// default).
    pub fn plugin_dir(&self) -> Option<&Path> {
        self.plugin_dir.as_deref()
    }

    /// True when UCX may move data over RDMA here: the machine has RDMA devices, the runtime
    /// ships UCX's InfiniBand modules (or comes from the system, where that cannot be told)
    /// and `UCX_MODULES` does not leave them out. Without RDMA, CUDA weights can only be
    /// READ by peers on the node through CUDA IPC.
    pub fn rdma_possible(&self) -> bool {
        self.rdma
    }
}

/// What the process-wide probe found. The error is kept as text so the result can be
/// cached and handed out again.
static PROBED: OnceLock<Result<NixlRuntime, String>> = OnceLock::new();

/// Loads the NIXL runtime once per process and returns where it came from, or why it is
/// not usable. Later calls return the first answer. Never aborts: a missing library, a
/// file that is not a loadable library and a library lacking a needed symbol are all
/// [`NixlError::Unavailable`].
///
/// On success the library stays loaded for the rest of the process, `NIXL_PLUGIN_DIR` is
/// set to `<lib dir>/plugins` when it was unset and that folder exists, and `UCX_MODULES`
/// to `^ib` when the runtime ships UCX's InfiniBand modules, the machine has no RDMA
/// device and `UCX_MODULES` is unset (they crash NIXL processes at exit when the system's
/// ibverbs providers are installed). Call it early (before threads that read the
/// environment start), as with any change of the environment.
pub fn probe() -> Result<NixlRuntime, NixlError> {
    PROBED
        .get_or_init(|| {
            let found = load_from_env(|key| std::env::var_os(key))?;
            if let Some(dir) = &found.set_plugin_dir {
                std::env::set_var(ENV_PLUGIN_DIR, dir);
            }
            if found.disable_ib_modules {
                std::env::set_var(ENV_UCX_MODULES, "^ib");
            }
            Ok(found.runtime)
        })
        .clone()
        .map_err(|detail| NixlError::Unavailable { detail })
}

/// True when [`probe`] succeeds: `libnixl_capi.so` is loadable and complete. Cheap after
/// the first call. This is what default backend selection asks.
pub fn is_nixl_available() -> bool {
    probe().is_ok()
}

/// The result of one uncached load attempt.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) runtime: NixlRuntime,
    /// `NIXL_PLUGIN_DIR` should be set to this (it was unset and the folder exists).
    pub(crate) set_plugin_dir: Option<PathBuf>,
    /// `UCX_MODULES` should be set to `^ib` (see the module documentation).
    pub(crate) disable_ib_modules: bool,
}

/// Loads the library as the environment read through `lookup` says, without caching and
/// without changing the environment. On success the library handle is leaked on purpose:
/// the `nixl-sys` shim relies on the library staying loaded.
pub(crate) fn load_from_env(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Loaded, String> {
    let lib_dir = lookup(ENV_LIB_DIR)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    let library = match &lib_dir {
        Some(dir) => dir.join(LIBRARY),
        None => PathBuf::from(LIBRARY),
    };
    let where_from = match &lib_dir {
        Some(dir) => format!("{ENV_LIB_DIR}={}", dir.display()),
        None => format!("the default library search path ({ENV_LIB_DIR} is unset)"),
    };
    if let Some(dir) = &lib_dir {
        if !library.is_file() {
            return Err(format!(
                "{LIBRARY} is not in {} (from {where_from})",
                dir.display()
            ));
        }
    }
    let lib = load_library(&library, &where_from)?;
    // Keep the library loaded for the life of the process: the nixl-sys shim dlopens it by
    // soname later and must find this copy.
    std::mem::forget(lib);

    let preset = lookup(ENV_PLUGIN_DIR)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    let (plugin_dir, set_plugin_dir) = match (preset, &lib_dir) {
        (Some(dir), _) => (Some(dir), None),
        (None, Some(dir)) if dir.join("plugins").is_dir() => {
            let plugins = dir.join("plugins");
            (Some(plugins.clone()), Some(plugins))
        }
        (None, _) => (None, None),
    };
    let rdma_devices = has_rdma_devices(Path::new(RDMA_DEVICES));
    let ucx_modules = lookup(ENV_UCX_MODULES);
    let ib_shipped = lib_dir.as_deref().is_none_or(ships_ib_modules);
    let disable_ib_modules =
        ucx_modules.is_none() && lib_dir.as_deref().is_some_and(ships_ib_modules) && !rdma_devices;
    let rdma = rdma_devices
        && ib_shipped
        && ucx_modules
            .as_deref()
            .filter(|m| !m.is_empty())
            .is_none_or(|m| ib_modules_enabled(&m.to_string_lossy()));
    Ok(Loaded {
        runtime: NixlRuntime {
            library,
            lib_dir,
            plugin_dir,
            rdma,
        },
        set_plugin_dir,
        disable_ib_modules,
    })
}

/// True when a `ucx` folder next to `lib_dir` (a sibling folder's `ucx/`, as in the wheel)
/// holds UCX's InfiniBand transport modules.
fn ships_ib_modules(lib_dir: &Path) -> bool {
    let Some(parent) = lib_dir.parent() else {
        return false;
    };
    let Ok(siblings) = std::fs::read_dir(parent) else {
        return false;
    };
    siblings.flatten().any(|sibling| {
        std::fs::read_dir(sibling.path().join("ucx")).is_ok_and(|modules| {
            modules
                .flatten()
                .any(|m| m.file_name().to_string_lossy().starts_with("libuct_ib"))
        })
    })
}

/// True when a `UCX_MODULES` value leaves UCX's InfiniBand modules (`ib`) enabled: an
/// exclusion list (`^…`) without `ib`, or a list naming `ib`.
fn ib_modules_enabled(value: &str) -> bool {
    let value = value.trim();
    let (excluded, list) = match value.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let named = list.split(',').any(|m| m.trim().eq_ignore_ascii_case("ib"));
    named != excluded
}

/// True when `dir` (the kernel's RDMA device list) names at least one device.
fn has_rdma_devices(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut devices| devices.next().is_some())
}

/// Loads `library` and checks that it has every symbol in [`REQUIRED_SYMBOLS`].
/// `where_from` says how the path was chosen, for the error.
fn load_library(library: &Path, where_from: &str) -> Result<libloading::Library, String> {
    // SAFETY: loading a shared library runs its initialisers. The path names either the
    // `libnixl_capi.so` of the configured directory or the one the system loader resolves,
    // which is the library the nixl-sys shim would load itself; NIXL's initialisers only set
    // up the library's own state.
    let lib = unsafe { libloading::Library::new(library) }
        .map_err(|e| format!("cannot load {} (from {where_from}): {e}", library.display()))?;
    let missing: Vec<&str> = REQUIRED_SYMBOLS
        .iter()
        .copied()
        .filter(|name| {
            // SAFETY: the symbol is only looked up (its address is read and dropped), never
            // called or dereferenced, so its true type does not matter.
            let sym = unsafe { lib.get::<*const std::ffi::c_void>(name.as_bytes()) };
            sym.is_err()
        })
        .collect();
    if missing.is_empty() {
        Ok(lib)
    } else {
        Err(format!(
            "{} (from {where_from}) lacks symbols this backend needs: {}; \
             moeshift expects the C API of NIXL 1.5",
            library.display(),
            missing.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh empty directory under the system temp dir.
    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "moeshift-nixl-probe-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    fn env_with(dir: &Path) -> impl Fn(&str) -> Option<OsString> + '_ {
        move |key| (key == ENV_LIB_DIR).then(|| dir.as_os_str().to_owned())
    }

    #[test]
    fn empty_lib_dir_is_an_error_not_an_abort() {
        let dir = temp_dir("empty");
        let err = load_from_env(env_with(&dir)).expect_err("an empty directory has no NIXL");
        assert!(err.contains(LIBRARY), "{err}");
        assert!(err.contains(&dir.display().to_string()), "{err}");
        assert!(err.contains(ENV_LIB_DIR), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_that_is_not_a_library_is_an_error() {
        let dir = temp_dir("garbage");
        std::fs::write(dir.join(LIBRARY), b"not an ELF file").expect("write");
        let err = load_from_env(env_with(&dir)).expect_err("garbage cannot be loaded");
        assert!(err.contains("cannot load"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_library_without_the_nixl_symbols_is_an_error() {
        // zlib is a real, self-contained library with none of NIXL's symbols: loading it
        // succeeds and the symbol check must refuse it.
        let candidates = [
            "/lib/x86_64-linux-gnu/libz.so.1",
            "/usr/lib/x86_64-linux-gnu/libz.so.1",
            "/lib64/libz.so.1",
            "/usr/lib64/libz.so.1",
            "/lib/aarch64-linux-gnu/libz.so.1",
            "/usr/lib/aarch64-linux-gnu/libz.so.1",
        ];
        let Some(zlib) = candidates.iter().map(Path::new).find(|p| p.is_file()) else {
            eprintln!("no libz.so.1 at a known path; symbol check not exercised");
            return;
        };
        let err = load_library(zlib, "a test").expect_err("zlib is not NIXL");
        assert!(err.contains("lacks symbols"), "{err}");
        for name in REQUIRED_SYMBOLS {
            assert!(err.contains(name), "{name} not reported missing: {err}");
        }
    }

    #[test]
    fn ucx_module_lists_enable_or_leave_out_infiniband() {
        assert!(!ib_modules_enabled("^ib"));
        assert!(!ib_modules_enabled(" ^cuda, IB "));
        assert!(ib_modules_enabled("^cuda"));
        assert!(ib_modules_enabled("ib,cma"));
        assert!(!ib_modules_enabled("cma,cuda"));
    }

    #[test]
    fn infiniband_modules_are_found_next_to_the_library() {
        let root = temp_dir("ib");
        let lib = root.join(".nixl_cu13.mesonpy.libs");
        let ucx = root.join("nixl_cu13.libs").join("ucx");
        std::fs::create_dir_all(&lib).expect("lib dir");
        std::fs::create_dir_all(&ucx).expect("ucx dir");
        std::fs::write(ucx.join("libuct_cma.so.0"), b"").expect("cma module");
        assert!(!ships_ib_modules(&lib));
        std::fs::write(ucx.join("libuct_ib_mlx5.so.0"), b"").expect("ib module");
        assert!(ships_ib_modules(&lib));
        // RDMA devices: none in an empty or missing folder, some once one is listed.
        let devices = root.join("infiniband");
        assert!(!has_rdma_devices(&devices));
        std::fs::create_dir_all(&devices).expect("devices dir");
        assert!(!has_rdma_devices(&devices));
        std::fs::create_dir_all(devices.join("mlx5_0")).expect("device");
        assert!(has_rdma_devices(&devices));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn configured_runtime_loads_when_present() {
        // Runs against the real runtime when the environment points at one (as
        // `cargo xtask test` does); otherwise there is nothing to load.
        let Some(dir) = std::env::var_os(ENV_LIB_DIR).filter(|d| !d.is_empty()) else {
            eprintln!("{ENV_LIB_DIR} unset: NIXL runtime load not exercised");
            return;
        };
        let dir = PathBuf::from(dir);
        let loaded = load_from_env(|key| match key {
            ENV_LIB_DIR => Some(dir.as_os_str().to_owned()),
            _ => None,
        })
        .expect("the configured NIXL runtime loads");
        assert_eq!(loaded.runtime.library(), dir.join(LIBRARY));
        assert_eq!(loaded.runtime.lib_dir(), Some(dir.as_path()));
        if dir.join("plugins").is_dir() {
            assert_eq!(loaded.set_plugin_dir, Some(dir.join("plugins")));
        }
        // A preset plugin dir is kept, never overridden.
        let kept = load_from_env(|key| match key {
            ENV_LIB_DIR => Some(dir.as_os_str().to_owned()),
            ENV_PLUGIN_DIR => Some(OsString::from("/elsewhere")),
            _ => None,
        })
        .expect("loads again");
        assert_eq!(kept.runtime.plugin_dir(), Some(Path::new("/elsewhere")));
        assert_eq!(kept.set_plugin_dir, None);
    }
}
