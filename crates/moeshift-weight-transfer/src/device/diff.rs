//! [`DeviceDiff`]: the trainer-side diff of two device buffers, on the GPU.
#![allow(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::kernels::{DiffInput, Kernels, BLOCK};
use super::memory::{self, DeviceAlloc, MemError, Span};
use super::{check_storage, context, mem_error, DevicePatch, DeviceStorage};
use crate::error::TransferError;
use crate::meta::ParamMeta;
use crate::patch::PatchError;

/// Elements per block of the diff kernels.
const TILE: u64 = BLOCK as u64 * 16;

/// Diffs device parameters bit for bit on the GPU, producing [`DevicePatch`]es with
/// ascending indices (the form device engines apply).
///
/// Two passes over the data: one kernel counts the changed elements of each 4096-element
/// tile, the counts come to the host (one synchronisation, 4 bytes per tile) and are
/// prefix-summed, then a second kernel writes each tile's indices and values in order.
/// Changed means "different bits", as in [`crate::diff`]: a NaN whose payload changed is a
/// change, `0.0` → `-0.0` is a change.
///
/// ```no_run
/// # use moeshift_weight_transfer::{device::DeviceDiff, ParamMeta};
/// # use moeshift_tensor::{CudaBuffer, DType};
/// # fn demo(before: &CudaBuffer, after: &CudaBuffer) -> Result<(), moeshift_weight_transfer::TransferError> {
/// let meta = ParamMeta::new("layers.0.w", DType::Bf16, vec![1024, 1024])?;
/// let mut differ = DeviceDiff::new(0)?;
/// let patch = differ.diff(&meta, before, after)?;
/// println!("{} elements changed", patch.nnz());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DeviceDiff {
    ordinal: usize,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    counts: Option<DeviceAlloc>,
    offsets: Option<DeviceAlloc>,
}

impl DeviceDiff {
    /// A differ on device `ordinal` (loads the kernels into its primary context).
    pub fn new(ordinal: usize) -> Result<Self, TransferError> {
        let ctx = context(ordinal, 0)?;
        let cuda = |during: &str| {
            let during = during.to_string();
            move |source| TransferError::Cuda {
                rank: 0,
                device: ordinal,
                during,
                source,
            }
        };
        let stream = ctx.new_stream().map_err(cuda("creating the diff stream"))?;
        let kernels = Kernels::load(&ctx).map_err(cuda("loading the kernels"))?;
        Ok(Self {
            ordinal,
            stream,
            kernels,
            counts: None,
            offsets: None,
        })
    }

    /// The patch that turns `previous` into `current`, both the device memory of parameter
    /// `meta`. Waits for pending work on the device first (e.g. an optimizer step).
    ///
    /// Fails if either buffer is not `meta`'s size on this device, or if the parameter has
    /// more than 2³¹ elements (sparse indices are int32).
    pub fn diff(
        &mut self,
        meta: &ParamMeta,
        previous: &dyn DeviceStorage,
        current: &dyn DeviceStorage,
    ) -> Result<DevicePatch, TransferError> {
        check_storage(0, self.ordinal, meta, previous)?;
        check_storage(0, self.ordinal, meta, current)?;
        let n = meta.numel();
        if n > (i32::MAX as usize) + 1 {
            return Err(PatchError::IndexOverflow {
                name: meta.name().to_string(),
                index: n - 1,
            }
            .into());
        }
        let during = format!("diffing '{}' on the GPU", meta.name());
        let err = |e: MemError| mem_error(0, self.ordinal, during.clone())(e);
        self.stream
            .context()
            .synchronize()
            .map_err(|e| err(e.into()))?;
        let elem = meta.dtype().size_bytes();
        let tiles = (n as u64).div_ceil(TILE) as usize;
        let tiles32 = u32::try_from(tiles).map_err(|_| TransferError::Config {
            detail: format!("{during}: {tiles} tiles exceed one grid"),
        })?;
        let ctx = Arc::clone(self.stream.context());
        let fit = |slot: &mut Option<DeviceAlloc>, len: usize| -> Result<(), MemError> {
            if slot.as_ref().is_none_or(|a| a.len() < len) {
                *slot = None;
                *slot = Some(DeviceAlloc::new(&ctx, len)?);
            }
            Ok(())
        };
        fit(&mut self.counts, tiles * 4).map_err(err)?;
        fit(&mut self.offsets, tiles * 8).map_err(err)?;
        let (Some(counts), Some(offsets)) = (self.counts.as_mut(), self.offsets.as_mut()) else {
            return Err(err(MemError::Range(memory::RangeError::OutOfBounds {
                offset: 0,
                len: tiles,
                size: 0,
            })));
        };
        memory::fill(&self.stream, &mut counts.span_mut(), 0, tiles * 4, 0).map_err(err)?;
        let prev = Span::of_storage(previous);
        let cur = Span::of_storage(current);
        let input = DiffInput {
            prev: prev.addr(),
            cur: cur.addr(),
            n: n as u64,
            elem: elem as u32,
            tile: TILE,
            tiles: tiles32,
        };
        // SAFETY: both inputs were checked to hold n · elem bytes aligned to elem on this
        // device, and are borrowed until this call returns (it synchronises below); counts
        // holds `tiles` zeroed u32s.
        unsafe {
            self.kernels
                .diff_count(&self.stream, &input, counts.span().addr())
        }
        .map_err(|e| err(e.into()))?;
        let mut host_counts = vec![0u8; tiles * 4];
        memory::download(&self.stream, &counts.span(), 0, &mut host_counts).map_err(err)?;
        let mut total = 0u64;
        let mut prefix: Vec<u8> = Vec::with_capacity(tiles * 8);
        for c in host_counts.chunks_exact(4) {
            prefix.extend_from_slice(&total.to_le_bytes());
            total += u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
        let nnz = total as usize;
        let mut indices = DeviceAlloc::new(&ctx, nnz * 4).map_err(|e| err(e.into()))?;
        let mut values = DeviceAlloc::new(&ctx, nnz * elem).map_err(|e| err(e.into()))?;
        if nnz > 0 {
            memory::upload(&self.stream, &mut offsets.span_mut(), 0, &prefix).map_err(err)?;
            // SAFETY: as above; offsets holds the exclusive prefix sums of the counts of
            // these same inputs (nothing ran on them in between: the device was synchronised
            // and the inputs are borrowed), and the outputs hold nnz entries.
            unsafe {
                self.kernels.diff_write(
                    &self.stream,
                    &input,
                    offsets.span().addr(),
                    indices.span_mut().addr(),
                    values.span_mut().addr(),
                )
            }
            .map_err(|e| err(e.into()))?;
        }
        self.stream.synchronize().map_err(|e| err(e.into()))?;
        Ok(DevicePatch {
            name: meta.name().to_string(),
            dtype: meta.dtype(),
            nnz,
            indices,
            values,
        })
    }
}
