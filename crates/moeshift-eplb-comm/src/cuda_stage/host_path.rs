//! The `host` backend's path for CUDA weights.
//!
//! The host transport moves host memory, so rows cross PCIe twice, as in vLLM's
//! `torch_gloo` communicator, but through page-locked memory and without a whole-layer
//! buffer:
//!
//! * **sending**: the rows bound for a round's peer are copied device-to-host into one
//!   page-locked message buffer (after the header), then sent;
//! * **receiving**: the peer's message lands in page-locked staging (header, then rows);
//!   once its header checked out, its rows are copied host-to-device into device staging,
//!   while the next round already travels;
//! * **local copies** go device-to-device, straight into device staging;
//! * the commit is then device-to-device, like every device commit.
//!
//! Page-locked buffers are kept by the communicator and reused (allocating page-locked
//! memory is slow); device staging comes from a one-buffer pool.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use moeshift_placement::SendOp;
use moeshift_sync::Deadline;
use moeshift_tensor::{cuda_available, CudaError};

use super::memory::{driver_error, CopyQueue, PinnedBuffer, StagingPool};
use crate::error::EplbCommError;
use crate::staging::{RowSource, Staging, StagingBuilder, StagingMemory};
use crate::weights::{LayerLayout, LayerWeights};

/// CUDA state of a host communicator, for weights on one GPU.
#[derive(Debug)]
pub(crate) struct HostCuda {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    /// Copies of a transfer.
    stream: Arc<CudaStream>,
    /// Copies of commits.
    commit_stream: Arc<CudaStream>,
    pool: Arc<StagingPool>,
    /// Page-locked staging that messages are received into (reused).
    recv: Option<PinnedBuffer>,
    /// Page-locked outgoing message (reused).
    send: Option<PinnedBuffer>,
}

impl HostCuda {
    /// CUDA state for weights on GPU `ordinal`; `rank` and `layer` name the errors.
    pub(crate) fn new(rank: usize, layer: usize, ordinal: usize) -> Result<Self, EplbCommError> {
        let cuda = |source| EplbCommError::Cuda {
            rank,
            layer: Some(layer),
            source,
        };
        let count = cuda_available().map_err(cuda)?;
        if ordinal >= count {
            return Err(cuda(CudaError::InvalidOrdinal { ordinal, count }));
        }
        let drv = |op: &str| {
            let op = format!("{op} on cuda:{ordinal}");
            move |e| driver_error(rank, Some(layer), op, e)
        };
        let ctx = CudaContext::new(ordinal).map_err(drv("creating a context"))?;
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let commit_stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        Ok(Self {
            ordinal,
            pool: StagingPool::new(Arc::clone(&stream)),
            ctx,
            stream,
            commit_stream,
            recv: None,
            send: None,
        })
    }

    /// The GPU.
    pub(crate) fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Allocates (or reuses) the page-locked receive staging laid out by `wire`, the device
    /// staging laid out by `device`, and a page-locked message buffer of `send_bytes`.
    pub(crate) fn prepare(
        &mut self,
        rank: usize,
        layer: usize,
        wire: StagingBuilder,
        device: StagingBuilder,
        send_bytes: usize,
    ) -> Result<(Staging, Staging), EplbCommError> {
        let device = device.build_device(rank, layer, &self.pool, &self.commit_stream)?;
        let wire = wire.build_pinned(rank, layer, &mut self.recv, &self.ctx)?;
        if self.send.as_ref().is_none_or(|b| b.len() < send_bytes) {
            self.send = None;
            self.send = Some(PinnedBuffer::new(&self.ctx, send_bytes).map_err(|e| {
                driver_error(
                    rank,
                    Some(layer),
                    format!("allocating {send_bytes} bytes of page-locked host memory"),
                    e,
                )
            })?);
        }
        Ok((wire, device))
    }

    /// Takes the page-locked receive staging back for the next layer.
    pub(crate) fn recycle(&mut self, wire: Staging) {
        if let StagingMemory::Pinned(buf) = wire.into_memory() {
            self.recv = Some(buf);
        }
    }

    /// Starts a layer's copies: a queue on the transfer stream.
    pub(crate) fn round_path<'a>(
        &'a mut self,
        rank: usize,
        layer: usize,
        device: &'a mut Staging,
    ) -> Result<DevicePath<'a>, EplbCommError> {
        let queue = CopyQueue::new(&self.stream, rank, layer)?;
        Ok(DevicePath {
            rank,
            layer,
            queue,
            send: &mut self.send,
            device,
        })
    }
}

/// The copies of one layer's transfer on the host path.
#[derive(Debug)]
pub(crate) struct DevicePath<'a> {
    rank: usize,
    layer: usize,
    queue: CopyQueue<'a>,
    send: &'a mut Option<PinnedBuffer>,
    /// Device staging: per round the received rows, in the order the wire staging holds
    /// them, then the local copies.
    device: &'a mut Staging,
}

impl DevicePath<'_> {
    /// Queues the local copies of the device staging (rows whose source is this rank).
    pub(crate) fn stage_local_copies(
        &mut self,
        weights: &LayerWeights<'_>,
        tensors: usize,
    ) -> Result<(), EplbCommError> {
        let rows = self.device.rows().to_vec();
        for (i, row) in rows.iter().enumerate() {
            if let RowSource::Local { src_row } = row.source {
                for t in 0..tensors {
                    let at = self.device_offset(i, t)?;
                    let (rank, layer) = (self.rank, self.layer);
                    let StagingMemory::Device { buf, .. } = self.device.memory_mut() else {
                        return Err(not_device(rank, layer));
                    };
                    self.queue.row_to_buffer(weights, t, src_row, buf, at)?;
                }
            }
        }
        Ok(())
    }

    fn device_offset(&self, row: usize, tensor: usize) -> Result<usize, EplbCommError> {
        self.device
            .tensor_range(row, tensor)
            .map(|r| r.start)
            .ok_or_else(|| {
                inconsistent(
                    self.rank,
                    self.layer,
                    format!("device staging has no row {row} tensor {tensor}"),
                )
            })
    }

    /// Packs `header` and the rows of `sends` (old content, device to host) into the
    /// page-locked message buffer, waits for the copies, and returns the message.
    pub(crate) fn pack(
        &mut self,
        layout: &LayerLayout,
        weights: &LayerWeights<'_>,
        header: &[u8],
        sends: &[&SendOp],
        deadline: Deadline,
    ) -> Result<&[u8], EplbCommError> {
        let len = header
            .len()
            .saturating_add(layout.expert_bytes().saturating_mul(sends.len()));
        let (rank, layer) = (self.rank, self.layer);
        let Some(buf) = self.send.as_mut() else {
            return Err(inconsistent(
                rank,
                layer,
                "no page-locked message buffer".into(),
            ));
        };
        if buf.len() < len {
            return Err(inconsistent(
                rank,
                layer,
                format!(
                    "a {len}-byte message does not fit the {}-byte page-locked buffer",
                    buf.len()
                ),
            ));
        }
        if let Some(head) = buf.region_mut(0..header.len()) {
            head.copy_from_slice(header);
        }
        let mut at = header.len();
        for s in sends {
            for (t, spec) in layout.tensors.iter().enumerate() {
                self.queue.row_to_pinned(weights, t, s.src_row, buf, at)?;
                at = at.saturating_add(spec.row_bytes);
            }
        }
        self.queue
            .wait(deadline, "copying rows to send to host memory")?;
        buf.region(0..len).ok_or_else(|| {
            inconsistent(
                rank,
                layer,
                format!("a {len}-byte message overflows its buffer"),
            )
        })
    }

    /// Queues the copy of the rows a round received (`wire[rows]`, page-locked) into device
    /// staging, where its first row is staged row `first_row`.
    pub(crate) fn received(
        &mut self,
        wire: &Staging,
        rows: std::ops::Range<usize>,
        first_row: usize,
    ) -> Result<(), EplbCommError> {
        if rows.is_empty() {
            return Ok(());
        }
        let at = self.device_offset(first_row, 0)?;
        let (rank, layer) = (self.rank, self.layer);
        let StagingMemory::Pinned(src) = wire.memory() else {
            return Err(inconsistent(
                rank,
                layer,
                "the wire staging is not page-locked".into(),
            ));
        };
        let StagingMemory::Device { buf, .. } = self.device.memory_mut() else {
            return Err(not_device(rank, layer));
        };
        self.queue.pinned_to_buffer(src, rows, buf, at)
    }

    /// Waits for every copy of the layer.
    pub(crate) fn finish(&self, deadline: Deadline) -> Result<(), EplbCommError> {
        self.queue.wait(deadline, "staging rows on the GPU")
    }

    /// After a failure: lets queued copies end before buffers are released.
    pub(crate) fn settle(&self) {
        self.queue.settle();
    }
}

/// A range or buffer this crate computed does not fit: an internal inconsistency.
fn inconsistent(rank: usize, layer: usize, detail: String) -> EplbCommError {
    EplbCommError::PlanMismatch {
        rank,
        layer,
        detail: format!("inconsistent staging: {detail}"),
    }
}

fn not_device(rank: usize, layer: usize) -> EplbCommError {
    inconsistent(
        rank,
        layer,
        "the host path's staging is not in device memory".into(),
    )
}
