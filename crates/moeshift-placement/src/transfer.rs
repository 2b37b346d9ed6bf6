//! Transfer planning: which expert rows each rank copies locally, sends, receives and fills,
//! to go from one layer's old `phy2log` to its new one, and in which rounds.
//!
//! A [`LayerPlan`] is a pure function of `(old, new, num_ranks)`, so every rank computes the
//! same plan without talking to the others, and a rank's sends always match its peers'
//! receives. For every rank `r` (rows are the rank's `P/R` slots) and every new row `i`
//! holding expert `e`:
//!
//! * **unchanged**: the old row `i` already holds `e`; nothing to do.
//! * **local copy**: the rank held `e` in another old row; copy from its first old row.
//!   Never over the wire.
//! * **receive**: the rank did not hold `e`. The first such row of `e` on the rank (the
//!   *primary*) receives it from a peer; each further row of `e` on the rank is a
//!   **duplicate fill**, copied locally from the primary once it has landed.
//!
//! **Senders.** The senders of `e` are the ranks that held it in the old map (ascending), and
//! each sends from its first old row of `e`. Receivers of `e` (ascending rank) are taken expert
//! by expert in ascending id, and each is served by the sender of `e` with the fewest sends
//! assigned so far in this layer, the lower rank on ties. vLLM splits each expert's receivers
//! into contiguous blocks, one per sender, with the remainder going to the lowest senders for
//! every expert, which piles the extra sends of all experts on the same low ranks; counting
//! sends over the whole layer spreads them.
//!
//! **Rounds.** Transfers between the same two ranks (both directions) form one pair. Pairs, in
//! the order they first appear above, are coloured first-fit: a pair joins the first round in
//! which neither rank already talks to someone, or opens a new round. Within a round each rank
//! talks to at most one peer, and a pair's traffic in both directions is in the same round,
//! so a communicator can run each round as symmetric point-to-point exchanges.
//!
//! **Semantics for executors.** Local copies and sends read the rows' *old* content (stage
//! local copies before overwriting anything, and keep a source row intact until its sends
//! completed); receives write the primary rows; duplicate fills read the primary rows' *new*
//! content, after the receives landed.

use serde::Serialize;

/// Why a transfer plan could not be built or replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// No rank.
    #[error("a transfer plan needs at least one rank")]
    NoRanks,
    /// The old and new maps have different widths.
    #[error("old phy2log has {old} slots but new phy2log has {new}")]
    LengthMismatch {
        /// Slots in the old map.
        old: usize,
        /// Slots in the new map.
        new: usize,
    },
    /// The slots cannot be split evenly over the ranks.
    #[error("{slots} slots cannot be split evenly over {ranks} ranks")]
    NotDivisible {
        /// Slots per map.
        slots: usize,
        /// Ranks.
        ranks: usize,
    },
    /// A rank needs an expert that no rank holds in the old map.
    #[error("rank {rank} needs expert {expert} in row {row}, but no rank holds it in the old map")]
    MissingSource {
        /// The receiving rank.
        rank: usize,
        /// The expert.
        expert: usize,
        /// The row it is needed in.
        row: usize,
    },
    /// Two placements given to [`LayerPlan::between`] have different layouts.
    #[error("old and new placements differ: {field} is {old} vs {new}")]
    LayoutMismatch {
        /// The dimension that differs.
        field: &'static str,
        /// Its value in the old placement.
        old: usize,
        /// Its value in the new placement.
        new: usize,
    },
    /// A layer index is not below the number of layers.
    #[error("layer {layer} is out of range for placements of {layers} layers")]
    LayerOutOfRange {
        /// The layer asked for.
        layer: usize,
        /// Layers of the placements.
        layers: usize,
    },
    /// A rank index is not below the number of ranks.
    #[error("rank {rank} is out of range for a plan over {ranks} ranks")]
    RankOutOfRange {
        /// The rank asked for.
        rank: usize,
        /// Ranks of the plan.
        ranks: usize,
    },
    /// Replay: the cluster state given has the wrong number of rows.
    #[error("cluster state has {found} rows, the plan covers {expected}")]
    StateLength {
        /// Rows the plan covers.
        expected: usize,
        /// Rows given.
        found: usize,
    },
    /// Replay: a receive has no matching send on the peer.
    #[error("rank {rank} expects expert {expert} from rank {peer} in round {round}, but rank {peer} has no such send")]
    UnmatchedReceive {
        /// The receiving rank.
        rank: usize,
        /// The sender it expects.
        peer: usize,
        /// The expert.
        expert: usize,
        /// The round.
        round: usize,
    },
    /// Replay: a send has no matching receive on the peer.
    #[error("rank {rank} sends expert {expert} to rank {peer}, which does not receive it")]
    UnmatchedSend {
        /// The sending rank.
        rank: usize,
        /// The receiver.
        peer: usize,
        /// The expert.
        expert: usize,
    },
    /// Replay: a source row does not hold the expert the plan says it holds.
    #[error("rank {rank}, row {row} should hold expert {expected} but holds {found}")]
    WrongContent {
        /// The rank.
        rank: usize,
        /// The row.
        row: usize,
        /// Expert the plan expects.
        expected: usize,
        /// Expert found.
        found: usize,
    },
}

/// A copy between two rows of one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct LocalCopy {
    /// Logical expert being copied.
    pub expert: usize,
    /// Row read.
    pub src_row: usize,
    /// Row written.
    pub dst_row: usize,
}

/// One expert sent to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct SendOp {
    /// Receiving rank.
    pub dst: usize,
    /// Logical expert.
    pub expert: usize,
    /// Row read (its old content).
    pub src_row: usize,
    /// Round in which the pair meets (index into [`LayerPlan::rounds`]).
    pub round: usize,
}

/// One expert received from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct RecvOp {
    /// Sending rank.
    pub src: usize,
    /// Logical expert.
    pub expert: usize,
    /// Row written (the expert's primary row on this rank).
    pub dst_row: usize,
    /// Round in which the pair meets (index into [`LayerPlan::rounds`]).
    pub round: usize,
}

/// Everything one rank does for one layer. Every row of the rank appears exactly once among
/// `unchanged_rows` and the `dst_row`s of `local_copies`, `recvs` and `dup_fills`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RankPlan {
    /// Copies from the rank's own old rows (read old content), by destination row.
    pub local_copies: Vec<LocalCopy>,
    /// Sends, by expert then destination rank.
    pub sends: Vec<SendOp>,
    /// Receives, by expert (one per expert new to the rank).
    pub recvs: Vec<RecvOp>,
    /// Copies from a received primary row to further rows of the same expert (read new
    /// content, after the receives), by destination row.
    pub dup_fills: Vec<LocalCopy>,
    /// Rows that keep their expert.
    pub unchanged_rows: Vec<usize>,
}

impl RankPlan {
    /// Whether the rank's rows do not change at all.
    pub fn is_noop(&self) -> bool {
        self.local_copies.is_empty()
            && self.recvs.is_empty()
            && self.dup_fills.is_empty()
            && self.sends.is_empty()
    }
}

/// Traffic from one rank to another within a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flow {
    /// Sending rank.
    pub src: usize,
    /// Receiving rank.
    pub dst: usize,
    /// Experts sent, ascending.
    pub experts: Vec<usize>,
}

/// A set of flows in which every rank talks to at most one peer. When a pair has traffic in
/// both directions, both flows are in the same round.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Round {
    /// Flows of the round.
    pub flows: Vec<Flow>,
}

impl Round {
    /// The peer `rank` talks to in this round, if any.
    pub fn peer_of(&self, rank: usize) -> Option<usize> {
        self.flows.iter().find_map(|f| {
            if f.src == rank {
                Some(f.dst)
            } else if f.dst == rank {
                Some(f.src)
            } else {
                None
            }
        })
    }
}

/// The transfer plan of one layer, for all ranks (see the [module documentation](self)).
///
/// ```
/// use moeshift_placement::LayerPlan;
/// // Four ranks of one row each, experts rotate by one rank.
/// let plan = LayerPlan::new(&[0, 1, 2, 3], &[1, 2, 3, 0], 4)?;
/// let r0 = plan.rank(0)?;
/// assert_eq!((r0.sends[0].dst, r0.sends[0].expert), (3, 0));
/// assert_eq!((r0.recvs[0].src, r0.recvs[0].expert), (1, 1));
/// assert_eq!(plan.rounds().len(), 2);
/// assert_eq!(plan.simulate(&[0, 1, 2, 3])?, vec![1, 2, 3, 0]);
/// # Ok::<(), moeshift_placement::PlanError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerPlan {
    num_ranks: usize,
    rows_per_rank: usize,
    ranks: Vec<RankPlan>,
    rounds: Vec<Round>,
}

impl LayerPlan {
    /// Plans the transfers from `old` to `new` (one layer's `phy2log`, rank-major) over
    /// `num_ranks` ranks.
    ///
    /// # Errors
    /// [`PlanError`] when there is no rank, the maps differ in length or do not split evenly
    /// over the ranks, or a rank needs an expert that no rank holds in `old`.
    pub fn new(old: &[usize], new: &[usize], num_ranks: usize) -> Result<Self, PlanError> {
        if num_ranks == 0 {
            return Err(PlanError::NoRanks);
        }
        if old.len() != new.len() {
            return Err(PlanError::LengthMismatch {
                old: old.len(),
                new: new.len(),
            });
        }
        if old.len() % num_ranks != 0 {
            return Err(PlanError::NotDivisible {
                slots: old.len(),
                ranks: num_ranks,
            });
        }
        let spr = old.len() / num_ranks;
        let mut ranks = vec![RankPlan::default(); num_ranks];
        if spr == 0 {
            return Ok(Self {
                num_ranks,
                rows_per_rank: 0,
                ranks,
                rounds: Vec::new(),
            });
        }

        // Holders in the old map: (expert, rank, first row), sorted, one per (expert, rank).
        let mut holders: Vec<(usize, usize, usize)> = Vec::with_capacity(old.len());
        for (s, &e) in old.iter().enumerate() {
            holders.push((e, s / spr, s % spr));
        }
        holders.sort_unstable();
        holders.dedup_by(|b, a| a.0 == b.0 && a.1 == b.1);

        // Receivers: (expert, rank, primary row), from the per-rank classification.
        let mut needs: Vec<(usize, usize, usize)> = Vec::new();
        for (r, (old_seg, new_seg)) in old.chunks_exact(spr).zip(new.chunks_exact(spr)).enumerate()
        {
            let plan = &mut ranks[r];
            for (i, &e) in new_seg.iter().enumerate() {
                if old_seg[i] == e {
                    plan.unchanged_rows.push(i);
                } else if let Some(j) = old_seg.iter().position(|&x| x == e) {
                    plan.local_copies.push(LocalCopy {
                        expert: e,
                        src_row: j,
                        dst_row: i,
                    });
                } else if let Some(p) = new_seg[..i].iter().position(|&x| x == e) {
                    // An earlier row of the same remote expert is the primary.
                    plan.dup_fills.push(LocalCopy {
                        expert: e,
                        src_row: p,
                        dst_row: i,
                    });
                } else {
                    needs.push((e, r, i));
                }
            }
        }
        needs.sort_unstable();

        // Assign a sender to every receive: experts ascending, receivers ascending, sender
        // with the fewest sends so far (lowest rank on ties).
        let mut sends_of = vec![0usize; num_ranks];
        let mut transfers: Vec<(usize, usize, usize, usize, usize)> =
            Vec::with_capacity(needs.len());
        let mut h = 0;
        for &(e, dst, dst_row) in &needs {
            while h < holders.len() && holders[h].0 < e {
                h += 1;
            }
            let end = holders[h..]
                .iter()
                .position(|x| x.0 != e)
                .map_or(holders.len(), |k| h + k);
            let senders = &holders[h..end];
            let Some(&(_, src, src_row)) =
                senders.iter().min_by_key(|&&(_, r, _)| (sends_of[r], r))
            else {
                return Err(PlanError::MissingSource {
                    rank: dst,
                    expert: e,
                    row: dst_row,
                });
            };
            sends_of[src] += 1;
            transfers.push((e, src, src_row, dst, dst_row));
        }

        // Pairs in first-appearance order, then first-fit rounds.
        let mut pair_index: Vec<((usize, usize), usize)> = Vec::new();
        let mut pairs: Vec<(usize, usize)> = Vec::new();
        let mut pair_of_transfer = Vec::with_capacity(transfers.len());
        for &(_, src, _, dst, _) in &transfers {
            let key = (src.min(dst), src.max(dst));
            let idx = match pair_index.binary_search_by_key(&key, |&(k, _)| k) {
                Ok(pos) => pair_index[pos].1,
                Err(pos) => {
                    pair_index.insert(pos, (key, pairs.len()));
                    pairs.push(key);
                    pairs.len() - 1
                }
            };
            pair_of_transfer.push(idx);
        }
        let round_of_pair = first_fit_rounds(&pairs, num_ranks);
        let num_rounds = round_of_pair.iter().map(|&r| r + 1).max().unwrap_or(0);

        // Flows of each round in the order they first appear.
        let mut rounds = vec![Round::default(); num_rounds];
        let mut flow_slot: Vec<[Option<usize>; 2]> = vec![[None, None]; pairs.len()];
        for (t, &(e, src, src_row, dst, dst_row)) in transfers.iter().enumerate() {
            let pair = pair_of_transfer[t];
            let round = round_of_pair[pair];
            let dir = usize::from(src > dst);
            let flows = &mut rounds[round].flows;
            let fi = match flow_slot[pair][dir] {
                Some(fi) => fi,
                None => {
                    flows.push(Flow {
                        src,
                        dst,
                        experts: Vec::new(),
                    });
                    flow_slot[pair][dir] = Some(flows.len() - 1);
                    flows.len() - 1
                }
            };
            flows[fi].experts.push(e);
            ranks[src].sends.push(SendOp {
                dst,
                expert: e,
                src_row,
                round,
            });
            ranks[dst].recvs.push(RecvOp {
                src,
                expert: e,
                dst_row,
                round,
            });
        }
        Ok(Self {
            num_ranks,
            rows_per_rank: spr,
            ranks,
            rounds,
        })
    }

    /// The plan between layer `layer` of two placements of the same layout.
    ///
    /// # Errors
    /// [`PlanError::LayoutMismatch`] when the placements' layouts differ,
    /// [`PlanError::LayerOutOfRange`] when `layer` is not a layer of them.
    pub fn between(
        old: &crate::Placement,
        new: &crate::Placement,
        layer: usize,
    ) -> Result<Self, PlanError> {
        let (a, b) = (old.layout(), new.layout());
        for (field, o, n) in [
            ("num_layers", a.num_layers(), b.num_layers()),
            ("num_logical", a.num_logical(), b.num_logical()),
            ("num_physical", a.num_physical(), b.num_physical()),
            ("num_ranks", a.num_ranks(), b.num_ranks()),
        ] {
            if o != n {
                return Err(PlanError::LayoutMismatch {
                    field,
                    old: o,
                    new: n,
                });
            }
        }
        match (old.phy2log(layer), new.phy2log(layer)) {
            (Some(o), Some(n)) => Self::new(o, n, a.num_ranks()),
            _ => Err(PlanError::LayerOutOfRange {
                layer,
                layers: a.num_layers(),
            }),
        }
    }

    /// Number of ranks.
    pub fn num_ranks(&self) -> usize {
        self.num_ranks
    }

    /// Rows (slots) per rank.
    pub fn rows_per_rank(&self) -> usize {
        self.rows_per_rank
    }

    /// The plan of rank `r`.
    ///
    /// # Errors
    /// [`PlanError::RankOutOfRange`] when `r ≥ num_ranks`.
    pub fn rank(&self, r: usize) -> Result<&RankPlan, PlanError> {
        self.ranks.get(r).ok_or(PlanError::RankOutOfRange {
            rank: r,
            ranks: self.num_ranks,
        })
    }

    /// The plans of all ranks, by rank.
    pub fn ranks(&self) -> &[RankPlan] {
        &self.ranks
    }

    /// The rounds: in each, every rank talks to at most one peer.
    pub fn rounds(&self) -> &[Round] {
        &self.rounds
    }

    /// Number of experts sent over the wire in this layer.
    pub fn num_transfers(&self) -> usize {
        self.ranks.iter().map(|r| r.recvs.len()).sum()
    }

    /// Replays the plan on a simulated cluster whose rows hold expert ids (rank-major, like a
    /// `phy2log` row), the way executors would: local copies and sends read the old content,
    /// receives are matched against the peers' sends, duplicate fills read the received rows.
    /// Returns the rows afterwards; for the `old` map the plan was built from, that is `new`.
    ///
    /// # Errors
    /// [`PlanError::StateLength`] for a state of the wrong size, [`PlanError::WrongContent`]
    /// when a source row does not hold the expected expert, and
    /// [`PlanError::UnmatchedReceive`] / [`PlanError::UnmatchedSend`] when the per-rank lists
    /// do not pair up.
    pub fn simulate(&self, state: &[usize]) -> Result<Vec<usize>, PlanError> {
        let spr = self.rows_per_rank;
        let expected = spr * self.num_ranks;
        if state.len() != expected {
            return Err(PlanError::StateLength {
                expected,
                found: state.len(),
            });
        }
        let read = |rank: usize, row: usize, expert: usize, rows: &[usize]| {
            let found = rows[rank * spr + row];
            if found == expert {
                Ok(found)
            } else {
                Err(PlanError::WrongContent {
                    rank,
                    row,
                    expected: expert,
                    found,
                })
            }
        };
        let mut out = state.to_vec();
        for (r, plan) in self.ranks.iter().enumerate() {
            for c in &plan.local_copies {
                out[r * spr + c.dst_row] = read(r, c.src_row, c.expert, state)?;
            }
        }
        let mut matched: Vec<Vec<bool>> = self
            .ranks
            .iter()
            .map(|p| vec![false; p.sends.len()])
            .collect();
        for (r, plan) in self.ranks.iter().enumerate() {
            for rv in &plan.recvs {
                let unmatched = PlanError::UnmatchedReceive {
                    rank: r,
                    peer: rv.src,
                    expert: rv.expert,
                    round: rv.round,
                };
                let peer = self.ranks.get(rv.src).ok_or(unmatched.clone())?;
                let k = peer
                    .sends
                    .iter()
                    .enumerate()
                    .position(|(k, s)| {
                        !matched[rv.src][k]
                            && s.dst == r
                            && s.expert == rv.expert
                            && s.round == rv.round
                    })
                    .ok_or(unmatched)?;
                matched[rv.src][k] = true;
                out[r * spr + rv.dst_row] = read(rv.src, peer.sends[k].src_row, rv.expert, state)?;
            }
        }
        for (r, plan) in self.ranks.iter().enumerate() {
            if let Some(k) = matched[r].iter().position(|&m| !m) {
                let s = &plan.sends[k];
                return Err(PlanError::UnmatchedSend {
                    rank: r,
                    peer: s.dst,
                    expert: s.expert,
                });
            }
        }
        let received = out.clone();
        for (r, plan) in self.ranks.iter().enumerate() {
            for c in &plan.dup_fills {
                out[r * spr + c.dst_row] = read(r, c.src_row, c.expert, &received)?;
            }
        }
        Ok(out)
    }
}

/// First-fit edge colouring: pair `k` gets the first round in which neither of its ranks is
/// busy. Returns the round of every pair.
pub(crate) fn first_fit_rounds(pairs: &[(usize, usize)], num_ranks: usize) -> Vec<usize> {
    // busy[round] lists, per rank, whether it is used; grown on demand.
    let mut busy: Vec<Vec<bool>> = Vec::new();
    let mut out = Vec::with_capacity(pairs.len());
    for &(a, b) in pairs {
        let round = match busy.iter().position(|used| !used[a] && !used[b]) {
            Some(k) => k,
            None => {
                busy.push(vec![false; num_ranks]);
                busy.len() - 1
            }
        };
        busy[round][a] = true;
        busy[round][b] = true;
        out.push(round);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sends(p: &LayerPlan, r: usize) -> Vec<(usize, usize, usize)> {
        p.rank(r)
            .unwrap()
            .sends
            .iter()
            .map(|s| (s.dst, s.expert, s.src_row))
            .collect()
    }

    fn recvs(p: &LayerPlan, r: usize) -> Vec<(usize, usize, usize)> {
        p.rank(r)
            .unwrap()
            .recvs
            .iter()
            .map(|s| (s.src, s.expert, s.dst_row))
            .collect()
    }

    fn rounds(p: &LayerPlan) -> Vec<Vec<(usize, usize, Vec<usize>)>> {
        p.rounds()
            .iter()
            .map(|r| {
                r.flows
                    .iter()
                    .map(|f| (f.src, f.dst, f.experts.clone()))
                    .collect()
            })
            .collect()
    }

    // Study §10.2 vectors.

    #[test]
    fn rotate() {
        let p = LayerPlan::new(&[0, 1, 2, 3], &[1, 2, 3, 0], 4).unwrap();
        assert_eq!(sends(&p, 0), vec![(3, 0, 0)]);
        assert_eq!(recvs(&p, 0), vec![(1, 1, 0)]);
        assert_eq!(sends(&p, 1), vec![(0, 1, 0)]);
        assert_eq!(recvs(&p, 1), vec![(2, 2, 0)]);
        assert_eq!(sends(&p, 2), vec![(1, 2, 0)]);
        assert_eq!(recvs(&p, 2), vec![(3, 3, 0)]);
        assert_eq!(sends(&p, 3), vec![(2, 3, 0)]);
        assert_eq!(recvs(&p, 3), vec![(0, 0, 0)]);
        assert_eq!(p.simulate(&[0, 1, 2, 3]).unwrap(), vec![1, 2, 3, 0]);
        // Scheduler: [[0→3 e0, 2→1 e2], [1→0 e1, 3→2 e3]].
        assert_eq!(
            rounds(&p),
            vec![
                vec![(0, 3, vec![0]), (2, 1, vec![2])],
                vec![(1, 0, vec![1]), (3, 2, vec![3])]
            ]
        );
        // Rank 0 sends in round 0 and receives in round 1, as in vLLM's batched rotate.
        assert_eq!(p.rank(0).unwrap().sends[0].round, 0);
        assert_eq!(p.rank(0).unwrap().recvs[0].round, 1);
        assert_eq!(p.rank(1).unwrap().recvs[0].round, 0);
        assert_eq!(p.rank(1).unwrap().sends[0].round, 1);
        // r2: send→1, then recv←3; r3: recv←0, then send→2.
        assert_eq!(p.rank(2).unwrap().sends[0].round, 0);
        assert_eq!(p.rank(2).unwrap().recvs[0].round, 1);
        assert_eq!(p.rank(3).unwrap().recvs[0].round, 0);
        assert_eq!(p.rank(3).unwrap().sends[0].round, 1);
    }

    #[test]
    fn same_pair_transfers_coalesce() {
        // Rank 0 gets experts 2 and 3 from rank 1 and gives it 0 and 1: one pair, one round,
        // one flow per direction.
        let p = LayerPlan::new(&[0, 1, 2, 3], &[2, 3, 0, 1], 2).unwrap();
        assert_eq!(
            rounds(&p),
            vec![vec![(0, 1, vec![0, 1]), (1, 0, vec![2, 3])]]
        );
        assert_eq!(p.simulate(&[0, 1, 2, 3]).unwrap(), vec![2, 3, 0, 1]);
    }

    #[test]
    fn random_instructions_are_scheduled_without_conflict() {
        // 80 random (src, dst) pairs over 8 ranks: every pair in exactly one round, no rank
        // twice in a round.
        let mut x = 42u64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize % 8
        };
        let mut pairs = Vec::new();
        while pairs.len() < 80 {
            let (a, b) = (next(), next());
            if a != b {
                pairs.push((a.min(b), a.max(b)));
            }
        }
        let rounds = first_fit_rounds(&pairs, 8);
        assert_eq!(rounds.len(), pairs.len());
        let num = rounds.iter().max().unwrap() + 1;
        for k in 0..num {
            let mut used = [false; 8];
            for (&(a, b), _) in pairs.iter().zip(&rounds).filter(|(_, &r)| r == k) {
                assert!(!used[a] && !used[b], "round {k} reuses a rank");
                used[a] = true;
                used[b] = true;
            }
        }
    }

    #[test]
    fn rotate_over_five_ranks() {
        let p = LayerPlan::new(&[0, 1, 2, 3, 4], &[1, 2, 3, 4, 0], 5).unwrap();
        let pairs: Vec<Vec<(usize, usize)>> = rounds(&p)
            .into_iter()
            .map(|r| r.into_iter().map(|(s, d, _)| (s, d)).collect())
            .collect();
        assert_eq!(
            pairs,
            vec![vec![(0, 4), (2, 1)], vec![(1, 0), (3, 2)], vec![(4, 3)]]
        );
    }

    #[test]
    fn duplicate_primary() {
        // nloc 2, old [0,1,2,3], new [2,2,0,3].
        let p = LayerPlan::new(&[0, 1, 2, 3], &[2, 2, 0, 3], 2).unwrap();
        assert_eq!(sends(&p, 0), vec![(1, 0, 0)]);
        assert_eq!(recvs(&p, 0), vec![(1, 2, 0)]);
        let r0 = p.rank(0).unwrap();
        assert_eq!(
            r0.dup_fills,
            vec![LocalCopy {
                expert: 2,
                src_row: 0,
                dst_row: 1
            }]
        );
        assert!(r0.unchanged_rows.is_empty());
        assert_eq!(sends(&p, 1), vec![(0, 2, 0)]);
        assert_eq!(recvs(&p, 1), vec![(0, 0, 0)]);
        assert_eq!(p.rank(1).unwrap().unchanged_rows, vec![1]);
        assert_eq!(p.simulate(&[0, 1, 2, 3]).unwrap(), vec![2, 2, 0, 3]);
        // Both directions of the pair are in one round, the first-seen one (expert 0) first.
        assert_eq!(rounds(&p), vec![vec![(0, 1, vec![0]), (1, 0, vec![2])]]);
        assert_eq!(p.rank(0).unwrap().recvs[0].round, 0);
    }

    #[test]
    fn local_copy_is_never_sent() {
        // nloc 2, old [0,1,1,2], new [0,1,0,2]: only r0 → r1 moves (expert 0).
        let p = LayerPlan::new(&[0, 1, 1, 2], &[0, 1, 0, 2], 2).unwrap();
        assert_eq!(sends(&p, 0), vec![(1, 0, 0)]);
        assert_eq!(recvs(&p, 1), vec![(0, 0, 0)]);
        assert!(sends(&p, 1).is_empty() && recvs(&p, 0).is_empty());
        assert_eq!(p.rank(0).unwrap().unchanged_rows, vec![0, 1]);
        assert_eq!(p.num_transfers(), 1);
    }

    #[test]
    fn balanced_replicas() {
        // nloc 1, old [0,0,1,1,1], new [0,0,0,0,0]: r0 sends to 2 and 4, r1 to 3;
        // rounds [[0→2, 1→3], [0→4]].
        let p = LayerPlan::new(&[0, 0, 1, 1, 1], &[0, 0, 0, 0, 0], 5).unwrap();
        assert_eq!(sends(&p, 0), vec![(2, 0, 0), (4, 0, 0)]);
        assert_eq!(sends(&p, 1), vec![(3, 0, 0)]);
        assert_eq!(
            rounds(&p),
            vec![
                vec![(0, 2, vec![0]), (1, 3, vec![0])],
                vec![(0, 4, vec![0])]
            ]
        );
        assert_eq!(p.simulate(&[0, 0, 1, 1, 1]).unwrap(), vec![0; 5]);
    }

    #[test]
    fn permutation_inside_a_rank_stays_local() {
        let old = [0, 1, 2, 3, 4, 5];
        let new = [2, 0, 1, 5, 3, 4];
        let p = LayerPlan::new(&old, &new, 2).unwrap();
        assert!(p.rounds().is_empty());
        assert_eq!(p.num_transfers(), 0);
        assert_eq!(p.rank(0).unwrap().local_copies.len(), 3);
        assert_eq!(
            p.rank(0).unwrap().local_copies[0],
            LocalCopy {
                expert: 2,
                src_row: 2,
                dst_row: 0
            }
        );
        assert_eq!(p.simulate(&old).unwrap(), new.to_vec());
    }

    #[test]
    fn senders_are_balanced_across_experts() {
        // Ranks 0 and 1 both hold experts 0 and 1; ranks 2 and 3 need one each.
        // vLLM's per-expert split sends both from rank 0; counting over the layer uses both.
        let p = LayerPlan::new(&[0, 1, 0, 1, 2, 3, 2, 3], &[0, 1, 0, 1, 0, 3, 1, 3], 4).unwrap();
        assert_eq!(sends(&p, 0), vec![(2, 0, 0)]);
        assert_eq!(sends(&p, 1), vec![(3, 1, 1)]);
        assert_eq!(p.rounds().len(), 1);
    }

    #[test]
    fn study_send_recv_sets() {
        // Study §5.1: nloc 2, old [0,1,2,3,0,1,2,3], new [0,2,0,1,3,3,1,2].
        // recv {0:[1], 1:[1,3], 2:[0], 3:[2]} (ranks that need the expert from a peer).
        let old = [0, 1, 2, 3, 0, 1, 2, 3];
        let new = [0, 2, 0, 1, 3, 3, 1, 2];
        let p = LayerPlan::new(&old, &new, 4).unwrap();
        let mut got: Vec<(usize, usize)> = (0..4)
            .flat_map(|r| recvs(&p, r).into_iter().map(move |(_, e, _)| (e, r)))
            .collect();
        got.sort();
        assert_eq!(got, vec![(0, 1), (1, 1), (1, 3), (2, 0), (3, 2)]);
        // Rank 2 gets 3 twice: one receive and one duplicate fill.
        assert_eq!(p.rank(2).unwrap().dup_fills.len(), 1);
        assert_eq!(p.simulate(&old).unwrap(), new.to_vec());
    }

    #[test]
    fn vllm_scheduler_instructions() {
        // (1→3),(2→4),(0→1),(0→2),(0→3),(0→4) → [(1,3),(2,4)], [(0,1)], [(0,2)], [(0,3)], [(0,4)].
        let pairs = [(1, 3), (2, 4), (0, 1), (0, 2), (0, 3), (0, 4)];
        assert_eq!(first_fit_rounds(&pairs, 5), vec![0, 0, 1, 2, 3, 4]);
    }

    #[test]
    fn errors_are_typed() {
        assert_eq!(LayerPlan::new(&[0], &[0], 0), Err(PlanError::NoRanks));
        assert_eq!(
            LayerPlan::new(&[0, 1], &[0], 1),
            Err(PlanError::LengthMismatch { old: 2, new: 1 })
        );
        assert_eq!(
            LayerPlan::new(&[0, 1, 2], &[0, 1, 2], 2),
            Err(PlanError::NotDivisible { slots: 3, ranks: 2 })
        );
        assert_eq!(
            LayerPlan::new(&[0, 1], &[0, 7], 2),
            Err(PlanError::MissingSource {
                rank: 1,
                expert: 7,
                row: 0
            })
        );
        let p = LayerPlan::new(&[0, 1], &[1, 0], 2).unwrap();
        assert_eq!(
            p.rank(2),
            Err(PlanError::RankOutOfRange { rank: 2, ranks: 2 })
        );
        assert_eq!(
            p.simulate(&[0]),
            Err(PlanError::StateLength {
                expected: 2,
                found: 1
            })
        );
        // Replaying on a state that is not the old map is caught.
        assert_eq!(
            p.simulate(&[5, 1]),
            Err(PlanError::WrongContent {
                rank: 0,
                row: 0,
                expected: 0,
                found: 5
            })
        );
    }

    #[test]
    fn between_placements() {
        let old = crate::Placement::from_rows(4, 2, &[[0, 1, 2, 3]]).unwrap();
        let new = crate::Placement::from_rows(4, 2, &[[2, 1, 0, 3]]).unwrap();
        let p = LayerPlan::between(&old, &new, 0).unwrap();
        assert_eq!(p.simulate(&[0, 1, 2, 3]).unwrap(), vec![2, 1, 0, 3]);
        assert_eq!(
            LayerPlan::between(&old, &new, 1),
            Err(PlanError::LayerOutOfRange {
                layer: 1,
                layers: 1
            })
        );
        let other = crate::Placement::from_rows(4, 1, &[[2, 1, 0, 3]]).unwrap();
        assert_eq!(
            LayerPlan::between(&old, &other, 0),
            Err(PlanError::LayoutMismatch {
                field: "num_ranks",
                old: 2,
                new: 1
            })
        );
    }
}
