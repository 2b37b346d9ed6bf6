//! The device kernels of the CUDA all-to-all managers: PTX text written here, JIT-compiled by
//! the driver when a manager is created (`cuModuleLoadDataEx`), launched through cudarc's
//! driver layer.
//!
//! Three small kernels, each with variants chosen at launch time:
//!
//! - `gather_rows`: `dst[i] = src[idx[i]]` for rows of `row_bytes` bytes, copied in 16-, 4- or
//!   1-byte words depending on the alignment of the rows and buffers;
//! - `segment_sum`: for every segment `s`, `out[s] = Σ_j weight[j] · in[idx[j]]` over
//!   `j in offsets[s]..offsets[s + 1]`, accumulated in `f32` in list order with separate
//!   round-to-nearest multiplies and adds (never fused), so the result is bit-for-bit the
//!   host managers' `sum += weight * value`; rows are bf16, f16 (two columns per thread when
//!   the row length is even) or f32; without weights every weight is 1;
//! - `count_slots`: `load[slots[i]] += 1` with a 64-bit atomic add (the EPLB load hook).
//!
//! The PTX targets `sm_80` (ISA 8.0), so the driver JIT-compiles it for Ampere, Hopper and
//! later GPUs; bf16 → f32 is a 16-bit shift (exact), f32 → bf16 is `cvt.rn.bf16.f32`.

use std::ffi::{c_uint, c_void, CString};
use std::fmt::Write as _;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUfunction, CUjit_option, CUmodule, CUstream};
use cudarc::driver::{result, CudaContext, DriverError};

/// Threads per block of every kernel.
const BLOCK: u32 = 256;
/// Most blocks launched along x; the kernels loop over the rest.
const MAX_GRID: usize = 1 << 16;
/// Bytes of the JIT error log kept for messages.
const JIT_LOG_BYTES: usize = 8192;

/// Element type of the rows the reductions read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Elem {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
}

impl Elem {
    /// Bytes per element.
    pub(crate) fn bytes(self) -> usize {
        match self {
            Elem::Bf16 | Elem::F16 => 2,
            Elem::F32 => 4,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
            Elem::F32 => "f32",
        }
    }
}

/// Why a kernel could not be launched.
#[derive(Debug)]
pub(crate) enum LaunchError {
    /// A size does not fit the kernel's 32-bit parameters.
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its value.
        value: usize,
    },
    /// The launch failed.
    Driver(DriverError),
}

impl From<DriverError> for LaunchError {
    fn from(e: DriverError) -> Self {
        LaunchError::Driver(e)
    }
}

/// Why the kernels could not be loaded: the driver's error and the JIT compiler's log.
#[derive(Debug)]
pub(crate) struct LoadError {
    pub(crate) source: DriverError,
    pub(crate) log: String,
}

/// The loaded module and its functions, for one CUDA context.
#[derive(Debug)]
pub(crate) struct Kernels {
    ctx: Arc<CudaContext>,
    module: CUmodule,
    /// Gather with 16-, 4- and 1-byte words.
    gather: [CUfunction; 3],
    /// Segment sums: bf16, bf16 pairs, f16, f16 pairs, f32.
    segment: [CUfunction; 5],
    count: CUfunction,
}

// SAFETY: module and function handles belong to the context, not to a thread; every use
// binds the context to the calling thread first, and the module is unloaded once, on drop.
unsafe impl Send for Kernels {}
// SAFETY: as above; launching the same function from several threads is allowed by CUDA.
unsafe impl Sync for Kernels {}

const GATHER_WIDTHS: [usize; 3] = [16, 4, 1];

fn segment_index(elem: Elem, pair: bool) -> usize {
    match (elem, pair) {
        (Elem::Bf16, false) => 0,
        (Elem::Bf16, true) => 1,
        (Elem::F16, false) => 2,
        (Elem::F16, true) => 3,
        (Elem::F32, _) => 4,
    }
}

impl Kernels {
    /// JIT-compiles the module for `ctx`'s device and looks its functions up.
    pub(crate) fn load(ctx: &Arc<CudaContext>) -> Result<Self, LoadError> {
        let plain = |source| LoadError {
            source,
            log: String::new(),
        };
        ctx.bind_to_thread().map_err(plain)?;
        let text = CString::new(ptx()).map_err(|_| LoadError {
            source: DriverError(sys::cudaError_enum::CUDA_ERROR_INVALID_IMAGE),
            log: "the PTX text contains a NUL byte".into(),
        })?;
        let mut log = vec![0u8; JIT_LOG_BYTES];
        let mut options = [
            CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
            CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
        ];
        let mut values: [*mut c_void; 2] = [
            log.as_mut_ptr().cast::<c_void>(),
            // The size option is passed by value in the pointer slot.
            JIT_LOG_BYTES as *mut c_void,
        ];
        let mut module: CUmodule = std::ptr::null_mut();
        // SAFETY: `text` is a NUL-terminated PTX image; `options` and `values` hold two
        // matching entries, the log buffer has the size announced and outlives the call.
        let loaded = unsafe {
            sys::cuModuleLoadDataEx(
                &mut module,
                text.as_ptr().cast::<c_void>(),
                options.len() as c_uint,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        }
        .result();
        if let Err(source) = loaded {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            return Err(LoadError {
                source,
                log: String::from_utf8_lossy(log.get(..end).unwrap_or_default()).into_owned(),
            });
        }
        let mut kernels = Kernels {
            ctx: ctx.clone(),
            module,
            gather: [std::ptr::null_mut(); 3],
            segment: [std::ptr::null_mut(); 5],
            count: std::ptr::null_mut(),
        };
        let function = |name: String| -> Result<CUfunction, LoadError> {
            let c = CString::new(name.clone()).map_err(|_| LoadError {
                source: DriverError(sys::cudaError_enum::CUDA_ERROR_NOT_FOUND),
                log: format!("kernel name {name:?} contains a NUL byte"),
            })?;
            // SAFETY: `module` was loaded above and is unloaded only when `kernels` drops.
            unsafe { result::module::get_function(module, c) }.map_err(|source| LoadError {
                source,
                log: format!("looking up kernel {name}"),
            })
        };
        for (slot, width) in kernels.gather.iter_mut().zip(GATHER_WIDTHS) {
            *slot = function(format!("moeshift_gather_rows_w{width}"))?;
        }
        for (elem, pair) in [
            (Elem::Bf16, false),
            (Elem::Bf16, true),
            (Elem::F16, false),
            (Elem::F16, true),
            (Elem::F32, false),
        ] {
            let name = segment_name(elem, pair);
            kernels.segment[segment_index(elem, pair)] = function(name)?;
        }
        kernels.count = function("moeshift_count_slots".into())?;
        Ok(kernels)
    }

    /// Queues `dst[i] = src[idx[i]]` for `rows` rows of `row_bytes` bytes on `stream`.
    ///
    /// # Safety
    /// `dst` must hold `rows · row_bytes` writable bytes, `idx` `rows` `u32` row indices and
    /// `src` every row they name, all device memory of this context, valid until the kernel
    /// finished and not written by other work meanwhile.
    pub(crate) unsafe fn gather_rows(
        &self,
        stream: CUstream,
        dst: u64,
        src: u64,
        idx: u64,
        rows: usize,
        row_bytes: usize,
    ) -> Result<(), LaunchError> {
        if rows == 0 || row_bytes == 0 {
            return Ok(());
        }
        let aligned = |w: usize| {
            let w = w as u64;
            (row_bytes as u64) % w == 0 && dst % w == 0 && src % w == 0
        };
        let (slot, width) = if aligned(16) {
            (0, 16)
        } else if aligned(4) {
            (1, 4)
        } else {
            (2, 1)
        };
        let mut rows_u = fit("row count", rows)?;
        let mut words = fit("words per row", row_bytes / width)?;
        let (mut dst, mut src, mut idx) = (dst, src, idx);
        let mut args: [*mut c_void; 5] = [
            (&mut dst as *mut u64).cast(),
            (&mut src as *mut u64).cast(),
            (&mut idx as *mut u64).cast(),
            (&mut rows_u as *mut u32).cast(),
            (&mut words as *mut u32).cast(),
        ];
        let grid = rows.min(MAX_GRID) as u32;
        // SAFETY: the function is valid while the module is loaded; the arguments match the
        // kernel's parameter list and the caller guarantees the memory.
        unsafe { self.launch(self.gather[slot], grid, stream, &mut args) }
    }

    /// Queues `out[s] = Σ_j w[j] · in[idx[j]]` over `j in offsets[s]..offsets[s+1]` for
    /// `segments` segments of rows of `cols` elements of `elem`, accumulated in f32.
    /// Without `weights`, every weight is 1.
    ///
    /// # Safety
    /// `out` must hold `segments · cols` writable elements, `offsets` `segments + 1`
    /// non-decreasing `u32`, `idx` and `weights` (`f32`) as many entries as the last offset,
    /// `inp` every row `idx` names; all device memory of this context, valid until the
    /// kernel finished, `out` not overlapping the inputs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn segment_sum(
        &self,
        stream: CUstream,
        elem: Elem,
        out: u64,
        inp: u64,
        offsets: u64,
        idx: u64,
        weights: Option<u64>,
        segments: usize,
        cols: usize,
    ) -> Result<(), LaunchError> {
        if segments == 0 || cols == 0 {
            return Ok(());
        }
        let pair = elem != Elem::F32 && cols % 2 == 0 && out % 4 == 0 && inp % 4 == 0;
        let words = if pair { cols / 2 } else { cols };
        let mut segs_u = fit("segment count", segments)?;
        let mut words_u = fit("row length", words)?;
        let (mut out, mut inp, mut offsets, mut idx) = (out, inp, offsets, idx);
        let mut w = weights.unwrap_or(0);
        let mut args: [*mut c_void; 7] = [
            (&mut out as *mut u64).cast(),
            (&mut inp as *mut u64).cast(),
            (&mut offsets as *mut u64).cast(),
            (&mut idx as *mut u64).cast(),
            (&mut w as *mut u64).cast(),
            (&mut segs_u as *mut u32).cast(),
            (&mut words_u as *mut u32).cast(),
        ];
        let f = self.segment[segment_index(elem, pair)];
        let grid = segments.min(MAX_GRID) as u32;
        // SAFETY: as for `gather_rows`.
        unsafe { self.launch(f, grid, stream, &mut args) }
    }

    /// Queues `load[slots[i]] += 1` for `n` entries (64-bit atomic adds).
    ///
    /// # Safety
    /// `load` must hold an `i64` for every value in `slots[..n]`, both device memory of this
    /// context valid until the kernel finished.
    pub(crate) unsafe fn count_slots(
        &self,
        stream: CUstream,
        load: u64,
        slots: u64,
        n: usize,
    ) -> Result<(), LaunchError> {
        if n == 0 {
            return Ok(());
        }
        let mut n_u = fit("pick count", n)?;
        let (mut load, mut slots) = (load, slots);
        let mut args: [*mut c_void; 3] = [
            (&mut load as *mut u64).cast(),
            (&mut slots as *mut u64).cast(),
            (&mut n_u as *mut u32).cast(),
        ];
        let grid = n.div_ceil(BLOCK as usize).min(MAX_GRID) as u32;
        // SAFETY: as for `gather_rows`.
        unsafe { self.launch(self.count, grid, stream, &mut args) }
    }

    unsafe fn launch(
        &self,
        f: CUfunction,
        grid: u32,
        stream: CUstream,
        args: &mut [*mut c_void],
    ) -> Result<(), LaunchError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: forwarded from the callers: a live function of this module, arguments
        // that match its parameters, memory valid for the kernel's lifetime.
        unsafe { result::launch_kernel(f, (grid, 1, 1), (BLOCK, 1, 1), 0, stream, args) }?;
        Ok(())
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: the module was loaded in this context and is unloaded exactly once;
            // launches already queued keep their code alive until they finish.
            let _ = unsafe { result::module::unload(self.module) };
        }
    }
}

fn fit(what: &'static str, value: usize) -> Result<u32, LaunchError> {
    u32::try_from(value).map_err(|_| LaunchError::TooLarge { what, value })
}

fn segment_name(elem: Elem, pair: bool) -> String {
    format!(
        "moeshift_segment_sum_{}{}",
        elem.tag(),
        if pair { "x2" } else { "" }
    )
}

/// The whole module's PTX text.
pub(crate) fn ptx() -> String {
    let mut s = String::from(
        "//\n// moeshift all-to-all kernels (hand-written PTX)\n//\n\
         .version 8.0\n.target sm_80\n.address_size 64\n\n",
    );
    for width in GATHER_WIDTHS {
        gather_ptx(&mut s, width);
    }
    for (elem, pair) in [
        (Elem::Bf16, false),
        (Elem::Bf16, true),
        (Elem::F16, false),
        (Elem::F16, true),
        (Elem::F32, false),
    ] {
        segment_ptx(&mut s, elem, pair);
    }
    count_ptx(&mut s);
    s
}

/// `moeshift_gather_rows_w{width}(dst, src, idx, rows, words)`: one block per row (looping
/// over rows), threads over the row's `words` words of `width` bytes.
fn gather_ptx(s: &mut String, width: usize) {
    let (shift, load, store) = match width {
        16 => (
            4,
            "ld.global.v4.u32 {%v0, %v1, %v2, %v3}, [%rd8];",
            "st.global.v4.u32 [%rd9], {%v0, %v1, %v2, %v3};",
        ),
        4 => (
            2,
            "ld.global.u32 %v0, [%rd8];",
            "st.global.u32 [%rd9], %v0;",
        ),
        _ => (0, "ld.global.u8 %v0, [%rd8];", "st.global.u8 [%rd9], %v0;"),
    };
    let _ = write!(
        s,
        r#"
.visible .entry moeshift_gather_rows_w{width}(
    .param .u64 p_dst,
    .param .u64 p_src,
    .param .u64 p_idx,
    .param .u32 p_rows,
    .param .u32 p_words
)
{{
    .reg .pred %p<3>;
    .reg .b32 %r<10>;
    .reg .b32 %v<4>;
    .reg .b64 %rd<10>;

    ld.param.u64 %rd1, [p_dst];
    ld.param.u64 %rd2, [p_src];
    ld.param.u64 %rd3, [p_idx];
    ld.param.u32 %r1, [p_rows];
    ld.param.u32 %r2, [p_words];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    cvta.to.global.u64 %rd3, %rd3;
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %nctaid.x;
    mov.u32 %r5, %tid.x;
    mov.u32 %r6, %ntid.x;
G{width}_ROW:
    setp.ge.u32 %p1, %r3, %r1;
    @%p1 bra G{width}_END;
    mul.wide.u32 %rd4, %r3, 4;
    add.u64 %rd4, %rd3, %rd4;
    ld.global.u32 %r7, [%rd4];
    mul.wide.u32 %rd5, %r7, %r2;
    mul.wide.u32 %rd6, %r3, %r2;
    mov.u32 %r8, %r5;
G{width}_WORD:
    setp.ge.u32 %p2, %r8, %r2;
    @%p2 bra G{width}_NEXT;
    cvt.u64.u32 %rd7, %r8;
    add.u64 %rd8, %rd5, %rd7;
    shl.b64 %rd8, %rd8, {shift};
    add.u64 %rd8, %rd2, %rd8;
    {load}
    add.u64 %rd9, %rd6, %rd7;
    shl.b64 %rd9, %rd9, {shift};
    add.u64 %rd9, %rd1, %rd9;
    {store}
    add.u32 %r8, %r8, %r6;
    bra G{width}_WORD;
G{width}_NEXT:
    add.u32 %r3, %r3, %r4;
    bra G{width}_ROW;
G{width}_END:
    ret;
}}
"#
    );
}

/// `moeshift_segment_sum_{elem}[x2](out, in, offsets, idx, weights, segments, words)`: one
/// block per segment (looping), threads over the row's words (one element, or two for the
/// `x2` variants), an f32 accumulator per element.
fn segment_ptx(s: &mut String, elem: Elem, pair: bool) {
    let name = segment_name(elem, pair);
    let label = name.to_uppercase();
    // Word size in bytes (shift), the load of one word into f32 %f1 (and %f2 for the
    // upper element of a pair), and the store of %f10 (and %f11) as one word.
    let (shift, load, store) = match (elem, pair) {
        (Elem::F32, _) => (
            2,
            "ld.global.f32 %f1, [%rd12];".to_string(),
            "st.global.f32 [%rd13], %f10;".to_string(),
        ),
        (Elem::Bf16, false) => (
            1,
            "ld.global.u16 %r20, [%rd12];\n    shl.b32 %r20, %r20, 16;\n    mov.b32 %f1, %r20;"
                .to_string(),
            "cvt.rn.bf16.f32 %h1, %f10;\n    st.global.b16 [%rd13], %h1;".to_string(),
        ),
        (Elem::Bf16, true) => (
            2,
            "ld.global.b32 %r20, [%rd12];\n    shl.b32 %r21, %r20, 16;\n    mov.b32 %f1, %r21;\n    \
             and.b32 %r22, %r20, -65536;\n    mov.b32 %f2, %r22;"
                .to_string(),
            "cvt.rn.bf16x2.f32 %r23, %f11, %f10;\n    st.global.b32 [%rd13], %r23;".to_string(),
        ),
        (Elem::F16, false) => (
            1,
            "ld.global.b16 %h1, [%rd12];\n    cvt.f32.f16 %f1, %h1;".to_string(),
            "cvt.rn.f16.f32 %h2, %f10;\n    st.global.b16 [%rd13], %h2;".to_string(),
        ),
        (Elem::F16, true) => (
            2,
            "ld.global.b32 %r20, [%rd12];\n    mov.b32 {%h1, %h2}, %r20;\n    \
             cvt.f32.f16 %f1, %h1;\n    cvt.f32.f16 %f2, %h2;"
                .to_string(),
            "cvt.rn.f16x2.f32 %r23, %f11, %f10;\n    st.global.b32 [%rd13], %r23;".to_string(),
        ),
    };
    let (acc_init, acc_add, weight_mul) = if pair {
        (
            "mov.f32 %f10, 0f00000000;\n    mov.f32 %f11, 0f00000000;",
            "add.rn.f32 %f10, %f10, %f1;\n    add.rn.f32 %f11, %f11, %f2;",
            "@%p4 mul.rn.f32 %f1, %f3, %f1;\n    @%p4 mul.rn.f32 %f2, %f3, %f2;",
        )
    } else {
        (
            "mov.f32 %f10, 0f00000000;",
            "add.rn.f32 %f10, %f10, %f1;",
            "@%p4 mul.rn.f32 %f1, %f3, %f1;",
        )
    };
    let _ = write!(
        s,
        r#"
.visible .entry {name}(
    .param .u64 p_out,
    .param .u64 p_in,
    .param .u64 p_off,
    .param .u64 p_idx,
    .param .u64 p_w,
    .param .u32 p_segs,
    .param .u32 p_words
)
{{
    .reg .pred %p<6>;
    .reg .b16 %h<3>;
    .reg .b32 %r<24>;
    .reg .f32 %f<12>;
    .reg .b64 %rd<16>;

    ld.param.u64 %rd1, [p_out];
    ld.param.u64 %rd2, [p_in];
    ld.param.u64 %rd3, [p_off];
    ld.param.u64 %rd4, [p_idx];
    ld.param.u64 %rd5, [p_w];
    ld.param.u32 %r1, [p_segs];
    ld.param.u32 %r2, [p_words];
    setp.ne.u64 %p4, %rd5, 0;
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    cvta.to.global.u64 %rd3, %rd3;
    cvta.to.global.u64 %rd4, %rd4;
    cvta.to.global.u64 %rd5, %rd5;
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %nctaid.x;
    mov.u32 %r5, %tid.x;
    mov.u32 %r6, %ntid.x;
{label}_SEG:
    setp.ge.u32 %p1, %r3, %r1;
    @%p1 bra {label}_END;
    mul.wide.u32 %rd6, %r3, 4;
    add.u64 %rd6, %rd3, %rd6;
    ld.global.u32 %r7, [%rd6];
    ld.global.u32 %r8, [%rd6+4];
    mul.wide.u32 %rd7, %r3, %r2;
    mov.u32 %r9, %r5;
{label}_COL:
    setp.ge.u32 %p2, %r9, %r2;
    @%p2 bra {label}_NEXT;
    cvt.u64.u32 %rd8, %r9;
    {acc_init}
    mov.u32 %r10, %r7;
{label}_ITEM:
    setp.ge.u32 %p3, %r10, %r8;
    @%p3 bra {label}_STORE;
    mul.wide.u32 %rd9, %r10, 4;
    add.u64 %rd10, %rd4, %rd9;
    ld.global.u32 %r11, [%rd10];
    mul.wide.u32 %rd11, %r11, %r2;
    add.u64 %rd12, %rd11, %rd8;
    shl.b64 %rd12, %rd12, {shift};
    add.u64 %rd12, %rd2, %rd12;
    {load}
    add.u64 %rd14, %rd5, %rd9;
    @%p4 ld.global.f32 %f3, [%rd14];
    {weight_mul}
    {acc_add}
    add.u32 %r10, %r10, 1;
    bra {label}_ITEM;
{label}_STORE:
    add.u64 %rd13, %rd7, %rd8;
    shl.b64 %rd13, %rd13, {shift};
    add.u64 %rd13, %rd1, %rd13;
    {store}
    add.u32 %r9, %r9, %r6;
    bra {label}_COL;
{label}_NEXT:
    add.u32 %r3, %r3, %r4;
    bra {label}_SEG;
{label}_END:
    ret;
}}
"#
    );
}

/// `moeshift_count_slots(load, slots, n)`: a grid-stride loop of 64-bit atomic adds.
fn count_ptx(s: &mut String) {
    s.push_str(
        r#"
.visible .entry moeshift_count_slots(
    .param .u64 p_load,
    .param .u64 p_slots,
    .param .u32 p_n
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<8>;

    ld.param.u64 %rd1, [p_load];
    ld.param.u64 %rd2, [p_slots];
    ld.param.u32 %r1, [p_n];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.u32 %r5, %r2, %r3, %r4;
    mov.u32 %r6, %nctaid.x;
    mul.lo.u32 %r6, %r6, %r3;
    mov.u64 %rd6, 1;
COUNT_LOOP:
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra COUNT_END;
    mul.wide.u32 %rd3, %r5, 4;
    add.u64 %rd3, %rd2, %rd3;
    ld.global.u32 %r7, [%rd3];
    mul.wide.u32 %rd4, %r7, 8;
    add.u64 %rd4, %rd1, %rd4;
    red.global.add.u64 [%rd4], %rd6;
    add.u32 %r5, %r5, %r6;
    bra COUNT_LOOP;
COUNT_END:
    ret;
}
"#,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_declares_every_kernel_once_for_sm_80() {
        let text = ptx();
        assert!(text.contains(".version 8.0\n.target sm_80\n.address_size 64"));
        let mut names: Vec<String> = GATHER_WIDTHS
            .iter()
            .map(|w| format!("moeshift_gather_rows_w{w}"))
            .collect();
        for (elem, pair) in [
            (Elem::Bf16, false),
            (Elem::Bf16, true),
            (Elem::F16, false),
            (Elem::F16, true),
            (Elem::F32, false),
        ] {
            names.push(segment_name(elem, pair));
        }
        names.push("moeshift_count_slots".into());
        for name in &names {
            let decl = format!(".visible .entry {name}(");
            assert_eq!(text.matches(&decl).count(), 1, "{name}");
        }
        assert_eq!(text.matches(".visible .entry").count(), names.len());
        // Braces balance: every body is closed.
        assert_eq!(text.matches('{').count(), text.matches('}').count());
        // Reductions never fuse multiply and add (the host managers round both).
        assert!(!text.contains("fma"));
        assert!(!text.contains("mad.f32") && !text.contains("mad.rn.f32"));
    }

    #[test]
    fn segment_kernels_use_their_element_conversions() {
        let text = ptx();
        let body = |name: &str| {
            let start = text.find(&format!(".visible .entry {name}(")).expect(name);
            let end = text[start..].find("\n}\n").expect("end") + start;
            text[start..end].to_string()
        };
        assert!(body("moeshift_segment_sum_bf16").contains("cvt.rn.bf16.f32"));
        assert!(body("moeshift_segment_sum_bf16x2").contains("cvt.rn.bf16x2.f32"));
        assert!(body("moeshift_segment_sum_f16").contains("cvt.f32.f16"));
        assert!(body("moeshift_segment_sum_f16x2").contains("cvt.rn.f16x2.f32"));
        let f32_body = body("moeshift_segment_sum_f32");
        assert!(!f32_body.contains("cvt.rn"), "{f32_body}");
        assert!(f32_body.contains("ld.global.f32 %f1"));
    }

    /// With `MOESHIFT_PTXAS` naming a `ptxas` binary (e.g. from the `nvidia-cuda-nvcc` wheel),
    /// assembles the module for sm_80 and sm_90; otherwise says why it checks nothing more.
    #[test]
    fn ptxas_accepts_the_module_when_available() {
        let Some(ptxas) = std::env::var_os("MOESHIFT_PTXAS") else {
            eprintln!("MOESHIFT_PTXAS is not set: the PTX is not assembled here");
            return;
        };
        let dir = std::env::temp_dir().join(format!("moeshift-ptx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("all2all.ptx");
        std::fs::write(&file, ptx()).expect("write ptx");
        for arch in ["sm_80", "sm_90"] {
            let out = std::process::Command::new(&ptxas)
                .arg(format!("-arch={arch}"))
                .arg(&file)
                .arg("-o")
                .arg(dir.join(format!("all2all.{arch}.cubin")))
                .output()
                .expect("run ptxas");
            assert!(
                out.status.success(),
                "ptxas -arch={arch} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
