//! The whole job, as an ordered list of stages, each one call: prepare -> teacher ->
//! (prune) -> (traces) -> students -> eval -> report, with a cost-ledger entry per stage.
//! Logit distillation trains `student` with the teacher and `baseline` without it; the
//! DeepSeek-R1 recipe (`[traces] enabled`) trains the students on the teacher's verified
//! traces (`run::students`).
//!
//! `[onpolicy]` and `[rl]` then train students on their own samples (`run::onpolicy`).
//!
//! Run directory layout (`runs/<name>/`):
//! ```text
//! config.toml     resolved config     teacher/ student/ baseline/ ...  checkpoints
//! ledger.jsonl    one line per stage  cost.json                        cost summary
//! report.json     all figures         report.md                        the same, for people
//! traces.jsonl    every teacher sample with its verdict (R1 recipe)
//! ```

mod onpolicy;
mod prepare;
mod run_dir;
mod stage;
mod students;
mod teacher_outputs;

use std::path::Path;
use std::time::Instant;

use candle_core::Device;

use self::prepare::prepare;
use self::stage::StageEnv;
use crate::config::Config;
use crate::cost::heartbeat::Heartbeat;
use crate::cost::ledger::StageCost;
use crate::distributed::Collective;
use crate::error::Result;
use crate::evaluate::report::{write_report, Report};
use crate::evaluate::HeldOut;
use crate::model::{llama::fnv1a, Llama};
use crate::progress::Progress;
use crate::train::checkpoint::{self, SaveExtras};
use crate::train::LossImpl;

/// Options from the command line that override the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replace an existing run directory.
    pub force: bool,
    /// Continue the run in the existing run directory: completed stages are
    /// loaded, the interrupted one continues from its last valid checkpoint.
    pub resume: bool,
    /// When this process started (its monotonic and Unix clocks), so that the ledger
    /// bills its time from there (reading the config, opening the device); None bills
    /// from the start of `run`.
    pub started: Option<(Instant, f64)>,
}

/// Derived seeds, so that each use of the master seed is independent.
pub(crate) fn sub_seed(seed: u64, what: &str) -> u64 {
    seed ^ fnv1a(what.as_bytes())
}

/// Runs the whole pipeline described by `cfg`: in this process alone, or as one rank
/// of a data-parallel job (`[distributed] backend`, world size and rank from the
/// launcher). Rank 0 reports progress and writes the run directory. When a rank of a
/// multi-rank job fails, it prints its error and ends the whole job (MPI_Abort), since
/// the other ranks would wait for it forever.
pub fn run(cfg: &Config, opts: &RunOptions, progress: &dyn Progress) -> Result<Report> {
    let (dev, comm) = crate::distributed::start(&cfg.run, &cfg.distributed)?;
    let silent = crate::progress::Silent;
    let progress: &dyn Progress = if comm.is_root() { progress } else { &silent };
    if comm.world() == 1 {
        return run_on(cfg, opts, progress, &dev, comm.as_ref());
    }
    // A rank that fails or panics ends the job: the others would wait for it forever.
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_on(cfg, opts, progress, &dev, comm.as_ref())
    }));
    match out {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(e)) => {
            eprintln!("error: rank {} of {}: {e}", comm.rank(), comm.world());
            comm.abort(i32::from(e.exit_code()))
        }
        Err(_) => {
            eprintln!("error: rank {} of {} panicked", comm.rank(), comm.world());
            comm.abort(101)
        }
    }
}

fn run_on(
    cfg: &Config,
    opts: &RunOptions,
    progress: &dyn Progress,
    dev: &Device,
    comm: &dyn Collective,
) -> Result<Report> {
    run_dir::check(cfg, opts)?;
    comm.barrier()?; // every rank has looked before rank 0 makes the run directory
                     // Every second from the process's start (or from here) is billed.
    let start = opts
        .started
        .unwrap_or_else(|| (Instant::now(), crate::cost::ledger::unix_now()));
    let info = crate::device::describe(dev);
    let (dtype, kernels, world) = (cfg.compute_dtype(dev)?, cfg.kernels()?, comm.world());
    progress.message(&format!(
        "device: {} x {} ({}), compute in {dtype:?}",
        info.count, info.name, info.kind
    ));
    if let (_, Some(note)) = crate::cost::ledger::priced(&cfg.cost, &info) {
        progress.message(&format!("warning: {note}"));
    }
    if world > 1 {
        progress.message(&format!(
            "distributed: {world} ranks ({} backend), each with a replica of the models and a slice of every batch",
            cfg.distributed.backend
        ));
    }

    // Stage: prepare (data, tokenizer, the teacher checkpoint if one is given).
    let mut prep = prepare(cfg, opts.resume, dev, comm, progress)?;
    let mut ledger = run_dir::open(cfg, opts, &prep.tok, &info, comm, progress)?.billing_from(start);
    ledger.world = world;
    // A resumed run's start-up is billed as its own stage, "resume".
    let first = if ledger.completed("prepare") {
        "resume"
    } else {
        "prepare"
    };
    let run_dir = cfg.run_dir();
    let heartbeat = Heartbeat::new(
        &run_dir,
        comm.is_root(),
        progress,
        &cfg.cost,
        &info,
        world,
        &ledger,
        first,
    );
    let peak = crate::cost::peak::for_run(cfg, &info, dtype, &heartbeat)?;
    ledger.peak_flops = peak.map(|p| p * world as f64);
    let (teacher_train, student_train) = prep.train_slices(cfg);
    heartbeat.message(&format!(
        "data: {} train ({} for the teacher, {} for the students) / {} held-out examples, tokenizer: {} tokens",
        prep.train_enc.len(),
        teacher_train.len(),
        student_train.len(),
        prep.eval_enc.len(),
        prep.vocab
    ));
    ledger.record(StageCost::work(first, &info, &cfg.cost, 0, 0.0, 0.0))?;
    heartbeat.clear_after(&ledger);

    let resolved = cfg.to_toml()?;
    let save_to = |dir: &Path, m: &Llama, opt: &crate::train::optim::AdamW, state: &checkpoint::TrainerState| {
        let extras = SaveExtras {
            tokenizer: &prep.tok,
            resolved_config: &resolved,
            state: Some(state),
            optimizer: Some(opt),
        };
        checkpoint::save(dir, m, &extras)
    };
    let curve = crate::train::Curve {
        tok: &prep.tok,
        examples: &prep.splits.eval,
        limit: cfg.eval.curve_examples,
        max_new_tokens: cfg.eval.max_new_tokens,
        batch_size: cfg.eval.batch_size,
    };
    let env = StageEnv {
        cfg,
        run_dir: &run_dir,
        dev,
        info: &info,
        eval: &prep.eval_enc,
        pad: prep.tok.pad,
        loss_impl: LossImpl::of(&cfg.distill),
        resume: opts.resume,
        save: &save_to,
        comm,
        dtype,
        kernels,
        curve: (cfg.eval.curve_examples > 0).then_some(&curve),
    };

    let teacher_model = prep.teacher.take();
    stage::check_prune_plan(&env, &prep, teacher_model.as_ref().map(|(m, _)| m))?;
    let (teacher, teacher_dir) = stage::teacher(&env, &prep, teacher_model, &mut ledger, &heartbeat)?;
    let pruned = stage::prune(&env, &prep, &teacher, &mut ledger, &heartbeat)?;
    let mut teacher = frozen(teacher, dtype)?.with_matmul_weights(cfg.teacher.matmul_weights)?;
    teacher.set_kernels(kernels);
    let teacher = (&teacher, teacher_dir.as_path());
    let (plans, traces) = students::plans(&env, &prep, teacher, &mut ledger, &heartbeat)?;
    let (mut students, logit_cache) =
        students::train_students(&env, &prep, &plans, teacher, pruned.as_ref(), &mut ledger, &heartbeat)?;
    onpolicy::stages(&env, &prep, &plans, teacher, &mut students, &mut ledger, &heartbeat)?;

    // Stage: evaluation of every model on the held-out set.
    let all = std::iter::once(("teacher", teacher.0, teacher_dir.clone()))
        .chain(students.iter().map(|(n, m, d)| (*n, m, d.clone())));
    let held_out = HeldOut {
        tok: &prep.tok,
        enc: &prep.eval_enc,
        examples: &prep.splits.eval,
    };
    let models = crate::evaluate::stage(all, &held_out, (cfg, &info), comm, &mut ledger, &heartbeat)?;
    heartbeat.clear();

    let accuracies: Vec<(String, Option<f64>)> = models.iter().map(|m| (m.name.clone(), m.accuracy)).collect();
    let arms = crate::evaluate::arms::arms(&run_dir, &accuracies, cfg.rl.start.stage(), &ledger.summary());
    let report = Report {
        run_dir: run_dir.clone(),
        device: info,
        dtype: format!("{dtype:?}"),
        kernels: kernels.name().to_string(),
        teacher_weights: cfg.teacher.matmul_weights.name().to_string(),
        world_size: world,
        traces,
        logit_cache,
        models,
        arms,
        cost: ledger.summary(),
        cost_table: ledger.table(),
    };
    if comm.is_root() {
        write_report(&run_dir, &report)?;
    }
    Ok(report)
}

/// A teacher that is only run from here on, stored in the compute dtype (half the
/// memory in bf16); in f32 it stays as it is.
fn frozen(m: Llama, dtype: candle_core::DType) -> Result<Llama> {
    if dtype == candle_core::DType::F32 {
        Ok(m)
    } else {
        m.into_frozen(dtype)
    }
}
