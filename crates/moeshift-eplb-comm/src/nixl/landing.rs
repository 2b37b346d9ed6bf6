//! The landing area: the memory peers' rows are READ into, registered with NIXL once, when
//! the communicator is built, and lent to one staged layer at a time.
//!
//! Registration is per address range and can be expensive (pinning, memory keys, CUDA IPC
//! handles), so it is done once, for the largest area any layer can need: a rank stages at
//! most one row per local expert slot (a received row or a local copy; duplicates are filled
//! at commit), so `max over layers of (rows per rank × bytes per expert row across all
//! tensors)` bounds every layer.
//!
//! The area is the layer's staging itself: a transfer borrows a free slot
//! ([`LendingSlot`]), READs the received rows straight into it, copies the local rows next to
//! them, and the [`StagedLayer`](crate::StagedLayer) keeps the slot until it is committed or
//! dropped. Nothing is allocated per layer and no received byte is copied twice. A transfer
//! that finds every slot held is refused ([`EplbCommError::StagingInUse`]) before any byte
//! moves: a slot is never overwritten while a staged layer still holds it.
//!
//! Host weights land in host memory (touched once, so no READ takes page faults); CUDA
//! weights in device memory on their GPU, allocated with `cuMemAlloc` (feature `cuda`).

use std::sync::Arc;

use moeshift_tensor::{Device, HostBuffer};

use crate::error::EplbCommError;
use crate::staging::{LendingSlot, LentMemory, StagingMemory};
use crate::weights::LayerLayout;

/// Registered memory that READs land in: `slots` equal slots of `len` bytes.
#[derive(Debug)]
pub(crate) struct LandingArea {
    slots: Vec<Arc<LendingSlot>>,
    /// Address of each slot's first byte (the memory never moves).
    addrs: Vec<u64>,
    len: usize,
    device: Device,
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

    /// `slots` slots of `len` bytes of host memory (the need of layer `layer`), every page
    /// touched so the first READ does not take the page faults. `rank` and `layer` name the
    /// error.
    pub(crate) fn new_host(
        rank: usize,
        layer: usize,
        len: usize,
        slots: usize,
    ) -> Result<Self, EplbCommError> {
        let mut area = Self::empty(len, Device::Host, slots);
        for _ in 0..slots {
            let mut buf = HostBuffer::zeroed(len).map_err(|source| EplbCommError::Staging {
                rank,
                layer,
                bytes: len,
                source,
            })?;
            // Non-zero on purpose: filling fresh zeroed memory with zeros may be optimised
            // away.
            buf.as_mut_slice().fill(0xA5);
            area.addrs.push(buf.addr());
            area.slots.push(LendingSlot::new(StagingMemory::Host(buf)));
        }
        Ok(area)
    }

    /// `slots` slots of `len` bytes of device memory on `cuda`'s GPU, committed on its
    /// commit stream.
    #[cfg(feature = "cuda")]
    pub(crate) fn new_device(
        rank: usize,
        layer: usize,
        len: usize,
        slots: usize,
        cuda: &super::cuda::NixlCuda,
    ) -> Result<Self, EplbCommError> {
        let mut area = Self::empty(len, Device::Cuda(cuda.ordinal()), slots);
        for _ in 0..slots {
            let mem = cuda.landing_slot(rank, layer, len)?;
            let addr = match &mem {
                StagingMemory::Device { buf, .. } => buf.addr(),
                _ => 0,
            };
            area.addrs.push(addr);
            area.slots.push(LendingSlot::new(mem));
        }
        Ok(area)
    }

    fn empty(len: usize, device: Device, slots: usize) -> Self {
        Self {
            slots: Vec::with_capacity(slots),
            addrs: Vec::with_capacity(slots),
            len,
            device,
        }
    }

    /// Bytes of one slot.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Number of slots.
    pub(crate) fn num_slots(&self) -> usize {
        self.slots.len()
    }

    /// Address of each slot's first byte, for registration.
    pub(crate) fn slot_addrs(&self) -> &[u64] {
        &self.addrs
    }

    /// Where the memory lives.
    pub(crate) fn device(&self) -> Device {
        self.device
    }

    /// Lends a free slot to layer `layer`'s staging: its address and the memory.
    /// [`EplbCommError::StagingInUse`] names the layers holding the slots when none is free.
    pub(crate) fn lend(
        &self,
        rank: usize,
        layer: usize,
    ) -> Result<(u64, LentMemory), EplbCommError> {
        let mut held_by = Vec::with_capacity(self.slots.len());
        for (slot, &addr) in self.slots.iter().zip(&self.addrs) {
            match slot.lend(layer) {
                Ok(lent) => return Ok((addr, lent)),
                Err(holder) => held_by.push(holder),
            }
        }
        Err(EplbCommError::StagingInUse {
            rank,
            layer,
            held_by,
            slots: self.slots.len(),
        })
    }

    /// The layers holding slots now, in slot order.
    pub(crate) fn holders(&self) -> Vec<usize> {
        self.slots.iter().filter_map(|s| s.holder()).collect()
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
        let area = LandingArea::new_host(0, 1, 1200, 1).unwrap();
        assert_eq!((area.len(), area.num_slots()), (1200, 1));
        assert_eq!(area.device(), Device::Host);
    }

    #[test]
    fn slots_are_lent_once_and_come_back() {
        let area = LandingArea::new_host(3, 0, 256, 2).unwrap();
        let addrs = area.slot_addrs().to_vec();
        assert_eq!(addrs.len(), 2);
        assert_ne!(addrs[0], addrs[1]);

        let (a, lent_a) = area.lend(3, 10).unwrap();
        let (b, lent_b) = area.lend(3, 11).unwrap();
        assert_eq!((a, b), (addrs[0], addrs[1]));
        // The lent memory is the slot's, touched when the area was made.
        let Some(StagingMemory::Host(buf)) = lent_a.memory() else {
            panic!("a host slot lends host memory");
        };
        assert_eq!(buf.addr(), a);
        assert!(buf.as_slice().iter().all(|&x| x == 0xA5));
        assert_eq!(lent_b.len(), 256);

        // Both slots held: refused, naming the holders, not poisoning anything.
        let err = area.lend(3, 12).unwrap_err();
        match &err {
            EplbCommError::StagingInUse {
                rank: 3,
                layer: 12,
                held_by,
                slots: 2,
            } => assert_eq!(held_by, &vec![10, 11]),
            other => panic!("expected StagingInUse, got {other}"),
        }
        assert!(!err.poisons_communicator());
        assert_eq!(area.holders(), vec![10, 11]);

        // Giving one back frees that slot, and only that one.
        drop(lent_b);
        assert_eq!(area.holders(), vec![10]);
        let (c, _lent_c) = area.lend(3, 12).unwrap();
        assert_eq!(c, addrs[1]);
        drop(lent_a);
        let (d, _lent_d) = area.lend(3, 13).unwrap();
        assert_eq!(d, addrs[0]);
    }
}
