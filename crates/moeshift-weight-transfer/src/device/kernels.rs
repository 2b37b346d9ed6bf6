//! The crate's kernels (`kernels.cu`, shipped as `kernels.ptx`), loaded into a context, and
//! their raw launches. Callers ([`super::sparse`], [`super::diff`]) establish the bounds the
//! launches rely on.
#![allow(unsafe_code)]

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaStream, DriverError, LaunchArgs, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

/// The PTX text of `kernels.cu`.
pub(crate) const PTX: &str = include_str!("kernels.ptx");

/// Entry points the crate loads from [`PTX`].
pub(crate) const ENTRY_POINTS: [&str; 5] = [
    "msh_check_indices",
    "msh_scatter",
    "msh_gather",
    "msh_diff_count",
    "msh_diff_write",
];

/// Threads per block of every launch (a multiple of 32, as the diff kernels need).
pub(crate) const BLOCK: u32 = 256;
/// Largest grid along x for the grid-stride kernels.
const MAX_GRID_X: u64 = 8192;
/// Largest grid along y (CUDA's limit).
const MAX_GRID_Y: usize = 65_535;

/// The kernels, loaded into one context.
#[derive(Debug)]
pub(crate) struct Kernels {
    check: CudaFunction,
    scatter: CudaFunction,
    gather: CudaFunction,
    diff_count: CudaFunction,
    diff_write: CudaFunction,
}

/// Grid of a per-parameter grid-stride launch: x covers the largest parameter, y the
/// parameters.
fn per_param_grid(max_count: usize, nparams: usize) -> LaunchConfig {
    let x = (max_count as u64)
        .div_ceil(u64::from(BLOCK))
        .clamp(1, MAX_GRID_X) as u32;
    let y = nparams.clamp(1, MAX_GRID_Y) as u32;
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Kernels {
    /// Loads the PTX into `ctx` (the driver JIT-compiles it for the device).
    pub(crate) fn load(ctx: &Arc<CudaContext>) -> Result<Arc<Self>, DriverError> {
        let module = ctx.load_module(Ptx::from_src(PTX))?;
        Ok(Arc::new(Self {
            check: module.load_function(ENTRY_POINTS[0])?,
            scatter: module.load_function(ENTRY_POINTS[1])?,
            gather: module.load_function(ENTRY_POINTS[2])?,
            diff_count: module.load_function(ENTRY_POINTS[3])?,
            diff_write: module.load_function(ENTRY_POINTS[4])?,
        }))
    }

    /// `msh_check_indices`. `table` holds `starts`, `counts`, `numels` (each `nparams` u64s)
    /// back to back; `first_bad` receives `nparams` u64s.
    ///
    /// # Safety
    /// Every address is device memory usable from `stream`, live until the kernel finished:
    /// `table` with `3 · nparams` u64s, `first_bad` with `nparams`, and `idx` with at least
    /// `starts[p] + counts[p]` int32s for every `p`.
    pub(crate) unsafe fn check_indices(
        &self,
        stream: &CudaStream,
        idx: u64,
        table: u64,
        nparams: usize,
        max_count: usize,
        first_bad: u64,
    ) -> Result<(), DriverError> {
        if nparams == 0 || max_count == 0 {
            return Ok(());
        }
        let p = nparams as u64 * 8;
        let (starts, counts, numels) = (table, table + p, table + 2 * p);
        let n = nparams as u32;
        let mut b = stream.launch_builder(&self.check);
        b.arg(&idx)
            .arg(&starts)
            .arg(&counts)
            .arg(&numels)
            .arg(&n)
            .arg(&first_bad);
        // SAFETY: argument types match the kernel's signature; the memory contract is the
        // caller's.
        unsafe { b.launch(per_param_grid(max_count, nparams)) }.map(|_| ())
    }

    /// `msh_scatter`. `table` is the same table as for [`Self::check_indices`], followed by
    /// `dsts`, `val_starts` and `elems` (six arrays of `nparams` u64s in all).
    ///
    /// # Safety
    /// As for [`Self::check_indices`], and in addition: for every `p` each index in its
    /// range is in `[0, n)` where `dsts[p]` has `n · elems[p]` writable bytes aligned to
    /// `elems[p]`, and `vals` has `val_starts[p] + counts[p] · elems[p]` bytes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn scatter(
        &self,
        stream: &CudaStream,
        idx: u64,
        vals: u64,
        table: u64,
        nparams: usize,
        max_count: usize,
    ) -> Result<(), DriverError> {
        if nparams == 0 || max_count == 0 {
            return Ok(());
        }
        let p = nparams as u64 * 8;
        let (starts, counts, dsts, val_starts, elems) = (
            table,
            table + p,
            table + 3 * p,
            table + 4 * p,
            table + 5 * p,
        );
        let n = nparams as u32;
        let mut b = stream.launch_builder(&self.scatter);
        b.arg(&idx)
            .arg(&vals)
            .arg(&dsts)
            .arg(&starts)
            .arg(&counts)
            .arg(&val_starts)
            .arg(&elems)
            .arg(&n);
        // SAFETY: argument types match the kernel's signature; the memory contract is the
        // caller's.
        unsafe { b.launch(per_param_grid(max_count, nparams)) }.map(|_| ())
    }

    /// `msh_gather`. `table` holds `src_idx`, `src_vals`, `idx_starts`, `counts`,
    /// `val_starts` and `elems`, each `nparams` u64s, back to back.
    ///
    /// # Safety
    /// Every address is device memory usable from `stream`, live until the kernel finished:
    /// `table` with `6 · nparams` u64s; for every `p`, `src_idx[p]` with `counts[p]` int32s,
    /// `src_vals[p]` with `counts[p] · elems[p]` bytes aligned to `elems[p]`, `idx` with room
    /// for `idx_starts[p] + counts[p]` int32s and `vals` for `val_starts[p] + counts[p] ·
    /// elems[p]` bytes (aligned to `elems[p]` there); the destination ranges of different
    /// parameters do not overlap.
    pub(crate) unsafe fn gather(
        &self,
        stream: &CudaStream,
        idx: u64,
        vals: u64,
        table: u64,
        nparams: usize,
        max_count: usize,
    ) -> Result<(), DriverError> {
        if nparams == 0 || max_count == 0 {
            return Ok(());
        }
        let p = nparams as u64 * 8;
        let (src_idx, src_vals, idx_starts, counts, val_starts, elems) = (
            table,
            table + p,
            table + 2 * p,
            table + 3 * p,
            table + 4 * p,
            table + 5 * p,
        );
        let n = nparams as u32;
        let mut b = stream.launch_builder(&self.gather);
        b.arg(&idx)
            .arg(&vals)
            .arg(&src_idx)
            .arg(&src_vals)
            .arg(&idx_starts)
            .arg(&counts)
            .arg(&val_starts)
            .arg(&elems)
            .arg(&n);
        // SAFETY: argument types match the kernel's signature; the memory contract is the
        // caller's.
        unsafe { b.launch(per_param_grid(max_count, nparams)) }.map(|_| ())
    }

    /// `msh_diff_count` over `d.tiles` tiles of `d.tile` elements.
    ///
    /// # Safety
    /// `d.prev` and `d.cur` hold `d.n · d.elem` readable bytes aligned to `d.elem`; `counts`
    /// holds `d.tiles = ceil(n / tile)` zeroed u32s; all usable from `stream` until the
    /// kernel ends.
    pub(crate) unsafe fn diff_count(
        &self,
        stream: &CudaStream,
        d: &DiffInput,
        counts: u64,
    ) -> Result<(), DriverError> {
        if d.tiles == 0 {
            return Ok(());
        }
        let mut b = d.args(stream, &self.diff_count);
        b.arg(&counts);
        // SAFETY: argument types match the kernel's signature; the memory contract is the
        // caller's.
        unsafe { b.launch(d.grid()) }.map(|_| ())
    }

    /// `msh_diff_write`.
    ///
    /// # Safety
    /// As for [`Self::diff_count`]; `offsets` holds `d.tiles` u64s, the exclusive prefix
    /// sums of the counts `diff_count` produced for the same inputs, and `out_idx` /
    /// `out_vals` hold room for their total (4 and `d.elem` bytes per entry).
    pub(crate) unsafe fn diff_write(
        &self,
        stream: &CudaStream,
        d: &DiffInput,
        offsets: u64,
        out_idx: u64,
        out_vals: u64,
    ) -> Result<(), DriverError> {
        if d.tiles == 0 {
            return Ok(());
        }
        let mut b = d.args(stream, &self.diff_write);
        b.arg(&offsets).arg(&out_idx).arg(&out_vals);
        // SAFETY: argument types match the kernel's signature; the memory contract is the
        // caller's.
        unsafe { b.launch(d.grid()) }.map(|_| ())
    }
}

/// What both diff kernels read: `n` elements of `elem` bytes at device addresses `prev`
/// and `cur`, in `tiles` tiles of `tile` elements (one block per tile).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DiffInput {
    pub prev: u64,
    pub cur: u64,
    pub n: u64,
    pub elem: u32,
    pub tile: u64,
    pub tiles: u32,
}

impl DiffInput {
    /// A launch of `func` on `stream` with the arguments both kernels start with.
    fn args<'a>(&'a self, stream: &'a CudaStream, func: &'a CudaFunction) -> LaunchArgs<'a> {
        let mut b = stream.launch_builder(func);
        b.arg(&self.prev)
            .arg(&self.cur)
            .arg(&self.n)
            .arg(&self.elem)
            .arg(&self.tile);
        b
    }

    /// One block of [`BLOCK`] threads per tile.
    fn grid(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.tiles, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_declares_every_entry_point_for_an_old_enough_target() {
        assert!(PTX.contains("\n.version 8.0\n"), "PTX ISA must stay at 8.0");
        assert!(PTX.contains("\n.target sm_80\n"));
        for name in ENTRY_POINTS {
            assert!(
                PTX.contains(&format!(".visible .entry {name}(")),
                "kernels.ptx lacks {name}"
            );
        }
    }

    #[test]
    fn grids_cover_the_work_within_limits() {
        let g = per_param_grid(1000, 3);
        assert_eq!((g.grid_dim.0, g.grid_dim.1), (4, 3));
        let big = per_param_grid(usize::MAX / 2, 1_000_000);
        assert_eq!(big.grid_dim.0 as u64, MAX_GRID_X);
        assert_eq!(big.grid_dim.1 as usize, MAX_GRID_Y);
        let empty = per_param_grid(0, 0);
        assert_eq!((empty.grid_dim.0, empty.grid_dim.1), (1, 1));
    }
}
