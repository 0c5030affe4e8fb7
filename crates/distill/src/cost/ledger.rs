//! The cost ledger: what each stage of a run cost in device-hours, dollars and
//! FLOPs. Prices come from `[cost]` in the config; the default H800 price of
//! $2 per GPU-hour is the one the DeepSeek-R1 Nature paper (2025, supplementary)
//! used to price its training.
//!
//! Every finished stage is appended to `ledger.jsonl` (one JSON record per
//! line, fsynced) and the whole table is rewritten to `cost.json`. Each record
//! bills the time since the previous record of the process (or since the run
//! started), so start-up, checkpoint loading and everything between stages is
//! billed too. A stage that was killed and later resumed adds one `interrupted`
//! record for the time and work of the segment before the kill (from the run's
//! heartbeat, `cost::heartbeat`), so the totals count every second the run used,
//! and each record's MFU is its own segment's FLOPs over its own wall time.

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
    /// When the billed time ended (Unix seconds), so that a resumed run can bill a
    /// killed segment whose heartbeat is damaged from the last record on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_unix: Option<f64>,
    /// On the completed record of a resumed stage: the whole stage's FLOPs (model,
    /// teacher), where `flops` and `teacher_flops` are this segment's alone. Projections
    /// scale from the whole stage's work (`StageCost::stage_work`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_flops: Option<(f64, f64)>,
    /// A stage that samples or scores (on-policy, RL, online KD): how much of this
    /// segment went to the student's sampling and to the teacher's scoring; the rest of
    /// its time and FLOPs is the update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<WorkSplit>,
    /// Where the price came from when it is not the config's own figure for this device
    /// (an unknown GPU billed at `[cost] default_gpu_hour`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_note: Option<String>,
}

fn one() -> usize {
    1
}

/// The price of one device-hour for `dev` under `prices`.
pub fn price_per_hour(prices: &CostConfig, dev: &DeviceInfo) -> f64 {
    priced(prices, dev).0
}

/// The price of one device-hour for `dev`, and a note when it is the default price of an
/// unknown GPU: the note names the config key that sets the right one.
pub fn priced(prices: &CostConfig, dev: &DeviceInfo) -> (f64, Option<String>) {
    if dev.kind == "cpu" {
        return (prices.cpu_core_hour, None);
    }
    let name = dev.name.to_lowercase();
    // The longest matching fragment wins: "H100 NVL" before "H100".
    let known = prices
        .gpu_hour
        .iter()
        .filter(|(k, _)| names_part(&name, &k.to_lowercase()))
        .max_by_key(|(k, _)| k.len());
    match known {
        Some((_, p)) => (*p, None),
        None => (
            prices.default_gpu_hour,
            Some(format!(
                "no price for the GPU {:?} in [cost] gpu_hour; billed at [cost] default_gpu_hour = ${:.2}; \
                 set [cost] gpu_hour.\"<name fragment>\" = <dollars per GPU-hour> for the right figure",
                dev.name, prices.default_gpu_hour
            )),
        ),
    }
}

/// Now, in Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Whether `fragment` appears in `name` as a whole part, not inside a longer model
/// number: "l4" names "nvidia l4" but not "nvidia l40s"; "a100" names "a100-sxm4-80gb".
fn names_part(name: &str, fragment: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    !fragment.is_empty()
        && name
            .match_indices(fragment)
            .any(|(i, _)| !alnum(name[..i].chars().next_back()) && !alnum(name[i + fragment.len()..].chars().next()))
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
        let (price, price_note) = priced(prices, dev);
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
            ended_unix: None,
            price_note,
            stage_flops: None,
            split: None,
        }
    }

    /// The whole stage's (model, teacher) FLOPs: this record's, or on the completed
    /// record of a resumed stage, the totals its checkpoint carried.
    pub fn stage_work(&self) -> (f64, f64) {
        self.stage_flops.unwrap_or((self.flops, self.teacher_flops))
    }

    /// The work a stage did in this process, priced for `dev`; `Ledger::record` adds
    /// the wall time it took.
    pub fn work(
        stage: &str,
        dev: &DeviceInfo,
        prices: &CostConfig,
        tokens: u64,
        flops: f64,
        teacher_flops: f64,
    ) -> Self {
        Self::new(stage, dev, prices, 0.0, tokens, flops, teacher_flops)
    }

    /// The same record over `wall_seconds`: device-hours, dollars and FLOP/s follow.
    pub fn over(mut self, wall_seconds: f64) -> Self {
        self.wall_seconds = wall_seconds;
        self.device_hours = wall_seconds / 3600.0 * (self.device_count * self.world_size.max(1)) as f64;
        self.dollars = self.device_hours * self.price_per_device_hour;
        self.flops_per_second = if wall_seconds > 0.0 {
            (self.flops + self.teacher_flops) / wall_seconds
        } else {
            0.0
        };
        self
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

    /// The time a killed segment of `stage` ran, and the work it did (`tokens` and
    /// `flops` up to its last heartbeat; work after its last checkpoint is done again by
    /// the segment that resumes it, and billed there too).
    pub fn interrupted(
        stage: &str,
        dev: &DeviceInfo,
        prices: &CostConfig,
        wall_seconds: f64,
        (tokens, flops): (u64, f64),
    ) -> Self {
        Self {
            interrupted: true,
            ..Self::new(stage, dev, prices, wall_seconds, tokens, flops, 0.0)
        }
    }
}

/// The sampling and scoring inside a stage's record (seconds and FLOPs of this segment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkSplit {
    pub sample_seconds: f64,
    pub sample_flops: f64,
    pub score_seconds: f64,
    pub score_flops: f64,
}

impl WorkSplit {
    /// (seconds, FLOPs) of the update: the record's time and work less sampling and scoring.
    pub fn update(&self, c: &StageCost) -> (f64, f64) {
        let seconds = (c.wall_seconds - self.sample_seconds - self.score_seconds).max(0.0);
        let flops = (c.flops + c.teacher_flops - self.sample_flops - self.score_flops).max(0.0);
        (seconds, flops)
    }
}

/// What all the records of one stage add up to: killed segments and the completed one.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTotal {
    pub wall_seconds: f64,
    pub device_hours: f64,
    pub dollars: f64,
    pub flops: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CostSummary {
    pub stages: Vec<StageCost>,
    pub total_wall_seconds: f64,
    pub total_device_hours: f64,
    pub total_dollars: f64,
    pub total_flops: f64,
}

impl CostSummary {
    /// The sum of every record of `stage` (its killed segments and the completed one);
    /// None when the ledger has no record of it.
    pub fn stage(&self, stage: &str) -> Option<StageTotal> {
        let mut records = self.stages.iter().filter(|c| c.stage == stage).peekable();
        records.peek()?;
        Some(records.fold(StageTotal::default(), |t, c| StageTotal {
            wall_seconds: t.wall_seconds + c.wall_seconds,
            device_hours: t.device_hours + c.device_hours,
            dollars: t.dollars + c.dollars,
            flops: t.flops + c.flops + c.teacher_flops,
        }))
    }
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
    /// This process's unbilled time starts here: at the run's start, then at the end
    /// of its last record (monotonic, and the same instant in Unix seconds).
    billed_until: (std::time::Instant, f64),
}

impl Ledger {
    pub fn new(run_dir: &Path) -> Self {
        Self {
            dir: run_dir.to_path_buf(),
            stages: vec![],
            peak_flops: None,
            persist: true,
            world: 1,
            billed_until: (std::time::Instant::now(), unix_now()),
        }
    }

    /// Bills this process's time from `start` on (the run's start, before the ledger
    /// could be opened).
    pub fn billing_from(mut self, start: (std::time::Instant, f64)) -> Self {
        self.billed_until = start;
        self
    }

    /// When this process's unbilled time began, in Unix seconds.
    pub fn unbilled_since_unix(&self) -> f64 {
        self.billed_until.1
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
    /// billed on the run's ranks for the time since this process's last record (or its
    /// start): every second of the process is billed to some stage.
    pub fn record(&mut self, mut cost: StageCost) -> Result<()> {
        if cost.world_size != self.world {
            let (comm, steps) = (cost.comm_seconds, cost.steps);
            cost = cost.on_ranks(self.world, comm, steps);
        }
        let now = (std::time::Instant::now(), unix_now());
        cost = cost.over(now.0.duration_since(self.billed_until.0).as_secs_f64());
        cost.ended_unix = Some(now.1);
        self.billed_until = now;
        self.record_as_billed(cost)
    }

    /// Appends a stage billed on the ranks it says (`StageCost::on_ranks`): a segment
    /// an earlier launch ran, on its own number of ranks.
    pub fn record_as_billed(&mut self, mut cost: StageCost) -> Result<()> {
        if let (Some(peak), None) = (self.peak_flops, cost.peak_flops_per_second) {
            cost.peak_flops_per_second = Some(peak);
            if cost.flops_per_second > 0.0 && peak > 0.0 {
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
        assert_eq!(price_per_hour(&p, &gpu("NVIDIA A100-SXM4-80GB", 1)), 2.70);
        assert_eq!(price_per_hour(&p, &gpu("NVIDIA L4", 1)), 0.8048);
        assert_eq!(price_per_hour(&p, &gpu("NVIDIA L40S", 1)), 2.25);
        assert_eq!(price_per_hour(&p, &gpu("NVIDIA H200", 8)), 6.31);
        // Unknown: the default price, and a note that names the key to set.
        let (price, note) = priced(&p, &gpu("NVIDIA L40", 1));
        assert_eq!(price, p.default_gpu_hour);
        assert!(note.is_some_and(|n| n.contains("[cost] gpu_hour")));
        assert!(priced(&p, &gpu("NVIDIA B200", 1)).1.is_none());
        let unknown = StageCost::new("s", &gpu("Mystery GPU", 1), &p, 3600.0, 0, 0.0, 0.0);
        assert!(unknown.price_note.is_some());
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
        // Records of known duration (as a killed segment's is), billed as they say.
        l.record_as_billed(StageCost::new("a", &gpu("H100", 8), &p, 1800.0, 5, 1.0, 0.0))?;
        l.record_as_billed(StageCost::new("b", &gpu("H100", 8), &p, 900.0, 5, 2.0, 0.5))?;
        let lines =
            std::fs::read_to_string(dir.path().join("ledger.jsonl")).map_err(|e| Error::Invalid(e.to_string()))?;
        assert_eq!(lines.lines().count(), 2);
        let s: CostSummary = serde_json::from_slice(
            &std::fs::read(dir.path().join("cost.json")).map_err(|e| Error::Invalid(e.to_string()))?,
        )
        .map_err(|e| Error::Invalid(e.to_string()))?;
        assert!((s.total_device_hours - 6.0).abs() < 1e-9);
        assert!((s.total_dollars - 6.0 * 6.16).abs() < 1e-9);
        assert_eq!(s.total_flops, 3.5);
        assert!(l.table().contains("total"));
        Ok(())
    }

    /// `record` bills the time since the process's last record (or the run's start), so
    /// no second between records goes unbilled; MFU is the record's own FLOPs over it.
    #[test]
    fn records_bill_the_time_since_the_last_one() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let start = (std::time::Instant::now(), unix_now());
        let mut l = Ledger::new(dir.path()).in_memory().billing_from(start);
        l.peak_flops = Some(1e12);
        let p = CostConfig::default();
        let cpu = DeviceInfo {
            kind: "cpu".into(),
            name: "x".into(),
            count: 2,
            ..Default::default()
        };
        std::thread::sleep(std::time::Duration::from_millis(120));
        l.record(StageCost::work("a", &cpu, &p, 10, 6e10, 0.0))?;
        std::thread::sleep(std::time::Duration::from_millis(60));
        l.record(StageCost::work("b", &cpu, &p, 10, 0.0, 0.0))?;
        let (a, b) = (&l.stages[0], &l.stages[1]);
        assert!(a.wall_seconds >= 0.12 && b.wall_seconds >= 0.06, "{a:?} {b:?}");
        let elapsed = start.0.elapsed().as_secs_f64();
        assert!(
            a.wall_seconds + b.wall_seconds <= elapsed,
            "billed more than the time that passed"
        );
        assert!((a.device_hours - a.wall_seconds * 2.0 / 3600.0).abs() < 1e-12);
        assert!((a.mfu.unwrap_or(0.0) - 6e10 / a.wall_seconds / 1e12).abs() < 1e-9);
        assert!(b.ended_unix.unwrap_or(0.0) >= a.ended_unix.unwrap_or(f64::MAX));
        // The report's stage cost sums a stage's records.
        l.record_as_billed(StageCost::interrupted("a", &cpu, &p, 10.0, (5, 1e9)))?;
        let total = l.summary().stage("a").unwrap_or_default();
        assert!((total.wall_seconds - (a_wall(&l) + 10.0)).abs() < 1e-9);
        assert!(l.summary().stage("c").is_none());
        Ok(())
    }

    fn a_wall(l: &Ledger) -> f64 {
        l.stages
            .iter()
            .filter(|c| c.stage == "a" && !c.interrupted)
            .map(|c| c.wall_seconds)
            .sum()
    }
}
