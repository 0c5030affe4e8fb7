//! The student stages: which students train, on which data, with or without the
//! teacher, and from which initial weights; then each one's training stage.
//!
//! Logit distillation trains `student` (with the teacher) and `baseline` (the same
//! student, initial weights and data order, without it). The R1 recipe trains on the
//! verified traces instead: `student`, `student-kd` (traces plus logit KD), `baseline`
//! (final answers only) and `oracle` (the generator's gold solutions).

use std::path::{Path, PathBuf};

use super::prepare::{students_part, Prepared};
use super::stage::{train_stage, StageData, StageEnv};
use super::sub_seed;
use super::teacher_outputs::{teacher_logit_cache, traces_stage};
use crate::config::StudentInit;
use crate::cost::heartbeat::Heartbeat;
use crate::cost::ledger::Ledger;
use crate::error::{Error, Result};
use crate::evaluate::report::TracesReport;
use crate::loss::LossSpec;
use crate::model::{Llama, ModelConfig};
use crate::prepare::data::batch::{self, Encoded};
use crate::prepare::data::Example;
use crate::teacher::logit_cache;
use crate::train::TeacherSource;

/// One student stage: its name, its training data, and whether it learns from the teacher.
pub(crate) struct Plan {
    pub(crate) name: &'static str,
    pub(crate) train: Vec<Encoded>,
    pub(crate) with_teacher: bool,
}

/// The student stages of this run, in order. With the R1 recipe this runs the traces
/// stage first, and returns its report.
pub(crate) fn plans(
    env: &StageEnv,
    prep: &Prepared,
    teacher: (&Llama, &Path),
    ledger: &mut Ledger,
    heartbeat: &Heartbeat,
) -> Result<(Vec<Plan>, Option<TracesReport>)> {
    let cfg = env.cfg;
    let plan = |name, train, with_teacher| Plan {
        name,
        train,
        with_teacher,
    };
    let (mut plans, report) = if cfg.traces.enabled {
        let examples = students_part(cfg, &prep.splits.train);
        let (kept, report) = traces_stage(env, prep, teacher, examples, ledger, heartbeat)?;
        let answers_only: Vec<Example> = examples
            .iter()
            .filter_map(|e| {
                e.answer.map(|a| Example {
                    prompt: e.prompt.clone(),
                    completion: format!("#### {a}"),
                    answer: Some(a),
                })
            })
            .collect();
        let enc = |ex: &[Example]| batch::encode(&prep.tok, ex, cfg.data.seq_len).map(|r| r.0);
        let kept_enc = enc(&kept)?;
        let mut plans = vec![plan("student", kept_enc.clone(), false)];
        if cfg.traces.logit_kd {
            plans.push(plan("student-kd", kept_enc, true));
        }
        plans.push(plan("baseline", enc(&answers_only)?, false));
        if cfg.traces.oracle {
            plans.push(plan("oracle", enc(examples)?, false));
        }
        (plans, Some(report))
    } else {
        let (_, student_train) = prep.train_slices(cfg);
        let plans = vec![
            plan("student", student_train.to_vec(), true),
            plan("baseline", student_train.to_vec(), false),
        ];
        (plans, None)
    };
    if cfg.student.init == StudentInit::Both {
        // The pruned-init twin of the distilled student, on the same data.
        if let Some(i) = plans.iter().position(|p| p.name == "student") {
            let twin = plan("student-pruned", plans[i].train.clone(), plans[i].with_teacher);
            plans.insert(i + 1, twin);
        }
    }
    Ok((plans, report))
}

/// Trains every planned student (with the logit-cache stage before a student that
/// distils from the cache). Pruned students fix the architecture of all of them.
#[allow(clippy::type_complexity)]
pub(crate) fn train_students(
    env: &StageEnv,
    prep: &Prepared,
    plans: &[Plan],
    teacher: (&Llama, &Path),
    pruned: Option<&Llama>,
    ledger: &mut Ledger,
    heartbeat: &Heartbeat,
) -> Result<(Vec<(&'static str, Llama, PathBuf)>, Option<logit_cache::Index>)> {
    let cfg = env.cfg;
    let tok = &prep.tok;
    let scfg = match pruned {
        Some(p) => p.cfg.clone(),
        None => ModelConfig::from_spec(&cfg.student.model, prep.vocab, tok.bos, tok.eos, tok.pad),
    };
    let student_seed = sub_seed(cfg.run.seed, "student-init");
    let starts_pruned = |name: &str| match cfg.student.init {
        StudentInit::Random => false,
        StudentInit::Pruned => !matches!(name, "baseline" | "oracle"),
        StudentInit::Both => name == "student-pruned",
    };
    let mut students = Vec::new();
    let mut cache_report = None;
    for p in plans {
        if p.train.is_empty() {
            return Err(Error::Invalid(format!(
                "stage {}: no training examples fit in data.seq_len = {}",
                p.name, cfg.data.seq_len
            )));
        }
        // Stage: the offline logit cache, over the data of the student that distils from it.
        let cache = if p.with_teacher && cfg.distill.logit_cache {
            let c = teacher_logit_cache(env, teacher, &p.train, prep.vocab, ledger, heartbeat)?;
            // Rank 0 indexed the ranks' shards; every rank reads them.
            cache_report = Some(c.index.clone());
            Some(c)
        } else {
            None
        };
        let source = match &cache {
            Some(c) => TeacherSource::Cache(c),
            None => TeacherSource::Online {
                model: teacher.0,
                top_k: (cfg.distill.top_k > 0).then_some(cfg.distill.top_k),
            },
        };
        let init = || match (pruned, starts_pruned(p.name)) {
            (Some(m), true) => Llama::from_tensors(m.cfg.clone(), m.tensors()?, env.dev),
            _ => Llama::init(scfg.clone(), cfg.student.model.init_std, student_seed, env.dev),
        };
        let data = StageData {
            name: p.name,
            train: &p.train,
            seed: sub_seed(cfg.run.seed, "student-data"),
            teacher: p.with_teacher.then_some((source, LossSpec::of(&cfg.distill))),
            spec: &cfg.student.train,
            rollouts: None,
        };
        let (model, dir) = train_stage(env, &data, init, ledger, heartbeat)?;
        students.push((p.name, model, dir));
    }
    Ok((students, cache_report))
}
