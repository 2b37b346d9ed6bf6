"""PyTorch peer of `examples/all2all_bw.rs`: the same bytes per rank moved with
torch.distributed over NCCL, one process per GPU (torch.multiprocessing).

  python3 torch_all2all_peer.py [--splits FILE] [--ranks 2] [--tokens 4096] [--hidden 7168]
                                [--reps 9] [--warmup 3] [--out FILE]

- `all_to_all_single`: a dispatch-sized exchange (rank r sends send_rows[r][d] bf16 rows of
  `hidden` to rank d) then a combine-sized one (the same split sizes, reversed). With
  --splits (the JSON that `all2all_bw --splits-out` writes) the split sizes are exactly the
  Rust benchmark's (and so is the rank count); without it they are drawn the same way
  (uniform top-8 of 256 experts, 256 / ranks per GPU) from torch's generator.
- `all_gather_reduce_scatter`: `all_gather_into_tensor` of every rank's `tokens` rows, then
  `reduce_scatter_tensor` (sum) of the same size: the exchanges vLLM's default
  allgather_reducescatter backend makes.

Each timed repetition starts after a barrier (an all-reduce of one element) and measures
the first exchange, then the second until the GPU is done; medians of `reps` after `warmup`.
GB/s per GPU = row bytes sent to and received from the other GPUs in both exchanges / total
time, as in the Rust benchmark. Prints one JSON object with the same keys; --out also writes
it to a file.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOP_K = 8
EXPERTS = 256


def drawn_splits(tokens, ranks):
    """send_rows[r][d]: tokens of rank r with at least one of their top-8 experts on GPU d."""
    per_gpu = EXPERTS // ranks
    rows = []
    for r in range(ranks):
        g = torch.Generator().manual_seed(0x5EED_A2A0 + r)
        picks = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(tokens)])
        owner = picks // per_gpu
        rows.append([int((owner == d).any(dim=1).sum()) for d in range(ranks)])
    return rows


def median_ms(times):
    return statistics.median(times) * 1e3


def timed(fn_first, fn_second, barrier, reps, warmup):
    for _ in range(warmup):
        fn_first()
        fn_second()
    torch.cuda.synchronize()
    first, second, total = [], [], []
    for _ in range(reps):
        barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn_first()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        fn_second()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        first.append(t1 - t0)
        second.append(t2 - t1)
        total.append(t2 - t0)
    return median_ms(first), median_ms(second), median_ms(total)


def entry(d_ms, c_ms, t_ms, nbytes):
    return {
        "dispatch_ms": round(d_ms, 4),
        "combine_ms": round(c_ms, 4),
        "total_ms": round(t_ms, 4),
        "bytes_per_gpu": nbytes,
        "GBps_per_gpu": round(nbytes / (t_ms / 1e3) / 1e9, 3),
    }


def worker(rank, args, send_rows, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    ranks = len(send_rows)
    dist.init_process_group("nccl", rank=rank, world_size=ranks, device_id=dev)
    hidden, tokens = args.hidden, args.tokens
    row_bytes = hidden * 2
    one = torch.zeros(1, device=dev)

    def barrier():
        dist.all_reduce(one)

    # all_to_all_single with the all-to-all-v split sizes.
    out_splits = [send_rows[s][rank] for s in range(ranks)]
    in_splits = [send_rows[rank][d] for d in range(ranks)]
    send = torch.randn(sum(in_splits), hidden, device=dev).to(torch.bfloat16)
    recv = torch.empty(sum(out_splits), hidden, dtype=torch.bfloat16, device=dev)
    back = torch.empty_like(send)

    def dispatch():
        dist.all_to_all_single(recv, send, out_splits, in_splits)

    def combine():
        dist.all_to_all_single(back, recv, in_splits, out_splits)

    d_ms, c_ms, t_ms = timed(dispatch, combine, barrier, args.reps, args.warmup)
    others = [p for p in range(ranks) if p != rank]
    crossing = sum(send_rows[rank][p] + send_rows[p][rank] for p in others)
    a2a_bytes = crossing * row_bytes * 2
    result = {"all_to_all_single": entry(d_ms, c_ms, t_ms, a2a_bytes)}
    del send, recv, back

    # All-gather then reduce-scatter of every rank's tokens.
    mine = torch.randn(tokens, hidden, device=dev).to(torch.bfloat16)
    gathered = torch.empty(ranks * tokens, hidden, dtype=torch.bfloat16, device=dev)
    reduced = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=dev)

    def gather():
        dist.all_gather_into_tensor(gathered, mine)

    def scatter():
        dist.reduce_scatter_tensor(reduced, gathered)

    d_ms, c_ms, t_ms = timed(gather, scatter, barrier, args.reps, args.warmup)
    agrs_bytes = 2 * (ranks - 1) * tokens * row_bytes * 2
    result["all_gather_reduce_scatter"] = entry(d_ms, c_ms, t_ms, agrs_bytes)
    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def nccl_version():
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    if args.reps < 5:
        sys.exit("--reps must be at least 5")
    source = "drawn"
    if args.splits and os.path.exists(args.splits):
        with open(args.splits) as f:
            spec = json.load(f)
        send_rows = spec["send_rows"]
        args.tokens, args.hidden = spec["tokens_per_rank"], spec["hidden"]
        source = args.splits
    else:
        if args.ranks < 1 or EXPERTS % args.ranks:
            sys.exit(f"--ranks {args.ranks} does not divide the {EXPERTS} experts")
        send_rows = drawn_splits(args.tokens, args.ranks)
    ranks = len(send_rows)
    if torch.cuda.device_count() < ranks:
        sys.exit(f"{torch.cuda.device_count()} GPU(s) visible; {ranks} needed")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(worker, args=(args, send_rows, free_port(), queue), nprocs=ranks, join=True)
    managers = queue.get()
    out = {
        "bench": "all2all_bw",
        "impl": "torch",
        "gpu": torch.cuda.get_device_name(0),
        "nccl": nccl_version(),
        "torch": torch.__version__,
        "ranks": ranks,
        "tokens_per_rank": args.tokens,
        "hidden": args.hidden,
        "dtype": "bf16",
        "top_k": TOP_K,
        "experts": EXPERTS,
        "reps": args.reps,
        "warmup": args.warmup,
        "send_rows": send_rows,
        "splits_from": source,
        "timing": "rank 0 wall clock, median; each repetition starts after an all-reduce "
        "barrier; first exchange, then second until the GPU is done",
        "managers": managers,
    }
    text = json.dumps(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
