//! [`P2pOp`]: one send or receive of a grouped point-to-point exchange.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

/// Direction of a point-to-point operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum P2pKind {
    /// This rank sends to the peer.
    Send,
    /// This rank receives from the peer.
    Recv,
}

/// One send or receive of device memory, for [`super::NcclComm::grouped`].
///
/// Made from cudarc buffers with [`P2pOp::send`] / [`P2pOp::recv`] (the op borrows the buffer,
/// mutably for a receive, until the exchange returns), or from raw device addresses with the
/// `unsafe` [`P2pOp::send_raw`] / [`P2pOp::recv_raw`], for views of expert rows that other
/// crates describe themselves.
///
/// Ops between the same two ranks in the same direction are matched in the order they appear
/// in the list, as in NCCL: rank A's k-th send to B lands in B's k-th receive from A, and both
/// must have the same byte length.
#[derive(Debug)]
pub struct P2pOp<'a> {
    pub(crate) kind: P2pKind,
    pub(crate) peer: usize,
    pub(crate) ptr: CUdeviceptr,
    pub(crate) bytes: usize,
    /// The stream whose earlier work on the buffer must finish before the transfer starts.
    pub(crate) after: Option<Arc<CudaStream>>,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> P2pOp<'a> {
    /// Sends all of `buf` to `peer`. The transfer starts after the work already queued for
    /// `buf` on its own stream.
    pub fn send<T, B: DevicePtr<T>>(peer: usize, buf: &'a B) -> Self {
        let stream = buf.stream().clone();
        let bytes = buf.num_bytes();
        let (ptr, record) = buf.device_ptr(&stream);
        drop(record);
        Self {
            kind: P2pKind::Send,
            peer,
            ptr,
            bytes,
            after: Some(stream),
            _borrow: PhantomData,
        }
    }

    /// Receives from `peer` into all of `buf`. The transfer starts after the work already
    /// queued for `buf` on its own stream.
    pub fn recv<T, B: DevicePtrMut<T>>(peer: usize, buf: &'a mut B) -> Self {
        let stream = buf.stream().clone();
        let bytes = buf.num_bytes();
        let (ptr, record) = buf.device_ptr_mut(&stream);
        drop(record);
        Self {
            kind: P2pKind::Recv,
            peer,
            ptr,
            bytes,
            after: Some(stream),
            _borrow: PhantomData,
        }
    }

    /// Sends `bytes` bytes at device address `ptr` to `peer`.
    ///
    /// # Safety
    /// `ptr..ptr+bytes` must be device memory on the communicator's GPU (or memory it can
    /// read), valid and not written by anyone until the exchange returns, and every earlier
    /// write to it must be ordered before the communicator's stream (for example by having
    /// synchronised the writing stream, or by writing on the communicator's stream).
    pub unsafe fn send_raw(peer: usize, ptr: CUdeviceptr, bytes: usize) -> P2pOp<'static> {
        P2pOp {
            kind: P2pKind::Send,
            peer,
            ptr,
            bytes,
            after: None,
            _borrow: PhantomData,
        }
    }

    /// Receives `bytes` bytes from `peer` into device address `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+bytes` must be device memory on the communicator's GPU, valid, and neither
    /// read nor written by anyone else until the exchange returns; earlier accesses must be
    /// ordered before the communicator's stream, as for [`P2pOp::send_raw`].
    pub unsafe fn recv_raw(peer: usize, ptr: CUdeviceptr, bytes: usize) -> P2pOp<'static> {
        P2pOp {
            kind: P2pKind::Recv,
            peer,
            ptr,
            bytes,
            after: None,
            _borrow: PhantomData,
        }
    }

    /// Send or receive.
    pub fn kind(&self) -> P2pKind {
        self.kind
    }

    /// The other rank.
    pub fn peer(&self) -> usize {
        self.peer
    }

    /// Length of the transfer in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
