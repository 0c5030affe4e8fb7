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
                Ok(Self {
                    ids: tok.encode_prompt(&e.prompt)?,
                    answer: e.answer,
                })
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
        if self.prompts.is_empty() || !rows.is_multiple_of(per_prompt) {
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
        if let Objective::Distill { .. } = self.objective {
            return Ok(None);
        }
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
    stats.bill_scoring(model.cfg.forward_flops_per_token(t) * b.positions as f64, t0);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelSpec;
    use crate::distributed::Single;
    use crate::loss::{Divergence, LossSpec};
    use crate::model::ModelConfig;
    use crate::progress::Silent;
    use crate::train::checkpoint::{self, SaveExtras, TrainerState};
    use crate::train::optim::AdamW;
    use crate::train::{train, LossImpl, StageInput, TeacherSource};
    use candle_core::Device;

    const TEXT: &str = "Ava has 3 apples. Then Ava buys 4 more.\n3 + 4 = 7\n#### 7";

    fn tok() -> Tokenizer {
        Tokenizer::train([TEXT; 8].iter().copied(), 300).unwrap()
    }

    fn model(tok: &Tokenizer, hidden: usize, seed: u64) -> Llama {
        let spec = ModelSpec {
            hidden_size: hidden,
            intermediate_size: 2 * hidden,
            num_layers: 1,
            num_heads: 2,
            max_position_embeddings: 64,
            ..ModelSpec::default()
        };
        let cfg = ModelConfig::from_spec(&spec, tok.vocab_size(), tok.bos, tok.eos, tok.pad);
        Llama::init(cfg, 0.3, seed, &Device::Cpu).unwrap()
    }

    fn prompts(tok: &Tokenizer) -> Vec<RolloutPrompt> {
        (1..=6)
            .map(|i| {
                let ids = tok
                    .encode_prompt(&format!("Ava has {i} apples. Then Ava buys 4 more.\n"))
                    .unwrap();
                RolloutPrompt {
                    ids,
                    answer: Some(i + 4),
                }
            })
            .collect()
    }

    fn rollouts<'a>(prompts: &'a [RolloutPrompt], objective: Objective<'a>) -> Rollouts<'a> {
        let eos = tok().eos;
        Rollouts {
            prompts,
            sampling: Sampling::full(16, 1.0, 5),
            objective,
            seq_len: 48,
            eos,
            batch_rows: 8,
        }
    }

    fn spec(steps: usize) -> TrainSpec {
        TrainSpec {
            steps,
            batch_size: 4,
            grad_accum: 2,
            lr: 1e-2,
            warmup_steps: Some(0),
            save_every: 2,
            ..TrainSpec::default()
        }
    }

    fn weights(m: &Llama) -> Vec<Vec<f32>> {
        m.tensors()
            .unwrap()
            .values()
            .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    /// The samples of a step are a pure function of the weights, the seed and the step.
    #[test]
    fn sampling_is_deterministic_for_a_seed() -> Result<()> {
        let tok = tok();
        let (m, p) = (model(&tok, 16, 1), prompts(&tok));
        let r = rollouts(&p, Objective::Distill { lambda: 1.0 });
        let ids = |step: usize| -> Vec<u32> {
            let mut stats = StageStats::default();
            let mut order = Order::new(p.len(), 9);
            let (b, _, _) = r
                .step_batches(&m, &spec(1), &mut order, step, tok.pad, &mut stats)
                .unwrap();
            b.iter()
                .flat_map(|b| b.batch.inputs.flatten_all().unwrap().to_vec1::<u32>().unwrap())
                .collect()
        };
        assert_eq!(ids(3), ids(3));
        assert_ne!(ids(3), ids(4), "two steps drew the same samples");
        // lambda picks a fraction of the steps, the same ones every time.
        let half = rollouts(&p, Objective::Distill { lambda: 0.5 });
        let picked: Vec<bool> = (0..200).map(|s| half.on_policy(3, s)).collect();
        let n = picked.iter().filter(|&&x| x).count();
        assert!((70..130).contains(&n), "{n} of 200 steps on-policy at lambda 0.5");
        assert_eq!(picked, (0..200).map(|s| half.on_policy(3, s)).collect::<Vec<_>>());
        Ok(())
    }

    /// On fixed samples the on-policy loss is the off-policy loss: the micro-batches a
    /// rollout step builds, scored by the stage's JSD, give what the same sequences give
    /// as fixed training data.
    #[test]
    fn the_on_policy_loss_is_the_off_policy_loss_on_the_same_samples() -> Result<()> {
        let tok = tok();
        let (student, teacher, p) = (model(&tok, 16, 1), model(&tok, 24, 2), prompts(&tok));
        let r = rollouts(&p, Objective::Distill { lambda: 1.0 });
        let mut stats = StageStats::default();
        let (batches, denom, _) =
            r.step_batches(&student, &spec(1), &mut Order::new(p.len(), 9), 0, tok.pad, &mut stats)?;
        let source = TeacherSource::Online {
            model: &teacher,
            top_k: None,
        };
        let loss = LossSpec::new(0.0, 1.0, Divergence::Jsd { beta: 0.7 });
        for sb in &batches {
            let on = super::super::step::micro_batch(
                &student,
                sb,
                Some(&source),
                &loss,
                LossImpl::Fused,
                denom,
                &mut stats,
            )?;
            // The same rows as plain data, through the reference composition of the JSD.
            let s_logits = student.forward(&sb.batch.inputs)?.flatten_to(1)?;
            let t_logits = teacher.forward(&sb.batch.inputs)?.flatten_to(1)?;
            let rows = crate::loss::divergence_rows_reference(&s_logits, &t_logits, loss.divergence, 1.0)?;
            let off = (rows * &sb.batch.mask)?.sum_all()?.to_scalar::<f32>()? as f64 / denom;
            assert!(
                (on.total as f64 - off).abs() < 1e-5 * off.abs().max(1.0),
                "{} vs {off}",
                on.total
            );
        }
        Ok(())
    }

    /// The sampled-token estimator's advantage is a Monte-Carlo estimate of the reverse
    /// KL: over many draws from q, the mean of log q(x) - log p(x) approaches KL(q || p).
    #[test]
    fn the_sampled_token_advantage_estimates_the_reverse_kl() -> Result<()> {
        let q_logits = [0.5f32, -1.0, 2.0, 0.0, 1.0];
        let p_logits = [1.0f32, 0.0, 0.5, -0.5, 1.5];
        let log_softmax = |l: &[f32]| -> Vec<f64> {
            let m = l.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let z = l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            l.iter().map(|&x| x as f64 - m - z).collect()
        };
        let (lq, lp) = (log_softmax(&q_logits), log_softmax(&p_logits));
        let exact: f64 = lq.iter().zip(&lp).map(|(a, b)| a.exp() * (a - b)).sum();
        let mut rng = row_rng(11, 0);
        let r = Sampling::full(1, 1.0, 0);
        let n = 40_000;
        let mean = (0..n)
            .map(|_| {
                let x = crate::model::generate::sample(&q_logits, &r, &mut rng) as usize;
                lq[x] - lp[x]
            })
            .sum::<f64>()
            / n as f64;
        assert!((mean - exact).abs() < 0.02, "estimate {mean} vs KL(q||p) {exact}");
        Ok(())
    }

    /// An on-policy stage (GKD, the sampled-token estimator, GRPO with a KL penalty)
    /// killed after its step-2 checkpoint and resumed from it ends bitwise where the
    /// uninterrupted stage ends.
    #[test]
    fn a_resumed_on_policy_stage_equals_the_uninterrupted_one() -> Result<()> {
        let tok = tok();
        let (teacher, reference, p) = (model(&tok, 24, 2), model(&tok, 16, 1), prompts(&tok));
        let objective = |k: usize| match k {
            0 => Objective::Distill { lambda: 0.5 },
            1 => Objective::SampledToken {
                teacher: &teacher,
                lambda: 1.0,
            },
            _ => Objective::Grpo {
                group: 4,
                policy: PolicySpec { clip: 0.2, kl: 0.1 },
                reference: Some(&reference),
                tok: &tok,
            },
        };
        let data: Vec<Encoded> = p
            .iter()
            .map(|x| Encoded {
                ids: [x.ids.clone(), tok.encode("4 + 3 = 7\n#### 7").unwrap(), vec![tok.eos]].concat(),
                prompt_len: x.ids.len(),
            })
            .collect();
        // A start that has learnt to answer "7", so that its samples get mixed rewards.
        let start = model(&tok, 16, 1);
        let sft = StageInput {
            name: "sft",
            train: &data,
            eval: &data,
            pad: tok.pad,
            seed: 4,
            resume_from: None,
            comm: &Single,
            teacher: None,
            loss: LossSpec::CE_ONLY,
            rollouts: None,
            curve: None,
        };
        let mut no_save = |_: &Llama, _: &AdamW, _: &TrainerState| Ok(());
        let sft_spec = TrainSpec {
            save_every: 0,
            ..spec(80)
        };
        train(&sft, &start, &sft_spec, LossImpl::Fused, &mut no_save, &Silent)?;
        for k in 0..3 {
            let r = rollouts(&p, objective(k));
            let dir = tempfile::tempdir().unwrap();
            let run = |m: &Llama, resume: Option<&std::path::Path>| -> Result<StageStats> {
                let input = StageInput {
                    name: "s",
                    train: &data,
                    eval: &data,
                    pad: tok.pad,
                    seed: 4,
                    resume_from: resume,
                    comm: &Single,
                    teacher: Some(TeacherSource::Online {
                        model: &teacher,
                        top_k: None,
                    }),
                    loss: LossSpec::new(0.0, 1.0, Divergence::Jsd { beta: 1.0 }),
                    rollouts: Some(&r),
                    curve: None,
                };
                let mut save = |m: &Llama, o: &AdamW, s: &TrainerState| {
                    let extras = SaveExtras {
                        tokenizer: &tok,
                        resolved_config: "",
                        state: Some(s),
                        optimizer: Some(o),
                    };
                    checkpoint::save(&dir.path().join(format!("step-{}", s.step)), m, &extras)
                };
                train(&input, m, &spec(4), LossImpl::Fused, &mut save, &Silent)
            };
            let whole = Llama::from_tensors(start.cfg.clone(), start.tensors()?, &Device::Cpu)?;
            let stats = run(&whole, None)?;
            let at2 = dir.path().join("step-2");
            let (resumed, _) = checkpoint::load(&at2, &Device::Cpu)?;
            let resumed_stats = run(&resumed, Some(&at2))?;
            assert!(
                weights(&whole) == weights(&resumed),
                "objective {k}: resumed weights differ"
            );
            assert_eq!(stats.rollout.samples, resumed_stats.rollout.samples, "objective {k}");
            if k == 2 {
                // Mixed rewards, so GRPO's advantages are not all zero.
                let (sum, n) = (stats.rollout.reward_sum, stats.rollout.samples as f64);
                assert!(sum > 0.0 && sum < n, "objective {k}: reward {sum} of {n} samples");
            }
        }
        Ok(())
    }
}
