//! The `distill` command line: parses arguments, draws progress, prints the
//! report, and maps errors to exit codes with the full error chain.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use distill::pipeline::{self, RunOptions};
use distill::train::{Progress, StepLog};
use distill::Config;
use indicatif::{ProgressBar, ProgressStyle};

// Training allocates a fresh buffer for every op output; glibc returns large
// ones to the OS and faults them back in on the next step. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Teacher -> student knowledge distillation on candle, with a cost ledger.
///
/// `distill --config FILE` runs the whole job: train (or load) the teacher,
/// distil a student from it, train the same student without the teacher as a
/// baseline, evaluate all three on held-out data, and write checkpoints, the
/// cost ledger and a report to runs/<name>/.
#[derive(Parser)]
#[command(name = "distill", version, args_conflicts_with_subcommands = true)]
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
    },
    /// Generate a continuation of a prompt with a checkpoint.
    Generate {
        /// A checkpoint directory, e.g. runs/small/student.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 decodes greedily.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

#[derive(Args, Default)]
struct RunArgs {
    /// The run config (TOML), e.g. configs/small.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// cpu, cuda or cuda:N; overrides [run] device.
    #[arg(long)]
    device: Option<String>,
    /// Overrides [run] name (the run directory is <out_dir>/<name>).
    #[arg(long)]
    name: Option<String>,
    /// Overrides [run] out_dir.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Replace an existing run directory.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
        Some(Command::Eval {
            checkpoint,
            config,
            device,
        }) => eval(checkpoint, config, &device),
        Some(Command::Generate {
            checkpoint,
            prompt,
            max_new_tokens,
            temperature,
            seed,
            device,
        }) => generate(checkpoint, &prompt, max_new_tokens, temperature, seed, &device),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let path = args
        .config
        .context("no config given; run `distill --config configs/small.toml` (see `distill --help`)")?;
    let mut cfg = Config::load(&path)?;
    if let Some(d) = args.device {
        distill::device::parse_device_name(&d)?;
        cfg.run.device = d;
    }
    if let Some(n) = args.name {
        cfg.run.name = n;
    }
    if let Some(o) = args.out_dir {
        cfg.run.out_dir = o;
    }
    let report = pipeline::run(&cfg, &RunOptions { force: args.force }, &Bars::default())?;
    println!("\n{}", pipeline::render(&report));
    println!("run directory: {}", report.run_dir.display());
    Ok(())
}

fn open_device(name: &str) -> anyhow::Result<distill::candle::Device> {
    Ok(distill::device::open(distill::device::parse_device_name(name)?)?)
}

fn eval(checkpoint: PathBuf, config: Option<PathBuf>, device: &str) -> anyhow::Result<()> {
    let dev = open_device(device)?;
    let cfg = config.map(|p| Config::load(&p)).transpose()?;
    let r = pipeline::eval_checkpoint(&checkpoint, cfg.as_ref(), &dev)?;
    println!("checkpoint: {}", r.checkpoint.display());
    println!("params: {}", r.params);
    println!("held-out loss: {:.4}", r.eval_loss);
    match r.accuracy {
        Some(a) => println!("held-out accuracy: {:.1}% ({}/{})", 100.0 * a, r.correct, r.evaluated),
        None => println!("held-out accuracy: n/a (the data has no verifiable answers)"),
    }
    Ok(())
}

fn generate(
    checkpoint: PathBuf,
    prompt: &str,
    max_new_tokens: usize,
    temperature: f64,
    seed: u64,
    device: &str,
) -> anyhow::Result<()> {
    let dev = open_device(device)?;
    let (model, tok) = distill::checkpoint::load(&checkpoint, &dev)?;
    let mut ids = vec![tok.bos];
    ids.extend(tok.encode(prompt)?);
    let s = distill::generate::Sampling {
        max_new_tokens,
        temperature,
        seed,
    };
    let (out, _) = distill::generate::generate_batch(&model, &[ids], tok.eos, &s)?;
    let text = tok.decode(out.first().map(Vec::as_slice).unwrap_or(&[]))?;
    println!("{prompt}{text}");
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
            "loss {:.4} (ce {:.4} kd {:.4}) {:.0} tok/s",
            l.loss, l.ce, l.kd, l.tokens_per_second
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
