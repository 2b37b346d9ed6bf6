//! [`CudaAgRsManager`]: dispatch by gathering every token to every GPU, combine by a
//! reduce-scatter (vLLM's default `allgather_reducescatter`), over NCCL grouped
//! point-to-point and this crate's reduction kernel.

use std::borrow::Borrow;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use moeshift_sync::Deadline;

use super::cuda::{
    addr, alloc_bytes, check_all, elem_of, exchange_headers, prepare, set_globals, Call,
    CudaTokens, Engine, Staging,
};
use super::cuda_dispatched::{CudaDispatched, CudaRoute};
use super::cuda_error::CudaAll2AllError;
use super::cuda_plan::{all_picks, strided_segments, Foreign};
use super::cuda_steps::{
    at, block_offsets, check_combine, check_rows, combine_header, exchange_blocks, finish_dispatch,
    partial_sums, token_sums, Arrived, Block,
};
use super::cuda_wire::{DeviceHeader, COMBINE, DISPATCH, MANAGER_AGRS, PICK_BYTES};
use super::placement::ExpertPlacement;
use super::wire::STATUS_OK;
use super::MoeAll2All;
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
/// The replica of each pick is chosen once, by the token's rank, which also counts it in
/// the load hook. Moves `(ranks − 1) × tokens × row` bytes each way per rank;
/// [`CudaAllToAllVManager`](super::CudaAllToAllVManager) moves each row only where needed.
#[derive(Debug)]
pub struct CudaAgRsManager<C = NcclComm> {
    comm: C,
    engine: Engine,
}

impl<C: Borrow<NcclComm>> CudaAgRsManager<C> {
    /// A manager over `comm`, the EP group's communicator. Loads the kernels on its device.
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

impl<C: Borrow<NcclComm>> MoeAll2All for CudaAgRsManager<C> {
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

        let ours = match &local {
            Ok(p) => DeviceHeader {
                magic: DISPATCH,
                status: STATUS_OK,
                tokens: p.n as u64,
                rows: p.n as u64,
                combine_offset: 0,
                hidden_size: tokens.hidden_size as u32,
                top_k: top_k as u32,
                layer: placement.layer() as u64,
                fingerprint: placement.fingerprint(),
                dtype: p.dtype_code,
                manager: MANAGER_AGRS,
                flags: 0,
                seq,
            },
            Err(_) => DeviceHeader::rejected(DISPATCH, MANAGER_AGRS, seq),
        };
        let mut header_bytes = Vec::with_capacity(size * DeviceHeader::LEN);
        for _ in 0..size {
            ours.write(&mut header_bytes);
        }
        let meta = match &local {
            Ok(p) => all_picks(&p.slots, &p.weights),
            Err(_) => Vec::new(),
        };
        let mut st = Staging::default();
        let header_sec = st.bytes(&header_bytes);
        let meta_sec = st.bytes(&meta);
        let staged = st.upload(&call, stream)?;
        let headers = exchange_headers(
            &call,
            &staged.slice(header_sec.offset..header_sec.offset + header_sec.len),
            deadline,
        )?;
        let p = local?;
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
        let own_meta = at(addr(&staged, stream), meta_sec);
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
        let meta = call.download(stream, &gathered_meta.as_view(), deadline)?;
        let arrived = Arrived {
            placement,
            dtype: tokens.dtype,
            elem: p.elem,
            hidden_size: tokens.hidden_size,
            row_bytes,
            top_k,
            rows: gathered,
            rows_from: counts.clone(),
            meta,
            foreign: Foreign::Skip,
            n: p.n,
            token_segments: strided_segments(size, p.n),
            route: CudaRoute::AgRs { counts },
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
        let (me, size) = (comm.rank(), comm.world_size());
        let stream = comm.stream();
        let dtype_code = elem_of(dispatched.dtype).map_or(0, |(_, c)| c);
        let local = check_combine(&call, engine, dispatched, &outputs).and_then(|()| {
            match &dispatched.route {
                CudaRoute::AgRs { counts } if counts.len() == size => Ok(counts),
                _ => Err(call.tokens("the dispatch has no gather route for this group".into())),
            }
        });
        let ours = combine_header(dispatched, MANAGER_AGRS, dtype_code, seq, 0);
        let mut header_bytes = Vec::with_capacity(size * DeviceHeader::LEN);
        for dest in 0..size {
            let h = match &local {
                Ok(counts) => DeviceHeader {
                    rows: counts[dest] as u64,
                    ..ours
                },
                Err(_) => DeviceHeader::rejected(COMBINE, MANAGER_AGRS, seq),
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
        let counts = local?;
        check_all(&call, &headers, &ours)?;
        let n = counts.get(me).copied().unwrap_or(0);
        check_rows(&call, &headers, &vec![n; size])?;

        let row_bytes = dispatched.row_bytes;
        let partial = partial_sums(&call, dispatched, &outputs)?;
        let back = alloc_bytes(&call, stream, size * n * row_bytes)?;
        let (partial_base, back_base) = (addr(&partial, stream), addr(&back, stream));
        let partial_off = block_offsets(counts, row_bytes);
        let blocks: Vec<Vec<Block>> = (0..size)
            .map(|peer| {
                vec![Block {
                    send: (
                        partial_base + partial_off[peer] as u64,
                        counts[peer] * row_bytes,
                    ),
                    recv: (back_base + (peer * n * row_bytes) as u64, n * row_bytes),
                }]
            })
            .collect();
        exchange_blocks(&call, engine, &blocks, deadline)?;
        drop(partial);
        token_sums(&call, dispatched, back_base)
    }
}
