//! What both host managers share: the calling context (rank, manager, layer) that errors
//! name, the checks of peers' headers that make every rank fail a bad call together, the
//! combine exchange of weighted partial sums, the load hook and the dispatch result.

use moeshift_sync::Deadline;

use super::dispatched::{ExpertWork, HostDispatched, Origin, Route};
use super::error::All2AllError;
use super::placement::ExpertPlacement;
use super::wire::{CombineHeader, DispatchHeader, Reader, Writer, STATUS_OK, STATUS_REJECTED};
use crate::error::{CommError, RankRef};
use crate::host::HostGroup;

/// The public surface both host managers (a struct with one field `group: G`, a `NAME`,
/// and inherent `run_dispatch` / `run_combine` with the trait's signatures) share:
/// construction, the group, and [`MoeAll2All`](super::MoeAll2All) over host memory.
macro_rules! host_manager {
    ($manager:ident) => {
        impl<G: ::std::borrow::Borrow<$crate::host::HostGroup>> $manager<G> {
            /// A manager over `group`, which must be the EP group (`&HostGroup`,
            /// `Arc<HostGroup>` or an owned `HostGroup`).
            pub fn new(group: G) -> Self {
                Self { group }
            }

            /// The group dispatch and combine run on.
            pub fn group(&self) -> &$crate::host::HostGroup {
                self.group.borrow()
            }

            /// Gives the group back.
            pub fn into_group(self) -> G {
                self.group
            }
        }

        impl<G: ::std::borrow::Borrow<$crate::host::HostGroup>> $crate::all2all::MoeAll2All
            for $manager<G>
        {
            type Tokens<'a> = $crate::all2all::HostTokens<'a>;
            type LoadCounts<'a> = &'a mut [i64];
            type ExpertOutputs<'a> = &'a [f32];
            type Dispatched = $crate::all2all::HostDispatched;
            type Combined = Vec<f32>;
            type Error = $crate::all2all::All2AllError;

            fn name(&self) -> &'static str {
                NAME
            }

            fn ep_rank(&self) -> usize {
                self.group().rank()
            }

            fn ep_size(&self) -> usize {
                self.group().size()
            }

            fn dispatch(
                &self,
                tokens: $crate::all2all::HostTokens<'_>,
                placement: &$crate::all2all::ExpertPlacement,
                load: Option<&mut [i64]>,
                deadline: ::moeshift_sync::Deadline,
            ) -> Result<$crate::all2all::HostDispatched, $crate::all2all::All2AllError> {
                self.run_dispatch(tokens, placement, load, deadline)
            }

            fn combine(
                &self,
                dispatched: &$crate::all2all::HostDispatched,
                expert_outputs: &[f32],
                deadline: ::moeshift_sync::Deadline,
            ) -> Result<Vec<f32>, $crate::all2all::All2AllError> {
                self.run_combine(dispatched, expert_outputs, deadline)
            }
        }
    };
}
pub(crate) use host_manager;

/// The rank, manager and layer of one dispatch or combine call.
pub(crate) struct Ctx<'g> {
    pub group: &'g HostGroup,
    pub manager: &'static str,
    pub layer: usize,
}

impl<'g> Ctx<'g> {
    pub(crate) fn new(group: &'g HostGroup, manager: &'static str, layer: usize) -> Self {
        Self {
            group,
            manager,
            layer,
        }
    }

    /// This rank.
    pub(crate) fn me(&self) -> RankRef {
        self.peer(self.group.rank())
    }

    /// Group rank `r`.
    pub(crate) fn peer(&self, r: usize) -> RankRef {
        RankRef {
            local: r,
            global: self.group.global_rank(r).unwrap_or(usize::MAX),
        }
    }

    /// Wraps a transport error of operation `op`.
    pub(crate) fn comm(&self, op: &'static str) -> impl FnOnce(CommError) -> All2AllError + '_ {
        move |source| All2AllError::Comm {
            manager: self.manager,
            op,
            layer: self.layer,
            source: Box::new(source),
        }
    }

    /// A message from `peer` that does not decode.
    pub(crate) fn malformed(&self, op: &'static str, peer: usize, detail: String) -> All2AllError {
        All2AllError::Malformed {
            rank: self.me(),
            peer: self.peer(peer),
            manager: self.manager,
            op,
            layer: self.layer,
            detail,
        }
    }

    /// Checks the dispatch header `theirs` from `peer` against this rank's `ours`.
    pub(crate) fn check_dispatch(
        &self,
        peer: usize,
        theirs: &DispatchHeader,
        ours: &DispatchHeader,
    ) -> Result<(), All2AllError> {
        if theirs.status != STATUS_OK {
            return Err(self.rejected("dispatch", peer));
        }
        match theirs.mismatch(ours) {
            None => Ok(()),
            Some((field, ours, theirs)) => Err(All2AllError::PeerMismatch {
                rank: self.me(),
                peer: self.peer(peer),
                manager: self.manager,
                op: "dispatch",
                layer: self.layer,
                field,
                ours,
                theirs,
            }),
        }
    }

    /// Checks the combine header from `peer`: valid status, this rank's hidden size and
    /// layer, the `sent` rows this rank dispatched to `peer` coming back, and `peer`
    /// expecting back the `received` rows this rank got from it. Both ranks of a pair check
    /// the same two counts, so two ranks combining different dispatches fail together.
    pub(crate) fn check_combine(
        &self,
        peer: usize,
        h: &CombineHeader,
        hidden_size: usize,
        (sent, received): (usize, usize),
    ) -> Result<(), All2AllError> {
        if h.status != STATUS_OK {
            return Err(self.rejected("combine", peer));
        }
        let mismatch = |field, ours: u64, theirs: u64| All2AllError::PeerMismatch {
            rank: self.me(),
            peer: self.peer(peer),
            manager: self.manager,
            op: "combine",
            layer: self.layer,
            field,
            ours,
            theirs,
        };
        if h.layer != self.layer as u64 {
            return Err(mismatch("layer", self.layer as u64, h.layer));
        }
        if u64::from(h.hidden_size) != hidden_size as u64 {
            return Err(mismatch(
                "hidden size",
                hidden_size as u64,
                u64::from(h.hidden_size),
            ));
        }
        if h.rows != sent as u64 {
            return Err(mismatch("row count for this rank", sent as u64, h.rows));
        }
        if h.expects != received as u64 {
            return Err(mismatch(
                "row count from this rank",
                received as u64,
                h.expects,
            ));
        }
        Ok(())
    }

    /// A dispatch this manager cannot combine on this group: `detail` says why.
    pub(crate) fn foreign(&self, detail: &str) -> All2AllError {
        All2AllError::ForeignDispatch {
            rank: self.me(),
            manager: self.manager,
            detail: detail.into(),
        }
    }

    /// This rank's dispatch result: the received `rows` of `hidden_size` values, the work
    /// items of its slots under `placement`, and the `route` combine takes back.
    pub(crate) fn dispatched(
        &self,
        placement: &ExpertPlacement,
        hidden_size: usize,
        rows: Vec<f32>,
        items: Vec<ExpertWork>,
        route: Route,
    ) -> HostDispatched {
        let origin = Origin {
            manager: self.manager,
            group_id: self.group.id(),
            rank: self.group.rank(),
        };
        HostDispatched::new(
            origin,
            placement.layer(),
            hidden_size,
            rows,
            items,
            placement.slots_per_rank(),
            route,
        )
    }

    /// The first step of combine: sends every rank `r` the router-weighted sums of the
    /// `received[r]` rows it dispatched here (consecutive in `dispatched`'s rows) and the
    /// `sent[r]` rows this rank expects back from it, or, when `rows` is `None` (this rank
    /// cannot combine), a rejection; returns every rank's message to this one.
    pub(crate) fn exchange_partials(
        &self,
        dispatched: &HostDispatched,
        outputs: &[f32],
        rows: Option<(&[usize], &[usize])>,
        deadline: Deadline,
    ) -> Result<Vec<Vec<u8>>, All2AllError> {
        let size = self.group.size();
        let h = dispatched.hidden_size();
        let layer = dispatched.layer() as u64;
        let messages: Vec<Vec<u8>> = match rows {
            Some((received, sent)) => {
                let partial = dispatched.weighted_partials(outputs);
                let mut start = 0usize;
                received
                    .iter()
                    .enumerate()
                    .map(|(r, &c)| {
                        let rows = partial.get(start * h..(start + c) * h).unwrap_or_default();
                        start += c;
                        let mut w = Writer::with_capacity(CombineHeader::LEN + 4 * rows.len());
                        CombineHeader {
                            status: STATUS_OK,
                            rows: c as u64,
                            expects: sent.get(r).copied().unwrap_or(0) as u64,
                            hidden_size: h as u32,
                            layer,
                        }
                        .write(&mut w);
                        w.f32s(rows);
                        w.finish()
                    })
                    .collect()
            }
            None => (0..size).map(|_| rejected_combine(layer)).collect(),
        };
        let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        self.group
            .all_to_all_v(&refs, deadline)
            .map_err(self.comm("combine"))
    }

    /// Reads `peer`'s combine message: a header announcing the `counts.0` rows of
    /// `hidden_size` values this rank sent `peer`, for this layer, and expecting back the
    /// `counts.1` rows this rank received from it (see [`check_combine`](Self::check_combine)),
    /// then the sums, which `add` consumes; nothing may follow.
    pub(crate) fn read_partials(
        &self,
        peer: usize,
        bytes: &[u8],
        hidden_size: usize,
        counts: (usize, usize),
        add: impl FnOnce(&mut Reader<'_>) -> Result<(), String>,
    ) -> Result<(), All2AllError> {
        let bad = |d: String| self.malformed("combine", peer, d);
        let mut r = Reader::new(bytes);
        let header = CombineHeader::read(&mut r).map_err(bad)?;
        self.check_combine(peer, &header, hidden_size, counts)?;
        add(&mut r).map_err(bad)?;
        r.finish().map_err(bad)
    }

    fn rejected(&self, op: &'static str, peer: usize) -> All2AllError {
        All2AllError::PeerRejected {
            rank: self.me(),
            peer: self.peer(peer),
            manager: self.manager,
            op,
            layer: self.layer,
        }
    }
}

/// The load hook: adds 1 to `load[slot]` for every pick routed to `slot` (a slot outside
/// `load` is skipped; the length was checked before routing).
pub(crate) fn count_load(load: Option<&mut [i64]>, slots: &[u32]) {
    if let Some(load) = load {
        for &s in slots {
            if let Some(c) = load.get_mut(s as usize) {
                *c = c.saturating_add(1);
            }
        }
    }
}

/// The combine message of a rank that rejected its own input.
fn rejected_combine(layer: u64) -> Vec<u8> {
    let mut w = Writer::with_capacity(CombineHeader::LEN);
    CombineHeader {
        status: STATUS_REJECTED,
        rows: 0,
        expects: 0,
        hidden_size: 0,
        layer,
    }
    .write(&mut w);
    w.finish()
}
