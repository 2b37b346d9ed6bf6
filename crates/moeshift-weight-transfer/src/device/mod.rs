//! Device parameters and device-side sparse machinery (feature `cuda`): the
//! [`DeviceStorage`] trait engines write through, [`DevicePatch`] (a sparse patch in device
//! memory), [`DeviceDiff`] (trainer-side diff on the GPU), and [`device_digest`].
//!
//! # Sparse apply on the device
//!
//! A device engine stages every patch of a sparse update back to back in device memory
//! (see [`crate::sparse_layout`]), then checks every index of the update with one kernel
//! that records, per parameter, the first entry that is out of range or not larger than the
//! entry before it, and copies those few numbers to the host: **one device-to-host
//! synchronisation per update**, not one per patch. Only when every parameter passed does a
//! second kernel scatter the values in place. On the trainer, a third kernel gathers every
//! device patch of an update into its staging area in one launch. Indices must strictly
//! increase within a patch, which makes the scatter race-free; host patches are brought into
//! that form by [`SparsePatch::to_strictly_increasing`] (same effect on apply), and
//! [`DeviceDiff`] produces it directly.
//!
//! Kernels ship as PTX text (ISA 8.0, `sm_80`) embedded in the crate and JIT-compiled by the
//! driver when an engine starts; no CUDA toolkit or NVRTC is needed at build or run time.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use moeshift_tensor::{cuda_available, CudaBuffer, CudaError, DType};

use crate::digest::{Digest, Hasher};
use crate::engine::PreparedUpdate;
use crate::error::TransferError;
use crate::meta::ParamMeta;
use crate::patch::{PatchError, SparsePatch};
use crate::registry::{ParamRegistry, ParamStorage};

mod diff;
pub(crate) mod jobs;
pub(crate) mod kernels;
pub(crate) mod memory;
pub(crate) mod sparse;

pub use diff::DeviceDiff;

use memory::{DeviceAlloc, MemError, Span};

/// Device memory backing one parameter, written by device engines in place.
///
/// # Safety
///
/// Implementors guarantee that `device_addr() .. device_addr() + byte_len()` is memory of
/// CUDA device `ordinal()`, allocated in that device's primary context, that stays allocated
/// while the value lives, and that a `&mut` borrow of the value gives exclusive access to
/// it: engines write it while they hold `&mut`, and read it while they hold `&`.
#[allow(unsafe_code)]
pub unsafe trait DeviceStorage: ParamStorage {
    /// Device address of the first byte.
    fn device_addr(&self) -> u64;
    /// The CUDA device ordinal.
    fn ordinal(&self) -> usize;
}

impl ParamStorage for CudaBuffer {
    fn byte_len(&self) -> usize {
        self.len()
    }
}

// SAFETY: a `CudaBuffer` owns its allocation on `ordinal()` (made in the primary context by
// `CudaBuffer::zeroed`), frees it only on drop, and hands out its address only through
// `&self` / `&mut self`.
#[allow(unsafe_code)]
unsafe impl DeviceStorage for CudaBuffer {
    fn device_addr(&self) -> u64 {
        self.addr()
    }
    fn ordinal(&self) -> usize {
        CudaBuffer::ordinal(self)
    }
}

// SAFETY: forwards to the boxed implementor, whose guarantees carry over.
#[allow(unsafe_code)]
unsafe impl<T: DeviceStorage + ?Sized> DeviceStorage for Box<T> {
    fn device_addr(&self) -> u64 {
        (**self).device_addr()
    }
    fn ordinal(&self) -> usize {
        (**self).ordinal()
    }
}

/// The primary context of device `ordinal`, after probing the driver (cudarc panics when
/// `libcuda` is missing; this returns a typed error instead).
pub(crate) fn context(ordinal: usize, rank: usize) -> Result<Arc<CudaContext>, TransferError> {
    let count = cuda_available().map_err(|e| TransferError::Config {
        detail: format!("rank {rank}: CUDA is not usable: {e}"),
    })?;
    if ordinal >= count {
        return Err(TransferError::Config {
            detail: format!(
                "rank {rank}: {}",
                CudaError::InvalidOrdinal { ordinal, count }
            ),
        });
    }
    CudaContext::new(ordinal).map_err(|source| TransferError::Cuda {
        rank,
        device: ordinal,
        during: "creating the CUDA context".into(),
        source,
    })
}

/// Turns a device-range error into a [`TransferError`] naming the rank, device and step.
pub(crate) fn mem_error(
    rank: usize,
    device: usize,
    during: impl Into<String>,
) -> impl FnOnce(MemError) -> TransferError {
    let during = during.into();
    move |e| match e {
        MemError::Driver(source) => TransferError::Cuda {
            rank,
            device,
            during,
            source,
        },
        MemError::Nccl(source) => TransferError::Nccl {
            rank,
            during,
            source: Box::new(source),
        },
        MemError::Range(e) => TransferError::Config {
            detail: format!("rank {rank} (cuda:{device}): {during}: {e}"),
        },
    }
}

/// Checks that `storage` can be used by an engine on `device` for `meta`: same device, the
/// parameter's byte length, an address aligned to the element size.
pub(crate) fn check_storage<S: DeviceStorage + ?Sized>(
    rank: usize,
    device: usize,
    meta: &ParamMeta,
    storage: &S,
) -> Result<(), TransferError> {
    let problem = if storage.ordinal() != device {
        Some(format!(
            "its memory is on cuda:{}, this engine works on cuda:{device}",
            storage.ordinal()
        ))
    } else if storage.byte_len() != meta.byte_len() {
        Some(format!(
            "its memory holds {} bytes, the parameter needs {}",
            storage.byte_len(),
            meta.byte_len()
        ))
    } else if storage.device_addr() % meta.dtype().size_bytes() as u64 != 0 {
        Some(format!(
            "its address {:#x} is not aligned to its {}-byte elements",
            storage.device_addr(),
            meta.dtype().size_bytes()
        ))
    } else {
        None
    };
    match problem {
        Some(detail) => Err(TransferError::Storage {
            rank,
            name: meta.name().to_string(),
            detail,
        }),
        None => Ok(()),
    }
}

/// Checks, before a worker votes, that every parameter of `update` is in `registry` with
/// memory an engine on `device` can write (see [`check_storage`]); the first problem.
pub(crate) fn check_storages<S: DeviceStorage>(
    rank: usize,
    device: usize,
    update: &PreparedUpdate,
    registry: &mut ParamRegistry<S>,
) -> Result<(), TransferError> {
    let unusable = update
        .update
        .params
        .iter()
        .zip(&update.slots)
        .find_map(|(meta, &slot)| {
            registry
                .storages_mut(&[slot])
                .map_err(TransferError::from)
                .and_then(|s| match s.first() {
                    Some(s) => check_storage(rank, device, meta, &**s),
                    None => Ok(()),
                })
                .err()
        });
    match unusable {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A sparse patch in device memory: int32 indices that strictly increase, and one value per
/// index in the parameter's dtype.
///
/// Made by [`DevicePatch::upload`] from a host [`SparsePatch`] or by [`DeviceDiff::diff`].
#[derive(Debug)]
pub struct DevicePatch {
    name: String,
    dtype: DType,
    nnz: usize,
    indices: DeviceAlloc,
    values: DeviceAlloc,
}

impl DevicePatch {
    /// Copies `patch` to device `ordinal`, in its strictly increasing form
    /// ([`SparsePatch::to_strictly_increasing`]: same effect on apply).
    pub fn upload(ordinal: usize, patch: &SparsePatch) -> Result<Self, TransferError> {
        let ctx = context(ordinal, 0)?;
        let patch = patch.to_strictly_increasing()?;
        let stream = ctx.default_stream();
        let during = format!("uploading the patch of '{}'", patch.name);
        let err = |e| mem_error(0, ordinal, during.clone())(e);
        let mut indices =
            DeviceAlloc::new(&ctx, patch.indices.len() * 4).map_err(|e| err(e.into()))?;
        let mut values = DeviceAlloc::new(&ctx, patch.values.len()).map_err(|e| err(e.into()))?;
        memory::upload(&stream, &mut indices.span_mut(), 0, &patch.index_bytes()).map_err(err)?;
        memory::upload(&stream, &mut values.span_mut(), 0, &patch.values).map_err(err)?;
        stream.synchronize().map_err(|e| err(e.into()))?;
        Ok(Self {
            nnz: patch.indices.len(),
            name: patch.name,
            dtype: patch.dtype,
            indices,
            values,
        })
    }

    /// The parameter's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The values' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of entries.
    pub fn nnz(&self) -> usize {
        self.nnz
    }

    /// Bytes on the wire: 4 per index plus the values.
    pub fn payload_bytes(&self) -> usize {
        self.nnz * (4 + self.dtype.size_bytes())
    }

    /// The device it lives on.
    pub fn ordinal(&self) -> usize {
        self.indices.span().ordinal()
    }

    /// Checks the patch against `param` the way the host does (name, dtype), without reading
    /// indices (the receiving side checks those on its device).
    pub fn validate_for(&self, param: &ParamMeta) -> Result<(), PatchError> {
        if self.name != param.name() {
            return Err(PatchError::NameMismatch {
                patch: self.name.clone(),
                param: param.name().to_string(),
            });
        }
        if self.dtype != param.dtype() {
            return Err(PatchError::DTypeMismatch {
                name: self.name.clone(),
                patch: self.dtype.name().to_string(),
                param: param.dtype().name().to_string(),
            });
        }
        if self.nnz > param.numel() {
            return Err(PatchError::CountMismatch {
                name: self.name.clone(),
                expected: param.numel(),
                got: self.nnz,
            });
        }
        Ok(())
    }

    /// Copies the patch back to the host.
    pub fn to_host(&self) -> Result<SparsePatch, TransferError> {
        let ctx = context(self.ordinal(), 0)?;
        let stream = ctx.default_stream();
        let err = mem_error(
            0,
            self.ordinal(),
            format!("downloading the patch of '{}'", self.name),
        );
        let mut index_bytes = vec![0u8; self.nnz * 4];
        let mut values = vec![0u8; self.nnz * self.dtype.size_bytes()];
        memory::download(&stream, &self.indices.span(), 0, &mut index_bytes)
            .and_then(|()| memory::download(&stream, &self.values.span(), 0, &mut values))
            .map_err(err)?;
        let indices = index_bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(SparsePatch::new(
            self.name.clone(),
            self.dtype,
            indices,
            values,
        )?)
    }

    pub(crate) fn index_span(&self) -> Span<'_> {
        self.indices.span()
    }

    pub(crate) fn value_span(&self) -> Span<'_> {
        self.values.span()
    }
}

/// Bytes copied to the host per step while hashing device memory.
const DIGEST_STEP: usize = 64 << 20;

/// SHA-256 over `(name, bytes)` pairs in order, each length-prefixed: the same digest
/// [`ParamRegistry::digest`] gives for host parameters with the same names and bytes. Reads
/// device memory through the host in 64 MiB steps, after synchronising each device.
pub fn device_digest<'a, I>(params: I) -> Result<Digest, TransferError>
where
    I: IntoIterator<Item = (&'a str, &'a dyn DeviceStorage)>,
{
    let mut h = Hasher::new();
    let mut contexts: Vec<(usize, Arc<CudaContext>, Arc<CudaStream>)> = Vec::new();
    let mut buf = Vec::new();
    for (name, storage) in params {
        let ordinal = storage.ordinal();
        let stream = match contexts.iter().find(|(o, _, _)| *o == ordinal) {
            Some((_, _, s)) => Arc::clone(s),
            None => {
                let ctx = context(ordinal, 0)?;
                ctx.synchronize().map_err(|source| TransferError::Cuda {
                    rank: 0,
                    device: ordinal,
                    during: "synchronising before hashing".into(),
                    source,
                })?;
                let stream = ctx.default_stream();
                contexts.push((ordinal, ctx, Arc::clone(&stream)));
                stream
            }
        };
        let len = storage.byte_len();
        h.update_framed(name.as_bytes().as_ref());
        h.update(&(len as u64).to_le_bytes());
        let span = Span::of_storage(storage);
        let mut at = 0;
        while at < len {
            let n = DIGEST_STEP.min(len - at);
            buf.resize(n, 0);
            memory::download(&stream, &span, at, &mut buf).map_err(mem_error(
                0,
                ordinal,
                format!("reading '{name}' to hash it"),
            ))?;
            h.update(&buf);
            at += n;
        }
    }
    Ok(h.finish())
}

impl<S: DeviceStorage> ParamRegistry<S> {
    /// [`device_digest`] of every registered parameter in registration order: equal to
    /// [`ParamRegistry::digest`] of a host registry holding the same names and bytes.
    pub fn device_digest(&self) -> Result<Digest, TransferError> {
        device_digest(
            self.iter()
                .map(|r| (r.meta().name(), r.storage() as &dyn DeviceStorage)),
        )
    }
}

/// One parameter's full new value in device memory, trainer side.
#[derive(Clone, Copy)]
pub struct DeviceDenseParam<'a> {
    /// Name, dtype and shape.
    pub meta: &'a ParamMeta,
    /// `meta.byte_len()` bytes on the engine's device.
    pub data: &'a dyn DeviceStorage,
}

impl std::fmt::Debug for DeviceDenseParam<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceDenseParam")
            .field("meta", self.meta)
            .field("ordinal", &self.data.ordinal())
            .field("bytes", &self.data.byte_len())
            .finish()
    }
}

/// One parameter's sparse patch in device memory, trainer side.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSparseParam<'a> {
    /// Name, dtype and shape.
    pub meta: &'a ParamMeta,
    /// The patch (strictly increasing indices), on the engine's device.
    pub patch: &'a DevicePatch,
}

/// One parameter for automatic dense-or-sparse sends from device memory.
#[derive(Clone, Copy)]
pub struct DeviceAutoParam<'a> {
    /// Name, dtype and shape.
    pub meta: &'a ParamMeta,
    /// The bytes the workers hold (the last value sent).
    pub previous: &'a dyn DeviceStorage,
    /// The new bytes.
    pub current: &'a dyn DeviceStorage,
}

impl std::fmt::Debug for DeviceAutoParam<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAutoParam")
            .field("meta", self.meta)
            .finish()
    }
}

/// One update of a session whose values are in device memory, trainer side.
#[derive(Debug, Clone, Copy)]
pub enum DeviceOutgoing<'a> {
    /// Full values.
    Dense {
        /// The parameters.
        params: &'a [DeviceDenseParam<'a>],
        /// Send packed in chunks.
        packed: bool,
    },
    /// Patches.
    Sparse {
        /// The parameters.
        params: &'a [DeviceSparseParam<'a>],
    },
}
