//! Slot preservation: reorder a new placement inside each rank so that experts a rank keeps
//! stay in the rows they already occupy.
//!
//! For each rank, with its old and new rows:
//! 1. for every old row `s` in order, if a not yet used new row of this rank holds the same
//!    expert, the first such new entry goes to row `s`;
//! 2. the remaining new entries, in ascending row order, fill the remaining rows in ascending
//!    order.
//!
//! The multiset of experts on each rank is unchanged, so balancedness and the number of moved
//! replicas are too; only rows that really change need new weights. This is vLLM's
//! `preserve_intragpu_slots`, except that the layouts must match (vLLM does not check the
//! width of the old map).

use crate::placement::{MapError, Placement};

/// Reorders `new` inside each rank to keep `old`'s rows where the expert stays (see the
/// [module documentation](self)).
///
/// # Errors
/// [`MapError::ShapeMismatch`] when the two placements have different layouts.
///
/// ```
/// use moeshift_placement::{preserve_slots, Placement};
/// let old = Placement::from_rows(8, 2, &[[0, 1, 2, 3, 4, 5, 6, 7]])?;
/// let new = Placement::from_rows(8, 2, &[[1, 5, 0, 4, 6, 2, 7, 3]])?;
/// let kept = preserve_slots(&new, &old)?;
/// assert_eq!(kept.phy2log(0), Some(&[0, 1, 5, 4, 2, 3, 6, 7][..]));
/// # Ok::<(), moeshift_placement::MapError>(())
/// ```
pub fn preserve_slots(new: &Placement, old: &Placement) -> Result<Placement, MapError> {
    new.layout().expect_same(&old.layout())?;
    let mut rows = new.phy2log_flat().to_vec();
    let mut scratch = PreserveScratch::default();
    let p = new.num_physical();
    for (new_row, old_row) in rows
        .chunks_exact_mut(p)
        .zip(old.phy2log_flat().chunks_exact(p))
    {
        preserve_row(new_row, old_row, new.slots_per_rank(), &mut scratch);
    }
    Placement::from_flat(new.layout(), rows)
}

/// Reusable buffers for [`preserve_row`].
#[derive(Debug, Default)]
pub(crate) struct PreserveScratch {
    used: Vec<bool>,
    out: Vec<usize>,
}

/// Marks a row not filled yet (expert ids are below the number of experts, a `Vec` length,
/// so they never reach it).
const EMPTY: usize = usize::MAX;

/// Applies slot preservation to one layer row in place. The caller guarantees
/// `new.len() == old.len()` and `spr ≥ 1` dividing it.
pub(crate) fn preserve_row(
    new: &mut [usize],
    old: &[usize],
    spr: usize,
    scratch: &mut PreserveScratch,
) {
    for (new_seg, old_seg) in new.chunks_exact_mut(spr).zip(old.chunks_exact(spr)) {
        if new_seg == old_seg {
            continue;
        }
        let used = &mut scratch.used;
        let out = &mut scratch.out;
        used.clear();
        used.resize(spr, false);
        out.clear();
        out.resize(spr, EMPTY);
        // 1. Each old row keeps its expert if an unused new entry holds it (the first one).
        for (o, &e) in out.iter_mut().zip(old_seg.iter()) {
            for (u, &x) in used.iter_mut().zip(new_seg.iter()) {
                if !*u && x == e {
                    *u = true;
                    *o = e;
                    break;
                }
            }
        }
        // 2. The other new entries, in order, fill the other rows, in order.
        let mut free = out.iter_mut().filter(|o| **o == EMPTY);
        for (&u, &x) in used.iter().zip(new_seg.iter()) {
            if !u {
                if let Some(o) = free.next() {
                    *o = x;
                }
            }
        }
        new_seg.copy_from_slice(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(old: &[usize], new: &[usize], ranks: usize) -> Vec<usize> {
        let mut row = new.to_vec();
        preserve_row(
            &mut row,
            old,
            old.len() / ranks,
            &mut PreserveScratch::default(),
        );
        row
    }

    /// vLLM's `test_preserve_intragpu_slots` inputs, outputs as recomputed in the study §10.1.
    #[test]
    fn study_vectors() {
        assert_eq!(
            run(&[0, 1, 2, 3, 4, 5, 6, 7], &[1, 5, 0, 4, 6, 2, 7, 3], 2),
            vec![0, 1, 5, 4, 2, 3, 6, 7]
        );
        assert_eq!(
            run(
                &[0, 1, 0, 2, 3, 4, 5, 6, 1, 2],
                &[0, 5, 4, 0, 1, 6, 2, 3, 2, 1],
                2
            ),
            vec![0, 1, 0, 5, 4, 3, 2, 6, 1, 2]
        );
        let old: Vec<usize> = [0, 1, 2, 3].repeat(3);
        let mut new = vec![0; 8];
        new.extend([1, 2, 3, 0]);
        let mut expected = vec![0; 9];
        expected.extend([1, 2, 3]);
        assert_eq!(run(&old, &new, 3), expected);
    }

    #[test]
    fn per_rank_multisets_are_unchanged() {
        let old = [3, 3, 1, 0, 2, 2];
        let new = [0, 3, 1, 2, 1, 3];
        let out = run(&old, &new, 2);
        for r in 0..2 {
            let mut a = new[r * 3..r * 3 + 3].to_vec();
            let mut b = out[r * 3..r * 3 + 3].to_vec();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b);
        }
        // Rank 0 keeps 3 at row 0 (its first old row) and 1 at row 2.
        assert_eq!(&out[..3], &[3, 0, 1]);
    }

    #[test]
    fn layouts_must_match() {
        let a = Placement::from_rows(2, 1, &[[0, 1]]).unwrap();
        let b = Placement::from_rows(2, 2, &[[0, 1]]).unwrap();
        assert!(matches!(
            preserve_slots(&a, &b),
            Err(MapError::ShapeMismatch {
                field: "num_ranks",
                ..
            })
        ));
    }
}
