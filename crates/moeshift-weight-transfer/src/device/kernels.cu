// Device kernels of moeshift-weight-transfer.
//
// `kernels.ptx` next to this file is this source compiled to PTX (ISA 8.0, target sm_80, so
// the driver JIT-compiles it for any GPU from Ampere on); the crate embeds the PTX text and
// loads it at run time, so building needs no CUDA toolkit. After editing this file,
// regenerate the PTX with `python3 scripts/gen_ptx.py` and this file's path (it needs
// libnvrtc.so, e.g. from the nvidia-cuda-nvrtc-cu12 wheel, and checks the result with ptxas
// when one is on PATH).
//
// Every kernel walks its work with grid-stride loops, so any grid size is correct; the host
// side picks sizes for speed only.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define NO_BAD 0xffffffffffffffffull

// Sparse patches of one update, staged back to back: parameter p owns
// idx[starts[p] .. starts[p] + counts[p]].
//
// first_bad[p] (set to NO_BAD before the launch) becomes the smallest position j of
// parameter p whose index is negative, not below numels[p], or not larger than the index at
// j - 1. Device engines apply patches with strictly increasing indices only: then no two
// entries write the same element and the scatter is race-free.
extern "C" __global__ void msh_check_indices(const int* __restrict__ idx,
                                             const u64* __restrict__ starts,
                                             const u64* __restrict__ counts,
                                             const u64* __restrict__ numels,
                                             u32 nparams,
                                             u64* __restrict__ first_bad) {
    for (u32 p = blockIdx.y; p < nparams; p += gridDim.y) {
        const u64 start = starts[p];
        const u64 count = counts[p];
        const u64 numel = numels[p];
        const u64 stride = (u64)gridDim.x * blockDim.x;
        for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < count; j += stride) {
            const long long v = idx[start + j];
            bool bad = v < 0 || (u64)v >= numel;
            if (!bad && j > 0) {
                bad = v <= (long long)idx[start + j - 1];
            }
            if (bad) {
                atomicMin(&first_bad[p], j);
            }
        }
    }
}

// Writes value j of parameter p to element idx[idx_starts[p] + j] of the parameter at device
// address dsts[p]. Values of parameter p start at byte vals[val_starts[p]], elems[p] bytes
// each (1, 2, 4 or 8; both the values and the destination are aligned to it).
extern "C" __global__ void msh_scatter(const int* __restrict__ idx,
                                       const u8* __restrict__ vals,
                                       const u64* __restrict__ dsts,
                                       const u64* __restrict__ idx_starts,
                                       const u64* __restrict__ counts,
                                       const u64* __restrict__ val_starts,
                                       const u64* __restrict__ elems,
                                       u32 nparams) {
    for (u32 p = blockIdx.y; p < nparams; p += gridDim.y) {
        const u64 dst = dsts[p];
        const int* ix = idx + idx_starts[p];
        const u8* src = vals + val_starts[p];
        const u64 count = counts[p];
        const u64 e = elems[p];
        const u64 stride = (u64)gridDim.x * blockDim.x;
        for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < count; j += stride) {
            const u64 i = (u64)ix[j];
            switch (e) {
            case 1:
                ((u8*)dst)[i] = src[j];
                break;
            case 2:
                ((u16*)dst)[i] = ((const u16*)src)[j];
                break;
            case 4:
                ((u32*)dst)[i] = ((const u32*)src)[j];
                break;
            case 8:
                ((u64*)dst)[i] = ((const u64*)src)[j];
                break;
            default:
                break;
            }
        }
    }
}

// Gathers sparse patches into one staged update: parameter p's counts[p] int32 indices at
// device address src_idx[p] go to idx[idx_starts[p] ..], and its values (elems[p] bytes each:
// 1, 2, 4 or 8, sources and destinations aligned to it) at src_vals[p] go to byte
// vals[val_starts[p]] on. One launch stages every device patch of an update.
extern "C" __global__ void msh_gather(int* __restrict__ idx,
                                      u8* __restrict__ vals,
                                      const u64* __restrict__ src_idx,
                                      const u64* __restrict__ src_vals,
                                      const u64* __restrict__ idx_starts,
                                      const u64* __restrict__ counts,
                                      const u64* __restrict__ val_starts,
                                      const u64* __restrict__ elems,
                                      u32 nparams) {
    for (u32 p = blockIdx.y; p < nparams; p += gridDim.y) {
        const int* si = (const int*)src_idx[p];
        const u8* sv = (const u8*)src_vals[p];
        int* di = idx + idx_starts[p];
        u8* dv = vals + val_starts[p];
        const u64 count = counts[p];
        const u64 e = elems[p];
        const u64 stride = (u64)gridDim.x * blockDim.x;
        for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < count; j += stride) {
            di[j] = si[j];
            switch (e) {
            case 1:
                dv[j] = sv[j];
                break;
            case 2:
                ((u16*)dv)[j] = ((const u16*)sv)[j];
                break;
            case 4:
                ((u32*)dv)[j] = ((const u32*)sv)[j];
                break;
            case 8:
                ((u64*)dv)[j] = ((const u64*)sv)[j];
                break;
            default:
                break;
            }
        }
    }
}

// True when element i of the two buffers differs bit for bit.
__device__ __forceinline__ bool differs(const u8* a, const u8* b, u64 i, u32 e) {
    switch (e) {
    case 1:
        return a[i] != b[i];
    case 2:
        return ((const u16*)a)[i] != ((const u16*)b)[i];
    case 4:
        return ((const u32*)a)[i] != ((const u32*)b)[i];
    default:
        return ((const u64*)a)[i] != ((const u64*)b)[i];
    }
}

__device__ __forceinline__ void copy_elem(u8* dst, u64 j, const u8* src, u64 i, u32 e) {
    switch (e) {
    case 1:
        dst[j] = src[i];
        break;
    case 2:
        ((u16*)dst)[j] = ((const u16*)src)[i];
        break;
    case 4:
        ((u32*)dst)[j] = ((const u32*)src)[i];
        break;
    default:
        ((u64*)dst)[j] = ((const u64*)src)[i];
        break;
    }
}

// Diff, pass 1: block b counts the changed elements of its tile [b * tile, (b + 1) * tile)
// of the n elements (elem bytes each) into counts[b]. blockDim.x must be a multiple of 32;
// counts must be zeroed before the launch. One block per tile (no grid stride: the host
// launches exactly ceil(n / tile) blocks).
extern "C" __global__ void msh_diff_count(const u8* __restrict__ prev,
                                          const u8* __restrict__ cur,
                                          u64 n,
                                          u32 elem,
                                          u64 tile,
                                          u32* __restrict__ counts) {
    const u64 begin = (u64)blockIdx.x * tile;
    u64 end = begin + tile;
    if (end > n) {
        end = n;
    }
    u32 mine = 0;
    for (u64 i = begin + threadIdx.x; i < end; i += blockDim.x) {
        mine += differs(prev, cur, i, elem) ? 1u : 0u;
    }
    for (int off = 16; off > 0; off >>= 1) {
        mine += __shfl_down_sync(0xffffffffu, mine, off);
    }
    if ((threadIdx.x & 31) == 0 && mine != 0) {
        atomicAdd(&counts[blockIdx.x], mine);
    }
}

// Diff, pass 2: block b writes the flat indices and new values of the changed elements of its
// tile, in ascending order, starting at output position offsets[b] (the exclusive prefix sum
// of pass 1's counts). blockDim.x must be a multiple of 32 and at most 1024.
extern "C" __global__ void msh_diff_write(const u8* __restrict__ prev,
                                          const u8* __restrict__ cur,
                                          u64 n,
                                          u32 elem,
                                          u64 tile,
                                          const u64* __restrict__ offsets,
                                          int* __restrict__ out_idx,
                                          u8* __restrict__ out_vals) {
    __shared__ u32 warp_totals[32];
    const u32 lane = threadIdx.x & 31;
    const u32 warp = threadIdx.x >> 5;
    const u32 warps = blockDim.x >> 5;
    const u64 begin = (u64)blockIdx.x * tile;
    u64 end = begin + tile;
    if (end > n) {
        end = n;
    }
    u64 next = offsets[blockIdx.x];
    // Every thread runs the same number of rounds, so the ballots and barriers below are
    // reached by the whole block.
    for (u64 base = begin; base < end; base += blockDim.x) {
        const u64 i = base + threadIdx.x;
        const bool changed = i < end && differs(prev, cur, i, elem);
        const u32 ballot = __ballot_sync(0xffffffffu, changed);
        if (lane == 0) {
            warp_totals[warp] = __popc(ballot);
        }
        __syncthreads();
        u32 before = 0;
        u32 total = 0;
        for (u32 w = 0; w < warps; ++w) {
            const u32 t = warp_totals[w];
            before += w < warp ? t : 0u;
            total += t;
        }
        if (changed) {
            const u64 pos = next + before + __popc(ballot & ((1u << lane) - 1u));
            out_idx[pos] = (int)i;
            copy_elem(out_vals, pos, cur, i, elem);
        }
        next += total;
        // warp_totals is rewritten next round: wait until everyone has read it.
        __syncthreads();
    }
}
