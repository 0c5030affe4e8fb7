//! One full training step of the reference model M1, timed the way `train::train`
//! runs it, for the side-by-side comparison with PyTorch eager
//! (`scripts/bench_train_pytorch.py`, driven by `scripts/bench-train.sh`; issue 9).
//!
//! M1: Llama-style, no biases, untied head; vocab 8192, hidden 256, 4 layers, 8 heads
//! of 32 (8 KV heads), SwiGLU 688; batch 8 x 256 tokens (2048 per step); f32; AdamW
//! with the `TrainSpec` defaults (betas 0.9/0.95, eps 1e-8, weight decay 0.1 on
//! matrices, clip 1.0).
//!
//! A step is what one iteration of `train()`'s loop does for a student without a
//! teacher and the default fused loss (`LossImpl::Fused`), grad_accum 1, one rank:
//! `make_batch`, `train::Forward::run` (on CPU f32 with the default fused kernels: the
//! model body's taped forward, `model::tape`, then the head on candle's graph),
//! `distill_loss_with` (cross-entropy over every position: the mask is all ones),
//! `Forward::grads` (candle's backward through the loss and head, then the body's
//! hand-written backward) into a name -> tensor map, `clip_grad_norm`, `AdamW::step` at
//! `lr_at(step)`. Eval and checkpoints are not part of it. The step is split into
//! three phases, each ended by a host read or by eager CPU ops returning, so the sums
//! are the whole step:
//! - forward: batch, forward, loss (its scalar read back);
//! - backward: the gradient map (on the default path, `Llama::loss_and_grads_one_pass`
//!   computes forward, loss and gradients in one call, all counted here; forward is 0);
//! - optimizer: clipping (a global norm read back) and the AdamW update.
//!
//! The `distill` binary installs mimalloc as its allocator; this bench cannot (mimalloc
//! is not a dependency of the library crate) and uses the system one. `bench-train.sh`
//! therefore runs it, and PyTorch, with glibc tuned to keep freed memory
//! (`GLIBC_TUNABLES`, see docs/design.md), which has the same effect on page faults.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p distill --bench train_step
//! STEPS=3 RAYON_NUM_THREADS=2 cargo bench -p distill --bench train_step
//! ```
//!
//! Environment: STEPS (timed steps, default 10), WARMUP (default 2), BATCH (8),
//! SEQ (256), SEED (0), PEAK_SIZE (side of the matmul probe, 2048; 0 skips it),
//! DEVICE ("cpu", the default, or "cuda"/"cuda:N" in a `--features cuda` build: the same
//! step on the GPU, each step ended by a device synchronize, MFU against the GPU's
//! datasheet f32 peak instead of the CPU probe; scripts/gpu-check.sh runs it so),
//! KERNELS ("fused", the default training path: the fused CPU kernels of
//! `kernels::ops` and `kernels::attention`; or "plain": plain candle ops, the path before
//! them), HEAD ("logits", the default as in `train()`: the head's logits and the fused
//! loss on them; or "fused": the fused vocabulary head, `[distill] fused_head = true`).
//! The last line is machine-readable: `RESULT distill tokens_per_s=...` (or
//! `RESULT distill-plain ...`).

use std::time::Instant;

use distill::config::Kernels;
use distill::config::{ModelSpec, TrainSpec};
use distill::cost::peak::measure_cpu_peak;
use distill::cost::projection::{peak_flops, Precision};
use distill::loss::head::{default_chunk_rows, fused_linear_distill_loss};
use distill::loss::{distill_loss_with, LossSpec};
use distill::model::{Llama, ModelConfig};
use distill::prepare::data::batch::{make_batch, Encoded};
use distill::train::optim::{clip_grad_norm, lr_at, AdamW};
use distill::train::step::{one_pass, Forward};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `anyhow` is not among the library's dependencies, so the bench boxes its errors.
type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn env_usize(key: &str, default: usize) -> Res<usize> {
    match std::env::var(key) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|e| format!("{key}={s:?} is not a non-negative integer ({e}); unset it for {default}").into()),
        Err(_) => Ok(default),
    }
}

/// A field of /proc/self/status in MiB (the kernel reports kB); None off Linux.
fn status_mib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rest = status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let kib: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(kib / 1024.0)
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Seconds of each phase of one step, and its loss.
struct StepTimes {
    forward: f64,
    backward: f64,
    optimizer: f64,
    loss: f32,
}

impl StepTimes {
    fn total(&self) -> f64 {
        self.forward + self.backward + self.optimizer
    }
}

/// One iteration of `train::train`'s loop body, stripped of what does not run for a
/// single rank without a teacher (see the file header).
fn train_step(
    model: &Llama,
    opt: &mut AdamW,
    spec: &TrainSpec,
    step: usize,
    examples: &[&Encoded],
    fused_head: bool,
) -> Res<StepTimes> {
    let params = model.params();
    let t0 = Instant::now();
    let lr = lr_at(spec, step);
    let denom: usize = examples.iter().map(|e| e.loss_tokens()).sum();
    let b = make_batch(examples, 0, model.device())?;
    // As `train()` does it: on the fused CPU path the loss runs with no autograd graph
    // (`train::step::one_pass`, in chunks for the fused head); the plain
    // kernels go through `train::step::Forward` and candle's backward.
    let (loss, mut grads, t1) = if model.can_tape() {
        let chunk = fused_head.then(|| default_chunk_rows(model.cfg.vocab_size));
        let (vals, grads) = one_pass(
            model,
            (&b.inputs, &b.targets, &b.mask),
            None,
            &LossSpec::CE_ONLY,
            denom as f64,
            chunk,
        )?;
        // Forward, loss and backward are one call here: the whole of it is reported as
        // the backward phase, and the forward phase as 0.
        (vals.total, grads, t0)
    } else {
        let fwd = Forward::run(model, &b.inputs, fused_head)?;
        let parts = if fused_head {
            fused_linear_distill_loss(
                &fwd.out, // (B*T, H)
                &model.lm_head_weight()?,
                None,
                &b.targets,
                &b.mask,
                &LossSpec::CE_ONLY,
                denom as f64,
                None,
            )?
        } else {
            distill_loss_with(
                &fwd.out, // (B*T, V)
                None,
                &b.targets,
                &b.mask,
                &LossSpec::CE_ONLY,
                denom as f64,
            )?
        };
        let loss = parts.total.to_scalar::<f32>()?;
        let t1 = Instant::now();
        (loss, fwd.grads(model, &parts.total)?, t1)
    };
    if !loss.is_finite() {
        return Err(format!("step {step}: non-finite loss {loss}").into());
    }
    let t2 = Instant::now();

    let norm = clip_grad_norm(&mut grads, spec.grad_clip)?;
    if !norm.is_finite() {
        return Err(format!("step {step}: non-finite gradient norm {norm}").into());
    }
    opt.step(params, &grads, lr)?;
    drop(grads);
    // A GPU runs the update asynchronously: the step ends when the device is done
    // (a no-op on the CPU).
    model.device().synchronize()?;
    let t3 = Instant::now();
    Ok(StepTimes {
        forward: (t1 - t0).as_secs_f64(),
        backward: (t2 - t1).as_secs_f64(),
        optimizer: (t3 - t2).as_secs_f64(),
        loss,
    })
}

fn main() -> Res<()> {
    let steps = env_usize("STEPS", 10)?.max(1);
    let warmup = env_usize("WARMUP", 2)?;
    let batch = env_usize("BATCH", 8)?.max(1);
    let seq = env_usize("SEQ", 256)?.max(1);
    let seed = env_usize("SEED", 0)? as u64;
    let peak_size = env_usize("PEAK_SIZE", 2048)?;
    let threads = rayon::current_num_threads();
    let device_name = std::env::var("DEVICE").unwrap_or_else(|_| "cpu".into());
    let device = distill::device::open(distill::config::parse_device_name(&device_name)?)?;
    let gpu = distill::device::describe(&device);
    let kernels_name = std::env::var("KERNELS").unwrap_or_else(|_| "fused".into());
    let kernels =
        Kernels::parse(&kernels_name).ok_or_else(|| format!("KERNELS={kernels_name:?}: use {}", Kernels::NAMES))?;
    let fused_head = match std::env::var("HEAD").as_deref() {
        Ok("fused") => true,
        Ok("logits") | Err(_) => false,
        Ok(other) => return Err(format!("HEAD={other:?}: use \"fused\" or \"logits\"").into()),
    };

    let spec = ModelSpec {
        hidden_size: 256,
        intermediate_size: 688,
        num_layers: 4,
        num_heads: 8,
        num_kv_heads: Some(8),
        tie_embeddings: false,
        attention_bias: false,
        max_position_embeddings: seq.max(512),
        ..ModelSpec::default()
    };
    let vocab = 8192;
    let cfg = ModelConfig::from_spec(&spec, vocab, 1, 2, 0);
    let mut model = Llama::init(cfg.clone(), spec.init_std, seed, &device)?;
    model.set_kernels(kernels);
    let train_spec = TrainSpec {
        steps: warmup + steps,
        batch_size: batch,
        ..TrainSpec::default()
    };
    let mut opt = AdamW::new(&train_spec, model.params())?;

    // One fresh batch of uniform random tokens per step, seeded. prompt_len 1 puts
    // every target under the loss: the mask is all ones.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7261_696e);
    let data: Vec<Vec<Encoded>> = (0..warmup + steps)
        .map(|_| {
            (0..batch)
                .map(|_| Encoded {
                    ids: (0..=seq).map(|_| rng.random_range(3..vocab as u32)).collect(),
                    prompt_len: 1,
                })
                .collect()
        })
        .collect();

    let tokens = (batch * seq) as f64;
    let train_flops = 3.0 * cfg.forward_flops_per_token(seq) * tokens;
    println!(
        "distill train step, model M1: vocab {vocab}, hidden {}, {} layers, {} heads x {}, FFN {}; \
         batch {batch} x seq {seq} = {} tokens; f32; {} kernels; device {} ({})",
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.head_dim(),
        cfg.intermediate_size,
        batch * seq,
        kernels.name(),
        gpu.kind,
        gpu.name
    );
    println!(
        "params {} ({} in matmuls); train FLOPs/step {:.3e} (3 x forward, attention included); \
         rayon threads {threads}, candle threads {}",
        cfg.num_params(),
        cfg.matmul_params(),
        train_flops,
        distill::candle::utils::get_num_threads()
    );
    println!(
        "GLIBC_TUNABLES={}",
        std::env::var("GLIBC_TUNABLES").unwrap_or_else(|_| "(unset)".into())
    );

    let mut timed = Vec::with_capacity(steps);
    for (i, examples) in data.iter().enumerate() {
        let items: Vec<&Encoded> = examples.iter().collect();
        let s = train_step(&model, &mut opt, &train_spec, i, &items, fused_head)?;
        let kind = if i < warmup { "warm-up" } else { "timed" };
        println!(
            "step {:>2} ({kind:<7}) {:8.1} ms  fwd {:7.1}  bwd {:7.1}  opt {:6.1}  {:7.0} tok/s  loss {:.4}",
            i + 1,
            s.total() * 1e3,
            s.forward * 1e3,
            s.backward * 1e3,
            s.optimizer * 1e3,
            tokens / s.total(),
            s.loss
        );
        if i >= warmup {
            timed.push(s);
        }
    }

    let totals: Vec<f64> = timed.iter().map(StepTimes::total).collect();
    let step_s = median(&totals);
    let (min_s, max_s) = totals
        .iter()
        .fold((f64::INFINITY, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let fwd = median(&timed.iter().map(|s| s.forward).collect::<Vec<_>>());
    let bwd = median(&timed.iter().map(|s| s.backward).collect::<Vec<_>>());
    let opt_s = median(&timed.iter().map(|s| s.optimizer).collect::<Vec<_>>());
    let tok_s = tokens / step_s;

    // The probe runs after the steps, so that its buffers do not sit in the heap the
    // steps reuse; its matrices (3 x 16 MiB at 2048) are far below the step's peak RSS.
    let (peak_gflops, mfu) = if device.is_cuda() {
        // No probe on a GPU: its datasheet peak for f32 on the CUDA cores, as the ledger.
        match peak_flops(&gpu.name, Precision::Fp32) {
            Some(p) => (p / 1e9, train_flops / step_s / p),
            None => (f64::NAN, f64::NAN),
        }
    } else if peak_size > 0 {
        let p = measure_cpu_peak(peak_size, 5)?;
        println!(
            "matmul probe {0}x{0}x{0}: best {1:.1} GFLOP/s, median {2:.1} GFLOP/s ({3} threads, {4})",
            p.size,
            p.flops_per_second / 1e9,
            p.median_flops_per_second / 1e9,
            p.threads,
            p.cpu_model
        );
        (p.flops_per_second / 1e9, train_flops / step_s / p.flops_per_second)
    } else {
        (f64::NAN, f64::NAN)
    };
    let rss = status_mib("VmHWM").unwrap_or(f64::NAN);

    println!(
        "{steps} timed steps: median {:.1} ms (min {:.1}, max {:.1}), {tok_s:.0} tokens/s, \
         {:.1} GFLOP/s achieved, MFU {:.1}% of {}",
        step_s * 1e3,
        min_s * 1e3,
        max_s * 1e3,
        train_flops / step_s / 1e9,
        mfu * 100.0,
        if device.is_cuda() {
            "the GPU's datasheet f32 peak"
        } else {
            "the probe's best"
        }
    );
    println!(
        "phases (medians): forward+loss {:.1} ms ({:.0}%), backward+grads {:.1} ms ({:.0}%), \
         clip+AdamW {:.1} ms ({:.0}%)",
        fwd * 1e3,
        100.0 * fwd / (fwd + bwd + opt_s),
        bwd * 1e3,
        100.0 * bwd / (fwd + bwd + opt_s),
        opt_s * 1e3,
        100.0 * opt_s / (fwd + bwd + opt_s)
    );
    println!("peak RSS (VmHWM) {rss:.0} MiB");
    println!(
        "RESULT {} tokens_per_s={tok_s:.1} step_ms={:.2} min_ms={:.2} max_ms={:.2} fwd_ms={:.2} \
         bwd_ms={:.2} opt_ms={:.2} mfu={mfu:.4} peak_gflops={peak_gflops:.1} peak_rss_mb={rss:.1} \
         threads={threads} steps={steps} device={}",
        if kernels == Kernels::Plain {
            "distill-plain"
        } else {
            "distill"
        },
        step_s * 1e3,
        min_s * 1e3,
        max_s * 1e3,
        fwd * 1e3,
        bwd * 1e3,
        opt_s * 1e3,
        gpu.kind
    );
    Ok(())
}
