//! The stages that train a student on its own samples, after the other students:
//! `student-onpolicy` (on-policy distillation from the trained `student`, GKD) and
//! `student-rl` (GRPO on the verifier's reward, from the `baseline` or the `student`).

use std::path::{Path, PathBuf};

use super::prepare::Prepared;
use super::stage::{train_stage, StageData, StageEnv};
use super::students::Plan;
use super::sub_seed;
use crate::config::Estimator;
use crate::cost::heartbeat::Heartbeat;
use crate::cost::ledger::Ledger;
use crate::error::{Error, Result};
use crate::loss::policy::PolicySpec;
use crate::loss::{Divergence, LossSpec};
use crate::model::generate::Sampling;
use crate::model::Llama;
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
    let n = prep.splits.train.len();
    let examples = &prep.splits.train[n - cfg.student.train_examples.unwrap_or(n).min(n)..];
    let prompts = RolloutPrompt::encode_all(&prep.tok, examples)?;
    if cfg.onpolicy.enabled {
        let trained = onpolicy(env, prep, plans, teacher.0, &prompts, students, ledger, heartbeat)?;
        students.push(trained);
    }
    if cfg.rl.enabled {
        let with_answers: Vec<RolloutPrompt> = prompts.into_iter().filter(|p| p.answer.is_some()).collect();
        let trained = rl(env, prep, plans, &with_answers, students, ledger, heartbeat)?;
        students.push(trained);
    }
    Ok(())
}

/// A copy of the trained stage `name`, to start another stage from.
fn start_from(students: &[Trained], name: &str, env: &StageEnv) -> Result<Llama> {
    let (_, m, _) = students.iter().find(|(n, _, _)| *n == name).ok_or_else(|| {
        Error::Invalid(format!(
            "the stage that starts from `{name}` finds no such student in this run; enable it, or start from another"
        ))
    })?;
    Llama::from_tensors(m.cfg.clone(), m.tensors(), env.dev)
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
        sampling: Sampling {
            max_new_tokens: o.max_new_tokens,
            temperature: o.temperature,
            top_p: 1.0,
            seed: sub_seed(cfg.run.seed, "onpolicy-samples"),
        },
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
        sampling: Sampling {
            max_new_tokens: r.max_new_tokens,
            temperature: r.temperature,
            top_p: 1.0,
            seed: sub_seed(cfg.run.seed, "rl-samples"),
        },
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
