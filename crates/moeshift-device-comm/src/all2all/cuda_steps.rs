//! Steps the CUDA managers share: the headers of a call and their exchange over NCCL,
//! moving blocks between ranks (NCCL for peers, a copy on the side stream for the rank
//! itself), building a [`CudaDispatched`] from the received pick metadata, the combine
//! checks, the two reductions of combine, and the whole combine of the NCCL managers.

use std::sync::Arc;

use cudarc::driver::{result, CudaSlice, CudaStream, CudaView, DevicePtrMut, DeviceSlice};
use moeshift_sync::Deadline;

use super::cuda::{
    addr, alloc_bytes, check_all, count_load, elem_of, exchange_headers, Call, CudaTokens, Engine,
    Prepared, Section, Staging,
};
use super::cuda_dispatched::{CudaDispatched, CudaRoute, Tables};
use super::cuda_error::CudaAll2AllError;
use super::cuda_tables::{Foreign, ItemTables, RouteTables, SendTables};
use super::cuda_wire::{DeviceHeader, COMBINE, DISPATCH, HEADER_FIELDS};
use super::error::All2AllError;
use super::placement::ExpertPlacement;
use super::table_kernels::DevicePlacement;
use super::wire::STATUS_OK;
use crate::nccl::P2pOp;

/// One transfer between this rank and a peer: `send` bytes at a device address go to the
/// peer, `recv` bytes from the peer land at a device address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Block {
    pub send: (u64, usize),
    pub recv: (u64, usize),
}

/// Moves `blocks[p]` for every group rank `p`: NCCL grouped sends and receives with the
/// peers, and copies on the side stream for this rank's own blocks (overlapping the NCCL
/// transfers). Every address is device memory of this rank's GPU, ordered on the
/// communicator's stream, alive until this returns.
pub(crate) fn exchange_blocks(
    call: &Call<'_>,
    engine: &Engine,
    blocks: &[Vec<Block>],
    deadline: Deadline,
) -> Result<(), CudaAll2AllError> {
    let comm = call.comm;
    let me = comm.rank();
    let stream = comm.stream();
    let own = blocks.get(me).map(Vec::as_slice).unwrap_or_default();
    // This rank's own blocks are checked before anything is queued. A failure here or in
    // the local copies still takes part in the exchange with the peers (whose blocks are
    // consistent), so they are not left waiting for their deadline.
    let mut own_result = match own.iter().find(|b| b.send.1 != b.recv.1) {
        Some(b) => Err(call.malformed(
            me,
            format!(
                "this rank sends itself {} bytes but expects {}",
                b.send.1, b.recv.1
            ),
        )),
        None => Ok(()),
    };
    let local = own_result.is_ok() && own.iter().any(|b| b.send.1 > 0);
    if local {
        own_result = engine
            .side
            .join(stream)
            .map_err(call.cuda("cuStreamWaitEvent"));
    }
    let copying = local && own_result.is_ok();
    if copying {
        for b in own.iter().filter(|b| b.send.1 > 0) {
            // SAFETY: both ranges are device memory of this context that the caller keeps
            // alive and unused by other work until the side stream is joined below.
            own_result = unsafe {
                result::memcpy_dtod_async(b.recv.0, b.send.0, b.send.1, engine.side.cu_stream())
            }
            .map_err(call.cuda("cuMemcpyDtoDAsync"));
            if own_result.is_err() {
                break;
            }
        }
    }
    let mut ops: Vec<P2pOp<'static>> = Vec::new();
    for (peer, list) in blocks.iter().enumerate() {
        if peer == me {
            continue;
        }
        for b in list {
            // SAFETY: the caller guarantees the memory (see above); earlier writes are on
            // the communicator's stream.
            ops.push(unsafe { P2pOp::send_raw(peer, b.send.0, b.send.1) });
        }
        for b in list {
            // SAFETY: as above, and nothing else reads or writes the receive ranges.
            ops.push(unsafe { P2pOp::recv_raw(peer, b.recv.0, b.recv.1) });
        }
    }
    let sent = comm.grouped(&ops, deadline).map_err(call.nccl());
    if copying {
        // Later work on the stream (and the frees of these buffers) waits for the copies,
        // on every path: the caller frees the buffers as soon as this returns. Should the
        // join itself fail, wait for the copies on the host instead (with the deadline).
        if let Err(e) = stream.join(&engine.side) {
            let waited = call.wait(&engine.side, "the local copies", deadline);
            own_result = own_result
                .and(Err::<(), _>(call.cuda("cuStreamWaitEvent")(e)))
                .and(waited);
        }
    }
    call.mark("row exchange (NCCL)");
    own_result.and(sent)
}

/// What a dispatch received, to be turned into a [`CudaDispatched`].
pub(crate) struct Arrived {
    /// The received rows, `rows_from` rows per source in rank order.
    pub rows: CudaSlice<u8>,
    pub rows_from: Vec<usize>,
    /// Where their pick metadata is on this rank's GPU: `(address, bytes)`, in rank order.
    pub meta: Vec<(u64, usize)>,
    pub foreign: Foreign,
    pub route: CudaRoute,
}

/// The send side of a dispatch, on the GPU: where it left the segment lists of the final
/// sum and the routed picks the load hook counts.
#[derive(Debug)]
pub(crate) enum SendSide {
    /// Split by destination (all-to-all-v, one-sided).
    Split(SendTables),
    /// Every token to every rank (gather / reduce-scatter).
    Gathered(RouteTables),
}

impl SendSide {
    /// `(token_offsets, token_rows, slots)` addresses, and the buffer holding them.
    fn parts(self) -> ((u64, u64, u64), CudaSlice<u8>) {
        match self {
            Self::Split(t) => {
                let l = &t.layout;
                let a = (t.at(l.token_offsets), t.at(l.token_rows), t.at(l.slots));
                (a, t.buf)
            }
            Self::Gathered(t) => {
                let l = &t.layout;
                let a = (t.at(l.token_offsets), t.at(l.token_rows), t.at(l.slots));
                (a, t.buf)
            }
        }
    }
}

/// Turns the received pick metadata into work items on the GPU (copied to the host once),
/// keeps the tables combine needs (the segment lists of the final sum from `send`), queues
/// the load hook, and builds the result of dispatching `tokens` (checked as `p`) with
/// `placement` (its tables on the GPU: `dev`).
///
/// # Safety
/// The metadata ranges of `arrived` are device memory of this rank's GPU, ordered on the
/// communicator's stream, alive and unchanged until this returns; `dev` describes live
/// tables of `placement`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn finish_dispatch(
    call: &Call<'_>,
    engine: &Engine,
    placement: &ExpertPlacement,
    dev: &DevicePlacement,
    tokens: &CudaTokens<'_>,
    p: &Prepared,
    arrived: Arrived,
    send: SendSide,
    load: Option<&mut CudaSlice<i64>>,
    deadline: Deadline,
) -> Result<CudaDispatched, CudaAll2AllError> {
    let stream = call.comm.stream();
    let top_k = tokens.top_k;
    // Row indices travel as `u32` in the tables.
    let num_rows = arrived
        .rows_from
        .iter()
        .fold(0usize, |sum, &r| sum.saturating_add(r));
    if u32::try_from(num_rows.saturating_mul(top_k)).is_err() {
        return Err(call.too_large("received picks", num_rows.saturating_mul(top_k)));
    }
    // The kernels read the metadata as one array.
    let (meta, _gathered) = match arrived.meta.as_slice() {
        [(at, _)] => (*at, None),
        parts => {
            let len = parts.iter().map(|&(_, l)| l).sum();
            let buf = alloc_bytes(call, stream, len)?;
            let base = addr(&buf, stream);
            let mut at = base;
            for &(src, l) in parts {
                if l > 0 {
                    // SAFETY: `src..src + l` is live device memory (the caller's contract),
                    // `buf` holds every part; stream order keeps `buf` alive for the copy.
                    unsafe { result::memcpy_dtod_async(at, src, l, stream.cu_stream()) }
                        .map_err(call.cuda("cuMemcpyDtoDAsync"))?;
                }
                at += l as u64;
            }
            (base, Some(buf))
        }
    };
    // SAFETY: `meta` holds `num_rows × top_k` entries (the caller's contract, or gathered
    // above), alive until this returns; `dev` is the caller's contract.
    let items =
        unsafe { ItemTables::build(call, engine, meta, num_rows, top_k, dev, arrived.foreign) }?;
    call.mark("work items (launch)");

    // The segment lists and the picks to count.
    let picks = p.n * top_k;
    let ((token_offsets, token_rows, slots), send_buf) = send.parts();
    if let Some(counter) = load {
        count_load(call, &engine.kernels, counter, slots, picks)?;
    }
    let host = items.to_host(call, placement, &arrived.rows_from, deadline)?;
    let tables = Tables {
        row_offsets: items.at(items.layout.row_offsets),
        row_items: items.at(items.layout.row_items),
        row_weights: items.at(items.layout.row_weights),
        item_rows: items.at(items.layout.item_rows),
        token_offsets,
        token_rows,
    };
    Ok(CudaDispatched {
        manager: call.manager,
        manager_id: engine.id,
        rank: call.me(),
        device: call.device(),
        layer: call.layer,
        hidden_size: tokens.hidden_size,
        dtype: tokens.dtype,
        elem: p.elem,
        row_bytes: p.row_bytes,
        rows: arrived.rows,
        num_rows,
        items: host.items,
        slot_offsets: host.slot_offsets,
        buffers: vec![send_buf, items.buf],
        tables,
        num_local_tokens: p.n,
        route: arrived.route,
        kernels: engine.kernels.clone(),
    })
}

/// Queues `route` (this rank's routing on the GPU), then fills in the `size` dispatch
/// headers staged at `headers` from the routed tables: the row counts from the
/// per-destination offsets and the status from the routing error word, at the addresses
/// `words` returns (`(offsets or 0 to leave the counts, error word)`). When routing or the
/// fill fails on this rank, the headers become rejections, so its peers fail with it at
/// the header exchange instead of waiting for their deadline; the failure is returned
/// inside, for after the exchange. The outer error: not even the rejection could be
/// written.
///
/// # Safety
/// `headers` holds `size` headers of [`DeviceHeader::LEN`] bytes, 16-byte aligned device
/// memory of this rank's GPU, and the addresses `words` returns lie in the routed tables;
/// all ordered on the communicator's stream and alive until the exchange.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn route_into_headers<T>(
    call: &Call<'_>,
    engine: &Engine,
    headers: u64,
    size: usize,
    manager: u8,
    seq: u32,
    deadline: Deadline,
    route: impl FnOnce() -> Result<T, CudaAll2AllError>,
    words: impl FnOnce(&T) -> (u64, u64),
) -> Result<Result<T, CudaAll2AllError>, CudaAll2AllError> {
    let stream = call.comm.stream();
    let routed = route().and_then(|t| {
        let (offsets, err) = words(&t);
        // SAFETY: the caller's contract.
        unsafe {
            engine
                .tables
                .fill_headers(stream, headers, size, &HEADER_FIELDS, offsets, err)
        }
        .map_err(call.launch("msh_fill_headers"))?;
        Ok(t)
    });
    if routed.is_err() {
        reject_staged_headers(call, headers, size, manager, seq, deadline)?;
    }
    Ok(routed)
}

/// Overwrites the `size` dispatch headers staged at `headers` (device memory of this rank's
/// GPU, not yet exchanged) with rejections.
fn reject_staged_headers(
    call: &Call<'_>,
    headers: u64,
    size: usize,
    manager: u8,
    seq: u32,
    deadline: Deadline,
) -> Result<(), CudaAll2AllError> {
    let stream = call.comm.stream();
    let mut bytes = Vec::with_capacity(size * DeviceHeader::LEN);
    for _ in 0..size {
        DeviceHeader::rejected(DISPATCH, manager, seq).write(&mut bytes);
    }
    // SAFETY: `headers` holds `size` headers (the caller's contract); `bytes` stays alive
    // until the copy finished (waited for below, or leaked when that wait fails).
    unsafe { result::memcpy_htod_async(headers, &bytes, stream.cu_stream()) }
        .map_err(call.cuda("cuMemcpyHtoDAsync"))?;
    let copied = call.wait(stream, "the rejected headers", deadline);
    if copied.is_err() {
        std::mem::forget(bytes);
    }
    copied
}

/// The dispatch header of this rank's checked batch `p` of `tokens` routed with
/// `placement`, announcing no rows (each manager fills in its own counts).
pub(crate) fn dispatch_header(
    p: &Prepared,
    tokens: &CudaTokens<'_>,
    placement: &ExpertPlacement,
    manager: u8,
    seq: u32,
) -> DeviceHeader {
    DeviceHeader {
        magic: DISPATCH,
        status: STATUS_OK,
        tokens: p.n as u64,
        rows: 0,
        combine_offset: 0,
        hidden_size: tokens.hidden_size as u32,
        top_k: tokens.top_k as u32,
        layer: placement.layer() as u64,
        fingerprint: placement.fingerprint(),
        dtype: p.dtype_code,
        manager,
        flags: 0,
        seq,
    }
}

/// Packs this rank's rows by destination: row `index[i]` of `tokens` becomes row `i` of a
/// new buffer, for the `count` indices at device address `index`. Returns the buffer and
/// its address.
///
/// # Safety
/// `index` holds `count` `u32` row indices of `tokens`' batch, device memory ordered on the
/// communicator's stream and alive until the kernel is done (stream order).
pub(crate) unsafe fn gather_rows(
    call: &Call<'_>,
    engine: &Engine,
    tokens: &CudaTokens<'_>,
    index: u64,
    count: usize,
    row_bytes: usize,
) -> Result<(CudaSlice<u8>, u64), CudaAll2AllError> {
    let stream = call.comm.stream();
    let send = alloc_bytes(call, stream, count * row_bytes)?;
    let send_base = addr(&send, stream);
    let hidden = addr(&tokens.hidden, stream);
    // SAFETY: `send` holds one row per index and every index is a row of `hidden` (the
    // caller's contract); all alive until the kernel is done (stream order).
    unsafe {
        engine.kernels.gather_rows(
            stream.cu_stream(),
            send_base,
            hidden,
            index,
            count,
            row_bytes,
        )
    }
    .map_err(call.launch("gather_rows"))?;
    call.mark("gather rows (alloc + launch)");
    Ok((send, send_base))
}

/// Uploads `st`, whose section `headers` holds this rank's header for every rank, and
/// exchanges the headers over NCCL. Returns the upload (its other sections are the
/// caller's tables) and the header received from every rank.
pub(crate) fn upload_and_exchange(
    call: &Call<'_>,
    st: Staging,
    headers: Section,
    deadline: Deadline,
) -> Result<(CudaSlice<u8>, Vec<DeviceHeader>), CudaAll2AllError> {
    let staged = st.upload(call, call.comm.stream(), deadline)?;
    call.mark("split + table upload");
    let received = exchange_headers(
        call,
        &staged.slice(headers.offset..headers.offset + headers.len),
        deadline,
    )?;
    call.mark("header exchange (NCCL, to host)");
    Ok((staged, received))
}

/// Checks that combine may use `dispatched` (this manager's) with `outputs`.
pub(crate) fn check_combine(
    call: &Call<'_>,
    engine: &Engine,
    dispatched: &CudaDispatched,
    outputs: &CudaView<'_, u8>,
) -> Result<(), CudaAll2AllError> {
    if dispatched.manager_id != engine.id || dispatched.manager != call.manager {
        return Err(All2AllError::ForeignDispatch {
            rank: call.me(),
            manager: call.manager,
            detail: format!(
                "the dispatch came from another manager ({} #{}), not this one (#{})",
                dispatched.manager, dispatched.manager_id, engine.id
            ),
        }
        .into());
    }
    if outputs.len() != dispatched.expert_outputs_len() {
        return Err(All2AllError::ExpertOutputs {
            rank: call.me(),
            manager: call.manager,
            layer: dispatched.layer,
            len: outputs.len() / dispatched.elem.bytes(),
            items: dispatched.items.len(),
            hidden_size: dispatched.hidden_size,
        }
        .into());
    }
    let ordinal = outputs.stream().context().ordinal();
    if ordinal != call.device() {
        return Err(call.tokens(format!(
            "the expert outputs are on device {ordinal}, the EP communicator on device {}",
            call.device()
        )));
    }
    let stream = call.comm.stream();
    if outputs.stream().cu_stream() != stream.cu_stream() {
        stream
            .join(outputs.stream())
            .map_err(call.cuda("cuStreamWaitEvent"))?;
    }
    Ok(())
}

/// The combine header every rank must agree with (no rows), and the headers this rank
/// sends: to each rank `d`, the `recv_rows[d]` rows it returns to `d` and, in `tokens`, the
/// `sent_rows[d]` rows it expects back from `d` (so both ranks of every pair check the same
/// two numbers, see [`check_rows`]); or a rejection for every rank when `route` is `None`
/// (this rank cannot combine).
pub(crate) fn combine_headers(
    dispatched: &CudaDispatched,
    manager: u8,
    seq: u32,
    size: usize,
    route: Option<(&[usize], &[usize])>,
) -> (DeviceHeader, Vec<u8>) {
    let dtype_code = elem_of(dispatched.dtype).map_or(0, |(_, c)| c);
    let ours = DeviceHeader {
        magic: COMBINE,
        status: STATUS_OK,
        tokens: 0,
        rows: 0,
        combine_offset: 0,
        hidden_size: dispatched.hidden_size as u32,
        top_k: 0,
        layer: dispatched.layer as u64,
        fingerprint: 0,
        dtype: dtype_code,
        manager,
        flags: 0,
        seq,
    };
    let mut bytes = Vec::with_capacity(size * DeviceHeader::LEN);
    for dest in 0..size {
        let h = match route {
            Some((recv_rows, sent_rows)) => DeviceHeader {
                rows: recv_rows.get(dest).copied().unwrap_or(0) as u64,
                tokens: sent_rows.get(dest).copied().unwrap_or(0) as u64,
                ..ours
            },
            None => DeviceHeader::rejected(COMBINE, manager, seq),
        };
        h.write(&mut bytes);
    }
    (ours, bytes)
}

/// Combine over NCCL for a dispatch that received `recv_rows[p]` rows from rank `p` and
/// sent it `sent_rows[p]` of this rank's token rows (`route`, or why this rank cannot
/// combine): the header exchange, the weighted sums of the received rows, one grouped
/// exchange that sends them back, and the sum per token.
#[allow(clippy::too_many_arguments)]
pub(crate) fn combine_over_nccl(
    call: &Call<'_>,
    engine: &Engine,
    manager: u8,
    seq: u32,
    dispatched: &CudaDispatched,
    outputs: &CudaView<'_, u8>,
    route: Result<(&[usize], Vec<usize>), CudaAll2AllError>,
    deadline: Deadline,
) -> Result<CudaSlice<u8>, CudaAll2AllError> {
    let size = call.comm.world_size();
    let stream = call.comm.stream();
    let (ours, header_bytes) = combine_headers(
        dispatched,
        manager,
        seq,
        size,
        route
            .as_ref()
            .ok()
            .map(|(recv_rows, sent_rows)| (*recv_rows, sent_rows.as_slice())),
    );
    let mut st = Staging::new(call);
    let header_sec = st.bytes(&header_bytes);
    let (_staged, headers) = upload_and_exchange(call, st, header_sec, deadline)?;
    let (recv_rows, sent_rows) = route?;
    check_all(call, &headers, &ours)?;
    check_rows(call, &headers, &sent_rows, recv_rows)?;

    let row_bytes = dispatched.row_bytes;
    let partial = partial_sums(call, dispatched, outputs)?;
    let back_rows: usize = sent_rows.iter().sum();
    let back = alloc_bytes(call, stream, back_rows * row_bytes)?;
    let (partial_base, back_base) = (addr(&partial, stream), addr(&back, stream));
    let partial_off = block_offsets(recv_rows, row_bytes);
    let back_off = block_offsets(&sent_rows, row_bytes);
    let blocks: Vec<Vec<Block>> = (0..size)
        .map(|peer| {
            vec![Block {
                send: (
                    partial_base + partial_off[peer] as u64,
                    recv_rows[peer] * row_bytes,
                ),
                recv: (
                    back_base + back_off[peer] as u64,
                    sent_rows[peer] * row_bytes,
                ),
            }]
        })
        .collect();
    exchange_blocks(call, engine, &blocks, deadline)?;
    drop(partial);
    token_sums(call, dispatched, back_base)
}

/// Checks that every peer `p` returns the rows this rank sent it (`sent_rows[p]`) and
/// expects back the rows this rank received from it (`recv_rows[p]`): both ranks of a pair
/// test the same two numbers, so a mismatch (say, two ranks combining different dispatches
/// of one layer) fails on both sides, before any row moves, and never leaves one of them
/// waiting in the exchange.
pub(crate) fn check_rows(
    call: &Call<'_>,
    headers: &[DeviceHeader],
    sent_rows: &[usize],
    recv_rows: &[usize],
) -> Result<(), CudaAll2AllError> {
    match row_mismatch(headers, sent_rows, recv_rows) {
        Some((peer, field, ours, theirs)) => Err(call.mismatch_error(peer, field, ours, theirs)),
        None => Ok(()),
    }
}

/// The first peer whose combine header disagrees with this rank's row counts (see
/// [`check_rows`]): `(peer, what, this rank's count, the peer's)`.
fn row_mismatch(
    headers: &[DeviceHeader],
    sent_rows: &[usize],
    recv_rows: &[usize],
) -> Option<(usize, &'static str, u64, u64)> {
    headers.iter().enumerate().find_map(|(peer, h)| {
        let sent = sent_rows.get(peer).copied().unwrap_or(0) as u64;
        let recv = recv_rows.get(peer).copied().unwrap_or(0) as u64;
        if h.rows != sent {
            Some((peer, "row count for this rank", sent, h.rows))
        } else if h.tokens != recv {
            Some((peer, "row count from this rank", recv, h.tokens))
        } else {
            None
        }
    })
}

/// `partial[r] = Σ weight · output` over the items of every received row (f32 accumulation
/// in item order, rounded once to the row type).
pub(crate) fn partial_sums(
    call: &Call<'_>,
    dispatched: &CudaDispatched,
    outputs: &CudaView<'_, u8>,
) -> Result<CudaSlice<u8>, CudaAll2AllError> {
    let stream = call.comm.stream();
    let mut partial = alloc_bytes(call, stream, dispatched.num_rows * dispatched.row_bytes)?;
    let inp = addr(outputs, stream);
    let s = &dispatched.tables;
    let (out, record) = partial.device_ptr_mut(stream);
    // SAFETY: `partial` holds one row per received row; the row lists index items below
    // `items.len()`, whose rows `outputs` holds (its length was checked); the tables and
    // the outputs stay alive and unchanged until the kernel is done (stream order).
    let launched = unsafe {
        dispatched.kernels.segment_sum(
            stream.cu_stream(),
            dispatched.elem,
            out,
            inp,
            s.row_offsets,
            s.row_items,
            Some(s.row_weights),
            dispatched.num_rows,
            dispatched.hidden_size,
        )
    };
    drop(record);
    launched.map_err(call.launch("segment_sum"))?;
    call.mark("partial sums (alloc + launch)");
    Ok(partial)
}

/// `out[t] = Σ back[row]` over token `t`'s returned rows (in rank order): the combined
/// rows, on the communicator's stream.
pub(crate) fn token_sums(
    call: &Call<'_>,
    dispatched: &CudaDispatched,
    back: u64,
) -> Result<CudaSlice<u8>, CudaAll2AllError> {
    let stream: &Arc<CudaStream> = call.comm.stream();
    let n = dispatched.num_local_tokens;
    let mut out = alloc_bytes(call, stream, n * dispatched.row_bytes)?;
    let s = &dispatched.tables;
    let (dst, record) = out.device_ptr_mut(stream);
    // SAFETY: `out` holds one row per local token; the token lists index rows of the block
    // at `back`, which the caller keeps alive until the kernel is done (stream order).
    let launched = unsafe {
        dispatched.kernels.segment_sum(
            stream.cu_stream(),
            dispatched.elem,
            dst,
            back,
            s.token_offsets,
            s.token_rows,
            None,
            n,
            dispatched.hidden_size,
        )
    };
    drop(record);
    launched.map_err(call.launch("segment_sum"))?;
    call.mark("token sums (alloc + launch)");
    Ok(out)
}

/// Byte offsets of consecutive blocks of `rows[i] · row_bytes` bytes.
pub(crate) fn block_offsets(rows: &[usize], row_bytes: usize) -> Vec<usize> {
    let mut offsets = Vec::with_capacity(rows.len());
    let mut at = 0usize;
    for &r in rows {
        offsets.push(at);
        at += r * row_bytes;
    }
    offsets
}

/// A section's device address in `buf`.
pub(crate) fn at(base: u64, section: Section) -> u64 {
    base + section.offset as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The combine headers rank `me` sends (`recv[me][d]` rows back to `d`, expecting
    /// `sent[me][d]`), as received by rank `d`: `headers_at(d)[me]`.
    fn headers_at(d: usize, sent: &[Vec<usize>], recv: &[Vec<usize>]) -> Vec<DeviceHeader> {
        (0..sent.len())
            .map(|src| DeviceHeader {
                rows: recv[src][d] as u64,
                tokens: sent[src][d] as u64,
                ..DeviceHeader::default()
            })
            .collect()
    }

    #[test]
    fn matching_dispatches_pass_on_every_rank() {
        // Rank r sent sent[r][p] rows to p, so p received recv[p][r] = sent[r][p].
        let sent = vec![vec![2, 3, 0], vec![1, 4, 5], vec![0, 7, 6]];
        let recv: Vec<Vec<usize>> = (0..3)
            .map(|r| (0..3).map(|p| sent[p][r]).collect())
            .collect();
        for r in 0..3 {
            assert_eq!(
                row_mismatch(&headers_at(r, &sent, &recv), &sent[r], &recv[r]),
                None
            );
        }
    }

    #[test]
    fn a_mismatched_pair_fails_on_both_sides() {
        // Two ranks combining different dispatches of one layer: rank 0's handle sent 3
        // rows to rank 1 and received 5; rank 1's handle received 3 from rank 0 and sent 4.
        // Only one of the two counts disagrees for each side, yet both must notice.
        let sent = vec![vec![1, 3], vec![4, 2]];
        let recv = vec![vec![1, 5], vec![3, 2]];
        let at0 = row_mismatch(&headers_at(0, &sent, &recv), &sent[0], &recv[0]);
        let at1 = row_mismatch(&headers_at(1, &sent, &recv), &sent[1], &recv[1]);
        assert_eq!(at0, Some((1, "row count from this rank", 5, 4)));
        assert_eq!(at1, Some((0, "row count for this rank", 4, 5)));
    }
}
