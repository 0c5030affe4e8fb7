//! The cost ledger: what each stage of a run cost in device-hours, dollars and
//! FLOPs. Prices come from `[cost]` in the config; the default H800 price of
//! $2 per GPU-hour is the one the DeepSeek-R1 Nature paper (2025, supplementary)
//! used to price its training.
//!
//! Every finished stage is appended to `ledger.jsonl` (one JSON record per
//! line, fsynced) and the whole table is rewritten to `cost.json`. A stage
//! that was killed and later resumed adds one `interrupted` record for the
//! time it ran before the kill (from the run's heartbeat file), so the totals
//! count every second the run used.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::CostConfig;
use crate::device::DeviceInfo;
use crate::error::{Error, IoContext, Result};

/// One completed stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageCost {
    pub stage: String,
    pub device_kind: String,
    pub device_name: String,
    /// Billed units: CPU cores in use, or GPUs.
    pub device_count: usize,
    pub wall_seconds: f64,
    pub device_hours: f64,
    pub price_per_device_hour: f64,
    pub dollars: f64,
    /// Tokens the stage processed (padding excluded).
    pub tokens: u64,
    /// Estimated FLOPs of the model being trained or evaluated.
    pub flops: f64,
    /// Estimated FLOPs of the teacher's forward passes inside this stage.
    pub teacher_flops: f64,
    /// (flops + teacher_flops) / wall_seconds.
    pub flops_per_second: f64,
    /// Peak FLOP/s of all the devices the stage ran on: the datasheet peak of
    /// the GPU (f32, as `distill` trains), or the CPU's as measured by the GEMM
    /// probe at the start of the run (`distill peak`), or `[cost]
    /// peak_flops_per_device` times the device count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_flops_per_second: Option<f64>,
    /// Model FLOP utilisation: flops_per_second / peak_flops_per_second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// A segment of the stage that was killed before it finished: its time
    /// and price count, its work is in the record of the resumed stage.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// Processes (ranks) that ran the stage, each on `device_count` devices; the
    /// device-hours are wall time x device_count x world_size.
    #[serde(default = "one")]
    pub world_size: usize,
    /// Wall time the stage spent in collective communication (gradient sums and
    /// the like), measured on rank 0; 0 for one process.
    #[serde(default)]
    pub comm_seconds: f64,
    /// Optimiser steps, for the communication time per step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
}

fn one() -> usize {
    1
}

/// The price of one device-hour for `dev` under `prices`.
pub fn price_per_hour(prices: &CostConfig, dev: &DeviceInfo) -> f64 {
    if dev.kind == "cpu" {
        return prices.cpu_core_hour;
    }
    let name = dev.name.to_lowercase();
    prices
        .gpu_hour
        .iter()
        .find(|(k, _)| name.contains(&k.to_lowercase()))
        .map_or(prices.default_gpu_hour, |(_, p)| *p)
}

impl StageCost {
    pub fn new(
        stage: &str,
        dev: &DeviceInfo,
        prices: &CostConfig,
        wall_seconds: f64,
        tokens: u64,
        flops: f64,
        teacher_flops: f64,
    ) -> Self {
        let device_hours = wall_seconds / 3600.0 * dev.count as f64;
        let price = price_per_hour(prices, dev);
        Self {
            stage: stage.to_string(),
            device_kind: dev.kind.clone(),
            device_name: dev.name.clone(),
            device_count: dev.count,
            wall_seconds,
            device_hours,
            price_per_device_hour: price,
            dollars: device_hours * price,
            tokens,
            flops,
            teacher_flops,
            flops_per_second: if wall_seconds > 0.0 {
                (flops + teacher_flops) / wall_seconds
            } else {
                0.0
            },
            peak_flops_per_second: None,
            mfu: None,
            interrupted: false,
            world_size: 1,
            comm_seconds: 0.0,
            steps: None,
        }
    }

    /// The stage ran on `world` ranks, each billed like the one this record
    /// describes, and spent `comm_seconds` communicating over `steps` optimiser steps.
    pub fn on_ranks(mut self, world: usize, comm_seconds: f64, steps: Option<usize>) -> Self {
        let w = world.max(1);
        self.device_hours = self.wall_seconds / 3600.0 * (self.device_count * w) as f64;
        self.dollars = self.device_hours * self.price_per_device_hour;
        self.world_size = w;
        self.comm_seconds = comm_seconds;
        self.steps = steps;
        self
    }

    /// The time a killed segment of `stage` ran; its work is counted when the stage completes.
    pub fn interrupted(stage: &str, dev: &DeviceInfo, prices: &CostConfig, wall_seconds: f64) -> Self {
        Self {
            interrupted: true,
            ..Self::new(stage, dev, prices, wall_seconds, 0, 0.0, 0.0)
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CostSummary {
    pub stages: Vec<StageCost>,
    pub total_wall_seconds: f64,
    pub total_device_hours: f64,
    pub total_dollars: f64,
    pub total_flops: f64,
}

/// The run's ledger, kept in `ledger.jsonl` and summarised in `cost.json`.
pub struct Ledger {
    dir: PathBuf,
    pub stages: Vec<StageCost>,
    /// Peak FLOP/s of the run's devices; records get it and their MFU.
    pub peak_flops: Option<f64>,
    /// Records are written to disk (rank 0); other ranks keep the same ledger in
    /// memory so that they take the same decisions.
    persist: bool,
    /// Ranks of the run: a record made for one rank is billed for all of them.
    pub world: usize,
}

impl Ledger {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            dir: run_dir.to_path_buf(),
            stages: vec![],
            peak_flops: None,
            persist: true,
            world: 1,
        }
    }

    /// A ledger that takes records in memory only: the copy a rank other than 0 keeps.
    pub fn in_memory(mut self) -> Self {
        self.persist = false;
        self
    }

    /// Reopens the ledger of an existing run. A last line torn by a crash in
    /// the middle of an append is dropped (the file is rewritten without it);
    /// a damaged line elsewhere is an error.
    pub fn open(run_dir: &Path) -> Result<Self> {
        Self::read(run_dir, true)
    }

    /// Reads an existing run's ledger into memory, changing nothing on disk (ranks
    /// other than 0).
    pub fn open_in_memory(run_dir: &Path) -> Result<Self> {
        Self::read(run_dir, false)
    }

    fn read(run_dir: &Path, persist: bool) -> Result<Self> {
        let path = run_dir.join("ledger.jsonl");
        let mut ledger = Self::new(run_dir);
        ledger.persist = persist;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ledger),
            Err(e) => return Err(Error::Io { path, source: e }),
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut torn = false;
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<StageCost>(line) {
                Ok(c) => ledger.stages.push(c),
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => torn = true,
                Err(e) => {
                    return Err(Error::Data {
                        path,
                        msg: format!("line {}: not a ledger record ({e})", i + 1),
                    })
                }
            }
        }
        if torn && ledger.persist {
            let mut body = String::new();
            for c in &ledger.stages {
                body += &serde_json::to_string(c).map_err(|e| Error::Invalid(e.to_string()))?;
                body.push('\n');
            }
            crate::fsio::write_file_atomic(&path, body.as_bytes())?;
        }
        Ok(ledger)
    }

    /// Whether `stage` has completed (an interrupted segment does not count).
    pub fn completed(&self, stage: &str) -> bool {
        self.stages.iter().any(|c| c.stage == stage && !c.interrupted)
    }

    /// Appends a stage of this run to `ledger.jsonl` (fsynced) and rewrites `cost.json`,
    /// billed on the run's ranks.
    pub fn record(&mut self, mut cost: StageCost) -> Result<()> {
        if cost.world_size != self.world {
            let (comm, steps) = (cost.comm_seconds, cost.steps);
            cost = cost.on_ranks(self.world, comm, steps);
        }
        self.record_as_billed(cost)
    }

    /// Appends a stage billed on the ranks it says (`StageCost::on_ranks`): a segment
    /// an earlier launch ran, on its own number of ranks.
    pub fn record_as_billed(&mut self, mut cost: StageCost) -> Result<()> {
        if let (Some(peak), None) = (self.peak_flops, cost.peak_flops_per_second) {
            cost.peak_flops_per_second = Some(peak);
            if !cost.interrupted && cost.flops_per_second > 0.0 && peak > 0.0 {
                cost.mfu = Some(cost.flops_per_second / peak);
            }
        }
        if !self.persist {
            self.stages.push(cost);
            return Ok(());
        }
        let path = self.dir.join("ledger.jsonl");
        let mut line = serde_json::to_string(&cost).map_err(|e| Error::Invalid(e.to_string()))?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .at(&path)?;
        f.write_all(line.as_bytes()).at(&path)?;
        f.sync_all().at(&path)?;
        self.stages.push(cost);
        let summary = serde_json::to_vec_pretty(&self.summary()).map_err(|e| Error::Invalid(e.to_string()))?;
        crate::fsio::write_file_atomic(&self.dir.join("cost.json"), &summary)
    }

    pub fn summary(&self) -> CostSummary {
        CostSummary {
            stages: self.stages.clone(),
            total_wall_seconds: self.stages.iter().map(|s| s.wall_seconds).sum(),
            total_device_hours: self.stages.iter().map(|s| s.device_hours).sum(),
            total_dollars: self.stages.iter().map(|s| s.dollars).sum(),
            total_flops: self.stages.iter().map(|s| s.flops + s.teacher_flops).sum(),
        }
    }

    /// A per-stage table with a total line, for the terminal and the report.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "{:<20} {:>9} {:>13} {:>11} {:>12} {:>11} {:>11} {:>6}\n",
            "stage", "wall s", "device-hours", "dollars", "tokens", "FLOPs", "FLOP/s", "MFU"
        );
        for c in &self.stages {
            s += &format!(
                "{:<20} {:>9.1} {:>13.5} {:>11.5} {:>12} {:>11.3e} {:>11.3e} {:>6}\n",
                if c.interrupted {
                    format!("{} (killed)", c.stage)
                } else {
                    c.stage.clone()
                },
                c.wall_seconds,
                c.device_hours,
                c.dollars,
                c.tokens,
                c.flops + c.teacher_flops,
                c.flops_per_second,
                c.mfu.map_or("-".into(), |m| format!("{:.1}%", 100.0 * m))
            );
        }
        let t = self.summary();
        s += &format!(
            "{:<20} {:>9.1} {:>13.5} {:>11.5} {:>12} {:>11.3e}\n",
            "total",
            t.total_wall_seconds,
            t.total_device_hours,
            t.total_dollars,
            self.stages.iter().map(|c| c.tokens).sum::<u64>(),
            t.total_flops
        );
        if let Some(c) = self.stages.first() {
            s += &format!(
                "device: {} x {} ({}), ${:.4} per device-hour",
                c.device_count, c.device_name, c.device_kind, c.price_per_device_hour
            );
            if let Some(p) = self.stages.iter().find_map(|c| c.peak_flops_per_second) {
                s += &format!(", peak {p:.3e} FLOP/s");
            }
            s += "\n";
            let world = self.stages.iter().map(|c| c.world_size).max().unwrap_or(1);
            if world > 1 {
                let comm: f64 = self.stages.iter().map(|c| c.comm_seconds).sum();
                let wall: f64 = self.stages.iter().map(|c| c.wall_seconds).sum();
                s += &format!(
                    "ranks: {world} (device-hours count every rank); communication {comm:.1} s, {:.1}% of the wall time\n",
                    100.0 * comm / wall.max(1e-9)
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(name: &str, count: usize) -> DeviceInfo {
        DeviceInfo {
            kind: "cuda".into(),
            name: name.into(),
            count,
            ..Default::default()
        }
    }

    #[test]
    fn h800_is_priced_as_deepseek_did() {
        // DeepSeek-R1 (Nature 2025): 512 H800 for about 80 h at $2/GPU-hour ~ $82K.
        let c = StageCost::new(
            "r1",
            &gpu("NVIDIA H800", 512),
            &CostConfig::default(),
            80.0 * 3600.0,
            0,
            0.0,
            0.0,
        );
        assert!((c.device_hours - 40_960.0).abs() < 1e-6);
        assert!((c.dollars - 81_920.0).abs() < 1e-6);
    }

    #[test]
    fn prices_match_gpu_names_and_fall_back_to_default() {
        let p = CostConfig::default();
        assert_eq!(price_per_hour(&p, &gpu("NVIDIA A100-SXM4-80GB", 1)), 1.5);
        assert_eq!(price_per_hour(&p, &gpu("NVIDIA L4", 1)), p.default_gpu_hour);
        let cpu = DeviceInfo {
            kind: "cpu".into(),
            name: "x".into(),
            count: 2,
            ..Default::default()
        };
        let c = StageCost::new("s", &cpu, &p, 3600.0, 10, 1e9, 1e9);
        assert_eq!(c.device_hours, 2.0);
        assert!((c.dollars - 2.0 * p.cpu_core_hour).abs() < 1e-12);
        assert_eq!(c.flops_per_second, 2e9 / 3600.0);
    }

    #[test]
    fn ledger_appends_and_totals() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let mut l = Ledger::new(dir.path());
        let p = CostConfig::default();
        l.record(StageCost::new("a", &gpu("H100", 8), &p, 1800.0, 5, 1.0, 0.0))?;
        l.record(StageCost::new("b", &gpu("H100", 8), &p, 900.0, 5, 2.0, 0.5))?;
        let lines =
            std::fs::read_to_string(dir.path().join("ledger.jsonl")).map_err(|e| Error::Invalid(e.to_string()))?;
        assert_eq!(lines.lines().count(), 2);
        let s: CostSummary = serde_json::from_slice(
            &std::fs::read(dir.path().join("cost.json")).map_err(|e| Error::Invalid(e.to_string()))?,
        )
        .map_err(|e| Error::Invalid(e.to_string()))?;
        assert!((s.total_device_hours - 6.0).abs() < 1e-9);
        assert!((s.total_dollars - 15.0).abs() < 1e-9);
        assert_eq!(s.total_flops, 3.5);
        assert!(l.table().contains("total"));
        Ok(())
    }
}
