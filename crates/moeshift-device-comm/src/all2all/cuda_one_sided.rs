//! [`CudaOneSidedManager`]: single-node all-to-all in which every rank writes its rows
//! straight into its peers' workspace regions through CUDA IPC mappings.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::sync::Arc;

use cudarc::driver::{result, CudaSlice, CudaStream, CudaView, DevicePtrMut};
use moeshift_sync::Deadline;

use super::cuda::{
    addr, alloc_bytes, check_all, check_batch, impl_cuda_all2all, read_headers, Call, CudaTokens,
    Engine, Prepared, Staging,
};
use super::cuda_dispatched::{CudaDispatched, CudaRoute};
use super::cuda_error::CudaAll2AllError;
use super::cuda_steps::{
    at, block_offsets, check_combine, check_rows, combine_headers, dispatch_header,
    finish_dispatch, gather_rows, partial_sums, token_sums, Arrived, SendSide,
};
use super::cuda_tables::{Foreign, PlacementSections, SendTables};
use super::cuda_wire::{DeviceHeader, DISPATCH, FLAG_NEEDS_RESIZE, MANAGER_ONE_SIDED, PICK_BYTES};
use super::ipc::{IpcRegion, PeerRegion};
use super::placement::ExpertPlacement;
use super::workspace::{Workspace, WorkspaceCapacity, WorkspaceError};
use crate::error::RankRef;
use crate::host::HostGroup;
use crate::nccl::NcclComm;

const NAME: &str = "one_sided_ipc";
/// Alignment of every area and sub-region in a region.
const ALIGN: usize = 256;

/// Where things are in one rank's region (byte offsets), for the current capacity.
///
/// `[dispatch headers: size × 64][combine headers: size × 64]` then the dispatch area of
/// the [`Workspace`] (one sub-region per source rank: `max_tokens` rows, then `max_tokens ×
/// top_k` pick entries, then the extra bytes), then the combine area (`size × max_tokens`
/// rows: each destination writes the sums for this rank's rows at the row this rank told
/// it). Every area and sub-region starts on a 256-byte boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    dispatch_headers: usize,
    combine_headers: usize,
    dispatch_area: usize,
    sub: usize,
    meta_offset: usize,
    combine_area: usize,
    combine_bytes: usize,
    total: usize,
    max_tokens: usize,
    row_bytes_cap: usize,
}

impl Layout {
    fn of(ws: &Workspace) -> Option<Self> {
        let size = ws.slots();
        let cap = ws.capacity();
        let cfg = ws.config();
        let align = |x: usize| x.checked_next_multiple_of(ALIGN);
        let row_bytes_cap = cap.hidden_size.checked_mul(cfg.elem_bytes)?;
        let rows_block = cap.max_tokens_per_rank.checked_mul(row_bytes_cap)?;
        let meta_block = cap
            .max_tokens_per_rank
            .checked_mul(cfg.top_k)?
            .checked_mul(PICK_BYTES)?;
        let extra = cap
            .max_tokens_per_rank
            .checked_mul(cap.extra_bytes_per_token)?;
        let sub = align(rows_block.checked_add(meta_block)?.checked_add(extra)?)?;
        let headers = align(size.checked_mul(DeviceHeader::LEN)?)?;
        let dispatch_area = headers.checked_mul(2)?;
        let combine_area = dispatch_area.checked_add(size.checked_mul(sub)?)?;
        let combine_bytes = align(size.checked_mul(rows_block)?)?;
        Some(Self {
            dispatch_headers: 0,
            combine_headers: headers,
            dispatch_area,
            sub,
            meta_offset: rows_block,
            combine_area,
            combine_bytes,
            total: combine_area.checked_add(combine_bytes)?,
            max_tokens: cap.max_tokens_per_rank,
            row_bytes_cap,
        })
    }
}

/// Which area peers may still be reading after this rank's last call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Area {
    Dispatch,
    Combine,
}

#[derive(Debug)]
struct State {
    workspace: Workspace,
    layout: Layout,
    generation: u64,
    region: Option<IpcRegion>,
    /// Mappings of the peers' regions, by group rank (`None` for this rank).
    peers: Vec<Option<PeerRegion>>,
    pending: Option<Area>,
    barrier: CudaSlice<f32>,
}

impl State {
    /// Address of group rank `r`'s region in this process.
    fn base(&self, r: usize, me: usize) -> u64 {
        if r == me {
            self.region.as_ref().map_or(0, IpcRegion::ptr)
        } else {
            self.peers
                .get(r)
                .and_then(Option::as_ref)
                .map_or(0, PeerRegion::ptr)
        }
    }
}

/// One-sided all-to-all for the ranks of one node (the role of FlashInfer's NVLink
/// one-sided `MoeAlltoAll`), over the EP group's [`NcclComm`] (for barriers) and
/// [`HostGroup`] (for its rendezvous store and the coordinated resize).
///
/// Each rank allocates one region (`cuMemAlloc`) sized by a [`Workspace`] with one slot per
/// EP rank, publishes its CUDA IPC handle through the store, and maps every peer's region
/// (`cuIpcOpenMemHandle`). Then:
///
/// - **dispatch**: kernels route the batch and split it by destination, the host reads the
///   row count of every destination (one small copy), then a rank packs its rows by
///   destination (gather kernel) and writes each
///   destination's share, with its pick metadata and a 64-byte header, straight into that
///   destination's region with `cuMemcpyDtoDAsync` (the copy engines, over NVLink); an NCCL
///   all-reduce of one element is the barrier after which every rank reads what it got.
///   One barrier per call when the batch fits; a batch larger than the workspace makes
///   every rank grow it together ([`Workspace::agree_resize`], then unmap, barrier, free,
///   allocate, exchange handles, map) and write again;
/// - **combine**: each rank sums its received rows' weighted expert outputs (kernel) and
///   writes the sums into the source rank's combine area at the row the source announced,
///   then a barrier, then each rank adds its tokens' sums in rank order (kernel).
///
/// The header's status travels with the data, so a rank with bad input fails the call on
/// every rank, as with the other managers; results equal the host
/// [`AllToAllVManager`](super::AllToAllVManager)'s (bit for bit in f32).
///
/// Peers write into this rank's region during a call while it may still be reading the
/// previous call's data: dispatch and combine use separate areas, and a call that follows
/// a call of the same kind (two dispatches in a row) starts with an extra barrier.
#[derive(Debug)]
pub struct CudaOneSidedManager<C = NcclComm, G = HostGroup> {
    comm: C,
    group: G,
    engine: Engine,
    key_prefix: String,
    state: RefCell<State>,
}

impl<C: Borrow<NcclComm>, G: Borrow<HostGroup>> CudaOneSidedManager<C, G> {
    /// A manager over the EP group's communicator `comm` and host group `group` (same ranks,
    /// same order), with `workspace` (dim 0 = EP size) as the initial capacity. Every EP
    /// rank calls it together: it allocates this rank's region and maps every peer's before
    /// `deadline`.
    pub fn new(
        comm: C,
        group: G,
        workspace: Workspace,
        deadline: Deadline,
    ) -> Result<Self, CudaAll2AllError> {
        let (c, g) = (comm.borrow(), group.borrow());
        let rank = RankRef {
            local: c.rank(),
            global: g.global_rank(g.rank()).unwrap_or(c.rank()),
        };
        let setup = |detail: String| CudaAll2AllError::Setup {
            rank,
            manager: NAME,
            detail,
        };
        if g.size() != c.world_size() || g.rank() != c.rank() {
            return Err(setup(format!(
                "the host group {:?} (rank {} of {}) and the NCCL communicator (rank {} of {}) \
                 must span the same EP ranks in the same order",
                g.name(),
                g.rank(),
                g.size(),
                c.rank(),
                c.world_size()
            )));
        }
        if workspace.slots() != c.world_size() {
            return Err(setup(format!(
                "the workspace has {} slots in dim 0, the EP group {} ranks",
                workspace.slots(),
                c.world_size()
            )));
        }
        let layout = Layout::of(&workspace).ok_or_else(|| {
            setup(format!(
                "a region for {:?} does not fit in memory addresses",
                workspace.capacity()
            ))
        })?;
        let mut engine = Engine::new(c, NAME)?;
        engine.globals = g.members().to_vec();
        let instance = g
            .store()
            .next_round(&format!("moeshift/a2a-one-sided/{:x}", g.id()));
        let key_prefix = format!("moeshift/a2a-one-sided/{:x}/{instance}", g.id());
        let state = {
            let call = engine.call(c, "setup", 0);
            let barrier = c
                .stream()
                .alloc_zeros::<f32>(1)
                .map_err(call.cuda("cuMemAllocAsync"))?;
            let mut state = State {
                workspace,
                layout,
                generation: 0,
                region: None,
                peers: Vec::new(),
                pending: None,
                barrier,
            };
            map_regions(&call, g, &key_prefix, &mut state, deadline)?;
            state
        };
        Ok(Self {
            comm,
            group,
            engine,
            key_prefix,
            state: RefCell::new(state),
        })
    }

    /// The workspace as it is now (its capacity only grows).
    pub fn workspace(&self) -> Workspace {
        self.state.borrow().workspace.clone()
    }

    /// How many times the workspace was allocated since creation (0 before any resize).
    pub fn generation(&self) -> u64 {
        self.state.borrow().generation
    }

    /// Bytes of this rank's region: both header areas, the workspace's dispatch area
    /// ([`Workspace::bytes_per_slot`], sub-regions rounded up to 256 bytes) and the combine
    /// area.
    pub fn region_bytes(&self) -> usize {
        self.state
            .borrow()
            .region
            .as_ref()
            .map_or(0, IpcRegion::len)
    }

    /// The communicator.
    pub fn comm(&self) -> &NcclComm {
        self.comm.borrow()
    }

    /// The host group.
    pub fn group(&self) -> &HostGroup {
        self.group.borrow()
    }

    /// The stream results are ordered on (the communicator's).
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.comm.borrow().stream()
    }

    /// Host wall time this manager's calls spent in each step (named `"dispatch: …"` /
    /// `"combine: …"`), summed over every call since it was created or
    /// [`reset_step_times`](Self::reset_step_times) was called: where a call's time goes.
    /// Steps that wait for the GPU include that wait.
    pub fn step_times(&self) -> Vec<(String, std::time::Duration)> {
        self.engine.clock.totals()
    }

    /// Starts [`step_times`](Self::step_times) over.
    pub fn reset_step_times(&self) {
        self.engine.clock.reset()
    }

    /// Tears the workspace down on every rank together: waits for this rank's copies,
    /// unmaps the peers' regions, waits (barrier) until every peer unmapped this rank's
    /// region, then frees it. Dropping the manager frees without the barrier.
    pub fn close(self, deadline: Deadline) -> Result<(), CudaAll2AllError> {
        let call = self.call("close", 0);
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        call.wait(call.comm.stream(), "copies into the workspace", deadline)?;
        st.peers.clear();
        barrier(&call, st, deadline)?;
        st.region = None;
        Ok(())
    }

    fn call<'a>(&'a self, op: &'static str, layer: usize) -> Call<'a> {
        self.engine.call(self.comm.borrow(), op, layer)
    }

    /// Grows the workspace to cover `wanted` on every rank together.
    fn resize(
        &self,
        call: &Call<'_>,
        st: &mut State,
        wanted: &WorkspaceCapacity,
        deadline: Deadline,
    ) -> Result<(), CudaAll2AllError> {
        let group = self.group.borrow();
        let ws_err = |source: WorkspaceError| CudaAll2AllError::Workspace {
            rank: call.me(),
            manager: NAME,
            op: call.op,
            layer: call.layer,
            source,
        };
        let config = st.workspace.config();
        let Some(plan) = st
            .workspace
            .agree_resize(group, &config, wanted, deadline)
            .map_err(ws_err)?
        else {
            return Ok(());
        };
        let mut grown = st.workspace.clone();
        grown.apply(&plan).map_err(ws_err)?;
        let layout = Layout::of(&grown).ok_or_else(|| CudaAll2AllError::Setup {
            rank: call.me(),
            manager: NAME,
            detail: format!(
                "a region for {:?} does not fit in memory addresses",
                plan.to
            ),
        })?;
        // Tear down together: no copy into the old regions is in flight, every peer closed
        // its mapping of this rank's region before it is freed.
        call.wait(
            call.comm.stream(),
            "copies into the old workspace",
            deadline,
        )?;
        st.peers.clear();
        barrier(call, st, deadline)?;
        st.region = None;
        st.workspace = grown;
        st.layout = layout;
        st.generation += 1;
        map_regions(call, group, &self.key_prefix, st, deadline)
    }

    /// Writes this rank's rows and pick metadata into every destination's dispatch area.
    #[allow(clippy::too_many_arguments)]
    fn write_rows(
        &self,
        call: &Call<'_>,
        st: &State,
        send: u64,
        meta: u64,
        sent_rows: &[usize],
        row_bytes: usize,
        pick_row: usize,
    ) -> Result<(), CudaAll2AllError> {
        let comm = call.comm;
        let me = comm.rank();
        let stream = comm.stream();
        let l = st.layout;
        let send_off = block_offsets(sent_rows, row_bytes);
        let meta_off = block_offsets(sent_rows, pick_row);
        for (d, &rows) in sent_rows.iter().enumerate() {
            if rows == 0 {
                continue;
            }
            let dst = st.base(d, me) + (l.dispatch_area + me * l.sub) as u64;
            copy(
                call,
                stream,
                dst,
                send + send_off[d] as u64,
                rows * row_bytes,
            )?;
            copy(
                call,
                stream,
                dst + l.meta_offset as u64,
                meta + meta_off[d] as u64,
                rows * pick_row,
            )?;
        }
        Ok(())
    }

    /// Writes this rank's header for every rank (`staged`: `size` headers) into their
    /// header area `offset`.
    fn write_headers(
        &self,
        call: &Call<'_>,
        st: &State,
        staged: u64,
        offset: usize,
    ) -> Result<(), CudaAll2AllError> {
        let comm = call.comm;
        let me = comm.rank();
        for d in 0..comm.world_size() {
            let dst = st.base(d, me) + (offset + me * DeviceHeader::LEN) as u64;
            copy(
                call,
                comm.stream(),
                dst,
                staged + (d * DeviceHeader::LEN) as u64,
                DeviceHeader::LEN,
            )?;
        }
        Ok(())
    }

    /// Reads the `size` headers in this rank's header area `offset`.
    fn read_headers(
        &self,
        call: &Call<'_>,
        st: &State,
        offset: usize,
        deadline: Deadline,
    ) -> Result<Vec<DeviceHeader>, CudaAll2AllError> {
        let comm = call.comm;
        let (me, size) = (comm.rank(), comm.world_size());
        let range = [(st.base(me, me) + offset as u64, size * DeviceHeader::LEN)];
        // SAFETY: the header area lies in this rank's region (the layout bounds it), and
        // the peers' writes into it are complete after the barrier.
        unsafe {
            call.download_with(
                comm.stream(),
                &range,
                "the work before reading the workspace",
                deadline,
                |bytes| read_headers(call, bytes),
            )
        }?
    }
}

/// Allocates this rank's region for the current layout, publishes its handle and maps
/// every peer's region of the same generation.
fn map_regions(
    call: &Call<'_>,
    group: &HostGroup,
    prefix: &str,
    st: &mut State,
    deadline: Deadline,
) -> Result<(), CudaAll2AllError> {
    let comm = call.comm;
    let (me, size) = (comm.rank(), comm.world_size());
    let ctx = comm.stream().context();
    let generation = st.generation;
    let ipc = |peer: usize, what: &'static str, detail: String| CudaAll2AllError::Ipc {
        rank: call.me(),
        peer: call.peer(peer),
        manager: NAME,
        generation,
        what,
        detail,
    };
    let region = IpcRegion::alloc(ctx, st.layout.total).map_err(call.cuda("cuMemAlloc"))?;
    let handle = region
        .handle()
        .map_err(|e| ipc(me, "cuIpcGetMemHandle", e.to_string()))?;
    st.region = Some(region);
    let key = |r: usize| format!("{prefix}/gen{generation}/rank{r}");
    let store = group.store();
    let store_err = |key: String| {
        move |source| CudaAll2AllError::Store {
            rank: call.me(),
            manager: NAME,
            key,
            source: Box::new(source),
        }
    };
    store
        .set(&key(me), &handle, deadline)
        .map_err(store_err(key(me)))?;
    let mut peers = Vec::with_capacity(size);
    for p in 0..size {
        if p == me {
            peers.push(None);
            continue;
        }
        let bytes = store.get(&key(p), deadline).map_err(store_err(key(p)))?;
        let region = PeerRegion::open(ctx, &bytes).map_err(|d| ipc(p, "cuIpcOpenMemHandle", d))?;
        peers.push(Some(region));
    }
    st.peers = peers;
    Ok(())
}

/// An NCCL all-reduce of one element: returns once every rank's earlier work on its
/// communicator stream (copies into peers' regions included) is done.
fn barrier(call: &Call<'_>, st: &mut State, deadline: Deadline) -> Result<(), CudaAll2AllError> {
    call.comm
        .all_reduce_sum(&mut st.barrier, deadline)
        .map_err(call.nccl())
}

/// Queues a copy of `bytes` bytes from `src` to `dst` (device addresses; `dst` may be a
/// peer's region) on `stream`.
fn copy(
    call: &Call<'_>,
    stream: &CudaStream,
    dst: u64,
    src: u64,
    bytes: usize,
) -> Result<(), CudaAll2AllError> {
    if bytes == 0 {
        return Ok(());
    }
    // SAFETY: both ranges are live device memory reachable from this context (an own
    // buffer or region, or a mapped peer region whose size the layout bounds), and nothing
    // else writes them until the next barrier.
    unsafe { result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }
        .map_err(call.cuda("cuMemcpyDtoDAsync"))
}

impl_cuda_all2all!(impl[C: Borrow<NcclComm>, G: Borrow<HostGroup>] CudaOneSidedManager<C, G>, NAME);

impl<C: Borrow<NcclComm>, G: Borrow<HostGroup>> CudaOneSidedManager<C, G> {
    fn run_dispatch(
        &self,
        tokens: CudaTokens<'_>,
        placement: &ExpertPlacement,
        load: Option<&mut CudaSlice<i64>>,
        deadline: Deadline,
    ) -> Result<CudaDispatched, CudaAll2AllError> {
        let engine = &self.engine;
        let (seq, call) = engine.begin(self.comm.borrow(), "dispatch", placement.layer());
        let comm = call.comm;
        let (me, size) = (comm.rank(), comm.world_size());
        let stream = comm.stream();
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        let top_k = tokens.top_k;
        let mut staging = Staging::new(&call);
        let local = check_batch(&call, &tokens, placement, load.as_ref().map(|l| l.len()))
            .and_then(|p| check_config(&call, &p, top_k, placement, &st.workspace).map(|()| p))
            .and_then(|p| PlacementSections::stage(&call, &mut staging, placement).map(|t| (p, t)));
        if st.pending == Some(Area::Dispatch) {
            barrier(&call, st, deadline)?;
        }

        // Route and split on the GPU, then read the row counts of every destination (they
        // size the writes to the peers). Any failure here rejects the batch everywhere.
        let staged = staging.upload(&call, stream, deadline)?;
        let staged_base = addr(&staged, stream);
        let routed = local.and_then(|(p, tables)| {
            let dev = tables.on_device(staged_base);
            // SAFETY: `check_batch` checked `tokens` for `p.n` tokens and ordered this stream
            // after them; `dev` lies in `staged`, alive until the end of the call.
            let send = unsafe { SendTables::route(&call, engine, &tokens, p.n, &dev) }?;
            // SAFETY: the range lies in `send.buf`, written only by the kernels queued above.
            let outcome = unsafe {
                call.download_with(
                    stream,
                    &[send.outcome_range()],
                    "the routing of the batch",
                    deadline,
                    |bytes| send.layout.outcome(bytes),
                )
            }?;
            let sent_rows = outcome.map_err(|u| call.unknown_expert(placement, u))?;
            let send_count = sent_rows.iter().sum::<usize>();
            if send_count > send.layout.max_rows {
                return Err(call.too_large("rows sent", send_count));
            }
            call.mark("routing + split (GPU, counts to host)");
            // Pack the rows by destination.
            // SAFETY: the send index holds `send_count` tokens of this batch; `send` lives
            // until the end of the call.
            let packed = unsafe {
                gather_rows(
                    &call,
                    engine,
                    &tokens,
                    send.at(send.layout.send_index),
                    send_count,
                    p.row_bytes,
                )
            }?;
            Ok((p, dev, send, sent_rows, packed))
        });

        let cap = st.workspace.capacity();
        let mut ours = DeviceHeader::rejected(DISPATCH, MANAGER_ONE_SIDED, seq);
        let fits = match &routed {
            Ok((p, ..)) => {
                ours = dispatch_header(p, &tokens, placement, MANAGER_ONE_SIDED, seq);
                p.n <= cap.max_tokens_per_rank && tokens.hidden_size <= cap.hidden_size
            }
            Err(_) => false,
        };
        let sent_rows: Vec<usize> = match &routed {
            Ok((.., rows, _)) => rows.clone(),
            Err(_) => vec![0; size],
        };
        let mut header_bytes = Vec::with_capacity(size * DeviceHeader::LEN);
        let mut combine_at = 0u64;
        for &rows in &sent_rows {
            let h = match &routed {
                Ok(_) => DeviceHeader {
                    rows: rows as u64,
                    combine_offset: combine_at,
                    flags: if fits { 0 } else { FLAG_NEEDS_RESIZE },
                    ..ours
                },
                Err(_) => ours,
            };
            combine_at += h.rows;
            h.write(&mut header_bytes);
        }
        let mut staging = Staging::new(&call);
        let header_sec = staging.bytes(&header_bytes);
        let staged_headers = staging.upload(&call, stream, deadline)?;

        // Write the rows now if they fit.
        let row_bytes = routed.as_ref().map_or(0, |(p, ..)| p.row_bytes);
        let pick_row = top_k * PICK_BYTES;
        let (send_base, meta_base) = match &routed {
            Ok((_, _, send, _, (_, packed))) => (*packed, send.at(send.layout.send_meta)),
            Err(_) => (0, 0),
        };
        if fits {
            self.write_rows(
                &call, st, send_base, meta_base, &sent_rows, row_bytes, pick_row,
            )?;
        }
        self.write_headers(
            &call,
            st,
            at(addr(&staged_headers, stream), header_sec),
            st.layout.dispatch_headers,
        )?;
        call.mark("write rows and headers to peers");
        barrier(&call, st, deadline)?;
        call.mark("barrier (host group)");
        st.pending = Some(Area::Dispatch);

        let headers = self.read_headers(&call, st, st.layout.dispatch_headers, deadline)?;
        call.mark("headers to host");
        let (p, dev, split, _, (send, _)) = routed?;
        check_all(&call, &headers, &ours)?;
        if headers.iter().any(|h| h.flags & FLAG_NEEDS_RESIZE != 0) {
            let most = headers.iter().map(|h| h.tokens).max().unwrap_or(0);
            let wanted = WorkspaceCapacity {
                max_tokens_per_rank: usize::try_from(most)
                    .map_err(|_| call.too_large("tokens per rank", usize::MAX))?,
                hidden_size: tokens.hidden_size,
                extra_bytes_per_token: 0,
            };
            self.resize(&call, st, &wanted, deadline)?;
            self.write_rows(
                &call, st, send_base, meta_base, &sent_rows, row_bytes, pick_row,
            )?;
            barrier(&call, st, deadline)?;
        }
        drop(send);

        // Read what arrived.
        let l = st.layout;
        let mut recv_rows = Vec::with_capacity(size);
        let mut combine_offsets = Vec::with_capacity(size);
        for (src, h) in headers.iter().enumerate() {
            let rows = usize::try_from(h.rows).unwrap_or(usize::MAX);
            let end = usize::try_from(h.combine_offset)
                .ok()
                .and_then(|o| o.checked_add(rows))
                .and_then(|e| e.checked_mul(row_bytes));
            if h.rows > h.tokens || rows > l.max_tokens || end.is_none_or(|e| e > l.combine_bytes) {
                return Err(call.malformed(
                    src,
                    format!(
                        "{} rows (combine row {}) from a batch of {} tokens do not fit a \
                         workspace of {} tokens per rank",
                        h.rows, h.combine_offset, h.tokens, l.max_tokens
                    ),
                ));
            }
            recv_rows.push(rows);
            combine_offsets.push(h.combine_offset);
        }
        let total: usize = recv_rows.iter().sum();
        let mut rows = alloc_bytes(&call, stream, total * row_bytes)?;
        let own = st.base(me, me);
        {
            let (dst, record) = rows.device_ptr_mut(stream);
            let offsets = block_offsets(&recv_rows, row_bytes);
            for (s, &r) in recv_rows.iter().enumerate() {
                let src = own + (l.dispatch_area + s * l.sub) as u64;
                copy(&call, stream, dst + offsets[s] as u64, src, r * row_bytes)?;
            }
            drop(record);
        }
        call.mark("copy rows out of the workspace (alloc + launch)");
        // Every source's metadata, read in one go after the rows' copies.
        let meta = recv_rows
            .iter()
            .enumerate()
            .map(|(s, &r)| {
                let src = own + (l.dispatch_area + s * l.sub + l.meta_offset) as u64;
                (src, r * pick_row)
            })
            .collect();
        let arrived = Arrived {
            rows,
            rows_from: recv_rows.clone(),
            meta,
            foreign: Foreign::Reject,
            route: CudaRoute::OneSided {
                recv_rows,
                sent_rows,
                combine_offsets,
            },
        };
        // SAFETY: each source's metadata lies in its sub-region of this rank's region (the
        // row count was checked against the layout above), complete after the barrier,
        // and no peer writes the dispatch area again before this rank's next call.
        unsafe {
            finish_dispatch(
                &call,
                engine,
                placement,
                &dev,
                &tokens,
                &p,
                arrived,
                SendSide::Split(split),
                load,
                deadline,
            )
        }
    }

    fn run_combine(
        &self,
        dispatched: &CudaDispatched,
        outputs: CudaView<'_, u8>,
        deadline: Deadline,
    ) -> Result<CudaSlice<u8>, CudaAll2AllError> {
        let engine = &self.engine;
        let (seq, call) = engine.begin(self.comm.borrow(), "combine", dispatched.layer);
        let comm = call.comm;
        let (me, size) = (comm.rank(), comm.world_size());
        let stream = comm.stream();
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        let row_bytes = dispatched.row_bytes;
        let l = st.layout;
        // Everything that can fail on this rank alone comes before the headers, so that a
        // failure reaches the peers as a rejection instead of leaving them at the barrier.
        let local = check_combine(&call, engine, dispatched, &outputs)
            .and_then(|()| match &dispatched.route {
                CudaRoute::OneSided {
                    recv_rows,
                    sent_rows,
                    combine_offsets,
                } if recv_rows.len() == size
                    && sent_rows.len() == size
                    && combine_offsets.len() == size =>
                {
                    Ok((recv_rows, sent_rows, combine_offsets))
                }
                _ => Err(call.tokens("the dispatch has no one-sided route for this group".into())),
            })
            .and_then(|(recv_rows, sent_rows, combine_offsets)| {
                for s in 0..size {
                    let end = (combine_offsets[s] as usize + recv_rows[s]) * row_bytes;
                    if end > l.combine_bytes {
                        return Err(call.malformed(
                            s,
                            format!(
                                "combine rows {}..{} do not fit the combine area of {} bytes",
                                combine_offsets[s],
                                combine_offsets[s] as usize + recv_rows[s],
                                l.combine_bytes
                            ),
                        ));
                    }
                }
                let partial = partial_sums(&call, dispatched, &outputs)?;
                Ok((recv_rows, sent_rows, combine_offsets, partial))
            });
        if st.pending == Some(Area::Combine) {
            barrier(&call, st, deadline)?;
        }
        let (ours, header_bytes) = combine_headers(
            dispatched,
            MANAGER_ONE_SIDED,
            seq,
            size,
            local
                .as_ref()
                .ok()
                .map(|(recv_rows, sent_rows, ..)| (recv_rows.as_slice(), sent_rows.as_slice())),
        );
        let mut staging = Staging::new(&call);
        let header_sec = staging.bytes(&header_bytes);
        let staged = staging.upload(&call, stream, deadline)?;
        if let Ok((recv_rows, _, combine_offsets, partial)) = &local {
            let base = addr(partial, stream);
            let offsets = block_offsets(recv_rows, row_bytes);
            for s in 0..size {
                let dst = st.base(s, me)
                    + (l.combine_area + combine_offsets[s] as usize * row_bytes) as u64;
                copy(
                    &call,
                    stream,
                    dst,
                    base + offsets[s] as u64,
                    recv_rows[s] * row_bytes,
                )?;
            }
        }
        self.write_headers(
            &call,
            st,
            at(addr(&staged, stream), header_sec),
            l.combine_headers,
        )?;
        call.mark("write rows and headers to peers");
        barrier(&call, st, deadline)?;
        call.mark("barrier (host group)");
        st.pending = Some(Area::Combine);
        let headers = self.read_headers(&call, st, l.combine_headers, deadline)?;
        call.mark("headers to host");
        let (recv_rows, sent_rows, _, partial) = local?;
        drop(partial);
        check_all(&call, &headers, &ours)?;
        check_rows(&call, &headers, sent_rows, recv_rows)?;
        token_sums(&call, dispatched, st.base(me, me) + l.combine_area as u64)
    }
}

/// The parameters fixed by the workspace: top-k, the slot count and the element size.
fn check_config(
    call: &Call<'_>,
    p: &Prepared,
    top_k: usize,
    placement: &ExpertPlacement,
    ws: &Workspace,
) -> Result<(), CudaAll2AllError> {
    let cfg = ws.config();
    for (field, was, now) in [
        ("top-k", cfg.top_k, top_k),
        ("expert count", cfg.num_experts, placement.num_physical()),
        ("element size", cfg.elem_bytes, p.elem.bytes()),
    ] {
        if was != now {
            return Err(call.tokens(format!(
                "the one-sided workspace is built for {field} {was}, this call has {now}"
            )));
        }
    }
    Ok(())
}
