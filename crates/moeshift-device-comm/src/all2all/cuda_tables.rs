//! Dispatch tables built on the GPU: the placement's tables staged for the kernels, the
//! send side of a dispatch (routing; for all-to-all-v and one-sided also the split by
//! destination; the segment lists of the final sum), and the work items of every dispatch
//! (sorted by local slot, with the row lists combine walks), copied to the host once.
//!
//! The kernels are in [`super::table_kernels`]; their results equal the plain host forms of
//! the tables entry for entry (the GPU tests in `host_tables.rs` compare them).

use std::sync::Arc;

use cudarc::driver::{result, CudaSlice, CudaStream};
use moeshift_sync::Deadline;

use super::cuda::{addr, alloc_bytes, Call, CudaTokens, Engine, Section, Staging};
use super::cuda_error::CudaAll2AllError;
use super::dispatched::ExpertWork;
use super::placement::ExpertPlacement;
use super::table_kernels::{Chunking, DevicePlacement, ItemLayout, RouteLayout, SendLayout};

/// Marks an empty slot in the slot → logical expert table.
const NO_EXPERT: u32 = u32::MAX;
/// An error word that holds no error.
const NO_ERROR: u64 = u64::MAX;

/// What to do with a received pick routed to another rank's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Foreign {
    /// It is an error: the sender should only send this rank's picks.
    Reject,
    /// Skip it: every rank receives every pick.
    Skip,
}

/// What is wrong with received pick `k` of row `i`: its slot holds no expert.
pub(crate) fn no_expert(i: usize, k: usize, slot: usize) -> String {
    format!("row {i} pick {k} is routed to slot {slot}, which holds no expert")
}

/// What is wrong with received pick `k` of row `i`: its slot is another rank's.
pub(crate) fn not_ours(i: usize, k: usize, slot: usize, first_slot: usize, spr: usize) -> String {
    format!(
        "row {i} pick {k} is routed to slot {slot}, which is not an expert slot of this rank \
         (slots {first_slot}..{})",
        first_slot + spr
    )
}

/// `placement`'s sizes as the kernels take them: logical experts, physical slots and slots per
/// rank, each below `u32::MAX` (the mark of a pick served elsewhere); `None` past that.
pub(crate) fn placement_sizes(placement: &ExpertPlacement) -> Option<(u32, u32, u32)> {
    let fits = |v: usize| u32::try_from(v).ok().filter(|&v| v < u32::MAX);
    Some((
        fits(placement.num_logical())?,
        fits(placement.num_physical())?,
        fits(placement.slots_per_rank())?,
    ))
}

/// `placement`'s tables as the kernels read them: the start of every logical expert's
/// replica list (`num_logical + 1`), the replica lists back to back, and the logical expert
/// of every slot (`num_physical`, [`NO_EXPERT`] for an empty one).
pub(crate) fn placement_tables(placement: &ExpertPlacement) -> [Vec<u32>; 3] {
    let mut rep_start = Vec::with_capacity(placement.num_logical() + 1);
    let mut rep_slots = Vec::with_capacity(placement.num_physical());
    for e in 0..placement.num_logical() {
        rep_start.push(rep_slots.len() as u32);
        let replicas = placement.replicas(e).unwrap_or_default();
        rep_slots.extend(replicas.iter().map(|&s| s as u32));
    }
    rep_start.push(rep_slots.len() as u32);
    let phys_logical = (0..placement.num_physical())
        .map(|s| placement.logical_of(s).map_or(NO_EXPERT, |e| e as u32))
        .collect();
    [rep_start, rep_slots, phys_logical]
}

/// The malformed entry named by the error word `err` of the work-item kernels, as the sender
/// (group rank) and what is wrong: `rows_from[s]` rows of `top_k` entries came from rank `s`
/// to rank `me`. `None` when the word holds no error.
pub(crate) fn malformed_entry(
    err: u64,
    top_k: usize,
    rows_from: &[usize],
    placement: &ExpertPlacement,
    me: usize,
) -> Option<(usize, String)> {
    if err == NO_ERROR {
        return None;
    }
    let spr = placement.slots_per_rank();
    let (pick, slot) = ((err >> 32) as usize, (err as u32) as usize);
    let top_k = top_k.max(1);
    let (mut row, k) = (pick / top_k, pick % top_k);
    let mut src = 0;
    for &r in rows_from {
        if row < r {
            break;
        }
        row -= r;
        src += 1;
    }
    let detail = if placement.logical_of(slot).is_none() {
        no_expert(row, k, slot)
    } else {
        not_ours(row, k, slot, me * spr, spr)
    };
    Some((src.min(rows_from.len().saturating_sub(1)), detail))
}

/// A new buffer of `len` bytes for one table sort, on the communicator's stream, with its
/// error word (at `err`) all ones and its count matrix (at `counts`, for `sort`) zeroed.
/// Returns the buffer and its address.
fn sort_buffer(
    call: &Call<'_>,
    len: usize,
    err: usize,
    counts: usize,
    sort: Chunking,
) -> Result<(CudaSlice<u8>, u64), CudaAll2AllError> {
    let stream = call.comm.stream();
    let buf = alloc_bytes(call, stream, len)?;
    let base = addr(&buf, stream);
    // SAFETY: both ranges lie in `buf` (the layouts place them there).
    unsafe {
        result::memset_d8_async(base + err as u64, 0xff, 8, stream.cu_stream()).and_then(|()| {
            result::memset_d8_async(
                base + counts as u64,
                0,
                sort.count_bytes(),
                stream.cu_stream(),
            )
        })
    }
    .map_err(call.cuda("cuMemsetD8Async"))?;
    Ok((buf, base))
}

/// Where a staging upload holds the placement's tables.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlacementSections {
    num_logical: u32,
    num_physical: u32,
    slots_per_rank: u32,
    rep_start: Section,
    rep_slots: Section,
    phys_logical: Section,
}

impl PlacementSections {
    /// Stages `placement`'s tables in `st`: replica lists per logical expert and the logical
    /// expert of every slot, as u32.
    pub(crate) fn stage(
        call: &Call<'_>,
        st: &mut Staging,
        placement: &ExpertPlacement,
    ) -> Result<Self, CudaAll2AllError> {
        let num_physical = placement.num_physical();
        let Some((num_logical_u, num_physical_u, spr)) = placement_sizes(placement) else {
            return Err(call.too_large("physical slots", num_physical));
        };
        let [rep_start, rep_slots, phys_logical] = placement_tables(placement);
        Ok(Self {
            num_logical: num_logical_u,
            num_physical: num_physical_u,
            slots_per_rank: spr,
            rep_start: st.u32s(&rep_start),
            rep_slots: st.u32s(&rep_slots),
            phys_logical: st.u32s(&phys_logical),
        })
    }

    /// The tables in the upload at device address `base`.
    pub(crate) fn on_device(&self, base: u64) -> DevicePlacement {
        DevicePlacement {
            num_logical: self.num_logical,
            num_physical: self.num_physical,
            slots_per_rank: self.slots_per_rank,
            rep_start: base + self.rep_start.offset as u64,
            rep_slots: base + self.rep_slots.offset as u64,
            phys_logical: base + self.phys_logical.offset as u64,
        }
    }
}

/// Device addresses of the router output of `tokens`: expert ids and weights.
fn router_output(tokens: &CudaTokens<'_>, stream: &Arc<CudaStream>) -> (u64, u64) {
    (
        addr(&tokens.topk_ids, stream),
        addr(&tokens.topk_weights, stream),
    )
}

/// The send side of one dispatch, on the GPU (see [`SendLayout`] for what the buffer holds).
#[derive(Debug)]
pub(crate) struct SendTables {
    pub buf: CudaSlice<u8>,
    pub layout: SendLayout,
    base: u64,
}

impl SendTables {
    /// Device address of the part at byte `offset` (a field of [`Self::layout`]).
    pub(crate) fn at(&self, offset: usize) -> u64 {
        self.base + offset as u64
    }

    /// Queues routing and the split by destination of the `n` tokens of `tokens` over the
    /// group's ranks, on the communicator's stream.
    ///
    /// # Safety
    /// `tokens` holds `n × top_k` router ids and weights (checked by `check_batch`, which
    /// also ordered the communicator's stream after them) and `p` describes live tables of a
    /// placement of the group's ranks, alive until the kernels finished (stream order).
    pub(crate) unsafe fn route(
        call: &Call<'_>,
        engine: &Engine,
        tokens: &CudaTokens<'_>,
        n: usize,
        p: &DevicePlacement,
    ) -> Result<Self, CudaAll2AllError> {
        let comm = call.comm;
        let stream = comm.stream();
        let layout = SendLayout::new(n, tokens.top_k, comm.world_size())
            .map_err(call.launch("msh_route"))?;
        let (ids, weights) = router_output(tokens, stream);
        let (buf, base) = sort_buffer(call, layout.len, layout.err, layout.counts, layout.sort)?;
        // SAFETY: `buf` is laid out as `layout`, its error word and counts initialised
        // above; the inputs are the caller's contract; frees are ordered on this stream.
        unsafe {
            engine
                .tables
                .route_and_split(stream, &layout, base, ids, weights, comm.rank(), p)
        }
        .map_err(call.launch("msh_split_place"))?;
        Ok(Self { buf, layout, base })
    }

    /// What the host reads after routing, as `(address, bytes)`: see
    /// [`SendLayout::outcome`].
    pub(crate) fn outcome_range(&self) -> (u64, usize) {
        (self.at(self.layout.err), self.layout.outcome_len())
    }
}

/// The routed picks of a dispatch that sends every token to every rank, on the GPU (see
/// [`RouteLayout`] for what the buffer holds).
#[derive(Debug)]
pub(crate) struct RouteTables {
    pub buf: CudaSlice<u8>,
    pub layout: RouteLayout,
    base: u64,
}

impl RouteTables {
    /// Device address of the part at byte `offset` (a field of [`Self::layout`]).
    pub(crate) fn at(&self, offset: usize) -> u64 {
        self.base + offset as u64
    }

    /// Queues routing of the `n` tokens of `tokens` and the segment lists of their final sum
    /// over the group, on the communicator's stream.
    ///
    /// # Safety
    /// As [`SendTables::route`].
    pub(crate) unsafe fn route(
        call: &Call<'_>,
        engine: &Engine,
        tokens: &CudaTokens<'_>,
        n: usize,
        p: &DevicePlacement,
    ) -> Result<Self, CudaAll2AllError> {
        let comm = call.comm;
        let stream = comm.stream();
        let layout = RouteLayout::new(n, tokens.top_k, comm.world_size())
            .map_err(call.launch("msh_route"))?;
        let (ids, weights) = router_output(tokens, stream);
        let buf = alloc_bytes(call, stream, layout.len)?;
        let base = addr(&buf, stream);
        // SAFETY: the error word lies in `buf`.
        unsafe { result::memset_d8_async(base + layout.err as u64, 0xff, 8, stream.cu_stream()) }
            .map_err(call.cuda("cuMemsetD8Async"))?;
        // SAFETY: `buf` is laid out as `layout`, its error word initialised above; the
        // inputs are the caller's contract; frees are ordered on this stream.
        unsafe {
            engine
                .tables
                .route_all(stream, &layout, base, ids, weights, comm.rank(), p)
        }
        .map_err(call.launch("msh_strided"))?;
        Ok(Self { buf, layout, base })
    }

    /// What the host reads after routing (the error word), as `(address, bytes)`: see
    /// [`RouteLayout::outcome`].
    pub(crate) fn outcome_range(&self) -> (u64, usize) {
        (self.at(self.layout.err), 8)
    }
}

/// The work items of one dispatch, on the GPU (see [`ItemLayout`]).
#[derive(Debug)]
pub(crate) struct ItemTables {
    pub buf: CudaSlice<u8>,
    pub layout: ItemLayout,
    base: u64,
    /// This rank (whose items these are).
    rank: usize,
}

/// What the host keeps of the work items.
#[derive(Debug)]
pub(crate) struct HostItems {
    pub items: Vec<ExpertWork>,
    pub slot_offsets: Vec<usize>,
}

impl ItemTables {
    /// Device address of the part at byte `offset` (a field of [`Self::layout`]).
    pub(crate) fn at(&self, offset: usize) -> u64 {
        self.base + offset as u64
    }

    /// Queues the work items of this rank in the pick entries at `meta` (`rows × top_k`
    /// entries) on the communicator's stream.
    ///
    /// # Safety
    /// `meta` holds `rows × top_k` entries and `p` describes live tables; device memory of
    /// this context ordered on the communicator's stream, alive and unchanged until the
    /// kernels finished.
    pub(crate) unsafe fn build(
        call: &Call<'_>,
        engine: &Engine,
        meta: u64,
        rows: usize,
        top_k: usize,
        p: &DevicePlacement,
        foreign: Foreign,
    ) -> Result<Self, CudaAll2AllError> {
        let comm = call.comm;
        let stream = comm.stream();
        let layout = ItemLayout::new(rows, top_k, p.slots_per_rank as usize)
            .map_err(call.launch("msh_items_place"))?;
        let (buf, base) = sort_buffer(call, layout.len, layout.err, layout.counts, layout.sort)?;
        // SAFETY: `buf` is laid out as `layout` and initialised above; `meta` and `p` are
        // the caller's contract; frees are ordered on this stream.
        unsafe {
            engine.tables.items(
                stream,
                &layout,
                base,
                meta,
                comm.rank(),
                p,
                foreign == Foreign::Skip,
            )
        }
        .map_err(call.launch("msh_items_place"))?;
        Ok(Self {
            buf,
            layout,
            base,
            rank: comm.rank(),
        })
    }

    /// Copies the items to the host (one wait) and checks them: `rows_from[s]` rows came
    /// from group rank `s`, in rank order. A malformed entry fails naming its sender.
    pub(crate) fn to_host(
        &self,
        call: &Call<'_>,
        placement: &ExpertPlacement,
        rows_from: &[usize],
        deadline: Deadline,
    ) -> Result<HostItems, CudaAll2AllError> {
        let l = &self.layout;
        let spr = placement.slots_per_rank();
        let picks = l.picks();
        let head = l.slot_offsets + (spr + 1) * 4;
        let ranges = [
            (self.base, head),
            (self.at(l.item_rows), picks * 4),
            (self.at(l.item_weights), picks * 4),
        ];
        let stream = call.comm.stream();
        // SAFETY: the ranges lie in `self.buf`, alive while `self` is, and only the kernels
        // queued before write them.
        let parsed = unsafe {
            call.download_with(stream, &ranges, "the work items", deadline, |bytes| {
                call.mark("work items to host");
                self.parse(bytes, placement, rows_from, head, picks)
            })
        }?;
        parsed.map_err(|(src, detail)| call.malformed(src, detail))
    }

    fn parse(
        &self,
        bytes: &[u8],
        placement: &ExpertPlacement,
        rows_from: &[usize],
        head: usize,
        picks: usize,
    ) -> Result<HostItems, (usize, String)> {
        let l = &self.layout;
        let spr = placement.slots_per_rank();
        let me = self.rank;
        let u32_at = |b: &[u8], i: usize| {
            b.get(i * 4..i * 4 + 4)
                .map_or(0, |w| u32::from_le_bytes(w.try_into().unwrap_or([0; 4])))
        };
        let err = bytes.get(..8).map_or(NO_ERROR, |w| {
            u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))
        });
        if let Some(bad) = malformed_entry(err, l.top_k, rows_from, placement, me) {
            return Err(bad);
        }
        let offsets = bytes.get(l.slot_offsets..head).unwrap_or_default();
        let slot_offsets: Vec<usize> = (0..=spr).map(|s| u32_at(offsets, s) as usize).collect();
        let total = slot_offsets.last().copied().unwrap_or(0);
        let rows = bytes.get(head..head + picks * 4).unwrap_or_default();
        let weights = bytes.get(head + picks * 4..).unwrap_or_default();
        if total > picks || slot_offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err((me, format!("{total} work items from {picks} picks")));
        }
        let mut items = Vec::with_capacity(total);
        let first_slot = me * spr;
        for (local_slot, w) in slot_offsets.windows(2).enumerate() {
            let slot = first_slot + local_slot;
            let logical = placement.logical_of(slot).unwrap_or(0);
            for pos in w[0]..w[1] {
                items.push(ExpertWork {
                    row: u32_at(rows, pos) as usize,
                    slot,
                    local_slot,
                    logical,
                    weight: f32::from_bits(u32_at(weights, pos)),
                });
            }
        }
        Ok(HostItems {
            items,
            slot_offsets,
        })
    }
}
