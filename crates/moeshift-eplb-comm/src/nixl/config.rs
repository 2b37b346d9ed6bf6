//! [`NixlConfig`]: the few knobs of the NIXL backend, and the check of the UCX environment
//! it relies on.

/// UCX parameter naming how the backend handles a failed peer.
pub const ERROR_HANDLING_MODE: &str = "ucx_error_handling_mode";

/// How the NIXL backend is set up. The defaults suit both a single machine (UCX picks `cma`
/// for data and `tcp` for control, with no settings) and RDMA clusters.
///
/// ```
/// use moeshift_eplb_comm::nixl::NixlConfig;
///
/// let config = NixlConfig::default().backend_param("num_workers", "2");
/// assert_eq!(config.backend_params, vec![("num_workers".to_string(), "2".to_string())]);
/// assert!(config.warm_up);
/// assert_eq!(config.landing_slots, 1);
/// assert_eq!(NixlConfig::default().landing_slots(2).landing_slots, 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixlConfig {
    /// UCX backend parameters that override the plugin's defaults (as NIXL's
    /// `get_plugin_params("UCX")` lists them, e.g. `num_workers`, `ucx_devices`,
    /// `ucx_error_handling_mode`). The default `ucx_error_handling_mode=peer` is what makes
    /// a dead peer fail its READs quickly instead of hanging them.
    pub backend_params: Vec<(String, String)>,
    /// Open every connection and READ a few bytes from every peer while the communicator
    /// is built, so the first layer does not pay for connection setup and first-touch page
    /// faults. On by default.
    pub warm_up: bool,
    /// Slots of the landing area: how many staged layers may hold rows at once (each slot
    /// is `rows per rank × bytes per expert` of the largest layer, registered once). With
    /// one slot (the default, the least memory), a layer's
    /// [`StagedLayer`](crate::StagedLayer) must be committed or dropped before the next
    /// transfer, or that transfer is refused with
    /// [`EplbCommError::StagingInUse`](crate::EplbCommError::StagingInUse); two let a worker
    /// transfer layer `l + 1` while layer `l` waits for its commit. At least 1.
    pub landing_slots: usize,
}

impl Default for NixlConfig {
    fn default() -> Self {
        Self {
            backend_params: Vec::new(),
            warm_up: true,
            landing_slots: 1,
        }
    }
}

impl NixlConfig {
    /// Adds (or replaces) one UCX backend parameter.
    pub fn backend_param(mut self, key: &str, value: &str) -> Self {
        self.backend_params.retain(|(k, _)| k != key);
        self.backend_params
            .push((key.to_string(), value.to_string()));
        self
    }

    /// Sets the number of landing slots (see [`landing_slots`](Self::landing_slots)).
    pub fn landing_slots(mut self, slots: usize) -> Self {
        self.landing_slots = slots;
        self
    }

    /// The UCX error handling mode this configuration asks for (`peer` unless overridden).
    pub(crate) fn error_handling_mode(&self) -> &str {
        self.backend_params
            .iter()
            .find(|(k, _)| k == ERROR_HANDLING_MODE)
            .map_or("peer", |(_, v)| v.as_str())
    }
}

/// Checks a `UCX_TLS` value (`None` when unset). With its default peer error handling,
/// NIXL's UCX backend needs UCX's `tcp` transport among the enabled ones, so `tcp` must stay
/// unless `ucx_error_handling_mode` is `none`. Returns why the value cannot work.
pub(crate) fn check_ucx_tls(value: Option<&str>, error_handling_mode: &str) -> Result<(), String> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(());
    };
    if error_handling_mode == "none" {
        return Ok(());
    }
    let (excluded, list) = match value.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let names: Vec<&str> = list.split(',').map(str::trim).collect();
    let has_tcp = names.iter().any(|n| n.eq_ignore_ascii_case("tcp"));
    let has_all = names.iter().any(|n| n.eq_ignore_ascii_case("all"));
    let tcp_enabled = if excluded {
        !has_tcp
    } else {
        has_tcp || has_all
    };
    if tcp_enabled {
        return Ok(());
    }
    let fix = if excluded {
        let kept: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !n.eq_ignore_ascii_case("tcp"))
            .collect();
        format!("stop excluding tcp (e.g. UCX_TLS=^{})", kept.join(","))
    } else {
        format!("add tcp (e.g. UCX_TLS={list},tcp)")
    };
    Err(format!(
        "UCX_TLS={value:?} disables UCX's tcp transport, which NIXL's UCX backend needs with \
         peer error handling; {fix}, unset UCX_TLS, or set the backend parameter \
         {ERROR_HANDLING_MODE}=none"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ucx_tls_must_keep_tcp() {
        assert_eq!(check_ucx_tls(None, "peer"), Ok(()));
        assert_eq!(check_ucx_tls(Some(""), "peer"), Ok(()));
        assert_eq!(check_ucx_tls(Some("cma,tcp"), "peer"), Ok(()));
        assert_eq!(check_ucx_tls(Some("all"), "peer"), Ok(()));
        assert_eq!(check_ucx_tls(Some(" rc , TCP "), "peer"), Ok(()));
        assert_eq!(check_ucx_tls(Some("^ib"), "peer"), Ok(()));
        let err = check_ucx_tls(Some("cma,sm"), "peer").unwrap_err();
        assert!(err.contains("cma,sm") && err.contains("tcp"), "{err}");
        let err = check_ucx_tls(Some("^tcp,ib"), "peer").unwrap_err();
        assert!(err.contains("UCX_TLS=^ib"), "{err}");
        // Without peer error handling, tcp is not needed.
        assert_eq!(check_ucx_tls(Some("cma"), "none"), Ok(()));
    }

    #[test]
    fn parameters_replace_and_set_the_error_mode() {
        let c = NixlConfig::default()
            .backend_param(ERROR_HANDLING_MODE, "none")
            .backend_param("num_workers", "2")
            .backend_param(ERROR_HANDLING_MODE, "peer");
        assert_eq!(c.backend_params.len(), 2);
        assert_eq!(c.error_handling_mode(), "peer");
        assert_eq!(NixlConfig::default().error_handling_mode(), "peer");
        let c = NixlConfig::default().backend_param(ERROR_HANDLING_MODE, "none");
        assert_eq!(c.error_handling_mode(), "none");
    }
}
