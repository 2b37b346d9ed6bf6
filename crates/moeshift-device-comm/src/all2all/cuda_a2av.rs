//! [`CudaAllToAllVManager`]: each token row goes only to the GPUs that host its chosen
//! experts, and only the weighted sums come back, over NCCL grouped point-to-point.

use std::borrow::Borrow;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use moeshift_sync::Deadline;

use super::cuda::{
    addr, alloc_bytes, check_all, exchange_headers, prepare, set_globals, Call, CudaTokens, Engine,
    Staging,
};
use super::cuda_dispatched::{CudaDispatched, CudaRoute};
use super::cuda_error::CudaAll2AllError;
use super::cuda_plan::{split_by_destination, token_segments, Foreign};
use super::cuda_steps::{
    at, block_offsets, check_combine, check_rows, combine_header, exchange_blocks, finish_dispatch,
    partial_sums, token_sums, Arrived, Block,
};
use super::cuda_wire::{DeviceHeader, COMBINE, DISPATCH, MANAGER_A2AV, PICK_BYTES};
use super::placement::ExpertPlacement;
use super::wire::STATUS_OK;
use super::MoeAll2All;
use crate::nccl::NcclComm;

const NAME: &str = "all_to_all_v";

/// All-to-all-v on the GPU, over an [`NcclComm`] of the EP group.
///
/// - **dispatch**: the router output is copied to the host once, each pick is routed to its
///   physical slot ([`replica_index`](super::replica_index)) and each token is sent once to
///   every rank hosting one of its picks. The ranks first exchange a 64-byte header each
///   (status, counts, parameters; a rank with bad input makes every rank fail), then a
///   gather kernel packs the rows by destination and one grouped NCCL exchange moves the
///   rows and their pick metadata (`top_k × 8` bytes per row); the rank's own share is
///   copied on a second stream meanwhile.
/// - **combine**: a kernel sums each received row's weighted expert outputs (f32, in item
///   order), the sums go back to their token's rank in one grouped exchange, and a second
///   kernel adds each token's sums in rank order. In f32 the result is bit-for-bit the
///   host [`AllToAllVManager`](super::AllToAllVManager)'s.
///
/// Moves `tokens × (ranks hosting a pick) × row` bytes each way, plus headers and metadata.
#[derive(Debug)]
pub struct CudaAllToAllVManager<C = NcclComm> {
    comm: C,
    engine: Engine,
}

impl<C: Borrow<NcclComm>> CudaAllToAllVManager<C> {
    /// A manager over `comm`, the EP group's communicator (`NcclComm`, `&NcclComm`, …).
    /// Loads the kernels on its device.
    pub fn new(comm: C) -> Result<Self, CudaAll2AllError> {
        let engine = Engine::new(comm.borrow(), NAME)?;
        Ok(Self { comm, engine })
    }

    /// Names the global rank of every EP rank in errors (`globals[r]` for EP rank `r`).
    pub fn with_global_ranks(mut self, globals: Vec<usize>) -> Result<Self, CudaAll2AllError> {
        set_globals(&mut self.engine, self.comm.borrow(), NAME, globals)?;
        Ok(self)
    }

    /// The communicator.
    pub fn comm(&self) -> &NcclComm {
        self.comm.borrow()
    }

    /// The stream results are ordered on (the communicator's).
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.comm.borrow().stream()
    }

    /// Gives the communicator back.
    pub fn into_comm(self) -> C {
        self.comm
    }
}

impl<C: Borrow<NcclComm>> MoeAll2All for CudaAllToAllVManager<C> {
    type Tokens<'a> = CudaTokens<'a>;
    type LoadCounts<'a> = &'a mut CudaSlice<i64>;
    type ExpertOutputs<'a> = CudaView<'a, u8>;
    type Dispatched = CudaDispatched;
    type Combined = CudaSlice<u8>;
    type Error = CudaAll2AllError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn ep_rank(&self) -> usize {
        self.comm.borrow().rank()
    }

    fn ep_size(&self) -> usize {
        self.comm.borrow().world_size()
    }

    fn dispatch(
        &self,
        tokens: CudaTokens<'_>,
        placement: &ExpertPlacement,
        load: Option<&mut CudaSlice<i64>>,
        deadline: Deadline,
    ) -> Result<CudaDispatched, CudaAll2AllError> {
        let comm = self.comm.borrow();
        let engine = &self.engine;
        let seq = engine.next_seq();
        let call = Call {
            comm,
            manager: NAME,
            op: "dispatch",
            layer: placement.layer(),
            globals: &engine.globals,
        };
        let size = comm.world_size();
        let stream = comm.stream();
        let top_k = tokens.top_k;
        let local = prepare(
            &call,
            &tokens,
            placement,
            load.as_ref().map(|l| l.len()),
            deadline,
        );

        // Headers and the send tables, in one upload.
        let mut ours = DeviceHeader::rejected(DISPATCH, MANAGER_A2AV, seq);
        let mut st = Staging::default();
        let mut header_bytes = Vec::with_capacity(size * DeviceHeader::LEN);
        let outgoing = match &local {
            Ok(p) => {
                ours = DeviceHeader {
                    magic: DISPATCH,
                    status: STATUS_OK,
                    tokens: p.n as u64,
                    rows: 0,
                    combine_offset: 0,
                    hidden_size: tokens.hidden_size as u32,
                    top_k: top_k as u32,
                    layer: placement.layer() as u64,
                    fingerprint: placement.fingerprint(),
                    dtype: p.dtype_code,
                    manager: MANAGER_A2AV,
                    flags: 0,
                    seq,
                };
                let out = split_by_destination(
                    &p.slots,
                    &p.weights,
                    top_k,
                    placement.slots_per_rank(),
                    size,
                );
                for o in &out {
                    DeviceHeader {
                        rows: o.tokens.len() as u64,
                        ..ours
                    }
                    .write(&mut header_bytes);
                }
                out
            }
            Err(_) => {
                for _ in 0..size {
                    ours.write(&mut header_bytes);
                }
                Vec::new()
            }
        };
        let header_sec = st.bytes(&header_bytes);
        let send_tokens: Vec<u32> = outgoing
            .iter()
            .flat_map(|o| o.tokens.iter().copied())
            .collect();
        let send_meta: Vec<u8> = outgoing
            .iter()
            .map(|o| o.meta.as_slice())
            .collect::<Vec<_>>()
            .concat();
        let idx_sec = st.u32s(&send_tokens);
        let meta_sec = st.bytes(&send_meta);
        let staged = st.upload(&call, stream)?;
        let headers = exchange_headers(
            &call,
            &staged.slice(header_sec.offset..header_sec.offset + header_sec.len),
            deadline,
        )?;
        let p = local?;
        check_all(&call, &headers, &ours)?;
        let mut recv_rows = Vec::with_capacity(size);
        for (src, h) in headers.iter().enumerate() {
            if h.rows > h.tokens {
                return Err(call.malformed(
                    src,
                    format!(
                        "{} rows announced from a batch of {} tokens",
                        h.rows, h.tokens
                    ),
                ));
            }
            let rows = usize::try_from(h.rows)
                .map_err(|_| call.malformed(src, format!("{} rows is too many", h.rows)))?;
            recv_rows.push(rows);
        }
        let sent_rows: Vec<usize> = outgoing.iter().map(|o| o.tokens.len()).collect();
        let row_bytes = p.row_bytes;
        let pick_row = top_k * PICK_BYTES;

        // Pack the rows by destination, then move rows and metadata.
        let staged_base = addr(&staged, stream);
        let send = alloc_bytes(&call, stream, send_tokens.len() * row_bytes)?;
        let send_base = addr(&send, stream);
        let hidden = addr(&tokens.hidden, stream);
        // SAFETY: `send` holds one row per entry of the index section, every index is a
        // token of this batch (whose rows `hidden` holds); all alive until the kernel is
        // done (stream order).
        unsafe {
            engine.kernels.gather_rows(
                stream.cu_stream(),
                send_base,
                hidden,
                at(staged_base, idx_sec),
                send_tokens.len(),
                row_bytes,
            )
        }
        .map_err(call.launch("gather_rows"))?;
        let total: usize = recv_rows.iter().sum();
        let recv = alloc_bytes(&call, stream, total * row_bytes)?;
        let recv_meta = alloc_bytes(&call, stream, total * pick_row)?;
        let (recv_base, recv_meta_base) = (addr(&recv, stream), addr(&recv_meta, stream));
        let send_off = block_offsets(&sent_rows, row_bytes);
        let send_meta_off = block_offsets(&sent_rows, pick_row);
        let recv_off = block_offsets(&recv_rows, row_bytes);
        let recv_meta_off = block_offsets(&recv_rows, pick_row);
        let blocks: Vec<Vec<Block>> = (0..size)
            .map(|peer| {
                vec![
                    Block {
                        send: (
                            send_base + send_off[peer] as u64,
                            sent_rows[peer] * row_bytes,
                        ),
                        recv: (
                            recv_base + recv_off[peer] as u64,
                            recv_rows[peer] * row_bytes,
                        ),
                    },
                    Block {
                        send: (
                            at(staged_base, meta_sec) + send_meta_off[peer] as u64,
                            sent_rows[peer] * pick_row,
                        ),
                        recv: (
                            recv_meta_base + recv_meta_off[peer] as u64,
                            recv_rows[peer] * pick_row,
                        ),
                    },
                ]
            })
            .collect();
        exchange_blocks(&call, engine, &blocks, deadline)?;
        drop(send);
        let meta = call.download(stream, &recv_meta.as_view(), deadline)?;
        let sent: Vec<Vec<u32>> = outgoing.into_iter().map(|o| o.tokens).collect();
        let arrived = Arrived {
            placement,
            dtype: tokens.dtype,
            elem: p.elem,
            hidden_size: tokens.hidden_size,
            row_bytes,
            top_k,
            rows: recv,
            rows_from: recv_rows.clone(),
            meta,
            foreign: Foreign::Reject,
            n: p.n,
            token_segments: token_segments(&sent, p.n),
            route: CudaRoute::AllToAllV {
                recv_rows,
                sent_rows,
            },
        };
        finish_dispatch(
            &call,
            engine,
            arrived,
            load.map(|l| (l, p.slots.as_slice())),
        )
    }

    fn combine(
        &self,
        dispatched: &CudaDispatched,
        outputs: CudaView<'_, u8>,
        deadline: Deadline,
    ) -> Result<CudaSlice<u8>, CudaAll2AllError> {
        let comm = self.comm.borrow();
        let engine = &self.engine;
        let seq = engine.next_seq();
        let call = Call {
            comm,
            manager: NAME,
            op: "combine",
            layer: dispatched.layer,
            globals: &engine.globals,
        };
        let size = comm.world_size();
        let stream = comm.stream();
        let dtype_code = super::cuda::elem_of(dispatched.dtype).map_or(0, |(_, c)| c);
        let local = check_combine(&call, engine, dispatched, &outputs).and_then(|()| {
            match &dispatched.route {
                CudaRoute::AllToAllV {
                    recv_rows,
                    sent_rows,
                } if recv_rows.len() == size && sent_rows.len() == size => {
                    Ok((recv_rows, sent_rows))
                }
                _ => {
                    Err(call.tokens("the dispatch has no all-to-all-v route for this group".into()))
                }
            }
        });
        let ours = combine_header(dispatched, MANAGER_A2AV, dtype_code, seq, 0);
        let mut header_bytes = Vec::with_capacity(size * DeviceHeader::LEN);
        for dest in 0..size {
            let h = match &local {
                Ok((recv_rows, _)) => DeviceHeader {
                    rows: recv_rows[dest] as u64,
                    ..ours
                },
                Err(_) => DeviceHeader::rejected(COMBINE, MANAGER_A2AV, seq),
            };
            h.write(&mut header_bytes);
        }
        let mut st = Staging::default();
        let header_sec = st.bytes(&header_bytes);
        let staged = st.upload(&call, stream)?;
        let headers = exchange_headers(
            &call,
            &staged.slice(header_sec.offset..header_sec.offset + header_sec.len),
            deadline,
        )?;
        let (recv_rows, sent_rows) = local?;
        check_all(&call, &headers, &ours)?;
        check_rows(&call, &headers, sent_rows)?;

        let row_bytes = dispatched.row_bytes;
        let partial = partial_sums(&call, dispatched, &outputs)?;
        let back_rows: usize = sent_rows.iter().sum();
        let back = alloc_bytes(&call, stream, back_rows * row_bytes)?;
        let (partial_base, back_base) = (addr(&partial, stream), addr(&back, stream));
        let partial_off = block_offsets(recv_rows, row_bytes);
        let back_off = block_offsets(sent_rows, row_bytes);
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
        exchange_blocks(&call, engine, &blocks, deadline)?;
        drop(partial);
        token_sums(&call, dispatched, back_base)
    }
}
