//! The batches of the on-policy stages: at each on-policy step the model being trained
//! samples continuations of the step's prompts with the rollout engine, and the samples
//! become the step's micro-batches, scored one of three ways:
//!
//! - **GKD** (`Objective::Distill`): the stage's distillation loss (its teacher and
//!   divergence, usually JSD(beta)) on the student's own samples;
//! - **the sampled-token estimator** (`Objective::SampledToken`): a policy gradient whose
//!   per-token advantage is `log p_teacher(x_t) - log q(x_t)` (`loss::policy`);
//! - **GRPO** (`Objective::Grpo`): G samples per prompt, the verifier's 0/1 reward,
//!   advantages normalised within each group, the clipped objective and an optional KL
//!   penalty to a reference model.
//!
//! Step s draws its prompts from its own position of a seeded prompt order and row r of
//! it samples from the stream `(seed + s, r)`: the samples are a pure function of the
//! weights, the seed and the step, so a stage resumed from a checkpoint samples what the
//! uninterrupted stage sampled.

use std::time::Instant;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::StageStats;
use crate::config::TrainSpec;
use crate::error::{Error, Result};
use crate::loss::policy::{group_advantages, token_log_probs, PolicySpec, PolicyTargets};
use crate::model::generate::{generate_rows, row_rng, Generated, Sampling};
use crate::model::Llama;
use crate::prepare::data::arithmetic;
use crate::prepare::data::batch::{make_batch, Batch, Encoded, Order};
use crate::prepare::tokenizer::Tokenizer;

/// A prompt of the on-policy stages: `[bos] prompt` ids, and the answer the verifier expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutPrompt {
    pub ids: Vec<u32>,
    pub answer: Option<i64>,
}

impl RolloutPrompt {
    /// The prompts of `examples`, encoded as the traces stage encodes them.
    pub fn encode_all(tok: &Tokenizer, examples: &[crate::prepare::data::Example]) -> Result<Vec<Self>> {
        examples
            .iter()
            .map(|e| {
                let mut ids = vec![tok.bos];
                ids.extend(tok.encode(&e.prompt)?);
                Ok(Self { ids, answer: e.answer })
            })
            .collect()
    }
}

/// How the samples of a step are scored.
pub enum Objective<'a> {
    /// GKD: the stage's distillation loss on the samples; a fraction `1 - lambda` of the
    /// steps trains on the stage's fixed data instead.
    Distill { lambda: f64 },
    /// The sampled-token estimator: the policy gradient with the advantage
    /// `log p_teacher(x_t) - log q(x_t)` per token; `lambda` as for `Distill`.
    SampledToken { teacher: &'a Llama, lambda: f64 },
    /// GRPO: `group` samples per prompt and the verifier's reward.
    Grpo {
        group: usize,
        policy: PolicySpec,
        reference: Option<&'a Llama>,
        tok: &'a Tokenizer,
    },
}

/// The rollouts of an on-policy stage.
pub struct Rollouts<'a> {
    pub prompts: &'a [RolloutPrompt],
    /// Temperature, top-p and length of the samples; `seed` seeds every step's streams.
    pub sampling: Sampling,
    pub objective: Objective<'a>,
    /// Samples are cut to `seq_len + 1` ids, as training examples are.
    pub seq_len: usize,
    pub eos: u32,
    /// Rows the engine decodes at once.
    pub batch_rows: usize,
}

/// One micro-batch of a step: the padded batch, the training examples it holds (fixed
/// data) and, for a policy-gradient step, what the policy loss needs.
pub(crate) struct StepBatch {
    pub(crate) batch: Batch,
    pub(crate) idx: Vec<usize>,
    pub(crate) policy: Option<(PolicyTargets, PolicySpec)>,
}

/// The rollout work of a stage so far, for the ledger's split of an on-policy stage into
/// sampling, scoring and the update.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutTotals {
    /// Steps that sampled.
    pub steps: usize,
    /// Rows sampled and tokens they generated.
    pub samples: u64,
    pub sampled_tokens: u64,
    /// FLOPs and seconds of the student's sampling.
    pub sample_flops: f64,
    pub sample_seconds: f64,
    /// FLOPs and seconds of the teacher's (or the reference model's) scoring.
    pub score_flops: f64,
    pub score_seconds: f64,
    /// Sum of the verifier's rewards (GRPO), for the mean reward.
    pub reward_sum: f64,
}

impl Rollouts<'_> {
    /// Whether step `step` of a stage seeded `seed` samples; the others take the fixed data.
    pub(crate) fn on_policy(&self, seed: u64, step: usize) -> bool {
        let lambda = match self.objective {
            Objective::Distill { lambda } | Objective::SampledToken { lambda, .. } => lambda,
            Objective::Grpo { .. } => return true,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6c61_6d62_6461);
        rng.set_stream(step as u64);
        rng.random::<f64>() < lambda
    }

    /// Samples step `step`'s rows (`batch_size * grad_accum` of them) from `model` and
    /// cuts them into micro-batches. Returns them, the step's loss tokens (the loss's
    /// denominator) and the mean reward of a GRPO step.
    pub(crate) fn step_batches(
        &self,
        model: &Llama,
        spec: &TrainSpec,
        order: &mut Order,
        step: usize,
        pad: u32,
        stats: &mut StageStats,
    ) -> Result<(Vec<StepBatch>, f64, Option<f64>)> {
        let rows = spec.batch_size * spec.grad_accum;
        let per_prompt = match self.objective {
            Objective::Grpo { group, .. } => group,
            _ => 1,
        };
        if self.prompts.is_empty() || rows % per_prompt != 0 {
            return Err(Error::Invalid(format!(
                "on-policy step: {} prompts, {rows} rows per step in groups of {per_prompt}",
                self.prompts.len()
            )));
        }
        let chosen = order.micro_batch(step, rows / per_prompt);
        let prompts: Vec<&RolloutPrompt> = chosen
            .iter()
            .flat_map(|&i| std::iter::repeat_n(&self.prompts[i], per_prompt))
            .collect();
        let seqs = self.sample(model, &prompts, step, stats)?;
        let rewards = match &self.objective {
            Objective::Grpo { tok, group, .. } => Some((verify_all(tok, &prompts, &seqs.1)?, *group)),
            _ => None,
        };
        let advantages = match &rewards {
            Some((r, group)) => group_advantages(r, *group)?,
            None => vec![0.0; rows],
        };
        let denom: usize = seqs.0.iter().map(Encoded::loss_tokens).sum();
        let mut batches = Vec::with_capacity(spec.grad_accum);
        for (m, chunk) in seqs.0.chunks(spec.batch_size).enumerate() {
            let items: Vec<&Encoded> = chunk.iter().collect();
            let batch = make_batch(&items, pad, model.device())?;
            let adv = &advantages[m * spec.batch_size..m * spec.batch_size + chunk.len()];
            let policy = self.policy_targets(&batch, adv, stats)?;
            batches.push(StepBatch {
                batch,
                idx: Vec::new(),
                policy,
            });
        }
        let reward = rewards.map(|(r, _)| {
            stats.rollout.reward_sum += r.iter().sum::<f64>();
            r.iter().sum::<f64>() / r.len() as f64
        });
        Ok((batches, denom as f64, reward))
    }

    /// Decodes `prompts` with `model` (row r from the stream `(seed + step, r)`); returns
    /// each row as a training example (prompt, sample, EOS when it ended) and its output.
    fn sample(
        &self,
        model: &Llama,
        prompts: &[&RolloutPrompt],
        step: usize,
        stats: &mut StageStats,
    ) -> Result<(Vec<Encoded>, Vec<Generated>)> {
        let t0 = Instant::now();
        let seed = self.sampling.seed.wrapping_add(step as u64);
        let mut rngs: Vec<ChaCha8Rng> = (0..prompts.len()).map(|r| row_rng(seed, r as u64)).collect();
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let (out, flops) = generate_rows(
            model,
            &ids,
            self.eos,
            &self.sampling,
            &mut rngs,
            self.batch_rows,
            &mut |_| {},
        )?;
        let mut seqs = Vec::with_capacity(out.len());
        for (p, g) in prompts.iter().zip(&out) {
            let mut ids = p.ids.clone();
            ids.extend(&g.ids);
            if g.finished {
                ids.push(self.eos);
            }
            ids.truncate(self.seq_len + 1);
            if ids.len() <= p.ids.len() {
                return Err(Error::Invalid(format!(
                    "an on-policy prompt of {} tokens leaves no room for a sampled token in data.seq_len = {}; \
                     raise data.seq_len or shorten the prompts",
                    p.ids.len(),
                    self.seq_len
                )));
            }
            seqs.push(Encoded {
                prompt_len: p.ids.len(),
                ids,
            });
        }
        let r = &mut stats.rollout;
        r.steps += 1;
        r.samples += out.len() as u64;
        r.sampled_tokens += out.iter().map(|g| g.ids.len() as u64).sum::<u64>();
        r.sample_flops += flops;
        r.sample_seconds += t0.elapsed().as_secs_f64();
        stats.flops += flops;
        Ok((seqs, out))
    }

    /// What the policy loss needs for one micro-batch (None for GKD, which takes the
    /// stage's distillation loss): advantages per position, and the teacher's or the
    /// reference model's log-probability of each sampled token.
    fn policy_targets(
        &self,
        b: &Batch,
        adv: &[f64],
        stats: &mut StageStats,
    ) -> Result<Option<(PolicyTargets, PolicySpec)>> {
        let (rows, t) = b.inputs.dims2()?;
        let per_position: Vec<f32> = adv.iter().flat_map(|&a| std::iter::repeat_n(a as f32, t)).collect();
        let advantages = Tensor::from_vec(per_position, rows * t, b.inputs.device())?;
        Ok(match &self.objective {
            Objective::Distill { .. } => None,
            Objective::SampledToken { teacher, .. } => {
                let teacher_log_probs = Some(score(teacher, b, stats)?);
                let targets = PolicyTargets {
                    advantages,
                    teacher_log_probs,
                    ref_log_probs: None,
                };
                // One update per batch of samples: the ratio is 1 and the clip never binds.
                Some((targets, PolicySpec { clip: 0.2, kl: 0.0 }))
            }
            Objective::Grpo { policy, reference, .. } => {
                let ref_log_probs = match reference {
                    Some(r) if policy.kl > 0.0 => Some(score(r, b, stats)?),
                    _ => None,
                };
                let targets = PolicyTargets {
                    advantages,
                    teacher_log_probs: None,
                    ref_log_probs,
                };
                Some((targets, *policy))
            }
        })
    }
}

/// A frozen model's log-probability of each target of `b` (B*T,), its FLOPs and time
/// billed as scoring.
fn score(model: &Llama, b: &Batch, stats: &mut StageStats) -> Result<Tensor> {
    let t0 = Instant::now();
    let (_, t) = b.inputs.dims2()?;
    let logits = model.forward(&b.inputs)?.flatten_to(1)?.detach();
    let lp = token_log_probs(&logits, &b.targets)?.detach();
    let flops = model.cfg.forward_flops_per_token(t) * b.positions as f64;
    stats.teacher_flops += flops;
    stats.rollout.score_flops += flops;
    stats.rollout.score_seconds += t0.elapsed().as_secs_f64();
    Ok(lp)
}

/// The verifier's reward of each sample: 1 when it ended with the expected answer.
fn verify_all(tok: &Tokenizer, prompts: &[&RolloutPrompt], out: &[Generated]) -> Result<Vec<f64>> {
    prompts
        .iter()
        .zip(out)
        .map(|(p, g)| {
            let text = tok.decode(&g.ids)?;
            let ok = g.finished && p.answer.is_some_and(|a| arithmetic::verify(&text, a));
            Ok(if ok { 1.0 } else { 0.0 })
        })
        .collect()
}
