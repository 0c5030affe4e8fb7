//! The family of distillation divergences, and their plain-candle reference.
//!
//! Every member compares, row by row, the teacher's distribution `p = softmax(t / T)`
//! with the student's `q = softmax(s / T)` over the vocabulary (the last dimension).
//! `divergence_rows_reference` builds each one from differentiable candle ops; the
//! fused CPU kernel in `loss::full` must agree with it in values and in gradients.
//!
//! Temperature convention, stated once for the whole module: the row functions apply
//! `1/T` to the logits and nothing else. The caller multiplies the (masked, summed)
//! rows by `T^2` (Hinton et al. 2015), because d/ds of a divergence of softmax(s/T)
//! carries a `1/T` and, for large T, `q - p` another; `T^2` keeps the soft term's
//! gradients the same size as T changes. `fused::distill_loss_fused` and
//! `reference::distill_loss` both do so, for every divergence alike (at T = 1, the
//! usual setting of GKD, MiniLLM and DistiLLM, the factor is 1).
//!
//! Zero-probability convention: a term `w * (log a - log b)` whose weight `w` is exactly
//! 0 contributes 0 (the `0 log 0 = 0` of information theory). With finite logits this
//! never matters, because log-probabilities are computed by max-shifted log-softmax and
//! stay finite even where the probability underflows; it matters for logits of `-inf`
//! (a masked vocabulary entry), which both implementations accept as long as each row
//! keeps one finite logit.

use std::fmt;

use candle_core::{DType, Tensor, D};

use crate::config::{DistillConfig, LossKind};
use crate::error::{Error, Result};

/// Which divergence between the teacher distribution `p` and the student
/// distribution `q` the soft term minimises. All are >= 0 and 0 when `q == p`.
///
/// In TOML (externally tagged, snake_case): `divergence = "forward_kl"`,
/// `divergence = "tvd"`, `divergence = { jsd = { beta = 0.5 } }`,
/// `divergence = { skew_forward_kl = { skew = 0.1 } }`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Divergence {
    /// `KL(p || q) = sum p (log p - log q)`: mean-seeking; the classic soft-target loss
    /// of Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a Neural Network"),
    /// used there with the `T^2` factor.
    ForwardKl,
    /// `KL(q || p) = sum q (log q - log p)`: mode-seeking; MiniLLM (Gu et al. 2024,
    /// "MiniLLM: Knowledge Distillation of Large Language Models") argues it suits
    /// generative students, which should not spread mass over the teacher's low-probability tail.
    ReverseKl,
    /// Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy
    /// Distillation of Language Models", eq. 1), with `m = beta p + (1 - beta) q`:
    /// `JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m)`; `beta = 0.5` is the
    /// symmetric JSD. That expression tends to 0 at both ends (`JSD/beta -> KL(p || q)`
    /// as beta -> 0, `JSD/(1 - beta) -> KL(q || p)` as beta -> 1), so the end points are
    /// defined as the divergences the paper says JSD(beta) interpolates, as TRL's
    /// `GKDTrainer.generalized_jsd_loss` does: `beta = 0` *is* forward KL and `beta = 1`
    /// *is* reverse KL, exactly. `beta` must lie in [0, 1].
    Jsd { beta: f64 },
    /// Skew forward KL of DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined
    /// Distillation for Large Language Models"): `KL(p || skew p + (1 - skew) q)`.
    /// Mixing a little of the teacher into the student keeps the log finite and the
    /// gradient bounded where the student puts no mass. `skew = 0` is forward KL;
    /// `skew` must lie in [0, 1) (at 1 the divergence is identically 0).
    SkewForwardKl { skew: f64 },
    /// Skew reverse KL of DistiLLM: `KL(q || skew q + (1 - skew) p)`. `skew = 0` is
    /// reverse KL; `skew` must lie in [0, 1).
    SkewReverseKl { skew: f64 },
    /// Total variation distance `0.5 sum |p - q|`, in [0, 1]. Its (sub)gradient uses
    /// sign(0) = 0 in the fused kernel; candle's `abs` uses +1 there, which changes
    /// nothing unless some `q_j == p_j` exactly while other entries differ.
    Tvd,
}

impl Default for Divergence {
    /// Forward KL: what `reference::distill_loss` computes, and Hinton-style KD.
    fn default() -> Self {
        Self::ForwardKl
    }
}

impl Divergence {
    /// The divergence `[distill]` names, with its parameter.
    pub fn of(d: &DistillConfig) -> Self {
        match d.loss {
            LossKind::ForwardKl => Self::ForwardKl,
            LossKind::ReverseKl => Self::ReverseKl,
            LossKind::Jsd => Self::Jsd { beta: d.beta },
            LossKind::SkewForwardKl => Self::SkewForwardKl { skew: d.skew },
            LossKind::SkewReverseKl => Self::SkewReverseKl { skew: d.skew },
            LossKind::Tvd => Self::Tvd,
        }
    }

    /// Checks the parameter ranges; the message names the divergence, the key, the
    /// allowed range and what the end points mean.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::ForwardKl | Self::ReverseKl | Self::Tvd => Ok(()),
            Self::Jsd { beta } => {
                if (0.0..=1.0).contains(&beta) {
                    Ok(())
                } else {
                    Err(Error::Invalid(format!(
                        "divergence jsd: beta must lie in [0, 1] (0 = forward KL, 1 = reverse KL, 0.5 = symmetric JSD), got {beta}"
                    )))
                }
            }
            Self::SkewForwardKl { skew } | Self::SkewReverseKl { skew } => {
                if (0.0..1.0).contains(&skew) {
                    Ok(())
                } else {
                    Err(Error::Invalid(format!(
                        "divergence {}: skew must lie in [0, 1) (0 = plain KL; DistiLLM uses 0.1), got {skew}",
                        self.name()
                    )))
                }
            }
        }
    }

    /// The snake_case name used in configs and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ForwardKl => "forward_kl",
            Self::ReverseKl => "reverse_kl",
            Self::Jsd { .. } => "jsd",
            Self::SkewForwardKl { .. } => "skew_forward_kl",
            Self::SkewReverseKl { .. } => "skew_reverse_kl",
            Self::Tvd => "tvd",
        }
    }

    /// Replaces the JSD end points by the divergences they are defined to be, so that
    /// both implementations compute `beta = 0` and `beta = 1` exactly as forward and
    /// reverse KL (the mixture formula would give 0 there).
    pub(crate) fn canonical(self) -> Self {
        match self {
            Self::Jsd { beta: 0.0 } => Self::ForwardKl,
            Self::Jsd { beta: 1.0 } => Self::ReverseKl,
            d => d,
        }
    }
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Jsd { beta } => write!(f, "jsd(beta={beta})"),
            Self::SkewForwardKl { skew } | Self::SkewReverseKl { skew } => write!(f, "{}(skew={skew})", self.name()),
            _ => f.write_str(self.name()),
        }
    }
}

/// The temperature every divergence op needs: finite and > 0.
pub(crate) fn check_temperature(temperature: f64) -> Result<()> {
    if temperature.is_finite() && temperature > 0.0 {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "distillation temperature must be a finite number > 0, got {temperature}"
        )))
    }
}

/// Checks what both implementations need: same shapes with a non-empty last
/// dimension, a finite temperature > 0, parameters in range.
pub(crate) fn check_inputs(student: &Tensor, teacher: &Tensor, d: Divergence, temperature: f64) -> Result<()> {
    d.validate()?;
    check_temperature(temperature)?;
    if student.dims() != teacher.dims() {
        return Err(Error::Invalid(format!(
            "distillation divergence: student logits {:?} and teacher logits {:?} must have the same shape \
             (rows, vocabulary); a teacher with another vocabulary needs its logits mapped first",
            student.dims(),
            teacher.dims()
        )));
    }
    if student.dims().last().copied().unwrap_or(0) == 0 {
        return Err(Error::Shape(format!(
            "distillation divergence: logits {:?} need a non-empty last (vocabulary) dimension",
            student.dims()
        )));
    }
    Ok(())
}

/// log-softmax over the last dimension from differentiable ops: (N, V) -> (N, V).
/// The max is a constant shift (the result does not depend on it), hence detached.
fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach(); // (N, 1)
    let shifted = x.broadcast_sub(&max)?; // (N, V)
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `sum_j w_j (la_j - lb_j)` per row with the `0 log 0 = 0` convention: (N, V) -> (N,).
/// The difference is zeroed *before* the product where `w == 0`, so that the product's
/// backward (`grad * diff`) never sees `-inf - -inf`; `ne` keeps NaN weights visible.
fn weighted_log_ratio(w: &Tensor, la: &Tensor, lb: &Tensor) -> Result<Tensor> {
    let zeros = w.zeros_like()?; // (N, V)
    let nonzero = w.ne(0.0)?; // (N, V) u8
    let diff = nonzero.where_cond(&(la - lb)?, &zeros)?; // (N, V)
    Ok((w * diff)?.sum(D::Minus1)?)
}

/// `log(a exp(la) + (1 - a) exp(lb))` elementwise, 0 <= a < 1, as a max-shifted
/// log-sum-exp of `la + log a` and `lb + log(1 - a)`: (N, V) -> (N, V). Computing the
/// mixture from probabilities would take `log(0)` wherever both underflow.
/// Where both inputs are `-inf` the result is `-inf`; the `where`s keep the backward
/// of `log` away from 0/0 there.
fn log_mixture(la: &Tensor, a: f64, lb: &Tensor) -> Result<Tensor> {
    let x = (la + a.ln())?; // (N, V); a = 0 gives -inf, and the result is exactly lb
    let y = (lb + (1.0 - a).ln())?; // (N, V)
    let mx = x.maximum(&y)?.detach(); // (N, V), a constant shift like log_softmax's
    let finite = mx.ne(f64::NEG_INFINITY)?; // (N, V) u8
    let zeros = mx.zeros_like()?;
    let mx = finite.where_cond(&mx, &zeros)?;
    let sum = (x.sub(&mx)?.exp()? + y.sub(&mx)?.exp()?)?; // (N, V), >= 1 where finite
    let sum = finite.where_cond(&sum, &zeros.ones_like()?)?;
    let lm = (mx + sum.log()?)?;
    Ok(finite.where_cond(&lm, &zeros.affine(1.0, f64::NEG_INFINITY)?)?)
}

/// Per-row divergence between `p = softmax(teacher / T)` and `q = softmax(student / T)`,
/// from plain differentiable candle ops: student (N, V), teacher (N, V) -> (N,) f32.
///
/// Leading dimensions other than one N are allowed: (..., V) -> (...). The teacher is
/// detached; the student gets gradients through candle's autograd. Not multiplied by
/// `T^2` (see the module header).
pub fn divergence_rows_reference(
    student: &Tensor,
    teacher: &Tensor,
    d: Divergence,
    temperature: f64,
) -> Result<Tensor> {
    check_inputs(student, teacher, d, temperature)?;
    let s = (student.to_dtype(DType::F32)? / temperature)?; // (N, V)
    let t = (teacher.to_dtype(DType::F32)?.detach() / temperature)?; // (N, V)
    let lq = log_softmax(&s)?; // (N, V) student log-probs
    let lp = log_softmax(&t)?; // (N, V) teacher log-probs
    divergence_of_log_probs(&lq, &lp, d)
}

/// Top-k form of `divergence_rows_reference`, from plain differentiable candle ops: the
/// teacher is `indices` (N, k) and tempered `log_probs` (N, k) of its k most likely tokens,
/// both distributions are coarsened to those k tokens plus one tail category (see
/// `loss::topk` for why), and the divergence is taken between the coarsened ones.
/// student (N, V) -> (N,) f32; the student gets gradients, the teacher none.
pub fn top_k_divergence_rows_reference(
    student: &Tensor,
    indices: &Tensor,
    log_probs: &Tensor,
    d: Divergence,
    temperature: f64,
) -> Result<Tensor> {
    d.validate()?;
    let top = crate::loss::topk::TopK {
        indices: indices.clone(),
        log_probs: log_probs.clone(),
    };
    crate::loss::topk::check_top_k_shapes(student, &top)?;
    check_temperature(temperature)?;
    let (n, v) = student.dims2()?;
    let idx = indices.to_dtype(DType::U32)?.contiguous()?; // (N, k)
    let lq = log_softmax(&(student.to_dtype(DType::F32)? / temperature)?)?; // (N, V)
    let lq_top = lq.gather(&idx, D::Minus1)?; // (N, k)
                                              // 1 where a token is in the tail (not listed), built on the host: the reference
                                              // favours plainness over speed.
    let mut tail = vec![1u8; n * v];
    for (r, row) in idx.to_vec2::<u32>()?.iter().enumerate() {
        for &j in row {
            tail[r * v + j as usize] = 0;
        }
    }
    let tail = Tensor::from_vec(tail, (n, v), student.device())?;
    let neg_inf = lq.zeros_like()?.affine(1.0, f64::NEG_INFINITY)?;
    let in_tail = tail.where_cond(&lq, &neg_inf)?; // (N, V)
    let max = in_tail.max_keepdim(D::Minus1)?.detach(); // (N, 1), -inf for an empty tail
    let finite = max.ne(f64::NEG_INFINITY)?;
    let max = finite.where_cond(&max, &max.zeros_like()?)?;
    let lq_tail = (in_tail.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?; // (N, 1)
    let lp = log_probs.to_dtype(DType::F32)?.detach(); // (N, k)
                                                       // 1 - sum in f64, as the kernel does: in f32 it costs the tail 6e-8 absolute.
    let mass = lp.to_dtype(DType::F64)?.exp()?.sum_keepdim(D::Minus1)?; // (N, 1)
    let rest = (1.0 - mass)?.clamp(0f64, 1f64)?.to_dtype(DType::F32)?; // (N, 1)
                                                                       // All tokens listed: the tail is empty, whatever rounding left of 1 - sum.
    let rest = if idx.dim(1)? == v { rest.zeros_like()? } else { rest };
    let lp_tail = rest.log()?; // log 0 = -inf for an empty tail
    let lq_all = Tensor::cat(&[&lq_top, &lq_tail], 1)?; // (N, k + 1)
    let lp_all = Tensor::cat(&[&lp, &lp_tail], 1)?; // (N, k + 1)
    divergence_of_log_probs(&lq_all, &lp_all, d)
}

/// The divergence of each row from normalised log-probabilities: student `lq` and
/// teacher `lp`, (N, C) -> (N,). Shared by the full-vocabulary and top-k references.
fn divergence_of_log_probs(lq: &Tensor, lp: &Tensor, d: Divergence) -> Result<Tensor> {
    let (lq, lp) = (lq.clone(), lp.clone());
    let q = lq.exp()?;
    let p = lp.exp()?;
    let rows = match d.canonical() {
        Divergence::ForwardKl => weighted_log_ratio(&p, &lp, &lq)?,
        Divergence::ReverseKl => weighted_log_ratio(&q, &lq, &lp)?,
        Divergence::Jsd { beta } => {
            let lm = log_mixture(&lp, beta, &lq)?; // m = beta p + (1 - beta) q
            let kl_p = weighted_log_ratio(&p, &lp, &lm)?;
            let kl_q = weighted_log_ratio(&q, &lq, &lm)?;
            ((kl_p * beta)? + (kl_q * (1.0 - beta))?)?
        }
        Divergence::SkewForwardKl { skew } => {
            let lm = log_mixture(&lp, skew, &lq)?; // m = skew p + (1 - skew) q
            weighted_log_ratio(&p, &lp, &lm)?
        }
        Divergence::SkewReverseKl { skew } => {
            let lm = log_mixture(&lq, skew, &lp)?; // m = skew q + (1 - skew) p
            weighted_log_ratio(&q, &lq, &lm)?
        }
        Divergence::Tvd => ((p - q)?.abs()?.sum(D::Minus1)? * 0.5)?,
    };
    Ok(rows) // (N,)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rows(s: &[f32], t: &[f32], shape: (usize, usize), d: Divergence, temp: f64) -> Result<Vec<f32>> {
        let s = Tensor::from_slice(s, shape, &Device::Cpu)?;
        let t = Tensor::from_slice(t, shape, &Device::Cpu)?;
        Ok(divergence_rows_reference(&s, &t, d, temp)?.to_vec1::<f32>()?)
    }

    // Inputs of the golden values below.
    const S: [f32; 8] = [1.0, 2.0, 0.0, -1.0, 0.5, -0.5, 3.0, 0.0];
    const T: [f32; 8] = [2.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0];

    /// Golden values from an independent float64 implementation in Python (stdlib only),
    /// written from the papers' definitions with probabilities (not log-probabilities):
    ///
    /// ```python
    /// import math
    /// def sm(r, T):
    ///     e = [math.exp(x / T) for x in r]; z = sum(e); return [x / z for x in e]
    /// def kl(a, b): return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)
    /// def mix(w, a, b): return [w * x + (1 - w) * y for x, y in zip(a, b)]
    /// S = [[1, 2, 0, -1], [.5, -.5, 3, 0]]; Tt = [[2, 0, 1, 1], [0, 0, 0, 2]]
    /// for T in (1.0, 2.5):
    ///     for s, t in zip(S, Tt):
    ///         p, q = sm(t, T), sm(s, T)
    ///         m = mix(.3, p, q)
    ///         print(T, kl(p, q), kl(q, p), .3 * kl(p, m) + .7 * kl(q, m),
    ///               kl(p, mix(.1, p, q)), kl(q, mix(.1, q, p)),
    ///               .5 * sum(abs(x - y) for x, y in zip(p, q)))
    /// ```
    /// Columns: forward_kl, reverse_kl, jsd(0.3), skew_forward_kl(0.1), skew_reverse_kl(0.1), tvd.
    const GOLDEN: [(f64, [[f64; 6]; 2]); 2] = [
        (
            1.0,
            [
                [
                    0.7932897923806916,
                    1.0860178528590823,
                    0.16571071863960246,
                    0.632053051596291,
                    0.7323951337373751,
                    0.5715847717594591,
                ],
                [
                    1.943153253411683,
                    1.708790441543387,
                    0.31977608319533624,
                    1.2570515234613358,
                    1.2139505345942707,
                    0.7642786302964482,
                ],
            ],
        ),
        (
            2.5,
            [
                [
                    0.16092779886921418,
                    0.1878428090630755,
                    0.034683611489263716,
                    0.13230315729065503,
                    0.14457627981158228,
                    0.25202761349757463,
                ],
                [
                    0.30758554041337993,
                    0.3167839882163665,
                    0.06305478928066433,
                    0.24389348399239946,
                    0.24805020974242456,
                    0.3313118087388479,
                ],
            ],
        ),
    ];

    const GOLDEN_DIVERGENCES: [Divergence; 6] = [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.3 },
        Divergence::SkewForwardKl { skew: 0.1 },
        Divergence::SkewReverseKl { skew: 0.1 },
        Divergence::Tvd,
    ];

    #[test]
    fn reference_matches_python_golden_values() -> Result<()> {
        for (temp, golden) in GOLDEN {
            for (k, d) in GOLDEN_DIVERGENCES.iter().enumerate() {
                let got = rows(&S, &T, (2, 4), *d, temp)?;
                for (r, g) in got.iter().enumerate() {
                    let want = golden[r][k];
                    assert!(
                        (*g as f64 - want).abs() <= 1e-6 + 1e-5 * want.abs(),
                        "{d} T={temp} row {r}: {g} vs golden {want}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn jsd_end_points_are_forward_and_reverse_kl() -> Result<()> {
        let fkl = rows(&S, &T, (2, 4), Divergence::ForwardKl, 1.3)?;
        let rkl = rows(&S, &T, (2, 4), Divergence::ReverseKl, 1.3)?;
        let j0 = rows(&S, &T, (2, 4), Divergence::Jsd { beta: 0.0 }, 1.3)?;
        let j1 = rows(&S, &T, (2, 4), Divergence::Jsd { beta: 1.0 }, 1.3)?;
        for r in 0..2 {
            assert!((j0[r] - fkl[r]).abs() <= 1e-6, "row {r}: {} vs {}", j0[r], fkl[r]);
            assert!((j1[r] - rkl[r]).abs() <= 1e-6, "row {r}: {} vs {}", j1[r], rkl[r]);
        }
        // Near the end points the mixture formula itself approaches the scaled KLs,
        // with an O(beta) correction: JSD/beta -> KL(p||q), JSD/(1-beta) -> KL(q||p).
        let eps = 1e-3;
        let near0 = rows(&S, &T, (2, 4), Divergence::Jsd { beta: eps }, 1.3)?;
        let near1 = rows(&S, &T, (2, 4), Divergence::Jsd { beta: 1.0 - eps }, 1.3)?;
        for r in 0..2 {
            let a = near0[r] as f64 / eps;
            let b = near1[r] as f64 / eps;
            assert!(
                (a - fkl[r] as f64).abs() < 2e-2 * fkl[r] as f64,
                "row {r}: {a} vs {}",
                fkl[r]
            );
            assert!(
                (b - rkl[r] as f64).abs() < 2e-2 * rkl[r] as f64,
                "row {r}: {b} vs {}",
                rkl[r]
            );
        }
        Ok(())
    }

    #[test]
    fn skew_zero_is_plain_kl_and_small_skew_is_close() -> Result<()> {
        let fkl = rows(&S, &T, (2, 4), Divergence::ForwardKl, 2.0)?;
        let rkl = rows(&S, &T, (2, 4), Divergence::ReverseKl, 2.0)?;
        for (skew, tol) in [(0.0, 1e-6), (1e-6, 1e-5)] {
            let sf = rows(&S, &T, (2, 4), Divergence::SkewForwardKl { skew }, 2.0)?;
            let sr = rows(&S, &T, (2, 4), Divergence::SkewReverseKl { skew }, 2.0)?;
            for r in 0..2 {
                assert!(
                    (sf[r] - fkl[r]).abs() <= tol,
                    "skew {skew} row {r}: {} vs {}",
                    sf[r],
                    fkl[r]
                );
                assert!(
                    (sr[r] - rkl[r]).abs() <= tol,
                    "skew {skew} row {r}: {} vs {}",
                    sr[r],
                    rkl[r]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn tvd_is_bounded_and_reaches_its_ends() -> Result<()> {
        // Row 0: disjoint supports in effect (TVD ~ 1); row 1: identical (TVD = 0).
        let s = [1e4f32, -1e4, 0.0, 0.3, -0.7, 2.0];
        let t = [-1e4f32, 1e4, 0.0, 0.3, -0.7, 2.0];
        let v = rows(&s, &t, (2, 3), Divergence::Tvd, 1.0)?;
        assert!((v[0] - 1.0).abs() < 1e-6, "{}", v[0]);
        assert_eq!(v[1], 0.0);
        let g = rows(&S, &T, (2, 4), Divergence::Tvd, 1.0)?;
        assert!(g.iter().all(|x| (0.0..=1.0).contains(x)), "{g:?}");
        Ok(())
    }

    #[test]
    fn identical_distributions_give_zero_for_every_divergence() -> Result<()> {
        for d in GOLDEN_DIVERGENCES {
            let v = rows(&S, &S, (2, 4), d, 1.7)?;
            assert!(v.iter().all(|x| x.abs() < 1e-6), "{d}: {v:?}");
        }
        Ok(())
    }

    #[test]
    fn teacher_is_detached_and_student_gets_gradients() -> Result<()> {
        use candle_core::Var;
        let s = Var::from_slice(&S, (2, 4), &Device::Cpu)?;
        let t = Var::from_slice(&T, (2, 4), &Device::Cpu)?;
        for d in GOLDEN_DIVERGENCES {
            let loss = divergence_rows_reference(s.as_tensor(), t.as_tensor(), d, 1.5)?.sum_all()?;
            let grads = loss.backward()?;
            assert!(grads.get(t.as_tensor()).is_none(), "{d}: teacher got a gradient");
            let g = grads
                .get(s.as_tensor())
                .expect("student gradient")
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert!(
                g.iter().all(|x| x.is_finite()) && g.iter().any(|x| *x != 0.0),
                "{d}: {g:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn validation_names_the_parameter_and_range() {
        let bad = [
            (Divergence::Jsd { beta: 1.5 }, "beta must lie in [0, 1]"),
            (Divergence::Jsd { beta: f64::NAN }, "beta"),
            (
                Divergence::SkewForwardKl { skew: 1.0 },
                "skew_forward_kl: skew must lie in [0, 1)",
            ),
            (Divergence::SkewReverseKl { skew: -0.1 }, "skew_reverse_kl: skew"),
        ];
        for (d, want) in bad {
            let msg = d.validate().expect_err("must be rejected").to_string();
            assert!(msg.contains(want), "{msg}");
        }
        assert!(Divergence::Jsd { beta: 0.0 }.validate().is_ok());
        assert!(Divergence::SkewReverseKl { skew: 0.0 }.validate().is_ok());
        let s = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).expect("tensor");
        let t = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).expect("tensor");
        let err = divergence_rows_reference(&s, &t, Divergence::Tvd, 1.0).expect_err("shapes differ");
        assert!(err.to_string().contains("same shape"), "{err}");
        let err = divergence_rows_reference(&s, &s, Divergence::Tvd, 0.0).expect_err("T = 0");
        assert!(err.to_string().contains("temperature"), "{err}");
    }

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Holder {
            divergence: Divergence,
        }
        for d in GOLDEN_DIVERGENCES {
            let text = toml::to_string(&Holder { divergence: d }).expect("serialize");
            let back: Holder = toml::from_str(&text).expect("parse back");
            assert_eq!(back.divergence, d, "{text}");
        }
        let h: Holder = toml::from_str("divergence = \"reverse_kl\"").expect("unit variant as a string");
        assert_eq!(h.divergence, Divergence::ReverseKl);
        let h: Holder = toml::from_str("divergence = { jsd = { beta = 0.5 } }").expect("inline table");
        assert_eq!(h.divergence, Divergence::Jsd { beta: 0.5 });
        assert!(toml::from_str::<Holder>("divergence = { jsd = { betta = 0.5 } }").is_err());
        assert!(toml::from_str::<Holder>("divergence = \"kl\"").is_err());
        assert_eq!(Divergence::Jsd { beta: 0.5 }.to_string(), "jsd(beta=0.5)");
    }
}
