//! CUDA weights (feature `cuda`): staging in device and page-locked memory, and the copies
//! that fill it and commit it.
//!
//! * [`memory`]: device buffers (with a one-buffer pool, so a cycle of layers does not map
//!   device memory for every layer), page-locked host buffers, and a queue of checked,
//!   stream-ordered copies between them and expert rows; the only `unsafe` of this module.
//! * [`commit`]: a layer staged in device memory is committed with device-to-device copies
//!   on a stream of its own, then duplicate rows are filled from their new primaries.
//! * [`host_path`]: the `host` backend's path for CUDA weights: sent rows are copied to
//!   page-locked memory, travel over the host transport, and land in page-locked memory,
//!   from where they are copied into device staging.
//!
//! Device staging holds only the rows that change, like host staging.

pub(crate) mod commit;
pub(crate) mod host_path;
#[allow(unsafe_code)]
pub(crate) mod memory;
