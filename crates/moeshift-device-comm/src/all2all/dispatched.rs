//! [`HostDispatched`]: what a host dispatch hands this rank's experts, and what combine
//! needs to send their outputs back.

use super::error::All2AllError;
use super::exchange::Ctx;

/// One `(token, k)` pick that this rank's expert in local slot `local_slot` must process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertWork {
    /// Index of the token's row in [`HostDispatched::rows`].
    pub row: usize,
    /// Global physical slot (on this rank: `rank · slots_per_rank + local_slot`).
    pub slot: usize,
    /// The slot's index among this rank's slots (the row of the local expert weights).
    pub local_slot: usize,
    /// The logical expert held by the slot.
    pub logical: usize,
    /// The router weight of the pick; combine applies it, the expert does not.
    pub weight: f32,
}

/// How combine sends outputs back.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    /// Gather / reduce-scatter: every rank holds every token; `counts[r]` tokens came from
    /// group rank `r`, in rank order.
    AgRs { counts: Vec<usize> },
    /// All-to-all-v: `recv_rows[r]` rows came from group rank `r` (in rank order), and this
    /// rank sent its tokens `sent[r]` (indices into its batch), in that order, to rank `r`.
    AllToAllV {
        recv_rows: Vec<usize>,
        sent: Vec<Vec<u32>>,
        num_local_tokens: usize,
    },
}

/// Which manager produced a dispatch, so that combine refuses another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    pub manager: &'static str,
    pub group_id: u64,
    pub rank: usize,
}

/// The result of a host dispatch on one rank: the token rows its experts must process, the
/// work items (which row goes to which local expert), and the routing combine needs.
///
/// The caller computes, for every work item `i` in [`items`](Self::items) order, the
/// output row `expert[items[i].local_slot](rows[items[i].row])` **without** the router
/// weight, and passes all of them (row-major, `items().len() × hidden_size()`) to combine,
/// which applies the weights and sums each token's picks on its own rank. Items are sorted
/// by local slot, so [`items_for_local_slot`](Self::items_for_local_slot) gives each
/// expert's batch as one contiguous range (a grouped GEMM's segments).
#[derive(Debug, Clone)]
pub struct HostDispatched {
    pub(crate) origin: Origin,
    pub(crate) layer: usize,
    pub(crate) hidden_size: usize,
    pub(crate) rows: Vec<f32>,
    pub(crate) items: Vec<ExpertWork>,
    /// `items[slot_offsets[s]..slot_offsets[s + 1]]` are local slot `s`'s items.
    pub(crate) slot_offsets: Vec<usize>,
    pub(crate) route: Route,
}

impl HostDispatched {
    /// Builds the result, sorting `items` by local slot (stable, so rows stay ascending
    /// within a slot).
    pub(crate) fn new(
        origin: Origin,
        layer: usize,
        hidden_size: usize,
        rows: Vec<f32>,
        items: Vec<ExpertWork>,
        slots_per_rank: usize,
        route: Route,
    ) -> Self {
        let mut items = items;
        items.sort_by_key(|w| w.local_slot);
        let mut slot_offsets = vec![0usize; slots_per_rank + 1];
        for it in &items {
            if let Some(c) = slot_offsets.get_mut(it.local_slot + 1) {
                *c += 1;
            }
        }
        for s in 1..slot_offsets.len() {
            slot_offsets[s] += slot_offsets[s - 1];
        }
        Self {
            origin,
            layer,
            hidden_size,
            rows,
            items,
            slot_offsets,
            route,
        }
    }

    /// The MoE layer dispatched.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Values per row.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Number of token rows this rank received.
    pub fn num_rows(&self) -> usize {
        self.rows.len().checked_div(self.hidden_size).unwrap_or(0)
    }

    /// The received token rows, row-major.
    pub fn rows(&self) -> &[f32] {
        &self.rows
    }

    /// Received row `i`.
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        let start = i.checked_mul(self.hidden_size)?;
        self.rows.get(start..start.checked_add(self.hidden_size)?)
    }

    /// Every work item, sorted by local slot.
    pub fn items(&self) -> &[ExpertWork] {
        &self.items
    }

    /// The work items of local slot `local_slot` (empty for an unknown slot).
    pub fn items_for_local_slot(&self, local_slot: usize) -> &[ExpertWork] {
        slot_items(&self.items, &self.slot_offsets, local_slot)
    }

    /// Number of physical slots on this rank.
    pub fn slots_per_rank(&self) -> usize {
        self.slot_offsets.len().saturating_sub(1)
    }

    /// Number of tokens this rank dispatched (the rows combine returns).
    pub fn num_local_tokens(&self) -> usize {
        match &self.route {
            Route::AgRs { counts } => counts.get(self.origin.rank).copied().unwrap_or(0),
            Route::AllToAllV {
                num_local_tokens, ..
            } => *num_local_tokens,
        }
    }

    /// Number of output values combine expects: `items().len() × hidden_size()`.
    pub fn expert_outputs_len(&self) -> usize {
        self.items.len() * self.hidden_size
    }

    /// Builds the expert outputs combine takes by calling `f(item, input_row, output_row)`
    /// for every work item in order; `output_row` starts zeroed.
    ///
    /// ```no_run
    /// # fn demo(d: &moeshift_device_comm::all2all::HostDispatched) {
    /// // Identity experts: every expert returns its input row.
    /// let outputs = d.expert_outputs_with(|_item, input, out| out.copy_from_slice(input));
    /// assert_eq!(outputs.len(), d.expert_outputs_len());
    /// # }
    /// ```
    pub fn expert_outputs_with(
        &self,
        mut f: impl FnMut(&ExpertWork, &[f32], &mut [f32]),
    ) -> Vec<f32> {
        let h = self.hidden_size;
        let mut out = vec![0.0f32; self.expert_outputs_len()];
        if h == 0 {
            return out;
        }
        for (item, dst) in self.items.iter().zip(out.chunks_exact_mut(h)) {
            if let Some(src) = self.row(item.row) {
                f(item, src, dst);
            }
        }
        out
    }

    /// Checks that combine on `ctx` may use this dispatch with `outputs`.
    pub(crate) fn check_combine(
        &self,
        ctx: &Ctx<'_>,
        outputs_len: usize,
    ) -> Result<(), All2AllError> {
        let here = Origin {
            manager: ctx.manager,
            group_id: ctx.group.id(),
            rank: ctx.group.rank(),
        };
        if self.origin != here {
            return Err(All2AllError::ForeignDispatch {
                rank: ctx.me(),
                manager: ctx.manager,
                detail: format!(
                    "the dispatch came from the {} manager of group id {:#x} at group rank {}, \
                     not from this one (group {:?}, id {:#x})",
                    self.origin.manager,
                    self.origin.group_id,
                    self.origin.rank,
                    ctx.group.name(),
                    here.group_id
                ),
            });
        }
        if outputs_len != self.expert_outputs_len() {
            return Err(All2AllError::ExpertOutputs {
                rank: ctx.me(),
                manager: ctx.manager,
                layer: self.layer,
                len: outputs_len,
                items: self.items.len(),
                hidden_size: self.hidden_size,
            });
        }
        Ok(())
    }

    /// Per received row, the router-weighted sum of its items' outputs
    /// (`num_rows × hidden_size`). `outputs` has been checked by
    /// [`check_combine`](Self::check_combine).
    pub(crate) fn weighted_partials(&self, outputs: &[f32]) -> Vec<f32> {
        let h = self.hidden_size;
        let mut partial = vec![0.0f32; self.rows.len()];
        if h == 0 {
            return partial;
        }
        for (item, out) in self.items.iter().zip(outputs.chunks_exact(h)) {
            let start = item.row * h;
            if let Some(dst) = partial.get_mut(start..start + h) {
                for (d, o) in dst.iter_mut().zip(out) {
                    *d += item.weight * o;
                }
            }
        }
        partial
    }
}

/// The items of local slot `local_slot`: `items[slot_offsets[s]..slot_offsets[s + 1]]`
/// (empty for an unknown slot).
pub(crate) fn slot_items<'a>(
    items: &'a [ExpertWork],
    slot_offsets: &[usize],
    local_slot: usize,
) -> &'a [ExpertWork] {
    match (
        slot_offsets.get(local_slot),
        slot_offsets.get(local_slot + 1),
    ) {
        (Some(&lo), Some(&hi)) => items.get(lo..hi).unwrap_or_default(),
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(row: usize, local_slot: usize) -> ExpertWork {
        ExpertWork {
            row,
            slot: 10 + local_slot,
            local_slot,
            logical: local_slot,
            weight: 0.5,
        }
    }

    fn dispatched(items: Vec<ExpertWork>) -> HostDispatched {
        let origin = Origin {
            manager: "test",
            group_id: 1,
            rank: 0,
        };
        let rows = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 3 rows of 2
        let route = Route::AgRs { counts: vec![3] };
        HostDispatched::new(origin, 0, 2, rows, items, 3, route)
    }

    #[test]
    fn items_are_grouped_by_local_slot_stably() {
        let d = dispatched(vec![
            work(0, 2),
            work(1, 0),
            work(2, 2),
            work(0, 0),
            work(1, 2),
        ]);
        let rows_of = |s| {
            d.items_for_local_slot(s)
                .iter()
                .map(|w| w.row)
                .collect::<Vec<_>>()
        };
        assert_eq!(rows_of(0), [1, 0]);
        assert_eq!(rows_of(1), Vec::<usize>::new());
        assert_eq!(rows_of(2), [0, 2, 1]);
        assert!(d.items_for_local_slot(3).is_empty());
        assert_eq!(d.slots_per_rank(), 3);
        assert_eq!(d.num_rows(), 3);
        assert_eq!(d.row(2), Some(&[5.0, 6.0][..]));
        assert_eq!(d.row(3), None);
    }

    #[test]
    fn partials_weight_and_sum_each_rows_items() {
        let mut a = work(0, 0);
        a.weight = 0.25;
        let mut b = work(0, 1);
        b.weight = 2.0;
        let d = dispatched(vec![a, b, work(2, 1)]);
        // Doubling experts: output = 2 × input.
        let outputs = d.expert_outputs_with(|_, input, out| {
            for (o, i) in out.iter_mut().zip(input) {
                *o = 2.0 * i;
            }
        });
        assert_eq!(outputs.len(), 6);
        let p = d.weighted_partials(&outputs);
        // Row 0 = [1, 2]: (0.25 + 2.0) × 2 × row; row 1 untouched; row 2 = 0.5 × 2 × [5, 6].
        assert_eq!(p, [4.5, 9.0, 0.0, 0.0, 5.0, 6.0]);
    }
}
