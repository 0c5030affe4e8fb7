//! The distillation losses as fused CPU kernels with an analytic backward.
//!
//! `divergence_rows` computes, for each row of (N, V) logits, one member of the
//! divergence family (`loss::family`) between `p = softmax(teacher / T)` and
//! `q = softmax(student / T)` in a single candle `CustomOp2`; `cross_entropy_rows`
//! does the same for the hard-label term. Each op's `bwd` produces the whole (N, V)
//! student gradient in one more fused op, instead of the dozen (N, V)-sized
//! temporaries that autograd keeps for the plain composition in `loss::reference`
//! (DESIGN.md measured 4.2 s and +4.7 GB for that composition at N 2048, V 32768).
//! The teacher never gets a gradient: `bwd` returns `None` for it, so `GradStore`
//! does not even allocate one.
//!
//! Kernel layout: rows run in parallel on rayon (`par_chunks` of V), each row on one
//! thread. A row first streams once through both sides to get their log-sum-exp
//! (a running max and a rescaled sum, updated per block of 512), then makes one more
//! pass for the loss, or one to three for the gradient. The loops are written to be
//! vectorised (see "Row kernels" below) and run in an AVX2 build of themselves when the
//! CPU has it. Inputs may be f32, f16, bf16 or f64 (teacher and student independently);
//! every element is converted to f32 on load and all arithmetic and accumulation is f32.
//! The loss comes out as f32; the gradient in the student's dtype, which is what
//! `GradStore` adds it to.
//!
//! Cost, N 2048 x V 32768 f32, T 2, forward KL, release build on the 2-core dev machine
//! (shared with a training run, so absolute times are high; the runs were interleaved):
//! `distill_loss_fused` forward + backward 1.2-1.3 s against 9.8-9.9 s for
//! `reference::distill_loss`; `divergence_rows` alone 0.19 s forward, 0.7 s with the
//! backward. What remains beyond the kernels is mostly candle's `GradStore` (zeros +
//! add of an (N, V) gradient per op) and page faults on fresh (N, V) buffers.
//!
//! Gradient formulas (s = student / T, p = teacher probabilities, q = student
//! probabilities, L = the row's divergence). For any L(q), the softmax Jacobian
//! `dq_j/ds_i = q_j (delta_ij - q_i)` gives
//!
//! ```text
//! dL/ds_i = q_i (g_i - sum_j q_j g_j),   g_j = dL/dq_j,
//! ```
//!
//! and dL/d(student)_i = (1/T) dL/ds_i, times the incoming gradient of the row:
//!
//! ```text
//! forward KL   L = sum p (log p - log q)
//!              dL/ds_i = q_i - p_i
//! reverse KL   L = sum q (log q - log p)
//!              dL/ds_i = q_i (log q_i - log p_i - L)
//! JSD(beta)    m = beta p + (1-beta) q,  L = beta KL(p||m) + (1-beta) KL(q||m)
//!                = beta sum p log p + (1-beta) sum q log q - sum m log m
//!              g_j = (1-beta) (log q_j - log m_j)
//!              dL/ds_i = (1-beta) q_i (log q_i - log m_i - K),   K = KL(q||m)
//! skew fwd KL  m = a p + (1-a) q,  L = KL(p||m)
//!              g_j = -(1-a) p_j / m_j;  with r_j = (1-a) q_j / m_j in [0, 1] (m_j >= (1-a) q_j):
//!              dL/ds_i = q_i R - p_i r_i,   R = sum_j p_j r_j
//!              (a = 0: r = R = 1, the forward-KL gradient)
//! skew rev KL  m = a q + (1-a) p,  L = KL(q||m)
//!              g_j = log q_j + 1 - log m_j - a q_j / m_j;  with u_j = a q_j / m_j in [0, 1]:
//!              dL/ds_i = q_i ((log q_i - log m_i - L) - (u_i - U)),   U = sum_j q_j u_j
//!              (a = 0: u = U = 0, the reverse-KL gradient)
//! TVD          L = 0.5 sum |p - q|
//!              g_j = 0.5 sign(q_j - p_j), sign(0) = 0
//!              dL/ds_i = q_i (g_i - G),   G = sum_j q_j g_j
//! CE (label y, no temperature)  L = lse(s) - s_y
//!              dL/ds_i = q_i - [i == y]
//! ```
//!
//! Ratios such as p/m and q/m are evaluated as `exp(log p - log m)` from log-probabilities,
//! so they stay finite where probabilities underflow. Terms whose weight is exactly 0
//! contribute 0 (the `0 log 0` convention of `loss::family`).
//!
//! The CUDA kernels of the same ops (`kernels/divergence.cu`, launched by `loss::cuda`)
//! mirror these formulas term by term; the top-k op (`loss::topk`) is CPU only.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, MetalStorage, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda;
use super::family::{check_inputs, Divergence};
use super::reference::LossParts;
use crate::error::{Error, Result};

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

/// Per-row divergence between `p = softmax(teacher / T)` and `q = softmax(student / T)`,
/// as one fused op: student (N, V), teacher (N, V) -> (N,) f32. Same values as
/// `family::divergence_rows_reference`; leading dimensions are allowed, (..., V) -> (...).
///
/// Backward gives the student its analytic gradient (with the 1/T of s/T) and the
/// teacher none. Not multiplied by `T^2`: see `loss::family`. CPU only for now.
pub fn divergence_rows(student: &Tensor, teacher: &Tensor, d: Divergence, temperature: f64) -> Result<Tensor> {
    check_inputs(student, teacher, d, temperature)?;
    check_kernel_device(student, "divergence_rows")?;
    let student = float_input(student, "student logits")?; // (N, V)
    let teacher = float_input(teacher, "teacher logits")?; // (N, V)
    let op = DivergenceRows {
        divergence: d.canonical(),
        temperature,
    };
    Ok(student.apply_op2(&teacher, op)?) // (N,)
}

/// Per-row cross-entropy `-log softmax(student)[target]` as one fused op:
/// student (N, V), targets (N,) integer -> (N,) f32. No temperature. Backward gives the
/// student `softmax - onehot` and the targets nothing. Targets must be < V on every row,
/// masked or not (as for `gather` in `loss::reference`).
pub fn cross_entropy_rows(student: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_kernel_device(student, "cross_entropy_rows")?;
    let dims = student.dims();
    if dims.is_empty() || dims[dims.len() - 1] == 0 || targets.dims() != &dims[..dims.len() - 1] {
        return Err(Error::Invalid(format!(
            "cross-entropy: logits {dims:?} need a non-empty last (vocabulary) dimension and targets \
             shaped like the logits without it, got targets {:?}",
            targets.dims()
        )));
    }
    let student = float_input(student, "student logits")?; // (N, V)
    let targets = targets.to_dtype(DType::U32)?.contiguous()?; // (N,)
    Ok(student.apply_op2(&targets, CrossEntropyRows)?) // (N,)
}

/// The teacher side of the distillation loss.
#[derive(Clone, Copy, Debug)]
pub enum TeacherTargets<'a> {
    /// Full logits (N, V), tempered inside the loss.
    Logits(&'a Tensor),
    /// The top k tokens per row with their tempered log-probabilities (`loss::topk`).
    TopK(&'a super::topk::TopK),
}

/// The distillation loss with fused kernels; same arguments, semantics and result as
/// `reference::distill_loss` (for `Divergence::ForwardKl` the two agree to f32 rounding,
/// tested), plus the divergence of the soft term:
///
/// total = alpha * CE + (1 - alpha) * T^2 * sum(mask * divergence_rows) / denom,
/// CE = sum(mask * ce_rows) / denom, with `denom` floored at 1 so that an all-masked
/// step gives 0, not NaN. student (N, V), teacher (N, V) or None, targets (N,) u32,
/// mask (N,) f32. `LossParts::kd` is the T^2-scaled soft term of the chosen divergence.
#[allow(clippy::too_many_arguments)] // mirrors reference::distill_loss so the two swap in place
pub fn distill_loss_fused(
    student: &Tensor,
    teacher: Option<&Tensor>,
    targets: &Tensor,
    mask: &Tensor,
    alpha: f64,
    temperature: f64,
    denom: f64,
    divergence: Divergence,
) -> Result<LossParts> {
    let teacher = teacher.map(TeacherTargets::Logits);
    distill_loss_with(student, teacher, targets, mask, alpha, temperature, denom, divergence)
}

/// `distill_loss_fused` for either form of teacher: full logits or top-k
/// (`loss::topk`; its log-probabilities must have been taken at `temperature`).
#[allow(clippy::too_many_arguments)]
pub fn distill_loss_with(
    student: &Tensor,
    teacher: Option<TeacherTargets>,
    targets: &Tensor,
    mask: &Tensor,
    alpha: f64,
    temperature: f64,
    denom: f64,
    divergence: Divergence,
) -> Result<LossParts> {
    let denom = denom.max(1.0); // an all-masked step gives 0, not NaN
    let mask = mask.to_dtype(DType::F32)?; // (N,)
    let ce_rows = cross_entropy_rows(student, targets)?; // (N,)
    let ce = ((ce_rows * &mask)?.sum_all()? / denom)?; // scalar
    let Some(teacher) = teacher else {
        return Ok(LossParts {
            ce: ce.to_scalar::<f32>()?,
            kd: 0.0,
            total: ce,
        });
    };
    let t = temperature;
    let rows = match teacher {
        TeacherTargets::Logits(logits) => divergence_rows(student, logits, divergence, t)?, // (N,)
        TeacherTargets::TopK(top) => super::topk::top_k_divergence_rows(student, top, divergence, t)?, // (N,)
    };
    let kd = ((rows * &mask)?.sum_all()? * (t * t / denom))?; // scalar
    let total = ((&ce * alpha)? + (&kd * (1.0 - alpha))?)?;
    Ok(LossParts {
        ce: ce.to_scalar::<f32>()?,
        kd: kd.to_scalar::<f32>()?,
        total,
    })
}

/// The values of a loss computed without an autograd graph.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossValues {
    pub total: f32,
    pub ce: f32,
    pub kd: f32,
}

/// `distill_loss_with`'s value together with its gradient for the student logits, in
/// one pass per row and with no autograd graph, for a full-logit teacher, a top-k teacher
/// (`loss::topk`) or none.
///
/// Each row's forward and backward run back to back while the row is in cache, and
/// the gradient is written once, into one (N, V) buffer: candle's backward instead
/// reads every row again and allocates a zero-filled (N, V) tensor to add the op's
/// gradient into. The upstream gradient of each row is known in advance (the loss
/// is a masked mean: mask / denom times the CE or T^2 KD weight), so nothing waits
/// for a backward call. Same formulas and kernels as the ops, so the same values and
/// gradients to rounding (tested). f32 on the CPU; student (N, V), teacher (N, V) or
/// top-k (N, k), targets (N,) u32, mask (N,) f32. Without targets there is no CE term
/// (the loss is `(1 - alpha) * T^2 * KD`, `ce` is 0): a pure distillation loss.
#[allow(clippy::too_many_arguments)]
pub fn distill_loss_and_grad(
    student: &Tensor,
    teacher: Option<TeacherTargets<'_>>,
    targets: Option<&Tensor>,
    mask: &Tensor,
    alpha: f64,
    temperature: f64,
    denom: f64,
    divergence: Divergence,
) -> Result<(LossValues, Tensor)> {
    check_cpu(student, "distill_loss_and_grad")?;
    let (n, v) = student.dims2()?;
    match teacher {
        Some(TeacherTargets::Logits(t)) => {
            check_inputs(student, t, divergence, temperature)?;
            if t.dtype() != DType::F32 {
                return Err(Error::Invalid(
                    "distill_loss_and_grad takes f32 logits; use distill_loss_with for other dtypes".into(),
                ));
            }
        }
        Some(TeacherTargets::TopK(top)) => {
            divergence.validate()?;
            super::family::check_temperature(temperature)?;
            super::topk::check_top_k_shapes(student, top)?;
        }
        None => {}
    }
    if student.dtype() != DType::F32 {
        return Err(Error::Invalid(
            "distill_loss_and_grad takes f32 logits; use distill_loss_with for other dtypes".into(),
        ));
    }
    if targets.is_some_and(|t| t.dims() != [n]) || mask.dims() != [n] {
        return Err(Error::Invalid(format!(
            "distill_loss_and_grad: logits ({n}, {v}) need targets and mask of ({n},), got {:?} and {:?}",
            targets.map(|t| t.dims()),
            mask.dims()
        )));
    }
    if targets.is_none() && teacher.is_none() {
        return Err(Error::Invalid(
            "distill_loss_and_grad: with neither targets nor a teacher there is no loss".into(),
        ));
    }
    let targets: Option<Vec<u32>> = targets.map(|t| t.to_dtype(DType::U32)?.to_vec1()).transpose()?;
    let targets = targets.as_deref();
    let mask: Vec<f32> = mask.to_dtype(DType::F32)?.to_vec1()?;
    let student = student.contiguous()?;
    let op = "distill_loss_and_grad";
    let run = |s: &[f32], t: Option<SliceTeacher<'_>>| {
        loss_and_grad_slices(0, s, t, targets, &mask, v, alpha, temperature, denom, divergence)
    };
    let (values, grad) = crate::kernels::ops::with_cpu_f32(&student, op, |s| match teacher {
        None => run(s, None),
        Some(TeacherTargets::Logits(t)) => {
            crate::kernels::ops::with_cpu_f32(&t.contiguous()?, op, |t| run(s, Some(SliceTeacher::Logits(t))))?
        }
        Some(TeacherTargets::TopK(top)) => {
            let (indices, log_probs) = top.to_host()?;
            let k = top.k();
            run(
                s,
                Some(SliceTeacher::TopK {
                    indices: &indices,
                    log_probs: &log_probs,
                    k,
                }),
            )
        }
    })??;
    Ok((values, Tensor::from_vec(grad, (n, v), student.device())?))
}

/// The teacher of `loss_and_grad_slices`, as row-major slices.
#[derive(Clone, Copy)]
pub(crate) enum SliceTeacher<'a> {
    /// Full logits (N, V).
    Logits(&'a [f32]),
    /// The top k ids per row and their tempered log-probabilities, (N, k) each.
    TopK {
        indices: &'a [u32],
        log_probs: &'a [f32],
        k: usize,
    },
}

impl<'a> SliceTeacher<'a> {
    /// The teacher of the batch rows `rows` (for a vocabulary of `v`).
    pub(crate) fn rows(self, rows: std::ops::Range<usize>, v: usize) -> Self {
        match self {
            Self::Logits(t) => Self::Logits(&t[rows.start * v..rows.end * v]),
            Self::TopK { indices, log_probs, k } => Self::TopK {
                indices: &indices[rows.start * k..rows.end * k],
                log_probs: &log_probs[rows.start * k..rows.end * k],
                k,
            },
        }
    }
}

/// `distill_loss_and_grad` on slices: s (N, V) row-major, the teacher (full logits or top
/// k, `loss::topk`), targets and mask (N,). Returns the loss values and the gradient (N, V).
/// `first_row` is the batch row of the slices' first: errors name batch rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn loss_and_grad_slices(
    first_row: usize,
    s: &[f32],
    t: Option<SliceTeacher<'_>>,
    targets: Option<&[u32]>,
    mask: &[f32],
    v: usize,
    alpha: f64,
    temperature: f64,
    denom: f64,
    divergence: Divergence,
) -> candle_core::Result<(LossValues, Vec<f32>)> {
    let n = mask.len();
    let denom = denom.max(1.0); // an all-masked step gives 0, not NaN
    check_rows("distill_loss_and_grad", "the logits", s.len(), n * v)?;
    match t {
        Some(SliceTeacher::Logits(t)) => check_rows("distill_loss_and_grad", "the teacher logits", t.len(), n * v)?,
        Some(SliceTeacher::TopK { indices, log_probs, k }) => {
            if k == 0 || k > v {
                return Err(candle_core::Error::Msg(format!(
                    "distill_loss_and_grad: a top-k teacher needs 1 <= k <= {v} (the vocabulary), got {k}"
                ))
                .bt());
            }
            check_rows("distill_loss_and_grad", "the top-k ids", indices.len(), n * k)?;
            check_rows(
                "distill_loss_and_grad",
                "the top-k log-probabilities",
                log_probs.len(),
                n * k,
            )?;
        }
        None => {}
    }
    if let Some(targets) = targets {
        check_rows("distill_loss_and_grad", "the targets", targets.len(), n)?;
        for (row, &y) in targets.iter().enumerate() {
            target_index(y, v, first_row + row)?;
        }
    }
    let isa = Isa::detect();
    let k = Kernel::new(divergence.canonical(), temperature);
    // Without a teacher the total is the CE itself (as in `distill_loss_with`).
    let (w_ce, w_kd) = match t {
        None => (1.0 / denom, 0.0),
        Some(_) => (alpha / denom, (1.0 - alpha) * temperature * temperature / denom),
    };
    let mut grad = vec![0f32; s.len()];
    // Per row: (mask * ce, mask * divergence), added up in row order below.
    let scratch_len = if matches!(t, Some(SliceTeacher::Logits(_))) {
        v
    } else {
        0
    };
    let rows: Vec<(f32, f32)> = grad
        .par_chunks_mut(v)
        .zip(s.par_chunks(v))
        .enumerate()
        .with_min_len(min_rows(v))
        .map_init(
            || vec![0f32; scratch_len],
            |scratch, (row, (g, s_row))| {
                let m = mask[row];
                let ce = match targets {
                    Some(targets) => {
                        let y = targets[row] as usize;
                        ce_loss_grad_row_best(isa, s_row, y, (w_ce * m as f64) as f32, g)
                    }
                    None => 0.0,
                };
                let gk = (w_kd * m as f64) as f32;
                let t_row = match t {
                    None => return Ok((m * ce, 0.0)),
                    // Masked rows are neither read nor checked, as in the top-k backward.
                    Some(SliceTeacher::TopK { .. }) if m == 0.0 => return Ok((0.0, 0.0)),
                    Some(SliceTeacher::TopK {
                        indices,
                        log_probs,
                        k: kk,
                    }) => {
                        let r = row * kk..(row + 1) * kk;
                        let acc = targets.is_some();
                        let (ids, lps) = (&indices[r.clone()], &log_probs[r]);
                        let kd = super::topk::loss_grad_row(&k, first_row + row, s_row, ids, lps, gk, g, acc)?;
                        return Ok((m * ce, m * kd));
                    }
                    Some(SliceTeacher::Logits(t)) => &t[row * v..(row + 1) * v],
                };
                if k.divergence == Divergence::ForwardKl {
                    if m == 0.0 {
                        return Ok((0.0, 0.0)); // masked: no loss, and the gradient stays 0
                    }
                    let acc = targets.is_some();
                    let kd = fwd_kl_loss_grad_row_best(isa, s_row, t_row, k.inv_t, gk, scratch, g, acc);
                    return Ok((m * ce, m * kd));
                }
                let kd = forward_row_best(isa, &k, s_row, t_row);
                if gk != 0.0 && targets.is_none() {
                    // Nothing written yet: the KD gradient goes straight into the row.
                    backward_row_best(isa, &k, s_row, t_row, gk, g);
                } else if gk != 0.0 {
                    scratch.iter_mut().for_each(|x| *x = 0.0);
                    backward_row_best(isa, &k, s_row, t_row, gk, scratch);
                    for (a, b) in g.iter_mut().zip(scratch.iter()) {
                        *a += b;
                    }
                }
                Ok((m * ce, m * kd))
            },
        )
        .collect::<candle_core::Result<_>>()?;
    let (ce_sum, kd_sum) = rows
        .iter()
        .fold((0f64, 0f64), |(a, b), &(c, d)| (a + c as f64, b + d as f64));
    let ce = ce_sum / denom;
    let values = match t {
        None => LossValues {
            total: ce as f32,
            ce: ce as f32,
            kd: 0.0,
        },
        Some(_) => {
            let kd = kd_sum * temperature * temperature / denom;
            LossValues {
                total: (alpha * ce + (1.0 - alpha) * kd) as f32,
                ce: ce as f32,
                kd: kd as f32,
            }
        }
    };
    Ok((values, grad))
}

/// The device check, up front, so that the error is the library's and names the way out:
/// the divergence and cross-entropy ops have CPU kernels, and CUDA kernels (`loss::cuda`,
/// compiled at run time with NVRTC) in a `cuda` build.
pub(super) fn check_kernel_device(t: &Tensor, what: &str) -> Result<()> {
    if t.device().is_cpu() || (cfg!(feature = "cuda") && t.device().is_cuda()) {
        Ok(())
    } else {
        check_cpu(t, what)
    }
}

/// For the ops that have CPU kernels only.
pub(super) fn check_cpu(t: &Tensor, what: &str) -> Result<()> {
    if t.device().is_cpu() {
        Ok(())
    } else {
        Err(Error::Device(format!(
            "fused loss {what} has no kernel for {:?} yet; use the reference loss \
             (loss::reference::distill_loss, loss::family::divergence_rows_reference) on this device",
            t.device().location()
        )))
    }
}

/// Float logits as a contiguous tensor in one of the dtypes the kernels read.
pub(super) fn float_input(t: &Tensor, what: &str) -> Result<Tensor> {
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(t.contiguous()?),
        other => Err(Error::Invalid(format!(
            "fused loss: {what} must be f32, f16, bf16 or f64, got {other:?}"
        ))),
    }
}

// ---------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------

/// (student (N, V), teacher (N, V)) -> per-row divergence (N,) f32.
struct DivergenceRows {
    divergence: Divergence, // canonical: JSD end points already replaced
    temperature: f64,
}

/// (student (N, V), teacher (N, V), grad_rows (N,) f32) -> d loss / d student (N, V),
/// in the student's dtype. Applied without a backward of its own.
struct DivergenceRowsGrad {
    divergence: Divergence,
    temperature: f64,
}

/// (student (N, V), targets (N,) u32) -> per-row cross-entropy (N,) f32.
struct CrossEntropyRows;

/// (student (N, V), targets (N,) u32, grad_rows (N,) f32) -> d loss / d student (N, V).
struct CrossEntropyRowsGrad;

pub(super) fn no_kernel(op: &'static str, device: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op}: the fused distillation loss has no {device} kernel yet; use the reference loss \
         (loss::reference, loss::family::divergence_rows_reference) on this device"
    ))
    .bt()
}

/// The shape of the rows, (..., V) -> (...), and V.
pub(super) fn rows_and_vocab(layout: &Layout) -> (Shape, usize) {
    let dims = layout.dims();
    match dims.split_last() {
        Some((&v, rows)) => (Shape::from(rows.to_vec()), v),
        None => (Shape::from(()), 1),
    }
}

/// The contiguous part of a storage that a layout covers.
pub(crate) fn contiguous_slice<'a, E>(
    data: &'a [E],
    layout: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [E]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(candle_core::Error::RequiresContiguous { op }.bt()),
    }
}

/// Binds `$x` to the contiguous slice of a float storage and evaluates `$body` once per
/// element type, so that the kernels below are monomorphised per dtype.
macro_rules! with_float_slice {
    ($op:expr, $storage:expr, $layout:expr, |$x:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(data) => {
                let $x = $crate::loss::fused::contiguous_slice(data, $layout, $op)?;
                $body
            }
            CpuStorage::F16(data) => {
                let $x = $crate::loss::fused::contiguous_slice(data, $layout, $op)?;
                $body
            }
            CpuStorage::BF16(data) => {
                let $x = $crate::loss::fused::contiguous_slice(data, $layout, $op)?;
                $body
            }
            CpuStorage::F64(data) => {
                let $x = $crate::loss::fused::contiguous_slice(data, $layout, $op)?;
                $body
            }
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), $op).bt()),
        }
    };
}
pub(super) use with_float_slice;

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(data) => contiguous_slice(data, l, op),
        other => Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), op).bt()),
    }
}

pub(super) fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> candle_core::Result<&'a [u32]> {
    match s {
        CpuStorage::U32(data) => contiguous_slice(data, l, op),
        other => Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), op).bt()),
    }
}

pub(super) fn check_rows(op: &'static str, what: &str, len: usize, rows: usize) -> candle_core::Result<()> {
    if len == rows {
        Ok(())
    } else {
        Err(candle_core::Error::Msg(format!("{op}: {what} has {len} elements for {rows} rows")).bt())
    }
}

impl CustomOp2 for DivergenceRows {
    fn name(&self) -> &'static str {
        "distill-divergence-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: l1.shape().clone(),
                rhs: l2.shape().clone(),
                op: self.name(),
            }
            .bt());
        }
        let (rows, v) = rows_and_vocab(l1);
        let k = Kernel::new(self.divergence, self.temperature);
        let out = with_float_slice!(self.name(), s1, l1, |s| with_float_slice!(self.name(), s2, l2, |t| {
            forward_rows(&k, s, t, v)
        }));
        Ok((CpuStorage::F32(out), rows))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            cuda::divergence_rows_fwd(self.name(), self.divergence, self.temperature, s1, l1, s2, l2)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s1, l1, s2, l2);
            Err(no_kernel(self.name(), "CUDA"))
        }
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Err(no_kernel(self.name(), "Metal"))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The teacher is a constant of the loss: `None` keeps GradStore from
        // allocating and summing a (N, V) gradient nobody reads.
        if !student.track_op() {
            return Ok((None, None));
        }
        let grad_rows = grad_res.to_dtype(DType::F32)?.contiguous()?; // (N,)
        let op = DivergenceRowsGrad {
            divergence: self.divergence,
            temperature: self.temperature,
        };
        let grad = student.apply_op3_no_bwd(teacher, &grad_rows, &op)?; // (N, V)
        Ok((Some(grad), None))
    }
}

impl CustomOp3 for DivergenceRowsGrad {
    fn name(&self) -> &'static str {
        "distill-divergence-rows-grad"
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
        if l1.shape() != l2.shape() {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: l1.shape().clone(),
                rhs: l2.shape().clone(),
                op: self.name(),
            }
            .bt());
        }
        let (rows, v) = rows_and_vocab(l1);
        let grad_rows = f32_slice(s3, l3, self.name())?;
        check_rows(self.name(), "the incoming gradient", grad_rows.len(), rows.elem_count())?;
        let k = Kernel::new(self.divergence, self.temperature);
        let out = with_float_slice!(self.name(), s1, l1, |s| with_float_slice!(self.name(), s2, l2, |t| {
            WithDType::to_cpu_storage_owned(backward_rows(&k, s, t, grad_rows, v))
        }));
        Ok((out, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            cuda::divergence_rows_bwd(self.name(), self.divergence, self.temperature, s1, l1, s2, l2, s3, l3)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s1, l1, s2, l2, s3, l3);
            Err(no_kernel(self.name(), "CUDA"))
        }
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
        Err(no_kernel(self.name(), "Metal"))
    }
}

impl CustomOp2 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "distill-cross-entropy-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, v) = rows_and_vocab(l1);
        let targets = u32_slice(s2, l2, self.name())?;
        check_rows(self.name(), "the targets", targets.len(), rows.elem_count())?;
        let out = with_float_slice!(self.name(), s1, l1, |s| cross_entropy_fwd(s, targets, v)?);
        Ok((CpuStorage::F32(out), rows))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            cuda::cross_entropy_rows_fwd(self.name(), s1, l1, s2, l2)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s1, l1, s2, l2);
            Err(no_kernel(self.name(), "CUDA"))
        }
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Err(no_kernel(self.name(), "Metal"))
    }

    fn bwd(
        &self,
        student: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !student.track_op() {
            return Ok((None, None));
        }
        let grad_rows = grad_res.to_dtype(DType::F32)?.contiguous()?; // (N,)
        let grad = student.apply_op3_no_bwd(targets, &grad_rows, &CrossEntropyRowsGrad)?; // (N, V)
        Ok((Some(grad), None))
    }
}

impl CustomOp3 for CrossEntropyRowsGrad {
    fn name(&self) -> &'static str {
        "distill-cross-entropy-rows-grad"
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
        let targets = u32_slice(s2, l2, self.name())?;
        let grad_rows = f32_slice(s3, l3, self.name())?;
        check_rows(self.name(), "the targets", targets.len(), rows.elem_count())?;
        check_rows(self.name(), "the incoming gradient", grad_rows.len(), rows.elem_count())?;
        let out = with_float_slice!(self.name(), s1, l1, |s| {
            WithDType::to_cpu_storage_owned(cross_entropy_bwd(s, targets, grad_rows, v))
        });
        Ok((out, l1.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        #[cfg(feature = "cuda")]
        {
            cuda::cross_entropy_rows_bwd(self.name(), s1, l1, s2, l2, s3, l3)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (s1, l1, s2, l2, s3, l3);
            Err(no_kernel(self.name(), "CUDA"))
        }
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
        Err(no_kernel(self.name(), "Metal"))
    }
}

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

/// Independent accumulators per row loop; 16 f32 fill an AVX-512 register, and
/// narrower targets split them.
const LANES: usize = 16;

/// Elements per block of the streaming log-sum-exp: two blocks of f32 (student and
/// teacher) stay in L1 between the max and the sum.
pub(super) const BLOCK: usize = 512;

/// Rows per rayon task are at least this many elements' worth, so that small
/// vocabularies do not drown in scheduling overhead.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

pub(super) fn min_rows(v: usize) -> usize {
    (MIN_ELEMS_PER_TASK / v.max(1)).max(1)
}

/// Loads one element as f32 (exact for f16 and bf16; rounds f64; free for f32).
#[inline(always)]
pub(super) fn ld<E: WithDType>(x: E) -> f32 {
    x.to_f64() as f32
}

/// `exp(x)` in f32 without a libm call, so that loops calling it vectorise.
///
/// Cephes' `expf`: `x = n ln2 + r`, |r| <= ln2/2, `exp(r)` by a degree-6 polynomial,
/// `2^n` built in the exponent bits. Relative error about 1 ulp on [-87.3, 88]
/// (checked against f64 in the tests). Below -87.33 (where f32 would go subnormal) it
/// returns exactly 0, so `exp(-inf) = 0` and the `0 log 0` guards see a true zero; above
/// 88 it returns +inf (our arguments are <= 0 up to rounding); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits, with no
    // rounding instruction (SSE2 has none for packed floats).
    const SHIFTER: f32 = 12_582_912.0;
    let xc = x.clamp(-87.336_55, 88.0);
    let t = xc * LOG2E + SHIFTER;
    let n = t - SHIFTER; // round(x / ln 2), in [-126, 127]
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes lists 5.0000001201e-1, which is 0.5 in f32
    let er = p * r * r + r + 1.0;
    // Integer n sits in t's mantissa; (n + 127) << 23 is 2^n as an f32.
    let n_int = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let two_n = f32::from_bits((n_int.wrapping_add(127) << 23) as u32);
    let e = er * two_n;
    if x < -87.336_55 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        e
    }
}

/// `ln(1 + y)` for y in [0, 1] (the range `log_add_exp` needs), without libm.
///
/// Cephes' `logf` polynomial on `ln(1 + x)`, |x| <= sqrt(2) - 1: for y above that,
/// `1 + y = 2 (1 + x)` with `x = (y - 1) / 2`. Both reductions are exact, so small y
/// keep full relative precision (no `1 + y` rounding). About 1 ulp; NaN stays NaN.
#[inline(always)]
fn ln_1p_unit(y: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let big = y > std::f32::consts::SQRT_2 - 1.0;
    let x = if big { (y - 1.0) * 0.5 } else { y };
    let e = if big { 1.0 } else { 0.0 };
    let z = x * x;
    let mut p = 7.037_683_6e-2;
    p = p * x - 1.151_461e-1;
    p = p * x + 1.167_699_9e-1;
    p = p * x - 1.242_014_1e-1;
    p = p * x + 1.424_932_3e-1;
    p = p * x - 1.666_805_8e-1;
    p = p * x + 2.000_071_4e-1;
    p = p * x - 2.499_999_4e-1;
    p = p * x + 3.333_333e-1;
    let tail = p * x * z + e * LN2_LO - 0.5 * z;
    x + tail + e * LN2_HI
}

/// The per-call constants of the divergence kernels.
#[derive(Clone, Copy)]
pub(super) struct Kernel {
    pub(super) divergence: Divergence,
    /// 1/T, rounded to f32 as candle's `x / T` (an affine op) rounds it.
    pub(super) inv_t: f32,
    /// beta or skew, and the logs of the two mixture weights (log w, log(1 - w));
    /// log 0 = -inf makes the mixture exactly its other side.
    pub(super) w: f32,
    pub(super) ln_w: f32,
    pub(super) ln_1mw: f32,
}

impl Kernel {
    pub(super) fn new(divergence: Divergence, temperature: f64) -> Self {
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

/// Largest element, NaN ignored (NaN is caught by the sum that follows).
#[inline(always)]
fn lanes_max(xs: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            m[l] = m[l].max(c[l]);
        }
    }
    rest.iter()
        .fold(m.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)), |a, b| a.max(*b))
}

/// A function of one element pair, summed or written by the row loops. The method is
/// `#[inline(always)]`: closures of this size are not inlined into the loops, and a
/// call per element stops them from vectorising (measured: 8x slower for JSD).
trait PairFn<A, B>: Copy {
    fn at(self, a: A, b: B) -> f32;
}

/// `sum_j f(a_j, b_j)` in LANES accumulators.
#[inline(always)]
fn lanes_sum<A: Copy, B: Copy>(a: &[A], b: &[B], f: impl PairFn<A, B>) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f.at(xa[l], xb[l]);
        }
    }
    let mut total = acc.iter().sum::<f32>();
    for (&x, &y) in ra.iter().zip(rb) {
        total += f.at(x, y);
    }
    total
}

/// `exp(x - max)`, the terms of a log-sum-exp (the second argument is unused).
#[derive(Clone, Copy)]
struct ExpShifted {
    max: f32,
}

impl PairFn<f32, f32> for ExpShifted {
    #[inline(always)]
    fn at(self, x: f32, _: f32) -> f32 {
        exp_f32(x - self.max)
    }
}

/// Streaming log-sum-exp of one side of a row, fed block by block: the running sum
/// of exp(x - max) is rescaled once per block whose max is larger, so each element
/// costs one exp and the row is read once.
#[derive(Clone, Copy)]
pub(super) struct OnlineLse {
    pub(super) max: f32,
    pub(super) sum: f32,
}

impl OnlineLse {
    #[inline(always)]
    pub(super) fn new() -> Self {
        Self {
            max: f32::NEG_INFINITY,
            sum: 0.0,
        }
    }

    /// Adds a block of temperature-scaled logits.
    #[inline(always)]
    pub(super) fn push_block(&mut self, xs: &[f32]) {
        let m = lanes_max(xs);
        if m > self.max {
            self.sum *= exp_f32(self.max - m); // 0 while the max was -inf
            self.max = m;
        }
        if self.max == f32::NEG_INFINITY {
            return; // all -inf so far: they add exp(-inf) = 0, and -inf - -inf would be NaN
        }
        self.sum += lanes_sum(xs, xs, ExpShifted { max: self.max });
    }

    /// `log p_j = (x_j - max) - log(sum)`: subtracting the max first keeps the
    /// log-probabilities exact near the max even for logits like 1e4 (the same order
    /// of operations as the max-shifted log-softmax in `loss::family`).
    #[inline(always)]
    pub(super) fn finish(self) -> LogNorm {
        LogNorm {
            max: self.max,
            log_sum: self.sum.ln(),
        }
    }
}

#[derive(Clone, Copy)]
pub(super) struct LogNorm {
    pub(super) max: f32,
    pub(super) log_sum: f32,
}

impl LogNorm {
    #[inline(always)]
    pub(super) fn log_prob(self, x: f32) -> f32 {
        (x - self.max) - self.log_sum
    }

    /// Normaliser of `inv_t * x` over a row: one streaming pass.
    #[inline(always)]
    pub(super) fn of_row<S: WithDType>(s: &[S], inv_t: f32) -> Self {
        let mut lse = OnlineLse::new();
        let mut buf = [0f32; BLOCK];
        for block in s.chunks(BLOCK) {
            let buf = &mut buf[..block.len()];
            buf.iter_mut().zip(block).for_each(|(b, &x)| *b = ld(x) * inv_t);
            lse.push_block(buf);
        }
        lse.finish()
    }
}

/// One row's normalisers for the student (q) and the teacher (p), from one pass.
#[derive(Clone, Copy)]
struct RowNorms {
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
trait ElemFn: Copy {
    fn at(self, lq: f32, lp: f32) -> f32;
}

/// An `ElemFn` applied to raw logits: loads, scales by 1/T, normalises.
#[derive(Clone, Copy)]
struct OnLogs<F> {
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
fn w_log_ratio(w: f32, la: f32, lb: f32) -> f32 {
    let v = w * (la - lb);
    if w == 0.0 {
        0.0
    } else {
        v
    }
}

/// `log(exp(a) + exp(b))`, exact when one side is -inf, -inf when both are.
#[inline(always)]
fn log_add_exp(a: f32, b: f32) -> f32 {
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
fn ratio(ln_c: f32, la: f32, lm: f32) -> f32 {
    let v = exp_f32(ln_c + la - lm);
    if la == f32::NEG_INFINITY {
        0.0
    } else {
        v
    }
}

#[inline(always)]
fn sign0(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Which instruction set the row kernels run with, chosen once per op call.
#[derive(Clone, Copy)]
pub(crate) struct Isa {
    pub(crate) avx2: bool,
}

impl Isa {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        Self { avx2 }
    }
}

/// Defines `$name(isa, args..)`, which runs the `#[inline(always)]` row kernel `$kernel`
/// compiled for AVX2 (8 lanes) when the CPU has it, else for the build's baseline
/// (SSE2, 4 lanes, on x86-64). Both compute the same LANES accumulators in the same
/// order, so they agree bit for bit (tested).
macro_rules! avx2_dispatch {
    ($name:ident, $avx2:ident, $kernel:ident, <$($g:ident),*>, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2<$($g: WithDType),*>($($arg: $ty),*) -> $ret {
            $kernel($($arg),*)
        }

        fn $name<$($g: WithDType),*>(isa: Isa, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if isa.avx2 {
                // SAFETY: `isa.avx2` is true only when `Isa::detect` found AVX2 on this CPU.
                return unsafe { $avx2($($arg),*) };
            }
            let _ = isa;
            $kernel($($arg),*)
        }
    };
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
fn fwd_kl_loss_grad_row(
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
fn ce_loss_grad_row(s: &[f32], y: usize, grad_row: f32, out: &mut [f32]) -> f32 {
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
unsafe fn ce_loss_grad_row_avx2(s: &[f32], y: usize, grad_row: f32, out: &mut [f32]) -> f32 {
    ce_loss_grad_row(s, y, grad_row, out)
}

fn ce_loss_grad_row_best(isa: Isa, s: &[f32], y: usize, grad_row: f32, out: &mut [f32]) -> f32 {
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
unsafe fn fwd_kl_loss_grad_row_avx2(
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
fn fwd_kl_loss_grad_row_best(
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
fn forward_rows<S: WithDType, T: WithDType>(k: &Kernel, s: &[S], t: &[T], v: usize) -> Vec<f32> {
    let isa = Isa::detect();
    s.par_chunks(v)
        .zip(t.par_chunks(v))
        .with_min_len(min_rows(v))
        .map(|(s, t)| forward_row_best(isa, k, s, t))
        .collect()
}

#[inline(always)]
pub(super) fn forward_row<S: WithDType, T: WithDType>(k: &Kernel, s: &[S], t: &[T]) -> f32 {
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
fn backward_rows<S: WithDType, T: WithDType>(k: &Kernel, s: &[S], t: &[T], grad_rows: &[f32], v: usize) -> Vec<S> {
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
pub(super) fn backward_row<S: WithDType, T: WithDType>(k: &Kernel, s: &[S], t: &[T], grad_row: f32, out: &mut [S]) {
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
fn cross_entropy_fwd<S: WithDType>(s: &[S], targets: &[u32], v: usize) -> candle_core::Result<Vec<f32>> {
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
fn ce_forward_row<S: WithDType>(s: &[S], y: usize) -> f32 {
    -LogNorm::of_row(s, 1.0).log_prob(ld(s[y]))
}

fn cross_entropy_bwd<S: WithDType>(s: &[S], targets: &[u32], grad_rows: &[f32], v: usize) -> Vec<S> {
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
fn ce_backward_row<S: WithDType>(s: &[S], y: usize, grad_row: f32, out: &mut [S]) {
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

fn target_index(y: u32, v: usize, row: usize) -> candle_core::Result<usize> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::loss::family::divergence_rows_reference;
    use crate::loss::reference::distill_loss;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Every member of the family, with the JSD end points and skew 0 as their own cases.
    const ALL: [Divergence; 11] = [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.5 },
        Divergence::Jsd { beta: 0.1 },
        Divergence::Jsd { beta: 0.0 },
        Divergence::Jsd { beta: 1.0 },
        Divergence::SkewForwardKl { skew: 0.1 },
        Divergence::SkewForwardKl { skew: 0.0 },
        Divergence::SkewReverseKl { skew: 0.1 },
        Divergence::SkewReverseKl { skew: 0.0 },
        Divergence::Tvd,
    ];

    /// The tolerance of every f32 parity check in this module: `got` matches `want` when
    ///
    ///   |got - want| <= rtol * (|want| + scale_r),
    ///
    /// with `scale_r` the largest |want| of the same row (of `v` entries), or `floor[r]` if
    /// that is larger. That is relative where an entry is large, and absolute at `rtol`
    /// times the row's scale where it is near zero: both sides round in f32 at the size of
    /// the row's largest terms, so an entry near 0 cannot match to a fraction of itself.
    /// `floor` carries the size of terms that cancel inside a gradient: the reverse-type
    /// gradients are `q (log q - log p - L)`, differences of numbers the size of the row's
    /// loss L (1e4 for the rows with logits of +-1e4), so there `floor = |weight * L|`.
    fn assert_close(what: &str, got: &[f32], want: &[f32], v: usize, floor: &[f32], rtol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (r, (g, w)) in got.chunks(v).zip(want.chunks(v)).enumerate() {
            let scale = w
                .iter()
                .fold(floor.get(r).copied().unwrap_or(0.0), |m, x| m.max(x.abs()));
            for (j, (a, b)) in g.iter().zip(w).enumerate() {
                let tol = rtol * (b.abs() + scale);
                assert!(
                    (a - b).abs() <= tol && a.is_finite() == b.is_finite(),
                    "{what}: row {r} col {j}: got {a}, want {b} (|diff| {} > tol {tol})",
                    (a - b).abs()
                );
            }
        }
    }

    /// `|weight * loss|` of each row: the `floor` of `assert_close` for gradients.
    fn loss_floor(w: &[f32], rows: &[f32]) -> Vec<f32> {
        w.iter().zip(rows).map(|(w, l)| (w * l).abs()).collect()
    }

    /// Seeded logits in [-4, 4); every fifth row also gets a few entries of +-1e4.
    fn logits(rng: &mut ChaCha8Rng, n: usize, v: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..n * v).map(|_| rng.random_range(-4.0f32..4.0)).collect();
        for row in (0..n).step_by(5) {
            for _ in 0..3 {
                let j = rng.random_range(0..v);
                x[row * v + j] = if rng.random::<bool>() { 1e4 } else { -1e4 };
            }
        }
        x
    }

    /// Row weights standing in for `mask * dL/drow`: rows 3, 7, 11, ... are masked (0).
    fn row_weights(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| if i % 4 == 3 { 0.0 } else { rng.random_range(0.5f32..1.5) })
            .collect()
    }

    type RowsFn = fn(&Tensor, &Tensor, Divergence, f64) -> Result<Tensor>;

    /// Rows and d(sum w * rows)/d student for one implementation.
    fn rows_and_grad(
        f: RowsFn,
        s: &[f32],
        t: &[f32],
        w: &[f32],
        (n, v): (usize, usize),
        d: Divergence,
        temp: f64,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let dev = Device::Cpu;
        let s = Var::from_slice(s, (n, v), &dev)?;
        let t = Tensor::from_slice(t, (n, v), &dev)?;
        let w = Tensor::from_slice(w, n, &dev)?;
        let rows = f(s.as_tensor(), &t, d, temp)?; // (N,)
        let grads = (&rows * w)?.sum_all()?.backward()?;
        let g = grads.get(s.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
        Ok((rows.to_vec1::<f32>()?, g))
    }

    #[test]
    fn fused_matches_reference_in_values_and_gradients() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (n, v) in [(7, 33), (64, 1000)] {
            let s = logits(&mut rng, n, v);
            let t = logits(&mut rng, n, v);
            let w = row_weights(&mut rng, n);
            for temp in [1.0, 2.5] {
                for d in ALL {
                    let what = format!("{d} ({n}, {v}) T={temp}");
                    let (rf, gf) = rows_and_grad(divergence_rows, &s, &t, &w, (n, v), d, temp)?;
                    let (rr, gr) = rows_and_grad(divergence_rows_reference, &s, &t, &w, (n, v), d, temp)?;
                    assert_close(&format!("{what} rows"), &rf, &rr, 1, &[], 1e-5);
                    assert_close(&format!("{what} grad"), &gf, &gr, v, &loss_floor(&w, &rr), 1e-5);
                    for (i, row) in gf.chunks(v).enumerate() {
                        if w[i] == 0.0 {
                            assert!(row.iter().all(|x| *x == 0.0), "{what}: masked row {i} has a gradient");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Independent float64 oracle written from the definitions: log-softmax, KL as
    /// `sum exp(la) (la - lb)` over entries of nonzero weight, mixtures as
    /// `log(w exp(la) + (1 - w) exp(lb))` by a two-term log-sum-exp. In f64 it stays
    /// exact enough for finite differences even at logits of +-1e4.
    fn oracle(s: &[f64], t: &[f64], d: Divergence, temp: f64) -> f64 {
        let log_softmax = |r: &[f64]| {
            let m = r.iter().cloned().fold(f64::MIN, f64::max) / temp;
            let lse = m + r.iter().map(|x| (x / temp - m).exp()).sum::<f64>().ln();
            r.iter().map(|x| x / temp - lse).collect::<Vec<f64>>()
        };
        let kl = |la: &[f64], lb: &[f64]| {
            la.iter()
                .zip(lb)
                .filter(|(a, _)| a.exp() > 0.0)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>()
        };
        let log_mix = |w: f64, la: &[f64], lb: &[f64]| {
            la.iter()
                .zip(lb)
                .map(|(a, b)| {
                    let (x, y) = (a + w.ln(), b + (1.0 - w).ln());
                    let m = x.max(y);
                    m + ((x - m).exp() + (y - m).exp()).ln()
                })
                .collect::<Vec<f64>>()
        };
        let (lp, lq) = (log_softmax(t), log_softmax(s));
        match d {
            Divergence::ForwardKl | Divergence::Jsd { beta: 0.0 } => kl(&lp, &lq),
            Divergence::ReverseKl | Divergence::Jsd { beta: 1.0 } => kl(&lq, &lp),
            Divergence::Jsd { beta } => {
                let lm = log_mix(beta, &lp, &lq);
                beta * kl(&lp, &lm) + (1.0 - beta) * kl(&lq, &lm)
            }
            Divergence::SkewForwardKl { skew } => kl(&lp, &log_mix(skew, &lp, &lq)),
            Divergence::SkewReverseKl { skew } => kl(&lq, &log_mix(skew, &lq, &lp)),
            Divergence::Tvd => 0.5 * lp.iter().zip(&lq).map(|(a, b)| (a.exp() - b.exp()).abs()).sum::<f64>(),
        }
    }

    #[test]
    fn fused_gradient_matches_f64_finite_differences() -> Result<()> {
        let (n, v) = (3, 5);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for temp in [1.0, 2.5] {
            let s: Vec<f32> = (0..n * v).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let t: Vec<f32> = (0..n * v).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let w = [1.0f32, 0.7, 1.3];
            for d in ALL {
                let (rows, g) = rows_and_grad(divergence_rows, &s, &t, &w, (n, v), d, temp)?;
                let h = 1e-5;
                let mut fd = vec![0f32; n * v];
                let mut want_rows = vec![0f32; n];
                for r in 0..n {
                    let sr: Vec<f64> = s[r * v..(r + 1) * v].iter().map(|x| *x as f64).collect();
                    let tr: Vec<f64> = t[r * v..(r + 1) * v].iter().map(|x| *x as f64).collect();
                    want_rows[r] = oracle(&sr, &tr, d, temp) as f32;
                    for j in 0..v {
                        let (mut up, mut dn) = (sr.clone(), sr.clone());
                        up[j] += h;
                        dn[j] -= h;
                        let num = (oracle(&up, &tr, d, temp) - oracle(&dn, &tr, d, temp)) / (2.0 * h);
                        fd[r * v + j] = (w[r] as f64 * num) as f32;
                    }
                }
                assert_close(
                    &format!("{d} T={temp} rows vs f64 oracle"),
                    &rows,
                    &want_rows,
                    1,
                    &[],
                    1e-5,
                );
                assert_close(
                    &format!("{d} T={temp} grad vs finite differences"),
                    &g,
                    &fd,
                    v,
                    &[],
                    1e-4,
                );
            }
        }
        Ok(())
    }

    #[test]
    fn jsd_end_points_and_skew_zero_are_exactly_the_kls() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, v) = (9, 50);
        let s = Tensor::from_vec(logits(&mut rng, n, v), (n, v), &Device::Cpu)?;
        let t = Tensor::from_vec(logits(&mut rng, n, v), (n, v), &Device::Cpu)?;
        let rows = |d| -> Result<Vec<f32>> { Ok(divergence_rows(&s, &t, d, 1.5)?.to_vec1::<f32>()?) };
        let fkl = rows(Divergence::ForwardKl)?;
        let rkl = rows(Divergence::ReverseKl)?;
        let pairs = [
            (Divergence::Jsd { beta: 0.0 }, &fkl),
            (Divergence::Jsd { beta: 1.0 }, &rkl),
            (Divergence::SkewForwardKl { skew: 0.0 }, &fkl),
            (Divergence::SkewReverseKl { skew: 0.0 }, &rkl),
        ];
        for (d, want) in pairs {
            let got = rows(d)?;
            for (a, b) in got.iter().zip(want.iter()) {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{d}: {a} vs {b}");
            }
        }
        let tvd = rows(Divergence::Tvd)?;
        assert!(tvd.iter().all(|x| (0.0..=1.0).contains(x)), "{tvd:?}");
        Ok(())
    }

    #[test]
    fn teacher_gets_no_gradient() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, v) = (4, 9);
        let s = Var::from_vec(logits(&mut rng, n, v), (n, v), &Device::Cpu)?;
        let t = Var::from_vec(logits(&mut rng, n, v), (n, v), &Device::Cpu)?;
        let targets = Tensor::new(&[1u32, 0, 8, 3], &Device::Cpu)?;
        let mask = Tensor::new(&[1f32, 1., 0., 1.], &Device::Cpu)?;
        for d in ALL {
            let grads = divergence_rows(s.as_tensor(), t.as_tensor(), d, 2.0)?
                .sum_all()?
                .backward()?;
            assert!(grads.get(t.as_tensor()).is_none(), "{d}: the teacher got a gradient");
            assert!(grads.get(s.as_tensor()).is_some(), "{d}: the student got no gradient");
            let l = distill_loss_fused(s.as_tensor(), Some(t.as_tensor()), &targets, &mask, 0.3, 2.0, 3.0, d)?;
            let grads = l.total.backward()?;
            assert!(grads.get(t.as_tensor()).is_none(), "{d}: the teacher got a gradient");
        }
        Ok(())
    }

    #[test]
    fn half_precision_inputs_match_f32() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let (n, v) = (16, 200);
        let dev = Device::Cpu;
        let s32 = Tensor::from_vec(
            (0..n * v).map(|_| rng.random_range(-4.0f32..4.0)).collect(),
            (n, v),
            &dev,
        )?;
        let t32 = Tensor::from_vec(
            (0..n * v).map(|_| rng.random_range(-4.0f32..4.0)).collect(),
            (n, v),
            &dev,
        )?;
        // (dtype, relative rounding of one element: 2^-11 for f16, 2^-8 for bf16)
        for (dt, eps) in [(DType::F16, 4.9e-4f32), (DType::BF16, 3.9e-3)] {
            let (s_h, t_h) = (s32.to_dtype(dt)?, t32.to_dtype(dt)?);
            for d in ALL {
                let what = format!("{d} {dt:?}");
                let sv = Var::from_tensor(&s_h)?;
                let rows = divergence_rows(sv.as_tensor(), &t_h, d, 1.0)?;
                let g = rows.sum_all()?.backward()?.get(sv.as_tensor()).unwrap().clone();
                assert_eq!(g.dtype(), dt, "{what}: gradient dtype");
                // The kernels convert each element exactly, so half inputs give the same
                // f32 results as their f32 upcast: bit for bit.
                let su = Var::from_tensor(&s_h.to_dtype(DType::F32)?)?;
                let rows_up = divergence_rows(su.as_tensor(), &t_h.to_dtype(DType::F32)?, d, 1.0)?;
                let g_up = rows_up.sum_all()?.backward()?.get(su.as_tensor()).unwrap().clone();
                assert_eq!(rows.to_vec1::<f32>()?, rows_up.to_vec1::<f32>()?, "{what}: rows");
                let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let g_up = g_up.flatten_all()?.to_vec1::<f32>()?;
                // ... and the gradient differs only by its rounding to the half type.
                assert_close(&format!("{what} grad"), &g, &g_up, v, &[], eps);
                // Against the unrounded f32 logits: the inputs moved by up to eps * 4.
                let rows32 = divergence_rows(&s32, &t32, d, 1.0)?.to_vec1::<f32>()?;
                let rows = rows.to_vec1::<f32>()?;
                for (a, b) in rows.iter().zip(&rows32) {
                    assert!((a - b).abs() <= 20.0 * eps * (1.0 + b.abs()), "{what}: {a} vs f32 {b}");
                }
            }
        }
        // A bf16 teacher beside an f32 student (logits cached in half precision).
        let t_h = t32.to_dtype(DType::BF16)?;
        let mixed = divergence_rows(&s32, &t_h, Divergence::ForwardKl, 2.0)?.to_vec1::<f32>()?;
        let upcast = divergence_rows(&s32, &t_h.to_dtype(DType::F32)?, Divergence::ForwardKl, 2.0)?.to_vec1::<f32>()?;
        assert_eq!(mixed, upcast);
        Ok(())
    }

    #[test]
    fn distill_loss_fused_matches_reference_distill_loss() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let (n, v) = (12, 40);
        let dev = Device::Cpu;
        let s0 = logits(&mut rng, n, v);
        let t = Tensor::from_vec(logits(&mut rng, n, v), (n, v), &dev)?;
        let targets = Tensor::from_vec(
            (0..n).map(|_| rng.random_range(0..v as u32)).collect::<Vec<u32>>(),
            n,
            &dev,
        )?;
        let mask_v: Vec<f32> = (0..n).map(|i| if i % 3 == 2 { 0.0 } else { 1.0 }).collect();
        let mask = Tensor::from_slice(&mask_v, n, &dev)?;
        let denom = 2.0 * mask_v.iter().sum::<f32>() as f64; // as if the step had a second micro-batch
        for teacher in [Some(&t), None] {
            let s = Var::from_slice(&s0, (n, v), &dev)?;
            let f = distill_loss_fused(
                s.as_tensor(),
                teacher,
                &targets,
                &mask,
                0.4,
                2.0,
                denom,
                Divergence::ForwardKl,
            )?;
            let gf = f
                .total
                .backward()?
                .get(s.as_tensor())
                .unwrap()
                .flatten_all()?
                .to_vec1::<f32>()?;
            let s = Var::from_slice(&s0, (n, v), &dev)?;
            let r = distill_loss(s.as_tensor(), teacher, &targets, &mask, 0.4, 2.0, denom)?;
            let gr = r
                .total
                .backward()?
                .get(s.as_tensor())
                .unwrap()
                .flatten_all()?
                .to_vec1::<f32>()?;
            let what = if teacher.is_some() {
                "with teacher"
            } else {
                "without teacher"
            };
            let (tf, tr) = (f.total.to_scalar::<f32>()?, r.total.to_scalar::<f32>()?);
            assert_close(&format!("{what}: total"), &[tf], &[tr], 1, &[], 1e-5);
            assert_close(&format!("{what}: ce"), &[f.ce], &[r.ce], 1, &[], 1e-5);
            assert_close(&format!("{what}: kd"), &[f.kd], &[r.kd], 1, &[], 1e-5);
            assert_close(&format!("{what}: grad"), &gf, &gr, v, &[], 1e-5);
        }
        Ok(())
    }

    /// The one-pass loss and gradient against the ops and candle's backward: every
    /// divergence, with and without a teacher, T = 1 and 2.5, masked rows, +-1e4 logits,
    /// and an all-masked step.
    #[test]
    fn one_pass_loss_and_grad_matches_the_ops_and_backward() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let (n, v) = (20, 300);
        let dev = Device::Cpu;
        let s0 = logits(&mut rng, n, v);
        let t = Tensor::from_vec(logits(&mut rng, n, v), (n, v), &dev)?;
        let targets = Tensor::from_vec(
            (0..n).map(|_| rng.random_range(0..v as u32)).collect::<Vec<u32>>(),
            n,
            &dev,
        )?;
        for all_masked in [false, true] {
            let mask_v: Vec<f32> = (0..n)
                .map(|i| if all_masked || i % 3 == 2 { 0.0 } else { 1.0 })
                .collect();
            let mask = Tensor::from_slice(&mask_v, n, &dev)?;
            let denom = mask_v.iter().sum::<f32>() as f64;
            for temp in [1.0, 2.5] {
                for (d, teacher) in ALL
                    .iter()
                    .map(|&d| (d, Some(&t)))
                    .chain([(Divergence::ForwardKl, None)])
                {
                    let what = format!("{d} T={temp} teacher={} all_masked={all_masked}", teacher.is_some());
                    let sv = Var::from_slice(&s0, (n, v), &dev)?;
                    let teacher_t = teacher.map(TeacherTargets::Logits);
                    let f = distill_loss_with(sv.as_tensor(), teacher_t, &targets, &mask, 0.3, temp, denom, d)?;
                    let want = f
                        .total
                        .backward()?
                        .get(sv.as_tensor())
                        .unwrap()
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    let student = Tensor::from_slice(&s0, (n, v), &dev)?;
                    let (vals, grad) =
                        distill_loss_and_grad(&student, teacher_t, Some(&targets), &mask, 0.3, temp, denom, d)?;
                    let got = grad.flatten_all()?.to_vec1::<f32>()?;
                    let total = f.total.to_scalar::<f32>()?;
                    assert_close(&format!("{what}: total"), &[vals.total], &[total], 1, &[], 1e-5);
                    assert_close(&format!("{what}: ce"), &[vals.ce], &[f.ce], 1, &[], 1e-5);
                    assert_close(&format!("{what}: kd"), &[vals.kd], &[f.kd], 1, &[], 1e-5);
                    assert_close(&format!("{what}: grad"), &got, &want, v, &[], 1e-5);
                    assert!(vals.total.is_finite() && got.iter().all(|g| g.is_finite()), "{what}");
                    if all_masked {
                        assert_eq!(vals.total, 0.0, "{what}");
                        assert!(got.iter().all(|&g| g == 0.0), "{what}");
                    }
                }
            }
        }
        let student = Tensor::from_slice(&s0, (n, v), &dev)?;
        let bad_targets = Tensor::from_vec(vec![v as u32; n], n, &dev)?;
        let mask = Tensor::ones(n, DType::F32, &dev)?;
        let err = distill_loss_and_grad(
            &student,
            None,
            Some(&bad_targets),
            &mask,
            0.5,
            1.0,
            1.0,
            Divergence::ForwardKl,
        );
        assert!(err.is_err(), "a target outside the vocabulary is an error");
        assert!(distill_loss_and_grad(&student, None, None, &mask, 0.5, 1.0, 1.0, Divergence::ForwardKl).is_err());
        // Without targets: the KD term alone, as `divergence_rows` and candle's backward give it.
        let d = Divergence::Jsd { beta: 0.3 };
        let sv = Var::from_slice(&s0, (n, v), &dev)?;
        let rows = divergence_rows(sv.as_tensor(), &t, d, 2.0)?;
        let loss = (rows.sum_all()? * (4.0 / n as f64))?;
        let want = loss
            .backward()?
            .get(sv.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (vals, grad) = distill_loss_and_grad(
            &student,
            Some(TeacherTargets::Logits(&t)),
            None,
            &mask,
            0.0,
            2.0,
            n as f64,
            d,
        )?;
        assert_close(
            "kd only: total",
            &[vals.total],
            &[loss.to_scalar::<f32>()?],
            1,
            &[],
            1e-5,
        );
        assert_eq!(vals.ce, 0.0);
        assert_close(
            "kd only: grad",
            &grad.flatten_all()?.to_vec1::<f32>()?,
            &want,
            v,
            &[],
            1e-5,
        );
        Ok(())
    }

    #[test]
    fn all_masked_step_is_zero_not_nan() -> Result<()> {
        let dev = Device::Cpu;
        let s = Var::from_slice(&[1f32, 2., 0., 1e4, -1e4, 3.], (2, 3), &dev)?;
        let t = Tensor::new(&[[-1e4f32, 1e4, 0.], [0., 1., 2.]], &dev)?;
        let targets = Tensor::new(&[1u32, 2], &dev)?;
        let mask = Tensor::new(&[0f32, 0.], &dev)?;
        for d in ALL {
            let l = distill_loss_fused(s.as_tensor(), Some(&t), &targets, &mask, 0.5, 2.0, 0.0, d)?;
            assert_eq!(l.total.to_scalar::<f32>()?, 0.0, "{d}");
            assert_eq!((l.ce, l.kd), (0.0, 0.0), "{d}");
            let g = l
                .total
                .backward()?
                .get(s.as_tensor())
                .unwrap()
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert!(g.iter().all(|x| *x == 0.0), "{d}: {g:?}");
        }
        Ok(())
    }

    #[test]
    fn masked_vocabulary_entries_are_ignored() -> Result<()> {
        // Columns 0 and 3 are -inf for both models (a padded vocabulary): every
        // divergence stays finite, both implementations agree, and those columns get
        // no gradient.
        let mut rng = ChaCha8Rng::seed_from_u64(19);
        let (n, v) = (5, 12);
        let mut s = logits(&mut rng, n, v);
        let mut t = logits(&mut rng, n, v);
        for r in 0..n {
            for j in [0, 3] {
                s[r * v + j] = f32::NEG_INFINITY;
                t[r * v + j] = f32::NEG_INFINITY;
            }
        }
        let w = vec![1f32; n];
        for d in ALL {
            let (rf, gf) = rows_and_grad(divergence_rows, &s, &t, &w, (n, v), d, 1.5)?;
            let (rr, gr) = rows_and_grad(divergence_rows_reference, &s, &t, &w, (n, v), d, 1.5)?;
            assert!(rf.iter().chain(&gf).all(|x| x.is_finite()), "{d}: {rf:?}");
            assert_close(&format!("{d} rows"), &rf, &rr, 1, &[], 1e-5);
            assert_close(&format!("{d} grad"), &gf, &gr, v, &loss_floor(&w, &rr), 1e-5);
            assert!(gf.chunks(v).all(|row| row[0] == 0.0 && row[3] == 0.0), "{d}");
        }
        Ok(())
    }

    #[test]
    fn strided_and_batched_inputs() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let (b, tt, v) = (2, 3, 17);
        let dev = Device::Cpu;
        let s = Tensor::from_vec(logits(&mut rng, b * tt, v), (b, tt, v), &dev)?;
        let t = Tensor::from_vec(logits(&mut rng, b * tt, v), (b, tt, v), &dev)?;
        let d = Divergence::Jsd { beta: 0.5 };
        let batched = divergence_rows(&s, &t, d, 1.0)?; // (B, T)
        assert_eq!(batched.dims(), &[b, tt]);
        let flat = divergence_rows(&s.reshape((b * tt, v))?, &t.reshape((b * tt, v))?, d, 1.0)?;
        assert_eq!(batched.flatten_all()?.to_vec1::<f32>()?, flat.to_vec1::<f32>()?);
        // A transposed (non-contiguous) student is copied, and the gradient flows back through the copy.
        let sv = Var::from_tensor(&s.reshape((b * tt, v))?.t()?.contiguous()?)?; // (V, N)
        let st = sv.as_tensor().t()?; // (N, V), strided
        let rows = divergence_rows(&st, &t.reshape((b * tt, v))?, d, 1.0)?;
        assert_eq!(rows.to_vec1::<f32>()?, flat.to_vec1::<f32>()?);
        let g = rows.sum_all()?.backward()?.get(sv.as_tensor()).unwrap().clone();
        assert_eq!(g.dims(), &[v, b * tt]);
        Ok(())
    }

    #[test]
    fn polynomial_exp_and_log_are_within_two_ulp_of_f64() {
        // A dense sweep of the ranges the kernels use, against f64's exp and ln_1p.
        let ulp = |x: f64| (x.abs() as f32).max(f32::MIN_POSITIVE) as f64 * f32::EPSILON as f64;
        let mut worst = (0f64, 0f64);
        for i in 0..=200_000 {
            let x = -87.3 + (88.0 + 87.3) * i as f64 / 200_000.0;
            let x32 = x as f32;
            let want = (x32 as f64).exp();
            let err = (exp_f32(x32) as f64 - want).abs() / ulp(want);
            worst.0 = worst.0.max(err);
            let y32 = (i as f64 / 200_000.0) as f32; // [0, 1]
            let want = (y32 as f64).ln_1p();
            let err = (ln_1p_unit(y32) as f64 - want).abs() / ulp(want.max(f64::MIN_POSITIVE));
            worst.1 = worst.1.max(err);
        }
        assert!(
            worst.0 <= 2.0 && worst.1 <= 2.0,
            "worst errors in ulp: exp {}, ln_1p {}",
            worst.0,
            worst.1
        );
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan() && ln_1p_unit(f32::NAN).is_nan());
        assert_eq!(ln_1p_unit(0.0), 0.0);
        assert_eq!(ln_1p_unit(1e-30), 1e-30);
        assert_eq!(log_add_exp(f32::NEG_INFINITY, -3.0), -3.0);
        assert_eq!(log_add_exp(f32::NEG_INFINITY, f32::NEG_INFINITY), f32::NEG_INFINITY);
    }

    #[test]
    fn avx2_and_baseline_kernels_agree_bit_for_bit() {
        // On a CPU without AVX2 both sides take the baseline path and this only checks
        // determinism; CI machines and the dev boxes here have AVX2.
        let mut rng = ChaCha8Rng::seed_from_u64(29);
        let v = 1000;
        let s = logits(&mut rng, 1, v);
        let t = logits(&mut rng, 1, v);
        let (base, best) = (Isa { avx2: false }, Isa::detect());
        for d in ALL {
            let k = Kernel::new(d.canonical(), 1.7);
            let a = forward_row_best(base, &k, &s, &t);
            let b = forward_row_best(best, &k, &s, &t);
            assert_eq!(a.to_bits(), b.to_bits(), "{d}: {a} vs {b}");
            let (mut ga, mut gb) = (vec![0f32; v], vec![0f32; v]);
            backward_row_best(base, &k, &s, &t, 0.7, &mut ga);
            backward_row_best(best, &k, &s, &t, 0.7, &mut gb);
            assert_eq!(ga, gb, "{d}");
        }
        let (mut ga, mut gb) = (vec![0f32; v], vec![0f32; v]);
        ce_backward_row_best(base, &s, 3, 1.0, &mut ga);
        ce_backward_row_best(best, &s, 3, 1.0, &mut gb);
        assert_eq!(ga, gb);
        assert_eq!(
            ce_forward_row_best(base, &s, 3).to_bits(),
            ce_forward_row_best(best, &s, 3).to_bits()
        );
        let (mut ga, mut gb) = (vec![0f32; v], vec![0f32; v]);
        let a = ce_loss_grad_row_best(base, &s, 3, 0.7, &mut ga);
        let b = ce_loss_grad_row_best(best, &s, 3, 0.7, &mut gb);
        assert_eq!((a.to_bits(), ga), (b.to_bits(), gb));
        for accumulate in [false, true] {
            let (mut ga, mut gb) = (vec![0.5f32; v], vec![0.5f32; v]);
            let (mut ea, mut eb) = (vec![0f32; v], vec![0f32; v]);
            let a = fwd_kl_loss_grad_row_best(base, &s, &t, 0.6, 0.7, &mut ea, &mut ga, accumulate);
            let b = fwd_kl_loss_grad_row_best(best, &s, &t, 0.6, 0.7, &mut eb, &mut gb, accumulate);
            assert_eq!(a.to_bits(), b.to_bits());
            assert_eq!(ga, gb);
        }
    }

    #[test]
    fn bad_inputs_are_errors_that_say_what_is_wrong() -> Result<()> {
        let dev = Device::Cpu;
        let s = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let msg = |r: Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let e = msg(divergence_rows(&s, &s, Divergence::Jsd { beta: 2.0 }, 1.0));
        assert!(e.contains("beta must lie in [0, 1]"), "{e}");
        let e = msg(divergence_rows(&s, &s, Divergence::ForwardKl, f64::NAN));
        assert!(e.contains("temperature"), "{e}");
        let e = msg(divergence_rows(
            &s,
            &Tensor::zeros((2, 4), DType::F32, &dev)?,
            Divergence::Tvd,
            1.0,
        ));
        assert!(e.contains("same shape"), "{e}");
        let e = msg(divergence_rows(&s, &s.to_dtype(DType::U32)?, Divergence::Tvd, 1.0));
        assert!(e.contains("teacher logits must be f32, f16, bf16 or f64"), "{e}");
        let e = msg(cross_entropy_rows(&s, &Tensor::new(&[0u32, 3], &dev)?));
        assert!(e.contains("target 3 in row 1 is outside the vocabulary of 3"), "{e}");
        let e = msg(cross_entropy_rows(&s, &Tensor::new(&[0u32, 1, 2], &dev)?));
        assert!(e.contains("targets shaped like the logits"), "{e}");
        Ok(())
    }

    /// The CUDA kernels against the CPU ones, values and gradients, for every divergence.
    /// Compiled in every `cuda` build; skipped, with a message, where no GPU is present.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_kernels_match_the_cpu_kernels() -> Result<()> {
        let gpu = match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped cuda_kernels_match_the_cpu_kernels: no CUDA device ({e})");
                return Ok(());
            }
        };
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let (n, v) = (13, 3001);
        let s = logits(&mut rng, n, v);
        let t = logits(&mut rng, n, v);
        let w = row_weights(&mut rng, n);
        for d in ALL {
            let on = |dev: &Device| -> Result<(Vec<f32>, Vec<f32>)> {
                let sv = Var::from_slice(&s, (n, v), dev)?;
                let tt = Tensor::from_slice(&t, (n, v), dev)?;
                let rows = divergence_rows(sv.as_tensor(), &tt, d, 2.0)?;
                let g = (&rows * Tensor::from_slice(&w, n, dev)?)?.sum_all()?.backward()?;
                let grad = g.get(sv.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
                Ok((rows.to_vec1::<f32>()?, grad))
            };
            let (cr, cg) = on(&Device::Cpu)?;
            let (gr, gg) = on(&gpu)?;
            assert_close(&format!("{d} rows"), &gr, &cr, 1, &[], 1e-4);
            assert_close(&format!("{d} grad"), &gg, &cg, v, &loss_floor(&w, &cr), 1e-4);
        }
        Ok(())
    }
}
