//! Packed dense transfer: planning chunks, and the explicit [`ChunkHeader`] that precedes
//! every chunk on the wire.
//!
//! # Chunk rule
//!
//! Tensors are taken in update order. A tensor joins the current chunk if the chunk's bytes
//! plus its own stay within `packed_buffer_size_bytes`; otherwise the current chunk is closed
//! first (flush *before* exceeding). So no chunk exceeds the buffer, with one exception: a
//! tensor larger than the buffer travels alone, in a chunk of its own, of its own size.
//! Zero-byte tensors are listed in whatever chunk is open.
//!
//! # Header
//!
//! Each chunk is preceded by a header listing the tensors it carries (name, dtype, shape,
//! byte offset, byte length), its sequence number, the number of chunks in the update, the
//! payload length, and a SHA-256 checksum of the header bytes. The receiver plans the same
//! chunks from its own metadata and compares ([`ChunkHeader::check_matches`]): any
//! disagreement (a different buffer size, a reordered or renamed tensor, another dtype or
//! shape) is a typed error naming the tensor, never a silent misread or a hang.
//!
//! Encoding (little-endian): `b"MSWTCHNK"`, version `u16` = 1, `seq u32`, `total u32`,
//! `payload_len u64`, `count u32`, then per entry: name (`u32` length + UTF-8), dtype
//! PyTorch name (`u32` length + ASCII), `ndim u32`, `ndim × u64` dims, `offset u64`,
//! `len u64`; then 32 bytes of SHA-256 over everything before them.

use moeshift_tensor::DType;

use crate::digest::Digest;
use crate::meta::ParamMeta;

/// The default chunk size: 1 GiB.
pub const DEFAULT_PACKED_BUFFER_SIZE_BYTES: usize = 1 << 30;

const MAGIC: &[u8; 8] = b"MSWTCHNK";
const VERSION: u16 = 1;
const CHECKSUM_LEN: usize = 32;

/// Errors planning, encoding, decoding or checking chunks. Messages name the chunk and the
/// tensor involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PackError {
    /// The buffer size is zero.
    #[error("packed_buffer_size_bytes must be positive")]
    ZeroBufferSize,
    /// The header bytes are damaged or not a header at all.
    #[error("chunk header is corrupt: {detail}")]
    Corrupt {
        /// What is wrong.
        detail: String,
    },
    /// The header's checksum does not match its bytes.
    #[error("chunk header checksum mismatch (header of {len} bytes): it was damaged in transit")]
    Checksum {
        /// Bytes in the header.
        len: usize,
    },
    /// A different chunk arrived than the one expected.
    #[error("expected chunk {expected_seq} of {expected_total}, received chunk {got_seq} of {got_total}")]
    Sequence {
        /// Expected sequence number.
        expected_seq: u32,
        /// Expected chunk count.
        expected_total: u32,
        /// Received sequence number.
        got_seq: u32,
        /// Received chunk count.
        got_total: u32,
    },
    /// The chunk lists a different tensor (or a tensor with another dtype, shape or place)
    /// at some position.
    #[error("chunk {seq}, entry {position}: expected tensor {expected}, the sender packed {got}")]
    Entry {
        /// Chunk sequence number.
        seq: u32,
        /// Position in the chunk.
        position: usize,
        /// What the receiver planned: name, dtype, shape, offset, length.
        expected: String,
        /// What the header lists.
        got: String,
    },
    /// The chunk lists fewer or more tensors than planned.
    #[error("chunk {seq}: expected {expected} tensors, the sender packed {got}; first difference: {tensor}")]
    EntryCount {
        /// Chunk sequence number.
        seq: u32,
        /// Planned count.
        expected: usize,
        /// Listed count.
        got: usize,
        /// The first tensor that one side has and the other does not.
        tensor: String,
    },
    /// The payload's length differs from the header's.
    #[error("chunk {seq}: header announces {expected} payload bytes, received {got}")]
    PayloadLength {
        /// Chunk sequence number.
        seq: u32,
        /// Bytes announced.
        expected: u64,
        /// Bytes received.
        got: usize,
    },
    /// A tensor does not fit in a fixed-size buffer (engines that pack into one exported
    /// buffer of exactly `packed_buffer_size_bytes`, such as CUDA IPC).
    #[error(
        "tensor {tensor} has {bytes} bytes, more than the packed buffer of {buffer} bytes; \
         raise packed_buffer_size_bytes to at least {bytes}"
    )]
    Oversize {
        /// The tensor, described.
        tensor: String,
        /// Its bytes.
        bytes: usize,
        /// The buffer size.
        buffer: usize,
    },
    /// A tensor handed to [`pack_chunk`] has the wrong number of bytes.
    #[error("chunk {seq}: tensor '{name}' has {got} bytes, its metadata says {expected}")]
    TensorLength {
        /// Chunk sequence number.
        seq: u32,
        /// Tensor name.
        name: String,
        /// Bytes from metadata.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
}

/// One tensor inside a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Name, dtype and shape.
    pub meta: ParamMeta,
    /// Byte offset inside the chunk payload.
    pub offset: u64,
    /// Byte length (the tensor's `byte_len`).
    pub len: u64,
}

impl ChunkEntry {
    fn describe(&self) -> String {
        format!(
            "{} at bytes {}..{}",
            self.meta.describe(),
            self.offset,
            self.offset.saturating_add(self.len)
        )
    }
}

/// What one chunk carries; see the module docs for the wire form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Position of this chunk in the update, from 0.
    pub seq: u32,
    /// Number of chunks in the update.
    pub total: u32,
    /// Tensors, in update order, at increasing offsets with no gaps.
    pub entries: Vec<ChunkEntry>,
    /// Bytes of payload (Σ entry lengths).
    pub payload_len: u64,
}

/// Splits `params` into chunks of at most `buffer_size` bytes under the module's chunk rule
/// (a tensor larger than the buffer gets a chunk of its own). Both sides call this with the
/// same metadata and the same buffer size.
///
/// ```
/// use moeshift_tensor::DType;
/// use moeshift_weight_transfer::{plan_chunks, ParamMeta};
///
/// let p = |n: &str, len| ParamMeta::new(n, DType::U8, vec![len]).unwrap();
/// let chunks = plan_chunks(&[p("a", 6), p("b", 4), p("c", 3), p("d", 20)], 10)?;
/// let names: Vec<Vec<&str>> = chunks
///     .iter()
///     .map(|c| c.entries.iter().map(|e| e.meta.name()).collect())
///     .collect();
/// assert_eq!(names, vec![vec!["a", "b"], vec!["c"], vec!["d"]]);
/// # Ok::<(), moeshift_weight_transfer::PackError>(())
/// ```
pub fn plan_chunks(
    params: &[ParamMeta],
    buffer_size: usize,
) -> Result<Vec<ChunkHeader>, PackError> {
    if buffer_size == 0 {
        return Err(PackError::ZeroBufferSize);
    }
    let mut groups: Vec<Vec<ChunkEntry>> = Vec::new();
    let mut current: Vec<ChunkEntry> = Vec::new();
    let mut used: usize = 0;
    for p in params {
        let len = p.byte_len();
        if !current.is_empty() && used.saturating_add(len) > buffer_size {
            groups.push(std::mem::take(&mut current));
            used = 0;
        }
        current.push(ChunkEntry {
            meta: p.clone(),
            offset: used as u64,
            len: len as u64,
        });
        used = used.saturating_add(len);
    }
    if !current.is_empty() {
        groups.push(current);
    }
    let total = u32::try_from(groups.len()).map_err(|_| PackError::Corrupt {
        detail: format!("{} chunks exceed the u32 sequence space", groups.len()),
    })?;
    Ok(groups
        .into_iter()
        .enumerate()
        .map(|(seq, entries)| ChunkHeader {
            seq: seq as u32,
            total,
            payload_len: entries.iter().map(|e| e.len).sum(),
            entries,
        })
        .collect())
}

/// Like [`plan_chunks`], for a buffer that can never grow: every chunk fits in
/// `buffer_size` bytes, and a tensor larger than the buffer is [`PackError::Oversize`]
/// (checked before anything is planned, so nothing is sent).
///
/// ```
/// use moeshift_tensor::DType;
/// use moeshift_weight_transfer::{plan_chunks_within, PackError, ParamMeta};
///
/// let p = |n: &str, len| ParamMeta::new(n, DType::U8, vec![len]).unwrap();
/// assert_eq!(plan_chunks_within(&[p("a", 6), p("b", 4), p("c", 3)], 10)?.len(), 2);
/// assert!(matches!(
///     plan_chunks_within(&[p("a", 6), p("d", 11)], 10),
///     Err(PackError::Oversize { bytes: 11, buffer: 10, .. })
/// ));
/// # Ok::<(), PackError>(())
/// ```
pub fn plan_chunks_within(
    params: &[ParamMeta],
    buffer_size: usize,
) -> Result<Vec<ChunkHeader>, PackError> {
    if buffer_size == 0 {
        return Err(PackError::ZeroBufferSize);
    }
    if let Some(p) = params.iter().find(|p| p.byte_len() > buffer_size) {
        return Err(PackError::Oversize {
            tensor: p.describe(),
            bytes: p.byte_len(),
            buffer: buffer_size,
        });
    }
    plan_chunks(params, buffer_size)
}

impl ChunkHeader {
    /// The wire form, checksum included.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.entries.len() * 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.total.to_le_bytes());
        out.extend_from_slice(&self.payload_len.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            put_str(&mut out, e.meta.name());
            put_str(&mut out, e.meta.dtype().name());
            out.extend_from_slice(&(e.meta.shape().len() as u32).to_le_bytes());
            for &d in e.meta.shape() {
                out.extend_from_slice(&(d as u64).to_le_bytes());
            }
            out.extend_from_slice(&e.offset.to_le_bytes());
            out.extend_from_slice(&e.len.to_le_bytes());
        }
        let sum = Digest::of(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses the wire form: checks the checksum first, then the structure (entries at
    /// increasing offsets without gaps, each as long as its dtype and shape say, summing to
    /// the payload length). Never panics on bad input.
    pub fn decode(bytes: &[u8]) -> Result<Self, PackError> {
        let body_len = bytes
            .len()
            .checked_sub(CHECKSUM_LEN)
            .ok_or_else(|| corrupt(format!("{} bytes is shorter than a checksum", bytes.len())))?;
        let (body, sum) = bytes.split_at(body_len);
        if Digest::of(body).as_bytes()[..] != *sum {
            return Err(PackError::Checksum { len: bytes.len() });
        }
        let mut r = Reader { bytes: body, at: 0 };
        if r.take(MAGIC.len(), "magic")? != MAGIC {
            return Err(corrupt("not a chunk header (bad magic)".into()));
        }
        let version = r.u16("version")?;
        if version != VERSION {
            return Err(corrupt(format!(
                "version {version}, this build reads {VERSION}"
            )));
        }
        let seq = r.u32("seq")?;
        let total = r.u32("total")?;
        let payload_len = r.u64("payload_len")?;
        let count = r.u32("count")?;
        let mut entries = Vec::new();
        let mut next_offset = 0u64;
        for position in 0..count {
            let name = r.string("entry name")?;
            let dtype_name = r.string("entry dtype")?;
            let dtype = DType::parse(&dtype_name).ok().ok_or_else(|| {
                corrupt(format!(
                    "entry {position} ('{name}'): unknown dtype '{dtype_name}'"
                ))
            })?;
            let ndim = r.u32("ndim")?;
            let mut shape = Vec::new();
            for _ in 0..ndim {
                let d = r.u64("dim")?;
                shape.push(usize::try_from(d).map_err(|_| {
                    corrupt(format!(
                        "entry {position} ('{name}'): dimension {d} too large"
                    ))
                })?);
            }
            let offset = r.u64("offset")?;
            let len = r.u64("len")?;
            let meta = ParamMeta::new(name.clone(), dtype, shape)
                .map_err(|e| corrupt(format!("entry {position}: {e}")))?;
            if offset != next_offset || len != meta.byte_len() as u64 {
                return Err(corrupt(format!(
                    "entry {position} ('{name}'): bytes {offset}+{len}, expected {next_offset}+{}",
                    meta.byte_len()
                )));
            }
            next_offset = offset.saturating_add(len);
            entries.push(ChunkEntry { meta, offset, len });
        }
        if r.at != body.len() {
            return Err(corrupt(format!("{} trailing bytes", body.len() - r.at)));
        }
        if next_offset != payload_len {
            return Err(corrupt(format!(
                "entries cover {next_offset} bytes, payload_len says {payload_len}"
            )));
        }
        if seq >= total {
            return Err(corrupt(format!("chunk {seq} of {total}")));
        }
        Ok(Self {
            seq,
            total,
            entries,
            payload_len,
        })
    }

    /// Compares a received header with the receiver's own plan; the first difference is an
    /// error naming the tensor on both sides.
    pub fn check_matches(&self, expected: &ChunkHeader) -> Result<(), PackError> {
        let sequence = || PackError::Sequence {
            expected_seq: expected.seq,
            expected_total: expected.total,
            got_seq: self.seq,
            got_total: self.total,
        };
        if self.seq != expected.seq {
            return Err(sequence());
        }
        for (position, (got, want)) in self.entries.iter().zip(&expected.entries).enumerate() {
            if got != want {
                return Err(PackError::Entry {
                    seq: self.seq,
                    position,
                    expected: want.describe(),
                    got: got.describe(),
                });
            }
        }
        if self.entries.len() != expected.entries.len() {
            let common = self.entries.len().min(expected.entries.len());
            let tensor = self
                .entries
                .get(common)
                .map(|e| {
                    format!(
                        "the sender packed {} that the receiver did not plan here",
                        e.describe()
                    )
                })
                .or_else(|| {
                    expected.entries.get(common).map(|e| {
                        format!(
                            "the receiver planned {} that the sender did not pack here",
                            e.describe()
                        )
                    })
                })
                .unwrap_or_default();
            return Err(PackError::EntryCount {
                seq: self.seq,
                expected: expected.entries.len(),
                got: self.entries.len(),
                tensor,
            });
        }
        if self.total != expected.total {
            return Err(sequence());
        }
        Ok(())
    }
}

/// Concatenates the tensors of one chunk into its payload. `tensors[i]` holds the bytes of
/// `header.entries[i]`; a length that differs from the metadata is an error.
pub fn pack_chunk(header: &ChunkHeader, tensors: &[&[u8]]) -> Result<Vec<u8>, PackError> {
    if tensors.len() != header.entries.len() {
        return Err(PackError::EntryCount {
            seq: header.seq,
            expected: header.entries.len(),
            got: tensors.len(),
            tensor: "(tensors handed to pack_chunk)".into(),
        });
    }
    let mut out = Vec::with_capacity(usize::try_from(header.payload_len).unwrap_or(0));
    for (entry, data) in header.entries.iter().zip(tensors) {
        if data.len() != entry.meta.byte_len() {
            return Err(PackError::TensorLength {
                seq: header.seq,
                name: entry.meta.name().to_string(),
                expected: entry.meta.byte_len(),
                got: data.len(),
            });
        }
        out.extend_from_slice(data);
    }
    Ok(out)
}

/// Splits a received payload into one byte slice per entry, after checking its length.
pub fn split_chunk<'a>(
    header: &ChunkHeader,
    payload: &'a [u8],
) -> Result<Vec<&'a [u8]>, PackError> {
    if payload.len() as u64 != header.payload_len {
        return Err(PackError::PayloadLength {
            seq: header.seq,
            expected: header.payload_len,
            got: payload.len(),
        });
    }
    header
        .entries
        .iter()
        .map(|e| {
            let start = usize::try_from(e.offset).ok();
            let end = usize::try_from(e.offset.saturating_add(e.len)).ok();
            start
                .zip(end)
                .and_then(|(s, t)| payload.get(s..t))
                .ok_or_else(|| corrupt(format!("entry {} lies outside the payload", e.describe())))
        })
        .collect()
}

fn corrupt(detail: String) -> PackError {
    PackError::Corrupt { detail }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], PackError> {
        let end = self.at.checked_add(n);
        let slice = end
            .and_then(|e| self.bytes.get(self.at..e))
            .ok_or_else(|| {
                corrupt(format!(
                    "truncated while reading {what} at byte {}",
                    self.at
                ))
            })?;
        self.at += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], PackError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u16(&mut self, what: &str) -> Result<u16, PackError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32, PackError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, PackError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, PackError> {
        let len = self.u32(what)? as usize;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| corrupt(format!("{what} is not UTF-8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u8p(name: &str, len: usize) -> ParamMeta {
        ParamMeta::new(name, DType::U8, vec![len]).unwrap()
    }

    fn names(chunks: &[ChunkHeader]) -> Vec<Vec<String>> {
        chunks
            .iter()
            .map(|c| {
                c.entries
                    .iter()
                    .map(|e| e.meta.name().to_string())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn flush_before_exceeding_and_oversize_travels_alone() {
        // Buffer 10: a(6)+b(4)=10 fits exactly; c(3) opens a new chunk; d(20) is larger than
        // the buffer and goes alone; e(2) follows in a new chunk.
        let params = [
            u8p("a", 6),
            u8p("b", 4),
            u8p("c", 3),
            u8p("d", 20),
            u8p("e", 2),
        ];
        let chunks = plan_chunks(&params, 10).unwrap();
        assert_eq!(
            names(&chunks),
            vec![vec!["a", "b"], vec!["c"], vec!["d"], vec!["e"]]
        );
        assert_eq!(
            chunks.iter().map(|c| c.payload_len).collect::<Vec<_>>(),
            vec![10, 3, 20, 2]
        );
        assert_eq!(chunks[0].entries[1].offset, 6);
        assert!(chunks.iter().all(|c| c.total == 4));
        assert_eq!(
            chunks.iter().map(|c| c.seq).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn fixed_buffer_plans_never_exceed_it() {
        // The same input as the flush test: with a fixed buffer, d (20 > 10) is refused.
        let params = [u8p("a", 6), u8p("b", 4), u8p("c", 3), u8p("d", 20)];
        let err = plan_chunks_within(&params, 10).unwrap_err();
        assert!(
            matches!(
                err,
                PackError::Oversize {
                    bytes: 20,
                    buffer: 10,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("'d'"), "{err}");
        let ok = plan_chunks_within(&params[..3], 10).unwrap();
        assert!(ok.iter().all(|c| c.payload_len <= 10));
        assert_eq!(names(&ok), vec![vec!["a", "b"], vec!["c"]]);
        // A tensor of exactly the buffer size fits.
        assert_eq!(plan_chunks_within(&[u8p("x", 10)], 10).unwrap().len(), 1);
    }

    #[test]
    fn dtype_sizes_count_and_empty_inputs() {
        // float32 [3] = 12 bytes, bfloat16 [2] = 4 bytes: 16 > 15, so two chunks.
        let a = ParamMeta::new("a", DType::F32, vec![3]).unwrap();
        let b = ParamMeta::new("b", DType::Bf16, vec![2]).unwrap();
        assert_eq!(plan_chunks(&[a.clone(), b.clone()], 15).unwrap().len(), 2);
        assert_eq!(plan_chunks(&[a, b], 16).unwrap().len(), 1);
        assert!(plan_chunks(&[], 16).unwrap().is_empty());
        assert_eq!(
            plan_chunks(&[u8p("a", 1)], 0),
            Err(PackError::ZeroBufferSize)
        );
    }

    #[test]
    fn header_round_trip_and_checksum() {
        let params = [
            ParamMeta::new("layers.0.w", DType::Bf16, vec![4, 8]).unwrap(),
            ParamMeta::new("layers.0.b", DType::F32, vec![8]).unwrap(),
            ParamMeta::new("scalar", DType::F64, vec![]).unwrap(),
        ];
        let chunks = plan_chunks(&params, 1 << 20).unwrap();
        let bytes = chunks[0].encode();
        assert_eq!(ChunkHeader::decode(&bytes).unwrap(), chunks[0]);
        // Flip any single byte: the checksum (or, for a byte of the checksum itself, the
        // comparison) catches it.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                matches!(ChunkHeader::decode(&bad), Err(PackError::Checksum { .. })),
                "byte {i}"
            );
        }
        assert!(matches!(
            ChunkHeader::decode(&bytes[..10]),
            Err(PackError::Corrupt { .. })
        ));
        assert!(ChunkHeader::decode(&[]).is_err());
    }

    #[test]
    fn structurally_bad_header_with_valid_checksum_is_corrupt() {
        let chunks = plan_chunks(&[u8p("a", 4), u8p("b", 4)], 100).unwrap();
        let mut h = chunks[0].clone();
        h.entries[1].offset = 5; // a gap
        assert!(matches!(
            ChunkHeader::decode(&h.encode()),
            Err(PackError::Corrupt { .. })
        ));
        let mut h = chunks[0].clone();
        h.payload_len = 9;
        assert!(matches!(
            ChunkHeader::decode(&h.encode()),
            Err(PackError::Corrupt { .. })
        ));
        let mut h = chunks[0].clone();
        h.seq = 1; // of 1
        assert!(matches!(
            ChunkHeader::decode(&h.encode()),
            Err(PackError::Corrupt { .. })
        ));
    }

    #[test]
    fn mismatches_name_the_tensor() {
        let receiver = plan_chunks(&[u8p("a", 4), u8p("b", 4), u8p("c", 4)], 8).unwrap();
        // The sender used a larger buffer: its first chunk carries c too.
        let sender = plan_chunks(&[u8p("a", 4), u8p("b", 4), u8p("c", 4)], 12).unwrap();
        let err = sender[0].check_matches(&receiver[0]).unwrap_err();
        assert!(
            matches!(
                err,
                PackError::EntryCount {
                    expected: 2,
                    got: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("'c'"), "{err}");
        // Same entries, but the sender splits the rest differently.
        let mut total = receiver[1].clone();
        total.total = 3;
        assert!(matches!(
            total.check_matches(&receiver[1]),
            Err(PackError::Sequence { .. })
        ));
        // Out of order.
        assert!(matches!(
            receiver[1].check_matches(&receiver[0]),
            Err(PackError::Sequence {
                expected_seq: 0,
                got_seq: 1,
                ..
            })
        ));

        // Same chunk count, different dtype for b.
        let b16 = ParamMeta::new("b", DType::Bf16, vec![2]).unwrap();
        let sender = plan_chunks(&[u8p("a", 4), b16, u8p("c", 4)], 8).unwrap();
        let err = sender[0].check_matches(&receiver[0]).unwrap_err();
        let text = err.to_string();
        assert!(matches!(
            err,
            PackError::Entry {
                seq: 0,
                position: 1,
                ..
            }
        ));
        assert!(
            text.contains("'b'") && text.contains("bfloat16") && text.contains("uint8"),
            "{text}"
        );

        // A renamed tensor.
        let sender = plan_chunks(&[u8p("a", 4), u8p("x", 4), u8p("c", 4)], 8).unwrap();
        let text = sender[0]
            .check_matches(&receiver[0])
            .unwrap_err()
            .to_string();
        assert!(text.contains("'x'") && text.contains("'b'"), "{text}");

        // An extra tensor in the same chunk.
        let mut extra = receiver[0].clone();
        extra.entries.push(ChunkEntry {
            meta: u8p("z", 0),
            offset: 8,
            len: 0,
        });
        let err = extra.check_matches(&receiver[0]).unwrap_err();
        assert!(matches!(
            err,
            PackError::EntryCount {
                expected: 2,
                got: 3,
                ..
            }
        ));
        assert!(err.to_string().contains("'z'"));
        assert!(receiver[1].check_matches(&receiver[1]).is_ok());
    }

    #[test]
    fn pack_and_split_round_trip() {
        let chunks = plan_chunks(&[u8p("a", 3), u8p("b", 2)], 100).unwrap();
        let payload = pack_chunk(&chunks[0], &[&[1, 2, 3], &[4, 5]]).unwrap();
        assert_eq!(payload, vec![1, 2, 3, 4, 5]);
        let parts = split_chunk(&chunks[0], &payload).unwrap();
        assert_eq!(parts, vec![&[1u8, 2, 3][..], &[4u8, 5][..]]);
        assert!(matches!(
            split_chunk(&chunks[0], &payload[..4]),
            Err(PackError::PayloadLength {
                expected: 5,
                got: 4,
                ..
            })
        ));
        assert!(matches!(
            pack_chunk(&chunks[0], &[&[1, 2], &[4, 5]]),
            Err(PackError::TensorLength { .. })
        ));
        assert!(matches!(
            pack_chunk(&chunks[0], &[&[1, 2, 3]]),
            Err(PackError::EntryCount { .. })
        ));
    }
}
