//! What a layer's NCCL exchange looks like on one rank: the staging layout, the rows packed
//! before sending, and the send and receive operations in the order they are issued. Pure:
//! every rank derives its side from the same plan, and the two sides of every pair match
//! operation for operation.
//!
//! # The packing rule
//!
//! In every round of the plan, this rank exchanges rows with at most one peer. For each
//! direction of that exchange:
//!
//! * **several small rows** travel as **one** operation: the sender packs them
//!   (device-to-device copies, expert by expert in ascending order, each expert's tensors
//!   back to back) into one contiguous buffer; the receiver receives them straight into its
//!   staging, where the round's rows are laid out the same way, one after the other. Many
//!   small point-to-point operations cost a large share of the link (24–48 % measured with
//!   small rows), so such a round issues one operation per direction;
//! * **one row**, or rows whose every tensor row is at least [`PACK_BELOW`] bytes, travel as
//!   one operation **per row and tensor**, sent straight from the live weights (a tensor's
//!   row is contiguous there) into the staged row: nothing to pack, no pack buffer. Operations
//!   that large keep the link busy on their own, and packing them would cost a copy of every
//!   sent byte and as much memory.
//!
//! Both sides count the rows of the round from the plan and the row sizes from the agreed
//! layout, so they apply the same case.
//! Tensors with empty rows are skipped on both sides.

use moeshift_placement::{LayerPlan, RankPlan};

use crate::staging::{RowSource, StagingBuilder};
use crate::weights::LayerLayout;

/// Where the bytes of a send come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// Tensor `tensor` of row `row` of the live weights.
    Row {
        /// The row.
        row: usize,
        /// The tensor.
        tensor: usize,
    },
    /// The pack buffer, from `offset`.
    Pack {
        /// Byte offset in the pack buffer.
        offset: usize,
    },
}

/// One send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SendPiece {
    /// The receiving peer.
    pub(crate) peer: usize,
    /// The plan's round.
    pub(crate) round: usize,
    /// Where the bytes come from.
    pub(crate) source: Source,
    /// How many.
    pub(crate) bytes: usize,
}

/// One receive, straight into staging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecvPiece {
    /// The sending peer.
    pub(crate) peer: usize,
    /// The plan's round.
    pub(crate) round: usize,
    /// Byte offset in staging.
    pub(crate) offset: usize,
    /// How many bytes.
    pub(crate) bytes: usize,
}

/// One device-to-device copy of a tensor's row into the pack buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackCopy {
    /// The row (old content).
    pub(crate) row: usize,
    /// The tensor.
    pub(crate) tensor: usize,
    /// Byte offset in the pack buffer.
    pub(crate) offset: usize,
}

/// This rank's side of a layer's exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Exchange {
    /// Sends, in issue order (round, then expert, then tensor).
    pub(crate) sends: Vec<SendPiece>,
    /// Receives, in issue order (round, then expert, then tensor).
    pub(crate) recvs: Vec<RecvPiece>,
    /// Copies into the pack buffer, done before the sends.
    pub(crate) packs: Vec<PackCopy>,
    /// Bytes of pack buffer the layer needs.
    pub(crate) pack_bytes: usize,
    /// Rounds in which this rank meets a peer.
    pub(crate) rounds: usize,
    /// Distinct peers met.
    pub(crate) peers: usize,
}

/// Tensor rows at least this large are sent as operations of their own, never packed.
pub(crate) const PACK_BELOW: usize = 1 << 20;

/// Lays out this rank's staging for `plan` (per round, the rows received from its peer in
/// ascending expert order, one after the other; then the local copies) and its exchange.
pub(crate) fn lay_out(
    layout: &LayerLayout,
    me: usize,
    plan: &LayerPlan,
    mine: &RankPlan,
) -> (StagingBuilder, Exchange) {
    lay_out_packing_below(layout, me, plan, mine, PACK_BELOW)
}

/// [`lay_out`] with the packing threshold as a parameter (tests exercise both cases with
/// small rows).
fn lay_out_packing_below(
    layout: &LayerLayout,
    me: usize,
    plan: &LayerPlan,
    mine: &RankPlan,
    pack_below: usize,
) -> (StagingBuilder, Exchange) {
    let expert_bytes = layout.expert_bytes();
    let mut tensor_offsets = Vec::with_capacity(layout.tensors.len());
    let mut at = 0usize;
    for t in &layout.tensors {
        tensor_offsets.push(at);
        at = at.saturating_add(t.row_bytes);
    }
    let tensors: Vec<(usize, usize, usize)> = layout
        .tensors
        .iter()
        .zip(&tensor_offsets)
        .enumerate()
        .filter(|(_, (spec, _))| spec.row_bytes > 0)
        .map(|(t, (spec, &off))| (t, off, spec.row_bytes))
        .collect();
    let smallest = tensors
        .iter()
        .map(|&(_, _, bytes)| bytes)
        .min()
        .unwrap_or(0);
    let packed = |rows: usize| rows >= 2 && smallest < pack_below;

    let mut staging = StagingBuilder::new(layout);
    let mut ex = Exchange::default();
    let mut peers = Vec::new();
    for (round, r) in plan.rounds().iter().enumerate() {
        let Some(peer) = r.peer_of(me) else {
            continue;
        };
        ex.rounds += 1;
        if !peers.contains(&peer) {
            peers.push(peer);
        }

        let mut recvs: Vec<_> = mine
            .recvs
            .iter()
            .filter(|x| x.round == round && x.src == peer)
            .collect();
        recvs.sort_by_key(|x| x.expert);
        let first = staging.len();
        for x in &recvs {
            let row_at = staging.len();
            staging.push_row(x.dst_row, x.expert, RowSource::Peer { peer, round });
            if !packed(recvs.len()) {
                for &(_, off, bytes) in &tensors {
                    ex.recvs.push(RecvPiece {
                        peer,
                        round,
                        offset: row_at.saturating_add(off),
                        bytes,
                    });
                }
            }
        }
        let all = expert_bytes.saturating_mul(recvs.len());
        if packed(recvs.len()) && all > 0 {
            ex.recvs.push(RecvPiece {
                peer,
                round,
                offset: first,
                bytes: all,
            });
        }

        let mut sends: Vec<_> = mine
            .sends
            .iter()
            .filter(|x| x.round == round && x.dst == peer)
            .collect();
        sends.sort_by_key(|x| x.expert);
        if packed(sends.len()) {
            let start = ex.pack_bytes;
            for (i, s) in sends.iter().enumerate() {
                let row_at = start.saturating_add(expert_bytes.saturating_mul(i));
                for &(t, off, _) in &tensors {
                    ex.packs.push(PackCopy {
                        row: s.src_row,
                        tensor: t,
                        offset: row_at.saturating_add(off),
                    });
                }
            }
            let all = expert_bytes.saturating_mul(sends.len());
            ex.pack_bytes = start.saturating_add(all);
            if all > 0 {
                ex.sends.push(SendPiece {
                    peer,
                    round,
                    source: Source::Pack { offset: start },
                    bytes: all,
                });
            }
        } else {
            for s in &sends {
                for &(t, _, bytes) in &tensors {
                    ex.sends.push(SendPiece {
                        peer,
                        round,
                        source: Source::Row {
                            row: s.src_row,
                            tensor: t,
                        },
                        bytes,
                    });
                }
            }
        }
    }
    for c in &mine.local_copies {
        staging.push_row(c.dst_row, c.expert, RowSource::Local { src_row: c.src_row });
    }
    ex.peers = peers.len();
    (staging, ex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::TensorSpec;
    use moeshift_tensor::DType;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    fn layout(rows: usize, row_bytes: &[usize]) -> LayerLayout {
        LayerLayout {
            rows,
            tensors: row_bytes
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

    /// Byte `i` of tensor `t`'s row of expert `e`: any function of the three that differs
    /// between experts and tensors will do.
    fn byte(e: usize, t: usize, i: usize) -> u8 {
        (e.wrapping_mul(131) ^ t.wrapping_mul(31) ^ i.wrapping_mul(7)) as u8
    }

    fn random_map(rng: &mut StdRng, n: usize, slots: usize) -> Vec<usize> {
        let mut m: Vec<usize> = (0..n).collect();
        while m.len() < slots {
            m.push(rng.gen_range(0..n));
        }
        m.shuffle(rng);
        m
    }

    #[test]
    fn one_row_goes_per_tensor_and_several_rows_go_packed() {
        // Two ranks of 3 rows: experts 0 and 1 (rank 0's rows 0, 1) go to rank 1's rows 1, 2,
        // expert 5 (rank 1's row 2) goes to rank 0's row 2.
        let l = layout(3, &[8, 0, 4]);
        let old = [0, 1, 2, 3, 4, 5];
        let new = [0, 1, 5, 3, 0, 1];
        let plan = LayerPlan::new(&old, &new, 2).unwrap();
        let (b0, ex0) = lay_out(&l, 0, &plan, plan.rank(0).unwrap());
        let (b1, ex1) = lay_out(&l, 1, &plan, plan.rank(1).unwrap());
        // Rank 0 sends experts 0 and 1 packed (12 bytes each, the empty tensor skipped).
        assert_eq!(ex0.pack_bytes, 24);
        assert_eq!(ex0.packs.len(), 4);
        assert_eq!(
            ex0.sends,
            vec![SendPiece {
                peer: 1,
                round: 0,
                source: Source::Pack { offset: 0 },
                bytes: 24
            }]
        );
        // Rank 1 receives them in one piece; rank 0 receives the one row of expert 5 per
        // tensor (two tensors with bytes).
        assert_eq!(ex1.recvs.len(), 1);
        assert_eq!(ex1.recvs[0].bytes, 24);
        assert_eq!(
            ex0.recvs.iter().map(|r| r.bytes).collect::<Vec<_>>(),
            [8, 4]
        );
        assert_eq!(
            ex1.sends.iter().map(|s| s.source).collect::<Vec<_>>(),
            [
                Source::Row { row: 2, tensor: 0 },
                Source::Row { row: 2, tensor: 2 }
            ]
        );
        assert_eq!((ex0.rounds, ex0.peers), (1, 1));
        // Staging holds exactly the received rows: one on rank 0, two on rank 1.
        assert_eq!(b0.len(), 12);
        assert_eq!(b1.len(), 24);
        assert_eq!(ex1.recvs[0].offset, 0);
        assert_eq!(
            ex0.recvs.iter().map(|r| r.offset).collect::<Vec<_>>(),
            [0, 8]
        );
    }

    #[test]
    fn several_large_rows_go_per_row_and_tensor_without_packing() {
        // The same swap with tensor rows of PACK_BELOW and 2 * PACK_BELOW bytes: rank 0's two
        // rows go as four operations straight from the weights; nothing is packed.
        let l = layout(3, &[PACK_BELOW, 0, 2 * PACK_BELOW]);
        let old = [0, 1, 2, 3, 4, 5];
        let new = [0, 1, 5, 3, 0, 1];
        let plan = LayerPlan::new(&old, &new, 2).unwrap();
        let (_, ex0) = lay_out(&l, 0, &plan, plan.rank(0).unwrap());
        let (b1, ex1) = lay_out(&l, 1, &plan, plan.rank(1).unwrap());
        assert_eq!((ex0.pack_bytes, ex0.packs.len()), (0, 0));
        assert_eq!(
            ex0.sends.iter().map(|s| s.source).collect::<Vec<_>>(),
            [
                Source::Row { row: 0, tensor: 0 },
                Source::Row { row: 0, tensor: 2 },
                Source::Row { row: 1, tensor: 0 },
                Source::Row { row: 1, tensor: 2 }
            ]
        );
        // Rank 1 receives the four pieces into its two staged rows, in the same order.
        let row = 3 * PACK_BELOW;
        assert_eq!(
            ex1.recvs
                .iter()
                .map(|r| (r.offset, r.bytes))
                .collect::<Vec<_>>(),
            [
                (0, PACK_BELOW),
                (PACK_BELOW, 2 * PACK_BELOW),
                (row, PACK_BELOW),
                (row + PACK_BELOW, 2 * PACK_BELOW)
            ]
        );
        assert_eq!(b1.len(), 2 * row);
        // One small tensor row is enough to pack the round again.
        let small = layout(3, &[PACK_BELOW, PACK_BELOW - 1]);
        let (_, ex0) = lay_out(&small, 0, &plan, plan.rank(0).unwrap());
        assert_eq!(ex0.sends.len(), 1);
        assert_eq!(ex0.pack_bytes, 2 * (2 * PACK_BELOW - 1));
    }

    /// Simulates every rank's exchange on host memory: packs, then the k-th send of a rank
    /// to a peer lands in the peer's k-th receive from it (NCCL's matching rule), lengths
    /// must agree, and every staged row must then hold its expert's bytes.
    #[test]
    fn random_plans_match_pair_by_pair_and_stage_the_right_bytes() {
        let mut rng = StdRng::seed_from_u64(0xE8C4);
        let (mut packed_sends, mut row_sends, mut locals) = (0, 0, 0);
        for case in 0..300 {
            let ranks = rng.gen_range(1..=5);
            let rows = rng.gen_range(1..=4);
            let slots = ranks * rows;
            let n = rng.gen_range(1..=slots);
            let old = random_map(&mut rng, n, slots);
            let new = random_map(&mut rng, n, slots);
            let bytes: Vec<usize> = (0..rng.gen_range(1..=3))
                .map(|_| rng.gen_range(0..=9))
                .collect();
            let l = layout(rows, &bytes);
            let plan = LayerPlan::new(&old, &new, ranks).unwrap();
            // Half the cases pack every round of several rows, half never pack.
            let pack_below = if case % 2 == 0 { usize::MAX } else { 0 };
            let sides: Vec<_> = (0..ranks)
                .map(|r| lay_out_packing_below(&l, r, &plan, plan.rank(r).unwrap(), pack_below))
                .collect();
            // Each rank's weights and pack buffer, and its staging, as bytes.
            let weight = |r: usize, row: usize, t: usize| -> Vec<u8> {
                let e = old[r * rows + row];
                (0..bytes[t]).map(|i| byte(e, t, i)).collect()
            };
            let mut staging: Vec<Vec<u8>> =
                sides.iter().map(|(b, _)| vec![0xEE; b.len()]).collect();
            for (src, (_, ex)) in sides.iter().enumerate() {
                let mut pack = vec![0u8; ex.pack_bytes];
                for p in &ex.packs {
                    let w = weight(src, p.row, p.tensor);
                    pack[p.offset..p.offset + w.len()].copy_from_slice(&w);
                }
                for dst in 0..ranks {
                    let sends: Vec<_> = ex.sends.iter().filter(|s| s.peer == dst).collect();
                    let recvs: Vec<_> = sides[dst]
                        .1
                        .recvs
                        .iter()
                        .filter(|r| r.peer == src)
                        .collect();
                    assert_eq!(
                        sends.iter().map(|s| s.bytes).collect::<Vec<_>>(),
                        recvs.iter().map(|r| r.bytes).collect::<Vec<_>>(),
                        "case {case}: {src} → {dst}"
                    );
                    for (s, r) in sends.iter().zip(&recvs) {
                        assert_eq!(s.round, r.round, "case {case}");
                        let data = match s.source {
                            Source::Row { row, tensor } => {
                                row_sends += 1;
                                weight(src, row, tensor)
                            }
                            Source::Pack { offset } => {
                                packed_sends += 1;
                                pack[offset..offset + s.bytes].to_vec()
                            }
                        };
                        staging[dst][r.offset..r.offset + r.bytes].copy_from_slice(&data);
                    }
                }
            }
            // Local copies, then check every staged row against the new map.
            for (r, (b, _)) in sides.iter().enumerate() {
                let staged = b.rows_for_tests();
                let mut offsets = vec![0usize];
                for &x in &bytes {
                    offsets.push(offsets.last().unwrap() + x);
                }
                for row in staged {
                    for t in 0..bytes.len() {
                        let at = row.offset + offsets[t];
                        if let RowSource::Local { src_row } = row.source {
                            locals += 1;
                            let w = weight(r, src_row, t);
                            staging[r][at..at + w.len()].copy_from_slice(&w);
                        }
                        let e = new[r * rows + row.dst_row];
                        assert_eq!(row.expert, e, "case {case}");
                        let want: Vec<u8> = (0..bytes[t]).map(|i| byte(e, t, i)).collect();
                        assert_eq!(
                            &staging[r][at..at + bytes[t]],
                            &want[..],
                            "case {case}: rank {r}, row {}, tensor {t}",
                            row.dst_row
                        );
                    }
                }
            }
        }
        // The random plans exercised both cases of the packing rule and local copies.
        assert!(
            packed_sends > 50 && row_sends > 50 && locals > 50,
            "{packed_sends} {row_sends} {locals}"
        );
    }
}
