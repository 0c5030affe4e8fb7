//! The stages that train a student on its own samples, after the other students:
//! `student-onpolicy` (on-policy distillation from the trained `student`, GKD), its
//! control `student-sft-more` (more SFT for the same student FLOPs), and `student-rl`
//! (GRPO on the verifier's reward, from the `baseline` or the `student`).

use std::path::{Path, PathBuf};

use super::prepare::{students_part, Prepared};
use super::stage::{train_stage, StageData, StageEnv};
use super::students::Plan;
use super::sub_seed;
use crate::config::{Config, Estimator, PromptPool, TrainSpec};
use crate::cost::heartbeat::Heartbeat;
use crate::cost::ledger::Ledger;
use crate::error::{Error, Result};
use crate::loss::policy::PolicySpec;
use crate::loss::{Divergence, LossSpec};
use crate::model::generate::Sampling;
use crate::model::Llama;
use crate::prepare::data::batch::Order;
use crate::prepare::data::Example;
use crate::progress::Progress as _;
use crate::train::checkpoint;
use crate::train::rollout::{Objective, RolloutPrompt, Rollouts};
use crate::train::TeacherSource;

/// A trained student stage: its name, model and checkpoint folder.
pub(crate) type Trained = (&'static str, Llama, PathBuf);

/// Runs the on-policy and RL stages the config enables, appending them to `students`.
pub(crate) fn stages(
    env: &StageEnv,
    prep: &Prepared,
    plans: &[Plan],
    teacher: (&Llama, &Path),
    students: &mut Vec<Trained>,
    ledger: &mut Ledger,
    heartbeat: &Heartbeat,
) -> Result<()> {
    let cfg = env.cfg;
    if !cfg.onpolicy.enabled && !cfg.rl.enabled {
        return Ok(());
    }
    let train = &prep.splits.train;
    if cfg.onpolicy.enabled {
        let prompts = RolloutPrompt::encode_all(&prep.tok, onpolicy_problems(cfg, train, &prep.prompt_file))?;
        let trained = onpolicy(env, prep, plans, teacher.0, &prompts, students, ledger, heartbeat)?;
        let target = checkpoint::verify(&trained.2)?.flops;
        students.push(trained);
        if cfg.onpolicy.sft_control {
            let control = sft_control(env, plans, students, target, ledger, heartbeat)?;
            students.push(control);
        }
    }
    if cfg.rl.enabled {
        let prompts = RolloutPrompt::encode_all(&prep.tok, students_part(cfg, train))?;
        let with_answers: Vec<RolloutPrompt> = prompts.into_iter().filter(|p| p.answer.is_some()).collect();
        let trained = rl(env, prep, plans, &with_answers, students, ledger, heartbeat)?;
        students.push(trained);
    }
    Ok(())
}

/// The problems whose prompts `student-onpolicy` samples on (`onpolicy.prompts`): the
/// students', every training problem, or `file`, the prompts of `onpolicy.prompts_path`.
fn onpolicy_problems<'a>(cfg: &Config, train: &'a [Example], file: &'a [Example]) -> &'a [Example] {
    match cfg.onpolicy.prompts {
        PromptPool::Student => students_part(cfg, train),
        PromptPool::Train => train,
        PromptPool::File => file,
    }
}

/// A copy of the trained stage `name`, to start another stage from.
fn start_from(students: &[Trained], name: &str, env: &StageEnv) -> Result<Llama> {
    let (_, m, _) = students.iter().find(|(n, _, _)| *n == name).ok_or_else(|| {
        Error::Invalid(format!(
            "the stage that starts from `{name}` finds no such student in this run; enable it, or start from another"
        ))
    })?;
    Llama::from_tensors(m.cfg.clone(), m.tensors()?, env.dev)
}

/// The training data of the planned stage `name`.
fn data_of<'a>(plans: &'a [Plan], name: &str) -> Result<&'a [crate::prepare::data::batch::Encoded]> {
    plans
        .iter()
        .find(|p| p.name == name)
        .map(|p| p.train.as_slice())
        .ok_or_else(|| Error::Invalid(format!("no `{name}` stage in this run to take data from")))
}

/// `student-onpolicy`: the trained student samples, the teacher grades every token.
#[allow(clippy::too_many_arguments)]
fn onpolicy(
    env: &StageEnv,
    prep: &Prepared,
    plans: &[Plan],
    teacher: &Llama,
    prompts: &[RolloutPrompt],
    students: &[Trained],
    ledger: &mut Ledger,
    heartbeat: &Heartbeat,
) -> Result<Trained> {
    let (cfg, o) = (env.cfg, &env.cfg.onpolicy);
    let objective = match o.estimator {
        Estimator::Full => Objective::Distill { lambda: o.lambda },
        Estimator::SampledToken => Objective::SampledToken {
            teacher,
            lambda: o.lambda,
        },
    };
    let rollouts = Rollouts {
        prompts,
        sampling: Sampling::full(
            o.max_new_tokens,
            o.temperature,
            sub_seed(cfg.run.seed, "onpolicy-samples"),
        ),
        objective,
        seq_len: cfg.data.seq_len,
        eos: prep.tok.eos,
        batch_rows: o.train.batch_size * o.train.grad_accum,
    };
    let source = TeacherSource::Online {
        model: teacher,
        top_k: (o.top_k > 0).then_some(o.top_k),
    };
    // The divergence alone: the samples are the student's own, with no labels to learn.
    let loss = LossSpec::new(0.0, 1.0, Divergence::Jsd { beta: o.beta });
    let data = StageData {
        name: "student-onpolicy",
        train: data_of(plans, "student")?,
        seed: sub_seed(cfg.run.seed, "student-onpolicy"),
        teacher: Some((source, loss)),
        spec: &o.train,
        rollouts: Some(&rollouts),
    };
    let init = || start_from(students, "student", env);
    let (model, dir) = train_stage(env, &data, init, ledger, heartbeat)?;
    Ok(("student-onpolicy", model, dir))
}

/// `student-sft-more`: the SFT student trained further on its traces, with the on-policy
/// stage's optimiser settings, for the first step count whose student FLOPs reach
/// `target` (the on-policy stage's, sampling included).
fn sft_control(
    env: &StageEnv,
    plans: &[Plan],
    students: &[Trained],
    target: f64,
    ledger: &mut Ledger,
    heartbeat: &Heartbeat,
) -> Result<Trained> {
    let cfg = env.cfg;
    let train = data_of(plans, "student")?;
    let seed = sub_seed(cfg.run.seed, "student-sft-more");
    let o = &cfg.onpolicy.train;
    let model_cfg = &students
        .iter()
        .find(|(n, _, _)| *n == "student")
        .map(|s| &s.1.cfg)
        .ok_or_else(|| Error::Invalid("student-sft-more starts from `student`, which this run did not train".into()))?;
    // The FLOPs of the training loop's micro-batches, in its own order (`train::step_batches`).
    let mut order = Order::new(train.len(), seed);
    let (mut flops, mut steps) = (0.0, 0);
    while flops < target {
        for a in 0..o.grad_accum {
            let idx = order.micro_batch(steps * o.grad_accum + a, o.batch_size);
            let t = idx.iter().map(|&i| train[i].ids.len() - 1).max().unwrap_or(0);
            flops += 3.0 * model_cfg.forward_flops_per_token(t) * (idx.len() * t) as f64;
        }
        steps += 1;
    }
    let spec = TrainSpec {
        steps: steps.max(1),
        warmup_steps: o.warmup_steps.map(|w| w.min(steps.max(1))),
        ..o.clone()
    };
    let data = StageData {
        name: "student-sft-more",
        train,
        seed,
        teacher: None,
        spec: &spec,
        rollouts: None,
    };
    heartbeat.message(&format!(
        "student-sft-more: {steps} steps of SFT on the traces match student-onpolicy's {target:.3e} student FLOPs"
    ));
    let init = || start_from(students, "student", env);
    let (model, dir) = train_stage(env, &data, init, ledger, heartbeat)?;
    Ok(("student-sft-more", model, dir))
}

/// `student-rl`: GRPO with the verifier's reward from the configured start.
fn rl(
    env: &StageEnv,
    prep: &Prepared,
    plans: &[Plan],
    prompts: &[RolloutPrompt],
    students: &[Trained],
    ledger: &mut Ledger,
    heartbeat: &Heartbeat,
) -> Result<Trained> {
    let (cfg, r) = (env.cfg, &env.cfg.rl);
    if prompts.is_empty() {
        return Err(Error::Invalid(
            "[rl]: none of the students' training examples has an answer for the verifier to check".into(),
        ));
    }
    let start = r.start.stage();
    let reference = if r.kl > 0.0 {
        Some(start_from(students, start, env)?)
    } else {
        None
    };
    let rollouts = Rollouts {
        prompts,
        sampling: Sampling::full(r.max_new_tokens, r.temperature, sub_seed(cfg.run.seed, "rl-samples")),
        objective: Objective::Grpo {
            group: r.group,
            policy: PolicySpec { clip: r.clip, kl: r.kl },
            reference: reference.as_ref(),
            tok: &prep.tok,
        },
        seq_len: cfg.data.seq_len,
        eos: prep.tok.eos,
        batch_rows: r.train.batch_size * r.train.grad_accum,
    };
    let data = StageData {
        name: "student-rl",
        // Every step samples; the start's data only sizes the (unused) fixed order.
        train: data_of(plans, start)?,
        seed: sub_seed(cfg.run.seed, "student-rl"),
        teacher: None,
        spec: &r.train,
        rollouts: Some(&rollouts),
    };
    let init = || start_from(students, start, env);
    let (model, dir) = train_stage(env, &data, init, ledger, heartbeat)?;
    Ok(("student-rl", model, dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(n: usize) -> Vec<Example> {
        (0..n)
            .map(|i| Example {
                prompt: format!("problem {i}\n"),
                completion: String::new(),
                answer: None,
            })
            .collect()
    }

    #[test]
    fn the_onpolicy_prompts_are_the_students_problems_every_problem_or_the_file() {
        let (train, file) = (examples(10), examples(3));
        let prompts = |n: Option<usize>, kind| -> Vec<String> {
            let mut cfg = Config::default();
            cfg.student.train_examples = n;
            cfg.onpolicy.prompts = kind;
            onpolicy_problems(&cfg, &train, &file)
                .iter()
                .map(|e| e.prompt.clone())
                .collect()
        };
        let last4: Vec<String> = (6..10).map(|i| format!("problem {i}\n")).collect();
        assert_eq!(prompts(Some(4), PromptPool::Student), last4);
        let all: Vec<String> = (0..10).map(|i| format!("problem {i}\n")).collect();
        assert_eq!(prompts(Some(4), PromptPool::Train), all);
        assert_eq!(prompts(None, PromptPool::Student), all);
        assert_eq!(
            prompts(Some(50), PromptPool::Student),
            all,
            "more than there are takes them all"
        );
        assert_eq!(prompts(Some(4), PromptPool::File), all[..3]);
    }
}
