//! Placement maps (physical→logical, logical→physical, replica counts), their validation, and
//! the load and balancedness they give.

use crate::load::LoadMatrix;
use serde::ser::{SerializeStruct, Serializer};
use serde::Serialize;

/// Why a placement (or its layout) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// A dimension that must be at least 1 is 0.
    #[error("placement field {field} must be at least 1")]
    Zero {
        /// `num_layers`, `num_logical`, `num_physical` or `num_ranks`.
        field: &'static str,
    },
    /// The physical slots cannot be split evenly over the ranks.
    #[error("{slots} physical slots cannot be split evenly over {ranks} ranks")]
    SlotsNotDivisible {
        /// Number of physical slots `P`.
        slots: usize,
        /// Number of ranks `R`.
        ranks: usize,
    },
    /// Fewer slots than logical experts: some expert would have no replica.
    #[error("{slots} physical slots cannot hold {experts} logical experts (each needs one)")]
    TooFewSlots {
        /// Number of physical slots `P`.
        slots: usize,
        /// Number of logical experts `N`.
        experts: usize,
    },
    /// The maps would not fit in memory addresses (`L × P` or `L × (N + 1)` overflows).
    #[error("{layers} layers x {slots} slots x {experts} experts is too large to address")]
    TooLarge {
        /// Layers.
        layers: usize,
        /// Physical slots.
        slots: usize,
        /// Logical experts.
        experts: usize,
    },
    /// A layer's physical→logical row has the wrong length.
    #[error("phy2log row of layer {layer} has {found} slots, expected {expected}")]
    RowLength {
        /// Layer of the row.
        layer: usize,
        /// Expected number of slots.
        expected: usize,
        /// Slots in the row.
        found: usize,
    },
    /// A flat buffer does not hold `layers × slots` ids.
    #[error("flat phy2log has {found} entries, expected {expected}")]
    FlatLength {
        /// `layers × slots`.
        expected: usize,
        /// Length of the buffer.
        found: usize,
    },
    /// A slot holds an id that is not a logical expert.
    #[error(
        "layer {layer}, slot {slot} holds expert {expert}, but there are only {num_logical} \
         logical experts"
    )]
    ExpertOutOfRange {
        /// Layer of the slot.
        layer: usize,
        /// Global slot index.
        slot: usize,
        /// The id found.
        expert: usize,
        /// Number of logical experts `N`.
        num_logical: usize,
    },
    /// A logical expert has no replica in a layer.
    #[error("layer {layer}: logical expert {expert} has no replica")]
    MissingReplica {
        /// Layer missing the expert.
        layer: usize,
        /// The expert without a slot.
        expert: usize,
    },
    /// Two placements, or a placement and a load, do not have the same shape.
    #[error("shape mismatch: {field} is {found}, expected {expected}")]
    ShapeMismatch {
        /// The dimension that differs.
        field: &'static str,
        /// Value required.
        expected: usize,
        /// Value found.
        found: usize,
    },
    /// A padded logical→physical map is too narrow for an expert's replicas.
    #[error(
        "layer {layer}: logical expert {expert} has {count} replicas, more than the padded \
         width {width}"
    )]
    PaddedWidthTooSmall {
        /// Layer of the expert.
        layer: usize,
        /// The expert.
        expert: usize,
        /// Its replica count.
        count: usize,
        /// The width asked for.
        width: usize,
    },
}

/// The dimensions of a placement: `L` layers, `N` logical experts, `P` physical slots on `R`
/// ranks.
///
/// Slots are rank-major: global slot `g` lives on rank `g / (P/R)` at row `g % (P/R)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Layout {
    num_layers: usize,
    num_logical: usize,
    num_physical: usize,
    num_ranks: usize,
}

impl Layout {
    /// Checks and builds a layout.
    ///
    /// # Errors
    /// [`MapError::Zero`] for a zero dimension, [`MapError::SlotsNotDivisible`] when
    /// `P % R ≠ 0`, [`MapError::TooFewSlots`] when `P < N`.
    pub fn new(
        num_layers: usize,
        num_logical: usize,
        num_physical: usize,
        num_ranks: usize,
    ) -> Result<Self, MapError> {
        for (field, v) in [
            ("num_layers", num_layers),
            ("num_logical", num_logical),
            ("num_physical", num_physical),
            ("num_ranks", num_ranks),
        ] {
            if v == 0 {
                return Err(MapError::Zero { field });
            }
        }
        if num_physical % num_ranks != 0 {
            return Err(MapError::SlotsNotDivisible {
                slots: num_physical,
                ranks: num_ranks,
            });
        }
        if num_physical < num_logical {
            return Err(MapError::TooFewSlots {
                slots: num_physical,
                experts: num_logical,
            });
        }
        let bytes = |rows: usize, cols: usize| {
            rows.checked_mul(cols)
                .and_then(|x| x.checked_mul(std::mem::size_of::<usize>()))
                .filter(|&b| b <= isize::MAX as usize)
        };
        let fits = bytes(num_layers, num_physical).is_some()
            && num_logical
                .checked_add(1)
                .and_then(|cols| bytes(num_layers, cols))
                .is_some();
        if !fits {
            return Err(MapError::TooLarge {
                layers: num_layers,
                slots: num_physical,
                experts: num_logical,
            });
        }
        Ok(Self {
            num_layers,
            num_logical,
            num_physical,
            num_ranks,
        })
    }

    /// Number of layers `L`.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }
    /// Number of logical experts `N`.
    pub fn num_logical(&self) -> usize {
        self.num_logical
    }
    /// Number of physical slots `P` per layer.
    pub fn num_physical(&self) -> usize {
        self.num_physical
    }
    /// Number of ranks `R`.
    pub fn num_ranks(&self) -> usize {
        self.num_ranks
    }
    /// Slots per rank, `P / R`.
    pub fn slots_per_rank(&self) -> usize {
        self.num_physical / self.num_ranks
    }
    /// Rank holding global slot `slot` (`slot / (P/R)`); `None` when `slot ≥ P`.
    pub fn rank_of_slot(&self, slot: usize) -> Option<usize> {
        (slot < self.num_physical).then(|| slot / self.slots_per_rank())
    }
    /// Row of global slot `slot` on its rank (`slot % (P/R)`); `None` when `slot ≥ P`.
    pub fn row_of_slot(&self, slot: usize) -> Option<usize> {
        (slot < self.num_physical).then(|| slot % self.slots_per_rank())
    }

    /// Checks that `other` has the same dimensions, naming the first one that differs.
    pub fn expect_same(&self, other: &Layout) -> Result<(), MapError> {
        for (field, expected, found) in [
            ("num_layers", self.num_layers, other.num_layers),
            ("num_logical", self.num_logical, other.num_logical),
            ("num_physical", self.num_physical, other.num_physical),
            ("num_ranks", self.num_ranks, other.num_ranks),
        ] {
            if expected != found {
                return Err(MapError::ShapeMismatch {
                    field,
                    expected,
                    found,
                });
            }
        }
        Ok(())
    }
}

/// A validated expert placement for every layer.
///
/// Holds `phy2log[L][P]`, `log2phy[L][N][…]` (each expert's slots in ascending order) and
/// `logcnt[L][N]`. It can only be built through validating constructors, so every value of
/// this type satisfies: every slot holds a logical expert `< N`, every logical expert has at
/// least one replica in every layer, the replica counts of a layer sum to `P`, and every rank
/// has exactly `P/R` slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    layout: Layout,
    /// `L × P`, row-major.
    phy2log: Vec<usize>,
    /// `L × N`, row-major.
    logcnt: Vec<usize>,
    /// `L × (N + 1)`: start of each expert's slot list inside its layer's part of `l2p_slots`.
    l2p_offsets: Vec<usize>,
    /// `L × P`: per layer, the slots of expert 0, then of expert 1, …, each ascending.
    l2p_slots: Vec<usize>,
}

impl Placement {
    /// vLLM's initial placement: slot `g` holds expert `g mod N` in every layer (so the first
    /// `N` slots hold `0..N`, and the redundant slots start again from expert 0).
    ///
    /// # Example
    /// ```
    /// use moeshift_placement::{Layout, Placement};
    /// let p = Placement::initial(Layout::new(1, 4, 6, 3)?);
    /// assert_eq!(p.phy2log(0), Some(&[0, 1, 2, 3, 0, 1][..]));
    /// assert_eq!(p.log2phy(0, 1), Some(&[1, 5][..]));
    /// # Ok::<(), moeshift_placement::MapError>(())
    /// ```
    pub fn initial(layout: Layout) -> Self {
        let p = layout.num_physical;
        let n = layout.num_logical;
        let mut phy2log = Vec::with_capacity(layout.num_layers * p);
        for _ in 0..layout.num_layers {
            phy2log.extend((0..p).map(|g| g % n));
        }
        // Layout guarantees P ≥ N ≥ 1, so every expert has a replica.
        Self::from_valid_ids(layout, phy2log)
    }

    /// Builds a placement from one `phy2log` row per layer.
    ///
    /// # Errors
    /// [`MapError`] naming the layer, slot or expert at fault: no layer, rows of different
    /// lengths, `P` not divisible by `num_ranks`, an id `≥ num_logical`, or an expert with no
    /// replica.
    pub fn from_rows<R: AsRef<[usize]>>(
        num_logical: usize,
        num_ranks: usize,
        rows: &[R],
    ) -> Result<Self, MapError> {
        let num_physical = rows.first().map(|r| r.as_ref().len()).unwrap_or(0);
        let layout = Layout::new(rows.len(), num_logical, num_physical, num_ranks)?;
        let mut flat = Vec::with_capacity(rows.len() * num_physical);
        for (layer, row) in rows.iter().enumerate() {
            let row = row.as_ref();
            if row.len() != num_physical {
                return Err(MapError::RowLength {
                    layer,
                    expected: num_physical,
                    found: row.len(),
                });
            }
            flat.extend_from_slice(row);
        }
        Self::from_flat(layout, flat)
    }

    /// Builds a placement from a row-major `L × P` buffer.
    ///
    /// # Errors
    /// [`MapError`] for a wrong buffer length, an id out of range or an expert with no replica.
    pub fn from_flat(layout: Layout, phy2log: Vec<usize>) -> Result<Self, MapError> {
        let expected = layout.num_layers * layout.num_physical;
        if phy2log.len() != expected {
            return Err(MapError::FlatLength {
                expected,
                found: phy2log.len(),
            });
        }
        let (p, n) = (layout.num_physical, layout.num_logical);
        let mut counts = vec![0usize; n];
        for (layer, row) in phy2log.chunks_exact(p).enumerate() {
            counts.iter_mut().for_each(|c| *c = 0);
            for (slot, &expert) in row.iter().enumerate() {
                match counts.get_mut(expert) {
                    Some(c) => *c += 1,
                    None => {
                        return Err(MapError::ExpertOutOfRange {
                            layer,
                            slot,
                            expert,
                            num_logical: n,
                        })
                    }
                }
            }
            if let Some(expert) = counts.iter().position(|&c| c == 0) {
                return Err(MapError::MissingReplica { layer, expert });
            }
        }
        Ok(Self::from_valid_ids(layout, phy2log))
    }

    /// Builds the derived maps of a `phy2log` already known to be valid.
    fn from_valid_ids(layout: Layout, phy2log: Vec<usize>) -> Self {
        let (l, p, n) = (layout.num_layers, layout.num_physical, layout.num_logical);
        let mut logcnt = vec![0usize; l * n];
        let mut l2p_offsets = vec![0usize; l * (n + 1)];
        let mut l2p_slots = vec![0usize; l * p];
        let mut cursor = vec![0usize; n];
        for (layer, row) in phy2log.chunks_exact(p).enumerate() {
            let cnt = &mut logcnt[layer * n..(layer + 1) * n];
            for &e in row {
                cnt[e] += 1;
            }
            let offs = &mut l2p_offsets[layer * (n + 1)..(layer + 1) * (n + 1)];
            for e in 0..n {
                offs[e + 1] = offs[e] + cnt[e];
                cursor[e] = offs[e];
            }
            let slots = &mut l2p_slots[layer * p..(layer + 1) * p];
            for (slot, &e) in row.iter().enumerate() {
                slots[cursor[e]] = slot;
                cursor[e] += 1;
            }
        }
        Self {
            layout,
            phy2log,
            logcnt,
            l2p_offsets,
            l2p_slots,
        }
    }

    /// The dimensions of this placement.
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// Number of layers `L`.
    pub fn num_layers(&self) -> usize {
        self.layout.num_layers
    }
    /// Number of logical experts `N`.
    pub fn num_logical(&self) -> usize {
        self.layout.num_logical
    }
    /// Number of physical slots `P` per layer.
    pub fn num_physical(&self) -> usize {
        self.layout.num_physical
    }
    /// Number of ranks `R`.
    pub fn num_ranks(&self) -> usize {
        self.layout.num_ranks
    }
    /// Slots per rank, `P / R`.
    pub fn slots_per_rank(&self) -> usize {
        self.layout.slots_per_rank()
    }

    /// The physical→logical row of a layer; `None` when `layer ≥ L`.
    pub fn phy2log(&self, layer: usize) -> Option<&[usize]> {
        let p = self.layout.num_physical;
        self.phy2log.get(layer.checked_mul(p)?..(layer + 1) * p)
    }

    /// The replica counts of a layer, indexed by logical expert; `None` when `layer ≥ L`.
    pub fn logcnt(&self, layer: usize) -> Option<&[usize]> {
        let n = self.layout.num_logical;
        self.logcnt.get(layer.checked_mul(n)?..(layer + 1) * n)
    }

    /// The slots holding `expert` in `layer`, ascending; `None` when out of range.
    pub fn log2phy(&self, layer: usize, expert: usize) -> Option<&[usize]> {
        if layer >= self.layout.num_layers || expert >= self.layout.num_logical {
            return None;
        }
        let n = self.layout.num_logical;
        let p = self.layout.num_physical;
        let offs = &self.l2p_offsets[layer * (n + 1)..(layer + 1) * (n + 1)];
        let slots = &self.l2p_slots[layer * p..(layer + 1) * p];
        slots.get(offs[expert]..offs[expert + 1])
    }

    /// The slots of one rank in one layer (the rank's rows, in order); `None` when out of range.
    pub fn rank_slots(&self, layer: usize, rank: usize) -> Option<&[usize]> {
        let spr = self.slots_per_rank();
        self.phy2log(layer)?
            .get(rank.checked_mul(spr)?..(rank + 1) * spr)
    }

    /// The whole physical→logical map, row-major `L × P`.
    pub fn phy2log_flat(&self) -> &[usize] {
        &self.phy2log
    }

    /// The whole replica-count map, row-major `L × N`.
    pub fn logcnt_flat(&self) -> &[usize] {
        &self.logcnt
    }

    /// The physical→logical map as one `Vec` per layer.
    pub fn phy2log_rows(&self) -> Vec<Vec<usize>> {
        self.phy2log
            .chunks_exact(self.layout.num_physical)
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// The largest replica count of any expert in any layer.
    pub fn max_replicas(&self) -> usize {
        self.logcnt.iter().copied().max().unwrap_or(0)
    }

    /// The logical→physical map as vLLM stores it on the device: `L × N × width` `i64`,
    /// row-major, each expert's slots ascending and padded with `-1`.
    ///
    /// # Errors
    /// [`MapError::PaddedWidthTooSmall`] when an expert has more than `width` replicas,
    /// [`MapError::TooLarge`] when `L × N × width` entries cannot be addressed.
    pub fn log2phy_padded(&self, width: usize) -> Result<Vec<i64>, MapError> {
        let (l, n) = (self.layout.num_layers, self.layout.num_logical);
        let len = (l * n)
            .checked_mul(width)
            .filter(|&x| x.checked_mul(8).is_some_and(|b| b <= isize::MAX as usize))
            .ok_or(MapError::TooLarge {
                layers: l,
                slots: width,
                experts: n,
            })?;
        let mut out = vec![-1i64; len];
        for layer in 0..l {
            for expert in 0..n {
                let slots = self.log2phy(layer, expert).unwrap_or(&[]);
                if slots.len() > width {
                    return Err(MapError::PaddedWidthTooSmall {
                        layer,
                        expert,
                        count: slots.len(),
                        width,
                    });
                }
                let base = (layer * n + expert) * width;
                for (dst, &s) in out[base..base + slots.len()].iter_mut().zip(slots) {
                    // A slot index is below P, which is a `Vec` length, so it fits in i64.
                    *dst = s as i64;
                }
            }
        }
        Ok(out)
    }

    fn expect_load(&self, load: &LoadMatrix) -> Result<(), MapError> {
        if load.num_layers() != self.layout.num_layers {
            return Err(MapError::ShapeMismatch {
                field: "load layers",
                expected: self.layout.num_layers,
                found: load.num_layers(),
            });
        }
        if load.num_experts() != self.layout.num_logical {
            return Err(MapError::ShapeMismatch {
                field: "load experts",
                expected: self.layout.num_logical,
                found: load.num_experts(),
            });
        }
        Ok(())
    }

    /// Per-rank load of every layer (`L × R`, row-major): each replica of an expert carries
    /// `load / replica count`.
    ///
    /// # Errors
    /// [`MapError::ShapeMismatch`] when the load is not `L × N`.
    pub fn rank_loads(&self, load: &LoadMatrix) -> Result<Vec<f64>, MapError> {
        self.expect_load(load)?;
        let r = self.layout.num_ranks;
        let mut out = vec![0.0f64; self.layout.num_layers * r];
        for (layer, (w, dst)) in load.rows().zip(out.chunks_exact_mut(r)).enumerate() {
            self.layer_rank_loads(layer, w, dst);
        }
        Ok(out)
    }

    /// Fills `out` (length `R`) with layer `layer`'s per-rank load for logical loads `w`.
    /// The caller guarantees `layer < L`, `w.len() == N` and `out.len() == R`.
    pub(crate) fn layer_rank_loads(&self, layer: usize, w: &[f32], out: &mut [f64]) {
        let (p, n) = (self.layout.num_physical, self.layout.num_logical);
        let row = &self.phy2log[layer * p..(layer + 1) * p];
        let cnt = &self.logcnt[layer * n..(layer + 1) * n];
        rank_loads_of_row(row, cnt, w, self.slots_per_rank(), out);
    }

    /// Balancedness of this placement under `load`: per layer `mean / max` of the per-rank load
    /// (0 when the max is 0), and overall `Σ_layers mean / Σ_layers max`, the figure vLLM logs.
    ///
    /// # Errors
    /// [`MapError::ShapeMismatch`] when the load is not `L × N`.
    pub fn balancedness(&self, load: &LoadMatrix) -> Result<Balancedness, MapError> {
        let loads = self.rank_loads(load)?;
        Ok(Balancedness::from_rank_loads(&loads, self.layout.num_ranks))
    }

    /// Number of moved replicas per layer relative to `old`: a replica counts as moved when its
    /// rank did not hold that logical expert in `old` (two new replicas of such an expert on
    /// one rank count twice). Positions within a rank do not matter.
    ///
    /// # Errors
    /// [`MapError::ShapeMismatch`] when the layouts differ.
    pub fn moved_from(&self, old: &Placement) -> Result<Vec<usize>, MapError> {
        self.layout.expect_same(&old.layout)?;
        let (p, n, spr) = (
            self.layout.num_physical,
            self.layout.num_logical,
            self.slots_per_rank(),
        );
        let mut held = vec![false; n];
        let mut moved = vec![0usize; self.layout.num_layers];
        for (layer, m) in moved.iter_mut().enumerate() {
            let new_row = &self.phy2log[layer * p..(layer + 1) * p];
            let old_row = &old.phy2log[layer * p..(layer + 1) * p];
            for (new_seg, old_seg) in new_row.chunks_exact(spr).zip(old_row.chunks_exact(spr)) {
                for &e in old_seg {
                    held[e] = true;
                }
                *m += new_seg.iter().filter(|&&e| !held[e]).count();
                for &e in old_seg {
                    held[e] = false;
                }
            }
        }
        Ok(moved)
    }
}

/// Per-rank load of one layer row. `out.len()` ranks of `spr` slots each.
pub(crate) fn rank_loads_of_row(
    row: &[usize],
    cnt: &[usize],
    w: &[f32],
    spr: usize,
    out: &mut [f64],
) {
    for (dst, seg) in out.iter_mut().zip(row.chunks_exact(spr)) {
        *dst = rank_load(seg, cnt, w);
    }
}

/// Load of one rank whose slots hold the experts `seg`: the sum of `load / count`, in slot
/// order (every caller sums the same way, so equal placements give bit-equal loads).
#[inline]
pub(crate) fn rank_load(seg: &[usize], cnt: &[usize], w: &[f32]) -> f64 {
    seg.iter().map(|&e| f64::from(w[e]) / cnt[e] as f64).sum()
}

/// `mean / max` of per-rank loads, 0 when the max is 0 (or there is no rank).
pub fn balancedness_of(rank_loads: &[f64]) -> f64 {
    let (sum, max) = rank_loads
        .iter()
        .fold((0.0f64, 0.0f64), |(s, m), &x| (s + x, m.max(x)));
    if max > 0.0 {
        sum / rank_loads.len() as f64 / max
    } else {
        0.0
    }
}

/// Balancedness of a placement under a load (see [`Placement::balancedness`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Balancedness {
    /// `mean / max` of the per-rank load of each layer (0 when the max is 0).
    pub per_layer: Vec<f64>,
    /// `Σ_layers mean / Σ_layers max` (0 when every max is 0), as vLLM logs it.
    pub overall: f64,
}

impl Balancedness {
    /// Computes both figures from per-rank loads laid out `L × R`, row-major.
    pub fn from_rank_loads(rank_loads: &[f64], num_ranks: usize) -> Self {
        let mut per_layer = Vec::new();
        let (mut sum_mean, mut sum_max) = (0.0f64, 0.0f64);
        if num_ranks > 0 {
            for layer in rank_loads.chunks_exact(num_ranks) {
                let mean = layer.iter().sum::<f64>() / num_ranks as f64;
                let max = layer.iter().copied().fold(0.0f64, f64::max);
                sum_mean += mean;
                sum_max += max;
                per_layer.push(if max > 0.0 { mean / max } else { 0.0 });
            }
        }
        let overall = if sum_max > 0.0 {
            sum_mean / sum_max
        } else {
            0.0
        };
        Self { per_layer, overall }
    }
}

impl Serialize for Placement {
    /// Serialises as `{"phy2log": [[…]], "logcnt": [[…]], "log2phy": [[[…]]]}`, with each
    /// expert's slot list unpadded.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (l, n) = (self.layout.num_layers, self.layout.num_logical);
        let logcnt: Vec<&[usize]> = self.logcnt.chunks_exact(n).collect();
        let log2phy: Vec<Vec<&[usize]>> = (0..l)
            .map(|layer| {
                (0..n)
                    .map(|e| self.log2phy(layer, e).unwrap_or(&[]))
                    .collect()
            })
            .collect();
        let phy2log: Vec<&[usize]> = self
            .phy2log
            .chunks_exact(self.layout.num_physical)
            .collect();
        let mut s = serializer.serialize_struct("Placement", 3)?;
        s.serialize_field("phy2log", &phy2log)?;
        s.serialize_field("logcnt", &logcnt)?;
        s.serialize_field("log2phy", &log2phy)?;
        s.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The docstring example of the study (§1): 2 layers, 6 physical, 4 logical, 3 ranks.
    #[test]
    fn docstring_example_maps() {
        let p = Placement::from_rows(4, 3, &[[0, 1, 2, 3, 0, 1], [0, 2, 0, 1, 0, 3]]).unwrap();
        assert_eq!(p.logcnt(0), Some(&[2, 2, 1, 1][..]));
        assert_eq!(p.logcnt(1), Some(&[3, 1, 1, 1][..]));
        let l2p: Vec<Vec<Vec<usize>>> = (0..2)
            .map(|l| (0..4).map(|e| p.log2phy(l, e).unwrap().to_vec()).collect())
            .collect();
        assert_eq!(
            l2p,
            vec![
                vec![vec![0, 4], vec![1, 5], vec![2], vec![3]],
                vec![vec![0, 2, 4], vec![3], vec![1], vec![5]]
            ]
        );
        assert_eq!(
            p.log2phy_padded(3).unwrap(),
            vec![
                0, 4, -1, 1, 5, -1, 2, -1, -1, 3, -1, -1, //
                0, 2, 4, 3, -1, -1, 1, -1, -1, 5, -1, -1
            ]
        );
        assert_eq!(
            p.log2phy_padded(2),
            Err(MapError::PaddedWidthTooSmall {
                layer: 1,
                expert: 0,
                count: 3,
                width: 2
            })
        );
        assert_eq!(p.max_replicas(), 3);
        assert_eq!(p.rank_slots(1, 2), Some(&[0, 3][..]));
        assert_eq!(p.rank_slots(1, 3), None);
        assert_eq!(p.log2phy(2, 0), None);
        assert_eq!(p.log2phy(0, 4), None);
    }

    #[test]
    fn initial_matches_vllm() {
        // R=4 logical with 2 redundant gives [0,1,2,3,0,1] in every layer (study §1).
        let p = Placement::initial(Layout::new(2, 4, 6, 2).unwrap());
        assert_eq!(p.phy2log_rows(), vec![vec![0, 1, 2, 3, 0, 1]; 2]);
        assert_eq!(p.logcnt(1), Some(&[2, 2, 1, 1][..]));
    }

    #[test]
    fn layout_rules() {
        assert_eq!(
            Layout::new(0, 4, 4, 1),
            Err(MapError::Zero {
                field: "num_layers"
            })
        );
        assert_eq!(
            Layout::new(1, 4, 4, 0),
            Err(MapError::Zero { field: "num_ranks" })
        );
        assert!(matches!(
            Layout::new(usize::MAX / 2, 4, 4, 1),
            Err(MapError::TooLarge { .. })
        ));
        assert_eq!(
            Layout::new(1, 4, 7, 4),
            Err(MapError::SlotsNotDivisible { slots: 7, ranks: 4 })
        );
        assert_eq!(
            Layout::new(1, 8, 4, 2),
            Err(MapError::TooFewSlots {
                slots: 4,
                experts: 8
            })
        );
        let l = Layout::new(1, 4, 6, 3).unwrap();
        assert_eq!(l.slots_per_rank(), 2);
        assert_eq!(l.rank_of_slot(5), Some(2));
        assert_eq!(l.row_of_slot(5), Some(1));
        assert_eq!(l.rank_of_slot(6), None);
    }

    #[test]
    fn invalid_maps_are_rejected_with_location() {
        assert_eq!(
            Placement::from_rows(4, 2, &[vec![0, 1, 2, 3], vec![0, 1, 2]]),
            Err(MapError::RowLength {
                layer: 1,
                expected: 4,
                found: 3
            })
        );
        assert_eq!(
            Placement::from_rows(4, 2, &[vec![0, 1, 2, 3], vec![0, 1, 9, 3]]),
            Err(MapError::ExpertOutOfRange {
                layer: 1,
                slot: 2,
                expert: 9,
                num_logical: 4
            })
        );
        assert_eq!(
            Placement::from_rows(4, 2, &[vec![0, 1, 2, 3], vec![0, 1, 1, 3]]),
            Err(MapError::MissingReplica {
                layer: 1,
                expert: 2
            })
        );
        assert_eq!(
            Placement::from_rows(4, 3, &[vec![0, 1, 2, 3]]),
            Err(MapError::SlotsNotDivisible { slots: 4, ranks: 3 })
        );
        let none: [Vec<usize>; 0] = [];
        assert_eq!(
            Placement::from_rows(4, 1, &none),
            Err(MapError::Zero {
                field: "num_layers"
            })
        );
        let msg = Placement::from_rows(4, 2, &[vec![0, 1, 1, 3]])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("layer 0") && msg.contains("expert 2"), "{msg}");
    }

    #[test]
    fn balancedness_by_hand() {
        // 4 logical on 2 ranks of 3 slots: rank 0 = [0, 1, 0], rank 1 = [2, 3, 1].
        // Counts: e0 2, e1 2, e2 1, e3 1. Loads 40, 20, 30, 10.
        // Rank 0: 20 + 10 + 20 = 50; rank 1: 30 + 10 + 10 = 50 → balancedness 1.
        // Layer 1, loads 0, 0, 60, 0: rank 0 = 0, rank 1 = 60 → mean 30 / max 60 = 0.5.
        let p = Placement::from_rows(4, 2, &[[0, 1, 0, 2, 3, 1], [0, 1, 0, 2, 3, 1]]).unwrap();
        let load =
            LoadMatrix::from_rows(&[[40.0f32, 20.0, 30.0, 10.0], [0.0, 0.0, 60.0, 0.0]]).unwrap();
        assert_eq!(p.rank_loads(&load).unwrap(), vec![50.0, 50.0, 0.0, 60.0]);
        let b = p.balancedness(&load).unwrap();
        assert_eq!(b.per_layer, vec![1.0, 0.5]);
        // Σ mean / Σ max = (50 + 30) / (50 + 60).
        assert_eq!(b.overall, 80.0 / 110.0);
        let zero = LoadMatrix::from_rows(&[[0.0f32; 4], [0.0; 4]]).unwrap();
        let b = p.balancedness(&zero).unwrap();
        assert_eq!((b.per_layer, b.overall), (vec![0.0, 0.0], 0.0));
        let wrong = LoadMatrix::from_rows(&[[1.0f32; 4]]).unwrap();
        assert!(matches!(
            p.balancedness(&wrong),
            Err(MapError::ShapeMismatch {
                field: "load layers",
                ..
            })
        ));
        assert_eq!(balancedness_of(&[]), 0.0);
    }

    #[test]
    fn moved_counts_replicas_new_to_their_rank() {
        // Rank 0 holds {0, 1}, rank 1 holds {2, 3}.
        let old = Placement::from_rows(4, 2, &[[0, 1, 2, 3]]).unwrap();
        // Rank 0 = [2, 1] gains 2; rank 1 = [0, 3] gains 0.
        let new = Placement::from_rows(4, 2, &[[2, 1, 0, 3]]).unwrap();
        assert_eq!(new.moved_from(&old).unwrap(), vec![2]);
        // A permutation inside each rank moves nothing.
        let new = Placement::from_rows(4, 2, &[[1, 0, 3, 2]]).unwrap();
        assert_eq!(new.moved_from(&old).unwrap(), vec![0]);
        // Rank 0 holds {0, 1}, rank 1 holds {1, 2}.
        let base = Placement::from_rows(3, 2, &[[0, 1, 2, 1]]).unwrap();
        // A second replica of an expert the rank already held is not a move.
        let dup = Placement::from_rows(3, 2, &[[0, 1, 2, 2]]).unwrap();
        assert_eq!(dup.moved_from(&base).unwrap(), vec![0]);
        // Rank 0 = [1, 2] gains 2; rank 1 = [0, 0] gains two replicas of 0: 3 moves.
        let two = Placement::from_rows(3, 2, &[[1, 2, 0, 0]]).unwrap();
        assert_eq!(two.moved_from(&base).unwrap(), vec![3]);
        let other = Placement::from_rows(4, 1, &[[0, 1, 2, 3]]).unwrap();
        assert!(matches!(
            other.moved_from(&old),
            Err(MapError::ShapeMismatch {
                field: "num_ranks",
                ..
            })
        ));
    }

    #[test]
    fn serializes_all_three_maps() {
        let p = Placement::from_rows(2, 1, &[[1, 0, 1]]).unwrap();
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"phy2log": [[1, 0, 1]], "logcnt": [[1, 2]], "log2phy": [[[1], [0, 2]]]})
        );
    }
}
