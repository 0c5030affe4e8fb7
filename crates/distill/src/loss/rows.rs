//! The row kernels of the full-distribution losses, in f32 arithmetic: one divergence
//! or cross-entropy row, forward and backward, and the one-pass forward KL. The CUDA
//! kernels (`kernels/divergence.cu`, launched by `loss::cuda`) mirror them term by term.

use candle_core::WithDType;
use rayon::prelude::*;

use super::family::Divergence;
use crate::kernels::cpu::*;

// ---------------------------------------------------------------------------
// Row kernels (f32 arithmetic)
//
// Every loop over a row is written so that LLVM can vectorise it without being
// allowed to reassociate floating point: sums go into LANES independent accumulators
// (added up in a fixed order at the end), branches are selects, and exp/log are the
// branch-free polynomials below instead of libm calls (which stay scalar and, at
// ~10 exp per element for loss plus gradient, dominated the first version of these
// kernels). The summation order differs from candle's sequential sums, which is why
// parity with the reference is checked to a tolerance, not bit for bit.
// ---------------------------------------------------------------------------

/// Rows per rayon task are at least this many elements' worth, so that small
/// vocabularies do not drown in scheduling overhead.
pub(crate) const MIN_ELEMS_PER_TASK: usize = 1 << 14;

pub(crate) fn min_rows(v: usize) -> usize {
    (MIN_ELEMS_PER_TASK / v.max(1)).max(1)
}

/// The per-call constants of the divergence kernels.
#[derive(Clone, Copy)]
pub(crate) struct Kernel {
    pub(crate) divergence: Divergence,
    /// 1/T, rounded to f32 as candle's `x / T` (an affine op) rounds it.
    pub(crate) inv_t: f32,
    /// beta or skew, and the logs of the two mixture weights (log w, log(1 - w));
    /// log 0 = -inf makes the mixture exactly its other side.
    pub(crate) w: f32,
    pub(crate) ln_w: f32,
    pub(crate) ln_1mw: f32,
}

impl Kernel {
    pub(crate) fn new(divergence: Divergence, temperature: f64) -> Self {
        let w = match divergence {
            Divergence::Jsd { beta } => beta,
            Divergence::SkewForwardKl { skew } | Divergence::SkewReverseKl { skew } => skew,
            _ => 0.0,
        };
        Self {
            divergence,
            inv_t: (1.0 / temperature) as f32,
            w: w as f32,
            ln_w: w.ln() as f32,
            ln_1mw: (1.0 - w).ln() as f32,
        }
    }
}

/// The per-call constants of the CUDA kernels (the `Params` struct of
/// `kernels/divergence.cu`), rounded as the CPU kernel rounds them, with the JSD end
/// points made forward and reverse KL (`Divergence::canonical`). `loss::cuda` launches
/// with these, and so does the CPU emulator of the kernels (crates/cuda-emu).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelParams {
    /// The `DIV_*` code of divergence.cu: 0 forward KL, 1 reverse KL, 2 JSD, 3 skew
    /// forward KL, 4 skew reverse KL, 5 TVD.
    pub kind: i32,
    /// 1/T rounded to f32.
    pub inv_t: f32,
    /// beta or skew, and ln w, ln(1 - w) (ln 0 = -inf).
    pub w: f32,
    pub ln_w: f32,
    pub ln_1mw: f32,
}

impl KernelParams {
    pub fn new(divergence: Divergence, temperature: f64) -> Self {
        let k = Kernel::new(divergence.canonical(), temperature);
        let kind = match k.divergence {
            Divergence::ForwardKl => 0,
            Divergence::ReverseKl => 1,
            Divergence::Jsd { .. } => 2,
            Divergence::SkewForwardKl { .. } => 3,
            Divergence::SkewReverseKl { .. } => 4,
            Divergence::Tvd => 5,
        };
        Self {
            kind,
            inv_t: k.inv_t,
            w: k.w,
            ln_w: k.ln_w,
            ln_1mw: k.ln_1mw,
        }
    }
}

/// The thread-block size the CUDA kernels run with for rows of `v` logits (one block per
/// row): about 8 elements per thread, in whole warps, 32 to 1024 threads (the kernels
/// need a multiple of 32, at most 1024).
pub fn cuda_block_size(v: usize) -> u32 {
    v.div_ceil(32 * 8).clamp(1, 32) as u32 * 32
}

/// The dynamic shared memory of the top-k CUDA kernels for k ids per row: 5k + 3 words
/// (`TopKSmem` in divergence.cu: the ids as given and sorted, then the k + 1 categories'
/// student and teacher log-probabilities and gradients).
pub fn cuda_top_k_shared_bytes(k: usize) -> usize {
    4 * (5 * k + 3)
}

/// One row's normalisers for the student (q) and the teacher (p), from one pass.
#[derive(Clone, Copy)]
pub(crate) struct RowNorms {
    inv_t: f32,
    q: LogNorm,
    p: LogNorm,
}

impl RowNorms {
    #[inline(always)]
    fn new<S: WithDType, T: WithDType>(s: &[S], t: &[T], inv_t: f32) -> Self {
        let (mut q, mut p) = (OnlineLse::new(), OnlineLse::new());
        let (mut bs, mut bt) = ([0f32; BLOCK], [0f32; BLOCK]);
        for (cs, ct) in s.chunks(BLOCK).zip(t.chunks(BLOCK)) {
            let (bs, bt) = (&mut bs[..cs.len()], &mut bt[..ct.len()]);
            bs.iter_mut().zip(cs).for_each(|(b, &x)| *b = ld(x) * inv_t);
            bt.iter_mut().zip(ct).for_each(|(b, &y)| *b = ld(y) * inv_t);
            q.push_block(bs);
            p.push_block(bt);
        }
        Self {
            inv_t,
            q: q.finish(),
            p: p.finish(),
        }
    }

    /// (log q_j, log p_j) of one element.
    #[inline(always)]
    fn logs<S: WithDType, T: WithDType>(self, x: S, y: T) -> (f32, f32) {
        (self.q.log_prob(ld(x) * self.inv_t), self.p.log_prob(ld(y) * self.inv_t))
    }

    /// Writes `scale * f(log q_j, log p_j)` to every element of the row's gradient.
    #[inline(always)]
    fn write<S: WithDType, T: WithDType>(self, s: &[S], t: &[T], scale: f32, out: &mut [S], f: impl ElemFn) {
        for ((o, &x), &y) in out.iter_mut().zip(s).zip(t) {
            let (lq, lp) = self.logs(x, y);
            *o = S::from_f64((scale * f.at(lq, lp)) as f64);
        }
    }

    /// `sum_j f(log q_j, log p_j)` over the row, in f32.
    #[inline(always)]
    fn sum<S: WithDType, T: WithDType>(self, s: &[S], t: &[T], f: impl ElemFn) -> f32 {
        lanes_sum(s, t, OnLogs { norms: self, f })
    }
}

/// A function of one element's `(log q_j, log p_j)`: a divergence term, or a term of
/// its gradient. Defined by `elem_fn!` as a `Copy` struct of f32 constants.
pub(crate) trait ElemFn: Copy {
    fn at(self, lq: f32, lp: f32) -> f32;
}

/// An `ElemFn` applied to raw logits: loads, scales by 1/T, normalises.
#[derive(Clone, Copy)]
pub(crate) struct OnLogs<F> {
    norms: RowNorms,
    f: F,
}

impl<S: WithDType, T: WithDType, F: ElemFn> PairFn<S, T> for OnLogs<F> {
    #[inline(always)]
    fn at(self, x: S, y: T) -> f32 {
        let (lq, lp) = self.norms.logs(x, y);
        self.f.at(lq, lp)
    }
}

/// Defines an `ElemFn`: `elem_fn!(Name { consts } |lq, lp| body)`.
macro_rules! elem_fn {
    ($(#[$doc:meta])* $name:ident { $($field:ident),* } |$lq:ident, $lp:ident| $body:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy)]
        struct $name {
            $($field: f32),*
        }

        impl ElemFn for $name {
            #[inline(always)]
            fn at(self, $lq: f32, $lp: f32) -> f32 {
                let Self { $($field),* } = self;
                $body
            }
        }
    };
}

// The loss terms; sums of these are the divergences (p = teacher, q = student).
elem_fn!(
    /// p (log p - log q)
    FwdKl {} |lq, lp| w_log_ratio(exp_f32(lp), lp, lq)
);
elem_fn!(
    /// q (log q - log p)
    RevKl {} |lq, lp| w_log_ratio(exp_f32(lq), lq, lp)
);
elem_fn!(
    /// beta p (log p - log m) + (1 - beta) q (log q - log m), m = beta p + (1 - beta) q
    Jsd { w, ln_w, ln_1mw } |lq, lp| {
        let lm = log_add_exp(lp + ln_w, lq + ln_1mw);
        w * w_log_ratio(exp_f32(lp), lp, lm) + (1.0 - w) * w_log_ratio(exp_f32(lq), lq, lm)
    }
);
elem_fn!(
    /// p (log p - log m), m = a p + (1 - a) q
    SkewFwd { ln_w, ln_1mw } |lq, lp| w_log_ratio(exp_f32(lp), lp, log_add_exp(lp + ln_w, lq + ln_1mw))
);
elem_fn!(
    /// q (log q - log m), m = a q + (1 - a) p
    SkewRev { ln_w, ln_1mw } |lq, lp| w_log_ratio(exp_f32(lq), lq, log_add_exp(lq + ln_w, lp + ln_1mw))
);
elem_fn!(
    /// |p - q| (halved by the caller)
    AbsDiff {} |lq, lp| (exp_f32(lp) - exp_f32(lq)).abs()
);

// The gradient terms d L / d s_j and the row sums they need (see the module header).
elem_fn!(
    /// q - p
    FwdKlGrad {} |lq, lp| exp_f32(lq) - exp_f32(lp)
);
elem_fn!(
    /// q (log q - log p - l), l = the row's reverse KL
    RevKlGrad { l } |lq, lp| w_log_ratio(exp_f32(lq), lq, lp + l)
);
elem_fn!(
    /// q (log q - log m), summed: K = KL(q || m), m = beta p + (1 - beta) q
    JsdK { ln_w, ln_1mw } |lq, lp| w_log_ratio(exp_f32(lq), lq, log_add_exp(lp + ln_w, lq + ln_1mw))
);
elem_fn!(
    /// (1 - beta) q (log q - log m - K)
    JsdGrad { w, ln_w, ln_1mw, k } |lq, lp| {
        (1.0 - w) * w_log_ratio(exp_f32(lq), lq, log_add_exp(lp + ln_w, lq + ln_1mw) + k)
    }
);
elem_fn!(
    /// p r, summed: R, with r = (1 - a) q / m, m = a p + (1 - a) q
    SkewFwdR { ln_w, ln_1mw } |lq, lp| exp_f32(lp) * ratio(ln_1mw, lq, log_add_exp(lp + ln_w, lq + ln_1mw))
);
elem_fn!(
    /// q R - p r
    SkewFwdGrad { ln_w, ln_1mw, big_r } |lq, lp| {
        exp_f32(lq) * big_r - exp_f32(lp) * ratio(ln_1mw, lq, log_add_exp(lp + ln_w, lq + ln_1mw))
    }
);
elem_fn!(
    /// q u, summed: U, with u = a q / m, m = a q + (1 - a) p
    SkewRevU { ln_w, ln_1mw } |lq, lp| exp_f32(lq) * ratio(ln_w, lq, log_add_exp(lq + ln_w, lp + ln_1mw))
);
elem_fn!(
    /// q ((log q - log m - L) - (u - U))
    SkewRevGrad { ln_w, ln_1mw, l, big_u } |lq, lp| {
        let lm = log_add_exp(lq + ln_w, lp + ln_1mw);
        w_log_ratio(exp_f32(lq), lq, lm + l + (ratio(ln_w, lq, lm) - big_u))
    }
);
elem_fn!(
    /// q g, summed: G, with g = 0.5 sign(q - p)
    TvdG {} |lq, lp| exp_f32(lq) * 0.5 * sign0(exp_f32(lq) - exp_f32(lp))
);
elem_fn!(
    /// q (g - G)
    TvdGrad { big_g } |lq, lp| exp_f32(lq) * (0.5 * sign0(exp_f32(lq) - exp_f32(lp)) - big_g)
);

/// `w (la - lb)` with `0 log 0 = 0`: a zero weight contributes 0 even if the logs are -inf.
#[inline(always)]
pub(crate) fn w_log_ratio(w: f32, la: f32, lb: f32) -> f32 {
    let v = w * (la - lb);
    if w == 0.0 {
        0.0
    } else {
        v
    }
}

/// `log(exp(a) + exp(b))`, exact when one side is -inf, -inf when both are.
#[inline(always)]
pub(crate) fn log_add_exp(a: f32, b: f32) -> f32 {
    let hi = if a >= b { a } else { b };
    let lo = if a >= b { b } else { a };
    let v = hi + ln_1p_unit(exp_f32(lo - hi));
    if hi == f32::NEG_INFINITY {
        f32::NEG_INFINITY
    } else {
        v
    }
}

/// `exp(ln_c + la - lm)` where the weight `exp(la)` is nonzero, else 0: the bounded
/// ratios r and u of the skew gradients.
#[inline(always)]
pub(crate) fn ratio(ln_c: f32, la: f32, lm: f32) -> f32 {
    let v = exp_f32(ln_c + la - lm);
    if la == f32::NEG_INFINITY {
        0.0
    } else {
        v
    }
}

#[inline(always)]
pub(crate) fn sign0(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

avx2_dispatch!(forward_row_best, forward_row_avx2, forward_row, <S, T>, (k: &Kernel, s: &[S], t: &[T]) -> f32);
avx2_dispatch!(
    backward_row_best,
    backward_row_avx2,
    backward_row,
    <S, T>,
    (k: &Kernel, s: &[S], t: &[T], grad_row: f32, out: &mut [S]) -> ()
);
avx2_dispatch!(ce_forward_row_best, ce_forward_row_avx2, ce_forward_row, <S>, (s: &[S], y: usize) -> f32);
avx2_dispatch!(
    ce_backward_row_best,
    ce_backward_row_avx2,
    ce_backward_row,
    <S>,
    (s: &[S], y: usize, grad_row: f32, out: &mut [S]) -> ()
);

/// Forward KL(p || q) of one row and its gradient, for the one-pass loss: with
/// p = softmax(t / T) and q = softmax(s / T), each exponential is taken once.
/// A first pass finds the two maxima; a second stores exp(s/T - max) in `out` (or, when
/// `accumulate`, recomputes it in the third) and exp(t/T - max) in `et`, and sums them;
/// a third forms the loss from log-probabilities (no exp) and writes
/// `grad_row / T * (q - p)` into `out` (added to it when `accumulate`). Returns the
/// row's KL. 2 exponentials per element (3 when accumulating) where the generic
/// forward + backward rows take 6. The rows are in cache after the first pass.
#[inline(always)]
pub(crate) fn fwd_kl_loss_grad_row(
    s: &[f32],
    t: &[f32],
    inv_t: f32,
    grad_row: f32,
    et: &mut [f32],
    out: &mut [f32],
    accumulate: bool,
) -> f32 {
    let v = s.len();
    let (t, et, out) = (&t[..v], &mut et[..v], &mut out[..v]);
    let (ms, mt) = (lanes_max(s) * inv_t, lanes_max(t) * inv_t);
    // Pass 2: the exponentials and their sums, in LANES accumulators.
    let (mut zs, mut zt) = ([0f32; LANES], [0f32; LANES]);
    {
        let pairs = s.chunks_exact(LANES).zip(t.chunks_exact(LANES));
        let bufs = et.chunks_exact_mut(LANES).zip(out.chunks_exact_mut(LANES));
        for ((sc, tc), (ec, oc)) in pairs.zip(bufs) {
            let mut es = [0f32; LANES];
            for l in 0..LANES {
                es[l] = exp_f32(sc[l] * inv_t - ms);
                ec[l] = exp_f32(tc[l] * inv_t - mt);
                zs[l] += es[l];
                zt[l] += ec[l];
            }
            if !accumulate {
                oc.copy_from_slice(&es);
            }
        }
    }
    let whole = v / LANES * LANES;
    let (mut zs_tail, mut zt_tail) = (0f32, 0f32);
    for i in whole..v {
        let es = exp_f32(s[i] * inv_t - ms);
        et[i] = exp_f32(t[i] * inv_t - mt);
        if !accumulate {
            out[i] = es;
        }
        zs_tail += es;
        zt_tail += et[i];
    }
    let zs = zs.iter().sum::<f32>() + zs_tail;
    let zt = zt.iter().sum::<f32>() + zt_tail;
    let (ls, lt) = (ms + zs.ln(), mt + zt.ln()); // the two log-normalisers
    let (inv_zs, inv_zt) = (1.0 / zs, 1.0 / zt);
    let scale = grad_row * inv_t;
    // Pass 3: p (log p - log q) with log p - log q = (t - s) / T - (lt - ls), so no
    // logarithm per element (p = 0 gives 0), and the gradient scale (q - p).
    let shift = lt - ls;
    let mut kl = [0f32; LANES];
    {
        let pairs = s.chunks_exact(LANES).zip(t.chunks_exact(LANES));
        let bufs = et.chunks_exact(LANES).zip(out.chunks_exact_mut(LANES));
        for ((sc, tc), (ec, oc)) in pairs.zip(bufs) {
            if accumulate {
                for l in 0..LANES {
                    let p = ec[l] * inv_zt;
                    let q = exp_f32(sc[l] * inv_t - ms) * inv_zs;
                    kl[l] += p * ((tc[l] - sc[l]) * inv_t - shift);
                    oc[l] += scale * (q - p);
                }
            } else {
                for l in 0..LANES {
                    let p = ec[l] * inv_zt;
                    let q = oc[l] * inv_zs;
                    kl[l] += p * ((tc[l] - sc[l]) * inv_t - shift);
                    oc[l] = scale * (q - p);
                }
            }
        }
    }
    let mut kl_tail = 0f32;
    for i in whole..v {
        let p = et[i] * inv_zt;
        let q = if accumulate { exp_f32(s[i] * inv_t - ms) } else { out[i] } * inv_zs;
        kl_tail += p * ((t[i] - s[i]) * inv_t - shift);
        let g = scale * (q - p);
        out[i] = if accumulate { out[i] + g } else { g };
    }
    kl.iter().sum::<f32>() + kl_tail
}

/// Cross-entropy of one row and its gradient `grad_row * (softmax(s) - onehot(y))`,
/// written into `out`, for the one-pass loss: one exponential per element (stored in
/// `out`, then scaled), where the separate forward and backward rows take three.
/// Returns the row's CE, `lse(s) - s_y`. `out` is left untouched when `grad_row` is 0.
#[inline(always)]
pub(crate) fn ce_loss_grad_row(s: &[f32], y: usize, grad_row: f32, out: &mut [f32]) -> f32 {
    let v = s.len();
    let out = &mut out[..v];
    let m = lanes_max(s);
    let mut z = [0f32; LANES];
    let write = grad_row != 0.0;
    for (sc, oc) in s.chunks_exact(LANES).zip(out.chunks_exact_mut(LANES)) {
        let mut e = [0f32; LANES];
        for l in 0..LANES {
            e[l] = exp_f32(sc[l] - m);
            z[l] += e[l];
        }
        if write {
            oc.copy_from_slice(&e);
        }
    }
    let whole = v / LANES * LANES;
    let mut z_tail = 0f32;
    for i in whole..v {
        let e = exp_f32(s[i] - m);
        z_tail += e;
        if write {
            out[i] = e;
        }
    }
    let z = z.iter().sum::<f32>() + z_tail;
    if write {
        let scale = grad_row / z;
        for o in out.iter_mut() {
            *o *= scale;
        }
        if let Some(o) = out.get_mut(y) {
            *o -= grad_row;
        }
    }
    m + z.ln() - s.get(y).copied().unwrap_or(f32::NAN)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn ce_loss_grad_row_avx2(s: &[f32], y: usize, grad_row: f32, out: &mut [f32]) -> f32 {
    ce_loss_grad_row(s, y, grad_row, out)
}

pub(crate) fn ce_loss_grad_row_best(isa: Isa, s: &[f32], y: usize, grad_row: f32, out: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2 {
        // SAFETY: `isa.avx2` is true only when `Isa::detect` found AVX2 on this CPU.
        return unsafe { ce_loss_grad_row_avx2(s, y, grad_row, out) };
    }
    let _ = isa;
    ce_loss_grad_row(s, y, grad_row, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn fwd_kl_loss_grad_row_avx2(
    s: &[f32],
    t: &[f32],
    inv_t: f32,
    grad_row: f32,
    et: &mut [f32],
    out: &mut [f32],
    accumulate: bool,
) -> f32 {
    fwd_kl_loss_grad_row(s, t, inv_t, grad_row, et, out, accumulate)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn fwd_kl_loss_grad_row_best(
    isa: Isa,
    s: &[f32],
    t: &[f32],
    inv_t: f32,
    grad_row: f32,
    et: &mut [f32],
    out: &mut [f32],
    accumulate: bool,
) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa.avx2 {
        // SAFETY: `isa.avx2` is true only when `Isa::detect` found AVX2 on this CPU.
        return unsafe { fwd_kl_loss_grad_row_avx2(s, t, inv_t, grad_row, et, out, accumulate) };
    }
    let _ = isa;
    fwd_kl_loss_grad_row(s, t, inv_t, grad_row, et, out, accumulate)
}

/// Per-row divergence for all rows: (N, V), (N, V) -> (N,).
pub(crate) fn forward_rows<S: WithDType, T: WithDType>(k: &Kernel, s: &[S], t: &[T], v: usize) -> Vec<f32> {
    let isa = Isa::detect();
    s.par_chunks(v)
        .zip(t.par_chunks(v))
        .with_min_len(min_rows(v))
        .map(|(s, t)| forward_row_best(isa, k, s, t))
        .collect()
}

#[inline(always)]
pub(crate) fn forward_row<S: WithDType, T: WithDType>(k: &Kernel, s: &[S], t: &[T]) -> f32 {
    let r = RowNorms::new(s, t, k.inv_t);
    let (w, ln_w, ln_1mw) = (k.w, k.ln_w, k.ln_1mw);
    match k.divergence {
        Divergence::ForwardKl => r.sum(s, t, FwdKl {}),
        Divergence::ReverseKl => r.sum(s, t, RevKl {}),
        Divergence::Jsd { .. } => r.sum(s, t, Jsd { w, ln_w, ln_1mw }),
        Divergence::SkewForwardKl { .. } => r.sum(s, t, SkewFwd { ln_w, ln_1mw }),
        Divergence::SkewReverseKl { .. } => r.sum(s, t, SkewRev { ln_w, ln_1mw }),
        Divergence::Tvd => 0.5 * r.sum(s, t, AbsDiff {}),
    }
}

/// d(sum_rows grad_rows * loss_rows) / d student for all rows: -> (N, V) in the student's dtype.
pub(crate) fn backward_rows<S: WithDType, T: WithDType>(
    k: &Kernel,
    s: &[S],
    t: &[T],
    grad_rows: &[f32],
    v: usize,
) -> Vec<S> {
    let isa = Isa::detect();
    let mut out = vec![S::from_f64(0.0); s.len()];
    out.par_chunks_mut(v)
        .zip(s.par_chunks(v).zip(t.par_chunks(v)))
        .zip(grad_rows.par_iter())
        .with_min_len(min_rows(v))
        .for_each(|((out, (s, t)), &g)| backward_row_best(isa, k, s, t, g, out));
    out
}

#[inline(always)]
pub(crate) fn backward_row<S: WithDType, T: WithDType>(k: &Kernel, s: &[S], t: &[T], grad_row: f32, out: &mut [S]) {
    // A row whose loss is not used (mask 0) keeps its zeros: skipping it saves the
    // work and keeps garbage in padded rows from turning into NaN gradients.
    if grad_row == 0.0 {
        return;
    }
    let r = RowNorms::new(s, t, k.inv_t);
    let scale = grad_row * k.inv_t; // chain rule through s = student / T
    let (w, ln_w, ln_1mw) = (k.w, k.ln_w, k.ln_1mw);
    match k.divergence {
        Divergence::ForwardKl => r.write(s, t, scale, out, FwdKlGrad {}),
        Divergence::ReverseKl => {
            let l = r.sum(s, t, RevKl {});
            r.write(s, t, scale, out, RevKlGrad { l })
        }
        Divergence::Jsd { .. } => {
            let k = r.sum(s, t, JsdK { ln_w, ln_1mw });
            r.write(s, t, scale, out, JsdGrad { w, ln_w, ln_1mw, k })
        }
        Divergence::SkewForwardKl { .. } => {
            let big_r = r.sum(s, t, SkewFwdR { ln_w, ln_1mw });
            r.write(s, t, scale, out, SkewFwdGrad { ln_w, ln_1mw, big_r })
        }
        Divergence::SkewReverseKl { .. } => {
            let l = r.sum(s, t, SkewRev { ln_w, ln_1mw });
            let big_u = r.sum(s, t, SkewRevU { ln_w, ln_1mw });
            r.write(s, t, scale, out, SkewRevGrad { ln_w, ln_1mw, l, big_u })
        }
        Divergence::Tvd => {
            let big_g = r.sum(s, t, TvdG {});
            r.write(s, t, scale, out, TvdGrad { big_g })
        }
    }
}

/// Cross-entropy of every row: (N, V), (N,) -> (N,).
pub(crate) fn cross_entropy_fwd<S: WithDType>(s: &[S], targets: &[u32], v: usize) -> candle_core::Result<Vec<f32>> {
    let isa = Isa::detect();
    s.par_chunks(v)
        .zip(targets.par_iter())
        .enumerate()
        .with_min_len(min_rows(v))
        .map(|(row, (s, &y))| Ok(ce_forward_row_best(isa, s, target_index(y, v, row)?)))
        .collect()
}

/// `lse(s) - s_y`, y < s.len().
#[inline(always)]
pub(crate) fn ce_forward_row<S: WithDType>(s: &[S], y: usize) -> f32 {
    -LogNorm::of_row(s, 1.0).log_prob(ld(s[y]))
}

pub(crate) fn cross_entropy_bwd<S: WithDType>(s: &[S], targets: &[u32], grad_rows: &[f32], v: usize) -> Vec<S> {
    let isa = Isa::detect();
    let mut out = vec![S::from_f64(0.0); s.len()];
    out.par_chunks_mut(v)
        .zip(s.par_chunks(v))
        .zip(targets.par_iter().zip(grad_rows.par_iter()))
        .with_min_len(min_rows(v))
        .for_each(|((out, s), (&y, &g))| ce_backward_row_best(isa, s, y as usize, g, out));
    out
}

/// `grad_row * (softmax(s) - onehot(y))`; a target outside the row (rejected by the
/// forward) gets no -1.
#[inline(always)]
pub(crate) fn ce_backward_row<S: WithDType>(s: &[S], y: usize, grad_row: f32, out: &mut [S]) {
    if grad_row == 0.0 {
        return; // a masked row keeps its zeros, as in `backward_row`
    }
    let norm = LogNorm::of_row(s, 1.0);
    for (o, &x) in out.iter_mut().zip(s) {
        *o = S::from_f64((grad_row * exp_f32(norm.log_prob(ld(x)))) as f64);
    }
    // The label's -1, added after the vectorised softmax pass.
    if let (Some(o), Some(&x)) = (out.get_mut(y), s.get(y)) {
        *o = S::from_f64((grad_row * (exp_f32(norm.log_prob(ld(x))) - 1.0)) as f64);
    }
}

pub(crate) fn target_index(y: u32, v: usize, row: usize) -> candle_core::Result<usize> {
    let y = y as usize;
    if y < v {
        Ok(y)
    } else {
        Err(candle_core::Error::Msg(format!(
            "cross-entropy: target {y} in row {row} is outside the vocabulary of {v} logits"
        ))
        .bt())
    }
}
