//! Topology, policy selection and the errors policies return.

use crate::deepseek::deepseek;
use crate::load::LoadMatrix;
use crate::migration::{migration, MigrationOptions};
use crate::placement::{Layout, MapError, Placement};

/// Why a policy could not produce a placement.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A topology field is 0.
    #[error("topology field {field} must be at least 1")]
    Zero {
        /// `replicas`, `groups`, `nodes` or `gpus`.
        field: &'static str,
    },
    /// A divisibility constraint of the policy is violated.
    #[error("{dividend} = {dividend_value} is not divisible by {divisor} = {divisor_value}")]
    NotDivisible {
        /// Name of the dividend.
        dividend: &'static str,
        /// Its value.
        dividend_value: usize,
        /// Name of the divisor.
        divisor: &'static str,
        /// Its value.
        divisor_value: usize,
    },
    /// Fewer physical slots than logical experts.
    #[error("replicas = {replicas} is smaller than the number of logical experts ({experts})")]
    TooFewReplicas {
        /// Physical slots asked for.
        replicas: usize,
        /// Logical experts in the load.
        experts: usize,
    },
    /// The old placement does not have the shape the new plan needs (vLLM does not check this).
    #[error("old placement does not fit: its {field} is {found}, the new plan needs {expected}")]
    OldMismatch {
        /// `num_layers`, `num_logical`, `num_physical` (the width) or `num_ranks`.
        field: &'static str,
        /// Value the new plan needs.
        expected: usize,
        /// Value of the old placement.
        found: usize,
    },
    /// The policy needs an old placement and none was given.
    #[error("policy {policy} needs the old placement")]
    MissingOld {
        /// Name of the policy.
        policy: &'static str,
    },
    /// A policy option is out of its range.
    #[error("invalid option {field} = {value}: {reason}")]
    InvalidOption {
        /// The option.
        field: &'static str,
        /// Its value.
        value: f64,
        /// What it must satisfy.
        reason: &'static str,
    },
    /// A computed map failed validation (an internal invariant broke).
    #[error(transparent)]
    Map(#[from] MapError),
}

/// The cluster a placement is planned for, with DeepSeek's parameter names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Topology {
    /// Physical slots per layer, `P` (logical experts plus redundant ones).
    pub replicas: usize,
    /// Expert groups of the model (group-limited routing); `N` must be divisible by it in
    /// hierarchical mode.
    pub groups: usize,
    /// Nodes; ranks are split evenly into `nodes` contiguous blocks.
    pub nodes: usize,
    /// Ranks (GPUs) of the expert-parallel group, `R`.
    pub gpus: usize,
}

impl Topology {
    /// A topology of `replicas` slots, `groups` expert groups, `nodes` nodes and `gpus` ranks.
    pub fn new(replicas: usize, groups: usize, nodes: usize, gpus: usize) -> Self {
        Self {
            replicas,
            groups,
            nodes,
            gpus,
        }
    }

    /// Whether the DeepSeek policy runs hierarchically (`groups % nodes == 0`); otherwise it
    /// runs globally, as with one group on one node.
    pub fn is_hierarchical(&self) -> bool {
        self.nodes != 0 && self.groups % self.nodes == 0
    }

    fn check_nonzero(&self) -> Result<(), PolicyError> {
        for (field, v) in [
            ("replicas", self.replicas),
            ("groups", self.groups),
            ("nodes", self.nodes),
            ("gpus", self.gpus),
        ] {
            if v == 0 {
                return Err(PolicyError::Zero { field });
            }
        }
        Ok(())
    }

    /// Checks the DeepSeek policy's constraints for `experts` logical experts and returns the
    /// effective dimensions (groups and nodes are 1 in global mode).
    pub(crate) fn deepseek_dims(&self, experts: usize) -> Result<Dims, PolicyError> {
        self.check_nonzero()?;
        let (groups, nodes) = if self.is_hierarchical() {
            (self.groups, self.nodes)
        } else {
            (1, 1)
        };
        divisible("logical experts", experts, "groups", groups)?;
        divisible("gpus", self.gpus, "nodes", nodes)?;
        divisible("replicas", self.replicas, "gpus", self.gpus)?;
        if self.replicas < experts {
            return Err(PolicyError::TooFewReplicas {
                replicas: self.replicas,
                experts,
            });
        }
        Ok(Dims {
            experts,
            replicas: self.replicas,
            groups,
            nodes,
            gpus: self.gpus,
        })
    }

    /// Checks the constraints shared by every policy (slots split evenly over ranks, ranks over
    /// nodes, one slot per expert at least).
    pub(crate) fn check_common(&self, experts: usize) -> Result<(), PolicyError> {
        self.check_nonzero()?;
        divisible("gpus", self.gpus, "nodes", self.nodes)?;
        divisible("replicas", self.replicas, "gpus", self.gpus)?;
        if self.replicas < experts {
            return Err(PolicyError::TooFewReplicas {
                replicas: self.replicas,
                experts,
            });
        }
        Ok(())
    }

    /// The layout of a placement of `load` on this topology.
    pub(crate) fn layout_for(&self, load: &LoadMatrix) -> Result<Layout, PolicyError> {
        Ok(Layout::new(
            load.num_layers(),
            load.num_experts(),
            self.replicas,
            self.gpus,
        )?)
    }
}

/// Effective dimensions of a DeepSeek run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub experts: usize,
    pub replicas: usize,
    pub groups: usize,
    pub nodes: usize,
    pub gpus: usize,
}

fn divisible(
    dividend: &'static str,
    dividend_value: usize,
    divisor: &'static str,
    divisor_value: usize,
) -> Result<(), PolicyError> {
    if divisor_value == 0 || dividend_value % divisor_value != 0 {
        return Err(PolicyError::NotDivisible {
            dividend,
            dividend_value,
            divisor,
            divisor_value,
        });
    }
    Ok(())
}

/// Checks that `old` has the layout a plan of `load` on `topo` produces.
pub(crate) fn check_old(
    old: &Placement,
    load: &LoadMatrix,
    topo: &Topology,
) -> Result<(), PolicyError> {
    for (field, expected, found) in [
        ("num_layers", load.num_layers(), old.num_layers()),
        ("num_logical", load.num_experts(), old.num_logical()),
        ("num_physical", topo.replicas, old.num_physical()),
        ("num_ranks", topo.gpus, old.num_ranks()),
    ] {
        if expected != found {
            return Err(PolicyError::OldMismatch {
                field,
                expected,
                found,
            });
        }
    }
    Ok(())
}

/// A placement policy.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    /// DeepSeek's EPLB (hierarchical or global), see [`deepseek`].
    DeepSeek,
    /// The migration-aware policy, see [`migration`].
    Migration(MigrationOptions),
}

impl Policy {
    /// The policy's name (`deepseek` or `migration`).
    pub fn name(&self) -> &'static str {
        match self {
            Policy::DeepSeek => "deepseek",
            Policy::Migration(_) => "migration",
        }
    }
}

/// A policy's result: the new placement and how many replicas moved in each layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebalanced {
    /// The new placement.
    pub placement: Placement,
    /// Per layer, the replicas whose rank did not hold that expert in the old placement
    /// (all 0 when there was none).
    pub moved: Vec<usize>,
}

/// Runs `policy` on `load` for `topo`, starting from `old` when given.
///
/// # Errors
/// [`PolicyError`] for an invalid topology, an old placement of the wrong shape, or
/// [`Policy::Migration`] without an old placement.
pub fn rebalance(
    policy: &Policy,
    load: &LoadMatrix,
    topo: &Topology,
    old: Option<&Placement>,
) -> Result<Rebalanced, PolicyError> {
    match policy {
        Policy::DeepSeek => {
            let placement = deepseek(load, topo, old)?;
            let moved = match old {
                Some(old) => placement.moved_from(old)?,
                None => vec![0; load.num_layers()],
            };
            Ok(Rebalanced { placement, moved })
        }
        Policy::Migration(options) => {
            let old = old.ok_or(PolicyError::MissingOld {
                policy: "migration",
            })?;
            let report = migration(load, topo, old, options)?;
            Ok(Rebalanced {
                placement: report.placement,
                moved: report.moved,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_checks() {
        let t = Topology::new(8, 3, 2, 4);
        assert!(!t.is_hierarchical());
        let d = t.deepseek_dims(4).unwrap();
        assert_eq!((d.groups, d.nodes), (1, 1));
        assert_eq!(
            Topology::new(7, 2, 2, 4).deepseek_dims(4).unwrap_err(),
            PolicyError::NotDivisible {
                dividend: "replicas",
                dividend_value: 7,
                divisor: "gpus",
                divisor_value: 4
            }
        );
        assert_eq!(
            Topology::new(8, 0, 2, 4).deepseek_dims(4).unwrap_err(),
            PolicyError::Zero { field: "groups" }
        );
        assert!(matches!(
            Topology::new(8, 2, 2, 4).deepseek_dims(5),
            Err(PolicyError::NotDivisible {
                dividend: "logical experts",
                ..
            })
        ));
        assert!(matches!(
            Topology::new(6, 2, 2, 3).deepseek_dims(4),
            Err(PolicyError::NotDivisible {
                dividend: "gpus",
                divisor: "nodes",
                ..
            })
        ));
        assert_eq!(
            Topology::new(4, 1, 1, 2).deepseek_dims(6).unwrap_err(),
            PolicyError::TooFewReplicas {
                replicas: 4,
                experts: 6
            }
        );
        let msg = Topology::new(7, 2, 2, 4)
            .deepseek_dims(4)
            .unwrap_err()
            .to_string();
        assert_eq!(msg, "replicas = 7 is not divisible by gpus = 4");
    }

    #[test]
    fn migration_needs_an_old_placement() {
        let load = LoadMatrix::from_rows(&[[1.0f32, 2.0]]).unwrap();
        let err = rebalance(
            &Policy::Migration(MigrationOptions::default()),
            &load,
            &Topology::new(2, 1, 1, 1),
            None,
        )
        .unwrap_err();
        assert_eq!(
            err,
            PolicyError::MissingOld {
                policy: "migration"
            }
        );
    }

    #[test]
    fn deepseek_reports_zero_moves_without_old() {
        let load = LoadMatrix::from_rows(&[[1.0f32, 2.0], [3.0, 4.0]]).unwrap();
        let r = rebalance(&Policy::DeepSeek, &load, &Topology::new(2, 1, 1, 1), None).unwrap();
        assert_eq!(r.moved, vec![0, 0]);
        assert_eq!(Policy::DeepSeek.name(), "deepseek");
    }
}
