//! The whole job: data -> tokenizer -> teacher -> distilled student ->
//! baseline student -> evaluation -> report, with a cost-ledger entry per stage.
//! With `[traces] enabled`, the DeepSeek-R1 recipe: teacher -> traces
//! (rejection sampling) -> student (traces), student-kd (traces + logit KD),
//! baseline (answers only), oracle (gold solutions) -> evaluation -> report.
//!
//! Run directory layout (`runs/<name>/`):
//! ```text
//! config.toml     resolved config     teacher/ student/ baseline/ ...  checkpoints
//! ledger.jsonl    one line per stage  cost.json                        cost summary
//! report.json     all figures         report.md                        the same, for people
//! traces.jsonl    every teacher sample with its verdict (R1 recipe)
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;

mod stage;
mod teacher_outputs;

use stage::{same_on_every_rank, train_stage, StageData, StageEnv};
use teacher_outputs::{teacher_logit_cache, write_traces};

use crate::config::Backend;
use crate::config::{Config, StudentInit};
use crate::cost::heartbeat::{record_killed_segment, Heartbeat};
use crate::cost::ledger::{Ledger, StageCost};
use crate::device::{self};
use crate::distributed::{self, Collective};
use crate::error::{Error, IoContext, Result};
use crate::evaluate::evaluate;
use crate::evaluate::report::{write_report, Report, TracesReport};
use crate::model::{llama::fnv1a, Llama, ModelConfig};
use crate::prepare::data::{self, batch, Example};
use crate::prepare::tokenizer::Tokenizer;
use crate::progress::Progress;
use crate::teacher::logit_cache::{self};
use crate::teacher::prune::{prune_plan, pruned_student};
use crate::train::checkpoint::{self, SaveExtras};
use crate::train::{LossImpl, Teacher, TeacherSource};

/// Options from the command line that override the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replace an existing run directory.
    pub force: bool,
    /// Continue the run in the existing run directory: completed stages are
    /// loaded, the interrupted one continues from its last valid checkpoint.
    pub resume: bool,
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
    let mut name = crate::config::parse_device_name(&cfg.run.device)?;
    if cfg.distributed.backend != Backend::None && distributed::launcher_world_size().is_some_and(|n| n > 1) {
        // One GPU per rank (NCCL, or MPI with CUDA tensors): the rank's index on its host
        // picks it; a single process keeps the GPU it was given.
        if let crate::config::DeviceName::Cuda(_) = name {
            name = crate::config::DeviceName::Cuda(distributed::rank_device_ordinal());
        }
    }
    let dev = device::open(name)?;
    let comm = match cfg.distributed.backend {
        Backend::Nccl => {
            let job = distributed::launcher_job_id();
            let exchange =
                distributed::nccl_id_exchange(&cfg.run.out_dir, &cfg.run.name, job.as_deref(), cfg!(feature = "mpi"))?;
            if let distributed::NcclIdExchange::File(id_file) = &exchange {
                if let Some(parent) = id_file.parent() {
                    std::fs::create_dir_all(parent).at(parent)?;
                }
            }
            let comm = distributed::init_nccl(&dev, &exchange)?;
            comm.barrier()?;
            if let (distributed::NcclIdExchange::File(id_file), true) = (&exchange, comm.is_root()) {
                let _ = std::fs::remove_file(id_file);
            }
            comm
        }
        _ => distributed::init(&cfg.distributed)?,
    };
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
            comm.abort(1)
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
    let dev = dev.clone();
    let info = device::describe(&dev);
    let dtype = cfg.compute_dtype(&dev)?;
    let kernels = cfg.kernels()?;
    let (root, world) = (comm.is_root(), comm.world());
    let resume = opts.resume;
    if resume && !cfg.run_dir().join("config.toml").is_file() {
        return Err(Error::Invalid(format!(
            "{} is not a run directory (it has no config.toml); nothing to resume",
            cfg.run_dir().display()
        )));
    }
    if !resume && cfg.run_dir().exists() && !opts.force {
        return Err(Error::RunExists(cfg.run_dir()));
    }
    // Every rank has looked before rank 0 makes the run directory.
    comm.barrier()?;
    // Stage: prepare (data, tokenizer, teacher checkpoint if given).
    let seed = cfg.run.seed;
    let t0 = Instant::now();
    progress.message(&format!(
        "device: {} x {} ({}), compute in {dtype:?}",
        info.count, info.name, info.kind
    ));
    if world > 1 {
        progress.message(&format!(
            "distributed: {world} ranks ({} backend), each with a replica of the models and a slice of every batch",
            cfg.distributed.backend
        ));
    }
    let splits = data::load(&cfg.data, seed)?;
    // A teacher to load: a folder, or a Hub model resolved to its folder in the Hub cache.
    let teacher_src: Option<PathBuf> = match (&cfg.teacher.checkpoint, &cfg.teacher.hub) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(id)) => {
            let rev = cfg.teacher.revision.as_deref().unwrap_or("main");
            // Rank 0 fills the Hub cache; the others then find the files there.
            if !comm.is_root() {
                comm.barrier()?;
            }
            let dir = crate::prepare::hub::resolve(id, rev)?;
            if comm.is_root() {
                comm.barrier()?;
            }
            progress.message(&format!("teacher: hub model {id}@{rev} -> {}", dir.display()));
            Some(dir)
        }
        (None, None) => None,
    };
    let loaded_teacher = match &teacher_src {
        Some(dir) => Some(checkpoint::load(dir, &dev)?),
        None => None,
    };
    let saved_tok = cfg.run_dir().join("tokenizer.json");
    let tok = match (&cfg.tokenizer.path, &loaded_teacher) {
        (Some(p), _) => Tokenizer::load(p)?,
        (None, Some((_, t))) => t.clone(),
        (None, None) if resume && saved_tok.is_file() => Tokenizer::load(&saved_tok)?,
        (None, None) => {
            let texts = splits
                .train
                .iter()
                .flat_map(|e| [e.prompt.as_str(), e.completion.as_str()]);
            Tokenizer::train(texts, cfg.tokenizer.vocab_size)?
        }
    };
    // The students' vocabulary is the teacher's: KD compares their logits
    // token by token. A loaded teacher may pad its vocabulary beyond the
    // tokenizer (as many Hugging Face models do); the students then match it.
    let vocab = match &loaded_teacher {
        None => tok.vocab_size(),
        Some((teacher, teacher_tok)) => {
            let teacher_dir = teacher_src.as_deref().unwrap_or(Path::new("?"));
            let same = tok.vocab_map() == teacher_tok.vocab_map();
            if !same || tok.vocab_size() > teacher.cfg.vocab_size {
                return Err(Error::Config {
                    path: cfg.tokenizer.path.clone().unwrap_or_else(|| teacher_dir.to_path_buf()),
                    msg: format!(
                        "teacher/student vocabulary mismatch: the teacher {} has {} tokens (vocab_size {}), \
                         tokenizer.path has {} tokens{}; distillation needs one vocabulary \
                         (drop tokenizer.path to use the teacher's tokenizer)",
                        teacher_dir.display(),
                        teacher_tok.vocab_size(),
                        teacher.cfg.vocab_size,
                        tok.vocab_size(),
                        if same { "" } else { " with different token ids" },
                    ),
                });
            }
            if teacher.cfg.max_position_embeddings < cfg.data.seq_len {
                return Err(Error::Config {
                    path: teacher_dir.to_path_buf(),
                    msg: format!(
                        "the teacher's max_position_embeddings {} is shorter than data.seq_len {}; lower data.seq_len",
                        teacher.cfg.max_position_embeddings, cfg.data.seq_len
                    ),
                });
            }
            teacher.cfg.vocab_size
        }
    };
    let (train_enc, dropped) = batch::encode(&tok, &splits.train, cfg.data.seq_len)?;
    let (eval_enc, _) = batch::encode(&tok, &splits.eval, cfg.data.seq_len)?;
    if world > 1 {
        // The gradient sums assume every rank holds the same data and vocabulary.
        let id = format!(
            "{} {} {} {} {} {}",
            logit_cache::fingerprint(&train_enc),
            logit_cache::fingerprint(&eval_enc),
            vocab,
            tok.bos,
            tok.eos,
            tok.pad
        );
        same_on_every_rank(comm, "tokenised data and vocabulary", &id)?;
    }
    if dropped > 0 {
        progress.message(&format!(
            "{dropped} training examples had no completion left after truncation to seq_len and were skipped"
        ));
    }
    if train_enc.is_empty() || eval_enc.is_empty() {
        return Err(Error::Invalid(format!(
            "no usable {} examples: every one is empty or its completion falls past data.seq_len = {}",
            if train_enc.is_empty() { "training" } else { "held-out" },
            cfg.data.seq_len
        )));
    }
    // Inputs are all read and checked; only now is the run directory made.
    let run_dir = cfg.run_dir();
    let resolved = cfg.to_toml()?;
    let mut ledger = if !root {
        // The other ranks keep the ledger in memory, as rank 0 has it on disk.
        comm.barrier()?;
        if resume {
            Ledger::open_in_memory(&run_dir)?
        } else {
            Ledger::new(&run_dir).in_memory()
        }
    } else if resume {
        let mut ledger = Ledger::open(&run_dir)?;
        ledger.world = world;
        record_killed_segment(&run_dir, &mut ledger, &info, cfg, progress)?;
        comm.barrier()?;
        ledger
    } else {
        if run_dir.exists() {
            if !opts.force {
                return Err(Error::RunExists(run_dir));
            }
            std::fs::remove_dir_all(&run_dir).at(&run_dir)?;
        }
        std::fs::create_dir_all(&run_dir).at(&run_dir)?;
        crate::fsio::write_file_atomic(&run_dir.join("config.toml"), resolved.as_bytes())?;
        let tok_tmp = run_dir.join(".tokenizer.json.tmp");
        tok.save(&tok_tmp)?;
        std::fs::rename(&tok_tmp, &saved_tok).at(&saved_tok)?;
        comm.barrier()?;
        Ledger::new(&run_dir)
    };
    ledger.world = world;
    ledger.peak_flops = crate::cost::peak::for_run(cfg, &info, dtype, progress)?.map(|p| p * world as f64);
    let heartbeat = Heartbeat {
        run_dir: run_dir.clone(),
        write: root,
        inner: progress,
        stage: Default::default(),
        dollars_per_second: crate::cost::ledger::price_per_hour(&cfg.cost, &info) * (info.count * world) as f64
            / 3600.0,
        spent_before: std::cell::Cell::new(ledger.summary().total_dollars),
        world,
        device: info.clone(),
        price_per_device_hour: crate::cost::ledger::price_per_hour(&cfg.cost, &info),
    };
    let progress: &dyn Progress = &heartbeat;

    let n = train_enc.len();
    let teacher_train = &train_enc[..cfg.teacher.train_examples.unwrap_or(n).min(n)];
    let student_train = &train_enc[n - cfg.student.train_examples.unwrap_or(n).min(n)..];
    progress.message(&format!(
        "data: {} train ({} for the teacher, {} for the students) / {} held-out examples, tokenizer: {vocab} tokens",
        n,
        teacher_train.len(),
        student_train.len(),
        eval_enc.len()
    ));
    if !ledger.completed("prepare") {
        ledger.record(StageCost::new(
            "prepare",
            &info,
            &cfg.cost,
            t0.elapsed().as_secs_f64(),
            0,
            0.0,
            0.0,
        ))?;
    }

    let save_to = |dir: &Path, m: &Llama, opt: &crate::train::optim::AdamW, state: &checkpoint::TrainerState| {
        let extras = SaveExtras {
            tokenizer: &tok,
            resolved_config: &resolved,
            state: Some(state),
            optimizer: Some(opt),
        };
        checkpoint::save(dir, m, &extras)
    };
    let loss_impl = match (cfg.distill.fused, cfg.distill.fused_head) {
        (true, true) => LossImpl::FusedHead,
        (true, false) => LossImpl::Fused,
        (false, _) => LossImpl::Reference,
    };
    let env = StageEnv {
        cfg,
        run_dir: &run_dir,
        dev: &dev,
        info: &info,
        eval: &eval_enc,
        pad: tok.pad,
        loss_impl,
        resume,
        save: &save_to,
        comm,
        dtype,
        kernels,
    };

    // A pruned student's targets are checked against the teacher's architecture now,
    // not after the teacher has been trained.
    if cfg.student.init != StudentInit::Random {
        let teacher_cfg = match &loaded_teacher {
            Some((m, _)) => m.cfg.clone(),
            None => ModelConfig::from_spec(&cfg.teacher.model, vocab, tok.bos, tok.eos, tok.pad),
        };
        prune_plan(&teacher_cfg, cfg)?;
    }

    // Stage: teacher.
    let (teacher, teacher_dir) = match loaded_teacher {
        Some((m, _)) => {
            let dir = teacher_src.clone().unwrap_or_default();
            progress.message(&format!("teacher: loaded from {}", dir.display()));
            (m, dir)
        }
        None => {
            let mcfg = ModelConfig::from_spec(&cfg.teacher.model, vocab, tok.bos, tok.eos, tok.pad);
            let init = || Llama::init(mcfg, cfg.teacher.model.init_std, sub_seed(seed, "teacher-init"), &dev);
            let data = StageData {
                name: "teacher",
                train: teacher_train,
                seed: sub_seed(seed, "teacher-data"),
                teacher: None,
                spec: &cfg.teacher.train,
            };
            train_stage(&env, &data, init, &mut ledger, &heartbeat)?
        }
    };
    // Stage: prune. A student cut from the teacher (Minitron), before the teacher is
    // stored in the compute dtype.
    let pruned = if cfg.student.init == StudentInit::Random {
        None
    } else {
        let t0 = Instant::now();
        let (model, flops, calib_tokens) = pruned_student(&teacher, cfg, student_train, &dev, progress)?;
        // Every rank prunes the same way on the same calibration data (so that each holds
        // the student with no broadcast): the devices billed did world x one rank's work
        // (tokens and FLOPs, as the training stages sum theirs over the ranks), and the
        // peak the MFU divides by is the world's.
        let flops = flops * comm.world() as f64;
        let calib_tokens = calib_tokens * comm.world() as u64;
        if !ledger.completed("prune") {
            ledger.record(StageCost::new(
                "prune",
                &info,
                &cfg.cost,
                t0.elapsed().as_secs_f64(),
                calib_tokens,
                flops,
                0.0,
            ))?;
        }
        Some(model)
    };
    let mut teacher = frozen(teacher, dtype)?;
    teacher.set_kernels(kernels);

    // The student stages: which models, on which data, with or without the teacher.
    // Pruned students fix the architecture of all of them.
    let scfg = match &pruned {
        Some(p) => p.cfg.clone(),
        None => ModelConfig::from_spec(&cfg.student.model, vocab, tok.bos, tok.eos, tok.pad),
    };
    let student_seed = sub_seed(seed, "student-init");
    let mut traces_report = None;
    let plans: Vec<(&str, Vec<batch::Encoded>, bool)> = if cfg.traces.enabled {
        // Stage: teacher-written traces on the students' prompts, verified.
        let n_ex = splits.train.len();
        let k = cfg.student.train_examples.unwrap_or(n_ex).min(n_ex);
        let student_examples = &splits.train[n_ex - k..];
        let path = run_dir.join("traces.jsonl");
        let (records, acc) = if ledger.completed("traces") && path.is_file() {
            let records = crate::teacher::traces::read(&path)?;
            let acc = crate::teacher::traces::Acceptance::of(&records);
            progress.message(&format!("traces: complete, read from {}", path.display()));
            (records, acc)
        } else {
            let t0 = Instant::now();
            let (records, acc) = write_traces(
                &teacher,
                &teacher_dir,
                &tok,
                student_examples,
                cfg,
                seed,
                progress,
                comm,
            )?;
            if root {
                crate::teacher::traces::write(&path, &records)?;
            }
            ledger.record(StageCost::new(
                "traces",
                &info,
                &cfg.cost,
                t0.elapsed().as_secs_f64(),
                acc.tokens,
                acc.flops,
                0.0,
            ))?;
            heartbeat.clear_after(&ledger);
            (records, acc)
        };
        progress.message(&format!(
            "traces: kept {} of {} samples ({:.1}%), {} of {} prompts solved -> {}",
            acc.kept,
            acc.samples,
            100.0 * acc.acceptance_rate,
            acc.prompts_solved,
            acc.prompts,
            path.display()
        ));
        let kept: Vec<Example> = records
            .iter()
            .filter(|r| r.kept)
            .map(|r| Example {
                prompt: r.prompt.clone(),
                completion: r.completion.clone(),
                answer: r.answer,
            })
            .collect();
        if kept.is_empty() {
            return Err(Error::Invalid(format!(
                "the teacher solved none of {} prompts, so there are no traces to learn from ({}); \
                 train the teacher longer, or raise traces.samples or traces.max_new_tokens",
                acc.prompts,
                path.display()
            )));
        }
        let answers_only: Vec<Example> = student_examples
            .iter()
            .filter_map(|e| {
                e.answer.map(|a| Example {
                    prompt: e.prompt.clone(),
                    completion: format!("#### {a}"),
                    answer: Some(a),
                })
            })
            .collect();
        let enc = |ex: &[Example]| batch::encode(&tok, ex, cfg.data.seq_len).map(|r| r.0);
        let kept_enc = enc(&kept)?;
        let mut plans = vec![("student", kept_enc.clone(), false)];
        if cfg.traces.logit_kd {
            plans.push(("student-kd", kept_enc, true));
        }
        plans.push(("baseline", enc(&answers_only)?, false));
        if cfg.traces.oracle {
            plans.push(("oracle", enc(student_examples)?, false));
        }
        traces_report = Some(TracesReport { path, acceptance: acc });
        plans
    } else {
        // Logit distillation: the distilled student, then the baseline from the
        // same initial weights and the same data order, without the teacher.
        vec![
            ("student", student_train.to_vec(), true),
            ("baseline", student_train.to_vec(), false),
        ]
    };

    let mut plans = plans;
    if cfg.student.init == StudentInit::Both {
        // The pruned-init twin of the distilled student, on the same data.
        if let Some(i) = plans.iter().position(|(n, _, _)| *n == "student") {
            let (_, data, kd) = plans[i].clone();
            plans.insert(i + 1, ("student-pruned", data, kd));
        }
    }
    let starts_pruned = |name: &str| match cfg.student.init {
        StudentInit::Random => false,
        StudentInit::Pruned => !matches!(name, "baseline" | "oracle"),
        StudentInit::Both => name == "student-pruned",
    };
    let mut students = Vec::new();
    let mut logit_cache_report = None;
    for (name, train, with_teacher) in &plans {
        if train.is_empty() {
            return Err(Error::Invalid(format!(
                "stage {name}: no training examples fit in data.seq_len = {}",
                cfg.data.seq_len
            )));
        }
        // Stage: the offline logit cache, over the data of the student that distils from it.
        let cache = if *with_teacher && cfg.distill.logit_cache {
            let c = teacher_logit_cache(&env, &teacher, &teacher_dir, train, vocab, &mut ledger, &heartbeat)?;
            // Rank 0 indexed the ranks' shards; every rank reads them.
            logit_cache_report = Some(c.index.clone());
            Some(c)
        } else {
            None
        };
        let kd = Teacher {
            source: match &cache {
                Some(c) => TeacherSource::Cache(c),
                None => TeacherSource::Online(&teacher),
            },
            ce_weight: cfg.distill.ce_weight,
            temperature: cfg.distill.temperature,
            divergence: crate::loss::Divergence::of(&cfg.distill),
            top_k: (cfg.distill.top_k > 0).then_some(cfg.distill.top_k),
        };
        let init = || match (&pruned, starts_pruned(name)) {
            (Some(p), true) => Llama::from_tensors(p.cfg.clone(), p.tensors(), &dev).map_err(Error::Invalid),
            _ => Llama::init(scfg.clone(), cfg.student.model.init_std, student_seed, &dev),
        };
        let data = StageData {
            name,
            train,
            seed: sub_seed(seed, "student-data"),
            teacher: with_teacher.then_some(&kd),
            spec: &cfg.student.train,
        };
        let (model, dir) = train_stage(&env, &data, init, &mut ledger, &heartbeat)?;
        students.push((*name, model, dir));
    }

    // Stage: evaluation of every model on the held-out set.
    let t0 = Instant::now();
    progress.stage_start("eval", 0);
    progress.message("evaluating on the held-out set");
    let mut models = Vec::new();
    let (mut eval_tokens, mut eval_flops) = (0u64, 0.0);
    let all =
        std::iter::once(("teacher", &teacher, teacher_dir)).chain(students.iter().map(|(n, m, d)| (*n, m, d.clone())));
    for (name, model, dir) in all {
        let (report, tokens, flops) = evaluate(name, model, &tok, &dir, &eval_enc, &splits.eval, cfg, comm)?;
        eval_tokens += tokens;
        eval_flops += flops;
        models.push(report);
    }
    // A resumed run that had finished is evaluated again (the figures are
    // deterministic) but billed once.
    if !ledger.completed("eval") {
        ledger.record(StageCost::new(
            "eval",
            &info,
            &cfg.cost,
            t0.elapsed().as_secs_f64(),
            eval_tokens,
            eval_flops,
            0.0,
        ))?;
    }
    heartbeat.clear();

    let report = Report {
        run_dir: run_dir.clone(),
        device: info,
        dtype: format!("{dtype:?}"),
        kernels: kernels.name().to_string(),
        world_size: world,
        traces: traces_report,
        logit_cache: logit_cache_report,
        models,
        cost: ledger.summary(),
        cost_table: ledger.table(),
    };
    if root {
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
