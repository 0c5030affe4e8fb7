//! The heartbeat: which stage is running, since when, and when the process was last
//! alive (`heartbeat.json` in the run directory). A resumed run turns a leftover
//! heartbeat into an `interrupted` ledger record, so the time of a killed segment is
//! billed. The heartbeat also forwards progress and appends every step, with the run's
//! running cost, to `metrics/<stage>.jsonl`.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;
use crate::cost::ledger::{Ledger, StageCost};
use crate::device::DeviceInfo;
use crate::error::{IoContext, Result};
use crate::progress::{Progress, StepLog};

/// The heartbeat file: which stage is running, since when, and when the
/// process was last alive. A resumed run turns a leftover heartbeat into an
/// `interrupted` ledger record, so the time of a killed segment is billed.
pub(crate) const HEARTBEAT: &str = "heartbeat.json";

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct Beat {
    stage: String,
    started_unix: f64,
    alive_unix: f64,
    /// The ranks the segment ran on: a resume on another number of ranks still bills
    /// the killed segment at its own. (Heartbeats written before this field: 1.)
    #[serde(default = "one_rank")]
    world: usize,
    /// The devices of each rank and their price per device-hour, likewise: a resume on
    /// other hardware bills the killed segment at the hardware that ran it. (Heartbeats
    /// written before these fields: the resuming run's.)
    #[serde(default)]
    device: Option<DeviceInfo>,
    #[serde(default)]
    price_per_device_hour: Option<f64>,
}

pub(crate) fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Forwards progress, keeps the heartbeat file current, appends every step to
/// `metrics/<stage>.jsonl`, and adds the run's running cost to each step.
pub(crate) struct Heartbeat<'a> {
    pub(crate) run_dir: PathBuf,
    /// Files are written (rank 0 only).
    pub(crate) write: bool,
    pub(crate) inner: &'a dyn Progress,
    pub(crate) stage: std::cell::RefCell<Option<Beat>>,
    pub(crate) dollars_per_second: f64,
    /// The ranks of this run, each rank's devices and their price per device-hour.
    pub(crate) world: usize,
    pub(crate) device: DeviceInfo,
    pub(crate) price_per_device_hour: f64,
    /// Dollars of the ledger records written before the current stage.
    pub(crate) spent_before: std::cell::Cell<f64>,
}

impl<'a> Heartbeat<'a> {
    /// The heartbeat of a run on `world` ranks of `info`'s devices, forwarding to
    /// `inner`; `write`: this process writes the files (rank 0).
    pub(crate) fn new(
        run_dir: &Path,
        write: bool,
        inner: &'a dyn Progress,
        cfg: &crate::config::CostConfig,
        info: &DeviceInfo,
        world: usize,
        ledger: &Ledger,
    ) -> Self {
        let price_per_device_hour = crate::cost::ledger::price_per_hour(cfg, info);
        Heartbeat {
            run_dir: run_dir.to_path_buf(),
            write,
            inner,
            stage: Default::default(),
            dollars_per_second: price_per_device_hour * (info.count * world) as f64 / 3600.0,
            spent_before: std::cell::Cell::new(ledger.summary().total_dollars),
            world,
            device: info.clone(),
            price_per_device_hour,
        }
    }
}

impl Heartbeat<'_> {
    fn beat(&self) {
        if !self.write {
            return;
        }
        if let Some(b) = self.stage.borrow_mut().as_mut() {
            b.alive_unix = now_unix();
            // Best effort: a lost beat costs at most the time until the next one.
            if let Ok(bytes) = serde_json::to_vec(b) {
                let path = self.run_dir.join(HEARTBEAT);
                let tmp = path.with_extension("json.tmp");
                if std::fs::write(&tmp, bytes).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
        }
    }

    /// The stage's ledger record is written: no segment is pending.
    pub(crate) fn clear_after(&self, ledger: &Ledger) {
        self.spent_before.set(ledger.summary().total_dollars);
        self.clear();
    }

    pub(crate) fn clear(&self) {
        *self.stage.borrow_mut() = None;
        if !self.write {
            return;
        }
        let _ = std::fs::remove_file(self.run_dir.join(HEARTBEAT));
    }

    fn metrics_path(&self, stage: &str) -> PathBuf {
        self.run_dir.join("metrics").join(format!("{stage}.jsonl"))
    }

    /// A stage (re)starts after step `step`: metrics of later steps, from a
    /// segment that was killed, are dropped so that every step appears once.
    pub(crate) fn truncate_metrics(&self, stage: &str, step: usize) -> Result<()> {
        if !self.write {
            return Ok(());
        }
        let path = self.metrics_path(stage);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::fsio::write_file_atomic(&path, kept.as_bytes())
    }

    fn append_metrics(&self, stage: &str, log: &StepLog) {
        use std::io::Write as _;
        if !self.write {
            return;
        }
        let path = self.metrics_path(stage);
        let _ = std::fs::create_dir_all(self.run_dir.join("metrics"));
        if let (Ok(mut line), Ok(mut f)) = (
            serde_json::to_string(log),
            std::fs::OpenOptions::new().create(true).append(true).open(&path),
        ) {
            line.push('\n');
            // Metrics are a log, not state: a failed write must not stop training.
            let _ = f.write_all(line.as_bytes());
        }
    }
}

impl Progress for Heartbeat<'_> {
    fn stage_start(&self, stage: &str, total_steps: usize) {
        let now = now_unix();
        *self.stage.borrow_mut() = Some(Beat {
            stage: stage.to_string(),
            started_unix: now,
            alive_unix: now,
            world: self.world,
            device: Some(self.device.clone()),
            price_per_device_hour: Some(self.price_per_device_hour),
        });
        self.beat();
        if total_steps > 0 {
            self.inner.stage_start(stage, total_steps);
        }
    }
    fn step(&self, log: &StepLog) {
        self.beat();
        let mut log = log.clone();
        let stage = self
            .stage
            .borrow()
            .as_ref()
            .map(|b| (b.stage.clone(), now_unix() - b.started_unix));
        if let Some((stage, elapsed)) = stage {
            log.dollars = self.spent_before.get() + elapsed * self.dollars_per_second;
            self.append_metrics(&stage, &log);
        }
        self.inner.step(&log);
    }
    fn advance(&self, done: usize, msg: &str) {
        self.beat();
        self.inner.advance(done, msg);
    }
    fn message(&self, msg: &str) {
        self.inner.message(msg);
    }
    fn stage_end(&self) {
        self.beat();
        self.inner.stage_end();
    }
}

/// On resume: bills the segment a kill cut short, from its heartbeat.
pub(crate) fn record_killed_segment(
    run_dir: &Path,
    ledger: &mut Ledger,
    info: &DeviceInfo,
    cfg: &Config,
    progress: &dyn Progress,
) -> Result<()> {
    let path = run_dir.join(HEARTBEAT);
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(());
    };
    if let Ok(b) = serde_json::from_slice::<Beat>(&bytes) {
        let wall = (b.alive_unix - b.started_unix).max(0.0);
        progress.message(&format!(
            "{}: the last run was killed {wall:.1} s into this stage; resuming",
            b.stage
        ));
        let mut killed = StageCost::interrupted(&b.stage, b.device.as_ref().unwrap_or(info), &cfg.cost, wall);
        if let Some(price) = b.price_per_device_hour {
            killed.price_per_device_hour = price; // on_ranks prices the dollars with it
        }
        ledger.record_as_billed(killed.on_ranks(b.world, 0.0, None))?;
    }
    std::fs::remove_file(&path).at(&path)
}

pub(crate) fn one_rank() -> usize {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment killed on 2 ranks of one GPU each, resumed on 1 rank of CPU cores, is
    /// billed for the 2 GPUs at their price.
    #[test]
    fn a_killed_segment_is_billed_on_the_ranks_it_ran_on() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let gpus = DeviceInfo {
            kind: "cuda".into(),
            name: "NVIDIA H100".into(),
            count: 1,
            ..Default::default()
        };
        let beat = Beat {
            stage: "teacher".into(),
            started_unix: 1000.0,
            alive_unix: 1360.0,
            world: 2,
            device: Some(gpus),
            price_per_device_hour: Some(2.0),
        };
        std::fs::write(dir.path().join(HEARTBEAT), serde_json::to_vec(&beat)?)?;
        let mut ledger = Ledger::new(dir.path()).in_memory(); // this run: 1 rank
        let info = DeviceInfo {
            kind: "cpu".into(),
            count: 2,
            ..Default::default()
        };
        record_killed_segment(
            dir.path(),
            &mut ledger,
            &info,
            &Config::default(),
            &crate::progress::Silent,
        )?;
        let killed = &ledger.stages[0];
        assert!(killed.interrupted);
        // Billed at the 2 ranks of one H100 at $2 that ran it, not at this run's 1 rank
        // of 2 CPU cores.
        assert_eq!((killed.world_size, killed.device_count), (2, 1));
        assert!((killed.device_hours - 360.0 / 3600.0 * 2.0).abs() < 1e-12, "{killed:?}");
        assert!((killed.dollars - killed.device_hours * 2.0).abs() < 1e-12, "{killed:?}");
        assert!(!dir.path().join(HEARTBEAT).exists());
        // A heartbeat from before the field: one rank.
        let old = r#"{"stage":"student","started_unix":0.0,"alive_unix":36.0}"#;
        std::fs::write(dir.path().join(HEARTBEAT), old)?;
        record_killed_segment(
            dir.path(),
            &mut ledger,
            &info,
            &Config::default(),
            &crate::progress::Silent,
        )?;
        assert_eq!(ledger.stages[1].world_size, 1);
        Ok(())
    }
}
