//! The `distill` command line: parses arguments, draws progress, prints the
//! report, and maps errors to exit codes by their kind (`exit`), printing the full
//! error chain.

mod exit;
mod init;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use distill::config::Backend;
use distill::progress::{Progress, StepLog};
use distill::run::{self, RunOptions};
use distill::Config;
use exit::{bad_flag, usage};
use indicatif::{ProgressBar, ProgressStyle};

// Training and decoding allocate a fresh buffer for every op output; glibc returns large
// ones to the OS and faults them back in on the next step. mimalloc can keep them: see
// `keep_freed_memory`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tells mimalloc never to return freed memory to the OS. By default it purges memory
/// that stays free for 10 ms, which is shorter than one training or decoding step, so
/// every step faulted its buffers back in, zeroed by the kernel: measured on the small
/// teacher's greedy rollout, 0.95 s instead of 2.4 s, at the same peak memory.
fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc's option enum (mimalloc.h); -1: never purge.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is a plain store that mimalloc reads at its next purge.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// Turns transparent huge pages off for this process, for the commands that only sample
/// and score (`generate`, `eval`). A 2 MiB page is zeroed whole on its first touch, so a
/// process that touches memory sparsely (a KV cache filled slot by slot, a step's
/// buffers) maps more than it uses, and on a VM whose host maps freed memory back
/// lazily each page costs milliseconds. Measured on the rollout benchmark's commands
/// (docs/rollout.md), cold: workload a 0.54-0.60 s instead of 0.82-0.87 s at 125-145 MB
/// instead of 195-201 MB; d on 8 prompts 6.8 s instead of 7.2 s; c unchanged. Training
/// keeps them: the stages of a small pipeline took 97 s without against 91 s with (one
/// comparison).
fn small_pages_for_sampling() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and only sets a flag of this
    // process; a failure (an old kernel) leaves huge pages on, which is only slower.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Teacher -> student knowledge distillation on candle, with a cost ledger.
///
/// `distill --config FILE` runs the whole job: train (or load) the teacher,
/// distil a student from it, train the same student without the teacher as a
/// baseline, evaluate them all on held-out data, and write checkpoints, the
/// cost ledger and a report to runs/<name>/. With `[traces] enabled = true`
/// it runs the DeepSeek-R1 recipe instead: the teacher writes solutions, the
/// verified ones are kept, and students learn from them.
#[derive(Parser)]
#[command(
    name = "distill",
    version,
    args_conflicts_with_subcommands = true,
    after_help = exit::help()
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline (the same as `distill --config FILE`).
    Run(RunArgs),
    /// Write a complete, commented config: every key at its default, with its meaning,
    /// type and valid values. It runs as it is: `distill --config distill.toml`.
    Init {
        /// The file to write; `-` prints to standard output.
        #[arg(default_value = init::DEFAULT_FILE)]
        file: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Continue an interrupted run where it stopped: completed stages are kept,
    /// the stage that was running continues from its last valid checkpoint, and
    /// the time the killed segment ran is added to the cost ledger. On CPU the
    /// result is bitwise identical to a run that never stopped.
    Resume {
        /// The run directory, e.g. runs/small.
        run_dir: PathBuf,
        /// cpu, cuda or cuda:N; overrides the run's device.
        #[arg(long)]
        device: Option<String>,
    },
    /// Project device-hours, wall time and dollars from first principles (model
    /// size, tokens, device, count, MFU), from device-hours or wall hours directly,
    /// or by scaling a finished run (--from runs/NAME).
    Cost(CostArgs),
    /// Measure this machine's f32 GEMM peak (the CPU peak that MFU is measured against).
    Peak {
        /// Side of the square matrices.
        #[arg(long, default_value_t = 2048)]
        size: usize,
        /// Timed multiplications (after one warm-up).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// Render a finished run's report.md and charts (loss.svg, cost.svg) again.
    Report {
        /// The run directory, e.g. runs/small.
        run_dir: PathBuf,
    },
    /// Evaluate a checkpoint directory on its run's held-out set: loss and accuracy.
    Eval {
        /// A checkpoint directory, e.g. runs/small/student.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Take the held-out set from this config instead of the checkpoint's distill.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// dense, or int8 (8-bit matmul weights with an f32 scale per 32 inputs; CPU only).
        #[arg(long, default_value = "dense", value_parser = ["dense", "int8"])]
        matmul_weights: String,
    },
    /// Generate with a checkpoint: one prompt (--prompt), or teacher traces with
    /// rejection sampling for a JSONL file of prompts (--input, --out), optionally
    /// as one shard of a larger job (--shard i/n; join the shards with `distill merge`).
    Generate(GenerateArgs),
    /// Join trace shards written by `distill generate --shard i/n` into one file,
    /// identical byte for byte to a single-process run.
    Merge {
        /// The merged trace file to write.
        #[arg(long)]
        out: PathBuf,
        /// The prompts file the shards were made from; every prompt's samples must then be present.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Replace an existing --out file.
        #[arg(long)]
        force: bool,
        /// The shard files, in any order.
        #[arg(required = true, num_args = 1..)]
        shards: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct CostArgs {
    /// GPU name (H800, H100, H200, A100, or the name cudarc reports) or "cpu".
    #[arg(long)]
    device: String,
    /// Devices working in parallel.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Model parameters, e.g. 1.5e9.
    #[arg(long)]
    params: Option<f64>,
    /// Tokens processed, e.g. 1e10.
    #[arg(long)]
    tokens: Option<f64>,
    /// training (6 FLOPs per parameter per token) or forward (2).
    #[arg(long, default_value = "training", value_parser = ["training", "forward"])]
    kind: String,
    /// Model FLOP utilisation, in (0, 1]. Default 0.4 (Llama 3 405B on H100s reached 38-43%).
    #[arg(long)]
    mfu: Option<f64>,
    /// Precision whose peak applies: bf16, tf32 or fp32.
    #[arg(long, default_value = "bf16")]
    precision: String,
    /// Peak FLOP/s of one device, for devices not in the table (a CPU: see `distill peak`).
    #[arg(long)]
    peak: Option<f64>,
    /// Device-hours, instead of a model size.
    #[arg(long, conflicts_with_all = ["params", "wall_hours"])]
    device_hours: Option<f64>,
    /// Wall-clock hours on --count devices, instead of a model size.
    #[arg(long, conflicts_with_all = ["params", "device_hours"])]
    wall_hours: Option<f64>,
    /// Dollars per device-hour. Default: the [cost] price table (H800 $2.00, as DeepSeek-R1 assumed).
    #[arg(long)]
    price: Option<f64>,
    /// Scale this finished run: its --stage model becomes --params and --tokens,
    /// and every other stage keeps its measured share of the FLOPs.
    #[arg(long, requires_all = ["params", "tokens"])]
    from: Option<PathBuf>,
    /// With --from: the stage that --params and --tokens describe.
    #[arg(long, default_value = "teacher")]
    stage: String,
}

#[derive(Args)]
struct GenerateArgs {
    /// A checkpoint directory, e.g. runs/small/teacher.
    #[arg(long)]
    checkpoint: PathBuf,
    /// One prompt; the continuation is printed.
    #[arg(long, conflicts_with = "input", required_unless_present = "input")]
    prompt: Option<String>,
    /// A JSONL file of prompts: {"prompt": ..., "answer": N} (or a "completion" ending in `#### N`).
    #[arg(long, requires = "out")]
    input: Option<PathBuf>,
    /// The trace file to write (JSONL, one record per sample, with the verifier's verdict).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Samples per prompt (K).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass; 1 keeps the whole distribution.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sample from the k most likely tokens only (before --top-p); 0 keeps them all.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Which correct samples to keep: first or all.
    #[arg(long, default_value = "first", value_parser = ["first", "all"])]
    keep: String,
    /// Reject correct samples longer than this many tokens.
    #[arg(long)]
    max_completion_tokens: Option<usize>,
    /// Samples decoded together.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Run only shard i of n (counted from 0), e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT.
    #[arg(long)]
    shard: Option<String>,
    /// Replace an existing --out file.
    #[arg(long)]
    force: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// How the model's matmul weights are held: dense (the checkpoint's values in f32) or
    /// int8 (8-bit weights, one scale per 32 inputs, f32 activations; CPU only).
    #[arg(long, default_value = "dense", value_parser = ["dense", "int8"])]
    matmul_weights: String,
}

#[derive(Args, Default)]
struct RunArgs {
    /// The run config (TOML), e.g. configs/small.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// cpu, cuda or cuda:N; overrides [run] device.
    #[arg(long)]
    device: Option<String>,
    /// Compute precision: auto (bf16 on CUDA, f32 on CPU), f32, bf16 or f16; overrides [run] dtype.
    #[arg(long)]
    dtype: Option<String>,
    /// fused (default: fused CPU kernels for RMSNorm, rope, attention and SwiGLU) or plain
    /// (plain candle ops, for checking); overrides [run] kernels.
    #[arg(long)]
    kernels: Option<String>,
    /// Overrides [run] name (the run directory is <out_dir>/<name>).
    #[arg(long)]
    name: Option<String>,
    /// Overrides [run] out_dir.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Overrides [run] seed (data, initial weights, data order and sampling all derive from it).
    #[arg(long)]
    seed: Option<u64>,
    /// Replace an existing run directory.
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    /// Continue the config's existing run directory instead of starting anew (see `distill resume`).
    #[arg(long)]
    resume: bool,
    /// Check the config, the flags and the device, print the resolved config, and stop
    /// before any work.
    #[arg(long)]
    dry_run: bool,
}

/// When this process started, for the ledger's billing clock.
static STARTED: std::sync::OnceLock<(std::time::Instant, f64)> = std::sync::OnceLock::new();

fn main() -> ExitCode {
    STARTED.get_or_init(|| (std::time::Instant::now(), distill::cost::ledger::unix_now()));
    keep_freed_memory();
    let cli = Cli::parse();
    if matches!(cli.command, Some(Command::Generate(_) | Command::Eval { .. })) {
        small_pages_for_sampling();
    }
    let result = on_the_thread_pool(|| command(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::code(&e))
        }
    }
}

/// Runs `f` on a worker of rayon's global pool, so that every parallel op inside it
/// starts from a worker: called from outside the pool, each op would hand its work to
/// the pool and put the calling thread to sleep until it is done, two context switches
/// per op (a decoding step has hundreds of small ops; measured in docs/rollout.md).
/// The workers get the main thread's usual 8 MiB of stack.
fn on_the_thread_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // An error means the pool exists already (a library caller built it); use it as it is.
    let _ = rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build_global();
    rayon::scope(|_| f())
}

fn command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
        Some(Command::Init { file, force }) => init::init(&file, force),
        Some(Command::Resume { run_dir, device }) => resume(&run_dir, device),
        Some(Command::Cost(args)) => cost(args),
        Some(Command::Peak { size, repeats }) => peak(size, repeats),
        Some(Command::Report { run_dir }) => report(&run_dir),
        Some(Command::Eval {
            checkpoint,
            config,
            device,
            matmul_weights,
        }) => eval(checkpoint, config, &device, &matmul_weights),
        Some(Command::Generate(args)) => generate(args),
        Some(Command::Merge {
            out,
            input,
            force,
            shards,
        }) => merge(&out, input.as_deref(), force, &shards),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let path = args.config.ok_or_else(|| {
        usage(
            "no config given; run `distill --config configs/small.toml`, or write one with `distill init` \
             (see `distill --help`)",
        )
    })?;
    let mut cfg = Config::load(&path)?;
    if let Some(d) = args.device {
        distill::config::parse_device_name(&d).map_err(|e| bad_flag("--device", e))?;
        cfg.run.device = d;
    }
    if let Some(d) = args.dtype {
        distill::config::parse_dtype(&d).map_err(|e| bad_flag("--dtype", e))?;
        cfg.run.dtype = d;
    }
    if let Some(k) = args.kernels {
        cfg.run.kernels = k;
        cfg.kernels().map_err(|e| bad_flag("--kernels", e))?;
    }
    if let Some(n) = args.name {
        cfg.set_run_name(&n).map_err(|e| bad_flag("--name", e))?;
    }
    if let Some(o) = args.out_dir {
        cfg.run.out_dir = o;
    }
    if let Some(seed) = args.seed {
        cfg.run.seed = seed;
    }
    let opts = RunOptions {
        force: args.force,
        resume: args.resume,
        started: STARTED.get().copied(),
    };
    if args.dry_run {
        return dry_run(&path, &cfg);
    }
    run_pipeline(&cfg, &opts)
}

fn run_pipeline(cfg: &Config, opts: &RunOptions) -> anyhow::Result<()> {
    let report = run::run(cfg, opts, &Bars::default())?;
    // In a data-parallel job, rank 0 speaks for all ranks.
    if distill::distributed::launcher_rank().is_some_and(|(rank, _)| rank > 0)
        && cfg.distributed.backend != Backend::None
    {
        return Ok(());
    }
    println!("\n{}", distill::evaluate::report::render(&report));
    println!("run directory: {}", report.run_dir.display());
    Ok(())
}

/// `--dry-run`: the config and flags are valid (they were loaded above) and the device
/// opens; prints the resolved config, every default written out.
fn dry_run(path: &std::path::Path, cfg: &Config) -> anyhow::Result<()> {
    let dev = open_device(&cfg.run.device)?;
    print!("{}", cfg.to_toml()?);
    eprintln!(
        "{}: valid; device {} opens ({:?}); the run would write {} (dry run: nothing was run)",
        path.display(),
        cfg.run.device,
        cfg.compute_dtype(&dev)?,
        cfg.run_dir().display()
    );
    Ok(())
}

fn resume(run_dir: &std::path::Path, device: Option<String>) -> anyhow::Result<()> {
    let cfg_path = run_dir.join("config.toml");
    if !cfg_path.is_file() {
        return Err(usage(format!(
            "{} has no config.toml, so it is not a run directory; pass the folder a run wrote, e.g. runs/small",
            run_dir.display()
        )));
    }
    let mut cfg = Config::load(&cfg_path)?;
    let name = run_dir
        .file_name()
        .ok_or_else(|| usage("the run directory has no folder name; pass the folder a run wrote, e.g. runs/small"))?
        .to_string_lossy()
        .to_string();
    cfg.run.name = name;
    cfg.run.out_dir = run_dir.parent().map(PathBuf::from).unwrap_or_default();
    if let Some(d) = device {
        distill::config::parse_device_name(&d).map_err(|e| bad_flag("--device", e))?;
        cfg.run.device = d;
    }
    run_pipeline(
        &cfg,
        &RunOptions {
            force: false,
            resume: true,
            started: STARTED.get().copied(),
        },
    )
}

fn cost(a: CostArgs) -> anyhow::Result<()> {
    use distill::cost::projection::{self, Precision, ProjectionInput, Throughput, Work, WorkKind};
    let prices = distill::config::CostConfig::default();
    let price = a.price.unwrap_or_else(|| projection::device_price(&a.device, &prices));
    let precision: Precision = a.precision.parse().map_err(|e| bad_flag("--precision", e))?;
    let throughput = Throughput {
        mfu: a.mfu.unwrap_or(projection::DEFAULT_TRAINING_MFU),
        precision,
        peak_flops: a.peak,
    };
    let rows = if let Some(run) = &a.from {
        let summary = projection::read_cost_summary(run)?;
        let target = projection::ScaleTarget {
            reference_stage: a.stage.clone(),
            params: a.params.unwrap_or_default(),
            tokens: a.tokens.unwrap_or_default(),
            device: a.device.clone(),
            count: a.count,
            mfu: a.mfu,
            precision,
            price_per_device_hour: price,
        };
        projection::scale_run(&summary, &target)?
    } else {
        let work = match (a.params, a.tokens, a.device_hours, a.wall_hours) {
            (Some(params), Some(tokens), None, None) => Work::Model {
                params,
                tokens,
                kind: if a.kind == "forward" {
                    WorkKind::Forward
                } else {
                    WorkKind::Training
                },
                throughput,
            },
            (None, None, Some(h), None) => Work::DeviceHours(h),
            (None, None, None, Some(h)) => Work::WallHours(h),
            _ => {
                return Err(usage(
                    "give --params and --tokens (with --mfu), or --device-hours, or --wall-hours; \
                     e.g. distill cost --params 1.5e9 --tokens 1e10 --device H100 --count 64",
                ))
            }
        };
        vec![projection::project(&ProjectionInput {
            stage: "projection".into(),
            device: a.device.clone(),
            count: a.count,
            price_per_device_hour: price,
            work,
        })?]
    };
    print!("{}", projection::render_table(&rows));
    Ok(())
}

fn peak(size: usize, repeats: usize) -> anyhow::Result<()> {
    let m = distill::cost::peak::measure_cpu_peak(size, repeats)?;
    println!(
        "f32 GEMM {size}x{size}, {} threads on {}: best {:.1} GFLOP/s, median {:.1} GFLOP/s",
        m.threads,
        m.cpu_model,
        m.flops_per_second / 1e9,
        m.median_flops_per_second / 1e9
    );
    Ok(())
}

fn report(run_dir: &std::path::Path) -> anyhow::Result<()> {
    let r = distill::evaluate::report::rerender(run_dir)?;
    println!("{}", distill::evaluate::report::render(&r));
    println!("wrote {}", run_dir.join("report.md").display());
    Ok(())
}

fn open_device(name: &str) -> anyhow::Result<distill::candle::Device> {
    let parsed = distill::config::parse_device_name(name).map_err(|e| bad_flag("--device", e))?;
    Ok(distill::device::open(parsed)?)
}

fn eval(checkpoint: PathBuf, config: Option<PathBuf>, device: &str, weights: &str) -> anyhow::Result<()> {
    let dev = open_device(device)?;
    let cfg = config.map(|p| Config::load(&p)).transpose()?;
    let weights = matmul_weights(weights)?;
    let r = distill::evaluate::eval_checkpoint(&checkpoint, cfg.as_ref(), &dev, weights)?;
    println!("checkpoint: {}", r.checkpoint.display());
    println!("params: {}", r.params);
    println!("held-out loss: {:.4}", r.eval_loss);
    match r.accuracy {
        Some(a) => println!("held-out accuracy: {:.1}% ({}/{})", 100.0 * a, r.correct, r.evaluated),
        None => println!("held-out accuracy: n/a (the data has no verifiable answers)"),
    }
    Ok(())
}

/// A `--matmul-weights` value.
fn matmul_weights(s: &str) -> anyhow::Result<distill::config::MatmulWeights> {
    distill::config::MatmulWeights::parse(s).ok_or_else(|| {
        bad_flag(
            "--matmul-weights",
            format!("{s:?}: use {}", distill::config::MatmulWeights::NAMES),
        )
    })
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    use distill::config::Keep;
    use distill::model::generate::{generate_rows, row_rng, Sampling};
    use distill::teacher::traces::{self, Shard, TraceSettings};
    if a.samples == 0 || a.batch_size == 0 {
        return Err(usage("--samples and --batch-size must be at least 1"));
    }
    let valid = a.top_p > 0.0 && a.top_p <= 1.0 && a.temperature >= 0.0 && a.temperature.is_finite();
    if !valid {
        return Err(usage(
            "--top-p must be in (0, 1] and --temperature >= 0 (0 decodes greedily)",
        ));
    }
    let shard = a
        .shard
        .as_deref()
        .map(Shard::parse)
        .transpose()
        .map_err(|e| bad_flag("--shard", e))?;
    if let Some(out) = a.out.as_deref().filter(|o| o.exists() && !a.force) {
        return Err(usage(format!(
            "{} already exists; pass --force to replace it",
            out.display()
        )));
    }
    let dev = open_device(&a.device)?;
    let weights = matmul_weights(&a.matmul_weights)?;
    let (model, tok) = distill::train::checkpoint::load_with(&a.checkpoint, &dev, weights)?;
    let sampling = Sampling {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
    };
    let Some(input) = a.input else {
        let prompt = a.prompt.unwrap_or_default();
        let mut ids = vec![tok.bos];
        ids.extend(tok.encode(&prompt)?);
        let context = model.cfg.max_position_embeddings;
        if distill::model::generate::too_long(ids.len(), context) {
            return Err(usage(format!(
                "the prompt is {} tokens (with the BOS token), which leaves no room for a new token in the \
                 context of {} (max_position_embeddings) of {}; shorten the prompt",
                ids.len(),
                context,
                a.checkpoint.display()
            )));
        }
        let rows = vec![ids; a.samples];
        let mut rngs: Vec<_> = (0..a.samples as u64).map(|k| row_rng(a.seed, k)).collect();
        let (out, _) = generate_rows(&model, &rows, tok.eos, &sampling, &mut rngs, a.batch_size, &mut |_| {})
            .with_context(|| format!("generating with {}", a.checkpoint.display()))?;
        for g in out {
            println!("{prompt}{}", tok.decode(&g.ids)?);
        }
        return Ok(());
    };
    let prompts = traces::read_prompts(&input)?;
    let settings = TraceSettings {
        samples: a.samples,
        sampling,
        keep: if a.keep == "all" { Keep::All } else { Keep::First },
        max_completion_tokens: a.max_completion_tokens,
        batch_rows: a.batch_size,
    };
    let id = distill::train::checkpoint::content_id(&a.checkpoint)?;
    let bars = Bars::default();
    let mut started = false;
    let mut on_batch = |done: usize, total: usize| {
        if !started {
            bars.stage_start("generate", total);
            started = true;
        }
        bars.advance(done, "samples");
    };
    let (records, acc) = traces::generate(
        &model,
        &tok,
        &id,
        &prompts,
        &settings,
        shard.unwrap_or(Shard::WHOLE),
        &mut on_batch,
    )
    .with_context(|| format!("generating with {}", a.checkpoint.display()))?;
    bars.stage_end();
    let out = a.out.ok_or_else(|| usage("--out is required with --input"))?;
    traces::write(&out, &records)?;
    eprintln!(
        "{}: {} samples on {} prompts, {} correct, {} kept (acceptance {:.1}%), {} prompts solved",
        out.display(),
        acc.samples,
        acc.prompts,
        acc.correct,
        acc.kept,
        100.0 * acc.acceptance_rate,
        acc.prompts_solved
    );
    warn_too_long(&acc, a.checkpoint.as_path());
    Ok(())
}

/// Says how many prompts did not fit the model's context (their samples are recorded as
/// `prompt_too_long`, not generated).
fn warn_too_long(acc: &distill::teacher::traces::Acceptance, checkpoint: &std::path::Path) {
    if acc.prompts_too_long > 0 {
        eprintln!(
            "warning: {} prompts leave no room for a new token in the context of {}; their samples are \
             recorded with the verdict prompt_too_long. Shorten them, or use a model with a longer context",
            acc.prompts_too_long,
            checkpoint.display()
        );
    }
}

fn merge(
    out: &std::path::Path,
    input: Option<&std::path::Path>,
    force: bool,
    shards: &[PathBuf],
) -> anyhow::Result<()> {
    if out.exists() && !force {
        return Err(usage(format!(
            "{} already exists; pass --force to replace it",
            out.display()
        )));
    }
    let prompts = input.map(distill::teacher::traces::read_prompts).transpose()?;
    let records = distill::teacher::traces::merge(shards, prompts.as_deref())?;
    distill::teacher::traces::write(out, &records)?;
    let acc = distill::teacher::traces::Acceptance::of(&records);
    eprintln!(
        "{}: {} records from {} shards, {} kept (acceptance {:.1}%)",
        out.display(),
        records.len(),
        shards.len(),
        acc.kept,
        100.0 * acc.acceptance_rate
    );
    if acc.prompts_too_long > 0 {
        eprintln!(
            "warning: {} prompts were too long for the model's context (verdict prompt_too_long)",
            acc.prompts_too_long
        );
    }
    Ok(())
}

/// indicatif bars: one per stage, with loss, tokens/s and ETA.
#[derive(Default)]
struct Bars {
    bar: std::cell::RefCell<Option<ProgressBar>>,
}

impl Progress for Bars {
    fn stage_start(&self, stage: &str, total: usize) {
        let pb = ProgressBar::new(total as u64);
        let style = ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        pb.set_style(style);
        pb.set_prefix(stage.to_string());
        *self.bar.borrow_mut() = Some(pb);
    }

    fn step(&self, l: &StepLog) {
        let Some(pb) = self.bar.borrow().clone() else {
            return;
        };
        pb.set_position(l.step as u64);
        pb.set_message(format!(
            "loss {:.4} (ce {:.4} kd {:.4}) {:.0} tok/s, run ${:.4}",
            l.loss, l.ce, l.kd, l.tokens_per_second, l.dollars
        ));
        if let Some(e) = l.eval_loss {
            let line = format!(
                "{:>9} step {:>5}/{}: loss {:.4} ce {:.4} kd {:.4} lr {:.2e} |g| {:.3} held-out loss {:.4}",
                pb.prefix(),
                l.step,
                l.total_steps,
                l.loss,
                l.ce,
                l.kd,
                l.lr,
                l.grad_norm,
                e
            );
            if pb.is_hidden() {
                eprintln!("{line}");
            } else {
                pb.println(line);
            }
        }
    }

    fn advance(&self, done: usize, msg: &str) {
        if let Some(pb) = self.bar.borrow().as_ref() {
            pb.set_position(done as u64);
            pb.set_message(msg.to_string());
        }
    }

    fn message(&self, msg: &str) {
        match self
            .bar
            .borrow()
            .as_ref()
            .filter(|b| !b.is_hidden() && !b.is_finished())
        {
            Some(pb) => pb.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    fn stage_end(&self) {
        if let Some(pb) = self.bar.borrow_mut().take() {
            pb.finish();
        }
    }
}
