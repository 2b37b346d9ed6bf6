//! The landing area: the host memory that peers' rows are READ into, registered with NIXL
//! once, when the communicator is built.
//!
//! Registration is per address range and can be expensive (pinning, memory keys), so it is
//! done once, for the largest area any layer can need: a rank receives at most one row per
//! local expert slot, so `max over layers of (rows per rank × bytes per expert row across
//! all tensors)` bounds every layer. Each transfer uses only the front of the area, one
//! packed row per received expert (the tensors of a row back to back, as staging lays them
//! out); [`TransferStats::staging_bytes`](crate::TransferStats::staging_bytes) reports what
//! a layer actually staged.

use std::ops::Range;

use moeshift_tensor::{Device, HostBuffer};

use crate::error::EplbCommError;
use crate::weights::LayerLayout;

/// Registered host memory that READs land in.
#[derive(Debug)]
pub(crate) struct LandingArea {
    buf: HostBuffer,
}

impl LandingArea {
    /// Bytes needed for the layers `layouts` (the largest `rows × expert bytes`) and the
    /// layer that needs them (the first such); `None` when a size overflows.
    pub(crate) fn bound(layouts: &[LayerLayout]) -> Option<(usize, usize)> {
        let mut best = (0, 0);
        for (layer, l) in layouts.iter().enumerate() {
            let bytes = l.rows.checked_mul(l.expert_bytes())?;
            if bytes > best.0 {
                best = (bytes, layer);
            }
        }
        Some(best)
    }

    /// Allocates `len` bytes (the need of layer `layer`) and touches every page, so the
    /// first READ does not take the page faults. `rank` and `layer` name the error.
    pub(crate) fn new(rank: usize, layer: usize, len: usize) -> Result<Self, EplbCommError> {
        let mut buf = HostBuffer::zeroed(len).map_err(|source| EplbCommError::Staging {
            rank,
            layer,
            bytes: len,
            source,
        })?;
        // Non-zero on purpose: filling fresh zeroed memory with zeros may be optimised away.
        buf.as_mut_slice().fill(0xA5);
        Ok(Self { buf })
    }

    /// Address of the first byte.
    pub(crate) fn addr(&self) -> u64 {
        self.buf.addr()
    }

    /// Size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// Where the memory lives (host memory, for now).
    pub(crate) fn device(&self) -> Device {
        Device::Host
    }

    /// The bytes in `range`, once the READs that filled them completed.
    pub(crate) fn bytes(&self, range: Range<usize>) -> Option<&[u8]> {
        self.buf.as_slice().get(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::TensorSpec;
    use moeshift_tensor::DType;

    fn layout(rows: usize, bytes: &[usize]) -> LayerLayout {
        LayerLayout {
            rows,
            tensors: bytes
                .iter()
                .enumerate()
                .map(|(i, &row_bytes)| TensorSpec {
                    name: format!("t{i}"),
                    dtype: DType::U8,
                    row_bytes,
                })
                .collect(),
        }
    }

    #[test]
    fn the_bound_is_the_largest_layer() {
        // 8 rows of 100 + 28 bytes (1024), then 4 rows of 300 bytes (1200), then 2 of 600.
        let layouts = [layout(8, &[100, 28]), layout(4, &[300]), layout(2, &[600])];
        assert_eq!(LandingArea::bound(&layouts), Some((1200, 1)));
        assert_eq!(LandingArea::bound(&[]), Some((0, 0)));
        assert_eq!(LandingArea::bound(&[layout(usize::MAX, &[2])]), None);
        let area = LandingArea::new(0, 1, 1200).unwrap();
        assert_eq!(area.len(), 1200);
        assert_eq!(area.bytes(1190..1200).map(<[u8]>::len), Some(10));
        assert_eq!(area.bytes(1190..1201), None);
    }
}
