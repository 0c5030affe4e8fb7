//! One training step's micro-batch: the teacher's output, the student's loss and the
//! gradient of every parameter. The backward path is chosen here, in one place:
//!
//! - **one pass** (`one_pass`), the fused CPU f32 path: the taped body forward, the head
//!   as gemms, the loss and its gradient in one pass over the logits (chunk by chunk for
//!   the fused head), and the hand-written backward. No autograd graph at all.
//! - **graph** (`Forward`): anywhere else (CUDA, bf16/f16, `--kernels plain`, the
//!   reference loss), the loss goes on candle's graph and candle's backward runs (from
//!   the tape's leaf on the fused path, through the whole model elsewhere).

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use super::rollout::StepBatch;
use super::{LossImpl, StageStats, TeacherSource};
use crate::error::{Error, Result};
use crate::kernels::cpu::with_cpu_f32;
use crate::kernels::ops::{gemm_f32, linear_fwd};
use crate::loss::full::{distill_loss_with, loss_and_grad_slices, LossValues, SliceTeacher};
use crate::loss::head::{default_chunk_rows, fused_linear_distill_loss};
use crate::loss::policy::policy_loss;
use crate::loss::{distill_loss, top_k_of_logits, LossParts, LossSpec, Teacher, TopK};
use crate::model::tape::{Tape, Weights};
use crate::model::Llama;
use crate::prepare::data::batch::Batch;

/// One micro-batch's loss terms (summed over its tokens, divided by the step's valid
/// tokens) and its gradients, or what to take them from.
pub(crate) struct Micro {
    pub(crate) total: f32,
    pub(crate) ce: f32,
    pub(crate) kd: f32,
    pub(crate) grads: MicroGrads,
}

/// The loss of one micro-batch (the examples `idx` of the training set, or samples of
/// the model with what the policy loss needs) and how to get its gradients. `denom` is
/// the step's count of valid tokens on every rank.
pub(crate) fn micro_batch(
    model: &Llama,
    sb: &StepBatch,
    teacher: Option<&TeacherSource>,
    spec: &LossSpec,
    loss_impl: LossImpl,
    denom: f64,
    stats: &mut StageStats,
) -> Result<Micro> {
    let (b, idx) = (&sb.batch, sb.idx.as_slice());
    if let Some((targets, policy)) = &sb.policy {
        // The policy-gradient loss, on candle's graph (through the tape's leaf on the fused path).
        let fwd = Forward::run(model, &b.inputs, false)?;
        let parts = policy_loss(&fwd.out, &b.targets, &b.mask, targets, policy, denom)?;
        return Ok(Micro {
            total: parts.total.to_scalar::<f32>()?,
            ce: parts.surrogate,
            kd: parts.kl,
            grads: MicroGrads::Graph(fwd, parts.total),
        });
    }
    let (_, t) = b.inputs.dims2()?;
    let head = loss_impl == LossImpl::FusedHead;
    let out = match teacher {
        Some(src) => Some(teacher_out(src, spec.temperature, (b, idx, t), head, stats)?),
        None => None,
    };
    let teacher = out.as_ref().map(TeacherOut::as_teacher);
    if matches!(loss_impl, LossImpl::Fused | LossImpl::FusedHead) && model.can_tape() {
        let chunk = head.then(|| default_chunk_rows(model.cfg.vocab_size));
        let (v, g) = one_pass(model, (&b.inputs, &b.targets, &b.mask), teacher, spec, denom, chunk)?;
        return Ok(Micro {
            total: v.total,
            ce: v.ce,
            kd: v.kd,
            grads: MicroGrads::Done(g),
        });
    }
    let fwd = Forward::run(model, &b.inputs, head)?;
    let parts = if head {
        // Hidden states and head weight in, the (B*T, V) logits never whole.
        let w = model.lm_head_weight()?;
        fused_linear_distill_loss(&fwd.out, &w, teacher, &b.targets, &b.mask, spec, denom, None)?
    } else {
        plain_loss(loss_impl, &fwd.out, teacher, b, spec, denom)? // on (B*T, V) logits
    };
    Ok(Micro {
        total: parts.total.to_scalar::<f32>()?,
        ce: parts.ce,
        kd: parts.kd,
        grads: MicroGrads::Graph(fwd, parts.total),
    })
}

/// A micro-batch's gradients: already computed (the one-pass path), or still to be
/// taken from candle's graph through the loss.
pub(crate) enum MicroGrads {
    Done(BTreeMap<String, Tensor>),
    Graph(Forward, Tensor),
}

impl MicroGrads {
    /// Every parameter's gradient (running candle's backward on the graph path).
    pub(crate) fn into_grads(self, model: &Llama) -> Result<BTreeMap<String, Tensor>> {
        match self {
            MicroGrads::Done(g) => Ok(g),
            MicroGrads::Graph(fwd, total) => fwd.grads(model, &total),
        }
    }
}

/// The student's forward for one micro-batch, up to what the loss takes: the final
/// hidden states (for the fused head) or the logits, on candle's autograd graph.
///
/// On the fused CPU f32 path the model body runs `Llama::forward_taped`: its output
/// becomes a leaf `Var`, only the head and the loss go on candle's graph, and
/// `grads` runs the body's hand-written backward (`model::tape`) from that leaf's
/// gradient. Elsewhere the whole forward is on the graph and candle's backward runs.
pub struct Forward {
    /// (B*T, d) hidden states with `head`, else (B*T, V) logits, f32.
    pub out: Tensor,
    taped: Option<(Tape, Var)>,
}

impl Forward {
    pub fn run(model: &Llama, ids: &Tensor, head: bool) -> Result<Self> {
        if model.can_tape() {
            let (hidden, tape) = model.forward_taped(ids)?; // (B, T, d)
            let leaf = Var::from_tensor(&hidden.flatten_to(1)?)?; // (B*T, d)
            let out = if head {
                leaf.as_tensor().clone()
            } else {
                model.head_logits(leaf.as_tensor())? // (B*T, V)
            };
            return Ok(Self {
                out,
                taped: Some((tape, leaf)),
            });
        }
        let out = if head {
            model.forward_hidden(ids)?.flatten_to(1)? // (B*T, d)
        } else {
            model.forward(ids)?.flatten_to(1)? // (B*T, V)
        };
        Ok(Self { out, taped: None })
    }

    /// The gradient of `loss` (a scalar computed from `out`, and from the model's head
    /// weight) for every parameter of `model`, zeros where the loss does not reach.
    pub fn grads(self, model: &Llama, loss: &Tensor) -> Result<BTreeMap<String, Tensor>> {
        let g = loss.backward()?;
        let mut body = match &self.taped {
            Some((tape, leaf)) => {
                let dh = match g.get(leaf.as_tensor()) {
                    Some(dh) => dh.clone(),
                    None => leaf.as_tensor().zeros_like()?,
                };
                tape.backward(model, &dh)?
            }
            None => BTreeMap::new(),
        };
        model
            .params()
            .iter()
            .map(|(name, var)| {
                // The head's gradient comes from candle's graph, the body's from the
                // tape; with tied embeddings the embedding matrix has both.
                let gi = match (g.get(var.as_tensor()), body.remove(name)) {
                    (Some(a), Some(b)) => (a + b)?,
                    (Some(a), None) => a.clone(),
                    (None, Some(b)) => b,
                    (None, None) => var.as_tensor().zeros_like()?,
                };
                Ok((name.clone(), gi))
            })
            .collect()
    }
}

/// The teacher's side of one micro-batch.
enum TeacherOut {
    Logits(Tensor),
    /// Final hidden states (B*T, Ht) and head weight (V, Ht), for the fused head, which
    /// computes the teacher's logits chunk by chunk too.
    Hidden(Tensor, Tensor),
    TopK(TopK),
}

impl TeacherOut {
    fn as_teacher(&self) -> Teacher<'_> {
        match self {
            TeacherOut::Logits(l) => Teacher::Logits(l),
            TeacherOut::Hidden(hidden, weight) => Teacher::Hidden { hidden, weight },
            TeacherOut::TopK(top) => Teacher::TopK(top),
        }
    }
}

/// The loss on whole (B*T, V) logits: the fused kernels, or the plain composition.
fn plain_loss(
    loss_impl: LossImpl,
    logits: &Tensor,
    teacher: Option<Teacher>,
    b: &Batch,
    spec: &LossSpec,
    denom: f64,
) -> Result<LossParts> {
    let (y, m) = (&b.targets, &b.mask);
    match (loss_impl, teacher) {
        (LossImpl::Reference, None) => distill_loss(logits, None, y, m, spec, denom),
        (LossImpl::Reference, Some(Teacher::Logits(tl))) => distill_loss(logits, Some(tl), y, m, spec, denom),
        (LossImpl::Reference, Some(_)) => Err(Error::Invalid(
            "the reference loss takes full teacher logits only; use the fused loss".into(),
        )),
        (_, teacher) => distill_loss_with(logits, teacher, y, m, spec, denom),
    }
}

/// Runs the teacher on a micro-batch (counting its FLOPs), or reads its rows from the
/// cache. `idx` are the batch's examples, `t` its padded length. With `head` (the fused
/// head) a full-distribution teacher gives its hidden states and head instead of logits.
fn teacher_out(
    source: &TeacherSource,
    temperature: f64,
    (b, idx, t): (&Batch, &[usize], usize),
    head: bool,
    stats: &mut StageStats,
) -> Result<TeacherOut> {
    match *source {
        TeacherSource::Online { model, top_k } => {
            let started = std::time::Instant::now();
            let out = if head && top_k.is_none() {
                let hidden = model.forward_hidden(&b.inputs)?.flatten_to(1)?.detach(); // (B*T, Ht)
                TeacherOut::Hidden(hidden, model.lm_head_weight()?.detach())
            } else {
                let logits = model.forward(&b.inputs)?.flatten_to(1)?.detach(); // (B*T, V)
                match top_k {
                    Some(k) => TeacherOut::TopK(top_k_of_logits(&logits, k, temperature)?),
                    None => TeacherOut::Logits(logits),
                }
            };
            stats.bill_scoring(model.cfg.forward_flops_per_token(t) * b.positions as f64, started);
            Ok(out)
        }
        TeacherSource::Cache(cache) => Ok(TeacherOut::TopK(cache.batch(idx, t, b.inputs.device())?)),
    }
}

/// One micro-batch with no autograd graph at all, on the fused CPU f32 path: the
/// taped body, the head as gemms, `loss::full::loss_and_grad_slices` on the logits
/// (the loss and its gradient in one pass), the head's two backward gemms and the
/// body's backward. Returns the loss values and every parameter's gradient; errors
/// unless `can_tape()`.
///
/// The loss and arguments are `distill_loss_with`'s, with the teacher as the fused
/// head takes it (`Teacher`: none, full logits, top-k, or its hidden states and
/// head). `chunk_rows: None` computes the whole (N, V) logits at once; `Some(c)` is
/// the fused head: c rows at a time, so that neither the student's nor a `Hidden`
/// teacher's (N, V) logits ever exist, and the head's weight gradient accumulates
/// chunk by chunk (gemm with beta = 1) into one (V, d) buffer.
pub fn one_pass(
    model: &Llama,
    (ids, targets, mask): (&Tensor, &Tensor, &Tensor),
    teacher: Option<Teacher<'_>>,
    spec: &LossSpec,
    denom: f64,
    chunk_rows: Option<usize>,
) -> Result<(LossValues, BTreeMap<String, Tensor>)> {
    let (hidden, tape) = model.forward_taped_slices(ids)?; // (N, d)
    let (n, d, v) = (tape.rows(), model.cfg.hidden_size, model.cfg.vocab_size);
    let head = model.head_name();
    let targets: Vec<u32> = targets.flatten_all()?.to_dtype(candle_core::DType::U32)?.to_vec1()?;
    let mask: Vec<f32> = mask.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    if targets.len() != n || mask.len() != n {
        return Err(Error::Shape(format!(
            "{} targets and {} mask entries for {n} tokens",
            targets.len(),
            mask.len()
        )));
    }
    let chunk = match chunk_rows {
        None => n.max(1),
        Some(0) => return Err(Error::Invalid("the fused head's chunk_rows must be at least 1".into())),
        Some(c) => c,
    };
    let f32_of = |t: &Tensor| t.to_dtype(candle_core::DType::F32);
    let w = Weights::of(model)?;
    let wh = w.get(head)?; // (V, d)
    let head_loss = HeadLoss {
        hidden: &hidden,
        wh,
        targets: &targets,
        mask: &mask,
        dims: (n, d, v),
        chunk,
        settings: (*spec, denom),
    };
    let (values, dh, dw_head) = match teacher {
        None => head_loss.run(Rows::Given(None))?,
        Some(Teacher::Logits(t)) => {
            if t.elem_count() != n * v || t.dims().last() != Some(&v) {
                return Err(Error::Shape(format!(
                    "teacher logits have shape {:?}, expected [{n}, {v}]",
                    t.dims()
                )));
            }
            // Read in place: no copy of the (N, V) teacher logits.
            with_cpu_f32(&f32_of(t)?, "one-pass loss", |t| {
                head_loss.run(Rows::Given(Some(SliceTeacher::Logits(t))))
            })??
        }
        Some(Teacher::TopK(top)) => {
            crate::loss::topk::check_top_k_dims(n, v, top)?;
            let (indices, log_probs) = top.to_host()?;
            head_loss.run(Rows::Given(Some(SliceTeacher::TopK {
                indices: &indices,
                log_probs: &log_probs,
                k: top.k(),
            })))?
        }
        Some(Teacher::Hidden { hidden: th, weight: tw }) => {
            let dt = tw.dim(1)?;
            if tw.dims() != [v, dt] || th.elem_count() != n * dt {
                return Err(Error::Invalid(format!(
                    "teacher hidden states {:?} and head {:?} must be ({n}, Ht) and ({v}, Ht)",
                    th.dims(),
                    tw.dims()
                )));
            }
            let (th, tw) = (f32_of(th)?, f32_of(tw)?);
            with_cpu_f32(&th, "one-pass loss", |th| {
                with_cpu_f32(&tw, "one-pass loss", |tw| {
                    head_loss.run(Rows::Hidden {
                        hidden: th,
                        weight: tw,
                        dt,
                    })
                })
            })???
        }
    };
    drop(w);
    let mut grads = tape.backward(model, &Tensor::from_vec(dh, (n, d), model.device())?)?;
    let dw_head = Tensor::from_vec(dw_head, (v, d), model.device())?;
    let g = match grads.remove(head) {
        Some(body) => (body + dw_head)?, // tied: the embedding's two uses add up
        None => dw_head,
    };
    grads.insert(head.to_string(), g);
    Ok((values, grads))
}

/// The teacher of `HeadLoss::run`, as row-major slices of all N rows.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// Full logits, top k, or none: what the loss takes, sliced per chunk.
    Given(Option<SliceTeacher<'a>>),
    /// Hidden states (N, dt) and head weight (V, dt): logits chunk by chunk.
    Hidden {
        hidden: &'a [f32],
        weight: &'a [f32],
        dt: usize,
    },
}

/// The head and the loss over the final hidden states, chunk by chunk.
struct HeadLoss<'a> {
    hidden: &'a [f32], // (N, d)
    wh: &'a [f32],     // (V, d)
    targets: &'a [u32],
    mask: &'a [f32],
    dims: (usize, usize, usize), // (N, d, V)
    chunk: usize,
    settings: (LossSpec, f64), // the loss, and the step's valid tokens
}

impl HeadLoss<'_> {
    /// The summed loss values, the hidden states' gradient (N, d) and the head weight's
    /// (V, d). With one chunk of all N rows this is exactly the unchunked computation.
    fn run(&self, teacher: Rows<'_>) -> candle_core::Result<(LossValues, Vec<f32>, Vec<f32>)> {
        let (n, d, v) = self.dims;
        let (spec, denom) = self.settings;
        let mut dh = vec![0f32; n * d];
        let mut dw = vec![0f32; v * d];
        let (mut total, mut ce, mut kd) = (0f64, 0f64, 0f64);
        for start in (0..n).step_by(self.chunk) {
            let rows = start..(start + self.chunk).min(n);
            let c = rows.len();
            let logits = linear_fwd(&self.hidden[start * d..rows.end * d], self.wh, (c, v, d))?; // (C, V)
            let teacher_logits; // (C, V), a Hidden teacher's chunk
            let t = match teacher {
                Rows::Given(t) => t.map(|t| t.rows(rows.clone(), v)),
                Rows::Hidden { hidden, weight, dt } => {
                    teacher_logits = linear_fwd(&hidden[start * dt..rows.end * dt], weight, (c, v, dt))?;
                    Some(SliceTeacher::Logits(&teacher_logits))
                }
            };
            let (vals, dlogits) = loss_and_grad_slices(
                start,
                &logits,
                t,
                Some(&self.targets[rows.clone()]),
                &self.mask[rows.clone()],
                v,
                &spec,
                denom,
            )?;
            drop(logits);
            total += f64::from(vals.total);
            ce += f64::from(vals.ce);
            kd += f64::from(vals.kd);
            // dh rows = dlogits @ W; dW (+)= dlogits^T @ h rows (linear_bwd_input and
            // linear_bwd_weight, the latter accumulating after the first chunk).
            let dh_rows = &mut dh[start * d..rows.end * d];
            gemm_f32((c, d, v), dh_rows, (d, 1), &dlogits, (v, 1), self.wh, (d, 1), false)?;
            let h_rows = &self.hidden[start * d..rows.end * d];
            gemm_f32((v, d, c), &mut dw, (d, 1), &dlogits, (1, v), h_rows, (d, 1), start > 0)?;
        }
        let values = LossValues {
            total: total as f32,
            ce: ce as f32,
            kd: kd as f32,
        };
        Ok((values, dh, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::Divergence;
    use crate::model::tape::tests::{cfg, ids, rel};
    use candle_core::Device;

    /// The graph-free micro-batch against the same loss on candle's graph (`Forward`
    /// and `distill_loss_with`): loss terms and every gradient, with a full-logit
    /// teacher, a top-k teacher, a teacher's hidden states and head, and none; whole
    /// logits and the fused head's chunks; masked rows, tied and untied heads.
    #[test]
    fn the_one_pass_micro_batch_matches_the_graph() -> Result<()> {
        for (tied, bias, kv) in [(false, false, 4), (true, true, 2)] {
            let m = Llama::init(cfg(tied, bias, kv), 0.2, 5, &Device::Cpu)?;
            let (x, y) = (ids(3, 13, 0)?, ids(1, 39, 5)?.flatten_all()?);
            let mask_v: Vec<f32> = (0..39).map(|i| if i % 5 == 4 { 0.0 } else { 1.0 }).collect();
            let mask = Tensor::from_vec(mask_v, 39, &Device::Cpu)?;
            let teacher = (Tensor::randn(0f32, 3.0, (39, 61), &Device::Cpu)?).contiguous()?;
            let top = crate::loss::top_k_of_logits(&teacher, 7, 2.0)?;
            // A teacher given as hidden states (width 24) and its own head.
            let th = Tensor::randn(0f32, 1.0, (39, 24), &Device::Cpu)?;
            let tw = Tensor::randn(0f32, 0.5, (61, 24), &Device::Cpu)?;
            let th_logits = th.matmul(&tw.t()?)?; // (39, 61), what the graph is given
            let hidden = Some(Teacher::Hidden {
                hidden: &th,
                weight: &tw,
            });
            for (ht, d) in [
                (None, Divergence::ForwardKl),
                (Some(Teacher::Logits(&teacher)), Divergence::ForwardKl),
                (Some(Teacher::Logits(&teacher)), Divergence::Tvd),
                (Some(Teacher::TopK(&top)), Divergence::ForwardKl),
                (Some(Teacher::TopK(&top)), Divergence::SkewReverseKl { skew: 0.1 }),
                (hidden, Divergence::Jsd { beta: 0.3 }),
            ] {
                let (kind, tl) = match ht {
                    None => ("none", None),
                    Some(Teacher::Logits(l)) => ("logits", Some(Teacher::Logits(l))),
                    Some(Teacher::TopK(t)) => ("top-7", Some(Teacher::TopK(t))),
                    Some(Teacher::Hidden { .. }) => ("hidden", Some(Teacher::Logits(&th_logits))),
                };
                let fwd = Forward::run(&m, &x, false)?;
                let parts = distill_loss_with(&fwd.out, tl, &y, &mask, &LossSpec::new(0.4, 2.0, d), 31.0)?;
                let total = parts.total.to_scalar::<f32>()?;
                let want = fwd.grads(&m, &parts.total)?;
                // The whole logits at once, and the fused head's chunks of 7 rows (the
                // last one of 4).
                for chunk in [None, Some(7)] {
                    let (vals, got) = one_pass(&m, (&x, &y, &mask), ht, &LossSpec::new(0.4, 2.0, d), 31.0, chunk)?;
                    let what = format!("tied={tied} teacher={kind} {d} chunk={chunk:?}");
                    assert!(
                        (vals.total - total).abs() <= 1e-5 * total.abs(),
                        "{what}: {} vs {total}",
                        vals.total
                    );
                    assert!((vals.ce - parts.ce).abs() <= 1e-5 * parts.ce.abs(), "{what}");
                    assert!((vals.kd - parts.kd).abs() <= 1e-5 * parts.kd.abs().max(1e-6), "{what}");
                    assert_eq!(got.len(), want.len());
                    for (name, g) in &got {
                        let e = rel(g, &want[name])?;
                        assert!(e < 1e-5, "{what} {name}: {e}");
                    }
                }
            }
        }
        Ok(())
    }
}
