//! [`NixlConfig`]: the few knobs of the NIXL backend, and the check of the UCX environment
//! it relies on.

/// UCX parameter naming how the backend handles a failed peer.
pub const ERROR_HANDLING_MODE: &str = "ucx_error_handling_mode";
/// UCX parameter naming how many UCX workers the backend creates.
pub const NUM_WORKERS: &str = "num_workers";
/// Default of [`NixlConfig::read_streams`].
pub const DEFAULT_READ_STREAMS: usize = 4;

/// How the NIXL backend is set up. The defaults suit both a single machine (UCX picks `cma`
/// for data and `tcp` for control, with no settings) and RDMA clusters.
///
/// ```
/// use moeshift_eplb_comm::nixl::NixlConfig;
///
/// let config = NixlConfig::default().backend_param("num_workers", "8");
/// assert_eq!(config.backend_params, vec![("num_workers".to_string(), "8".to_string())]);
/// assert!(config.warm_up);
/// assert_eq!(config.landing_slots, 1);
/// assert_eq!(NixlConfig::default().landing_slots(2).landing_slots, 2);
/// assert_eq!(NixlConfig::default().read_streams(1).read_streams, 1);
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
    /// How many READ requests each peer's rows of a layer are split into, each posted on a
    /// UCX worker of its own (request `i` on worker `i`), and the number of workers the
    /// agent creates: the backend parameter `num_workers` is set to it unless
    /// [`backend_params`](Self::backend_params) sets `num_workers` itself (then to at least
    /// this many, or building the communicator fails).
    ///
    /// Why: UCX queues every copy one worker makes from one peer GPU (`cuda_ipc`) on one
    /// CUDA stream, so the rows of a layer from a peer move one after another on one copy
    /// engine. Requests on `n` workers put them on `n` streams, which the GPU runs on
    /// several copy engines at once; over RDMA they use `n` connections. A peer's rows are
    /// split by bytes as evenly as rows allow: a large row may be cut at a 4 KiB multiple
    /// inside it, small rows stay whole.
    ///
    /// The default is [`DEFAULT_READ_STREAMS`] (4): one stream caps READs from a peer at one
    /// copy engine's rate, below what NVLink carries (between two H200s, rows READ with one
    /// stream moved at 0.84 to 0.94 of the link's rate, with two or more at 0.98 to 1.0
    /// once past the first layer), and the extra workers cost only their setup (paid, with
    /// the warm-up, while the communicator is built) and a few requests more per layer;
    /// host memory READs (UCX `cma`) neither gain nor lose. 1 keeps one request per peer on
    /// one worker. At least 1.
    pub read_streams: usize,
}

impl Default for NixlConfig {
    fn default() -> Self {
        Self {
            backend_params: Vec::new(),
            warm_up: true,
            landing_slots: 1,
            read_streams: DEFAULT_READ_STREAMS,
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

    /// Sets the number of READ streams (see [`read_streams`](Self::read_streams)).
    pub fn read_streams(mut self, streams: usize) -> Self {
        self.read_streams = streams;
        self
    }

    /// The UCX backend parameters to create the agent with: [`backend_params`] plus
    /// `num_workers` = [`read_streams`] unless set, after checking both. Returns why the
    /// configuration cannot work.
    ///
    /// [`backend_params`]: Self::backend_params
    /// [`read_streams`]: Self::read_streams
    pub(crate) fn agent_params(&self) -> Result<Vec<(String, String)>, String> {
        let streams = self.read_streams;
        if streams == 0 {
            return Err(
                "read_streams is 0; each peer's READs need at least one request (use 1 for a \
                 single stream)"
                    .into(),
            );
        }
        let mut params = self.backend_params.clone();
        match params.iter().find(|(k, _)| k == NUM_WORKERS) {
            None => params.push((NUM_WORKERS.to_string(), streams.to_string())),
            Some((_, value)) => {
                let workers = value.trim().parse::<usize>().map_err(|_| {
                    format!("backend parameter {NUM_WORKERS}={value:?} is not a number of workers")
                })?;
                if workers < streams {
                    return Err(format!(
                        "read_streams is {streams} but backend parameter {NUM_WORKERS} is \
                         {workers}; every READ stream needs a UCX worker of its own (raise \
                         {NUM_WORKERS} or lower read_streams)"
                    ));
                }
            }
        }
        Ok(params)
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

    #[test]
    fn read_streams_set_the_workers_unless_the_user_did() {
        let workers = |c: &NixlConfig| {
            c.agent_params().map(|p| {
                p.iter()
                    .filter(|(k, _)| k == NUM_WORKERS)
                    .map(|(_, v)| v.clone())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(NixlConfig::default().read_streams, DEFAULT_READ_STREAMS);
        assert_eq!(
            workers(&NixlConfig::default()),
            Ok(vec![DEFAULT_READ_STREAMS.to_string()])
        );
        assert_eq!(
            workers(&NixlConfig::default().read_streams(1)),
            Ok(vec!["1".to_string()])
        );
        // The user's own setting stays, and may exceed the streams.
        let c = NixlConfig::default()
            .read_streams(2)
            .backend_param(NUM_WORKERS, "8");
        assert_eq!(workers(&c), Ok(vec!["8".to_string()]));
        // Other parameters pass through untouched.
        let p = NixlConfig::default()
            .backend_param(ERROR_HANDLING_MODE, "none")
            .agent_params()
            .unwrap();
        assert!(p.contains(&(ERROR_HANDLING_MODE.to_string(), "none".to_string())));

        let err = NixlConfig::default()
            .read_streams(0)
            .agent_params()
            .unwrap_err();
        assert!(err.contains("read_streams is 0"), "{err}");
        let err = NixlConfig::default()
            .read_streams(4)
            .backend_param(NUM_WORKERS, "2")
            .agent_params()
            .unwrap_err();
        assert!(
            err.contains("read_streams is 4") && err.contains("is 2"),
            "{err}"
        );
        let err = NixlConfig::default()
            .backend_param(NUM_WORKERS, "many")
            .agent_params()
            .unwrap_err();
        assert!(err.contains("\"many\""), "{err}");
    }
}
