//! Distillation from a teacher given as its top-k tokens per position, as the offline
//! logit cache stores it (`crate::teacher::logit_cache`), or as an online teacher truncated to k.
//!
//! The teacher's mass outside its top k is one tail category: both distributions are
//! coarsened to k + 1 categories and every divergence of `loss::family` is taken between
//! them, with nothing renormalised. The semantics, its consequences and the gradients
//! are in `docs/losses.md`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::family::{check_temperature, Divergence};
use super::full::{check_kernel_device, float_input};
use super::ops::{check_rows, rows_and_vocab};
use super::rows::{backward_row, forward_row, min_rows, Kernel};
use crate::error::{Error, Result};
use crate::kernels::cpu::{exp_f32, f32_slice, ld, u32_slice, with_float_slice, LogNorm, OnlineLse, BLOCK};

/// A teacher given as its top k tokens per row: `indices` (N, k) u32 and `log_probs`
/// (N, k) f32, the tempered log-probabilities `log softmax(t / T)` of those tokens.
#[derive(Clone, Debug)]
pub struct TopK {
    pub indices: Tensor,
    pub log_probs: Tensor,
}

impl TopK {
    pub fn k(&self) -> usize {
        self.indices.dims().last().copied().unwrap_or(0)
    }

    /// The ids (u32) and log-probabilities (f32), row-major, copied to host vectors.
    pub(crate) fn to_host(&self) -> candle_core::Result<(Vec<u32>, Vec<f32>)> {
        Ok((
            self.indices.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?,
            self.log_probs.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
        ))
    }
}

/// The `k` most likely tokens of each row of `logits` (N, V) at temperature T, with their
/// log-probabilities `log softmax(logits / T)`: the online form of what the logit cache
/// stores. Ties go to the lower token id, so the result is a pure function of the logits.
pub fn top_k_of_logits(logits: &Tensor, k: usize, temperature: f64) -> Result<TopK> {
    let (n, v) = logits.dims2()?;
    if k == 0 || k > v {
        return Err(Error::Invalid(format!(
            "top-k teacher: k must be in 1..={v} (the vocabulary), got {k}"
        )));
    }
    check_temperature(temperature)?;
    let inv_t = (1.0 / temperature) as f32;
    let x = logits
        .to_dtype(DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let rows: Vec<(Vec<u32>, Vec<f32>)> = x
        .par_chunks(v)
        .with_min_len(min_rows(v))
        .map(|row| {
            let norm = LogNorm::of_row(row, inv_t);
            let mut ids: Vec<u32> = (0..v as u32).collect();
            // Descending by value, then ascending by id; NaN sorts last.
            let order = |a: &u32, b: &u32| {
                let (xa, xb) = (row[*a as usize], row[*b as usize]);
                xb.partial_cmp(&xa)
                    .unwrap_or_else(|| xa.is_nan().cmp(&xb.is_nan()))
                    .then(a.cmp(b))
            };
            if k < v {
                ids.select_nth_unstable_by(k - 1, order);
                ids.truncate(k);
            }
            ids.sort_by(order);
            let lp = ids.iter().map(|&j| norm.log_prob(row[j as usize] * inv_t)).collect();
            (ids, lp)
        })
        .collect();
    let (mut idx, mut lp) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
    for (i, l) in rows {
        idx.extend(i);
        lp.extend(l);
    }
    let dev = logits.device();
    Ok(TopK {
        indices: Tensor::from_vec(idx, (n, k), dev)?,
        log_probs: Tensor::from_vec(lp, (n, k), dev)?,
    })
}

/// Per-row divergence between the top-k teacher, coarsened to k + 1 categories (module
/// header), and `q = softmax(student / T)` coarsened the same way: student (N, V) -> (N,)
/// f32. Backward gives the student its gradient and the teacher none. Not multiplied by
/// `T^2`, like `fused::divergence_rows`.
pub fn top_k_divergence_rows(student: &Tensor, teacher: &TopK, d: Divergence, temperature: f64) -> Result<Tensor> {
    d.validate()?;
    check_temperature(temperature)?;
    check_top_k_shapes(student, teacher)?;
    check_kernel_device(student, "top_k_divergence_rows")?;
    let student = float_input(student, "student logits")?; // (N, V)
    let indices = teacher.indices.to_dtype(DType::U32)?.contiguous()?; // (N, k)
    let log_probs = teacher.log_probs.to_dtype(DType::F32)?.detach().contiguous()?; // (N, k)
    let op = TopKRows {
        divergence: d.canonical(),
        temperature,
    };
    Ok(student.apply_op3(&indices, &log_probs, op)?) // (N,)
}

/// `check_top_k_shapes` for student logits of (rows, v).
pub(crate) fn check_top_k_dims(rows: usize, v: usize, teacher: &TopK) -> Result<()> {
    check_dims(&[rows, v], teacher)
}

pub(crate) fn check_top_k_shapes(student: &Tensor, teacher: &TopK) -> Result<()> {
    check_dims(student.dims(), teacher)
}

fn check_dims(s: &[usize], teacher: &TopK) -> Result<()> {
    let (i, l) = (teacher.indices.dims(), teacher.log_probs.dims());
    let ok = s.len() == 2 && i.len() == 2 && i == l && i[0] == s[0] && i[1] >= 1 && i[1] <= s[1];
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "top-k teacher: student logits {s:?} (rows, vocabulary) need indices and log-probs both shaped \
             (rows, k) with 1 <= k <= vocabulary, got indices {i:?} and log-probs {l:?}"
        )))
    }
}

// ---------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------

/// (student (N, V), indices (N, k) u32, log_probs (N, k) f32) -> per-row divergence (N,).
struct TopKRows {
    divergence: Divergence,
    temperature: f64,
}

/// Same inputs -> d(sum_r grad_rows[r] * loss_r) / d student (N, V) in the student's
/// dtype. Candle's `CustomOp3` has three inputs, so the incoming gradient rides in the op.
struct TopKRowsGrad {
    divergence: Divergence,
    temperature: f64,
    grad_rows: Vec<f32>,
}

impl CustomOp3 for TopKRows {
    fn name(&self) -> &'static str {
        "distill-top-k-divergence-rows"
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
        let (rows, v) = rows_and_vocab(l1);
        let (idx, lp) = (u32_slice(s2, l2, self.name())?, f32_slice(s3, l3, self.name())?);
        let k = Kernel::new(self.divergence, self.temperature);
        let (_, kk) = rows_and_vocab(l2);
        check_rows(
            self.name(),
            "the top-k teacher",
            idx.len().min(lp.len()),
            rows.elem_count() * kk,
        )?;
        let out = with_float_slice!(self.name(), s1, l1, |s| top_k_forward(&k, s, idx, lp, v, kk)?);
        Ok((CpuStorage::F32(out), rows))
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            super::cuda::top_k_rows_fwd(self.name(), self.divergence, self.temperature, s1, l1, s2, l2, s3, l3)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s1, l1, s2, l2, s3, l3);
            Err(super::ops::no_kernel(self.name(), "CUDA"))
        }
    }

    fn bwd(
        &self,
        student: &Tensor,
        indices: &Tensor,
        log_probs: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !student.track_op() {
            return Ok((None, None, None));
        }
        let op = TopKRowsGrad {
            divergence: self.divergence,
            temperature: self.temperature,
            grad_rows: grad_res.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        };
        let grad = student.apply_op3_no_bwd(indices, log_probs, &op)?; // (N, V)
        Ok((Some(grad), None, None))
    }
}

impl CustomOp3 for TopKRowsGrad {
    fn name(&self) -> &'static str {
        "distill-top-k-divergence-rows-grad"
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
        let (rows, v) = rows_and_vocab(l1);
        if self.grad_rows.len() != rows.elem_count() {
            return Err(candle_core::Error::Msg(format!(
                "{}: {} incoming gradients for {} rows",
                self.name(),
                self.grad_rows.len(),
                rows.elem_count()
            ))
            .bt());
        }
        let (idx, lp) = (u32_slice(s2, l2, self.name())?, f32_slice(s3, l3, self.name())?);
        let (_, kk) = rows_and_vocab(l2);
        check_rows(
            self.name(),
            "the top-k teacher",
            idx.len().min(lp.len()),
            rows.elem_count() * kk,
        )?;
        let k = Kernel::new(self.divergence, self.temperature);
        let out = with_float_slice!(self.name(), s1, l1, |s| {
            WithDType::to_cpu_storage_owned(top_k_backward(&k, s, idx, lp, &self.grad_rows, v, kk)?)
        });
        Ok((out, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            let (name, d, t) = (self.name(), self.divergence, self.temperature);
            super::cuda::top_k_rows_bwd(name, d, t, &self.grad_rows, s1, l1, s2, l2, s3, l3)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s1, l1, s2, l2, s3, l3);
            Err(super::ops::no_kernel(self.name(), "CUDA"))
        }
    }
}

// ---------------------------------------------------------------------------
// Row kernels
// ---------------------------------------------------------------------------

/// One row coarsened to k + 1 categories: the student's and teacher's log-probabilities
/// of the listed tokens, then of the tail (last entry; -inf for an empty tail).
struct Coarse {
    lq: Vec<f32>,
    lp: Vec<f32>,
    /// The student's normaliser of the whole row, at 1/T.
    norm: LogNorm,
}

fn bad_row(row: usize, msg: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("top-k teacher, row {row}: {msg}")).bt()
}

/// Checks a row's teacher side against a vocabulary of `v`: ids inside it and distinct,
/// log-probabilities <= 0 (up to rounding) and not NaN, their probabilities summing to at
/// most 1 (up to rounding). Returns the ids sorted and the listed mass (summed in f64 in
/// the listed order). The CUDA kernels make the same checks and call this on a row they
/// flag, for the message.
pub(super) fn check_teacher_row(
    row: usize,
    v: usize,
    idx: &[u32],
    lp: &[f32],
) -> candle_core::Result<(Vec<usize>, f64)> {
    let mut sorted: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
    sorted.sort_unstable();
    if let Some(&last) = sorted.last() {
        if last >= v {
            return Err(bad_row(
                row,
                format!("token id {last} is outside the vocabulary of {v}"),
            ));
        }
    }
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(bad_row(row, format!("token id {} is listed twice", w[0])));
    }
    let mut mass = 0f64;
    for &l in lp {
        if l.is_nan() || l > 1e-4 {
            return Err(bad_row(row, format!("log-probability {l} is not <= 0")));
        }
        mass += (l as f64).exp();
    }
    if mass > 1.0 + 1e-3 {
        return Err(bad_row(
            row,
            format!("the top-k probabilities sum to {mass}, more than 1; were they written at another temperature?"),
        ));
    }
    Ok((sorted, mass))
}

/// Builds a row's k + 1 categories, after `check_teacher_row`.
fn coarsen<S: WithDType>(row: usize, s: &[S], idx: &[u32], lp: &[f32], inv_t: f32) -> candle_core::Result<Coarse> {
    let v = s.len();
    let (sorted, mass) = check_teacher_row(row, v, idx, lp)?;
    // One pass over the row for both normalisers: the whole row's, and the tail's, a
    // log-sum-exp over the unlisted tokens only (segment by segment between the listed
    // ids) with its own max, so that it stays finite (not -inf) when the tail is far
    // below the row's max, as the reference's log-sum-exp does.
    let (mut all, mut tail) = (OnlineLse::new(), OnlineLse::new());
    let mut buf = [0f32; BLOCK];
    let mut from = 0;
    for &i in sorted.iter().chain(std::iter::once(&v)) {
        for block in s[from.min(i)..i].chunks(BLOCK) {
            let buf = &mut buf[..block.len()];
            buf.iter_mut().zip(block).for_each(|(b, &x)| *b = ld(x) * inv_t);
            all.push_block(buf);
            tail.push_block(buf);
        }
        from = i + 1;
    }
    let listed: Vec<f32> = sorted.iter().map(|&i| ld(s[i]) * inv_t).collect();
    for block in listed.chunks(BLOCK) {
        all.push_block(block);
    }
    let norm = all.finish();
    let lq_tail = if tail.max == f32::NEG_INFINITY {
        f32::NEG_INFINITY // no unlisted token (k = V), or all of them at -inf
    } else {
        (tail.max - norm.max) + tail.sum.ln() - norm.log_sum
    };
    // With every token listed the tail is empty by definition; 1 - mass would be
    // rounding noise there, and a noise mass against the student's empty tail is infinite.
    let rest = if idx.len() == v { 0.0 } else { 1.0 - mass };
    let lp_tail = if rest > 0.0 {
        rest.ln() as f32
    } else {
        f32::NEG_INFINITY
    };
    let mut lq: Vec<f32> = idx.iter().map(|&i| norm.log_prob(ld(s[i as usize]) * inv_t)).collect();
    lq.push(lq_tail);
    let mut lpv = lp.to_vec();
    lpv.push(lp_tail);
    Ok(Coarse { lq, lp: lpv, norm })
}

/// The same divergence on the categories: they are normalised log-probabilities, so the
/// full kernel's row functions apply to them with T = 1.
fn category_kernel(k: &Kernel) -> Kernel {
    Kernel::new(k.divergence, 1.0)
}

fn top_k_forward<S: WithDType>(
    k: &Kernel,
    s: &[S],
    idx: &[u32],
    lp: &[f32],
    v: usize,
    kk: usize,
) -> candle_core::Result<Vec<f32>> {
    let ck = category_kernel(k);
    s.par_chunks(v)
        .zip(idx.par_chunks(kk).zip(lp.par_chunks(kk)))
        .enumerate()
        .with_min_len(min_rows(v))
        .map(|(row, (s, (idx, lp)))| {
            let c = coarsen(row, s, idx, lp, k.inv_t)?;
            Ok(forward_row(&ck, &c.lq, &c.lp))
        })
        .collect()
}

fn top_k_backward<S: WithDType>(
    k: &Kernel,
    s: &[S],
    idx: &[u32],
    lp: &[f32],
    grad_rows: &[f32],
    v: usize,
    kk: usize,
) -> candle_core::Result<Vec<S>> {
    let ck = category_kernel(k);
    let mut out = vec![S::from_f64(0.0); s.len()];
    out.par_chunks_mut(v)
        .zip(s.par_chunks(v))
        .zip(idx.par_chunks(kk).zip(lp.par_chunks(kk)))
        .zip(grad_rows.par_iter())
        .enumerate()
        .with_min_len(min_rows(v))
        .try_for_each(|(row, (((out, s), (idx, lp)), &g))| {
            if g == 0.0 {
                return Ok::<(), candle_core::Error>(()); // a masked row keeps its zeros, as in the full kernel
            }
            let c = coarsen(row, s, idx, lp, k.inv_t)?;
            write_row_grad(k, &ck, s, idx, &c, g, out, false);
            Ok(())
        })?;
    Ok(out)
}

/// One row for the one-pass loss (`fused::loss_and_grad_slices`): the row's divergence,
/// and, when `g` is nonzero, `g` times its gradient written into `out` (added to what
/// `out` holds with `accumulate`, as after a cross-entropy term).
#[allow(clippy::too_many_arguments)]
pub(super) fn loss_grad_row(
    k: &Kernel,
    row: usize,
    s: &[f32],
    idx: &[u32],
    lp: &[f32],
    g: f32,
    out: &mut [f32],
    accumulate: bool,
) -> candle_core::Result<f32> {
    let ck = category_kernel(k);
    let c = coarsen(row, s, idx, lp, k.inv_t)?;
    let loss = forward_row(&ck, &c.lq, &c.lp);
    if g != 0.0 {
        write_row_grad(k, &ck, s, idx, &c, g, out, accumulate);
    }
    Ok(loss)
}

/// `g` times the row's gradient for the student's logits, from its categories: the
/// category's gradient for a listed token, `(q_i / q_tail)` times the tail's for the
/// others (module header), both times 1/T. Written into `out`, or added to it.
#[allow(clippy::too_many_arguments)]
fn write_row_grad<S: WithDType>(
    k: &Kernel,
    ck: &Kernel,
    s: &[S],
    idx: &[u32],
    c: &Coarse,
    g: f32,
    out: &mut [S],
    accumulate: bool,
) {
    // D: the gradient of g * loss with respect to the category log-probabilities.
    let mut d = vec![0f32; c.lq.len()];
    backward_row(ck, &c.lq, &c.lp, g, &mut d);
    let scale = k.inv_t; // the chain rule through s = student / T
    let base = |o: S| if accumulate { ld(o) } else { 0.0 };
    // The listed tokens take their category's gradient, not the tail's: keep what they held.
    let listed: Vec<f32> = idx.iter().map(|&i| base(out[i as usize])).collect();
    let lq_tail = c.lq[c.lq.len() - 1];
    let d_tail = d[d.len() - 1];
    if lq_tail > f32::NEG_INFINITY && d_tail != 0.0 {
        for (o, &x) in out.iter_mut().zip(s) {
            let w = exp_f32(c.norm.log_prob(ld(x) * k.inv_t) - lq_tail); // q_i / q_tail
            *o = S::from_f64((base(*o) + scale * w * d_tail) as f64);
        }
    }
    for ((&i, &di), &b) in idx.iter().zip(&d).zip(&listed) {
        out[i as usize] = S::from_f64((b + scale * di) as f64);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::loss::family::{divergence_rows_reference, top_k_divergence_rows_reference};
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const ALL: [Divergence; 9] = [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.5 },
        Divergence::Jsd { beta: 0.0 },
        Divergence::Jsd { beta: 1.0 },
        Divergence::SkewForwardKl { skew: 0.1 },
        Divergence::SkewReverseKl { skew: 0.1 },
        Divergence::SkewReverseKl { skew: 0.0 },
        Divergence::Tvd,
    ];

    /// Seeded logits in [-4, 4); every fifth row also gets entries of +-`big`. The
    /// teacher's stay at +-20: with +1e4 its tail mass is exactly 0, and the reverse-type
    /// divergences of a student with any tail mass are then infinite by definition.
    fn logits_up_to(rng: &mut ChaCha8Rng, n: usize, v: usize, big: f32) -> Vec<f32> {
        let mut x: Vec<f32> = (0..n * v).map(|_| rng.random_range(-4.0f32..4.0)).collect();
        for row in (0..n).step_by(5) {
            for _ in 0..2 {
                let j = rng.random_range(0..v);
                x[row * v + j] = if rng.random::<bool>() { big } else { -big };
            }
        }
        x
    }

    fn logits(rng: &mut ChaCha8Rng, n: usize, v: usize) -> Vec<f32> {
        logits_up_to(rng, n, v, 1e4)
    }

    fn teacher_logits(rng: &mut ChaCha8Rng, n: usize, v: usize) -> Vec<f32> {
        logits_up_to(rng, n, v, 20.0)
    }

    type Rows<'a> = dyn Fn(&Tensor) -> Result<Tensor> + 'a;

    fn rows_and_grad(f: &Rows<'_>, s: &[f32], w: &[f32], (n, v): (usize, usize)) -> Result<(Vec<f32>, Vec<f32>)> {
        let sv = Var::from_slice(s, (n, v), &Device::Cpu)?;
        let rows = f(sv.as_tensor())?;
        let w = Tensor::from_slice(w, n, &Device::Cpu)?;
        let g = (&rows * w)?.sum_all()?.backward()?;
        let grad = g.get(sv.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
        Ok((rows.to_vec1::<f32>()?, grad))
    }

    /// |got - want| <= rtol * (|want| + the row's largest |want|, or `floor[r]`): the
    /// tolerance of `loss::full`'s tests, which explains the floor.
    fn assert_close(what: &str, got: &[f32], want: &[f32], v: usize, floor: &[f32], rtol: f32) {
        for (r, (g, w)) in got.chunks(v).zip(want.chunks(v)).enumerate() {
            let scale = w
                .iter()
                .fold(floor.get(r).copied().unwrap_or(0.0), |m, x| m.max(x.abs()));
            for (j, (a, b)) in g.iter().zip(w).enumerate() {
                let tol = rtol * (b.abs() + scale);
                assert!(
                    (a - b).abs() <= tol && a.is_finite() == b.is_finite(),
                    "{what}: row {r} col {j}: got {a}, want {b}"
                );
            }
        }
    }

    #[test]
    fn fused_top_k_matches_reference_in_values_and_gradients() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (n, v) = (12, 37);
        let s = logits(&mut rng, n, v);
        let t = teacher_logits(&mut rng, n, v);
        let w: Vec<f32> = (0..n)
            .map(|i| if i % 4 == 3 { 0.0 } else { 1.0 + i as f32 / 10.0 })
            .collect();
        let tt = Tensor::from_slice(&t, (n, v), &Device::Cpu)?;
        for k in [1, 5, v] {
            for temp in [1.0, 2.0] {
                let top = top_k_of_logits(&tt, k, temp)?;
                for d in ALL {
                    let fused = |x: &Tensor| top_k_divergence_rows(x, &top, d, temp);
                    let refr = |x: &Tensor| top_k_divergence_rows_reference(x, &top.indices, &top.log_probs, d, temp);
                    let (fr, fg) = rows_and_grad(&fused, &s, &w, (n, v))?;
                    let (rr, rg) = rows_and_grad(&refr, &s, &w, (n, v))?;
                    let what = format!("{d} k={k} T={temp}");
                    // Reverse-type gradients are differences of numbers the size of the
                    // row's loss (see fused.rs's tests): that is the floor of their scale.
                    let floor: Vec<f32> = rr.iter().zip(&w).map(|(l, w)| (l * w).abs()).collect();
                    // A row's loss sums k + 1 terms of order 0.1 to 1 that nearly cancel
                    // for small k: f32 rounds each at about 1e-8, hence the floor of 0.01.
                    assert_close(&format!("{what} rows"), &fr, &rr, 1, &[0.01; 12], 1e-5);
                    assert_close(&format!("{what} grads"), &fg, &rg, v, &floor, 1e-5);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn top_k_equal_to_the_vocabulary_is_the_full_divergence() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, v) = (6, 19);
        let s = Tensor::from_vec(logits(&mut rng, n, v), (n, v), &Device::Cpu)?;
        let t = Tensor::from_vec(teacher_logits(&mut rng, n, v), (n, v), &Device::Cpu)?;
        for d in ALL {
            let top = top_k_of_logits(&t, v, 2.0)?;
            let got = top_k_divergence_rows(&s, &top, d, 2.0)?.to_vec1::<f32>()?;
            let want = divergence_rows_reference(&s, &t, d, 2.0)?.to_vec1::<f32>()?;
            assert_close(&format!("{d}"), &got, &want, 1, &[1e-6; 6], 1e-4);
        }
        Ok(())
    }

    #[test]
    fn top_k_forward_kl_is_a_lower_bound_of_the_full_one() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (n, v) = (16, 50);
        let s = Tensor::from_vec(logits(&mut rng, n, v), (n, v), &Device::Cpu)?;
        let t = Tensor::from_vec(teacher_logits(&mut rng, n, v), (n, v), &Device::Cpu)?;
        let full = divergence_rows_reference(&s, &t, Divergence::ForwardKl, 1.0)?.to_vec1::<f32>()?;
        let mut previous = vec![0f32; n];
        for k in [1, 3, 10, 30, 50] {
            let top = top_k_of_logits(&t, k, 1.0)?;
            let got = top_k_divergence_rows(&s, &top, Divergence::ForwardKl, 1.0)?.to_vec1::<f32>()?;
            for r in 0..n {
                let slack = 1e-5 * full[r].abs().max(1.0);
                assert!(
                    got[r] <= full[r] + slack,
                    "k={k} row {r}: {} > full {}",
                    got[r],
                    full[r]
                );
                // Splitting a category never lowers a KL (the data-processing inequality).
                assert!(
                    got[r] + slack >= previous[r],
                    "k={k} row {r}: {} < {}",
                    got[r],
                    previous[r]
                );
            }
            previous = got;
        }
        Ok(())
    }

    #[test]
    fn top_k_gradient_matches_finite_differences() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, v, k, temp) = (2, 7, 3, 1.5);
        let s: Vec<f32> = (0..n * v).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let t = Tensor::from_vec(
            (0..n * v).map(|_| rng.random_range(-2.0f32..2.0)).collect::<Vec<f32>>(),
            (n, v),
            &Device::Cpu,
        )?;
        let top = top_k_of_logits(&t, k, temp)?;
        for d in ALL {
            let f = |x: &Tensor| top_k_divergence_rows(x, &top, d, temp);
            let (_, grad) = rows_and_grad(&f, &s, &[1.0, 1.0], (n, v))?;
            let total = |x: &[f32]| -> Result<f64> {
                let rows = f(&Tensor::from_slice(x, (n, v), &Device::Cpu)?)?;
                Ok(rows.sum_all()?.to_scalar::<f32>()? as f64)
            };
            for j in 0..n * v {
                let h = 1e-2f32;
                let (mut up, mut down) = (s.clone(), s.clone());
                up[j] += h;
                down[j] -= h;
                let fd = (total(&up)? - total(&down)?) / (2.0 * h as f64);
                assert!(
                    (fd - grad[j] as f64).abs() <= 2e-3 * (1.0 + fd.abs()),
                    "{d} element {j}: finite difference {fd}, analytic {}",
                    grad[j]
                );
            }
        }
        Ok(())
    }

    #[test]
    fn bad_teacher_rows_are_errors_not_panics() -> Result<()> {
        let s = Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?;
        let case = |idx: Vec<u32>, lp: Vec<f32>| -> String {
            let top = TopK {
                indices: Tensor::from_vec(idx, (2, 2), &Device::Cpu).unwrap(),
                log_probs: Tensor::from_vec(lp, (2, 2), &Device::Cpu).unwrap(),
            };
            match top_k_divergence_rows(&s, &top, Divergence::ForwardKl, 1.0) {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            }
        };
        assert!(case(vec![0, 1, 2, 9], vec![-1.0; 4]).contains("outside the vocabulary"));
        assert!(case(vec![0, 1, 2, 2], vec![-1.0; 4]).contains("listed twice"));
        assert!(case(vec![0, 1, 2, 3], vec![-1.0, f32::NAN, -1.0, -1.0]).contains("not <= 0"));
        assert!(case(vec![0, 1, 2, 3], vec![-0.1, -0.1, -1.0, -1.0]).contains("more than 1"));
        assert!(case(vec![0, 1, 2, 3], vec![-1.0; 4]).is_empty());
        let wrong = TopK {
            indices: Tensor::zeros((3, 2), DType::U32, &Device::Cpu)?,
            log_probs: Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?,
        };
        assert!(top_k_divergence_rows(&s, &wrong, Divergence::ForwardKl, 1.0).is_err());
        Ok(())
    }

    /// The CUDA kernels against the CPU ones, values and gradients, for every divergence,
    /// k = 1, 64 and V (V = 2001, under the kernels' 2048), a bad teacher row, and a k
    /// above 2048 refused. Compiled in every `cuda` build; skipped, with a message, where
    /// no GPU is present.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_top_k_kernels_match_the_cpu_kernels() -> Result<()> {
        let gpu = match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped cuda_top_k_kernels_match_the_cpu_kernels: no CUDA device ({e})");
                return Ok(());
            }
        };
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let (n, v) = (12, 2001);
        let s = logits(&mut rng, n, v);
        let t = Tensor::from_vec(teacher_logits(&mut rng, n, v), (n, v), &Device::Cpu)?;
        let w: Vec<f32> = (0..n).map(|i| if i % 4 == 3 { 0.0 } else { 1.0 }).collect();
        for k in [1, 64, v] {
            let top = top_k_of_logits(&t, k, 2.0)?;
            for d in ALL {
                let on = |dev: &Device| -> Result<(Vec<f32>, Vec<f32>)> {
                    let top = TopK {
                        indices: top.indices.to_device(dev)?,
                        log_probs: top.log_probs.to_device(dev)?,
                    };
                    let sv = Var::from_slice(&s, (n, v), dev)?;
                    let rows = top_k_divergence_rows(sv.as_tensor(), &top, d, 2.0)?;
                    let g = (&rows * Tensor::from_slice(&w, n, dev)?)?.sum_all()?.backward()?;
                    let grad = g.get(sv.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
                    Ok((rows.to_vec1::<f32>()?, grad))
                };
                let (cr, cg) = on(&Device::Cpu)?;
                let (gr, gg) = on(&gpu)?;
                let floor: Vec<f32> = cr.iter().zip(&w).map(|(l, w)| (l * w).abs()).collect();
                assert_close(&format!("{d} k={k} rows"), &gr, &cr, 1, &[0.01; 12], 1e-4);
                assert_close(&format!("{d} k={k} grads"), &gg, &cg, v, &floor, 1e-4);
            }
        }
        let bad = TopK {
            indices: Tensor::new(&[[0u32, 7], [1, 1]], &gpu)?,
            log_probs: Tensor::new(&[[-1f32, -1.0], [-1.0, -1.0]], &gpu)?,
        };
        let s = Tensor::zeros((2, 9), DType::F32, &gpu)?;
        let e = top_k_divergence_rows(&s, &bad, Divergence::ForwardKl, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 1: token id 1 is listed twice"), "{e}");
        let wide = Tensor::randn(0f32, 1.0, (2, 2100), &gpu)?;
        let top = top_k_of_logits(&wide, 2049, 1.0)?;
        let e = top_k_divergence_rows(&wide, &top, Divergence::ForwardKl, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 2048"), "{e}");
        Ok(())
    }
}
