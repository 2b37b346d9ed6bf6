//! [`CudaAgRsManager`]: dispatch by gathering every token to every GPU, combine by a
//! reduce-scatter (vLLM's default `allgather_reducescatter`), over NCCL grouped
//! point-to-point and this crate's reduction kernel.

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
    finish_dispatch, route_into_headers, Arrived, Block, SendSide,
};
use super::cuda_tables::{Foreign, PlacementSections, RouteTables};
use super::cuda_wire::{DeviceHeader, DISPATCH, MANAGER_AGRS, PICK_BYTES};
use super::placement::ExpertPlacement;
use crate::nccl::NcclComm;

const NAME: &str = "allgather_reducescatter";

/// Gather / reduce-scatter on the GPU, over an [`NcclComm`] of the EP group.
///
/// - **dispatch**: after the 64-byte header exchange (token counts may differ per rank,
///   zero included; a rank with bad input fails the call everywhere), every rank sends its
///   rows and pick metadata to every other rank in one grouped NCCL exchange (its own rows
///   are copied on a second stream). Every rank receives **all** tokens of the group and
///   gets a work item for every pick routed to one of its slots.
/// - **combine**: a kernel sums each gathered row's weighted expert outputs on this rank;
///   the sums for rank `j`'s tokens go to rank `j` (a reduce-scatter as grouped
///   point-to-point), which adds them in rank order with a second kernel. In f32 the result
///   is bit-for-bit the host [`AgRsManager`](super::AgRsManager)'s.
///
/// The replica of each pick is chosen once, by a kernel on the token's rank (which also
/// counts it in the load hook); the router output never reaches the host. Moves
/// `(ranks − 1) × tokens × row` bytes each way per rank;
/// [`CudaAllToAllVManager`](super::CudaAllToAllVManager) moves each row only where needed.
#[derive(Debug)]
pub struct CudaAgRsManager<C = NcclComm> {
    comm: C,
    engine: Engine,
}

nccl_manager_api!(CudaAgRsManager);
impl_cuda_all2all!(impl[C: Borrow<NcclComm>] CudaAgRsManager<C>, NAME);

impl<C: Borrow<NcclComm>> CudaAgRsManager<C> {
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

        // The headers (every rank gets all rows) and the placement's tables, in one upload.
        let mut st = Staging::new(&call);
        let local = check_batch(&call, &tokens, placement, load.as_ref().map(|l| l.len()))
            .and_then(|p| {
                PlacementSections::stage(&call, &mut st, placement).map(|tables| (p, tables))
            });
        let ours = match &local {
            Ok((p, _)) => DeviceHeader {
                rows: p.n as u64,
                ..dispatch_header(p, &tokens, placement, MANAGER_AGRS, seq)
            },
            Err(_) => DeviceHeader::rejected(DISPATCH, MANAGER_AGRS, seq),
        };
        let mut header_bytes = Vec::with_capacity(size * DeviceHeader::LEN);
        for _ in 0..size {
            ours.write(&mut header_bytes);
        }
        let header_sec = st.bytes(&header_bytes);
        let staged = st.upload(&call, stream, deadline)?;
        let staged_base = addr(&staged, stream);

        // Route every pick and write its entry on the GPU; an unknown expert marks the
        // headers rejected.
        let routed = match &local {
            Ok((p, tables)) => {
                let dev = tables.on_device(staged_base);
                // SAFETY: the header section holds `size` headers at a 16-byte aligned offset
                // of `staged`, alive until the end of the call; the error word lies in
                // `route`. Every rank gets all rows: the counts stay as staged.
                let route = unsafe {
                    route_into_headers(
                        &call,
                        engine,
                        at(staged_base, header_sec),
                        size,
                        MANAGER_AGRS,
                        seq,
                        deadline,
                        // SAFETY: `check_batch` checked `tokens` for `p.n` tokens and ordered
                        // this stream after them; `dev` lies in `staged`.
                        || RouteTables::route(&call, engine, &tokens, p.n, &dev),
                        |route| (0, route.at(route.layout.err)),
                    )
                }?;
                Some(route.map(|route| (route, dev)))
            }
            Err(_) => None,
        };
        call.mark("routing (launch)");
        let extra: Vec<(u64, usize)> = routed
            .iter()
            .flatten()
            .map(|(r, _)| r.outcome_range())
            .collect();
        // SAFETY: the extra range lies in `route.buf`, alive until the end of the call and
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
        let (route, dev) = routed?;
        route
            .layout
            .outcome(&outcome)
            .map_err(|u| call.unknown_expert(placement, u))?;
        check_all(&call, &headers, &ours)?;
        let mut counts = Vec::with_capacity(size);
        for (src, h) in headers.iter().enumerate() {
            if h.rows != h.tokens {
                return Err(call.malformed(
                    src,
                    format!(
                        "{} rows announced for a batch of {} tokens",
                        h.rows, h.tokens
                    ),
                ));
            }
            counts.push(
                usize::try_from(h.rows)
                    .map_err(|_| call.malformed(src, format!("{} rows is too many", h.rows)))?,
            );
        }

        let row_bytes = p.row_bytes;
        let pick_row = top_k * PICK_BYTES;
        let total: usize = counts.iter().sum();
        let gathered = alloc_bytes(&call, stream, total * row_bytes)?;
        let gathered_meta = alloc_bytes(&call, stream, total * pick_row)?;
        let (rows_base, meta_base) = (addr(&gathered, stream), addr(&gathered_meta, stream));
        let hidden = addr(&tokens.hidden, stream);
        let own_meta = route.at(route.layout.meta);
        let row_off = block_offsets(&counts, row_bytes);
        let meta_off = block_offsets(&counts, pick_row);
        let blocks: Vec<Vec<Block>> = (0..size)
            .map(|peer| {
                vec![
                    Block {
                        send: (hidden, p.n * row_bytes),
                        recv: (rows_base + row_off[peer] as u64, counts[peer] * row_bytes),
                    },
                    Block {
                        send: (own_meta, p.n * pick_row),
                        recv: (meta_base + meta_off[peer] as u64, counts[peer] * pick_row),
                    },
                ]
            })
            .collect();
        exchange_blocks(&call, engine, &blocks, deadline)?;
        let arrived = Arrived {
            rows: gathered,
            rows_from: counts.clone(),
            meta: vec![(meta_base, total * pick_row)],
            foreign: Foreign::Skip,
            route: CudaRoute::AgRs { counts },
        };
        // SAFETY: `gathered_meta` holds the metadata (`total` rows' entries), written by
        // the exchange on the stream, and lives until the end of the call.
        let dispatched = unsafe {
            finish_dispatch(
                &call,
                engine,
                placement,
                &dev,
                &tokens,
                &p,
                arrived,
                SendSide::Gathered(route),
                load,
                deadline,
            )
        };
        drop(gathered_meta);
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
        let (me, size) = (comm.rank(), comm.world_size());
        // Rank `p` sent this rank its `counts[p]` tokens' rows; the sums of this rank's own
        // tokens come back from every rank.
        let route = check_combine(&call, engine, dispatched, &outputs).and_then(|()| {
            match &dispatched.route {
                CudaRoute::AgRs { counts } if counts.len() == size => {
                    let n = counts.get(me).copied().unwrap_or(0);
                    Ok((counts.as_slice(), vec![n; size]))
                }
                _ => Err(call.tokens("the dispatch has no gather route for this group".into())),
            }
        });
        combine_over_nccl(
            &call,
            engine,
            MANAGER_AGRS,
            seq,
            dispatched,
            &outputs,
            route,
            deadline,
        )
    }
}
