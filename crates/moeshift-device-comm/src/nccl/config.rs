//! The `ncclConfig_t`s of moeshift's two communicators, built the way `NCCL_CONFIG_INITIALIZER`
//! builds it in `nccl.h`: a non-blocking control communicator that shares its resources with
//! the communicators split from it, and the blocking data communicator split from it.
//!
//! NCCL reads the config defensively: it copies `min(config.size, sizeof(its own struct))` bytes,
//! rejects the struct unless `magic` is `0xcafebeef`, and resets any field newer than `version`
//! to its default. Every field left "undefined" (`INT_MIN` for integers, null for strings)
//! keeps NCCL's default, so a struct built against newer headers than the library loaded at run
//! time is safe.

use std::ffi::c_int;

use cudarc::nccl::sys::ncclConfig_t;

/// `NCCL_API_MAGIC`: the marker NCCL checks to know the struct was initialised properly.
pub const NCCL_CONFIG_MAGIC: u32 = 0xcafe_beef;

/// `NCCL_CONFIG_UNDEF_INT`: "not set, use NCCL's default" for integer fields.
pub const NCCL_CONFIG_UNDEF_INT: c_int = c_int::MIN;

/// `NCCL_VERSION_CODE` of the headers the bindings were generated from (NCCL 2.30), which
/// tells NCCL which fields of the struct this code knows about.
pub const BINDINGS_VERSION_CODE: u32 = 2 * 10_000 + 30 * 100;

/// The control communicator's config: `NCCL_CONFIG_INITIALIZER` with `blocking = 0` (calls
/// return `ncclInProgress` instead of blocking, and completion is observed by polling
/// `ncclCommGetAsyncError`) and `splitShare = 1` (a communicator split from it reuses its
/// channels and peer connections).
pub fn control_config() -> ncclConfig_t {
    let mut config = initializer();
    config.blocking = 0;
    config.splitShare = 1;
    config
}

/// The data communicator's config: `NCCL_CONFIG_INITIALIZER` with `blocking = 1`, so a group
/// of operations is launched by the calling thread instead of an extra thread per group.
pub fn data_config() -> ncclConfig_t {
    let mut config = initializer();
    config.blocking = 1;
    config
}

/// The value of `NCCL_CONFIG_INITIALIZER` for the bindings in use.
fn initializer() -> ncclConfig_t {
    ncclConfig_t {
        size: std::mem::size_of::<ncclConfig_t>(),
        magic: NCCL_CONFIG_MAGIC,
        version: BINDINGS_VERSION_CODE,
        blocking: NCCL_CONFIG_UNDEF_INT,
        cgaClusterSize: NCCL_CONFIG_UNDEF_INT,
        minCTAs: NCCL_CONFIG_UNDEF_INT,
        maxCTAs: NCCL_CONFIG_UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: NCCL_CONFIG_UNDEF_INT,
        trafficClass: NCCL_CONFIG_UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: NCCL_CONFIG_UNDEF_INT,
        CTAPolicy: NCCL_CONFIG_UNDEF_INT,
        shrinkShare: NCCL_CONFIG_UNDEF_INT,
        nvlsCTAs: NCCL_CONFIG_UNDEF_INT,
        nChannelsPerNetPeer: NCCL_CONFIG_UNDEF_INT,
        nvlinkCentricSched: NCCL_CONFIG_UNDEF_INT,
        graphUsageMode: NCCL_CONFIG_UNDEF_INT,
        numRmaCtx: NCCL_CONFIG_UNDEF_INT,
        maxP2pPeers: NCCL_CONFIG_UNDEF_INT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_match_nccl_h() {
        for c in [control_config(), data_config()] {
            // size, magic and version as NCCL_CONFIG_INITIALIZER sets them.
            assert_eq!(c.size, std::mem::size_of::<ncclConfig_t>());
            assert_eq!(c.magic, 0xcafebeef);
            assert_eq!(c.version, 23000);
        }
        assert_eq!(control_config().blocking, 0);
        assert_eq!(control_config().splitShare, 1);
        assert_eq!(data_config().blocking, 1);
        assert_eq!(data_config().splitShare, i32::MIN);
    }

    #[test]
    fn every_other_field_is_undefined() {
        let c = control_config();
        let ints = [
            c.cgaClusterSize,
            c.minCTAs,
            c.maxCTAs,
            c.trafficClass,
            c.collnetEnable,
            c.CTAPolicy,
            c.shrinkShare,
            c.nvlsCTAs,
            c.nChannelsPerNetPeer,
            c.nvlinkCentricSched,
            c.graphUsageMode,
            c.numRmaCtx,
            c.maxP2pPeers,
        ];
        assert!(ints.iter().all(|&v| v == i32::MIN), "{ints:?}");
        assert!(c.netName.is_null());
        assert!(c.commName.is_null());
    }

    #[test]
    fn struct_layout_starts_like_every_nccl_release() {
        // size_t size; unsigned magic; unsigned version; int blocking; ... (nccl.h since 2.14):
        // NCCL reads `size` first, so it must sit at offset 0 and the struct must be larger
        // than the 2.14 layout (size + 2 unsigned + 4 int + 1 pointer + 1 int).
        assert_eq!(std::mem::offset_of!(ncclConfig_t, size), 0);
        assert_eq!(std::mem::offset_of!(ncclConfig_t, magic), 8);
        assert_eq!(std::mem::offset_of!(ncclConfig_t, version), 12);
        assert_eq!(std::mem::offset_of!(ncclConfig_t, blocking), 16);
        assert!(std::mem::size_of::<ncclConfig_t>() >= 48);
    }
}
