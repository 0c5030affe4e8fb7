//! CUDA launchers for the fused loss ops of `loss::full` (compiled with `--features cuda`).
//!
//! The kernels live in `src/kernels/divergence.cu`, one thread block per row (see its
//! header). The source is embedded with `include_str!` and compiled with NVRTC the first
//! time a process launches a kernel for a given student dtype on a given architecture:
//! `--gpu-architecture=compute_XY` from the device's compute capability, and
//! `-DDISTILL_STUDENT=<code>` so that only that student type's kernels (a quarter of the
//! file, every teacher type) are compiled. candle then loads the PTX once per device as the
//! module `distill_divergence_<dtype>`. The PTX is kept for the life of the process, so
//! later calls cost a map lookup. `scripts/check_cuda_kernels.py` compiles the same file
//! with the same options (every variant) on machines without a GPU, which is how CI
//! proves it builds.
//!
//! Costs beyond the kernels: the first call per student dtype runs NVRTC (0.35 s of CPU
//! on the dev machine for one variant, 1.5 s for the whole file; the driver then
//! JIT-compiles the PTX to the GPU's code, and caches that on disk),
//! and the cross-entropy forward copies 4 bytes back to the host to report an
//! out-of-vocabulary target, which waits for the kernel.
//!
//! Each launcher mirrors its op's `cpu_fwd`: the same shape checks, contiguous inputs,
//! logits in f32, f16, bf16 or f64 (student and teacher independently, converted to f32
//! on load), the loss as f32 and the gradient in the student's dtype.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape};

use super::family::Divergence;
use super::ops::{check_rows, rows_and_vocab};
use super::rows::{cuda_block_size, cuda_top_k_shared_bytes, KernelParams};

/// The kernel source, the very file `scripts/check_cuda_kernels.py` checks.
const SOURCE: &str = include_str!("../kernels/divergence.cu");
const SOURCE_PATH: &str = "crates/distill/src/kernels/divergence.cu";
const MODULE: &str = "distill_divergence";
/// Besides the architecture; keep in step with NVRTC_OPTIONS in scripts/check_cuda_kernels.py.
const NVRTC_OPTIONS: &[&str] = &["--std=c++17"];

type Result<T> = candle_core::Result<T>;

fn msg(text: String) -> candle_core::Error {
    candle_core::Error::Msg(text).bt()
}

// ---------------------------------------------------------------------------
// Compiling and loading
// ---------------------------------------------------------------------------

/// An element type as the kernels name it: the suffix of their names, and the
/// `DISTILL_STUDENT` code that selects its module's kernels (divergence.cu, at the end).
#[derive(Clone, Copy)]
struct Elem {
    name: &'static str,
    code: u8,
}

const F32: Elem = Elem { name: "f32", code: 1 };
const F16: Elem = Elem { name: "f16", code: 2 };
const BF16: Elem = Elem { name: "bf16", code: 3 };
const F64: Elem = Elem { name: "f64", code: 4 };

/// PTX of one student type's kernels for the device's architecture, compiled once per
/// process and kept (a few hundred KB each).
fn ptx_for(dev: &CudaDevice, op: &'static str, student: Elem) -> Result<Arc<str>> {
    /// PTX by ((major, minor) compute capability, student code).
    type Cache = Mutex<HashMap<((i32, i32), u8), Arc<str>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cc = dev.cuda_stream().context().compute_capability().w()?;
    // Held while compiling, so that threads starting together compile once.
    let mut cache = CACHE.get_or_init(Default::default).lock().map_err(|_| {
        msg(format!(
            "{op}: the CUDA kernel cache was poisoned by a panic in another thread"
        ))
    })?;
    if let Some(ptx) = cache.get(&(cc, student.code)) {
        return Ok(ptx.clone());
    }
    let arch = format!("--gpu-architecture=compute_{}{}", cc.0, cc.1);
    let variant = format!("-DDISTILL_STUDENT={}", student.code);
    let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|o| o.to_string()).collect();
    options.extend([arch.clone(), variant.clone()]);
    let opts = CompileOptions {
        options,
        name: Some("divergence.cu".to_string()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(SOURCE, opts).map_err(|e| {
        let detail = match &e {
            CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        msg(format!(
            "{op}: NVRTC could not compile {SOURCE_PATH} with {arch} {variant} (device compute capability \
             {}.{}); an NVRTC older than the GPU does not know its architecture, so use the NVRTC of a \
             CUDA release that supports this GPU. NVRTC said:\n{detail}",
            cc.0, cc.1
        ))
    })?;
    let ptx: Arc<str> = ptx.to_src().into();
    cache.insert((cc, student.code), ptx.clone());
    Ok(ptx)
}

/// The kernel `name` from the module of `student`'s kernels, which is compiled and loaded
/// on this device the first time.
fn function(dev: &CudaDevice, op: &'static str, student: Elem, name: &str) -> Result<CudaFunction> {
    let ptx = ptx_for(dev, op, student)?;
    let module = format!("{MODULE}_{}", student.name);
    Ok(dev.get_or_load_custom_func(name, &module, &ptx)?.into_cuda_function())
}

/// One block per row, of `cuda_block_size(v)` threads.
fn launch_config(rows: usize, v: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (cuda_block_size(v), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The kernels index rows and columns with `int`, and the grid holds at most 2^31 - 1 rows.
fn check_sizes(op: &'static str, rows: usize, v: usize) -> Result<(i32, i32)> {
    match (i32::try_from(rows), i32::try_from(v)) {
        (Ok(r), Ok(c)) => Ok((r, c)),
        _ => Err(msg(format!(
            "{op}: {rows} rows of {v} logits is more than the CUDA kernel handles (at most 2^31 - 1 of \
             each); split the batch"
        ))),
    }
}

// ---------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------

/// The contiguous part of a device buffer that a layout covers.
fn view<'a, T>(data: &'a CudaSlice<T>, layout: &Layout, op: &'static str) -> Result<CudaView<'a, T>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::RequiresContiguous { op }.bt())?;
    data.try_slice(start..end).ok_or_else(|| {
        msg(format!(
            "{op}: layout {layout:?} lies outside its buffer of {}",
            data.len()
        ))
    })
}

fn unsupported(op: &'static str, what: &str, dtype: DType) -> candle_core::Error {
    msg(format!(
        "{op}: {what} of dtype {dtype:?} have no CUDA kernel; convert them to f32, f16, bf16 or f64 first"
    ))
}

fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, op: &'static str, what: &str) -> Result<CudaView<'a, f32>> {
    match &s.slice {
        CudaStorageSlice::F32(data) => view(data, l, op),
        _ => Err(msg(format!("{op}: {what} must be f32, got {:?}", s.dtype()))),
    }
}

fn u32_view<'a>(s: &'a CudaStorage, l: &Layout, op: &'static str, what: &str) -> Result<CudaView<'a, u32>> {
    match &s.slice {
        CudaStorageSlice::U32(data) => view(data, l, op),
        _ => Err(msg(format!("{op}: {what} must be u32, got {:?}", s.dtype()))),
    }
}

/// Binds `$v` to the contiguous view of a float storage and `$name` to its `Elem`, and
/// evaluates `$body` once per element type (each arm infers its own `T`,
/// so the launchers below are instantiated per dtype without naming the half types).
macro_rules! with_float_view {
    ($op:expr, $what:expr, $storage:expr, $layout:expr, |$v:ident, $name:ident| $body:expr) => {
        match &$storage.slice {
            CudaStorageSlice::F32(data) => {
                let ($v, $name) = (view(data, $layout, $op)?, F32);
                $body
            }
            CudaStorageSlice::F16(data) => {
                let ($v, $name) = (view(data, $layout, $op)?, F16);
                $body
            }
            CudaStorageSlice::BF16(data) => {
                let ($v, $name) = (view(data, $layout, $op)?, BF16);
                $body
            }
            CudaStorageSlice::F64(data) => {
                let ($v, $name) = (view(data, $layout, $op)?, F64);
                $body
            }
            _ => return Err(unsupported($op, $what, $storage.dtype())),
        }
    };
}

/// The kernels' per-call constants, as the `Params` struct of divergence.cu reads them.
type Args = KernelParams;

fn same_shape(op: &'static str, l1: &Layout, l2: &Layout) -> Result<()> {
    if l1.shape() == l2.shape() {
        Ok(())
    } else {
        Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: l1.shape().clone(),
            rhs: l2.shape().clone(),
            op,
        }
        .bt())
    }
}

/// One op call's launch context: the device, the op's name (for errors), and the rows.
struct Call<'a> {
    dev: &'a CudaDevice,
    op: &'static str,
    rows: usize,
    v: usize,
}

impl<'a> Call<'a> {
    /// The call over the rows of the student logits `s1` (layout `l1`): it, and the
    /// shape of the rows.
    fn over(op: &'static str, s1: &'a CudaStorage, l1: &Layout) -> (Self, Shape) {
        let (rows_shape, v) = rows_and_vocab(l1);
        let call = Self {
            dev: &s1.device,
            op,
            rows: rows_shape.elem_count(),
            v,
        };
        (call, rows_shape)
    }

    /// The kernel `name` of `student`'s module, and the launch's (rows, v) as the
    /// kernels' `int` arguments.
    fn kernel(&self, student: Elem, name: &str) -> Result<(CudaFunction, i32, i32)> {
        let (n, c) = check_sizes(self.op, self.rows, self.v)?;
        Ok((function(self.dev, self.op, student, name)?, n, c))
    }

    fn config(&self) -> LaunchConfig {
        launch_config(self.rows, self.v)
    }
}

// ---------------------------------------------------------------------------
// The divergence and cross-entropy ops
// ---------------------------------------------------------------------------

/// `DivergenceRows`: student (N, V), teacher (N, V) -> (N,) f32.
pub(super) fn divergence_rows_fwd(
    op: &'static str,
    divergence: Divergence,
    temperature: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    same_shape(op, l1, l2)?;
    let (call, rows_shape) = Call::over(op, s1, l1);
    let dev = call.dev;
    let args = Args::new(divergence, temperature);
    let out = with_float_view!(op, "student logits", s1, l1, |s, sn| {
        with_float_view!(op, "teacher logits", s2, l2, |t, tn| {
            div_fwd(&call, (sn, tn), &s, &t, &args)?
        })
    });
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), rows_shape))
}

fn div_fwd<S, T>(
    call: &Call,
    (sn, tn): (Elem, Elem),
    s: &CudaView<S>,
    t: &CudaView<T>,
    a: &Args,
) -> Result<CudaSlice<f32>> {
    // SAFETY: every element is written by the kernel (thread 0 of block `row` writes
    // out[row], and the grid has one block per row) before anything reads it.
    let out = unsafe { call.dev.alloc::<f32>(call.rows)? }; // (N,)
    if call.rows == 0 {
        return Ok(out);
    }
    let (func, n, c) = call.kernel(sn, &format!("distill_div_fwd_{}_{}", sn.name, tn.name))?;
    let stream = call.dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(s).arg(t).arg(&out).arg(&n).arg(&c);
    b.arg(&a.kind).arg(&a.inv_t).arg(&a.w).arg(&a.ln_w).arg(&a.ln_1mw);
    // SAFETY: the arguments match distill_div_fwd_*'s parameters in number, order and
    // type; s and t hold rows * v elements, out holds rows.
    unsafe { b.launch(call.config()) }.w()?;
    Ok(out)
}

/// `DivergenceRowsGrad`: student (N, V), teacher (N, V), grad_rows (N,) f32 -> (N, V)
/// in the student's dtype.
#[allow(clippy::too_many_arguments)] // the op's three (storage, layout) pairs and its constants
pub(super) fn divergence_rows_bwd(
    op: &'static str,
    divergence: Divergence,
    temperature: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    same_shape(op, l1, l2)?;
    let (call, _) = Call::over(op, s1, l1);
    let dev = call.dev;
    let grad_rows = f32_view(s3, l3, op, "the incoming gradient")?; // (N,)
    check_rows(op, "the incoming gradient", grad_rows.len(), call.rows)?;
    let args = Args::new(divergence, temperature);
    let out = with_float_view!(op, "student logits", s1, l1, |s, sn| {
        with_float_view!(op, "teacher logits", s2, l2, |t, tn| {
            let out = div_bwd(&call, (sn, tn), &s, &t, &grad_rows, &args)?; // (N, V)
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        })
    });
    Ok((out, l1.shape().clone()))
}

fn div_bwd<S: DeviceRepr, T>(
    call: &Call,
    (sn, tn): (Elem, Elem),
    s: &CudaView<S>,
    t: &CudaView<T>,
    grad_rows: &CudaView<f32>,
    a: &Args,
) -> Result<CudaSlice<S>> {
    // SAFETY: the kernel writes every element of every row (zeros for rows whose
    // incoming gradient is 0) before anything reads it.
    let out = unsafe { call.dev.alloc::<S>(call.rows * call.v)? }; // (N, V)
    if call.rows == 0 {
        return Ok(out);
    }
    let (func, n, c) = call.kernel(sn, &format!("distill_div_bwd_{}_{}", sn.name, tn.name))?;
    let stream = call.dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(s).arg(t).arg(grad_rows).arg(&out).arg(&n).arg(&c);
    b.arg(&a.kind).arg(&a.inv_t).arg(&a.w).arg(&a.ln_w).arg(&a.ln_1mw);
    // SAFETY: the arguments match distill_div_bwd_*'s parameters in number, order and
    // type; s, t and out hold rows * v elements of their types, grad_rows holds rows.
    unsafe { b.launch(call.config()) }.w()?;
    Ok(out)
}

/// `CrossEntropyRows`: student (N, V), targets (N,) u32 -> (N,) f32. A target outside
/// the vocabulary is an error naming it, as on the CPU; finding out costs one 4-byte
/// copy back to the host (and so a wait for the kernel) per call.
pub(super) fn cross_entropy_rows_fwd(
    op: &'static str,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (call, rows_shape) = Call::over(op, s1, l1);
    let dev = call.dev;
    let targets = u32_view(s2, l2, op, "the targets")?; // (N,)
    check_rows(op, "the targets", targets.len(), call.rows)?;
    let out = with_float_view!(op, "student logits", s1, l1, |s, sn| ce_fwd(&call, sn, &s, &targets)?);
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), rows_shape))
}

fn ce_fwd<S>(call: &Call, sn: Elem, s: &CudaView<S>, targets: &CudaView<u32>) -> Result<CudaSlice<f32>> {
    let dev = call.dev;
    // SAFETY: thread 0 of block `row` writes out[row], one block per row.
    let out = unsafe { dev.alloc::<f32>(call.rows)? }; // (N,)
    if call.rows == 0 {
        return Ok(out);
    }
    // u32::MAX - (first bad row), or 0 when every target is in range.
    let bad = dev.alloc_zeros::<u32>(1)?; // (1,)
    let (func, n, c) = call.kernel(sn, &format!("distill_ce_fwd_{}", sn.name))?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(s).arg(targets).arg(&out).arg(&bad).arg(&n).arg(&c);
    // SAFETY: the arguments match distill_ce_fwd_*'s parameters in number, order and
    // type; s holds rows * v elements, targets and out rows, bad one.
    unsafe { b.launch(call.config()) }.w()?;
    let flag = dev.clone_dtoh(&bad)?;
    if let Some(&f) = flag.first().filter(|&&f| f != 0) {
        let row = (u32::MAX - f) as usize;
        let y = targets
            .try_slice(row..row + 1)
            .map(|one| dev.clone_dtoh(&one))
            .transpose()?
            .and_then(|y| y.first().copied());
        let y = y.map_or_else(|| "?".to_string(), |y| y.to_string());
        return Err(msg(format!(
            "cross-entropy: target {y} in row {row} is outside the vocabulary of {} logits",
            call.v
        )));
    }
    Ok(out)
}

/// `CrossEntropyRowsGrad`: student (N, V), targets (N,) u32, grad_rows (N,) f32 ->
/// (N, V) in the student's dtype.
pub(super) fn cross_entropy_rows_bwd(
    op: &'static str,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (call, _) = Call::over(op, s1, l1);
    let dev = call.dev;
    let targets = u32_view(s2, l2, op, "the targets")?; // (N,)
    let grad_rows = f32_view(s3, l3, op, "the incoming gradient")?; // (N,)
    check_rows(op, "the targets", targets.len(), call.rows)?;
    check_rows(op, "the incoming gradient", grad_rows.len(), call.rows)?;
    let out = with_float_view!(op, "student logits", s1, l1, |s, sn| {
        let out = ce_bwd(&call, sn, &s, &targets, &grad_rows)?; // (N, V)
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((out, l1.shape().clone()))
}

fn ce_bwd<S: DeviceRepr>(
    call: &Call,
    sn: Elem,
    s: &CudaView<S>,
    targets: &CudaView<u32>,
    grad_rows: &CudaView<f32>,
) -> Result<CudaSlice<S>> {
    // SAFETY: the kernel writes every element of every row before anything reads it.
    let out = unsafe { call.dev.alloc::<S>(call.rows * call.v)? }; // (N, V)
    if call.rows == 0 {
        return Ok(out);
    }
    let (func, n, c) = call.kernel(sn, &format!("distill_ce_bwd_{}", sn.name))?;
    let stream = call.dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(s).arg(targets).arg(grad_rows).arg(&out).arg(&n).arg(&c);
    // SAFETY: the arguments match distill_ce_bwd_*'s parameters in number, order and
    // type; s and out hold rows * v elements, targets and grad_rows rows.
    unsafe { b.launch(call.config()) }.w()?;
    Ok(out)
}

// ---------------------------------------------------------------------------
// Top-k teachers
// ---------------------------------------------------------------------------

/// The most ids per row the top-k kernels take: a row's ids and categories live in
/// shared memory, 4 (5k + 3) bytes, and 2048 keeps that under the 48 KiB every GPU gives
/// a block without opting in.
const MAX_TOP_K: usize = 2048;

/// The top-k kernels' extra inputs: the teacher's ids and log-probabilities, and k.
struct TopKArgs<'a> {
    indices: CudaView<'a, u32>,
    log_probs: CudaView<'a, f32>,
    k: usize,
}

impl<'a> TopKArgs<'a> {
    fn new(call: &Call, s2: &'a CudaStorage, l2: &Layout, s3: &'a CudaStorage, l3: &Layout) -> Result<Self> {
        let op = call.op;
        let (_, k) = rows_and_vocab(l2);
        if l2.shape() != l3.shape() {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: l2.shape().clone(),
                rhs: l3.shape().clone(),
                op,
            }
            .bt());
        }
        if k > MAX_TOP_K {
            return Err(msg(format!(
                "{op}: a top-k teacher with k = {k} has no CUDA kernel (at most {MAX_TOP_K} ids per token); \
                 lower `top_k` in [distill], or use the full teacher logits"
            )));
        }
        let indices = u32_view(s2, l2, op, "the top-k ids")?; // (N, k)
        let log_probs = f32_view(s3, l3, op, "the top-k log-probabilities")?; // (N, k)
        check_rows(op, "the top-k teacher", indices.len(), call.rows * k)?;
        Ok(Self { indices, log_probs, k })
    }

    fn config(&self, call: &Call) -> LaunchConfig {
        LaunchConfig {
            shared_mem_bytes: cuda_top_k_shared_bytes(self.k) as u32, // <= 41 KB at MAX_TOP_K
            ..call.config()
        }
    }

    /// After a launch that flagged a bad teacher row (`flag` = u32::MAX - row): the
    /// row's ids and log-probabilities, copied back and checked by the CPU's own check,
    /// so that the error names the fault exactly as on the CPU.
    fn bad_row_error(&self, call: &Call, flag: u32) -> candle_core::Error {
        let row = (u32::MAX - flag) as usize;
        let range = row * self.k..(row + 1) * self.k;
        let fetched = self
            .indices
            .try_slice(range.clone())
            .zip(self.log_probs.try_slice(range))
            .map(|(i, l)| Ok::<_, candle_core::Error>((call.dev.clone_dtoh(&i)?, call.dev.clone_dtoh(&l)?)));
        match fetched {
            Some(Ok((idx, lp))) => match super::topk::check_teacher_row(row, call.v, &idx, &lp) {
                Err(e) => e,
                Ok(_) => msg(format!("{}: the CUDA kernel flagged top-k teacher row {row}", call.op)),
            },
            Some(Err(e)) => e,
            None => msg(format!("{}: the CUDA kernel flagged top-k teacher row {row}", call.op)),
        }
    }
}

/// `TopKRows`: student (N, V), indices (N, k) u32, log_probs (N, k) f32 -> (N,) f32. A
/// bad teacher row is an error naming it, as on the CPU; finding out costs a 4-byte copy
/// back to the host per call.
#[allow(clippy::too_many_arguments)] // the op's three (storage, layout) pairs and its constants
pub(super) fn top_k_rows_fwd(
    op: &'static str,
    divergence: Divergence,
    temperature: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (call, rows_shape) = Call::over(op, s1, l1);
    let dev = call.dev;
    let top = TopKArgs::new(&call, s2, l2, s3, l3)?;
    let args = Args::new(divergence, temperature);
    let out = with_float_view!(op, "student logits", s1, l1, |s, sn| top_k_fwd(
        &call, sn, &s, &top, &args
    )?);
    Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), rows_shape))
}

fn top_k_fwd<S>(call: &Call, sn: Elem, s: &CudaView<S>, top: &TopKArgs, a: &Args) -> Result<CudaSlice<f32>> {
    let dev = call.dev;
    // SAFETY: thread 0 of block `row` writes out[row], one block per row.
    let out = unsafe { dev.alloc::<f32>(call.rows)? }; // (N,)
    if call.rows == 0 {
        return Ok(out);
    }
    let bad = dev.alloc_zeros::<u32>(1)?; // (1,): u32::MAX - (a bad row), or 0
    let (func, n, c) = call.kernel(sn, &format!("distill_topk_fwd_{}", sn.name))?;
    let kk = top.k as i32; // <= MAX_TOP_K
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(s).arg(&top.indices).arg(&top.log_probs).arg(&out).arg(&bad);
    b.arg(&n).arg(&c).arg(&kk);
    b.arg(&a.kind).arg(&a.inv_t).arg(&a.w).arg(&a.ln_w).arg(&a.ln_1mw);
    // SAFETY: the arguments match distill_topk_fwd_*'s parameters in number, order and
    // type; s holds rows * v elements, indices and log_probs rows * kk, out rows, bad
    // one; the dynamic shared memory is the 4 (5 kk + 3) bytes the kernel lays out.
    unsafe { b.launch(top.config(call)) }.w()?;
    match dev.clone_dtoh(&bad)?.first() {
        Some(&f) if f != 0 => Err(top.bad_row_error(call, f)),
        _ => Ok(out),
    }
}

/// `TopKRowsGrad`: student (N, V), indices (N, k), log_probs (N, k) and the incoming
/// gradient per row (held by the op, copied to the device here) -> (N, V) in the
/// student's dtype.
#[allow(clippy::too_many_arguments)] // the op's three (storage, layout) pairs and its constants
pub(super) fn top_k_rows_bwd(
    op: &'static str,
    divergence: Divergence,
    temperature: f64,
    grad_rows: &[f32],
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (call, _) = Call::over(op, s1, l1);
    let dev = call.dev;
    check_rows(op, "the incoming gradient", grad_rows.len(), call.rows)?;
    let top = TopKArgs::new(&call, s2, l2, s3, l3)?;
    let args = Args::new(divergence, temperature);
    let grad_rows = dev.clone_htod(grad_rows)?; // (N,)
    let out = with_float_view!(op, "student logits", s1, l1, |s, sn| {
        let out = top_k_bwd(&call, sn, &s, &top, &grad_rows, &args)?; // (N, V)
        CudaStorage::wrap_cuda_slice(out, dev.clone())
    });
    Ok((out, l1.shape().clone()))
}

fn top_k_bwd<S: DeviceRepr>(
    call: &Call,
    sn: Elem,
    s: &CudaView<S>,
    top: &TopKArgs,
    grad_rows: &CudaSlice<f32>,
    a: &Args,
) -> Result<CudaSlice<S>> {
    let dev = call.dev;
    // SAFETY: the kernel writes every element of every row (zeros for masked and bad
    // rows) before anything reads it.
    let out = unsafe { dev.alloc::<S>(call.rows * call.v)? }; // (N, V)
    if call.rows == 0 {
        return Ok(out);
    }
    let bad = dev.alloc_zeros::<u32>(1)?;
    let (func, n, c) = call.kernel(sn, &format!("distill_topk_bwd_{}", sn.name))?;
    let kk = top.k as i32; // <= MAX_TOP_K
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(s)
        .arg(&top.indices)
        .arg(&top.log_probs)
        .arg(grad_rows)
        .arg(&out)
        .arg(&bad);
    b.arg(&n).arg(&c).arg(&kk);
    b.arg(&a.kind).arg(&a.inv_t).arg(&a.w).arg(&a.ln_w).arg(&a.ln_1mw);
    // SAFETY: the arguments match distill_topk_bwd_*'s parameters in number, order and
    // type; s and out hold rows * v elements, indices and log_probs rows * kk,
    // grad_rows rows, bad one; the dynamic shared memory is the kernel's 4 (5 kk + 3) bytes.
    unsafe { b.launch(top.config(call)) }.w()?;
    match dev.clone_dtoh(&bad)?.first() {
        Some(&f) if f != 0 => Err(top.bad_row_error(call, f)),
        _ => Ok(out),
    }
}
