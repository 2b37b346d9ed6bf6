//! [`ExpertPlacement`]: one layer's placement maps as the all-to-all managers read them.
//!
//! Slots are rank-major: global physical slot `g` lives on EP rank `g / slots_per_rank`, at
//! local slot `g % slots_per_rank`. A logical expert's replicas are physical slots, listed in
//! ascending order. The placement crate owns the policies that produce these maps; this type
//! only checks and reads them, so the transport does not depend on it.

use super::error::All2AllError;
use super::replica::{replica_index, splitmix64};

/// One MoE layer's logical → physical map, validated.
///
/// Slots are rank-major: global physical slot `g` lives on EP rank `g / slots_per_rank`, at
/// local slot `g % slots_per_rank`. A logical expert's replicas are physical slots, listed
/// in ascending order. The placement crate owns the policies that produce these maps; this
/// type only checks and reads them, so the transport does not depend on it.
///
/// ```
/// use moeshift_device_comm::all2all::ExpertPlacement;
///
/// // Study §1 docstring example, layer 1: 6 slots on 3 ranks, 4 logical experts.
/// let p = ExpertPlacement::from_phy2log(1, &[0, 2, 0, 1, 0, 3], 4, 3)?;
/// assert_eq!(p.replicas(0), Some(&[0, 2, 4][..]));
/// assert_eq!(p.slots_per_rank(), 2);
/// assert_eq!(p.rank_of_slot(5), Some(2));
/// # Ok::<(), moeshift_device_comm::all2all::All2AllError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertPlacement {
    layer: usize,
    num_logical: usize,
    num_physical: usize,
    ep_size: usize,
    slots_per_rank: usize,
    /// `replicas[offsets[e]..offsets[e + 1]]` are logical expert `e`'s slots.
    offsets: Vec<usize>,
    replicas: Vec<usize>,
    phy2log: Vec<Option<usize>>,
    fingerprint: u64,
}

impl ExpertPlacement {
    /// Builds the placement from vLLM-style rows: `log2phy` is `counts.len()` rows of
    /// `width` entries (row `e` lists logical expert `e`'s slots, the first `counts[e]` of
    /// them valid, the rest padding such as `-1`), over `num_physical` slots spread evenly
    /// over `ep_size` ranks.
    ///
    /// Every expert needs at least one replica, every listed slot must exist, and no slot
    /// may be listed twice.
    pub fn from_log2phy(
        layer: usize,
        log2phy: &[i64],
        width: usize,
        counts: &[i64],
        num_physical: usize,
        ep_size: usize,
    ) -> Result<Self, All2AllError> {
        let bad = |detail: String| All2AllError::Placement { layer, detail };
        let num_logical = counts.len();
        if Some(log2phy.len()) != num_logical.checked_mul(width) {
            return Err(bad(format!(
                "log2phy has {} entries, expected {num_logical} experts × width {width}",
                log2phy.len()
            )));
        }
        let mut replicas = Vec::new();
        let mut offsets = Vec::with_capacity(num_logical + 1);
        offsets.push(0);
        for (e, &count) in counts.iter().enumerate() {
            let n = usize::try_from(count).unwrap_or(0);
            if count < 1 || n > width {
                return Err(bad(format!(
                    "logical expert {e} has replica count {count}; it must be in 1..={width}"
                )));
            }
            let row = log2phy.get(e * width..e * width + n).unwrap_or_default();
            for (i, &slot) in row.iter().enumerate() {
                let s = usize::try_from(slot)
                    .ok()
                    .filter(|&s| s < num_physical)
                    .ok_or_else(|| {
                        bad(format!(
                            "logical expert {e} replica {i} is slot {slot}, outside 0..{num_physical}"
                        ))
                    })?;
                replicas.push(s);
            }
            offsets.push(replicas.len());
        }
        Self::build(layer, num_physical, ep_size, offsets, replicas)
    }

    /// Builds the placement from a physical → logical row (`phy2log[g]` = the logical
    /// expert in slot `g`, negative = empty slot) over `num_logical` experts and `ep_size`
    /// ranks. Replicas are listed in ascending slot order, as vLLM's `compute_logical_maps`
    /// does.
    pub fn from_phy2log(
        layer: usize,
        phy2log: &[i64],
        num_logical: usize,
        ep_size: usize,
    ) -> Result<Self, All2AllError> {
        let mut lists: Vec<Vec<usize>> = vec![Vec::new(); num_logical];
        for (slot, &e) in phy2log.iter().enumerate() {
            if e < 0 {
                continue;
            }
            let list = usize::try_from(e)
                .ok()
                .and_then(|e| lists.get_mut(e))
                .ok_or_else(|| All2AllError::Placement {
                    layer,
                    detail: format!(
                        "slot {slot} holds logical expert {e}, outside 0..{num_logical}"
                    ),
                })?;
            list.push(slot);
        }
        let mut offsets = Vec::with_capacity(num_logical + 1);
        let mut replicas = Vec::with_capacity(phy2log.len());
        offsets.push(0);
        for (e, list) in lists.iter().enumerate() {
            if list.is_empty() {
                return Err(All2AllError::Placement {
                    layer,
                    detail: format!("logical expert {e} has no replica"),
                });
            }
            replicas.extend_from_slice(list);
            offsets.push(replicas.len());
        }
        Self::build(layer, phy2log.len(), ep_size, offsets, replicas)
    }

    fn build(
        layer: usize,
        num_physical: usize,
        ep_size: usize,
        offsets: Vec<usize>,
        replicas: Vec<usize>,
    ) -> Result<Self, All2AllError> {
        let bad = |detail: String| All2AllError::Placement { layer, detail };
        if ep_size == 0 {
            return Err(bad("EP size is 0".into()));
        }
        if num_physical == 0 || num_physical % ep_size != 0 {
            return Err(bad(format!(
                "{num_physical} physical slots do not spread evenly over {ep_size} EP ranks"
            )));
        }
        if num_physical > u32::MAX as usize {
            return Err(bad(format!("{num_physical} physical slots is too many")));
        }
        let num_logical = offsets.len().saturating_sub(1);
        if num_logical == 0 {
            return Err(bad("there are no logical experts".into()));
        }
        let mut phy2log: Vec<Option<usize>> = vec![None; num_physical];
        for e in 0..num_logical {
            let (lo, hi) = (offsets[e], offsets[e + 1]);
            for &slot in replicas.get(lo..hi).unwrap_or_default() {
                match phy2log.get_mut(slot) {
                    Some(Some(other)) => {
                        return Err(bad(format!(
                            "slot {slot} is listed for logical experts {other} and {e}"
                        )))
                    }
                    Some(entry) => *entry = Some(e),
                    None => {
                        return Err(bad(format!(
                            "logical expert {e} lists slot {slot}, outside 0..{num_physical}"
                        )))
                    }
                }
            }
        }
        let mut h = splitmix64(layer as u64);
        for v in [num_logical, num_physical, ep_size] {
            h = splitmix64(h ^ v as u64);
        }
        for (&o, w) in offsets.iter().zip(offsets.iter().skip(1)) {
            h = splitmix64(h ^ (w - o) as u64);
        }
        for &s in &replicas {
            h = splitmix64(h ^ s as u64);
        }
        Ok(Self {
            layer,
            num_logical,
            num_physical,
            ep_size,
            slots_per_rank: num_physical / ep_size,
            offsets,
            replicas,
            phy2log,
            fingerprint: h,
        })
    }

    /// The MoE layer this placement belongs to (named in errors).
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Number of logical experts.
    pub fn num_logical(&self) -> usize {
        self.num_logical
    }

    /// Number of physical slots over the whole EP group.
    pub fn num_physical(&self) -> usize {
        self.num_physical
    }

    /// Number of EP ranks the slots spread over.
    pub fn ep_size(&self) -> usize {
        self.ep_size
    }

    /// Physical slots per EP rank.
    pub fn slots_per_rank(&self) -> usize {
        self.slots_per_rank
    }

    /// Logical expert `logical`'s physical slots, ascending.
    pub fn replicas(&self, logical: usize) -> Option<&[usize]> {
        let lo = *self.offsets.get(logical)?;
        let hi = *self.offsets.get(logical + 1)?;
        self.replicas.get(lo..hi)
    }

    /// The logical expert held by physical slot `slot` (`None` for an empty or unknown
    /// slot).
    pub fn logical_of(&self, slot: usize) -> Option<usize> {
        self.phy2log.get(slot).copied().flatten()
    }

    /// The EP rank that hosts physical slot `slot`.
    pub fn rank_of_slot(&self, slot: usize) -> Option<usize> {
        (slot < self.num_physical).then(|| slot / self.slots_per_rank)
    }

    /// A hash of the whole placement (layer, sizes and every replica list): ranks compare it
    /// before routing so that two ranks with different maps fail instead of misrouting.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The physical slot that serves pick `k` (of top-k) of token `token` (a
    /// [`token_key`](super::token_key)) for logical expert `logical`, chosen with
    /// [`replica_index`]; `None` for an unknown expert.
    pub fn route(&self, token: u64, k: usize, logical: usize) -> Option<usize> {
        let replicas = self.replicas(logical)?;
        replicas
            .get(replica_index(token, k, replicas.len()))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docstring_example_round_trips_between_both_forms() {
        // Study §1: p2l [[0,1,2,3,0,1],[0,2,0,1,0,3]],
        // l2p [[[0,4,-1],[1,5,-1],[2,-1,-1],[3,-1,-1]],[[0,2,4],[3,-1,-1],[1,-1,-1],[5,-1,-1]]],
        // counts [[2,2,1,1],[3,1,1,1]].
        let l2p = [
            [0, 4, -1, 1, 5, -1, 2, -1, -1, 3, -1, -1],
            [0, 2, 4, 3, -1, -1, 1, -1, -1, 5, -1, -1],
        ];
        let counts = [[2, 2, 1, 1], [3, 1, 1, 1]];
        let p2l = [[0, 1, 2, 3, 0, 1], [0, 2, 0, 1, 0, 3]];
        for layer in 0..2 {
            let a = ExpertPlacement::from_log2phy(layer, &l2p[layer], 3, &counts[layer], 6, 3)
                .expect("log2phy");
            let b = ExpertPlacement::from_phy2log(layer, &p2l[layer], 4, 3).expect("phy2log");
            assert_eq!(a, b);
            for (slot, &e) in p2l[layer].iter().enumerate() {
                assert_eq!(a.logical_of(slot), Some(e as usize));
            }
        }
        let p = ExpertPlacement::from_phy2log(0, &p2l[0], 4, 3).expect("layer 0");
        assert_eq!(p.replicas(1), Some(&[1, 5][..]));
        assert_eq!(p.rank_of_slot(3), Some(1));
        assert_eq!(p.rank_of_slot(6), None);
        assert_eq!(p.replicas(4), None);
    }

    #[test]
    fn invalid_maps_are_rejected_with_the_layer() {
        let err = ExpertPlacement::from_phy2log(7, &[0, 0, 2, 2], 3, 2).expect_err("no replica");
        assert!(err.to_string().contains("layer 7"), "{err}");
        assert!(
            err.to_string().contains("logical expert 1 has no replica"),
            "{err}"
        );
        let err = ExpertPlacement::from_phy2log(0, &[0, 1, 2], 3, 2).expect_err("uneven");
        assert!(err.to_string().contains("evenly"), "{err}");
        let err = ExpertPlacement::from_phy2log(0, &[0, 5], 2, 1).expect_err("unknown");
        assert!(err.to_string().contains("outside 0..2"), "{err}");
        let err = ExpertPlacement::from_log2phy(0, &[0, 1, 1, -1], 2, &[2, 1], 2, 1)
            .expect_err("slot listed twice");
        assert!(
            err.to_string()
                .contains("slot 1 is listed for logical experts 0 and 1"),
            "{err}"
        );
        let err = ExpertPlacement::from_log2phy(0, &[0, 9], 2, &[2], 2, 1).expect_err("range");
        assert!(err.to_string().contains("slot 9"), "{err}");
        let err = ExpertPlacement::from_log2phy(0, &[0, 1], 2, &[0], 2, 1).expect_err("count");
        assert!(err.to_string().contains("replica count 0"), "{err}");
        let err = ExpertPlacement::from_log2phy(0, &[0, 1, 2], 2, &[1], 2, 1).expect_err("len");
        assert!(err.to_string().contains("3 entries"), "{err}");
        assert!(ExpertPlacement::from_phy2log(0, &[0, 1], 2, 0).is_err());
    }

    #[test]
    fn fingerprint_tells_maps_apart() {
        let a = ExpertPlacement::from_phy2log(0, &[0, 1, 2, 3, 0, 1], 4, 3).expect("a");
        let b = ExpertPlacement::from_phy2log(0, &[0, 1, 2, 3, 1, 0], 4, 3).expect("b");
        let c = ExpertPlacement::from_phy2log(1, &[0, 1, 2, 3, 0, 1], 4, 3).expect("c");
        let a2 = ExpertPlacement::from_phy2log(0, &[0, 1, 2, 3, 0, 1], 4, 3).expect("a2");
        assert_eq!(a.fingerprint(), a2.fingerprint());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn route_picks_a_replica_of_the_expert() {
        let p = ExpertPlacement::from_phy2log(0, &[0, 2, 0, 1, 0, 3], 4, 3).expect("p");
        for t in 0..100u64 {
            for k in 0..4 {
                let slot = p.route(t, k, 0).expect("expert 0");
                assert!([0, 2, 4].contains(&slot));
                assert_eq!(p.route(t, k, 3), Some(5));
            }
        }
        assert_eq!(p.route(0, 0, 4), None);
    }
}
