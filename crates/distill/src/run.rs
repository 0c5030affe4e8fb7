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
use serde::Serialize;

use crate::config::Backend;
use crate::config::{Config, StudentInit};
use crate::cost::ledger::{Ledger, StageCost};
use crate::device::{self, DeviceInfo};
use crate::distributed::{self, Collective};
use crate::error::{Error, IoContext, Result};
use crate::model::generate::{self, Accuracy};
use crate::model::{llama::fnv1a, Llama, ModelConfig};
use crate::prepare::data::{self, batch, Example};
use crate::prepare::tokenizer::Tokenizer;
use crate::teacher::logit_cache::{self, LogitCache};
use crate::train::checkpoint::{self, SaveExtras};
use crate::train::{self, LossImpl, Progress, StageInput, Teacher, TeacherSource};

/// Options from the command line that override the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replace an existing run directory.
    pub force: bool,
    /// Continue the run in the existing run directory: completed stages are
    /// loaded, the interrupted one continues from its last valid checkpoint.
    pub resume: bool,
}

fn one_rank() -> usize {
    1
}

/// Held-out figures of one model.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ModelReport {
    pub name: String,
    pub checkpoint: PathBuf,
    pub params: usize,
    pub eval_loss: f32,
    pub accuracy: Option<f64>,
    pub correct: usize,
    pub evaluated: usize,
    pub samples: Vec<generate::Sample>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    pub run_dir: PathBuf,
    pub device: DeviceInfo,
    /// Compute dtype of the run ("F32", "BF16", "F16").
    #[serde(default)]
    pub dtype: String,
    /// What ran the transformer's ops on the CPU in f32: "fused" kernels or "plain" ops.
    #[serde(default)]
    pub kernels: String,
    /// Ranks of a data-parallel run (1: one process).
    #[serde(default = "one_rank")]
    pub world_size: usize,
    /// The trace stage's acceptance figures, when the R1 recipe ran.
    pub traces: Option<TracesReport>,
    /// The offline logit cache's index, when a student distilled from one.
    #[serde(default)]
    pub logit_cache: Option<crate::teacher::logit_cache::Index>,
    pub models: Vec<ModelReport>,
    pub cost: crate::cost::ledger::CostSummary,
    pub cost_table: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TracesReport {
    pub path: PathBuf,
    pub acceptance: crate::teacher::traces::Acceptance,
}

/// Derived seeds, so that each use of the master seed is independent.
fn sub_seed(seed: u64, what: &str) -> u64 {
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
    let silent = train::Silent;
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
    ledger.peak_flops = run_peak(cfg, &info, dtype, progress)?.map(|p| p * world as f64);
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

/// The teacher layers a pruned student keeps (`[student] prune_layers`, or spread
/// evenly with the first and last included) and its width target (`[student.model]`),
/// checked against the teacher's architecture: an error names the keys to change.
fn prune_plan(teacher: &ModelConfig, cfg: &Config) -> Result<(Vec<usize>, crate::teacher::prune::WidthTarget)> {
    let spec = &cfg.student.model;
    let (l, n) = (teacher.num_hidden_layers, spec.num_layers);
    let layers: Vec<usize> = match &cfg.student.prune_layers {
        Some(v) => v.clone(),
        None if n > l => {
            return Err(Error::Invalid(format!(
                "student.model.num_layers = {n} exceeds the teacher's {l} layers; a pruned student keeps some of them"
            )))
        }
        None if n == 1 => vec![0],
        None => (0..n).map(|i| (i * (l - 1) + (n - 1) / 2) / (n - 1)).collect(),
    };
    let target = crate::teacher::prune::WidthTarget {
        hidden_size: spec.hidden_size,
        intermediate_size: spec.intermediate_size,
        num_attention_heads: spec.num_heads,
    };
    let explain = |e: Error| {
        Error::Invalid(format!(
            "[student] init = {:?} cannot cut [student.model] from this teacher: {e}; change [student.model] \
             or [student] prune_layers, or use init = \"random\"",
            cfg.student.init
        ))
    };
    crate::teacher::prune::check_keep_layers(l, &layers).map_err(explain)?;
    crate::teacher::prune::check_width_target(teacher, target).map_err(explain)?;
    Ok((layers, target))
}

/// The student cut from the teacher: its layers `student.prune_layers` (default: spread
/// evenly), then, scored by their activations on the first `student.calibration_examples`
/// training examples, its most important heads, MLP neurons and embedding channels, down
/// to `[student.model]`'s sizes (`prune`). Returns the model, the calibration FLOPs and
/// tokens.
fn pruned_student(
    teacher: &Llama,
    cfg: &Config,
    train: &[batch::Encoded],
    dev: &Device,
    progress: &dyn Progress,
) -> Result<(Llama, f64, u64)> {
    let (layers, target) = prune_plan(&teacher.cfg, cfg)?;
    let depth = crate::teacher::prune::depth_prune(teacher, &layers)?;
    let calib: Vec<candle_core::Tensor> = train
        .iter()
        .take(cfg.student.calibration_examples)
        .map(|e| candle_core::Tensor::from_vec(e.ids.clone(), (1, e.ids.len()), dev))
        .collect::<candle_core::Result<_>>()?;
    let tokens: u64 = calib.iter().map(|t| t.elem_count() as u64).sum();
    let flops: f64 = calib
        .iter()
        .map(|t| depth.cfg.forward_flops_per_token(t.elem_count()) * t.elem_count() as f64)
        .sum();
    let importance = crate::teacher::prune::estimate_importance(&depth, &calib)?;
    let student = crate::teacher::prune::width_prune(&depth, &importance, target)?;
    progress.message(&format!(
        "prune: teacher layers {layers:?}, then width to hidden {} / {} heads ({} kv) / MLP {} by activations on {} examples: {} -> {} parameters",
        student.cfg.hidden_size,
        student.cfg.num_attention_heads,
        student.cfg.num_key_value_heads,
        student.cfg.intermediate_size,
        calib.len(),
        teacher.cfg.num_params(),
        student.cfg.num_params()
    ));
    Ok((student, flops, tokens))
}

/// Errors unless every rank has the same `id` for `what` (a hash of what the replicas must
/// share); every rank calls it.
fn same_on_every_rank(comm: &dyn Collective, what: &str, id: &str) -> Result<()> {
    let all = comm.gather_bytes(id.as_bytes())?;
    if let Some(r) = all.iter().position(|x| x != &all[0]) {
        return Err(Error::Distributed(format!(
            "rank {r} and rank 0 differ in their {what}: every rank must read the same files (a data or \
             tokenizer path local to each host?) with the same build"
        )));
    }
    Ok(())
}

/// SHA-256 of a model's weights, in name order.
fn weights_id(m: &Llama) -> Result<String> {
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

/// A teacher that is only run from here on, stored in the compute dtype (half the
/// memory in bf16); in f32 it stays as it is.
fn frozen(m: Llama, dtype: candle_core::DType) -> Result<Llama> {
    if dtype == candle_core::DType::F32 {
        Ok(m)
    } else {
        m.into_frozen(dtype)
    }
}

/// What every training stage shares.
struct StageEnv<'a> {
    cfg: &'a Config,
    run_dir: &'a Path,
    dev: &'a Device,
    info: &'a DeviceInfo,
    eval: &'a [batch::Encoded],
    pad: u32,
    loss_impl: LossImpl,
    resume: bool,
    save: &'a dyn Fn(&Path, &Llama, &crate::train::optim::AdamW, &checkpoint::TrainerState) -> Result<()>,
    /// The ranks of this job; rank 0 alone writes checkpoints.
    comm: &'a dyn Collective,
    /// Compute dtype of the trained models (f32 master weights).
    dtype: candle_core::DType,
    /// Fused CPU kernels or plain ops (`[run] kernels`).
    kernels: crate::config::Kernels,
}

/// What one training stage learns from.
struct StageData<'a> {
    name: &'a str,
    train: &'a [batch::Encoded],
    seed: u64,
    teacher: Option<&'a Teacher<'a>>,
    spec: &'a crate::config::TrainSpec,
}

/// Where a stage keeps its periodic checkpoints: `checkpoints/<stage>/step-NNNNNN`.
fn checkpoint_root(run_dir: &Path, stage: &str) -> PathBuf {
    run_dir.join("checkpoints").join(stage)
}

/// The periodic checkpoints of a stage, newest first.
fn periodic_checkpoints(root: &Path) -> Vec<PathBuf> {
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
fn train_stage(
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

/// The heartbeat file: which stage is running, since when, and when the
/// process was last alive. A resumed run turns a leftover heartbeat into an
/// `interrupted` ledger record, so the time of a killed segment is billed.
const HEARTBEAT: &str = "heartbeat.json";

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Beat {
    stage: String,
    started_unix: f64,
    alive_unix: f64,
    /// The ranks the segment ran on: a resume on another number of ranks still bills
    /// the killed segment at its own. (Heartbeats written before this field: 1.)
    #[serde(default = "one_rank")]
    world: usize,
    /// The devices of each rank and their price per device-hour, likewise: a resume on
    /// other hardware bills the killed segment at the hardware that ran it. (Heartbeats
    /// written before these fields: the resuming run's.)
    #[serde(default)]
    device: Option<DeviceInfo>,
    #[serde(default)]
    price_per_device_hour: Option<f64>,
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Forwards progress, keeps the heartbeat file current, appends every step to
/// `metrics/<stage>.jsonl`, and adds the run's running cost to each step.
struct Heartbeat<'a> {
    run_dir: PathBuf,
    /// Files are written (rank 0 only).
    write: bool,
    inner: &'a dyn Progress,
    stage: std::cell::RefCell<Option<Beat>>,
    dollars_per_second: f64,
    /// The ranks of this run, each rank's devices and their price per device-hour.
    world: usize,
    device: DeviceInfo,
    price_per_device_hour: f64,
    /// Dollars of the ledger records written before the current stage.
    spent_before: std::cell::Cell<f64>,
}

impl Heartbeat<'_> {
    fn beat(&self) {
        if !self.write {
            return;
        }
        if let Some(b) = self.stage.borrow_mut().as_mut() {
            b.alive_unix = now_unix();
            // Best effort: a lost beat costs at most the time until the next one.
            if let Ok(bytes) = serde_json::to_vec(b) {
                let path = self.run_dir.join(HEARTBEAT);
                let tmp = path.with_extension("json.tmp");
                if std::fs::write(&tmp, bytes).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        }
    }

    /// The stage's ledger record is written: no segment is pending.
    fn clear_after(&self, ledger: &Ledger) {
        self.spent_before.set(ledger.summary().total_dollars);
        self.clear();
    }

    fn clear(&self) {
        *self.stage.borrow_mut() = None;
        if !self.write {
            return;
        }
        let _ = std::fs::remove_file(self.run_dir.join(HEARTBEAT));
    }

    fn metrics_path(&self, stage: &str) -> PathBuf {
        self.run_dir.join("metrics").join(format!("{stage}.jsonl"))
    }

    /// A stage (re)starts after step `step`: metrics of later steps, from a
    /// segment that was killed, are dropped so that every step appears once.
    fn truncate_metrics(&self, stage: &str, step: usize) -> Result<()> {
        if !self.write {
            return Ok(());
        }
        let path = self.metrics_path(stage);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::fsio::write_file_atomic(&path, kept.as_bytes())
    }

    fn append_metrics(&self, stage: &str, log: &train::StepLog) {
        use std::io::Write as _;
        if !self.write {
            return;
        }
        let path = self.metrics_path(stage);
        let _ = std::fs::create_dir_all(self.run_dir.join("metrics"));
        if let (Ok(mut line), Ok(mut f)) = (
            serde_json::to_string(log),
            std::fs::OpenOptions::new().create(true).append(true).open(&path),
        ) {
            line.push('\n');
            // Metrics are a log, not state: a failed write must not stop training.
            let _ = f.write_all(line.as_bytes());
        }
    }
}

impl Progress for Heartbeat<'_> {
    fn stage_start(&self, stage: &str, total_steps: usize) {
        let now = now_unix();
        *self.stage.borrow_mut() = Some(Beat {
            stage: stage.to_string(),
            started_unix: now,
            alive_unix: now,
            world: self.world,
            device: Some(self.device.clone()),
            price_per_device_hour: Some(self.price_per_device_hour),
        });
        self.beat();
        if total_steps > 0 {
            self.inner.stage_start(stage, total_steps);
        }
    }
    fn step(&self, log: &train::StepLog) {
        self.beat();
        let mut log = log.clone();
        let stage = self
            .stage
            .borrow()
            .as_ref()
            .map(|b| (b.stage.clone(), now_unix() - b.started_unix));
        if let Some((stage, elapsed)) = stage {
            log.dollars = self.spent_before.get() + elapsed * self.dollars_per_second;
            self.append_metrics(&stage, &log);
        }
        self.inner.step(&log);
    }
    fn advance(&self, done: usize, msg: &str) {
        self.beat();
        self.inner.advance(done, msg);
    }
    fn message(&self, msg: &str) {
        self.inner.message(msg);
    }
    fn stage_end(&self) {
        self.beat();
        self.inner.stage_end();
    }
}

/// On resume: bills the segment a kill cut short, from its heartbeat.
fn record_killed_segment(
    run_dir: &Path,
    ledger: &mut Ledger,
    info: &DeviceInfo,
    cfg: &Config,
    progress: &dyn Progress,
) -> Result<()> {
    let path = run_dir.join(HEARTBEAT);
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(());
    };
    if let Ok(b) = serde_json::from_slice::<Beat>(&bytes) {
        let wall = (b.alive_unix - b.started_unix).max(0.0);
        progress.message(&format!(
            "{}: the last run was killed {wall:.1} s into this stage; resuming",
            b.stage
        ));
        let mut killed = StageCost::interrupted(&b.stage, b.device.as_ref().unwrap_or(info), &cfg.cost, wall);
        if let Some(price) = b.price_per_device_hour {
            killed.price_per_device_hour = price; // on_ranks prices the dollars with it
        }
        ledger.record_as_billed(killed.on_ranks(b.world, 0.0, None))?;
    }
    std::fs::remove_file(&path).at(&path)
}

/// Peak FLOP/s of all the run's devices, for the ledger's MFU column: the
/// config's per-device figure, else the datasheet f32 peak of a known GPU, else
/// (CPU) a short GEMM probe on this machine.
fn run_peak(
    cfg: &Config,
    info: &DeviceInfo,
    dtype: candle_core::DType,
    progress: &dyn Progress,
) -> Result<Option<f64>> {
    let count = info.count as f64;
    if let Some(p) = cfg.cost.peak_flops_per_device {
        return Ok(Some(p * count));
    }
    if info.kind == "cpu" {
        let m = crate::cost::peak::measure_cpu_peak(1024, 5)?;
        progress.message(&format!(
            "peak: {:.1} GFLOP/s (f32 GEMM probe, {} threads); MFU in the ledger is measured against it",
            m.flops_per_second / 1e9,
            m.threads
        ));
        return Ok(Some(m.flops_per_second));
    }
    // Against the peak of the precision the matmuls run in.
    let precision = match dtype {
        candle_core::DType::F32 => crate::cost::projection::Precision::Fp32,
        _ => crate::cost::projection::Precision::Bf16,
    };
    Ok(crate::cost::projection::peak_flops(&info.name, precision).map(|p| p * count))
}

/// Samples `[traces]` solutions from the teacher for every student prompt and
/// verifies them.
/// The `teacher-logits` stage: the teacher's top-k log-probabilities over `data`, written
/// to `<run>/logit-cache` once; a resumed run whose ledger has the stage reuses it.
fn teacher_logit_cache(
    env: &StageEnv,
    teacher: &Llama,
    teacher_dir: &Path,
    data: &[batch::Encoded],
    vocab: usize,
    ledger: &mut Ledger,
    progress: &Heartbeat,
) -> Result<LogitCache> {
    const STAGE: &str = "teacher-logits";
    let cfg = env.cfg;
    let dir = env.run_dir.join("logit-cache");
    let expect = logit_cache::Expect {
        data_fingerprint: logit_cache::fingerprint(data),
        k: cfg.distill.top_k,
        temperature: cfg.distill.temperature,
        vocab_size: vocab,
    };
    if ledger.completed(STAGE) {
        match LogitCache::open(&dir, data, &expect) {
            Ok(c) => {
                progress.message(&format!("{STAGE}: complete, read from {}", dir.display()));
                return Ok(c);
            }
            Err(e) => progress.message(&format!(
                "warning: {STAGE}: the cache is unusable ({e}); writing it again"
            )),
        }
    }
    let t0 = Instant::now();
    let comm = env.comm;
    let range = distributed::shard_range(data.len(), comm.rank(), comm.world());
    progress.stage_start(STAGE, range.len());
    let id = checkpoint::content_id(teacher_dir)?;
    let batch = cfg.student.train.batch_size;
    // Each rank runs the teacher over its slice of the examples and writes its own
    // shards; rank 0 then writes the index over all of them, in example order.
    if comm.is_root() {
        logit_cache::prepare(&dir, data)?;
    }
    comm.barrier()?;
    let tag = if comm.world() > 1 {
        format!("r{:04}-", comm.rank())
    } else {
        String::new()
    };
    let part = logit_cache::write_part(&dir, teacher, data, range, &tag, &expect, batch, &|done, _| {
        progress.advance(done, "examples through the teacher")
    })?;
    let comm_t0 = Instant::now();
    let json = serde_json::to_vec(&part).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut shards = Vec::new();
    for bytes in comm.gather_bytes(&json)? {
        let p: logit_cache::Part = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Distributed(format!("a rank sent a bad logit-cache part: {e}")))?;
        shards.extend(p.shards);
    }
    let mut flops = [part.flops];
    comm.sum_f64(&mut flops)?;
    let flops = flops[0];
    let index = if comm.is_root() {
        let index = logit_cache::write_index(&dir, &id, data, &expect, shards)?;
        comm.barrier()?;
        index
    } else {
        comm.barrier()?;
        logit_cache::read_index(&dir)?
    };
    let comm_seconds = if comm.world() > 1 {
        comm_t0.elapsed().as_secs_f64()
    } else {
        0.0
    };
    progress.stage_end();
    ledger.record(
        StageCost::new(
            STAGE,
            env.info,
            &cfg.cost,
            t0.elapsed().as_secs_f64(),
            data.iter().map(|e| e.ids.len() as u64 - 1).sum(),
            flops,
            0.0,
        )
        .on_ranks(comm.world(), comm_seconds, None),
    )?;
    progress.clear_after(ledger);
    progress.message(&format!(
        "{STAGE}: {} positions, top-{} at T = {}, {:.0} bytes per token ({:.2} MB) -> {}",
        index.rows,
        index.k,
        index.temperature,
        index.bytes_per_token,
        index.bytes as f64 / 1e6,
        dir.display()
    ));
    LogitCache::open(&dir, data, &expect)
}

/// With several ranks, each samples its shard of the prompts (`--shard rank/world`) and
/// every rank gets all the records, merged in (prompt, sample) order.
#[allow(clippy::too_many_arguments)]
fn write_traces(
    teacher: &Llama,
    teacher_dir: &Path,
    tok: &Tokenizer,
    examples: &[Example],
    cfg: &Config,
    seed: u64,
    progress: &dyn Progress,
    comm: &dyn Collective,
) -> Result<(
    Vec<crate::teacher::traces::TraceRecord>,
    crate::teacher::traces::Acceptance,
)> {
    let tc = &cfg.traces;
    let prompts: Vec<crate::teacher::traces::Prompt> = examples
        .iter()
        .enumerate()
        .map(|(i, e)| crate::teacher::traces::Prompt {
            id: i as u64,
            prompt: e.prompt.clone(),
            answer: e.answer,
        })
        .collect();
    if prompts.iter().all(|p| p.answer.is_none()) {
        return Err(Error::Invalid(
            "traces.enabled needs prompts with verifiable answers (`#### N` at the end of each completion); \
             the student examples have none"
                .into(),
        ));
    }
    let settings = crate::teacher::traces::TraceSettings {
        samples: tc.samples,
        sampling: generate::Sampling {
            max_new_tokens: tc.max_new_tokens,
            temperature: tc.temperature,
            top_p: tc.top_p,
            seed: sub_seed(seed, "traces"),
        },
        keep: tc.keep,
        max_completion_tokens: tc.max_completion_tokens,
        batch_rows: tc.batch_size,
    };
    let id = checkpoint::content_id(teacher_dir)?;
    let total = prompts.iter().filter(|p| p.answer.is_some()).count();
    progress.stage_start("traces", total);
    let per_batch = (tc.batch_size / tc.samples).max(1);
    let mut on_batch = |done: usize, _of: usize| progress.advance((done * per_batch).min(total), "prompts sampled");
    let shard = crate::teacher::traces::Shard {
        index: comm.rank(),
        count: comm.world(),
    };
    let out = crate::teacher::traces::generate(teacher, tok, &id, &prompts, &settings, shard, &mut on_batch);
    progress.stage_end();
    if comm.world() == 1 {
        return out;
    }
    let (mine, acc) = out?;
    let mut records = Vec::new();
    for bytes in comm.gather_bytes(crate::teacher::traces::to_jsonl(&mine)?.as_bytes())? {
        for line in String::from_utf8_lossy(&bytes).lines() {
            records.push(
                serde_json::from_str::<crate::teacher::traces::TraceRecord>(line)
                    .map_err(|e| Error::Distributed(format!("a rank sent a bad trace record: {e}")))?,
            );
        }
    }
    records.sort_by_key(|r| (r.id, r.sample));
    let mut flops = [acc.flops];
    comm.sum_f64(&mut flops)?;
    let mut acc = crate::teacher::traces::Acceptance::of(&records);
    acc.flops = flops[0];
    Ok((records, acc))
}

/// Held-out loss and (for tasks with answers) greedy-decoding accuracy, the work split
/// over the ranks.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    name: &str,
    model: &Llama,
    tok: &Tokenizer,
    dir: &Path,
    eval_enc: &[batch::Encoded],
    eval_examples: &[Example],
    cfg: &Config,
    comm: &dyn Collective,
) -> Result<(ModelReport, u64, f64)> {
    let eval_loss = train::eval_loss_on(model, eval_enc, cfg.eval.batch_size, tok.pad, comm)?;
    let tokens: u64 = eval_enc.iter().map(|e| (e.ids.len() - 1) as u64).sum();
    let mut flops: f64 = eval_enc
        .iter()
        .map(|e| model.cfg.forward_flops_per_token(e.ids.len()) * (e.ids.len() - 1) as f64)
        .sum();
    let acc: Option<Accuracy> = if eval_examples.iter().any(|e| e.answer.is_some()) && cfg.eval.examples > 0 {
        Some(sharded_accuracy(model, tok, eval_examples, cfg, comm)?)
    } else {
        None
    };
    flops += acc.as_ref().map_or(0.0, |a| a.flops);
    let gen_tokens = acc.as_ref().map_or(0, |a| a.tokens);
    Ok((
        ModelReport {
            name: name.to_string(),
            checkpoint: dir.to_path_buf(),
            params: model.cfg.num_params(),
            eval_loss,
            accuracy: acc.as_ref().map(|a| a.accuracy),
            correct: acc.as_ref().map_or(0, |a| a.correct),
            evaluated: acc.as_ref().map_or(0, |a| a.evaluated),
            samples: acc.map(|a| a.samples.into_iter().take(3).collect()).unwrap_or_default(),
        },
        tokens + gen_tokens,
        flops,
    ))
}

/// Greedy-decoding accuracy with the examples split over the ranks (contiguous slices,
/// so the samples gathered in rank order are in the examples' order).
fn sharded_accuracy(
    model: &Llama,
    tok: &Tokenizer,
    examples: &[Example],
    cfg: &Config,
    comm: &dyn Collective,
) -> Result<Accuracy> {
    let (e, world) = (&cfg.eval, comm.world());
    if world == 1 {
        return generate::accuracy(model, tok, examples, e.examples, e.max_new_tokens, e.batch_size);
    }
    let chosen: Vec<Example> = examples
        .iter()
        .filter(|x| x.answer.is_some())
        .take(e.examples)
        .cloned()
        .collect();
    let mine = &chosen[distributed::shard_range(chosen.len(), comm.rank(), world)];
    let part = generate::accuracy(model, tok, mine, mine.len(), e.max_new_tokens, e.batch_size)?;
    let mut samples = Vec::with_capacity(chosen.len());
    let json = serde_json::to_vec(&part.samples).map_err(|e| Error::Invalid(e.to_string()))?;
    for bytes in comm.gather_bytes(&json)? {
        let s: Vec<generate::Sample> = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Distributed(format!("a rank sent bad evaluation samples: {e}")))?;
        samples.extend(s);
    }
    let mut totals = [part.tokens as f64, part.flops];
    comm.sum_f64(&mut totals)?;
    Ok(Accuracy::of(samples, totals[0] as u64, totals[1]))
}

/// `distill eval --checkpoint DIR`: rebuilds the held-out set from the
/// checkpoint's own `distill.toml` (or `config`, when given) and evaluates it.
pub fn eval_checkpoint(dir: &Path, config: Option<&Config>, device: &Device) -> Result<ModelReport> {
    let (model, tok) = checkpoint::load(dir, device)?;
    let cfg = match config {
        Some(c) => c.clone(),
        None => {
            let p = dir.join("distill.toml");
            if !p.is_file() {
                return Err(Error::Checkpoint {
                    path: dir.to_path_buf(),
                    msg: "distill.toml is missing, so the held-out set is unknown; pass --config FILE".into(),
                });
            }
            Config::load(&p)?
        }
    };
    let mut model = model;
    model.set_compute_dtype(cfg.compute_dtype(device)?)?;
    model.set_kernels(cfg.kernels()?);
    let splits = data::load(&cfg.data, cfg.run.seed)?;
    let (eval_enc, _) = batch::encode(&tok, &splits.eval, cfg.data.seq_len)?;
    let name = dir
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().to_string());
    Ok(evaluate(
        &name,
        &model,
        &tok,
        dir,
        &eval_enc,
        &splits.eval,
        &cfg,
        &distributed::Single,
    )?
    .0)
}

fn write_report(run_dir: &Path, r: &Report) -> Result<()> {
    let json = serde_json::to_vec_pretty(r).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::fsio::write_file_atomic(&run_dir.join("report.json"), &json)?;
    write_charts(run_dir, r)?;
    crate::fsio::write_file_atomic(&run_dir.join("report.md"), render(r).as_bytes())
}

/// `distill report RUN_DIR`: renders report.md and the charts again from the
/// run's report.json and metrics.
pub fn rerender(run_dir: &Path) -> Result<Report> {
    let path = run_dir.join("report.json");
    let bytes = std::fs::read(&path).at(&path)?;
    let r: Report = serde_json::from_slice(&bytes).map_err(|e| Error::Data {
        path: path.clone(),
        msg: format!("not a distill report ({e}); it is written when a run finishes"),
    })?;
    write_charts(run_dir, &r)?;
    crate::fsio::write_file_atomic(&run_dir.join("report.md"), render(&r).as_bytes())?;
    Ok(r)
}

/// The training loss of every stage that logged metrics, by step.
fn loss_series(run_dir: &Path, r: &Report) -> Vec<(String, Vec<(usize, f64)>)> {
    let mut out = Vec::new();
    for stage in r.cost.stages.iter().filter(|c| !c.interrupted).map(|c| &c.stage) {
        let path = run_dir.join("metrics").join(format!("{stage}.jsonl"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let points: Vec<(usize, f64)> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["step"].as_u64()? as usize, v["loss"].as_f64()?)))
            .collect();
        if !points.is_empty() {
            out.push((stage.clone(), points));
        }
    }
    out
}

/// `loss.svg` (training loss of every stage) and `cost.svg` (dollars per stage).
fn write_charts(run_dir: &Path, r: &Report) -> Result<()> {
    let series = loss_series(run_dir, r);
    if !series.is_empty() {
        let svg = crate::evaluate::charts::loss_curves_svg(&series)?;
        crate::fsio::write_file_atomic(&run_dir.join("loss.svg"), svg.as_bytes())?;
    }
    let bars: Vec<(String, f64)> = r
        .cost
        .stages
        .iter()
        .map(|c| {
            let name = if c.interrupted {
                format!("{} (killed)", c.stage)
            } else {
                c.stage.clone()
            };
            (name, c.dollars)
        })
        .collect();
    if !bars.is_empty() {
        let svg = crate::evaluate::charts::cost_bars_svg(&bars)?;
        crate::fsio::write_file_atomic(&run_dir.join("cost.svg"), svg.as_bytes())?;
    }
    Ok(())
}

/// The report as Markdown: the model table with each model's own training
/// cost, the acceptance figures of the trace stage, the verdict, and the cost table.
pub fn render(r: &Report) -> String {
    let mut s = format!("# distill run {}\n\n", r.run_dir.display());
    if !r.dtype.is_empty() {
        s += &format!(
            "Device: {} x {} ({}){}, compute dtype {}{}.\n\n",
            r.device.count,
            r.device.name,
            r.device.kind,
            if r.world_size > 1 {
                format!(" on each of {} ranks", r.world_size)
            } else {
                String::new()
            },
            r.dtype,
            match (r.kernels.as_str(), r.dtype.as_str(), r.device.kind.as_str()) {
                ("fused", "F32", "cpu") => ", fused CPU kernels",
                ("plain", _, _) => ", plain candle ops (--kernels plain)",
                _ => "",
            }
        );
    }
    let stage = |n: &str| r.cost.stages.iter().find(|c| c.stage == n);
    s += "| model | params | held-out loss | perplexity | held-out accuracy | trained in (device-h) | dollars |\n";
    s += "|---|---:|---:|---:|---:|---:|---:|\n";
    for m in &r.models {
        let acc = m.accuracy.map_or("-".into(), |a| {
            format!("{:.1}% ({}/{})", 100.0 * a, m.correct, m.evaluated)
        });
        let (h, d) = stage(&m.name).map_or(("loaded".into(), "-".into()), |c| {
            (format!("{:.4}", c.device_hours), format!("${:.4}", c.dollars))
        });
        s += &format!(
            "| {} | {} | {:.4} | {:.2} | {} | {} | {} |\n",
            m.name,
            m.params,
            m.eval_loss,
            f64::from(m.eval_loss).exp(),
            acc,
            h,
            d
        );
    }
    s += "\n";
    if let Some(c) = &r.logit_cache {
        s += &format!(
            "Offline logit cache: the teacher's top-{} log-probabilities (T = {}) for {} positions of {} examples, \
             {} bytes in {} shard(s): {:.0} bytes per token. Teacher {}.\n\n",
            c.k,
            c.temperature,
            c.rows,
            c.examples,
            c.bytes,
            c.shards.len(),
            c.bytes_per_token,
            c.teacher
        );
    }
    if let Some(t) = &r.traces {
        let a = &t.acceptance;
        s += &format!(
            "Rejection sampling: {} samples on {} prompts, {} correct, {} kept ({:.1}%); {} prompts have a kept trace. Traces: {}\n\n",
            a.samples,
            a.prompts,
            a.correct,
            a.kept,
            100.0 * a.acceptance_rate,
            a.prompts_solved,
            t.path.display()
        );
        // The distilled student's full price, in the layout of the DeepSeek-R1
        // Nature paper's cost table (teacher / SFT data creation / student).
        s += "| cost of the distilled student | device-hours | dollars |\n|---|---:|---:|\n";
        let mut total = (0.0, 0.0);
        for (label, name) in [
            ("teacher training", "teacher"),
            ("SFT data creation (traces)", "traces"),
            ("student fine-tuning", "student"),
        ] {
            match stage(name) {
                Some(c) => {
                    total.0 += c.device_hours;
                    total.1 += c.dollars;
                    s += &format!("| {label} | {:.4} | ${:.4} |\n", c.device_hours, c.dollars);
                }
                None => s += &format!("| {label} | loaded | - |\n"),
            }
        }
        s += &format!("| total | {:.4} | ${:.4} |\n\n", total.0, total.1);
    }
    s += &verdict(r);
    s += "\n\n## Cost\n\n```\n";
    s += &r.cost_table;
    s += "```\n\n![dollars per stage](cost.svg)\n\n## Training loss\n\n![training loss per stage](loss.svg)\n";
    s
}

/// Lines comparing the distilled student with its baseline (and, with the
/// R1 recipe, with the oracle and the teacher).
pub fn verdict(r: &Report) -> String {
    let get = |n: &str| r.models.iter().find(|m| m.name == n);
    let (Some(st), Some(b)) = (get("student"), get("baseline")) else {
        return String::new();
    };
    let (what, base) = if r.traces.is_some() {
        (
            "Distilled student (verified teacher traces)",
            "baseline (final answers only)",
        )
    } else {
        ("Distilled student", "baseline")
    };
    let (Some(sa), Some(ba)) = (st.accuracy, b.accuracy) else {
        return format!(
            "{what}: held-out loss {:.4} vs {base} {:.4}.",
            st.eval_loss, b.eval_loss
        );
    };
    let mut s = format!(
        "{what}: {:.1}% held-out accuracy vs {base} {:.1}% ({:+.1} points); held-out loss {:.4} vs {:.4}.",
        100.0 * sa,
        100.0 * ba,
        100.0 * (sa - ba),
        st.eval_loss,
        b.eval_loss
    );
    for (name, label) in [
        ("student-kd", "traces + logit KD"),
        ("oracle", "gold solutions, no teacher"),
    ] {
        if let Some(a) = get(name).and_then(|m| m.accuracy) {
            s += &format!(" {name} ({label}): {:.1}%.", 100.0 * a);
        }
    }
    if let Some((t, ta)) = get("teacher").and_then(|t| t.accuracy.map(|a| (t, a))) {
        if ta > 0.0 {
            s += &format!(
                " The student reaches {:.0}% of the teacher's accuracy ({:.1}%) with 1/{:.1} of its parameters.",
                100.0 * sa / ta,
                100.0 * ta,
                t.params as f64 / st.params.max(1) as f64
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment killed on 2 ranks of one GPU each, resumed on 1 rank of CPU cores, is
    /// billed for the 2 GPUs at their price.
    #[test]
    fn a_killed_segment_is_billed_on_the_ranks_it_ran_on() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let gpus = DeviceInfo {
            kind: "cuda".into(),
            name: "NVIDIA H100".into(),
            count: 1,
            ..Default::default()
        };
        let beat = Beat {
            stage: "teacher".into(),
            started_unix: 1000.0,
            alive_unix: 1360.0,
            world: 2,
            device: Some(gpus),
            price_per_device_hour: Some(2.0),
        };
        std::fs::write(dir.path().join(HEARTBEAT), serde_json::to_vec(&beat)?)?;
        let mut ledger = Ledger::new(dir.path()).in_memory(); // this run: 1 rank
        let info = DeviceInfo {
            kind: "cpu".into(),
            count: 2,
            ..Default::default()
        };
        record_killed_segment(dir.path(), &mut ledger, &info, &Config::default(), &train::Silent)?;
        let killed = &ledger.stages[0];
        assert!(killed.interrupted);
        // Billed at the 2 ranks of one H100 at $2 that ran it, not at this run's 1 rank
        // of 2 CPU cores.
        assert_eq!((killed.world_size, killed.device_count), (2, 1));
        assert!((killed.device_hours - 360.0 / 3600.0 * 2.0).abs() < 1e-12, "{killed:?}");
        assert!((killed.dollars - killed.device_hours * 2.0).abs() < 1e-12, "{killed:?}");
        assert!(!dir.path().join(HEARTBEAT).exists());
        // A heartbeat from before the field: one rank.
        let old = r#"{"stage":"student","started_unix":0.0,"alive_unix":36.0}"#;
        std::fs::write(dir.path().join(HEARTBEAT), old)?;
        record_killed_segment(dir.path(), &mut ledger, &info, &Config::default(), &train::Silent)?;
        assert_eq!(ledger.stages[1].world_size, 1);
        Ok(())
    }
}
