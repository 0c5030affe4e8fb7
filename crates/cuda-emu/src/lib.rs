//! Runs the CUDA kernels of `distill` on the CPU, so that tests can check them with no GPU.
//!
//! `build.rs` compiles `crates/distill/src/kernels/divergence.cu`, the very file that
//! `loss/cuda.rs` hands to NVRTC, as host C++20 with `-DDISTILL_CUDA_EMU`. The header
//! `emu/cuda_emu.h` defines the CUDA built-ins the file uses; `emu/launch.cpp` launches
//! the kernels. This module wraps those launches: slices in, `Vec` out, lengths checked.
//! Kernels covered: `distill_div_fwd/bwd_<s>_<t>`, `distill_ce_fwd/bwd_<s>` and
//! `distill_topk_fwd/bwd_<s>`, for every element type.
//!
//! What is emulated:
//! - real threads: each CUDA thread of a block runs on an OS thread of its own, all of
//!   the block's at once (the threads are started once and reused, as starting one costs
//!   about 60 us here); blocks run one after another, one launch at a time per process;
//! - `__syncthreads()` as a barrier over the block, and the warp shuffles as an exchange
//!   with a barrier over the warp's 32 lanes;
//! - `__shared__` memory (one copy, as blocks do not overlap) and dynamic shared memory
//!   (filled with 0xff bytes at the start of each block, so stale reads show up as NaN);
//! - `atomicMax` and friends, the bit casts, libm's `expf`, `logf`, `log1pf`, and the
//!   f16 conversions (same rounding as the `half` crate).
//!
//! Misuse is an error of the launch, not a hang: a barrier that part of the block skips,
//! a shuffle that part of a warp skips, any deadlock. Every output element must be
//! written by the kernel: the wrappers fill outputs with a signalling-NaN pattern first
//! and report an element that still holds it.
//!
//! What is not emulated:
//! - the GPU's memory model: the host's is stronger, so a missing `__syncthreads()`
//!   between a shared-memory write and another thread's read gives a wrong result only
//!   when the scheduler happens to run the reader first. Build with ThreadSanitizer to
//!   find such races whatever the schedule (below);
//! - concurrent blocks: blocks run in order, so a race between blocks through global
//!   memory goes unseen (the kernels here never share global memory between blocks,
//!   except the `bad` flag, which they update with atomicMax);
//! - static `__shared__` arrays keep the previous block's values (on a GPU they start
//!   undefined), so a read before the block's first write goes unnoticed there;
//! - timing, occupancy and the limits of real hardware (shared memory size, registers);
//! - lock-step warps: lanes agree only at explicit shuffles and `__syncwarp`, so code
//!   that relies on implicit warp-synchronous execution can behave differently;
//! - partial shuffle masks and widths other than 32;
//! - out-of-bounds accesses (plain host pointers: no bounds checks);
//! - the GPU's rounding details: CUDA contracts `a * b + c` into one FMA and its `expf`
//!   and `logf` differ from glibc's by an ulp or two, so the emulation agrees with a GPU
//!   to f32 rounding, not bit for bit.
//!
//! So it checks the kernels' arithmetic, indexing, reductions, masking, element-type
//! handling and that their results do not depend on the block size; it does not check
//! their speed.
//!
//! Races: every CUDA thread is an OS thread and every barrier a real synchronisation, so
//! ThreadSanitizer sees a shared-memory access that no barrier orders as a data race.
//! From the workspace root (about 20 s):
//!
//! ```text
//! DISTILL_CUDA_EMU_SANITIZE=thread \
//! TSAN_OPTIONS=suppressions=$PWD/crates/cuda-emu/emu/tsan-rust.supp \
//! cargo test -p distill-cuda-emu
//! ```
//!
//! The suppressions silence reports from Rust's standard library, which is not
//! instrumented; a race in a kernel is reported with its line in divergence.cu and fails
//! the run.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::fmt;

use half::{bf16, f16};

mod ffi {
    use super::*;

    extern "C" {
        pub fn distill_emu_div_fwd(
            s_code: c_int,
            t_code: c_int,
            student: *const c_void,
            teacher: *const c_void,
            out: *mut f32,
            rows: c_int,
            v: c_int,
            kind: c_int,
            inv_t: f32,
            w: f32,
            ln_w: f32,
            ln_1mw: f32,
            block: c_uint,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;

        pub fn distill_emu_div_bwd(
            s_code: c_int,
            t_code: c_int,
            student: *const c_void,
            teacher: *const c_void,
            grad_rows: *const f32,
            out: *mut c_void,
            rows: c_int,
            v: c_int,
            kind: c_int,
            inv_t: f32,
            w: f32,
            ln_w: f32,
            ln_1mw: f32,
            block: c_uint,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;

        pub fn distill_emu_ce_fwd(
            s_code: c_int,
            student: *const c_void,
            targets: *const c_uint,
            out: *mut f32,
            bad: *mut c_uint,
            rows: c_int,
            v: c_int,
            block: c_uint,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;

        pub fn distill_emu_ce_bwd(
            s_code: c_int,
            student: *const c_void,
            targets: *const c_uint,
            grad_rows: *const f32,
            out: *mut c_void,
            rows: c_int,
            v: c_int,
            block: c_uint,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;

        pub fn distill_emu_topk_fwd(
            s_code: c_int,
            student: *const c_void,
            indices: *const c_uint,
            log_probs: *const f32,
            out: *mut f32,
            bad: *mut c_uint,
            rows: c_int,
            v: c_int,
            kk: c_int,
            kind: c_int,
            inv_t: f32,
            w: f32,
            ln_w: f32,
            ln_1mw: f32,
            block: c_uint,
            shared: usize,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;

        pub fn distill_emu_topk_bwd(
            s_code: c_int,
            student: *const c_void,
            indices: *const c_uint,
            log_probs: *const f32,
            grad_rows: *const f32,
            out: *mut c_void,
            bad: *mut c_uint,
            rows: c_int,
            v: c_int,
            kk: c_int,
            kind: c_int,
            inv_t: f32,
            w: f32,
            ln_w: f32,
            ln_1mw: f32,
            block: c_uint,
            shared: usize,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;

        pub fn distill_emu_f32_to_f16_bits(f: f32) -> u16;
        pub fn distill_emu_f16_bits_to_f32(h: u16) -> f32;

        pub fn distill_emu_selftest(
            which: c_int,
            grid: c_uint,
            block: c_uint,
            out: *mut f32,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why an emulated launch did not give a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The arguments do not fit the kernel (lengths, sizes, block size); nothing ran.
    Invalid(String),
    /// The emulator stopped the launch: a barrier or shuffle that not every thread
    /// reaches, a deadlock, an exception in kernel code.
    Launch(String),
    /// The kernel returned without writing this element of its output.
    Unwritten { kernel: String, index: usize },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(m) => write!(f, "invalid launch: {m}"),
            Self::Launch(m) => write!(f, "emulated launch failed: {m}"),
            Self::Unwritten { kernel, index } => {
                write!(f, "{kernel} returned without writing element {index} of its output")
            }
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// The emulator's message buffer for one call.
struct Message([u8; 1024]);

impl Message {
    fn new() -> Self {
        Self([0; 1024])
    }

    fn ptr(&mut self) -> *mut c_char {
        self.0.as_mut_ptr().cast()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Turns the entry point's return code into a `Result`.
    fn check(&self, rc: c_int, kernel: &str) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        let text = CStr::from_bytes_until_nul(&self.0)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| String::from_utf8_lossy(&self.0).into_owned());
        Err(match rc {
            1 => Error::Launch(format!("{kernel}: {text}")),
            _ => Error::Invalid(format!("{kernel}: {text}")),
        })
    }
}

// ---------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A logit type the kernels read and write: f32, f64, f16 or bf16. Each is stored as
/// the kernels' `raw` type (the 16-bit types are `repr(transparent)` over u16).
pub trait Elem: Copy + sealed::Sealed {
    /// The `DISTILL_STUDENT` code of divergence.cu: 1 f32, 2 f16, 3 bf16, 4 f64.
    const CODE: c_int;
    /// The suffix of the kernel names.
    const NAME: &'static str;
    /// A signalling NaN that no kernel stores (their NaNs are quiet): the fill of the
    /// outputs, to find elements the kernel never wrote.
    const UNWRITTEN: Self;
    /// The bit pattern, widened.
    fn bits(self) -> u64;
}

impl Elem for f32 {
    const CODE: c_int = 1;
    const NAME: &'static str = "f32";
    const UNWRITTEN: Self = f32::from_bits(0x7fa5_a5a5);
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}

impl Elem for f16 {
    const CODE: c_int = 2;
    const NAME: &'static str = "f16";
    const UNWRITTEN: Self = f16::from_bits(0x7d5a);
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}

impl Elem for bf16 {
    const CODE: c_int = 3;
    const NAME: &'static str = "bf16";
    const UNWRITTEN: Self = bf16::from_bits(0x7fa5);
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}

impl Elem for f64 {
    const CODE: c_int = 4;
    const NAME: &'static str = "f64";
    const UNWRITTEN: Self = f64::from_bits(0x7ff4_a5a5_a5a5_a5a5);
    fn bits(self) -> u64 {
        self.to_bits()
    }
}

/// The first element the kernel left unwritten, as an error.
fn check_written<E: Elem>(kernel: &str, out: &[E]) -> Result<()> {
    let unwritten = E::UNWRITTEN.bits();
    match out.iter().position(|x| x.bits() == unwritten) {
        None => Ok(()),
        Some(index) => Err(Error::Unwritten {
            kernel: kernel.to_string(),
            index,
        }),
    }
}

// ---------------------------------------------------------------------------
// Launch arguments
// ---------------------------------------------------------------------------

/// The divergence kernels' per-call constants (the `Params` struct of divergence.cu) and
/// the block size for rows of `v` logits: `distill`'s own, the ones `loss::cuda` launches
/// with, so that the emulator cannot drift from the real launcher.
pub use distill::loss::rows::{cuda_block_size as launch_block, KernelParams as Params};

/// rows and v as the kernels' `int`s, and rows * v.
fn check_sizes(kernel: &str, rows: usize, v: usize) -> Result<(c_int, c_int, usize)> {
    match (c_int::try_from(rows), c_int::try_from(v), rows.checked_mul(v)) {
        (Ok(r), Ok(c), Some(n)) => Ok((r, c, n)),
        _ => Err(Error::Invalid(format!(
            "{kernel}: {rows} rows of {v} logits do not fit the kernels' int indices"
        ))),
    }
}

fn check_len(kernel: &str, what: &str, len: usize, want: usize) -> Result<()> {
    if len == want {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{kernel}: {what} has {len} elements, the launch needs {want}"
        )))
    }
}

fn check_block(kernel: &str, block: u32) -> Result<()> {
    if block.is_multiple_of(32) && (32..=1024).contains(&block) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{kernel}: a block of {block} threads; the kernels need a multiple of 32 (whole warps), 32 to 1024"
        )))
    }
}

// ---------------------------------------------------------------------------
// The kernels
// ---------------------------------------------------------------------------

/// `distill_div_fwd_<s>_<t>`: student (rows, v), teacher (rows, v) -> (rows,) f32, the
/// divergence of each row, on a grid of `rows` blocks of `block` threads.
pub fn div_fwd<S: Elem, T: Elem>(
    student: &[S],
    teacher: &[T],
    rows: usize,
    v: usize,
    params: Params,
    block: u32,
) -> Result<Vec<f32>> {
    let kernel = format!("distill_div_fwd_{}_{}", S::NAME, T::NAME);
    let (n, c, len) = check_sizes(&kernel, rows, v)?;
    check_len(&kernel, "the student", student.len(), len)?;
    check_len(&kernel, "the teacher", teacher.len(), len)?;
    check_block(&kernel, block)?;
    let mut out = vec![f32::UNWRITTEN; rows]; // (rows,)
    if rows == 0 {
        return Ok(out); // loss/cuda.rs launches nothing either
    }
    let mut msg = Message::new();
    let p = params;
    // SAFETY: student and teacher hold rows * v elements of the kernel's input types
    // (checked above; the Elem types have the kernels' layouts), out holds rows, and
    // msg is msg.len() bytes. The call returns after every thread has finished.
    let rc = unsafe {
        ffi::distill_emu_div_fwd(
            S::CODE,
            T::CODE,
            student.as_ptr().cast(),
            teacher.as_ptr().cast(),
            out.as_mut_ptr(),
            n,
            c,
            p.kind,
            p.inv_t,
            p.w,
            p.ln_w,
            p.ln_1mw,
            block,
            msg.ptr(),
            msg.len(),
        )
    };
    msg.check(rc, &kernel)?;
    check_written(&kernel, &out)?;
    Ok(out)
}

/// `distill_div_bwd_<s>_<t>`: student (rows, v), teacher (rows, v), grad_rows (rows,)
/// -> (rows, v) in the student's type, `grad_rows[r] * d divergence(r) / d student`.
pub fn div_bwd<S: Elem, T: Elem>(
    student: &[S],
    teacher: &[T],
    grad_rows: &[f32],
    rows: usize,
    v: usize,
    params: Params,
    block: u32,
) -> Result<Vec<S>> {
    let kernel = format!("distill_div_bwd_{}_{}", S::NAME, T::NAME);
    let (n, c, len) = check_sizes(&kernel, rows, v)?;
    check_len(&kernel, "the student", student.len(), len)?;
    check_len(&kernel, "the teacher", teacher.len(), len)?;
    check_len(&kernel, "the incoming gradient", grad_rows.len(), rows)?;
    check_block(&kernel, block)?;
    let mut out = vec![S::UNWRITTEN; len]; // (rows, v)
    if rows == 0 {
        return Ok(out);
    }
    let mut msg = Message::new();
    let p = params;
    // SAFETY: student, teacher and out hold rows * v elements of their types, grad_rows
    // holds rows (all checked above); msg is msg.len() bytes. The call returns after every
    // thread has finished.
    let rc = unsafe {
        ffi::distill_emu_div_bwd(
            S::CODE,
            T::CODE,
            student.as_ptr().cast(),
            teacher.as_ptr().cast(),
            grad_rows.as_ptr(),
            out.as_mut_ptr().cast(),
            n,
            c,
            p.kind,
            p.inv_t,
            p.w,
            p.ln_w,
            p.ln_1mw,
            block,
            msg.ptr(),
            msg.len(),
        )
    };
    msg.check(rc, &kernel)?;
    check_written(&kernel, &out)?;
    Ok(out)
}

/// The output of a kernel that also reports bad rows through a `bad` flag (the
/// cross-entropy forward, the top-k kernels).
#[derive(Debug, Clone, PartialEq)]
pub struct Flagged<T> {
    /// What the kernel wrote: the loss (rows,) f32, or the gradient (rows, v).
    pub out: T,
    /// The kernel's `bad` flag: 0 when every row is fine, else u32::MAX minus a bad row
    /// (atomicMax keeps the smallest).
    pub bad: u32,
}

impl<T> Flagged<T> {
    /// The first bad row, as loss/cuda.rs reads the flag.
    pub fn first_bad_row(&self) -> Option<usize> {
        (self.bad != 0).then(|| (u32::MAX - self.bad) as usize)
    }
}

/// `distill_ce_fwd_<s>`: student (rows, v), targets (rows,) -> the loss (rows,) f32,
/// `lse(s) - s_y` (NaN where the target is outside the vocabulary), and the `bad` flag
/// (set to 0 before the launch, as loss/cuda.rs does).
pub fn ce_fwd<S: Elem>(student: &[S], targets: &[u32], rows: usize, v: usize, block: u32) -> Result<Flagged<Vec<f32>>> {
    let kernel = format!("distill_ce_fwd_{}", S::NAME);
    let (n, c, len) = check_sizes(&kernel, rows, v)?;
    check_len(&kernel, "the student", student.len(), len)?;
    check_len(&kernel, "the targets", targets.len(), rows)?;
    check_block(&kernel, block)?;
    let mut loss = vec![f32::UNWRITTEN; rows]; // (rows,)
    let mut bad = 0u32;
    if rows == 0 {
        return Ok(Flagged { out: loss, bad });
    }
    let mut msg = Message::new();
    // SAFETY: student holds rows * v elements of its type, targets and loss hold rows,
    // bad is one u32 (all checked above); msg is msg.len() bytes. The call returns after
    // every thread has finished.
    let rc = unsafe {
        ffi::distill_emu_ce_fwd(
            S::CODE,
            student.as_ptr().cast(),
            targets.as_ptr(),
            loss.as_mut_ptr(),
            &mut bad,
            n,
            c,
            block,
            msg.ptr(),
            msg.len(),
        )
    };
    msg.check(rc, &kernel)?;
    check_written(&kernel, &loss)?;
    Ok(Flagged { out: loss, bad })
}

/// `distill_ce_bwd_<s>`: student (rows, v), targets (rows,), grad_rows (rows,) ->
/// (rows, v) in the student's type, `grad_rows[r] * (softmax(s_r) - onehot(y_r))`.
pub fn ce_bwd<S: Elem>(
    student: &[S],
    targets: &[u32],
    grad_rows: &[f32],
    rows: usize,
    v: usize,
    block: u32,
) -> Result<Vec<S>> {
    let kernel = format!("distill_ce_bwd_{}", S::NAME);
    let (n, c, len) = check_sizes(&kernel, rows, v)?;
    check_len(&kernel, "the student", student.len(), len)?;
    check_len(&kernel, "the targets", targets.len(), rows)?;
    check_len(&kernel, "the incoming gradient", grad_rows.len(), rows)?;
    check_block(&kernel, block)?;
    let mut out = vec![S::UNWRITTEN; len]; // (rows, v)
    if rows == 0 {
        return Ok(out);
    }
    let mut msg = Message::new();
    // SAFETY: student and out hold rows * v elements of the student's type, targets and
    // grad_rows hold rows (all checked above); msg is msg.len() bytes. The call returns
    // after every thread has finished.
    let rc = unsafe {
        ffi::distill_emu_ce_bwd(
            S::CODE,
            student.as_ptr().cast(),
            targets.as_ptr(),
            grad_rows.as_ptr(),
            out.as_mut_ptr().cast(),
            n,
            c,
            block,
            msg.ptr(),
            msg.len(),
        )
    };
    msg.check(rc, &kernel)?;
    check_written(&kernel, &out)?;
    Ok(out)
}

/// The most ids per row the top-k kernels take (`MAX_TOP_K` of loss/cuda.rs): their
/// shared memory, `cuda_top_k_shared_bytes(k)`, stays under 48 KiB.
pub const MAX_TOP_K: usize = 2048;

/// The checks both top-k launches share; returns (rows, v, k) as the kernels' ints.
fn check_top_k<S>(
    kernel: &str,
    student: &[S],
    indices: &[u32],
    log_probs: &[f32],
    (rows, v, k): (usize, usize, usize),
    block: u32,
) -> Result<(c_int, c_int, c_int)> {
    let (n, c, len) = check_sizes(kernel, rows, v)?;
    check_len(kernel, "the student", student.len(), len)?;
    if k == 0 || k > v || k > MAX_TOP_K {
        return Err(Error::Invalid(format!(
            "{kernel}: k = {k}; the top-k kernels take 1 <= k <= min(v = {v}, {MAX_TOP_K})"
        )));
    }
    check_len(kernel, "the top-k ids", indices.len(), rows * k)?;
    check_len(kernel, "the top-k log-probabilities", log_probs.len(), rows * k)?;
    check_block(kernel, block)?;
    Ok((n, c, k as c_int))
}

/// `distill_topk_fwd_<s>`: student (rows, v), the teacher's top-k `indices` (rows, k) and
/// tempered `log_probs` (rows, k) -> the divergence of each row's k + 1 categories
/// (rows,) f32, NaN for a bad teacher row, and the `bad` flag.
pub fn topk_fwd<S: Elem>(
    student: &[S],
    indices: &[u32],
    log_probs: &[f32],
    (rows, v, k): (usize, usize, usize),
    params: Params,
    block: u32,
) -> Result<Flagged<Vec<f32>>> {
    let kernel = format!("distill_topk_fwd_{}", S::NAME);
    let (n, c, kk) = check_top_k(&kernel, student, indices, log_probs, (rows, v, k), block)?;
    let mut out = vec![f32::UNWRITTEN; rows]; // (rows,)
    let mut bad = 0u32;
    if rows == 0 {
        return Ok(Flagged { out, bad });
    }
    let mut msg = Message::new();
    let p = params;
    // SAFETY: student holds rows * v elements of its type, indices and log_probs rows * k,
    // out rows, bad one (all checked above); msg is msg.len() bytes. The launch gives the
    // kernel its `cuda_top_k_shared_bytes(k)` bytes of dynamic shared memory. The call returns after every
    // thread has finished.
    let rc = unsafe {
        ffi::distill_emu_topk_fwd(
            S::CODE,
            student.as_ptr().cast(),
            indices.as_ptr(),
            log_probs.as_ptr(),
            out.as_mut_ptr(),
            &mut bad,
            n,
            c,
            kk,
            p.kind,
            p.inv_t,
            p.w,
            p.ln_w,
            p.ln_1mw,
            block,
            distill::loss::rows::cuda_top_k_shared_bytes(k),
            msg.ptr(),
            msg.len(),
        )
    };
    msg.check(rc, &kernel)?;
    check_written(&kernel, &out)?;
    Ok(Flagged { out, bad })
}

/// `distill_topk_bwd_<s>`: the inputs of `topk_fwd` and grad_rows (rows,) -> (rows, v) in
/// the student's type, `grad_rows[r] * d divergence(r) / d student` (zeros for masked and
/// bad rows), and the `bad` flag (masked rows are not checked).
pub fn topk_bwd<S: Elem>(
    student: &[S],
    indices: &[u32],
    log_probs: &[f32],
    grad_rows: &[f32],
    (rows, v, k): (usize, usize, usize),
    params: Params,
    block: u32,
) -> Result<Flagged<Vec<S>>> {
    let kernel = format!("distill_topk_bwd_{}", S::NAME);
    let (n, c, kk) = check_top_k(&kernel, student, indices, log_probs, (rows, v, k), block)?;
    check_len(&kernel, "the incoming gradient", grad_rows.len(), rows)?;
    let mut out = vec![S::UNWRITTEN; rows * v]; // (rows, v)
    let mut bad = 0u32;
    if rows == 0 {
        return Ok(Flagged { out, bad });
    }
    let mut msg = Message::new();
    let p = params;
    // SAFETY: student and out hold rows * v elements of the student's type, indices and
    // log_probs rows * k, grad_rows rows, bad one (all checked above); msg is msg.len()
    // bytes. The launch gives the kernel its `cuda_top_k_shared_bytes(k)` bytes of dynamic shared memory.
    // The call returns after every thread has finished.
    let rc = unsafe {
        ffi::distill_emu_topk_bwd(
            S::CODE,
            student.as_ptr().cast(),
            indices.as_ptr(),
            log_probs.as_ptr(),
            grad_rows.as_ptr(),
            out.as_mut_ptr().cast(),
            &mut bad,
            n,
            c,
            kk,
            p.kind,
            p.inv_t,
            p.w,
            p.ln_w,
            p.ln_1mw,
            block,
            distill::loss::rows::cuda_top_k_shared_bytes(k),
            msg.ptr(),
            msg.len(),
        )
    };
    msg.check(rc, &kernel)?;
    check_written(&kernel, &out)?;
    Ok(Flagged { out, bad })
}

// ---------------------------------------------------------------------------
// The emulator's own parts, for its tests
// ---------------------------------------------------------------------------

/// The header's f32 -> f16 conversion (the emulated `cvt.rn.f16.f32`), as f16 bits.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    // SAFETY: a pure function of its argument.
    unsafe { ffi::distill_emu_f32_to_f16_bits(x) }
}

/// The header's f16 -> f32 conversion (the emulated `cvt.f32.f16`).
pub fn f16_bits_to_f32(h: u16) -> f32 {
    // SAFETY: a pure function of its argument.
    unsafe { ffi::distill_emu_f16_bits_to_f32(h) }
}

/// Kernels of `emu/launch.cpp` that test the emulator itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfTest {
    /// 4 floats per thread: the warp's sum of (global thread id + 1) by an xor
    /// butterfly, the next lane's value by `__shfl_down_sync` (lane 31: its own), lane 0's
    /// by `__shfl_sync`, and 1 if `__ballot_sync` of "lane is odd" gave 0xaaaaaaaa.
    Shuffles,
    /// Warp 0 returns while the other warps call `__syncthreads()`: must fail.
    DivergentBarrier,
    /// Half of each warp shuffles while the other half waits at `__syncthreads()`:
    /// a deadlock, which must fail.
    SplitWarp,
    /// One block, 2 floats per thread: its dynamic shared memory as found (NaN), then
    /// the value thread `block - 1 - t` stored there (its id).
    DynamicShared,
}

/// Runs one self-test kernel on `grid` blocks of `block` threads; returns its output.
pub fn self_test(test: SelfTest, grid: u32, block: u32) -> Result<Vec<f32>> {
    let kernel = format!("self-test {test:?}");
    check_block(&kernel, block)?;
    let threads = grid as usize * block as usize;
    let (which, per_thread) = match test {
        SelfTest::Shuffles => (0, 4),
        SelfTest::DivergentBarrier => (1, 1),
        SelfTest::SplitWarp => (2, 1),
        SelfTest::DynamicShared => (3, 2),
    };
    let mut out = vec![0f32; threads * per_thread];
    let mut msg = Message::new();
    // SAFETY: out holds per_thread floats for each of the grid's threads, the most any
    // self-test kernel writes; msg is msg.len() bytes.
    let rc = unsafe { ffi::distill_emu_selftest(which, grid, block, out.as_mut_ptr(), msg.ptr(), msg.len()) };
    msg.check(rc, &kernel)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use distill::loss::Divergence;

    #[test]
    fn launch_block_follows_loss_cuda_launch_config() {
        assert_eq!(launch_block(1), 32);
        assert_eq!(launch_block(37), 32);
        assert_eq!(launch_block(256), 32);
        assert_eq!(launch_block(257), 64);
        assert_eq!(launch_block(300), 64);
        assert_eq!(launch_block(32768), 1024);
        assert_eq!(launch_block(1 << 20), 1024);
    }

    #[test]
    fn unwritten_outputs_are_found() {
        let mut out = vec![1.0f32, 2.0, f32::NAN, 3.0];
        assert!(
            check_written("k", &out).is_ok(),
            "a NaN the kernel wrote is not the fill"
        );
        out[3] = f32::UNWRITTEN;
        assert_eq!(
            check_written("k", &out),
            Err(Error::Unwritten {
                kernel: "k".into(),
                index: 3
            })
        );
        assert!(check_written("k", &[bf16::UNWRITTEN]).is_err());
        assert!(check_written("k", &[bf16::NAN, bf16::from_f32(f32::NAN)]).is_ok());
        assert!(check_written("k", &[f16::NAN, f16::from_f32(f32::NAN), f16::from_f32(-0.0)]).is_ok());
        assert!(check_written("k", &[f64::NAN, f32::NAN as f64]).is_ok());
    }

    #[test]
    fn params_canonicalise_the_jsd_end_points() {
        assert_eq!(
            Params::new(Divergence::Jsd { beta: 0.0 }, 2.0),
            Params::new(Divergence::ForwardKl, 2.0)
        );
        assert_eq!(
            Params::new(Divergence::Jsd { beta: 1.0 }, 2.0),
            Params::new(Divergence::ReverseKl, 2.0)
        );
        let p = Params::new(Divergence::SkewForwardKl { skew: 0.0 }, 2.5);
        assert_eq!((p.kind, p.inv_t, p.ln_w, p.ln_1mw), (3, 0.4, f32::NEG_INFINITY, 0.0));
    }
}
