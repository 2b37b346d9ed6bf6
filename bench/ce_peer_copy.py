"""Copy-engine peer bandwidth between GPU 0 and GPU 1, from one process.

  python3 ce_peer_copy.py [--mib 1024] [--reps 5]

What a one-sided READ over CUDA IPC can reach: device-to-device copies of GPU 1's memory into
GPU 0's (and, "both ways", GPU 0's into GPU 1's at the same time), issued as `--mib` MiB split
evenly over 1, 2, 4 or 8 CUDA streams per direction. Medians of `reps` timed repetitions after
one warm-up. Prints one JSON object: GB/s per direction for each stream count.
"""
import argparse
import json
import statistics
import time

import torch


def run(nbytes, streams, both, reps):
    a = [torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{d}") for d in (0, 1)]
    b = [torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{d}") for d in (0, 1)]
    dirs = [(0, 1), (1, 0)] if both else [(0, 1)]  # (reader, source)
    pools = {r: [torch.cuda.Stream(device=r) for _ in range(streams)] for r, _ in dirs}
    chunk = nbytes // streams

    def once():
        for d in (0, 1):
            torch.cuda.synchronize(d)
        start = time.perf_counter()
        for reader, src in dirs:
            for i, s in enumerate(pools[reader]):
                with torch.cuda.stream(s):
                    lo, hi = i * chunk, (i + 1) * chunk if i < streams - 1 else nbytes
                    b[reader][lo:hi].copy_(a[src][lo:hi], non_blocking=True)
        for reader, _ in dirs:
            for s in pools[reader]:
                s.synchronize()
        return time.perf_counter() - start

    once()
    t = statistics.median(once() for _ in range(reps))
    return nbytes / t / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs 2 GPUs")
    nbytes = args.mib << 20
    out = {"bytes": nbytes, "one_way_GBps": {}, "both_ways_GBps_per_direction": {}}
    for streams in (1, 2, 4, 8):
        out["one_way_GBps"][streams] = round(run(nbytes, streams, False, args.reps), 1)
        out["both_ways_GBps_per_direction"][streams] = round(run(nbytes, streams, True, args.reps), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
