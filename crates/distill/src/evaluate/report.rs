//! The run's report: `report.json` (every figure), `report.md` (the same for people,
//! with the R1 cost table and the verdict) and the charts `loss.svg` and `cost.svg`.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::ModelReport;
use crate::cost::heartbeat::one_rank;
use crate::device::DeviceInfo;
use crate::error::Error;
use crate::error::{IoContext, Result};

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
    /// How the teacher held its matmul weights once it only sampled and scored:
    /// "dense" or "int8" (`teacher.matmul_weights`).
    #[serde(default = "dense")]
    pub teacher_weights: String,
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
    /// Every model as an arm of the recipe comparison (`arms`).
    #[serde(default)]
    pub arms: Vec<super::arms::Arm>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TracesReport {
    pub path: PathBuf,
    pub acceptance: crate::teacher::traces::Acceptance,
}

fn dense() -> String {
    "dense".into()
}

pub fn write_report(run_dir: &Path, r: &Report) -> Result<()> {
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
    let mut r: Report = serde_json::from_slice(&bytes).map_err(|e| Error::Data {
        path: path.clone(),
        msg: format!("not a distill report ({e}); it is written when a run finishes"),
    })?;
    // The arms again, from the ledger and the metrics as they are now.
    let rl_start = r
        .arms
        .iter()
        .find(|a| a.name == "student-rl")
        .and_then(|a| a.stages.first().cloned())
        .unwrap_or_else(|| "baseline".into());
    let accuracies: Vec<(String, Option<f64>)> = r.models.iter().map(|m| (m.name.clone(), m.accuracy)).collect();
    r.arms = super::arms::arms(run_dir, &accuracies, &rl_start, &r.cost);
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
    let curves: Vec<(String, Vec<(f64, f64)>)> = r.arms.iter().map(|a| (a.name.clone(), a.curve.clone())).collect();
    if curves.iter().any(|(_, c)| !c.is_empty()) {
        let svg = crate::evaluate::charts::accuracy_curves_svg(&curves)?;
        crate::fsio::write_file_atomic(&run_dir.join("accuracy.svg"), svg.as_bytes())?;
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
        if r.teacher_weights == "int8" {
            s += "The teacher sampled and scored with int8 matmul weights (teacher.matmul_weights = \"int8\").\n\n";
        }
    }
    // A stage's cost is all of its records: killed segments and the completed one.
    let stage = |n: &str| r.cost.stage(n);
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
        if a.prompts_too_long > 0 {
            s += &format!(
                "{} prompts were too long for the teacher's context and were not sampled (verdict prompt_too_long).\n\n",
                a.prompts_too_long
            );
        }
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
    s += &recipes(r);
    s += "\n\n## Cost\n\n```\n";
    s += &r.cost_table;
    s += "```\n\n![dollars per stage](cost.svg)\n\n## Training loss\n\n![training loss per stage](loss.svg)\n";
    s
}

/// The recipe comparison: every arm's accuracy, cost and accuracy per dollar, the
/// split of the on-policy stages' time, and the accuracy-against-dollars chart.
fn recipes(r: &Report) -> String {
    if !r
        .arms
        .iter()
        .any(|a| a.name == "student-onpolicy" || a.name == "student-rl")
    {
        return String::new();
    }
    let mut s = String::from("\n\n## Which recipe buys accuracy cheapest\n\n");
    s += &super::arms::table(&r.arms);
    s += "\nEach arm pays for the stages it was built from; evaluation is billed to none. ";
    s += "Student FLOPs count the models trained in the arm's stages, their sampling included.\n\n";
    s += "| stage | sampling s | scoring s | update s | sampling FLOPs | scoring FLOPs | update FLOPs |\n";
    s += "|---|---:|---:|---:|---:|---:|---:|\n";
    for c in r
        .cost
        .stages
        .iter()
        .filter(|c| c.stage == "student-onpolicy" || c.stage == "student-rl")
    {
        if let Some(w) = &c.split {
            let (us, uf) = w.update(c);
            s += &format!(
                "| {}{} | {:.1} | {:.1} | {:.1} | {:.3e} | {:.3e} | {:.3e} |\n",
                c.stage,
                if c.interrupted { " (killed)" } else { "" },
                w.sample_seconds,
                w.score_seconds,
                us,
                w.sample_flops,
                w.score_flops,
                uf
            );
        }
    }
    if r.arms.iter().any(|a| !a.curve.is_empty()) {
        s += "\n![held-out accuracy against dollars](accuracy.svg)\n";
    }
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
        ("student-onpolicy", "on-policy distillation after SFT"),
        ("student-sft-more", "more SFT for the same student FLOPs"),
        ("student-rl", "GRPO on the verifier's reward"),
    ] {
        if let Some(a) = get(name).and_then(|m| m.accuracy) {
            s += &format!(" {name} ({label}): {:.1}%.", 100.0 * a);
        }
    }
    // The best student that learnt from the teacher, against the teacher.
    let distilled = [
        "student",
        "student-kd",
        "student-pruned",
        "student-onpolicy",
        "student-sft-more",
    ];
    let best = distilled
        .iter()
        .filter_map(|n| get(n).and_then(|m| m.accuracy.map(|a| (m, a))))
        .fold(None, |b: Option<(&ModelReport, f64)>, x| match b {
            Some(b) if b.1 >= x.1 => Some(b),
            _ => Some(x),
        });
    if let (Some((t, ta)), Some((m, a))) = (get("teacher").and_then(|t| t.accuracy.map(|a| (t, a))), best) {
        if ta > 0.0 {
            s += &format!(
                " The best distilled student ({}) reaches {:.0}% of the teacher's accuracy ({:.1}%) with 1/{:.1} of its parameters.",
                m.name,
                100.0 * a / ta,
                100.0 * ta,
                t.params as f64 / m.params.max(1) as f64
            );
        }
    }
    s
}
