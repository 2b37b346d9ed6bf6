//! CUDA probing ([`cuda_available`]) and device buffers (`CudaBuffer`, feature `cuda`).
//!
//! cudarc panics when the CUDA driver library cannot be loaded, so every entry point here
//! first checks that `libcuda` can be loaded (a check that cannot panic) and turns its absence
//! into [`CudaError::DriverNotFound`]. A machine without a GPU therefore gets typed errors,
//! never a panic. Without the `cuda` feature, [`cuda_available`] reports
//! [`CudaError::NotCompiled`].

/// Why CUDA is unavailable or a CUDA operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// The crate was built without the `cuda` feature.
    #[error("CUDA support is not compiled in (build moeshift-tensor with feature `cuda`)")]
    NotCompiled,
    /// The CUDA driver library (`libcuda`) could not be loaded.
    #[error(
        "the CUDA driver library (libcuda) could not be loaded: no NVIDIA driver on this machine"
    )]
    DriverNotFound,
    /// The driver loaded but reports no device.
    #[error("the CUDA driver reports no GPU on this machine")]
    NoDevice,
    /// A device ordinal that does not exist.
    #[error("CUDA device {ordinal} does not exist: this machine has {count} device(s)")]
    InvalidOrdinal {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// Host and device sizes of a copy differ.
    #[error("{op} on cuda:{ordinal}: the host side has {host_len} bytes, the device buffer {device_len}")]
    LengthMismatch {
        /// The copy, e.g. "copy to device".
        op: &'static str,
        /// The device.
        ordinal: usize,
        /// Bytes on the host side.
        host_len: usize,
        /// Bytes in the device buffer.
        device_len: usize,
    },
    /// A driver call failed.
    #[cfg(feature = "cuda")]
    #[error("CUDA {op} failed: {source}")]
    Driver {
        /// What was attempted, naming the device, e.g. "allocating 4096 bytes on cuda:1".
        op: String,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },
}

/// Number of CUDA devices, after checking (without risking a panic) that the driver loads.
///
/// Errors: [`CudaError::NotCompiled`] without feature `cuda`, [`CudaError::DriverNotFound`]
/// when `libcuda` cannot be loaded, [`CudaError::NoDevice`] when the driver sees no GPU, and
/// `CudaError::Driver` when initialising the driver fails otherwise.
///
/// ```
/// match moeshift_tensor::cuda_available() {
///     Ok(count) => assert!(count > 0),
///     Err(e) => println!("running without CUDA: {e}"),
/// }
/// ```
pub fn cuda_available() -> Result<usize, CudaError> {
    #[cfg(feature = "cuda")]
    {
        device::device_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(CudaError::NotCompiled)
    }
}

#[cfg(feature = "cuda")]
pub use device::CudaBuffer;

#[cfg(feature = "cuda")]
mod device {
    use std::sync::{Arc, OnceLock};

    use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DriverError};

    use super::CudaError;
    use crate::dtype::DType;
    use crate::view::{Storage, TensorView, ViewError};
    use crate::Device;

    /// Whether `libcuda` can be loaded; probed once per process.
    fn driver_present() -> bool {
        static PRESENT: OnceLock<bool> = OnceLock::new();
        // SAFETY: `is_culib_present` only tries to `dlopen` the driver library under its known
        // names and drops the handle; it calls no driver function and never panics.
        *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
    }

    pub(super) fn device_count() -> Result<usize, CudaError> {
        if !driver_present() {
            return Err(CudaError::DriverNotFound);
        }
        match CudaContext::device_count() {
            Ok(n) if n > 0 => Ok(usize::try_from(n).unwrap_or(0)),
            Ok(_) | Err(DriverError(sys::cudaError_enum::CUDA_ERROR_NO_DEVICE)) => {
                Err(CudaError::NoDevice)
            }
            Err(source) => Err(CudaError::Driver {
                op: "initialising the driver (cuInit, cuDeviceGetCount)".to_owned(),
                source,
            }),
        }
    }

    /// An owned device allocation of `len` bytes on one CUDA device, zeroed at creation.
    ///
    /// Copies to and from the host are blocking: they return once the bytes arrived. The
    /// buffer is used on the stream it was made with; work on other streams must be ordered
    /// with events (see `moeshift_sync::CpuGpuEvent`).
    #[derive(Debug)]
    pub struct CudaBuffer {
        data: CudaSlice<u8>,
        stream: Arc<CudaStream>,
        addr: u64,
        ordinal: usize,
    }

    impl CudaBuffer {
        /// `len` zeroed bytes on device `ordinal`, used through that device's default stream
        /// (of its primary context).
        ///
        /// Errors: the probe's errors ([`super::cuda_available`]),
        /// [`CudaError::InvalidOrdinal`], and `CudaError::Driver` for context creation or
        /// allocation failures.
        pub fn zeroed(ordinal: usize, len: usize) -> Result<Self, CudaError> {
            let count = device_count()?;
            if ordinal >= count {
                return Err(CudaError::InvalidOrdinal { ordinal, count });
            }
            let ctx = CudaContext::new(ordinal).map_err(|source| CudaError::Driver {
                op: format!("creating a context on cuda:{ordinal}"),
                source,
            })?;
            Self::zeroed_on(&ctx.default_stream(), len)
        }

        /// `len` zeroed bytes on `stream`'s device, used through `stream`.
        pub fn zeroed_on(stream: &Arc<CudaStream>, len: usize) -> Result<Self, CudaError> {
            let ordinal = stream.context().ordinal();
            let data = stream
                .alloc_zeros::<u8>(len)
                .map_err(|source| CudaError::Driver {
                    op: format!("allocating {len} bytes on cuda:{ordinal}"),
                    source,
                })?;
            let addr = {
                let (ptr, _record) = data.device_ptr(stream);
                ptr
            };
            let buf = Self {
                data,
                stream: Arc::clone(stream),
                addr,
                ordinal,
            };
            // The zeroing is queued; finish it so the buffer is ready for any stream.
            buf.synchronize("zeroing")?;
            Ok(buf)
        }

        /// A device buffer on `ordinal` holding a copy of `bytes`.
        pub fn from_host(ordinal: usize, bytes: &[u8]) -> Result<Self, CudaError> {
            let mut buf = Self::zeroed(ordinal, bytes.len())?;
            buf.copy_from_host(bytes)?;
            Ok(buf)
        }

        /// Length in bytes.
        pub fn len(&self) -> usize {
            self.data.len()
        }

        /// True for a zero-length buffer.
        pub fn is_empty(&self) -> bool {
            self.data.is_empty()
        }

        /// The device ordinal.
        pub fn ordinal(&self) -> usize {
            self.ordinal
        }

        /// The stream the buffer is used through.
        pub fn stream(&self) -> &Arc<CudaStream> {
            &self.stream
        }

        /// Device address of the first byte.
        pub fn addr(&self) -> u64 {
            self.addr
        }

        /// The underlying cudarc slice, for kernels and collectives.
        pub fn as_cuda_slice(&self) -> &CudaSlice<u8> {
            &self.data
        }

        /// The underlying cudarc slice, mutably.
        pub fn as_cuda_slice_mut(&mut self) -> &mut CudaSlice<u8> {
            &mut self.data
        }

        /// Copies `src` (exactly [`len`](Self::len) bytes) into the buffer and waits for it.
        pub fn copy_from_host(&mut self, src: &[u8]) -> Result<(), CudaError> {
            self.check_len("copy to device", src.len())?;
            if src.is_empty() {
                return Ok(());
            }
            self.stream
                .memcpy_htod(src, &mut self.data)
                .map_err(|source| self.driver_error("copy to device", source))?;
            self.synchronize("copy to device")
        }

        /// Copies the buffer into `dst` (exactly [`len`](Self::len) bytes) and waits for it.
        pub fn copy_to_host(&self, dst: &mut [u8]) -> Result<(), CudaError> {
            self.check_len("copy to host", dst.len())?;
            if dst.is_empty() {
                return Ok(());
            }
            self.stream
                .memcpy_dtoh(&self.data, dst)
                .map_err(|source| self.driver_error("copy to host", source))?;
            self.synchronize("copy to host")
        }

        /// The buffer's bytes, copied to a new vector.
        pub fn to_vec(&self) -> Result<Vec<u8>, CudaError> {
            let mut out = vec![0; self.len()];
            self.copy_to_host(&mut out)?;
            Ok(out)
        }

        /// The buffer as storage of `dtype` elements (a partial trailing element is left out).
        pub fn storage(&self, dtype: DType) -> Storage {
            Storage::new(
                self.addr,
                self.len() / dtype.size_bytes(),
                dtype,
                Device::Cuda(self.ordinal),
            )
        }

        /// A row-major contiguous view of `shape` at the start of the buffer. The view is a
        /// descriptor and does not keep the buffer alive.
        pub fn view(&self, shape: &[usize], dtype: DType) -> Result<TensorView, ViewError> {
            TensorView::contiguous(self.storage(dtype), shape)
        }

        fn check_len(&self, op: &'static str, host_len: usize) -> Result<(), CudaError> {
            if host_len == self.len() {
                Ok(())
            } else {
                Err(CudaError::LengthMismatch {
                    op,
                    ordinal: self.ordinal,
                    host_len,
                    device_len: self.len(),
                })
            }
        }

        fn synchronize(&self, what: &str) -> Result<(), CudaError> {
            self.stream
                .synchronize()
                .map_err(|source| self.driver_error(what, source))
        }

        fn driver_error(&self, what: &str, source: DriverError) -> CudaError {
            CudaError::Driver {
                op: format!("{what} of {} bytes on cuda:{}", self.len(), self.ordinal),
                source,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_the_probe_says_not_compiled() {
        assert!(matches!(cuda_available(), Err(CudaError::NotCompiled)));
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn probe_is_a_typed_answer_never_a_panic() {
        // SAFETY: only tries to load the driver library; calls no driver function.
        let lib_present = unsafe { cudarc::driver::sys::is_culib_present() };
        match cuda_available() {
            Ok(count) => assert!(lib_present && count > 0),
            Err(CudaError::DriverNotFound) => assert!(!lib_present),
            Err(CudaError::NoDevice) => assert!(lib_present),
            Err(e @ CudaError::Driver { .. }) => {
                // A driver that loads but fails to initialise (e.g. a container without the
                // device nodes) is still a typed error.
                assert!(lib_present);
                assert!(e.to_string().contains("initialising the driver"), "{e}");
            }
            Err(other) => panic!("unexpected probe error: {other}"),
        }
        // Allocation goes through the same probe: no panic either way.
        match CudaBuffer::zeroed(0, 64) {
            Ok(buf) => assert_eq!(buf.len(), 64),
            Err(e) => assert!(cuda_available().is_err(), "{e}"),
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn roundtrip_host_device_host_or_typed_error() {
        use crate::{DType, Device};

        let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
        match CudaBuffer::from_host(0, &bytes) {
            Ok(buf) => {
                assert_eq!(buf.len(), bytes.len());
                assert_eq!(buf.to_vec().unwrap(), bytes);
                let view = buf.view(&[16, 128], DType::Bf16).unwrap();
                assert_eq!(view.device(), Device::Cuda(0));
                let rows = view.expert_rows().unwrap();
                assert_eq!(rows.row_addr(1).unwrap(), buf.addr() + 256);
                let mut short = vec![0u8; 10];
                assert!(matches!(
                    buf.copy_to_host(&mut short),
                    Err(CudaError::LengthMismatch {
                        host_len: 10,
                        device_len: 4096,
                        ..
                    })
                ));
                let empty = CudaBuffer::zeroed(0, 0).unwrap();
                assert!(empty.is_empty());
                assert_eq!(empty.to_vec().unwrap(), Vec::<u8>::new());
                assert_eq!(empty.view(&[0, 4], DType::F32).unwrap().numel(), 0);
                let count = cuda_available().unwrap();
                assert!(matches!(
                    CudaBuffer::zeroed(count, 16),
                    Err(CudaError::InvalidOrdinal { ordinal, .. }) if ordinal == count
                ));
            }
            Err(CudaError::DriverNotFound | CudaError::NoDevice) => {
                assert!(cuda_available().is_err());
            }
            Err(other) => panic!("unexpected error without a usable GPU: {other}"),
        }
    }
}
