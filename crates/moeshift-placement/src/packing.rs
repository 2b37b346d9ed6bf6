//! The two greedy building blocks of DeepSeek's EPLB, in `f32` with a fixed tie order.
//!
//! * [`balanced_packing`]: put `n` weighted items into `m` packs of exactly `n/m` items each,
//!   visiting items heaviest first and giving each to the lightest pack that is not full.
//! * [`replicate`]: give `P − N` extra slots to experts one at a time, each to the expert whose
//!   load per replica is currently highest.
//!
//! Ties are broken the same way everywhere: heavier first, then lower index (items are visited
//! by descending weight, then ascending index; among equal packs the lowest index wins; among
//! equal per-replica loads the lowest expert index wins). numpy's default sort, which vLLM
//! uses, is not stable, so vLLM's output on tied input depends on the platform; ours does not.

/// Scratch buffers reused across layers so the hot loop does not allocate.
#[derive(Debug, Default)]
pub(crate) struct PackScratch {
    order: Vec<usize>,
    keys: Vec<u64>,
    pack_weight: Vec<f32>,
    pack_items: Vec<usize>,
}

/// Packs `weights.len()` items into `packs` packs of equal item count.
///
/// Writes each item's pack into `pack[i]` and its position in the pack (the pack's item count
/// before it was added) into `rank[i]`. The caller guarantees `packs ≥ 1`,
/// `weights.len() % packs == 0` and that `pack` and `rank` have `weights.len()` entries.
///
/// With one item per pack the result is the identity (item `i` in pack `i`), as in DeepSeek.
pub(crate) fn balanced_packing(
    weights: &[f32],
    packs: usize,
    pack: &mut [usize],
    rank: &mut [usize],
    scratch: &mut PackScratch,
) {
    let n = weights.len();
    let per_pack = n / packs;
    if per_pack == 1 {
        for i in 0..n {
            pack[i] = i;
            rank[i] = 0;
        }
        return;
    }
    let order = &mut scratch.order;
    order.clear();
    // Descending weight, then ascending index: a total order, so the result is unique.
    // Weights are non-negative (and never -0.0), so their bit patterns order like the
    // values: sort `(!bits, index)` packed in a u64.
    if u32::try_from(n).is_ok() {
        let keys = &mut scratch.keys;
        keys.clear();
        keys.extend(
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| (u64::from(!w.to_bits()) << 32) | i as u64),
        );
        keys.sort_unstable();
        order.extend(keys.iter().map(|&k| (k & 0xFFFF_FFFF) as usize));
    } else {
        order.extend(0..n);
        order.sort_unstable_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    }
    let pack_weight = &mut scratch.pack_weight;
    let pack_items = &mut scratch.pack_items;
    pack_weight.clear();
    pack_weight.resize(packs, 0.0);
    pack_items.clear();
    pack_items.resize(packs, 0);
    for &item in order.iter() {
        // The lightest pack that is not full, lowest index on ties. n = per_pack · packs items
        // fill the packs exactly, so a non-full pack always exists.
        let mut best = usize::MAX;
        let mut best_weight = f32::INFINITY;
        for (p, (&w, &items)) in pack_weight.iter().zip(pack_items.iter()).enumerate() {
            if items < per_pack && (best == usize::MAX || w < best_weight) {
                best = p;
                best_weight = w;
            }
        }
        pack[item] = best;
        rank[item] = pack_items[best];
        pack_weight[best] += weights[item];
        pack_items[best] += 1;
    }
}

/// Replicates `weights.len()` experts into `phy2log.len()` slots.
///
/// Slot `i < N` holds expert `i`; each further slot goes to the expert with the highest
/// `weight / count` (computed in `f32`, lowest index on ties), whose count then grows. Writes
/// the slots into `phy2log` and the final counts into `count`. The caller guarantees
/// `phy2log.len() ≥ weights.len() = count.len()`.
pub(crate) fn replicate(
    weights: &[f32],
    phy2log: &mut [usize],
    count: &mut [usize],
    per_replica: &mut Vec<f32>,
) {
    let n = weights.len();
    per_replica.clear();
    per_replica.extend_from_slice(weights);
    for (i, slot) in phy2log.iter_mut().enumerate().take(n) {
        *slot = i;
    }
    count.iter_mut().for_each(|c| *c = 1);
    for slot in phy2log.iter_mut().skip(n) {
        // The highest load per replica, lowest index on ties.
        let mut best = 0;
        let mut best_value = f32::NEG_INFINITY;
        for (j, &v) in per_replica.iter().enumerate() {
            if v > best_value {
                best = j;
                best_value = v;
            }
        }
        *slot = best;
        count[best] += 1;
        per_replica[best] = weights[best] / count[best] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_vector_from_the_study() {
        // balanced_packing([[5,4,3,2,1,0]], 2) → pack [0,1,1,0,0,1], rank [0,0,1,1,2,2].
        let mut pack = [0; 6];
        let mut rank = [0; 6];
        balanced_packing(
            &[5.0, 4.0, 3.0, 2.0, 1.0, 0.0],
            2,
            &mut pack,
            &mut rank,
            &mut PackScratch::default(),
        );
        assert_eq!(pack, [0, 1, 1, 0, 0, 1]);
        assert_eq!(rank, [0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn one_item_per_pack_is_identity() {
        let mut pack = [9; 3];
        let mut rank = [9; 3];
        balanced_packing(
            &[1.0, 3.0, 2.0],
            3,
            &mut pack,
            &mut rank,
            &mut PackScratch::default(),
        );
        assert_eq!(pack, [0, 1, 2]);
        assert_eq!(rank, [0, 0, 0]);
    }

    #[test]
    fn ties_go_to_the_lower_index_first() {
        // Four equal items into two packs: items 0,1,2,3 in that order; 0 → pack 0, 1 → pack 1
        // (pack 0 heavier), 2 → pack 0 (tie, lowest index), 3 → pack 1.
        let mut pack = [0; 4];
        let mut rank = [0; 4];
        balanced_packing(
            &[7.0; 4],
            2,
            &mut pack,
            &mut rank,
            &mut PackScratch::default(),
        );
        assert_eq!(pack, [0, 1, 0, 1]);
        assert_eq!(rank, [0, 0, 1, 1]);
    }

    #[test]
    fn replication_vector_from_the_study() {
        // replicate_experts([[10,40,20,30]], 6) → p2l [0,1,2,3,1,3], count [1,2,1,2].
        let mut p2l = [0; 6];
        let mut cnt = [0; 4];
        replicate(
            &[10.0, 40.0, 20.0, 30.0],
            &mut p2l,
            &mut cnt,
            &mut Vec::new(),
        );
        assert_eq!(p2l, [0, 1, 2, 3, 1, 3]);
        assert_eq!(cnt, [1, 2, 1, 2]);
    }

    #[test]
    fn replication_ties_pick_the_lowest_expert() {
        // 100 = 200/2: after one extra replica of expert 1, experts 0 and 1 tie at 100 per
        // replica and expert 0 wins.
        let mut p2l = [0; 4];
        let mut cnt = [0; 2];
        replicate(&[100.0, 200.0], &mut p2l, &mut cnt, &mut Vec::new());
        assert_eq!(p2l, [0, 1, 1, 0]);
        assert_eq!(cnt, [2, 2]);
    }
}
