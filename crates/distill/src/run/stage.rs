//! One training stage as the run drives it: start it, or continue it from its newest
//! checkpoint that passes its checksums, or load it when a resumed run finds it
//! complete; rotate its periodic checkpoints; record its cost in the ledger.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::prepare::Prepared;
use super::sub_seed;
use crate::config::{Config, StudentInit};
use crate::cost::heartbeat::Heartbeat;
use crate::cost::ledger::{Ledger, StageCost, WorkSplit};
use crate::device::DeviceInfo;
use crate::distributed::Collective;
use crate::error::{Error, IoContext, Result};
use crate::loss::LossSpec;
use crate::model::Llama;
use crate::model::ModelConfig;
use crate::prepare::data::batch;
use crate::progress::Progress;
use crate::teacher::prune::{prune_plan, pruned_student};
use crate::train::checkpoint;
use crate::train::rollout::RolloutTotals;
use crate::train::{self, LossImpl, StageInput, TeacherSource};

/// What every training stage shares.
pub(crate) struct StageEnv<'a> {
    pub(crate) cfg: &'a Config,
    pub(crate) run_dir: &'a Path,
    pub(crate) dev: &'a Device,
    pub(crate) info: &'a DeviceInfo,
    pub(crate) eval: &'a [batch::Encoded],
    pub(crate) pad: u32,
    pub(crate) loss_impl: LossImpl,
    pub(crate) resume: bool,
    pub(crate) save: &'a dyn Fn(&Path, &Llama, &crate::train::optim::AdamW, &checkpoint::TrainerState) -> Result<()>,
    /// The ranks of this job; rank 0 alone writes checkpoints.
    pub(crate) comm: &'a dyn Collective,
    /// Compute dtype of the trained models (f32 master weights).
    pub(crate) dtype: candle_core::DType,
    /// Fused CPU kernels or plain ops (`[run] kernels`).
    pub(crate) kernels: crate::config::Kernels,
    /// Held-out accuracy at every `eval_every` step of the student stages.
    pub(crate) curve: Option<&'a crate::train::Curve<'a>>,
}

/// What one training stage learns from.
pub(crate) struct StageData<'a> {
    pub(crate) name: &'a str,
    pub(crate) train: &'a [batch::Encoded],
    pub(crate) seed: u64,
    /// The teacher it distils from, and the loss; None trains on the labels alone.
    pub(crate) teacher: Option<(TeacherSource<'a>, LossSpec)>,
    pub(crate) spec: &'a crate::config::TrainSpec,
    /// An on-policy stage's rollouts.
    pub(crate) rollouts: Option<&'a crate::train::rollout::Rollouts<'a>>,
}

/// Where a stage keeps its periodic checkpoints: `checkpoints/<stage>/step-NNNNNN`.
pub(crate) fn checkpoint_root(run_dir: &Path, stage: &str) -> PathBuf {
    run_dir.join("checkpoints").join(stage)
}

/// The periodic checkpoints of a stage, newest first.
pub(crate) fn periodic_checkpoints(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.reverse();
    dirs
}

/// Trains one stage, or continues it from its newest checkpoint that passes
/// its checksums (an older one is used, with a warning, when the newest is
/// damaged), or loads it when a resumed run finds it complete.
pub(crate) fn train_stage(
    env: &StageEnv,
    data: &StageData,
    init: impl FnOnce() -> Result<Llama>,
    ledger: &mut Ledger,
    progress: &Heartbeat,
) -> Result<(Llama, PathBuf)> {
    let name = data.name;
    let dir = env.run_dir.join(name);
    let root = checkpoint_root(env.run_dir, name);
    if env.resume {
        if let Ok(state) = checkpoint::verify(&dir) {
            if state.stage == name && state.step == state.total_steps {
                let (mut model, _) = checkpoint::load(&dir, env.dev)?;
                model.set_compute_dtype(env.dtype)?;
                model.set_kernels(env.kernels);
                if !ledger.completed(name) {
                    // Killed after the final checkpoint, before its ledger line: the
                    // stage's work that no segment of it has billed yet, and the loading.
                    let billed = ledger.summary().stage(name).unwrap_or_default();
                    let flops = (state.flops + state.teacher_flops - billed.flops).max(0.0);
                    let mut work = StageCost::work(name, env.info, &env.cfg.cost, 0, flops, 0.0);
                    work.stage_flops = Some((state.flops, state.teacher_flops));
                    ledger.record(work)?;
                    progress.clear_after(ledger);
                }
                progress.message(&format!("{name}: complete, loaded from {}", dir.display()));
                return Ok((model, dir));
            }
        }
    }
    let mut resume_from = None;
    if env.resume {
        for cand in periodic_checkpoints(&root) {
            match checkpoint::verify(&cand) {
                Ok(_) => {
                    resume_from = Some(cand);
                    break;
                }
                Err(e) => progress.message(&format!("warning: skipping a damaged checkpoint: {e}")),
            }
        }
    }
    let mut model = match &resume_from {
        Some(d) => {
            progress.message(&format!("{name}: resuming from {}", d.display()));
            checkpoint::load(d, env.dev)?.0
        }
        None => init()?,
    };
    model.set_compute_dtype(env.dtype)?;
    model.set_kernels(env.kernels);
    if env.comm.world() > 1 {
        same_on_every_rank(env.comm, &format!("{name} initial weights"), &weights_id(&model)?)?;
    }
    let resumed = match &resume_from {
        Some(d) => Some(checkpoint::verify(d)?),
        None => None,
    };
    let from_step = resumed.as_ref().map_or(0, |s| s.step);
    progress.truncate_metrics(name, from_step)?;
    let keep = env.cfg.run.keep_checkpoints;
    let mut save = |m: &Llama, o: &crate::train::optim::AdamW, s: &checkpoint::TrainerState| {
        if !env.comm.is_root() {
            return Ok(());
        }
        if s.step == s.total_steps {
            return (env.save)(&dir, m, o, s);
        }
        (env.save)(&root.join(format!("step-{:06}", s.step)), m, o, s)?;
        for old in periodic_checkpoints(&root).into_iter().skip(keep) {
            std::fs::remove_dir_all(&old).at(&old)?;
        }
        Ok(())
    };
    let input = StageInput {
        name,
        train: data.train,
        eval: env.eval,
        pad: env.pad,
        seed: data.seed,
        resume_from: resume_from.as_deref(),
        comm: env.comm,
        teacher: data.teacher.map(|(t, _)| t),
        loss: data.teacher.map_or(LossSpec::CE_ONLY, |(_, l)| l),
        rollouts: data.rollouts,
        curve: env.curve,
    };
    let stats = train::train(&input, &model, data.spec, env.loss_impl, &mut save, progress)?;
    // This segment's own work: a resumed stage restored the totals of the segments before.
    let (tokens, flops, teacher_flops) = match &resumed {
        Some(s) => (
            stats.tokens - (s.tokens_seen as u64).min(stats.tokens),
            stats.flops - s.flops,
            stats.teacher_flops - s.teacher_flops,
        ),
        None => (stats.tokens, stats.flops, stats.teacher_flops),
    };
    let mut work = StageCost::work(name, env.info, &env.cfg.cost, tokens, flops, teacher_flops);
    if resumed.is_some() {
        work.stage_flops = Some((stats.flops, stats.teacher_flops));
    }
    work.split = work_split(&stats.rollout, resumed.as_ref().map(|s| &s.rollout));
    ledger.record(work.on_ranks(env.comm.world(), stats.comm_seconds, Some(stats.steps)))?;
    progress.clear_after(ledger);
    Ok((model, dir))
}

/// This segment's sampling and scoring (the stage's totals less those a resumed
/// checkpoint restored); None for a stage that did neither.
fn work_split(total: &RolloutTotals, before: Option<&RolloutTotals>) -> Option<WorkSplit> {
    let b = before.copied().unwrap_or_default();
    let split = WorkSplit {
        sample_seconds: total.sample_seconds - b.sample_seconds,
        sample_flops: total.sample_flops - b.sample_flops,
        score_seconds: total.score_seconds - b.score_seconds,
        score_flops: total.score_flops - b.score_flops,
    };
    (split != WorkSplit::default()).then_some(split)
}

/// SHA-256 of a model's weights, in name order.
pub(crate) fn weights_id(m: &Llama) -> Result<String> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for (name, t) in m.tensors()? {
        h.update(name.as_bytes());
        for x in t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()? {
            h.update(x.to_le_bytes());
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Errors unless every rank has the same `id` for `what` (a hash of what the replicas must
/// share); every rank calls it.
pub(crate) fn same_on_every_rank(comm: &dyn Collective, what: &str, id: &str) -> Result<()> {
    let all = comm.gather_bytes(id.as_bytes())?;
    if let Some(r) = all.iter().position(|x| x != &all[0]) {
        return Err(Error::Distributed(format!(
            "rank {r} and rank 0 differ in their {what}: every rank must read the same files (a data or \
             tokenizer path local to each host?) with the same build"
        )));
    }
    Ok(())
}

/// A pruned student's targets are checked against the teacher's architecture before
/// the teacher is trained, not after.
pub(crate) fn check_prune_plan(env: &StageEnv, prep: &Prepared, loaded: Option<&Llama>) -> Result<()> {
    let cfg = env.cfg;
    if cfg.student.init == StudentInit::Random {
        return Ok(());
    }
    let teacher_cfg = match loaded {
        Some(m) => m.cfg.clone(),
        None => ModelConfig::from_spec(&cfg.teacher.model, prep.vocab, prep.tok.bos, prep.tok.eos, prep.tok.pad),
    };
    prune_plan(&teacher_cfg, cfg).map(|_| ())
}

/// The `teacher` stage: the loaded teacher, or one trained on the teacher's examples.
pub(crate) fn teacher(
    env: &StageEnv,
    prep: &Prepared,
    loaded: Option<(Llama, PathBuf)>,
    ledger: &mut Ledger,
    heartbeat: &Heartbeat,
) -> Result<(Llama, PathBuf)> {
    if let Some((m, dir)) = loaded {
        heartbeat.message(&format!("teacher: loaded from {}", dir.display()));
        return Ok((m, dir));
    }
    let (cfg, tok, seed) = (env.cfg, &prep.tok, env.cfg.run.seed);
    let mcfg = ModelConfig::from_spec(&cfg.teacher.model, prep.vocab, tok.bos, tok.eos, tok.pad);
    let init = || {
        Llama::init(
            mcfg,
            cfg.teacher.model.init_std,
            sub_seed(seed, "teacher-init"),
            env.dev,
        )
    };
    let data = StageData {
        name: "teacher",
        train: prep.train_slices(cfg).0,
        seed: sub_seed(seed, "teacher-data"),
        teacher: None,
        spec: &cfg.teacher.train,
        rollouts: None,
    };
    train_stage(env, &data, init, ledger, heartbeat)
}

/// The `prune` stage: a student cut from the teacher (Minitron), before the teacher is
/// stored in the compute dtype; None when every student starts from random weights.
pub(crate) fn prune(
    env: &StageEnv,
    prep: &Prepared,
    teacher: &Llama,
    ledger: &mut Ledger,
    heartbeat: &Heartbeat,
) -> Result<Option<Llama>> {
    let cfg = env.cfg;
    if cfg.student.init == StudentInit::Random {
        return Ok(None);
    }
    heartbeat.stage_start("prune", 0);
    let (model, flops, calib_tokens) = pruned_student(teacher, cfg, prep.train_slices(cfg).1, env.dev, heartbeat)?;
    // Every rank prunes the same way on the same calibration data (so that each holds
    // the student with no broadcast): the devices billed did world x one rank's work
    // (tokens and FLOPs, as the training stages sum theirs over the ranks), and the
    // peak the MFU divides by is the world's.
    let flops = flops * env.comm.world() as f64;
    let calib_tokens = calib_tokens * env.comm.world() as u64;
    // A resumed run prunes again (the result is deterministic), and that time is billed too.
    ledger.record(StageCost::work("prune", env.info, &cfg.cost, calib_tokens, flops, 0.0))?;
    heartbeat.clear_after(ledger);
    Ok(Some(model))
}
