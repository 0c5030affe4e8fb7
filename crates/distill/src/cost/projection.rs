//! Cost projections from first principles, for planning a run before paying
//! for it: FLOPs from the model size and token count (6·P·N to train, 2·P·N
//! forward only; Kaplan et al. 2020, "Scaling laws for neural language
//! models", section 2.1), device time from the device's peak FLOP/s and an
//! assumed model FLOP utilisation (MFU), dollars from a price per
//! device-hour. A reported device-hour figure can be priced directly, which is
//! how the DeepSeek-R1 cost table is reproduced in the tests.
//!
//! `scale_run` projects a finished run's measured stages to a new model size,
//! token count and device; `render_table` prints projections for people.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::CostConfig;
use crate::cost::ledger::CostSummary;
use crate::device::DeviceInfo;
use crate::error::{Error, IoContext, Result};

/// Number format that a peak figure is quoted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// BF16 inputs on the tensor cores (FP32 accumulate), dense.
    Bf16,
    /// TF32 on the tensor cores, dense.
    Tf32,
    /// Plain FP32 on the CUDA cores (no tensor cores).
    Fp32,
}

impl std::str::FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bf16" => Ok(Self::Bf16),
            "tf32" => Ok(Self::Tf32),
            "fp32" | "f32" => Ok(Self::Fp32),
            other => Err(Error::Invalid(format!(
                "unknown precision {other:?}; use \"bf16\", \"tf32\" or \"fp32\""
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bf16 => "bf16",
            Self::Tf32 => "tf32",
            Self::Fp32 => "fp32",
        })
    }
}

/// One row of the peak table: dense (no structured sparsity) FLOP/s.
struct Peak {
    /// Every fragment must occur in the upper-cased device name.
    fragments: &'static [&'static str],
    bf16: f64,
    tf32: f64,
    fp32: f64,
}

const T: f64 = 1e12;

/// Checked in order; the first row whose fragments all occur in the name wins,
/// so PCIe rows come before the SXM rows of the same chip.
const PEAKS: &[Peak] = &[
    // H100 PCIe: NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022),
    // table 3: BF16 756 TFLOPS dense (1,513 with sparsity), TF32 378 (756),
    // FP32 51.2 (the datasheet rounds to 51).
    Peak {
        fragments: &["H100", "PCIE"],
        bf16: 756.0 * T,
        tf32: 378.0 * T,
        fp32: 51.0 * T,
    },
    // H100 SXM: the same whitepaper, table 3: BF16 989.4 TFLOPS dense (the
    // datasheet's 1,979 is with sparsity), TF32 494.7, FP32 66.9 (datasheet: 67).
    // nvidia-smi calls it "NVIDIA H100 80GB HBM3".
    Peak {
        fragments: &["H100"],
        bf16: 989.4 * T,
        tf32: 494.7 * T,
        fp32: 67.0 * T,
    },
    // H800 SXM: the export variant of the H100 SXM. NVIDIA's H800 Tensor Core
    // GPU datasheet gives it the H100 SXM's BF16 (1,979 with sparsity), TF32 and
    // FP32 figures; what was cut is the NVLink bandwidth (400 GB/s against
    // 900 GB/s), which the DeepSeek-V3 technical report (arXiv 2412.19437,
    // section 3.1) works around. The DeepSeek-R1 runs used H800s.
    Peak {
        fragments: &["H800"],
        bf16: 989.4 * T,
        tf32: 494.7 * T,
        fp32: 67.0 * T,
    },
    // H200 SXM: NVIDIA H200 datasheet: the H100 SXM's compute (BF16 1,979 with
    // sparsity, FP32 67) with more and faster memory.
    Peak {
        fragments: &["H200"],
        bf16: 989.4 * T,
        tf32: 494.7 * T,
        fp32: 67.0 * T,
    },
    // A100 (SXM4, and PCIe, which the datasheet rates the same): NVIDIA A100
    // Tensor Core GPU datasheet: BF16 312 TFLOPS dense (624 with sparsity),
    // TF32 156 (312), FP32 19.5.
    Peak {
        fragments: &["A100"],
        bf16: 312.0 * T,
        tf32: 156.0 * T,
        fp32: 19.5 * T,
    },
];

/// Peak dense FLOP/s of one device in `dtype`, matched by a case-insensitive
/// name fragment ("NVIDIA H100 80GB HBM3" is an H100 SXM), or `None` when the
/// device is not in the table. NVL boards (H100 NVL, H200 NVL) run at lower
/// clocks and are left out rather than given the SXM figures.
pub fn peak_flops(device: &str, dtype: Precision) -> Option<f64> {
    let name = device.to_ascii_uppercase();
    if name.contains("NVL") {
        return None;
    }
    PEAKS
        .iter()
        .find(|p| p.fragments.iter().all(|f| name.contains(f)))
        .map(|p| match dtype {
            Precision::Bf16 => p.bf16,
            Precision::Tf32 => p.tf32,
            Precision::Fp32 => p.fp32,
        })
}

/// The price of one device-hour of `device` under `prices` (`[cost]` in the
/// config): `"cpu"` is priced per core, any other name as a GPU, matched the
/// way the ledger matches detected GPU names.
pub fn device_price(device: &str, prices: &CostConfig) -> f64 {
    let kind = if device.trim().eq_ignore_ascii_case("cpu") {
        "cpu"
    } else {
        "cuda"
    };
    crate::cost::ledger::price_per_hour(
        prices,
        &DeviceInfo {
            kind: kind.into(),
            name: device.into(),
            count: 1,
            ..Default::default()
        },
    )
}

/// Training counts a forward and a backward pass (6 FLOPs per parameter per
/// token); inference and teacher forwards count 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkKind {
    Training,
    Forward,
}

impl WorkKind {
    pub fn flops_per_param_token(self) -> f64 {
        match self {
            Self::Training => 6.0,
            Self::Forward => 2.0,
        }
    }
}

/// How fast one device turns FLOPs into progress.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Model FLOP utilisation: achieved model FLOP/s over peak, 0 < mfu <= 1.
    pub mfu: f64,
    /// The precision whose peak applies.
    pub precision: Precision,
    /// Peak FLOP/s of one device; `None` looks the device up in the peak table.
    /// Give it for devices not in the table (a CPU: measure it with
    /// `peak::measure_cpu_peak`).
    pub peak_flops: Option<f64>,
}

/// A typical model FLOP utilisation of large BF16 training on H100-class GPUs:
/// Meta reports 38-43% for Llama 3 405B pre-training on 8K-16K H100s (Dubey et
/// al. 2024, "The Llama 3 herd of models", table 4). Small models, short
/// sequences and generation (decoding is memory-bound) reach far less.
pub const DEFAULT_TRAINING_MFU: f64 = 0.4;

impl Default for Throughput {
    fn default() -> Self {
        Self {
            mfu: DEFAULT_TRAINING_MFU,
            precision: Precision::Bf16,
            peak_flops: None,
        }
    }
}

/// What a projected stage does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// A model of `params` parameters over `tokens` tokens.
    Model {
        params: f64,
        tokens: f64,
        kind: WorkKind,
        throughput: Throughput,
    },
    /// A known FLOP count.
    Flops { flops: f64, throughput: Throughput },
    /// Device-hours as measured or reported.
    DeviceHours(f64),
    /// Wall-clock hours on `count` devices.
    WallHours(f64),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionInput {
    pub stage: String,
    /// A GPU name ("H800", "NVIDIA A100-SXM4-80GB") or "cpu".
    pub device: String,
    /// Devices working in parallel.
    pub count: usize,
    pub price_per_device_hour: f64,
    pub work: Work,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Projection {
    pub stage: String,
    pub device: String,
    pub count: usize,
    /// Model FLOPs, where the work was given as a model or a FLOP count.
    pub flops: Option<f64>,
    /// Sustained FLOP/s of one device assumed (peak × MFU), likewise.
    pub flops_per_second_per_device: Option<f64>,
    pub device_hours: f64,
    /// device_hours / count: the devices work in parallel with perfect scaling.
    pub wall_hours: f64,
    pub price_per_device_hour: f64,
    pub dollars: f64,
}

fn positive(what: &str, x: f64, hint: &str) -> Result<f64> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(Error::Invalid(format!(
            "{what} must be a positive number, got {x}; {hint}"
        )))
    }
}

/// Seconds of one device that `flops` need at `t`'s sustained rate.
fn device_seconds(flops: f64, device: &str, t: &Throughput) -> Result<(f64, f64)> {
    if !(t.mfu.is_finite() && t.mfu > 0.0 && t.mfu <= 1.0) {
        return Err(Error::Invalid(format!(
            "MFU must be in (0, 1], got {}; {DEFAULT_TRAINING_MFU} is typical of large BF16 training",
            t.mfu
        )));
    }
    let peak = match t.peak_flops {
        Some(p) => positive(
            "peak FLOP/s",
            p,
            "give the device's dense peak, e.g. 989.4e12 for an H100 SXM in BF16",
        )?,
        None => peak_flops(device, t.precision).ok_or_else(|| {
            Error::Invalid(format!(
                "no {} peak FLOP/s known for device {device:?} (the table has H100, H800, H200 and A100); \
                 give the peak yourself, or give device-hours instead of a model size",
                t.precision
            ))
        })?,
    };
    let rate = peak * t.mfu;
    Ok((flops / rate, rate))
}

/// Projects one stage: device-hours, wall hours (device-hours / count) and
/// dollars (device-hours × price).
pub fn project(input: &ProjectionInput) -> Result<Projection> {
    if input.count == 0 {
        return Err(Error::Invalid(format!(
            "stage {:?}: device count must be at least 1",
            input.stage
        )));
    }
    let price = input.price_per_device_hour;
    if !(price.is_finite() && price >= 0.0) {
        return Err(Error::Invalid(format!(
            "stage {:?}: price per device-hour must be a non-negative number, got {price}",
            input.stage
        )));
    }
    let count = input.count as f64;
    let (device_hours, flops, rate) = match input.work {
        Work::Model {
            params,
            tokens,
            kind,
            throughput,
        } => {
            let p = positive("params", params, "give the model's parameter count, e.g. 7e9")?;
            let n = positive("tokens", tokens, "give the tokens processed, e.g. 2e12")?;
            let flops = kind.flops_per_param_token() * p * n;
            let (secs, rate) = device_seconds(flops, &input.device, &throughput)?;
            (secs / 3600.0, Some(flops), Some(rate))
        }
        Work::Flops { flops, throughput } => {
            let flops = positive("FLOPs", flops, "give the stage's total FLOPs")?;
            let (secs, rate) = device_seconds(flops, &input.device, &throughput)?;
            (secs / 3600.0, Some(flops), Some(rate))
        }
        Work::DeviceHours(h) => (
            positive("device-hours", h, "give the stage's GPU-hours (devices × wall hours)")?,
            None,
            None,
        ),
        Work::WallHours(h) => (
            positive("wall hours", h, "give the stage's wall-clock hours")? * count,
            None,
            None,
        ),
    };
    Ok(Projection {
        stage: input.stage.clone(),
        device: input.device.clone(),
        count: input.count,
        flops,
        flops_per_second_per_device: rate,
        device_hours,
        wall_hours: device_hours / count,
        price_per_device_hour: price,
        dollars: device_hours * price,
    })
}

/// Reads `cost.json` from a run directory.
pub fn read_cost_summary(run_dir: &Path) -> Result<CostSummary> {
    let path = run_dir.join("cost.json");
    let bytes = std::fs::read(&path).at(&path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Data {
        path,
        msg: format!("not a cost summary ({e}); it is written by `distill` at the end of every stage"),
    })
}

/// Where `scale_run` should take a finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleTarget {
    /// The stage of the measured run whose model `params` and `tokens` describe
    /// at the target scale, e.g. "teacher" (or "student").
    pub reference_stage: String,
    /// Parameters of that stage's model at the target scale.
    pub params: f64,
    /// Tokens that stage trains on at the target scale.
    pub tokens: f64,
    pub device: String,
    pub count: usize,
    /// Model FLOP utilisation on the target; `None` means `DEFAULT_TRAINING_MFU`.
    pub mfu: Option<f64>,
    pub precision: Precision,
    pub price_per_device_hour: f64,
}

/// Stages that `scale_run` leaves out: their size is set by the evaluation
/// set, not by the training recipe being scaled.
pub const UNSCALED_STAGES: &[&str] = &["eval"];

/// Projects a finished run's stages to a new scale.
///
/// The rule (one scale factor for the whole recipe): the reference stage's
/// model is projected at 6·P·N FLOPs, P and N from `target`, and every other
/// stage keeps its measured FLOP ratio to the reference stage's own model
/// FLOPs. So with factor s = 6·P·N / (measured model FLOPs of the reference
/// stage), a stage's projected FLOPs are s × (its measured model FLOPs + its
/// teacher-forward FLOPs). Teacher and students grow together, and a
/// distillation stage keeps its teacher-forward share.
///
/// Stages without FLOPs (prepare, a teacher loaded from a checkpoint), killed
/// segments (the resumed stage's record carries the whole stage's work) and
/// `UNSCALED_STAGES` are left out. One MFU serves every stage, so generation stages (traces),
/// which reach a far lower MFU than training, are projected optimistically.
pub fn scale_run(run: &CostSummary, target: &ScaleTarget) -> Result<Vec<Projection>> {
    let p = positive(
        "target params",
        target.params,
        "give the reference model's size, e.g. 7e9",
    )?;
    let n = positive(
        "target tokens",
        target.tokens,
        "give the reference stage's tokens, e.g. 2e12",
    )?;
    let done = || run.stages.iter().filter(|s| !s.interrupted);
    let reference = done().find(|s| s.stage == target.reference_stage).ok_or_else(|| {
        let names: Vec<&str> = done().map(|s| s.stage.as_str()).collect();
        Error::Invalid(format!(
            "the run has no completed stage {:?} to scale from; its stages are [{}]",
            target.reference_stage,
            names.join(", ")
        ))
    })?;
    let reference_flops = reference.stage_work().0;
    if !(reference_flops.is_finite() && reference_flops > 0.0) {
        return Err(Error::Invalid(format!(
            "stage {:?} recorded no FLOPs (a loaded checkpoint?); scale from a stage that trained",
            reference.stage
        )));
    }
    let scale = WorkKind::Training.flops_per_param_token() * p * n / reference_flops;
    let throughput = Throughput {
        mfu: target.mfu.unwrap_or(DEFAULT_TRAINING_MFU),
        precision: target.precision,
        peak_flops: None,
    };
    done()
        .filter(|s| !UNSCALED_STAGES.contains(&s.stage.as_str()))
        .map(|s| (s, s.stage_work().0 + s.stage_work().1))
        .filter(|(_, flops)| *flops > 0.0)
        .map(|(s, flops)| {
            project(&ProjectionInput {
                stage: s.stage.clone(),
                device: target.device.clone(),
                count: target.count,
                price_per_device_hour: target.price_per_device_hour,
                work: Work::Flops {
                    flops: scale * flops,
                    throughput,
                },
            })
        })
        .collect()
}

/// A readable number: grouped thousands for large values, a few significant
/// digits for small ones.
fn num(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    if x.abs() >= 1000.0 {
        let digits = format!("{:.0}", x.abs());
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if x < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if x == 0.0 || x.abs() >= 0.01 {
        format!("{x:.2}")
    } else {
        format!("{x:.2e}")
    }
}

/// A plain-text table of projections with a total row. Stages are taken to run
/// one after another, so wall hours add up like device-hours.
pub fn render_table(rows: &[Projection]) -> String {
    let mut s = format!(
        "{:<24} {:<24} {:>6} {:>10} {:>14} {:>12} {:>14}\n",
        "stage", "device", "count", "FLOPs", "device-hours", "wall hours", "dollars"
    );
    let flops = |f: Option<f64>| f.map_or_else(|| "-".to_string(), |f| format!("{f:.3e}"));
    for r in rows {
        s += &format!(
            "{:<24} {:<24} {:>6} {:>10} {:>14} {:>12} {:>14}\n",
            r.stage,
            r.device,
            r.count,
            flops(r.flops),
            num(r.device_hours),
            num(r.wall_hours),
            format!("${}", num(r.dollars))
        );
    }
    let total_flops = if rows.iter().all(|r| r.flops.is_some()) && !rows.is_empty() {
        Some(rows.iter().filter_map(|r| r.flops).sum())
    } else {
        None
    };
    s += &format!(
        "{:<24} {:<24} {:>6} {:>10} {:>14} {:>12} {:>14}\n",
        "total",
        "",
        "",
        flops(total_flops),
        num(rows.iter().map(|r| r.device_hours).sum()),
        num(rows.iter().map(|r| r.wall_hours).sum()),
        format!("${}", num(rows.iter().map(|r| r.dollars).sum()))
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::ledger::StageCost;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn peak_table_matches_datasheets_and_names() {
        assert_eq!(peak_flops("NVIDIA H100 80GB HBM3", Precision::Bf16), Some(989.4e12));
        assert_eq!(peak_flops("h100", Precision::Fp32), Some(67e12));
        assert_eq!(peak_flops("NVIDIA H800", Precision::Bf16), Some(989.4e12));
        assert_eq!(peak_flops("NVIDIA H800", Precision::Tf32), Some(494.7e12));
        assert_eq!(peak_flops("NVIDIA A100-SXM4-80GB", Precision::Bf16), Some(312e12));
        assert_eq!(peak_flops("NVIDIA A100-SXM4-40GB", Precision::Fp32), Some(19.5e12));
        assert_eq!(peak_flops("NVIDIA H100 PCIe", Precision::Bf16), Some(756e12));
        assert_eq!(peak_flops("NVIDIA H100 NVL", Precision::Bf16), None);
        assert_eq!(peak_flops("NVIDIA L4", Precision::Bf16), None);
        assert_eq!(peak_flops("AMD EPYC", Precision::Fp32), None);
        assert_eq!("BF16".parse::<Precision>().ok(), Some(Precision::Bf16));
        assert!("fp8".parse::<Precision>().is_err());
    }

    #[test]
    fn prices_come_from_the_cost_config() {
        let p = CostConfig::default();
        assert_eq!(device_price("H800", &p), 2.0);
        assert_eq!(device_price("NVIDIA A100-SXM4-80GB", &p), 2.70);
        assert_eq!(device_price("NVIDIA L4", &p), 0.8048);
        assert_eq!(device_price("NVIDIA RTX PRO 6000", &p), p.default_gpu_hour);
        assert_eq!(device_price("cpu", &p), p.cpu_core_hour);
    }

    #[test]
    fn model_work_is_6pn_over_peak_times_mfu() -> Result<()> {
        // 7B params, 1T tokens, 64 H100s at 40% MFU, $2.50.
        let pr = project(&ProjectionInput {
            stage: "pretrain".into(),
            device: "H100".into(),
            count: 64,
            price_per_device_hour: 2.5,
            work: Work::Model {
                params: 7e9,
                tokens: 1e12,
                kind: WorkKind::Training,
                throughput: Throughput::default(),
            },
        })?;
        let flops = 6.0 * 7e9 * 1e12;
        let hours = flops / (989.4e12 * 0.4) / 3600.0; // about 29,479 GPU-hours
        assert_eq!(pr.flops, Some(flops));
        assert!(close(pr.device_hours, hours), "{}", pr.device_hours);
        assert!((pr.device_hours - 29_479.1).abs() < 0.1);
        assert!(close(pr.wall_hours, hours / 64.0));
        assert!(close(pr.dollars, hours * 2.5));

        // Forward-only work is a third of training; a given peak overrides the table.
        let fwd = project(&ProjectionInput {
            stage: "generate".into(),
            device: "cpu".into(),
            count: 2,
            price_per_device_hour: 0.05,
            work: Work::Model {
                params: 1e6,
                tokens: 3.6e6,
                kind: WorkKind::Forward,
                throughput: Throughput {
                    mfu: 1.0,
                    precision: Precision::Fp32,
                    peak_flops: Some(1e9),
                },
            },
        })?;
        // 2 * 1e6 * 3.6e6 = 7.2e12 FLOPs at 1e9 FLOP/s = 7200 s = 2 device-hours.
        assert!(close(fwd.device_hours, 2.0));
        assert!(close(fwd.wall_hours, 1.0));
        assert!(close(fwd.dollars, 0.1));
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors_that_say_why() {
        let base = ProjectionInput {
            stage: "s".into(),
            device: "H100".into(),
            count: 8,
            price_per_device_hour: 2.0,
            work: Work::Model {
                params: 1e9,
                tokens: 1e10,
                kind: WorkKind::Training,
                throughput: Throughput {
                    mfu: 1.5,
                    ..Throughput::default()
                },
            },
        };
        let err = project(&base).unwrap_err().to_string();
        assert!(err.contains("MFU"), "{err}");
        let err = project(&ProjectionInput {
            device: "NVIDIA L4".into(),
            work: Work::Flops {
                flops: 1e18,
                throughput: Throughput::default(),
            },
            ..base.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("no bf16 peak") && err.contains("device-hours"), "{err}");
        assert!(project(&ProjectionInput {
            count: 0,
            work: Work::DeviceHours(1.0),
            ..base.clone()
        })
        .is_err());
        assert!(project(&ProjectionInput {
            work: Work::WallHours(f64::NAN),
            ..base.clone()
        })
        .is_err());
        assert!(project(&ProjectionInput {
            price_per_device_hour: -1.0,
            work: Work::DeviceHours(1.0),
            ..base
        })
        .is_err());
    }

    /// DeepSeek-AI, "DeepSeek-R1 incentivizes reasoning in LLMs through
    /// reinforcement learning", Nature 645 (2025), supplementary cost table:
    /// R1-Zero on 512 H800s for about 198 h, SFT data creation about 5K
    /// GPU-hours, R1 on 512 H800s for about 80 h, at $2 per GPU-hour:
    /// 101K / 5K / 41K GPU-hours, $202K / $10K / $82K, total 147K and $294K.
    #[test]
    fn reproduces_the_deepseek_r1_cost_table() -> Result<()> {
        let price = device_price("H800", &CostConfig::default());
        let stage = |name: &str, count: usize, work: Work| ProjectionInput {
            stage: name.into(),
            device: "H800".into(),
            count,
            price_per_device_hour: price,
            work,
        };
        let rows = [
            project(&stage("DeepSeek-R1-Zero", 512, Work::WallHours(198.0)))?,
            project(&stage("SFT data creation", 512, Work::DeviceHours(5_000.0)))?,
            project(&stage("DeepSeek-R1", 512, Work::WallHours(80.0)))?,
        ];
        let hours = rows.each_ref().map(|r| r.device_hours);
        let dollars = rows.each_ref().map(|r| r.dollars);
        assert_eq!(hours, [101_376.0, 5_000.0, 40_960.0]);
        assert_eq!(dollars, [202_752.0, 10_000.0, 81_920.0]);
        let total_hours: f64 = hours.iter().sum();
        let total_dollars: f64 = dollars.iter().sum();
        assert_eq!(total_hours, 147_336.0);
        assert_eq!(total_dollars, 294_672.0);
        // The paper rounds GPU-hours to thousands and prices the rounded figures.
        let k = |x: f64| (x / 1000.0).round();
        assert_eq!(hours.map(k), [101.0, 5.0, 41.0]);
        assert_eq!(hours.map(|h| 2.0 * k(h)), [202.0, 10.0, 82.0]);
        assert_eq!(k(total_hours), 147.0);
        assert_eq!(2.0 * k(total_hours), 294.0);
        assert_eq!(rows[0].wall_hours, 198.0);

        let table = render_table(&rows);
        assert!(table.contains("101,376") && table.contains("$294,672"), "{table}");
        let total = table.lines().find(|l| l.starts_with("total")).unwrap_or_default();
        assert!(total.contains("147,336") && total.contains(" - "), "{total}");
        Ok(())
    }

    fn stage(name: &str, flops: f64, teacher_flops: f64) -> StageCost {
        let dev = DeviceInfo {
            kind: "cpu".into(),
            name: "test cpu".into(),
            count: 2,
            ..Default::default()
        };
        StageCost::new(name, &dev, &CostConfig::default(), 100.0, 1000, flops, teacher_flops)
    }

    fn summary(stages: Vec<StageCost>) -> CostSummary {
        CostSummary {
            total_wall_seconds: stages.iter().map(|s| s.wall_seconds).sum(),
            total_device_hours: stages.iter().map(|s| s.device_hours).sum(),
            total_dollars: stages.iter().map(|s| s.dollars).sum(),
            total_flops: stages.iter().map(|s| s.flops + s.teacher_flops).sum(),
            stages,
        }
    }

    #[test]
    fn scale_run_keeps_stage_ratios_and_prices_them() -> Result<()> {
        let mut killed = stage("teacher", 0.0, 0.0);
        killed.interrupted = true;
        let run = summary(vec![
            stage("prepare", 0.0, 0.0),
            killed,
            stage("teacher", 1e12, 0.0),
            stage("traces", 2e11, 0.0),
            stage("student", 5e11, 1e11),
            stage("baseline", 5e11, 0.0),
            stage("eval", 1e10, 0.0),
        ]);
        let target = ScaleTarget {
            reference_stage: "teacher".into(),
            params: 1e9,
            tokens: 1e10,
            device: "NVIDIA H100 80GB HBM3".into(),
            count: 8,
            mfu: Some(0.5),
            precision: Precision::Bf16,
            price_per_device_hour: 2.5,
        };
        let rows = scale_run(&run, &target)?;
        let names: Vec<&str> = rows.iter().map(|r| r.stage.as_str()).collect();
        assert_eq!(names, ["teacher", "traces", "student", "baseline"]);
        // s = 6 * 1e9 * 1e10 / 1e12 = 6e7.
        let expect = [6e19, 1.2e19, 3.6e19, 3e19];
        for (r, f) in rows.iter().zip(expect) {
            let flops = r.flops.unwrap_or_default();
            assert!(close(flops, f), "{}: {flops}", r.stage);
            let hours = f / (989.4e12 * 0.5) / 3600.0;
            assert!(close(r.device_hours, hours), "{}", r.stage);
            assert!(close(r.wall_hours, hours / 8.0));
            assert!(close(r.dollars, hours * 2.5));
        }
        // The teacher: 6e19 / 4.947e14 FLOP/s = 121,285 s = 33.69 GPU-hours.
        assert!((rows[0].device_hours - 33.69).abs() < 0.01);

        // Without an MFU the documented default applies.
        let default = scale_run(
            &run,
            &ScaleTarget {
                mfu: None,
                ..target.clone()
            },
        )?;
        assert!(close(
            default[0].device_hours,
            rows[0].device_hours * 0.5 / DEFAULT_TRAINING_MFU
        ));

        // Scaling to the run's own size gives back its measured FLOPs.
        let same = scale_run(
            &summary(vec![stage("student", 6.0 * 2e5 * 1e6, 0.0)]),
            &ScaleTarget {
                reference_stage: "student".into(),
                params: 2e5,
                tokens: 1e6,
                ..target.clone()
            },
        )?;
        assert!(close(same[0].flops.unwrap_or_default(), 1.2e12));

        let err = scale_run(
            &run,
            &ScaleTarget {
                reference_stage: "oracle".into(),
                ..target.clone()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"oracle\"") && err.contains("teacher, traces"), "{err}");
        assert!(scale_run(
            &run,
            &ScaleTarget {
                reference_stage: "prepare".into(),
                ..target.clone()
            }
        )
        .is_err());
        assert!(scale_run(&run, &ScaleTarget { params: 0.0, ..target }).is_err());
        Ok(())
    }

    #[test]
    fn reads_the_cost_summary_of_a_run() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let mut ledger = crate::cost::ledger::Ledger::new(dir.path());
        ledger.record(stage("teacher", 3e12, 0.0))?;
        let s = read_cost_summary(dir.path())?;
        assert_eq!(s.stages.len(), 1);
        assert_eq!(s.total_flops, 3e12);
        std::fs::write(dir.path().join("cost.json"), "{").map_err(|e| Error::Invalid(e.to_string()))?;
        let err = read_cost_summary(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cost.json") && err.contains("not a cost summary"), "{err}");
        Ok(())
    }

    #[test]
    fn numbers_are_grouped_and_small_ones_kept() {
        assert_eq!(num(147_336.0), "147,336");
        assert_eq!(num(1_234_567.4), "1,234,567");
        assert_eq!(num(999.0), "999.00");
        assert_eq!(num(0.5), "0.50");
        assert_eq!(num(0.0), "0.00");
        assert_eq!(num(0.000217), "2.17e-4");
    }
}
