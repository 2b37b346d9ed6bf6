//! Turns a layer's [`Exchange`] into NCCL point-to-point operations over device addresses:
//! rows of the live weights, the pack buffer, and device staging. Every address is checked
//! against its buffer or tensor first; this is the module's only `unsafe`.

use moeshift_device_comm::nccl::P2pOp;
use moeshift_tensor::Device;

use super::exchange::{Exchange, Source};
use crate::cuda_stage::memory::DeviceBuffer;
use crate::weights::LayerWeights;

/// The operations of `ex`: every send, then every receive, each list in issue order (NCCL
/// matches the k-th send to a peer with that peer's k-th receive from this rank, whatever
/// is listed in between). `Err` describes the first address that does not check out.
///
/// The caller keeps `weights`, `staging` and `pack` alive and untouched by anyone else
/// until the exchange returned, and queued every write to the pack buffer on the NCCL
/// communicator's stream before the exchange.
pub(crate) fn p2p_ops(
    ordinal: usize,
    weights: &LayerWeights<'_>,
    ex: &Exchange,
    staging: &DeviceBuffer,
    pack: Option<&DeviceBuffer>,
) -> Result<Vec<P2pOp<'static>>, String> {
    let mut ops = Vec::with_capacity(ex.sends.len() + ex.recvs.len());
    for s in &ex.sends {
        let addr = match s.source {
            Source::Row { row, tensor } => {
                let t = weights
                    .tensor(tensor)
                    .map_err(|e| format!("send to rank {}: {e}", s.peer))?;
                if t.device() != Device::Cuda(ordinal) {
                    return Err(format!(
                        "tensor {:?} lives on {}, not on the communicator's cuda:{ordinal}",
                        t.name(),
                        t.device()
                    ));
                }
                if t.row_bytes() != s.bytes {
                    return Err(format!(
                        "a row of tensor {:?} has {} bytes, the send to rank {} {}",
                        t.name(),
                        t.row_bytes(),
                        s.peer,
                        s.bytes
                    ));
                }
                t.rows()
                    .row_addr(row)
                    .map_err(|e| format!("tensor {:?}: {e}", t.name()))?
            }
            Source::Pack { offset } => pack
                .and_then(|p| p.range_addr(&(offset..offset.saturating_add(s.bytes))))
                .ok_or_else(|| {
                    format!(
                        "packed bytes {offset}..+{} for rank {} lie outside the pack buffer",
                        s.bytes, s.peer
                    )
                })?,
        };
        // SAFETY: `addr..addr + bytes` was checked above: a row of a tensor on this GPU
        // (valid device memory by the weights' contract, not written during a transfer) or
        // a range of the pack buffer, whose writes were queued on the communicator's stream
        // before the exchange. The caller keeps both alive until the exchange returned.
        ops.push(unsafe { P2pOp::send_raw(s.peer, addr, s.bytes) });
    }
    for r in &ex.recvs {
        let addr = staging
            .range_addr(&(r.offset..r.offset.saturating_add(r.bytes)))
            .ok_or_else(|| {
                format!(
                    "received bytes {}..+{} from rank {} lie outside the {}-byte staging",
                    r.offset,
                    r.bytes,
                    r.peer,
                    staging.len()
                )
            })?;
        // SAFETY: a checked range of device staging on this GPU, allocated on the
        // communicator's stream, written by nothing else and kept alive by the caller until
        // the exchange returned.
        ops.push(unsafe { P2pOp::recv_raw(r.peer, addr, r.bytes) });
    }
    Ok(ops)
}

/// One byte to and from every peer, through `buf` (at least `world` bytes): byte `me` is
/// sent, and peer `p`'s byte lands in byte `p`. The bytes are never read; the exchange only
/// opens NCCL's connections.
pub(crate) fn warm_up_ops(me: usize, world: usize, buf: &DeviceBuffer) -> Vec<P2pOp<'static>> {
    let mut ops = Vec::with_capacity(2 * world);
    for peer in (0..world).filter(|&p| p != me) {
        let (Some(from), Some(into)) = (
            buf.range_addr(&(me..me + 1)),
            buf.range_addr(&(peer..peer + 1)),
        ) else {
            continue;
        };
        // SAFETY: a checked one-byte range of `buf`, a live device buffer on the
        // communicator's GPU allocated on its stream, which the caller keeps until the
        // exchange returned.
        ops.push(unsafe { P2pOp::send_raw(peer, from, 1) });
        // SAFETY: as above; each peer's byte has its own slot, and nothing reads it.
        ops.push(unsafe { P2pOp::recv_raw(peer, into, 1) });
    }
    ops
}
