//! [`CudaAllToAllVManager`]: each token row goes only to the GPUs that host its chosen
//! experts, and only the weighted sums come back, over NCCL grouped point-to-point.

use std::borrow::Borrow;

use cudarc::driver::{CudaSlice, CudaView};
use moeshift_sync::Deadline;

use super::cuda::{
    addr, alloc_bytes, check_all, impl_cuda_all2all, nccl_manager_api, prepare, CudaTokens, Engine,
    Staging,
};
use super::cuda_dispatched::{CudaDispatched, CudaRoute};
use super::cuda_error::CudaAll2AllError;
use super::cuda_plan::{split_by_destination_into, token_segments_into, Foreign};
use super::cuda_steps::{
    at, block_offsets, check_combine, combine_over_nccl, dispatch_header, exchange_blocks,
    finish_dispatch, gather_rows, stage_outgoing, upload_and_exchange, Arrived, Block,
};
use super::cuda_wire::{DeviceHeader, DISPATCH, MANAGER_A2AV, PICK_BYTES};
use super::placement::ExpertPlacement;
use crate::nccl::NcclComm;

const NAME: &str = "all_to_all_v";
/// Why combine refuses a dispatch without this manager's route.
const NO_ROUTE: &str = "the dispatch has no all-to-all-v route for this group";

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
        let mut scratch = call.scratch();
        let scratch = &mut *scratch;
        let local = prepare(
            &call,
            &tokens,
            placement,
            load.as_ref().map(|l| l.len()),
            deadline,
            scratch,
        );

        // Headers and the send tables, in one upload.
        let mut ours = DeviceHeader::rejected(DISPATCH, MANAGER_A2AV, seq);
        let mut st = Staging::new(&call);
        let mut header_bytes = Vec::with_capacity(size * DeviceHeader::LEN);
        let outgoing = &mut scratch.outgoing;
        match &local {
            Ok(p) => {
                ours = dispatch_header(p, &tokens, placement, MANAGER_A2AV, seq);
                split_by_destination_into(
                    outgoing,
                    &scratch.slots,
                    &scratch.weights,
                    top_k,
                    placement.slots_per_rank(),
                    size,
                );
                for o in outgoing.iter() {
                    DeviceHeader {
                        rows: o.tokens.len() as u64,
                        ..ours
                    }
                    .write(&mut header_bytes);
                }
            }
            Err(_) => {
                // No shares (buffers kept for the next call).
                split_by_destination_into(outgoing, &[], &[], top_k, 1, size);
                for _ in 0..size {
                    ours.write(&mut header_bytes);
                }
            }
        }
        let outgoing = &scratch.outgoing;
        let header_sec = st.bytes(&header_bytes);
        let (idx_sec, meta_sec, send_count) = stage_outgoing(&mut st, outgoing);
        let (staged, headers) = upload_and_exchange(&call, st, header_sec, deadline)?;
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
        // SAFETY: the index section holds `send_count` tokens of this batch; `staged`
        // lives until the end of the call.
        let (send, send_base) = unsafe {
            gather_rows(
                &call,
                engine,
                Some(&tokens),
                at(staged_base, idx_sec),
                send_count,
                row_bytes,
            )
        }?;
        let total: usize = recv_rows.iter().sum();
        let recv = alloc_bytes(&call, stream, total * row_bytes)?;
        let recv_meta = alloc_bytes(&call, stream, total * pick_row)?;
        call.mark("receive buffers (alloc)");
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
        token_segments_into(&mut scratch.segments, &scratch.outgoing, p.n);
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
        // exchange on the stream, and lives until the end of the call.
        let dispatched = unsafe {
            finish_dispatch(
                &call, engine, placement, &tokens, &p, arrived, load, deadline, scratch,
            )
        };
        drop(recv_meta);
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
