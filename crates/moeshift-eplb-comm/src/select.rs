//! Default backend selection.
//!
//! The rule, from vLLM's change of its default EPLB communicator (NCCL's batched
//! point-to-point can hang under load, and NCCL on a second thread deadlocks against the
//! serving thread's NCCL):
//!
//! 1. an explicit choice wins: `host`, `nccl` or `nixl`. An explicit `nixl` without a
//!    loadable NIXL runtime is an error ([`EplbCommError::NixlUnavailable`]), never a silent
//!    fallback;
//! 2. `auto` in elastic mode → `nccl` (the only backend that works over groups whose
//!    membership changes);
//! 3. `auto` otherwise → `nixl` when NIXL is available, else `host`.
//!
//! The `nccl` EPLB backend is built with feature `cuda`. Without it, selecting `nccl`,
//! explicitly or through elastic mode, returns [`EplbCommError::BackendUnavailable`]. With
//! it, `nccl` is still never chosen by `auto` outside elastic mode.
//!
//! [`select_backend`] is the pure rule (testable without NIXL); [`choose_backend`] probes
//! NIXL when the rule needs to know, and logs the choice through the [log hook](set_log_hook).

use std::fmt;
use std::sync::RwLock;

use crate::comm::{Backend, BackendChoice};
use crate::error::EplbCommError;

/// Why a backend was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SelectionReason {
    /// The user named it.
    Explicit,
    /// `auto` in elastic mode.
    Elastic,
    /// `auto`, and NIXL is available.
    NixlAvailable,
    /// `auto`, and NIXL is not available.
    NixlUnavailable,
}

/// A chosen backend and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Selection {
    /// The backend.
    pub backend: Backend,
    /// Why it was chosen.
    pub reason: SelectionReason,
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.reason {
            SelectionReason::Explicit => "requested explicitly",
            SelectionReason::Elastic => "auto: elastic expert parallelism",
            SelectionReason::NixlAvailable => "auto: NIXL is available",
            SelectionReason::NixlUnavailable => "auto: NIXL is not available",
        };
        write!(f, "{} ({why})", self.backend)
    }
}

/// Why `nccl` cannot be selected in a build without feature `cuda`.
#[cfg_attr(feature = "cuda", allow(dead_code))]
pub(crate) const NCCL_NOT_BUILT: &str =
    "the nccl EPLB backend needs moeshift-eplb-comm built with feature `cuda`; choose host or nixl";

/// Whether this build can construct `backend`: `nccl` needs feature `cuda`.
pub fn is_built(backend: Backend) -> bool {
    match backend {
        Backend::Host | Backend::Nixl => true,
        Backend::Nccl => cfg!(feature = "cuda"),
    }
}

/// The `auto` rule alone: elastic → `nccl`; NIXL available → `nixl`; otherwise `host`.
/// Says nothing about whether the backend is built (see [`select_backend`]).
pub fn default_backend(elastic: bool, nixl_available: bool) -> Selection {
    match (elastic, nixl_available) {
        (true, _) => Selection {
            backend: Backend::Nccl,
            reason: SelectionReason::Elastic,
        },
        (false, true) => Selection {
            backend: Backend::Nixl,
            reason: SelectionReason::NixlAvailable,
        },
        (false, false) => Selection {
            backend: Backend::Host,
            reason: SelectionReason::NixlUnavailable,
        },
    }
}

/// The whole rule of the [module documentation](self), as a pure function.
///
/// ```
/// use moeshift_eplb_comm::{select_backend, Backend, BackendChoice, EplbCommError};
///
/// let auto = BackendChoice::Auto;
/// assert_eq!(select_backend(auto, false, true)?.backend, Backend::Nixl);
/// assert_eq!(select_backend(auto, false, false)?.backend, Backend::Host);
/// assert_eq!(select_backend(Backend::Host.into(), false, true)?.backend, Backend::Host);
/// assert!(matches!(
///     select_backend(Backend::Nixl.into(), false, false),
///     Err(EplbCommError::NixlUnavailable { .. })
/// ));
/// // Elastic mode needs the nccl backend, which only a build with feature `cuda` has.
/// let elastic = select_backend(auto, true, true);
/// if moeshift_eplb_comm::is_built(Backend::Nccl) {
///     assert_eq!(elastic?.backend, Backend::Nccl);
/// } else {
///     assert!(matches!(
///         elastic,
///         Err(EplbCommError::BackendUnavailable { backend: Backend::Nccl, .. })
///     ));
/// }
/// # Ok::<(), EplbCommError>(())
/// ```
pub fn select_backend(
    requested: BackendChoice,
    elastic: bool,
    nixl_available: bool,
) -> Result<Selection, EplbCommError> {
    let selection = match requested {
        BackendChoice::Explicit(backend) => Selection {
            backend,
            reason: SelectionReason::Explicit,
        },
        BackendChoice::Auto => default_backend(elastic, nixl_available),
    };
    if selection.backend == Backend::Nixl && !nixl_available {
        return Err(EplbCommError::NixlUnavailable {
            detail: format!(
                "libnixl_capi.so could not be loaded (set {} to the folder that holds it, or choose the host backend)",
                "MOESHIFT_NIXL_LIB_DIR"
            ),
        });
    }
    if !is_built(selection.backend) {
        let why = match selection.reason {
            SelectionReason::Elastic => "elastic expert parallelism selects it by default; ",
            _ => "",
        };
        return Err(EplbCommError::BackendUnavailable {
            backend: selection.backend,
            reason: format!("{why}{NCCL_NOT_BUILT}"),
        });
    }
    Ok(selection)
}

/// [`select_backend`] with NIXL probed (only when the rule needs to know: `auto` outside
/// elastic mode, or an explicit `nixl`), and the choice logged. The probe is the NIXL
/// backend's own: it loads `libnixl_capi.so` and nothing else, and never aborts.
pub fn choose_backend(requested: BackendChoice, elastic: bool) -> Result<Selection, EplbCommError> {
    let needs_probe = matches!(
        (requested, elastic),
        (BackendChoice::Auto, false) | (BackendChoice::Explicit(Backend::Nixl), _)
    );
    let probed = needs_probe.then(crate::nixl::probe);
    let nixl_available = matches!(probed, Some(Ok(_)));
    let selected =
        select_backend(requested, elastic, nixl_available).map_err(|e| match (e, probed) {
            // The probe knows why better than the rule does.
            (EplbCommError::NixlUnavailable { .. }, Some(Err(why))) => EplbCommError::from(why),
            (e, _) => e,
        });
    match selected {
        Ok(selection) => {
            log(&format!("EPLB communicator backend: {selection}"));
            Ok(selection)
        }
        Err(e) => {
            log(&format!(
                "EPLB communicator backend {requested} is not usable: {e}"
            ));
            Err(e)
        }
    }
}

/// A function that receives this crate's log lines.
pub type LogHook = Box<dyn Fn(&str) + Send + Sync>;

static LOG_HOOK: RwLock<Option<LogHook>> = RwLock::new(None);

/// Sends this crate's log lines (the backend chosen at start) to `hook` instead of standard
/// error; `None` restores standard error.
pub fn set_log_hook(hook: Option<LogHook>) {
    match LOG_HOOK.write() {
        Ok(mut slot) => *slot = hook,
        Err(poisoned) => *poisoned.into_inner() = hook,
    }
}

/// Writes one log line to the hook, or to standard error.
pub(crate) fn log(line: &str) {
    let guard = match LOG_HOOK.read() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    match guard.as_ref() {
        Some(hook) => hook(line),
        None => eprintln!("moeshift-eplb-comm: {line}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn the_rule_over_every_input() {
        use Backend::*;
        let auto = BackendChoice::Auto;
        // (requested, elastic, nixl) → backend or error kind.
        for nixl in [false, true] {
            for elastic in [false, true] {
                assert_eq!(
                    select_backend(Host.into(), elastic, nixl).unwrap(),
                    Selection {
                        backend: Host,
                        reason: SelectionReason::Explicit
                    }
                );
                let nccl = select_backend(Nccl.into(), elastic, nixl);
                if cfg!(feature = "cuda") {
                    assert_eq!(nccl.unwrap().backend, Nccl);
                } else {
                    assert!(matches!(
                        nccl,
                        Err(EplbCommError::BackendUnavailable { backend: Nccl, .. })
                    ));
                }
                let explicit_nixl = select_backend(Nixl.into(), elastic, nixl);
                if nixl {
                    assert_eq!(explicit_nixl.unwrap().backend, Nixl);
                } else {
                    assert!(matches!(
                        explicit_nixl,
                        Err(EplbCommError::NixlUnavailable { .. })
                    ));
                }
                // Elastic mode picks nccl whatever NIXL says; without feature `cuda` it is
                // not built, and the error says why it was wanted.
                if elastic {
                    let chosen = select_backend(auto, elastic, nixl);
                    if cfg!(feature = "cuda") {
                        let s = chosen.unwrap();
                        assert_eq!((s.backend, s.reason), (Nccl, SelectionReason::Elastic));
                    } else {
                        let e = chosen.unwrap_err();
                        assert!(e.to_string().contains("elastic"), "{e}");
                        assert!(e.to_string().contains("feature `cuda`"), "{e}");
                    }
                }
            }
        }
        assert_eq!(
            select_backend(auto, false, true).unwrap(),
            Selection {
                backend: Nixl,
                reason: SelectionReason::NixlAvailable
            }
        );
        assert_eq!(
            select_backend(auto, false, false).unwrap(),
            Selection {
                backend: Host,
                reason: SelectionReason::NixlUnavailable
            }
        );
        assert_eq!(default_backend(true, false).backend, Nccl);
        assert_eq!(default_backend(true, true).reason, SelectionReason::Elastic);
        assert_eq!(
            default_backend(false, false).to_string(),
            "host (auto: NIXL is not available)"
        );
    }

    #[test]
    fn choice_is_logged_through_the_hook() {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = Arc::clone(&lines);
        set_log_hook(Some(Box::new(move |l| {
            sink.lock().unwrap().push(l.to_string())
        })));
        // Explicit host: no probe needed, and the choice is logged.
        let s = choose_backend(Backend::Host.into(), false).unwrap();
        assert_eq!(s.backend, Backend::Host);
        let nccl = choose_backend(Backend::Nccl.into(), false);
        set_log_hook(None);
        let lines = lines.lock().unwrap().clone();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].contains("host (requested explicitly)"),
            "{lines:?}"
        );
        if cfg!(feature = "cuda") {
            // Built: chosen (whether it works on this machine is up to the factory).
            assert_eq!(nccl.unwrap().backend, Backend::Nccl);
            assert!(
                lines[1].contains("nccl (requested explicitly)"),
                "{lines:?}"
            );
        } else {
            let e = nccl.unwrap_err();
            assert!(
                lines[1].contains("nccl") && lines[1].contains(&e.to_string()),
                "{lines:?}"
            );
        }
    }
}
