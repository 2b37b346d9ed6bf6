//! [`CudaAllToAllVManager`]: each token row goes only to the GPUs that host its chosen
//! experts, and only the weighted sums come back, over NCCL grouped point-to-point.

use std::borrow::Borrow;

use cudarc::driver::{CudaSlice, CudaView};
use moeshift_sync::Deadline;

use super::cuda::{
    addr, alloc_bytes, check_all, check_batch, exchange_headers_with, impl_cuda_all2all,
    nccl_manager_api, CudaTokens, Engine, Staging,
};
use super::cuda_dispatched::{CudaDispatched, CudaRoute};
use super::cuda_error::CudaAll2AllError;
use super::cuda_steps::{
    at, block_offsets, check_combine, combine_over_nccl, dispatch_header, exchange_blocks,
    finish_dispatch, gather_rows, route_into_headers, Arrived, Block, SendSide,
};
use super::cuda_tables::{Foreign, PlacementSections, SendTables};
use super::cuda_wire::{DeviceHeader, DISPATCH, MANAGER_A2AV, PICK_BYTES};
use super::placement::ExpertPlacement;
use crate::nccl::NcclComm;

const NAME: &str = "all_to_all_v";
/// Why combine refuses a dispatch without this manager's route.
const NO_ROUTE: &str = "the dispatch has no all-to-all-v route for this group";

/// All-to-all-v on the GPU, over an [`NcclComm`] of the EP group.
///
/// - **dispatch**: kernels route each pick to its physical slot
///   ([`replica_index`](super::replica_index)), split the batch by destination (each token
///   once to every rank hosting one of its picks, in token order) and write the row counts
///   into the headers; the router output never reaches the host. The ranks exchange a
///   64-byte header each (status, counts, parameters; a rank with bad input makes every rank
///   fail) and copy them to the host with their own counts (the one wait before the rows
///   move), then a gather kernel packs the rows by destination and one grouped NCCL exchange
///   moves the rows and their pick metadata (`top_k × 8` bytes per row); the rank's own share
///   is copied on a second stream meanwhile. The received picks become work items on the GPU,
///   copied to the host once.
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

nccl_manager_api!(CudaAllToAllVManager);
impl_cuda_all2all!(impl[C: Borrow<NcclComm>] CudaAllToAllVManager<C>, NAME);

impl<C: Borrow<NcclComm>> CudaAllToAllVManager<C> {
    fn run_dispatch(
        &self,
        tokens: CudaTokens<'_>,
        placement: &ExpertPlacement,
        load: Option<&mut CudaSlice<i64>>,
        deadline: Deadline,
    ) -> Result<CudaDispatched, CudaAll2AllError> {
        let comm = self.comm.borrow();
        let engine = &self.engine;
        let (seq, call) = engine.begin(comm, "dispatch", placement.layer());
        let size = comm.world_size();
        let stream = comm.stream();
        let top_k = tokens.top_k;

        // The headers (row counts filled in on the GPU) and the placement's tables, in one
        // upload.
        let mut st = Staging::new(&call);
        let local = check_batch(&call, &tokens, placement, load.as_ref().map(|l| l.len()))
            .and_then(|p| {
                PlacementSections::stage(&call, &mut st, placement).map(|tables| (p, tables))
            });
        let ours = match &local {
            Ok((p, _)) => dispatch_header(p, &tokens, placement, MANAGER_A2AV, seq),
            Err(_) => DeviceHeader::rejected(DISPATCH, MANAGER_A2AV, seq),
        };
        let mut header_bytes = Vec::with_capacity(size * DeviceHeader::LEN);
        for _ in 0..size {
            ours.write(&mut header_bytes);
        }
        let header_sec = st.bytes(&header_bytes);
        let staged = st.upload(&call, stream, deadline)?;
        let staged_base = addr(&staged, stream);
        let headers_at = at(staged_base, header_sec);

        // Route and split on the GPU; the row counts go into the headers.
        let routed = match &local {
            Ok((p, tables)) => {
                let dev = tables.on_device(staged_base);
                // SAFETY: the header section holds `size` headers at a 16-byte aligned offset
                // of `staged`, alive until the end of the call; the words lie in `send`.
                let send = unsafe {
                    route_into_headers(
                        &call,
                        engine,
                        headers_at,
                        size,
                        MANAGER_A2AV,
                        seq,
                        deadline,
                        // SAFETY: `check_batch` checked `tokens` for `p.n` tokens and ordered
                        // this stream after them; `dev` lies in `staged`.
                        || SendTables::route(&call, engine, &tokens, p.n, &dev),
                        |send| {
                            let l = &send.layout;
                            (send.at(l.bucket_offsets), send.at(l.err))
                        },
                    )
                }?;
                Some(send.map(|send| (send, dev)))
            }
            Err(_) => None,
        };
        call.mark("routing + split (launch)");
        let extra: Vec<(u64, usize)> = routed
            .iter()
            .flatten()
            .map(|(send, _)| send.outcome_range())
            .collect();
        // SAFETY: the extra range lies in `send.buf`, alive until the end of the call and
        // written only by the kernels queued above.
        let (headers, outcome) = unsafe {
            exchange_headers_with(
                &call,
                &staged.slice(header_sec.offset..header_sec.offset + header_sec.len),
                &extra,
                deadline,
            )
        }?;
        call.mark("header exchange (NCCL, to host)");
        let (p, _) = local?;
        let Some(routed) = routed else {
            return Err(call.tokens("the batch was not routed".into()));
        };
        let (send, dev) = routed?;
        let sent_rows = send
            .layout
            .outcome(&outcome)
            .map_err(|u| call.unknown_expert(placement, u))?;
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
        let row_bytes = p.row_bytes;
        let pick_row = top_k * PICK_BYTES;
        let send_count: usize = sent_rows.iter().sum();
        if send_count > send.layout.max_rows {
            return Err(call.too_large("rows sent", send_count));
        }

        // Pack the rows by destination, then move rows and metadata.
        // SAFETY: the send index holds `send_count` tokens of this batch; `send` lives until
        // the end of the call.
        let (rows_out, send_base) = unsafe {
            gather_rows(
                &call,
                engine,
                &tokens,
                send.at(send.layout.send_index),
                send_count,
                row_bytes,
            )
        }?;
        let total: usize = recv_rows.iter().sum();
        let recv = alloc_bytes(&call, stream, total * row_bytes)?;
        let recv_meta = alloc_bytes(&call, stream, total * pick_row)?;
        call.mark("receive buffers (alloc)");
        let (recv_base, recv_meta_base) = (addr(&recv, stream), addr(&recv_meta, stream));
        let send_meta_base = send.at(send.layout.send_meta);
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
                            send_meta_base + send_meta_off[peer] as u64,
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
        drop(rows_out);
        let arrived = Arrived {
            rows: recv,
            rows_from: recv_rows.clone(),
            meta: vec![(recv_meta_base, total * pick_row)],
            foreign: Foreign::Reject,
            route: CudaRoute::AllToAllV {
                recv_rows,
                sent_rows,
            },
        };
        // SAFETY: `recv_meta` holds the metadata (`total` rows' entries), written by the
        // exchange on the stream, and lives until the end of the call; `dev` lies in
        // `staged`, alive until then too.
        let dispatched = unsafe {
            finish_dispatch(
                &call,
                engine,
                placement,
                &dev,
                &tokens,
                &p,
                arrived,
                SendSide::Split(send),
                load,
                deadline,
            )
        };
        drop(recv_meta);
        drop(staged);
        dispatched
    }

    fn run_combine(
        &self,
        dispatched: &CudaDispatched,
        outputs: CudaView<'_, u8>,
        deadline: Deadline,
    ) -> Result<CudaSlice<u8>, CudaAll2AllError> {
        let comm = self.comm.borrow();
        let engine = &self.engine;
        let (seq, call) = engine.begin(comm, "combine", dispatched.layer);
        let size = comm.world_size();
        // Rank `p` sent this rank `recv_rows[p]` rows, and got `sent_rows[p]` of its tokens.
        let route = check_combine(&call, engine, dispatched, &outputs).and_then(|()| {
            match &dispatched.route {
                CudaRoute::AllToAllV {
                    recv_rows,
                    sent_rows,
                } if recv_rows.len() == size && sent_rows.len() == size => {
                    Ok((recv_rows.as_slice(), sent_rows.clone()))
                }
                _ => Err(call.tokens(NO_ROUTE.into())),
            }
        });
        combine_over_nccl(
            &call,
            engine,
            MANAGER_A2AV,
            seq,
            dispatched,
            &outputs,
            route,
            deadline,
        )
    }
}
