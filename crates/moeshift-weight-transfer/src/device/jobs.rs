//! What a device engine's trainer sends, whatever the caller handed it: host bytes
//! ([`crate::Outgoing`]) or device memory ([`DeviceOutgoing`]), checked and brought into one
//! form before the first byte leaves.

use cudarc::driver::CudaStream;

use super::memory::{self, MemError, Span, SpanMut};
use super::{check_storage, DeviceOutgoing, DevicePatch};
use crate::control::{ParamCount, SessionUpdate};
use crate::engine::{DenseParam, Outgoing, SparseParam};
use crate::error::TransferError;
use crate::info::UpdateInfo;
use crate::meta::ParamMeta;
use crate::patch::SparsePatch;
use crate::registry::RegistryError;

/// Where one dense parameter's bytes are.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DenseSrc<'a> {
    Host(&'a [u8]),
    Device(Span<'a>),
}

/// One sparse parameter: a host patch (already in strictly increasing form) or a device one.
#[derive(Debug)]
pub(crate) enum SparseSrc<'a> {
    Host(SparsePatch),
    Device(&'a DevicePatch),
}

impl SparseSrc<'_> {
    pub(crate) fn nnz(&self) -> usize {
        match self {
            SparseSrc::Host(p) => p.nnz(),
            SparseSrc::Device(p) => p.nnz(),
        }
    }
}

/// One checked update.
#[derive(Debug)]
pub(crate) enum Job<'a> {
    Dense {
        params: Vec<(&'a ParamMeta, DenseSrc<'a>)>,
        packed: bool,
    },
    Sparse {
        params: Vec<(&'a ParamMeta, SparseSrc<'a>)>,
    },
}

impl SessionUpdate for Job<'_> {
    fn metas(&self) -> Vec<ParamMeta> {
        match self {
            Job::Dense { params, .. } => params.iter().map(|(m, _)| (*m).clone()).collect(),
            Job::Sparse { params } => params.iter().map(|(m, _)| (*m).clone()).collect(),
        }
    }

    fn param_count(&self) -> ParamCount {
        match self {
            Job::Dense { params, .. } => ParamCount::Dense(params.len()),
            Job::Sparse { params } => ParamCount::Sparse(params.len()),
        }
    }
}

impl<'a> Job<'a> {
    /// The update info announcing this job (validated).
    pub(crate) fn info(&self) -> Result<UpdateInfo, TransferError> {
        let metas = self.metas();
        let info = match self {
            Job::Dense { packed, .. } => UpdateInfo::dense(&metas, *packed),
            Job::Sparse { params } => {
                let counts: Vec<usize> = params.iter().map(|(_, s)| s.nnz()).collect();
                UpdateInfo::sparse(&metas, &counts)
            }
        };
        info.validate()?;
        Ok(info)
    }

    pub(crate) fn is_empty(&self) -> bool {
        match self {
            Job::Dense { params, .. } => params.is_empty(),
            Job::Sparse { params } => params.is_empty(),
        }
    }

    /// A host update, checked (lengths; patches against their metadata) and with every
    /// patch in strictly increasing form.
    pub(crate) fn from_host(update: &Outgoing<'a>) -> Result<Self, TransferError> {
        match *update {
            Outgoing::Dense { params, packed } => {
                let params = params
                    .iter()
                    .map(|&DenseParam { meta, data }| {
                        if data.len() != meta.byte_len() {
                            return Err(RegistryError::DenseLength {
                                name: meta.name().to_string(),
                                expected: meta.byte_len(),
                                got: data.len(),
                            }
                            .into());
                        }
                        Ok((meta, DenseSrc::Host(data)))
                    })
                    .collect::<Result<Vec<_>, TransferError>>()?;
                Ok(Job::Dense { params, packed })
            }
            Outgoing::Sparse { params } => {
                let params = params
                    .iter()
                    .map(|&SparseParam { meta, patch }| {
                        patch.validate_for(meta)?;
                        Ok((meta, SparseSrc::Host(patch.to_strictly_increasing()?)))
                    })
                    .collect::<Result<Vec<_>, TransferError>>()?;
                Ok(Job::Sparse { params })
            }
        }
    }

    /// A device update, checked: every buffer on `device`, of its parameter's size; every
    /// patch for its parameter's name and dtype. Patch indices are checked by the workers.
    pub(crate) fn from_device(
        update: &DeviceOutgoing<'a>,
        device: usize,
    ) -> Result<Self, TransferError> {
        match *update {
            DeviceOutgoing::Dense { params, packed } => {
                let params = params
                    .iter()
                    .map(|p| {
                        check_storage(0, device, p.meta, p.data)?;
                        Ok((p.meta, DenseSrc::Device(Span::of_storage(p.data))))
                    })
                    .collect::<Result<Vec<_>, TransferError>>()?;
                Ok(Job::Dense { params, packed })
            }
            DeviceOutgoing::Sparse { params } => {
                let params = params
                    .iter()
                    .map(|p| {
                        p.patch.validate_for(p.meta)?;
                        if p.patch.ordinal() != device {
                            return Err(TransferError::Storage {
                                rank: 0,
                                name: p.meta.name().to_string(),
                                detail: format!(
                                    "its patch is on cuda:{}, this engine works on cuda:{device}",
                                    p.patch.ordinal()
                                ),
                            });
                        }
                        Ok((p.meta, SparseSrc::Device(p.patch)))
                    })
                    .collect::<Result<Vec<_>, TransferError>>()?;
                Ok(Job::Sparse { params })
            }
        }
    }
}

/// Queues a copy of `src` into `dst` at `offset` on `stream`.
pub(crate) fn fill(
    stream: &CudaStream,
    dst: &mut SpanMut<'_>,
    offset: usize,
    src: &DenseSrc<'_>,
) -> Result<(), MemError> {
    match src {
        DenseSrc::Host(bytes) => memory::upload(stream, dst, offset, bytes),
        DenseSrc::Device(span) => memory::copy(stream, dst, offset, span, 0, span.len()),
    }
}
