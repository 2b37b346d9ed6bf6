//! The kernels that build dispatch tables on the GPU (`tables.cu`, shipped as `tables.ptx`):
//! the module, the layout of the buffers they fill, and their raw launches.
//!
//! Callers ([`super::cuda_tables`]) carve one device buffer per side with [`SendLayout`] or
//! [`ItemLayout`] and establish the bounds the launches rely on. See `tables.cu` for what
//! each kernel computes.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::kernels::LaunchError;

/// The PTX text of `tables.cu`.
const PTX: &str = include_str!("tables.ptx");

/// Threads per block of the grid-stride kernels and of the place kernels (4 warps, one
/// chunk each).
const BLOCK: u32 = 128;
/// Threads of the one-block scan (`msh_scan` keeps one word per thread in shared memory).
const SCAN_BLOCK: u32 = 1024;
/// Most blocks of a grid-stride launch.
const MAX_GRID: usize = 4096;
/// Picks per chunk unless the counts would grow past the limits below (a multiple of 32:
/// the place kernels walk a chunk 32 picks at a time).
const CHUNK: usize = 256;
/// Most chunks of one sort.
const MAX_CHUNKS: usize = 4096;
/// Most (bucket, chunk) counts of one sort.
const MAX_CELLS: usize = 1 << 22;

/// Byte offsets are multiples of this.
const ALIGN: usize = 16;

/// How a bucket sort of `picks` picks walks them: `chunks` chunks of `chunk` picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunking {
    pub chunk: u32,
    pub chunks: u32,
    pub buckets: u32,
}

impl Chunking {
    /// The chunking of `picks` picks into `buckets` buckets: [`CHUNK`] picks per chunk, more
    /// when there would be more than [`MAX_CHUNKS`] chunks or [`MAX_CELLS`] counts.
    pub(crate) fn new(picks: usize, buckets: usize) -> Result<Self, LaunchError> {
        let too_large = |what, value| LaunchError::TooLarge { what, value };
        if buckets == 0 || buckets > MAX_CELLS {
            return Err(too_large("buckets of a table sort", buckets));
        }
        u32::try_from(picks).map_err(|_| too_large("picks of a table sort", picks))?;
        let most_chunks = MAX_CHUNKS.min(MAX_CELLS / buckets).max(1);
        let mut chunk = CHUNK;
        while picks.div_ceil(chunk) > most_chunks {
            chunk *= 2;
        }
        let chunks = picks.div_ceil(chunk).max(1);
        Ok(Self {
            chunk: u32::try_from(chunk).map_err(|_| too_large("picks per chunk", chunk))?,
            chunks: chunks as u32,
            buckets: buckets as u32,
        })
    }

    /// Bytes of the count matrix.
    pub(crate) fn count_bytes(&self) -> usize {
        self.chunks as usize * self.buckets as usize * 4
    }
}

/// Hands out aligned byte ranges of one buffer.
#[derive(Debug, Default)]
struct Carve {
    len: usize,
}

impl Carve {
    fn take(&mut self, bytes: usize) -> usize {
        let at = self.len.next_multiple_of(ALIGN);
        self.len = at + bytes;
        at
    }
}

/// Byte offsets of the send-side buffer of one dispatch: `tokens` tokens of `top_k` picks
/// split over `size` ranks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendLayout {
    pub tokens: usize,
    pub top_k: usize,
    pub size: usize,
    pub sort: Chunking,
    /// Most rows sent: `tokens × min(size, top_k)`.
    pub max_rows: usize,
    /// Smallest `(pick << 32) | expert` of an unknown expert (u64, all ones when none).
    pub err: usize,
    /// Per destination, its first row (u32, `size + 1`), right after `err`.
    pub bucket_offsets: usize,
    /// Physical slot per pick (u32).
    pub slots: usize,
    pub counts: usize,
    pub chunk_base: usize,
    /// Token of every sent row (u32, `max_rows`).
    pub send_index: usize,
    /// Pick entries of every sent row (u64, `max_rows × top_k`).
    pub send_meta: usize,
    /// Per token, its first returned row in `token_rows` (u32, `tokens + 1`).
    pub token_offsets: usize,
    pub token_rows: usize,
    pub len: usize,
}

impl SendLayout {
    pub(crate) fn new(tokens: usize, top_k: usize, size: usize) -> Result<Self, LaunchError> {
        let picks = tokens.checked_mul(top_k).ok_or(LaunchError::TooLarge {
            what: "picks of a batch",
            value: tokens,
        })?;
        let sort = Chunking::new(picks, size)?;
        let max_rows = tokens * size.min(top_k);
        let mut c = Carve::default();
        Ok(Self {
            tokens,
            top_k,
            size,
            sort,
            max_rows,
            // The error word and the row offsets first: the host copies just those two.
            err: c.take(8),
            bucket_offsets: c.take((size + 1) * 4),
            slots: c.take(picks * 4),
            counts: c.take(sort.count_bytes()),
            chunk_base: c.take((sort.chunks as usize + 1) * 4),
            send_index: c.take(max_rows * 4),
            send_meta: c.take(max_rows * top_k * 8),
            token_offsets: c.take((tokens + 1) * 4),
            token_rows: c.take(max_rows * 4),
            len: c.len.max(1),
        })
    }
}

impl SendLayout {
    /// Bytes from the error word to the end of the per-destination row offsets: what the host
    /// copies after routing.
    pub(crate) fn outcome_len(&self) -> usize {
        self.bucket_offsets + (self.size + 1) * 4 - self.err
    }

    /// Reads the [`outcome_len`](Self::outcome_len) bytes copied from the error word on: the
    /// first unknown pick as `(token, k, expert)`, or the rows sent to every destination.
    pub(crate) fn outcome(&self, bytes: &[u8]) -> Result<Vec<usize>, (usize, usize, u32)> {
        let word = |at: usize| {
            bytes
                .get(at..at + 4)
                .map_or(0, |w| u32::from_le_bytes(w.try_into().unwrap_or([0; 4])))
        };
        unknown_pick(bytes, self.top_k)?;
        let offset = |d: usize| word(self.bucket_offsets - self.err + d * 4);
        Ok((0..self.size)
            .map(|d| offset(d + 1).saturating_sub(offset(d)) as usize)
            .collect())
    }
}

/// The pick named by the routing error word (see [`SendLayout::err`]), the first 8 bytes of
/// `bytes`, as `(token, k, expert)`; nothing when it is all ones (every pick routed).
fn unknown_pick(bytes: &[u8], top_k: usize) -> Result<(), (usize, usize, u32)> {
    let err = bytes
        .get(..8)
        .map_or(0, |w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
    if err == u64::MAX {
        return Ok(());
    }
    let pick = (err >> 32) as usize;
    let top_k = top_k.max(1);
    Err((pick / top_k, pick % top_k, err as u32))
}

/// Byte offsets of the buffer of a dispatch that sends every token to every rank (gather /
/// reduce-scatter): `tokens` tokens of `top_k` picks, gathered by `size` ranks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteLayout {
    pub tokens: usize,
    pub top_k: usize,
    pub size: usize,
    /// As [`SendLayout::err`].
    pub err: usize,
    /// Physical slot per pick (u32).
    pub slots: usize,
    /// Entry of every pick (u64, `tokens × top_k`): what travels with the rows.
    pub meta: usize,
    /// Per token, its first returned row in `token_rows` (u32, `tokens + 1`): token `t`
    /// sums row `t` of each of the `size` returned blocks.
    pub token_offsets: usize,
    pub token_rows: usize,
    pub len: usize,
}

impl RouteLayout {
    pub(crate) fn new(tokens: usize, top_k: usize, size: usize) -> Result<Self, LaunchError> {
        let too_large = |what, value| LaunchError::TooLarge { what, value };
        let picks = tokens
            .checked_mul(top_k)
            .filter(|&p| u32::try_from(p).is_ok())
            .ok_or(too_large("picks of a batch", tokens))?;
        // `msh_strided` counts to `tokens × size` inclusive in u32.
        let returned = tokens
            .checked_mul(size)
            .filter(|&r| r < u32::MAX as usize)
            .ok_or(too_large("rows returned to a batch", tokens))?;
        let mut c = Carve::default();
        Ok(Self {
            tokens,
            top_k,
            size,
            err: c.take(8),
            slots: c.take(picks * 4),
            meta: c.take(picks * 8),
            token_offsets: c.take((tokens + 1) * 4),
            token_rows: c.take(returned * 4),
            len: c.len.max(1),
        })
    }

    /// Reads the error word (8 bytes, copied from [`Self::err`]): the first unknown pick as
    /// `(token, k, expert)`, if any.
    pub(crate) fn outcome(&self, bytes: &[u8]) -> Result<(), (usize, usize, u32)> {
        unknown_pick(bytes, self.top_k)
    }
}

/// Byte offsets of the receive-side buffer of one dispatch: `rows` received rows of `top_k`
/// pick entries, sorted into `slots_per_rank` local slots.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ItemLayout {
    pub rows: usize,
    pub top_k: usize,
    pub sort: Chunking,
    /// Smallest `(pick << 32) | slot` of a malformed entry (u64, all ones when none).
    pub err: usize,
    /// Per local slot, its first item (u32, `slots_per_rank + 1`).
    pub slot_offsets: usize,
    pub counts: usize,
    pub chunk_base: usize,
    /// Per item (at most one per pick): its row (u32) and its weight (f32).
    pub item_rows: usize,
    pub item_weights: usize,
    /// Per received row, its first entry in `row_items` (u32, `rows + 1`).
    pub row_offsets: usize,
    pub row_items: usize,
    pub row_weights: usize,
    pub len: usize,
}

impl ItemLayout {
    pub(crate) fn new(
        rows: usize,
        top_k: usize,
        slots_per_rank: usize,
    ) -> Result<Self, LaunchError> {
        let picks = rows.checked_mul(top_k).ok_or(LaunchError::TooLarge {
            what: "received picks",
            value: rows,
        })?;
        let sort = Chunking::new(picks, slots_per_rank)?;
        let mut c = Carve::default();
        let err = c.take(8);
        let slot_offsets = c.take((slots_per_rank + 1) * 4);
        let item_rows = c.take(picks * 4);
        let item_weights = c.take(picks * 4);
        Ok(Self {
            rows,
            top_k,
            sort,
            err,
            slot_offsets,
            counts: c.take(sort.count_bytes()),
            chunk_base: c.take((sort.chunks as usize + 1) * 4),
            item_rows,
            item_weights,
            row_offsets: c.take((rows + 1) * 4),
            row_items: c.take(picks * 4),
            row_weights: c.take(picks * 4),
            len: c.len.max(1),
        })
    }

    /// Received picks.
    pub(crate) fn picks(&self) -> usize {
        self.rows * self.top_k
    }
}

/// The placement as the routing kernels read it: device addresses of its tables.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DevicePlacement {
    pub num_logical: u32,
    pub num_physical: u32,
    pub slots_per_rank: u32,
    /// `num_logical + 1` u32: logical expert `e`'s replicas are `rep_slots[rep_start[e]..
    /// rep_start[e + 1]]`.
    pub rep_start: u64,
    pub rep_slots: u64,
    /// `num_physical` u32: the logical expert of every slot, `u32::MAX` for an empty one.
    pub phys_logical: u64,
}

/// A batch's router output on the GPU: `tokens × top_k` expert ids (u32) and weights (f32)
/// at device addresses.
#[derive(Debug, Clone, Copy)]
struct Picked {
    ids: u64,
    weights: u64,
    tokens: usize,
    top_k: usize,
}

/// Where a header's fields lie, for `msh_fill_headers`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeaderFields {
    /// Bytes per header.
    pub len: usize,
    /// Byte offset of the row count (u64).
    pub rows_at: usize,
    /// Byte offset of the status (u32).
    pub status_at: usize,
    /// The status of a rejected batch.
    pub rejected: u32,
}

/// The module and its functions, for one CUDA context.
#[derive(Debug)]
pub(crate) struct TableKernels {
    route: CudaFunction,
    split_count: CudaFunction,
    scan: CudaFunction,
    split_place: CudaFunction,
    items_count: CudaFunction,
    items_place: CudaFunction,
    fill_headers: CudaFunction,
    strided: CudaFunction,
}

fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).clamp(1, MAX_GRID) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per chunk.
fn per_chunk(sort: &Chunking) -> LaunchConfig {
    let warps = BLOCK / 32;
    LaunchConfig {
        grid_dim: (sort.chunks.div_ceil(warps), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn one_block(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl TableKernels {
    /// Loads the PTX into `ctx` (the driver JIT-compiles it for the device).
    pub(crate) fn load(ctx: &Arc<CudaContext>) -> Result<Self, DriverError> {
        let module = ctx.load_module(Ptx::from_src(PTX))?;
        Ok(Self {
            route: module.load_function("msh_route")?,
            split_count: module.load_function("msh_split_count")?,
            scan: module.load_function("msh_scan")?,
            split_place: module.load_function("msh_split_place")?,
            items_count: module.load_function("msh_items_count")?,
            items_place: module.load_function("msh_items_place")?,
            fill_headers: module.load_function("msh_fill_headers")?,
            strided: module.load_function("msh_strided")?,
        })
    }

    /// Routes, splits by destination and lays out the returned rows of one batch, into the
    /// buffer at `buf` laid out as `l`: `msh_route`, `msh_split_count`, `msh_scan`,
    /// `msh_split_place`.
    ///
    /// # Safety
    /// `ids` and `weights` hold `l.tokens × l.top_k` u32 / f32, `p` describes live tables
    /// whose replica slots are below `p.num_physical`, `buf` holds `l.len` bytes with its
    /// `err` word all ones and its counts zeroed; all device memory of this context, alive
    /// and not written by other work until the kernels finished (stream order).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn route_and_split(
        &self,
        stream: &CudaStream,
        l: &SendLayout,
        buf: u64,
        ids: u64,
        weights: u64,
        me: usize,
        p: &DevicePlacement,
    ) -> Result<(), LaunchError> {
        let picks = (l.tokens * l.top_k) as u32;
        let top_k = fit("top-k", l.top_k)?;
        let size = fit("ranks", l.size)?;
        let at = |offset: usize| buf + offset as u64;
        let (err, slots, counts) = (at(l.err), at(l.slots), at(l.counts));
        let (bucket_offsets, chunk_base) = (at(l.bucket_offsets), at(l.chunk_base));
        let (send_index, send_meta) = (at(l.send_index), at(l.send_meta));
        let (token_offsets, token_rows) = (at(l.token_offsets), at(l.token_rows));
        let spr = p.slots_per_rank;
        let (chunk, chunks) = (l.sort.chunk, l.sort.chunks);
        if picks > 0 {
            let picked = Picked {
                ids,
                weights,
                tokens: l.tokens,
                top_k: l.top_k,
            };
            // SAFETY: the caller's contract; `slots` holds a u32 per pick, `err` a u64.
            unsafe { self.route(stream, &picked, me, p, slots, 0, err) }?;
            let mut b = stream.launch_builder(&self.split_count);
            b.arg(&slots)
                .arg(&picks)
                .arg(&top_k)
                .arg(&spr)
                .arg(&size)
                .arg(&chunk)
                .arg(&chunks)
                .arg(&counts);
            // SAFETY: as above, for `msh_split_count`.
            unsafe { b.launch(grid_stride(picks as usize)) }?;
        }
        // SAFETY: `counts` holds `size × chunks` words, the offsets `size + 1` and
        // `chunks + 1`.
        unsafe { self.scan(stream, counts, &l.sort, bucket_offsets, chunk_base) }?;
        let mut b = stream.launch_builder(&self.split_place);
        b.arg(&slots)
            .arg(&weights)
            .arg(&picks)
            .arg(&top_k)
            .arg(&spr)
            .arg(&size)
            .arg(&chunk)
            .arg(&chunks)
            .arg(&counts)
            .arg(&chunk_base)
            .arg(&send_index)
            .arg(&send_meta)
            .arg(&token_offsets)
            .arg(&token_rows);
        // SAFETY: as above, for `msh_split_place`: it writes at most `max_rows` rows (each
        // token goes to at most `min(size, top_k)` ranks) and `tokens + 1` offsets.
        unsafe { b.launch(per_chunk(&l.sort)) }?;
        Ok(())
    }

    /// Routes every pick of `picked` and writes its entry, then the segment lists of the
    /// final sum after a reduce-scatter, into the buffer at `buf` laid out as `l`:
    /// `msh_route`, `msh_strided`.
    ///
    /// # Safety
    /// `ids` and `weights` hold `l.tokens × l.top_k` u32 / f32, `p` describes live tables
    /// whose replica slots are below `p.num_physical`, `buf` holds `l.len` bytes with its
    /// `err` word all ones; all device memory of this context, alive and not written by
    /// other work until the kernels finished (stream order).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn route_all(
        &self,
        stream: &CudaStream,
        l: &RouteLayout,
        buf: u64,
        ids: u64,
        weights: u64,
        me: usize,
        p: &DevicePlacement,
    ) -> Result<(), LaunchError> {
        let at = |offset: usize| buf + offset as u64;
        let picked = Picked {
            ids,
            weights,
            tokens: l.tokens,
            top_k: l.top_k,
        };
        if l.tokens * l.top_k > 0 {
            // SAFETY: the caller's contract; the layout holds a slot and an entry per pick
            // and the error word.
            unsafe { self.route(stream, &picked, me, p, at(l.slots), at(l.meta), at(l.err)) }?;
        }
        let tokens = fit("tokens", l.tokens)?;
        let size = fit("ranks", l.size)?;
        let (token_offsets, token_rows) = (at(l.token_offsets), at(l.token_rows));
        let mut b = stream.launch_builder(&self.strided);
        b.arg(&token_offsets)
            .arg(&token_rows)
            .arg(&tokens)
            .arg(&size);
        // SAFETY: the arguments match `msh_strided`'s parameters; the layout holds
        // `tokens + 1` offsets and `tokens × size` rows (`RouteLayout::new` keeps that
        // below `u32::MAX`).
        unsafe { b.launch(grid_stride(l.tokens * l.size + 1)) }?;
        Ok(())
    }

    /// `msh_route` over the picks of `picked`: each pick's slot into `slots`, its entry into
    /// `meta` unless that is 0, the first unknown pick into `err`.
    ///
    /// # Safety
    /// As [`Self::route_all`]: `slots` holds a u32 per pick, `meta` (when not 0) a u64 per
    /// pick, `err` one u64.
    #[allow(clippy::too_many_arguments)]
    unsafe fn route(
        &self,
        stream: &CudaStream,
        picked: &Picked,
        me: usize,
        p: &DevicePlacement,
        slots: u64,
        meta: u64,
        err: u64,
    ) -> Result<(), LaunchError> {
        let n = picked.tokens.saturating_mul(picked.top_k);
        let picks = fit("picks of a batch", n)?;
        let top_k = fit("top-k", picked.top_k)?;
        let me = fit("rank", me)?;
        let mut b = stream.launch_builder(&self.route);
        b.arg(&picked.ids)
            .arg(&picked.weights)
            .arg(&picks)
            .arg(&top_k)
            .arg(&me)
            .arg(&p.num_logical)
            .arg(&p.rep_start)
            .arg(&p.rep_slots)
            .arg(&slots)
            .arg(&meta)
            .arg(&err);
        // SAFETY: the arguments match `msh_route`'s parameters; memory is the caller's.
        unsafe { b.launch(grid_stride(n)) }?;
        Ok(())
    }

    /// Writes the `size` headers at `headers` (`fields` say where their row count and
    /// status lie): every destination's row count from the `size + 1` row offsets at
    /// `offsets` (left alone when `offsets` is 0), and the rejected status when the routing
    /// error word at `err` is set.
    ///
    /// # Safety
    /// `headers` holds `size` headers of `fields.len` bytes (8-byte aligned), `offsets` (when
    /// not 0) `size + 1` u32 and `err` a u64; all alive until the kernel finished.
    pub(crate) unsafe fn fill_headers(
        &self,
        stream: &CudaStream,
        headers: u64,
        size: usize,
        fields: &HeaderFields,
        offsets: u64,
        err: u64,
    ) -> Result<(), LaunchError> {
        let size = fit("ranks", size)?;
        let (header_len, rows_at, status_at) = (
            fit("header bytes", fields.len)?,
            fit("header field", fields.rows_at)?,
            fit("header field", fields.status_at)?,
        );
        let mut b = stream.launch_builder(&self.fill_headers);
        b.arg(&headers)
            .arg(&size)
            .arg(&header_len)
            .arg(&rows_at)
            .arg(&status_at)
            .arg(&fields.rejected)
            .arg(&offsets)
            .arg(&err);
        // SAFETY: the arguments match `msh_fill_headers`'s parameters; memory is the
        // caller's.
        unsafe { b.launch(one_block(1)) }?;
        Ok(())
    }

    /// Turns the received pick entries at `meta` into the work items and row lists of rank
    /// `me`, into the buffer at `buf` laid out as `l`: `msh_items_count`, `msh_scan`,
    /// `msh_items_place`. Entries of other ranks' slots are skipped with `skip_foreign`,
    /// malformed otherwise.
    ///
    /// # Safety
    /// `meta` holds `l.rows × l.top_k` u64 entries, `p.phys_logical` `p.num_physical` u32,
    /// `buf` `l.len` bytes with its `err` word all ones and its counts zeroed; all device
    /// memory of this context, alive and not written by other work until the kernels
    /// finished.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn items(
        &self,
        stream: &CudaStream,
        l: &ItemLayout,
        buf: u64,
        meta: u64,
        me: usize,
        p: &DevicePlacement,
        skip_foreign: bool,
    ) -> Result<(), LaunchError> {
        let picks = fit("received picks", l.picks())?;
        let top_k = fit("top-k", l.top_k)?;
        let me = fit("rank", me)?;
        let skip = u32::from(skip_foreign);
        let at = |offset: usize| buf + offset as u64;
        let (err, counts) = (at(l.err), at(l.counts));
        let (slot_offsets, chunk_base) = (at(l.slot_offsets), at(l.chunk_base));
        let (item_rows, item_weights) = (at(l.item_rows), at(l.item_weights));
        let (row_offsets, row_items, row_weights) =
            (at(l.row_offsets), at(l.row_items), at(l.row_weights));
        let (chunk, chunks) = (l.sort.chunk, l.sort.chunks);
        if picks > 0 {
            let mut b = stream.launch_builder(&self.items_count);
            b.arg(&meta)
                .arg(&picks)
                .arg(&me)
                .arg(&p.slots_per_rank)
                .arg(&p.num_physical)
                .arg(&p.phys_logical)
                .arg(&skip)
                .arg(&chunk)
                .arg(&chunks)
                .arg(&counts)
                .arg(&err);
            // SAFETY: the arguments match `msh_items_count`'s parameters; memory is the
            // caller's.
            unsafe { b.launch(grid_stride(picks as usize)) }?;
        }
        // SAFETY: `counts` holds `slots_per_rank × chunks` words, the offsets
        // `slots_per_rank + 1` and `chunks + 1`.
        unsafe { self.scan(stream, counts, &l.sort, slot_offsets, chunk_base) }?;
        if l.top_k == 0 {
            return Ok(());
        }
        let mut b = stream.launch_builder(&self.items_place);
        b.arg(&meta)
            .arg(&picks)
            .arg(&top_k)
            .arg(&me)
            .arg(&p.slots_per_rank)
            .arg(&p.num_physical)
            .arg(&p.phys_logical)
            .arg(&skip)
            .arg(&chunk)
            .arg(&chunks)
            .arg(&counts)
            .arg(&chunk_base)
            .arg(&item_rows)
            .arg(&item_weights)
            .arg(&row_offsets)
            .arg(&row_items)
            .arg(&row_weights);
        // SAFETY: as above, for `msh_items_place`: at most one item per pick, `rows + 1`
        // offsets.
        unsafe { b.launch(per_chunk(&l.sort)) }?;
        Ok(())
    }

    /// `msh_scan` over the count matrix at `counts`.
    ///
    /// # Safety
    /// `counts` holds `sort.buckets × sort.chunks` u32, `bucket_offsets` `buckets + 1` and
    /// `chunk_base` `chunks + 1`, alive until the kernel finished.
    unsafe fn scan(
        &self,
        stream: &CudaStream,
        counts: u64,
        sort: &Chunking,
        bucket_offsets: u64,
        chunk_base: u64,
    ) -> Result<(), LaunchError> {
        let mut b = stream.launch_builder(&self.scan);
        b.arg(&counts)
            .arg(&sort.buckets)
            .arg(&sort.chunks)
            .arg(&bucket_offsets)
            .arg(&chunk_base);
        // SAFETY: the arguments match `msh_scan`'s parameters; memory is the caller's.
        unsafe { b.launch(one_block(SCAN_BLOCK)) }?;
        Ok(())
    }
}

fn fit(what: &'static str, value: usize) -> Result<u32, LaunchError> {
    u32::try_from(value).map_err(|_| LaunchError::TooLarge { what, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_keeps_counts_bounded() {
        let c = Chunking::new(32_768, 2).unwrap();
        assert_eq!((c.chunk, c.chunks), (256, 128));
        let c = Chunking::new(0, 4).unwrap();
        assert_eq!(c.chunks, 1);
        // Many buckets: fewer, larger chunks.
        let c = Chunking::new(1 << 24, 4096).unwrap();
        assert!(c.chunks as usize * 4096 <= MAX_CELLS, "{c:?}");
        assert!(c.chunk as usize * c.chunks as usize >= 1 << 24);
        assert_eq!(c.chunk % 32, 0);
        assert!(Chunking::new(10, 0).is_err());
        assert!(Chunking::new(10, MAX_CELLS + 1).is_err());
    }

    #[test]
    fn layouts_are_aligned_and_disjoint() {
        let l = SendLayout::new(4096, 8, 8).unwrap();
        let mut parts = [
            (l.err, 8),
            (l.slots, 4096 * 8 * 4),
            (l.counts, l.sort.count_bytes()),
            (l.bucket_offsets, 9 * 4),
            (l.chunk_base, (l.sort.chunks as usize + 1) * 4),
            (l.send_index, l.max_rows * 4),
            (l.send_meta, l.max_rows * 8 * 8),
            (l.token_offsets, 4097 * 4),
            (l.token_rows, l.max_rows * 4),
        ];
        parts.sort();
        for w in parts.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{parts:?}");
        }
        assert!(parts.iter().all(|&(at, _)| at % ALIGN == 0));
        assert!(parts.last().map(|&(a, b)| a + b) <= Some(l.len));
        assert_eq!(l.max_rows, 4096 * 8);
        // The host copies the error word and the row offsets, not the per-pick slots.
        assert!(l.outcome_len() <= 2 * ALIGN + 9 * 4, "{}", l.outcome_len());

        // What the host reads back: the error word, then the row offsets.
        let mut bytes = vec![0u8; l.outcome_len()];
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        for (d, o) in [0u32, 3, 3, 10, 11, 11, 12, 20, 25].iter().enumerate() {
            let at = l.bucket_offsets - l.err + d * 4;
            bytes[at..at + 4].copy_from_slice(&o.to_le_bytes());
        }
        assert_eq!(l.outcome(&bytes), Ok(vec![3, 0, 7, 1, 0, 1, 8, 5]));
        // Pick 8 · 5 + 3 (token 5, k 3) names expert 300.
        bytes[..8].copy_from_slice(&((43u64 << 32) | 300).to_le_bytes());
        assert_eq!(l.outcome(&bytes), Err((5, 3, 300)));

        let i = ItemLayout::new(1000, 4, 36).unwrap();
        assert!(i.item_weights >= i.item_rows + 4000 * 4);
        assert!(i.len >= i.row_weights + 4000 * 4);
    }
}
