//! [`Workspace`]: sizing, validation and coordinated growth of the one-sided all-to-all
//! workspace.

use moeshift_sync::Deadline;

use crate::error::{CommError, RankRef};
use crate::host::{HostGroup, ReduceOp};
use crate::layout::ParallelLayout;

/// The parallel sizes that make up the EP group a workspace spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EpGroupShape {
    /// Data-parallel size.
    pub dp: usize,
    /// Prefill-context-parallel size.
    pub pcp: usize,
    /// Tensor-parallel size.
    pub tp: usize,
}

impl EpGroupShape {
    /// The EP group shape of a layout.
    pub fn from_layout(layout: &ParallelLayout) -> Self {
        let s = layout.sizes();
        Self {
            dp: s.dp,
            pcp: s.pcp,
            tp: s.tp,
        }
    }

    /// EP group size: DP·PCP·TP (saturating).
    pub fn ep_size(&self) -> usize {
        self.dp.saturating_mul(self.pcp).saturating_mul(self.tp)
    }
}

/// What the workspace must hold; every field only grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WorkspaceCapacity {
    /// Most tokens one rank dispatches in one call.
    pub max_tokens_per_rank: usize,
    /// Hidden size of the dispatched rows.
    pub hidden_size: usize,
    /// Extra bytes carried per token (scales of quantized activations, for instance).
    pub extra_bytes_per_token: usize,
}

impl WorkspaceCapacity {
    /// The element-wise maximum of two capacities.
    pub fn max(&self, other: &Self) -> Self {
        Self {
            max_tokens_per_rank: self.max_tokens_per_rank.max(other.max_tokens_per_rank),
            hidden_size: self.hidden_size.max(other.hidden_size),
            extra_bytes_per_token: self.extra_bytes_per_token.max(other.extra_bytes_per_token),
        }
    }

    /// True when every field of `self` is at least that of `other`.
    pub fn covers(&self, other: &Self) -> bool {
        self.max(other) == *self
    }
}

/// Parameters fixed for the workspace's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkspaceConfig {
    /// Experts per token.
    pub top_k: usize,
    /// Number of (physical) experts the manager routes to.
    pub num_experts: usize,
    /// Bytes per hidden value on the wire (2 for bf16).
    pub elem_bytes: usize,
}

/// An agreed change of capacity: every rank of the EP group gets the same plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResizePlan {
    /// The capacity before.
    pub from: WorkspaceCapacity,
    /// The capacity after (covers `from`).
    pub to: WorkspaceCapacity,
    /// Bytes of each rank's region after the resize.
    pub bytes_per_slot: usize,
}

/// Why a workspace could not be built, resized or agreed on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkspaceError {
    /// Dim 0 is not the EP group size.
    #[error(
        "one-sided all-to-all workspace has {slots} slots in dim 0, but it must be {ep_size}, \
         the EP group size (DP {} × PCP {} × TP {}){}",
        .shape.dp, .shape.pcp, .shape.tp, dp_hint(.slots, .shape)
    )]
    NotEpSized {
        /// Slots given.
        slots: usize,
        /// The EP group size they must equal.
        ep_size: usize,
        /// The EP group's shape.
        shape: EpGroupShape,
    },
    /// A size that must be positive is zero.
    #[error("one-sided all-to-all workspace: {field} is 0")]
    Zero {
        /// The field.
        field: &'static str,
    },
    /// A parameter fixed at creation changed.
    #[error(
        "one-sided all-to-all workspace: {field} is fixed at {was} once the workspace exists, \
         but {now} was asked for"
    )]
    FixedParameter {
        /// The parameter.
        field: &'static str,
        /// Its value at creation.
        was: usize,
        /// The value asked for.
        now: usize,
    },
    /// The byte size does not fit.
    #[error("one-sided all-to-all workspace: {detail}")]
    Overflow {
        /// What overflowed.
        detail: String,
    },
    /// The group used to agree on a resize is not the EP group.
    #[error(
        "{rank}: a workspace resize must be agreed on the EP group of {ep_size} ranks, but \
         group {group:?} has {group_size}"
    )]
    WrongGroup {
        /// The rank reporting.
        rank: RankRef,
        /// The group passed.
        group: String,
        /// Its size.
        group_size: usize,
        /// The EP size.
        ep_size: usize,
    },
    /// Another rank asked for an invalid resize, so no rank resizes.
    #[error(
        "{rank}: workspace resize refused everywhere: group rank {peer} asked for an invalid one"
    )]
    PeerRejected {
        /// The rank reporting.
        rank: RankRef,
        /// The (highest) group rank whose request was invalid.
        peer: usize,
    },
    /// The ranks hold workspaces with different fixed parameters.
    #[error("{rank}: the EP ranks disagree on the workspace's {field}: from {min} to {max}")]
    Disagree {
        /// The rank reporting.
        rank: RankRef,
        /// The parameter.
        field: &'static str,
        /// Smallest value among the ranks.
        min: usize,
        /// Largest value among the ranks.
        max: usize,
    },
    /// A plan that does not start from this workspace's capacity.
    #[error("one-sided all-to-all workspace: stale resize plan: {detail}")]
    StalePlan {
        /// What does not match.
        detail: String,
    },
    /// The host transport failed while agreeing.
    #[error("workspace resize: {0}")]
    Comm(#[source] Box<CommError>),
}

fn dp_hint(slots: &usize, shape: &EpGroupShape) -> String {
    if *slots == shape.dp && shape.dp != shape.ep_size() {
        format!(
            "; {slots} is the DP group size: the workspace must span the EP group, not the DP \
             group"
        )
    } else {
        String::new()
    }
}

/// The sizing of the one-sided workspace: one region per EP rank (dim 0 = EP size), each
/// able to receive `max_tokens_per_rank` tokens from every EP rank.
///
/// The one-sided single-node manager (the role of FlashInfer's NVLink one-sided
/// `MoeAlltoAll`; here `CudaOneSidedManager`, feature `cuda`) lets every rank write its
/// tokens straight into its peers' memory through CUDA IPC mappings of one workspace with a
/// region per EP rank. This type is the part every implementation must get right, and the
/// CUDA manager sizes its regions from it and resizes through it:
///
/// - dim 0 of the workspace is the **EP group size** (DP·PCP·TP), never the DP group size.
///   With TP = 2 and DP = 4 a workspace of 4 regions, sized to the DP group, leaves half the
///   EP ranks without a region; vLLM shipped that bug (its kernel asserts
///   `workspace.size(0) == moe_ep_size`), and here it is a typed error at construction;
/// - capacity only grows, and a resize is agreed on by every rank of the EP group
///   ([`agree_resize`](Self::agree_resize)): each rank proposes what it needs, an
///   all-reduce takes the maximum, and every rank gets the same [`ResizePlan`] (a rebuild
///   needs every rank to tear down and re-map together);
/// - top-k, the expert count and the element size are fixed once the workspace exists.
///
/// ```
/// use moeshift_device_comm::all2all::{EpGroupShape, Workspace, WorkspaceCapacity, WorkspaceConfig};
///
/// let shape = EpGroupShape { dp: 4, pcp: 1, tp: 2 };
/// let config = WorkspaceConfig { top_k: 8, num_experts: 256, elem_bytes: 2 };
/// let cap = WorkspaceCapacity { max_tokens_per_rank: 128, hidden_size: 7168, extra_bytes_per_token: 0 };
/// // Sized to the DP group (4): rejected, the EP group has 8 ranks.
/// let err = Workspace::new(4, shape, config, cap).unwrap_err();
/// assert!(err.to_string().contains("must be 8"));
/// let ws = Workspace::new(8, shape, config, cap)?;
/// assert_eq!(ws.bytes_per_slot(), 8 * 128 * (7168 * 2 + 8 * 8));
/// # Ok::<(), moeshift_device_comm::all2all::WorkspaceError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    slots: usize,
    shape: EpGroupShape,
    config: WorkspaceConfig,
    capacity: WorkspaceCapacity,
    bytes_per_slot: usize,
}

impl Workspace {
    /// A workspace of `slots` regions (dim 0) for the EP group `shape`. `slots` must equal
    /// the EP size DP·PCP·TP; top-k, the expert count and the element size must be
    /// positive.
    pub fn new(
        slots: usize,
        shape: EpGroupShape,
        config: WorkspaceConfig,
        capacity: WorkspaceCapacity,
    ) -> Result<Self, WorkspaceError> {
        for (field, v) in [
            ("DP size", shape.dp),
            ("PCP size", shape.pcp),
            ("TP size", shape.tp),
            ("top-k", config.top_k),
            ("expert count", config.num_experts),
            ("element size", config.elem_bytes),
        ] {
            if v == 0 {
                return Err(WorkspaceError::Zero { field });
            }
        }
        let ep_size = shape.ep_size();
        if slots != ep_size {
            return Err(WorkspaceError::NotEpSized {
                slots,
                ep_size,
                shape,
            });
        }
        let bytes_per_slot = bytes_per_slot(ep_size, &config, &capacity)?;
        Ok(Self {
            slots,
            shape,
            config,
            capacity,
            bytes_per_slot,
        })
    }

    /// Regions in dim 0: the EP group size.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The EP group's shape.
    pub fn shape(&self) -> EpGroupShape {
        self.shape
    }

    /// The fixed parameters.
    pub fn config(&self) -> WorkspaceConfig {
        self.config
    }

    /// The current capacity.
    pub fn capacity(&self) -> WorkspaceCapacity {
        self.capacity
    }

    /// Bytes of one rank's region: `ep_size × max_tokens_per_rank × (hidden_size ×
    /// elem_bytes + top_k × 8 + extra_bytes_per_token)` (8 bytes per pick: a 32-bit expert
    /// id and a 32-bit weight).
    pub fn bytes_per_slot(&self) -> usize {
        self.bytes_per_slot
    }

    /// Bytes of the whole workspace (`slots × bytes_per_slot`, saturating).
    pub fn total_bytes(&self) -> usize {
        self.slots.saturating_mul(self.bytes_per_slot)
    }

    /// This rank's view of a resize: `None` when the workspace already covers `wanted`,
    /// otherwise a plan to the element-wise maximum. Fails if `config` differs from the
    /// workspace's.
    pub fn plan(
        &self,
        config: &WorkspaceConfig,
        wanted: &WorkspaceCapacity,
    ) -> Result<Option<ResizePlan>, WorkspaceError> {
        self.check_config(config)?;
        self.plan_to(self.capacity.max(wanted))
    }

    fn plan_to(&self, to: WorkspaceCapacity) -> Result<Option<ResizePlan>, WorkspaceError> {
        if to == self.capacity {
            return Ok(None);
        }
        Ok(Some(ResizePlan {
            from: self.capacity,
            to,
            bytes_per_slot: bytes_per_slot(self.slots, &self.config, &to)?,
        }))
    }

    fn check_config(&self, config: &WorkspaceConfig) -> Result<(), WorkspaceError> {
        for (field, was, now) in [
            ("top-k", self.config.top_k, config.top_k),
            ("expert count", self.config.num_experts, config.num_experts),
            ("element size", self.config.elem_bytes, config.elem_bytes),
        ] {
            if was != now {
                return Err(WorkspaceError::FixedParameter { field, was, now });
            }
        }
        Ok(())
    }

    /// Agrees on a resize with every rank of the EP group `group`: each rank passes the
    /// capacity it needs now, and every rank gets the same answer: `None` when the current
    /// workspace covers every rank's need, else the plan to the element-wise maximum over
    /// the ranks. Every rank of `group` calls it; a rank with an invalid request (another
    /// `config`, or a number too large to exchange) makes every rank fail.
    pub fn agree_resize(
        &self,
        group: &HostGroup,
        config: &WorkspaceConfig,
        wanted: &WorkspaceCapacity,
        deadline: Deadline,
    ) -> Result<Option<ResizePlan>, WorkspaceError> {
        let me = RankRef {
            local: group.rank(),
            global: group.global_rank(group.rank()).unwrap_or(usize::MAX),
        };
        if group.size() != self.slots {
            return Err(WorkspaceError::WrongGroup {
                rank: me,
                group: group.name().to_string(),
                group_size: group.size(),
                ep_size: self.slots,
            });
        }
        let need = self.capacity.max(wanted);
        let fields = [
            self.config.top_k,
            self.config.num_experts,
            self.config.elem_bytes,
            need.max_tokens_per_rank,
            need.hidden_size,
            need.extra_bytes_per_token,
        ];
        let local = self.check_config(config).and_then(|()| {
            fields
                .iter()
                .map(|&v| i64::try_from(v))
                .collect::<Result<Vec<i64>, _>>()
                .map_err(|_| WorkspaceError::Overflow {
                    detail: format!("{need:?} is too large to exchange"),
                })
        });
        // [rejected-by (group rank + 1), config fields, -config fields, capacity fields],
        // all reduced with max: the maximum capacity, and a config mismatch shows as
        // max != -max(-x) = min.
        let mut v = vec![0i64; 10];
        match &local {
            Ok(vals) => {
                for (i, &x) in vals.iter().take(3).enumerate() {
                    v[1 + i] = x;
                    v[4 + i] = -x;
                }
                for (i, &x) in vals.iter().skip(3).enumerate() {
                    v[7 + i] = x;
                }
            }
            Err(_) => v[0] = group.rank() as i64 + 1,
        }
        group
            .all_reduce(&mut v, ReduceOp::Max, deadline)
            .map_err(|e| WorkspaceError::Comm(Box::new(e)))?;
        local?;
        if v[0] > 0 {
            return Err(WorkspaceError::PeerRejected {
                rank: me,
                peer: (v[0] - 1) as usize,
            });
        }
        let as_usize = |x: i64| usize::try_from(x).unwrap_or(0);
        for (i, field) in ["top-k", "expert count", "element size"]
            .into_iter()
            .enumerate()
        {
            let (max, min) = (v[1 + i], -v[4 + i]);
            if max != min {
                return Err(WorkspaceError::Disagree {
                    rank: me,
                    field,
                    min: as_usize(min),
                    max: as_usize(max),
                });
            }
        }
        self.plan_to(WorkspaceCapacity {
            max_tokens_per_rank: as_usize(v[7]),
            hidden_size: as_usize(v[8]),
            extra_bytes_per_token: as_usize(v[9]),
        })
    }

    /// Applies an agreed plan. The plan must start from this workspace's capacity.
    pub fn apply(&mut self, plan: &ResizePlan) -> Result<(), WorkspaceError> {
        if plan.from != self.capacity {
            return Err(WorkspaceError::StalePlan {
                detail: format!(
                    "it starts from {:?}, the workspace has {:?}",
                    plan.from, self.capacity
                ),
            });
        }
        if !plan.to.covers(&plan.from) {
            return Err(WorkspaceError::StalePlan {
                detail: format!("it shrinks {:?} to {:?}", plan.from, plan.to),
            });
        }
        self.bytes_per_slot = bytes_per_slot(self.slots, &self.config, &plan.to)?;
        self.capacity = plan.to;
        Ok(())
    }
}

fn bytes_per_slot(
    ep_size: usize,
    config: &WorkspaceConfig,
    cap: &WorkspaceCapacity,
) -> Result<usize, WorkspaceError> {
    cap.hidden_size
        .checked_mul(config.elem_bytes)
        .and_then(|b| b.checked_add(config.top_k.checked_mul(8)?))
        .and_then(|b| b.checked_add(cap.extra_bytes_per_token))
        .and_then(|b| b.checked_mul(cap.max_tokens_per_rank))
        .and_then(|b| b.checked_mul(ep_size))
        .ok_or_else(|| WorkspaceError::Overflow {
            detail: format!(
                "{ep_size} ranks × {cap:?} with {config:?} does not fit in {} bits",
                usize::BITS
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ParallelSizes;

    const CONFIG: WorkspaceConfig = WorkspaceConfig {
        top_k: 8,
        num_experts: 256,
        elem_bytes: 2,
    };

    fn cap(tokens: usize, hidden: usize, extra: usize) -> WorkspaceCapacity {
        WorkspaceCapacity {
            max_tokens_per_rank: tokens,
            hidden_size: hidden,
            extra_bytes_per_token: extra,
        }
    }

    #[test]
    fn workspace_sized_to_the_dp_group_is_rejected() {
        // TP = 2, DP = 4 (the seed case): the EP group has 8 ranks.
        let layout = ParallelLayout::new(
            8,
            ParallelSizes {
                tp: 2,
                dp: 4,
                ..ParallelSizes::default()
            },
        )
        .expect("layout");
        let shape = EpGroupShape::from_layout(&layout);
        assert_eq!(shape.ep_size(), 8);
        let err = Workspace::new(4, shape, CONFIG, cap(16, 64, 0)).expect_err("DP-sized");
        match &err {
            WorkspaceError::NotEpSized {
                slots: 4,
                ep_size: 8,
                ..
            } => {}
            other => panic!("expected NotEpSized, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("must be 8"), "{text}");
        assert!(text.contains("DP 4 × PCP 1 × TP 2"), "{text}");
        assert!(text.contains("4 is the DP group size"), "{text}");
        let ws = Workspace::new(8, shape, CONFIG, cap(16, 64, 0)).expect("EP-sized");
        assert_eq!(ws.slots(), 8);
    }

    #[test]
    fn other_wrong_sizes_name_the_ep_size_without_the_dp_hint() {
        let shape = EpGroupShape {
            dp: 2,
            pcp: 2,
            tp: 2,
        };
        let text = Workspace::new(6, shape, CONFIG, cap(1, 1, 0))
            .expect_err("6 slots")
            .to_string();
        assert!(
            text.contains("must be 8") && !text.contains("DP group size"),
            "{text}"
        );
        let zero = WorkspaceConfig { top_k: 0, ..CONFIG };
        assert!(matches!(
            Workspace::new(8, shape, zero, cap(1, 1, 0)),
            Err(WorkspaceError::Zero { field: "top-k" })
        ));
    }

    #[test]
    fn bytes_follow_the_documented_formula() {
        let shape = EpGroupShape {
            dp: 2,
            pcp: 1,
            tp: 1,
        };
        let ws = Workspace::new(2, shape, CONFIG, cap(10, 16, 4)).expect("ws");
        // 2 ranks × 10 tokens × (16 × 2 + 8 × 8 + 4) bytes.
        assert_eq!(ws.bytes_per_slot(), 2 * 10 * 100);
        assert_eq!(ws.total_bytes(), 2 * 2000);
        let huge = cap(usize::MAX / 2, 4, 0);
        assert!(matches!(
            Workspace::new(2, shape, CONFIG, huge),
            Err(WorkspaceError::Overflow { .. })
        ));
    }

    #[test]
    fn capacity_only_grows() {
        let shape = EpGroupShape {
            dp: 2,
            pcp: 1,
            tp: 1,
        };
        let mut ws = Workspace::new(2, shape, CONFIG, cap(100, 64, 0)).expect("ws");
        assert_eq!(ws.plan(&CONFIG, &cap(50, 32, 0)).expect("plan"), None);
        let plan = ws
            .plan(&CONFIG, &cap(50, 128, 8))
            .expect("plan")
            .expect("grows");
        assert_eq!(plan.to, cap(100, 128, 8));
        ws.apply(&plan).expect("apply");
        assert_eq!(ws.capacity(), cap(100, 128, 8));
        assert_eq!(ws.bytes_per_slot(), plan.bytes_per_slot);
        // The same plan again starts from the old capacity: stale.
        assert!(matches!(
            ws.apply(&plan),
            Err(WorkspaceError::StalePlan { .. })
        ));
        let shrink = ResizePlan {
            from: ws.capacity(),
            to: cap(1, 1, 0),
            bytes_per_slot: 0,
        };
        assert!(matches!(
            ws.apply(&shrink),
            Err(WorkspaceError::StalePlan { .. })
        ));
        let other = WorkspaceConfig { top_k: 4, ..CONFIG };
        assert!(matches!(
            ws.plan(&other, &cap(1, 1, 0)),
            Err(WorkspaceError::FixedParameter {
                field: "top-k",
                was: 8,
                now: 4
            })
        ));
    }
}
