//! The host transport's frame header.
//!
//! Every message between two ranks of a host group starts with a fixed 40-byte header, all
//! integers little-endian:
//!
//! | bytes | field | meaning |
//! | --- | --- | --- |
//! | 0..4 | magic | `b"MSHF"` |
//! | 4 | version | [`FRAME_VERSION`] |
//! | 5 | kind | [`OpKind`] of the operation that sent it |
//! | 6 | code | operation detail: element type and reduction of an all-reduce, else 0 |
//! | 7 | reserved | 0 |
//! | 8..16 | group id | hash of the group's name and round |
//! | 16..24 | sequence | number of this message among those the sender sent to this receiver in the group |
//! | 24..32 | aux | operation detail: the root of a broadcast, the element count of an all-reduce, else 0 |
//! | 32..40 | payload length | bytes that follow the header |
//!
//! The receiver compares each header with what its own call expects, so two ranks that call
//! different operations, the same one with different sizes, or in a different order, get a
//! [`Mismatch`](crate::CommError::Mismatch) naming both sides' operations instead of
//! silently reading each other's bytes.

use std::fmt;

/// First four bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"MSHF";
/// Version of the frame layout.
pub const FRAME_VERSION: u8 = 1;
/// Size of an encoded header.
pub const HEADER_LEN: usize = 40;

/// What kind of operation sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpKind {
    /// Connection handshake from the connecting rank.
    Hello = 1,
    /// Handshake answer.
    HelloAck = 2,
    /// The sender gave up on the group; the payload says why.
    Abort = 3,
    /// Point-to-point send.
    Send = 4,
    /// Barrier token.
    Barrier = 5,
    /// Broadcast from a root.
    Broadcast = 6,
    /// All-gather contribution.
    AllGather = 7,
    /// All-to-all (variable sizes) part.
    AllToAllV = 8,
    /// All-reduce contribution.
    AllReduce = 9,
}

impl OpKind {
    /// Decodes a kind byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::HelloAck,
            3 => Self::Abort,
            4 => Self::Send,
            5 => Self::Barrier,
            6 => Self::Broadcast,
            7 => Self::AllGather,
            8 => Self::AllToAllV,
            9 => Self::AllReduce,
            _ => return None,
        })
    }

    /// The operation's name as callers know it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Hello => "hello",
            Self::HelloAck => "hello_ack",
            Self::Abort => "abort",
            Self::Send => "send",
            Self::Barrier => "barrier",
            Self::Broadcast => "broadcast",
            Self::AllGather => "all_gather",
            Self::AllToAllV => "all_to_all_v",
            Self::AllReduce => "all_reduce",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The sending operation.
    pub kind: OpKind,
    /// Operation detail (all-reduce element type and reduction), else 0.
    pub code: u8,
    /// The group the frame belongs to.
    pub group_id: u64,
    /// Per sender→receiver message number.
    pub seq: u64,
    /// Operation detail (broadcast root, all-reduce element count), else 0.
    pub aux: u64,
    /// Bytes of payload after the header.
    pub payload_len: u64,
}

/// Why bytes could not be decoded as a frame header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not [`FRAME_MAGIC`]: the stream is out of step or the peer
    /// is not a moeshift host transport.
    #[error("bad frame magic {found:02x?} (expected {FRAME_MAGIC:02x?}): the stream is out of step or the peer is not a moeshift host transport")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A frame of another layout version.
    #[error("frame version {found}, this build speaks version {FRAME_VERSION}")]
    BadVersion {
        /// The version found.
        found: u8,
    },
    /// An operation kind this build does not know.
    #[error("unknown operation kind {found} in frame header")]
    BadKind {
        /// The kind byte found.
        found: u8,
    },
}

impl FrameHeader {
    /// Encodes the header into its 40 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&FRAME_MAGIC);
        out[4] = FRAME_VERSION;
        out[5] = self.kind as u8;
        out[6] = self.code;
        out[7] = 0;
        out[8..16].copy_from_slice(&self.group_id.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.aux.to_le_bytes());
        out[32..40].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    /// Decodes 40 bytes, checking magic, version and kind.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&bytes[0..4]);
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        if bytes[4] != FRAME_VERSION {
            return Err(FrameError::BadVersion { found: bytes[4] });
        }
        let kind = OpKind::from_u8(bytes[5]).ok_or(FrameError::BadKind { found: bytes[5] })?;
        Ok(Self {
            kind,
            code: bytes[6],
            group_id: word(8),
            seq: word(16),
            aux: word(24),
            payload_len: word(32),
        })
    }
}

/// What a receiving operation expects the next frame from one peer to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expect {
    pub kind: OpKind,
    pub code: u8,
    pub seq: u64,
    pub aux: u64,
    /// `None` when any size is accepted.
    pub len: Option<u64>,
}

impl Expect {
    /// True when `h` is exactly the expected frame.
    pub fn matches(&self, h: &FrameHeader) -> bool {
        h.kind == self.kind
            && h.code == self.code
            && h.seq == self.seq
            && h.aux == self.aux
            && self.len.is_none_or(|l| l == h.payload_len)
    }

    /// Describes the receiving side's operation for a mismatch message.
    pub fn describe(&self) -> String {
        describe(self.kind, self.code, self.seq, self.aux, self.len)
    }
}

/// Describes the sending side's operation for a mismatch message.
pub(crate) fn describe_header(h: &FrameHeader) -> String {
    describe(h.kind, h.code, h.seq, h.aux, Some(h.payload_len))
}

fn describe(kind: OpKind, code: u8, seq: u64, aux: u64, len: Option<u64>) -> String {
    let mut s = format!("{kind} (message #{seq}");
    match kind {
        OpKind::Broadcast => s.push_str(&format!(", root {aux}")),
        OpKind::AllReduce => match super::reduce::describe_code(code) {
            Some(what) => s.push_str(&format!(", {what}, {aux} elements")),
            None => s.push_str(&format!(", code {code}, {aux} elements")),
        },
        _ => {}
    }
    match len {
        Some(l) => s.push_str(&format!(", {l} bytes)")),
        None => s.push_str(", any size)"),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_matches_the_documented_table() {
        let h = FrameHeader {
            kind: OpKind::Broadcast,
            code: 0,
            group_id: 0x0102_0304_0506_0708,
            seq: 9,
            aux: 3,
            payload_len: 0x1_0000_0000,
        };
        let b = h.encode();
        assert_eq!(&b[0..4], b"MSHF");
        assert_eq!(b[4], 1);
        assert_eq!(b[5], 6);
        assert_eq!(b[6], 0);
        assert_eq!(b[7], 0);
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..24], &[9, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[24..32], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[32..40], &[0, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn bad_magic_version_and_kind_are_rejected() {
        let good = FrameHeader {
            kind: OpKind::Send,
            code: 0,
            group_id: 1,
            seq: 2,
            aux: 0,
            payload_len: 3,
        }
        .encode();
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(FrameError::BadMagic { .. })
        ));
        let mut b = good;
        b[4] = 2;
        assert_eq!(
            FrameHeader::decode(&b),
            Err(FrameError::BadVersion { found: 2 })
        );
        for kind in [0u8, 10, 255] {
            let mut b = good;
            b[5] = kind;
            assert_eq!(
                FrameHeader::decode(&b),
                Err(FrameError::BadKind { found: kind })
            );
        }
    }

    #[test]
    fn expectation_checks_every_field() {
        let h = FrameHeader {
            kind: OpKind::AllGather,
            code: 0,
            group_id: 7,
            seq: 4,
            aux: 0,
            payload_len: 16,
        };
        let e = Expect {
            kind: OpKind::AllGather,
            code: 0,
            seq: 4,
            aux: 0,
            len: Some(16),
        };
        assert!(e.matches(&h));
        assert!(Expect { len: None, ..e }.matches(&h));
        assert!(!Expect { len: Some(8), ..e }.matches(&h));
        assert!(!Expect { seq: 5, ..e }.matches(&h));
        assert!(!Expect { aux: 1, ..e }.matches(&h));
        assert!(!Expect { code: 1, ..e }.matches(&h));
        assert!(!Expect {
            kind: OpKind::Broadcast,
            ..e
        }
        .matches(&h));
    }

    #[test]
    fn descriptions_name_operation_sizes_and_roots() {
        let h = FrameHeader {
            kind: OpKind::Broadcast,
            code: 0,
            group_id: 7,
            seq: 2,
            aux: 1,
            payload_len: 8,
        };
        assert_eq!(
            describe_header(&h),
            "broadcast (message #2, root 1, 8 bytes)"
        );
        let e = Expect {
            kind: OpKind::AllGather,
            code: 0,
            seq: 2,
            aux: 0,
            len: Some(16),
        };
        assert_eq!(e.describe(), "all_gather (message #2, 16 bytes)");
        assert_eq!(
            Expect { len: None, ..e }.describe(),
            "all_gather (message #2, any size)"
        );
    }

    proptest! {
        #[test]
        fn headers_roundtrip(kind in 1u8..=9, code in any::<u8>(), group_id in any::<u64>(),
                             seq in any::<u64>(), aux in any::<u64>(), len in any::<u64>()) {
            let h = FrameHeader {
                kind: OpKind::from_u8(kind).expect("valid kind"),
                code, group_id, seq, aux, payload_len: len,
            };
            prop_assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::array::uniform32(any::<u8>()),
                                              tail in proptest::array::uniform8(any::<u8>())) {
            let mut b = [0u8; HEADER_LEN];
            b[..32].copy_from_slice(&bytes);
            b[32..].copy_from_slice(&tail);
            let _ = FrameHeader::decode(&b);
        }
    }
}
