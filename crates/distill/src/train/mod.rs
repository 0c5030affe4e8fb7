//! The training loop, top to bottom: schedule, micro-batches, (teacher
//! forward), loss, backward, accumulation, clipping, AdamW step, log, eval,
//! checkpoint. One function serves the teacher, the distilled student and the
//! baseline; only the presence of a teacher differs.

pub mod checkpoint;
pub mod optim;

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Tensor, Var};

use crate::config::{NonFinitePolicy, TrainSpec};
use crate::train::checkpoint::TrainerState;

/// With `on_nonfinite = "skip"`, a stage still stops after this many skipped steps in a row.
pub const MAX_SKIPS_IN_A_ROW: usize = 10;
use crate::distributed::{shard_range, Collective, CommTimer};
use crate::error::{Error, Result};
use crate::loss::head::{default_chunk_rows, fused_linear_distill_loss, HeadTeacher};
use crate::loss::{distill_loss, distill_loss_with, top_k_of_logits, Divergence, LossParts, TeacherTargets, TopK};
use crate::model::tape::Tape;
use crate::model::Llama;
use crate::prepare::data::batch::{make_batch, Batch, Encoded, Order};
use crate::progress::{Progress, StepLog};
use crate::teacher::logit_cache::LogitCache;
use crate::train::optim::{clip_grad_norm, lr_at, AdamW};

/// The teacher side of logit distillation.
pub struct Teacher<'a> {
    pub source: TeacherSource<'a>,
    /// Weight of the hard-label CE; 1 - ce_weight weighs the KD term.
    pub ce_weight: f64,
    pub temperature: f64,
    pub divergence: Divergence,
    /// Distil from the teacher's top k tokens per position (`loss::topk`); None: its
    /// full distribution. A cache always gives its own k.
    pub top_k: Option<usize>,
}

/// Where the teacher's distribution comes from.
pub enum TeacherSource<'a> {
    /// The model, run on every batch.
    Online(&'a Llama),
    /// Top-k log-probabilities written beforehand over this stage's training data
    /// (`logit_cache`): no teacher forward passes, no teacher FLOPs in this stage.
    Cache(&'a LogitCache),
}

pub struct StageInput<'a> {
    pub name: &'a str,
    pub train: &'a [Encoded],
    pub eval: &'a [Encoded],
    pub pad: u32,
    /// Seed of the data order.
    pub seed: u64,
    /// Continue from this checkpoint (written by this stage): optimizer
    /// moments, step, data position and the stage's totals are restored. The
    /// caller loads the model's weights from it.
    pub resume_from: Option<&'a std::path::Path>,
    /// The ranks training together (`distributed`): each takes a slice of every
    /// micro-batch, and gradients are summed over them before clipping.
    pub comm: &'a dyn Collective,
}

/// What a stage did, for the ledger and the report.
#[derive(Debug, Clone, Default)]
pub struct StageStats {
    pub steps: usize,
    /// Non-padding input tokens processed.
    pub tokens: u64,
    /// FLOPs of the trained model (forward + backward, 3x forward).
    pub flops: f64,
    /// FLOPs of the teacher's forward passes.
    pub teacher_flops: f64,
    pub final_loss: f32,
    pub final_eval_loss: f32,
    /// Steps whose update was dropped for a non-finite loss or gradient (`on_nonfinite = "skip"`).
    pub skipped_steps: usize,
    /// Wall time spent summing gradients and counters over the ranks (0 for one process).
    pub comm_seconds: f64,
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

/// A micro-batch's gradients: already computed (the one-pass path), or still to be
/// taken from candle's graph through the loss.
enum MicroGrads {
    Done(BTreeMap<String, Tensor>),
    Graph(Forward, Tensor),
}

/// The teacher's side of one micro-batch.
enum TeacherSide {
    Logits(Tensor),
    /// Final hidden states (B*T, Ht) and head weight (V, Ht), for the fused head, which
    /// computes the teacher's logits chunk by chunk too.
    Hidden(Tensor, Tensor),
    TopK(TopK),
}

/// The loss on whole (B*T, V) logits: the fused kernels, or the plain composition.
fn plain_loss(
    loss_impl: LossImpl,
    logits: &Tensor,
    side: Option<&TeacherSide>,
    b: &Batch,
    (ce_weight, temperature, denom): (f64, f64, f64),
    divergence: Divergence,
) -> Result<LossParts> {
    let (y, m) = (&b.targets, &b.mask);
    match (loss_impl, side) {
        (LossImpl::Reference, None) => distill_loss(logits, None, y, m, ce_weight, temperature, denom),
        (LossImpl::Reference, Some(TeacherSide::Logits(tl))) => {
            distill_loss(logits, Some(tl), y, m, ce_weight, temperature, denom)
        }
        (LossImpl::Reference, Some(_)) => Err(Error::Invalid(
            "the reference loss takes full teacher logits only; use the fused loss".into(),
        )),
        (_, side) => {
            let teacher = match side {
                None => None,
                Some(TeacherSide::Logits(t)) => Some(TeacherTargets::Logits(t)),
                Some(TeacherSide::TopK(t)) => Some(TeacherTargets::TopK(t)),
                Some(TeacherSide::Hidden(..)) => {
                    return Err(Error::Invalid("teacher hidden states need the fused head".into()))
                }
            };
            distill_loss_with(logits, teacher, y, m, ce_weight, temperature, denom, divergence)
        }
    }
}

/// Runs the teacher on a micro-batch (counting its FLOPs), or reads its rows from the
/// cache. `idx` are the batch's examples, `t` its padded length. With `head` (the fused
/// head) a full-distribution teacher gives its hidden states and head instead of logits.
fn teacher_side(
    tch: &Teacher,
    b: &Batch,
    idx: &[usize],
    t: usize,
    head: bool,
    stats: &mut StageStats,
) -> Result<TeacherSide> {
    match tch.source {
        TeacherSource::Online(model) => {
            stats.teacher_flops += model.cfg.forward_flops_per_token(t) * b.positions as f64;
            if head && tch.top_k.is_none() {
                let hidden = model.forward_hidden(&b.inputs)?.flatten_to(1)?.detach(); // (B*T, Ht)
                return Ok(TeacherSide::Hidden(hidden, model.lm_head_weight()?.detach()));
            }
            let logits = model.forward(&b.inputs)?.flatten_to(1)?.detach(); // (B*T, V)
            Ok(match tch.top_k {
                Some(k) => TeacherSide::TopK(top_k_of_logits(&logits, k, tch.temperature)?),
                None => TeacherSide::Logits(logits),
            })
        }
        TeacherSource::Cache(cache) => Ok(TeacherSide::TopK(cache.batch(idx, t, b.inputs.device())?)),
    }
}

/// Which implementation computes the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossImpl {
    /// Fused CPU kernels with analytic backward (`loss::fused`).
    Fused,
    /// The fused kernels behind a fused vocabulary head (`loss::fused_head`): the
    /// (B*T, V) logits of the student, and of a full-distribution teacher, are never
    /// materialised whole.
    FusedHead,
    /// The plain candle composition (`loss::reference`), forward KL only.
    Reference,
}

impl LossImpl {
    /// The implementation `[distill] fused` and `fused_head` choose.
    pub fn of(d: &crate::config::DistillConfig) -> Self {
        match (d.fused, d.fused_head) {
            (true, true) => LossImpl::FusedHead,
            (true, false) => LossImpl::Fused,
            (false, _) => LossImpl::Reference,
        }
    }
}

/// Called with the model, optimiser and state whenever a checkpoint is due.
pub type SaveFn<'a> = dyn FnMut(&Llama, &AdamW, &TrainerState) -> Result<()> + 'a;

pub fn train(
    input: &StageInput,
    model: &Llama,
    teacher: Option<&Teacher>,
    spec: &TrainSpec,
    loss_impl: LossImpl,
    save: &mut SaveFn,
    progress: &dyn Progress,
) -> Result<StageStats> {
    if input.train.is_empty() {
        return Err(Error::Invalid(format!("stage {}: no training examples", input.name)));
    }
    let device = model.device().clone();
    let params = model.params();
    let mut opt = AdamW::new(spec, params)?;
    let mut order = Order::new(input.train.len(), input.seed);
    let mut stats = StageStats::default();
    let mut start = 0;
    if let Some(dir) = input.resume_from {
        let state = crate::train::checkpoint::load_training_state(dir, &mut opt, &device)?;
        let same = state.stage == input.name
            && state.total_steps == spec.steps
            && state.seed == input.seed
            && state.micro_batches == state.step * spec.grad_accum
            && state.step <= spec.steps;
        if !same {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                msg: format!(
                    "was written by stage {} (step {}/{}, seed {}), which does not match stage {} ({} steps, seed {}); \
                     resume with the run's own config.toml",
                    state.stage, state.step, state.total_steps, state.seed, input.name, spec.steps, input.seed
                ),
            });
        }
        start = state.step;
        stats.steps = state.step;
        stats.tokens = state.tokens_seen as u64;
        stats.flops = state.flops;
        stats.teacher_flops = state.teacher_flops;
        stats.final_loss = state.last_loss.unwrap_or(0.0);
    }
    let (alpha, temperature, divergence) = teacher.map_or((1.0, 1.0, Divergence::ForwardKl), |t| {
        (t.ce_weight, t.temperature, t.divergence)
    });
    if loss_impl == LossImpl::Reference && divergence != Divergence::ForwardKl {
        return Err(Error::Invalid(format!(
            "the reference loss implements forward_kl only, not {divergence}; use the fused loss"
        )));
    }
    let top_k = teacher.is_some_and(|t| t.top_k.is_some() || matches!(t.source, TeacherSource::Cache(_)));
    if loss_impl == LossImpl::Reference && top_k {
        return Err(Error::Invalid(
            "the reference loss takes full teacher logits only, not a top-k teacher or a logit cache; use the fused loss"
                .into(),
        ));
    }
    progress.stage_start(input.name, spec.steps);

    let comm = input.comm;
    let (rank, world) = (comm.rank(), comm.world());
    let mut comm_timer = CommTimer::default();
    let mut skipped_in_a_row = 0;
    for step in start..spec.steps {
        let t0 = Instant::now();
        let lr = lr_at(spec, step);
        let global: Vec<Vec<usize>> = (0..spec.grad_accum)
            .map(|a| order.micro_batch(step * spec.grad_accum + a, spec.batch_size))
            .collect();
        // Normalise by the valid tokens of the whole step (every rank's share of every
        // micro-batch), not per micro-batch: the sum of the ranks' gradients is then
        // the gradient of the global batch.
        let denom: usize = global.iter().flatten().map(|&i| input.train[i].loss_tokens()).sum();
        // This rank's slice of each micro-batch; with more ranks than examples some get none.
        let batches = global
            .iter()
            .map(|idx| idx[shard_range(idx.len(), rank, world)].to_vec())
            .filter(|idx| !idx.is_empty())
            .map(|idx| {
                let items: Vec<&Encoded> = idx.iter().map(|&i| &input.train[i]).collect();
                Ok((make_batch(&items, input.pad, &device)?, idx))
            })
            .collect::<Result<Vec<(Batch, Vec<usize>)>>>()?;
        let (flops_before, teacher_flops_before) = (stats.flops, stats.teacher_flops);

        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let (mut loss, mut ce, mut kd) = (0f32, 0f32, 0f32);
        let mut step_tokens = 0u64;
        let mut fault: Option<(&'static str, f32)> = None;
        for (b, idx) in &batches {
            let (_, t) = b.inputs.dims2()?;
            let d = denom as f64;
            let head = loss_impl == LossImpl::FusedHead;
            let side = match teacher {
                Some(tch) => Some(teacher_side(tch, b, idx, t, head, &mut stats)?),
                None => None,
            };
            // The fused loss, with the fused head or without, runs with no autograd graph
            // on the fused CPU path: the head, the loss and its gradient in one pass over
            // the logits, chunk by chunk for the fused head (`Llama::loss_and_grads_one_pass`).
            let head_teacher = match &side {
                None => HeadTeacher::None,
                Some(TeacherSide::Logits(l)) => HeadTeacher::Logits(l),
                Some(TeacherSide::Hidden(h, w)) => HeadTeacher::Hidden { hidden: h, weight: w },
                Some(TeacherSide::TopK(top)) => HeadTeacher::TopK(top),
            };
            let one_pass = matches!(loss_impl, LossImpl::Fused | LossImpl::FusedHead) && model.can_tape();
            let (total, micro_ce, micro_kd, micro_grads) = match one_pass {
                true => {
                    let chunk = head.then(|| default_chunk_rows(model.cfg.vocab_size));
                    let (vals, g) = model.loss_and_grads_one_pass(
                        &b.inputs,
                        &b.targets,
                        &b.mask,
                        head_teacher,
                        alpha,
                        temperature,
                        d,
                        divergence,
                        chunk,
                    )?;
                    (vals.total, vals.ce, vals.kd, MicroGrads::Done(g))
                }
                false => {
                    let fwd = Forward::run(model, &b.inputs, head)?;
                    let parts = if head {
                        // Hidden states and head weight in, the (B*T, V) logits never whole.
                        let hidden = &fwd.out; // (B*T, H)
                        let w = model.lm_head_weight()?;
                        fused_linear_distill_loss(
                            hidden,
                            &w,
                            head_teacher,
                            &b.targets,
                            &b.mask,
                            alpha,
                            temperature,
                            d,
                            divergence,
                            None,
                        )?
                    } else {
                        plain_loss(
                            loss_impl,
                            &fwd.out, // (B*T, V)
                            side.as_ref(),
                            b,
                            (alpha, temperature, d),
                            divergence,
                        )?
                    };
                    let total = parts.total.to_scalar::<f32>()?;
                    (total, parts.ce, parts.kd, MicroGrads::Graph(fwd, parts.total))
                }
            };
            fault = [("loss", total), ("ce", micro_ce), ("kd", micro_kd)]
                .into_iter()
                .find(|(_, v)| !v.is_finite());
            if fault.is_some() {
                break;
            }
            let micro_grads = match micro_grads {
                MicroGrads::Done(g) => g,
                MicroGrads::Graph(fwd, total) => fwd.grads(model, &total)?,
            };
            for (name, gi) in micro_grads {
                let acc = match grads.remove(&name) {
                    Some(prev) => (prev + gi)?,
                    None => gi,
                };
                grads.insert(name, acc);
            }
            loss += total;
            ce += micro_ce;
            kd += micro_kd;
            step_tokens += b.tokens as u64;
            stats.flops += 3.0 * model.cfg.forward_flops_per_token(t) * b.positions as f64;
        }
        if world > 1 {
            comm_timer.time(|| {
                sum_over_ranks(
                    comm,
                    params,
                    &mut grads,
                    &mut fault,
                    [&mut loss, &mut ce, &mut kd],
                    &mut step_tokens,
                    (&mut stats.flops, flops_before),
                    (&mut stats.teacher_flops, teacher_flops_before),
                )
            })?;
            stats.comm_seconds = comm_timer.total.as_secs_f64();
        }
        let grad_norm = if fault.is_none() {
            clip_grad_norm(&mut grads, spec.grad_clip)?
        } else {
            f64::NAN
        };
        if fault.is_none() && !grad_norm.is_finite() {
            fault = Some(("gradient norm", grad_norm as f32));
        }
        match fault {
            None => {
                opt.step(params, &grads, lr)?;
                skipped_in_a_row = 0;
            }
            Some((term, value)) => {
                skipped_in_a_row += 1;
                stats.skipped_steps += 1;
                if spec.on_nonfinite == NonFinitePolicy::Stop || skipped_in_a_row > MAX_SKIPS_IN_A_ROW {
                    return Err(Error::NonFinite {
                        stage: input.name.to_string(),
                        step,
                        term,
                        value,
                    });
                }
                progress.message(&format!(
                    "{}: step {} skipped (non-finite {term} = {value}); on_nonfinite = \"skip\"",
                    input.name,
                    step + 1
                ));
            }
        }
        stats.tokens += step_tokens;
        stats.steps = step + 1;
        stats.final_loss = loss;

        let last = step + 1 == spec.steps;
        let eval_loss = if last || (spec.eval_every > 0 && (step + 1) % spec.eval_every == 0) {
            let l = eval_loss_on(model, input.eval, spec.batch_size, input.pad, comm)?;
            stats.final_eval_loss = l;
            Some(l)
        } else {
            None
        };
        progress.step(&StepLog {
            step: step + 1,
            total_steps: spec.steps,
            loss,
            ce,
            kd,
            lr,
            grad_norm,
            tokens_per_second: step_tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            eval_loss,
            dollars: 0.0,
        });
        if last || (spec.save_every > 0 && (step + 1) % spec.save_every == 0) {
            let state = TrainerState {
                stage: input.name.to_string(),
                step: step + 1,
                total_steps: spec.steps,
                micro_batches: (step + 1) * spec.grad_accum,
                seed: input.seed,
                tokens_seen: stats.tokens as usize,
                last_loss: Some(loss),
                flops: stats.flops,
                teacher_flops: stats.teacher_flops,
                checksums: Default::default(),
            };
            save(model, &opt, &state)?;
        }
    }
    progress.stage_end();
    Ok(stats)
}

/// Sums this step's gradients, loss terms and counters over the ranks, in rank order
/// (every rank gets bitwise the same sums, so the replicas stay identical). A rank that
/// met a non-finite value makes every rank skip the step.
#[allow(clippy::too_many_arguments)]
fn sum_over_ranks(
    comm: &dyn Collective,
    params: &BTreeMap<String, candle_core::Var>,
    grads: &mut BTreeMap<String, Tensor>,
    fault: &mut Option<(&'static str, f32)>,
    terms: [&mut f32; 3],
    tokens: &mut u64,
    (flops, flops_before): (&mut f64, f64),
    (teacher_flops, teacher_flops_before): (&mut f64, f64),
) -> Result<()> {
    let mut scalars = vec![
        f64::from(fault.is_some()),
        *tokens as f64,
        *flops - flops_before,
        *teacher_flops - teacher_flops_before,
    ];
    scalars.extend(terms.iter().map(|t| f64::from(**t)));
    comm.sum_f64(&mut scalars)?;
    if scalars[0] > 0.0 {
        fault.get_or_insert(("loss or gradient on another rank", f32::NAN));
    }
    *tokens = scalars[1] as u64;
    *flops = flops_before + scalars[2];
    *teacher_flops = teacher_flops_before + scalars[3];
    for (t, v) in terms.into_iter().zip(&scalars[4..]) {
        *t = *v as f32;
    }
    if fault.is_some() {
        return Ok(());
    }
    // One flat buffer in parameter-name order; a parameter this rank computed no
    // gradient for (no examples in its slice) contributes zeros.
    let mut flat = Vec::with_capacity(params.len());
    for (name, var) in params {
        let g = match grads.get(name) {
            Some(g) => g.clone(),
            None => var.as_tensor().zeros_like()?,
        };
        flat.push(g.flatten_all()?);
    }
    let summed = comm.sum_tensor(&Tensor::cat(&flat, 0)?)?;
    let mut at = 0;
    for (name, var) in params {
        let n = var.as_tensor().elem_count();
        grads.insert(name.clone(), summed.narrow(0, at, n)?.reshape(var.as_tensor().shape())?);
        at += n;
    }
    Ok(())
}

/// Mean cross-entropy per completion token over `data` (teacher forcing).
pub fn eval_loss(model: &Llama, data: &[Encoded], batch_size: usize, pad: u32) -> Result<f32> {
    eval_loss_on(model, data, batch_size, pad, &crate::distributed::Single)
}

/// `eval_loss` with the batches dealt round-robin over the ranks and the sums added
/// over them; every rank gets the same figure.
pub fn eval_loss_on(
    model: &Llama,
    data: &[Encoded],
    batch_size: usize,
    pad: u32,
    comm: &dyn Collective,
) -> Result<f32> {
    let (mut sum, mut n) = (0f64, 0usize);
    let (rank, world) = (comm.rank(), comm.world());
    for (_, chunk) in data
        .chunks(batch_size.max(1))
        .enumerate()
        .filter(|(i, _)| i % world == rank)
    {
        let items: Vec<&Encoded> = chunk.iter().collect();
        let b = make_batch(&items, pad, model.device())?;
        let logits = model.forward(&b.inputs)?.flatten_to(1)?.detach(); // (B*T, V)
        let parts = distill_loss(&logits, None, &b.targets, &b.mask, 1.0, 1.0, 1.0)?;
        sum += parts.ce as f64;
        n += b.loss_tokens;
    }
    if world > 1 {
        let mut both = [sum, n as f64];
        comm.sum_f64(&mut both)?;
        (sum, n) = (both[0], both[1] as usize);
    }
    Ok(if n == 0 { 0.0 } else { (sum / n as f64) as f32 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelSpec;
    use crate::model::ModelConfig;
    use crate::progress::Silent;
    use candle_core::Device;

    fn data() -> Vec<Encoded> {
        (0..8u32)
            .map(|i| Encoded {
                ids: (0..6 + i % 3).map(|j| 3 + (i * 5 + j) % 40).collect(),
                prompt_len: 2,
            })
            .collect()
    }

    fn trained(batch_size: usize, grad_accum: usize) -> Result<Vec<f32>> {
        trained_on(batch_size, grad_accum, &crate::distributed::Single)
    }

    fn trained_on(batch_size: usize, grad_accum: usize, comm: &dyn Collective) -> Result<Vec<f32>> {
        let spec = ModelSpec {
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 1,
            num_heads: 2,
            ..ModelSpec::default()
        };
        let model = Llama::init(ModelConfig::from_spec(&spec, 48, 1, 2, 0), 0.1, 3, &Device::Cpu)?;
        let train = data();
        let input = StageInput {
            name: "t",
            train: &train,
            eval: &train,
            pad: 0,
            seed: 1,
            resume_from: None,
            comm,
        };
        let ts = TrainSpec {
            steps: 2,
            batch_size,
            grad_accum,
            ..TrainSpec::default()
        };
        train_stage_for_test(&input, &model, &ts)?;
        Ok(model
            .tensors()
            .values()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect())
    }

    fn train_stage_for_test(input: &StageInput, model: &Llama, spec: &TrainSpec) -> Result<StageStats> {
        let mut saves = 0;
        let mut save = |_: &Llama, _: &AdamW, _: &TrainerState| -> Result<()> {
            saves += 1;
            Ok(())
        };
        let stats = train(input, model, None, spec, LossImpl::Reference, &mut save, &Silent)?;
        assert_eq!(saves, 1, "one checkpoint at the end");
        Ok(stats)
    }

    /// A poisoned weight makes every loss NaN: "stop" names the step and the
    /// term; "skip" drops the updates (the weights stay as they were) and gives
    /// up after MAX_SKIPS_IN_A_ROW steps in a row.
    #[test]
    fn non_finite_loss_stops_or_skips() -> Result<()> {
        let spec = ModelSpec {
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 1,
            num_heads: 2,
            ..ModelSpec::default()
        };
        let examples = data();
        let input = StageInput {
            name: "t",
            train: &examples,
            eval: &examples,
            pad: 0,
            seed: 1,
            resume_from: None,
            comm: &crate::distributed::Single,
        };
        let poisoned = || -> Result<Llama> {
            let m = Llama::init(ModelConfig::from_spec(&spec, 48, 1, 2, 0), 0.1, 3, &Device::Cpu)?;
            let w = &m.params()["model.norm.weight"];
            w.set(&(w.as_tensor() * f64::NAN)?)?;
            Ok(m)
        };
        let mut save = |_: &Llama, _: &AdamW, _: &TrainerState| -> Result<()> { Ok(()) };
        let mut ts = TrainSpec {
            steps: 3,
            batch_size: 4,
            ..TrainSpec::default()
        };
        let m = poisoned()?;
        let err = train(&input, &m, None, &ts, LossImpl::Fused, &mut save, &Silent).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NonFinite {
                    step: 0,
                    term: "loss",
                    ..
                }
            ),
            "{err}"
        );

        ts.on_nonfinite = NonFinitePolicy::Skip;
        let m = poisoned()?;
        let before = m.params()["model.embed_tokens.weight"]
            .flatten_all()?
            .to_vec1::<f32>()?;
        let stats = train(&input, &m, None, &ts, LossImpl::Fused, &mut save, &Silent)?;
        assert_eq!(stats.skipped_steps, 3);
        let after = m.params()["model.embed_tokens.weight"]
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(before, after, "a skipped step must not change the weights");

        ts.steps = MAX_SKIPS_IN_A_ROW + 2;
        let m = poisoned()?;
        let err = train(&input, &m, None, &ts, LossImpl::Fused, &mut save, &Silent).unwrap_err();
        assert!(matches!(err, Error::NonFinite { .. }), "{err}");
        Ok(())
    }

    /// Data parallelism over ranks (threads here, MPI processes in tests/e2e.rs): 2 and
    /// 3 ranks, one of them with an uneven share, train the same weights as one process
    /// to 1e-5 (the sums are added in another order), every rank holds bitwise the same
    /// weights, and a second run with the same ranks is bitwise the same.
    #[test]
    fn ranks_train_the_weights_of_one_process() -> Result<()> {
        let one = trained(4, 2)?;
        for world in [2usize, 3] {
            let run = || -> Vec<Vec<f32>> {
                let comms = crate::distributed::threads::world(world);
                std::thread::scope(|s| {
                    let hs: Vec<_> = comms.iter().map(|c| s.spawn(move || trained_on(4, 2, c))).collect();
                    hs.into_iter()
                        .map(|h| h.join().expect("rank thread").expect("train"))
                        .collect()
                })
            };
            let a = run();
            assert!(a.iter().all(|w| w == &a[0]), "{world} ranks hold different weights");
            let rel = one
                .iter()
                .zip(&a[0])
                .map(|(x, y)| (x - y).abs() / x.abs().max(1e-3))
                .fold(0f32, f32::max);
            assert!(rel < 1e-5, "{world} ranks vs one process: max rel diff {rel}");
            assert_eq!(a, run(), "{world} ranks: a second run differs");
        }
        Ok(())
    }

    /// Loss is normalised by the tokens of the whole step, so accumulating two
    /// micro-batches of 4 equals one batch of 8 (up to summation order).
    #[test]
    fn gradient_accumulation_matches_one_big_batch() -> Result<()> {
        let big = trained(8, 1)?;
        let acc = trained(4, 2)?;
        let max_diff = big.iter().zip(&acc).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max_diff < 1e-5, "max |diff| = {max_diff}");
        let other = trained(4, 1)?;
        assert!(big.iter().zip(&other).any(|(a, b)| a != b));
        Ok(())
    }
}
