//! [`UniqueId`]: the 128-byte token that lets ranks find each other when creating a
//! communicator.

use std::ffi::c_char;
use std::fmt;

use cudarc::nccl::sys::ncclUniqueId;

use super::{nccl_available, result, NcclError};

/// Length of a NCCL unique id in bytes (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// A NCCL unique id: rank 0 creates it ([`UniqueId::new`]) and every rank passes the same bytes
/// to [`super::NcclComm::from_unique_id`]. It carries rank 0's bootstrap address, so it is only
/// good for one communicator.
#[derive(Clone, PartialEq, Eq)]
pub struct UniqueId {
    bytes: [u8; UNIQUE_ID_BYTES],
}

impl UniqueId {
    /// A fresh id from `ncclGetUniqueId` (needs the NCCL library, not a GPU).
    pub fn new() -> Result<Self, NcclError> {
        nccl_available()?;
        let raw = result::unique_id().map_err(|e| e.into_error(None, Vec::new(), String::new()))?;
        Ok(Self {
            bytes: raw.internal.map(|c| c as u8),
        })
    }

    /// An id received from rank 0; it must be exactly [`UNIQUE_ID_BYTES`] long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, NcclError> {
        let bytes: [u8; UNIQUE_ID_BYTES] =
            bytes.try_into().map_err(|_| NcclError::InvalidArgument {
                rank: None,
                field: "unique id",
                what: format!(
                    "a NCCL unique id is {UNIQUE_ID_BYTES} bytes, got {}",
                    bytes.len()
                ),
            })?;
        Ok(Self { bytes })
    }

    /// The id's bytes, to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8; UNIQUE_ID_BYTES] {
        &self.bytes
    }

    /// The id in NCCL's own type.
    pub(crate) fn to_raw(&self) -> ncclUniqueId {
        ncclUniqueId {
            internal: self.bytes.map(|b| b as c_char),
        }
    }
}

impl fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The id is an opaque handle; a short prefix is enough to tell two apart in logs.
        write!(f, "UniqueId(")?;
        for b in &self.bytes[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_through_the_raw_type() {
        let mut bytes = [0u8; UNIQUE_ID_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i * 37 % 256) as u8;
        }
        let id = UniqueId::from_bytes(&bytes).unwrap();
        assert_eq!(id.as_bytes(), &bytes);
        let raw = id.to_raw();
        assert_eq!(raw.internal.map(|c| c as u8), bytes);
    }

    #[test]
    fn wrong_length_is_a_typed_error() {
        let err = UniqueId::from_bytes(&[1, 2, 3]).unwrap_err();
        assert!(err.to_string().contains("128 bytes, got 3"), "{err}");
    }

    #[test]
    fn new_is_an_id_or_a_typed_error_never_a_panic() {
        match UniqueId::new() {
            // An id carries rank 0's bootstrap address: never all zeros.
            Ok(id) => assert!(id.as_bytes().iter().any(|&b| b != 0), "{id:?}"),
            Err(err) => assert!(err.is_unavailable() || err.nccl_code().is_some(), "{err}"),
        }
    }
}
