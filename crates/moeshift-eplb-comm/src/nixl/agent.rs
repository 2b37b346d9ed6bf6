//! A thin typed layer over `nixl-sys`: one agent with the UCX backend, its memory
//! registrations, the peers it knows, and one-sided READ requests.
//!
//! This is the only module that calls `nixl-sys`. Every entry point takes a
//! [`NixlRuntime`], which only a successful [`probe`](super::probe) hands out, so no NIXL
//! call can reach the `abort()` of the `nixl-sys` shim.
//!
//! Object lifetimes follow NIXL's rules: registrations are dropped (deregistered) before
//! the agent; a READ request keeps the agent alive (`nixl-sys` holds a reference) and is
//! released when dropped, which aborts it if it is still in flight.

use nixl_sys::{
    Agent, MemType, MemoryRegion, NixlDescriptor, OptArgs, RegistrationHandle, XferDescList,
    XferOp, XferRequest, XferStatus,
};

use moeshift_tensor::Device;

use super::probe::NixlRuntime;

/// Name of the NIXL transport plugin the backend uses.
pub(crate) const UCX: &str = "UCX";

/// A failed NIXL call: what was being done and NIXL's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallError {
    /// The call and its purpose, e.g. `register layer 3 tensor "w2"`.
    pub(crate) op: String,
    /// NIXL's status, as text.
    pub(crate) status: String,
}

impl CallError {
    fn new(op: impl Into<String>, status: nixl_sys::NixlError) -> Self {
        Self {
            op: op.into(),
            status: status_text(&status),
        }
    }
}

/// NIXL's status with a hint where the bare variant says little.
fn status_text(e: &nixl_sys::NixlError) -> String {
    match e {
        nixl_sys::NixlError::BackendError => {
            "backend error (NIXL logs the cause on stderr; a peer that exited shows up this way)"
                .into()
        }
        nixl_sys::NixlError::NotFound => {
            "not found (unknown peer agent or unregistered memory)".into()
        }
        other => other.to_string(),
    }
}

/// NIXL's memory type and device id for memory on `device`.
pub(crate) fn mem_kind(device: Device) -> (MemType, u64) {
    match device {
        Device::Host => (MemType::Dram, 0),
        Device::Cuda(ordinal) => (MemType::Vram, ordinal as u64),
    }
}

/// A byte range to register: host memory or device memory of one CUDA device.
#[derive(Debug, Clone, Copy)]
struct Region {
    addr: u64,
    len: usize,
    device: Device,
}

impl MemoryRegion for Region {
    unsafe fn as_ptr(&self) -> *const u8 {
        // Only the address is handed to NIXL; this pointer is never dereferenced here.
        std::ptr::without_provenance(self.addr as usize)
    }

    fn size(&self) -> usize {
        self.len
    }
}

impl NixlDescriptor for Region {
    fn mem_type(&self) -> MemType {
        mem_kind(self.device).0
    }

    fn device_id(&self) -> u64 {
        mem_kind(self.device).1
    }
}

/// One row moved by a READ: `len` bytes from `remote` on the peer to `local` here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadDesc {
    /// Destination address in this process's registered memory.
    pub(crate) local: u64,
    /// Source address in the peer's registered memory.
    pub(crate) remote: u64,
    /// Bytes.
    pub(crate) len: usize,
}

/// A posted READ request.
pub(crate) struct Read {
    req: XferRequest,
    done: bool,
}

impl std::fmt::Debug for Read {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Read").field("done", &self.done).finish()
    }
}

impl Read {
    /// True once the request completed.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }
}

/// An agent with the UCX backend and the memory it registered.
pub(crate) struct NixlAgent {
    // Field order is drop order: registrations go before the agent they belong to.
    registrations: Vec<RegistrationHandle>,
    agent: Agent,
    name: String,
}

impl std::fmt::Debug for NixlAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NixlAgent")
            .field("name", &self.name)
            .field("registrations", &self.registrations.len())
            .finish()
    }
}

impl NixlAgent {
    /// Creates agent `name` with the UCX backend; `params` override the plugin's defaults
    /// (e.g. `num_workers`, `ucx_error_handling_mode`).
    pub(crate) fn new(
        _runtime: &NixlRuntime,
        name: &str,
        params: &[(String, String)],
    ) -> Result<Self, CallError> {
        let agent =
            Agent::new(name).map_err(|e| CallError::new(format!("creating agent {name:?}"), e))?;
        let (_mems, defaults) = agent.get_plugin_params(UCX).map_err(|e| {
            CallError::new(
                "reading the UCX plugin's parameters (is NIXL_PLUGIN_DIR right?)",
                e,
            )
        })?;
        let mut chosen = defaults
            .clone()
            .map_err(|e| CallError::new("copying the UCX plugin's parameters", e))?;
        for (key, value) in params {
            chosen
                .set(key, value)
                .map_err(|e| CallError::new(format!("setting UCX parameter {key}={value}"), e))?;
        }
        agent
            .create_backend(UCX, &chosen)
            .map_err(|e| CallError::new("creating the UCX backend", e))?;
        Ok(Self {
            registrations: Vec::new(),
            agent,
            name: name.to_string(),
        })
    }

    /// The agent's name (what peers load it as).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Registers `len` bytes at `addr` on `device`, until the agent is dropped. `what` names
    /// the memory for the error. Zero-length ranges are skipped (nothing to read there).
    ///
    /// The memory must stay allocated while registered; the communicator keeps that
    /// promise (it owns the staging memory, and the weights' contract covers theirs).
    pub(crate) fn register(
        &mut self,
        addr: u64,
        len: usize,
        device: Device,
        what: &str,
    ) -> Result<(), CallError> {
        if len == 0 {
            return Ok(());
        }
        let region = Region { addr, len, device };
        let handle = self.agent.register_memory(&region, None).map_err(|e| {
            CallError::new(
                format!("registering {what} ({len} bytes at {addr:#x} on {device})"),
                e,
            )
        })?;
        self.registrations.push(handle);
        Ok(())
    }

    /// This agent's metadata, for peers to load.
    pub(crate) fn metadata(&self) -> Result<Vec<u8>, CallError> {
        self.agent
            .get_local_md()
            .map_err(|e| CallError::new("reading this agent's metadata", e))
    }

    /// Loads a peer's metadata; returns the peer agent's name.
    pub(crate) fn load_peer(&self, metadata: &[u8], what: &str) -> Result<String, CallError> {
        self.agent
            .load_remote_md(metadata)
            .map_err(|e| CallError::new(format!("loading the metadata of {what}"), e))
    }

    /// Opens the connection to a loaded peer now rather than at the first READ.
    pub(crate) fn connect(&self, peer: &str) -> Result<(), CallError> {
        self.agent
            .make_connection(peer, None)
            .map_err(|e| CallError::new(format!("connecting to agent {peer:?}"), e))
    }

    /// Posts one READ request from agent `peer` on UCX worker `worker` (below the backend's
    /// `num_workers`; NIXL falls back to a worker of its choice, with a warning, otherwise):
    /// for every descriptor, `len` bytes at `remote` (peer memory on `remote_device`) land
    /// at `local` (this agent's memory on `local_device`). All ranges must lie in registered
    /// memory on both sides.
    pub(crate) fn post_read(
        &self,
        peer: &str,
        descs: &[ReadDesc],
        local_device: Device,
        remote_device: Device,
        worker: usize,
    ) -> Result<Read, CallError> {
        let (local_type, local_dev) = mem_kind(local_device);
        let (remote_type, remote_dev) = mem_kind(remote_device);
        let list =
            |t| XferDescList::new(t).map_err(|e| CallError::new("creating a descriptor list", e));
        let mut local = list(local_type)?;
        let mut remote = list(remote_type)?;
        for d in descs {
            local.add_desc(d.local as usize, d.len, local_dev);
            remote.add_desc(d.remote as usize, d.len, remote_dev);
        }
        // The UCX backend binds a request to the worker its `worker_id=` parameter names
        // when the request is created.
        let mut args = OptArgs::new().map_err(|e| CallError::new("creating request options", e))?;
        args.set_custom_param(worker_param(worker).as_bytes())
            .map_err(|e| CallError::new(format!("choosing UCX worker {worker}"), e))?;
        let req = self
            .agent
            .create_xfer_req(XferOp::Read, &local, &remote, peer, Some(&args))
            .map_err(|e| {
                CallError::new(
                    format!("creating a READ request from agent {peer:?} on UCX worker {worker}"),
                    e,
                )
            })?;
        let in_progress = self.agent.post_xfer_req(&req, None).map_err(|e| {
            CallError::new(format!("posting a READ request from agent {peer:?}"), e)
        })?;
        Ok(Read {
            req,
            done: !in_progress,
        })
    }

    /// Drives progress and checks `read`; returns true once it completed.
    pub(crate) fn poll(&self, read: &mut Read) -> Result<bool, CallError> {
        if !read.done {
            match self.agent.get_xfer_status(&read.req) {
                Ok(XferStatus::Success) => read.done = true,
                Ok(XferStatus::InProgress) => {}
                Err(e) => return Err(CallError::new("checking a READ request", e)),
            }
        }
        Ok(read.done)
    }
}

/// The custom request parameter that makes NIXL's UCX backend run a request on `worker`.
fn worker_param(worker: usize) -> String {
    format!("worker_id={worker}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_their_worker_as_the_ucx_backend_parses_it() {
        // The UCX plugin looks for `worker_id=` and reads the decimal number after it.
        assert_eq!(worker_param(0), "worker_id=0");
        assert_eq!(worker_param(13), "worker_id=13");
    }

    #[test]
    fn devices_map_to_nixl_memory_types() {
        assert_eq!(mem_kind(Device::Host), (MemType::Dram, 0));
        assert_eq!(mem_kind(Device::Cuda(3)), (MemType::Vram, 3));
        let r = Region {
            addr: 0x1000,
            len: 64,
            device: Device::Cuda(1),
        };
        assert_eq!(
            (r.mem_type(), r.device_id(), r.size()),
            (MemType::Vram, 1, 64)
        );
    }

    #[test]
    fn call_errors_name_the_step_and_explain_the_status() {
        let e = CallError::new(
            "posting a READ request from agent \"eplb-2-ab\"",
            nixl_sys::NixlError::BackendError,
        );
        assert!(e.op.contains("eplb-2-ab"), "{e:?}");
        assert!(e.status.contains("peer that exited"), "{e:?}");
        let e = CallError::new("x", nixl_sys::NixlError::InvalidParam);
        assert!(!e.status.is_empty());
    }
}
