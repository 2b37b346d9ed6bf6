//! Dtypes, devices, strided views and buffers for moeshift.
//!
//! Expert-parallel code moves expert weights between GPUs as raw bytes. This crate describes
//! those bytes: their element type ([`DType`], with PyTorch's names), where they live
//! ([`Device`]), and how a tensor is laid out in them ([`TensorView`]: shape, strides and
//! offset over a [`Storage`], with PyTorch's `select` / `narrow` / `transpose` and vLLM's
//! `is_weak_contiguous` rule). [`ExpertRows`] is the checked answer to "where are the bytes of
//! expert `i`": it refuses layouts (transposed, column-major, overlapping) where a per-expert
//! byte range would be wrong, even when vLLM's weak-contiguity check accepts them.
//!
//! Memory itself comes from [`HostBuffer`] (aligned, zeroed host memory) or, with feature
//! `cuda`, `CudaBuffer` (device memory through cudarc). [`cuda_available`] probes the driver
//! without the panics cudarc raises when `libcuda` is missing.
//!
//! # Example
//!
//! ```
//! use moeshift_tensor::{DType, HostBuffer};
//!
//! // A layer's w2 for 4 local experts, each 8×2 bf16 values.
//! let dtype: DType = "torch.bfloat16".parse()?;
//! let buf = HostBuffer::zeroed(4 * 8 * 2 * dtype.size_bytes())?;
//! let w2 = buf.view(&[4, 8, 2], dtype)?;
//! assert_eq!(w2.nbytes(), buf.len());
//!
//! // Each expert is one contiguous byte range: safe to send row by row.
//! let rows = w2.expert_rows()?;
//! assert_eq!(rows.row_bytes(), 32);
//! assert_eq!(rows.row_addr(3)?, buf.addr() + 96);
//!
//! // Swapping the expert dim inward is caught, although the view is weakly contiguous.
//! let permuted = w2.transpose(0, 1)?;
//! assert!(permuted.is_weak_contiguous());
//! assert!(permuted.expert_rows().is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//!
//! * `cuda`: `CudaBuffer` and a real [`cuda_available`] through cudarc 0.19, loaded at run
//!   time (nothing is linked at build time).
//! * `serde`: `Serialize`/`Deserialize` for [`DType`] and [`Device`] as their PyTorch names.
#![deny(missing_docs)]

pub mod cuda;
pub mod device;
pub mod dtype;
pub mod expert_rows;
pub mod host_buffer;
pub mod view;

#[cfg(feature = "cuda")]
pub use cuda::CudaBuffer;
pub use cuda::{cuda_available, CudaError};
pub use device::{Device, UnknownDevice};
pub use dtype::{DType, UnknownDType};
pub use expert_rows::{ExpertRows, ExpertRowsError};
pub use host_buffer::{HostBuffer, HostBufferError, PAGE_ALIGN};
pub use view::{Storage, TensorView, ViewError};
