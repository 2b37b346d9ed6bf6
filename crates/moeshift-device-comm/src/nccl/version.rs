//! [`NcclVersion`]: the version of the NCCL library loaded at run time.

use std::fmt;

/// A NCCL release, as reported by `ncclGetVersion`.
///
/// NCCL encodes versions as one integer: `major * 1000 + minor * 100 + patch` up to 2.8, and
/// `major * 10000 + minor * 100 + patch` from 2.9 on. [`NcclVersion::from_code`] reads both.
///
/// ```
/// use moeshift_device_comm::nccl::NcclVersion;
///
/// let v = NcclVersion::from_code(22803);
/// assert_eq!((v.major, v.minor, v.patch), (2, 28, 3));
/// assert_eq!(v.to_string(), "2.28.3");
/// assert_eq!(NcclVersion::from_code(2804), NcclVersion::new(2, 8, 4));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NcclVersion {
    /// Major version (2 for every current release).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch level.
    pub patch: u32,
}

impl NcclVersion {
    /// A version from its three parts.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Decodes NCCL's integer version code (see the type's documentation). Negative codes
    /// decode as 0.0.0.
    pub fn from_code(code: i32) -> Self {
        let code = u32::try_from(code).unwrap_or(0);
        // Codes of 2.9 and later are at least 20900; older ones are below 10000.
        if code >= 10_000 {
            Self::new(code / 10_000, (code % 10_000) / 100, code % 100)
        } else {
            Self::new(code / 1_000, (code % 1_000) / 100, code % 100)
        }
    }

    /// The integer code NCCL itself uses for this version (`NCCL_VERSION(major, minor, patch)`).
    pub fn code(&self) -> u32 {
        if self.major <= 2 && self.minor <= 8 {
            self.major * 1_000 + self.minor * 100 + self.patch
        } else {
            self.major * 10_000 + self.minor * 100 + self.patch
        }
    }
}

impl fmt::Display for NcclVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_both_encodings() {
        // NCCL_VERSION(2, 8, 4) = 2*1000 + 8*100 + 4 (old encoding).
        assert_eq!(NcclVersion::from_code(2804), NcclVersion::new(2, 8, 4));
        // NCCL_VERSION(2, 9, 6) = 2*10000 + 9*100 + 6 (new encoding).
        assert_eq!(NcclVersion::from_code(20906), NcclVersion::new(2, 9, 6));
        assert_eq!(NcclVersion::from_code(23000), NcclVersion::new(2, 30, 0));
        assert_eq!(NcclVersion::from_code(-5), NcclVersion::new(0, 0, 0));
    }

    #[test]
    fn code_round_trips() {
        for code in [2804, 20906, 21403, 22803, 23000] {
            assert_eq!(NcclVersion::from_code(code).code(), code as u32);
        }
    }

    #[test]
    fn orders_by_parts() {
        assert!(NcclVersion::new(2, 28, 0) > NcclVersion::new(2, 9, 9));
        assert!(NcclVersion::new(2, 19, 3) < NcclVersion::new(2, 28, 3));
    }
}
