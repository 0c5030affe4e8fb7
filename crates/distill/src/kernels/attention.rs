//! Fused causal self-attention for the CPU f32 training path (issue 9): one candle
//! `CustomOp3` (q, k, v) -> out with a hand-written, flash-attention style backward.
//! `forward_slices` / `backward_slices` expose the same kernels on plain slices for the
//! hand-written training backward (`model::tape`).
//!
//! q is (B, T, H, D) and k, v are (B, T, Hkv, D) (grouped-query attention); the output
//! is (B, T, H, D). Neither the scores nor the probabilities are kept between forward and
//! backward: the forward keeps the split log-sum-exp (m_i, 1 / l_i) of each row and the
//! backward recomputes P tile by tile. Results are bitwise identical for any number of
//! rayon threads (tested). The math, the memory plan, the parallel layout and the
//! measured speed are in `docs/kernels.md`.

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Device, Layout, MetalStorage, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::tiles::{matmul, Dst, Mat, SharedOut};
use crate::error::{Error, Result};
use crate::kernels::cpu::{avx2_dispatch, exp_f32, f32_slice, Isa, LANES};

/// Query rows per tile: the scores of a tile are (TILE_ROWS, <= T) floats of scratch.
/// 64 rows keep the products large enough for `gemm`'s kernels while the masked
/// triangle of the diagonal block (computed, then zeroed) stays a small part of the work.
const TILE_ROWS: usize = 64;

/// The op's name in candle errors.
const NAME: &str = "distill-causal-attention";

/// Causal self-attention `softmax(q k^T * scale + causal mask) v` per (batch, head), as
/// one fused CPU op with an analytic backward (see the module docs for the math).
///
/// q (B, T, H, D), k and v (B, T, Hkv, D), f32 on the CPU; H a multiple of Hkv
/// (grouped-query attention: query head h reads kv head h / (H / Hkv)). Causal: query t
/// attends keys 0..=t. Returns (B, T, H, D) f32, contiguous. Inputs that are not
/// contiguous are copied to contiguous ones first. On other devices or dtypes use the
/// plain-op attention (`Kernels::Plain`).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let dims = check_inputs(q, k, v)?;
    if !scale.is_finite() {
        return Err(Error::Invalid(format!(
            "causal_attention: scale must be finite, got {scale} (usually 1 / sqrt(head_dim))"
        )));
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = CausalAttention {
        dims,
        scale,
        stats: Mutex::new(None),
    };
    Ok(q.apply_op3(&k, &v, op)?) // (B, T, H, D)
}

/// The sizes of one attention call: q and out are (b, t, h, d), k and v (b, t, hkv, d).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AttnShape {
    pub b: usize,
    pub t: usize,
    /// Query heads.
    pub h: usize,
    /// Key/value heads; divides `h`.
    pub hkv: usize,
    /// Head dimension.
    pub d: usize,
}

impl AttnShape {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.h / self.hkv
    }

    fn q_shape(&self) -> (usize, usize, usize, usize) {
        (self.b, self.t, self.h, self.d)
    }

    fn kv_shape(&self) -> (usize, usize, usize, usize) {
        (self.b, self.t, self.hkv, self.d)
    }

    fn is_empty(&self) -> bool {
        self.b == 0 || self.t == 0 || self.d == 0
    }
}

/// The library's checks, with what was expected and the way out named.
fn check_inputs(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttnShape> {
    for (name, x) in [("q", q), ("k", k), ("v", v)] {
        if !x.device().is_cpu() {
            return Err(Error::Device(format!(
                "causal_attention: {name} is on {:?}, but the fused attention runs on the CPU only; \
                 use the plain-op attention (Kernels::Plain) on this device",
                x.device().location()
            )));
        }
        if x.dtype() != DType::F32 {
            return Err(Error::Invalid(format!(
                "causal_attention: {name} must be f32, got {:?}; use the plain-op attention \
                 (Kernels::Plain) for other compute dtypes",
                x.dtype()
            )));
        }
        if x.rank() != 4 {
            return Err(Error::Shape(format!(
                "causal_attention: {name} must be 4-d, (B, T, heads, head_dim), got shape {:?}",
                x.dims()
            )));
        }
    }
    let (b, t, h, d) = q.dims4()?;
    if k.dims() != v.dims() {
        return Err(Error::Shape(format!(
            "causal_attention: k {:?} and v {:?} must have the same shape (B, T, Hkv, head_dim)",
            k.dims(),
            v.dims()
        )));
    }
    let (kb, kt, hkv, kd) = k.dims4()?;
    if (kb, kt, kd) != (b, t, d) {
        return Err(Error::Invalid(format!(
            "causal_attention: q is (B, T, H, head_dim) = {:?} but k and v are {:?}; \
             they need the same B, T and head_dim",
            q.dims(),
            k.dims()
        )));
    }
    if h == 0 || hkv == 0 || h % hkv != 0 {
        return Err(Error::Invalid(format!(
            "causal_attention: the query heads (H = {h}) must be a positive multiple of the \
             key/value heads (Hkv = {hkv}) for grouped-query attention"
        )));
    }
    Ok(AttnShape { b, t, h, hkv, d })
}

/// (q (B, T, H, D), k (B, T, Hkv, D), v (B, T, Hkv, D)) -> out (B, T, H, D).
///
/// A fresh op is made for every call, so `stats` holds exactly this call's forward
/// softmax statistics, for `bwd`. They are kept (not taken) after a backward so that
/// a second backward through the same graph works.
struct CausalAttention {
    dims: AttnShape,
    scale: f32,
    stats: Mutex<Option<Vec<RowStats>>>, // (B, H, T)
}

/// One score row's softmax statistics, `[max_j S_ij, 1 / sum_j exp(S_ij - max)]`:
/// the row's log-sum-exp in split form (see the module docs).
pub(crate) type RowStats = [f32; 2];

fn op_err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{NAME}: {msg}")).bt()
}

fn no_kernel() -> candle_core::Error {
    op_err("no CUDA kernel; the model uses the plain-op attention on this device")
}

impl CausalAttention {
    /// The layout candle hands the op must be the one `causal_attention` checked.
    fn check_layout(&self, what: &str, layout: &Layout, want: (usize, usize, usize, usize)) -> candle_core::Result<()> {
        let want = Shape::from(want);
        if layout.shape() == &want {
            Ok(())
        } else {
            Err(op_err(format!(
                "{what} has shape {:?}, expected {:?}",
                layout.dims(),
                want.dims()
            )))
        }
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims;
        self.check_layout("q", l1, dims.q_shape())?;
        self.check_layout("k", l2, dims.kv_shape())?;
        self.check_layout("v", l3, dims.kv_shape())?;
        let q = f32_slice(s1, l1, NAME)?; // (B, T, H, D)
        let k = f32_slice(s2, l2, NAME)?; // (B, T, Hkv, D)
        let v = f32_slice(s3, l3, NAME)?; // (B, T, Hkv, D)
        let (out, stats) = forward(dims, self.scale, q, k, v);
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = Some(stats);
        Ok((CpuStorage::F32(out), Shape::from(dims.q_shape())))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Err(no_kernel())
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Err(op_err(
            "no Metal kernel; the model uses the plain-op attention on this device",
        ))
    }

    /// dq, dk, dv by `backward` on the CPU storage; the results are plain tensors (no
    /// graph), and an input that does not track gradients gets `None` (and no work).
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = Need {
            q: q.track_op(),
            k: k.track_op(),
            v: v.track_op(),
        };
        if !(need.q || need.k || need.v) {
            return Ok((None, None, None));
        }
        let dims = self.dims;
        let grad_out = grad_out.to_dtype(DType::F32)?.contiguous()?; // (B, T, H, D)
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (gs, gl) = grad_out.storage_and_layout();
        self.check_layout("q", ql, dims.q_shape())?;
        self.check_layout("k", kl, dims.kv_shape())?;
        self.check_layout("v", vl, dims.kv_shape())?;
        self.check_layout("the output gradient", gl, dims.q_shape())?;
        let q_data = cpu_f32(&qs, ql)?; // (B, T, H, D)
        let k_data = cpu_f32(&ks, kl)?; // (B, T, Hkv, D)
        let v_data = cpu_f32(&vs, vl)?; // (B, T, Hkv, D)
        let g_data = cpu_f32(&gs, gl)?; // (B, T, H, D)

        let mut saved = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        // The forward always leaves its statistics; recompute them should they be missing.
        let stats = match saved.take() {
            Some(stats) => stats,
            None => forward(dims, self.scale, q_data, k_data, v_data).1,
        }; // (B, H, T)
        let grads = backward(dims, self.scale, need, q_data, k_data, v_data, g_data, &stats);
        *saved = Some(stats);
        drop(saved);

        let (dq, dk, dv) = grads;
        let dev = Device::Cpu;
        let dq = need.q.then(|| Tensor::from_vec(dq, dims.q_shape(), &dev)).transpose()?;
        let dk = need
            .k
            .then(|| Tensor::from_vec(dk, dims.kv_shape(), &dev))
            .transpose()?;
        let dv = need
            .v
            .then(|| Tensor::from_vec(dv, dims.kv_shape(), &dev))
            .transpose()?;
        Ok((dq, dk, dv))
    }
}

/// The contiguous f32 contents of a CPU storage.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match storage {
        Storage::Cpu(s) => f32_slice(s, layout, NAME),
        _ => Err(op_err(
            "the backward runs on the CPU only; use the plain-op attention on this device",
        )),
    }
}

/// Which input gradients backward computes.
#[derive(Clone, Copy, Debug)]
struct Need {
    q: bool,
    k: bool,
    v: bool,
}

// ---------------------------------------------------------------------------
// Forward and backward on slices
// ---------------------------------------------------------------------------

/// The op's forward on plain slices, for callers that run their own backward
/// (`model::tape`): q (B, T, H, D), k and v (B, T, Hkv, D), row-major. Returns out
/// (B, T, H, D) and the softmax statistics (B, H, T) that `backward_slices` takes.
///
/// # Panics
///
/// If `shape` is not a valid grouped-query shape or a slice's length does not match it
/// (the callers build both from one model config).
pub(crate) fn forward_slices(
    shape: AttnShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f32>, Vec<RowStats>) {
    check_slices(shape, &[q], &[k, v]);
    forward(shape, scale, q, k, v)
}

/// The op's backward on plain slices: dq (B, T, H, D), dk and dv (B, T, Hkv, D) for the
/// output gradient `dout` (B, T, H, D) and the `stats` of `forward_slices`.
///
/// # Panics
///
/// As `forward_slices`, and if `stats` is not (B, H, T).
pub(crate) fn backward_slices(
    shape: AttnShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    stats: &[RowStats],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    check_slices(shape, &[q, dout], &[k, v]);
    let AttnShape { b, t, h, .. } = shape;
    assert_eq!(
        stats.len(),
        b * h * t,
        "{NAME}: softmax statistics do not match {shape:?}"
    );
    let all = Need {
        q: true,
        k: true,
        v: true,
    };
    backward(shape, scale, all, q, k, v, dout, stats)
}

fn check_slices(shape: AttnShape, q_like: &[&[f32]], kv_like: &[&[f32]]) {
    let AttnShape { b, t, h, hkv, d } = shape;
    assert!(
        h > 0 && hkv > 0 && h % hkv == 0,
        "{NAME}: {shape:?} is not a grouped-query shape"
    );
    let ok = q_like.iter().all(|x| x.len() == b * t * h * d) && kv_like.iter().all(|x| x.len() == b * t * hkv * d);
    assert!(ok, "{NAME}: slice lengths do not match {shape:?}");
}

/// Returns out (B, T, H, D) and the softmax statistics of every score row, (B, H, T).
fn forward(dims: AttnShape, scale: f32, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<RowStats>) {
    let AttnShape { b, t, h, d, .. } = dims;
    let mut out = vec![0f32; b * t * h * d]; // (B, T, H, D)
    let mut stats = vec![[0f32; 2]; b * h * t]; // (B, H, T)
    if dims.is_empty() {
        return (out, stats);
    }
    let isa = Isa::detect();
    let shared = SharedOut::new(&mut out);
    stats
        .par_chunks_mut(t)
        .enumerate()
        .for_each(|(bh, st_h)| forward_head(dims, scale, isa, q, k, v, bh / h, bh % h, &shared, st_h));
    (out, stats)
}

/// Where head `head` of batch `b` starts in a (B, T, heads, D) buffer; its rows follow
/// at a stride of heads * D.
fn head_offset(dims: AttnShape, heads: usize, b: usize, head: usize) -> usize {
    (b * dims.t * heads + head) * dims.d
}

/// One (batch, query head): its rows of out (B, T, H, D) and their statistics st_h (T,).
#[allow(clippy::too_many_arguments)]
fn forward_head(
    dims: AttnShape,
    scale: f32,
    isa: Isa,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    b: usize,
    h: usize,
    out: &SharedOut,
    st_h: &mut [RowStats],
) {
    let AttnShape { t, d, .. } = dims;
    let (q_rs, kv_rs) = (dims.h * d, dims.hkv * d); // row strides
    let q_at = head_offset(dims, dims.h, b, h);
    let kv_at = head_offset(dims, dims.hkv, b, h / dims.group());
    let qh = gather_rows(&q[q_at..], q_rs, t, d); // (T, D)
    let kh = gather_rows(&k[kv_at..], kv_rs, t, d); // (T, D)
    let vh = gather_rows(&v[kv_at..], kv_rs, t, d); // (T, D)
    let mut scores = vec![0f32; TILE_ROWS.min(t) * t]; // (TILE_ROWS, <= T)
    for i0 in (0..t).step_by(TILE_ROWS) {
        let i1 = (i0 + TILE_ROWS).min(t);
        let (m, n) = (i1 - i0, i1); // query rows i0..i1 meet keys 0..i1
        let s = &mut scores[..m * n];
        // S = scale * Q_tile K^T: (m, n)
        let q_tile = Mat::rows(&qh[i0 * d..], d);
        matmul(m, n, d, Dst::slice(s, n), false, q_tile, Mat::rows(&kh, d).t(), scale);
        softmax_tile(isa, s, n, i0, &mut st_h[i0..i1]);
        // O_tile = P V: (m, D)
        // SAFETY: head h of batch b in out (these rows, D floats each) is this task's alone.
        let o = unsafe { out.rows(q_at + i0 * q_rs, q_rs) };
        matmul(m, d, n, o, false, Mat::rows(s, n), Mat::rows(&vh, d), 1.0);
    }
}

/// Returns dq (B, T, H, D), dk and dv (B, T, Hkv, D); the ones `need` leaves out are
/// empty.
#[allow(clippy::too_many_arguments)]
fn backward(
    dims: AttnShape,
    scale: f32,
    need: Need,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    stats: &[RowStats],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnShape { b, t, h, hkv, d } = dims;
    let len = |wanted: bool, heads: usize| if wanted { b * t * heads * d } else { 0 };
    let mut dq = vec![0f32; len(need.q, h)]; // (B, T, H, D)
    let mut dk = vec![0f32; len(need.k, hkv)]; // (B, T, Hkv, D), accumulated
    let mut dv = vec![0f32; len(need.v, hkv)]; // (B, T, Hkv, D), accumulated
    if dims.is_empty() {
        return (dq, dk, dv);
    }
    let isa = Isa::detect();
    let grads = GroupGrads {
        dq: SharedOut::new(&mut dq),
        dk: SharedOut::new(&mut dk),
        dv: SharedOut::new(&mut dv),
    };
    (0..b * hkv)
        .into_par_iter()
        .for_each(|bk| backward_group(dims, scale, isa, need, q, k, v, dout, stats, bk / hkv, bk % hkv, &grads));
    (dq, dk, dv)
}

/// The gradient buffers the backward tasks write into.
struct GroupGrads<'a> {
    dq: SharedOut<'a>, // (B, T, H, D)
    dk: SharedOut<'a>, // (B, T, Hkv, D)
    dv: SharedOut<'a>, // (B, T, Hkv, D)
}

/// One (batch, key/value head): the gradients of its query heads, in head order, and of
/// its keys and values, summed over them.
#[allow(clippy::too_many_arguments)]
fn backward_group(
    dims: AttnShape,
    scale: f32,
    isa: Isa,
    need: Need,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    stats: &[RowStats],
    b: usize,
    kvh: usize,
    out: &GroupGrads,
) {
    let AttnShape { t, d, .. } = dims;
    let g = dims.group();
    let need_ds = need.q || need.k;
    let (q_rs, kv_rs) = (dims.h * d, dims.hkv * d); // row strides
    let kv_at = head_offset(dims, dims.hkv, b, kvh);
    let kh = gather_rows(&k[kv_at..], kv_rs, t, d); // (T, D)
    let vh = gather_rows(&v[kv_at..], kv_rs, t, d); // (T, D)
    let mut p_buf = vec![0f32; TILE_ROWS.min(t) * t]; // (TILE_ROWS, <= T)
    let mut ds_buf = vec![0f32; if need_ds { TILE_ROWS.min(t) * t } else { 0 }]; // dP, then dS
    for h in kvh * g..(kvh + 1) * g {
        let q_at = head_offset(dims, dims.h, b, h);
        let st_h = &stats[(b * dims.h + h) * t..][..t]; // (T,)
        let qh = gather_rows(&q[q_at..], q_rs, t, d); // (T, D)
        let doh = gather_rows(&dout[q_at..], q_rs, t, d); // (T, D)
        for i0 in (0..t).step_by(TILE_ROWS) {
            let i1 = (i0 + TILE_ROWS).min(t);
            let (m, n) = (i1 - i0, i1); // query rows i0..i1 meet keys 0..i1
            let q_tile = Mat::rows(&qh[i0 * d..], d); // (m, D)
            let do_tile = Mat::rows(&doh[i0 * d..], d); // (m, D)

            // P = exp(scale * Q_tile K^T - max) / sum: (m, n), zero above the diagonal
            let p = &mut p_buf[..m * n];
            matmul(m, n, d, Dst::slice(p, n), false, q_tile, Mat::rows(&kh, d).t(), scale);
            probs_tile(isa, p, n, i0, &st_h[i0..i1]);
            if need.v {
                // dV[0..n] += P^T dO_tile: (n, D)
                // SAFETY: kv head kvh of batch b in dv is this task's alone.
                let dv = unsafe { out.dv.rows(kv_at, kv_rs) };
                matmul(n, d, m, dv, true, Mat::rows(p, n).t(), do_tile, 1.0);
            }
            if !need_ds {
                continue;
            }
            // dP = dO_tile V^T: (m, n), then dS = P * (dP - Di) in place
            let ds = &mut ds_buf[..m * n];
            matmul(m, n, d, Dst::slice(ds, n), false, do_tile, Mat::rows(&vh, d).t(), 1.0);
            dscores_tile(isa, p, ds, n, i0);
            let ds = Mat::rows(ds, n);
            if need.q {
                // dQ_tile = scale * dS K[0..n]: (m, D); the tile sees its whole key range
                // SAFETY: query head h of batch b in dq is this task's alone.
                let dq = unsafe { out.dq.rows(q_at + i0 * q_rs, q_rs) };
                matmul(m, d, n, dq, false, ds, Mat::rows(&kh, d), scale);
            }
            if need.k {
                // dK[0..n] += scale * dS^T Q_tile: (n, D)
                // SAFETY: kv head kvh of batch b in dk is this task's alone.
                let dk = unsafe { out.dk.rows(kv_at, kv_rs) };
                matmul(n, d, m, dk, true, ds.t(), q_tile, scale);
            }
        }
    }
}

/// One head's T rows of D floats, `rs` apart in `x`, as a dense (T, D) buffer: the
/// products then read unit-stride rows, which measured about 8% faster overall than
/// handing `gemm` the strided rows (it packs them again on every call).
fn gather_rows(x: &[f32], rs: usize, t: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; t * d];
    for (i, row) in out.chunks_exact_mut(d).enumerate() {
        row.copy_from_slice(&x[i * rs..][..d]);
    }
    out
}

// ---------------------------------------------------------------------------
// Row passes over a tile of scores
//
// A tile holds rows i0..i0+m of a head's scores, each `n` wide (keys 0..n); row r is
// query i = i0 + r, whose causal keys are 0..=i, so its first i + 1 entries are live and
// the rest are set to 0 for the products that follow. Every loop keeps LANES independent
// accumulators, added in a fixed order, so that LLVM vectorises it without reassociating.
// The loops run over the live keys rounded up to whole LANES chunks (`span`), with the
// extra masked entries made exact zeros of the exponential (scores of -inf), rather than
// finishing each row with a scalar tail.
// ---------------------------------------------------------------------------

/// Row r's live keys (`len`) and the span the vector loops cover.
#[inline(always)]
fn row_span(n: usize, i0: usize, r: usize) -> (usize, usize) {
    let len = i0 + r + 1;
    (len, (len.div_ceil(LANES) * LANES).min(n))
}

/// In place: scores -> probabilities, and each row's statistics into `stats` (m,).
#[inline(always)]
fn softmax_tile_kernel(s: &mut [f32], n: usize, i0: usize, stats: &mut [RowStats]) {
    for (r, (row, st)) in s.chunks_exact_mut(n).zip(stats.iter_mut()).enumerate() {
        let (len, span) = row_span(n, i0, r);
        row[len..span].fill(f32::NEG_INFINITY); // exp(-inf) = 0 exactly
        row[span..].fill(0.0);
        let live = &mut row[..span];
        let mx = max_of(live);
        let sum = exp_shift_sum(live, mx);
        let inv = 1.0 / sum;
        for x in live.iter_mut() {
            *x *= inv;
        }
        *st = [mx, inv];
    }
}

/// In place: scores -> `exp(s - max) * (1 / sum)`, the forward's probabilities,
/// recomputed bit for bit.
#[inline(always)]
fn probs_tile_kernel(s: &mut [f32], n: usize, i0: usize, stats: &[RowStats]) {
    for (r, (row, &[mx, inv])) in s.chunks_exact_mut(n).zip(stats).enumerate() {
        let (len, span) = row_span(n, i0, r);
        row[len..span].fill(f32::NEG_INFINITY);
        row[span..].fill(0.0);
        for x in row[..span].iter_mut() {
            *x = exp_f32(*x - mx) * inv;
        }
    }
}

/// In place: dP -> dS = P * (dP - Di), Di = sum_j P_ij dP_ij. P is 0 beyond the live keys.
#[inline(always)]
fn dscores_tile_kernel(p: &[f32], dp: &mut [f32], n: usize, i0: usize) {
    for (r, (p_row, dp_row)) in p.chunks_exact(n).zip(dp.chunks_exact_mut(n)).enumerate() {
        let (_, span) = row_span(n, i0, r);
        let (live, masked) = dp_row.split_at_mut(span);
        let p_live = &p_row[..span];
        let di = dot(p_live, live);
        for (x, &pj) in live.iter_mut().zip(p_live) {
            *x = pj * (*x - di);
        }
        masked.fill(0.0);
    }
}

/// The largest element (NaNs are skipped here and propagate through the exponentials).
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    acc.iter().fold(tail, |a, &b| if b > a { b } else { a })
}

/// `x <- exp(x - shift)` and the sum of the results.
#[inline(always)]
fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let e = exp_f32(c[l] - shift);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_f32(*v - shift);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

avx2_dispatch!(softmax_tile, softmax_tile_avx2, softmax_tile_kernel, <>, (s: &mut [f32], n: usize, i0: usize, stats: &mut [RowStats]) -> ());
avx2_dispatch!(probs_tile, probs_tile_avx2, probs_tile_kernel, <>, (s: &mut [f32], n: usize, i0: usize, stats: &[RowStats]) -> ());
avx2_dispatch!(dscores_tile, dscores_tile_avx2, dscores_tile_kernel, <>, (p: &[f32], dp: &mut [f32], n: usize, i0: usize) -> ());

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Var, D};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::time::Instant;

    fn uniform(shape: &[usize], scale: f32, seed: u64) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    fn values(x: &Tensor) -> Result<Vec<f32>> {
        Ok(x.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The plain candle composition the fused op must match: (B, H, T, D) heads, kv heads
    /// repeated, an additive -inf causal mask and a softmax from max/exp/sum ops. Runs in
    /// the inputs' dtype (f64 for the accuracy reference).
    fn attention_plain(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        let (b, t, h, d) = q.dims4()?;
        let hkv = k.dim(2)?;
        let g = h / hkv;
        // (B, T, Hkv, D) -> (B, H, T, D), query head h reading kv head h / g
        let repeat = |x: &Tensor| -> Result<Tensor> {
            let x = x.transpose(1, 2)?.unsqueeze(2)?; // (B, Hkv, 1, T, D)
            Ok(x.broadcast_as((b, hkv, g, t, d))?.reshape((b, h, t, d))?)
        };
        let q = q.transpose(1, 2)?.contiguous()?; // (B, H, T, D)
        let k = repeat(k)?; // (B, H, T, D)
        let v = repeat(v)?; // (B, H, T, D)
        let mask: Vec<f32> = (0..t * t)
            .map(|ij| if ij % t > ij / t { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?.to_dtype(q.dtype())?; // (T, T)
        let s = (q.matmul(&k.t()?)? * scale as f64)?.broadcast_add(&mask)?; // (B, H, T, T)
        let mx = s.max_keepdim(D::Minus1)?.detach(); // (B, H, T, 1); softmax is shift-invariant
        let e = s.broadcast_sub(&mx)?.exp()?; // (B, H, T, T)
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?; // (B, H, T, T)
        Ok(p.matmul(&v)?.transpose(1, 2)?.contiguous()?) // (B, T, H, D)
    }

    /// The plain composition in f64, rounded to f32 at the end: the accuracy reference.
    fn attention_f64(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        let (q, k, v) = (
            q.to_dtype(DType::F64)?,
            k.to_dtype(DType::F64)?,
            v.to_dtype(DType::F64)?,
        );
        Ok(attention_plain(&q, &k, &v, scale)?.to_dtype(DType::F32)?)
    }

    fn fused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
        causal_attention(q, k, v, scale)
    }

    /// max |a - b| / max |b|, over all elements.
    fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1e-30);
        Ok(diff / scale)
    }

    /// (B, T, H, Hkv, D) and the magnitude of q and k (v is in [-1, 1]).
    #[derive(Clone, Copy, Debug)]
    struct Case(usize, usize, usize, usize, usize, f32);

    /// Output and gradients of q, k, v through the loss sum(out * w), w random.
    fn run(case: Case, seed: u64, f: impl Fn(&Tensor, &Tensor, &Tensor, f32) -> Result<Tensor>) -> Result<[Tensor; 4]> {
        let Case(b, t, h, hkv, d, mag) = case;
        let q = Var::from_tensor(&uniform(&[b, t, h, d], mag, seed)?)?;
        let k = Var::from_tensor(&uniform(&[b, t, hkv, d], mag, seed + 1)?)?;
        let v = Var::from_tensor(&uniform(&[b, t, hkv, d], 1.0, seed + 2)?)?;
        let scale = 1.0 / (d as f32).sqrt();
        let out = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale)?;
        let w = uniform(out.dims(), 1.0, seed + 3)?;
        let grads = (&out * &w)?.sum_all()?.backward()?;
        let grad = |x: &Var| -> Result<Tensor> {
            let g = grads.get(x.as_tensor()).cloned();
            g.ok_or_else(|| Error::Invalid("no gradient".into()))
        };
        Ok([out, grad(&q)?, grad(&k)?, grad(&v)?])
    }

    const NAMES: [&str; 4] = ["out", "dq", "dk", "dv"];

    /// Inputs of +-30 with scale 1/sqrt(D): scores of a few hundred, so that most rows of
    /// the softmax saturate to one-hot.
    const SATURATED: [Case; 2] = [Case(2, 70, 4, 2, 8, 30.0), Case(1, 130, 2, 2, 64, 30.0)];

    #[test]
    fn matches_the_plain_composition_in_values_and_gradients() -> Result<()> {
        let cases = [
            Case(1, 1, 1, 1, 8, 1.0),
            Case(2, 5, 2, 2, 8, 1.0),
            Case(1, 70, 4, 2, 32, 1.0),
            Case(3, 130, 4, 1, 64, 1.0),
            Case(2, 64, 2, 2, 32, 3.0),
            Case(1, 129, 2, 1, 32, 2.0),
            SATURATED[0],
            SATURATED[1],
        ];
        for (i, &case) in cases.iter().enumerate() {
            let got = run(case, 10 * i as u64, fused)?;
            let want = run(case, 10 * i as u64, attention_plain)?;
            let Case(b, t, h, _, d, _) = case;
            assert_eq!(got[0].dims(), [b, t, h, d]);
            assert!(got[0].is_contiguous());
            for (name, (a, b)) in NAMES.iter().zip(got.iter().zip(&want)) {
                assert_eq!(a.dims(), b.dims(), "{case:?}: {name} shape");
                let e = rel(a, b)?;
                assert!(e < 1e-5, "{case:?}: {name} differs from the plain ops by {e}");
            }
        }
        Ok(())
    }

    /// Where the softmax saturates, f32 scores of a few hundred carry absolute errors of
    /// ~1e-5 that the gradients amplify, so neither f32 path is within 1e-5 of the exact
    /// gradients; the fused op must be as close to an f64 reference as the plain ops are.
    #[test]
    fn saturated_softmax_is_as_accurate_as_the_plain_ops() -> Result<()> {
        for (i, &case) in SATURATED.iter().enumerate() {
            let seed = 100 + 10 * i as u64;
            let got = run(case, seed, fused)?;
            let plain = run(case, seed, attention_plain)?;
            let exact = run(case, seed, attention_f64)?;
            for j in 0..4 {
                let (e_fused, e_plain) = (rel(&got[j], &exact[j])?, rel(&plain[j], &exact[j])?);
                assert!(
                    e_fused <= 2.0 * e_plain + 1e-6,
                    "{case:?}: {} is {e_fused} from f64, the plain f32 ops {e_plain}",
                    NAMES[j]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn non_contiguous_inputs_are_accepted() -> Result<()> {
        let (b, t, h, d) = (2, 9, 2, 8);
        // (B, H, T, D) tensors viewed as (B, T, H, D): strided, not contiguous.
        let q = uniform(&[b, h, t, d], 1.0, 1)?.transpose(1, 2)?;
        let k = uniform(&[b, h, t, d], 1.0, 2)?.transpose(1, 2)?;
        let v = uniform(&[b, h, t, d], 1.0, 3)?.transpose(1, 2)?;
        assert!(!q.is_contiguous());
        let got = causal_attention(&q, &k, &v, 0.3)?;
        let want = attention_plain(&q, &k, &v, 0.3)?;
        assert!(rel(&got, &want)? < 1e-5);
        Ok(())
    }

    #[test]
    fn results_are_bitwise_identical_for_any_thread_count() -> Result<()> {
        // 4 backward tasks, 8 forward tasks, 3 tiles per head (the last one partial).
        let case = Case(2, 150, 4, 2, 32, 2.0);
        crate::test_util::assert_same_bits_for_any_thread_count(|| run(case, 7, fused)?.iter().map(values).collect())
    }

    /// Central differences of the f32 op, the loss summed in f64: with step h the rounding
    /// error of the loss is about eps_f32 |L| / h (~1e-5 here) and the truncation error
    /// h^2 |L'''|, so at h = 1e-2 agreement to a few parts in a thousand of the largest
    /// gradient is what f32 allows; a wrong term in the backward is off by far more.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let (b, t, h, hkv, d) = (1, 4, 2, 1, 4);
        let scale = 0.7f32;
        let inputs = [
            uniform(&[b, t, h, d], 1.0, 21)?,
            uniform(&[b, t, hkv, d], 1.0, 22)?,
            uniform(&[b, t, hkv, d], 1.0, 23)?,
        ];
        let w = uniform(&[b, t, h, d], 1.0, 24)?;
        let w_vals = values(&w)?;
        let loss = |args: &[Tensor; 3]| -> Result<f64> {
            let out = values(&causal_attention(&args[0], &args[1], &args[2], scale)?)?;
            Ok(out.iter().zip(&w_vals).map(|(&o, &w)| o as f64 * w as f64).sum())
        };
        let vars = [
            Var::from_tensor(&inputs[0])?,
            Var::from_tensor(&inputs[1])?,
            Var::from_tensor(&inputs[2])?,
        ];
        let out = causal_attention(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), scale)?;
        let grads = (out * &w)?.sum_all()?.backward()?;
        let step = 1e-2f32;
        for (which, var) in vars.iter().enumerate() {
            let analytic = grads
                .get(var.as_tensor())
                .ok_or_else(|| Error::Invalid("no gradient".into()))?;
            let analytic = values(analytic)?;
            let base = values(&inputs[which])?;
            let max_g = analytic.iter().fold(0f32, |a, &g| a.max(g.abs()));
            for i in 0..base.len() {
                let shifted = |delta: f32| -> Result<f64> {
                    let mut x = base.clone();
                    x[i] += delta;
                    let mut args = inputs.clone();
                    args[which] = Tensor::from_vec(x, inputs[which].dims(), &Device::Cpu)?;
                    loss(&args)
                };
                let numeric = ((shifted(step)? - shifted(-step)?) / (2.0 * step as f64)) as f32;
                let err = (numeric - analytic[i]).abs();
                assert!(
                    err <= 5e-3 * max_g.max(1e-3),
                    "input {which} element {i}: analytic {} numeric {numeric}",
                    analytic[i]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn only_the_tracked_inputs_get_gradients() -> Result<()> {
        let q = Var::from_tensor(&uniform(&[1, 9, 2, 8], 1.0, 31)?)?;
        let k = uniform(&[1, 9, 1, 8], 1.0, 32)?;
        let v = uniform(&[1, 9, 1, 8], 1.0, 33)?;
        let out = causal_attention(q.as_tensor(), &k, &v, 0.35)?;
        let grads = out.sum_all()?.backward()?;
        assert!(grads.get(q.as_tensor()).is_some());
        assert!(grads.get(&k).is_none() && grads.get(&v).is_none());
        // The op's graph can be walked twice (the softmax statistics are kept).
        let again = causal_attention(q.as_tensor(), &k, &v, 0.35)?.sum_all()?;
        let (g1, g2) = (again.backward()?, again.backward()?);
        let (Some(a), Some(b)) = (g1.get(q.as_tensor()), g2.get(q.as_tensor())) else {
            panic!("missing gradient")
        };
        assert_eq!(values(a)?, values(b)?);
        Ok(())
    }

    /// `forward_slices` and `backward_slices` (the entry points of the hand-written
    /// training backward) are the op's kernels: bit for bit its output and gradients.
    #[test]
    fn slice_entry_points_match_the_op() -> Result<()> {
        let case = Case(2, 70, 4, 2, 8, 2.0);
        let Case(b, t, h, hkv, d, mag) = case;
        let seed = 41;
        let [out, dq, dk, dv] = run(case, seed, fused)?;
        // The same inputs and output gradient as `run`.
        let q = values(&uniform(&[b, t, h, d], mag, seed)?)?;
        let k = values(&uniform(&[b, t, hkv, d], mag, seed + 1)?)?;
        let v = values(&uniform(&[b, t, hkv, d], 1.0, seed + 2)?)?;
        let w = values(&uniform(&[b, t, h, d], 1.0, seed + 3)?)?;
        let shape = AttnShape { b, t, h, hkv, d };
        let scale = 1.0 / (d as f32).sqrt();
        let (o, stats) = forward_slices(shape, scale, &q, &k, &v);
        let (gq, gk, gv) = backward_slices(shape, scale, &q, &k, &v, &w, &stats);
        assert_eq!(o, values(&out)?);
        assert_eq!(gq, values(&dq)?);
        assert_eq!(gk, values(&dk)?);
        assert_eq!(gv, values(&dv)?);
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() -> Result<()> {
        let q = uniform(&[1, 4, 4, 8], 1.0, 1)?;
        let kv = uniform(&[1, 4, 2, 8], 1.0, 2)?;
        let kv3 = uniform(&[1, 4, 3, 8], 1.0, 3)?; // 3 kv heads for 4 query heads
        let kv_t5 = uniform(&[1, 5, 2, 8], 1.0, 4)?;
        let kv_d4 = uniform(&[1, 4, 2, 4], 1.0, 5)?;
        let bad = |r: Result<Tensor>, want: &str| {
            let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains(want), "expected an error naming {want:?}, got {msg:?}");
        };
        bad(causal_attention(&q.flatten_from(2)?, &kv, &kv, 0.3), "must be 4-d");
        bad(causal_attention(&q, &kv3, &kv3, 0.3), "positive multiple");
        bad(causal_attention(&q.to_dtype(DType::F16)?, &kv, &kv, 0.3), "must be f32");
        bad(causal_attention(&q, &kv.to_dtype(DType::F16)?, &kv, 0.3), "must be f32");
        bad(causal_attention(&q, &kv, &kv_d4, 0.3), "same shape");
        bad(causal_attention(&q, &kv_t5, &kv_t5, 0.3), "same B, T");
        bad(causal_attention(&q, &kv, &kv, f32::NAN), "scale");
        // Empty batches and sequences are fine, forward and backward.
        for (b, t) in [(0, 4), (2, 0)] {
            let q = Var::from_tensor(&uniform(&[b, t, 4, 8], 1.0, 1)?)?;
            let kv = uniform(&[b, t, 2, 8], 1.0, 1)?;
            let out = causal_attention(q.as_tensor(), &kv, &kv, 0.3)?;
            assert_eq!(out.dims(), [b, t, 4, 8]);
            let grads = out.sum_all()?.backward()?;
            assert!(grads.get(q.as_tensor()).is_some_and(|g| g.dims() == [b, t, 4, 8]));
        }
        Ok(())
    }

    /// Median wall time of `f` in ms; its result is dropped inside the timed region.
    fn median_ms<R>(mut f: impl FnMut() -> Result<R>, reps: usize) -> Result<f64> {
        f()?; // warm-up
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps {
            let start = Instant::now();
            f()?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[reps / 2])
    }

    /// Speed of the fused op against the plain composition at the M1 model's attention
    /// shape, through candle (forward, and forward + backward of sum(out * w)), and of the
    /// bare kernels (`forward_slices`, `backward_slices`). Medians of 15. Run with
    /// `cargo test -p distill --lib --release model::attention::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run by hand in a release build"]
    fn timing_fused_against_plain() -> Result<()> {
        let (b, t, h, d) = (8, 256, 8, 32);
        let reps = 15;
        let scale = 1.0 / (d as f32).sqrt();
        let q = Var::from_tensor(&uniform(&[b, t, h, d], 1.0, 1)?)?;
        let k = Var::from_tensor(&uniform(&[b, t, h, d], 1.0, 2)?)?;
        let v = Var::from_tensor(&uniform(&[b, t, h, d], 1.0, 3)?)?;
        let w = uniform(&[b, t, h, d], 1.0, 4)?;
        // Q K^T and P V over the causal half, 2 flops per multiply-add.
        let flops_fwd = 4.0 * (b * h * d) as f64 * (t * (t + 1) / 2) as f64;
        let threads = rayon::current_num_threads();
        println!("B {b}, T {t}, H = Hkv {h}, D {d}, {threads} rayon threads, medians of {reps}");
        type Attn = fn(&Tensor, &Tensor, &Tensor, f32) -> Result<Tensor>;
        let kernels: [(&str, Attn); 2] = [("fused", fused), ("plain", attention_plain)];
        for (name, f) in kernels {
            let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
            let fwd = median_ms(|| f(qt, kt, vt, scale), reps)?;
            let both = median_ms(|| Ok((f(qt, kt, vt, scale)? * &w)?.sum_all()?.backward()?), reps)?;
            let gflops = flops_fwd / fwd / 1e6;
            println!("{name}: forward {fwd:.2} ms ({gflops:.1} GFLOP/s), forward+backward {both:.2} ms");
        }
        let shape = AttnShape { b, t, h, hkv: h, d };
        let (qs, ks, vs, ws) = (
            values(q.as_tensor())?,
            values(k.as_tensor())?,
            values(v.as_tensor())?,
            values(&w)?,
        );
        let (_, stats) = forward_slices(shape, scale, &qs, &ks, &vs);
        let fwd = median_ms(|| Ok(forward_slices(shape, scale, &qs, &ks, &vs)), reps)?;
        let bwd = median_ms(|| Ok(backward_slices(shape, scale, &qs, &ks, &vs, &ws, &stats)), reps)?;
        println!("fused kernels without candle: forward {fwd:.2} ms, backward {bwd:.2} ms");
        Ok(())
    }
}
