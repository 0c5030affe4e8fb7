//! Time and peak memory of the fused distillation loss, forward + backward, for each
//! divergence of the family, against the plain-candle composition for forward KL.
//!
//! One measured step is `sum(divergence_rows(s, t, d, T)) * T^2 / N` followed by
//! `backward()`, which leaves the (N, V) gradient of the student in the `GradStore`.
//! Dropping that store is left out of the time, as PyTorch's `s.grad = None` is in
//! `scripts/bench_kd_pytorch.py`.
//!
//! Memory is measured two ways, both relative to the moment before the step, when the
//! inputs already exist (so they are not counted):
//! - `peak_extra_bytes`: a global allocator wrapping the system one keeps the bytes
//!   currently allocated and their high-water mark. These are bytes requested: a
//!   `calloc`'d buffer counts in full even where its pages are never touched.
//! - `rss_peak_extra_bytes`: the resident-set high-water mark (`VmHWM`), reset through
//!   `/proc/self/clear_refs` before the step, minus `VmRSS` then. The same method the
//!   PyTorch script uses, so the two can be compared directly; `null` where the kernel
//!   does not allow the reset.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p distill --bench kd_loss                     # N 2048, V 32768, T 2
//! RAYON_NUM_THREADS=2 cargo bench -p distill --bench kd_loss -- --n 64 --v 1024 --reps 3
//! ```
//!
//! Options (each also read from the environment as KD_N, KD_V, ...; arguments win):
//! `--n`, `--v`, `--t` (temperature), `--reps`, `--warmup`, `--losses a,b,...`
//! (forward_kl, reverse_kl, jsd, tvd, skew_forward_kl, skew_reverse_kl; default all),
//! `--ref-reps` (plain-candle reference runs, default 1; 0 skips it), `--device` (cpu, the
//! default, or cuda/cuda:N in a `--features cuda` build: the fused ops' CUDA kernels and
//! candle's plain ops on the GPU, each step ended by a device synchronize; the one-pass
//! form is CPU-only and left out; the memory columns then count host memory only).
//! Human-readable lines come first; one JSON line per case is printed at the end.

use std::sync::atomic::Ordering;
use std::time::Instant;

use distill::candle::backprop::GradStore;
use distill::candle::{Device, Tensor, Var};
use distill::loss::full::distill_loss_and_grad;
use distill::loss::LossSpec;
use distill::loss::{
    divergence_rows, divergence_rows_reference, top_k_divergence_rows, top_k_of_logits, Divergence, Teacher,
};
use serde_json::json;

/// `anyhow` is not among the library's dependencies, so the bench boxes its errors.
type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[path = "../examples/common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{Counting, CURRENT, PEAK};

#[global_allocator]
static ALLOC: Counting = Counting;

/// A field of /proc/self/status in bytes (the kernel reports kB).
fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rest = status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Writing 5 to clear_refs sets VmHWM back to the current RSS (Linux 4.0+), so that a
/// step's resident peak can be read without starting a fresh process for it.
fn reset_rss_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[derive(Clone, Copy)]
struct Sample {
    ms: f64,
    peak_extra: usize,
    /// Still allocated when the step returns: the gradient store.
    retained: usize,
    rss_peak_extra: Option<u64>,
    loss: f32,
}

/// Runs one step and measures it; the step returns its scalar loss and what it leaves
/// behind (the gradients), which is dropped only after the clock and the counters are read.
fn measure<G>(dev: &Device, step: impl FnOnce() -> Res<(f32, G)>) -> Res<Sample> {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let rss_base = if reset_rss_peak() { status_bytes("VmRSS") } else { None };
    let t0 = Instant::now();
    let (loss, left) = step()?;
    // A GPU may still be writing the gradient (a no-op on the CPU).
    dev.synchronize()?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let peak_extra = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let retained = CURRENT.load(Ordering::Relaxed).saturating_sub(base);
    let rss_peak_extra = rss_base.and_then(|b| Some(status_bytes("VmHWM")?.saturating_sub(b)));
    drop(left);
    Ok(Sample {
        ms,
        peak_extra,
        retained,
        rss_peak_extra,
        loss,
    })
}

/// The quantity being benchmarked: the batch-mean, T^2-scaled divergence and its backward.
fn loss_and_grads(rows: Tensor, s: &Var, temperature: f64) -> Res<(f32, GradStore)> {
    let n = s.dims()[0] as f64;
    let loss = (rows.sum_all()? * (temperature * temperature / n))?;
    let grads = loss.backward()?;
    if grads.get(s.as_tensor()).is_none() {
        return Err("backward produced no gradient for the student".into());
    }
    Ok((loss.to_scalar::<f32>()?, grads))
}

struct Args {
    n: usize,
    v: usize,
    temperature: f64,
    reps: usize,
    warmup: usize,
    ref_reps: usize,
    losses: Vec<(String, Divergence)>,
    device: String,
}

fn divergence_by_name(name: &str) -> Res<(String, Divergence)> {
    // The parameterised members are benchmarked at the values their papers use.
    let d = match name {
        "forward_kl" => Divergence::ForwardKl,
        "reverse_kl" => Divergence::ReverseKl,
        "jsd" | "jsd_0.5" => Divergence::Jsd { beta: 0.5 },
        "tvd" => Divergence::Tvd,
        "skew_forward_kl" | "skew_forward_kl_0.1" => Divergence::SkewForwardKl { skew: 0.1 },
        "skew_reverse_kl" | "skew_reverse_kl_0.1" => Divergence::SkewReverseKl { skew: 0.1 },
        other => return Err(format!("unknown divergence {other:?}").into()),
    };
    Ok((label(d), d))
}

/// A stable key for the JSON lines: the divergence's name with its parameter, if any.
fn label(d: Divergence) -> String {
    match d {
        Divergence::Jsd { beta } => format!("jsd_{beta}"),
        Divergence::SkewForwardKl { skew } | Divergence::SkewReverseKl { skew } => format!("{}_{skew}", d.name()),
        _ => d.name().to_string(),
    }
}

fn parse_args() -> Res<Args> {
    let mut opts: Vec<(String, String)> = Vec::new();
    for key in ["n", "v", "t", "reps", "warmup", "ref_reps", "losses", "device"] {
        if let Ok(val) = std::env::var(format!("KD_{}", key.to_uppercase())) {
            opts.push((key.to_string(), val));
        }
    }
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        // `cargo bench` appends `--bench` to a harness-less target's arguments.
        if a == "--bench" {
            continue;
        }
        let key = a
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {a:?}; see the header of benches/kd_loss.rs"))?
            .replace('-', "_");
        let val = it.next().ok_or_else(|| format!("{a} needs a value"))?;
        opts.push((key, val));
    }
    let mut args = Args {
        n: 2048,
        v: 32_768,
        temperature: 2.0,
        reps: 10,
        warmup: 2,
        ref_reps: 1,
        losses: Vec::new(),
        device: "cpu".into(),
    };
    let mut losses = "forward_kl,reverse_kl,jsd,tvd,skew_forward_kl,skew_reverse_kl".to_string();
    for (key, val) in opts {
        let num = || val.parse::<usize>().map_err(|e| format!("--{key} {val:?}: {e}"));
        match key.as_str() {
            "n" => args.n = num()?,
            "v" => args.v = num()?,
            "reps" => args.reps = num()?.max(1),
            "warmup" => args.warmup = num()?,
            "ref_reps" => args.ref_reps = num()?,
            "t" => args.temperature = val.parse().map_err(|e| format!("--t {val:?}: {e}"))?,
            "losses" => losses = val,
            "device" => args.device = val,
            other => return Err(format!("unknown option --{other}").into()),
        }
    }
    args.losses = losses
        .split(',')
        .filter(|s| !s.is_empty())
        .map(divergence_by_name)
        .collect::<Res<_>>()?;
    Ok(args)
}

/// A first call, the rest of the warm-up untimed, then the timed repeats.
fn run_case<G>(a: &Args, dev: &Device, imp: &'static str, loss: &str, step: impl Fn() -> Res<(f32, G)>) -> Res<Case> {
    let first = measure(dev, &step)?;
    for _ in 1..a.warmup {
        measure(dev, &step)?;
    }
    let timed = (0..a.reps).map(|_| measure(dev, &step)).collect::<Res<Vec<_>>>()?;
    Ok(Case {
        imp,
        loss: loss.to_string(),
        first,
        timed,
        extra: json!({}),
    })
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// The summary of one case: first call, then the timed repeats.
struct Case {
    imp: &'static str,
    loss: String,
    first: Sample,
    timed: Vec<Sample>,
    extra: serde_json::Value,
}

impl Case {
    fn times(&self) -> Vec<f64> {
        self.timed.iter().map(|s| s.ms).collect()
    }

    fn all(&self) -> impl Iterator<Item = &Sample> {
        std::iter::once(&self.first).chain(&self.timed)
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn main() -> Res<()> {
    let a = parse_args()?;
    let (n, v, temp) = (a.n, a.v, a.temperature);
    let dev = distill::device::open(distill::config::parse_device_name(&a.device)?)?;
    let device_kind = distill::device::describe(&dev).kind;
    let threads = rayon::current_num_threads();
    // Whatever glibc was told decides whether every (N, V) buffer is a fresh mmap that
    // faults its pages in, so the JSON says which allocator setting produced it.
    let alloc = match std::env::var("GLIBC_TUNABLES") {
        Ok(t) if t.contains("mmap_max=0") => "glibc-tuned",
        Ok(_) => "glibc-other",
        Err(_) => "glibc-default",
    };
    let nv_bytes = (n * v * 4) as f64;
    println!(
        "kd_loss: N {n}, V {v}, T {temp}, f32, device {dev:?}, {threads} rayon threads, {alloc}, {} warm-up + \
         {} timed runs; one (N, V) f32 tensor = {:.1} MiB",
        a.warmup,
        a.reps,
        nv_bytes / MIB
    );

    // Logits with a spread of a few units, as a trained LM's are; both sides random so
    // that neither distribution is degenerate.
    let student = Var::from_tensor(&Tensor::randn(0f32, 2.0, (n, v), &dev)?)?; // (N, V)
    let teacher = Tensor::randn(0f32, 2.0, (n, v), &dev)?; // (N, V)

    let mut cases = Vec::new();
    for (name, d) in &a.losses {
        let d = *d;
        let step = || loss_and_grads(divergence_rows(student.as_tensor(), &teacher, d, temp)?, &student, temp);
        cases.push(run_case(&a, &dev, "distill-fused", name, step)?);
    }
    let on_cpu = dev.is_cpu();
    // The same loss and gradient from `distill_loss_and_grad`: one pass per row, the
    // gradient written once, no autograd graph (what the training step uses on the CPU).
    let ones = Tensor::ones(n, distill::candle::DType::F32, &dev)?; // (N,) mask
    let plain_student = student.as_tensor().detach(); // (N, V)
    for (name, d) in a.losses.iter().filter(|_| on_cpu) {
        let d = *d;
        let step = || -> Res<(f32, Tensor)> {
            let t = Some(Teacher::Logits(&teacher));
            let (vals, grad) =
                distill_loss_and_grad(&plain_student, t, None, &ones, &LossSpec::new(0.0, temp, d), n as f64)?;
            Ok((vals.total, grad))
        };
        cases.push(run_case(&a, &dev, "distill-onepass", name, step)?);
    }

    // A top-k teacher (as the logit cache stores it), forward KL: the op with candle's
    // backward (what the fused head uses) against the one-pass form (the training step).
    const TOP_K: usize = 16;
    if let Some((name, d)) = a.losses.iter().find(|(_, d)| *d == Divergence::ForwardKl) {
        let d = *d;
        let top = top_k_of_logits(&teacher, TOP_K, temp)?;
        let name = format!("{name}@top{TOP_K}");
        let op = || {
            loss_and_grads(
                top_k_divergence_rows(student.as_tensor(), &top, d, temp)?,
                &student,
                temp,
            )
        };
        cases.push(run_case(&a, &dev, "distill-fused", &name, op)?);
        let one_pass = || -> Res<(f32, Tensor)> {
            let t = Some(Teacher::TopK(&top));
            let (vals, grad) =
                distill_loss_and_grad(&plain_student, t, None, &ones, &LossSpec::new(0.0, temp, d), n as f64)?;
            Ok((vals.total, grad))
        };
        if on_cpu {
            cases.push(run_case(&a, &dev, "distill-onepass", &name, one_pass)?);
        }
    }

    // Where the fused step's time and memory go, for forward KL: the forward kernel alone,
    // and the accumulation candle's `GradStore` does for every gradient it receives
    // (`zeros_like` + `add`, two more (N, V) buffers), timed on a stand-in (N, V) tensor.
    if let Some((name, d)) = a.losses.iter().find(|(_, d)| on_cpu && *d == Divergence::ForwardKl) {
        let d = *d;
        let fwd = || -> Res<(f32, ())> {
            let rows = divergence_rows(student.as_tensor(), &teacher, d, temp)?;
            let loss = (rows.sum_all()? * (temp * temp / n as f64))?;
            Ok((loss.to_scalar::<f32>()?, ()))
        };
        cases.push(run_case(&a, &dev, "part:fused-fwd-only", name, fwd)?);
        let accumulate = || -> Res<(f32, Tensor)> { Ok((0.0, teacher.zeros_like()?.add(&teacher)?)) };
        cases.push(run_case(&a, &dev, "part:gradstore-zeros+add", name, accumulate)?);
    }

    // The plain-candle composition takes seconds and several GB, so it runs last, where
    // what glibc keeps from it cannot help the fused runs.
    if a.ref_reps > 0 {
        let d = Divergence::ForwardKl;
        let step = || {
            let rows = divergence_rows_reference(student.as_tensor(), &teacher, d, temp)?;
            loss_and_grads(rows, &student, temp)
        };
        let mut samples = (0..a.ref_reps).map(|_| measure(&dev, step)).collect::<Res<Vec<_>>>()?;
        let first = samples.remove(0);
        let timed = if samples.is_empty() {
            // A single run is both the first and the only timed one.
            vec![first]
        } else {
            samples
        };
        // Agreement with the fused op, outside the timing: the numbers mean nothing if
        // the two compute different things.
        let grad_of = |rows: Tensor| -> Res<Tensor> {
            let (_, g) = loss_and_grads(rows, &student, temp)?;
            Ok(g.get(student.as_tensor()).ok_or("no gradient")?.clone())
        };
        let g_ref = grad_of(divergence_rows_reference(student.as_tensor(), &teacher, d, temp)?)?;
        let g_fused = grad_of(divergence_rows(student.as_tensor(), &teacher, d, temp)?)?;
        let max_abs_grad_diff = (g_ref - g_fused)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let fused_loss = cases.iter().find(|c| c.loss == "forward_kl").map(|c| c.first.loss);
        cases.push(Case {
            imp: "candle-plain-ops",
            loss: label(d),
            first,
            timed,
            extra: json!({ "max_abs_grad_diff_vs_fused": max_abs_grad_diff, "fused_loss_value": fused_loss }),
        });
    }

    println!(
        "{:<25} {:<20} {:>10} {:>10} {:>10} {:>15} {:>10} {:>14}",
        "impl", "loss", "median ms", "min ms", "first ms", "peak extra MiB", "x (N,V)", "rss peak MiB"
    );
    let mut lines = Vec::new();
    for c in &cases {
        let times = c.times();
        let med = median(&times);
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let peak = c.all().map(|s| s.peak_extra).max().unwrap_or(0);
        let retained = c.all().map(|s| s.retained).max().unwrap_or(0);
        let rss = c.all().map(|s| s.rss_peak_extra).max().flatten();
        let rss_txt = rss.map_or("n/a".to_string(), |r| format!("{:.1}", r as f64 / MIB));
        println!(
            "{:<25} {:<20} {:>10.1} {:>10.1} {:>10.1} {:>15.1} {:>10.2} {:>14}",
            c.imp,
            c.loss,
            med,
            min,
            c.first.ms,
            peak as f64 / MIB,
            peak as f64 / nv_bytes,
            rss_txt
        );
        let mut line = json!({
            "impl": c.imp,
            "loss": c.loss,
            "alloc": alloc,
            "device": device_kind,
            "n": n,
            "v": v,
            "t": temp,
            "threads": threads,
            "reps": times.len(),
            "median_ms": med,
            "min_ms": min,
            "first_ms": c.first.ms,
            "peak_extra_bytes": peak,
            "peak_method": "alloc-counter",
            "retained_bytes": retained,
            "rss_peak_extra_bytes": rss,
            "loss_value": c.first.loss,
        });
        if let (Some(obj), Some(extra)) = (line.as_object_mut(), c.extra.as_object()) {
            obj.extend(extra.clone());
        }
        lines.push(line);
    }
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
