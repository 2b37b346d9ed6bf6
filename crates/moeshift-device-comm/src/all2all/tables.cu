// Dispatch tables of the CUDA all-to-all managers, built on the GPU.
//
// Compiled to `tables.ptx` by `scripts/gen_ptx.py` (NVRTC, compute_80); the crate ships the
// PTX and the driver JIT-compiles it when a manager is created.
//
// Two stable bucket sorts do the work:
//
// - send side: every token goes once to every rank that serves one of its picks, the tokens
//   of one destination in token order (`msh_split_count`, `msh_scan`, `msh_split_place`);
// - receive side: every received pick served by this rank becomes a work item, the items
//   sorted by local slot and, within a slot, in receive order (`msh_items_count`,
//   `msh_scan`, `msh_items_place`).
//
// Both walk the picks in fixed chunks of `chunk` picks. The count kernel counts, per bucket
// and chunk, the picks that enter a bucket; `msh_scan` turns the counts (bucket-major) into
// the first position of every (bucket, chunk) and the number of counted picks before every
// chunk; the place kernel walks each chunk with one warp, 32 picks at a time, in pick order,
// so that the positions come out exactly as a sequential pass would give them. Every value
// is the same on every run: no result depends on the order of atomic operations.
//
// Pick metadata entries are 64-bit words: slot in the low half, the router weight's bits in
// the high half; NO_PICK marks a pick another rank serves.

typedef unsigned int u32;
typedef unsigned long long u64;

#define NO_PICK 0xffffffffu
#define NONE 0xffffffffu
#define FULL 0xffffffffu

// The splitmix64 finalizer (see `replica.rs`).
__device__ __forceinline__ u64 splitmix64(u64 x) {
    u64 z = x + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ u64 entry(u32 slot, float weight) {
    return (u64)slot | ((u64)__float_as_uint(weight) << 32);
}

// The rank serving `slot`, or NONE.
__device__ __forceinline__ u32 dest_of(u32 slot, u32 spr, u32 size) {
    if (slot == NO_PICK || spr == 0) return NONE;
    u32 d = slot / spr;
    return d < size ? d : NONE;
}

// Pick `i` of `picks` (`top_k` per token) to its physical slot: replica
// `splitmix64(((me << 32 | token) << 8) | k) mod count` of the expert's `count` replicas,
// `rep_slots[rep_start[e]..rep_start[e + 1]]`. An expert past `num_logical` or without
// replicas is an error: `err` keeps the smallest `(pick << 32) | expert`. With `meta`, also
// writes every pick's entry (slot, weight).
extern "C" __global__ void msh_route(const u32* ids, const float* weights, u32 picks, u32 top_k,
                                     u32 me, u32 num_logical, const u32* rep_start,
                                     const u32* rep_slots, u32* slots, u64* meta, u64* err) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < picks; i += gridDim.x * blockDim.x) {
        u32 id = ids[i];
        u32 slot = NO_PICK;
        if (id < num_logical) {
            u32 first = rep_start[id];
            u32 count = rep_start[id + 1] - first;
            if (count == 1) {
                slot = rep_slots[first];
            } else if (count > 1) {
                u32 t = i / top_k;
                u32 k = i - t * top_k;
                u64 key = ((u64)me << 32) | t;
                u64 h = splitmix64((key << 8) | (k & 0xff));
                slot = rep_slots[first + (u32)(h % count)];
            }
        }
        if (slot == NO_PICK) atomicMin(err, ((u64)i << 32) | id);
        slots[i] = slot;
        if (meta) meta[i] = entry(slot, weights[i]);
    }
}

// Whether pick `k` of a token whose picks start at `row` is the first with its destination.
__device__ __forceinline__ bool first_of_dest(const u32* row, u32 k, u32 d, u32 spr, u32 size) {
    for (u32 j = 0; j < k; ++j) {
        if (dest_of(row[j], spr, size) == d) return false;
    }
    return true;
}

// Send side, pass 1: per destination `d` and chunk `c`, the tokens of the chunk's picks that
// go to `d` (counted at their first pick with that destination) into `counts[d * chunks + c]`
// (zeroed by the caller).
extern "C" __global__ void msh_split_count(const u32* slots, u32 picks, u32 top_k, u32 spr,
                                           u32 size, u32 chunk, u32 chunks, u32* counts) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < picks; i += gridDim.x * blockDim.x) {
        u32 t = i / top_k;
        u32 k = i - t * top_k;
        const u32* row = slots + (u64)t * top_k;
        u32 d = dest_of(row[k], spr, size);
        if (d != NONE && first_of_dest(row, k, d, spr, size)) {
            atomicAdd(&counts[(u64)d * chunks + i / chunk], 1u);
        }
    }
}

// Exclusive scan of `a[0..len]` in place by the whole block (`sums`: one word per thread);
// returns the total.
__device__ u32 block_scan(u32* a, u32 len, u32* sums) {
    u32 tid = threadIdx.x;
    u32 per = (len + blockDim.x - 1) / blockDim.x;
    u32 lo = min(tid * per, len);
    u32 hi = min(lo + per, len);
    u32 s = 0;
    for (u32 i = lo; i < hi; ++i) s += a[i];
    sums[tid] = s;
    __syncthreads();
    for (u32 off = 1; off < blockDim.x; off <<= 1) {
        u32 v = tid >= off ? sums[tid - off] : 0;
        __syncthreads();
        sums[tid] += v;
        __syncthreads();
    }
    u32 run = tid ? sums[tid - 1] : 0;
    u32 total = sums[blockDim.x - 1];
    __syncthreads();
    for (u32 i = lo; i < hi; ++i) {
        u32 v = a[i];
        a[i] = run;
        run += v;
    }
    __syncthreads();
    return total;
}

// Pass 2 (one block of 1024 threads): `counts` (`buckets × chunks`, bucket-major) becomes the
// first position of every (bucket, chunk); `bucket_offsets[b]` the first position of bucket
// `b` (`buckets + 1` values); `chunk_base[c]` the number of counted picks before chunk `c`
// (`chunks + 1` values).
extern "C" __global__ void msh_scan(u32* counts, u32 buckets, u32 chunks, u32* bucket_offsets,
                                    u32* chunk_base) {
    __shared__ u32 sums[1024];
    for (u32 c = threadIdx.x; c < chunks; c += blockDim.x) {
        u32 s = 0;
        for (u32 b = 0; b < buckets; ++b) s += counts[(u64)b * chunks + c];
        chunk_base[c] = s;
    }
    __syncthreads();
    u32 picked = block_scan(chunk_base, chunks, sums);
    u32 total = block_scan(counts, buckets * chunks, sums);
    for (u32 b = threadIdx.x; b < buckets; b += blockDim.x) {
        bucket_offsets[b] = chunks ? counts[(u64)b * chunks] : 0;
    }
    if (threadIdx.x == 0) {
        bucket_offsets[buckets] = total;
        chunk_base[chunks] = picked;
    }
}

// The warp's position among the lanes with the same `key`, and the number of such lanes.
// Every lane of the warp calls it.
__device__ __forceinline__ u32 lanes_before(u32 key, u32 lane, u32* same) {
    u32 peers = __match_any_sync(FULL, key);
    *same = __popc(peers);
    return __popc(peers & ((1u << lane) - 1));
}

// Send side, pass 3 (blocks of 128 threads, one warp per chunk): for every (token, destination)
// its row `pos` in the send buffer (destinations in rank order, tokens ascending within one):
// `send_index[pos] = token`, the token's `top_k` entries at `send_meta[pos * top_k ..]` (the
// slot for picks served by that destination, NO_PICK for the others), and the token's
// returned rows in rank order of destination: `token_rows[token_offsets[t] ..
// token_offsets[t + 1]]` (`tokens + 1` offsets).
extern "C" __global__ void msh_split_place(const u32* slots, const float* weights, u32 picks,
                                           u32 top_k, u32 spr, u32 size, u32 chunk, u32 chunks,
                                           u32* base, const u32* chunk_base, u32* send_index,
                                           u64* send_meta, u32* token_offsets, u32* token_rows) {
    u32 lane = threadIdx.x & 31;
    u32 c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (c >= chunks) return;
    if (c == 0 && lane == 0) token_offsets[picks / top_k] = chunk_base[chunks];
    u32 run = chunk_base[c];
    u32 end = min((c + 1) * chunk, picks);
    u32 lt = (1u << lane) - 1;
    for (u32 w = c * chunk; w < end; w += 32) {
        u32 i = w + lane;
        bool valid = i < end;
        u32 t = 0, k = 0, d = NONE;
        const u32* row = slots;
        if (valid) {
            t = i / top_k;
            k = i - t * top_k;
            row = slots + (u64)t * top_k;
            d = dest_of(row[k], spr, size);
        }
        bool first = d != NONE && first_of_dest(row, k, d, spr, size);
        u32 same;
        u32 rank = lanes_before(first ? d : NONE, lane, &same);
        u32 pos = 0;
        if (first) pos = base[(u64)d * chunks + c] + rank;
        __syncwarp();
        if (first && rank == 0) base[(u64)d * chunks + c] += same;
        __syncwarp();
        u32 firsts = __ballot_sync(FULL, first);
        if (first) {
            // This pick's index among the counted picks, in pick order, is the token's first
            // returned row plus the counted picks of the token before it.
            u32 index = run + __popc(firsts & lt);
            u32 before = 0, below = 0;
            for (u32 j = 0; j < top_k; ++j) {
                u32 dj = dest_of(row[j], spr, size);
                if (dj == NONE || !first_of_dest(row, j, dj, spr, size)) continue;
                if (j < k) ++before;
                if (dj < d) ++below;
            }
            u32 offset = index - before;
            if (before == 0) token_offsets[t] = offset;
            token_rows[offset + below] = pos;
            send_index[pos] = t;
            u64* out = send_meta + (u64)pos * top_k;
            const float* wrow = weights + (u64)t * top_k;
            for (u32 j = 0; j < top_k; ++j) {
                u32 s = row[j];
                out[j] = entry(dest_of(s, spr, size) == d ? s : NO_PICK, wrow[j]);
            }
        }
        run += __popc(firsts);
    }
}

// Whether a received pick with `slot` is a work item of rank `me`; `bad` when the entry is
// malformed (a slot without expert, or another rank's slot when those are refused).
__device__ __forceinline__ bool is_item(u32 slot, u32 me, u32 spr, u32 num_physical,
                                        const u32* phys_logical, u32 skip_foreign, bool* bad) {
    *bad = false;
    if (slot == NO_PICK) return false;
    if (slot >= num_physical || phys_logical[slot] == NONE) {
        *bad = true;
        return false;
    }
    if (slot / spr != me) {
        *bad = skip_foreign == 0;
        return false;
    }
    return true;
}

// Receive side, pass 1: per local slot `s` and chunk `c`, the received picks of the chunk
// that are this rank's work items into `counts[s * chunks + c]` (zeroed by the caller); the
// smallest `(pick << 32) | slot` of a malformed entry into `err`.
extern "C" __global__ void msh_items_count(const u64* meta, u32 picks, u32 me, u32 spr,
                                           u32 num_physical, const u32* phys_logical,
                                           u32 skip_foreign, u32 chunk, u32 chunks, u32* counts,
                                           u64* err) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < picks; i += gridDim.x * blockDim.x) {
        u32 slot = (u32)meta[i];
        bool bad;
        if (is_item(slot, me, spr, num_physical, phys_logical, skip_foreign, &bad)) {
            atomicAdd(&counts[(u64)(slot - me * spr) * chunks + i / chunk], 1u);
        } else if (bad) {
            atomicMin(err, ((u64)i << 32) | slot);
        }
    }
}

// Receive side, pass 3 (blocks of 128 threads, one warp per chunk): every work item at its
// position `pos` (sorted by local slot, receive order within one): `item_rows[pos]`,
// `item_weights[pos]`; and per received row the items that read it, ascending:
// `row_items[row_offsets[r] .. row_offsets[r + 1]]` with their weights in `row_weights`.
extern "C" __global__ void msh_items_place(const u64* meta, u32 picks, u32 top_k, u32 me,
                                           u32 spr, u32 num_physical, const u32* phys_logical,
                                           u32 skip_foreign, u32 chunk, u32 chunks, u32* base,
                                           const u32* chunk_base, u32* item_rows,
                                           float* item_weights, u32* row_offsets,
                                           u32* row_items, float* row_weights) {
    u32 lane = threadIdx.x & 31;
    u32 c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (c >= chunks) return;
    if (c == 0 && lane == 0) row_offsets[picks / top_k] = chunk_base[chunks];
    u32 run = chunk_base[c];
    u32 end = min((c + 1) * chunk, picks);
    u32 lt = (1u << lane) - 1;
    u32 first_slot = me * spr;
    for (u32 w = c * chunk; w < end; w += 32) {
        u32 i = w + lane;
        bool valid = i < end;
        u32 r = 0, k = 0, slot = NO_PICK;
        u64 e = 0;
        bool bad, item = false;
        if (valid) {
            r = i / top_k;
            k = i - r * top_k;
            e = meta[i];
            slot = (u32)e;
            item = is_item(slot, me, spr, num_physical, phys_logical, skip_foreign, &bad);
        }
        u32 local = slot - first_slot;
        u32 same;
        u32 rank = lanes_before(item ? local : NONE, lane, &same);
        u32 pos = 0;
        if (item) pos = base[(u64)local * chunks + c] + rank;
        __syncwarp();
        if (item && rank == 0) base[(u64)local * chunks + c] += same;
        __syncwarp();
        u32 items = __ballot_sync(FULL, item);
        u32 index = run + __popc(items & lt);
        if (valid && k == 0) row_offsets[r] = index;
        if (item) {
            float weight = __uint_as_float((u32)(e >> 32));
            item_rows[pos] = r;
            item_weights[pos] = weight;
            // The row's list is in position order: local slot, then pick.
            u32 before = 0, below = 0;
            const u64* row = meta + (u64)r * top_k;
            for (u32 j = 0; j < top_k; ++j) {
                u32 sj = (u32)row[j];
                bool bj;
                if (!is_item(sj, me, spr, num_physical, phys_logical, skip_foreign, &bj)) continue;
                u32 lj = sj - first_slot;
                if (j < k) ++before;
                if (lj < local || (lj == local && j < k)) ++below;
            }
            u32 at = index - before + below;
            row_items[at] = pos;
            row_weights[at] = weight;
        }
        run += __popc(items);
    }
}

// The send headers (`size` headers of `header_len` bytes): with `bucket_offsets`, every
// destination's row count (`bucket_offsets[d + 1] - bucket_offsets[d]`, a u64 at byte
// `rows_at`; left alone without) and, when routing failed (`err` set), the rejected status
// (a u32 at byte `status_at`). One thread.
extern "C" __global__ void msh_fill_headers(unsigned char* headers, u32 size, u32 header_len,
                                            u32 rows_at, u32 status_at, u32 rejected,
                                            const u32* bucket_offsets, const u64* err) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    bool failed = *err != ~0ull;
    for (u32 d = 0; d < size; ++d) {
        unsigned char* h = headers + (u64)d * header_len;
        if (bucket_offsets) {
            *(u64*)(h + rows_at) = (u64)(bucket_offsets[d + 1] - bucket_offsets[d]);
        }
        if (failed) *(u32*)(h + status_at) = rejected;
    }
}

// The segment lists of the final sum after a reduce-scatter: `size` blocks of `tokens` rows
// came back, token `t` sums row `t` of every block in rank order: `token_offsets[t] =
// t * size` (`tokens + 1` offsets), `token_rows[t * size + r] = r * tokens + t`.
extern "C" __global__ void msh_strided(u32* token_offsets, u32* token_rows, u32 tokens,
                                       u32 size) {
    u32 all = tokens * size;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i <= all; i += gridDim.x * blockDim.x) {
        if (i == all) {
            token_offsets[tokens] = all;
            continue;
        }
        u32 t = i / size;
        u32 r = i - t * size;
        if (r == 0) token_offsets[t] = i;
        token_rows[i] = r * tokens + t;
    }
}
