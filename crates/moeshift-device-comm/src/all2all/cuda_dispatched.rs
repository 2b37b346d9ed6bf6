//! [`CudaDispatched`]: what a CUDA dispatch hands this rank's experts, and what combine
//! needs to send their outputs back.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use moeshift_tensor::DType;

use super::cuda::{addr, empty_slice};
use super::cuda_error::CudaAll2AllError;
use super::dispatched::{slot_items, ExpertWork};
use super::kernels::{Elem, Kernels, LaunchError};
use crate::error::RankRef;

/// How combine sends outputs back.
#[derive(Debug, Clone)]
pub(crate) enum CudaRoute {
    /// Gather / reduce-scatter: `counts[s]` rows came from group rank `s`, in rank order.
    AgRs { counts: Vec<usize> },
    /// All-to-all-v: `recv_rows[s]` rows came from rank `s` (in rank order); this rank sent
    /// `sent_rows[d]` of its tokens to rank `d`.
    AllToAllV {
        recv_rows: Vec<usize>,
        sent_rows: Vec<usize>,
    },
    /// One-sided: as all-to-all-v, plus the row of source `s`'s combine area where this
    /// rank writes the outputs of `s`'s rows.
    OneSided {
        recv_rows: Vec<usize>,
        sent_rows: Vec<usize>,
        combine_offsets: Vec<u64>,
    },
}

/// Device addresses of the tables combine and the expert-input gather read (in buffers the
/// [`CudaDispatched`] keeps).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tables {
    /// Per received row: offsets (`u32`, rows + 1), item indices (`u32`), weights (`f32`).
    pub row_offsets: u64,
    pub row_items: u64,
    pub row_weights: u64,
    /// `items[i].row` (`u32`).
    pub item_rows: u64,
    /// Per local token: offsets (`u32`, tokens + 1) and rows of the returned block (`u32`).
    pub token_offsets: u64,
    pub token_rows: u64,
}

/// The result of a CUDA dispatch on one rank: the token rows its experts must process (on
/// the GPU), the work items (which row goes to which local expert, on the host), and the
/// routing combine needs.
///
/// The caller computes, for every work item `i` in [`items`](Self::items) order, the
/// output row `expert[items[i].local_slot](rows[items[i].row])` **without** the router
/// weight, writes them row-major (`items().len() × row_bytes()` bytes, the rows' element
/// type) into a device buffer and passes it to combine, which applies the weights and sums
/// each token's picks on its own rank. Items are sorted by local slot, so
/// [`items_for_local_slot`](Self::items_for_local_slot) gives each expert's batch as one
/// contiguous range, and [`expert_inputs`](Self::expert_inputs) gathers the input rows in
/// exactly that order (a grouped GEMM's input).
///
/// Device buffers live on the manager's stream ([`stream`](Self::stream)); work queued
/// there, or on streams ordered after it, sees them complete.
#[derive(Debug)]
pub struct CudaDispatched {
    pub(crate) manager: &'static str,
    pub(crate) manager_id: u64,
    pub(crate) rank: RankRef,
    pub(crate) device: usize,
    pub(crate) layer: usize,
    pub(crate) hidden_size: usize,
    pub(crate) dtype: DType,
    pub(crate) elem: Elem,
    pub(crate) row_bytes: usize,
    pub(crate) rows: CudaSlice<u8>,
    pub(crate) num_rows: usize,
    pub(crate) items: Vec<ExpertWork>,
    pub(crate) slot_offsets: Vec<usize>,
    /// The device buffers that hold the tables (kept, never read: `tables` points into them).
    #[allow(dead_code)]
    pub(crate) buffers: Vec<CudaSlice<u8>>,
    pub(crate) tables: Tables,
    pub(crate) num_local_tokens: usize,
    pub(crate) route: CudaRoute,
    pub(crate) kernels: Arc<Kernels>,
}

impl CudaDispatched {
    /// The MoE layer dispatched.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Elements per row.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Element type of the rows.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Number of token rows this rank received.
    pub fn num_rows(&self) -> usize {
        self.num_rows
    }

    /// The received token rows, row-major (`num_rows() × row_bytes()` bytes).
    pub fn rows(&self) -> &CudaSlice<u8> {
        &self.rows
    }

    /// Every work item, sorted by local slot.
    pub fn items(&self) -> &[ExpertWork] {
        &self.items
    }

    /// The work items of local slot `local_slot` (empty for an unknown slot).
    pub fn items_for_local_slot(&self, local_slot: usize) -> &[ExpertWork] {
        slot_items(&self.items, &self.slot_offsets, local_slot)
    }

    /// Number of physical slots on this rank.
    pub fn slots_per_rank(&self) -> usize {
        self.slot_offsets.len().saturating_sub(1)
    }

    /// Number of tokens this rank dispatched (the rows combine returns).
    pub fn num_local_tokens(&self) -> usize {
        self.num_local_tokens
    }

    /// Bytes of expert outputs combine expects: `items().len() × row_bytes()`.
    pub fn expert_outputs_len(&self) -> usize {
        self.items.len() * self.row_bytes
    }

    /// The stream the buffers are ordered on (the manager's).
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.rows.stream()
    }

    /// The input row of every work item, in item order (`items().len() × row_bytes()`
    /// bytes): row `i` is `rows[items[i].row]`. Queued on [`stream`](Self::stream).
    pub fn expert_inputs(&self) -> Result<CudaSlice<u8>, CudaAll2AllError> {
        let stream = self.rows.stream().clone();
        let err = |call: &'static str| {
            let (rank, device, manager, layer) = (self.rank, self.device, self.manager, self.layer);
            move |source| CudaAll2AllError::Cuda {
                rank,
                device,
                manager,
                op: "expert_inputs",
                layer,
                call,
                source,
            }
        };
        let len = self.expert_outputs_len();
        let mut out = if len == 0 {
            empty_slice(&stream).map_err(err("cuMemAllocAsync"))?
        } else {
            // SAFETY: `u8` accepts any bit pattern, and the gather writes every byte.
            unsafe { stream.alloc::<u8>(len) }.map_err(err("cuMemAllocAsync"))?
        };
        let rows = addr(&self.rows, &stream);
        let (dst, record) = out.device_ptr_mut(&stream);
        // SAFETY: `out` holds one row per item, `item_rows` one received-row index per item
        // (each below `num_rows`), and `rows` every received row; all stay alive until the
        // kernel is done (frees are ordered on this stream).
        let launched = unsafe {
            self.kernels.gather_rows(
                stream.cu_stream(),
                dst,
                rows,
                self.tables.item_rows,
                self.items.len(),
                self.row_bytes,
            )
        };
        drop(record);
        launched.map_err(|e| match e {
            LaunchError::Driver(source) => err("gather_rows")(source),
            LaunchError::TooLarge { what, value } => CudaAll2AllError::TooLarge {
                rank: self.rank,
                manager: self.manager,
                op: "expert_inputs",
                layer: self.layer,
                what,
                value,
            },
        })?;
        Ok(out)
    }
}
