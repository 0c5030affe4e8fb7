//! Peak memory and time of the fused head loss (`loss::head`) against the unfused
//! path (full logits, `distill_loss_fused`, autograd), forward KL at T 2, loss plus backward.
//!
//! Memory is counted by a global allocator that wraps the system one and keeps the bytes
//! currently allocated and their high-water mark; a run's figure is that mark minus what
//! was allocated before it started (inputs, and the teacher logits in the `logits` case,
//! are already there). These are bytes requested, not resident pages.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release --example fused_head_mem            # N 2048, H 576, V 49152
//! RAYON_NUM_THREADS=2 cargo run --release --example fused_head_mem -- 256 64 4096 1   # N H V runs [chunk]
//! ```
//!
//! Prints a table and one JSON line per (teacher, path).

use std::sync::atomic::Ordering;
use std::time::Instant;

/// The example's own error type: `anyhow` is not among the library's dependencies.
type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

use distill::candle::{DType, Device, Tensor, Var};
use distill::loss::head::{default_chunk_rows, fused_linear_distill_loss, plain_linear_distill_loss};
use distill::loss::{Divergence, LossParts};
use distill::loss::{LossSpec, Teacher};

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::{Counting, CURRENT, PEAK};

#[global_allocator]
static ALLOC: Counting = Counting;

/// A `/proc/self/status` field in bytes (Linux; None elsewhere).
fn proc_status_bytes(key: &str) -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: usize = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// One measured run: peak bytes requested above the level at the start, peak resident
/// bytes above the resident size at the start (None where Linux's resettable high-water
/// mark is unavailable), seconds.
struct Measure {
    peak: usize,
    peak_rss: Option<usize>,
    secs: f64,
}

/// Runs `f` under both counters. The resident figure differs from the requested one in
/// two ways: pages that are allocated zeroed and only read (GradStore's `zeros_like`)
/// never become resident, and small freed blocks that malloc keeps are reused.
fn measured<T>(f: impl FnOnce() -> Res<T>) -> Res<(Measure, T)> {
    // Writing 5 to clear_refs resets VmHWM to the current resident size (Linux >= 4.0).
    let rss_base = std::fs::write("/proc/self/clear_refs", "5")
        .ok()
        .and_then(|()| proc_status_bytes("VmRSS:"));
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let t0 = Instant::now();
    let out = f()?;
    let secs = t0.elapsed().as_secs_f64();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let peak_rss = rss_base.and_then(|b| Some(proc_status_bytes("VmHWM:")?.saturating_sub(b)));
    Ok((Measure { peak, peak_rss, secs }, out))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn main() -> Res<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse::<usize>()
                .map_err(|e| format!("argument {a:?} is not a number: {e}").into())
        })
        .collect::<Res<_>>()?;
    if args.len() > 5 {
        return Err(
            "usage: fused_head_mem [N H V RUNS CHUNK], all optional (default 2048 576 49152 3, chunk auto)".into(),
        );
    }
    let arg = |i: usize, default: usize| args.get(i).copied().unwrap_or(default);
    let (n, h, v, runs) = (arg(0, 2048), arg(1, 576), arg(2, 49_152), arg(3, 3).max(1));
    let chunk = args.get(4).copied();
    let ht = h; // the teacher's width; SmolLM2-135M's is 576 as well
    let dev = Device::Cpu;
    let (alpha, temp, d) = (0.5, 2.0, Divergence::ForwardKl);

    // Inputs: hidden states of RMS-normed size, heads scaled so that logits have a spread
    // of a few units, as in a trained model.
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, h), &dev)?)?; // (N, H)
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (v, h), &dev)?)?; // (V, H)
    let t_hidden = Tensor::randn(0f32, 1.0, (n, ht), &dev)?; // (N, Ht)
    let t_weight = Tensor::randn(0f32, 0.08, (v, ht), &dev)?; // (V, Ht)
    let targets = Tensor::from_vec((0..n).map(|i| ((i * 7919) % v) as u32).collect::<Vec<_>>(), n, &dev)?; // (N,)
    let mask = Tensor::ones(n, DType::F32, &dev)?; // (N,)
    let denom = n as f64;

    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into());
    let chunk_rows = chunk.unwrap_or_else(|| default_chunk_rows(v));
    println!(
        "fused head: N {n}, H {h}, V {v}, teacher H {ht}, forward KL, T {temp}, alpha {alpha}, chunk {chunk_rows} rows, \
         {runs} runs, RAYON_NUM_THREADS={threads}"
    );
    println!(
        "one (N, V) f32 tensor is {:.0} MiB; one (V, H) is {:.0} MiB",
        (n * v * 4) as f64 / MIB,
        (v * h * 4) as f64 / MIB
    );

    let mut rows = Vec::new();
    for teacher_kind in ["hidden", "logits"] {
        // The `logits` teacher is an input in both paths: made before measuring.
        let t_logits = if teacher_kind == "logits" {
            Some(t_hidden.matmul(&t_weight.t()?)?) // (N, V)
        } else {
            None
        };
        let teacher = match &t_logits {
            Some(l) => Some(Teacher::Logits(l)),
            None => Some(Teacher::Hidden {
                hidden: &t_hidden,
                weight: &t_weight,
            }),
        };
        let run = |fused: bool| -> Res<(f32, Tensor, Tensor)> {
            let l: LossParts = if fused {
                fused_linear_distill_loss(
                    x.as_tensor(),
                    w.as_tensor(),
                    teacher,
                    &targets,
                    &mask,
                    &LossSpec::new(alpha, temp, d),
                    denom,
                    chunk,
                )?
            } else {
                plain_linear_distill_loss(
                    x.as_tensor(),
                    w.as_tensor(),
                    teacher,
                    &targets,
                    &mask,
                    &LossSpec::new(alpha, temp, d),
                    denom,
                )?
            };
            let grads = l.total.backward()?;
            let dx = grads
                .get(x.as_tensor())
                .ok_or("no gradient for the hidden states")?
                .clone();
            let dw = grads
                .get(w.as_tensor())
                .ok_or("no gradient for the head weight")?
                .clone();
            Ok((l.total.to_scalar::<f32>()?, dx, dw))
        };
        // Interleaved, so that both paths see the same machine load.
        let (mut peaks, mut rss, mut times) = ([0usize; 2], [Some(0usize); 2], [Vec::new(), Vec::new()]);
        let mut results: [Option<(f32, Tensor, Tensor)>; 2] = [None, None];
        for _ in 0..runs {
            for (i, fused) in [(0, true), (1, false)] {
                let (m, out) = measured(|| run(fused))?;
                peaks[i] = peaks[i].max(m.peak);
                rss[i] = rss[i].zip(m.peak_rss).map(|(a, b)| a.max(b));
                times[i].push(m.secs);
                results[i] = Some(out);
            }
        }
        let (Some(f), Some(p)) = (&results[0], &results[1]) else {
            return Err("no runs".into());
        };
        let max_diff = |a: &Tensor, b: &Tensor| -> Res<f32> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30))
        };
        let (dx_rel, dw_rel) = (max_diff(&f.1, &p.1)?, max_diff(&f.2, &p.2)?);
        let loss_rel = ((f.0 - p.0) / p.0).abs();
        let reduction = 1.0 - peaks[0] as f64 / peaks[1] as f64;
        for (i, path) in [(0, "fused"), (1, "unfused")] {
            let json = serde_json::json!({
                "bench": "fused_head_mem",
                "teacher": teacher_kind,
                "path": path,
                "n": n, "h": h, "v": v, "teacher_h": ht,
                "chunk_rows": if i == 0 { Some(chunk_rows) } else { None },
                "divergence": "forward_kl", "temperature": temp, "alpha": alpha,
                "runs": runs,
                "peak_extra_bytes": peaks[i],
                "peak_extra_rss_bytes": rss[i],
                "median_s": median(times[i].clone()),
                "loss": if i == 0 { f.0 } else { p.0 },
            });
            rows.push((teacher_kind, path, peaks[i], rss[i], median(times[i].clone()), json));
        }
        println!(
            "teacher {teacher_kind}: fused vs unfused: loss rel diff {loss_rel:.1e}, grad max rel diff: hidden {dx_rel:.1e}, \
             weight {dw_rel:.1e}; peak allocated memory {:.1}% lower, peak resident {}",
            100.0 * reduction,
            match rss {
                [Some(f), Some(u)] => format!("{:.1}% lower", 100.0 * (1.0 - f as f64 / u as f64)),
                _ => "n/a".into(),
            }
        );
    }

    println!();
    println!("| teacher | path    | peak extra MiB (allocated) | peak extra MiB (resident) | median s |");
    println!("|---------|---------|---------------------------:|--------------------------:|---------:|");
    for (teacher, path, peak, rss, secs, _) in &rows {
        let rss = rss.map_or("n/a".to_string(), |r| format!("{:.1}", r as f64 / MIB));
        println!(
            "| {teacher:<7} | {path:<7} | {:>26.1} | {rss:>25} | {secs:>8.3} |",
            *peak as f64 / MIB
        );
    }
    println!();
    for (.., json) in &rows {
        println!("{json}");
    }
    Ok(())
}
