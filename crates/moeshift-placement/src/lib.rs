//! Expert placement math for Mixture-of-Experts expert parallelism: where every expert replica
//! lives, how balanced that is, how to re-plan it, and which rows must move between ranks.
//!
//! This crate is pure Rust with no native dependency. It is what the rebalancer runs on its
//! worker thread, what `moeshift plan` prints, and what the EPLB communicators execute:
//!
//! * [`LoadMatrix`]: per-layer logical expert loads, validated (finite, non-negative).
//! * [`Placement`]: `phy2log[L][P]`, `log2phy[L][N][…]` and `logcnt[L][N]` for `L` layers,
//!   `N` logical experts and `P` physical slots on `R` ranks (slot `g` on rank `g / (P/R)`,
//!   row `g % (P/R)`), built only through validating constructors; per-rank load and
//!   [`Balancedness`] (mean / max, per layer and as vLLM logs it).
//! * [`replica_index`]: which replica serves a top-k pick of a token, hashing `(token, k)`.
//! * Policies: [`deepseek()`] (DeepSeek's EPLB, hierarchical or global, identical to DeepSeek's
//!   `eplb.py` on input without ties, deterministic on ties) and [`migration()`] (reaches the
//!   fresh plan's balancedness within a tolerance while moving few replicas, preferring
//!   intra-node moves, with an optional per-layer budget), both behind [`rebalance`];
//!   [`preserve_slots`] keeps experts that stay on a rank in their old rows.
//! * [`LayerPlan`]: for one layer, every rank's local copies, sends, receives and duplicate
//!   fills, plus rounds in which each rank talks to at most one peer; [`LayerPlan::simulate`]
//!   replays a plan on expert ids.
//!
//! # Example
//!
//! DeepSeek's README example: 12 experts in 4 groups, 16 slots on 2 nodes of 4 GPUs.
//!
//! ```
//! use moeshift_placement::{deepseek, LayerPlan, LoadMatrix, Placement, Topology, Layout};
//!
//! let load = LoadMatrix::from_rows(&[
//!     [90.0f32, 132., 40., 61., 104., 165., 39., 4., 73., 56., 183., 86.],
//!     [20., 107., 104., 64., 19., 197., 187., 157., 172., 86., 16., 27.],
//! ])?;
//! let topo = Topology::new(16, 4, 2, 8);
//! let plan = deepseek(&load, &topo, None)?;
//! assert_eq!(
//!     plan.phy2log(0),
//!     Some(&[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1][..])
//! );
//! assert_eq!(plan.logcnt(0).map(|c| c[1]), Some(2));
//!
//! // Far better balanced than vLLM's initial placement.
//! let initial = Placement::initial(Layout::new(2, 12, 16, 8)?);
//! let before = initial.balancedness(&load)?;
//! let after = plan.balancedness(&load)?;
//! assert!(after.overall > before.overall);
//!
//! // What rank 3 has to do to go from the initial placement to the plan in layer 0.
//! let transfers = LayerPlan::between(&initial, &plan, 0)?;
//! let rank3 = transfers.rank(3)?;
//! assert_eq!(rank3.recvs.len() + rank3.local_copies.len()
//!            + rank3.dup_fills.len() + rank3.unchanged_rows.len(), 2);
//! assert_eq!(
//!     transfers.simulate(initial.phy2log(0).unwrap_or(&[]))?,
//!     plan.phy2log(0).unwrap_or(&[]).to_vec()
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Determinism
//!
//! Every function here is a pure function of its inputs, with ties broken in a documented
//! fixed order (heavier first, then lower index), so all ranks compute identical placements and
//! plans on every platform and run.

#![deny(missing_docs)]

pub mod deepseek;
pub mod load;
pub mod migration;
mod packing;
pub mod placement;
pub mod policy;
pub mod preserve;
pub mod replica;
pub mod transfer;

pub use deepseek::deepseek;
pub use load::{LoadError, LoadMatrix};
pub use migration::{migration, MigrationOptions, MigrationReport};
pub use placement::{balancedness_of, Balancedness, Layout, MapError, Placement};
pub use policy::{rebalance, Policy, PolicyError, Rebalanced, Topology};
pub use preserve::preserve_slots;
pub use replica::replica_index;
pub use transfer::{Flow, LayerPlan, LocalCopy, PlanError, RankPlan, RecvOp, Round, SendOp};
