//! The fixed 64-byte header the CUDA managers exchange before moving rows, and the byte
//! layout of the per-row pick metadata that travels with the rows.
//!
//! Every rank sends every peer (itself included) one [`DeviceHeader`] per call: status,
//! the sender's token count (in a combine: the rows it expects back from that peer), the
//! rows of this message, the parameters every rank must agree on (layer, hidden size,
//! top-k, placement fingerprint, element type, manager) and the call number. Each rank's
//! status and parameters reach every rank, so every rank takes the same decision: go on,
//! or fail with the rank at fault named.
//!
//! Pick metadata: each row sent to a rank carries `top_k` entries of 8 bytes, `(slot: u32,
//! weight: f32)` little-endian, in pick order; picks served by another rank have slot
//! `u32::MAX` (`NO_PICK`). This is the `top_k × 8` bytes per token of the workspace sizing.

use super::error::All2AllError;
use super::table_kernels::HeaderFields;
use super::wire::{STATUS_OK, STATUS_REJECTED};

/// First word of a dispatch header.
pub(crate) const DISPATCH: u32 = u32::from_le_bytes(*b"MgDp");
/// First word of a combine header.
pub(crate) const COMBINE: u32 = u32::from_le_bytes(*b"MgCb");
/// Flag: the sender's batch does not fit the one-sided workspace; it wrote no rows.
pub(crate) const FLAG_NEEDS_RESIZE: u16 = 1;
/// Slot of a pick entry that another rank serves (the kernels' `NO_PICK`).
#[cfg(test)]
pub(crate) const NO_PICK: u32 = u32::MAX;
/// Bytes of one pick entry.
pub(crate) const PICK_BYTES: usize = 8;

/// Manager codes carried in headers.
pub(crate) const MANAGER_AGRS: u8 = 1;
pub(crate) const MANAGER_A2AV: u8 = 2;
pub(crate) const MANAGER_ONE_SIDED: u8 = 3;

/// Where the kernel that fills in headers on the GPU writes the row count and the status.
pub(crate) const HEADER_FIELDS: HeaderFields = HeaderFields {
    len: DeviceHeader::LEN,
    rows_at: DeviceHeader::ROWS_AT,
    status_at: DeviceHeader::STATUS_AT,
    rejected: STATUS_REJECTED,
};

/// One message header (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct DeviceHeader {
    pub magic: u32,
    pub status: u32,
    /// Dispatch: the tokens the sender dispatches. Combine: the rows the sender expects
    /// back from this receiver.
    pub tokens: u64,
    /// Rows of this message (to this receiver).
    pub rows: u64,
    /// One-sided dispatch: the row where this receiver writes its combine rows in the
    /// sender's combine area.
    pub combine_offset: u64,
    pub hidden_size: u32,
    pub top_k: u32,
    pub layer: u64,
    pub fingerprint: u64,
    pub dtype: u8,
    pub manager: u8,
    pub flags: u16,
    pub seq: u32,
}

impl DeviceHeader {
    pub(crate) const LEN: usize = 64;
    /// Byte offset of `status` (a u32) in the encoded header.
    pub(crate) const STATUS_AT: usize = 4;
    /// Byte offset of `rows` (a u64) in the encoded header.
    pub(crate) const ROWS_AT: usize = 16;

    /// The header of a rank that rejected its own input.
    pub(crate) fn rejected(magic: u32, manager: u8, seq: u32) -> Self {
        Self {
            magic,
            status: STATUS_REJECTED,
            manager,
            seq,
            ..Self::default()
        }
    }

    pub(crate) fn is_ok(&self) -> bool {
        self.status == STATUS_OK
    }

    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.magic.to_le_bytes());
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&self.tokens.to_le_bytes());
        out.extend_from_slice(&self.rows.to_le_bytes());
        out.extend_from_slice(&self.combine_offset.to_le_bytes());
        out.extend_from_slice(&self.hidden_size.to_le_bytes());
        out.extend_from_slice(&self.top_k.to_le_bytes());
        out.extend_from_slice(&self.layer.to_le_bytes());
        out.extend_from_slice(&self.fingerprint.to_le_bytes());
        out.push(self.dtype);
        out.push(self.manager);
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
    }

    /// Decodes the header at the start of `b` (at least [`Self::LEN`] bytes).
    pub(crate) fn read(b: &[u8]) -> Result<Self, String> {
        let b = b.get(..Self::LEN).ok_or_else(|| {
            format!(
                "a header needs {} bytes, the message has {}",
                Self::LEN,
                b.len()
            )
        })?;
        let mut pos = 0usize;
        let mut take = |n: usize| {
            let s = b.get(pos..pos + n).unwrap_or_default();
            pos += n;
            s
        };
        let u32_of = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap_or([0; 4]));
        let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
        let magic = u32_of(take(4));
        if magic != DISPATCH && magic != COMBINE {
            return Err(format!("not a header (first word {magic:#010x})"));
        }
        Ok(Self {
            magic,
            status: u32_of(take(4)),
            tokens: u64_of(take(8)),
            rows: u64_of(take(8)),
            combine_offset: u64_of(take(8)),
            hidden_size: u32_of(take(4)),
            top_k: u32_of(take(4)),
            layer: u64_of(take(8)),
            fingerprint: u64_of(take(8)),
            dtype: take(1).first().copied().unwrap_or(0),
            manager: take(1).first().copied().unwrap_or(0),
            flags: u16::from_le_bytes(take(2).try_into().unwrap_or([0; 2])),
            seq: u32_of(take(4)),
        })
    }

    /// The first parameter in which `self` (a peer's header) differs from `ours`, as
    /// `(field, ours, theirs)`.
    pub(crate) fn mismatch(&self, ours: &Self) -> Option<(&'static str, u64, u64)> {
        [
            ("manager", u64::from(ours.manager), u64::from(self.manager)),
            ("call number", u64::from(ours.seq), u64::from(self.seq)),
            ("message kind", u64::from(ours.magic), u64::from(self.magic)),
            ("layer", ours.layer, self.layer),
            (
                "hidden size",
                u64::from(ours.hidden_size),
                u64::from(self.hidden_size),
            ),
            ("top-k", u64::from(ours.top_k), u64::from(self.top_k)),
            ("placement fingerprint", ours.fingerprint, self.fingerprint),
            ("element type", u64::from(ours.dtype), u64::from(self.dtype)),
        ]
        .into_iter()
        .find(|(_, a, b)| a != b)
    }
}

/// Checks every rank's header (`headers[r]` from group rank `r`) against this rank's own
/// parameters `ours`: a rejected status fails with [`All2AllError::PeerRejected`] naming the
/// lowest such rank, other parameters with [`All2AllError::PeerMismatch`]. `errors` builds
/// the errors with this rank's names.
pub(crate) fn check_headers(
    headers: &[DeviceHeader],
    ours: &DeviceHeader,
    errors: &dyn HeaderErrors,
) -> Result<(), All2AllError> {
    if let Some(r) = headers.iter().position(|h| !h.is_ok()) {
        return Err(errors.rejected(r));
    }
    for (r, h) in headers.iter().enumerate() {
        if let Some((field, a, b)) = h.mismatch(ours) {
            return Err(errors.mismatch(r, field, a, b));
        }
    }
    Ok(())
}

/// How [`check_headers`] names the ranks in its errors.
pub(crate) trait HeaderErrors {
    /// Group rank `peer` rejected its own input.
    fn rejected(&self, peer: usize) -> All2AllError;
    /// Group rank `peer` has `theirs` where this rank has `ours`.
    fn mismatch(&self, peer: usize, field: &'static str, ours: u64, theirs: u64) -> All2AllError;
}

/// The bytes of one pick entry.
#[cfg(test)]
pub(crate) fn pick_entry(slot: u32, weight: f32) -> [u8; PICK_BYTES] {
    let (s, w) = (slot.to_le_bytes(), weight.to_le_bytes());
    [s[0], s[1], s[2], s[3], w[0], w[1], w[2], w[3]]
}

/// Appends one pick entry.
#[cfg(test)]
pub(crate) fn push_pick(out: &mut Vec<u8>, slot: u32, weight: f32) {
    out.extend_from_slice(&pick_entry(slot, weight));
}

/// Pick entry `i` of `meta`.
#[cfg(test)]
pub(crate) fn pick_at(meta: &[u8], i: usize) -> Option<(u32, f32)> {
    let e = meta.get(i * PICK_BYTES..(i + 1) * PICK_BYTES)?;
    let slot = u32::from_le_bytes(e.get(..4)?.try_into().ok()?);
    let weight = f32::from_le_bytes(e.get(4..8)?.try_into().ok()?);
    Some((slot, weight))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceHeader {
        DeviceHeader {
            magic: DISPATCH,
            status: STATUS_OK,
            tokens: 4096,
            rows: 4079,
            combine_offset: 17,
            hidden_size: 7168,
            top_k: 8,
            layer: 3,
            fingerprint: 0x0123_4567_89ab_cdef,
            dtype: 1,
            manager: MANAGER_ONE_SIDED,
            flags: FLAG_NEEDS_RESIZE,
            seq: 42,
        }
    }

    #[test]
    fn header_round_trips_in_64_bytes() {
        let h = sample();
        let mut bytes = Vec::new();
        h.write(&mut bytes);
        assert_eq!(bytes.len(), DeviceHeader::LEN);
        assert_eq!(DeviceHeader::read(&bytes), Ok(h));
        // The magic word is the first four bytes, little-endian.
        assert_eq!(&bytes[..4], b"MgDp");
        assert!(DeviceHeader::read(&bytes[..63]).is_err());
        assert!(DeviceHeader::read(&[0u8; 64]).is_err());
        // The GPU writes the row count and the status at these offsets.
        let at = |i: usize, n: usize| bytes[i..i + n].to_vec();
        assert_eq!(at(DeviceHeader::ROWS_AT, 8), 4079u64.to_le_bytes());
        assert_eq!(at(DeviceHeader::STATUS_AT, 4), STATUS_OK.to_le_bytes());
    }

    #[test]
    fn mismatch_names_the_first_differing_parameter() {
        let ours = sample();
        let mut theirs = ours;
        theirs.rows = 1; // per-message fields may differ
        theirs.tokens = 2;
        theirs.flags = 0;
        assert_eq!(theirs.mismatch(&ours), None);
        theirs.dtype = 3;
        assert_eq!(theirs.mismatch(&ours), Some(("element type", 1, 3)));
        theirs.seq = 41;
        assert_eq!(theirs.mismatch(&ours), Some(("call number", 42, 41)));
    }

    struct Names;
    impl HeaderErrors for Names {
        fn rejected(&self, peer: usize) -> All2AllError {
            All2AllError::Placement {
                layer: peer,
                detail: "rejected".into(),
            }
        }
        fn mismatch(&self, peer: usize, field: &'static str, _: u64, _: u64) -> All2AllError {
            All2AllError::Placement {
                layer: peer,
                detail: field.into(),
            }
        }
    }

    #[test]
    fn rejection_wins_over_mismatch_and_names_the_lowest_rank() {
        let ours = sample();
        let mut bad = ours;
        bad.top_k = 4;
        let rej = DeviceHeader::rejected(DISPATCH, MANAGER_ONE_SIDED, 42);
        let err = check_headers(&[ours, bad, rej], &ours, &Names).expect_err("rejected");
        assert!(
            matches!(err, All2AllError::Placement { layer: 2, ref detail } if detail == "rejected")
        );
        let err = check_headers(&[ours, bad, ours], &ours, &Names).expect_err("top-k");
        assert!(
            matches!(err, All2AllError::Placement { layer: 1, ref detail } if detail == "top-k")
        );
        assert!(check_headers(&[ours, ours], &ours, &Names).is_ok());
    }

    #[test]
    fn pick_entries_round_trip() {
        let mut meta = Vec::new();
        push_pick(&mut meta, 5, 0.25);
        push_pick(&mut meta, NO_PICK, 1.5);
        assert_eq!(meta.len(), 2 * PICK_BYTES);
        assert_eq!(pick_at(&meta, 0), Some((5, 0.25)));
        assert_eq!(pick_at(&meta, 1), Some((NO_PICK, 1.5)));
        assert_eq!(pick_at(&meta, 2), None);
    }
}
