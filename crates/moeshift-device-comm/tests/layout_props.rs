//! Property tests of the parallel layout: for any sizes, the groups of each kind partition
//! the world, every rank is in exactly one group of each kind, group members share the
//! coordinates the kind fixes, and the EP group has DP·PCP·TP ranks.

use moeshift_device_comm::layout::{
    GroupKind, LayoutError, ParallelLayout, ParallelSizes, RankCoords,
};
use proptest::prelude::*;

fn sizes() -> impl Strategy<Value = ParallelSizes> {
    (1usize..=4, 1usize..=3, 1usize..=3, 1usize..=4).prop_map(|(tp, pcp, pp, dp)| ParallelSizes {
        tp,
        pcp,
        pp,
        dp,
    })
}

fn world(s: &ParallelSizes) -> usize {
    s.dp * s.pp * s.pcp * s.tp
}

/// The coordinates a group of `kind` varies (its members differ only there), and the
/// position in the group the layout rule gives: the varied dimension's index, or for
/// EP/EPLB `(dp · PCP + pcp) · TP + tp`.
fn varied_position(kind: GroupKind, c: RankCoords, s: &ParallelSizes) -> usize {
    match kind {
        GroupKind::Tp => c.tp,
        GroupKind::Pcp => c.pcp,
        GroupKind::Pp => c.pp,
        GroupKind::Dp => c.dp,
        GroupKind::Ep | GroupKind::Eplb => (c.dp * s.pcp + c.pcp) * s.tp + c.tp,
    }
}

/// The coordinates every member of a group of `kind` shares.
fn fixed_coords(kind: GroupKind, c: RankCoords) -> Vec<usize> {
    match kind {
        GroupKind::Tp => vec![c.dp, c.pp, c.pcp],
        GroupKind::Pcp => vec![c.dp, c.pp, c.tp],
        GroupKind::Pp => vec![c.dp, c.pcp, c.tp],
        GroupKind::Dp => vec![c.pp, c.pcp, c.tp],
        GroupKind::Ep | GroupKind::Eplb => vec![c.pp],
    }
}

proptest! {
    #[test]
    fn groups_partition_the_world(s in sizes()) {
        let n = world(&s);
        let layout = ParallelLayout::new(n, s).expect("valid sizes");
        prop_assert_eq!(layout.ep_size(), s.dp * s.pcp * s.tp);
        for kind in GroupKind::ALL {
            let groups = layout.groups(kind);
            prop_assert_eq!(groups.len(), layout.group_count(kind));
            let mut seen = vec![0usize; n];
            for g in groups {
                prop_assert_eq!(g.len(), layout.group_size(kind));
                for &r in g {
                    prop_assert!(r < n);
                    seen[r] += 1;
                }
            }
            prop_assert!(seen.iter().all(|&c| c == 1), "{kind}: {seen:?}");
        }
        prop_assert_eq!(layout.groups(GroupKind::Eplb), layout.groups(GroupKind::Ep));
        prop_assert_eq!(layout.group_count(GroupKind::Ep), s.pp);
    }

    #[test]
    fn membership_agrees_with_the_group_lists(s in sizes()) {
        let n = world(&s);
        let layout = ParallelLayout::new(n, s).expect("valid sizes");
        for rank in 0..n {
            let c = layout.coords(rank).expect("coords");
            // rank = ((dp · PP + pp) · PCP + pcp) · TP + tp, TP fastest.
            prop_assert_eq!(rank, ((c.dp * s.pp + c.pp) * s.pcp + c.pcp) * s.tp + c.tp);
            prop_assert_eq!(layout.rank_at(c), Some(rank));
            for kind in GroupKind::ALL {
                let m = layout.membership(kind, rank).expect("membership");
                prop_assert_eq!(m.ranks, layout.groups(kind)[m.index].as_slice());
                prop_assert_eq!(m.ranks[m.rank_in_group], rank);
                prop_assert_eq!(m.rank_in_group, varied_position(kind, c, &s));
                for &other in m.ranks {
                    let oc = layout.coords(other).expect("coords");
                    prop_assert_eq!(fixed_coords(kind, oc), fixed_coords(kind, c));
                }
            }
        }
        let out_of_range = matches!(
            layout.membership(GroupKind::Tp, n),
            Err(LayoutError::RankOutOfRange { .. })
        );
        prop_assert!(out_of_range);
    }

    #[test]
    fn tp_groups_are_contiguous_blocks(s in sizes()) {
        let layout = ParallelLayout::new(world(&s), s).expect("valid sizes");
        for (i, g) in layout.groups(GroupKind::Tp).iter().enumerate() {
            let block: Vec<usize> = (i * s.tp..(i + 1) * s.tp).collect();
            prop_assert_eq!(g, &block);
        }
    }

    #[test]
    fn sizes_that_do_not_multiply_to_the_world_are_rejected(s in sizes(), delta in 1usize..5) {
        let n = world(&s) + delta;
        let rejected = matches!(
            ParallelLayout::new(n, s),
            Err(LayoutError::SizeMismatch { .. })
        );
        prop_assert!(rejected);
    }
}

#[test]
fn zero_sizes_are_rejected() {
    for field in ["tp", "pcp", "pp", "dp"] {
        let mut s = ParallelSizes::default();
        match field {
            "tp" => s.tp = 0,
            "pcp" => s.pcp = 0,
            "pp" => s.pp = 0,
            _ => s.dp = 0,
        }
        match ParallelLayout::new(1, s) {
            Err(LayoutError::ZeroSize { field: f }) => assert_eq!(f, field),
            other => panic!("{field} = 0 gave {other:?}"),
        }
    }
}
