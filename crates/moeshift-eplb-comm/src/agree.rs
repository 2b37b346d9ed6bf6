//! Cross-rank agreement, before any byte moves: on the expert tensors of every layer (once,
//! when a communicator is built) and on each layer's plan (a 64-bit digest per transfer).
//!
//! Both exchanges are one `all_gather` on the EPLB group, so every rank sees every other
//! rank's answer and **every** rank reports a disagreement, with the same view of who
//! differs, instead of only the ranks that happen to talk to the odd one out. A rank whose
//! own checks failed still takes part and sends its reason, so its peers fail at once with
//! [`EplbCommError::PeerRefused`] rather than waiting for it until their deadline. After a
//! disagreement every rank leaves the exchange at the same point, so the group stays in step
//! and the communicator stays usable.

use moeshift_device_comm::HostGroup;
use moeshift_placement::LayerPlan;
use moeshift_sync::Deadline;
use sha2::{Digest as _, Sha256};

use crate::error::EplbCommError;
use crate::weights::LayerLayout;
use crate::wire::{Reader, Writer};

/// Domain tag of plan digests (bumped if the encoding changes).
const PLAN_TAG: &[u8] = b"moeshift-eplb-plan-v1";
/// Domain tag of layout descriptions.
const LAYOUT_TAG: &[u8] = b"moeshift-eplb-layout-v1";

/// A 64-bit digest of `layer` and everything `plan` tells every rank to do: ranks, rows,
/// every rank's copies, sends, receives, fills and unchanged rows, and the rounds. Equal
/// inputs give equal digests on every platform (SHA-256 of a fixed little-endian encoding,
/// truncated); ranks that built their plans from different maps, or for different layers,
/// get different digests.
///
/// ```
/// use moeshift_eplb_comm::plan_digest;
/// use moeshift_placement::LayerPlan;
///
/// let a = LayerPlan::new(&[0, 1, 2, 3], &[1, 0, 2, 3], 2)?;
/// let b = LayerPlan::new(&[0, 1, 2, 3], &[1, 0, 3, 2], 2)?;
/// assert_eq!(plan_digest(3, &a), plan_digest(3, &a.clone()));
/// assert_ne!(plan_digest(3, &a), plan_digest(3, &b));
/// assert_ne!(plan_digest(3, &a), plan_digest(4, &a));
/// # Ok::<(), moeshift_placement::PlanError>(())
/// ```
pub fn plan_digest(layer: usize, plan: &LayerPlan) -> u64 {
    let mut w = Writer::with_capacity(256);
    w.bytes(PLAN_TAG)
        .usize(layer)
        .usize(plan.num_ranks())
        .usize(plan.rows_per_rank());
    for rank in plan.ranks() {
        w.usize(rank.local_copies.len());
        for c in &rank.local_copies {
            w.usize(c.expert).usize(c.src_row).usize(c.dst_row);
        }
        w.usize(rank.sends.len());
        for s in &rank.sends {
            w.usize(s.dst)
                .usize(s.expert)
                .usize(s.src_row)
                .usize(s.round);
        }
        w.usize(rank.recvs.len());
        for r in &rank.recvs {
            w.usize(r.src)
                .usize(r.expert)
                .usize(r.dst_row)
                .usize(r.round);
        }
        w.usize(rank.dup_fills.len());
        for c in &rank.dup_fills {
            w.usize(c.expert).usize(c.src_row).usize(c.dst_row);
        }
        w.usize(rank.unchanged_rows.len());
        for &r in &rank.unchanged_rows {
            w.usize(r);
        }
    }
    w.usize(plan.rounds().len());
    for round in plan.rounds() {
        w.usize(round.flows.len());
        for f in &round.flows {
            w.usize(f.src).usize(f.dst).usize(f.experts.len());
            for &e in &f.experts {
                w.usize(e);
            }
        }
    }
    truncate(Sha256::digest(w.as_slice()).as_slice())
}

/// Domain tag of digests over several layers' plans.
const PLANS_TAG: &[u8] = b"moeshift-eplb-plans-v1";

/// A 64-bit digest of a list of `(layer, plan)`, in order: equal lists give equal digests,
/// and any difference in a layer, a plan, the order or the length changes it (up to
/// 64-bit collisions). A list of one is not the [`plan_digest`] of that layer.
pub fn plans_digest<'p>(plans: impl IntoIterator<Item = (usize, &'p LayerPlan)>) -> u64 {
    let mut w = Writer::with_capacity(64);
    w.bytes(PLANS_TAG);
    let mut count = 0usize;
    for (layer, plan) in plans {
        w.u64(plan_digest(layer, plan));
        count += 1;
    }
    w.usize(count);
    truncate(Sha256::digest(w.as_slice()).as_slice())
}

fn truncate(hash: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (dst, src) in b.iter_mut().zip(hash) {
        *dst = *src;
    }
    u64::from_le_bytes(b)
}

/// Every rank's layer layouts must be identical. One `all_gather` of each rank's
/// description; on disagreement every rank reports the lowest differing peer, the layer and
/// the tensor.
pub fn agree_on_layouts(
    group: &HostGroup,
    layouts: &[LayerLayout],
    deadline: Deadline,
) -> Result<(), EplbCommError> {
    let me = group.rank();
    let mut w = Writer::new();
    w.bytes(LAYOUT_TAG).usize(layouts.len());
    for l in layouts {
        l.encode(&mut w);
    }
    let gathered = group.all_gather(w.as_slice(), deadline).map_err(|e| {
        EplbCommError::from_comm(me, None, "the layout check (all_gather)".into(), e)
    })?;
    for (peer, bytes) in gathered.iter().enumerate() {
        if peer == me {
            continue;
        }
        let theirs = decode_layouts(bytes).ok_or_else(|| EplbCommError::LayoutMismatch {
            rank: me,
            peer,
            layer: None,
            tensor: None,
            detail: format!("its description ({} bytes) cannot be decoded", bytes.len()),
        })?;
        if theirs.len() != layouts.len() {
            return Err(EplbCommError::LayoutMismatch {
                rank: me,
                peer,
                layer: None,
                tensor: None,
                detail: format!("{} layers here, {} there", layouts.len(), theirs.len()),
            });
        }
        for (layer, (ours, theirs)) in layouts.iter().zip(&theirs).enumerate() {
            if let Some((tensor, detail)) = ours.first_difference(theirs) {
                return Err(EplbCommError::LayoutMismatch {
                    rank: me,
                    peer,
                    layer: Some(layer),
                    tensor,
                    detail,
                });
            }
        }
    }
    Ok(())
}

fn decode_layouts(bytes: &[u8]) -> Option<Vec<LayerLayout>> {
    let mut r = Reader::new(bytes);
    if r.bytes()? != LAYOUT_TAG {
        return None;
    }
    let n = r.usize()?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(LayerLayout::decode(&mut r)?);
    }
    r.is_empty().then_some(out)
}

/// Every rank must be about to run the same plan for the same layer. One `all_gather` of
/// `(status, digest)`: `refusal` is this rank's own reason not to take part (its checks
/// failed), sent so that peers stop at once. Returns `Ok` when every rank accepted and all
/// digests are equal. When this rank refused, the caller returns its own error after this
/// call; the exchange itself then returns `Ok` unless the transport failed.
pub fn agree_on_plan(
    group: &HostGroup,
    layer: usize,
    digest: u64,
    refusal: Option<&str>,
    deadline: Deadline,
) -> Result<(), EplbCommError> {
    let me = group.rank();
    let mut w = Writer::with_capacity(32);
    match refusal {
        None => w.u8(0).usize(layer).u64(digest).bytes(&[]),
        Some(reason) => w.u8(1).usize(layer).u64(digest).bytes(reason.as_bytes()),
    };
    let gathered = group.all_gather(w.as_slice(), deadline).map_err(|e| {
        EplbCommError::from_comm(me, Some(layer), "the plan check (all_gather)".into(), e)
    })?;
    if refusal.is_some() {
        return Ok(());
    }
    let mut differing = Vec::new();
    let mut theirs_first = None;
    for (peer, bytes) in gathered.iter().enumerate() {
        if peer == me {
            continue;
        }
        let mut r = Reader::new(bytes);
        let (status, _layer, theirs, reason) = match (r.u8(), r.usize(), r.u64(), r.bytes()) {
            (Some(s), Some(l), Some(d), Some(reason)) if r.is_empty() => (s, l, d, reason),
            _ => {
                return Err(EplbCommError::PeerRefused {
                    rank: me,
                    layer,
                    peer,
                    reason: format!(
                        "its plan check message ({} bytes) cannot be decoded",
                        bytes.len()
                    ),
                })
            }
        };
        if status != 0 {
            return Err(EplbCommError::PeerRefused {
                rank: me,
                layer,
                peer,
                reason: String::from_utf8_lossy(reason).into_owned(),
            });
        }
        if theirs != digest {
            theirs_first.get_or_insert(theirs);
            differing.push(peer);
        }
    }
    match theirs_first {
        None => Ok(()),
        Some(theirs) => Err(EplbCommError::PlanDigestMismatch {
            rank: me,
            layer,
            peers: differing,
            ours: digest,
            theirs,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_covers_layer_maps_and_ranks() {
        let old = [0, 1, 2, 3, 0, 1, 2, 3];
        let new = [0, 2, 0, 1, 3, 3, 1, 2];
        let p = LayerPlan::new(&old, &new, 4).unwrap();
        let d = plan_digest(0, &p);
        assert_eq!(d, plan_digest(0, &LayerPlan::new(&old, &new, 4).unwrap()));
        assert_ne!(d, plan_digest(1, &p));
        // Same maps over 2 ranks instead of 4.
        assert_ne!(d, plan_digest(0, &LayerPlan::new(&old, &new, 2).unwrap()));
        // One slot differs.
        let mut new2 = new;
        new2[7] = 3;
        assert_ne!(d, plan_digest(0, &LayerPlan::new(&old, &new2, 4).unwrap()));
        // A no-op plan still depends on the layer and the maps' size.
        let id = LayerPlan::new(&old, &old, 4).unwrap();
        assert_ne!(
            plan_digest(0, &id),
            plan_digest(0, &LayerPlan::new(&old[..4], &old[..4], 4).unwrap())
        );
    }

    #[test]
    fn plans_digest_covers_layers_plans_order_and_length() {
        let a = LayerPlan::new(&[0, 1, 2, 3], &[1, 0, 2, 3], 2).unwrap();
        let b = LayerPlan::new(&[0, 1, 2, 3], &[1, 0, 3, 2], 2).unwrap();
        let base = plans_digest([(0, &a), (1, &b)]);
        assert_eq!(base, plans_digest([(0, &a.clone()), (1, &b.clone())]));
        assert_ne!(base, plans_digest([(1, &b), (0, &a)]), "order");
        assert_ne!(base, plans_digest([(0, &a), (2, &b)]), "layer");
        assert_ne!(base, plans_digest([(0, &a), (1, &a)]), "plan");
        assert_ne!(base, plans_digest([(0, &a)]), "length");
        assert_ne!(plans_digest([(0, &a)]), plan_digest(0, &a));
        assert_ne!(plans_digest([]), plans_digest([(0, &a)]));
    }

    #[test]
    fn layout_lists_roundtrip() {
        use crate::weights::TensorSpec;
        use moeshift_tensor::DType;
        let l = LayerLayout {
            rows: 2,
            tensors: vec![TensorSpec {
                name: "w".into(),
                dtype: DType::I8,
                row_bytes: 3,
            }],
        };
        let mut w = Writer::new();
        w.bytes(LAYOUT_TAG).usize(2);
        l.encode(&mut w);
        l.encode(&mut w);
        let bytes = w.finish();
        assert_eq!(decode_layouts(&bytes), Some(vec![l.clone(), l]));
        assert_eq!(decode_layouts(&bytes[1..]), None);
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(decode_layouts(&extra), None);
    }
}
