"""PyTorch peer of `moeshift bench eplb-comm`: the rows of a plan file (written by the bench's
`--plan-out`) moved with torch.distributed's batch_isend_irecv, one process per GPU
(torch.multiprocessing).

  python3 torch_eplb_peer.py --plan FILE [--reps 5] [--warmup 2] [--out FILE]
                             [--backend nccl|gloo]

The plan file holds `ranks`, `slots_per_rank`, `tensor_bytes` (bytes of one expert row of
each tensor) and per layer `moves` ([src_rank, src_row, dst_rank, dst_row]: receives over the
wire when the ranks differ, local copies otherwise, both reading the rows' old content) and
`fills` ([rank, src_row, dst_row]: a further replica of an expert that arrived over the wire,
copied from the received row). Rank r (GPU r with nccl; gloo and CPU tensors are only a smoke
test for machines without GPUs) holds per tensor a `[slots_per_rank, tensor_bytes / 2]` bf16
weight tensor (uint8 `[slots_per_rank, tensor_bytes]` when the size is odd) and a whole-layer
staging tensor of the same shape. Per layer it does what vLLM's torch communicator does:

1. ONE batch_isend_irecv with one op per (cross-rank move, tensor): the sender's weight row
   into the receiver's staging row. Both sides order the ops by (src, dst, dst_row, tensor),
   so every pair of ranks posts its sends and receives in the same order (one source row may
   go to several ranks). The P2POp lists are built once, before timing;
2. the same-rank copies, weight row into staging row (while the transfers run);
3. after the receives completed, the fills, staging row into staging row;
4. every written staging row copied into place.

The same weight tensors serve every layer; before each layer (untimed) they are restored
from a pristine copy, so every repetition moves the same bytes. Row r of rank k, tensor t
starts with a pattern derived from (k, r, t); after the last repetition every row of every
layer is checked (a moved row must hold its source row's pattern, a fill the pattern its
source row received, any other row its own).

Timing: each layer starts after a barrier (an all-reduce of one element) and a device
synchronize and ends after torch.cuda.synchronize(); per layer the median over `reps`
repetitions after `warmup`, then the slowest rank's median (all_reduce MAX). `seconds` is
their sum over the layers, `bytes_moved` the expert-row bytes received over the wire summed
over ranks and layers, `GBps_per_rank = bytes_moved / ranks / seconds / 1e9`, as in the Rust
benchmark. Prints one JSON object; --out also writes it to a file.
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

# Row patterns: 62-bit words, each a pair of affine functions of the word index modulo a
# prime, offset by a seed derived from (rank, row, tensor). Rows with different seeds differ
# in every word; every intermediate value fits in an int64.
PRIME = 2147483647
MUL_LO = 48271
MUL_HI = 69621
MASK64 = (1 << 64) - 1


def mix64(x):
    """The splitmix64 finaliser, on Python ints."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def row_seed(rank, row, tensor):
    x = mix64(mix64(mix64(rank + 0x5EED) ^ row) ^ (tensor + 0x7E45))
    return x % (PRIME - 1) + 1


def pattern(nbytes, seed, device):
    """`nbytes` uint8 values of the pattern of `seed`."""
    words = (nbytes + 7) // 8
    x = torch.arange(words, dtype=torch.int64, device=device) % PRIME
    lo = (x * MUL_LO + seed) % PRIME
    hi = (lo * MUL_HI + seed) % PRIME
    return (lo | (hi << 31)).view(torch.uint8)[:nbytes]


def load_plan(path):
    """The plan file, checked: a clear message instead of a hang or an index error later."""
    with open(path) as f:
        plan = json.load(f)
    try:
        ranks, slots = int(plan["ranks"]), int(plan["slots_per_rank"])
        tensor_bytes = [int(b) for b in plan["tensor_bytes"]]
        layers = plan["layers"]
    except (KeyError, TypeError, ValueError) as e:
        sys.exit(f"{path}: not a plan file of `moeshift bench eplb-comm --plan-out` ({e!r})")
    if ranks < 1 or slots < 1 or not tensor_bytes or min(tensor_bytes) < 1 or not layers:
        sys.exit(f"{path}: needs ranks, slots_per_rank, tensor_bytes and layers, all non-empty")
    for li, layer in enumerate(layers):
        written = set()
        for m in layer.get("moves", []):
            if len(m) != 4:
                sys.exit(f"{path}: layer {li}: move {m} is not [src_rank, src_row, dst_rank, dst_row]")
            src, src_row, dst, dst_row = m
            if not (0 <= src < ranks and 0 <= dst < ranks and 0 <= src_row < slots and 0 <= dst_row < slots):
                sys.exit(f"{path}: layer {li}: move {m} is out of range ({ranks} ranks, {slots} slots)")
            if (dst, dst_row) in written:
                sys.exit(f"{path}: layer {li}: row {dst_row} of rank {dst} is written twice")
            written.add((dst, dst_row))
        received = set(written)
        for fill in layer.get("fills", []):
            if len(fill) != 3:
                sys.exit(f"{path}: layer {li}: fill {fill} is not [rank, src_row, dst_row]")
            rank, src_row, dst_row = fill
            if not (0 <= rank < ranks and 0 <= src_row < slots and 0 <= dst_row < slots):
                sys.exit(f"{path}: layer {li}: fill {fill} is out of range")
            if (rank, src_row) not in received:
                sys.exit(f"{path}: layer {li}: fill {fill} reads a row no move writes")
            if (rank, dst_row) in written:
                sys.exit(f"{path}: layer {li}: row {dst_row} of rank {rank} is written twice")
            written.add((rank, dst_row))
    return plan


class RankLayer:
    """What one rank does in one layer."""

    def __init__(self, layer, rank, tensors):
        moves = [tuple(m) for m in layer.get("moves", [])]
        # (src, dst, dst_row, tensor, src_row) of this rank's cross-rank ops, in the order
        # both ends of every pair post them.
        self.p2p = sorted(
            (src, dst, dst_row, t, src_row)
            for (src, src_row, dst, dst_row) in moves
            if src != dst and rank in (src, dst)
            for t in range(tensors)
        )
        self.local = [(s, d) for (src, s, dst, d) in moves if src == dst == rank]
        self.recv_rows = [d for (src, _, dst, d) in moves if dst == rank and src != rank]
        self.fills = [(s, d) for (r, s, d) in layer.get("fills", []) if r == rank]
        self.written = sorted(
            [d for (_, _, dst, d) in moves if dst == rank] + [d for (_, d) in self.fills]
        )
        # Expected source (rank, row) of every written row.
        self.source = {d: (src, s) for (src, s, dst, d) in moves if dst == rank}
        for s, d in self.fills:
            self.source[d] = self.source[s]

    def ops(self, rank, weights, staging):
        out = []
        for src, dst, dst_row, t, src_row in self.p2p:
            if src == rank:
                out.append(dist.P2POp(dist.isend, weights[t][src_row], dst))
            else:
                out.append(dist.P2POp(dist.irecv, staging[t][dst_row], src))
        return out


def worker(rank, args, plan, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ranks, slots = plan["ranks"], plan["slots_per_rank"]
    tensor_bytes = plan["tensor_bytes"]
    cuda = args.backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=ranks, device_id=dev)
    else:
        torch.set_num_threads(1)
        dev = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=ranks)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    one = torch.zeros(1, device=dev)

    def barrier():
        dist.all_reduce(one)

    # Weights, their pristine copy and the whole-layer staging, per tensor.
    weights, staging, pristine = [], [], []
    for t, nbytes in enumerate(tensor_bytes):
        if nbytes % 2 == 0:
            w = torch.empty(slots, nbytes // 2, dtype=torch.bfloat16, device=dev)
        else:
            w = torch.empty(slots, nbytes, dtype=torch.uint8, device=dev)
        raw = w.view(torch.uint8)
        for r in range(slots):
            raw[r].copy_(pattern(nbytes, row_seed(rank, r, t), dev))
        weights.append(w)
        pristine.append(w.clone())
        staging.append(torch.empty_like(w))

    layers = [RankLayer(layer, rank, len(tensor_bytes)) for layer in plan["layers"]]
    layer_ops = [layer.ops(rank, weights, staging) for layer in layers]

    def restore():
        for w, p in zip(weights, pristine):
            w.copy_(p)

    def move(layer, ops):
        reqs = dist.batch_isend_irecv(ops) if ops else []
        for w, s in zip(weights, staging):
            for src_row, dst_row in layer.local:
                s[dst_row].copy_(w[src_row], non_blocking=True)
        for req in reqs:
            req.wait()
        for s in staging:
            for src_row, dst_row in layer.fills:
                s[dst_row].copy_(s[src_row], non_blocking=True)
        for w, s in zip(weights, staging):
            for row in layer.written:
                w[row].copy_(s[row], non_blocking=True)

    def check(li, layer):
        """Rows of this rank that do not hold what the plan says, as messages."""
        bad = []
        for t, (w, nbytes) in enumerate(zip(weights, tensor_bytes)):
            raw = w.view(torch.uint8)
            for r in range(slots):
                src_rank, src_row = layer.source.get(r, (rank, r))
                want = pattern(nbytes, row_seed(src_rank, src_row, t), dev)
                if not torch.equal(raw[r], want):
                    bad.append(
                        f"layer {li}, rank {rank}, row {r}, tensor {t} should hold row "
                        f"{src_row} of rank {src_rank}"
                    )
        return bad

    times = [[] for _ in layers]
    mismatches = []
    for rep in range(args.warmup + args.reps):
        last = rep == args.warmup + args.reps - 1
        for li, (layer, ops) in enumerate(zip(layers, layer_ops)):
            restore()
            sync()
            barrier()
            sync()
            t0 = time.perf_counter()
            move(layer, ops)
            sync()
            elapsed = time.perf_counter() - t0
            if rep >= args.warmup:
                times[li].append(elapsed)
            if last:
                mismatches += check(li, layer)

    failed = torch.tensor([float(len(mismatches))], dtype=torch.float64, device=dev)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item() > 0:
        dist.destroy_process_group()
        if mismatches:
            shown = "; ".join(mismatches[:5])
            raise RuntimeError(f"verification failed ({len(mismatches)} rows): {shown}")
        raise RuntimeError("verification failed on another rank")

    medians = torch.tensor(
        [statistics.median(ts) for ts in times], dtype=torch.float64, device=dev
    )
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    if rank == 0:
        queue.put([float(x) for x in medians.cpu()])
    barrier()
    sync()
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
    p.add_argument("--plan", required=True, help="plan file of `moeshift bench eplb-comm --plan-out`")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    p.add_argument("--out")
    args = p.parse_args()
    if args.reps < 1 or args.warmup < 0:
        sys.exit("--reps must be at least 1 and --warmup at least 0")
    plan = load_plan(args.plan)
    ranks = plan["ranks"]
    if args.backend == "nccl" and torch.cuda.device_count() < ranks:
        sys.exit(
            f"{torch.cuda.device_count()} GPU(s) visible; the plan needs {ranks} "
            "(--backend gloo runs on CPU tensors as a smoke test)"
        )
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(worker, args=(args, plan, free_port(), queue), nprocs=ranks, join=True)
    layer_seconds = queue.get()

    expert_bytes = sum(plan["tensor_bytes"])
    received = [
        sum(1 for m in layer.get("moves", []) if m[0] != m[2]) for layer in plan["layers"]
    ]
    copied = [
        sum(1 for m in layer.get("moves", []) if m[0] == m[2]) + len(layer.get("fills", []))
        for layer in plan["layers"]
    ]
    layer_bytes = [n * expert_bytes for n in received]
    bytes_moved = sum(layer_bytes)
    seconds = sum(layer_seconds)

    def rate(nbytes, secs):
        return nbytes / ranks / secs / 1e9 if secs > 0 else 0.0

    cuda = args.backend == "nccl"
    out = {
        "bench": "eplb_comm",
        "impl": "torch",
        "backend": args.backend,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "nccl": nccl_version() if cuda else None,
        "plan_file": args.plan,
        "plan": plan.get("plan"),
        "ranks": ranks,
        "slots_per_rank": plan["slots_per_rank"],
        "tensor_bytes": plan["tensor_bytes"],
        "expert_bytes": expert_bytes,
        "layers": len(plan["layers"]),
        "reps": args.reps,
        "warmup": args.warmup,
        "layer_rows_received": received,
        "layer_rows_copied": copied,
        "layer_bytes": layer_bytes,
        "bytes_moved": bytes_moved,
        "seconds": seconds,
        "GBps_per_rank": rate(bytes_moved, seconds),
        "layer_seconds": layer_seconds,
        "verified": True,
        "timing": "per layer: barrier, then one batch_isend_irecv, same-rank copies, fills and "
        "copies into place until the device is done; median over reps after warmup, slowest "
        "rank (all_reduce MAX); seconds = sum over layers",
    }
    text = json.dumps(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
