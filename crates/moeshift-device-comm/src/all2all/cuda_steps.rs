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
use super::cuda_wire::{DeviceHeader, COMBINE, DISPATCH};
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
    let local = own.iter().any(|b| b.send.1 > 0);
    if local {
        engine
            .side
            .join(stream)
            .map_err(call.cuda("cuStreamWaitEvent"))?;
        for b in own {
            if b.send.1 != b.recv.1 {
                return Err(call.malformed(
                    me,
                    format!(
                        "this rank sends itself {} bytes but expects {}",
                        b.send.1, b.recv.1
                    ),
                ));
            }
            if b.send.1 == 0 {
                continue;
            }
            // SAFETY: both ranges are device memory of this context that the caller keeps
            // alive and unused by other work until the side stream is joined below.
            unsafe {
                result::memcpy_dtod_async(b.recv.0, b.send.0, b.send.1, engine.side.cu_stream())
            }
            .map_err(call.cuda("cuMemcpyDtoDAsync"))?;
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
    if local {
        // Later work on the stream (and the frees of these buffers) waits for the copies.
        stream
            .join(&engine.side)
            .map_err(call.cuda("cuStreamWaitEvent"))?;
    }
    call.mark("row exchange (NCCL)");
    sent
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
/// its address. Without `tokens` (this rank rejected its batch) only the buffer is made.
///
/// # Safety
/// `index` holds `count` `u32` row indices of `tokens`' batch, device memory ordered on the
/// communicator's stream and alive until the kernel is done (stream order).
pub(crate) unsafe fn gather_rows(
    call: &Call<'_>,
    engine: &Engine,
    tokens: Option<&CudaTokens<'_>>,
    index: u64,
    count: usize,
    row_bytes: usize,
) -> Result<(CudaSlice<u8>, u64), CudaAll2AllError> {
    let stream = call.comm.stream();
    let send = alloc_bytes(call, stream, count * row_bytes)?;
    let send_base = addr(&send, stream);
    if let Some(tokens) = tokens {
        let hidden = addr(&tokens.hidden, stream);
        // SAFETY: `send` holds one row per index and every index is a row of `hidden`
        // (the caller's contract); all alive until the kernel is done (stream order).
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
    }
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
/// sends: to each rank `d`, `rows[d]` rows, or a rejection for every rank when `rows` is
/// `None` (this rank cannot combine).
pub(crate) fn combine_headers(
    dispatched: &CudaDispatched,
    manager: u8,
    seq: u32,
    size: usize,
    rows: Option<&[usize]>,
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
        let h = match rows {
            Some(rows) => DeviceHeader {
                rows: rows.get(dest).copied().unwrap_or(0) as u64,
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
        route.as_ref().ok().map(|(recv_rows, _)| *recv_rows),
    );
    let mut st = Staging::new(call);
    let header_sec = st.bytes(&header_bytes);
    let (_staged, headers) = upload_and_exchange(call, st, header_sec, deadline)?;
    let (recv_rows, sent_rows) = route?;
    check_all(call, &headers, &ours)?;
    check_rows(call, &headers, &sent_rows)?;

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

/// Checks that every peer announces the rows this rank expects from it.
pub(crate) fn check_rows(
    call: &Call<'_>,
    headers: &[DeviceHeader],
    expected: &[usize],
) -> Result<(), CudaAll2AllError> {
    for (peer, (h, &want)) in headers.iter().zip(expected).enumerate() {
        if h.rows != want as u64 {
            return Err(call.mismatch_error(peer, "row count for this rank", want as u64, h.rows));
        }
    }
    Ok(())
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
