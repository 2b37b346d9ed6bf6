//! The `ipc` engine (feature `cuda`): trainer and workers on one node; the trainer packs
//! dense updates into one device buffer and exports it through CUDA IPC; every worker maps
//! it and copies straight from it (over NVLink or PCIe) into its parameters.
//!
//! # Protocol (one session)
//!
//! The control protocol every engine shares (see the crate docs): announcement (the first
//! one broadcast, later ones carried by the status round before them), vote, payload,
//! status round (carrying the next announcement or the end of the session). The payload
//! of a (packed) dense update, chunk by chunk:
//!
//! 1. the trainer packs the chunk into its buffer and waits for the copies to finish;
//! 2. it sends every worker a [`ChunkNotice`]: the buffer's IPC handle and size, and the
//!    chunk's [`ChunkHeader`];
//! 3. each worker checks the header against its own plan, opens the handle (once per
//!    session: the mapping is kept for the session's chunks and closed when the session
//!    ends, so a trainer may free or re-create its buffer between sessions), copies the
//!    chunk's tensors into its parameters and waits for the copies;
//! 4. everyone all-gathers a status: the trainer reuses the buffer only after every worker
//!    finished reading it, and a failure anywhere (a header mismatch, a handle that cannot
//!    be opened) ends the update on every rank at the same chunk. After the last chunk this
//!    round is the update's status round itself.
//!
//! Per update that is the vote and one round per chunk (before, the last chunk had a round
//! of its own, then came the status round, and the session closed with one more broadcast).
//!
//! Opening the mapping is the expensive part of a session with a large buffer: about 9.5 ms
//! for a 1 GiB buffer between two H200s, against 2.5 ms to copy 988 MB out of it (the copy
//! engines reach about 374 GB/s from one stream there).
//!
//! The buffer has exactly `packed_buffer_size_bytes` and is never exceeded: chunks are
//! planned with [`plan_chunks_within`](crate::plan_chunks_within) (flush before
//! exceeding), and a tensor larger than the buffer is [`PackError::Oversize`] before
//! anything is sent.
//!
//! Only packed dense updates travel this way; unpacked and sparse updates are refused with
//! [`TransferError::Unsupported`] (use the `nccl` engine
//! for them).
//!
//! # What a failure leaves behind
//!
//! A chunk is copied only after its header matched, so no parameter is partially written:
//! a failure leaves the chunks before it applied (on the workers that reached them) and the
//! rest untouched. A dead trainer shows up as a control-group error within the deadline.
//!
//! CUDA leaves undefined what happens when an exporter frees a buffer that another process
//! still has open: a trainer that drops its engine in the middle of a session (after an
//! error) should let its workers end theirs first (they close their mapping on any error).

use crate::error::TransferError;
use crate::packing::{ChunkHeader, PackError, DEFAULT_PACKED_BUFFER_SIZE_BYTES};

mod trainer;
mod worker;

pub use trainer::IpcTrainer;
pub use worker::IpcWorker;

/// Settings of the IPC engine, on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcConfig {
    /// Size of the trainer's exported buffer, and the chunk size both sides plan with
    /// (default 1 GiB).
    pub packed_buffer_size_bytes: usize,
    /// Trainer: announce "reuse the previous metadata" when a dense update has exactly the
    /// parameters of the previous successful dense update (default true).
    pub reuse_metadata: bool,
}

impl Default for IpcConfig {
    fn default() -> Self {
        Self {
            packed_buffer_size_bytes: DEFAULT_PACKED_BUFFER_SIZE_BYTES,
            reuse_metadata: true,
        }
    }
}

impl IpcConfig {
    pub(crate) fn check(&self) -> Result<(), TransferError> {
        if self.packed_buffer_size_bytes == 0 {
            return Err(PackError::ZeroBufferSize.into());
        }
        Ok(())
    }
}

const NOTICE_MAGIC: &[u8; 8] = b"MSWTIPC1";

/// What the trainer tells each worker before it reads a chunk: where the chunk is (the
/// exported buffer's CUDA IPC handle and size) and what it holds.
///
/// Wire form: `b"MSWTIPC1"`, 64 handle bytes, buffer size `u64` (little-endian), then the
/// encoded [`ChunkHeader`] (which carries its own checksum).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkNotice {
    /// The exported buffer's CUDA IPC memory handle.
    pub handle: [u8; 64],
    /// Bytes in the exported buffer.
    pub buffer_len: u64,
    /// The chunk.
    pub header: ChunkHeader,
}

impl ChunkNotice {
    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let header = self.header.encode();
        let mut out = Vec::with_capacity(8 + 64 + 8 + header.len());
        out.extend_from_slice(NOTICE_MAGIC);
        out.extend_from_slice(&self.handle);
        out.extend_from_slice(&self.buffer_len.to_le_bytes());
        out.extend_from_slice(&header);
        out
    }

    /// Parses the wire form; checks that the chunk lies inside the buffer.
    pub fn decode(bytes: &[u8]) -> Result<Self, PackError> {
        let corrupt = |detail: String| PackError::Corrupt { detail };
        if bytes.len() < 80 || &bytes[..8] != NOTICE_MAGIC {
            return Err(corrupt(format!(
                "not an IPC chunk notice ({} bytes)",
                bytes.len()
            )));
        }
        let mut handle = [0u8; 64];
        handle.copy_from_slice(&bytes[8..72]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[72..80]);
        let buffer_len = u64::from_le_bytes(len);
        let header = ChunkHeader::decode(&bytes[80..])?;
        if header.payload_len > buffer_len {
            return Err(corrupt(format!(
                "chunk {} of {} bytes does not fit the {buffer_len}-byte buffer",
                header.seq, header.payload_len
            )));
        }
        Ok(Self {
            handle,
            buffer_len,
            header,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::ParamMeta;
    use crate::packing::plan_chunks_within;
    use moeshift_tensor::DType;

    #[test]
    fn notice_round_trip_and_rejects() {
        let metas = [
            ParamMeta::new("a", DType::Bf16, vec![8]).unwrap(),
            ParamMeta::new("b", DType::F32, vec![2]).unwrap(),
        ];
        let header = plan_chunks_within(&metas, 64).unwrap().remove(0);
        let mut handle = [0u8; 64];
        for (i, b) in handle.iter_mut().enumerate() {
            *b = i as u8 ^ 0xa5;
        }
        let notice = ChunkNotice {
            handle,
            buffer_len: 64,
            header: header.clone(),
        };
        let bytes = notice.encode();
        assert_eq!(&bytes[..8], b"MSWTIPC1");
        assert_eq!(ChunkNotice::decode(&bytes).unwrap(), notice);
        // 24 bytes of payload in a 16-byte buffer cannot be.
        let small = ChunkNotice {
            buffer_len: 16,
            ..notice.clone()
        };
        let err = ChunkNotice::decode(&small.encode()).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        assert!(ChunkNotice::decode(&bytes[..40]).is_err());
        let mut damaged = bytes.clone();
        let last = damaged.len() - 40;
        damaged[last] ^= 1;
        assert!(matches!(
            ChunkNotice::decode(&damaged),
            Err(PackError::Checksum { .. })
        ));
    }

    #[test]
    fn config_default_and_check() {
        let c = IpcConfig::default();
        assert_eq!(c.packed_buffer_size_bytes, 1 << 30);
        assert!(c.check().is_ok());
        assert!(IpcConfig {
            packed_buffer_size_bytes: 0,
            ..c
        }
        .check()
        .is_err());
    }
}
