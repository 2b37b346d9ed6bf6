//! The order in which grouped point-to-point operations are issued: symmetric rounds of a
//! round-robin tournament, each cut into NCCL groups of at most [`MAX_P2P_OPS_PER_GROUP`]
//! operations.
//!
//! Putting many sends and receives to many peers in one `ncclGroupStart/End` can hang under
//! load (PyTorch's batched isend/irecv over NCCL hangs with 1000 operations and not with 256;
//! asymmetric batches are reported to hang NCCL too).
//! Here every rank walks the same sequence of rounds; in a round each rank is paired with at
//! most one peer (the circle method), and a pair exchanges both directions at once. A round
//! with more operations than fit in one group is cut into chunks the same way on both sides —
//! chunk `c` holds the `c`-th slice of the sends *and* of the receives, at most half a group
//! each — so the k-th group rank A issues towards B is exactly the group B issues towards A.
//! Each group then depends only on its partner's matching group, and no cycle can form.
//!
//! Everything here is pure and cheap: the same inputs give the same schedule on every rank.

use super::{NcclError, P2pKind};

/// Most point-to-point operations NCCL is given in one group.
pub const MAX_P2P_OPS_PER_GROUP: usize = 256;

/// Number of rounds of the tournament for `world` ranks: `world - 1` when even, `world` when
/// odd (every rank sits out one round), 0 for fewer than two ranks.
pub fn round_count(world: usize) -> usize {
    match world {
        0 | 1 => 0,
        w if w % 2 == 0 => w - 1,
        w => w,
    }
}

/// The peer `rank` meets in `round`, or `None` when it sits the round out (odd world) or an
/// argument is out of range.
///
/// Circle method with `n` = `world` rounded up to even and `m = n - 1`: rank `m` stays fixed
/// and meets rank `r` in round `r`; every other pair `{x, y}` meets in the round `r` with
/// `x + y ≡ 2r (mod m)`, which is unique because `m` is odd.
///
/// ```
/// use moeshift_device_comm::nccl::schedule::round_partner;
///
/// // Four ranks, three rounds: {0,3}{1,2} / {1,3}{0,2} / {2,3}{0,1}.
/// assert_eq!(round_partner(0, 0, 4), Some(3));
/// assert_eq!(round_partner(1, 0, 4), Some(2));
/// assert_eq!(round_partner(0, 1, 4), Some(2));
/// assert_eq!(round_partner(0, 2, 4), Some(1));
/// // Three ranks: someone sits out every round.
/// assert_eq!(round_partner(0, 0, 3), None);
/// ```
pub fn round_partner(rank: usize, round: usize, world: usize) -> Option<usize> {
    if rank >= world || round >= round_count(world) {
        return None;
    }
    let n = world + world % 2;
    let m = n - 1;
    let partner = if rank == m {
        round
    } else if rank == round {
        m
    } else {
        (2 * round + m - rank) % m
    };
    (partner < world).then_some(partner)
}

/// Every round of the tournament as its list of pairs `(a, b)` with `a < b`.
pub fn round_robin(world: usize) -> Vec<Vec<(usize, usize)>> {
    (0..round_count(world))
        .map(|round| {
            (0..world)
                .filter_map(|rank| {
                    round_partner(rank, round, world)
                        .filter(|&peer| rank < peer)
                        .map(|peer| (rank, peer))
                })
                .collect()
        })
        .collect()
}

/// One NCCL group of a schedule: operations with a single peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct P2pGroup {
    /// The peer of every operation in the group (this rank itself for local copies).
    pub peer: usize,
    /// The tournament round, or `None` for the operations of a rank with itself (issued first).
    pub round: Option<usize>,
    /// Index of this chunk within the round.
    pub chunk: usize,
    /// Indices into the operation list: this chunk's sends, then its receives, each in list
    /// order.
    pub ops: Vec<usize>,
}

/// Orders `ops` (direction and peer of each operation of this rank, in caller order) into
/// groups: operations with itself first, then one or more groups per tournament round, each
/// with at most `max_ops_per_group` operations (which must be at least 2).
///
/// Every rank of an exchange must call this with its own list; when the lists match (each
/// send has its receive on the peer, in the same order), the schedules match group for group.
pub fn schedule_p2p(
    rank: usize,
    world: usize,
    ops: &[(P2pKind, usize)],
    max_ops_per_group: usize,
) -> Result<Vec<P2pGroup>, NcclError> {
    if rank >= world {
        return Err(NcclError::InvalidArgument {
            rank: Some(rank),
            field: "rank",
            what: format!("rank {rank} is outside a world of {world}"),
        });
    }
    if max_ops_per_group < 2 {
        return Err(NcclError::InvalidArgument {
            rank: Some(rank),
            field: "max_ops_per_group",
            what: format!("{max_ops_per_group} cannot hold a send and a receive"),
        });
    }
    let mut sends: Vec<Vec<usize>> = vec![Vec::new(); world];
    let mut recvs: Vec<Vec<usize>> = vec![Vec::new(); world];
    for (index, &(kind, peer)) in ops.iter().enumerate() {
        let lists = match kind {
            P2pKind::Send => &mut sends,
            P2pKind::Recv => &mut recvs,
        };
        match lists.get_mut(peer) {
            Some(list) => list.push(index),
            None => {
                return Err(NcclError::InvalidArgument {
                    rank: Some(rank),
                    field: "peer",
                    what: format!(
                        "operation {index} ({kind:?}) names peer {peer}, outside a world of \
                         {world}"
                    ),
                })
            }
        }
    }

    let half = max_ops_per_group / 2;
    let mut groups = Vec::new();
    let mut push_pair = |peer: usize, round: Option<usize>| {
        let (s, r) = match (sends.get(peer), recvs.get(peer)) {
            (Some(s), Some(r)) => (s, r),
            _ => return,
        };
        let chunks = s.len().div_ceil(half).max(r.len().div_ceil(half));
        for chunk in 0..chunks {
            let lo = chunk * half;
            let mut ops: Vec<usize> = s.iter().skip(lo).take(half).copied().collect();
            ops.extend(r.iter().skip(lo).take(half).copied());
            groups.push(P2pGroup {
                peer,
                round,
                chunk,
                ops,
            });
        }
    };
    push_pair(rank, None);
    for round in 0..round_count(world) {
        if let Some(peer) = round_partner(rank, round, world) {
            push_pair(peer, Some(round));
        }
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// Every unordered pair exactly once, each rank at most once per round.
    fn check_tournament(world: usize) {
        let rounds = round_robin(world);
        assert_eq!(rounds.len(), round_count(world));
        let mut seen = BTreeSet::new();
        for (r, pairs) in rounds.iter().enumerate() {
            let mut busy = BTreeSet::new();
            for &(a, b) in pairs {
                assert!(
                    a < b && b < world,
                    "world {world} round {r}: bad pair ({a},{b})"
                );
                assert!(
                    busy.insert(a),
                    "world {world} round {r}: rank {a} paired twice"
                );
                assert!(
                    busy.insert(b),
                    "world {world} round {r}: rank {b} paired twice"
                );
                assert!(
                    seen.insert((a, b)),
                    "world {world}: pair ({a},{b}) met twice"
                );
                // Symmetry: each side computes the other as its partner.
                assert_eq!(round_partner(a, r, world), Some(b));
                assert_eq!(round_partner(b, r, world), Some(a));
            }
            // Ranks with no pair in this round must get `None`.
            for rank in (0..world).filter(|x| !busy.contains(x)) {
                assert_eq!(round_partner(rank, r, world), None);
            }
        }
        assert_eq!(
            seen.len(),
            world * world.saturating_sub(1) / 2,
            "world {world}"
        );
    }

    #[test]
    fn tournaments_cover_every_pair_once() {
        for world in 0..=17 {
            check_tournament(world);
        }
    }

    #[test]
    fn four_ranks_match_the_circle_method_by_hand() {
        // Fixed rank 3; round r pairs r with 3 and the other two ranks with each other.
        assert_eq!(
            round_robin(4),
            vec![
                vec![(0, 3), (1, 2)],
                vec![(0, 2), (1, 3)],
                vec![(0, 1), (2, 3)]
            ]
        );
        // Odd world: the phantom rank 3 makes rank r sit out round r.
        assert_eq!(
            round_robin(3),
            vec![vec![(1, 2)], vec![(0, 2)], vec![(0, 1)]]
        );
    }

    #[test]
    fn out_of_range_inputs_give_no_partner() {
        assert_eq!(round_partner(4, 0, 4), None);
        assert_eq!(round_partner(0, 3, 4), None);
        assert_eq!(round_partner(0, 0, 1), None);
    }

    #[test]
    fn schedule_rejects_bad_peers_and_tiny_groups() {
        let err = schedule_p2p(0, 2, &[(P2pKind::Send, 2)], 256).unwrap_err();
        assert!(err.to_string().contains("peer 2"), "{err}");
        assert!(schedule_p2p(2, 2, &[], 256).is_err());
        assert!(schedule_p2p(0, 2, &[], 1).is_err());
    }

    #[test]
    fn big_exchange_with_one_peer_is_cut_symmetrically() {
        // Rank 0 sends 300 messages to rank 1 and receives 10: three chunks of <= 128 sends,
        // the 10 receives all in the first chunk.
        let mut ops = vec![(P2pKind::Send, 1); 300];
        ops.extend(vec![(P2pKind::Recv, 1); 10]);
        let groups = schedule_p2p(0, 2, &ops, 256).unwrap();
        let sizes: Vec<usize> = groups.iter().map(|g| g.ops.len()).collect();
        assert_eq!(sizes, vec![128 + 10, 128, 44]);
        assert!(groups.iter().all(|g| g.peer == 1 && g.round == Some(0)));
        // Rank 1 mirrors it: its 10 sends and first 128 receives share the first group.
        let mut mirror = vec![(P2pKind::Send, 0); 10];
        mirror.extend(vec![(P2pKind::Recv, 0); 300]);
        let groups1 = schedule_p2p(1, 2, &mirror, 256).unwrap();
        let sizes1: Vec<usize> = groups1.iter().map(|g| g.ops.len()).collect();
        assert_eq!(sizes1, sizes);
    }

    #[test]
    fn self_operations_come_first() {
        let ops = [(P2pKind::Send, 1), (P2pKind::Recv, 0), (P2pKind::Send, 0)];
        let groups = schedule_p2p(0, 2, &ops, 256).unwrap();
        assert_eq!(groups[0].peer, 0);
        assert_eq!(groups[0].round, None);
        assert_eq!(groups[0].ops, vec![2, 1]);
        assert_eq!(groups[1].peer, 1);
        assert_eq!(groups[1].ops, vec![0]);
    }

    /// A message label: (sender, receiver, sequence number on that ordered pair).
    type Msg = (usize, usize, usize);

    /// Each rank's op list for a traffic matrix `counts[a][b]` (messages a -> b), interleaving
    /// peers and directions so that caller order differs from schedule order.
    fn op_lists(counts: &[Vec<usize>]) -> Vec<Vec<(P2pKind, usize, Msg)>> {
        let world = counts.len();
        let most = counts.iter().flatten().copied().max().unwrap_or(0);
        (0..world)
            .map(|a| {
                let mut ops = Vec::new();
                for k in 0..most {
                    for step in 0..world {
                        let b = (a + step + k) % world;
                        if k < counts[a][b] {
                            ops.push((P2pKind::Send, b, (a, b, k)));
                        }
                        if k < counts[b][a] {
                            ops.push((P2pKind::Recv, b, (b, a, k)));
                        }
                    }
                }
                ops
            })
            .collect()
    }

    /// Each rank's schedule for its op list.
    fn schedules_for(
        lists: &[Vec<(P2pKind, usize, Msg)>],
        max_ops: usize,
    ) -> Result<Vec<Vec<P2pGroup>>, String> {
        let world = lists.len();
        lists
            .iter()
            .enumerate()
            .map(|(rank, list)| {
                let ops: Vec<(P2pKind, usize)> = list.iter().map(|&(k, p, _)| (k, p)).collect();
                schedule_p2p(rank, world, &ops, max_ops).map_err(|e| e.to_string())
            })
            .collect()
    }

    /// Builds and runs the schedules of a traffic matrix (see [`run`]).
    fn simulate(counts: &[Vec<usize>], max_ops: usize) -> Result<(), String> {
        let lists = op_lists(counts);
        let schedules = schedules_for(&lists, max_ops)?;
        run(&lists, &schedules, max_ops)
    }

    /// Runs every rank's schedule the way NCCL would: a group finishes only together with the
    /// partner's current group, and only if the two carry the same messages. Returns an error
    /// describing a deadlock or a mismatch.
    fn run(
        lists: &[Vec<(P2pKind, usize, Msg)>],
        schedules: &[Vec<P2pGroup>],
        max_ops: usize,
    ) -> Result<(), String> {
        let world = lists.len();
        for (rank, groups) in schedules.iter().enumerate() {
            let mut all: Vec<usize> = groups.iter().flat_map(|g| g.ops.clone()).collect();
            all.sort_unstable();
            if all != (0..lists[rank].len()).collect::<Vec<_>>() {
                return Err(format!("rank {rank}: ops lost or duplicated"));
            }
            for g in groups {
                if g.ops.len() > max_ops {
                    return Err(format!("rank {rank}: group of {} ops", g.ops.len()));
                }
                if g.ops.iter().any(|&i| lists[rank][i].1 != g.peer) {
                    return Err(format!("rank {rank}: group mixes peers"));
                }
            }
        }

        let msgs = |rank: usize, g: &P2pGroup, kind: P2pKind| -> Vec<Msg> {
            g.ops
                .iter()
                .map(|&i| lists[rank][i])
                .filter(|op| op.0 == kind)
                .map(|op| op.2)
                .collect()
        };
        let mut head = vec![0usize; world];
        loop {
            let mut progressed = false;
            for a in 0..world {
                let Some(ga) = schedules[a].get(head[a]) else {
                    continue;
                };
                let b = ga.peer;
                if b == a {
                    if msgs(a, ga, P2pKind::Send) != msgs(a, ga, P2pKind::Recv) {
                        return Err(format!("rank {a}: self group does not match itself"));
                    }
                    head[a] += 1;
                    progressed = true;
                    continue;
                }
                let Some(gb) = schedules[b].get(head[b]) else {
                    continue;
                };
                if gb.peer != a || a > b {
                    continue;
                }
                if msgs(a, ga, P2pKind::Send) != msgs(b, gb, P2pKind::Recv)
                    || msgs(b, gb, P2pKind::Send) != msgs(a, ga, P2pKind::Recv)
                {
                    return Err(format!(
                        "ranks {a},{b}: matched groups carry different messages"
                    ));
                }
                head[a] += 1;
                head[b] += 1;
                progressed = true;
            }
            if (0..world).all(|r| head[r] == schedules[r].len()) {
                return Ok(());
            }
            if !progressed {
                return Err(format!("deadlock with group heads {head:?}"));
            }
        }
    }

    #[test]
    fn all_to_all_of_eight_ranks_with_many_messages_completes() {
        // 8 ranks, 40 messages per ordered pair (280 ops per rank): groups of 16 force chunks.
        let counts = vec![vec![40; 8]; 8];
        simulate(&counts, 16).unwrap();
        simulate(&counts, MAX_P2P_OPS_PER_GROUP).unwrap();
    }

    #[test]
    fn simulator_catches_out_of_order_rounds_and_swapped_messages() {
        let counts = vec![vec![2; 4]; 4];
        let lists = op_lists(&counts);
        let good = schedules_for(&lists, 256).unwrap();
        assert_eq!(run(&lists, &good, 256), Ok(()));

        // Rank 0 walking its rounds backwards waits for rank 1 while rank 1 waits for rank 3,
        // who waits for rank 0.
        let mut reversed = good.clone();
        let self_groups = reversed[0].iter().take_while(|g| g.round.is_none()).count();
        reversed[0][self_groups..].reverse();
        let err = run(&lists, &reversed, 256).unwrap_err();
        assert!(err.contains("deadlock"), "{err}");

        // Rank 0 issuing its two sends to a peer in the wrong order would cross messages.
        let mut swapped = good;
        let group = swapped[0]
            .iter_mut()
            .find(|g| g.peer != 0)
            .expect("a group with another rank");
        group.ops.swap(0, 1);
        let err = run(&lists, &swapped, 256).unwrap_err();
        assert!(err.contains("different messages"), "{err}");
    }

    proptest! {
        #[test]
        fn random_exchanges_are_deadlock_free_and_bounded(
            world in 1usize..9,
            seed in proptest::collection::vec(0usize..40, 64),
            max_ops in prop_oneof![Just(2usize), Just(4), Just(7), Just(MAX_P2P_OPS_PER_GROUP)],
        ) {
            let counts: Vec<Vec<usize>> = (0..world)
                .map(|a| (0..world).map(|b| seed[(a * 8 + b) % seed.len()] % (7 + a + b)).collect())
                .collect();
            prop_assert_eq!(simulate(&counts, max_ops), Ok(()));
        }

        #[test]
        fn tournament_is_a_perfect_round_robin(world in 0usize..64) {
            check_tournament(world);
        }
    }
}
