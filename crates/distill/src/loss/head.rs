//! The distillation loss fused with the student's output projection ("fused head"):
//! hidden states (N, H) and the head weight (V, H) go in, the loss and the gradients
//! for both come out, and the (N, V) student logits never exist at once.
//!
//! The tokens go through in chunks of rows, each chunk's loss and gradient computed as soon
//! as its logits exist (the scheme of Liger-Kernel's fused linear cross-entropy, applied to
//! the whole distillation loss). Why, the algorithm, its memory floor and the measured
//! savings are in `docs/losses.md`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, InplaceOp3, Layout, MetalStorage, Shape, Tensor, Var};

use super::full::{distill_loss_and_grad, distill_loss_with};
use super::reference::LossParts;
use super::topk::TopK;
use super::{LossSpec, Teacher};
use crate::error::{Error, Result};

/// Bytes of one chunk's student logits that `default_chunk_rows` aims at. A chunk makes
/// a handful of (C, V) buffers (logits, their `Var` copy, the gradient and GradStore's
/// sum for it, the teacher's logits), so 16 MiB keeps the chunk's working set near
/// 100 MB, below the three (V, H) buffers of the weight gradient at large V, while each
/// chunk's matmul keeps many rows (85 at V 49,152; 512 at V 8,192). 32-row chunks were
/// slower at V 49,152 (26 s against 19 s in one loaded run), 256-row ones used more memory.
pub const CHUNK_LOGITS_BYTES: usize = 16 << 20;

/// Rows per chunk for a vocabulary of `vocab`: `CHUNK_LOGITS_BYTES` of f32 logits, at least 1.
pub fn default_chunk_rows(vocab: usize) -> usize {
    (CHUNK_LOGITS_BYTES / vocab.max(1).saturating_mul(std::mem::size_of::<f32>())).max(1)
}

/// `distill_loss_fused(hidden @ weight^T, teacher, ...)` without materialising the
/// (N, V) logits; same arguments and result (values equal up to f32 summation order,
/// tested) plus the head.
///
/// hidden (N, H) or (..., H) with N rows in all; weight (V, H); targets and mask with
/// N elements (u32 and f32). `chunk_rows`: rows per chunk, `None` for
/// `default_chunk_rows(V)`. The teacher gets no gradient. `LossParts::total` backpropagates
/// into `hidden` and `weight` (through whatever graph produced them); `ce` and `kd` are
/// the per-token terms over all N rows, as `distill_loss_fused` reports them.
#[allow(clippy::too_many_arguments)]
pub fn fused_linear_distill_loss(
    hidden: &Tensor,
    weight: &Tensor,
    teacher: Option<Teacher>,
    targets: &Tensor,
    mask: &Tensor,
    spec: &LossSpec,
    denom: f64,
    chunk_rows: Option<usize>,
) -> Result<LossParts> {
    let s = Settings { spec: *spec, denom };
    let (n, h, v) = check_shapes(hidden, weight, teacher, targets, mask)?;
    let chunk = match chunk_rows {
        None => default_chunk_rows(v),
        Some(0) => {
            return Err(Error::Invalid(
                "fused head loss: chunk_rows must be at least 1 (or None for the default)".into(),
            ))
        }
        Some(c) => c,
    };
    let hidden_rows = hidden.reshape((n, h))?; // (N, H), still in the graph

    // Only what the caller can differentiate is worth computing.
    let want_dx = hidden.track_op();
    let want_dw = weight.track_op();

    let x = hidden_rows.detach().to_dtype(DType::F32)?; // (N, H)
    let w = weight.detach().to_dtype(DType::F32)?.contiguous()?; // (V, H)
    let targets = targets.flatten_all()?; // (N,)
    let mask = mask.flatten_all()?.to_dtype(DType::F32)?; // (N,)
    let teacher = ChunkTeacher::new(teacher, n, v)?;

    let device = hidden.device();
    let mut dw = if want_dw {
        Some(Tensor::zeros((v, h), DType::F32, device)?) // (V, H)
    } else {
        None
    };
    let mut dx_chunks = Vec::with_capacity(if want_dx { n.div_ceil(chunk) } else { 0 }); // each (C, H)
    let (mut total, mut ce, mut kd) = (0f64, 0f64, 0f64);
    // On the CPU each chunk's loss and its gradient come from one pass over the chunk's
    // logits (`distill_loss_and_grad`), with no autograd graph; elsewhere from the loss
    // ops and a backward of the chunk.
    let one_pass = device.is_cpu();
    for start in (0..n).step_by(chunk) {
        let c = chunk.min(n - start);
        let x_c = x.narrow(0, start, c)?; // (C, H)
        let logits = x_c.matmul(&w.t()?)?; // (C, V)
        let teacher_c = teacher.rows(start, c)?; // (C, V) or None
        let (targets_c, mask_c) = (targets.narrow(0, start, c)?, mask.narrow(0, start, c)?);
        let g = if one_pass {
            let teacher_c = match teacher_c {
                Some(TeacherChunk::Logits(t)) => Some(TeacherChunk::Logits(t.to_dtype(DType::F32)?)),
                other => other,
            };
            let (vals, g) = distill_loss_and_grad(
                &logits,
                teacher_c.as_ref().map(TeacherChunk::targets),
                Some(&targets_c),
                &mask_c,
                &s.spec,
                s.denom,
            )
            .map_err(|e| {
                Error::Invalid(format!(
                    "fused head loss, the chunk of rows {start}.. (its rows count from 0): {e}"
                ))
            })?;
            total += f64::from(vals.total);
            ce += f64::from(vals.ce);
            kd += f64::from(vals.kd);
            g // (C, V)
        } else {
            // A fresh `Var` cuts the chunk's graph at the logits: its backward stops there
            // and GradStore keeps exactly the (C, V) gradient this loop needs.
            let logits = if want_dx || want_dw {
                Var::from_tensor(&logits)?.into_inner()
            } else {
                logits
            };
            let teacher_t = teacher_c.as_ref().map(TeacherChunk::targets);
            let parts = loss_on_logits(&logits, teacher_t, &targets_c, &mask_c, &s)?;
            total += f64::from(parts.total.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            ce += f64::from(parts.ce);
            kd += f64::from(parts.kd);
            if !(want_dx || want_dw) {
                continue;
            }
            match parts.total.backward()?.get(&logits) {
                Some(g) => g.to_dtype(DType::F32)?, // (C, V)
                None => Tensor::zeros((c, v), DType::F32, device)?,
            }
        };
        if !(want_dx || want_dw) {
            continue;
        }
        if want_dx {
            dx_chunks.push(g.matmul(&w)?); // (C, H)
        }
        if let Some(acc) = dw.take() {
            dw = Some(add_matmul(acc, &g.t()?, &x_c)?); // (V, H)
        }
    }

    let dx = if !want_dx {
        None
    } else if dx_chunks.is_empty() {
        Some(Tensor::zeros((n, h), DType::F32, device)?)
    } else {
        Some(Tensor::cat(&dx_chunks, 0)?) // (N, H)
    };
    drop(dx_chunks);
    let value = Tensor::new(total as f32, device)?; // scalar
    let op = HeadLoss { dx, dw };
    let total = hidden_rows.apply_op3(weight, &value, op)?; // scalar
    Ok(LossParts {
        total,
        ce: ce as f32,
        kd: kd as f32,
    })
}

/// The unfused composition `fused_linear_distill_loss` replaces: the whole (N, V) logits
/// (and for a `Hidden` teacher its (N, V) logits) and `distill_loss_fused` on them, with
/// ordinary autograd. Same arguments, without the chunk size. The parity reference for
/// the tests and the baseline of `examples/fused_head_mem.rs`.
pub fn plain_linear_distill_loss(
    hidden: &Tensor,
    weight: &Tensor,
    teacher: Option<Teacher>,
    targets: &Tensor,
    mask: &Tensor,
    spec: &LossSpec,
    denom: f64,
) -> Result<LossParts> {
    let s = Settings { spec: *spec, denom };
    let (n, h, v) = check_shapes(hidden, weight, teacher, targets, mask)?;
    let x = hidden.reshape((n, h))?.to_dtype(DType::F32)?; // (N, H)
    let logits = x.matmul(&weight.to_dtype(DType::F32)?.t()?)?; // (N, V)
    let teacher = ChunkTeacher::new(teacher, n, v)?.rows(0, n)?; // (N, V) or None
    let targets = targets.flatten_all()?; // (N,)
    let mask = mask.flatten_all()?.to_dtype(DType::F32)?; // (N,)
    loss_on_logits(
        &logits,
        teacher.as_ref().map(TeacherChunk::targets),
        &targets,
        &mask,
        &s,
    )
}

/// The loss's scalar settings, passed down unchanged to every chunk.
struct Settings {
    spec: LossSpec,
    denom: f64,
}

/// The one place that calls the logits-level loss (so that a change of its teacher
/// argument touches one line): student (C, V), teacher (C, V) or None, targets (C,),
/// mask (C,), with the global `denom`.
fn loss_on_logits(
    student: &Tensor,
    teacher: Option<Teacher>,
    targets: &Tensor,
    mask: &Tensor,
    s: &Settings,
) -> Result<LossParts> {
    distill_loss_with(student, teacher, targets, mask, &s.spec, s.denom)
}

/// Checks every shape up front, so that errors name the argument rather than a matmul
/// deep in the loop. Returns (N, H, V).
fn check_shapes(
    hidden: &Tensor,
    weight: &Tensor,
    teacher: Option<Teacher>,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<(usize, usize, usize)> {
    let bad = |msg: String| Err(Error::Invalid(format!("fused head loss: {msg}")));
    let (v, h) = match weight.dims() {
        &[v, h] if v > 0 => (v, h),
        d => return bad(format!("the head weight must be (V, H) with V > 0, got {d:?}")),
    };
    let n = match hidden.dims().split_last() {
        Some((&hh, lead)) if hidden.rank() >= 2 && hh == h => lead.iter().product::<usize>(),
        _ => {
            return bad(format!(
                "hidden states {:?} must be (N, H) or (..., H) with H = {h} (the head weight is {:?})",
                hidden.dims(),
                weight.dims()
            ))
        }
    };
    for (what, t) in [("targets", targets), ("mask", mask)] {
        if t.elem_count() != n {
            return bad(format!(
                "{what} {:?} must have one element per row of the hidden states ({n} rows)",
                t.dims()
            ));
        }
    }
    match teacher {
        None => {}
        Some(Teacher::Logits(l)) if l.dims().last() != Some(&v) || l.elem_count() != n * v => {
            return bad(format!(
                "teacher logits {:?} must be ({n}, {v}): one row per hidden row, vocabulary of the head",
                l.dims()
            ));
        }
        Some(Teacher::TopK(top))
            if top.indices.dims() != [n, top.k()] || top.log_probs.dims() != [n, top.k()] || top.k() > v =>
        {
            return bad(format!(
                "top-k teacher {:?} / {:?} must be ({n}, k) with k <= {v}",
                top.indices.dims(),
                top.log_probs.dims()
            ));
        }
        Some(Teacher::Logits(_) | Teacher::TopK(_)) => {}
        Some(Teacher::Hidden { hidden: th, weight: tw }) => {
            let ht = match tw.dims() {
                &[tv, ht] if tv == v => ht,
                d => return bad(format!("the teacher head weight must be ({v}, Ht), got {d:?}")),
            };
            if th.rank() < 2 || th.dims().last() != Some(&ht) || th.elem_count() != n * ht {
                return bad(format!(
                    "teacher hidden states {:?} must be ({n}, {ht}) to match the student's rows and the teacher head",
                    th.dims()
                ));
            }
        }
    }
    Ok((n, h, v))
}

/// The teacher, detached and flattened to rows, able to produce the logits of a chunk.
enum ChunkTeacher {
    None,
    Logits(Tensor),                            // (N, V)
    Hidden { hidden: Tensor, weight: Tensor }, // (N, Ht), (V, Ht) f32
    TopK(TopK),                                // (N, k) each
}

/// The teacher side of one chunk.
enum TeacherChunk {
    Logits(Tensor), // (C, V)
    TopK(TopK),     // (C, k)
}

impl TeacherChunk {
    fn targets(&self) -> Teacher<'_> {
        match self {
            Self::Logits(t) => Teacher::Logits(t),
            Self::TopK(t) => Teacher::TopK(t),
        }
    }
}

impl ChunkTeacher {
    fn new(teacher: Option<Teacher>, n: usize, v: usize) -> Result<Self> {
        Ok(match teacher {
            None => Self::None,
            Some(Teacher::Logits(l)) => Self::Logits(l.detach().reshape((n, v))?),
            Some(Teacher::TopK(top)) => Self::TopK(top.clone()),
            Some(Teacher::Hidden { hidden, weight }) => {
                let ht = weight.dim(1)?;
                Self::Hidden {
                    hidden: hidden.detach().reshape((n, ht))?,
                    weight: weight.detach().to_dtype(DType::F32)?.contiguous()?,
                }
            }
        })
    }

    /// The teacher for rows `start..start + c`: logits (C, V) or top-k (C, k), or None
    /// without a teacher.
    fn rows(&self, start: usize, c: usize) -> Result<Option<TeacherChunk>> {
        Ok(match self {
            Self::None => None,
            Self::Logits(l) => Some(TeacherChunk::Logits(l.narrow(0, start, c)?)),
            Self::Hidden { hidden, weight } => {
                let x = hidden.narrow(0, start, c)?.to_dtype(DType::F32)?; // (C, Ht)
                Some(TeacherChunk::Logits(x.matmul(&weight.t()?)?)) // (C, V)
            }
            Self::TopK(top) => Some(TeacherChunk::TopK(TopK {
                indices: top.indices.narrow(0, start, c)?,
                log_probs: top.log_probs.narrow(0, start, c)?,
            })),
        })
    }
}

/// acc (M, N) += a (M, K) @ b (K, N), all f32. On the CPU this writes into `acc`'s own
/// buffer (gemm with beta = 1), so accumulating dW over the chunks allocates nothing;
/// elsewhere it falls back to `acc + a @ b`.
fn add_matmul(acc: Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if acc.device().is_cpu() {
        acc.inplace_op3(a, b, &AddMatmul)?;
        Ok(acc)
    } else {
        Ok((acc + a.matmul(b)?)?)
    }
}

/// dst (M, N) += a (M, K) @ b (K, N) in place, f32, any 2-D strides.
struct AddMatmul;

impl InplaceOp3 for AddMatmul {
    fn name(&self) -> &'static str {
        "distill-add-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(dst), CpuStorage::F32(a), CpuStorage::F32(b)) = (s1, s2, s3) else {
            return Err(candle_core::Error::Msg(format!("{}: all operands must be f32", self.name())).bt());
        };
        let (&[m, n], &[am, k], &[bk, bn]) = (l1.dims(), l2.dims(), l3.dims()) else {
            return Err(candle_core::Error::Msg(format!("{}: operands must be 2-D", self.name())).bt());
        };
        if am != m || bk != k || bn != n {
            return Err(candle_core::Error::Msg(format!(
                "{}: ({m}, {n}) += ({am}, {k}) @ ({bk}, {bn}) does not fit",
                self.name()
            ))
            .bt());
        }
        if m == 0 || n == 0 || k == 0 {
            return Ok(()); // nothing to add
        }
        let (d_st, a_st, b_st) = (l1.stride(), l2.stride(), l3.stride());
        let from = |len: usize, l: &Layout, what: &str| {
            if l.start_offset() <= len {
                Ok(l.start_offset())
            } else {
                Err(candle_core::Error::Msg(format!("{}: {what} layout starts past its buffer", self.name())).bt())
            }
        };
        let (d0, a0, b0) = (
            from(dst.len(), l1, "dst")?,
            from(a.len(), l2, "a")?,
            from(b.len(), l3, "b")?,
        );
        // The operands from their layouts' start; gemm_f32 checks that the strides stay
        // inside them.
        crate::kernels::ops::gemm_f32(
            (m, n, k),
            &mut dst[d0..],
            (d_st[0], d_st[1]),
            &a[a0..],
            (a_st[0], a_st[1]),
            &b[b0..],
            (b_st[0], b_st[1]),
            true,
        )
    }
}

/// (hidden (N, H), weight (V, H), value ()) -> the loss value (); backward hands out the
/// gradients computed chunk by chunk, scaled by the incoming gradient. `value` is an
/// argument rather than a field so that the forward is a plain copy on any device.
struct HeadLoss {
    dx: Option<Tensor>, // (N, H) f32, None when hidden tracks no gradient
    dw: Option<Tensor>, // (V, H) f32, None when weight tracks no gradient
}

impl CustomOp3 for HeadLoss {
    fn name(&self) -> &'static str {
        "distill-fused-head-loss"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        value: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match value {
            CpuStorage::F32(v) => Ok((CpuStorage::F32(vec![v[l.start_offset()]]), Shape::from(()))),
            other => Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), self.name()).bt()),
        }
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        value: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        // `value` is a fresh one-element tensor, so a clone of its storage is the scalar.
        Ok((value.try_clone(l)?, Shape::from(())))
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        value: &MetalStorage,
        l: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Ok((value.try_clone(l)?, Shape::from(())))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _value: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // `loss.backward()` seeds 1: then the stored gradients go out as they are, without
        // another (V, H) product.
        let grad = grad_res.to_dtype(DType::F32)?; // scalar
        let unit = grad.to_scalar::<f32>()? == 1.0;
        let scaled = |g: &Option<Tensor>, like: &Tensor| -> candle_core::Result<Option<Tensor>> {
            match g {
                Some(g) if like.track_op() => {
                    let g = if unit { g.clone() } else { g.broadcast_mul(&grad)? };
                    Ok(Some(g.to_dtype(like.dtype())?))
                }
                _ => Ok(None),
            }
        };
        Ok((scaled(&self.dx, hidden)?, scaled(&self.dw, weight)?, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::Divergence;
    use candle_core::{Device, D};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const DIVERGENCES: [Divergence; 4] = [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.5 },
        Divergence::Tvd,
    ];
    const ALPHAS: [f64; 3] = [0.0, 0.5, 1.0];
    // N = 9 below: 3 divides it, 4 does not, 16 is more than N.
    const CHUNKS: [Option<usize>; 6] = [Some(1), Some(3), Some(4), Some(9), Some(16), None];

    fn randn(rng: &mut ChaCha8Rng, shape: (usize, usize), std: f32) -> Tensor {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                // Sum of uniforms: close enough to normal for test inputs.
                let u: f32 = (0..4).map(|_| rng.random::<f32>() - 0.5).sum();
                u * std * 1.7
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    struct Case {
        hidden: Var,        // (N, H)
        weight: Var,        // (V, H)
        t_hidden: Var,      // (N, Ht): a Var, to check that the teacher gets no gradient
        t_weight: Var,      // (V, Ht)
        t_logits: Tensor,   // (N, V) = t_hidden @ t_weight^T
        t_top: TopK,        // the teacher's top 4 tokens per row
        targets: Tensor,    // (N,)
        masks: [Tensor; 3], // all ones, partial, all zeros
        denoms: [f64; 3],
    }

    fn case(seed: u64) -> Case {
        let (n, h, v, ht) = (9, 5, 11, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let hidden = Var::from_tensor(&randn(&mut rng, (n, h), 1.0)).unwrap();
        let weight = Var::from_tensor(&randn(&mut rng, (v, h), 0.8)).unwrap();
        let t_hidden = Var::from_tensor(&randn(&mut rng, (n, ht), 1.0)).unwrap();
        let t_weight = Var::from_tensor(&randn(&mut rng, (v, ht), 1.2)).unwrap();
        let t_logits = t_hidden.as_tensor().matmul(&t_weight.as_tensor().t().unwrap()).unwrap();
        let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let targets = Tensor::new(targets, &Device::Cpu).unwrap();
        let partial = [1f32, 0., 1., 1., 0., 0., 1., 0., 1.];
        let masks = [
            Tensor::ones(n, DType::F32, &Device::Cpu).unwrap(),
            Tensor::new(&partial, &Device::Cpu).unwrap(),
            Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap(),
        ];
        Case {
            hidden,
            weight,
            t_hidden,
            t_weight,
            t_top: crate::loss::topk::top_k_of_logits(&t_logits, 4, 1.0).unwrap(),
            t_logits: t_logits.detach(),
            targets,
            masks,
            // The partial mask's 5 valid rows over a larger step-wide count (accumulation).
            denoms: [n as f64, 7.0, 0.0],
        }
    }

    fn teacher_of(c: &Case, kind: usize) -> Option<Teacher<'_>> {
        match kind {
            0 => None,
            1 => Some(Teacher::Logits(&c.t_logits)),
            3 => Some(Teacher::TopK(&c.t_top)),
            _ => Some(Teacher::Hidden {
                hidden: c.t_hidden.as_tensor(),
                weight: c.t_weight.as_tensor(),
            }),
        }
    }

    fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
        assert_eq!(got.dims(), want.dims(), "{what}: shapes");
        let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            let tol = 1e-5 * b.abs().max(a.abs()) + 1e-6;
            assert!((a - b).abs() <= tol, "{what}[{i}]: fused {a} vs plain {b}");
        }
    }

    fn assert_close_f32(what: &str, a: f32, b: f32) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(a.abs()) + 1e-6,
            "{what}: fused {a} vs plain {b}"
        );
    }

    /// Loss, terms and both gradients of the fused head equal the unfused composition.
    fn check_parity(teacher_kind: usize, divergences: &[Divergence]) {
        let c = case(7 + teacher_kind as u64);
        let (x, w) = (c.hidden.as_tensor(), c.weight.as_tensor());
        let mut checked = 0;
        for &d in divergences {
            for &alpha in &ALPHAS {
                for (mask, &denom) in c.masks.iter().zip(&c.denoms) {
                    for &temp in &[2.0, 0.7] {
                        let teacher = teacher_of(&c, teacher_kind);
                        let plain = plain_linear_distill_loss(
                            x,
                            w,
                            teacher,
                            &c.targets,
                            mask,
                            &LossSpec::new(alpha, temp, d),
                            denom,
                        )
                        .unwrap();
                        let pg = plain.total.backward().unwrap();
                        for &chunk in &CHUNKS {
                            let ctx = format!(
                                "teacher {teacher_kind} {d:?} alpha {alpha} T {temp} denom {denom} chunk {chunk:?}"
                            );
                            let fused = fused_linear_distill_loss(
                                x,
                                w,
                                teacher,
                                &c.targets,
                                mask,
                                &LossSpec::new(alpha, temp, d),
                                denom,
                                chunk,
                            )
                            .unwrap();
                            assert_close_f32(
                                &format!("{ctx}: total"),
                                fused.total.to_scalar::<f32>().unwrap(),
                                plain.total.to_scalar::<f32>().unwrap(),
                            );
                            assert_close_f32(&format!("{ctx}: ce"), fused.ce, plain.ce);
                            assert_close_f32(&format!("{ctx}: kd"), fused.kd, plain.kd);
                            let fg = fused.total.backward().unwrap();
                            for (name, var) in [("d hidden", x), ("d weight", w)] {
                                assert_close(&format!("{ctx}: {name}"), fg.get(var).unwrap(), pg.get(var).unwrap());
                            }
                            assert!(
                                fg.get(c.t_hidden.as_tensor()).is_none(),
                                "{ctx}: teacher got a gradient"
                            );
                            assert!(
                                fg.get(c.t_weight.as_tensor()).is_none(),
                                "{ctx}: teacher got a gradient"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, divergences.len() * ALPHAS.len() * 3 * 2 * CHUNKS.len());
    }

    #[test]
    fn matches_unfused_without_teacher() {
        check_parity(0, &[Divergence::ForwardKl]);
    }

    #[test]
    fn matches_unfused_with_teacher_logits() {
        check_parity(1, &DIVERGENCES);
    }

    #[test]
    fn matches_unfused_with_teacher_hidden_states() {
        check_parity(2, &DIVERGENCES);
    }

    #[test]
    fn matches_unfused_with_a_top_k_teacher() {
        check_parity(3, &DIVERGENCES);
    }

    #[test]
    fn fully_masked_step_gives_zero_loss_and_gradients() {
        let c = case(3);
        let t = teacher_of(&c, 2);
        let (x, w) = (c.hidden.as_tensor(), c.weight.as_tensor());
        let l = fused_linear_distill_loss(
            x,
            w,
            t,
            &c.targets,
            &c.masks[2],
            &LossSpec::new(0.5, 2.0, Divergence::ForwardKl),
            0.0,
            Some(4),
        )
        .unwrap();
        assert_eq!(l.total.to_scalar::<f32>().unwrap(), 0.0);
        let g = l.total.backward().unwrap();
        for var in [x, w] {
            let m = g
                .get(var)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(m, 0.0);
        }
    }

    /// The incoming gradient is not always 1 (loss scaling, a weighted sum of losses).
    #[test]
    fn scales_gradients_by_the_incoming_gradient() {
        let c = case(5);
        let (x, w) = (c.hidden.as_tensor(), c.weight.as_tensor());
        let run = |f: bool| {
            let t = teacher_of(&c, 1);
            let l = if f {
                fused_linear_distill_loss(
                    x,
                    w,
                    t,
                    &c.targets,
                    &c.masks[1],
                    &LossSpec::new(0.3, 1.5, Divergence::Tvd),
                    5.0,
                    Some(2),
                )
            } else {
                plain_linear_distill_loss(
                    x,
                    w,
                    t,
                    &c.targets,
                    &c.masks[1],
                    &LossSpec::new(0.3, 1.5, Divergence::Tvd),
                    5.0,
                )
            }
            .unwrap();
            (l.total * -2.5).unwrap().backward().unwrap()
        };
        let (fg, pg) = (run(true), run(false));
        for var in [x, w] {
            assert_close("scaled grad", fg.get(var).unwrap(), pg.get(var).unwrap());
        }
    }

    /// Batched hidden states (B, T, H) with (B, T) targets and mask: the gradient comes back
    /// in the caller's shape.
    #[test]
    fn accepts_leading_dimensions() {
        let c = case(11);
        let x3 = Var::from_tensor(&c.hidden.as_tensor().reshape((3, 3, 5)).unwrap()).unwrap();
        let w = c.weight.as_tensor();
        let t = c.t_logits.reshape((3, 3, 11)).unwrap();
        let targets = c.targets.reshape((3, 3)).unwrap();
        let mask = c.masks[1].reshape((3, 3)).unwrap();
        let args = (
            Some(Teacher::Logits(&t)),
            &targets,
            &mask,
            0.5,
            2.0,
            5.0,
            Divergence::ReverseKl,
        );
        let f = fused_linear_distill_loss(
            x3.as_tensor(),
            w,
            args.0,
            args.1,
            args.2,
            &LossSpec::new(args.3, args.4, args.6),
            args.5,
            Some(2),
        )
        .unwrap();
        let p = plain_linear_distill_loss(
            x3.as_tensor(),
            w,
            args.0,
            args.1,
            args.2,
            &LossSpec::new(args.3, args.4, args.6),
            args.5,
        )
        .unwrap();
        let (fg, pg) = (f.total.backward().unwrap(), p.total.backward().unwrap());
        assert_eq!(fg.get(x3.as_tensor()).unwrap().dims(), &[3, 3, 5]);
        for var in [x3.as_tensor(), w] {
            assert_close("batched grad", fg.get(var).unwrap(), pg.get(var).unwrap());
        }
    }

    /// Without anything to differentiate, no backward runs and the value is unchanged.
    #[test]
    fn inputs_without_gradient_give_the_same_value() {
        let c = case(13);
        let (x, w) = (c.hidden.as_tensor().detach(), c.weight.as_tensor().detach());
        let t = teacher_of(&c, 2);
        let d = Divergence::Jsd { beta: 0.3 };
        let f = fused_linear_distill_loss(
            &x,
            &w,
            t,
            &c.targets,
            &c.masks[0],
            &LossSpec::new(0.4, 2.0, d),
            9.0,
            Some(4),
        )
        .unwrap();
        let p =
            plain_linear_distill_loss(&x, &w, t, &c.targets, &c.masks[0], &LossSpec::new(0.4, 2.0, d), 9.0).unwrap();
        assert_close_f32(
            "total",
            f.total.to_scalar::<f32>().unwrap(),
            p.total.to_scalar::<f32>().unwrap(),
        );
        assert!(!f.total.track_op());
    }

    /// A tied head: the weight is also the embedding table that produced the hidden
    /// states, so its gradient is the sum of the lookup's share and the head's share.
    #[test]
    fn tied_weight_gets_both_gradients() {
        let (n, h, v) = (10, 6, 13);
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let emb = Var::from_tensor(&randn(&mut rng, (v, h), 1.0)).unwrap(); // (V, H)
        let mix = Var::from_tensor(&randn(&mut rng, (h, h), 0.5)).unwrap(); // (H, H)
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        let ids = Tensor::new(ids, &Device::Cpu).unwrap();
        let targets = ids.narrow(0, 1, n - 1).unwrap().pad_with_zeros(0, 0, 1).unwrap();
        let teacher = randn(&mut rng, (n, v), 2.0);
        let mask = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        let grads = |fused: bool| {
            let e = emb.as_tensor();
            let x = e
                .index_select(&ids, 0)
                .unwrap()
                .matmul(mix.as_tensor())
                .unwrap()
                .tanh()
                .unwrap(); // (N, H)
            let t = Some(Teacher::Logits(&teacher));
            let l = if fused {
                fused_linear_distill_loss(
                    &x,
                    e,
                    t,
                    &targets,
                    &mask,
                    &LossSpec::new(0.5, 2.0, Divergence::ForwardKl),
                    n as f64,
                    Some(3),
                )
            } else {
                plain_linear_distill_loss(
                    &x,
                    e,
                    t,
                    &targets,
                    &mask,
                    &LossSpec::new(0.5, 2.0, Divergence::ForwardKl),
                    n as f64,
                )
            }
            .unwrap();
            l.total.backward().unwrap()
        };
        let (fg, pg) = (grads(true), grads(false));
        for (name, var) in [("embedding", emb.as_tensor()), ("mix", mix.as_tensor())] {
            assert_close(name, fg.get(var).unwrap(), pg.get(var).unwrap());
        }
        // The head's share is really there: without it the embedding gradient differs.
        let lookup_only = {
            let x = emb
                .as_tensor()
                .index_select(&ids, 0)
                .unwrap()
                .matmul(mix.as_tensor())
                .unwrap()
                .tanh()
                .unwrap();
            let t = Some(Teacher::Logits(&teacher));
            let l = fused_linear_distill_loss(
                &x,
                &emb.as_tensor().detach(),
                t,
                &targets,
                &mask,
                &LossSpec::new(0.5, 2.0, Divergence::ForwardKl),
                n as f64,
                Some(3),
            )
            .unwrap();
            l.total.backward().unwrap().get(emb.as_tensor()).unwrap().clone()
        };
        let diff = (lookup_only - pg.get(emb.as_tensor()).unwrap()).unwrap();
        assert!(diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-4);
    }

    /// The model's split (`forward_hidden`, `lm_head_weight`) with the fused head gives every
    /// parameter of a tied Llama the gradient that `forward` and the logits-level loss give.
    #[test]
    fn llama_tied_head_matches_forward() {
        use crate::model::{Llama, ModelConfig};
        let cfg = ModelConfig {
            vocab_size: 17,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 16,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: 1,
            eos_token_id: 2,
            pad_token_id: 0,
        };
        let model = Llama::init(cfg, 0.3, 5, &Device::Cpu).unwrap();
        let (b, t, v) = (2, 5, 17);
        let ids = Tensor::new(&[[3u32, 4, 5, 6, 7], [8, 9, 10, 11, 12]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[4u32, 5, 6, 7, 0], [9, 10, 11, 12, 0]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1., 1., 0.], [1., 1., 1., 1., 0.]], &Device::Cpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let teacher = randn(&mut rng, (b * t, v), 1.5);
        let d = Divergence::ReverseKl;

        let logits = model.forward(&ids).unwrap().reshape((b * t, v)).unwrap(); // (B*T, V)
        let plain = crate::loss::distill_loss_fused(
            &logits,
            Some(&teacher),
            &targets.flatten_all().unwrap(),
            &mask.flatten_all().unwrap(),
            &LossSpec::new(0.5, 2.0, d),
            8.0,
        )
        .unwrap();
        let pg = plain.total.backward().unwrap();

        let hidden = model.forward_hidden(&ids).unwrap(); // (B, T, H)
        assert_eq!(hidden.dims(), &[b, t, 8]);
        let head = model.lm_head_weight().unwrap();
        assert_eq!(head.id(), model.params()["model.embed_tokens.weight"].as_tensor().id());
        let fused = fused_linear_distill_loss(
            &hidden,
            &head,
            Some(Teacher::Logits(&teacher)),
            &targets,
            &mask,
            &LossSpec::new(0.5, 2.0, d),
            8.0,
            Some(3),
        )
        .unwrap();
        assert_close_f32(
            "total",
            fused.total.to_scalar::<f32>().unwrap(),
            plain.total.to_scalar::<f32>().unwrap(),
        );
        let fg = fused.total.backward().unwrap();
        for (name, var) in model.params() {
            let (f, p) = (fg.get(var.as_tensor()), pg.get(var.as_tensor()));
            assert!(p.is_some(), "{name}: no gradient in the unfused run");
            assert_close(name, f.unwrap(), p.unwrap());
        }
        // Logits from the split equal `forward`'s exactly: the same ops in the same order.
        let again = hidden
            .broadcast_matmul(&head.t().unwrap())
            .unwrap()
            .reshape((b * t, v))
            .unwrap();
        let max = (again - &logits)
            .unwrap()
            .abs()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .max_all()
            .unwrap();
        assert!(max.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn rejects_bad_shapes_and_chunks() {
        let c = case(19);
        let (x, w) = (c.hidden.as_tensor(), c.weight.as_tensor());
        let m = &c.masks[0];
        let d = Divergence::ForwardKl;
        let call = |x: &Tensor, w: &Tensor, t: Option<Teacher>, targets: &Tensor, chunk| {
            fused_linear_distill_loss(x, w, t, targets, m, &LossSpec::new(0.5, 2.0, d), 9.0, chunk)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(call(x, w, None, &c.targets, Some(0)).contains("chunk_rows"));
        assert!(call(x, &w.t().unwrap(), None, &c.targets, None).contains("hidden states"));
        let short = c.targets.narrow(0, 0, 4).unwrap();
        assert!(call(x, w, None, &short, None).contains("targets"));
        let tl = c.t_logits.narrow(1, 0, 10).unwrap();
        assert!(call(x, w, Some(Teacher::Logits(&tl)), &c.targets, None).contains("teacher logits"));
        let tw = c.t_weight.as_tensor().narrow(0, 0, 10).unwrap();
        let th = c.t_hidden.as_tensor();
        let t = Some(Teacher::Hidden {
            hidden: th,
            weight: &tw,
        });
        assert!(call(x, w, t, &c.targets, None).contains("teacher head weight"));
    }

    #[test]
    fn default_chunk_holds_about_16_mib_of_logits() {
        assert_eq!(default_chunk_rows(49_152), 85);
        assert_eq!(default_chunk_rows(8_192), 512);
        assert_eq!(default_chunk_rows(usize::MAX / 2), 1);
        assert_eq!(default_chunk_rows(0), CHUNK_LOGITS_BYTES / 4);
    }

    #[test]
    fn add_matmul_accumulates_in_place_with_strides() {
        let mut rng = ChaCha8Rng::seed_from_u64(29);
        let acc = randn(&mut rng, (4, 3), 1.0);
        let before = acc.copy().unwrap();
        let a_t = randn(&mut rng, (5, 4), 1.0); // used transposed: a (4, 5)
        let b = randn(&mut rng, (6, 3), 1.0).narrow(0, 1, 5).unwrap(); // (5, 3), offset view
        let want = (&before + a_t.t().unwrap().matmul(&b).unwrap()).unwrap();
        let got = add_matmul(acc.clone(), &a_t.t().unwrap(), &b).unwrap();
        assert_close("add_matmul", &got, &want);
        assert_close("add_matmul in place", &acc, &want);
    }
}
