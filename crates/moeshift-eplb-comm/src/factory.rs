//! Building a communicator for a chosen backend.
//!
//! Every backend is built the same way: over the EPLB group (a [`HostGroup`] of its own,
//! see [`eplb_group`]), from all layers' weights, with a deadline. The
//! group carries the backend's control traffic (layout and plan checks, barriers, NIXL
//! metadata) and, for the `host` backend, the rows themselves.

use moeshift_device_comm::{HostGroup, StoreClient};
use moeshift_sync::Deadline;

use crate::comm::{Backend, BackendChoice, EplbCommunicator};
use crate::error::EplbCommError;
use crate::host::{eplb_group, HostCommunicator};
use crate::select::choose_backend;
use crate::weights::LayerWeights;

/// The whole start-up in one call: chooses the backend for `choice` ([`choose_backend`]:
/// explicit choices win, `auto` follows the default selection, the choice is logged), forms
/// the EPLB group over `members` (global ranks, in EPLB-group order) and builds the
/// communicator for `all_layers`. Every member calls it with the same arguments.
///
/// ```
/// use moeshift_device_comm::{StoreClient, World};
/// use moeshift_eplb_comm::{open_communicator, Backend, LayerWeights};
/// use moeshift_sync::Deadline;
/// use moeshift_tensor::{DType, HostBuffer};
/// use std::time::Duration;
///
/// let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
/// let world = World::single_node(0, 1, "127.0.0.1", port)?;
/// let deadline = Deadline::after(Duration::from_secs(10));
/// let store = StoreClient::connect(&world, deadline)?;
/// let mut buf = HostBuffer::zeroed(2 * 8)?;
/// let weights = [LayerWeights::builder().host("w", &mut buf, &[2, 8], DType::U8)?.build()?];
/// let comm = open_communicator(Backend::Host.into(), false, &store, &[0], &weights, deadline)?;
/// assert_eq!(comm.backend(), Backend::Host);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn open_communicator<'w>(
    choice: BackendChoice,
    elastic: bool,
    store: &StoreClient,
    members: &[usize],
    all_layers: &[LayerWeights<'w>],
    deadline: Deadline,
) -> Result<Box<dyn EplbCommunicator + 'w>, EplbCommError> {
    let selection = choose_backend(choice, elastic)?;
    let group = eplb_group(store, members, deadline)?;
    create_communicator(selection.backend, group, all_layers, deadline)
}

/// Builds the `backend` communicator over `group` for the layers `all_layers` (index =
/// layer). Every member of the group calls it with the same backend.
///
/// The `nccl` backend needs CUDA weights and is built with feature `cuda`; its communicator
/// is not `Send` (it owns a NCCL communicator), so neither is the box for it: build it on
/// the thread that will run the transfers.
///
/// Errors: [`EplbCommError::BackendUnavailable`] for `nccl` in a build without feature
/// `cuda`; the backend's own construction errors (layouts that differ between ranks,
/// weights a backend cannot use, NCCL or NIXL failures, deadline expiry).
pub fn create_communicator<'w>(
    backend: Backend,
    group: HostGroup,
    all_layers: &[LayerWeights<'w>],
    deadline: Deadline,
) -> Result<Box<dyn EplbCommunicator + 'w>, EplbCommError> {
    match backend {
        Backend::Host => Ok(Box::new(HostCommunicator::with_group(
            group, all_layers, deadline,
        )?)),
        Backend::Nixl => Ok(Box::new(crate::nixl::NixlCommunicator::with_group(
            group, all_layers, deadline,
        )?)),
        #[cfg(feature = "cuda")]
        Backend::Nccl => Ok(Box::new(crate::nccl::NcclCommunicator::with_group(
            group, all_layers, deadline,
        )?)),
        #[cfg(not(feature = "cuda"))]
        Backend::Nccl => Err(EplbCommError::BackendUnavailable {
            backend,
            reason: crate::select::NCCL_NOT_BUILT.into(),
        }),
    }
}
