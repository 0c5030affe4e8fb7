//! One training stage as the run drives it: start it, or continue it from its newest
//! checkpoint that passes its checksums, or load it when a resumed run finds it
//! complete; rotate its periodic checkpoints; record its cost in the ledger.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;

use crate::config::Config;
use crate::cost::heartbeat::Heartbeat;
use crate::cost::ledger::{Ledger, StageCost};
use crate::device::DeviceInfo;
use crate::distributed::Collective;
use crate::error::{Error, IoContext, Result};
use crate::model::Llama;
use crate::prepare::data::batch;
use crate::progress::Progress;
use crate::train::checkpoint;
use crate::train::{self, LossImpl, StageInput, Teacher};

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
}

/// What one training stage learns from.
pub(crate) struct StageData<'a> {
    pub(crate) name: &'a str,
    pub(crate) train: &'a [batch::Encoded],
    pub(crate) seed: u64,
    pub(crate) teacher: Option<&'a Teacher<'a>>,
    pub(crate) spec: &'a crate::config::TrainSpec,
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
                    // Killed after the final checkpoint, before its ledger line.
                    ledger.record(StageCost::new(
                        name,
                        env.info,
                        &env.cfg.cost,
                        0.0,
                        state.tokens_seen as u64,
                        state.flops,
                        state.teacher_flops,
                    ))?;
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
    let from_step = match &resume_from {
        Some(d) => checkpoint::verify(d)?.step,
        None => 0,
    };
    progress.truncate_metrics(name, from_step)?;
    let t0 = Instant::now();
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
    };
    let stats = train::train(
        &input,
        &model,
        data.teacher,
        data.spec,
        env.loss_impl,
        &mut save,
        progress,
    )?;
    ledger.record(
        StageCost::new(
            name,
            env.info,
            &env.cfg.cost,
            t0.elapsed().as_secs_f64(),
            stats.tokens,
            stats.flops,
            stats.teacher_flops,
        )
        .on_ranks(env.comm.world(), stats.comm_seconds, Some(stats.steps)),
    )?;
    progress.clear_after(ledger);
    Ok((model, dir))
}

/// SHA-256 of a model's weights, in name order.
pub(crate) fn weights_id(m: &Llama) -> Result<String> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for (name, t) in m.tensors() {
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
