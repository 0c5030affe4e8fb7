//! The training loop, top to bottom: schedule, micro-batches (`step`: teacher output,
//! loss, gradients), accumulation, the sum over ranks, clipping, AdamW step, log, eval,
//! checkpoint. One function serves the teacher, the distilled students and the
//! baselines; only the presence of a teacher differs.

pub mod checkpoint;
pub mod optim;
pub mod rollout;
pub mod step;

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;

use crate::config::{NonFinitePolicy, TrainSpec};
use crate::distributed::{shard_range, Collective, CommTimer};
use crate::error::{Error, Result};
use crate::loss::{Divergence, LossSpec};
use crate::model::Llama;
use crate::prepare::data::batch::{make_batch, Encoded, Order};
use crate::progress::{Progress, StepLog};
use crate::teacher::logit_cache::LogitCache;
use crate::train::checkpoint::TrainerState;
use crate::train::optim::{clip_grad_norm, lr_at, AdamW};
use crate::train::rollout::{RolloutTotals, Rollouts, StepBatch};

/// With `on_nonfinite = "skip"`, a stage still stops after this many skipped steps in a row.
pub const MAX_SKIPS_IN_A_ROW: usize = 10;

/// Where a distilling stage's teacher targets come from.
#[derive(Clone, Copy)]
pub enum TeacherSource<'a> {
    /// The model, run on every micro-batch: its full distribution, or (`top_k`) its k
    /// most likely tokens per position (`loss::topk`).
    Online { model: &'a Llama, top_k: Option<usize> },
    /// Top-k log-probabilities written beforehand over this stage's training data
    /// (`logit_cache`, its own k): no teacher forward passes, no teacher FLOPs here.
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
    /// The teacher this stage distils from; None trains on the labels alone.
    pub teacher: Option<TeacherSource<'a>>,
    /// The loss (`LossSpec::CE_ONLY` without a teacher).
    pub loss: LossSpec,
    /// On-policy stages: the steps that sample train on the model's own samples
    /// (`rollout`), the others on `train`.
    pub rollouts: Option<&'a Rollouts<'a>>,
    /// Held-out accuracy at every `eval_every` step, for the report's curve.
    pub curve: Option<&'a Curve<'a>>,
}

/// The held-out problems a stage solves at every `eval_every` step (greedy decoding).
pub struct Curve<'a> {
    pub tok: &'a crate::prepare::tokenizer::Tokenizer,
    pub examples: &'a [crate::prepare::data::Example],
    pub limit: usize,
    pub max_new_tokens: usize,
    pub batch_size: usize,
}

impl Curve<'_> {
    fn accuracy(&self, model: &Llama) -> Result<f64> {
        let a = crate::model::generate::accuracy(
            model,
            self.tok,
            self.examples,
            self.limit,
            self.max_new_tokens,
            self.batch_size,
        )?;
        Ok(a.accuracy)
    }
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
    /// Sampling and scoring of an on-policy stage (included in `flops` and `teacher_flops`).
    pub rollout: RolloutTotals,
}

impl StageStats {
    /// A teacher's (or reference model's) forward over a batch, started at `started`:
    /// its FLOPs count as teacher FLOPs, and both as scoring.
    pub(crate) fn bill_scoring(&mut self, flops: f64, started: Instant) {
        self.teacher_flops += flops;
        self.rollout.score_flops += flops;
        self.rollout.score_seconds += started.elapsed().as_secs_f64();
    }
}

/// Which implementation computes the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossImpl {
    /// Fused CPU kernels with analytic backward (`loss::full`).
    Fused,
    /// The fused kernels behind a fused vocabulary head (`loss::head`): the
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

/// Trains `model` for one stage on `input` (its data, teacher, loss and ranks) with the
/// optimiser, schedule and loop settings of `spec`, computing the loss with `loss_impl`.
/// `save` is called whenever a checkpoint is due. With `input.resume_from`, the stage
/// continues from that checkpoint's optimiser state, step and data position.
pub fn train(
    input: &StageInput,
    model: &Llama,
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
    let mut prompt_order = input
        .rollouts
        .map(|r| Order::new(r.prompts.len(), input.seed ^ 0x7072_6f6d_7074));
    if input.rollouts.is_some() && input.comm.world() > 1 {
        return Err(Error::Invalid(format!(
            "stage {}: the on-policy and RL stages run in one process; run them without [distributed]",
            input.name
        )));
    }
    let (start, mut stats) = match input.resume_from {
        Some(dir) => resumed(input, spec, dir, &mut opt, &device)?,
        None => (0, StageStats::default()),
    };
    // Without a teacher the loss is the cross-entropy alone, whatever `input.loss` says.
    let loss_spec = if input.teacher.is_some() {
        input.loss
    } else {
        LossSpec::CE_ONLY
    };
    check_loss(input, &loss_spec, loss_impl)?;
    progress.stage_start(input.name, spec.steps);

    let (comm, world) = (input.comm, input.comm.world());
    // The work of this process's segment, for the heartbeat (a resumed stage starts from
    // the totals its checkpoint restored).
    let segment_start = (stats.tokens, stats.flops + stats.teacher_flops);
    let mut comm_timer = CommTimer::default();
    let mut skipped_in_a_row = 0;
    for step in start..spec.steps {
        let t0 = Instant::now();
        let lr = lr_at(spec, step);
        let (batches, denom, reward) = step_data(
            input,
            spec,
            model,
            (&mut order, prompt_order.as_mut()),
            step,
            &mut stats,
        )?;
        let (flops_before, teacher_flops_before) = (stats.flops, stats.teacher_flops);

        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let (mut loss, mut ce, mut kd) = (0f32, 0f32, 0f32);
        let mut step_tokens = 0u64;
        let mut fault: Option<(&'static str, f32)> = None;
        for sb in &batches {
            let (b, teacher) = (&sb.batch, input.teacher.as_ref());
            let micro = step::micro_batch(model, sb, teacher, &loss_spec, loss_impl, denom, &mut stats)?;
            fault = [("loss", micro.total), ("ce", micro.ce), ("kd", micro.kd)]
                .into_iter()
                .find(|(_, v)| !v.is_finite());
            if fault.is_some() {
                break;
            }
            for (name, gi) in micro.grads.into_grads(model)? {
                let acc = match grads.remove(&name) {
                    Some(prev) => (prev + gi)?,
                    None => gi,
                };
                grads.insert(name, acc);
            }
            loss += micro.total;
            ce += micro.ce;
            kd += micro.kd;
            step_tokens += b.tokens as u64;
            let (_, t) = b.inputs.dims2()?;
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
                skip_or_stop(input.name, spec, step, (term, value), skipped_in_a_row, progress)?;
            }
        }
        stats.tokens += step_tokens;
        stats.steps = step + 1;
        stats.final_loss = loss;

        let last = step + 1 == spec.steps;
        let (eval_loss, accuracy) = evaluate_at(input, spec, model, step, &mut stats)?;
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
            accuracy,
            reward,
            dollars: 0.0,
            segment_tokens: stats.tokens - segment_start.0,
            segment_flops: stats.flops + stats.teacher_flops - segment_start.1,
        });
        if last || (spec.save_every > 0 && (step + 1) % spec.save_every == 0) {
            save(model, &opt, &trainer_state(input, spec, step + 1, &stats, loss))?;
        }
    }
    progress.stage_end();
    Ok(stats)
}

/// The micro-batches of `step` and its loss denominator: the model's own samples on a
/// step that samples (with a GRPO step's mean reward), the fixed data otherwise.
fn step_data(
    input: &StageInput,
    spec: &TrainSpec,
    model: &Llama,
    (order, prompt_order): (&mut Order, Option<&mut Order>),
    step: usize,
    stats: &mut StageStats,
) -> Result<(Vec<StepBatch>, f64, Option<f64>)> {
    match (input.rollouts, prompt_order) {
        (Some(r), Some(po)) if r.on_policy(input.seed, step) => r.step_batches(model, spec, po, step, input.pad, stats),
        _ => {
            let (b, d) = step_batches(input, spec, order, step, model.device())?;
            Ok((b, d, None))
        }
    }
}

/// The held-out loss, and the curve's accuracy, after `step` when it is a step that
/// evaluates (every `eval_every` steps, and the last).
fn evaluate_at(
    input: &StageInput,
    spec: &TrainSpec,
    model: &Llama,
    step: usize,
    stats: &mut StageStats,
) -> Result<(Option<f32>, Option<f64>)> {
    let last = step + 1 == spec.steps;
    if !(last || (spec.eval_every > 0 && (step + 1).is_multiple_of(spec.eval_every))) {
        return Ok((None, None));
    }
    let l = eval_loss_on(model, input.eval, spec.batch_size, input.pad, input.comm)?;
    stats.final_eval_loss = l;
    let accuracy = match input.curve {
        Some(c) => Some(c.accuracy(model)?),
        None => None,
    };
    Ok((Some(l), accuracy))
}

/// The optimiser state, step and stage totals of the checkpoint a stage resumes from,
/// checked to be this stage's own.
fn resumed(
    input: &StageInput,
    spec: &TrainSpec,
    dir: &std::path::Path,
    opt: &mut AdamW,
    device: &candle_core::Device,
) -> Result<(usize, StageStats)> {
    let state = checkpoint::load_training_state(dir, opt, device)?;
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
    let stats = StageStats {
        steps: state.step,
        tokens: state.tokens_seen as u64,
        flops: state.flops,
        teacher_flops: state.teacher_flops,
        rollout: state.rollout,
        final_loss: state.last_loss.unwrap_or(0.0),
        ..StageStats::default()
    };
    Ok((state.step, stats))
}

/// The reference loss implements forward KL on full teacher logits only.
fn check_loss(input: &StageInput, loss: &LossSpec, loss_impl: LossImpl) -> Result<()> {
    if loss_impl != LossImpl::Reference {
        return Ok(());
    }
    let divergence = loss.divergence;
    if divergence != Divergence::ForwardKl {
        return Err(Error::Invalid(format!(
            "the reference loss implements forward_kl only, not {divergence}; use the fused loss"
        )));
    }
    let top_k = matches!(
        input.teacher,
        Some(TeacherSource::Online { top_k: Some(_), .. } | TeacherSource::Cache(_))
    );
    if top_k {
        return Err(Error::Invalid(
            "the reference loss takes full teacher logits only, not a top-k teacher or a logit cache; use the fused loss"
                .into(),
        ));
    }
    Ok(())
}

/// This rank's slice of each micro-batch of `step` (with more ranks than examples some
/// get none), and the step's valid tokens on every rank: normalising by those, not per
/// micro-batch, makes the sum of the ranks' gradients the gradient of the global batch.
fn step_batches(
    input: &StageInput,
    spec: &TrainSpec,
    order: &mut Order,
    step: usize,
    device: &candle_core::Device,
) -> Result<(Vec<StepBatch>, f64)> {
    let (rank, world) = (input.comm.rank(), input.comm.world());
    let global: Vec<Vec<usize>> = (0..spec.grad_accum)
        .map(|a| order.micro_batch(step * spec.grad_accum + a, spec.batch_size))
        .collect();
    let denom: usize = global.iter().flatten().map(|&i| input.train[i].loss_tokens()).sum();
    let batches = global
        .iter()
        .map(|idx| idx[shard_range(idx.len(), rank, world)].to_vec())
        .filter(|idx| !idx.is_empty())
        .map(|idx| {
            let items: Vec<&Encoded> = idx.iter().map(|&i| &input.train[i]).collect();
            Ok(StepBatch {
                batch: make_batch(&items, input.pad, device)?,
                idx,
                policy: None,
            })
        })
        .collect::<Result<Vec<StepBatch>>>()?;
    Ok((batches, denom as f64))
}

/// A step with a non-finite loss or gradient: an error with `on_nonfinite = "stop"` or
/// after `MAX_SKIPS_IN_A_ROW` skips in a row, else a message and the step is dropped.
fn skip_or_stop(
    stage: &str,
    spec: &TrainSpec,
    step: usize,
    (term, value): (&'static str, f32),
    skipped_in_a_row: usize,
    progress: &dyn Progress,
) -> Result<()> {
    if spec.on_nonfinite == NonFinitePolicy::Stop || skipped_in_a_row > MAX_SKIPS_IN_A_ROW {
        return Err(Error::NonFinite {
            stage: stage.to_string(),
            step,
            term,
            value,
        });
    }
    progress.message(&format!(
        "{stage}: step {} skipped (non-finite {term} = {value}); on_nonfinite = \"skip\"",
        step + 1
    ));
    Ok(())
}

/// Where the stage stands after `step` steps, for its checkpoint.
fn trainer_state(input: &StageInput, spec: &TrainSpec, step: usize, stats: &StageStats, loss: f32) -> TrainerState {
    TrainerState {
        stage: input.name.to_string(),
        step,
        total_steps: spec.steps,
        micro_batches: step * spec.grad_accum,
        seed: input.seed,
        tokens_seen: stats.tokens as usize,
        last_loss: Some(loss),
        flops: stats.flops,
        teacher_flops: stats.teacher_flops,
        rollout: stats.rollout,
        checksums: Default::default(),
    }
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
        let parts =
            crate::loss::distill_loss(&logits, None, &b.targets, &b.mask, &LossSpec::forward_kl(1.0, 1.0), 1.0)?;
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
            teacher: None,
            loss: LossSpec::CE_ONLY,
            rollouts: None,
            curve: None,
        };
        let ts = TrainSpec {
            steps: 2,
            batch_size,
            grad_accum,
            ..TrainSpec::default()
        };
        train_stage_for_test(&input, &model, &ts)?;
        Ok(model
            .tensors()?
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
        let stats = train(input, model, spec, LossImpl::Reference, &mut save, &Silent)?;
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
            teacher: None,
            loss: LossSpec::CE_ONLY,
            rollouts: None,
            curve: None,
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
        let err = train(&input, &m, &ts, LossImpl::Fused, &mut save, &Silent).unwrap_err();
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
        let stats = train(&input, &m, &ts, LossImpl::Fused, &mut save, &Silent)?;
        assert_eq!(stats.skipped_steps, 3);
        let after = m.params()["model.embed_tokens.weight"]
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(before, after, "a skipped step must not change the weights");

        ts.steps = MAX_SKIPS_IN_A_ROW + 2;
        let m = poisoned()?;
        let err = train(&input, &m, &ts, LossImpl::Fused, &mut save, &Silent).unwrap_err();
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
