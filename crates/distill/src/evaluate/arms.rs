//! Which recipe buys accuracy cheapest: each evaluated model as an arm of the comparison
//! the DeepSeek-R1 paper makes (distillation against RL on the small model), with every
//! stage it took to make it, what those cost, and its held-out accuracy along the way.
//!
//! An arm pays for its own stage and for the stages it was built from: a distilled
//! student pays for the teacher and its traces, the on-policy student for the SFT
//! student too, the RL student for the stage it started from. Evaluation is not billed
//! to any arm. Accuracy along the way comes from `[eval] curve_examples`: a point at
//! step s of a stage of S steps is placed at the dollars of the stages before it plus
//! s / S of the stage's own dollars. An arm's curve is its own model's: the teacher's
//! points are not the student's, and a stage another arm also went through (the SFT
//! student under the on-policy student) adds only its last point, where the arm branches.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cost::ledger::CostSummary;

/// One arm: a model and the stages that made it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Arm {
    pub name: String,
    /// The stages it paid for, in order, its own last.
    pub stages: Vec<String>,
    /// Held-out accuracy of the final evaluation.
    pub accuracy: Option<f64>,
    pub device_hours: f64,
    pub dollars: f64,
    /// FLOPs of the models trained in its stages (sampling included), and of everything
    /// it paid for (teacher training, traces and teacher scoring included).
    pub student_flops: f64,
    pub flops: f64,
    /// (cumulative dollars, accuracy on the curve's problems) along its stages.
    pub curve: Vec<(f64, f64)>,
}

impl Arm {
    /// Accuracy points (percent) per dollar spent.
    pub fn points_per_dollar(&self) -> Option<f64> {
        let a = self.accuracy?;
        (self.dollars > 0.0).then(|| 100.0 * a / self.dollars)
    }
}

/// The stages the model `name` was built from, itself last: `rl_start` is the stage the
/// RL student started from. Stages the ledger does not hold (a loaded teacher, no
/// traces) are left out.
pub fn lineage(name: &str, rl_start: &str, cost: &CostSummary) -> Vec<String> {
    let teacher_side = ["teacher", "prune", "traces"];
    let mut out: Vec<&str> = match name {
        "teacher" => vec![],
        "baseline" | "oracle" => vec![],
        "student-onpolicy" | "student-sft-more" => [&teacher_side[..], &["student"]].concat(),
        "student-kd" => [&teacher_side[..], &["teacher-logits"]].concat(),
        "student-rl" => {
            let mut before = lineage(rl_start, rl_start, cost);
            before.push("student-rl".into());
            return before;
        }
        // Logit distillation (no traces): the student learns from the teacher's logits.
        _ if cost.stage("traces").is_none() => [&teacher_side[..], &["teacher-logits"]].concat(),
        _ => teacher_side.to_vec(),
    };
    out.push(name);
    out.into_iter()
        .filter(|s| cost.stage(s).is_some())
        .map(str::to_string)
        .collect()
}

/// The arm of each evaluated model, with its curve read from `run_dir/metrics`.
pub fn arms(run_dir: &Path, models: &[(String, Option<f64>)], rl_start: &str, cost: &CostSummary) -> Vec<Arm> {
    models
        .iter()
        .map(|(name, accuracy)| {
            let stages = lineage(name, rl_start, cost);
            let mut arm = Arm {
                name: name.clone(),
                stages: stages.clone(),
                accuracy: *accuracy,
                device_hours: 0.0,
                dollars: 0.0,
                student_flops: 0.0,
                flops: 0.0,
                curve: Vec::new(),
            };
            for (i, s) in stages.iter().enumerate() {
                let Some(t) = cost.stage(s) else { continue };
                // Stages that train the arm's own model (not the teacher that wrote its data).
                let own = !matches!(s.as_str(), "teacher" | "traces" | "prune" | "teacher-logits") || name == "teacher";
                if own {
                    // The arm's last stage draws its whole curve; an earlier one, which
                    // another arm draws in full, only the point the arm branches from.
                    let mut points = curve_points(run_dir, s);
                    if i + 1 < stages.len() {
                        points = points.split_off(points.len().saturating_sub(1));
                    }
                    arm.curve
                        .extend(points.iter().map(|(f, a)| (arm.dollars + f * t.dollars, *a)));
                    arm.student_flops += cost
                        .stages
                        .iter()
                        .filter(|c| &c.stage == s)
                        .map(|c| c.flops)
                        .sum::<f64>();
                }
                arm.device_hours += t.device_hours;
                arm.dollars += t.dollars;
                arm.flops += t.flops;
            }
            arm
        })
        .collect()
}

/// A stage's curve: (fraction of its steps done, accuracy) from its metrics file.
fn curve_points(run_dir: &Path, stage: &str) -> Vec<(f64, f64)> {
    let path = run_dir.join("metrics").join(format!("{stage}.jsonl"));
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let (step, total) = (v["step"].as_f64()?, v["total_steps"].as_f64()?);
            Some((step / total.max(1.0), v["accuracy"].as_f64()?))
        })
        .collect()
}

/// The arms as a Markdown table, laid out like the R1 paper's distillation-versus-RL
/// comparison: accuracy, what was spent, and accuracy per dollar.
pub fn table(arms: &[Arm]) -> String {
    let mut s = String::from(
        "| arm | stages paid for | held-out accuracy | student FLOPs | all FLOPs | device-hours | dollars | points per dollar |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for a in arms {
        s += &format!(
            "| {} | {} | {} | {:.3e} | {:.3e} | {:.4} | ${:.4} | {} |\n",
            a.name,
            if a.stages.is_empty() {
                "none (loaded, not billed)".to_string()
            } else {
                a.stages.join(" + ")
            },
            a.accuracy.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x)),
            a.student_flops,
            a.flops,
            a.device_hours,
            a.dollars,
            a.points_per_dollar().map_or("-".into(), |p| format!("{p:.0}")),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::ledger::StageCost;

    fn cost(stages: &[(&str, f64, f64)]) -> CostSummary {
        let rec = |(name, dollars, flops): &(&str, f64, f64)| {
            let mut c: StageCost = serde_json::from_value(serde_json::json!({
                "stage": name, "device_kind": "cpu", "device_name": "x", "device_count": 1,
                "wall_seconds": 1.0, "device_hours": dollars / 2.0, "price_per_device_hour": 2.0,
                "dollars": dollars, "tokens": 0, "flops": flops, "teacher_flops": 0.0, "flops_per_second": 0.0
            }))
            .unwrap();
            c.teacher_flops = if *name == "student-onpolicy" { 5.0 } else { 0.0 };
            c
        };
        CostSummary {
            stages: stages.iter().map(rec).collect(),
            total_wall_seconds: 0.0,
            total_device_hours: 0.0,
            total_dollars: 0.0,
            total_flops: 0.0,
        }
    }

    #[test]
    fn arms_pay_for_the_stages_they_were_built_from() {
        let c = cost(&[
            ("teacher", 10.0, 100.0),
            ("traces", 2.0, 20.0),
            ("student", 1.0, 10.0),
            ("baseline", 1.0, 10.0),
            ("student-onpolicy", 3.0, 30.0),
            ("student-rl", 4.0, 40.0),
            ("eval", 9.0, 90.0),
        ]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("metrics")).unwrap();
        std::fs::write(
            dir.path().join("metrics/student-onpolicy.jsonl"),
            "{\"step\":1,\"total_steps\":2,\"accuracy\":0.5}\n{\"step\":2,\"total_steps\":2}\n",
        )
        .unwrap();
        let halves =
            "{\"step\":1,\"total_steps\":2,\"accuracy\":0.1}\n{\"step\":2,\"total_steps\":2,\"accuracy\":0.4}\n";
        for stage in ["teacher", "student"] {
            std::fs::write(dir.path().join(format!("metrics/{stage}.jsonl")), halves).unwrap();
        }
        let models: Vec<(String, Option<f64>)> = ["teacher", "student", "baseline", "student-onpolicy", "student-rl"]
            .iter()
            .map(|n| (n.to_string(), Some(0.5)))
            .collect();
        let arms = arms(dir.path(), &models, "baseline", &c);
        let get = |n: &str| arms.iter().find(|a| a.name == n).unwrap();
        assert_eq!(get("teacher").stages, ["teacher"]);
        assert_eq!(get("teacher").student_flops, 100.0);
        assert_eq!(get("student").stages, ["teacher", "traces", "student"]);
        let op = get("student-onpolicy");
        assert_eq!(op.stages, ["teacher", "traces", "student", "student-onpolicy"]);
        assert_eq!((op.dollars, op.student_flops, op.flops), (16.0, 40.0, 165.0));
        // The student's last point (after the teacher's 10 and the traces' 2 dollars, and
        // the student's 1), then half-way through its own stage: 13 dollars and half of 3.
        // The teacher's points are not the student's.
        assert_eq!(op.curve, [(13.0, 0.4), (14.5, 0.5)]);
        assert_eq!(get("student").curve, [(12.5, 0.1), (13.0, 0.4)]);
        assert_eq!(get("teacher").curve, [(5.0, 0.1), (10.0, 0.4)]);
        assert_eq!(get("student-rl").stages, ["baseline", "student-rl"]);
        assert_eq!(get("student-rl").dollars, 5.0);
        assert_eq!(get("student-rl").points_per_dollar(), Some(10.0));
        assert!(table(&arms).contains("| student-rl | baseline + student-rl | 50.0% |"));
    }
}
