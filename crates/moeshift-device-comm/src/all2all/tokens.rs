//! [`HostTokens`]: one rank's routed tokens in host memory, as dispatch takes them.

use super::error::All2AllError;
use super::exchange::Ctx;
use super::placement::ExpertPlacement;
use super::replica::MAX_TOP_K;

/// One rank's tokens for one MoE layer: hidden-state rows (f32, row-major
/// `num_tokens × hidden_size`) with the router's top-k logical expert ids and weights
/// (row-major `num_tokens × top_k` each).
///
/// Building one checks nothing; dispatch checks the shapes and ids and reports errors that
/// name the rank, the layer, the token and the pick.
///
/// ```
/// use moeshift_device_comm::all2all::HostTokens;
///
/// // Two tokens of hidden size 3, top-2 routing.
/// let hidden = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let ids = [0, 3, 2, 1];
/// let weights = [0.75, 0.25, 0.5, 0.5];
/// let tokens = HostTokens::new(&hidden, 3, &ids, &weights, 2);
/// assert_eq!(tokens.num_tokens(), 2);
/// assert_eq!(tokens.row(1), Some(&[4.0, 5.0, 6.0][..]));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct HostTokens<'a> {
    hidden: &'a [f32],
    hidden_size: usize,
    topk_ids: &'a [u32],
    topk_weights: &'a [f32],
    top_k: usize,
}

impl<'a> HostTokens<'a> {
    /// Tokens from row-major slices: `hidden` is `num_tokens × hidden_size`, `topk_ids` and
    /// `topk_weights` are `num_tokens × top_k`; `num_tokens` is `topk_ids.len() / top_k`.
    pub fn new(
        hidden: &'a [f32],
        hidden_size: usize,
        topk_ids: &'a [u32],
        topk_weights: &'a [f32],
        top_k: usize,
    ) -> Self {
        Self {
            hidden,
            hidden_size,
            topk_ids,
            topk_weights,
            top_k,
        }
    }

    /// Number of tokens (`topk_ids.len() / top_k`; 0 when `top_k` is 0).
    pub fn num_tokens(&self) -> usize {
        self.topk_ids.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// Hidden size (values per row).
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// All hidden-state rows.
    pub fn hidden(&self) -> &'a [f32] {
        self.hidden
    }

    /// Token `t`'s hidden-state row.
    pub fn row(&self, t: usize) -> Option<&'a [f32]> {
        let start = t.checked_mul(self.hidden_size)?;
        self.hidden.get(start..start.checked_add(self.hidden_size)?)
    }

    /// The top-k logical expert ids, row-major.
    pub fn topk_ids(&self) -> &'a [u32] {
        self.topk_ids
    }

    /// The top-k router weights, row-major.
    pub fn topk_weights(&self) -> &'a [f32] {
        self.topk_weights
    }

    /// Checks shapes, ids and the load counter's length against `placement`.
    pub(crate) fn check(
        &self,
        ctx: &Ctx<'_>,
        placement: &ExpertPlacement,
        load_len: Option<usize>,
    ) -> Result<(), All2AllError> {
        let bad = |detail: String| All2AllError::Tokens {
            rank: ctx.me(),
            manager: ctx.manager,
            layer: ctx.layer,
            detail,
        };
        if placement.ep_size() != ctx.group.size() {
            return Err(All2AllError::PlacementGroup {
                rank: ctx.me(),
                group: ctx.group.name().to_string(),
                layer: ctx.layer,
                placement_ep_size: placement.ep_size(),
                group_size: ctx.group.size(),
            });
        }
        if self.hidden_size == 0 || u32::try_from(self.hidden_size).is_err() {
            return Err(bad(format!(
                "hidden size {} is not in 1..=u32::MAX",
                self.hidden_size
            )));
        }
        if self.top_k == 0 || self.top_k > MAX_TOP_K {
            return Err(bad(format!(
                "top-k {} is not in 1..={MAX_TOP_K}",
                self.top_k
            )));
        }
        if self.topk_ids.len() % self.top_k != 0 {
            return Err(bad(format!(
                "{} top-k ids are not a whole number of tokens of top-k {}",
                self.topk_ids.len(),
                self.top_k
            )));
        }
        let n = self.num_tokens();
        if u32::try_from(n).is_err() {
            return Err(bad(format!("{n} tokens is more than one batch can hold")));
        }
        if self.topk_weights.len() != self.topk_ids.len() {
            return Err(bad(format!(
                "{} top-k weights for {} top-k ids ({n} tokens × top-k {})",
                self.topk_weights.len(),
                self.topk_ids.len(),
                self.top_k
            )));
        }
        if Some(self.hidden.len()) != n.checked_mul(self.hidden_size) {
            return Err(bad(format!(
                "{} hidden values for {n} tokens × hidden size {}",
                self.hidden.len(),
                self.hidden_size
            )));
        }
        if let Some(len) = load_len {
            if len != placement.num_physical() {
                return Err(All2AllError::LoadCounter {
                    rank: ctx.me(),
                    manager: ctx.manager,
                    layer: ctx.layer,
                    len,
                    expected: placement.num_physical(),
                });
            }
        }
        if let Some((i, &expert)) = self
            .topk_ids
            .iter()
            .enumerate()
            .find(|(_, &e)| e as usize >= placement.num_logical())
        {
            return Err(All2AllError::UnknownExpert {
                rank: ctx.me(),
                manager: ctx.manager,
                layer: ctx.layer,
                token: i / self.top_k,
                k: i % self.top_k,
                expert,
                num_logical: placement.num_logical(),
            });
        }
        Ok(())
    }
}
