//! Fused CPU kernels for the transformer's hot ops, each a candle `CustomOp` with a
//! hand-written backward (issue 9): the linear layer, RMSNorm, SwiGLU and the rotary
//! embedding. Causal attention lives in `kernels::attention`.
//!
//! Built from plain candle ops, RMSNorm is six ops and rope eleven, each a pass over
//! memory with its own backward, gradient allocation and `GradStore` addition, and
//! candle's CPU reductions run on one thread. Each op here is one multi-threaded pass
//! forward and one backward, and keeps nothing for backward but its inputs.
//!
//! The plain composition of each op (`*_plain`) stays beside it: the parity tests
//! compare the two in values and gradients, and `Kernels::Plain` runs the model on
//! them for checking. These kernels are CPU and f32 only; `Llama` uses them where
//! both hold and the plain ops elsewhere (CUDA, bf16/f16 compute).
//!
//! Determinism: work is split into chunks of a fixed number of rows, never by the
//! thread count, and partial sums (RMSNorm's weight gradient) are added in chunk
//! order, so results are bitwise identical whatever `RAYON_NUM_THREADS` is.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::cpu::{exp_f32, f32_slice, with_cpu_f32};
use crate::kernels::decode::{linear_rows, SKINNY_ROWS};

/// Elements per rayon task: enough to amortise scheduling, few enough to balance two
/// to sixteen threads on the model's activations.
const TASK_ELEMS: usize = 1 << 14;

/// Rows per task for rows of `d` elements: fixed by `d` alone (determinism).
fn task_rows(d: usize) -> usize {
    (TASK_ELEMS / d.max(1)).max(1)
}

fn op_err(op: &'static str, msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: {msg}")).bt()
}

/// The library's check before a fused op: CPU and f32, with the way out named.
fn check_input(t: &Tensor, op: &str) -> Result<()> {
    if !t.device().is_cpu() {
        return Err(Error::Device(format!(
            "{op}: the fused kernels run on the CPU; on {:?} use Kernels::Plain",
            t.device().location()
        )));
    }
    if t.dtype() != candle_core::DType::F32 {
        return Err(Error::Shape(format!(
            "{op}: the fused kernels take f32, got {:?}; use Kernels::Plain for other dtypes",
            t.dtype()
        )));
    }
    Ok(())
}

/// Sum of squares with eight independent accumulators, so that it vectorises.
#[inline(always)]
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] += c[k] * c[k];
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    acc.iter().sum::<f32>() + tail
}

/// Sum of a[i] * b[i] * c[i], vectorised as `sum_sq`.
#[inline(always)]
fn sum_prod3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n8 = a.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        for k in 0..8 {
            acc[k] += a[i + k] * b[i + k] * c[i + k];
        }
    }
    let tail: f32 = (n8..a.len()).map(|i| a[i] * b[i] * c[i]).sum();
    acc.iter().sum::<f32>() + tail
}

// ---------------------------------------------------------------------------
// Linear
// ---------------------------------------------------------------------------

/// x (..., in) @ w^T, w (out, in) -> (..., out), f32 on the CPU, as one op.
///
/// The plain composition is four graph nodes (reshape, transpose, matmul, reshape),
/// each with its own gradient buffer and `GradStore` addition, and leaves w's gradient
/// as a transposed view that clipping and the optimizer then read with strides. Here
/// both backward products are single `gemm` calls with the strides they need, and
/// dw comes out contiguous in w's own layout.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    check_input(x, "linear")?;
    check_input(w, "linear")?;
    let (_, i) = w.dims2()?;
    if x.dim(D::Minus1)? != i {
        return Err(Error::Shape(format!(
            "linear: input {:?} does not end in the weight's {i} input features (weight {:?})",
            x.dims(),
            w.dims()
        )));
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp)?)
}

/// The plain composition: x @ w^T over the flattened leading dimensions.
pub fn linear_plain(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let i = x.dim(D::Minus1)?;
    let rows = x.elem_count() / i.max(1);
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().unwrap_or(&mut 0) = w.dim(0)?;
    Ok(x.reshape((rows, i))?.matmul(&w.t()?)?.reshape(out_shape)?)
}

/// dst (m, n) = lhs (m, k) @ rhs (k, n), or dst += lhs @ rhs with `accumulate`, every
/// operand given by its row and column strides, on the rayon pool (gemm splits the
/// output, never k, so the result does not depend on the thread count).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_rs, dst_cs): (usize, usize),
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
) -> candle_core::Result<()> {
    // The last element each operand's strides reach must lie inside its slice.
    let reach = |rows: usize, cols: usize, rs: usize, cs: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    if reach(m, n, dst_rs, dst_cs) > dst.len()
        || reach(m, k, lhs_rs, lhs_cs) > lhs.len()
        || reach(k, n, rhs_rs, rhs_cs) > rhs.len()
    {
        return Err(op_err("distill-linear", "gemm operands are smaller than their shapes"));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.iter_mut().for_each(|v| *v = 0.0);
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three operands are live slices that every (row, column) the strides
    // address lies within (checked above); dst is exclusively borrowed and does not
    // alias lhs or rhs. gemm computes dst = alpha dst + beta lhs @ rhs, reading dst
    // only with read_dst (`accumulate`).
    let alpha = if accumulate { 1.0 } else { 0.0 };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            alpha,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// y (n, o) = x (n, i) @ w^T, w (o, i): `gemm`, or for a few rows `decode::linear_rows`.
pub(crate) fn linear_fwd(x: &[f32], w: &[f32], (n, o, i): (usize, usize, usize)) -> candle_core::Result<Vec<f32>> {
    if n <= SKINNY_ROWS && x.len() == n * i && w.len() == o * i {
        return Ok(linear_rows(x, w, (n, o, i)));
    }
    let mut y = vec![0f32; n * o];
    // w^T's (k, j) element is w[j * i + k].
    gemm_f32((n, o, i), &mut y, (o, 1), x, (i, 1), w, (1, i), false)?;
    Ok(y)
}

/// dx (n, i) = g (n, o) @ w (o, i).
pub(crate) fn linear_bwd_input(
    g: &[f32],
    w: &[f32],
    (n, o, i): (usize, usize, usize),
) -> candle_core::Result<Vec<f32>> {
    let mut dx = vec![0f32; n * i];
    gemm_f32((n, i, o), &mut dx, (i, 1), g, (o, 1), w, (i, 1), false)?;
    Ok(dx)
}

/// dw (o, i) = g^T (o, n) @ x (n, i); g^T's (a, r) element is g[r * o + a].
pub(crate) fn linear_bwd_weight(
    g: &[f32],
    x: &[f32],
    (n, o, i): (usize, usize, usize),
) -> candle_core::Result<Vec<f32>> {
    let mut dw = vec![0f32; o * i];
    gemm_f32((o, i, n), &mut dw, (i, 1), g, (1, o), x, (i, 1), false)?;
    Ok(dw)
}

struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "distill-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, self.name())?;
        let w = f32_slice(ws, wl, self.name())?;
        let (o, i) = wl.shape().dims2()?;
        let n = x.len() / i.max(1);
        let y = linear_fwd(x, w, (n, o, i))?;
        let mut dims = xl.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = o;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let (o, i) = w.dims2()?;
        let n = x.elem_count() / i.max(1);
        let dx = if x.track_op() {
            let dx = with_cpu_f32(g, op, |g| with_cpu_f32(w, op, |w| linear_bwd_input(g, w, (n, o, i))))???;
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = with_cpu_f32(g, op, |g| with_cpu_f32(x, op, |x| linear_bwd_weight(g, x, (n, o, i))))???;
            Some(Tensor::from_vec(dw, w.shape(), w.device())?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

// ---------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------

/// RMSNorm over the last dimension: x (..., d), w (d,) -> x / sqrt(mean(x^2) + eps) * w,
/// all f32 on the CPU. The backward recomputes each row's 1/rms from x (one pass)
/// rather than keeping it.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    check_input(x, "rms_norm")?;
    check_input(w, "rms_norm")?;
    let d = x.dim(D::Minus1)?;
    if w.dims() != [d] {
        return Err(Error::Shape(format!(
            "rms_norm: weight has shape {:?}, expected [{d}] for input {:?}",
            w.dims(),
            x.dims()
        )));
    }
    // candle records the op for backward only when an input tracks gradients, so a
    // frozen teacher builds no graph.
    Ok(x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNormOp { eps: eps as f32 })?)
}

/// The plain composition: x / sqrt(mean(x^2) + eps) * w.
pub fn rms_norm_plain(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (..., 1)
    Ok(x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)?)
}

#[derive(Clone, Copy)]
struct RmsNormOp {
    eps: f32,
}

#[inline(always)]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (sum_sq(row) / row.len() as f32 + eps).sqrt()
}

/// RMSNorm of rows of w.len() elements.
pub(crate) fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut y = vec![0f32; x.len()];
    let chunk = task_rows(d) * d;
    y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(yc, xc)| {
        for (yr, xr) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
            let r = inv_rms(xr, eps);
            for ((o, &xi), &wi) in yr.iter_mut().zip(xr).zip(w) {
                *o = xi * r * wi;
            }
        }
    });
    y
}

/// (dx, dw) of RMSNorm for the output gradient g. Each row's 1/rms is recomputed from x.
pub(crate) fn rms_norm_bwd(x: &[f32], w: &[f32], g: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let chunk_rows = task_rows(d);
    // y_i = x_i r w_i with r = (mean(x^2) + eps)^-1/2, so with gw_i = g_i w_i:
    //   dx_i = r gw_i - x_i r^3 / d * sum_j gw_j x_j,   dw_i = sum_rows g_i x_i r.
    let mut dx = vec![0f32; x.len()];
    let partial_dw: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk_rows * d)
        .zip(x.par_chunks(chunk_rows * d))
        .zip(g.par_chunks(chunk_rows * d))
        .map(|((dxc, xc), gc)| {
            let mut dw = vec![0f32; d];
            for ((dxr, xr), gr) in dxc.chunks_exact_mut(d).zip(xc.chunks_exact(d)).zip(gc.chunks_exact(d)) {
                let r = inv_rms(xr, eps);
                let c = sum_prod3(gr, w, xr) * r * r * r / d as f32;
                for i in 0..d {
                    dxr[i] = r * gr[i] * w[i] - xr[i] * c;
                    dw[i] += gr[i] * xr[i] * r;
                }
            }
            dw
        })
        .collect();
    // Chunk partials added in chunk order: deterministic.
    let mut dw = vec![0f32; d];
    for p in &partial_dw {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dw)
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "distill-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, self.name())?;
        let w = f32_slice(ws, wl, self.name())?;
        let d = w.len();
        if d == 0 || x.len() % d != 0 {
            return Err(op_err(self.name(), format!("{} elements are not rows of {d}", x.len())));
        }
        Ok((CpuStorage::F32(rms_norm_fwd(x, w, self.eps)), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let (dx, dw) = with_cpu_f32(x, op, |x| {
            with_cpu_f32(w, op, |w| with_cpu_f32(g, op, |g| rms_norm_bwd(x, w, g, self.eps)))
        })???;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((x.track_op().then_some(dx), w.track_op().then_some(dw)))
    }
}

// ---------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------

/// silu(gate) * up, elementwise, f32 on the CPU; gate and up of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_input(gate, "swiglu")?;
    check_input(up, "swiglu")?;
    if gate.shape() != up.shape() {
        return Err(Error::Shape(format!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        )));
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGluOp)?)
}

/// The plain composition: silu(gate) * up.
pub fn swiglu_plain(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

struct SwiGluOp;

/// sigmoid(g), through the vectorisable `exp_f32`.
#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-g))
}

/// silu(g) * u, elementwise.
pub(crate) fn swiglu_fwd(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; g.len()];
    y.par_chunks_mut(TASK_ELEMS)
        .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)))
        .for_each(|(yc, (gc, uc))| {
            for ((o, &gi), &ui) in yc.iter_mut().zip(gc).zip(uc) {
                *o = gi * sigmoid(gi) * ui;
            }
        });
    y
}

/// (dgate, dup) of silu(g) * u for the output gradient dy.
pub(crate) fn swiglu_bwd(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    // With s = sigmoid(g): d silu / dg = s (1 + g (1 - s)).
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    dg.par_chunks_mut(TASK_ELEMS)
        .zip(du.par_chunks_mut(TASK_ELEMS))
        .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)))
        .zip(dy.par_chunks(TASK_ELEMS))
        .for_each(|(((dgc, duc), (gc, uc)), dyc)| {
            for i in 0..gc.len() {
                let (gi, s) = (gc[i], sigmoid(gc[i]));
                dgc[i] = dyc[i] * uc[i] * s * (1.0 + gi * (1.0 - s));
                duc[i] = dyc[i] * gi * s;
            }
        });
    (dg, du)
}

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "distill-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32_slice(gs, gl, self.name())?;
        let u = f32_slice(us, ul, self.name())?;
        if g.len() != u.len() {
            return Err(op_err(self.name(), "gate and up differ in length"));
        }
        Ok((CpuStorage::F32(swiglu_fwd(g, u)), gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let (dg, du) = with_cpu_f32(gate, op, |g| {
            with_cpu_f32(up, op, |u| with_cpu_f32(dy, op, |dy| swiglu_bwd(g, u, dy)))
        })???;
        let dg = Tensor::from_vec(dg, gate.shape(), gate.device())?;
        let du = Tensor::from_vec(du, up.shape(), up.device())?;
        Ok((gate.track_op().then_some(dg), up.track_op().then_some(du)))
    }
}

// ---------------------------------------------------------------------------
// Rotary embedding
// ---------------------------------------------------------------------------

/// Rotary embedding, rotate-half form (as Hugging Face Llama), on x (B, T, H, D), the
/// layout the q/k projections produce, so no transpose is needed around it. cos and
/// sin are (T, D/2), the tables of the positions x holds. f32 on the CPU.
///
/// The rotation is orthogonal, so the backward is the inverse rotation (sin negated),
/// applied by the same op (and so differentiable again).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check_input(x, "rope")?;
    let (_, t, _, hd) = x.dims4()?;
    if hd % 2 != 0 || cos.dims() != [t, hd / 2] || sin.dims() != [t, hd / 2] {
        return Err(Error::Invalid(format!(
            "rope: x {:?} needs an even head size and cos/sin of [{t}, {}], got {:?} and {:?}",
            x.dims(),
            hd / 2,
            cos.dims(),
            sin.dims()
        )));
    }
    let op = RopeOp {
        cos: Arc::new(cos.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?),
        sin: Arc::new(sin.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?),
        inverse: false,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// The plain composition on x (B, T, H, D): x * cos + rotate_half(x) * sin.
pub fn rope_plain(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let t = x.dim(1)?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.reshape((1, t, 1, hd))?; // (1, T, 1, D)
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.reshape((1, t, 1, hd))?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

#[derive(Clone)]
struct RopeOp {
    cos: Arc<Vec<f32>>, // (T, D/2)
    sin: Arc<Vec<f32>>, // (T, D/2)
    /// Rotate by -angle: the backward.
    inverse: bool,
}

/// Rotates x (B, T, H, D) by the angles of cos/sin (T, D/2); by minus them when
/// `inverse` (the backward).
pub(crate) fn rope_fwd(
    x: &[f32],
    (t, h, hd): (usize, usize, usize),
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) -> Vec<f32> {
    let half = hd / 2;
    let sign = if inverse { -1.0f32 } else { 1.0 };
    let row = h * hd; // one position of one sequence: (H, D)
    let mut y = vec![0f32; x.len()];
    let rows_per_task = task_rows(row);
    y.par_chunks_mut(rows_per_task * row)
        .zip(x.par_chunks(rows_per_task * row))
        .enumerate()
        .for_each(|(task, (yc, xc))| {
            for (r, (yr, xr)) in yc.chunks_exact_mut(row).zip(xc.chunks_exact(row)).enumerate() {
                let pos = (task * rows_per_task + r) % t;
                let cos = &cos[pos * half..(pos + 1) * half];
                let sin = &sin[pos * half..(pos + 1) * half];
                for (yh, xh) in yr.chunks_exact_mut(hd).zip(xr.chunks_exact(hd)) {
                    let (x1, x2) = xh.split_at(half);
                    let (y1, y2) = yh.split_at_mut(half);
                    for i in 0..half {
                        let sn = sign * sin[i];
                        y1[i] = x1[i] * cos[i] - x2[i] * sn;
                        y2[i] = x2[i] * cos[i] + x1[i] * sn;
                    }
                }
            }
        });
    y
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "distill-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (_, t, h, hd) = l.shape().dims4()?;
        if self.cos.len() != t * (hd / 2) || self.sin.len() != t * (hd / 2) {
            return Err(op_err(self.name(), "cos/sin tables do not match the input"));
        }
        let y = rope_fwd(x, (t, h, hd), &self.cos, &self.sin, self.inverse);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inverse = RopeOp {
            inverse: !self.inverse,
            ..self.clone()
        };
        Ok(Some(g.contiguous()?.apply_op1(inverse)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn randn(shape: &[usize], scale: f32, seed: u64) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    /// max |a - b| / max |b|, over all elements.
    fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1e-30);
        Ok(diff / scale)
    }

    /// Values and gradients of `fused` and `plain` on the same inputs, through a random
    /// weighting of the output so that every output element's gradient differs.
    fn parity(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        plain: impl Fn(&[Tensor]) -> Result<Tensor>,
        tol: f32,
    ) -> Result<()> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let yf = fused(&ts)?;
        let yp = plain(&ts)?;
        assert_eq!(yf.dims(), yp.dims());
        let e = rel(&yf, &yp)?;
        assert!(e < tol, "values differ by {e}");
        let wts = randn(yf.dims(), 1.0, 99)?;
        let gf = (yf * &wts)?.sum_all()?.backward()?;
        let gp = (yp * &wts)?.sum_all()?.backward()?;
        for (i, v) in vars.iter().enumerate() {
            let a = gf.get(v.as_tensor()).expect("fused gradient");
            let b = gp.get(v.as_tensor()).expect("plain gradient");
            let e = rel(a, b)?;
            assert!(e < tol, "gradient of input {i} differs by {e}");
        }
        Ok(())
    }

    #[test]
    fn rms_norm_matches_the_plain_ops_in_values_and_gradients() -> Result<()> {
        for (i, (shape, scale)) in [
            (vec![3usize, 5, 16], 1.0f32),
            (vec![2, 7, 33], 30.0),
            (vec![1000, 8], 1e-3),
            (vec![4, 1, 256], 3.0),
        ]
        .into_iter()
        .enumerate()
        {
            let d = *shape.last().unwrap();
            let x = randn(&shape, scale, i as u64)?;
            let w = (randn(&[d], 1.0, 50 + i as u64)? + 1.0)?;
            parity(
                &[x, w],
                |t| rms_norm(&t[0], &t[1], 1e-5),
                |t| rms_norm_plain(&t[0], &t[1], 1e-5),
                1e-5,
            )?;
        }
        Ok(())
    }

    #[test]
    fn swiglu_matches_the_plain_ops_in_values_and_gradients() -> Result<()> {
        for (i, (shape, scale)) in [
            (vec![3usize, 5, 16], 1.0f32),
            (vec![2, 3, 40_000], 8.0),
            (vec![7], 90.0),
        ]
        .into_iter()
        .enumerate()
        {
            let g = randn(&shape, scale, i as u64)?;
            let u = randn(&shape, 2.0, 10 + i as u64)?;
            parity(&[g, u], |t| swiglu(&t[0], &t[1]), |t| swiglu_plain(&t[0], &t[1]), 1e-5)?;
        }
        Ok(())
    }

    #[test]
    fn rope_matches_the_plain_ops_in_values_and_gradients() -> Result<()> {
        for (i, &(b, t, h, hd)) in [
            (2usize, 5usize, 3usize, 8usize),
            (1, 70, 2, 32),
            (3, 1, 1, 2),
            (2, 300, 4, 16),
        ]
        .iter()
        .enumerate()
        {
            let x = randn(&[b, t, h, hd], 5.0, i as u64)?;
            let ang = (randn(&[t, hd / 2], 3.0, 20 + i as u64)? + 3.0)?;
            let (cos, sin) = (ang.cos()?, ang.sin()?);
            parity(
                &[x],
                |v| rope(&v[0], &cos, &sin),
                |v| rope_plain(&v[0], &cos, &sin),
                1e-5,
            )?;
        }
        Ok(())
    }

    #[test]
    fn linear_matches_the_plain_ops_in_values_and_gradients() -> Result<()> {
        for (i, (xs, o)) in [
            (vec![3usize, 5, 16], 7usize),
            (vec![64, 33], 65),
            (vec![2, 1, 1], 1),
            (vec![4, 300, 24], 40),
        ]
        .into_iter()
        .enumerate()
        {
            let x = randn(&xs, 3.0, i as u64)?;
            let w = randn(&[o, *xs.last().unwrap()], 0.5, 30 + i as u64)?;
            parity(&[x, w], |t| linear(&t[0], &t[1]), |t| linear_plain(&t[0], &t[1]), 1e-5)?;
        }
        Ok(())
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() -> Result<()> {
        crate::test_util::assert_same_bits_for_any_thread_count(|| {
            let x = Var::from_tensor(&randn(&[37, 3, 8, 64], 2.0, 1)?)?;
            let w = Var::from_tensor(&randn(&[64], 1.0, 2)?)?;
            let u = randn(&[37, 3, 8, 64], 1.0, 3)?;
            let ang = randn(&[3, 32], 3.0, 4)?;
            let y = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6)?;
            let y = rope(&y, &ang.cos()?, &ang.sin()?)?;
            let y = swiglu(&y, &u)?;
            let lw = Var::from_tensor(&randn(&[96, 64], 1.0, 5)?)?;
            let y = linear(&y, lw.as_tensor())?;
            let g = y.sum_all()?.backward()?;
            let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
            Ok(vec![
                flat(&y)?,
                flat(g.get(x.as_tensor()).expect("dx"))?,
                flat(g.get(w.as_tensor()).expect("dw"))?,
                flat(g.get(lw.as_tensor()).expect("linear dw"))?,
            ])
        })
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        // f32 central differences: a loose tolerance, against the analytic gradients.
        let x = randn(&[2, 3, 2, 4], 1.5, 7)?;
        let w = (randn(&[4], 0.5, 8)? + 1.0)?;
        let u = randn(&[2, 3, 2, 4], 1.0, 9)?;
        let ang = randn(&[3, 2], 3.0, 10)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let f = |x: &Tensor| -> Result<Tensor> {
            let y = rms_norm(x, &w, 1e-5)?;
            let y = rope(&y, &cos, &sin)?;
            Ok(swiglu(&y, &u)?.sum_all()?)
        };
        let xv = Var::from_tensor(&x)?;
        let g = f(xv.as_tensor())?.backward()?;
        let analytic: Vec<f32> = g.get(xv.as_tensor()).expect("dx").flatten_all()?.to_vec1()?;
        let base: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let h = 1e-2f32;
        for (i, &a) in analytic.iter().enumerate() {
            let at = |delta: f32| -> Result<f32> {
                let mut v = base.clone();
                v[i] += delta;
                Ok(f(&Tensor::from_vec(v, x.shape(), &Device::Cpu)?)?.to_scalar::<f32>()?)
            };
            let numeric = (at(h)? - at(-h)?) / (2.0 * h);
            assert!(
                (numeric - a).abs() <= 2e-2 * (1.0 + a.abs()),
                "element {i}: numeric {numeric} analytic {a}"
            );
        }
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() -> Result<()> {
        let x = randn(&[2, 3, 8], 1.0, 0)?;
        assert!(rms_norm(&x, &randn(&[7], 1.0, 1)?, 1e-5).is_err());
        assert!(rms_norm(&x.to_dtype(candle_core::DType::F16)?, &randn(&[8], 1.0, 1)?, 1e-5).is_err());
        assert!(swiglu(&x, &randn(&[2, 3, 7], 1.0, 1)?).is_err());
        assert!(linear(&x, &randn(&[4, 7], 1.0, 1)?).is_err());
        assert!(linear(&x, &randn(&[8], 1.0, 1)?).is_err());
        let x4 = randn(&[1, 3, 2, 8], 1.0, 0)?;
        assert!(rope(&x4, &randn(&[3, 3], 1.0, 1)?, &randn(&[3, 4], 1.0, 1)?).is_err());
        assert!(rope(&x, &randn(&[3, 4], 1.0, 1)?, &randn(&[3, 4], 1.0, 1)?).is_err());
        Ok(())
    }
}
